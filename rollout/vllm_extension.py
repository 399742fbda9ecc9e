"""Methods added to vLLM's worker (`worker_extension_cls`), reached with `llm.collective_rpc`.

The OpenRLHF/veRL way of loading weights (`model_runner.model.load_weights`) fails on CPU, where
weights are pre-packed; vLLM's own in-place `reload_weights` works on CPU and GPU.
"""

from __future__ import annotations


class DocRLWorkerExtension:
    def docrl_reload_weights(self, named_tensors: list) -> int:
        """Load (checkpoint name, tensor) pairs in place; returns how many were given."""
        self.reload_weights(weights_iterator=iter(named_tensors), is_checkpoint_format=True)
        return len(named_tensors)

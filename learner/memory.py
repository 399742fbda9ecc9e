"""What the learner's model state takes on a GPU, from the policy's parameter count: the memory plan
`docrl` checks before anything starts (cluster/config.py), so that a run that cannot fit next to
vLLM is refused at load instead of failing at its first step.

Per parameter, for full fine-tuning with DeepSpeed and a client AdamW: the weights (2 bytes in
bf16, 4 in fp32), their gradients (the same), the fp32 gradient accumulation buffer (bf16 only:
`data_types.grad_accum_dtype`), the fp32 master weights (bf16 only) and Adam's two fp32 moments:
20 bytes in bf16, 16 in fp32. ZeRO-2 shards gradients and optimizer state over the ranks, ZeRO-3
the weights too. A frozen reference (a KL penalty, or learner.log_kl_to_ref) adds one copy of
the weights, sharded like them. Activations, the CUDA context and the allocator's fragmentation
come on top: the plan keeps a tenth of the learner's share free for them.
"""

from __future__ import annotations

import math
from pathlib import Path

# Hub ids docrl's presets name, with the parameter count their model cards give (no download at
# load time); a local checkpoint is counted from its safetensors headers instead.
KNOWN_PARAMETERS = {
    "Qwen/Qwen2-VL-2B-Instruct": 2_210_000_000,
    "Qwen/Qwen2.5-VL-3B-Instruct": 3_750_000_000,
    "Qwen/Qwen2-VL-7B-Instruct": 8_290_000_000,
    "Qwen/Qwen2.5-VL-7B-Instruct": 8_290_000_000,
    "vidore/colqwen2-v1.0": 2_210_000_000,
    "Alibaba-NLP/gme-Qwen2-VL-2B-Instruct": 2_210_000_000,
}
ACTIVATION_RESERVE = 0.1  # of the learner's share of its GPU


def parameter_count(model: str) -> int | None:
    """Parameters of a local checkpoint (its safetensors headers) or of a known hub id; None when
    neither (a tiny model not built yet, another hub id)."""
    path = Path(model)
    if path.is_dir() and any(path.glob("*.safetensors")):
        from rollout.weights import checkpoint_shapes

        return sum(math.prod(shape) for shape in checkpoint_shapes(path).values())
    return KNOWN_PARAMETERS.get(model)


def bytes_per_parameter(dtype: str) -> tuple[int, int]:
    """(bytes of the weights, bytes of gradients + accumulation + master weights + Adam) a parameter."""
    if dtype == "bfloat16":
        return 2, 2 + 4 + 4 + 8
    return 4, 4 + 8


def full_finetune_bytes(parameters: int, dtype: str, zero_stage: int, num_ranks: int, with_reference: bool) -> float:
    """Bytes of model state on each learner GPU for full fine-tuning (before activations)."""
    weights, sharded = bytes_per_parameter(dtype)
    weight_copies = 2 if with_reference else 1
    weight_share = 1 / num_ranks if zero_stage == 3 else 1.0
    return parameters * (weights * weight_copies * weight_share + sharded / num_ranks)

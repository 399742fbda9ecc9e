"""Full weights through Ray's object store: learner rank 0 puts them there once as numpy arrays
(torch tensors are slow there) and every rollout worker reads them; the same object re-syncs a
worker that Ray restarted, because it needs no other party. Versions are checked on arrival
(`rollout.engine`)."""

from __future__ import annotations

import warnings

import numpy as np
import torch


def to_numpy(named: dict[str, torch.Tensor]) -> dict[str, tuple[np.ndarray, str]]:
    """Tensors as numpy for the object store; bf16 has no numpy type, so it travels as int16 bits."""
    out = {}
    for name, t in named.items():
        t = t.detach().cpu().contiguous()
        dtype = str(t.dtype).removeprefix("torch.")
        out[name] = ((t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy(), dtype)
    return out


def from_numpy(arrays: dict[str, tuple[np.ndarray, str]]) -> dict[str, torch.Tensor]:
    """Tensors over the arrays' memory, without a copy. Arrays fetched from the object store are
    read-only views of it; the tensors are only read (the engine copies them into its weights), so
    no copy is needed, and one would hold a second full model in each worker during every push
    (with 8 workers of a 7B bf16 policy on a node, 120 GB of host memory)."""
    out = {}
    with warnings.catch_warnings():
        # torch warns that writing to a tensor over a read-only array is undefined: nothing writes
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        for name, (a, dtype) in arrays.items():
            t = torch.from_numpy(a)
            out[name] = t.view(torch.bfloat16) if dtype == "bfloat16" else t
    return out

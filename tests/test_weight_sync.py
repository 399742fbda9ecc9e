"""Full weights through the object store (rollout/weight_sync.py): exact round trip, bf16 as int16
bits, and no copy on arrival (a copy per worker would double a real-size model's host memory at
every push)."""

from __future__ import annotations

import numpy as np
import pytest
import ray
import torch

from rollout.weight_sync import from_numpy, to_numpy


def _weights() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {"a.weight": torch.randn(4, 3, generator=gen), "b.weight": torch.randn(5, generator=gen).to(torch.bfloat16),
            "c.bias": torch.arange(6, dtype=torch.float16)}


def test_round_trip_is_exact_in_every_dtype():
    weights = _weights()
    arrays = to_numpy(weights)
    assert arrays["b.weight"][0].dtype == np.int16 and arrays["b.weight"][1] == "bfloat16"
    back = from_numpy(arrays)
    for name, t in weights.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name


@pytest.mark.ray
def test_arrival_from_the_object_store_shares_memory_instead_of_copying(ray_cluster):
    big = {"w": torch.randn(512, 1024), "v": torch.randn(256, 1024).to(torch.bfloat16)}
    arrays = ray.get(ray.put(to_numpy(big)))  # read-only views of the object store, as a worker gets them
    assert not arrays["w"][0].flags.writeable
    tensors = from_numpy(arrays)
    for name in big:
        assert tensors[name].data_ptr() == arrays[name][0].ctypes.data, f"{name} was copied"
        assert torch.equal(tensors[name], big[name])

"""Moving weights from the learner to the rollout workers.

Two transports, both versioned and checked on arrival:
- "collective": a dedicated process group (gloo on CPU, NCCL on GPU) between the sender (the
  learner's rank 0) and the workers, one broadcast per tensor. It is separate from DeepSpeed's
  default group so the two never interleave, and every wait has a timeout.
- "object_store": the tensors go once into Ray's object store as numpy arrays (torch tensors are
  slow there) and every worker reads them; also the path used to re-sync a worker that
  Ray restarted, because it needs no other party.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch

GROUP_PREFIX = "docrl-weight-sync"


@dataclass(frozen=True)
class TensorMeta:
    name: str
    shape: tuple[int, ...]
    dtype: str  # torch dtype name, e.g. "float32", "bfloat16"


def to_numpy(named: dict[str, torch.Tensor]) -> dict[str, tuple[np.ndarray, str]]:
    """Tensors as numpy for the object store; bf16 has no numpy type, so it travels as int16 bits."""
    out = {}
    for name, t in named.items():
        t = t.detach().cpu().contiguous()
        dtype = str(t.dtype).removeprefix("torch.")
        out[name] = ((t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy(), dtype)
    return out


def from_numpy(arrays: dict[str, tuple[np.ndarray, str]]) -> dict[str, torch.Tensor]:
    out = {}
    for name, (a, dtype) in arrays.items():
        t = torch.from_numpy(np.array(a, copy=True))  # object-store arrays are read-only
        out[name] = t.view(torch.bfloat16) if dtype == "bfloat16" else t
    return out


class WeightSyncGroup:
    """One member of the weight-sync process group. Rank 0 sends, every other rank receives."""

    def __init__(self, host: str, port: int, rank: int, world_size: int, timeout_s: float, name: str):
        import torch.distributed as dist

        self.rank, self.world_size, self.name = rank, world_size, name
        timeout = timedelta(seconds=timeout_s)
        store = dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=timeout, wait_for_workers=False)
        prefixed = dist.PrefixStore(GROUP_PREFIX, store)
        if torch.cuda.is_available():
            self.device = torch.device("cuda", torch.cuda.current_device())
            self.group = dist.ProcessGroupNCCL(prefixed, rank, world_size)
        else:
            self.device = torch.device("cpu")
            self.group = dist.ProcessGroupGloo(prefixed, rank, world_size, timeout)
        self.store = store

    def _wait(self, work, what: str) -> None:
        try:
            work.wait()
        except RuntimeError as e:
            raise TimeoutError(f"{self.name}: weight sync {what} failed or timed out (rank {self.rank} of "
                               f"{self.world_size}): {e}") from e

    def send(self, named: dict[str, torch.Tensor]) -> None:
        for name, t in named.items():
            buf = t.detach().to(self.device).contiguous()
            self._wait(self.group.broadcast(buf, 0), f"sending {name}")

    def receive(self, metas: list[TensorMeta]) -> dict[str, torch.Tensor]:
        out = {}
        for m in metas:
            buf = torch.empty(m.shape, dtype=getattr(torch, m.dtype), device=self.device)
            self._wait(self.group.broadcast(buf, 0), f"receiving {m.name}")
            out[m.name] = buf if self.device.type == "cpu" else buf.cpu()
        return out


def metas_of(named: dict[str, torch.Tensor]) -> list[TensorMeta]:
    return [TensorMeta(k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in named.items()]

"""Waiting on actors, finding a port, choosing a task's device: small helpers every role shares."""

from __future__ import annotations

import os
import socket


def get_with_timeout(refs, timeout_s: float, what: str):
    """`ray.get` that fails with a message naming what was awaited instead of hanging."""
    import ray  # here, not at the top: role logic that imports this module runs without Ray too

    try:
        return ray.get(refs, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise TimeoutError(f"{what} did not finish within {timeout_s:g}s; an actor may be waiting for resources "
                           f"(`ray status` lists pending demands) or stuck (see its log in the Ray dashboard or "
                           f"/tmp/ray/session_latest/logs)") from None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` right now (the caller binds it soon after)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def task_device(num_gpus: float) -> str:
    """The torch device for a Ray task or actor that asked for `num_gpus` GPUs: "cuda" when it asked
    for some (Ray then narrows CUDA_VISIBLE_DEVICES to them) and CUDA is there, else "cpu". What was
    asked decides, not what is visible: Ray leaves every GPU of the node visible to a task or actor
    that asked for none, and computing there would use a GPU reserved by another role."""
    import torch

    return "cuda" if num_gpus > 0 and torch.cuda.is_available() else "cpu"

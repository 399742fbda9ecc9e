"""Waiting on actors, finding a port, choosing a task's device: small helpers every role shares."""

from __future__ import annotations

import os
import socket


class PlacementError(RuntimeError):
    """The cluster cannot hold a role of the run, or its placement group stayed pending: the
    message names the role, what it asks and what the cluster has."""


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
    """The torch device for a Ray task or actor that asked for `num_gpus` GPUs (call it inside
    the task or actor): see `gpu_device`."""
    import ray
    import torch

    return gpu_device(num_gpus, ray.get_gpu_ids() if num_gpus > 0 else [],
                      visible_devices_set_by_ray=ray_narrows_visible_gpus(), cuda_available=torch.cuda.is_available())


def ray_narrows_visible_gpus() -> bool:
    """Whether Ray narrows CUDA_VISIBLE_DEVICES to the GPUs it gave a task or actor (its default);
    RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES leaves every GPU of the node visible."""
    return not os.environ.get("RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES")


def visible_gpu_index(gpu_ids: list, visible_devices_set_by_ray: bool) -> int:
    """The CUDA index, in what the process sees, of the first GPU Ray gave it: 0 when Ray narrowed
    CUDA_VISIBLE_DEVICES to its GPUs, else the id Ray gave."""
    return 0 if visible_devices_set_by_ray or not gpu_ids else int(gpu_ids[0])


def gpu_device(num_gpus: float, gpu_ids: list, visible_devices_set_by_ray: bool, cuda_available: bool) -> str:
    """"cuda:<index>" for a task or actor that asked for GPUs when CUDA is there, else "cpu". What
    was asked decides, not what is visible: Ray leaves every GPU of the node visible to a task or
    actor that asked for none, and computing there would use a GPU reserved by another role. Ray
    narrows CUDA_VISIBLE_DEVICES to the GPUs it gave, so the first of them is index 0; with
    RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES every GPU stays visible and the index is the id
    Ray gave (`learner.rank.cuda_local_rank` gives DeepSpeed the same index)."""
    if num_gpus <= 0 or not cuda_available:
        return "cpu"
    return f"cuda:{visible_gpu_index(gpu_ids, visible_devices_set_by_ray)}"


def worker_process_died(error: BaseException) -> bool:
    """Ray's word that an actor's process died while its node lived on (the node's raylet reported
    the death): a killed or crashed process, not a lost node."""
    return "its worker process has died" in str(error)

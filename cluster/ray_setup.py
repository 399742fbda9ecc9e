"""Connecting to Ray: the cluster in RAY_ADDRESS, or a local one that talks on loopback only."""

from __future__ import annotations

import os

# Ray rewrites 127.0.0.1 to the machine's interface address unless this is off. It
# must be set before `ray` is imported anywhere in the process, so this module sets it on import.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import ray  # noqa: E402


def init_ray(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None,
             include_dashboard: bool = False, runtime_env: dict | None = None) -> None:
    """Join the cluster at `address` (or RAY_ADDRESS), else start a local one bound to 127.0.0.1.

    `num_gpus` on a local cluster may exceed the real count: Ray then schedules with fake GPUs,
    which is how tests exercise GPU placement on CPU machines (torch still sees none).
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    env = {"env_vars": {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}}
    if runtime_env:
        env = {**runtime_env, "env_vars": {**env["env_vars"], **runtime_env.get("env_vars", {})}}
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=True)
        return
    ray.init(
        address="local",
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        include_dashboard=include_dashboard,
        _node_ip_address="127.0.0.1",
        runtime_env=env,
        log_to_driver=True,
    )

"""Connecting to Ray: the cluster in RAY_ADDRESS, or a local one that talks on loopback only."""

from __future__ import annotations

import os

# Ray 2.60 reads this flag when `ray` is imported and in every process it starts. Off ("0"), a
# node advertises 127.0.0.1 instead of the machine's interface address, and joining other nodes
# (`ray start --address`) is refused: right for a local single-machine cluster, wrong for a real
# one. So it is set only where a local cluster is started, never on import.
LOOPBACK_ONLY = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def init_ray(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None,
             include_dashboard: bool = False, runtime_env: dict | None = None) -> None:
    """Join the cluster at `address` (or RAY_ADDRESS), else start a local one bound to 127.0.0.1.

    `num_gpus` on a local cluster may exceed the real count: Ray then schedules with fake GPUs,
    which is how tests exercise GPU placement on CPU machines (torch still sees none).
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
        return
    # The processes of the local cluster (GCS, raylet, dashboard, workers) inherit the environment;
    # this process read the flag when it imported `ray`, possibly before now, and it chooses the
    # node's address: tell its already-loaded constants too.
    from ray._private import ray_constants

    os.environ.update(LOOPBACK_ONLY)
    ray_constants.ENABLE_RAY_CLUSTER = False
    env_vars = {**LOOPBACK_ONLY, **(runtime_env or {}).get("env_vars", {})}
    ray.init(
        address="local",
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        include_dashboard=include_dashboard,
        _node_ip_address="127.0.0.1",
        runtime_env={**(runtime_env or {}), "env_vars": env_vars},
        log_to_driver=True,
    )


def monitoring_addresses() -> dict[str, str | None]:
    """Where to watch this process's cluster: the Ray dashboard (None without one) and the node's
    Prometheus endpoint, where docrl's gauges appear as `ray_docrl_*`."""
    import ray
    from ray._private import worker as ray_worker

    dashboard = ray_worker.get_dashboard_url()
    node_id = ray.get_runtime_context().get_node_id()
    node = next((n for n in ray.nodes() if n["NodeID"] == node_id), None)
    metrics = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics" if node else None
    return {"dashboard": f"http://{dashboard}" if dashboard else None, "metrics": metrics}

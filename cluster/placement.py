"""Placement of the actor roles on the cluster, from the config: one placement group per role,
one bundle per actor ({"CPU": c, "GPU": g}), all reserved before any model is loaded.

Two checks keep a run that cannot be placed from hanging. Before any role starts, `check_fits`
compares every role's ask with the cluster's nodes and refuses a run that could never be placed,
naming the role. Then each placement group must be ready within `ray.placement_timeout_s` (other
work may hold the resources), else the run fails naming the role, what it asks, what the cluster
has and what is free. The learner group reserves its own bundles (`learner/group.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from common.ray_helpers import PlacementError


@dataclass
class RolePlacement:
    role: str
    bundles: list[dict]
    group: PlacementGroup

    def strategy(self, index: int) -> PlacementGroupSchedulingStrategy:
        return PlacementGroupSchedulingStrategy(placement_group=self.group, placement_group_bundle_index=index,
                                                placement_group_capture_child_tasks=True)

    def strategies(self) -> list[PlacementGroupSchedulingStrategy]:
        return [self.strategy(i) for i in range(len(self.bundles))]


def _bundle(cpus: float, gpus: float, custom: dict[str, float] | None = None) -> dict:
    return {"CPU": cpus, **({"GPU": gpus} if gpus > 0 else {}), **(custom or {})}


def role_bundles(cfg) -> dict[str, list[dict]]:
    """Bundles per role the driver reserves for a DocRLConfig (the learner is placed by
    LearnerGroup itself; no retriever actors when the gold page is handed over)."""
    r, ro, rw = cfg.retriever, cfg.rollout, cfg.reward
    extra = cfg.ray.role_resources
    return {
        **({} if r.use_gold_page else {"retriever": [_bundle(r.num_cpus_per_actor, r.num_gpus_per_actor,
                                                             extra.get("retriever"))] * r.num_actors}),
        # num_gpus_per_worker is the worker's total, its tensor-parallel shards included
        "rollout": [_bundle(ro.num_cpus_per_worker, ro.num_gpus_per_worker, extra.get("rollout"))] * ro.num_workers,
        "reward": [_bundle(rw.num_cpus_per_actor, 0, extra.get("reward"))] * rw.num_actors,
    }


def learner_bundle(cfg) -> dict:
    """One learner rank's bundle (LearnerGroup reserves num_ranks of them)."""
    ln = cfg.learner
    return _bundle(ln.num_cpus_per_rank, ln.num_gpus_per_rank, cfg.ray.role_resources.get("learner"))


def run_asks(cfg) -> dict[str, list[dict]]:
    """Every role's bundles, the learner's included: what the whole run holds at once."""
    return {**role_bundles(cfg), "learner": [learner_bundle(cfg)] * cfg.learner.num_ranks}


# the config keys that size each role's ask, for the refusal's advice
ASK_KEYS = {
    "retriever": ("retriever.num_actors", "retriever.num_cpus_per_actor", "retriever.num_gpus_per_actor"),
    "rollout": ("rollout.num_workers", "rollout.num_cpus_per_worker", "rollout.num_gpus_per_worker"),
    "reward": ("reward.num_actors", "reward.num_cpus_per_actor", None),
    "learner": ("learner.num_ranks", "learner.num_cpus_per_rank", "learner.num_gpus_per_rank"),
}


def _fmt(res: dict) -> str:
    return ", ".join(f"{res.get(k, 0):g} {k}s" for k in ("CPU", "GPU"))


def check_fits(asks: dict[str, list[dict]], nodes: list[dict], strategy: str = "PACK") -> None:
    """Refuse a run that no placement on `nodes` (each node's total resources) can hold.

    Only conditions every placement must meet are checked, so a run that Ray could place is never
    refused: each bundle fits on some node; all roles together fit the cluster's totals; a
    STRICT_PACK role fits on one node; a STRICT_SPREAD role finds a node per bundle. Roles are
    checked in order, and the first that fails is named with what it asks, what the roles before
    it take and what the cluster has.
    """
    total = {k: sum(n.get(k, 0) for n in nodes) for k in ("CPU", "GPU")}
    has = f"the cluster has {_fmt(total)} on {len(nodes)} node(s) ({'; '.join(_fmt(n) for n in nodes) or 'none'})"
    taken = {"CPU": 0.0, "GPU": 0.0}
    before: list[str] = []
    for role, bundles in asks.items():
        if not bundles:
            continue
        need = {k: sum(b.get(k, 0) for b in bundles) for k in ("CPU", "GPU")}
        count_key, cpu_key, gpu_key = ASK_KEYS.get(role, (None, None, None))
        lower = " or ".join(f"`{k}`" for k in (count_key, cpu_key, gpu_key) if k)
        ask = f"role '{role}' asks {len(bundles)} x {bundles[0]} ({_fmt(need)} in all)"

        def refuse(why: str) -> None:
            raise PlacementError(f"the cluster cannot hold this run: {ask}; {why}; {has}. Lower {lower}, "
                                 "or give the cluster more (`ray start --num-cpus/--num-gpus` sets a node's "
                                 "logical CPUs and GPUs)")

        fitting = [n for n in nodes if all(n.get(k, 0) >= v for k, v in bundles[0].items())]
        if not fitting:
            custom = "".join(f" and {v:g} {k}" for k, v in bundles[0].items() if k not in ("CPU", "GPU"))
            if custom:
                lower += " or `ray.role_resources`"
            refuse(f"no node has {_fmt(bundles[0])}{custom} for one of its actors")
        if strategy == "STRICT_PACK" and not any(all(n.get(k, 0) >= v for k, v in need.items()) for n in nodes):
            refuse(f"placement STRICT_PACK puts all {len(bundles)} on one node, and no node has {_fmt(need)}")
        if strategy == "STRICT_SPREAD" and len(fitting) < len(bundles):
            refuse(f"placement STRICT_SPREAD puts each on its own node, and {len(fitting)} node(s) can hold one")
        for k in ("CPU", "GPU"):
            if taken[k] + need[k] > total[k] + 1e-9:
                prior = f" with the roles before it ({', '.join(before)}: {_fmt(taken)})" if before else ""
                refuse(f"that is {taken[k] + need[k]:g} {k}s{prior}")
        for k in taken:
            taken[k] += need[k]
        before.append(role)


def cluster_nodes() -> list[dict]:
    """Total resources of every live node of the connected Ray cluster."""
    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def bundle_nodes(group: PlacementGroup) -> list[str]:
    """The node id of each bundle of a ready placement group, in bundle order."""
    table = ray.util.placement_group_table(group)
    return [table["bundles_to_node_id"][i] for i in range(len(table["bundles"]))]


def where_roles_run(groups: dict[str, PlacementGroup]) -> dict[str, list[dict]]:
    """Per role, each actor's node: {"node_id", "ip"} (the run records it; a lost node is named
    with the roles it held)."""
    ips = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
    return {role: [{"node_id": nid, "ip": ips.get(nid, "?")} for nid in bundle_nodes(group)]
            for role, group in groups.items()}


def lost_roles(placed: dict[str, list[dict]]) -> str | None:
    """What the nodes that left the cluster held, as one sentence; None when every node of the
    run is alive."""
    alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
    lost: dict[str, list[str]] = {}
    for role, nodes in placed.items():
        for i, node in enumerate(nodes):
            if node["node_id"] not in alive:
                lost.setdefault(f"{node['ip']} (node {node['node_id'][:12]})", []).append(f"{role} {i}")
    if not lost:
        return None
    return "; ".join(f"node {where} left the cluster, with {', '.join(roles)}" for where, roles in lost.items())


def reserve(role: str, bundles: list[dict], strategy: str, timeout_s: float) -> RolePlacement:
    group = placement_group(bundles, strategy=strategy, name=f"docrl-{role}")
    try:
        ray.get(group.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(group)
        need = {k: sum(b.get(k, 0) for b in bundles) for k in ("CPU", "GPU")}
        raise PlacementError(
            f"placement of role '{role}' ({len(bundles)} x {bundles[0]}, {strategy}; {need['CPU']:g} CPUs and "
            f"{need['GPU']:g} GPUs in all) not ready within {timeout_s:g}s (ray.placement_timeout_s): the cluster "
            f"has {_fmt(ray.cluster_resources())}, {_fmt(ray.available_resources())} free now; other work may "
            "hold the rest (`ray status` lists it)"
        ) from None
    return RolePlacement(role, bundles, group)


def place_roles(cfg, timeout_s: float | None = None) -> dict[str, RolePlacement]:
    """Reserve every role's bundles (all or nothing)."""
    timeout_s = timeout_s or cfg.ray.placement_timeout_s
    placed: dict[str, RolePlacement] = {}
    try:
        for role, bundles in role_bundles(cfg).items():
            placed[role] = reserve(role, bundles, cfg.ray.placement_strategy, timeout_s)
    except Exception:
        release(placed)
        raise
    return placed


def release(placed: dict[str, RolePlacement]) -> None:
    for p in placed.values():
        remove_placement_group(p.group)


def local_cores(cfg) -> int | None:
    """The CPU cores of this machine when the run starts its own local cluster (every role runs
    here), else None (roles on other nodes, whose cores Ray's bundles already account for)."""
    import os

    return len(os.sched_getaffinity(0)) if cfg.ray.address is None and not os.environ.get("RAY_ADDRESS") else None


def role_threads(cfg, cores: int | None) -> tuple[int, int]:
    """Threads per rollout worker and per learner rank: each role's CPUs by default. In async mode
    the two roles compute at the same time, so on a local cluster whose roles ask for more
    threads than the machine has cores (logical CPUs above the real ones, as in the tiny preset)
    both are scaled down in proportion rather than oversubscribe the cores; in sync mode they take
    turns and each keeps its own."""
    rollout = max(1, int(cfg.rollout.num_cpus_per_worker))
    learner = max(1, int(cfg.learner.num_cpus_per_rank))
    if cfg.trainer.mode != "async" or cores is None:
        return rollout, learner
    demand = cfg.rollout.num_workers * rollout + cfg.learner.num_ranks * learner
    if demand <= cores:
        return rollout, learner
    return max(1, rollout * cores // demand), max(1, learner * cores // demand)

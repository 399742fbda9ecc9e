"""Placement of the actor roles on the cluster, from the config: one placement group per role,
one bundle per actor ({"CPU": c, "GPU": g}), all reserved before any model is loaded.

Reserving first means a cluster that cannot hold the run fails in seconds with a message naming
the role and what it asked for, instead of hanging with half the actors started. The learner
group reserves its own bundles (`learner/group.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy


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


def _bundle(cpus: float, gpus: float) -> dict:
    return {"CPU": cpus, **({"GPU": gpus} if gpus > 0 else {})}


def role_bundles(cfg) -> dict[str, list[dict]]:
    """Bundles per role for a DocRLConfig (the learner is placed by LearnerGroup itself)."""
    r, ro, rw = cfg.retriever, cfg.rollout, cfg.reward
    return {
        "retriever": [_bundle(r.num_cpus_per_actor, r.num_gpus_per_actor)] * r.num_actors,
        # num_gpus_per_worker is the worker's total, its tensor-parallel shards included
        "rollout": [_bundle(ro.num_cpus_per_worker, ro.num_gpus_per_worker)] * ro.num_workers,
        "reward": [_bundle(rw.num_cpus_per_actor, 0)] * rw.num_actors,
    }


def reserve(role: str, bundles: list[dict], strategy: str, timeout_s: float) -> RolePlacement:
    group = placement_group(bundles, strategy=strategy, name=f"docrl-{role}")
    try:
        ray.get(group.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(group)
        need = {k: sum(b.get(k, 0) for b in bundles) for k in ("CPU", "GPU")}
        raise TimeoutError(
            f"placement of role '{role}' ({len(bundles)} x {bundles[0]}, {strategy}; {need['CPU']:g} CPUs and "
            f"{need['GPU']:g} GPUs in all) not ready within {timeout_s:g}s; cluster has {ray.cluster_resources()}, "
            f"available {ray.available_resources()}"
        ) from None
    return RolePlacement(role, bundles, group)


def place_roles(cfg, timeout_s: float | None = None) -> dict[str, RolePlacement]:
    """Reserve every role's bundles (all or nothing)."""
    timeout_s = timeout_s or cfg.ray.actor_start_timeout_s
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

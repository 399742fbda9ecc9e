"""Role placement on a Ray cluster with fake GPUs: bundles reserved up front, actors land in them,
and an impossible placement fails fast naming the role."""

from __future__ import annotations

import pytest
import ray

from cluster.config import load_config
from cluster.placement import place_roles, release, reserve, role_bundles

pytestmark = pytest.mark.ray


def test_role_bundles_follow_the_config():
    cfg = load_config(None, ["rollout.num_workers=2", "rollout.num_gpus_per_worker=1", "rollout.tensor_parallel_size=1",
                             "retriever.num_actors=3", "ray.num_gpus=2"])
    bundles = role_bundles(cfg)
    assert bundles["rollout"] == [{"CPU": 1.0, "GPU": 1.0}] * 2
    assert bundles["retriever"] == [{"CPU": 1.0}] * 3 and len(bundles["reward"]) == cfg.reward.num_actors


def test_actors_land_in_their_bundles_with_fake_gpus(ray_cluster):
    cfg = load_config(None, ["rollout.num_workers=2", "rollout.num_gpus_per_worker=1", "rollout.num_cpus_per_worker=0.5",
                             "retriever.num_cpus_per_actor=0.5", "reward.num_cpus_per_actor=0.5", "ray.num_gpus=2"])
    placed = place_roles(cfg, timeout_s=60)
    try:
        @ray.remote
        class Probe:
            def where(self):
                ctx = ray.get_runtime_context()
                return ctx.get_placement_group_id(), tuple(ray.get_gpu_ids())

        rollout = placed["rollout"]
        probes = [Probe.options(num_cpus=0.5, num_gpus=1, scheduling_strategy=rollout.strategy(i)).remote() for i in range(2)]
        where = ray.get([p.where.remote() for p in probes], timeout=60)
        assert {w[0] for w in where} == {rollout.group.id.hex()}
        assert sorted(w[1] for w in where) == [(0,), (1,)]  # one fake GPU each
        for p in probes:
            ray.kill(p)
    finally:
        release(placed)


def test_impossible_placement_fails_fast_naming_the_role(ray_cluster):
    with pytest.raises(TimeoutError, match=r"placement of role 'rollout' \(3 x \{'CPU': 1, 'GPU': 1\}"):
        reserve("rollout", [{"CPU": 1, "GPU": 1}] * 3, "PACK", timeout_s=3)

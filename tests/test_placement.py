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
    from common.ray_helpers import PlacementError

    with pytest.raises(PlacementError, match=r"placement of role 'rollout' \(3 x \{'CPU': 1, 'GPU': 1\}.* not ready "
                                              r"within 3s \(ray.placement_timeout_s\)"):
        reserve("rollout", [{"CPU": 1, "GPU": 1}] * 3, "PACK", timeout_s=3)


def test_tensor_parallel_workers_reserve_their_gpus_once():
    """`rollout.num_gpus_per_worker` is the worker's total, TP shards included: TP=2 with 2 GPUs per
    worker reserves 2 GPUs per worker (before: 4, twice what the config checks and the cluster has)."""
    cfg = load_config(None, ["rollout.num_workers=2", "rollout.num_gpus_per_worker=2", "rollout.tensor_parallel_size=2",
                             "learner.num_gpus_per_rank=1", "learner.num_ranks=2", "algorithm.minibatch_size=16",
                             "ray.num_gpus=6"])
    assert role_bundles(cfg)["rollout"] == [{"CPU": 1.0, "GPU": 2.0}] * 2


def test_vllm_engine_arguments_per_device():
    from rollout.config import RolloutConfig
    from rollout.engine import engine_args

    tp2 = RolloutConfig(tensor_parallel_size=2, num_gpus_per_worker=2)
    on_gpu = engine_args("m", tp2, seed=0, max_lora_rank=8, cuda=True)
    # the actor owns its GPUs: vLLM's own processes, not its Ray executor inside the placement group
    assert on_gpu["distributed_executor_backend"] == "mp" and on_gpu["tensor_parallel_size"] == 2
    assert on_gpu["enforce_eager"] is False and "enable_chunked_prefill" not in on_gpu  # CUDA graphs on GPUs
    assert on_gpu["enable_lora"] and on_gpu["max_lora_rank"] == 8
    on_cpu = engine_args("m", RolloutConfig(), seed=0, max_lora_rank=None, cuda=False)
    assert on_cpu["enforce_eager"] is True and on_cpu["enable_chunked_prefill"] is False
    assert "distributed_executor_backend" not in on_cpu and "enable_lora" not in on_cpu
    assert engine_args("m", RolloutConfig(enforce_eager=True), 0, None, cuda=True)["enforce_eager"] is True


def test_learner_ranks_use_the_gpu_ray_gave_them(ray_cluster):
    """Two ranks on one node with a (fake) GPU each: Ray narrows each one's CUDA_VISIBLE_DEVICES to
    its own GPU, so DeepSpeed's LOCAL_RANK (its CUDA device index) must be 0 for both. Before, the
    second got 1: cuda:1 does not exist in its process, and DeepSpeed failed at init."""
    import os

    import ray

    from learner.rank import cuda_local_rank

    @ray.remote(num_gpus=1, num_cpus=0.1)
    class Rank:  # alive together, so each holds its own GPU
        def probe(self, node_local_rank):
            return cuda_local_rank(node_local_rank, ray.get_gpu_ids(), True), os.environ.get("CUDA_VISIBLE_DEVICES")

    ranks = [Rank.remote(), Rank.remote()]
    got = ray.get([r.probe.remote(i) for i, r in enumerate(ranks)], timeout=120)
    for r in ranks:
        ray.kill(r)
    assert [rank for rank, _ in got] == [0, 0]
    assert sorted(visible for _, visible in got) == ["0", "1"]  # one GPU each, narrowed by Ray
    assert cuda_local_rank(1, [], True) == 1  # CPU ranks keep their rank on the node
    assert cuda_local_rank(0, ["3"], False) == 3  # RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES: all visible


def test_a_task_that_asked_for_no_gpu_computes_on_cpu(ray_cluster):
    """Ray narrows CUDA_VISIBLE_DEVICES only for a task that asked for GPUs; one that asked for
    none is left seeing every GPU of its node. So "is CUDA available" cannot tell a task whether a
    GPU is its own: the warm starts and the retriever choose their device by what they asked for
    (`task_device`), or a CPU-configured one would compute on a GPU another role reserved."""
    import os

    import ray

    from common.ray_helpers import task_device

    @ray.remote(num_cpus=0.1)
    def visible(num_gpus):
        return os.environ.get("CUDA_VISIBLE_DEVICES"), task_device(num_gpus)

    (without_gpu, device_without), (with_gpu, _) = ray.get(
        [visible.options(num_gpus=0).remote(0), visible.options(num_gpus=1).remote(1)], timeout=120)
    assert with_gpu in ("0", "1")  # narrowed to the (fake) GPU it was given
    assert without_gpu != "" and without_gpu != with_gpu  # not hidden: the node's GPUs stay visible
    assert device_without == "cpu" and task_device(0.0) == "cpu"


def test_async_threads_fit_the_local_cores():
    """Async mode runs both roles at once: on a local machine their threads are scaled to its
    cores; sync mode (they take turns) and remote clusters keep each role's CPUs."""
    from cluster.config import load_config
    from cluster.placement import role_threads

    def cfg(mode, rollout_cpus, learner_cpus, workers=1):
        return load_config(None, [f"trainer.mode={mode}", f"rollout.num_cpus_per_worker={rollout_cpus}",
                                  f"learner.num_cpus_per_rank={learner_cpus}", f"rollout.num_workers={workers}",
                                  "ray.num_cpus=8"])

    assert role_threads(cfg("sync", 2, 2), cores=2) == (2, 2)
    assert role_threads(cfg("async", 2, 2), cores=2) == (1, 1)
    assert role_threads(cfg("async", 2, 2), cores=4) == (2, 2)
    assert role_threads(cfg("async", 4, 2), cores=3) == (2, 1)
    assert role_threads(cfg("async", 1, 1, workers=2), cores=2) == (1, 1)  # never below one thread
    assert role_threads(cfg("async", 2, 2), cores=None) == (2, 2)  # a remote cluster: Ray's bundles decide


# -- the check before any role starts (pure: no Ray) ----------------------------------------------

def test_the_tiny_preset_fits_a_two_cpu_head_and_a_bigger_ask_is_refused_naming_the_role():
    from cluster.placement import PlacementError, check_fits, run_asks

    tiny = load_config("configs/tiny.yaml", [])
    asks = run_asks(tiny)
    assert "retriever" not in asks  # the gold page is handed over: no retriever actors to place
    check_fits(asks, [{"CPU": 2.0, "memory": 1e9}])
    big = run_asks(load_config("configs/tiny.yaml", ["learner.num_cpus_per_rank=2"]))
    with pytest.raises(PlacementError) as refused:
        check_fits(big, [{"CPU": 2.0}])
    # hand-worked: rollout 0.5 + reward 0.5 taken, the learner's 2 makes 3 CPUs > 2
    assert str(refused.value).startswith("the cluster cannot hold this run: role 'learner' asks 1 x {'CPU': 2.0} "
                                         "(2 CPUs, 0 GPUs in all); that is 3 CPUs with the roles before it "
                                         "(rollout, reward: 1 CPUs, 0 GPUs); the cluster has 2 CPUs, 0 GPUs on 1 node(s)")
    assert "`learner.num_ranks` or `learner.num_cpus_per_rank` or `learner.num_gpus_per_rank`" in str(refused.value)


def test_a_gpu_preset_on_a_cpu_cluster_is_refused_naming_the_first_gpu_role():
    from cluster.placement import PlacementError, check_fits, run_asks

    asks = run_asks(load_config("configs/qwen2vl-2b-8gpu.yaml", []))
    with pytest.raises(PlacementError, match=r"role '(retriever|rollout)' asks .*no node has .* GPUs for one of its actors"):
        check_fits(asks, [{"CPU": 64.0}, {"CPU": 64.0}])


def test_strategies_are_checked_per_node():
    from cluster.placement import PlacementError, check_fits

    two_small = [{"CPU": 1.0, "GPU": 1.0}, {"CPU": 1.0, "GPU": 1.0}]
    asks = {"rollout": [{"CPU": 1.0, "GPU": 1.0}] * 2}
    check_fits(asks, two_small, "PACK")
    check_fits(asks, two_small, "STRICT_SPREAD")
    with pytest.raises(PlacementError, match="STRICT_PACK puts all 2 on one node"):
        check_fits(asks, two_small, "STRICT_PACK")
    with pytest.raises(PlacementError, match=r"STRICT_SPREAD puts each on its own node, and 1 node\(s\) can hold one"):
        check_fits(asks, [{"CPU": 4.0, "GPU": 2.0}], "STRICT_SPREAD")


def _placeable(asks: dict, nodes: list[dict], strategy: str) -> bool:
    """Exhaustive search: some assignment of every bundle to a node that respects the capacities
    and the strategy (the independent computation check_fits must never contradict)."""
    import itertools

    bundles = [(role, b) for role, bs in asks.items() for b in bs]
    for assign in itertools.product(range(len(nodes)), repeat=len(bundles)):
        used = [{"CPU": 0.0, "GPU": 0.0} for _ in nodes]
        for (_, b), n in zip(bundles, assign):
            for k, v in b.items():
                used[n][k] += v
        if any(used[n][k] > nodes[n].get(k, 0) + 1e-9 for n in range(len(nodes)) for k in used[n]):
            continue
        per_role = {}
        for (role, _), n in zip(bundles, assign):
            per_role.setdefault(role, []).append(n)
        if strategy == "STRICT_PACK" and any(len(set(ns)) > 1 for ns in per_role.values()):
            continue
        if strategy == "STRICT_SPREAD" and any(len(set(ns)) < len(ns) for ns in per_role.values()):
            continue
        return True
    return False


def test_the_check_never_refuses_a_run_that_can_be_placed():
    """Against an exhaustive search on random small clusters: a refusal always means no placement
    exists (the check tests only necessary conditions; Ray's pending bound handles the rest)."""
    import random

    from cluster.placement import PlacementError, check_fits

    rng = random.Random(0)
    refused = accepted = 0
    for _ in range(300):
        nodes = [{"CPU": float(rng.choice([1, 2, 3])), "GPU": float(rng.choice([0, 1, 2]))} for _ in range(rng.randint(1, 3))]
        asks = {role: [{"CPU": rng.choice([0.5, 1.0]), **({"GPU": 1.0} if rng.random() < 0.4 else {})}] * rng.randint(1, 2)
                for role in ("rollout", "reward", "learner")}
        strategy = rng.choice(["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"])
        try:
            check_fits(asks, nodes, strategy)
            accepted += 1
        except PlacementError:
            refused += 1
            assert not _placeable(asks, nodes, strategy), (asks, nodes, strategy)
    assert refused > 50 and accepted > 20  # both outcomes exercised


def test_role_resources_choose_nodes_and_are_checked():
    """`ray.role_resources` adds custom resources to a role's bundles (the learner's too), and the
    fit check counts them: a cluster without the resource refuses the role by name."""
    from cluster.config import ConfigError
    from cluster.placement import check_fits, learner_bundle, run_asks
    from common.ray_helpers import PlacementError

    cfg = load_config(None, ['ray.role_resources={"rollout": {"gpu_host": 1}, "learner": {"trainer": 0.5}}'])
    assert role_bundles(cfg)["rollout"] == [{"CPU": 1.0, "gpu_host": 1}]
    assert role_bundles(cfg)["reward"][0] == {"CPU": cfg.reward.num_cpus_per_actor}
    assert learner_bundle(cfg) == {"CPU": cfg.learner.num_cpus_per_rank, "trainer": 0.5}
    nodes = [{"CPU": 8.0, "trainer": 1.0}, {"CPU": 8.0, "gpu_host": 1.0}]
    check_fits(run_asks(cfg), nodes)
    with pytest.raises(PlacementError, match=r"role 'rollout' asks 1 x \{'CPU': 1.0, 'gpu_host': 1.0\}.*no node has 1 "
                                              r"CPUs, 0 GPUs and 1 gpu_host for one of its actors.*`ray.role_resources`"):
        check_fits(run_asks(cfg), nodes[:1])
    with pytest.raises(ConfigError, match=r"role_resources.rollout.CPU: set CPUs and GPUs with the role's own"):
        load_config(None, ['ray.role_resources={"rollout": {"CPU": 1}}'])
    with pytest.raises(ConfigError, match=r"ray.role_resources.retreiver"):
        load_config(None, ['ray.role_resources={"retreiver": {"x": 1}}'])


def test_where_roles_run_and_which_a_lost_node_held(ray_cluster):
    from cluster.placement import lost_roles, where_roles_run

    placed = place_roles(load_config(None, ["rollout.num_cpus_per_worker=0.5", "retriever.num_cpus_per_actor=0.5",
                                            "reward.num_cpus_per_actor=0.5"]), timeout_s=60)
    try:
        where = where_roles_run({role: p.group for role, p in placed.items()})
        node = ray.get_runtime_context().get_node_id()
        assert where["rollout"] == [{"node_id": node, "ip": "127.0.0.1"}] and set(where) == set(placed)
        assert lost_roles(where) is None  # every node alive
        gone = {**where, "learner": [where["rollout"][0], {"node_id": "ab" * 28, "ip": "10.0.0.9"}]}
        assert lost_roles(gone) == f"node 10.0.0.9 (node {'ab' * 6}) left the cluster, with learner 1"
    finally:
        release(placed)


def test_collectives_use_the_interface_of_the_node_address():
    from learner.worker import interface_of

    assert interface_of("127.0.0.1") == "lo"
    assert interface_of("192.0.2.77") is None  # TEST-NET-1: on no interface here


def test_serve_replicas_choose_nodes_by_custom_resources():
    cfg = load_config(None, ['serve.policy.resources={"inference": 1}', "serve.policy.num_gpus=1"])
    assert cfg.serve.policy.serve_options()["ray_actor_options"] == {"num_cpus": cfg.serve.policy.num_cpus,
                                                                     "num_gpus": 1.0, "resources": {"inference": 1.0}}
    assert "resources" not in cfg.serve.ingress.serve_options()["ray_actor_options"]

"""Run by tests/test_multinode.py in its own process: a Ray cluster of three raylets on loopback
(ray.cluster_utils.Cluster: a CPU-only head and two 'GPU nodes' with 2 fake GPUs each), then
docrl's role placement and a 2-rank learner spread over the two GPU nodes. Prints one JSON line."""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def main(policy: str, pages_dir: str) -> dict:
    import ray
    from ray.cluster_utils import Cluster
    from ray.util import placement_group_table

    from cluster.config import load_config
    from cluster.placement import place_roles, release
    from learner.group import LearnerGroup
    from learner.synthetic import make_pages, synthetic_experiences
    from learner.types import TrainBatch

    node = {"node_ip_address": "127.0.0.1", "include_dashboard": False, "dashboard_agent_listen_port": 0}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0, **node})
    gpu_nodes = [cluster.add_node(num_cpus=3, num_gpus=2, **{k: v for k, v in node.items() if k != "include_dashboard"})
                 for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    out: dict = {"gpu_nodes": sorted(n.node_id for n in gpu_nodes)}
    try:
        cfg = load_config(None, ["rollout.num_workers=2", "rollout.num_gpus_per_worker=1", "rollout.num_cpus_per_worker=0.5",
                                 "retriever.num_cpus_per_actor=0.5", "reward.num_cpus_per_actor=0.5",
                                 "ray.placement_strategy=STRICT_SPREAD", "retriever.num_actors=2", "reward.num_actors=2"])
        placed = place_roles(cfg, 120)
        out["roles"] = {role: sorted(placement_group_table(p.group)["bundles_to_node_id"].values())
                        for role, p in placed.items()}
        release(placed)

        learner_cfg = cfg.learner.model_copy(update={"num_ranks": 2, "num_gpus_per_rank": 1, "num_cpus_per_rank": 1,
                                                     "micro_batch_size": 2})
        algo = cfg.algorithm.model_copy(update={"minibatch_size": 4})
        group = LearnerGroup(policy, learner_cfg, algo, export_dir=os.path.join(pages_dir, "exports"),
                             placement_strategy="STRICT_SPREAD", start_timeout_s=300)
        try:
            out["learner"] = group.describe()
            pages = make_pages(pages_dir)
            metrics = group.update(TrainBatch(synthetic_experiences(policy, pages[:2], answers_per_question=2)))
            out["learner_version"] = group.version
            out["learner_applied"] = metrics["optimizer_steps"]
            hashes = group.param_hashes()
            out["ranks_identical"] = len(set(hashes)) == 1
        finally:
            group.shutdown()
    finally:
        ray.shutdown()
        cluster.shutdown()
    return out


if __name__ == "__main__":
    print("RESULT " + json.dumps(main(sys.argv[1], sys.argv[2]), default=str))

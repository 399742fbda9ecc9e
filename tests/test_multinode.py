"""Multi-node placement with several raylets on one machine (ray.cluster_utils.Cluster), run in a
subprocess because the test session already holds its own Ray cluster in this process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_roles_and_learner_ranks_spread_over_nodes(tiny_models, tmp_path):
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PYTHONPATH": str(ROOT), "RAY_ADDRESS": ""}
    env.pop("RAY_ADDRESS")
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "multinode_placement.py"), str(tiny_models["policy"]),
                           str(tmp_path)], env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert done.returncode == 0 and line, done.stdout[-3000:] + done.stderr[-5000:]
    result = json.loads(line[len("RESULT "):])
    gpu_nodes = result["gpu_nodes"]
    # STRICT_SPREAD: each role's two bundles on two different nodes; the GPU bundles on the GPU nodes
    assert result["roles"]["rollout"] == gpu_nodes
    for role in ("retriever", "reward"):
        assert len(set(result["roles"][role])) == 2
    ranks = result["learner"]
    assert sorted(r["node_id"] for r in ranks) == gpu_nodes  # one rank per GPU node
    assert [r["world_size"] for r in ranks] == [2, 2] and all(len(r["gpu_ids"]) == 1 for r in ranks)
    assert result["learner_applied"] >= 1 and result["learner_version"] == 1
    assert result["ranks_identical"]  # data parallel across the two nodes: the same bits after the step

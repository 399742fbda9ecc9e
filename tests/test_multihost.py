"""docrl on two hosts that share nothing but a network (tests/two_hosts.py: network namespaces
joined by a veth pair, each host with its own files, /dev/shm and temporary directory).

Host A runs the Ray head, the driver and an S3-compatible server (moto) that stands in for the
run's storage; host B joins with `ray start --address`. The models and the data exist only on
host A: whatever a role on host B reads, it got as bytes (pages, models, LoRA adapters, index
shards), and whatever it wrote reached host A the same way (checkpoint shards, adapters, index
segments). Any read across hosts by path fails, because the path does not exist on the other host.

One test, in order (each part needs the one before):
1. an uninterrupted 3-step run with the rollout worker and the retriever on host B and the learner's
   two DeepSpeed ranks on A and B (MASTER_ADDR rank 0's address, gloo over the veth): where each
   role ran, ranks bit-identical, checkpoints, exports and the index on host A and in storage;
2. the same run with host B's Ray node killed (its process group) during step 2: the driver fails
   within the configured timeout naming the lost node and its roles;
3. host A's run directory deleted (a fresh head), host B back: `--resume` reads the step-1
   checkpoint back from storage and finishes; steps 2-3 equal the uninterrupted run's;
4. `docrl serve` from storage with its policy replica on host B and ingress on A: /v1/docqa with
   citations and /v1/pages/{id}/image.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from two_hosts import RayOnTwoHosts, TwoHosts, unavailable

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
pytestmark = [pytest.mark.ray, pytest.mark.vllm, pytest.mark.slow]

# Measured, not tuned: what may differ between two runs of the same step (wall-clock figures).
TIMING_PREFIXES = ("time/", "throughput/", "learner/update_seconds", "learner/score_seconds", "learner/train_seconds",
                   "learner/tokens_per_s", "learner/seconds")
GCS_PORT, S3_PORT, SERVE_PORT = 6390, 9010, 8010  # inside the hosts' own network namespaces
ROLE_TIMEOUT_S = 60  # rollout.generate_timeout_s and learner.collective_timeout_s of the runs


def _run_args(hosts: TwoHosts, run: str, *extra: str) -> list[str]:
    """A small tiny-preset run, its roles pinned: rollout worker and retriever on host B, reward on A,
    the learner's two ranks spread over both."""
    return ["--config", "configs/tiny.yaml", f"ray.address={hosts.a.ip}:{GCS_PORT}",
            f"run.output_dir={hosts.root}/runs/{run}", f"run.models_dir={hosts.root}/models",
            f"run.storage=s3://docrl/{run}",
            "trainer.total_steps=3", "trainer.prompts_per_step=2", "rollout.sampling.n=2", "algorithm.minibatch_size=4",
            "learner.micro_batch_size=2", "data.max_eval_samples=2", "data.synthetic.num_documents=6",
            "data.synthetic.level=realistic", "retriever.use_gold_page=false", "trainer.warm_start.steps=0",
            "trainer.eval_every=0", "trainer.save_every=1", "trainer.keep_last=3", "rollout.max_model_len=1024",
            # LoRA adapters pushed as adapters: their files cross from learner rank 0 to the rollout worker
            # an entropy bonus: every update moves the weights, whatever the (mostly zero) rewards
            "algorithm.entropy_coef=0.01",
            "learner.lora.enabled=true", "learner.freeze_vision_tower=true", "rollout.lora_push=adapter",
            "learner.num_ranks=2", "learner.num_cpus_per_rank=1", "ray.placement_strategy=STRICT_SPREAD",
            'ray.role_resources={"rollout": {"host_b": 1}, "retriever": {"host_b": 1}, "reward": {"host_a": 1}}',
            f"rollout.generate_timeout_s={ROLE_TIMEOUT_S}", f"learner.collective_timeout_s={ROLE_TIMEOUT_S}",
            f"serve.host={hosts.a.ip}", f"serve.port={SERVE_PORT}", *extra]


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _step_rows(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in _rows(run_dir / "logs" / "metrics.jsonl") if "reward/mean" in r}


@pytest.fixture(scope="module")
def cluster(tiny_models):
    why = unavailable()
    if why:
        if os.environ.get("DOCRL_REQUIRE_NAMESPACES"):
            pytest.fail(f"two namespaced hosts cannot be made here: {why}")
        pytest.skip(f"two namespaced hosts cannot be made here: {why}")
    with TwoHosts() as hosts:
        # the models exist on host A only (the driver's host); host B gets them as bytes
        shutil.copytree(tiny_models["policy"].parent, hosts.a.dir / "models")
        c = RayOnTwoHosts(hosts, GCS_PORT, S3_PORT)
        c.start()
        yield c


def _ok(done: subprocess.CompletedProcess, what: str) -> str:
    out = done.stdout + done.stderr
    assert done.returncode == 0, f"{what} failed ({done.returncode}):\n{out[-6000:]}"
    return out


def test_train_kill_a_host_resume_from_storage_and_serve_across_hosts(cluster):
    hosts = cluster.hosts
    a_runs, b_root = hosts.a.dir / "runs", hosts.b.dir

    # 1. uninterrupted: roles on both hosts, nothing read across hosts by path
    t0 = time.monotonic()
    out = _ok(cluster.docrl("train", *_run_args(hosts, "whole")), "the uninterrupted run")
    whole_s = time.monotonic() - t0
    whole = a_runs / "whole"
    placed = json.loads((whole / "logs" / "placement.json").read_text())
    assert {n["ip"] for n in placed["rollout"]} == {hosts.b.ip} and {n["ip"] for n in placed["retriever"]} == {hosts.b.ip}
    assert {n["ip"] for n in placed["reward"]} == {hosts.a.ip}
    assert sorted(n["ip"] for n in placed["learner"]) == sorted([hosts.a.ip, hosts.b.ip]), placed["learner"]
    assert len({n["node_id"] for n in placed["learner"]}) == 2
    expected = _step_rows(whole)
    assert sorted(expected) == [1, 2, 3]
    for row in expected.values():
        assert row["learner/logprob_mismatch_max"] < 1e-3  # the adapter the worker on B loaded is the learner's
        assert row["weights/version"] == row["step"]
    # at each checkpoint the ranks on A and B hold the same parameters, which the steps changed
    hashes = dict(re.findall(r"checkpoint of step (\d+): 2 learner ranks bit-identical \(parameter hash (\w+)\)", out))
    assert sorted(hashes) == ["1", "2", "3"] and hashes["1"] != hashes["3"], out[-3000:]
    # the run's files are on host A (and in storage), none on host B
    assert sorted(p.name for p in (whole / "checkpoints").iterdir()) == [f"step-{s:08d}" for s in (1, 2, 3)]
    assert (whole / "index" / "manifest.json").exists() and list((whole / "exports").glob("lora-v*"))
    assert not (b_root / "runs").exists()

    # 2. host B dies during step 2: the driver names the node and its roles, within the timeout
    killed = cluster.docrl_background("killed.log", "train", *_run_args(hosts, "killed"))
    run_dir = a_runs / "killed"
    deadline = time.monotonic() + 600
    while not (run_dir / "checkpoints" / "step-00000001").exists():
        assert killed.poll() is None, (cluster.logs / "killed.log").read_text()[-6000:]
        assert time.monotonic() < deadline, "step 1 of the killed run not checkpointed within 600 s"
        time.sleep(0.2)
    cluster.kill_worker()
    t_kill = time.monotonic()
    try:
        killed.wait(timeout=3 * ROLE_TIMEOUT_S + 60)
    except subprocess.TimeoutExpired:
        TwoHosts.stop(killed)
        pytest.fail("the driver did not stop within the roles' timeouts after host B died:\n"
                    + (cluster.logs / "killed.log").read_text()[-6000:])
    took = time.monotonic() - t_kill
    log = (cluster.logs / "killed.log").read_text()
    assert killed.returncode != 0, log[-4000:]
    assert f"node {hosts.b.ip} (node " in log and "left the cluster, with" in log, log[-6000:]
    assert "rollout 0" in log and "--resume" in log, log[-6000:]
    # B died within a poll (0.2 s) of step 1's checkpoint: during step 2 or, on a fast step, its checkpoint
    assert sorted(_step_rows(run_dir)) in ([1], [1, 2])

    # 3. a fresh head: host A's run directory is gone; the checkpoint comes back from storage
    shutil.rmtree(run_dir)
    cluster.start_worker()
    out = _ok(cluster.docrl("train", *_run_args(hosts, "killed"), "--resume"), "the resumed run")
    assert "from storage s3://docrl/killed" in out, out[-4000:]
    again = _step_rows(run_dir)
    assert sorted(again) == [1, 2, 3]  # step 1's metrics came back from storage too
    for step in (2, 3):
        compared = [k for k in expected[step] if not k.startswith(TIMING_PREFIXES) and k != "step"]
        assert len(compared) > 20
        differ = {k: (expected[step][k], again[step].get(k)) for k in compared
                  if not (again[step].get(k) == expected[step][k]
                          or (isinstance(expected[step][k], float) and again[step].get(k) is not None
                              and math.isclose(again[step][k], expected[step][k], rel_tol=1e-6, abs_tol=1e-9)))}
        assert not differ, (step, differ)

    # 4. Serve from storage: policy replica on host B, ingress (and HTTP proxy) on host A
    shutil.rmtree(run_dir)  # whatever Serve needs comes from storage
    serve = cluster.docrl_background(
        "serve.log", "serve", *_run_args(hosts, "killed"),
        'serve.policy.resources={"host_b": 1}', 'serve.ingress.resources={"host_a": 1}',
        'serve.retriever.resources={"host_b": 1}')
    try:
        base = f"http://{hosts.a.ip}:{SERVE_PORT}"
        deadline = time.monotonic() + 300
        while "rater page:" not in (cluster.logs / "serve.log").read_text():
            assert serve.poll() is None, (cluster.logs / "serve.log").read_text()[-6000:]
            assert time.monotonic() < deadline, (cluster.logs / "serve.log").read_text()[-6000:]
            time.sleep(1)
        script = (
            "import json, urllib.request\n"
            f"base = '{base}'\n"
            "req = urllib.request.Request(base + '/v1/docqa', data=json.dumps({'question': 'What is the total?', "
            "'max_tokens': 8}).encode(), headers={'Content-Type': 'application/json'})\n"
            "answer = json.load(urllib.request.urlopen(req, timeout=120))\n"
            "page = answer['citations'][0]['page_id']\n"
            "image = urllib.request.urlopen(base + '/v1/pages/' + urllib.request.quote(page, safe='') + '/image', timeout=60)\n"
            "print(json.dumps({'answer': answer, 'image_type': image.headers['Content-Type'], 'image_bytes': len(image.read())}))\n")
        done = cluster.on_a([str(VENV_BIN / "python"), "-c", script], timeout=300)
        assert done.returncode == 0, done.stderr[-4000:] + (cluster.logs / "serve.log").read_text()[-4000:]
        result = json.loads(done.stdout.strip().splitlines()[-1])
        assert result["answer"]["citations"] and result["image_type"] == "image/png" and result["image_bytes"] > 1000
        places = cluster.on_a([str(VENV_BIN / "python"), "-c", _SERVE_PLACES.format(a=hosts.a.ip, port=GCS_PORT)])
        assert places.returncode == 0, places.stderr[-3000:]
        deployments = json.loads(places.stdout.strip().splitlines()[-1])
        assert deployments == {"policy": [hosts.b.ip], "retriever": [hosts.b.ip], "ingress": [hosts.a.ip]}, deployments
    finally:
        TwoHosts.stop(serve, wait_s=30)
    print(f"two-host run: {whole_s:.0f} s for 3 steps; host B lost -> driver stopped in {took:.0f} s")


# where each Serve deployment's replicas run, by node address (from the GCS's actor table: the
# cluster runs no dashboard, which Ray's state API needs)
_SERVE_PLACES = (
    "import json, ray\n"
    "from ray._private.state import actors\n"
    "ray.init(address='{a}:{port}', logging_level='ERROR')\n"
    "out = {{}}\n"
    "for actor in actors().values():\n"
    "    name = actor.get('ActorClassName') or ''\n"
    "    if actor.get('State') == 'ALIVE' and name.startswith('ServeReplica:docrl:'):\n"
    "        role = name.rsplit(':', 1)[1].lower()\n"
    "        out.setdefault(role, []).append(actor['Address']['IPAddress'])\n"
    "print(json.dumps(out))\n")

"""`ray job submit` of the tiny training job to a cluster started with `ray start --head` on
loopback: the job SUCCEEDS and leaves its logs, checkpoints and report, and while it runs docrl's
gauges show on the head's Prometheus endpoint (`--metrics-export-port`), named `ray_docrl_*`
(Ray prefixes application metrics with `ray_`; they arrive about 10 s after they are set).

Runs last (file name) and stops only its own cluster: `ray start --block` is the head's parent
process, and terminating it stops everything it started (a plain `ray stop` would also stop the
test session's shared cluster).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from common.ray_helpers import free_port

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.ray, pytest.mark.vllm, pytest.mark.slow]


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


def _job_status(venv_bin: Path, address: str, job_id: str, env: dict) -> str | None:
    """Through the CLI, which carries the cluster's auth token (the HTTP API answers 401 without)."""
    done = subprocess.run([str(venv_bin / "ray"), "job", "status", "--address", address, job_id],
                          env=env, capture_output=True, text=True, timeout=60)
    # e.g. "Job 'raysubmit_...' succeeded" (logged on stderr, in colour)
    found = re.search(r"\b(succeeded|failed|stopped|running|pending)\b", (done.stdout + done.stderr).lower())
    return found.group(1).upper() if found else None


def test_ray_job_submit_trains_the_tiny_preset(tiny_models, tmp_path):
    """README's cluster sequence: a head with Ray's token authentication, `RAY_AUTH_MODE=token` for
    the CLI, `ray job submit` with an absolute run.output_dir, which the job prints."""
    import uuid

    venv_bin = Path(sys.executable).parent
    token = tmp_path / "auth_token"  # README: ~/.ray/auth_token, written by `ray start --head`
    token.write_text(uuid.uuid4().hex)
    env = {**os.environ, "PATH": f"{venv_bin}:{os.environ['PATH']}", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0", "RAY_ADDRESS": "",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
           # metrics reach the Prometheus port every 2 s instead of Ray's 10: a 3-step job can end
           # before a 10 s report (seen once: the job succeeded and no docrl metric was scraped)
           "RAY_metrics_report_interval_ms": "2000"}
    env.pop("RAY_ADDRESS")
    # Every fixed default port moved to a free one: the session's shared cluster holds the defaults
    # (the dashboard agent's 52365 among them), and a second agent that cannot bind never serves jobs.
    gcs, dash, metrics, agent, client = (free_port() for _ in range(5))
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: unix socket paths are length-limited
    head = subprocess.Popen(
        [str(venv_bin / "ray"), "start", "--head", "--block", f"--port={gcs}", "--node-ip-address=127.0.0.1",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--metrics-export-port={metrics}",
         f"--dashboard-agent-listen-port={agent}", f"--ray-client-server-port={client}",
         "--num-cpus=4", "--num-gpus=0", f"--temp-dir={temp_dir}", "--include-dashboard=true"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                _get(f"{address}/api/version")
                break
            except urllib.error.HTTPError:  # answering (token authentication is on by default)
                break
            except OSError:
                assert head.poll() is None, f"ray start failed:\n{head.stdout.read()}"
                assert time.monotonic() < deadline, "the Ray dashboard did not come up within 120 s"
                time.sleep(2)
        overrides = [f"run.output_dir={tmp_path / 'run'}", f"run.models_dir={tiny_models['policy'].parent}",
                     "trainer.total_steps=3", "trainer.prompts_per_step=2", "rollout.sampling.n=2",
                     "algorithm.minibatch_size=4", "learner.micro_batch_size=2", "data.max_eval_samples=2",
                     "data.synthetic.num_documents=6", "data.synthetic.level=realistic", "retriever.use_gold_page=false",
                     "trainer.warm_start.steps=0", "trainer.eval_every=0", "trainer.save_every=0",
                     "rollout.max_model_len=1024", "rollout.num_cpus_per_worker=0.5", "retriever.num_cpus_per_actor=0.5",
                     "reward.num_cpus_per_actor=0.5", "learner.num_cpus_per_rank=0.5"]
        deadline = time.monotonic() + 180
        while True:  # the dashboard answers before the head's job agent is up ("No available agent")
            submit = subprocess.run(
                [str(venv_bin / "ray"), "job", "submit", "--address", address, "--working-dir", str(ROOT), "--no-wait",
                 "--", "docrl", "train", "--config", "configs/tiny.yaml", *overrides],
                env=env, capture_output=True, text=True, timeout=180)
            if submit.returncode == 0 or "No available agent" not in submit.stdout + submit.stderr or time.monotonic() > deadline:
                break
            time.sleep(3)
        assert submit.returncode == 0, submit.stdout + submit.stderr
        # without the token mode the CLI sends no token, and the head refuses it
        refused = subprocess.run([str(venv_bin / "ray"), "job", "list", "--address", address],
                                 env={**env, "RAY_AUTH_MODE": "disabled"}, capture_output=True, text=True, timeout=120)
        assert refused.returncode != 0 and "uthentication" in refused.stdout + refused.stderr
        job_id = re.search(r"raysubmit_[A-Za-z0-9]+", submit.stdout).group(0)  # (the CLI colours its output)
        status = None
        deadline = time.monotonic() + 900
        seen_metrics: set[str] = set()
        while time.monotonic() < deadline:
            try:
                scraped = _get(f"http://127.0.0.1:{metrics}/metrics")
                seen_metrics |= set(re.findall(r"^(ray_docrl_[A-Za-z0-9_]+)\{", scraped, re.M))
            except OSError:
                pass
            status = _job_status(venv_bin, address, job_id, env)
            if status in ("SUCCEEDED", "FAILED", "STOPPED"):
                break
            time.sleep(2)
        logs = subprocess.run([str(venv_bin / "ray"), "job", "logs", "--address", address, job_id],
                              env=env, capture_output=True, text=True, timeout=60).stdout
        assert status == "SUCCEEDED", f"job {job_id} ended {status}:\n{logs[-4000:]}"
        assert '"eval/anls"' in logs  # the final evaluation, printed by docrl train
        assert f"run directory {tmp_path / 'run'} (checkpoints, logs)" in logs
        assert (tmp_path / "run" / "checkpoints").exists() and (tmp_path / "run" / "logs" / "metrics.jsonl").exists()
        assert (tmp_path / "run" / "logs" / "report.png").exists()
        # the step metrics of the dashboard/Prometheus (the eval gauges are set at step 0)
        assert {"ray_docrl_eval_anls", "ray_docrl_reward_mean", "ray_docrl_time_step_s"} <= seen_metrics, sorted(seen_metrics)
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
        try:  # gcs_server and raylet share the group and can outlive a SIGTERM'd parent
            os.killpg(head.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

"""The "Cluster launch" commands of the docs, run as written on a 2-CPU head on loopback:

* `ray start --head` with the documented environment binds nothing but 127.0.0.1 (every listening
  socket of the head's processes, and of the job's driver and actors while it trains);
* a job whose roles cannot fit the head is refused in seconds, naming the role;
* the tiny training job runs; its gauges show on the head's Prometheus endpoint as `ray_docrl_*`;
* `ray job stop` leaves a complete checkpoint of the last finished step (no raw signal dump), and
  the documented `--resume` command continues from it to SUCCEEDED.

What the test changes in the documented commands, and only that: the fixed ports become free ones
(the session's shared cluster holds Ray's defaults), `$PWD/runs/tiny-job` a temporary directory,
`ray start` gets `--block` (so the test owns the head's process group), its own temp dir and
`--num-cpus=2` (a 2-CPU head on any machine), `ray job submit` gets `--no-wait`, and the training
commands get overrides that make the run small. Runs last (file name) and stops only its own
cluster, by process group (a plain `ray stop` would also stop the test session's shared cluster).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from common.ray_helpers import free_port

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_DOC = ROOT / "docs" / "guides" / "cluster.md"
pytestmark = [pytest.mark.ray, pytest.mark.vllm, pytest.mark.slow]

# ~0.6 s a step on 2 cores: enough steps that the stop lands mid-run
SMALL_RUN = ["trainer.total_steps=400", "trainer.prompts_per_step=2", "rollout.sampling.n=2", "algorithm.minibatch_size=4",
             "learner.micro_batch_size=2", "data.max_eval_samples=2", "data.synthetic.num_documents=6",
             "data.synthetic.level=realistic", "retriever.use_gold_page=false",
             "trainer.warm_start.steps=0", "trainer.eval_every=0", "trainer.save_every=0", "rollout.max_model_len=1024"]


def documented_commands() -> list[str]:
    """The one-machine bash block of the cluster docs, one command per entry (continuations
    joined, comments dropped)."""
    text = CLUSTER_DOC.read_text()
    block = re.search(r"\*\*One machine\.\*\*.*?```bash\n(.*?)```", text, re.S).group(1)
    commands, current = [], ""
    for line in block.splitlines():
        line = re.sub(r"\s+#.*$", "", line) if not line.lstrip().startswith("#") else ""
        current += line.rstrip("\\").strip() + " " if line.rstrip().endswith("\\") else line.strip()
        if not line.rstrip().endswith("\\") and current.strip():
            commands.append(current.strip())
            current = ""
    return commands


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


def _run(argv: list[str], env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _job_status(env: dict, job_id: str) -> str | None:
    done = _run(["ray", "job", "status", job_id], env, 60)
    # e.g. "Job 'raysubmit_...' succeeded" (logged on stderr, in colour)
    found = re.search(r"\b(succeeded|failed|stopped|running|pending)\b", (done.stdout + done.stderr).lower())
    return found.group(1).upper() if found else None


def _wait_for_end(env: dict, job_id: str, timeout_s: float) -> str | None:
    deadline = time.monotonic() + timeout_s
    status = None
    while time.monotonic() < deadline:
        status = _job_status(env, job_id)
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            return status
        time.sleep(2)
    return status


def _loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    return address.is_loopback or bool(getattr(address, "ipv4_mapped", None) and address.ipv4_mapped.is_loopback)


def _listening_off_loopback(root_pid: int) -> list[str]:
    """Listening TCP sockets of the process tree under `root_pid` on any address but loopback."""
    try:
        tree = [psutil.Process(root_pid), *psutil.Process(root_pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
    pids = {p.pid: p for p in tree}
    found = []
    for c in psutil.net_connections(kind="inet"):
        if c.pid in pids and c.status == psutil.CONN_LISTEN and not _loopback(c.laddr.ip):
            try:
                name = " ".join(pids[c.pid].cmdline()[:2])
            except psutil.Error:
                name = "?"
            found.append(f"{c.laddr.ip}:{c.laddr.port} ({name})")
    return found


def _submit(cmd: str, env: dict, output_dir: Path, extra: list[str], dash: int) -> str:
    """The documented `ray job submit` command, with the test's ports, run directory and overrides."""
    cmd = cmd.replace("http://127.0.0.1:8265", f"http://127.0.0.1:{dash}").replace("$PWD/runs/tiny-job", str(output_dir))
    argv = shlex.split(cmd)
    assert argv[:3] == ["ray", "job", "submit"] and "$" not in cmd, cmd
    argv.insert(3, "--no-wait")
    deadline = time.monotonic() + 180
    while True:  # the dashboard answers before the head's job agent is up ("No available agent")
        submit = _run(argv + extra, env, 180)
        if submit.returncode == 0 or "No available agent" not in submit.stdout + submit.stderr or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert submit.returncode == 0, submit.stdout + submit.stderr
    return re.search(r"raysubmit_[A-Za-z0-9]+", submit.stdout).group(0)  # (the CLI colours its output)


def _logs(env: dict, job_id: str) -> str:
    return _run(["ray", "job", "logs", job_id], env, 60).stdout


def test_documented_cluster_commands_on_a_two_cpu_head(tiny_models, tmp_path):
    commands = documented_commands()
    assert commands[:3] == ["source .venv/bin/activate", "export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0",
                            "export RAY_AUTH_MODE=token"], commands
    start, submit, follow, stop, resume = commands[3:]
    assert start.startswith("ray start --head") and follow == "ray job logs -f JOB_ID" and stop == "ray job stop JOB_ID"
    assert resume.startswith(submit) and resume.endswith(" --resume"), (submit, resume)

    venv_bin = Path(sys.executable).parent
    token = tmp_path / "auth_token"  # the docs: ~/.ray/auth_token, written by `ray start --head`
    token.write_text(os.urandom(16).hex())
    env = {**os.environ, "PATH": f"{venv_bin}:{os.environ['PATH']}",  # source .venv/bin/activate
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token",  # the two exports
           "RAY_AUTH_TOKEN_PATH": str(token), "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0",
           # metrics reach the Prometheus port every 2 s instead of Ray's 10, so a short job's
           # gauges are seen before it stops
           "RAY_metrics_report_interval_ms": "2000"}
    env.pop("RAY_ADDRESS", None)
    gcs, dash, metrics, agent, client = (free_port() for _ in range(5))
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: unix socket paths are length-limited
    head_argv = shlex.split(start.replace("--metrics-export-port=8080", f"--metrics-export-port={metrics}"))
    assert f"--metrics-export-port={metrics}" in head_argv
    head = subprocess.Popen(
        head_argv + ["--block", f"--port={gcs}", f"--dashboard-port={dash}", f"--dashboard-agent-listen-port={agent}",
                     f"--ray-client-server-port={client}", "--num-cpus=2", "--num-gpus=0", f"--temp-dir={temp_dir}"],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    cli_env = {**env, "RAY_API_SERVER_ADDRESS": address}  # the docs' commands use Ray's default address
    seen_metrics: set[str] = set()
    off_loopback: list[str] = []
    scraping = threading.Event()

    def scrape() -> None:  # independent of the slow CLI calls, so no metrics report is missed
        while not scraping.is_set():
            try:
                seen_metrics.update(re.findall(r"^(ray_docrl_[A-Za-z0-9_]+)\{", _get(f"http://127.0.0.1:{metrics}/metrics"), re.M))
            except OSError:
                pass
            off_loopback.extend(s for s in _listening_off_loopback(head.pid) if s not in off_loopback)
            scraping.wait(0.5)

    scraper = threading.Thread(target=scrape, daemon=True)
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
        scraper.start()
        run_dir, refused_dir = tmp_path / "tiny-job", tmp_path / "too-big"
        small = [f"run.models_dir={tiny_models['policy'].parent}", *SMALL_RUN]

        # a run that cannot fit is refused before any role starts, naming the role (in the
        # background of the real run, which it must not disturb)
        too_big = _submit(submit, cli_env, refused_dir, [*small, "learner.num_cpus_per_rank=2"], dash)
        job_id = _submit(submit, cli_env, run_dir, small, dash)
        t0 = time.monotonic()
        assert _wait_for_end(cli_env, too_big, 240) == "FAILED"
        refusal = _logs(cli_env, too_big)
        assert ("the cluster cannot hold this run: role 'learner' asks 1 x {'CPU': 2.0} (2 CPUs, 0 GPUs in all); "
                "that is 3.5 CPUs with the roles before it (retriever, rollout, reward: 1.5 CPUs, 0 GPUs); "
                "the cluster has 2 CPUs, 0 GPUs on 1 node(s)") in refusal, refusal[-3000:]
        assert not (refused_dir / "checkpoints").exists()
        print(f"refused after {time.monotonic() - t0:.0f} s")

        # without the token mode the CLI sends no token, and the head refuses it
        refused = _run(["ray", "job", "list"], {**cli_env, "RAY_AUTH_MODE": "disabled"})
        assert refused.returncode != 0 and "uthentication" in refused.stdout + refused.stderr

        # `ray job stop` once two steps are done: the checkpoint is of the last finished step
        metrics_file = run_dir / "logs" / "metrics.jsonl"
        deadline = time.monotonic() + 600
        status_checked = time.monotonic()
        while time.monotonic() < deadline:
            steps = [r["step"] for r in map(json.loads, metrics_file.read_text().splitlines())
                     if "reward/mean" in r] if metrics_file.exists() else []
            if len(steps) >= 2:
                break
            if time.monotonic() - status_checked > 10:
                assert _job_status(cli_env, job_id) in ("RUNNING", "PENDING"), _logs(cli_env, job_id)[-4000:]
                status_checked = time.monotonic()
            time.sleep(0.2)
        assert len(steps) >= 2, "the job did not finish two steps within 600 s"
        stopped = _run(shlex.split(stop.replace("JOB_ID", job_id)), cli_env)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        assert _wait_for_end(cli_env, job_id, 180) == "STOPPED"
        logs = _logs(cli_env, job_id)
        assert f"run directory {run_dir} (checkpoints, logs)" in logs
        trained = [r["step"] for r in map(json.loads, metrics_file.read_text().splitlines()) if "reward/mean" in r]
        last = trained[-1]
        assert trained == list(range(1, last + 1)) and last >= 2
        assert f"SIGTERM: stopped after step {last}; checkpoint" in logs, logs[-4000:]
        assert "SIGTERM received at time" not in logs and "PC: @" not in logs  # no raw signal dump
        checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
        assert checkpoints == [f"step-{last:08d}"], checkpoints  # complete (no .tmp-), at the stopped step
        driver = json.loads((run_dir / "checkpoints" / checkpoints[0] / "driver.json").read_text())
        assert driver["step"] == last

        # the documented resume continues from it, one more step, to the end
        resumed = _submit(resume, cli_env, run_dir, [*small, f"trainer.total_steps={last + 1}"], dash)
        status = _wait_for_end(cli_env, resumed, 600)
        logs = _logs(cli_env, resumed)
        assert status == "SUCCEEDED", f"job {resumed} ended {status}:\n{logs[-4000:]}"
        assert f"at step {last}" in logs and '"eval/anls"' in logs
        trained = [r["step"] for r in map(json.loads, metrics_file.read_text().splitlines()) if "reward/mean" in r]
        assert trained == list(range(1, last + 2))
        assert (run_dir / "logs" / "report.png").exists()
        assert (run_dir / "checkpoints" / f"step-{last + 1:08d}").exists()
        # the step metrics reached the dashboard/Prometheus (the eval gauges are set at step 0)
        assert {"ray_docrl_eval_anls", "ray_docrl_reward_mean", "ray_docrl_time_step_s"} <= seen_metrics, sorted(seen_metrics)
        # loopback only, the jobs' drivers and actors included (checked every 0.5 s while they ran)
        assert not off_loopback, off_loopback
    finally:
        scraping.set()
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
        try:  # gcs_server and raylet share the group and can outlive a SIGTERM'd parent
            os.killpg(head.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

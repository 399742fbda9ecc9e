"""benchmarks/gpu_check.py stops well: its step limits add up to its budget inside the wrapper's
timeout, and any stop (its budget spent, SIGTERM from the wrapper) ends the running docrl command
with every process it started and still prints the table of what ran."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}


def test_the_step_limits_add_up_inside_the_wrappers_timeout():
    wrapper = (ROOT / "benchmarks/gpu_check.sh").read_text()
    timeout_s = int(re.search(r"timeout --signal=TERM --kill-after=\d+ (\d+) ", wrapper).group(1))
    assert sum(gpu_check.LIMITS.values()) == gpu_check.BUDGET_S
    assert gpu_check.BUDGET_S + 2 * gpu_check.STOP_GRACE_S <= timeout_s


def test_a_spent_budget_stops_before_the_next_step_and_prints_the_table(tmp_path):
    out = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--budget-s", "1", "--work",
                          str(tmp_path), "--json", str(tmp_path / "table.json")], cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 124, out.stdout + out.stderr
    assert "STOPPED: the budget is spent" in out.stdout and "| (stopped) |" in out.stdout
    table = json.loads((tmp_path / "table.json").read_text())
    assert table["stopped"] == "the budget is spent" and table["rows"][-1][0] == "(stopped)"


@pytest.mark.slow
def test_sigterm_mid_step_stops_every_process_the_step_started(tiny_models, tmp_path):
    """SIGTERM (what gpu_check.sh's timeout sends) while `docrl doctor` runs vLLM in its own Ray
    cluster: the check exits 124 with the rows so far, and none of the processes it started,
    Ray's daemons included, outlives it."""
    models = tmp_path / "models"
    models.mkdir()
    for name in ("policy", "retriever"):  # already built: the build steps only check them
        shutil.copytree(tiny_models[name], models / name)
    proc = subprocess.Popen([sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--work", str(tmp_path)],
                            cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen: dict[int, str] = {}
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:  # until the doctor has started Ray and vLLM
            for p in psutil.Process(proc.pid).children(recursive=True):
                try:
                    seen[p.pid] = " ".join(p.cmdline())[:120]
                except psutil.NoSuchProcess:
                    pass
            if any("raylet" in c for c in seen.values()) and any("doctor" in c for c in seen.values()):
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"the doctor step never started Ray: {sorted(seen.values())}")
        time.sleep(5)
        for p in psutil.Process(proc.pid).children(recursive=True):
            seen.setdefault(p.pid, "")
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 124, output[-3000:]
    assert "STOPPED: SIGTERM received" in output and "| build tiny policy | built | PASS |" in output
    time.sleep(2)
    alive = [f"{pid} {cmd}" for pid, cmd in seen.items() if psutil.pid_exists(pid)
             and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert not alive, alive

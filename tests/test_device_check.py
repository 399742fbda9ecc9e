"""benchmarks/device_check.py, the one command for a lent GPU machine, checked on CPU: its dry run
gives every row at toy sizes with Ray and vLLM unimportable (the machine has neither), a budget
that runs out stops it in the row it interrupts with the partial table printed, and without CUDA
a real run refuses to start."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "device_check.py"
ROWS = ("environment", "learner-2b", "grad-accumulation", "logprobs", "learner-3b", "retriever-gme",
        "retriever-colqwen", "maxsim")

# The script as __main__, after `ray` and `vllm` are made unimportable: None in sys.modules makes
# `import ray` raise, anywhere, as on the lent machine.
WITHOUT_RAY_OR_VLLM = ("import runpy, sys; sys.modules['ray'] = None; sys.modules['vllm'] = None; "
                       "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")


def run_device_check(args: list[str], out_dir: Path, timeout_s: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OUT": str(out_dir)}
    return subprocess.run([sys.executable, "-c", WITHOUT_RAY_OR_VLLM, str(SCRIPT), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout_s)


@pytest.mark.slow
def test_dry_run_measures_every_row_without_ray_or_vllm(tmp_path):
    done = run_device_check(["--dry-run", "--json", str(tmp_path / "rows.json"), "--work", str(tmp_path / "work")],
                            tmp_path / "out", timeout_s=300)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-4000:]
    report = json.loads((tmp_path / "rows.json").read_text())
    assert report["dry_run"] is True and report["stopped"] is None and report["imported"] == []
    assert [r["key"] for r in report["rows"]] == list(ROWS)
    for row in report["rows"]:
        assert row["status"] in ("PASS", "measured"), row
        assert row["figures"] and all(math.isfinite(v) for v in row["figures"].values()), row
        assert f"| {row['row']} |" in done.stdout
    figures = {r["key"]: r["figures"] for r in report["rows"]}
    assert figures["learner-2b"]["optimizer_steps"] == 1 and figures["learner-3b"]["optimizer_steps"] == 1
    # on CPU DeepSpeed's fp32 accumulation equals the plain fp32 sum exactly; bf16 sums would not
    grad = figures["grad-accumulation"]
    assert grad["max_rel_err"] < 1e-6 < grad["bf16_accumulator_max_rel_err"]
    assert figures["maxsim"]["recall_rerank"] >= 0.95
    assert not any("mfu" in f or "peak_allocated_gib" in f for f in figures.values())  # no GPU figures
    assert "DRY RUN" in done.stdout and "no GPU figures" in done.stdout
    assert (tmp_path / "out" / "device_check.md").read_text().strip() in done.stdout  # $OUT gets the table
    assert json.loads((tmp_path / "out" / "device_check.json").read_text())["rows"] == report["rows"]
    assert not (tmp_path / "work").exists()  # the built checkpoints are removed


def test_a_budget_that_runs_out_stops_the_row_and_prints_the_partial_table(tmp_path):
    done = run_device_check(["--dry-run", "--budget-s", "5", "--json", str(tmp_path / "rows.json")],
                            tmp_path / "out", timeout_s=120)
    assert done.returncode == 124, done.stdout[-4000:] + done.stderr[-4000:]
    report = json.loads((tmp_path / "rows.json").read_text())
    stopped = [i for i, r in enumerate(report["rows"]) if r["status"] == "STOPPED"]
    assert len(stopped) == 1, report["rows"]
    row = report["rows"][stopped[0]]
    assert "the budget of 5 s ran out" in row["result"] and report["stopped"]
    assert all(r["status"] == "not run" for r in report["rows"][stopped[0] + 1:])
    assert f"| {row['row']} |" in done.stdout and "| STOPPED |" in done.stdout
    assert report["elapsed_s"] < 5 + 10  # stopped when the budget ran out, not when the row ended


def test_sigterm_stops_the_row_and_prints_the_partial_table(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OUT": str(tmp_path / "out")}
    proc = subprocess.Popen([sys.executable, "-c", WITHOUT_RAY_OR_VLLM, str(SCRIPT), "--dry-run"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        header = proc.stdout.readline()  # printed once the stop handlers are in place, as the first row starts
        assert header.startswith("[device_check]"), header
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    assert "SIGTERM received during this row" in out and "| STOPPED |" in out and "| not run |" in out
    report = json.loads((tmp_path / "out" / "device_check.json").read_text())
    assert report["stopped"] == "SIGTERM received"


def test_a_real_run_without_cuda_refuses_to_start(tmp_path):
    done = run_device_check([], tmp_path / "out", timeout_s=120)
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert "no CUDA device" in done.stderr and "--dry-run" in done.stderr

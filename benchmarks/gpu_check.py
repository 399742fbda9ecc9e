"""The GPU check: the paths real users take, on one CUDA GPU, in one command, printing one table.

    benchmarks/gpu_check.sh              # on a machine with one NVIDIA GPU and the gpu extra installed
    benchmarks/gpu_check.sh --dry-run    # on CPU: every step short of CUDA, with tiny sizes

Steps (each a real `docrl` command in its own subprocess, each with a time limit):
  1. build the tiny and ~100M random-weight policies (`docrl make-tiny-models`)
  2. `docrl doctor` on the tiny policy in fp32 (pass: max |dlogprob| < 1e-3, the same bar as on
     CPU) and in bf16 (pass: < 5e-2: bf16 keeps 8 bits of mantissa, and vLLM's CUDA kernels and the
     reference's differ in accumulation order); each also times a full-weight push through the
     object store and a LoRA adapter push
  3. three GRPO steps of the tiny preset with every role on the one GPU (fractional GPU
     resources, as configs/qwen2vl-2b-1gpu.yaml does): real vLLM, real DeepSpeed, a weight push
     after every step
  4. two LoRA GRPO steps of the ~100M policy in bf16 on the GPU: rollout tokens/s and learner
     tokens/s from the run's own metrics
  5. retrieval in the loop (configs/tiny-retrieval.yaml, shortened): the retriever's contrastive
     warm start trained on the GPU (its summary names the device), the index built and searched
     there, the policy reading the top 2 pages, two GRPO steps
Each step has a time limit (LIMITS below) and the limits add up to the whole check's budget (14
minutes; gpu_check.sh stops the script at 15). A step over its limit, or any stop of the script
itself (Ctrl-C, SIGTERM, the wrapper's timeout), stops the running command and every process it
started (all their process groups: docrl's Ray daemons run in sessions of their own), marks the
step, and still prints the table of what ran. On CPU (--dry-run) the same commands run with the
GPU settings replaced by CPU ones, the 100M steps shortened, and the CUDA-only checks reported as
skipped, so the script itself is tested where no GPU is.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FP32_TOLERANCE = 1e-3
BF16_TOLERANCE = 5e-2

# Seconds each step may take; they add up to BUDGET_S, which leaves gpu_check.sh's 900 s a minute
# for stopping a step (STOP_GRACE_S) and printing the table.
LIMITS = {"build tiny": 60, "build 100m": 90, "doctor float32": 110, "doctor bfloat16": 110, "tiny train": 150,
          "100m train": 160, "retrieval": 160}
BUDGET_S = sum(LIMITS.values())
STOP_GRACE_S = 20


class Stopped(Exception):
    """The check was stopped (a signal, or its budget spent)."""


def descendants(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def stop_tree(proc: subprocess.Popen) -> None:
    """Stop a docrl command and everything it started: SIGINT twice (docrl's second signal stops
    at once and shuts its Ray cluster down), then SIGKILL to every process group still alive -
    the command's own and those its descendants (Ray's daemons) opened."""
    import psutil

    tree = [proc.pid] + [p.pid for p in descendants(proc.pid)]
    for _ in range(2):
        try:
            os.killpg(proc.pid, signal.SIGINT)
        except ProcessLookupError:
            break
        time.sleep(1)
    try:
        proc.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        pass
    groups = set()
    for pid in tree:
        try:
            groups.add(os.getpgid(pid))
        except ProcessLookupError:
            continue
    for group in groups - {os.getpgid(0)}:
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for pid in tree:  # any left in this script's own group
        try:
            psutil.Process(pid).kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()


class Runner:
    """Runs the steps' commands within the budget; `stop()` (from a signal handler) ends the one
    running and makes every later step raise `Stopped`."""

    def __init__(self, budget_s: float):
        self.deadline = time.monotonic() + budget_s
        self.current: subprocess.Popen | None = None
        self.stopped_by: str | None = None

    def stop(self, why: str) -> None:
        if self.stopped_by:  # a second signal while the first stop is cleaning up
            return
        self.stopped_by = why
        raise Stopped(why)

    def run(self, cmd: list[str], step: str, env: dict | None = None) -> tuple[int, str, float]:
        """Run a docrl command for at most LIMITS[step] seconds (less when the budget runs out);
        returns (exit code, its output, seconds). Over its limit it is stopped with everything it
        started and reported as exit 124."""
        if self.stopped_by:
            raise Stopped(self.stopped_by)
        limit = min(LIMITS[step], self.deadline - time.monotonic() - STOP_GRACE_S)
        if limit <= 0:
            self.stopped_by = "the budget is spent"
            raise Stopped(self.stopped_by)
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, **(env or {})}, start_new_session=True)
        self.current = proc
        try:
            out, _ = proc.communicate(timeout=limit)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            stop_tree(proc)
            out = (proc.stdout.read() if proc.stdout else "") + f"\n[gpu_check: stopped after {limit:.0f}s]"
            code = 124
        except BaseException:
            stop_tree(proc)
            raise
        finally:
            self.current = None
        return code, out, time.perf_counter() - t0


def docrl(*args: str) -> list[str]:
    return [sys.executable, "-m", "cluster.cli", *args]


def device_overrides(gpu: bool) -> list[str]:
    """Every role on one GPU with fractional resources (the 1-GPU preset's split), or on CPU."""
    if not gpu:
        return ["ray.num_gpus=0"]
    return ["ray.num_gpus=1", "retriever.num_gpus_per_actor=0.1", "rollout.num_gpus_per_worker=0.4",
            "rollout.gpu_memory_utilization=0.3", "learner.num_gpus_per_rank=0.5"]


def parse_doctor(out: str) -> dict:
    """The doctor's figures from its printed report (its documented output format)."""
    found = {}
    for label in ("base", "full_push", "lora_push", "sampled"):
        m = re.search(rf"^\s+{label}\s+max \|dlogprob\| (\S+)", out, re.M)
        found[label] = float(m.group(1)) if m else None
    m = re.search(r"push time: full (\S+)s, LoRA (\S+)s", out)
    found["full_push_s"], found["lora_push_s"] = (float(m.group(1)), float(m.group(2))) if m else (None, None)
    found["greedy_identical"] = "greedy tokens identical: False" not in out and "greedy tokens identical: True" in out
    return found


def train_metrics(run_dir: Path) -> list[dict]:
    from cluster.metrics import read_jsonl

    path = run_dir / "logs" / "metrics.jsonl"
    return [r for r in read_jsonl(path) if "reward/mean" in r] if path.exists() else []


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="run on CPU: everything short of CUDA")
    ap.add_argument("--work", default=None, help="working directory (default: a temporary one)")
    ap.add_argument("--json", default=None, help="also write the table's rows as JSON here")
    ap.add_argument("--budget-s", type=float, default=BUDGET_S, help=f"the whole check's time (default {BUDGET_S})")
    args = ap.parse_args()

    import torch

    gpu = not args.dry_run
    if gpu and not torch.cuda.is_available():
        print("gpu_check: torch sees no CUDA device; run with --dry-run on a machine without a GPU", file=sys.stderr)
        return 2
    work = Path(args.work or tempfile.mkdtemp(prefix="docrl-gpu-check-"))
    rows: list[tuple[str, str, str, str]] = []  # (check, result, pass/fail/skip, seconds)
    failed = False

    def record(check: str, result: str, ok: bool | None, seconds: float) -> None:
        nonlocal failed
        failed |= ok is False
        rows.append((check, result, "skip" if ok is None else ("PASS" if ok else "FAIL"), f"{seconds:.0f}"))
        print(f"[gpu_check] {check}: {result} ({rows[-1][2]}, {seconds:.0f}s)", flush=True)

    device = torch.cuda.get_device_name(0) if gpu else "CPU (dry run)"
    print(f"[gpu_check] device: {device}; torch {torch.__version__}; work dir {work}; budget {args.budget_s:.0f}s",
          flush=True)
    runner = Runner(args.budget_s)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: runner.stop(f"{signal.Signals(signum).name} received"))
    try:
        run_steps(runner, record, gpu, work)
    except Stopped as e:
        record("(stopped)", f"{e}: the steps after this row did not run", False, 0)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the table is printed whatever arrives now
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print(f"\n{device}{' - DRY RUN, no GPU figures' if not gpu else ''}"
              f"{' - STOPPED: ' + runner.stopped_by if runner.stopped_by else ''}\n")
        print("| check | result | status | s |")
        print("|---|---|---|---:|")
        for row in rows:
            print("| " + " | ".join(row) + " |", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps({"device": device, "dry_run": not gpu, "stopped": runner.stopped_by,
                                                   "rows": rows}, indent=2))
    if runner.stopped_by:
        return 124
    return 1 if failed else 0


def run_steps(runner: Runner, record, gpu: bool, work: Path) -> None:
    """The five steps, in order; `record(check, result, ok, seconds)` adds a row."""
    run = runner.run
    models = work / "models"
    # 1. models
    for size in ("tiny", "100m"):
        code, out, s = run(docrl("make-tiny-models", str(models), "--size", size), f"build {size}")
        record(f"build {size} policy", "built" if code == 0 else out[-300:], code == 0, s)
    policy_100m = models / "policy-100m"

    # 2. doctor, fp32 and bf16
    common = ["--config", "configs/tiny.yaml", f"run.models_dir={models}", *device_overrides(gpu)]
    for dtype, tolerance in (("float32", FP32_TOLERANCE), ("bfloat16", BF16_TOLERANCE)):
        if dtype == "bfloat16" and not gpu:
            record("doctor bf16", "CUDA only (bf16 parity on CPU is covered by the test suite's fp32 bar)", None, 0)
            continue
        code, out, s = run(docrl("doctor", *common, f"rollout.dtype={dtype}", "--tolerance", str(tolerance)), f"doctor {dtype}")
        d = parse_doctor(out)
        if d["base"] is None:
            record(f"doctor {dtype}", "no report: " + out[-300:].replace("\n", " "), False, s)
            continue
        worst = max(v for k, v in d.items() if k in ("base", "full_push", "lora_push", "sampled") and v is not None)
        record(f"doctor {dtype} (tiny)", f"max abs dlogprob {worst:.2e} (bar {tolerance:g}); greedy identical: "
               f"{d['greedy_identical']}", code == 0, s)
        record(f"weight push {dtype} (tiny, object store)",
               f"full {d['full_push_s']:.2f}s, LoRA adapter {d['lora_push_s']:.2f}s", None if code else True, 0)

    # 3. tiny preset training steps on the device
    run_dir = work / "tiny-train"
    shutil.rmtree(run_dir, ignore_errors=True)  # this script's own run: a rerun starts it over
    steps = 3
    code, out, s = run(docrl("train", *common, f"run.output_dir={run_dir}", f"trainer.total_steps={steps}",
                             "trainer.eval_every=0", "trainer.save_every=0", "trainer.warm_start.steps=2",
                             "data.max_eval_samples=4", "data.synthetic.num_documents=40"), "tiny train")
    rows_tiny = train_metrics(run_dir)
    if code == 0 and len(rows_tiny) == steps:
        step_s = sorted(r["time/step_s"] for r in rows_tiny)[steps // 2]
        record("tiny preset GRPO steps", f"{steps} steps, median {step_s:.2f} s/step, weights v"
               f"{int(rows_tiny[-1]['weights/version'])}", True, s)
    else:
        record("tiny preset GRPO steps", f"exit {code}: " + out[-400:].replace("\n", " "), False, s)

    # 4. ~100M policy: LoRA, bf16 on the GPU (fp32 on CPU: bf16 vLLM needs AVX512-BF16 there)
    run_dir = work / "100m-train"
    shutil.rmtree(run_dir, ignore_errors=True)
    dtype = "bfloat16" if gpu else "float32"
    code, out, s = run(docrl("train", *common, f"run.output_dir={run_dir}", f"learner.policy={policy_100m}",
                             "trainer.total_steps=2", "trainer.eval_every=0", "trainer.save_every=0",
                             "trainer.warm_start.steps=0", "data.max_eval_samples=4", "data.synthetic.num_documents=40",
                             f"rollout.dtype={dtype}", f"learner.dtype={dtype}", "learner.lora.enabled=true",
                             "learner.freeze_vision_tower=true", "learner.micro_batch_size=8",
                             "rollout.sampling.max_tokens=16", "trainer.prompts_per_step=8", "algorithm.minibatch_size=32",
                             "rollout.sampling.n=4", "rollout.max_model_len=2048"), "100m train")
    rows_100m = train_metrics(run_dir)
    if code == 0 and rows_100m:
        last = rows_100m[-1]
        record(f"100M LoRA GRPO ({dtype})", f"rollout {last['throughput/rollout_tokens_per_s']:.0f} generated tokens/s; "
               f"learner {last['learner/tokens_per_s']:.0f} tokens/s; step {last['time/step_s']:.1f}s "
               f"(weight sync {last['time/weight_sync_s']:.2f}s)", True, s)
    else:
        record(f"100M LoRA GRPO ({dtype})", f"exit {code}: " + out[-400:].replace("\n", " "), False, s)

    # 5. retrieval in the loop: the retriever trained, indexed and searched on the device
    run_dir = work / "retrieval-train"
    shutil.rmtree(run_dir, ignore_errors=True)
    code, out, s = run(docrl("train", "--config", "configs/tiny-retrieval.yaml", f"run.models_dir={models}",
                             *device_overrides(gpu), f"run.output_dir={run_dir}", "trainer.total_steps=2",
                             "trainer.eval_every=0", "trainer.save_every=0", "trainer.warm_start.steps=2",
                             "retriever.warm_start.steps=20", "retriever.warm_start.max_eval_questions=16",
                             "data.max_eval_samples=8", "data.synthetic.num_documents=40"), "retrieval")
    from retriever.finetune import RUN_SUBDIR, SUMMARY_FILE

    warm_file = run_dir / RUN_SUBDIR / SUMMARY_FILE
    warm = json.loads(warm_file.read_text()) if warm_file.exists() else {}
    rows_retrieval = train_metrics(run_dir)
    expected_device = "cuda" if gpu else "cpu"
    if code == 0 and len(rows_retrieval) == 2 and warm.get("device") == expected_device:
        record("retrieval in the loop", f"retriever warm start on {warm['device']}: {warm['steps']} steps in "
               f"{warm['seconds']:.0f}s, held-out recall@1 {warm['eval_recall@1_before']:.2f} -> "
               f"{warm['eval_recall@1_after']:.2f}; 2 GRPO steps, median step {rows_retrieval[-1]['time/step_s']:.1f}s, "
               f"reward/retrieval {rows_retrieval[-1].get('reward/retrieval', float('nan')):.2f}", True, s)
    else:
        record("retrieval in the loop", f"exit {code}, warm start device {warm.get('device')!r} (expected "
               f"{expected_device!r}): " + out[-400:].replace("\n", " "), False, s)


if __name__ == "__main__":
    sys.exit(main())

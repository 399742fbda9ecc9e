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
The budget is 8-10 minutes on one GPU (gpu_check.sh stops it at 15); on CPU (--dry-run) the same
commands run with the GPU settings replaced by CPU ones, the 100M steps shortened, and the
CUDA-only checks reported as skipped, so the script itself is tested where no GPU is.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FP32_TOLERANCE = 1e-3
BF16_TOLERANCE = 5e-2


def run(cmd: list[str], timeout_s: float, env: dict | None = None) -> tuple[int, str, float]:
    """Run a docrl command; returns (exit code, its output, seconds). A command over its limit is
    stopped (its whole process group) and reported as exit 124, never left hanging."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})}, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 2)  # SIGINT: docrl checkpoints and stops its own Ray cluster
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            out, _ = proc.communicate()
        out += f"\n[gpu_check: stopped after {timeout_s:g}s]"
        code = 124
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
    args = ap.parse_args()

    import torch

    gpu = not args.dry_run
    if gpu and not torch.cuda.is_available():
        print("gpu_check: torch sees no CUDA device; run with --dry-run on a machine without a GPU", file=sys.stderr)
        return 2
    work = Path(args.work or tempfile.mkdtemp(prefix="docrl-gpu-check-"))
    models = work / "models"
    rows: list[tuple[str, str, str, str]] = []  # (check, result, pass/fail/skip, seconds)
    failed = False

    def record(check: str, result: str, ok: bool | None, seconds: float) -> None:
        nonlocal failed
        failed |= ok is False
        rows.append((check, result, "skip" if ok is None else ("PASS" if ok else "FAIL"), f"{seconds:.0f}"))
        print(f"[gpu_check] {check}: {result} ({rows[-1][2]}, {seconds:.0f}s)", flush=True)

    device = torch.cuda.get_device_name(0) if gpu else "CPU (dry run)"
    print(f"[gpu_check] device: {device}; torch {torch.__version__}; work dir {work}", flush=True)

    # 1. models
    for size in ("tiny", "100m"):
        code, out, s = run(docrl("make-tiny-models", str(models), "--size", size), 300)
        record(f"build {size} policy", "built" if code == 0 else out[-300:], code == 0, s)
    policy_100m = models / "policy-100m"

    # 2. doctor, fp32 and bf16
    common = ["--config", "configs/tiny.yaml", f"run.models_dir={models}", *device_overrides(gpu)]
    for dtype, tolerance in (("float32", FP32_TOLERANCE), ("bfloat16", BF16_TOLERANCE)):
        if dtype == "bfloat16" and not gpu:
            record("doctor bf16", "CUDA only (bf16 parity on CPU is covered by the test suite's fp32 bar)", None, 0)
            continue
        code, out, s = run(docrl("doctor", *common, f"rollout.dtype={dtype}", "--tolerance", str(tolerance)), 240)
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
                             "data.max_eval_samples=4", "data.synthetic.num_documents=40"), 300)
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
                             "rollout.sampling.n=4", "rollout.max_model_len=2048"), 360)
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
                             "data.max_eval_samples=8", "data.synthetic.num_documents=40"), 360)
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

    print(f"\n{device}{' - DRY RUN, no GPU figures' if not gpu else ''}\n")
    print("| check | result | status | s |")
    print("|---|---|---|---:|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device, "dry_run": not gpu, "rows": rows}, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Training throughput, sync against async mode: samples/s of whole steps and the phase split of one
step (rollout + reward, learner update, weight sync, and how long the driver waited for the rollout),
for the tiny preset on the easy level, measured in the same run.

    .venv/bin/python benchmarks/bench_train.py            # 12 steps per mode (about 4 minutes on 2 cores)
    .venv/bin/python benchmarks/bench_train.py --quick    # 6 steps per mode

Each mode runs `docrl train` in its own subprocess (a fresh local Ray cluster), with the same config
and seed, no warm start and no evaluation between steps. The first two steps are dropped (engine
warm-up; in async mode the first step has no batch ahead), then the median of the rest. The ratio is
async / sync. On 2 shared CPU cores the rollout and the learner compete for the same cores, so the
overlap async mode buys is bounded by the CPUs; with GPUs per role it approaches
max(rollout, learner) / (rollout + learner).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PHASES = ("time/step_s", "time/rollout_and_reward_s", "time/learner_s", "time/weight_sync_s", "time/wait_for_rollout_s")


def run_mode(mode: str, steps: int, out_dir: Path) -> list[dict]:
    overrides = [f"run.output_dir={out_dir}", f"trainer.mode={mode}", f"trainer.total_steps={steps}",
                 "trainer.eval_every=0", "trainer.save_every=0", "trainer.warm_start.steps=0", "data.max_eval_samples=4"]
    done = subprocess.run([sys.executable, "-m", "cluster.cli", "train", "--config", "configs/tiny.yaml", *overrides],
                          cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{mode} run failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    from cluster.metrics import read_jsonl

    return [r for r in read_jsonl(out_dir / "logs" / "metrics.jsonl") if "reward/mean" in r]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=None)
    args = ap.parse_args()
    steps = args.steps or (6 if args.quick else 12)
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        for mode in ("sync", "async"):
            rows = run_mode(mode, steps, Path(tmp) / mode)[2:]
            results[mode] = {k: statistics.median(r[k] for r in rows) for k in (*PHASES, "throughput/samples_per_s")}
    print(f"tiny preset, easy level, {steps} steps per mode (first 2 dropped), medians per step\n")
    print("| mode | samples/s | step s | rollout+reward s | learner s | weight sync s | waited for rollout s |")
    print("|---|---|---|---|---|---|---|")
    for mode, m in results.items():
        print(f"| {mode} | {m['throughput/samples_per_s']:.1f} | {m['time/step_s']:.2f} | {m['time/rollout_and_reward_s']:.2f} "
              f"| {m['time/learner_s']:.2f} | {m['time/weight_sync_s']:.3f} | {m['time/wait_for_rollout_s']:.2f} |")
    ratio = results["async"]["throughput/samples_per_s"] / results["sync"]["throughput/samples_per_s"]
    print(f"\nasync / sync samples/s: {ratio:.2f}x")
    print(json.dumps({"ratio_async_over_sync": ratio, **results}))


if __name__ == "__main__":
    main()

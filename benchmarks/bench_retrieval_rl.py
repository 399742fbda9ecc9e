"""The retriever learning from the answers (retriever.learn), against a frozen random retriever and
a retriever warm-started on gold pages, on the sections level of configs/tiny-retrieval-rl.yaml.

    .venv/bin/python benchmarks/bench_retrieval_rl.py                  # the three arms, ~15 minutes each
    .venv/bin/python benchmarks/bench_retrieval_rl.py --arms learns    # one arm
    .venv/bin/python benchmarks/bench_retrieval_rl.py --steps 20       # shorter

Each arm is `docrl train --config configs/tiny-retrieval-rl.yaml` in a subprocess (a fresh local Ray
cluster), with the same seeds, the same questions per step and the same answers per question
(16: 4 drawn pages x 4 answers when the retriever learns, 16 answers on its greedy top page when
it does not), one after the other. The retriever reads no gold page except in `warm-started`, the
upper reference (the preset configs/tiny-retrieval.yaml's contrastive warm start); gold pages
measure held-out recall@1. The policy's 20-step format warm start reads the gold page in every arm.

Prints, per arm, held-out recall@1 and ANLS (greedy, official ANLS, all held-out questions) at each
evaluation, the training-time hit rate of the pages read (reward/retrieval, first and last 10
steps), and the wall time; `--out` keeps each arm's run directory (report.png, summary.json).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/tiny-retrieval-rl.yaml"
# configs/tiny-retrieval.yaml's retriever warm start, on this preset
WARM_START = ["retriever.warm_start.steps=150", "retriever.warm_start.learning_rate=3e-4",
              "retriever.warm_start.temperature=0.05", "retriever.warm_start.negatives=3",
              "retriever.warm_start.trainable=embeddings", "retriever.warm_start.smooth_max=true"]
FROZEN = ["retriever.learn.enabled=false", "rollout.sampling.n=16"]
ARMS = {
    "frozen": FROZEN,
    "learns": [],
    "warm-started": FROZEN + WARM_START,
}
RUN_TIMEOUT_S = 3 * 3600


def run_arm(name: str, overrides: list[str], out_dir: Path, steps: int) -> dict:
    cmd = [sys.executable, "-m", "cluster.cli", "train", "--config", CONFIG, f"run.output_dir={out_dir}",
           f"trainer.total_steps={steps}", f"trainer.eval_every={max(1, steps // 5)}", "trainer.save_every=0",
           *overrides]
    t0 = time.perf_counter()
    with open(out_dir.parent / f"{name}.log", "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=RUN_TIMEOUT_S)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"arm {name!r} failed (exit {proc.returncode}): see {out_dir.parent / f'{name}.log'}")
    rows = [json.loads(line) for line in (out_dir / "logs" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/anls" in r]
    train = [r for r in rows if "reward/mean" in r]
    hit = [r["reward/retrieval"] for r in train]
    return {"arm": name, "seconds": seconds,
            "evals": [(r["step"], r["eval/retrieval_recall@1"], r["eval/anls"]) for r in evals],
            "hit_first": sum(hit[:10]) / len(hit[:10]), "hit_last": sum(hit[-10:]) / len(hit[-10:]),
            "step_s": sorted(r["time/step_s"] for r in train)[len(train) // 2]}


def table(results: list[dict]) -> str:
    lines = ["| arm | held-out recall@1 at RL step " + " / ".join(str(s) for s, _, _ in results[0]["evals"])
             + " | held-out ANLS at the same steps | pages read: gold, first / last 10 steps | median s/step | wall |",
             "|---|---|---|---|---:|---:|"]
    for r in results:
        recall = " / ".join(f"{x:.3f}" for _, x, _ in r["evals"])
        anls = " / ".join(f"{x:.3f}" for _, _, x in r["evals"])
        lines.append(f"| {r['arm']} | {recall} | {anls} | {r['hit_first']:.3f} / {r['hit_last']:.3f} | "
                     f"{r['step_s']:.1f} | {r['seconds'] / 60:.1f} min |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--out", type=Path, default=None, help="keep the arms' run directories here")
    args = parser.parse_args()
    base = args.out or Path(tempfile.mkdtemp(prefix="bench-retrieval-rl-"))
    base.mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.arms:
        print(f"arm {name}: {' '.join(ARMS[name]) or '(the preset)'}", flush=True)
        results.append(run_arm(name, ARMS[name], base / name, args.steps))
        print(table(results[-1:]), flush=True)
    print(f"\n{CONFIG}, {args.steps} RL steps, run directories under {base}\n")
    print(table(results))


if __name__ == "__main__":
    main()

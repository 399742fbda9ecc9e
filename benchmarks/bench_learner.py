"""Learner throughput: tokens/s per rank of the PPO update (forward + backward + optimizer step)
and of scoring (old/ref logprobs, no gradient), ZeRO-2 against ZeRO-3, LoRA against full
fine-tuning, for the tiny policy and the ~100M one, all measured in the same run.

    .venv/bin/python benchmarks/bench_learner.py            # tiny and ~100M (about 3-5 minutes on 2 cores)
    .venv/bin/python benchmarks/bench_learner.py --quick    # tiny only

Each case runs in its own subprocess with one in-process DeepSpeed rank (`LearnerGroup(local=True)`,
world size 1, so "per rank" is the whole run): a fresh process per case keeps allocator state and
torch.distributed out of the comparison. The batch is synthetic but real-shaped (chat prompt with a
page image, random answers); one warm-up update, then the median of the repeats. Ratios are
against the ZeRO-2 LoRA case of the same model. The ~100M policy is built once under
artifacts/tiny-models/policy-100m (a minute or two the first time).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MODELS_DIR = ROOT / "artifacts" / "tiny-models"


def run_case(spec: dict) -> dict:
    """One measurement (in this process): build the group, warm up, time `repeats` updates."""
    import torch

    torch.set_num_threads(spec["threads"])
    from learner.config import AlgorithmConfig, LearnerConfig
    from learner.group import LearnerGroup
    from learner.synthetic import make_pages, synthetic_experiences
    from learner.types import TrainBatch

    work = Path(tempfile.mkdtemp(prefix="bench-learner-"))
    pages = make_pages(work, sizes=[(224, 224)] * spec["questions"])
    exps = synthetic_experiences(spec["policy"], pages, answers_per_question=2,
                                 response_lengths=(spec["response_tokens"], spec["response_tokens"]))
    cfg = LearnerConfig(zero_stage=spec["zero"], dtype=spec["dtype"], lora={"enabled": spec["mode"] == "lora"},
                        value_model="none", micro_batch_size=spec["micro_batch"], learning_rate=1e-5)
    algo = AlgorithmConfig(advantage="grpo", minibatch_size=len(exps), ppo_epochs=1, kl_coef=0.01)
    t0 = time.perf_counter()
    group = LearnerGroup(spec["policy"], cfg, algo, local=True, export_dir=str(work / "exports"))
    init_s = time.perf_counter() - t0
    train, score, update = [], [], []
    for i in range(spec["repeats"] + 1):
        m = group.update(TrainBatch(exps))
        if i:  # the first update warms up (allocations, autograd graphs)
            train.append(m["tokens_per_s_per_rank"])
            score.append(_score_tokens(exps) / m["score_seconds"])
            update.append(m["update_seconds"])
    t0 = time.perf_counter()
    export = group.export_weights()
    export_s = time.perf_counter() - t0
    return {"train_tokens_per_s": statistics.median(train), "score_tokens_per_s": statistics.median(score),
            "update_s": statistics.median(update), "init_s": init_s, "export_s": export_s,
            "tokens_per_update": _score_tokens(exps), "mismatch": m["logprob_mismatch_max"]}


def _score_tokens(exps) -> int:
    return sum(len(e.prompt_ids) + len(e.response_ids) for e in exps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny policy only")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = ap.parse_args()
    if args.case:
        print("RESULT " + json.dumps(run_case(json.loads(args.case))), flush=True)
        return

    from docvqa.tiny_models import build_tiny_models

    models = {"tiny": str(build_tiny_models(MODELS_DIR)["policy"])}
    if not args.quick:
        t0 = time.perf_counter()
        models["100m"] = str(build_tiny_models(MODELS_DIR, size="100m")["policy"])
        print(f"(~100M policy ready in {time.perf_counter() - t0:.0f}s: {models['100m']})", file=sys.stderr)
    # per model: batch shape (questions x 2 answers), micro-batch, repeats
    shapes = {"tiny": dict(questions=4, response_tokens=24, micro_batch=4, repeats=args.repeats),
              "100m": dict(questions=2, response_tokens=16, micro_batch=2, repeats=max(1, args.repeats - 1))}
    cases = [(size, zero, mode) for size in models for mode in ("lora", "full") for zero in (2, 3)]
    rows = []
    for size, zero, mode in cases:
        spec = dict(policy=models[size], zero=zero, mode=mode, dtype="float32", threads=args.threads, **shapes[size])
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--case", json.dumps(spec)], cwd=ROOT, text=True,
                              capture_output=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"case {size} ZeRO-{zero} {mode} failed (exit {proc.returncode})")
        result = json.loads(line.removeprefix("RESULT "))
        print(f"  {size} ZeRO-{zero} {mode}: {result['train_tokens_per_s']:.0f} train tok/s "
              f"({time.perf_counter() - t0:.0f}s)", file=sys.stderr)
        rows.append((size, zero, mode, spec, result))

    print(f"\nLearner throughput, one rank, fp32, {args.threads} threads, median of the repeats "
          "(ratios vs ZeRO-2 LoRA of the same model)\n")
    print("| policy | ZeRO | mode | tokens/update | train tok/s/rank | vs base | score tok/s | vs base | update s | export s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for size, zero, mode, spec, r in rows:
        base = next(b for s, z, m, _, b in rows if s == size and z == 2 and m == "lora")
        print(f"| {size} | {zero} | {mode} | {r['tokens_per_update']} | {r['train_tokens_per_s']:.0f} | "
              f"{r['train_tokens_per_s'] / base['train_tokens_per_s']:.2f}x | {r['score_tokens_per_s']:.0f} | "
              f"{r['score_tokens_per_s'] / base['score_tokens_per_s']:.2f}x | {r['update_s']:.2f} | {r['export_s']:.2f} |")


if __name__ == "__main__":
    main()

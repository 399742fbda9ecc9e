"""Reward scoring throughput: docrl's ANLS vs the `anls` PyPI package vs a plain-Python baseline.

    .venv/bin/python benchmarks/bench_reward.py [--n 4000] [--repeats 5] [--actor]

Workload: DocVQA-like gold answers of 1-30 characters (words, names, numbers, dates, amounts), 1-3
gold answers per question, predictions that are exact, case/space variants, 1-3 character edits,
a wrong answer, or the answer padded with extra words. One "pair" = one prediction scored against
its gold-answer list (what one reward needs). Each method scores the same pairs; the table shows
the median over repeats (single process, one core). Targets: >= 10x the plain-Python baseline and
>= 100,000 pairs/s. `--actor` also measures one RewardActor round trip (starts a local Ray).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from docvqa.sample import DocVQASample  # noqa: E402
from reward.config import RewardConfig  # noqa: E402
from reward.metrics import anls_score  # noqa: E402
from reward.scoring import score_batch  # noqa: E402
from reward.types import ScoreRequest  # noqa: E402

WORDS = ["total", "invoice", "Acme", "Inc.", "tobacco", "research", "council", "Dr.", "Lobo", "New", "York",
         "sales", "report", "the", "of", "company", "R&D", "budget", "department", "memo", "Philip", "Morris"]


def gold_answer(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.3:
        s = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4)))
    elif kind < 0.5:
        s = str(rng.randint(0, 10 ** rng.randint(1, 7)))
    elif kind < 0.7:
        s = f"{rng.randint(1, 12)}/{rng.randint(1, 28)}/{rng.randint(60, 99)}"
    elif kind < 0.85:
        s = f"${rng.randint(1, 99999):,}.{rng.randint(0, 99):02d}"
    else:
        s = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-") for _ in range(rng.randint(1, 12)))
    return s[:30]


def edit(rng: random.Random, s: str, k: int) -> str:
    chars = list(s)
    for _ in range(k):
        op = rng.random()
        i = rng.randrange(len(chars) + 1)
        if op < 0.4 and i < len(chars):
            chars[i] = rng.choice("abcdefxyz0123456789 ")
        elif op < 0.7 and i < len(chars):
            del chars[i]
        else:
            chars.insert(i, rng.choice("abcdefxyz0123456789"))
    return "".join(chars)


def make_pairs(n: int, seed: int = 0) -> list[tuple[str, list[str]]]:
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        gold = gold_answer(rng)
        golds = [gold] + [rng.choice([gold.lower(), gold + ".", edit(rng, gold, 1)]) for _ in range(rng.randint(0, 2))]
        r = rng.random()
        if r < 0.3:
            pred = gold
        elif r < 0.4:
            pred = "  " + gold.upper().replace(" ", "  ")
        elif r < 0.7:
            pred = edit(rng, gold, rng.randint(1, 3))
        elif r < 0.9:
            pred = gold_answer(rng)
        else:
            pred = f"the {rng.choice(WORDS)} is {gold}"
        pairs.append((pred, golds))
    return pairs


# --- the plain-Python baseline: the official script's formula with a textbook DP ----------------

def plain_levenshtein(a: str, b: str) -> int:
    if len(a) > len(b):
        a, b = b, a
    prev = list(range(len(a) + 1))
    for j, cb in enumerate(b, start=1):
        cur = [j]
        for i, ca in enumerate(a, start=1):
            cur.append(min(prev[i] + 1, cur[i - 1] + 1, prev[i - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def plain_anls(pred: str, golds: list[str], threshold: float = 0.5) -> float:
    # the official DocVQA script: edit distance of the normalized strings over the longer RAW
    # string's .upper() length
    p = " ".join(pred.strip().lower().split())
    values = []
    for gold in golds:
        g = " ".join(gold.strip().lower().split())
        length = max(len(pred.upper()), len(gold.upper()))
        values.append(0.0 if length == 0 else plain_levenshtein(p, g) / length)
    result = 1 - min(values)
    return 0.0 if result < threshold else result


def time_method(fn, pairs, repeats: int) -> tuple[float, list[float]]:
    times, scores = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        scores = [fn(p, g) for p, g in pairs]
        times.append(time.perf_counter() - t)
    return statistics.median(times), scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4000, help="pairs per repeat")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--actor", action="store_true", help="also time a RewardActor round trip (starts Ray)")
    args = ap.parse_args()

    pairs = make_pairs(args.n)
    n_golds = sum(len(g) for _, g in pairs) / len(pairs)
    methods = [("plain Python DP + official rule", plain_anls)]
    try:
        import anls as anls_pkg

        methods.append(("`anls` PyPI package", anls_pkg.anls_score))
    except ImportError:
        print("note: the `anls` package is not installed; skipping it", file=sys.stderr)
    methods.append(("docrl `reward.metrics.anls_score`", anls_score))

    rows, results = [], {}
    for name, fn in methods:
        t, scores = time_method(fn, pairs, args.repeats)
        rows.append((name, len(pairs) / t))
        results[name] = scores

    # the full per-sample reward (extraction + all built-in components), not just ANLS
    cfg = RewardConfig(components={"anls": 1.0, "exact_match": 0.5, "containment": 0.5, "format": 0.1, "retrieval": 0.2},
                       extraction="answer_prefix")
    reqs = [ScoreRequest(DocVQASample(f"q{i}", "?", tuple(g), "d", "d/p1", ("d/p1",)), f"Answer: {p}", ("d/p1",))
            for i, (p, g) in enumerate(pairs)]
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        score_batch(reqs, cfg)
        times.append(time.perf_counter() - t)
    rows.append(("docrl `score_batch` (all 5 built-in components, answer_prefix)", len(reqs) / statistics.median(times)))

    if args.actor:
        rows.append(actor_round_trip(reqs, cfg, args.repeats))

    base = rows[0][1]
    print(f"\n{len(pairs)} pairs (mean {n_golds:.2f} gold answers each, answers 1-30 chars), "
          f"median of {args.repeats} repeats, single process\n")
    print("| method | pairs/s | µs/pair | vs plain Python |")
    print("|---|---:|---:|---:|")
    for name, rate in rows:
        print(f"| {name} | {rate:,.0f} | {1e6 / rate:.2f} | {rate / base:.1f}x |")

    ours = results["docrl `reward.metrics.anls_score`"]
    plain = results["plain Python DP + official rule"]
    assert ours == plain, "docrl disagrees with the plain-Python official formula"
    if "`anls` PyPI package" in results:
        theirs = results["`anls` PyPI package"]
        diff = [(a, b) for a, b in zip(ours, theirs) if a != b]
        print(f"\nagreement: docrl == plain official formula on all {len(ours)} pairs; "
              f"differs from the `anls` package (normalized lengths, 0.5 excluded) on {len(diff)}")
    rate = rows[len(methods) - 1][1]
    print(f"targets: >= 10x plain Python: {rate / base:.1f}x {'OK' if rate / base >= 10 else 'MISSED'}; "
          f">= 100,000 pairs/s: {rate:,.0f} {'OK' if rate >= 100_000 else 'MISSED'}")


def actor_round_trip(reqs, cfg, repeats):
    import ray

    from cluster.ray_setup import init_ray
    from reward.group import RewardPool

    init_ray(num_cpus=2)
    pool = RewardPool(cfg.model_copy(update={"num_actors": 1, "batch_size": len(reqs)}), num_cpus_per_actor=1)
    pool.score(reqs[:10])  # warm
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        pool.score(reqs)
        times.append(time.perf_counter() - t)
    pool.shutdown()
    ray.shutdown()
    return (f"one RewardActor round trip ({len(reqs)} requests, submit+collect)", len(reqs) / statistics.median(times))


if __name__ == "__main__":
    main()

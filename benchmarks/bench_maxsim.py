"""MaxSim benchmark: docrl's masked, chunked MaxSim vs colpali-engine's ``score_multi_vector``.

    .venv/bin/python benchmarks/bench_maxsim.py            # 32 queries x 1,000 pages x 600-800 tokens x 128
    .venv/bin/python benchmarks/bench_maxsim.py --quick    # 8 queries x 200 pages x 150-200 tokens x 128
    .venv/bin/python benchmarks/bench_maxsim.py --threads 1

On a shared 2-core machine the default 2 threads are at the mercy of other processes: every
parallel torch op ends in an OpenMP barrier that waits for a descheduled thread (seen: 5-10 ms per
op instead of 0.2 ms). Compare medians from a quiet moment, or use --threads 1.

Data: seeded random L2-normalised vectors. Query lengths uniform in [16, 32] (ColQwen2 queries:
prompt + text + augmentation tokens), page lengths uniform in the range above. Each side gets the
data as it sees it in practice: docrl the padded batch as an encoder returns it (LEFT padding with
NaN in the padded slots, as ColQwen2 + SDPA produces) plus its mask; colpali-engine the list of
per-page tensors of their true lengths (it zero-pads internally, no mask).

Correctness is checked against an independent float64 reference (per page: valid query tokens
times that page's valid tokens, max, per-query sum; no padding involved). Note: with random unit
vectors and hundreds of tokens per page, every page has some positive similarity, so
colpali-engine's zero-padding flaw (a padded 0 beating real negative similarities) does not show
here; the test suite shows it on a constructed case. The table says how many scores differ.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from retriever.maxsim import maxsim_scores, prepare_pages, rerank_shortlist, topk_pages  # noqa: E402

K = 5


def make_data(num_q, num_p, qlen, plen, dim, seed):
    gen = torch.Generator().manual_seed(seed)
    qlens = torch.randint(qlen[0], qlen[1] + 1, (num_q,), generator=gen)
    plens = torch.randint(plen[0], plen[1] + 1, (num_p,), generator=gen)
    qs = [torch.nn.functional.normalize(torch.randn(int(n), dim, generator=gen), dim=-1) for n in qlens]
    ps = [torch.nn.functional.normalize(torch.randn(int(n), dim, generator=gen), dim=-1) for n in plens]
    return qs, ps


def left_pad_with_nan(vectors):
    lmax = max(v.shape[0] for v in vectors)
    out = torch.full((len(vectors), lmax, vectors[0].shape[1]), float("nan"))
    mask = torch.zeros(len(vectors), lmax, dtype=torch.bool)
    for i, v in enumerate(vectors):
        out[i, lmax - v.shape[0]:] = v
        mask[i, lmax - v.shape[0]:] = True
    return out, mask


@torch.inference_mode()
def reference_scores(qs, ps):
    """Independent float64 MaxSim: no padding, no masks, one page at a time."""
    qflat = torch.cat(qs).double()
    seg = torch.repeat_interleave(torch.arange(len(qs)), torch.tensor([q.shape[0] for q in qs]))
    out = torch.zeros(len(qs), len(ps), dtype=torch.float64)
    for j, page in enumerate(ps):
        best = (qflat @ page.double().T).amax(dim=1)
        out[:, j] = torch.zeros(len(qs), dtype=torch.float64).index_add_(0, seg, best)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small size (a few seconds)")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats per method (median reported)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads for every method (default: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        num_q, num_p, plen = 8, 200, (150, 200)
    else:
        num_q, num_p, plen = 32, 1000, (600, 800)
    qlen, dim = (16, 32), 128

    from colpali_engine.utils.processing_utils import BaseVisualRetrieverProcessor

    qs, ps = make_data(num_q, num_p, qlen, plen, dim, args.seed)
    q_pad, q_mask = left_pad_with_nan(qs)
    p_pad, p_mask = left_pad_with_nan(ps)
    pids = [f"p{i}" for i in range(num_p)]
    tokens = sum(p.shape[0] for p in ps)
    print(f"# MaxSim: {num_q} queries ({sum(q.shape[0] for q in qs)} tokens, {qlen[0]}-{qlen[1]} each) x "
          f"{num_p} pages ({tokens} tokens, {plen[0]}-{plen[1]} each, padded to {p_pad.shape[1]}) x {dim} dims")
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, median of {args.repeats} (min in brackets)\n")

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the reference is many small ops: one thread is immune to contention
    t_ref0 = time.perf_counter()
    ref = reference_scores(qs, ps)
    t_ref = time.perf_counter() - t_ref0
    torch.set_num_threads(threads)
    ref_ids = [[p for p, _ in r] for r in topk_pages(ref, pids, K)]

    def colpali():
        return BaseVisualRetrieverProcessor.score_multi_vector(qs, ps, device="cpu")

    t_prep32 = time.perf_counter()
    prep32 = prepare_pages(p_pad, p_mask, dtype=torch.float32)
    t_prep32 = time.perf_counter() - t_prep32
    t_prep16 = time.perf_counter()
    prep16 = prepare_pages(p_pad, p_mask, dtype=torch.bfloat16)
    t_prep16 = time.perf_counter() - t_prep16

    methods = [
        ("colpali-engine score_multi_vector (fp32)", colpali),
        ("docrl maxsim_scores fp32", lambda: maxsim_scores(q_pad, q_mask, p_pad, p_mask)),
        ("docrl maxsim_scores bf16", lambda: maxsim_scores(q_pad, q_mask, p_pad, p_mask, dtype=torch.bfloat16)),
        ("docrl maxsim_scores bf16 rescore=True",
         lambda: maxsim_scores(q_pad, q_mask, p_pad, p_mask, dtype=torch.bfloat16, rescore=True)),
        (f"docrl prepared fp32 (prepare once: {t_prep32:.2f} s)", lambda: maxsim_scores(q_pad, q_mask, prep32, None)),
        (f"docrl prepared bf16 (prepare once: {t_prep16:.2f} s)", lambda: maxsim_scores(q_pad, q_mask, prep16, None)),
        ("docrl prepared bf16 + fp32 re-rank of a 32-page shortlist (the index's bf16 search)",
         lambda: rerank_shortlist(maxsim_scores(q_pad, q_mask, prep16, None), qs, ps, 32)),
    ]
    # Round-robin repeats: a burst of load from other processes then spreads over all methods
    # instead of hitting every repeat of one method.
    times = {name: [] for name, _ in methods}
    results = {name: fn() for name, fn in methods}  # warm-up (allocator, BLAS init) + results
    for _ in range(args.repeats):
        for name, fn in methods:
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    rows = [(name, statistics.median(times[name]), min(times[name]), results[name]) for name, _ in methods]

    ours32 = results["docrl maxsim_scores fp32"]
    base = rows[0][1]
    print("| method | seconds | speedup vs colpali-engine | top-5 identical to exact ref | top-1 = exact ref "
          "| top-1 = docrl fp32 | max abs score err vs exact | scores off by > 1e-4 |")
    print("|---|---|---|---|---|---|---|---|")
    for name, med, best, scores in rows:
        got_ids = [[p for p, _ in r] for r in topk_pages(scores, pids, K)]
        same_top5 = sum(g == r for g, r in zip(got_ids, ref_ids)) / num_q
        top1_ref = (scores.argmax(1) == ref.argmax(1)).float().mean().item()
        top1_32 = (scores.argmax(1) == ours32.argmax(1)).float().mean().item()
        err = (scores.double() - ref).abs()
        print(f"| {name} | {med:.3f} ({best:.3f}) | {base / med:.2f}x | {same_top5:.1%} | {top1_ref:.1%} | "
              f"{top1_32:.1%} | {err.max().item():.2e} | {int((err > 1e-4).sum())} / {err.numel()} |")
    gaps = ref.topk(2, dim=1).values if num_p > 1 else None
    print(f"\nexact reference (float64, per page, no padding, 1 thread): {t_ref:.2f} s; "
          f"top-{K} lists compared by page id and order (ties by page index).")
    if gaps is not None:
        gap = gaps[:, 0] - gaps[:, 1]
        print(f"exact top-1/top-2 score gap over the queries: min {gap.min().item():.2e}, median "
              f"{gap.median().item():.2e} (random vectors give near-ties: compare with the bf16 errors above)")


if __name__ == "__main__":
    main()

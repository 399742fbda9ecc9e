"""The page index at scale: streaming-ingest memory, and two-stage search against exact search.

    .venv/bin/python benchmarks/bench_index_scale.py                  # ingest 1,000 + 10,000 pages; search 10,000 + 100,000
    .venv/bin/python benchmarks/bench_index_scale.py --quick          # ingest 200 + 1,000; search 2,000 + 10,000
    .venv/bin/python benchmarks/bench_index_scale.py --search-pages 10000 --skip-ingest

Every measurement runs in its own subprocess, whose peak RSS (getrusage) and resident anonymous
memory (RssAnon in /proc/self/status: what the process itself holds, not the page cache of
memory-mapped files) are reported.

Streaming ingest (`RetrieverGroup.build`, what `docrl index` runs): the tiny ColQwen2 retriever
(random weights) on one Ray actor embeds N synthetic page images (small PNGs, 112x112 pixels =
16 visual tokens each, so that 10,000 pages take minutes on 2 cores, not hours). Reported: pages/s
and the peak RSS of the driver and of the actor; streaming holds memory flat when the peaks at
1,000 and 10,000 pages are the same within noise.

Search: synthetic page vectors, 600-800 tokens a page (uniform) x 128 dims, stored as float16
segments of 1,000 pages (`retriever.vector_dtype: float16`) with 64 pooled vectors a page,
written by the index's own `write_segment`. A page is made of 20-100 "concepts" (uniform; unit
directions drawn Zipf-like from 4,096) plus background: half its tokens are one of 6 background
directions + small noise, the rest a concept of the page + noise (cosine ~0.86 to it), so many
pages hold more distinct directions than they get pooled vectors. A query names 6 concepts of a
random page (12 tokens, same noise) plus 10 shared "prompt" tokens. This clustered structure is
what token pooling exploits, and real ColPali pages have it (background patches, repeated
words); on unstructured uniform-random vectors no compact first stage keeps exact search's top
10 (`--random` measures that case: expect low recall). Vectors are synthetic: the recall here is
the recall on this generator, not a measurement on DocVQA.

Exact search (the baseline) and two-stage search (pooled first stage, then exact MaxSim of a
shortlist) run in the same process on the same memory-mapped index. Latency is per single query
(one question at a time, as Serve sees it), after one warm-up query; the exact baseline at
100,000 pages reads all 18 GB from disk per query (they do not fit in this machine's page
cache), so only a few queries are timed. Recall@10 = |two-stage top 10 & exact top 10| / 10,
averaged over the queries, exact top 10 from one batched exact pass.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DIM = 128
CONCEPTS, BACKGROUNDS, PROMPT_TOKENS = 4096, 6, 10
MIN_CONCEPTS, MAX_CONCEPTS = 20, 100  # distinct concepts on a page: more than the pooled vectors on many
SEGMENT_PAGES = 1000


def rss_now() -> dict[str, float]:
    """Resident memory of this process now, in MiB: anonymous (its own) and file-backed (mapped files)."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile", "VmRSS"):
            fields[key] = int(value.split()[0]) / 1024
    return fields


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------------------------
# Synthetic vectors


def _world(seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    return tuple(torch.nn.functional.normalize(torch.randn(n, DIM, generator=g), dim=-1)
                 for n in (CONCEPTS, BACKGROUNDS, PROMPT_TOKENS))


def synthetic_segment(number: int, pages: int, seed: int, random_vectors: bool):
    """(vectors per page, concepts [pages, 40]) of segment `number`: deterministic from (seed, number)."""
    import torch

    concepts, backgrounds, _ = _world(seed)
    g = torch.Generator().manual_seed(seed * 1_000_003 + number)
    lengths = torch.randint(600, 801, (pages,), generator=g)
    total = int(lengths.sum())
    if random_vectors:
        flat = torch.nn.functional.normalize(torch.randn(total, DIM, generator=g), dim=-1)
        return list(torch.split(flat, lengths.tolist())), None
    zipf = 1.0 / torch.arange(1, CONCEPTS + 1, dtype=torch.float64) ** 0.8
    page_concepts = torch.multinomial(zipf, pages * MAX_CONCEPTS, replacement=True, generator=g).view(pages, -1)
    per_page = torch.randint(MIN_CONCEPTS, MAX_CONCEPTS + 1, (pages,), generator=g)
    page_concepts[torch.arange(MAX_CONCEPTS)[None, :] >= per_page[:, None]] = -1  # a page uses its first per_page
    page_of_token = torch.repeat_interleave(torch.arange(pages), lengths)
    background = torch.rand(total, generator=g) < 0.5
    slot = (torch.rand(total, generator=g) * per_page[page_of_token]).long()
    direction = torch.where(background[:, None], backgrounds[torch.randint(0, BACKGROUNDS, (total,), generator=g)],
                            concepts[page_concepts[page_of_token, slot]])
    noise = torch.where(background[:, None], 0.15, 0.6) / DIM ** 0.5
    flat = torch.nn.functional.normalize(direction + noise * torch.randn(total, DIM, generator=g), dim=-1)
    return list(torch.split(flat, lengths.tolist())), page_concepts


def synthetic_queries(count: int, num_pages: int, seed: int, concepts_of, random_vectors: bool):
    import torch

    concepts, _, prompt = _world(seed)
    g = torch.Generator().manual_seed(seed + 7)
    queries = []
    for _ in range(count):
        if random_vectors:
            queries.append(torch.nn.functional.normalize(torch.randn(22, DIM, generator=g), dim=-1))
            continue
        target = concepts_of(int(torch.randint(num_pages, (1,), generator=g)))
        target = target[target >= 0]
        named = target[torch.randperm(len(target), generator=g)[:6]].repeat(2)
        tokens = torch.cat([prompt + 0.3 / DIM ** 0.5 * torch.randn(PROMPT_TOKENS, DIM, generator=g),
                            concepts[named] + 0.6 / DIM ** 0.5 * torch.randn(len(named), DIM, generator=g)])
        queries.append(torch.nn.functional.normalize(tokens, dim=-1))
    return queries


# ----------------------------------------------------------------------------------------------
# Phases (each in its own process)


def phase_build(args) -> dict:
    """Write a synthetic index of args.pages pages, segment by segment."""
    import numpy as np
    import torch

    from retriever.index import Manifest, segment_name, write_manifest, write_segment
    from retriever.pooling import Pooling

    torch.set_num_threads(args.build_threads)
    out = Path(args.dir)
    out.mkdir(parents=True)
    manifest = Manifest({"model": "synthetic", "family": "colqwen2", "dim": DIM, "max_pixels": 0, "min_pixels": 0})
    all_concepts, tokens, t_gen, t_write = [], 0, 0.0, 0.0
    start = time.perf_counter()
    for number, lo in enumerate(range(0, args.pages, SEGMENT_PAGES)):
        n = min(SEGMENT_PAGES, args.pages - lo)
        t0 = time.perf_counter()
        vectors, concepts = synthetic_segment(number, n, args.seed, args.random)
        t1 = time.perf_counter()
        ids = [f"doc{i:06d}/p1" for i in range(lo, lo + n)]
        entry = write_segment(out, segment_name(number), ids, vectors, dtype="float16",
                              pooling=Pooling(args.pooled, args.similarity))
        t_gen, t_write = t_gen + t1 - t0, t_write + time.perf_counter() - t1
        manifest.add_segment(entry, {pid: {"doc_id": pid[:9], "page_no": 1, "source": "synthetic"} for pid in ids})
        tokens += sum(v.shape[0] for v in vectors)
        if concepts is not None:
            all_concepts.append(concepts.numpy().astype(np.int16))
        del vectors
        if number % 10 == 9:
            print(f"  built {lo + n}/{args.pages} pages ({(lo + n) / (time.perf_counter() - start):.0f} pages/s)",
                  file=sys.stderr, flush=True)
    write_manifest(out, manifest)
    if all_concepts:
        np.save(out / "concepts.npy", np.concatenate(all_concepts))
    disk = sum(f.stat().st_size for f in out.glob("segment-*"))
    return {"pages": args.pages, "tokens": tokens, "seconds_generate": t_gen, "seconds_pool_and_write": t_write,
            "disk_gib": disk / 2 ** 30, "peak_rss_mib": peak_rss_mib()}


def phase_search(args) -> dict:
    import numpy as np
    import torch

    from retriever.index import load_index
    from retriever.pooling import Pooling

    torch.set_num_threads(args.threads)
    out = Path(args.dir)
    before = rss_now()
    t0 = time.perf_counter()
    index = load_index(out, pooling=Pooling(args.pooled, args.similarity))
    t_load = time.perf_counter() - t0
    after_load = rss_now()
    concepts = np.load(out / "concepts.npy", mmap_mode="r") if (out / "concepts.npy").exists() else None
    queries = synthetic_queries(args.queries, len(index), args.seed,
                                (lambda p: torch.from_numpy(np.array(concepts[p], dtype=np.int64))), args.random)

    def timed(fn):
        t = time.perf_counter()
        result = fn()
        return result, time.perf_counter() - t

    # the first two-stage query reads the pooled first stage into memory
    _, t_first = timed(lambda: index.search(queries[:1], 10, method="two_stage", shortlist=args.shortlist))
    after_pooled = rss_now()
    two_stage, two_lat = [], []
    for q in queries:
        r, dt = timed(lambda q=q: index.search([q], 10, method="two_stage", shortlist=args.shortlist))
        two_stage.append([p for p, _ in r[0]])
        two_lat.append(dt)
    shortlists = {}
    for n in args.recall_shortlists:  # the recall a smaller or larger shortlist would give
        shortlists[n] = [[p for p, _ in r] for r in index.search(queries, 10, method="two_stage", shortlist=n)]
    exact_lat = []
    for q in queries[:args.exact_timed + 1]:
        _, dt = timed(lambda q=q: index.search([q], 10))
        exact_lat.append(dt)
    exact_lat = exact_lat[1:]  # the first is a warm-up
    exact, t_exact_batch = timed(lambda: [[p for p, _ in r] for r in index.search(queries, 10)])

    def recall(got):
        return sum(len(set(a) & set(b)) for a, b in zip(got, exact)) / (10 * len(exact))

    def pct(values, q):
        return float(np.percentile(values, q))

    return {"pages": len(index), "queries": len(queries), "query_tokens": int(np.mean([len(q) for q in queries])),
            "load_s": t_load, "first_two_stage_s": t_first,
            "rss_before_mib": before, "rss_after_load_mib": after_load, "rss_after_pooled_mib": after_pooled,
            "rss_end_mib": rss_now(), "peak_rss_mib": peak_rss_mib(),
            "pooled_mib": sum(b.pooled[0].numel() * 2 for b in index._blocks if b.pooled is not None) / 2 ** 20,
            "pooled_per_page": sum(b.pooled[0].shape[0] for b in index._blocks if b.pooled is not None) / len(index),
            "two_stage_p50": pct(two_lat, 50), "two_stage_p95": pct(two_lat, 95),
            "exact_p50": pct(exact_lat, 50), "exact_p95": pct(exact_lat, 95), "exact_timed": len(exact_lat),
            "exact_batched_s": t_exact_batch, "recall@10": recall(two_stage),
            "recall_by_shortlist": {str(n): recall(r) for n, r in shortlists.items()}}


def phase_ingest(args) -> dict:
    """Stream args.pages small PNG pages through a one-actor RetrieverGroup into an index."""
    import numpy as np
    import ray
    from PIL import Image

    from cluster.ray_setup import init_ray
    from docvqa.sample import Page
    from docvqa.tiny_models import build_tiny_models
    from retriever.config import RetrieverConfig
    from retriever.group import RetrieverGroup

    work = Path(args.dir)
    pages_dir = work / "pages"
    pages_dir.mkdir(parents=True)
    rng = np.random.default_rng(args.seed)
    pages = []
    for i in range(args.pages):  # light text-like blocks on white, different on every page
        pixels = np.full((112, 112, 3), 255, np.uint8)
        for _ in range(6):
            y, x = rng.integers(0, 100, 2)
            pixels[y:y + 6, x:x + rng.integers(10, 60)] = rng.integers(0, 120)
        path = pages_dir / f"p{i:06d}.png"
        Image.fromarray(pixels).save(path)
        pages.append(Page(f"doc{i:06d}/p1", f"doc{i:06d}", 1, image_path=str(path)))
    models = build_tiny_models(ROOT / "artifacts" / "tiny-models")
    init_ray(num_cpus=2, num_gpus=0)
    cfg = RetrieverConfig(model=str(models["retriever"]), num_actors=1, num_cpus_per_actor=2, embed_batch_size=16,
                          segment_pages=256)
    group = RetrieverGroup(str(models["retriever"]), cfg, timeout_s=900)
    group.ready()
    driver_before = peak_rss_mib()
    t0 = time.perf_counter()
    result = group.build(pages, work / "index")
    seconds = time.perf_counter() - t0

    def actor_peak(actor):
        import resource as r

        return r.getrusage(r.RUSAGE_SELF).ru_maxrss / 1024

    actor_peak_mib = ray.get(group.actors[0].__ray_call__.remote(lambda self: actor_peak(self)), timeout=60)
    group.shutdown()
    ray.shutdown()
    return {"pages": args.pages, "indexed": result["indexed"], "seconds": seconds, "pages_per_s": result["indexed"] / seconds,
            "driver_peak_before_build_mib": driver_before, "driver_peak_mib": peak_rss_mib(),
            "actor_peak_mib": actor_peak_mib,
            "segments": len(list((work / "index").glob("segment-*")))}


PHASES = {"build": phase_build, "search": phase_search, "ingest": phase_ingest}


def run_phase(phase: str, **kwargs) -> dict:
    argv = [sys.executable, __file__, "--phase", phase]
    for key, value in kwargs.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            argv += [flag] if value else []
        elif isinstance(value, (list, tuple)):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    proc = subprocess.run(argv, cwd=ROOT, stdout=subprocess.PIPE, text=True, timeout=4 * 3600, check=False)
    if proc.returncode:
        raise SystemExit(f"phase {phase} {kwargs} failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    ap.add_argument("--pages", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="small sizes (minutes)")
    ap.add_argument("--ingest-pages", type=int, nargs="*", default=None, help="streaming-ingest sizes (default 1000 10000)")
    ap.add_argument("--search-pages", type=int, nargs="*", default=None, help="search sizes (default 10000 100000)")
    ap.add_argument("--skip-ingest", action="store_true")
    ap.add_argument("--queries", type=int, default=30)
    ap.add_argument("--exact-timed", type=int, default=None, help="single exact queries timed (default 10, 3 at 100k+)")
    ap.add_argument("--shortlist", type=int, default=1024)
    ap.add_argument("--recall-shortlists", type=int, nargs="*", default=[256, 512, 2048])
    ap.add_argument("--pooled", type=int, default=128, help="pooled vectors a page, at most (retriever.pooled_vectors)")
    ap.add_argument("--similarity", type=float, default=0.5, help="retriever.pooling_similarity")
    ap.add_argument("--random", action="store_true", help="uniform random vectors instead of clustered ones")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the search phases")
    ap.add_argument("--build-threads", type=int, default=1,
                    help="torch threads of the build phases (pooling is many small ops: on a shared machine each "
                         "waits at a thread barrier; one thread was 5x faster here)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None, help="where the indexes are written (default: a temp dir, removed)")
    ap.add_argument("--keep", action="store_true", help="keep the search indexes in --workdir, and reuse ones found there")
    args = ap.parse_args()
    if args.phase:
        print(json.dumps(PHASES[args.phase](args)), flush=True)
        return

    ingest_sizes = args.ingest_pages if args.ingest_pages is not None else ([200, 1000] if args.quick else [1000, 10000])
    search_sizes = args.search_pages if args.search_pages is not None else ([2000, 10000] if args.quick else [10000, 100000])
    work = Path(args.workdir or tempfile.mkdtemp(prefix="docrl-bench-scale-"))
    work.mkdir(parents=True, exist_ok=True)  # a --workdir that does not exist yet
    def index_dir(n: int) -> Path:
        return work / f"search-{n}{'-random' if args.random else ''}-k{args.pooled}-s{args.similarity:g}"

    to_build = [n for n in search_sizes if not (args.keep and (index_dir(n) / "build.json").exists())]
    need = (sum(to_build) if args.keep else max(to_build, default=0)) * 700 * DIM * 2 * 1.1 / 2 ** 30
    free = shutil.disk_usage(work).free / 2 ** 30
    if free < need + 5:
        raise SystemExit(f"{work}: {free:.0f} GiB free, the largest index needs ~{need:.0f} GiB (+5 spare); "
                         "pass --workdir elsewhere or fewer --search-pages")
    print(f"# index at scale: torch threads {args.threads} (search), {args.build_threads} (build), {os.cpu_count()} CPUs, "
          f"work dir {work} ({free:.0f} GiB free)\n")
    try:
        if not args.skip_ingest:
            print("## Streaming ingest (tiny ColQwen2, 1 actor, 112x112 PNG pages = 16 visual tokens, 256 pages a segment)\n")
            print("| pages | indexed | pages/s | driver peak RSS (MiB) | actor peak RSS (MiB) | segments |")
            print("|---:|---:|---:|---:|---:|---:|")
            for n in ingest_sizes:
                r = run_phase("ingest", dir=work / f"ingest-{n}", pages=n, seed=args.seed)
                print(f"| {n:,} | {r['indexed']:,} | {r['pages_per_s']:.1f} | {r['driver_peak_mib']:.0f} | "
                      f"{r['actor_peak_mib']:.0f} | {r['segments']} |", flush=True)
                shutil.rmtree(work / f"ingest-{n}", ignore_errors=True)
            print()
        print(f"## Search: {'uniform random' if args.random else 'clustered'} synthetic vectors, 600-800 tokens x {DIM} "
              f"dims, float16 segments, at most {args.pooled} pooled vectors a page (pooling similarity "
              f"{args.similarity:g}), shortlist {args.shortlist}, "
              f"{args.queries} queries, top 10\n")
        rows = []
        for n in search_sizes:
            where = index_dir(n)
            built = where / "build.json"
            if args.keep and built.exists():
                b = json.loads(built.read_text())
            else:
                shutil.rmtree(where, ignore_errors=True)
                b = run_phase("build", dir=where, pages=n, seed=args.seed, pooled=args.pooled,
                              similarity=args.similarity, build_threads=args.build_threads, random=args.random)
                built.write_text(json.dumps(b))
            timed = args.exact_timed if args.exact_timed is not None else (3 if n >= 100_000 else 10)
            s = run_phase("search", dir=where, seed=args.seed, pooled=args.pooled, similarity=args.similarity,
                          threads=args.threads, random=args.random,
                          queries=args.queries, shortlist=args.shortlist, exact_timed=timed,
                          recall_shortlists=args.recall_shortlists)
            rows.append((n, b, s))
            print(f"  {n:,} pages: {json.dumps({'build': b, 'search': s})}", file=sys.stderr, flush=True)
            if not args.keep:
                shutil.rmtree(where, ignore_errors=True)
        print("| pages | tokens | on disk (GiB) | build pages/s | RSS after load (MiB, anon) | + pooled first stage "
              "(MiB, anon) | peak RSS incl. mapped pages (MiB) | exact p50 / p95 (s) | two-stage p50 / p95 (s) | "
              "speedup p50 | recall@10 |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for n, b, s in rows:
            rate = n / (b["seconds_generate"] + b["seconds_pool_and_write"])
            print(f"| {n:,} | {b['tokens']:,} | {b['disk_gib']:.1f} | {rate:.0f} | "
                  f"{s['rss_after_load_mib']['RssAnon']:.0f} | {s['rss_after_pooled_mib']['RssAnon']:.0f} | "
                  f"{s['peak_rss_mib']:.0f} | {s['exact_p50']:.3f} / {s['exact_p95']:.3f} (n={s['exact_timed']}) | "
                  f"{s['two_stage_p50']:.3f} / {s['two_stage_p95']:.3f} | {s['exact_p50'] / s['two_stage_p50']:.1f}x | "
                  f"{s['recall@10']:.3f} |")
        print("\nrecall@10 by shortlist (same queries, same first stage):\n")
        print("| pages | " + " | ".join(f"shortlist {k}" for k in [*args.recall_shortlists, args.shortlist]) + " |")
        print("|---:|" + "---:|" * (len(args.recall_shortlists) + 1))
        for n, _, s in rows:
            cells = [s["recall_by_shortlist"][str(k)] for k in args.recall_shortlists] + [s["recall@10"]]
            print(f"| {n:,} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
        for n, b, s in rows:
            print(f"\n{n:,} pages: build {b['seconds_generate']:.0f}s generating + {b['seconds_pool_and_write']:.0f}s "
                  f"pooling and writing; load (map) {s['load_s']:.2f}s; first two-stage query (reads the pooled "
                  f"vectors: {s['pooled_per_page']:.1f} a page, {s['pooled_mib']:.0f} MiB) {s['first_two_stage_s']:.2f}s; "
                  f"exact pass over all "
                  f"{s['queries']} queries at once {s['exact_batched_s']:.1f}s; RSS anon before load "
                  f"{s['rss_before_mib']['RssAnon']:.0f} MiB, at the end {s['rss_end_mib']['RssAnon']:.0f} MiB "
                  f"(file-backed {s['rss_end_mib']['RssFile']:.0f} MiB: page cache of the mapped segments)")
    finally:
        if args.workdir is None and not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Index throughput of the tiny ColQwen2 retriever: pages embedded per second, batched against
one page at a time (the baseline, measured in the same run).

    .venv/bin/python benchmarks/bench_index.py [--pages 48] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pages", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from docvqa.loaders import load_docvqa_json
    from docvqa.synthetic import generate_corpus
    from docvqa.tiny_models import build_tiny_models
    from retriever.encoder import PageEncoder

    models = build_tiny_models(ROOT / "artifacts" / "tiny-models")
    work = Path(tempfile.mkdtemp())
    files = generate_corpus(work, num_documents=args.pages, seed=0, level="realistic", val_fraction=0.1)
    pages = list(load_docvqa_json(files["train"]).pages.values())[: args.pages]
    images = [p.load_image() for p in pages]
    encoder = PageEncoder(str(models["retriever"]))
    encoder.embed_images(images[:4], batch_size=4, progress=False)  # warm-up
    print(f"{len(images)} synthetic letter pages (612x792, at most {encoder.settings()['max_pixels'] // 784} visual tokens), "
          f"tiny ColQwen2 fp32, median of {args.repeats}\n")
    print("| batch size | pages/s | vs batch 1 |")
    print("|---:|---:|---:|")
    base = None
    for bs in (1, 4, 8, 16):
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            encoder.embed_images(images, batch_size=bs, progress=False)
            times.append(time.perf_counter() - t0)
        rate = len(images) / statistics.median(times)
        base = base or rate
        print(f"| {bs} | {rate:.1f} | {rate / base:.2f}x |", flush=True)


if __name__ == "__main__":
    main()

"""The Serve endpoint under load: requests/s and p50/p95 latency of /v1/docqa and of
/v1/chat/completions (one page image + a question) at concurrency 1, 8 and 32, on the tiny model
served as a LoRA checkpoint over a synthetic index. The baseline is concurrency 1 in the same run;
the ratio shows what sharing engine steps between concurrent requests buys. Also the time to the
first streamed token.

    .venv/bin/python benchmarks/bench_serve.py [--quick] [--requests 64] [--max-tokens 16]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def start_server(work: Path, max_tokens: int) -> tuple[str, list[str], str]:
    """Tiny models, a synthetic corpus and its index, a LoRA checkpoint; Serve on loopback.
    Returns (base URL, questions, a page image as a data: URL)."""
    import torch
    from ray import serve
    from transformers import Qwen2VLForConditionalGeneration

    from cluster.config import load_config
    from cluster.ray_setup import init_ray
    from common.ray_helpers import free_port
    from deploy.app import build_application, wait_until_running
    from docvqa.loaders import load_docvqa_json
    from docvqa.synthetic import generate_corpus
    from docvqa.tiny_models import build_tiny_models
    from learner.types import ExportedWeights
    from retriever.config import RetrieverConfig
    from retriever.group import RetrieverGroup
    from rollout.parity import random_lora_adapter
    from rollout.policy import write_policy

    models = build_tiny_models(ROOT / "artifacts" / "tiny-models")
    files = generate_corpus(work / "data", num_documents=16, seed=0, level="realistic", val_fraction=0.1)
    corpus = load_docvqa_json(files["train"])
    init_ray(num_cpus=4)
    group = RetrieverGroup(str(models["retriever"]), RetrieverConfig(model=str(models["retriever"])))
    group.build(list(corpus.pages.values()), work / "index")
    group.shutdown()
    policy = str(models["policy"])
    random_lora_adapter(Qwen2VLForConditionalGeneration.from_pretrained(policy, dtype=torch.float32), work / "adapter", r=8)
    write_policy(work / "ckpt" / "policy", policy, ExportedWeights(1, "lora", adapter_dir=str(work / "adapter")), step=1)

    port = free_port()
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [
        f"run.output_dir={work}",  # the feedback recorder's SQLite file, not the tiny run's
        f"retriever.model={models['retriever']}", f"serve.port={port}", "serve.policy.num_cpus=2",
        f"rollout.eval_sampling.max_tokens={max_tokens}", "rollout.max_model_len=2048"])
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run_many([serve.api.RunTarget(build_application(cfg, str(work / "ckpt"), str(work / "index")), name="docrl")],
                   wait_for_ingress_deployment_creation=False, wait_for_applications_running=False)
    wait_until_running(["docrl"], timeout_s=600)
    page = next(iter(corpus.pages.values())).load_image()
    buf = io.BytesIO()
    page.save(buf, format="PNG")
    return (f"http://127.0.0.1:{port}", [s.question for s in corpus.samples],
            "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())


async def run_level(client, make_request, concurrency: int, total: int) -> tuple[float, list[float]]:
    """`total` requests, at most `concurrency` in flight. Returns (wall seconds, latencies)."""
    gate = asyncio.Semaphore(concurrency)
    latencies: list[float] = []

    async def one(i: int) -> None:
        async with gate:
            t0 = time.perf_counter()
            url, body = make_request(i)
            r = await client.post(url, json=body)
            if r.status_code != 200:
                raise RuntimeError(f"request {i}: {r.status_code} {r.text[:300]}")
            latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(total)))
    return time.perf_counter() - t0, latencies


async def first_token_seconds(client, url: str, image: str, max_tokens: int, repeats: int) -> tuple[float, float]:
    """Median seconds to the first streamed content event, and to the end of the stream."""
    firsts, totals = [], []
    body = {"model": "docrl", "stream": True, "max_tokens": max_tokens, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": "What is the date?"}]}]}
    for _ in range(repeats):
        t0, first = time.perf_counter(), None
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
            async for line in r.aiter_lines():
                if first is None and '"content": "' in line and '"content": ""' not in line:
                    first = time.perf_counter() - t0
        firsts.append(first if first is not None else float("nan"))
        totals.append(time.perf_counter() - t0)
    return statistics.median(firsts), statistics.median(totals)


def pct(values: list[float], q: float) -> float:
    """The value at fraction `q` of the sorted values, the nearest rank (NaN for none): the one
    percentile of every Serve benchmark."""
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))] if values else float("nan")


async def bench(url: str, questions: list[str], image: str, args) -> None:
    import httpx

    def docqa(i):
        return url + "/v1/docqa", {"question": questions[i % len(questions)], "k": 3}

    def chat(i):
        return url + "/v1/chat/completions", {"model": "docrl", "max_tokens": args.max_tokens, "temperature": 0,
                                              "messages": [{"role": "user", "content": [
                                                  {"type": "image_url", "image_url": {"url": image}},
                                                  {"type": "text", "text": questions[i % len(questions)]}]}]}

    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        for make in (docqa, chat):
            await run_level(client, make, 4, 8)  # warm-up
        print("| endpoint | concurrency | requests | requests/s | p50 ms | p95 ms | req/s vs concurrency 1 |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for name, make in (("docqa", docqa), ("chat + image", chat)):
            base = None
            for concurrency in (1, 8, 32):
                total = max(args.requests, 2 * concurrency) if concurrency > 1 else max(8, args.requests // 4)
                wall, lat = await run_level(client, make, concurrency, total)
                rate = total / wall
                base = base or rate
                print(f"| {name} | {concurrency} | {total} | {rate:.1f} | {1000 * pct(lat, 0.5):.0f} | "
                      f"{1000 * pct(lat, 0.95):.0f} | {rate / base:.2f}x |", flush=True)
        ttft, total = await first_token_seconds(client, url, image, args.max_tokens, repeats=5)
        print(f"\nStreaming chat (concurrency 1, {args.max_tokens} tokens, median of 5): first token after "
              f"{1000 * ttft:.0f} ms, stream complete after {1000 * total:.0f} ms")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer requests per level")
    ap.add_argument("--requests", type=int, default=64, help="requests per level at concurrency 8 and 32")
    ap.add_argument("--max-tokens", type=int, default=16)
    args = ap.parse_args()
    if args.quick:
        args.requests = 32
    from ray import serve

    work = Path(tempfile.mkdtemp(prefix="docrl-bench-serve-"))
    t0 = time.perf_counter()
    url, questions, image = start_server(work, args.max_tokens)
    print(f"Serve on the tiny model (LoRA checkpoint, fp32), {len(questions)} synthetic questions, index of "
          f"synthetic pages; server up in {time.perf_counter() - t0:.0f}s; docqa k=3, one page read, greedy, "
          f"max {args.max_tokens} tokens; chat: one 612x792 page image + the question, greedy, max {args.max_tokens} tokens\n")
    try:
        asyncio.run(bench(url, questions, image, args))
    finally:
        serve.shutdown()


if __name__ == "__main__":
    main()

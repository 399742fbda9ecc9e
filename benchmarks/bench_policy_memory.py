"""The served policy's engine alone, under glibc's malloc and under tcmalloc: resident memory as
it serves. `serve.policy.allocator` (tcmalloc by default for a CPU replica) rests on this.

    .venv/bin/python benchmarks/bench_policy_memory.py [--requests 15000] [--every 3000] [--quick]

Each allocator runs in its own process (LD_PRELOAD must be set before the process starts), both
at once, so the machine's load is the same for both: `deploy.policy_engine.InProcessPolicy` on the
tiny policy, `--concurrency` (32) requests in flight, each a chat prompt with one of 16 synthetic
page images and a question of the corpus, 8 new tokens. Every `--every` requests each process
prints its RSS (/proc/self/statm). The table has RSS by request count for both, and the growth
after the first mark (the warm-up: vLLM's and torch's caches filling), which is what a
long-running replica must keep flat. Needs tcmalloc (Debian: libtcmalloc-minimal4).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


async def serve_requests(total: int, every: int, concurrency: int, corpus_dir: Path) -> None:
    """The child: one engine, `total` requests at `concurrency`, a JSON line of RSS every `every`."""
    from rollout.config import RolloutConfig
    from rollout.engine import vllm_env

    cfg = RolloutConfig(max_model_len=1024, kv_cache_gb=1)
    os.environ.update(vllm_env(cfg, 1))
    from vllm import SamplingParams  # noqa: I001 - vllm is imported after its environment is set
    from vllm.sampling_params import RequestOutputKind

    from deploy.policy_engine import InProcessPolicy
    from docvqa.loaders import load_docvqa_json
    from docvqa.tiny_models import build_tiny_models

    policy = build_tiny_models(ROOT / "artifacts" / "tiny-models")["policy"]
    engine = InProcessPolicy(str(policy), cfg, seed=0)
    await engine.start()
    corpus = load_docvqa_json(corpus_dir / "train_v1.0.json")
    pages = [p.load_image() for p in sorted(corpus.pages.values(), key=lambda p: p.page_id)[:16]]
    questions = [s.question for s in corpus.samples]
    params = SamplingParams(max_tokens=8, temperature=0, output_kind=RequestOutputKind.DELTA)
    started = finished = 0

    async def client() -> None:
        nonlocal started, finished
        while started < total:
            i, started = started, started + 1
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": questions[i % len(questions)]}]}]
            prompt, _, _ = engine.prompts.prepare_chat(messages, [pages[i % len(pages)]])
            async for _ in engine.generate(f"r{i}", prompt, params):
                pass
            finished += 1
            if finished % every == 0:
                print(json.dumps({"requests": finished, "rss_mb": round(rss_mb(), 1)}), flush=True)

    print(json.dumps({"requests": 0, "rss_mb": round(rss_mb(), 1)}), flush=True)
    await asyncio.gather(*(client() for _ in range(concurrency)))
    engine.shutdown()


def main() -> int:
    import ctypes.util

    from deploy.app import allocator_env

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=15000)
    ap.add_argument("--every", type=int, default=3000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--quick", action="store_true", help="1,500 requests, a mark every 300")
    ap.add_argument("--child", help=argparse.SUPPRESS)  # the corpus directory: run one engine
    args = ap.parse_args()
    if args.child:
        asyncio.run(serve_requests(args.requests, args.every, args.concurrency, Path(args.child)))
        return 0
    if args.quick:
        args.requests, args.every = 1500, 300
    tcmalloc = allocator_env("tcmalloc", 0.0)
    if not tcmalloc:
        print(f"bench_policy_memory: tcmalloc is not installed ({ctypes.util.find_library('tcmalloc_minimal')}); "
              "apt-get install libtcmalloc-minimal4", file=sys.stderr)
        return 2
    from docvqa.synthetic import generate_corpus

    work = Path(tempfile.mkdtemp(prefix="docrl-bench-memory-"))
    generate_corpus(work, num_documents=16, seed=3, level="realistic", questions_per_document=2)
    command = [sys.executable, __file__, "--child", str(work), "--requests", str(args.requests), "--every", str(args.every),
               "--concurrency", str(args.concurrency)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    children = {"glibc": subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True),
                "tcmalloc": subprocess.Popen(command, env={**env, **tcmalloc}, stdout=subprocess.PIPE,
                                             stderr=subprocess.DEVNULL, text=True)}
    marks = {name: [json.loads(line) for line in child.communicate()[0].splitlines() if line.startswith("{")]
             for name, child in children.items()}
    failed = [name for name, child in children.items() if child.returncode != 0]
    if failed:
        print(f"bench_policy_memory: the {', '.join(failed)} engine failed", file=sys.stderr)
        return 1
    print(f"Engine alone (InProcessPolicy, tiny policy), concurrency {args.concurrency}: RSS in MB\n")
    print("| requests | glibc malloc | tcmalloc |\n|---:|---:|---:|")
    for g, t in zip(marks["glibc"], marks["tcmalloc"]):
        print(f"| {g['requests']:,} | {g['rss_mb']:,.0f} | {t['rss_mb']:,.0f} |")
    growth = {name: m[-1]["rss_mb"] / m[1]["rss_mb"] - 1 for name, m in marks.items() if len(m) > 2}
    if growth:
        print(f"\ngrowth after the first mark ({marks['glibc'][1]['requests']:,} requests): "
              + ", ".join(f"{name} {100 * g:+.1f}%" for name, g in growth.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

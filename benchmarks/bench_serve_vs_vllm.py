"""`docrl serve` against vLLM's own OpenAI server, on the same policy checkpoint and the same requests.

    .venv/bin/python benchmarks/bench_serve_vs_vllm.py [--models tiny,100m] [--rounds 2] [--quick]
        [--servers docrl] [--set serve.policy_engine=async_llm]

Both servers run the same engine settings (`rollout.engine.engine_args` of the same config: fp32,
no chunked prefill, the same context, image limit and image processor bound), the same threads
(`serve.policy.num_cpus` = vLLM's OMP_NUM_THREADS = 2) and the same KV cache size. They run one at a
time and alternate: round 1 starts with docrl, round 2 with vLLM, and so on. Each round measures
concurrency 1, 8 and 32 with one `httpx` async client; the table shows every round and the ratio of
the best round of each server.

The request is an OpenAI chat completion with one 612x792 synthetic page image (a PNG data: URL)
and a question, greedy, 16 new tokens. `/v1/docqa` (docrl only: retrieval, then the answer from the
page read) is measured too, with the retriever's share of each request's time as the server reports
it in its `Server-Timing` header.

The machine's 1-minute load average is printed before each measurement: on a shared 2-core machine
other jobs move every figure, so compare only rows measured close together.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PY = str(ROOT / ".venv" / "bin" / "python")
DOCRL = str(ROOT / ".venv" / "bin" / "docrl")
LEVELS = (1, 8, 32)


def load() -> float:
    return os.getloadavg()[0]


def process_cpu_seconds() -> dict[int, tuple[str, float]]:
    """pid -> (process name, user + system CPU seconds so far), for every process of the machine."""
    ticks = os.sysconf("SC_CLK_TCK")
    found = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
            cmdline = Path(entry.path, "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        found[int(entry.name)] = (process_role(cmdline), (int(fields[11]) + int(fields[12])) / ticks)
    return found


def process_role(cmdline: str) -> str:
    """A short name for what a process is in either server (Ray's and vLLM's process titles)."""
    for marker in ("ServeReplica:docrl:ingress", "ServeReplica:docrl:policy", "ServeReplica:docrl:retriever",
                   "ProxyActor", "ServeController", "VLLM::EngineCore", "VLLM::Worker", "vllm.entrypoints.openai.api_server",
                   "bench_serve_vs_vllm"):
        if marker in cmdline:
            return marker.split(":")[-1] if marker.startswith("ServeReplica") else marker
    return "other"


def cpu_by_role(before: dict, after: dict) -> dict[str, float]:
    spent: dict[str, float] = {}
    for pid, (role, seconds) in after.items():
        spent[role] = spent.get(role, 0.0) + seconds - before.get(pid, (role, 0.0))[1]
    return spent


# ---------------------------------------------------------------------------------------------
# The servers


def overrides(work: Path, retriever: Path, port: int) -> list[str]:
    return [f"run.output_dir={work / 'run'}", f"data.path={work / 'data'}", "data.synthetic.level=realistic",
            "data.synthetic.num_documents=16", f"retriever.model={retriever}", "retriever.use_gold_page=false",
            "retriever.top_k=3", f"serve.port={port}", "serve.policy.num_cpus=2", "rollout.max_model_len=2048",
            "rollout.eval_sampling.max_tokens=16"]


def vllm_server_command(cfg, policy: Path, port: int) -> tuple[list[str], dict]:
    """vLLM's own server with exactly the engine settings docrl's Serve replica uses."""
    from transformers import AutoProcessor

    from deploy.app import served_rollout_config
    from rollout.engine import engine_args, vllm_env
    from rollout.prompts import VLLMPrompts

    rollout_cfg = served_rollout_config(cfg)
    cap = VLLMPrompts(AutoProcessor.from_pretrained(policy), rollout_cfg).image_max_pixels
    a = engine_args(str(policy), rollout_cfg, cfg.run.seed, None, cuda=False, image_max_pixels=cap)
    cmd = [PY, "-m", "vllm.entrypoints.openai.api_server", "--model", a["model"], "--served-model-name", "docrl",
           "--host", "127.0.0.1", "--port", str(port), "--dtype", a["dtype"], "--max-model-len", str(a["max_model_len"]),
           "--seed", str(a["seed"]), "--limit-mm-per-prompt", json.dumps(a["limit_mm_per_prompt"]),
           "--max-num-batched-tokens", str(a["max_num_batched_tokens"]), "--no-enable-chunked-prefill",
           "--disable-log-stats"]
    if a.get("enforce_eager"):
        cmd.append("--enforce-eager")
    if "mm_processor_kwargs" in a:
        cmd += ["--mm-processor-kwargs", json.dumps(a["mm_processor_kwargs"])]
    if "max_num_seqs" in a:
        cmd += ["--max-num-seqs", str(a["max_num_seqs"])]
    env = vllm_env(rollout_cfg, num_threads=int(cfg.serve.policy.num_cpus), engine_process=True)  # as vLLM's server runs
    return cmd, env


@dataclass
class Server:
    name: str
    command: list[str]
    env: dict
    ready_path: str
    port: int
    log: Path
    proc: subprocess.Popen | None = None
    started_s: float = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 900) -> None:
        import httpx

        t0 = time.perf_counter()
        self.proc = subprocess.Popen(self.command, env={**os.environ, **self.env}, cwd=ROOT, start_new_session=True,
                                     stdout=self.log.open("a"), stderr=subprocess.STDOUT)
        while time.perf_counter() - t0 < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} while starting; see {self.log}")
            try:
                if httpx.get(self.url + self.ready_path, timeout=5).status_code == 200:
                    self.started_s = time.perf_counter() - t0
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        self.stop()
        raise TimeoutError(f"{self.name} not ready after {timeout_s:.0f}s; see {self.log}")

    def stop(self) -> None:
        """SIGTERM to the server's process group (it shuts down its engine and, for docrl, its local
        Ray cluster), SIGKILL if it has not gone after a minute."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
        try:  # what the leader left behind in its group
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# ---------------------------------------------------------------------------------------------
# The load


@dataclass
class Level:
    concurrency: int
    requests: int
    seconds: float
    latencies: list[float]
    load: float
    retrieve_s: list[float] = field(default_factory=list)
    cpu_s: dict[str, float] = field(default_factory=dict)  # CPU seconds spent during the level, per process role

    @property
    def rate(self) -> float:
        return self.requests / self.seconds

    def pct(self, q: float) -> float:
        from bench_serve import pct

        return pct(self.latencies, q)


SERVER_TIMING = re.compile(r"retrieve;dur=([0-9.]+)")


async def run_level(client, make_request, concurrency: int, total: int) -> Level:
    """`total` requests, at most `concurrency` in flight; any non-200 stops the benchmark."""
    gate = asyncio.Semaphore(concurrency)
    latencies, retrieve = [], []
    before = load()

    async def one(i: int) -> None:
        async with gate:
            url, body = make_request(i)
            t0 = time.perf_counter()
            r = await client.post(url, json=body)
            if r.status_code != 200:
                raise RuntimeError(f"request {i} to {url}: {r.status_code} {r.text[:300]}")
            latencies.append(time.perf_counter() - t0)
            if m := SERVER_TIMING.search(r.headers.get("server-timing", "")):
                retrieve.append(float(m.group(1)) / 1000)

    t0, cpu_before = time.perf_counter(), process_cpu_seconds()
    await asyncio.gather(*(one(i) for i in range(total)))
    seconds = time.perf_counter() - t0
    return Level(concurrency, total, seconds, latencies, before, retrieve, cpu_by_role(cpu_before, process_cpu_seconds()))


async def measure(url: str, endpoint: str, questions: list[str], image: str, args) -> dict[int, Level]:
    import httpx

    def chat(i):
        return url + "/v1/chat/completions", {
            "model": "docrl", "max_tokens": args.max_tokens, "temperature": 0,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                                       {"type": "text", "text": questions[i % len(questions)]}]}]}

    def docqa(i):
        return url + "/v1/docqa", {"question": questions[i % len(questions)], "k": 3, "max_tokens": args.max_tokens}

    make = chat if endpoint == "chat" else docqa
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await run_level(client, make, 8, 32)  # warm-up: connections, caches, the first compilations
        levels = {}
        for c in LEVELS:
            total = max(args.requests // 3, 8) if c == 1 else max(args.requests, 2 * c)
            levels[c] = await run_level(client, make, c, total)
        return levels


# ---------------------------------------------------------------------------------------------
# The comparison


def prepare(work: Path, model: str) -> tuple[Path, Path, list[str], str]:
    """The policy of `model` size, the tiny retriever, a synthetic corpus and its index."""
    from docvqa.loaders import load_docvqa_json
    from docvqa.tiny_models import build_tiny_models

    models = build_tiny_models(ROOT / "artifacts" / "tiny-models", size=model)
    retriever = build_tiny_models(ROOT / "artifacts" / "tiny-models")["retriever"]
    if not (work / "index").exists():
        subprocess.run([DOCRL, "index", "--config", "configs/tiny.yaml", "--split", "all", "--out", str(work / "index"),
                        *overrides(work, retriever, 8000)], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    corpus = load_docvqa_json(next((work / "data").glob("train*.json")))
    page = next(iter(corpus.pages.values())).load_image()
    buf = io.BytesIO()
    page.save(buf, format="PNG")
    return (models["policy"], retriever, [s.question for s in corpus.samples],
            "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())


def servers(work: Path, policy: Path, retriever: Path, extra: list[str], env: list[str]) -> dict[str, Server]:
    from cluster.config import load_config
    from common.ray_helpers import free_port

    dport, vport = free_port(), free_port()
    cfg = load_config(ROOT / "configs" / "tiny.yaml", overrides(work, retriever, dport) + extra)
    vcmd, venv = vllm_server_command(cfg, policy, vport)
    docrl = Server("docrl serve", [DOCRL, "serve", "--config", "configs/tiny.yaml", "--checkpoint", str(policy),
                                   "--index", str(work / "index"), *overrides(work, retriever, dport), *extra],
                   {"HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0", **dict(e.split("=", 1) for e in env)},
                   "/healthz", dport, work / "docrl.log")
    vllm = Server("vLLM server", vcmd, {**venv, "HF_HUB_OFFLINE": "1"}, "/health", vport, work / "vllm.log")
    return {"docrl": docrl, "vllm": vllm}


def compare(model: str, args) -> None:
    work = Path(args.workdir or tempfile.mkdtemp(prefix="docrl-bench-vs-vllm-")) / model
    work.mkdir(parents=True, exist_ok=True)
    policy, retriever, questions, image = prepare(work, model)
    both = servers(work, policy, retriever, args.set, args.env)
    chat: dict[str, list[dict[int, Level]]] = {"docrl": [], "vllm": []}
    docqa: list[dict[int, Level]] = []
    for r in range(args.rounds):
        for name in (("docrl", "vllm") if r % 2 == 0 else ("vllm", "docrl")):
            if name not in args.servers:
                continue
            server = both[name]
            server.start()
            print(f"[{model} round {r + 1}] {server.name} ready in {server.started_s:.0f}s (load {load():.2f})",
                  file=sys.stderr, flush=True)
            try:
                chat[name].append(asyncio.run(measure(server.url, "chat", questions, image, args)))
                if name == "docrl":
                    docqa.append(asyncio.run(measure(server.url, "docqa", questions, image, args)))
            finally:
                server.stop()
    report(model, chat, docqa, args)


def best(rounds: list[dict[int, Level]], c: int) -> Level:
    return max((levels[c] for levels in rounds), key=lambda lv: lv.rate)


def report(model: str, chat, docqa, args) -> None:
    if not (chat["docrl"] and chat["vllm"]):
        for name, rounds in chat.items():
            for levels in rounds:
                print(name, {c: f"{lv.rate:.1f} req/s p50 {1000 * lv.pct(0.5):.0f} p95 {1000 * lv.pct(0.95):.0f} ms"
                             for c, lv in levels.items()})
                print("  CPU ms per request at concurrency 8:", {r: round(1000 * t / levels[8].requests, 1)
                                                               for r, t in levels[8].cpu_s.items() if t > 0.01})
        return
    print(f"\n### {model} policy: chat with one 612x792 page image, greedy, {args.max_tokens} new tokens "
          f"({args.rounds} rounds, servers alternated)\n")
    print("| concurrency | docrl req/s (rounds) | vLLM req/s (rounds) | docrl / vLLM (best) | docrl p50 ms | vLLM p50 ms "
          "| docrl p95 ms | vLLM p95 ms | p95 docrl / vLLM | load (1 min) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for c in LEVELS:
        d, v = best(chat["docrl"], c), best(chat["vllm"], c)
        rates = {n: ", ".join(f"{levels[c].rate:.1f}" for levels in chat[n]) for n in chat}
        loads = ", ".join(f"{levels[c].load:.1f}" for n in chat for levels in chat[n])
        print(f"| {c} | {rates['docrl']} | {rates['vllm']} | **{d.rate / v.rate:.2f}x** | {1000 * d.pct(0.5):.0f} | "
              f"{1000 * v.pct(0.5):.0f} | {1000 * d.pct(0.95):.0f} | {1000 * v.pct(0.95):.0f} | "
              f"{d.pct(0.95) / v.pct(0.95):.2f}x | {loads} |")
    roles = sorted({r for n in chat for levels in chat[n] for r in levels[8].cpu_s}, key=lambda r: r != "bench_serve_vs_vllm")
    print(f"\nCPU milliseconds per chat request at concurrency 8, by process (the best round of each server; "
          f"both servers share the machine's {os.cpu_count()} cores with this benchmark's client):\n")
    print("| process | docrl | vLLM server |")
    print("|---|---:|---:|")
    for role in roles + ["all"]:
        cells = []
        for n in ("docrl", "vllm"):
            lv = best(chat[n], 8)
            spent = sum(lv.cpu_s.values()) if role == "all" else lv.cpu_s.get(role, 0.0)
            cells.append(f"{1000 * spent / lv.requests:.1f}" if spent > 0.0005 * lv.requests else "")
        print(f"| {'this client' if role == 'bench_serve_vs_vllm' else role} | {cells[0]} | {cells[1]} |")
    print(f"\n### {model} policy: /v1/docqa (docrl only: k=3, one page read, greedy, {args.max_tokens} new tokens)\n")
    print("| concurrency | req/s (rounds) | p50 ms | p95 ms | retrieval share of the time |")
    print("|---:|---:|---:|---:|---:|")
    for c in LEVELS:
        d = best(docqa, c)
        share = statistics.fmean(d.retrieve_s) / statistics.fmean(d.latencies) if d.retrieve_s else float("nan")
        print(f"| {c} | {', '.join(f'{lv[c].rate:.1f}' for lv in docqa)} | {1000 * d.pct(0.5):.0f} | "
              f"{1000 * d.pct(0.95):.0f} | {100 * share:.0f}% |")
    sys.stdout.flush()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="tiny,100m", help="comma-separated: tiny, 100m")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--requests", type=int, default=96, help="requests per level at concurrency 8 and 32")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--servers", default="docrl,vllm", help="measure only these (the table needs both)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a docrl config override for `docrl serve`, e.g. serve.policy_engine=async_llm")
    ap.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                    help="an environment variable for `docrl serve` (and the local Ray cluster it starts)")
    ap.add_argument("--quick", action="store_true", help="tiny model only, one round, fewer requests")
    ap.add_argument("--workdir", help="keep models' index and logs here (default: a new temporary directory)")
    args = ap.parse_args()
    if args.quick:
        args.models, args.rounds, args.requests = "tiny", 1, 32
    print(f"bench_serve_vs_vllm: {args.models}, {args.rounds} round(s), {os.cpu_count()} cores, "
          f"load {load():.2f}", flush=True)
    for model in args.models.split(","):
        compare(model.strip(), args)


if __name__ == "__main__":
    main()

"""Soak: `docrl serve` under steady load for a long time, measured window by window.

    .venv/bin/python benchmarks/soak_serve.py [--minutes 30] [--window-s 300] [--concurrency 32]
        [--model tiny] [--workdir DIR] [--quick]

Starts `docrl serve` on the tiny policy (or `--model 100m`) over a 16-document synthetic corpus,
with the feedback store on (SQLite in the work directory), and keeps `--concurrency` clients busy
for `--minutes`: each client in turn asks a document question (`/v1/docqa`, k=3), asks a chat
question about a page image (`/v1/chat/completions` with a PNG data: URL) and rates the answer it
got before (`/v1/feedback`, up or down). Every `--window-s` it records the window's requests,
answers per second, p50 and p95 latency of the questions, the count of 5xx and other non-2xx
answers, and the resident memory (RSS) of every process of the server (all are in its session:
the local Ray cluster's, the Serve replicas', the engine's), summed by role.

`--overload` measures the other end instead: the ingress limited to M requests at once and M more
queued (`serve.ingress.max_ongoing_requests` and `max_queued_requests`, M = `--max-ongoing`, 8), it
sends bursts of 4 x M chat requests at once and reports how the excess is refused: the status,
whether a Retry-After came with it, and how long the refusal took against how long an answer took.
Target: every request beyond the limits is refused with 503 and Retry-After within 1 s (none waits
for a timeout), and every other is answered.

The soak prints one markdown table and a verdict against the targets:
    zero 5xx;
    p50 and p95 of every window within 20% of the first window's;
    total RSS of the server's processes growing less than 5% after the first window.
It exits 1 when a target is missed. `--quick` is 2 minutes in 30-second windows (the test suite
runs the same load for 2 minutes against its own Serve application, tests/test_feedback_e2e.py).

The machine is shared: the load average is printed per window, and latency moves with it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from bench_serve import pct  # noqa: E402 - found through the path set above

LATENCY_BAND = 0.20  # p50 / p95 of each window within this fraction of the first window's
RSS_GROWTH_LIMIT = 0.05  # total resident memory after the first window may grow this much


@dataclass
class Window:
    start_s: float
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)  # questions answered (docqa and chat)
    ratings: int = 0
    server_errors: int = 0  # 5xx
    other_errors: int = 0  # other non-2xx
    rss_mb: dict[str, float] = field(default_factory=dict)  # role -> MB at the window's end
    load: float = 0.0

    def pct(self, q: float) -> float:
        return pct(self.latencies, q)

    @property
    def answered_per_s(self) -> float:
        return len(self.latencies) / max(self.seconds, 1e-9)


def session_rss_mb(session_id: int) -> dict[str, float]:
    """Resident memory (MB) of every process in session `session_id`, summed by role."""
    from bench_serve_vs_vllm import process_role

    page_mb = os.sysconf("SC_PAGE_SIZE") / 2**20
    found: dict[str, float] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) != session_id:  # field 6 of stat: the session id
                continue
            rss_pages = int(Path(entry.path, "statm").read_text().split()[1])
            cmdline = Path(entry.path, "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue
        role = process_role(cmdline)
        if role == "other":
            role = ("raylet" if "raylet" in cmdline else "gcs_server" if "gcs_server" in cmdline
                    else "docrl serve" if "docrl serve" in cmdline or " serve " in cmdline else "other ray processes")
        found[role] = found.get(role, 0.0) + rss_pages * page_mb
    return found


async def soak(url: str, seconds: float, window_s: float, concurrency: int, questions: list[str], image: str,
               memory: Callable[[], dict[str, float]], api_key: str | None = None, max_tokens: int = 8,
               answered_ids: list[str] | None = None) -> list[Window]:
    """Keep `concurrency` clients busy against `url` for `seconds`; one Window per `window_s`."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    t0 = time.monotonic()
    windows = [Window(0.0)]
    answered = answered_ids if answered_ids is not None else []

    def window() -> Window:
        return windows[-1]

    async def client_loop(i: int, http: httpx.AsyncClient) -> None:
        n, last_id = 0, None
        while time.monotonic() - t0 < seconds:
            n += 1
            question = questions[(i * 7 + n) % len(questions)]
            if n % 3 == 0 and last_id:
                body = {"response_id": last_id, "rating": "up" if n % 2 else "down"}
                if body["rating"] == "down":
                    body["correction"] = "a corrected answer"
                r = await http.post("/v1/feedback", json=body)
                kind = "rating"
            elif n % 3 == 1:
                started = time.monotonic()
                r = await http.post("/v1/docqa", json={"question": question, "k": 3, "max_tokens": max_tokens})
                kind = "question"
            else:
                started = time.monotonic()
                r = await http.post("/v1/chat/completions", json={
                    "model": "docrl", "max_tokens": max_tokens, "messages": [{"role": "user", "content": [
                        {"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": question}]}]})
                kind = "question"
            w = window()
            if r.status_code >= 500:
                w.server_errors += 1
                print(f"soak: {r.status_code} from {r.request.url.path}: {r.text[:300]}", file=sys.stderr, flush=True)
            elif r.status_code >= 300:
                w.other_errors += 1
                print(f"soak: {r.status_code} from {r.request.url.path}: {r.text[:300]}", file=sys.stderr, flush=True)
            elif kind == "rating":
                w.ratings += 1
            else:
                w.latencies.append(time.monotonic() - started)
                last_id = r.json()["id"]
                answered.append(last_id)

    async def windows_closer() -> None:
        while True:
            await asyncio.sleep(max(0.0, window().start_s + window_s - (time.monotonic() - t0)))
            now = time.monotonic() - t0
            w = window()
            w.seconds, w.load = now - w.start_s, os.getloadavg()[0]
            w.rss_mb = await asyncio.to_thread(memory)
            print(f"soak: window at {now:.0f}s: {len(w.latencies)} answers, p50 {1000 * w.pct(0.5):.0f} ms, "
                  f"p95 {1000 * w.pct(0.95):.0f} ms, {w.server_errors} 5xx, RSS {sum(w.rss_mb.values()):.0f} MB",
                  file=sys.stderr, flush=True)
            if now >= seconds - 1e-3:
                return
            windows.append(Window(now))

    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=300, limits=limits) as http:
        closer = asyncio.create_task(windows_closer())
        await asyncio.gather(*(client_loop(i, http) for i in range(concurrency)))
        await closer
    return [w for w in windows if w.seconds > 0]


def verdict(windows: list[Window]) -> list[str]:
    """The targets missed (none: the soak passed)."""
    missed = []
    errors = sum(w.server_errors for w in windows)
    if errors:
        missed.append(f"{errors} 5xx answers")
    first = windows[0]
    for i, w in enumerate(windows[1:], start=2):
        for name, q in (("p50", 0.5), ("p95", 0.95)):
            change = w.pct(q) / first.pct(q) - 1
            if abs(change) > LATENCY_BAND:
                missed.append(f"window {i}: {name} {1000 * w.pct(q):.0f} ms is {100 * change:+.0f}% from the first "
                              f"window's {1000 * first.pct(q):.0f} ms")
    base, last = sum(first.rss_mb.values()), sum(windows[-1].rss_mb.values())
    if base and last / base - 1 > RSS_GROWTH_LIMIT:
        missed.append(f"resident memory grew {100 * (last / base - 1):.1f}% after the first window "
                      f"({base:.0f} -> {last:.0f} MB)")
    return missed


def report(windows: list[Window], title: str) -> None:
    roles = sorted({r for w in windows for r in w.rss_mb}, key=lambda r: -windows[-1].rss_mb.get(r, 0.0))
    print(f"\n### {title}\n")
    print("| window | answers | answers/s | ratings | p50 ms | p95 ms | 5xx | other non-2xx | RSS MB (all) | load (1 min) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for i, w in enumerate(windows, start=1):
        print(f"| {i} ({w.start_s / 60:.1f}-{(w.start_s + w.seconds) / 60:.1f} min) | {len(w.latencies)} | "
              f"{w.answered_per_s:.1f} | {w.ratings} | {1000 * w.pct(0.5):.0f} | {1000 * w.pct(0.95):.0f} | "
              f"{w.server_errors} | {w.other_errors} | {sum(w.rss_mb.values()):.0f} | {w.load:.1f} |")
    print("\nResident memory by process role (MB), first and last window, and the change:\n")
    print("| process | first | last | change |")
    print("|---|---:|---:|---:|")
    for role in roles:
        a, b = windows[0].rss_mb.get(role, 0.0), windows[-1].rss_mb.get(role, 0.0)
        print(f"| {role} | {a:.0f} | {b:.0f} | {100 * (b / a - 1) if a else float('nan'):+.1f}% |")
    missed = verdict(windows)
    print("\nVerdict: " + ("every target met (zero 5xx, p50/p95 within 20% of the first window, RSS growth under 5%)"
                           if not missed else "MISSED: " + "; ".join(missed)))
    sys.stdout.flush()


REFUSAL_LIMIT_S = 1.0  # an overloaded server refuses within this


async def overload(url: str, burst: int, rounds: int, image: str, max_tokens: int) -> list[tuple[int, float, bool]]:
    """`rounds` bursts of `burst` chat requests sent at once: (status, seconds, Retry-After given) each."""
    import httpx

    body = {"model": "docrl", "max_tokens": max_tokens, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": "What is the total?"}]}]}
    outcomes = []
    limits = httpx.Limits(max_connections=burst + 4, max_keepalive_connections=burst + 4)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http:
        async def one() -> tuple[int, float, bool]:
            t0 = time.monotonic()
            r = await http.post("/v1/chat/completions", json=body)
            return r.status_code, time.monotonic() - t0, "retry-after" in r.headers

        for _ in range(rounds):
            outcomes += await asyncio.gather(*(one() for _ in range(burst)))
            await asyncio.sleep(1.0)
    return outcomes


def overload_report(outcomes: list[tuple[int, float, bool]], max_ongoing: int) -> list[str]:
    answered = [t for status, t, _ in outcomes if status == 200]
    refused = [t for status, t, retry in outcomes if status == 503 and retry]
    other = [(status, retry) for status, _, retry in outcomes if status != 200 and not (status == 503 and retry)]
    print(f"\n### Overload: bursts of {4 * max_ongoing} chat requests at once, ingress max_ongoing_requests="
          f"{max_ongoing} and max_queued_requests={max_ongoing}\n")
    print("| requests | answered | refused: 503 + Retry-After | other | refusal p50 / p95 / max ms | "
          "answer p50 / p95 / max ms |")
    print("|---:|---:|---:|---:|---|---|")
    print(f"| {len(outcomes)} | {len(answered)} | {len(refused)} | {len(other)} | "
          f"{1000 * pct(refused, 0.5):.0f} / {1000 * pct(refused, 0.95):.0f} / {1000 * max(refused, default=0):.0f} | "
          f"{1000 * pct(answered, 0.5):.0f} / {1000 * pct(answered, 0.95):.0f} / {1000 * max(answered, default=0):.0f} |")
    missed = []
    if other:
        missed.append(f"{len(other)} answers neither 200 nor 503 with Retry-After: {other[:5]}")
    if not refused:
        missed.append("nothing was refused: the burst did not exceed the limits")
    elif max(refused) > REFUSAL_LIMIT_S:
        missed.append(f"the slowest refusal took {max(refused):.2f} s (target {REFUSAL_LIMIT_S:g} s)")
    print("\nVerdict: " + ("every target met (the excess refused with 503 and Retry-After within "
                           f"{REFUSAL_LIMIT_S:g} s, the rest answered)" if not missed else "MISSED: " + "; ".join(missed)))
    sys.stdout.flush()
    return missed


def main() -> int:
    from bench_serve_vs_vllm import Server, overrides, prepare

    from common.ray_helpers import free_port

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--window-s", type=float, default=300.0)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--model", default="tiny", help="tiny or 100m")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--quick", action="store_true", help="2 minutes in 30-second windows")
    ap.add_argument("--overload", action="store_true", help="measure refusals under overload instead of a soak")
    ap.add_argument("--max-ongoing", type=int, default=8, help="with --overload: the ingress's limit M")
    ap.add_argument("--rounds", type=int, default=10, help="with --overload: bursts of 4 x M")
    ap.add_argument("--workdir", help="keep the models' index, the feedback database and the logs here")
    args = ap.parse_args()
    if args.quick:
        args.minutes, args.window_s = 2.0, 30.0
    work = Path(args.workdir or tempfile.mkdtemp(prefix="docrl-soak-")) / args.model
    work.mkdir(parents=True, exist_ok=True)
    policy, retriever, questions, image = prepare(work, args.model)
    port = free_port()
    server = Server("docrl serve", [str(HERE.parent / ".venv" / "bin" / "docrl"), "serve", "--config", "configs/tiny.yaml",
                                    "--checkpoint", str(policy), "--index", str(work / "index"),
                                    *overrides(work, retriever, port), "feedback.enabled=true",
                                    f"feedback.database_url=sqlite:///{work / 'feedback.db'}",
                                    *([f"serve.ingress.max_ongoing_requests={args.max_ongoing}",
                                       f"serve.ingress.max_queued_requests={args.max_ongoing}"] if args.overload else [])],
                    {"HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}, "/healthz", port, work / "docrl.log")
    server.start()
    if args.overload:
        try:
            outcomes = asyncio.run(overload(server.url, 4 * args.max_ongoing, args.rounds, image, args.max_tokens))
        finally:
            server.stop()
        return 1 if overload_report(outcomes, args.max_ongoing) else 0
    print(f"soak_serve: {args.model} policy, concurrency {args.concurrency}, {args.minutes:g} min in "
          f"{args.window_s:g}-s windows, {os.cpu_count()} cores", flush=True)
    try:
        windows = asyncio.run(soak(server.url, 60 * args.minutes, args.window_s, args.concurrency, questions, image,
                                   lambda: session_rss_mb(server.proc.pid), max_tokens=args.max_tokens))
    finally:
        server.stop()
    report(windows, f"`docrl serve` soak: {args.model} policy, concurrency {args.concurrency}, {args.minutes:g} min")
    return 1 if verdict(windows) else 0


if __name__ == "__main__":
    sys.exit(main())

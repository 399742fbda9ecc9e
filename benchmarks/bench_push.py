"""A full weight push: time and peak host memory, this checkout against an earlier revision.

    .venv/bin/python benchmarks/bench_push.py --baseline 7c03197            # ~100M policy, fp32
    .venv/bin/python benchmarks/bench_push.py --baseline 7c03197 --model /path/to/policy --rounds 3

One push is what `docrl train` does after each update when full weights are pushed: learner rank
0 exports the merged weights into Ray's object store (`LearnerGroup.export_weights("full")`)
and one rollout worker loads them into vLLM (`RolloutGroup.push_full`). Each case is its own
process with its own local Ray cluster (a learner rank and a rollout worker, full fine-tuning
so that no adapter is merged), running either this checkout or the baseline revision checked
out into a temporary git worktree; cases alternate (baseline, current, baseline, ...) so that
a noisy machine affects both alike.

Measured per push, by sampling /proc every 20 ms (a shorter spike can be missed): wall time;
the peak of the machine's used memory (MemTotal - MemAvailable: anonymous memory plus the object
store's shared memory) above what was used just before the push; the peak anonymous resident
memory (RssAnon) of the learner rank and of the rollout worker above theirs before it. The
median over the pushes of a case, then the best case of each side, are printed as a table with
the ratios current / baseline. The model's bytes are printed too, so that a push of another
size can be estimated by scaling (the copies are per byte).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CASE = r'''
import json, os, statistics, sys, threading, time
import ray
from cluster.ray_setup import init_ray
from learner.config import AlgorithmConfig, LearnerConfig
from learner.group import LearnerGroup
from rollout.config import RolloutConfig
from rollout.group import RolloutGroup

policy, pushes = sys.argv[1], int(sys.argv[2])


def meminfo():
    fields = dict(line.split(":", 1) for line in open("/proc/meminfo"))
    kib = lambda k: int(fields[k].split()[0]) * 1024
    return kib("MemTotal") - kib("MemAvailable")


def rss_anon(pid):
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return 0
    return 0


init_ray(num_cpus=4)
learner = LearnerGroup(policy, LearnerConfig(lora={"enabled": False}, value_model="none", num_cpus_per_rank=1),
                       AlgorithmConfig(minibatch_size=4, kl_coef=0.0), num_threads=1)
rollout = RolloutGroup(policy, RolloutConfig(num_workers=1, num_cpus_per_worker=1, max_model_len=1024, kv_cache_gb=1))
rollout.ready()
import psutil
# Ray titles each actor's process "ray::<Class>..."; the local cluster's workers descend from this driver
pids = {}
for p in psutil.Process().children(recursive=True):
    title = " ".join(p.cmdline())
    for cls in ("LearnerRank", "RolloutWorker"):
        if title.startswith(f"ray::{cls}"):
            pids[cls] = p.pid
learner_pid, rollout_pid = pids["LearnerRank"], pids["RolloutWorker"]
rows = []
for version in range(1, pushes + 1):
    time.sleep(1.0)  # let the previous push's objects go
    before = (meminfo(), rss_anon(learner_pid), rss_anon(rollout_pid))
    peak = list(before)
    done = threading.Event()

    def sample():
        while not done.is_set():
            now = (meminfo(), rss_anon(learner_pid), rss_anon(rollout_pid))
            for i in range(3):
                peak[i] = max(peak[i], now[i])
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    t0 = time.perf_counter()
    exported = learner.export_weights("full")
    rollout.push_full(exported.object_ref if exported.object_ref is not None else exported.tensors, version)
    seconds = time.perf_counter() - t0
    del exported
    done.set()
    sampler.join()
    rows.append({"seconds": seconds, "machine": peak[0] - before[0], "learner": peak[1] - before[1],
                 "rollout": peak[2] - before[2]})
print("RESULT " + json.dumps({"pushes": rows, "model_bytes": sum(os.path.getsize(os.path.join(policy, f))
                               for f in os.listdir(policy) if f.endswith(".safetensors"))}))
rollout.shutdown()
learner.shutdown()
ray.shutdown()
'''


def run_case(tree: Path, policy: str, pushes: int, timeout_s: float) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    proc = subprocess.run([sys.executable, "-c", CASE, policy, str(pushes)], cwd=tree, env=env, text=True,
                          capture_output=True, timeout=timeout_s, start_new_session=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"case in {tree} failed ({proc.returncode}): {proc.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def medians(case: dict) -> dict:
    pushes = case["pushes"][1:] or case["pushes"]  # the first push also warms vLLM's reload path
    return {k: statistics.median(p[k] for p in pushes) for k in ("seconds", "machine", "learner", "rollout")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", required=True, help="git revision to compare against (checked out in a worktree)")
    ap.add_argument("--model", default=None, help="policy directory (default: the ~100M random policy, built once)")
    ap.add_argument("--pushes", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--timeout-s", type=float, default=900)
    args = ap.parse_args()

    policy = args.model
    if policy is None:
        sys.path.insert(0, str(ROOT))
        from docvqa.tiny_models import build_tiny_models

        policy = str(build_tiny_models(ROOT / "artifacts" / "tiny-models", size="100m")["policy"])
    worktree = Path(tempfile.mkdtemp(prefix="docrl-push-baseline-")) / "tree"
    subprocess.run(["git", "worktree", "add", "--detach", str(worktree), args.baseline], cwd=ROOT, check=True,
                   capture_output=True)
    results: dict[str, list[dict]] = {"baseline": [], "current": []}
    try:
        for round_index in range(args.rounds):
            for side, tree in (("baseline", worktree), ("current", ROOT)):
                case = run_case(tree, policy, args.pushes, args.timeout_s)
                results[side].append(medians(case) | {"model_bytes": case["model_bytes"]})
                m = results[side][-1]
                print(f"round {round_index + 1} {side}: {m['seconds']:.2f} s, machine +{m['machine'] / 2**20:.0f} MiB, "
                      f"learner +{m['learner'] / 2**20:.0f} MiB, rollout +{m['rollout'] / 2**20:.0f} MiB", flush=True)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=ROOT, capture_output=True)
    size = results["current"][0]["model_bytes"]
    best = {side: {k: min(r[k] for r in rows) for k in ("seconds", "machine", "learner", "rollout")}
            for side, rows in results.items()}
    print(f"\nmodel {policy}: {size / 2**20:.0f} MiB of weights; best of {args.rounds} rounds, median of "
          f"{max(1, args.pushes - 1)} pushes each\n")
    print("| per push | baseline | current | current / baseline |")
    print("|---|---:|---:|---:|")
    print(f"| time (s) | {best['baseline']['seconds']:.2f} | {best['current']['seconds']:.2f} | "
          f"{best['current']['seconds'] / best['baseline']['seconds']:.2f}x |")
    for key, label in (("machine", "machine used memory peak"), ("learner", "learner rank anon peak"),
                       ("rollout", "rollout worker anon peak")):
        b, c = best["baseline"][key] / 2**20, best["current"][key] / 2**20
        ratio = f"{c / b:.2f}x" if b >= 1 else "n/a (baseline under 1 MiB)"
        print(f"| {label} (MiB above before) | {b:.0f} | {c:.0f} | {ratio} |")
    print(f"| (in model sizes: machine peak) | {best['baseline']['machine'] / size:.2f} | "
          f"{best['current']['machine'] / size:.2f} | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

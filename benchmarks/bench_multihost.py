"""Training on two hosts that share nothing but a network, against the same run on one of them.

    sudo .venv/bin/python benchmarks/bench_multihost.py              # 2 rounds x 8 steps per layout
    sudo .venv/bin/python benchmarks/bench_multihost.py --rounds 3 --steps 12

The two hosts are network namespaces joined by a veth pair, each with its own files, /dev/shm and
temporary directory (`tests/two_hosts.py`, as `tests/test_multihost.py` uses them; needs root).
Host A runs the Ray head and the driver, host B a Ray node. The same small run of the tiny preset
(LoRA, adapters pushed as files, retrieval on, 2 learner ranks, run.storage on an S3-compatible
server on host A) is run in two layouts, alternating (one host, two hosts, one host, ...):

* one host: every role on host A (host B idle);
* two hosts: rollout worker and retriever on host B, reward on A, one learner rank on each.

Printed per layout (the median over its rounds of each run's median over steps 2..N): step time,
its rollout and learner parts, and what the driver sent through the object store per step (page
images to the rollout worker and the learner, and the LoRA adapter pushed to the rollout worker).
Both hosts share this machine's cores, so the two-host figure measures what crossing hosts adds
(serialization, the veth hop, gloo between ranks on two network stacks), not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from two_hosts import RayOnTwoHosts, TwoHosts, unavailable  # noqa: E402

LAYOUTS = {
    "one host": ['ray.role_resources={"rollout": {"host_a": 1}, "retriever": {"host_a": 1}, "reward": {"host_a": 1}, '
                 '"learner": {"host_a": 1}}', "ray.placement_strategy=PACK"],
    "two hosts": ['ray.role_resources={"rollout": {"host_b": 1}, "retriever": {"host_b": 1}, "reward": {"host_a": 1}}',
                  "ray.placement_strategy=STRICT_SPREAD"],
}
KEYS = ("time/step_s", "time/rollout_and_reward_s", "time/learner_s", "time/weight_sync_s",
        "transfer/page_bytes", "transfer/adapter_bytes")


def run_args(hosts: TwoHosts, cluster: RayOnTwoHosts, run: str, steps: int, layout: list[str]) -> list[str]:
    return ["--config", "configs/tiny.yaml", f"ray.address={hosts.a.ip}:{cluster.gcs_port}",
            f"run.output_dir={hosts.root}/runs/{run}", f"run.models_dir={hosts.root}/models",
            f"run.storage=s3://docrl/{run}", f"trainer.total_steps={steps}", "trainer.prompts_per_step=4",
            "rollout.sampling.n=4", "algorithm.minibatch_size=16", "learner.micro_batch_size=4",
            "data.max_eval_samples=2", "data.synthetic.num_documents=12", "data.synthetic.level=realistic",
            "retriever.use_gold_page=false", "trainer.warm_start.steps=0", "trainer.eval_every=0",
            f"trainer.save_every={steps}", "rollout.max_model_len=1024", "algorithm.entropy_coef=0.01",
            "learner.lora.enabled=true", "learner.freeze_vision_tower=true", "rollout.lora_push=adapter",
            "learner.num_ranks=2", "learner.num_cpus_per_rank=1", *layout]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()
    why = unavailable()
    if why:
        print(f"bench_multihost: {why}", file=sys.stderr)
        return 2
    from docvqa.tiny_models import build_tiny_models

    results: dict[str, list[dict]] = {name: [] for name in LAYOUTS}
    with TwoHosts() as hosts:
        build_tiny_models(hosts.a.dir / "models")  # on host A only: host B gets models as bytes
        cluster = RayOnTwoHosts(hosts)
        cluster.start()
        for r in range(args.rounds):
            for name, layout in LAYOUTS.items():
                run = f"{name.replace(' ', '-')}-{r}"
                t0 = time.monotonic()
                done = cluster.docrl("train", *run_args(hosts, cluster, run, args.steps, layout), timeout=1200)
                if done.returncode:
                    print((done.stdout + done.stderr)[-4000:], file=sys.stderr)
                    return 1
                rows = [json.loads(line) for line in
                        (hosts.a.dir / "runs" / run / "logs" / "metrics.jsonl").read_text().splitlines()]
                steps = [row for row in rows if "reward/mean" in row and row["step"] >= 2]
                placed = json.loads((hosts.a.dir / "runs" / run / "logs" / "placement.json").read_text())
                results[name].append({k: statistics.median(s[k] for s in steps) for k in KEYS})
                print(f"round {r + 1} {name}: {results[name][-1]['time/step_s']:.3f} s/step, run {time.monotonic() - t0:.0f} s, "
                      f"roles {json.dumps({k: [n['ip'] for n in v] for k, v in placed.items()})}", flush=True)
    print()
    print(f"| per step (median of {args.rounds} runs, steps 2..{args.steps}) | one host | two hosts | two / one |")
    print("|---|---:|---:|---:|")
    for k in KEYS:
        one, two = (statistics.median(x[k] for x in results[n]) for n in LAYOUTS)
        fmt = (lambda v: f"{v / 1e3:.1f} kB") if "bytes" in k else (lambda v: f"{v:.3f} s")
        print(f"| {k} | {fmt(one)} | {fmt(two)} | {two / one:.2f}x |" if one else f"| {k} | {fmt(one)} | {fmt(two)} | - |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

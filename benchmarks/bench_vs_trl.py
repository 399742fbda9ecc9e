"""docrl against TRL's GRPOTrainer (transformers `generate`, no vLLM) on the same work per step:
the same checkpoint, the same easy-level pages and prompt tokens, 8 prompts x 4 answers of at most
16 new tokens at temperature 1, fp32, LoRA r=8 on the language model's linear layers, KL
coefficient 0, one optimizer step per batch, 2 threads per role.

    .venv/bin/python benchmarks/bench_vs_trl.py --setup         # only build benchmarks/.venv-trl
    .venv/bin/python benchmarks/bench_vs_trl.py --size tiny     # about 20 minutes on 2 cores
    .venv/bin/python benchmarks/bench_vs_trl.py                 # tiny, then ~100M (about an hour in all)
    .venv/bin/python benchmarks/bench_vs_trl.py --quick         # tiny, 4 steps, one round

TRL lives in its own virtual environment, benchmarks/.venv-trl (never docrl's .venv), made on the
first run with uv: trl 1.16 (any 1.x if 1.16 cannot be had) plus exactly the torch, torchvision,
transformers, peft, accelerate, pillow and numpy versions of the .venv this script runs in.

This script (docrl's side) draws the questions in the order docrl's own sampler gives them,
renders each prompt with docrl's prompt builder and writes the messages, the fitted page images
(PNG), the gold answers and docrl's prompt token ids to a JSON file; benchmarks/trl_runner.py reads
it in the TRL venv and refuses to run unless TRL tokenizes every prompt to the same ids.

docrl runs as `docrl train` in a subprocess (a fresh local Ray cluster each run), in sync and in
async mode; TRL as trl_runner.py in a subprocess. The three alternate within a round, and the order
flips each round, so load from other work on the machine falls on all of them. Each run drops its
first 2 steps (warm-up), then the median over all rounds' remaining steps per system.
completions/s = 32 / s per step; the ratio is docrl's completions/s over TRL's (> 1: docrl faster).
Each system's best run (the lowest median of its runs) is reported too: other work only slows runs
down, and on 2 cores it slows a 2-thread step of small ops 5-20x, far more than its CPU share.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIG = "configs/tiny.yaml"
VENV_TRL = ROOT / "benchmarks" / ".venv-trl"
TRL_RUNNER = ROOT / "benchmarks" / "trl_runner.py"
TRL_SPEC = "trl==1.16.*"  # the version the issue measured
TRL_FALLBACK = "trl>=1,<2"
# TRL's venv gets docrl's exact versions of these, so the model code and kernels are the same
PINNED = ("torch", "torchvision", "transformers", "peft", "accelerate", "pillow", "numpy")
THREADS = 2
PROMPTS_PER_STEP, ANSWERS_PER_PROMPT, MAX_NEW_TOKENS, LORA_RANK = 8, 4, 16, 8
LEARNING_RATE = 5e-4  # the tiny preset's; TRL gets whatever docrl's validated config ends up with
WARMUP_STEPS = 2
# docrl's phase split of a step (learner_s holds the scoring pass, the training and the round trips)
PHASES = ("time/rollout_and_reward_s", "time/learner_s", "learner/score_seconds", "learner/train_seconds",
          "time/weight_sync_s")
RUN_TIMEOUT_S = 3600
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false", "RAY_USAGE_STATS_ENABLED": "0"}


def say(text: str) -> None:
    print(f"[bench_vs_trl {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# TRL's virtual environment


def uv_command() -> list[str]:
    return [shutil.which("uv")] if shutil.which("uv") else ["python3", "-m", "uv"]


def trl_python() -> Path:
    return VENV_TRL / "bin" / "python"


def ensure_trl_venv() -> str:
    """Create or update benchmarks/.venv-trl; returns its trl version. Rebuilt whenever docrl's
    pinned versions change (a stamp file records what it was built against)."""
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in PINNED]
    stamp = VENV_TRL / "docrl-pins.json"
    if not (stamp.exists() and json.loads(stamp.read_text()) == pins):
        uv = uv_command()
        if not trl_python().exists():
            say(f"creating {VENV_TRL.relative_to(ROOT)}")
            subprocess.run([*uv, "venv", str(VENV_TRL), "--python", sys.executable], check=True)
        # the default index, as docrl's uv.lock: uv's cache already holds these wheels
        for trl in (TRL_SPEC, TRL_FALLBACK):
            say(f"installing {trl} with {' '.join(pins)}")
            # compiled now, not inside the first timed steps of the first run
            done = subprocess.run([*uv, "pip", "install", "--compile-bytecode", "--python", str(trl_python()), trl, *pins])
            if done.returncode == 0:
                break
        else:
            raise SystemExit("could not install trl into benchmarks/.venv-trl (see uv's output above)")
        stamp.write_text(json.dumps(pins))
    return trl_versions()["trl"]


def trl_versions() -> dict[str, str]:
    names = ("trl", *PINNED)
    code = f"import importlib.metadata as m, json; print(json.dumps({{n: m.version(n) for n in {names!r}}}))"
    return json.loads(subprocess.run([str(trl_python()), "-c", code], check=True, capture_output=True,
                                     text=True).stdout)


# ---------------------------------------------------------------------------------------------
# the work both sides do


def docrl_overrides(policy: Path, data_dir: Path, steps: int, extra: list[str]) -> list[str]:
    """Everything but run.output_dir and trainer.mode."""
    return [
        f"learner.policy={policy}", f"data.path={data_dir}", f"trainer.total_steps={steps}",
        f"trainer.prompts_per_step={PROMPTS_PER_STEP}", f"rollout.sampling.n={ANSWERS_PER_PROMPT}",
        f"rollout.sampling.max_tokens={MAX_NEW_TOKENS}", "rollout.sampling.temperature=1.0",
        "learner.dtype=float32", "rollout.dtype=float32", f"learner.learning_rate={LEARNING_RATE}",
        "learner.lora.enabled=true", f"learner.lora.r={LORA_RANK}", "learner.freeze_vision_tower=true",
        "algorithm.kl_coef=0", f"algorithm.minibatch_size={PROMPTS_PER_STEP * ANSWERS_PER_PROMPT}",
        "algorithm.ppo_epochs=1",
        "trainer.warm_start.steps=0", "trainer.eval_every=0", "trainer.save_every=0", "data.max_eval_samples=4",
        # 2 threads for the rollout worker and for the learner rank, as TRL's one process; the
        # local cluster's logical CPUs must then hold retriever 1 + rollout 2 + reward 1 + learner 2
        f"rollout.num_cpus_per_worker={THREADS}", f"learner.num_cpus_per_rank={THREADS}", "ray.num_cpus=6",
        *extra,
    ]


def prepare_work(size: str, steps: int, work_dir: Path, extra: list[str]) -> tuple[Path, list[str], dict]:
    """Build the checkpoint and the data, and write the TRL side's work file. Returns (work file,
    docrl overrides, a summary of the prompts)."""
    from transformers import AutoProcessor

    from cluster.config import load_config
    from cluster.train import QuestionSampler
    from docvqa.data import ensure_synthetic, load_train_eval
    from docvqa.tiny_models import build_tiny_models
    from learner.model import lora_target_regex
    from rollout.prompts import build_chat_text, build_messages, fit_image

    models_dir = ROOT / load_config(ROOT / CONFIG).run.models_dir
    policy = build_tiny_models(models_dir, size=size)["policy"]
    overrides = docrl_overrides(policy, work_dir / "data", steps, extra)
    # validates every key as `docrl train` will (a typo is refused here, before any run)
    cfg = load_config(ROOT / CONFIG, [*overrides, f"run.output_dir={work_dir / 'unused'}"])
    ensure_synthetic(cfg.data, work_dir)
    train, _, _ = load_train_eval(cfg.data, work_dir)
    # the questions in the order docrl's trainer draws them, step after step
    sampler = QuestionSampler(train.samples, cfg.run.seed)
    questions = [q for _ in range(steps) for q in sampler.next(cfg.trainer.prompts_per_step)]

    processor = AutoProcessor.from_pretrained(str(policy))
    ro = cfg.rollout
    (work_dir / "images").mkdir(exist_ok=True)
    samples = []
    for i, q in enumerate(questions):
        image = fit_image(train.pages[q.gold_page].load_image(), ro.max_image_pixels)
        image_path = work_dir / "images" / f"{i}.png"  # PNG: the same pixels on both sides
        image.save(image_path)
        messages = build_messages(q.question, 1, ro.system_prompt, ro.instruction)
        # TRL takes plain-text messages and puts the image before the first user text, as docrl does
        plain = [{"role": m["role"], "content": next(p["text"] for p in m["content"] if p["type"] == "text")}
                 for m in messages]
        text = build_chat_text(processor, q.question, 1, ro.system_prompt, ro.instruction)
        ids = list(processor(text=[text], images=[image])["input_ids"][0])
        samples.append({"messages": plain, "image": str(image_path), "answers": list(q.answers), "prompt_ids": ids})

    lengths = [len(s["prompt_ids"]) for s in samples]
    image_tokens = samples[0]["prompt_ids"].count(processor.tokenizer.convert_tokens_to_ids("<|image_pad|>"))
    first_text = build_chat_text(processor, questions[0].question, 1, ro.system_prompt, ro.instruction)
    say(f"{size}: {len(samples)} prompts of {min(lengths)}-{max(lengths)} tokens ({image_tokens} visual in the "
        f"first); the first prompt's text (one pad per image, expanded by the processor):\n{first_text}")
    lora = cfg.learner.lora
    work = {
        "policy": str(policy), "seed": cfg.run.seed, "threads": THREADS, "steps": steps,
        "prompts_per_step": cfg.trainer.prompts_per_step, "n": ro.sampling.n, "max_tokens": ro.sampling.max_tokens,
        "temperature": ro.sampling.temperature, "learning_rate": cfg.learner.learning_rate,
        "lora": {"r": lora.r, "alpha": lora.alpha, "dropout": lora.dropout,
                 "target_regex": lora_target_regex(lora.target_modules)},
        "samples": samples,
    }
    work_file = work_dir / "work.json"
    work_file.write_text(json.dumps(work))
    return work_file, overrides, {"prompt_tokens": [min(lengths), max(lengths)], "visual_tokens": image_tokens,
                                  "learning_rate": cfg.learner.learning_rate, "lora_alpha": lora.alpha}


# ---------------------------------------------------------------------------------------------
# one run of each system


def child_env() -> dict[str, str]:
    # Ray starts its workers (docrl's rollout, learner and reward actors) at niceness 15 unless
    # told otherwise; on a machine shared with other work they would then lose the cores to it
    # while TRL's process, at 0, would not. Both sides run at 0.
    env = {**os.environ, **OFFLINE_ENV, "RAY_worker_niceness": "0"}
    env.pop("RAY_ADDRESS", None)  # a fresh local cluster per run, never someone else's
    return env


def step_rows(run_dir: Path) -> list[dict]:
    """The per-step metric rows of a docrl run (none when it never reached a training step)."""
    from cluster.metrics import read_jsonl

    metrics = run_dir / "logs" / "metrics.jsonl"
    return [r for r in read_jsonl(metrics) if "time/step_s" in r] if metrics.exists() else []


def run_docrl(mode: str, overrides: list[str], out_dir: Path, attempts: int = 4) -> dict:
    for attempt in range(1, attempts + 1):
        run_dir = out_dir.with_name(f"{out_dir.name}-try{attempt}")
        cmd = [sys.executable, "-m", "cluster.cli", "train", "--config", CONFIG, *overrides,
               f"run.output_dir={run_dir}", f"trainer.mode={mode}"]
        done = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
        if done.returncode == 0:
            break
        # On a machine loaded by other work a local Ray cluster sometimes fails to start in time
        # ("timed out during startup"); such a run never reached training, so run it again.
        if step_rows(run_dir) or attempt == attempts:
            raise RuntimeError(f"docrl {mode} run failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
        say(f"  docrl {mode} failed before training (try {attempt}: {done.stderr.strip().splitlines()[-1][:200]}); "
            "again when the machine is quieter")
        wait_for_quiet(0.3, 120)
    rows = step_rows(run_dir)[WARMUP_STEPS:]
    return {"step_s": [r["time/step_s"] for r in rows],
            "completion_mean_length": [r["learner/response_length_mean"] for r in rows if "learner/response_length_mean" in r],
            **{k: [r[k] for r in rows if k in r] for k in PHASES}}


def run_trl(work_file: Path, out_file: Path) -> dict:
    env = {**child_env(), "OMP_NUM_THREADS": str(THREADS)}
    done = subprocess.run([str(trl_python()), str(TRL_RUNNER), str(work_file), str(out_file)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    if done.returncode:
        raise RuntimeError(f"TRL run failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    say(next((line for line in done.stdout.splitlines() if line.startswith("trl_runner:")), "trl_runner: no check line"))
    result = json.loads(out_file.read_text())
    result["step_s"] = result["step_s"][WARMUP_STEPS:]
    result["completion_mean_length"] = result["completion_mean_length"][WARMUP_STEPS:]
    result["interval_s"] = result["interval_s"][WARMUP_STEPS - 1:]  # interval i ends at step i + 1
    result["cpu_s"] = result["cpu_s"][WARMUP_STEPS:]
    return result


def cpu_busy(window_s: float = 5.0) -> float:
    """Cores busy over the next window_s seconds, from /proc/stat (between runs that is all other
    work: this script idles while it measures)."""
    def sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait

    total0, idle0 = sample()
    time.sleep(window_s)
    total1, idle1 = sample()
    return (os.cpu_count() or 1) * (1 - (idle1 - idle0) / max(1, total1 - total0))


def wait_for_quiet(max_busy: float, max_wait_s: float) -> float:
    """Wait (at most max_wait_s) until other work keeps at most max_busy cores busy. With 2 threads
    on 2 cores a step of small ops slows down far more than the CPU share it loses (each op waits at
    its barrier for a thread that the scheduler gave away), so a run that starts in a burst of other
    work measures the burst. Returns the cores busy when the run starts."""
    deadline = time.monotonic() + max_wait_s
    busy = cpu_busy()
    while busy > max_busy and time.monotonic() < deadline:
        busy = cpu_busy()
    return busy


def bench_size(size: str, steps: int, rounds: int, extra: list[str], tmp: Path, max_busy: float,
               max_wait_s: float) -> dict:
    work_dir = tmp / size
    work_dir.mkdir()
    work_file, overrides, prompts = prepare_work(size, steps, work_dir, extra)
    order = ["docrl sync", "TRL GRPOTrainer", "docrl async"]
    runs = []  # one entry per run: system, round, measured step seconds, loads, phases, lengths
    for r in range(rounds):
        for system in order if r % 2 == 0 else order[::-1]:  # flipped each round
            busy = wait_for_quiet(max_busy, max_wait_s)
            load_start = os.getloadavg()[0]
            say(f"{size}, round {r + 1}/{rounds}: {system} ({steps} steps; other work busy on {busy:.2f} cores, "
                f"1-min load {load_start:.1f})")
            if system.startswith("docrl"):
                mode = system.split()[1]
                got = run_docrl(mode, overrides, work_dir / f"docrl-{mode}-{r}")
            else:
                got = run_trl(work_file, work_dir / f"trl-{r}.json")
            runs.append({"system": system, "round": r, "busy_cores_before": busy, "load_start": load_start,
                         "load_end": os.getloadavg()[0], **got})
            say(f"  {system}: s/step {', '.join(f'{x:.2f}' for x in got['step_s'])} (load at the end "
                f"{runs[-1]['load_end']:.1f})")

    def pooled(system: str, key: str) -> list[float]:
        return [x for run in runs if run["system"] == system for x in run.get(key, [])]

    def best_run(system: str) -> float:
        # Other work only ever slows a run down, so each system's fastest run (by its median) is
        # the closest to what it costs on cores of its own.
        return min(statistics.median(run["step_s"]) for run in runs if run["system"] == system)

    batch = PROMPTS_PER_STEP * ANSWERS_PER_PROMPT
    trl_s = statistics.median(pooled("TRL GRPOTrainer", "step_s"))
    rows = {}
    for system in ("docrl sync", "docrl async", "TRL GRPOTrainer"):
        s = statistics.median(pooled(system, "step_s"))
        lengths = pooled(system, "completion_mean_length")
        rows[system] = {"s_per_step": s, "completions_per_s": batch / s, "vs_trl": trl_s / s,
                        "best_run_s_per_step": best_run(system),
                        "best_run_vs_trl": best_run("TRL GRPOTrainer") / best_run(system),
                        "steps_measured": len(pooled(system, "step_s")),
                        "mean_new_tokens": statistics.mean(lengths) if lengths else float("nan"),
                        **{k: statistics.median(pooled(system, k)) for k in PHASES if pooled(system, k)}}
    # the same comparison within each round (its runs are minutes apart, the rounds may not be)
    per_round = []
    for r in range(rounds):
        medians = {run["system"]: statistics.median(run["step_s"]) for run in runs if run["round"] == r}
        per_round.append({"round": r + 1, "s_per_step": medians,
                          "vs_trl": {k: medians["TRL GRPOTrainer"] / v for k, v in medians.items()},
                          "load": [min(run["load_start"] for run in runs if run["round"] == r),
                                   max(run["load_end"] for run in runs if run["round"] == r)]})
    loads = [x for run in runs for x in (run["load_start"], run["load_end"])]
    return {"size": size, "steps_per_run": steps, "rounds": rounds, "prompts": prompts, "rows": rows,
            "per_round": per_round, "trl_interval_s": statistics.median(pooled("TRL GRPOTrainer", "interval_s")),
            # CPU seconds TRL's process used per step (all threads): compared with its wall time, how
            # much of the step it waited for the cores
            "trl_cpu_s": statistics.median(pooled("TRL GRPOTrainer", "cpu_s")),
            "load_1min": [min(loads), max(loads)],
            "runs": [{k: v for k, v in run.items() if k in ("system", "round", "busy_cores_before", "load_start", "load_end", "step_s", "cpu_s")}
                     for run in runs]}


def print_table(results: list[dict]) -> None:
    print("| size | system | s/step | completions/s | vs TRL | best run s/step | best runs vs TRL | rollout+reward s "
          "| learner s | of which scoring pass s | of which training s | weight sync s | new tokens/answer | steps |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for res in results:
        for system, m in res["rows"].items():
            cells = [f"{m[k]:.3f}" if k in m else "–" for k in PHASES]
            print(f"| {res['size']} | {system} | {m['s_per_step']:.3f} | {m['completions_per_s']:.1f} "
                  f"| {m['vs_trl']:.2f}x | {m['best_run_s_per_step']:.3f} | {m['best_run_vs_trl']:.2f}x "
                  f"| {' | '.join(cells)} | {m['mean_new_tokens']:.1f} | {m['steps_measured']} |")
    print("\nPer round (median s/step of each run; vs TRL within the round):\n")
    print("| size | round | docrl sync | docrl async | TRL GRPOTrainer | sync vs TRL | async vs TRL | 1-min load |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for res in results:
        for rnd in res["per_round"]:
            s, v = rnd["s_per_step"], rnd["vs_trl"]
            print(f"| {res['size']} | {rnd['round']} | {s['docrl sync']:.3f} | {s['docrl async']:.3f} "
                  f"| {s['TRL GRPOTrainer']:.3f} | {v['docrl sync']:.2f}x | {v['docrl async']:.2f}x "
                  f"| {rnd['load'][0]:.1f}-{rnd['load'][1]:.1f} |")
    for res in results:
        p = res["prompts"]
        print(f"\n{res['size']}: {res['rounds']} round(s) x {res['steps_per_run']} steps per system, the first "
              f"{WARMUP_STEPS} of each run dropped; prompts of {p['prompt_tokens'][0]}-{p['prompt_tokens'][1]} tokens "
              f"({p['visual_tokens']} visual), the same ids on both sides; TRL's wall time from one step's end to "
              f"the next (data loading and logging included) {res['trl_interval_s']:.3f} s, CPU time of its "
              f"process per step {res['trl_cpu_s']:.3f} s; 1-min load average "
              f"{res['load_1min'][0]:.1f}-{res['load_1min'][1]:.1f} on {os.cpu_count()} cores")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=("tiny", "100m", "both"), default="both")
    ap.add_argument("--steps", type=int, default=None, help="steps per run (default 8 for tiny, 4 for 100m)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="tiny only, 4 steps, one round")
    ap.add_argument("--setup", action="store_true", help="only create or update benchmarks/.venv-trl")
    ap.add_argument("--max-busy", type=float, default=0.3,
                    help="wait before each run until other work keeps at most this many cores busy")
    ap.add_argument("--max-wait", type=float, default=300.0, help="seconds to wait for that at most, per run")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="one more docrl config override (repeatable), e.g. learner.micro_batch_size=32")
    args = ap.parse_args()
    trl_version = ensure_trl_venv()
    if args.setup:
        print(json.dumps(trl_versions()))
        return
    sizes = ["tiny"] if args.quick else (["tiny", "100m"] if args.size == "both" else [args.size])
    rounds = 1 if args.quick else args.rounds
    versions = trl_versions()
    say(f"trl {trl_version}, transformers {versions['transformers']}, torch {versions['torch']}")
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-vs-trl-") as tmp:
        for size in sizes:
            steps = args.steps or (4 if args.quick else 8 if size == "tiny" else 4)
            if steps <= WARMUP_STEPS:
                raise SystemExit(f"--steps must exceed the {WARMUP_STEPS} warm-up steps each run drops")
            results.append(bench_size(size, steps, rounds, args.set, Path(tmp), args.max_busy, args.max_wait))
            # each size's table as soon as it is measured: a later failure does not take it along
            print(f"\ndocrl vs TRL {trl_version} GRPOTrainer: {PROMPTS_PER_STEP} prompts x {ANSWERS_PER_PROMPT} "
                  f"answers, <= {MAX_NEW_TOKENS} new tokens, fp32, LoRA r={LORA_RANK}, kl 0, {THREADS} threads; "
                  "medians\n", flush=True)
            print_table(results[-1:])
            print(json.dumps({"versions": versions, "docrl_overrides": args.set, "results": results[-1:]}), flush=True)


if __name__ == "__main__":
    main()

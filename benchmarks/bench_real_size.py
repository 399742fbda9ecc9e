"""Real-size models on this CPU (opt-in, not in CI): do the presets' settings fit real dimensions?

    .venv/bin/python benchmarks/bench_real_size.py                        # both pairs, every phase
    .venv/bin/python benchmarks/bench_real_size.py --pair qwen2_vl --phases build,doctor
    .venv/bin/python benchmarks/bench_real_size.py --workdir /tmp/realsize --keep   # keep the builds
    .venv/bin/python benchmarks/bench_real_size.py --pair qwen2_5_vl --phases build,train \
        --set rollout.max_image_pixels=802816                               # try another setting

Two pairs, each a preset of configs/:

    qwen2_5_vl   Qwen2.5-VL-3B-Instruct policy, ColQwen2.5-3B retriever   (colqwen25-qwen25vl-3b-docvqa.yaml)
    qwen2_vl     Qwen2-VL-2B-Instruct policy,   GME-Qwen2-VL-2B retriever (gme-qwen2vl-2b-docvqa.yaml)

Nothing is downloaded. Each model is built here with random weights (bf16, seeded) from its hub
configuration, written out below: the real layer counts and widths, the real vision towers (depth
32, 16 heads, Qwen2.5-VL's windowed attention with full attention in blocks 7/15/23/31), the real
151,936-entry vocabulary with tied embeddings, and the real image processor bounds (3,136 to
12,845,056 pixels). The tokenizer is the tiny byte-level BPE padded with filler tokens to the full
vocabulary, so that every id a random model samples decodes. Pages are synthetic scans of
1000x1300 pixels (`docvqa.synthetic`).

Phases, each its own process (tree), in this order for each pair:

    build      the policy and the retriever checkpoints (random weights, safetensors)
    retriever  `docrl index` of the 4 pages, then `docrl search` of 2 questions, with the preset's
               retriever settings (ColQwen2.5: 768 visual tokens a page; GME: its own 256-1280)
    doctor     `docrl doctor --page-size 1000x1300` in the preset's rollout dtype (bf16): vLLM
               against transformers on the base weights, sampled answers, a LoRA push of the
               preset's rank; the full push where three copies of the weights fit (2B, not 3B)
    train      `docrl train`: one LoRA GRPO step, 2 questions x 2 answers, the preset's learner
               and rollout settings (bf16, LoRA r=64, micro-batch 2, gradient checkpointing, 64
               new tokens, max_model_len 4096, 2048-token page budget), gold pages, one greedy
               evaluation question before and after, and the final checkpoint

What is cut from the presets to fit one 2-core machine: one Ray CPU node (4 logical CPUs), one
rollout worker, one learner rank, `rollout.kv_cache_gb: 2`, and LoRA pushed as an adapter
(`rollout.lora_push: adapter`, the GPU default): the CPU default, merged weights, puts two more
copies of the full weights on the learner's host at each push.

Measured for each phase: wall time; the peak of the machine's used memory (total - available:
what the phase really takes, page cache excluded) above what was used before the phase began;
and, for each process kind (the CLI driver, each Ray actor class by its process title, Ray's own
daemons), the peak resident memory (RSS, which counts a memory-mapped checkpoint's pages) and the
peak resident anonymous memory (what the processes allocated themselves). Sampled every second,
so a spike shorter than that can be missed. Results go to <workdir>/results.json and a markdown
table on stdout (benchmarks/RESULTS.md, "Real sizes on CPU").
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PAGE_SIZE = (1000, 1300)
VOCAB = 151936  # Qwen2-VL's and Qwen2.5-VL's embedding rows (151,665 tokens, padded)

# Hub configuration of each model, as in its config.json (text and vision sections).
QWEN2_VL_2B = {  # Qwen/Qwen2-VL-2B-Instruct; also the backbone of Alibaba-NLP/gme-Qwen2-VL-2B-Instruct
    "text": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6),
    "vision": dict(depth=32, embed_dim=1280, mlp_ratio=4, num_heads=16, hidden_size=1536, patch_size=14,
                   spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
}
QWEN2_5_VL_3B = {  # Qwen/Qwen2.5-VL-3B-Instruct; also the base of Metric-AI/colqwen2.5-3b-base
    "text": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                 num_key_value_heads=2, max_position_embeddings=128000, rms_norm_eps=1e-6),
    "vision": dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                   fullatt_block_indexes=[7, 15, 23, 31], window_size=112, hidden_act="silu",
                   tokens_per_second=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                   in_channels=3),
}

PAIRS = {
    "qwen2_5_vl": {"preset": "configs/colqwen25-qwen25vl-3b-docvqa.yaml", "policy": QWEN2_5_VL_3B,
                   "retriever": "colqwen2_5", "full_push": False},
    "qwen2_vl": {"preset": "configs/gme-qwen2vl-2b-docvqa.yaml", "policy": QWEN2_VL_2B,
                 "retriever": "gme", "full_push": True},
}
PHASES = ("build", "retriever", "doctor", "train")
QUESTIONS = ("What is the date on this page?", "What is the total amount?")


# -- building the models -----------------------------------------------------------------------


def _config(family: str, dims: dict, special_ids: dict[str, int]):
    """A transformers config of `family` ("qwen2_vl" or "qwen2_5_vl") with the hub dimensions."""
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    from docvqa.tiny_models import _vision_token_ids

    ids = dict(bos_token_id=special_ids["<|endoftext|>"], eos_token_id=special_ids["<|im_end|>"],
               pad_token_id=special_ids["<|endoftext|>"])
    text = dict(dims["text"], vocab_size=VOCAB, tie_word_embeddings=True,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}, **ids)
    config_cls = Qwen2VLConfig if family == "qwen2_vl" else Qwen2_5_VLConfig
    return config_cls(text_config=text, vision_config=dict(dims["vision"]), **_vision_token_ids(special_ids),
                      tie_word_embeddings=True, **ids)


def shrunk(dims: dict) -> dict:
    """`dims` with 2 language layers and 2 vision blocks (the second one full attention)."""
    vision = dict(dims["vision"], depth=2)
    if "fullatt_block_indexes" in vision:
        vision["fullatt_block_indexes"] = [1]
    return {"text": dict(dims["text"], num_hidden_layers=2), "vision": vision}


def full_vocabulary_tokenizer():
    """The tiny byte-level BPE with plain vocabulary entries "<|fillerN|>" up to the real size and
    the special tokens last (ids VOCAB-14 to VOCAB-1): every id a random model samples decodes, and,
    unlike 150,000 added tokens, it loads in a second and 70 MB."""
    from tokenizers import Tokenizer

    from docvqa.tiny_models import SPECIAL_TOKENS, train_tokenizer

    spec = json.loads(train_tokenizer(8192).to_str())
    spec["added_tokens"] = []
    vocab = spec["model"]["vocab"]
    first = len(vocab)
    for i in range(VOCAB - len(SPECIAL_TOKENS) - first):
        vocab[f"<|filler{i}|>"] = first + i
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.add_special_tokens(SPECIAL_TOKENS)
    assert tok.get_vocab_size() == VOCAB
    return tok


def build(out: Path, family: str, dims: dict, kind: str, seed: int, device: str = "cpu") -> Path:
    """Random bf16 weights of the real dimensions at `out`: kind "policy" (the family's
    ForConditionalGeneration), "colqwen2_5" (colpali-engine's ColQwen2_5) or "gme" (a Qwen2-VL
    checkpoint plus GME's page token bounds). `device`: where the weights are made and drawn (a
    GPU makes a 3B model in seconds)."""
    import torch
    from transformers import AutoTokenizer, Qwen2VLProcessor
    from transformers.models.qwen2_vl import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    from common.policy_family import policy_classes
    from docvqa.tiny_models import QWEN2_VL_CHAT_TEMPLATE, _save_tokenizer, _seeded_init

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    special_ids = _save_tokenizer(full_vocabulary_tokenizer(), out)
    config = _config(family, dims, special_ids)
    if kind == "policy":
        model_cls, processor_cls = policy_classes(family)
    elif kind == "colqwen2_5":
        from colpali_engine.models import ColQwen2_5, ColQwen2_5_Processor as processor_cls

        model_cls = ColQwen2_5
    else:  # gme
        from transformers import Qwen2VLForConditionalGeneration as model_cls

        from retriever.gme import MAX_IMAGE_TOKENS, MIN_IMAGE_TOKENS

        processor_cls = Qwen2VLProcessor
        config.min_image_tokens, config.max_image_tokens = MIN_IMAGE_TOKENS, MAX_IMAGE_TOKENS
    with torch.device(device):
        model = model_cls._from_config(config, dtype=torch.bfloat16)
    _seeded_init(model, seed, device=device)
    if getattr(model, "generation_config", None) is not None:  # a generative model (not ColQwen2.5)
        model.generation_config.eos_token_id = [special_ids["<|im_end|>"], special_ids["<|endoftext|>"]]
        model.generation_config.pad_token_id = special_ids["<|endoftext|>"]
    model.save_pretrained(out)
    processor = processor_cls(image_processor=Qwen2VLImageProcessor(),  # the hub bounds: 3,136-12,845,056 pixels
                              tokenizer=AutoTokenizer.from_pretrained(out), video_processor=Qwen2VLVideoProcessor(),
                              chat_template=QWEN2_VL_CHAT_TEMPLATE)
    processor.save_pretrained(out)
    params = sum(p.numel() for p in model.parameters())
    (out / "real_size.json").write_text(json.dumps({"family": family, "kind": kind, "parameters": params}) + "\n")
    return out


# -- measuring memory --------------------------------------------------------------------------


def _kind(proc, root_pid: int) -> str:
    """What a process is: the driver, a Ray actor class ("ray::LearnerRank"), or a Ray daemon."""
    if proc.pid == root_pid:
        return "driver"
    cmd = proc.cmdline()
    if cmd and cmd[0].startswith("ray::"):
        return cmd[0].split(".")[0].split(" ")[0]
    name = Path(cmd[0]).name if cmd else proc.name()
    return "ray daemons" if any(d in " ".join(cmd[:3]) for d in ("gcs_server", "raylet", "dashboard", "log_monitor",
                                                                 "monitor.py", "runtime_env", "ray_client")) else name


def _rss_and_anon(pid: int) -> tuple[float, float]:
    """A process's resident memory and the anonymous part of it (what it allocated itself, without
    Ray's shared object store or file pages such as memory-mapped checkpoints), in GiB, from
    /proc/PID/status: a constant-time read (PSS would walk the page tables of a 13 GB process,
    0.13 s a read, and perturb what is measured)."""
    values = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "RssAnon"):
                values[key] = int(rest.split()[0]) / 2**20
    return values.get("VmRSS", 0.0), values.get("RssAnon", 0.0)


class MemorySampler:
    """Every `interval` s: machine memory used above the start, and resident and resident
    anonymous memory per process kind in the process tree of `root_pid`; keeps the peaks."""

    def __init__(self, root_pid: int, interval: float = 1.0):
        import psutil

        self.psutil, self.root_pid, self.interval = psutil, root_pid, interval
        self.base_used = self._used()
        self.peak_used = 0.0
        self.peak_by_kind: dict[str, float] = {}
        self.peak_anon_by_kind: dict[str, float] = {}
        self.peak_tree = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _used(self) -> float:
        vm = self.psutil.virtual_memory()
        return (vm.total - vm.available) / 2**30

    def _sample(self) -> None:
        self.peak_used = max(self.peak_used, self._used() - self.base_used)
        try:
            root = self.psutil.Process(self.root_pid)
            procs = [root] + root.children(recursive=True)
        except self.psutil.NoSuchProcess:
            return
        by_kind: dict[str, float] = {}
        anon_by_kind: dict[str, float] = {}
        for p in procs:
            try:
                rss, anon = _rss_and_anon(p.pid)
                kind = _kind(p, self.root_pid)
            except (self.psutil.NoSuchProcess, self.psutil.AccessDenied, self.psutil.ZombieProcess, OSError):
                continue
            by_kind[kind] = by_kind.get(kind, 0.0) + rss
            anon_by_kind[kind] = anon_by_kind.get(kind, 0.0) + anon
        for kind, gib in by_kind.items():
            self.peak_by_kind[kind] = max(self.peak_by_kind.get(kind, 0.0), gib)
        for kind, gib in anon_by_kind.items():
            self.peak_anon_by_kind[kind] = max(self.peak_anon_by_kind.get(kind, 0.0), gib)
        self.peak_tree = max(self.peak_tree, sum(by_kind.values()))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        return {"peak_used_gib": round(self.peak_used, 2), "peak_tree_rss_gib": round(self.peak_tree, 2),
                "peak_rss_gib_by_kind": {k: round(v, 2) for k, v in sorted(self.peak_by_kind.items(), key=lambda kv: -kv[1])
                                         if v >= 0.05},
                "peak_anon_gib_by_kind": {k: round(v, 2) for k, v in sorted(self.peak_anon_by_kind.items(),
                                                                            key=lambda kv: -kv[1]) if v >= 0.05}}


def run_phase(name: str, cmd: list[str], log: Path, timeout_s: float) -> dict:
    """Run `cmd` (its own process group) to completion, sampling its memory; returns the figures."""
    print(f"[{time.strftime('%H:%M:%S')}] {name} (log: {log})", flush=True)
    t0 = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
        sampler = MemorySampler(proc.pid)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            rc = "timeout"
        memory = sampler.stop()
    result = {"phase": name, "rc": rc, "wall_s": round(time.perf_counter() - t0, 1), **memory}
    print(f"    rc {rc}, {result['wall_s']:.0f} s, peak used +{memory['peak_used_gib']:.1f} GiB, "
          f"RSS by kind {memory['peak_rss_gib_by_kind']}, anonymous {memory['peak_anon_gib_by_kind']}", flush=True)
    return result


# -- the phases --------------------------------------------------------------------------------


def overrides(work: Path, policy: Path, retriever: Path) -> list[str]:
    """The preset cut to one 2-core machine (module docstring): cluster size and paths only."""
    return [
        f"run.output_dir={work / 'run'}", f"run.models_dir={work / 'tiny'}",
        "ray.num_cpus=4", "ray.num_gpus=0", "ray.actor_start_timeout_s=1800",
        "data.source=docvqa_json", f"data.path={work / 'data'}", "data.train_split=train", "data.eval_split=val",
        "data.holdout_fraction=0", "data.max_eval_samples=1",
        f"retriever.model={retriever}", "retriever.num_actors=1", "retriever.num_gpus_per_actor=0",
        "retriever.num_cpus_per_actor=1", "retriever.embed_batch_size=1", f"retriever.index_dir={work / 'index'}",
        "rollout.num_workers=1", "rollout.num_gpus_per_worker=0", "rollout.num_cpus_per_worker=1",
        "rollout.kv_cache_gb=2", "rollout.sampling.n=2", "rollout.lora_push=adapter",
        "rollout.generate_timeout_s=3600", "rollout.weight_sync_timeout_s=1800",
        f"learner.policy={policy}", "learner.num_ranks=1", "learner.num_gpus_per_rank=0", "learner.num_cpus_per_rank=1",
        "algorithm.minibatch_size=4",
        "trainer.total_steps=1", "trainer.prompts_per_step=2", "trainer.eval_every=0", "trainer.save_every=0",
    ]


def run_pair(name: str, pair: dict, work: Path, phases: list[str], results: list[dict], smoke: bool = False,
             extra: list[str] = ()) -> None:
    from docvqa.synthetic import generate_corpus

    work.mkdir(parents=True, exist_ok=True)
    policy, retriever = work / "policy", work / f"retriever-{pair['retriever']}"
    if not (work / "data" / "documents").is_dir():  # rendered once: an index built from it stays valid
        generate_corpus(work / "data", num_documents=3, seed=0, level="realistic", val_fraction=0.34,
                        page_size=PAGE_SIZE, questions_per_document=2)
    docrl = [str(ROOT / ".venv" / "bin" / "docrl")]
    cli = ["--config", str(ROOT / pair["preset"]), *overrides(work, policy, retriever), *extra]
    py = [sys.executable, __file__] + (["--smoke"] if smoke else [])

    def record(phase: str, cmd: list[str], timeout_s: float = 7200) -> dict:
        r = run_phase(f"{name} {phase}", cmd, work / f"{phase}.log", timeout_s)
        r["pair"] = name
        results.append(r)
        (work.parent / "results.json").write_text(json.dumps(results, indent=2))
        return r

    if "build" in phases:
        record("build policy", py + ["--build", str(policy), "--family", name, "--kind", "policy"])
        record("build retriever", py + ["--build", str(retriever), "--family", name, "--kind", pair["retriever"]])
    if "retriever" in phases:
        record("index", docrl + ["index"] + cli)
        record("search", docrl + ["search"] + cli + [a for q in QUESTIONS for a in ("-q", q)])
    if "doctor" in phases:
        # bf16 on both sides: the figures show agreement at bf16 precision, not the fp32 1e-3 target
        record("doctor", docrl + ["doctor"] + cli + ["--page-size", f"{PAGE_SIZE[0]}x{PAGE_SIZE[1]}",
                                                     "--tolerance", "1e9"]
               + ([] if pair["full_push"] else ["--skip-full-push"]))
    if "train" in phases:
        # gold pages: a third real-size model (the retriever) beside the rollout's and the learner's copies
        shutil.rmtree(work / "run", ignore_errors=True)  # a fresh run, not a resumable one
        r = record("train", docrl + ["train"] + cli + ["retriever.use_gold_page=true"])
        metrics = work / "run" / "logs" / "metrics.jsonl"
        if metrics.exists():
            rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
            step = next((row for row in rows if "time/step_s" in row), {})
            r["step_times_s"] = {k: round(v, 1) for k, v in step.items() if k.startswith("time/")}
            (work.parent / "results.json").write_text(json.dumps(results, indent=2))


def table(results: list[dict]) -> str:
    lines = ["| pair | phase | rc | wall s | peak used above start GiB | peak RSS (anonymous) by process kind GiB |",
             "|---|---|---|---:|---:|---|"]
    for r in results:
        anon = r["peak_anon_gib_by_kind"]
        kinds = ", ".join(f"{k} {v:.1f} ({anon.get(k, 0.0):.1f})" for k, v in list(r["peak_rss_gib_by_kind"].items())[:3])
        lines.append(f"| {r['pair']} | {r['phase'].split(' ', 1)[1]} | {r['rc']} | {r['wall_s']:.0f} | "
                     f"{r['peak_used_gib']:.1f} | {kinds} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pair", choices=[*PAIRS, "both"], default="both")
    ap.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated, of {', '.join(PHASES)}")
    ap.add_argument("--workdir", default="/tmp/docrl-real-size")
    ap.add_argument("--keep", action="store_true", help="keep the built models (several GB each)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="one more config override for every docrl command, after the benchmark's own "
                         "(repeatable), e.g. rollout.max_image_pixels=802816 to try 1,024-token pages")
    ap.add_argument("--build", help=argparse.SUPPRESS)  # internal: build one model in this process
    ap.add_argument("--family", help=argparse.SUPPRESS)
    ap.add_argument("--kind", help=argparse.SUPPRESS)
    ap.add_argument("--smoke", action="store_true",
                    help="2 language and 2 vision layers (real widths and vocabulary): checks this script in minutes")
    args = ap.parse_args()
    if args.build:
        dims = PAIRS[args.family]["policy"]
        build(Path(args.build), args.family, shrunk(dims) if args.smoke else dims, args.kind,
              seed=0 if args.kind == "policy" else 1)
        return 0
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = sorted(set(phases) - set(PHASES))
    if unknown:
        ap.error(f"unknown phase(s) {unknown}; phases: {', '.join(PHASES)}")
    work = Path(args.workdir)
    results: list[dict] = []
    for name in (PAIRS if args.pair == "both" else [args.pair]):
        run_pair(name, PAIRS[name], work / name, phases, results, smoke=args.smoke, extra=args.set)
        if not args.keep and "build" in phases:
            for d in (work / name).glob("policy"), (work / name).glob("retriever-*"):
                for path in d:
                    shutil.rmtree(path, ignore_errors=True)
    print(table(results))
    for r in results:
        if "step_times_s" in r:
            print(f"{r['pair']} train step times (s): {r['step_times_s']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

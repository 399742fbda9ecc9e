"""The device check: docrl's roles at real sizes on one lent GPU, in one command, printing one table.

On the lent GPU machine (one H100 or H200, Python 3.12 with torch, transformers, peft, accelerate;
no Ray, no vLLM, no DeepSpeed, no pydantic, no colpali-engine, no network):

    bash benchmarks/device_wheels.sh          # here, once: the missing wheels into .whl/ (~6 MiB)
    # then on the device, with .whl carried along (git-ignored: name it in the call's carry list):
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
    python3 benchmarks/device_check.py        # --budget-s 480 by default; --json FILE
    python3 benchmarks/device_check.py --dry-run   # anywhere: every row on CPU at toy sizes (CI)

How it differs from benchmarks/gpu_check.sh: that one runs the full stack (real `docrl` commands:
vLLM rollouts, Ray actors, DeepSpeed ranks, weight pushes) on tiny and ~100M models, and needs
the `gpu` extra installed. This one needs none of Ray or vLLM: it runs docrl's plain role classes
in-process (`LearnerGroup(local=True)` and its `LearnerWorker` with DeepSpeed at world size 1,
`PageEncoder`, `maxsim_scores`, `rerank_shortlist`, `topk_pages`), at the real model sizes with
random weights, which is also a check that the role logic does not depend on Ray. Rows:

  environment            the imports; Ray and vLLM must stay unimported
  learner Qwen2-VL-2B    one LoRA GRPO update with configs/qwen2vl-2b-1gpu.yaml's learner and
                         rollout settings (bf16, LoRA r=64, micro-batch 2, gradient checkpointing,
                         pages fitted to 1,003,520 pixels: 1271 image tokens, 8 answers of ~60
                         tokens a prompt, its 64-answer minibatch); run twice, the second timed:
                         peak GPU memory, tokens/s, model FLOPs utilisation
  bf16 grad accumulation the learner's DeepSpeed engine (its own deepspeed_config) accumulating 8
                         micro-batches, against the fp32 sum of the same 8 micro-batch gradients
                         computed with plain autograd on a copy of the same bf16 weights
  bf16 vs fp32 logprobs  the learner's bf16 scoring pass against an fp32 copy of the same weights
                         (both on the 2B: an fp32 3B would cost the budget a second 3B build)
  learner Qwen2.5-VL-3B  the same update with configs/colqwen25-qwen25vl-3b-docvqa.yaml's settings
                         (1,605,632 pixels: a 1000x1300 page stays whole, 1240 image tokens; one
                         rank's share of its 8-rank minibatch: 32 answers)
  retriever GME-2B, ColQwen2.5-3B   pages/s embedding 1000x1300 synthetic pages in bf16 (PageEncoder)
  MaxSim 100k pages      32 queries over 100,000 pages of 600-800 x 128 random unit vectors, held
                         on the GPU in bf16: latency, and recall@10 against docrl's exact fp32 CPU
                         MaxSim over all pages (for a random subset of the queries: --exact-queries)

then one line: do the 1-GPU preset's roles (vLLM at gpu_memory_utilization 0.33, the learner,
the retriever) fit the GPU together, from the measured peaks.

Models are random weights of the real hub dimensions (benchmarks/bench_real_size.py's configs and
its full-vocabulary tokenizer), initialised on the device: on the CPU, the four models' 12B random
numbers (and transformers' own init before them) would take minutes of the budget. Pages are
docvqa.synthetic's realistic scans. `--dry-run` runs every row on CPU with toy widths (same code
paths, same builders, the full 151,936-entry vocabulary), small pages and a few hundred MaxSim
pages; its table says DRY RUN and has no GPU figures.

Stops: every row has a time limit (what the budget has left minus a reserve for the rows after
it); the budget, SIGINT and SIGTERM stop the run in the row they interrupt, which is reported
STOPPED, with the partial table printed. A row that raises is FAIL and the next row runs. Exit
code: 0 all rows PASS or measured, 1 a row failed, 124 the budget ran out, 128+N signal N.
With $OUT set, the table and the JSON are also written there (device_check.md, .json).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded: a stray hub call fails fast
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PEAK_BF16_TFLOPS = 989.0  # H100 SXM and H200: dense bf16 tensor-core peak (NVIDIA datasheets)
GRAD_RTOL = 1e-2  # bf16 grad accumulation vs the fp32 sum: max relative error per tensor (norm-wise)
RECALL_BAR = 0.95  # MaxSim recall@10 of the GPU search (bf16 + fp32 re-rank) vs exact fp32 CPU
ONE_GPU_PRESET = "configs/qwen2vl-2b-1gpu.yaml"
LEARNER_PRESETS = {"qwen2_vl": ONE_GPU_PRESET, "qwen2_5_vl": "configs/colqwen25-qwen25vl-3b-docvqa.yaml"}
MODEL_NAMES = {"qwen2_vl": "Qwen2-VL-2B", "qwen2_5_vl": "Qwen2.5-VL-3B", "gme": "GME-2B", "colqwen2_5": "ColQwen2.5-3B"}
GRAD_MICRO_BATCHES = 8

# Toy widths for --dry-run: the real builders and vocabulary, 2 layers of 128 (one 128-wide head:
# bench_real_size's mrope sections [16, 24, 24] need head_dim 128) and a 64-wide vision tower.
_TOY_TEXT = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=1,
                 num_key_value_heads=1, max_position_embeddings=4096, rms_norm_eps=1e-6)
TOY_DIMS = {
    "qwen2_vl": {"text": _TOY_TEXT, "vision": dict(depth=2, embed_dim=64, mlp_ratio=2, num_heads=2, hidden_size=128,
                                                   patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                                                   in_channels=3)},
    "qwen2_5_vl": {"text": _TOY_TEXT, "vision": dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2,
                                                     out_hidden_size=128, fullatt_block_indexes=[1], window_size=112,
                                                     hidden_act="silu", tokens_per_second=2, patch_size=14,
                                                     spatial_merge_size=2, temporal_patch_size=2, in_channels=3)},
}

# What each run measures on: the real sizes, or toys that keep the dry run under a minute or two.
REAL = dict(page_size=(1000, 1300), answer_len=(56, 64), retriever_pages=64, embed_batch=16, colqwen_tokens=768,
            gme_tokens=None, maxsim_pages=100_000, page_tokens=(600, 800), query_tokens=(16, 32), queries=32,
            exact_queries=4, maxsim_chunk=512, shortlist=32)
DRY = dict(page_size=(306, 396), answer_len=(6, 8), retriever_pages=4, embed_batch=2, colqwen_tokens=16,
           gme_tokens=16, maxsim_pages=300, page_tokens=(60, 80), query_tokens=(16, 32), queries=32,
           exact_queries=32, maxsim_chunk=64, shortlist=32, max_image_pixels=28 * 28 * 16, answers=4,
           minibatch=8)


# ---------------------------------------------------------------------------------------------
# stopping: row limits, the budget, signals


class RowTimeout(BaseException):
    """A row ran past its limit. BaseException: library code's `except Exception` must not eat it."""


class Stopped(BaseException):
    """The budget ran out, or a signal came: stop everything, print what there is."""

    def __init__(self, reason: str, code: int):
        super().__init__(reason)
        self.reason, self.code = reason, code


class Clock:
    def __init__(self, budget_s: float):
        self.budget_s = budget_s
        self.start = time.monotonic()
        self.deadline = self.start + budget_s

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def arm(self, seconds: float) -> None:
        """SIGALRM after `seconds`, never later than the budget's deadline."""
        signal.setitimer(signal.ITIMER_REAL, max(0.01, min(seconds, self.left())))


def install_stop_handlers(clock: Clock) -> None:
    """Rows run in this (main) thread, so a handler that raises interrupts them between bytecodes."""

    def on_alarm(signum, frame):
        if clock.left() <= 0.05:
            raise Stopped(f"the budget of {clock.budget_s:g} s ran out", 124)
        raise RowTimeout()

    def on_signal(signum, frame):
        raise Stopped(f"{signal.Signals(signum).name} received", 128 + signum)

    signal.signal(signal.SIGALRM, on_alarm)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)


def start_watchdog(clock: Clock, report, grace_s: float = 30.0) -> threading.Event:
    """If the main thread sits in one long C call (a handler runs only between bytecodes) past the
    deadline, print the partial table from here and exit 124 anyway."""
    done = threading.Event()

    def watch():
        while not done.wait(1.0):
            if clock.left() < -grace_s:
                report(f"the budget of {clock.budget_s:g} s ran out and the row did not return within {grace_s:g} s")
                os._exit(124)

    threading.Thread(target=watch, daemon=True, name="device-check-watchdog").start()
    return done


# ---------------------------------------------------------------------------------------------
# models, pages, batches


class Pages:
    """Synthetic realistic scans (docvqa.synthetic), rendered once, with a question each."""

    def __init__(self, work: Path, page_size: tuple[int, int]):
        self.dir, self.page_size = work / "pages", page_size
        self.images, self.questions, self.records = [], [], []

    def _render(self, n: int) -> None:
        from docvqa.synthetic import plan_documents, render_page

        # plan_documents(n) starts with plan_documents(m)'s documents for m < n: render only the new ones
        for doc in plan_documents(n, seed=0, level="realistic", page_size=self.page_size)[len(self.images):]:
            self.images.append(render_page(doc.pages[0], self.page_size))
            self.questions.append(doc.questions[0].question if doc.questions else "What is the total amount?")

    def image_list(self, n: int) -> list:
        self._render(n)
        return self.images[:n]

    def pages_with_questions(self, n: int) -> list:
        """(docvqa.sample.Page on disk, question) for the first n pages."""
        from docvqa.sample import Page

        self._render(n)
        self.dir.mkdir(parents=True, exist_ok=True)
        for i in range(len(self.records), n):
            path = self.dir / f"page{i}.png"
            self.images[i].save(path)
            self.records.append(Page(page_id=f"doc{i}/p1", doc_id=f"doc{i}", page_no=1, image_path=str(path)))
        return list(zip(self.records[:n], self.questions[:n]))


def make_experiences(pages: Pages, processor, num_prompts: int, answers: int, max_pixels: int,
                     answer_len: tuple[int, int], seed: int, first_page: int = 0) -> list:
    """GRPO groups shaped like a rollout's: one page and question per prompt, `answers` sampled
    answers of random tokens each, the prompt ids as vLLM would have seen them."""
    from benchmarks.bench_real_size import VOCAB
    from learner.types import Experience
    from rollout.prompts import build_chat_text, fit_image

    rng = random.Random(seed)
    out = []
    chosen = pages.pages_with_questions(first_page + num_prompts)[first_page:]
    for g, (page, question) in enumerate(chosen):
        image = fit_image(page.load_image(), max_pixels)
        text = build_chat_text(processor, question, 1)
        ids = processor(text=[text], images=[image], return_tensors="pt")["input_ids"][0].tolist()
        request = f"{seed}:{g}"
        for j in range(answers):
            n = rng.randint(*answer_len)
            response = tuple(rng.randrange(1000, VOCAB - 1000) for _ in range(n))  # no special or vision token
            out.append(Experience(sample_id=f"{request}#{j}", request_id=request, group_id=g, prompt_text=text,
                                  prompt_ids=tuple(ids), pages=(page,), image_sizes=(tuple(image.size),),
                                  response_ids=response, rollout_logprobs=tuple([-12.0] * n),
                                  reward=float(j % 2), max_image_pixels=max_pixels))
    return out


def learner_settings(family: str, policy: Path, dry: bool):
    """(LearnerConfig, AlgorithmConfig, answers per prompt, max_image_pixels, prompts) of the
    family's preset, for one rank: the minibatch is that rank's share of the preset's."""
    import yaml

    from learner.config import AlgorithmConfig, LearnerConfig

    preset = yaml.safe_load((ROOT / LEARNER_PRESETS[family]).read_text())
    learner = dict(preset["learner"], policy=str(policy))
    per_rank = preset["algorithm"]["minibatch_size"] // learner["num_ranks"]
    answers, max_pixels = preset["rollout"]["sampling"]["n"], preset["rollout"]["max_image_pixels"]
    if dry:
        per_rank, answers, max_pixels = DRY["minibatch"], DRY["answers"], DRY["max_image_pixels"]
    cfg = LearnerConfig(**learner)
    algo = AlgorithmConfig(**dict(preset["algorithm"], minibatch_size=per_rank))
    return cfg, algo, answers, max_pixels, per_rank // answers


def copy_weights(src, dst, match_dtypes: bool) -> None:
    """dst's trainable parameters := src's (the same ActorCritic names). With `match_dtypes` every
    parameter of dst first takes src's dtype: DeepSpeed's bf16 engine casts all parameters to bf16,
    peft's fp32 LoRA adapters included, and a copy must compute exactly as the engine does."""
    import torch

    source = dict(src.named_parameters())
    with torch.no_grad():
        for name, p in dst.named_parameters():
            if match_dtypes:
                p.data = p.data.to(source[name].dtype)
            if p.requires_grad:
                p.copy_(source[name].detach().to(device=p.device, dtype=p.dtype))


def language_model_parameters(module) -> int:
    """N for MFU: the language model's parameters (LoRA adapters included) but the embedding
    table (a lookup, no FLOPs); the tied head runs only at response positions, not counted."""
    from learner.model import unwrap

    lm = unwrap(module.policy).model.language_model
    return sum(p.numel() for name, p in lm.named_parameters() if "embed_tokens" not in name)


# ---------------------------------------------------------------------------------------------
# the rows: each returns (status, result text, figures)


class Context:
    def __init__(self, args, torch):
        self.args, self.torch, self.dry = args, torch, args.dry_run
        self.sizes = DRY if self.dry else REAL
        self.device = "cpu" if self.dry else "cuda"
        self.work = Path(args.work or tempfile.mkdtemp(prefix="docrl-device-check-"))
        self.pages = Pages(self.work, self.sizes["page_size"])
        self.learner_2b = None  # (group, path, cfg, algo) of the 2B learner, for the two rows after it
        self.peaks: dict[str, float] = {}  # GiB reserved, by role, for the memory plan
        self.context_gib = 0.0  # what a process's CUDA context takes, outside torch's allocator
        if not self.dry:
            free, total = torch.cuda.mem_get_info()  # creates this process's context
            self.context_gib = (total - free - torch.cuda.memory_reserved()) / 2**30

    def dims(self, family: str) -> dict:
        from benchmarks.bench_real_size import QWEN2_5_VL_3B, QWEN2_VL_2B

        return TOY_DIMS[family] if self.dry else {"qwen2_vl": QWEN2_VL_2B, "qwen2_5_vl": QWEN2_5_VL_3B}[family]

    def sync(self) -> None:
        if not self.dry:
            self.torch.cuda.synchronize()

    def reset_peak(self) -> None:
        gc.collect()
        if not self.dry:
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> tuple[float, float]:
        if self.dry:
            return float("nan"), float("nan")
        cuda = self.torch.cuda
        return cuda.max_memory_allocated() / 2**30, cuda.max_memory_reserved() / 2**30

    def release_learner(self) -> None:
        if self.learner_2b is not None:
            engine = self.learner_2b[0].worker.engine
            if hasattr(engine, "destroy"):
                engine.destroy()
            self.learner_2b = None
        self.reset_peak()


def row_environment(ctx: Context):
    """Everything the rows import, up front: a missing package is named here."""
    import importlib

    modules = ("deepspeed", "peft", "pydantic", "transformers", "colpali_engine.models", "docvqa.synthetic",
               "learner.group", "learner.worker", "retriever.encoder", "retriever.maxsim")
    failed = []
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - report every missing piece at once
            failed.append(f"{name} ({type(e).__name__}: {e})")
    torch = ctx.torch
    leaked = [m for m in ("ray", "vllm") if sys.modules.get(m) is not None]
    versions = ", ".join(f"{name} {sys.modules[name].__version__}" for name in ("torch", "transformers", "peft",
                                                                              "deepspeed", "pydantic")
                         if name in sys.modules)
    where = "CPU (dry run)"
    figures = {"cpu_count": float(os.cpu_count() or 0)}
    if not ctx.dry:
        total = torch.cuda.get_device_properties(0).total_memory / 2**30
        figures.update(gpu_total_gib=total, cuda_context_gib=ctx.context_gib)
        where = f"{torch.cuda.get_device_name(0)}, {total:.1f} GiB, CUDA {torch.version.cuda}"
    text = f"{where}; {versions}, Python {sys.version.split()[0]}; "
    text += f"imported {leaked}" if leaked else "Ray and vLLM not imported"
    if failed:
        text += "; cannot import: " + "; ".join(failed)
    return ("FAIL" if leaked or failed else "PASS"), text, figures


def row_learner(ctx: Context, family: str):
    from learner.group import LearnerGroup
    from learner.model import InputBuilder

    if family == "qwen2_5_vl":
        ctx.release_learner()  # the 2B's engine would otherwise inflate the 3B's peak
    from benchmarks.bench_real_size import build  # random weights of the real dimensions, made on the device

    path = build(ctx.work / f"policy-{family}", family, ctx.dims(family), "policy", 0, device=ctx.device)
    cfg, algo, answers, max_pixels, prompts = learner_settings(family, path, ctx.dry)
    processor = InputBuilder.for_model(str(path)).processor
    experiences = make_experiences(ctx.pages, processor, prompts, answers, max_pixels, ctx.sizes["answer_len"],
                                   seed=1)
    ctx.reset_peak()
    t0 = time.perf_counter()
    group = LearnerGroup(str(path), cfg, algo, local=True, seed=0, export_dir=str(ctx.work / "exports"))
    init_s = time.perf_counter() - t0
    first = group.update(experiences)  # CUDA kernels chosen, allocator warmed: timed again below
    metrics = group.update(experiences)
    allocated, reserved = ctx.peak_gib()
    tokens = metrics["tokens_per_s"] * metrics["train_seconds"]
    n_active = language_model_parameters(group.worker.module)
    image_tokens = experiences[0].prompt_ids.count(group.worker.builder.image_token_id)
    micro = -(-len(experiences) // cfg.micro_batch_size)
    seconds = metrics["train_seconds"]
    figures = {"init_s": init_s, "first_update_s": first["train_seconds"], "update_s": seconds,
               "tokens_per_s": metrics["tokens_per_s"], "input_tokens": tokens, "n_active": float(n_active),
               "sequences": float(len(experiences)), "micro_batches": float(micro),
               "image_tokens": float(image_tokens), "grad_norm": metrics["grad_norm"],
               "optimizer_steps": metrics["optimizer_steps"]}
    text = (f"{len(experiences)} answers ({prompts} pages x {answers}, {image_tokens} image tokens a page) in {micro} "
            f"micro-batches of {cfg.micro_batch_size}, LoRA r={cfg.lora.r}, {cfg.dtype}, checkpointing "
            f"{cfg.gradient_checkpointing}: update {seconds:.1f} s (first {first['train_seconds']:.1f} s), "
            f"{metrics['tokens_per_s']:,.0f} input tokens/s (prompt once + answers, as the rows run)")
    if not ctx.dry:
        mfu = 6 * n_active * tokens / seconds / (PEAK_BF16_TFLOPS * 1e12)
        figures.update(peak_allocated_gib=allocated, peak_reserved_gib=reserved, mfu=mfu)
        ctx.peaks[f"learner {family}"] = reserved
        text += (f", MFU {mfu:.1%} (6 x N x tokens, N = {n_active / 1e9:.2f}B language-model parameters without "
                 f"embeddings; vision tower, reference forward and recompute not counted; peak {PEAK_BF16_TFLOPS:g} "
                 f"TFLOP/s), peak {allocated:.1f} GiB allocated ({reserved:.1f} reserved)")
    ok = metrics["optimizer_steps"] == 1 and math.isfinite(metrics["grad_norm"])
    if family == "qwen2_vl":
        ctx.learner_2b = (group, path, cfg, algo)  # for the grad accumulation and logprob rows
    elif hasattr(group.worker.engine, "destroy"):
        group.worker.engine.destroy()
    return ("measured" if ok else "FAIL"), text, figures


def _needs_learner_2b(ctx: Context):
    if ctx.learner_2b is None:
        raise RuntimeError("needs the learner Qwen2-VL-2B row's engine, which did not come up")
    return ctx.learner_2b


def _grad_batch(ctx: Context, group, algo):
    """8 micro-batches of new answers (other pages than the update's) in one minibatch, its plan,
    and the GRPO targets of an update without a scoring pass (as the preset's is)."""
    from learner import update as U

    cfg = group.cfg
    _, _, answers, max_pixels, _ = learner_settings("qwen2_vl", Path(group.policy_path), ctx.dry)
    prompts = GRAD_MICRO_BATCHES * cfg.micro_batch_size // answers
    experiences = make_experiences(ctx.pages, group.worker.builder.processor, prompts, answers, max_pixels,
                                   ctx.sizes["answer_len"], seed=2, first_page=8)
    plan = U.make_plan([len(e.response_ids) for e in experiences], 1, len(experiences), cfg.micro_batch_size, 1,
                       seed=0, group_ids=[e.group_id for e in experiences] if cfg.share_prompts else None)
    if U.needs_scoring_pass(algo, plan, cfg.lora.dropout):
        raise RuntimeError("the preset's algorithm needs a scoring pass; this check covers the on-policy update only")
    targets, _ = U.compute_advantages(experiences, None, algo)
    return experiences, plan, targets


def plain_gradients(copy, worker, experiences, targets, micro_batches, mb_sequences: int, mb_tokens: int):
    """Each micro-batch's gradient by plain autograd on `copy` (the worker's loss, step by step as
    LearnerWorker.train takes it), summed in fp32, and summed in the gradients' own dtype (bf16):
    what accumulating in p.grad would give. Returns (fp32 sums, same-dtype sums) by name."""
    import torch

    from learner import update as U
    from learner.model import forward_outputs

    algo, cfg, temperature = worker.algo, worker.cfg, worker.temperature
    trainable = [(n, p) for n, p in copy.named_parameters() if p.requires_grad]
    fp32_sum = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in trainable}
    own_dtype_sum = {n: torch.zeros_like(p) for n, p in trainable}
    copy.train()
    worker.builder.clear()
    for micro in micro_batches:
        inputs = worker.builder.build([experiences[i] for i in micro.indices],
                                      share_prompts=cfg.share_prompts).to(worker.device)
        target = U.gather_targets(targets, micro.indices)
        out = forward_outputs(copy, inputs, with_entropy=algo.entropy_coef > 0, with_values=False,
                              temperature=temperature)
        taken, _ = U.on_policy_targets(out.logprobs, [experiences[i].rollout_logprobs for i in micro.indices],
                                       out.mask, algo)
        target.update(taken)
        if worker.use_reference:
            with torch.no_grad(), copy.adapters_disabled():
                ref = forward_outputs(copy, inputs, with_entropy=False, with_values=False, temperature=temperature)
            target["ref_logprobs"] = ref.logprobs.float()
        share = U.micro_batch_share(algo.loss_aggregation, out.mask, mb_sequences, mb_tokens, 1)
        loss, _ = U.micro_batch_loss(out.logprobs, out.entropy, out.values, out.mask, target, algo, share)
        loss.backward()
        for n, p in trainable:
            fp32_sum[n] += p.grad.float()
            own_dtype_sum[n] += p.grad
            p.grad = None
    return fp32_sum, own_dtype_sum


def deepspeed_gradients(worker, experiences, targets, plan) -> dict:
    """The worker's own train() on `plan`, with its engine's accumulated gradients read just before
    the optimizer step (safe_get_full_grad: the gradient DeepSpeed is about to apply); by name."""
    from deepspeed.utils import safe_get_full_grad

    captured: dict = {}
    engine_step = worker.engine.step

    def step_after_reading_gradients(*args, **kwargs):
        for n, p in worker.module.named_parameters():
            if p.requires_grad:
                g = safe_get_full_grad(p)
                captured[n] = None if g is None else g.detach().float().clone()
        return engine_step(*args, **kwargs)

    worker.engine.step = step_after_reading_gradients
    try:
        worker.train(experiences, targets, plan.rank_schedule(0))
    finally:
        del worker.engine.step  # the engine's own method again
    return captured


def relative_errors(grads: dict, reference: dict) -> tuple[float, float, int]:
    """(max over tensors of |g - ref| / |ref|, the same over all tensors together, tensors compared)."""
    worst, diff2, ref2, compared = 0.0, 0.0, 0.0, 0
    for n, ref in reference.items():
        delta = float((grads[n].float().to(ref.device) - ref).norm()) ** 2
        norm = float(ref.norm()) ** 2
        diff2, ref2 = diff2 + delta, ref2 + norm
        if norm > 0:
            worst, compared = max(worst, math.sqrt(delta / norm)), compared + 1
    return worst, math.sqrt(diff2 / ref2), compared


def row_grad_accumulation(ctx: Context):
    from learner.model import build_models

    group, path, cfg, algo = _needs_learner_2b(ctx)
    worker = group.worker
    experiences, plan, targets = _grad_batch(ctx, group, algo)
    (micro_batches, mb_sequences, mb_tokens), = plan.rank_schedule(0)[0]
    # a second copy of the engine's weights, in the engine's dtypes, for the plain-autograd side
    copy = build_models(str(path), cfg.model_copy(update={"value_model": "none"}), worker.dtype,
                        need_reference=False, seed=0).actor_critic.to(worker.device)
    copy_weights(worker.module, copy, match_dtypes=True)
    fp32_sum, bf16_sum = plain_gradients(copy, worker, experiences, targets, micro_batches, mb_sequences, mb_tokens)
    del copy
    gc.collect()
    captured = deepspeed_gradients(worker, experiences, targets, plan)
    missing = [n for n in fp32_sum if captured.get(n) is None]
    if missing:
        return "FAIL", f"DeepSpeed gave no accumulated gradient for {len(missing)} tensors, e.g. {missing[0]}", {}
    worst, overall, tensors = relative_errors(captured, fp32_sum)
    bf16_worst, _, _ = relative_errors(bf16_sum, fp32_sum)
    accum = worker.ds_config.get("data_types", {}).get("grad_accum_dtype", "not set (DeepSpeed's default)")
    figures = {"max_rel_err": worst, "global_rel_err": overall, "bf16_accumulator_max_rel_err": bf16_worst,
               "tensors": float(tensors), "micro_batches": float(len(micro_batches))}
    text = (f"Qwen2-VL-2B, {len(micro_batches)} micro-batches x {cfg.micro_batch_size} ({cfg.dtype}, ZeRO-"
            f"{cfg.zero_stage}, grad_accum_dtype {accum}): DeepSpeed's accumulated gradient (safe_get_full_grad, "
            f"before the step) vs the fp32 sum of plain-autograd micro-batch gradients of the same bf16 weights: "
            f"max relative error {worst:.2e} over {tensors} LoRA tensors (norm-wise), {overall:.2e} over all; a bf16 "
            f"accumulator would be off by {bf16_worst:.2e}. Pass: < {GRAD_RTOL:g} and not above the bf16 "
            f"accumulator's")
    ok = worst < GRAD_RTOL and worst <= bf16_worst
    return ("PASS" if ok else "FAIL"), text, figures


def row_logprobs(ctx: Context):
    from learner.model import build_models, forward_outputs

    torch = ctx.torch
    group, path, cfg, algo = _needs_learner_2b(ctx)
    worker = group.worker
    experiences, plan, _ = _grad_batch(ctx, group, algo)
    micro_batches = plan.scoring_micro_batches(0)
    bf16 = worker.score(experiences, micro_batches)  # the learner's own scoring pass (eval, no grad)
    fp32 = build_models(str(path), cfg.model_copy(update={"value_model": "none"}), torch.float32,
                        need_reference=False, seed=0).actor_critic.to(worker.device).eval()
    copy_weights(worker.module, fp32, match_dtypes=False)  # the adapters as trained by the row before
    deltas = []
    with torch.no_grad():
        for micro in micro_batches:
            inputs = worker.builder.build([experiences[i] for i in micro.indices],
                                          share_prompts=cfg.share_prompts).to(worker.device)
            out = forward_outputs(fp32, inputs, with_entropy=False, with_values=False,
                                  temperature=worker.temperature)
            for row, i in enumerate(micro.indices):
                n = len(experiences[i].response_ids)
                deltas.append((out.logprobs[row, :n].float().cpu() - bf16[i]["old"]).abs())
    del fp32
    delta = torch.cat(deltas)
    mean_logprob = float(torch.cat([v["old"] for v in bf16.values()]).mean())
    figures = {"max_abs_delta": float(delta.max()), "mean_abs_delta": float(delta.mean()),
               "tokens": float(delta.numel()), "mean_logprob": mean_logprob}
    text = (f"Qwen2-VL-2B (trained adapters), {len(experiences)} answers, {delta.numel()} response tokens: bf16 "
            f"scoring pass vs an fp32 forward of the same weights: max abs dlogprob {figures['max_abs_delta']:.3e}, "
            f"mean {figures['mean_abs_delta']:.3e} (mean logprob {figures['mean_logprob']:.2f}; on the 2B: an fp32 3B "
            f"would need a second 3B build within the budget)")
    return "measured", text, figures


def row_retriever(ctx: Context, kind: str):
    from benchmarks.bench_real_size import build
    from retriever.encoder import PageEncoder

    torch = ctx.torch
    family = "qwen2_vl" if kind == "gme" else "qwen2_5_vl"
    path = build(ctx.work / f"retriever-{kind}", family, ctx.dims(family), kind, 1, device=ctx.device)
    images = ctx.pages.image_list(ctx.sizes["retriever_pages"])
    batch = ctx.sizes["embed_batch"]
    budget = ctx.sizes["colqwen_tokens" if kind == "colqwen2_5" else "gme_tokens"]
    ctx.reset_peak()
    encoder = PageEncoder(str(path), model_class=kind, dtype="bfloat16", device=ctx.device, max_visual_tokens=budget)
    encoder.embed_images(images[:batch], batch_size=batch, progress=False)  # warm-up
    ctx.sync()
    t0 = time.perf_counter()
    vectors = encoder.embed_images(images, batch_size=batch, progress=False)
    ctx.sync()
    seconds = time.perf_counter() - t0
    allocated, reserved = ctx.peak_gib()
    finite = all(bool(torch.isfinite(v).all()) for v in vectors)
    per_page = sum(v.shape[0] for v in vectors) / len(vectors)
    figures = {"pages_per_s": len(images) / seconds, "seconds": seconds, "pages": float(len(images)),
               "vectors_per_page": per_page, "dim": float(vectors[0].shape[1])}
    bounds = f"{budget} visual tokens a page at most" if budget else "GME's own 256-1280 visual tokens"
    text = (f"{MODEL_NAMES[kind]}-sized ({encoder.family}, random weights, bf16): {len(images)} pages of "
            f"{ctx.sizes['page_size'][0]}x{ctx.sizes['page_size'][1]} ({bounds}), batch {batch}: "
            f"{figures['pages_per_s']:.1f} pages/s incl. preprocessing, {per_page:.0f} x {vectors[0].shape[1]} "
            f"vectors a page")
    if not ctx.dry:
        figures.update(peak_allocated_gib=allocated, peak_reserved_gib=reserved)
        ctx.peaks[f"retriever {kind}"] = reserved
        text += f", peak {allocated:.1f} GiB allocated ({reserved:.1f} reserved)"
    if not finite:
        return "FAIL", text + "; NON-FINITE embeddings", figures
    return "measured", text, figures


class DevicePages:
    """Page p's valid tokens as a CPU fp32 tensor, read from the device on demand (rerank_shortlist
    indexes only its shortlist)."""

    def __init__(self, pages, lengths):
        self.pages, self.lengths = pages, lengths.tolist()

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i):
        return self.pages[i, : self.lengths[i]].float().cpu()


def row_maxsim(ctx: Context):
    from retriever.maxsim import maxsim_scores, rerank_shortlist, topk_pages

    torch = ctx.torch
    s = ctx.sizes
    num_p, (lo, hi), dim, num_q, k = s["maxsim_pages"], s["page_tokens"], 128, s["queries"], 10
    dev = ctx.device
    ctx.reset_peak()
    # The corpus, generated where it is searched: fp32 unit vectors a chunk at a time, kept in bf16.
    gen = torch.Generator(device=dev).manual_seed(0)
    lengths = torch.randint(lo, hi + 1, (num_p,), generator=gen, device=dev)
    page_mask = torch.arange(hi, device=dev)[None, :] < lengths[:, None]
    pages = torch.zeros(num_p, hi, dim, dtype=torch.bfloat16, device=dev)
    for a in range(0, num_p, 2000):
        b = min(num_p, a + 2000)
        x = torch.nn.functional.normalize(torch.randn(b - a, hi, dim, generator=gen, device=dev), dim=-1)
        pages[a:b] = x.masked_fill_(~page_mask[a:b, :, None], 0.0).to(torch.bfloat16)
        del x
    cpu_gen = torch.Generator().manual_seed(1)
    qlens = torch.randint(s["query_tokens"][0], s["query_tokens"][1] + 1, (num_q,), generator=cpu_gen)
    queries = [torch.nn.functional.normalize(torch.randn(int(n), dim, generator=cpu_gen), dim=-1) for n in qlens]
    q_pad = torch.zeros(num_q, int(qlens.max()), dim)
    q_mask = torch.zeros(num_q, int(qlens.max()), dtype=torch.bool)
    for i, q in enumerate(queries):
        q_pad[i, : len(q)], q_mask[i, : len(q)] = q, True
    ids = [f"p{i}" for i in range(num_p)]
    chunk = s["maxsim_chunk"]

    def search(qp, qm):
        return maxsim_scores(qp.to(dev), qm.to(dev), pages, page_mask, dtype=torch.bfloat16, page_chunk=chunk)

    search(q_pad[:1], q_mask[:1])  # warm-up
    ctx.sync()
    t0 = time.perf_counter()
    scores = search(q_pad, q_mask)
    ctx.sync()
    batch_s = time.perf_counter() - t0
    single = []
    for i in range(3):
        t0 = time.perf_counter()
        search(q_pad[i : i + 1], q_mask[i : i + 1])
        ctx.sync()
        single.append(time.perf_counter() - t0)
    scores = scores.cpu()
    t0 = time.perf_counter()
    reranked = rerank_shortlist(scores, queries, DevicePages(pages, lengths), s["shortlist"])  # the index's bf16 path
    rerank_s = time.perf_counter() - t0
    allocated, _ = ctx.peak_gib()

    # Exact reference: docrl's MaxSim in fp32 on the CPU over every page, for a random subset of
    # queries (all 32 over 100,000 pages would take the CPU minutes): the corpus's bf16 values are
    # the data, so fp32 on them is the exact score.
    subset = torch.randperm(num_q, generator=cpu_gen)[: s["exact_queries"]].sort().values
    exact = torch.empty(len(subset), num_p)
    t0 = time.perf_counter()
    for a in range(0, num_p, 2000):
        b = min(num_p, a + 2000)
        exact[:, a:b] = maxsim_scores(q_pad[subset], q_mask[subset], pages[a:b].cpu(), page_mask[a:b].cpu(),
                                      dtype=torch.float32, page_chunk=64)
    exact_s = time.perf_counter() - t0

    def recall(found):
        want = topk_pages(exact, ids, k)
        got = topk_pages(found[subset], ids, k)
        return sum(len({p for p, _ in g} & {p for p, _ in w}) for g, w in zip(got, want)) / (k * len(subset))

    recall_bf16, recall_rerank = recall(scores), recall(reranked)
    single_ms = sorted(single)[1] * 1e3
    figures = {"batch_s": batch_s, "single_query_ms": single_ms, "rerank_s": rerank_s, "exact_cpu_s": exact_s,
               "recall_bf16": recall_bf16, "recall_rerank": recall_rerank, "pages": float(num_p),
               "page_tokens": float(lengths.float().mean()), "exact_queries": float(len(subset))}
    where = "CPU (dry run)" if ctx.dry else "GPU"
    text = (f"{num_q} queries x {num_p:,} pages ({lo}-{hi} x {dim} bf16 unit vectors, {int(lengths.sum()):,} tokens) "
            f"on the {where} (maxsim_scores, bf16): {batch_s:.2f} s for the {num_q}, {single_ms:.0f} ms for one "
            f"(median of 3); fp32 re-rank of each query's {s['shortlist']}-page shortlist (rerank_shortlist) "
            f"{rerank_s:.2f} s. "
            f"recall@10 vs exact fp32 CPU MaxSim over all {num_p:,} pages ({exact_s:.0f} s) for {len(subset)} random "
            f"queries of the {num_q}: {recall_rerank:.3f} with the re-rank (bar {RECALL_BAR:g}), {recall_bf16:.3f} "
            f"bf16 alone")
    if not ctx.dry:
        figures["peak_allocated_gib"] = allocated
        text += f"; peak {allocated:.1f} GiB allocated"
    return ("PASS" if recall_rerank >= RECALL_BAR else "FAIL"), text, figures


# (key, title, function, reserve_s: the least time the rows before it must leave it)
ROWS = [
    ("environment", "environment", row_environment, 20),
    ("learner-2b", "learner Qwen2-VL-2B: LoRA GRPO update", lambda c: row_learner(c, "qwen2_vl"), 60),
    ("grad-accumulation", "bf16 grad accumulation (DeepSpeed) vs fp32 sum", row_grad_accumulation, 30),
    ("logprobs", "bf16 vs fp32 logprobs", row_logprobs, 30),
    ("learner-3b", "learner Qwen2.5-VL-3B: LoRA GRPO update", lambda c: row_learner(c, "qwen2_5_vl"), 60),
    ("retriever-gme", "retriever GME-2B: page embedding", lambda c: row_retriever(c, "gme"), 30),
    ("retriever-colqwen", "retriever ColQwen2.5-3B: page embedding", lambda c: row_retriever(c, "colqwen2_5"), 30),
    ("maxsim", "MaxSim search, GPU vs exact CPU", row_maxsim, 60),
]


# ---------------------------------------------------------------------------------------------
# the memory plan, the table


def memory_plan(ctx: Context) -> dict | None:
    """Do the 1-GPU preset's roles fit the GPU together? vLLM takes gpu_memory_utilization of the
    whole device; the learner and the retriever what their rows reserved at peak; each of the three
    processes a CUDA context."""
    learner, retriever = ctx.peaks.get("learner qwen2_vl"), ctx.peaks.get("retriever gme")
    if ctx.dry or learner is None or retriever is None:
        return None
    import yaml

    preset = yaml.safe_load((ROOT / ONE_GPU_PRESET).read_text())
    share = preset["rollout"]["gpu_memory_utilization"]
    total = ctx.torch.cuda.get_device_properties(0).total_memory / 2**30
    vllm, contexts = share * total, 3 * ctx.context_gib
    need = vllm + learner + retriever + contexts
    fits = need <= total
    line = (f"memory plan ({ONE_GPU_PRESET} on this {total:.1f} GiB GPU): vLLM {share:g} x GPU = {vllm:.1f} GiB + "
            f"learner {learner:.1f} GiB (the Qwen2-VL-2B update's peak, reserved) + retriever {retriever:.1f} GiB "
            f"(GME-2B-sized embedding at batch {REAL['embed_batch']}, reserved; the preset's ColQwen2 has the same "
            f"Qwen2-VL-2B trunk, at batch {preset['retriever']['embed_batch_size']}) + 3 CUDA contexts "
            f"{contexts:.1f} GiB = {need:.1f} GiB: {'fits' if fits else 'does NOT fit'} "
            f"({total - need:+.1f} GiB spare)")
    return {"fits": fits, "need_gib": need, "total_gib": total, "vllm_gib": vllm, "learner_gib": learner,
            "retriever_gib": retriever, "contexts_gib": contexts, "line": line}


class Report:
    """The rows as they stand, printed once as the table (and written as JSON) at the end or on a
    stop; on a stop, the row that was running is STOPPED and the rows after it stay "not run"."""

    def __init__(self, args, clock: Clock, selected: list):
        self.args, self.clock = args, clock
        self.rows = [{"key": key, "row": title, "status": "not run", "result": "", "seconds": 0.0, "figures": {}}
                     for key, title, *_ in selected]
        self.header, self.device, self.ctx = "# docrl device check", None, None
        self.current, self.current_t0, self.stopped = None, 0.0, None
        self.lock, self.printed = threading.Lock(), False

    def table(self, plan: dict | None) -> str:
        lines = [self.header, "", "| row | result | status | s |", "|---|---|---|---:|"]
        for r in self.rows:
            result = r["result"].replace("|", "/").replace("\n", " ")
            lines.append(f"| {r['row']} | {result} | {r['status']} | {r['seconds']:.0f} |")
        lines.append("")
        if plan:
            lines.append(plan["line"])
        elif self.args.dry_run:
            lines.append("memory plan: needs the GPU peaks (dry run)")
        if self.stopped:
            lines.append(f"STOPPED after {self.clock.elapsed():.0f} s: {self.stopped}; rows marked 'not run' did "
                         "not start")
        return "\n".join(lines)

    def finish(self, stop_reason: str | None = None) -> None:
        with self.lock:
            if self.printed:
                return
            self.printed = True
            if stop_reason:
                self.stopped = stop_reason
                if self.current is None:  # stopped before the first row started
                    self.rows.insert(0, {"key": "startup", "row": "startup (imports, device)", "status": "STOPPED",
                                         "result": f"{stop_reason} during this row", "seconds": self.clock.elapsed(),
                                         "figures": {}})
                else:
                    self.current.update(status="STOPPED", seconds=time.perf_counter() - self.current_t0,
                                        result=f"{stop_reason} during this row; {self.current['result']}".rstrip("; "))
            plan = memory_plan(self.ctx) if self.ctx is not None else None
            table = self.table(plan)
            print("\n" + table, flush=True)
            payload = {"device": self.device, "dry_run": self.args.dry_run, "budget_s": self.args.budget_s,
                       "elapsed_s": self.clock.elapsed(), "stopped": self.stopped, "rows": self.rows,
                       "memory_plan": plan, "imported": [m for m in ("ray", "vllm") if sys.modules.get(m) is not None]}
            outputs = [Path(self.args.json)] if self.args.json else []
            if os.environ.get("OUT"):
                out_dir = Path(os.environ["OUT"])
                out_dir.mkdir(parents=True, exist_ok=True)
                (out_dir / "device_check.md").write_text(table + "\n")
                outputs.append(out_dir / "device_check.json")
            for path in outputs:
                path.write_text(json.dumps(payload, indent=2, default=float))


def run_rows(ctx: Context, selected: list, report: Report, clock: Clock) -> None:
    """Each row under its limit: the budget left minus the reserves of the rows after it (at least
    its own reserve). A row that raises or runs over is FAIL, and the next one runs."""
    for i, ((_, title, fn, reserve), row) in enumerate(zip(selected, report.rows)):
        limit = max(clock.left() - sum(r[3] for r in selected[i + 1:]), min(reserve, clock.left()))
        report.current, report.current_t0 = row, time.perf_counter()
        try:
            clock.arm(limit)
            status, text, figures = fn(ctx)
            clock.arm(clock.left())
            row.update(status=status, result=text, figures=figures)
        except RowTimeout:
            clock.arm(clock.left())
            row.update(status="FAIL", result=f"timed out: over its limit of {limit:.0f} s")
        except Exception as e:  # noqa: BLE001 - one row's failure must not stop the others
            clock.arm(clock.left())
            traceback.print_exc()
            row.update(status="FAIL", result=f"{type(e).__name__}: {str(e)[:400]}")
        row["seconds"] = time.perf_counter() - report.current_t0
        report.current = None
        print(f"[device_check] {title}: {row['status']} ({row['seconds']:.0f} s) {row['result']}", flush=True)
        ctx.reset_peak()  # what the row held goes back before the next one measures


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="every row on CPU at toy sizes (CI)")
    ap.add_argument("--budget-s", type=float, default=480.0, help="total seconds; the partial table when they run out")
    ap.add_argument("--json", default=None, help="also write the rows as JSON here")
    ap.add_argument("--work", default=None, help="directory for checkpoints and pages (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the working directory (the built checkpoints)")
    ap.add_argument("--rows", default=None, help=f"comma-separated subset of: {', '.join(k for k, *_ in ROWS)}")
    ap.add_argument("--exact-queries", type=int, default=None, help="MaxSim queries checked against exact CPU MaxSim")
    args = ap.parse_args()
    if args.dry_run:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # a dry run on a GPU machine stays on the CPU
    selected = [r for r in ROWS if args.rows is None or r[0] in args.rows.split(",")]

    clock = Clock(args.budget_s)
    report = Report(args, clock, selected)
    install_stop_handlers(clock)
    watchdog = start_watchdog(clock, report.finish)
    clock.arm(clock.left())
    try:
        import torch

        if not args.dry_run and not torch.cuda.is_available():
            signal.setitimer(signal.ITIMER_REAL, 0)
            print("device_check: torch sees no CUDA device; use --dry-run on a machine without a GPU", file=sys.stderr)
            return 2
        report.ctx = ctx = Context(args, torch)
        if args.exact_queries:
            ctx.sizes = dict(ctx.sizes, exact_queries=args.exact_queries)
        report.device = "CPU (dry run)" if args.dry_run else torch.cuda.get_device_name(0)
        report.header = (f"# docrl device check: DRY RUN on CPU, toy sizes, no GPU figures (budget {args.budget_s:g} s)"
                         if args.dry_run else f"# docrl device check: {report.device}, torch {torch.__version__}, "
                         f"CUDA {torch.version.cuda} (budget {args.budget_s:g} s)")
        print(f"[device_check] {report.header[2:]}; work dir {ctx.work}", flush=True)
        run_rows(ctx, selected, report, clock)
        signal.setitimer(signal.ITIMER_REAL, 0)
        report.finish()
        return 1 if any(r["status"] == "FAIL" for r in report.rows) else 0
    except Stopped as stop:
        signal.setitimer(signal.ITIMER_REAL, 0)
        report.finish(stop.reason)
        return stop.code
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        watchdog.set()
        if report.ctx is not None and not args.keep:
            shutil.rmtree(report.ctx.work, ignore_errors=True)


if __name__ == "__main__":
    exit_code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)  # DeepSpeed and torch.distributed leave threads behind: exit with our code, now

"""Supervised warm start: teach the policy the answer format (and, on the easy level, to read the
word) from gold answers, before RL.

A tiny policy from random weights almost never samples a right answer, so its rewards are all
zero and GRPO has nothing to compare. The warm start is plain next-token cross-entropy on the gold
answer (followed by the end-of-turn token), given exactly the prompt the rollout workers build
(`rollout.prompts`) and the same `InputBuilder` the PPO learner uses, so what it trains is what
RL later samples from.

It trains the way the learner is configured (`SFTSettings` carries the `learner` section's
choices): on the GPU when the process has one, in `learner.dtype`, with LoRA on the language model
when `learner.lora.enabled` (else every weight, the vision tower too unless
`learner.freeze_vision_tower`: the tiny vision tower is random and must learn to see). It writes a
complete model directory (a LoRA adapter is merged into the base first), which then replaces the
policy for the rollout workers, the learner, and the reference of the KL penalty.

It runs before RL, on a split of the training questions the caller chooses, and never on the
evaluation questions; the trainer logs its evaluation separately from the RL gain.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common.ray_helpers import task_device
from docvqa.sample import DocVQASample, Page
from learner.config import LoraConfig
from learner.model import InputBuilder, apply_lora, forward_outputs, freeze_vision_tower, load_policy
from learner.types import Experience

END_OF_TURN = "<|im_end|>"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class SFTSettings:
    """The warm start's own settings, and the learner's choices it must follow (`dtype`, `lora`,
    `freeze_vision_tower` are `learner.dtype`, `learner.lora`, `learner.freeze_vision_tower`)."""

    steps: int
    batch_size: int = 16
    learning_rate: float = 1e-5  # a pretrained model; a random tiny one wants ~1e-3
    weight_decay: float = 0.0
    seed: int = 0
    dtype: str = "float32"
    lora: LoraConfig = field(default_factory=lambda: LoraConfig(enabled=False))
    freeze_vision_tower: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"warm start: dtype {self.dtype!r} (learner.dtype) must be one of {sorted(_DTYPES)}")
        if self.lora.enabled and not self.freeze_vision_tower:
            raise ValueError("warm start: LoRA adapts the language model only; it needs freeze_vision_tower=True "
                             "(learner.freeze_vision_tower)")


def encode_question(builder: InputBuilder, sample: DocVQASample, pages_by_id: dict[str, Page], rollout_cfg):
    """The rollout's prompt for `sample` on its gold page: (page, fitted image, chat text, processor
    inputs with the image placeholders expanded)."""
    from rollout.prompts import build_chat_text, fit_image

    page = pages_by_id[sample.gold_page]
    image = fit_image(page.load_image(), rollout_cfg.max_image_pixels)
    text = build_chat_text(builder.processor, sample.question, 1, rollout_cfg.system_prompt, rollout_cfg.instruction)
    return page, image, text, builder.processor(text=[text], images=[image], return_tensors="pt")


def sft_examples(samples: Sequence[DocVQASample], pages_by_id: dict[str, Page], builder: InputBuilder,
                 rollout_cfg) -> list[Experience]:
    """One example per sample that has a gold answer (feedback down-votes have none): the rollout's
    prompt on the gold page, the first gold answer as the response."""
    tokenizer = builder.processor.tokenizer
    out = []
    for s in samples:
        if not s.answers:
            continue
        page, image, text, inputs = encode_question(builder, s, pages_by_id, rollout_cfg)
        prompt_ids = inputs["input_ids"][0].tolist()
        answer_ids = tokenizer(s.answers[0] + END_OF_TURN, add_special_tokens=False)["input_ids"]
        out.append(Experience(sample_id=s.question_id, request_id=s.question_id, group_id=0, prompt_text=text,
                              prompt_ids=tuple(prompt_ids), pages=(page,), image_sizes=(image.size,),
                              response_ids=tuple(answer_ids), rollout_logprobs=(0.0,) * len(answer_ids), reward=0.0,
                              max_image_pixels=rollout_cfg.max_image_pixels))
    return out


@torch.no_grad()
def greedy_anls(model, builder: InputBuilder, samples: Sequence[DocVQASample], pages_by_id: dict[str, Page],
                rollout_cfg, max_new_tokens: int = 16) -> float:
    """Mean ANLS of greedy answers (plain transformers generate, one question at a time): the
    warm start's own before/after measurement, independent of the rollout engine."""
    from reward.metrics import anls_score

    samples = [s for s in samples if s.answers]
    if not samples:
        return float("nan")
    tokenizer, total = builder.processor.tokenizer, 0.0
    for s in samples:
        _, _, _, inputs = encode_question(builder, s, pages_by_id, rollout_cfg)
        out = model.generate(**inputs.to(model.device), max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tokenizer.convert_tokens_to_ids(END_OF_TURN), pad_token_id=builder.pad_id)
        answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        total += anls_score(answer.strip(), s.answers)
    return total / len(samples)


class _Fp32Master:
    """fp32 copies of the low-precision trainable parameters for the optimizer to update, copied
    back after each step (as DeepSpeed's bf16 optimizer keeps them): a bf16 weight cannot absorb an
    update 1e-5 times its size, it rounds away. float32 parameters are optimized as they are."""

    def __init__(self, params: list[torch.nn.Parameter]):
        self.pairs = [(p, p.detach().float().clone()) for p in params if p.dtype != torch.float32]
        shadowed = {id(p) for p, _ in self.pairs}
        self.params = [p for p in params if id(p) not in shadowed] + [m for _, m in self.pairs]

    def grads_to_master(self) -> None:
        for p, master in self.pairs:
            master.grad = None if p.grad is None else p.grad.float()

    @torch.no_grad()
    def master_to_model(self) -> None:
        for p, master in self.pairs:
            p.copy_(master)


def _trainable_model(policy_path: str, settings: SFTSettings, device: torch.device):
    """The policy in the learner's dtype on `device`, with LoRA or a frozen vision tower as set."""
    model = load_policy(policy_path, _DTYPES[settings.dtype]).to(device)
    if settings.lora.enabled:
        model = apply_lora(model, settings.lora)  # freezes every base weight, vision tower included
    else:
        model.requires_grad_(True)
        if settings.freeze_vision_tower:
            freeze_vision_tower(model)
    return model


def supervised_finetune(policy_path: str, out_dir: str | Path, samples: Sequence[DocVQASample],
                        pages_by_id: dict[str, Page], rollout_cfg, settings: SFTSettings,
                        eval_samples: Sequence[DocVQASample] = (), num_gpus: float = 0.0) -> dict:
    """Train `settings.steps` AdamW steps of mean token cross-entropy on random minibatches of
    `samples`; save the model (LoRA merged, with its processor) to `out_dir`. Returns the loss
    curve and, with `eval_samples` (held out), the greedy ANLS on them before and after.
    `num_gpus`: what the Ray task running it asked for (on a GPU when > 0)."""
    if not any(s.answers for s in samples):
        raise ValueError("warm start: no training questions (with a gold answer) to fine-tune on")
    torch.manual_seed(settings.seed)
    rng = random.Random(settings.seed)
    device = torch.device(task_device(num_gpus))
    builder = InputBuilder.for_model(policy_path)
    model = _trainable_model(policy_path, settings, device)
    anls_before = greedy_anls(model, builder, eval_samples, pages_by_id, rollout_cfg) if eval_samples else None
    examples = sft_examples(samples, pages_by_id, builder, rollout_cfg)
    master = _Fp32Master([p for p in model.parameters() if p.requires_grad])
    optimizer = torch.optim.AdamW(master.params, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    losses, t0 = [], time.perf_counter()
    model.train()
    for _ in range(settings.steps):
        batch = rng.sample(examples, min(settings.batch_size, len(examples)))
        out = forward_outputs(model, builder.build(batch).to(device), with_entropy=False, with_values=False)
        loss = -(out.logprobs.sum() / out.mask.sum())
        optimizer.zero_grad(set_to_none=True)
        model.zero_grad(set_to_none=True)
        loss.backward()
        master.grads_to_master()
        torch.nn.utils.clip_grad_norm_(master.params, 1.0)
        optimizer.step()
        master.master_to_model()
        losses.append(float(loss.detach()))
    model.eval()
    if settings.lora.enabled:
        # The result is a base model for the rollout and the learner: a plain checkpoint, no adapter.
        model = model.merge_and_unload()
    anls_after = greedy_anls(model, builder, eval_samples, pages_by_id, rollout_cfg) if eval_samples else None
    out = Path(out_dir)
    tmp = out.with_name(f".{out.name}.tmp")
    model.save_pretrained(tmp)
    builder.processor.save_pretrained(tmp)
    summary = {"steps": settings.steps, "examples": len(examples), "loss_first": losses[0] if losses else None,
               "loss_last": losses[-1] if losses else None, "seconds": time.perf_counter() - t0, "losses": losses,
               "eval_anls_before": anls_before, "eval_anls_after": anls_after, "base_policy": str(policy_path),
               "device": str(device), "dtype": settings.dtype, "lora": settings.lora.enabled}
    (tmp / "docrl_warm_start.json").write_text(json.dumps(summary, indent=2))
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    return summary

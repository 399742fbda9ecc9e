"""The learner's models in plain torch/peft (no Ray, no DeepSpeed): policy, value, reference, and
the exact rebuild of the multimodal input vLLM saw.

* Policy: a Qwen-VL model (Qwen2-VL, Qwen2.5-VL, Qwen3-VL: `common.policy_family` picks the class
  from the checkpoint's config.json), with LoRA (peft) on the LANGUAGE MODEL only, or full
  fine-tuning. The vision tower is frozen by default (`learner.freeze_vision_tower`).
* Reference: with LoRA, the same model with its adapters disabled (`disable_adapter()`, no second
  copy); with full fine-tuning, a frozen copy made before training starts.
* Value: a scalar head on the policy trunk's last hidden state ("head"), a separate critic trunk
  with its own head ("separate"), or none (GRPO/RLOO need no critic).

Inputs. Each sequence is `prompt_ids + response_ids`, right-padded; the prompt ids are the ones
vLLM saw (image placeholders expanded) and the learner checks that the model's own processor, given
the same chat text and the same resized images, produces exactly them - otherwise the image
features would land on the wrong tokens (the silent image-token mismatch of other frameworks).
Positions are the 3-D mrope ones: the model computes them with its family's own rule from
`mm_token_type_ids` (1 on image tokens), `image_grid_thw` and the attention mask, so right padding
cannot shift them (Qwen2.5-VL's temporal spacing, `second_per_grid_ts`, applies to videos only:
a page is a still image with the same positions as in Qwen2-VL).

Logits are computed only at the response positions (the hidden state at position p-1+t predicts
response token t): a prompt of a few hundred image tokens times a 152k vocabulary would otherwise
dominate memory.

Shared prompts (`InputBuilder.build(..., share_prompts=True)`). The n answers of a GRPO group
share one prompt, and the prompt (the page's image tokens and the question) is most of every
sequence. Then one row holds the prompt once and every answer after it, `[prompt, a_1, ..., a_n]`,
with a block attention mask - prompt tokens causal among themselves, each answer's tokens on the
prompt and causally on their own answer, never on another answer - and each answer's positions
restarting where the prompt ends, so every answer token sees exactly the keys, values and
positions it saw alone. Logprobs and gradients are those of the one-sequence-per-answer batch (up
to float rounding), with the image through the vision tower once and the prompt's tokens once
instead of n times.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from learner.config import LearnerConfig, LoraConfig
from learner.ppo import entropy_from_logits, logprobs_from_logits
from learner.types import Experience

# Module names of the language model and the vision tower in every supported family's
# ForConditionalGeneration (transformers 5; common.policy_family).
LANGUAGE_MODEL_PREFIX = "model.language_model."
VISION_PREFIX = "model.visual."


# ---------------------------------------------------------------------------------------------
# loading, LoRA, freezing


def load_policy(path: str, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"):
    """The policy as transformers loads it, in its family's class (eval mode: PPO passes run without
    dropout unless asked)."""
    from common.policy_family import load_policy_model

    return load_policy_model(path, dtype=dtype, attn_implementation=attn_implementation).eval()


def lora_target_regex(target_modules: Sequence[str]) -> str:
    """A peft target (full-match regex on module names) that selects the given leaf names inside the
    language model only: a vision-tower module of the same name is never adapted."""
    names = "|".join(re.escape(n) for n in target_modules)
    return re.escape(LANGUAGE_MODEL_PREFIX) + r".*\.(?:" + names + r")"


def apply_lora(model, lora: LoraConfig):
    """Wrap `model` in a peft LoRA model on the language model. peft freezes every base weight."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_cfg = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                          target_modules=lora_target_regex(lora.target_modules), bias="none")
    peft_model = get_peft_model(model, peft_cfg)
    adapted = [n for n, _ in peft_model.named_parameters() if "lora_" in n]
    if not adapted:
        raise ValueError(f"learner.lora.target_modules={lora.target_modules} match no module of the language model")
    return peft_model


def freeze_vision_tower(model) -> int:
    """requires_grad=False on every vision-tower parameter; returns how many were frozen."""
    n = 0
    for name, p in unwrap(model).named_parameters():
        if name.startswith(VISION_PREFIX):
            p.requires_grad_(False)
            n += 1
    if n == 0:  # a family with another layout would otherwise train its vision tower unnoticed
        raise ValueError(f"no parameter under {VISION_PREFIX!r}: the vision tower is not where the supported "
                         "families keep it")
    return n


def unwrap(model):
    """The ForConditionalGeneration model under a peft wrapper (the model itself otherwise).
    peft injects its LoRA layers in place, so calling the unwrapped modules still applies them."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def is_peft(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


# ---------------------------------------------------------------------------------------------
# policy + value in one module (DeepSpeed wraps exactly one module, with one optimizer)


class ValueHead(nn.Module):
    """Scalar value from a hidden state. Zero-initialised: values start at 0, so GAE advantages
    start as plain discounted rewards and the first steps do not chase a random critic."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.proj = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden).squeeze(-1).float()


@dataclass
class ModelInputs:
    """A padded micro-batch, as the model consumes it."""

    input_ids: torch.Tensor  # [B, L] prompt + response, right-padded with pad_id
    attention_mask: torch.Tensor  # [B, L] 1 on real tokens
    mm_token_type_ids: torch.Tensor  # [B, L] 1 on image tokens (the mrope rule needs it)
    pixel_values: torch.Tensor | None  # [sum of patches, C*T*P*P] for all images of the batch, in order
    image_grid_thw: torch.Tensor | None  # [num_images, 3]
    response_positions: torch.Tensor  # [B, T] index of the hidden state that predicts response token t
    response_ids: torch.Tensor  # [B, T] right-padded (pad positions hold a valid id, masked out)
    response_mask: torch.Tensor  # [B, T] bool
    sample_ids: tuple[str, ...]
    # Shared prompts only (see the module doc); rows of input_ids are then prompts, not answers:
    response_rows: torch.Tensor | None = None  # [B] the input row holding answer b
    block_attention: torch.Tensor | None = None  # [R, 1, L, L] bool, True where a token attends
    prompt_mask: torch.Tensor | None = None  # [R, L] 1 on prompt tokens
    answer_offsets: torch.Tensor | None = None  # [R, L] t on an answer's t-th token, -1 elsewhere

    def model_kwargs(self) -> dict:
        kwargs = dict(input_ids=self.input_ids, attention_mask=self.attention_mask,
                      mm_token_type_ids=self.mm_token_type_ids, response_positions=self.response_positions)
        if self.pixel_values is not None:
            kwargs.update(pixel_values=self.pixel_values, image_grid_thw=self.image_grid_thw)
        if self.response_rows is not None:
            kwargs["shared_prompts"] = SharedPrompts(self.response_rows, self.block_attention, self.prompt_mask,
                                                     self.answer_offsets)
        return kwargs

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def to(self, device, float_dtype: torch.dtype | None = None) -> ModelInputs:
        def move(t):
            if t is None:
                return None
            t = t.to(device)
            return t.to(float_dtype) if float_dtype is not None and t.is_floating_point() else t
        return ModelInputs(move(self.input_ids), move(self.attention_mask), move(self.mm_token_type_ids),
                           move(self.pixel_values), move(self.image_grid_thw), move(self.response_positions),
                           move(self.response_ids), move(self.response_mask), self.sample_ids,
                           move(self.response_rows), move(self.block_attention), move(self.prompt_mask),
                           move(self.answer_offsets))


@dataclass
class SharedPrompts:
    """The layout of a shared-prompt batch (see ModelInputs), as ActorCritic consumes it."""

    response_rows: torch.Tensor
    block_attention: torch.Tensor
    prompt_mask: torch.Tensor
    answer_offsets: torch.Tensor

    def position_ids(self, model, input_ids, mm_token_type_ids, image_grid_thw) -> torch.Tensor:
        """[3, R, L] mrope positions: the prompt's from the model's own rule, and each answer's
        t-th token at the position after the prompt's last plus t, as if it followed the prompt alone."""
        positions, _ = model.get_rope_index(input_ids, mm_token_type_ids, image_grid_thw, attention_mask=self.prompt_mask)
        next_position = positions.masked_fill(self.prompt_mask[None] == 0, -1).amax(dim=(0, 2)) + 1  # [R]
        answers = self.answer_offsets >= 0
        after_prompt = (next_position[:, None] + self.answer_offsets).expand(3, -1, -1)
        return torch.where(answers[None], after_prompt, positions)


# Finite (a -inf logit makes the entropy's p * log p a NaN) yet far below any real logit: its
# probability is exactly 0 in float32 even after dividing by a sampling temperature.
BANNED_LOGIT = -1.0e4


class ActorCritic(nn.Module):
    """Policy (maybe peft-wrapped) plus the value model, so DeepSpeed trains both in one engine.

    forward() returns the policy's logits at the response positions [B, T, V] and the values
    [B, T] (or None): V_t is the value of the state in which response token t is chosen.
    """

    def __init__(self, policy: nn.Module, value_head: ValueHead | None = None, critic: nn.Module | None = None):
        from rollout.prompts import vision_token_ids

        super().__init__()
        self.policy = policy
        # the rollout never samples these (rollout.prompts.vision_token_ids): score the same
        # distribution, with their logits pushed to where exp() is exactly 0 in float32
        self.banned_token_ids = list(vision_token_ids(unwrap(policy).config))
        self.value_head = value_head
        self.critic = critic  # a separate trunk (the policy's class without lm_head), or None

    @property
    def has_values(self) -> bool:
        return self.value_head is not None

    def adapters_disabled(self):
        """Context: the policy acts as the reference (LoRA only)."""
        if not is_peft(self.policy):
            raise RuntimeError("adapters_disabled() needs a LoRA policy; full fine-tuning keeps a frozen reference copy")
        return self.policy.disable_adapter()

    @staticmethod
    def _trunk(model, input_ids, attention_mask, mm_token_type_ids, pixel_values, image_grid_thw,
               shared: SharedPrompts | None = None):
        base = unwrap(model)
        position_ids = None
        if shared is not None:
            position_ids = shared.position_ids(base.model, input_ids, mm_token_type_ids, image_grid_thw)
            attention_mask = shared.block_attention
        out = base.model(input_ids=input_ids, attention_mask=attention_mask, mm_token_type_ids=mm_token_type_ids,
                         pixel_values=pixel_values, image_grid_thw=image_grid_thw, position_ids=position_ids,
                         use_cache=False)
        return out.last_hidden_state

    @staticmethod
    def _at(hidden: torch.Tensor, positions: torch.Tensor, shared: SharedPrompts | None = None) -> torch.Tensor:
        """hidden [R, L, H] at positions [B, T] of rows `shared.response_rows` (row b otherwise) -> [B, T, H]."""
        if shared is not None:
            return hidden[shared.response_rows[:, None], positions]
        return hidden.gather(1, positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))

    def forward(self, input_ids, attention_mask, mm_token_type_ids, response_positions, pixel_values=None,
                image_grid_thw=None, shared_prompts: SharedPrompts | None = None, with_values: bool = True):
        shared = shared_prompts
        hidden = self._trunk(self.policy, input_ids, attention_mask, mm_token_type_ids, pixel_values, image_grid_thw,
                             shared)
        at_response = self._at(hidden, response_positions, shared)
        logits = unwrap(self.policy).lm_head(at_response)
        if self.banned_token_ids:
            logits = logits.index_fill(-1, torch.tensor(self.banned_token_ids, device=logits.device), BANNED_LOGIT)
        values = None
        if with_values and self.value_head is not None:
            if self.critic is not None:
                critic_hidden = self._trunk(self.critic, input_ids, attention_mask, mm_token_type_ids, pixel_values,
                                            image_grid_thw, shared)
                values = self.value_head(self._at(critic_hidden, response_positions, shared))
            else:
                values = self.value_head(at_response)
        return logits, values


@dataclass
class BuiltModels:
    actor_critic: ActorCritic
    reference: nn.Module | None  # frozen copy (full fine-tuning), None with LoRA (adapters disabled) or no KL


def _make_trainable(model, cfg: LearnerConfig):
    """LoRA (or not), the vision tower frozen (or not), gradient checkpointing (or not), as configured."""
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora)
    if cfg.freeze_vision_tower:
        freeze_vision_tower(model)
    if cfg.gradient_checkpointing:
        unwrap(model).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def build_models(path: str, cfg: LearnerConfig, dtype: torch.dtype = torch.float32, need_reference: bool = True,
                 seed: int = 0) -> BuiltModels:
    """Policy (+ LoRA), value model and reference as the config says. Seeded: LoRA's A matrices are
    random, and every rank must start from the same weights."""
    torch.manual_seed(seed)
    policy = load_policy(path, dtype)
    reference = None
    if need_reference and not cfg.lora.enabled:
        # Full fine-tuning: the reference must not move, so it is a separate frozen copy.
        reference = copy.deepcopy(policy).eval().requires_grad_(False)
    policy = _make_trainable(policy, cfg)

    value_head = critic = None
    hidden_size = unwrap(policy).config.text_config.hidden_size
    if cfg.value_model == "head":
        value_head = ValueHead(hidden_size).to(dtype)
    elif cfg.value_model == "separate":
        critic = load_policy(path, dtype)
        critic.lm_head = None  # the critic only needs the trunk
        critic = _make_trainable(critic, cfg)
        value_head = ValueHead(hidden_size).to(dtype)
    return BuiltModels(ActorCritic(policy, value_head, critic), reference)


# ---------------------------------------------------------------------------------------------
# rebuilding vLLM's input


class PromptMismatchError(ValueError):
    """The learner's processor does not reproduce the rollout's prompt ids or image sizes."""


class InputBuilder:
    """Experiences -> padded ModelInputs, with the exact prompt vLLM saw (checked, see module doc).

    Prompt encodings are cached per (request, prompt text): the n answers of one question share
    their images and pixel values. Call `clear()` between batches.
    """

    def __init__(self, processor, image_token_id: int, pad_id: int):
        self.processor = processor
        self.image_token_id = image_token_id
        self.pad_id = pad_id
        ip = processor.image_processor
        # One merged visual token of zeros: the smallest image the vision tower accepts.
        self.dummy_grid = torch.tensor([[1, ip.merge_size, ip.merge_size]])
        self.dummy_pixels = torch.zeros(ip.merge_size ** 2, 3 * ip.temporal_patch_size * ip.patch_size ** 2)
        self._cache: dict[tuple[str, str], tuple[list[int], torch.Tensor | None, torch.Tensor | None]] = {}

    @classmethod
    def for_model(cls, path: str) -> InputBuilder:
        from transformers import AutoConfig, AutoProcessor

        processor = AutoProcessor.from_pretrained(path)
        config = AutoConfig.from_pretrained(path)
        pad = processor.tokenizer.pad_token_id
        return cls(processor, config.image_token_id, pad if pad is not None else 0)

    def clear(self) -> None:
        self._cache.clear()

    def _images(self, exp: Experience) -> list:
        from rollout.prompts import fit_image

        images = []
        for page, size in zip(exp.pages, exp.image_sizes):
            image = fit_image(page.load_image(), exp.max_image_pixels)
            if tuple(image.size) != tuple(size):
                raise PromptMismatchError(
                    f"request {exp.request_id}: page {page.page_id} resizes to {image.size} in the learner but the "
                    f"rollout used {tuple(size)} (is Experience.max_image_pixels the rollout's max_image_pixels?)")
            images.append(image)
        return images

    def encode_prompt(self, exp: Experience) -> tuple[list[int], torch.Tensor | None, torch.Tensor | None]:
        """(prompt ids, pixel_values, image_grid_thw) for one experience, checked against the rollout."""
        key = (exp.request_id, exp.prompt_text)
        if key in self._cache:
            cached = self._cache[key]
        else:
            images = self._images(exp)
            enc = self.processor(text=[exp.prompt_text], images=images or None, return_tensors="pt")
            ids = enc["input_ids"][0].tolist()
            cached = (ids, enc.get("pixel_values"), enc.get("image_grid_thw"))
            self._cache[key] = cached
        ids = cached[0]
        if ids != list(exp.prompt_ids):
            first = next((i for i, (a, b) in enumerate(zip(ids, exp.prompt_ids)) if a != b), min(len(ids), len(exp.prompt_ids)))
            raise PromptMismatchError(
                f"request {exp.request_id}: the learner's processor gives {len(ids)} prompt tokens "
                f"({ids.count(self.image_token_id)} image tokens) but the rollout saw {len(exp.prompt_ids)} "
                f"({list(exp.prompt_ids).count(self.image_token_id)} image tokens); first difference at position "
                f"{first}. The image features would land on the wrong tokens: check that the rollout and the learner "
                "use the same processor config, chat text and max_image_pixels")
        return cached

    def build(self, experiences: Sequence[Experience], ensure_image: bool = False,
              share_prompts: bool = False) -> ModelInputs:
        """Rows in the order given. With `ensure_image`, a micro-batch without any image gets one
        extra, fully masked row holding a one-token dummy image, so the vision tower runs in every
        forward: under ZeRO-3 each module's weights are gathered collectively when it runs, and a
        rank that skipped the vision tower while another ran it would mismatch the collectives.
        With `share_prompts`, answers to the same prompt share one input row (see the module doc);
        the response tensors keep one row per experience, in the order given."""
        if not experiences:
            raise ValueError("cannot build inputs for an empty micro-batch")
        encoded = [self.encode_prompt(e) for e in experiences]
        if share_prompts:
            return self._build_shared(experiences, encoded, ensure_image)
        add_dummy = ensure_image and all(pix is None for _, pix, _ in encoded)
        lengths = [len(e.prompt_ids) + len(e.response_ids) for e in experiences]
        max_len, max_resp = max(lengths), max(len(e.response_ids) for e in experiences)
        batch = len(experiences) + int(add_dummy)
        input_ids = torch.full((batch, max_len), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((batch, max_len), dtype=torch.long)
        positions = torch.zeros((batch, max_resp), dtype=torch.long)
        response_ids = torch.full((batch, max_resp), self.pad_id, dtype=torch.long)
        response_mask = torch.zeros((batch, max_resp), dtype=torch.bool)
        pixels, grids = [], []
        for row, (exp, (ids, pix, grid)) in enumerate(zip(experiences, encoded)):
            p, r = len(ids), len(exp.response_ids)
            input_ids[row, :p + r] = torch.tensor(ids + list(exp.response_ids))
            attention_mask[row, :p + r] = 1
            # Hidden state p-1+t predicts response token t; padded slots point at the last real
            # position (any valid index works: they are masked out).
            t = torch.arange(max_resp)
            positions[row] = torch.where(t < r, p - 1 + t, p + r - 1)
            response_ids[row, :r] = torch.tensor(exp.response_ids)
            response_mask[row, :r] = True
            if pix is not None:
                pixels.append(pix)
                grids.append(grid)
        if add_dummy:  # the last row: one image token, attended to, never part of any response
            input_ids[-1, 0] = self.image_token_id
            attention_mask[-1, 0] = 1
            pixels.append(self.dummy_pixels)
            grids.append(self.dummy_grid)
        mm_token_type_ids = (input_ids == self.image_token_id).long() * attention_mask
        return ModelInputs(
            input_ids=input_ids, attention_mask=attention_mask, mm_token_type_ids=mm_token_type_ids,
            pixel_values=torch.cat(pixels) if pixels else None, image_grid_thw=torch.cat(grids) if grids else None,
            response_positions=positions, response_ids=response_ids, response_mask=response_mask,
            sample_ids=tuple(e.sample_id for e in experiences))


    def _build_shared(self, experiences: Sequence[Experience], encoded, ensure_image: bool) -> ModelInputs:
        """One input row per distinct prompt (request and prompt text), its answers after it."""
        prompts: dict[tuple[str, str], list[int]] = {}  # prompt -> indices of its experiences
        for k, e in enumerate(experiences):
            prompts.setdefault((e.request_id, e.prompt_text), []).append(k)
        rows = list(prompts.values())
        add_dummy = ensure_image and all(pix is None for _, pix, _ in encoded)
        lengths = [len(encoded[ks[0]][0]) + sum(len(experiences[k].response_ids) for k in ks) for ks in rows]
        num_rows, max_len = len(rows) + int(add_dummy), max(lengths)
        num_answers = len(experiences) + int(add_dummy)
        max_resp = max(len(e.response_ids) for e in experiences)
        input_ids = torch.full((num_rows, max_len), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((num_rows, max_len), dtype=torch.long)
        prompt_mask = torch.zeros((num_rows, max_len), dtype=torch.long)
        answer_offsets = torch.full((num_rows, max_len), -1, dtype=torch.long)
        # padding attends to itself only: a query row with no key at all would make SDPA's softmax NaN
        block = torch.eye(max_len, dtype=torch.bool).repeat(num_rows, 1, 1)
        response_rows = torch.zeros(num_answers, dtype=torch.long)
        positions = torch.zeros((num_answers, max_resp), dtype=torch.long)
        response_ids = torch.full((num_answers, max_resp), self.pad_id, dtype=torch.long)
        response_mask = torch.zeros((num_answers, max_resp), dtype=torch.bool)
        causal = torch.ones(max_len, max_len, dtype=torch.bool).tril()
        pixels, grids = [], []
        for row, ks in enumerate(rows):
            ids, pix, grid = encoded[ks[0]]
            p = len(ids)
            input_ids[row, :p] = torch.tensor(ids)
            prompt_mask[row, :p] = 1
            block[row, :p, :p] = causal[:p, :p]
            start = p
            for k in ks:
                answer = list(experiences[k].response_ids)
                r, end = len(answer), start + len(answer)
                input_ids[row, start:end] = torch.tensor(answer)
                answer_offsets[row, start:end] = torch.arange(r)
                block[row, start:end, :p] = True
                block[row, start:end, start:end] = causal[:r, :r]
                t = torch.arange(max_resp)
                # token 0 is predicted by the prompt's last state, token t by the answer's token t-1
                positions[k] = torch.where(t == 0, p - 1, torch.where(t < r, start + t - 1, end - 1))
                response_rows[k] = row
                response_ids[k, :r] = torch.tensor(answer)
                response_mask[k, :r] = True
                start = end
            attention_mask[row, :start] = 1
            if pix is not None:
                pixels.append(pix)
                grids.append(grid)
        if add_dummy:  # the last row and the last answer: one image token, never part of any response
            input_ids[-1, 0] = self.image_token_id
            attention_mask[-1, 0] = prompt_mask[-1, 0] = 1
            response_rows[-1] = num_rows - 1
            pixels.append(self.dummy_pixels)
            grids.append(self.dummy_grid)
        mm_token_type_ids = (input_ids == self.image_token_id).long() * prompt_mask
        return ModelInputs(
            input_ids=input_ids, attention_mask=attention_mask, mm_token_type_ids=mm_token_type_ids,
            pixel_values=torch.cat(pixels) if pixels else None, image_grid_thw=torch.cat(grids) if grids else None,
            response_positions=positions, response_ids=response_ids, response_mask=response_mask,
            sample_ids=tuple(e.sample_id for e in experiences), response_rows=response_rows,
            block_attention=block[:, None], prompt_mask=prompt_mask, answer_offsets=answer_offsets)


# ---------------------------------------------------------------------------------------------
# logprobs, entropy, values


@dataclass
class ForwardOutputs:
    logprobs: torch.Tensor  # [B, T] float32, 0 at padding
    entropy: torch.Tensor | None  # [B, T] float32
    values: torch.Tensor | None  # [B, T] float32
    mask: torch.Tensor  # [B, T] bool

    def first_rows(self, n: int) -> ForwardOutputs:
        """The first n rows (drops a dummy image row; the graph through it stays connected)."""
        def cut(t):
            return None if t is None else t[:n]
        return ForwardOutputs(cut(self.logprobs), cut(self.entropy), cut(self.values), cut(self.mask))


def forward_outputs(module, inputs: ModelInputs, with_entropy: bool = True, with_values: bool = True,
                    temperature: float = 1.0) -> ForwardOutputs:
    """Run `module` (an ActorCritic, a DeepSpeed engine around one, or a bare policy) on a batch and
    turn its response logits into per-token logprobs (ppo.logprobs_from_logits), entropy, values.
    `temperature` is the rollout's sampling temperature: logprobs and entropy are those of
    softmax(logits / temperature), the distribution vLLM sampled the response from. The entropy
    costs a [B, T, vocab] softmax (kept for backward under grad): ask for it only when it is used."""
    if isinstance(module, ActorCritic) or hasattr(module, "module") and isinstance(module.module, ActorCritic):
        logits, values = module(**inputs.model_kwargs(), with_values=with_values)
    else:  # a bare policy (the frozen reference copy)
        logits, values = ActorCritic(module)(**inputs.model_kwargs(), with_values=False)
    mask = inputs.response_mask
    zero = torch.zeros((), device=logits.device)
    logprobs = torch.where(mask, logprobs_from_logits(logits, inputs.response_ids, temperature), zero)
    entropy = None
    if with_entropy:
        entropy = torch.where(mask, entropy_from_logits(logits, temperature), zero)
    if values is not None:
        values = torch.where(mask, values, zero)
    return ForwardOutputs(logprobs, entropy, values, mask)


@torch.no_grad()
def sequence_logprobs(model, builder: InputBuilder, experiences: Sequence[Experience],
                      adapters_disabled: bool = False, temperature: float = 1.0) -> list[torch.Tensor]:
    """Per-experience response logprobs under `model` (ActorCritic or bare policy), one batch, of
    the distribution softmax(logits / temperature)."""
    inputs = builder.build(experiences)
    module = model
    ctx = module.adapters_disabled() if adapters_disabled else nullcontext()
    with ctx:
        out = forward_outputs(module, inputs, with_entropy=False, with_values=False, temperature=temperature)
    return [out.logprobs[i, : len(e.response_ids)].clone() for i, e in enumerate(experiences)]

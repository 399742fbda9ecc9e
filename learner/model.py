"""The learner's models in plain torch/peft (no Ray, no DeepSpeed): policy, value, reference, and
the exact rebuild of the multimodal input vLLM saw.

* Policy: `Qwen2VLForConditionalGeneration`, with LoRA (peft) on the LANGUAGE MODEL only, or full
  fine-tuning. The vision tower is frozen by default (`learner.freeze_vision_tower`).
* Reference: with LoRA, the same model with its adapters disabled (`disable_adapter()`, no second
  copy); with full fine-tuning, a frozen copy made before training starts.
* Value: a scalar head on the policy trunk's last hidden state ("head"), a separate critic trunk
  with its own head ("separate"), or none (GRPO/RLOO need no critic).

Inputs. Each sequence is `prompt_ids + response_ids`, right-padded; the prompt ids are the ones
vLLM saw (image placeholders expanded) and the learner checks that Qwen2-VL's own processor, given
the same chat text and the same resized images, produces exactly them - otherwise the image
features would land on the wrong tokens (the silent image-token mismatch of other frameworks).
Positions are the 3-D mrope ones: the model computes them from `mm_token_type_ids` (1 on image
tokens), `image_grid_thw` and the attention mask, so right padding cannot shift them.

Logits are computed only at the response positions (the hidden state at position p-1+t predicts
response token t): a prompt of a few hundred image tokens times a 152k vocabulary would otherwise
dominate memory.
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

# Module names of Qwen2-VL's language model inside Qwen2VLForConditionalGeneration (transformers 5).
LANGUAGE_MODEL_PREFIX = "model.language_model."
VISION_PREFIX = "model.visual."


# ---------------------------------------------------------------------------------------------
# loading, LoRA, freezing


def load_policy(path: str, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"):
    """The policy as transformers loads it (eval mode: PPO passes run without dropout unless asked)."""
    from transformers import Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
    return model.eval()


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
    return n


def unwrap(model):
    """The Qwen2VLForConditionalGeneration under a peft wrapper (the model itself otherwise).
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
    mm_token_type_ids: torch.Tensor  # [B, L] 1 on image tokens (Qwen2-VL needs it for mrope)
    pixel_values: torch.Tensor | None  # [sum of patches, C*T*P*P] for all images of the batch, in order
    image_grid_thw: torch.Tensor | None  # [num_images, 3]
    response_positions: torch.Tensor  # [B, T] index of the hidden state that predicts response token t
    response_ids: torch.Tensor  # [B, T] right-padded (pad positions hold a valid id, masked out)
    response_mask: torch.Tensor  # [B, T] bool
    sample_ids: tuple[str, ...]

    def model_kwargs(self) -> dict:
        kwargs = dict(input_ids=self.input_ids, attention_mask=self.attention_mask,
                      mm_token_type_ids=self.mm_token_type_ids, response_positions=self.response_positions)
        if self.pixel_values is not None:
            kwargs.update(pixel_values=self.pixel_values, image_grid_thw=self.image_grid_thw)
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
                           move(self.response_ids), move(self.response_mask), self.sample_ids)


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
        self.critic = critic  # a separate trunk (Qwen2VLForConditionalGeneration without lm_head), or None

    @property
    def has_values(self) -> bool:
        return self.value_head is not None

    def adapters_disabled(self):
        """Context: the policy acts as the reference (LoRA only)."""
        if not is_peft(self.policy):
            raise RuntimeError("adapters_disabled() needs a LoRA policy; full fine-tuning keeps a frozen reference copy")
        return self.policy.disable_adapter()

    @staticmethod
    def _trunk(model, input_ids, attention_mask, mm_token_type_ids, pixel_values, image_grid_thw):
        base = unwrap(model)
        out = base.model(input_ids=input_ids, attention_mask=attention_mask, mm_token_type_ids=mm_token_type_ids,
                         pixel_values=pixel_values, image_grid_thw=image_grid_thw, use_cache=False)
        return out.last_hidden_state

    @staticmethod
    def _at(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """hidden [B, L, H] at positions [B, T] -> [B, T, H]."""
        return hidden.gather(1, positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))

    def forward(self, input_ids, attention_mask, mm_token_type_ids, response_positions, pixel_values=None,
                image_grid_thw=None, with_values: bool = True):
        hidden = self._trunk(self.policy, input_ids, attention_mask, mm_token_type_ids, pixel_values, image_grid_thw)
        at_response = self._at(hidden, response_positions)
        logits = unwrap(self.policy).lm_head(at_response)
        if self.banned_token_ids:
            logits = logits.index_fill(-1, torch.tensor(self.banned_token_ids, device=logits.device), BANNED_LOGIT)
        values = None
        if with_values and self.value_head is not None:
            if self.critic is not None:
                critic_hidden = self._trunk(self.critic, input_ids, attention_mask, mm_token_type_ids, pixel_values,
                                            image_grid_thw)
                values = self.value_head(self._at(critic_hidden, response_positions))
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

    def build(self, experiences: Sequence[Experience], ensure_image: bool = False) -> ModelInputs:
        """Rows in the order given. With `ensure_image`, a micro-batch without any image gets one
        extra, fully masked row holding a one-token dummy image, so the vision tower runs in every
        forward: under ZeRO-3 each module's weights are gathered collectively when it runs, and a
        rank that skipped the vision tower while another ran it would mismatch the collectives."""
        if not experiences:
            raise ValueError("cannot build inputs for an empty micro-batch")
        encoded = [self.encode_prompt(e) for e in experiences]
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

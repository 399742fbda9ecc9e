"""Messages between the driver and the learner: what one sampled answer carries into training.

The learner never trusts a re-tokenization: it trains on exactly the token ids vLLM sampled after
exactly the prompt ids vLLM saw, and it rebuilds the pixels from the same page images resized the
same way (`fit_image` with the rollout's `max_image_pixels`), checking the result against the
rollout's record (`image_sizes`, `prompt_ids`) before computing anything.

All types are plain dataclasses: they pickle cheaply through the Ray object store.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from common.shipping import ShippedFiles
from docvqa.sample import Page
from rollout.types import RolloutResult


@dataclass(frozen=True)
class Experience:
    """One sampled answer to one question, with its reward: the unit the learner trains on."""

    sample_id: str  # unique within a batch: "<request_id>#<answer index>"
    request_id: str  # RolloutResult.request_id: unique in the batch (the driver's "<index>:<question id>")
    group_id: int  # answers to the same question share it (GRPO/RLOO baselines)
    prompt_text: str  # chat text with ONE <|image_pad|> per image (the processor expands it)
    prompt_ids: tuple[int, ...]  # as vLLM saw them, image placeholders expanded
    pages: tuple[Page, ...]  # the page images the prompt shows, in prompt order
    image_sizes: tuple[tuple[int, int], ...]  # (width, height) of each image after fit_image
    response_ids: tuple[int, ...]  # the sampled answer tokens
    rollout_logprobs: tuple[float, ...]  # logprob of each sampled token under the rollout weights
    reward: float
    max_image_pixels: int | None = None  # the rollout's rollout.max_image_pixels (fit_image bound)
    finish_reason: str = "stop"
    weights_version: int = 0  # the policy version that sampled it

    def __post_init__(self) -> None:
        if len(self.pages) != len(self.image_sizes):
            raise ValueError(f"sample {self.sample_id}: {len(self.pages)} pages but {len(self.image_sizes)} image sizes")
        if len(self.rollout_logprobs) != len(self.response_ids):
            raise ValueError(f"sample {self.sample_id}: {len(self.response_ids)} response tokens but "
                             f"{len(self.rollout_logprobs)} rollout logprobs")

    @property
    def num_tokens(self) -> int:
        """Prompt plus response tokens: the sequence the learner runs."""
        return len(self.prompt_ids) + len(self.response_ids)


@dataclass
class TrainBatch:
    """The experiences of one training step, plus where they came from."""

    experiences: list[Experience]
    weights_version: int = 0  # the oldest policy version among the experiences (staleness in async mode)
    step: int | None = None  # the driver's step number, for logs
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.experiences)

    @classmethod
    def from_rollouts(cls, results: Sequence[RolloutResult], rewards, pages_by_id: Mapping[str, Page],
                      max_image_pixels: int | None = None, step: int | None = None) -> TrainBatch:
        exps = experiences_from_rollouts(results, rewards, pages_by_id, max_image_pixels)
        version = min((e.weights_version for e in exps), default=0)
        return cls(experiences=exps, weights_version=version, step=step)


def experiences_from_rollouts(results: Sequence[RolloutResult], rewards, pages_by_id: Mapping[str, Page],
                              max_image_pixels: int | None = None, first_group_id: int = 0) -> list[Experience]:
    """One Experience per sampled answer. The answers of `results[i]` form group `first_group_id + i`.

    `rewards` is either parallel to `results` (`rewards[i][j]` scores `results[i].answers[j]`) or a
    mapping request_id -> list of per-answer rewards. Refused, naming the request: a reward count
    that differs from the answer count, a non-finite reward, a page id missing from `pages_by_id`,
    an answer without tokens (nothing to train on; vLLM always samples >= 1 token).
    """
    out: list[Experience] = []
    if isinstance(rewards, Mapping):
        missing = [r.request_id for r in results if r.request_id not in rewards]
        if missing:
            raise ValueError(f"no rewards for request(s) {missing[:10]}")
        per_result = [rewards[r.request_id] for r in results]
    else:
        if len(rewards) != len(results):
            raise ValueError(f"{len(rewards)} reward lists for {len(results)} rollout results")
        per_result = list(rewards)
    for i, (res, res_rewards) in enumerate(zip(results, per_result)):
        res_rewards = [float(r) for r in res_rewards]
        if len(res_rewards) != len(res.answers):
            raise ValueError(f"request {res.request_id}: {len(res_rewards)} rewards for {len(res.answers)} answers")
        bad = [j for j, r in enumerate(res_rewards) if not math.isfinite(r)]
        if bad:
            raise ValueError(f"request {res.request_id}: non-finite reward for answer(s) {bad}: {[res_rewards[j] for j in bad]}")
        unknown = [p for p in res.page_ids if p not in pages_by_id]
        if unknown:
            raise ValueError(f"request {res.request_id}: page(s) {unknown} are not in pages_by_id")
        pages = tuple(pages_by_id[p] for p in res.page_ids)
        for j, (answer, reward) in enumerate(zip(res.answers, res_rewards)):
            if not answer.token_ids:
                raise ValueError(f"request {res.request_id}: answer {j} has no tokens")
            out.append(Experience(
                sample_id=f"{res.request_id}#{j}", request_id=res.request_id, group_id=first_group_id + i,
                prompt_text=res.prompt_text, prompt_ids=tuple(res.prompt_ids), pages=pages,
                image_sizes=tuple(tuple(s) for s in res.image_sizes), response_ids=tuple(answer.token_ids),
                rollout_logprobs=tuple(float(x) for x in answer.logprobs), reward=reward,
                max_image_pixels=max_image_pixels, finish_reason=answer.finish_reason,
                weights_version=res.weights_version,
            ))
    return out


@dataclass
class ExportedWeights:
    """New policy weights for the rollout workers.

    * kind "lora": `adapter_dir` is a peft `save_pretrained` directory (adapter_config.json +
      adapter_model.safetensors) on the driver's host, written atomically, and `adapter` the same
      files as bytes (what reaches rollout workers on other hosts); vLLM serves it as a LoRARequest with a FRESH
      int id (reusing an id silently serves the old adapter). `tensors` is None.
    * kind "full": the policy checkpoint's own names (exactly the keys of its model.safetensors,
      e.g. "model.layers.0.self_attn.q_proj.weight", "visual.blocks.0...", "lm_head.weight") to
      tensors in the learner's dtype; a LoRA policy is exported merged (base + delta). Either
      `tensors` (CPU tensors, from an in-process learner) or `object_ref` (a Ray object holding
      `rollout.weight_sync.to_numpy` arrays, put once by learner rank 0 and read by the rollout
      workers without passing through the driver). `named_tensors()` gives tensors either way.
      `adapter_dir` is None.
    `version` counts the learner updates that changed the weights (at least one optimizer step
    applied; 0 = the base weights the rollout starts with). Exporting twice without an update gives
    the same version, which rollout workers refuse as not newer - nothing new to load.
    """

    version: int
    kind: Literal["full", "lora"]
    tensors: dict[str, torch.Tensor] | None = None
    adapter_dir: str | None = None
    object_ref: object | None = None  # ray.ObjectRef
    adapter: ShippedFiles | None = None  # kind "lora": the adapter's files, for workers on any host

    def named_tensors(self) -> dict[str, torch.Tensor]:
        """The full weights as CPU tensors (fetches `object_ref` when that is how they came)."""
        if self.kind != "full":
            raise ValueError(f"weights v{self.version} are a LoRA adapter ({self.adapter_dir}), not full weights")
        if self.tensors is not None:
            return self.tensors
        import ray

        from rollout.weight_sync import from_numpy

        return from_numpy(ray.get(self.object_ref))

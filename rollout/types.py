"""Messages between the driver, the rollout workers and the learner."""

from __future__ import annotations

from dataclasses import dataclass, field

from docvqa.sample import Page


@dataclass(frozen=True)
class RolloutRequest:
    """One question with the pages the policy reads (retrieved, or the gold page in ablations)."""

    request_id: str  # unique within a batch (the driver uses "<index in the step>:<question id>")
    question: str
    pages: tuple[Page, ...]
    # vLLM's sampling seed of this request (answer j draws with seed + j); None: the sampling
    # config's own seed. The driver derives one per request from (run seed, step, index).
    seed: int | None = None


@dataclass
class SampledAnswer:
    token_ids: list[int]
    logprobs: list[float]  # logprob of each sampled token under the rollout weights
    text: str
    finish_reason: str  # "stop" (EOS/stop string) or "length"


@dataclass
class RolloutResult:
    """All answers sampled for one request, with what the learner needs to rebuild the input."""

    request_id: str
    prompt_text: str  # chat text with one <|image_pad|> per image (the learner's processor expands it)
    prompt_ids: list[int]  # as vLLM saw them, image placeholders expanded
    page_ids: tuple[str, ...]
    image_sizes: tuple[tuple[int, int], ...]  # (width, height) after `fit_image`
    answers: list[SampledAnswer]
    weights_version: int = 0
    extra: dict = field(default_factory=dict)


@dataclass
class GenerateOutput:
    results: list[RolloutResult]
    skipped: dict[str, str] = field(default_factory=dict)  # request id -> why it was skipped

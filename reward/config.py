"""The `reward` config section: which reward components, their weights, and the reward actors."""

from __future__ import annotations

import math
import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from common.schema import Section
from reward.metrics import AnlsLength
from reward.types import COMPONENT_NAMES

_USER_FN = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")


class RewardConfig(Section):
    # weights by component name; the reward is sum(weight * component). Negative weights are
    # allowed (penalties). Known: anls, exact_match, containment, format, retrieval, user.
    components: dict[str, float] = Field(default_factory=lambda: {"anls": 1.0})
    anls_threshold: float = Field(0.5, ge=0.0, le=1.0)  # similarity below this scores 0 (0.5 kept)
    # The ANLS denominator. "official": the official DocVQA script's max of the raw strings'
    # .upper() lengths, so the anls component equals the published metric. "normalized": the max
    # of the normalized (stripped, whitespace-collapsed) lengths: a reward that a policy cannot
    # raise by padding its answer with whitespace (officially "ab   " vs "abc" earns 0.8, "ab" 0.67).
    anls_length: AnlsLength = "official"
    extraction: Literal["none", "answer_prefix", "last_line", "first_line"] = "none"
    max_answer_chars: int = Field(128, ge=1)  # the format component's limit, in characters
    # An answer whose normalized similarity to one of the sample's rejected answers (down-voted in
    # feedback, `DocVQASample.rejected_answers`) is at least this reproduces it: its reward is 0.
    rejected_similarity: float = Field(0.9, gt=0.0, le=1.0)
    retrieval_metric: Literal["hit", "ndcg"] = "hit"
    retrieval_k: int = Field(1, ge=1)
    user_function: str | None = None  # "package.module:function", called (sample, response_text, retrieved_pages) -> float
    user_timeout_s: float = Field(5.0, gt=0.0)
    on_error: Literal["skip", "stop"] = "skip"  # a failing user function: mark the sample, or raise
    num_actors: int = Field(1, ge=1)
    num_cpus_per_actor: float = Field(1.0, gt=0.0)
    batch_size: int = Field(64, ge=1)  # requests per actor call
    collect_timeout_s: float = Field(300.0, gt=0.0)  # how long the driver waits for a step's rewards

    @field_validator("components")
    @classmethod
    def _known_components(cls, v: dict[str, float]) -> dict[str, float]:
        if not v:
            raise ValueError(f"at least one reward component is needed; known: {', '.join(COMPONENT_NAMES)}")
        for name, weight in v.items():
            if name not in COMPONENT_NAMES:
                raise ValueError(f"unknown component {name!r}; known: {', '.join(COMPONENT_NAMES)}")
            if not math.isfinite(weight):
                raise ValueError(f"the weight of {name!r} must be a finite number (got {weight!r})")
        return v

    @field_validator("user_function")
    @classmethod
    def _user_function_path(cls, v: str | None) -> str | None:
        if v is not None and not _USER_FN.match(v):
            raise ValueError(f"user_function must look like 'package.module:function' (got {v!r})")
        return v

    @model_validator(mode="after")
    def _user_component_needs_function(self) -> RewardConfig:
        if "user" in self.components and self.user_function is None:
            raise ValueError("components.user has a weight but user_function is not set ('module:function')")
        if self.user_function is not None and "user" not in self.components:
            raise ValueError(
                f"user_function={self.user_function!r} is set but components has no 'user' weight; "
                "add e.g. components.user: 1.0"
            )
        return self

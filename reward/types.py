"""Message types of the reward role: what the driver sends to a reward actor and what comes back.

Plain dataclasses so they pickle cheaply through the Ray object store. No Ray import here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from docvqa.sample import DocVQASample

# The component registry's names, in report order. `reward.scoring` implements each one;
# `reward.config` validates `reward.components` against this tuple.
COMPONENT_NAMES: tuple[str, ...] = ("anls", "exact_match", "containment", "format", "retrieval", "user")

BUILTIN_COMPONENTS: tuple[str, ...] = COMPONENT_NAMES[:-1]  # computed for every sample, always reported


class RewardError(RuntimeError):
    """A reward that cannot be computed under the configured policy (e.g. `on_error: stop`).

    The message names the sample (question id, sample and response index) or the actor.
    """


class RewardTimeoutError(RewardError, TimeoutError):
    """Reward results did not arrive in time; the message names the actor(s) still scoring."""


@dataclass(frozen=True)
class ScoreRequest:
    """One sampled response to score.

    `sample_index` / `response_index` identify the prompt within the step batch and the sampled
    response within its group (rollout `n`); they are echoed in the result so the caller can match.
    `retrieved_pages` are the page ids the policy was shown, best first (for the retrieval component).
    """

    sample: DocVQASample
    response_text: str | None
    retrieved_pages: tuple[str, ...] = ()
    sample_index: int = 0
    response_index: int = 0


@dataclass
class ScoreResult:
    """The reward of one response.

    `reward` is the weighted sum of the configured components. `components` holds every built-in
    component (weighted or not, so metrics can report ANLS even when training on something else)
    plus `user` when a user function is configured. `answer` is the text that was scored after
    answer extraction.

    When `error` is set (a user function failed under `on_error: skip`) the result must be excluded
    from the update: `reward` is then 0.0 and `components` lacks `user`.

    `reproduced_rejected`: the answer reproduces one of the sample's rejected answers (feedback
    down-votes), so `reward` is 0.0 whatever the components say.
    """

    question_id: str
    reward: float
    components: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    sample_index: int = 0
    response_index: int = 0
    answer: str = ""
    reproduced_rejected: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None

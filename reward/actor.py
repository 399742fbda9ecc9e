"""RewardActor: a thin Ray shell around `reward.scoring.score_batch` (driven by `reward.group.RewardPool`)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import ray

from reward.config import RewardConfig
from reward.scoring import get_user_runner, leaked_user_threads, score_batch
from reward.types import ScoreRequest, ScoreResult


@ray.remote(num_cpus=1, max_restarts=0)
class RewardActor:
    """Scores chunks of requests. Loads the user function at start, so a bad path fails fast.

    Default `num_cpus=1`; `RewardPool` overrides it with `reward.num_cpus_per_actor`.
    """

    def __init__(self, config: RewardConfig, name: str = "reward-actor") -> None:
        self.config = config
        self.name = name
        if config.user_function is not None:
            get_user_runner(config.user_function)

    def ready(self) -> dict:
        return {"name": self.name, "pid": os.getpid()}

    def score(self, requests: Sequence[ScoreRequest]) -> tuple[list[ScoreResult], int]:
        """(results in order, user-function threads leaked so far in this process)."""
        results = score_batch(requests, self.config)
        return results, leaked_user_threads()

"""Rewards: pure scoring functions (`reward.metrics`, `reward.extract`, `reward.scoring`) and the
Ray reward actors and their pool (`reward.actor`, `reward.group`, imported separately so the pure parts never import Ray)."""

from reward.config import RewardConfig
from reward.extract import extract_answer
from reward.metrics import anls_corpus, anls_score, containment_score, exact_match, normalize_answer
from reward.scoring import reward_metrics, score_batch, score_one
from reward.types import COMPONENT_NAMES, RewardError, RewardTimeoutError, ScoreRequest, ScoreResult

__all__ = [
    "COMPONENT_NAMES",
    "RewardConfig",
    "RewardError",
    "RewardTimeoutError",
    "ScoreRequest",
    "ScoreResult",
    "anls_corpus",
    "anls_score",
    "containment_score",
    "exact_match",
    "extract_answer",
    "normalize_answer",
    "reward_metrics",
    "score_batch",
    "score_one",
]

"""Proof that it learns, short version of `make demo`: the tiny preset on the easy level, a brief
supervised warm start, then GRPO. The train reward of the last steps must be clearly above that of
the first steps (Welch's t over per-step means), and held-out ANLS and exact match must each rise by
at least 0.15 (9 of the 60 held-out questions)."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import pytest

from cluster.config import load_config
from cluster.metrics import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.ray, pytest.mark.vllm, pytest.mark.slow]

STEPS = 30
WINDOW = 10  # steps averaged at each end


def welch_t(a: list[float], b: list[float]) -> float:
    """t statistic of mean(b) - mean(a), unequal variances."""
    se = math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))
    return (statistics.fmean(b) - statistics.fmean(a)) / se


def test_welch_t_by_hand():
    # means 2 and 5, variances 1 and 1, n = 3 each: t = 3 / sqrt(2/3)
    assert welch_t([1.0, 2.0, 3.0], [4.0, 5.0, 6.0]) == pytest.approx(3 / math.sqrt(2 / 3))


def test_reward_rises_on_the_easy_level(ray_cluster, tiny_models, tmp_path):
    from cluster.train import Trainer

    cfg = load_config(ROOT / "configs" / "tiny.yaml", [
        f"run.output_dir={tmp_path}", f"run.models_dir={tiny_models['policy'].parent}", f"trainer.total_steps={STEPS}",
        "trainer.eval_every=0", "trainer.save_every=0", "ray.address=null"])
    trainer = Trainer(cfg)
    try:
        trainer.run()
    finally:
        trainer.shutdown()
    rows = read_jsonl(tmp_path / "logs" / "metrics.jsonl")
    rewards = [r["reward/mean"] for r in rows if "reward/mean" in r]
    assert len(rewards) == STEPS
    first, last = rewards[:WINDOW], rewards[-WINDOW:]
    t = welch_t(first, last)
    evals = [r["eval/anls"] for r in rows if "eval/anls" in r]
    warm = next(r for r in rows if "warm_start/eval_anls_after" in r)
    print(f"train reward {statistics.fmean(first):.3f} -> {statistics.fmean(last):.3f} (t={t:.1f}); held-out ANLS "
          f"{warm['warm_start/eval_anls_before']:.3f} (base) -> {evals[0]:.3f} (warm start) -> {evals[-1]:.3f} (RL)")
    assert t > 3.0, (first, last)
    # held-out answers, greedy: more of them exactly right, not only more partial credit
    exact = [r["eval/exact_match"] for r in rows if "eval/exact_match" in r]
    print(f"held-out exact match {exact[0]:.3f} -> {exact[-1]:.3f}")
    assert evals[-1] - evals[0] >= 0.15 and exact[-1] - exact[0] >= 0.15, (evals, exact)
    assert warm["warm_start/eval_anls_after"] == pytest.approx(evals[0], abs=0.1)  # two engines, one policy

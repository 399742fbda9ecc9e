"""User reward functions for the reward tests (referenced as "reward_fns:<name>").

pytest puts tests/ on sys.path; Ray workers get it through the actor's runtime_env PYTHONPATH.
"""

from __future__ import annotations

import time


def page_bonus(sample, response_text, retrieved_pages) -> float:
    """0.5 when the first retrieved page is the gold page; sleeps when the question says SLOW/HANG."""
    if "HANG" in sample.question:
        time.sleep(3.0)
    elif "SLOW" in sample.question:
        time.sleep(0.4)
    return 0.5 if tuple(retrieved_pages[:1]) == (sample.gold_page,) else 0.0


def length_penalty(sample, response_text, retrieved_pages) -> float:
    return -min(len(response_text or ""), 100) / 100.0


def boom(sample, response_text, retrieved_pages) -> float:
    raise ValueError("boom")


def sleepy(sample, response_text, retrieved_pages) -> float:
    time.sleep(3.0)
    return 1.0


def not_a_float(sample, response_text, retrieved_pages):
    return "high"


def nan_reward(sample, response_text, retrieved_pages):
    return float("nan")


NOT_CALLABLE = 3

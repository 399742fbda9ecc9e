"""Reward actors on the shared local Ray cluster: the pool equals the pure functions, submit does not
block, a dead actor is replaced, a timeout names the actor, a leaky actor is recycled."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from docvqa.sample import DocVQASample
from reward.config import RewardConfig
from reward.scoring import score_batch
from reward.types import RewardTimeoutError, ScoreRequest

pytestmark = pytest.mark.ray

TESTS_DIR = str(Path(__file__).resolve().parent)  # where reward_fns.py lives, for the workers

CONFIG = RewardConfig(
    components={"anls": 1.0, "containment": 0.5, "format": 0.1, "retrieval": 0.2, "user": 0.3},
    extraction="answer_prefix",
    user_function="reward_fns:page_bonus",
    user_timeout_s=1.0,
    num_actors=2,
    num_cpus_per_actor=0.25,
    batch_size=8,
)


def make_requests(n: int, question: str = "Who?") -> list[ScoreRequest]:
    reqs = []
    for i in range(n):
        s = DocVQASample(f"q{i}", question, (f"Acme {i}", f"ACME-{i}"), f"d{i}", f"d{i}/p1", (f"d{i}/p1", f"d{i}/p2"))
        text = ["The answer is Acme %d." % i, "acme-%d" % (i + 1), "Answer: the firm Acme %d" % i, ""][i % 4]
        pages = (f"d{i}/p1",) if i % 3 else (f"d{i}/p2", f"d{i}/p1")
        reqs.append(ScoreRequest(s, text, pages, sample_index=i // 2, response_index=i % 2))
    return reqs


@pytest.fixture(scope="module")
def pool(ray_cluster):
    from reward.group import RewardPool

    p = RewardPool(CONFIG, actor_options={"runtime_env": {"env_vars": {"PYTHONPATH": TESTS_DIR}}})
    yield p
    p.shutdown()


def test_pool_equals_pure_functions(pool):
    reqs = make_requests(37)
    results = pool.score(reqs, timeout_s=60)
    assert results == score_batch(reqs, CONFIG)  # same floats, same order, same everything
    assert len({id(c) for c in pool.actors}) == 2
    assert pool.score([], timeout_s=10) == []


def test_submit_returns_before_scoring_finishes(pool):
    reqs = make_requests(4, question="SLOW please")  # 0.4 s each in the user function
    t0 = time.monotonic()
    handle = pool.submit(reqs)
    submitted = time.monotonic() - t0
    assert submitted < 0.3
    assert not handle.done()
    results = pool.collect(handle, timeout_s=60)
    assert time.monotonic() - t0 >= 0.7  # two chunks of two, 0.8 s each, in parallel
    assert results == score_batch(make_requests(4), CONFIG)


def test_collect_timeout_names_the_actor(pool):
    handle = pool.submit(make_requests(4, question="SLOW"))
    with pytest.raises(RewardTimeoutError, match=r"still waiting on reward-actor-\d"):
        pool.collect(handle, timeout_s=0.05)
    assert len(pool.collect(handle, timeout_s=60)) == 4  # the handle stays valid


def test_dead_actor_is_replaced_and_its_chunk_resubmitted(pool, ray_cluster):
    ray = ray_cluster
    restarts = pool.restarts
    handle = pool.submit(make_requests(4, question="SLOW"))
    time.sleep(0.2)
    old = pool.actors[1]
    ray.kill(old, no_restart=True)  # killed while scoring its chunk
    assert pool.collect(handle, timeout_s=60) == score_batch(make_requests(4), CONFIG)
    assert pool.restarts == restarts + 1 and pool.actors[1] is not old
    assert "restart 1" in pool.actor_name(1)


def test_leaky_actor_is_recycled_after_a_user_timeout(pool):
    restarts = pool.restarts
    results = pool.score(make_requests(1, question="HANG"), timeout_s=60)  # sleeps 3 s, timeout 1 s
    assert results[0].error and "timed out after 1 s on sample q0" in results[0].error
    assert pool.restarts == restarts + 1
    ok = make_requests(3)
    assert pool.score(ok, timeout_s=60) == score_batch(ok, CONFIG)

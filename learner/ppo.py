"""The PPO / GRPO / RLOO math of the learner, in plain torch (no Ray, no DeepSpeed, no model).

Written CleanRL-style: every quantity is computed in the open and named, and the comments say
*why* each step is the way it is. Nothing here holds state; the learner actor calls these
functions on its micro-batches.

Conventions shared by every function
------------------------------------
* Token-level tensors are ``[batch, response_len]`` (``[B, T]``).
* ``mask`` is the response mask: nonzero (1.0 / True) on real response tokens, 0 on padding.
  Float, int and bool masks are accepted; the mask is treated as *binary* (nonzero = valid),
  never as a weight.
* Padding never leaks: every input is replaced by 0 at padded positions (``torch.where``, not a
  multiply) *before* any arithmetic, so garbage, ``inf`` or ``nan`` in the padding can change
  neither a statistic, nor an output at a valid position, nor a gradient (the gradient at padded
  positions is exactly 0). Token-level outputs are 0 at padded positions.
* An empty selection (no valid token) has mean / sum 0, not NaN, so a rank whose micro-batch is all
  padding still produces a finite loss connected to the graph and joins the collective backward.
  Variances of empty selections raise instead (there is no sensible value to whiten with).
* Low-precision logits (bf16 / fp16) are upcast to float32, a chunk of rows at a time, before any
  softmax arithmetic: a bf16 log-probability of magnitude ~10 is only good to ~0.06, which is
  larger than the PPO clip range itself.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import torch

__all__ = [
    "AGGREGATIONS",
    "KL_KINDS",
    "aggregate_loss",
    "compute_gae",
    "entropy_from_logits",
    "explained_variance",
    "group_advantages",
    "kl_estimate",
    "logprobs_from_logits",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "policy_loss",
    "token_rewards",
    "truncated_importance_weights",
    "value_loss",
]

KL_KINDS: tuple[str, ...] = ("k1", "k2", "k3")
AGGREGATIONS: tuple[str, ...] = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")

# exp() of a log-ratio above ~88 overflows float32. A log-ratio of 20 is already a probability ratio
# of 5e8: far outside any clip range, so clamping there changes no PPO decision but keeps every
# intermediate (and its gradient) finite.
MAX_LOG_RATIO = 20.0

# Rows of a [N, vocab] logits matrix upcast to float32 at once (1024 x 152k vocab x 4 B ~ 620 MB).
_UPCAST_CHUNK_ROWS = 1024
_LOW_PRECISION = (torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# masks and masked statistics
# ---------------------------------------------------------------------------------------------


def _valid(mask: torch.Tensor, like: torch.Tensor, name: str = "mask") -> torch.Tensor:
    """The boolean 'is a real token' tensor, after checking it lines up with ``like``."""
    if mask.shape != like.shape:
        raise ValueError(f"{name} has shape {tuple(mask.shape)}, expected {tuple(like.shape)}")
    return mask if mask.dtype == torch.bool else mask != 0


def _zero_padding(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``x`` with padded positions set to 0 (``where``, so nan/inf padding cannot propagate)."""
    return torch.where(valid, x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``x`` over valid positions (all of them, or along ``dim``)."""
    valid = _valid(mask, x)
    x = _zero_padding(x, valid)
    return x.sum() if dim is None else x.sum(dim=dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over valid positions; 0 where there is no valid position (see module doc)."""
    valid = _valid(mask, x)
    count = valid.sum() if dim is None else valid.sum(dim=dim)
    # clamp_min(1): an empty selection has sum 0, so its mean is 0 rather than 0/0 = NaN.
    return masked_sum(x, valid, dim) / count.clamp_min(1).to(x.dtype)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over all valid positions (Bessel-corrected when ``unbiased``).

    Raises ValueError when there are too few valid positions (0, or 1 when unbiased): that is a
    caller bug (e.g. whitening an all-padding batch), not something to paper over with a NaN.
    """
    valid = _valid(mask, x)
    x = _zero_padding(x, valid)  # first, so nan/inf padding cannot reach even a gradient
    count = int(valid.sum().item())  # one host sync; needed to decide whether we can divide at all
    needed = 2 if unbiased else 1
    if count < needed:
        raise ValueError(
            f"masked_var needs at least {needed} valid position(s) "
            f"({'unbiased' if unbiased else 'biased'}), got {count}"
        )
    mean = masked_mean(x, valid)
    centered = _zero_padding(x - mean, valid)
    return (centered * centered).sum() / (count - 1 if unbiased else count)


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """Normalize ``x`` to unit variance (and zero mean if ``shift_mean``) over valid positions.

    Statistics use valid positions only (unbiased variance, as veRL/OpenRLHF); padded positions of
    the result are 0. ``shift_mean=False`` keeps the original mean (only rescales around it), which
    is what PPO implementations use when whitening rewards (the sign of the reward must survive).
    """
    valid = _valid(mask, x)
    x = _zero_padding(x, valid)
    mean = masked_mean(x, valid)
    var = masked_var(x, valid, unbiased=True)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return _zero_padding(whitened, valid)


# ---------------------------------------------------------------------------------------------
# rewards and advantages
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def token_rewards(
    seq_rewards: torch.Tensor,
    mask: torch.Tensor,
    kl: torch.Tensor | None = None,
    kl_coef: float = 0.0,
) -> torch.Tensor:
    """Spread sequence rewards [B] onto tokens [B, T] ("KL in reward" mode of OpenRLHF/TRL PPO).

    Each sequence's scalar reward lands on its *last valid* token (the one that ended the answer,
    so GAE credits it to every earlier token through bootstrapping), and every valid token pays
    ``-kl_coef * kl`` (per-token KL to the reference policy, e.g. ``kl_estimate(..., "k1")``).
    Padded positions are 0. A row with no valid token raises: its reward would silently vanish.
    """
    valid = mask if mask.dtype == torch.bool else mask != 0
    if valid.dim() != 2:
        raise ValueError(f"mask must be [B, T], got shape {tuple(mask.shape)}")
    batch, length = valid.shape
    if seq_rewards.shape != (batch,):
        raise ValueError(f"seq_rewards has shape {tuple(seq_rewards.shape)}, expected ({batch},)")
    if kl is None and kl_coef != 0.0:
        raise ValueError("kl_coef is nonzero but no kl was given")

    dtype = seq_rewards.dtype if seq_rewards.is_floating_point() else torch.get_default_dtype()
    if kl is not None and kl.is_floating_point():
        dtype = torch.promote_types(dtype, kl.dtype)

    empty_rows = (~valid.any(dim=1)).nonzero().flatten().tolist()
    if empty_rows:
        raise ValueError(f"rows {empty_rows} have no valid response token to put the reward on")

    rewards = torch.zeros(batch, length, dtype=dtype, device=valid.device)
    if kl is not None:
        kl_valid = _valid(mask, kl, "mask (vs kl)")
        # The KL here is part of the reward (a target), not a term to differentiate: no gradient.
        rewards = rewards - kl_coef * _zero_padding(kl.detach().to(dtype), kl_valid)
    # Index of the last valid token: the largest position whose mask is set (works with holes too).
    positions = torch.arange(length, device=valid.device).expand(batch, length)
    last = torch.where(valid, positions, -1).max(dim=1).values
    rows = torch.arange(batch, device=valid.device)
    rewards[rows, last] = rewards[rows, last] + seq_rewards.to(dtype)
    return rewards


@torch.no_grad()
def compute_gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized Advantage Estimation over token-level rewards and values [B, T].

    Backwards recursion, for a right-padded response (mask = ones then zeros):
        delta_t = r_t + gamma * V_{t+1} * mask_{t+1} - V_t
        A_t     = delta_t + gamma * lam * A_{t+1} * mask_{t+1}
        R_t     = A_t + V_t                       (the value target, "returns")
    The value after the last valid token is 0: the answer ended, the episode is over.

    Masked tokens in the *middle* (holes, e.g. tool output spliced into a response) are *skipped*:
    the recursion carries V and A of the next valid token straight across the hole, as if the
    masked tokens were not there (no discount is paid for them, their rewards/values are ignored).
    For the standard right-padded mask this is exactly the formula above; left padding works too.

    Both outputs are 0 at padded positions. Computed without gradient: these are targets.
    """
    if not 0.0 <= gamma <= 1.0 or not 0.0 <= lam <= 1.0:
        raise ValueError(f"gamma and lam must lie in [0, 1], got gamma={gamma}, lam={lam}")
    valid = _valid(mask, rewards)
    _valid(mask, values, "mask (vs values)")
    rewards = _zero_padding(rewards.detach(), valid)
    values = _zero_padding(values.detach().to(rewards.dtype), valid)

    batch, length = rewards.shape
    advantages = torch.zeros_like(rewards)
    # State carried backwards: V and A of the *next valid* token; 0 past the end of the response.
    next_value = rewards.new_zeros(batch)
    next_advantage = rewards.new_zeros(batch)
    for t in reversed(range(length)):
        is_real = valid[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = torch.where(is_real, advantage, 0.0)
        # Only a real token becomes "the next token" for the one before it; padding is skipped.
        next_value = torch.where(is_real, values[:, t], next_value)
        next_advantage = torch.where(is_real, advantage, next_advantage)
    returns = _zero_padding(advantages + values, valid)
    return advantages, returns


@torch.no_grad()
def group_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor | Sequence[int],
    kind: str = "grpo",
    eps: float = 1e-6,
    scale_by_std: bool = True,
) -> torch.Tensor:
    """Critic-free sequence advantages [N] from a group baseline (answers to the same prompt).

    * ``"grpo"``: ``(r - mean_g) / (std_g + eps)`` with the *unbiased* (Bessel, n-1) group std,
      as TRL's GRPOTrainer (``Tensor.std``) and DeepSeek's reference; ``scale_by_std=False`` gives
      the Dr. GRPO variant ``r - mean_g`` (no per-prompt difficulty reweighting).
      A group whose rewards are all equal gets advantage 0 (its std is 0, numerator is 0).
    * ``"rloo"``: ``r_i - mean(r_j, j != i in g)`` (leave-one-out baseline, unbiased);
      ``scale_by_std`` and ``eps`` are ignored.

    ``group_ids`` are arbitrary ints; members of a group need not be contiguous.
    A group with a single member has no baseline (its advantage would be 0 for GRPO and undefined
    for RLOO), which almost always means samples were dropped upstream: both kinds refuse it with
    a ValueError naming the group id(s).
    """
    if kind not in ("grpo", "rloo"):
        raise ValueError(f"unknown group advantage kind {kind!r}; expected one of 'grpo', 'rloo'")
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be [N], got shape {tuple(rewards.shape)}")
    group_ids = torch.as_tensor(group_ids, device=rewards.device)
    if group_ids.shape != rewards.shape:
        raise ValueError(
            f"group_ids has shape {tuple(group_ids.shape)}, expected {tuple(rewards.shape)}"
        )
    if group_ids.is_floating_point() or group_ids.dtype == torch.bool:
        raise ValueError(f"group_ids must be integers, got dtype {group_ids.dtype}")
    if not rewards.is_floating_point():
        rewards = rewards.to(torch.get_default_dtype())
    rewards = rewards.detach()

    unique_ids, group_of, group_size = torch.unique(
        group_ids, return_inverse=True, return_counts=True
    )
    lonely = unique_ids[group_size < 2].tolist()
    if lonely:
        raise ValueError(
            f"group(s) {lonely} have a single sample; a group baseline needs >= 2 samples per "
            "prompt (were samples of these prompts filtered out?)"
        )

    n_groups = unique_ids.numel()
    size = group_size.to(rewards.dtype)[group_of]  # per-sample size of its own group
    group_total = rewards.new_zeros(n_groups).index_add_(0, group_of, rewards)[group_of]

    if kind == "rloo":
        # Baseline = mean of the *other* members: (group total - own reward) / (size - 1).
        leave_one_out_mean = (group_total - rewards) / (size - 1)
        return rewards - leave_one_out_mean

    centered = rewards - group_total / size
    if not scale_by_std:
        return centered
    squares = rewards.new_zeros(n_groups).index_add_(0, group_of, centered * centered)[group_of]
    group_std = torch.sqrt(squares / (size - 1))  # unbiased, as torch.std / TRL
    return centered / (group_std + eps)


# ---------------------------------------------------------------------------------------------
# KL, importance weights
# ---------------------------------------------------------------------------------------------


def kl_estimate(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    kind: str,
    *,
    max_log_ratio: float | None = MAX_LOG_RATIO,
) -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from log-probs of tokens *sampled from pi* (unmasked).

    Schulman's estimators, with ``d = logp - ref_logp``:
    * ``"k1"``: ``d`` (unbiased, high variance, can be negative per token);
    * ``"k2"``: ``0.5 * d**2`` (biased, low variance, >= 0);
    * ``"k3"``: ``exp(-d) + d - 1`` = ``exp(ref - logp) - (ref - logp) - 1`` (unbiased, >= 0).
    k3 is computed as ``expm1(-d) + d`` (accurate for small d, where ``exp(-d) - 1`` cancels) and
    clamped at 0 against rounding; its ``exp`` argument is clamped to ``+-max_log_ratio`` (20 by
    default, ``None`` to disable) so a wildly off-policy token cannot produce inf/NaN.
    Callers mask the result (e.g. with ``masked_mean``).
    """
    if kind not in KL_KINDS:
        raise ValueError(f"unknown KL estimator {kind!r}; expected one of {', '.join(KL_KINDS)}")
    if logp.shape != ref_logp.shape:
        raise ValueError(f"logp {tuple(logp.shape)} and ref_logp {tuple(ref_logp.shape)} differ")
    log_ratio = logp - ref_logp
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio * log_ratio
    reverse = -log_ratio  # ref - logp
    if max_log_ratio is not None:
        reverse = reverse.clamp(-max_log_ratio, max_log_ratio)
    return (torch.expm1(reverse) - reverse).clamp_min(0.0)


@torch.no_grad()
def truncated_importance_weights(
    logp_old_learner: torch.Tensor,
    logp_rollout: torch.Tensor,
    mask: torch.Tensor,
    cap: float,
) -> torch.Tensor:
    """Per-token truncated importance weights ``min(pi_learner_old / pi_rollout, cap)`` ("TIS").

    The rollout engine (vLLM, possibly a stale weight version, different kernels/precision) is not
    exactly the learner's old policy, so the PPO ratio's denominator is off-distribution. veRL's
    TIS multiplies each token's policy loss by this weight (pass it as ``policy_loss(...,
    importance_weights=...)``). It is a constant: computed without gradient. Padded positions 0.
    Computed as ``exp(min(log_ratio, log(cap)))``, which equals ``min(exp(log_ratio), cap)`` but
    can never overflow.
    """
    if not cap > 0:
        raise ValueError(f"cap must be positive, got {cap}")
    valid = _valid(mask, logp_old_learner)
    _valid(mask, logp_rollout, "mask (vs logp_rollout)")
    log_ratio = _zero_padding(logp_old_learner, valid) - _zero_padding(logp_rollout, valid)
    weights = torch.exp(log_ratio.clamp(max=math.log(cap)))
    return _zero_padding(weights, valid)


# ---------------------------------------------------------------------------------------------
# losses
# ---------------------------------------------------------------------------------------------


def _unknown_aggregation(aggregation: str) -> ValueError:
    return ValueError(
        f"unknown aggregation {aggregation!r}; expected one of {', '.join(AGGREGATIONS)}"
    )


def aggregate_loss(loss_mat: torch.Tensor, mask: torch.Tensor, aggregation: str) -> torch.Tensor:
    """Reduce per-token losses [B, T] to a scalar, over valid tokens only.

    * ``"token-mean"``: sum over all valid tokens / number of valid tokens (every token weighs the
      same; long answers weigh more; DAPO).
    * ``"seq-mean-token-mean"``: mean over each sequence's valid tokens, then mean over sequences
      (every answer weighs the same; original GRPO).
    * ``"seq-mean-token-sum"``: sum over each sequence's valid tokens, then mean over sequences
      (Dr. GRPO-like, no length normalisation).
    Sequences with no valid token are not sequences: both ``seq-mean-*`` modes average over rows
    with >= 1 valid token only, so an all-padding row changes nothing. No valid token at all -> 0.
    Note: the means are over *this call's* tensor; with gradient accumulation over micro-batches
    or data-parallel ranks, a global token-mean needs the caller to rescale.
    """
    valid = _valid(mask, loss_mat)
    if aggregation == "token-mean":
        return masked_mean(loss_mat, valid)
    if aggregation in ("seq-mean-token-mean", "seq-mean-token-sum"):
        if aggregation == "seq-mean-token-mean":
            per_sequence = masked_mean(loss_mat, valid, dim=-1)
        else:
            per_sequence = masked_sum(loss_mat, valid, dim=-1)
        has_tokens = valid.any(dim=-1)
        return masked_mean(per_sequence, has_tokens)
    raise _unknown_aggregation(aggregation)


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None = None,
    aggregation: str = "token-mean",
    *,
    importance_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate loss, with asymmetric ("clip-higher", DAPO) and dual clipping.

    Per token, with ``ratio = exp(logp - old_logp)``:
        unclipped = -A * ratio
        clipped   = -A * clip(ratio, 1 - clip_low, 1 + clip_high)
        loss      = max(unclipped, clipped)          (= -min(ratio*A, clip(ratio)*A))
    Dual clip (veRL, ``dual_clip = c > 1``): for A < 0 the loss is further capped at ``-c * A``,
    so a token whose ratio exploded cannot dominate the batch with an unbounded negative-advantage
    term. ``importance_weights`` (e.g. TIS weights, constants) multiply the per-token loss.

    ``advantages`` are per token [B, T] (broadcast a sequence advantage with ``adv[:, None]``
    yourself and pass a full-shape tensor). The log-ratio is clamped to +-20 before ``exp``.

    Returns ``(loss, stats)``; stats are detached scalars over valid tokens:
    * ``clip_fraction``: fraction of tokens where the clipped branch is strictly larger (active);
    * ``dual_clip_fraction``: fraction where the dual clip is active (0 when disabled);
    * ``approx_kl``: the k3 estimate of KL(pi_old || pi_theta), ``mean((ratio - 1) - log ratio)``
      (CleanRL's, samples are from pi_old); always >= 0;
    * ``ratio_mean``, ``ratio_max``.
    """
    if clip_low < 0 or clip_high < 0:
        raise ValueError(f"clip_low and clip_high must be >= 0, got {clip_low}, {clip_high}")
    if clip_low >= 1:
        raise ValueError(f"clip_low must be < 1 (so that 1 - clip_low > 0), got {clip_low}")
    if dual_clip is not None and not dual_clip > 1.0:
        raise ValueError(f"dual_clip must be > 1 (or None), got {dual_clip}")
    if aggregation not in AGGREGATIONS:
        raise _unknown_aggregation(aggregation)
    valid = _valid(mask, logp)
    _valid(mask, old_logp, "mask (vs old_logp)")
    _valid(mask, advantages, "mask (vs advantages)")

    # Zero the padding first, so ratio = exp(0) = 1 and A = 0 there: finite values, zero gradient.
    logp = _zero_padding(logp, valid)
    old_logp = _zero_padding(old_logp.detach(), valid)
    advantages = _zero_padding(advantages.detach(), valid)

    log_ratio = (logp - old_logp).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    ratio = torch.exp(log_ratio)
    clipped_ratio = ratio.clamp(1.0 - clip_low, 1.0 + clip_high)

    unclipped_loss = -advantages * ratio
    clipped_loss = -advantages * clipped_ratio
    # The pessimistic (larger-loss) branch: PPO never lets the ratio move further than the clip
    # range in the direction the advantage pushes it.
    per_token = torch.maximum(unclipped_loss, clipped_loss)
    clip_active = clipped_loss > unclipped_loss

    if dual_clip is not None:
        # Negative advantages only: there the unclipped branch -A*ratio grows without bound.
        dual_cap = -dual_clip * advantages
        dual_active = (advantages < 0) & (per_token > dual_cap)
        per_token = torch.where(dual_active, dual_cap, per_token)
    else:
        dual_active = torch.zeros_like(clip_active)

    if importance_weights is not None:
        _valid(mask, importance_weights, "mask (vs importance_weights)")
        per_token = per_token * _zero_padding(importance_weights.detach(), valid)

    loss = aggregate_loss(per_token, valid, aggregation)

    with torch.no_grad():
        as_float = ratio.dtype
        stats = {
            "clip_fraction": masked_mean(clip_active.to(as_float), valid),
            "dual_clip_fraction": masked_mean(dual_active.to(as_float), valid),
            # k3 of KL(old || new) from samples of old: (r - 1) - log r, r = pi_new / pi_old.
            "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, valid),
            "ratio_mean": masked_mean(ratio, valid),
            # ratio > 0, so filling padding with 0 leaves the max over valid tokens (0 if none).
            "ratio_max": (
                torch.where(valid, ratio, 0.0).amax() if ratio.numel() else ratio.new_zeros(())
            ),
        }
    stats = {key: value.detach() for key, value in stats.items()}
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped value loss, token-mean over valid tokens.

        loss_t = 0.5 * max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2)
    (pessimistic, as the policy loss: the value may not move further than ``c`` from the rollout's
    value to reduce its error). ``clip=None`` gives plain ``0.5 * (V - R)^2``.
    stats: ``value_clip_fraction`` (fraction of valid tokens where the clipped term is strictly
    larger, i.e. active; 0 when unclipped).
    """
    if clip is not None and not clip > 0:
        raise ValueError(f"value clip must be positive or None, got {clip}")
    valid = _valid(mask, values)
    _valid(mask, old_values, "mask (vs old_values)")
    _valid(mask, returns, "mask (vs returns)")
    values = _zero_padding(values, valid)
    old_values = _zero_padding(old_values.detach(), valid)
    returns = _zero_padding(returns.detach(), valid)

    unclipped = (values - returns) ** 2
    if clip is None:
        per_token = 0.5 * unclipped
        clip_active = torch.zeros_like(valid)
    else:
        values_clipped = old_values + (values - old_values).clamp(-clip, clip)
        clipped = (values_clipped - returns) ** 2
        per_token = 0.5 * torch.maximum(unclipped, clipped)
        clip_active = clipped > unclipped
    loss = masked_mean(per_token, valid)
    stats = {"value_clip_fraction": masked_mean(clip_active.to(values.dtype), valid).detach()}
    return loss, stats


def explained_variance(
    values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """``1 - Var(R - V) / Var(R)`` over valid tokens (diagnostic of the critic; detached).

    1 = perfect critic, 0 = no better than a constant, < 0 = worse. NaN when Var(R) is 0 (including
    a single valid token) or there is no valid token, as in CleanRL / SB3: undefined, not 0.
    """
    valid = _valid(mask, values)
    _valid(mask, returns, "mask (vs returns)")
    values, returns = values.detach(), returns.detach()
    if not bool(valid.any()):
        return values.new_full((), float("nan"))
    # Biased variances: the n vs n-1 factor cancels in the ratio.
    var_returns = masked_var(returns, valid, unbiased=False)
    var_residual = masked_var(returns - values, valid, unbiased=False)
    if float(var_returns) == 0.0:
        return values.new_full((), float("nan"))
    return 1.0 - var_residual / var_returns


# ---------------------------------------------------------------------------------------------
# logits -> log-probs, entropy
# ---------------------------------------------------------------------------------------------


def _over_rows(fn, logits: torch.Tensor, *row_args: torch.Tensor) -> torch.Tensor:
    """Apply ``fn(rows_of_logits, *rows_of_args)`` to flattened rows, upcasting bf16/fp16 to fp32
    one chunk of rows at a time so the float32 copy of the full [N, vocab] matrix never exists
    at once (under no_grad; with grad, autograd keeps what backward needs)."""
    vocab = logits.shape[-1]
    flat = logits.reshape(-1, vocab)
    flat_args = [arg.reshape(-1) for arg in row_args]
    if flat.dtype not in _LOW_PRECISION:
        return fn(flat, *flat_args).reshape(logits.shape[:-1])
    pieces = [
        fn(flat[start : start + _UPCAST_CHUNK_ROWS].float(),
           *(arg[start : start + _UPCAST_CHUNK_ROWS] for arg in flat_args))
        for start in range(0, flat.shape[0], _UPCAST_CHUNK_ROWS)
    ]
    if not pieces:
        return flat.new_zeros(logits.shape[:-1], dtype=torch.float32)
    return torch.cat(pieces).reshape(logits.shape[:-1])


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(
            f"temperature must be > 0, got {temperature}: temperature 0 is greedy decoding, which "
            "has no sampling distribution to score"
        )


def _logprobs_rows(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    if temperature != 1.0:  # after the float32 upcast, as vLLM divides its float32 logits
        logits = logits / temperature
    # log_softmax(z)[y] = z[y] - logsumexp(z): gather one logit per row and subtract the row's
    # logsumexp, so the [N, vocab] log_softmax matrix is never built.
    picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def _entropy_rows(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    if temperature != 1.0:
        logits = logits / temperature
    # H = -sum p log p with log p = z - logsumexp(z)  =>  H = logsumexp(z) - sum p z.
    # Needs only softmax(z) (stable: max-subtracted) and one product, no log of tiny p.
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)


def logprobs_from_logits(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """``log_softmax(logits / temperature)[..., labels]`` for logits [..., vocab] and int labels [...].

    ``temperature`` is the sampler's: the rollout samples from ``softmax(logits / T)``, so the PPO
    ratio and the importance weights must use that distribution's log-probabilities, not the raw
    logits' (T must be > 0; T = 1 is the raw distribution). Computed as
    ``z[label] - logsumexp(z)`` (no log_softmax matrix); bf16/fp16 logits are upcast to float32 in
    row chunks before the division, and the result is float32. Labels must be valid token ids
    everywhere, padding included (mask the result afterwards).
    """
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"labels has shape {tuple(labels.shape)}, expected {tuple(logits.shape[:-1])}"
        )
    _check_temperature(temperature)
    return _over_rows(partial(_logprobs_rows, temperature=temperature), logits, labels.long())


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of ``softmax(logits / temperature)`` over the last dim, [..., vocab] -> [...].

    Stable (logsumexp based, no overflow); bf16/fp16 upcast to float32 in row chunks. Absolute
    error is ~ float eps * max|logit| / T (logits are not re-centred, to save a [N, vocab]
    temporary; fine for model logits of magnitude < ~100). Logits must be finite (a model's raw
    output is): ``-inf`` vocabulary masking is not supported here.
    """
    _check_temperature(temperature)
    return _over_rows(partial(_entropy_rows, temperature=temperature), logits)

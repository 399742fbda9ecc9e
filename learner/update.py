"""One PPO/GRPO update, as plain functions (no Ray, no DeepSpeed): the plan, the advantages, the
per-micro-batch loss, the learning-rate schedule and the metrics.

The update of a batch of N experiences, step by step:

1. `validate_batch`: refuse an empty batch, empty responses, non-finite rewards, up front.
2. `make_plan`: for every PPO epoch a seeded shuffle, cut into minibatches (one optimizer step
   each), each minibatch cut into equal per-rank shards (data parallel), each shard into
   micro-batches (gradient accumulation).
3. Scoring (the ranks, before any weight changes): old logprobs, reference logprobs and values of
   every experience, computed on EXACTLY the micro-batches of epoch 0. The first training
   micro-batch then runs the identical computation on identical tensors, so its importance ratio
   is exactly 1 - a bug check, not an approximation. When the update is one optimizer step and
   nothing before training needs the scores (`needs_scoring_pass`), this pass is skipped: every
   training forward then runs on the unchanged weights, so its own logprobs, detached, ARE the old
   logprobs (`on_policy_targets`), and the gradient is the same as with the pass.
4. `compute_advantages` (the driver, on the whole batch): GAE over token rewards (with the KL
   penalty in the reward, if so configured), or group baselines (GRPO/RLOO) broadcast to tokens,
   and the truncated importance weights against the rollout logprobs; statistics such as
   whitening see the whole batch, not one rank's shard.
5. Training (the ranks): `micro_batch_loss` per micro-batch, backward, one optimizer step per
   minibatch. Each micro-batch loss is weighted by its share of the minibatch (tokens or
   sequences), times the number of ranks, because DeepSpeed averages gradients over ranks: the
   summed gradient is then exactly the gradient of the minibatch's global mean, whatever the
   micro-batch and rank split.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from learner import ppo
from learner.config import AlgorithmConfig
from learner.types import Experience

# ---------------------------------------------------------------------------------------------
# input checks


def validate_batch(experiences: Sequence[Experience]) -> None:
    """Refuse input that cannot be trained on, with a message naming the samples."""
    if not experiences:
        raise ValueError("learner: refusing an empty batch (every rollout was skipped or filtered?)")
    ids = [e.sample_id for e in experiences]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(f"learner: duplicate sample ids in the batch: {dup[:10]}")
    empty = [e.sample_id for e in experiences if not e.response_ids]
    if empty:
        raise ValueError(f"learner: refusing responses with no token (all-masked): {empty[:10]}"
                         f"{' ...' if len(empty) > 10 else ''}")
    bad = [f"{e.sample_id}={e.reward}" for e in experiences if not math.isfinite(e.reward)]
    if bad:
        raise ValueError(f"learner: non-finite rewards: {bad[:10]}")


def check_sampling_temperature(temperature: float) -> None:
    """The learner scores softmax(logits / T): refuse a T that names no sampling distribution."""
    if not temperature > 0:
        raise ValueError(
            f"learner: sampling temperature {temperature} (rollout.sampling.temperature) must be > 0 to train on: "
            "temperature 0 is greedy decoding, for evaluation only (rollout.eval_sampling)")


# ---------------------------------------------------------------------------------------------
# the plan: epochs -> minibatches -> ranks -> micro-batches


@dataclass(frozen=True)
class MicroBatch:
    """Experience indices of one forward/backward. A `ghost` row is a copy of another experience
    that only keeps the ranks in step (every rank must run the same number and order of
    collectives): it is computed, then masked out of the loss and ignored by scoring."""

    indices: tuple[int, ...]
    ghost: tuple[bool, ...]

    @property
    def real(self) -> list[int]:
        return [i for i, g in zip(self.indices, self.ghost) if not g]


@dataclass
class Minibatch:
    """One optimizer step: `shards[rank]` is that rank's list of micro-batches."""

    shards: list[list[MicroBatch]]
    num_sequences: int  # real sequences over all ranks
    num_tokens: int  # real response tokens over all ranks


@dataclass
class UpdatePlan:
    epochs: list[list[Minibatch]]

    def scoring_micro_batches(self, rank: int) -> list[MicroBatch]:
        """Rank `rank`'s micro-batches of epoch 0, in training order (where old logprobs are computed)."""
        return [mb for minibatch in self.epochs[0] for mb in minibatch.shards[rank]]

    def rank_schedule(self, rank: int) -> list[list[tuple[list[MicroBatch], int, int]]]:
        """epochs -> minibatches -> (this rank's micro-batches, minibatch sequences, minibatch tokens)."""
        return [[(m.shards[rank], m.num_sequences, m.num_tokens) for m in epoch] for epoch in self.epochs]

    @property
    def num_optimizer_steps(self) -> int:
        return sum(len(e) for e in self.epochs)


def make_plan(response_lengths: Sequence[int], num_ranks: int, minibatch_size: int, micro_batch_size: int,
              epochs: int, seed: int | Sequence[int], group_ids: Sequence[int] | None = None) -> UpdatePlan:
    """For each epoch, a seeded shuffle cut into minibatches of `minibatch_size` (the last may be
    smaller), each cut into `num_ranks` distinct shards of equal size, each cut into micro-batches
    of at most `micro_batch_size`. With `group_ids`, each minibatch is ordered by group before it
    is cut (its content is the shuffle's): the answers of one prompt then share micro-batches,
    where they share the prompt's forward (learner.share_prompts).

    A minibatch whose size is not a multiple of `num_ranks` (the last one, or any when rollouts
    were skipped) is padded with ghost rows (see MicroBatch) so every rank runs the same number of
    equally long micro-batches; no experience is dropped.
    """
    n = len(response_lengths)
    if n == 0:
        raise ValueError("make_plan: empty batch")
    if minibatch_size % num_ranks:
        raise ValueError(f"algorithm.minibatch_size={minibatch_size} must be divisible by learner.num_ranks={num_ranks}")
    rng = np.random.default_rng(seed)
    plan = UpdatePlan(epochs=[])
    for _ in range(epochs):
        order = rng.permutation(n).tolist()
        minibatches = []
        for start in range(0, n, minibatch_size):
            chunk = order[start:start + minibatch_size]
            if group_ids is not None:
                chunk.sort(key=lambda i: group_ids[i])
            per_rank = -(-len(chunk) // num_ranks)
            shards = []
            for r in range(num_ranks):
                real = chunk[r * per_rank:(r + 1) * per_rank]
                # ghosts copy the chunk's first experiences (any real index would do: masked out)
                rows = [(i, False) for i in real] + [(chunk[k % len(chunk)], True) for k in range(per_rank - len(real))]
                shards.append([MicroBatch(tuple(i for i, _ in rows[j:j + micro_batch_size]),
                                          tuple(g for _, g in rows[j:j + micro_batch_size]))
                               for j in range(0, per_rank, micro_batch_size)])
            minibatches.append(Minibatch(shards, len(chunk), int(sum(response_lengths[i] for i in chunk))))
        plan.epochs.append(minibatches)
    return plan


# ---------------------------------------------------------------------------------------------
# scores (ranks) -> advantages (driver)


@dataclass
class Scores:
    """What the ranks compute before the update, per experience (index = batch position)."""

    old_logprobs: list[torch.Tensor]  # [T_i] under the current policy, eval mode
    ref_logprobs: list[torch.Tensor] | None  # [T_i] under the reference, None when not needed
    values: list[torch.Tensor] | None  # [T_i] from the critic, None without one


def needs_scoring_pass(algo: AlgorithmConfig, plan: UpdatePlan, lora_dropout: float = 0.0) -> bool:
    """Whether old logprobs must be computed before training. Not when the update is exactly
    on-policy - one epoch of one minibatch, so every training forward sees the weights the
    scores would have seen - and nothing computed before training needs them: no critic (GAE),
    no KL in the reward. Dropout would make the training forward differ from the eval-mode scoring
    one, so it keeps the pass."""
    kl_in_reward = algo.kl_in == "reward" and algo.kl_coef > 0
    return plan.num_optimizer_steps > 1 or algo.advantage == "gae" or kl_in_reward or lora_dropout > 0


def on_policy_targets(logprobs: torch.Tensor, rollout_logprobs: Sequence[Sequence[float]], mask: torch.Tensor,
                      algo: AlgorithmConfig) -> tuple[dict[str, torch.Tensor | None], dict[str, float]]:
    """Without a scoring pass (see `needs_scoring_pass`): the old logprobs of a micro-batch are its
    training forward's own, detached, and the TIS weights are taken against them as
    `compute_advantages` would. Also the rollout-vs-learner mismatch of these rows
    (`logprob_mismatch_max`, `_mean`), which the scoring pass would have measured."""
    old = logprobs.detach().float()
    rollout = torch.zeros_like(old)
    for row, lps in enumerate(rollout_logprobs):
        n = min(len(lps), old.shape[1])
        rollout[row, :n] = torch.tensor(lps[:n], dtype=torch.float32)
    delta = torch.where(mask, (rollout - old).abs(), 0.0)
    tokens = max(int(mask.sum()), 1)
    stats = {"logprob_mismatch_max": float(delta.max()), "logprob_mismatch_mean": float(delta.sum()) / tokens}
    tis = None
    if algo.tis_cap is not None:
        tis = ppo.truncated_importance_weights(old, rollout, mask, algo.tis_cap)
        stats["tis_weight_mean"] = float(ppo.masked_mean(tis, mask))
    return {"old_logprobs": old, "importance_weights": tis}, stats


@dataclass
class Targets:
    """Per-experience training targets; the ranks pad them per micro-batch."""

    advantages: list[torch.Tensor]  # [T_i]
    returns: list[torch.Tensor] | None  # [T_i], GAE only
    old_logprobs: list[torch.Tensor] | None  # None: no scoring pass, the ranks take their own (on_policy_targets)
    ref_logprobs: list[torch.Tensor] | None
    old_values: list[torch.Tensor] | None
    importance_weights: list[torch.Tensor] | None  # TIS weights, None when algorithm.tis_cap is None


def pad_right(rows: Sequence[torch.Tensor], value: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """[T_i] tensors -> ([N, T_max] padded, [N, T_max] bool mask)."""
    length = max(len(r) for r in rows)
    out = torch.full((len(rows), length), value, dtype=torch.float32)
    mask = torch.zeros((len(rows), length), dtype=torch.bool)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r.float()
        mask[i, :len(r)] = True
    return out, mask


def unpad(x: torch.Tensor, lengths: Sequence[int]) -> list[torch.Tensor]:
    return [x[i, :n].clone() for i, n in enumerate(lengths)]


def compute_advantages(experiences: Sequence[Experience], scores: Scores | None,
                       algo: AlgorithmConfig) -> tuple[Targets, dict[str, float]]:
    """Advantages (and returns) for the whole batch, as `algorithm.advantage` says.

    * gae: token rewards = sequence reward on the last token, minus kl_coef * KL(old || ref) per
      token when `kl_in == "reward"`; GAE(gamma, lam) with the critic's values; optional whitening.
    * grpo / rloo: group baselines over answers to the same question (grpo divides by the group
      std when `scale_by_std`); with `kl_in == "reward"` each answer then pays kl_coef * its summed
      KL, after the normalisation, so the group's std does not rescale the penalty:
          advantage = group_advantage(rewards) - kl_coef * sum_t KL_t
      Broadcast to every token of the answer.
    With `tis_cap` set, the TIS weights min(pi_old_learner / pi_rollout, tis_cap) are added.
    `scores` None (no scoring pass, grpo/rloo without KL in the reward): the old logprobs and the
    TIS weights are left to the ranks (`on_policy_targets`).
    """
    lengths = [len(e.response_ids) for e in experiences]
    if scores is None:
        if algo.advantage == "gae" or (algo.kl_in == "reward" and algo.kl_coef > 0):
            raise ValueError("compute_advantages: GAE and a KL penalty in the reward need the scoring pass")
        scores = Scores(old_logprobs=[torch.zeros(n) for n in lengths], ref_logprobs=None, values=None)
        targets, stats = compute_advantages(experiences, scores, algo.model_copy(update={"tis_cap": None}))
        targets.old_logprobs = None
        return targets, stats
    old, mask = pad_right(scores.old_logprobs)
    rewards = torch.tensor([e.reward for e in experiences], dtype=torch.float32)
    kl_in_reward = algo.kl_in == "reward" and algo.kl_coef > 0
    kl = None
    if scores.ref_logprobs is not None:
        ref, _ = pad_right(scores.ref_logprobs)
        kl = torch.where(mask, ppo.kl_estimate(old, ref, algo.kl_estimator), 0.0)
    if kl_in_reward and kl is None:
        raise ValueError("algorithm.kl_in='reward' with kl_coef > 0 needs reference logprobs")
    stats: dict[str, float] = {}

    returns = None
    if algo.advantage == "gae":
        if scores.values is None:
            raise ValueError("algorithm.advantage='gae' needs values: learner.value_model must be 'head' or 'separate'")
        values, _ = pad_right(scores.values)
        token_r = ppo.token_rewards(rewards, mask, kl if kl_in_reward else None, algo.kl_coef if kl_in_reward else 0.0)
        advantages, returns_t = ppo.compute_gae(token_r, values, mask, algo.gamma, algo.lam)
        if algo.whiten_advantages and int(mask.sum()) >= 2:
            advantages = ppo.masked_whiten(advantages, mask)
        returns = unpad(returns_t, lengths)
        stats["returns_mean"] = float(ppo.masked_mean(returns_t, mask))
        stats["values_mean"] = float(ppo.masked_mean(values, mask))
    else:
        group_ids = [e.group_id for e in experiences]
        seq_adv = ppo.group_advantages(rewards, group_ids, kind=algo.advantage, scale_by_std=algo.scale_by_std)
        if kl_in_reward:
            seq_adv = seq_adv - algo.kl_coef * ppo.masked_sum(kl, mask, dim=-1)
        advantages = torch.where(mask, seq_adv[:, None].expand_as(mask), 0.0)

    tis = None
    if algo.tis_cap is not None:
        rollout, _ = pad_right([torch.tensor(e.rollout_logprobs) for e in experiences])
        tis_t = ppo.truncated_importance_weights(old, rollout, mask, algo.tis_cap)
        tis = unpad(tis_t, lengths)
        stats["tis_weight_mean"] = float(ppo.masked_mean(tis_t, mask))

    stats["advantage_mean"] = float(ppo.masked_mean(advantages, mask))
    stats["advantage_abs_max"] = float(torch.where(mask, advantages.abs(), 0.0).max())
    if kl is not None:
        stats["kl_to_ref"] = float(ppo.masked_mean(kl, mask))
    targets = Targets(advantages=unpad(advantages, lengths), returns=returns, old_logprobs=list(scores.old_logprobs),
                      ref_logprobs=scores.ref_logprobs, old_values=scores.values, importance_weights=tis)
    return targets, stats


def logprob_mismatch(experiences: Sequence[Experience], old_logprobs: Sequence[torch.Tensor]) -> dict[str, float]:
    """max and mean |rollout logprob - learner old logprob| over all response tokens (headline
    metric: how far the policy vLLM sampled from is from the one the learner trains)."""
    deltas = torch.cat([(torch.tensor(e.rollout_logprobs, dtype=torch.float32) - lp.float()).abs()
                        for e, lp in zip(experiences, old_logprobs)])
    return {"logprob_mismatch_max": float(deltas.max()), "logprob_mismatch_mean": float(deltas.mean())}


# ---------------------------------------------------------------------------------------------
# the loss of one micro-batch (on a rank)


def gather_targets(targets: Targets, indices: Sequence[int]) -> dict[str, torch.Tensor | None]:
    """Targets of the experiences `indices` (ghosts included), right-padded to a micro-batch [B, T]."""
    def pick(rows):
        return None if rows is None else pad_right([rows[i] for i in indices])[0]
    return {"advantages": pick(targets.advantages), "returns": pick(targets.returns),
            "old_logprobs": pick(targets.old_logprobs), "ref_logprobs": pick(targets.ref_logprobs),
            "old_values": pick(targets.old_values), "importance_weights": pick(targets.importance_weights)}


def micro_batch_loss(logprobs: torch.Tensor, entropy: torch.Tensor | None, values: torch.Tensor | None,
                     mask: torch.Tensor, target: dict, algo: AlgorithmConfig,
                     share: float) -> tuple[torch.Tensor, dict[str, float]]:
    """The PPO objective of one micro-batch, scaled by `share` (its weight in the minibatch mean,
    see the module doc). Returns (scaled loss for backward, unscaled stats of this micro-batch).

        loss = policy_loss (clipped surrogate, optional TIS weights)
             + value_loss_coef * value_loss            (when there is a critic and returns)
             + kl_coef * KL(pi || ref)                 (when kl_in == "loss")
             - entropy_coef * entropy

    `entropy` (the exact full-vocabulary entropy per token) is needed only when entropy_coef > 0;
    without it the stats carry `entropy_estimate`, the aggregated -logprob of the sampled tokens:
    its expectation over on-policy samples is the entropy, at no cost over the vocabulary.
    """
    device = logprobs.device
    t = {k: (v.to(device) if v is not None else None) for k, v in target.items()}
    aggregation = algo.loss_aggregation
    pg_loss, pg_stats = ppo.policy_loss(
        logprobs, t["old_logprobs"], t["advantages"], mask, algo.clip_low, algo.clip_high, algo.dual_clip,
        aggregation, importance_weights=t["importance_weights"])
    loss = pg_loss
    stats = {"policy_loss": pg_loss.detach(), **pg_stats}

    if values is not None and t["returns"] is not None:
        v_loss, v_stats = ppo.value_loss(values, t["old_values"], t["returns"], mask, algo.value_clip)
        loss = loss + algo.value_loss_coef * v_loss
        stats.update(value_loss=v_loss.detach(), **v_stats)
    if t["ref_logprobs"] is not None:
        kl = ppo.kl_estimate(logprobs, t["ref_logprobs"], algo.kl_estimator)
        kl_term = ppo.aggregate_loss(kl, mask, aggregation)
        stats["kl_to_ref"] = kl_term.detach()
        if algo.kl_in == "loss" and algo.kl_coef > 0:
            loss = loss + algo.kl_coef * kl_term
    if entropy is not None:
        entropy_term = ppo.aggregate_loss(entropy, mask, aggregation)
        stats["entropy"] = entropy_term.detach()
        if algo.entropy_coef > 0:
            loss = loss - algo.entropy_coef * entropy_term
    elif algo.entropy_coef > 0:
        raise ValueError("algorithm.entropy_coef > 0 needs the exact entropy of the training forward")
    else:
        stats["entropy_estimate"] = ppo.aggregate_loss(-logprobs.detach(), mask, aggregation)
    stats["loss"] = loss.detach()
    return loss * share, {k: float(v) for k, v in stats.items()}


def micro_batch_share(aggregation: str, mask: torch.Tensor, minibatch_sequences: int, minibatch_tokens: int,
                      num_ranks: int) -> float:
    """Weight of a micro-batch's mean loss in its minibatch's global mean, times num_ranks (DeepSpeed
    divides the summed gradient by the number of ranks)."""
    if aggregation == "token-mean":
        return num_ranks * int(mask.sum()) / minibatch_tokens
    return num_ranks * int(mask.any(dim=-1).sum()) / minibatch_sequences


# ---------------------------------------------------------------------------------------------
# learning rate, metrics


def lr_multiplier(step: int, schedule: str, warmup_steps: int, decay_steps: int, min_ratio: float = 0.0) -> float:
    """Multiplier of the base LR at optimizer step `step` (0-based): linear warmup from 0 over
    `warmup_steps`, then constant, or linear/cosine decay to `min_ratio` over `decay_steps`."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, decay_steps))
    if schedule == "linear":
        return min_ratio + (1.0 - min_ratio) * (1.0 - progress)
    if schedule == "cosine":
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown learner.lr_schedule {schedule!r}")


# Stats averaged over micro-batches weighted by their valid tokens; the rest are summed or maxed.
_MAX_STATS = ("ratio_max", "logprob_mismatch_max")


def combine_micro_stats(micro_stats: Sequence[dict[str, float]]) -> dict[str, float]:
    """Token-weighted means of micro-batch stats (each carries its own 'tokens' count)."""
    total = sum(s["tokens"] for s in micro_stats)
    out: dict[str, float] = {"tokens": float(total)}
    keys = sorted({k for s in micro_stats for k in s} - {"tokens"})
    for k in keys:
        present = [s for s in micro_stats if k in s]
        if k in _MAX_STATS:
            out[k] = max(s[k] for s in present)
        else:
            weight = sum(s["tokens"] for s in present)
            out[k] = sum(s[k] * s["tokens"] for s in present) / max(weight, 1)
    return out

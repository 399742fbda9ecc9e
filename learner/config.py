"""The `learner` (DeepSpeed ranks, model, LoRA, optimizer) and `algorithm` (PPO/GRPO) sections."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from common.schema import Section


class LoraConfig(Section):
    enabled: bool = True
    r: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0.0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class LearnerConfig(Section):
    # "tiny" or "tiny-<family>" (built locally, docvqa.tiny_models), a local path, or a hub id such as
    # Qwen/Qwen2-VL-2B-Instruct or Qwen/Qwen2.5-VL-3B-Instruct (the families of common.policy_family)
    policy: str = "tiny"
    num_ranks: int = Field(1, ge=1)
    num_gpus_per_rank: float = Field(0.0, ge=0.0)
    num_cpus_per_rank: float = Field(1.0, gt=0.0)
    zero_stage: Literal[2, 3] = 2
    # ZeRO-3: partition every parameter however small, without prefetch (tests: the tiny models'
    # parameters are all below DeepSpeed's persistence threshold and would stay whole); real runs
    # keep DeepSpeed's defaults
    zero3_partition_all: bool = False
    dtype: Literal["float32", "bfloat16"] = "float32"
    lora: LoraConfig = LoraConfig()
    freeze_vision_tower: bool = True
    # the critic for algorithm.advantage="gae"; grpo/rloo need none, so none is built for them
    value_model: Literal["head", "separate", "none"] = "head"
    learning_rate: float = Field(1e-5, gt=0.0)
    value_learning_rate: float = Field(1e-5, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)  # optimizer steps of linear warmup from 0
    # optimizer steps over which "linear"/"cosine" decay (after warmup) to min_lr_ratio * lr; the
    # driver sets it from trainer.total_steps x optimizer steps per training step
    lr_decay_steps: int = Field(1000, ge=1)
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0)
    max_grad_norm: float = Field(1.0, gt=0.0)
    micro_batch_size: int = Field(4, ge=1)
    gradient_checkpointing: bool = False
    # answers to the same prompt share one input row (the prompt and its image run once, see
    # learner/model.py); the micro-batches keep each group's answers together
    share_prompts: bool = True
    collective_timeout_s: float = Field(600.0, gt=0.0)
    keep_exports: int = Field(3, ge=1)  # LoRA adapter versions kept on disk (a restarted rollout worker reloads the latest)
    # With algorithm.kl_coef 0 the reference feeds only the `kl_to_ref` metric: true still computes
    # it (one more forward per experience, and a frozen copy with full fine-tuning)
    log_kl_to_ref: bool = False

    @model_validator(mode="after")
    def _lora_cannot_train_the_vision_tower(self) -> LearnerConfig:
        if self.lora.enabled and not self.freeze_vision_tower:
            raise ValueError(
                "learner.freeze_vision_tower=false needs full fine-tuning (learner.lora.enabled=false): LoRA "
                "adapts the language model only, and the exported adapter carries no vision weights"
            )
        return self


class AlgorithmConfig(Section):
    advantage: Literal["gae", "grpo", "rloo"] = "grpo"
    gamma: float = Field(1.0, ge=0.0, le=1.0)
    lam: float = Field(0.95, ge=0.0, le=1.0)
    ppo_epochs: int = Field(1, ge=1)
    minibatch_size: int = Field(16, ge=1)  # sequences per optimizer step, over all ranks
    clip_low: float = Field(0.2, gt=0.0, lt=1.0)
    clip_high: float = Field(0.2, gt=0.0)
    dual_clip: float | None = Field(None, gt=1.0)
    value_clip: float | None = Field(0.2, gt=0.0)
    value_loss_coef: float = Field(0.5, ge=0.0)  # weight of the value loss next to the policy loss
    loss_aggregation: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"] = "token-mean"
    kl_coef: float = Field(0.01, ge=0.0)
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    # "reward" under grpo/rloo: the sequence's summed KL is subtracted AFTER the group baseline, so
    # the group's reward std does not rescale the penalty (a group of near-equal rewards would blow it up)
    kl_in: Literal["reward", "loss"] = "loss"
    # 0: the training forward skips the full-vocabulary entropy and logs `entropy_estimate` instead
    entropy_coef: float = Field(0.0, ge=0.0)
    whiten_advantages: bool = True  # GAE only: group advantages (grpo/rloo) are normalised within their group
    # grpo: divide by the group's reward std; false = Dr. GRPO (subtract the group mean only), which
    # does not up-weight prompts whose answers score nearly alike
    scale_by_std: bool = True
    # truncated importance sampling against the rollout logprobs, in sync and async mode alike: the
    # rollout (vLLM kernels, bf16, a stale version in async mode) is never exactly the learner's old
    # policy. None disables it.
    tis_cap: float | None = Field(2.0, gt=0.0)


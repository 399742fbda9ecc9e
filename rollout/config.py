"""The `rollout` config section: vLLM workers, sampling, and the prompt they are given."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from common.schema import Section

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant that answers questions about document pages."
DEFAULT_INSTRUCTION = "Answer the question using a single word or phrase from the page."


class SamplingConfig(Section):
    n: int = Field(4, ge=1)  # answers sampled per question (the GRPO/RLOO group size)
    temperature: float = Field(1.0, ge=0.0, le=2.0)  # vLLM samples at most at 2
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(16, ge=1)
    stop: list[str] = []
    seed: int | None = 0

    @model_validator(mode="after")
    def _greedy_needs_one(self) -> SamplingConfig:
        if self.temperature == 0.0 and self.n > 1:
            raise ValueError(f"rollout.sampling.n={self.n} needs temperature > 0: greedy decoding gives n identical answers")
        return self


class RolloutConfig(Section):
    num_workers: int = Field(1, ge=1)
    # GPUs of one worker in all, its tensor-parallel shards included (>= tensor_parallel_size)
    num_gpus_per_worker: float = Field(0.0, ge=0.0)
    num_cpus_per_worker: float = Field(1.0, gt=0.0)
    tensor_parallel_size: int = Field(1, ge=1)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    max_model_len: int = Field(2048, ge=64)
    kv_cache_gb: float = Field(1.0, gt=0.0)  # VLLM_CPU_KVCACHE_SPACE on CPU
    gpu_memory_utilization: float = Field(0.5, gt=0.0, le=1.0)
    enforce_eager: bool | None = None  # null: CUDA graphs on GPUs, eager on CPU
    max_images_per_prompt: int = Field(1, ge=1)
    max_image_pixels: int | None = Field(None, ge=28 * 28)  # larger pages are resized down
    # sequences one engine runs at once (vLLM's max_num_seqs, which it also profiles memory for);
    # null: `docrl train` sets it to a step's share per worker, ceil(prompts_per_step / num_workers) x n
    max_num_seqs: int | None = Field(None, ge=1)
    on_too_many_images: Literal["truncate", "refuse"] = "truncate"
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    instruction: str = DEFAULT_INSTRUCTION
    sampling: SamplingConfig = SamplingConfig()
    eval_sampling: SamplingConfig = SamplingConfig(n=1, temperature=0.0)
    weight_sync_timeout_s: float = Field(300.0, gt=0.0)
    generate_timeout_s: float = Field(1800.0, gt=0.0)
    # How a LoRA-trained policy reaches the workers: "adapter" pushes the adapter (small; vLLM
    # applies it per request), "merged" pushes full weights with the adapter merged in (a full
    # push per step, then plain-weight generation). "auto": merged on CPU workers, where vLLM's
    # LoRA path generated about 2.5x slower than plain weights at ~100M; the adapter on GPUs.
    lora_push: Literal["auto", "adapter", "merged"] = "auto"

    def lora_push_mode(self) -> Literal["adapter", "merged"]:
        if self.lora_push != "auto":
            return self.lora_push
        return "adapter" if self.num_gpus_per_worker > 0 else "merged"

    @model_validator(mode="after")
    def _tp_needs_gpus(self) -> RolloutConfig:
        if self.tensor_parallel_size > 1 and self.num_gpus_per_worker < self.tensor_parallel_size:
            raise ValueError(
                f"rollout.tensor_parallel_size={self.tensor_parallel_size} needs "
                f"rollout.num_gpus_per_worker >= {self.tensor_parallel_size} (got {self.num_gpus_per_worker})"
            )
        return self

    @model_validator(mode="after")
    def _training_samples_the_full_distribution(self) -> RolloutConfig:
        # The learner scores softmax(logits / temperature) over the whole vocabulary; a top-p
        # truncated sampler draws from a renormalised subset it cannot reproduce, so the PPO ratio
        # and the importance weights would be off. Evaluation and Serve (eval_sampling, requests)
        # train nothing and may truncate.
        if self.sampling.top_p < 1.0:
            raise ValueError(
                f"rollout.sampling.top_p={self.sampling.top_p} must be 1.0: the learner cannot reproduce a "
                "top-p truncated sampling distribution (rollout.eval_sampling.top_p may be < 1)"
            )
        return self

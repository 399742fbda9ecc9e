"""The GPU path, checked where it can be on CPU: what docrl asks of DeepSpeed and vLLM, the order in
which roles take a shared GPU, the device each rank computes on, and the configurations refused
before anything starts. Where a behaviour needs a GPU to happen, the test checks the call docrl
makes and its docstring names the library source that makes the call right."""

from __future__ import annotations

import pytest
import torch

from learner.config import AlgorithmConfig, LearnerConfig
from learner.worker import deepspeed_config

# ---------------------------------------------------------------------------------------------
# DeepSpeed: bf16 gradients accumulate in fp32; ZeRO keeps its own defaults in real runs


def test_bf16_config_accumulates_gradients_in_fp32_and_fp32_config_needs_nothing():
    algo = AlgorithmConfig(minibatch_size=64)
    bf16 = deepspeed_config(LearnerConfig(dtype="bfloat16", micro_batch_size=2), algo, 1)
    assert bf16["data_types"] == {"grad_accum_dtype": "fp32"}
    assert bf16["gradient_accumulation_steps"] == 32  # the 1-GPU preset's 64 sequences in micro-batches of 2
    assert "data_types" not in deepspeed_config(LearnerConfig(dtype="float32"), algo, 1)


def test_real_runs_keep_deepspeeds_zero_defaults_and_tests_can_partition_everything():
    """DeepSpeed's own defaults (deepspeed/runtime/zero/config.py: overlap_comm is None -> True for
    ZeRO-3, False otherwise; stage3_param_persistence_threshold 1e5; stage3_prefetch_bucket_size
    5e7) are what runs on GPUs; the strict settings are a test knob only."""
    algo = AlgorithmConfig()
    for stage in (2, 3):
        zero = deepspeed_config(LearnerConfig(zero_stage=stage), algo, 2)["zero_optimization"]
        assert zero == {"stage": stage, "contiguous_gradients": True}
    strict = deepspeed_config(LearnerConfig(zero_stage=3, zero3_partition_all=True), algo, 2)["zero_optimization"]
    assert strict["stage3_param_persistence_threshold"] == 0 and strict["stage3_prefetch_bucket_size"] == 0
    assert "stage3_param_persistence_threshold" not in deepspeed_config(
        LearnerConfig(zero_stage=2, zero3_partition_all=True), algo, 2)["zero_optimization"]


def _two_layer_bf16():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Tanh(), torch.nn.Linear(256, 4)).to(torch.bfloat16)


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_accumulated_bf16_gradients_equal_their_fp32_sum(zero_stage):
    """Eight bf16 micro-batches through DeepSpeed with the learner's own config give, at the
    boundary, exactly the fp32 sum of the eight bf16 gradients computed one by one. Summed in
    bf16 (no `data_types`), they are off by about 0.4% of the largest gradient."""
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    from common.ray_helpers import free_port
    from learner.worker import init_distributed

    init_distributed(0, 1, 0, "127.0.0.1", free_port(), 120)
    inputs = [torch.randn(2, 256, dtype=torch.bfloat16) * (1 + k) for k in range(8)]
    reference = _two_layer_bf16()
    fp32_sum = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in reference.named_parameters()}
    for x in inputs:
        reference.zero_grad()
        reference(x).float().pow(2).sum().backward()
        for n, p in reference.named_parameters():
            fp32_sum[n] += p.grad.float()

    cfg = LearnerConfig(dtype="bfloat16", zero_stage=zero_stage, micro_batch_size=2, zero3_partition_all=True)
    model = _two_layer_bf16()
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3),
                                      config=deepspeed_config(cfg, AlgorithmConfig(minibatch_size=16), 1),
                                      dist_init_required=False)
    for k, x in enumerate(inputs):
        engine.set_gradient_accumulation_boundary(k == len(inputs) - 1)
        engine.backward(engine(x).float().pow(2).sum(), scale_wrt_gas=False)
    for name, p in engine.module.named_parameters():
        accumulated = safe_get_full_grad(p)
        assert accumulated.dtype == torch.float32
        torch.testing.assert_close(accumulated, fp32_sum[name], rtol=0, atol=0)

"""The GPU path, checked where it can be on CPU: what docrl asks of DeepSpeed and vLLM, the order in
which roles take a shared GPU, the device each rank computes on, and the configurations refused
before anything starts. Where a behaviour needs a GPU to happen, the test checks the call docrl
makes and its docstring names the library source that makes the call right."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from learner.config import AlgorithmConfig, LearnerConfig
from cluster.config import load_config
from learner.worker import deepspeed_config

ROOT = Path(__file__).resolve().parents[1]

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


# ---------------------------------------------------------------------------------------------
# Each rank and worker computes on the GPU Ray gave it


def test_the_device_is_the_gpu_ray_gave_under_either_visibility_rule():
    """Ray narrows CUDA_VISIBLE_DEVICES to an actor's GPUs (index 0 is its own), unless
    RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES is set: then every GPU is visible and the index is
    the id Ray gave. LOCAL_RANK, which DeepSpeed uses as the CUDA index, is the same number."""
    from common.ray_helpers import gpu_device
    from learner.rank import cuda_local_rank

    assert gpu_device(1, ["3"], visible_devices_set_by_ray=True, cuda_available=True) == "cuda:0"
    assert gpu_device(1, ["3"], visible_devices_set_by_ray=False, cuda_available=True) == "cuda:3"
    assert gpu_device(0.5, ["2"], visible_devices_set_by_ray=False, cuda_available=True) == "cuda:2"
    assert gpu_device(0, [], visible_devices_set_by_ray=False, cuda_available=True) == "cpu"  # asked for none
    assert gpu_device(1, ["3"], visible_devices_set_by_ray=True, cuda_available=False) == "cpu"
    for narrowed in (True, False):
        device = gpu_device(1, ["3"], narrowed, cuda_available=True)
        assert int(device.split(":")[1]) == cuda_local_rank(0, ["3"], narrowed)


def test_a_cuda_device_other_than_local_rank_is_refused_before_deepspeed_starts():
    """DeepSpeed selects LOCAL_RANK as the CUDA device (deepspeed/comm/torch.py init_process_group
    device_id, engine `set_device`); a worker computing elsewhere would split one rank over two
    GPUs. The check runs before any CUDA call, so it is exercised here without a GPU."""
    from learner.worker import LearnerWorker

    with pytest.raises(ValueError, match="device cuda:1 differs from LOCAL_RANK 0"):
        LearnerWorker("unused", LearnerConfig(), AlgorithmConfig(), local_rank=0, device="cuda:1")


def test_vllm_sees_only_its_own_gpus_when_ray_leaves_all_visible(monkeypatch):
    """vLLM uses the first visible GPUs of its process: with Ray's NOSET variable the rollout
    worker and the Serve replica narrow CUDA_VISIBLE_DEVICES to their own GPUs themselves."""
    from rollout.config import RolloutConfig
    from rollout.engine import vllm_env

    monkeypatch.delenv("RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES", raising=False)
    assert "CUDA_VISIBLE_DEVICES" not in vllm_env(RolloutConfig(), 2, gpu_ids=["1"])
    monkeypatch.setenv("RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES", "1")
    assert vllm_env(RolloutConfig(), 2, gpu_ids=["2", "3"])["CUDA_VISIBLE_DEVICES"] == "2,3"
    assert "CUDA_VISIBLE_DEVICES" not in vllm_env(RolloutConfig(), 2, gpu_ids=[])


# ---------------------------------------------------------------------------------------------
# vLLM profiles for the pages and the sequences docrl gives it


def test_the_processor_cap_leaves_every_fitted_page_as_the_default_bound_does():
    """The image processor's resize (transformers' `smart_resize`, what vLLM's Qwen2-VL processing
    calls) with the lowered cap gives every page fitted to rollout.max_image_pixels the same size
    as with the processor's default bound, so prompt ids do not change; and the cap is far below
    the default (what vLLM profiles its image encoder for)."""
    import random

    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    from rollout.prompts import fitted_size, processor_pixel_cap

    default_max, default_min = 12845056, 3136
    rng = random.Random(0)
    for cap in (1003520, 802816, 200704, 50000):
        lowered = processor_pixel_cap(cap, default_max)
        assert cap < lowered < 1.25 * cap + 50000
        sizes = [(1000, 1300), (1300, 1000), (28, 5000), (5000, 28), (4000, 21), (2480, 3508)]
        sizes += [(rng.randint(28, 6000), rng.randint(28, 6000)) for _ in range(3000)]
        for w, h in sizes:
            if max(w, h) / min(w, h) > 190:  # the processor refuses these whatever the bound
                continue
            width, height = fitted_size(w, h, cap)
            args = dict(height=height, width=width, factor=28, min_pixels=default_min)
            assert smart_resize(**args, max_pixels=lowered) == smart_resize(**args, max_pixels=default_max), (cap, w, h)
    assert processor_pixel_cap(None, default_max) is None  # no page cap: the processor's own bound
    assert processor_pixel_cap(12845056, default_max) is None  # never above the processor's bound


def test_vllm_is_told_the_page_cap_and_the_sequences_per_step():
    from cluster.config import load_config
    from cluster.train import with_derived_max_num_seqs
    from rollout.config import RolloutConfig
    from rollout.engine import engine_args

    args = engine_args("m", RolloutConfig(max_num_seqs=64), 0, None, cuda=True, image_max_pixels=1200000)
    assert args["mm_processor_kwargs"] == {"max_pixels": 1200000} and args["max_num_seqs"] == 64
    plain = engine_args("m", RolloutConfig(), 0, None, cuda=True)
    assert "mm_processor_kwargs" not in plain and "max_num_seqs" not in plain

    cfg = with_derived_max_num_seqs(load_config(ROOT / "configs/qwen2vl-2b-1gpu.yaml"))
    assert cfg.rollout.max_num_seqs == 16 * 8  # 16 prompts x 8 answers on its one worker
    cfg = with_derived_max_num_seqs(load_config(ROOT / "configs/qwen2vl-2b-8gpu.yaml"))
    assert cfg.rollout.max_num_seqs == -(-cfg.trainer.prompts_per_step // cfg.rollout.num_workers) * cfg.rollout.sampling.n
    kept = with_derived_max_num_seqs(load_config(ROOT / "configs/tiny.yaml", ["rollout.max_num_seqs=5"]))
    assert kept.rollout.max_num_seqs == 5


VLLM_PROFILE_PROBE = r'''
import json, os, sys
os.environ.update({"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1",
                   "VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "1", "VLLM_LOGGING_LEVEL": "ERROR"})
from PIL import Image
from transformers import AutoProcessor
from vllm.multimodal import MULTIMODAL_REGISTRY
from docvqa.sample import Page
from rollout.config import RolloutConfig, SamplingConfig
from rollout.engine import RolloutEngine
from rollout.prompts import fit_image
from rollout.types import RolloutRequest

policy, page_file, cap = sys.argv[1], sys.argv[2], int(sys.argv[3])
engine = RolloutEngine(policy, RolloutConfig(max_image_pixels=cap, max_num_seqs=8, max_model_len=1024))
config = engine.llm.llm_engine.vllm_config
profiled = MULTIMODAL_REGISTRY.get_processing_info(config.model_config).get_image_size_with_most_features()
request = RolloutRequest("r", "What is the total?", (Page("d/p1", "d", 1, image_path=page_file),))
(result,) = engine.generate([request], SamplingConfig(n=1, temperature=0.0, max_tokens=4)).results
processor = AutoProcessor.from_pretrained(policy)
learner_ids = processor(text=[result.prompt_text], images=[fit_image(Image.open(page_file).convert("RGB"), cap)],
                        return_tensors="pt")["input_ids"][0].tolist()
print(json.dumps({"profiled_pixels": profiled.width * profiled.height, "max_num_seqs": config.scheduler_config.max_num_seqs,
                  "same_prompt_ids": learner_ids == list(result.prompt_ids)}))
'''


@pytest.mark.vllm
def test_vllm_profiles_the_capped_page_and_keeps_the_learners_prompt_ids(tiny_models, tmp_path):
    """Real vLLM: its profiling image follows the lowered processor bound (it was the processor's
    own bound before), max_num_seqs reaches the scheduler, and the prompt ids of an odd-sized
    page equal those of the learner's processor."""
    import json
    import subprocess
    import sys

    import numpy as np
    from PIL import Image

    from rollout.prompts import processor_pixel_cap

    page_file = tmp_path / "page.png"
    Image.fromarray((np.random.default_rng(0).random((1301, 997, 3)) * 255).astype("uint8")).save(page_file)
    cap = 50000  # below the tiny policy's own bound (448 x 448)
    out = subprocess.run([sys.executable, "-c", VLLM_PROFILE_PROBE, str(tiny_models["policy"]), str(page_file), str(cap)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["same_prompt_ids"] and report["max_num_seqs"] == 8
    assert report["profiled_pixels"] <= processor_pixel_cap(cap, 448 * 448) < 448 * 448


# ---------------------------------------------------------------------------------------------
# vLLM profiles the GPU before any role that shares it allocates there


def test_which_presets_share_the_rollouts_gpus():
    from cluster.config import load_config
    from cluster.config import rollout_shares_gpus

    assert rollout_shares_gpus(load_config(ROOT / "configs/qwen2vl-2b-1gpu.yaml"))  # every role on one GPU
    assert not rollout_shares_gpus(load_config(ROOT / "configs/qwen2vl-2b-8gpu.yaml"))  # whole GPUs per role
    assert not rollout_shares_gpus(load_config(ROOT / "configs/tiny.yaml"))  # CPU only
    cpu_learner = load_config(ROOT / "configs/qwen2vl-2b-1gpu.yaml", ["learner.num_gpus_per_rank=0",
                                                                      "retriever.num_gpus_per_actor=0"])
    assert not rollout_shares_gpus(cpu_learner)


@pytest.mark.ray
@pytest.mark.vllm
def test_roles_sharing_the_rollout_gpu_start_once_the_rollout_workers_are_ready(ray_cluster, tiny_models, tmp_path,
                                                                               monkeypatch):
    """The 1-GPU preset's split on Ray's fake GPUs: the retriever and the learner ranks are
    created only after every rollout worker has finished starting (its profile run included)."""
    from cluster.train import Trainer
    from learner.group import LearnerGroup
    from retriever.group import RetrieverGroup
    from rollout.group import RolloutGroup

    events: list[str] = []

    def recorded(cls, method, label):
        original = getattr(cls, method)

        def wrapper(self, *args, **kwargs):
            events.append(f"{label} begins")
            result = original(self, *args, **kwargs)
            events.append(f"{label} ends")
            return result

        monkeypatch.setattr(cls, method, wrapper)

    recorded(RolloutGroup, "__init__", "rollout start")
    recorded(RolloutGroup, "ready", "rollout ready")
    recorded(RetrieverGroup, "__init__", "retriever start")
    recorded(LearnerGroup, "__init__", "learner start")
    cfg = load_config(None, [f"run.output_dir={tmp_path}", f"run.models_dir={tiny_models['policy'].parent}",
                             "data.synthetic.num_documents=4", "data.max_eval_samples=2", "trainer.warm_start.steps=0",
                             "rollout.num_gpus_per_worker=0.4", "learner.num_gpus_per_rank=0.5",
                             "retriever.num_gpus_per_actor=0.1", "rollout.num_cpus_per_worker=0.5",
                             "learner.num_cpus_per_rank=0.5", "retriever.num_cpus_per_actor=0.5",
                             "reward.num_cpus_per_actor=0.5", "rollout.max_model_len=1024"])
    trainer = Trainer(cfg)
    try:
        trainer.setup()
    finally:
        trainer.shutdown()
    first_ready = events.index("rollout ready ends")
    assert events.index("retriever start begins") > first_ready and events.index("learner start begins") > first_ready


# ---------------------------------------------------------------------------------------------
# Full fine-tuning next to vLLM on one GPU: refused at load, with the estimate


def test_model_state_bytes_by_hand():
    from learner.memory import full_finetune_bytes

    # bf16: 2 (weights) + 2 (grads) + 4 (fp32 accumulation) + 4 (master) + 8 (Adam) = 20; +2 reference
    assert full_finetune_bytes(10**9, "bfloat16", 2, 1, with_reference=True) == 22e9
    assert full_finetune_bytes(10**9, "bfloat16", 2, 1, with_reference=False) == 20e9
    assert full_finetune_bytes(10**9, "float32", 2, 1, with_reference=False) == 16e9
    # ZeRO-2 over 4 ranks: weights whole, the rest sharded; ZeRO-3: everything sharded
    assert full_finetune_bytes(10**9, "bfloat16", 2, 4, with_reference=False) == 2e9 + 18e9 / 4
    assert full_finetune_bytes(10**9, "bfloat16", 3, 2, with_reference=True) == 11e9


def test_a_local_checkpoint_is_counted_from_its_headers(tiny_models):
    from transformers import AutoModelForImageTextToText

    from learner.memory import parameter_count

    model = AutoModelForImageTextToText.from_pretrained(tiny_models["policy"])
    assert parameter_count(str(tiny_models["policy"])) == model.num_parameters()
    assert parameter_count("Qwen/Qwen2-VL-2B-Instruct") == 2_210_000_000
    assert parameter_count("some-org/unknown-model") is None


def test_full_finetuning_next_to_vllm_is_refused_at_load_naming_the_estimate():
    from cluster.config import ConfigError

    preset = ROOT / "configs/qwen2vl-2b-1gpu.yaml"
    with pytest.raises(ConfigError) as err:
        load_config(preset, ["learner.lora.enabled=false"])
    message = str(err.value)
    # 2.21e9 x (20 + 2 reference) bytes = 48.6 GB, + 4.4 GB retriever; 80 x 0.67 x 0.9 = 48.2 GB left
    assert "full fine-tuning of Qwen/Qwen2-VL-2B-Instruct (2.21B parameters)" in message
    assert "about 53.0 GB" in message and "leaves 48.2 GB" in message
    assert "learner.lora.enabled=true" in message and "learner.zero_stage=3" in message
    with pytest.raises(ConfigError, match="Qwen2.5-VL-3B-Instruct"):
        load_config(preset, ["learner.lora.enabled=false", "learner.policy=Qwen/Qwen2.5-VL-3B-Instruct"])
    load_config(preset)  # LoRA fits
    load_config(preset, ["learner.lora.enabled=false", "ray.gpu_memory_gb=141"])  # an H200 holds it
    load_config(ROOT / "configs/qwen2vl-2b-8gpu.yaml", ["learner.lora.enabled=false"])  # GPUs of its own


# ---------------------------------------------------------------------------------------------
# A full push copies the weights once on the host; finiteness is checked once, on the learner


@pytest.mark.parametrize("lora", [False, True])
def test_the_export_shares_cpu_weights_and_refuses_non_finite_ones_by_name(tiny_models, lora):
    """What the Ray shell exports (`share_cpu_weights`, serialized at once by ray.put) is the
    parameters' own storage where nothing was merged; a merged LoRA weight is a new tensor; the
    plain call (what a local caller may keep across updates) copies. A NaN weight is refused
    by the learner, naming it."""
    from learner.group import LearnerGroup

    cfg = LearnerConfig(lora={"enabled": lora}, value_model="none", micro_batch_size=2)
    group = LearnerGroup(str(tiny_models["policy"]), cfg, AlgorithmConfig(minibatch_size=4, kl_coef=0.0), local=True)
    worker = group.worker
    storage = {p.data_ptr() for p in worker.module.parameters()}
    shared = worker.full_state_dict(share_cpu_weights=True)
    copied = worker.full_state_dict()
    assert shared.keys() == copied.keys()
    for name, tensor in shared.items():
        torch.testing.assert_close(tensor, copied[name], rtol=0, atol=0)
        assert copied[name].data_ptr() not in storage
    merged = {n for n in shared if n.endswith(".weight") and any(f"{n.removesuffix('.weight')}.lora_A" in k
                                       for k, _ in worker.module.named_parameters())}
    assert bool(merged) == lora
    for name, tensor in shared.items():
        assert (tensor.data_ptr() in storage) == (name not in merged), name
    victim_name, victim = next((n, p) for n, p in worker.module.policy.named_parameters() if "embed_tokens" in n)
    with torch.no_grad():
        victim.view(-1)[0] = float("nan")
    with pytest.raises(ValueError, match=r"weight export refused: 1 non-finite weight\(s\): .*embed_tokens"):
        worker.full_state_dict(share_cpu_weights=True)

"""The config schema: presets validate, and bad configs are refused naming the full key path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cluster.config import ConfigError, DocRLConfig, load_config, parse_override

ROOT = Path(__file__).resolve().parents[1]


def test_tiny_preset_validates():
    cfg = load_config(ROOT / "configs/tiny.yaml")
    assert cfg.data.source == "synthetic"
    assert cfg.ray.address is None and cfg.ray.num_gpus == 0
    assert cfg.learner.policy == "tiny" and cfg.retriever.model == "tiny"


def test_real_preset_validates_without_downloading():
    cfg = load_config(ROOT / "configs/qwen2vl-2b-docvqa.yaml")
    assert cfg.learner.policy == "Qwen/Qwen2-VL-2B-Instruct"
    assert cfg.retriever.model == "vidore/colqwen2-v1.0"
    assert cfg.data.source == "hf" and cfg.data.path == "lmms-lab/DocVQA"
    assert cfg.rollout.num_gpus_per_worker >= 1 and cfg.learner.num_gpus_per_rank >= 1
    assert cfg.retriever.num_gpus_per_actor >= 1
    batch = cfg.trainer.prompts_per_step * cfg.rollout.sampling.n
    assert batch % cfg.algorithm.minibatch_size == 0


@pytest.mark.parametrize("preset,policy,retriever,model_class", [
    ("colqwen25-qwen25vl-3b-docvqa", "Qwen/Qwen2.5-VL-3B-Instruct", "Metric-AI/ColQwen2.5-3b-multilingual-v1.0",
     "colqwen2_5"),
    ("gme-qwen2vl-2b-docvqa", "Qwen/Qwen2-VL-2B-Instruct", "Alibaba-NLP/gme-Qwen2-VL-2B-Instruct", "gme"),
])
def test_model_family_presets_name_the_hub_models(preset, policy, retriever, model_class):
    """The presets of the brief's model families validate without downloading and name the hub
    ids a real cluster fetches; the family is explicit (a GME config.json says qwen2_vl like a
    ColQwen2's, and the ColQwen2.5 checkpoint is an adapter over a base)."""
    from retriever.encoder import infer_model_class

    cfg = load_config(ROOT / f"configs/{preset}.yaml")
    assert (cfg.learner.policy, cfg.retriever.model, cfg.retriever.model_class) == (policy, retriever, model_class)
    assert cfg.data.source == "hf" and cfg.data.path == "lmms-lab/DocVQA" and cfg.learner.lora.enabled
    assert infer_model_class(retriever) == model_class  # offline: the hub id's name says it too


def test_a_tiny_family_that_does_not_exist_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match=r"learner.policy='tiny-qwen9_vl' names no tiny policy family: .*tiny-qwen2_5_vl"):
        load_config(ROOT / "configs/tiny.yaml", ["learner.policy=tiny-qwen9_vl"])
    with pytest.raises(ConfigError, match=r"retriever.model='tiny-qwen2_5_vl' names no tiny retriever family: .*tiny-gme"):
        load_config(ROOT / "configs/tiny.yaml", ["retriever.model=tiny-qwen2_5_vl"])
    cfg = load_config(ROOT / "configs/tiny.yaml", ["learner.policy=tiny-qwen2_5_vl", "retriever.model=tiny-gme"])
    assert (cfg.learner.policy, cfg.retriever.model) == ("tiny-qwen2_5_vl", "tiny-gme")


def test_every_shipped_config_validates():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        load_config(path)


def test_overrides_apply_with_yaml_types():
    cfg = load_config(ROOT / "configs/tiny.yaml", ["trainer.total_steps=20", "rollout.sampling.stop=[foo, bar]",
                                                   "ray.address=null", "algorithm.dual_clip=3"])
    assert cfg.trainer.total_steps == 20
    assert cfg.rollout.sampling.stop == ["foo", "bar"]
    assert cfg.algorithm.dual_clip == 3.0


def test_parse_override_refuses_missing_equals():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_override("trainer.total_steps")


@pytest.mark.parametrize(
    "override, expected",
    [
        ("trainer.totl_steps=3", r"trainer\.totl_steps: unknown key \(did you mean trainer\.total_steps\?\)"),
        ("rollout.sampling.temprature=0.5", r"rollout\.sampling\.temprature: unknown key"),
        ("nosuchsection.x=1", r"nosuchsection: unknown key"),
        ("trainer.total_steps=abc", r"trainer\.total_steps: Input should be a valid integer.*'abc'"),
        ("learner.zero_stage=1", r"learner\.zero_stage: Input should be 2 or 3"),
        ("rollout.sampling.top_p=1.5", r"rollout\.sampling\.top_p: Input should be less than or equal to 1"),
        ("trainer.total_steps.x=1", r"trainer\.total_steps is a value, not a section"),
    ],
)
def test_bad_keys_and_types_name_the_key_path(override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(ROOT / "configs/tiny.yaml", [override])


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["rollout.sampling.n=1"], r"rollout\.sampling\.n must be >= 2"),
        (["rollout.sampling.temperature=0"], r"rollout\.sampling\.n=8 needs temperature > 0"),
        (["algorithm.advantage=gae", "learner.value_model=none"], r"learner\.value_model must be 'head' or 'separate'"),
        (["algorithm.minibatch_size=5"], r"algorithm\.minibatch_size=5 must divide the step batch"),
        (["learner.num_ranks=3"], r"algorithm\.minibatch_size=64 must be divisible by learner\.num_ranks=3"),
        (["rollout.num_gpus_per_worker=1"], r"rollout needs 1 GPUs but the local cluster has ray\.num_gpus=0"),
        (["rollout.tensor_parallel_size=2"], r"rollout\.tensor_parallel_size=2 needs rollout\.num_gpus_per_worker >= 2"),
        (["retriever.top_k=3", "rollout.on_too_many_images=refuse"], r"retriever\.top_k=3 pages exceed"),
        (["data.source=docvqa_json"], r"data\.path is required when data\.source is 'docvqa_json'"),
        (["reward.components.nosuch=1.0"], r"reward\.components.*nosuch"),
    ],
)
def test_impossible_combinations_are_refused(overrides, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(ROOT / "configs/tiny.yaml", overrides)


def test_all_errors_reported_at_once():
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "configs/tiny.yaml", ["trainer.total_steps=x", "learner.zero_stage=7"])
    assert "trainer.total_steps" in str(err.value) and "learner.zero_stage" in str(err.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n- not sections\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(bad)


def test_defaults_are_a_valid_config():
    assert isinstance(DocRLConfig(), DocRLConfig)


def test_cli_refuses_bad_config_before_any_work(tmp_path):
    out = subprocess.run([sys.executable, "-m", "cluster.cli", "config", "show", "--config", str(ROOT / "configs/tiny.yaml"),
                          "trainer.total_steps=-1"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 2
    assert "trainer.total_steps: Input should be greater than or equal to 0" in out.stderr


def test_cluster_launch_files_fit_the_real_preset():
    """The launcher YAML and the KubeRay RayJob provide the GPUs the real preset asks for."""
    import yaml

    cfg = load_config(ROOT / "configs/qwen2vl-2b-docvqa.yaml")
    need = (cfg.rollout.num_workers * cfg.rollout.num_gpus_per_worker
            + cfg.learner.num_ranks * cfg.learner.num_gpus_per_rank + cfg.retriever.num_actors * cfg.retriever.num_gpus_per_actor)
    launcher = yaml.safe_load((ROOT / "cluster/launch/ray-cluster.yaml").read_text())
    worker = launcher["available_node_types"]["gpu_worker"]
    assert worker["resources"]["GPU"] * worker["min_workers"] >= need
    job = yaml.safe_load((ROOT / "cluster/launch/rayjob.yaml").read_text())
    assert job["kind"] == "RayJob" and "configs/qwen2vl-2b-docvqa.yaml" in job["spec"]["entrypoint"]
    group = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    gpus = int(group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    assert gpus * group["replicas"] >= need
    assert job["spec"]["rayClusterSpec"]["rayVersion"] == "2.60.0"


@pytest.mark.parametrize("preset,gpus", [("qwen2vl-2b-1gpu", 1), ("qwen2vl-2b-8gpu", 8), ("qwen2vl-2b-docvqa", 16),
                                         ("colqwen25-qwen25vl-3b-docvqa", 16), ("gme-qwen2vl-2b-docvqa", 16)])
def test_gpu_presets_fit_their_gpus(preset, gpus):
    """Every role's bundles are reserved together, before any model loads: the GPUs the roles ask
    for fit the machine the preset is for, and the learner's batch splits over its ranks."""
    cfg = load_config(ROOT / f"configs/{preset}.yaml")
    need = (cfg.rollout.num_workers * cfg.rollout.num_gpus_per_worker + cfg.learner.num_ranks * cfg.learner.num_gpus_per_rank
            + cfg.retriever.num_actors * cfg.retriever.num_gpus_per_actor)
    assert 0 < need <= gpus and cfg.learner.lora.enabled
    assert (cfg.trainer.prompts_per_step * cfg.rollout.sampling.n) % cfg.algorithm.minibatch_size == 0
    assert cfg.algorithm.minibatch_size % cfg.learner.num_ranks == 0
    if gpus == 1:  # vLLM shares the device: its memory share leaves room for the learner and retriever
        assert cfg.rollout.gpu_memory_utilization <= 0.4 and cfg.ray.num_gpus == 1
    assert cfg.rollout.lora_push_mode() == "adapter"  # GPU workers apply the adapter (vLLM's LoRA kernels)


def test_lora_push_mode():
    from rollout.config import RolloutConfig

    assert RolloutConfig().lora_push_mode() == "merged"  # CPU workers: plain-weight generation
    assert RolloutConfig(num_gpus_per_worker=1).lora_push_mode() == "adapter"
    assert RolloutConfig(lora_push="adapter").lora_push_mode() == "adapter"
    assert RolloutConfig(num_gpus_per_worker=1, lora_push="merged").lora_push_mode() == "merged"


def test_roles_that_do_not_fit_together_are_refused():
    with pytest.raises(ConfigError, match=r"the roles need 1.1 GPUs together .* ray.num_gpus=1"):
        load_config(ROOT / "configs/qwen2vl-2b-1gpu.yaml", ["learner.num_gpus_per_rank=0.6"])

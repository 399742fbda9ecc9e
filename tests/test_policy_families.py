"""The policy families besides Qwen2-VL, once through each path the Qwen2-VL tests cover in depth:
the tiny build (deterministic, picked from config.json) and the learner's exact multimodal
logprobs for Qwen2.5-VL and Qwen3-VL; one LoRA update with its exports and servable checkpoint,
and `docrl doctor` parity on real vLLM, for Qwen2.5-VL."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from common.policy_family import load_policy_model, policy_family
from docvqa.tiny_models import resolve_model
from learner.config import AlgorithmConfig, LearnerConfig
from learner.model import InputBuilder, forward_outputs, load_policy, sequence_logprobs
from learner.synthetic import make_pages, synthetic_experiences
from rollout.parity import reference_logprobs

FAMILIES = ("qwen2_5_vl", "qwen3_vl")
both_families = pytest.mark.parametrize("family", FAMILIES, indirect=True)


@pytest.fixture(scope="module")
def family(request):
    """The family under test: a test marked `both_families` runs for each, any other for Qwen2.5-VL."""
    return getattr(request, "param", FAMILIES[0])


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("family-models")


@pytest.fixture(scope="module")
def policy(models_dir, family):
    return resolve_model(f"tiny-{family}", "policy", models_dir)


@pytest.fixture(scope="module")
def builder(policy):
    return InputBuilder.for_model(policy)


@pytest.fixture(scope="module")
def experiences(policy, builder, tmp_path_factory):
    """Two image prompts of different sizes and a text-only one, two answers each, with the base
    policy's own logprobs as the rollout's (exactly on-policy)."""
    from dataclasses import replace

    pages = make_pages(tmp_path_factory.mktemp("family-pages"))
    exps = synthetic_experiences(policy, [pages[0], pages[1], None], answers_per_question=2,
                                 processor=builder.processor)
    logprobs = sequence_logprobs(load_policy(policy), builder, exps)
    return [replace(e, rollout_logprobs=tuple(lp.tolist())) for e, lp in zip(exps, logprobs)]


def _digests(folder: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir()) if f.is_file()}


@both_families
def test_tiny_build_is_deterministic_cached_and_of_its_family(family, policy, models_dir, tmp_path, capsys):
    """`tiny-<family>` in a config and `docrl make-tiny-models --family <family>` build the same
    bytes; the config name reuses its build; the model and processor are the family's."""
    from transformers import AutoProcessor

    from cluster.cli import main
    from common.policy_family import policy_classes

    path = Path(policy)
    assert path == models_dir / f"policy-{family}"
    assert main(["make-tiny-models", str(tmp_path), "--family", family]) == 0
    again = tmp_path / f"policy-{family}"
    assert f"policy: {again}" in capsys.readouterr().out
    assert _digests(again) == _digests(path)  # every file, byte for byte
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(_digests(path))
    built_at = (path / "model.safetensors").stat().st_mtime_ns
    assert resolve_model(f"tiny-{family}", "policy", models_dir) == policy  # reused, not rebuilt
    assert (path / "model.safetensors").stat().st_mtime_ns == built_at

    model_cls, processor_cls = policy_classes(family)
    assert policy_family(path) == family
    assert type(load_policy_model(path)) is model_cls
    processor = AutoProcessor.from_pretrained(path)
    assert type(processor) is processor_cls
    # the tiny Qwen2-VL's visual-token budget at the family's patch size: a square page of 8x8
    # merged tokens (224 pixels at 14-pixel patches, 256 at 16)
    side = 16 * processor.image_processor.patch_size
    grid = processor(text=["<|image_pad|>"], images=[_page(side)])["image_grid_thw"]
    assert grid.tolist() == [[1, 16, 16]]
    with pytest.raises(ValueError, match="tiny-qwen2_vl, tiny-qwen2_5_vl, tiny-qwen3_vl"):
        resolve_model("tiny-qwen9_vl", "policy", models_dir)
    assert main(["make-tiny-models", str(tmp_path), "--family", "qwen9_vl"]) == 2
    assert "policy families: qwen2_vl, qwen2_5_vl, qwen3_vl" in capsys.readouterr().err


def _page(side: int):
    from PIL import Image

    return Image.new("RGB", (side, side), "white")


def test_an_unsupported_family_is_refused_naming_the_path_and_the_families(tmp_path):
    config = {"model_type": "llava", "architectures": ["LlavaForConditionalGeneration"]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"(?s)llava.*supported: qwen2_vl, qwen2_5_vl, qwen3_vl") as e:
        load_policy(str(tmp_path))
    assert str(tmp_path) in str(e.value)


@both_families
def test_learner_logprobs_equal_a_plain_transformers_forward(policy, builder, experiences):
    """Batched (right-padded) and shared-prompt learner logprobs equal the plain transformers
    forward of each sequence alone, with the family's own 3-D positions. 1-D positions instead move
    the logprobs far beyond the tolerance, so the equality would catch the learner getting them
    wrong."""
    model = load_policy(policy)
    batched = sequence_logprobs(model, builder, experiences)
    with torch.no_grad():
        shared = forward_outputs(model, builder.build(experiences, share_prompts=True), with_entropy=False,
                                 with_values=False).logprobs
    image_prompts = 0
    for k, (exp, lp) in enumerate(zip(experiences, batched)):
        images = [p.load_image() for p in exp.pages]
        ref = reference_logprobs(model, builder.processor, exp.prompt_text, images, exp.response_ids, exp.prompt_ids)
        torch.testing.assert_close(lp, ref, atol=2e-5, rtol=0)
        torch.testing.assert_close(shared[k, : len(lp)], ref, atol=2e-5, rtol=0)
        if images:
            image_prompts += 1
            assert float((_logprobs_on_1d_positions(model, builder.processor, exp, images) - ref).abs().max()) > 2e-4
    assert image_prompts == 4


@both_families
def test_dummy_image_row_runs_the_vision_tower_and_changes_nothing(policy, builder, experiences):
    """Multi-rank learners add a one-token dummy image to image-free micro-batches; the family's
    vision tower (Qwen2.5-VL's windowed one, Qwen3-VL's with deepstack features) takes it, and the
    text-only rows keep their logprobs."""
    model = load_policy(policy)
    text_only = [e for e in experiences if not e.pages]
    padded = builder.build(text_only, ensure_image=True)
    assert padded.pixel_values is not None and padded.input_ids.shape[0] == len(text_only) + 1
    with torch.no_grad():
        got = forward_outputs(model, padded, with_entropy=False, with_values=False).logprobs
    for row, want in enumerate(sequence_logprobs(model, builder, text_only)):
        torch.testing.assert_close(got[row, : len(want)], want, atol=2e-5, rtol=0)


@torch.no_grad()
def _logprobs_on_1d_positions(model, processor, exp, images) -> torch.Tensor:
    """reference_logprobs' computation on 1-D positions (the token index on all three mrope axes)."""
    from rollout.prompts import vision_token_ids

    enc = processor(text=[exp.prompt_text], images=images, return_tensors="pt")
    ids = torch.tensor([list(exp.prompt_ids) + list(exp.response_ids)])
    flat = torch.arange(ids.shape[1]).expand(3, 1, -1)
    logits = model(input_ids=ids, mm_token_type_ids=(ids == model.config.image_token_id).long(), position_ids=flat,
                   pixel_values=enc["pixel_values"], image_grid_thw=enc["image_grid_thw"]).logits
    logits = logits[0, len(exp.prompt_ids) - 1:-1].float()
    logits[:, list(vision_token_ids(model.config))] = float("-inf")
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(exp.response_ids)[:, None])[:, 0]


def test_one_lora_update_and_its_exports_and_checkpoint_reproduce_the_learner(policy, builder, experiences, tmp_path):
    """One GRPO step on the local LearnerGroup (DeepSpeed, one rank) moves only the language
    model's adapters; the exported adapter, the merged full weights (under the checkpoint's names)
    and the servable checkpoint made from the adapter all give the learner's new logprobs."""
    from peft import PeftModel

    from learner.group import LearnerGroup
    from learner.types import TrainBatch
    from rollout.policy import materialize_policy, write_policy
    from rollout.weights import checkpoint_shapes, write_model_copy

    group = LearnerGroup(policy, LearnerConfig(micro_batch_size=2, learning_rate=1e-3),
                         AlgorithmConfig(minibatch_size=6, kl_coef=0.05), local=True,
                         export_dir=str(tmp_path / "exports"))
    before = group.trainable_state()
    metrics = group.update(TrainBatch(experiences))
    after = group.trainable_state()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert metrics["optimizer_steps"] == 1 and metrics["skipped_steps"] == 0
    assert changed and all("lora_" in n and ".language_model." in n for n in changed)
    scores, _ = group.compute_ref_and_old(experiences)
    assert any(float((o - r).abs().max()) > 1e-4 for o, r in zip(scores.old_logprobs, scores.ref_logprobs))

    lora = group.export_weights()
    full = group.export_weights("full")
    assert lora.kind == "lora" and full.kind == "full" and set(full.tensors) == set(checkpoint_shapes(policy))
    write_policy(tmp_path / "ckpt" / "policy", policy, lora, step=1)
    candidates = {
        "adapter": PeftModel.from_pretrained(load_policy(policy), lora.adapter_dir).eval(),
        "full": load_policy(str(write_model_copy(policy, full.tensors, tmp_path / "merged"))),
        "checkpoint": load_policy(str(materialize_policy(tmp_path / "ckpt", tmp_path / "start"))),
    }
    for label, model in candidates.items():
        for got, want in zip(sequence_logprobs(model, builder, experiences), scores.old_logprobs):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0, msg=label)


@pytest.mark.ray
@pytest.mark.vllm
@pytest.mark.slow
def test_doctor_parity_after_base_full_and_lora_pushes(ray_cluster, family, policy):
    """`docrl doctor` on real vLLM: fp32 logprobs within 1e-3 of transformers on the base weights
    (greedy and sampled at 0.7), after a full push and after a LoRA push, same greedy tokens."""
    from rollout.config import RolloutConfig
    from rollout.parity import run_doctor

    cfg = RolloutConfig(num_workers=1, num_cpus_per_worker=1, max_model_len=1024, weight_sync_timeout_s=120)
    report = run_doctor(policy, cfg, lora_rank=8)
    print(json.dumps(report, indent=1))
    assert report["family"] == family
    for version, label in enumerate(("base", "full_push", "lora_push")):
        r = report[label]
        assert r["weights_version"] == version and r["tokens"] >= 1
        assert r["max_abs_dlogprob"] < 1e-3, (label, r)
        assert r["greedy_tokens_identical"], (label, r)
    assert report["base_sampled"]["max_abs_dlogprob"] < 1e-3 and report["base_sampled"]["tokens"] >= 4

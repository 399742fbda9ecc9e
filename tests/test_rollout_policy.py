"""The servable policy directory: continuing training from what Serve serves (`trainer.init_from`)
turns a checkpoint into one complete model directory, checked against a hand merge."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import load_file
from serving import lora_checkpoint

from learner.types import ExportedWeights
from rollout.parity import perturbed_state_dict
from rollout.policy import materialize_policy, resolve_policy, write_policy


def test_a_lora_checkpoint_becomes_its_base_plus_the_adapter_delta(tiny_models, tmp_path):
    policy = str(tiny_models["policy"])
    checkpoint = lora_checkpoint(policy, tmp_path, version=3)
    out = materialize_policy(checkpoint, tmp_path / "start")
    merged = load_file(str(out / "model.safetensors"))
    base = load_file(f"{policy}/model.safetensors")
    adapter = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    config = resolve_policy(checkpoint)
    assert config["kind"] == "lora"
    # W' = W + (alpha / r) * B @ A, by hand, for every adapted weight
    import json

    spec = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    scale = spec["lora_alpha"] / spec["r"]

    def language_layer(name: str) -> str:  # checkpoints name the decoder layers in two layouts
        return name[name.index("layers."):]

    base_by, merged_by = ({language_layer(n): t for n, t in d.items() if ".layers." in n and "visual" not in n}
                          for d in (base, merged))
    adapted = set()
    for key_a in [k for k in adapter if k.endswith("lora_A.weight")]:
        name = language_layer(key_a.removesuffix(".lora_A.weight")) + ".weight"
        delta = scale * adapter[key_a.replace("lora_A", "lora_B")] @ adapter[key_a]
        torch.testing.assert_close(merged_by[name], base_by[name] + delta, rtol=1e-5, atol=1e-6)
        adapted.add(name)
    assert len(adapted) >= 2 and len(merged) == len(base)
    untouched = [n for n in base_by if n not in adapted]
    assert untouched and all(torch.equal(merged_by[n], base_by[n]) for n in untouched)
    assert (out / "tokenizer_config.json").exists() and (out / "processor_config.json").exists()


def test_a_full_checkpoint_is_copied_and_reused_while_unchanged(tiny_models, tmp_path):
    policy = str(tiny_models["policy"])
    weights = perturbed_state_dict(policy, scale=0.1, seed=2)
    write_policy(tmp_path / "ckpt" / "policy", policy, ExportedWeights(4, "full", tensors=weights), step=4)
    out = materialize_policy(tmp_path / "ckpt", tmp_path / "start")
    copied = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(copied[k], weights[k]) for k in weights)
    first = (out / "model.safetensors").stat().st_mtime_ns
    assert (materialize_policy(tmp_path / "ckpt", tmp_path / "start") / "model.safetensors").stat().st_mtime_ns == first


def _adapter(tmp_path, config: str | None, weights: bytes | None):
    d = tmp_path / "adapter"
    d.mkdir()
    if config is not None:
        (d / "adapter_config.json").write_text(config)
    if weights is not None:
        (d / "adapter_model.safetensors").write_bytes(weights)
    return d


def _tensors_file() -> bytes:
    import torch
    from safetensors.torch import save

    return save({"base_model.model.q_proj.lora_A.weight": torch.zeros(8, 16)})


@pytest.mark.parametrize("config, weights, words", [
    (None, b"", "lacks adapter_config.json"),
    ('{"r": 8}', None, "lacks adapter_config.json or adapter_model"),
    ("{not json", "tensors", "adapter_config.json is not a peft adapter config"),
    ('{"lora_alpha": 16}', "tensors", "adapter_config.json is not a peft adapter config"),
    ('{"r": 8}', b"\x00\x01 truncated", "adapter_model.safetensors is not a readable safetensors file"),
    ('{"r": 64}', "tensors", "adapter rank 64 > the engine's max_lora_rank 8"),
])
def test_a_malformed_lora_adapter_is_refused_naming_its_file(tmp_path, config, weights, words):
    from rollout.weights import check_lora_adapter

    adapter = _adapter(tmp_path, config, _tensors_file() if weights == "tensors" else weights)
    with pytest.raises(ValueError, match=re.escape(words)) as e:
        check_lora_adapter(adapter, 8, "serve policy")
    assert str(adapter) in str(e.value) and str(e.value).startswith("serve policy: ")


def test_a_well_formed_adapter_passes(tmp_path):
    from rollout.weights import check_lora_adapter

    assert check_lora_adapter(_adapter(tmp_path, '{"r": 8}', _tensors_file()), 8, "w")["r"] == 8

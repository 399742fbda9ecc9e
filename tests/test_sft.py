"""The supervised warm start (learner/sft.py): its examples are exactly the rollout's prompts with
the gold answer as the response, its loss falls, and it writes a model the next stages load."""

from __future__ import annotations

import json

import pytest
import torch

from learner.sft import END_OF_TURN, SFTSettings, sft_examples, supervised_finetune


@pytest.fixture(scope="module")
def easy(tmp_path_factory):
    from docvqa.loaders import load_docvqa_json, merge_datasets
    from docvqa.synthetic import generate_corpus

    out = tmp_path_factory.mktemp("easy")
    generate_corpus(out, num_documents=40, seed=5, level="easy")
    train = load_docvqa_json(out / "train_v1.0.json")
    val = load_docvqa_json(out / "val_v1.0.json")
    return train, val, merge_datasets([train, val]).pages


def test_examples_are_the_rollout_prompt_plus_the_gold_answer(tiny_models, easy):
    from learner.model import InputBuilder
    from rollout.config import RolloutConfig
    from rollout.prompts import build_chat_text

    train, _, pages = easy
    builder = InputBuilder.for_model(str(tiny_models["policy"]))
    cfg = RolloutConfig()
    [ex] = sft_examples(train.samples[:1], pages, builder, cfg)
    sample = train.samples[0]
    assert ex.prompt_text == build_chat_text(builder.processor, sample.question, 1, cfg.system_prompt, cfg.instruction)
    assert ex.pages[0].page_id == sample.gold_page
    tok = builder.processor.tokenizer
    assert tok.decode(ex.response_ids) == sample.answers[0] + END_OF_TURN
    # the prompt ids are the processor's expansion, so the learner's InputBuilder accepts them as is
    ids, _, _ = builder.encode_prompt(ex)
    assert ids == list(ex.prompt_ids) and ids.count(builder.image_token_id) > 1


def test_warm_start_lowers_the_loss_and_writes_a_loadable_model(tiny_models, easy, tmp_path):
    from learner.model import load_policy
    from rollout.config import RolloutConfig

    train, val, pages = easy
    out = tmp_path / "model"
    summary = supervised_finetune(str(tiny_models["policy"]), out, train.samples, pages, RolloutConfig(),
                                  SFTSettings(steps=30, batch_size=8, learning_rate=2e-3), eval_samples=val.samples[:4])
    assert len(summary["losses"]) == 30 and summary["loss_last"] < summary["loss_first"] / 3
    assert summary["eval_anls_before"] is not None and 0.0 <= summary["eval_anls_after"] <= 1.0
    assert json.loads((out / "docrl_warm_start.json").read_text())["steps"] == 30
    from learner.model import InputBuilder
    from rollout.prompts import build_chat_text

    # the rollout and learner load it like any policy: weights, processor and chat template
    assert sum(p.numel() for p in load_policy(str(out)).parameters()) > 0
    before, after = InputBuilder.for_model(str(tiny_models["policy"])), InputBuilder.for_model(str(out))
    assert build_chat_text(after.processor, "q?", 1) == build_chat_text(before.processor, "q?", 1)
    with pytest.raises(ValueError, match="no training questions"):
        supervised_finetune(str(tiny_models["policy"]), tmp_path / "x", [], pages, RolloutConfig(), SFTSettings(steps=1))


def _tensors(model_dir):
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def test_lora_warm_start_in_bfloat16_writes_a_merged_model(tiny_models, easy, tmp_path):
    """learner.lora + learner.dtype: the adapter trains on the bf16 model and is merged into it; the
    result is a complete bf16 checkpoint (no adapter) that differs from the base exactly in the
    LoRA-targeted language-model layers."""
    import re

    from learner.config import LoraConfig
    from rollout.config import RolloutConfig

    train, _, pages = easy
    base_dir, out = tiny_models["policy"], tmp_path / "model"
    settings = SFTSettings(steps=3, batch_size=4, learning_rate=2e-3, dtype="bfloat16",
                           lora=LoraConfig(r=8, target_modules=["q_proj", "v_proj"]), freeze_vision_tower=True)
    summary = supervised_finetune(str(base_dir), out, train.samples, pages, RolloutConfig(), settings)
    assert summary["dtype"] == "bfloat16" and summary["lora"] and summary["device"] == "cpu"
    assert not (out / "adapter_config.json").exists()
    base, merged = _tensors(base_dir), _tensors(out)
    assert set(merged) == set(base)
    assert all(t.dtype == torch.bfloat16 for t in merged.values() if t.is_floating_point())
    # checkpoint names: the language model is "model.layers.*", the vision tower "visual.*"
    changed = {name for name in base if not torch.equal(merged[name], base[name].to(merged[name].dtype))}
    expected = {name for name in base if re.fullmatch(r"model\.layers\.\d+\.self_attn\.(q_proj|v_proj)\.weight", name)}
    assert len(expected) == 4 and changed == expected
    from learner.model import load_policy

    assert next(load_policy(str(out), torch.bfloat16).parameters()).dtype == torch.bfloat16


def test_full_warm_start_keeps_a_frozen_vision_tower(tiny_models, easy, tmp_path):
    from rollout.config import RolloutConfig

    train, _, pages = easy
    out = tmp_path / "model"
    supervised_finetune(str(tiny_models["policy"]), out, train.samples, pages, RolloutConfig(),
                        SFTSettings(steps=2, batch_size=4, learning_rate=1e-3, freeze_vision_tower=True))
    base, tuned = _tensors(tiny_models["policy"]), _tensors(out)
    changed = {name for name in base if not torch.equal(tuned[name], base[name])}
    assert any(name.startswith("model.layers.") for name in changed)  # checkpoint names
    assert not any(name.startswith("visual.") for name in changed)


def test_bfloat16_weights_learn_from_updates_below_their_precision():
    """A bf16 weight of 1.0 cannot take a step of 1e-3 (bf16 spacing below 1 is 2**-8 = 0.0039, so
    0.999 rounds back to 1): the optimizer updates fp32 copies, so ten such steps (0.99) do show,
    as 0.98828125 (= 1 - 3 * 2**-8, the bf16 value nearest 0.99)."""
    from learner.sft import _Fp32Master

    weight = torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16))
    plain = torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16))
    master = _Fp32Master([weight])
    opt, opt_plain = torch.optim.SGD(master.params, lr=1e-3), torch.optim.SGD([plain], lr=1e-3)
    for _ in range(10):
        weight.grad, plain.grad = torch.ones_like(weight), torch.ones_like(plain)
        master.grads_to_master()
        opt.step()
        opt_plain.step()
        master.master_to_model()
    assert plain.tolist() == [1.0] * 3  # every step rounded away
    assert weight.tolist() == [0.98828125] * 3

"""The supervised warm start (learner/sft.py): its examples are exactly the rollout's prompts with
the gold answer as the response, its loss falls, and it writes a model the next stages load."""

from __future__ import annotations

import json

import pytest

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

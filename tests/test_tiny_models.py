"""Tiny models: deterministic, ids consistent with the tokenizer, loadable in transformers,
colpali-engine and vLLM (in a Ray actor), and vLLM agrees with transformers on logprobs."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from PIL import Image

from docvqa.tiny_models import SIZES, SPECIAL_TOKENS, build_policy, build_retriever, train_tokenizer


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_tokenizer_training_is_deterministic_and_carries_specials():
    a, b = train_tokenizer(512), train_tokenizer(512)
    assert a.to_str() == b.to_str()
    ids = [a.token_to_id(t) for t in SPECIAL_TOKENS]
    assert None not in ids and len(set(ids)) == len(SPECIAL_TOKENS)
    # byte-level: any text round-trips, including characters never seen in training
    text = "Total: $1,250.00 — Café 東京 🙂"
    assert a.decode(a.encode(text).ids) == text


def test_build_is_deterministic(tmp_path):
    for build in (build_policy, build_retriever):
        a, b = build(tmp_path / f"{build.__name__}-a"), build(tmp_path / f"{build.__name__}-b")
        for name in ("model.safetensors", "tokenizer.json", "config.json"):
            assert _digest(a / name) == _digest(b / name), f"{build.__name__}: {name} differs between builds"


def test_config_ids_match_the_tokenizer(tiny_models):
    from transformers import AutoTokenizer

    for role in ("policy", "retriever"):
        tok = AutoTokenizer.from_pretrained(tiny_models[role])
        cfg = json.loads((tiny_models[role] / "config.json").read_text())
        assert cfg["image_token_id"] == tok.convert_tokens_to_ids("<|image_pad|>")
        assert cfg["video_token_id"] == tok.convert_tokens_to_ids("<|video_pad|>")
        assert cfg["vision_start_token_id"] == tok.convert_tokens_to_ids("<|vision_start|>")
        assert cfg["vision_end_token_id"] == tok.convert_tokens_to_ids("<|vision_end|>")
        assert cfg["text_config"]["eos_token_id"] == tok.convert_tokens_to_ids("<|im_end|>")
        assert cfg["text_config"]["vocab_size"] >= len(tok)
    gen = json.loads((tiny_models["policy"] / "generation_config.json").read_text())
    assert tok.convert_tokens_to_ids("<|im_end|>") in gen["eos_token_id"]


def test_100m_size_has_about_100m_parameters():
    from transformers import Qwen2VLForConditionalGeneration

    from docvqa.tiny_models import _qwen2vl_config

    ids = {t: 8000 + i for i, t in enumerate(SPECIAL_TOKENS)}
    with torch.device("meta"):
        model = Qwen2VLForConditionalGeneration(_qwen2vl_config(SIZES["100m"], ids, 8064))
    n = sum(p.numel() for p in model.parameters())
    assert 80e6 < n < 150e6, n


def _page():
    from PIL import ImageDraw

    img = Image.new("RGB", (224, 224), "white")
    ImageDraw.Draw(img).text((40, 100), "INVOICE 1234", fill="black")
    return img


def test_policy_generates_from_an_image_in_transformers(tiny_models):
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    from rollout.prompts import build_chat_text

    proc = AutoProcessor.from_pretrained(tiny_models["policy"])
    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_models["policy"], dtype=torch.float32).eval()
    text = build_chat_text(proc, "What is the invoice number?", 1)
    assert text.count("<|image_pad|>") == 1
    inputs = proc(text=[text], images=[_page()], return_tensors="pt")
    n_image_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert n_image_tokens == int(inputs["image_grid_thw"].prod()) // 4  # 2x2 patch merge
    out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1]:]
    assert 1 <= len(new) <= 6 and int(new.max()) < model.config.text_config.vocab_size


def test_retriever_embeds_pages_and_queries_in_colpali_engine(tiny_models):
    from retriever.encoder import PageEncoder

    enc = PageEncoder(str(tiny_models["retriever"]))
    pages = enc.embed_images([_page(), _page().resize((300, 420))], batch_size=2)
    queries = enc.embed_queries(["what is the invoice number", "total"])
    assert enc.family == "colqwen2" and enc.dim == 128
    assert enc.settings()["max_pixels"] == 28 * 28 * 256 and enc.settings()["min_pixels"] == 28 * 28 * 4
    for v in pages + queries:
        assert v.ndim == 2 and v.shape[1] == 128 and torch.isfinite(v).all()
        torch.testing.assert_close(v.norm(dim=-1), torch.ones(v.shape[0]), atol=1e-4, rtol=0)
    assert pages[0].shape[0] < pages[1].shape[0]  # the larger page has more visual tokens, padding removed
    with pytest.raises(ValueError, match="query #1 is empty"):
        enc.embed_queries(["ok", "  "])


@pytest.mark.ray
@pytest.mark.vllm
def test_demo_retrieves_and_answers_on_ray(ray_cluster, tiny_models, tmp_path, capsys):
    """The embedded default end to end: synthetic corpus, retriever actor, vLLM worker, ANLS."""
    from cluster.config import load_config
    from cluster.demo import run_demo

    cfg = load_config(None, [f"run.output_dir={tmp_path}", f"run.models_dir={tiny_models['policy'].parent}",
                             "data.synthetic.num_documents=6", "rollout.max_model_len=1024"])
    rows = run_demo(cfg, num_questions=3)
    out = capsys.readouterr().out
    assert len(rows) == 3
    for r in rows:
        assert len(r["retrieved"]) == 1 and r["retrieved"][0][0].count("/p") == 1
        assert 0.0 <= r["anls"] <= 1.0 and isinstance(r["answer"], str)
        assert f"Q{r['question_id']}" in out
    assert "retriever: indexed" in out and "vLLM answer" in out

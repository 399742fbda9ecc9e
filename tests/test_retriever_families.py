"""Every retriever family once through what the project does with a retriever: a deterministic
tiny build, its family told from the checkpoint, pages indexed and searched through the page index
(single-vector families: scores are plain inner products), an index refusing a query model of
another family, ColQwen2.5 loaded from an adapter-only directory over its base, GME's input format,
and a single-vector family through the retriever group on Ray. Tiny models are built once per
module."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from docvqa.tiny_models import build_retriever
from retriever.encoder import PageEncoder, infer_model_class
from retriever.index import (DEFAULT_POOLING, IndexLoadError, PageIndex, load_index, map_segment, save_index,
                             write_segment)

FAMILIES = ["colqwen2", "colqwen2_5", "colqwen2_5_adapter", "biqwen2", "biqwen2_5", "gme"]
MODEL_CLASS = {"colqwen2_5_adapter": "colqwen2_5"}  # the others are their own model_class
SINGLE_VECTOR = {"biqwen2", "biqwen2_5", "gme"}
QUESTIONS = ["What is the total amount?", "Who signed the letter?", "red", "invoice date of the company"]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("retriever-families")
    return {family: build_retriever(root / family, family=family) for family in FAMILIES}


@pytest.fixture(scope="module")
def encoders(models) -> dict[str, PageEncoder]:
    return {family: PageEncoder(str(path)) for family, path in models.items()}  # model_class auto


def _pages() -> list[Image.Image]:
    """Four distinct small pages: coloured plates with words, of two sizes."""
    pages = []
    for i, (colour, word) in enumerate([("white", "total 42.00"), ("red", "red"), ("navy", "sincerely"),
                                        ("khaki", "invoice 2019")]):
        image = Image.new("RGB", (224, 280) if i % 2 else (280, 224), colour)
        ImageDraw.Draw(image).text((20, 40), word, fill="black" if colour != "navy" else "white")
        pages.append(image)
    return pages


def _tree(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` by relative path, with the directory's parent written as <root>
    (an adapter names its base by absolute path)."""
    return {str(f.relative_to(directory)): f.read_bytes().replace(str(directory.resolve().parent).encode(), b"<root>")
            for f in sorted(directory.rglob("*")) if f.is_file()}


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_build_is_deterministic_and_tells_its_family(models, family, tmp_path):
    again = build_retriever(tmp_path / family, family=family)
    first = _tree(models[family])
    assert first == _tree(again)
    assert "docrl_tiny.json" in first
    assert infer_model_class(str(models[family])) == MODEL_CLASS.get(family, family)


def test_the_adapter_only_build_ships_like_the_hub_model(models):
    """Metric-AI/ColQwen2.5-3b-multilingual-v1.0's layout: no config.json and no full weights, an
    adapter_config.json naming the base, LoRA tensors of the language model (transformers-4 names)
    and of the custom_text_proj head, and the processor files."""
    from safetensors import safe_open

    adapter = models["colqwen2_5_adapter"]
    names = {f.name for f in adapter.iterdir()}
    assert "config.json" not in names and "model.safetensors" not in names
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= names
    config = json.loads((adapter / "adapter_config.json").read_text())
    base = Path(config["base_model_name_or_path"])
    assert base.is_absolute() and (base / "model.safetensors").exists() and base != adapter
    with safe_open(adapter / "adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("base_model.model.model.layers.0.") and ".lora_A." in k for k in keys)
    assert "base_model.model.custom_text_proj.lora_A.weight" in keys
    assert not any("visual" in k or "language_model" in k for k in keys)


def test_infer_model_class_rules(models, tmp_path):
    assert infer_model_class("Alibaba-NLP/gme-Qwen2-VL-2B-Instruct") == "gme"
    assert infer_model_class("vidore/biqwen2-v0.1") == "biqwen2"
    assert infer_model_class("someone/biqwen2.5-docs") == "biqwen2_5"
    assert infer_model_class("Metric-AI/ColQwen2.5-3b-multilingual-v1.0") == "colqwen2_5"
    assert infer_model_class("vidore/colqwen2-v1.0") == "colqwen2"
    # a GME checkpoint's config.json says qwen2_vl: without "gme" in its name it reads as ColQwen2 ...
    plain = tmp_path / "my-embedder"
    plain.mkdir()
    (plain / "config.json").write_text((models["gme"] / "config.json").read_text())
    assert infer_model_class(str(plain)) == "colqwen2"
    # ... with it, as GME; "gme" inside another word, or higher up the path, does not count
    named = tmp_path / "gme-finetuned"
    plain.rename(named)
    assert infer_model_class(str(named)) == "gme"
    lookalike = tmp_path / "gmeyer" / "colqwen2-docs"
    lookalike.mkdir(parents=True)
    (lookalike / "config.json").write_text((models["colqwen2"] / "config.json").read_text())
    assert infer_model_class(str(lookalike)) == "colqwen2"


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "gme"])
def test_queries_are_embedded_in_the_format_the_models_were_trained_on(encoders, family):
    """colpali-engine's training collator builds a query as query_prefix + text + 10 augmentation
    tokens (<|endoftext|> for the Qwen families); the hub retrievers learned on that, so the search
    must embed queries the same way: every one of those tokens gives a vector (multi-vector), or
    the pooled vector is computed over them (single-vector)."""
    encoder = encoders[family]
    processor = encoder.processor
    query = QUESTIONS[0]
    text = processor.query_prefix + query + processor.query_augmentation_token * 10
    batch = processor.process_texts([text])
    assert processor.tokenizer.decode(batch["input_ids"][0]).endswith(query + "<|endoftext|>" * 10)
    with torch.inference_mode():
        expected = encoder.model(**batch)[0]
    (got,) = encoder.embed_queries([query])
    if family in SINGLE_VECTOR:
        torch.testing.assert_close(got, expected[None].float(), atol=1e-5, rtol=0)
    else:
        assert got.shape[0] == batch["input_ids"].shape[1] == len(processor.tokenizer(query)["input_ids"]) + 10
        torch.testing.assert_close(got, expected.float(), atol=1e-5, rtol=0)


def _maxsim(query: torch.Tensor, page: torch.Tensor) -> float:
    return float(sum(max(float(q @ p) for p in page) for q in query))


@pytest.mark.parametrize("family", FAMILIES)
def test_pages_are_indexed_and_searched(encoders, family, tmp_path):
    """Saved, loaded and searched like any index; a single-vector family's scores are the inner
    products of its page and query vectors, its segments hold no pooled vectors, and two-stage
    search is exact search for it."""
    encoder = encoders[family]
    assert encoder.family == MODEL_CLASS.get(family, family) and encoder.single_vector == (family in SINGLE_VECTOR)
    pages = _pages()
    page_vectors = encoder.embed_images(pages, batch_size=3)  # two batches, the first padded
    query_vectors = encoder.embed_queries(QUESTIONS, batch_size=3)
    for v in page_vectors + query_vectors:
        assert v.shape[1] == encoder.dim and v.shape[0] >= 1
        torch.testing.assert_close(v.norm(dim=1), torch.ones(v.shape[0]), atol=1e-5, rtol=0)
    if family in SINGLE_VECTOR:
        assert all(v.shape[0] == 1 for v in page_vectors + query_vectors)
    else:
        assert all(v.shape[0] > 1 for v in page_vectors)
    ids = [f"doc{i}/p1" for i in range(len(pages))]
    index = PageIndex(encoder.settings())
    index.add(ids, page_vectors, [{"doc_id": f"doc{i}", "page_no": 1} for i in range(len(pages))])
    loaded = load_index(save_index(index, tmp_path / "index"))
    loaded.check_compatible(encoder.settings())
    results = loaded.search(query_vectors, k=len(pages))

    if family in SINGLE_VECTOR:  # independently: a matrix of inner products, sorted by (score desc, page order)
        scores = torch.cat(query_vectors) @ torch.cat(page_vectors).T
    else:
        scores = torch.tensor([[_maxsim(q, p) for p in page_vectors] for q in query_vectors])
    for row, result in zip(scores.tolist(), results):
        expected = sorted(range(len(ids)), key=lambda j: (-row[j], j))
        assert [pid for pid, _ in result] == [ids[j] for j in expected]
        torch.testing.assert_close(torch.tensor([s for _, s in result]), torch.tensor([row[j] for j in expected]),
                                   atol=1e-5, rtol=0)

    segment = write_segment(tmp_path / "pooled", "segment-00000.safetensors", ids, page_vectors, pooling=DEFAULT_POOLING)
    assert ("pooled" in map_segment(tmp_path / "pooled" / segment["file"])) == (family not in SINGLE_VECTOR)
    if family in SINGLE_VECTOR:
        assert loaded.search(query_vectors, k=2, method="two_stage", shortlist=1) == loaded.search(query_vectors, k=2)


@pytest.mark.parametrize(("indexed", "querying"), [("gme", "colqwen2"), ("colqwen2_5_adapter", "biqwen2")])
def test_an_index_refuses_a_query_model_of_another_family(encoders, indexed, querying, tmp_path):
    index = PageIndex(encoders[indexed].settings())
    index.add(["d/p1"], encoders[indexed].embed_images(_pages()[:1]))
    loaded = load_index(save_index(index, tmp_path / "index"))
    ours, theirs = MODEL_CLASS.get(indexed, indexed), MODEL_CLASS.get(querying, querying)
    with pytest.raises(IndexLoadError, match=rf"holds {ours} page vectors and cannot be searched with a {theirs} "
                                             rf"query model.*family: index '{ours}' vs encoder '{theirs}'"):
        loaded.check_compatible(encoders[querying].settings(), where=str(tmp_path / "index"))


def test_adapter_only_colqwen2_5_embeds_as_its_base_with_the_lora_merged(encoders, models):
    """The adapter directory loads as base + adapter: its vectors equal those of the base with every
    LoRA update merged into the weights by hand (W + alpha/r * B @ A, from the adapter's own files),
    and differ from the bare base's (the same weights as the tiny colqwen2_5)."""
    from colpali_engine.models import ColQwen2_5
    from safetensors.torch import load_file

    adapter_dir = models["colqwen2_5_adapter"]
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    merged = ColQwen2_5.from_pretrained(config["base_model_name_or_path"], dtype=torch.float32).eval()
    modules = dict(merged.named_modules())
    lora = load_file(adapter_dir / "adapter_model.safetensors")
    scale = config["lora_alpha"] / config["r"]
    done = []
    with torch.no_grad():
        for key in sorted(k for k in lora if k.endswith(".lora_A.weight")):
            name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            module = modules[name.replace("model.layers.", "language_model.layers.", 1)]
            module.weight += scale * lora[key.replace(".lora_A.", ".lora_B.")] @ lora[key]
            done.append(name)
    layers = merged.config.text_config.num_hidden_layers
    assert len(done) == 7 * layers + 1 and "custom_text_proj" in done

    encoder = encoders["colqwen2_5_adapter"]
    page = _pages()[:1]
    with torch.inference_mode():
        batch = encoder.processor.process_images(page)
        expected_page = merged(**batch)[0][batch["attention_mask"][0].bool()]
        batch = encoder.processor.process_queries(QUESTIONS[:1])
        expected_query = merged(**batch)[0][batch["attention_mask"][0].bool()]
    (got_page,), (got_query,) = encoder.embed_images(page), encoder.embed_queries(QUESTIONS[:1])
    torch.testing.assert_close(got_page, expected_page, atol=1e-4, rtol=0)
    torch.testing.assert_close(got_query, expected_query, atol=1e-4, rtol=0)
    (bare_page,) = encoders["colqwen2_5"].embed_images(page)
    assert (got_page - bare_page).abs().max() > 1e-2


def test_an_adapter_only_model_identity_covers_its_base(models, tmp_path):
    """An index records the model's identity: retraining the base under an unchanged adapter
    directory must change it (the vectors change)."""
    import shutil

    from retriever.encoder import model_identity

    adapter, base = tmp_path / "adapter", tmp_path / "base"
    shutil.copytree(models["colqwen2_5_adapter"], adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    shutil.copytree(config["base_model_name_or_path"], base)
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(base)}))
    before = model_identity(str(adapter))
    assert model_identity(str(adapter)) == before
    with (base / "model.safetensors").open("r+b") as f:  # one weight byte of the base changes
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    assert model_identity(str(adapter)) != before


def test_gme_formats_inputs_with_its_instructions_and_pools_the_last_token(encoders, models):
    """Queries carry the retrieval instruction and pages the default one, in GME's chat format;
    the vector is the last real token's hidden state under sequential positions, the same whether
    the input is embedded alone or beside a longer one (right padding)."""
    from transformers import Qwen2VLForConditionalGeneration

    encoder = encoders["gme"]
    tokenizer = encoder.processor.processor.tokenizer
    query = "Who signed the letter?"
    expected_text = ("<|im_start|>system\nFind a screenshot that relevant to the user's question.<|im_end|>\n"
                     f"<|im_start|>user\n{query}<|im_end|>\n<|im_start|>assistant\n<|endoftext|>")
    batch = encoder.processor.process_queries([query])
    assert tokenizer.decode(batch["input_ids"][0]) == expected_text
    page_text = tokenizer.decode(encoder.processor.process_images(_pages()[:1])["input_ids"][0])
    assert page_text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                                "<|vision_start|><|image_pad|>")
    assert page_text.endswith("<|image_pad|><|vision_end|><|im_end|>\n<|im_start|>assistant\n<|endoftext|>")

    backbone = Qwen2VLForConditionalGeneration.from_pretrained(models["gme"], dtype=torch.float32).model.eval()
    ids = torch.tensor([tokenizer(expected_text)["input_ids"]])
    with torch.inference_mode():
        hidden = backbone(input_ids=ids, attention_mask=torch.ones_like(ids),
                          position_ids=torch.arange(ids.shape[1])[None]).last_hidden_state
    expected = torch.nn.functional.normalize(hidden[0, -1], dim=0)
    alone, beside_a_longer_one = encoder.embed_queries([query]), encoder.embed_queries([query, query + " " + "word " * 20])
    torch.testing.assert_close(alone[0][0], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(beside_a_longer_one[0], alone[0], atol=1e-5, rtol=0)

    # a page: sequential positions over the image tokens too, not Qwen2-VL's 3-D ones (which differ there)
    page = _pages()[1]
    page_text = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                 "<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n<|im_start|>assistant\n<|endoftext|>")
    inputs = encoder.processor.processor(text=[page_text], images=[page], return_tensors="pt")
    with torch.inference_mode():
        sequential, multimodal = (
            torch.nn.functional.normalize(backbone(**inputs, position_ids=positions).last_hidden_state[0, -1], dim=0)
            for positions in (torch.arange(inputs["input_ids"].shape[1])[None], None))
    (got,) = encoder.embed_images([page])
    torch.testing.assert_close(got[0], sequential, atol=1e-5, rtol=0)
    assert (sequential - multimodal).abs().max() > 1e-4  # 10x the tolerance above: the check tells them apart
    # page resolution: the bounds the checkpoint's config.json gives (the tiny build's 4..256 tokens),
    # the upper one lowered by retriever.max_visual_tokens
    assert (encoder.settings()["min_pixels"], encoder.settings()["max_pixels"]) == (4 * 28 * 28, 256 * 28 * 28)
    capped = PageEncoder(str(models["gme"]), max_visual_tokens=16)
    assert (capped.settings()["min_pixels"], capped.settings()["max_pixels"]) == (4 * 28 * 28, 16 * 28 * 28)
    grid = capped.processor.process_images([Image.new("RGB", (560, 560), "white")])["image_grid_thw"][0]
    assert int(grid.prod()) // 4 <= 16


@pytest.mark.ray
def test_a_single_vector_family_through_the_retriever_group_on_ray(ray_cluster, tmp_path):
    """The path of `docrl index/search/retrieval-eval`, training with retrieval and Serve's
    retriever: `retriever.model: tiny-gme` resolved and loaded by a retriever actor, the pages
    streamed into segments, the index reloaded and searched across two shards. (`docrl index` +
    `docrl search` as subprocesses were measured at two minutes here, two Ray starts: too slow for
    the suite, and the command line adds nothing family-specific.)"""
    from docvqa.tiny_models import resolve_model
    from retriever.config import RetrieverConfig
    from retriever.group import RetrieverGroup
    from retriever.ingest import ingest_folder

    folder = tmp_path / "scans"
    folder.mkdir()
    for i, image in enumerate(_pages()):
        image.save(folder / f"page{i}.png")
    pages = ingest_folder(folder).pages
    model = resolve_model("tiny-gme", "retriever", tmp_path / "models")
    group = RetrieverGroup(model, RetrieverConfig(model=model, num_actors=1, num_cpus_per_actor=0.5, segment_pages=3))
    try:
        report = group.build(pages, tmp_path / "index")
        results = group.search(QUESTIONS, k=len(pages))
    finally:
        group.shutdown()
    assert report["indexed"] == len(pages)

    index = load_index(tmp_path / "index")
    assert index.settings["family"] == "gme" and index.settings["single_vector"] is True
    assert all(v.shape[0] == 1 for v in index.vectors)
    assert not any("pooled" in map_segment(f) for f in (tmp_path / "index").glob("segment-*.safetensors"))
    queries = torch.cat(PageEncoder(model).embed_queries(QUESTIONS))
    scores = queries @ torch.cat(list(index.vectors)).T
    for row, result in zip(scores.tolist(), results):
        expected = sorted(range(len(index)), key=lambda j: (-row[j], j))
        assert [pid for pid, _ in result] == [index.page_ids[j] for j in expected]
        torch.testing.assert_close(torch.tensor([s for _, s in result]), torch.tensor([row[j] for j in expected]),
                                   atol=1e-5, rtol=0)

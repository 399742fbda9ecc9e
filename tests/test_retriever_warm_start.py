"""The retriever's contrastive warm start (retriever/finetune.py): its negatives, and that it
teaches the tiny random ColQwen2 which page of a sections-level document a question names, with
the settings of configs/tiny-retrieval.yaml."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from cluster.config import load_config
from docvqa.sample import DocVQASample
from retriever.finetune import negative_pages

ROOT = Path(__file__).resolve().parents[1]


def _sample(doc: str, page: str) -> DocVQASample:
    return DocVQASample(question_id="q", question="?", answers=("a",), doc_id=doc, gold_page=page, doc_pages=(page,))


def test_negatives_are_the_documents_other_pages_first_then_other_documents():
    by_doc = {"a": ["a/p1", "a/p2", "a/p3"], "b": ["b/p1"], "c": ["c/p1", "c/p2"]}
    every = [p for pages in by_doc.values() for p in pages]
    rng = random.Random(0)
    for _ in range(20):
        two = negative_pages(_sample("a", "a/p2"), by_doc, every, 2, rng)
        assert sorted(two) == ["a/p1", "a/p3"]
        four = negative_pages(_sample("a", "a/p2"), by_doc, every, 4, rng)
        assert sorted(four[:2]) == ["a/p1", "a/p3"] and len(set(four)) == 4 and "a/p2" not in four
        assert all(p.split("/")[0] != "a" for p in four[2:])
    with pytest.raises(ValueError, match="need at least 7 pages, the corpus has 6"):
        negative_pages(_sample("b", "b/p1"), by_doc, every, 6, rng)


def test_a_run_searches_with_its_warm_started_retriever_once_written(tmp_path):
    """`docrl index/search/retrieval-eval/serve` on a run's config use the retriever the run
    trained (its index refuses any other), and `retriever.model` before it exists or without a
    warm start."""
    from retriever.config import RetrieverConfig
    from retriever.finetune import RUN_SUBDIR, SUMMARY_FILE, run_retriever

    warm = RetrieverConfig(model="vidore/colqwen2-v1.0", warm_start={"steps": 5})
    assert run_retriever(warm, tmp_path, tmp_path / "models") == "vidore/colqwen2-v1.0"  # not trained yet
    (tmp_path / RUN_SUBDIR).mkdir(parents=True)
    assert run_retriever(warm, tmp_path, tmp_path / "models") == "vidore/colqwen2-v1.0"  # half written
    (tmp_path / RUN_SUBDIR / SUMMARY_FILE).write_text("{}")
    assert run_retriever(warm, tmp_path, tmp_path / "models") == str(tmp_path / RUN_SUBDIR)
    plain = RetrieverConfig(model="vidore/colqwen2-v1.0")
    assert run_retriever(plain, tmp_path, tmp_path / "models") == "vidore/colqwen2-v1.0"


@pytest.mark.slow
def test_warm_start_teaches_the_tiny_retriever_which_page_a_question_names(tiny_models, tmp_path):
    from docvqa.data import load_train_eval
    from retriever.encoder import PageEncoder
    from retriever.finetune import SUMMARY_FILE, finetune_retriever, recall_at_1

    cfg = load_config(ROOT / "configs" / "tiny-retrieval.yaml", ["data.synthetic.num_documents=60"])
    assert cfg.retriever.scope == "document"
    train, held_out, corpus = load_train_eval(cfg.data, tmp_path)
    train_docs = {s.doc_id for s in train.samples}
    pages = {pid: p for pid, p in corpus.pages.items() if p.doc_id in train_docs}
    eval_pages = {pid: p for pid, p in corpus.pages.items() if p.doc_id not in train_docs}
    out = tmp_path / "retriever"
    summary = finetune_retriever(str(tiny_models["retriever"]), str(out), train.samples, pages, cfg.retriever.warm_start,
                                 scope="document", seed=0, eval_samples=held_out.samples, eval_pages=eval_pages)
    assert len(held_out.samples) == 24  # 12 held-out documents of 4 pages, 2 questions each
    # chance within a 4-page document is 0.25
    assert summary["eval_recall@1_before"] <= 0.5, summary
    assert summary["eval_recall@1_after"] >= 0.8, summary
    assert summary["loss_last"] < 0.6 * summary["loss_first"], summary
    assert (out / SUMMARY_FILE).exists()
    # the written model is a complete retriever of the same family, and searches as measured
    encoder = PageEncoder(str(out))
    assert encoder.family == "colqwen2"
    assert recall_at_1(encoder, held_out.samples, eval_pages, "document") == summary["eval_recall@1_after"]


def test_an_adapter_only_retriever_is_merged_trained_and_written_whole(tmp_path):
    """Hub ColQwen retrievers ship as a LoRA adapter over a base directory. transformers saves an
    adapter-loaded model as the adapter alone, which would drop the trained token embeddings: the
    warm start folds the adapter into the base first (the same vectors), and writes a complete
    model whose embeddings are the trained ones."""
    import torch
    from safetensors import safe_open

    from docvqa.data import load_train_eval
    from docvqa.tiny_models import build_retriever
    from retriever.config import RetrieverWarmStartConfig
    from retriever.encoder import PageEncoder
    from retriever.finetune import _load_trainable, finetune_retriever, merge_adapter

    adapter = build_retriever(tmp_path / "adapter", family="colqwen2_5_adapter")
    cfg = load_config(ROOT / "configs" / "tiny-retrieval.yaml", ["data.synthetic.num_documents=6"])
    train, held_out, corpus = load_train_eval(cfg.data, tmp_path / "data")
    images = [p.load_image() for p in list(corpus.pages.values())[:2]]
    questions = [s.question for s in train.samples[:2]]

    reference = PageEncoder(str(adapter))
    model, processor = _load_trainable(str(adapter), "colqwen2_5", torch.device("cpu"))
    assert merge_adapter(model) == 0  # already merged: no LoRA layer is left
    assert not any("lora" in name for name, _ in model.named_parameters())
    with torch.inference_mode():
        model.eval()
        for batch, expected in ((processor.process_images(images), reference.embed_images(images)),
                                (processor.process_queries(questions), reference.embed_queries(questions))):
            out = model(**batch)
            for row, mask, want in zip(out, batch["attention_mask"].bool(), expected):
                torch.testing.assert_close(row[mask], want, atol=1e-4, rtol=0)

    settings = RetrieverWarmStartConfig(steps=2, batch_size=2, negatives=3, learning_rate=1e-2, trainable="embeddings")
    out = tmp_path / "trained"
    finetune_retriever(str(adapter), str(out), train.samples, corpus.pages, settings, scope="document")
    names = {f.name for f in out.iterdir()}
    assert {"config.json", "model.safetensors"} <= names and "adapter_config.json" not in names, names
    base = Path(json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"])

    def embeddings(directory: Path) -> torch.Tensor:
        with safe_open(directory / "model.safetensors", "pt") as f:
            (key,) = [k for k in f.keys() if k.endswith("embed_tokens.weight")]
            return f.get_tensor(key)

    assert (embeddings(out) - embeddings(base)).abs().max() > 1e-3  # the trained embeddings were written
    trained = PageEncoder(str(out))
    assert trained.family == "colqwen2_5"
    assert (trained.embed_queries(questions[:1])[0] - reference.embed_queries(questions[:1])[0]).abs().max() > 1e-3

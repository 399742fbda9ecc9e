"""Page index persistence, ingestion, ranking metrics, and the sharded retriever group on Ray."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from retriever.index import (IndexLoadError, PageIndex, compact_index, load_index, read_manifest, save_index)
from retriever.metrics import hit_at_k, ndcg_at_k, reciprocal_rank, retrieval_report

SETTINGS = {"model": "m", "family": "colqwen2", "dim": 8, "max_pixels": 100, "min_pixels": 10}


def _random_index(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    index = PageIndex(SETTINGS)
    vecs = [torch.nn.functional.normalize(torch.randn(int(torch.randint(3, 9, (1,), generator=g)), 8, generator=g), dim=-1)
            for _ in range(n)]
    index.add([f"d{i // 3}/p{i % 3 + 1}" for i in range(n)], vecs, [{"doc_id": f"d{i // 3}", "page_no": i % 3 + 1} for i in range(n)])
    return index


def _queries(seed=1, n=5):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=-1) for _ in range(n)]


def test_persistence_round_trip_gives_identical_search(tmp_path):
    index = _random_index()
    save_index(index, tmp_path / "idx")
    loaded = load_index(tmp_path / "idx")
    assert loaded.page_ids == index.page_ids and loaded.meta == index.meta and loaded.settings == SETTINGS
    for a, b in zip(index.vectors, loaded.vectors):
        assert torch.equal(a, b)
    assert loaded.search(_queries(), k=4) == index.search(_queries(), k=4)
    with pytest.raises(FileExistsError):
        save_index(index, tmp_path / "idx")


def test_k_larger_than_corpus_returns_corpus_and_bad_input_is_refused():
    index = _random_index(n=5)
    (res,) = index.search(_queries(n=1), k=50)
    assert sorted(p for p, _ in res) == sorted(index.page_ids)
    assert [s for _, s in res] == sorted((s for _, s in res), reverse=True)
    with pytest.raises(ValueError, match="already in the index"):
        index.add(["d0/p1"], [torch.ones(2, 8)])
    with pytest.raises(ValueError, match="at least one token"):
        index.add(["new"], [torch.ones(0, 8)])
    with pytest.raises(ValueError, match="dim 4 != index dim 8"):
        index.add(["new"], [torch.ones(2, 4)])


def _maxsim(query, page) -> float:
    """Straightforward MaxSim: for each query token its best page token's dot product, summed."""
    return sum(max(float(q @ t) for t in page) for q in query)


def test_search_among_candidates_scores_only_them_exactly():
    index = _random_index(n=12)
    index.delete(["d1/p2"])  # positions shift after a delete
    queries = _queries(n=3)
    candidates = [["d2/p3", "d0/p1", "d2/p1"], ["d1/p1", "d1/p2", "d1/p3", "elsewhere/p9"], []]
    got = index.search(queries, k=2, candidates=candidates)
    vectors = dict(zip(index.page_ids, index.vectors))
    for query, ids, hits in zip(queries, candidates, got):
        held = [pid for pid in ids if pid in vectors]  # d1/p2 was deleted, elsewhere/p9 never existed
        expected = sorted(((pid, _maxsim(query, vectors[pid])) for pid in held), key=lambda x: -x[1])[:2]
        assert [pid for pid, _ in hits] == [pid for pid, _ in expected]
        assert [s for _, s in hits] == pytest.approx([s for _, s in expected], abs=1e-5)
    assert got[2] == []
    # k above the candidates gives them all; ties break by page order, as a search of every page does
    twin = PageIndex(SETTINGS)
    v = torch.nn.functional.normalize(torch.ones(2, 8), dim=-1)
    twin.add(["a/p1", "a/p2", "a/p3"], [v, v, -v])
    assert [p for p, _ in twin.search([v], k=5, candidates=[["a/p3", "a/p2", "a/p1"]])[0]] == ["a/p1", "a/p2", "a/p3"]
    with pytest.raises(ValueError, match="2 candidate lists for 1 queries"):
        twin.search([v], k=1, candidates=[["a/p1"], ["a/p2"]])


def test_shard_loading_and_compaction(tmp_path):
    index = _random_index()
    save_index(index, tmp_path / "idx")
    shard = load_index(tmp_path / "idx", page_range=(4, 9))
    assert shard.page_ids == index.page_ids[4:9]
    compact_index(tmp_path / "idx")
    assert len(read_manifest(tmp_path / "idx").segments) == 1
    assert load_index(tmp_path / "idx").page_ids == index.page_ids


def test_missing_pieces_and_other_model_are_refused(tmp_path):
    index = _random_index()
    save_index(index, tmp_path / "idx")
    with pytest.raises(IndexLoadError, match="manifest.json is missing"):
        load_index(tmp_path)
    (tmp_path / "idx" / "segment-00000.safetensors").unlink()
    with pytest.raises(IndexLoadError, match="missing pieces: segment file segment-00000.safetensors"):
        load_index(tmp_path / "idx")
    with pytest.raises(IndexLoadError, match=r"other embedding settings.*model: index 'm' vs encoder 'other'"):
        index.check_compatible({**SETTINGS, "model": "other"})  # an index that records no model identity


def test_model_identity_is_what_the_files_are_not_where_they_lie(tiny_models, tmp_path):
    """Before, an index built with artifacts/tiny-models/retriever refused the same files given by
    another path."""
    import shutil

    from retriever.encoder import model_identity

    here = tiny_models["retriever"]
    there = shutil.copytree(here, tmp_path / "elsewhere" / "retriever")
    assert model_identity(str(here)) == model_identity(str(there))
    index = PageIndex({**SETTINGS, "model": str(here), "model_identity": model_identity(str(here))})
    index.check_compatible({**SETTINGS, "model": str(there), "model_identity": model_identity(str(there))})
    config = there / "config.json"
    config.write_text(config.read_text() + " ")  # one byte more: another model
    with pytest.raises(IndexLoadError, match=r"model_identity: index '[0-9a-f]{64}' vs encoder '[0-9a-f]{64}'"):
        index.check_compatible({**SETTINGS, "model": str(there), "model_identity": model_identity(str(there))})
    assert model_identity("not-a-dir/nor-a-cached-hub-id") == "not-a-dir/nor-a-cached-hub-id"


def test_ranking_metrics_hand_worked():
    retrieved = ["a", "b", "c", "d"]
    assert hit_at_k(retrieved, "c", 2) == 0.0 and hit_at_k(retrieved, "c", 3) == 1.0
    assert reciprocal_rank(retrieved, "c") == pytest.approx(1 / 3)
    assert reciprocal_rank(retrieved, "z") == 0.0
    # one relevant page at rank 3: DCG = 1/log2(4) = 0.5, ideal DCG = 1
    assert ndcg_at_k(retrieved, "c", 5) == pytest.approx(0.5)
    assert ndcg_at_k(retrieved, "c", 2) == 0.0
    report = retrieval_report([retrieved, ["c"]], ["c", "c"], ks=(1, 3))
    assert report["recall@1"] == 0.5 and report["recall@3"] == 1.0
    assert report["mrr"] == pytest.approx((1 / 3 + 1) / 2)
    assert report["ndcg@3"] == pytest.approx((0.5 + 1) / 2)
    # the straightforward definition, recomputed
    ndcg = sum(1 / math.log2(r + 1) for r, p in enumerate(retrieved[:4], 1) if p in {"b", "d"}) / (1 + 1 / math.log2(3))
    assert ndcg_at_k(retrieved, {"b", "d"}, 4) == pytest.approx(ndcg)


def test_folder_ingestion_renders_pdfs_and_skips_corrupt_files(tmp_path):
    from docvqa.synthetic import generate_pdf
    from retriever.ingest import ingest_folder

    pages = [Image.new("RGB", (200, 260), c) for c in ("white", "gray", "black")]
    (tmp_path / "docs" / "sub").mkdir(parents=True)
    generate_pdf(tmp_path / "docs" / "report.pdf", pages)
    pages[0].save(tmp_path / "docs" / "sub" / "scan.png")
    (tmp_path / "docs" / "broken.pdf").write_bytes(b"%PDF-1.4 garbage")
    (tmp_path / "docs" / "broken.png").write_bytes(b"garbage")
    (tmp_path / "docs" / "notes.txt").write_text("ignored")
    report = ingest_folder(tmp_path / "docs")
    assert [p.page_id for p in report.pages] == ["report/p1", "report/p2", "report/p3", "sub/scan/p1"]
    # PDF pages are references, rendered one at a time when loaded (at PDF_DPI = 144: 2x the points)
    assert [(p.pdf_page, p.image_bytes) for p in report.pages[:3]] == [(1, None), (2, None), (3, None)]
    assert report.pages[1].source == f"{tmp_path / 'docs' / 'report.pdf'}#page=2"
    assert report.pages[1].load_image().size == (400, 520)
    assert report.pages[2].load_image().getpixel((5, 5)) == (0, 0, 0)
    assert len(report.skipped) == 2 and any("broken.pdf" in s for s in report.skipped)
    assert any("broken.png" in s for s in report.skipped)


def test_pdf_bombs_are_refused_by_name_without_rendering(tmp_path, monkeypatch):
    """A page whose size would render to more pixels than PIL's decompression-bomb limit, and a PDF
    with more pages than retriever.ingest.MAX_PDF_PAGES: refused naming the file (and the page),
    before any pixel is allocated."""
    import pypdfium2 as pdfium

    import retriever.ingest
    from docvqa.sample import render_pdf_page
    from retriever.ingest import ingest_folder

    (tmp_path / "docs").mkdir()
    huge = pdfium.PdfDocument.new()
    huge.new_page(612, 792)
    huge.new_page(14400, 14400)  # 200 x 200 inches: 28,800 x 28,800 pixels at 144 dpi
    huge.save(tmp_path / "docs" / "huge.pdf")
    many = pdfium.PdfDocument.new()
    for _ in range(5):
        many.new_page(612, 792)
    many.save(tmp_path / "docs" / "many.pdf")

    assert render_pdf_page(tmp_path / "docs" / "huge.pdf", 1).size == (1224, 1584)
    with pytest.raises(ValueError, match=r"page 2 is 200x200 inches: 28800x28800 pixels at 144 dpi exceed"):
        render_pdf_page(tmp_path / "docs" / "huge.pdf", 2)

    monkeypatch.setattr(retriever.ingest, "MAX_PDF_PAGES", 4)
    report = ingest_folder(tmp_path / "docs")
    assert [p.page_id for p in report.pages] == ["huge/p1", "huge/p2"]  # page 2 is refused when it is rendered
    assert report.skipped == [f"{tmp_path / 'docs' / 'many.pdf'}: 5 pages exceed the limit of 4 per PDF "
                              f"(retriever.ingest.MAX_PDF_PAGES); split it"]
    with pytest.raises(OSError, match="huge.pdf#page=2"):
        report.pages[1].load_image()


def _assert_same_ranking(got, expected):
    """Same pages in the same order; scores equal up to float32 GEMM rounding (query batches and
    chunk shapes may differ between groups, see retriever/maxsim.py)."""
    assert [[p for p, _ in r] for r in got] == [[p for p, _ in r] for r in expected]
    torch.testing.assert_close(torch.tensor([[s for _, s in r] for r in got]),
                               torch.tensor([[s for _, s in r] for r in expected]), atol=1e-5, rtol=0)


@pytest.mark.ray
def test_sharded_group_equals_single_actor_and_persists(ray_cluster, tiny_models, synthetic_corpus, tmp_path):
    from docvqa.loaders import load_docvqa_json
    from docvqa.sample import Page
    from retriever.config import RetrieverConfig
    from retriever.group import RetrieverGroup

    ds = load_docvqa_json(synthetic_corpus / "train_v1.0.json")
    pages = list(ds.pages.values())
    questions = [s.question for s in ds.samples[:6]]
    bad = Page("bad/p1", "bad", 1, image_path=str(tmp_path / "nope.png"))

    single = RetrieverGroup(str(tiny_models["retriever"]), RetrieverConfig(num_actors=1, embed_batch_size=4, num_cpus_per_actor=0.5))
    report = single.build(pages + [bad], tmp_path / "idx")
    assert report["indexed"] == len(pages) and report["skipped"] == [f"bad/p1: page bad/p1: cannot read image {tmp_path / 'nope.png'}: "
                                                                     f"[Errno 2] No such file or directory: '{tmp_path / 'nope.png'}'"]
    expected = single.search(questions, k=3)
    assert all(len(r) == 3 for r in expected)
    assert all(p in ds.pages for r in expected for p, _ in r)

    sharded = RetrieverGroup(str(tiny_models["retriever"]), RetrieverConfig(num_actors=3, query_batch_size=4, num_cpus_per_actor=0.5))
    assert sharded.load(tmp_path / "idx") == len(pages)
    assert sharded.shard_sizes == [len(pages) // 3 + (i < len(pages) % 3) for i in range(3)]
    _assert_same_ranking(sharded.search(questions, k=3), expected)
    everything = sharded.search(questions[:1], k=10_000)[0]
    assert len(everything) == len(pages)
    # a search within each question's document: the shards each score the candidates they hold
    among = [s.doc_pages for s in ds.samples[:6]]
    within = sharded.search(questions, k=2, candidates=among)
    assert all(pid in docs for hits, docs in zip(within, among) for pid, _ in hits)
    assert [len(h) for h in within] == [min(2, len(d)) for d in among]
    _assert_same_ranking(within, single.search(questions, k=2, candidates=among))
    single.shutdown()

    # incremental add and delete persist; a reload sees the same corpus
    removed = sharded.delete([pages[0].page_id, "not/there"])
    assert removed == [pages[0].page_id]
    sharded.add([pages[0]])
    before = sharded.search(questions, k=2)
    assert sharded.load(tmp_path / "idx") == len(pages)  # from disk again, re-sharded
    _assert_same_ranking(sharded.search(questions, k=2), before)
    with pytest.raises(ValueError, match="query #1 is empty"):
        sharded.search(["fine", ""], k=1)

    # an actor that dies (killed, out of memory) is replaced and the shards reloaded from the saved
    # index; the search answers as before. (Before: the search failed with Ray's ActorDiedError.)
    ray_cluster.kill(sharded.actors[1], no_restart=True)
    _assert_same_ranking(sharded.search(questions, k=2), before)
    assert sharded.restarts == 1 and sharded.shard_sizes[1] > 0
    sharded.shutdown()

    # an index held only in memory cannot be restored: the error names the shard and why
    in_memory = RetrieverGroup(str(tiny_models["retriever"]), RetrieverConfig(num_actors=1, num_cpus_per_actor=0.5))
    in_memory.add(pages[:2])
    ray_cluster.kill(in_memory.actors[0], no_restart=True)
    from retriever.group import RetrieverShardLost

    with pytest.raises(RetrieverShardLost, match=r"shard 0 of 1 \(2 pages\) lost its actor while searching 6 queries.*"
                                                 r"in memory only"):
        in_memory.search(questions, k=1)
    in_memory.shutdown()


def test_delete_then_readd_lives_in_the_new_segment_only(tmp_path):
    from retriever.index import next_segment_name, write_manifest, write_segment

    index = _random_index(n=4)
    save_index(index, tmp_path / "idx")
    manifest = read_manifest(tmp_path / "idx")
    manifest.delete({"d0/p1"})
    new_vec = torch.ones(2, 8) / math.sqrt(8)
    seg = write_segment(tmp_path / "idx", next_segment_name(tmp_path / "idx"), ["d0/p1"], [new_vec])
    manifest.add_segment(seg, {"d0/p1": {"doc_id": "d0", "page_no": 1}})
    write_manifest(tmp_path / "idx", manifest)
    loaded = load_index(tmp_path / "idx")
    assert loaded.page_ids == index.page_ids[1:] + ["d0/p1"]
    assert torch.equal(loaded.vectors[-1], new_vec)


def test_retriever_checkpoint_shipped_as_lora_adapter_loads(tiny_models, tmp_path):
    """Hub retrievers such as vidore/colqwen2-v1.0 ship as a LoRA adapter over a base model: the
    encoder resolves the family through the base and applies the adapter."""
    import shutil

    from colpali_engine.models import ColQwen2
    from peft import LoraConfig, get_peft_model

    from retriever.encoder import PageEncoder

    base_dir = tiny_models["retriever"]
    model = ColQwen2.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=r".*language_model.*(q_proj|v_proj)$"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    peft_model.save_pretrained(tmp_path / "adapter")
    for f in ("tokenizer.json", "tokenizer_config.json", "processor_config.json", "chat_template.jinja"):
        shutil.copy(base_dir / f, tmp_path / "adapter" / f)

    adapted, base = PageEncoder(str(tmp_path / "adapter")), PageEncoder(str(base_dir))
    assert adapted.family == "colqwen2"
    image = Image.new("RGB", (224, 280), "white")
    (a,), (b,) = adapted.embed_images([image]), base.embed_images([image])
    with torch.no_grad():
        batch = adapted.processor.process_images([image])
        expected = peft_model.eval()(**batch)[0][batch["attention_mask"][0].bool()]
    torch.testing.assert_close(a, expected, atol=1e-5, rtol=0)
    assert (a - b).abs().max() > 1e-2  # the adapter is really applied


def test_bf16_search_reranks_a_shortlist_to_the_fp32_ranking():
    """bf16 rounding swaps near-tied pages; the index re-scores each query's shortlist in fp32, so
    its bf16 search returns fp32's pages, order and scores."""
    g = torch.Generator().manual_seed(0)
    index = PageIndex(SETTINGS)
    # 200 pages that all nearly tie: a shared component plus tiny page-specific noise
    common = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1)
    vecs = [torch.nn.functional.normalize(common + 0.05 * torch.randn(6, 8, generator=g), dim=-1) for _ in range(200)]
    index.add([f"p{i}" for i in range(200)], vecs)
    queries = [torch.nn.functional.normalize(common[:3] + 0.1 * torch.randn(3, 8, generator=g), dim=-1) for _ in range(6)]
    exact = index.search(queries, k=5, dtype=torch.float32)
    fast = index.search(queries, k=5, dtype=torch.bfloat16)
    assert [[p for p, _ in r] for r in fast] == [[p for p, _ in r] for r in exact]
    torch.testing.assert_close(torch.tensor([[s for _, s in r] for r in fast]),
                               torch.tensor([[s for _, s in r] for r in exact]), atol=1e-6, rtol=0)
    # without the re-rank, bf16 alone gets this ranking wrong
    from retriever.maxsim import maxsim_scores, prepare_pages, topk_pages

    raw = topk_pages(maxsim_scores(queries, None, prepare_pages(vecs, dtype=torch.bfloat16), None), index.page_ids, 5)
    assert [[p for p, _ in r] for r in raw] != [[p for p, _ in r] for r in exact]


def test_an_index_of_a_changed_corpus_is_rebuilt_when_owned_and_refused_otherwise(ray_cluster, tiny_models,
                                                                                    synthetic_corpus, tmp_path, caplog):
    """A run's own index is rebuilt when the corpus changed (other pages, or the same ids with new
    images); a user's index that does not match the corpus is refused with the difference named.
    Before, an existing index was loaded whatever the corpus, and retrieval returned page ids
    missing from it (KeyError in the trainer)."""
    import os
    import shutil

    from docvqa.loaders import load_docvqa_json
    from retriever.config import RetrieverConfig
    from retriever.group import RetrieverGroup

    pages = sorted(load_docvqa_json(synthetic_corpus / "train_v1.0.json").pages.values(), key=lambda p: p.page_id)
    for p in pages:  # private copies: the test changes their files
        shutil.copy2(p.image_path, tmp_path / os.path.basename(p.image_path))
    pages = [type(p)(p.page_id, p.doc_id, p.page_no, image_path=str(tmp_path / os.path.basename(p.image_path))) for p in pages]
    group = RetrieverGroup(str(tiny_models["retriever"]), RetrieverConfig(num_actors=1, num_cpus_per_actor=0.5))
    try:
        index = tmp_path / "index"
        group.open(pages[:-1], index, owned=True)
        assert len(group) == len(pages) - 1
        first_manifest = (index / "manifest.json").read_text()
        group.open(pages[:-1], index, owned=True)  # unchanged: loaded, not rebuilt
        assert (index / "manifest.json").read_text() == first_manifest

        with pytest.raises(IndexLoadError, match=rf"0 indexed pages are not in the corpus .* 1 corpus pages are not "
                                                 rf"indexed \(e.g. \['{pages[-1].page_id}'\]\)"):
            group.open(pages, index, owned=False)
        with caplog.at_level("WARNING", logger="retriever.group"):
            group.open(pages, index, owned=True)
        assert "rebuilding the page index" in caplog.text and len(group) == len(pages)
        assert {p for p, _ in group.search(["total"], k=100)[0]} == {p.page_id for p in pages}

        os.utime(pages[0].image_path, ns=(1, 1))  # same ids, a re-rendered image
        with pytest.raises(IndexLoadError, match="the images of the corpus pages changed"):
            group.open(pages, index, owned=False)
    finally:
        group.shutdown()


@pytest.mark.ray
def test_streaming_build_resumes_after_an_interruption_and_indexes_pdfs_page_by_page(ray_cluster, tiny_models,
                                                                                      synthetic_corpus, tmp_path):
    """A build stopped after its first segments (an exception from the progress hook, as a crash
    between segments would) resumes from the journal: the finished segments are not embedded again
    and the index equals one built in one go. Another corpus is refused while the journal is
    there. PDF pages are references until an actor renders them, and Serve reads them by file."""
    from deploy.pages import PageStore
    from docvqa.loaders import load_docvqa_json
    from docvqa.synthetic import generate_pdf
    from retriever.config import RetrieverConfig
    from retriever.group import RetrieverGroup
    from retriever.index import read_journal
    from retriever.ingest import ingest_folder

    (tmp_path / "docs").mkdir()
    generate_pdf(tmp_path / "docs" / "report.pdf", [Image.new("RGB", (200, 260), c) for c in ("white", "gray", "black")])
    pdf_pages = ingest_folder(tmp_path / "docs").pages
    pages = sorted(load_docvqa_json(synthetic_corpus / "train_v1.0.json").pages.values(), key=lambda p: p.page_id)
    pages = pages + pdf_pages
    questions = ["What is the total?", "Who signed the letter?", "invoice date"]
    group = RetrieverGroup(str(tiny_models["retriever"]), RetrieverConfig(num_actors=1, num_cpus_per_actor=0.5,
                                                                          segment_pages=2))
    try:
        group.build(pages, tmp_path / "whole")
        expected = group.search(questions, k=5)
        assert len(group) == len(pages)

        calls = []

        def stop_after_two(done, total):
            calls.append(done)
            if len(calls) == 2:
                raise RuntimeError("simulated crash between segments")

        with pytest.raises(RuntimeError, match="simulated crash"):
            group.build(pages, tmp_path / "idx", progress=stop_after_two)
        header, done = read_journal(tmp_path / "idx")
        assert header["segment_pages"] == 2 and 2 <= len(done) < -(-len(pages) // 2)
        assert not (tmp_path / "idx" / "manifest.json").exists()
        finished = {b for b, r in done.items() if r["segment"]}
        with pytest.raises(IndexLoadError, match=r"interrupted index build of another corpus or model \(the pages"):
            group.build(pages[1:], tmp_path / "idx")

        calls.clear()
        report = group.build(pages, tmp_path / "idx", progress=lambda done, total: calls.append(done))
        assert report["resumed"] == 2 * len(finished) and report["indexed"] == len(pages)
        # only the rest was embedded: the first batch finished now brings the count past the resumed ones
        assert calls[0] == min(len(pages), 2 * (len(finished) + 1)) and calls[-1] == len(pages)
        assert not (tmp_path / "idx" / "ingest.jsonl").exists()
        _assert_same_ranking(group.search(questions, k=5), expected)
        assert read_manifest(tmp_path / "idx").segments == read_manifest(tmp_path / "whole").segments
    finally:
        group.shutdown()

    manifest = read_manifest(tmp_path / "idx")
    assert manifest.pages["report/p2"]["source"] == f"{tmp_path / 'docs' / 'report.pdf'}#page=2"
    store = PageStore.from_index(tmp_path / "idx")
    assert store.load("report/p3").load_image().getpixel((5, 5)) == (0, 0, 0)

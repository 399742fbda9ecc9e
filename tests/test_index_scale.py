"""The index at scale: memory-mapped segments, token pooling and two-stage search, build journal,
on-demand page images in Serve. (Resuming an interrupted build through Ray: tests/test_retriever.py.)"""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image

from retriever.index import (
    IndexLoadError,
    Manifest,
    PageIndex,
    compact_index,
    load_index,
    read_journal,
    read_manifest,
    write_journal,
    write_manifest,
    write_segment,
)
from retriever.pooling import Pooling

SETTINGS = {"model": "m", "family": "colqwen2", "dim": 16, "max_pixels": 100, "min_pixels": 10}


def _unit(*shape, gen):
    return torch.nn.functional.normalize(torch.randn(*shape, generator=gen), dim=-1)


def _random_pages(n, gen, lengths=(3, 40)):
    return [_unit(int(torch.randint(*lengths, (1,), generator=gen)), 16, gen=gen) for _ in range(n)]


def _ids(results):
    return [[pid for pid, _ in r] for r in results]


def _write_index(directory, vectors, per_segment, dtype="float32", pooled=4):
    """An index of `vectors` written as segments of `per_segment` pages, as a build writes it."""
    manifest = Manifest(SETTINGS)
    for number, lo in enumerate(range(0, len(vectors), per_segment)):
        ids = [f"d{i}/p1" for i in range(lo, min(lo + per_segment, len(vectors)))]
        entry = write_segment(directory, f"segment-{number:05d}.safetensors", ids, vectors[lo:lo + per_segment],
                              dtype=dtype, pooling=Pooling(max_vectors=pooled))
        manifest.add_segment(entry, {pid: {"doc_id": pid.split("/")[0], "page_no": 1} for pid in ids})
    write_manifest(directory, manifest)
    return manifest


def test_pooling_gives_a_page_as_many_vectors_as_its_distinct_directions():
    """A page whose tokens repeat 3 directions pools to exactly those 3 (so pooled MaxSim equals
    exact MaxSim, computed here independently); the cap and a short page bound the count."""
    from retriever.pooling import Pooling, pool_tokens

    gen = torch.Generator().manual_seed(0)
    directions = _unit(3, 16, gen=gen)
    page = directions[torch.tensor([0, 1, 1, 2, 0, 2, 2, 1, 0, 0, 1, 2])]
    short = _unit(2, 16, gen=gen)
    pooled, kept = pool_tokens([page, short], Pooling(max_vectors=8, similarity=0.5))
    torch.testing.assert_close(kept, short)  # two unrelated tokens: both needed
    assert sorted(map(tuple, pooled.round(decimals=5).tolist())) == sorted(map(tuple, directions.round(decimals=5).tolist()))
    query = _unit(4, 16, gen=gen)
    exact = sum(max(float(q @ t) for t in page) for q in query)
    assert sum(max(float(q @ c) for c in pooled) for q in query) == pytest.approx(exact, abs=1e-5)
    again, _ = pool_tokens([page, short], Pooling(max_vectors=8, similarity=0.5))
    assert torch.equal(again, pooled)  # deterministic
    capped, short_capped = pool_tokens([page, short], Pooling(max_vectors=2, similarity=0.5))
    assert capped.shape == (2, 16) and short_capped.shape == (2, 16)
    fixed, short_fixed = pool_tokens([page, short], Pooling(max_vectors=5, similarity=2.0))  # no early stop
    assert fixed.shape == (5, 16) and short_fixed.shape == (2, 16)
    with pytest.raises(ValueError, match="pooled vectors per page must be >= 1"):
        Pooling(max_vectors=0)


def test_two_stage_equals_exact_when_the_shortlist_covers_the_corpus():
    gen = torch.Generator().manual_seed(1)
    index = PageIndex(SETTINGS, Pooling(max_vectors=4))
    vectors = _random_pages(120, gen)
    index.add([f"d{i}/p1" for i in range(70)], vectors[:70])
    index.add([f"d{i}/p1" for i in range(70, 120)], vectors[70:])  # two blocks
    queries = [_unit(5, 16, gen=gen) for _ in range(6)]
    exact = index.search(queries, k=15)
    two_stage = index.search(queries, k=15, method="two_stage", shortlist=120)
    assert _ids(two_stage) == _ids(exact)
    torch.testing.assert_close(torch.tensor([[s for _, s in r] for r in two_stage]),
                               torch.tensor([[s for _, s in r] for r in exact]), atol=1e-5, rtol=0)
    # k above the shortlist: the shortlist grows to k
    assert _ids(index.search(queries, k=120, method="two_stage", shortlist=5)) == _ids(index.search(queries, k=120))
    with pytest.raises(ValueError, match="search method must be one of"):
        index.search(queries, k=1, method="approximate")


def _clustered_corpus(num_pages, gen, concepts=96, per_page=6, tokens_per_concept=8, noise=0.35):
    """Pages made of a few concepts (a token = its concept's direction + noise), and queries naming
    a few concepts of one page: the structure token pooling relies on (real pages have it:
    background patches, repeated words), unlike uniform random vectors."""
    centers = _unit(concepts, 16, gen=gen)
    pages, topics = [], []
    for _ in range(num_pages):
        chosen = torch.randperm(concepts, generator=gen)[:per_page]
        tokens = centers[chosen.repeat_interleave(tokens_per_concept)]
        pages.append(torch.nn.functional.normalize(tokens + noise * torch.randn(tokens.shape, generator=gen) / 4, dim=-1))
        topics.append(chosen)
    queries = []
    for _ in range(40):
        chosen = topics[int(torch.randint(num_pages, (1,), generator=gen))][:3]
        queries.append(torch.nn.functional.normalize(centers[chosen] + noise * torch.randn(3, 16, generator=gen) / 4, dim=-1))
    return pages, queries


def test_two_stage_recall_on_a_seeded_clustered_corpus():
    """recall@10 of two-stage against exact search, with a shortlist of a tenth of the corpus and
    fewer pooled vectors than a page has concepts (5 for 6: a lossy first stage)."""
    gen = torch.Generator().manual_seed(2)
    pages, queries = _clustered_corpus(600, gen)
    index = PageIndex(SETTINGS, Pooling(max_vectors=5, similarity=2.0))
    index.add([f"d{i}/p1" for i in range(600)], pages)
    exact = _ids(index.search(queries, k=10))
    two_stage = _ids(index.search(queries, k=10, method="two_stage", shortlist=60))
    recall = sum(len(set(a) & set(b)) for a, b in zip(exact, two_stage)) / (10 * len(queries))
    assert recall >= 0.99, recall


def _mapped_files(address: int) -> set[str]:
    """The files mapped at `address` in this process (/proc/self/maps)."""
    found = set()
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if lo <= address < hi and len(parts) > 5:
                found.add(parts[5])
    return found


def test_a_loaded_index_maps_its_segments_and_holds_no_copy(tmp_path):
    gen = torch.Generator().manual_seed(3)
    vectors = _random_pages(50, gen)
    _write_index(tmp_path / "idx", vectors, per_segment=20, dtype="float16")
    index = load_index(tmp_path / "idx")
    assert len(index) == 50 and len(index._blocks) == 3
    for number, block in enumerate(index._blocks):
        assert block.tokens.dtype == torch.float16
        assert _mapped_files(block.tokens.data_ptr()) == {str(tmp_path / "idx" / f"segment-{number:05d}.safetensors")}
    # every page's vectors are a view into its mapped segment: nothing is held twice
    for i in (0, 25, 49):
        page = index.vectors[i]
        assert _mapped_files(page.data_ptr()) == _mapped_files(index._blocks[i // 20].tokens.data_ptr())
        torch.testing.assert_close(page.float(), vectors[i].half().float(), atol=0, rtol=0)
    # a shard maps only the segments of its page range
    shard = load_index(tmp_path / "idx", page_range=(25, 45))
    assert shard.page_ids == [f"d{i}/p1" for i in range(25, 45)] and len(shard._blocks) == 2
    queries = [_unit(4, 16, gen=gen) for _ in range(3)]
    in_memory = PageIndex(SETTINGS)
    in_memory.add([f"d{i}/p1" for i in range(50)], [v.half().float() for v in vectors])
    assert _ids(index.search(queries, k=5)) == _ids(in_memory.search(queries, k=5))
    assert _ids(index.search(queries, k=5, method="two_stage", shortlist=50)) == _ids(in_memory.search(queries, k=5))
    # the pooled first stage was read from the segments (written at build time), into memory
    tokens, offsets = index._blocks[0].pooled
    assert tokens.dtype == torch.float16 and len(offsets) == 21 and tokens.shape[0] <= 20 * 4
    assert not any("segment-" in f for f in _mapped_files(tokens.data_ptr()))


def test_compaction_rewrites_segments_with_deleted_pages_in_place(tmp_path):
    gen = torch.Generator().manual_seed(4)
    vectors = _random_pages(30, gen)
    _write_index(tmp_path / "idx", vectors, per_segment=10, dtype="float16")
    manifest = read_manifest(tmp_path / "idx")
    manifest.delete({"d3/p1", "d25/p1"})
    write_manifest(tmp_path / "idx", manifest)
    queries = [_unit(4, 16, gen=gen) for _ in range(3)]
    before = load_index(tmp_path / "idx")
    expected = before.search(queries, k=30)
    compact_index(tmp_path / "idx")
    files = [s["file"] for s in read_manifest(tmp_path / "idx").segments]
    assert files == ["segment-00003.safetensors", "segment-00001.safetensors", "segment-00004.safetensors"]
    assert sorted(p.name for p in (tmp_path / "idx").glob("segment-*")) == sorted(files)
    after = load_index(tmp_path / "idx")
    assert after.page_ids == before.page_ids and len(after) == 28
    assert after._blocks[0].tokens.dtype == torch.float16 and after._blocks[0].source.name == files[0]
    assert after.search(queries, k=30) == expected


def test_bad_segment_and_journal_files_are_named(tmp_path):
    gen = torch.Generator().manual_seed(5)
    _write_index(tmp_path / "idx", _random_pages(8, gen), per_segment=4)
    segment = tmp_path / "idx" / "segment-00001.safetensors"
    segment.write_bytes(segment.read_bytes()[:-40])
    with pytest.raises(IndexLoadError, match=rf"segment {segment} is unreadable: .*does not fit the file"):
        load_index(tmp_path / "idx")

    write_journal(tmp_path / "j", {"corpus": "c"}, [{"batch": 0, "segment": None, "meta": {}, "skipped": []}])
    with open(tmp_path / "j" / "ingest.jsonl", "a") as f:
        f.write('{"batch": 1, "segm')  # cut short by the interruption: dropped
    header, done = read_journal(tmp_path / "j")
    assert header == {"corpus": "c"} and list(done) == [0]
    lines = (tmp_path / "j" / "ingest.jsonl").read_text().splitlines()
    (tmp_path / "j" / "ingest.jsonl").write_text("\n".join([lines[0], "garbage", lines[1]]) + "\n")
    with pytest.raises(IndexLoadError, match=r"ingest.jsonl: line 2 is not valid JSON"):
        read_journal(tmp_path / "j")
    with pytest.raises(IndexLoadError, match="an interrupted `docrl index` left ingest.jsonl"):
        read_manifest(tmp_path / "j")


def test_retriever_search_settings_are_validated_by_key():
    from cluster.config import ConfigError, load_config

    with pytest.raises(ConfigError) as err:
        load_config(None, ["retriever.search=fast", "retriever.shortlist=0", "retriever.vector_dtype=int8"])
    text = str(err.value)
    assert "retriever.search: Input should be 'auto', 'exact' or 'two_stage'" in text
    assert "retriever.shortlist" in text and "retriever.vector_dtype" in text
    cfg = load_config(None, ["retriever.two_stage_min_pages=1000"]).retriever
    assert (cfg.search_method(999), cfg.search_method(1000)) == ("exact", "two_stage")


# ----------------------------------------------------------------------------------------------
# Serve: page images resolved at start without reading or rendering, loaded on demand, cached


def _serve_index(tmp_path, sources):
    """A one-segment index whose pages have these manifest sources."""
    gen = torch.Generator().manual_seed(6)
    ids = list(sources)
    manifest = Manifest(SETTINGS, [write_segment(tmp_path / "idx", "segment-00000.safetensors", ids,
                                                 _random_pages(len(ids), gen))], {})
    manifest.pages = {pid: {"doc_id": pid.rsplit("/", 1)[0], "page_no": int(pid.rsplit("/p", 1)[1]), "source": src}
                      for pid, src in sources.items()}
    write_manifest(tmp_path / "idx", manifest)
    return tmp_path / "idx"


def test_page_store_renders_pdf_pages_on_demand_in_a_bounded_cache(tmp_path):
    from deploy.pages import PageStore, PageUnavailable
    from docvqa.synthetic import generate_pdf

    (tmp_path / "docs").mkdir()
    generate_pdf(tmp_path / "docs" / "report.pdf", [Image.new("RGB", (100, 130), c) for c in ("white", "gray", "black")])
    Image.new("RGB", (60, 40), "red").save(tmp_path / "docs" / "scan.png")
    index_dir = _serve_index(tmp_path, {"report/p1": "docs/report.pdf#page=1", "report/p2": "docs/report.pdf#page=2",
                                        "report/p3": "docs/report.pdf#page=3", "scan/p1": "docs/scan.png",
                                        "old/p1": "<bytes:old/p1>", "gone/p1": "docs/gone.png"})
    store = PageStore.from_index(index_dir, base_dir=tmp_path, cache_bytes=10_000)
    assert len(store) == 4 and set(store.unavailable) == {"old/p1", "gone/p1"} and not store._cache
    page = store.load("report/p3")
    assert page.image_bytes is not None and page.load_image().getpixel((5, 5)) == (0, 0, 0)
    assert page.load_image().size == (200, 260)  # rendered at 144 dpi
    assert list(store._cache) == ["report/p3"]
    for pid in ("report/p1", "report/p2", "scan/p1", "report/p3"):
        store.load(pid)
    assert store._cached_bytes <= 10_000 and list(store._cache)[-1] == "report/p3"  # most recent use last
    with pytest.raises(PageUnavailable, match="page gone/p1: its image file .*gone.png does not exist"):
        store.load("gone/p1")

    # nothing is read at start: a PDF broken after indexing fails when a page of it is loaded, by name
    (tmp_path / "docs" / "report.pdf").write_bytes(b"%PDF-1.4 garbage")
    store = PageStore.from_index(index_dir, base_dir=tmp_path)
    assert len(store) == 4
    with pytest.raises(PageUnavailable, match=r"page report/p2: cannot read .*report.pdf#page=2"):
        store.load("report/p2")


def test_page_store_finds_pages_of_an_older_index_in_the_pages_folder(tmp_path):
    """Indexes built before PDF pages were recorded by file name them `<bytes:...>`: the pages
    folder is searched by document id, again without rendering anything at start."""
    from deploy.pages import PageStore
    from docvqa.synthetic import generate_pdf

    (tmp_path / "folder" / "sub").mkdir(parents=True)
    generate_pdf(tmp_path / "folder" / "sub" / "report.pdf", [Image.new("RGB", (100, 130), c) for c in ("white", "black")])
    Image.new("RGB", (60, 40), "red").save(tmp_path / "folder" / "scan.jpg")
    index_dir = _serve_index(tmp_path, {"sub/report/p2": "<bytes:sub/report/p2>", "scan/p1": "<bytes:scan/p1>",
                                        "missing/p1": "<bytes:missing/p1>"})
    store = PageStore.from_index(index_dir, base_dir=tmp_path, pages_folder=tmp_path / "folder")
    assert set(store.pages) == {"sub/report/p2", "scan/p1"}
    assert "holds no file of its document 'missing'" in store.unavailable["missing/p1"]
    assert store.load("sub/report/p2").load_image().getpixel((5, 5)) == (0, 0, 0)
    red, green, blue = store.load("scan/p1").load_image().getpixel((5, 5))
    assert red > 200 and green < 50 and blue < 50  # JPEG: nearly pure red


def test_serve_retriever_searches_off_the_event_loop(tiny_models, tmp_path):
    """The deployment's CPU work (query embedding, MaxSim, page reads) runs in a worker thread:
    a coroutine ticking every 5 ms keeps ticking while a search that takes much longer runs."""
    import asyncio
    import time

    from deploy.app import Retriever
    from deploy.pages import PageStore
    from retriever.config import RetrieverConfig
    from retriever.encoder import PageEncoder
    from retriever.index import save_index

    model = str(tiny_models["retriever"])
    settings = PageEncoder(model).settings()
    gen = torch.Generator().manual_seed(7)
    Image.new("RGB", (64, 64), "white").save(tmp_path / "page.png")
    index = PageIndex(settings)
    n = 3000  # enough pages that a search takes many ticks
    index.add([f"d{i}/p1" for i in range(n)], [_unit(200, settings["dim"], gen=gen) for _ in range(n)],
              [{"doc_id": f"d{i}", "page_no": 1, "source": str(tmp_path / "page.png")} for i in range(n)])
    save_index(index, tmp_path / "idx")
    del index
    bundle = PageStore.from_index(tmp_path / "idx", tmp_path).pack_with_index(tmp_path / "idx")
    retriever = Retriever.func_or_class(bundle, model, RetrieverConfig(model=model), 1, False)
    # Serve's batching needs a replica's context: run the batch body itself on batches of one
    batch_body = Retriever.func_or_class._search.__wrapped__

    async def unbatched(item):
        return (await batch_body(retriever, [item]))[0]

    retriever._search = unbatched

    async def run():
        gaps, stop = [], asyncio.Event()

        async def tick():
            last = time.perf_counter()
            while not stop.is_set():
                await asyncio.sleep(0.005)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        ticker = asyncio.create_task(tick())
        await asyncio.sleep(0.05)
        start = time.perf_counter()
        found = await retriever.search("what is the total?", 3, 1)
        took = time.perf_counter() - start
        stop.set()
        await ticker
        return found, took, max(gaps)

    found, took, worst_gap = asyncio.run(run())
    assert len(found.citations) == 3 and len(found.pages) == 1 and found.pages[0].image_bytes
    assert took > 0.04, took  # 8 ticks or more: long enough to tell blocking from not
    assert worst_gap < took / 2, (worst_gap, took)  # blocking the loop would stop the ticks for the whole search
    assert math.isfinite(found.citations[0].score) and json.dumps(found.citations[0].page_id)

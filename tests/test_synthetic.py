"""The synthetic DocVQA corpus: deterministic bytes, the official JSON layout, answers really printed."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
from PIL import Image

from docvqa.synthetic import (
    DEFAULT_PAGE_SIZE,
    EASY_QUESTIONS,
    EASY_VOCAB,
    REALISTIC_KINDS,
    SECTION_KINDS,
    SECTION_PAGES,
    TextOp,
    generate_corpus,
    generate_pdf,
    plan_documents,
    render_document,
)

N_DOCS = 10


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _load(paths: dict[str, Path]) -> dict[str, dict]:
    return {split: json.loads(p.read_text()) for split, p in paths.items()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("realistic")
    return out, generate_corpus(out, num_documents=N_DOCS, seed=0)


@pytest.fixture(scope="module")
def easy_corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("easy")
    return out, generate_corpus(out, num_documents=24, seed=0, level="easy")


def test_same_seed_gives_identical_bytes_and_other_seed_differs(corpus, tmp_path):
    out, _ = corpus
    again = tmp_path / "again"
    generate_corpus(again, num_documents=N_DOCS, seed=0)
    first = _hashes(out)
    assert first == _hashes(again)
    assert len([k for k in first if k.endswith(".png")]) >= N_DOCS

    other = tmp_path / "other"
    generate_corpus(other, num_documents=N_DOCS, seed=1)
    second = _hashes(other)
    assert first["train_v1.0.json"] != second["train_v1.0.json"]
    assert not set(first.values()) & set(second.values())


def test_easy_level_is_deterministic(easy_corpus, tmp_path):
    out, _ = easy_corpus
    generate_corpus(tmp_path, num_documents=24, seed=0, level="easy")
    assert _hashes(out) == _hashes(tmp_path)


def test_json_layout_is_docvqa(corpus):
    out, paths = corpus
    assert set(paths) == {"train", "val"}
    assert paths["train"] == out / "train_v1.0.json" and paths["val"] == out / "val_v1.0.json"
    for split, d in _load(paths).items():
        assert d["dataset_name"] == "docrl-synthetic"
        assert d["dataset_version"] == "1.0"
        assert d["dataset_split"] == split
        assert d["data"], split
        for r in d["data"]:
            assert set(r) == {"questionId", "question", "question_types", "image", "docId",
                              "ucsf_document_id", "ucsf_document_page_no", "answers", "data_split"}
            assert isinstance(r["questionId"], int) and isinstance(r["docId"], int)
            assert isinstance(r["ucsf_document_page_no"], str)
            assert r["image"] == f"documents/{r['ucsf_document_id']}_{r['ucsf_document_page_no']}.png"
            assert r["data_split"] == split
            assert r["question"].endswith("?")
            assert r["answers"] and all(isinstance(a, str) and a for a in r["answers"])
            assert len(set(r["answers"])) == len(r["answers"])
            assert r["question_types"] and set(r["question_types"]) <= {"form", "table/list", "layout",
                                                                         "free_text"}


def test_splits_are_disjoint_by_document_and_ids_unique(corpus):
    _, paths = corpus
    d = _load(paths)
    docs = {s: {r["ucsf_document_id"] for r in d[s]["data"]} | {p["ucsf_document_id"] for p in d[s]["pages"]}
            for s in d}
    assert docs["train"] and docs["val"]
    assert not docs["train"] & docs["val"]
    assert len(docs["train"] | docs["val"]) == N_DOCS
    assert len(docs["val"]) == 2  # round(10 * 0.2)
    qids = [r["questionId"] for s in d for r in d[s]["data"]]
    assert len(qids) == len(set(qids)) == N_DOCS * 3
    # docId names a page image, as in DocVQA
    page_ids = {(p["ucsf_document_id"], p["ucsf_document_page_no"]): p["docId"]
                for s in d for p in d[s]["pages"]}
    assert len(set(page_ids.values())) == len(page_ids)
    for s in d:
        for r in d[s]["data"]:
            assert page_ids[(r["ucsf_document_id"], r["ucsf_document_page_no"])] == r["docId"]


def test_pages_list_every_image_and_images_are_pngs_of_page_size(corpus):
    out, paths = corpus
    d = _load(paths)
    listed = [p for s in d for p in d[s]["pages"]]
    on_disk = sorted(str(p.relative_to(out)) for p in (out / "documents").glob("*.png"))
    assert sorted(p["image"] for p in listed) == on_disk
    by_doc: dict[str, list[int]] = {}
    for p in listed:
        by_doc.setdefault(p["ucsf_document_id"], []).append(int(p["ucsf_document_page_no"]))
    for pages in by_doc.values():
        assert sorted(pages) == list(range(1, len(pages) + 1)) and len(pages) <= 3
    for r in [r for s in d for r in d[s]["data"]]:
        assert (out / r["image"]).is_file()
    for name in on_disk:
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.size == DEFAULT_PAGE_SIZE["realistic"] and im.mode == "RGB"
            im.verify()


def test_json_matches_plans(corpus):
    _, paths = corpus
    d = _load(paths)
    records = {r["questionId"]: r for s in d for r in d[s]["data"]}
    for plan in plan_documents(N_DOCS, seed=0):
        for q in plan.questions:
            r = records[q.question_id]
            assert r["ucsf_document_id"] == plan.doc_id
            assert r["ucsf_document_page_no"] == str(plan.pages[q.page_index].page_no)
            assert (r["question"], r["answers"]) == (q.question, q.answers)


def test_gold_answer_is_printed_on_its_page():
    plans = plan_documents(60, seed=3)
    assert {p.kind for p in plans} == set(REALISTIC_KINDS)
    assert {len(p.pages) for p in plans} == {1, 2, 3}
    n = 0
    for plan in plans:
        assert len(plan.questions) == 3
        assert len({q.question for q in plan.questions}) == 3
        for q in plan.questions:
            lines = plan.pages[q.page_index].lines
            assert any(q.answers[0] in line for line in lines), (plan.doc_id, q.question, q.answers)
            n += 1
    assert n == 180


def test_answer_text_is_really_drawn():
    """The op holding the answer leaves ink where it says it does (cheap check that we render plans)."""
    plans = [p for p in plan_documents(10, seed=4)][:5]
    for plan in plans:
        images = render_document(plan)
        for q in plan.questions:
            op = next(o for o in plan.pages[q.page_index].ops
                      if isinstance(o, TextOp) and q.answers[0] in o.text)
            box = (op.x, op.y, op.x + 4 * op.size, op.y + op.size * 2)
            crop = images[q.page_index].convert("L").crop(box)
            assert crop.getextrema()[0] < 128, (plan.doc_id, q.question)


def test_money_and_date_answer_variants():
    plans = plan_documents(40, seed=0)
    money = [q.answers for p in plans for q in p.questions if q.answers[0].startswith("$")]
    big = [a for a in money if "," in a[0]]
    assert big, "expected at least one amount >= $1,000"
    for a in big:
        assert a == [a[0], a[0][1:], a[0][1:].replace(",", "")]
        assert re.fullmatch(r"\$\d{1,3}(,\d{3})+\.\d\d", a[0])
    for a in money:
        assert a[1] == a[0][1:]
    dates = [q.answers for p in plans for q in p.questions if "date" in q.question.lower()]
    assert dates and all(len(a) >= 2 for a in dates)
    assert any(re.fullmatch(r"\d\d/\d\d/\d{4}", v) for a in dates for v in a)


def test_easy_level(easy_corpus):
    out, paths = easy_corpus
    d = _load(paths)
    records = [r for s in d for r in d[s]["data"]]
    assert len(records) == 24  # one question per document
    assert all(r["ucsf_document_page_no"] == "1" for r in records)
    assert all(len(r["answers"]) == 1 and r["answers"][0] in EASY_VOCAB for r in records)
    assert all(r["question"] in EASY_QUESTIONS for r in records)
    assert len({r["answers"][0] for r in records}) >= 5
    assert sum(len(d[s]["pages"]) for s in d) == 24
    for r in records[:5]:
        with Image.open(out / r["image"]) as im:
            assert im.size == DEFAULT_PAGE_SIZE["easy"] == (224, 224)
    for plan in plan_documents(50, seed=1, level="easy"):
        assert len(plan.pages) == 1 and len(plan.questions) == 1
        lines = plan.pages[0].lines
        word = plan.questions[0].answers[0]
        # the big word is printed once, and no distractor uses a vocabulary word
        assert lines.count(word) == 1
        assert sum(w in line.split() for line in lines for w in EASY_VOCAB) == 1


def test_sections_level_only_the_named_page_answers(tmp_path):
    """Every question names one section of its document; its answer is drawn on that page and on
    no other page of the document, and that page's banner names the section."""
    plans = plan_documents(40, seed=2, level="sections", questions_per_document=3)
    for plan in plans:
        assert len(plan.pages) == SECTION_PAGES and len(plan.questions) == 3
        banners = [next(t for t in page.lines if t.isupper()) for page in plan.pages]
        assert len(set(banners)) == SECTION_PAGES and {b.lower() for b in banners} <= set(SECTION_KINDS)
        words = [[w for w in page.lines if w in EASY_VOCAB] for page in plan.pages]
        assert all(len(w) == 1 for w in words) and len({w[0] for w in words}) == SECTION_PAGES
        assert len({q.page_index for q in plan.questions}) == 3  # each question about another page
        for q in plan.questions:
            named = next(k for k in SECTION_KINDS if f" {k} page" in q.question)
            assert banners[q.page_index] == named.upper()
            assert [w[0] for w in words].index(q.answers[0]) == q.page_index
    # all kinds and several words are asked about; at most 4 questions per document
    assert {b for p in plans for q in p.questions for b in SECTION_KINDS if f" {b} page" in q.question} == set(SECTION_KINDS)
    assert all(len(p.questions) == SECTION_PAGES for p in plan_documents(3, level="sections", questions_per_document=9))
    paths = generate_corpus(tmp_path, num_documents=10, seed=2, level="sections", questions_per_document=2)
    records = [r for split in paths.values() for r in json.loads(split.read_text())["data"]]
    listed = [pg for split in paths.values() for pg in json.loads(split.read_text())["pages"]]
    assert len(records) == 20 and len(listed) == 10 * SECTION_PAGES
    with Image.open(tmp_path / records[0]["image"]) as im:
        assert im.size == DEFAULT_PAGE_SIZE["sections"] == (224, 224)


def test_document_i_does_not_depend_on_corpus_size():
    small, large = plan_documents(4, seed=2), plan_documents(9, seed=2)
    for a, b in zip(small, large):
        assert (a.doc_id, a.kind, [p.ops for p in a.pages]) == (b.doc_id, b.kind, [p.ops for p in b.pages])
        assert [(q.question_id, q.answers) for q in a.questions] == \
            [(q.question_id, q.answers) for q in b.questions]


def test_other_page_sizes_and_val_fraction(tmp_path):
    paths = generate_corpus(tmp_path, num_documents=3, seed=5, page_size=(306, 396), val_fraction=0.0,
                            questions_per_document=2)
    d = _load(paths)
    assert d["val"]["data"] == [] and d["val"]["pages"] == []
    assert len(d["train"]["data"]) == 6
    with Image.open(tmp_path / d["train"]["data"][0]["image"]) as im:
        assert im.size == (306, 396)
    for p in plan_documents(20, seed=5, page_size=(306, 396)):
        for q in p.questions:
            assert any(q.answers[0] in line for line in p.pages[q.page_index].lines)


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="level"):
        generate_corpus(tmp_path, 1, level="hard")
    with pytest.raises(ValueError, match="val_fraction"):
        generate_corpus(tmp_path, 1, val_fraction=1.5)
    with pytest.raises(ValueError, match="too small"):
        plan_documents(3, page_size=(120, 150))


def test_generate_pdf(tmp_path):
    plan = plan_documents(6, seed=0)
    multi = next(p for p in plan if len(p.pages) > 1)
    pages = render_document(multi)
    a = generate_pdf(tmp_path / "a" / "doc.pdf", pages)
    b = generate_pdf(tmp_path / "b" / "doc.pdf", pages)
    data = a.read_bytes()
    assert data.startswith(b"%PDF")
    assert data == b.read_bytes()  # creation dates are pinned
    assert len(re.findall(rb"/Type\s*/Page\b", data)) == len(pages)
    # 72 dpi: a 612x792 px page is a US letter page in points
    assert data.count(b"/MediaBox [ 0 0 612.0 792.0 ]") == len(pages)

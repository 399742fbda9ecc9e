"""DocVQA loaders (official JSON and the Hugging Face layout) on generated data, and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from docvqa.loaders import (DataError, load_docvqa_json, load_hf_docvqa, merge_datasets, split_by_document,
                            write_hf_layout)
from docvqa.sample import make_page_id


def _copy_corpus(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_json_loader_reads_generated_corpus(synthetic_corpus):
    raw = json.loads((synthetic_corpus / "train_v1.0.json").read_text())
    ds = load_docvqa_json(synthetic_corpus / "train_v1.0.json")
    assert len(ds) == len(raw["data"]) and not ds.skipped
    # every page listed in the file is in the corpus, questions or not
    assert set(ds.pages) == {make_page_id(p["ucsf_document_id"], int(p["ucsf_document_page_no"])) for p in raw["pages"]}
    docs = ds.documents()
    for rec, s in zip(raw["data"], ds.samples):
        assert s.question_id == str(rec["questionId"]) and s.answers == tuple(rec["answers"])
        assert s.gold_page == make_page_id(rec["ucsf_document_id"], int(rec["ucsf_document_page_no"]))
        assert s.gold_page in s.doc_pages and s.doc_pages == docs[s.doc_id]
        assert ds.pages[s.gold_page].load_image().size == (612, 792)


def test_hf_layout_round_trip_matches_json_loader(synthetic_corpus, tmp_path):
    ds = load_docvqa_json(synthetic_corpus / "val_v1.0.json")
    write_hf_layout(ds, tmp_path / "hf", split="validation")
    hf = load_hf_docvqa(str(tmp_path / "hf"), "validation", page_dir=tmp_path / "pages")
    assert [(s.question_id, s.question, s.answers, s.gold_page, s.doc_id) for s in hf.samples] == \
           [(s.question_id, s.question, s.answers, s.gold_page, s.doc_id) for s in ds.samples]
    for s in hf.samples[:3]:
        assert hf.pages[s.gold_page].load_image().tobytes() == ds.pages[s.gold_page].load_image().tobytes()
    # the driver holds no page bytes: every page is a file in the page folder, named by its content
    files = sorted((tmp_path / "pages").rglob("*.png"))
    assert all(p.image_bytes is None and Path(p.image_path).parent.parent == tmp_path / "pages" for p in hf.pages.values())
    assert len(files) == len(hf.pages)
    stamps = [f.stat().st_mtime_ns for f in files]
    again = load_hf_docvqa(str(tmp_path / "hf"), "validation", page_dir=tmp_path / "pages")
    assert {p.image_path for p in again.pages.values()} == {p.image_path for p in hf.pages.values()}
    assert [f.stat().st_mtime_ns for f in files] == stamps  # written once: the corpus fingerprint stays the same


def _corrupt(corpus_dir):
    """Five kinds of bad record, one each, in a copy of the train file."""
    path = corpus_dir / "train_v1.0.json"
    doc = json.loads(path.read_text())
    doc.pop("pages")
    data = doc["data"]
    (corpus_dir / "documents" / "garbage.png").write_bytes(b"not a png at all")
    data[0]["image"] = "documents/missing.png"
    data[0]["ucsf_document_id"] = "missingdoc"
    data[1] = {**data[1], "image": "documents/garbage.png", "ucsf_document_id": "garbagedoc"}
    data[2]["answers"] = []
    data[3]["questionId"] = data[4]["questionId"]  # record 4 becomes the duplicate
    data[5] = {"question": "no id"}
    path.write_text(json.dumps(doc))
    return path, data


def test_bad_records_are_skipped_and_counted_by_name(synthetic_corpus, tmp_path):
    path, data = _corrupt(_copy_corpus(synthetic_corpus, tmp_path / "c"))
    ds = load_docvqa_json(path, on_bad="skip")
    assert ds.skipped == {"bad_image": 2, "no_answers": 1, "duplicate_id": 1, "malformed": 1}
    assert len(ds) == len(data) - 5
    text = "\n".join(ds.skipped_examples)
    assert "missing.png" in text and "garbage.png" in text and "record #2" in text
    assert f"record #4 (questionId={data[4]['questionId']}): duplicate questionId (first seen at record #3)" in text
    assert str(path) in text


@pytest.mark.parametrize("index, message", [(0, "image file not found"), (1, "unreadable image"), (2, "no answers"),
                                             (5, "missing field")])
def test_stop_policy_names_record_and_file(synthetic_corpus, tmp_path, index, message):
    path, data = _corrupt(_copy_corpus(synthetic_corpus, tmp_path / "c"))
    # keep only the bad record under test (and the good ones after the corrupted block)
    doc = json.loads(path.read_text())
    doc["data"] = [data[index]] + data[6:]
    path.write_text(json.dumps(doc))
    with pytest.raises(DataError) as err:
        load_docvqa_json(path, on_bad="stop")
    assert message in str(err.value) and str(path) in str(err.value) and "record #0" in str(err.value)


def test_unlabelled_test_split_is_allowed(synthetic_corpus, tmp_path):
    corpus = _copy_corpus(synthetic_corpus, tmp_path / "c")
    doc = json.loads((corpus / "val_v1.0.json").read_text())
    doc["dataset_split"] = "test"
    for rec in doc["data"]:
        rec["answers"] = []
    (corpus / "test_v1.0.json").write_text(json.dumps(doc))
    ds = load_docvqa_json(corpus / "test_v1.0.json", on_bad="stop")
    assert len(ds) == len(doc["data"]) and all(s.answers == () for s in ds.samples)


def test_malformed_file_is_refused(tmp_path):
    (tmp_path / "a.json").write_text('{"not_data": []}')
    with pytest.raises(DataError, match="expected an object with a 'data' list"):
        load_docvqa_json(tmp_path / "a.json")
    with pytest.raises(DataError, match="annotation file not found"):
        load_docvqa_json(tmp_path / "nope.json")


def test_split_by_document_is_disjoint_and_merge_refuses_duplicates(synthetic_corpus):
    ds = load_docvqa_json(synthetic_corpus / "train_v1.0.json")
    train, held = split_by_document(ds, 0.34, seed=0)
    assert held.samples and train.samples
    assert not {s.doc_id for s in train.samples} & {s.doc_id for s in held.samples}
    assert len(train) + len(held) == len(ds)
    with pytest.raises(DataError, match="appears in both"):
        merge_datasets([ds, ds])


def _without_gold_pages(corpus_dir):
    """The generated train file with record 0 reduced to its document (no page number, no image),
    record 1 to nothing (no document either), and record 2 naming a document no page belongs to."""
    path = corpus_dir / "train_v1.0.json"
    doc = json.loads(path.read_text())
    data = doc["data"]
    for key in ("ucsf_document_page_no", "image"):
        data[0].pop(key)
    data[1] = {k: v for k, v in data[1].items() if k not in ("ucsf_document_page_no", "image", "ucsf_document_id")}
    data[2] = {**{k: v for k, v in data[2].items() if k not in ("ucsf_document_page_no", "image")},
               "ucsf_document_id": "nosuchdoc"}
    path.write_text(json.dumps(doc))
    return path, data


def test_questions_without_a_gold_page_load_with_their_document_or_none(synthetic_corpus, tmp_path):
    path, data = _without_gold_pages(_copy_corpus(synthetic_corpus, tmp_path / "c"))
    ds = load_docvqa_json(path)
    by_id = {s.question_id: s for s in ds.samples}
    doc_only, nothing = by_id[str(data[0]["questionId"])], by_id[str(data[1]["questionId"])]
    assert doc_only.gold_page is None and doc_only.doc_id == data[0]["ucsf_document_id"]
    assert doc_only.doc_pages == ds.documents()[doc_only.doc_id] and len(doc_only.doc_pages) >= 1
    assert (nothing.gold_page, nothing.doc_id, nothing.doc_pages) == (None, None, ())
    assert nothing.answers == tuple(data[1]["answers"])
    # the document no page belongs to is reported by name; every other record loads
    assert ds.skipped == {"unknown_document": 1} and "nosuchdoc" in ds.skipped_examples[0]
    assert len(ds) == len(data) - 1
    # held out by document, a question without one is a unit of its own
    train, held = split_by_document(ds, 0.5, seed=0)
    assert len(train) + len(held) == len(ds)
    # the hub layout is one row per page image: it cannot carry a question without one
    with pytest.raises(ValueError, match=f"question {doc_only.question_id}: no gold page"):
        write_hf_layout(ds, tmp_path / "hf", "train")


@pytest.mark.parametrize("change, message", [
    ({"ucsf_document_page_no": None}, "an image without ucsf_document_page_no"),
    ({"ucsf_document_id": None}, "ucsf_document_page_no without ucsf_document_id"),
])
def test_a_half_given_page_is_refused_by_record(synthetic_corpus, tmp_path, change, message):
    corpus = _copy_corpus(synthetic_corpus, tmp_path / "c")
    path = corpus / "train_v1.0.json"
    doc = json.loads(path.read_text())
    doc["data"][0].update(change)
    path.write_text(json.dumps(doc))
    with pytest.raises(DataError, match=message) as err:
        load_docvqa_json(path, on_bad="stop")
    assert "record #0" in str(err.value)

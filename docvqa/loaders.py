"""DocVQA loaders: the official annotation JSON and the Hugging Face (lmms-lab/DocVQA) layout.

Both produce a `DocVQADataset`: samples plus the page corpus. Pages that share a
`ucsf_document_id` form one document; every page of every loaded record is in the corpus.

Bad records never crash a worker later: each is either skipped and counted by reason (with the
first few named) or stops the load with an error naming the record and file, as
`data.on_bad_sample` says.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from docvqa.sample import DocVQADataset, DocVQASample, Page, documents_of, make_page_id

OnBad = Literal["skip", "stop"]
UNLABELLED_SPLITS = {"test"}  # DocVQA's test split ships without answers
MAX_NAMED_SKIPS = 20


class DataError(ValueError):
    """A record that cannot be used, named by its question id, record index and file."""


class _BadRecords:
    """Collects skipped records by reason, or raises on the first one under the 'stop' policy."""

    def __init__(self, on_bad: OnBad, source: str):
        self.on_bad, self.source = on_bad, source
        self.counts: Counter[str] = Counter()
        self.examples: list[str] = []

    def report(self, reason: str, where: str, detail: str) -> None:
        message = f"{self.source}: {where}: {detail}"
        if self.on_bad == "stop":
            raise DataError(message + " (data.on_bad_sample=stop; set it to 'skip' to skip and count such records)")
        self.counts[reason] += 1
        if len(self.examples) < MAX_NAMED_SKIPS:
            self.examples.append(message)


def _check_image_file(path: Path) -> str | None:
    """None when the file exists and has a readable image header, else why not (cheap: no decode)."""
    if not path.is_file():
        return f"image file not found: {path}"
    try:
        with Image.open(path) as im:
            im.size  # noqa: B018 - forces the header parse
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        return f"unreadable image {path}: {e}"
    return None


def _image_bytes_format(data: bytes | None) -> tuple[str | None, str | None]:
    """(the image format, None) for readable image bytes, else (None, why not) (cheap: no decode)."""
    if not data:
        return None, "record has no image bytes"
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.size  # noqa: B018
            return im.format, None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        return None, f"unreadable embedded image: {e}"


def _string_list(rec: dict, key: str) -> tuple[str, ...]:
    """A list-of-strings field (absent = empty), blank entries dropped; ValueError otherwise."""
    values = rec.get(key) or []
    if not isinstance(values, (list, tuple)) or not all(isinstance(a, str) for a in values):
        raise ValueError(f"{key} is not a list of strings (got {values!r:.80})")
    return tuple(a for a in values if a.strip())


def _parse_record(rec: Any, split: str, require_answers: bool
                  ) -> tuple[str, str, tuple[str, ...], tuple[str, ...], str | None, int | None, tuple[str, ...]]:
    """Validate the fields common to both layouts. Raises ValueError with what is wrong.

    A record with `rejected_answers` (feedback that only rejects an answer) needs no gold answers.
    A record without `ucsf_document_page_no` (and without an image) has no gold page: its document
    is `ucsf_document_id`, or none at all when that is absent too."""
    if not isinstance(rec, dict):
        raise ValueError(f"record is a {type(rec).__name__}, not a mapping")
    missing = [k for k in ("questionId", "question") if rec.get(k) in (None, "")]
    if missing:
        raise ValueError(f"missing field(s) {', '.join(missing)}")
    qid = str(rec["questionId"])
    question = rec["question"]
    if not isinstance(question, str) or not question.strip():
        raise ValueError("question is not a non-empty string")
    answers = _string_list(rec, "answers")
    rejected = _string_list(rec, "rejected_answers")
    if require_answers and not answers and not rejected:
        raise ValueError("no answers (a training/evaluation sample needs at least one gold answer)")
    qtypes = rec.get("question_types") or []
    if not isinstance(qtypes, (list, tuple)):
        raise ValueError("question_types is not a list")
    doc_id = None if rec.get("ucsf_document_id") in (None, "") else str(rec["ucsf_document_id"])
    page_no = None
    if rec.get("ucsf_document_page_no") not in (None, ""):
        if doc_id is None:
            raise ValueError("ucsf_document_page_no without ucsf_document_id")
        try:
            page_no = int(rec["ucsf_document_page_no"])
        except (TypeError, ValueError):
            raise ValueError(f"ucsf_document_page_no is not an integer (got {rec['ucsf_document_page_no']!r})") from None
    elif rec.get("image"):
        raise ValueError("an image without ucsf_document_page_no (which page of which document is it?)")
    return qid, question.strip(), answers, tuple(str(t) for t in qtypes), doc_id, page_no, rejected


def _collect_samples(records: Iterable, label: str, split: str, require_answers: bool, bad: _BadRecords,
                     page_of) -> list[tuple]:
    """Validate records one by one (fields, duplicate ids, the page via `page_of`), reporting each
    bad one to `bad`; returns the good ones as tuples for `_assemble`."""
    samples, seen = [], {}
    for i, rec in enumerate(records):
        qid = str(rec.get("questionId")) if isinstance(rec, dict) else "?"
        where = f"{label}{i} (questionId={qid})"
        try:
            qid, question, answers, qtypes, doc_id, page_no, rejected = _parse_record(rec, split, require_answers)
        except ValueError as e:
            bad.report("no_answers" if "no answers" in str(e) else "malformed", where, str(e))
            continue
        if qid in seen:
            bad.report("duplicate_id", where, f"duplicate questionId (first seen at {label}{seen[qid]})")
            continue
        page_id, err = (None, None) if page_no is None else page_of(rec, doc_id, page_no)
        if err:
            bad.report("bad_image", where, err)
            continue
        seen[qid] = i
        samples.append((qid, question, answers, qtypes, doc_id, page_id, str(rec.get("data_split") or split), rejected))
    return samples


def _assemble(samples: list[tuple[str, str, tuple[str, ...], tuple[str, ...], str | None, str | None, str,
                                tuple[str, ...]]],
              pages: dict[str, Page], source: str, bad: _BadRecords) -> DocVQADataset:
    """Attach each sample to its document's page list, in page order. A question that names a
    document of which no page is known (no other question's image, no `pages` entry) is reported."""
    doc_pages = documents_of(pages.values())
    out = []
    for qid, q, a, qt, doc, page_id, split, rejected in samples:
        if doc is not None and doc not in doc_pages:
            bad.report("unknown_document", f"questionId={qid}", f"document {doc!r} has no page in this data "
                       "(a question without a page number needs its document's pages listed under 'pages')")
            continue
        out.append(DocVQASample(question_id=qid, question=q, answers=a, doc_id=doc, gold_page=page_id,
                                doc_pages=doc_pages[doc] if doc is not None else (), question_types=qt, split=split,
                                rejected_answers=rejected))
    return DocVQADataset(samples=out, pages=pages, source=source, skipped=dict(bad.counts), skipped_examples=bad.examples)


def load_docvqa_json(annotation_path: str | Path, image_root: str | Path | None = None,
                     on_bad: OnBad = "skip", require_answers: bool | None = None) -> DocVQADataset:
    """Load an official DocVQA annotation file (`{"data": [{questionId, question, image, ...}]}`).

    `image` paths are relative to `image_root` (default: the annotation file's folder). A top-level
    `pages` list (written by docrl's synthetic generator and feedback export) adds pages that no
    question refers to, so that they are in the retrieval corpus too.
    """
    path = Path(annotation_path)
    root = Path(image_root) if image_root is not None else path.parent
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"annotation file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise DataError(f"{path}: expected an object with a 'data' list (the official DocVQA layout)")
    split = str(doc.get("dataset_split", path.stem.split("_")[0]))
    if require_answers is None:
        require_answers = split not in UNLABELLED_SPLITS
    bad = _BadRecords(on_bad, str(path))
    pages: dict[str, Page] = {}
    page_errors: dict[str, str | None] = {}

    def add_page(doc_id: str, page_no: int, rel_image: Any) -> tuple[str, str | None]:
        page_id = make_page_id(doc_id, page_no)
        if page_id not in page_errors:
            if not isinstance(rel_image, str) or not rel_image:
                page_errors[page_id] = "record has no image path"
            else:
                image_path = root / rel_image
                page_errors[page_id] = _check_image_file(image_path)
                if page_errors[page_id] is None:
                    pages[page_id] = Page(page_id=page_id, doc_id=doc_id, page_no=page_no, image_path=str(image_path))
        return page_id, page_errors[page_id]

    for i, extra in enumerate(doc.get("pages") or []):
        try:
            doc_id, page_no = str(extra["ucsf_document_id"]), int(extra["ucsf_document_page_no"])
        except (KeyError, TypeError, ValueError) as e:
            bad.report("malformed_page", f"pages[{i}]", f"malformed page entry: {e!r}")
            continue
        _, err = add_page(doc_id, page_no, extra.get("image"))
        if err:
            bad.report("bad_image", f"pages[{i}] ({make_page_id(doc_id, page_no)})", err)

    def page_of(rec: dict, doc_id: str, page_no: int) -> tuple[str, str | None]:
        return add_page(doc_id, page_no, rec.get("image"))

    samples = _collect_samples(doc["data"], "record #", split, require_answers, bad, page_of)
    return _assemble(samples, pages, str(path), bad)


def _hf_records(path_or_id: str, split: str, config_name: str | None) -> Iterator[dict]:
    """Rows of a DocVQA split in the lmms-lab layout, images undecoded ({'bytes', 'path'})."""
    import datasets

    local = Path(path_or_id)
    if local.exists():
        if (local / "dataset_info.json").exists() or (local / "state.json").exists():
            ds = datasets.load_from_disk(str(local))
            ds = ds[split] if isinstance(ds, datasets.DatasetDict) else ds
        else:
            files = sorted(str(p) for p in local.rglob("*.parquet") if split in p.name or split in p.parent.name)
            if not files:
                raise DataError(f"{local}: no parquet files for split {split!r} (looked for *{split}*.parquet)")
            ds = datasets.load_dataset("parquet", data_files={split: files}, split=split)
    else:
        ds = datasets.load_dataset(path_or_id, config_name, split=split)
    if "image" in ds.column_names:
        ds = ds.cast_column("image", datasets.Image(decode=False))
    yield from ds


def default_page_dir() -> Path:
    """Where `load_hf_docvqa` writes page images by default: beside the Hugging Face datasets cache."""
    import datasets

    return Path(datasets.config.HF_DATASETS_CACHE) / "docrl-pages"


def _write_page_file(page_dir: Path, data: bytes, image_format: str | None) -> Path:
    """The page image as a file named by its content (written once, never rewritten, so the
    file's identity, which the index's corpus fingerprint reads, stays the same across loads)."""
    suffix = {"JPEG": ".jpg", "PNG": ".png", "TIFF": ".tif", "WEBP": ".webp", "BMP": ".bmp"}.get(image_format or "", ".img")
    digest = hashlib.sha256(data).hexdigest()
    path = page_dir / digest[:2] / f"{digest}{suffix}"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return path


def load_hf_docvqa(path_or_id: str, split: str, config_name: str | None = "DocVQA", on_bad: OnBad = "skip",
                   require_answers: bool | None = None, page_dir: str | Path | None = None) -> DocVQADataset:
    """Load the Hugging Face DocVQA layout (lmms-lab/DocVQA): a hub id on a cluster, or a local
    parquet/arrow directory.

    Rows are read one at a time and each page's image is written once to `page_dir` (default
    `default_page_dir()`), named by its content; the pages are `Page(image_path=...)`. So the
    driver holds no image bytes (DocVQA's 12,000 pages are ~2.5 GB encoded), and a task that
    needs a few pages is sent a few paths. On a multi-node cluster `page_dir` must be storage
    every node reads, like `data.image_root` for the JSON layout."""
    source = f"{path_or_id}[{split}]"
    if require_answers is None:
        require_answers = split not in UNLABELLED_SPLITS
    page_dir = Path(page_dir) if page_dir is not None else default_page_dir()
    bad = _BadRecords(on_bad, source)
    pages: dict[str, Page] = {}
    page_errors: dict[str, str] = {}

    def page_of(rec: dict, doc_id: str, page_no: int) -> tuple[str, str | None]:
        page_id = make_page_id(doc_id, page_no)
        if page_id not in pages and page_id not in page_errors:
            image = rec.get("image") or {}
            data = image.get("bytes") if isinstance(image, dict) else None
            image_format, err = _image_bytes_format(data)
            if err:
                page_errors[page_id] = err
            else:
                try:
                    path = _write_page_file(page_dir, data, image_format)
                except OSError as e:
                    raise DataError(f"{source}: cannot write page {page_id} to the page folder {page_dir}: {e}") from None
                pages[page_id] = Page(page_id=page_id, doc_id=doc_id, page_no=page_no, image_path=str(path))
        return page_id, page_errors.get(page_id)

    samples = _collect_samples(_hf_records(path_or_id, split, config_name), "row ", split, require_answers, bad, page_of)
    return _assemble(samples, pages, source, bad)


def write_hf_layout(dataset: DocVQADataset, out_dir: str | Path, split: str) -> Path:
    """Write a dataset as lmms-lab/DocVQA-style parquet (`<split>-00000-of-00001.parquet`).

    Used to convert local data (synthetic, feedback exports) to the hub layout, and by the tests.
    """
    import datasets

    rows: dict[str, list] = {k: [] for k in ("questionId", "question", "question_types", "image", "docId",
                                             "ucsf_document_id", "ucsf_document_page_no", "answers", "data_split")}
    for s in dataset.samples:
        if s.gold_page is None:  # the layout is one row per (question, page image)
            raise ValueError(f"question {s.question_id}: no gold page, which the hub layout cannot express "
                             "(write it with the JSON layout)")
    doc_numbers = {d: i for i, d in enumerate(sorted({s.doc_id for s in dataset.samples}))}
    for s in dataset.samples:
        page = dataset.pages[s.gold_page]
        data = page.image_bytes if page.image_bytes is not None else Path(page.image_path).read_bytes()
        rows["questionId"].append(s.question_id)
        rows["question"].append(s.question)
        rows["question_types"].append(list(s.question_types))
        rows["image"].append({"bytes": data, "path": None})
        rows["docId"].append(doc_numbers[s.doc_id])
        rows["ucsf_document_id"].append(s.doc_id)
        rows["ucsf_document_page_no"].append(str(page.page_no))
        rows["answers"].append(list(s.answers))
        rows["data_split"].append(split)
    features = datasets.Features({
        "questionId": datasets.Value("string"), "question": datasets.Value("string"),
        "question_types": datasets.Sequence(datasets.Value("string")), "image": datasets.Image(),
        "docId": datasets.Value("int64"), "ucsf_document_id": datasets.Value("string"),
        "ucsf_document_page_no": datasets.Value("string"), "answers": datasets.Sequence(datasets.Value("string")),
        "data_split": datasets.Value("string"),
    })
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / f"{split}-00000-of-00001.parquet"
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(target))
    return target


def split_by_document(dataset: DocVQADataset, fraction: float, seed: int) -> tuple[DocVQADataset, DocVQADataset]:
    """Hold out a fraction of whole documents (never a page of a document seen in training)."""
    def unit(s: DocVQASample) -> str:  # a question without a document is a unit of its own
        return f"doc:{s.doc_id}" if s.doc_id is not None else f"question:{s.question_id}"

    docs = sorted({unit(s) for s in dataset.samples})
    random.Random(seed).shuffle(docs)
    held = set(docs[: max(1, round(len(docs) * fraction))]) if fraction > 0 else set()
    train = [s for s in dataset.samples if unit(s) not in held]
    held_out = [replace(s, split=s.split + "-holdout") for s in dataset.samples if unit(s) in held]
    common = dict(pages=dataset.pages, source=dataset.source, skipped=dataset.skipped,
                  skipped_examples=dataset.skipped_examples)
    return DocVQADataset(samples=train, **common), DocVQADataset(samples=held_out, **common)


def merge_datasets(parts: Iterable[DocVQADataset]) -> DocVQADataset:
    """Concatenate datasets (e.g. two splits for one corpus); question ids must stay unique."""
    parts = list(parts)
    samples, pages, skipped, examples, seen = [], {}, Counter(), [], {}
    for part in parts:
        for s in part.samples:
            if s.question_id in seen:
                raise DataError(f"questionId {s.question_id} appears in both {seen[s.question_id]} and {part.source}")
            seen[s.question_id] = part.source
            samples.append(s)
        pages.update(part.pages)
        skipped.update(part.skipped)
        examples += part.skipped_examples
    return DocVQADataset(samples=samples, pages=pages, source=" + ".join(p.source for p in parts),
                         skipped=dict(skipped), skipped_examples=examples[:MAX_NAMED_SKIPS])

"""Rated answers -> training data in the official DocVQA JSON layout, read by `load_docvqa_json`.

    OUT/train.json         {"data": [...], "pages": [...]}: questions with a gold answer
    OUT/negative.json      down-votes without a correction: no gold answer, `rejected_answers`
    OUT/page_labels.json   raters' page labels as (question, page) pairs: {"pairs": [{response_id,
                           question, page_id, holds_answer}]}
    OUT/documents/*        the page images, one file per page
    OUT/export_summary.json

Rules, per rated answer:
* up-vote: the given answer is gold;
* down-vote with a correction: the correction is gold and the given answer is rejected (unless it
  normalizes to the correction);
* down-vote without a correction: into negative.json with the answer in `rejected_answers`, for
  the negative-reward mode (reward 0 for reproducing it; see `reward.scoring`). Train on it only
  by adding it to `data.extra_sources`.

A docqa answer's gold page is the cited page its rater marked as holding the answer; without a
mark, the first page it cited (the retriever's best: the record's "feedback" object says which rule gave
it). Marked "none" (no cited page holds the answer), the question has no gold page: its document
is the cited pages' document where they share one, else none (docvqa/loaders.py reads both). The
other cited pages join the corpus. A chat answer's pages are its uploaded images from the store,
each its own document `upload-<sha256>`.
An answer whose page image is missing or unreadable is skipped and reported by response and page
id; a cited page other than the first that is missing is left out and reported.

OUT that already holds an export is refused unless `overwrite` (a training run may read it). The
export is written into a sibling folder `OUT.tmp-<pid>` and moved into place when complete, so a
failure leaves OUT as it was: no half export, and with `overwrite` the earlier export intact.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from PIL import Image

from common.storage import Storage, is_uri
from feedback.store import NO_PAGE, FeedbackError, FeedbackStore, RatedInteraction

# page id -> the page's image: a file path or the encoded bytes; None when it is missing
PageImageSource = Callable[[str], "str | Path | bytes | None"]

DATASET_NAME = "docrl-feedback"
EXPORT_ENTRIES = ("train.json", "negative.json", "page_labels.json", "export_summary.json", "documents")  # what an export writes in OUT
MAX_NAMED_SKIPS = 50
_PAGE_ID = re.compile(r"^(?P<doc>.+)/p(?P<no>\d+)$")


@dataclass
class ExportSummary:
    out_dir: str
    since: str | None
    until: str | None
    rated: int = 0  # rated answers found in the time window
    exported: int = 0  # questions in train.json
    negative: int = 0  # questions in negative.json
    page_labels: int = 0  # (question, page) pairs in page_labels.json
    pages_written: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    problems: list[str] = field(default_factory=list)  # named by response id and page id

    def to_json(self) -> dict:
        return dict(self.__dict__)


def page_images_from_dataset(dataset) -> PageImageSource:
    """Page images of a loaded `DocVQADataset` (e.g. the config's corpus)."""

    def lookup(page_id: str):
        page = dataset.pages.get(page_id)
        if page is None:
            return None
        return page.image_bytes if page.image_bytes is not None else page.image_path

    return lookup


def page_images_from_index(index_dir: str | Path) -> PageImageSource:
    """Page images named by a retriever index's manifest (the pages the endpoint searched)."""
    manifest = json.loads((Path(index_dir) / "manifest.json").read_text())
    pages = manifest.get("pages", {})

    def lookup(page_id: str):
        source = (pages.get(page_id) or {}).get("source")
        return source if source and not source.startswith("<bytes:") else None

    return lookup


def chain_sources(*sources: PageImageSource) -> PageImageSource:
    def lookup(page_id: str):
        for source in sources:
            found = source(page_id)
            if found is not None:
                return found
        return None

    return lookup


def _safe(text: str, limit: int = 60) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)[:limit].strip("._") or "page"


def _normalized(text: str) -> str:
    return " ".join(text.lower().split())


class _PageWriter:
    """Writes each page image once under documents/, checking that it decodes."""

    def __init__(self, out: Path):
        self.out = out
        (out / "documents").mkdir(parents=True, exist_ok=True)
        self.written: dict[str, dict] = {}  # page id -> its "pages" entry

    def add(self, page_id: str, doc_id: str, page_no: int, image: str | Path | bytes | None) -> str | None:
        """The page's entry is recorded; returns None, or why the page cannot be exported."""
        if page_id in self.written:
            return None
        if image is None:
            return "image missing"
        try:
            data = image if isinstance(image, bytes) else Path(image).read_bytes()
        except OSError as e:
            return f"image missing ({e.strerror}: {image})"
        try:
            with Image.open(io.BytesIO(data)) as im:
                im.size  # noqa: B018 - header parse
                ext = {"JPEG": ".jpg", "PNG": ".png", "TIFF": ".tif", "WEBP": ".webp"}.get(im.format or "", ".png")
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            return f"image unreadable ({e})"
        digest = hashlib.sha1(page_id.encode()).hexdigest()[:8]
        rel = f"documents/{_safe(doc_id)}_p{page_no}_{digest}{ext}"
        tmp = self.out / (rel + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, self.out / rel)
        self.written[page_id] = {"image": rel, "ucsf_document_id": doc_id, "ucsf_document_page_no": str(page_no)}
        return None


def _pages_of(rated: RatedInteraction, store: FeedbackStore, page_image: PageImageSource | None):
    """[(page_id, doc_id, page_no, image)] of an answer, best (gold) page first."""
    it = rated.interaction
    out = []
    for pid in it.page_ids:
        m = _PAGE_ID.match(pid)
        doc, no = (m["doc"], int(m["no"])) if m else (pid, 1)
        out.append((pid, doc, no, page_image(pid) if page_image else None))
    for digest in it.image_hashes:
        doc = f"upload-{digest}"
        out.append((f"{doc}/p1", doc, 1, store.get_image(digest)))
    return out


class ExportExists(FeedbackError):
    """OUT already holds an export and `overwrite` was not given."""

    status = 409


def existing_export(out: Path) -> Path | None:
    """The first entry of an earlier export in `out`, if any."""
    return next((out / name for name in EXPORT_ENTRIES if (out / name).exists()), None)


def export_feedback(store: FeedbackStore, out_dir: str | Path, since: datetime | None = None,
                    until: datetime | None = None, page_image: PageImageSource | None = None,
                    overwrite: bool = False) -> ExportSummary:
    """Write the feedback given in [since, until) as DocVQA-layout training data (module docstring).
    `out_dir` may be an object store URI (`s3://bucket/exports/x`, as `run.storage` takes): the
    export is written here, then uploaded, its completion marker last."""
    if is_uri(str(out_dir)):
        return _export_to_storage(store, str(out_dir), since, until, page_image, overwrite)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FeedbackError(f"{out} is a file: the export is a folder (train.json, negative.json, documents/)")
    found = existing_export(out)
    if found is not None and not overwrite:
        raise ExportExists(f"{out} already holds a feedback export ({found}), which a training run may read: "
                           "export to a new OUT folder, or pass --overwrite to replace it")
    target = out.resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        summary = _write_export(store, staging, since, until, page_image)
        summary.out_dir = str(out)
        _write_json(staging / "export_summary.json", summary.to_json())
        _move_into_place(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return summary


def _export_to_storage(store: FeedbackStore, uri: str, since, until, page_image, overwrite: bool) -> ExportSummary:
    storage = Storage(uri)
    found = next((name for name in EXPORT_ENTRIES if storage.exists(name)), None)
    if found is not None and not overwrite:
        raise ExportExists(f"{uri} already holds a feedback export ({found}), which a training run may read: "
                           "export to a new OUT, or pass --overwrite to replace it")
    with tempfile.TemporaryDirectory(prefix="docrl-export-") as tmp:
        summary = export_feedback(store, Path(tmp) / "export", since, until, page_image)
        storage.upload_dir(Path(tmp) / "export", "")
    summary.out_dir = uri
    return summary


def _move_into_place(staging: Path, target: Path) -> None:
    """A new OUT is one rename. Into an existing OUT (an empty folder, or the export `overwrite`
    replaces) the export's entries move one by one; other files there stay. The earlier export's
    entries are set aside until the new ones are in, so a failure here leaves them recoverable in
    OUT.old-<pid>."""
    if not target.exists():
        os.rename(staging, target)
        return
    old = target.with_name(f"{target.name}.old-{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    old.mkdir()
    for name in EXPORT_ENTRIES:
        if (target / name).exists():
            os.rename(target / name, old / name)
    for entry in staging.iterdir():
        os.rename(entry, target / entry.name)
    shutil.rmtree(old)


def _write_export(store: FeedbackStore, out: Path, since: datetime | None, until: datetime | None,
                  page_image: PageImageSource | None) -> ExportSummary:
    summary = ExportSummary(str(out), since.isoformat() if since else None, until.isoformat() if until else None)
    skipped: Counter[str] = Counter()

    def problem(reason: str, message: str) -> None:
        skipped[reason] += 1
        if len(summary.problems) < MAX_NAMED_SKIPS:
            summary.problems.append(message)

    writer = _PageWriter(out)
    records: dict[str, list[dict]] = {"train": [], "negative": []}
    labels: list[dict] = []
    doc_numbers: dict[str, int] = {}
    rated_all = store.feedback(since, until)
    summary.rated = len(rated_all)
    for rated in rated_all:
        it, fb = rated.interaction, rated.feedback
        rid = it.response_id
        answer = it.answer.strip()
        if fb.rating == "up":
            answers, rejected = [answer], []
        elif fb.correction:
            answers = [fb.correction]
            rejected = [answer] if answer and _normalized(answer) != _normalized(fb.correction) else []
        else:
            answers, rejected = [], [answer]
        if not any(a.strip() for a in answers + rejected):
            problem("empty_answer", f"response {rid}: the rated answer is empty and there is no correction")
            continue
        pages = _pages_of(rated, store, page_image)
        if not pages:
            problem("no_page", f"response {rid}: the answer cited no page and had no uploaded image")
            continue
        labelled = fb.answer_page is not None
        no_page = fb.answer_page == NO_PAGE
        if labelled and not no_page:  # the rater's page first: it is the gold page
            pages.sort(key=lambda page: page[0] != fb.answer_page)
        gold_id, gold_doc, gold_no, gold_image = pages[0]
        why = None if no_page else writer.add(gold_id, gold_doc, gold_no, gold_image)
        if why is not None:
            problem("missing_image", f"response {rid}: page {gold_id}: {why}; skipped")
            continue
        for pid, doc, no, image in pages if no_page else pages[1:]:
            why = writer.add(pid, doc, no, image)
            if why is not None:
                problem("missing_extra_page", f"response {rid}: page {pid}: {why}; left out of the corpus")
        record = {"questionId": f"fb-{rid}", "question": it.question, "question_types": ["feedback"]}
        if not no_page:
            doc_numbers.setdefault(gold_doc, len(doc_numbers))
            record.update({"image": writer.written[gold_id]["image"], "docId": doc_numbers[gold_doc],
                           "ucsf_document_id": gold_doc, "ucsf_document_page_no": str(gold_no)})
        else:
            docs = {doc for pid, doc, _, _ in pages if pid in writer.written}
            if not docs:
                problem("missing_image", f"response {rid}: no cited page's image could be written; skipped")
                continue
            if len(docs) == 1:  # the question's document is known, its page is not
                record["ucsf_document_id"] = docs.pop()
        record.update({
            "answers": answers, "rejected_answers": rejected, "data_split": "train",
            "feedback": {"response_id": rid, "kind": it.kind, "rating": fb.rating, "comment": fb.comment,
                         "model": it.model, "weights_version": it.weights_version, "checkpoint": it.checkpoint,
                         "answered_at": it.created_at.isoformat(), "rated_at": fb.updated_at.isoformat(),
                         "gold_page": ("none: no cited page holds the answer" if no_page else
                                       "the rater's" if labelled else "the first cited")},
        })
        records["train" if answers else "negative"].append(record)
        labels += [{"response_id": rid, "question": it.question, "page_id": pid, "holds_answer": pid == fb.answer_page}
                   for pid, *_ in pages if labelled and pid in writer.written]
    pages_list = [dict(entry) for entry in writer.written.values()]
    for name, data in records.items():
        doc = {"dataset_name": DATASET_NAME, "dataset_version": "1.0", "dataset_split": "train",
               "data": data, "pages": pages_list}
        _write_json(out / f"{name}.json", doc)
    _write_json(out / "page_labels.json", {"pairs": labels})
    summary.exported, summary.negative, summary.page_labels = len(records["train"]), len(records["negative"]), len(labels)
    summary.pages_written = len(writer.written)
    summary.skipped = dict(skipped)
    return summary


def _write_json(path: Path, doc: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, ensure_ascii=False))
    os.replace(tmp, path)

"""`docrl feedback export OUT` next to an earlier export: refused unless --overwrite (a training
run may read OUT), and never a half-written export. The CLI runs as a subprocess, on SQLite."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest
from PIL import Image

from feedback.export import export_feedback
from feedback.store import FeedbackIn, FeedbackStore, Interaction

ROOT = Path(__file__).resolve().parents[1]
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)


def _png(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), color).save(buf, format="PNG")
    return buf.getvalue()


def _rate(db_url: str, rid: str, page_id: str, answer: str) -> None:
    store = FeedbackStore(db_url)
    try:
        store.record_interaction(Interaction(rid, "docqa", f"question {rid}", answer, page_ids=(page_id,),
                                             model="docrl", weights_version=1, checkpoint="step-1", created_at=T0))
        store.add_feedback(FeedbackIn(rid, "up"))
    finally:
        store.close()


@pytest.fixture
def feedback_db(tmp_path):
    """A feedback database with one up-voted answer, and an index manifest naming its page's file."""
    pages = {}
    for i, color in enumerate(("navy", "teal", "olive")):
        path = tmp_path / "pages" / f"p{i}.png"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(_png(color))
        pages[f"doc{i}/p1"] = {"source": str(path)}
    (tmp_path / "index").mkdir()
    (tmp_path / "index" / "manifest.json").write_text(json.dumps({"pages": pages}))
    db_url = f"sqlite:///{tmp_path / 'feedback.db'}"
    _rate(db_url, "r0", "doc0/p1", "first answer")
    return {"url": db_url, "index": tmp_path / "index", "pages": pages}


def _export(db, tmp_path, out, *flags) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cluster.cli", "feedback", "export", *flags, "--index", str(db["index"]),
                           str(out), f"feedback.database_url={db['url']}", f"run.output_dir={tmp_path / 'run'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def _questions(out: Path) -> list[str]:
    return [q["questionId"] for q in json.loads((out / "train.json").read_text())["data"]]


def test_an_earlier_export_is_kept_unless_overwrite_is_given(feedback_db, tmp_path):
    """Before: the second export replaced the first without a word, even while a run trained on it."""
    out = tmp_path / "exports" / "week1"
    first = _export(feedback_db, tmp_path, out)
    assert first.returncode == 0, first.stdout + first.stderr
    assert _questions(out) == ["fb-r0"]
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    _rate(feedback_db["url"], "r1", "doc1/p1", "second answer")
    again = _export(feedback_db, tmp_path, out)
    message = again.stdout + again.stderr
    assert again.returncode == 2, message
    assert f"docrl feedback: {out} already holds a feedback export ({out / 'train.json'})" in message
    assert "export to a new OUT folder, or pass --overwrite to replace it" in message and "Traceback" not in message
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # untouched

    replaced = _export(feedback_db, tmp_path, out, "--overwrite")
    assert replaced.returncode == 0, replaced.stdout + replaced.stderr
    assert sorted(_questions(out)) == ["fb-r0", "fb-r1"]
    assert json.loads((out / "export_summary.json").read_text())["exported"] == 2
    assert sorted(p.name for p in out.parent.iterdir()) == ["week1"]  # no staging or old copies left


def test_a_failed_export_leaves_no_half_export(feedback_db, tmp_path):
    """Before: the page images written so far (and no train.json) stayed in OUT; with --overwrite
    the earlier export was half replaced."""
    _rate(feedback_db["url"], "r1", "doc1/p1", "second answer")
    pages = feedback_db["pages"]

    def failing_source(page_id: str):
        if page_id == "doc1/p1":
            raise OSError("the page store went away")
        return pages[page_id]["source"]

    store = FeedbackStore(feedback_db["url"])
    try:
        out = tmp_path / "fresh"
        with pytest.raises(OSError, match="went away"):
            export_feedback(store, out, page_image=failing_source)
        assert not out.exists() and list(tmp_path.glob("fresh*")) == []

        kept = tmp_path / "kept"
        export_feedback(store, kept, page_image=lambda pid: pages[pid]["source"])
        before = {p.relative_to(kept): p.read_bytes() for p in kept.rglob("*") if p.is_file()}
        with pytest.raises(OSError, match="went away"):
            export_feedback(store, kept, page_image=failing_source, overwrite=True)
        assert {p.relative_to(kept): p.read_bytes() for p in kept.rglob("*") if p.is_file()} == before
        assert sorted(p.name for p in tmp_path.glob("kept*")) == ["kept"]
    finally:
        store.close()

"""The feedback loop's storage half (no Ray): store, migrations, validation, recorder, export, mixing.

Store tests run against SQLite and a real PostgreSQL server (tests/pg_server.py starts one on
loopback, or uses DOCRL_TEST_POSTGRES_URL; without either they skip, and fail under CI's
DOCRL_REQUIRE_POSTGRES=1).
"""

from __future__ import annotations

import io
import json
import threading
import time
from datetime import datetime, timedelta, timezone

import pytest
from PIL import Image
from pg_server import postgres_server, postgres_url  # noqa: F401 - fixtures
from sqlalchemy import create_engine, inspect, text

from docvqa.loaders import load_docvqa_json
from docvqa.sample import DocVQASample
from feedback.config import FeedbackConfig
from feedback.export import export_feedback, page_images_from_dataset
from feedback.migrations import LATEST, schema_version, upgrade
from feedback.recorder import InteractionRecorder
from feedback.store import (Base, FeedbackError, FeedbackIn, FeedbackStore, Interaction, StorageError, make_engine,
                            resolve_url)
from reward.config import RewardConfig
from reward.scoring import reward_metrics, score_one
from reward.types import ScoreRequest

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)


def png(color=(200, 30, 30), size=(64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'db' / 'feedback.db'}"
    return request.getfixturevalue("postgres_url")


def open_store(url, **policy) -> FeedbackStore:
    return FeedbackStore(url, FeedbackConfig(**policy))


def qa(rid, *, pages=("doc1/p1",), answer="Acme Inc", question="Who sent it?", at=T0, version=1, images=(),
       kind="docqa", checkpoint="step-10") -> Interaction:
    return Interaction(rid, kind, question, answer, page_ids=pages, images=images, model="docrl-tiny",
                       weights_version=version, checkpoint=checkpoint, created_at=at)


# ---------------------------------------------------------------------------------------------
# Store


def test_interactions_round_trip_and_images_are_stored_once(db_url):
    store = open_store(db_url)
    img = png()
    store.record_interactions([qa("r1"), qa("r2", kind="chat", pages=(), images=(img,), at=T0 + timedelta(hours=1)),
                               qa("r3", kind="chat", pages=(), images=(img, png((0, 0, 255))), at=T0 + timedelta(hours=2))])
    store.record_interaction(qa("r1", answer="a retry does not overwrite"))
    got = store.get_interaction("r1")
    assert got.answer == "Acme Inc" and got.page_ids == ("doc1/p1",) and got.created_at == T0
    assert got.weights_version == 1 and got.checkpoint == "step-10" and got.model == "docrl-tiny"
    r2, r3 = store.get_interaction("r2"), store.get_interaction("r3")
    assert r2.image_hashes[0] == r3.image_hashes[0] and store.get_image(r2.image_hashes[0]) == img
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM images")).scalar_one() == 2
    assert [i.response_id for i in store.interactions(since=T0 + timedelta(minutes=30))] == ["r2", "r3"]
    assert [i.response_id for i in store.interactions(until=T0 + timedelta(minutes=30))] == ["r1"]
    assert store.get_interaction("nope") is None and store.get_image("0" * 64) is None
    store.close()


def test_user_text_is_stored_as_data(db_url):
    store = open_store(db_url)
    nasty = "'); DROP TABLE feedback; -- \u00e9\u4e2d\U0001F600 {{7*7}} <script>"
    store.record_interaction(qa("r1", question=nasty + "\x00", answer=nasty))
    store.add_feedback(FeedbackIn("r1", "down", correction=nasty, comment=nasty))
    (rated,) = store.feedback()
    assert rated.interaction.question == nasty and rated.feedback.correction == nasty == rated.feedback.comment
    store.close()


BAD_FEEDBACK = [
    (FeedbackIn("missing", "up"), 404, "unknown response_id 'missing'"),
    (FeedbackIn("r1", "meh"), 422, "rating must be 'up' or 'down'"),
    (FeedbackIn("", "up"), 422, "response_id must be a non-empty string"),
    (FeedbackIn("x" * 200, "up"), 422, "response_id is 200 characters long; the limit is 128"),
    (FeedbackIn("r1", "down", correction="   "), 422, "rating 'down' needs a correction (got an empty correction"),
    (FeedbackIn("r1", "down"), 422, "rating 'down' needs a correction (got no correction"),
    (FeedbackIn("r1", "down", correction="x" * 41), 422, "correction is 41 characters long; the limit is 40"),
    (FeedbackIn("r1", "up", comment="y" * 61), 422, "comment is 61 characters long; the limit is 60"),
    (FeedbackIn("r1", "up", correction="Acme"), 422, "a correction comes with rating 'down'"),
    (FeedbackIn("r1", "down", correction="a\x00b"), 422, "correction contains a NUL character"),
]


def test_bad_feedback_gets_its_status_and_names_the_problem(db_url):
    store = open_store(db_url, require_correction_on_down=True, max_correction_chars=40, max_comment_chars=60)
    store.record_interaction(qa("r1"))
    for fb, status, message in BAD_FEEDBACK:
        with pytest.raises(FeedbackError) as err:
            store.add_feedback(fb)
        assert err.value.status == status and message in err.value.message, (fb, err.value.message)
    assert store.feedback() == []
    store.close()


@pytest.mark.parametrize("body, message", [
    ([1, 2], "the body must be a JSON object"),
    ({"response_id": "r1"}, "rating is required"),
    ({"response_id": "r1", "rating": "up", "corection": "x"}, "unknown field(s) 'corection'"),
    ({"response_id": 5, "rating": "up"}, "response_id must be a string (got int)"),
    ({"response_id": "r1", "rating": "down", "correction": {"$ne": 1}}, "correction must be a string (got dict)"),
])
def test_request_bodies_are_parsed_strictly(body, message):
    with pytest.raises(FeedbackError) as err:
        FeedbackIn.from_json(body)
    assert err.value.status == 422 and message in err.value.message
    assert FeedbackIn.from_json({"response_id": "r1", "rating": "down", "correction": "X"}) == FeedbackIn("r1", "down", "X")


def test_duplicate_feedback_is_refused_or_replaces(db_url):
    refuse = open_store(db_url, on_duplicate="refuse")
    refuse.record_interaction(qa("r1"))
    first = refuse.add_feedback(FeedbackIn("r1", "down", correction="  Acme Ltd  ", comment="wrong company"))
    assert first.correction == "Acme Ltd" and not first.replaced
    with pytest.raises(FeedbackError) as err:
        refuse.add_feedback(FeedbackIn("r1", "up"))
    assert err.value.status == 409 and "already has feedback (rating 'down'" in err.value.message
    replace = open_store(db_url, on_duplicate="replace")
    second = replace.add_feedback(FeedbackIn("r1", "up"))
    assert second.replaced and second.created_at == first.created_at and second.updated_at >= first.updated_at
    (rated,) = replace.feedback()
    assert (rated.feedback.rating, rated.feedback.correction, rated.feedback.comment) == ("up", None, None)
    refuse.close(), replace.close()


def test_stats_per_model_version(db_url):
    store = open_store(db_url)
    store.record_interactions([qa(f"a{i}", version=1) for i in range(4)] + [qa(f"b{i}", version=2) for i in range(3)])
    for rid, rating, corr in [("a0", "up", None), ("a1", "down", "X"), ("a2", "down", None), ("b0", "up", None),
                              ("b1", "up", None)]:
        store.add_feedback(FeedbackIn(rid, rating, corr))
    v1, v2 = store.stats()
    assert (v1.weights_version, v1.answers, v1.up, v1.down, v1.corrections) == (1, 4, 1, 2, 1)
    assert v1.up_rate == pytest.approx(1 / 3) and v1.down_rate == pytest.approx(2 / 3)
    assert (v2.weights_version, v2.answers, v2.rated, v2.up_rate) == (2, 3, 2, 1.0)
    assert v2.as_metrics()["docrl_feedback_up_rate"] == 1.0 and v2.tags()["weights_version"] == "2"
    assert store.stats(since=T0 + timedelta(days=1)) == []
    store.close()


# ---------------------------------------------------------------------------------------------
# Migrations


def test_old_schema_is_upgraded_and_matches_the_models(db_url):
    engine = make_engine(resolve_url(db_url))
    if db_url.startswith("sqlite"):
        from pathlib import Path

        Path(engine.url.database).parent.mkdir(parents=True, exist_ok=True)
    assert upgrade(engine, target=1) == [1] and schema_version(engine) == 1
    with engine.begin() as conn:  # a row written by the version-1 code
        conn.execute(text("INSERT INTO interactions (response_id, kind, question, page_ids, image_hashes, answer, model, "
                          "created_at) VALUES ('old', 'docqa', 'Q?', '[\"d/p1\"]', '[]', 'A', 'm', '2026-01-01 00:00:00')"))
    engine.dispose()
    store = open_store(db_url)
    assert store.migrate() == [2, 3] and store.migrate() == []
    assert schema_version(store.engine) == LATEST
    assert store.get_interaction("old").page_ids == ("d/p1",)
    insp = inspect(store.engine)
    for table in Base.metadata.sorted_tables:
        cols = {c["name"]: c["nullable"] for c in insp.get_columns(table.name)}
        assert cols == {c.name: c.nullable for c in table.columns}, table.name
        assert {i["name"] for i in insp.get_indexes(table.name)} == {i.name for i in table.indexes}, table.name
        assert insp.get_pk_constraint(table.name)["constrained_columns"] == [c.name for c in table.primary_key]
    assert insp.get_foreign_keys("feedback")[0]["referred_table"] == "interactions"
    store.close()


def test_replicas_opening_one_database_at_once_migrate_it_once(db_url):
    stores = [open_store(db_url) for _ in range(4)]
    applied, errors = [], []

    def open_one(s):
        try:
            applied.append(s.migrate())
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=open_one, args=(s,)) for s in stores]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors and sorted(applied) == [[], [], [], list(range(1, LATEST + 1))]
    [s.close() for s in stores]


def test_a_newer_schema_is_refused(tmp_path):
    url = f"sqlite:///{tmp_path / 'f.db'}"
    open_store(url).migrate()
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE docrl_schema_version SET version = 99"))
    with pytest.raises(StorageError, match="schema version 99, newer than this docrl knows"):
        open_store(url).migrate()


def test_database_settings(tmp_path, monkeypatch):
    from cluster.config import ConfigError, load_config

    cfg = load_config("configs/tiny.yaml")
    assert cfg.feedback.url(cfg.run.output_dir) == "sqlite:///runs/tiny/feedback/feedback.db"
    with pytest.raises(ConfigError, match="feedback.on_duplicate"):
        load_config("configs/tiny.yaml", ["feedback.on_duplicate=ignore"])
    with pytest.raises(ConfigError, match="feedback.databse_url: unknown key"):
        load_config("configs/tiny.yaml", ["feedback.databse_url=x"])
    monkeypatch.setenv("DOCRL_TEST_DB_PASSWORD", "s3cr:t/@")
    url = resolve_url("postgresql://docrl@db.example:5432/fb", "DOCRL_TEST_DB_PASSWORD")
    assert url.drivername == "postgresql+psycopg" and url.password == "s3cr:t/@"
    store = FeedbackStore("postgresql://docrl@db.example:5432/fb", password_env="DOCRL_TEST_DB_PASSWORD")
    assert "s3cr" not in repr(store) and "***" in store.where  # never shown
    with pytest.raises(StorageError, match="environment variable DOCRL_TEST_NOPE is not set"):
        resolve_url("postgresql://docrl@db/fb", "DOCRL_TEST_NOPE")
    with pytest.raises(StorageError, match="unsupported database 'mysql'"):
        resolve_url("mysql://u@h/db")


# ---------------------------------------------------------------------------------------------
# Recorder


def test_recorder_writes_in_the_background_and_feedback_waits_for_its_answer(db_url):
    rec = InteractionRecorder(open_store(db_url), flush_interval_s=0.05, batch_size=8)
    for i in range(20):
        assert rec.record(qa(f"r{i}", images=(png((i, 0, 0)),) if i % 5 == 0 else ()))
    # the answer may still be queued: add_feedback waits for it instead of answering 404
    assert rec.add_feedback(FeedbackIn("r19", "up")).rating == "up"
    with pytest.raises(FeedbackError) as err:
        rec.add_feedback(FeedbackIn("resp-never-answered", "up"))
    assert err.value.status == 404
    assert rec.flush(10)
    stats = rec.stats()
    assert (stats.recorded, stats.dropped, stats.write_errors, stats.queue_depth, stats.queued_image_bytes) == (20, 0, 0, 0, 0)
    assert stats.storage_ok and stats.as_metrics()["docrl_feedback_recorded"] == 20.0
    assert len(rec.store.interactions()) == 20
    rec.close(5)


@pytest.mark.parametrize("where", ["sqlite_dir_is_a_file", "postgres_closed_port"])
def test_a_storage_outage_never_fails_or_slows_recording(tmp_path, where):
    if where == "sqlite_dir_is_a_file":
        (tmp_path / "blocked").write_text("a file where the database folder should be")
        url = f"sqlite:///{tmp_path / 'blocked' / 'feedback.db'}"
    else:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]  # closed once we leave: nothing listens there
        url = f"postgresql://docrl@127.0.0.1:{port}/feedback"
    rec = InteractionRecorder(open_store(url), queue_size=5, flush_interval_s=0.01, retry_max_s=0.05,
                              pending_wait_s=0.2, warn_every_s=60)
    t0 = time.perf_counter()
    accepted = [rec.record(qa(f"r{i}")) for i in range(8)]
    assert time.perf_counter() - t0 < 0.5  # never waits for the database
    assert accepted.count(False) >= 1  # the bounded queue dropped some instead of growing
    deadline = time.monotonic() + 10
    while rec.stats().write_errors < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    stats = rec.stats()
    assert stats.write_errors >= 2 and not stats.storage_ok and "unavailable" in stats.last_error
    assert stats.queue_depth == accepted.count(True)
    with pytest.raises(StorageError) as err:  # POST /v1/feedback answers 503, the answer path goes on
        rec.add_feedback(FeedbackIn("r0", "up"))
    assert err.value.status == 503
    final = rec.close(timeout=0.2)
    assert final.recorded == 0 and final.dropped == 8 and final.queue_depth == 0


def test_recording_resumes_after_an_outage_and_drops_only_refused_rows(tmp_path):
    blocker = tmp_path / "db"
    blocker.write_text("blocks the database folder")
    rec = InteractionRecorder(open_store(f"sqlite:///{blocker / 'feedback.db'}"), flush_interval_s=0.01,
                              retry_max_s=0.05)
    for i in range(3):
        rec.record(qa(f"r{i}"))
    rec.record(Interaction("bad", "fax", "Q", "A"))  # a kind the store refuses
    deadline = time.monotonic() + 10
    while rec.stats().write_errors == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    blocker.unlink()  # the database comes back
    assert rec.flush(10)
    stats = rec.close(5)
    assert (stats.recorded, stats.dropped, stats.storage_ok) == (3, 1, True)


def test_recorder_bounds_queued_image_bytes(tmp_path):
    store = open_store(f"sqlite:///{tmp_path / 'f.db'}")
    rec = InteractionRecorder(store, max_queued_image_bytes=1000)
    assert not rec.record(qa("big", images=(b"x" * 2000,)))
    assert rec.record(qa("small"))
    stats = rec.close(5)
    assert (stats.recorded, stats.dropped) == (1, 1)
    assert not rec.record(qa("after-close"))  # closed: dropped, not raised


# ---------------------------------------------------------------------------------------------
# Export and training data


@pytest.fixture
def corpus_pages(tmp_path):
    """Three page images on disk, by page id, as the endpoint's corpus would have them."""
    root = tmp_path / "corpus"
    root.mkdir()
    paths = {}
    for i, pid in enumerate(["inv1/p1", "inv1/p2", "letter7/p3"]):
        paths[pid] = root / f"page{i}.png"
        paths[pid].write_bytes(png((40 * i, 100, 100)))
    return paths


def rate_everything(store: FeedbackStore) -> None:
    upload = png((0, 128, 0))
    store.record_interactions([
        qa("up1", pages=("inv1/p1", "inv1/p2"), answer="$1,250.00"),
        qa("fix1", pages=("letter7/p3",), answer="John Smith", question="Who signed?"),
        qa("neg1", kind="chat", pages=(), images=(upload,), answer="blue", question="What colour?"),
        qa("gone1", pages=("deleted/p1",), answer="x"),
        qa("unrated", pages=("inv1/p1",)),
        qa("old1", pages=("inv1/p1",)),
    ])
    store.add_feedback(FeedbackIn("up1", "up"))
    store.add_feedback(FeedbackIn("fix1", "down", correction="Jane Smith", comment="wrong signer"))
    store.add_feedback(FeedbackIn("neg1", "down"))
    store.add_feedback(FeedbackIn("gone1", "up"))


def test_export_writes_the_docvqa_layout_that_the_loader_reads(db_url, corpus_pages, tmp_path):
    store = open_store(db_url)
    store.record_interaction(qa("early", pages=("inv1/p1",)))
    store.add_feedback(FeedbackIn("early", "up"))
    since = datetime.now(timezone.utc)
    time.sleep(0.01)
    rate_everything(store)
    out = tmp_path / "export"
    summary = export_feedback(store, out, since=since, page_image=lambda pid: corpus_pages.get(pid))
    assert (summary.rated, summary.exported, summary.negative) == (4, 2, 1)
    assert summary.skipped == {"missing_image": 1}
    assert any("response gone1: page deleted/p1: image missing" in p for p in summary.problems)
    assert json.loads((out / "export_summary.json").read_text())["skipped"] == {"missing_image": 1}

    train = load_docvqa_json(out / "train.json", on_bad="stop")
    by_id = {s.question_id: s for s in train.samples}
    assert set(by_id) == {"fb-up1", "fb-fix1"}
    up, fix = by_id["fb-up1"], by_id["fb-fix1"]
    assert up.answers == ("$1,250.00",) and up.rejected_answers == () and up.gold_page == "inv1/p1"
    assert up.doc_pages == ("inv1/p1", "inv1/p2")  # every cited page joins the corpus
    assert fix.answers == ("Jane Smith",) and fix.rejected_answers == ("John Smith",) and fix.question == "Who signed?"
    assert train.pages["letter7/p3"].load_image().tobytes() == Image.open(corpus_pages["letter7/p3"]).convert("RGB").tobytes()

    negative = load_docvqa_json(out / "negative.json", on_bad="stop")
    (neg,) = negative.samples
    assert neg.answers == () and neg.rejected_answers == ("blue",) and neg.gold_page.startswith("upload-")
    assert negative.pages[neg.gold_page].load_image().getpixel((0, 0)) == (0, 128, 0)
    raw = json.loads((out / "train.json").read_text())["data"]
    assert {r["feedback"]["rating"] for r in raw} == {"up", "down"} and raw[0]["feedback"]["weights_version"] == 1
    store.close()


def test_data_config_mixes_feedback_with_docvqa_by_weight(tmp_path, synthetic_corpus):
    from docvqa.config import DataConfig
    from docvqa.data import load_train_eval, weighted_mix

    main = load_docvqa_json(synthetic_corpus / "train_v1.0.json")
    store = open_store(f"sqlite:///{tmp_path / 'f.db'}")
    pids = sorted(main.pages)[:3]
    store.record_interactions([qa(f"r{i}", pages=(pid,), answer=f"answer {i}") for i, pid in enumerate(pids)])
    for i in range(3):
        store.add_feedback(FeedbackIn(f"r{i}", "up"))
    export_feedback(store, tmp_path / "fb", page_image=page_images_from_dataset(main))

    cfg = DataConfig(source="docvqa_json", path=str(synthetic_corpus),
                     extra_sources=[{"path": str(tmp_path / "fb"), "weight": 0.5}])
    train, evaluation, corpus = load_train_eval(cfg, tmp_path)
    fb = [s for s in train.samples if s.question_id.startswith("fb-")]
    share = len(fb) / len(train.samples)
    assert share == pytest.approx(0.5 / 1.5, abs=0.02)
    assert len({s.question_id for s in train.samples}) == len(train.samples)  # repeats are renamed "#k"
    assert {s.question_id.split("#")[0] for s in fb} == {"fb-r0", "fb-r1", "fb-r2"}
    assert set(main.pages) <= set(corpus.pages) and not any(s.question_id.startswith("fb-") for s in evaluation.samples)

    a = [DocVQASample(f"a{i}", "q", ("x",), "d", "d/p1", ("d/p1",)) for i in range(100)]
    b = [DocVQASample(f"b{i}", "q", ("x",), "d", "d/p1", ("d/p1",)) for i in range(30)]
    mix = weighted_mix([(a, 3.0), (b, 1.0)], seed=0)
    assert sum(s.question_id.startswith("b") for s in mix) / len(mix) == pytest.approx(0.25, abs=0.02)
    assert weighted_mix([(a, 3.0), ([], 1.0)], seed=0) == a
    with pytest.raises(ValueError, match="extra_sources.0.weight"):
        from cluster.config import load_config

        load_config("configs/tiny.yaml", ['data.extra_sources=[{path: x, weight: 0}]'])
    store.close()


def test_reproducing_a_rejected_answer_scores_zero():
    cfg = RewardConfig(components={"anls": 1.0, "format": 0.2})
    fixed = DocVQASample("q1", "Who signed?", ("Jane Smith",), "d", "d/p1", ("d/p1",), rejected_answers=("John Smith",))
    assert score_one(ScoreRequest(fixed, "Jane Smith"), cfg).reward == pytest.approx(1.2)
    wrong = score_one(ScoreRequest(fixed, "john  smith"), cfg)
    assert wrong.reproduced_rejected and wrong.reward == 0.0 and wrong.components["anls"] > 0.5
    negative = DocVQASample("q2", "What colour?", (), "d", "d/p1", ("d/p1",), rejected_answers=("blue",))
    avoided = score_one(ScoreRequest(negative, "green"), cfg)
    assert avoided.components["anls"] == 0.0 and avoided.reward == pytest.approx(0.2) and not avoided.reproduced_rejected
    again = score_one(ScoreRequest(negative, "Blue"), cfg)
    assert again.reproduced_rejected and again.reward == 0.0
    assert reward_metrics([avoided, again])["reward/reproduced_rejected"] == 0.5
    with pytest.raises(ValueError, match="sample q3: gold answers must be a non-empty"):
        score_one(ScoreRequest(DocVQASample("q3", "?", (), "d", "d/p1", ("d/p1",)), "x"), cfg)


def test_cli_export_and_stats(tmp_path, synthetic_corpus, capsys):
    from cluster.cli import build_parser

    def main(argv):  # cluster.cli.main without its logging set-up and torch-importing error types
        args, rest = build_parser().parse_known_args(argv)
        args.overrides = list(args.overrides) + rest
        return args.func(args)

    db = f"sqlite:///{tmp_path / 'f.db'}"
    main_set = load_docvqa_json(synthetic_corpus / "train_v1.0.json")
    store = open_store(db)
    pid = sorted(main_set.pages)[0]
    store.record_interactions([qa("c1", pages=(pid,), version=3), qa("c2", pages=("nowhere/p9",), version=3)])
    store.add_feedback(FeedbackIn("c1", "down", correction="Right"))
    store.add_feedback(FeedbackIn("c2", "up"))
    store.close()
    args = ["--config", "configs/tiny.yaml", f"feedback.database_url={db}", "data.source=docvqa_json",
            f"data.path={synthetic_corpus}", f"run.output_dir={tmp_path / 'run'}"]
    assert main(["feedback", "stats", *args]) == 0
    out = capsys.readouterr().out
    assert "docrl-tiny" in out and "50.0%" in out and out.splitlines()[0].split()[:3] == ["model", "checkpoint", "weights"]
    assert main(["feedback", "export", "--since", "2000-01-01", str(tmp_path / "out"), *args]) == 0
    out = capsys.readouterr().out
    assert "exported 1 questions" in out and "response c2: page nowhere/p9: image missing" in out
    assert load_docvqa_json(tmp_path / "out" / "train.json").samples[0].answers == ("Right",)
    with pytest.raises(SystemExit):
        main(["feedback", "export", "--since", "yesterday", str(tmp_path / "o2"), *args])
    assert "'yesterday' is not an ISO 8601 date" in capsys.readouterr().err
    (tmp_path / "blocked").write_text("not a folder")
    assert main(["feedback", "stats", "--config", "configs/tiny.yaml",
                 f"feedback.database_url=sqlite:///{tmp_path / 'blocked' / 'x.db'}"]) == 2
    assert "docrl feedback: feedback database sqlite:///" in capsys.readouterr().err


def test_raters_page_labels_are_checked_stored_and_exported_as_gold_pages_and_pairs(db_url, corpus_pages, tmp_path):
    from feedback.store import NO_PAGE

    store = open_store(db_url, on_duplicate="replace")
    store.record_interactions([
        qa("second", pages=("inv1/p1", "inv1/p2"), answer="$1,250.00"),
        qa("nowhere", pages=("inv1/p1", "inv1/p2"), answer="$9.00", question="What is the tax?"),
        qa("unlabelled", pages=("letter7/p3",), answer="Jane", question="Who signed?"),
        qa("chat1", kind="chat", pages=(), images=(png(),)),
    ])
    for fb, message in [
        (FeedbackIn("second", "up", answer_page="letter7/p3"),
         "answer_page 'letter7/p3' is not a page response 'second' cited (inv1/p1, inv1/p2), nor 'none'"),
        (FeedbackIn("chat1", "up", answer_page="upload/p1"), "answer_page: response 'chat1' cited no indexed page"),
    ]:
        with pytest.raises(FeedbackError) as err:
            store.add_feedback(fb)
        assert err.value.status == 422 and message in err.value.message
    rec = store.add_feedback(FeedbackIn("second", "up", answer_page=" inv1/p2 "))
    assert rec.answer_page == "inv1/p2"
    store.add_feedback(FeedbackIn("nowhere", "down", correction="$19.00", answer_page=NO_PAGE))
    store.add_feedback(FeedbackIn("unlabelled", "up"))
    assert {r.interaction.response_id: r.feedback.answer_page for r in store.feedback()} == {
        "second": "inv1/p2", "nowhere": NO_PAGE, "unlabelled": None}

    out = tmp_path / "export"
    summary = export_feedback(store, out, page_image=lambda pid: corpus_pages.get(pid))
    assert (summary.exported, summary.page_labels, summary.skipped) == (3, 4, {})
    train = load_docvqa_json(out / "train.json", on_bad="stop")
    by_id = {s.question_id: s for s in train.samples}
    # the rater's page is the gold page; "none": the document is known, its page is not; no label:
    # the first cited page, as before
    assert by_id["fb-second"].gold_page == "inv1/p2"
    assert (by_id["fb-nowhere"].gold_page, by_id["fb-nowhere"].doc_id) == (None, "inv1")
    assert by_id["fb-nowhere"].doc_pages == ("inv1/p1", "inv1/p2") and by_id["fb-nowhere"].answers == ("$19.00",)
    assert by_id["fb-unlabelled"].gold_page == "letter7/p3"
    raw = {r["questionId"]: r["feedback"]["gold_page"] for r in json.loads((out / "train.json").read_text())["data"]}
    assert raw == {"fb-second": "the rater's", "fb-nowhere": "none: no cited page holds the answer",
                   "fb-unlabelled": "the first cited"}
    pairs = json.loads((out / "page_labels.json").read_text())["pairs"]
    assert sorted((p["response_id"], p["page_id"], p["holds_answer"]) for p in pairs) == [
        ("nowhere", "inv1/p1", False), ("nowhere", "inv1/p2", False),
        ("second", "inv1/p1", False), ("second", "inv1/p2", True)]
    assert {p["question"] for p in pairs if p["response_id"] == "nowhere"} == {"What is the tax?"}
    store.close()

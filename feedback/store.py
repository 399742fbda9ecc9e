"""The feedback database: what the endpoint answered, the page images users uploaded, and ratings.

`FeedbackStore(url)` speaks SQLAlchemy 2 to an SQLite file (the embedded default, one node) or a
PostgreSQL server (several Serve replicas on several nodes). Creating a store never connects; the
first call does, and migrates the schema to the latest version (`feedback.migrations`), so a
store can be built while the database is still down.

Tables:
* ``interactions``: one row per answer, keyed by its response id: kind (docqa | chat), question,
  cited page ids, hashes of uploaded images, the answer, model name, weights version, checkpoint
  and time.
* ``images``: uploaded page images, stored once by SHA-256 *in the database*. Replicas on several
  nodes share nothing but the database, so a content-addressed directory would need a shared
  filesystem; bytes in the database are written in the same transaction as the interaction that
  cites them and travel with backups. Uploads are bounded by the endpoint's request limit.
* ``feedback``: at most one row per response id (rating up | down, optional correction and
  comment, and optionally which cited page holds the answer, or that none does); a second rating is refused (409) or replaces the first, as `feedback.on_duplicate` says.

Every user text is bound as a parameter and stored as data; nothing is ever evaluated.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import (JSON, CheckConstraint, Connection, DateTime, ForeignKey, Index, Integer, LargeBinary, String,
                        Text, TypeDecorator, and_, case, create_engine, event, func, select)
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import ArgumentError, DataError, IntegrityError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from feedback.config import FeedbackConfig
from feedback.migrations import SchemaError, upgrade

RATINGS = ("up", "down")
NO_PAGE = "none"  # answer_page: none of the cited pages holds the answer
KINDS = ("docqa", "chat")
MAX_RESPONSE_ID_CHARS = 128
MAX_PAGE_ID_CHARS = 1000
MAX_STORED_TEXT_CHARS = 65_536  # questions/answers longer than this are cut before storage


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def new_response_id(prefix: str = "resp") -> str:
    """A fresh id for an answer: what the endpoint returns and POST /v1/feedback refers to."""
    return f"{prefix}-{uuid.uuid4().hex}"


# ---------------------------------------------------------------------------------------------
# Errors: each carries the HTTP status the endpoint answers with


class FeedbackError(Exception):
    """A feedback request or storage operation that failed; `status` is the HTTP status to answer."""

    status: int = 400

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class FeedbackValidationError(FeedbackError):
    status = 422


class UnknownResponseError(FeedbackError):
    status = 404


class DuplicateFeedbackError(FeedbackError):
    status = 409


class StorageError(FeedbackError):
    """The database failed. `transient`: worth retrying (unreachable, locked), as opposed to a
    row the database refuses or a schema this code cannot use."""

    status = 503

    def __init__(self, message: str, transient: bool = True):
        super().__init__(message)
        self.transient = transient


# ---------------------------------------------------------------------------------------------
# Messages


@dataclass(frozen=True)
class Interaction:
    """One answer of the endpoint, as the ingress hands it to the recorder.

    `images` are the encoded bytes of uploaded images (chat); the store keeps each once, by hash.
    `page_ids` are the corpus pages the answer cited, best first (docqa).
    """

    response_id: str
    kind: Literal["docqa", "chat"]
    question: str
    answer: str
    page_ids: tuple[str, ...] = ()
    images: tuple[bytes, ...] = field(default=(), repr=False)
    model: str = ""
    weights_version: int | None = None
    checkpoint: str | None = None
    created_at: datetime = field(default_factory=utcnow)

    @property
    def image_bytes(self) -> int:
        return sum(len(b) for b in self.images)


@dataclass(frozen=True)
class FeedbackIn:
    """A rating of one answer: the body of POST /v1/feedback."""

    response_id: str
    rating: Literal["up", "down"]
    correction: str | None = None
    comment: str | None = None
    # the rater's page label: the id of the cited page that holds the answer, or NO_PAGE
    answer_page: str | None = None

    FIELDS = ("response_id", "rating", "correction", "comment", "answer_page")

    @classmethod
    def from_json(cls, body: Any) -> FeedbackIn:
        """Parse a decoded JSON body; raises FeedbackValidationError (422) naming the field."""
        if not isinstance(body, dict):
            raise FeedbackValidationError(f"the body must be a JSON object with {', '.join(cls.FIELDS)}")
        unknown = sorted(set(body) - set(cls.FIELDS))
        if unknown:
            raise FeedbackValidationError(f"unknown field(s) {', '.join(map(repr, unknown))}; "
                                          f"known: {', '.join(cls.FIELDS)}")
        for name in ("response_id", "rating"):
            if name not in body:
                raise FeedbackValidationError(f"{name} is required")
        for name in cls.FIELDS:
            value = body.get(name)
            if value is not None and not isinstance(value, str):
                raise FeedbackValidationError(f"{name} must be a string (got {type(value).__name__})")
        return cls(body["response_id"], body["rating"], body.get("correction"), body.get("comment"),
                   body.get("answer_page"))


@dataclass(frozen=True)
class FeedbackRecord:
    """Stored feedback. `replaced`: this call replaced earlier feedback for the same response."""

    response_id: str
    rating: str
    correction: str | None
    comment: str | None
    created_at: datetime
    updated_at: datetime
    replaced: bool = False
    answer_page: str | None = None  # FeedbackIn.answer_page


@dataclass(frozen=True)
class StoredInteraction:
    response_id: str
    kind: str
    question: str
    answer: str
    page_ids: tuple[str, ...]
    image_hashes: tuple[str, ...]
    model: str
    weights_version: int | None
    checkpoint: str | None
    created_at: datetime


@dataclass(frozen=True)
class RatedInteraction:
    interaction: StoredInteraction
    feedback: FeedbackRecord


@dataclass(frozen=True)
class VersionStats:
    """Ratings of the answers one model version gave."""

    model: str
    checkpoint: str | None
    weights_version: int | None
    answers: int
    up: int
    down: int
    corrections: int

    @property
    def rated(self) -> int:
        return self.up + self.down

    @property
    def up_rate(self) -> float | None:
        return self.up / self.rated if self.rated else None

    @property
    def down_rate(self) -> float | None:
        return self.down / self.rated if self.rated else None

    def tags(self) -> dict[str, str]:
        """Metric tags naming the version."""
        return {"model": self.model, "checkpoint": self.checkpoint or "",
                "weights_version": "" if self.weights_version is None else str(self.weights_version)}

    def as_metrics(self, prefix: str = "docrl_feedback_") -> dict[str, float]:
        """Gauges for the dashboard (publish with `tags()`); rates only once something was rated."""
        out = {f"{prefix}{k}": float(getattr(self, k)) for k in ("answers", "up", "down", "corrections")}
        if self.rated:
            out[f"{prefix}up_rate"], out[f"{prefix}down_rate"] = self.up_rate, self.down_rate
        return out


TIMELINE_BUCKETS = ("hour", "day")


@dataclass(frozen=True)
class TimelinePoint:
    """The ratings of the answers one model version gave in one hour or day (UTC), `start` its first instant."""

    start: datetime
    version: VersionStats


# ---------------------------------------------------------------------------------------------
# Validation


def _check_text(name: str, value: str | None, limit: int) -> str | None:
    """Strip; empty -> None; refuse what is too long or holds NUL (PostgreSQL cannot store it)."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    if len(value) > limit:
        raise FeedbackValidationError(f"{name} is {len(value)} characters long; the limit is {limit}")
    if "\x00" in value:
        raise FeedbackValidationError(f"{name} contains a NUL character")
    return value


def check_response_id(response_id: Any) -> str:
    if not isinstance(response_id, str) or not response_id.strip():
        raise FeedbackValidationError("response_id must be a non-empty string")
    if len(response_id) > MAX_RESPONSE_ID_CHARS:
        raise FeedbackValidationError(f"response_id is {len(response_id)} characters long; "
                                      f"the limit is {MAX_RESPONSE_ID_CHARS}")
    return response_id.strip()


def validate_feedback(fb: FeedbackIn, policy: FeedbackConfig) -> FeedbackIn:
    """The feedback as it will be stored (texts stripped), or FeedbackValidationError (422)."""
    rid = check_response_id(fb.response_id)
    if fb.rating not in RATINGS:
        raise FeedbackValidationError(f"rating must be 'up' or 'down' (got {fb.rating!r})")
    correction = _check_text("correction", fb.correction, policy.max_correction_chars)
    comment = _check_text("comment", fb.comment, policy.max_comment_chars)
    if fb.rating == "up" and correction is not None:
        raise FeedbackValidationError("a correction comes with rating 'down'; an up-vote accepts the given answer")
    if fb.rating == "down" and correction is None and policy.require_correction_on_down:
        what = "an empty correction" if fb.correction is not None else "no correction"
        raise FeedbackValidationError(f"rating 'down' needs a correction (got {what}; "
                                      "feedback.require_correction_on_down is true)")
    answer_page = _check_text("answer_page", fb.answer_page, MAX_PAGE_ID_CHARS)
    return FeedbackIn(rid, fb.rating, correction, comment, answer_page)


def check_answer_page(answer_page: str | None, response_id: str, kind: str, page_ids: Sequence[str]) -> None:
    """A page label names one of the pages the answer cited, or NO_PAGE; FeedbackValidationError otherwise."""
    if answer_page is None:
        return
    if kind != "docqa" or not page_ids:
        raise FeedbackValidationError(f"answer_page: response {response_id!r} cited no indexed page to label")
    if answer_page != NO_PAGE and answer_page not in page_ids:
        raise FeedbackValidationError(f"answer_page {answer_page!r} is not a page response {response_id!r} cited "
                                      f"({', '.join(page_ids)}), nor {NO_PAGE!r}")


def _clip(text: str, limit: int = MAX_STORED_TEXT_CHARS) -> str:
    return text.replace("\x00", "")[:limit]


# ---------------------------------------------------------------------------------------------
# Models (the latest schema; `feedback.migrations` builds it version by version)


class UTCDateTime(TypeDecorator):
    """Aware UTC datetimes in, aware UTC datetimes out, stored naive UTC (SQLite has no zones)."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=timezone.utc)


class Base(DeclarativeBase):
    pass


class InteractionRow(Base):
    __tablename__ = "interactions"
    response_id: Mapped[str] = mapped_column(String(MAX_RESPONSE_ID_CHARS), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    question: Mapped[str] = mapped_column(Text)
    page_ids: Mapped[list] = mapped_column(JSON)
    image_hashes: Mapped[list] = mapped_column(JSON)
    answer: Mapped[str] = mapped_column(Text)
    model: Mapped[str] = mapped_column(String(200))
    weights_version: Mapped[int | None] = mapped_column(Integer)
    checkpoint: Mapped[str | None] = mapped_column(String(1000))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    __table_args__ = (Index("ix_interactions_created_at", "created_at"),)


class ImageRow(Base):
    __tablename__ = "images"
    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)
    num_bytes: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class FeedbackRow(Base):
    __tablename__ = "feedback"
    response_id: Mapped[str] = mapped_column(
        String(MAX_RESPONSE_ID_CHARS), ForeignKey("interactions.response_id", ondelete="CASCADE"), primary_key=True)
    rating: Mapped[str] = mapped_column(String(8))
    correction: Mapped[str | None] = mapped_column(Text)
    comment: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    answer_page: Mapped[str | None] = mapped_column(Text)
    __table_args__ = (CheckConstraint("rating IN ('up', 'down')", name="ck_feedback_rating"),
                      Index("ix_feedback_updated_at", "updated_at"))


INTERACTIONS = InteractionRow.__table__
IMAGES = ImageRow.__table__
FEEDBACK = FeedbackRow.__table__


# ---------------------------------------------------------------------------------------------
# Engine


def resolve_url(url: str, password_env: str | None = None) -> URL:
    """Parse a database URL: plain postgresql:// uses psycopg 3; the password comes from the
    environment variable `password_env` when given. Only SQLite and PostgreSQL are supported."""
    try:
        u = make_url(url)
    except ArgumentError as e:
        raise StorageError(f"feedback.database_url {url!r} is not a database URL: {e}", transient=False) from None
    backend = u.get_backend_name()
    if backend not in ("sqlite", "postgresql"):
        raise StorageError(f"feedback.database_url: unsupported database {backend!r}; use sqlite:///PATH "
                           "or postgresql://USER@HOST:PORT/DB", transient=False)
    if backend == "postgresql" and u.drivername in ("postgresql", "postgres"):
        u = u.set(drivername="postgresql+psycopg")
    if password_env:
        password = os.environ.get(password_env)
        if not password:
            raise StorageError(f"feedback.password_env: the environment variable {password_env} is not set",
                               transient=False)
        u = u.set(password=password)
    return u


def make_engine(url: URL) -> Engine:
    if url.get_backend_name() == "sqlite":
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_connect(dbapi_conn, _record) -> None:
            # Let SQLAlchemy, not the sqlite3 module, start transactions (so DDL is transactional
            # and the migration lock below works); WAL lets readers run beside the recorder.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA journal_mode=WAL")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Connection) -> None:
            write_lock = conn.get_execution_options().get("docrl_write_lock")
            conn.exec_driver_sql("BEGIN IMMEDIATE" if write_lock else "BEGIN")

        return engine
    # pre-ping: after an outage, pooled connections are dead; test them instead of failing once
    return create_engine(url, pool_pre_ping=True, connect_args={"connect_timeout": 5})


def _dialect_insert(conn: Connection):
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert


def _first_line(e: BaseException) -> str:
    orig = getattr(e, "orig", None) or e
    return (str(orig).strip().splitlines() or [type(orig).__name__])[0]


# ---------------------------------------------------------------------------------------------
# The store


class FeedbackStore:
    """Interactions, images and feedback in one SQL database. Thread-safe (a connection pool)."""

    def __init__(self, url: str, policy: FeedbackConfig | None = None, password_env: str | None = None):
        self.policy = policy or FeedbackConfig()
        self.url = resolve_url(url, password_env)
        self.where = self.url.render_as_string(hide_password=True)
        self.engine = make_engine(self.url)
        self._migrated = False
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, cfg: FeedbackConfig, output_dir: str | Path) -> FeedbackStore:
        return cls(cfg.url(output_dir), policy=cfg, password_env=cfg.password_env)

    def close(self) -> None:
        self.engine.dispose()

    def __repr__(self) -> str:
        return f"FeedbackStore({self.where})"

    # -- connection and schema -----------------------------------------------------------------

    def migrate(self) -> list[int]:
        """Bring the schema to the latest version; returns the versions applied (maybe none)."""
        with self._lock:
            deadline = time.monotonic() + 30.0
            while True:
                try:
                    if self.url.get_backend_name() == "sqlite" and self.url.database not in (None, "", ":memory:"):
                        Path(self.url.database).parent.mkdir(parents=True, exist_ok=True)
                    applied = upgrade(self.engine)
                    break
                except SchemaError as e:
                    raise StorageError(f"feedback database {self.where}: {e}", transient=False) from None
                except (OSError, SQLAlchemyError) as e:
                    # Replicas opening a new SQLite file at once: switching it to WAL needs the file
                    # to itself, and SQLite answers "database is locked" at once, without waiting
                    # its busy timeout, while another replica migrates. Seen in CI; wait and retry.
                    if "database is locked" in str(e) and time.monotonic() < deadline:
                        time.sleep(0.2)
                        continue
                    raise StorageError(f"feedback database {self.where} unavailable: {_first_line(e)}") from e
            self._migrated = True
            return applied

    @contextmanager
    def _transaction(self, write: bool = False) -> Iterator[Connection]:
        """One transaction; database failures become StorageError naming the database."""
        if not self._migrated:
            self.migrate()
        try:
            with self.engine.connect() as conn:
                if write:
                    conn = conn.execution_options(docrl_write_lock=True)
                with conn.begin():
                    yield conn
        except FeedbackError:
            raise
        except (IntegrityError, DataError) as e:
            # this row, not the database: retrying will not help
            raise StorageError(f"feedback database {self.where} refused a row: {_first_line(e)}", transient=False) from e
        except (OSError, SQLAlchemyError) as e:
            raise StorageError(f"feedback database {self.where} unavailable: {_first_line(e)}") from e

    # -- interactions --------------------------------------------------------------------------

    def record_interactions(self, items: Sequence[Interaction]) -> None:
        """Write answers (and their images, once each) in one transaction. Recording the same
        response id twice keeps the first (a retried batch is harmless)."""
        interactions, images = [], {}
        for it in items:
            rid = check_response_id(it.response_id)
            if it.kind not in KINDS:
                raise FeedbackValidationError(f"interaction {rid}: kind must be one of {KINDS} (got {it.kind!r})")
            hashes = []
            for data in it.images:
                digest = hashlib.sha256(data).hexdigest()
                hashes.append(digest)
                images[digest] = data
            interactions.append({
                "response_id": rid, "kind": it.kind, "question": _clip(it.question), "answer": _clip(it.answer),
                "page_ids": [str(p) for p in it.page_ids], "image_hashes": hashes, "model": _clip(it.model, 200),
                "weights_version": it.weights_version,
                "checkpoint": _clip(it.checkpoint, 1000) if it.checkpoint is not None else None,
                "created_at": it.created_at,
            })
        if not interactions:
            return
        with self._transaction(write=True) as conn:
            insert = _dialect_insert(conn)
            now = utcnow()
            for digest, data in images.items():
                conn.execute(insert(IMAGES).values(sha256=digest, data=data, num_bytes=len(data), created_at=now)
                             .on_conflict_do_nothing(index_elements=["sha256"]))
            conn.execute(insert(INTERACTIONS).on_conflict_do_nothing(index_elements=["response_id"]), interactions)

    def record_interaction(self, item: Interaction) -> None:
        self.record_interactions([item])

    @staticmethod
    def _interaction(row) -> StoredInteraction:
        return StoredInteraction(
            response_id=row.response_id, kind=row.kind, question=row.question, answer=row.answer,
            page_ids=tuple(row.page_ids or ()), image_hashes=tuple(row.image_hashes or ()), model=row.model,
            weights_version=row.weights_version, checkpoint=row.checkpoint, created_at=row.created_at)

    def get_interaction(self, response_id: str) -> StoredInteraction | None:
        with self._transaction() as conn:
            row = conn.execute(select(INTERACTIONS).where(INTERACTIONS.c.response_id == response_id)).first()
        return self._interaction(row) if row else None

    def interactions(self, since: datetime | None = None, until: datetime | None = None) -> list[StoredInteraction]:
        """Answers recorded in [since, until), oldest first."""
        query = select(INTERACTIONS).order_by(INTERACTIONS.c.created_at, INTERACTIONS.c.response_id)
        if since is not None:
            query = query.where(INTERACTIONS.c.created_at >= since)
        if until is not None:
            query = query.where(INTERACTIONS.c.created_at < until)
        with self._transaction() as conn:
            return [self._interaction(r) for r in conn.execute(query)]

    def get_image(self, sha256: str) -> bytes | None:
        with self._transaction() as conn:
            return conn.execute(select(IMAGES.c.data).where(IMAGES.c.sha256 == sha256)).scalar_one_or_none()

    # -- feedback ------------------------------------------------------------------------------

    def add_feedback(self, fb: FeedbackIn) -> FeedbackRecord:
        """Store a rating. Raises FeedbackValidationError (422), UnknownResponseError (404),
        DuplicateFeedbackError (409, when `on_duplicate` is 'refuse') or StorageError (503)."""
        fb = validate_feedback(fb, self.policy)
        with self._transaction(write=True) as conn:
            known = conn.execute(select(INTERACTIONS.c.kind, INTERACTIONS.c.page_ids)
                                 .where(INTERACTIONS.c.response_id == fb.response_id)).first()
            if known is None:
                raise UnknownResponseError(f"unknown response_id {fb.response_id!r}: no answer with this id was recorded")
            check_answer_page(fb.answer_page, fb.response_id, known.kind, known.page_ids)
            earlier = conn.execute(select(FEEDBACK.c.created_at, FEEDBACK.c.rating)
                                   .where(FEEDBACK.c.response_id == fb.response_id)).first()
            now = utcnow()
            values = {"response_id": fb.response_id, "rating": fb.rating, "correction": fb.correction,
                      "comment": fb.comment, "answer_page": fb.answer_page, "created_at": now, "updated_at": now}
            stmt = _dialect_insert(conn)(FEEDBACK).values(**values)
            if self.policy.on_duplicate == "refuse":
                # the conflict clause, not the read above, decides: two replicas may race here
                # (RETURNING, not rowcount: psycopg 3 reports -1 for a skipped conflict)
                inserted = conn.execute(stmt.on_conflict_do_nothing(index_elements=["response_id"])
                                        .returning(FEEDBACK.c.response_id)).first()
                if inserted is None:
                    raise DuplicateFeedbackError(
                        f"response_id {fb.response_id!r} already has feedback"
                        + (f" (rating {earlier.rating!r} at {earlier.created_at.isoformat()})" if earlier else "")
                        + "; feedback.on_duplicate is 'refuse'")
            else:
                conn.execute(stmt.on_conflict_do_update(
                    index_elements=["response_id"],
                    set_={k: values[k] for k in ("rating", "correction", "comment", "answer_page", "updated_at")}))
            created = earlier.created_at if earlier is not None else now
        return FeedbackRecord(fb.response_id, fb.rating, fb.correction, fb.comment, created, now,
                              replaced=earlier is not None, answer_page=fb.answer_page)

    def feedback(self, since: datetime | None = None, until: datetime | None = None) -> list[RatedInteraction]:
        """Rated answers whose feedback was given or last changed in [since, until), oldest first."""
        query = (select(INTERACTIONS, FEEDBACK.c.rating, FEEDBACK.c.correction, FEEDBACK.c.comment,
                        FEEDBACK.c.answer_page, FEEDBACK.c.created_at.label("rated_at"), FEEDBACK.c.updated_at)
                 .join(FEEDBACK, FEEDBACK.c.response_id == INTERACTIONS.c.response_id)
                 .order_by(FEEDBACK.c.updated_at, FEEDBACK.c.response_id))
        if since is not None:
            query = query.where(FEEDBACK.c.updated_at >= since)
        if until is not None:
            query = query.where(FEEDBACK.c.updated_at < until)
        with self._transaction() as conn:
            rows = conn.execute(query).all()
        return [RatedInteraction(self._interaction(r), FeedbackRecord(
            r.response_id, r.rating, r.correction, r.comment, r.rated_at, r.updated_at, answer_page=r.answer_page))
            for r in rows]

    @staticmethod
    def _ratings_query(*extra_columns):
        """Answers and their ratings counted per (model, checkpoint, weights version, *extra_columns)."""
        i, f = INTERACTIONS.c, FEEDBACK.c
        keys = (i.model, i.checkpoint, i.weights_version, *extra_columns)
        return (select(*keys, func.count(i.response_id).label("answers"),
                       func.sum(case((f.rating == "up", 1), else_=0)).label("up"),
                       func.sum(case((f.rating == "down", 1), else_=0)).label("down"),
                       func.sum(case((and_(f.rating == "down", f.correction.is_not(None)), 1), else_=0))
                       .label("corrections"))
                .select_from(INTERACTIONS.outerjoin(FEEDBACK, f.response_id == i.response_id))
                .group_by(*keys))

    @staticmethod
    def _version_stats(row) -> VersionStats:
        return VersionStats(row.model, row.checkpoint, row.weights_version, int(row.answers), int(row.up or 0),
                            int(row.down or 0), int(row.corrections or 0))

    @staticmethod
    def _version_order(s: VersionStats) -> tuple:
        return s.model, s.checkpoint or "", -1 if s.weights_version is None else s.weights_version

    def stats(self, since: datetime | None = None) -> list[VersionStats]:
        """Answers and ratings per (model, checkpoint, weights version), for answers given since `since`."""
        query = self._ratings_query()
        if since is not None:
            query = query.where(INTERACTIONS.c.created_at >= since)
        with self._transaction() as conn:
            rows = conn.execute(query).all()
        return sorted((self._version_stats(r) for r in rows), key=self._version_order)

    def timeline(self, bucket: str = "day", since: datetime | None = None) -> list[TimelinePoint]:
        """`stats` per hour or day (UTC) of the answers' time, oldest first: how each model
        version's answers were rated over time (the rater page's chart)."""
        if bucket not in TIMELINE_BUCKETS:
            raise FeedbackValidationError(f"bucket must be one of {', '.join(TIMELINE_BUCKETS)} (got {bucket!r})")
        created = INTERACTIONS.c.created_at
        with self._transaction() as conn:
            if conn.dialect.name == "postgresql":
                start = func.date_trunc(bucket, created)
            else:  # SQLite keeps datetimes as 'YYYY-MM-DD HH:MM:SS.ffffff' text
                start = func.strftime("%Y-%m-%d 00:00:00" if bucket == "day" else "%Y-%m-%d %H:00:00", created)
            query = self._ratings_query(start.label("start"))
            if since is not None:
                query = query.where(created >= since)
            rows = conn.execute(query).all()
        points = [TimelinePoint(_utc(r.start), self._version_stats(r)) for r in rows]
        return sorted(points, key=lambda p: (p.start, self._version_order(p.version)))

    def unrated(self, limit: int = 20) -> list[StoredInteraction]:
        """The newest answers that have no feedback yet, newest first (the rater page's queue)."""
        if not isinstance(limit, int) or limit < 1:
            raise FeedbackValidationError(f"limit must be a positive integer (got {limit!r})")
        i = INTERACTIONS.c
        query = (select(INTERACTIONS)
                 .select_from(INTERACTIONS.outerjoin(FEEDBACK, FEEDBACK.c.response_id == i.response_id))
                 .where(FEEDBACK.c.response_id.is_(None))
                 .order_by(i.created_at.desc(), i.response_id.desc()).limit(limit))
        with self._transaction() as conn:
            return [self._interaction(r) for r in conn.execute(query)]


def _utc(value: datetime | str) -> datetime:
    """A bucket start as the database returned it (PostgreSQL: a naive UTC datetime; SQLite: text)."""
    t = datetime.fromisoformat(value) if isinstance(value, str) else value
    return t.replace(tzinfo=timezone.utc) if t.tzinfo is None else t.astimezone(timezone.utc)

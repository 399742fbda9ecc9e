"""Record answers without slowing or failing requests: a bounded queue and one writer thread.

`InteractionRecorder.record(interaction)` only puts the interaction in a queue and returns; a
daemon thread writes batches to the `FeedbackStore`. While the database is down the thread keeps
the oldest batch and retries it with exponential backoff (up to `retry_max_s`); the queue fills,
and past `queue_size` interactions or `max_queued_image_bytes` of uploaded images new ones are
dropped and counted, so memory stays bounded. Failures are counted (`stats()`), logged as
warnings at most once a minute, and never reach the caller. A batch the database refuses as data
(not an outage) is written one by one and the refused interactions are dropped, named in the log.

`add_feedback` is the synchronous path of POST /v1/feedback: it waits (briefly) for the rated
answer to leave the queue, then writes through the store, raising `FeedbackError`s with their
HTTP status.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from feedback.config import FeedbackConfig
from feedback.store import FeedbackIn, FeedbackRecord, FeedbackStore, Interaction, StorageError, UnknownResponseError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RecorderStats:
    recorded: int  # interactions written
    dropped: int  # interactions lost: queue full, image bytes over the bound, refused by the database, close timeout
    write_errors: int  # failed write attempts (each retried later)
    queue_depth: int  # interactions waiting, including a batch being retried
    queued_image_bytes: int
    storage_ok: bool  # the last write attempt succeeded (True before the first one)
    last_error: str | None

    def as_metrics(self, prefix: str = "docrl_feedback_") -> dict[str, float]:
        """Gauges for a metrics exporter (Ray metrics, Prometheus)."""
        return {f"{prefix}{k}": float(v) for k, v in asdict(self).items() if k != "last_error"}


class _RateLimitedLog:
    """At most one warning per `every_s`, with the number of suppressed ones."""

    def __init__(self, every_s: float):
        self.every_s, self.last, self.suppressed = every_s, float("-inf"), 0

    def warning(self, msg: str, *args) -> None:
        now = time.monotonic()
        if now - self.last < self.every_s:
            self.suppressed += 1
            return
        if self.suppressed:
            msg += f" ({self.suppressed} similar messages suppressed)"
        self.last, self.suppressed = now, 0
        log.warning(msg, *args)


class InteractionRecorder:
    """Asynchronous interaction log in front of a `FeedbackStore` (see the module docstring)."""

    def __init__(self, store: FeedbackStore, *, queue_size: int = 10_000,
                 max_queued_image_bytes: int = 256 * 1024 * 1024, flush_interval_s: float = 0.5,
                 batch_size: int = 64, retry_max_s: float = 30.0, pending_wait_s: float = 2.0,
                 warn_every_s: float = 60.0):
        self.store = store
        self.max_queued_image_bytes = max_queued_image_bytes
        self.flush_interval_s, self.batch_size = flush_interval_s, batch_size
        self.retry_max_s, self.pending_wait_s = retry_max_s, pending_wait_s
        self._queue: queue.Queue[Interaction] = queue.Queue(maxsize=queue_size)
        self._cond = threading.Condition()  # guards the counters and `_pending`
        self._pending: dict[str, int] = {}  # response id -> queued copies (feedback waits for these)
        self._recorded = self._dropped = self._write_errors = self._queued_bytes = self._in_flight = 0
        self._storage_ok, self._last_error = True, None
        self._warn_drop, self._warn_write = _RateLimitedLog(warn_every_s), _RateLimitedLog(warn_every_s)
        self._stop = threading.Event()
        self._wake = threading.Event()  # cuts a retry wait short (close)
        self._close_deadline = float("inf")
        self._thread = threading.Thread(target=self._run, name="docrl-feedback-recorder", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(cls, cfg: FeedbackConfig, output_dir: str | Path) -> InteractionRecorder:
        return cls(FeedbackStore.from_config(cfg, output_dir), queue_size=cfg.queue_size,
                   max_queued_image_bytes=cfg.max_queued_image_bytes, flush_interval_s=cfg.flush_interval_s,
                   batch_size=cfg.batch_size, retry_max_s=cfg.retry_max_s, pending_wait_s=cfg.pending_wait_s)

    # -- the request path ----------------------------------------------------------------------

    def record(self, interaction: Interaction) -> bool:
        """Queue an answer for writing. Never blocks, never raises; False when it was dropped."""
        try:
            size = interaction.image_bytes
            with self._cond:
                if self._stop.is_set():
                    return self._drop_locked(1, "the recorder is closed")
                if self._queued_bytes + size > self.max_queued_image_bytes:
                    return self._drop_locked(1, f"queued image bytes would exceed {self.max_queued_image_bytes}")
                try:
                    self._queue.put_nowait(interaction)
                except queue.Full:
                    return self._drop_locked(1, f"queue full ({self._queue.maxsize} interactions)")
                self._queued_bytes += size
                self._pending[interaction.response_id] = self._pending.get(interaction.response_id, 0) + 1
            return True
        except Exception as e:  # noqa: BLE001 - recording must never fail a request
            with self._cond:
                self._dropped += 1
            log.warning("feedback recorder: could not queue an interaction (%s: %s)", type(e).__name__, e)
            return False

    def add_feedback(self, fb: FeedbackIn) -> FeedbackRecord:
        """Store feedback for an answer (waiting up to `pending_wait_s` for that answer to be
        written). Raises FeedbackError subclasses: 422, 404, 409, or 503 (storage)."""
        with self._cond:
            written = self._cond.wait_for(lambda: fb.response_id not in self._pending, timeout=self.pending_wait_s)
        if not written:
            raise StorageError(f"the answer {fb.response_id!r} is not stored yet (the feedback database is slow "
                               "or down); retry later")
        try:
            return self.store.add_feedback(fb)
        except UnknownResponseError:
            # Another replica may have given this answer and not flushed it yet: look once more
            # after one of its flush intervals before answering 404.
            time.sleep(self.flush_interval_s + 0.25)
            return self.store.add_feedback(fb)

    def stats(self) -> RecorderStats:
        with self._cond:
            return RecorderStats(recorded=self._recorded, dropped=self._dropped, write_errors=self._write_errors,
                                 queue_depth=self._queue.qsize() + self._in_flight,
                                 queued_image_bytes=self._queued_bytes, storage_ok=self._storage_ok,
                                 last_error=self._last_error)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every queued interaction is written or dropped; False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._cond:
                if not self._pending and self._queue.empty() and not self._in_flight:
                    return True
                self._cond.wait(timeout=min(0.05, max(0.0, deadline - time.monotonic())))
        return False

    def close(self, timeout: float = 10.0) -> RecorderStats:
        """Stop accepting, write what is queued (for at most `timeout` seconds; what is left after
        that is dropped and counted), stop the thread and release the database."""
        with self._cond:
            self._close_deadline = time.monotonic() + timeout
            self._stop.set()
        self._wake.set()
        self._thread.join(timeout + 5.0)
        self.store.close()
        return self.stats()

    # -- the writer thread ---------------------------------------------------------------------

    def _drop_locked(self, n: int, why: str) -> bool:
        self._dropped += n
        self._warn_drop.warning("feedback recorder: dropped %d interaction(s): %s", n, why)
        return False

    def _done(self, items: list[Interaction], written: bool, why: str = "") -> None:
        with self._cond:
            for it in items:
                left = self._pending.get(it.response_id, 0) - 1
                if left > 0:
                    self._pending[it.response_id] = left
                else:
                    self._pending.pop(it.response_id, None)
                self._queued_bytes -= it.image_bytes
            self._in_flight -= len(items)
            if written:
                self._recorded += len(items)
            elif items:
                self._drop_locked(len(items), why)
            self._cond.notify_all()

    def _failed(self, e: StorageError) -> None:
        with self._cond:
            self._write_errors += 1
            self._storage_ok, self._last_error = False, e.message
        self._warn_write.warning("feedback recorder: cannot write interactions (answers go on; will retry): %s", e.message)

    def _next_batch(self) -> list[Interaction]:
        try:
            first = self._queue.get(timeout=self.flush_interval_s)
        except queue.Empty:
            return []
        batch = [first]
        while len(batch) < self.batch_size:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
        with self._cond:
            self._in_flight += len(batch)
        return batch

    def _write(self, batch: list[Interaction]) -> bool:
        """Write `batch`, removing what was written or refused; False on an outage (retry later)."""
        try:
            self.store.record_interactions(batch)
        except StorageError as e:
            if e.transient:
                self._failed(e)
                return False
            return self._write_one_by_one(batch)
        except Exception as e:  # noqa: BLE001 - a refused interaction (bad id or kind), or a bug
            log.debug("feedback recorder: batch refused (%s); writing one by one", e)
            return self._write_one_by_one(batch)
        self._done(batch[:], written=True)
        batch.clear()
        self._succeeded()
        return True

    def _succeeded(self) -> None:
        with self._cond:
            recovered, self._storage_ok = not self._storage_ok, True
        if recovered:
            log.warning("feedback recorder: the feedback database is available again")

    def _write_one_by_one(self, batch: list[Interaction]) -> bool:
        while batch:
            it = batch[0]
            try:
                self.store.record_interactions([it])
            except StorageError as e:
                if e.transient:
                    self._failed(e)
                    return False
                self._done([batch.pop(0)], written=False, why=f"response {it.response_id!r} refused: {e.message}")
                continue
            except Exception as e:  # noqa: BLE001
                self._done([batch.pop(0)], written=False, why=f"response {it.response_id!r} refused: {e}")
                continue
            self._done([batch.pop(0)], written=True)
            self._succeeded()
        return True

    def _run(self) -> None:
        batch: list[Interaction] = []
        backoff = 0.0
        while True:
            if not batch:
                if self._stop.is_set() and self._queue.empty():
                    return
                batch = self._next_batch()
                if not batch:
                    continue
            if self._write(batch):
                backoff = 0.0
                continue
            if self._stop.is_set() and time.monotonic() >= self._close_deadline:
                rest = list(batch)
                while True:
                    try:
                        rest.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                with self._cond:
                    self._in_flight += len(rest) - len(batch)
                self._done(rest, written=False, why="the database was still unavailable when the recorder closed")
                return
            backoff = min(self.retry_max_s, max(0.1, backoff * 2))
            wait = min(backoff, max(0.0, self._close_deadline - time.monotonic()))
            self._wake.wait(wait)
            self._wake.clear()

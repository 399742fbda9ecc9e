"""The feedback loop in the Serve ingress: what `POST /v1/feedback` and `GET /v1/feedback/stats`
answer, and the `docrl_feedback_*` gauges. The storage itself is the `feedback` package
(`InteractionRecorder` in front of a `FeedbackStore`); the routes are in `deploy/app.py`.

Gauges (Ray metrics; Prometheus shows them as `ray_docrl_feedback_*`), set every
`serve.feedback_metrics_interval_s` by a background thread of each ingress replica:

* the replica's recorder (tag `replica`): recorded, dropped, write_errors, queue_depth,
  queued_image_bytes, storage_ok (1/0);
* the database's ratings per model version (tags `model`, `checkpoint`, `weights_version`):
  answers, up, down, corrections, and up_rate / down_rate once something was rated. Every replica
  publishes the same database-wide numbers.

The rater page (`deploy/ui/`: static HTML, JS and CSS, no build step) is served by the same
ingress at `/ui` with a Content-Security-Policy that allows only its own files: no inline script
or style, nothing from another origin. It reads and writes through the API (`/v1/docqa`,
`/v1/chat/completions`, `/v1/feedback`, `/v1/feedback/queue`, `/v1/feedback/timeline`,
`/v1/pages/{page_id}/image`) with the key the rater typed, which it keeps in the tab's
sessionStorage.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import asdict
from pathlib import Path

from deploy.api import APIError
from feedback.config import FeedbackConfig
from feedback.recorder import RecorderStats
from feedback.store import (MAX_PAGE_ID_CHARS, MAX_RESPONSE_ID_CHARS, FeedbackError, FeedbackRecord, StorageError, StoredInteraction,
                            TimelinePoint, VersionStats, resolve_url)

log = logging.getLogger(__name__)

RECORDER_TAGS = ("replica",)
VERSION_TAGS = ("model", "checkpoint", "weights_version")

# HTTP status of a FeedbackError -> (OpenAI error type, code)
_ERROR_KINDS = {404: ("not_found_error", "response_not_found"), 409: ("invalid_request_error", "feedback_exists"),
                422: ("invalid_request_error", "invalid_feedback"), 503: ("server_error", "feedback_unavailable")}


def resolved_feedback_config(cfg: FeedbackConfig, output_dir: str | Path, base_dir: str | Path) -> FeedbackConfig:
    """The feedback section as the replicas get it: `database_url` set (the default SQLite file
    under `output_dir`; a relative SQLite path taken from `base_dir`) and checked now, so that a
    bad URL or an unset password variable stops the application at build time. A database that
    is down is not an error here (answers are recorded once it is back). The password stays in
    its environment variable; replicas read it there."""
    from sqlalchemy.engine import make_url

    url = cfg.url(output_dir)
    try:
        resolve_url(url, cfg.password_env)
    except StorageError as e:
        raise ValueError(f"feedback: {e.message} (or set feedback.enabled=false to serve without recording "
                         f"answers)") from None
    u = make_url(url)
    if u.get_backend_name() == "sqlite" and u.database not in (None, "", ":memory:") and not Path(u.database).is_absolute():
        url = u.set(database=str(Path(base_dir) / u.database)).render_as_string(hide_password=False)
    return cfg.model_copy(update={"database_url": url})


def feedback_body_limit(cfg: FeedbackConfig, max_request_bytes: int) -> int:
    """Bytes a POST /v1/feedback body may have: room for the longest texts the feedback section
    accepts, each character JSON-escaped at worst (12 bytes: an escaped surrogate pair), and never
    more than serve.limits.max_request_bytes. Longer texts in a body under this get 422."""
    return min(max_request_bytes, 12 * (cfg.max_correction_chars + cfg.max_comment_chars + MAX_RESPONSE_ID_CHARS + MAX_PAGE_ID_CHARS) + 4096)


def feedback_body_schema() -> dict:
    """The JSON schema of a POST /v1/feedback body (FeedbackIn), for the OpenAPI description, with
    the feedback section's default limits (a server configured lower answers longer texts 422)."""
    cfg = FeedbackConfig()
    return {"type": "object", "additionalProperties": False, "required": ["response_id", "rating"], "properties": {
        "response_id": {"type": "string", "maxLength": MAX_RESPONSE_ID_CHARS,
                        "description": "the `id` of a /v1/chat/completions or /v1/docqa answer"},
        "rating": {"type": "string", "enum": ["up", "down"]},
        "correction": {"type": ["string", "null"], "maxLength": cfg.max_correction_chars,
                       "description": "the right answer (a down-vote's correction)"},
        "comment": {"type": ["string", "null"], "maxLength": cfg.max_comment_chars},
        "answer_page": {"type": ["string", "null"], "maxLength": MAX_PAGE_ID_CHARS,
                        "description": "the id of the cited page that holds the answer, or \"none\" when none "
                                       "of the cited pages does (docqa answers)"}}}


def feedback_api_error(e: FeedbackError) -> APIError:
    type_, code = _ERROR_KINDS.get(e.status, ("invalid_request_error", None))
    return APIError(e.status, e.message, type=type_, code=code)


def feedback_body(rec: FeedbackRecord) -> dict:
    return {"object": "feedback", "response_id": rec.response_id, "rating": rec.rating, "correction": rec.correction,
            "comment": rec.comment, "answer_page": rec.answer_page, "created_at": rec.created_at.isoformat(), "updated_at": rec.updated_at.isoformat(),
            "replaced": rec.replaced}


def version_body(v: VersionStats) -> dict:
    return {"model": v.model, "checkpoint": v.checkpoint, "weights_version": v.weights_version, "answers": v.answers,
            "rated": v.rated, "up": v.up, "down": v.down, "corrections": v.corrections, "up_rate": v.up_rate,
            "down_rate": v.down_rate}


def stats_body(recorder_stats: RecorderStats, versions: list[VersionStats] | None, error: str | None,
               replica: str) -> dict:
    """GET /v1/feedback/stats: this replica's recorder (`replica`: its gauges' tag), and the ratings
    per model version (None, with `error`, while the database cannot be read)."""
    return {"object": "feedback.stats", "replica": replica, "recorder": asdict(recorder_stats),
            "versions": None if versions is None else [version_body(v) for v in versions], "error": error}


def interaction_body(it: StoredInteraction) -> dict:
    """An answer waiting for a rating, as GET /v1/feedback/queue lists it (uploaded images by count:
    the API serves only the index's page images)."""
    return {"response_id": it.response_id, "kind": it.kind, "question": it.question, "answer": it.answer,
            "page_ids": list(it.page_ids), "uploaded_images": len(it.image_hashes), "model": it.model,
            "weights_version": it.weights_version, "checkpoint": it.checkpoint, "created_at": it.created_at.isoformat()}


def queue_body(items: list[StoredInteraction], limit: int) -> dict:
    return {"object": "list", "limit": limit, "data": [interaction_body(it) for it in items]}


def timeline_body(points: list[TimelinePoint], bucket: str, since) -> dict:
    """GET /v1/feedback/timeline: `version_body` per model version and hour or day of the answers."""
    return {"object": "feedback.timeline", "bucket": bucket, "since": None if since is None else since.isoformat(),
            "points": [{"start": p.start.isoformat(), **version_body(p.version)} for p in points]}


# -- the rater page's files ---------------------------------------------------------------------

UI_DIR = Path(__file__).parent / "ui"
UI_PAGE = "index.html"
UI_ASSETS = {"app.js": "text/javascript; charset=utf-8", "app.css": "text/css; charset=utf-8"}
# Only this origin's files; no inline script or style (every answer, question and comment is
# put in the page as text, and this makes an injected <script> or handler inert even so).
UI_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; connect-src 'self'; "
          "frame-ancestors 'none'; base-uri 'none'; form-action 'self'")
UI_HEADERS = {"Content-Security-Policy": UI_CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
              "X-Frame-Options": "DENY", "Cache-Control": "no-cache"}


def ui_file(name: str) -> tuple[bytes, str]:
    """The rater page (`index.html`) or one of its assets by name, and its media type. Only the
    names listed above are served: a request never names a path."""
    media = "text/html; charset=utf-8" if name == UI_PAGE else UI_ASSETS.get(name)
    if media is None:
        raise APIError(404, f"no rater page asset named {name!r} (there are {', '.join(sorted(UI_ASSETS))})",
                       type="not_found_error")
    try:
        return (UI_DIR / name).read_bytes(), media
    except OSError as e:
        raise APIError(500, f"the rater page's file {name} is missing from the installed package ({e})",
                       type="server_error") from None


class FeedbackPublisher:
    """A daemon thread that sets the `docrl_feedback_*` gauges every `interval_s` (module docstring).
    It queries the database (blocking), so it runs beside the event loop, not on it."""

    def __init__(self, recorder, interval_s: float, replica: str):
        self.recorder, self.interval_s, self.replica = recorder, interval_s, replica
        self._gauges: dict[str, object] = {}
        self._stop = threading.Event()
        self._stats_ok = True
        self._thread = threading.Thread(target=self._run, name="docrl-feedback-metrics", daemon=True)
        self._thread.start()

    def _gauge(self, name: str, tag_keys: tuple[str, ...]):
        from ray.util.metrics import Gauge

        if name not in self._gauges:
            self._gauges[name] = Gauge(name, description=f"docrl feedback: {name.removeprefix('docrl_feedback_')}",
                                       tag_keys=tag_keys)
        return self._gauges[name]

    def publish(self) -> None:
        for name, value in self.recorder.stats().as_metrics().items():
            self._gauge(name, RECORDER_TAGS).set(value, tags={"replica": self.replica})
        try:
            versions = self.recorder.store.stats()
        except StorageError as e:
            if self._stats_ok:  # once per outage; the recorder warns about writes itself
                log.warning("feedback metrics: cannot read the ratings per model version: %s", e.message)
            self._stats_ok = False
            return
        if not self._stats_ok:
            log.warning("feedback metrics: the feedback database is readable again")
        self._stats_ok = True
        for v in versions:
            for name, value in v.as_metrics().items():
                self._gauge(name, VERSION_TAGS).set(value, tags=v.tags())

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.publish()
            except Exception as e:  # noqa: BLE001 - metrics must never take the replica down
                log.warning("feedback metrics: publishing failed: %r", e)
            self._stop.wait(self.interval_s)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

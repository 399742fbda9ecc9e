"""The `feedback` config section: where interactions and feedback are stored and what is accepted."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from common.lineage import read_lineage
from pydantic import Field, field_validator

from common.schema import Section


class FeedbackConfig(Section):
    enabled: bool = True
    # SQLAlchemy URL. None: an SQLite file <run.output_dir>/feedback/feedback.db (one node).
    # Several Serve replicas on several nodes need a shared server: postgresql://user@host:5432/db
    # (the psycopg 3 driver is used for plain postgresql:// URLs).
    database_url: str | None = None
    # Name of an environment variable holding the database password, so that the password is
    # never written in a config file or shown by `docrl config show`. Set into the URL at open.
    password_env: str | None = None
    require_correction_on_down: bool = False  # a down-vote must carry a correction (422 otherwise)
    on_duplicate: Literal["refuse", "replace"] = "replace"  # a second rating of one response: 409, or it wins
    max_correction_chars: int = Field(1000, ge=1)
    max_comment_chars: int = Field(2000, ge=1)
    # The interaction recorder: a bounded queue drained by one background thread, so that
    # recording never blocks or fails a request. Past these bounds new interactions are dropped
    # (and counted) instead of growing memory while the database is down.
    queue_size: int = Field(10_000, ge=1)
    max_queued_image_bytes: int = Field(256 * 1024 * 1024, ge=0)
    flush_interval_s: float = Field(0.5, gt=0.0)
    batch_size: int = Field(64, ge=1)
    retry_max_s: float = Field(30.0, gt=0.0)  # longest wait between retries while the database is down
    # POST /v1/feedback may arrive before the answer's interaction left the recorder's queue:
    # wait this long for it before answering 404.
    pending_wait_s: float = Field(2.0, ge=0.0)

    @field_validator("password_env")
    @classmethod
    def _env_name(cls, v: str | None) -> str | None:
        if v is not None and (not v or not v.replace("_", "a").isalnum()):
            raise ValueError(f"password_env must be the name of an environment variable (got {v!r})")
        return v

    def url(self, output_dir: str | Path) -> str:
        """The database URL: `database_url`, else the store of the run's lineage (a run continued
        from another run's checkpoint shares its parent's, common/lineage.py), else an SQLite file
        under the run's output directory."""
        if self.database_url:
            return self.database_url
        lineage = read_lineage(output_dir)
        if lineage and lineage.get("feedback_database_url"):
            return lineage["feedback_database_url"]
        return f"sqlite:///{Path(output_dir) / 'feedback' / 'feedback.db'}"

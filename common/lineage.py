"""Runs that continue from another run's checkpoint (`trainer.init_from`) form a lineage.

The continued run records its parent in `<run.output_dir>/lineage.json`:

    {"parent_checkpoint": "/abs/runs/tiny/checkpoints/step-00000060",
     "parent_run_dir": "/abs/runs/tiny",          null when the checkpoint is not in a run directory
     "parent_weights_version": 60,                0 for a plain model directory
     "feedback_database_url": "sqlite:////abs/runs/tiny/feedback/feedback.db"}   the lineage's store

Two things follow from it. The run's weights versions continue the parent's (its step 1 is
version 61), so a model version names one model across the lineage, in `/v1/models` and in the
feedback store. And the run's feedback store is its parent's (when `feedback.database_url` is not
set), so every model of a lineage is rated in one history: old answers stay ratable after a
continued run is served, and the per-version table shows the old model beside the new.
"""

from __future__ import annotations

import json
from pathlib import Path

LINEAGE_FILE = "lineage.json"


def read_lineage(run_dir: str | Path) -> dict | None:
    path = Path(run_dir) / LINEAGE_FILE
    return json.loads(path.read_text()) if path.exists() else None


def run_dir_of(checkpoint: str | Path) -> Path | None:
    """The run directory a checkpoint (`<run>/checkpoints/step-N`, or its `policy/` folder) is in;
    None for anything else (a model directory)."""
    p = Path(checkpoint).resolve()
    if p.name == "policy":
        p = p.parent
    return p.parent.parent if p.name.startswith("step-") and p.parent.name == "checkpoints" else None


def write_lineage(run_dir: str | Path, parent_checkpoint: str | Path, parent_weights_version: int | None,
                  feedback_database_url: str | None) -> dict:
    parent_run = run_dir_of(parent_checkpoint)
    lineage = {"parent_checkpoint": str(Path(parent_checkpoint).resolve()),
               "parent_run_dir": str(parent_run) if parent_run else None,
               "parent_weights_version": int(parent_weights_version or 0),
               "feedback_database_url": feedback_database_url}
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    (Path(run_dir) / LINEAGE_FILE).write_text(json.dumps(lineage, indent=2, sort_keys=True))
    return lineage

"""Checkpoint directories of a run: written atomically, the last K kept, the newest found on resume.

    <root>/step-00000010/      a complete checkpoint (whatever `write` put there + docrl_checkpoint.json)
    <root>/.tmp-step-00000012/ one being written: never read, removed on the next save
    <root>/.old-step-00000010/ a step being saved again: moved aside whole, removed once the new
                               one is in place (put back if the process died before that)
    <root>/.pruned-step-00000004/ an old checkpoint being deleted: moved aside first, so a half
                               deleted one is never taken for a complete one

A checkpoint becomes visible only by the final rename, after its marker file is written, and
leaves only by a rename, so a process killed at any point (SIGKILL runs no handler) leaves every
visible checkpoint whole, and the newest one is the one before the kill or the one being written.
A disk that fills while one is written loses only that one: what it had written is removed, and
the error says how much room it needs.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

MARKER = "docrl_checkpoint.json"


class CheckpointSpaceError(OSError):
    """The disk filled while a checkpoint was written; the previous checkpoints are intact."""


def tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


class CheckpointManager:
    def __init__(self, root: str | Path, keep_last: int = 2):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.root = Path(root)
        self.keep_last = keep_last

    @staticmethod
    def name(step: int) -> str:
        return f"step-{step:08d}"

    def save(self, step: int, write: Callable[[Path], None], meta: dict | None = None) -> Path:
        """Call `write(tmp_dir)`, then publish the directory as the checkpoint of `step`."""
        self.root.mkdir(parents=True, exist_ok=True)
        self._recover()
        for stale in self.root.glob(".tmp-step-*"):  # left by a crash mid-save
            shutil.rmtree(stale, ignore_errors=True)
        final = self.root / self.name(step)
        tmp = self.root / f".tmp-{self.name(step)}"
        tmp.mkdir()
        try:
            write(tmp)
            (tmp / MARKER).write_text(json.dumps({"step": step, "time": time.time(), **(meta or {})}, indent=2, sort_keys=True))
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            written = tree_bytes(tmp)
            shutil.rmtree(tmp, ignore_errors=True)
            full = CheckpointSpaceError(self._no_space(step, written))
            full.errno = e.errno
            raise full from None
        if final.exists():  # re-saving a step (the run's last save, a resume) replaces it
            old = self.root / f".old-{final.name}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        self._prune()
        return final

    def _recover(self) -> None:
        """Finish what a killed process left half done: a step moved aside to be replaced comes
        back unless its replacement is in place; a checkpoint moved aside to be pruned goes."""
        for old in self.root.glob(".old-step-*"):
            final = self.root / old.name[len(".old-"):]
            if (final / MARKER).exists():
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(old, final)
        for pruned in self.root.glob(".pruned-step-*"):
            shutil.rmtree(pruned, ignore_errors=True)

    def _no_space(self, step: int, written: int) -> str:
        previous = self.latest()
        needed = max(written, tree_bytes(previous)) if previous is not None else written
        free = shutil.disk_usage(self.root).free
        kept = (f"the previous checkpoint {previous.name} is intact; free space, then `docrl train --resume` "
                f"continues from it") if previous is not None else "no earlier checkpoint exists"
        return (f"checkpoint of step {step} in {self.root}: no space left on the device after {written:,} bytes; "
                f"it needs about {needed:,} bytes (the size of the last checkpoint) and {free:,} bytes free remain. "
                f"It was removed and {kept} (or move run.output_dir, or lower trainer.keep_last)")

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first by when they were written (then by step): after a
        resume from an earlier step, the new checkpoints are the newest whatever their numbers."""
        if not self.root.exists():
            return []
        self._recover()
        found = [p for p in self.root.glob("step-*") if (p / MARKER).exists()]
        return sorted(found, key=lambda p: (self.meta(p).get("time", 0.0), int(p.name.split("-")[1])))

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    @staticmethod
    def meta(path: str | Path) -> dict:
        marker = Path(path) / MARKER
        if not marker.exists():
            raise FileNotFoundError(f"{path} is not a complete docrl checkpoint ({MARKER} missing)")
        return json.loads(marker.read_text())

    def _prune(self) -> None:
        for old in self.complete()[: -self.keep_last]:
            pruned = self.root / f".pruned-{old.name}"
            os.replace(old, pruned)
            shutil.rmtree(pruned, ignore_errors=True)

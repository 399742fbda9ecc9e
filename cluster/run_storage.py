"""The run's durable copy in `run.storage`, kept by the driver.

The driver writes a run into `run.output_dir` on its own host: checkpoints (whose parts the roles
send it as bytes), the page index, logs. With `run.storage` set (an object store URI such as
`s3://bucket/runs/x`, or a path on another disk), it also publishes there what a fresh head needs
to continue or serve the run, each tree with a completion marker written last:

    <storage>/checkpoints/step-00000010/   the last `trainer.keep_last` checkpoints
    <storage>/index/                       the run's own page index, with the page images it cites
    <storage>/logs/                        metrics.jsonl (and the evaluation files), for --resume's report

`--resume` (and `docrl serve`) on a head whose `run.output_dir` lacks them copy them back first.
Unset, `run.output_dir` is the storage and nothing is copied.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from cluster.checkpoint import CheckpointManager
from common.shipping import land
from common.storage import Storage
from deploy.pages import PageStore

log = logging.getLogger(__name__)

CHECKPOINTS, INDEX, LOGS = "checkpoints", "index", "logs"


class RunStorage:
    def __init__(self, location: str | None, output_dir: str | Path):
        self.out = Path(output_dir)
        self.storage = Storage(location) if location else None

    def __bool__(self) -> bool:
        return self.storage is not None

    def __str__(self) -> str:
        return str(self.storage) if self.storage else str(self.out)

    # -- publishing (after the driver wrote the local copy) --------------------------------------

    def publish_checkpoint(self, path: Path, kept: list[Path]) -> None:
        """Upload one complete checkpoint, drop the stored ones no longer kept locally, then the
        logs (whose steps the checkpoint now covers)."""
        if not self.storage:
            return
        nbytes = self.storage.upload_dir(path, f"{CHECKPOINTS}/{path.name}")
        names = {p.name for p in kept}
        for old in self.storage.list(CHECKPOINTS):
            if old not in names:
                self.storage.delete(f"{CHECKPOINTS}/{old}")
        self.publish_logs()
        log.info("checkpoint %s published to storage %s (%.1f MB)", path.name, self.storage, nbytes / 1e6)

    def publish_logs(self) -> None:
        if self.storage and (self.out / LOGS).is_dir():
            staging = self.out / f".{LOGS}-upload"
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()
            for f in (self.out / LOGS).iterdir():  # the records; not the tensorboard events or plots
                if f.is_file() and f.suffix in (".jsonl", ".json"):
                    shutil.copy2(f, staging / f.name)
            try:
                self.storage.upload_dir(staging, LOGS)
            finally:
                shutil.rmtree(staging, ignore_errors=True)

    def publish_index(self, index_dir: Path) -> None:
        """Upload the run's page index unless storage holds this very build already."""
        from retriever.group import CORPUS_STAMP

        if not self.storage or not (index_dir / "manifest.json").exists():
            return
        stamp = (index_dir / CORPUS_STAMP).read_bytes() if (index_dir / CORPUS_STAMP).exists() else b""
        if self.storage.is_complete(INDEX) and self.storage.exists(f"{INDEX}/{CORPUS_STAMP}") and \
                self.storage.read_bytes(f"{INDEX}/{CORPUS_STAMP}") == stamp:
            return
        # with the page images it cites, so that a head without this run's data serves them
        bundle = PageStore.from_index(index_dir, Path.cwd()).pack_with_index(index_dir)
        staging = index_dir.parent / f".{index_dir.name}-upload"
        try:
            nbytes = self.storage.upload_dir(land(bundle, staging), INDEX)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        log.info("page index and its page images published to storage %s (%.1f MB)", self.storage, nbytes / 1e6)

    # -- restoring (on a head that lacks them) ---------------------------------------------------

    def restore_checkpoints(self, checkpoints: CheckpointManager) -> list[str]:
        """Copy the stored checkpoints this head lacks into `checkpoints.root` (and the logs, when
        this head has none); returns the names copied."""
        if not self.storage:
            return []
        have = {p.name for p in checkpoints.complete()}
        copied = []
        for name in self.storage.list(CHECKPOINTS):
            if name not in have and self.storage.is_complete(f"{CHECKPOINTS}/{name}"):
                tmp = checkpoints.root / f".tmp-{name}"
                shutil.rmtree(tmp, ignore_errors=True)
                self.storage.download_dir(f"{CHECKPOINTS}/{name}", tmp)
                tmp.rename(checkpoints.root / name)
                copied.append(name)
        if copied and not (self.out / LOGS / "metrics.jsonl").exists() and self.storage.is_complete(LOGS):
            self.storage.download_dir(LOGS, self.out / LOGS)
        if copied:
            log.info("restored %s from storage %s", ", ".join(copied), self.storage)
        return copied

    def restore_index(self, index_dir: Path) -> bool:
        if not self.storage or (index_dir / "manifest.json").exists() or not self.storage.is_complete(INDEX):
            return False
        self.storage.download_dir(INDEX, index_dir)
        log.info("page index restored from storage %s into %s", self.storage, index_dir)
        return True

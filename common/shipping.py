"""Files that cross hosts as bytes, never as paths.

docrl assumes no disk shared between hosts. What one process wrote (the driver's run directory, a
learner rank's adapter or checkpoint shard, a retriever actor's index segment) reaches a process on
another host as a `ShippedFiles` value through the Ray object store, and the receiver writes it
into a directory of its own host before opening it (`local_copy`). A role opens by path only what
it wrote itself: its own temporary files, a `local_copy`, or a model named by hub id (each host
loads those from its own cache).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

# a role's private scratch space on its own host; TMPDIR picks the disk
LANDING_DIR = "docrl-landed"


@dataclass(frozen=True)
class ShippedFiles:
    """A directory's files by relative path. `origin` says where they came from (for messages and
    for the records that name a model, e.g. a checkpoint's `policy`); `digest` identifies the
    content, so a host writes one copy however many roles on it receive the same files."""

    origin: str
    files: dict[str, bytes] = field(repr=False)
    digest: str

    @property
    def nbytes(self) -> int:
        return sum(len(b) for b in self.files.values())

    def __str__(self) -> str:
        return self.origin


def pack_dir(directory: str | Path, origin: str | None = None) -> ShippedFiles:
    """Every regular file under `directory` (temporary files of an interrupted write left out)."""
    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory: nothing to ship")
    files: dict[str, bytes] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and ".tmp" not in path.name:
            files[rel] = path.read_bytes()
    return ShippedFiles(origin or str(root), files, _digest(files))


def pack_files(files: dict[str, bytes], origin: str) -> ShippedFiles:
    return ShippedFiles(origin, dict(files), _digest(files))


def _digest(files: dict[str, bytes]) -> str:
    h = hashlib.sha256()
    for rel in sorted(files):
        h.update(rel.encode() + b"\0" + hashlib.sha256(files[rel]).digest())
    return h.hexdigest()[:24]


def land(shipped: ShippedFiles, directory: str | Path) -> Path:
    """Write the files into `directory` atomically (a sibling temporary directory renamed into
    place; an existing `directory` is replaced)."""
    final = Path(directory)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
    for rel, data in shipped.files.items():
        target = (tmp / rel).resolve()
        if not target.is_relative_to(tmp.resolve()):
            shutil.rmtree(tmp, ignore_errors=True)
            raise ValueError(f"{shipped.origin}: file name {rel!r} points outside its directory")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    tmp.mkdir(parents=True, exist_ok=True)  # no files: an empty directory
    if final.exists():
        old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
    return final


def scratch_dir(name: str) -> Path:
    """A fresh directory of this process's own, on this host."""
    base = Path(tempfile.gettempdir()) / LANDING_DIR
    base.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{name}-", dir=base))


def local_copy(shipped: ShippedFiles) -> Path:
    """The files in a directory of this host, written once per host and content (later calls, by
    any process of the host, reuse it)."""
    name = Path(shipped.origin.rstrip("/")).name or "files"
    final = Path(tempfile.gettempdir()) / LANDING_DIR / f"{name}-{shipped.digest}"
    if final.is_dir():
        return final
    try:
        return land(shipped, final)
    except OSError:
        if final.is_dir():  # another process of this host landed the same files first
            return final
        raise


def model_dir(source: str | ShippedFiles) -> str:
    """Where a role loads a model from: a hub id or path as given, or its local copy."""
    return str(local_copy(source)) if isinstance(source, ShippedFiles) else str(source)


def model_name(source: str | ShippedFiles) -> str:
    """The model as the run's records name it (its path on the driver's host, or the hub id)."""
    return source.origin if isinstance(source, ShippedFiles) else str(source)


def ship_if_local(model: str) -> str | ShippedFiles:
    """A model directory on this host as files, for roles on any host; a hub id (which every host
    resolves from its own cache) as it is."""
    return pack_dir(model) if os.path.isdir(model) else model

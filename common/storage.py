"""Run storage: where a run's artifacts (checkpoints, exported models, the page index, feedback
exports) live, either a local directory or an object store (`s3://bucket/prefix`, `gs://...`).

One small surface over `pyarrow.fs`, so that the code writing artifacts does not care where they
go and a multi-host run can point every host at the same bucket.

Directory trees are published with a marker: `upload_dir` writes `<rel>/.complete` after every
other file, and `download_dir` / `is_complete` treat a tree without it as absent. Object stores
cannot rename a prefix, so the marker is what makes a half-uploaded checkpoint invisible; local
trees get the same marker (and are also renamed into place) so both kinds read the same way.

S3 settings come from the arguments or the usual AWS environment variables:
`AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL` (pyarrow does not read these itself, so they are
passed on here), `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`, `AWS_REGION` / `AWS_DEFAULT_REGION`.
"""

from __future__ import annotations

import copy
import os
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlparse

import pyarrow as pa
import pyarrow.fs as pafs

COMPLETE = ".complete"
_TMP_PREFIX = ".tmp-"  # our own in-progress files and trees; never listed
_CHUNK = 8 << 20
_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


class StorageError(OSError):
    """A storage operation failed; the message names the full location (URI or path) and the operation."""


def is_uri(location: str) -> bool:
    """True for `scheme://...` other than `file://`: a `file://` URI is just a local path."""
    match = _URI.match(location)
    return bool(match) and match.group(1).lower() != "file"


def join(location: str, *parts: str) -> str:
    """Always "/", since `os.path` would mangle a URI; empty parts and stray slashes are dropped."""
    tail = "/".join(p.strip("/") for p in parts if p.strip("/"))
    if not tail:
        return location
    if not location:
        return tail
    return location.rstrip("/") + "/" + tail if location.strip("/") else "/" + tail


@contextmanager
def _failing_as(location: str, operation: str) -> Iterator[None]:
    """pyarrow's messages name only the bucket-relative path; a log line must say which storage."""
    try:
        yield
    except StorageError:
        raise
    except FileNotFoundError as e:
        raise FileNotFoundError(f"storage {location}: {operation} failed: {e}") from e
    except (OSError, pa.ArrowException) as e:
        raise StorageError(f"storage {location}: {operation} failed: {e}") from e


def _local_path(location: str) -> str:
    """Absolute now, so a later chdir (Ray workers start elsewhere) does not move the storage."""
    if location.lower().startswith("file://"):
        url = urlparse(location)
        if url.netloc not in ("", "localhost"):
            raise ValueError(f"file URI with a remote host is not local storage: {location}")
        location = unquote(url.path)
    return os.path.abspath(os.path.expanduser(location))


def _s3_filesystem(endpoint_override: str | None) -> pafs.S3FileSystem:
    """pyarrow ignores AWS_ENDPOINT_URL, so an S3-compatible server (MinIO, moto) set only in the
    environment would silently be swapped for AWS itself."""
    endpoint = endpoint_override or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if not endpoint:
        return pafs.S3FileSystem(region=region)
    scheme, _, host = endpoint.rpartition("://")
    # A private endpoint has no region of its own; naming one stops the SDK asking EC2 metadata.
    return pafs.S3FileSystem(endpoint_override=host, scheme=scheme or "https", region=region or "us-east-1")


class Storage:
    """A run-storage root; every method takes a path relative to it ("" is the root itself)."""

    def __init__(self, location: str, *, endpoint_override: str | None = None):
        self.location = str(location)
        self._local = not is_uri(self.location)
        if self._local:
            self._fs: pafs.FileSystem = pafs.LocalFileSystem()
            self._root = _local_path(self.location)
        elif self.location.lower().startswith("s3://"):
            self._fs = _s3_filesystem(endpoint_override)
            self._root = self.location[len("s3://"):].strip("/")
        else:
            with _failing_as(self.location, "open"):
                self._fs, self._root = pafs.FileSystem.from_uri(self.location)
            self._root = self._root.rstrip("/")

    def __str__(self) -> str:
        return self.location

    def __repr__(self) -> str:
        return f"Storage({self.location!r})"

    def child(self, *parts: str) -> Storage:
        """Shares the filesystem (one S3 client) and the resolved local root."""
        sub = copy.copy(self)
        sub.location = join(self.location, *parts)
        sub._root = join(self._root, *parts)
        return sub

    def _path(self, rel: str) -> str:
        return join(self._root, rel)

    def _where(self, rel: str) -> str:
        """Local storage is named by its absolute path: the relative one is ambiguous in a log."""
        return join(self._root if self._local else self.location, rel)

    def _info(self, rel: str) -> pafs.FileInfo:
        with _failing_as(self._where(rel), "stat"):
            return self._fs.get_file_info(self._path(rel))

    def exists(self, rel: str = "") -> bool:
        return self._info(rel).type != pafs.FileType.NotFound

    def list(self, rel: str = "") -> list[str]:
        """Names of direct children, without this module's own `.complete` marker and temp entries."""
        selector = pafs.FileSelector(self._path(rel), allow_not_found=True)
        with _failing_as(self._where(rel), "list"):
            infos = self._fs.get_file_info(selector)
        names = (i.base_name for i in infos)
        return sorted(n for n in names if n != COMPLETE and not n.startswith(_TMP_PREFIX))

    def read_bytes(self, rel: str) -> bytes:
        with _failing_as(self._where(rel), "read"), self._fs.open_input_stream(self._path(rel)) as f:
            return f.read()

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Readers never see a partial file: locally a temp file is renamed over the target; an
        object store's PUT is atomic already."""
        path = self._path(rel)
        with _failing_as(self._where(rel), "write"):
            if not self._local:
                with self._fs.open_output_stream(path) as out:
                    out.write(data)
                return
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = join(os.path.dirname(path), f"{_TMP_PREFIX}{uuid.uuid4().hex}-{os.path.basename(path)}")
            try:
                with open(tmp, "wb") as out:
                    out.write(data)
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)

    def delete(self, rel: str) -> None:
        """A missing target is fine: deleting is how a caller makes sure something is gone."""
        with _failing_as(self._where(rel), "delete"):
            self._remove(self._path(rel))

    def _remove(self, path: str) -> None:
        kind = self._fs.get_file_info(path).type
        if kind == pafs.FileType.Directory:
            self._fs.delete_dir(path)
        elif kind == pafs.FileType.File:
            self._fs.delete_file(path)

    def is_complete(self, rel: str) -> bool:
        return self._info(join(rel, COMPLETE)).type == pafs.FileType.File

    def upload_dir(self, local_dir: str | Path, rel: str) -> int:
        """Publish a local tree at `rel` (replacing what is there); returns the bytes written.

        Locally the tree is built in a sibling temp directory and renamed into place, so readers see
        the old tree, then (for the instant between two renames) nothing, then the new one. Object
        stores cannot rename a prefix: the old tree's marker goes first, then the old tree, then the
        new files, and the marker last, so readers see the tree as absent until it is whole.
        """
        local_dir = Path(local_dir)
        if not local_dir.is_dir():
            raise FileNotFoundError(f"upload to storage {self._where(rel)}: no local directory {local_dir}")
        target = self._path(rel)
        staging = join(os.path.dirname(target), f"{_TMP_PREFIX}{uuid.uuid4().hex}") if self._local else target
        with _failing_as(self._where(rel), "upload"):
            if not self._local:
                self._remove(join(target, COMPLETE))
                self._remove(target)
            try:
                written = self._put_tree(local_dir, staging)
                with self._fs.open_output_stream(join(staging, COMPLETE)) as out:
                    out.write(b"")
                if self._local:
                    self._swap_into_place(staging, target)
            finally:
                if self._local and os.path.exists(staging):
                    self._fs.delete_dir(staging)
        return written

    def _put_tree(self, local_dir: Path, dest: str) -> int:
        written = 0
        for src in sorted(p for p in local_dir.rglob("*") if p.is_file()):
            path = join(dest, src.relative_to(local_dir).as_posix())
            if self._local:
                os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(src, "rb") as f, self._fs.open_output_stream(path) as out:
                written += _pump(f, out)
        if self._local:
            os.makedirs(dest, exist_ok=True)  # an empty tree is still published
        return written

    def _swap_into_place(self, staging: str, target: str) -> None:
        """A directory cannot be renamed over a non-empty one, so the old tree steps aside first."""
        old = None
        if os.path.lexists(target):
            old = join(os.path.dirname(target), f"{_TMP_PREFIX}{uuid.uuid4().hex}")
            os.replace(target, old)
        try:
            os.replace(staging, target)
        except OSError:
            if old is not None:
                os.replace(old, target)
            raise
        if old is not None:
            self._fs.delete_dir(old)

    def download_dir(self, rel: str, local_dir: str | Path) -> int:
        """Copy a published tree into `local_dir` (created; files overwritten); returns the bytes read."""
        if not self.is_complete(rel):
            raise FileNotFoundError(
                f"storage {self._where(rel)}: download failed: absent or incomplete (no {COMPLETE} marker)")
        local_dir = Path(local_dir)
        local_dir.mkdir(parents=True, exist_ok=True)
        source = self._path(rel)
        read = 0
        with _failing_as(self._where(rel), "download"):
            infos = self._fs.get_file_info(pafs.FileSelector(source, recursive=True))
            for info in infos:
                name = info.path[len(source):].lstrip("/")
                if info.type != pafs.FileType.File or name == COMPLETE:
                    continue
                dest = local_dir / name
                dest.parent.mkdir(parents=True, exist_ok=True)
                with self._fs.open_input_stream(info.path) as f, open(dest, "wb") as out:
                    read += _pump(f, out)
        return read


def _pump(src: BinaryIO, dst: BinaryIO) -> int:
    """Streams in chunks, since a checkpoint shard may not fit in memory twice."""
    n = 0
    while chunk := src.read(_CHUNK):
        dst.write(chunk)
        n += len(chunk)
    return n

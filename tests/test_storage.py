"""Run storage (common/storage.py) on a local directory and on S3, the S3 one a moto server on loopback.

The shared tests run once per backend (`store` is parametrized), so local and S3 are held to the
same behaviour. Nothing here may reach beyond 127.0.0.1: the AWS settings below name the moto
endpoint, fake credentials, a region, and turn off the EC2 metadata probe.
"""

from __future__ import annotations

import os
import pickle
import socket
import uuid
from pathlib import Path

import pyarrow.fs as pafs
import pytest

import common.storage as storage_module
from common.storage import Storage, StorageError, is_uri, join

BUCKET = "docrl-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """One moto S3 server for the session, with the bucket made; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    with pytest.MonkeyPatch.context() as mp:
        # The AWS SDK reads some of these once, when pyarrow first starts S3, so they are set
        # for the session and before any S3 filesystem exists.
        nowhere = str(tmp_path_factory.mktemp("aws") / "none")
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        mp.setenv("AWS_REGION", "us-east-1")
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_CONFIG_FILE", nowhere)
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", nowhere)
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
                     "AWS_DEFAULT_REGION"):
            mp.delenv(name, raising=False)
        port = _free_port()
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        try:
            endpoint = f"http://127.0.0.1:{port}"
            fs = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", region="us-east-1",
                                   allow_bucket_creation=True)
            fs.create_dir(BUCKET)
            yield endpoint
        finally:
            server.stop()


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path) -> Storage:
    """A fresh, empty storage root on each backend (a new prefix per test on the shared bucket)."""
    if request.param == "local":
        return Storage(str(tmp_path / "run"))
    endpoint = request.getfixturevalue("s3_endpoint")
    return Storage(f"s3://{BUCKET}/{uuid.uuid4().hex}", endpoint_override=endpoint)


def _make_tree(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def _read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


BINARY = bytes(range(256)) * 64 + b"\x00\r\n\xff"
TREE = {
    "config.json": b'{"step": 3}',
    "model/weights.bin": BINARY,
    "model/shards/part-0.bin": BINARY[::-1],
    "empty.txt": b"",
}


# ---- pure helpers ----------------------------------------------------------------------------


@pytest.mark.parametrize("location, expected", [
    ("s3://bucket/prefix", True),
    ("gs://bucket", True),
    ("S3://Bucket/x", True),
    ("file:///tmp/run", False),
    ("/tmp/run", False),
    ("runs/r1", False),
    ("C:relative", False),
])
def test_is_uri(location, expected):
    assert is_uri(location) is expected


@pytest.mark.parametrize("args, expected", [
    (("s3://bucket/prefix", "checkpoints", "step-3"), "s3://bucket/prefix/checkpoints/step-3"),
    (("s3://bucket/prefix/", "/a/", "b"), "s3://bucket/prefix/a/b"),
    (("gs://bucket", "a/b", "", "c"), "gs://bucket/a/b/c"),
    (("runs/r1", "index"), "runs/r1/index"),
    (("/", "tmp"), "/tmp"),
    (("", "a", "b"), "a/b"),
    (("s3://bucket/prefix", ""), "s3://bucket/prefix"),
])
def test_join(args, expected):
    assert join(*args) == expected


# ---- both backends ---------------------------------------------------------------------------


def test_bytes_round_trip_and_overwrite(store):
    store.write_bytes("a/b/blob.bin", BINARY)
    assert store.read_bytes("a/b/blob.bin") == BINARY
    store.write_bytes("a/b/blob.bin", b"second")
    assert store.read_bytes("a/b/blob.bin") == b"second"
    store.write_bytes("empty", b"")
    assert store.read_bytes("empty") == b""
    assert store.exists("a/b/blob.bin") and store.exists("a/b") and store.exists("a")
    assert not store.exists("a/b/other.bin")


def test_read_missing_names_location(store):
    with pytest.raises(FileNotFoundError) as info:
        store.read_bytes("nothing/here.json")
    message = str(info.value)
    where = str(store) if is_uri(str(store)) else os.path.abspath(str(store))
    assert join(where, "nothing/here.json") in message and "read" in message


def test_list(store):
    assert store.list() == []
    assert store.list("missing") == []
    for name in ("d/y.txt", "d/x.txt", "d/sub/z.txt", "top.txt"):
        store.write_bytes(name, name.encode())
    assert store.list("d") == ["sub", "x.txt", "y.txt"]
    assert store.list("d/sub") == ["z.txt"]
    assert store.list() == ["d", "top.txt"]


def test_delete_file_tree_and_missing(store):
    for name in ("keep.txt", "tree/a.txt", "tree/deep/b.txt"):
        store.write_bytes(name, b"x")
    store.delete("keep.txt")
    assert not store.exists("keep.txt")
    store.delete("tree")
    assert not store.exists("tree") and not store.exists("tree/deep/b.txt")
    assert store.list("tree") == []
    store.delete("tree")  # already gone: no error
    store.delete("never/was")
    assert "tree" not in store.list()


def test_child(store):
    child = store.child("runs", "r1")
    assert str(child) == join(str(store), "runs/r1")
    child.write_bytes("meta.json", b"{}")
    assert store.read_bytes("runs/r1/meta.json") == b"{}"
    assert child.child("sub").exists() is False
    assert child.list() == ["meta.json"]


def test_tree_round_trip(store, tmp_path):
    src = _make_tree(tmp_path / "src", TREE)
    total = sum(len(v) for v in TREE.values())
    assert not store.is_complete("checkpoints/step-00000003")
    assert store.upload_dir(src, "checkpoints/step-00000003") == total
    assert store.is_complete("checkpoints/step-00000003")
    assert store.list("checkpoints") == ["step-00000003"]
    assert store.list("checkpoints/step-00000003") == ["config.json", "empty.txt", "model"]
    assert store.read_bytes("checkpoints/step-00000003/model/weights.bin") == BINARY

    dest = tmp_path / "dest" / "nested"  # created by download_dir
    assert store.download_dir("checkpoints/step-00000003", dest) == total
    assert _read_tree(dest) == TREE  # and no .complete marker among the files


def test_download_overwrites_local_files(store, tmp_path):
    store.upload_dir(_make_tree(tmp_path / "src", {"a.txt": b"new"}), "t")
    dest = _make_tree(tmp_path / "dest", {"a.txt": b"old and longer", "mine.txt": b"kept"})
    store.download_dir("t", dest)
    assert _read_tree(dest) == {"a.txt": b"new", "mine.txt": b"kept"}


def test_upload_replaces_existing_tree(store, tmp_path):
    old = _make_tree(tmp_path / "old", {"old-only.bin": b"old", "shared/w.bin": b"old weights"})
    new = _make_tree(tmp_path / "new", {"new-only.bin": b"new", "shared/w.bin": b"new weights"})
    store.upload_dir(old, "model")
    store.upload_dir(new, "model")
    assert store.is_complete("model")
    assert not store.exists("model/old-only.bin")
    assert store.list("model") == ["new-only.bin", "shared"]
    assert store.read_bytes("model/shared/w.bin") == b"new weights"
    store.download_dir("model", tmp_path / "back")
    assert _read_tree(tmp_path / "back") == {"new-only.bin": b"new", "shared/w.bin": b"new weights"}


def test_download_of_incomplete_or_absent_tree_is_refused(store, tmp_path):
    store.write_bytes("checkpoints/step-7/model.bin", b"half")  # no .complete: an interrupted upload
    assert store.exists("checkpoints/step-7")
    assert not store.is_complete("checkpoints/step-7")
    for rel in ("checkpoints/step-7", "checkpoints/step-8"):
        with pytest.raises(FileNotFoundError, match=rf"{rel}\b.*(absent|incomplete)"):
            store.download_dir(rel, tmp_path / "out")
        assert not (tmp_path / "out" / "model.bin").exists()


def test_failed_upload_never_looks_complete_with_mixed_content(store, tmp_path, monkeypatch):
    store.upload_dir(_make_tree(tmp_path / "old", {"a": b"old", "b": b"old"}), "model")
    real_pump, pumped = storage_module._pump, []

    def pump_then_fail(src, dst):
        if pumped:
            raise OSError(5, "disk went away")
        pumped.append(True)
        return real_pump(src, dst)

    monkeypatch.setattr(storage_module, "_pump", pump_then_fail)
    with pytest.raises(StorageError, match=r"model: upload failed: .*disk went away"):
        store.upload_dir(_make_tree(tmp_path / "new", {"a": b"new", "b": b"new"}), "model")
    monkeypatch.undo()
    if is_uri(str(store)):  # the old tree was already gone; the half-written new one has no marker
        assert not store.is_complete("model")
        with pytest.raises(FileNotFoundError):
            store.download_dir("model", tmp_path / "back")
    else:  # the new tree never left its staging directory
        assert store.is_complete("model")
        store.download_dir("model", tmp_path / "back")
        assert _read_tree(tmp_path / "back") == {"a": b"old", "b": b"old"}


def test_pickles_for_other_processes(store):
    store.write_bytes("x", b"payload")
    copy = pickle.loads(pickle.dumps(store.child("sub")))
    copy.write_bytes("y", b"from a worker")
    assert str(copy) == join(str(store), "sub")
    assert store.read_bytes("sub/y") == b"from a worker"


def test_upload_of_missing_local_dir_is_refused(store, tmp_path):
    with pytest.raises(FileNotFoundError, match="no local directory"):
        store.upload_dir(tmp_path / "absent", "x")
    assert not store.exists("x")


# ---- local only ------------------------------------------------------------------------------


def test_relative_path_is_fixed_at_construction(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store = Storage("runs/r1")
    assert str(store) == "runs/r1" and not is_uri(str(store))
    store.write_bytes("index/pages.json", b"[]")
    assert (tmp_path / "runs/r1/index/pages.json").read_bytes() == b"[]"
    monkeypatch.chdir(tmp_path / "runs")  # a later chdir does not move the storage
    assert store.read_bytes("index/pages.json") == b"[]"
    assert store.child("index").list() == ["pages.json"]


def test_file_uri(tmp_path):
    store = Storage((tmp_path / "run").as_uri())
    assert str(store).startswith("file://")
    store.upload_dir(_make_tree(tmp_path / "src", TREE), "ckpt")
    assert _read_tree(tmp_path / "run" / "ckpt") == {**TREE, ".complete": b""}
    assert Storage(f"file://{tmp_path}/run").read_bytes("ckpt/config.json") == TREE["config.json"]


def test_local_upload_leaves_no_temporaries(tmp_path):
    store = Storage(str(tmp_path / "run"))
    for content in (b"one", b"two"):
        store.upload_dir(_make_tree(tmp_path / content.decode(), {"f": content}), "ckpt/step-1")
        store.write_bytes("ckpt/latest", content)
    assert sorted(os.listdir(tmp_path / "run" / "ckpt")) == ["latest", "step-1"]
    assert sorted(os.listdir(tmp_path / "run" / "ckpt" / "step-1")) == [".complete", "f"]


def test_local_write_failure_keeps_old_file_and_names_location(tmp_path, monkeypatch):
    store = Storage(str(tmp_path / "run"))
    store.write_bytes("pages.json", b"old")

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(StorageError, match=rf"storage {tmp_path}/run/pages.json: write failed: .*No space"):
        store.write_bytes("pages.json", b"new")
    monkeypatch.undo()
    assert store.read_bytes("pages.json") == b"old"
    assert os.listdir(tmp_path / "run") == ["pages.json"]


def test_local_failed_swap_puts_old_tree_back(tmp_path, monkeypatch):
    store = Storage(str(tmp_path / "run"))
    store.upload_dir(_make_tree(tmp_path / "old", {"w": b"old"}), "model")
    real_replace, renames = os.replace, []

    def replace_failing_for_staging(src, dst):  # the old tree steps aside; the new one fails to move in
        renames.append((src, dst))
        if len(renames) == 2:
            raise OSError(5, "I/O error")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_failing_for_staging)
    with pytest.raises(StorageError, match="model: upload failed: .*I/O error"):
        store.upload_dir(_make_tree(tmp_path / "new", {"w": b"new"}), "model")
    monkeypatch.undo()
    assert len(renames) == 3  # and the old tree moved back
    assert store.is_complete("model") and store.read_bytes("model/w") == b"old"
    assert os.listdir(tmp_path / "run") == ["model"]


# ---- S3 only ---------------------------------------------------------------------------------


@pytest.mark.parametrize("variable", ["AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"])
def test_s3_endpoint_from_environment(s3_endpoint, monkeypatch, tmp_path, variable):
    monkeypatch.setenv(variable, s3_endpoint)
    location = f"s3://{BUCKET}/{uuid.uuid4().hex}"
    store = Storage(location)
    store.write_bytes("feedback/export.jsonl", b'{"id": 1}\n')
    store.upload_dir(_make_tree(tmp_path / "src", TREE), "index")
    # the same objects, seen through an explicitly configured storage
    explicit = Storage(location, endpoint_override=s3_endpoint)
    assert explicit.read_bytes("feedback/export.jsonl") == b'{"id": 1}\n'
    assert explicit.is_complete("index")
    assert explicit.download_dir("index", tmp_path / "back") == sum(len(v) for v in TREE.values())


def test_s3_error_names_uri_and_operation(s3_endpoint, tmp_path):
    store = Storage("s3://no-such-bucket/run", endpoint_override=s3_endpoint)
    src = _make_tree(tmp_path / "src", {"w.bin": b"w"})
    with pytest.raises(StorageError, match=r"storage s3://no-such-bucket/run/checkpoints/step-00000003: upload failed"):
        store.upload_dir(src, "checkpoints/step-00000003")
    with pytest.raises(StorageError, match=r"storage s3://no-such-bucket/run/x: write failed: .*NO_SUCH_BUCKET"):
        store.write_bytes("x", b"data")
    assert not store.exists("x")


def test_a_feedback_export_to_s3_feeds_training(s3_endpoint, tmp_path, monkeypatch):
    """`docrl feedback export s3://...` writes the export through run storage, and a training run
    reads it from there as a `data.extra_sources` path."""
    import io

    from PIL import Image

    from docvqa.config import DataConfig, ExtraSource
    from docvqa.data import load_extra_source
    from feedback.export import ExportExists, export_feedback
    from feedback.store import FeedbackIn, FeedbackStore, Interaction

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), "navy").save(buf, format="PNG")
    store = FeedbackStore(f"sqlite:///{tmp_path / 'feedback.db'}")
    try:
        store.record_interaction(Interaction("r0", "docqa", "What colour is the plate?", "navy", page_ids=("doc0/p1",),
                                             model="docrl", weights_version=1, checkpoint="step-1"))
        store.add_feedback(FeedbackIn("r0", "up"))
        uri = f"s3://{BUCKET}/exports/{uuid.uuid4().hex}"
        summary = export_feedback(store, uri, page_image=lambda page_id: buf.getvalue())
        assert summary.exported == 1 and summary.out_dir == uri
        assert Storage(uri).is_complete("") and Storage(uri).exists("train.json")
        with pytest.raises(ExportExists, match=f"{uri} already holds a feedback export"):
            export_feedback(store, uri, page_image=lambda page_id: buf.getvalue())
    finally:
        store.close()
    data = load_extra_source(ExtraSource(path=uri), DataConfig(), 0, tmp_path / "run")
    assert [s.question for s in data.samples] == ["What colour is the plate?"] and data.samples[0].answers == ("navy",)
    page = data.pages[data.samples[0].gold_page]
    assert page.load_image().getpixel((0, 0)) == (0, 0, 128)  # the page image came from storage too

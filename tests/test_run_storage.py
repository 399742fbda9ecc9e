"""`run.storage`: what the driver publishes there and what a fresh head copies back (on a local
path here; `tests/test_storage.py` runs the storage itself on S3 too, and `tests/test_multihost.py`
resumes and serves a run from S3 on a head that lost its run directory)."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from cluster.checkpoint import CheckpointManager
from cluster.run_storage import RunStorage
from common.storage import Storage


def _checkpoint(manager: CheckpointManager, step: int) -> None:
    def write(d):
        (d / "learner").mkdir()
        (d / "learner" / "weights.bin").write_bytes(bytes([step]) * 100)
        (d / "driver.json").write_text(json.dumps({"step": step}))

    manager.save(step, write)


def test_checkpoints_and_logs_come_back_on_a_fresh_head(tmp_path):
    head = tmp_path / "head" / "run"
    storage = RunStorage(str(tmp_path / "bucket" / "run"), head)
    manager = CheckpointManager(head / "checkpoints", keep_last=2)
    (head / "logs").mkdir(parents=True)
    for step in (1, 2, 3):
        _checkpoint(manager, step)
        (head / "logs" / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, step + 1)))
        storage.publish_checkpoint(head / "checkpoints" / manager.name(step), manager.complete())
    stored = Storage(str(tmp_path / "bucket" / "run"))
    assert stored.list("checkpoints") == ["step-00000002", "step-00000003"]  # keep_last, as on the head
    assert all(stored.is_complete(f"checkpoints/{n}") for n in stored.list("checkpoints"))

    fresh = tmp_path / "fresh" / "run"  # another head: nothing of the run on its disk
    (fresh / "checkpoints").mkdir(parents=True)
    again = RunStorage(str(tmp_path / "bucket" / "run"), fresh)
    restored = CheckpointManager(fresh / "checkpoints")
    assert again.restore_checkpoints(restored) == ["step-00000002", "step-00000003"]
    assert restored.latest().name == "step-00000003"
    assert (restored.latest() / "learner" / "weights.bin").read_bytes() == bytes([3]) * 100
    assert [json.loads(x)["step"] for x in (fresh / "logs" / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert again.restore_checkpoints(restored) == []  # what the head has is not copied again


def test_a_new_run_refuses_storage_that_holds_a_run(tmp_path):
    from cluster.train import RunDirectoryInUse, refuse_previous_run

    head = tmp_path / "run"
    storage = RunStorage(str(tmp_path / "bucket"), head)
    manager = CheckpointManager(head / "checkpoints")
    _checkpoint(manager, 1)
    storage.publish_checkpoint(head / "checkpoints" / manager.name(1), manager.complete())
    with pytest.raises(RunDirectoryInUse, match=r"run.storage=.*bucket already holds a training run's checkpoints "
                                                r"\(step-00000001\)\. Continue it with --resume"):
        refuse_previous_run(tmp_path / "elsewhere", storage)
    refuse_previous_run(tmp_path / "elsewhere", RunStorage(None, tmp_path / "elsewhere"))  # no storage: a new run
    assert not RunStorage(None, head)  # unset: run.output_dir is the storage, nothing is copied


def test_the_index_goes_to_storage_with_its_page_images(tmp_path, monkeypatch):
    """A head without the run's data serves the restored index's pages from the index itself."""
    from deploy.pages import PageStore
    from retriever.group import CORPUS_STAMP
    from retriever.index import PageIndex, save_index

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    colours = {"d0/p1": (200, 0, 0), "d1/p1": (0, 200, 0)}
    for pid, colour in colours.items():
        Image.new("RGB", (32, 32), colour).save(tmp_path / "data" / f"{pid.split('/')[0]}.png")
    index = PageIndex({"model": "m", "dim": 4})
    index.add(list(colours), [torch.ones(3, 4), torch.ones(2, 4)],
              [{"doc_id": pid.split("/")[0], "page_no": 1, "source": f"data/{pid.split('/')[0]}.png"} for pid in colours])
    head = tmp_path / "run"
    save_index(index, head / "index")
    (head / "index" / CORPUS_STAMP).write_text('{"fingerprint": "x"}')
    storage = RunStorage(str(tmp_path / "bucket"), head)
    storage.publish_index(head / "index")
    assert Storage(str(tmp_path / "bucket")).is_complete("index")

    fresh = tmp_path / "fresh"
    assert RunStorage(str(tmp_path / "bucket"), fresh).restore_index(fresh / "index")
    for f in (tmp_path / "data").iterdir():  # the run's data is not on this head
        f.unlink()
    pages = PageStore.from_index(fresh / "index", base_dir=tmp_path)
    assert sorted(pages.pages) == sorted(colours) and not pages.unavailable
    for pid, colour in colours.items():
        assert pages.pages[pid].load_image().getpixel((5, 5)) == colour

"""Hosts share no disk: the rule in code, and the pieces that carry files across hosts as bytes.

The rule, checked here on the source of every role that runs in a Ray actor or Serve replica: no
method of theirs takes a path (a parameter named `*_path`, `*_dir`, `directory`, `file`). What a
role loads from another host comes as `common.shipping.ShippedFiles` (or a hub id) and is written
on its own host first (`local_copy`, `land`, `model_dir`), so a role opens by path only what it
wrote itself. `tests/test_multihost.py` runs the roles on two hosts whose files differ, where any
read across hosts by path fails.
"""

from __future__ import annotations

import ast
import io
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from common.shipping import ShippedFiles, land, local_copy, model_dir, model_name, pack_dir, pack_files, ship_if_local

ROOT = Path(__file__).resolve().parents[1]
ROLE_SHELLS = {"rollout/worker.py": {"RolloutWorker"}, "retriever/actor.py": {"RetrieverActor"},
               "learner/rank.py": {"LearnerRank"}, "reward/actor.py": {"RewardActor"},
               "deploy/app.py": {"Retriever", "Policy", "Ingress"}}
PATH_LIKE = re.compile(r"(^|_)(path|dir|directory|file|folder)$")


def test_no_role_takes_a_path():
    found, checked = [], 0
    for rel, classes in ROLE_SHELLS.items():
        tree = ast.parse((ROOT / rel).read_text())
        shells = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name in classes]
        assert {c.name for c in shells} == classes, rel
        for cls in shells:
            for fn in (n for n in cls.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
                for arg in [*fn.args.args, *fn.args.kwonlyargs]:
                    checked += 1
                    if PATH_LIKE.search(arg.arg):
                        found.append(f"{rel}: {cls.name}.{fn.name}({arg.arg})")
    assert checked > 50
    assert not found, f"role methods that take a path (send ShippedFiles instead): {found}"


def test_the_rule_catches_a_path_parameter():
    tree = ast.parse("class RolloutWorker:\n    def load_lora(self, adapter_dir, version): ...\n")
    args = [a.arg for a in tree.body[0].body[0].args.args]
    assert [a for a in args if PATH_LIKE.search(a)] == ["adapter_dir"]


def test_files_round_trip_once_per_host_and_content(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path / "host-tmp"))
    (tmp_path / "host-tmp").mkdir()
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # TMPDIR is read again
    src = tmp_path / "model"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text('{"a": 1}')
    (src / "sub" / "weights.bin").write_bytes(bytes(range(256)) * 10)
    (src / ".weights.bin.tmp-1").write_bytes(b"half written")  # an interrupted write is not shipped
    shipped = pack_dir(src)
    assert sorted(shipped.files) == ["config.json", "sub/weights.bin"] and shipped.nbytes == 2568
    assert model_name(shipped) == str(src) and str(shipped) == str(src)
    copy = local_copy(shipped)
    assert copy.is_relative_to(tmp_path / "host-tmp") and (copy / "sub" / "weights.bin").read_bytes() == bytes(range(256)) * 10
    assert local_copy(shipped) == copy and model_dir(shipped) == str(copy)  # once per host and content
    (src / "config.json").write_text('{"a": 2}')
    changed = pack_dir(src)
    assert changed.digest != shipped.digest and local_copy(changed) != copy
    assert model_dir("Qwen/Qwen2-VL-2B-Instruct") == "Qwen/Qwen2-VL-2B-Instruct"  # a hub id: each host loads it
    assert ship_if_local("Qwen/Qwen2-VL-2B-Instruct") == "Qwen/Qwen2-VL-2B-Instruct"
    assert isinstance(ship_if_local(str(src)), ShippedFiles)


def test_land_replaces_a_directory_and_refuses_names_outside_it(tmp_path):
    target = tmp_path / "out"
    land(pack_files({"a.txt": b"old", "old-only.txt": b"x"}, "first"), target)
    land(pack_files({"a.txt": b"new"}, "second"), target)
    assert sorted(p.name for p in target.iterdir()) == ["a.txt"] and (target / "a.txt").read_bytes() == b"new"
    with pytest.raises(ValueError, match=r"evil: file name '../escaped' points outside its directory"):
        land(pack_files({"../escaped": b"x"}, "evil"), tmp_path / "other")
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "other").exists()


def test_a_page_travels_as_its_bytes(tmp_path):
    from docvqa.sample import Page

    image = Image.new("RGB", (40, 30), (200, 10, 10))
    image.save(tmp_path / "p.png")
    page = Page("d/p1", "d", 1, image_path=str(tmp_path / "p.png"))
    portable = page.portable()
    assert portable.image_path is None and portable.image_bytes == (tmp_path / "p.png").read_bytes()
    assert portable.source == str(tmp_path / "p.png")  # still named by its file (index metadata, messages)
    (tmp_path / "p.png").unlink()  # as on another host: the file is not there, the bytes are
    assert portable.load_image().getpixel((0, 0)) == (200, 10, 10)
    assert portable.portable() is portable
    with pytest.raises(OSError, match="page d/p1: cannot read image"):
        page.portable()


def test_a_pdf_page_travels_rendered(tmp_path):
    from docvqa.sample import Page

    pages = [Image.new("RGB", (100, 100), c) for c in ("white", (0, 0, 255))]
    pages[0].save(tmp_path / "doc.pdf", save_all=True, append_images=pages[1:])
    page = Page("doc/p2", "doc", 2, image_path=str(tmp_path / "doc.pdf"), pdf_page=2)
    portable = page.portable()
    assert portable.source == f"{tmp_path / 'doc.pdf'}#page=2"
    decoded = Image.open(io.BytesIO(portable.image_bytes))
    assert decoded.format == "PNG" and decoded.convert("RGB").getpixel((50, 50)) == page.load_image().getpixel((50, 50))


def test_shard_files_hold_exactly_a_shard_of_the_index(tmp_path):
    """A retriever actor on another host gets a manifest of only the segments of its slice, with
    its range re-based: it maps exactly the pages the whole index maps for that slice."""
    from retriever.index import Manifest, load_index, read_manifest, shard_files, write_manifest, write_segment

    gen = torch.Generator().manual_seed(0)
    settings = {"model": "m", "dim": 4}
    manifest = Manifest(settings)
    ids = [f"d{i}/p1" for i in range(10)]
    for s, chunk in enumerate((ids[:3], ids[3:4], ids[4:8], ids[8:])):  # segments of 3, 1, 4 and 2 pages
        vectors = [torch.randn(2 + i % 3, 4, generator=gen) for i in range(len(chunk))]
        manifest.add_segment(write_segment(tmp_path / "idx", f"segment-{s:05d}.safetensors", chunk, vectors),
                             {pid: {"doc_id": pid.split("/")[0], "page_no": 1} for pid in chunk})
    manifest.delete({"d5/p1"})  # a deleted page shifts the live order
    write_manifest(tmp_path / "idx", manifest)
    whole = read_manifest(tmp_path / "idx")
    live = whole.live_page_ids()
    assert len(live) == 9
    for lo, hi in ((0, 3), (2, 5), (3, 4), (4, 9), (0, 9), (9, 9)):
        files, shard_range = shard_files(tmp_path / "idx", whole, (lo, hi))
        land(pack_files(files, "shard"), tmp_path / f"shard-{lo}-{hi}")
        shard = load_index(tmp_path / f"shard-{lo}-{hi}", shard_range)
        reference = load_index(tmp_path / "idx", (lo, hi))
        assert shard.page_ids == reference.page_ids == live[lo:hi], (lo, hi)
        for a, b in zip(shard.vectors, reference.vectors):
            assert torch.equal(a, b)
        needed = {s["file"] for s in whole.segments if set(Manifest._live(s)) & set(live[lo:hi])}
        assert set(files) - {"manifest.json"} == needed, (lo, hi)


def test_each_learner_rank_gets_its_own_part_of_a_checkpoint():
    from learner.group import rank_files

    files = {"meta.json": b"m", "docrl/mp_rank_00_model_states.pt": b"w", "rng_rank0.pt": b"r0", "rng_rank1.pt": b"r1",
             "docrl/zero_pp_rank_0_mp_rank_00_optim_states.pt": b"o0",
             "docrl/zero_pp_rank_1_mp_rank_00_optim_states.pt": b"o1",
             "docrl/zero_pp_rank_10_mp_rank_00_optim_states.pt": b"o10"}
    shared = {"meta.json", "docrl/mp_rank_00_model_states.pt"}
    assert set(rank_files(files, 0)) == shared | {"rng_rank0.pt", "docrl/zero_pp_rank_0_mp_rank_00_optim_states.pt"}
    assert set(rank_files(files, 1)) == shared | {"rng_rank1.pt", "docrl/zero_pp_rank_1_mp_rank_00_optim_states.pt"}
    assert set(rank_files(files, 10)) == shared | {"docrl/zero_pp_rank_10_mp_rank_00_optim_states.pt"}

"""Expected failures of the `docrl` command end with a few lines that name the problem and the
fix, and a non-zero exit: no traceback (that is for bugs, and for --debug)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.ray_helpers import free_port

ROOT = Path(__file__).resolve().parents[1]


def docrl(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def _clean_failure(done: subprocess.CompletedProcess, sentence: str, code: int = 2) -> str:
    out = done.stdout + done.stderr
    assert done.returncode == code, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert sentence in out, out[-3000:]
    return out


def test_index_of_a_missing_folder(tmp_path):
    _clean_failure(docrl("index", "--folder", str(tmp_path / "nope"), f"run.output_dir={tmp_path}"),
                   f"docrl index: --folder {tmp_path / 'nope'}: no such folder")


def test_index_of_a_folder_of_unreadable_files_names_each_file(tmp_path):
    """Before: FileNotFoundError '.manifest.json.tmp', and the skipped lines were lost."""
    folder = tmp_path / "scans"
    folder.mkdir()
    (folder / "a.png").write_text("not an image")
    (folder / "b.pdf").write_text("%PDF-broken")
    out = _clean_failure(docrl("index", "--folder", str(folder), f"run.output_dir={tmp_path}"),
                         "no readable image or PDF page among 2 file(s)")
    assert f"skipped: {folder / 'a.png'}" in out and f"skipped: {folder / 'b.pdf'}" in out


def test_train_with_a_missing_data_path(tmp_path):
    _clean_failure(docrl("train", "data.source=docvqa_json", f"data.path={tmp_path / 'nowhere'}",
                         f"run.output_dir={tmp_path / 'run'}"),
                   f"data.path='{tmp_path / 'nowhere'}' has neither train_v1.0.json nor train.json")


def test_train_refuses_to_write_over_another_run(tmp_path):
    """Before: the metrics, summary and report of the previous run were replaced without a word, and
    its newer-numbered checkpoints pruned the new ones."""
    from cluster.checkpoint import CheckpointManager

    CheckpointManager(tmp_path / "checkpoints").save(60, lambda d: None)
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "metrics.jsonl").write_text(json.dumps({"step": 60}) + "\n")
    out = _clean_failure(docrl("train", f"run.output_dir={tmp_path}"), "already holds a training run")
    assert "--resume" in out and f"trainer.init_from={tmp_path / 'checkpoints' / 'step-00000060'}" in out
    assert (tmp_path / "logs" / "metrics.jsonl").read_text() == json.dumps({"step": 60}) + "\n"


def _fake_index(tmp_path: Path) -> Path:
    """What `docrl serve` checks before it starts anything: a folder with a manifest."""
    index = tmp_path / "index"
    index.mkdir()
    (index / "manifest.json").write_text("{}")
    return index


def _imported(done: subprocess.CompletedProcess) -> set[str]:
    """The modules a `python -X importtime` run imported (its stderr names each)."""
    return {line.split("|")[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}


def test_serve_on_a_port_in_use_says_so_before_starting_ray(tmp_path):
    """Before: the message came after ~10-17 s, spent importing Ray, Serve and torch (the port
    was checked after those imports, and the error's reporting imported the trainer)."""
    index = _fake_index(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        t0 = time.monotonic()
        done = subprocess.run([sys.executable, "-X", "importtime", "-m", "cluster.cli", "serve", "--checkpoint",
                               str(tmp_path), "--index", str(index), f"serve.port={port}", f"run.output_dir={tmp_path}"],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
        seconds = time.monotonic() - t0
    out = _clean_failure(done, f"cannot listen on 127.0.0.1:{port}")
    assert "serve.port=PORT" in out and "Started a local Ray instance" not in out
    assert not {"ray", "torch"} & _imported(done), "the port is refused before Ray or torch is imported"
    assert seconds < 8, f"{seconds:.1f}s to refuse a port in use"


def test_serve_with_a_missing_checkpoint_says_so_before_starting_ray(tmp_path):
    """Before: "... is neither a docrl checkpoint nor a model directory", after Ray and Serve had started."""
    index = _fake_index(tmp_path)
    missing = tmp_path / "runs" / "step-00000060"
    t0 = time.monotonic()
    out = _clean_failure(docrl("serve", "--checkpoint", str(missing), "--index", str(index),
                               f"serve.port={free_port()}", f"run.output_dir={tmp_path}"),
                         f"docrl serve: --checkpoint: {missing} does not exist")
    assert "neither a docrl checkpoint" not in out and "Started a local Ray instance" not in out
    assert time.monotonic() - t0 < 8


@pytest.mark.parametrize("command", [["search", "-q", "What is the total?"], ["retrieval-eval"]])
def test_a_missing_index_is_refused_before_starting_ray(command, tmp_path):
    missing = tmp_path / "no-index"
    out = _clean_failure(docrl(*command, "--index", str(missing), f"run.output_dir={tmp_path}"),
                         f"docrl {command[0]}: --index: {missing} does not exist")
    assert "Started a local Ray instance" not in out


def test_debug_shows_the_traceback(tmp_path):
    done = docrl("--debug", "index", "--folder", str(tmp_path / "nope"), f"run.output_dir={tmp_path}")
    assert done.returncode != 0 and "Traceback" in done.stderr and "CLIError" in done.stderr


def test_an_expected_error_raised_inside_an_actor_is_unwrapped():
    """`docrl search` with an index of another model: the IndexLoadError comes back wrapped in
    Ray's RayTaskError."""
    from ray.exceptions import RayTaskError

    from cluster.cli import expected_error
    from retriever.index import IndexLoadError

    refused = IndexLoadError("the page index at X was built with other embedding settings")
    wrapped = RayTaskError("RetrieverActor.load_shard", "Traceback ...", refused)
    assert expected_error(wrapped) is refused
    assert expected_error(RuntimeError("a bug")) is None


def test_a_full_disk_at_a_checkpoint_is_a_one_line_error_not_a_bug():
    from cluster.checkpoint import CheckpointSpaceError
    from cluster.cli import expected_error

    full = CheckpointSpaceError("checkpoint of step 2 in runs/x/checkpoints: no space left on the device")
    assert expected_error(full) is full and expected_error(OSError(28, "No space left on device")) is None


def test_a_lost_retriever_shard_is_a_one_line_error_not_a_bug():
    """An index held only in memory cannot be restored when its actor dies: the message names the
    shard and what to do (tests/test_retriever.py), and is no bug to print a traceback for."""
    from cluster.cli import expected_error
    from retriever.group import RetrieverShardLost

    lost = RetrieverShardLost("retriever group: shard 0 of 1 (2 pages) lost its actor while searching 6 queries")
    assert expected_error(lost) is lost


@pytest.mark.parametrize("bad", ["rollout.sampling.temprature=0.5"])
def test_bad_config_is_one_message(bad, tmp_path):
    _clean_failure(docrl("train", bad, f"run.output_dir={tmp_path}"), "rollout.sampling.temprature: unknown key")


def test_a_relative_run_directory_is_refused_inside_a_ray_job_package(tmp_path):
    """Before: under `ray job submit --working-dir .` a relative run.output_dir put checkpoints and
    logs inside Ray's unpacked copy of the working dir, which vanishes with the cluster."""
    package = tmp_path / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123abcd"
    package.mkdir(parents=True)
    docrl_bin = Path(sys.executable).with_name("docrl")
    done = subprocess.run([str(docrl_bin), "train", "run.output_dir=runs/tiny"], cwd=package, capture_output=True,
                          text=True, timeout=300)
    out = _clean_failure(done, "run.output_dir=runs/tiny is relative")
    assert str(package) in out and not (package / "runs").exists()


def test_an_override_before_an_option_is_not_taken_for_a_positional_argument():
    """`docrl feedback export --config C run.output_dir=X --index I OUT` was refused ("unrecognized
    arguments: OUT"): argparse took the override for OUT."""
    from cluster.cli import build_parser, overrides_last

    argv = ["feedback", "export", "--config", "configs/tiny.yaml", "run.output_dir=/r", "--index", "/r/index", "/r/out",
            "trainer.extra_sources[0].path=x"]
    args = build_parser().parse_args(overrides_last(argv))
    assert args.out_dir == "/r/out" and args.index == "/r/index"
    assert args.overrides == ["run.output_dir=/r", "trainer.extra_sources[0].path=x"]
    # option values and words that are not config keys stay where they are
    assert overrides_last(["search", "--query", "what=this", "data.path=p", "--k", "3"]) == [
        "search", "--query", "what=this", "--k", "3", "data.path=p"]

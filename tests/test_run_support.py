"""Checkpoint directories and the metrics sinks (JSONL, TensorBoard, Ray metrics, PNG report)."""

from __future__ import annotations

import json
import os

import pytest
from PIL import Image

from cluster.checkpoint import MARKER, CheckpointManager
from cluster.metrics import MetricsLogger, plot_report, prometheus_name, read_jsonl


def test_checkpoints_are_atomic_and_pruned(tmp_path):
    mgr = CheckpointManager(tmp_path / "ckpt", keep_last=2)
    assert mgr.latest() is None
    for step in (5, 10, 15):
        mgr.save(step, lambda d, s=step: (d / "state.json").write_text(json.dumps({"s": s})), meta={"weights_version": step})
    assert [p.name for p in mgr.complete()] == ["step-00000010", "step-00000015"]
    assert json.loads((mgr.latest() / "state.json").read_text()) == {"s": 15}
    assert CheckpointManager.meta(mgr.latest())["weights_version"] == 15

    def crash(d):
        (d / "half").write_text("x")
        raise RuntimeError("killed mid-save")

    with pytest.raises(RuntimeError):
        mgr.save(20, crash)
    assert mgr.latest().name == "step-00000015"  # the half-written one is invisible
    mgr.save(25, lambda d: None)
    assert not list((tmp_path / "ckpt").glob(".tmp-*")) and mgr.latest().name == "step-00000025"
    with pytest.raises(FileNotFoundError, match=MARKER):
        CheckpointManager.meta(tmp_path)


def test_checkpoints_are_kept_by_recency_not_by_step_number(tmp_path):
    """Before: a run that continued at step 1 in a directory holding step 60 had its new
    checkpoint pruned at once (the highest step numbers were kept)."""
    mgr = CheckpointManager(tmp_path / "ckpt", keep_last=2)
    for step in (60, 1, 2):
        mgr.save(step, lambda d: None)
    assert [p.name for p in mgr.complete()] == ["step-00000001", "step-00000002"]
    assert mgr.latest().name == "step-00000002"


class Killed(BaseException):
    """The process dying at this point (SIGKILL runs no handler: nothing after it happens)."""


def _killed_after_first_file(path, *args, **kwargs):
    """shutil.rmtree that dies after removing one file of the tree (the first by name)."""
    from pathlib import Path

    if not Path(path).exists():
        return
    first = sorted(p for p in Path(path).rglob("*") if p.is_file())
    first[0].unlink()
    raise Killed(path)


@pytest.mark.parametrize("where", ["removing the replaced checkpoint", "between the two renames", "pruning"])
def test_a_process_killed_while_a_checkpoint_is_replaced_or_pruned_leaves_only_complete_ones(tmp_path, monkeypatch, where):
    """The driver SIGKILLed while it re-saves a step (the final checkpoint of a run rewrites the
    step just saved) or prunes an old one. Before: the checkpoint being removed lost files while
    its marker still stood, and a resume loaded it; or the step vanished between the removal and
    the rename."""
    import cluster.checkpoint as checkpoint

    root = tmp_path / "ckpt"

    def files(tag):
        def write(d):
            (d / "a.bin").write_text(tag)
            (d / "b.bin").write_text(tag)
        return write

    mgr = CheckpointManager(root, keep_last=2)
    mgr.save(1, files("one"))
    mgr.save(2, files("two"))
    if where == "pruning":
        monkeypatch.setattr(checkpoint.shutil, "rmtree", _killed_after_first_file)
        with pytest.raises(Killed):
            mgr.save(3, files("three"))
    else:
        if where == "between the two renames":
            renames = []
            real_replace = os.replace

            def killed_at_the_second_rename(src, dst):
                renames.append((src, dst))
                if len(renames) == 2:
                    raise Killed(src)
                real_replace(src, dst)

            monkeypatch.setattr(checkpoint.os, "replace", killed_at_the_second_rename)
        else:
            monkeypatch.setattr(checkpoint.shutil, "rmtree", _killed_after_first_file)
        with pytest.raises(Killed):
            mgr.save(2, files("two, again"))
    monkeypatch.undo()

    after = CheckpointManager(root, keep_last=2)  # the next process
    for ckpt in after.complete():
        assert sorted(p.name for p in ckpt.iterdir()) == ["a.bin", "b.bin", MARKER], ckpt
        assert (ckpt / "a.bin").read_text() == (ckpt / "b.bin").read_text()
    latest = after.latest()
    expected = {"pruning": ("step-00000003", {"three"}), "between the two renames": ("step-00000002", {"two", "two, again"}),
                "removing the replaced checkpoint": ("step-00000002", {"two, again"})}[where]
    assert latest.name == expected[0] and (latest / "a.bin").read_text() in expected[1]
    after.save(4, files("four"))  # and the directory works on: nothing half-removed stays behind
    assert sorted(p.name for p in root.iterdir()) == [after.name(s) for s in (3 if where == "pruning" else 2, 4)]


def test_a_resumed_metrics_log_drops_the_steps_after_the_checkpoint_and_a_torn_line(tmp_path):
    """A driver SIGKILLed after logging steps its last checkpoint does not hold (and perhaps in the
    middle of a line). Before: the resume appended the redone steps after the lost ones (two rows
    for a step) and read_jsonl failed on the torn line."""
    log = MetricsLogger(tmp_path, tensorboard=False, ray_metrics=False)
    for step in (0, 1, 2, 2, 3):
        log.log(step, {"reward/mean": float(step)})
    log.close()
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 4, "reward/me')  # the kill landed inside a write
    resumed = MetricsLogger(tmp_path, tensorboard=False, ray_metrics=False, append=True)
    resumed.truncate_after(2)
    resumed.log(3, {"reward/mean": 30.0})
    resumed.close()
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["reward/mean"]) for r in rows] == [(0, 0.0), (1, 1.0), (2, 2.0), (2, 2.0), (3, 30.0)]


def test_metrics_go_to_jsonl_tensorboard_and_png(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = MetricsLogger(tmp_path, ray_metrics=False)
    for step in range(4):
        log.log(step, {"reward/mean": 0.1 * step, "kl": float("nan") if step == 2 else 0.01})
    log.close()
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["reward/mean"] for r in rows] == pytest.approx([0.0, 0.1, 0.2, 0.3]) and rows[2]["kl"] is None
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("reward/mean")] == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert len(acc.Scalars("kl")) == 3  # the NaN is not written
    png = plot_report(tmp_path / "metrics.jsonl", tmp_path / "report.png")
    with Image.open(png) as im:
        assert im.size[0] > 300 and im.size[1] > 200
    assert prometheus_name("time/rollout_s") == "docrl_time_rollout_s"


def test_the_report_shows_the_headline_panels_that_a_run_logged():
    from cluster.metrics import _headline, report_panels

    logged = ["reward/mean", "eval/anls", "eval/exact_match", "eval/retrieval_recall@1", "eval/retrieval_recall@3",
              "learner/kl_to_ref", "learner/entropy_estimate", "learner/logprob_mismatch_mean", "time/step_s",
              "retriever/entropy", "retriever/loss", "retriever/version"]
    panels = dict(report_panels(logged))
    assert list(panels) == ["train reward (mean over answers)", "held-out answers (greedy)", "held-out retrieval",
                            "the retriever's page policy (retriever.learn)", "KL(policy || reference) per token", "entropy per token", "rollout vs learner logprob gap"]
    assert panels["held-out answers (greedy)"] == ("eval/anls", "eval/exact_match")
    assert panels["held-out retrieval"] == ("eval/retrieval_recall@1", "eval/retrieval_recall@3")
    assert panels["entropy per token"] == ("learner/entropy_estimate",)
    assert panels["the retriever's page policy (retriever.learn)"] == ("retriever/entropy", "retriever/loss")
    # a run without retrieval or a reference gets no empty panel for them
    assert [t for t, _ in report_panels(["reward/mean", "eval/anls"])] == ["train reward (mean over answers)",
                                                                          "held-out answers (greedy)"]
    summary = {"anls_before_rl": 0.2, "anls_after_rl": 0.5, "anls_rl_gain": 0.3,
               "exact_match_before_rl": 0.125, "exact_match_after_rl": 0.25, "exact_match_rl_gain": 0.125}
    assert _headline(summary) == "RL: held-out ANLS 0.200 -> 0.500 (+0.300), exact match 0.125 -> 0.250 (+0.125)"


HELD_OUT, RETRIEVAL = "held-out answers (greedy)", "held-out retrieval"
NOT_EXERCISED = "retrieval not exercised: the gold page is given (retriever.use_gold_page)"


def _run_rows(anls, exact_match, recall=1.0, warm_start=None) -> list[dict]:
    """Metric rows as a run logs them: the warm start (before, after) at step 0, train reward per
    step, held-out evaluation at steps 0, 2 and 4."""
    rows = []
    if warm_start is not None:
        rows.append({"step": 0, "warm_start/loss_first": 6.8, "warm_start/loss_last": 0.5, "warm_start/seconds": 30.0,
                     "warm_start/eval_anls_before": warm_start[0], "warm_start/eval_anls_after": warm_start[1]})
    rows += [{"step": s, "reward/mean": 0.1 * s} for s in range(1, 5)]
    rows += [{"step": s, "eval/anls": a, "eval/exact_match": e, "eval/retrieval_recall@3": recall}
             for s, a, e in zip((0, 2, 4), anls, exact_match)]
    return rows


def _panel(fig, title: str):
    return next(ax for ax in fig.axes if ax.get_title() == title)


def _texts(ax) -> list[str]:
    return [" ".join(t.get_text().split()) for t in ax.texts]


def test_the_report_shows_anls_and_exact_match_where_they_coincide():
    """Before: exact match was drawn over ANLS with the same line and markers: where a run's
    answers were all exact or all wrong, the ANLS line could not be seen."""
    from cluster.metrics import build_report

    fig = build_report(_run_rows(anls=[0.0, 0.5, 1.0], exact_match=[0.0, 0.5, 1.0]))
    lines = {line.get_label(): line for line in _panel(fig, HELD_OUT).get_lines()}
    anls, exact = lines["eval/anls"], lines["eval/exact_match"]
    assert list(anls.get_ydata()) == list(exact.get_ydata())
    assert anls.get_zorder() > exact.get_zorder()  # ANLS on top
    assert anls.get_linestyle() != exact.get_linestyle() and anls.get_marker() != exact.get_marker()
    # the line underneath shows around the one on top: wider, with larger hollow markers
    assert exact.get_linewidth() > anls.get_linewidth() and exact.get_markersize() > anls.get_markersize()
    assert exact.get_markerfacecolor() == "none"


def test_the_report_says_retrieval_is_not_exercised_when_the_gold_page_is_given(tmp_path):
    """Before: a run given the gold page (recall logged as 1.0) showed a flat, perfect recall."""
    from cluster.metrics import build_report

    rows = _run_rows(anls=[0.1, 0.2, 0.3], exact_match=[0.0, 0.1, 0.2], recall=1.0)
    given = _panel(build_report(rows, gold_page_given=True), RETRIEVAL)
    assert given.get_lines() == [] and _texts(given) == [NOT_EXERCISED]
    retrieved = _panel(build_report(rows), RETRIEVAL)
    assert [line.get_label() for line in retrieved.get_lines()] == ["eval/retrieval_recall@3"] and not retrieved.texts
    with (tmp_path / "metrics.jsonl").open("w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    with Image.open(plot_report(tmp_path / "metrics.jsonl", tmp_path / "report.png", gold_page_given=True)) as im:
        assert im.size[0] > 300


def test_the_report_shows_the_warm_starts_gain():
    """Before: the warm start's held-out ANLS before and after (logged at step 0) was on no image."""
    from cluster.metrics import build_report

    fig = build_report(_run_rows(anls=[0.3, 0.4, 0.5], exact_match=[0.2, 0.3, 0.4], warm_start=(0.05, 0.3)))
    ax = _panel(fig, HELD_OUT)
    assert "warm start: 0.050 -> 0.300" in _texts(ax) and "" in _texts(ax)  # the label, the arrow
    before = {line.get_label(): line for line in ax.get_lines()}["held-out ANLS before the warm start"]
    assert (list(before.get_xdata()), list(before.get_ydata())) == ([0], [0.05])
    assert "warm start: held-out ANLS 0.050 -> 0.300" in fig.get_suptitle()
    # a run without a warm start gets neither
    plain = build_report(_run_rows(anls=[0.3, 0.4, 0.5], exact_match=[0.2, 0.3, 0.4]))
    assert not _panel(plain, HELD_OUT).texts and "warm start" not in plain.get_suptitle()


@pytest.mark.ray
def test_ray_metrics_gauges_accept_values(ray_cluster, tmp_path):
    log = MetricsLogger(tmp_path, tensorboard=False, tags={"run": "test"})
    log.log(1, {"reward/mean": 0.5})
    assert "reward/mean" in log._gauges
    log.close()


def test_training_summary_separates_warm_start_from_rl():
    from cluster.metrics import training_summary

    rows = [{"step": 0, "warm_start/loss_first": 6.8, "warm_start/loss_last": 0.5, "warm_start/eval_anls_before": 0.0,
             "warm_start/eval_anls_after": 0.25, "warm_start/seconds": 30.0},
            {"step": 0, "eval/anls": 0.25, "eval/exact_match": 0.2}]
    rows += [{"step": s, "reward/mean": r} for s, r in zip(range(1, 11), [0.1, 0.2, 0.2, 0.3, 0.3, 0.4, 0.4, 0.5, 0.6, 0.7])]
    rows += [{"step": 5, "eval/anls": 0.4, "eval/exact_match": 0.3}, {"step": 10, "eval/anls": 0.6, "eval/exact_match": 0.55}]
    s = training_summary(rows)
    assert s["warm_start"]["eval_anls_after"] == 0.25 and s["warm_start"]["loss_last"] == 0.5
    assert s["anls_warm_start_gain"] == pytest.approx(0.25)  # the warm start's own gain, apart from RL's
    assert (s["anls_before_rl"], s["anls_after_rl"]) == (0.25, 0.6) and s["anls_rl_gain"] == pytest.approx(0.35)
    assert s["exact_match_rl_gain"] == pytest.approx(0.35) and s["eval_steps"] == [0, 5, 10] and s["train_steps"] == 10
    # the first and last fifth (2 of 10 steps) of the train reward
    assert s["train_reward_first_steps"] == pytest.approx(0.15) and s["train_reward_last_steps"] == pytest.approx(0.65)
    assert "warm_start" not in training_summary(rows[1:])
    assert "retriever_warm_start" not in s and "retrieval_recall@2_before_rl" not in s


def test_training_summary_reports_the_retrievers_warm_start_and_recall():
    from cluster.metrics import training_summary

    rows = [{"step": 0, "retriever_warm_start/loss_first": 0.9, "retriever_warm_start/loss_last": 0.3,
             "retriever_warm_start/eval_recall@1_before": 0.25, "retriever_warm_start/eval_recall@1_after": 0.9},
            {"step": 0, "eval/anls": 0.1, "eval/exact_match": 0.1, "eval/retrieval_recall@2": 0.95},
            {"step": 1, "reward/mean": 0.2},
            {"step": 1, "eval/anls": 0.5, "eval/exact_match": 0.4, "eval/retrieval_recall@2": 0.95}]
    s = training_summary(rows)
    assert s["retriever_warm_start"] == {"loss_first": 0.9, "loss_last": 0.3, "eval_recall@1_before": 0.25,
                                         "eval_recall@1_after": 0.9}
    assert (s["retrieval_recall@2_before_rl"], s["retrieval_recall@2_after_rl"]) == (0.95, 0.95)
    assert s["anls_rl_gain"] == pytest.approx(0.4) and s["exact_match_rl_gain"] == pytest.approx(0.3)


def test_metrics_log_starts_afresh_unless_resuming(tmp_path):
    for append, expected in ((False, [1]), (False, [1]), (True, [1, 1])):
        log = MetricsLogger(tmp_path, tensorboard=False, ray_metrics=False, append=append)
        log.log(1, {"reward/mean": 0.5})
        log.close()
        assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == expected


def test_lr_decay_spans_the_run_unless_set():
    from cluster.config import load_config
    from cluster.train import with_derived_lr_decay

    cfg = load_config(None, ["trainer.total_steps=10", "trainer.prompts_per_step=8", "rollout.sampling.n=4",
                             "algorithm.minibatch_size=16", "algorithm.ppo_epochs=2"])
    assert with_derived_lr_decay(cfg).learner.lr_decay_steps == 10 * 2 * 2  # 32 samples / 16 = 2 minibatches
    cfg = load_config(None, ["learner.lr_decay_steps=7"])
    assert with_derived_lr_decay(cfg).learner.lr_decay_steps == 7


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs mounted at a fresh directory (root only), unmounted afterwards."""
    import shutil
    import subprocess

    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("this machine refuses a tmpfs mount")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_during_a_checkpoint_names_the_path_and_the_bytes_and_loses_nothing(small_disk):
    from cluster.checkpoint import CheckpointSpaceError

    mgr = CheckpointManager(small_disk / "ckpt", keep_last=2)
    mgr.save(1, lambda d: (d / "weights.bin").write_bytes(b"w" * 600_000))
    filler = small_disk / "someone-else"
    filler.write_bytes(b"f" * 1_000_000)  # what else filled the disk meanwhile

    with pytest.raises(CheckpointSpaceError) as e:
        mgr.save(2, lambda d: (d / "weights.bin").write_bytes(b"w" * 600_000))
    message = str(e.value)
    assert str(small_disk / "ckpt") in message and "step 2" in message
    assert "600" in message and "bytes free" in message, message  # needs about the last checkpoint's size
    assert "step-00000001" in message and "--resume" in message, message
    assert [p.name for p in mgr.complete()] == ["step-00000001"]  # the previous checkpoint is intact
    assert (mgr.latest() / "weights.bin").read_bytes() == b"w" * 600_000
    assert not list((small_disk / "ckpt").glob(".tmp-*"))  # the half-written one is gone, its space freed

    filler.unlink()  # space freed: the run continues
    assert mgr.save(2, lambda d: (d / "weights.bin").write_bytes(b"w" * 600_000)).name == "step-00000002"

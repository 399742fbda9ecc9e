"""Checkpoint directories and the metrics sinks (JSONL, TensorBoard, Ray metrics, PNG report)."""

from __future__ import annotations

import json

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


@pytest.mark.ray
def test_ray_metrics_gauges_accept_values(ray_cluster, tmp_path):
    log = MetricsLogger(tmp_path, tensorboard=False, tags={"run": "test"})
    log.log(1, {"reward/mean": 0.5})
    assert "reward/mean" in log._gauges
    log.close()

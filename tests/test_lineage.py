"""A run continued from another run's checkpoint (`trainer.init_from`): its weights versions
count on from the parent's, and its feedback store is the first run's (common/lineage.py). Before,
the continued run reported `weights_version 60, step 60` like its parent and recorded into a new
database, where the parent's answers were unknown."""

from __future__ import annotations

import json
from types import SimpleNamespace

from cluster.train import continue_lineage
from feedback.config import FeedbackConfig
from rollout.policy import resolve_policy, write_policy


def _checkpoint(run_dir, step: int, version: int, tmp_path, version_base: int = 0, parent=None):
    """A run checkpoint holding a (file-only) LoRA policy, as write_policy writes it."""
    adapter = tmp_path / f"adapter-{run_dir.name}-{step}"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    ckpt = run_dir / "checkpoints" / f"step-{step:08d}"
    write_policy(ckpt / "policy", "base-model", SimpleNamespace(kind="lora", adapter_dir=str(adapter), version=version),
                 step=step, version_base=version_base, parent=parent)
    return ckpt


def test_a_lineage_counts_versions_on_and_shares_the_first_runs_feedback_store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "runs" / "tiny"
    parent = _checkpoint(root, 60, 60, tmp_path)
    child_dir = tmp_path / "runs" / "tiny-feedback"
    lineage = continue_lineage(child_dir, "runs/tiny/checkpoints/step-00000060", FeedbackConfig())
    root_store = f"sqlite:///{root / 'feedback' / 'feedback.db'}"  # absolute, whatever the directory served from
    assert lineage == {"parent_checkpoint": str(parent), "parent_run_dir": str(root), "parent_weights_version": 60,
                       "feedback_database_url": root_store}
    assert json.loads((child_dir / "lineage.json").read_text()) == lineage
    assert FeedbackConfig().url(child_dir) == root_store

    # the continued run's step 1: version 61, with its parent recorded
    child = _checkpoint(child_dir, 1, 1, tmp_path, version_base=60, parent=lineage["parent_checkpoint"])
    spec = resolve_policy(child)
    assert (spec["weights_version"], spec["step"], spec["parent"]) == (61, 1, str(parent))
    assert resolve_policy(parent)["weights_version"] == 60 and resolve_policy(parent)["parent"] is None

    # a grandchild, from the child's policy/ folder: still the first run's store, versions from 61
    grandchild = continue_lineage(tmp_path / "g", child / "policy", FeedbackConfig())
    assert grandchild["feedback_database_url"] == root_store and grandchild["parent_weights_version"] == 61
    assert grandchild["parent_run_dir"] == str(child_dir)

    # a store named in the config wins, and a plain model directory has no run to inherit from
    assert FeedbackConfig(database_url="postgresql://db/docrl").url(child_dir) == "postgresql://db/docrl"
    named = continue_lineage(tmp_path / "n", parent, FeedbackConfig(database_url="postgresql://db/docrl"))
    assert named["feedback_database_url"] is None
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    plain = continue_lineage(tmp_path / "p", model_dir, FeedbackConfig())
    assert plain["parent_run_dir"] is None and plain["parent_weights_version"] == 0
    assert FeedbackConfig().url(tmp_path / "p") == f"sqlite:///{tmp_path / 'p' / 'feedback' / 'feedback.db'}"

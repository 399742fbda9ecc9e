"""`docrl train` end to end on the tiny preset (realistic level, retrieval on): two synchronous
steps; a resume from the step-1 checkpoint that reproduces step 2 exactly; and the async mode."""

from __future__ import annotations

import json
import math
import shutil

import pytest

from cluster.config import load_config
from cluster.metrics import read_jsonl

pytestmark = [pytest.mark.ray, pytest.mark.vllm]

# Measured, not tuned: what may differ between two runs of the same step (wall-clock figures).
TIMING_PREFIXES = ("time/", "throughput/", "learner/update_seconds", "learner/score_seconds", "learner/train_seconds",
                   "learner/tokens_per_s", "learner/seconds")


def _overrides(tmp_path, tiny_models, *extra):
    return [f"run.output_dir={tmp_path}", f"run.models_dir={tiny_models['policy'].parent}",
            "trainer.total_steps=2", "trainer.prompts_per_step=2", "rollout.sampling.n=2", "algorithm.minibatch_size=4",
            "learner.micro_batch_size=2", "data.max_eval_samples=2", "data.synthetic.num_documents=6",
            "trainer.eval_every=0", "trainer.save_every=1", "rollout.max_model_len=1024",
            "rollout.num_cpus_per_worker=0.5", "retriever.num_cpus_per_actor=0.5", "reward.num_cpus_per_actor=0.5",
            "learner.num_cpus_per_rank=0.5", *extra]


def _step_rows(out_dir) -> list[dict]:
    return [r for r in read_jsonl(out_dir / "logs" / "metrics.jsonl") if "reward/mean" in r]


def test_two_steps_then_exact_resume(ray_cluster, tiny_models, tmp_path):
    from cluster.train import Trainer

    first = tmp_path / "first"
    trainer = Trainer(load_config(None, _overrides(first, tiny_models)))
    try:
        final = trainer.run()
        assert trainer.rollout.version == trainer.learner.version == 2  # every update reached the rollout
    finally:
        trainer.shutdown()
    logs = first / "logs"
    steps = _step_rows(first)
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert r["learner/first_micro_batch/ratio_mean"] == 1.0 and r["learner/num_experiences"] == 4.0
        assert r["learner/logprob_mismatch_max"] < 1e-3  # rollout vs learner, measured every step
        assert r["time/step_s"] > 0 and r["weights/version"] == r["step"] and r["weights/staleness"] == 0
    assert "eval/anls" in final and "eval/retrieval_recall@1" in final
    assert (logs / "report.png").stat().st_size > 1000 and list((logs / "tensorboard").iterdir())
    assert (logs / "eval-step-0.jsonl").exists() and (logs / "eval-step-2.jsonl").exists()
    checkpoints = sorted(p.name for p in (first / "checkpoints").iterdir())
    assert checkpoints == ["step-00000001", "step-00000002"]
    policy = first / "checkpoints" / "step-00000002" / "policy"
    assert json.loads((policy / "docrl_policy.json").read_text())["weights_version"] == 2
    assert (policy / "adapter" / "adapter_config.json").exists()

    # A second run directory holding only the step-1 checkpoint (and the data and index): the resume
    # must redo step 2 exactly as the uninterrupted run did it - same questions, samples, update.
    second = tmp_path / "second"
    shutil.copytree(first, second, ignore=shutil.ignore_patterns("step-00000002", "logs", "exports"))
    resumed = Trainer(load_config(None, _overrides(second, tiny_models)))
    try:
        resumed.run(resume=True)
        assert resumed.step == 2 and resumed.learner.version == 2 == resumed.rollout.version
    finally:
        resumed.shutdown()
    [again] = _step_rows(second)
    expected = steps[1]
    compared = [k for k in expected if not k.startswith(TIMING_PREFIXES) and k != "step"]
    assert len(compared) > 20
    differ = {k: (expected[k], again.get(k)) for k in compared
              if not (again.get(k) == expected[k] or (isinstance(expected[k], float) and again.get(k) is not None
                                                      and math.isclose(again[k], expected[k], rel_tol=1e-6, abs_tol=1e-9)))}
    assert not differ, differ


def test_async_mode_through_actor_faults_and_an_interrupt(ray_cluster, tiny_models, tmp_path):
    """Async mode, with the rollout worker and a reward actor killed before step 2 (the worker is
    restarted and re-synced, the reward actor replaced, the batch retried: no step or sample lost),
    then Ctrl-C during step 3, which leaves a complete checkpoint of step 2."""
    from cluster.checkpoint import CheckpointManager, resolve_policy
    from cluster.train import Trainer

    ray = ray_cluster
    trainer = Trainer(load_config(None, _overrides(tmp_path, tiny_models, "trainer.mode=async", "trainer.total_steps=3",
                                                   "trainer.save_every=0")))
    train_step = trainer.train_step

    def train_step_with_faults(step):
        if step == 2:  # step 2 starts the collection of batch 3 on the killed actors
            ray.kill(trainer.rollout.workers[0], no_restart=False)
            ray.kill(trainer.rewards.actors[0], no_restart=True)
        if step == 3:
            raise KeyboardInterrupt
        return train_step(step)

    trainer.train_step = train_step_with_faults
    try:
        with pytest.raises(KeyboardInterrupt):
            trainer.run()
        assert trainer.rollout.version == trainer.learner.version == 2
        assert trainer.rewards.restarts >= 1
    finally:
        trainer.shutdown()
    steps = _step_rows(tmp_path)
    assert [r["step"] for r in steps] == [1, 2]
    assert all(r["learner/num_experiences"] == 4.0 and r["data/skipped_rollout"] == 0 for r in steps)
    # step 1 samples with the base weights; step 2's batch was sampled before step 1's update
    assert [r["weights/staleness"] for r in steps] == [0.0, 1.0]
    for r in steps:
        assert "learner/tis_weight_mean" in r and 0 < r["learner/tis_weight_mean"] <= 2.0  # algorithm.tis_cap
    latest = CheckpointManager(tmp_path / "checkpoints").latest()
    assert latest.name == "step-00000002" and CheckpointManager.meta(latest)["weights_version"] == 2
    assert resolve_policy(latest)["weights_version"] == 2
    # the batch of step 3 was drawn ahead; the checkpoint's sampler state is from before it
    assert json.loads((latest / "driver.json").read_text())["sampler"]["position"] == 2 * 2

"""`docrl train` end to end on the tiny preset: two synchronous steps, then a resume to a third."""

from __future__ import annotations

import json

import pytest

from cluster.config import load_config

pytestmark = [pytest.mark.ray, pytest.mark.vllm]


def test_two_steps_then_resume(ray_cluster, tiny_models, tmp_path):
    from cluster.train import Trainer

    overrides = [f"run.output_dir={tmp_path}", f"run.models_dir={tiny_models['policy'].parent}",
                 "trainer.total_steps=2", "trainer.prompts_per_step=2", "rollout.sampling.n=2", "algorithm.minibatch_size=4",
                 "learner.micro_batch_size=2", "data.max_eval_samples=2", "data.synthetic.num_documents=6",
                 "trainer.eval_every=0", "trainer.save_every=1", "rollout.max_model_len=1024",
                 "rollout.num_cpus_per_worker=0.5", "retriever.num_cpus_per_actor=0.5", "reward.num_cpus_per_actor=0.5",
                 "learner.num_cpus_per_rank=0.5"]
    trainer = Trainer(load_config(None, overrides))
    try:
        final = trainer.run()
        assert trainer.rollout.version == trainer.learner.version == 2  # every update reached the rollout
    finally:
        trainer.shutdown()
    logs = tmp_path / "logs"
    rows = [json.loads(line) for line in (logs / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward/mean" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert r["learner/first_micro_batch/ratio_mean"] == 1.0 and r["learner/num_experiences"] == 4.0
        assert r["learner/logprob_mismatch_max"] < 1e-3  # rollout vs learner, measured every step
        assert r["time/step_s"] > 0 and r["weights/version"] == r["step"]
    assert "eval/anls" in final and "eval/retrieval_recall@1" in final
    assert (logs / "report.png").stat().st_size > 1000 and list((logs / "tensorboard").iterdir())
    assert (logs / "eval-step-0.jsonl").exists() and (logs / "eval-step-2.jsonl").exists()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000001", "step-00000002"]

    resumed = Trainer(load_config(None, overrides[:2] + ["trainer.total_steps=3"] + overrides[3:]))
    try:
        resumed.run(resume=True)
        assert resumed.step == 3 and resumed.learner.version == 3 == resumed.rollout.version
    finally:
        resumed.shutdown()
    rows = [json.loads(line) for line in (logs / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "reward/mean" in r] == [1, 2, 3]

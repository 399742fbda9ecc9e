"""`docrl train`: the PPO/GRPO loop for retrieval-augmented document QA, as a Ray job.

    python -m cluster.train --config configs/tiny.yaml [KEY=VALUE ...] [--resume]

One step, in the order the code runs it:

    questions  = sampler.next(trainer.prompts_per_step)        seeded, epoch-wise, resumable
    pages      = retriever.search(questions, top_k)             or the gold page (retriever.use_gold_page)
    rollouts   = rollout.generate(questions + pages, sampling)  n answers each, token ids + logprobs
    rewards    = reward_pool.collect(reward_pool.submit(...))   ANLS & co., per component
    metrics    = learner.update(TrainBatch(rollouts, rewards))  old/ref logprobs, advantages, PPO epochs
    weights    = learner.export_weights(); rollout.push(...)    LoRA adapter or full state, versioned

with evaluation (greedy answers on held-out questions: ANLS, exact match, retrieval recall@k)
before training, every `trainer.eval_every` steps and at the end, checkpoints every
`trainer.save_every` steps, and every metric logged to JSONL, TensorBoard and Ray metrics.
`trainer.mode: sync` is exactly on-policy. `trainer.mode: async` collects the batch of step t+1
while the learner trains on step t (one step off-policy; the learner corrects with truncated
importance sampling against the rollout logprobs, `algorithm.tis_cap`).
"""

from __future__ import annotations

import json
import logging
import math
import random
import signal
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from cluster.checkpoint import CheckpointManager, write_policy
from cluster.config import DocRLConfig
from cluster.metrics import MetricsLogger, plot_report, read_jsonl, training_summary
from cluster.ray_setup import get_with_timeout, init_ray
from docvqa.data import load_train_eval
from docvqa.sample import DocVQASample
from docvqa.tiny_models import resolve_model
from learner.types import TrainBatch

log = logging.getLogger(__name__)


@dataclass
class QuestionSampler:
    """Questions in a seeded random order, epoch after epoch; its state resumes exactly."""

    samples: list[DocVQASample]
    seed: int
    epoch: int = 0
    position: int = 0
    _order: list[int] = field(default_factory=list, repr=False)

    def _shuffle(self) -> None:
        self._order = list(range(len(self.samples)))
        random.Random(f"{self.seed}-{self.epoch}").shuffle(self._order)

    def next(self, n: int) -> list[DocVQASample]:
        if not self.samples:
            raise ValueError("no training questions")
        out = []
        while len(out) < n:
            if not self._order:
                self._shuffle()
            if self.position >= len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._shuffle()
            out.append(self.samples[self._order[self.position]])
            self.position += 1
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
        self._shuffle()


@dataclass
class CollectedBatch:
    """What the rollout phase of one step hands to the learner phase."""

    step: int
    batch: TrainBatch
    scored: list  # reward.types.ScoreResult of every answer (failed ones included, for the counts)
    counts: dict[str, int]  # skipped requests, by phase
    seconds: float  # retrieve + generate + score
    generated_tokens: int


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def with_derived_lr_decay(cfg: DocRLConfig) -> DocRLConfig:
    """Unless `learner.lr_decay_steps` is set, a linear/cosine schedule decays over the whole run:
    trainer.total_steps x optimizer steps per training step (ppo_epochs x minibatches)."""
    if "lr_decay_steps" in cfg.learner.model_fields_set:
        return cfg
    minibatches = math.ceil(cfg.trainer.prompts_per_step * cfg.rollout.sampling.n / cfg.algorithm.minibatch_size)
    steps = max(1, cfg.trainer.total_steps * cfg.algorithm.ppo_epochs * minibatches)
    return cfg.model_copy(update={"learner": cfg.learner.model_copy(update={"lr_decay_steps": steps})})


class Trainer:
    def __init__(self, cfg: DocRLConfig):
        cfg = with_derived_lr_decay(cfg)
        self.cfg = cfg
        self.out = Path(cfg.run.output_dir)
        self.step = 0
        self._ahead: Future | None = None  # async mode: the next step's batch, being collected
        self._rollout_thread = ThreadPoolExecutor(1, thread_name_prefix="docrl-rollout")
        self._sampler_state: dict | None = None

    # -- set-up --------------------------------------------------------------------------------

    def setup(self, resume: bool = False) -> None:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from cluster.placement import place_roles
        from learner.group import LearnerGroup
        from retriever.group import RetrieverGroup
        from reward.actor import RewardPool
        from rollout.group import RolloutGroup

        cfg = self.cfg
        policy = resolve_model(cfg.learner.policy, "policy", cfg.run.models_dir)
        retriever_model = resolve_model(cfg.retriever.model, "retriever", cfg.run.models_dir)
        self.train_set, self.eval_set, self.corpus = load_train_eval(cfg.data, cfg.run.output_dir)
        self.sampler = QuestionSampler(self.train_set.samples, cfg.run.seed)
        init_ray(cfg.ray.address, cfg.ray.num_cpus, cfg.ray.num_gpus, cfg.ray.include_dashboard)
        self.metrics = MetricsLogger(self.out / "logs", tags={"run": cfg.run.name}, append=resume)
        timeout = cfg.ray.actor_start_timeout_s
        if cfg.trainer.warm_start.steps:
            policy = self.warm_start(policy)
        self.policy_path = policy
        self.placement = place_roles(cfg, timeout)
        self.retriever = None
        if not cfg.retriever.use_gold_page:
            self.retriever = RetrieverGroup(retriever_model, cfg.retriever, timeout, self.placement["retriever"].strategies())
            index_dir = Path(cfg.retriever.index_dir or self.out / "index")
            if (index_dir / "manifest.json").exists():
                self.retriever.load(index_dir)
            else:
                self.retriever.build(list(self.corpus.pages.values()), index_dir)
        lora_rank = cfg.learner.lora.r if cfg.learner.lora.enabled else None
        self.rollout = RolloutGroup(policy, cfg.rollout, seed=cfg.run.seed, max_lora_rank=lora_rank,
                                    scheduling=self.placement["rollout"].strategies())
        # any bundle of the reward role's group (index -1): the pool creates its actors itself
        self.rewards = RewardPool(cfg.reward, actor_options={"scheduling_strategy": PlacementGroupSchedulingStrategy(
            self.placement["reward"].group, placement_group_bundle_index=-1)})
        self.learner = LearnerGroup(policy, cfg.learner, cfg.algorithm, seed=cfg.run.seed, async_mode=cfg.trainer.mode == "async",
                                    export_dir=str(self.out / "exports"), placement_strategy=cfg.ray.placement_strategy,
                                    start_timeout_s=timeout)
        self.rollout.ready()
        self.checkpoints = CheckpointManager(self.out / "checkpoints", cfg.trainer.keep_last)

    def warm_start(self, policy: str) -> str:
        """Run the supervised warm start once (a Ray task with the learner's resources, before the
        roles reserve theirs); later runs and resumes reuse its model directory."""
        import ray

        from learner.sft import SFTSettings, supervised_finetune

        ws = self.cfg.trainer.warm_start
        out = self.out / "warm_start" / "model"
        summary_file = out / "docrl_warm_start.json"
        if not summary_file.exists():
            samples = list(self.train_set.samples)
            random.Random(f"{self.cfg.run.seed}-warm-start").shuffle(samples)
            samples = samples[: max(1, int(len(samples) * ws.fraction))]
            settings = SFTSettings(ws.steps, ws.batch_size, ws.learning_rate, seed=self.cfg.run.seed)
            log.info("warm start: %d supervised steps on %d training questions", ws.steps, len(samples))
            task = ray.remote(num_cpus=self.cfg.learner.num_cpus_per_rank,
                              num_gpus=self.cfg.learner.num_gpus_per_rank)(supervised_finetune)
            ref = task.remote(policy, str(out), samples, self.corpus.pages, self.cfg.rollout, settings,
                              self.eval_set.samples[: ws.max_eval_questions])
            get_with_timeout(ref, self.cfg.ray.actor_start_timeout_s + 60 * ws.steps, "the warm start (learner/sft.py)")
        summary = json.loads(summary_file.read_text())
        self.metrics.log(0, {"warm_start/loss_first": summary["loss_first"], "warm_start/loss_last": summary["loss_last"],
                             "warm_start/seconds": summary["seconds"],
                             **({"warm_start/eval_anls_before": summary["eval_anls_before"],
                                 "warm_start/eval_anls_after": summary["eval_anls_after"]}
                                if summary.get("eval_anls_after") is not None else {})})
        log.info("warm start: loss %.3f -> %.3f; held-out greedy ANLS %s -> %s", summary["loss_first"],
                 summary["loss_last"], summary.get("eval_anls_before"), summary.get("eval_anls_after"))
        return str(out)

    # -- the pieces of a step ------------------------------------------------------------------

    def pages_for(self, questions: list[DocVQASample]) -> list[tuple[str, ...]]:
        if self.retriever is None:
            return [(q.gold_page,) for q in questions]
        hits = self.retriever.search([q.question for q in questions], self.cfg.retriever.top_k)
        return [tuple(pid for pid, _ in h) for h in hits]

    def rollout_and_score(self, questions: list[DocVQASample], sampling):
        """Generate for each question and score every answer; drop (and count) what failed."""
        from reward.types import ScoreRequest
        from rollout.types import RolloutRequest

        by_id = {q.question_id: q for q in questions}
        page_ids = self.pages_for(questions)
        requests = [RolloutRequest(q.question_id, q.question, tuple(self.corpus.pages[p] for p in pids))
                    for q, pids in zip(questions, page_ids)]
        retrieved = {q.question_id: pids for q, pids in zip(questions, page_ids)}
        generated = self.rollout.generate(requests, sampling)
        score_requests = [ScoreRequest(by_id[r.request_id], a.text, retrieved[r.request_id], i, j)
                          for i, r in enumerate(generated.results) for j, a in enumerate(r.answers)]
        results = self.rewards.collect(self.rewards.submit(score_requests), self.cfg.reward.collect_timeout_s)
        per_request: dict[str, list] = {}
        for res in results:
            per_request.setdefault(generated.results[res.sample_index].request_id, []).append(res)
        failed = {rid for rid, rs in per_request.items() if any(r.error for r in rs)}
        kept = [r for r in generated.results if r.request_id not in failed]
        return kept, per_request, retrieved, {"skipped_rollout": len(generated.skipped), "skipped_reward": len(failed)}

    def push_weights(self) -> float:
        t0 = time.perf_counter()
        exported = self.learner.export_weights()
        if exported.version > self.rollout.version:
            if exported.kind == "lora":
                self.rollout.push_lora(exported.adapter_dir, exported.version)
            else:
                self.rollout.push_full(exported.tensors, exported.version)
        return time.perf_counter() - t0

    def collect(self, step: int, questions: list[DocVQASample]) -> CollectedBatch:
        """The rollout phase of a step: retrieve, generate, score, and package the batch."""
        from learner.types import TrainBatch

        cfg = self.cfg
        t0 = time.perf_counter()
        kept, per_request, _, counts = self.rollout_and_score(questions, cfg.rollout.sampling)
        rewards = {rid: [r.reward for r in sorted(rs, key=lambda r: r.response_index)] for rid, rs in per_request.items()}
        batch = TrainBatch.from_rollouts(kept, {r.request_id: rewards[r.request_id] for r in kept}, self.corpus.pages,
                                         cfg.rollout.max_image_pixels, step=step)
        tokens = sum(len(a.token_ids) for r in kept for a in r.answers)
        return CollectedBatch(step, batch, [r for rs in per_request.values() for r in rs], counts,
                              time.perf_counter() - t0, tokens)

    def next_questions(self) -> list[DocVQASample]:
        """The next step's questions. The sampler state a checkpoint records is the one before the
        questions of the first step not yet trained on (in async mode one batch is drawn ahead)."""
        self._sampler_state = self.sampler.state()
        return self.sampler.next(self.cfg.trainer.prompts_per_step)

    def train_step(self, step: int) -> dict[str, float]:
        """One step. Sync: collect with the current weights, update, push (exactly on-policy).
        Async: the batch was collected during the previous step's update, with the weights from
        before that update (one step off-policy, corrected by TIS in the learner); while this
        step's update runs, the rollout thread collects the next batch, then pushes the new
        weights - rollout and learner calls never interleave on the rollout workers."""
        from reward.scoring import reward_metrics

        cfg = self.cfg
        t0 = time.perf_counter()
        if cfg.trainer.mode == "sync":
            collected = self.collect(step, self.next_questions())
            wait_s = collected.seconds
        else:
            if self._ahead is None:  # the first step (or the first after a resume) has nothing ahead
                self._ahead = self._rollout_thread.submit(self.collect, step, self.next_questions())
            collected = self._ahead.result(timeout=cfg.rollout.generate_timeout_s + cfg.reward.collect_timeout_s)
            wait_s = time.perf_counter() - t0
            self._ahead = None
            if step < cfg.trainer.total_steps:
                self._ahead = self._rollout_thread.submit(self.collect, step + 1, self.next_questions())
        staleness = self.learner.version - collected.batch.weights_version  # updates between sampling and training
        t_learn = time.perf_counter()
        learner_metrics = self.learner.update(collected.batch)
        learner_s = time.perf_counter() - t_learn
        if cfg.trainer.mode == "sync":
            sync_s = self.push_weights()
        else:  # queued behind the collection of the next batch
            sync_s = self._rollout_thread.submit(self.push_weights).result(timeout=cfg.rollout.weight_sync_timeout_s
                                                                          + cfg.rollout.generate_timeout_s)
        step_s = time.perf_counter() - t0
        return {**reward_metrics(collected.scored, prefix="reward/"),
                **{f"learner/{k}": v for k, v in learner_metrics.items()},
                **{f"data/{k}": v for k, v in collected.counts.items()},
                "time/rollout_and_reward_s": collected.seconds, "time/wait_for_rollout_s": wait_s,
                "time/learner_s": learner_s, "time/weight_sync_s": sync_s, "time/step_s": step_s,
                "throughput/rollout_tokens_per_s": collected.generated_tokens / max(collected.seconds, 1e-9),
                "throughput/samples_per_s": len(collected.batch) / max(step_s, 1e-9),
                "weights/version": float(self.rollout.version), "weights/staleness": float(staleness)}

    def evaluate(self, tag: str) -> dict[str, float]:
        """Greedy answers on the held-out questions: ANLS, exact match, retrieval recall@k."""
        from retriever.metrics import hit_at_k
        from reward.scoring import reward_metrics

        questions = self.eval_set.samples
        kept, per_request, retrieved, counts = self.rollout_and_score(questions, self.cfg.rollout.eval_sampling)
        scored = [r for rs in per_request.values() for r in rs]
        out = reward_metrics(scored, prefix="eval/")
        k = self.cfg.retriever.top_k
        out[f"eval/retrieval_recall@{k}"] = sum(hit_at_k(retrieved[q.question_id], q.gold_page, k) for q in questions) / max(1, len(questions))
        examples = self.out / "logs" / f"eval-{tag}.jsonl"
        with examples.open("w") as f:
            for res in [r for r in scored if not r.error][: self.cfg.trainer.num_eval_examples_logged]:
                q = next(q for q in questions if q.question_id == res.question_id)
                f.write(json.dumps({"question_id": q.question_id, "question": q.question, "answer": res.answer,
                                    "gold": list(q.answers), "retrieved": list(retrieved[q.question_id]),
                                    "components": res.components}) + "\n")
        return out

    # -- checkpoints ---------------------------------------------------------------------------

    def save(self) -> Path:
        def write(d: Path) -> None:
            self.learner.save_checkpoint(str(d / "learner"))
            write_policy(d / "policy", self.policy_path, self.learner.export_weights(), self.step)
            sampler = self._sampler_state if self._ahead is not None else self.sampler.state()
            (d / "driver.json").write_text(json.dumps({"step": self.step, "sampler": sampler}))

        return self.checkpoints.save(self.step, write, meta={"weights_version": self.learner.version})

    def resume(self) -> bool:
        latest = self.checkpoints.latest()
        if latest is None:
            return False
        self.learner.load_checkpoint(str(latest / "learner"))
        state = json.loads((latest / "driver.json").read_text())
        self.step = state["step"]
        self.sampler.load(state["sampler"])
        self.push_weights()
        log.info("resumed from %s at step %d (weights v%d)", latest, self.step, self.learner.version)
        return True

    # -- the run -------------------------------------------------------------------------------

    def run(self, resume: bool = False) -> dict[str, float]:
        from tqdm.auto import tqdm

        cfg = self.cfg.trainer
        # `ray job stop` sends SIGTERM: treat it like Ctrl-C, so the run writes a checkpoint first
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _interrupt)
        self.setup(resume)
        if not (resume and self.resume()):
            self.metrics.log(0, self.evaluate("step-0"))
        try:
            with tqdm(total=cfg.total_steps, initial=self.step, desc="train", unit="step") as bar:
                while self.step < cfg.total_steps:
                    metrics = self.train_step(self.step + 1)
                    self.step += 1  # only now: an interrupted step is redone after a resume
                    self.metrics.log(self.step, metrics)
                    bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}")
                    bar.update(1)
                    if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.total_steps:
                        self.metrics.log(self.step, self.evaluate(f"step-{self.step}"))
                    if cfg.save_every and self.step % cfg.save_every == 0:
                        self.save()
        except KeyboardInterrupt:
            log.warning("interrupted: writing a checkpoint at step %d before exiting", self.step)
            self.save()
            raise
        final = self.evaluate(f"step-{self.step}")
        self.metrics.log(self.step, final)
        self.save()
        self.metrics.close()
        plot_report(self.metrics.jsonl_path, self.out / "logs" / "report.png", title=self.cfg.run.name)
        summary = training_summary(read_jsonl(self.metrics.jsonl_path))
        (self.out / "logs" / "summary.json").write_text(json.dumps(summary, indent=2))
        return final

    def shutdown(self) -> None:
        from cluster.placement import release

        if self._ahead is not None:
            self._ahead.cancel()
        self._rollout_thread.shutdown(wait=False, cancel_futures=True)
        for part in ("rollout", "retriever", "learner", "rewards"):
            obj = getattr(self, part, None)
            if obj is not None:
                obj.shutdown()
        if getattr(self, "placement", None):
            release(self.placement)


def main(argv: list[str] | None = None) -> int:
    from cluster.cli import main as cli_main

    return cli_main(["train", *(argv if argv is not None else __import__("sys").argv[1:])])


if __name__ == "__main__":
    raise SystemExit(main())

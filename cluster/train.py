"""`docrl train`: the PPO/GRPO loop for retrieval-augmented document QA, as a Ray job.

    docrl train --config configs/tiny.yaml [KEY=VALUE ...] [--resume]

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

import functools
import hashlib
import json
import logging
import math
import os
import random
import shutil
import signal
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path

from cluster.checkpoint import CheckpointManager
from cluster.config import DocRLConfig, rollout_shares_gpus
from cluster.metrics import MetricsLogger, plot_report, read_jsonl, training_summary
from cluster.ray_setup import init_ray, monitoring_addresses
from cluster.run_storage import RunStorage
from common.lineage import run_dir_of, write_lineage
from common.ray_helpers import get_with_timeout, worker_process_died
from common.shipping import ShippedFiles, land, model_dir, pack_dir, scratch_dir, ship_if_local
from docvqa.data import load_train_eval
from docvqa.loaders import DataError
from docvqa.sample import DocVQASample, portable
from docvqa.tiny_models import resolve_model
from learner.types import TrainBatch
from retriever.page_policy import PageDraw, PageUpdateBatch, draw_pages, read_adapter_state, write_adapter_state
from reward.types import ScoreResult
from rollout.policy import materialize_policy, resolve_policy, write_policy
from rollout.types import RolloutResult

log = logging.getLogger(__name__)

# how often the driver's waits look at a stop request (SIGINT/SIGTERM)
STOP_POLL_S = 0.2
PORTABLE_PAGES_CACHED = 4096  # encoded page images the driver keeps for the roles (a step's, an evaluation's)


class NodeLost(RuntimeError):
    """A node holding some of the run's roles left the cluster."""


NODE_DEATH_WAIT_S = 45.0  # how long a failure that looks like a lost peer waits for Ray to say which node


def _peer_lost(error: BaseException) -> bool:
    """Whether a failure looks like another process vanished (an actor died, a connection was
    reset): the node it ran on may have left the cluster."""
    import ray

    seen: BaseException | None = error
    while seen is not None:
        if worker_process_died(seen):  # its node's raylet reported the death: the node is up
            return False
        if isinstance(seen, (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError,
                             ray.exceptions.NodeDiedError, ray.exceptions.WorkerCrashedError,
                             ray.exceptions.OwnerDiedError, ConnectionError, TimeoutError)):
            return True
        if any(m in str(seen) for m in ("Connection reset by peer", "Connection closed by peer", "Broken pipe",
                                        "ActorDiedError", "ActorUnavailableError")):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class StopRequested(Exception):
    """A stop (SIGINT/SIGTERM) arrived while the driver waited for work it may drop: the step being
    collected or an evaluation. The learner still holds the last finished step."""


@dataclass
class QuestionSampler:
    """Training questions in a seeded random order, epoch after epoch; its state resumes exactly.

    A step never holds one question twice. When a step's draw crosses an epoch boundary, the
    questions it already took from the end of the old epoch are moved to the end of the new
    epoch's order (`deferred`), so the new epoch still holds every question once and the step
    does not repeat one. Questions are told apart by their index in `samples`: user data (a
    feedback export) may repeat a question id, and both copies are trained on.
    """

    samples: list[DocVQASample]
    seed: int
    epoch: int = 0
    position: int = 0
    deferred: tuple[int, ...] = ()  # indices moved to the end of this epoch's order
    _order: list[int] = field(default_factory=list, repr=False)

    def _shuffle(self) -> None:
        order = list(range(len(self.samples)))
        random.Random(f"{self.seed}-{self.epoch}").shuffle(order)
        moved = set(self.deferred)
        self._order = [i for i in order if i not in moved] + list(self.deferred)

    def next(self, n: int) -> list[DocVQASample]:
        if not self.samples:
            raise ValueError("no training questions")
        if n > len(self.samples):
            raise ValueError(f"trainer.prompts_per_step={n} exceeds the {len(self.samples)} training questions: "
                             "a step cannot hold a question twice")
        if not self._order:
            self._shuffle()
        picked: list[int] = []
        while len(picked) < n:
            if self.position >= len(self._order):
                self.epoch, self.position, self.deferred = self.epoch + 1, 0, tuple(picked)
                self._shuffle()
            picked.append(self._order[self.position])
            self.position += 1
        return [self.samples[i] for i in picked]

    def state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "deferred": list(self.deferred)}

    def load(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
        self.deferred = tuple(state.get("deferred", ()))
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
    page_bytes: int  # page images sent to the roles (rollout requests and the learner's batch)
    pages: PageUpdateBatch | None = None  # retriever.learn: the step's page draws and their credit


@dataclass
class ScoredRollouts:
    """One rollout call over a list of questions, by question index (its position in the list)."""

    questions: list[DocVQASample]
    retrieved: list[tuple[str, ...]]  # the page ids each question was shown, best first
    results: dict[int, RolloutResult] = field(default_factory=dict)  # absent: skipped by the rollout
    scores: dict[int, list[ScoreResult]] = field(default_factory=dict)  # in answer order
    skipped: dict[int, str] = field(default_factory=dict)  # why: rollout refusal or reward error

    def kept(self) -> list[int]:
        """Question indices with answers and every answer scored, in order."""
        return [i for i in sorted(self.results) if i not in self.skipped]

    def counts(self) -> dict[str, int]:
        rollout = sum(i not in self.results for i in self.skipped)
        return {"skipped_rollout": rollout, "skipped_reward": len(self.skipped) - rollout}


def heldout_metrics(scored: ScoredRollouts, prefix: str = "eval/") -> dict[str, float]:
    """Mean reward and mean of each component over ALL questions: a question's score is the mean
    over its answers, and a skipped question scores 0 (the official DocVQA evaluation divides by
    every question, answered or not)."""
    from reward.types import COMPONENT_NAMES

    n = len(scored.questions)
    totals: dict[str, float] = {}
    for i in scored.kept():
        answers = scored.scores[i]
        totals["mean"] = totals.get("mean", 0.0) + sum(r.reward for r in answers) / len(answers)
        for name in COMPONENT_NAMES:
            if name in answers[0].components:
                totals[name] = totals.get(name, 0.0) + sum(r.components[name] for r in answers) / len(answers)
    out = {f"{prefix}{name}": value / max(n, 1) for name, value in totals.items()}
    out.setdefault(f"{prefix}mean", 0.0)
    counts = scored.counts()
    out.update({f"{prefix}questions": float(n), f"{prefix}skipped_rollout": float(counts["skipped_rollout"]),
                f"{prefix}skipped_reward": float(counts["skipped_reward"])})
    return out


def needs_build(model_dir: Path, summary_file: Path, stamp: Path, built_from: dict, what: str) -> bool:
    """Whether a warm start must (re)build `model_dir`: it has no summary yet, or `stamp` says it
    was built from something else than `built_from` (then the old model is deleted)."""
    if summary_file.exists():
        before = json.loads(stamp.read_text()) if stamp.exists() else {}
        changed = sorted(k for k in built_from if before.get(k) != built_from[k])
        if not changed:
            return False
        log.warning("%s: rebuilding %s: what it was built from changed (%s)", what, model_dir, ", ".join(changed))
        shutil.rmtree(model_dir)
    return True


def build_remotely(build, model: str | ShippedFiles, *args) -> ShippedFiles:
    """`build(model, out_dir, *args)` in a Ray task, on whichever host Ray picks: the model it is
    given is copied there, and what it writes comes back as files for the driver to keep."""
    out = scratch_dir("build")
    try:
        build(model_dir(model), str(out / "model"), *args)
        return pack_dir(out / "model")
    finally:
        shutil.rmtree(out, ignore_errors=True)


class RunDirectoryInUse(ValueError):
    """`run.output_dir` holds another run's logs or checkpoints and the run is not a resume."""


def refuse_previous_run(out: Path, storage: RunStorage | None = None) -> None:
    """Never write over another run: its metrics, report and summary would be replaced, and its
    checkpoints pruned among the new ones."""
    checkpoints = CheckpointManager(out / "checkpoints").complete()
    logs = out / "logs" / "metrics.jsonl"
    stored = storage.storage.list("checkpoints") if storage else []
    if stored and not checkpoints:
        raise RunDirectoryInUse(f"run.storage={storage} already holds a training run's checkpoints ({', '.join(stored)}). "
                                "Continue it with --resume, or give this run another run.storage")
    if not checkpoints and not logs.exists():
        return
    highest = max(checkpoints, key=lambda p: p.name) if checkpoints else None
    held = f"checkpoints up to {highest.name}" if highest else str(logs)
    start = f" trainer.init_from={highest}" if highest else ""
    raise RunDirectoryInUse(
        f"run.output_dir={out} already holds a training run ({held}). Continue it with --resume; or train from "
        f"it in a new directory: run.output_dir={out}-2{start}; or delete {out} to start over")


def request_seed(run_seed: int, sampling_seed: int | None, key: str, index: int) -> int | None:
    """vLLM's sampling seed of one request: a hash of (run seed, rollout.sampling.seed, step key,
    index in the step), so answers are independent across questions and steps, yet a run and its
    resume draw exactly the same ones. vLLM seeds answer j with seed + j: 62 bits leave room for
    that and make overlapping ranges between requests practically impossible. None when
    `rollout.sampling.seed` is None (unseeded sampling)."""
    if sampling_seed is None:
        return None
    digest = hashlib.sha256(f"{run_seed}/{sampling_seed}/{key}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 2


def check_questions_fit(cfg: DocRLConfig, train: list[DocVQASample], evaluation: list[DocVQASample]) -> None:
    """Refuse, naming a question and the config key, data the config cannot train on: questions
    without a gold page (docvqa/sample.py) where the config reads one, and questions without a
    document where the retriever searches within it."""
    def first(samples, what):
        return next((s for s in samples if getattr(s, what) is None), None)

    errors = []
    for split, samples in (("training", train), ("evaluation", evaluation)):
        if cfg.retriever.use_gold_page and (q := first(samples, "gold_page")):
            errors.append(f"retriever.use_gold_page=true hands the policy each question's gold page, but {split} "
                          f"question {q.question_id} has none")
        if cfg.retriever.scope == "document" and (q := first(samples, "doc_id")):
            errors.append(f"retriever.scope=document searches each question's document, but {split} question "
                          f"{q.question_id} names none (scope 'corpus' searches every page)")
    no_gold_page = all(s.gold_page is None for s in train)
    if cfg.reward.components.get("retrieval", 0) and no_gold_page:
        errors.append("reward.components.retrieval scores the pages read against the gold page, and no training "
                      "question has one (set it to 0: retriever.learn needs no gold page)")
    if cfg.trainer.warm_start.steps and no_gold_page:
        errors.append("trainer.warm_start.steps: the supervised warm start reads each question's gold page, and no "
                      "training question has one")
    if errors:
        raise DataError("; ".join(errors))


def continue_lineage(run_dir: Path, init_from: str, feedback) -> dict:
    """Record the checkpoint this run continues from (common/lineage.py): its weights version,
    and the feedback store of its run (unless `feedback.database_url` names one), which becomes
    this run's, so one history holds every model of the lineage."""
    from sqlalchemy.engine import make_url

    parent_run = run_dir_of(init_from)
    url = None
    if parent_run is not None and not feedback.database_url:
        u = make_url(feedback.url(parent_run))  # the parent's own lineage is followed to the first run's store
        if u.get_backend_name() == "sqlite" and u.database and not Path(u.database).is_absolute():
            u = u.set(database=str(Path(u.database).resolve()))
        url = u.render_as_string(hide_password=False)
    return write_lineage(run_dir, init_from, resolve_policy(init_from)["weights_version"], url)


def with_derived_lr_decay(cfg: DocRLConfig) -> DocRLConfig:
    """Unless `learner.lr_decay_steps` is set, a linear/cosine schedule decays over the whole run:
    trainer.total_steps x optimizer steps per training step (ppo_epochs x minibatches)."""
    if "lr_decay_steps" in cfg.learner.model_fields_set:
        return cfg
    minibatches = math.ceil(cfg.requests_per_step * cfg.rollout.sampling.n / cfg.algorithm.minibatch_size)
    steps = max(1, cfg.trainer.total_steps * cfg.algorithm.ppo_epochs * minibatches)
    return cfg.model_copy(update={"learner": cfg.learner.model_copy(update={"lr_decay_steps": steps})})


def with_derived_max_num_seqs(cfg: DocRLConfig) -> DocRLConfig:
    """Unless `rollout.max_num_seqs` is set, an engine runs at most a step's share of sequences at
    once, ceil(requests_per_step / num_workers) x n: what vLLM reserves memory for, instead of its
    default of 1,024 (evaluation's greedy answers beyond that wait their turn)."""
    if cfg.rollout.max_num_seqs is not None:
        return cfg
    share = math.ceil(cfg.requests_per_step / cfg.rollout.num_workers) * cfg.rollout.sampling.n
    return cfg.model_copy(update={"rollout": cfg.rollout.model_copy(update={"max_num_seqs": share})})


class Trainer:
    def __init__(self, cfg: DocRLConfig):
        cfg = with_derived_max_num_seqs(with_derived_lr_decay(cfg))
        self.cfg = cfg
        self.out = Path(cfg.run.output_dir)
        self.step = 0
        self._ahead: Future | None = None  # async mode: the next step's batch, being collected
        self._rollout_thread = ThreadPoolExecutor(1, thread_name_prefix="docrl-rollout")
        # sync collection and evaluation run here while the main thread waits, so that a stop
        # request is seen at once instead of when the step ends
        self._foreground = ThreadPoolExecutor(1, thread_name_prefix="docrl-step")
        self._sampler_before: dict[int, dict] = {}  # step -> sampler state before that step's questions
        self._stop_requested: str | None = None  # the signal's name, once SIGINT/SIGTERM arrived
        self._phase = "setup"  # setup | collect | update | idle | save: what a stop request may interrupt
        self._saved_step: int | None = None  # the step of the newest checkpoint written or resumed
        self.pushed_bytes = 0  # the last weight push's adapter files
        # the corpus's pages as the roles get them: bytes (they may run on hosts without this host's files)
        self.portable_page = functools.lru_cache(maxsize=PORTABLE_PAGES_CACHED)(
            lambda page_id: portable([self.corpus.pages[page_id]])[0])
        # what this run continues (trainer.init_from): its versions count on from the parent's
        self.lineage: dict = {"parent_weights_version": 0, "parent_checkpoint": None}

    # -- set-up --------------------------------------------------------------------------------

    def setup(self, resume: bool = False) -> None:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from cluster.placement import (
            check_fits,
            cluster_nodes,
            local_cores,
            place_roles,
            role_threads,
            run_asks,
            where_roles_run,
        )
        from learner.group import LearnerGroup
        from retriever.group import RetrieverGroup
        from reward.group import RewardPool
        from rollout.group import RolloutGroup

        cfg = self.cfg
        self.storage = RunStorage(cfg.run.storage, self.out)
        if not resume:
            refuse_previous_run(self.out, self.storage)
        else:
            (self.out / "checkpoints").mkdir(parents=True, exist_ok=True)
            self.storage.restore_checkpoints(CheckpointManager(self.out / "checkpoints"))
        policy = resolve_model(cfg.learner.policy, "policy", cfg.run.models_dir)
        if cfg.trainer.init_from:
            policy = str(materialize_policy(cfg.trainer.init_from, self.out / "init_policy"))
            log.info("starting from %s (trainer.init_from, as a complete model in %s)", cfg.trainer.init_from, policy)
            self.lineage = continue_lineage(self.out, cfg.trainer.init_from, cfg.feedback)
        retriever_model = resolve_model(cfg.retriever.model, "retriever", cfg.run.models_dir)
        self.train_set, self.eval_set, self.corpus = load_train_eval(cfg.data, cfg.run.output_dir)
        check_questions_fit(cfg, self.train_set.samples, self.eval_set.samples)
        self.sampler = QuestionSampler(self.train_set.samples, cfg.run.seed)
        init_ray(cfg.ray.address, cfg.ray.num_cpus, cfg.ray.num_gpus, cfg.ray.include_dashboard)
        self._catch_stop_signals()  # ray.init installs its own SIGTERM handler (an immediate exit)
        check_fits(run_asks(cfg), cluster_nodes(), cfg.ray.placement_strategy)
        where = monitoring_addresses()
        log.info("Ray dashboard: %s; metrics (Prometheus, ray_docrl_*): %s; logs: %s",
                 where["dashboard"] or "none (ray.include_dashboard=true starts one)", where["metrics"],
                 (self.out / "logs").resolve())
        self.metrics = MetricsLogger(self.out / "logs", tags={"run": cfg.run.name}, append=resume)
        timeout = cfg.ray.actor_start_timeout_s
        if cfg.retriever.warm_start.steps:
            retriever_model = self.retriever_warm_start(retriever_model)
        if cfg.trainer.warm_start.steps:
            policy = self.warm_start(policy)
        self.policy_path = policy
        # a model on this host's disk reaches the roles as files (hosts share no disk); a hub id
        # each host loads itself
        policy_source, retriever_source = ship_if_local(policy), ship_if_local(retriever_model)
        self.placement = place_roles(cfg, cfg.ray.placement_timeout_s)
        # the workers serve adapters only when adapters are what they are pushed (rollout.lora_push)
        self.push_kind = "lora" if cfg.learner.lora.enabled and cfg.rollout.lora_push_mode() == "adapter" else "full"
        lora_rank = cfg.learner.lora.r if self.push_kind == "lora" else None
        rollout_threads, learner_threads = role_threads(cfg, local_cores(cfg))
        self.rollout = RolloutGroup(policy_source, cfg.rollout, seed=cfg.run.seed, max_lora_rank=lora_rank,
                                    scheduling=self.placement["rollout"].strategies(), num_threads=rollout_threads)
        if rollout_shares_gpus(cfg):
            # vLLM takes its KV cache from what is free on the GPU while it profiles: what another
            # role allocates there meanwhile would be charged to it, differently on every run
            self.rollout.ready()
        self.retriever = None
        if not cfg.retriever.use_gold_page:
            self.retriever = RetrieverGroup(retriever_source, cfg.retriever, timeout, self.placement["retriever"].strategies())
            if cfg.retriever.index_dir is None:  # the run's own index: kept in storage too
                self.storage.restore_index(self.out / "index")
            self.retriever.open(list(self.corpus.pages.values()), cfg.retriever.index_dir or self.out / "index",
                                owned=cfg.retriever.index_dir is None)
            if cfg.retriever.index_dir is None:
                self.storage.publish_index(self.out / "index")
        # any bundle of the reward role's group (index -1): the pool creates its actors itself
        self.rewards = RewardPool(cfg.reward, actor_options={"scheduling_strategy": PlacementGroupSchedulingStrategy(
            self.placement["reward"].group, placement_group_bundle_index=-1)})
        self.learner = LearnerGroup(policy_source, cfg.learner, cfg.algorithm, seed=cfg.run.seed,
                                    sampling_temperature=cfg.rollout.sampling.temperature,
                                    export_dir=str(self.out / "exports"), placement_strategy=cfg.ray.placement_strategy,
                                    start_timeout_s=timeout, num_threads=learner_threads,
                                    placement_timeout_s=cfg.ray.placement_timeout_s,
                                    bundle_resources=cfg.ray.role_resources.get("learner"))
        self.rollout.ready()
        self.checkpoints = CheckpointManager(self.out / "checkpoints", cfg.trainer.keep_last)
        groups = {role: p.group for role, p in self.placement.items()}
        self.role_nodes = where_roles_run({**groups, "learner": self.learner.pg} if self.learner.pg else groups)
        (self.out / "logs" / "placement.json").write_text(json.dumps(self.role_nodes, indent=1))
        log.info("roles placed: %s", "; ".join(f"{role} on {', '.join(n['ip'] for n in nodes)}"
                                               for role, nodes in self.role_nodes.items()))

    def warm_start(self, policy: str) -> str:
        """Run the supervised warm start once (a Ray task with the learner's resources, before the
        roles reserve theirs); later runs and resumes reuse its model directory."""
        import ray

        from docvqa.data import files_fingerprint
        from learner.sft import SFTSettings, supervised_finetune

        cfg = self.cfg
        ws = cfg.trainer.warm_start
        out = self.out / "warm_start" / "model"
        summary_file = out / "docrl_warm_start.json"
        stamp = self.out / "warm_start" / "built_from.json"
        samples = [q for q in self.train_set.samples if q.gold_page is not None]  # it reads the gold page
        random.Random(f"{cfg.run.seed}-warm-start").shuffle(samples)
        samples = samples[: max(1, int(len(samples) * ws.fraction))]
        # everything the warm-start model depends on: a change to any of it rebuilds the model
        built_from = {
            "base_policy": files_fingerprint(policy), "warm_start": ws.model_dump(mode="json"), "seed": cfg.run.seed,
            "questions": hashlib.sha256("\n".join(q.question_id for q in samples).encode()).hexdigest(),
            "learner": cfg.learner.model_dump(mode="json", include={"dtype", "lora", "freeze_vision_tower"}),
            "prompt": cfg.rollout.model_dump(mode="json", include={"system_prompt", "instruction", "max_image_pixels"}),
        }
        if needs_build(out, summary_file, stamp, built_from, "warm start"):
            settings = SFTSettings(ws.steps, ws.batch_size, ws.learning_rate, seed=cfg.run.seed, dtype=cfg.learner.dtype,
                                   lora=cfg.learner.lora, freeze_vision_tower=cfg.learner.freeze_vision_tower)
            log.info("warm start: %d supervised steps on %d training questions", ws.steps, len(samples))
            task = ray.remote(num_cpus=self.cfg.learner.num_cpus_per_rank,
                              num_gpus=self.cfg.learner.num_gpus_per_rank)(build_remotely)
            eval_samples = [q for q in self.eval_set.samples if q.gold_page is not None][: ws.max_eval_questions]
            # only the pages these questions are asked about, not the whole corpus
            pages = {q.gold_page: self.portable_page(q.gold_page) for q in (*samples, *eval_samples)}
            ref = task.remote(supervised_finetune, ship_if_local(policy), samples, pages, self.cfg.rollout, settings,
                              eval_samples, self.cfg.learner.num_gpus_per_rank)
            land(get_with_timeout(ref, self.cfg.ray.actor_start_timeout_s + 60 * ws.steps,
                                  "the warm start (learner/sft.py)"), out)
            stamp.write_text(json.dumps(built_from, indent=1, sort_keys=True))
        summary = json.loads(summary_file.read_text())
        self.metrics.log(0, {"warm_start/loss_first": summary["loss_first"], "warm_start/loss_last": summary["loss_last"],
                             "warm_start/seconds": summary["seconds"],
                             **({"warm_start/eval_anls_before": summary["eval_anls_before"],
                                 "warm_start/eval_anls_after": summary["eval_anls_after"]}
                                if summary.get("eval_anls_after") is not None else {})})
        log.info("warm start: loss %.3f -> %.3f; held-out greedy ANLS %s -> %s", summary["loss_first"],
                 summary["loss_last"], summary.get("eval_anls_before"), summary.get("eval_anls_after"))
        return str(out)

    def retriever_warm_start(self, retriever_model: str) -> str:
        """Train the retriever once (retriever/finetune.py; a Ray task with the retriever's
        resources, before the roles reserve theirs); later runs and resumes reuse its model."""
        import ray

        from docvqa.data import files_fingerprint
        from retriever.finetune import FORMAT, RUN_SUBDIR, SUMMARY_FILE, finetune_retriever

        cfg = self.cfg
        ws = cfg.retriever.warm_start
        out = self.out / RUN_SUBDIR
        summary_file = out / SUMMARY_FILE
        stamp = out.parent / "built_from.json"
        samples = list(self.train_set.samples)
        random.Random(f"{cfg.run.seed}-retriever-warm-start").shuffle(samples)
        samples = samples[: max(1, int(len(samples) * ws.fraction))]
        built_from = {
            "base_retriever": files_fingerprint(retriever_model), "warm_start": ws.model_dump(mode="json"),
            "seed": cfg.run.seed, "scope": cfg.retriever.scope, "dtype": cfg.retriever.dtype, "format": FORMAT,
            "questions": hashlib.sha256("\n".join(q.question_id for q in samples).encode()).hexdigest(),
        }
        if needs_build(out, summary_file, stamp, built_from, "retriever warm start"):
            log.info("retriever warm start: %d contrastive steps on %d training questions", ws.steps, len(samples))
            task = ray.remote(num_cpus=cfg.retriever.num_cpus_per_actor,
                              num_gpus=cfg.retriever.num_gpus_per_actor)(build_remotely)
            eval_samples = [q for q in self.eval_set.samples if q.gold_page is not None][: ws.max_eval_questions]
            # negatives come from the training documents; recall is measured on the held-out ones
            train_docs = {q.doc_id for q in self.train_set.samples}
            eval_docs = {q.doc_id for q in eval_samples}
            pages = {pid: self.portable_page(pid) for pid, p in self.corpus.pages.items() if p.doc_id in train_docs}
            eval_pages = {pid: self.portable_page(pid) for pid, p in self.corpus.pages.items() if p.doc_id in eval_docs}
            ref = task.remote(finetune_retriever, ship_if_local(retriever_model), samples, pages, ws, cfg.retriever.scope,
                              cfg.run.seed, eval_samples, eval_pages, cfg.retriever.dtype, cfg.retriever.num_gpus_per_actor)
            land(get_with_timeout(ref, cfg.ray.actor_start_timeout_s + 10 * ws.steps,
                                  "the retriever warm start (retriever/finetune.py)"), out)
            stamp.write_text(json.dumps(built_from, indent=1, sort_keys=True))
        summary = json.loads(summary_file.read_text())
        self.metrics.log(0, {"retriever_warm_start/loss_first": summary["loss_first"],
                             "retriever_warm_start/loss_last": summary["loss_last"],
                             "retriever_warm_start/seconds": summary["seconds"],
                             "retriever_warm_start/eval_recall@1_before": summary["eval_recall@1_before"],
                             "retriever_warm_start/eval_recall@1_after": summary["eval_recall@1_after"]})
        log.info("retriever warm start: loss %.3f -> %.3f; held-out recall@1 (%s) %.3f -> %.3f", summary["loss_first"],
                 summary["loss_last"], summary["scope"], summary["eval_recall@1_before"], summary["eval_recall@1_after"])
        return str(out)

    # -- the pieces of a step ------------------------------------------------------------------

    def pages_for(self, questions: list[DocVQASample]) -> list[tuple[str, ...]]:
        if self.retriever is None:
            return [(q.gold_page,) for q in questions]
        from retriever.evaluate import scope_candidates

        hits = self.retriever.search([q.question for q in questions], self.cfg.retriever.top_k,
                                     scope_candidates(questions, self.cfg.retriever.scope))
        return [tuple(pid for pid, _ in h) for h in hits]

    def draw_pages_for(self, questions: list[DocVQASample], seed_key: str) -> list[list[PageDraw]]:
        """retriever.learn: `pages_per_question` pages drawn for each question from the retriever's
        distribution over its candidates (its document, or the corpus's best `shortlist` pages)."""
        import torch

        from retriever.evaluate import scope_candidates

        learn = self.cfg.retriever.learn
        among = scope_candidates(questions, self.cfg.retriever.scope)
        version = self.retriever.adapter_version  # no update runs while a step draws (train_step)
        hits = self.retriever.search([q.question for q in questions], learn.shortlist if among is None else 1 << 30, among)
        # seeded by the run seed even where answers are not (rollout.sampling.seed None): a resumed
        # step draws the same pages, so its retriever update is the one the run would have made
        generator = torch.Generator().manual_seed(request_seed(self.cfg.run.seed, 0, f"pages-{seed_key}", 0))
        return [draw_pages(h, learn.pages_per_question, learn.temperature, version, generator) for h in hits]

    def rollout_and_score(self, questions: list[DocVQASample], sampling, seed_key: str,
                          retrieved: list[tuple[str, ...]] | None = None) -> ScoredRollouts:
        """Generate for each question and score every answer; what failed is named in `skipped`.
        Requests are keyed by their index in `questions`, so a question that appears twice (user
        data may repeat one, retriever.learn asks one per drawn page) is two requests. `retrieved`:
        the pages each reads, else the retriever's top-k."""
        from reward.types import ScoreRequest
        from rollout.types import RolloutRequest

        retrieved = self.pages_for(questions) if retrieved is None else retrieved
        request_ids = [f"{i}:{q.question_id}" for i, q in enumerate(questions)]
        index_of = {rid: i for i, rid in enumerate(request_ids)}
        requests = [RolloutRequest(rid, q.question, tuple(self.portable_page(p) for p in pids),
                                   seed=request_seed(self.cfg.run.seed, sampling.seed, seed_key, i))
                    for i, (rid, q, pids) in enumerate(zip(request_ids, questions, retrieved))]
        generated = self.rollout.generate(requests, sampling)
        out = ScoredRollouts(questions, retrieved, skipped={index_of[rid]: why for rid, why in generated.skipped.items()})
        out.results = {index_of[r.request_id]: r for r in generated.results}
        score_requests = [ScoreRequest(questions[i], a.text, retrieved[i], i, j)
                          for i, r in out.results.items() for j, a in enumerate(r.answers)]
        for res in self.rewards.collect(self.rewards.submit(score_requests), self.cfg.reward.collect_timeout_s):
            out.scores.setdefault(res.sample_index, []).append(res)
        for i, scores in out.scores.items():
            scores.sort(key=lambda r: r.response_index)
            errors = [r.error for r in scores if r.error]
            if errors:
                out.skipped[i] = errors[0]
        return out

    def push_weights(self) -> float:
        t0 = time.perf_counter()
        exported = self.learner.export_weights(self.push_kind)
        self.pushed_bytes = 0
        if exported.version > self.rollout.version:
            if exported.kind == "lora":
                self.rollout.push_lora(exported.adapter, exported.version)
                self.pushed_bytes = exported.adapter.nbytes
            else:
                self.rollout.push_full(exported.tensors if exported.tensors is not None else exported.object_ref,
                                       exported.version)
        return time.perf_counter() - t0

    def collect(self, step: int, questions: list[DocVQASample]) -> CollectedBatch:
        """The rollout phase of a step: retrieve, generate, score, and package the batch."""
        from learner.types import TrainBatch

        cfg = self.cfg
        t0 = time.perf_counter()
        draws = retrieved = None
        if cfg.retriever.learn.enabled:  # one request per drawn page
            draws = self.draw_pages_for(questions, seed_key=f"step-{step}")
            questions = [q for q, drawn in zip(questions, draws) for _ in drawn]
            retrieved = [(d.page_id,) for drawn in draws for d in drawn]
        scored = self.rollout_and_score(questions, cfg.rollout.sampling, f"step-{step}", retrieved)
        kept = scored.kept()
        results = [scored.results[i] for i in kept]
        rewards = [[r.reward for r in scored.scores[i]] for i in kept]
        pages = {pid: self.portable_page(pid) for r in results for pid in r.page_ids}
        batch = TrainBatch.from_rollouts(results, rewards, pages, cfg.rollout.max_image_pixels, step=step)
        tokens = sum(len(a.token_ids) for r in results for a in r.answers)
        sent = [self.portable_page(pid) for pids in scored.retrieved for pid in pids] + list(pages.values())
        page_bytes = sum(len(p.image_bytes or b"") for p in sent)  # an unreadable page goes as its path
        return CollectedBatch(step, batch, [r for rs in scored.scores.values() for r in rs], scored.counts(),
                              time.perf_counter() - t0, tokens, page_bytes,
                              pages=self.credit_pages(draws, scored) if draws is not None else None)

    def credit_pages(self, draws: list[list[PageDraw]], scored: ScoredRollouts) -> PageUpdateBatch | None:
        """Each drawn page earns the mean reward of the answers read from it; its advantage is
        against the other pages drawn for the same question (the algorithm's group baseline). A
        draw whose answers were skipped drops out, and so does a question left with one draw."""
        import torch

        from learner.ppo import group_advantages

        flat = [(q, d) for q, drawn in enumerate(draws) for d in drawn]
        kept = set(scored.kept())
        per_question = Counter(flat[i][0] for i in kept)
        entries = [i for i in sorted(kept) if per_question[flat[i][0]] > 1]
        if not entries:
            return None
        rewards = torch.tensor([sum(r.reward for r in scored.scores[i]) / len(scored.scores[i]) for i in entries])
        kind = self.cfg.algorithm.advantage if self.cfg.algorithm.advantage in ("grpo", "rloo") else "grpo"
        advantages = group_advantages(rewards, [flat[i][0] for i in entries], kind=kind,
                                      scale_by_std=self.cfg.algorithm.scale_by_std)
        return PageUpdateBatch.from_draws([scored.questions[i].question for i in entries], [flat[i][1] for i in entries],
                                          advantages.tolist(), rewards.tolist())

    def next_questions(self, step: int) -> list[DocVQASample]:
        """Step `step`'s questions. The sampler state before them is kept: a checkpoint of step
        `step - 1` records it, whether or not the questions were drawn (in async mode one batch is
        drawn ahead; a stopped step has drawn its questions and is redone on resume)."""
        self._sampler_before = {s: v for s, v in self._sampler_before.items() if s >= self.step}
        self._sampler_before[step] = self.sampler.state()
        return self.sampler.next(self.cfg.trainer.prompts_per_step)

    def _wait(self, future: Future, timeout_s: float | None, what: str):
        """The future's result; StopRequested as soon as a stop is requested meanwhile."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            try:
                return future.result(timeout=STOP_POLL_S)
            except FutureTimeout:
                if self._stop_requested:
                    raise StopRequested(what) from None
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"{what} did not finish within {timeout_s:g}s") from None

    def train_step(self, step: int) -> dict[str, float]:
        """One step. Sync: collect with the current weights, update, push (exactly on-policy).
        Async: the batch was collected during the previous step's update, with the weights from
        before that update (one step off-policy, corrected by TIS in the learner); while this
        step's update runs, the rollout thread collects the next batch, then pushes the new
        weights - rollout and learner calls never interleave on the rollout workers."""
        from reward.scoring import reward_metrics

        cfg = self.cfg
        t0 = time.perf_counter()
        self._phase = "collect"
        if cfg.trainer.mode == "sync":
            collected = self._wait(self._foreground.submit(self.collect, step, self.next_questions(step)), None,
                                   f"collecting step {step}")
            wait_s = collected.seconds
        else:
            if self._ahead is None:  # the first step (or the first after a resume) has nothing ahead
                self._ahead = self._rollout_thread.submit(self.collect, step, self.next_questions(step))
            collected = self._wait(self._ahead, cfg.rollout.generate_timeout_s + cfg.reward.collect_timeout_s,
                                   f"collecting step {step}")
            wait_s = time.perf_counter() - t0
            self._ahead = None
            if step < cfg.trainer.total_steps:
                self._ahead = self._rollout_thread.submit(self.collect, step + 1, self.next_questions(step + 1))
        self._phase = "update"  # from here the step is finished even when a stop arrives
        staleness = self.learner.version - collected.batch.weights_version  # updates between sampling and training
        retriever_update = self.start_retriever_update(collected.pages)  # beside the policy's update
        t_learn = time.perf_counter()
        learner_metrics = self.learner.update(collected.batch)
        learner_s = time.perf_counter() - t_learn
        retriever_metrics = retriever_update.result() if retriever_update else {}
        if cfg.trainer.mode == "sync":
            sync_s = self.push_weights()
        else:  # queued behind the collection of the next batch
            sync_s = self._rollout_thread.submit(self.push_weights).result(timeout=cfg.rollout.weight_sync_timeout_s
                                                                          + cfg.rollout.generate_timeout_s)
        step_s = time.perf_counter() - t0
        return {**reward_metrics(collected.scored, prefix="reward/"),
                **{f"learner/{k}": v for k, v in learner_metrics.items()}, **retriever_metrics,
                **{f"data/{k}": v for k, v in collected.counts.items()},
                "time/rollout_and_reward_s": collected.seconds, "time/wait_for_rollout_s": wait_s,
                "time/learner_s": learner_s, "time/weight_sync_s": sync_s, "time/step_s": step_s,
                "throughput/rollout_tokens_per_s": collected.generated_tokens / max(collected.seconds, 1e-9),
                "throughput/samples_per_s": len(collected.batch) / max(step_s, 1e-9),
                "weights/version": float(self.rollout.version), "weights/staleness": float(staleness),
                # what the driver sent through the object store (full weights go from learner rank 0 directly)
                "transfer/page_bytes": float(collected.page_bytes), "transfer/adapter_bytes": float(self.pushed_bytes)}

    def start_retriever_update(self, pages: PageUpdateBatch | None) -> Future | None:
        """retriever.learn: one update of the query adapter on the step's page draws, on the
        retriever's actors while the learner updates the policy. In async mode it is queued behind
        the next batch's collection (whose pages the adapter before this update drew), as the
        policy's weight push is."""
        if pages is None:
            return None
        thread = self._foreground if self.cfg.trainer.mode == "sync" else self._rollout_thread
        return thread.submit(self.retriever.learn, pages)

    def evaluate(self, tag: str) -> dict[str, float]:
        """Greedy answers on the held-out questions: ANLS, exact match, retrieval recall@k. Every
        question counts: one that was skipped (prompt too long, unreadable page, reward error)
        scores 0, as in the official evaluation, and the skips are counted."""
        from retriever.metrics import hit_at_k
        from reward.metrics import anls_score

        questions = self.eval_set.samples
        scored = self.rollout_and_score(questions, self.cfg.rollout.eval_sampling, seed_key=f"eval-{tag}")
        out = heldout_metrics(scored, prefix="eval/")
        # the official metric (threshold 0.5, raw-length denominator) whatever reward.anls_* say,
        # so held-out figures compare with published ones
        out["eval/anls"] = sum(sum(anls_score(r.answer, questions[i].answers) for r in scored.scores[i])
                               / len(scored.scores[i]) for i in scored.kept() if questions[i].answers) / max(1, len(questions))
        k = self.cfg.retriever.top_k
        labelled = [(q, pids) for q, pids in zip(questions, scored.retrieved) if q.gold_page is not None]
        if labelled:  # over the questions whose gold page is known
            out[f"eval/retrieval_recall@{k}"] = sum(hit_at_k(pids, q.gold_page, k) for q, pids in labelled) / len(labelled)
        if scored.skipped:
            log.warning("evaluation %s: %d of %d held-out questions skipped (scored 0), e.g. %s", tag,
                        len(scored.skipped), len(questions), next(iter(scored.skipped.values())))
        with (self.out / "logs" / f"eval-{tag}.jsonl").open("w") as f:
            for i in scored.kept()[: self.cfg.trainer.num_eval_examples_logged]:
                q, res = questions[i], scored.scores[i][0]
                f.write(json.dumps({"question_id": q.question_id, "question": q.question, "answer": res.answer,
                                    "gold": list(q.answers), "retrieved": list(scored.retrieved[i]),
                                    "components": res.components}) + "\n")
        return out

    # -- checkpoints ---------------------------------------------------------------------------

    def save(self) -> Path:
        def write(d: Path) -> None:
            self.learner.save_checkpoint(str(d / "learner"))
            write_policy(d / "policy", self.policy_path, self.learner.export_weights(), self.step,
                         version_base=self.lineage["parent_weights_version"], parent=self.lineage["parent_checkpoint"])
            sampler = self._sampler_before.get(self.step + 1, self.sampler.state())
            (d / "driver.json").write_text(json.dumps({"step": self.step, "sampler": sampler}))
            if self.retriever is not None and self.retriever.learner_state is not None:
                write_adapter_state(d, self.retriever.learner_state)

        phase, self._phase = self._phase, "save"
        version = self.lineage["parent_weights_version"] + self.learner.version
        path = self.checkpoints.save(self.step, write, meta={"weights_version": version})
        self.storage.publish_checkpoint(path, self.checkpoints.complete())
        hashes = self.learner.param_hashes()
        if len(set(hashes)) != 1:  # data-parallel ranks that disagree train different models
            raise RuntimeError(f"learner ranks diverged by step {self.step}: parameter hashes {hashes}")
        log.info("checkpoint of step %d: %d learner ranks bit-identical (parameter hash %s)", self.step, len(hashes),
                 hashes[0][:16])
        self._phase, self._saved_step = phase, self.step
        return path

    def resume(self) -> bool:
        latest = self.checkpoints.latest()
        if latest is None:
            return False
        self.learner.load_checkpoint(str(latest / "learner"))
        state = json.loads((latest / "driver.json").read_text())
        self.step = state["step"]
        self.sampler.load(state["sampler"])
        adapter = read_adapter_state(latest)
        if adapter is not None and self.retriever is not None:
            self.retriever.load_learner_state(adapter)
        self._saved_step = self.step
        self.metrics.truncate_after(self.step)  # a killed driver may have logged steps past its checkpoint
        self.push_weights()
        log.info("resumed from %s at step %d (weights v%d)", latest, self.step, self.learner.version)
        return True

    # -- the run -------------------------------------------------------------------------------

    def _request_stop(self, signum, frame) -> None:
        """SIGINT/SIGTERM (Ctrl-C, `ray job stop`): checkpoint the last finished step, then stop.
        The step being collected is dropped (its questions are drawn again on resume); a step whose
        update has begun is finished first, since the update cannot be undone. A signal during
        set-up stops at once (nothing to keep); a second signal stops at once without a checkpoint
        (the last one written stays valid)."""
        name = signal.Signals(signum).name
        if self._stop_requested or self._phase == "setup":
            raise KeyboardInterrupt(f"{name} received {'twice' if self._stop_requested else 'during set-up'}: "
                                    "stopping without a checkpoint")
        self._stop_requested = name
        grace = os.environ.get("RAY_JOB_STOP_WAIT_TIME_S", "3") if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") else None
        doing = {"update": f"finishing the update of step {self.step + 1}, then checkpointing it",
                 "collect": f"dropping the rollouts or evaluation in flight, then checkpointing step {self.step}"}
        log.warning("%s received: %s and stopping%s (send it again to stop at once without a checkpoint)", name,
                    doing.get(self._phase, f"checkpointing step {self.step}"),
                    f"; Ray kills this job {grace} s after `ray job stop` (RAY_JOB_STOP_WAIT_TIME_S)" if grace else "")

    def _catch_stop_signals(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, self._request_stop)

    def run(self, resume: bool = False) -> dict[str, float]:
        """Train to `trainer.total_steps`. Raises KeyboardInterrupt after checkpointing when a
        stop was requested by a signal."""
        handlers = {}
        if threading.current_thread() is threading.main_thread():
            handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
            self._catch_stop_signals()
        try:
            return self._run(resume)
        except StopRequested:
            self._phase = "stopping"
            if self.step == 0:
                raise KeyboardInterrupt(f"{self._stop_requested}: stopped before the first step; nothing to "
                                        "checkpoint") from None
            path = self.checkpoints.root / self.checkpoints.name(self.step)
            if self._saved_step != self.step:
                path = self.save()
            raise KeyboardInterrupt(f"{self._stop_requested}: stopped after step {self.step}; checkpoint {path} "
                                    "(continue with --resume)") from None
        except Exception as e:
            self._name_lost_nodes(e)
            self._name_lost_rank(e)
            raise
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)

    def _name_lost_nodes(self, error: Exception) -> None:
        """A role's failure because its node left the cluster is reported as that: which node,
        which roles it held, and where to continue from."""
        from cluster.placement import lost_roles

        placed = getattr(self, "role_nodes", None)
        if not placed:  # the roles were not placed yet: no node of theirs to lose
            return
        lost = lost_roles(placed)
        # A peer's death is often seen (a closed connection, a dead actor) before Ray's health
        # checks declare its node dead (about 15 s with Ray's defaults): give them that long.
        deadline = time.monotonic() + NODE_DEATH_WAIT_S if _peer_lost(error) else 0.0
        while not lost and time.monotonic() < deadline:
            time.sleep(1.0)
            lost = lost_roles(placed)
        if lost:
            raise NodeLost(f"{lost} (during step {self.step + 1}; {self._stops_at()}; with the node back, or roles "
                           "placed elsewhere, continue with --resume). The role's error: "
                           f"{type(error).__name__}: {str(error)[:500]}") from error

    def _name_lost_rank(self, error: Exception) -> None:
        """A learner rank that died stops the run (its optimizer shard is gone): say where to continue from."""
        from learner.group import LearnerRankLost

        if isinstance(error, LearnerRankLost):
            raise LearnerRankLost(f"{error} (during step {self.step + 1}; {self._stops_at()}; continue with --resume)",
                                  error.rank, error.node_alive) from error

    def _stops_at(self) -> str:
        saved = f"checkpoint of step {self._saved_step}" if self._saved_step else "no checkpoint yet"
        return f"the run stops: {saved} in {self.checkpoints.root}"

    def _evaluate(self, tag: str) -> dict[str, float]:
        self._phase = "collect"  # an evaluation holds no training state: a stop drops it
        return self._wait(self._foreground.submit(self.evaluate, tag), None, f"evaluation {tag}")

    def _run(self, resume: bool) -> dict[str, float]:
        from tqdm.auto import tqdm

        cfg = self.cfg.trainer
        self.setup(resume)
        if not (resume and self.resume()):
            self.metrics.log(0, self._evaluate("step-0"))
        with tqdm(total=cfg.total_steps, initial=self.step, desc="train", unit="step") as bar:
            while self.step < cfg.total_steps:
                metrics = self.train_step(self.step + 1)
                self.step += 1  # only now: an interrupted step is redone after a resume
                self._phase = "idle"
                self.metrics.log(self.step, metrics)
                bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}")
                bar.update(1)
                if self._stop_requested:
                    raise StopRequested(f"after step {self.step}")
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.total_steps:
                    self.metrics.log(self.step, self._evaluate(f"step-{self.step}"))
                if cfg.save_every and self.step % cfg.save_every == 0:
                    self.save()
        final = self._evaluate(f"step-{self.step}")
        self.metrics.log(self.step, final)
        self.save()
        self.metrics.close()
        rows = read_jsonl(self.metrics.jsonl_path)
        plot_report(self.metrics.jsonl_path, self.out / "logs" / "report.png", title=self.cfg.run.name,
                    gold_page_given=self.cfg.retriever.use_gold_page)
        every_metric = sorted({k for r in rows for k in r if k != "step"})
        plot_report(self.metrics.jsonl_path, self.out / "logs" / "report_all.png", keys=every_metric,
                    title=self.cfg.run.name)
        summary = training_summary(rows)
        (self.out / "logs" / "summary.json").write_text(json.dumps(summary, indent=2))
        self.storage.publish_logs()
        return final

    def shutdown(self) -> None:
        from cluster.placement import release

        if self._ahead is not None:
            self._ahead.cancel()
        self._rollout_thread.shutdown(wait=False, cancel_futures=True)
        self._foreground.shutdown(wait=False, cancel_futures=True)
        for part in ("rollout", "retriever", "learner", "rewards"):
            obj = getattr(self, part, None)
            if obj is not None:
                obj.shutdown()
        if getattr(self, "placement", None):
            release(self.placement)

"""LearnerGroup: the DeepSpeed learner ranks, seen from the driver, and the PPO/GRPO update.

The driver side owns the algorithm (the plan, the advantages, the metrics: `learner.update`); the
ranks (`learner.rank.LearnerRank` Ray actors in a placement group, or one in-process
`LearnerWorker` with `local=True`, for tests and single-process runs) own the model and do the
forward/backward passes. One `update(batch)`:

    plan = seeded epochs x minibatches x rank shards x micro-batches
    scores = ranks score their epoch-0 micro-batches      (old logprobs, ref logprobs, values;
                                                           skipped when exactly on-policy)
    targets = advantages on the whole batch (driver)      (GAE / GRPO / RLOO, KL, whitening, TIS)
    ranks train on their shards                            (PPO epochs, one optimizer step per minibatch)
    metrics = combined over ranks and minibatches

Every wait on the ranks has a timeout (`learner.collective_timeout_s`) and names the rank that did
not answer or failed, instead of hanging.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
import time
from pathlib import Path

from common.ray_helpers import PlacementError, worker_process_died
from common.shipping import ShippedFiles, land, model_name, pack_dir, pack_files
from learner import update as U
from learner.config import AlgorithmConfig, LearnerConfig
from learner.types import Experience, ExportedWeights, TrainBatch

log = logging.getLogger(__name__)


_RANK_FILE = re.compile(r"(?:zero_pp_rank_|rng_rank)(\d+)\D")


def rank_files(files: dict[str, bytes], rank: int) -> dict[str, bytes]:
    """What one rank loads of a checkpoint: the shared files and its own optimizer shard and RNG
    states, not the other ranks' (DeepSpeed's `zero_pp_rank_<r>_...`, docrl's `rng_rank<r>.pt`)."""
    return {rel: data for rel, data in files.items()
            if (m := _RANK_FILE.search(rel.rsplit("/", 1)[-1])) is None or int(m.group(1)) == rank}


# How long a failed call waits for the other ranks' results: when a rank's process dies inside a
# collective, its peers' "connection closed" errors can reach the driver before Ray reports the
# death, and the dead rank is the one to name.
RANK_DEATH_GRACE_S = 10.0


class LearnerRankLost(RuntimeError):
    """A learner rank's process died (killed, out of memory, crashed): the call it was in is lost,
    and with it the update in progress (the other ranks' state is mid-collective)."""

    def __init__(self, message: str, rank: int, node_alive: bool):
        super().__init__(message)
        self.rank, self.node_alive = rank, node_alive


class LearnerGroup:
    def __init__(self, policy_path: str | ShippedFiles, cfg: LearnerConfig, algo: AlgorithmConfig, *, seed: int = 0,
                 sampling_temperature: float = 1.0, export_dir: str | None = None, local: bool = False,
                 placement_strategy: str = "PACK", start_timeout_s: float = 600.0, num_threads: int | None = None,
                 placement_timeout_s: float | None = None, bundle_resources: dict[str, float] | None = None):
        """`sampling_temperature` is the rollout's (rollout.sampling.temperature): the learner scores
        and trains softmax(logits / T), the distribution the answers were sampled from, so the PPO
        ratio, the TIS weights and the logged rollout-vs-learner mismatch compare like with like.
        `export_dir` keeps the exported LoRA adapters on the driver's host (they reach the rollout
        workers as files, `ExportedWeights.adapter`); a temporary directory by default.
        `num_threads` per rank defaults to its CPUs (`learner.num_cpus_per_rank`). The ranks' placement group must be ready within
        `placement_timeout_s` (default `start_timeout_s`)."""
        U.check_sampling_temperature(sampling_temperature)
        if algo.minibatch_size % cfg.num_ranks:
            raise ValueError(f"algorithm.minibatch_size={algo.minibatch_size} must be divisible by "
                             f"learner.num_ranks={cfg.num_ranks}")
        if algo.advantage == "gae" and cfg.value_model == "none":
            raise ValueError("algorithm.advantage='gae' needs a critic: learner.value_model must be 'head' or 'separate'")
        # what the records name (a checkpoint's "policy"); the ranks load `policy_path` itself: a hub
        # id or path, or files from the driver's host (ShippedFiles), which each rank's host copies
        self.policy_path, self.cfg, self.algo = model_name(policy_path), cfg, algo
        self.seed, self.sampling_temperature, self.local = seed, sampling_temperature, local
        self.export_dir = Path(export_dir or tempfile.mkdtemp(prefix="docrl-learner-exports-"))
        self.bundle_resources = dict(bundle_resources or {})  # custom Ray resources per rank (ray.role_resources)
        self.num_ranks = 1 if local else cfg.num_ranks
        self.version = 0  # updates that changed the weights; 0 = the base policy
        self.update_calls = 0  # every update() call (seeds the plan)
        self.last_skips: list[str] = []
        self.pg = None
        self.ranks: list = []
        self.worker = None
        if local:
            from learner.worker import LearnerWorker

            self.worker = LearnerWorker(policy_path, cfg, algo, seed=seed,
                                        sampling_temperature=sampling_temperature)
        else:
            self._start_ranks(self._shared(policy_path), placement_strategy, start_timeout_s, num_threads,
                              placement_timeout_s or start_timeout_s)

    # -- starting the ranks ----------------------------------------------------------------------

    def _start_ranks(self, policy, strategy: str, start_timeout_s: float, num_threads: int | None,
                     placement_timeout_s: float) -> None:
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from learner.rank import LearnerRank

        cfg = self.cfg
        bundle = {"CPU": cfg.num_cpus_per_rank, **({"GPU": cfg.num_gpus_per_rank} if cfg.num_gpus_per_rank > 0 else {}),
                  **self.bundle_resources}
        self.pg = placement_group([dict(bundle) for _ in range(cfg.num_ranks)], strategy=strategy)
        try:
            ray.get(self.pg.ready(), timeout=placement_timeout_s)
        except ray.exceptions.GetTimeoutError:
            ray.util.remove_placement_group(self.pg)
            raise PlacementError(f"placement of role 'learner' ({cfg.num_ranks} x {bundle}, {strategy}) not ready within "
                               f"{placement_timeout_s:g}s: the cluster has {ray.cluster_resources()}, "
                               f"{ray.available_resources()} free now; other work may hold the rest (`ray status` "
                               "lists pending demands)") from None
        threads = num_threads or max(1, int(cfg.num_cpus_per_rank))
        env = {"OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
        self.ranks = [
            LearnerRank.options(
                num_cpus=cfg.num_cpus_per_rank, num_gpus=cfg.num_gpus_per_rank, max_restarts=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i),
                runtime_env={"env_vars": env}, name=None,
            ).remote()
            for i in range(cfg.num_ranks)
        ]
        infos = self._get([r.node_info.remote() for r in self.ranks], "starting the learner ranks", start_timeout_s)
        # Rendezvous at rank 0. On one node everything stays on loopback (a local cluster must not
        # leave 127.0.0.1); across nodes, rank 0's node address.
        one_node = len({i["node_id"] for i in infos}) == 1
        master_addr = "127.0.0.1" if one_node else infos[0]["ip"]
        master_port = infos[0]["free_port"]
        local_ranks, seen = [], {}
        for info in infos:
            local_ranks.append(seen.get(info["node_id"], 0))
            seen[info["node_id"]] = local_ranks[-1] + 1
        self.rank_infos = infos  # node id, address and pid of each rank: what a failure names
        self._get([r.setup.remote(policy, cfg, self.algo, rank, cfg.num_ranks, local_ranks[rank],
                                  master_addr, master_port, self.seed, threads, self.sampling_temperature)
                   for rank, r in enumerate(self.ranks)],
                  "initializing DeepSpeed on the learner ranks", max(start_timeout_s, cfg.collective_timeout_s))

    # -- calling the ranks ----------------------------------------------------------------------

    def _get(self, refs: list, what: str, timeout_s: float | None = None) -> list:
        """Results of one call per rank, in rank order. Fails fast, naming the rank, when a rank
        raised or died; times out (naming the ranks still running) instead of hanging."""
        import ray

        timeout_s = timeout_s or self.cfg.collective_timeout_s
        deadline = time.monotonic() + timeout_s
        index = {ref: i for i, ref in enumerate(refs)}
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not done:
                late = sorted(index[r] for r in pending)
                raise TimeoutError(
                    f"learner group: {what}: rank(s) {late} did not finish within {timeout_s:g}s (a collective may "
                    "be waiting for a rank that failed or never started; see the Ray dashboard or "
                    "/tmp/ray/session_latest/logs)")
            for ref in done:
                try:
                    ray.get(ref)
                except ray.exceptions.RayError as e:
                    raise self._failure(what, index[ref], e, pending, index) from e
        return ray.get(list(refs))

    def _failure(self, what: str, rank: int, error: Exception, pending: list, index: dict) -> Exception:
        """The error for a failed call. A rank whose process died is named, with its node and
        process, even when a surviving rank's collective failed first."""
        import ray

        died = {rank: error} if isinstance(error, ray.exceptions.RayActorError) else {}
        if not died and pending:
            done, _ = ray.wait(pending, num_returns=len(pending), timeout=RANK_DEATH_GRACE_S)
            for ref in done:
                try:
                    ray.get(ref)
                except ray.exceptions.RayActorError as e:
                    died[index[ref]] = e
                except ray.exceptions.RayError:
                    pass
        if not died:
            return RuntimeError(f"learner group: {what}: rank {rank} failed: {error}")
        dead, cause = min(died.items())
        info = self.rank_infos[dead]
        node_alive = worker_process_died(cause)
        how = ("its process ended (killed, out of memory, or crashed; the node is still up)" if node_alive
               else "its process or its node is gone")
        detail = next((line.strip() for line in str(cause).splitlines() if "Worker exit" in line), "")[:300]
        return LearnerRankLost(
            f"learner group: {what}: rank {dead} died on node {info['ip']} (node id {info['node_id'][:12]}, pid "
            f"{info['pid']}): {how}. The call in progress on every rank is lost; the learner cannot go on without "
            f"that rank's optimizer shard, so the run must continue from its last checkpoint. Ray: {detail}",
            rank=dead, node_alive=node_alive)

    def _call(self, method: str, per_rank_args: list[tuple] | None = None, what: str = "",
              timeout_s: float | None = None) -> list:
        """Call `method` on every rank (args per rank, or none) and wait for all, in rank order."""
        per_rank_args = per_rank_args or [()] * self.num_ranks
        if self.local:
            return [getattr(self.worker, method)(*per_rank_args[0])]
        refs = [getattr(rank, method).remote(*args) for rank, args in zip(self.ranks, per_rank_args)]
        return self._get(refs, what or method, timeout_s)

    def _shared(self, obj):
        """Put a large argument into the object store once for all ranks (no-op in local mode)."""
        if self.local:
            return obj
        import ray

        return ray.put(obj)

    # -- the update -----------------------------------------------------------------------------

    def _plan(self, experiences: list[Experience]) -> U.UpdatePlan:
        return U.make_plan([len(e.response_ids) for e in experiences], self.num_ranks, self.algo.minibatch_size,
                           self.cfg.micro_batch_size, self.algo.ppo_epochs, seed=(self.seed, self.update_calls),
                           group_ids=[e.group_id for e in experiences] if self.cfg.share_prompts else None)

    def compute_ref_and_old(self, batch: TrainBatch | list[Experience], plan: U.UpdatePlan | None = None,
                            ) -> tuple[U.Scores, dict[str, float]]:
        """Old logprobs (current policy, eval mode), reference logprobs and values of every
        experience, plus the rollout-vs-learner logprob mismatch. Changes no weights.

        Without `plan`, the experiences are scored on the micro-batches the next update() would
        train first, so the scores equal the ones update() will use."""
        experiences = batch.experiences if isinstance(batch, TrainBatch) else list(batch)
        U.validate_batch(experiences)
        return self._score(experiences, self._shared(experiences), plan or self._plan(experiences))

    def _score(self, experiences: list[Experience], shared, plan: U.UpdatePlan) -> tuple[U.Scores, dict[str, float]]:
        t0 = time.perf_counter()
        per_rank = self._call("score", [(shared, plan.scoring_micro_batches(r)) for r in range(self.num_ranks)],
                              "scoring (old/ref logprobs, values)")
        merged: dict[int, dict] = {}
        for part in per_rank:
            merged.update(part)
        missing = [experiences[i].sample_id for i in range(len(experiences)) if i not in merged]
        if missing:
            raise RuntimeError(f"learner group: no scores came back for {missing[:5]} (plan bug)")
        rows = [merged[i] for i in range(len(experiences))]
        scores = U.Scores(
            old_logprobs=[r["old"] for r in rows],
            ref_logprobs=[r["ref"] for r in rows] if rows[0]["ref"] is not None else None,
            values=[r["values"] for r in rows] if rows[0]["values"] is not None else None)
        metrics = U.logprob_mismatch(experiences, scores.old_logprobs)
        metrics["score_seconds"] = time.perf_counter() - t0
        return scores, metrics

    def update(self, batch: TrainBatch | list[Experience], score_first: bool | None = None) -> dict[str, float]:
        """One PPO/GRPO update on `batch` (see the module doc). Returns flat float metrics.
        `score_first` forces (True) or skips (False) the scoring pass; by default it runs when the
        update needs it (`update.needs_scoring_pass`)."""
        experiences = batch.experiences if isinstance(batch, TrainBatch) else list(batch)
        U.validate_batch(experiences)
        t0 = time.perf_counter()
        plan = self._plan(experiences)
        shared_exps = self._shared(experiences)  # once for both passes
        if score_first is None:
            score_first = U.needs_scoring_pass(self.algo, plan, self.cfg.lora.dropout if self.cfg.lora.enabled else 0.0)
        if score_first:
            scores, metrics = self._score(experiences, shared_exps, plan)
        else:
            scores, metrics = None, {"score_seconds": 0.0}
        targets, adv_stats = U.compute_advantages(experiences, scores, self.algo)
        metrics.update(adv_stats)
        if scores is not None and scores.values is not None and targets.returns is not None:
            values, mask = U.pad_right(scores.values)
            returns, _ = U.pad_right(targets.returns)
            from learner.ppo import explained_variance

            metrics["explained_variance"] = float(explained_variance(values, returns, mask))

        t_train = time.perf_counter()
        shared_targets = self._shared(targets)
        per_rank = self._call("train", [(shared_exps, shared_targets, plan.rank_schedule(r))
                                        for r in range(self.num_ranks)], "PPO update")
        train_seconds = time.perf_counter() - t_train
        metrics.update(self._summarize(per_rank, train_seconds))
        if scores is None and "kl_to_ref_during_update" in metrics:
            # without a scoring pass every training forward ran on the weights from before the step
            metrics["kl_to_ref"] = metrics["kl_to_ref_during_update"]
        self.update_calls += 1
        if metrics["optimizer_steps"] > 0:
            self.version += 1
        lrs = self._call("learning_rates")[0]
        metrics.update({f"lr_{k}": v for k, v in lrs.items()})
        metrics.update(
            weights_version=float(self.version), num_experiences=float(len(experiences)),
            reward_mean=float(sum(e.reward for e in experiences) / len(experiences)),
            response_length_mean=float(sum(len(e.response_ids) for e in experiences) / len(experiences)),
            update_seconds=time.perf_counter() - t0)
        return metrics

    def _summarize(self, per_rank: list[list[dict]], train_seconds: float) -> dict[str, float]:
        """Combine rank x minibatch stats: token-weighted means across ranks and minibatches; the
        gradient norm and the skip verdict are global (identical on every rank): rank 0's."""
        num_minibatches = len(per_rank[0])
        minibatch_stats = []
        self.last_skips = []
        for j in range(num_minibatches):
            rank_stats = [per_rank[r][j] for r in range(len(per_rank))]
            combined = U.combine_micro_stats([{k: v for k, v in s.items() if isinstance(v, float)}
                                              for s in rank_stats])
            combined["grad_norm"] = rank_stats[0]["grad_norm"]
            combined["applied"] = rank_stats[0]["applied"]
            minibatch_stats.append(combined)
            if not rank_stats[0]["applied"]:
                where = "; ".join(f"rank {r}: {s['skip_where']}" for r, s in enumerate(rank_stats) if s.get("skip_where"))
                self.last_skips.append(f"epoch {int(rank_stats[0]['epoch'])} minibatch {int(rank_stats[0]['minibatch'])}: "
                                       f"{rank_stats[0]['skip_reason']}{' (' + where + ')' if where else ''}")
        for skip in self.last_skips:
            log.warning("learner: optimizer step skipped, weights unchanged: %s", skip)
        out = U.combine_micro_stats(minibatch_stats)
        for key in ("grad_norm", "applied", "epoch", "minibatch", "seconds", "input_tokens", "tokens"):
            out.pop(key, None)
        applied = [s for s in minibatch_stats if s["applied"]]
        out["grad_norm"] = sum(s["grad_norm"] for s in applied) / len(applied) if applied else float("nan")
        out["optimizer_steps"] = float(len(applied))
        out["skipped_steps"] = float(num_minibatches - len(applied))
        input_tokens = sum(s["input_tokens"] for rank in per_rank for s in rank)
        out["tokens_per_s"] = input_tokens / train_seconds
        out["tokens_per_s_per_rank"] = out["tokens_per_s"] / len(per_rank)
        out["train_seconds"] = train_seconds
        first = per_rank[0][0].get("first_micro_batch", {})
        for key in ("ratio_mean", "clip_fraction", "approx_kl"):
            if key in first:
                out[f"first_micro_batch/{key}"] = first[key]
        if "kl_to_ref" in out:
            out["kl_to_ref_during_update"] = out.pop("kl_to_ref")
        return out

    # -- weights --------------------------------------------------------------------------------

    def export_weights(self, kind: str | None = None) -> ExportedWeights:
        """The current policy for the rollout workers (see ExportedWeights). `kind` defaults to
        "lora" when training LoRA (adapter only), else "full"; "full" with LoRA exports merged."""
        kind = kind or ("lora" if self.cfg.lora.enabled else "full")
        if kind == "lora":
            final = self.export_dir / f"lora-v{self.version:06d}"
            adapter = self._call("save_adapter", [(str(final),)] * self.num_ranks, "exporting the LoRA adapter")[0]
            land(adapter, final)  # rank 0 may run on another host: the driver keeps its own copy
            for old in sorted(self.export_dir.glob("lora-v*"))[:-self.cfg.keep_exports]:
                shutil.rmtree(old, ignore_errors=True)
            return ExportedWeights(version=self.version, kind="lora", adapter_dir=str(final), adapter=adapter)
        if kind != "full":
            raise ValueError(f"unknown export kind {kind!r}; expected 'full' or 'lora'")
        if self.local:
            return ExportedWeights(version=self.version, kind="full", tensors=self.worker.full_state_dict())
        object_ref = self._call("export_full_weights", what="exporting full weights")[0][0]
        return ExportedWeights(version=self.version, kind="full", object_ref=object_ref)

    def describe(self) -> list[dict]:
        """Per rank: rank, device, GPU ids Ray assigned, placement group, node, rendezvous address."""
        if self.local:
            return [{"rank": 0, "world_size": 1, "device": str(self.worker.device), "gpu_ids": [],
                     "placement_group_id": None, "reference_numel": self.worker.reference_numel()}]
        return self._call("describe", what="describing the ranks")

    def param_hashes(self) -> list[str]:
        """One hash of all parameters per rank: equal when the data-parallel ranks agree bit for bit."""
        return self._call("param_hash", what="hashing parameters")

    def trainable_state(self) -> dict:
        """Rank 0's parameters by name (tests)."""
        return self._call("trainable_state", what="reading parameters")[0]

    # -- checkpoints ----------------------------------------------------------------------------

    def _driver_state(self) -> dict:
        return {"version": self.version, "update_calls": self.update_calls, "seed": self.seed,
                "num_ranks": self.num_ranks, "policy": self.policy_path}

    def save_checkpoint(self, directory: str) -> str:
        """Weights (trainable), optimizer, LR schedule, RNG states and counters of every rank, in
        `directory` on this (the driver's) host: each rank sends its files, and they are written
        together into a temporary sibling that is renamed into place."""
        state = self._driver_state()
        parts = self._call("save_checkpoint", [(state,)] * self.num_ranks, "saving a checkpoint")
        files = {"meta.json": json.dumps(state, indent=2, sort_keys=True).encode()}
        for part in parts:
            files.update(part.files)
        return str(land(pack_files(files, str(directory)), directory))

    def load_checkpoint(self, directory: str) -> None:
        if not Path(directory).is_dir():
            raise FileNotFoundError(f"learner checkpoint {directory} does not exist")
        if self.local:
            per_rank = [(str(directory),)]
        else:  # each rank gets its own part (the ranks may be on hosts without this directory)
            files = pack_dir(directory).files
            per_rank = [(pack_files(rank_files(files, r), f"{directory} (rank {r})"),) for r in range(self.num_ranks)]
        states = self._call("load_checkpoint", per_rank, "loading a checkpoint")
        state = states[0]
        if state.get("num_ranks") != self.num_ranks:
            raise ValueError(f"checkpoint {directory} was written by {state.get('num_ranks')} ranks, this group has "
                             f"{self.num_ranks}")
        self.version, self.update_calls = int(state["version"]), int(state["update_calls"])

    def shutdown(self) -> None:
        if self.local:
            self.worker = None
            return
        import ray

        for rank in self.ranks:
            ray.kill(rank, no_restart=True)
        self.ranks = []
        if self.pg is not None:
            ray.util.remove_placement_group(self.pg)
            self.pg = None

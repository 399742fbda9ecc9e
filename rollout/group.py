"""RolloutGroup: the rollout workers, seen from the driver.

It splits generation over the workers, pushes versioned weights to all of them, and heals: a
worker that died is restarted by Ray (max_restarts) and gets the current weights version again
before it serves; its share of the batch is retried, not lost.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import ray
import torch

from common.ray_helpers import get_with_timeout
from common.shipping import ShippedFiles, pack_dir
from rollout.config import RolloutConfig, SamplingConfig
from rollout.types import GenerateOutput, RolloutRequest
from rollout.weight_sync import to_numpy
from rollout.worker import RolloutWorker

log = logging.getLogger(__name__)


class RolloutGroup:
    def __init__(self, model_path: str | ShippedFiles, cfg: RolloutConfig, seed: int = 0, max_lora_rank: int | None = None,
                 max_restarts: int = 3, scheduling: Sequence | None = None, num_threads: int | None = None):
        """`scheduling[i]`, when given, is a Ray scheduling strategy for worker i (placement group
        bundle). `num_threads` per worker defaults to its CPUs (`rollout.num_cpus_per_worker`)."""
        from rollout.engine import vllm_env

        self.cfg = cfg
        # a model from the driver's disk goes into the object store once, for every worker (and
        # kept referenced here: a restarted worker reads it again)
        self._model = model = ray.put(model_path) if isinstance(model_path, ShippedFiles) else model_path
        env = vllm_env(cfg, num_threads=num_threads or max(1, int(cfg.num_cpus_per_worker)))
        self.workers = [
            RolloutWorker.options(
                num_cpus=cfg.num_cpus_per_worker, num_gpus=cfg.num_gpus_per_worker,
                max_restarts=max_restarts, max_task_retries=0, runtime_env={"env_vars": env},
                scheduling_strategy=scheduling[i] if scheduling else None,
            ).remote(model, cfg, seed + i, max_lora_rank, i)
            for i in range(cfg.num_workers)
        ]
        self.version = 0
        self._latest: tuple[str, object] | None = None  # ("full" or "lora", object ref)
        self.restarts = 0
        self.broken: str | None = None  # why the group refuses to generate (a failed weight push)

    def _get(self, refs, what: str, timeout_s: float | None = None):
        return get_with_timeout(refs, timeout_s or self.cfg.weight_sync_timeout_s, f"rollout group: {what}")

    def ready(self) -> list[int]:
        return self._get([w.weights_version.remote() for w in self.workers], "starting the rollout workers",
                         self.cfg.generate_timeout_s)

    # -- generation ----------------------------------------------------------------------------

    def generate(self, requests: Sequence[RolloutRequest], sampling: SamplingConfig) -> GenerateOutput:
        """Contiguous shares per worker, results in request order. A dead worker's share is retried
        once after Ray restarts it and it has the current weights."""
        if self.broken:
            raise RuntimeError(self.broken)
        n = len(self.workers)
        bounds = [round(i * len(requests) / n) for i in range(n + 1)]
        shares = [list(requests[bounds[i]:bounds[i + 1]]) for i in range(n)]
        refs = {i: self.workers[i].generate.remote(shares[i], sampling) for i in range(n) if shares[i]}
        out = GenerateOutput(results=[], skipped={})
        for i in sorted(refs):
            try:
                part = self._get(refs[i], f"generation on worker {i}", self.cfg.generate_timeout_s)
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
                log.warning("rollout worker %d died (%s); waiting for its restart, re-syncing, retrying", i, type(e).__name__)
                self.restarts += 1
                self.resync(i)
                part = self._get(self.workers[i].generate.remote(shares[i], sampling), f"retried generation on worker {i}",
                                 self.cfg.generate_timeout_s)
            out.results += part.results
            out.skipped.update(part.skipped)
        return out

    def _wait_alive(self, i: int) -> int:
        """Poll worker i until Ray has restarted it; returns its weights version."""
        deadline = time.monotonic() + self.cfg.generate_timeout_s
        while True:
            try:
                return ray.get(self.workers[i].weights_version.remote(), timeout=max(1.0, deadline - time.monotonic()))
            except (ray.exceptions.ActorUnavailableError, ray.exceptions.RayActorError) as e:
                if isinstance(e, ray.exceptions.ActorDiedError) or time.monotonic() > deadline:
                    raise RuntimeError(f"rollout group: worker {i} did not come back after dying ({e})") from e
                time.sleep(1.0)
            except ray.exceptions.GetTimeoutError:
                raise TimeoutError(f"rollout group: worker {i} did not restart within {self.cfg.generate_timeout_s:g}s") from None

    def resync(self, i: int) -> None:
        """Bring worker i (e.g. just restarted with base weights) to the group's current version."""
        have = self._wait_alive(i)
        if have == self.version or self._latest is None:
            return
        kind, payload = self._latest
        if have > self.version:
            raise RuntimeError(f"rollout worker {i} reports weights version {have}, newer than the group's {self.version}")
        self._get(self._load(i, kind, payload, self.version), f"re-syncing worker {i} to version {self.version}")

    def _load(self, i: int, kind: str, payload, version: int):
        """Worker i loads `payload` (an object ref of full weights or of a LoRA adapter's files)."""
        method = self.workers[i].load_full_weights if kind == "full" else self.workers[i].load_lora
        return method.remote(payload, version)

    def versions(self) -> list[int]:
        return self._get([w.weights_version.remote() for w in self.workers], "reading weight versions")

    # -- weight pushes -------------------------------------------------------------------------

    def _check_newer(self, version: int) -> None:
        if version <= self.version:
            raise ValueError(f"rollout group: weight push refused: version {version} is not newer than {self.version}")

    def push_full(self, weights: dict[str, torch.Tensor] | ray.ObjectRef, version: int) -> None:
        """Full weights by checkpoint name, or a Ray object of `weight_sync.to_numpy` arrays already
        in the object store (as learner rank 0 exports them): one copy there, every worker reads it."""
        self._check_newer(version)
        # Ray resolves a top-level ObjectRef argument to its value inside each worker.
        self._push("full", weights if isinstance(weights, ray.ObjectRef) else ray.put(to_numpy(weights)), version)

    def push_lora(self, adapter: str | ShippedFiles, version: int) -> None:
        """A LoRA adapter: its files, or a directory on this (the driver's) host whose files are
        sent. The workers may run on other hosts: each writes the files on its own host before
        vLLM loads them. One copy goes into the object store, for every worker."""
        self._check_newer(version)
        self._push("lora", ray.put(adapter if isinstance(adapter, ShippedFiles) else pack_dir(adapter)), version)

    def _push(self, kind: str, payload, version: int) -> None:
        """Every worker loads `payload` as `version`, or the group never samples from a mix of
        versions. A worker that dies during the push is waited for (Ray restarts it with the base
        weights) and pushed to again. When every worker refused and kept the current version, the
        refusal is raised and the group serves on unchanged; when only some loaded it (or a worker
        stays dead), the group is broken: it refuses to generate, with an error naming the workers."""
        what = f"{'full weight' if kind == 'full' else 'LoRA'} push v{version}"
        refs = [self._load(i, kind, payload, version) for i in range(len(self.workers))]
        failed: dict[int, Exception] = {}
        for i, ref in enumerate(refs):
            try:
                try:
                    self._get(ref, f"{what} to worker {i}")
                except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
                    log.warning("rollout worker %d died during the %s (%s); pushing again once it is back", i, what,
                                type(e).__name__)
                    self.restarts += 1
                    self._wait_alive(i)
                    self._get(self._load(i, kind, payload, version), f"{what} to restarted worker {i}")
            except Exception as e:  # noqa: BLE001 - a refusal, a timeout, a death: all named below
                failed[i] = e
        if failed:
            held = {i: self._version_or_none(i) for i in range(len(self.workers))}
            if len(failed) == len(self.workers) and all(v == self.version for v in held.values()):
                raise failed[0]
            first = min(failed)
            self.broken = (f"rollout group: the {what} failed on worker(s) {sorted(failed)}; the workers now hold "
                           f"weight versions {held}, so the group stops rather than sample from a mix of versions "
                           f"(resume from the last checkpoint). Worker {first}: {type(failed[first]).__name__}: "
                           f"{failed[first]}")
            raise RuntimeError(self.broken) from failed[first]
        self.version, self._latest = version, (kind, payload)

    def _version_or_none(self, i: int) -> int | None:
        try:
            return ray.get(self.workers[i].weights_version.remote(), timeout=10)
        except Exception:  # noqa: BLE001 - a dead or stuck worker holds no usable version
            return None

    def shutdown(self) -> None:
        for w in self.workers:
            ray.kill(w, no_restart=True)

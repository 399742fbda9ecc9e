"""RewardPool: the reward actors, seen from the driver.

`RewardPool.submit` splits a batch into chunks, sends them to the actors and returns at once;
`RewardPool.collect` gathers the results in request order. A dead actor is replaced and its chunk
resubmitted once; an actor whose user function timed out (a thread that cannot be killed) is
replaced after the collect.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from reward.actor import RewardActor
from reward.config import RewardConfig
from reward.types import RewardError, RewardTimeoutError, ScoreRequest, ScoreResult


@dataclass
class _Chunk:
    start: int
    requests: list[ScoreRequest]
    slot: int
    actor: object
    ref: object
    resubmitted: bool = False
    results: list[ScoreResult] | None = None


@dataclass
class RewardHandle:
    """The in-flight scoring of one batch (from `RewardPool.submit`)."""

    n: int
    chunks: list[_Chunk] = field(default_factory=list)
    submitted_at: float = field(default_factory=time.monotonic)

    def done(self) -> bool:
        """True when every chunk has finished (collect will not block)."""
        pending = [c.ref for c in self.chunks if c.results is None]
        if not pending:
            return True
        ready, _ = ray.wait(pending, num_returns=len(pending), timeout=0)
        return len(ready) == len(pending)


class RewardPool:
    """N reward actors behind submit/collect. Lives in the driver; not thread-safe."""

    def __init__(self, config: RewardConfig, num_actors: int | None = None, num_cpus_per_actor: float | None = None,
                 name_prefix: str = "reward-actor", start_timeout_s: float = 120.0, actor_options: dict | None = None) -> None:
        self.config = config
        self.num_actors = num_actors or config.num_actors
        self.num_cpus = num_cpus_per_actor if num_cpus_per_actor is not None else config.num_cpus_per_actor
        self.name_prefix = name_prefix
        self.start_timeout_s = start_timeout_s
        self.actor_options = dict(actor_options or {})
        self.restarts = 0
        self._generation = [0] * self.num_actors
        self._recycle: set[int] = set()
        self._actors = [self._make(i) for i in range(self.num_actors)]
        try:
            self._wait_ready(range(self.num_actors))
        except BaseException:
            self.shutdown()
            raise

    # -- actors --------------------------------------------------------------------------------

    def actor_name(self, slot: int) -> str:
        gen = self._generation[slot]
        return f"{self.name_prefix}-{slot}" + (f" (restart {gen})" if gen else "")

    def _make(self, slot: int):
        opts = {"num_cpus": self.num_cpus, **self.actor_options}
        return RewardActor.options(**opts).remote(self.config, self.actor_name(slot))

    def _wait_ready(self, slots) -> None:
        slots = list(slots)
        refs = [self._actors[s].ready.remote() for s in slots]
        try:
            ray.get(refs, timeout=self.start_timeout_s)
        except RayActorError as e:
            raise RewardError(f"reward actor failed to start: {e}") from e
        except GetTimeoutError:
            names = [self.actor_name(s) for s, r in zip(slots, refs) if not ray.wait([r], timeout=0)[0]]
            raise RewardTimeoutError(
                f"reward actors {', '.join(names)} did not start within {self.start_timeout_s:g} s "
                f"(each needs num_cpus={self.num_cpus:g}; is the cluster full?)"
            ) from None

    def _restart(self, slot: int) -> None:
        try:
            ray.kill(self._actors[slot], no_restart=True)
        except Exception:  # noqa: BLE001 - already dead
            pass
        self._generation[slot] += 1
        self.restarts += 1
        self._actors[slot] = self._make(slot)

    @property
    def actors(self) -> list:
        return list(self._actors)

    # -- scoring -------------------------------------------------------------------------------

    def _chunk_size(self, n: int) -> int:
        per_actor = -(-n // self.num_actors)
        return max(1, min(self.config.batch_size, per_actor))

    def submit(self, requests: Sequence[ScoreRequest]) -> RewardHandle:
        """Send the batch to the actors and return immediately (no waiting on results)."""
        requests = list(requests)
        handle = RewardHandle(n=len(requests))
        size = self._chunk_size(len(requests))
        for i, start in enumerate(range(0, len(requests), size)):
            slot = i % self.num_actors
            chunk = requests[start : start + size]
            actor = self._actors[slot]
            handle.chunks.append(_Chunk(start, chunk, slot, actor, actor.score.remote(chunk)))
        return handle

    def _resubmit(self, chunk: _Chunk, cause: Exception) -> None:
        if chunk.resubmitted:
            raise RewardError(
                f"reward actor {self.actor_name(chunk.slot)} died again while scoring requests "
                f"{chunk.start}..{chunk.start + len(chunk.requests) - 1} "
                f"(first question {chunk.requests[0].sample.question_id}): {cause}"
            ) from cause
        if self._actors[chunk.slot] is chunk.actor:  # not yet replaced by another chunk's failure
            self._restart(chunk.slot)
        chunk.actor = self._actors[chunk.slot]
        chunk.ref = chunk.actor.score.remote(chunk.requests)
        chunk.resubmitted = True

    def collect(self, handle: RewardHandle, timeout_s: float | None = None) -> list[ScoreResult]:
        """Wait for the batch's results (request order). Raises RewardTimeoutError naming the
        actors still scoring after `timeout_s` (default `config.collect_timeout_s`); the handle
        stays valid, so collect may be called again."""
        timeout_s = self.config.collect_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        while True:
            pending = {c.ref: c for c in handle.chunks if c.results is None}
            if not pending:
                break
            left = deadline - time.monotonic()
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(left, 0.0))
            if not ready:
                waiting = sorted({self.actor_name(c.slot) for c in pending.values()})
                raise RewardTimeoutError(
                    f"reward: {len(pending)} of {len(handle.chunks)} chunks not scored within {timeout_s:g} s; "
                    f"still waiting on {', '.join(waiting)}"
                )
            for ref in ready:
                chunk = pending[ref]
                try:
                    results, leaked = ray.get(ref)
                except RayActorError as e:
                    self._resubmit(chunk, e)
                    continue
                chunk.results = results
                if leaked:
                    self._recycle.add(chunk.slot)
        out: list[ScoreResult] = []
        for c in handle.chunks:
            out.extend(c.results)  # type: ignore[arg-type]
        self._recycle_leaky()
        return out

    def _recycle_leaky(self) -> None:
        """Replace actors whose user function leaked a thread (it may still be spinning)."""
        if self._recycle:
            slots = sorted(self._recycle)
            self._recycle.clear()
            for slot in slots:
                self._restart(slot)

    def score(self, requests: Sequence[ScoreRequest], timeout_s: float | None = None) -> list[ScoreResult]:
        return self.collect(self.submit(requests), timeout_s)

    def shutdown(self) -> None:
        for actor in self._actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001
                pass
        self._actors = []

"""RolloutWorker: a Ray actor holding one vLLM engine (a thin shell over `RolloutEngine`)."""

from __future__ import annotations

import os

import ray

from rollout.config import RolloutConfig, SamplingConfig
from rollout.engine import vllm_env
from rollout.types import RolloutRequest, RolloutResult


@ray.remote
class RolloutWorker:
    def __init__(self, model_path: str, cfg: RolloutConfig, seed: int = 0):
        os.environ.update(vllm_env(cfg, num_threads=max(1, int(cfg.num_cpus_per_worker))))
        from rollout.engine import RolloutEngine  # imports vllm: after the environment is set

        self.engine = RolloutEngine(model_path, cfg, seed=seed)

    def generate(self, requests: list[RolloutRequest], sampling: SamplingConfig) -> list[RolloutResult]:
        return self.engine.generate(requests, sampling)

    def weights_version(self) -> int:
        return self.engine.weights_version

    def shutdown(self) -> None:
        self.engine.shutdown()


def start_rollout_workers(model_path: str, cfg: RolloutConfig, seed: int = 0) -> list:
    """One actor per worker, each with its own CPU/GPU share; seeds differ so samples differ."""
    workers = []
    for i in range(cfg.num_workers):
        env = vllm_env(cfg, num_threads=max(1, int(cfg.num_cpus_per_worker)))
        workers.append(
            RolloutWorker.options(
                num_cpus=cfg.num_cpus_per_worker,
                num_gpus=cfg.num_gpus_per_worker,
                name=None,
                runtime_env={"env_vars": env},
            ).remote(model_path, cfg, seed + i)
        )
    return workers

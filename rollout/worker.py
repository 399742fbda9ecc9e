"""RolloutWorker: a Ray actor holding one vLLM engine (a thin shell over `RolloutEngine`)."""

from __future__ import annotations

import os
import shutil

import ray

from common.shipping import ShippedFiles, land, model_dir, scratch_dir
from rollout.config import RolloutConfig, SamplingConfig
from rollout.engine import vllm_env
from rollout.types import GenerateOutput, RolloutRequest


@ray.remote
class RolloutWorker:
    def __init__(self, model: str | ShippedFiles, cfg: RolloutConfig, seed: int = 0, max_lora_rank: int | None = None,
                 index: int = 0):
        os.environ.update(vllm_env(cfg, num_threads=max(1, int(cfg.num_cpus_per_worker)), gpu_ids=ray.get_gpu_ids()))
        from rollout.engine import RolloutEngine  # imports vllm: after the environment is set

        self.name = f"rollout worker {index}"
        self.engine = RolloutEngine(model_dir(model), cfg, seed=seed, max_lora_rank=max_lora_rank, name=self.name)
        self.adapters = scratch_dir("rollout-adapters")  # this host's copies of the pushed adapters

    def generate(self, requests: list[RolloutRequest], sampling: SamplingConfig) -> GenerateOutput:
        return self.engine.generate(requests, sampling)

    def weights_version(self) -> int:
        return self.engine.weights_version

    # -- weight updates ------------------------------------------------------------------------

    def load_full_weights(self, arrays: dict, version: int) -> int:
        """Object-store transport: `arrays` from `weight_sync.to_numpy` (already fetched by Ray)."""
        from rollout.weight_sync import from_numpy

        return self.engine.load_full_weights(from_numpy(arrays), version)

    def load_lora(self, adapter: ShippedFiles, version: int) -> int:
        """The adapter's files (sent by the driver; the learner that wrote them may be on another
        host) are written here, then loaded. The copies of the last two versions are kept: vLLM
        holds the serving adapter and, until the swap, the one before."""
        local = land(adapter, self.adapters / f"lora-v{version:06d}")
        loaded = self.engine.load_lora(str(local), version)
        for old in sorted(self.adapters.glob("lora-v*"))[:-2]:
            shutil.rmtree(old, ignore_errors=True)
        return loaded

    def shutdown(self) -> None:
        self.engine.shutdown()

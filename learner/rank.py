"""LearnerRank: one DeepSpeed rank of the learner group, a thin Ray actor over `LearnerWorker`."""

from __future__ import annotations

import os

import ray
import torch

from common.quiet import quiet_known_library_messages
from common.ray_helpers import free_port, ray_narrows_visible_gpus, task_device, visible_gpu_index
from learner.config import AlgorithmConfig, LearnerConfig
from learner.worker import LearnerWorker


def cuda_local_rank(node_local_rank: int, gpu_ids: list, visible_devices_set_by_ray: bool) -> int:
    """The LOCAL_RANK to give DeepSpeed, which uses it as this process's CUDA device index (comm
    init, `set_device`). Ray narrows CUDA_VISIBLE_DEVICES to the actor's own GPUs, so the device is
    index 0 of what the process sees, whatever the rank's place on its node; only with
    RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES are all devices visible and the index is the GPU id.
    Without GPUs (gloo on CPU) the rank on the node is kept."""
    if not gpu_ids:
        return node_local_rank
    return visible_gpu_index(gpu_ids, visible_devices_set_by_ray)


@ray.remote
class LearnerRank:
    """Ray actor around one LearnerWorker. Construction is cheap; `setup` builds the worker once
    the driver knows the rendezvous address (rank 0's node and a free port there)."""

    def __init__(self):
        self.worker: LearnerWorker | None = None

    def node_info(self) -> dict:
        # any interface: with ranks on several nodes, the others connect to rank 0's node address
        return {"node_id": ray.get_runtime_context().get_node_id(), "ip": ray.util.get_node_ip_address(),
                "free_port": free_port(""), "pid": os.getpid()}

    def setup(self, policy, cfg: LearnerConfig, algo: AlgorithmConfig, rank: int, world_size: int,
              local_rank: int, master_addr: str, master_port: int, seed: int, num_threads: int,
              sampling_temperature: float = 1.0) -> bool:
        # every docrl process drops the same known-harmless library messages (common/quiet.py)
        quiet_known_library_messages()
        torch.set_num_threads(max(1, num_threads))
        local_rank = cuda_local_rank(local_rank, ray.get_gpu_ids(), ray_narrows_visible_gpus())
        self.worker = LearnerWorker(policy, cfg, algo, rank=rank, world_size=world_size, local_rank=local_rank,
                                    master_addr=master_addr, master_port=master_port, seed=seed,
                                    sampling_temperature=sampling_temperature,
                                    device=task_device(cfg.num_gpus_per_rank), node_ip=ray.util.get_node_ip_address())
        return True

    def describe(self) -> dict:
        """Where this rank runs and what it got from Ray (placement and GPU tests, debugging)."""
        ctx = ray.get_runtime_context()
        return {"rank": self.worker.rank, "world_size": self.worker.world_size, "device": str(self.worker.device),
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()], "placement_group_id": ctx.get_placement_group_id(),
                "node_id": ctx.get_node_id(), "master_addr": os.environ.get("MASTER_ADDR"), "pid": os.getpid(),
                "reference_numel": self.worker.reference_numel()}

    def score(self, experiences, micro_batches):
        return self.worker.score(experiences, micro_batches)

    def train(self, experiences, targets, schedule):
        return self.worker.train(experiences, targets, schedule)

    def learning_rates(self):
        return self.worker.learning_rates()

    def param_hash(self):
        return self.worker.param_hash()

    def trainable_state(self):
        return self.worker.trainable_state()

    def export_full_weights(self):
        """Rank 0 puts its merged full weights into the object store once (numpy: fast there) and
        returns the reference inside a list, so that Ray hands the driver the reference, not the
        data; the rollout workers fetch it directly. Other ranks only join the ZeRO-3 gathers."""
        from rollout.weight_sync import to_numpy

        # the CPU weights are shared, not copied: ray.put below serializes them before anything changes them
        named = self.worker.full_state_dict(keep=self.worker.rank == 0, share_cpu_weights=True)
        return [ray.put(to_numpy(named))] if self.worker.rank == 0 else None

    def save_adapter(self, name):
        return self.worker.save_adapter(name)

    def save_checkpoint(self, client_state=None):
        return self.worker.save_checkpoint(client_state)

    def load_checkpoint(self, checkpoint):
        return self.worker.load_checkpoint(checkpoint)

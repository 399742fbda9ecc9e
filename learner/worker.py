"""One DeepSpeed learner rank as a plain object, `LearnerWorker` (its Ray shell is `learner.rank.LearnerRank`).

A rank holds the policy + value model in one DeepSpeed engine (ZeRO-2 or ZeRO-3, fp32 or bf16,
a client `torch.optim.AdamW` with a policy and a value param group, so no FusedAdam JIT), the
reference (adapters disabled, or a frozen copy), and the input builder. It does three things for
the driver (`learner.group.LearnerGroup`), which owns the algorithm:

* `score`: old logprobs / reference logprobs / values of its share of the batch, no gradient,
  eval mode, on exactly the micro-batches it will train on first (see `learner.update`);
  every logprob (policy, reference, training) is of softmax(logits / T) with T the rollout's
  sampling temperature, the distribution vLLM sampled from;
* `train`: the PPO epochs over its shards, one optimizer step per minibatch;
* export, checkpoints, and a parameter hash that proves the ranks stayed identical.

Non-finite losses and gradients. A micro-batch whose loss is not finite gets its loss multiplied
by NaN before backward, so its gradients are surely non-finite; DeepSpeed's ZeRO optimizer then
sees a non-finite global gradient norm on every rank (the norm is all-reduced), skips the step and
zeroes the gradients (weights, Adam moments and the LR schedule untouched). The worker checks the
loss before `engine.step()`, all-reduces that verdict so every rank reports the same reason, and
verifies after the step that DeepSpeed really skipped it (`engine.skipped_steps`).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import os
import socket
import random
import shutil
import time
from contextlib import nullcontext
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch

from common.ray_helpers import free_port
from common.shipping import ShippedFiles, land, model_dir, model_name, pack_dir, scratch_dir
from learner import update as U
from learner.config import AlgorithmConfig, LearnerConfig
from learner.model import ActorCritic, InputBuilder, build_models, forward_outputs, is_peft, unwrap
from learner.types import Experience

log = logging.getLogger(__name__)

DS_TAG = "state"  # DeepSpeed checkpoint tag inside a docrl checkpoint directory


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def deepspeed_config(cfg: LearnerConfig, algo: AlgorithmConfig, world_size: int) -> dict:
    """The DeepSpeed config for the learner section. Gradient accumulation is driven by the worker
    (it marks the last micro-batch of each minibatch as the boundary), so the accumulation steps
    here are nominal: DeepSpeed needs a consistent train_batch_size, nothing more.

    ZeRO keeps DeepSpeed's own defaults (overlap_comm on for ZeRO-3, off for ZeRO-2; small
    ZeRO-3 parameters kept whole, 50M-element prefetch buckets): they are what DeepSpeed tunes
    and tests on GPUs. `learner.zero3_partition_all` partitions every parameter, however small,
    with no prefetch, so that the tiny test models really exercise ZeRO-3's gathers."""
    per_rank = max(1, algo.minibatch_size // world_size)
    gas = max(1, -(-per_rank // cfg.micro_batch_size))
    zero: dict = {"stage": cfg.zero_stage, "contiguous_gradients": True}
    if cfg.zero_stage == 3 and cfg.zero3_partition_all:
        zero.update({"stage3_param_persistence_threshold": 0, "stage3_prefetch_bucket_size": 0})
    config = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": gas,
        "train_batch_size": cfg.micro_batch_size * gas * world_size,
        "gradient_clipping": cfg.max_grad_norm,
        "zero_optimization": zero,
        # check_grad_overflow: a non-finite gradient norm skips the step in bf16 too (fp32 always does)
        "bf16": {"enabled": cfg.dtype == "bfloat16", "check_grad_overflow": True},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cfg.dtype == "bfloat16":
        # Without it DeepSpeed sums the micro-batches' gradients in bf16 (8 bits of mantissa): a
        # minibatch of 32 micro-batches loses the small ones. ZeRO-2 and ZeRO-3 both take fp32.
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    return config


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name
        return host == "localhost"


def interface_of(ip: str) -> str | None:
    """The network interface that holds address `ip` on this machine, or None."""
    import psutil

    for name, addresses in psutil.net_if_addrs().items():
        if any(a.address.split("%")[0] == ip for a in addresses):
            return name
    return None


def init_distributed(rank: int, world_size: int, local_rank: int, master_addr: str, master_port: int,
                     timeout_s: float, backend: str = "gloo", node_ip: str | None = None) -> None:
    """torch.distributed through DeepSpeed (gloo on CPU, NCCL on GPU), from the env variables.
    `node_ip`: this rank's node address (Ray's), whose interface carries the ranks' traffic."""
    import deepspeed
    import torch
    import torch.distributed as dist

    os.environ.update({"MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port), "RANK": str(rank),
                       "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(local_rank)})
    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() != world_size:
            raise RuntimeError(f"torch.distributed is already initialized with world size {dist.get_world_size()}, "
                               f"this learner needs {world_size}")
        return
    # torch's env:// rendezvous listens on every interface; rank 0 binds the store to MASTER_ADDR
    # itself, so ranks on one node (MASTER_ADDR 127.0.0.1) open nothing beyond loopback
    listener = None
    if rank == 0:
        family = socket.AF_INET6 if ":" in master_addr else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((master_addr, master_port))
        listener.listen(max(128, world_size))
    # gloo's (and NCCL's) own sockets go on the interface of this node's address: left to choose,
    # gloo takes the address the machine's host name resolves to, which need not be this node's
    # (nor be reachable from the other ranks)
    interface = "lo" if _is_loopback(master_addr) else interface_of(node_ip) if node_ip else None
    if interface:
        os.environ["GLOO_SOCKET_IFNAME"] = interface
        os.environ.setdefault("NCCL_SOCKET_IFNAME", interface)
    store = dist.TCPStore(master_addr, master_port, world_size, is_master=rank == 0, timeout=timedelta(seconds=timeout_s),
                          master_listen_fd=listener.detach() if listener else None)
    # as DeepSpeed's own init does on CUDA: bind the rank's GPU (LOCAL_RANK) to the NCCL group
    device = {"device_id": torch.device("cuda", local_rank)} if backend == "nccl" and world_size > 1 else {}
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s),
                            **device)
    # DeepSpeed keeps the process group it finds
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timedelta(seconds=timeout_s),
                               rank=rank, world_size=world_size)


class LearnerWorker:
    """One rank of the learner. `rank`/`world_size` describe the DeepSpeed data-parallel group."""

    def __init__(self, policy_path: str | ShippedFiles, cfg: LearnerConfig, algo: AlgorithmConfig, *, rank: int = 0,
                 world_size: int = 1, local_rank: int = 0, master_addr: str = "127.0.0.1",
                 master_port: int | None = None, seed: int = 0, sampling_temperature: float = 1.0,
                 device: str | None = None, node_ip: str | None = None):
        """`node_ip`: this rank's node address (for the interface of its collectives).
        `device`: where this rank computes, "cuda:<i>" or "cpu" (the Ray shell passes the GPU
        Ray gave it, `common.ray_helpers.task_device`); None: the current CUDA device if there
        is one, else the CPU. DeepSpeed takes LOCAL_RANK as the CUDA index, so a CUDA device's
        index must equal `local_rank`."""
        import deepspeed

        U.check_sampling_temperature(sampling_temperature)
        self.cfg, self.algo, self.rank, self.world_size = cfg, algo, rank, world_size
        self.temperature = sampling_temperature
        self.policy_name = model_name(policy_path)  # as the adapter and checkpoint records name it
        self.policy_path = model_dir(policy_path)
        self.name = f"learner rank {rank}"
        if master_port is None:
            master_port = free_port()
        if device is None:
            device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.device.type == "cuda":
            if self.device.index != local_rank:
                raise ValueError(f"{self.name}: device {device} differs from LOCAL_RANK {local_rank}, which DeepSpeed "
                                 "uses as this process's CUDA device index")
            torch.cuda.set_device(self.device)
        init_distributed(rank, world_size, local_rank, master_addr, master_port, cfg.collective_timeout_s,
                         backend="nccl" if self.device.type == "cuda" else "gloo", node_ip=node_ip)
        self.dtype = torch_dtype(cfg.dtype)
        # The reference serves a KL penalty, or the KL-to-ref metric when asked for (learner.log_kl_to_ref):
        # with LoRA it costs a forward with the adapters disabled, with full fine-tuning a frozen copy too.
        self.use_reference = algo.kl_coef > 0 or cfg.log_kl_to_ref
        if algo.advantage != "gae" and cfg.value_model != "none":
            # GRPO/RLOO baselines come from the group: a critic would only cost memory and time.
            cfg = cfg.model_copy(update={"value_model": "none"})
        built = build_models(self.policy_path, cfg, self.dtype, need_reference=self.use_reference, seed=seed)
        module = built.actor_critic
        self.reference = self._place_reference(built.reference, algo) if built.reference is not None else None

        policy_params = [p for p in module.policy.parameters() if p.requires_grad]
        value_params = [p for n, p in module.named_parameters() if p.requires_grad and not n.startswith("policy.")]
        groups = [{"params": policy_params, "lr": cfg.learning_rate, "name": "policy"}]
        if value_params:
            groups.append({"params": value_params, "lr": cfg.value_learning_rate, "name": "value"})
        optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: U.lr_multiplier(
            step, cfg.lr_schedule, cfg.warmup_steps, cfg.lr_decay_steps, cfg.min_lr_ratio))
        self.ds_config = deepspeed_config(cfg, algo, world_size)
        # DeepSpeed steps the schedule only when it applies an optimizer step (not on skipped ones)
        # and saves/loads it with its checkpoints.
        self.engine, self.optimizer, _, self.lr_scheduler = deepspeed.initialize(
            model=module, optimizer=optimizer, lr_scheduler=schedule, config=self.ds_config,
            dist_init_required=False)
        self.module: ActorCritic = self.engine.module
        self.module.eval()
        self.builder = InputBuilder.for_model(self.policy_path)
        self._batch_key: tuple[str, ...] | None = None
        self.optimizer_steps = 0  # applied steps
        self.skipped_steps = 0

    def _place_reference(self, reference: torch.nn.Module, algo: AlgorithmConfig) -> torch.nn.Module:
        """The frozen full-fine-tuning reference on this rank. Under ZeRO-3 it is partitioned like
        the policy (a DeepSpeed engine without an optimizer; its forward gathers one module at a
        time), so it costs 1/world_size of a copy per GPU instead of a whole one."""
        if self.cfg.zero_stage != 3:
            return reference.to(self.device)
        import deepspeed

        ds = deepspeed_config(self.cfg, algo, self.world_size)
        config = {key: ds[key] for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                                           "train_batch_size", "zero_optimization", "bf16", "steps_per_print",
                                           "wall_clock_breakdown")}
        engine, *_ = deepspeed.initialize(model=reference, config=config, dist_init_required=False)
        return engine.module.eval()

    def reference_numel(self) -> tuple[int, int]:
        """(elements this rank holds, elements of the whole reference); (0, 0) without a copy."""
        if self.reference is None:
            return 0, 0
        held = total = 0
        for p in self.reference.parameters():
            total += p.ds_numel if hasattr(p, "ds_numel") else p.numel()
            held += p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
        return held, total

    # -- helpers --------------------------------------------------------------------------------

    def _inputs(self, experiences: list[Experience], micro: U.MicroBatch):
        """The padded micro-batch on this rank's device; ghost rows are masked out of the response."""
        inputs = self.builder.build([experiences[i] for i in micro.indices], ensure_image=self.world_size > 1,
                                    share_prompts=self.cfg.share_prompts)
        inputs.response_mask[: len(micro.ghost)][torch.tensor(micro.ghost, dtype=torch.bool)] = False
        return inputs.to(self.device)

    def _gathered(self, params):
        """Full parameters under ZeRO-3 (every rank must enter); a no-op context otherwise."""
        import deepspeed

        params = list(params)
        if self.cfg.zero_stage == 3 and any(hasattr(p, "ds_id") for p in params):
            return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
        return nullcontext()

    def _all_reduce_max(self, value: float) -> float:
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    @torch.no_grad()
    def _reference_outputs(self, inputs):
        if self.reference is not None:
            return forward_outputs(self.reference, inputs, with_entropy=False, with_values=False,
                                   temperature=self.temperature)
        with self.module.adapters_disabled():
            return forward_outputs(self.engine, inputs, with_entropy=False, with_values=False,
                                   temperature=self.temperature)

    def _begin_batch(self, experiences: list[Experience]) -> None:
        """Keep the processed page images while the batch stays the same (scoring then training):
        each image is processed once per update, not once per pass."""
        key = tuple(e.sample_id for e in experiences)
        if key != self._batch_key:
            self.builder.clear()
            self._batch_key = key

    # -- scoring (before the update) ------------------------------------------------------------

    @torch.no_grad()
    def score(self, experiences: list[Experience], micro_batches: list[U.MicroBatch]) -> dict[int, dict]:
        """Old logprobs, reference logprobs and values of the experiences in `micro_batches`, in eval
        mode (no dropout), on exactly these micro-batches. Returns index -> {"old", "ref", "values"}."""
        self._begin_batch(experiences)
        self.module.eval()
        out: dict[int, dict] = {}
        for micro in micro_batches:
            inputs = self._inputs(experiences, micro)
            pol = forward_outputs(self.engine, inputs, with_entropy=False, with_values=self.module.has_values,
                                  temperature=self.temperature)
            ref = self._reference_outputs(inputs) if self.use_reference else None
            for row, (i, ghost) in enumerate(zip(micro.indices, micro.ghost)):
                if ghost:
                    continue
                n = len(experiences[i].response_ids)
                out[i] = {"old": pol.logprobs[row, :n].float().cpu(),
                          "ref": ref.logprobs[row, :n].float().cpu() if ref is not None else None,
                          "values": pol.values[row, :n].float().cpu() if pol.values is not None else None}
        return out

    # -- training -------------------------------------------------------------------------------

    def train(self, experiences: list[Experience], targets: U.Targets, schedule) -> list[dict]:
        """PPO epochs over this rank's shards (`UpdatePlan.rank_schedule(rank)`); one optimizer step
        per minibatch. Returns one stats dict per minibatch, in order. Targets without old logprobs
        (no scoring pass: `update.needs_scoring_pass`) take each micro-batch's own, detached, and
        its reference logprobs when a KL penalty is in the loss."""
        self._begin_batch(experiences)
        results = []
        first_micro: dict | None = None
        for epoch_index, epoch in enumerate(schedule):
            for mb_index, (micro_batches, mb_sequences, mb_tokens) in enumerate(epoch):
                t0 = time.perf_counter()
                self.module.train()
                micro_stats, bad_loss, input_tokens = [], [], 0
                for k, micro in enumerate(micro_batches):
                    inputs = self._inputs(experiences, micro)
                    input_tokens += inputs.num_tokens
                    target = U.gather_targets(targets, micro.indices)
                    with_values = self.module.has_values and target["returns"] is not None
                    # The full-vocabulary entropy only when it is in the loss (micro_batch_loss logs a
                    # free estimate otherwise).
                    out = forward_outputs(self.engine, inputs, with_entropy=self.algo.entropy_coef > 0,
                                          with_values=with_values, temperature=self.temperature)
                    out = out.first_rows(len(micro.indices))
                    on_policy_stats = {}
                    if target["old_logprobs"] is None:
                        rows = [experiences[i].rollout_logprobs for i in micro.indices]
                        taken, on_policy_stats = U.on_policy_targets(out.logprobs, rows, out.mask, self.algo)
                        target.update(taken)
                        if self.use_reference:  # the KL in the loss, or only its metric (log_kl_to_ref)
                            ref = self._reference_outputs(inputs).first_rows(len(micro.indices))
                            target["ref_logprobs"] = ref.logprobs.float()
                    share = U.micro_batch_share(self.algo.loss_aggregation, out.mask, mb_sequences, mb_tokens,
                                                self.world_size)
                    loss, stats = U.micro_batch_loss(out.logprobs, out.entropy, out.values, out.mask, target,
                                                     self.algo, share)
                    stats.update(on_policy_stats)
                    stats["tokens"] = int(out.mask.sum())
                    if first_micro is None:
                        first_micro = dict(stats)
                    if not bool(torch.isfinite(loss)):
                        bad_loss.append(f"micro-batch {k} ({', '.join(inputs.sample_ids[:4])})")
                        # Make sure the gradients are non-finite too, so DeepSpeed skips the step.
                        loss = loss * float("nan")
                    micro_stats.append(stats)
                    self.engine.set_gradient_accumulation_boundary(k == len(micro_batches) - 1)
                    self.engine.backward(loss, scale_wrt_gas=False)
                # The check before the step, agreed by every rank: a non-finite loss anywhere skips it.
                any_bad = self._all_reduce_max(1.0 if bad_loss else 0.0) > 0
                skipped_before = self.engine.skipped_steps
                self.engine.step()
                skipped = self.engine.skipped_steps > skipped_before
                if any_bad and not skipped:
                    raise RuntimeError(f"{self.name}: a non-finite loss did not make DeepSpeed skip the step "
                                       "(weights may have changed); refusing to continue")
                grad_norm = self.engine.get_global_grad_norm()
                grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
                reason = None
                if skipped:
                    self.skipped_steps += 1
                    reason = "non-finite loss" if any_bad else "non-finite gradient"
                    where = f" on this rank: {'; '.join(bad_loss)}" if bad_loss else " on another rank" if any_bad else ""
                    log.warning("%s: optimizer step skipped (%s%s); weights unchanged", self.name, reason, where)
                else:
                    self.optimizer_steps += 1
                self.module.eval()
                seconds = time.perf_counter() - t0
                stats = U.combine_micro_stats(micro_stats)
                stats.update(grad_norm=grad_norm, applied=0.0 if skipped else 1.0, seconds=seconds,
                             input_tokens=float(input_tokens), epoch=float(epoch_index), minibatch=float(mb_index))
                if reason:
                    stats["skip_reason"] = reason
                    stats["skip_where"] = "; ".join(bad_loss)
                results.append(stats)
        if results and first_micro is not None:
            results[0]["first_micro_batch"] = first_micro
        return results

    def learning_rates(self) -> dict[str, float]:
        return {g.get("name", str(i)): float(g["lr"]) for i, g in enumerate(self.optimizer.param_groups)}

    # -- weights --------------------------------------------------------------------------------

    def param_hash(self) -> str:
        """sha256 over every parameter (name, dtype, bytes), gathered under ZeRO-3 (collective)."""
        digest = hashlib.sha256()
        for name, p in sorted(self.module.named_parameters(), key=lambda kv: kv[0]):
            with self._gathered([p]):
                t = p.detach().cpu().contiguous()
                digest.update(name.encode())
                digest.update(str(t.dtype).encode())
                digest.update(t.view(torch.uint8).numpy().tobytes() if t.dtype == torch.bfloat16
                              else t.numpy().tobytes())
        return digest.hexdigest()

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Copies of every parameter, by ActorCritic name (for tests; collective under ZeRO-3)."""
        out = {}
        for name, p in self.module.named_parameters():
            with self._gathered([p]):
                out[name] = p.detach().cpu().clone()
        return out

    @torch.no_grad()
    def full_state_dict(self, keep: bool = True, share_cpu_weights: bool = False) -> dict[str, torch.Tensor]:
        """The policy's weights under its checkpoint names, LoRA merged (base + delta), gathered
        under ZeRO-3 one module at a time (collective: every rank must call it). With
        `keep=False` a rank only takes part in the gathers and copies nothing (an export needs
        one copy, rank 0's, not one per rank); without ZeRO-3 there is nothing to take part in.

        Each weight reaches the host with at most one copy: a GPU weight's transfer is the copy,
        and with `share_cpu_weights` a CPU weight that is neither merged nor gathered is returned
        as is (for a caller that serializes the result before the next update, as the Ray
        shell's export does: a 7B bf16 policy would otherwise cost 15 GB more host memory per
        push). Every weight is checked finite where it lives, before its copy: a non-finite
        weight raises naming it, and never reaches a rollout worker."""
        from peft.tuners.lora import LoraLayer
        from transformers.core_model_loading import revert_weight_conversion

        partitioned = self.cfg.zero_stage == 3
        if not keep and not partitioned:
            return {}
        base = unwrap(self.module.policy)
        named: dict[str, torch.Tensor] = {}
        nonfinite: list[str] = []

        def take(name: str, tensor: torch.Tensor, fresh: bool = False) -> None:
            """`fresh`: a tensor made here (a merged weight), no parameter's storage."""
            tensor = tensor.detach()
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                nonfinite.append(name)
            if tensor.device.type != "cpu":
                tensor = tensor.cpu()
            elif not fresh and (partitioned or not share_cpu_weights):
                tensor = tensor.clone()  # ZeRO-3 frees gathered storage when its context exits
            named[name] = tensor

        lora_prefixes: list[str] = []
        for mod_name, mod in base.named_modules():
            if any(mod_name.startswith(p + ".") for p in lora_prefixes):
                continue  # base_layer / lora_A / lora_B inside an adapted layer: handled below
            if isinstance(mod, LoraLayer):
                lora_prefixes.append(mod_name)
                params = list(mod.parameters())
                with self._gathered(params):
                    if not keep:
                        continue
                    weight = mod.base_layer.weight.detach().clone()
                    for adapter in mod.active_adapters:
                        weight += mod.get_delta_weight(adapter).to(weight.dtype)
                    take(f"{mod_name}.weight", weight, fresh=True)
                    if getattr(mod.base_layer, "bias", None) is not None:
                        take(f"{mod_name}.bias", mod.base_layer.bias)
                continue
            direct = list(mod.named_parameters(recurse=False))
            if not direct:
                continue
            with self._gathered([p for _, p in direct]):
                if not keep:
                    continue
                for pname, p in direct:
                    take(f"{mod_name}.{pname}" if mod_name else pname, p)
        if not keep:
            return {}
        if nonfinite:
            raise ValueError(f"{self.name}: weight export refused: {len(nonfinite)} non-finite weight(s): "
                             f"{', '.join(nonfinite[:10])}{', ...' if len(nonfinite) > 10 else ''}")
        named = dict(revert_weight_conversion(base, named))
        return self._match_checkpoint_names(named)

    def _match_checkpoint_names(self, named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Keep exactly the checkpoint's tensor names: a tied lm_head absent from the checkpoint is
        dropped; anything else missing or extra is a bug and raises, naming the tensors."""
        from rollout.weights import checkpoint_shapes, local_model_dir

        expected = checkpoint_shapes(local_model_dir(self.policy_path))
        extra = sorted(set(named) - set(expected))
        tied = unwrap(self.module.policy).config.get_text_config().tie_word_embeddings or getattr(
            unwrap(self.module.policy).config, "tie_word_embeddings", False)
        if tied and "lm_head.weight" in extra:
            named.pop("lm_head.weight")
            extra.remove("lm_head.weight")
        missing = sorted(set(expected) - set(named))
        if extra or missing:
            raise RuntimeError(f"{self.name}: exported names differ from the checkpoint's: {len(missing)} missing "
                               f"{missing[:5]}, {len(extra)} unexpected {extra[:5]}")
        misshaped = [k for k, v in named.items() if tuple(v.shape) != tuple(expected[k])]
        if misshaped:
            raise RuntimeError(f"{self.name}: exported tensors with the wrong shape: {misshaped[:5]}")
        return {k: named[k] for k in expected}

    def save_adapter(self, name: str) -> ShippedFiles | None:
        """The policy adapter as peft `save_pretrained` writes it, as files (the rank may run on
        another host than whoever keeps or loads them). Every rank must call it (ZeRO-3 gathers the
        adapter weights); rank 0 returns the files, named `name`."""
        policy = self.module.policy
        if not is_peft(policy):
            raise RuntimeError(f"{self.name}: the policy has no LoRA adapter to export (learner.lora.enabled=false)")
        lora_params = [p for n, p in policy.named_parameters() if "lora_" in n]
        with self._gathered(lora_params):
            if self.rank != 0:
                return None
            tmp = scratch_dir("adapter")
            policy.save_pretrained(str(tmp), safe_serialization=True)
        try:
            # peft records where the base came from; point it at the policy the learner trains.
            cfg_path = tmp / "adapter_config.json"
            cfg = json.loads(cfg_path.read_text())
            cfg["base_model_name_or_path"] = self.policy_name
            cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
            return pack_dir(tmp, origin=name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    # -- checkpoints ----------------------------------------------------------------------------

    def save_checkpoint(self, client_state: dict | None = None) -> ShippedFiles:
        """This rank's part of a checkpoint (DeepSpeed's files: trainable weights, its optimizer
        shard, LR schedule; plus its RNG states), written on its own host and returned as files:
        the group puts every rank's files together wherever the run keeps checkpoints."""
        state = {"docrl": {"optimizer_steps": self.optimizer_steps, "skipped_steps": self.skipped_steps,
                           **(client_state or {})}}
        directory = scratch_dir("checkpoint")
        try:
            # Frozen weights come from the policy path at load time: a LoRA checkpoint stays small.
            self.engine.save_checkpoint(str(directory), tag=DS_TAG, client_state=state, save_latest=False,
                                        exclude_frozen_parameters=True)
            rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                   "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
            torch.save(rng, directory / f"rng_rank{self.rank}.pt")
            return pack_dir(directory, origin=f"{self.name}'s checkpoint")
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    def load_checkpoint(self, checkpoint: str | ShippedFiles) -> dict:
        """Load a checkpoint the group sent as files (or, in process, a directory of this host)."""
        if isinstance(checkpoint, ShippedFiles):
            directory = scratch_dir("checkpoint")
            try:
                land(checkpoint, directory / "c")
                return self._load_checkpoint(str(directory / "c"))
            finally:
                shutil.rmtree(directory, ignore_errors=True)
        return self._load_checkpoint(checkpoint)

    def _load_checkpoint(self, directory: str) -> dict:
        _, client_state = self.engine.load_checkpoint(directory, tag=DS_TAG, load_module_strict=False,
                                                      load_optimizer_states=True, load_lr_scheduler_states=True)
        if client_state is None:
            raise FileNotFoundError(f"{self.name}: no DeepSpeed checkpoint under {directory}/{DS_TAG}")
        rng_file = Path(directory) / f"rng_rank{self.rank}.pt"
        if not rng_file.exists():
            raise FileNotFoundError(f"{self.name}: {rng_file} is missing (checkpoint from a different number of ranks?)")
        rng = torch.load(rng_file, weights_only=False)
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        state = dict(client_state["docrl"])
        self.optimizer_steps = int(state.pop("optimizer_steps"))
        self.skipped_steps = int(state.pop("skipped_steps"))
        return state


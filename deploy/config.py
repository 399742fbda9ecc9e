"""The `serve` config section: the Ray Serve application over the trained policy and the index.

Three deployments (`deploy/app.py`): the HTTP ingress, the retriever (encoder + saved index) and the
policy (vLLM). Each has its own replicas, autoscaling and resources here; `serve deploy` YAML
files may override them per deployment as Serve allows.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from common.schema import Section


class AutoscalingConfig(Section):
    """Serve's request-based autoscaling: replicas between the bounds, aiming at this many
    requests in flight per replica."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(8.0, gt=0.0)

    @model_validator(mode="after")
    def _ordered(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas={self.min_replicas} exceeds max_replicas={self.max_replicas}")
        return self


class DeploymentConfig(Section):
    """One Serve deployment: a fixed replica count, or autoscaling when `autoscaling` is set."""

    num_replicas: int = Field(1, ge=1)
    autoscaling: AutoscalingConfig | None = None
    num_cpus: float = Field(1.0, ge=0.0)
    num_gpus: float = Field(0.0, ge=0.0)
    max_ongoing_requests: int = Field(64, ge=1)  # per replica; more wait in Serve's queue
    # How many more may wait in that queue (at each caller: Serve's proxy for the ingress, the
    # ingress for the others); beyond it a request is refused at once with 503 and Retry-After
    # instead of waiting. -1: no limit.
    max_queued_requests: int = Field(-1, ge=-1)
    retry_after_s: float = Field(1.0, ge=0.0)  # the Retry-After such a 503 carries
    # custom Ray resources per replica, to choose its nodes (e.g. {"inference_node": 1})
    resources: dict[str, float] = {}

    def serve_options(self) -> dict:
        """Keyword arguments for `Deployment.options(...)`."""
        actor = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus, **({"resources": self.resources} if self.resources else {})}
        opts: dict = {"max_ongoing_requests": self.max_ongoing_requests, "ray_actor_options": actor}
        if self.max_queued_requests >= 0:
            opts["max_queued_requests"] = self.max_queued_requests
            opts["backpressure_config"] = {"status_code": 503, "retry_after_s": self.retry_after_s}
        if self.autoscaling is not None:
            opts["autoscaling_config"] = self.autoscaling.model_dump()
        else:
            opts["num_replicas"] = self.num_replicas
        return opts


class PolicyDeploymentConfig(DeploymentConfig):
    """The policy's deployment: its replicas run vLLM."""

    # The C allocator of a CPU replica's process. Under glibc's malloc the engine's resident memory
    # kept growing for as long as it served (by about 3% per 12,000 requests after the first
    # 3,000, measured with the engine alone); with tcmalloc, which vLLM's CPU guide recommends, it
    # stayed flat (benchmarks/RESULTS.md: the engine alone, and the soak). "tcmalloc" preloads it (LD_PRELOAD) where the
    # library is installed (Debian: libtcmalloc-minimal4) and warns where it is not; "glibc" does not.
    # A replica with a GPU keeps the system allocator.
    allocator: Literal["tcmalloc", "glibc"] = "tcmalloc"


class IngressConfig(DeploymentConfig):
    """The HTTP ingress mostly waits on the other two: little CPU, many requests in flight."""

    num_cpus: float = Field(0.25, ge=0.0)
    max_ongoing_requests: int = Field(256, ge=1)


class LimitsConfig(Section):
    """What one request may ask for. Over a limit: a 4xx naming the limit, never a 500."""

    max_request_bytes: int = Field(8 * 1024 * 1024, ge=1024)  # the HTTP body, base64 images included
    max_images_per_request: int = Field(4, ge=1)
    max_image_pixels: int = Field(4096 * 4096, ge=28 * 28)  # width * height of one decoded image
    max_messages: int = Field(64, ge=1)
    max_question_chars: int = Field(4000, ge=1)  # a /v1/docqa question
    max_k: int = Field(20, ge=1)  # pages a /v1/docqa request may ask to cite
    max_tokens: int = Field(1024, ge=1)  # cap on a request's max_tokens
    max_n: int = Field(4, ge=1)  # completions per chat request


class ServeConfig(Section):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    model_name: str = "docrl"  # the id /v1/models lists and requests must name
    api_key_env: str | None = None  # name of the environment variable holding the bearer key; None: no auth
    request_timeout_s: float = Field(120.0, gt=0.0)  # one request end to end, inside the server
    default_max_tokens: int = Field(256, ge=1)  # a chat request that names no max_tokens
    pages_folder: str | None = None  # re-render PDF pages of an index built with `docrl index --folder`
    # how often each ingress replica sets the docrl_feedback_* gauges (when feedback.enabled)
    feedback_metrics_interval_s: float = Field(5.0, gt=0.0)
    ingress: IngressConfig = IngressConfig()
    retriever: DeploymentConfig = DeploymentConfig()
    policy: PolicyDeploymentConfig = PolicyDeploymentConfig()
    # The policy replica's vLLM engine (deploy/policy_engine.py): "in_process" steps vLLM's engine in
    # a thread of the replica; "async_llm" is vLLM's AsyncLLM, its engine core in processes of its
    # own (as vLLM's own server). Measured on a 2-core CPU machine, in_process was the faster one.
    policy_engine: Literal["in_process", "async_llm"] = "in_process"
    limits: LimitsConfig = LimitsConfig()

    @model_validator(mode="after")
    def _default_within_cap(self) -> ServeConfig:
        if self.default_max_tokens > self.limits.max_tokens:
            raise ValueError(f"default_max_tokens={self.default_max_tokens} exceeds limits.max_tokens={self.limits.max_tokens}")
        return self

"""The `serve` config section: the Ray Serve application over the trained policy and the index."""

from __future__ import annotations

from pydantic import Field

from cluster.schema import Section


class ServeConfig(Section):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    model_name: str = "docrl"
    api_key_env: str | None = None  # name of the environment variable holding the bearer key
    policy_replicas: int = Field(1, ge=1)
    retriever_replicas: int = Field(1, ge=1)
    num_gpus_per_policy_replica: float = Field(0.0, ge=0.0)
    max_request_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    max_images_per_request: int = Field(4, ge=1)
    max_image_pixels: int = Field(4096 * 4096, ge=28 * 28)

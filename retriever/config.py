"""The `retriever` config section: the ColPali-family model, the page index, and its actors."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from common.schema import Section


class RetrieverConfig(Section):
    model: str = "tiny"  # "tiny" (built locally), a local path, or a hub id such as vidore/colqwen2-v1.0
    model_class: Literal["auto", "colqwen2", "colqwen2_5", "colpali"] = "auto"
    dtype: Literal["float32", "bfloat16"] = "float32"
    index_dir: str | None = None  # default <run.output_dir>/index
    top_k: int = Field(1, ge=1)
    use_gold_page: bool = False  # ablation: hand the policy the gold page instead of retrieving
    num_actors: int = Field(1, ge=1)
    num_gpus_per_actor: float = Field(0.0, ge=0.0)
    num_cpus_per_actor: float = Field(1.0, gt=0.0)
    embed_batch_size: int = Field(8, ge=1)
    query_batch_size: int = Field(32, ge=1)
    max_visual_tokens: int | None = Field(None, ge=4)  # caps page resolution (pixels = n * 28 * 28)

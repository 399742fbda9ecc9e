"""RetrieverActor: a Ray actor holding one shard of the page index and the encoder (thin shell)."""

from __future__ import annotations

import os

import ray

from docvqa.sample import Page
from retriever.config import RetrieverConfig


@ray.remote
class RetrieverActor:
    def __init__(self, model_path: str, cfg: RetrieverConfig):
        import torch

        from retriever.encoder import PageEncoder
        from retriever.index import PageIndex

        torch.set_num_threads(max(1, int(cfg.num_cpus_per_actor)))
        device = "cuda" if cfg.num_gpus_per_actor > 0 and torch.cuda.is_available() else "cpu"
        self.cfg = cfg
        self.encoder = PageEncoder(model_path, cfg.model_class, cfg.dtype, device, cfg.max_visual_tokens)
        self.index = PageIndex(self.encoder.settings())

    def add_pages(self, pages: list[Page]) -> int:
        images = [p.load_image() for p in pages]
        vectors = self.encoder.embed_images(images, batch_size=self.cfg.embed_batch_size)
        self.index.add([p.page_id for p in pages], vectors)
        return len(self.index)

    def search(self, queries: list[str], k: int) -> list[list[tuple[str, float]]]:
        import torch

        vectors = self.encoder.embed_queries(queries, batch_size=self.cfg.query_batch_size)
        dtype = torch.bfloat16 if self.cfg.dtype == "bfloat16" else torch.float32
        return self.index.search(vectors, k, dtype=dtype)

    def size(self) -> int:
        return len(self.index)

    def pid(self) -> int:
        return os.getpid()

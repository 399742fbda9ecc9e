"""RetrieverActor: one shard of the page index and its encoder, as a thin Ray actor."""

from __future__ import annotations

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
        self.search_dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32

    def settings(self) -> dict:
        return self.encoder.settings()

    def add_pages(self, pages: list[Page], segment_dir: str | None = None, segment_name: str | None = None) -> dict:
        """Embed pages into this shard (and into a new segment file when `segment_dir` is given).

        Returns {"added": n, "skipped": ["page id: reason", ...], "segment": manifest entry or None,
        "meta": {page_id: metadata}}. Unreadable pages are skipped and named, never fatal.
        """
        from retriever.index import write_segment

        images, kept, skipped = [], [], []
        for page in pages:
            try:
                images.append(page.load_image())
                kept.append(page)
            except OSError as e:
                skipped.append(f"{page.page_id}: {e}")
        vectors = self.encoder.embed_images(images, batch_size=self.cfg.embed_batch_size, names=[p.page_id for p in kept])
        meta = [{"doc_id": p.doc_id, "page_no": p.page_no, "source": p.source} for p in kept]
        self.index.add([p.page_id for p in kept], vectors, meta)
        segment = None
        if segment_dir is not None and kept:
            segment = write_segment(segment_dir, segment_name, [p.page_id for p in kept], vectors)
        return {"added": len(kept), "skipped": skipped, "segment": segment,
                "meta": {p.page_id: m for p, m in zip(kept, meta)}}

    def clear(self) -> None:
        from retriever.index import PageIndex

        self.index = PageIndex(self.encoder.settings())

    def load_shard(self, index_dir: str, page_range: tuple[int, int]) -> int:
        from retriever.index import load_index

        index = load_index(index_dir, page_range)
        index.check_compatible(self.encoder.settings(), where=index_dir)
        self.index = index
        return len(index)

    def delete_pages(self, page_ids: list[str]) -> list[str]:
        return self.index.delete(page_ids)

    def search(self, queries: list[str], k: int) -> list[list[tuple[str, float]]]:
        vectors = self.encoder.embed_queries(queries, batch_size=self.cfg.query_batch_size)
        return self.index.search(vectors, k, dtype=self.search_dtype)

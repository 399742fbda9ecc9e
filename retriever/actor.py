"""RetrieverActor: one shard of the page index and its encoder, as a thin Ray actor."""

from __future__ import annotations

import ray

from common.ray_helpers import task_device
from common.shipping import ShippedFiles, local_copy, model_dir, model_name, scratch_dir
from docvqa.sample import Page
from retriever.config import RetrieverConfig


@ray.remote
class RetrieverActor:
    def __init__(self, model: str | ShippedFiles, cfg: RetrieverConfig):
        import torch

        from retriever.encoder import PageEncoder
        from retriever.index import PageIndex

        torch.set_num_threads(max(1, int(cfg.num_cpus_per_actor)))
        device = task_device(cfg.num_gpus_per_actor)
        self.cfg = cfg
        self.encoder = PageEncoder(model_dir(model), cfg.model_class, cfg.dtype, device, cfg.max_visual_tokens,
                                   name=model_name(model))
        self.index = PageIndex(self.encoder.settings(), cfg.pooling())
        self.search_dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
        self.scratch = scratch_dir("retriever-segments")  # the segments this actor writes and maps
        # retriever.learn: the query adapter searches go through (version 0: none, the model as it is);
        # the actor that trains it (the group's first) holds it inside its AdapterLearner
        self.adapter = None
        self.adapter_version = 0
        self.learner = None

    def settings(self) -> dict:
        return self.encoder.settings()

    def add_pages(self, pages: list[Page], segment_name: str | None = None, keep: bool = True) -> dict:
        """Embed pages into a new segment file named `segment_name` when one is given, and into
        this shard unless `keep` is False (a streaming build: the group maps the finished index
        afterwards). The segment is written on this actor's own host and returned as bytes: the
        group persists it in the index directory, which may be on another host.

        Images are decoded one embedding batch at a time, so memory is bounded by the batch (and
        the vectors of this call), not by the pages. Returns {"added": n, "skipped": ["page id:
        reason", ...], "segment": manifest entry or None, "segment_bytes": the file or None,
        "meta": {page_id: metadata}}. Unreadable pages are skipped and named, never fatal.
        """
        from retriever.index import write_segment

        if keep:
            self.index.refuse_present([p.page_id for p in pages])
        kept, skipped, vectors = [], [], []
        step = self.cfg.embed_batch_size
        for i in range(0, len(pages), step):
            images, batch = [], []
            for page in pages[i:i + step]:
                try:
                    images.append(page.load_image())
                    batch.append(page)
                except OSError as e:
                    skipped.append(f"{page.page_id}: {e}")
            vectors += self.encoder.embed_images(images, batch_size=step, names=[p.page_id for p in batch], progress=False)
            kept += batch
        ids = [p.page_id for p in kept]
        meta = {p.page_id: {"doc_id": p.doc_id, "page_no": p.page_no, "source": p.source} for p in kept}
        segment = data = None
        if segment_name is not None and kept:
            segment = write_segment(self.scratch, segment_name, ids, vectors, dtype=self.cfg.vector_dtype,
                                    pooling=self.cfg.pooling())
            data = (self.scratch / segment_name).read_bytes()
        if keep and segment is not None:
            del vectors  # the shard maps the segment just written instead of holding a second copy
            self.index.add_segment(self.scratch, segment, meta)
        else:
            if keep:
                self.index.add(ids, vectors, [meta[pid] for pid in ids])
            if segment is not None:
                (self.scratch / segment_name).unlink()
        return {"added": len(kept), "skipped": skipped, "segment": segment, "segment_bytes": data, "meta": meta}

    def clear(self) -> None:
        from retriever.index import PageIndex

        self.index = PageIndex(self.encoder.settings(), self.cfg.pooling())

    def load_shard(self, shard: ShippedFiles, page_range: tuple[int, int]) -> int:
        """Map pages [lo, hi) of `shard` (a manifest and the segment files holding those pages,
        sent by the group) from a copy on this host."""
        from retriever.index import load_index

        index = load_index(local_copy(shard), page_range, self.cfg.pooling())
        index.check_compatible(self.encoder.settings(), where=shard.origin)
        self.index = index
        return len(index)

    def delete_pages(self, page_ids: list[str]) -> list[str]:
        return self.index.delete(page_ids)

    def search(self, queries: list[str], k: int,
               candidates: list[list[str]] | None = None) -> list[list[tuple[str, float]]]:
        vectors = self._query_vectors(queries)
        return self.index.search(vectors, k, dtype=self.search_dtype, method=self.cfg.search_method(len(self.index)),
                                 shortlist=self.cfg.shortlist, candidates=candidates)

    def _query_vectors(self, queries: list[str]) -> list:
        from retriever.page_policy import adapt_queries

        return adapt_queries(self.adapter, self.encoder.embed_queries(queries, batch_size=self.cfg.query_batch_size))

    # -- retriever.learn ------------------------------------------------------------------------

    def _new_learner(self, dim: int):
        from retriever.page_policy import AdapterLearner

        learn = self.cfg.learn
        return AdapterLearner(dim, learn.learning_rate, learn.temperature, learn.weight_cap, learn.max_grad_norm,
                              loss=learn.loss, contrastive_temperature=learn.contrastive_temperature,
                              reward_temperature=learn.reward_temperature)

    def page_vectors(self, page_ids: list[str]) -> dict:
        """The vectors of those of `page_ids` this shard holds (the others are another shard's)."""
        return {pid: self.index.page_vectors(pid) for pid in page_ids if pid in self.index}

    def learn_pages(self, batch, page_vectors: dict) -> tuple[dict, dict]:
        """One adapter update (retriever.page_policy.AdapterLearner) on a PageUpdateBatch, given
        every candidate's vectors; returns the metrics and the learner's new state (adapter
        weights, optimizer, version)."""
        if self.learner is None:  # the first update of a run (a resumed one has loaded its state)
            self.learner = self._new_learner(self.encoder.settings()["dim"])
        missing = sorted({pid for cands in batch.candidates for pid in cands} - set(page_vectors))
        if missing:
            raise ValueError(f"retriever.learn: no vectors for candidate pages {missing[:5]} (not in the index)")
        queries = self.encoder.embed_queries(batch.queries, batch_size=self.cfg.query_batch_size)
        metrics = self.learner.update(batch, queries, [[page_vectors[pid] for pid in cands] for cands in batch.candidates])
        self.adapter, self.adapter_version = self.learner.adapter, self.learner.version
        return metrics, self.learner.state()

    def set_query_adapter(self, weights: dict, version: int) -> int:
        """Search with this adapter from now on."""
        from retriever.page_policy import QueryAdapter

        self.adapter = QueryAdapter.from_weights(weights)
        self.adapter_version = version
        return version

    def load_learner_state(self, state: dict) -> int:
        self.learner = self._new_learner(state["adapter"]["weight"].shape[0])
        self.learner.load(state)
        self.adapter, self.adapter_version = self.learner.adapter, self.learner.version
        return self.adapter_version

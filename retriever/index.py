"""An in-memory multi-vector page index searched with exact masked MaxSim."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from retriever.maxsim import maxsim_scores, pad_multivectors, topk_pages


class PageIndex:
    """Page ids and their multi-vectors (one [tokens, dim] tensor per page), kept padded for search."""

    def __init__(self, settings: dict):
        self.settings = dict(settings)
        self.page_ids: list[str] = []
        self.vectors: list[torch.Tensor] = []
        self._padded: tuple[torch.Tensor, torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.page_ids)

    def add(self, page_ids: Sequence[str], vectors: Sequence[torch.Tensor]) -> None:
        if len(page_ids) != len(vectors):
            raise ValueError(f"{len(page_ids)} page ids but {len(vectors)} embeddings")
        known = set(self.page_ids)
        for pid, v in zip(page_ids, vectors):
            if pid in known:
                raise ValueError(f"page {pid} is already in the index (delete it first to re-embed)")
            if v.ndim != 2 or v.shape[0] == 0:
                raise ValueError(f"page {pid}: embedding has shape {tuple(v.shape)}; expected [tokens>0, dim]")
            known.add(pid)
        self.page_ids += list(page_ids)
        self.vectors += [v.float() for v in vectors]
        self._padded = None

    def delete(self, page_ids: Sequence[str]) -> int:
        drop = set(page_ids)
        keep = [i for i, p in enumerate(self.page_ids) if p not in drop]
        removed = len(self.page_ids) - len(keep)
        self.page_ids = [self.page_ids[i] for i in keep]
        self.vectors = [self.vectors[i] for i in keep]
        self._padded = None
        return removed

    def search(self, queries: Sequence[torch.Tensor], k: int, dtype: torch.dtype = torch.float32) -> list[list[tuple[str, float]]]:
        if not self.page_ids:
            raise ValueError("the page index is empty")
        if self._padded is None:
            self._padded = pad_multivectors(self.vectors)
        pages, page_mask = self._padded
        q, q_mask = pad_multivectors(list(queries))
        scores = maxsim_scores(q, q_mask, pages, page_mask, dtype=dtype)
        return topk_pages(scores, self.page_ids, k)

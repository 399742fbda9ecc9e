"""Ranking metrics of retrieved page lists against gold pages (one gold page per question in DocVQA).

Pure Python; used by the retriever's evaluation and by the reward's retrieval component.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence


def hit_at_k(retrieved: Sequence[str], gold: str | Iterable[str], k: int) -> float:
    """1.0 when a gold page is among the first k retrieved, else 0.0."""
    gold_set = {gold} if isinstance(gold, str) else set(gold)
    return 1.0 if any(p in gold_set for p in retrieved[:k]) else 0.0


def reciprocal_rank(retrieved: Sequence[str], gold: str | Iterable[str]) -> float:
    """1 / (1-based rank of the first gold page), 0.0 when none was retrieved."""
    gold_set = {gold} if isinstance(gold, str) else set(gold)
    for rank, page in enumerate(retrieved, start=1):
        if page in gold_set:
            return 1.0 / rank
    return 0.0


def ndcg_at_k(retrieved: Sequence[str], gold: str | Iterable[str], k: int) -> float:
    """Binary-relevance NDCG@k: sum of 1/log2(rank+1) over gold pages in the top k, over the ideal."""
    gold_set = {gold} if isinstance(gold, str) else set(gold)
    if not gold_set or k <= 0:
        return 0.0
    dcg = sum(1.0 / math.log2(rank + 1) for rank, page in enumerate(retrieved[:k], start=1) if page in gold_set)
    ideal = sum(1.0 / math.log2(rank + 1) for rank in range(1, min(k, len(gold_set)) + 1))
    return dcg / ideal


def retrieval_report(runs: Sequence[Sequence[str]], golds: Sequence[str], ks: Sequence[int] = (1, 3, 5)) -> dict[str, float]:
    """Mean recall@k (= hit@k with one gold page), MRR and NDCG@k over a split."""
    if len(runs) != len(golds):
        raise ValueError(f"{len(runs)} retrieved lists but {len(golds)} gold pages")
    n = max(len(runs), 1)
    report = {"mrr": sum(reciprocal_rank(r, g) for r, g in zip(runs, golds)) / n}
    for k in ks:
        report[f"recall@{k}"] = sum(hit_at_k(r, g, k) for r, g in zip(runs, golds)) / n
        report[f"ndcg@{k}"] = sum(ndcg_at_k(r, g, k) for r, g in zip(runs, golds)) / n
    return report

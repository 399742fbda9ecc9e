"""Retrieval quality of an index against the gold pages of a split (recall@k, MRR, NDCG@k)."""

from __future__ import annotations

from collections.abc import Sequence

from docvqa.sample import DocVQASample
from retriever.metrics import retrieval_report


def scope_candidates(samples: Sequence[DocVQASample], scope: str) -> list[tuple[str, ...]] | None:
    """What each question is searched among (`retriever.scope`): its own document's pages, or
    None, every page of the index."""
    return [s.doc_pages for s in samples] if scope == "document" else None


def evaluate_retrieval(group, samples: Sequence[DocVQASample], ks: Sequence[int] = (1, 3, 5),
                       scope: str = "corpus") -> dict[str, float]:
    """Search every question of `samples` with a RetrieverGroup (over the corpus, or within its
    document: `retriever.scope`) and score the ranking. Questions without a gold page are left
    out: nothing says what they should find."""
    samples = [s for s in samples if s.gold_page is not None]
    runs = group.search([s.question for s in samples], max(ks), scope_candidates(samples, scope))
    report = retrieval_report([[pid for pid, _ in r] for r in runs], [s.gold_page for s in samples], ks)
    report["num_questions"] = len(samples)
    return report

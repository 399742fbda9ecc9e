"""Token pooling: a page's multi-vector summarised by a few vectors, the first stage of two-stage search.

A ColPali-family page has ~700 token vectors, many of them near-duplicates (background patches,
repeated text). Spherical k-means groups a page's tokens into clusters and keeps each cluster's
normalised mean: MaxSim against those few vectors approximates MaxSim against the tokens (a query
token close to some page token is close to that token's cluster direction) at a fraction of the
memory and the work. It only chooses a shortlist; the shortlist is then scored exactly
(`retriever.maxsim.rerank_shortlist`), so pooling decides which pages are looked at, never their
scores.

How many vectors a page gets follows its content (`Pooling`): centroids are chosen by
farthest-point sampling, the page's first token, then again and again the token least similar to
every token chosen so far, until every token has a chosen one within cosine `similarity`, or
`max_vectors` are chosen. A blank page then gets a vector or two, a dense page up to the cap, and
each distinct kind of content gets a vector before repeats of the background do (on the
clustered vectors of `benchmarks/bench_index_scale.py`: 60 vectors a page on average, and recall@10
1.000 of exact search at 10,000 pages; benchmarks/RESULTS.md, "Index at scale").
A few k-means steps then move each centroid to the mean of its tokens. Deterministic: ties go
to the lower token or cluster, and a cluster that loses all its tokens keeps its vector.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from retriever.maxsim import pad_multivectors

# Pages clustered together as one padded batch: their [32, ~800, ~800] float32 similarities are ~80 MB.
_BATCH_PAGES = 32


@dataclass(frozen=True)
class Pooling:
    """At most `max_vectors` a page; fewer when every token has one within cosine `similarity`
    (similarity > 1: always `max_vectors`, or all the tokens of a shorter page)."""

    max_vectors: int = 128
    similarity: float = 0.5
    iterations: int = 3

    def __post_init__(self) -> None:
        if self.max_vectors < 1:
            raise ValueError(f"pooled vectors per page must be >= 1, got {self.max_vectors}")


def pool_tokens(pages: Sequence[Tensor], pooling: Pooling) -> list[Tensor]:
    """Per page, its pooled unit vectors (float32 [n, D], 1 <= n <= max_vectors)."""
    out: list[Tensor] = []
    with torch.inference_mode():
        for b in range(0, len(pages), _BATCH_PAGES):
            out += _kmeans([p.float() for p in pages[b:b + _BATCH_PAGES]], pooling)
    return out


def _kmeans(pages: list[Tensor], pooling: Pooling) -> list[Tensor]:
    """Farthest-point sampling, then spherical k-means, of each page's tokens, batched over padded pages."""
    x, mask = pad_multivectors(pages)  # [n, L, D], zeros at padding
    n, length = mask.shape
    k = min(pooling.max_vectors, length)
    rows = torch.arange(n)
    gram = torch.bmm(x, x.transpose(1, 2))  # [n, L, L], once: each sample below is a gather, not a pass over x
    gram.masked_fill_(~mask[:, None, :], float("inf"))  # padding is never the least covered token
    start = torch.zeros(n, k, dtype=torch.long)
    coverage = torch.full((n, k), float("inf"))  # after j + 1 samples: the least covered token's similarity
    closest = torch.full(mask.shape, float("-inf"))  # each token's similarity to its most similar chosen one
    # few ops per step: on a shared machine each parallel op can wait ms at a thread barrier
    for j in range(k):
        closest = torch.maximum(closest, gram[rows, start[:, j]])
        worst = closest.min(dim=1)
        coverage[:, j] = worst.values
        if j + 1 == k or (j % 8 == 7 and bool((coverage[:, :j + 1].amax(dim=1) >= pooling.similarity).all())):
            break
        start[:, j + 1] = worst.indices
    del gram
    # centroids each page keeps: until its tokens are covered, or all of a short page's tokens are chosen
    enough = (coverage >= pooling.similarity) | (torch.arange(1, k + 1)[None, :] >= mask.sum(dim=1, keepdim=True))
    count = torch.where(enough.any(dim=1), enough.int().argmax(dim=1) + 1, k)
    centroids = torch.gather(x, 1, start[..., None].expand(-1, -1, x.shape[2]))
    active = torch.arange(k)[None, :] < count[:, None]  # [n, k]
    weight = mask[..., None].float()
    assign = None
    for _ in range(pooling.iterations):
        sims = torch.bmm(x, centroids.transpose(1, 2)).masked_fill_(~active[:, None, :], float("-inf"))
        new_assign = sims.argmax(dim=2)  # [n, L]
        if assign is not None and torch.equal(new_assign, assign):
            break
        assign = new_assign
        members = torch.nn.functional.one_hot(assign, k).float() * weight  # padded tokens belong nowhere
        sums = torch.bmm(members.transpose(1, 2), x)  # [n, k, D]
        counts = members.sum(dim=1)[..., None]
        centroids = torch.where(counts > 0, torch.nn.functional.normalize(sums, dim=2), centroids)
    return [c[:m] for c, m in zip(centroids, count.tolist())]

"""Exact, masked, chunked late-interaction (MaxSim) scoring and deterministic top-k. Torch and numpy, no Ray.

    score(q, p) = sum over valid query tokens i of  max over valid page tokens j of <q_i, p_j>

Why not colpali-engine's ``score_multi_vector`` (or transformers' ``score_retrieval``): they
zero-pad pages and apply no mask, so a padded page token scores 0 and beats real negative
similarities (wrong ranking for short pages); NaNs that ColQwen2 + SDPA leave at left-padded
positions also leak into every score. Here:

* padded positions never take part: query padding is dropped before the matmul (only valid query
  tokens are gathered), padded page vectors are replaced by zeros with ``torch.where`` (never a
  multiply: NaN * 0 = NaN) and their similarities are set to ``-inf`` before the max over page
  tokens (a chunk without padding skips that pass);
* a page or query without a single valid token is refused (``ValueError``) instead of scoring
  ``-inf`` / ``0``; a NaN or inf at a *valid* position is refused too (the scores would be
  meaningless);
* the matmul runs in ``dtype`` (float32, bfloat16 or float64) over chunks of pages, so memory is
  bounded by ``valid_query_tokens x chunk_tokens`` whatever the corpus size; the max is taken in
  ``dtype`` (exact: a max only selects), the sum over query tokens is accumulated in float32
  (float64 for float64 inputs) and the result is float32.

Layout (measured on 2 AVX512/AVX512-BF16 cores, 32 queries x 1,000 pages x 600-800 tokens x 128):
valid query tokens flattened ``[Tq, D]`` times a chunk of pages flattened ``[C*L, D]`` transposed
gives ``[Tq, C*L]`` (MKL/oneDNN reads the transposed view directly), amax over the contiguous last
dim, then ``index_add_`` per query. Each chunk is trimmed to the column span that holds valid
tokens (works for left and right padding). ``prepare_pages`` sanitises, casts and length-sorts a
padded corpus once, for one searched many times: chunks of similar length then carry almost no
padding. (The page index uses the packed layout below instead, which has no padding at all.)

Top-k and ties: ``topk_pages`` orders by score descending, ties broken by page order (lower page
index first), deterministically (``torch.topk`` alone gives no such guarantee). ``merge_topk``
merges per-shard top-k lists of a corpus sharded **contiguously, shards given in corpus order**:
it sorts by (score desc, shard index, rank within the shard's list), which is exactly
(score desc, global page index) because within a shard the list is already ordered by local index
on ties and the shards' index ranges are increasing. Every page of the global top-k is in its
shard's top-k (fewer than k pages beat it globally, so fewer than k beat it in its shard), so the
merge equals searching the unsharded corpus, provided each shard returned its top-k with the same
(or a larger) k. A non-contiguous sharding would need the global page index carried instead.

bf16: the CPU matmul rounds its inputs and every dot product to bf16 (no fp32-output bf16 GEMM
on CPU in torch 2.13), so for L2-normalised vectors a query token's max moves by up to ~6e-3
(bound; ~5e-4 typical) and a score by up to that times the query's valid tokens. Ranking flips
only where fp32 scores are that close (random vectors: top-1/top-2 gaps down to 1e-3, so ~1 query
in 32 flips its top-1; ``rescore=True`` fixes that case at ~50% more time).

Threads: on a shared machine every parallel torch op ends in an OpenMP barrier that waits for a
descheduled thread (seen here: 5-10 ms per op instead of 0.2 ms with 2 threads on 2 busy cores);
give the retriever actor ``OMP_NUM_THREADS`` / ``torch.set_num_threads`` equal to its CPU share.

Packed pages (the page index's layout): ``maxsim_packed`` scores pages stored back to back without
padding, ``tokens [T, D]`` plus ``offsets [P + 1]`` (page p is ``tokens[offsets[p]:offsets[p + 1]]``),
which is how an index segment lies on disk, so a memory-mapped segment is scored in place: no
padded copy of the corpus, nothing held twice. A chunk of whole pages is one contiguous slice,
cast to ``dtype`` as it is read (a float16 segment is never widened as a whole); the max over each
page's tokens is one ``numpy.maximum.reduceat`` over the chunk's page starts (measured: within
noise of the matmul alone for one query; ``torch.segment_reduce`` was 2-4x slower). There is
no padding, so no mask and no NaN to guard against.

Exactness caveat: scores are exact up to float32 rounding of the GEMM (|diff| ~1e-6 against a
per-pair loop for unit vectors); they need not be bit-identical between different chunkings or
shardings, because the BLAS kernel may change with the matrix shape. For integer-valued embeddings
(as the tests use) every dot product is exact and everything is bit-identical.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "PreparedPages",
    "maxsim_packed",
    "maxsim_scores",
    "merge_topk",
    "pack_pages",
    "pad_multivectors",
    "prepare_pages",
    "rerank_shortlist",
    "topk_pages",
]

_COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float64)

# Auto chunking: pages per chunk so that one similarity block [query tokens, chunk tokens] holds
# about this many elements (fp32: 4 MiB; the dev machine has 1 MiB L2 per core, a shared L3).
# Measured (774 query tokens, 600-800-token pages): 0.5-2 M within noise of each other (there:
# 1 page per chunk, whose span trimming leaves no padding, so no where/-inf pass at all); blocks of
# >= 4 M elements lost up to 2x to cache misses.
_CHUNK_TARGET_ELEMENTS = 1_000_000


def pad_multivectors(vectors: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Right-pad a list of ``[L_i, D]`` multi-vectors into ``([N, Lmax, D], mask [N, Lmax] bool)``.

    Padded slots hold zeros and ``mask`` is False there. An empty ``[0, D]`` entry is allowed here
    (its mask row is all False) but ``maxsim_scores`` refuses it.
    """
    if isinstance(vectors, Tensor):
        raise TypeError("pad_multivectors takes a list of [L_i, D] tensors, not a tensor")
    vectors = list(vectors)
    if not vectors:
        raise ValueError("pad_multivectors needs at least one tensor (the embedding dim is unknown otherwise)")
    first = vectors[0]
    for i, v in enumerate(vectors):
        if not isinstance(v, Tensor) or v.dim() != 2:
            raise ValueError(f"entry {i}: expected a 2-D [L, D] tensor, got {type(v).__name__} "
                             f"with shape {tuple(getattr(v, 'shape', ()))}")
        if v.shape[1] != first.shape[1] or v.dtype != first.dtype or v.device != first.device:
            raise ValueError(f"entry {i}: shape/dtype/device {tuple(v.shape)}/{v.dtype}/{v.device} does not match "
                             f"entry 0 ({tuple(first.shape)}/{first.dtype}/{first.device})")
    lengths = torch.tensor([v.shape[0] for v in vectors], device=first.device)
    lmax = int(lengths.max())
    padded = first.new_zeros(len(vectors), lmax, first.shape[1])
    for i, v in enumerate(vectors):
        padded[i, : v.shape[0]] = v
    mask = torch.arange(lmax, device=first.device)[None, :] < lengths[:, None]
    return padded, mask


@dataclass(frozen=True)
class PreparedPages:
    """A page corpus made ready for repeated scoring (see ``prepare_pages``).

    ``pages``: ``[P, L, D]`` in ``dtype``, zeros at padded slots, rows in ``order``;
    ``mask``: ``[P, L]`` bool in the same row order; ``order``: LongTensor ``[P]`` with the original
    page index of each stored row (None when stored in original order).
    """

    pages: Tensor
    mask: Tensor
    order: Tensor | None
    dtype: torch.dtype

    @property
    def num_pages(self) -> int:
        return self.pages.shape[0]

    @property
    def dim(self) -> int:
        return self.pages.shape[2]


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype not in _COMPUTE_DTYPES:
        raise ValueError(f"dtype must be one of {_COMPUTE_DTYPES}, got {dtype}")


def _as_padded(x: Tensor | Sequence[Tensor], mask: Tensor | None, what: str) -> tuple[Tensor, Tensor]:
    """Normalise (tensor, mask) / (tensor, None) / (list, None) into a padded tensor and a bool mask."""
    if not isinstance(x, Tensor):
        if mask is not None:
            raise ValueError(f"{what}: pass either a list of [L_i, D] tensors without a mask, "
                             "or a padded tensor and its mask")
        return pad_multivectors(x)
    if x.dim() != 3:
        raise ValueError(f"{what}: expected a [N, L, D] tensor, got shape {tuple(x.shape)}")
    if mask is None:
        mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    if mask.dtype != torch.bool:
        raise ValueError(f"{what}_mask must be a bool tensor, got {mask.dtype}")
    if tuple(mask.shape) != tuple(x.shape[:2]):
        raise ValueError(f"{what}_mask has shape {tuple(mask.shape)} but {what} has shape {tuple(x.shape)}")
    return x, mask.to(x.device)


def _refuse_empty(mask: Tensor, what: str) -> Tensor:
    """Return the valid-token count per row; raise when a row has none."""
    lengths = mask.sum(dim=1)
    empty = (lengths == 0).nonzero().flatten().tolist()
    if empty:
        shown = ", ".join(map(str, empty[:10])) + (", ..." if len(empty) > 10 else "")
        raise ValueError(f"{len(empty)} {what}(s) have no valid token (index {shown}): "
                         f"MaxSim of an empty {what} is undefined; drop it or fix its mask")
    return lengths


def prepare_pages(pages: Tensor | Sequence[Tensor], page_mask: Tensor | None = None, *,
                  dtype: torch.dtype = torch.float32, sort_by_length: bool = True) -> PreparedPages:
    """Validate, sanitise (zeros at padding, NaN-safe), cast and optionally length-sort a corpus once.

    Scores from ``maxsim_scores(..., prepared, None)`` come back in the original page order.
    Sorting by valid length makes chunks nearly padding-free (less matmul work) and costs nothing
    in exactness. The result holds its own copy (fp32: same size as the input, bf16: half); the
    caller may drop the original.
    """
    _check_dtype(dtype)
    with torch.inference_mode():
        pages, page_mask = _as_padded(pages, page_mask, "pages")
        lengths = _refuse_empty(page_mask, "page")
        order = None
        if sort_by_length and pages.shape[0] > 1:
            order = torch.sort(lengths, descending=True, stable=True).indices
            if bool((order == torch.arange(len(order), device=order.device)).all()):
                order = None
        if order is not None:
            pages, page_mask = pages[order], page_mask[order]
        # Cast first (cheaper for bf16), then select: where() never propagates the padded slot's NaN.
        sanitized = torch.where(page_mask[..., None], pages.to(dtype), 0).contiguous()
    return PreparedPages(pages=sanitized, mask=page_mask.contiguous(), order=order, dtype=dtype)


def _span(mask_chunk: Tensor) -> tuple[int, int]:
    """[lo, hi) columns of a chunk that hold at least one valid token (left or right padding)."""
    cols = mask_chunk.any(dim=0).nonzero()
    return int(cols[0]), int(cols[-1]) + 1


def maxsim_scores(queries: Tensor | Sequence[Tensor], query_mask: Tensor | None,
                  pages: Tensor | Sequence[Tensor] | PreparedPages, page_mask: Tensor | None, *,
                  page_chunk: int | None = None, dtype: torch.dtype | None = None,
                  rescore: bool = False) -> Tensor:
    """Exact masked MaxSim scores, float32 ``[num_queries, num_pages]``.

    queries: ``[Q, Lq, D]`` with ``query_mask [Q, Lq]`` bool (None: all valid), or a list of
    ``[L_i, D]`` tensors (mask None). pages: ``[P, Lp, D]`` with ``page_mask [P, Lp]`` likewise, or a
    ``PreparedPages`` (mask None). Either padding side works. ``page_chunk``: pages per chunk
    (None: sized automatically to keep the [valid query tokens, chunk tokens] block near 1 M
    elements; query tokens are tiled too when a single page would exceed that).
    ``dtype``: matmul dtype, float32 (default) / bfloat16 / float64; for ``PreparedPages`` it
    defaults to (and must equal) the prepared dtype.
    ``rescore`` (bfloat16 only, else ignored): the bf16 matmul only *selects* each query token's
    best page token; that pair's similarity is recomputed in fp32 from the caller's vectors (from the
    stored bf16 vectors for bf16 ``PreparedPages``), removing the bf16 rounding of the summed dot
    products. Measured at 32 x 1,000 x ~700 x 128 (unit vectors): mean |error| vs exact 2.2e-3 ->
    2.0e-4 for 50-75% more time (index-returning max is ~8x slower than amax on CPU). The max
    error stays ~6e-3 where a near-tie made bf16 pick another token.
    """
    if page_chunk is not None and (not isinstance(page_chunk, int) or page_chunk < 1):
        raise ValueError(f"page_chunk must be a positive int or None, got {page_chunk!r}")
    with torch.inference_mode():
        if isinstance(pages, PreparedPages):
            if page_mask is not None:
                raise ValueError("page_mask must be None with PreparedPages (the mask is inside)")
            if dtype is not None and dtype != pages.dtype:
                raise ValueError(f"pages were prepared in {pages.dtype}, but dtype={dtype} was requested")
            dtype = pages.dtype
            ptensor, pmask, order, sanitized = pages.pages, pages.mask, pages.order, True
        else:
            dtype = torch.float32 if dtype is None else dtype
            _check_dtype(dtype)
            ptensor, pmask = _as_padded(pages, page_mask, "pages")
            _refuse_empty(pmask, "page")
            order, sanitized = None, False
        qtensor, qmask = _as_padded(queries, query_mask, "queries")
        if qtensor.shape[2] != ptensor.shape[2]:
            raise ValueError(f"embedding dims differ: queries {qtensor.shape[2]}, pages {ptensor.shape[2]}")
        num_q, num_p = qtensor.shape[0], ptensor.shape[0]
        device = ptensor.device
        acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        out = torch.zeros(num_q, num_p, dtype=acc_dtype, device=device)
        if num_q == 0 or num_p == 0:
            return out.float()
        qlens = _refuse_empty(qmask, "query")

        # Only valid query tokens enter the matmul: padding (and any NaN in it) is never read.
        qmask = qmask.to(qtensor.device)
        qflat = qtensor[qmask].to(device=device, dtype=dtype)  # [Tq, D], row-major = query order
        seg = torch.repeat_interleave(torch.arange(num_q, device=device), qlens.to(device))  # [Tq]
        num_tok = qflat.shape[0]
        rescore = bool(rescore) and dtype == torch.bfloat16
        if rescore:
            qsrc = qtensor[qmask].to(device=device, dtype=torch.float32)

        lp = ptensor.shape[1]
        # Bound the [query tokens, chunk tokens] similarity block by _CHUNK_TARGET_ELEMENTS: tile the
        # query tokens only when a single page would overflow it, then fit pages into the rest.
        rows = num_tok if num_tok * lp <= _CHUNK_TARGET_ELEMENTS else max(1, _CHUNK_TARGET_ELEMENTS // lp)
        chunk = page_chunk or max(1, _CHUNK_TARGET_ELEMENTS // (rows * lp))
        best = torch.empty(num_tok, min(chunk, num_p), dtype=acc_dtype, device=device)
        for s in range(0, num_p, chunk):
            e = min(num_p, s + chunk)
            m = pmask[s:e]
            lo, hi = _span(m)  # trim columns that are padding in every page of the chunk
            m = m[:, lo:hi]
            pc = src = ptensor[s:e, lo:hi]
            padded = not bool(m.all())
            if not sanitized:
                pc = pc.to(dtype)  # cast first (cheaper for bf16), then select:
                if padded:  # where() never propagates a padded NaN (a multiply would: NaN * 0 = NaN)
                    pc = torch.where(m[..., None], pc, 0)
            c, length = pc.shape[0], pc.shape[1]
            pages_t = pc.reshape(c * length, -1).T  # [D, c*L]; BLAS reads the transposed view as is
            # -inf on padded page tokens (added: a plain vectorised pass, skipped without padding)
            bias = torch.zeros(c * length, dtype=dtype, device=device).masked_fill_(
                ~m.reshape(-1), float("-inf")) if padded else None
            for t0 in range(0, num_tok, rows):
                t1 = min(num_tok, t0 + rows)
                sim = torch.matmul(qflat[t0:t1], pages_t)  # [rows, c*L] in dtype
                if bias is not None:
                    sim.add_(bias)
                sim = sim.view(t1 - t0, c, length)
                if dtype == torch.bfloat16:
                    sim = sim.float()  # exact; and fp32 amax + the cast beat bf16 amax on CPU (~1.5x)
                if rescore:
                    # bf16 picked the best page token; its similarity is recomputed in fp32 from the
                    # caller's vectors (no bf16 rounding of the dot products that get summed)
                    idx = sim.max(dim=2).indices  # [rows, c]
                    chosen = src[torch.arange(c, device=device)[None, :], idx].float()  # [rows, c, D]
                    best[t0:t1, :c] = (chosen * qsrc[t0:t1, None, :]).sum(dim=2)
                else:
                    # max over page tokens (exact: it only selects); every page has a valid token
                    best[t0:t1, :c] = sim.amax(dim=2)
            out[:, s:e].index_add_(0, seg, best[:, :c])  # sum over each query's tokens

        if not bool(torch.isfinite(out).all()):
            bad = (~torch.isfinite(out)).nonzero()[:5].tolist()
            raise ValueError(f"non-finite MaxSim scores at (query, page) {bad}: a valid (unmasked) token "
                             "holds NaN/inf (check the encoder output and the masks)")
        if order is not None:
            out = torch.empty_like(out).index_copy_(1, order.to(device), out)
        return out.float()


def _check_k(k: int) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or k <= 0:
        raise ValueError(f"k must be a positive int, got {k!r}")


def topk_pages(scores: Tensor, page_ids: Sequence[str], k: int) -> list[list[tuple[str, float]]]:
    """Per query, the k best ``(page_id, score)`` sorted by score descending; ties by page index ascending.

    k larger than the corpus returns the whole corpus (sorted). NaN scores are refused.
    """
    _check_k(k)
    if scores.dim() != 2:
        raise ValueError(f"scores must be [num_queries, num_pages], got shape {tuple(scores.shape)}")
    num_q, num_p = scores.shape
    if len(page_ids) != num_p:
        raise ValueError(f"{len(page_ids)} page ids for {num_p} score columns")
    if bool(torch.isnan(scores).any()):
        raise ValueError("scores contain NaN; refusing to rank them")
    kk = min(k, num_p)
    if kk == 0:
        return [[] for _ in range(num_q)]
    scores = scores.detach()
    # Exact and deterministic: everything >= the k-th best value (ties at the boundary included),
    # then a stable descending sort of those candidates, which are in ascending page order.
    threshold = torch.topk(scores, kk, dim=1).values[:, -1:]
    results = []
    for row, cand in zip(scores, scores >= threshold):
        idx = cand.nonzero().flatten()
        vals, pos = torch.sort(row[idx], descending=True, stable=True)
        chosen = idx[pos[:kk]].tolist()
        results.append([(page_ids[i], float(v)) for i, v in zip(chosen, vals[:kk].tolist())])
    return results


def pack_pages(pages: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Concatenate ``[L_i, D]`` multi-vectors into the packed layout ``(tokens [sum L_i, D], offsets [n + 1])``."""
    pages = list(pages)
    if not pages:
        raise ValueError("pack_pages needs at least one tensor (the embedding dim is unknown otherwise)")
    offsets = torch.zeros(len(pages) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(torch.tensor([p.shape[0] for p in pages], dtype=torch.int64), 0)
    return torch.cat(pages), offsets


def _check_packed(tokens: Tensor, offsets: Tensor) -> np.ndarray:
    """The offsets as numpy, after checking that they cut `tokens` into non-empty pages."""
    if tokens.dim() != 2:
        raise ValueError(f"packed tokens must be [T, D], got shape {tuple(tokens.shape)}")
    offs = offsets.detach().cpu().numpy().astype(np.int64, copy=False)
    if offs.ndim != 1 or len(offs) < 1 or offs[0] != 0 or offs[-1] != tokens.shape[0]:
        raise ValueError(f"offsets must run from 0 to the {tokens.shape[0]} packed tokens, "
                         f"got {offs[:3].tolist()}...{offs[-3:].tolist()}")
    empty = np.flatnonzero(np.diff(offs) <= 0)
    if len(empty):
        raise ValueError(f"{len(empty)} packed page(s) have no token (index {', '.join(map(str, empty[:10]))}): "
                         "MaxSim of an empty page is undefined")
    return offs


def maxsim_packed(queries: Sequence[Tensor], tokens: Tensor, offsets: Tensor, *,
                  dtype: torch.dtype = torch.float32) -> Tensor:
    """Exact MaxSim of queries against packed pages, float32 ``[num_queries, num_pages]``.

    queries: a list of ``[L_i, D]`` tensors of valid tokens (as the encoder returns them).
    tokens ``[T, D]`` (any float dtype; a memory-mapped segment is read in place) and offsets
    ``[P + 1]``: page p is ``tokens[offsets[p]:offsets[p + 1]]``. The matmul runs in ``dtype``
    (float32, bfloat16 or float64), the max is exact and the sum is accumulated as in
    ``maxsim_scores``, whose results these equal up to GEMM rounding.
    """
    _check_dtype(dtype)
    offs = _check_packed(tokens, offsets)
    queries = list(queries)
    for i, q in enumerate(queries):
        if not isinstance(q, Tensor) or q.dim() != 2 or q.shape[0] == 0:
            raise ValueError(f"query {i}: expected a [L, D] tensor with at least one token, "
                             f"got shape {tuple(getattr(q, 'shape', ()))}")
        if q.shape[1] != tokens.shape[1]:
            raise ValueError(f"embedding dims differ: query {i} has {q.shape[1]}, pages {tokens.shape[1]}")
    num_q, num_p = len(queries), len(offs) - 1
    acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    out = torch.zeros(num_q, num_p, dtype=acc_dtype)
    if num_q == 0 or num_p == 0:
        return out.float()
    with torch.inference_mode():
        qflat = torch.cat([q.detach().cpu() for q in queries]).to(dtype)  # [Tq, D]
        seg = torch.repeat_interleave(torch.arange(num_q), torch.tensor([q.shape[0] for q in queries]))
        num_tok = qflat.shape[0]
        longest = int(np.diff(offs).max())
        # The same [query tokens, chunk tokens] bound as maxsim_scores: tile the query tokens only
        # when one page would overflow it, then take as many whole pages as fit.
        rows = num_tok if num_tok * longest <= _CHUNK_TARGET_ELEMENTS else max(1, _CHUNK_TARGET_ELEMENTS // longest)
        budget = max(1, _CHUNK_TARGET_ELEMENTS // rows)
        s = 0
        while s < num_p:
            e = min(num_p, max(s + 1, int(np.searchsorted(offs, offs[s] + budget, side="right")) - 1))
            t0, t1 = int(offs[s]), int(offs[e])
            pages_t = tokens[t0:t1].to(dtype).T  # [D, chunk tokens]; a view when already in dtype
            starts = offs[s:e] - t0
            for r0 in range(0, num_tok, rows):
                r1 = min(num_tok, r0 + rows)
                sim = torch.matmul(qflat[r0:r1], pages_t)
                sim = sim.numpy() if dtype == torch.float64 else sim.float().numpy()
                best = torch.from_numpy(np.maximum.reduceat(sim, starts, axis=1))  # [rows, pages]: max per page
                out[:, s:e].index_add_(0, seg[r0:r1], best.to(acc_dtype))  # sum over each query's tokens
            s = e
        if not bool(torch.isfinite(out).all()):
            bad = (~torch.isfinite(out)).nonzero()[:5].tolist()
            raise ValueError(f"non-finite MaxSim scores at (query, page) {bad}: a query or page token holds NaN/inf")
    return out.float()


# Pages re-scored per chunk by `rerank_shortlist`: bounds the packed copy of the candidates
# (64 x 800 tokens x 128 dims x 4 bytes = 26 MB) whatever the shortlist.
_RERANK_CHUNK_PAGES = 64


def rerank_shortlist(fast_scores: Tensor, queries: Sequence[Tensor], pages: Sequence[Tensor], shortlist: int) -> Tensor:
    """Exact fp32 scores for each query's `shortlist` best pages under `fast_scores` (e.g. bf16, or
    a two-stage index's pooled first stage), -inf for every other page.

    bf16 MaxSim is ~2x faster than fp32 but its rounding (up to ~1e-2 on unit vectors) can swap
    pages whose exact scores differ by less: re-scoring a shortlist in fp32 restores the exact
    order among the candidates at a cost proportional to the shortlist, not the corpus. `queries`
    and `pages` are sequences of valid-token tensors ([L, D], no padding), in score row/column
    order; `pages` is only indexed (a lazy sequence of memory-mapped views will do).
    Take top-k with k <= shortlist from the result.
    """
    if shortlist < 1:
        raise ValueError(f"shortlist must be >= 1, got {shortlist}")
    num_q, num_p = fast_scores.shape
    if len(queries) != num_q or len(pages) != num_p:
        raise ValueError(f"scores are {num_q}x{num_p} but got {len(queries)} queries and {len(pages)} pages")
    candidates = torch.topk(fast_scores, min(shortlist, num_p), dim=1).indices
    out = torch.full((num_q, num_p), float("-inf"), dtype=torch.float32)
    for q, idx in enumerate(candidates):
        chosen = sorted(idx.tolist())  # page order, so topk_pages' tie-break stays by page index
        for c in range(0, len(chosen), _RERANK_CHUNK_PAGES):
            part = chosen[c:c + _RERANK_CHUNK_PAGES]
            # one copy of the chunk's pages, cast per chunk inside maxsim_packed: per-page ops would
            # each pay a thread barrier (module docstring, "Threads")
            tokens, offsets = pack_pages([pages[i] for i in part])
            out[q, part] = maxsim_packed([queries[q]], tokens, offsets)[0]
    return out


def merge_topk(shard_results: Sequence[Sequence[Sequence[tuple[str, float]]]], k: int) -> list[list[tuple[str, float]]]:
    """Merge per-shard ``topk_pages`` results into the global top-k, exactly as if unsharded.

    ``shard_results[s][q]`` is shard s's top-k list for query q. The shards must be contiguous
    slices of the corpus given **in corpus order** (shard 0 holds the first pages), each searched
    with the same (or a larger) k: ties are then broken by (shard index, rank within the shard's
    list), which equals the global page order (see the module docstring).
    """
    _check_k(k)
    shard_results = list(shard_results)
    if not shard_results:
        raise ValueError("merge_topk needs at least one shard's results")
    num_q = len(shard_results[0])
    for s, res in enumerate(shard_results):
        if len(res) != num_q:
            raise ValueError(f"shard {s} has results for {len(res)} queries, shard 0 for {num_q}")
    merged = []
    for q in range(num_q):
        streams = []
        for s, res in enumerate(shard_results):
            lst = res[q]
            for r, (_, score) in enumerate(lst):
                if math.isnan(score):
                    raise ValueError(f"shard {s}, query {q}: NaN score")
                if r and score > lst[r - 1][1]:
                    raise ValueError(f"shard {s}, query {q}: list is not sorted by descending score")
            streams.append([(-score, s, r, pid) for r, (pid, score) in enumerate(lst)])
        merged.append([(pid, -neg) for neg, _, _, pid in heapq.merge(*streams)][:k])
    return merged

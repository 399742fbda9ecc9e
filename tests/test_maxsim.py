"""Exact masked MaxSim, top-k and sharded merge against a straightforward per-pair loop reference."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from retriever import maxsim as M
from retriever.maxsim import maxsim_scores, merge_topk, pad_multivectors, prepare_pages, topk_pages

FP32_TOL = dict(atol=1e-5, rtol=1e-6)
# bf16 (matmul inputs rounded to bf16, dot products rounded to bf16, sum in fp32): for L2-normalised
# vectors each query token's max moves by at most 2**-9 (q) + 2**-9 (p) + 2**-9 (output) ~ 5.9e-3,
# so |score_bf16 - score_fp32| <= 6e-3 * (valid query tokens). Measured: ~5e-4 per token.
BF16_TOL_PER_QUERY_TOKEN = 6e-3


# ----------------------------------------------------------------------------------------------
# Reference: for q, for p: sum over valid i of max over valid j of <q_i, p_j>, in float64.
def loop_reference(queries, query_mask, pages, page_mask):
    num_q, num_p = queries.shape[0], pages.shape[0]
    out = torch.zeros(num_q, num_p, dtype=torch.float64)
    for q in range(num_q):
        for p in range(num_p):
            total = 0.0
            for i in range(queries.shape[1]):
                if not query_mask[q, i]:
                    continue
                best = -math.inf
                for j in range(pages.shape[1]):
                    if page_mask[p, j]:
                        best = max(best, float(torch.dot(queries[q, i].double(), pages[p, j].double())))
                total += best
            out[q, p] = total
    return out


def reference_topk(scores, page_ids, k):
    """Sort by (score desc, page index asc) in plain Python."""
    res = []
    for row in scores.tolist():
        order = sorted(range(len(row)), key=lambda j: (-row[j], j))[:k]
        res.append([(page_ids[j], row[j]) for j in order])
    return res


def ids(topk):
    return [[pid for pid, _ in lst] for lst in topk]


def make_batch(gen, n, lengths, dim, *, side="right", nan_pad=False, integer=False):
    """[n, Lmax, dim] with the given valid lengths, padded on `side`; padding is NaN or garbage."""
    lmax = max(lengths)
    if integer:
        x = torch.randint(-3, 4, (n, lmax, dim), generator=gen).float()
    else:
        x = torch.randn(n, lmax, dim, generator=gen)
    pos = torch.arange(lmax)[None, :]
    lens = torch.tensor(lengths)[:, None]
    mask = pos < lens if side == "right" else pos >= lmax - lens
    pad_value = float("nan") if nan_pad else 100.0  # garbage that would win every max if it leaked
    x = torch.where(mask[..., None], x, torch.full_like(x, pad_value))
    return x, mask


def page_ids_for(n):
    return [f"page{i}" for i in range(n)]


# ----------------------------------------------------------------------------------------------
def test_unpadded_matches_loop_and_topk_order():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(4, 5, 16, generator=gen)
    p = torch.randn(9, 7, 16, generator=gen)
    qm = torch.ones(4, 5, dtype=torch.bool)
    pm = torch.ones(9, 7, dtype=torch.bool)
    ref = loop_reference(q, qm, p, pm)
    got = maxsim_scores(q, None, p, None)
    assert got.dtype == torch.float32 and got.shape == (4, 9)
    torch.testing.assert_close(got.double(), ref, **FP32_TOL)
    pids = page_ids_for(9)
    assert ids(topk_pages(got, pids, 5)) == ids(reference_topk(ref, pids, 5))


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("chunk", [None, 1, 2, 3, 7, 50])  # P = 7: divides, does not divide, > P
def test_padded_with_nan_matches_loop(side, chunk):
    gen = torch.Generator().manual_seed(1)
    q, qm = make_batch(gen, 3, [4, 1, 6], 12, side=side, nan_pad=True)
    p, pm = make_batch(gen, 7, [9, 2, 5, 9, 1, 7, 3], 12, side=side, nan_pad=True)
    ref = loop_reference(q, qm, p, pm)
    got = maxsim_scores(q, qm, p, pm, page_chunk=chunk)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), ref, **FP32_TOL)
    pids = page_ids_for(7)
    assert ids(topk_pages(got, pids, 7)) == ids(reference_topk(ref, pids, 7))


@pytest.mark.parametrize("side", ["right", "left"])
def test_prepared_pages_match_raw_and_restore_order(side):
    gen = torch.Generator().manual_seed(2)
    q, qm = make_batch(gen, 3, [3, 5, 2], 8, side=side, nan_pad=True)
    p, pm = make_batch(gen, 10, [4, 9, 1, 6, 9, 2, 8, 3, 7, 5], 8, side=side, nan_pad=True)
    ref = loop_reference(q, qm, p, pm)
    prep = prepare_pages(p, pm)
    assert prep.order is not None  # lengths were not sorted: the rows were reordered
    for chunk in (None, 1, 3, 4):
        got = maxsim_scores(q, qm, prep, None, page_chunk=chunk)
        torch.testing.assert_close(got.double(), ref, **FP32_TOL)
    prep_bf16 = prepare_pages(p, pm, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="prepared in torch.bfloat16"):
        maxsim_scores(q, qm, prep_bf16, None, dtype=torch.float32)
    with pytest.raises(ValueError, match="page_mask must be None"):
        maxsim_scores(q, qm, prep, pm)


def test_list_inputs_and_pad_multivectors():
    gen = torch.Generator().manual_seed(3)
    qs = [torch.randn(n, 6, generator=gen) for n in (2, 5)]
    ps = [torch.randn(n, 6, generator=gen) for n in (3, 1, 4)]
    padded, mask = pad_multivectors(ps)
    assert padded.shape == (3, 4, 6) and mask.tolist() == [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]]
    assert (padded[~mask] == 0).all() and torch.equal(padded[1, 0], ps[1][0])
    qp, qm = pad_multivectors(qs)
    ref = loop_reference(qp, qm, padded, mask)
    got = maxsim_scores(qs, None, ps, None)
    torch.testing.assert_close(got.double(), ref, **FP32_TOL)
    assert torch.equal(got, maxsim_scores(qp, qm, padded, mask))
    with pytest.raises(ValueError, match="at least one"):
        pad_multivectors([])
    with pytest.raises(ValueError, match="does not match"):
        pad_multivectors([torch.zeros(2, 4), torch.zeros(2, 5)])
    with pytest.raises(ValueError, match="without a mask"):
        maxsim_scores(qs, qm, ps, None)


def test_query_token_tiling_path(monkeypatch):
    """A tiny block budget forces query-token tiles and one page per chunk; results must not change."""
    gen = torch.Generator().manual_seed(4)
    q, qm = make_batch(gen, 4, [7, 3, 8, 5], 8, side="left", nan_pad=True)
    p, pm = make_batch(gen, 5, [6, 2, 9, 4, 9], 8, side="right", nan_pad=True)
    ref = loop_reference(q, qm, p, pm)
    monkeypatch.setattr(M, "_CHUNK_TARGET_ELEMENTS", 20)  # 20 // 9 = 2 query tokens per tile
    got = maxsim_scores(q, qm, p, pm)
    torch.testing.assert_close(got.double(), ref, **FP32_TOL)


def test_integer_embeddings_are_bit_exact_in_fp32_and_bf16():
    """Small-integer vectors make every dot product exact: fp32, bf16 and the loop agree bit for bit."""
    gen = torch.Generator().manual_seed(5)
    q, qm = make_batch(gen, 5, [3, 4, 1, 2, 4], 8, side="left", nan_pad=True, integer=True)
    p, pm = make_batch(gen, 23, [int(x) for x in torch.randint(1, 10, (23,), generator=gen)], 8,
                       nan_pad=True, integer=True)
    ref = loop_reference(q, qm, p, pm).float()
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        for chunk in (None, 1, 4, 5):
            for rescore in (False, True):
                assert torch.equal(maxsim_scores(q, qm, p, pm, dtype=dtype, page_chunk=chunk, rescore=rescore), ref)
    prep = prepare_pages(p, pm, dtype=torch.bfloat16)
    assert torch.equal(maxsim_scores(q, qm, prep, None), ref)
    assert torch.equal(maxsim_scores(q, qm, prep, None, rescore=True, page_chunk=3), ref)


def test_bf16_close_to_fp32_and_same_top1():
    gen = torch.Generator().manual_seed(6)
    qlens = [int(x) for x in torch.randint(8, 25, (16,), generator=gen)]
    plens = [int(x) for x in torch.randint(30, 61, (60,), generator=gen)]
    q, qm = make_batch(gen, 16, qlens, 64, nan_pad=True)
    p, pm = make_batch(gen, 60, plens, 64, side="left", nan_pad=True)
    # plant the answer: page 3*i holds noisy copies of query i's tokens (a realistic clear margin)
    for i, n in enumerate(qlens):
        p[3 * i, -n:] = q[i, :n] + 0.8 * torch.randn(n, 64, generator=gen)
    q = torch.nn.functional.normalize(q, dim=-1)
    p = torch.nn.functional.normalize(p, dim=-1)
    s32 = maxsim_scores(q, qm, p, pm)
    s16 = maxsim_scores(q, qm, p, pm, dtype=torch.bfloat16)
    assert s16.dtype == torch.float32
    bound = BF16_TOL_PER_QUERY_TOKEN * torch.tensor(qlens, dtype=torch.float32)[:, None]
    assert ((s16 - s32).abs() <= bound).all(), (s16 - s32).abs().max()
    top2 = s32.topk(2, dim=1)
    assert torch.equal(top2.indices[:, 0], torch.arange(0, 48, 3))
    assert ((top2.values[:, 0] - top2.values[:, 1]) > 2 * bound[:, 0]).all()  # margin beats the error
    assert torch.equal(s16.argmax(1), s32.argmax(1))
    # rescore: bf16 only selects the page token, its dot product is recomputed in fp32
    for pages, mask in ((p, pm), (prepare_pages(p, pm, dtype=torch.bfloat16), None)):
        s16r = maxsim_scores(q, qm, pages, mask, dtype=torch.bfloat16, rescore=True, page_chunk=7)
        assert ((s16r - s32).abs() <= bound).all()
        assert torch.equal(s16r.argmax(1), s32.argmax(1))
        assert (s16r - s32).abs().mean() < 0.5 * (s16 - s32).abs().mean()


# ----------------------------------------------------------------------------------------------
def test_topk_ties_k_larger_than_corpus_and_refusals():
    scores = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    pids = ["a", "b", "c", "d", "e"]
    assert topk_pages(scores, pids, 2) == [[("b", 3.0), ("c", 3.0)], [("a", 0.0), ("b", 0.0)]]
    assert ids(topk_pages(scores, pids, 4)) == [["b", "c", "e", "d"], ["a", "b", "c", "d"]]
    assert ids(topk_pages(scores, pids, 99)) == [["b", "c", "e", "d", "a"], pids]
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="k must be a positive int"):
            topk_pages(scores, pids, bad)
    with pytest.raises(ValueError, match="NaN"):
        topk_pages(torch.tensor([[1.0, float("nan")]]), ["a", "b"], 1)
    with pytest.raises(ValueError, match="page ids"):
        topk_pages(scores, pids[:4], 1)
    with pytest.raises(ValueError, match="k must be a positive int"):
        merge_topk([[[("a", 1.0)]]], 0)


def test_refusals_have_clear_messages():
    q = torch.randn(2, 3, 4)
    p = torch.randn(3, 5, 4)
    qm = torch.ones(2, 3, dtype=torch.bool)
    pm = torch.ones(3, 5, dtype=torch.bool)
    empty_q = qm.clone()
    empty_q[1] = False
    with pytest.raises(ValueError, match=r"1 query\(s\) have no valid token \(index 1\)"):
        maxsim_scores(q, empty_q, p, pm)
    empty_p = pm.clone()
    empty_p[0] = False
    empty_p[2] = False
    with pytest.raises(ValueError, match=r"2 page\(s\) have no valid token \(index 0, 2\)"):
        maxsim_scores(q, qm, p, empty_p)
    with pytest.raises(ValueError, match="no valid token"):
        prepare_pages(p, empty_p)
    with pytest.raises(ValueError, match="no valid token"):
        maxsim_scores(q, qm, [torch.randn(2, 4), torch.zeros(0, 4)], None)
    nan_q = q.clone()
    nan_q[0, 1, 2] = float("nan")  # at a VALID position: must not be silently ranked
    with pytest.raises(ValueError, match="non-finite"):
        maxsim_scores(nan_q, qm, p, pm)
    with pytest.raises(ValueError, match="embedding dims differ"):
        maxsim_scores(q, qm, torch.randn(3, 5, 6), pm)
    with pytest.raises(ValueError, match="dtype must be one of"):
        maxsim_scores(q, qm, p, pm, dtype=torch.float16)
    with pytest.raises(ValueError, match="page_chunk"):
        maxsim_scores(q, qm, p, pm, page_chunk=0)
    with pytest.raises(ValueError, match="bool"):
        maxsim_scores(q, qm.int(), p, pm)
    with pytest.raises(ValueError, match="shape"):
        maxsim_scores(q, qm, p, pm[:, :4])


# ----------------------------------------------------------------------------------------------
def contiguous_shards(num_pages, num_shards):
    bounds = [round(i * num_pages / num_shards) for i in range(num_shards + 1)]
    return [(a, b) for a, b in zip(bounds, bounds[1:])]


@pytest.mark.parametrize("integer", [True, False])  # integer data: heavy exact ties across shards
def test_sharded_merge_equals_unsharded(integer):
    gen = torch.Generator().manual_seed(7)
    q, qm = make_batch(gen, 6, [2, 1, 3, 3, 1, 2], 4, nan_pad=True, integer=integer)
    plens = [int(x) for x in torch.randint(1, 6, (17,), generator=gen)]
    p, pm = make_batch(gen, 17, plens, 4, side="left", nan_pad=True, integer=integer)
    if integer:
        p[5::4] = p[1]  # duplicated pages: guaranteed ties that straddle shard boundaries
        pm[5::4] = pm[1]
    pids = page_ids_for(17)
    full = maxsim_scores(q, qm, p, pm)
    ref = loop_reference(q, qm, p, pm)
    for k in (1, 3, 5, 17, 40):
        want = topk_pages(full, pids, k)
        assert ids(want) == ids(reference_topk(ref, pids, k))
        for n in range(1, 5):
            shard_res = [topk_pages(maxsim_scores(q, qm, p[a:b], pm[a:b]), pids[a:b], k)
                         for a, b in contiguous_shards(17, n)]
            got = merge_topk(shard_res, k)
            if integer:
                assert got == want
            else:
                assert ids(got) == ids(want)
                torch.testing.assert_close(torch.tensor([[s for _, s in r] for r in got]),
                                           torch.tensor([[s for _, s in r] for r in want]), **FP32_TOL)


def test_merge_refuses_inconsistent_shards():
    with pytest.raises(ValueError, match="shard 1 has results for 1 queries"):
        merge_topk([[[("a", 1.0)], [("b", 0.5)]], [[("c", 2.0)]]], 2)
    with pytest.raises(ValueError, match="not sorted"):
        merge_topk([[[("a", 1.0), ("b", 2.0)]]], 2)
    with pytest.raises(ValueError, match="at least one shard"):
        merge_topk([], 2)


# ----------------------------------------------------------------------------------------------
@st.composite
def corpora(draw):
    num_q, num_p = draw(st.integers(1, 3)), draw(st.integers(1, 6))
    lq, lp, dim = draw(st.integers(1, 4)), draw(st.integers(1, 5)), draw(st.integers(1, 6))
    # arbitrary masks (not only left/right padding), each row with at least one valid token
    qm = torch.tensor(draw(st.lists(st.lists(st.booleans(), min_size=lq, max_size=lq).filter(any),
                                    min_size=num_q, max_size=num_q)))
    pm = torch.tensor(draw(st.lists(st.lists(st.booleans(), min_size=lp, max_size=lp).filter(any),
                                    min_size=num_p, max_size=num_p)))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    integer = draw(st.booleans())
    if integer:
        q = torch.randint(-2, 3, (num_q, lq, dim), generator=gen).float()
        p = torch.randint(-2, 3, (num_p, lp, dim), generator=gen).float()
    else:
        q = torch.randn(num_q, lq, dim, generator=gen)
        p = torch.randn(num_p, lp, dim, generator=gen)
    q[~qm] = float("nan")
    p[~pm] = float("nan")
    chunk = draw(st.one_of(st.none(), st.integers(1, num_p + 1)))
    return q, qm, p, pm, chunk, integer


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(corpora(), st.integers(1, 7), st.integers(1, 4))
def test_property_agrees_with_loop_and_sharding(data, k, num_shards):
    q, qm, p, pm, chunk, integer = data
    ref = loop_reference(q, qm, p, pm)
    got = maxsim_scores(q, qm, p, pm, page_chunk=chunk)
    torch.testing.assert_close(got.double(), ref, **FP32_TOL)
    if not integer:
        return
    # integer data: every score is exact, so top-k (with its ties) and the sharded merge are exact
    num_p = p.shape[0]
    pids = page_ids_for(num_p)
    assert torch.equal(got, ref.float())
    for rescore in (False, True):  # small integers are exact in bf16 as well
        assert torch.equal(maxsim_scores(q, qm, p, pm, dtype=torch.bfloat16, page_chunk=chunk, rescore=rescore), got)
    want = topk_pages(got, pids, k)
    assert want == reference_topk(ref.float(), pids, k)
    shards = [(a, b) for a, b in contiguous_shards(num_p, min(num_shards, num_p))]
    shard_res = [topk_pages(maxsim_scores(q, qm, p[a:b], pm[a:b], page_chunk=chunk), pids[a:b], k)
                 for a, b in shards]
    assert merge_topk(shard_res, k) == want


# ----------------------------------------------------------------------------------------------
@pytest.mark.slow  # importing colpali-engine takes ~10 s
def test_colpali_engine_zero_padding_bug_changes_ranking():
    """colpali-engine zero-pads pages and applies no mask: a padded slot scores 0 and beats real
    negative similarities, so a short page jumps ahead. The masked version follows the loop."""
    from colpali_engine.utils.processing_utils import BaseVisualRetrieverProcessor

    query = torch.tensor([[1.0, 0.0, 0.0]])  # one query token
    long_page = torch.tensor([[-0.1, 0.5, 0.0], [-0.2, 0.0, 0.5], [-0.3, 0.1, 0.1]])  # best sim -0.1
    short_page = torch.tensor([[-0.5, 0.2, 0.2]])  # sim -0.5: clearly worse
    pages = [long_page, short_page]
    pids = ["long", "short"]

    theirs = BaseVisualRetrieverProcessor.score_multi_vector([query], pages, device="cpu")
    ours = maxsim_scores([query], None, pages, None)
    padded, mask = pad_multivectors(pages)
    ref = loop_reference(query[None], torch.ones(1, 1, dtype=torch.bool), padded, mask)

    torch.testing.assert_close(ours.double(), ref, **FP32_TOL)
    torch.testing.assert_close(ours, torch.tensor([[-0.1, -0.5]]))
    assert ids(topk_pages(ours, pids, 2)) == [["long", "short"]] == ids(reference_topk(ref, pids, 2))
    torch.testing.assert_close(theirs, torch.tensor([[-0.1, 0.0]]))  # the padded zero won the max
    assert ids(topk_pages(theirs, pids, 2)) == [["short", "long"]]  # wrong ranking


# ----------------------------------------------------------------------------------------------
# Packed pages (the index's layout): tokens back to back plus offsets, no padding


@pytest.mark.parametrize("target", [None, 20, 200])  # the default chunking, query-token tiles, a few pages a chunk
def test_packed_matches_loop(monkeypatch, target):
    from retriever.maxsim import maxsim_packed, pack_pages

    if target is not None:
        monkeypatch.setattr(M, "_CHUNK_TARGET_ELEMENTS", target)
    gen = torch.Generator().manual_seed(11)
    qs = [torch.randn(n, 8, generator=gen) for n in (4, 1, 7)]
    ps = [torch.randn(n, 8, generator=gen) for n in (9, 2, 5, 9, 1, 7, 3, 12)]
    tokens, offsets = pack_pages(ps)
    assert tokens.shape == (48, 8) and offsets.tolist() == [0, 9, 11, 16, 25, 26, 33, 36, 48]
    qp, qm = pad_multivectors(qs)
    pp, pm = pad_multivectors(ps)
    ref = loop_reference(qp, qm, pp, pm)
    got = maxsim_packed(qs, tokens, offsets)
    assert got.dtype == torch.float32 and got.shape == (3, 8)
    torch.testing.assert_close(got.double(), ref, **FP32_TOL)
    # a float16 store is read as it is (the cast happens per chunk): equal to scoring the rounded vectors
    half = maxsim_packed(qs, tokens.half(), offsets)
    torch.testing.assert_close(half.double(), loop_reference(qp, qm, pp.half().float(), pm), **FP32_TOL)


def test_packed_is_bit_exact_on_integers_in_every_dtype():
    from retriever.maxsim import maxsim_packed, pack_pages

    gen = torch.Generator().manual_seed(12)
    qs = [torch.randint(-3, 4, (n, 8), generator=gen).float() for n in (3, 4, 1)]
    ps = [torch.randint(-3, 4, (int(n), 8), generator=gen).float() for n in torch.randint(1, 10, (23,), generator=gen)]
    ref = maxsim_scores(qs, None, ps, None)
    tokens, offsets = pack_pages(ps)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        assert torch.equal(maxsim_packed(qs, tokens, offsets, dtype=dtype), ref)


def test_packed_refuses_bad_layouts_by_name():
    from retriever.maxsim import maxsim_packed

    q = [torch.ones(2, 4)]
    with pytest.raises(ValueError, match=r"1 packed page\(s\) have no token \(index 1\)"):
        maxsim_packed(q, torch.ones(3, 4), torch.tensor([0, 3, 3]))
    with pytest.raises(ValueError, match="offsets must run from 0 to the 3 packed tokens"):
        maxsim_packed(q, torch.ones(3, 4), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="embedding dims differ: query 0 has 4, pages 5"):
        maxsim_packed(q, torch.ones(3, 5), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="query 0: expected a"):
        maxsim_packed([torch.ones(0, 4)], torch.ones(3, 4), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="non-finite MaxSim scores"):
        maxsim_packed(q, torch.full((3, 4), float("nan")), torch.tensor([0, 3]))

"""Pure reward functions: ANLS (official DocVQA semantics), exact match, containment, extraction,
format/retrieval components, the composite reward, user functions, bad input. No Ray."""

from __future__ import annotations

import random
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from docvqa.sample import DocVQASample
from reward.config import RewardConfig
from reward.extract import extract_answer
from reward.metrics import (
    anls_score,
    anls_corpus,
    containment_score,
    exact_match,
    levenshtein,
    normalize_answer,
)
from reward.scoring import load_user_function, reward_metrics, score_batch, score_one
from reward.types import BUILTIN_COMPONENTS, COMPONENT_NAMES, RewardError, ScoreRequest

# ---------------------------------------------------------------------------------------------
# An independent reference: textbook DP and the official script's formula, in plain Python


def ref_levenshtein(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        cur = [i]
        for j, cb in enumerate(b, start=1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def ref_anls_official(pred: str | None, golds: list[str], threshold: float = 0.5) -> float:
    """The official DocVQA/RRC evaluation script's per-question score, written as it is there:
    the distance between the normalized strings over the RAW strings' ``.upper()`` lengths."""
    det = "" if pred is None else pred
    values = []
    for answer in golds:
        gt_answer = " ".join(answer.strip().lower().split())
        det_answer = " ".join(det.strip().lower().split())
        dist = ref_levenshtein(gt_answer, det_answer)
        length = max(len(answer.upper()), len(det.upper()))
        values.append(0.0 if length == 0 else float(dist) / float(length))
    question_result = 1 - min(values)
    if question_result < threshold:
        question_result = 0
    return question_result


def ref_anls_normalized(pred: str, golds: list[str], threshold: float = 0.5) -> float:
    """The same rule over the normalized lengths (docrl's `length="normalized"`, the `anls` package)."""
    p = " ".join(pred.strip().lower().split())
    values = []
    for gold in golds:
        g = " ".join(gold.strip().lower().split())
        length = max(len(p), len(g))
        values.append(0.0 if length == 0 else ref_levenshtein(p, g) / length)
    result = 1 - min(values)
    return 0.0 if result < threshold else result


REF_ANLS = {"official": ref_anls_official, "normalized": ref_anls_normalized}


ALPHABET = "abcAB C\t\né東京😀"


def rand_str(rng: random.Random, lo: int = 0, hi: int = 12) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(rng.randint(lo, hi)))


def sample(answers=("Acme Inc",), qid="q1", question="Who?", gold_page="d1/p1") -> DocVQASample:
    return DocVQASample(qid, question, answers, "d1", gold_page, ("d1/p1", "d1/p2", "d1/p3"))


# ---------------------------------------------------------------------------------------------
# ANLS: hand-worked cases


def test_normalization_case_and_whitespace():
    assert normalize_answer("  Hello \t  WORLD\n") == "hello world"
    assert normalize_answer(None) == ""
    assert anls_score("  HELLO   World ", ["hello world"]) == 1.0
    assert exact_match("Hello\nworld", ["  hello world "]) == 1.0
    assert anls_score("helloworld", ["hello world"]) == pytest.approx(1 - 1 / 11)  # internal space is a char


def test_hand_worked_similarities():
    assert anls_score("12/15/89", ["12/15/88"]) == pytest.approx(1 - 1 / 8)
    assert anls_score("Denver Broncos", ["Denver R. Broncos"]) == pytest.approx(1 - 3 / 17)
    assert anls_score("kitten", ["sitting"]) == pytest.approx(1 - 3 / 7)  # 0.571 kept
    assert anls_score("abcde", ["abxyz"]) == 0.0  # similarity 0.4 < 0.5


def test_boundary_exactly_half_is_kept():
    # dist("abcd", "abxy") = 2, max len 4: NL = 0.5, similarity exactly 0.5 -> kept (official script)
    assert levenshtein("abcd", "abxy") == 2
    assert anls_score("abcd", ["abxy"]) == 0.5
    assert anls_score("ABCD ", ["abxy"], length="normalized") == 0.5
    assert anls_score("ABCD ", ["abxy"]) == 1 - 2 / 5  # official: the raw "ABCD " has 5 characters
    # one edit more falls below
    assert anls_score("abcd", ["axyz"]) == 0.0
    # other thresholds: similarity == threshold kept, below dropped
    assert anls_score("abcd", ["abcx"], threshold=0.75) == 0.75
    assert anls_score("abcd", ["abxy"], threshold=0.75) == 0.0
    assert anls_score("abcd", ["wxyz"], threshold=0.0) == 0.0
    assert anls_score("abcd", ["abcx"], threshold=1.0) == 0.0


def test_boundary_differs_from_anls_package():
    anls_pkg = pytest.importorskip("anls")
    # the anls package zeroes NL == threshold (`1 - nl if nl < threshold else 0`); the official
    # script (and docrl) keep it
    assert anls_pkg.anls_score("abcd", ["abxy"]) == 0.0
    assert anls_score("abcd", ["abxy"]) == 0.5


def test_official_denominator_hand_worked():
    # the official script divides the distance of the NORMALIZED strings by the max of the RAW
    # strings' .upper() lengths; "normalized" divides by the normalized lengths
    # "  Hello  " vs "hello": normalized equal, dist 0 -> 1 - 0/9 = 1.0 in both modes
    assert anls_score("  Hello  ", ["hello"]) == 1.0
    assert anls_score("  Hello  ", ["hello"], length="normalized") == 1.0
    # "ab " vs "abc": dist("ab", "abc") = 1; raw lengths 3 and 3 -> 1 - 1/3 in both modes
    assert anls_score("ab ", ["abc"]) == 1 - 1 / 3
    assert anls_score("ab ", ["abc"], length="normalized") == 1 - 1 / 3
    # "ab   " vs "abc": dist 1; official max(len("AB   "), len("ABC")) = 5 -> 1 - 1/5 = 0.8;
    # normalized max(2, 3) = 3 -> 1 - 1/3
    assert anls_score("ab   ", ["abc"]) == 1 - 1 / 5 == 0.8
    assert anls_score("ab   ", ["abc"], length="normalized") == 1 - 1 / 3
    # padding lifts a miss over the threshold officially: "a    " vs "abc": dist("a", "abc") = 2;
    # official max(5, 3) = 5 -> 1 - 2/5 = 0.6 kept; normalized max(1, 3) = 3 -> 1/3 < 0.5 -> 0
    assert anls_score("a    ", ["abc"]) == 1 - 2 / 5
    assert anls_score("a    ", ["abc"], length="normalized") == 0.0
    # the gold's raw padding counts too: "abc" vs gold " ab  ": dist 1, official max(3, 5) = 5
    assert anls_score("abc", [" ab  "]) == 1 - 1 / 5
    # "ß".upper() is "SS": "Straße 12" vs "Straße 13": dist 1; official len("STRASSE 12") = 10
    # -> 1 - 1/10 = 0.9; normalized 9 characters -> 1 - 1/9
    assert len("Straße 12") == 9 and len("Straße 12".upper()) == 10
    assert anls_score("Straße 12", ["Straße 13"]) == 1 - 1 / 10 == 0.9
    assert anls_score("Straße 12", ["Straße 13"], length="normalized") == 1 - 1 / 9
    # "ßa" vs "ßb": dist 1; official max(len("SSA"), len("SSB")) = 3 -> 1 - 1/3; normalized
    # max(2, 2) -> exactly 0.5, kept
    assert anls_score("ßa", ["ßb"]) == 1 - 1 / 3
    assert anls_score("ßa", ["ßb"], length="normalized") == 0.5
    # lowercasing can lengthen: "İ".lower() is "i̇" (2 code points), "İ".upper() is 1; "İ" vs
    # "x": dist("i̇", "x") = 2, official length 1 -> 1 - 2/1 = -1 < threshold -> 0, even at 0
    assert anls_score("İ", ["x"]) == 0.0 and anls_score("İ", ["x"], threshold=0.0) == 0.0
    # None is the empty string: dist("", "abc") = 3 over 3 -> 0; both empty -> 1
    assert anls_score(None, ["abc"]) == 0.0 and anls_score(None, [""]) == 1.0
    # several golds: 1 - min(NL) over the per-gold raw denominators; "ab   " vs "abc" (1/5)
    # and "abd" (1/5) and "xyz" (3/5) -> 0.8
    assert anls_score("ab   ", ["xyz", "abd", "abc"]) == 0.8
    for pred, gold in [("ab   ", "abc"), ("a    ", "abc"), ("Straße 12", "Straße 13"), ("ßa", "ßb"), ("İ", "x")]:
        assert anls_score(pred, [gold]) == ref_anls_official(pred, [gold])
        assert anls_score(pred, [gold], length="normalized") == ref_anls_normalized(pred, [gold])


def test_unknown_length_is_an_error():
    with pytest.raises(ValueError, match=r"ANLS length must be one of 'official', 'normalized' \(got 'raw'\)"):
        anls_score("a", ["a"], length="raw")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ANLS length"):
        anls_corpus([], [], length="raw")  # type: ignore[arg-type]


def test_several_gold_answers_take_the_max():
    golds = ["Dr. Lobo", "Dear Dr. Lobo", "lobo"]
    assert anls_score("Dear dr. Lobo", golds) == 1.0
    assert anls_score("Dr Lobo", golds) == pytest.approx(1 - 1 / 8)
    assert anls_score("lobos", golds) == pytest.approx(1 - 1 / 5)
    assert anls_score("zzz", golds) == 0.0


def test_empty_and_none_predictions():
    assert anls_score("", ["abc"]) == 0.0
    assert anls_score(None, ["abc"]) == 0.0
    assert anls_score("   ", ["abc"]) == 0.0
    assert exact_match(None, ["abc"]) == 0.0
    assert containment_score("", ["abc"]) == 0.0
    # the official "not answerable" convention: empty vs empty is a match
    assert anls_score("", [""]) == 1.0
    assert anls_score("x", [""]) == 0.0


def test_unicode_counts_characters():
    assert anls_score("café", ["cafe"]) == pytest.approx(1 - 1 / 4)  # 4 characters, not 5 bytes
    assert anls_score("ÉCOLE", ["école"]) == 1.0
    assert anls_score("東京", ["東京都"]) == pytest.approx(1 - 1 / 3)
    assert anls_score("ok👍", ["ok"]) == pytest.approx(1 - 1 / 3)
    assert anls_score("😀😀", ["😀😁"]) == 0.5
    assert containment_score("答案是東京", ["東京"]) == pytest.approx(2 / 5)


def test_bad_gold_answers_name_the_sample():
    cfg = RewardConfig()
    for bad in [(), ["a", 3], "abc", None, ("ok", None)]:
        req = ScoreRequest(sample(answers=bad, qid="q-bad-7"), "abc")
        with pytest.raises(ValueError, match="q-bad-7"):
            score_one(req, cfg)
    with pytest.raises(ValueError, match="non-empty list or tuple"):
        anls_score("x", [])
    with pytest.raises(ValueError, match="q-bad-9"):
        score_one(ScoreRequest(sample(qid="q-bad-9"), 42), cfg)  # type: ignore[arg-type]


def test_long_prediction_is_bounded():
    rng = random.Random(0)
    long = "".join(rng.choice("abcdefgh ") for _ in range(10_000))
    t = time.perf_counter()
    for _ in range(100):
        assert anls_score(long, ["invoice 42", "acme"]) == 0.0  # length bound: no edit distance
    assert time.perf_counter() - t < 0.5
    other = "".join(rng.choice("abcdefgh ") for _ in range(10_000))
    t = time.perf_counter()
    s = anls_score(long, [other])
    assert time.perf_counter() - t < 1.0
    assert 0.0 <= s <= 1.0
    big = long + " acme"
    assert containment_score(big, ["acme"]) == pytest.approx(4 / len(normalize_answer(big)))


# ---------------------------------------------------------------------------------------------
# ANLS against the reference and the anls package


def test_matches_reference_on_random_strings():
    rng = random.Random(1234)
    for _ in range(1500):
        a, b = rand_str(rng), rand_str(rng)
        assert levenshtein(a, b) == ref_levenshtein(a, b), (a, b)
        golds = [rand_str(rng) for _ in range(rng.randint(1, 3))]
        if rng.random() < 0.3:  # near misses so scores land above the threshold too
            golds.append(a[: len(a) // 2] + "x" + a[len(a) // 2 + 1 :])
        threshold = rng.choice([0.0, 0.25, 0.5, 0.75, 1.0])
        for length, ref in REF_ANLS.items():
            assert anls_score(a, golds, threshold, length) == ref(a, golds, threshold), (a, golds, threshold, length)


def test_agrees_with_anls_package_except_exact_boundary():
    anls_pkg = pytest.importorskip("anls")
    rng = random.Random(7)
    compared = boundary = 0
    for _ in range(1500):
        pred = rand_str(rng, 0, 10)
        golds = [pred[:-1] + rng.choice("abz"), rand_str(rng, 1, 10)] if pred else [rand_str(rng, 1, 6)]
        ours, theirs = anls_score(pred, golds, length="normalized"), anls_pkg.anls_score(pred, golds)
        if ours == 0.5:
            boundary += 1
            assert theirs == 0.0
        else:
            compared += 1
            assert ours == pytest.approx(theirs, abs=1e-12), (pred, golds)
    assert compared > 1000 and boundary > 0


def test_corpus_anls():
    assert anls_corpus(["abc", "abcd", None], [["abc"], ["abxy"], ["x"]]) == pytest.approx((1 + 0.5 + 0) / 3)
    assert anls_corpus([], []) == 0.0
    # (1 - 1/5 + 0) / 2 officially; (1 - 1/3 + 0) / 2 over normalized lengths
    assert anls_corpus(["ab   ", "zz"], [["abc"], ["x"]]) == (ref_anls_official("ab   ", ["abc"]) + 0.0) / 2 == 0.4
    assert anls_corpus(["ab   ", "zz"], [["abc"], ["x"]], length="normalized") == pytest.approx((1 - 1 / 3) / 2)
    with pytest.raises(ValueError, match="2 predictions but 1"):
        anls_corpus(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="question 1"):
        anls_corpus(["a", "b"], [["a"], []])


# ---------------------------------------------------------------------------------------------
# Properties

texts = st.text(alphabet=st.sampled_from(list("abAB .\t") + ["é", "東", "😀"]), max_size=16)
gold_lists = st.lists(texts, min_size=1, max_size=4)
quick = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# spaces, tabs, case, accents, CJK, emoji, and characters whose case mapping changes the length
# ("ß".upper() == "SS", "İ".lower() == "i̇", "ŉ".upper() == "ʼN")
odd_texts = st.text(alphabet=st.sampled_from(list("aAbB  \t\n.") + ["é", "東", "😀", "ß", "İ", "ŉ", "ﬃ"]), max_size=14)


@quick
@given(st.one_of(st.none(), odd_texts), st.lists(odd_texts, min_size=1, max_size=4),
       st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0]), st.sampled_from(["official", "normalized"]))
def test_matches_references_property(pred, golds, threshold, length):
    ours = anls_score(pred, golds, threshold, length)
    assert ours == REF_ANLS[length]("" if pred is None else pred, golds, threshold)
    # near misses of the first gold, so scores above the threshold are common too
    near = golds[0][:-1] + "x" if golds[0] else "x"
    assert anls_score(near, golds, threshold, length) == REF_ANLS[length](near, golds, threshold)


@quick
@given(texts, gold_lists, st.sampled_from([0.0, 0.3, 0.5, 0.9]))
def test_scores_in_unit_interval(pred, golds, threshold):
    for s in (anls_score(pred, golds, threshold), anls_score(pred, golds, threshold, "normalized"),
              exact_match(pred, golds), containment_score(pred, golds)):
        assert 0.0 <= s <= 1.0


@quick
@given(texts, gold_lists)
def test_one_exactly_when_normalized_equal(pred, golds):
    equal = any(normalize_answer(pred) == normalize_answer(g) for g in golds)
    assert (anls_score(pred, golds) == 1.0) == equal
    assert (exact_match(pred, golds) == 1.0) == equal
    assert (containment_score(pred, golds) == 1.0) == equal


@quick
@given(texts, gold_lists, st.randoms(use_true_random=False))
def test_gold_order_irrelevant(pred, golds, rnd):
    shuffled = list(golds)
    rnd.shuffle(shuffled)
    assert anls_score(pred, golds) == anls_score(pred, shuffled)
    assert containment_score(pred, golds) == containment_score(pred, shuffled)


@quick
@given(texts.filter(lambda s: normalize_answer(s) != ""), texts, texts)
def test_exact_answer_beats_any_superset(answer, before, after):
    superset = before + answer + after
    golds = [answer]
    assert containment_score(answer, golds) >= containment_score(superset, golds)
    assert anls_score(answer, golds) >= anls_score(superset, golds)
    cfg = RewardConfig(components={"anls": 1.0, "exact_match": 1.0, "containment": 1.0, "format": 1.0})
    s = sample(answers=(answer,))
    exact = score_one(ScoreRequest(s, answer), cfg).reward
    assert exact >= score_one(ScoreRequest(s, superset), cfg).reward


def test_containment_shrinks_with_extra_length():
    golds = ["$42"]
    assert containment_score("$42", golds) == 1.0
    assert containment_score("total $42", golds) == pytest.approx(3 / 9)
    assert containment_score("the grand total is $42 dollars", golds) == pytest.approx(3 / 30)
    assert containment_score("forty two", golds) == 0.0


# ---------------------------------------------------------------------------------------------
# Extraction and the components


@pytest.mark.parametrize(
    "text, mode, expected",
    [
        ("The answer is 42.", "answer_prefix", ("42", True)),
        ("Reasoning... answer: 7\nAnswer: **Acme Inc.**\nThanks", "answer_prefix", ("Acme Inc", True)),
        ("The final answer is: \"12/15/88\"", "answer_prefix", ("12/15/88", True)),
        ("Answer:\n\n  Blue  \n", "answer_prefix", ("Blue", True)),
        ("ANSWER IS `x-ray`", "answer_prefix", ("x-ray", True)),
        ("no prefix here", "answer_prefix", ("no prefix here", False)),
        ("Answer:", "answer_prefix", ("", False)),
        ("first\n\nmiddle\nlast  \n\n", "last_line", ("last", True)),
        ("\n  first \nsecond", "first_line", ("first", True)),
        ("", "last_line", ("", False)),
        ("  verbatim.  ", "none", ("  verbatim.  ", True)),
        (None, "none", ("", False)),
    ],
)
def test_extraction_modes(text, mode, expected):
    assert extract_answer(text, mode) == expected


def test_extraction_feeds_the_score():
    s = sample(answers=("Acme Inc",))
    verbose = "Looking at the letterhead.\nThe answer is Acme Inc."
    plain = score_one(ScoreRequest(s, verbose), RewardConfig())
    extracted = score_one(ScoreRequest(s, verbose), RewardConfig(extraction="answer_prefix"))
    assert plain.components["anls"] == 0.0 and extracted.components["anls"] == 1.0
    assert extracted.answer == "Acme Inc"


def test_format_component():
    s = sample(answers=("abc",))
    cfg = RewardConfig(components={"format": 1.0}, max_answer_chars=5, extraction="answer_prefix")
    assert score_one(ScoreRequest(s, "Answer: abcde"), cfg).reward == 1.0
    assert score_one(ScoreRequest(s, "Answer: abcdef"), cfg).reward == 0.0  # too long
    assert score_one(ScoreRequest(s, "Answer: 東京😀éa"), cfg).reward == 1.0  # 5 characters
    assert score_one(ScoreRequest(s, "abc"), cfg).reward == 0.0  # no "Answer:" found
    assert score_one(ScoreRequest(s, None), RewardConfig(components={"format": 1.0})).reward == 0.0


def test_retrieval_component_uses_retriever_metrics():
    s = sample(gold_page="d1/p2")
    hit1 = RewardConfig(components={"retrieval": 1.0}, retrieval_k=1)
    hit2 = RewardConfig(components={"retrieval": 1.0}, retrieval_k=2)
    ndcg = RewardConfig(components={"retrieval": 1.0}, retrieval_metric="ndcg", retrieval_k=3)
    pages = ("d1/p1", "d1/p2", "d1/p3")
    assert score_one(ScoreRequest(s, "x", pages), hit1).reward == 0.0
    assert score_one(ScoreRequest(s, "x", pages), hit2).reward == 1.0
    assert score_one(ScoreRequest(s, "x", pages), ndcg).reward == pytest.approx(1 / 1.5849625007211563)
    assert score_one(ScoreRequest(s, "x", ()), hit2).reward == 0.0
    # a question without a gold page (no rater's label): 0 whatever was read, for every answer alike
    unlabelled = sample(gold_page=None)
    assert {score_one(ScoreRequest(unlabelled, "x", read), cfg).reward
            for read in (pages, ("d1/p2",), ()) for cfg in (hit1, ndcg)} == {0.0}


def test_composite_is_the_weighted_sum_and_reports_every_component():
    s = sample(answers=("Acme Inc",), gold_page="d1/p1")
    weights = {"anls": 1.0, "exact_match": 0.5, "containment": 0.25, "format": 0.1, "retrieval": -0.2}
    cfg = RewardConfig(components=weights)
    r = score_one(ScoreRequest(s, "Acme Inc Ltd", ("d1/p1",), sample_index=3, response_index=1), cfg)
    assert set(r.components) == set(BUILTIN_COMPONENTS)
    c = r.components
    assert c["anls"] == pytest.approx(1 - 4 / 12) and c["exact_match"] == 0.0
    assert c["containment"] == pytest.approx(8 / 12) and c["format"] == 1.0 and c["retrieval"] == 1.0
    assert r.reward == pytest.approx(sum(w * c[k] for k, w in weights.items()))
    assert (r.question_id, r.sample_index, r.response_index, r.error) == ("q1", 3, 1, None)
    # the anls component is the public anls_score of the scored answer, with reward.anls_length
    rng = random.Random(5)
    configs = {length: RewardConfig(anls_length=length) for length in ("official", "normalized")}
    for _ in range(300):
        golds = tuple(rand_str(rng, 0, 8) for _ in range(rng.randint(1, 3)))
        pred = rng.choice([rand_str(rng), golds[0] + rand_str(rng, 0, 3), golds[-1][1:], " " + golds[0] + "  "])
        for length, cfg in configs.items():
            res = score_one(ScoreRequest(sample(answers=golds), pred), cfg)
            assert res.components["anls"] == anls_score(pred, golds, length=length), (pred, golds, length)
            assert res.components["containment"] == containment_score(pred, golds)
            assert res.components["exact_match"] == exact_match(pred, golds)


def test_anls_component_follows_anls_length():
    # hand-worked: "ab   " vs "abc" is 1 - 1/5 officially, 1 - 1/3 over normalized lengths
    # (extraction "none" scores the response verbatim, padding included)
    s = sample(answers=("abc",))
    official = score_one(ScoreRequest(s, "ab   "), RewardConfig())
    normalized = score_one(ScoreRequest(s, "ab   "), RewardConfig(anls_length="normalized"))
    assert official.components["anls"] == official.reward == 0.8
    assert normalized.components["anls"] == normalized.reward == 1 - 1 / 3
    # the threshold applies to the chosen denominator: "a    " passes officially (0.6) only
    assert score_one(ScoreRequest(s, "a    "), RewardConfig()).reward == 1 - 2 / 5
    assert score_one(ScoreRequest(s, "a    "), RewardConfig(anls_length="normalized")).reward == 0.0
    # no gold answer (a down-vote without a correction): anls is 0, not an error
    no_gold = DocVQASample("q-r", "Who?", (), "d1", "d1/p1", ("d1/p1",), rejected_answers=("abc",))
    assert score_one(ScoreRequest(no_gold, "xyz"), RewardConfig()).components["anls"] == 0.0


def test_score_batch_keeps_order():
    reqs = [ScoreRequest(sample(answers=(f"a{i}",), qid=f"q{i}"), f"a{i % 3}", sample_index=i) for i in range(6)]
    out = score_batch(reqs, RewardConfig())
    assert [r.question_id for r in out] == [f"q{i}" for i in range(6)]
    assert [r.reward for r in out] == [1.0, 1.0, 1.0, 0.5, 0.5, 0.5]


# ---------------------------------------------------------------------------------------------
# Config


def test_config_defaults_and_errors():
    cfg = RewardConfig()
    assert cfg.components == {"anls": 1.0} and cfg.anls_threshold == 0.5 and cfg.on_error == "skip"
    assert cfg.anls_length == "official"
    with pytest.raises(ValidationError, match="anls_length"):
        RewardConfig(anls_length="raw")
    with pytest.raises(ValidationError, match=r"unknown component 'foo'; known: anls, exact_match, containment, format, retrieval, user"):
        RewardConfig(components={"anls": 1.0, "foo": 1.0})
    with pytest.raises(ValidationError, match="at least one"):
        RewardConfig(components={})
    with pytest.raises(ValidationError, match="finite"):
        RewardConfig(components={"anls": float("nan")})
    with pytest.raises(ValidationError, match="user_function is not set"):
        RewardConfig(components={"user": 1.0})
    with pytest.raises(ValidationError, match="no 'user' weight"):
        RewardConfig(user_function="reward_fns:page_bonus")
    with pytest.raises(ValidationError, match="package.module:function"):
        RewardConfig(components={"user": 1.0}, user_function="reward_fns.page_bonus")
    with pytest.raises(ValidationError):
        RewardConfig(extraction="regex")
    with pytest.raises(ValidationError):
        RewardConfig(colour="red")
    assert tuple(COMPONENT_NAMES) == BUILTIN_COMPONENTS + ("user",)


def test_config_composes_into_the_run_config():
    from cluster.config import ConfigError, load_config

    cfg = load_config(None, ["reward.components={anls: 1.0, format: 0.1}", "reward.extraction=answer_prefix"])
    assert cfg.reward.components == {"anls": 1.0, "format": 0.1}
    with pytest.raises(ConfigError, match=r"reward\.components: unknown component 'foo'"):
        load_config(None, ["reward.components.foo=1"])
    assert load_config(None, ["reward.anls_length=normalized"]).reward.anls_length == "normalized"
    with pytest.raises(ConfigError, match=r"reward\.anls_length"):
        load_config(None, ["reward.anls_length=raw"])


# ---------------------------------------------------------------------------------------------
# User functions


def user_cfg(fn: str, on_error: str = "skip", timeout: float = 5.0, **kw) -> RewardConfig:
    return RewardConfig(components={"anls": 1.0, "user": 1.0}, user_function=f"reward_fns:{fn}",
                        on_error=on_error, user_timeout_s=timeout, **kw)


def test_user_function_success():
    s = sample(answers=("abc",), gold_page="d1/p1")
    r = score_one(ScoreRequest(s, "abc", ("d1/p1",)), user_cfg("page_bonus"))
    assert r.error is None and r.components["user"] == 0.5 and r.reward == 1.5
    r = score_one(ScoreRequest(s, "abc" * 10, ()), user_cfg("length_penalty"))
    assert r.components["user"] == -0.3 and r.reward == pytest.approx(r.components["anls"] - 0.3)


@pytest.mark.parametrize("fn, text", [("boom", "ValueError: boom"), ("not_a_float", "returned 'high'"), ("nan_reward", "returned nan")])
def test_user_function_error_policies(fn, text):
    req = ScoreRequest(sample(qid="q-user-1"), "Acme Inc", sample_index=4, response_index=2)
    r = score_one(req, user_cfg(fn, "skip"))
    assert r.error is not None and text in r.error and "q-user-1" in r.error and "sample_index=4" in r.error
    assert r.reward == 0.0 and "user" not in r.components and r.components["anls"] == 1.0
    with pytest.raises(RewardError, match="q-user-1") as e:
        score_one(req, user_cfg(fn, "stop"))
    assert text in str(e.value)


def test_user_function_timeout_both_policies():
    from reward.scoring import leaked_user_threads

    before = leaked_user_threads()
    req = ScoreRequest(sample(qid="q-slow-3"), "Acme Inc")
    t = time.perf_counter()
    r = score_one(req, user_cfg("sleepy", "skip", timeout=0.2))
    assert time.perf_counter() - t < 1.5
    assert r.error is not None and "timed out after 0.2 s" in r.error and "q-slow-3" in r.error
    with pytest.raises(RewardError, match="timed out.*q-slow-3"):
        score_one(req, user_cfg("sleepy", "stop", timeout=0.2))
    assert leaked_user_threads() == before + 2
    # a fresh worker thread serves the next call of the same function
    out = score_batch([req, req], user_cfg("sleepy", "skip", timeout=0.05))
    assert all(o.error for o in out)


def test_results_with_errors_are_counted_and_excluded():
    reqs = [ScoreRequest(sample(), "Acme Inc"), ScoreRequest(sample(), "Acme")]
    good = score_batch(reqs, RewardConfig())
    bad = score_batch(reqs[:1], user_cfg("boom"))
    m = reward_metrics(good + bad)
    assert m["reward/errors"] == 1.0 and m["reward/error_rate"] == pytest.approx(1 / 3)
    assert m["reward/mean"] == pytest.approx((good[0].reward + good[1].reward) / 2)
    assert m["reward/anls"] == pytest.approx((1.0 + good[1].components["anls"]) / 2)


def test_user_function_loading_errors():
    with pytest.raises(RewardError, match="cannot import module 'no_such_module_xyz'"):
        load_user_function("no_such_module_xyz:f")
    with pytest.raises(RewardError, match="has no attribute 'missing'"):
        load_user_function("reward_fns:missing")
    with pytest.raises(RewardError, match="not a function"):
        load_user_function("reward_fns:NOT_CALLABLE")

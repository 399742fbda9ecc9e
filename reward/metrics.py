"""Answer-text metrics: ANLS (DocVQA's official semantics), exact match, containment partial credit.

Pure Python + rapidfuzz; no Ray. All lengths are in Unicode code points (characters), so accents,
CJK and emoji each count as one character (a combining accent is its own code point, as in the
official script; no Unicode normalization is applied).

Normalization (the official DocVQA evaluation script's): strip, lowercase, collapse internal
whitespace: ``" ".join(s.strip().lower().split())``.
"""

from __future__ import annotations

from collections.abc import Sequence

from rapidfuzz.distance import Levenshtein as _Lev

_lev_distance = _Lev.distance


def normalize_answer(text: str | None) -> str:
    """Official DocVQA normalization; None is treated as the empty string."""
    if not text:
        return ""
    # str.split() with no argument already drops leading/trailing whitespace, so this equals
    # " ".join(text.strip().lower().split()).
    return " ".join(text.lower().split())


def check_gold_answers(gold_answers, where: str = "") -> None:
    """Raise ValueError unless `gold_answers` is a non-empty list/tuple of strings.

    `where` (e.g. "sample q123") prefixes the message so the caller can name the sample.
    """
    prefix = f"{where}: " if where else ""
    if not isinstance(gold_answers, (list, tuple)) or not gold_answers:
        raise ValueError(f"{prefix}gold answers must be a non-empty list or tuple of strings (got {gold_answers!r})")
    for a in gold_answers:
        if not isinstance(a, str):
            raise ValueError(
                f"{prefix}gold answers must be a non-empty list or tuple of strings "
                f"(got {type(a).__name__} {a!r} in {gold_answers!r})"
            )


def _check_threshold(threshold: float) -> None:
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"ANLS threshold must be in [0, 1] (got {threshold!r})")


def levenshtein(a: str, b: str) -> int:
    """Unit-cost edit distance (insert, delete, substitute) in characters."""
    return _lev_distance(a, b)


def normalized_similarity(pred: str, gold: str, threshold: float = 0.5) -> float:
    """Thresholded similarity ``1 - dist / max(len)`` of two already-normalized strings.

    Computed exactly as the official script does (``1 - dist/length``, then ``< threshold -> 0``)
    so float results match it bit for bit. Two shortcuts that never change the result:
    * length bound: ``dist >= |len(a) - len(b)|``, so the similarity is at most
      ``1 - |la - lb| / max`` (= min/max length ratio); below the threshold the edit distance is
      never computed (a 10,000-character prediction against a short answer costs O(1));
    * `score_cutoff`: rapidfuzz stops once the distance exceeds the largest one that could still
      reach the threshold (banded computation for long strings).
    """
    lp = len(pred)
    lg = len(gold)
    length = lp if lp > lg else lg
    if length == 0:
        return 1.0  # both empty: the official script's "length == 0 -> NL 0"
    diff = lp - lg if lp > lg else lg - lp
    if 1.0 - diff / length < threshold:
        return 0.0
    if pred == gold:
        return 1.0
    cutoff = int((1.0 - threshold) * length) + 1  # any passing distance is <= this
    dist = _lev_distance(pred, gold, score_cutoff=cutoff)
    if dist > cutoff:
        return 0.0
    sim = 1.0 - dist / length
    return sim if sim >= threshold else 0.0


def anls_score(prediction: str | None, gold_answers: Sequence[str], threshold: float = 0.5) -> float:
    """ANLS of one prediction against its gold answers, with the official DocVQA semantics.

    Both strings are normalized (strip, lowercase, collapse whitespace); the normalized
    Levenshtein distance is ``NL = dist / max(len(pred), len(gold))`` (0 when both are empty);
    the similarity is ``1 - NL``, maximised over the gold answers; a similarity below `threshold`
    scores 0.

    The boundary: a similarity of exactly `threshold` (NL == 0.5 at the default) is KEPT, e.g.
    "abcd" vs "abxy" scores 0.5, not 0. That is what the official RRC/DocVQA evaluation script
    does: it computes ``question_result = 1 - min(NL)`` and zeroes it only ``if question_result <
    threshold``. The `anls` PyPI package (0.0.2, ``1 - nl if nl < threshold else 0``) puts the
    boundary on the other side and scores exactly-0.5 pairs 0; everywhere else the two agree.
    Exact 0.5 needs 2*dist == max length exactly, so it only occurs for even lengths.

    One deliberate difference from the official script: it divides by the length of the *raw*
    (un-normalized) strings' ``.upper()``, a quirk that inflates the denominator when the raw text
    has extra whitespace (and for characters like "ß" whose uppercase is longer). docrl divides
    by the normalized lengths, as the `anls` package does, so a score is 1.0 exactly when the
    normalized strings are equal and padding never earns credit.

    None/empty predictions score 0 against every gold answer with visible characters (and 1
    against an empty gold answer, the official "not answerable" convention). Raises ValueError when
    `gold_answers` is not a non-empty list/tuple of strings.
    """
    check_gold_answers(gold_answers)
    _check_threshold(threshold)
    pred = normalize_answer(prediction)
    best = 0.0
    for gold in gold_answers:
        s = normalized_similarity(pred, normalize_answer(gold), threshold)
        if s > best:
            best = s
            if best == 1.0:
                break
    return best


def anls_corpus(predictions: Sequence[str | None], golds: Sequence[Sequence[str]], threshold: float = 0.5) -> float:
    """Corpus ANLS: the mean of `anls_score` over questions (0.0 for an empty corpus, as officially)."""
    if len(predictions) != len(golds):
        raise ValueError(f"{len(predictions)} predictions but {len(golds)} gold answer lists")
    if not predictions:
        return 0.0
    total = 0.0
    for i, (p, g) in enumerate(zip(predictions, golds)):
        try:
            total += anls_score(p, g, threshold)
        except ValueError as e:
            raise ValueError(f"question {i}: {e}") from None
    return total / len(predictions)


def exact_match(prediction: str | None, gold_answers: Sequence[str]) -> float:
    """1.0 when the normalized prediction equals a normalized gold answer, else 0.0."""
    check_gold_answers(gold_answers)
    pred = normalize_answer(prediction)
    return 1.0 if any(pred == normalize_answer(g) for g in gold_answers) else 0.0


def containment_score(prediction: str | None, gold_answers: Sequence[str]) -> float:
    """Partial credit for a prediction that contains a gold answer: ``len(gold) / len(pred)``.

    On normalized strings, maximised over gold answers: 1.0 for an exact answer, and a superset
    of the answer earns the share of it that is the answer ("the total is $42" for "$42":
    3/16), so padding or dumping the whole page never beats the bare answer. 0.0 when no
    (non-empty) gold answer is a substring of the prediction. Plain substring match, no word
    boundaries (so CJK answers inside CJK text count); a short gold answer inside a longer token
    ("5" in "1995") earns the same small ratio.
    """
    check_gold_answers(gold_answers)
    pred = normalize_answer(prediction)
    lp = len(pred)
    best = 0.0
    for gold in gold_answers:
        g = normalize_answer(gold)
        if g == pred:
            return 1.0
        if g and g in pred:
            s = len(g) / lp
            if s > best:
                best = s
    return best

"""Answer-text metrics: ANLS (DocVQA's official semantics), exact match, containment partial credit.

Pure Python + rapidfuzz; no Ray. All lengths are in Unicode code points (characters), so accents,
CJK and emoji each count as one character (a combining accent is its own code point, as in the
official script; no Unicode normalization is applied).

Normalization (the official DocVQA evaluation script's): strip, lowercase, collapse internal
whitespace: ``" ".join(s.strip().lower().split())``.

ANLS denominators (`anls_score(length=...)`): the edit distance is always taken between the
normalized strings; what it is divided by differs:
* ``"official"`` (the default): ``max(len(gold.upper()), len(pred.upper()))`` of the *raw*
  strings, exactly as the official DocVQA/RRC evaluation script computes it, so held-out figures
  compare with published ones bit for bit;
* ``"normalized"``: ``max(len(norm_gold), len(norm_pred))`` (what the `anls` PyPI package does).
  Under the official denominator, whitespace padding around a prediction raises its score
  ("ab   " vs "abc" scores 1 - 1/5 = 0.8, "ab" scores 1 - 1/3); the normalized one never pays
  for padding, which matters when the score is a reward a policy can learn to game.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

from rapidfuzz.distance import Levenshtein as _Lev

_lev_distance = _Lev.distance

# The ANLS denominator: the official script's raw ``.upper()`` lengths, or the normalized lengths.
AnlsLength = Literal["official", "normalized"]
ANLS_LENGTHS: tuple[str, ...] = get_args(AnlsLength)


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


def _check_length(length: str) -> None:
    if length not in ANLS_LENGTHS:
        raise ValueError(f"ANLS length must be one of {', '.join(map(repr, ANLS_LENGTHS))} (got {length!r})")


def levenshtein(a: str, b: str) -> int:
    """Unit-cost edit distance (insert, delete, substitute) in characters."""
    return _lev_distance(a, b)


def _thresholded_similarity(pred: str, gold: str, length: int, threshold: float) -> float:
    """``1 - dist(pred, gold) / length`` of two normalized strings, 0 below `threshold`.

    `length` is the ANLS denominator (see the module docstring); it is 0 only when both strings
    are empty. Computed with the official script's float operations (``1 - dist/length``, then
    ``< threshold -> 0``) so results equal its bit for bit. Two shortcuts that never change the
    result, whatever the denominator:
    * length bound: ``dist >= |len(pred) - len(gold)|`` (the normalized lengths), and division
      and subtraction round monotonically, so ``1 - diff/length < threshold`` implies the true
      similarity is below it too: the edit distance is never computed (a 10,000-character
      prediction against a short answer costs O(1) beyond normalization). Under the official
      (raw) denominator the bound is looser but still a bound;
    * `score_cutoff`: rapidfuzz stops once the distance exceeds the largest one that could still
      reach the threshold (banded computation for long strings). The ``+ 1`` slack covers float
      rounding of ``(1 - threshold) * length``; a distance two above it falls short of the
      threshold by at least ``1/length``, far more than any rounding error.
    """
    if length == 0:
        return 1.0  # both empty: the official script's "length == 0 -> NL 0"
    lp = len(pred)
    lg = len(gold)
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
    # Below 0 happens only under the official denominator, when lowercasing lengthens a string
    # ("İ".lower() is 2 code points, "İ".upper() 1); threshold >= 0 zeroes it, as officially.
    return sim if sim >= threshold else 0.0


def normalized_similarity(pred: str, gold: str, threshold: float = 0.5) -> float:
    """Thresholded similarity ``1 - dist / max(len)`` of two already-normalized strings
    (the normalized denominator; see `_thresholded_similarity`)."""
    lp = len(pred)
    lg = len(gold)
    return _thresholded_similarity(pred, gold, lp if lp > lg else lg, threshold)


def anls_score(
    prediction: str | None,
    gold_answers: Sequence[str],
    threshold: float = 0.5,
    length: AnlsLength = "official",
) -> float:
    """ANLS of one prediction against its gold answers; by default the official DocVQA metric.

    Both strings are normalized (strip, lowercase, collapse whitespace) and their Levenshtein
    distance divided by `length`'s denominator:
    * ``"official"`` (default): ``max(len(gold.upper()), len(prediction.upper()))`` of the RAW
      strings, as the official DocVQA/RRC evaluation script does. Results equal that script's
      bit for bit, so held-out figures compare with published ones. Its quirks follow: padding
      whitespace inflates the denominator and so the score (``"ab   "`` vs ``"abc"``: 1 - 1/5),
      and so do characters whose uppercase is longer (``"ß"`` -> ``"SS"``);
    * ``"normalized"``: ``max`` of the normalized lengths (as the `anls` PyPI package does), so
      padding never earns credit; an option for the reward (`reward.anls_length`).
    ``NL = dist / denominator`` (0 when both raw strings are empty); the similarity ``1 - NL`` is
    maximised over the gold answers; a similarity below `threshold` scores 0. In both modes a
    score is 1.0 exactly when the normalized strings are equal.

    The boundary: a similarity of exactly `threshold` (NL == 0.5 at the default) is KEPT, e.g.
    "abcd" vs "abxy" scores 0.5, not 0. That is what the official RRC/DocVQA evaluation script
    does: it computes ``question_result = 1 - min(NL)`` and zeroes it only ``if question_result <
    threshold``. The `anls` PyPI package (0.0.2, ``1 - nl if nl < threshold else 0``) puts the
    boundary on the other side and scores exactly-0.5 pairs 0; everywhere else it agrees with the
    normalized mode.

    None is the empty string. Empty predictions score 0 against every gold answer with visible
    characters (and 1 against an empty gold answer, the official "not answerable" convention).
    Raises ValueError when `gold_answers` is not a non-empty list/tuple of strings, `threshold`
    is outside [0, 1] or `length` is unknown.
    """
    check_gold_answers(gold_answers)
    _check_threshold(threshold)
    _check_length(length)
    raw_pred = prediction or ""
    pred = normalize_answer(raw_pred)
    official = length == "official"
    pred_len = len(raw_pred.upper()) if official else len(pred)
    best = 0.0
    for gold in gold_answers:
        g = normalize_answer(gold)
        gold_len = len(gold.upper()) if official else len(g)
        s = _thresholded_similarity(pred, g, pred_len if pred_len > gold_len else gold_len, threshold)
        if s > best:
            best = s
            if best == 1.0:
                break
    return best


def anls_corpus(
    predictions: Sequence[str | None],
    golds: Sequence[Sequence[str]],
    threshold: float = 0.5,
    length: AnlsLength = "official",
) -> float:
    """Corpus ANLS: the mean of `anls_score` over questions (0.0 for an empty corpus, as officially)."""
    _check_length(length)
    if len(predictions) != len(golds):
        raise ValueError(f"{len(predictions)} predictions but {len(golds)} gold answer lists")
    if not predictions:
        return 0.0
    total = 0.0
    for i, (p, g) in enumerate(zip(predictions, golds)):
        try:
            total += anls_score(p, g, threshold, length)
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

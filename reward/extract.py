"""Answer extraction from verbose generations (the `reward.extraction` option).

Modes:
* ``none``: the whole response is the answer.
* ``answer_prefix``: the text after the LAST "Answer:" / "answer is" / "final answer is:" (any
  case) up to the end of that line (or the next non-empty line when the prefix ends its line);
  one trailing sentence period is dropped ("The answer is 42." -> "42"). Without a prefix the whole
  response is used and the answer counts as not found (the format component scores 0).
* ``last_line`` / ``first_line``: the last / first non-empty line.

Except for ``none``, surrounding whitespace, markdown emphasis/backticks and matching quotes are
stripped from the extracted answer.
"""

from __future__ import annotations

import re

EXTRACTION_MODES = ("none", "answer_prefix", "last_line", "first_line")

_PREFIX = re.compile(r"\banswer\b\s*(?:is\b\s*:?|:)", re.IGNORECASE)
_WRAPPERS = ("**", "__", "`", "*", "_")
_QUOTES = (('"', '"'), ("'", "'"), ("\u201c", "\u201d"), ("\u2018", "\u2019"))


_EDGE_CHARS = frozenset("*_`\"'\u201c\u201d\u2018\u2019")


def _clean(text: str) -> str:
    text = text.strip()
    if not text or (text[0] not in _EDGE_CHARS and text[-1] not in _EDGE_CHARS):
        return text  # fast path: nothing to unwrap
    changed = True
    while changed and text:
        changed = False
        for w in _WRAPPERS:
            if len(text) >= 2 * len(w) and text.startswith(w) and text.endswith(w):
                text = text[len(w) : -len(w)].strip()
                changed = True
        for a, b in _QUOTES:
            if len(text) >= 2 and text[0] == a and text[-1] == b:
                text = text[1:-1].strip()
                changed = True
    return text


def _non_empty_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def extract_answer(text: str | None, mode: str = "none") -> tuple[str, bool]:
    """Return (answer, found). `found` is False when the mode's pattern was absent or empty."""
    if text is None:
        text = ""
    if mode == "none":
        return text, bool(text.strip())
    if mode == "answer_prefix":
        last = None
        for last in _PREFIX.finditer(text):
            pass
        if last is None:
            return _clean(text), False
        rest = text[last.end() :]
        first, _, tail = rest.partition("\n")
        if not first.strip():
            lines = _non_empty_lines(tail)
            first = lines[0] if lines else ""
        answer = _clean(first)
        if answer.endswith(".") and not answer.endswith(".."):
            answer = _clean(answer[:-1])
        return answer, bool(answer)
    if mode in ("last_line", "first_line"):
        lines = _non_empty_lines(text)
        if not lines:
            return "", False
        answer = _clean(lines[-1] if mode == "last_line" else lines[0])
        return answer, bool(answer)
    raise ValueError(f"unknown extraction mode {mode!r}; known: {', '.join(EXTRACTION_MODES)}")

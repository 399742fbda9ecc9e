"""The composite reward: named components, weighted as `reward.components` says. Pure; no Ray.

Components (each in [0, 1]):
* ``anls``: ANLS of the extracted answer against the gold answers (`reward.metrics.anls_score`,
  with `reward.anls_threshold` and the `reward.anls_length` denominator).
* ``exact_match``: normalized exact match.
* ``containment``: partial credit len(gold)/len(answer) when a gold answer is inside the answer.
* ``format``: 1 when the answer was found by the extraction mode, is non-empty and is at most
  `max_answer_chars` characters long.
* ``retrieval``: hit@k or NDCG@k of the retrieved page ids against the sample's gold page (0 for
  a question without one)
  (`retriever.metrics`).
* ``user``: a user function ``module:function`` called as ``fn(sample, response_text,
  retrieved_pages) -> float`` with the raw response text, run with a timeout.

Rejected answers (feedback down-votes, `DocVQASample.rejected_answers`): an answer that
reproduces one (normalized similarity >= `rejected_similarity`) gets reward 0, whatever the
components. A sample with rejected answers but no gold answer (a down-vote without a correction)
scores 0 on the gold-based components (anls, exact_match, containment), so only `format`,
`retrieval` and `user` weights reward the answers that avoid the rejected one.

Every built-in component is computed and reported for every sample (they cost microseconds);
``user`` only when configured. The reward is ``sum(weight * component)`` over `components`.
"""

from __future__ import annotations

import importlib
import math
import numbers
import queue
import threading
from collections.abc import Callable, Sequence

from retriever.metrics import hit_at_k, ndcg_at_k
from reward.config import RewardConfig
from reward.extract import extract_answer
from reward.metrics import anls_score, check_gold_answers, normalize_answer, normalized_similarity
from reward.types import BUILTIN_COMPONENTS, COMPONENT_NAMES, RewardError, ScoreRequest, ScoreResult

# ---------------------------------------------------------------------------------------------
# User reward functions


def load_user_function(path: str) -> Callable:
    """Import ``package.module:function``. Raises RewardError with the reason (not per sample)."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise RewardError(f"reward.user_function {path!r}: expected 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or the module's own import-time failure
        raise RewardError(
            f"reward.user_function {path!r}: cannot import module {module_name!r}: {type(e).__name__}: {e} "
            "(it must be importable on every Ray node: install it or ship it with runtime_env)"
        ) from e
    fn = getattr(module, attr, None)
    if fn is None:
        raise RewardError(f"reward.user_function {path!r}: module {module_name!r} has no attribute {attr!r}")
    if not callable(fn):
        raise RewardError(f"reward.user_function {path!r}: {attr!r} is a {type(fn).__name__}, not a function")
    return fn


class _UserFunctionTimeout(Exception):
    pass


class _Worker(threading.Thread):
    """A daemon thread that runs user-function calls one at a time from a queue."""

    def __init__(self) -> None:
        super().__init__(name="docrl-reward-user-fn", daemon=True)
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()

    def run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            fn, args, box, done = job
            try:
                box.append((True, fn(*args)))
            except BaseException as e:  # noqa: BLE001 - reported to the caller
                box.append((False, e))
            done.set()


class UserFunctionRunner:
    """Calls a user reward function with a timeout.

    The call runs on a daemon worker thread and the caller waits at most `timeout_s`. Python
    cannot kill a thread: a call that times out keeps running (and burning CPU) in the
    background; the runner abandons that thread and starts a fresh one for the next call, and
    counts it in `leaked_threads`. A process that has leaked threads should be recycled:
    `RewardPool` restarts any reward actor that reports a leak. Daemon threads never block
    interpreter exit.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.fn = load_user_function(path)
        self.leaked_threads = 0
        self._worker: _Worker | None = None
        self._lock = threading.Lock()

    def __call__(self, args: tuple, timeout_s: float):
        with self._lock:
            if self._worker is None or not self._worker.is_alive():
                self._worker = _Worker()
                self._worker.start()
            box: list = []
            done = threading.Event()
            self._worker.jobs.put((self.fn, args, box, done))
            if not done.wait(timeout_s):
                self._worker.jobs.put(None)  # let it exit if the runaway call ever returns
                self._worker = None
                self.leaked_threads += 1
                raise _UserFunctionTimeout()
            ok, value = box[0]
            if not ok:
                raise value
            return value


_RUNNERS: dict[str, UserFunctionRunner] = {}
_RUNNERS_LOCK = threading.Lock()


def get_user_runner(path: str) -> UserFunctionRunner:
    """The process-wide runner of `path` (imported once per process)."""
    with _RUNNERS_LOCK:
        runner = _RUNNERS.get(path)
        if runner is None:
            runner = _RUNNERS[path] = UserFunctionRunner(path)
        return runner


def leaked_user_threads() -> int:
    """User-function threads abandoned after a timeout in this process (still running, maybe)."""
    return sum(r.leaked_threads for r in _RUNNERS.values())


def _describe(req: ScoreRequest) -> str:
    return f"sample {req.sample.question_id} (sample_index={req.sample_index}, response_index={req.response_index})"


def _run_user(runner: UserFunctionRunner, req: ScoreRequest, timeout_s: float) -> tuple[float | None, str | None]:
    """(value, None) or (None, error message naming the sample)."""
    try:
        value = runner((req.sample, req.response_text, tuple(req.retrieved_pages)), timeout_s)
    except _UserFunctionTimeout:
        return None, (
            f"reward: user function {runner.path} timed out after {timeout_s:g} s on {_describe(req)}; "
            "its thread cannot be killed and keeps running until it returns (restart the process/actor; "
            "RewardPool does this automatically)"
        )
    except Exception as e:  # noqa: BLE001 - any user error is reported per sample
        return None, f"reward: user function {runner.path} failed on {_describe(req)}: {type(e).__name__}: {e}"
    if isinstance(value, numbers.Real) and math.isfinite(float(value)):
        return float(value), None
    return None, (
        f"reward: user function {runner.path} returned {value!r} ({type(value).__name__}) on {_describe(req)}; "
        "expected a finite float"
    )


# ---------------------------------------------------------------------------------------------
# Scoring


def _text_components(answer: str, found: bool, golds: Sequence[str], config: RewardConfig) -> dict[str, float]:
    # no gold answer (a down-vote without a correction): the gold-based components score 0
    anls = anls_score(answer, golds, config.anls_threshold, config.anls_length) if golds else 0.0
    pred = normalize_answer(answer)
    lp = len(pred)
    exact = contain = 0.0
    for gold in golds:
        g = normalize_answer(gold)
        if g == pred:
            exact = contain = 1.0
            break
        if g and g in pred:
            c = len(g) / lp
            if c > contain:
                contain = c
    stripped = answer.strip()
    fmt = 1.0 if found and stripped and len(stripped) <= config.max_answer_chars else 0.0
    return {"anls": anls, "exact_match": exact, "containment": contain, "format": fmt}


def _retrieval(req: ScoreRequest, config: RewardConfig) -> float:
    if req.sample.gold_page is None:
        # the same 0 for every answer of the question: no advantage moves (its draws of pages are
        # credited by the answers alone), while questions with a gold page (a rater's label) add
        # their labelled page as a positive
        return 0.0
    pages = tuple(req.retrieved_pages)
    if config.retrieval_metric == "hit":
        return hit_at_k(pages, req.sample.gold_page, config.retrieval_k)
    return ndcg_at_k(pages, req.sample.gold_page, config.retrieval_k)


def score_one(request: ScoreRequest, config: RewardConfig, _runner: UserFunctionRunner | None = None) -> ScoreResult:
    """Score one response. Pure apart from the user function (run with `config.user_timeout_s`).

    Raises ValueError naming the sample when its gold answers are not a non-empty list/tuple of
    strings or the response is neither a string nor None; raises RewardError when the user
    function fails and `on_error` is "stop". Under "skip" the result carries `error` instead.
    """
    sample = request.sample
    golds = sample.answers
    rejected = sample.rejected_answers
    if type(golds) not in (tuple, list) or not all(type(g) is str for g in golds) or not (golds or rejected):
        check_gold_answers(golds, where=f"sample {sample.question_id}")  # raises with the reason
    text = request.response_text
    if text is not None and not isinstance(text, str):
        raise ValueError(f"sample {sample.question_id}: response_text must be a string or None (got {type(text).__name__})")
    answer, found = extract_answer(text, config.extraction)
    components = _text_components(answer, found, golds, config)
    components["retrieval"] = _retrieval(request, config)
    error = None
    if config.user_function is not None:
        runner = _runner or get_user_runner(config.user_function)
        value, error = _run_user(runner, request, config.user_timeout_s)
        if error is not None and config.on_error == "stop":
            raise RewardError(error)
        if value is not None:
            components["user"] = value
    reproduced = bool(rejected) and reproduces_rejected(answer, rejected, config.rejected_similarity)
    if error is None and not reproduced:
        reward = sum(w * components[name] for name, w in config.components.items())
    else:
        reward = 0.0
    return ScoreResult(
        question_id=sample.question_id,
        reward=float(reward),
        components=components,
        error=error,
        sample_index=request.sample_index,
        response_index=request.response_index,
        answer=answer,
        reproduced_rejected=reproduced,
    )


def reproduces_rejected(answer: str, rejected: Sequence[str], min_similarity: float) -> bool:
    """Whether `answer` (already extracted) is, after normalization, at least `min_similarity`
    similar to one of the rejected answers."""
    pred = normalize_answer(answer)
    return any(normalized_similarity(pred, normalize_answer(r), min_similarity) >= min_similarity for r in rejected)


def score_batch(requests: Sequence[ScoreRequest], config: RewardConfig) -> list[ScoreResult]:
    """`score_one` over a batch, in order."""
    runner = get_user_runner(config.user_function) if config.user_function is not None else None
    return [score_one(r, config, runner) for r in requests]


def reward_metrics(results: Sequence[ScoreResult], prefix: str = "reward/") -> dict[str, float]:
    """Step metrics: mean reward and mean of each component over results without error, plus the
    error count and rate (results with `error` are excluded from the means, as from the update)."""
    good = [r for r in results if r.error is None]
    n = len(good)
    out = {f"{prefix}errors": float(len(results) - n), f"{prefix}error_rate": (len(results) - n) / max(len(results), 1)}
    out[f"{prefix}mean"] = sum(r.reward for r in good) / n if n else 0.0
    out[f"{prefix}reproduced_rejected"] = sum(r.reproduced_rejected for r in good) / n if n else 0.0
    for name in COMPONENT_NAMES:
        vals = [r.components[name] for r in good if name in r.components]
        if vals:
            out[f"{prefix}{name}"] = sum(vals) / len(vals)
    return out


assert set(BUILTIN_COMPONENTS) | {"user"} == set(COMPONENT_NAMES)

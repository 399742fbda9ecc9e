"""The driver's pure pieces, without Ray: the question sampler, per-request sampling seeds and the
held-out metrics that count every question."""

from __future__ import annotations

import random
import re

import pytest

from cluster.train import QuestionSampler, ScoredRollouts, heldout_metrics, request_seed
from docvqa.sample import DocVQASample
from reward.types import ScoreResult


def _questions(n: int, repeat_ids: bool = False) -> list[DocVQASample]:
    return [DocVQASample(f"q{i % 3 if repeat_ids else i}", f"question {i}", ("a",), "d", "d/p1", ("d/p1",))
            for i in range(n)]


def _indices(sampler: QuestionSampler, batch: list[DocVQASample]) -> list[int]:
    return [next(i for i, s in enumerate(sampler.samples) if s is q) for q in batch]


@pytest.mark.parametrize("num_questions,per_step", [(250, 16), (7, 3), (5, 4), (6, 6), (3, 2)])
def test_a_step_never_holds_a_question_twice_and_every_epoch_holds_each_once(num_questions, per_step):
    sampler = QuestionSampler(_questions(num_questions), seed=0)
    drawn: list[int] = []
    for _ in range(40):
        batch = _indices(sampler, sampler.next(per_step))
        assert len(set(batch)) == per_step, batch
        drawn += batch
    full_epochs = len(drawn) // num_questions
    for e in range(full_epochs):
        assert sorted(drawn[e * num_questions:(e + 1) * num_questions]) == list(range(num_questions))


def test_the_old_sampler_repeated_a_question_at_the_epoch_boundary_of_the_issue():
    """250 questions at 16 per step: the plain epoch-after-epoch order holds a question twice in
    step 16 (the case reported); the sampler's deferral does not."""
    def plain_order(epoch):
        order = list(range(250))
        random.Random(f"0-{epoch}").shuffle(order)
        return order

    stream = plain_order(0) + plain_order(1)
    step16 = stream[15 * 16:16 * 16]
    assert len(set(step16)) < 16  # what the fixed sampler must avoid
    sampler = QuestionSampler(_questions(250), seed=0)
    for _ in range(15):
        sampler.next(16)
    assert len(set(_indices(sampler, sampler.next(16)))) == 16


def test_sampler_state_resumes_exactly_across_an_epoch_boundary():
    samples = _questions(7)
    a = QuestionSampler(samples, seed=3)
    for _ in range(2):
        a.next(3)
    state = a.state()  # position 6 of 7: the next draw crosses into epoch 1
    expected = [_indices(a, a.next(3)) for _ in range(5)]
    b = QuestionSampler(samples, seed=3)
    b.load(state)
    assert [_indices(b, b.next(3)) for _ in range(5)] == expected
    crossing = QuestionSampler(samples, seed=3)
    crossing.load(state)
    crossing.next(3)
    resumed = QuestionSampler(samples, seed=3)
    resumed.load(crossing.state())  # saved inside epoch 1, with its deferred questions
    assert crossing.state()["deferred"] and [_indices(resumed, resumed.next(3)) for _ in range(4)] == expected[1:]


def test_repeated_question_ids_are_distinct_questions_to_the_sampler():
    sampler = QuestionSampler(_questions(6, repeat_ids=True), seed=0)
    batch = sampler.next(6)
    assert sorted(q.question for q in batch) == sorted(f"question {i}" for i in range(6))


def test_more_prompts_per_step_than_questions_is_refused_by_name():
    with pytest.raises(ValueError, match="trainer.prompts_per_step=4 exceeds the 3 training questions"):
        QuestionSampler(_questions(3), seed=0).next(4)


def test_request_seeds_differ_by_question_and_step_and_repeat_exactly():
    seeds = {request_seed(0, 0, f"step-{s}", i) for s in range(1, 51) for i in range(64)}
    assert len(seeds) == 50 * 64
    assert request_seed(0, 0, "step-3", 5) == request_seed(0, 0, "step-3", 5)
    assert request_seed(0, 0, "step-3", 5) != request_seed(1, 0, "step-3", 5)  # the run seed matters
    assert request_seed(0, 0, "step-3", 5) != request_seed(0, 1, "step-3", 5)  # so does rollout.sampling.seed
    assert request_seed(0, None, "step-3", 5) is None  # unseeded sampling stays unseeded
    # vLLM seeds answer j with seed + j: the ranges of a step's requests (n <= 64) never overlap
    ordered = sorted(request_seed(0, 0, "step-1", i) for i in range(256))
    assert min(b - a for a, b in zip(ordered, ordered[1:])) > 64
    assert all(0 <= s < 2 ** 62 for s in seeds)


def _score(i, j, anls, error=None):
    return ScoreResult(f"q{i}", reward=anls, components={"anls": anls, "exact_match": float(anls == 1.0)},
                       error=error, sample_index=i, response_index=j)


def test_heldout_metrics_count_every_question_and_skipped_ones_score_zero():
    questions = _questions(5)
    scored = ScoredRollouts(questions, [("d/p1",)] * 5)
    scored.results = {0: object(), 1: object(), 2: object(), 4: object()}  # question 3: refused by the rollout
    scored.scores = {0: [_score(0, 0, 1.0), _score(0, 1, 0.5)], 1: [_score(1, 0, 0.0)], 2: [_score(2, 0, 1.0)],
                     4: [_score(4, 0, 0.6, error="user fn failed")]}
    scored.skipped = {3: "prompt too long", 4: "user fn failed"}
    out = heldout_metrics(scored)
    # hand-worked: question means 0.75, 0, 1, (0), (0) over 5 questions
    assert out["eval/anls"] == pytest.approx((0.75 + 0.0 + 1.0) / 5)
    assert out["eval/exact_match"] == pytest.approx((0.5 + 0.0 + 1.0) / 5)
    assert out["eval/mean"] == pytest.approx(1.75 / 5)
    assert out["eval/questions"] == 5 and out["eval/skipped_rollout"] == 1 and out["eval/skipped_reward"] == 1
    assert scored.kept() == [0, 1, 2]
    nothing = ScoredRollouts(questions[:2], [(), ()], skipped={0: "x", 1: "y"})
    assert heldout_metrics(nothing)["eval/mean"] == 0.0 and "eval/anls" not in heldout_metrics(nothing)


def test_a_process_death_on_a_live_node_is_not_waited_on_as_a_lost_node():
    """A role's process that died while its node lived on (Ray: "its worker process has died") must
    not make the driver wait NODE_DEATH_WAIT_S (45 s) for a node death that will not come; a closed
    connection still does."""
    from cluster.train import _peer_lost
    from learner.group import LearnerRankLost

    from ray.exceptions import ActorDiedError

    process_died = ActorDiedError()  # as Ray 2.60 words a SIGKILLed actor's death (seen in tests/test_learner_group.py)
    process_died.error_msg = ("The actor died unexpectedly before finishing this task.\n\tpid: 7\n\tip: 127.0.0.1\n"
                              "The actor is dead because its worker process has died. Worker exit type: SYSTEM_ERROR")
    lost = LearnerRankLost("learner group: PPO update: rank 1 died on node 10.0.0.2", rank=1, node_alive=True)
    lost.__cause__ = process_died
    assert not _peer_lost(process_died) and not _peer_lost(lost)
    assert _peer_lost(ConnectionError("Connection reset by peer")) and _peer_lost(RuntimeError("x ActorDiedError y"))


def test_a_learner_rank_lost_says_where_the_run_continues_from(tmp_path):
    """The driver adds to a learner rank's death the step it was in and the checkpoint to resume."""
    from types import SimpleNamespace

    from cluster.checkpoint import CheckpointManager
    from cluster.train import Trainer
    from learner.group import LearnerRankLost

    driver = SimpleNamespace(step=4, _saved_step=4, checkpoints=CheckpointManager(tmp_path / "checkpoints"))
    driver._stops_at = lambda: Trainer._stops_at(driver)
    died = LearnerRankLost("learner group: PPO update: rank 1 died on node 127.0.0.1 (pid 9)", rank=1, node_alive=True)
    with pytest.raises(LearnerRankLost) as raised:
        Trainer._name_lost_rank(driver, died)
    assert raised.value.rank == 1 and raised.value.__cause__ is died
    assert str(raised.value) == (f"{died} (during step 5; the run stops: checkpoint of step 4 in {tmp_path / 'checkpoints'}; "
                                 "continue with --resume)")
    Trainer._name_lost_rank(driver, RuntimeError("anything else"))  # not a rank's death: left as it is


def test_drawn_pages_are_credited_with_their_answers_mean_reward_against_their_questions_other_draws():
    """retriever.learn: two questions, three draws each (each read by two answers). Question 0's
    draws earn 1, 0.5 and 0 (mean 0.5, Bessel std 0.5): advantages 1, 0, -1. Question 1 keeps one
    draw (the others skipped: one refused by the rollout, one with a failed reward), so it has no
    baseline and drops out."""
    from cluster.config import load_config
    from cluster.train import Trainer
    from retriever.page_policy import PageDraw

    cfg = load_config(None, ["retriever.learn.enabled=true", "retriever.learn.pages_per_question=3",
                             "rollout.sampling.n=2", "trainer.prompts_per_step=2", "algorithm.minibatch_size=12"])
    questions = _questions(2)
    pages = ("d/p1", "d/p2", "d/p3")
    draws = [[PageDraw(pages, 0, -0.5, 3), PageDraw(pages, 1, -1.5, 3), PageDraw(pages, 2, -2.5, 3)],
             [PageDraw(pages, 1, -1.0, 3), PageDraw(pages, 1, -1.0, 3), PageDraw(pages, 0, -0.7, 3)]]
    asked = [q for q, drawn in zip(questions, draws) for _ in drawn]
    scored = ScoredRollouts(asked, [(d.page_id,) for drawn in draws for d in drawn])
    scored.results = {i: object() for i in (0, 1, 2, 3, 5)}  # entry 4: refused by the rollout
    scored.scores = {0: [_score(0, 0, 1.0), _score(0, 1, 1.0)], 1: [_score(1, 0, 1.0), _score(1, 1, 0.0)],
                     2: [_score(2, 0, 0.0), _score(2, 1, 0.0)], 3: [_score(3, 0, 1.0), _score(3, 1, 1.0)],
                     5: [_score(5, 0, 0.0), _score(5, 1, 0.0, error="user fn failed")]}
    scored.skipped = {4: "prompt too long", 5: "user fn failed"}
    batch = Trainer(cfg).credit_pages(draws, scored)
    assert batch.queries == [questions[0].question] * 3
    assert batch.candidates == [pages] * 3 and batch.chosen == [0, 1, 2]
    assert batch.sampled_logprobs == [-0.5, -1.5, -2.5] and batch.sampled_versions == [3, 3, 3]
    assert batch.advantages == pytest.approx([1.0, 0.0, -1.0], abs=1e-5)
    assert batch.rewards == pytest.approx([1.0, 0.5, 0.0])  # the reward-weighted loss's targets
    # nothing left to credit: no batch
    scored.skipped.update({1: "x", 2: "y"})
    assert Trainer(cfg).credit_pages(draws, scored) is None


def test_retriever_learning_needs_retrieval_one_page_per_answer_and_counts_its_requests():
    from cluster.config import load_config

    cfg = load_config(None, ["retriever.learn.enabled=true", "retriever.learn.pages_per_question=4",
                             "rollout.sampling.n=2", "trainer.prompts_per_step=3", "algorithm.minibatch_size=8"])
    assert cfg.requests_per_step == 12
    with pytest.raises(ValueError, match=r"must divide the step batch trainer.prompts_per_step \* rollout.sampling.n "
                                         r"\* retriever.learn.pages_per_question = 24"):
        load_config(None, ["retriever.learn.enabled=true", "retriever.learn.pages_per_question=4", "rollout.sampling.n=2",
                           "trainer.prompts_per_step=3", "algorithm.minibatch_size=16"])
    with pytest.raises(ValueError, match="retriever.learn.enabled trains the retriever, but retriever.use_gold_page=true"):
        load_config(None, ["retriever.learn.enabled=true", "retriever.use_gold_page=true", "rollout.sampling.n=2",
                           "trainer.prompts_per_step=2", "algorithm.minibatch_size=4"])
    with pytest.raises(ValueError, match="draws one page per answer, but retriever.top_k=2"):
        load_config(None, ["retriever.learn.enabled=true", "retriever.top_k=2", "rollout.sampling.n=2",
                           "trainer.prompts_per_step=2", "algorithm.minibatch_size=4", "rollout.max_images_per_prompt=2"])


def _question(qid: str, gold_page: str | None = "d/p1", doc_id: str | None = "d"):
    return DocVQASample(qid, "What is the total?", ("12",), doc_id, gold_page, ("d/p1", "d/p2") if doc_id else ())


def test_questions_without_a_gold_page_or_document_are_refused_where_the_config_reads_one():
    from cluster.config import load_config
    from cluster.train import check_questions_fit
    from docvqa.loaders import DataError

    labelled, page_less, doc_less = _question("q1"), _question("q2", gold_page=None), _question("q3", None, None)
    rl = ["retriever.learn.enabled=true", "rollout.sampling.n=2", "trainer.prompts_per_step=2",
          "algorithm.minibatch_size=4", "trainer.warm_start.steps=0"]
    # retriever.learn on document scope needs the document, never the gold page (evaluation may lack it too)
    check_questions_fit(load_config(None, [*rl, "retriever.scope=document"]), [page_less, labelled], [page_less])
    # on corpus scope a question needs neither
    check_questions_fit(load_config(None, [*rl, "retriever.scope=corpus"]), [doc_less, page_less], [doc_less])
    cases = [
        (["retriever.use_gold_page=true"], [labelled], [page_less],
         "retriever.use_gold_page=true hands the policy each question's gold page, but evaluation question q2 has none"),
        ([*rl, "retriever.scope=document"], [labelled, doc_less], [labelled],
         "retriever.scope=document searches each question's document, but training question q3 names none"),
        ([*rl, "reward.components.retrieval=0.5"], [page_less], [labelled],
         "reward.components.retrieval scores the pages read against the gold page, and no training question has one"),
        ([*rl[:-1], "trainer.warm_start.steps=5"], [page_less], [labelled],
         "trainer.warm_start.steps: the supervised warm start reads each question's gold page, and no training"),
    ]
    for overrides, train, evaluation, message in cases:
        with pytest.raises(DataError, match=re.escape(message)):
            check_questions_fit(load_config(None, overrides), train, evaluation)
    # the warm start reads the questions that have a gold page, and the retrieval reward scores
    # them (0 for the others): one is enough
    check_questions_fit(load_config(None, [*rl[:-1], "trainer.warm_start.steps=5", "reward.components.retrieval=0.5"]),
                        [page_less, labelled], [labelled])


def test_training_without_gold_pages_hides_them_from_training_questions_only(tmp_path):
    from cluster.config import load_config
    from docvqa.data import load_train_eval

    cfg = load_config(None, ["data.synthetic.num_documents=6", "data.synthetic.level=sections",
                             "data.train_without_gold_pages=true"])
    train, evaluation, corpus = load_train_eval(cfg.data, tmp_path)
    assert train.samples and all(s.gold_page is None and s.doc_id and s.doc_pages for s in train.samples)
    assert evaluation.samples and all(s.gold_page in corpus.pages for s in evaluation.samples)

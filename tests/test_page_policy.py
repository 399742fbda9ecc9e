"""The retriever as a policy over pages (retriever/page_policy.py), checked by hand on three pages."""

from __future__ import annotations

import math

import pytest
import torch

from learner.ppo import group_advantages
from retriever.page_policy import (
    AdapterLearner,
    PageUpdateBatch,
    QueryAdapter,
    candidate_scores,
    draw_pages,
    page_logprobs,
    reinforce_loss,
    reward_weighted_loss,
    sample_pages,
    truncated_page_weights,
)

SCORES = [1.0, 2.0, 0.5]  # MaxSim of one question against its three candidate pages
T = 0.5


def test_the_page_distribution_by_hand():
    # scores / T = 2, 4, 1; exp: 7.389056, 54.598150, 2.718282; sum 64.705488
    pi = page_logprobs(torch.tensor(SCORES), T).exp()
    assert pi.tolist() == pytest.approx([0.1141952, 0.8437947, 0.0420101], abs=1e-6)
    # a missing candidate (score -inf) has probability 0, the others are as without it
    padded = page_logprobs(torch.tensor(SCORES + [-math.inf]), T).exp()
    assert padded[3] == 0 and padded[:3].tolist() == pytest.approx(pi.tolist(), abs=1e-7)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        page_logprobs(torch.tensor(SCORES), 0.0)


def test_the_loss_and_its_gradient_by_hand():
    """Four answers to one question read pages 0, 1, 1, 2 and earned 1, 0, 0.5, 0."""
    pages, rewards = [0, 1, 1, 2], torch.tensor([1.0, 0.0, 0.5, 0.0])
    advantages = group_advantages(rewards, [7, 7, 7, 7], scale_by_std=False)  # r - mean(r), mean 0.375
    assert advantages.tolist() == pytest.approx([0.625, -0.375, 0.125, -0.375])

    scores = torch.tensor(SCORES, requires_grad=True)
    loss = reinforce_loss(page_logprobs(scores, T)[pages], advantages)
    loss.backward()

    pi = [0.1141952, 0.8437947, 0.0420101]
    expected_loss = -sum(a * math.log(pi[p]) for a, p in zip(advantages.tolist(), pages)) / len(pages)
    assert loss.item() == pytest.approx(expected_loss, abs=1e-6)
    # d loss / d s_j = -(1 / (N T)) * sum_i A_i (1[j == a_i] - pi_j)
    expected_grad = [-sum(a * ((j == p) - pi[j]) for a, p in zip(advantages.tolist(), pages)) / (len(pages) * T)
                     for j in range(3)]
    assert scores.grad.tolist() == pytest.approx(expected_grad, abs=1e-6)
    # the advantages sum to 0, so the pi_j terms cancel: page 0 (the best answer) is pushed up,
    # page 2 (a zero reward) down, page 1 (0 and 0.5 against a 0.375 mean) down a little
    assert expected_grad == pytest.approx([-0.3125, 0.125, 0.1875])
    assert scores.grad[0] < 0 < scores.grad[1] < scores.grad[2]


def test_sampled_pages_follow_the_distribution_and_carry_their_logprobs():
    generator = torch.Generator().manual_seed(0)
    scores = torch.tensor(SCORES + [-math.inf])
    drawn, logprobs = sample_pages(scores, 20_000, T, generator)
    assert drawn.shape == logprobs.shape == (20_000,)
    assert not (drawn == 3).any()  # the missing candidate is never drawn
    assert torch.equal(logprobs, page_logprobs(scores, T)[drawn])
    frequencies = torch.bincount(drawn, minlength=4)[:3].float() / 20_000
    assert frequencies.tolist() == pytest.approx([0.1141952, 0.8437947, 0.0420101], abs=0.01)
    with pytest.raises(ValueError, match="no candidate page with a finite score"):
        sample_pages(torch.full((3,), -math.inf), 2, T)


def test_the_query_adapter_starts_as_the_identity_and_its_gradient_by_hand():
    """One query token q = (1, 0); its best token on the page p* = (0.6, 0.8). At W = 0 the adapted
    token is q itself, and d <normalize(q + qW), p*> / dW = outer(q, p* - <q, p*> q) = [[0, 0.8], [0, 0]]:
    only the direction away from q can grow, towards p*."""
    adapter = QueryAdapter(2)
    q = torch.tensor([[1.0, 0.0]])
    pages = [torch.tensor([[0.6, 0.8], [-1.0, 0.0]]), torch.tensor([[0.0, 1.0]])]
    assert torch.equal(adapter(q), q)
    scores = candidate_scores(adapter(q), pages)
    assert scores.tolist() == pytest.approx([0.6, 0.0])
    scores[0].backward()
    assert adapter.weight.grad.flatten().tolist() == pytest.approx([0.0, 0.8, 0.0, 0.0])
    with pytest.raises(ValueError, match="no candidate pages"):
        candidate_scores(q, [])


def test_reward_alone_teaches_the_adapter_which_page_answers():
    """A question whose answers are right only from page 1, which the untrained retriever ranks
    last of three: sampling pages from pi and REINFORCE on the answers' rewards alone (no gold
    page) moves pi's mass onto page 1."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    query = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    pages = [torch.nn.functional.normalize(torch.randn(5, 8), dim=-1) for _ in range(3)]
    adapter = QueryAdapter(8)
    optimizer = torch.optim.Adam(adapter.parameters(), lr=0.05)

    def pi() -> torch.Tensor:
        with torch.no_grad():
            return page_logprobs(candidate_scores(adapter(query), pages), T).exp()

    before = pi()
    start = int(before.argmin())
    for _ in range(60):
        drawn, _ = sample_pages(candidate_scores(adapter(query), pages).detach(), 8, T, generator)
        rewards = (drawn == start).float()
        if rewards.min() == rewards.max():
            continue  # no baseline to move against (all right or all wrong)
        advantages = group_advantages(rewards, [0] * 8, scale_by_std=False)
        loss = reinforce_loss(page_logprobs(candidate_scores(adapter(query), pages), T)[drawn], advantages)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert before[start] < 0.34 and pi()[start] > 0.9, (before, pi())


def test_truncated_importance_weights_by_hand():
    # drawn with pi_old = 0.5 and 0.25; now pi = 0.8 and 0.75: ratios 1.6 and 3, the second capped at 2
    weights = truncated_page_weights(torch.log(torch.tensor([0.8, 0.75])), torch.log(torch.tensor([0.5, 0.25])), cap=2.0)
    assert weights.tolist() == pytest.approx([1.6, 2.0])
    # weighted loss: -(1/2) (1.6 * 1 * log 0.8 + 2 * (-1) * log 0.75)
    loss = reinforce_loss(torch.log(torch.tensor([0.8, 0.75])), torch.tensor([1.0, -1.0]), weights)
    assert loss.item() == pytest.approx(-(1.6 * math.log(0.8) - 2 * math.log(0.75)) / 2)
    with pytest.raises(ValueError, match="cap must be >= 1"):
        truncated_page_weights(torch.zeros(1), torch.zeros(1), cap=0.5)


def test_draws_name_their_pages_with_logprob_and_version():
    candidates = [("doc-p1", 1.0), ("doc-p2", 2.0), ("doc-p3", 0.5)]
    draws = draw_pages(candidates, 500, T, version=4, generator=torch.Generator().manual_seed(0))
    expected = dict(zip(["doc-p1", "doc-p2", "doc-p3"], page_logprobs(torch.tensor(SCORES), T).tolist()))
    assert len(draws) == 500 and {d.version for d in draws} == {4}
    assert all(d.logprob == pytest.approx(expected[d.page_id]) for d in draws)
    assert sum(d.page_id == "doc-p2" for d in draws) / 500 == pytest.approx(0.8437947, abs=0.05)
    with pytest.raises(ValueError, match="no candidate pages"):
        draw_pages([], 2, T, version=0)


def test_an_update_batch_names_the_entry_whose_draw_is_not_a_candidate():
    with pytest.raises(ValueError, match=r"entry 1 \('Which page\?'\): chosen page 2 is not one of its 2 candidates"):
        PageUpdateBatch(["Total?", "Which page?"], [("a", "b"), ("a", "b")], [0, 2], [0.0, 0.0], [0, 0], [1.0, -1.0],
                        [1.0, 0.0])
    with pytest.raises(ValueError, match="advantages has 1 entries for 2 queries"):
        PageUpdateBatch(["Total?", "Which page?"], [("a",), ("a",)], [0, 0], [0.0, 0.0], [0, 0], [1.0], [1.0, 0.0])


def _toy(seed: int = 0):
    torch.manual_seed(seed)
    query = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    pages = [torch.nn.functional.normalize(torch.randn(5, 8), dim=-1) for _ in range(3)]
    return query, pages


def _step(learner: AdapterLearner, query, pages, generator, right: int):
    """One sync step: 8 answers each read a page drawn by the learner's adapter, right only from `right`."""
    with torch.no_grad():
        scored = learner.scores(query, pages)
    draws = draw_pages([(f"p{j}", s) for j, s in enumerate(scored.tolist())], 8, T, learner.version, generator)
    chosen = [int(d.page_id[1:]) for d in draws]
    rewards = torch.tensor([float(c == right) for c in chosen])
    advantages = group_advantages(rewards, [0] * 8, scale_by_std=False)
    batch = PageUpdateBatch(["q"] * 8, [("p0", "p1", "p2")] * 8, chosen, [d.logprob for d in draws],
                            [d.version for d in draws], advantages.tolist(), rewards.tolist())
    return batch, learner.update(batch, [query] * 8, [pages] * 8)


@pytest.mark.parametrize("loss", ["reward_weighted", "reinforce"])
def test_the_adapter_learner_is_on_policy_in_sync_mode_and_learns_from_reward_alone(loss):
    query, pages = _toy()
    learner = AdapterLearner(8, learning_rate=0.05, temperature=T, loss=loss)
    before = page_logprobs(learner.scores(query, pages), T).exp().detach()
    right = int(before.argmin())
    generator = torch.Generator().manual_seed(1)
    for step in range(60):
        batch, metrics = _step(learner, query, pages, generator, right)
        # the pages were drawn by the adapter being trained: its recomputed logprobs equal the draws'
        assert metrics["retriever/logprob_mismatch_max"] < 1e-5 and metrics["retriever/off_policy_fraction"] == 0
        assert metrics["retriever/version"] == step + 1
    after = page_logprobs(learner.scores(query, pages), T).exp().detach()
    assert before[right] < 0.34 and after[right] > 0.9, (before, after)


def test_the_first_update_is_the_hand_written_reinforce_step():
    """Adam's first step moves each weight by -lr * sign(grad) (to its eps): the update equals one
    computed here from the loss written out, with no clipping at a large max_grad_norm."""
    query, pages = _toy(2)
    learner = AdapterLearner(8, learning_rate=0.01, temperature=T, max_grad_norm=1e9, loss="reinforce")
    batch = PageUpdateBatch(["q"] * 4, [("p0", "p1", "p2")] * 4, [0, 1, 1, 2],
                            page_logprobs(learner.scores(query, pages), T).detach()[[0, 1, 1, 2]].tolist(),
                            [0] * 4, [0.625, -0.375, 0.125, -0.375], [1.0, 0.0, 0.5, 0.0])
    weight = torch.zeros(8, 8, requires_grad=True)
    adapted = torch.nn.functional.normalize(query + query @ weight, dim=-1)
    scores = torch.stack([(adapted @ p.T).amax(dim=1).sum() for p in pages])
    logpi = torch.log_softmax(scores / T, dim=-1)
    loss = -sum(a * logpi[c] for a, c in zip(batch.advantages, batch.chosen)) / 4
    loss.backward()
    metrics = learner.update(batch, [query] * 4, [pages] * 4)
    assert metrics["retriever/loss"] == pytest.approx(loss.item(), abs=1e-6)
    expected = -0.01 * torch.sign(weight.grad) * (weight.grad.abs() > 1e-7)
    assert torch.allclose(learner.adapter.weight.detach(), expected, atol=1e-6)


def test_pages_drawn_by_an_older_version_are_weighted_and_resume_is_exact():
    query, pages = _toy(3)
    learner = AdapterLearner(8, learning_rate=0.05, temperature=T, loss="reinforce")
    generator = torch.Generator().manual_seed(4)
    stale, _ = _step(learner, query, pages, generator, right=0)  # drawn by version 0, learner now at 1
    metrics = learner.update(stale, [query] * 8, [pages] * 8)
    assert metrics["retriever/off_policy_fraction"] == 1.0 and metrics["retriever/logprob_mismatch_max"] == 0.0

    saved = learner.state()
    twin = AdapterLearner(8, learning_rate=0.05, temperature=T, loss="reinforce")
    twin.load(saved)
    gen_a, gen_b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    _, m_a = _step(learner, query, pages, gen_a, right=0)
    _, m_b = _step(twin, query, pages, gen_b, right=0)
    assert m_a == m_b and torch.equal(learner.adapter.weight, twin.adapter.weight)


def test_the_learner_takes_vectors_made_in_inference_mode():
    """Encoders embed under torch.inference_mode(); autograd cannot save such tensors, so the
    learner copies them (before: 'Inference tensors cannot be saved for backward' on the actors)."""
    query, pages = _toy(5)
    with torch.inference_mode():
        query, pages = query.clone(), [p.clone() for p in pages]
    learner = AdapterLearner(8, learning_rate=0.05, temperature=T)
    _, metrics = _step(learner, query, pages, torch.Generator().manual_seed(0), right=1)
    assert metrics["retriever/version"] == 1


def test_the_reward_weighted_loss_and_its_gradient_by_hand_on_three_pages():
    """Draws of pages 0, 1, 1, 2 earning 1.0, 0.0, 0.4, 0.5: page means 1.0, 0.2, 0.5; target
    q = softmax(means / 0.1); loss = -sum_d q_d log softmax(s / 0.25)_d; gradient (pi - q) / 0.25."""
    s = [0.3, -0.2, 0.1]
    scores = torch.tensor(s, requires_grad=True)
    loss, used = reward_weighted_loss([scores], [[0, 1, 1, 2]], [[1.0, 0.0, 0.4, 0.5]], 0.25, 0.1)
    e = [math.exp(m / 0.1) for m in (1.0, 0.2, 0.5)]
    q = [x / sum(e) for x in e]
    z = sum(math.exp(x / 0.25) for x in s)
    pi = [math.exp(x / 0.25) / z for x in s]
    assert used == 1 and loss.item() == pytest.approx(-sum(qd * math.log(p) for qd, p in zip(q, pi)), rel=1e-6)
    loss.backward()
    assert scores.grad.tolist() == pytest.approx([(p - qd) / 0.25 for p, qd in zip(pi, q)], rel=1e-5)
    # a page not drawn has no target: its gradient is pi / T_c, pushing it down
    scores = torch.tensor(s, requires_grad=True)
    loss, _ = reward_weighted_loss([scores], [[0, 0, 2]], [[1.0, 0.0, 0.0]], 0.25, 0.1)
    loss.backward()
    assert scores.grad[1].item() == pytest.approx(pi[1] / 0.25, rel=1e-5)
    # questions that say nothing are left out: one page drawn, or every draw earned the same
    quiet = [torch.tensor(s, requires_grad=True) for _ in range(2)]
    loss, used = reward_weighted_loss(quiet, [[1, 1], [0, 2]], [[1.0, 0.0], [0.5, 0.5]], 0.25, 0.1)
    assert used == 0 and loss.item() == 0.0


def test_the_learner_updates_by_the_reward_weighted_loss_of_each_question():
    """Two questions in one batch (entries interleaved): the learner's loss is the mean of the
    two questions' losses on the adapter's scores, written out here."""
    query, pages = _toy(6)
    other_query, _ = _toy(7)
    learner = AdapterLearner(8, learning_rate=0.01, temperature=T, max_grad_norm=1e9,
                             contrastive_temperature=0.25, reward_temperature=0.1)
    cands = ("p0", "p1", "p2")
    batch = PageUpdateBatch(["a", "b", "a", "b", "a"], [cands] * 5, [0, 2, 1, 1, 1], [0.0] * 5, [0] * 5, [0.0] * 5,
                            [1.0, 0.5, 0.0, 0.0, 0.5])
    with torch.no_grad():
        s_a, s_b = learner.scores(query, pages), learner.scores(other_query, pages)
    expected, used = reward_weighted_loss([s_a, s_b], [[0, 1, 1], [2, 1]], [[1.0, 0.0, 0.5], [0.5, 0.0]], 0.25, 0.1)
    metrics = learner.update(batch, [query, other_query, query, other_query, query], [pages] * 5)
    assert used == 2 and metrics["retriever/examples_used"] == 2
    assert metrics["retriever/loss"] == pytest.approx(expected.item(), abs=1e-6)
    assert torch.count_nonzero(learner.adapter.weight) > 0

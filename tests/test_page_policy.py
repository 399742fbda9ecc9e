"""The retriever as a policy over pages (retriever/page_policy.py), checked by hand on three pages."""

from __future__ import annotations

import math

import pytest
import torch

from learner.ppo import group_advantages
from retriever.page_policy import QueryAdapter, candidate_scores, page_logprobs, reinforce_loss, sample_pages

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

"""The retriever as a policy over pages (retriever/page_policy.py), checked by hand on three pages."""

from __future__ import annotations

import math

import pytest
import torch

from learner.ppo import group_advantages
from retriever.page_policy import page_logprobs, reinforce_loss, sample_pages

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

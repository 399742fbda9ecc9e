"""The retriever as a policy over pages: how it samples pages during rollout, and the loss it learns by.

Within a question's candidate pages (its document, or a shortlist of the corpus) the retriever's
MaxSim scores s_j (retriever/maxsim.py) define a distribution

    pi(j | question) = exp(s_j / T) / sum_k exp(s_k / T)        T: the retrieval temperature

A rollout samples a page for each answer from pi (so the n answers to one question may read
different pages), records log pi of the page it drew under the retriever that sampled it (as
answers record their tokens' logprobs), and credits the page with the reward of the answer read
from it. The update is REINFORCE with a group baseline: the advantages A_i of the same question's
samples, computed by the caller as for answers (`learner.ppo.group_advantages`):

    loss = -(1/N) * sum_i A_i * log pi(a_i | q_i)

so that on the scores of one question, sample i adds to d loss / d s_j

    -(A_i / (N * T)) * (1[j == a_i] - pi_j)

(tests/test_page_policy.py checks both against a hand computation on three pages). A candidate
that is not there (padding of a batch of questions with fewer pages) has score -inf: probability 0,
never sampled, no gradient.

What learns is a query-side adapter (`QueryAdapter`): a residual linear map on the retriever's
query token vectors, zero at the start (the retriever as it was). Pages never pass through it, so
the page vectors, and the index built from them, stay valid while it trains; `candidate_scores`
is the MaxSim of an adapted query against its candidates with the gradient kept.
"""

from __future__ import annotations

import torch


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"retrieval temperature must be > 0, got {temperature}")


def page_logprobs(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """log pi over the candidates (last dimension) of each question: log_softmax(scores / T)."""
    _check_temperature(temperature)
    if scores.shape[-1] == 0:
        raise ValueError("a question has no candidate pages")
    return torch.log_softmax(scores.float() / temperature, dim=-1)


def sample_pages(scores: torch.Tensor, n: int, temperature: float,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` pages drawn from pi (with replacement: each answer draws its own) for one question's
    candidate scores [P]: their indices [n] and their logprobs [n] under pi."""
    if scores.dim() != 1:
        raise ValueError(f"scores must be one question's [P], got shape {tuple(scores.shape)}")
    logprobs = page_logprobs(scores, temperature)
    if not torch.isfinite(logprobs).any():
        raise ValueError("a question has no candidate page with a finite score")
    drawn = torch.multinomial(logprobs.exp(), n, replacement=True, generator=generator)
    return drawn, logprobs[drawn]


def reinforce_loss(logprobs: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """-(1/N) sum_i A_i log pi(a_i | q_i): `logprobs` [N] of the sampled pages under the retriever
    being trained (differentiable), `advantages` [N] (constants)."""
    if logprobs.shape != advantages.shape or logprobs.dim() != 1:
        raise ValueError(f"logprobs {tuple(logprobs.shape)} and advantages {tuple(advantages.shape)} must be [N] alike")
    return -(advantages.detach().to(logprobs.dtype) * logprobs).mean()


class QueryAdapter(torch.nn.Module):
    """q -> normalize(q + q W) on each query token vector q [D], W [D, D] zero at the start."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(dim, dim))

    def forward(self, queries: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(queries + queries @ self.weight, dim=-1)


def candidate_scores(query: torch.Tensor, pages: list[torch.Tensor]) -> torch.Tensor:
    """MaxSim of one query's valid token vectors [Lq, D] against each candidate page's valid token
    vectors [Lp, D]: [P], differentiable in the query (the search's scores, retriever/maxsim.py,
    computed without the gradient, equal these to float32 rounding)."""
    if not pages:
        raise ValueError("a question has no candidate pages")
    return torch.stack([(query @ page.T).amax(dim=1).sum() for page in pages])

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

(tests/test_page_policy.py checks both against a hand computation on three pages).

The default update is instead a reward-weighted contrastive loss (`reward_weighted_loss`, in the
manner of REPLUG's retriever training): for each question, the distinct pages it drew, each with
the mean reward r_d of its answers, give a target distribution q_d = softmax(r_d / tau_r) over
them, and the retriever's distribution at a sharper temperature T_c is pulled towards it:

    loss_question = -sum_{d drawn} q_d * log softmax(s / T_c)_d        (over all its candidates)
    d loss_question / d s_j = (softmax(s / T_c)_j - q_j) / T_c          (q_j = 0 if j was not drawn)

A question whose draws all earned the same reward (or drew one page) says nothing and is left out.
Measured offline on the tiny retriever's sections pages (benchmarks/bench_page_policy.py, three
seeds, 300 steps of 16 questions, a reward marking the gold page, learning rate 1e-3), it took
held-out recall@1 from 0.225 to 0.86 / 0.70 / 0.88 where REINFORCE reached 0.35 / 0.45 / 0.38:
T_c sharp (0.25) gives the scores a large gradient, while the draws stay spread (T) so that every
page gets read. It is not a policy gradient, so no importance weights apply to draws of an older
version: their rewards are targets whichever version drew them. A candidate that is not there (padding of a batch of questions with fewer pages) has score -inf: probability 0,
never sampled, no gradient.

What learns is a query-side adapter (`QueryAdapter`): a residual linear map on the retriever's
query token vectors, zero at the start (the retriever as it was). Pages never pass through it, so
the page vectors, and the index built from them, stay valid while it trains; `candidate_scores`
is the MaxSim of an adapted query against its candidates with the gradient kept.

`AdapterLearner` holds the adapter and its optimizer and makes one update per step from a
`PageUpdateBatch` (the draws of the step's answers, `draw_pages`). Pages drawn by the adapter being
trained (sync mode) are exactly on-policy, which the update checks by recomputing their logprobs
(`retriever/logprob_mismatch_max`); pages drawn by an older version (async mode) are reweighted by
truncated importance weights min(pi / pi_sampler, cap).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path

import torch

ADAPTER_FILE = "retriever_adapter.pt"  # in a checkpoint: the query adapter with its optimizer and version


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


def reinforce_loss(logprobs: torch.Tensor, advantages: torch.Tensor,
                   importance_weights: torch.Tensor | None = None) -> torch.Tensor:
    """-(1/N) sum_i w_i A_i log pi(a_i | q_i): `logprobs` [N] of the sampled pages under the
    retriever being trained (differentiable), `advantages` [N] and `importance_weights` [N]
    (constants; None: all 1, the pages were sampled by the retriever being trained)."""
    if logprobs.shape != advantages.shape or logprobs.dim() != 1:
        raise ValueError(f"logprobs {tuple(logprobs.shape)} and advantages {tuple(advantages.shape)} must be [N] alike")
    weighted = advantages.detach().to(logprobs.dtype)
    if importance_weights is not None:
        if importance_weights.shape != logprobs.shape:
            raise ValueError(f"importance_weights {tuple(importance_weights.shape)} must be [N] like the logprobs")
        weighted = weighted * importance_weights.detach().to(logprobs.dtype)
    return -(weighted * logprobs).mean()


def reward_weighted_loss(scores: list[torch.Tensor], drawn: list[list[int]], rewards: list[list[float]],
                         temperature: float, reward_temperature: float) -> tuple[torch.Tensor, int]:
    """The reward-weighted contrastive loss (module docstring) over questions: `scores[g]` [P_g] the
    candidates' scores of question g (differentiable), `drawn[g]` the candidate index of each of its
    draws and `rewards[g]` each draw's reward. Returns (mean loss over the questions that say
    something, how many did); the loss is 0 (with a graph) when none did."""
    _check_temperature(temperature)
    _check_temperature(reward_temperature)
    losses = []
    for question_scores, chosen, earned in zip(scores, drawn, rewards, strict=True):
        if len(chosen) != len(earned):
            raise ValueError(f"{len(chosen)} draws and {len(earned)} rewards for one question")
        by_page: dict[int, list[float]] = {}
        for c, r in zip(chosen, earned):
            by_page.setdefault(c, []).append(r)
        pages = sorted(by_page)
        mean_reward = torch.tensor([sum(by_page[c]) / len(by_page[c]) for c in pages])
        if len(pages) < 2 or float(mean_reward.max() - mean_reward.min()) == 0.0:
            continue
        target = torch.softmax(mean_reward / reward_temperature, dim=0)
        logprobs = page_logprobs(question_scores, temperature)[pages]
        losses.append(-(target.to(logprobs.dtype) * logprobs).sum())
    if not losses:
        return sum(s.sum() * 0.0 for s in scores), 0
    return torch.stack(losses).mean(), len(losses)


def truncated_page_weights(logprobs: torch.Tensor, sampled_logprobs: torch.Tensor, cap: float) -> torch.Tensor:
    """min(pi(a) / pi_sampler(a), cap) per sampled page, a constant: the pages of an asynchronous
    step were drawn by the retriever before the last update (truncated importance sampling, as the
    learner corrects one-step-stale answers)."""
    if not cap >= 1:
        raise ValueError(f"the importance weight cap must be >= 1, got {cap}")
    return torch.exp((logprobs.detach() - sampled_logprobs).clamp(max=math.log(cap)))


class QueryAdapter(torch.nn.Module):
    """q -> normalize(q + q W) on each query token vector q [D], W [D, D] zero at the start."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(dim, dim))

    def forward(self, queries: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(queries + queries @ self.weight, dim=-1)

    @classmethod
    def from_weights(cls, weights: dict) -> QueryAdapter:
        adapter = cls(weights["weight"].shape[0])
        adapter.load_state_dict(weights)
        return adapter


def adapt_queries(adapter: QueryAdapter | None, vectors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The query vectors a search scores with: through the adapter when there is one (in float32,
    returned in the vectors' dtype)."""
    if adapter is None:
        return vectors
    with torch.no_grad():
        return [adapter(v.float()).to(v.dtype) for v in vectors]


def candidate_scores(query: torch.Tensor, pages: list[torch.Tensor]) -> torch.Tensor:
    """MaxSim of one query's valid token vectors [Lq, D] against each candidate page's valid token
    vectors [Lp, D]: [P], differentiable in the query (the search's scores, retriever/maxsim.py,
    computed without the gradient, equal these to float32 rounding)."""
    if not pages:
        raise ValueError("a question has no candidate pages")
    return torch.stack([(query @ page.T).amax(dim=1).sum() for page in pages])


@dataclass(frozen=True)
class PageDraw:
    """The page one answer read: candidate `chosen` of its question's `candidates`, drawn under
    retriever version `version`, with log pi of the draw under that version."""

    candidates: tuple[str, ...]
    chosen: int
    logprob: float
    version: int

    @property
    def page_id(self) -> str:
        return self.candidates[self.chosen]


def draw_pages(candidates: list[tuple[str, float]], n: int, temperature: float, version: int,
               generator: torch.Generator | None = None) -> list[PageDraw]:
    """`n` draws (one per answer) among one question's scored candidates [(page id, MaxSim)], as
    the search returns them."""
    if not candidates:
        raise ValueError("a question has no candidate pages")
    ids = tuple(pid for pid, _ in candidates)
    drawn, logprobs = sample_pages(torch.tensor([score for _, score in candidates]), n, temperature, generator)
    return [PageDraw(ids, i, lp, version) for i, lp in zip(drawn.tolist(), logprobs.tolist())]


@dataclass
class PageUpdateBatch:
    """What the retriever learns from in one step: entry i is one answer's draw, among the candidate
    pages `candidates[i]` of query `queries[i]`, with the answer's advantage (its question's group
    baseline, computed by the caller as for the answers)."""

    queries: list[str]
    candidates: list[tuple[str, ...]]
    chosen: list[int]  # index of the drawn page in candidates[i]
    sampled_logprobs: list[float]  # log pi of the draw under the retriever that drew it
    sampled_versions: list[int]
    advantages: list[float]
    rewards: list[float]  # the draw's own reward (its answers' mean), before the baseline

    @classmethod
    def from_draws(cls, queries: list[str], draws: list[PageDraw], advantages: list[float],
                   rewards: list[float]) -> PageUpdateBatch:
        return cls(queries, [d.candidates for d in draws], [d.chosen for d in draws], [d.logprob for d in draws],
                   [d.version for d in draws], advantages, rewards)

    def question_groups(self) -> list[list[int]]:
        """The entries of each question, in first-seen order (a question: its text and candidates)."""
        groups: dict[tuple, list[int]] = {}
        for i, key in enumerate(zip(self.queries, self.candidates)):
            groups.setdefault(key, []).append(i)
        return list(groups.values())

    def __post_init__(self) -> None:
        n = len(self.queries)
        for name in ("candidates", "chosen", "sampled_logprobs", "sampled_versions", "advantages", "rewards"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"PageUpdateBatch.{name} has {len(getattr(self, name))} entries for {n} queries")
        for i, (cands, c) in enumerate(zip(self.candidates, self.chosen)):
            if not 0 <= c < len(cands):
                raise ValueError(f"entry {i} ({self.queries[i][:60]!r}): chosen page {c} is not one of its {len(cands)} candidates")


class AdapterLearner:
    """The query adapter with its optimizer: one update per step on a PageUpdateBatch, given the
    frozen encoder's query vectors and the candidates' page vectors (the index's, unchanged).

    Before the update it recomputes the drawn pages' logprobs under the adapter as it is: in sync
    mode the pages were drawn by this very adapter and the two must agree (`logprob_mismatch_max`,
    float32 rounding); pages drawn by an older version (async) are reweighted by truncated importance
    weights."""

    def __init__(self, dim: int, learning_rate: float, temperature: float, weight_cap: float = 2.0,
                 max_grad_norm: float = 1.0, version: int = 0, loss: str = "reward_weighted",
                 contrastive_temperature: float = 0.25, reward_temperature: float = 0.1):
        _check_temperature(temperature)
        if loss not in ("reward_weighted", "reinforce"):
            raise ValueError(f"retriever loss must be 'reward_weighted' or 'reinforce', got {loss!r}")
        self.adapter = QueryAdapter(dim)
        self.optimizer = torch.optim.Adam(self.adapter.parameters(), lr=learning_rate)
        self.temperature, self.weight_cap, self.max_grad_norm = temperature, weight_cap, max_grad_norm
        self.loss, self.contrastive_temperature, self.reward_temperature = loss, contrastive_temperature, reward_temperature
        self.version = version

    def scores(self, query: torch.Tensor, pages: list[torch.Tensor]) -> torch.Tensor:
        # float32 copies: encoders return inference-mode tensors, which autograd cannot save
        return candidate_scores(self.adapter(query.to(torch.float32, copy=True)),
                                [p.to(torch.float32, copy=True) for p in pages])

    def update(self, batch: PageUpdateBatch, query_vectors: list[torch.Tensor],
               candidate_vectors: list[list[torch.Tensor]]) -> dict[str, float]:
        if len(query_vectors) != len(batch.queries) or len(candidate_vectors) != len(batch.queries):
            raise ValueError(f"{len(query_vectors)} query and {len(candidate_vectors)} candidate vector lists "
                             f"for {len(batch.queries)} entries")
        logprobs, entropies, scores = [], [], []
        for query, pages, chosen in zip(query_vectors, candidate_vectors, batch.chosen):
            scores.append(self.scores(query, pages))
            lp = page_logprobs(scores[-1], self.temperature)
            logprobs.append(lp[chosen])
            entropies.append(-(lp.exp() * lp).sum().detach())
        logprobs_t = torch.stack(logprobs)
        sampled = torch.tensor(batch.sampled_logprobs, dtype=logprobs_t.dtype)
        current = torch.tensor([v == self.version for v in batch.sampled_versions])
        used = len(batch.queries)
        if self.loss == "reinforce":
            weights = torch.where(current, torch.ones_like(sampled),
                                  truncated_page_weights(logprobs_t, sampled, self.weight_cap))
            loss = reinforce_loss(logprobs_t, torch.tensor(batch.advantages), weights)
        else:  # a question's entries share its candidates: its scores are any one entry's
            groups = batch.question_groups()
            loss, used = reward_weighted_loss([scores[g[0]] for g in groups], [[batch.chosen[i] for i in g] for g in groups],
                                              [[batch.rewards[i] for i in g] for g in groups],
                                              self.contrastive_temperature, self.reward_temperature)
        self.optimizer.zero_grad()
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.adapter.parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.version += 1
        mismatch = (logprobs_t.detach() - sampled).abs()
        return {"retriever/loss": loss.item(), "retriever/grad_norm": float(grad_norm),
                "retriever/entropy": float(torch.stack(entropies).mean()),
                "retriever/logprob_mismatch_max": float(mismatch[current].max()) if current.any() else 0.0,
                "retriever/off_policy_fraction": float((~current).float().mean()),
                # reward_weighted: questions whose draws earned different rewards; reinforce: every draw
                "retriever/examples_used": float(used),
                "retriever/version": float(self.version)}

    def state(self) -> dict:
        """A copy (state dicts share the live tensors, which the next update changes in place)."""
        return copy.deepcopy({"adapter": self.adapter.state_dict(), "optimizer": self.optimizer.state_dict(),
                              "version": self.version})

    def load(self, state: dict) -> None:
        self.adapter.load_state_dict(state["adapter"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.version = state["version"]


def write_adapter_state(checkpoint: str | Path, state: dict) -> Path:
    """An AdapterLearner state into a checkpoint directory, where `read_adapter_state` finds it."""
    path = Path(checkpoint) / ADAPTER_FILE
    torch.save(state, path)
    return path


def read_adapter_state(checkpoint: str | Path) -> dict | None:
    """A checkpoint's query adapter state (AdapterLearner.state: "adapter" weights, "optimizer",
    "version"), None where the run did not train one."""
    path = Path(checkpoint) / ADAPTER_FILE
    if not path.exists():
        return None
    try:
        state = torch.load(path, weights_only=True)
        state["adapter"]["weight"], int(state["version"])
    except Exception as e:  # a torn or foreign file: name it
        raise ValueError(f"{path} is not a docrl query adapter ({type(e).__name__}: {e})") from None
    return state

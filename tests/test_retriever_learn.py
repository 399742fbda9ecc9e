"""retriever.learn on the retriever actors: the query adapter learns from draws scored by the group's
own search, every shard searches with the new version, and a lost learner actor comes back with it."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.ray]

TEMPERATURE = 0.5


def _draw_batch(group, samples, generator):
    """Four answers per question, each reading a page drawn from the group's scores over the
    question's document; an answer earns 1 from the gold page, else 0 (advantage r - mean)."""
    from retriever.page_policy import PageUpdateBatch, draw_pages

    scored = group.search([s.question for s in samples], k=10_000, candidates=[s.doc_pages for s in samples])
    queries, candidates, chosen, logprobs, versions, advantages, earned = [], [], [], [], [], [], []
    for sample, hits in zip(samples, scored):
        ids = tuple(pid for pid, _ in hits)
        draws = draw_pages(hits, 4, TEMPERATURE, group.adapter_version, generator)
        rewards = [float(d.page_id == sample.gold_page) for d in draws]
        mean = sum(rewards) / len(rewards)
        for d, r in zip(draws, rewards):
            queries.append(sample.question)
            candidates.append(ids)
            chosen.append(ids.index(d.page_id))
            logprobs.append(d.logprob)
            versions.append(d.version)
            advantages.append(r - mean)
            earned.append(r)
    return scored, PageUpdateBatch(queries, candidates, chosen, logprobs, versions, advantages, earned)


def _scores(hits):
    return [dict(h) for h in hits]


def test_the_group_learns_a_query_adapter_that_every_shard_searches_with(ray_cluster, tiny_models, synthetic_corpus,
                                                                        tmp_path):
    from docvqa.loaders import load_docvqa_json
    from retriever.config import RetrieverConfig, RetrieverLearnConfig
    from retriever.group import RetrieverGroup

    ds = load_docvqa_json(synthetic_corpus / "train_v1.0.json")
    samples = [s for s in ds.samples if len(s.doc_pages) > 1][:4]
    model = str(tiny_models["retriever"])
    learn = RetrieverLearnConfig(enabled=True, temperature=TEMPERATURE, learning_rate=0.05)
    group = RetrieverGroup(model, RetrieverConfig(num_actors=2, num_cpus_per_actor=0.5, learn=learn))
    single = RetrieverGroup(model, RetrieverConfig(num_actors=1, num_cpus_per_actor=0.5, learn=learn))
    try:
        group.build(list(ds.pages.values()), tmp_path / "idx")
        single.load(tmp_path / "idx")
        generator = torch.Generator().manual_seed(0)
        before, batch = _draw_batch(group, samples, generator)
        metrics = group.learn(batch)
        # the draws' logprobs came from the search's scores: the learner's recomputation equals them
        assert metrics["retriever/logprob_mismatch_max"] < 1e-4 and metrics["retriever/off_policy_fraction"] == 0
        assert group.adapter_version == 1 and metrics["retriever/version"] == 1
        after = group.search([s.question for s in samples], k=10_000, candidates=[s.doc_pages for s in samples])
        assert _scores(after) != _scores(before)  # the search goes through the new adapter
        # both shards search with it: one actor holding the whole index, given the state, scores the same
        single.load_learner_state(group.learner_state)
        alone = single.search([s.question for s in samples], k=10_000, candidates=[s.doc_pages for s in samples])
        for a, b in zip(_scores(after), _scores(alone)):
            assert a.keys() == b.keys() and all(a[p] == pytest.approx(b[p], abs=1e-5) for p in a)

        # the learner's actor dies: replaced, it comes back with the adapter and its optimizer
        import ray

        ray.kill(group.actors[0], no_restart=True)
        again = group.search([s.question for s in samples], k=10_000, candidates=[s.doc_pages for s in samples])
        assert group.restarts == 1
        for a, b in zip(_scores(again), _scores(after)):
            assert all(a[p] == pytest.approx(b[p], abs=1e-5) for p in a)
        _, batch = _draw_batch(group, samples, generator)
        twin_batch = batch
        metrics = group.learn(batch)
        assert metrics["retriever/version"] == 2 and metrics["retriever/logprob_mismatch_max"] < 1e-4
        # the same update on the one-actor group, from the same state: the same adapter (exact resume)
        twin = single.learn(twin_batch)
        assert twin["retriever/loss"] == pytest.approx(metrics["retriever/loss"], abs=1e-6)
        assert torch.allclose(single.learner_state["adapter"]["weight"], group.learner_state["adapter"]["weight"],
                              atol=1e-6)
    finally:
        group.shutdown()
        single.shutdown()

"""The embedded demo: retrieve a page and answer with vLLM for a few held-out questions, on Ray.

Runs on the tiny preset with no GPU and no download: tiny random models and synthetic pages are
built locally on first use. Training (`docrl train`) grows out of exactly these pieces.
"""

from __future__ import annotations

import logging
import time

from cluster.config import DocRLConfig
from cluster.ray_setup import init_ray
from docvqa.data import load_train_eval
from docvqa.tiny_models import resolve_model

log = logging.getLogger(__name__)


def run_demo(cfg: DocRLConfig, num_questions: int = 4) -> list[dict]:
    import ray

    from common.shipping import ship_if_local
    from docvqa.sample import portable
    from retriever.group import RetrieverGroup
    from reward.metrics import anls_score
    from rollout.group import RolloutGroup
    from rollout.types import RolloutRequest

    t0 = time.time()
    policy_path = resolve_model(cfg.learner.policy, "policy", cfg.run.models_dir)
    retriever_path = resolve_model(cfg.retriever.model, "retriever", cfg.run.models_dir)
    train, evaluation, corpus = load_train_eval(cfg.data, cfg.run.output_dir)
    print(f"data: {len(train)} train / {len(evaluation)} eval questions over {len(corpus.pages)} pages "
          f"in {len(corpus.documents())} documents ({corpus.source})")

    init_ray(cfg.ray.address, cfg.ray.num_cpus, cfg.ray.num_gpus, cfg.ray.include_dashboard)
    print(f"ray: {ray.get_runtime_context().gcs_address} resources {ray.cluster_resources()}")
    timeout = cfg.ray.actor_start_timeout_s
    # models on this host's disk go to the roles as files: they may run on other hosts
    retriever = RetrieverGroup(ship_if_local(retriever_path), cfg.retriever, timeout_s=timeout)
    rollout = RolloutGroup(ship_if_local(policy_path), cfg.rollout, seed=cfg.run.seed)
    indexed = retriever.build(list(corpus.pages.values()))
    print(f"retriever: indexed {indexed['indexed']} pages over {len(retriever.actors)} actor(s), skipped {len(indexed['skipped'])}")

    questions = evaluation.samples[:num_questions]
    hits = retriever.search([q.question for q in questions], cfg.retriever.top_k)
    requests = [RolloutRequest(q.question_id, q.question, tuple(portable(corpus.pages[pid] for pid, _ in hit)))
                for q, hit in zip(questions, hits)]
    generated = rollout.generate(requests, cfg.rollout.eval_sampling)
    for qid, why in generated.skipped.items():
        print(f"skipped question {qid}: {why}")
    by_id = {r.request_id: r for r in generated.results}

    rows = []
    for q, hit in zip(questions, hits):
        if q.question_id not in by_id:
            continue
        answer = by_id[q.question_id].answers[0].text
        rows.append({"question_id": q.question_id, "question": q.question, "gold_page": q.gold_page,
                     "retrieved": hit, "answer": answer, "gold_answers": list(q.answers),
                     "anls": anls_score(answer, q.answers, cfg.reward.anls_threshold)})
    for r in rows:
        top = ", ".join(f"{pid} ({score:.3f})" for pid, score in r["retrieved"])
        print(f"\nQ{r['question_id']}: {r['question']}\n  gold page: {r['gold_page']}   retrieved: {top}\n"
              f"  vLLM answer: {r['answer']!r}\n  gold: {r['gold_answers']}   ANLS: {r['anls']:.3f}")
    print(f"\ndemo finished in {time.time() - t0:.1f}s (random tiny models: answers are noise until trained)")
    rollout.shutdown()
    retriever.shutdown()
    return rows

"""The embedded demo: retrieve a page and answer with vLLM for a few held-out questions, on Ray.

Runs on the tiny preset with no GPU and no download: tiny random models and synthetic pages are
built locally on first use. Training (`docrl train`) grows out of exactly these pieces.
"""

from __future__ import annotations

import logging
import time

from cluster.config import DocRLConfig
from cluster.ray_setup import get_with_timeout, init_ray
from docvqa.data import load_train_eval
from docvqa.tiny_models import resolve_model

log = logging.getLogger(__name__)


def run_demo(cfg: DocRLConfig, num_questions: int = 4) -> list[dict]:
    import ray

    from retriever.actor import RetrieverActor
    from reward.metrics import anls_score
    from rollout.types import RolloutRequest
    from rollout.worker import start_rollout_workers

    t0 = time.time()
    policy_path = resolve_model(cfg.learner.policy, "policy", cfg.run.models_dir)
    retriever_path = resolve_model(cfg.retriever.model, "retriever", cfg.run.models_dir)
    train, evaluation, corpus = load_train_eval(cfg.data, cfg.run.output_dir)
    print(f"data: {len(train)} train / {len(evaluation)} eval questions over {len(corpus.pages)} pages "
          f"in {len(corpus.documents())} documents ({corpus.source})")

    init_ray(cfg.ray.address, cfg.ray.num_cpus, cfg.ray.num_gpus, cfg.ray.include_dashboard)
    print(f"ray: {ray.get_runtime_context().gcs_address} resources {ray.cluster_resources()}")
    timeout = cfg.ray.actor_start_timeout_s
    retriever = RetrieverActor.options(num_cpus=cfg.retriever.num_cpus_per_actor,
                                       num_gpus=cfg.retriever.num_gpus_per_actor).remote(retriever_path, cfg.retriever)
    workers = start_rollout_workers(policy_path, cfg.rollout, seed=cfg.run.seed)
    indexed = get_with_timeout(retriever.add_pages.remote(list(corpus.pages.values())), timeout, "retriever indexing")
    print(f"retriever: indexed {indexed} pages")

    questions = evaluation.samples[:num_questions]
    hits = get_with_timeout(retriever.search.remote([q.question for q in questions], cfg.retriever.top_k),
                            timeout, "retriever search")
    requests = [RolloutRequest(q.question_id, q.question, tuple(corpus.pages[pid] for pid, _ in hit))
                for q, hit in zip(questions, hits)]
    results = get_with_timeout(workers[0].generate.remote(requests, cfg.rollout.eval_sampling), timeout, "rollout worker 0")

    rows = []
    for q, hit, res in zip(questions, hits, results):
        answer = res.answers[0].text
        rows.append({"question_id": q.question_id, "question": q.question, "gold_page": q.gold_page,
                     "retrieved": hit, "answer": answer, "gold_answers": list(q.answers),
                     "anls": anls_score(answer, q.answers, cfg.reward.anls_threshold)})
    for r in rows:
        top = ", ".join(f"{pid} ({score:.3f})" for pid, score in r["retrieved"])
        print(f"\nQ{r['question_id']}: {r['question']}\n  gold page: {r['gold_page']}   retrieved: {top}\n"
              f"  vLLM answer: {r['answer']!r}\n  gold: {r['gold_answers']}   ANLS: {r['anls']:.3f}")
    print(f"\ndemo finished in {time.time() - t0:.1f}s (random tiny models: answers are noise until trained)")
    for w in workers:
        ray.kill(w)
    ray.kill(retriever)
    return rows

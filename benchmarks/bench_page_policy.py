"""How many questions the retriever's query adapter needs to learn the sections level, offline:
no Ray, no policy. The tiny retriever embeds the level's pages and questions once; then each step
draws pages for a batch of training questions from the adapter's distribution (as the driver does)
and rewards each draw by simulated answers: each of `--answers` answers is right (1) with
probability `--answer-accuracy` from the gold page, and wrong (0) from any other page. The
learner is docrl's own `AdapterLearner` (retriever/page_policy.py); `--loss supervised` trains the
same adapter by cross-entropy on the gold page instead (what gold pages would give: the upper
reference). Prints held-out recall@1 (greedy, within each question's document) every 25 steps.

    .venv/bin/python benchmarks/bench_page_policy.py --loss reward_weighted      # the preset's loss
    .venv/bin/python benchmarks/bench_page_policy.py --loss reinforce
    .venv/bin/python benchmarks/bench_page_policy.py --loss supervised --temperature 0.25
    .venv/bin/python benchmarks/bench_page_policy.py --answer-accuracy 0.3       # a weak policy's rewards

About a minute per 200 steps on one core.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    from cluster.config import load_config
    from docvqa.data import load_train_eval
    from docvqa.tiny_models import resolve_model
    from learner.ppo import group_advantages
    from retriever.encoder import PageEncoder
    from retriever.page_policy import AdapterLearner, PageUpdateBatch, draw_pages, page_logprobs

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loss", choices=["reward_weighted", "reinforce", "supervised"], default="reward_weighted")
    parser.add_argument("--temperature", type=float, default=4.0, help="of the draws (supervised: of its softmax)")
    parser.add_argument("--contrastive-temperature", type=float, default=0.25)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--questions-per-step", type=int, default=16)
    parser.add_argument("--draws", type=int, default=4, help="pages drawn per question")
    parser.add_argument("--answers", type=int, default=4, help="answers per drawn page")
    parser.add_argument("--answer-accuracy", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)

    cfg = load_config(ROOT / "configs" / "tiny-retrieval-rl.yaml", [])
    train, held_out, corpus = load_train_eval(cfg.data, tempfile.mkdtemp(prefix="bench-page-policy-"))
    encoder = PageEncoder(resolve_model("tiny", "retriever", str(ROOT / cfg.run.models_dir)))
    t0 = time.perf_counter()
    ids = list(corpus.pages)
    page_vectors = dict(zip(ids, encoder.embed_images([corpus.pages[p].load_image() for p in ids], batch_size=8,
                                                      progress=False)))
    questions = train.samples + held_out.samples
    query_vectors = dict(zip([q.question_id for q in questions], encoder.embed_queries([q.question for q in questions])))
    print(f"{len(train.samples)} training and {len(held_out.samples)} held-out questions, {len(ids)} pages embedded "
          f"in {time.perf_counter() - t0:.0f} s; {vars(args)}", flush=True)

    learner = AdapterLearner(query_vectors[questions[0].question_id].shape[-1], args.learning_rate, args.temperature,
                             max_grad_norm=args.max_grad_norm, loss="reinforce" if args.loss == "supervised" else args.loss,
                             contrastive_temperature=args.contrastive_temperature)

    def scores(q):
        return learner.scores(query_vectors[q.question_id], [page_vectors[p] for p in q.doc_pages])

    def recall(samples) -> float:
        with torch.no_grad():
            return sum(q.doc_pages[int(scores(q).argmax())] == q.gold_page for q in samples) / len(samples)

    rng, generator = random.Random(args.seed), torch.Generator().manual_seed(args.seed)
    print(f"step 0: held-out recall@1 {recall(held_out.samples):.3f} (train {recall(train.samples):.3f})", flush=True)
    for step in range(1, args.steps + 1):
        batch_questions = rng.sample(train.samples, args.questions_per_step)
        if args.loss == "supervised":
            loss = -sum(page_logprobs(scores(q), args.temperature)[q.doc_pages.index(q.gold_page)]
                        for q in batch_questions) / len(batch_questions)
            learner.optimizer.zero_grad()
            loss.backward()
            learner.optimizer.step()
        else:
            entries: dict[str, list] = {k: [] for k in ("q", "draw", "reward")}
            for q in batch_questions:
                with torch.no_grad():
                    scored = scores(q)
                for d in draw_pages(list(zip(q.doc_pages, scored.tolist())), args.draws, args.temperature,
                                    learner.version, generator):
                    right = args.answer_accuracy if d.page_id == q.gold_page else 0.0
                    entries["q"].append(q)
                    entries["draw"].append(d)
                    entries["reward"].append(sum(rng.random() < right for _ in range(args.answers)) / args.answers)
            # the question's other draws as the baseline, as the driver's credit_pages computes it
            advantages = group_advantages(torch.tensor(entries["reward"]), [i // args.draws for i in range(len(entries["q"]))],
                                          scale_by_std=False).tolist()
            batch = PageUpdateBatch.from_draws([q.question for q in entries["q"]], entries["draw"], advantages,
                                               entries["reward"])
            learner.update(batch, [query_vectors[q.question_id] for q in entries["q"]],
                           [[page_vectors[p] for p in q.doc_pages] for q in entries["q"]])
        if step % 25 == 0 or step == args.steps:
            print(f"step {step}: held-out recall@1 {recall(held_out.samples):.3f} (train {recall(train.samples):.3f})",
                  flush=True)


if __name__ == "__main__":
    main()

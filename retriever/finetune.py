"""Contrastive warm start of a multi-vector retriever: teach it which page answers a question.

A tiny ColQwen2 built from random weights ranks pages at random, so retrieval in the loop would
hand the policy the wrong page whatever the policy learns. Before RL, the retriever is trained on
(question, gold page) pairs of the training split with colpali-engine's own loss,
`ColbertNegativeCELoss`: MaxSim of the question against its gold page must beat MaxSim against
`negatives` hard negatives (other pages of the same document first: those are what a search
within the document must tell apart, then pages of other documents) and, in corpus scope and
half-weighted, against the other questions' gold pages in the batch (in-batch InfoNCE).

Queries are encoded as the search encodes them (`PageEncoder.embed_queries`: the processor's
`process_queries`, the format colpali-engine trains with), so what is trained is what is searched.
Attention is eager while training: with SDPA on CPU a padded (fully masked) query row comes out
NaN, and NaN gradients would reach every weight.

An adapter-only checkpoint (vidore/colqwen2-v1.0 and most hub ColQwen models ship a LoRA adapter
over a base directory) is merged into its base before training: trained embeddings would otherwise
be dropped when transformers saves an adapter-loaded model as the adapter alone. The run trains on
the GPU the Ray task was given (`retriever.num_gpus_per_actor`), with bfloat16 autocast when
`retriever.dtype` is bfloat16, and on CPU in float32 otherwise.

The result is a complete model directory that replaces `retriever.model` for the index and the
search. Before/after recall@1 on held-out questions is measured with the index's own search
(`PageIndex.search`), within each question's document or over all their pages, as the run searches.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from common.ray_helpers import task_device
from docvqa.sample import DocVQASample, Page, documents_of
from docvqa.tiny_models import TINY_MANIFEST
from retriever.config import RetrieverWarmStartConfig
from retriever.encoder import MODEL_CLASSES, PageEncoder, infer_model_class
from retriever.evaluate import scope_candidates

SUMMARY_FILE = "docrl_retriever_warm_start.json"
# Bumped when what the warm start writes changes meaning (2: queries in the process_queries
# format; adapters merged): a run's earlier warm start is then rebuilt, not reused.
FORMAT = 2
RUN_SUBDIR = Path("retriever_warm_start") / "model"  # where `docrl train` writes it, under run.output_dir


def run_retriever(retriever_cfg, output_dir: str | Path, models_dir: str | Path) -> str:
    """The retriever a run searches with: its warm-started model when the config warm-starts one
    and the run wrote it (an index the run built refuses any other), else `retriever.model`."""
    from docvqa.tiny_models import resolve_model

    trained = Path(output_dir) / RUN_SUBDIR
    if retriever_cfg.warm_start.steps and (trained / SUMMARY_FILE).exists():
        return str(trained)
    return resolve_model(retriever_cfg.model, "retriever", models_dir)


def negative_pages(sample: DocVQASample, pages_by_doc: dict[str, Sequence[str]], all_pages: Sequence[str], n: int,
                   rng: random.Random) -> list[str]:
    """`n` page ids other than the gold page: the document's other pages (shuffled) first, then
    pages drawn from the rest of the corpus."""
    own = [p for p in pages_by_doc.get(sample.doc_id, ()) if p != sample.gold_page]
    rng.shuffle(own)
    chosen = own[:n]
    taken = set(chosen) | {sample.gold_page}
    if len(taken) + (n - len(chosen)) > len(all_pages):
        raise ValueError(f"retriever warm start: {n} negatives per question need at least {n + 1} pages, "
                         f"the corpus has {len(all_pages)}")
    while len(chosen) < n:
        pid = all_pages[rng.randrange(len(all_pages))]
        if pid not in taken:
            chosen.append(pid)
            taken.add(pid)
    return chosen


def recall_at_1(encoder: PageEncoder, samples: Sequence[DocVQASample], pages: dict[str, Page], scope: str) -> float:
    """Held-out recall@1 with the index's exact search: within each question's document
    (scope "document") or over every page in `pages`."""
    from retriever.index import PageIndex

    samples = list(samples)
    samples = [s for s in samples if s.gold_page is not None]
    if not samples:
        return float("nan")
    ids = list(pages)
    index = PageIndex(encoder.settings())
    for i in range(0, len(ids), 16):  # a few decoded pages at a time, whatever the corpus size
        batch = ids[i:i + 16]
        index.add(batch, encoder.embed_images([pages[p].load_image() for p in batch], names=batch, progress=False))
    queries = encoder.embed_queries([s.question for s in samples])
    hits = index.search(queries, 1, candidates=scope_candidates(samples, scope))
    return sum(bool(h) and h[0][0] == s.gold_page for h, s in zip(hits, samples)) / len(samples)


def merge_adapter(model) -> int:
    """Fold a LoRA adapter that transformers loaded into `model` (an adapter-only checkpoint) into
    the base weights, leaving a plain model that trains and saves whole. Returns the number of
    layers merged (0: no adapter)."""
    if not getattr(model, "_hf_peft_config_loaded", False):
        return 0
    from peft.tuners.tuners_utils import BaseTunerLayer

    merged = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.get_base_layer())
            merged += 1
    model._hf_peft_config_loaded = False
    del model.peft_config
    return merged


def _load_trainable(model_path: str, family: str, device: torch.device):
    import colpali_engine.models as cem

    model_cls, proc_cls = (getattr(cem, name) for name in MODEL_CLASSES[family])
    processor = proc_cls.from_pretrained(model_path)
    model = model_cls.from_pretrained(model_path, dtype=torch.float32, attn_implementation="eager")
    merge_adapter(model)
    return model.to(device), processor


def finetune_retriever(model_path: str, out_dir: str, samples: Sequence[DocVQASample], pages: dict[str, Page],
                       settings: RetrieverWarmStartConfig, scope: str = "corpus", seed: int = 0,
                       eval_samples: Sequence[DocVQASample] = (), eval_pages: dict[str, Page] | None = None,
                       dtype: str = "float32", num_gpus: float = 0.0) -> dict:
    """Train on `samples` (their gold pages, and negatives drawn from `pages`) for `settings.steps`
    steps; write the model to `out_dir` with a summary (loss, held-out recall@1 before and after,
    searched as `scope` says: "document" or "corpus", with vectors in `dtype` as the index
    computes them); returns the summary. `num_gpus`: what the Ray task running it asked for (on a
    GPU when > 0)."""
    from colpali_engine.loss.late_interaction_losses import ColbertNegativeCELoss

    family = infer_model_class(model_path)
    if family not in MODEL_CLASSES or family.startswith("bi"):
        raise ValueError(f"retriever.warm_start trains multi-vector retrievers (colqwen2, colqwen2_5, colpali); "
                         f"retriever.model={model_path!r} is {family}")
    samples = [s for s in samples if s.gold_page in pages]
    if not samples:
        raise ValueError("retriever warm start: no training question has its gold page among the pages given")
    t0 = time.perf_counter()
    device = torch.device(task_device(num_gpus))
    bf16_autocast = device.type == "cuda" and dtype == "bfloat16"
    eval_pages = eval_pages if eval_pages is not None else pages
    recall_before = recall_at_1(PageEncoder(model_path, dtype=dtype, device=str(device)), eval_samples, eval_pages, scope)

    torch.manual_seed(seed)
    rng = random.Random(f"retriever-warm-start-{seed}")
    model, processor = _load_trainable(model_path, family, device)
    if settings.trainable == "embeddings":
        for name, param in model.named_parameters():
            param.requires_grad = "embed_tokens" in name or "custom_text_proj" in name
    model.train()
    # Within a document a question names its page; across documents the same question fits many
    # pages (every document has an invoice page), so in-batch negatives would contradict each other.
    in_batch = 0.0 if scope == "document" else 0.5
    # norm_tol: length-normalized MaxSim of unit vectors lies in [-1, 1]; the library's bounds
    # check assumes [0, 1] (trained models) and prints on every step of an untrained one
    loss_fn = ColbertNegativeCELoss(temperature=settings.temperature, normalize_scores=True, in_batch_term_weight=in_batch,
                                    use_smooth_max=settings.smooth_max, norm_tol=1.0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=settings.learning_rate,
                                  weight_decay=0.0)
    all_pages = sorted(pages)
    pages_by_doc = documents_of(pages.values())
    order: list[DocVQASample] = []
    losses = []
    n, b = settings.negatives, min(settings.batch_size, len(samples))
    for _ in range(settings.steps):
        if len(order) < b:  # epochs of shuffled questions
            more = list(samples)
            rng.shuffle(more)
            order += more
        batch, order = order[:b], order[b:]
        negatives = [negative_pages(s, pages_by_doc, all_pages, n, rng) for s in batch]
        # gold pages and negatives in one call: one padded length for all of them
        shown = [s.gold_page for s in batch] + [pid for negs in negatives for pid in negs]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16_autocast):
            queries = model(**processor.process_queries([s.question for s in batch]).to(device)).float()
            page_vectors = model(**processor.process_images([pages[pid].load_image() for pid in shown]).to(device)).float()
        gold, negs = page_vectors[:b], page_vectors[b:].reshape(b, n, *page_vectors.shape[1:])
        loss = loss_fn(queries, gold, negs)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))

    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    model.eval()
    model.save_pretrained(out)
    processor.save_pretrained(out)
    if (Path(model_path) / TINY_MANIFEST).exists():  # a tiny build's manifest names its family
        shutil.copy(Path(model_path) / TINY_MANIFEST, out / TINY_MANIFEST)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    recall_after = recall_at_1(PageEncoder(str(out), dtype=dtype, device=str(device)), eval_samples, eval_pages, scope)
    k = max(1, len(losses) // 10)
    summary = {"steps": settings.steps, "questions": len(samples), "loss_first": sum(losses[:k]) / k if losses else None,
               "loss_last": sum(losses[-k:]) / k if losses else None, "eval_questions": len(eval_samples),
               "eval_recall@1_before": recall_before, "eval_recall@1_after": recall_after, "scope": scope,
               "device": device.type, "seconds": time.perf_counter() - t0}
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=1))
    return summary

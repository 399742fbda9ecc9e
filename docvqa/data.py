"""From the `data` config section to train and eval datasets over one page corpus."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import shutil
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

from common.storage import Storage, is_uri
from docvqa.config import DataConfig, ExtraSource
from docvqa.loaders import DataError, load_docvqa_json, load_hf_docvqa, merge_datasets, split_by_document
from docvqa.sample import DocVQADataset, DocVQASample, Page

log = logging.getLogger(__name__)


def synthetic_dir(cfg: DataConfig, output_dir: str | Path) -> Path:
    return Path(cfg.path) if cfg.path else Path(output_dir) / "data"


def ensure_synthetic(cfg: DataConfig, output_dir: str | Path) -> Path:
    """Render the synthetic corpus once; reuse it while its settings are unchanged."""
    from docvqa.synthetic import generate_corpus

    out = synthetic_dir(cfg, output_dir)
    stamp = out / "docrl_synthetic.json"
    settings = cfg.synthetic.model_dump()
    if stamp.exists() and json.loads(stamp.read_text()) == settings:
        return out
    s = cfg.synthetic
    generate_corpus(out, num_documents=s.num_documents, seed=s.seed, level=s.level,
                    val_fraction=s.val_fraction, questions_per_document=s.questions_per_document)
    stamp.write_text(json.dumps(settings, sort_keys=True))
    return out


def _annotation_in(directory: Path, split: str) -> Path | None:
    return next((p for p in (directory / f"{split}_v1.0.json", directory / f"{split}.json") if p.exists()), None)


def _load_split(cfg: DataConfig, split: str, output_dir: str | Path) -> DocVQADataset:
    if cfg.source == "hf":
        return load_hf_docvqa(cfg.path, split, config_name=cfg.hf_config, on_bad=cfg.on_bad_sample)
    root = ensure_synthetic(cfg, output_dir) if cfg.source == "synthetic" else Path(cfg.path)
    annotation = _annotation_in(root, split)
    if annotation is None:
        key = "train_split" if split == cfg.train_split else "eval_split"
        where = f"data.path={cfg.path!r}" if cfg.source != "synthetic" else f"the synthetic corpus in {root}"
        raise DataError(f"data.{key}={split!r}: {where} has neither {split}_v1.0.json nor {split}.json"
                        + ("" if root.is_dir() else f" ({root} is not a folder)"))
    return load_docvqa_json(annotation, image_root=cfg.image_root, on_bad=cfg.on_bad_sample)


def load_extra_source(src: ExtraSource, cfg: DataConfig, index: int, output_dir: str | Path = ".") -> DocVQADataset:
    """One of `data.extra_sources`: a file, or a directory holding the train split's file; or an
    object store URI of such a directory (a feedback export there), copied into the run's
    `data/` first."""
    path = Path(src.path)
    if is_uri(src.path):
        path = Path(output_dir) / "data" / f"extra-{hashlib.sha256(src.path.encode()).hexdigest()[:16]}"
        shutil.rmtree(path, ignore_errors=True)
        try:
            Storage(src.path).download_dir("", path)
        except OSError as e:
            raise DataError(f"data.extra_sources[{index}].path={src.path!r}: {e}") from None
    annotation = _annotation_in(path, cfg.train_split) if path.is_dir() else path
    if annotation is None or not annotation.exists():
        raise DataError(f"data.extra_sources[{index}].path={src.path!r}: no annotation file "
                        f"(expected a JSON file, or a directory with {cfg.train_split}.json)")
    return load_docvqa_json(annotation, image_root=src.image_root, on_bad=cfg.on_bad_sample)


def weighted_mix(parts: list[tuple[list[DocVQASample], float]], seed: int,
                 max_growth: int = 20) -> list[DocVQASample]:
    """One epoch of training questions in which each part's share is its weight over the sum.

    The epoch is the shortest in which no part has to leave questions out (capped at
    `max_growth` times the questions there are); a part whose share needs more questions than it
    has repeats them, each repeat with `#k` appended to its question id so that the questions of
    one step stay distinct. The trainer's sampler shuffles the list, so parts are interleaved.
    """
    parts = [(samples, w) for samples, w in parts if samples]
    if len(parts) <= 1:
        return list(parts[0][0]) if parts else []
    total_w = sum(w for _, w in parts)
    total_n = sum(len(s) for s, _ in parts)
    length = min(max(math.ceil(len(s) * total_w / w) for s, w in parts), max_growth * total_n)
    out: list[DocVQASample] = []
    for i, (samples, w) in enumerate(parts):
        slots = max(1, round(length * w / total_w))
        order = list(range(len(samples)))
        random.Random(f"{seed}-mix-{i}").shuffle(order)  # which questions an undersampled part keeps
        if slots < len(samples):
            log.warning("data mix: part %d (weight %g) keeps %d of its %d questions per epoch", i, w, slots, len(samples))
        for j in range(slots):
            s = samples[order[j % len(samples)]]
            k = j // len(samples)
            out.append(s if k == 0 else replace(s, question_id=f"{s.question_id}#{k}"))
    return out


def load_train_eval(cfg: DataConfig, output_dir: str | Path) -> tuple[DocVQADataset, DocVQADataset, DocVQADataset]:
    """(train, eval, corpus): the corpus holds every page of both splits, for the retriever index.

    With `data.extra_sources`, `train.samples` is the weighted mix (`weighted_mix`) of the main
    split and the extra sources, and the corpus holds their pages too."""
    train = _load_split(cfg, cfg.train_split, output_dir)
    if cfg.holdout_fraction > 0:
        train, evaluation = split_by_document(train, cfg.holdout_fraction, cfg.shuffle_seed)
    else:
        evaluation = _load_split(cfg, cfg.eval_split, output_dir)
    for ds, name in ((train, "train"), (evaluation, "eval")):
        if ds.skipped:
            log.warning("%s data (%s): skipped %s; first: %s", name, ds.source, ds.skipped, ds.skipped_examples[:3])
    if cfg.max_train_samples:
        train.samples = train.samples[: cfg.max_train_samples]
    if cfg.max_eval_samples:
        evaluation.samples = evaluation.samples[: cfg.max_eval_samples]
    if cfg.train_without_gold_pages:
        train.samples = [replace(s, gold_page=None) for s in train.samples]
    if not cfg.extra_sources:
        return train, evaluation, merge_datasets([train, evaluation])
    extras = [load_extra_source(src, cfg, i, output_dir) for i, src in enumerate(cfg.extra_sources)]
    for ds in extras:
        if ds.skipped:
            log.warning("extra data (%s): skipped %s; first: %s", ds.source, ds.skipped, ds.skipped_examples[:3])
    every = merge_datasets([train, *extras])  # question ids must be unique across sources
    corpus = merge_datasets([every, evaluation])
    mixed = weighted_mix([(train.samples, cfg.weight)] + [(ds.samples, src.weight)
                                                          for ds, src in zip(extras, cfg.extra_sources)],
                         seed=cfg.shuffle_seed)
    if cfg.train_without_gold_pages:
        mixed = [replace(s, gold_page=None) for s in mixed]
    log.info("training questions: %s", ", ".join(f"{ds.source}: {len(ds)} (weight {w:g})" for ds, w in
                                                  [(train, cfg.weight)] + [(d, s.weight) for d, s in
                                                                           zip(extras, cfg.extra_sources)]))
    train = DocVQADataset(samples=mixed, pages=every.pages, source=every.source, skipped=every.skipped,
                          skipped_examples=every.skipped_examples)
    return train, evaluation, corpus


def corpus_fingerprint(pages: Iterable[Page]) -> str:
    """What a page index was built from: every page id with its image's identity (file size and
    modification time for a page on disk, a hash of the bytes for an embedded one). Re-rendered
    or replaced pages under the same ids change it; copying a run directory with its timestamps
    does not. Reading stats only, it stays cheap at 100,000 pages on disk."""
    h = hashlib.sha256()
    for page in sorted(pages, key=lambda p: p.page_id):
        if page.image_path is not None:
            st = os.stat(page.image_path)
            identity = f"{st.st_size}:{st.st_mtime_ns}"
        else:
            identity = hashlib.sha256(page.image_bytes).hexdigest()
        h.update(f"{page.page_id}\0{identity}\n".encode())
    return h.hexdigest()


def files_fingerprint(path: str | Path) -> str:
    """Identity of a model directory (names, sizes and modification times of its files), or the
    string itself for a hub id that is not a local directory."""
    root = Path(path)
    if not root.is_dir():
        return str(path)
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        st = f.stat()
        h.update(f"{f.relative_to(root)}\0{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()

"""From the `data` config section to train and eval datasets over one page corpus."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from docvqa.config import DataConfig
from docvqa.loaders import load_docvqa_json, load_hf_docvqa, merge_datasets, split_by_document
from docvqa.sample import DocVQADataset

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


def _load_split(cfg: DataConfig, split: str, output_dir: str | Path) -> DocVQADataset:
    if cfg.source == "hf":
        return load_hf_docvqa(cfg.path, split, config_name=cfg.hf_config, on_bad=cfg.on_bad_sample)
    root = ensure_synthetic(cfg, output_dir) if cfg.source == "synthetic" else Path(cfg.path)
    candidates = [root / f"{split}_v1.0.json", root / f"{split}.json"]
    annotation = next((p for p in candidates if p.exists()), None)
    if annotation is None:
        raise FileNotFoundError(f"data.{'train_split' if split == cfg.train_split else 'eval_split'}={split!r}: "
                                f"none of {', '.join(map(str, candidates))} exists")
    return load_docvqa_json(annotation, image_root=cfg.image_root, on_bad=cfg.on_bad_sample)


def load_train_eval(cfg: DataConfig, output_dir: str | Path) -> tuple[DocVQADataset, DocVQADataset, DocVQADataset]:
    """(train, eval, corpus): the corpus holds every page of both splits, for the retriever index."""
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
    corpus = merge_datasets([train, evaluation])
    return train, evaluation, corpus

"""The `data` config section: where questions and pages come from, and what to do with bad records."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from common.schema import Section


class SyntheticConfig(Section):
    """Documents rendered locally by `docvqa.synthetic` (no download)."""

    num_documents: int = Field(40, ge=2)
    seed: int = 0
    level: Literal["easy", "realistic", "sections"] = "realistic"
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    questions_per_document: int = Field(3, ge=1)


class ExtraSource(Section):
    """More training questions, mixed with the main source by weight (e.g. a feedback export)."""

    # an annotation file (e.g. <export>/train.json) or a directory holding <data.train_split>.json
    # or <data.train_split>_v1.0.json
    path: str
    format: Literal["docvqa_json"] = "docvqa_json"
    image_root: str | None = None  # default: the annotation file's folder
    weight: float = Field(1.0, gt=0.0)


class DataConfig(Section):
    # synthetic: render under `path` (default <run.output_dir>/data); docvqa_json: the official
    # annotation files under `path` with images under `image_root`; hf: a hub id or a local
    # parquet/arrow directory in the lmms-lab/DocVQA layout.
    source: Literal["synthetic", "docvqa_json", "hf"] = "synthetic"
    path: str | None = None
    hf_config: str | None = "DocVQA"  # the dataset config name of lmms-lab/DocVQA
    image_root: str | None = None
    train_split: str = "train"
    eval_split: str = "val"
    # Only lmms-lab/DocVQA's validation split has answers: a real run may hold out a fraction of its
    # documents for evaluation instead of using a second split.
    holdout_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    max_train_samples: int | None = Field(None, ge=1)
    max_eval_samples: int | None = Field(None, ge=1)
    on_bad_sample: Literal["skip", "stop"] = "skip"
    shuffle_seed: int = 0
    synthetic: SyntheticConfig = SyntheticConfig()
    # Training questions from more sources. Each source's share of the questions drawn per epoch
    # is its weight over the sum of weights (the main source's weight is `weight`); evaluation
    # stays on the main source.
    weight: float = Field(1.0, gt=0.0)
    extra_sources: list[ExtraSource] = Field(default_factory=list)
    # Training questions lose their gold page once loaded (evaluation questions keep theirs, to
    # measure recall): a run as on data without page labels, where only the reward says which page
    # answered (retriever.learn). What reads a gold page in training is then refused at start.
    train_without_gold_pages: bool = False

    @model_validator(mode="after")
    def _source_needs_path(self) -> DataConfig:
        if self.source in ("docvqa_json", "hf") and not self.path:
            raise ValueError(f"data.path is required when data.source is {self.source!r}")
        if self.holdout_fraction > 0 and self.eval_split != self.train_split:
            raise ValueError(
                "data.holdout_fraction holds out documents of data.train_split for evaluation; "
                f"set data.eval_split to {self.train_split!r} too (got {self.eval_split!r})"
            )
        return self

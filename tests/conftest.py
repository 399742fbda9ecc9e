"""Shared test fixtures: one local Ray cluster per session, tiny models and a corpus built once."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # an accidental download fails fast instead of hanging
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster on loopback for the whole session (2 fake GPUs for placement tests)."""
    import ray

    from cluster.ray_setup import init_ray

    init_ray(num_cpus=8, num_gpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def synthetic_corpus(tmp_path_factory):
    """A small realistic synthetic corpus in the official DocVQA JSON layout, rendered once."""
    from docvqa.synthetic import generate_corpus

    out = tmp_path_factory.mktemp("synthetic")
    generate_corpus(out, num_documents=8, seed=3, level="realistic", questions_per_document=2)
    return out


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """The tiny policy and retriever, built once per session: {"policy": Path, "retriever": Path}."""
    from docvqa.tiny_models import build_tiny_models

    return build_tiny_models(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="session")
def page(synthetic_corpus):
    """The gold page of the corpus's first training question (a realistic synthetic page)."""
    from docvqa.loaders import load_docvqa_json

    ds = load_docvqa_json(synthetic_corpus / "train_v1.0.json")
    return ds.pages[ds.samples[0].gold_page]

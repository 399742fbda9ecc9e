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


LAST_SERVE_USER = pytest.StashKey[str]()


def pytest_collection_modifyitems(config, items):
    """The modules that use the shared models run one after another, from where the first of them
    is, so that Serve (its controller, proxy and replicas) runs only while they do; note the last
    test of the last of them (its module fixtures, which delete that module's applications, end
    with it)."""
    def module(item) -> str:
        return item.nodeid.split("::")[0]

    modules = {module(item) for item in items if "served_models" in getattr(item, "fixturenames", ())}
    if not modules:
        return
    users = [item for item in items if module(item) in modules]
    first = items.index(users[0])
    others = [item for item in items if module(item) not in modules]
    items[:] = others[:first] + users + others[first:]
    config.stash[LAST_SERVE_USER] = users[-1].nodeid


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
    """Serve, with the shared models, ends after the last test that uses it (not at the end of the
    session): the tests after it get the whole Ray cluster, as if Serve had never run."""
    if item.config.stash.get(LAST_SERVE_USER, None) == item.nodeid:
        from ray import serve

        serve.shutdown()


@pytest.fixture(scope="session")
def served_models(ray_cluster, tiny_models, synthetic_corpus, tmp_path_factory):
    """Serve on 127.0.0.1 with the shared models (tests/serving.py): the tiny retriever over an
    index of the corpus's first six pages (by id), and the tiny policy with a random LoRA adapter
    (weights version 3). Started at the first test that needs it; Serve is shut down after the
    last test of the last module that uses it (pytest_runtest_teardown above), or here at the end."""
    from ray import serve
    from serving import COMMON_OVERRIDES, SHARED_MODELS, lora_checkpoint, page_index

    from cluster.config import load_config
    from common.ray_helpers import free_port
    from deploy.app import build_application, wait_until_running
    from docvqa.loaders import load_docvqa_json

    work = tmp_path_factory.mktemp("served-models")
    checkpoint = lora_checkpoint(str(tiny_models["policy"]), work, version=3)
    corpus = load_docvqa_json(synthetic_corpus / "train_v1.0.json")
    pages = sorted(corpus.pages.values(), key=lambda p: p.page_id)[:6]
    index = page_index(str(tiny_models["retriever"]), pages, work / "index")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        cfg = load_config(None, [f"run.output_dir={work}", f"retriever.model={tiny_models['retriever']}",
                                 f"serve.port={port}", *COMMON_OVERRIDES])
        serve.run_many([serve.api.RunTarget(build_application(cfg, str(checkpoint), str(index)), name=SHARED_MODELS,
                                            route_prefix=f"/{SHARED_MODELS}")],
                       wait_for_ingress_deployment_creation=False, wait_for_applications_running=False)
        wait_until_running([SHARED_MODELS], timeout_s=300)
        yield {"port": port, "url": f"http://127.0.0.1:{port}", "work": work, "checkpoint": checkpoint, "index": index,
               "pages": pages}
    finally:
        serve.shutdown()

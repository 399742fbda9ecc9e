"""The Ray Serve endpoint, end to end on loopback: applications in the shared Ray cluster, one
serving a LoRA checkpoint over a multi-page index (the session's shared models, tests/serving.py),
one a merged (full) checkpoint over a one-page index, driven with the real `openai` client and
plain HTTP."""

from __future__ import annotations

import base64
import json
import os
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from serving import API_KEY, COMMON_OVERRIDES, KEY_ENV, SHARED_MODELS, delete_apps, png_data_url

pytestmark = [pytest.mark.ray, pytest.mark.vllm, pytest.mark.slow]


@pytest.fixture(scope="module")
def served(served_models, tiny_models):
    """The session's shared models behind this module's ingress (LoRA checkpoint, six-page index, an
    API key); a second application with its own models (a full checkpoint over a one-page index);
    a third ingress over the shared models that takes one request at a time. Deleted at the end."""
    from ray import serve

    from cluster.config import load_config
    from deploy.app import build_application, wait_until_running
    from learner.types import ExportedWeights
    from retriever.index import load_index, save_index
    from rollout.parity import perturbed_state_dict
    from rollout.policy import write_policy

    work = served_models["work"] / "serve"
    work.mkdir()
    policy = str(tiny_models["policy"])
    write_policy(work / "full-ckpt" / "policy", policy,
                 ExportedWeights(5, "full", tensors=perturbed_state_dict(policy, scale=0.1)), step=5)
    pages = served_models["pages"]
    save_index(load_index(served_models["index"], page_range=(0, 1)), work / "one-page-index")  # its first page alone

    os.environ[KEY_ENV] = API_KEY
    port = served_models["port"]
    common = [f"run.output_dir={work}", f"retriever.model={tiny_models['retriever']}", *COMMON_OVERRIDES,
              f"serve.port={port}", "serve.limits.max_request_bytes=262144", "serve.limits.max_images_per_request=2",
              "serve.limits.max_image_pixels=250000", "serve.limits.max_tokens=64", "serve.default_max_tokens=8"]
    cfg = load_config(None, common + [f"serve.api_key_env={KEY_ENV}", "retriever.top_k=3"])
    one_cfg = load_config(None, common)
    # an ingress over the shared models that takes one request at a time and queues one more
    busy_cfg = load_config(None, common + ["serve.ingress.max_ongoing_requests=1", "serve.ingress.max_queued_requests=1",
                                           "serve.ingress.retry_after_s=2"])
    checkpoint = str(served_models["checkpoint"])
    serve.run_many([serve.api.RunTarget(build_application(cfg, checkpoint, "", share_models_of=SHARED_MODELS),
                                        name="docrl", route_prefix="/"),
                    serve.api.RunTarget(build_application(one_cfg, str(work / "full-ckpt"), str(work / "one-page-index")),
                                        name="docrl-one", route_prefix="/one"),
                    serve.api.RunTarget(build_application(busy_cfg, str(work / "full-ckpt"), "", share_models_of=SHARED_MODELS),
                                        name="docrl-busy", route_prefix="/busy")],
                   wait_for_ingress_deployment_creation=False, wait_for_applications_running=False)
    try:
        wait_until_running(["docrl", "docrl-one", "docrl-busy"], timeout_s=300)
        yield {"url": served_models["url"], "index_pages": [p.page_id for p in pages],
               "index_docs": {p.page_id: p.doc_id for p in pages}, "one_page": pages[0].page_id, "work": work,
               "one_index": work / "one-page-index"}
    finally:
        delete_apps("docrl", "docrl-one", "docrl-busy")


@pytest.fixture
def client(served):
    from openai import OpenAI

    return OpenAI(base_url=served["url"] + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def _post(served, path, body, key=API_KEY, **kw):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(served["url"] + path, json=body, headers=headers, timeout=60, **kw)


# -- the OpenAI-compatible API ----------------------------------------------------------------


def test_models_list_names_the_served_checkpoint(client):
    models = client.models.list()
    (m,) = models.data
    assert m.id == "docrl" and m.model_extra["kind"] == "lora" and m.model_extra["weights_version"] == 3
    assert m.model_extra["retriever_version"] == 0  # the retriever as trained before RL: no query adapter


def test_chat_with_an_image(client):
    out = client.chat.completions.create(model="docrl", max_tokens=6, temperature=0, messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_data_url()}},
                                     {"type": "text", "text": "What does this page say?"}]}])
    assert out.id.startswith("chatcmpl-") and out.object == "chat.completion"
    (choice,) = out.choices
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert out.usage.prompt_tokens > 20 and 1 <= out.usage.completion_tokens <= 6  # the image's tokens count


def test_multi_turn_chat_and_n_completions(client):
    out = client.chat.completions.create(model="docrl", max_tokens=4, temperature=1.0, n=2, seed=1, messages=[
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": "What is the total?"}])
    assert [c.index for c in out.choices] == [0, 1]


def test_streaming_sends_tokens_as_server_sent_events(client):
    stream = client.chat.completions.create(model="docrl", max_tokens=8, temperature=1.0, seed=3, stream=True,
                                            stream_options={"include_usage": True}, messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_data_url(color="gray")}},
                                     {"type": "text", "text": "Read it."}]}])
    chunks = list(stream)
    ids = {c.id for c in chunks}
    assert len(ids) == 1 and ids.pop().startswith("chatcmpl-")
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"] or finishes == ["stop"]
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens >= len(deltas) >= 1  # several events, not one blob
    if finishes == ["length"]:
        assert usage.completion_tokens == 8


def test_overload_beyond_the_queue_is_refused_at_once_with_503_and_retry_after(served):
    """serve.ingress.max_queued_requests: past one running and one queued request, the rest are
    refused at once (503, Retry-After) instead of waiting; none fails otherwise."""
    import asyncio
    import time

    url = served["url"] + "/busy/v1/chat/completions"

    def body(i):
        return {"model": "docrl", "max_tokens": 32, "temperature": 1.0, "seed": i, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": png_data_url()}}, {"type": "text", "text": f"Question {i}"}]}]}

    assert httpx.post(url, json=body(0), timeout=120).status_code == 200  # the ingress is up and has its handles

    async def all_at_once():
        async with httpx.AsyncClient(timeout=120) as client:
            async def one(i):
                r = await client.post(url, json=body(i))
                return r, time.monotonic()
            return await asyncio.gather(*(one(i) for i in range(12)))

    results = asyncio.run(all_at_once())
    codes = [r.status_code for r, _ in results]
    assert set(codes) <= {200, 503} and codes.count(200) >= 2 and codes.count(503) >= 4, codes
    refused = [(r, t) for r, t in results if r.status_code == 503]
    assert all(r.headers.get("retry-after") == "2" for r, _ in refused)
    # refused at once, not queued: every refusal came back before the last answer (the answers are
    # served one at a time, so the last one ends at least two generations after they were sent)
    last_answer = max(t for r, t in results if r.status_code == 200)
    assert max(t for _, t in refused) < last_answer, [(r.status_code, t) for r, t in results]


def test_fifty_concurrent_requests_all_succeed(served):
    def one(i):
        if i % 2:
            return _post(served, "/v1/docqa", {"question": f"What is the total of invoice {i}?", "k": 2})
        return _post(served, "/v1/chat/completions", {"model": "docrl", "max_tokens": 4, "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_data_url()}},
                                         {"type": "text", "text": f"Question {i}"}]}]})

    with ThreadPoolExecutor(50) as pool:
        responses = list(pool.map(one, range(50)))
    assert [r.status_code for r in responses] == [200] * 50
    assert len({r.json()["id"] for r in responses}) == 50


# -- document QA ------------------------------------------------------------------------------


def test_docqa_answers_with_pages_of_the_index_ranked_by_score(served):
    r = _post(served, "/v1/docqa", {"question": "What is the invoice total?", "k": 4})
    timing = dict(part.strip().split(";dur=") for part in r.headers["server-timing"].split(","))
    assert set(timing) == {"retrieve", "generate"} and all(float(v) > 0 for v in timing.values())
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"].startswith("docqa-") and isinstance(body["answer"], str) and body["finish_reason"] in ("stop", "length")
    cites = body["citations"]
    assert [c["rank"] for c in cites] == [1, 2, 3, 4]
    assert all(c["page_id"] in served["index_pages"] for c in cites)
    assert len({c["page_id"] for c in cites}) == 4
    scores = [c["score"] for c in cites]
    assert scores == sorted(scores, reverse=True)
    assert [c["read"] for c in cites] == [True, False, False, False]  # the tiny preset reads one page, as in training
    assert body["usage"]["prompt_tokens"] > 20 and body["weights_version"] == 3


def test_docqa_within_one_document_cites_only_its_pages_with_their_exact_scores(served):
    """`doc_id` searches only that document's pages (as retriever.scope: document does in training),
    scored as in a search of the whole index; concurrent scoped and unscoped questions (one batch
    in the retriever) each get their own; an unknown document is a 404 naming it."""
    docs = {}
    for pid, doc in served["index_docs"].items():
        docs.setdefault(doc, []).append(pid)
    doc, own = max(docs.items(), key=lambda d: len(d[1]))
    assert 1 < len(own) < 6
    question = "What is the invoice total?"
    with ThreadPoolExecutor(4) as pool:
        everything, scoped, scoped_k1, plain = pool.map(lambda body: _post(served, "/v1/docqa", body), [
            {"question": question, "k": 6}, {"question": question, "k": 6, "doc_id": doc},
            {"question": question, "k": 1, "doc_id": doc}, {"question": "Who signed the letter?", "k": 2}])
    for r in (everything, scoped, scoped_k1, plain):
        assert r.status_code == 200, r.text
    every_score = {c["page_id"]: c["score"] for c in everything.json()["citations"]}
    cites = scoped.json()["citations"]
    assert sorted(c["page_id"] for c in cites) == sorted(own) and all(c["doc_id"] == doc for c in cites)
    assert [c["rank"] for c in cites] == list(range(1, len(own) + 1)) and cites[0]["read"]
    for c in cites:
        assert c["score"] == pytest.approx(every_score[c["page_id"]], abs=1e-4)
    best_of_doc = max(own, key=lambda pid: every_score[pid])
    assert [c["page_id"] for c in scoped_k1.json()["citations"]] == [best_of_doc]
    assert len(plain.json()["citations"]) == 2

    r = _post(served, "/v1/docqa", {"question": question, "doc_id": "no-such-doc"})
    assert r.status_code == 404, r.text
    error = r.json()["error"]
    assert "'no-such-doc'" in error["message"] and error["param"] == "doc_id" and error["code"] == "document_not_found"


def test_docqa_default_k_comes_from_the_config(served):
    r = _post(served, "/v1/docqa", {"question": "Who signed the letter?"})
    assert r.status_code == 200 and len(r.json()["citations"]) == 3  # retriever.top_k=3


def test_one_page_index_cites_that_page(served):
    r = httpx.post(served["url"] + "/one/v1/docqa", json={"question": "What is the date?", "k": 5}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert [c["page_id"] for c in body["citations"]] == [served["one_page"]]
    assert body["citations"][0]["read"] and body["weights_version"] == 5


def test_a_pushed_query_adapter_is_searched_with_at_once_and_named_by_v1_models(served, tiny_models):
    """retriever.learn: `push_retriever_adapter` hands a checkpoint's query adapter to every retriever
    replica of an application, which searches with it from the next question on (no restart); the
    citation's score is the adapted query's MaxSim, computed here independently."""
    import torch

    from deploy.app import push_retriever_adapter
    from retriever.encoder import PageEncoder
    from retriever.index import load_index
    from retriever.page_policy import AdapterLearner, candidate_scores, write_adapter_state

    question = "What is the date?"
    before = httpx.post(served["url"] + "/one/v1/docqa", json={"question": question, "k": 1}, timeout=60).json()
    learner = AdapterLearner(load_index(served["one_index"]).settings["dim"], learning_rate=1e-3, temperature=0.5)
    torch.manual_seed(0)
    with torch.no_grad():
        learner.adapter.weight.normal_(std=0.3)
    learner.version = 7
    checkpoint = served["work"] / "step-with-adapter"
    checkpoint.mkdir()
    write_adapter_state(checkpoint, learner.state())
    with pytest.raises(FileNotFoundError, match="holds no retriever_adapter.pt"):
        push_retriever_adapter("docrl-one", str(served["work"]))

    assert push_retriever_adapter("docrl-one", str(checkpoint)) == 7
    models = httpx.get(served["url"] + "/one/v1/models", timeout=30).json()["data"]
    assert [m["retriever_version"] for m in models] == [7]
    assert httpx.get(served["url"] + "/one/healthz", timeout=30).json()["retriever_version"] == 7
    after = httpx.post(served["url"] + "/one/v1/docqa", json={"question": question, "k": 1}, timeout=60).json()
    (cited,) = after["citations"]
    encoder = PageEncoder(str(tiny_models["retriever"]))
    query = encoder.embed_queries([question])[0]
    page = load_index(served["one_index"]).page_vectors(served["one_page"])
    with torch.no_grad():
        expected = candidate_scores(learner.adapter(query.float()), [page.float()]).item()
    assert cited["score"] == pytest.approx(expected, abs=1e-4)
    assert cited["score"] != pytest.approx(before["citations"][0]["score"], abs=1e-3)


def test_healthz_needs_no_key(served):
    r = httpx.get(served["url"] + "/healthz", timeout=30)
    assert r.status_code == 200 and r.json()["status"] == "ok" and r.json()["index_pages"] == 6
    assert r.json()["requests_in_flight"] == 0  # nothing else runs in this module meanwhile


# -- refusals ---------------------------------------------------------------------------------


def test_unauthorized_requests_get_401(served):
    from openai import AuthenticationError, OpenAI

    assert _post(served, "/v1/docqa", {"question": "q"}, key=None).status_code == 401
    r = _post(served, "/v1/docqa", {"question": "q"}, key="wrong")
    assert r.status_code == 401 and r.json()["error"]["message"] == "invalid API key"
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=served["url"] + "/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(served["url"] + "/one/v1/models", timeout=30).status_code == 200  # that app has no key


def test_paths_and_methods_that_match_no_endpoint_get_the_api_error_shape(served):
    """Found by fuzzing: a page id holding an encoded newline matches no route (`{page_id:path}`
    stops at a newline), and FastAPI answered with its own `{"detail": "Not Found"}`, a body the
    API's description does not allow; so did any unknown path or method."""
    headers = {"Authorization": f"Bearer {API_KEY}"}
    for method, path, status in (("GET", "/v1/pages/a%0Ab/image", 404), ("GET", "/v1/nothing", 404),
                                 ("DELETE", "/v1/docqa", 405)):
        r = httpx.request(method, served["url"] + path, headers=headers, timeout=30)
        assert r.status_code == status, (path, r.text)
        error = r.json()["error"]
        assert error["message"].startswith("no endpoint at /v1/" if status == 404 else "method DELETE is not allowed on"), error
        assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")


def _image_message(url):
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "?"}]}]


@pytest.mark.parametrize("url", ["file:///etc/passwd", "http://127.0.0.1:1/page.png", "/etc/hostname", "FILE:/etc/passwd"])
def test_image_urls_other_than_data_are_refused(served, url):
    r = _post(served, "/v1/chat/completions", {"model": "docrl", "messages": _image_message(url)})
    assert r.status_code == 400
    assert "data: URL" in r.json()["error"]["message"] and "messages.0.content.0.image_url" in r.json()["error"]["message"]


@pytest.mark.parametrize("body, status, words", [
    ({"model": "docrl"}, 400, "messages: Field required"),
    ({"model": "docrl", "messages": [{"role": "user", "content": [{"type": "audio"}]}]}, 400, "messages.0.content"),
    ({"model": "docrl", "messages": [{"role": "user", "content": "hi"}], "temperature": 9}, 400, "temperature"),
    ({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404, "'nope' does not exist"),
    ({"model": "docrl", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 65}, 400, "serve.limits.max_tokens"),
    ({"model": "docrl", "messages": _image_message("data:image/png;base64,!!notbase64")}, 400, "base64"),
    ({"model": "docrl", "messages": _image_message("data:image/png;base64," + base64.b64encode(b"not an image").decode())},
     400, "not a readable image"),
    ({"model": "docrl", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": png_data_url()}}] * 3}]}, 400, "serve.limits.max_images_per_request"),
    ({"model": "docrl", "messages": _image_message(png_data_url(size=(600, 500)))}, 400, "serve.limits.max_image_pixels"),
    ({"model": "docrl", "messages": _image_message(png_data_url(size=(1000, 2)))}, 400, "aspect ratio"),
    ({"model": "docrl", "messages": [{"role": "user", "content": "word " * 900}], "max_tokens": 64}, 400,
     "rollout.max_model_len"),
    ({"model": "docrl", "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, 400, "tools"),
])
def test_malformed_and_over_limit_chat_requests_get_a_clear_4xx(served, body, status, words):
    r = _post(served, "/v1/chat/completions", body)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]["message"]


@pytest.mark.parametrize("body, words", [
    ({"question": "   "}, "question: empty"),
    ({"question": "q", "k": 0}, "k: Input should be greater than or equal to 1"),
    ({"question": "q", "k": 21}, "serve.limits.max_k"),
    ({"k": 2}, "question: Field required"),
    ({"question": "q", "doc_id": ""}, "doc_id: String should have at least 1 character"),
])
def test_malformed_docqa_requests_get_400(served, body, words):
    r = _post(served, "/v1/docqa", body)
    assert r.status_code == 400 and words in r.json()["error"]["message"], r.text


def test_body_that_is_not_json_or_too_large_is_refused(served):
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    r = httpx.post(served["url"] + "/v1/docqa", content=b"{not json", headers=headers, timeout=30)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(served["url"] + "/v1/docqa", content=b"[1, 2]", headers=headers, timeout=30)
    assert r.status_code == 400 and "JSON object" in r.json()["error"]["message"]
    big = json.dumps({"question": "x" * 300_000}).encode()
    r = httpx.post(served["url"] + "/v1/docqa", content=big, headers=headers, timeout=30)
    assert r.status_code == 413 and "serve.limits.max_request_bytes" in r.json()["error"]["message"]


# Examples per endpoint and key setting: about 250 requests in all by default. The run recorded in
# benchmarks/RESULTS.md sets DOCRL_FUZZ_EXAMPLES=100 (over 2,000 requests).
FUZZ_EXAMPLES = int(os.environ.get("DOCRL_FUZZ_EXAMPLES", "12"))


@pytest.mark.parametrize("key", [API_KEY, None], ids=["with the key", "without the key"])
def test_requests_generated_from_the_openapi_schema_get_no_5xx_and_match_it(served, key):
    """schemathesis generates requests for every endpoint of /openapi.json (bodies, queries, path
    parameters: valid ones and, from the schema's edges, invalid ones) and checks every answer:
    no 5xx, and the status code, content type and body are ones the schema describes."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import content_type_conformance, not_a_server_error, response_schema_conformance

    spec = httpx.get(served["url"] + "/openapi.json", timeout=30).json()
    schema = schemathesis.openapi.from_dict(spec)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    sent: dict[str, int] = {}
    for found in schema.get_all_operations():
        operation = found.ok()

        @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def exercise(case):
            response = case.call(base_url=served["url"], headers=headers, timeout=60)
            sent[operation.label] = sent.get(operation.label, 0) + 1
            case.validate_response(response, checks=[not_a_server_error, content_type_conformance,
                                                     response_schema_conformance], headers=headers)

        exercise()
    assert len(sent) == sum(len(operations) for operations in spec["paths"].values()) >= 11, sent  # every endpoint
    print(f"fuzzed {sum(sent.values())} requests {'with' if key else 'without'} the key: {sent}")


def test_serve_deploy_yaml_builds_the_same_application(tiny_models):
    """The shipped `serve deploy` file is a valid Serve config whose builder args name this module."""
    from pathlib import Path

    import yaml
    from ray.serve.schema import ServeDeploySchema

    path = Path(__file__).resolve().parents[1] / "deploy" / "serve_config.yaml"
    schema = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    (app,) = schema.applications
    assert app.import_path == "cluster.serve_entry:build_app"
    assert {"checkpoint", "index", "config"} <= set(app.args)
    assert schema.http_options.host == "127.0.0.1"

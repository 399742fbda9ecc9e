"""The Serve endpoint's request checks, config, page store and engine loop, without Ray or vLLM."""

from __future__ import annotations

import asyncio
import base64
import io

import pytest
from PIL import Image

from deploy.api import (
    APIError, ChatCompletionRequest, DocQARequest, chat_input, chat_params, check_bearer, decode_image,
    docqa_k, key_digest, parse_json, read_body, validate,
)
from deploy.config import LimitsConfig

LIMITS = LimitsConfig(max_images_per_request=2, max_image_pixels=100 * 100, max_tokens=64, max_n=3, max_messages=4,
                      max_k=5, max_question_chars=50, max_request_bytes=2048)


def _data_url(size=(20, 10), fmt="PNG", media="image/png") -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, "red").save(buf, format=fmt)
    return f"data:{media};base64," + base64.b64encode(buf.getvalue()).decode()


def _refused(fn, *args, status=400) -> str:
    with pytest.raises(APIError) as e:
        fn(*args)
    assert e.value.status == status, e.value.message
    return e.value.message


# -- images -----------------------------------------------------------------------------------


def test_data_url_decodes_to_rgb_and_keeps_its_encoded_bytes():
    url = _data_url()
    image, raw = decode_image(url, LIMITS, "img")
    assert image.mode == "RGB" and image.size == (20, 10)
    assert raw == base64.b64decode(url.split(",", 1)[1])
    assert decode_image(_data_url(fmt="JPEG", media="image/jpeg"), LIMITS, "img")[0].size == (20, 10)


@pytest.mark.parametrize("url", ["file:///etc/passwd", "http://example.com/a.png", "https://x/y.png", "/etc/passwd",
                                 "ftp://h/f", "page.png", "File:/etc/passwd"])
def test_any_url_but_data_is_refused_without_touching_it(url):
    message = _refused(decode_image, url, LIMITS, "messages.0.content.1.image_url")
    assert message.startswith("messages.0.content.1.image_url: images must be inline data: URLs")


@pytest.mark.parametrize("url, words", [
    ("data:image/png,rawbytes", "base64"),
    ("data:text/plain;base64,aGVsbG8=", "not an image"),
    ("data:image/png;base64,***", "malformed"),
    ("data:image/png;base64," + base64.b64encode(b"GIF89a garbage").decode(), "not a readable image"),
    (_data_url(fmt="TIFF", media="image/tiff"), "format TIFF is not accepted"),
    (_data_url(size=(101, 100)), "10100 pixels exceeds the limit of 10000"),
])
def test_bad_images_are_refused_by_name(url, words):
    assert words in _refused(decode_image, url, LIMITS, "img")


def test_the_pixel_limit_is_checked_before_decoding(monkeypatch):
    def no_decoding(*a, **k):
        raise AssertionError("the image was decoded")

    monkeypatch.setattr(Image.Image, "convert", no_decoding)
    assert "exceeds the limit" in _refused(decode_image, _data_url(size=(200, 200)), LIMITS, "img")


# -- chat -------------------------------------------------------------------------------------


def _chat(**kw) -> ChatCompletionRequest:
    body = {"model": "docrl", "messages": [{"role": "user", "content": "hi"}], **kw}
    return validate(ChatCompletionRequest, body)


def test_chat_messages_become_template_messages_with_images_in_order():
    req = _chat(messages=[
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_url((20, 10))}},
                                     {"type": "text", "text": "first"}]},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": [{"type": "text", "text": "and"}, {"type": "image_url", "image_url": _data_url((30, 10))},
                                     {"type": "text", "text": "this?"}]}])
    chat = chat_input(req, LIMITS)
    assert chat.messages == [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "first"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "ok"}]},
        {"role": "user", "content": [{"type": "text", "text": "and"}, {"type": "image"}, {"type": "text", "text": "this?"}]}]
    assert [im.size for im in chat.images] == [(20, 10), (30, 10)] and len(chat.image_bytes) == 2
    assert chat.last_user_text == "and this?"


@pytest.mark.parametrize("messages, words", [
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_url()}}]}] * 3, "3 images exceed"),
    ([{"role": "user", "content": "x"}] * 5, "5 messages exceed the limit of 4"),
    ([{"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": _data_url()}}]},
      {"role": "user", "content": "x"}], "images are accepted in user messages only"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "nothing to answer"),
])
def test_chat_inputs_over_limits_are_refused(messages, words):
    assert words in _refused(chat_input, _chat(messages=messages), LIMITS)


def test_chat_request_validation_names_the_field():
    message = _refused(validate, ChatCompletionRequest, {"model": "docrl", "messages": [{"role": "tool", "content": "x"}]})
    assert "messages.0.role" in message
    assert "messages: List should have at least 1 item" in _refused(validate, ChatCompletionRequest, {"model": "m", "messages": []})
    _chat(user="someone", metadata={"a": 1})  # unknown OpenAI fields are ignored


def test_sampling_fields_and_their_limits():
    p = chat_params(_chat(max_completion_tokens=9, max_tokens=50, temperature=0.3, top_p=0.9, stop="END", seed=4,
                          presence_penalty=0.5), LIMITS, default_max_tokens=16)
    assert (p.max_tokens, p.temperature, p.top_p, p.stop, p.seed, p.presence_penalty) == (9, 0.3, 0.9, ("END",), 4, 0.5)
    assert chat_params(_chat(), LIMITS, 16).max_tokens == 16
    assert "serve.limits.max_tokens" in _refused(chat_params, _chat(max_tokens=65), LIMITS, 16)
    assert "serve.limits.max_n" in _refused(chat_params, _chat(n=4), LIMITS, 16)
    assert "identical answers" in _refused(chat_params, _chat(n=2, temperature=0), LIMITS, 16)
    assert "n=1 only" in _refused(chat_params, _chat(n=2, stream=True), LIMITS, 16)
    assert "tool calling" in _refused(chat_params, _chat(tools=[{"type": "function"}]), LIMITS, 16)
    assert "response_format" in _refused(chat_params, _chat(response_format={"type": "json_object"}), LIMITS, 16)
    chat_params(_chat(response_format={"type": "text"}), LIMITS, 16)


# -- docqa, auth, bodies ----------------------------------------------------------------------


def test_docqa_checks():
    assert docqa_k(validate(DocQARequest, {"question": "total?"}), LIMITS, default_k=3) == 3
    assert docqa_k(validate(DocQARequest, {"question": "total?", "k": 5}), LIMITS, 3) == 5
    assert "serve.limits.max_k" in _refused(docqa_k, validate(DocQARequest, {"question": "q", "k": 6}), LIMITS, 3)
    assert "question: empty" in _refused(docqa_k, validate(DocQARequest, {"question": " \n"}), LIMITS, 3)
    assert "max_question_chars" in _refused(docqa_k, validate(DocQARequest, {"question": "q" * 51}), LIMITS, 3)


def test_bearer_key_is_compared_by_digest():
    digest = key_digest("s3cret")
    check_bearer(None, None)  # no key configured
    check_bearer("Bearer s3cret", digest)
    check_bearer("bearer  s3cret ", digest)
    for header in (None, "", "Bearer", "Basic s3cret", "Bearer wrong", "s3cret"):
        assert _refused(check_bearer, header, digest, status=401)


def test_json_bodies():
    assert parse_json(b'{"a": 1}') == {"a": 1}
    assert "not valid JSON" in _refused(parse_json, b"{")
    assert "not valid JSON" in _refused(parse_json, b"\xff\xfe")
    assert "must be a JSON object, got list" in _refused(parse_json, b"[]")


class _FakeRequest:
    def __init__(self, chunks, declared=None):
        self.headers = {} if declared is None else {"content-length": str(declared)}
        self._chunks = chunks

    async def stream(self):
        for c in self._chunks:
            yield c


def test_body_size_limit_declared_and_streamed():
    assert asyncio.run(read_body(_FakeRequest([b"ab", b"cd"], declared=4), 2048)) == b"abcd"
    for req in (_FakeRequest([b"x"], declared=5000), _FakeRequest([b"x" * 1500, b"x" * 1500])):
        with pytest.raises(APIError) as e:
            asyncio.run(read_body(req, 2048))
        assert e.value.status == 413 and "serve.limits.max_request_bytes" in e.value.message


# -- config -----------------------------------------------------------------------------------


def test_serve_config_options_and_rules():
    from cluster.config import ConfigError, load_config

    cfg = load_config("configs/tiny.yaml")
    assert cfg.serve.ingress.serve_options() == {"max_ongoing_requests": 256, "num_replicas": 1,
                                                 "ray_actor_options": {"num_cpus": 0.25, "num_gpus": 0.0}}
    cfg = load_config("configs/tiny.yaml", ["serve.policy.autoscaling={min_replicas: 1, max_replicas: 3}",
                                            "serve.policy.num_gpus=1"])
    opts = cfg.serve.policy.serve_options()
    assert "num_replicas" not in opts and opts["autoscaling_config"]["max_replicas"] == 3
    assert opts["ray_actor_options"]["num_gpus"] == 1
    with pytest.raises(ConfigError, match="min_replicas=4 exceeds max_replicas=2"):
        load_config(None, ["serve.retriever.autoscaling={min_replicas: 4, max_replicas: 2}"])
    with pytest.raises(ConfigError, match="default_max_tokens=99 exceeds limits.max_tokens=10"):
        load_config(None, ["serve.limits.max_tokens=10", "serve.default_max_tokens=99"])
    with pytest.raises(ConfigError, match="serve.limits.max_imgs"):
        load_config(None, ["serve.limits.max_imgs=3"])


def test_build_app_names_missing_and_unknown_args():
    from cluster.serve_entry import build_app

    with pytest.raises(ValueError, match="unknown chekpoint; missing checkpoint"):
        build_app({"chekpoint": "x", "index": "y"})


def test_missing_api_key_fails_before_any_replica_starts(monkeypatch, tmp_path):
    from cluster.config import load_config
    from deploy.app import build_application
    from retriever.index import Manifest, write_manifest

    monkeypatch.delenv("DOCRL_NO_SUCH_KEY", raising=False)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text('{"model_type": "qwen2_vl"}')
    (tmp_path / "index").mkdir()
    write_manifest(tmp_path / "index", Manifest({"model": "m"}, [], {}))
    cfg = load_config(None, ["serve.api_key_env=DOCRL_NO_SUCH_KEY", f"retriever.model={tmp_path / 'model'}"])
    with pytest.raises(ValueError, match="serve.api_key_env='DOCRL_NO_SUCH_KEY' but that environment variable is empty"):
        build_application(cfg, str(tmp_path / "model"), str(tmp_path / "index"))
    # a policy of an unsupported family is refused as early, naming the supported ones
    (tmp_path / "model" / "config.json").write_text('{"model_type": "llava"}')
    with pytest.raises(ValueError, match="model_type 'llava'.*supported: qwen2_vl, qwen2_5_vl"):
        build_application(cfg, str(tmp_path / "model"), str(tmp_path / "index"))


# -- the page store ---------------------------------------------------------------------------


def test_page_store_reads_only_the_index_pages(tmp_path):
    from deploy.pages import PageStore, PageUnavailable
    from retriever.index import Manifest, write_manifest

    (tmp_path / "docs").mkdir()
    Image.new("RGB", (30, 20), "white").save(tmp_path / "docs" / "a.png")
    pages = {"a/p1": {"doc_id": "a", "page_no": 1, "source": "docs/a.png"},  # relative to where the index was built
             "b/p1": {"doc_id": "b", "page_no": 1, "source": "<bytes:b/p1>"},
             "c/p1": {"doc_id": "c", "page_no": 1, "source": str(tmp_path / "gone.png")}}
    (tmp_path / "index").mkdir()
    write_manifest(tmp_path / "index", Manifest({}, [{"file": "manifest.json", "page_ids": list(pages)}], pages))
    store = PageStore.from_index(tmp_path / "index", base_dir=tmp_path)
    assert len(store) == 1 and set(store.unavailable) == {"b/p1", "c/p1"}
    page = store.load("a/p1")
    assert page.image_bytes == (tmp_path / "docs" / "a.png").read_bytes() and page.load_image().size == (30, 20)
    for pid, words in (("b/p1", "serve.pages_folder"), ("c/p1", "does not exist"), ("/etc/passwd", "not in the index")):
        with pytest.raises(PageUnavailable, match=words):
            store.load(pid)


# -- feedback (deploy/feedback_api.py) --------------------------------------------------------


def test_feedback_database_url_is_checked_and_made_absolute_at_build_time(tmp_path, monkeypatch):
    from deploy.feedback_api import resolved_feedback_config
    from feedback.config import FeedbackConfig

    cfg = resolved_feedback_config(FeedbackConfig(), "runs/x", tmp_path)  # the default: SQLite under run.output_dir
    assert cfg.database_url == f"sqlite:///{tmp_path}/runs/x/feedback/feedback.db"
    cfg = resolved_feedback_config(FeedbackConfig(database_url="sqlite:///fb/feedback.db"), "runs/x", tmp_path)
    assert cfg.database_url == f"sqlite:///{tmp_path}/fb/feedback.db"
    pg = "postgresql://docrl@db.internal:5432/docrl"
    assert resolved_feedback_config(FeedbackConfig(database_url=pg), "o", tmp_path).database_url == pg  # no connection
    with pytest.raises(ValueError, match=r"unsupported database 'mysql'.*feedback.enabled=false"):
        resolved_feedback_config(FeedbackConfig(database_url="mysql://u@h/db"), "o", tmp_path)
    monkeypatch.delenv("DOCRL_TEST_UNSET_PASSWORD", raising=False)
    with pytest.raises(ValueError, match="DOCRL_TEST_UNSET_PASSWORD is not set"):
        resolved_feedback_config(FeedbackConfig(database_url=pg, password_env="DOCRL_TEST_UNSET_PASSWORD"), "o", tmp_path)
    monkeypatch.setenv("DOCRL_TEST_UNSET_PASSWORD", "s3cret")
    cfg = resolved_feedback_config(FeedbackConfig(database_url=pg, password_env="DOCRL_TEST_UNSET_PASSWORD"), "o", tmp_path)
    assert "s3cret" not in cfg.database_url  # replicas read the password from their environment


def test_feedback_errors_keep_their_status_in_the_openai_error_shape():
    from deploy.feedback_api import feedback_api_error, feedback_body_limit
    from feedback.config import FeedbackConfig
    from feedback.store import (DuplicateFeedbackError, FeedbackValidationError, StorageError,
                                UnknownResponseError)

    for exc, status, code in [(UnknownResponseError("unknown response_id 'x'"), 404, "response_not_found"),
                              (DuplicateFeedbackError("already has feedback"), 409, "feedback_exists"),
                              (FeedbackValidationError("rating must be 'up' or 'down'"), 422, "invalid_feedback"),
                              (StorageError("feedback database unavailable"), 503, "feedback_unavailable")]:
        err = feedback_api_error(exc)
        assert err.status == status and err.body()["error"]["code"] == code and err.body()["error"]["message"] == exc.message
    cfg = FeedbackConfig(max_correction_chars=100, max_comment_chars=100)
    assert feedback_body_limit(cfg, 8 * 1024 * 1024) == 12 * (100 + 100 + 128 + 1000) + 4096
    assert feedback_body_limit(FeedbackConfig(max_correction_chars=10**6), 65536) == 65536


def test_a_full_deployment_queue_becomes_503_with_retry_after():
    """The policy's or retriever's max_queued_requests reached: Serve raises BackPressureError at the
    ingress's call, which answers 503 with the deployment's Retry-After (not a 500)."""
    from ray.serve.exceptions import BackPressureError

    from deploy.app import Ingress

    error = Ingress.func_or_class._classify(None, BackPressureError(5, 4, retry_after_s=2.5), "the policy")
    assert error.status == 503 and error.code == "overloaded" and error.headers == {"Retry-After": "3"}
    assert "the policy is at capacity" in error.message and "max_queued_requests=4" in error.message
    assert Ingress.func_or_class._classify(None, BackPressureError(5, 4), "the policy").headers == {"Retry-After": "1"}


def test_serving_a_checkpoint_with_a_malformed_adapter_is_refused_naming_the_file(tmp_path):
    """Before any replica starts (`docrl serve` prints it as one line)."""
    from cluster.config import load_config
    from deploy.app import build_application

    spec = tmp_path / "ckpt" / "policy"
    (spec / "adapter").mkdir(parents=True)
    (spec / "docrl_policy.json").write_text('{"kind": "lora", "base_model": "Qwen/Qwen2-VL-2B-Instruct", "weights_version": 4}')
    (spec / "adapter" / "adapter_config.json").write_text('{"r": 8}')
    (spec / "adapter" / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="adapter_model.safetensors is not a readable safetensors file") as e:
        build_application(load_config(None, [f"run.output_dir={tmp_path}"]), str(tmp_path / "ckpt"), str(tmp_path / "index"))
    assert str(spec / "adapter" / "adapter_model.safetensors") in str(e.value)


def test_a_cpu_policy_replica_preloads_tcmalloc_where_it_is_installed(monkeypatch, caplog):
    """`serve.policy.allocator`: tcmalloc for a CPU replica (the soak's memory target), found
    through ld.so's cache; nothing for a GPU replica or with "glibc"; a warning, and glibc, where
    the library is missing."""
    import ctypes.util

    from deploy.app import TCMALLOC, allocator_env
    from deploy.config import ServeConfig

    assert ServeConfig().policy.allocator == "tcmalloc"
    assert allocator_env("glibc", 0.0) == {} and allocator_env("tcmalloc", 1.0) == {}
    if ctypes.util.find_library("tcmalloc_minimal"):
        env = allocator_env("tcmalloc", 0.0)
        assert env["LD_PRELOAD"] == TCMALLOC and int(env["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"]) >= 1 << 40
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)  # a host without the library
    assert allocator_env("tcmalloc", 0.0) == {}
    assert "apt-get install libtcmalloc-minimal4" in caplog.text

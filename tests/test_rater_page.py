"""The rater page (`/ui`) end to end: a real headless Chromium (Debian's `chromium` and
`chromium-driver`, driven by selenium) against a Serve application on loopback with an API key and
an SQLite feedback store. It asks, reads the answer beside its pages, rates with the keyboard,
corrects, and finds the correction in `docrl feedback export`; goes through the queue of unrated
answers; asks about an uploaded page; and shows questions, answers and comments holding
`<script>` and `<img onerror>` as text while no script of theirs runs. The queue and timeline
queries are checked on SQLite and PostgreSQL first, without Ray.

Without the browser the page tests skip, naming the packages; CI (`.ci/run`) installs them and sets
DOCRL_REQUIRE_BROWSER=1, which makes a missing browser a failure. Screenshots go to a pytest temp
dir; `DOCRL_SAVE_SCREENSHOTS=docs/` also writes the main view to `docs/rater-page.png` (shown in docs/guides/rater-page.md).
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import pytest
from pg_server import postgres_server, postgres_url  # noqa: F401 - fixtures
from PIL import Image

from feedback.store import FeedbackError, FeedbackIn, FeedbackStore, Interaction

REPO = Path(__file__).resolve().parents[1]
API_KEY = "rater-test-key-not-secret"
KEY_ENV = "DOCRL_TEST_RATER_KEY"
XSS = '<script>window.__xss = "script"</script><img src=x onerror="window.__xss = \'img\'">'
WAIT_S = 60  # one browser wait (an answer takes a few seconds on 2 cores)
T0 = datetime(2026, 3, 1, 12, 30, tzinfo=timezone.utc)


def served(test):
    """The marks of a test against the Serve application."""
    return pytest.mark.ray(pytest.mark.vllm(pytest.mark.slow(test)))


# -- the store's queries, on both backends (no Ray) -------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'db' / 'feedback.db'}"
    return request.getfixturevalue("postgres_url")


def _answer(rid, at, version=1, images=()):
    return Interaction(rid, "chat" if images else "docqa", f"question {rid}", f"answer {rid}",
                       page_ids=() if images else ("doc1/p1",), images=images, model="docrl", weights_version=version,
                       checkpoint=f"step-{version}", created_at=at)


def test_queue_lists_the_newest_unrated_answers(db_url):
    store = FeedbackStore(db_url)
    try:
        store.record_interactions([_answer(f"r{i}", T0 + timedelta(minutes=i)) for i in range(5)]
                                  + [_answer("chat", T0 + timedelta(minutes=9), images=(b"png bytes",))])
        store.add_feedback(FeedbackIn("r4", "up"))
        store.add_feedback(FeedbackIn("r1", "down", correction="7"))
        assert [it.response_id for it in store.unrated(limit=10)] == ["chat", "r3", "r2", "r0"]
        assert [it.response_id for it in store.unrated(limit=2)] == ["chat", "r3"]
        first = store.unrated(limit=1)[0]
        assert first.kind == "chat" and len(first.image_hashes) == 1 and first.created_at == T0 + timedelta(minutes=9)
        with pytest.raises(FeedbackError, match="limit must be a positive integer"):
            store.unrated(limit=0)
    finally:
        store.close()


def test_timeline_counts_ratings_per_version_and_period(db_url):
    store = FeedbackStore(db_url)
    try:
        # version 1 answered on two days, version 2 on the second day
        store.record_interactions([_answer("a", T0), _answer("b", T0 + timedelta(hours=1)),
                                   _answer("c", T0 + timedelta(days=1)), _answer("d", T0 + timedelta(days=1, hours=2), 2),
                                   _answer("e", T0 + timedelta(days=1, hours=3), 2)])
        for rid, rating, correction in [("a", "up", None), ("b", "down", "x"), ("c", "down", None), ("d", "up", None)]:
            store.add_feedback(FeedbackIn(rid, rating, correction))
        days = [(p.start, p.version.weights_version, p.version.answers, p.version.up, p.version.down,
                 p.version.corrections) for p in store.timeline("day")]
        day1, day2 = datetime(2026, 3, 1, tzinfo=timezone.utc), datetime(2026, 3, 2, tzinfo=timezone.utc)
        assert days == [(day1, 1, 2, 1, 1, 1), (day2, 1, 1, 0, 1, 0), (day2, 2, 2, 1, 0, 0)]
        hours = store.timeline("hour", since=T0 + timedelta(days=1))
        assert [(p.start.hour, p.version.weights_version) for p in hours] == [(12, 1), (14, 2), (15, 2)]
        assert hours[1].version.up_rate == 1.0 and hours[2].version.up_rate is None
        with pytest.raises(FeedbackError, match="bucket must be one of hour, day"):
            store.timeline("week")
    finally:
        store.close()


def test_page_images_and_page_files_as_the_browser_gets_them():
    from deploy.api import APIError, page_image_body, query_int
    from deploy.feedback_api import UI_ASSETS, UI_PAGE, ui_file

    def encoded(fmt: str) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", (30, 20), "navy").save(buf, format=fmt)
        return buf.getvalue()

    for fmt, media in (("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp"), ("GIF", "image/gif")):
        assert page_image_body(encoded(fmt), "d/p1") == (encoded(fmt), media)
    png, media = page_image_body(encoded("TIFF"), "d/p1")  # a scan no browser shows: converted
    assert media == "image/png" and Image.open(io.BytesIO(png)).size == (30, 20)
    with pytest.raises(APIError, match="page d/p1: its image file is not a readable image"):
        page_image_body(b"not an image", "d/p1")
    for name in (UI_PAGE, *UI_ASSETS):
        body, media = ui_file(name)
        assert body and media.endswith("charset=utf-8")
    for name in ("../app.py", "app.py", "index.htm", ""):
        with pytest.raises(APIError, match="no rater page asset named"):
            ui_file(name)
    assert query_int({"limit": "7"}, "limit", 20, 1, 200) == 7 and query_int({}, "limit", 20, 1, 200) == 20
    with pytest.raises(APIError, match="limit=201 is out of range: 1 to 200"):
        query_int({"limit": "201"}, "limit", 20, 1, 200)


def test_docrl_serve_prints_the_rater_page_address(tmp_path):
    """Before: `docrl serve` listed the API's addresses but not the page's."""
    from cluster.cli import serve_banner
    from cluster.config import load_config

    url = "http://127.0.0.1:8000"
    common = [f"run.output_dir={tmp_path}", f"serve.api_key_env={KEY_ENV}"]
    lines = serve_banner(load_config(None, common), "ckpt", url).splitlines()
    assert f"  rater page: {url}/ui (asks for the key in ${KEY_ENV})" in lines
    assert lines.index(f"  rater page: {url}/ui (asks for the key in ${KEY_ENV})") < lines.index(f"  health: {url}/healthz")
    without = serve_banner(load_config(None, common + ["feedback.enabled=false", "serve.api_key_env=null"]), "ckpt", url)
    assert f"  rater page: {url}/ui (asking only: rating needs feedback.enabled=true)" in without.splitlines()


# -- the served page --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Chromium through chromedriver, both Debian's; selenium never downloads a driver."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_bin = shutil.which("chromedriver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        chromium = None
    if not (chromium and driver_bin):
        reason = ("the rater page is tested in Debian's chromium with chromium-driver and the selenium package "
                  f"(found: chromium={chromium}, chromedriver={driver_bin}); apt-get install chromium chromium-driver")
        if os.environ.get("DOCRL_REQUIRE_BROWSER") == "1":
            pytest.fail(f"DOCRL_REQUIRE_BROWSER=1 but {reason}")
        pytest.skip(reason)
    os.environ["SE_OFFLINE"] = "true"
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000",
                "--no-first-run", "--disable-extensions", "--disable-background-networking", "--lang=en-US"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_bin), options=options)
    driver.set_page_load_timeout(WAIT_S)
    driver.set_script_timeout(WAIT_S)
    driver.screenshots = tmp_path_factory.mktemp("rater-screenshots")
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def rater_app(served_models, tiny_models):
    """An ingress over the session's shared models (tests/serving.py) with a key and an SQLite
    feedback store, whose database already holds a week of rated answers of two earlier model
    versions (so the chart has history)."""
    from ray import serve
    from serving import COMMON_OVERRIDES, SHARED_MODELS, delete_apps

    from cluster.config import load_config
    from deploy.app import build_application, wait_until_running

    work = served_models["work"] / "rater"
    work.mkdir()
    checkpoint, index, pages = served_models["checkpoint"], served_models["index"], served_models["pages"]
    db_url = f"sqlite:///{work / 'feedback.db'}"
    _earlier_versions(db_url, [p.page_id for p in pages])

    os.environ[KEY_ENV] = API_KEY
    overrides = [f"run.output_dir={work}", f"retriever.model={tiny_models['retriever']}", *COMMON_OVERRIDES,
                 f"serve.port={served_models['port']}", f"serve.api_key_env={KEY_ENV}", "retriever.top_k=3",
                 "serve.limits.max_request_bytes=1048576", "serve.limits.max_image_pixels=250000",
                 "serve.limits.max_tokens=64", "serve.default_max_tokens=8", "rollout.eval_sampling.max_tokens=8",
                 f"feedback.database_url={db_url}", "feedback.flush_interval_s=0.2"]
    cfg = load_config(None, overrides)
    try:
        app = build_application(cfg, str(checkpoint), "", share_models_of=SHARED_MODELS)
        serve.run_many([serve.api.RunTarget(app, name="rater", route_prefix="/")],
                       wait_for_ingress_deployment_creation=False, wait_for_applications_running=False)
        wait_until_running(["rater"], timeout_s=300)
        yield {"url": served_models["url"], "db_url": db_url, "work": work, "index": index,
               "checkpoint": str(checkpoint), "pages": [p.page_id for p in pages], "cfg": cfg}
    finally:
        delete_apps("rater")


def _earlier_versions(db_url: str, page_ids: list[str]) -> None:
    """Answers of weights versions 1 and 2 over the last week, most of them rated."""
    store = FeedbackStore(db_url)
    now = datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0)
    ratings = {1: ["up", "down", "down", "up", "down"], 2: ["up", "up", "down", "up", "up"]}
    try:
        for version, pattern in ratings.items():
            for day in range(7 - 3 * version, 9 - 3 * version + 3):
                answers = [Interaction(f"docqa-history-v{version}-d{day}-{i}", "docqa", f"What is the total of invoice {i}?",
                                       f"${100 + i}.00", page_ids=tuple(page_ids[i % len(page_ids):][:3]), model="docrl",
                                       weights_version=version, checkpoint=f"step-{version}",
                                       created_at=now - timedelta(days=day, hours=i)) for i in range(len(pattern))]
                store.record_interactions(answers)
                for i, (answer, rating) in enumerate(zip(answers, pattern)):
                    if (i + day) % 5 == 4:
                        continue  # some stay unrated
                    correction = f"${200 + i}.00" if rating == "down" and i % 2 else None
                    store.add_feedback(FeedbackIn(answer.response_id, rating, correction))
    finally:
        store.close()


def _get(app, path, key=API_KEY, **kw):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.get(app["url"] + path, headers=headers, timeout=60, **kw)


# -- helpers for the browser ------------------------------------------------------------------


def _wait(driver, condition, what: str, timeout_s: float = WAIT_S):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout_s, poll_frequency=0.1).until(lambda d: condition(d))
    except TimeoutException:
        _shot(driver, "timeout")
        raise AssertionError(f"not within {timeout_s:g}s: {what}; the page says: "
                             f"{driver.find_element('tag name', 'body').text[:1500]!r}; "
                             f"console: {_console(driver)}") from None


def _console(driver) -> list[str]:
    try:
        return [entry["message"] for entry in driver.get_log("browser")]
    except Exception:  # noqa: BLE001 - a driver without the log endpoint
        return []


def _text(driver, element_id: str) -> str:
    return driver.find_element("id", element_id).text


def _visible(driver, element_id: str) -> bool:
    return driver.find_element("id", element_id).is_displayed()


def _keys(driver, *keys) -> None:
    """Keys typed into whatever has the focus (the page's shortcuts listen on the document)."""
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(driver).send_keys(*keys).perform()


def _shot(driver, name: str) -> Path:
    """The whole page, not only the window (Chrome's DevTools protocol: beyond the viewport)."""
    size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": {
        "x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}})
    path = driver.screenshots / f"{name}.png"
    path.write_bytes(base64.b64decode(shot["data"]))
    return path


def _unfocus(driver) -> None:
    driver.execute_script("document.activeElement && document.activeElement.blur()")


def _image_loaded(driver, element) -> bool:
    return bool(driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", element))


def _open(driver, app, key: str | None = API_KEY) -> None:
    """A fresh tab state: the page opened, the key typed into its form (when given)."""
    driver.get(app["url"] + "/ui")
    driver.execute_script("sessionStorage.clear()")
    driver.get(app["url"] + "/ui")
    _wait(driver, lambda d: _visible(d, "key-panel"), "the key form")
    if key is not None:
        driver.find_element("id", "key-input").send_keys(key + "\n")
        _wait(driver, lambda d: _visible(d, "workspace"), "the workspace after the key")


def _ask(driver, question: str) -> str:
    """Ask through the form; the response id of the answer shown."""
    before = _text(driver, "shown-meta") if _visible(driver, "answer-panel") else ""
    field = driver.find_element("id", "question")
    field.clear()
    field.send_keys(question + "\n")
    _wait(driver, lambda d: _visible(d, "answer-panel") and _text(d, "shown-meta") != before, "an answer")
    return re.search(r"response (\S+)", _text(driver, "shown-meta")).group(1)


def _no_injected_code(driver) -> None:
    assert driver.execute_script("return window.__xss === undefined"), "a script from the data ran"
    assert driver.execute_script("return document.querySelectorAll('img[onerror], [onerror], [onload]').length") == 0
    scripts = driver.execute_script("return [...document.scripts].map(s => s.getAttribute('src'))")
    assert scripts == ["ui/app.js"]


# -- the page, its headers, and what only it reads --------------------------------------------


@served
def test_the_page_is_served_with_a_strict_csp(rater_app):
    r = httpx.get(rater_app["url"] + "/ui", timeout=30)  # the page holds no data: no key needed
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = {d.split()[0]: d.split()[1:] for d in r.headers["content-security-policy"].split(";") if d.strip()}
    assert csp["script-src"] == ["'self'"] and csp["style-src"] == ["'self'"] and csp["default-src"] == ["'self'"]
    assert csp["connect-src"] == ["'self'"] and csp["frame-ancestors"] == ["'none'"]
    assert r.headers["x-content-type-options"] == "nosniff" and r.headers["referrer-policy"] == "no-referrer"
    html = r.text
    assert re.findall(r"<script[^>]*>", html) == ['<script src="ui/app.js" defer>']  # no inline script
    assert " style=" not in html and "<style" not in html and not re.search(r"\son[a-z]+=", html)
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html)  # nothing from another origin
    for name, media in (("app.js", "text/javascript"), ("app.css", "text/css")):
        asset = httpx.get(f"{rater_app['url']}/ui/{name}", timeout=30)
        assert asset.status_code == 200 and asset.headers["content-type"].startswith(media)
        assert not re.search(r"https?://", asset.text.replace('"http://www.w3.org/2000/svg"', ""))  # the SVG namespace
    js = httpx.get(rater_app["url"] + "/ui/app.js", timeout=30).text
    assert not re.search(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|eval\(|new Function", js)
    r = httpx.get(rater_app["url"] + "/ui/server.log", timeout=30)
    assert r.status_code == 404 and "no rater page asset named 'server.log'" in r.json()["error"]["message"]
    assert httpx.get(rater_app["url"] + "/ui/..%2Fapi.py", timeout=30).status_code == 404


@served
def test_the_printed_rater_page_address_is_the_page(rater_app):
    from cluster.cli import serve_banner

    banner = serve_banner(rater_app["cfg"], rater_app["checkpoint"], rater_app["url"])
    address = re.search(r"^  rater page: (\S+)", banner, re.M).group(1)
    r = httpx.get(address, timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html") and "ui/app.js" in r.text


@served
def test_page_images_are_the_index_pages_by_id_with_the_key(rater_app):
    page_id = rater_app["pages"][0]
    path = "/v1/pages/" + httpx.URL(page_id).raw_path.decode().replace("/", "%2F") + "/image"
    r = _get(rater_app, path)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text[:200]
    assert Image.open(io.BytesIO(r.content)).size[0] > 100
    assert _get(rater_app, f"/v1/pages/{page_id}/image").content == r.content  # the id's own slash, unescaped
    assert _get(rater_app, path, key=None).status_code == 401 and _get(rater_app, path, key="wrong").status_code == 401
    # escaped: the client would resolve "../"; a NUL byte, a double-encoded dot-dot, a page id followed by a path
    for bad in ("nope/p1", "..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd", f"{page_id}%00.png", "%252e%252e%252fetc%252fpasswd",
                f"{page_id}%2F..%2F..%2F..%2Fproc%2Fself%2Fenviron", "%2e%2e%2f%2e%2e%2fetc%2fpasswd"):
        r = _get(rater_app, f"/v1/pages/{bad}/image")
        assert r.status_code == 404, (bad, r.text)
        assert "is not in the index this server answers from" in r.json()["error"]["message"]
    assert "'nope/p1'" in _get(rater_app, "/v1/pages/nope/p1/image").json()["error"]["message"]


@served
def test_queue_and_timeline_need_the_key_and_check_their_parameters(rater_app):
    for path in ("/v1/feedback/queue", "/v1/feedback/timeline"):
        assert _get(rater_app, path, key=None).status_code == 401 and _get(rater_app, path, key="wrong").status_code == 401
    queue = _get(rater_app, "/v1/feedback/queue?limit=3").json()
    assert queue["object"] == "list" and len(queue["data"]) == 3
    assert {"response_id", "question", "answer", "page_ids", "weights_version", "created_at"} <= set(queue["data"][0])
    timeline = _get(rater_app, "/v1/feedback/timeline?bucket=day").json()
    assert {p["weights_version"] for p in timeline["points"]} == {1, 2}
    for path, words in [("/v1/feedback/queue?limit=0", "limit=0 is out of range: 1 to 200"),
                        ("/v1/feedback/queue?limit=lots", "limit: expected an integer, got 'lots'"),
                        ("/v1/feedback/timeline?bucket=week", "bucket: 'week' is not one of hour, day"),
                        ("/v1/feedback/timeline?since=yesterday", "since: 'yesterday' is not an ISO 8601 date")]:
        r = _get(rater_app, path)
        assert r.status_code == 400 and words in r.json()["error"]["message"], (path, r.text)


# -- in the browser ---------------------------------------------------------------------------


@served
def test_a_wrong_key_is_refused_on_the_page_and_never_kept(browser, rater_app):
    _open(browser, rater_app, key=None)
    browser.find_element("id", "key-input").send_keys("not-the-key\n")
    _wait(browser, lambda d: "refused" in _text(d, "key-error"), "the refusal")
    assert _text(browser, "key-error") == "The server refused this key: invalid API key."
    assert not _visible(browser, "workspace") and browser.find_element("id", "key-input").get_attribute("value") == ""
    assert browser.execute_script("return sessionStorage.length") == 0
    _shot(browser, "wrong-key")
    browser.find_element("id", "key-input").send_keys(API_KEY + "\n")
    _wait(browser, lambda d: _visible(d, "workspace"), "the workspace")
    assert "weights version 3" in _text(browser, "server-info")
    assert browser.execute_script("return Object.values(sessionStorage)") == [API_KEY]
    assert browser.execute_script("return localStorage.length") == 0 and API_KEY not in browser.current_url
    browser.refresh()  # the tab keeps the key: no second prompt
    _wait(browser, lambda d: _visible(d, "workspace"), "the workspace after a reload")


@served
def test_ask_read_the_pages_rate_correct_and_export(browser, rater_app):
    _open(browser, rater_app)
    since = datetime.now(timezone.utc) - timedelta(seconds=1)
    rid = _ask(browser, "What is the invoice total?")
    assert rid.startswith("docqa-") and _text(browser, "shown-question") == "What is the invoice total?"
    thumbs = browser.find_elements("css selector", "#thumbnails li")
    _wait(browser, lambda d: all(_image_loaded(d, li.find_element("tag name", "img")) for li in thumbs), "the thumbnails")
    captions = [li.text for li in thumbs]
    assert len(captions) == 3 and [c.split(" · ")[0] for c in captions] == ["#1", "#2", "#3"]
    page_ids = [li.get_attribute("data-page-id") for li in thumbs]
    assert set(page_ids) <= set(rater_app["pages"]) and "read" in captions[0]
    big = browser.find_element("id", "read-page-img")
    _wait(browser, lambda d: big.is_displayed() and _image_loaded(d, big), "the read page, large")
    assert big.get_attribute("alt") == f"Page {page_ids[0]}" and big.size["width"] > 2 * thumbs[0].size["width"]
    assert big.get_attribute("src").startswith("blob:")
    thumbs[1].find_element("tag name", "button").click()  # another cited page, large, and back
    _wait(browser, lambda d: big.get_attribute("alt") == f"Page {page_ids[1]}" and _image_loaded(d, big), "page #2 large")
    shown = [li.find_element("tag name", "button").get_attribute("aria-current") for li in thumbs]
    assert shown == ["false", "true", "false"]
    thumbs[0].find_element("tag name", "button").click()
    _wait(browser, lambda d: big.get_attribute("alt") == f"Page {page_ids[0]}", "page #1 large again")

    # the keyboard alone: + up, m comment, Enter; then - down, c correction, Enter
    browser.find_element("id", "answer-title").click()
    _keys(browser, "+")
    assert browser.find_element("id", "rate-up").get_attribute("aria-pressed") == "true"
    assert _text(browser, "rating-chosen") == "chosen: ▲ up"
    _keys(browser, "m", "right page")
    _keys(browser, "\n")
    _wait(browser, lambda d: _text(d, "rate-status").startswith("Stored"), "the up-vote stored")
    assert _text(browser, "rate-status").startswith("Stored: ▲ up, comment “right page” at ")
    _keys(browser, "-", "c", "$1,520.00", "\n")
    _wait(browser, lambda d: "correction" in _text(d, "rate-status"), "the correction stored")
    status = _text(browser, "rate-status")
    assert status.startswith("Stored: ▼ down, correction “$1,520.00”, comment “right page” at ") and "(replaced" in status
    # the page label: 2 marks cited page #2 as the one that holds the answer, 0 none of them
    choices = browser.find_elements("css selector", 'input[name="answer-page"]')
    assert [c.get_attribute("value") for c in choices] == ["", *page_ids, "none"] and choices[0].is_selected()
    _keys(browser, "0")
    assert choices[-1].is_selected()
    _keys(browser, "2", "\n")
    assert choices[2].is_selected()
    _wait(browser, lambda d: f"the answer is on {page_ids[1]}" in _text(d, "rate-status"), "the page label stored")
    # the chart follows: this version's one answer, down, corrected (period, version, answers, up, down, rate, corrections)
    _wait(browser, lambda d: re.search(r"docrl w3 1 0 1 0% 1$", _text(d, "chart-rows"), re.M), "the chart updated")
    _main_view_screenshot(browser)

    # the real CLI exports the correction as the gold answer of that question
    out = rater_app["work"] / "export"
    docrl = Path(sys.executable).with_name("docrl")
    done = subprocess.run([str(docrl), "feedback", "export", "--since", since.isoformat(), "--index",
                           str(rater_app["index"]), str(out), f"feedback.database_url={rater_app['db_url']}",
                           f"run.output_dir={rater_app['work']}"], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    train = json.loads((out / "train.json").read_text())
    [exported] = [q for q in train["data"] if q["questionId"] == f"fb-{rid}"]
    assert exported["answers"] == ["$1,520.00"] and exported["question"] == "What is the invoice total?"
    # the rater's page is the gold page, and the label is a (question, page) pair
    assert f"{exported['ucsf_document_id']}/p{exported['ucsf_document_page_no']}" == page_ids[1]
    assert exported["feedback"]["gold_page"] == "the rater's"
    pairs = json.loads((out / "page_labels.json").read_text())["pairs"]
    assert sorted((p["page_id"], p["holds_answer"]) for p in pairs if p["response_id"] == rid) == sorted(
        (pid, pid == page_ids[1]) for pid in page_ids)


def _main_view_screenshot(driver) -> None:
    """The whole page (the picture in docs/guides/rater-page.md): under the temp dir, and where DOCRL_SAVE_SCREENSHOTS says."""
    path = _shot(driver, "rater-page")
    target = os.environ.get("DOCRL_SAVE_SCREENSHOTS")
    if target:
        folder = Path(target) if Path(target).is_absolute() else REPO / target
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, folder / "rater-page.png")


def _ask_about_an_unknown_document(browser) -> None:
    """Ask within a document the index does not hold, wait for the page's refusal banner, and
    clear the document field again."""
    field = browser.find_element("id", "ask-doc")
    field.clear()
    field.send_keys("no-such-doc")
    question = browser.find_element("id", "question")
    question.clear()
    question.send_keys("What is the date?\n")
    _wait(browser, lambda d: _visible(d, "alert") and "'no-such-doc'" in _text(d, "alert"), "the refusal of the document")
    field.clear()


@served
def test_ask_within_one_document(browser, rater_app):
    """A document id next to the question searches only that document's pages; an unknown one is
    refused with the server's message, naming it."""
    _open(browser, rater_app)
    docs = {}
    for pid in rater_app["pages"]:
        docs.setdefault(pid.rsplit("/", 1)[0], []).append(pid)
    doc, own = max(docs.items(), key=lambda d: len(d[1]))
    browser.find_element("id", "ask-doc").send_keys(doc)
    _ask(browser, "What is the invoice total?")
    thumbs = browser.find_elements("css selector", "#thumbnails li")
    assert sorted(li.get_attribute("data-page-id") for li in thumbs) == sorted(own)
    _ask_about_an_unknown_document(browser)
    assert "holds no page of that document" in _text(browser, "alert")


@served
def test_a_later_success_clears_the_error_banner(browser, rater_app):
    """Before: the banner of a refused question stayed on screen over later answers."""
    _open(browser, rater_app)
    _ask_about_an_unknown_document(browser)
    _ask(browser, "What is the invoice total?")
    assert not _visible(browser, "alert") and _text(browser, "alert") == ""
    _ask_about_an_unknown_document(browser)
    shown = _text(browser, "shown-meta")
    _unfocus(browser)
    _keys(browser, "n")  # the next unrated answer
    _wait(browser, lambda d: _text(d, "shown-meta") != shown, "the next unrated answer")
    assert not _visible(browser, "alert")


def test_the_queue_shows_unrated_answers_and_n_moves_on(browser, rater_app):
    _open(browser, rater_app)
    queue = _get(rater_app, "/v1/feedback/queue?limit=50").json()["data"]
    assert len(queue) >= 2
    _wait(browser, lambda d: "unrated answers waiting" in _text(d, "queue-status"), "the queue loaded")
    _unfocus(browser)
    _keys(browser, "n")
    _wait(browser, lambda d: _visible(d, "answer-panel") and queue[0]["response_id"] in _text(d, "shown-meta"), "the newest")
    assert _text(browser, "shown-question") == queue[0]["question"] and _text(browser, "queue-status").startswith("Unrated answer 1 of")
    _keys(browser, "n")
    _wait(browser, lambda d: queue[1]["response_id"] in _text(d, "shown-meta"), "the next unrated answer")
    if queue[1]["page_ids"]:
        thumbs = browser.find_elements("css selector", "#thumbnails li")
        assert [li.get_attribute("data-page-id") for li in thumbs] == queue[1]["page_ids"]
    _keys(browser, "-", "c", "forty-two", "\n")
    _wait(browser, lambda d: _text(d, "rate-status").startswith("Stored: ▼ down, correction “forty-two”"), "stored")
    queue_after = [it["response_id"] for it in _get(rater_app, "/v1/feedback/queue?limit=50").json()["data"]]
    assert queue[1]["response_id"] not in queue_after and queue[0]["response_id"] in queue_after


@served
def test_questions_answers_and_comments_are_shown_as_text(browser, rater_app):
    """A question and an answer holding a <script> and an <img onerror>: shown as the literal text,
    nothing of theirs runs, no element of theirs exists; the CSP stops inline script even so."""
    store = FeedbackStore(rater_app["db_url"])
    try:
        rid = "docqa-xss-" + uuid.uuid4().hex
        store.record_interaction(Interaction(rid, "docqa", "Who wrote " + XSS, "It was " + XSS,
                                             page_ids=tuple(rater_app["pages"][:2]), model="docrl", weights_version=3,
                                             checkpoint=rater_app["checkpoint"]))
    finally:
        store.close()
    _open(browser, rater_app)
    _unfocus(browser)
    _keys(browser, "n")  # the newest unrated answer: the one just recorded
    _wait(browser, lambda d: rid in _text(d, "shown-meta"), "the recorded answer")
    assert _text(browser, "shown-question") == "Who wrote " + XSS and _text(browser, "shown-answer") == "It was " + XSS
    _no_injected_code(browser)
    _shot(browser, "xss-in-the-queue")
    _keys(browser, "-", "m", XSS, "\n")
    _wait(browser, lambda d: _text(d, "rate-status").startswith("Stored"), "the comment stored")
    assert f"comment “{XSS}”" in _text(browser, "rate-status")
    asked = _ask(browser, "What does " + XSS + " say?")  # the server echoes the question
    assert asked.startswith("docqa-") and _text(browser, "shown-question") == "What does " + XSS + " say?"
    _no_injected_code(browser)
    # an inline script put in the page anyway does not run (script-src 'self'), and says why
    browser.execute_script("""
        window.__violations = [];
        document.addEventListener('securitypolicyviolation', e => window.__violations.push(e.violatedDirective));
        const s = document.createElement('script'); s.textContent = 'window.__xss = "inline"'; document.body.append(s);""")
    _wait(browser, lambda d: d.execute_script("return window.__violations.length") > 0, "the CSP violation report")
    assert browser.execute_script("return window.__violations")[0].startswith("script-src")
    assert browser.execute_script("return window.__xss === undefined")
    _shot(browser, "xss-as-text")


@served
def test_ask_about_an_uploaded_page(browser, rater_app, page, tmp_path):
    _open(browser, rater_app)
    upload = tmp_path / "page.png"
    image = page.load_image()
    image.thumbnail((480, 480))
    image.save(upload)
    browser.find_element("id", "upload-file").send_keys(str(upload))
    field = browser.find_element("id", "upload-question")
    field.send_keys("What is the date on this page?\n")
    _wait(browser, lambda d: _visible(d, "answer-panel") and "Chat about an uploaded page" in _text(d, "shown-meta"),
          "the answer about the upload")
    big = browser.find_element("id", "read-page-img")
    _wait(browser, lambda d: _image_loaded(d, big), "the uploaded page, large")
    assert big.get_attribute("src").startswith("blob:") and _text(browser, "read-page-caption") == "Uploaded: page.png"
    rid = re.search(r"response (\S+)", _text(browser, "shown-meta")).group(1)
    assert rid.startswith("chatcmpl-")
    browser.find_element("id", "answer-title").click()
    _keys(browser, "+", "\n")
    _wait(browser, lambda d: _text(d, "rate-status").startswith("Stored: ▲ up"), "the rating stored")
    store = FeedbackStore(rater_app["db_url"])
    try:
        stored = store.get_interaction(rid)
        assert stored.kind == "chat" and stored.question == "What is the date on this page?"
        assert len(stored.image_hashes) == 1 and store.get_image(stored.image_hashes[0]) == upload.read_bytes()
    finally:
        store.close()


@served
def test_the_chart_shows_each_version_over_time(browser, rater_app):
    _open(browser, rater_app)
    _wait(browser, lambda d: len(d.find_elements("css selector", "#chart-rows tr")) > 0, "the chart's numbers")
    rows = [r.text for r in browser.find_elements("css selector", "#chart-rows tr")]
    timeline = _get(rater_app, "/v1/feedback/timeline?bucket=day").json()["points"]
    assert len(rows) == len(timeline) and {"docrl w1", "docrl w2", "docrl w3"} <= {" ".join(r.split()[1:3]) for r in rows}
    panels = browser.find_elements("css selector", "#chart svg.panel")
    assert [p.get_attribute("aria-label") for p in panels] == ["Up-rate of rated answers", "Corrections"]
    # each version its own marker shape, named in the legend: readable without colour
    legend = browser.find_element("css selector", "#chart svg.legend").text
    assert "docrl w1 — circle" in legend and "docrl w2 — square" in legend and "docrl w3 — triangle" in legend
    marks = browser.find_elements("css selector", "#chart svg.panel .mark")
    rated = [p for p in timeline if p["rated"]]
    assert len(marks) == 2 * len(rated)
    browser.find_element("id", "chart-bucket").send_keys("h")  # per hour
    _wait(browser, lambda d: re.search(r"\d\d:00", _text(d, "chart-rows")), "the hourly numbers")

// The rater page: ask, read the answer beside its pages, rate it; the queue of unrated answers;
// ratings per model version over time. Plain DOM, no framework, no build step.
//
// Every question, answer, comment and server message is put in the page as text (textContent,
// text nodes, attribute values), never parsed as HTML; the page's CSP forbids inline script besides.
// The API key lives in sessionStorage (this tab only) and travels only in the Authorization header.
"use strict";

const KEY_STORAGE = "docrl.rater.key";
const ASK_TIMEOUT_MS = 180000;  // an answer: retrieval + generation (serve.request_timeout_s is 120 s by default)
const READ_TIMEOUT_MS = 30000;
const QUEUE_LIMIT = 50;
const UPLOAD_MAX_SIDE = 2048;  // larger uploads are scaled down here, under serve.limits.max_image_pixels
const UPLOAD_MAX_BYTES = 3 * 1024 * 1024;
const SERIES_MARKERS = ["circle", "square", "triangle", "diamond", "cross"];

const $ = (id) => document.getElementById(id);

const state = {
  key: "",
  model: null,        // the served model's name (chat requests name it)
  current: null,      // the answer shown: {id, kind, question, answer, citations, uploadURL, uploads, model, version, createdAt}
  rating: null,       // "up" | "down" | null
  rated: new Set(),   // response ids rated in this tab
  queue: [],
  queuePos: -1,
  queueLoading: null,  // the promise of the queue's load in flight
  pageURLs: new Map(), // page id -> Promise of an object URL of its image
};

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

// -- the API ----------------------------------------------------------------------------------

async function api(path, { method = "GET", body, as = "json", timeoutMs = READ_TIMEOUT_MS } = {}) {
  const headers = {};
  if (state.key) headers.Authorization = "Bearer " + state.key;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), timeoutMs);
  try {
    let res;
    try {
      res = await fetch(path, {
        method, headers, body: body === undefined ? undefined : JSON.stringify(body),
        signal: controller.signal, credentials: "omit", cache: "no-store", redirect: "error",
      });
    } catch (e) {
      throw new ApiError(0, e.name === "AbortError" ? `no answer within ${timeoutMs / 1000} s` : `the server cannot be reached (${e.message})`);
    }
    if (!res.ok) {
      let message = `${res.status} ${res.statusText}`;
      try {
        const err = await res.json();
        if (err && err.error && typeof err.error.message === "string") message = err.error.message;
      } catch (_) { /* not JSON: keep the status line */ }
      throw new ApiError(res.status, message);
    }
    return as === "blob" ? await res.blob() : await res.json();
  } catch (e) {
    if (e.name === "AbortError") throw new ApiError(0, `no answer within ${timeoutMs / 1000} s`);
    throw e;
  } finally {
    clearTimeout(timer);
  }
}

// An API failure shown to the rater; a refused key sends them back to the key form.
function report(what, e) {
  if (e instanceof ApiError && e.status === 401) {
    showKeyPanel(`The server refused the key: ${e.message}.`);
    return;
  }
  showAlert(`${what}: ${e.message}`);
}

function showAlert(text) {
  const alert = $("alert");
  alert.textContent = text;
  alert.hidden = !text;
}

// An action of the rater's went through: an earlier failure's banner is no longer the news (it
// would otherwise stay over the answer that followed). Background loads do not call this, so a
// chart that loads does not hide why the queue did not.
function actionSucceeded() {
  showAlert("");
}

function setBusy(text) {
  $("busy").textContent = text;
}

// -- the key ----------------------------------------------------------------------------------

function showKeyPanel(error) {
  state.key = "";
  sessionStorage.removeItem(KEY_STORAGE);
  // what was read with the key goes with it
  state.current = null;
  for (const loading of state.pageURLs.values()) loading.then((url) => URL.revokeObjectURL(url), () => {});
  state.pageURLs.clear();
  $("answer-panel").hidden = true;
  $("workspace").hidden = true;
  $("forget-key").hidden = true;
  $("server-info").textContent = "Not connected.";
  $("key-panel").hidden = false;
  $("key-error").textContent = error || "";
  $("key-input").focus();
}

// `keySource`: "typed" (just now), "stored" (earlier in this tab) or "none".
async function connect(keySource) {
  let models;
  try {
    models = await api("v1/models");
  } catch (e) {
    if (e.status === 401) {
      // asked without a key: the server wants one (no error yet); with a key: it was refused
      showKeyPanel(keySource === "none" ? "" : `The server refused ${keySource === "typed" ? "this" : "the stored"} key: ${e.message}.`);
    } else {
      $("server-info").textContent = "Not connected.";
      showAlert(`Cannot reach the server's API: ${e.message}`);
    }
    return false;
  }
  const m = models.data[0];
  state.model = m.id;
  $("server-info").textContent = `Model ${m.id} · weights version ${m.weights_version ?? "base"} (${m.kind}, step ${m.step ?? "-"})`
    + (state.key ? " · key set for this tab" : " · this server needs no key");
  $("key-panel").hidden = true;
  $("forget-key").hidden = !state.key;
  $("workspace").hidden = false;
  showAlert("");
  loadQueue().then(updateQueueStatus, (e) => report("Loading the queue failed", e));
  loadChart();
  return true;
}

async function useKey(ev) {
  ev.preventDefault();
  const input = $("key-input");
  const key = input.value.trim();
  input.value = "";
  if (!key) return;
  state.key = key;
  $("key-error").textContent = "";
  if (await connect("typed")) sessionStorage.setItem(KEY_STORAGE, key);
}

function forgetKey() {
  showKeyPanel("");
}

// -- asking -----------------------------------------------------------------------------------

async function ask(ev) {
  ev.preventDefault();
  const question = $("question").value.trim();
  if (!question) return;
  const docId = $("ask-doc").value.trim();  // empty: the whole index
  const body = docId ? { question, doc_id: docId } : { question };
  $("ask-button").disabled = true;
  setBusy(docId ? "Asking the document…" : "Asking the documents…");
  try {
    const r = await api("v1/docqa", { method: "POST", body, timeoutMs: ASK_TIMEOUT_MS });
    actionSucceeded();
    showAnswer({
      id: r.id, kind: "docqa", question: r.question, answer: r.answer, citations: r.citations, model: r.model,
      version: r.weights_version, createdAt: new Date(r.created * 1000),
    });
  } catch (e) {
    report("Asking failed", e);
  } finally {
    $("ask-button").disabled = false;
    setBusy("");
  }
}

// The chosen file as a data: URL, scaled down (JPEG) when it is large.
async function uploadDataURL(file) {
  const bitmap = await createImageBitmap(file);
  const side = Math.max(bitmap.width, bitmap.height);
  let blob = file;
  if (side > UPLOAD_MAX_SIDE || file.size > UPLOAD_MAX_BYTES) {
    const scale = Math.min(1, UPLOAD_MAX_SIDE / side);
    const canvas = document.createElement("canvas");
    canvas.width = Math.max(1, Math.round(bitmap.width * scale));
    canvas.height = Math.max(1, Math.round(bitmap.height * scale));
    canvas.getContext("2d").drawImage(bitmap, 0, 0, canvas.width, canvas.height);
    blob = await new Promise((resolve) => canvas.toBlob(resolve, "image/jpeg", 0.9));
  }
  bitmap.close();
  const url = await new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
  return { url, blob };
}

async function askAboutUpload(ev) {
  ev.preventDefault();
  const file = $("upload-file").files[0];
  const question = $("upload-question").value.trim();
  if (!file || !question) return;
  $("upload-button").disabled = true;
  setBusy("Reading the page image…");
  try {
    let upload;
    try {
      upload = await uploadDataURL(file);
    } catch (e) {
      showAlert(`${file.name}: not an image this browser can read (${e.message})`);
      return;
    }
    setBusy("Asking about the page…");
    const r = await api("v1/chat/completions", {
      method: "POST", timeoutMs: ASK_TIMEOUT_MS, body: {
        model: state.model, messages: [{ role: "user", content: [
          { type: "image_url", image_url: { url: upload.url } }, { type: "text", text: question }] }],
      },
    });
    actionSucceeded();
    showAnswer({
      id: r.id, kind: "chat", question, answer: r.choices[0].message.content, citations: [], model: r.model,
      version: null, createdAt: new Date(r.created * 1000), uploadURL: URL.createObjectURL(upload.blob),
      uploadName: file.name,
    });
  } catch (e) {
    report("Asking about the page failed", e);
  } finally {
    $("upload-button").disabled = false;
    setBusy("");
  }
}

// -- the answer and its pages -----------------------------------------------------------------

function pageImageURL(pageId) {
  if (!state.pageURLs.has(pageId)) {
    const loading = api(`v1/pages/${encodeURIComponent(pageId)}/image`, { as: "blob" }).then((blob) => URL.createObjectURL(blob));
    loading.catch(() => state.pageURLs.delete(pageId));  // tried again next time
    state.pageURLs.set(pageId, loading);
  }
  return state.pageURLs.get(pageId);
}

function citationLabel(c) {
  const where = c.doc_id ? `${c.doc_id}, page ${c.page_no ?? "?"}` : c.page_id;
  const parts = [`#${c.rank}`, where];
  if (typeof c.score === "number") parts.push(`score ${c.score.toFixed(2)}`);
  if (c.read) parts.push("read");
  return parts.join(" · ");
}

function showReadPage(c) {
  const img = $("read-page-img");
  const caption = $("read-page-caption");
  img.hidden = true;
  img.removeAttribute("src");
  caption.textContent = `Loading page ${c.page_id}…`;
  for (const li of $("thumbnails").children) {
    const shown = li.dataset.pageId === c.page_id;
    li.classList.toggle("shown", shown);
    li.firstElementChild.setAttribute("aria-current", String(shown));
  }
  const shownFor = state.current;
  pageImageURL(c.page_id).then((url) => {
    if (state.current !== shownFor) return;
    img.src = url;
    img.alt = `Page ${c.page_id}`;
    img.hidden = false;
    caption.textContent = `${c.read ? "Read by the model" : "Cited"}: ${citationLabel(c)}`;
  }, (e) => {
    if (state.current !== shownFor) return;
    caption.textContent = `Page ${c.page_id}: ${e.message}`;
    if (e.status === 401) report("Loading the page failed", e);
  });
}

function thumbnail(c) {
  const li = document.createElement("li");
  li.dataset.pageId = c.page_id;
  const button = document.createElement("button");
  button.type = "button";
  button.className = "thumb";
  button.setAttribute("aria-label", `Show page ${c.page_id} large (${citationLabel(c)})`);
  const img = document.createElement("img");
  img.alt = `Page ${c.page_id}`;
  const label = document.createElement("span");
  label.textContent = citationLabel(c);
  button.append(img, label);
  button.addEventListener("click", () => showReadPage(c));
  li.append(button);
  pageImageURL(c.page_id).then((url) => { img.src = url; }, (e) => { label.textContent = `${citationLabel(c)} · ${e.message}`; });
  return li;
}

// the rater's page label: which cited page holds the answer ("none": none of them); docqa only
function answerPageChoice(value, text, checked) {
  const label = document.createElement("label");
  const input = document.createElement("input");
  input.type = "radio";
  input.name = "answer-page";
  input.value = value;
  input.checked = checked;
  label.append(input, document.createTextNode(` ${text}`));
  return label;
}

function showAnswerPageChoices(item) {
  const cited = item.kind === "docqa" ? item.citations : [];
  $("answer-page").hidden = cited.length === 0;
  $("answer-page-choices").replaceChildren(
    answerPageChoice("", "not marked", true),
    ...cited.map((c) => answerPageChoice(c.page_id, citationLabel(c), false)),
    answerPageChoice("none", "none of them", false));
}

function markAnswerPage(index) {  // 1-9: that cited page, 0: none of them
  if (!state.current || $("answer-page").hidden) return;
  const value = index === 0 ? "none" : state.current.citations[index - 1]?.page_id;
  const input = [...document.querySelectorAll('input[name="answer-page"]')].find((i) => value && i.value === value);
  if (input) input.checked = true;
}

function showAnswer(item) {
  state.current = item;
  state.rating = null;
  $("correction").value = "";
  $("comment").value = "";
  showAnswerPageChoices(item);
  $("rate-status").textContent = "";
  showRating();
  $("shown-question").textContent = item.question;
  $("shown-answer").textContent = item.answer === "" ? "(an empty answer)" : item.answer;
  const what = item.kind === "docqa" ? "Document QA" : "Chat about an uploaded page";
  const version = item.version === null || item.version === undefined ? "" : ` weights version ${item.version}`;
  $("shown-meta").textContent = `${what} · response ${item.id} · ${item.model}${version} · ${item.createdAt.toLocaleString()}`;
  const thumbs = $("thumbnails");
  thumbs.replaceChildren(...item.citations.map(thumbnail));
  const img = $("read-page-img");
  const caption = $("read-page-caption");
  if (item.citations.length) {
    showReadPage(item.citations.find((c) => c.read) || item.citations[0]);
  } else if (item.uploadURL) {
    img.src = item.uploadURL;
    img.alt = `The uploaded page ${item.uploadName}`;
    img.hidden = false;
    caption.textContent = `Uploaded: ${item.uploadName}`;
  } else {
    img.hidden = true;
    img.removeAttribute("src");
    caption.textContent = item.uploads
      ? `The answer was about ${item.uploads} uploaded image(s); they are kept in the feedback store, not shown here.`
      : "No pages were cited.";
  }
  $("answer-panel").hidden = false;
  $("answer-title").focus();  // so that the rating keys work at once
}

// -- rating -----------------------------------------------------------------------------------

function showRating() {
  $("rate-up").setAttribute("aria-pressed", String(state.rating === "up"));
  $("rate-down").setAttribute("aria-pressed", String(state.rating === "down"));
  $("rating-chosen").textContent = state.rating === "up" ? "chosen: ▲ up" : state.rating === "down" ? "chosen: ▼ down" : "not rated yet";
}

function setRating(rating) {
  if (!state.current) return;
  if (rating === "up" && $("correction").value.trim()) {
    $("rate-status").textContent = "An up-vote keeps the answer as it is: clear the correction to vote up.";
    return;
  }
  state.rating = rating;
  showRating();
}

function correctionTyped() {
  if ($("correction").value.trim() && state.rating !== "down") {
    state.rating = "down";
    showRating();
    $("rate-status").textContent = "A correction makes this a down-vote.";
  }
}

async function submitRating(ev) {
  if (ev) ev.preventDefault();
  const item = state.current;
  if (!item) return;
  if (!state.rating) {
    $("rate-status").textContent = "Choose ▲ up (+) or ▼ down (-) first.";
    return;
  }
  const body = { response_id: item.id, rating: state.rating };
  const correction = $("correction").value.trim();
  const comment = $("comment").value.trim();
  if (correction) body.correction = correction;
  if (comment) body.comment = comment;
  const answerPage = document.querySelector('input[name="answer-page"]:checked')?.value;
  if (answerPage) body.answer_page = answerPage;
  $("rate-submit").disabled = true;
  $("rate-status").textContent = "Storing…";
  try {
    const rec = await api("v1/feedback", { method: "POST", body });
    actionSucceeded();
    if (state.current !== item) return;
    state.rated.add(item.id);
    const parts = [`Stored: ${rec.rating === "up" ? "▲ up" : "▼ down"}`];
    if (rec.correction) parts.push(`correction “${rec.correction}”`);
    if (rec.comment) parts.push(`comment “${rec.comment}”`);
    if (rec.answer_page) parts.push(rec.answer_page === "none" ? "no cited page holds the answer" : `the answer is on ${rec.answer_page}`);
    $("rate-status").textContent = `${parts.join(", ")} at ${new Date(rec.updated_at).toLocaleTimeString()}`
      + (rec.replaced ? " (replaced the earlier rating)" : "") + ". Press n for the next unrated answer.";
    $("answer-title").focus();
    updateQueueStatus();
    loadChart();
  } catch (e) {
    if (e instanceof ApiError && e.status === 401) report("Storing the rating failed", e);
    else $("rate-status").textContent = `Not stored: ${e.message}`;
  } finally {
    $("rate-submit").disabled = false;
  }
}

// -- the queue of unrated answers -------------------------------------------------------------

// One load at a time: `n` pressed while the queue is loading waits for that load.
function loadQueue() {
  if (!state.queueLoading) {
    state.queueLoading = api(`v1/feedback/queue?limit=${QUEUE_LIMIT}`).then((q) => {
      state.queue = q.data;
      state.queuePos = -1;
    }).finally(() => { state.queueLoading = null; });
  }
  return state.queueLoading;
}

function unratedLeft() {
  return state.queue.filter((it) => !state.rated.has(it.response_id)).length;
}

function updateQueueStatus(text) {
  const left = unratedLeft();
  $("queue-status").textContent = text || (left
    ? `${left} unrated answer${left === 1 ? "" : "s"} waiting${state.queue.length >= QUEUE_LIMIT ? " (the newest " + QUEUE_LIMIT + " listed)" : ""}`
    : "No unrated answers waiting.");
}

function takeNext() {
  while (++state.queuePos < state.queue.length) {
    const it = state.queue[state.queuePos];
    if (!state.rated.has(it.response_id) && !(state.current && state.current.id === it.response_id)) return it;
  }
  return null;
}

async function nextUnrated() {
  if (state.queueLoading) await state.queueLoading.catch(() => {});
  let it = takeNext();
  if (!it) {
    try {
      await loadQueue();
    } catch (e) {
      report("Loading the queue failed", e);
      return;
    }
    it = takeNext();
  }
  actionSucceeded();
  if (!it) {
    updateQueueStatus("No unrated answers waiting.");
    return;
  }
  showAnswer({
    id: it.response_id, kind: it.kind, question: it.question, answer: it.answer, model: it.model,
    version: it.weights_version, createdAt: new Date(it.created_at), uploads: it.uploaded_images,
    citations: it.page_ids.map((pageId, i) => ({ rank: i + 1, page_id: pageId, read: i === 0 })),
  });
  updateQueueStatus(`Unrated answer ${state.queuePos + 1} of ${state.queue.length} (newest first)`);
}

// -- the chart --------------------------------------------------------------------------------

const SVG_NS = "http://www.w3.org/2000/svg";

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = text;
  return node;
}

function marker(shape, x, y, cls) {
  const r = 4.5;
  if (shape === "circle") return svg("circle", { cx: x, cy: y, r, class: cls });
  if (shape === "square") return svg("rect", { x: x - r, y: y - r, width: 2 * r, height: 2 * r, class: cls });
  const pts = {
    triangle: [[x, y - r - 1], [x + r + 1, y + r], [x - r - 1, y + r]],
    diamond: [[x, y - r - 1], [x + r + 1, y], [x, y + r + 1], [x - r - 1, y]],
    cross: [[x - r, y - r], [x + r, y + r], [x, y], [x + r, y - r], [x - r, y + r], [x, y]],
  }[shape];
  return svg("polygon", { points: pts.map((p) => p.join(",")).join(" "), class: cls });
}

function versionName(p) {
  return `${p.model} w${p.weights_version ?? "base"}`;
}

function periodName(iso, bucket) {
  const t = new Date(iso);
  const day = t.toISOString().slice(0, 10);
  return bucket === "day" ? day : `${day} ${t.toISOString().slice(11, 16)}`;
}

// One small panel: a line per model version over the periods, each version its own marker and dash.
function panel(title, periods, series, valueOf, yMax, yLabel, bucket) {
  const W = 420, H = 190, L = 44, R = 12, T = 26, B = 34;
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: "img", "aria-label": title, class: "panel" });
  root.append(svg("text", { x: L, y: 16, class: "panel-title" }, title));
  const x = (i) => L + (periods.length === 1 ? (W - L - R) / 2 : i * (W - L - R) / (periods.length - 1));
  const y = (v) => T + (H - T - B) * (1 - v / yMax);
  for (const v of (Number.isInteger(yMax / 2) || yMax < 1 ? [0, yMax / 2, yMax] : [0, yMax])) {
    root.append(svg("line", { x1: L, x2: W - R, y1: y(v), y2: y(v), class: "grid" }));
    root.append(svg("text", { x: L - 6, y: y(v) + 4, class: "tick", "text-anchor": "end" }, yLabel(v)));
  }
  const shownTicks = periods.length <= 3 ? periods.map((_, i) => i) : [0, periods.length - 1];
  for (const i of shownTicks) {
    const anchor = periods.length === 1 ? "middle" : i === 0 ? "start" : i === periods.length - 1 ? "end" : "middle";
    root.append(svg("text", { x: x(i), y: H - 12, class: "tick", "text-anchor": anchor }, periodName(periods[i], bucket)));
  }
  series.forEach((s, k) => {
    const cls = `series series-${k % SERIES_MARKERS.length}`;
    const pts = [];
    periods.forEach((period, i) => {
      const p = s.points.get(period);
      const v = p ? valueOf(p) : null;
      if (v !== null) pts.push([x(i), y(v), p, v]);
    });
    if (pts.length > 1) {
      root.append(svg("polyline", { points: pts.map(([a, b]) => `${a},${b}`).join(" "), class: `${cls} line dash-${k % 3}` }));
    }
    for (const [a, b, p, v] of pts) {
      const m = marker(SERIES_MARKERS[k % SERIES_MARKERS.length], a, b, `${cls} mark`);
      m.append(svg("title", {}, `${s.name}, ${periodName(p.start, bucket)}: ${yLabel(v)} (${p.up} up, ${p.down} down, ${p.corrections} corrections)`));
      root.append(m);
    }
  });
  return root;
}

function legend(series) {
  const root = svg("svg", { viewBox: `0 0 420 ${20 * series.length + 6}`, width: 420, height: 20 * series.length + 6, class: "legend", role: "list" });
  series.forEach((s, k) => {
    const cls = `series series-${k % SERIES_MARKERS.length}`;
    const yy = 12 + 20 * k;
    const g = svg("g", { role: "listitem" });
    g.append(svg("line", { x1: 4, x2: 34, y1: yy, y2: yy, class: `${cls} line dash-${k % 3}` }));
    g.append(marker(SERIES_MARKERS[k % SERIES_MARKERS.length], 19, yy, `${cls} mark`));
    const checkpoint = s.checkpoint ? " · " + s.checkpoint.split("/").filter(Boolean).slice(-2).join("/") : "";
    g.append(svg("text", { x: 42, y: yy + 4, class: "legend-text" }, `${s.name} — ${SERIES_MARKERS[k % SERIES_MARKERS.length]}${checkpoint}`));
    root.append(g);
  });
  return root;
}

function drawChart(points, bucket) {
  const chart = $("chart");
  const rows = $("chart-rows");
  const rated = points.filter((p) => p.rated > 0);
  if (!points.length) {
    const empty = document.createElement("p");
    empty.textContent = "No answers in this period.";
    chart.replaceChildren(empty);
    rows.replaceChildren();
    return;
  }
  const periods = [...new Set(points.map((p) => p.start))].sort();
  const byVersion = new Map();
  for (const p of points) {
    const key = JSON.stringify([p.model, p.checkpoint, p.weights_version]);
    if (!byVersion.has(key)) byVersion.set(key, { name: versionName(p), checkpoint: p.checkpoint, points: new Map() });
    byVersion.get(key).points.set(p.start, p);
  }
  const series = [...byVersion.values()];
  const maxCorrections = Math.max(1, ...points.map((p) => p.corrections));
  chart.replaceChildren(
    panel("Up-rate of rated answers", periods, series, (p) => (p.rated ? p.up / p.rated : null), 1,
      (v) => `${Math.round(v * 100)}%`, bucket),
    panel("Corrections", periods, series, (p) => (p.rated ? p.corrections : null), maxCorrections,
      (v) => (Number.isInteger(v) ? String(v) : v.toFixed(1)), bucket),
    legend(series));
  if (!rated.length) {
    const note = document.createElement("p");
    note.textContent = "Nothing rated in this period yet.";
    chart.append(note);
  }
  rows.replaceChildren(...points.map((p) => {
    const tr = document.createElement("tr");
    for (const cell of [periodName(p.start, bucket), versionName(p), p.answers, p.up, p.down,
      p.up_rate === null ? "-" : `${Math.round(p.up_rate * 100)}%`, p.corrections]) {
      const td = document.createElement("td");
      td.textContent = String(cell);
      tr.append(td);
    }
    return tr;
  }));
}

// `byRater`: the rater asked for it (another period, the refresh button), not a background reload.
async function loadChart(byRater = false) {
  const bucket = $("chart-bucket").value;
  const since = new Date(Date.now() - (bucket === "day" ? 30 * 86400e3 : 48 * 3600e3)).toISOString();
  try {
    const t = await api(`v1/feedback/timeline?bucket=${bucket}&since=${encodeURIComponent(since)}`);
    if (byRater) actionSucceeded();
    drawChart(t.points, bucket);
  } catch (e) {
    report("Loading the chart failed", e);
  }
}

// -- keys -------------------------------------------------------------------------------------

function typingIn(target) {
  return target instanceof HTMLTextAreaElement || target instanceof HTMLSelectElement
    || (target instanceof HTMLInputElement && !["button", "submit", "checkbox", "radio"].includes(target.type));
}

function onKey(ev) {
  if (ev.ctrlKey || ev.metaKey || ev.altKey || $("workspace").hidden) return;
  if (typingIn(ev.target)) {
    if (ev.key === "Escape") ev.target.blur();
    return;
  }
  const onControl = ev.target instanceof HTMLButtonElement || ev.target instanceof HTMLAnchorElement;
  const actions = {
    "+": () => setRating("up"),
    "=": () => setRating("up"),  // the + key without Shift
    "-": () => setRating("down"),
    c: () => { if (state.current) $("correction").focus(); },
    m: () => { if (state.current) $("comment").focus(); },
    n: () => nextUnrated(),
    ...Object.fromEntries([...Array(10).keys()].map((i) => [String(i), () => markAnswerPage(i)])),
    "/": () => $("question").focus(),
    Enter: onControl ? null : () => submitRating(),
  };
  const action = actions[ev.key];
  if (!action) return;
  ev.preventDefault();
  action();
}

// -- start ------------------------------------------------------------------------------------

function start() {
  $("key-form").addEventListener("submit", useKey);
  $("forget-key").addEventListener("click", forgetKey);
  $("ask-form").addEventListener("submit", ask);
  $("upload-form").addEventListener("submit", askAboutUpload);
  $("rate-form").addEventListener("submit", submitRating);
  $("rate-up").addEventListener("click", () => setRating("up"));
  $("rate-down").addEventListener("click", () => setRating("down"));
  $("correction").addEventListener("input", correctionTyped);
  $("next-unrated").addEventListener("click", () => nextUnrated());
  $("chart-bucket").addEventListener("change", () => loadChart(true));
  $("chart-refresh").addEventListener("click", () => loadChart(true));
  document.addEventListener("keydown", onKey);
  state.key = sessionStorage.getItem(KEY_STORAGE) || "";
  connect(state.key ? "stored" : "none");
}

start();

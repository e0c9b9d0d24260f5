// diffret serve: the page's script. Plain DOM, no framework, nothing loaded from elsewhere.
// Every text from the server goes in through textContent (video ids and captions can hold anything).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { info: null, last: null };

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

function fmt(x, digits = 3) {
  return typeof x === "number" && isFinite(x) ? x.toFixed(digits) : "-";
}

function seconds(t) {
  return typeof t === "number" && isFinite(t) ? t.toFixed(1) + " s" : "";
}

async function getJSON(url) {
  let response;
  try {
    response = await fetch(url, { headers: { Accept: "application/json" } });
  } catch (e) {
    throw new Error("cannot reach the server (" + e.message + ")");
  }
  let body = null;
  try { body = await response.json(); } catch (e) { body = null; }
  if (!response.ok) {
    throw new Error((body && body.error) || ("server error " + response.status));
  }
  return body;
}

function isSpecial(word) {
  return /^(<[^>]*>|\[[A-Z]+\])$/.test(word || "");
}

function wordsLine(evidence) {
  const line = el("div", "words");
  const words = ((evidence && evidence.words) || []).filter((w) => !isSpecial(w.word));
  const cos = words.map((w) => w.cosine).filter((c) => typeof c === "number");
  const lo = Math.min(...cos), hi = Math.max(...cos);
  for (const w of words) {
    // how well the word matched its best frame, relative to the other words of this hit
    const rel = hi > lo ? (w.cosine - lo) / (hi - lo) : 1;
    const span = el("span", "word", w.word);
    span.style.backgroundColor = `rgba(42, 111, 219, ${(0.08 + 0.55 * rel).toFixed(2)})`;
    span.title = `cosine ${fmt(w.cosine)} at ${seconds(w.time)} (frame ${w.frame}), weight ${fmt(w.weight)}`;
    const at = el("small", null, seconds(w.time));
    span.appendChild(at);
    line.appendChild(span);
    line.appendChild(document.createTextNode(" "));
  }
  return line;
}

function play(hit, card) {
  const video = $("video");
  const t = (hit.evidence && hit.evidence.best_time) || 0;
  document.querySelectorAll(".hit.playing").forEach((c) => c.classList.remove("playing"));
  card.classList.add("playing");
  $("player").hidden = false;
  $("now-playing").textContent = `#${hit.rank} ${hit.video_id} from ${seconds(t)}`;
  video.muted = true;  // lets the browser start playing without another click
  const start = () => {
    video.currentTime = Math.min(t, isFinite(video.duration) ? video.duration : t);
    video.play().catch(() => {});
  };
  video.onerror = () => showError(`cannot play ${hit.video_id}: the video file is missing, moved or not playable here`);
  if (video.dataset.mediaId === hit.media_id && video.readyState >= 1) {
    start();
  } else {
    video.dataset.mediaId = hit.media_id;
    video.addEventListener("loadedmetadata", start, { once: true });
    video.src = "/media/" + encodeURIComponent(hit.media_id);
  }
}

function card(hit, reranked) {
  const c = el("article", "hit");
  c.tabIndex = 0;
  c.dataset.videoId = hit.video_id;
  c.dataset.mediaId = hit.media_id || "";
  const img = el("img");
  img.alt = hit.video_id;
  img.loading = "lazy";
  const t = (hit.evidence && hit.evidence.best_time) || 0;
  if (hit.media_id) img.src = `/thumb/${encodeURIComponent(hit.media_id)}?t=${t}`;
  c.appendChild(img);
  const body = el("div", "body");
  const top = el("div", "top");
  top.appendChild(el("span", "rank", "#" + hit.rank));
  top.appendChild(el("span", "vid", hit.video_id));
  body.appendChild(top);
  let scores = `score ${fmt(hit.score)} · stage 1 #${hit.stage1_rank} (${fmt(hit.stage1_score)})`;
  if (reranked && hit.diffusion_rank !== undefined) {
    scores += hit.diffusion_rank === null ? " · diffusion: outside the re-ranked pool"
      : ` · diffusion #${hit.diffusion_rank} (${fmt(hit.diffusion_score)})`;
  }
  body.appendChild(el("div", "scores", scores));
  body.appendChild(el("div", "scores", "best moment " + seconds(t)));
  body.appendChild(wordsLine(hit.evidence));
  c.appendChild(body);
  c.addEventListener("click", () => play(hit, c));
  c.addEventListener("keydown", (e) => { if (e.key === "Enter") play(hit, c); });
  return c;
}

function render(result) {
  const grid = $("results");
  grid.replaceChildren();
  for (const hit of result.hits) grid.appendChild(card(hit, result.has_generator));
  const order = result.order === "stage1" ? ", stage-1 order" : result.has_generator ? ", diffusion re-ranking" : "";
  $("status").textContent = `${result.hits.length} results for "${result.query}" (${fmt(result.seconds, 3)} s${order})`;
  grid.dataset.query = result.query;
  grid.dataset.ready = "1";
}

async function search(event) {
  if (event) event.preventDefault();
  const q = $("q").value;
  showError("");
  if (!q.trim()) {
    showError("Type a few words describing the video you are looking for.");
    return;
  }
  const params = new URLSearchParams({ q, k: $("k").value || "" });
  if ($("stage1").checked) params.set("order", "stage1");
  $("results").dataset.ready = "0";
  $("status").textContent = "searching…";
  try {
    state.last = await getJSON("/api/search?" + params);
    render(state.last);
  } catch (e) {
    $("status").textContent = "";
    showError(e.message);
  }
}

async function init() {
  $("search").addEventListener("submit", search);
  $("stage1").addEventListener("change", () => { if ($("q").value.trim()) search(); });
  try {
    state.info = await getJSON("/api/info");
    $("k").value = state.info.k;
    $("k").max = state.info.max_k;
    $("q").maxLength = state.info.max_query_chars;
    $("order-toggle").hidden = !state.info.has_generator;
    $("status").textContent = `${state.info.videos} videos` + (state.info.has_generator ? ", with a generator" : "");
  } catch (e) {
    showError(e.message);
  }
}

init();

// The search page: text, image and "more like this" queries against the JSON API.
// Plain DOM code, no build step and nothing loaded from elsewhere.
"use strict";

const K = 24;  // results per query

const $ = (id) => document.getElementById(id);
const form = $("search-form");
const input = $("search-input");
const fileInput = $("file-input");
const dropZone = $("drop-zone");
const mixText = $("mix-text");
const preview = $("query-preview");
const errorBox = $("error");
const statusLine = $("status");
const grid = $("results");
const cardTemplate = $("card-template");
const tokenForm = $("token-form");
const tokenInput = $("token-input");
const picker = $("index-picker");
const indexSelect = $("index-select");

let latest = 0;  // number of the newest request: answers to older ones are dropped
let retry = null;  // the query that was refused for want of a token: run again once given
let thumbnailUrls = [];  // blob: URLs of the shown thumbnails and videos, revoked with their cards
let indexes = [];  // the served indexes, from /healthz: [{name, status, items, model}, ...]

// A server with several indexes searches the first unless a request names another: the page
// then shows a select, and every request (and the page's URL) carries the chosen name.
function several() {
  return indexes.length > 1;
}

function indexParam(name = indexSelect.value) {
  return several() && name ? { index: name } : {};
}

// A server started with an access token answers 401 to API calls without it.  The page asks
// once and keeps the token in sessionStorage (this tab only, gone when it closes); it is sent
// in the Authorization header, never in a URL, which would leave it in logs and history.
const TOKEN_KEY = "clipforge-token";

function withToken(options = {}) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (!token) return options;
  return { ...options, headers: { ...options.headers, Authorization: `Bearer ${token}` } };
}

function askForToken(again) {
  sessionStorage.removeItem(TOKEN_KEY);  // missing or refused: either way, ask
  retry = again;
  tokenForm.hidden = false;
  tokenInput.focus();
}

tokenForm.addEventListener("submit", (event) => {
  event.preventDefault();
  const token = tokenInput.value.trim();
  if (!token) return;
  sessionStorage.setItem(TOKEN_KEY, token);
  tokenInput.value = "";
  tokenForm.hidden = true;
  const again = retry;
  retry = null;
  if (again) again();
});

// The API's reason for a failure: FastAPI sends {"detail": "..."} or, for invalid
// parameters, {"detail": [{"loc": [...], "msg": "..."}]}.
async function errorMessage(response) {
  let detail = null;
  try {
    detail = (await response.json()).detail;
  } catch (_) {
    // not JSON (a proxy's page, a plain-text 413): the status line says enough
  }
  if (Array.isArray(detail)) {
    detail = detail.map((d) => `${(d.loc || []).slice(1).join(".")}: ${d.msg}`).join("; ");
  }
  return `${response.status} ${response.statusText}${detail ? ": " + detail : ""}`;
}

async function request(url, options) {
  const number = ++latest;
  errorBox.hidden = true;
  grid.setAttribute("aria-busy", "true");
  statusLine.textContent = "Searching…";
  try {
    const response = await fetch(url, withToken(options));
    if (response.status === 401) askForToken(() => request(url, options));
    if (!response.ok) throw new Error(await errorMessage(response));
    const data = await response.json();
    if (number === latest) render(data);
  } catch (err) {
    if (number === latest) showError(err.message);
  } finally {
    if (number === latest) grid.removeAttribute("aria-busy");
  }
}

// The old results go too: left on screen, they would pass for the failed query's answer.
function showError(message) {
  errorBox.textContent = message;
  errorBox.hidden = false;
  statusLine.textContent = "";
  showCards([]);
}

function showCards(cards) {
  for (const url of thumbnailUrls) URL.revokeObjectURL(url);
  thumbnailUrls = [];
  grid.replaceChildren(...cards);
}

// An <img src> cannot send the Authorization header: with a token, the JPEG is fetched with it
// and shown from a blob: URL.  Without one, the plain URL keeps lazy loading and the cache.
function showThumbnail(img, url) {
  if (!sessionStorage.getItem(TOKEN_KEY)) {
    img.src = url;
    return;
  }
  fetch(url, withToken())
    .then((response) => (response.ok ? response.blob() : null))
    .then((blob) => {
      if (!blob) return;  // the alt text stands in, as for a broken image
      const src = URL.createObjectURL(blob);
      thumbnailUrls.push(src);
      img.src = src;
    })
    .catch(() => {});
}

// A video segment's times as HH:MM:SS, with milliseconds when between seconds (as the
// command line prints them).
function clock(seconds) {
  const millis = Math.round(seconds * 1000);
  const pad = (n) => String(n).padStart(2, "0");
  const whole = Math.floor(millis / 1000);
  const rest = millis % 1000;
  const fraction = rest ? "." + String(rest).padStart(3, "0").replace(/0+$/, "") : "";
  return `${pad(Math.floor(whole / 3600))}:${pad(Math.floor(whole / 60) % 60)}:` +
    `${pad(whole % 60)}${fraction}`;
}

// Play a video result from the moment found: the media fragment #t=start,end tells the
// browser where to start and stop, and currentTime is set too once the metadata is in.  The
// server answers byte ranges, so the browser seeks without fetching the whole file.  With a
// token, a <video src> cannot send the Authorization header: the file is fetched with it and
// played from a blob: URL (the whole file is downloaded first).
async function playVideo(node, hit) {
  let source = hit.video;
  if (sessionStorage.getItem(TOKEN_KEY)) {
    const response = await fetch(hit.video, withToken());
    if (response.status === 401) askForToken(() => playVideo(node, hit));
    if (!response.ok) {  // said above the results, which stay
      errorBox.textContent = await errorMessage(response);
      errorBox.hidden = false;
      return;
    }
    source = URL.createObjectURL(await response.blob());
    thumbnailUrls.push(source);
  }
  const video = document.createElement("video");
  video.className = "thumb";
  video.controls = true;
  video.dataset.testid = "result-video";
  video.dataset.start = hit.start;
  video.addEventListener("loadedmetadata", () => {
    if (Math.abs(video.currentTime - hit.start) > 0.05) video.currentTime = hit.start;
  }, { once: true });
  video.src = `${source}#t=${hit.start},${hit.end}`;
  node.querySelector(".thumb").replaceWith(video);
  node.querySelector("button.play").disabled = true;
  video.play().catch(() => {});  // a browser may refuse to start without a click: controls stay
}

function baseName(path) {
  return path.split(/[\\/]/).pop();
}

function describe(query) {
  if (query.similar_to !== null && query.similar_to !== undefined) {
    return `like item ${query.similar_to}`;
  }
  const parts = [];
  if (query.image) parts.push(`image “${query.image}”`);
  if (query.text) parts.push(`“${query.text}”`);
  return parts.length ? "for " + parts.join(" + ") : "";
}

function render(data) {
  showCards(data.results.map((hit) => card(hit, data.index, data.query.text)));
  const n = data.results.length;
  statusLine.textContent =
    `${n} result${n === 1 ? "" : "s"} ${describe(data.query)} in ${data.took_ms.toFixed(0)} ms`;
}

// "Where?" on an image result of a query with a text: the server locates the text in the item
// (GET /api/items/{id}/locate) and sends the map over the image as a PNG, shown in place of
// the thumbnail from a data: URL (the page's Content-Security-Policy allows data: images); a
// second click shows the thumbnail again.  Fetched once per card, with the token if there is
// one.  The peak and box, in the image's own pixels, are kept on the card as data-peak and
// data-box.
function addLocateControl(node, hit, index, text, name) {
  const img = node.querySelector("img.thumb");
  const button = node.querySelector("button.where");
  let overlay = null;  // the map's data: URL, once fetched
  let thumbnail = null;  // what the thumbnail showed (a plain URL or a blob: one)
  button.setAttribute("aria-label", `Where is “${text}” in ${name}`);
  button.title = `Show where “${text}” is in this image`;

  async function fetchOverlay() {
    const query = new URLSearchParams({ q: text, ...indexParam(index) });
    const response = await fetch(
      `/api/items/${encodeURIComponent(hit.id)}/locate?${query}`, withToken());
    if (response.status === 401) askForToken(toggle);
    if (!response.ok) {  // said above the results, which stay
      errorBox.textContent = await errorMessage(response);
      errorBox.hidden = false;
      return null;
    }
    const data = await response.json();
    node.dataset.peak = data.peak.join(",");
    node.dataset.box = data.box.join(",");
    return `data:image/png;base64,${data.overlay_png}`;
  }

  async function toggle() {
    if (button.getAttribute("aria-pressed") === "true") {
      img.src = thumbnail;
      img.alt = hit.caption || name;
      button.setAttribute("aria-pressed", "false");
      return;
    }
    if (!overlay) {
      button.disabled = true;
      try {
        overlay = await fetchOverlay();
      } catch (err) {
        errorBox.textContent = err.message;
        errorBox.hidden = false;
      } finally {
        button.disabled = false;
      }
      if (!overlay) return;
    }
    thumbnail = img.getAttribute("src");
    img.src = overlay;
    img.alt = `Where “${text}” is in ${name}`;
    button.setAttribute("aria-pressed", "true");
  }

  button.setAttribute("aria-pressed", "false");
  button.addEventListener("click", toggle);
}

// `index`: the index that answered, whose ids the card's "more like this" refers to; `text`:
// the query's text, if it had one (what "Where?" locates).
function card(hit, index, text) {
  const node = cardTemplate.content.firstElementChild.cloneNode(true);
  const name = baseName(hit.path);
  node.dataset.id = hit.id;
  const img = node.querySelector("img");
  showThumbnail(img, hit.thumbnail);
  img.alt = hit.caption || name;
  if (hit.width && hit.height) {
    img.width = hit.width;
    img.height = hit.height;
  }
  const label = node.querySelector(".name");
  label.textContent = name;
  label.title = hit.path;
  node.querySelector(".score").textContent = hit.score === null ? "" : hit.score.toFixed(3);
  const caption = node.querySelector(".caption");
  if (hit.caption) caption.textContent = hit.caption;
  else caption.remove();
  const when = node.querySelector(".when");
  const play = node.querySelector("button.play");
  if (hit.video) {
    when.textContent = `${clock(hit.start)}–${clock(hit.end)}`;
    play.setAttribute("aria-label", `Play ${name} from ${clock(hit.start)}`);
    play.addEventListener("click", () => playVideo(node, hit));
  } else {
    when.remove();
    play.remove();
  }
  if (text && !hit.video) addLocateControl(node, hit, index, text, name);
  else node.querySelector("button.where").remove();
  const more = node.querySelector("button.more");
  more.setAttribute("aria-label", `More like ${name}`);
  more.addEventListener("click", () => similar(hit.id, index));
  return node;
}

function searchText(q) {
  const url = new URL(location.href);
  url.search = new URLSearchParams({ q, ...indexParam() }).toString();
  history.replaceState(null, "", url);
  return request(`/api/search?${new URLSearchParams({ q, k: K, ...indexParam() })}`);
}

preview.addEventListener("error", () => { preview.hidden = true; });

function searchImage(file) {
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(file);
  preview.alt = `Query image ${file.name}`;
  preview.hidden = false;
  const body = new FormData();
  body.append("file", file);
  body.append("k", K);
  if (mixText.checked && input.value.trim()) body.append("q", input.value.trim());
  for (const [key, value] of Object.entries(indexParam())) body.append(key, value);
  return request("/api/search/image", { method: "POST", body });
}

function similar(id, index) {
  const query = new URLSearchParams({ k: K, ...indexParam(index) });
  return request(`/api/items/${encodeURIComponent(id)}/similar?${query}`);
}

form.addEventListener("submit", (event) => {
  event.preventDefault();
  const q = input.value.trim();
  if (q) searchText(q);
});

fileInput.addEventListener("change", () => {
  if (fileInput.files.length) searchImage(fileInput.files[0]);
});

for (const type of ["dragenter", "dragover"]) {
  dropZone.addEventListener(type, (event) => {
    event.preventDefault();
    dropZone.classList.add("dragging");
  });
}
for (const type of ["dragleave", "drop"]) {
  dropZone.addEventListener(type, () => dropZone.classList.remove("dragging"));
}
dropZone.addEventListener("drop", (event) => {
  event.preventDefault();
  const file = event.dataTransfer.files[0];
  if (file) searchImage(file);
});

function showIndexInfo() {
  const info = indexes.find((i) => i.name === indexSelect.value) || indexes[0];
  if (!info) return;
  const model = info.model ? ` · model ${info.model}` : "";
  $("index-info").textContent =
    info.status === "ok" ? `${info.items} items${model}` : "this index cannot be read now";
}

// /healthz is open (no token) and lists every index; it answers 503 with the list too when
// the first index cannot be read.
async function loadIndexes(wanted) {
  try {
    const response = await fetch("/healthz");
    const health = await response.json();
    indexes = health.indexes || [];
  } catch (_) {
    return;  // informational only: requests then go to the default index
  }
  indexSelect.replaceChildren(...indexes.map((i) => new Option(i.name, i.name)));
  if (indexes.some((i) => i.name === wanted)) indexSelect.value = wanted;
  picker.hidden = !several();
  showIndexInfo();
}

indexSelect.addEventListener("change", () => {
  showIndexInfo();
  const q = input.value.trim();
  if (q) {
    searchText(q);
    return;
  }
  const url = new URL(location.href);
  url.searchParams.set("index", indexSelect.value);
  history.replaceState(null, "", url);
});

async function start() {
  const params = new URLSearchParams(location.search);
  await loadIndexes(params.get("index"));
  const initial = params.get("q");
  if (initial) {
    input.value = initial;
    searchText(initial);
  }
}

start();

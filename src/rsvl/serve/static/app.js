// rsvl's web page: open a raster, run a task, see the result on the map. No dependencies
// besides Leaflet, which the service ships (/static/leaflet): the page works offline.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { layer: null, base: null, overlays: [], job: null, models: [], cwd: ".", chat: [], indexJob: {} };
const PROMPTS = {
  segment: ["Classes", "trees, grass, bare soil, road"],
  classify: ["Classes", "forest, farmland, residential, water"],
  farmland: ["Request", "Please segment the farmland."],
  refer: ["Expression", "the large building"],
  instances: ["Classes to keep (empty: all)", ""],
  search: ["Text query", "a road through the forest"],
  chat: ["Question (or use the chat panel)", "What is in this image?"],
};

const map = L.map("map", { zoomSnap: 0.25, maxZoom: 24 }).setView([0, 0], 2);
map.attributionControl.setPrefix("Leaflet");

function setStatus(text, error = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", error);
}

async function api(path, options = {}) {
  const resp = await fetch(path, { credentials: "same-origin", ...options });
  const body = resp.headers.get("content-type")?.includes("json") ? await resp.json() : await resp.text();
  if (resp.status === 401) { $("auth").hidden = false; }
  if (!resp.ok) {
    const err = body && body.error ? body.error : { message: String(body) };
    throw new Error(err.message + (err.hint ? " " + err.hint : ""));
  }
  return body;
}
const post = (path, doc) => api(path, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(doc) });

// -- token ------------------------------------------------------------------------------
$("token-send").onclick = async () => {
  try {
    await post("/session", { token: $("token").value });
    $("auth").hidden = true;
    init();
  } catch (e) { setStatus(e.message, true); }
};

// -- files and layers -------------------------------------------------------------------------
async function listFiles(dir) {
  try {
    const doc = await api("/v1/files?dir=" + encodeURIComponent(dir));
    state.cwd = doc.dir;
    $("cwd").textContent = doc.dir;
    const ul = $("file-list");
    ul.innerHTML = "";
    for (const e of doc.entries) {
      const li = document.createElement("li");
      li.textContent = e.name;
      li.className = e.dir ? "dir" : "file";
      li.dataset.path = e.path;
      li.onclick = () => (e.dir ? listFiles(e.path) : openPath(e.path));
      ul.appendChild(li);
    }
    if (!doc.entries.length) ul.innerHTML = "<li>(no rasters here)</li>";
  } catch (e) { $("file-list").innerHTML = ""; setStatus(e.message, true); }
}
$("up").onclick = () => { if (state.cwd !== ".") listFiles(state.cwd.split("/").slice(0, -1).join("/") || "."); };

async function openPath(path) {
  try { showLayer(await post("/layers", { path })); } catch (e) { setStatus(e.message, true); }
}

$("upload").onchange = async () => {
  const file = $("upload").files[0];
  if (!file) return;
  const form = new FormData();
  form.append("file", file);
  setStatus("uploading " + file.name + " ...");
  try { showLayer(await api("/uploads", { method: "POST", body: form })); } catch (e) { setStatus(e.message, true); }
};

function clearResults() {
  for (const l of state.overlays) map.removeLayer(l);
  state.overlays = [];
  $("result").hidden = true;
  $("legend").innerHTML = "";
  $("downloads").innerHTML = "";
}

function showLayer(layer) {
  clearResults();
  if (state.base) map.removeLayer(state.base);
  state.layer = layer;
  state.chat = [];
  $("chat-log").innerHTML = "";
  $("current").textContent = `${layer.title}: ${layer.width} x ${layer.height} px` + (layer.georeferenced ? "" : " (no CRS: not on the map)");
  if (layer.georeferenced) {
    const b = layer.bounds;
    const bounds = L.latLngBounds([b[1], b[0]], [b[3], b[2]]);
    // fit first: a tile layer with a native zoom far from the map's would ask for a world of tiles
    map.fitBounds(bounds);
    state.base = L.tileLayer(layer.tiles, { bounds, maxNativeZoom: layer.maxzoom, maxZoom: 24, tileSize: 256 });
    state.base.addTo(map);
  }
  $("run").disabled = false;
  $("chat").hidden = false;
  setStatus("opened " + layer.title);
}

// -- models -------------------------------------------------------------------------------------
async function loadModels() {
  const doc = await api("/v1/models");
  state.models = doc.data;
  fillModels();
}
function fillModels() {
  const task = $("task").value;
  const want = task === "search" ? "search" : task;
  const sel = $("model");
  sel.innerHTML = "";
  for (const m of state.models.filter((m) => m.tasks.includes(want))) {
    const o = document.createElement("option");
    o.value = m.id;
    o.textContent = m.id + (m.weights_present ? "" : " (weights missing)");
    if (!m.weights_present) o.disabled = true;
    sel.appendChild(o);
  }
  const firstOk = [...sel.options].find((o) => !o.disabled && o.value.startsWith("mini-")) || [...sel.options].find((o) => !o.disabled);
  if (firstOk) sel.value = firstOk.value;
  const [label, example] = PROMPTS[task];
  $("prompt-label").textContent = label;
  $("prompt").value = example;
}
$("task").onchange = fillModels;

// -- jobs -----------------------------------------------------------------------------------------
const PARAM = { segment: "classes", classify: "classes", farmland: "request", refer: "expression", instances: "classes", chat: "question" };

$("run").onclick = async () => {
  if (!state.layer) return;
  const task = $("task").value;
  const model = $("model").value || null;
  const text = $("prompt").value.trim();
  clearResults();
  try {
    if (task === "chat") { await ask(text); return; }
    if (task === "search") { await runSearch(model, text); return; }
    const params = {};
    if (text || task !== "instances") params[PARAM[task]] = text;
    const job = await post("/jobs", { task, model, layer: state.layer.id, params });
    await follow(job);
  } catch (e) { setStatus(e.message, true); }
};

$("cancel").onclick = async () => {
  if (state.job) { try { await api("/jobs/" + state.job, { method: "DELETE" }); } catch (e) { setStatus(e.message, true); } }
};

async function follow(job) {
  state.job = job.id;
  $("progress").hidden = false;
  $("cancel").hidden = false;
  $("run").disabled = true;
  try {
    while (!["done", "failed", "cancelled"].includes(job.state)) {
      $("progress").value = job.progress || 0;
      const rate = job.rate ? `, ${job.rate.toFixed(2)} tiles/s` : "";
      const eta = job.eta_s != null ? `, eta ${Math.round(job.eta_s)} s` : "";
      setStatus(`${job.task} ${job.state}: ${job.done}/${job.total || "?"} tiles${rate}${eta}`);
      await new Promise((r) => setTimeout(r, 400));
      job = await api("/jobs/" + job.id);
    }
  } finally {
    $("progress").hidden = true;
    $("cancel").hidden = true;
    $("run").disabled = false;
  }
  if (job.state !== "done") {
    setStatus(`${job.task} ${job.state}` + (job.error ? ": " + job.error.message + (job.error.hint ? " " + job.error.hint : "") : ""), job.state === "failed");
    return job;
  }
  setStatus(`${job.task} done in ${(job.finished - job.started).toFixed(1)} s` + summary(job));
  await showResult(job);
  return job;
}

function summary(job) {
  const r = job.result || {};
  if (r.class_fractions) return ": " + Object.entries(r.class_fractions).map(([k, v]) => `${k} ${(100 * v).toFixed(0)}%`).join(", ");
  if (r.answer) return ": " + r.answer;
  if (r.predictions) return `: ${r.predictions.length} tiles classified`;
  if (r.instances !== undefined) return `: ${r.instances} instance(s)`;
  return "";
}

async function showResult(job) {
  $("result").hidden = false;
  const opacity = parseFloat($("opacity").value);
  for (const [kind, layer] of Object.entries(job.layers)) {
    if (kind === "confidence" || !layer.georeferenced) continue;
    const b = layer.bounds;
    const t = L.tileLayer(layer.tiles, { bounds: L.latLngBounds([b[1], b[0]], [b[3], b[2]]), maxNativeZoom: layer.maxzoom, maxZoom: 24, opacity, className: "result-layer" });
    t.addTo(map);
    state.overlays.push(t);
  }
  const legend = $("legend");
  for (const item of job.legend) {
    const li = document.createElement("li");
    li.innerHTML = `<span class="swatch" style="background:${item.color}"></span>`;
    li.appendChild(document.createTextNode(item.name));
    legend.appendChild(li);
  }
  for (const [kind, url] of Object.entries(job.features)) {
    const gj = await api(url);
    const colour = { polygons: "#ffcc00", instances: "#ff00ff", tiles: "#00c0ff", vector: "#ff4040" }[kind] || "#ff4040";
    const l = L.geoJSON(gj, {
      style: { color: colour, weight: 1.5, fillOpacity: kind === "polygons" ? 0 : 0.1 },
      onEachFeature: (f, lyr) => lyr.bindPopup(popup(f.properties)),
    });
    l.addTo(map);
    state.overlays.push(l);
  }
  for (const f of job.files) {
    const li = document.createElement("li");
    const a = document.createElement("a");
    a.href = f.url;
    a.textContent = f.name;
    a.download = f.name;
    li.appendChild(a);
    $("downloads").appendChild(li);
  }
}

function popup(props) {
  const keys = ["class", "label", "score", "expression", "answer", "rank", "source", "hectares", "area_m2"];
  const rows = keys.filter((k) => props[k] !== undefined && props[k] !== null)
    .map((k) => `<b>${k}</b>: ${typeof props[k] === "number" ? props[k].toFixed(3) : escapeHtml(String(props[k]))}`);
  return rows.join("<br>") || "(no attributes)";
}
function escapeHtml(s) { return s.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c])); }

$("opacity").oninput = () => {
  for (const l of state.overlays) if (l.setOpacity) l.setOpacity(parseFloat($("opacity").value));
};

// -- search: index the raster once (a job), then query it ------------------------------------------
async function runSearch(model, text) {
  let jobId = state.indexJob[state.layer.id + ":" + model];
  if (!jobId) {
    const job = await follow(await post("/jobs", { task: "index", model, layer: state.layer.id, params: {} }));
    if (!job || job.state !== "done") return;
    jobId = job.id;
    state.indexJob[state.layer.id + ":" + model] = jobId;
  }
  const res = await post("/v1/search", { index: jobId, text, k: 5 });
  $("result").hidden = false;
  const l = L.geoJSON(res.features, { style: { color: "#00ffff", weight: 2, fillOpacity: 0.05 }, onEachFeature: (f, lyr) => lyr.bindPopup(popup(f.properties)) });
  l.addTo(map);
  state.overlays.push(l);
  setStatus(`search: ${res.hits.length} hit(s) for "${text}"`);
}

// -- chat panel -----------------------------------------------------------------------------------------
async function ask(question) {
  if (!state.layer || !question) return;
  const log = $("chat-log");
  const q = document.createElement("div"); q.className = "q"; q.textContent = question; log.appendChild(q);
  const a = document.createElement("div"); a.className = "a"; a.textContent = "..."; log.appendChild(a);
  const model = $("task").value === "chat" ? $("model").value : null;
  try {
    const doc = await post("/v1/chat", { layer: state.layer.id, question, history: state.chat, model, max_tokens: 64 });
    a.textContent = doc.result.answer;
    state.chat.push([question, doc.result.answer]);
  } catch (e) { a.textContent = "error: " + e.message; a.classList.add("error"); }
  log.scrollTop = log.scrollHeight;
}
$("chat-form").onsubmit = (ev) => { ev.preventDefault(); const q = $("chat-input").value.trim(); $("chat-input").value = ""; ask(q); };

// -- start --------------------------------------------------------------------------------------------
async function init() {
  try {
    await loadModels();
    await listFiles(".");
    setStatus("open a raster to start");
  } catch (e) { setStatus(e.message, true); }
}
init();

// picie web page: segment an image, rename classes, upload image sets, run jobs.
"use strict";
const $ = (id) => document.getElementById(id);
const state = { info: null, result: null, mask: null, photo: null, colors: [], names: [] };

function apiKey() { return localStorage.getItem("picie-api-key") || ""; }
function headers(extra) {
  const h = Object.assign({}, extra || {});
  if (apiKey()) h["x-api-key"] = apiKey();
  return h;
}

function showError(message) {
  const e = $("error");
  e.textContent = message;
  e.hidden = !message;
}

// Asks for the API key (the server answered 401); resolves to true when one was entered.
function askForKey(message) {
  const dialog = $("key-dialog");
  $("key-dialog-message").textContent = message;
  $("key-dialog-input").value = "";
  return new Promise((resolve) => {
    dialog.onclose = () => {
      const key = $("key-dialog-input").value.trim();
      if (dialog.returnValue === "ok" && key) {
        localStorage.setItem("picie-api-key", key);
        $("api-key").value = key;
        resolve(true);
      } else resolve(false);
    };
    dialog.showModal();
  });
}

// Every failed call shows the server's JSON message. A 401 asks for the API key once and
// retries with it.
async function call(method, path, body, extraHeaders, retried) {
  const opts = { method, headers: headers(extraHeaders) };
  if (body !== undefined) opts.body = body;
  const r = await fetch(path, opts);
  if (r.status === 401 && !retried) {
    const why = apiKey() ? "The API key was not accepted. Enter the server's API key:" : "This server requires an API key for this action. Enter it:";
    if (await askForKey(why)) return call(method, path, body, extraHeaders, true);
  }
  if (!r.ok) {
    let msg = `${r.status} ${r.statusText}`;
    try { const j = await r.json(); if (j.error) msg = j.error.message; } catch (_) {}
    throw new Error(msg);
  }
  return r;
}
const json = (method, path, obj) => call(method, path, JSON.stringify(obj), { "content-type": "application/json" }).then((r) => r.json());

async function loadInfo() {
  state.info = await (await call("GET", "/info")).json();
  $("model-info").textContent = `model ${state.info.model} · K=${state.info.num_classes} · ${state.info.execution_provider}${state.info.trained ? "" : " · untrained"}`;
  if (state.info.default_quality) $("quality").options[0].textContent = `server default (${state.info.default_quality})`;
}

// ---- segment view

function hex(rgb) { return "#" + rgb.map((v) => v.toString(16).padStart(2, "0")).join(""); }
function rgb(hexColor) { return [1, 3, 5].map((i) => parseInt(hexColor.slice(i, i + 2), 16)); }

async function segment(file) {
  showError("");
  state.file = file;
  try {
    const quality = $("quality").value;
    const query = "format=json" + (quality ? `&quality=${quality}` : "");
    const r = await call("POST", `/segment?${query}`, file, { "content-type": file.type || "application/octet-stream" });
    const timing = `${r.headers.get("x-quality") || ""} · ${r.headers.get("x-inference-ms") || "?"} ms`;
    const result = await r.json();
    const photo = await createImageBitmap(file, { imageOrientation: "from-image" }).catch(() => null);
    const mask = await decodeMask(result.mask_png_base64, result.width, result.height);
    Object.assign(state, { result, mask, photo });
    state.colors = result.classes.map((c) => c.color);
    state.names = result.classes.map((c) => c.name);
    $("download").href = "data:image/png;base64," + result.mask_png_base64;
    $("result").hidden = false;
    draw();
    legend();
    // Last, so that a shown quality always belongs to the mask on screen.
    $("timing").textContent = timing;
  } catch (e) {
    showError(`Could not segment ${file.name || "the image"}: ${e.message}`);
  }
}

async function decodeMask(b64, w, h) {
  const img = new Image();
  img.src = "data:image/png;base64," + b64;
  await img.decode();
  const c = document.createElement("canvas");
  c.width = w; c.height = h;
  const ctx = c.getContext("2d");
  ctx.drawImage(img, 0, 0);
  const px = ctx.getImageData(0, 0, w, h).data;
  const labels = new Uint8Array(w * h);
  for (let i = 0; i < labels.length; i++) labels[i] = px[4 * i];
  return labels;
}

function draw() {
  const { result, mask, photo } = state;
  const w = result.width, h = result.height;
  for (const id of ["photo", "overlay"]) { $(id).width = w; $(id).height = h; }
  const pctx = $("photo").getContext("2d");
  if (photo) pctx.drawImage(photo, 0, 0, w, h);
  const octx = $("overlay").getContext("2d");
  const alpha = $("alpha").value / 100;
  if (photo) octx.drawImage(photo, 0, 0, w, h);
  const base = photo ? octx.getImageData(0, 0, w, h) : octx.createImageData(w, h);
  const d = base.data;
  for (let i = 0; i < mask.length; i++) {
    const c = state.colors[mask[i]] || [0, 0, 0];
    for (let k = 0; k < 3; k++) d[4 * i + k] = photo ? d[4 * i + k] * (1 - alpha) + c[k] * alpha : c[k];
    d[4 * i + 3] = 255;
  }
  octx.putImageData(base, 0, 0);
}

function legend() {
  const body = $("legend").querySelector("tbody");
  body.innerHTML = "";
  state.result.classes.forEach((c, i) => {
    const tr = document.createElement("tr");
    tr.dataset.index = i;
    tr.innerHTML = `<td><span class="swatch"></span></td><td class="name"></td><td>${(100 * c.fraction).toFixed(1)} %</td>
      <td class="rename"><input type="text" aria-label="name of class ${i}"><input type="color" aria-label="colour of class ${i}"><button>Save</button></td>`;
    tr.querySelector(".swatch").style.background = hex(state.colors[i]);
    tr.querySelector(".name").textContent = state.names[i];
    tr.querySelector("input[type=text]").value = state.names[i];
    tr.querySelector("input[type=color]").value = hex(state.colors[i]);
    tr.querySelector("button").onclick = () => rename(i, tr);
    body.appendChild(tr);
  });
}

async function rename(i, tr) {
  showError("");
  const name = tr.querySelector("input[type=text]").value;
  const color = rgb(tr.querySelector("input[type=color]").value);
  try {
    await json("PUT", `/models/${encodeURIComponent(state.info.model)}/classes`, { classes: [{ index: i, name, color }] });
    state.names[i] = name;
    state.colors[i] = color;
    tr.querySelector(".name").textContent = name;
    tr.querySelector(".swatch").style.background = hex(color);
    draw();
  } catch (e) {
    showError(`Could not rename class ${i}: ${e.message}`);
  }
}

function hover(ev) {
  if (!state.mask) return;
  const c = $("overlay");
  const r = c.getBoundingClientRect();
  const x = Math.floor((ev.clientX - r.left) * c.width / r.width);
  const y = Math.floor((ev.clientY - r.top) * c.height / r.height);
  if (x < 0 || y < 0 || x >= c.width || y >= c.height) return;
  const k = state.mask[y * c.width + x];
  $("hover").textContent = `· (${x}, ${y}): ${state.names[k]}`;
}

// ---- datasets, jobs, models

async function loadDatasets(select) {
  const list = await (await call("GET", "/datasets")).json();
  const s = $("dataset-select");
  s.innerHTML = list.map((d) => `<option value="${d.id}">${d.name.replace(/</g, "&lt;")} (${d.num_images} images)</option>`).join("") || "<option value=''>no datasets yet</option>";
  if (select) s.value = select;
}

async function loadModels() {
  const list = await (await call("GET", "/models")).json();
  const body = $("models").querySelector("tbody");
  body.innerHTML = "";
  for (const m of list) {
    const tr = document.createElement("tr");
    tr.innerHTML = `<td></td><td>${m.k}</td><td>${m.trained ? "yes" : "no"}</td><td></td>`;
    tr.cells[0].textContent = m.name + (m.active ? " (active)" : "");
    if (!m.active) {
      const b = document.createElement("button");
      b.textContent = "Activate";
      b.onclick = () => activate(m.name);
      tr.cells[3].appendChild(b);
    }
    body.appendChild(tr);
  }
}

async function activate(name) {
  showError("");
  try {
    await call("POST", `/models/${encodeURIComponent(name)}/activate`);
    await Promise.all([loadModels(), loadInfo()]);
  } catch (e) { showError(`Could not activate ${name}: ${e.message}`); }
}

async function createDataset() {
  showError("");
  try {
    const d = await json("POST", "/datasets", { name: $("dataset-name").value || "images" });
    await loadDatasets(d.id);
  } catch (e) { showError(`Could not create the dataset: ${e.message}`); }
}

async function upload() {
  showError("");
  const id = $("dataset-select").value;
  const files = $("dataset-files").files;
  if (!id) return showError("Create a dataset first.");
  if (!files.length) return showError("Pick some images first.");
  const form = new FormData();
  for (const f of files) form.append("files", f, f.name);
  try {
    const r = await (await call("POST", `/datasets/${id}/images`, form)).json();
    const rejected = r.rejected.map((x) => `${x.name} (${x.reason})`).join(", ");
    $("upload-report").textContent = `${r.added.length} added, ${r.duplicates.length} duplicates, ${r.rejected.length} rejected${rejected ? ": " + rejected : ""}. ${r.num_images} images in the set.`;
    await loadDatasets(id);
  } catch (e) { showError(`Upload failed: ${e.message}`); }
}

async function startJob() {
  showError("");
  const dataset = $("dataset-select").value;
  if (!dataset) return showError("Create a dataset and upload images first.");
  const type = $("job-type").value;
  const k = parseInt($("job-k").value, 10);
  const quality = $("job-quality").value || undefined;
  // No K: the server suggests one (k-means at each K of its default range, scored by silhouette).
  const spec = type === "recluster" ? (Number.isNaN(k) ? { type, dataset } : { type, dataset, k })
    : type === "segment" ? { type, dataset, quality }
    : { type, dataset, package_k: k, epochs: parseInt($("job-epochs").value, 10) };
  try {
    const job = await json("POST", "/jobs", spec);
    follow(job.id);
  } catch (e) { showError(`Could not start the job: ${e.message}`); }
}

function follow(id) {
  $("job-result").innerHTML = "";
  const es = new EventSource(`/jobs/${id}/events`);
  const update = (ev) => {
    const j = JSON.parse(ev.data);
    $("job-bar").style.width = `${Math.round(100 * j.progress)}%`;
    $("job-status").textContent = `${j.id}: ${j.state} · ${j.stage} · ${Math.round(100 * j.progress)} %`;
    if (["succeeded", "failed", "canceled", "interrupted"].includes(j.state)) {
      es.close();
      if (j.state === "succeeded" && j.spec.type === "segment") {
        $("job-result").textContent = `${j.result.masks} masks at quality ${j.result.quality} with model ${j.result.model}` +
          (j.result.skipped?.length ? ` (${j.result.skipped.length} unreadable images skipped)` : "") + ".";
        showGallery(j).catch((e) => showError(`Could not load the gallery: ${e.message}`));
      } else if (j.state === "succeeded") {
        const name = j.result.model;
        $("job-result").innerHTML = `<p>New model <b></b> (K=${j.result.k}). <button id="activate-new">Activate it</button></p>`;
        $("job-result").querySelector("b").textContent = name;
        if (j.result.k_scores) $("job-result").prepend(kCurve(j.result.k_scores, j.result.k));
        $("activate-new").onclick = () => activate(name);
        loadModels();
      } else if (j.error) {
        showError(`Job ${j.state}: ${j.error}`);
      }
    }
  };
  es.addEventListener("progress", update);
  es.addEventListener("end", update);
}

// The suggestion's curve: each K's distortion (mean cosine distance to the nearest centroid),
// the K picked at its knee marked.
function kCurve(scores, picked) {
  const w = 360, h = 140, pad = 28;
  const ks = scores.map((s) => s.k), vs = scores.map((s) => s.distortion);
  const [k0, k1] = [Math.min(...ks), Math.max(...ks)];
  const [v0, v1] = [Math.min(...vs), Math.max(...vs)];
  const x = (k) => pad + (w - 2 * pad) * (k - k0) / Math.max(1, k1 - k0);
  const y = (v) => h - pad - (h - 2 * pad) * (v - v0) / Math.max(1e-9, v1 - v0);
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("id", "k-curve");
  svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", `distortion by K; K=${picked} picked`);
  const el = (name, attrs, text) => {
    const e = document.createElementNS(ns, name);
    for (const [a, v] of Object.entries(attrs)) e.setAttribute(a, v);
    if (text !== undefined) e.textContent = text;
    svg.appendChild(e);
    return e;
  };
  el("polyline", { points: scores.map((s) => `${x(s.k)},${y(s.distortion)}`).join(" "), fill: "none", stroke: "#2563eb", "stroke-width": 2 });
  for (const s of scores) {
    el("circle", { cx: x(s.k), cy: y(s.distortion), r: s.k === picked ? 5 : 2.5, fill: s.k === picked ? "#dc2626" : "#2563eb", class: "k-point" })
      .appendChild(document.createElementNS(ns, "title")).textContent =
        `K=${s.k}: distortion ${s.distortion.toFixed(4)}, silhouette ${s.silhouette.toFixed(3)}`;
  }
  el("text", { x: pad, y: h - 6, "font-size": 11 }, `K ${k0}`);
  el("text", { x: w - pad, y: h - 6, "font-size": 11, "text-anchor": "end" }, `${k1}`);
  el("text", { x: pad, y: 14, "font-size": 11 }, `distortion by K (lower: tighter classes) · knee at K=${picked}`);
  return svg;
}

// The classes of a segmented set: share, crops, and the fields to name them.
async function showGallery(job) {
  const g = await (await call("GET", `/jobs/${job.id}/gallery`)).json();
  const model = job.result.model;
  $("gallery-card").hidden = false;
  $("archive").href = `/jobs/${job.id}/masks.zip`;
  $("gallery-summary").textContent = `${job.result.masks} masks · model ${model} · K=${g.classes.length}`;
  const box = $("gallery");
  box.innerHTML = "";
  for (const c of [...g.classes].sort((a, b) => b.share - a.share)) {
    const div = document.createElement("div");
    div.className = "gallery-class";
    div.dataset.class = c.class;
    div.innerHTML = `<div class="gallery-head"><span class="swatch"></span>
      <input type="text" maxlength="64"> <input type="color"> <button>Save</button>
      <span class="muted share"></span></div><div class="crops"></div>`;
    div.querySelector(".swatch").style.background = hex(c.color);
    const name = div.querySelector("input[type=text]");
    name.value = c.name;
    name.setAttribute("aria-label", `name of class ${c.class}`);
    div.querySelector("input[type=color]").value = hex(c.color);
    div.querySelector(".share").textContent = `${(100 * c.share).toFixed(1)} % of the pixels · in ${c.images} images`;
    div.querySelector("button").onclick = () => saveClass(model, c.class, div);
    const crops = div.querySelector(".crops");
    if (!c.crops.length) crops.textContent = "covers too little of any image to show";
    for (const crop of c.crops) {
      const img = document.createElement("img");
      img.src = `/jobs/${job.id}/gallery/${crop.file}`;
      img.alt = img.title = `${crop.image}: ${(100 * crop.fraction).toFixed(0)} %`;
      img.width = img.height = 120;
      crops.appendChild(img);
    }
    box.appendChild(div);
  }
}

async function saveClass(model, index, div) {
  showError("");
  const name = div.querySelector("input[type=text]").value.trim();
  const color = div.querySelector("input[type=color]").value;
  const rgb = [1, 3, 5].map((i) => parseInt(color.slice(i, i + 2), 16));
  try {
    await json("PUT", `/models/${encodeURIComponent(model)}/classes`, { classes: [{ index, name, color: rgb }] });
    div.querySelector(".swatch").style.background = color;
    div.classList.add("saved");
    if (state.info && state.info.model === model) await loadInfo();
  } catch (e) {
    showError(`Could not rename class ${index}: ${e.message}`);
  }
}

// ---- wiring

function setView(name) {
  for (const v of ["segment", "train"]) {
    $(`view-${v}`).hidden = v !== name;
    $(`tab-${v}`).classList.toggle("active", v === name);
  }
  if (name === "train") Promise.all([loadDatasets(), loadModels()]).catch((e) => showError(e.message));
}

window.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("button.tab").forEach((b) => (b.onclick = () => setView(b.dataset.view)));
  $("file").onchange = (e) => e.target.files[0] && segment(e.target.files[0]);
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); if (e.dataTransfer.files[0]) segment(e.dataTransfer.files[0]); });
  $("alpha").oninput = () => state.mask && draw();
  $("quality").onchange = () => state.file && segment(state.file);
  $("overlay").addEventListener("mousemove", hover);
  $("dataset-create").onclick = createDataset;
  $("dataset-upload").onclick = upload;
  $("job-start").onclick = startJob;
  $("job-type").onchange = () => {
    const type = $("job-type").value;
    $("epochs-label").hidden = type !== "finetune";
    $("k-label").hidden = type === "segment";
    $("job-quality-label").hidden = type !== "segment";
  };
  $("api-key").value = apiKey();
  $("api-key").onchange = (e) => localStorage.setItem("picie-api-key", e.target.value);
  loadInfo().catch((e) => showError(e.message));
});

// samvit click-to-segment page: the image is embedded once on the server (POST /v1/embeddings); every prompt change
// asks the server for masks (POST /v1/segment, one decoder pass) and draws the best one over the image.
"use strict";

const $ = (id) => document.getElementById(id);
const view = $("view");
const ctx = view.getContext("2d");
const MASK_RGBA = [30, 144, 255, 128];

const S = {
  file: null,        // the File opened
  image: null,       // HTMLImageElement
  id: null,          // embedding id (sha256 of the file)
  points: [],        // [{x, y, label}]
  box: null,         // [x0, y0, x1, y1]
  history: [],       // earlier {points, box} for undo
  mask: null,        // {png, score, area, bbox, overlay: canvas}
  version: 0,        // bumps on every prompt change
  busy: false,
  drag: null,        // {x0, y0, x, y, button, shift, moved}
  lastLatencyMs: null,
  masksDrawn: 0,
};
window.samvit = S;  // for tests and the console

function setState(state, text) {
  document.body.dataset.state = state;
  if (text !== undefined) $("status").textContent = text;
}

function authHeaders() {
  const t = sessionStorage.getItem("samvit-token");
  return t ? { Authorization: "Bearer " + t } : {};
}

async function errorText(status, body) {
  try { return `${status}: ${JSON.parse(body).detail}`; } catch (e) { return `${status}: ${body || "no answer"}`; }
}

function needToken() {
  $("token-box").hidden = false;
  setState(S.id ? "ready" : "empty", "This server needs a bearer token: enter it above, then open the image again.");
}

async function api(path, body) {
  const res = await fetch(path, {
    method: "POST", headers: Object.assign({ "Content-Type": "application/json" }, authHeaders()),
    body: JSON.stringify(body),
  });
  const text = await res.text();
  if (res.status === 401) needToken();
  if (!res.ok) { const err = new Error(await errorText(res.status, text)); err.status = res.status; throw err; }
  return JSON.parse(text);
}

// ---- opening and embedding ----

function openFile(file) {
  if (!file) return;
  const url = URL.createObjectURL(file);
  const img = new Image();
  img.onload = () => {
    Object.assign(S, { file, image: img, id: null, points: [], box: null, history: [], mask: null });
    view.width = img.naturalWidth;
    view.height = img.naturalHeight;
    redraw();
    embed();
  };
  img.onerror = () => setState("empty", `${file.name}: the browser cannot show this file as an image`);
  img.src = url;
}

async function healthEstimate() {
  try {
    const h = await (await fetch("/healthz")).json();
    return (h.encoder_seconds_per_image || 1) * (h.queued_images + 1);
  } catch (e) { return 1; }
}

function embed() {
  const form = new FormData();
  form.append("image", S.file, S.file.name);
  const xhr = new XMLHttpRequest();
  const bar = $("bar");
  $("progress").hidden = false;
  bar.style.width = "0%";
  setState("encoding", `Uploading ${S.file.name}...`);
  let timer = null;
  let done = false;
  const started = performance.now();
  xhr.upload.onprogress = (e) => { if (e.lengthComputable) bar.style.width = (20 * e.loaded / e.total) + "%"; };
  xhr.upload.onload = async () => {
    const estimate = await healthEstimate();  // seconds: the server's recent encoder time x images ahead
    if (done) return;  // answered already (a cached image): no progress to show
    const t0 = performance.now();
    timer = setInterval(() => {
      const s = (performance.now() - t0) / 1000;
      bar.style.width = (20 + 75 * Math.min(1, s / estimate)) + "%";
      setState("encoding", `Encoding ${S.file.name}: ${s.toFixed(1)} s (about ${estimate.toFixed(1)} s expected)`);
    }, 200);
  };
  xhr.onloadend = async () => {
    done = true;
    clearInterval(timer);
    $("progress").hidden = true;
    if (xhr.status === 200) {
      const info = JSON.parse(xhr.responseText);
      S.id = info.id;
      const secs = ((performance.now() - started) / 1000).toFixed(2);
      setState("ready", `${S.file.name}: ${info.original_size[1]}x${info.original_size[0]}, embedded in ${secs} s` +
        `${info.cached ? " (cached)" : ""}. Left click = object, right/shift click = background, drag = box.`);
      updateButtons();
      if (S.points.length || S.box) segment();
    } else {
      if (xhr.status === 401) { needToken(); return; }
      setState("empty", "Embedding failed: " + await errorText(xhr.status || "network error", xhr.responseText));
    }
  };
  xhr.open("POST", "/v1/embeddings");
  for (const [k, v] of Object.entries(authHeaders())) xhr.setRequestHeader(k, v);
  xhr.send(form);
}

// ---- prompts ----

function prompts() {
  const body = { image_id: S.id, multimask: S.points.length === 1 && !S.box, return_low_res: false };
  if (S.points.length) {
    body.points = S.points.map((p) => [p.x, p.y]);
    body.labels = S.points.map((p) => p.label);
  }
  if (S.box) body.box = S.box;
  return body;
}

function change(fn) {
  S.history.push({ points: S.points.slice(), box: S.box });
  fn();
  S.version += 1;
  updateButtons();
  redraw();
  segment();
}

async function segment() {
  if (!S.id || S.busy) return;
  if (!S.points.length && !S.box) { S.mask = null; redraw(); updateButtons(); return; }
  S.busy = true;
  const version = S.version;
  const t0 = performance.now();
  setState("segmenting");
  try {
    const res = await api("/v1/segment", Object.assign(prompts(), { format: "png" }));
    const best = res.masks[res.best];
    const overlay = await colourMask(best.png);
    if (version === S.version) {
      S.mask = Object.assign({ overlay }, best);
      redraw();
      S.masksDrawn += 1;
      S.lastLatencyMs = performance.now() - t0;
      $("latency").textContent = `click to mask ${S.lastLatencyMs.toFixed(0)} ms (decoder ${res.decoder_ms.toFixed(0)} ms` +
        ` on the server); score ${best.score.toFixed(3)}, area ${best.area} px`;
    }
    setState("ready");
  } catch (e) {
    if (e.status === 404) { S.id = null; embed(); }  // evicted from the server's cache: embed again, then retry
    else setState("ready", "Segmenting failed: " + e.message);
  } finally {
    S.busy = false;
    updateButtons();
  }
  if (version !== S.version) segment();  // prompts changed meanwhile: the latest wins
}

function colourMask(pngBase64) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => {
      const c = document.createElement("canvas");
      c.width = img.naturalWidth;
      c.height = img.naturalHeight;
      const g = c.getContext("2d");
      g.drawImage(img, 0, 0);
      const data = g.getImageData(0, 0, c.width, c.height);
      const px = data.data;
      for (let i = 0; i < px.length; i += 4) {
        const on = px[i] > 127;
        px[i] = MASK_RGBA[0]; px[i + 1] = MASK_RGBA[1]; px[i + 2] = MASK_RGBA[2]; px[i + 3] = on ? MASK_RGBA[3] : 0;
      }
      g.putImageData(data, 0, 0);
      resolve(c);
    };
    img.onerror = () => reject(new Error("the server's mask PNG could not be decoded"));
    img.src = "data:image/png;base64," + pngBase64;
  });
}

// ---- drawing ----

function redraw() {
  if (!S.image) return;
  ctx.clearRect(0, 0, view.width, view.height);
  ctx.drawImage(S.image, 0, 0);
  if (S.mask) ctx.drawImage(S.mask.overlay, 0, 0);
  const r = Math.max(3, Math.round(Math.max(view.width, view.height) / 150));
  ctx.lineWidth = Math.max(1, r / 2);
  if (S.box || S.drag?.moved) {
    const b = S.drag?.moved ? dragBox() : S.box;
    ctx.strokeStyle = "#ffc800";
    ctx.strokeRect(b[0], b[1], b[2] - b[0], b[3] - b[1]);
  }
  for (const p of S.points) {
    ctx.beginPath();
    ctx.arc(p.x, p.y, r, 0, 2 * Math.PI);
    ctx.fillStyle = p.label === 1 ? "#00c800" : "#dc0000";
    ctx.fill();
    ctx.strokeStyle = "#fff";
    ctx.stroke();
  }
}

function updateButtons() {
  $("undo").disabled = !S.history.length;
  $("clear").disabled = !S.points.length && !S.box;
  $("export-png").disabled = !S.mask;
  $("export-coco").disabled = !S.mask;
}

// ---- mouse ----

function imageXY(e) {
  const r = view.getBoundingClientRect();
  const x = (e.clientX - r.left) * view.width / r.width;
  const y = (e.clientY - r.top) * view.height / r.height;
  return [Math.min(view.width, Math.max(0, x)), Math.min(view.height, Math.max(0, y))];
}

function dragBox() {
  const d = S.drag;
  return [Math.min(d.x0, d.x), Math.min(d.y0, d.y), Math.max(d.x0, d.x), Math.max(d.y0, d.y)];
}

view.addEventListener("contextmenu", (e) => e.preventDefault());
view.addEventListener("mousedown", (e) => {
  if (!S.image) return;
  const [x, y] = imageXY(e);
  S.drag = { x0: x, y0: y, x, y, button: e.button, shift: e.shiftKey, moved: false };
});
view.addEventListener("mousemove", (e) => {
  if (!S.drag || S.drag.button !== 0) return;
  const [x, y] = imageXY(e);
  const r = view.getBoundingClientRect();
  const screenDist = Math.hypot(x - S.drag.x0, y - S.drag.y0) * r.width / view.width;
  Object.assign(S.drag, { x, y, moved: S.drag.moved || screenDist > 5 });
  if (S.drag.moved) redraw();
});
window.addEventListener("mouseup", (e) => {
  const d = S.drag;
  if (!d) return;
  S.drag = null;
  if (d.moved) {
    const b = [Math.min(d.x0, d.x), Math.min(d.y0, d.y), Math.max(d.x0, d.x), Math.max(d.y0, d.y)];
    change(() => { S.box = b.map((v) => Math.round(v)); });
  } else if (e.target === view) {
    const label = d.button === 2 || d.shift ? 0 : 1;
    change(() => { S.points = S.points.concat([{ x: Math.round(d.x0), y: Math.round(d.y0), label }]); });
  }
});

// ---- buttons, keys, drop ----

function undo() {
  if (!S.history.length) return;
  const prev = S.history.pop();
  S.points = prev.points;
  S.box = prev.box;
  S.version += 1;
  updateButtons();
  redraw();
  segment();
}

function clearAll() {
  if (!S.points.length && !S.box) return;
  change(() => { S.points = []; S.box = null; });
}

function download(name, blob) {
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = name;
  a.click();
  setTimeout(() => URL.revokeObjectURL(a.href), 1000);
}

function stem() { return S.file.name.replace(/\.[^.]*$/, ""); }

function exportPng() {
  const bytes = Uint8Array.from(atob(S.mask.png), (c) => c.charCodeAt(0));
  download(stem() + "_mask.png", new Blob([bytes], { type: "image/png" }));
}

async function exportCoco() {
  try {
    const res = await api("/v1/segment", Object.assign(prompts(), { format: "rle" }));
    const m = res.masks[res.best];
    const [h, w] = res.original_size;
    const coco = {
      images: [{ id: 1, file_name: S.file.name, width: w, height: h }],
      categories: [{ id: 1, name: "object" }],
      annotations: [{ id: 1, image_id: 1, category_id: 1, segmentation: m.rle, area: m.area, bbox: m.bbox,
                      iscrowd: 0, score: m.score }],
    };
    download(stem() + "_coco.json", new Blob([JSON.stringify(coco)], { type: "application/json" }));
  } catch (e) { setState("ready", "Export failed: " + e.message); }
}

$("file").addEventListener("change", (e) => openFile(e.target.files[0]));
$("undo").addEventListener("click", undo);
$("clear").addEventListener("click", clearAll);
$("export-png").addEventListener("click", exportPng);
$("export-coco").addEventListener("click", exportCoco);
$("token-save").addEventListener("click", () => {
  sessionStorage.setItem("samvit-token", $("token").value);
  $("token-box").hidden = true;
  if (S.file) embed();
});
window.addEventListener("keydown", (e) => {
  if ((e.ctrlKey || e.metaKey) && e.key === "z") { e.preventDefault(); undo(); }
  if (e.key === "Escape") clearAll();
});
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  openFile(e.dataTransfer.files[0]);
});

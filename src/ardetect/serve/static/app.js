// The attribution page: choose an image, draw the box, send POST /attribute, show the ranked training images.
"use strict";

const $ = (id) => document.getElementById(id);
const canvas = $("canvas");
const ctx = canvas.getContext("2d");
const state = { blob: null, name: null, image: null, scale: 1, box: null, drag: null, truth: null, upload: null };

function showError(text) {
  const el = $("error");
  el.textContent = text;
  el.hidden = !text;
}

async function getJSON(url) {
  const r = await fetch(url);
  if (!r.ok) throw new Error(`${url}: ${r.status} ${(await r.text()).slice(0, 200)}`);
  return r.json();
}

function draw() {
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  if (!state.image) return;
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(state.image, 0, 0, canvas.width, canvas.height);
  const b = state.drag || state.box;
  if (b) {
    ctx.strokeStyle = "#1f6feb";
    ctx.lineWidth = 3;
    const [x0, y0, x1, y1] = b.map((v) => v * state.scale);
    ctx.strokeRect(x0, y0, x1 - x0, y1 - y0);
  }
}

function ready() {
  $("submit").disabled = !(state.blob && $("box").value.trim() && $("prompt").value.trim() && $("phrase").value.trim());
}

function setBox(box) {
  state.box = box;
  $("box").value = box ? box.map((v) => Math.round(v)).join(",") : "";
  draw();
  ready();
}

async function useImage(blob, name) {
  const bitmap = await createImageBitmap(blob, { imageOrientation: "from-image" });
  state.blob = blob;
  state.name = name;
  state.image = bitmap;
  state.scale = 480 / Math.max(bitmap.width, bitmap.height);
  canvas.width = Math.round(bitmap.width * state.scale);
  canvas.height = Math.round(bitmap.height * state.scale);
  $("hint").textContent = `${name}: ${bitmap.width} x ${bitmap.height} pixels. Drag on the image to draw the box.`;
  setBox(null);
}

function pointer(ev) {
  const r = canvas.getBoundingClientRect();
  const sx = canvas.width / r.width, sy = canvas.height / r.height;
  const x = Math.min(Math.max((ev.clientX - r.left) * sx, 0), canvas.width) / state.scale;
  const y = Math.min(Math.max((ev.clientY - r.top) * sy, 0), canvas.height) / state.scale;
  return [x, y];
}

canvas.addEventListener("mousedown", (ev) => {
  if (!state.image) return;
  const [x, y] = pointer(ev);
  state.start = [x, y];
  state.drag = [x, y, x, y];
});
window.addEventListener("mousemove", (ev) => {
  if (!state.drag) return;
  const [x, y] = pointer(ev);
  const [sx, sy] = state.start;
  state.drag = [Math.min(sx, x), Math.min(sy, y), Math.max(sx, x), Math.max(sy, y)];
  draw();
});
window.addEventListener("mouseup", () => {
  if (!state.drag) return;
  const b = state.drag;
  state.drag = null;
  setBox(b[2] - b[0] >= 1 && b[3] - b[1] >= 1 ? b : state.box);
});

$("file").addEventListener("change", async () => {
  const f = $("file").files[0];
  if (!f) return;
  showError("");
  $("example").value = "";
  // an upload of one of the pipeline's generated images (by file name): its true training image is known
  state.upload = f.name;  // looked up again once the examples arrive, for an upload made before they did
  const known = examples.find((ex) => ex.file === f.name);
  state.truth = known ? known.train_id : null;
  try {
    await useImage(f, f.name);
  } catch (e) {
    showError(`image: the browser cannot read ${f.name} (${e.message})`);
  }
});

$("box").addEventListener("change", () => {
  const parts = $("box").value.split(/[ ,]+/).map(Number);
  if (parts.length === 4 && parts.every(Number.isFinite)) { state.box = parts; draw(); }
  ready();
});
for (const id of ["prompt", "phrase", "box"]) $(id).addEventListener("input", ready);

let examples = [];
$("example").addEventListener("change", async () => {
  const n = $("example").value;
  if (n === "") return;
  const ex = examples[Number(n)];
  showError("");
  const r = await fetch(`/examples/${ex.n}/image`);
  if (!r.ok) { showError(`example ${ex.n}: ${r.status}`); return; }
  await useImage(await r.blob(), ex.tuple_id);
  state.upload = null;
  $("prompt").value = ex.prompt;
  $("phrase").value = ex.concept_phrase;
  state.truth = ex.train_id;
  setBox(ex.query_box);
});

function card(r, truth) {
  const div = document.createElement("div");
  div.className = "result" + (r.id === truth ? " is-truth" : "");
  div.dataset.id = r.id;
  div.dataset.box = r.box.join(",");
  const thumb = document.createElement("div");
  thumb.className = "thumb";
  const img = document.createElement("img");
  img.src = `/images/${encodeURI(r.id)}`;
  img.alt = r.id;
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("viewBox", `0 0 ${r.width} ${r.height}`);
  svg.setAttribute("preserveAspectRatio", "none");
  const rect = (b, cls) => {
    const el = document.createElementNS("http://www.w3.org/2000/svg", "rect");
    el.setAttribute("class", cls);
    el.setAttribute("x", b[0]); el.setAttribute("y", b[1]);
    el.setAttribute("width", b[2] - b[0]); el.setAttribute("height", b[3] - b[1]);
    svg.appendChild(el);
  };
  rect(r.box, "pred");
  if (r.id === truth && r.concept_box) rect(r.concept_box, "truth");
  thumb.append(img, svg);
  const cap = document.createElement("div");
  cap.innerHTML = `<b>#${r.rank}</b> <span class="id"></span> <span class="score">${r.score.toFixed(4)}</span>` +
    (r.id === truth ? ' <b class="truth-label">ground truth</b>' : "");
  cap.querySelector(".id").textContent = r.id;
  div.append(thumb, cap);
  return div;
}

$("form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  showError("");
  const body = new FormData();
  body.append("image", state.blob, state.name || "image.png");
  for (const f of ["box", "prompt", "phrase", "top_k", "shortlist"]) {
    const v = $(f).value.trim();
    if (v !== "") body.append(f, v);
  }
  $("submit").disabled = true;
  $("status").textContent = "scoring…";
  try {
    const r = await fetch("/attribute", { method: "POST", body });
    const data = await r.json().catch(() => ({ detail: `${r.status} ${r.statusText}` }));
    if (!r.ok) {
      const wait = r.headers.get("Retry-After");
      showError(`${r.status}: ${typeof data.detail === "string" ? data.detail : JSON.stringify(data.detail)}` +
        (wait ? ` (retry in ${wait} s)` : ""));
      $("status").textContent = "";
      return;
    }
    const res = $("results");
    res.replaceChildren(...data.results.map((x) => card(x, state.truth)));
    const where = state.truth ? (data.results.some((x) => x.id === state.truth)
      ? `; the true training image ${state.truth} is #${data.results.find((x) => x.id === state.truth).rank}`
      : `; the true training image ${state.truth} is not in the top ${data.results.length}`) : "";
    const scope = data.shortlist ? `a shortlist of ${data.shortlist}` : `${data.scored} candidates`;
    $("status").textContent = `${data.results.length} results from ${scope} in ${Math.round(data.timing_ms.request)} ms${where}`;
  } catch (e) {
    showError(`request failed: ${e.message}`);
  } finally {
    ready();
  }
});

(async () => {
  try {
    const m = await getJSON("/model");
    const name = m.name ? `${m.name} v${m.version}${m.alias ? " @" + m.alias : ""}` : m.source;
    const prov = [...new Set(Object.values(m.providers))].join(", ");
    $("model").textContent = `model ${name} on ${prov}; index of ${m.index_size} training images; shortlist ${m.shortlist}`;
    examples = await getJSON("/examples");
    for (const ex of examples) {
      const o = document.createElement("option");
      o.value = String(examples.indexOf(ex));
      o.textContent = `${ex.tuple_id} (${ex.split}): ${ex.prompt}`;
      $("example").appendChild(o);
    }
    if (!examples.length) $("example").disabled = true;
    const known = state.upload && !state.truth && examples.find((ex) => ex.file === state.upload);
    if (known) state.truth = known.train_id;
  } catch (e) {
    showError(`the service did not answer: ${e.message}`);
  }
})();

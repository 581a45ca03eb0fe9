// The attribution page: choose an image, draw the box, send POST /attribute, show the ranked training images.
"use strict";

const $ = (id) => document.getElementById(id);
const canvas = $("canvas");
const ctx = canvas.getContext("2d");
// box and drag are in the image's own pixels; the canvas shows the image scaled by sx, sy (per axis: the canvas's size
// is rounded). generation counts the images shown, so that an answer to an earlier image is dropped; busy: a request out
const state = { blob: null, name: null, image: null, sx: 1, sy: 1, box: null, drag: null, truth: null, upload: null,
  generation: 0, busy: false };

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
    const [x0, y0, x1, y1] = [b[0] * state.sx, b[1] * state.sy, b[2] * state.sx, b[3] * state.sy];
    ctx.strokeRect(x0, y0, x1 - x0, y1 - y0);
  }
}

function ready() {
  $("submit").disabled = state.busy || !(state.blob && state.box && $("prompt").value.trim() && $("phrase").value.trim());
}

function setBox(box) {
  state.box = box && box.map((v) => Math.round(v));  // whole pixels, as the field shows them and the request sends them
  $("box").value = state.box ? state.box.join(",") : "";
  draw();
  ready();
}

async function useImage(blob, name) {
  const bitmap = await createImageBitmap(blob, { imageOrientation: "from-image" });
  state.blob = blob;
  state.name = name;
  state.image = bitmap;
  state.generation += 1;
  const scale = 480 / Math.max(bitmap.width, bitmap.height);
  canvas.width = Math.max(1, Math.round(bitmap.width * scale));
  canvas.height = Math.max(1, Math.round(bitmap.height * scale));
  state.sx = canvas.width / bitmap.width;
  state.sy = canvas.height / bitmap.height;
  $("hint").textContent = `${name}: ${bitmap.width} x ${bitmap.height} pixels. Drag on the image to draw the box, or ` +
    "Tab to the image and press Enter, then arrows move the box and Shift+arrows resize it.";
  setBox(null);
}

function pointer(ev) {
  // the image's pixel under the pointer, inside the image: the canvas's content box (inside its border) shows it whole
  const r = canvas.getBoundingClientRect();
  const { width, height } = state.image;
  const x = (ev.clientX - r.left - canvas.clientLeft) / canvas.clientWidth * width;
  const y = (ev.clientY - r.top - canvas.clientTop) / canvas.clientHeight * height;
  return [Math.min(Math.max(x, 0), width), Math.min(Math.max(y, 0), height)];
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

// the box from the keyboard, on the focused image (Tab to it): Enter or an arrow with no box puts one in the middle;
// arrows move the box, Shift+arrows move its right or bottom edge (resize), Escape or Delete takes it off. A step is
// 1/50 of the image's side (at least a pixel); Ctrl with an arrow steps a single pixel. The box stays inside
// the image and keeps at least a pixel a side.
function keyBox(key, shift, fine) {
  const { width, height } = state.image;
  if (key === "Escape" || key === "Delete" || key === "Backspace") return null;
  if (!state.box) {
    const [w, h] = [Math.max(1, Math.round(width / 2)), Math.max(1, Math.round(height / 2))];
    const [x0, y0] = [Math.round((width - w) / 2), Math.round((height - h) / 2)];
    return [x0, y0, x0 + w, y0 + h];
  }
  if (key === "Enter" || key === " ") return state.box;
  const dir = { ArrowLeft: [-1, 0], ArrowRight: [1, 0], ArrowUp: [0, -1], ArrowDown: [0, 1] }[key];
  const [sx, sy] = fine ? [1, 1] : [Math.max(1, Math.round(width / 50)), Math.max(1, Math.round(height / 50))];
  let [x0, y0, x1, y1] = state.box;
  x0 = Math.min(Math.max(x0, 0), width - 1);  // a typed box that reaches past the image is first brought inside it
  y0 = Math.min(Math.max(y0, 0), height - 1);
  x1 = Math.min(Math.max(x1, x0 + 1), width);
  y1 = Math.min(Math.max(y1, y0 + 1), height);
  if (shift) {  // the right or bottom edge, never past the image nor onto the opposite edge
    x1 = Math.min(width, Math.max(x0 + 1, x1 + dir[0] * sx));
    y1 = Math.min(height, Math.max(y0 + 1, y1 + dir[1] * sy));
  } else {  // the whole box, stopped at the image's sides
    const dx = Math.min(width - x1, Math.max(-x0, dir[0] * sx)), dy = Math.min(height - y1, Math.max(-y0, dir[1] * sy));
    [x0, y0, x1, y1] = [x0 + dx, y0 + dy, x1 + dx, y1 + dy];
  }
  return [x0, y0, x1, y1];
}
const BOX_KEYS = new Set(["ArrowLeft", "ArrowRight", "ArrowUp", "ArrowDown", "Enter", " ", "Escape", "Delete", "Backspace"]);
canvas.addEventListener("keydown", (ev) => {
  if (!state.image || !BOX_KEYS.has(ev.key) || ev.metaKey || ev.altKey) return;  // Alt+arrows stay the browser's (back, forward)
  ev.preventDefault();  // arrows would scroll the page, Space too
  if (state.drag) return;
  setBox(keyBox(ev.key, ev.shiftKey, ev.ctrlKey));
  if (state.box) $("hint").textContent = `box ${state.box.join(",")}: arrows move it, Shift+arrows resize it, Escape removes it.`;
});

// an upload of one of the pipeline's generated images (its file name, and then its bytes, are an example's): its
// true training image is known. A file that only shares the name gets none.
async function truthOf(file) {
  const ex = examples.find((e) => e.file === file.name);
  if (!ex) return null;
  const r = await fetch(`/examples/${ex.n}/image`).catch(() => null);
  if (!r || !r.ok) return null;
  const [a, b] = (await Promise.all([file.arrayBuffer(), r.arrayBuffer()])).map((x) => new Uint8Array(x));
  return a.length === b.length && a.every((v, i) => v === b[i]) ? ex.train_id : null;
}

$("file").addEventListener("change", async () => {
  const f = $("file").files[0];
  if (!f) return;
  showError("");
  try {
    await useImage(f, f.name);  // a file the browser cannot read leaves the image, box and example shown before
  } catch (e) {
    showError(`image: the browser cannot read ${f.name} (${e.message})`);
    return;
  }
  $("example").value = "";
  state.upload = f;  // looked up again once the examples arrive, for an upload made before they did
  state.truth = null;
  const generation = state.generation;
  const truth = await truthOf(f);
  if (generation === state.generation) state.truth = truth;
});

// a typed box: four numbers in any corner order, put in order; anything else is no box (and Submit stays off)
function typedBox() {
  const text = $("box").value.trim();
  if (!text) return { box: null };
  const parts = text.split(/[ ,]+/).map(Number);
  if (parts.length !== 4 || !parts.every(Number.isFinite)) return { box: null, error: `box: ${JSON.stringify(text.slice(0, 60))} is not four numbers x0,y0,x1,y1` };
  const box = [Math.min(parts[0], parts[2]), Math.min(parts[1], parts[3]), Math.max(parts[0], parts[2]), Math.max(parts[1], parts[3])];
  if (box[2] - box[0] <= 0 || box[3] - box[1] <= 0) return { box: null, error: `box: ${text} has no area` };
  return { box };
}
$("box").addEventListener("input", () => { state.box = typedBox().box; draw(); ready(); });
$("box").addEventListener("change", () => {
  const { box, error } = typedBox();
  showError(error || "");
  if (box) $("box").value = box.join(",");
});
for (const id of ["prompt", "phrase"]) $(id).addEventListener("input", ready);

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
  img.onerror = () => { div.classList.add("missing"); cap.querySelector(".id").textContent = `${r.id} (image not available)`; };
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
  if (state.busy || !state.box) return;
  showError("");
  const body = new FormData();
  body.append("image", state.blob, state.name || "image.png");
  body.append("box", state.box.join(","));
  for (const f of ["prompt", "phrase", "top_k", "shortlist"]) {
    const v = $(f).value.trim();
    if (v !== "") body.append(f, v);
  }
  // the answer belongs to this image and its truth; the previous answer is taken off the page meanwhile
  const generation = state.generation, truth = state.truth;
  state.busy = true;
  ready();
  $("results").replaceChildren();
  $("status").textContent = "scoring…";
  try {
    const r = await fetch("/attribute", { method: "POST", body });
    const data = await r.json().catch(() => ({ detail: `${r.status} ${r.statusText}` }));
    if (generation !== state.generation) { $("status").textContent = ""; return; }  // another image was chosen since
    if (!r.ok) {
      const wait = r.headers.get("Retry-After");
      showError(`${r.status}: ${typeof data.detail === "string" ? data.detail : JSON.stringify(data.detail)}` +
        (wait ? ` (retry in ${wait} s)` : ""));
      $("status").textContent = "";
      return;
    }
    if (!Array.isArray(data.results)) throw new Error("the service's answer holds no results");
    $("results").replaceChildren(...data.results.map((x) => card(x, truth)));
    const found = data.results.find((x) => x.id === truth);
    const where = truth ? (found ? `; the true training image ${truth} is #${found.rank}`
      : `; the true training image ${truth} is not in the top ${data.results.length}`) : "";
    const scope = data.shortlist ? `a shortlist of ${data.shortlist}` : `${data.scored} candidates`;
    const ms = data.timing_ms ? ` in ${Math.round(data.timing_ms.request)} ms` : "";
    $("status").textContent = `${data.results.length} results from ${scope}${ms}${where}`;
  } catch (e) {
    $("status").textContent = "";
    showError(`request failed: ${e.message}`);
  } finally {
    state.busy = false;
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
    if (state.upload && !state.truth) {
      const generation = state.generation, truth = await truthOf(state.upload);
      if (generation === state.generation) state.truth = truth;
    }
  } catch (e) {
    showError(`the service did not answer: ${e.message}`);
  }
})();

// The demo page: pick or drop a photo, POST it to /v1/models/{name}/predict, draw the top-k bars.
"use strict";
const $ = (id) => document.getElementById(id);
let models = [];

function showError(msg) {
  $("error").textContent = msg;
  $("error").hidden = !msg;
}

async function loadModels() {
  const r = await fetch("/v1/models");
  const body = await r.json();
  if (!r.ok) throw new Error(body.detail || r.statusText);
  models = body.models;
  $("model").innerHTML = "";
  for (const m of models) {
    const o = document.createElement("option");
    o.value = m.name;
    o.textContent = m.name + (m.default ? " (default)" : "");
    o.selected = m.default;
    $("model").appendChild(o);
  }
  showVersion();
  if (!models.length) showError("No model is loaded yet; reload the page in a moment.");
}

function showVersion() {
  const m = models.find((x) => x.name === $("model").value);
  $("version").textContent = m ? `version ${m.version} · ${m.variant}` : "";
}

function render(p) {
  $("label").textContent = p.label === "not_food" ? "not food" : p.label;
  // not food: the percentage is the best food guess's, kept below as top-k; a cascade says which stage answered
  const stage = p.stage > 1 ? ` · stage ${p.stage}` : "";
  $("confidence").textContent = p.label === "not_food" ? "(no food recognised)" + stage
    : (100 * p.confidence).toFixed(1) + "%" + stage;
  const list = $("topk");
  list.innerHTML = "";
  for (const t of p.top_k) {
    const li = document.createElement("li");
    const name = document.createElement("span");
    name.textContent = t.label;
    const bar = document.createElement("div");
    bar.className = "bar";
    const fill = document.createElement("span");
    fill.style.width = (100 * t.probability).toFixed(1) + "%";
    bar.appendChild(fill);
    const pct = document.createElement("span");
    pct.textContent = (100 * t.probability).toFixed(1) + "%";
    li.append(name, bar, pct);
    list.appendChild(li);
  }
  const m = models.find((x) => x.name === p.model);
  const variant = m ? ` (${m.variant})` : "";
  $("timing").textContent = `${p.model} ${p.model_version}${variant} · ${p.timing.total_ms.toFixed(1)} ms on the server`;
  $("result").hidden = false;
}

async function classify(file) {
  if (!file) return;
  showError("");
  $("preview").src = URL.createObjectURL(file);
  $("preview").hidden = false;
  $("result").hidden = true;
  document.body.dataset.state = "busy";
  const form = new FormData();
  form.append("file", file, file.name);
  try {
    const name = encodeURIComponent($("model").value);
    const r = await fetch(`/v1/models/${name}/predict`, { method: "POST", body: form });
    const body = await r.json();
    if (!r.ok) throw new Error(`${body.error}: ${body.detail}`);
    render(body);
  } catch (e) {
    showError(e.message);
  } finally {
    document.body.dataset.state = "done";
  }
}

$("file").addEventListener("change", (e) => classify(e.target.files[0]));
$("model").addEventListener("change", showVersion);
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  classify(e.dataTransfer.files[0]);
});
loadModels().catch((e) => showError("Could not list models: " + e.message));

// The labelling page: one kept photo at a time; keys 1-9 choose a label, n not food, s skip, u undo, c new class.
"use strict";
const $ = (id) => document.getElementById(id);
let state = null;
let choices = [];  // the labels behind keys 1..9, then the rest
let pendingNew = null;  // a typed name that is not a label yet: Enter again adds it
let busy = false;

function showError(msg) {
  $("error").textContent = msg;
  $("error").hidden = !msg;
}

function render(s) {
  state = s;
  const p = s.progress;
  $("progress").textContent = `${p.labelled_here} labelled here · photo ${Math.min(p.position + 1, p.queue)} of ` +
    `${p.queue} in the queue · ${p.labelled} labelled in all, ${p.kept} kept`;
  $("data").textContent = s.data;
  $("notice").textContent = s.notice || "";
  const probs = $("problems");
  probs.innerHTML = "";
  for (const msg of s.problems) {
    const li = document.createElement("li");
    li.textContent = msg;
    probs.appendChild(li);
  }
  probs.hidden = !s.problems.length;
  $("known").innerHTML = "";
  for (const l of s.labels) {
    const o = document.createElement("option");
    o.value = l;
    $("known").appendChild(o);
  }
  const item = s.item;
  $("card").hidden = !item;
  $("done").hidden = !!item;
  if (!item) return;
  if ($("photo").dataset.sha !== item.sha256) {
    $("photo").src = `/photo/${item.sha256}`;
    $("photo").dataset.sha = item.sha256;
  }
  const a = item.answer || {};
  const said = a.reason === "not_food" ? "not food" : a.label;
  const dups = item.near_duplicates ? ` · stands for ${item.near_duplicates} near-duplicate(s)` : "";
  $("said").textContent = `${item.model || "model"} ${item.model_version || ""} said ${said}` +
    (a.confidence !== undefined ? ` (${(100 * a.confidence).toFixed(1)}%)` : "") + ` · kept: ${item.why}${dups}`;
  const top = item.top.map((t) => t[0]);
  choices = top.concat(s.labels.filter((l) => !top.includes(l)));
  const list = $("choices");
  list.innerHTML = "";
  choices.forEach((label, i) => {
    const li = document.createElement("li");
    const b = document.createElement("button");
    b.type = "button";
    b.dataset.label = label;
    if (i < top.length) {
      b.className = "top";
      b.textContent = `${label} ${(100 * item.top[i][1]).toFixed(0)}%`;
    } else {
      b.textContent = label;
    }
    if (i < 9) b.prepend(Object.assign(document.createElement("kbd"), { textContent: String(i + 1) }), " ");
    b.addEventListener("click", () => send("/api/label", { sha256: item.sha256, label }));
    li.appendChild(b);
    list.appendChild(li);
  });
}

async function send(path, body) {
  if (busy) return;
  busy = true;
  showError("");
  try {
    const r = await fetch(path, {
      method: body === undefined ? "GET" : "POST",
      headers: { "Content-Type": "application/json" },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const out = await r.json();
    if (out.item !== undefined) render(out);
    if (!r.ok) showError(`${out.error}: ${out.detail}`);
  } catch (e) {
    showError("The label page is not answering: " + e.message);
  } finally {
    busy = false;
    document.body.dataset.state = "ready";
  }
}

document.addEventListener("keydown", (e) => {
  if (e.target === $("newname")) {
    if (e.key === "Escape") { $("newname").blur(); pendingNew = null; }
    return;
  }
  if (e.ctrlKey || e.metaKey || e.altKey || !state) return;
  const item = state.item;
  if (e.key === "u") return send("/api/undo", {});
  if (!item) return;
  if (e.key >= "1" && e.key <= "9") {
    const label = choices[Number(e.key) - 1];
    if (label !== undefined) send("/api/label", { sha256: item.sha256, label });
  } else if (e.key === "n") {
    send("/api/label", { sha256: item.sha256, label: "not_food" });
  } else if (e.key === "s") {
    send("/api/skip", { sha256: item.sha256 });
  } else if (e.key === "c") {
    e.preventDefault();
    $("newname").focus();
  }
});

$("newclass").addEventListener("submit", async (e) => {
  e.preventDefault();
  const name = $("newname").value.trim();
  if (!name || !state || !state.item) return;
  const known = name === "not_food" || state.labels.includes(name);
  if (!known && pendingNew !== name) {
    pendingNew = name;
    showError(`"${name}" is not a label yet: press Enter again to add it as a new class.`);
    return;
  }
  pendingNew = null;
  $("newname").value = "";
  $("newname").blur();
  await send("/api/label", { sha256: state.item.sha256, label: name, new: !known });
});

send("/api/state");

// Upload page: post the chosen photo to /predict and show the make and the top five answers;
// list the models it knows (from /metadata), searchable. A photo turned away (accepted false, at
// neither model nor make level) leads with the refusal: no make headline, and the closest models
// follow dimmed, so that nothing reads as an answer.
// Labels and messages are set with textContent only, never as HTML.
"use strict";

const drop = document.getElementById("drop");
const input = document.getElementById("file");
const preview = document.getElementById("preview");
const statusLine = document.getElementById("status");
const results = document.getElementById("results");
const modelLine = document.getElementById("model");
const makeLine = document.getElementById("make");
const filter = document.getElementById("filter");
const knownList = document.getElementById("known-list");
const knownCount = document.getElementById("known-count");

// kind: "error" (nothing to show), "unsure" (answers shown, none of them sure), "make" (only
// the make is sure), or "".
function showStatus(text, kind) {
  statusLine.textContent = text;
  statusLine.className = kind;
}

function percent(probability) {
  return (probability * 100).toFixed(1) + " %";
}

// Turned away: judged, and not accepted at model or make level. An answer that was not judged
// (an export without thresholds: accepted null) is shown as before.
function turnedAway(body) {
  return body.accepted === false && body.accepted_level !== "make" && body.accepted_level !== "model";
}

function showPredictions(body) {
  results.replaceChildren();
  const refused = turnedAway(body);
  makeLine.textContent = body.make && !refused ?
    "Make: " + body.make.label + " (" + percent(body.make.probability) + ")" : "";
  results.classList.toggle("dimmed", refused);
  results.setAttribute("aria-label", refused ? "Closest models, none of them an answer" : "Answers");
  for (const p of body.predictions) {
    const item = document.createElement("li");
    const line = document.createElement("div");
    line.className = "line";
    const name = document.createElement("span");
    name.className = "label";
    name.textContent = p.label;
    const pct = document.createElement("span");
    pct.className = "pct";
    pct.textContent = percent(p.probability);
    line.append(name, pct);
    const track = document.createElement("div");
    track.className = "track";
    const bar = document.createElement("div");
    bar.className = "bar";
    bar.style.width = Math.max(1, Math.round(p.probability * 100)) + "%";
    track.append(bar);
    item.append(line, track);
    results.append(item);
  }
  modelLine.textContent = "model " + body.model.name + " version " + body.model.version + " · " +
    body.timings_ms.total + " ms";
}

async function upload(file) {
  if (!file) return;
  results.replaceChildren();
  results.classList.remove("dimmed");
  modelLine.textContent = "";
  makeLine.textContent = "";
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.removeAttribute("src");
  // Only images get a preview: anything else would show as a broken picture. The server
  // still decides what it accepts.
  preview.hidden = !file.type.startsWith("image/");
  if (!preview.hidden) preview.src = URL.createObjectURL(file);
  showStatus("Looking…", "");
  const form = new FormData();
  form.append("file", file);
  try {
    // No top_k: the server's default (five) already stops at the model's class count.
    const response = await fetch("/predict", { method: "POST", body: form });
    // A body over the size limit is refused by the HTTP server itself, in plain text, not JSON.
    const body = await response.json().catch(() => ({}));
    if (!response.ok) {
      showStatus(body.description || body.title || ("error " + response.status + " " + response.statusText), "error");
      return;
    }
    // The ranked list stays: the closest models are still worth seeing when none is sure.
    if (body.accepted_level === "make") {
      showStatus("It is " + body.reason, "make");
    } else {
      showStatus(body.accepted === false ? "Not sure: " + body.reason : "", body.accepted === false ? "unsure" : "");
    }
    showPredictions(body);
  } catch (err) {
    showStatus("Could not reach the server: " + err.message, "error");
  }
}

input.addEventListener("change", () => upload(input.files[0]));
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  upload(e.dataTransfer.files[0]);
});

// The known models, grouped by make, filtered as the person types.
let known = [];

function showKnown() {
  const words = filter.value.toLowerCase().split(/\s+/).filter(Boolean);
  const shown = known.filter((name) => words.every((w) => name.toLowerCase().includes(w)));
  knownList.replaceChildren(...shown.map((name) => {
    const item = document.createElement("li");
    item.textContent = name;
    return item;
  }));
  knownCount.textContent = shown.length + " of " + known.length + " models";
}

async function loadKnown() {
  try {
    const meta = await (await fetch("/metadata")).json();
    const fields = meta.class_fields;
    known = fields ? fields.map((c) => c.name) : (meta.classes || []);
    known.sort((a, b) => a.localeCompare(b));
    showKnown();
  } catch (err) {
    knownCount.textContent = "The list of known models could not be loaded.";
  }
}

filter.addEventListener("input", showKnown);
loadKnown();

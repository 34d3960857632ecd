// The steering playground: plain browser JavaScript, no build step, no outside resources. It talks to the
// same server's API (under its root path) with the key typed in the page.
"use strict";

const root = document.documentElement.dataset.root || "";
const $ = (id) => document.getElementById(id);
const state = { profiles: [], chosen: new Map(), bounds: { min: -20, max: 20 }, model: null };

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

async function api(path, options = {}) {
  const response = await fetch(root + path, { ...options, headers: headers() });
  let body = null;
  try { body = await response.json(); } catch (e) { body = null; }
  if (!response.ok) {
    const message = body && body.error ? body.error.message : response.status + " " + response.statusText;
    const error = new Error(message);
    error.status = response.status;
    throw error;
  }
  return body;
}

function status(text, isError = false) {
  const el = $("status");
  el.textContent = text;
  el.classList.toggle("error", isError);
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v; else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const child of children) node.append(child);
  return node;
}

// -- loading -------------------------------------------------------------------------------------------

async function loadBounds() {
  try {
    const spec = await api("/openapi.json");
    const strength = spec.components.schemas.SteeringEntry.properties.strength.anyOf[0];
    state.bounds = { min: strength.minimum, max: strength.maximum };
  } catch (e) { /* keep the defaults */ }
}

async function loadModel() {
  const models = await api("/v1/models");
  const base = models.data.find((m) => !m.parent) || models.data[0];
  state.model = base.id;
  $("model").textContent = "model: " + base.id;
}

async function loadProfiles() {
  const list = await api("/v1/profiles");
  state.profiles = list.data;
  for (const name of [...state.chosen.keys()]) {
    if (!state.profiles.some((p) => p.id === name)) state.chosen.delete(name);
  }
  renderProfiles();
}

async function load() {
  try {
    await loadModel();
    await loadBounds();  // before the profiles: a slider made from the list must get the server's bounds
    await loadProfiles();
    status(state.profiles.length + " profiles loaded");
  } catch (e) {
    status(e.status === 401 ? "This server needs an API key: enter it above." : "Cannot load: " + e.message, true);
  }
}

// -- profiles and sliders ---------------------------------------------------------------------------------

function renderProfiles() {
  const ul = $("profiles");
  ul.replaceChildren();
  if (!state.profiles.length) ul.append(el("li", { class: "muted" }, "no profiles yet: build one below"));
  for (const profile of state.profiles) {
    const chosen = state.chosen.has(profile.id);
    const strength = chosen ? state.chosen.get(profile.id) : profile.default_strength;
    const value = el("output", { class: "strength" }, String(strength));
    const slider = el("input", {
      type: "range", min: state.bounds.min, max: state.bounds.max, step: "0.05", value: strength,
      "aria-label": "strength of " + profile.id, "data-profile": profile.id,
    });
    slider.disabled = !chosen;
    slider.addEventListener("input", () => {
      value.textContent = slider.value;
      state.chosen.set(profile.id, Number(slider.value));
      updateLabel();
    });
    const box = el("input", { type: "checkbox", "data-profile": profile.id, "aria-label": "steer with " + profile.id });
    box.checked = chosen;
    box.addEventListener("change", () => {
      if (box.checked) state.chosen.set(profile.id, Number(slider.value)); else state.chosen.delete(profile.id);
      slider.disabled = !box.checked;
      updateLabel();
    });
    const name = el("button", { type: "button", class: "link", title: "show details", onclick: () => showDetails(profile) },
      profile.id);
    ul.append(el("li", { "data-profile": profile.id }, box, name, slider, value));
  }
  updateLabel();
}

function steering() {
  const position = $("position").value;
  return [...state.chosen.entries()].map(([profile, strength]) => {
    const entry = { profile, strength };
    if (position) entry.position = position;
    return entry;
  });
}

function updateLabel() {
  const parts = [...state.chosen.entries()].map(([name, s]) => name + " @ " + s);
  $("steering-label").textContent = parts.length ? "(" + parts.join(", ") + ")" : "(no profile chosen)";
}

function fmt(x) {
  return typeof x === "number" ? (Number.isInteger(x) ? String(x) : x.toFixed(3)) : String(x);
}

// a profile's decoding defaults as text: "repetition_penalty 1.150"
function decodingText(decoding) {
  return Object.entries(decoding).map(([k, v]) => k + " " + fmt(v)).join(", ");
}

function showDetails(profile) {
  const box = $("details");
  box.hidden = false;
  const p = profile.provenance || {};
  const rows = [
    ["name", profile.id], ["description", profile.description || ""], ["method", profile.method],
    ["layers", profile.layers.join(", ")], ["default strength", fmt(profile.default_strength)],
    ["position mode", profile.position_mode],
    ...(profile.decoding && Object.keys(profile.decoding).length ? [["decoding defaults (where it steers and a " +
      "request sets none)", decodingText(profile.decoding)]] : []),
    ["created", new Date(profile.created * 1000).toISOString().slice(0, 19).replace("T", " ")],
  ];
  if (p.examples) rows.push(["examples", p.examples.count + " " + p.examples.shape + ", sha256 " +
    String(p.examples.sha256).slice(0, 12) + "…"]);
  if (p.data) rows.push(["data", p.data]);
  if (p.pairs) rows.push(["training pairs", p.pairs]);
  const table = el("table", {}, ...rows.map(([k, v]) => el("tr", {}, el("th", {}, k), el("td", {}, String(v)))));
  box.replaceChildren(el("h3", {}, profile.id), table);
  const calibration = p.calibration;
  const likelihood = el("div", { class: "evaluation" });
  if (calibration && Array.isArray(calibration.rows)) {
    const head = el("tr", {}, ...["strength", "accuracy", "margin", "perplexity"].map((h) => el("th", {}, h)));
    const body = calibration.rows.map((r) => el("tr", {},
      ...[r.strength, r.accuracy, r.margin, r.perplexity].map((v) => el("td", {}, v === null ? "–" : fmt(v)))));
    const unsteered = calibration.unsteered ? " Unsteered: accuracy " + fmt(calibration.unsteered.accuracy) +
      ", perplexity " + fmt(calibration.unsteered.perplexity) + "." : "";
    // the file's default may have been chosen otherwise since (by its replies, or a sweep): say so
    const choice = p.default_strength_choice;
    const otherwise = choice && choice.strength !== calibration.strength ? " The file's default, " +
      fmt(choice.strength) + ", was chosen otherwise: " + choice.how + "." : "";
    likelihood.append(el("h4", {}, "Evaluation (held-out calibration pairs)"),
      el("p", { class: "muted" }, (calibration.pairs || "?") + " pairs; the strength they chose: " +
        fmt(calibration.strength) + "." + unsteered + otherwise),
      el("table", { class: "calibration" }, head, ...body));
  } else {
    likelihood.append(el("p", { class: "muted" }, "No evaluation recorded in this profile."));
  }
  box.append(el("div", { class: "evaluations" }, likelihood, generationBox(profile.generation)));
}

function pct(x) {
  return x === null || x === undefined ? "–" : (100 * x).toFixed(1) + " %";
}

// the rows of the "Generation (dev half B)" table: the unsteered row, then each strength measured
function generationRows(gen) {
  const head = ["strength", "win rate vs unsteered [95 % CI]", "loops", "refusals", "perplexity"];
  const base = gen.unsteered;
  const body = [["0 (unsteered)", "–", pct(base.loop_rate), pct(base.refusal_rate), fmt(base.perplexity ?? "–")]];
  for (const r of gen.strengths) {
    const change = r.perplexity_change === null || r.perplexity_change === undefined ? "" :
      " (" + (r.perplexity_change >= 0 ? "+" : "") + pct(r.perplexity_change) + ")";
    body.push([fmt(r.strength) + (r.strength === gen.chosen_strength ? " (chosen)" : ""),
      pct(r.win_rate) + " [" + pct(r.low) + ", " + pct(r.high) + "]", pct(r.loop_rate), pct(r.refusal_rate),
      fmt(r.perplexity ?? "–") + change]);
  }
  return [head, ...body];
}

function generationBox(gen) {
  const box = el("div", { class: "evaluation" }, el("h4", {}, "Generation (dev half B)"));
  if (!gen) {
    box.append(el("p", { class: "muted" }, "No generation result recorded in this profile."));
    return box;
  }
  const chosen = gen.chosen_strength === 0 ? "none (no strength kept loops and perplexity within the limits)"
    : fmt(gen.chosen_strength);
  const decoding = gen.decoding && Object.keys(gen.decoding).length ? " Steered replies with its decoding defaults (" +
    decodingText(gen.decoding) + "), unsteered ones without." : "";
  const conditions = gen.conditions === "honoured" ? " Its condition was honoured, as in a request." : "";
  box.append(el("p", { class: "muted" }, gen.set + ": " + gen.half_b + " of " + gen.prompts + " dev prompts, " +
      "judge " + gen.judge + ", replies from the " + gen.replies + ". Strength chosen on half A: " + chosen + "." +
      decoding + conditions),
    el("table", { class: "calibration generation" }, ...generationRows(gen).map((cells, i) =>
      el("tr", {}, ...cells.map((c) => el(i === 0 ? "th" : "td", {}, c))))));
  return box;
}

// -- side-by-side comparison --------------------------------------------------------------------------------

// what a response's steering field says about conditional profiles: "harmless: applied (score 1.73)"
// and about the decoding defaults the acting profiles carried: "repetition_penalty 1.15 from the profiles"
function conditionsText(steering) {
  if (!steering || !Array.isArray(steering.profiles)) return "";
  const parts = steering.profiles.filter((p) => p.condition).map((p) => p.profile + ": " +
    (p.condition.applied ? "applied" : "not applied — its condition did not fire") +
    " (score " + fmt(p.condition.score) + ")");
  if (steering.decoding) parts.push(decodingText(steering.decoding) + " from the profiles' decoding defaults");
  return parts.join("; ");
}

async function stream(body, target, note) {
  target.textContent = "";
  target.dataset.done = "false";
  target.classList.remove("error");
  if (note) note.textContent = "";
  try {
    const response = await fetch(root + "/v1/chat/completions", { method: "POST", headers: headers(),
      body: JSON.stringify(body) });
    if (!response.ok) {
      let message = response.status + "";
      try { message = (await response.json()).error.message; } catch (e) { /* keep the status */ }
      throw new Error(message);
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      // events end with a blank line; lines end with CRLF, LF or CR (this server sends CRLF)
      let cut;
      while ((cut = buffer.match(/\r\n\r\n|\n\n|\r\r(?!\n)/)) !== null) {
        const event = buffer.slice(0, cut.index);
        buffer = buffer.slice(cut.index + cut[0].length);
        for (const line of event.split(/\r\n|\n|\r/)) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error(chunk.error.message);
          if (note && chunk.steering) note.textContent = conditionsText(chunk.steering);
          const choice = chunk.choices && chunk.choices[0];
          if (choice && choice.delta && choice.delta.content) target.textContent += choice.delta.content;
        }
      }
    }
  } catch (e) {
    target.classList.add("error");
    target.textContent += (target.textContent ? "\n" : "") + "error: " + e.message;
  } finally {
    target.dataset.done = "true";
  }
}

async function compare() {
  if (!state.model) await load();
  const request = {
    model: state.model,
    messages: [{ role: "user", content: $("prompt").value }],
    max_tokens: Number($("max-tokens").value) || 64,
    temperature: Number($("temperature").value) || 0,
    seed: Number($("seed").value) || 0,
    stream: true,
  };
  const penalty = $("repetition-penalty").value.trim();
  if (penalty !== "") request.repetition_penalty = Number(penalty); // empty: the server's default
  const chosen = steering();
  $("compare").disabled = true;
  status(chosen.length ? "streaming both replies…" : "no profile chosen: both replies are unsteered");
  await Promise.all([
    stream(request, $("reply-plain")),
    stream({ ...request, steering: chosen.length ? chosen : null }, $("reply-steered"), $("conditions")),
  ]);
  $("compare").disabled = false;
  status("done");
}

// -- building a profile from examples ---------------------------------------------------------------------

const HELP = {
  pairs: "one pair per line: positive | negative",
  replies: "one example per line: prompt | positive reply | negative reply",
  instructions: "one prompt per line (each is asked under both instructions)",
};

function fitBody() {
  const shape = $("fit-shape").value;
  const lines = $("fit-examples").value.split("\n").map((l) => l.trim()).filter(Boolean);
  const body = { method: $("fit-method").value, default_strength: Number($("fit-strength").value) };
  const layers = $("fit-layers").value.trim();
  if (layers) body.layers = layers.split(/[\s,]+/).filter(Boolean).map(Number);
  if (shape === "instructions") {
    body.instructions = { positive: $("fit-positive").value, negative: $("fit-negative").value };
    body.prompts = lines;
    return body;
  }
  body.examples = lines.map((line, i) => {
    const parts = line.split("|").map((s) => s.trim());
    const want = shape === "pairs" ? 2 : 3;
    if (parts.length !== want) throw new Error("line " + (i + 1) + ": expected " + want + " parts separated by |");
    return shape === "pairs" ? { positive: parts[0], negative: parts[1] }
      : { prompt: parts[0], positive: parts[1], negative: parts[2] };
  });
  return body;
}

async function fit() {
  const name = $("fit-name").value.trim();
  const result = $("fit-result");
  result.classList.remove("error");
  let body;
  try { body = fitBody(); } catch (e) { result.textContent = e.message; result.classList.add("error"); return; }
  $("fit").disabled = true;
  result.textContent = "fitting…";
  const started = performance.now();
  try {
    const profile = await api("/v1/profiles/" + encodeURIComponent(name) + "/fit", { method: "POST",
      body: JSON.stringify(body) });
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    state.chosen.set(profile.id, profile.default_strength);
    await loadProfiles();
    showDetails(profile);
    result.textContent = "built " + profile.id + " (" + profile.method + ", layers " + profile.layers.join(", ") +
      ") in " + seconds + " s; it is ticked above";
  } catch (e) {
    result.textContent = (e.status === 401 || e.status === 403 ? "needs an admin key: " : "") + e.message;
    result.classList.add("error");
  } finally {
    $("fit").disabled = false;
  }
}

// -- wiring -------------------------------------------------------------------------------------------------

$("api-key").value = sessionStorage.getItem("rahf-key") || "";
$("api-key").addEventListener("change", () => { sessionStorage.setItem("rahf-key", $("api-key").value); load(); });
$("compare").addEventListener("click", compare);
$("fit").addEventListener("click", fit);
$("fit-shape").addEventListener("change", () => {
  const shape = $("fit-shape").value;
  $("fit-help").textContent = HELP[shape];
  $("fit-instructions").hidden = shape !== "instructions";
});
load();

// wdmoe dashboard: one EventSource, state kept small and bounded, redrawn once per animation frame.
"use strict";
const MAX_REQUESTS = 12;      // request cards kept on the page
const MAX_TEXT = 4000;        // characters of an answer kept
const MAX_LOG = 40;           // event log lines kept
const SVG = "http://www.w3.org/2000/svg";
const $ = (id) => document.getElementById(id);
const state = {cell: null, devices: [], step: null, dirty: false, requests: new Map(), dropped: 0};

function snrColour(db) {
  if (db === null || db === undefined) return "#999";
  const x = Math.max(0, Math.min(1, db / 30));
  const stops = [[215, 48, 31], [253, 174, 97], [26, 152, 80]];
  const i = x < 0.5 ? 0 : 1, f = x < 0.5 ? x * 2 : (x - 0.5) * 2;
  const c = stops[i].map((v, k) => Math.round(v + f * (stops[i + 1][k] - v)));
  return `rgb(${c[0]},${c[1]},${c[2]})`;
}
const ms = (s) => (s === null || s === undefined ? "–" : (1e3 * s).toFixed(1));
const pct = (x) => (x === null || x === undefined ? "–" : (100 * x).toFixed(1) + "%");

function logLine(text) {
  const li = document.createElement("li");
  li.textContent = `${new Date().toLocaleTimeString()} ${text}`;
  const log = $("log");
  log.prepend(li);
  while (log.children.length > MAX_LOG) log.lastChild.remove();
}

// --- the cell map ------------------------------------------------------------------------
function ensureCell(n) {
  const svg = $("cell");
  if (svg.dataset.n === String(n)) return;
  svg.replaceChildren();
  svg.dataset.n = String(n);
  const ring = document.createElementNS(SVG, "circle");
  ring.setAttribute("r", "100"); ring.setAttribute("class", "ring");
  svg.append(ring);
  for (let u = 0; u < n; u++) {
    const line = document.createElementNS(SVG, "line");
    line.setAttribute("id", `link-${u}`); line.setAttribute("class", "link");
    line.setAttribute("x1", "0"); line.setAttribute("y1", "0");
    svg.append(line);
  }
  const bs = document.createElementNS(SVG, "rect");
  bs.setAttribute("x", "-5"); bs.setAttribute("y", "-5"); bs.setAttribute("width", "10"); bs.setAttribute("height", "10");
  bs.setAttribute("class", "bs");
  svg.append(bs);
  for (let u = 0; u < n; u++) {
    const g = document.createElementNS(SVG, "g");
    g.setAttribute("id", `dev-${u}`); g.setAttribute("class", "dev");
    const dot = document.createElementNS(SVG, "circle"); dot.setAttribute("r", "5");
    const label = document.createElementNS(SVG, "text"); label.setAttribute("dy", "-7");
    label.textContent = String(u);
    const tip = document.createElementNS(SVG, "title");
    g.append(dot, label, tip);
    svg.append(g);
  }
}

function drawCell() {
  const cell = state.cell, d = state.step && state.step.devices;
  if (!cell || !d) return;
  const n = d.positions_m.length;
  ensureCell(n);
  const scale = 100 / Math.max(cell.radius_m, 1);
  for (let u = 0; u < n; u++) {
    const [x, y] = d.positions_m[u].map((v) => v * scale);
    const g = $(`dev-${u}`), line = $(`link-${u}`);
    g.setAttribute("transform", `translate(${x.toFixed(1)},${(-y).toFixed(1)})`);
    const up = d.up[u];
    g.querySelector("circle").setAttribute("fill", up ? snrColour(d.snr_db[u]) : "#bbb");
    g.classList.toggle("outage", !up);
    const row = state.devices[u] || {};
    const cls = (cell.classes || [])[u] || "";
    g.querySelector("title").textContent =
      `device ${u} · ${cls} · ${row.state || "?"} · SNR ${d.snr_db[u].toFixed(1)} dB · experts ${(row.experts || []).join(" ")}`;
    line.setAttribute("x2", x.toFixed(1)); line.setAttribute("y2", (-y).toFixed(1));
    line.classList.toggle("busy", !!d.busy[u]);
    line.classList.toggle("down", !up);
  }
}

// --- tables ------------------------------------------------------------------------------
function row(tbody, key, cols) {
  let tr = tbody.querySelector(`tr[data-key="${key}"]`);
  if (!tr) {
    tr = document.createElement("tr");
    tr.dataset.key = key;
    for (const c of cols) { const td = document.createElement("td"); td.className = c; tr.append(td); }
    tbody.append(tr);
  }
  return tr;
}
const set = (tr, cls, text) => { tr.querySelector(`td.${cls}`).textContent = text; };

function drawDevices() {
  const cell = state.cell, step = state.step;
  const d = step && step.devices, totals = step && step.totals;
  const n = d ? d.share.length : (cell ? cell.num_devices : 0);
  const tbody = $("devices").querySelector("tbody");
  const cols = ["slot", "class", "state", "snr", "share", "dl", "compute", "ul", "tokens", "drops", "experts"];
  for (let u = 0; u < n; u++) {
    const tr = row(tbody, u, cols), info = state.devices[u] || {};
    tr.dataset.slot = String(u);
    set(tr, "slot", String(u));
    set(tr, "class", ((cell && cell.classes) || [])[u] || "");
    set(tr, "state", info.state || "");
    const experts = info.experts || [];
    set(tr, "experts", experts.length > 6 ? `${experts.slice(0, 6).join(" ")} … (${experts.length})` : experts.join(" "));
    if (!d) continue;
    set(tr, "snr", d.snr_db[u].toFixed(1));
    set(tr, "share", pct(d.share[u]));
    set(tr, "dl", ms(d.dl_s[u])); set(tr, "compute", ms(d.compute_s[u])); set(tr, "ul", ms(d.ul_s[u]));
    if (totals) {
      set(tr, "tokens", String(Math.round(totals.tokens[u])));
      set(tr, "drops", String(Math.round(totals.drops[u])));
      tr.querySelector("td.drops").classList.toggle("hot", totals.drops[u] > 0);
    }
    tr.classList.toggle("busy", !!d.busy[u]);
    tr.classList.toggle("outage", !d.up[u]);
  }
}

function drawLayers() {
  const step = state.step, l = step && step.layers;
  if (!l) return;
  const tbody = $("layers").querySelector("tbody");
  const most = Math.max(...l.wait_s, 1e-12);
  for (let i = 0; i < l.wait_s.length; i++) {
    const tr = row(tbody, i, ["layer", "wait", "bar", "slowest", "leftout", "dropped", "cut"]);
    set(tr, "layer", String(i));
    set(tr, "wait", ms(l.wait_s[i]));
    tr.querySelector("td.bar").innerHTML = `<span style="width:${(100 * l.wait_s[i] / most).toFixed(0)}%"></span>`;
    set(tr, "slowest", l.slowest[i] < 0 ? "–" : `device ${l.slowest[i]}`);
    set(tr, "leftout", String((step.left_out || [])[i] ?? "–"));
    const dropped = (step.dropped || [])[i];
    set(tr, "dropped", dropped === undefined ? "–" : String(dropped));
    tr.classList.toggle("drop", !!dropped);
    set(tr, "cut", String(l.predicted_cut[i]));
  }
}

function drawHeader() {
  const s = state.step;
  if (!s) return;
  $("step").textContent = String(s.step ?? "");
  $("clock").textContent = (s.t_s ?? 0).toFixed(3);
  $("fwd").textContent = s.measured_s === null || s.measured_s === undefined
    ? `${ms(s.predicted_s)} ms simulated` : `${ms(s.measured_s)} ms measured / ${ms(s.predicted_s)} ms predicted`;
  $("running").textContent = s.running === undefined ? "–" : `${s.running} (+${s.waiting} waiting)`;
}

function draw() {
  state.dirty = false;
  drawHeader(); drawCell(); drawDevices(); drawLayers();
}
function schedule() { if (!state.dirty) { state.dirty = true; requestAnimationFrame(draw); } }

// --- requests ----------------------------------------------------------------------------
function card(id) {
  let c = state.requests.get(id);
  if (c) return c;
  const el = document.createElement("article");
  el.className = "request"; el.dataset.id = String(id);
  el.innerHTML = `<h3>request ${id} <span class="meta"></span></h3><p class="text"></p>`;
  $("requests").prepend(el);
  c = {el, text: ""};
  state.requests.set(id, c);
  while (state.requests.size > MAX_REQUESTS) {
    const [oldest] = state.requests.keys();
    state.requests.get(oldest).el.remove();
    state.requests.delete(oldest);
  }
  return c;
}
function setText(c, text) {
  c.text = text.length > MAX_TEXT ? "…" + text.slice(-MAX_TEXT) : text;
  c.el.querySelector(".text").textContent = c.text;
}
function finished(v) {
  const c = card(v.id);
  c.el.classList.add("done");
  let parts;
  if (v.simulated) {  // the simulator: its seconds are the prediction; drops are the policy's
    parts = [`TTFT ${ms(v.ttft_s)} ms`, v.forwards > 1 ? `TPOT ${ms(v.token_predicted_s)} ms (simulated)` : "",
      `${v.dropped} (token, expert) pairs left out by the policy`];
  } else {
    parts = [`TTFT ${ms(v.ttft_s)} ms`,
      v.forwards > 1 ? `TPOT ${ms(v.token_measured_s)} ms measured / ${ms(v.token_predicted_s)} ms predicted` : "",
      `${v.dropped} of ${v.expert_calls} expert calls dropped`];
  }
  c.el.querySelector(".meta").textContent = [`${v.new_tokens} tokens`, ...parts.filter((x) => x)].join(" · ");
}

// --- events ------------------------------------------------------------------------------
const handlers = {
  cell(v) { state.cell = v; $("label").textContent = `${v.label} · ${v.scenario} · ${v.num_devices} devices`; schedule(); },
  devices(v) { state.devices = v.devices; schedule(); },
  controls(v) { showControls(v); },
  step(v) {
    state.step = v;
    state.dropped += (v.dropped || []).reduce((a, b) => a + b, 0);
    $("dropped-total").textContent = String(state.dropped);
    for (const r of v.requests || []) {
      const c = card(r.id);
      if (!c.el.classList.contains("done")) c.el.querySelector(".meta").textContent = `${r.tokens}/${r.of} tokens`;
    }
    schedule();
  },
  text(v) { const c = card(v.id); setText(c, c.text + v.text); },
  answer(v) { setText(card(v.id), v.text); },
  request(v) { finished(v); },
  run(v) { logLine(`run ${v.label}`); },
};
function onEvent(kind, v) {
  if (handlers[kind]) handlers[kind](v);
  else if (kind.startsWith("device_")) logLine(`${kind.replace("_", " ")} · slot ${v.slot} ${v.reason || ""}`);
  else logLine(`${kind} ${JSON.stringify(v).slice(0, 160)}`);
}

function connect() {
  const source = new EventSource("/events");
  source.onopen = () => { $("conn").textContent = "live"; $("conn").className = "on"; };
  source.onerror = () => { $("conn").textContent = "reconnecting"; $("conn").className = "off"; };
  source.onmessage = (m) => { const e = JSON.parse(m.data); onEvent(e.kind, e.v); };
}

// --- controls ----------------------------------------------------------------------------
function options(select, names, chosen) {
  if (select.options.length !== names.length) {
    select.replaceChildren(...names.map((n) => new Option(n, n)));
  }
  select.value = chosen;
}
function showControls(v) {
  const form = $("controls");
  form.hidden = !v.enabled;
  $("control-note").textContent = v.enabled
    ? `in force: ${v.policy} ${JSON.stringify(v.params)} · ${v.allocator}`
    : "(only a BS's dashboard has controls)";
  if (!v.enabled) return;
  options($("policy"), v.policies, v.policy);
  options($("allocator"), v.allocators, v.allocator);
  if (v.params && v.params.theta !== undefined) $("theta").value = v.params.theta;
}
$("controls").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const policy = $("policy").value;
  const params = policy.startsWith("wdmoe") ? {theta: Number($("theta").value)} : {};
  const reply = await fetch("/control", {
    method: "POST",
    headers: {"Content-Type": "application/json", "Authorization": `Bearer ${$("token").value}`},
    body: JSON.stringify({policy, params, allocator: $("allocator").value}),
  });
  const body = await reply.json();
  $("control-status").textContent = reply.ok ? "applied" : `refused (${reply.status}): ${body.error}`;
  if (reply.ok) showControls(body);
});
$("controls").hidden = true;
connect();

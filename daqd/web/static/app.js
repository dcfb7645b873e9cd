// daqd's live page: plain JavaScript, no build step, no library. Updates come by Server-Sent Events
// (/events): the status once a second, a watched receiver's records and camera picture at most
// twice a second.
"use strict";

const $ = (id) => document.getElementById(id);
let source = null;
let geometry = null;
let lastStatus = null;

// ----- formatting -------------------------------------------------------------------------------
function fmtNum(n) { return n == null ? "–" : Number(n).toLocaleString("en-US"); }
function fmtDuration(s) {
  if (s == null) return "–";
  s = Math.floor(s);
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
  return (h ? h + "h " : "") + (h || m ? m + "m " : "") + sec + "s";
}
function fmtTime(ns) { return ns ? new Date(ns / 1e6).toISOString().replace("T", " ").slice(0, 23) : "–"; }
function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}
function badges(counts, kind) {
  const span = el("span", {});
  for (const [reason, n] of Object.entries(counts || {}).sort()) {
    if (n) span.append(el("span", { class: "badge " + kind, title: reason }, reason + " " + fmtNum(n)));
  }
  return span;
}

// ----- sparklines: hand-written SVG -------------------------------------------------------------
function sparkline(values) {
  const w = 160, h = 24;
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("class", "spark");
  svg.setAttribute("width", w);
  svg.setAttribute("height", h);
  if (values.length > 1) {
    const max = Math.max(...values, 1e-9);
    const pts = values.map((v, i) =>
      ((i / (values.length - 1)) * (w - 2) + 1).toFixed(1) + "," + (h - 1 - (v / max) * (h - 2)).toFixed(1));
    const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
    line.setAttribute("points", pts.join(" "));
    svg.append(line);
  }
  const last = values.length ? values[values.length - 1] : 0;
  svg.setAttribute("data-last", String(last));
  return svg;
}

// ----- the status -------------------------------------------------------------------------------
function showStatus(snap) {
  lastStatus = snap;
  const st = snap.status;
  $("daemon-name").textContent = st.name;
  const state = $("state");
  state.textContent = st.state;
  state.className = "state " + st.state;
  $("run-id").textContent = st.run ? st.run.run_id : "–";
  $("run-duration").textContent = st.run ? fmtDuration(st.run_duration_s) : "–";
  $("uptime").textContent = fmtDuration(st.uptime_s);
  $("control").hidden = !snap.control;
  showRows(snap);
  showRuns(snap.runs || []);
  showWarnings(snap.warnings || []);
  fillWatchChoices(snap);
}

function showRows(snap) {
  const st = snap.status, hist = snap.history || [];
  const body = $("rows");
  body.replaceChildren();
  const add = (kind, name, s) => {
    const key = kind + "/" + name;
    const rates = hist.map((h) => (h.rates && h.rates[key]) || 0);
    const current = rates.length ? rates[rates.length - 1] : 0;
    const tr = el("tr", { "data-kind": kind, "data-name": name },
      el("td", {}, kind), el("td", {}, name), el("td", {}, s.type || ""),
      el("td", {}, s.state || (kind === "publisher" ? "" : "")),
      el("td", { class: "num records" }, fmtNum(kind === "receiver" ? s.records : s.records)),
      el("td", { class: "num rate" }, current.toFixed(1)),
      el("td", {}, sparkline(rates)),
      el("td", { class: "num" }, fmtNum(s.bytes)),
      el("td", { class: "num" }, kind === "publisher" ? fmtNum(s.queue) + " / " + fmtNum(s.queue_size) : ""),
      el("td", { class: "drops" }, badges(s.drops, "drop")),
      el("td", { class: "errors" }, badges(s.errors, "error")));
    body.append(tr);
  };
  for (const [n, s] of Object.entries(st.receivers || {})) add("receiver", n, s);
  for (const [n, s] of Object.entries(st.publishers || {})) add("publisher", n, s);
}

function showRuns(runs) {
  const body = $("runrows");
  body.replaceChildren();
  for (const r of runs) {
    const total = Object.values(r.records || {}).reduce((a, b) => a + b, 0);
    const dur = r.time_end && r.time_start ? (r.time_end - r.time_start) / 1e9 : null;
    body.append(el("tr", { "data-run": r.run_id },
      el("td", {}, r.run_id), el("td", {}, fmtTime(r.time_start)), el("td", {}, fmtDuration(dur)),
      el("td", { class: r.condition === "GOOD" ? "cond-GOOD" : "cond-bad" }, r.condition),
      el("td", { class: "num" }, fmtNum(total)),
      el("td", {}, (r.reasons || []).join("; "))));
  }
}

function showWarnings(lines) {
  const ul = $("warnings");
  ul.replaceChildren();
  for (const w of lines.slice().reverse()) {
    ul.append(el("li", { class: w.level },
      new Date(w.time * 1000).toISOString().slice(11, 19) + " " + w.level + " " + w.logger + ": " + w.message));
  }
}

function fillWatchChoices(snap) {
  const sel = $("watch");
  const names = Object.keys(snap.status.receivers || {});
  const have = Array.from(sel.options).map((o) => o.value).filter((v) => v);
  if (have.join("\n") !== names.join("\n")) {
    const keep = sel.value;
    sel.replaceChildren(el("option", { value: "" }, "(none)"));
    for (const n of names) sel.append(el("option", { value: n }, n + " (" + snap.kinds[n] + ")"));
    sel.value = names.includes(keep) ? keep : "";
  }
}

// ----- live records -----------------------------------------------------------------------------
function showRecords(msg) {
  if (msg.name !== $("watch").value) return;
  const body = $("taprows");
  body.replaceChildren();
  for (const r of msg.rows.slice().reverse()) {
    body.append(el("tr", {},
      el("td", {}, fmtTime(r.time_ns)), el("td", {}, r.source), el("td", { class: "num" }, r.seq),
      el("td", { class: "num" }, fmtNum(r.size)), el("td", { title: r.tags }, r.tags), el("td", {}, r.first)));
  }
}

// ----- the camera picture -----------------------------------------------------------------------
const PIX = 7, GAP = 4, MARGIN = 4, MISSING = "#3a3a3a";
// colour scale: a viridis-like ramp, linear between these stops, low to high mV
const STOPS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];

function colour(v, lo, hi) {
  let f = hi > lo ? (v - lo) / (hi - lo) : 0.5;
  f = Math.min(1, Math.max(0, f));
  const x = f * (STOPS.length - 1), i = Math.min(Math.floor(x), STOPS.length - 2), t = x - i;
  const a = STOPS[i], b = STOPS[i + 1];
  return [0, 1, 2].map((k) => Math.round(a[k] + (b[k] - a[k]) * t));
}

function moduleOrigin(m) {
  const [r, c] = geometry.modules[m];
  const side = PIX * geometry.module_side;
  return [MARGIN + c * (side + GAP), MARGIN + r * (side + GAP)];
}

function pixelAt(m, ch) {  // the canvas point at the middle of module m's channel ch
  const [x0, y0] = moduleOrigin(m);
  const [r, c] = geometry.channels[ch];
  return [x0 + c * PIX + Math.floor(PIX / 2), y0 + r * PIX + Math.floor(PIX / 2)];
}

function drawCamera(ro) {
  if (!geometry || ro.name !== $("watch").value) return;
  $("camera-box").hidden = false;
  const cv = $("camera"), ctx = cv.getContext("2d");
  ctx.fillStyle = "#ffffff";
  ctx.fillRect(0, 0, cv.width, cv.height);
  const lo = ro.min_mv, hi = ro.max_mv, side = PIX * geometry.module_side;
  let missing = 0;
  for (let m = 0; m < geometry.modules.length; m++) {
    const [x0, y0] = moduleOrigin(m);
    const values = ro.mv[m];
    if (!values || !values.length) {
      missing++;
      ctx.fillStyle = MISSING;
      ctx.fillRect(x0, y0, side, side);
      ctx.fillStyle = "#bbbbbb";
      ctx.font = "11px sans-serif";
      ctx.textAlign = "center";
      ctx.fillText("M" + m, x0 + side / 2, y0 + side / 2 - 2);
      ctx.fillText("missing", x0 + side / 2, y0 + side / 2 + 11);
      continue;
    }
    for (let ch = 0; ch < values.length; ch++) {
      const [r, c] = geometry.channels[ch];
      const v = values[ch];
      if (v == null) { ctx.fillStyle = MISSING; } else {
        const [cr, cg, cb] = colour(v, lo, hi);
        ctx.fillStyle = "rgb(" + cr + "," + cg + "," + cb + ")";
      }
      ctx.fillRect(x0 + c * PIX, y0 + r * PIX, PIX, PIX);
    }
  }
  $("scale-min").textContent = lo == null ? "–" : lo.toFixed(1);
  $("scale-max").textContent = hi == null ? "–" : hi.toFixed(1);
  const info = $("camera-info");
  info.textContent = "readout " + ro.readout + " (TACK " + ro.tack + ")" +
    (ro.complete ? "" : ", incomplete") + (missing ? ", " + missing + " modules missing" : "");
  info.setAttribute("data-readout", String(ro.readout));
  info.setAttribute("data-missing", String(missing));
}

function drawScale() {
  const cv = $("scale-bar"), ctx = cv.getContext("2d");
  for (let x = 0; x < cv.width; x++) {
    const [r, g, b] = colour(x, 0, cv.width - 1);
    ctx.fillStyle = "rgb(" + r + "," + g + "," + b + ")";
    ctx.fillRect(x, 0, 1, cv.height);
  }
}

// ----- the event stream -------------------------------------------------------------------------
function connect() {
  if (source) source.close();
  const watch = $("watch").value;
  $("taprows").replaceChildren();
  $("camera-box").hidden = true;
  source = new EventSource("/events" + (watch ? "?watch=" + encodeURIComponent(watch) : ""));
  source.addEventListener("status", (e) => { $("link").textContent = "live"; $("link").className = "link"; showStatus(JSON.parse(e.data)); });
  source.addEventListener("records", (e) => showRecords(JSON.parse(e.data)));
  source.addEventListener("camera", (e) => drawCamera(JSON.parse(e.data)));
  source.onerror = () => { $("link").textContent = "reconnecting…"; $("link").className = "link down"; };
}

// ----- run control ------------------------------------------------------------------------------
async function control(transition) {
  const out = $("control-result");
  const token = $("token").value.trim();
  sessionStorage.setItem("daqd-token", token);
  const body = { transition };
  if (transition === "start" && $("run-id-input").value.trim()) body.run_id = $("run-id-input").value.trim();
  out.textContent = transition + "…";
  out.className = "";
  let resp, reply;
  try {
    resp = await fetch("/api/control", {
      method: "POST",
      headers: { "Content-Type": "application/json", "Authorization": "Bearer " + token },
      body: JSON.stringify(body),
    });
    reply = await resp.json();
  } catch (err) {
    out.textContent = transition + ": " + err;
    out.className = "refused";
    return;
  }
  if (resp.ok) {
    out.textContent = transition + ": " + reply.state + (reply.run ? " (run " + reply.run.run_id + ": " + reply.run.condition + ")" : "");
  } else {
    out.textContent = transition + " refused: " + reply.error;
    out.className = "refused";
  }
  out.setAttribute("data-status", String(resp.status));
}

async function main() {
  $("token").value = sessionStorage.getItem("daqd-token") || "";
  for (const b of document.querySelectorAll("button[data-transition]")) {
    b.addEventListener("click", () => control(b.getAttribute("data-transition")));
  }
  geometry = await (await fetch("/api/geometry")).json();
  drawScale();
  const snap = await (await fetch("/api/status")).json();
  showStatus(snap);
  // watch the first slow-signal receiver by default: the camera picture is what a shift looks at
  const params = new URLSearchParams(location.search);
  const first = Object.entries(snap.kinds).find(([, t]) => t === "slowsignal");
  const want = params.get("watch") ?? (first ? first[0] : "");
  if (want && Object.keys(snap.kinds).includes(want)) $("watch").value = want;
  $("watch").addEventListener("change", connect);
  connect();
}

// leaving the page ends its stream at once (a page kept in the back/forward cache would otherwise
// keep watching, and the daemon keep tapping, until the browser drops it)
window.addEventListener("pagehide", () => { if (source) { source.close(); source = null; } });
window.daqdCamera = { pixelAt, colour, STOPS };
main();

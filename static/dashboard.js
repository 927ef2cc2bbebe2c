// hookproxy dashboard: follows /dashboard/events and shows the traffic as it happens.
// Everything from a record is shown with textContent: a prompt is text, never markup.
"use strict";

const MAX_HELD = 5000;   // records kept in the page
const MAX_ROWS = 300;    // rows rendered at once; the rest are a filter away
const records = [];      // newest last
const byId = new Map();
let selectedId = null;
let dirty = false;

const $ = (id) => document.getElementById(id);

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

// --- the feed ---------------------------------------------------------------------------

function connect() {
  const source = new EventSource("/dashboard/events");
  source.onopen = () => setStatus(true);
  source.onerror = () => setStatus(false);   // EventSource reconnects by itself
  source.addEventListener("request", (event) => {
    let record;
    try { record = JSON.parse(event.data); } catch (_) { return; }
    if (byId.has(record.id)) return;
    records.push(record);
    byId.set(record.id, record);
    if (records.length > MAX_HELD) byId.delete(records.shift().id);
    schedule();
  });
}

function setStatus(connected) {
  const status = $("status");
  status.textContent = connected ? "live" : "reconnecting…";
  status.className = "status " + (connected ? "connected" : "disconnected");
  status.dataset.state = connected ? "connected" : "disconnected";
}

function schedule() {
  if (dirty) return;
  dirty = true;
  requestAnimationFrame(() => { dirty = false; render(); });
}

// --- filtering --------------------------------------------------------------------------

// The API a record's endpoint belongs to: a stored response's path counts as the
// Responses API, /chat/completions as chat completions; what nothing serves as "other".
const ENDPOINTS = ["/v1/chat/completions", "/v1/messages", "/v1/messages/count_tokens",
  "/v1/responses", "/v1/embeddings"];

function endpointOf(r) {
  const path = r.endpoint || "";
  if (ENDPOINTS.includes(path)) return path;
  if (path === "/chat/completions") return "/v1/chat/completions";
  if (path.startsWith("/v1/responses/")) return "/v1/responses";
  return "other";
}

function filters() {
  return {
    endpoint: $("f-endpoint").value,
    model: $("f-model").value.trim().toLowerCase(),
    provider: $("f-provider").value.trim().toLowerCase(),
    tag: $("f-tag").value.trim().toLowerCase(),
    status: $("f-status").value,
    text: $("f-text").value.trim().toLowerCase(),
  };
}

function statusMatches(status, wanted) {
  if (!wanted) return true;
  if (wanted === "ok") return status < 400;
  if (wanted === "error") return status >= 400;
  if (wanted === "4xx") return status >= 400 && status < 500;
  return status >= 500;
}

function matches(r, f) {
  if (f.endpoint && endpointOf(r) !== f.endpoint) return false;
  if (f.model && !`${r.model || ""} ${r.provider_model || ""}`.toLowerCase().includes(f.model)) return false;
  if (f.provider && !(r.provider || "").toLowerCase().includes(f.provider)) return false;
  if (f.tag && !(r.tags || []).some((t) => t.toLowerCase().includes(f.tag))) return false;
  if (!statusMatches(r.status, f.status)) return false;
  if (f.text) {
    const haystack = r._text || (r._text = JSON.stringify(r).toLowerCase());
    if (!haystack.includes(f.text)) return false;
  }
  return true;
}

// --- rendering --------------------------------------------------------------------------

function fmtMs(ms) {
  if (ms === undefined || ms === null) return "–";
  return ms >= 1000 ? (ms / 1000).toFixed(2) + " s" : ms.toFixed(1) + " ms";
}

function fmtCost(cost) { return cost ? "$" + cost.toFixed(cost < 0.01 ? 6 : 4) : "–"; }

function percentile(sorted, p) {
  if (!sorted.length) return null;
  return sorted[Math.min(sorted.length - 1, Math.floor(p * sorted.length))];
}

function render() {
  const f = filters();
  const shown = records.filter((r) => matches(r, f));
  $("held").textContent = records.length;
  $("shown").textContent = `${shown.length} shown`;
  renderRows(shown);
  renderCounters(shown);
  renderBreakdown(shown);
  renderChart(shown);
  if (selectedId && byId.has(selectedId)) renderDetail(byId.get(selectedId));
}

function chips(cell, items) {
  for (const item of items) cell.appendChild(el("span", item));
  return cell;
}

function renderRows(shown) {
  const body = document.createElement("tbody");
  for (let i = shown.length - 1; i >= 0 && body.childElementCount < MAX_ROWS; i--) {
    const r = shown[i];
    const row = document.createElement("tr");
    row.dataset.id = r.id;
    if (r.id === selectedId) row.className = "selected";
    row.appendChild(el("td", (r.time || "").slice(11, 23)));
    row.appendChild(el("td", r.endpoint || "–", "endpoint"));
    const answered = r.provider_model && r.provider_model !== r.model ? ` → ${r.provider_model}` : "";
    row.appendChild(el("td", (r.model || "–") + answered));
    row.appendChild(el("td", r.provider || "–"));
    row.appendChild(chips(el("td", null, "tags"), r.tags || []));
    row.appendChild(chips(el("td", null, "plugins"),
      Object.entries(r.plugins || {}).map(([name, how]) => `${name}: ${how}`)));
    row.appendChild(el("td", r.status, r.status >= 400 ? "err" : ""));
    row.appendChild(el("td", fmtMs(r.duration_ms)));
    row.appendChild(el("td", `${r.input_tokens || 0} / ${r.output_tokens || 0}`));
    row.appendChild(el("td", fmtCost(r.cost)));
    body.appendChild(row);
  }
  $("rows").replaceChild(body, $("rows").tBodies[0]);
}

function renderCounters(shown) {
  const now = Date.now();
  const recent = shown.filter((r) => now - Date.parse(r.time) <= 10000).length;
  const latencies = shown.slice(-1000).map((r) => r.duration_ms).sort((a, b) => a - b);
  const errors = shown.filter((r) => r.status >= 400).length;
  const tokens = shown.reduce((n, r) => n + (r.input_tokens || 0) + (r.output_tokens || 0), 0);
  const cost = shown.reduce((n, r) => n + (r.cost || 0), 0);
  $("c-total").textContent = shown.length;
  $("c-rps").textContent = (recent / 10).toFixed(1);
  $("c-p50").textContent = fmtMs(percentile(latencies, 0.5));
  $("c-p95").textContent = fmtMs(percentile(latencies, 0.95));
  $("c-errors").textContent = shown.length ? (100 * errors / shown.length).toFixed(1) + "%" : "0%";
  $("c-tokens").textContent = tokens;
  $("c-cost").textContent = fmtCost(cost);
}

function renderBreakdown(shown) {
  const key = $("group-by").value;
  const groups = new Map();
  for (const r of shown) {
    const names = key === "tag" ? (r.tags && r.tags.length ? r.tags : ["(none)"])
      : key === "endpoint" ? [endpointOf(r)]
      : [(key === "model" ? r.model : r.provider) || "(none)"];
    for (const name of names) {
      const g = groups.get(name) || { n: 0, input: 0, output: 0, cost: 0 };
      g.n += 1; g.input += r.input_tokens || 0; g.output += r.output_tokens || 0;
      g.cost += r.cost || 0;
      groups.set(name, g);
    }
  }
  const body = document.createElement("tbody");
  for (const [name, g] of [...groups.entries()].sort((a, b) => b[1].n - a[1].n)) {
    const row = document.createElement("tr");
    for (const value of [name, g.n, g.input, g.output, fmtCost(g.cost)]) row.appendChild(el("td", value));
    body.appendChild(row);
  }
  $("breakdown").replaceChild(body, $("breakdown").tBodies[0]);
}

function renderChart(shown) {
  const canvas = $("chart");
  const ctx = canvas.getContext("2d");
  const width = canvas.width, height = canvas.height;
  ctx.clearRect(0, 0, width, height);
  const points = shown.slice(-300);
  if (!points.length) return;
  const max = Math.max(...points.map((r) => r.duration_ms), 1);
  ctx.strokeStyle = "#ccd";
  ctx.beginPath(); ctx.moveTo(0, height - 1); ctx.lineTo(width, height - 1); ctx.stroke();
  ctx.fillStyle = "#667";
  ctx.fillText(fmtMs(max), 4, 10);
  ctx.strokeStyle = "#3b6fd8";
  ctx.beginPath();
  points.forEach((r, i) => {
    const x = points.length === 1 ? width / 2 : (i / (points.length - 1)) * (width - 2) + 1;
    const y = height - 2 - (r.duration_ms / max) * (height - 16);
    if (i === 0) ctx.moveTo(x, y); else ctx.lineTo(x, y);
  });
  ctx.stroke();
  for (const [i, r] of points.entries()) {
    if (r.status < 400) continue;
    const x = points.length === 1 ? width / 2 : (i / (points.length - 1)) * (width - 2) + 1;
    ctx.fillStyle = "#b3392f";
    ctx.fillRect(x - 2, height - 2 - (r.duration_ms / max) * (height - 16) - 2, 4, 4);
  }
}

// --- the detail view --------------------------------------------------------------------

function partText(part) {
  if (part.type === "text") return part.text;
  if (part.type === "image") return `[image ${part.media_type || part.url || ""}]`;
  if (part.type === "tool_call") return `→ ${part.name}(${part.arguments})`;
  if (part.type === "tool_result") return `← result for ${part.tool_call_id}: ` +
    (part.content || []).map(partText).join("");
  return JSON.stringify(part);
}

function renderDetail(r) {
  $("detail").hidden = false;
  $("d-title").textContent = `${r.model || "?"} · ${r.status} · ${r.id}`;
  const facts = $("d-facts");
  facts.replaceChildren();
  const rows = [
    ["time", r.time], ["endpoint", `${r.endpoint} (${r.format})`], ["caller", r.caller],
    ["answered by", r.provider ? `${r.provider} / ${r.provider_model}` : null],
    ["route", r.route], ["tags", (r.tags || []).join(", ")],
    ["classifier errors", Object.entries(r.classifier_errors || {}).map((e) => e.join(": ")).join("; ")],
    ["plugins", Object.entries(r.plugins || {}).map((e) => e.join(": ")).join(", ")],
    ["stream", r.stream ? `yes, ${r.chunks} chunks` + (r.failed_at_chunk != null ? `, broke at ${r.failed_at_chunk}` : "") : "no"],
    ["duration", fmtMs(r.duration_ms)], ["first chunk", r.ttft_ms != null ? fmtMs(r.ttft_ms) : null],
    ["upstream", fmtMs(r.upstream_ms)], ["proxy overhead", fmtMs(r.overhead_ms)],
    ["tokens", `${r.input_tokens || 0} in / ${r.output_tokens || 0} out`], ["cost", fmtCost(r.cost)],
    ["cache", r.cache_hit ? "hit" : null], ["finish", r.finish_reason],
    // What plugins put in the record (ctx.annotate): one row per plugin and key.
    ...Object.entries(r.annotations || {}).flatMap(([plugin, values]) =>
      Object.entries(values || {}).map(([key, value]) =>
        [`${plugin} · ${key}`, typeof value === "string" ? value : JSON.stringify(value)])),
    ["annotations dropped", r.annotations_dropped ? String(r.annotations_dropped) : null],
  ];
  for (const [name, value] of rows) {
    if (value === null || value === undefined || value === "") continue;
    facts.appendChild(el("dt", name));
    facts.appendChild(el("dd", value));
  }
  const attempts = document.createElement("tbody");
  for (const a of r.attempts || []) {
    const row = document.createElement("tr");
    for (const value of [a.provider, a.model, a.status || "no answer", fmtMs(a.latency_ms), a.error || ""]) {
      row.appendChild(el("td", value));
    }
    attempts.appendChild(row);
  }
  $("d-attempts").replaceChild(attempts, $("d-attempts").tBodies[0]);
  $("d-error").textContent = r.error ? `${r.error.stage || ""} ${r.error.plugin ? "[" + r.error.plugin + "] " : ""}${r.error.type}: ${r.error.message}` : "none";
  const messages = $("d-messages");
  messages.replaceChildren();
  const request = r.request || {};
  for (const part of request.system || []) {
    const box = el("div", null, "message");
    box.appendChild(el("div", "system", "role"));
    box.appendChild(el("pre", part.text));
    messages.appendChild(box);
  }
  for (const message of request.messages || []) {
    const box = el("div", null, "message");
    box.appendChild(el("div", message.role, "role"));
    box.appendChild(el("pre", (message.content || []).map(partText).join("\n")));
    messages.appendChild(box);
  }
  if (!messages.childElementCount) messages.appendChild(el("pre", "(bodies are not logged)"));
  $("d-response").textContent = r.response ? (r.response.content || []).map(partText).join("\n") : "–";
}

// --- wiring -----------------------------------------------------------------------------

$("rows").addEventListener("click", (event) => {
  const row = event.target.closest("tr[data-id]");
  if (!row) return;
  selectedId = row.dataset.id;
  render();
});
$("close-detail").addEventListener("click", () => { selectedId = null; $("detail").hidden = true; render(); });
for (const id of ["f-model", "f-provider", "f-tag", "f-text"]) $(id).addEventListener("input", schedule);
for (const id of ["f-status", "f-endpoint", "group-by"]) $(id).addEventListener("change", schedule);
setInterval(schedule, 1000);   // keeps req/s moving when traffic stops
connect();

// graphopt report: renders the JSON in #report-data (views: overview chart, table, graph, passes, simulate, compare).
"use strict";
const D = JSON.parse(document.getElementById("report-data").textContent);

const fmt = {
  ms: v => v == null ? "" : v >= 100 ? v.toFixed(1) : v >= 1 ? v.toFixed(3) : v.toFixed(4),
  pct: v => v == null ? "" : (100 * v).toFixed(1) + "%",
  int: v => v == null ? "" : Math.round(v).toLocaleString("en-US"),
  bytes: v => v == null ? "" : v >= 1e6 ? (v / 1e6).toFixed(2) + " MB" : v >= 1e3 ? (v / 1e3).toFixed(1) + " kB" : v + " B",
  macs: v => v == null ? "" : v >= 1e9 ? (v / 1e9).toFixed(2) + " G" : v >= 1e6 ? (v / 1e6).toFixed(2) + " M" : v >= 1e3 ? (v / 1e3).toFixed(1) + " k" : String(v),
  text: v => v == null ? "" : String(v),
};
const esc = s => String(s).replace(/[&<>"]/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}[c]));
const el = id => document.getElementById(id);

// ---- header totals and tabs ------------------------------------------------------------
function renderTotals() {
  const t = D.totals, parts = [];
  const add = (label, value, title) => parts.push(`<div title="${esc(title || "")}"><b>${value}</b>${label}</div>`);
  if (t.latency_ms != null) {
    add("end-to-end latency (ms)", fmt.ms(t.latency_ms), `median of ${D.machine.runs} runs without the profiler, ±${fmt.ms(t.latency_spread_ms)}`);
    add("in kernels (ms)", fmt.ms(t.attributed_ms), `profiled kernel time ${fmt.ms(t.kernel_ms)} ms x ${t.profiler_scale.toFixed(3)} to fit the end-to-end latency`);
    add("unattributed (ms)", fmt.ms(t.unattributed_ms), "end-to-end latency minus the kernels: framework time between kernels");
    add("kernels not mapped to a node (ms)", fmt.ms(t.unmapped_kernel_ms));
  }
  add("kernels run", fmt.int(t.kernels));
  add("graph nodes", fmt.int(t.graph_nodes));
  add("MACs", fmt.macs(t.macs));
  add("weight bytes", fmt.bytes(t.weight_bytes));
  if (t.artifact_bytes != null) add("artifact bytes", fmt.bytes(t.artifact_bytes));
  el("totals").innerHTML = parts.join("");
  if (D.error) el("error").innerHTML = `<b>${esc(D.error.stage || "compile")} failed</b>` +
    (D.error.node ? ` at node <code>${esc(D.error.node)}</code>` : "") + `: ${esc(D.error.message)}`;
  el("error").style.display = D.error ? "block" : "none";
}

function showView(name) {
  document.querySelectorAll("nav button").forEach(b => b.classList.toggle("active", b.dataset.view === name));
  document.querySelectorAll("section.view").forEach(s => s.classList.toggle("active", s.id === "view-" + name));
  if (name === "overview") renderChart();
  if (name === "compare") renderCompareChart();
}

// ---- overview chart (Plotly) -------------------------------------------------------------
let chartDone = false;
function renderChart() {
  if (chartDone || !D.layers.length || typeof Plotly === "undefined") return;
  chartDone = true;
  const names = D.layers.map(l => l.layer);
  Plotly.newPlot("chart", [
    {x: names, y: D.layers.map(l => l.ms), type: "bar", name: "time (ms)", marker: {color: "#4c78a8"}},
    {x: names, y: D.layers.map(l => l.weight_bytes / 1e6), type: "bar", name: "weights (MB)", yaxis: "y2",
     marker: {color: "#f58518"}},
  ], {barmode: "group", margin: {t: 30, b: 120}, legend: {orientation: "h"}, title: "Time and weight bytes per layer",
      yaxis: {title: "ms"}, yaxis2: {title: "MB", overlaying: "y", side: "right"}},
  {displaylogo: false, responsive: true});
}

// ---- table -------------------------------------------------------------------------------
const KERNEL_COLUMNS = [
  ["order", "#", "int"], ["name", "kernel", "text"], ["op", "op", "text"], ["module", "module", "text"],
  ["graph_node", "graph node", "text"], ["source", "source", "text"], ["ms", "ms", "ms"], ["share", "share", "pct"],
  ["macs", "MACs", "macs"], ["weight_bytes", "weights", "bytes"], ["activation_bytes", "activations", "bytes"],
];
const MODULE_COLUMNS = [
  ["module", "module", "text"], ["module_class", "class", "text"], ["kernels", "kernels", "int"], ["ms", "ms", "ms"],
  ["share", "share", "pct"], ["macs", "MACs", "macs"], ["weight_bytes", "weights", "bytes"],
  ["activation_bytes", "activations", "bytes"],
];
const table = {view: "kernels", depth: 1, key: "ms", dir: -1};

function tableRows() {
  const op = el("filter-op").value, mod = el("filter-module").value.toLowerCase(), minMs = parseFloat(el("filter-ms").value) || 0;
  let rows;
  if (table.view === "kernels") {
    rows = D.kernels.filter(k => (!op || k.op === op) && (!mod || k.module.toLowerCase().includes(mod)) && k.ms >= minMs);
  } else {
    const total = D.totals.latency_ms || 1;
    rows = D.modules.filter(m => m.depth === table.depth && (!mod || m.module.toLowerCase().includes(mod)) && m.ms >= minMs)
      .map(m => Object.assign({share: m.ms / total}, m));
  }
  const key = table.key, dir = table.dir;
  return rows.slice().sort((a, b) => {
    const x = a[key], y = b[key];
    if (typeof x === "number" && typeof y === "number") return dir * (x - y);
    return dir * String(x == null ? "" : x).localeCompare(String(y == null ? "" : y));
  });
}

function renderTable() {
  const columns = table.view === "kernels" ? KERNEL_COLUMNS : MODULE_COLUMNS;
  if (!columns.some(c => c[0] === table.key)) { table.key = "ms"; table.dir = -1; }
  const head = columns.map(([key, label, kind]) => {
    const sorted = key === table.key ? (table.dir > 0 ? " sorted-asc" : " sorted-desc") : "";
    const num = kind === "text" ? "" : " num";
    return `<th data-key="${key}" class="${num}${sorted}">${label}</th>`;
  }).join("");
  const rows = tableRows();
  const maxMs = Math.max(1e-9, ...rows.map(r => r.ms));
  const body = rows.map(r => "<tr>" + columns.map(([key, , kind]) => {
    let v = fmt[kind](r[key]);
    if (key === "ms") v = `<span class="bar" style="width:${(40 * r.ms / maxMs).toFixed(1)}px"></span>` + v;
    return `<td class="${kind === "text" ? "" : "num"}">${kind === "text" ? esc(v) : v}</td>`;
  }).join("") + "</tr>").join("");
  el("table").innerHTML = `<thead><tr>${head}</tr></thead><tbody>${body}</tbody>`;
  el("table-count").textContent = `${rows.length} rows`;
  el("table").querySelectorAll("th").forEach(th => th.addEventListener("click", () => {
    table.dir = th.dataset.key === table.key ? -table.dir : (th.classList.contains("num") ? -1 : 1);
    table.key = th.dataset.key;
    renderTable();
  }));
}

function setupTable() {
  const ops = [...new Set(D.kernels.map(k => k.op))].sort();
  el("filter-op").innerHTML = `<option value="">all ops</option>` + ops.map(o => `<option>${esc(o)}</option>`).join("");
  const depths = [...new Set(D.modules.map(m => m.depth))].filter(d => d > 0).sort((a, b) => a - b);
  el("table-view").innerHTML = `<option value="kernels">one row per kernel</option>` +
    depths.map(d => `<option value="modules:${d}">modules at depth ${d}</option>`).join("");
  el("table-view").addEventListener("change", e => {
    const v = e.target.value;
    table.view = v === "kernels" ? "kernels" : "modules";
    if (v !== "kernels") table.depth = parseInt(v.split(":")[1], 10);
    renderTable();
  });
  ["filter-op", "filter-module", "filter-ms"].forEach(id => ["input", "change"].forEach(
    kind => el(id).addEventListener(kind, renderTable)));
  renderTable();
}

// ---- graph view: modules collapse and expand -----------------------------------------------
const expanded = new Set();
const G = D.graph.nodes;
const failedNode = D.error && D.error.node;

function ancestors(module) {
  if (!module) return [];
  const parts = module.split("."), out = [];
  for (let i = 1; i <= parts.length; i++) out.push(parts.slice(0, i).join("."));
  return out;
}

function visibleKey(node, index) {
  for (const a of ancestors(node.module)) if (!expanded.has(a)) return "m:" + a;
  return "n:" + index;
}

function graphItems() {
  const items = new Map(), keyOf = new Array(G.length);
  const classOf = {};
  G.forEach(n => { if (n.module && !(n.module in classOf)) classOf[n.module] = n.module_class; });
  G.forEach((n, i) => {
    const key = visibleKey(n, i);
    keyOf[i] = key;
    // open modules get a header row before their first visible child
    for (const a of ancestors(n.module)) {
      if (!expanded.has(a)) break;
      const hk = "h:" + a;
      if (!items.has(hk)) items.set(hk, {key: hk, kind: "open", module: a, first: i - 0.5, nodes: 0, ms: 0,
                                         label: a, cls: classOf[a] || "", depth: a.split(".").length - 1});
      const h = items.get(hk); h.nodes += 1; h.ms += n.ms || 0;
    }
    if (!items.has(key)) {
      const isModule = key.startsWith("m:");
      const module = isModule ? key.slice(2) : n.module;
      items.set(key, {key, kind: isModule ? "module" : "node", module, first: i, nodes: 0, ms: 0,
                      label: isModule ? module : `${n.name} (${n.op})`, cls: isModule ? (classOf[module] || "") : n.source,
                      depth: isModule ? module.split(".").length - 1 : ancestors(n.module).length, failed: false});
    }
    const item = items.get(key);
    item.nodes += 1; item.ms += n.ms || 0;
    if (failedNode && n.name === failedNode) item.failed = true;
  });
  const list = [...items.values()].sort((a, b) => a.first - b.first);
  const edges = new Set();
  G.forEach((n, i) => n.inputs.forEach(j => { if (keyOf[j] !== keyOf[i]) edges.add(keyOf[j] + "|" + keyOf[i]); }));
  return {list, edges};
}

function renderGraph() {
  const {list, edges} = graphItems();
  const rowH = 30, left = 160, total = D.totals.latency_ms || 0;
  const y = new Map();
  const html = list.map((it, row) => {
    y.set(it.key, row * rowH + 12);
    const cost = it.ms ? `${fmt.ms(it.ms)} ms${total ? " · " + fmt.pct(it.ms / total) : ""}` : "";
    const count = it.kind === "node" ? "" : ` · ${it.nodes} nodes`;
    const cls = ["gitem", it.kind === "node" ? "node" : "module", it.kind === "open" ? "open" : "", it.failed ? "failed" : ""].join(" ");
    const attrs = it.kind === "node" ? "" : ` data-module="${esc(it.module)}"`;
    const title = it.kind === "node" ? it.cls : (it.kind === "open" ? "click to collapse" : "click to expand");
    return `<div class="${cls}"${attrs} title="${esc(title)}" style="top:${row * rowH}px;left:${left + 18 * it.depth}px">` +
      `${it.kind === "open" ? "\u25BE " : it.kind === "module" ? "\u25B8 " : ""}${esc(it.label)}` +
      `<span class="cost">${esc(it.kind === "node" ? "" : it.cls)}${count}${cost ? " · " + cost : ""}</span></div>`;
  }).join("");
  const paths = [];
  edges.forEach(e => {
    const [a, b] = e.split("|");
    if (!y.has(a) || !y.has(b)) return;
    const y1 = y.get(a), y2 = y.get(b);
    const span = Math.abs(y2 - y1) / rowH;
    const x = left - 6 - Math.min(150, 4 + 6 * Math.log2(1 + span) * 4);
    paths.push(span <= 1 ? `M${left - 4},${y1} L${left - 4},${y2}` : `M${left - 4},${y1} C${x},${y1} ${x},${y2} ${left - 4},${y2}`);
  });
  const height = list.length * rowH + 10;
  el("graph").innerHTML = `<svg width="${left}" height="${height}"><path d="${paths.join(" ")}" fill="none" stroke="#8a94a6" stroke-width="1"/></svg>` +
    `<div style="height:${height}px;min-width:900px"></div>` + html;
  el("graph-count").textContent = `${list.length} items shown, ${edges.size} edges, ${G.length} graph nodes`;
  el("graph").querySelectorAll(".gitem.module").forEach(div => div.addEventListener("click", () => {
    const m = div.dataset.module;
    if (expanded.has(m)) { [...expanded].forEach(e => { if (e === m || e.startsWith(m + ".")) expanded.delete(e); }); }
    else expanded.add(m);
    renderGraph();
  }));
}

function expandTo(node) {
  ancestors(node.module).forEach(a => expanded.add(a));
}

// ---- pass log, simulations, compare ----------------------------------------------------------
function simpleTable(id, columns, rows, rowClass) {
  const head = columns.map(([, label, kind]) => `<th class="${kind === "text" ? "" : "num"}">${label}</th>`).join("");
  const body = rows.map(r => `<tr class="${rowClass ? rowClass(r) : ""}">` + columns.map(([key, , kind]) => {
    const v = typeof key === "function" ? key(r) : fmt[kind](r[key]);
    return `<td class="${kind === "text" ? "" : "num"}">${kind === "text" && typeof key !== "function" ? esc(v) : v}</td>`;
  }).join("") + "</tr>").join("");
  el(id).innerHTML = `<thead><tr>${head}</tr></thead><tbody>${body}</tbody>`;
}

function quality(q) {
  if (!q) return "";
  let s = `JS ${q.js.toExponential(2)}, top-1 ${q.top1_agreement.toFixed(3)}`;
  if (q.perplexity_after != null) s += `, perplexity ${q.perplexity_before.toFixed(3)} \u2192 ${q.perplexity_after.toFixed(3)}`;
  return esc(s);
}

function renderPasses() {
  if (!D.passes.length) { el("passes").outerHTML = `<p class="muted" id="passes">No passes ran.</p>`; return; }
  simpleTable("passes", [
    ["name", "pass", "text"], [r => r.modified ? "changed" : "no change", "result", "text"],
    [r => `${fmt.int(r.nodes_before)} \u2192 ${fmt.int(r.nodes_after)}`, "nodes", "text"],
    [r => `${fmt.bytes(r.bytes_before)} \u2192 ${fmt.bytes(r.bytes_after)}`, "weight bytes", "text"],
    [r => `${fmt.macs(r.macs_before)} \u2192 ${fmt.macs(r.macs_after)}`, "MACs", "text"],
    [r => esc((r.changes || []).slice(0, 4).join("; ") + ((r.changes || []).length > 4 ? ` (+${r.changes.length - 4} more)` : "")), "what changed", "text"],
    [r => quality(r.quality), "quality cost", "text"], ["seconds", "s", "ms"],
  ], D.passes);
}

function renderSimulations() {
  const sims = D.simulations || [];
  if (!sims.length) {
    el("simulations").outerHTML = `<p class="muted" id="simulations">No change was simulated. ` +
      `Run <code>graphopt report MODEL --simulate int4:layers.* --apply</code> (see docs/report.md).</p>`;
    return;
  }
  simpleTable("simulations", [
    ["kind", "change", "text"], ["description", "what", "text"], ["baseline_ms", "now (ms)", "ms"],
    ["predicted_ms", "predicted (ms)", "ms"], ["measured_ms", "measured (ms)", "ms"],
    [r => r.error == null ? "" : `<span class="${Math.abs(r.error) <= 0.15 ? "good" : "bad"}">${(100 * r.error).toFixed(1)}%</span>`, "prediction error", "num"],
    ["predicted_bytes", "predicted bytes", "bytes"], ["measured_bytes", "measured bytes", "bytes"],
  ], sims);
}

let compareDone = false;
function renderCompare() {
  const c = D.compare;
  if (!c) return;
  el("compare-title").textContent = `A: ${c.a}   vs   B: ${c.b} — latency ${fmt.ms(c.latency_ms_a)} vs ${fmt.ms(c.latency_ms_b)} ms, ` +
    `weights ${fmt.bytes(c.bytes_a)} vs ${fmt.bytes(c.bytes_b)}`;
  simpleTable("compare-table", [
    ["layer", "layer", "text"], ["ms_a", "A ms", "ms"], ["ms_b", "B ms", "ms"],
    [r => r.ms_a && r.ms_b != null ? (r.ms_b / r.ms_a).toFixed(2) + "x" : "", "B/A time", "num"],
    ["bytes_a", "A weights", "bytes"], ["bytes_b", "B weights", "bytes"],
  ], c.layers);
}

function renderCompareChart() {
  const c = D.compare;
  if (compareDone || !c || typeof Plotly === "undefined") return;
  compareDone = true;
  const names = c.layers.map(l => l.layer);
  Plotly.newPlot("compare-chart", [
    {x: names, y: c.layers.map(l => l.ms_a), type: "bar", name: "A: " + c.a},
    {x: names, y: c.layers.map(l => l.ms_b), type: "bar", name: "B: " + c.b},
  ], {barmode: "group", margin: {t: 30, b: 120}, legend: {orientation: "h"}, yaxis: {title: "ms"}},
  {displaylogo: false, responsive: true});
}

// ---- start ------------------------------------------------------------------------------------
function start() {
  renderTotals();
  document.querySelectorAll("nav button").forEach(b => b.addEventListener("click", () => showView(b.dataset.view)));
  if (!D.compare) document.querySelector('nav button[data-view="compare"]').style.display = "none";
  setupTable();
  if (failedNode) G.forEach(n => { if (n.name === failedNode) expandTo(n); });
  renderGraph();
  renderPasses();
  renderSimulations();
  renderCompare();
  showView(D.kernels.length ? "overview" : "graph");
  window.graphoptRenderMs = performance.now();
  document.body.dataset.ready = "1";
}
start();

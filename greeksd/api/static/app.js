// greeksd dashboard: polls /v1/streaming/status (1 s), /v1/coverage and /v1/risk/timeline
// (2 s). Plain browser JavaScript, no build step; charts by uPlot.
"use strict";

const GREEKS = ["delta", "gamma", "theta", "vega"];
const COLORS = ["#58a6ff", "#3fb950", "#d29922", "#f778ba", "#a371f7", "#39c5cf",
                "#ff7b72", "#e3b341", "#7ee787", "#79c0ff", "#ffa657", "#d2a8ff"];
const COVERAGE_STATES = ["fresh", "stale", "never", "delayed"];
const TABLE_STATES = new Set(["stale", "never"]);   // the contracts listed under the bars
const TABLE_MAX = 200;
const charts = {};          // greek -> {plot, key, info}
let previous = null;        // last status poll, for rates
const rates = {};           // name -> smoothed per-second rate

const $ = (id) => document.getElementById(id);
const fmt = (n, digits = 0) =>
  n === null || n === undefined ? "–" : Number(n).toLocaleString(undefined, {
    maximumFractionDigits: digits, minimumFractionDigits: digits });

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  for (const child of children) node.append(child);
  return node;
}

function ago(iso) {
  if (!iso) return "never";
  const s = (Date.now() - Date.parse(iso)) / 1000;
  return s < 1 ? "just now" : s < 120 ? `${s.toFixed(0)} s ago` : `${(s / 60).toFixed(0)} min ago`;
}

function rate(name, value, dt) {
  if (!previous || dt <= 0) return null;
  const prior = name in previous ? previous[name] : null;
  if (prior === null) return null;
  const now = Math.max(0, (value - prior) / dt);
  rates[name] = name in rates ? 0.5 * rates[name] + 0.5 * now : now;
  return rates[name];
}

function renderStatus(status, dt) {
  const counters = {};
  const cards = [];
  for (const [name, s] of Object.entries(status.streams)) {
    counters[`ticks:${name}`] = s.ticks;
    const perSecond = rate(`ticks:${name}`, s.ticks, dt);
    cards.push(el("div", { class: "panel stream", "data-broker": name, "data-state": s.state },
      el("h3", {}, name, el("span", { class: `badge ${s.state}` }, s.state)),
      el("div", { class: "reason" }, s.reason || ""),
      el("dl", {},
        el("dt", {}, "ticks"), el("dd", {}, `${fmt(s.ticks)} (${fmt(perSecond, 1)}/s)`),
        el("dt", {}, "subscriptions"), el("dd", {}, fmt(s.subscriptions)),
        el("dt", {}, "rejected frames"), el("dd", {}, fmt(s.rejected_frames)),
        el("dt", {}, "reconnects"), el("dd", {}, fmt(s.reconnects)),
        el("dt", {}, "last message"), el("dd", {}, ago(s.last_message_at)))));
  }
  $("streams").replaceChildren(...cards);

  const w = status.writer;
  counters.rows = w.rows_written;
  $("rows").textContent = fmt(w.rows_written);
  const rowsPerSecond = rate("rows", w.rows_written, dt);
  $("rate").replaceChildren(fmt(rowsPerSecond, 1), el("small", {}, " rows/s"));
  const p95 = w.latency_ms.p95;
  $("p95").replaceChildren(p95 === null ? "–" : fmt(p95, 1), el("small", {}, " ms"));
  $("writer").replaceChildren(
    el("dt", {}, "state"), el("dd", {}, w.state),
    el("dt", {}, "queue"), el("dd", {}, fmt(w.queue_depth)),
    el("dt", {}, "duplicates"), el("dd", {}, fmt(w.duplicates)),
    el("dt", {}, "late"), el("dd", {}, fmt(w.late)),
    el("dt", {}, "p50 / p99"), el("dd", {}, `${fmt(w.latency_ms.p50, 1)} / ${fmt(w.latency_ms.p99, 1)} ms`));
  return counters;
}

let lastPoll = null;
async function pollStatus() {
  try {
    const response = await fetch("/v1/streaming/status", { cache: "no-store" });
    if (!response.ok) throw new Error(`status ${response.status}`);
    const status = await response.json();
    const now = performance.now();
    const dt = lastPoll === null ? 0 : (now - lastPoll) / 1000;
    previous = Object.assign(previous || {}, renderStatus(status, dt));
    lastPoll = now;
    $("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
    $("updated").classList.remove("error");
  } catch (err) {
    $("updated").textContent = `status unavailable: ${err.message}`;
    $("updated").classList.add("error");
  }
}

// One uPlot data table per Greek: a shared time axis (the buckets), one column per group.
function tables(series, groupBy) {
  const times = new Set();
  const groups = new Map();   // label -> Map(t -> {greek: value})
  for (const s of series) {
    const label = groupBy === "broker" ? `${s.broker} · ${s.underlying}` : s.underlying;
    if (!groups.has(label)) groups.set(label, new Map());
    const byTime = groups.get(label);
    for (const p of s.points) {
      const t = Date.parse(p.t) / 1000;
      times.add(t);
      const sum = byTime.get(t) || { contracts: 0, missing: 0 };
      for (const g of GREEKS) {
        if (p[g] !== null) sum[g] = (sum[g] || 0) + p[g];
      }
      sum.contracts += p.contracts;
      sum.missing += p.missing;
      byTime.set(t, sum);
    }
  }
  const xs = [...times].sort((a, b) => a - b);
  const labels = [...groups.keys()].sort();
  const out = {};
  for (const g of GREEKS) {
    out[g] = [xs, ...labels.map((label) => xs.map((t) => {
      const v = groups.get(label).get(t);
      return v && g in v ? v[g] : null;
    }))];
  }
  // per label, per x: {contracts, missing} (null before the group's first point)
  const info = labels.map((label) => xs.map((t) => groups.get(label).get(t) || null));
  return { labels, data: out, info };
}

// The hover tooltip: each group's value at the cursor, with how many contracts it sums
// and how many of them had no fresh Greeks (the timeline's `missing`).
function showTooltip(u, greek) {
  const holder = u.root.parentNode;
  const tip = holder.querySelector(".tooltip");
  const idx = u.cursor.idx;
  const info = charts[greek] && charts[greek].info;
  if (idx === null || idx === undefined || !info) { tip.hidden = true; return; }
  const lines = [el("div", { class: "when" }, new Date(u.data[0][idx] * 1000).toLocaleTimeString())];
  u.series.slice(1).forEach((s, i) => {
    const at = info[i] && info[i][idx];
    if (!at) return;
    const value = u.data[i + 1][idx];
    lines.push(el("div", { class: at.missing > 0 ? "line missing" : "line" },
      `${s.label}: ${fmt(value, 3)} · ${at.contracts} contracts · ${at.missing} missing Greeks`));
  });
  tip.replaceChildren(...lines);
  tip.hidden = false;
  const over = u.over.getBoundingClientRect();
  const host = holder.getBoundingClientRect();
  const left = over.left - host.left + u.cursor.left + 14;
  tip.style.left = `${Math.max(0, Math.min(left, host.width - tip.offsetWidth))}px`;
  tip.style.top = `${over.top - host.top + u.cursor.top + 14}px`;
}

function chartWidth() {
  const container = $("charts");
  const columns = container.clientWidth >= 2 * 460 + 16 ? 2 : 1;
  return Math.max(320, (container.clientWidth - (columns - 1) * 16) / columns - 30);
}

function ensureChart(greek, labels, groupBy) {
  const existing = charts[greek];
  const key = `${groupBy}:${labels.join("|")}`;
  if (existing && existing.key === key) return existing.plot;
  let holder = document.querySelector(`.chart[data-greek="${greek}"]`);
  if (!holder) {
    holder = el("div", { class: "panel chart", "data-greek": greek, "data-points": "0" });
    $("charts").append(holder);
  }
  holder.replaceChildren(el("div", { class: "tooltip", hidden: "" }));
  if (existing) existing.plot.destroy();
  const opts = {
    title: `Position-weighted ${greek}` + (groupBy === "underlying" ? " · all brokers and accounts" : ""),
    width: chartWidth(),
    height: 220,
    scales: { x: { time: true } },
    axes: [
      { stroke: "#8a96a8", grid: { stroke: "#263040" }, ticks: { stroke: "#263040" } },
      { stroke: "#8a96a8", grid: { stroke: "#263040" }, ticks: { stroke: "#263040" }, size: 70 },
    ],
    series: [{}, ...labels.map((label, i) => ({
      label, stroke: COLORS[i % COLORS.length], width: 1.5, spanGaps: false,
    }))],
    hooks: { setCursor: [(u) => showTooltip(u, greek)] },
  };
  const plot = new uPlot(opts, [[], ...labels.map(() => [])], holder);
  charts[greek] = { plot, key, info: null };
  return plot;
}

async function pollRisk() {
  const [span, bucket] = $("window").value.split(",");
  const start = new Date(Date.now() - Number(span) * 1000).toISOString();
  try {
    const response = await fetch(
      `/v1/risk/timeline?bucket=${bucket}&start=${encodeURIComponent(start)}`, { cache: "no-store" });
    if (!response.ok) throw new Error(`risk ${response.status}`);
    const body = await response.json();
    const groupBy = $("group").value;
    const { labels, data, info } = tables(body.series, groupBy);
    for (const g of GREEKS) {
      const plot = ensureChart(g, labels, groupBy);
      charts[g].info = info;
      plot.setData(data[g]);
      const points = data[g].slice(1).reduce(
        (n, column) => n + column.filter((v) => v !== null).length, 0);
      document.querySelector(`.chart[data-greek="${g}"]`).dataset.points = String(points);
    }
  } catch (err) {
    $("updated").textContent = `risk timeline unavailable: ${err.message}`;
    $("updated").classList.add("error");
  }
}

// Coverage (GET /v1/coverage): one bar per source, fresh/stale/never/delayed in proportion
// with their numbers, and the stale and never contracts in a table. A server without the
// endpoint (404) or failing it shows "coverage unavailable"; the rest of the page goes on.
function coverageBar(name, summary) {
  const total = summary.subscribed;
  const segments = COVERAGE_STATES.filter((state) => summary[state] > 0).map((state) =>
    el("span", { class: `segment ${state}`, title: `${state} ${summary[state]}`,
                 style: `width: ${(100 * summary[state]) / total}%` }));
  const counts = COVERAGE_STATES.map((state) =>
    el("span", { class: `count ${state}` }, `${state} ${fmt(summary[state])}`));
  const attrs = { class: "coverage", "data-broker": name, "data-subscribed": String(total) };
  for (const state of COVERAGE_STATES) attrs[`data-${state}`] = String(summary[state]);
  return el("div", attrs,
    el("div", { class: "coverage-head" }, el("strong", {}, name),
      el("span", { class: "dim" }, `${fmt(total)} subscribed`)),
    el("div", { class: "bar" }, ...segments),
    el("div", { class: "counts" }, ...counts));
}

function staleTable(contracts) {
  const listed = contracts.filter((c) => TABLE_STATES.has(c.state));
  if (listed.length === 0) return el("p", { class: "dim", id: "stale-none" }, "no stale or never-received contracts");
  const head = el("tr", {}, ...["broker", "account", "contract", "state", "last Greeks",
                                "last price", "data"].map((h) => el("th", {}, h)));
  const rows = listed.slice(0, TABLE_MAX).map((c) =>
    el("tr", { "data-state": c.state, "data-broker": c.broker },
      el("td", {}, c.broker), el("td", {}, c.account_id), el("td", {}, c.contract_key),
      el("td", {}, el("span", { class: `state ${c.state}` }, c.state)),
      el("td", {}, ago(c.last_greeks_at)), el("td", {}, ago(c.last_price_at)),
      el("td", {}, c.market_data || "–")));
  const table = el("table", { id: "stale" }, el("thead", {}, head), el("tbody", {}, ...rows));
  if (listed.length <= TABLE_MAX) return table;
  const more = el("p", { class: "dim" }, `… and ${listed.length - TABLE_MAX} more`);
  return el("div", {}, table, more);
}

async function pollCoverage() {
  const panel = $("coverage");
  try {
    const response = await fetch("/v1/coverage", { cache: "no-store" });
    if (!response.ok) throw new Error(response.status === 404 ? "not on this server" : `status ${response.status}`);
    const body = await response.json();
    const bars = Object.entries(body.sources).sort(([a], [b]) => a.localeCompare(b))
      .map(([name, summary]) => coverageBar(name, summary));
    const after = body.stale_s > 0 ? `stale after ${fmt(body.stale_s)} s without Greeks` : "staleness off";
    panel.dataset.state = "ok";
    panel.replaceChildren(el("h2", {}, "Coverage · Greeks per subscribed contract"),
      el("p", { class: "dim" }, after), ...bars, staleTable(body.contracts));
  } catch (err) {
    panel.dataset.state = "unavailable";
    panel.replaceChildren(el("h2", {}, "Coverage · Greeks per subscribed contract"),
      el("p", { class: "error", id: "coverage-unavailable" }, `coverage unavailable (${err.message})`));
  }
}

window.addEventListener("resize", () => {
  for (const { plot } of Object.values(charts)) plot.setSize({ width: chartWidth(), height: 220 });
});
$("window").addEventListener("change", pollRisk);
$("group").addEventListener("change", pollRisk);

pollStatus();
pollCoverage();
pollRisk();
setInterval(pollStatus, 1000);
setInterval(pollCoverage, 2000);
setInterval(pollRisk, 2000);

// The tally dashboard: reads the API with the session cookie (same origin, GET only) and draws with
// uPlot (vendored under /static/vendor). The view (domain, range, granularity, zone, charted metric,
// filters) lives in the URL: every change is a history entry, so a URL is a bookmark and Back undoes.
// An ES module (dashboard-lib.js: helpers; dashboard-panels.js: the breakdown panels).
// `window.tally` exposes the state (what each part asked the API for, and what it showed) for tests.
import {$, METRICS, dateToWall, errorText, fmtClock, fmtTime, fmtValue, getJSON, keyLabel, num, optional, query,
  validFilter, validZone, wallToDate, wholeHours, withFilter, DIMENSION_NAMES} from "./dashboard-lib.js";
import {breakdownPanels} from "./dashboard-panels.js";

const RANGES = {"1h": 3600, "24h": 86400, "7d": 7 * 86400, "30d": 30 * 86400, "90d": 90 * 86400};
const DEFAULT_GRANULARITY = {"1h": "15m", "24h": "1h", "7d": "1h", "30d": "1d", "90d": "1d", "custom": "1h"};
const STEP_S = {"15m": 900, "1h": 3600, "1d": 86400};
const MAX_BUCKETS = 5000;  // oltp/queries.py MAX_BUCKETS
const REFRESH_MS = 60000;
const LIVE_MS = 15000;  // the "last 30 minutes" card
const QUARTER_MS = 900e3;
const SUMMARY_PERIODS = ["1h", "24h", "7d"];  // the summary endpoint's periods (it has the previous one too)
const COUNT_INCRS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1e3, 2e3, 5e3, 1e4, 2e4, 5e4, 1e5, 2e5, 5e5, 1e6, 1e7, 1e8];
const BROWSER_TZ = Intl.DateTimeFormat().resolvedOptions().timeZone || "UTC";

const state = {
  role: document.body.dataset.role, domains: [], collectorUrl: "", domain: "", site: null,
  tz: "UTC", params: null, view: null, series: {}, cards: {}, chart: null, chartMetric: "", panels: {},
  live: null, liveLoads: 0, liveTicks: [], loads: 0, controller: null, error: "", errorStatus: 0,
};
window.tally = state;
const breakdowns = breakdownPanels({state, navigate, domainPath, filterPairs, viewJSON});

// ------------------------------------------------------------------ helpers
function setState(name) { document.body.dataset.state = name; }

function showError(message) {
  state.error = message;
  $("error").textContent = message;
}

// What a view asks the API (cards, chart, panels): a new view aborts what the last one still has queued, so
// quick changes (Back, Back, Back) do not pile up requests the browser still has to send.
function viewJSON(url) { return getJSON(url, state.controller.signal); }

function newLoad() {
  if (state.controller) state.controller.abort();
  state.controller = new AbortController();
  return ++state.loads;
}

function domainPath(rest) { return `/api/v1/domains/${encodeURIComponent(state.domain)}/${rest}`; }

function filterPairs() { return state.view.filters.map(([d, k]) => ["filter", `${d}:${k}`]); }

function currentTz() {
  return state.view.tz || (state.site && state.site.tz) || "UTC";
}

// ------------------------------------------------------------------ the view and the URL
function viewFromUrl() {
  const q = new URLSearchParams(location.search);
  const known = (table, name) => (Object.hasOwn(table, q.get(name) || "") ? q.get(name) : null);
  const range = known(DEFAULT_GRANULARITY, "range") || "24h";
  const granularity = known(STEP_S, "granularity") || DEFAULT_GRANULARITY[range];
  const metric = known(METRICS, "metric") || "visitors";
  let filters = [];
  for (const f of q.getAll("filter")) {
    const parsed = validFilter(f);
    if (parsed) filters = withFilter(filters, ...parsed);
  }
  const wall = (name) => (/^\d{4}-\d\d-\d\dT\d\d:\d\d$/.test(q.get(name) || "") ? q.get(name) : "");
  return {domain: (q.get("domain") || "").trim(), range, granularity, tz: (q.get("tz") || "").trim(),
          from: range === "custom" ? wall("from") : "", to: range === "custom" ? wall("to") : "", metric, filters};
}

function urlOfView() {
  const v = state.view;
  return `${location.pathname}?` + query([
    ["domain", state.domain], ["range", v.range], ["from", v.from], ["to", v.to], ["granularity", v.granularity],
    ["tz", v.tz], ["metric", v.metric === "visitors" ? "" : v.metric], ...filterPairs()]);
}

// Record the view in the URL: a new history entry for a user's change, in place otherwise.
function commitView(push) {
  const url = urlOfView();
  if (url === location.pathname + location.search) return;
  history[push ? "pushState" : "replaceState"](null, "", url);
}

// Change the view (a user's action): a history entry, then load.
function navigate(change) {
  Object.assign(state.view, change);
  commitView(true);
  showView();
  load();
}

// The controls, chips and pressed card from state.view.
function showView() {
  const v = state.view;
  $("range").value = v.range;
  $("custom-range").hidden = v.range !== "custom";
  $("from").value = v.from;
  $("to").value = v.to;
  $("granularity").value = v.granularity;
  // The zone picker's mode: as the user picked it, else what the URL's zone is (a link names a zone).
  const derived = !v.tz ? "site" : v.tz === BROWSER_TZ ? "browser" : "other";
  const mode = v.tzMode && (v.tzMode === "site") === !v.tz ? v.tzMode : derived;
  $("tzmode").value = mode;
  $("tz-other").hidden = mode !== "other";
  if (mode === "other") $("tz").value = v.tz;
  for (const card of document.querySelectorAll(".card[data-metric]")) {
    card.setAttribute("aria-pressed", String(card.dataset.metric === v.metric));
  }
  showChips();
}

function showChips() {
  const nav = $("filters");
  const chips = state.view.filters.map(([dimension, key]) => {
    const chip = document.createElement("span");
    chip.className = "chip";
    chip.dataset.filter = `${dimension}:${key}`;
    const text = document.createElement("span");
    text.className = "chip-text";
    text.textContent = `${DIMENSION_NAMES[dimension]} is ${keyLabel(dimension, key)}`;
    text.title = `${dimension}:${key}`;
    const remove = document.createElement("button");
    remove.type = "button";
    remove.className = "chip-remove";
    remove.setAttribute("aria-label", `remove filter ${dimension}:${key}`);
    remove.textContent = "×";
    remove.addEventListener("click", () => navigate({filters: withFilter(state.view.filters, dimension, null)}));
    chip.append(text, remove);
    return chip;
  });
  if (chips.length > 1) {
    const clear = document.createElement("button");
    clear.type = "button";
    clear.className = "chip-clear";
    clear.textContent = "Clear filters";
    clear.addEventListener("click", () => navigate({filters: []}));
    chips.push(clear);
  }
  nav.replaceChildren(...chips);
  nav.hidden = chips.length === 0;
}

// ------------------------------------------------------------------ ranges
function rangeBounds(tz) {
  const v = state.view;
  if (v.range === "custom") {
    if (!v.from || !v.to) throw new Error("pick a start and an end for the custom range");
    return [wallToDate(v.from, tz), wallToDate(v.to, tz)];
  }
  const to = new Date();
  return [new Date(to.getTime() - RANGES[v.range] * 1000), to];
}

// Granularities that would exceed the API's bucket limit for this range are disabled, and quarter hours
// under two or more filters (combinations are kept per hour and per day).
function fitGranularity(seconds) {
  const select = $("granularity");
  const combined = state.view.filters.length > 1;
  for (const opt of select.options) {
    opt.disabled = seconds / STEP_S[opt.value] > MAX_BUCKETS || (combined && opt.value === "15m");
  }
  if (select.selectedOptions[0].disabled) {
    select.value = [...select.options].find((o) => !o.disabled).value;
    state.view.granularity = select.value;
    commitView(false);
  }
}

function seriesUrl(metric, params, extra = []) {
  return domainPath(`${metric}?`) + query([["from", params.from], ["to", params.to],
    ["granularity", params.granularity], ["tz", params.tz], ...extra, ...filterPairs()]);
}

// ------------------------------------------------------------------ cards
function clearData() {
  for (const id of ["total-visitors", "total-impressions", "total-pageviews", "value-sum", "value-p95"]) {
    $(id).textContent = "–";
    delete $(id).dataset.value;
  }
  for (const m of Object.keys(METRICS)) { $(`delta-${m}`).textContent = ""; $(`delta-${m}`).className = "delta"; }
  if (state.chart) { state.chart.destroy(); state.chart = null; }
  $("chart").replaceChildren();
  $("caption").textContent = "";
  state.series = {};
  state.cards = {};
  state.panels = {};
  for (const body of document.querySelectorAll(".tab-body")) body.replaceChildren();
  for (const panel of document.querySelectorAll(".panel.breakdown")) panel.dataset.status = "idle";
  $("empty").hidden = true;
  $("empty-origins").textContent = ""; // the next domain's status fills it
  for (const id of ["csv-impressions", "csv-pageviews"]) $(id).href = "#";
  document.querySelector(".downloads").hidden = true;
}

function setCard(id, value, text) {
  $(id).textContent = text === undefined ? num.format(value) : text;
  $(id).dataset.value = String(value);
}

function changeText(cur, prev) {
  if (cur == null) return ["", ""];
  if (prev == null) return ["none the period before", ""];
  if (prev === 0) return [cur === 0 ? "no change" : "none the period before", ""];
  const pct = Math.round((cur - prev) / prev * 1000) / 10;
  return [`${pct > 0 ? "+" : ""}${pct}% vs ${fmtValue(prev)}`, pct > 0 ? "up" : pct < 0 ? "down" : ""];
}

function showDelta(metric, cur, prev, note) {
  const el = $(`delta-${metric}`);
  const [text, trend] = note ? [note, ""] : changeText(cur, prev);
  el.textContent = text;
  el.className = "delta" + (trend ? ` ${trend}` : "");
}

// The period of the same length just before [from, to).
function previousParams(params) {
  const from = Date.parse(params.from), to = Date.parse(params.to);
  return {...params, from: new Date(from - (to - from)).toISOString(), to: new Date(from).toISOString()};
}

// The visitors endpoint keeps hours and days: 15-minute views ask it for hours.
function visitorParams(params) {
  return params.granularity === "15m" ? {...params, granularity: "1h"} : params;
}

// The p95 of every value in a period from the two per-type series: the API keeps value bins per type,
// so the combined p95 is one type's when only that type carried values (the tag puts values on
// impressions); undefined when both did (the summary answers that for its periods).
function p95OfSeries(imp, pv) {
  const valued = [imp, pv].filter((s) => s.valued > 0);
  if (valued.length === 0) return null;
  if (valued.length === 2) return undefined;
  const p = valued[0].percentiles;
  return p && p.p95 != null ? Number(p.p95) : null;
}

function sumValues(imp, pv) { return Number(imp.value_sum) + Number(pv.value_sum); }

// Cards for the summary's periods (1h, 24h, 7d): one answer with the previous period, visitors merged
// over it, and the p95 of both types; the previous p95 from the series of the previous period.
async function summaryCards(range) {
  const url = domainPath("summary?") + query([["last", range], ["percentiles", "95"], ...filterPairs()]);
  const s = await viewJSON(url);
  const imp = s.metrics.impressions, pv = s.metrics.pageviews;
  const filtered = state.view.filters.length;
  const cards = {
    visitors: [s.visitors, s.previous_visitors, filtered > 1 ? "not kept for combined filters" : ""],
    pageviews: [pv.total, pv.previous_total], impressions: [imp.total, imp.previous_total],
    value: [sumValues(imp, pv), Number(imp.previous_value_sum) + Number(pv.previous_value_sum)],
    p95: [s.percentiles ? s.percentiles.p95 : null, null, filtered ? "not kept under a filter" : ""],
  };
  const urls = {summary: url};
  if (!state.view.filters.length && cards.p95[0] !== null) {  // a change only where there is a p95 now
    const prev = {from: s.previous_from, to: s.previous_to, granularity: "15m", tz: "UTC"};
    urls.previousP95 = ["impressions", "pageviews"].map((m) => seriesUrl(m, prev, [["percentiles", "95"]]));
    const [i, p] = await Promise.all(urls.previousP95.map(viewJSON));
    cards.p95[1] = p95OfSeries(i, p);
  }
  return {cards, urls, period: [s.from, s.to]};
}

// Visitors over a range: the visitors series' total (sketches merged over the range); under one filter the
// breakdown's row of that value (per-value sketches are daily: the site's local days covering the range);
// null under two or more (not kept per combination).
async function visitorsOver(params) {
  const filters = state.view.filters;
  if (filters.length > 1) return {value: null, url: null};
  if (!filters.length) {
    const url = seriesUrl("visitors", visitorParams(params));
    return {value: (await viewJSON(url)).total, url};
  }
  const [dimension] = filters[0];
  const url = domainPath("breakdown?") + query([["dimension", dimension], ["metric", "visitors"],
    ["from", params.from], ["to", params.to], ["tz", params.tz], ["limit", 1], ...filterPairs()]);
  const b = await viewJSON(url);
  return {value: b.rows[0] ? b.rows[0].count : 0, url};
}

// Cards for other ranges: the series totals of the range and of the one before, visitors by day.
async function rangeCards(cur, before, params, prev) {
  const [v, vPrev] = await Promise.all([visitorsOver(params), visitorsOver(prev)]);
  const note = state.view.filters.length > 1 ? "not kept for combined filters" : "";
  const cards = {
    visitors: [v.value, vPrev.value, note],
    pageviews: [cur[1].total, before[1].total], impressions: [cur[0].total, before[0].total],
    value: [sumValues(...cur), sumValues(...before)],
    p95: [p95OfSeries(...cur), p95OfSeries(...before),
          state.view.filters.length ? "not kept under a filter" : undefined],
  };
  return {cards, urls: {visitors: [v.url, vPrev.url]}, period: [params.from, params.to]};
}

function showCard(metric, [cur, prev, note]) {
  const id = {visitors: "total-visitors", pageviews: "total-pageviews", impressions: "total-impressions",
              value: "value-sum", p95: "value-p95"}[metric];
  const known = cur !== null && cur !== undefined;
  const text = !known ? "–" : metric === "value" || metric === "p95" ? fmtValue(cur) : num.format(cur);
  setCard(id, known ? cur : "", text);
  if (!known) { showDelta(metric, null, null, note || (cur === undefined ? "values on both types" : "")); return; }
  showDelta(metric, cur, prev, prev === undefined ? "before: values on both types" : undefined);
}

function showCards(found) {
  for (const [metric, figures] of Object.entries(found.cards)) showCard(metric, figures);
  state.cards = {...found.cards, urls: found.urls, period: found.period};
}

// ------------------------------------------------------------------ the chart
function bucketP95(i, imp, pv) {
  const a = imp.buckets[i], b = pv.buckets[i];
  if (a.valued > 0 && b.valued > 0) return null;  // both types: not derivable from per-type bins
  const p = (a.valued > 0 ? a : b).percentiles;
  return p && p.p95 != null ? Number(p.p95) : null;
}

// What the chart draws for `metric`: {series (the answer whose buckets give x), y, fmt}.
function chartData(metric, imp, pv, visitors) {
  if (metric === "pageviews" || metric === "impressions") {
    const s = metric === "pageviews" ? pv : imp;
    return {series: s, y: s.buckets.map((b) => b.count), fmt: (v) => num.format(v), integer: true};
  }
  if (metric === "value") {
    return {series: imp, y: imp.buckets.map((b, i) => Number(b.value_sum) + Number(pv.buckets[i].value_sum)),
            fmt: fmtValue};
  }
  if (metric === "p95") return {series: imp, y: imp.buckets.map((b, i) => bucketP95(i, imp, pv)), fmt: fmtValue};
  return {series: visitors, y: visitors.buckets.map((b) => b.count), fmt: (v) => num.format(v), integer: true};
}

function chartSize() {
  const el = $("chart");
  const phone = window.innerWidth < 640;
  return {width: Math.max(200, el.clientWidth), height: phone ? 190 : 200};
}

// Counts are bars over their bucket (a bar starts where its bucket starts), never lines between buckets.
function draw(metric, data, tz) {
  const x = data.series.buckets.map((b) => Date.parse(b.start) / 1000);
  const last = data.series.buckets[data.series.buckets.length - 1];
  const end = last ? Date.parse(last.end || last.start) / 1000 : 0;
  const info = METRICS[metric];
  const floorIdx = (u, sidx, closest, xv) => {  // the bucket under the cursor, not the nearest start
    let i = closest;
    while (i > 0 && x[i] > xv) i--;
    return i;
  };
  const opts = {
    ...chartSize(),
    tzDate: (ts) => uPlot.tzDate(new Date(ts * 1e3), tz),
    scales: {x: {time: true, range: () => [x[0], Math.max(end, x[0] + 1)]},
             y: {range: (u, lo, hi) => [0, Math.max(1, hi || 0)]}},
    series: [
      {label: "bucket", value: (u, v) => (v == null ? "–" : fmtTime(v, tz))},
      {label: info.label, stroke: info.color, fill: info.color + "b3", width: 0,
       paths: uPlot.paths.bars({size: [0.86, Infinity], align: 1}), points: {show: false},
       value: (u, v) => (v == null ? "–" : data.fmt(v))},
    ],
    axes: [{}, {size: 52, incrs: data.integer ? COUNT_INCRS : undefined}],
    legend: {live: true},
    cursor: {dataIdx: floorIdx, points: {show: false}},
  };
  if (state.chart) state.chart.destroy();
  $("chart").replaceChildren();
  state.chart = new uPlot(opts, [x, data.y], $("chart"));
  state.chartMetric = metric;
}

// Visitors per bucket (hours or days) when the chart shows visitors; {ok, body | error, url}.
async function chartVisitors(params) {
  if (state.view.metric !== "visitors") return null;
  const filters = state.view.filters;
  const siteDays = params.granularity === "1d" && params.tz === ((state.site && state.site.tz) || "UTC");
  const hours = wholeHours(params.tz, Date.parse(params.from), Date.parse(params.to));
  const why = filters.length > 1 ? "not kept for combined filters"  // what the API refuses is not asked
    : filters.length === 1 && !siteDays ? "under a filter they are kept per day in the site's zone"
      : !siteDays && !hours ? `kept per UTC hour, and hours in ${params.tz} are not whole UTC hours` : "";
  if (why) return {ok: false, error: new Error(`visitors per bucket: ${why}`), url: null};
  const url = seriesUrl("visitors", visitorParams(params));
  return {...await optional(viewJSON(url)), url};
}

function showChart(imp, pv, visitors, tz) {
  let metric = state.view.metric;
  let note = "";
  let url = metric === "pageviews" ? state.series.urls.pageviews : state.series.urls.impressions;
  if (metric === "visitors" && !visitors.ok) {
    note = ` Visitors cannot be charted here (${errorText(visitors.error)}): page views instead.`;
    metric = "pageviews";
    url = state.series.urls.pageviews;
  } else if (metric === "visitors") {
    url = visitors.url;
    if (state.params.granularity === "15m") note = " Visitors are counted per hour: the chart shows hours.";
  } else if (metric === "p95") {
    note = state.view.filters.length ? " Percentiles are not kept under a filter."
      : " Value p95 per bucket (of the event type that carried values; empty where none did, or both did).";
  }
  const data = chartData(metric, imp, pv, visitors && visitors.body);
  draw(metric, data, tz);
  const s = data.series;
  state.series.chart = {metric, url, y: data.y};
  $("caption").textContent = `${state.domain}: ${METRICS[metric].label}, ${s.buckets.length} buckets of ` +
    `${s.granularity} in ${tz}, ${fmtTime(Date.parse(s.from) / 1000, tz)} to ` +
    `${fmtTime(Date.parse(s.to) / 1000, tz)}.${note}`;
}

window.addEventListener("resize", () => {
  if (state.chart) state.chart.setSize(chartSize());
});

// ------------------------------------------------------------------ breakdown panels
// ------------------------------------------------------------------ the whole view
function showEmptyState() {
  const site = state.site;
  const noEvents = !site || !site.has_events;
  $("empty").hidden = !noEvents;
  if (!noEvents) return;
  $("empty-domain").textContent = state.domain;
  $("empty-domain-2").textContent = state.domain;
  const registered = Boolean(site && site.registered);
  $("empty-registered").hidden = !registered;
  $("empty-unregistered").hidden = registered;
  if (registered) {
    $("tag").textContent = site.tag;
    $("collector").textContent = state.collectorUrl;
    $("site-key").textContent = site.site_key;
  }
}



// An unregistered domain has no numbers to show: only how to register it (the rest is hidden by CSS).
function showUnregistered() {
  document.body.dataset.registered = "false";
  showEmptyState();
  setState("ready");
}

function loadFailed(e) {
  newLoad();  // what is still in flight for this view (the panels) is dropped
  clearData();
  if (e.code === "unknown_domain") {  // a domain nobody registered yet: how to register it
    showError("");
    state.errorStatus = e.status;
    state.site = {registered: false, has_events: false};
    showUnregistered();
    return;
  }
  showError(e.status ? `${e.status}: ${e.message}` : `request failed: ${e.message}`);
  state.errorStatus = e.status || 0;
  setState("error");
}

// The range, its granularity and zone as the API takes them; null (and the error shown) when invalid.
function rangeParams() {
  const tz = currentTz();
  if (!validZone(tz)) { clearData(); showError(`unknown time zone ${JSON.stringify(tz)}`); setState("error"); return null; }
  let from, to;
  try { [from, to] = rangeBounds(tz); } catch (e) { showError(e.message); setState("error"); return null; }
  fitGranularity((to - from) / 1000);
  return {from: from.toISOString(), to: to.toISOString(), granularity: state.view.granularity, tz};
}

async function load() {
  if (!state.domain) { setState("ready"); return; }
  if (state.site && !state.site.registered) {  // nothing to ask: how to register it
    newLoad();
    clearData();
    showError("");
    showUnregistered();
    return;
  }
  document.body.dataset.registered = "true";
  const params = rangeParams();
  if (!params) return;
  const prev = previousParams(params);
  setState("loading");
  const seq = newLoad();
  const pct = [["percentiles", "95"]];
  const urls = {impressions: seriesUrl("impressions", params, pct), pageviews: seriesUrl("pageviews", params, pct)};
  const before = [seriesUrl("impressions", prev, pct), seriesUrl("pageviews", prev, pct)];
  const panels = breakdowns.load(params, seq);
  let cur, old, cards, visitors;
  try {
    [cur, old, visitors] = await Promise.all([Promise.all([viewJSON(urls.impressions), viewJSON(urls.pageviews)]),
      Promise.all(before.map(viewJSON)), chartVisitors(params)]);
    cards = SUMMARY_PERIODS.includes(state.view.range) ? await summaryCards(state.view.range)
      : await rangeCards(cur, old, params, prev);
  } catch (e) {
    if (seq === state.loads) loadFailed(e);
    return;
  }
  if (seq !== state.loads) return;  // a newer load started meanwhile
  showError("");
  state.errorStatus = 0;
  state.tz = params.tz;
  state.params = params;
  state.series = {impressions: cur[0], pageviews: cur[1], urls: {...urls, previous: before}};
  showCards(cards);
  $("csv-impressions").href = seriesUrl("impressions", params, [["format", "csv"]]);
  $("csv-pageviews").href = seriesUrl("pageviews", params, [["format", "csv"]]);
  document.querySelector(".downloads").hidden = false;
  showEmptyState();
  showChart(cur[0], cur[1], visitors, params.tz);
  await panels;
  if (seq !== state.loads) return;
  setState("ready");
  loadLive().catch(() => {});
  loadStatus(state.domain, params.tz).catch(() => {});
}

// ------------------------------------------------------------------ the live card
// Page views in the last two whole quarter hours and the one still filling (the 15-minute tier), with
// the dashboard's filters; refreshed every LIVE_MS.
async function loadLive() {
  if (!state.domain || !state.view || document.body.dataset.registered === "false") return;
  const now = Date.now();
  const from = new Date(Math.floor(now / QUARTER_MS) * QUARTER_MS - 2 * QUARTER_MS);
  const params = {from: from.toISOString(), to: new Date(now).toISOString(), granularity: "15m", tz: "UTC"};
  const domain = state.domain;
  if (state.view.filters.length > 1) {  // combinations are kept per hour and day, not per quarter hour
    state.live = {urls: null, pageviews: null, at: now};
    setCard("live-pageviews", "", "–");
    $("live-caption").textContent = "combined filters are counted per hour: not live";
    return;
  }
  const urls = {pageviews: seriesUrl("pageviews", params), impressions: seriesUrl("impressions", params)};
  let pv, imp;
  try {
    [pv, imp] = await Promise.all([getJSON(urls.pageviews), getJSON(urls.impressions)]);
  } catch (e) {
    $("live-caption").textContent = `unavailable (${e.message})`;
    return;
  }
  if (domain !== state.domain) return;
  state.liveLoads += 1;
  state.live = {urls, pageviews: pv.total, impressions: imp.total, at: now};
  setCard("live-pageviews", pv.total);
  $("live-caption").textContent = `page views since ${fmtClock(from.getTime(), currentTz())}, ` +
    `${num.format(imp.total)} impressions`;
}

// ------------------------------------------------------------------ ingestion status
// The ingestion status panel: accepted, refused by reason, bots, late, last event, store freshness.
async function loadStatus(domain, tz) {
  const panel = $("ingestion-status");
  let s;
  try {
    s = await getJSON(`/api/v1/domains/${encodeURIComponent(domain)}/status`);
  } catch (e) {
    panel.dataset.status = "error";
    $("ingestion-facts").textContent = `ingestion status unavailable (${e.message})`;
    return;
  }
  if (domain !== state.domain) return;
  const h = s.periods["1h"], d = s.periods["24h"];
  const reasons = [...new Set([...Object.keys(h.refused), ...Object.keys(d.refused)])].sort();
  // The most recent offending value of a reason the owner fixes in the tag (a domain, a page origin).
  const value = (r) => (h.refused_values || {})[r] || (d.refused_values || {})[r];
  const label = (r) => `  refused: ${r.replaceAll("_", " ")}` + (value(r) ? ` (last: ${value(r)})` : "");
  const rows = [["accepted", h.accepted, d.accepted], ["refused", h.refused_total, d.refused_total],
                ...reasons.map((r) => [label(r), h.refused[r] || 0, d.refused[r] || 0]),
                ["bots", h.bots, d.bots], ["late", h.late, d.late]];
  const body = $("ingestion-table").tBodies[0];
  body.replaceChildren(...rows.map(([label, a, b]) => {
    const tr = document.createElement("tr");
    for (const [i, v] of [label, a, b].entries()) {
      const td = document.createElement(i ? "td" : "th");
      td.textContent = i ? num.format(v) : v;
      tr.appendChild(td);
    }
    return tr;
  }));
  const when = (t) => (t ? fmtTime(Date.parse(t) / 1000, tz) : "never");
  const f = s.freshness;  // null for a customer token: the stores' write times are every site's
  const stores = f.customer_store_written_at || f.analyst_store_written_at
    ? `; customer store written ${when(f.customer_store_written_at)}, analyst store written ` +
      when(f.analyst_store_written_at)
    : "";
  $("ingestion-facts").textContent = `last event ${when(s.last_event_at)}${stores}`;
  panel.dataset.status = d.accepted || d.refused_total ? "ok" : "quiet";
  showOrigins(domain, s.origins);
}

// The empty state names the page origins the collector accepts the tag from (textContent only).
function showOrigins(domain, origins) {
  const el = $("empty-origins");
  if (!origins) { el.textContent = ""; return; }
  el.textContent = origins.length
    ? `Pages on ${origins.join(", ")} may send; a page elsewhere (another host, localhost, staging) needs ` +
      `its origin added (tally sites update ${domain} --add-origin ORIGIN) and data-domain="${domain}" in its tag.`
    : `No page origin is registered: the collector refuses the tag on every page. Add one with ` +
      `tally sites update ${domain} --add-origin https://${domain}`;
}

// ------------------------------------------------------------------ start
function pickDomain(domain) {
  state.domain = domain;
  state.site = state.domains.find((d) => d.domain === domain) || null;
  $("tzmode").options[0].textContent = `site (${(state.site && state.site.tz) || "UTC"})`;
  $("domain").value = domain;
}

function bindControls() {
  $("range").addEventListener("change", () => {
    const range = $("range").value;
    const change = {range, granularity: DEFAULT_GRANULARITY[range], from: "", to: ""};
    if (range === "custom") {
      const tz = currentTz(), now = new Date();
      change.from = $("from").value || dateToWall(new Date(now - 7 * 86400e3), tz);
      change.to = $("to").value || dateToWall(now, tz);
    }
    navigate(change);
  });
  $("granularity").addEventListener("change", () => navigate({granularity: $("granularity").value}));
  for (const id of ["from", "to"]) $(id).addEventListener("change", () => navigate({[id]: $(id).value}));
  $("tzmode").addEventListener("change", () => {
    const mode = $("tzmode").value;
    $("tz-other").hidden = mode !== "other";
    if (mode === "site") navigate({tz: "", tzMode: mode});
    else if (mode === "browser") navigate({tz: BROWSER_TZ, tzMode: mode});
    else if ($("tz").value.trim()) navigate({tz: $("tz").value.trim(), tzMode: mode});
    else state.view.tzMode = mode;
  });
  $("tz").addEventListener("change", () => navigate({tz: $("tz").value.trim(), tzMode: "other"}));
  $("domain").addEventListener("change", () => {
    pickDomain($("domain").value);
    navigate({filters: []});
  });
  for (const card of document.querySelectorAll(".card[data-metric]")) {
    card.addEventListener("click", () => navigate({metric: card.dataset.metric}));
  }
  for (const tab of document.querySelectorAll("#panel-devices [role=tab]")) {
    tab.addEventListener("click", () => breakdowns.showTab(tab.dataset.tab));
  }
  window.addEventListener("popstate", () => {  // Back / Forward: the view the URL names
    const view = viewFromUrl();
    state.view = view;
    if (view.domain && view.domain !== state.domain) pickDomainFromUrl(view.domain);
    showView();
    load();
  });
}

function pickDomainFromUrl(wanted) {
  const names = state.domains.map((d) => d.domain);
  if (wanted && !names.includes(wanted.toLowerCase())) {  // the API decides (403 if not yours)
    if (![...$("domain").options].some((o) => o.value === wanted)) $("domain").appendChild(new Option(wanted, wanted));
    names.push(wanted);
  }
  const first = wanted ? (names.includes(wanted.toLowerCase()) ? wanted.toLowerCase() : wanted) : names[0];
  if (first) pickDomain(first);
  return first;
}

async function init() {
  state.view = viewFromUrl();
  bindControls();
  $("tzmode").options[1].textContent = `this browser (${BROWSER_TZ})`;
  if (Intl.supportedValuesOf) {
    $("zones").replaceChildren(...Intl.supportedValuesOf("timeZone").map((z) => new Option(z, z)));
  }
  let listing;
  try {
    listing = await getJSON("/api/v1/domains");
  } catch (e) {
    showError(`cannot list your domains: ${e.message}`);
    setState("error");
    return;
  }
  state.domains = listing.domains;
  state.collectorUrl = listing.collector_url;
  $("domain").replaceChildren(...state.domains.map((d) => new Option(d.domain, d.domain)));
  if (!pickDomainFromUrl(state.view.domain)) {
    showError("no domain yet: register a site with `tally sites add example.com` (admin)");
    setState("ready");
    return;
  }
  commitView(false);
  showView();
  await load();
  setInterval(() => {
    if (document.visibilityState === "visible" && state.view.range !== "custom") load();
  }, REFRESH_MS);
  setInterval(() => {
    state.liveTicks.push(Date.now());
    if (document.visibilityState === "visible") loadLive().catch(() => {});
  }, LIVE_MS);
}

init();

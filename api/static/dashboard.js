// The tally dashboard: reads the API with the session cookie (same origin, GET only) and draws with
// uPlot (vendored under /static/vendor). `window.tally` exposes the state for tests and debugging.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const RANGES = {"1h": 3600, "24h": 86400, "7d": 7 * 86400, "30d": 30 * 86400, "90d": 90 * 86400};
  const DEFAULT_GRANULARITY = {"1h": "15m", "24h": "1h", "7d": "1h", "30d": "1d", "90d": "1d", "custom": "1h"};
  const STEP_S = {"15m": 900, "1h": 3600, "1d": 86400};
  const MAX_BUCKETS = 5000;  // oltp/queries.py MAX_BUCKETS
  const REFRESH_MS = 60000;
  const BROWSER_TZ = Intl.DateTimeFormat().resolvedOptions().timeZone || "UTC";
  const num = new Intl.NumberFormat("en");

  const state = {
    role: document.body.dataset.role, domains: [], collectorUrl: "", domain: "", site: null,
    tz: "UTC", params: null, series: {}, summary: null, chart: null, loads: 0, error: "",
  };
  window.tally = state;

  function setState(name) { document.body.dataset.state = name; }

  function showError(message) {
    state.error = message;
    $("error").textContent = message;
  }

  async function getJSON(path) {
    const res = await fetch(path, {credentials: "same-origin", headers: {"Accept": "application/json"}});
    if (res.status === 401) {  // the session expired or its token was revoked
      location.assign(`/login?domain=${encodeURIComponent(state.domain)}`);
      throw new Error("not logged in");
    }
    const body = await res.json().catch(() => ({}));
    if (!res.ok) {
      const err = new Error((body.error && body.error.message) || `HTTP ${res.status}`);
      err.status = res.status;
      throw err;
    }
    return body;
  }

  function validZone(tz) {
    try { new Intl.DateTimeFormat("en", {timeZone: tz}); return true; } catch (e) { return false; }
  }

  function currentTz() {
    const mode = $("tzmode").value;
    if (mode === "browser") return BROWSER_TZ;
    if (mode === "other") return $("tz").value.trim() || "UTC";
    return (state.site && state.site.tz) || "UTC";
  }

  // Offset (ms) of `tz` at instant `ms`, and a wall-clock time "YYYY-MM-DDTHH:MM" in `tz` -> Date.
  function offsetAt(ms, tz) {
    const parts = new Intl.DateTimeFormat("en-US", {timeZone: tz, hourCycle: "h23", year: "numeric",
      month: "2-digit", day: "2-digit", hour: "2-digit", minute: "2-digit", second: "2-digit"}).formatToParts(new Date(ms));
    const get = (t) => Number(parts.find((p) => p.type === t).value);
    const asUtc = Date.UTC(get("year"), get("month") - 1, get("day"), get("hour"), get("minute"), get("second"));
    return asUtc - Math.floor(ms / 1000) * 1000;
  }
  function wallToDate(wall, tz) {
    const [d, t] = wall.split("T");
    const [Y, M, D] = d.split("-").map(Number);
    const [h, m] = (t || "00:00").split(":").map(Number);
    const guess = Date.UTC(Y, M - 1, D, h, m);
    let ms = guess - offsetAt(guess, tz);
    ms = guess - offsetAt(ms, tz);
    return new Date(ms);
  }
  function dateToWall(date, tz) {
    const p = new Intl.DateTimeFormat("sv-SE", {timeZone: tz, year: "numeric", month: "2-digit", day: "2-digit",
      hour: "2-digit", minute: "2-digit", hourCycle: "h23"}).format(date);
    return p.replace(" ", "T");
  }
  function fmtTime(sec, tz) {
    return new Intl.DateTimeFormat("sv-SE", {timeZone: tz, year: "numeric", month: "2-digit", day: "2-digit",
      hour: "2-digit", minute: "2-digit", hourCycle: "h23", timeZoneName: "short"}).format(new Date(sec * 1000));
  }

  function rangeBounds(tz) {
    const range = $("range").value;
    if (range === "custom") {
      if (!$("from").value || !$("to").value) throw new Error("pick a start and an end for the custom range");
      return [wallToDate($("from").value, tz), wallToDate($("to").value, tz)];
    }
    const to = new Date();
    return [new Date(to.getTime() - RANGES[range] * 1000), to];
  }

  // Granularities that would exceed the API's bucket limit for this range are disabled.
  function fitGranularity(seconds) {
    const select = $("granularity");
    for (const opt of select.options) opt.disabled = seconds / STEP_S[opt.value] > MAX_BUCKETS;
    if (select.selectedOptions[0].disabled) select.value = [...select.options].find((o) => !o.disabled).value;
  }

  function seriesUrl(metric, params, format) {
    const qs = new URLSearchParams(params);
    if (format) qs.set("format", format);
    return `/api/v1/domains/${encodeURIComponent(state.domain)}/${metric}?${qs}`;
  }

  function clearData() {
    for (const id of ["total-impressions", "total-pageviews", "value-sum", "value-avg"]) {
      $(id).textContent = "–";
      delete $(id).dataset.value;
    }
    for (const id of ["delta-impressions", "delta-pageviews", "valued"]) $(id).textContent = "";
    if (state.chart) { state.chart.destroy(); state.chart = null; }
    $("chart").replaceChildren();
    $("caption").textContent = "";
    state.series = {};
    state.summary = null;
    $("empty").hidden = true;
    $("empty-origins").textContent = ""; // the next domain's status fills it
    for (const id of ["csv-impressions", "csv-pageviews"]) $(id).href = "#";
    document.querySelector(".downloads").hidden = true;
  }

  function setCard(id, value, text) {
    $(id).textContent = text === undefined ? num.format(value) : text;
    $(id).dataset.value = String(value);
  }

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

  function draw(imp, pv, tz) {
    const x = imp.buckets.map((b) => Date.parse(b.start) / 1000);
    const yImp = imp.buckets.map((b) => b.count);
    const yPv = pv.buckets.map((b) => b.count);
    const yVal = imp.buckets.map((b, i) => Number(b.value_sum) + Number(pv.buckets[i].value_sum));
    const hasValues = imp.valued + pv.valued > 0;
    const el = $("chart");
    const opts = {
      width: Math.max(320, el.clientWidth - 48),
      height: 320,
      tzDate: (ts) => uPlot.tzDate(new Date(ts * 1e3), tz),
      scales: {x: {time: true}, y: {range: (u, lo, hi) => [0, Math.max(1, hi)]}},
      series: [
        {label: "bucket", value: (u, v) => (v == null ? "–" : fmtTime(v, tz))},
        {label: "impressions", stroke: "#3b6fd8", fill: "rgba(59,111,216,0.08)", width: 2,
         value: (u, v) => (v == null ? "–" : num.format(v))},
        {label: "page views", stroke: "#d8743b", width: 2, value: (u, v) => (v == null ? "–" : num.format(v))},
        {label: "value sum", stroke: "#2a9d5b", width: 1.5, dash: [4, 3], scale: "value", show: hasValues,
         value: (u, v) => (v == null ? "–" : v.toFixed(2))},
      ],
      axes: [
        {},
        {label: "events", size: 60},
        {scale: "value", side: 1, grid: {show: false}, label: "value", show: hasValues},
      ],
      legend: {live: true},
      cursor: {points: {size: 8}},
    };
    if (state.chart) state.chart.destroy();
    el.replaceChildren();
    state.chart = new uPlot(opts, [x, yImp, yPv, yVal], el);
  }

  async function load() {
    if (!state.domain) { setState("ready"); return; }
    const tz = currentTz();
    if (!validZone(tz)) { clearData(); showError(`unknown time zone ${JSON.stringify(tz)}`); setState("error"); return; }
    let from, to;
    try { [from, to] = rangeBounds(tz); } catch (e) { showError(e.message); setState("error"); return; }
    fitGranularity((to - from) / 1000);
    const params = {from: from.toISOString(), to: to.toISOString(), granularity: $("granularity").value, tz};
    const range = $("range").value;
    const last = ["1h", "24h", "7d"].includes(range) ? range : "24h";
    setState("loading");
    const seq = ++state.loads;
    let imp, pv, summary;
    try {
      [imp, pv, summary] = await Promise.all([
        getJSON(seriesUrl("impressions", params)), getJSON(seriesUrl("pageviews", params)),
        getJSON(`/api/v1/domains/${encodeURIComponent(state.domain)}/summary?last=${last}`)]);
    } catch (e) {
      if (seq !== state.loads) return;
      clearData();
      showError(e.status ? `${e.status}: ${e.message}` : `request failed: ${e.message}`);
      state.errorStatus = e.status || 0;
      setState("error");
      return;
    }
    if (seq !== state.loads) return;  // a newer load started meanwhile
    showError("");
    state.errorStatus = 0;
    state.tz = tz;
    state.params = params;
    state.series = {impressions: imp, pageviews: pv};
    state.summary = summary;
    setCard("total-impressions", imp.total);
    setCard("total-pageviews", pv.total);
    const valueSum = Number(imp.value_sum) + Number(pv.value_sum);
    const valued = imp.valued + pv.valued;
    setCard("value-sum", valueSum, valued ? valueSum.toFixed(2) : "–");
    setCard("value-avg", valued ? valueSum / valued : 0, valued ? (valueSum / valued).toFixed(2) : "–");
    $("valued").textContent = `${num.format(valued)} events with a value`;
    const label = {"1h": "hour", "24h": "24 hours", "7d": "7 days"}[last];
    for (const metric of ["impressions", "pageviews"]) {
      const m = summary.metrics[metric];
      const el = $(`delta-${metric}`);
      const before = m.change_pct == null ? `none in the ${label} before`
        : `${m.change_pct > 0 ? "+" : ""}${m.change_pct}% vs ${num.format(m.previous_total)} the ${label} before`;
      el.textContent = `last ${label}: ${num.format(m.total)} (${before})`;
      el.className = "delta" + (m.change_pct > 0 ? " up" : m.change_pct < 0 ? " down" : "");
    }
    $("csv-impressions").href = seriesUrl("impressions", params, "csv");
    $("csv-pageviews").href = seriesUrl("pageviews", params, "csv");
    document.querySelector(".downloads").hidden = false;
    showEmptyState();
    draw(imp, pv, tz);
    $("caption").textContent = `${state.domain}: ${imp.buckets.length} buckets of ${imp.granularity} in ${tz}, ` +
      `${fmtTime(Date.parse(imp.from) / 1000, tz)} to ${fmtTime(Date.parse(imp.to) / 1000, tz)}`;
    setState("ready");
    loadStatus(state.domain, tz).catch(() => {});
  }

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
    $("ingestion-facts").textContent = `last event ${when(s.last_event_at)}; customer store written ` +
      `${when(s.freshness.customer_store_written_at)}, analyst store written ${when(s.freshness.analyst_store_written_at)}`;
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

  function pickDomain(domain) {
    state.domain = domain;
    state.site = state.domains.find((d) => d.domain === domain) || null;
    $("tzmode").options[0].textContent = `site (${(state.site && state.site.tz) || "UTC"})`;
    const url = new URL(location.href);
    url.searchParams.set("domain", domain);
    history.replaceState(null, "", url);
  }

  async function init() {
    $("range").addEventListener("change", () => {
      const range = $("range").value;
      $("custom-range").hidden = range !== "custom";
      if (range === "custom" && !$("from").value) {
        const tz = currentTz(), now = new Date();
        $("from").value = dateToWall(new Date(now - 7 * 86400e3), tz);
        $("to").value = dateToWall(now, tz);
      }
      $("granularity").value = DEFAULT_GRANULARITY[range];
      load();
    });
    for (const id of ["granularity", "from", "to"]) $(id).addEventListener("change", load);
    $("tzmode").addEventListener("change", () => {
      $("tz-other").hidden = $("tzmode").value !== "other";
      if ($("tzmode").value !== "other" || $("tz").value.trim()) load();
    });
    $("tz").addEventListener("change", load);
    $("domain").addEventListener("change", () => { pickDomain($("domain").value); load(); });
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
    const wanted = new URLSearchParams(location.search).get("domain");
    const names = state.domains.map((d) => d.domain);
    if (wanted && !names.includes(wanted.toLowerCase())) names.push(wanted);  // the API decides (403 if not yours)
    $("domain").replaceChildren(...names.map((n) => new Option(n, n)));
    const first = wanted ? (names.includes(wanted.toLowerCase()) ? wanted.toLowerCase() : wanted) : names[0];
    if (!first) {
      showError("no domain yet: register a site with `tally sites add example.com` (admin)");
      setState("ready");
      return;
    }
    $("domain").value = first;
    pickDomain(first);
    await load();
    setInterval(() => {
      if (document.visibilityState === "visible" && $("range").value !== "custom") load();
    }, REFRESH_MS);
  }

  init();
})();

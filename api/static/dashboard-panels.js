// The breakdown panels: top pages, sources, countries, devices / browsers / OS, each from
// GET /api/v1/domains/<domain>/breakdown for the dashboard's range and filters. A click on a row adds that
// value as a filter (dashboard.js owns the view). A panel whose answer is an error says what is missing.
import {filterable, DIMENSIONS, DIMENSION_NAMES, METRICS, fmtTime, fmtValue, keyLabel, num, optional, query, withFilter}
  from "./dashboard-lib.js";

const PANEL_LIMIT = 10;

// `ctx` from dashboard.js: {state (view, loads, panels), navigate(change), domainPath(rest), filterPairs(),
// viewJSON(url) (getJSON, aborted when the view changes)}.
export function breakdownPanels(ctx) {
  const {state, navigate, domainPath, filterPairs, viewJSON} = ctx;

  // What a panel ranks by: the charted metric's (p95 ranks by value sum); visitors are kept per value of one
  // dimension, not per combination, so a panel filtered on another dimension ranks by page views.
  function panelMetric(dimension) {
    const metric = METRICS[state.view.metric].panel;
    return metric === "visitors" && state.view.filters.some(([d]) => d !== dimension) ? "pageviews" : metric;
  }

  const COLUMN = {visitors: "Visitors", pageviews: "Page views", impressions: "Impressions", value: "Value"};

  function breakdownUrl(dimension, params) {
    return domainPath("breakdown?") + query([["dimension", dimension], ["metric", panelMetric(dimension)],
      ["from", params.from], ["to", params.to], ["tz", params.tz], ["limit", PANEL_LIMIT], ...filterPairs()]);
  }

  function panelOf(dimension) { return document.querySelector(`.tab-body[data-dimension="${dimension}"]`); }

  function panelMessage(dimension, text) {
    const p = document.createElement("p");
    p.className = "fine panel-note";
    p.textContent = text;
    panelOf(dimension).replaceChildren(p);
  }

  function rowCount(row, metric) {
    return metric === "value" ? fmtValue(Number(row.count)) : num.format(row.count);
  }

  function panelRow(dimension, row, metric, top) {
    const tr = document.createElement("tr");
    tr.dataset.key = row.key;
    tr.style.setProperty("--share", `${top ? Math.max(0, Math.min(100, Number(row.count) / top * 100)) : 0}%`);
    const keyCell = document.createElement("td");
    const button = document.createElement("button");
    button.type = "button";
    button.className = "row-key";
    button.textContent = keyLabel(dimension, row.key, row.name);
    if (!filterable(row.key)) {  // the API reads ",<dimension>:" in `filter` as a separator
      button.disabled = true;
      button.title = `${row.key} (a value holding ",<dimension>:" cannot be a filter)`;
    } else {
      button.title = `filter by ${dimension}: ${button.textContent}`;
      button.addEventListener("click", () => navigate({filters: withFilter(state.view.filters, dimension, row.key)}));
    }
    keyCell.appendChild(button);
    const countCell = document.createElement("td");
    countCell.className = "n";
    countCell.textContent = rowCount(row, metric);
    tr.append(keyCell, countCell);
    return tr;
  }

  function renderPanel(dimension, data, note) {
    if (!data.rows.length) { panelMessage(dimension, "Nothing in this range."); return; }
    const table = document.createElement("table");
    table.className = "rows";
    const head = table.createTHead().insertRow();
    for (const [text, cls] of [[DIMENSION_NAMES[dimension], ""], [COLUMN[data.metric] || data.metric, "n"]]) {
      const th = document.createElement("th");
      th.textContent = text;
      if (cls) th.className = cls;
      if (cls && note) { th.title = note; th.dataset.note = note; th.textContent += " *"; }  // marked in loadPanels
      head.appendChild(th);
    }
    const top = Math.max(...data.rows.map((r) => Number(r.count)), 0);
    table.createTBody().replaceChildren(...data.rows.map((r) => panelRow(dimension, r, data.metric, top)));
    panelOf(dimension).replaceChildren(table);
  }

  async function loadPanel(dimension, params, seq) {
    const url = breakdownUrl(dimension, params);
    const found = await optional(viewJSON(url));
    if (seq !== state.loads) return;
    if (!found.ok) {
      const e = found.error;
      state.panels[dimension] = {url, status: e.status || 0, rows: null};
      panelMessage(dimension, e.status === 404 && e.code !== "unknown_domain"
        ? `Breakdowns by ${dimension} are not available from this API yet (404: ${e.message}).`
        : `Breakdown by ${dimension} unavailable (${e.status || "request failed"}: ${e.message}).`);
      return;
    }
    state.panels[dimension] = {url, status: 200, rows: found.body.rows, total: found.body.total,
                               note: coverNote(found.body, params)};
    renderPanel(dimension, found.body, state.panels[dimension].note);
  }

  // What the answer counted when it is not the range asked (visitors are kept per local day, combinations per
  // hour; the API widens the range and says so in from/to and notes).
  function coverNote(data, params) {
    const lo = Date.parse(data.from), hi = Date.parse(data.to), slack = 15 * 60e3;
    if (lo >= Date.parse(params.from) - slack && hi <= Date.parse(params.to) + slack) return "";
    const why = data.metric === "visitors" ? "visitors are kept per day" : "combinations are kept per hour";
    return `${COLUMN[data.metric]} counted ${fmtTime(lo / 1000, params.tz)} to ${fmtTime(hi / 1000, params.tz)} ` +
      `(${why}).`;
  }

  async function loadPanels(params, seq) {
    for (const panel of document.querySelectorAll(".panel.breakdown")) panel.dataset.status = "loading";
    await Promise.all(DIMENSIONS.map((d) => loadPanel(d, params, seq)));
    if (seq !== state.loads) return;
    // one mark per distinct note (*, **, ...): a filtered view can count visitors and combinations differently
    const notes = [...new Set(DIMENSIONS.map((d) => state.panels[d] && state.panels[d].note).filter(Boolean))];
    const mark = (note) => "*".repeat(notes.indexOf(note) + 1);
    for (const th of document.querySelectorAll(".panel.breakdown th[data-note]")) {
      th.textContent = `${th.textContent.replace(/ \*+$/, "")} ${mark(th.dataset.note)}`;
    }
    document.getElementById("panels-note").textContent = notes.map((n) => `${mark(n)} ${n}`).join(" ");
    for (const panel of document.querySelectorAll(".panel.breakdown")) {
      const dims = [...panel.querySelectorAll(".tab-body")].map((b) => b.dataset.dimension);
      panel.dataset.status = dims.every((d) => state.panels[d] && state.panels[d].status === 200) ? "ready" : "missing";
    }
  }

  function showTab(tab) {
    for (const b of document.querySelectorAll("#panel-devices [role=tab]")) {
      b.setAttribute("aria-selected", String(b.dataset.tab === tab));
    }
    for (const body of document.querySelectorAll("#panel-devices .tab-body")) body.hidden = body.dataset.dimension !== tab;
  }

  return {load: loadPanels, showTab};
}

// Helpers of the dashboard without state: the API's JSON, query strings, times in a zone, numbers, filters
// and labels. An ES module (dashboard.js and dashboard-panels.js import it); nothing here touches the page's
// state.

export const DIMENSIONS = ["page", "source", "country", "device", "browser", "os"];
export const DIMENSION_NAMES = {page: "Page", source: "Source", country: "Country", device: "Device",
                                browser: "Browser", os: "OS"};
const NONE_LABEL = {source: "Direct / none", country: "Unknown", device: "Unknown", browser: "Unknown",
                    os: "Unknown", page: "(none)"};
export const METRICS = {  // the cards; a click charts the metric, and the panels rank by `panel`
  visitors: {label: "visitors", panel: "visitors", color: "#3b6fd8"},
  pageviews: {label: "page views", panel: "pageviews", color: "#d8743b"},
  impressions: {label: "impressions", panel: "impressions", color: "#7a5cc7"},
  value: {label: "value sum", panel: "value", color: "#2a9d5b"},
  p95: {label: "value p95", panel: "value", color: "#2a9d5b"},
};
const MAX_KEY = 2048;  // oltp/filters.py MAX_VALUE
export const num = new Intl.NumberFormat("en");
const regionNames = Intl.DisplayNames ? new Intl.DisplayNames(["en"], {type: "region"}) : null;

export const $ = (id) => document.getElementById(id);

// GET a JSON answer of the API with the session cookie; an error carries the answer's status and code. A 401
// (the session expired, its token was revoked) goes to the login page, keeping the domain. A 429 (the token's
// per-second budget: quick view changes, several tabs) is waited out as its Retry-After says, up to
// RATE_RETRIES times, instead of showing an error. `signal` aborts it, waits included.
const RATE_RETRIES = 3;
const RATE_WAIT_MAX_S = 5;

export async function getJSON(path, signal) {
  let res;
  for (let attempt = 0; ; attempt++) {
    res = await fetch(path, {credentials: "same-origin", headers: {"Accept": "application/json"}, signal});
    if (res.status !== 429 || attempt >= RATE_RETRIES) break;
    const told = await res.json().catch(() => ({}));
    const after = Number(res.headers.get("Retry-After")) || (told.error && told.error.retry_after_s) || 1;
    await pause(Math.min(RATE_WAIT_MAX_S, after) * 1000, signal);
  }
  if (res.status === 401) {
    const domain = new URLSearchParams(location.search).get("domain") || "";
    location.assign(`/login?domain=${encodeURIComponent(domain)}`);
    throw new Error("not logged in");
  }
  const body = await res.json().catch(() => ({}));
  if (!res.ok) {
    const err = new Error((body.error && body.error.message) || `HTTP ${res.status}`);
    err.status = res.status;
    err.code = body.error && body.error.code;
    throw err;
  }
  return body;
}

function pause(ms, signal) {
  return new Promise((resolve, reject) => {
    const aborted = () => reject(signal.reason || new DOMException("aborted", "AbortError"));
    if (signal && signal.aborted) { aborted(); return; }
    const timer = setTimeout(resolve, ms);
    if (signal) signal.addEventListener("abort", () => { clearTimeout(timer); aborted(); }, {once: true});
  });
}

// A query string that keeps ':' and '/' readable (filters name pages), everything else encoded.
export function query(pairs) {
  const enc = (s) => encodeURIComponent(s).replace(/%3A/gi, ":").replace(/%2F/gi, "/");
  return pairs.filter(([, v]) => v !== undefined && v !== null && v !== "")
    .map(([k, v]) => `${enc(k)}=${enc(String(v))}`).join("&");
}

export async function optional(promise) {
  try { return {ok: true, body: await promise}; } catch (e) { return {ok: false, error: e}; }
}

export function errorText(error) {
  return error.status ? `${error.status}: ${error.message}` : error.message;
}

export function validZone(tz) {
  try { new Intl.DateTimeFormat("en", {timeZone: tz}); return true; } catch (e) { return false; }
}

// Offset (ms) of `tz` at instant `ms`, and a wall-clock time "YYYY-MM-DDTHH:MM" in `tz` -> Date.
function offsetAt(ms, tz) {
  const parts = new Intl.DateTimeFormat("en-US", {timeZone: tz, hourCycle: "h23", year: "numeric",
    month: "2-digit", day: "2-digit", hour: "2-digit", minute: "2-digit", second: "2-digit"}).formatToParts(new Date(ms));
  const get = (t) => Number(parts.find((p) => p.type === t).value);
  const asUtc = Date.UTC(get("year"), get("month") - 1, get("day"), get("hour"), get("minute"), get("second"));
  return asUtc - Math.floor(ms / 1000) * 1000;
}
// Whether `tz` is a whole number of hours off UTC at these instants (ms): its hours are UTC hours.
export function wholeHours(tz, ...instants) {
  return instants.every((ms) => offsetAt(ms, tz) % 3600e3 === 0);
}

export function wallToDate(wall, tz) {
  const [d, t] = wall.split("T");
  const [Y, M, D] = d.split("-").map(Number);
  const [h, m] = (t || "00:00").split(":").map(Number);
  const guess = Date.UTC(Y, M - 1, D, h, m);
  let ms = guess - offsetAt(guess, tz);
  ms = guess - offsetAt(ms, tz);
  return new Date(ms);
}
export function dateToWall(date, tz) {
  const p = new Intl.DateTimeFormat("sv-SE", {timeZone: tz, year: "numeric", month: "2-digit", day: "2-digit",
    hour: "2-digit", minute: "2-digit", hourCycle: "h23"}).format(date);
  return p.replace(" ", "T");
}
export function fmtTime(sec, tz) {
  return new Intl.DateTimeFormat("sv-SE", {timeZone: tz, year: "numeric", month: "2-digit", day: "2-digit",
    hour: "2-digit", minute: "2-digit", hourCycle: "h23", timeZoneName: "short"}).format(new Date(sec * 1000));
}
export function fmtClock(ms, tz) {
  return new Intl.DateTimeFormat("en-GB", {timeZone: tz, hour: "2-digit", minute: "2-digit", hourCycle: "h23"})
    .format(new Date(ms));
}
export function fmtValue(v) {
  return v == null || Number.isNaN(v) ? "–" : Number(v).toLocaleString("en", {maximumFractionDigits: 2});
}

export function validFilter(text) {
  const i = text.indexOf(":");
  if (i < 1) return null;
  const dimension = text.slice(0, i), key = text.slice(i + 1);
  return DIMENSIONS.includes(dimension) && key && key.length <= MAX_KEY && filterable(key)
    ? [dimension, key] : null;
}

// The API splits `filter` at a comma only where a known `dimension:` follows (oltp/filters.py).
const SEPARATOR = new RegExp(`,\\s*(?:${DIMENSIONS.join("|")}):`);
export function filterable(key) {
  return !SEPARATOR.test(key);
}

export function withFilter(filters, dimension, key) {  // one filter per dimension: a new one replaces it
  const rest = filters.filter(([d]) => d !== dimension);
  return key === null ? rest : [...rest, [dimension, key]];
}

export function keyLabel(dimension, key, name) {
  if (key === "(none)") return NONE_LABEL[dimension];
  if (dimension === "country") return name || countryName(key);
  return key;
}

export function countryName(code) {
  if (!/^[A-Z]{2}$/.test(code) || !regionNames) return code;
  try { return regionNames.of(code) || code; } catch (e) { return code; }
}

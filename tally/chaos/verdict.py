"""Both stores against the ledger: settle, then lost / counted twice / maybe per store (ADR 24).

ClickHouse is read through the API's analyst SQL (`tally.events FINAL`, paged by hash prefix under the
answer's row cap); PostgreSQL directly (`seen_events` hashes, `rollup_15m` sums). `check_store` is pure.
The rollups by dimension (ADR 46) are checked by their totals: every dimension of every tier, the cube and
the value bins must count ClickHouse's non-bot events (with a value, for the bins) exactly (`dimension_totals`).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

from tally.chaos.load import ID_PATH, Ledger
from tally.chaos.stack import DOMAIN, ChaosStack


def _ch_total(stack: ChaosStack) -> int:
    return int(stack.sql(f"SELECT count() FROM tally.events FINAL WHERE domain = '{DOMAIN}'")[0][0])


def _pg_totals(stack: ChaosStack) -> tuple[int, int]:
    seen = stack.pg_query("SELECT count(*) FROM seen_events")[0][0]
    rolled = stack.pg_query("SELECT coalesce(sum(events), 0) FROM rollup_15m WHERE domain = %s", (DOMAIN,))[0][0]
    return int(seen), int(rolled)


def settle(stack: ChaosStack, ledger: Ledger, timeout_s: float, stable_s: float = 10.0) -> float | None:
    """Wait until both stores hold at least every acknowledged event and their counts have not changed for
    `stable_s`; the seconds that took, or None at the deadline (compare() then says what is missing)."""
    expected = ledger.acked_count()
    t0 = time.monotonic()
    last, since = None, time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        try:
            now = (_ch_total(stack), *_pg_totals(stack))
        except Exception:
            now = None
        if now != last:
            last, since = now, time.monotonic()
        elif now is not None and min(now[0], now[2]) >= expected and time.monotonic() - since >= stable_s:
            return time.monotonic() - t0
        time.sleep(1.0)
    return None


@dataclass
class StoreCheck:
    """One store against the ledger. `lost`: acknowledged hashes it does not hold. `duplicated`: events it
    counts more often than the load could have caused (a logical event under two hashes, a count without a
    hash, an event nobody sent). `maybe`: unacknowledged attempts it holds (fine)."""

    store: str
    stored: int  # events it counts
    lost: int
    duplicated: int
    maybe: int
    detail: list[str] = field(default_factory=list)
    lost_in_spool: int | None = None  # of the lost, how many the spool held (lost after it); None: not known

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.duplicated == 0


def check_spool(ledger: Ledger, spooled: set[str], *, max_gap_s: float | None = None) -> StoreCheck:
    """The first stage: every acknowledged hash must have been in a spool segment (the tap's copy). Only
    losses count here; the spool holds retries and duplicates by design. Pure."""
    with ledger.lock:
        acked = dict(ledger.acked)
    missing = [h for h in acked if h not in spooled]
    detail = []
    if missing:
        detail.append(f"spool: {len(missing)} acknowledged events were never in a spool segment (the collector "
                      "acknowledged what it did not keep), e.g. " + ", ".join(f"{h} ({acked[h]})" for h in missing[:5]))
        if max_gap_s is not None and max_gap_s > 0.05:
            detail.append(f"spool: the tap once went {max_gap_s:.2f}s between scans (segments live at least "
                          "TALLY_SPOOL_SEGMENT_AGE_S): a missed segment is possible")
    return StoreCheck("spool", len(set(acked) & spooled), len(missing), 0, 0, detail)


def check_store(store: str, ledger: Ledger, stored: dict[str, str | None], counted: int | None = None,
                spooled: set[str] | None = None) -> StoreCheck:
    """Compare `stored` (hash -> url, None when the store does not know the URL) with the ledger. `counted`
    is the store's own count when it is kept apart from the hashes (PostgreSQL's rollup sums); by default
    the number of stored hashes. `spooled`: the hashes seen in the spool, to say which losses happened after
    it. Pure: no I/O."""
    with ledger.lock:
        acked = dict(ledger.acked)
        unacked = Counter(ledger.unacked)
    detail: list[str] = []
    missing = [h for h in acked if h not in stored]
    acks_per_url = Counter(acked.values())
    extra_per_url: Counter[str] = Counter()
    unknown = 0
    for h, url in stored.items():
        if h in acked:
            continue
        if url is None or url not in ledger.types:
            unknown += 1
            if len(detail) < 5:
                detail.append(f"{h} ({url}) was never sent")
        else:
            extra_per_url[url] += 1
    duplicated, maybe = unknown, 0
    for url, extra in extra_per_url.items():
        if ID_PATH in url:  # one hash per id event: a second one is a double count
            allowed = 0 if acks_per_url[url] else min(1, unacked[url])
        else:  # each attempt without a 202 may have been spooled
            allowed = unacked[url]
        maybe += min(extra, allowed)
        if extra > allowed:
            duplicated += extra - allowed
            if len(detail) < 10:
                detail.append(f"{url}: {acks_per_url[url] + extra} stored, {acks_per_url[url]} acknowledged, "
                              f"{unacked[url]} unacknowledged attempts")
    # A resend of an id event acknowledged under a new hash (the collector's dedup key broke): every stored
    # hash after the first counts the same event again.
    held_acked_per_url = Counter(url for h, url in acked.items() if h in stored)
    for url, n in held_acked_per_url.items():
        if ID_PATH in url and n > 1:
            duplicated += n - 1
            if len(detail) < 10:
                detail.append(f"{url}: one id event acknowledged and stored under {n} hashes")
    lost_in_spool = None if spooled is None else sum(h in spooled for h in missing)
    if missing:
        stage = "" if spooled is None else (f" ({lost_in_spool} of them were in the spool: lost between the "
                                             f"spool and {store})")
        detail.insert(0, f"{store}: {len(missing)} acknowledged events missing{stage}, e.g. "
                      + ", ".join(f"{h} ({acked[h]})" for h in missing[:5]))
    lost = len(missing)
    held = len(stored)
    if counted is not None and counted != held:
        detail.append(f"counts {counted} events but holds {held} distinct hashes")
        if counted > held:
            duplicated += counted - held
        else:
            lost = max(lost, held - counted)
    return StoreCheck(store, held if counted is None else counted, lost, duplicated, maybe, detail, lost_in_spool)


def _ch_rows(stack: ChaosStack) -> dict[str, str | None]:
    total = int(stack.sql(f"SELECT count() FROM tally.events FINAL WHERE domain = '{DOMAIN}'")[0][0])
    width = 1 if total < 100_000 else 2  # pages of at most ~6k rows (the API answers up to 10k)
    rows: dict[str, str | None] = {}
    for page in range(16 ** width):
        prefix = f"{page:0{width}x}"
        for h, url in stack.sql(f"SELECT hash, url FROM tally.events FINAL WHERE domain = '{DOMAIN}' "
                                f"AND substring(hash, 1, {width}) = '{prefix}'"):
            rows[h] = url
    return rows


_DIMENSION_TOTALS = {
    "rollup_dim_15m": "SELECT dimension, sum(events) FROM rollup_dim_15m WHERE domain = %s GROUP BY 1",
    "rollup_dim_1h": "SELECT dimension, sum(events) FROM rollup_dim_1h WHERE domain = %s GROUP BY 1",
    "rollup_dim_1d": "SELECT dimension, sum(events) FROM rollup_dim_1d WHERE domain = %s GROUP BY 1",
    "rollup_cube_1h": "SELECT 'all', sum(events) FROM rollup_cube_1h WHERE domain = %s",
    "rollup_cube_1d": "SELECT 'all', sum(events) FROM rollup_cube_1d WHERE domain = %s",
    "value_bins_15m": "SELECT 'valued', sum(count) FROM value_bins_15m WHERE domain = %s",
    "value_bins_1h": "SELECT 'valued', sum(count) FROM value_bins_1h WHERE domain = %s",
    "value_bins_1d": "SELECT 'valued', sum(count) FROM value_bins_1d WHERE domain = %s",
}


def dimension_totals(stack: ChaosStack) -> list[str]:
    """What the rollups by dimension count that ClickHouse's non-bot events do not (empty: they agree)."""
    people, valued = (int(x) for x in stack.sql(
        "SELECT countIf(ifNull(device, '') != 'bot'), countIf(ifNull(device, '') != 'bot' AND value IS NOT NULL)"
        f" FROM tally.events FINAL WHERE domain = '{DOMAIN}'")[0])
    out = []
    for table, sql in _DIMENSION_TOTALS.items():
        got = {str(k): int(n or 0) for k, n in stack.pg_query(sql, (DOMAIN,))}
        want = valued if table.startswith("value_bins") else people
        expected = {k: want for k in got} if table.startswith(("value_bins", "rollup_cube")) else \
            dict.fromkeys(("page", "source", "country", "device", "browser", "os"), want)
        if people and got != expected:
            out.append(f"{table} counts {got}, ClickHouse's non-bot events {want}")
    return out


def compare(stack: ChaosStack, ledger: Ledger, spooled: set[str] | None = None) -> tuple[StoreCheck, StoreCheck]:
    """Both stores against the ledger: (PostgreSQL, ClickHouse). Raises if a store cannot be read."""
    ch_rows = _ch_rows(stack)
    ch = check_store("ClickHouse", ledger, ch_rows, spooled=spooled)
    others = int(stack.sql(f"SELECT count() FROM tally.events FINAL WHERE domain != '{DOMAIN}'")[0][0])
    if others:
        ch.detail.append(f"{others} events of other domains, which nobody sent")
        ch.duplicated += others
    # seen_events has no domain; this TALLY_HOME holds only the chaos site, and the collector's refusal
    # windows (a 401 before the registry was read) are stored there too: those hashes are not events.
    seen = {str(r[0]).replace("-", "") for r in stack.pg_query("SELECT hash FROM seen_events")}
    refusal_windows = int(stack.pg_query("SELECT count(*) FROM collector_refusals")[0][0])
    known = {**ch_rows, **{h: u for h, u in ledger.acked.items()}}
    pg_rows = {h: known.get(h) for h in seen if h in known}
    counted = int(stack.pg_query("SELECT coalesce(sum(events), 0) FROM rollup_15m")[0][0])
    pg = check_store("PostgreSQL", ledger, pg_rows, counted=counted, spooled=spooled)
    unknown_seen = len(seen) - len(pg_rows)
    if unknown_seen and not refusal_windows:
        pg.detail.append(f"{unknown_seen} hashes in seen_events that neither ClickHouse nor the load knows")
        pg.duplicated += unknown_seen
    if ch.ok:  # then ClickHouse's events are the reference for the rollups by dimension
        dims = dimension_totals(stack)
        pg.detail += dims
        pg.duplicated += len(dims)
    return pg, ch

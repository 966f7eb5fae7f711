"""What every benchmark module shares: results, the table, event factories, the embedded servers."""

from __future__ import annotations

import random
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SECRET = "bench-secret-0123456789abcdef"
UA = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"
TOPIC, RAW_TOPIC, PARTITIONS = "tally.events", "bench.raw", 4
HIT = {"domain": "bench.example.com", "url": "https://bench.example.com/p", "type": "impression"}


@dataclass
class Result:
    name: str
    value: float | None
    unit: str
    floor: str | None = None  # name of the floor row this stage is compared with
    floor_scale: int = 1  # the floor figure is multiplied by this (x50 events per request)
    ratio: float | None = None
    note: str = ""
    error: str | None = None


class Bench:
    def __init__(self, quick: bool) -> None:
        self.quick = quick
        self.n = 20_000 if quick else 200_000  # events through the Kafka / store stages
        self.n_single = 3_000 if quick else 20_000  # one-fsync-per-line writes
        self.http_s = 5 if quick else 15
        self.results: list[Result] = []

    def add(self, name: str, value: float, unit: str, floor: str | None = None, *, scale: int = 1,
            note: str = "") -> None:
        self.results.append(Result(name, value, unit, floor, scale, note=note))
        say(f"  {name}: {value:,.0f} {unit}" + (f"  ({note})" if note else ""))

    def measure(self, label: str, fn: Callable[..., None], *args: object) -> bool:
        """Run one measurement; a failure becomes an ERROR row (and a traceback on stderr), not a crash."""
        say(f"[bench] {label} ...")
        try:
            fn(self, *args)
            return True
        except Exception as exc:
            traceback.print_exc()
            self.results.append(Result(label, None, "", error=f"{type(exc).__name__}: {exc}"[:300]))
            return False

    def resolve_ratios(self) -> None:
        floors = {r.name: r.value for r in self.results if r.floor is None and r.value}
        for r in self.results:
            if r.floor and r.value is not None and floors.get(r.floor):
                r.ratio = r.value / (floors[r.floor] * r.floor_scale)


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def pct(values: Iterable[float], q: float) -> float:
    """The q-th percentile (nearest rank on 0..n-1); NaN for no values, inf kept."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("inf")


def proc_status_kib(key: str) -> int:
    """A figure of this process from /proc/self/status (VmRSS, VmHWM, ...) in KiB; 0 where there is none."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def drain_loops(loops: list, timeout_s: float = 900) -> None:
    """Drain consumer loops as `tally rollup-worker` runs them: one in this thread (so cProfile sees
    it), several each in its own thread; re-raises the first failure once all have ended."""
    if len(loops) == 1:
        loops[0].drain(timeout_s=timeout_s)
        return
    errors: list[BaseException] = []

    def drain(loop) -> None:
        try:
            loop.drain(timeout_s=timeout_s)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=drain, args=(loop,)) for loop in loops]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


# What the events of `make_events` look like to the rollups by dimension (ADR 46): per domain PAGES pages
# drawn with Zipf weights (a few pages take most views, as on a real site), a few sources (referrers,
# half of the events direct), countries and user agents (desktop / mobile / tablet browsers and OSes).
# Times: a backlog of live traffic, LIVE_SHARE of the events within the LIVE_S before now, the others late
# (up to two days old). LIVE_SHARE = 0 gives every event a time in the last two days (the bench until issue 17).
LIVE_SHARE, LIVE_S = 0.95, 600
PAGES = 1000
REFERRERS = [None] * 5 + ["https://www.google.com/search", "https://news.ycombinator.com/item", "https://t.co/x",
                          "https://duckduckgo.com/", "https://www.reddit.com/r/x", "https://blog.example.org/post"]
COUNTRIES = ["US", "US", "US", "DE", "DE", "GB", "FR", "IN", "BR", "JP", None]
UAS = [UA,
       "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0 Safari/537.36",
       "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko)"
       " Version/17.5 Mobile/15E148 Safari/604.1",
       "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0 Mobile"
       " Safari/537.36",
       "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.5"
       " Safari/605.1.15",
       "Mozilla/5.0 (iPad; CPU OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.5"
       " Mobile/15E148 Safari/604.1"]


def make_events(n: int) -> list:
    """N valid events (40 domains, 4 partitions, ts spread over two days, some with a value), with pages,
    sources, countries and user agents as above."""
    import msgspec

    from collector.ua import classify_user_agent
    from core.event import HitContext, Limits, event_from_hit

    now = datetime.now(UTC)
    rng = random.Random(7)
    domains = [f"site{i}.bench.example.com" for i in range(40)]
    weights = [1 / rank for rank in range(1, PAGES + 1)]
    pages = rng.choices(range(PAGES), weights, k=n)
    limits, secret, events = Limits(), SECRET.encode(), []
    for i in range(n):
        domain = domains[i % len(domains)]
        age = rng.randint(0, LIVE_S) if rng.random() < LIVE_SHARE else rng.randint(0, 2 * 86_400)
        body = {"domain": domain, "url": f"https://{domain}/p/{pages[i]}", "type": ("impression", "pageview")[i % 2],
                "ts": int((now - timedelta(seconds=age)).timestamp() * 1000)}
        referrer = REFERRERS[i % len(REFERRERS)]
        if referrer:
            body["referrer"] = referrer
        if i % 10 == 0:
            body["value"] = "0.25" if i % 20 else str(rng.randint(1, 50_000) / 100)
        ctx = HitContext(received_at=now, user_agent=UAS[i % 7 % len(UAS)], client_ip=f"10.0.{i % 250}.{i % 97}",
                         country=COUNTRIES[i % len(COUNTRIES)])
        e = event_from_hit(body, ctx, limits, secret, classify_user_agent)
        if e.page is None:  # before the collector derives it (the release before issue 17's enrichment)
            e = msgspec.structs.replace(e, page=f"/p/{pages[i]}")
        events.append(e)
    return events


def chunks(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def topic_partitions(consumer, topic: str) -> list:
    from kafka import TopicPartition

    deadline = time.monotonic() + 30
    while not consumer.partitions_for_topic(topic):  # None until the first metadata response
        if time.monotonic() > deadline:
            raise TimeoutError(f"no metadata for topic {topic}")
        time.sleep(0.05)
    return [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]


def start_servers(_b: Bench, work: Path, cleanup: ExitStack, out: dict[str, object]) -> None:
    from infra.broker import EmbeddedBroker
    from infra.postgres import EmbeddedPostgres

    broker = EmbeddedBroker(work / "tansu.log")
    cleanup.callback(broker.stop)
    broker.start()
    postgres = EmbeddedPostgres(work / "pg" / "data", durable=True)
    cleanup.callback(postgres.stop)
    postgres.start()
    out.update(bootstrap=broker.bootstrap, dsn=postgres.dsn)


def fmt(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def print_table(results: list[Result]) -> None:
    header = ("name", "figure", "unit", "floor", "ratio", "note")
    rows = [(r.name, "ERROR" if r.error else fmt(r.value), r.unit,
             (r.floor or "-") + (f" x{r.floor_scale}" if r.floor_scale != 1 else ""),
             fmt(r.ratio, 2), r.error or r.note) for r in results]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(5)]
    line = lambda row: "  ".join(  # noqa: E731
        str(c).rjust(w) if i in (1, 4) else str(c).ljust(w)
        for i, (c, w) in enumerate(zip(row[:5], widths, strict=True))) + "  " + row[5]
    print(line(header))
    print("  ".join("-" * w for w in widths) + "  " + "-" * 4)
    for row in rows:
        print(line(row))

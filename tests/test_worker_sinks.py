"""The `Sink` contract of the consumer loop (workers/sink.py, ADR 38): both stores implement all of it, and
the loop reads it directly (no `getattr` with a default): a sink missing a member is refused at once."""

from __future__ import annotations

import pytest

from core.batch import Batch
from olap.loader_sink import LoaderSink
from oltp.rollup_sink import RollupSink
from workers.consumer import ConsumerLoop
from workers.sink import Sink


class Partial:
    """What the loop's old Protocol asked for: name, committed, write, close (and nothing else)."""

    name = "partial"

    def committed(self, topic: str, topic_id: str, partitions: list[int]) -> dict[int, int]:
        return {}

    def write(self, batch: Batch) -> None:
        pass

    def close(self) -> None:
        pass


def test_both_stores_implement_the_whole_sink_contract():
    rollup = RollupSink("postgresql://unused.invalid/db", "tally-rollups")  # no connection until used
    loader = LoaderSink(None, "tally", "tally-loader")  # type: ignore[arg-type]  # no client call here
    for sink in (rollup, loader):
        assert isinstance(sink, Sink), type(sink).__name__
    assert not isinstance(Partial(), Sink)


def test_a_sink_missing_part_of_the_contract_is_refused_not_defaulted():
    """The group (metrics, logs), the permanent-error rule and the rewind store were read through getattr
    with defaults; now a sink without them cannot be built into a loop."""
    with pytest.raises(AttributeError, match="group"):
        ConsumerLoop(None, Partial(), "t")  # type: ignore[arg-type]


def test_each_store_tells_its_own_permanent_errors():
    import psycopg
    from clickhouse_connect.driver.exceptions import DataError as ClickHouseDataError

    assert RollupSink.is_permanent(psycopg.errors.NumericValueOutOfRange("out of range"))
    assert RollupSink.is_permanent(psycopg.errors.CheckViolation("refused"))
    assert not RollupSink.is_permanent(psycopg.OperationalError("server closed the connection"))
    assert LoaderSink.is_permanent(ClickHouseDataError("Cannot parse"))
    assert not LoaderSink.is_permanent(psycopg.errors.NumericValueOutOfRange("not ClickHouse's"))
    assert not LoaderSink.is_permanent(ConnectionError("ClickHouse is down"))

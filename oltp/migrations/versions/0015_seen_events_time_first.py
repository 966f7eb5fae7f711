"""seen_events' primary key leads with the event time: PRIMARY KEY (ts, hash) instead of (hash, ts).

Same uniqueness (the same two columns; the sink's `ON CONFLICT (hash, ts)` infers the index whatever its column
order), but where a batch's new entries go in the index: by hash (random) they land on a random leaf page each,
so once a day's partition outgrows shared_buffers nearly every insert reads a page, dirties it and, after each
checkpoint, writes it whole to the WAL; by time (events arrive close to now) they land on the last few leaf
pages. Measured (docs/adr/0058-soak-and-capacity.md, addendum of 2026-12-07): a batch of 5,000 new events into a
3-million-row table wrote 5.2 MiB of WAL and read 838 blocks by hash first, 0.9 MiB and 0 blocks by time first.

The primary key of a partitioned table is rebuilt on every partition under an ACCESS EXCLUSIVE lock held for the
build: the rollup worker's writes and reconcile's reads of seen_events wait (nothing is lost); minutes for a
dedup window of many millions of rows: run `tally migrate` in a quiet hour. The lookups (`WHERE hash = .. AND
ts = ..`) use either order.

Revision ID: 0015
Revises: 0014
"""

from __future__ import annotations

from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def _primary_key(columns: str) -> None:
    op.execute("ALTER TABLE seen_events DROP CONSTRAINT seen_events_pkey")  # its partitions' indexes go with it
    op.execute(f"ALTER TABLE seen_events ADD CONSTRAINT seen_events_pkey PRIMARY KEY ({columns})")


def upgrade() -> None:
    _primary_key("ts, hash")


def downgrade() -> None:
    _primary_key("hash, ts")

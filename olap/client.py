"""One way to reach ClickHouse: clickhouse-connect, with a chdb:// (embedded) or http(s):// DSN.

chDB allows one engine per directory per process, so embedded clients are
shared per path inside a process.
"""

from __future__ import annotations

import threading
from pathlib import Path

import clickhouse_connect
from clickhouse_connect.driver.client import Client

_CHDB_CLIENTS: dict[str, Client] = {}
_LOCK = threading.Lock()


def connect(dsn: str) -> Client:
    if dsn.startswith("chdb://"):
        path = dsn[len("chdb://"):]
        with _LOCK:
            client = _CHDB_CLIENTS.get(path)
            if client is None:
                Path(path).mkdir(parents=True, exist_ok=True)
                client = clickhouse_connect.get_client(dsn=dsn)
                _CHDB_CLIENTS[path] = client
            return client
    # No session id: one client serves the API's threads, and a ClickHouse session runs one query at a time.
    return clickhouse_connect.get_client(dsn=dsn, connect_timeout=5, send_receive_timeout=60,
                                         autogenerate_session_id=False)


def new_client(dsn: str) -> Client:
    """A client of its own (not shared): for work that must run beside other queries, e.g. one analyst query.

    chDB runs queries from separate clients in one process concurrently; a shared client serialises them.
    """
    if dsn.startswith("chdb://"):
        Path(dsn[len("chdb://"):]).mkdir(parents=True, exist_ok=True)
        return clickhouse_connect.get_client(dsn=dsn)
    return clickhouse_connect.get_client(dsn=dsn, connect_timeout=5, send_receive_timeout=3600,
                                         autogenerate_session_id=False)

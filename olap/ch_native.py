"""ClickHouse's Native format where the endpoint writes it itself: the answer to clickhouse-go's handshake
(ADR 50, addendum 2).

clickhouse-go (Grafana's ClickHouse data source) asks `SELECT displayName(), version(), revision(), timezone()`
on connect over HTTP with `default_format=Native&client_protocol_version=<its own>`, reads that answer at its
own protocol revision, and every later Native answer at the revision the handshake returned. From revision
54454 (DBMS_MIN_REVISION_WITH_CUSTOM_SERIALIZATION) a Native column carries one "custom serialization" byte
after its type; chDB writes Native at revision 0 whatever it is asked (no such byte). So the endpoint says it
speaks Native at NATIVE_REVISION (below 54454: the byte is never expected afterwards), and writes this one
answer itself, at the revision the client asked for. A ClickHouse server behind the analyst server is asked
for Native at no more than NATIVE_REVISION (olap/ch_query.py), so its answers match what the handshake said.

Pure Python.
"""

from __future__ import annotations

import struct

#: The Native revision the endpoint speaks (what `revision()` answers in the handshake).
NATIVE_REVISION = 54453
#: From this revision on, each column of a Native block has a custom-serialization flag after its type.
CUSTOM_SERIALIZATION_REVISION = 54454
#: clickhouse-go's handshake, as it sends it (its text with runs of blanks made one space).
HANDSHAKE = "SELECT displayName(), version(), revision(), timezone()"


def _varuint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _string(text: str) -> bytes:
    raw = text.encode("utf-8")
    return _varuint(len(raw)) + raw


def is_handshake(sql: str, fmt: str) -> bool:
    """Whether `sql` (without its FORMAT clause) in `fmt` is clickhouse-go's handshake query."""
    return fmt == "Native" and " ".join(sql.split()).rstrip(";").rstrip() == HANDSHAKE


def client_revision(settings: dict[str, str]) -> int:
    """The protocol revision the request asked Native for (its `client_protocol_version`; 0 when none)."""
    value = settings.get("client_protocol_version", "0")
    return int(value) if value.isdigit() else 0


def handshake_block(display_name: str, version: str, timezone: str, revision: int) -> bytes:
    """The handshake's one-row Native block, written at the client's `revision`, answering NATIVE_REVISION."""
    columns = [("displayName()", "String", _string(display_name)), ("version()", "String", _string(version)),
               ("revision()", "UInt32", struct.pack("<I", NATIVE_REVISION)),
               ("timezone()", "String", _string(timezone))]
    out = bytearray(_varuint(len(columns)) + _varuint(1))
    for name, kind, data in columns:
        out += _string(name) + _string(kind)
        if revision >= CUSTOM_SERIALIZATION_REVISION:
            out += b"\x00"  # no custom serialization
        out += data
    return bytes(out)


def capped_revision(settings: dict[str, str]) -> dict[str, str]:
    """`settings` with client_protocol_version at most NATIVE_REVISION (what a ClickHouse server is asked for)."""
    if "client_protocol_version" not in settings:
        return settings
    return {**settings, "client_protocol_version": str(min(client_revision(settings), NATIVE_REVISION))}

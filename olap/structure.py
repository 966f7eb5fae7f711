"""The column structure an analyst may give `values()`: column names and plain types, nothing else.

`values('a UInt8, b String', (1, 'x'))` reads its first argument as a column list, the one of a CREATE TABLE:
ClickHouse evaluates what a column declaration may carry (`ALIAS`, `DEFAULT`, `MATERIALIZED`, `EPHEMERAL`,
`CODEC`, `TTL`, ...), so `b String ALIAS file('...')` would run any function past the function allowlist (a
security review read the server's files this way). A structure is accepted only when it is a comma-separated
list of `name Type` where a type is one of ClickHouse's data type names with optional parenthesised arguments:
types, `name Type` (Tuple, Nested), numbers, single-quoted strings without escapes, and `'text' = number` (Enum).
The aggregate function types a structure may hold are checked as every string literal's are (olap/allowlist.py
`check_literal`)."""

from __future__ import annotations

import re

_TOKEN = re.compile(r"(?P<name>[A-Za-z_][A-Za-z0-9_]*|`[A-Za-z_][A-Za-z0-9_]*`)|(?P<number>-?[0-9]+(?:\.[0-9]+)?)"
                    r"|(?P<string>'[^'\\]*')|(?P<punct>[(),=])")
MAX_STRUCTURE = 4000  # characters
MAX_DEPTH = 16

# The one-word data type names of ClickHouse's `system.data_type_families` (tests/test_analyst.py checks them against
# the server under test): a type must be one. In a column declaration the type is optional, so any other word in
# its place is read as a column clause (`b ALIAS(file(...))` or `b alias(...)`: a second review).
TYPE_NAMES = frozenset({
    "AggregateFunction", "Array", "BFloat16", "Dynamic", "Enum16", "Enum8", "FixedString", "Float32", "Float64",
    "GEOMETRY", "Geometry", "IPv4", "IPv6", "Int128", "Int16", "Int256", "Int32", "Int64", "Int8", "IntervalDay",
    "IntervalHour", "IntervalMicrosecond", "IntervalMillisecond", "IntervalMinute", "IntervalMonth",
    "IntervalNanosecond", "IntervalQuarter", "IntervalSecond", "IntervalWeek", "IntervalYear", "LineString",
    "LowCardinality", "Map", "MultiLineString", "MultiPoint", "MultiPolygon", "Nested", "Nothing", "Nullable",
    "Point", "Polygon", "QBit", "Ring", "SimpleAggregateFunction", "String", "Tuple", "UInt128", "UInt16",
    "UInt256", "UInt32", "UInt64", "UInt8", "UUID", "Variant",
})
TYPE_NAMES_ANY_CASE = frozenset({  # lower-cased: ClickHouse reads these in any case
    "bigint", "binary", "bit", "blob", "bool", "boolean", "byte", "bytea", "char", "character", "clob", "date",
    "date32", "datetime", "datetime32", "datetime64", "dec", "decimal", "decimal128", "decimal256", "decimal32",
    "decimal64", "double", "enum", "fixed", "float", "inet4", "inet6", "int", "int1", "integer", "json", "longblob",
    "longtext", "mediumblob", "mediumint", "mediumtext", "nchar", "numeric", "nvarchar", "real", "set", "signed",
    "single", "smallint", "text", "time", "time64", "timestamp", "tinyblob", "tinyint", "tinytext", "unsigned",
    "varbinary", "varchar", "varchar2", "year",
})
_AGGREGATE_TYPES = frozenset({"AggregateFunction", "SimpleAggregateFunction"})  # their first argument: a function


class StructureError(ValueError):
    """The text is not a plain column structure (the message says where)."""


def _tokens(text: str) -> list[tuple[str, str]]:
    """(kind, text) pairs: name, number, string or punctuation; StructureError on anything else."""
    out: list[tuple[str, str]] = []
    at = 0
    while True:
        while at < len(text) and text[at].isspace():
            at += 1
        if at == len(text):
            return out
        m = _TOKEN.match(text, at)
        if m is None:
            raise StructureError(f"unexpected {text[at:at + 20]!r}")
        kind = m.lastgroup or ""
        out.append((kind, m.group(kind)))
        at = m.end()


class _Parser:
    """Recursive descent over the tokens: `columns` reads the whole structure or raises StructureError."""

    def __init__(self, tokens: list[tuple[str, str]]) -> None:
        self.tokens, self.i = tokens, 0

    def peek(self, offset: int = 0) -> tuple[str, str] | None:
        j = self.i + offset
        return self.tokens[j] if j < len(self.tokens) else None

    def peek_kind(self) -> str | None:
        token = self.peek()
        return token[0] if token else None

    def take(self, kind: str, text: str | None = None) -> str:
        token = self.peek()
        if token is None or token[0] != kind or text is not None and token[1] != text:
            found = "the end" if token is None else repr(token[1])
            raise StructureError(f"expected {repr(text) if text else 'a ' + kind}, found {found}")
        self.i += 1
        return token[1]

    def columns(self) -> None:
        while True:
            self.take("name")
            self.a_type(0)
            if self.peek() is None:
                return
            self.take("punct", ",")

    def a_type(self, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise StructureError("types nested too deep")
        name = self.take("name")
        if name not in TYPE_NAMES and name.lower() not in TYPE_NAMES_ANY_CASE:
            raise StructureError(f"{name!r} is not a ClickHouse data type")
        if self.peek() == ("punct", "("):
            self.i += 1
            if name in _AGGREGATE_TYPES:  # AggregateFunction([version,] quantiles(0.5, 0.9), UInt64): the name is
                if self.peek_kind() == "number":  # checked by olap/allowlist.py check_aggregate_types, as in every
                    self.i += 1  # string literal
                    self.take("punct", ",")
                self.function()
            elif self.peek() != ("punct", ")"):
                self.argument(depth + 1)
            while self.peek() == ("punct", ","):
                self.i += 1
                self.argument(depth + 1)
            self.take("punct", ")")

    def function(self) -> None:
        """An aggregate function's name, with parameters that are numbers or strings."""
        self.take("name")
        if self.peek() == ("punct", "("):
            self.i += 1
            while self.peek() != ("punct", ")"):
                token = self.peek()
                if token is None or token[0] not in ("number", "string"):
                    raise StructureError("an aggregate function's parameters must be numbers or strings")
                self.i += 1
                if self.peek() == ("punct", ","):
                    self.i += 1
            self.take("punct", ")")

    def argument(self, depth: int) -> None:
        token = self.peek()
        if token is None:
            raise StructureError("unclosed '('")
        kind = token[0]
        if kind == "number":
            self.i += 1
        elif kind == "string":
            self.i += 1
            if self.peek() == ("punct", "="):  # Enum8('a' = 1)
                self.i += 1
                self.take("number")
        elif kind == "name" and (self.peek(1) or ("", ""))[0] == "name":  # Tuple(a String)
            self.i += 1
            self.a_type(depth)
        else:
            self.a_type(depth)


def check_structure(text: str) -> None:
    """Raise StructureError unless `text` is a plain column structure (module doc)."""
    if len(text) > MAX_STRUCTURE:
        raise StructureError(f"longer than {MAX_STRUCTURE} characters")
    tokens = _tokens(text)
    if not tokens:
        raise StructureError("empty")
    _Parser(tokens).columns()

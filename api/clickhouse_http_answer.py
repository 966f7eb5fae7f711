"""What the ClickHouse-compatible endpoint answers (ADR 50): ClickHouse's error shape, the analyst server's
answer relayed with ClickHouse's headers, and HTTP compression of it when the client asks.

Errors: `Code: <n>. DB::Exception: <message>. (<NAME>) (version <v>)` as text, with
`X-ClickHouse-Exception-Code: <n>`, so ClickHouse clients raise their usual exceptions (clickhouse-connect:
DatabaseError with the message and `code`).

Compression: with `enable_http_compression=1`, the first of gzip, deflate, zstd and lz4 (lz4 frame) that the
request's Accept-Encoding names (ClickHouse's own order), flushed per chunk so a streamed answer still streams;
`http_zlib_compression_level` (1-9) for gzip and deflate, ClickHouse's default 3 otherwise.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable, Iterable, Iterator

import lz4.frame
import orjson
from backports import zstd
from flask import Response

from api.analyst_proxy import Upstream
from olap.ch_errors import exception_text

DISPLAY_NAME = "tally"
VERSION = "tally"  # what `(version ...)` says in errors: the ClickHouse behind it is not named to clients
ENCODINGS = ("gzip", "deflate", "zstd", "lz4")
DEFAULT_ZLIB_LEVEL = 3
READ_AHEAD = 256 * 1024  # an answer up to this size goes out with a Content-Length (connection kept open)
# The ClickHouse code for an analyst-server answer that carries none, by HTTP status.
_BY_STATUS = {400: 36, 401: 1001, 413: 396, 429: 202, 503: 210, 504: 159}
_THEIR_CODE = re.compile(r"Code: (\d{1,4})\. DB::Exception: ")


class ChError(Exception):
    """A refusal or failure of the endpoint, answered in ClickHouse's shape."""

    def __init__(self, status: int, code: int, message: str, retry_after: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.retry_after = status, code, message, retry_after
        self.sql: str | None = None  # the query, when it was read before the refusal (for the audit log)
        self.token_id: str | None = None  # the verified token a 403 refused (for the audit log)


def error_response(exc: ChError, query_id: str | None = None) -> Response:
    resp = Response(exception_text(exc.code, exc.message, VERSION), status=exc.status,
                    content_type="text/plain; charset=UTF-8")
    resp.headers["X-ClickHouse-Exception-Code"] = str(exc.code)
    resp.headers["X-ClickHouse-Server-Display-Name"] = DISPLAY_NAME
    if query_id:
        resp.headers["X-ClickHouse-Query-Id"] = query_id
    if exc.retry_after:
        resp.headers["Retry-After"] = exc.retry_after
    if exc.status == 401:
        resp.headers["WWW-Authenticate"] = 'Basic realm="tally", charset="UTF-8"'
    return resp


def upstream_error(upstream: Upstream) -> ChError:
    """The analyst server's error answer (JSON, small) as ClickHouse's."""
    raw = b"".join(upstream.body)
    try:
        found = orjson.loads(raw).get("error") or {}
    except (orjson.JSONDecodeError, AttributeError):
        found = {}
    message = str(found.get("message") or f"the analyst server answered {upstream.status}")
    code = found.get("clickhouse_code")
    theirs = _THEIR_CODE.match(message)  # ClickHouse's own text: its code is the one the message names
    if theirs is not None:
        code = int(theirs.group(1))
    if not isinstance(code, int):
        code = _BY_STATUS.get(upstream.status, 1001)
    return ChError(upstream.status, code, message, upstream.retry_after)


def read_ahead(chunks: Iterator[bytes], limit: int) -> tuple[list[bytes], bool, BaseException | None]:
    """Up to about `limit` bytes of `chunks`: (what came, whether that was all, the failure that ended them)."""
    head: list[bytes] = []
    size = 0
    try:
        while size < limit:
            chunk = next(chunks)
            head.append(chunk)
            size += len(chunk)
    except StopIteration:
        return head, True, None
    except Exception as exc:  # the analyst server cut its answer: the endpoint's is cut the same way
        return head, False, exc
    return head, False, None


def _then(head: list[bytes], rest: Iterator[bytes], failure: BaseException | None) -> Iterator[bytes]:
    try:
        yield from head
        if failure is not None:
            raise failure
        yield from rest
    finally:
        close = getattr(rest, "close", None)
        if close is not None:
            close()


def _with_size(summary: str | None, size: int) -> str:
    """X-ClickHouse-Summary with `result_bytes`, once the whole answer is known."""
    try:
        found = orjson.loads(summary or "{}")
    except orjson.JSONDecodeError:
        found = {}
    if not isinstance(found, dict):
        found = {}
    found["result_bytes"] = str(size)
    return orjson.dumps(found).decode()


def relay(upstream: Upstream, accept_encoding: str, compress: bool, level: int | None) -> Response:
    """A 200 answer of the analyst server as the endpoint's, compressed if asked for and possible.

    An answer that ends within READ_AHEAD bytes goes out whole with a Content-Length, which keeps the client's
    connection open for its next query (waitress closes the connection after every chunked answer); a longer
    one streams, chunked."""
    head, ended, failure = read_ahead(upstream.body, READ_AHEAD)
    body: Iterable[bytes] | bytes = b"".join(head) if ended else _then(head, upstream.body, failure)
    resp_headers = {"X-ClickHouse-Server-Display-Name": DISPLAY_NAME, **upstream.headers}
    resp_headers.pop("X-Tally-Format", None)
    if isinstance(body, bytes):
        summary = next((resp_headers.pop(k) for k in list(resp_headers) if k.lower() == "x-clickhouse-summary"), None)
        resp_headers["X-ClickHouse-Summary"] = _with_size(summary, len(body))
    encoding = choose_encoding(accept_encoding) if compress else None
    if encoding is not None:
        if isinstance(body, bytes):
            body = b"".join(compressed((body,), encoding, level))
        else:
            body = compressed(body, encoding, level)
        resp_headers["Content-Encoding"] = encoding
        resp_headers["Vary"] = "Accept-Encoding"
    return Response(body, status=200, content_type=upstream.content_type, headers=resp_headers)


def choose_encoding(accept_encoding: str) -> str | None:
    """The encoding to answer in: as ClickHouse chooses, the first of gzip, deflate, zstd, lz4 that the
    client's Accept-Encoding names (without `q=0`), or None."""
    offered = set()
    for part in accept_encoding.split(","):
        name, _, params = part.strip().partition(";")
        if params.replace(" ", "").lower() not in ("q=0", "q=0.0", "q=0.00", "q=0.000"):
            offered.add(name.strip().lower())
    return next((name for name in ENCODINGS if name in offered), None)


def _compressor(encoding: str, level: int | None) -> tuple[Callable[[bytes], bytes], Callable[[], bytes]]:
    """(compress a chunk and flush it, finish) for one answer."""
    if encoding in ("gzip", "deflate"):
        wbits = 31 if encoding == "gzip" else 15
        z = zlib.compressobj(level or DEFAULT_ZLIB_LEVEL, zlib.DEFLATED, wbits)
        return (lambda chunk: z.compress(chunk) + z.flush(zlib.Z_SYNC_FLUSH)), z.flush
    if encoding == "zstd":
        zc = zstd.ZstdCompressor()
        return (lambda chunk: zc.compress(chunk, zstd.ZstdCompressor.FLUSH_BLOCK)), \
            (lambda: zc.flush(zstd.ZstdCompressor.FLUSH_FRAME))
    lc = lz4.frame.LZ4FrameCompressor(auto_flush=True)
    started: list[bytes] = [lc.begin()]

    def lz4_chunk(chunk: bytes) -> bytes:
        head = started.pop() if started else b""
        return head + bytes(lc.compress(chunk))

    def lz4_end() -> bytes:
        return (started.pop() if started else b"") + bytes(lc.flush())

    return lz4_chunk, lz4_end


def compressed(chunks: Iterable[bytes], encoding: str, level: int | None) -> Iterator[bytes]:
    """`chunks` compressed as `encoding`, each flushed so the client can read what came so far. An upstream
    failure propagates (the response is cut, never ended cleanly)."""
    compress, finish = _compressor(encoding, level)
    source = iter(chunks)
    try:
        for chunk in source:
            if chunk:
                yield compress(chunk)
        yield finish()
    finally:
        close = getattr(source, "close", None)
        if close is not None:
            close()


def decompress_body(data: bytes, encoding: str, limit: int) -> bytes:
    """A request body sent with Content-Encoding, at most `limit` bytes once decompressed."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return data
    if encoding not in ("gzip", "deflate", "x-gzip", "zstd", "lz4"):
        raise ChError(400, 36, f"Content-Encoding {encoding[:20]!r} is not supported; send the body plain or as "
                               f"{', '.join(ENCODINGS)}")
    try:
        out = _decompress(data, encoding, limit)
    except Exception:  # zlib.error, ZstdError, lz4's RuntimeError: whatever the body is, it is not that encoding
        raise ChError(400, 271, f"Cannot decompress the request body: it is not valid {encoding} (its "
                                "Content-Encoding); send it plain or compressed as the header says") from None
    if len(out) > limit:
        raise ChError(400, 62, f"the query is longer than {limit} bytes once decompressed")
    return bytes(out)


def _decompress(data: bytes, encoding: str, limit: int) -> bytes:
    """At most `limit` + 1 bytes of `data` decompressed; raises the codec's error for data not in `encoding`."""
    if encoding in ("gzip", "deflate", "x-gzip"):
        d = zlib.decompressobj(47)  # gzip or zlib header, detected
        out = d.decompress(data, limit + 1)
        if not d.eof and len(out) <= limit:
            raise zlib.error("truncated")
        return bytes(out)
    if encoding == "zstd":
        return bytes(zstd.ZstdDecompressor().decompress(data, max_length=limit + 1))
    return bytes(lz4.frame.LZ4FrameDecompressor().decompress(data, max_length=limit + 1))

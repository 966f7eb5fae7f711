"""The machinery of the one settings table in core/config.py (ADR 41): a record per setting, defaults
derived from other settings, and a parser per kind of value (each validates the text and says, for the
README, what it accepts). `ConfigError` lives here so the parsers can raise it; core.config re-exports it.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar, cast
from urllib.parse import urlsplit


class ConfigError(ValueError):
    """A configuration value is missing or invalid; the message names the variable."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"{variable}: {problem}")
        self.variable = variable
        self.problem = problem


# --- The table's machinery: a parser per kind of value, derived defaults, one record per setting. ---

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)
V = TypeVar("V")
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class Parser(Protocol[T_co]):
    """Turns a variable's text (stripped, never empty: empty means the default) into its value, or raises
    ConfigError naming the variable."""

    @property
    def accepts(self) -> str:
        """What the variable accepts, for the README's settings table."""
        ...

    def __call__(self, name: str, text: str) -> T_co: ...


@dataclass(frozen=True, slots=True)
class Derived(Generic[T_co]):
    """A default computed from the settings declared above it (`values`: field name -> value read)."""

    compute: Callable[[Mapping[str, object]], T_co]
    shown: str  # the README's default column; "{value}" there is the value when every setting is unset


@dataclass(frozen=True, slots=True)
class Setting(Generic[T]):
    """One setting: its variable, its default, how its text is parsed and checked, and the README's line.

    `shown` overrides how the README shows a plain default (a `Derived` one says it itself)."""

    variable: str
    default: T | Derived[T]
    parse: Parser[T]
    doc: str
    shown: str | None = None

    def read(self, env: Mapping[str, str], values: Mapping[str, object]) -> T:
        text = (env.get(self.variable) or "").strip()
        if text:
            return self.parse(self.variable, text)
        if isinstance(self.default, Derived):
            return cast(T, self.default.compute(values))
        return self.default


_SPEC = "tally.setting"


def setting(variable: str, default: T | Derived[T], parse: Parser[T], doc: str, *,
            shown: str | None = None, secret: bool = False) -> T:
    """Declare a `Settings` field read from `variable` (a secret one is kept out of `repr`).

    Typed like `dataclasses.field`: it returns the field specifier, which mypy sees as the field's value."""
    spec = Setting(variable, default, parse, doc, shown)
    return cast(T, field(repr=not secret, metadata={_SPEC: spec}))


def fields_table(cls: type) -> dict[str, Setting[Any]]:
    """A dataclass's settings, field name -> Setting, in declaration order (fields not made by `setting`
    are left out)."""
    return {f.name: f.metadata[_SPEC] for f in dataclasses.fields(cls) if _SPEC in f.metadata}


def earlier(values: Mapping[str, object], name: str, kind: type[V]) -> V:
    """A value read above the setting being derived (declaration order is the reading order)."""
    value = values[name]
    if not isinstance(value, kind):
        raise TypeError(f"{name} is {type(value).__name__}, not {kind.__name__}")
    return value


def plain_number(number: float) -> str:
    """A number as the README shows it: 1000.0 -> "1000", 0.05 -> "0.05"."""
    return str(int(number)) if float(number).is_integer() else repr(float(number))


def size_text(n: int) -> str:
    """Bytes as the README shows them: 262144 -> '256 KiB' (exact units only; else the number)."""
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return str(n)


@dataclass(frozen=True, slots=True)
class Integer:
    lo: int
    hi: int
    size: bool = False  # a byte count: the README shows KiB/MiB/...

    @property
    def accepts(self) -> str:
        show = size_text if self.size else str
        return f"{'bytes' if self.size else 'integer'}, {show(self.lo)} to {show(self.hi)}"

    def __call__(self, name: str, text: str) -> int:
        try:
            number = int(text)
        except ValueError:
            raise ConfigError(name, f"{text!r} is not an integer") from None
        if not self.lo <= number <= self.hi:
            raise ConfigError(name, f"{number} is out of range [{self.lo}, {self.hi}]")
        return number


@dataclass(frozen=True, slots=True)
class Number:
    lo: float
    hi: float

    @property
    def accepts(self) -> str:
        return f"number, {plain_number(self.lo)} to {plain_number(self.hi)}"

    def __call__(self, name: str, text: str) -> float:
        try:
            number = float(text)
        except ValueError:
            raise ConfigError(name, f"{text!r} is not a number") from None
        if not self.lo <= number <= self.hi:
            raise ConfigError(name, f"{number} is out of range [{self.lo}, {self.hi}]")
        return number


@dataclass(frozen=True, slots=True)
class Text:
    min_len: int

    @property
    def accepts(self) -> str:
        return f"{self.min_len}+ characters"

    def __call__(self, name: str, text: str) -> str:
        if len(text) < self.min_len:
            raise ConfigError(name, f"must be at least {self.min_len} characters long")
        return text


@dataclass(frozen=True, slots=True)
class Match:
    pattern: str
    explain: str  # the message after the refused value
    accepts: str

    def __call__(self, name: str, text: str) -> str:
        if not re.fullmatch(self.pattern, text):
            raise ConfigError(name, f"{text!r} {self.explain}")
        return text


def resolve_path(path: Path) -> Path:
    return path.expanduser().resolve()


@dataclass(frozen=True, slots=True)
class PathValue:
    accepts: str = "a path (`~` expands; relative to the working directory)"

    def __call__(self, name: str, text: str) -> Path:
        return resolve_path(Path(text))


@dataclass(frozen=True, slots=True)
class LogDir:
    accepts: str = "a path, or `-`"

    def __call__(self, name: str, text: str) -> Path | None:
        return None if text == "-" else resolve_path(Path(text))


@dataclass(frozen=True, slots=True)
class MaxMindFile:
    """A readable MaxMind DB (`.mmdb`) file: a bad path fails at startup, named. Checked by its metadata
    marker (the format's last 128 KiB hold it); the collector then opens it with `maxminddb`."""

    accepts: str = "a path to a MaxMind DB (`.mmdb`) file"
    marker: bytes = b"\xab\xcd\xefMaxMind.com"

    def __call__(self, name: str, text: str) -> Path:
        path = resolve_path(Path(text))
        try:
            with path.open("rb") as file:
                size = file.seek(0, 2)
                file.seek(max(0, size - 128 * 1024))
                tail = file.read()
        except OSError as exc:
            raise ConfigError(name, f"cannot read {path} ({exc.strerror or exc})") from None
        if self.marker not in tail:
            raise ConfigError(name, f"{path} is not a MaxMind DB (.mmdb) file")
        return path


_LABEL = r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?"
_HOST_RE = re.compile(r"\.?(?=.{1,253}$)" + _LABEL + r"(\." + _LABEL + r")*")


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class Hosts:
    accepts: str = "host names or IP addresses, comma-separated (no port, no `*`)"

    def __call__(self, name: str, text: str) -> tuple[str, ...]:
        hosts = []
        for part in text.split(","):
            host = part.strip().lower().strip("[]")
            if not host:
                continue
            if host == "*":
                raise ConfigError(name, "'*' would allow DNS rebinding; list the host names this server answers to")
            if not (_HOST_RE.fullmatch(host) or _is_ip(host)):
                raise ConfigError(name, f"{part.strip()!r} is not a host name or IP address (no port, no scheme)")
            hosts.append(host)
        if not hosts:
            raise ConfigError(name, "lists no host")
        return tuple(dict.fromkeys(hosts))


@dataclass(frozen=True, slots=True)
class Networks:
    """Comma-separated IP networks in CIDR notation (a bare address is its /32 or /128)."""

    accepts: str = "IP networks (CIDR), comma-separated"

    def __call__(self, name: str, text: str) -> tuple[Network, ...]:
        nets = []
        for part in text.split(","):
            if not part.strip():
                continue
            try:
                nets.append(ipaddress.ip_network(part.strip(), strict=False))
            except ValueError:
                raise ConfigError(name, f"{part.strip()[:60]!r} is not an IP network "
                                        "(e.g. 10.0.0.0/8, ::1/128)") from None
        if not nets:
            raise ConfigError(name, "lists no network")
        return tuple(nets)


@dataclass(frozen=True, slots=True)
class Bootstrap:
    accepts: str = "`host:port`, comma-separated"

    def __call__(self, name: str, text: str) -> tuple[str, ...]:
        servers = tuple(part.strip() for part in text.split(",") if part.strip())
        for server in servers:
            host, sep, port = server.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ConfigError(name, f"{server!r} is not host:port (comma-separate several brokers)")
        if not servers:
            raise ConfigError(name, "lists no broker")
        return servers


@dataclass(frozen=True, slots=True)
class Dsn:
    schemes: tuple[str, ...]

    @property
    def accepts(self) -> str:
        return "URL: " + ", ".join(f"`{scheme}://`" for scheme in self.schemes)

    def __call__(self, name: str, text: str) -> str:
        parts = urlsplit(text)
        if parts.scheme not in self.schemes:
            raise ConfigError(name, f"scheme {parts.scheme or '(none)'!r} is not one of {', '.join(self.schemes)}")
        if parts.scheme == "chdb":
            if not parts.path.startswith("/") or parts.netloc:
                raise ConfigError(name, "a chDB DSN is chdb:///absolute/path/to/dir")
        elif parts.scheme in ("http", "https", "postgresql", "postgres") and not parts.hostname \
                and "host=" not in parts.query:
            raise ConfigError(name, "names no host")
        try:
            _ = parts.port
        except ValueError:
            raise ConfigError(name, "has an invalid port") from None
        return text

"""What every `tally` command shares (ADR 40): its parser class, the exit codes, and how the expected
failures (a closed pipe, Ctrl-C, a store that is down) end without a traceback."""

from __future__ import annotations

import argparse
import os
import select
import stat
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NoReturn, TypeAlias

from tally.timespec import parse_seconds

OK, FINDING, USAGE = 0, 1, 2  # 1: a finding, a difference or a failure the message names; 2: usage or config
INTERRUPTED, BROKEN_PIPE = 130, 141  # 128 + SIGINT, 128 + SIGPIPE, as shells report them

EXIT_CODES = ("exit codes: 0 ok; 1 a finding, a difference or a failure (the message says which); "
              "2 a usage or configuration error; 130 interrupted (Ctrl-C); 141 the reader closed the output")


WAIT_MIN_S, WAIT_MAX_S, WAIT_DEFAULT_S = 1.0, 3600.0, 60.0  # every command's --wait (0 would give up at once)


class CommandParser(argparse.ArgumentParser):
    """A subcommand's parser: an argument it does not know is its own usage error (`usage: tally <c> ...`,
    exit 2), not the top-level parser's, and its --help ends with the exit codes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("epilog", EXIT_CODES)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                         namespace: argparse.Namespace | None = None) -> tuple[argparse.Namespace, list[str]]:
        # typeshed types `args` as a list; argparse takes any sequence. Strict: extras are an error here.
        parsed, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed, extras

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(USAGE, f"{self.prog}: error: {message}\n")


if TYPE_CHECKING:  # the type of `sub` that each module's register(sub) receives (generic only to type checkers)
    SubParsers: TypeAlias = argparse._SubParsersAction[CommandParser]


def add_wait_argument(parser: argparse.ArgumentParser, what: str) -> None:
    """`--wait DURATION`, one rule for every command that waits: 1s to 1h, default 60 s (`wait_seconds`)."""
    parser.add_argument("--wait", default=f"{WAIT_DEFAULT_S:g}", metavar="DURATION",
                        help=f"how long to wait {what}: 30s, 2m, or seconds (1s to 1h; default 60)")


def wait_seconds(text: str) -> float:
    """`--wait`'s value in seconds, within [WAIT_MIN_S, WAIT_MAX_S]; raises TimeSyntaxError naming it,
    which the command prints as `tally <command>: --wait must be between 1s and 1h (got 0)`, exit 2."""
    return parse_seconds(text, "--wait", low=WAIT_MIN_S, high=WAIT_MAX_S)


def stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reading end has been closed (poll reports POLLERR for it on Linux
    and the BSDs); False when it cannot tell."""
    try:
        fd = sys.stdout.fileno()
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return False
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):  # no stdout, a closed one, or no poll() here
        return False


def quiet_stdout() -> None:
    """The reader of our stdout went away (`tally ... | head`): point stdout at /dev/null, so that
    the interpreter's final flush does not fail again with a traceback of its own."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)


def expected_failure(exc: BaseException) -> str | None:
    """The message for a failure that a command can meet in normal use without a bug (a store or the
    broker down), or None: anything else is a bug and keeps its traceback."""
    from core.logs import redact

    psycopg = sys.modules.get("psycopg")
    if psycopg is not None and isinstance(exc, psycopg.OperationalError):
        text = str(exc).strip()
        first = redact(text.splitlines()[0]) if text else type(exc).__name__
        return f"cannot reach PostgreSQL ({first}); is `tally up` running, or TALLY_PG_DSN right?"
    kafka_errors = sys.modules.get("kafka.errors")
    names = ("NoBrokersAvailable", "KafkaTimeoutError", "KafkaConnectionError")  # as kafka-python versions name it
    unreachable = tuple(getattr(kafka_errors, name) for name in names if hasattr(kafka_errors, name))
    if unreachable and isinstance(exc, unreachable):
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return f"cannot reach the Kafka broker ({first}); is `tally up` running, or TALLY_KAFKA_BOOTSTRAP right?"
    return None

"""The spool's group commit: concurrent appends share one write + fdatasync, and share its failure."""

from __future__ import annotations

import errno
import os
import threading

import pytest

from spool import segments as spool_module
from spool.segments import SpoolFull, SpoolWriter, read_record, segment_records


def read_lines(directory) -> list[bytes]:
    lines = []
    for path in sorted(directory.glob("*")):
        if path.is_file():
            lines += [read_record(line) for line in segment_records(path.read_bytes())]
    return lines


def hold_first_fdatasync(monkeypatch) -> tuple[threading.Event, threading.Event]:
    """The first fdatasync blocks until released, so every other append queues behind it."""
    entered, release = threading.Event(), threading.Event()
    real = os.fdatasync
    calls = []

    def slow(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 1:
            entered.set()
            assert release.wait(10)
        real(fd)

    monkeypatch.setattr(spool_module.os, "fdatasync", slow)
    return entered, release


def test_appends_that_arrive_during_a_flush_share_the_next_one(tmp_path, monkeypatch):
    writer = SpoolWriter(tmp_path, max_bytes=1 << 20, max_age_s=3600)
    entered, release = hold_first_fdatasync(monkeypatch)
    first = threading.Thread(target=writer.append, args=([b'{"n": 0}'],))
    first.start()
    assert entered.wait(10)  # the leader is inside its fdatasync
    done = []
    followers = [threading.Thread(target=lambda i=i: (writer.append([f'{{"n": {i}}}'.encode()] * 2), done.append(i)))
                 for i in range(1, 21)]
    for t in followers:
        t.start()
    while len(writer._batch.parts) < 20:  # all twenty joined the group behind the flush
        threading.Event().wait(0.01)
    assert done == []  # nobody returned before their bytes were durable
    release.set()
    first.join(10)
    for t in followers:
        t.join(10)
    assert sorted(done) == list(range(1, 21))
    assert writer.flushes == 2  # the leader's flush, then ONE flush for all twenty followers
    lines = read_lines(tmp_path)
    assert len(lines) == 41 and lines[0] == b'{"n": 0}'
    assert sorted(lines[1:]) == sorted(f'{{"n": {i}}}'.encode() for i in range(1, 21) for _ in range(2))
    writer.close()


def test_a_failed_group_flush_fails_every_caller_in_it_and_leaves_none_of_their_lines(tmp_path, monkeypatch):
    writer = SpoolWriter(tmp_path, max_bytes=1 << 20, max_age_s=3600)
    writer.append([b'{"kept": 1}'])
    entered, release = hold_first_fdatasync(monkeypatch)
    leader = threading.Thread(target=writer.append, args=([b'{"kept": 2}'],))
    leader.start()
    assert entered.wait(10)
    real_write = os.write

    def torn_then_full(fd, data):
        real_write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    errors = []

    def follower(i: int) -> None:
        try:
            writer.append([f'{{"lost": {i}}}'.encode()])
        except SpoolFull as exc:
            errors.append(exc)

    followers = [threading.Thread(target=follower, args=(i,)) for i in range(8)]
    for t in followers:
        t.start()
    while len(writer._batch.parts) < 8:
        threading.Event().wait(0.01)
    monkeypatch.setattr(spool_module.os, "write", torn_then_full)
    release.set()
    leader.join(10)
    for t in followers:
        t.join(10)
    assert len(errors) == 8  # each caller of the failed flush was told, none got a success
    monkeypatch.undo()
    assert read_lines(tmp_path) == [b'{"kept": 1}', b'{"kept": 2}']  # the torn group was truncated away
    writer.append([b'{"kept": 3}'])  # and the writer recovers by itself
    assert read_lines(tmp_path)[-1] == b'{"kept": 3}'
    writer.close()


@pytest.mark.parametrize("threads", [1, 16])
def test_many_concurrent_appends_are_all_written_once(tmp_path, threads):
    writer = SpoolWriter(tmp_path, max_bytes=64 * 1024, max_age_s=3600)  # small segments: sealing mid-stream

    def work(t: int) -> None:
        for i in range(100):
            writer.append([f'{{"t": {t}, "i": {i}}}'.encode()])

    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    writer.close()
    lines = read_lines(tmp_path)
    assert len(lines) == len(set(lines)) == threads * 100
    assert writer.flushes <= threads * 100


def test_an_unexpected_error_in_a_group_flush_fails_every_member_and_none_returns_success(tmp_path, monkeypatch):
    writer = SpoolWriter(tmp_path, max_bytes=1 << 20, max_age_s=3600)
    entered, release = hold_first_fdatasync(monkeypatch)
    leader = threading.Thread(target=writer.append, args=([b'{"kept": 1}'],))
    leader.start()
    assert entered.wait(10)
    outcomes: list[object] = []

    def member(i: int) -> None:
        try:
            writer.append([f'{{"lost": {i}}}'.encode()])
            outcomes.append("returned")
        except BaseException as exc:
            outcomes.append(exc)

    members = [threading.Thread(target=member, args=(i,)) for i in range(4)]
    for t in members:
        t.start()
    while len(writer._batch.parts) < 4:
        threading.Event().wait(0.01)
    monkeypatch.setattr(writer, "write_durably", lambda data: (_ for _ in ()).throw(RuntimeError("bug")))
    release.set()
    leader.join(10)
    for t in members:
        t.join(10)
    assert "returned" not in outcomes and len(outcomes) == 4
    assert all(isinstance(o, (OSError, RuntimeError)) for o in outcomes)
    assert any("the spool flush failed" in str(o) for o in outcomes)  # the group's leader re-raised the bug
    monkeypatch.undo()
    assert read_lines(tmp_path) == [b'{"kept": 1}']
    writer.close()

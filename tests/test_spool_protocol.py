"""The spool's file protocol (docs/adr/0028-spool-protocol.md): no interleaving of a writer with orphan
recovery loses or doubles an acknowledged line.

Two ways of forcing interleavings:
- deterministic: recovery runs at every single point of the writer's system calls in turn (create,
  lock, rename, write, fdatasync, seal ...), once per run, with the pid check on and off, and with
  `.new` files taken as stale at once;
- concurrent: another process runs recovery in a tight loop while a writer rotates its segment on every
  append, thousands of times.
Afterwards every acknowledged line must be in exactly one sealed segment, and nothing else may be.
"""

from __future__ import annotations

import fcntl
import multiprocessing
import os
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest

from spool import segments as spool_module
from spool.recovery import recover_orphans
from spool.segments import SpoolWriter, read_record, sealed_segments, segment_records

OS_CALLS = ("open", "rename", "write", "fdatasync", "fsync", "close", "fstat", "ftruncate", "statvfs")


class Interleaver:
    """Stands in for `os` and `fcntl` inside spool.segments: before the writer's system call number `at`
    (counting from 0), runs `action` once. Calls made by the action itself are not counted."""

    def __init__(self, at: int, action: Callable[[], None]) -> None:
        self.at, self.action = at, action
        self.calls: list[str] = []
        self._inside = False

    def _wrap(self, name: str, fn: Callable) -> Callable:
        def call(*args, **kwargs):
            if not self._inside:
                if len(self.calls) == self.at:
                    self._inside = True
                    try:
                        self.action()
                    finally:
                        self._inside = False
                self.calls.append(name)
            return fn(*args, **kwargs)

        return call

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        fake_os = SimpleNamespace(**{k: getattr(os, k) for k in dir(os) if not k.startswith("__")})
        for name in OS_CALLS:
            setattr(fake_os, name, self._wrap(name, getattr(os, name)))
        fake_fcntl = SimpleNamespace(LOCK_EX=fcntl.LOCK_EX, LOCK_NB=fcntl.LOCK_NB,
                                     flock=self._wrap("flock", fcntl.flock))
        monkeypatch.setattr(spool_module, "os", fake_os)
        monkeypatch.setattr(spool_module, "fcntl", fake_fcntl)


def sealed_lines(directory: Path) -> Counter[bytes]:
    return Counter(read_record(line) for seg in sealed_segments(directory)
                   for line in segment_records(seg.read_bytes()))


def write_some(directory: Path, n: int = 6) -> list[bytes]:
    """A writer whose segments are sealed every two appends; returns the lines it acknowledged."""
    writer = SpoolWriter(directory, max_bytes=2 * len(b'{"n": 0}\t00000000\n'), max_age_s=3600)
    acked = []
    for i in range(n):
        line = f'{{"n": {i}}}'.encode()
        try:
            writer.append([line])
        except OSError:  # not acknowledged: the client is told and retries
            continue
        acked.append(line)
    writer.close()
    return acked


def count_calls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> int:
    probe = Interleaver(-1, lambda: None)
    with monkeypatch.context() as m:
        probe.install(m)
        write_some(tmp_path / "probe")
    assert {"open", "flock", "write", "fdatasync"} <= set(probe.calls)
    return len(probe.calls)


@pytest.mark.parametrize("trust_pids", [True, False], ids=["pid-check", "locks-only"])
def test_recovery_at_any_point_of_the_writer_loses_and_doubles_nothing(tmp_path, monkeypatch, trust_pids):
    total = count_calls(tmp_path, monkeypatch)
    for at in range(total):
        directory = tmp_path / f"at-{at}"
        directory.mkdir()
        recoveries = []

        def recover(directory=directory, recoveries=recoveries) -> None:
            recoveries.append(recover_orphans(directory, new_grace_s=0.0, trust_pids=trust_pids))

        with monkeypatch.context() as m:
            Interleaver(at, recover).install(m)
            acked = write_some(directory)
        assert recoveries, f"recovery never ran at call {at}"
        recover_orphans(directory, new_grace_s=0.0, trust_pids=trust_pids)  # what the shipper finds afterwards
        assert sealed_lines(directory) == Counter(acked), f"recovery before the writer's call {at}"
        assert len(acked) == 6, f"recovery before call {at} made {6 - len(acked)} appends fail"
        assert [p.name for p in directory.iterdir() if p.is_file() and not p.name.endswith(".seg")] == []
        assert list(directory.glob("*/*")) == [], "a watermark outlived its open segment"


def test_a_writer_never_acknowledges_into_a_segment_that_lost_its_name(tmp_path):
    """If a segment were removed under its writer anyway (an operator, a buggy tool), the append fails
    instead of returning: the client retries and the line lands in a new segment."""
    writer = SpoolWriter(tmp_path, max_bytes=1 << 20, max_age_s=3600)
    writer.append([b'{"n": 1}'])
    (open_segment,) = tmp_path.glob("*.open")
    open_segment.unlink()
    with pytest.raises(OSError, match="removed while open"):
        writer.append([b'{"n": 2}'])
    writer.append([b'{"n": 2}'])  # the retry
    writer.close()
    assert sealed_lines(tmp_path) == Counter([b'{"n": 2}'])


def test_recovery_keeps_off_an_unlocked_segment_whose_writer_is_alive(tmp_path):
    writer = SpoolWriter(tmp_path, max_bytes=1 << 20, max_age_s=3600)
    writer.append([b'{"n": 1}'])
    (open_segment,) = tmp_path.glob("*.open")
    fcntl.flock(writer._fd, fcntl.LOCK_UN)  # as if the lock were lost: the pid (ours) still says "alive"
    assert recover_orphans(tmp_path) == 0 and open_segment.exists()
    assert recover_orphans(tmp_path, trust_pids=False) == 1  # without the pid check, the lock alone decides
    os.close(writer._fd)


def test_stale_new_files_go_and_fresh_ones_stay(tmp_path):
    stale, fresh = tmp_path / "h-1-1-000001.new", tmp_path / "h-1-2-000002.new"
    stale.touch()
    fresh.touch()
    os.utime(stale, (0, 0))
    assert recover_orphans(tmp_path) == 0
    assert not stale.exists() and fresh.exists()
    fd = os.open(fresh, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a writer holds it: never removed, however old
    os.utime(fresh, (0, 0))
    recover_orphans(tmp_path, new_grace_s=0.0)
    assert fresh.exists()
    os.close(fd)


def _recover_until(directory: str, stop: multiprocessing.synchronize.Event, passes: multiprocessing.Value) -> None:
    while not stop.is_set():
        recover_orphans(Path(directory), new_grace_s=0.0, trust_pids=False)
        with passes.get_lock():
            passes.value += 1


def test_writers_and_a_recovery_loop_in_another_process_lose_nothing(tmp_path):
    """Two writer threads seal and open a segment on every append (max_age_s=0) while another process
    recovers orphans as fast as it can, without the pid check: only the locks keep it off."""
    ctx = multiprocessing.get_context("spawn")
    stop, passes = ctx.Event(), ctx.Value("l", 0)
    recovery = ctx.Process(target=_recover_until, args=(str(tmp_path), stop, passes))
    recovery.start()
    writer = SpoolWriter(tmp_path, max_bytes=1 << 20, max_age_s=0.0)
    acked: list[bytes] = []
    failed = []

    def work(t: int) -> None:
        for i in range(1500):
            line = f'{{"t": {t}, "i": {i}}}'.encode()
            try:
                writer.append([line])
            except OSError as exc:
                failed.append(exc)
                continue
            acked.append(line)

    try:
        while passes.value == 0:
            threading.Event().wait(0.01)
        threads = [threading.Thread(target=work, args=(t,)) for t in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
    finally:
        stop.set()
        recovery.join(30)
    writer.close()
    recover_orphans(tmp_path, new_grace_s=0.0, trust_pids=False)
    assert passes.value > 100, "the recovery loop hardly ran"
    assert sealed_lines(tmp_path) == Counter(acked)
    assert len(acked) + len(failed) == 3000 and len(failed) < 30


def test_a_zombie_writer_counts_as_gone_and_a_live_one_as_running():
    """Recovery's pid check (core.pids): a killed writer that its parent has not reaped yet is a zombie, and
    its segment may be sealed once its lock is free; a live pid keeps recovery away."""
    import subprocess
    import sys
    import time

    from core.pids import pid_running

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 10
    while pid_running(child.pid):  # exited, not reaped: a zombie
        assert time.monotonic() < deadline, "a zombie was taken for a running process"
        time.sleep(0.01)
    assert os.kill(child.pid, 0) is None  # the kernel still knows the pid
    child.wait()
    assert pid_running(os.getpid()) and not pid_running(child.pid) and not pid_running(0)
    assert not pid_running("123") and not pid_running(True)  # only real pids


def test_a_pid_reused_after_the_segment_was_created_does_not_hold_recovery_back(tmp_path):
    """A restarted container keeps its host name and hands out the same small pids: an unlocked segment whose
    pid now belongs to a process that started after the segment was created is an orphan, sealed at once."""
    import socket
    import subprocess
    import sys
    import time

    from core.pids import started_at

    me = started_at(os.getpid())
    assert me is not None and abs(me - time.time()) < 86_400 * 365  # a plausible Unix time
    later = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # started after "created"
    try:
        before = time.time_ns() - 30 * 10**9  # the segment is 30 s older than that process
        orphan = tmp_path / f"{socket.gethostname()}-{later.pid}-{before:020d}-000001.open"
        orphan.write_bytes(b'{"n": 1}\t%08x\n' % 0)
        assert recover_orphans(tmp_path) == 1 and not orphan.exists()
        alive = tmp_path / f"{socket.gethostname()}-{os.getpid()}-{time.time_ns():020d}-000002.open"
        alive.write_bytes(b'{"n": 2}\t%08x\n' % 0)
        assert recover_orphans(tmp_path) == 0 and alive.exists()  # our pid, started before: may be its writer
    finally:
        later.kill()
        later.wait()

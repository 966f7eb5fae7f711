"""The embedded PostgreSQL is private to its user (issue 15, item 6): password (SCRAM) logins only, the
password in a 0600 file, and a data directory made by an older version (`initdb --auth=trust`) upgraded in
place at start, its data kept."""

from __future__ import annotations

import signal
import stat

import psycopg
import pytest

from infra.postgres import HBA, POSTGRES_BIN_PATH, EmbeddedPostgres, scram_verifier
from infra.processes import spawn, stop, wait_until


def passwordless(port: int) -> str:
    return f"postgresql://postgres@127.0.0.1:{port}/postgres"


def refused_without_password(port: int) -> None:
    with pytest.raises(psycopg.OperationalError) as refused:
        psycopg.connect(passwordless(port), connect_timeout=3)
    assert "password" in str(refused.value)


def make_legacy_data_dir(pg: EmbeddedPostgres) -> None:
    """What earlier versions left: initdb --auth=trust, a table with a row, served password-less."""
    pg.dir.mkdir(parents=True, exist_ok=True)
    pg.data_dir.mkdir(parents=True, exist_ok=True)
    if pg.user:
        pg._grant_system_user()
    pg._run("initdb", "-D", str(pg.data_dir), "--auth=trust", "--encoding=UTF8", "--locale=C", "-U", "postgres")
    assert "trust" in (pg.data_dir / "pg_hba.conf").read_text()
    pg._reach()
    old = spawn([str(POSTGRES_BIN_PATH / "postgres"), "-D", str(pg.data_dir), "-c", "listen_addresses=127.0.0.1",
                 "-c", f"port={pg.port}", "-c", "unix_socket_directories=", "-c", "fsync=off"],
                pg.dir / "legacy.log", user=pg.user)
    try:
        wait_until(lambda: bool(psycopg.connect(passwordless(pg.port), connect_timeout=1).close() or True),
                   what="legacy PostgreSQL", timeout=60, proc=old)
        with psycopg.connect(passwordless(pg.port), autocommit=True) as conn:  # anyone local could, back then
            conn.execute("CREATE TABLE kept (v text)")
            conn.execute("INSERT INTO kept VALUES ('from the trust era')")
    finally:
        stop(old, signal.SIGINT, timeout=30)


def test_a_trust_data_dir_is_upgraded_in_place_and_keeps_its_data(tmp_path):
    pg = EmbeddedPostgres(tmp_path / "pg" / "data", durable=False)
    make_legacy_data_dir(pg)
    pg.start()
    try:
        refused_without_password(pg.port)
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(f"postgresql://postgres:wrong@127.0.0.1:{pg.port}/postgres", connect_timeout=3)
        with psycopg.connect(pg.dsn) as conn:
            assert conn.execute("SELECT v FROM kept").fetchall() == [("from the trust era",)]
        assert (pg.data_dir / "pg_hba.conf").read_text() == HBA
        assert pg.password and pg.password_path.read_text().strip() == pg.password
        for path in (pg.password_path, pg.log_path):
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        assert stat.S_IMODE(pg.dir.stat().st_mode) == 0o700
    finally:
        pg.stop()
    # a later start reads the same password and changes nothing
    hba_mtime = (pg.data_dir / "pg_hba.conf").stat().st_mtime_ns
    again = EmbeddedPostgres(pg.data_dir, port=pg.port, durable=False).start()
    try:
        assert again.password == pg.password
        assert (again.data_dir / "pg_hba.conf").stat().st_mtime_ns == hba_mtime
        refused_without_password(again.port)
        with psycopg.connect(again.dsn) as conn:
            assert conn.execute("SELECT count(*) FROM kept").fetchone() == (1,)
    finally:
        again.stop()


def test_a_lost_password_file_gets_a_new_password(tmp_path):
    pg = EmbeddedPostgres(tmp_path / "pg" / "data", durable=False).start()
    pg.stop()
    first = pg.password
    pg.password_path.unlink()
    again = EmbeddedPostgres(pg.data_dir, durable=False).start()
    try:
        assert again.password != first
        with psycopg.connect(again.dsn) as conn:
            conn.execute("SELECT 1")
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(f"postgresql://postgres:{first}@127.0.0.1:{again.port}/postgres", connect_timeout=3)
    finally:
        again.stop()


def test_the_dsn_is_unknown_before_start(tmp_path):
    with pytest.raises(RuntimeError):
        _ = EmbeddedPostgres(tmp_path / "pg" / "data").dsn


def test_scram_verifier_matches_rfc_7677():
    """RFC 7677's SCRAM-SHA-256 example: user password 'pencil', salt W22ZaJ0SNY7soEsUEjb6gQ==, 4096 rounds."""
    import base64

    got = scram_verifier("pencil", salt=base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ=="))
    assert got == ("SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=:"
                   "wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU=")

"""Start-up against a database that is down or restarting: wait with bounded backoff, then give up clearly.

Real unreachable addresses (a unix socket directory with no server in it), a real embedded
server started while the service waits, and an injected sleep and clock so no test waits for
real. A failing or edited migration is not a connection problem: it stops the start-up at once.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest

from services.common.migrate import (
    DEFAULT_WAIT_SECONDS,
    WAIT_ENV,
    DatabaseUnreachable,
    MigrationError,
    migrate,
    migrate_when_ready,
    wait_seconds_from_env,
)
from tests.test_migrations import real_migration_files, recorded, write

REPO = Path(__file__).resolve().parents[1]


class FakeTime:
    """A monotonic clock that moves only when slept on; records every pause. `on_sleep` runs inside each."""

    def __init__(self, on_sleep=None):
        self.now = 500.0
        self.pauses: list[float] = []
        self.on_sleep = on_sleep

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.pauses.append(seconds)
        self.now += seconds
        if self.on_sleep is not None:
            self.on_sleep(len(self.pauses))


def must_not_sleep(seconds: float) -> None:
    raise AssertionError(f"retried (slept {seconds} s) on an error that waiting cannot fix")


def no_server_url(directory: Path, dbname: str = "postgres") -> str:
    """A unix-socket URL whose directory holds no server: connect fails at once, as with a stopped server."""
    directory.mkdir(parents=True, exist_ok=True)
    return f"postgresql://postgres:@/{dbname}?host={directory}"


def retry_lines(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage() == "database unreachable at start-up; retrying"]


# --- giving up -----------------------------------------------------------------------------------


def test_unreachable_database_is_retried_with_capped_backoff_until_the_deadline_then_gives_up(tmp_path, caplog):
    fake = FakeTime()
    caplog.set_level(logging.INFO, logger="services.common.migrate")

    with pytest.raises(DatabaseUnreachable) as info:
        migrate_when_ready(no_server_url(tmp_path / "sock"), wait_seconds=120, sleep=fake.sleep, clock=fake.clock)

    # 0.5 s doubling to the 10 s cap, the last pause cut to end exactly at the 120 s deadline.
    assert fake.pauses == [0.5, 1, 2, 4, 8] + [10] * 10 + [4.5]
    assert sum(fake.pauses) == 120
    message = str(info.value)
    assert "giving up" in message and "17 attempt(s)" in message and f"{WAIT_ENV}=120" in message
    assert "cannot connect to the database" in message
    lines = retry_lines(caplog)
    assert [r.attempt for r in lines] == list(range(1, 17))  # every attempt but the last, which gives up
    assert [r.retry_in_s for r in lines] == fake.pauses
    assert all(r.levelno == logging.ERROR and "cannot connect" in r.error for r in lines)


def test_a_zero_wait_tries_once_and_gives_up(tmp_path):
    fake = FakeTime()
    with pytest.raises(DatabaseUnreachable, match="1 attempt"):
        migrate_when_ready(no_server_url(tmp_path / "sock"), wait_seconds=0, sleep=fake.sleep, clock=fake.clock)
    assert fake.pauses == []


@pytest.mark.parametrize(
    "raw, expected",
    [(None, DEFAULT_WAIT_SECONDS), ("", DEFAULT_WAIT_SECONDS), ("30", 30.0), ("0", 0.0), ("2.5", 2.5)],
)
def test_the_wait_comes_from_the_environment_with_a_default_of_120_seconds(monkeypatch, raw, expected):
    if raw is None:
        monkeypatch.delenv(WAIT_ENV, raising=False)
    else:
        monkeypatch.setenv(WAIT_ENV, raw)
    assert wait_seconds_from_env() == expected


@pytest.mark.parametrize("raw", ["abc", "-1", "3601", "nan", "inf"])
def test_a_bad_wait_setting_is_refused_before_any_attempt(monkeypatch, tmp_path, raw):
    monkeypatch.setenv(WAIT_ENV, raw)
    with pytest.raises(MigrationError, match=WAIT_ENV) as info:
        migrate_when_ready(no_server_url(tmp_path / "sock"), sleep=must_not_sleep)
    assert not isinstance(info.value, DatabaseUnreachable)


# --- errors that waiting cannot fix --------------------------------------------------------------


def test_a_failing_migration_stops_at_once_without_retrying(empty_db_url, tmp_path):
    d = tmp_path / "m"
    write(d, "001_a.sql", "CREATE TABLE a (id int);")
    write(d, "002_broken.sql", "CREATE TABLE b (id int); SELECT no_such_function();")

    with pytest.raises(MigrationError, match="002_broken.sql failed") as info:
        migrate_when_ready(empty_db_url, d, wait_seconds=120, sleep=must_not_sleep)

    assert not isinstance(info.value, DatabaseUnreachable)
    assert [r[1] for r in recorded(empty_db_url)] == ["001_a.sql"]


def test_an_edited_migration_stops_at_once_without_retrying(empty_db_url, tmp_path):
    d = tmp_path / "m"
    path = write(d, "001_a.sql", "CREATE TABLE a (id int);")
    migrate(empty_db_url, d)
    path.write_text("CREATE TABLE a (id bigint);")

    with pytest.raises(MigrationError, match="edited after it was applied") as info:
        migrate_when_ready(empty_db_url, d, wait_seconds=120, sleep=must_not_sleep)
    assert not isinstance(info.value, DatabaseUnreachable)


def test_a_connection_lost_mid_migration_is_unreachable_and_the_file_is_not_recorded(empty_db_url, tmp_path):
    """A server restart during the run is the database's problem, not the file's: retrying is safe."""
    d = tmp_path / "m"
    write(d, "001_slow.sql", "CREATE TABLE slow (id int); SELECT pg_sleep(30);")
    dbname = psycopg.conninfo.conninfo_to_dict(empty_db_url)["dbname"]

    def terminate_the_migration() -> None:
        deadline = time.monotonic() + 10
        with psycopg.connect(empty_db_url, autocommit=True) as admin:
            while time.monotonic() < deadline:
                killed = admin.execute(
                    """SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                       WHERE datname = %s AND query LIKE %s AND pid <> pg_backend_pid()""",
                    (dbname, "%pg_sleep(30)%")).fetchall()
                if killed:
                    return
                time.sleep(0.01)

    killer = threading.Thread(target=terminate_the_migration)
    killer.start()
    try:
        with pytest.raises(DatabaseUnreachable, match="001_slow.sql"):
            migrate(empty_db_url, d)
    finally:
        killer.join()
    assert recorded(empty_db_url) == []
    # Run again (the quick form of the same file): the lost session's lock went with it.
    write(d, "001_slow.sql", "CREATE TABLE slow (id int);")
    assert migrate(empty_db_url, d) == ["001_slow.sql"]


# --- the server comes up -------------------------------------------------------------------------


def test_start_up_waits_for_a_server_that_comes_up_then_migrates(empty_db_url, tmp_path, caplog):
    """The socket directory stays empty for two attempts, then the server's socket appears in it.

    A server coming up is, to a client, its socket appearing; linking the test server's socket
    in makes that happen without the seconds an initdb would cost.
    """
    real = psycopg.conninfo.conninfo_to_dict(empty_db_url)
    socket_dir = tmp_path / "sock"
    url = no_server_url(socket_dir, real["dbname"])
    socket_name = f".s.PGSQL.{real.get('port') or 5432}"

    def the_server_comes_up(pauses: int) -> None:
        if pauses == 2:  # down for the first two attempts
            (socket_dir / socket_name).symlink_to(Path(real["host"]) / socket_name)

    fake = FakeTime(on_sleep=the_server_comes_up)
    caplog.set_level(logging.INFO, logger="services.common.migrate")

    applied = migrate_when_ready(url, wait_seconds=120, sleep=fake.sleep, clock=fake.clock)

    assert fake.pauses == [0.5, 1]
    assert applied == [p.name for p in real_migration_files()]
    assert [r[1] for r in recorded(empty_db_url)] == applied
    assert [r.attempt for r in retry_lines(caplog)] == [1, 2]
    done = [r for r in caplog.records if r.getMessage() == "database reachable; migrations checked"]
    assert [r.attempts for r in done] == [3]


# --- the service exits non-zero with a clear message ---------------------------------------------


def test_the_dispatcher_started_with_the_database_down_exits_1_saying_why(tmp_path):
    env = {**os.environ, "DATABASE_URL": no_server_url(tmp_path / "sock"), WAIT_ENV: "0"}
    proc = subprocess.run([sys.executable, "-m", "services.cli", "dispatcher", "--once"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "start-up failed: the database is not ready" in proc.stderr
    assert "DatabaseUnreachable" in proc.stderr and "giving up" in proc.stderr
    assert "Traceback" not in proc.stderr

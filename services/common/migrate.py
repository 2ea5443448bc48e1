"""Migrations: numbered plain SQL files in migrations/, applied in order, each once.

Each file runs in its own transaction and is recorded in `schema_migrations` with its sha256;
the whole run holds a session advisory lock, so concurrent service start-ups apply each file
once. A file that was applied and then edited, a gap or duplicate in the numbering, or a
failing statement stops the run with MigrationError (the CLI exits non-zero).

Services start with `migrate_when_ready`: a database that is down or restarting (no
connection, or the connection lost mid-run) is waited for with bounded exponential backoff
up to `OPS_DB_WAIT_SECONDS` (120 s by default); anything else still stops the start-up at once.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psycopg

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"
_NAME = re.compile(r"^(\d{3,})_[a-z0-9_]+\.sql$")
# An arbitrary constant shared by every process that migrates this database.
_LOCK_KEY = 0x0B5_9_1E


class MigrationError(RuntimeError):
    """The schema could not be brought up to date. Operator action: read the message; fix the file or the database."""


class DatabaseUnreachable(MigrationError):
    """No usable connection to the database: it is down, restarting, or refusing connections.

    Usually resolves itself (a restart, a failover); start-up waits for it. Operator action if
    it persists past the wait: check DATABASE_URL and the database's health.
    """


WAIT_ENV = "OPS_DB_WAIT_SECONDS"
DEFAULT_WAIT_SECONDS = 120.0
MAX_WAIT_SECONDS = 3600.0
FIRST_RETRY_SECONDS = 0.5
MAX_RETRY_SECONDS = 10.0
CONNECT_TIMEOUT_SECONDS = 10


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def discover(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    found: dict[int, Migration] = {}
    for path in sorted(directory.glob("*.sql")):
        m = _NAME.match(path.name)
        if not m:
            raise MigrationError(f"{path.name}: migration files are named NNN_description.sql")
        version = int(m.group(1))
        if version in found:
            raise MigrationError(f"{path.name}: version {version} is used twice")
        found[version] = Migration(version, path.name, path.read_text())
    versions = sorted(found)
    for prev, nxt in zip(versions, versions[1:]):
        if nxt != prev + 1:
            raise MigrationError(f"{found[nxt].name}: numbering gap after {found[prev].name} (a migration file is missing)")
    return [found[v] for v in versions]


def migrate(conninfo: str, directory: Path = MIGRATIONS_DIR) -> list[str]:
    """Apply pending migrations; return the names applied. Raises MigrationError."""
    migrations = discover(directory)
    applied_now: list[str] = []
    # Without a connect timeout, an address that drops packets hangs past any start-up deadline.
    timeout = {} if "connect_timeout" in conninfo else {"connect_timeout": CONNECT_TIMEOUT_SECONDS}
    try:
        conn = psycopg.connect(conninfo, autocommit=True, **timeout)
    except psycopg.OperationalError as e:
        raise DatabaseUnreachable(f"cannot connect to the database: {e}") from e
    try:
        with conn:
            _apply(conn, migrations, applied_now)
    except psycopg.OperationalError as e:
        if conn.broken:
            raise DatabaseUnreachable(f"lost the connection to the database: {e}") from e
        raise MigrationError(f"migration run failed: {e}") from e
    return applied_now


def _apply(conn: psycopg.Connection, migrations: list[Migration], applied_now: list[str]) -> None:
    conn.execute("SELECT pg_advisory_lock(%s)", (_LOCK_KEY,))
    try:
        conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version integer PRIMARY KEY,
                   name text NOT NULL,
                   checksum text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        done = {
            row[0]: (row[1], row[2])
            for row in conn.execute("SELECT version, name, checksum FROM schema_migrations")
        }
        for mig in migrations:
            if mig.version in done:
                name, checksum = done[mig.version]
                if checksum != mig.checksum:
                    raise MigrationError(
                        f"{mig.name} was edited after it was applied (recorded checksum "
                        f"{checksum[:12]}, file {mig.checksum[:12]}): add a new migration instead"
                    )
                continue
            try:
                with conn.transaction():
                    conn.execute(mig.sql)
                    conn.execute(
                        "INSERT INTO schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                        (mig.version, mig.name, mig.checksum),
                    )
            except psycopg.Error as e:
                if conn.broken:  # the server went away, the file is not at fault: safe to run again
                    raise DatabaseUnreachable(f"lost the connection while applying {mig.name} "
                                              f"(rolled back): {e}") from e
                raise MigrationError(f"{mig.name} failed and was rolled back: {e}") from e
            log.info("migration applied", extra={"migration": mig.name})
            applied_now.append(mig.name)
        unknown = sorted(set(done) - {m.version for m in migrations})
        if unknown:
            raise MigrationError(f"the database has migrations this code does not know: {unknown}")
    finally:
        if not conn.broken:  # a lost session has released its lock already
            conn.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_KEY,))


def wait_seconds_from_env() -> float:
    """OPS_DB_WAIT_SECONDS, or the default. A value that is not 0..3600 seconds is refused."""
    raw = os.environ.get(WAIT_ENV)
    if raw is None or not raw.strip():
        return DEFAULT_WAIT_SECONDS
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 <= value <= MAX_WAIT_SECONDS:
        raise MigrationError(f"{WAIT_ENV} must be a number of seconds from 0 to {MAX_WAIT_SECONDS:g}, got {raw!r}")
    return value


def migrate_when_ready(
    conninfo: str,
    directory: Path = MIGRATIONS_DIR,
    *,
    wait_seconds: float | None = None,
    sleep: Callable[[float], object] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> list[str]:
    """`migrate`, waiting for a database that is not reachable yet.

    Only DatabaseUnreachable is retried: after 0.5 s, doubling up to 10 s between attempts,
    each attempt logged, until `wait_seconds` (default OPS_DB_WAIT_SECONDS, else 120 s) have
    passed; then DatabaseUnreachable says how long it waited. A failing or edited migration
    raises MigrationError at once: waiting would not fix it.
    """
    budget = wait_seconds_from_env() if wait_seconds is None else wait_seconds
    started = clock()
    delay = FIRST_RETRY_SECONDS
    attempt = 1
    while True:
        try:
            applied = migrate(conninfo, directory)
        except DatabaseUnreachable as e:
            waited = clock() - started
            remaining = budget - waited
            if remaining <= 0:
                raise DatabaseUnreachable(
                    f"database unreachable for {waited:.1f} s over {attempt} attempt(s), giving up "
                    f"({WAIT_ENV}={budget:g}): {e}") from e
            pause = min(delay, remaining)
            # An error, not a warning: every attempt is written (warnings are rate-limited).
            log.error("database unreachable at start-up; retrying", extra={
                "attempt": attempt, "retry_in_s": round(pause, 3), "waited_s": round(waited, 3),
                "wait_limit_s": budget, "error": str(e)})
            sleep(pause)
            delay = min(delay * 2, MAX_RETRY_SECONDS)
            attempt += 1
            continue
        if attempt > 1:
            log.info("database reachable; migrations checked", extra={"attempts": attempt, "applied": applied})
        return applied

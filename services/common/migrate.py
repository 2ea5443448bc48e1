"""Migrations: numbered plain SQL files in migrations/, applied in order, each once.

Each file runs in its own transaction and is recorded in `schema_migrations` with its sha256;
the whole run holds a session advisory lock, so concurrent service start-ups apply each file
once. A file that was applied and then edited, a gap or duplicate in the numbering, or a
failing statement stops the run with MigrationError (the CLI exits non-zero).
"""

from __future__ import annotations

import hashlib
import logging
import re
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
    try:
        conn = psycopg.connect(conninfo, autocommit=True)
    except psycopg.OperationalError as e:
        raise MigrationError(f"cannot connect to the database: {e}") from e
    with conn:
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
                    raise MigrationError(f"{mig.name} failed and was rolled back: {e}") from e
                log.info("migration applied", extra={"migration": mig.name})
                applied_now.append(mig.name)
            unknown = sorted(set(done) - {m.version for m in migrations})
            if unknown:
                raise MigrationError(f"the database has migrations this code does not know: {unknown}")
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_KEY,))
    return applied_now

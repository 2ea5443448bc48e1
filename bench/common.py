"""What the benchmarks share: a throwaway embedded Postgres and synthetic ticker names."""

from __future__ import annotations

import tempfile
from pathlib import Path


def embedded_postgres():
    """An embedded Postgres in a fresh temporary folder, deleted when the process ends."""
    from services.common import db as dbmod

    return dbmod.embedded_server(Path(tempfile.mkdtemp(prefix="ops-bench-")) / "pg", cleanup_mode="delete")


def database(server, name: str = "bench", *, asynchronous: bool = False, migrated: bool = True) -> str:
    """A new database on `server`, with the schema unless `migrated=False`; its URL.

    asynchronous: its commits skip the WAL flush (synchronous_commit = off), as a replay's do.
    """
    import psycopg

    from services.common.migrate import migrate

    with psycopg.connect(server.get_uri("postgres"), autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
        if asynchronous:
            admin.execute(f"ALTER DATABASE {name} SET synchronous_commit = off")
    url = server.get_uri(name)
    if migrated:
        migrate(url)
    return url


def letters(i: int, width: int) -> str:
    """The i-th name of `width` capital letters: AAA, AAB, ... (the asset gate refuses digits)."""
    out = ""
    for _ in range(width):
        i, r = divmod(i, 26)
        out = chr(ord("A") + r) + out
    return out

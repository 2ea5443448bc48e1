"""Postgres connections: `DATABASE_URL` when set, otherwise an embedded server (pgserver).

The embedded server lives under the project's data directory (`OPS_PIPELINE_DATA_DIR`, default
`.pgdata/` in the working directory) and is started on first use and reused by every later
process; several processes share it. A process killed with SIGKILL leaves its pid in pgserver's
`.handle_pids.json`, which would keep the server from ever stopping, so dead pids are pruned
before attaching.
"""

from __future__ import annotations

import json
import logging
import os
from decimal import Decimal
from pathlib import Path

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import set_json_loads
from psycopg_pool import ConnectionPool

log = logging.getLogger(__name__)

EMBEDDED_DB_NAME = "ops_pipeline"

# JSON numbers from the database (row_to_json of numeric columns) become Decimal, not float.
set_json_loads(lambda data: json.loads(data, parse_float=Decimal))


def data_dir() -> Path:
    return Path(os.environ.get("OPS_PIPELINE_DATA_DIR", ".pgdata")).resolve()


def _prune_dead_pids(pgdata: Path) -> None:
    handle = pgdata / ".handle_pids.json"
    if not handle.exists():
        return
    try:
        pids = json.loads(handle.read_text())
    except (OSError, ValueError):
        return
    alive = []
    for pid in pids:
        try:
            os.kill(int(pid), 0)
            alive.append(pid)
        except (ProcessLookupError, ValueError):
            continue
        except PermissionError:
            alive.append(pid)
    if alive != pids:
        handle.write_text(json.dumps(alive))


_embedded = None


def embedded_server(pgdata: Path | None = None, cleanup_mode: str | None = "stop"):
    """Start (or attach to) the embedded Postgres and return the pgserver handle."""
    global _embedded
    if _embedded is not None and pgdata is None:
        return _embedded
    import warnings

    with warnings.catch_warnings():
        # pgserver asks platformdirs for a runtime dir it does not need; containers have none.
        warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
        import pgserver

    pgdata = pgdata or data_dir()
    pgdata.mkdir(parents=True, exist_ok=True)
    _prune_dead_pids(pgdata)
    server = pgserver.get_server(pgdata, cleanup_mode=cleanup_mode)
    _embedded = server
    return server


def database_url() -> str:
    """The conninfo in force: DATABASE_URL, or the embedded server's ops_pipeline database."""
    url = os.environ.get("DATABASE_URL")
    if url:
        return url
    server = embedded_server()
    admin = server.get_uri("postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (EMBEDDED_DB_NAME,)).fetchone()
        if not exists:
            conn.execute(f'CREATE DATABASE "{EMBEDDED_DB_NAME}"')
    return server.get_uri(EMBEDDED_DB_NAME)


def connect(conninfo: str, *, application_name: str | None = None, autocommit: bool = True) -> psycopg.Connection:
    kwargs = {"application_name": application_name} if application_name else {}
    return psycopg.connect(conninfo, autocommit=autocommit, row_factory=dict_row, **kwargs)


def make_pool(conninfo: str, *, min_size: int = 1, max_size: int = 4, application_name: str | None = None,
              check: bool = True) -> ConnectionPool:
    """A pool whose connections are checked before use, so a restarted database is survived.

    `check=False` saves that round trip on a hot path whose caller handles a dead connection
    itself (the dispatcher's loop backs off and retries; the pool drops a broken connection).
    """
    kwargs: dict = {"autocommit": True, "row_factory": dict_row}
    if application_name:
        kwargs["application_name"] = application_name
    return ConnectionPool(
        conninfo,
        min_size=min_size,
        max_size=max_size,
        kwargs=kwargs,
        check=ConnectionPool.check_connection if check else None,
        open=True,
    )



def round_trip_counting() -> type[psycopg.Connection]:
    """A connection class counting its round trips in `.waits`: each wait on the server that does
    I/O (a commit with no transaction open goes through psycopg's wait() too, and sends nothing).
    In pipeline mode each statement queued is flushed with a wait of its own that does not wait
    for an answer (no Sync is sent): only the wait that leaves nothing outstanding, the Sync and
    its answers, is a round trip. The figures are those of a libpq trace counting the Query and
    Sync messages sent. The benchmark prints the dispatcher's round trips per decision with it, and
    tests hold the dispatcher to its budget. Each call makes a class of its own, with its own count."""

    class Counting(psycopg.Connection):
        waits = 0

        def wait(self, gen, *args, **kwargs):
            pipeline = self._pipeline

            def counted():
                try:
                    ready = next(gen)
                except StopIteration as done:
                    value = done.value
                else:
                    while True:
                        sent = yield ready
                        try:
                            ready = gen.send(sent)
                        except StopIteration as done:
                            value = done.value
                            break
                    if pipeline is None or not pipeline.result_queue:
                        Counting.waits += 1
                return value
            return super().wait(counted(), *args, **kwargs)

    return Counting

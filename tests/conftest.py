"""Test fixtures: a real Postgres (embedded pgserver) with a template database built once from
the migrations and cloned for each test (`CREATE DATABASE ... TEMPLATE`, ~0.1 s)."""

from __future__ import annotations

import itertools
import logging
import os
import tempfile
from pathlib import Path

# pandas must be imported before any freeze_time (a first import inside a freeze segfaults),
# and freezegun must leave the driver and its pool threads on real time.
import exchange_calendars  # noqa: F401
import pandas  # noqa: F401
import alpaca.trading.client  # noqa: F401
import freezegun
import psycopg
import pytest

from services.common import db as dbmod
from services.common.market_calendar import nyse_calendar
from services.common.migrate import migrate

freezegun.configure(extend_ignore_list=["psycopg", "psycopg_pool"])

TEMPLATE = "ops_template"
_counter = itertools.count()


@pytest.fixture(scope="session")
def pg_server():
    pgdata = Path(tempfile.mkdtemp(prefix="ops-pg-")) / "data"
    server = dbmod.embedded_server(pgdata, cleanup_mode="delete")
    admin = server.get_uri("postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        # Durability is not under test: this makes inserts several times faster.
        conn.execute("ALTER SYSTEM SET fsync = off")
        conn.execute("ALTER SYSTEM SET synchronous_commit = off")
        conn.execute("ALTER SYSTEM SET full_page_writes = off")
        conn.execute("SELECT pg_reload_conf()")
        conn.execute(f"DROP DATABASE IF EXISTS {TEMPLATE}")
        conn.execute(f"CREATE DATABASE {TEMPLATE}")
    migrate(server.get_uri(TEMPLATE))
    yield server


def _fresh_database(pg_server, prefix: str, template: str | None):
    name = f"{prefix}_{os.getpid()}_{next(_counter)}"
    admin = pg_server.get_uri("postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}" + (f" TEMPLATE {template}" if template else ""))
    yield pg_server.get_uri(name)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def db_url(pg_server) -> str:
    """A fresh database with the whole schema, private to one test."""
    yield from _fresh_database(pg_server, "t", TEMPLATE)


@pytest.fixture
def second_db_url(pg_server) -> str:
    """Another fresh database with the whole schema, beside the test's own (two runs compared)."""
    yield from _fresh_database(pg_server, "s", TEMPLATE)


@pytest.fixture
def empty_db_url(pg_server) -> str:
    """A fresh database with no schema at all (for migration tests)."""
    yield from _fresh_database(pg_server, "e", None)


@pytest.fixture
def pool(db_url):
    """A connection pool on the test's own database, as a service holds one."""
    p = dbmod.make_pool(db_url)
    yield p
    p.close()


@pytest.fixture
def conn(db_url):
    with dbmod.connect(db_url) as c:
        yield c


@pytest.fixture
def world(db_url, conn):
    """AAPL at 200 at WORLD_NOW and a factory of dispatchers over the simulated broker, each on a
    pool of its own and refreshed once (`refresh=False`: left as made); yields (factory, clock)."""
    from services.adapters.sim.broker import SimBroker
    from services.common.clock import FixedClock
    from services.common.params import load_params_file
    from services.dispatcher.main import Dispatcher, StaticParams
    from tests.factories import ACCOUNT, WORLD_NOW, add_market

    clock = FixedClock(WORLD_NOW)
    pools = []

    def dispatcher(wrap=lambda b: b, params=None, worker="w1", option_data=None, refresh=True):
        pool = dbmod.make_pool(db_url)
        pools.append(pool)
        broker = wrap(SimBroker(pool, ACCOUNT, clock))
        d = Dispatcher(pool, broker, params or StaticParams(load_params_file()), ACCOUNT, clock=clock,
                       worker_id=worker, option_data=option_data)
        if refresh:
            d.refresh_account(force=True)
        return d

    add_market(conn, "AAPL", WORLD_NOW, 200)
    yield dispatcher, clock
    for p in pools:
        p.close()


@pytest.fixture(scope="session")
def calendar():
    return nyse_calendar()


@pytest.fixture(autouse=True)
def restore_logging():
    """An operator command (`services.cli.main`) installs its own root handler on the stream of
    the moment; put the root logger back after every test, or a later log line goes to a closed
    capture stream."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)

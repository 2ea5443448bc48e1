"""Rows for tests: bars, recommendations, account state. Plain SQL against the real schema."""

from __future__ import annotations

import time
from datetime import datetime, timedelta
from decimal import Decimal

from services.common.market_calendar import ET

ACCOUNT = "acct-test"


def et(day: str, hhmm: str) -> datetime:
    """An aware instant from an ET wall time: et("2026-11-30", "10:00")."""
    return datetime.fromisoformat(f"{day}T{hhmm}:00").replace(tzinfo=ET)


# The instant of the `world` fixture (tests/conftest.py): a Monday session, mid-morning.
WORLD_NOW = et("2026-11-30", "10:00")

def add_bar(conn, ticker: str, ts: datetime, close, *, volume: int = 10_000, spread: str = "0.10") -> None:
    close = Decimal(str(close))
    conn.execute(
        """INSERT INTO lane_telemetry (ticker, ts, open, high, low, close, volume)
           VALUES (%s, %s, %s, %s, %s, %s, %s)
           ON CONFLICT (ticker, ts) DO UPDATE SET close = EXCLUDED.close, high = EXCLUDED.high, low = EXCLUDED.low""",
        (ticker, ts, close, close + Decimal(spread), close - Decimal(spread), close, volume),
    )


def add_features(conn, ticker: str, ts: datetime, close) -> None:
    conn.execute(
        "INSERT INTO lane_features (ticker, ts, close) VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
        (ticker, ts, Decimal(str(close))),
    )


def add_market(conn, ticker: str, now: datetime, close) -> None:
    """A fresh bar (began a minute before `now`) and features computed from it."""
    ts = now.replace(second=0, microsecond=0) - timedelta(minutes=1)
    add_bar(conn, ticker, ts, close)
    add_features(conn, ticker, ts, close)


def add_recommendation(conn, ticker: str, created_at: datetime, *, action: str = "BUY", instrument: str = "STOCK",
                       strategy: str = "day_trade", confidence=0.8, account: str = ACCOUNT) -> int:
    return conn.execute(
        """INSERT INTO dispatch_recommendations (account_id, ticker, action, instrument, strategy, confidence, created_at)
           VALUES (%s, %s, %s, %s, %s, %s, %s) RETURNING id""",
        (account, ticker, action, instrument, strategy, confidence, created_at),
    ).fetchone()["id"]


def set_account_state(conn, now: datetime, equity, last_equity, account: str = ACCOUNT,
                      orders_reconciled_at: datetime | None | str = "now") -> None:
    """The account state as a refresh writes it: the snapshot and, by default, the orders compared at `now`."""
    reconciled = now if orders_reconciled_at == "now" else orders_reconciled_at
    conn.execute(
        """INSERT INTO account_state (account_id, equity, last_equity, as_of, source, orders_reconciled_at)
           VALUES (%s, %s, %s, %s, 'test', %s)
           ON CONFLICT (account_id) DO UPDATE SET equity = EXCLUDED.equity, last_equity = EXCLUDED.last_equity,
               as_of = EXCLUDED.as_of, orders_reconciled_at = EXCLUDED.orders_reconciled_at""",
        (account, Decimal(str(equity)), Decimal(str(last_equity)), now, reconciled),
    )


def recommendation(conn, rec_id: int) -> dict:
    return conn.execute("SELECT * FROM dispatch_recommendations WHERE id = %s", (rec_id,)).fetchone()


def pinned_params(overrides: dict):
    """The params provider a test pins: the reviewed document with `overrides` over it, version 1."""
    from services.common.params import ParamsInForce, as_params
    from services.dispatcher.main import StaticParams

    p = as_params(overrides)
    return StaticParams(ParamsInForce(p, "test", "1", p.content_hash()))


def wait_until(predicate, timeout: float, step: float = 0.05):
    """Poll `predicate` every `step` seconds until it returns something truthy or `timeout` has
    passed; its last value (falsy when the time ran out)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    return predicate()

"""The simulated broker's positions, kept by sim_orders' trigger (migration 021), equal the
aggregate of its filled orders that the broker computed before, through every way an order row
changes; and the migration fills them for orders written before it."""

from __future__ import annotations

import shutil
import uuid
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import psycopg
from psycopg.rows import dict_row

from services.common.migrate import MIGRATIONS_DIR, migrate

NOW = datetime(2026, 11, 30, 15, 30, tzinfo=timezone.utc)

# What the broker computed from the orders before the trigger kept it.
AGGREGATE = """
SELECT o.account_id, o.symbol, o.asset_class, o.multiplier,
       sum(CASE WHEN o.side = 'buy' THEN o.filled_qty ELSE -o.filled_qty END) AS qty,
       sum(CASE WHEN o.side = 'buy' THEN o.filled_qty * o.filled_avg_price ELSE 0 END)
         / nullif(sum(CASE WHEN o.side = 'buy' THEN o.filled_qty ELSE 0 END), 0) AS avg_entry_price
FROM sim_orders o WHERE o.status = 'filled'
GROUP BY 1, 2, 3, 4
HAVING sum(CASE WHEN o.side = 'buy' THEN o.filled_qty ELSE -o.filled_qty END) <> 0
ORDER BY 1, 2, 3, 4
"""
KEPT = """
SELECT account_id, symbol, asset_class, multiplier, qty, bought_cost / nullif(bought_qty, 0) AS avg_entry_price
FROM sim_positions WHERE qty <> 0 ORDER BY 1, 2, 3, 4
"""


def order(conn, account: str, symbol: str, side: str, qty, price, status: str = "filled",
          asset_class: str = "us_equity", multiplier: int = 1) -> uuid.UUID:
    oid = uuid.uuid4()
    filled = qty if status == "filled" else 0
    conn.execute(
        """INSERT INTO sim_orders (id, account_id, client_order_id, symbol, underlying, asset_class, side, qty,
                                   multiplier, status, filled_qty, filled_avg_price, submitted_at, filled_at)
           VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)""",
        (oid, account, f"c-{oid}", symbol, symbol[:4], asset_class, side, qty, multiplier, status, filled,
         price if status == "filled" else None, NOW, NOW if status == "filled" else None))
    return oid


def history(conn) -> None:
    """Buys at two prices, partial and full sells, a round trip closed and opened again, an
    option, an order that fills later, one canceled, one whose fill is corrected, one deleted,
    a second account."""
    order(conn, "a", "AAPL", "buy", 10, Decimal("200.10"))
    order(conn, "a", "AAPL", "buy", 5, Decimal("201.355"))
    order(conn, "a", "AAPL", "sell", 4, Decimal("202"))
    order(conn, "a", "MSFT", "buy", 3, Decimal("400"))
    order(conn, "a", "MSFT", "sell", 3, Decimal("401"))
    order(conn, "a", "MSFT", "buy", 2, Decimal("399.5"))
    order(conn, "a", "SPY261204C00600000", "buy", 2, Decimal("3.45"), asset_class="us_option", multiplier=100)
    later = order(conn, "a", "NVDA", "buy", 7, None, status="accepted")
    conn.execute("UPDATE sim_orders SET status = 'filled', filled_qty = qty, filled_avg_price = 150.25, "
                 "filled_at = %s WHERE id = %s", (NOW + timedelta(minutes=1), later))
    canceled = order(conn, "a", "AMD", "buy", 9, None, status="accepted")
    conn.execute("UPDATE sim_orders SET status = 'canceled' WHERE id = %s", (canceled,))
    corrected = order(conn, "a", "TSLA", "buy", 4, Decimal("250"))
    conn.execute("UPDATE sim_orders SET filled_avg_price = 251.5 WHERE id = %s", (corrected,))
    gone = order(conn, "a", "AAPL", "sell", 1, Decimal("203"))
    conn.execute("DELETE FROM sim_orders WHERE id = %s", (gone,))
    order(conn, "b", "AAPL", "sell", 6, Decimal("199"))


def test_kept_positions_equal_the_aggregate_of_the_filled_orders(conn):
    history(conn)
    kept = conn.execute(KEPT).fetchall()
    assert kept == conn.execute(AGGREGATE).fetchall()
    assert {(r["account_id"], r["symbol"]): r["qty"] for r in kept} == {
        ("a", "AAPL"): 11, ("a", "MSFT"): 2, ("a", "NVDA"): 7, ("a", "SPY261204C00600000"): 2, ("a", "TSLA"): 4,
        ("b", "AAPL"): -6}
    conn.execute("TRUNCATE sim_orders")
    assert conn.execute("SELECT count(*) AS n FROM sim_positions").fetchone()["n"] == 0


def test_the_migration_fills_the_positions_of_orders_written_before_it(empty_db_url, tmp_path):
    before = tmp_path / "migrations"
    before.mkdir()
    for f in sorted(MIGRATIONS_DIR.glob("*.sql")):
        if f.name < "021":
            shutil.copy(f, before / f.name)
    migrate(empty_db_url, before)
    with psycopg.connect(empty_db_url, autocommit=True, row_factory=dict_row) as c:
        assert c.execute("SELECT to_regclass('sim_positions') AS t").fetchone()["t"] is None
        history(c)
        expected = c.execute(AGGREGATE).fetchall()
        migrate(empty_db_url)
        assert c.execute(KEPT).fetchall() == expected and len(expected) == 6

"""Exits in Postgres: the open positions with their latest bar, their marks, and EXIT recommendations.

An EXIT recommendation names the position it closes (`position_id`) and why (`exit_reason`).
At most one is live (PENDING or SUBMITTING) per position: the unique index of migration 012
makes the insert idempotent whoever writes it (two position managers, a kill-switch flatten,
an operator's `flatten`), and the dispatcher's take of the position by id and version makes
sure that even two exits decided one after the other never sell it twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import psycopg

from services.adapters.postgres.orders_repo import jsonb

NOTIFY_RECOMMENDATIONS = "SELECT pg_notify('recommendations', %(account_id)s)"

# Exit reasons that are not a rule of services/domain/exits.py.
DAILY_LOSS_FLATTEN = "DAILY_LOSS_FLATTEN"
OPERATOR_FLATTEN = "OPERATOR_FLATTEN"

# -- open_positions --
# The account's OPEN positions with the newest bar of what each holds (the stock's own bar; an
# option's premium bar when one is recorded under its OCC symbol) and whether an exit for it is
# already live. One round trip for the whole book; each bar by the (ticker, ts) key.
OPEN_POSITIONS = """
SELECT p.id, p.ticker, p.instrument, p.symbol, p.side, p.qty, p.multiplier, p.avg_price, p.market_price,
       coalesce(p.strategy, 'day_trade') AS strategy, p.opened_at, p.high_water_mark, p.stale_since, p.version,
       b.ts AS bar_ts, b.close AS bar_close,
       EXISTS (SELECT 1 FROM dispatch_recommendations r
               WHERE r.position_id = p.id AND r.action = 'EXIT' AND r.status IN ('PENDING', 'SUBMITTING')) AS exit_live
FROM active_positions p
LEFT JOIN LATERAL (
    SELECT t.ts, t.close FROM lane_telemetry t
    WHERE t.ticker = p.symbol AND t.ts <= %(now)s
    ORDER BY t.ts DESC LIMIT 1) b ON true
WHERE p.account_id = %(account_id)s AND p.status = 'OPEN'
ORDER BY p.id
"""

# -- save_marks --
# The manager's marks of the book, in one statement: the price, the high-water mark (never
# loosened here: a long's only rises, a short's only falls, whatever order two managers write
# in), and since when the data has been stale. Not a state change: the version is not bumped.
SAVE_MARKS = """
UPDATE active_positions p
SET market_price = coalesce(m.market_price, p.market_price),
    high_water_mark = CASE
        WHEN m.high_water_mark IS NULL THEN p.high_water_mark
        WHEN p.high_water_mark IS NULL THEN m.high_water_mark
        WHEN p.side = 'short' THEN least(p.high_water_mark, m.high_water_mark)
        ELSE greatest(p.high_water_mark, m.high_water_mark) END,
    marked_at = coalesce(m.marked_at, p.marked_at),
    stale_since = CASE WHEN m.stale THEN coalesce(p.stale_since, %(now)s) END
FROM jsonb_to_recordset(%(marks)s) AS m(id bigint, market_price numeric, high_water_mark numeric,
                                        marked_at timestamptz, stale boolean)
WHERE p.id = m.id AND p.account_id = %(account_id)s AND p.status IN ('OPEN', 'CLOSING')
"""

# -- insert_exits --
# One EXIT per position still OPEN with no live exit; ON CONFLICT: another writer's is live.
INSERT_EXITS = """
INSERT INTO dispatch_recommendations (account_id, ticker, action, instrument, strategy, reason, created_at,
                                      position_id, exit_reason)
SELECT p.account_id, p.ticker, 'EXIT', p.instrument, coalesce(p.strategy, 'day_trade'), x.reason, %(now)s,
       p.id, x.code
FROM jsonb_to_recordset(%(exits)s) AS x(position_id bigint, code text, reason jsonb)
JOIN active_positions p ON p.id = x.position_id AND p.account_id = %(account_id)s AND p.status = 'OPEN'
ORDER BY p.id
ON CONFLICT (position_id) WHERE action = 'EXIT' AND position_id IS NOT NULL AND status IN ('PENDING', 'SUBMITTING')
DO NOTHING
RETURNING id, position_id, ticker, exit_reason
"""

# -- flatten --
# An EXIT for every OPEN position of the account (or of one ticker), with one reason.
FLATTEN = """
INSERT INTO dispatch_recommendations (account_id, ticker, action, instrument, strategy, reason, created_at,
                                      position_id, exit_reason)
SELECT p.account_id, p.ticker, 'EXIT', p.instrument, coalesce(p.strategy, 'day_trade'), %(reason)s, %(now)s,
       p.id, %(code)s
FROM active_positions p
WHERE p.account_id = %(account_id)s AND p.status = 'OPEN' AND (%(ticker)s::text IS NULL OR p.ticker = %(ticker)s)
ORDER BY p.id
ON CONFLICT (position_id) WHERE action = 'EXIT' AND position_id IS NOT NULL AND status IN ('PENDING', 'SUBMITTING')
DO NOTHING
RETURNING id, position_id, ticker, exit_reason
"""


def open_positions(conn: psycopg.Connection, account_id: str, now: datetime) -> list[dict]:
    return conn.execute(OPEN_POSITIONS, {"account_id": account_id, "now": now}).fetchall()


def save_marks(conn: psycopg.Connection, account_id: str, marks: Sequence[dict[str, Any]], now: datetime) -> None:
    if marks:
        conn.execute(SAVE_MARKS, {"account_id": account_id, "marks": jsonb(list(marks)), "now": now})


def insert_exits(conn: psycopg.Connection, account_id: str, exits: Sequence[dict[str, Any]],
                 now: datetime) -> list[dict]:
    """Insert EXITs ({position_id, code, reason}); returns those inserted, and NOTIFYs the dispatchers."""
    if not exits:
        return []
    rows = conn.execute(INSERT_EXITS, {"account_id": account_id, "exits": jsonb(list(exits)), "now": now}).fetchall()
    if rows:
        conn.execute(NOTIFY_RECOMMENDATIONS, {"account_id": account_id})
    return rows


def flatten(conn: psycopg.Connection, account_id: str, code: str, detail: str, now: datetime,
            ticker: str | None = None, by: str | None = None) -> list[dict]:
    """An EXIT for every OPEN position (or `ticker`'s) that has none live; NOTIFYs the dispatchers."""
    reason = {"source": by or "flatten", "exit": {"code": code, "reason": f"{code}: {detail}"}}
    rows = conn.execute(FLATTEN, {"account_id": account_id, "code": code, "reason": jsonb(reason), "now": now,
                                  "ticker": ticker}).fetchall()
    if rows:
        conn.execute(NOTIFY_RECOMMENDATIONS, {"account_id": account_id})
    return rows

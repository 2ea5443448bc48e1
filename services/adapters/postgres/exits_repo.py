"""Exits in Postgres: the open positions with their latest bar, their marks, and EXIT recommendations.

An EXIT recommendation names the position it closes (`position_id`) and why (`exit_reason`).
At most one is live (PENDING or SUBMITTING) per position: the unique index of migration 012
makes the insert idempotent whoever writes it (two position managers, a kill-switch flatten,
an operator's `flatten`), and the dispatcher's take of the position by id and version makes
sure that even two exits decided one after the other never sell it twice.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any, NamedTuple

import psycopg

from services.adapters.postgres.orders_repo import jsonb

NOTIFY_RECOMMENDATIONS = "SELECT pg_notify('recommendations', %(account_id)s)"

# Exit reasons that are not a rule of services/domain/exits.py.
DAILY_LOSS_FLATTEN = "DAILY_LOSS_FLATTEN"
OPERATOR_FLATTEN = "OPERATOR_FLATTEN"
# A flatten's exit that ended without closing its position is written again after this long.
FLATTEN_RETRY_SECONDS = 60

# -- open_positions --
# The account's OPEN positions with the newest session bar of what each holds (the stock's own
# bar; an option's premium bar when one is recorded under its OCC symbol; a print outside the
# regular session is not a price to judge a stop on) and whether an exit for it is
# already live. One round trip for the whole book: each bar by the (ticker, ts) key, the live
# exits through their partial unique index (a join: as EXISTS, the planner hashed a scan of every
# recommendation). Only the columns the cycle reads, as tuples (OpenPosition's order).
OPEN_POSITIONS = """
SELECT p.id, p.ticker, p.instrument, p.symbol, p.side, p.avg_price, coalesce(p.strategy, 'day_trade'),
       p.opened_at, p.high_water_mark, p.market_price, p.stale_since, b.ts, b.close, x.id IS NOT NULL
FROM active_positions p
LEFT JOIN dispatch_recommendations x
       ON x.position_id = p.id AND x.action = 'EXIT' AND x.position_id IS NOT NULL
      AND x.status IN ('PENDING', 'SUBMITTING')
LEFT JOIN LATERAL (
    SELECT t.ts, t.close FROM lane_telemetry t
    WHERE t.ticker = p.symbol AND t.ts <= %(now)s AND NOT t.extended_hours
    ORDER BY t.ts DESC LIMIT 1) b ON true
WHERE p.account_id = %(account_id)s AND p.status = 'OPEN'
ORDER BY p.id
"""


class OpenPosition(NamedTuple):
    id: int
    ticker: str
    instrument: str
    symbol: str
    side: str
    avg_price: Decimal
    strategy: str
    opened_at: datetime
    high_water_mark: Decimal | None
    market_price: Decimal | None
    stale_since: datetime | None
    bar_ts: datetime | None
    bar_close: Decimal | None
    exit_live: bool


# -- save_marks --
# The manager's marks, in one statement, for the positions whose mark changed (the caller skips
# the others): the price, the high-water mark (never loosened here: a long's only rises, a
# short's only falls, whatever order two managers write in), and since when the data has been
# stale. A NULL price is a stale position: its price and mark stay, and marked_at (the cycle
# that last wrote a fresh price) too. Arrays rather than JSON: no text to build or parse.
# Not a state change: the version is not bumped.
SAVE_MARKS = """
UPDATE active_positions p
SET market_price = coalesce(m.market_price, p.market_price),
    high_water_mark = CASE
        WHEN m.high_water_mark IS NULL THEN p.high_water_mark
        WHEN p.high_water_mark IS NULL THEN m.high_water_mark
        WHEN p.side = 'short' THEN least(p.high_water_mark, m.high_water_mark)
        ELSE greatest(p.high_water_mark, m.high_water_mark) END,
    marked_at = CASE WHEN m.market_price IS NULL THEN p.marked_at ELSE %(now)s END,
    stale_since = CASE WHEN m.stale THEN coalesce(p.stale_since, %(now)s) END
FROM unnest(%(ids)s::bigint[], %(prices)s::numeric[], %(marks)s::numeric[], %(stale)s::boolean[])
     AS m(id, market_price, high_water_mark, stale)
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
# An EXIT for every OPEN position of the account (or of one ticker), with one reason; not for a
# position whose last exit ended less than FLATTEN_RETRY_SECONDS ago (refused by the broker, say):
# the sweep that runs twice a second would otherwise send it again at that pace.
FLATTEN = """
INSERT INTO dispatch_recommendations (account_id, ticker, action, instrument, strategy, reason, created_at,
                                      position_id, exit_reason)
SELECT p.account_id, p.ticker, 'EXIT', p.instrument, coalesce(p.strategy, 'day_trade'), %(reason)s, %(now)s,
       p.id, %(code)s
FROM active_positions p
WHERE p.account_id = %(account_id)s AND p.status = 'OPEN' AND (%(ticker)s::text IS NULL OR p.ticker = %(ticker)s)
  AND NOT EXISTS (SELECT 1 FROM dispatch_recommendations r
                  WHERE r.position_id = p.id AND r.action = 'EXIT'
                    AND r.decided_at > %(now)s - make_interval(secs => %(retry_seconds)s))
ORDER BY p.id
ON CONFLICT (position_id) WHERE action = 'EXIT' AND position_id IS NOT NULL AND status IN ('PENDING', 'SUBMITTING')
DO NOTHING
RETURNING id, position_id, ticker, exit_reason
"""


def open_positions(conn: psycopg.Connection, account_id: str, now: datetime) -> list[OpenPosition]:
    cur = conn.cursor(row_factory=_open_position_row)
    return cur.execute(OPEN_POSITIONS, {"account_id": account_id, "now": now}).fetchall()


def _open_position_row(cursor: Any) -> Callable[[Sequence[Any]], OpenPosition]:
    return OpenPosition._make


class Mark(NamedTuple):
    """A position's mark: its price and high-water mark (None: left as stored), or stale."""

    id: int
    market_price: Decimal | None
    high_water_mark: Decimal | None
    stale: bool


def save_marks(conn: psycopg.Connection, account_id: str, marks: Sequence[Mark], now: datetime) -> None:
    if marks:
        ids, prices, highs, stale = zip(*marks)
        conn.execute(SAVE_MARKS, {"account_id": account_id, "ids": list(ids), "prices": list(prices),
                                  "marks": list(highs), "stale": list(stale), "now": now})


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
                                  "ticker": ticker, "retry_seconds": FLATTEN_RETRY_SECONDS}).fetchall()
    if rows:
        conn.execute(NOTIFY_RECOMMENDATIONS, {"account_id": account_id})
    return rows

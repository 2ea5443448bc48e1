"""The IV history in Postgres: one at-the-money IV per underlying and ET session day.

The dispatcher records today's value and ranks it against the days before; the ranking itself is
pure (`services/domain/iv_percentile.py`). These functions take a connection from the caller
(any psycopg connection; this module imports no driver).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from services.common.market_calendar import et_date
from services.common.numbers import finite_float
from services.domain.iv_percentile import HISTORY_WINDOW, IVPercentile, atm_iv_from_chain, iv_percentile

_RECORD = """
INSERT INTO iv_history (ticker, session_day, atm_iv, recorded_at)
VALUES (%s, %s, %s, %s)
ON CONFLICT (ticker, session_day) DO NOTHING
"""

# -- load_iv_history --
# The newest `limit` days before `before_day`, returned oldest first (the order iv_percentile expects).
_LOAD = """
SELECT atm_iv FROM (
    SELECT session_day, atm_iv FROM iv_history
    WHERE ticker = %s AND session_day < %s
    ORDER BY session_day DESC
    LIMIT %s
) recent
ORDER BY session_day
"""


def record_atm_iv(conn: Any, ticker: str, session_day: date, atm_iv: Any, now: datetime) -> bool:
    """Record the day's ATM IV once; True when this call wrote it, False when the day already had one."""
    value = finite_float(atm_iv)
    if value is None or value <= 0:
        raise ValueError(f"atm_iv={atm_iv!r} is not a positive finite IV")
    if now.tzinfo is None:
        raise ValueError("naive datetime: pass an aware `now`")
    cur = conn.execute(_RECORD, (ticker, session_day, Decimal(repr(value)), now))
    return cur.rowcount == 1


def load_iv_history(conn: Any, ticker: str, before_day: date, limit: int = HISTORY_WINDOW) -> list[float]:
    """ATM IVs of up to `limit` session days before `before_day`, oldest first."""
    rows = conn.execute(_LOAD, (ticker, before_day, limit)).fetchall()
    return [float(r["atm_iv"] if isinstance(r, dict) else r[0]) for r in rows]


def current_iv_percentile(
    conn: Any, ticker: str, chain: Sequence[Any], spot: Any, now: datetime, min_sessions: int
) -> IVPercentile:
    """Today's ATM IV from the chain, recorded for today's ET date, ranked against the days before.

    What the dispatcher calls once per underlying per decision; pass the result to
    `validate_option_contract(..., iv_percentile=...)` / `choose_contract(..., iv_percentile=...)`.
    """
    today_iv = atm_iv_from_chain(chain, spot, now)
    day = et_date(now)
    if today_iv is not None:
        record_atm_iv(conn, ticker, day, today_iv, now)
    return iv_percentile(load_iv_history(conn, ticker, day), today_iv, min_sessions)

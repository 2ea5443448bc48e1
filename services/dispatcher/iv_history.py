"""At-the-money implied volatility per underlying and session day, and its percentile.

The IV percentile gate compares today's ATM IV with the last 252 sessions of the same
underlying. The history is recorded by the dispatcher itself (one value per ticker and ET
session day, in `iv_history`), so a new deployment starts with none: the gate then reports
"not evaluated: N sessions of history" until `iv_min_history_sessions` days have been seen,
and that is the only case in which the dispatcher's gate does not evaluate.

The percentile and the ATM IV are pure functions; `record_atm_iv` and `load_iv_history` take a
connection from the caller (any psycopg connection; this module imports no driver).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import date, datetime
from decimal import Decimal
from typing import Any, NamedTuple

from services.common.market_calendar import et_date, option_expiry_instant
from services.common.numbers import finite_float

HISTORY_WINDOW = 252


class IVPercentile(NamedTuple):
    """(percentile or None, reason). Pass it whole to the option IV gate."""

    percentile: float | None
    reason: str




def iv_percentile(history: Sequence[Any], today_iv: Any, min_sessions: int) -> IVPercentile:
    """100 x the share of the last 252 sessions (oldest first, today excluded) with IV strictly below today's.

    Values that are missing or not finite are dropped before the window is taken. With fewer
    than `min_sessions` usable values the percentile is None with the reason
    "not evaluated: N sessions of history (min M)". A missing today's IV is NO_IV (a denial for
    the gate, not "not evaluated").
    """
    today = finite_float(today_iv)
    if today is None or today <= 0:
        return IVPercentile(None, f"NO_IV: today's ATM IV is {today_iv!r}")
    usable = [v for v in (finite_float(h) for h in history) if v is not None][-HISTORY_WINDOW:]
    n = len(usable)
    if n < min_sessions:
        return IVPercentile(None, f"not evaluated: {n} sessions of history (min {min_sessions})")
    below = sum(1 for v in usable if v < today)
    pct = 100.0 * below / n
    return IVPercentile(pct, f"OK: iv={today:.4f} above {below} of {n} sessions")


def atm_iv_from_chain(chain: Iterable[Any], spot: Any, now: datetime) -> float | None:
    """The nearest expiry's at-the-money IV: the mean of the call's and the put's at the strike nearest the spot.

    Today's expiration is skipped (its IV explodes in the last hours), as is anything expired.
    Contracts without a positive finite IV are ignored; if only one side of the ATM strike
    has an IV, that one is used. None when the chain has no usable contract.
    """
    s = finite_float(spot)
    if s is None or s <= 0:
        return None
    today = et_date(now)
    by_expiry: dict[date, list[Any]] = {}
    for c in chain:
        iv = finite_float(getattr(c, "implied_volatility", None))
        if iv is None or iv <= 0 or c.expiration <= today:
            continue
        by_expiry.setdefault(c.expiration, []).append(c)
    for expiration in sorted(by_expiry):
        if now >= option_expiry_instant(expiration):
            continue
        contracts = by_expiry[expiration]
        nearest = min(abs(float(c.strike) - s) for c in contracts)
        at_strike = [float(c.implied_volatility) for c in contracts if abs(float(c.strike) - s) == nearest]
        return sum(at_strike) / len(at_strike)
    return None


# -- record_atm_iv --
# One row per ticker and ET session day. ON CONFLICT DO NOTHING keeps the day's first value:
# the history then holds IVs taken at a consistent point (the first decision of each session),
# and a re-run of the same day cannot move the baseline it is compared against.
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

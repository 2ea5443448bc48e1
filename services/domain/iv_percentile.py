"""At-the-money implied volatility per underlying and session day, and its percentile.

The IV percentile gate compares today's ATM IV with the last 252 sessions of the same
underlying. The history is recorded by the dispatcher itself (one value per ticker and ET
session day, in `iv_history`), so a new deployment starts with none: the gate then reports
"not evaluated: N sessions of history" until `iv_min_history_sessions` days have been seen,
and that is the only case in which the dispatcher's gate does not evaluate.

The percentile and the ATM IV are pure functions, here; recording and loading the history is
the Postgres adapter's (`services/adapters/postgres/iv_history.py`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import date, datetime
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

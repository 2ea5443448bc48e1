"""Which watched tickers have stopped receiving bars: read by the stale-data watchdog, `/readyz`
and `status`.

Age is measured as the freshness gate measures it (invariant 3): from the end of the newest bar
(a 1-minute bar covers ts..ts+60 s), never from when a row was written. A bar dated after `now`
is not counted, as the dispatcher's gather does not see it either.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

BAR_SECONDS = 60

# -- stale_watched_tickers --
# The selected watchlist tickers (of one account, or of every account when none is given) with
# their newest bar at or before `now`, kept when that bar ended more than max_age ago or there is
# none. One LATERAL probe per ticker on the (ticker, ts) primary key: a few ms for hundreds.
_STALE_WATCHED = """
SELECT w.ticker, b.ts
FROM (SELECT DISTINCT ticker FROM watchlist_state
      WHERE selected AND (%(account_id)s::text IS NULL OR account_id = %(account_id)s)) w
LEFT JOIN LATERAL (
    SELECT t.ts FROM lane_telemetry t WHERE t.ticker = w.ticker AND t.ts <= %(now)s
    ORDER BY t.ts DESC LIMIT 1) b ON true
WHERE b.ts IS NULL OR b.ts < %(oldest_fresh)s
ORDER BY b.ts NULLS FIRST, w.ticker
"""


def stale_watched_tickers(
    conn: Any, now: datetime, max_age_seconds: int, *, account_id: str | None = None
) -> list[tuple[str, datetime | None]]:
    """(ticker, newest bar's ts or None) for each selected ticker whose newest bar is too old.

    Ordered stalest first (no bar at all before any bar). `account_id` narrows the watchlist to one
    account; without it every account's selection counts (bars are shared market data).
    """
    if now.tzinfo is None:
        raise ValueError("naive datetime: pass an aware `now`")
    # A bar is fresh while now - (ts + 60 s) <= max_age, i.e. ts >= now - max_age - 60 s.
    oldest_fresh = now - timedelta(seconds=max_age_seconds + BAR_SECONDS)
    rows = conn.execute(
        _STALE_WATCHED, {"account_id": account_id, "now": now, "oldest_fresh": oldest_fresh}
    ).fetchall()
    return [(r["ticker"], r["ts"]) if isinstance(r, dict) else (r[0], r[1]) for r in rows]

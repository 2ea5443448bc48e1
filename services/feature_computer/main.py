"""The feature computer: bars in lane_telemetry -> one lane_features row per ticker and bar.

Each cycle computes, in ONE statement for every ticker, the features of each ticker's latest
complete bar (see features.py for the definitions) and upserts them on (ticker, ts). A bar that
began at `ts` is complete at ts + 60 s, so with `now` given only bars with ts <= now - 60 s
count: a replay that has a whole day of bars loaded never computes from a bar still in the
future. Rows whose values did not change are left as they were, so cycles are idempotent and
the returned count is the number of rows written (new bars, or corrected bars).

`backfill_features` computes every bar of a time range (replays, tests, after a bulk load).
"""

from __future__ import annotations

import argparse
import logging
import threading
import time
from collections.abc import Sequence
from datetime import datetime, timedelta

import psycopg

from services.feature_computer import features as q

log = logging.getLogger(__name__)

BAR = timedelta(minutes=1)
DEFAULT_INTERVAL_SECONDS = 5.0
# No cutoff: every bar in the table counts (a loader that has just written completed bars).
NO_CUTOFF = "infinity"


def compute_features(conn: psycopg.Connection, now: datetime | None = None,
                     tickers: Sequence[str] | None = None) -> int:
    """Upsert the features of each ticker's latest complete bar; return the rows written.

    now: bars count when complete by `now` (ts + 60 s <= now); None means every bar stored.
    tickers: restrict the cycle to these tickers; None means every ticker with bars.
    """
    if now is not None and now.tzinfo is None:
        raise ValueError("naive datetime: compute_features needs an aware `now`")
    cutoff = NO_CUTOFF if now is None else now - BAR
    if tickers is None:
        cur = conn.execute(q.UPSERT_LATEST_ALL, {"cutoff": cutoff})
    else:
        cur = conn.execute(q.UPSERT_LATEST_FOR_TICKERS, {"cutoff": cutoff, "tickers": list(tickers)})
    return cur.rowcount


def backfill_features(conn: psycopg.Connection, start: datetime, end: datetime,
                      tickers: Sequence[str] | None = None) -> int:
    """Upsert the features of every bar with start <= ts < end; return the rows written."""
    if start.tzinfo is None or end.tzinfo is None:
        raise ValueError("naive datetime: backfill_features needs aware bounds")
    cur = conn.execute(q.UPSERT_BACKFILL, {
        "start": start, "end": end, "tickers": list(tickers) if tickers is not None else None})
    return cur.rowcount


def run_loop(conninfo: str, *, interval: float = DEFAULT_INTERVAL_SECONDS, once: bool = False,
             stop: threading.Event | None = None, clock=None) -> int:
    """Compute a cycle every `interval` seconds until `stop` is set (or once)."""
    from services.common.clock import SystemClock
    from services.runtime import run_periodic

    clock = clock or SystemClock()

    def cycle(conn) -> None:
        started = time.monotonic()
        rows = compute_features(conn, now=clock.now())
        log.info("features computed", extra={"rows": rows, "ms": round((time.monotonic() - started) * 1000, 1)})

    return run_periodic("feature-computer", conninfo, cycle, interval=interval, once=once, stop=stop)


def run_command(args: argparse.Namespace) -> int:
    from services.common.db import database_url
    from services.common.migrate import migrate_when_ready

    url = database_url()
    migrate_when_ready(url)
    from services.runtime import stop_on_sigterm

    return run_loop(url, interval=args.interval, once=args.once, stop=stop_on_sigterm())

"""The stale-data watchdog: during the NYSE session, watched tickers whose bars stopped reach a
person within a minute, with the reason their entries are being denied.

The freshness gate already denies entries on a stale bar; this loop makes the cause visible.
It checks every `interval` seconds (30 by default, so an alert follows staleness within a
minute) against the params' `risk.max_bar_age_seconds`, the gate's own limit.
"""

from __future__ import annotations

import argparse
import logging
from datetime import datetime
from typing import Any

from services.adapters import alerts
from services.adapters.postgres.freshness import stale_watched_tickers
from services.common.clock import Clock, SystemClock
from services.common.market_calendar import CalendarUnavailable, SessionCalendar, nyse_calendar
from services.domain.alerts import Event, stale_data_watch_due

log = logging.getLogger("watchdog")

DEFAULT_INTERVAL_SECONDS = 30.0


class StaleDataWatchdog:
    """One account's watched tickers, checked against its bar-age limit during the session."""

    def __init__(self, account_id: str, params: Any, calendar: SessionCalendar | None = None,
                 clock: Clock | None = None):
        self.account_id = account_id
        self.params = params
        self.calendar = calendar or nyse_calendar()
        self.clock = clock or SystemClock()

    def check(self, conn: Any) -> list[tuple[str, datetime | None]]:
        """The stale tickers found now (empty outside the session); alerts when there are any."""
        now = self.clock.now()
        max_age = self.params.current().params.risk.max_bar_age_seconds
        try:
            session = self.calendar.session_at(now)
        except CalendarUnavailable as e:
            log.error("watchdog cannot tell whether the market is open", extra={"error": str(e)})
            return []
        if not stale_data_watch_due(now, session, max_age):
            return []
        stale = stale_watched_tickers(conn, now, max_age, account_id=self.account_id)
        if stale:
            alerts.emit(Event.DATA_STALE, self.account_id, max_bar_age_seconds=max_age,
                        tickers={ticker: (ts.isoformat() if ts else "no bar") for ticker, ts in stale})
        return stale


def run_command(args: argparse.Namespace) -> int:
    from services.common.params import ParamsError
    from services.runtime import bootstrap, run_periodic, stop_on_sigterm

    _, account_id, url, provider = bootstrap(args.account)
    watchdog = StaleDataWatchdog(account_id, provider)
    return run_periodic("watchdog", url, watchdog.check, interval=args.interval, once=args.once,
                        stop=stop_on_sigterm(), retry_on=(ParamsError,))

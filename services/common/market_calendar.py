"""NYSE sessions from a maintained exchange calendar, in America/New_York.

"Today", DTE and session windows are ET notions: a trading day is an ET date, a session opens
and closes at ET wall times (13:00 on early closes), and an option expires at 16:00 ET on its
expiration date. The calendar data comes from `exchange_calendars` (XNYS) offline; in
production the broker's /v2/calendar can be loaded into the same `SessionCalendar` shape.

Lookups are dictionary reads: the sessions of the configured range are materialised once.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone
from functools import lru_cache
from zoneinfo import ZoneInfo

ET = ZoneInfo("America/New_York")
UTC = timezone.utc
OPTION_EXPIRY_TIME_ET = time(16, 0)


class CalendarUnavailable(RuntimeError):
    """The exchange calendar could not answer (no data for that date range, or it failed to load).

    Operator action: none for a transient failure; for a date outside the loaded range, widen it.
    Gates treat this as a denial (fail closed).
    """


@dataclass(frozen=True, slots=True)
class Session:
    """One trading session: its ET date and its open/close as aware UTC datetimes."""

    day: date
    open: datetime
    close: datetime

    @property
    def early_close(self) -> bool:
        return self.close.astimezone(ET).time() < time(16, 0)


def et_date(now: datetime) -> date:
    """The ET calendar date of an aware instant."""
    if now.tzinfo is None:
        raise ValueError("naive datetime: pass an aware datetime")
    return now.astimezone(ET).date()


def et_day_bounds(day: date) -> tuple[datetime, datetime]:
    """[start, end) of an ET calendar day as aware UTC datetimes (23, 24 or 25 hours long)."""
    start = datetime.combine(day, time(0), tzinfo=ET)
    end = datetime.combine(day + timedelta(days=1), time(0), tzinfo=ET)
    return start.astimezone(UTC), end.astimezone(UTC)


def option_expiry_instant(expiration: date) -> datetime:
    """An equity option stops trading at 16:00 ET on its expiration date."""
    return datetime.combine(expiration, OPTION_EXPIRY_TIME_ET, tzinfo=ET).astimezone(UTC)


class SessionCalendar:
    """Sessions by ET date, built from any iterable of Session."""

    def __init__(self, sessions: Iterable[Session]):
        ordered = sorted(sessions, key=lambda s: s.day)
        if not ordered:
            raise CalendarUnavailable("no sessions loaded")
        self._by_day = {s.day: s for s in ordered}
        self._days = [s.day for s in ordered]
        self.first_day = self._days[0]
        self.last_day = self._days[-1]

    def _check_range(self, day: date) -> None:
        if not self.first_day <= day <= self.last_day:
            raise CalendarUnavailable(
                f"{day} is outside the loaded calendar range {self.first_day}..{self.last_day}"
            )

    def session_on(self, day: date) -> Session | None:
        """The session of an ET date, or None for a weekend or holiday."""
        self._check_range(day)
        return self._by_day.get(day)

    def session_at(self, now: datetime) -> Session | None:
        """The session whose ET date is now's ET date (open or not yet/no longer open)."""
        return self.session_on(et_date(now))

    def is_open(self, now: datetime) -> bool:
        session = self.session_at(now)
        return session is not None and session.open <= now < session.close

    def next_session(self, after: date) -> Session:
        """The first session strictly after an ET date."""
        self._check_range(after)
        i = bisect.bisect_right(self._days, after)
        if i >= len(self._days):
            raise CalendarUnavailable(f"no session after {after} in the loaded range")
        return self._by_day[self._days[i]]

    def previous_session(self, before: date) -> Session:
        """The last session strictly before an ET date."""
        self._check_range(before)
        i = bisect.bisect_left(self._days, before)
        if i == 0:
            raise CalendarUnavailable(f"no session before {before} in the loaded range")
        return self._by_day[self._days[i - 1]]

    def current_or_previous_session(self, now: datetime) -> Session:
        """The trading day an instant belongs to: today's session once it opened, else the last one.

        20:30 ET belongs to that day's session; 08:00 ET to the previous session (it has not
        opened yet); a Saturday to Friday's.
        """
        day = et_date(now)
        session = self.session_on(day)
        if session is not None and now >= session.open:
            return session
        return self.previous_session(day)

    def trading_days_between(self, start: date, end: date) -> int:
        """Sessions in (start, end]: 0 when end is start, 1 for the next session, ..."""
        self._check_range(start)
        self._check_range(end)
        return bisect.bisect_right(self._days, end) - bisect.bisect_right(self._days, start)

    def sessions_between(self, start: date, end: date) -> list[Session]:
        """Sessions with start <= day <= end."""
        lo = bisect.bisect_left(self._days, start)
        hi = bisect.bisect_right(self._days, end)
        return [self._by_day[d] for d in self._days[lo:hi]]


CALENDAR_START = date(2018, 1, 1)
CALENDAR_END = date(2030, 12, 31)


@lru_cache(maxsize=4)
def nyse_calendar(start: date = CALENDAR_START, end: date = CALENDAR_END) -> SessionCalendar:
    """NYSE sessions from exchange_calendars' XNYS, with an explicit range (its default ends a year out)."""
    try:
        import exchange_calendars as xcals

        cal = xcals.get_calendar("XNYS", start=start.isoformat(), end=end.isoformat())
        schedule = cal.schedule
    except Exception as e:  # the calendar package raises a variety of errors on bad ranges/data
        raise CalendarUnavailable(f"XNYS calendar failed to load: {e}") from e
    sessions = [
        Session(
            day=label.date(),
            open=opened.to_pydatetime().astimezone(UTC),
            close=closed.to_pydatetime().astimezone(UTC),
        )
        for label, opened, closed in zip(schedule.index, schedule["open"], schedule["close"])
    ]
    return SessionCalendar(sessions)

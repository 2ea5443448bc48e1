"""The NYSE calendar in ET: DST-length days, sessions an instant belongs to, holidays, early
closes, option expiry at 16:00 ET, and refusal of naive datetimes and unloaded dates."""

from __future__ import annotations

from datetime import date, datetime, time, timedelta, timezone

import pytest

from services.common.market_calendar import (
    ET,
    CalendarUnavailable,
    Session,
    SessionCalendar,
    et_date,
    et_day_bounds,
    option_expiry_instant,
)

UTC = timezone.utc


def utc(y, mo, d, hh=0, mm=0) -> datetime:
    return datetime(y, mo, d, hh, mm, tzinfo=UTC)


def et(y, mo, d, hh=0, mm=0) -> datetime:
    return datetime(y, mo, d, hh, mm, tzinfo=ET)


# --- et_day_bounds / et_date --------------------------------------------------------------------


@pytest.mark.parametrize(
    "day, start, end, hours",
    [
        pytest.param(date(2026, 3, 8), utc(2026, 3, 8, 5), utc(2026, 3, 9, 4), 23, id="spring-forward-23h"),
        pytest.param(date(2026, 11, 1), utc(2026, 11, 1, 4), utc(2026, 11, 2, 5), 25, id="fall-back-25h"),
        pytest.param(date(2026, 11, 30), utc(2026, 11, 30, 5), utc(2026, 12, 1, 5), 24, id="winter-24h"),
        pytest.param(date(2026, 7, 1), utc(2026, 7, 1, 4), utc(2026, 7, 2, 4), 24, id="summer-24h"),
    ],
)
def test_et_day_bounds_are_et_midnights_in_utc(day, start, end, hours):
    lo, hi = et_day_bounds(day)
    assert (lo, hi) == (start, end)
    assert hi - lo == timedelta(hours=hours)
    assert lo.utcoffset() == timedelta(0) and hi.utcoffset() == timedelta(0)


@pytest.mark.parametrize(
    "instant, day",
    [
        pytest.param(utc(2026, 12, 1, 1, 30), date(2026, 11, 30), id="after-utc-midnight-is-still-monday-et"),
        pytest.param(utc(2026, 12, 1, 4, 59), date(2026, 11, 30), id="2359-est"),
        pytest.param(utc(2026, 12, 1, 5, 0), date(2026, 12, 1), id="0000-est"),
        pytest.param(utc(2026, 7, 2, 3, 59), date(2026, 7, 1), id="2359-edt"),
        pytest.param(utc(2026, 7, 2, 4, 0), date(2026, 7, 2), id="0000-edt"),
    ],
)
def test_et_date_of_an_instant(instant, day):
    assert et_date(instant) == day


def test_et_date_rejects_a_naive_datetime():
    with pytest.raises(ValueError, match="naive"):
        et_date(datetime(2026, 11, 30, 12, 0))


# --- sessions -----------------------------------------------------------------------------------


def test_normal_session_opens_0930_and_closes_1600_et(calendar):
    s = calendar.session_on(date(2026, 11, 30))
    assert (s.open, s.close) == (utc(2026, 11, 30, 14, 30), utc(2026, 11, 30, 21, 0))
    assert not s.early_close


def test_summer_session_is_an_hour_earlier_in_utc(calendar):
    s = calendar.session_on(date(2026, 7, 1))
    assert (s.open, s.close) == (utc(2026, 7, 1, 13, 30), utc(2026, 7, 1, 20, 0))


@pytest.mark.parametrize("day", [date(2026, 11, 27), date(2026, 12, 24)])
def test_early_close_sessions_close_at_1300_et(calendar, day):
    s = calendar.session_on(day)
    assert s.early_close
    assert s.close.astimezone(ET).time() == time(13, 0)
    assert s.open.astimezone(ET).time() == time(9, 30)


@pytest.mark.parametrize(
    "day",
    [date(2026, 11, 26), date(2026, 12, 25), date(2026, 1, 1), date(2026, 7, 3), date(2026, 11, 28), date(2026, 11, 29)],
    ids=str,
)
def test_holidays_and_weekends_have_no_session(calendar, day):
    assert calendar.session_on(day) is None


@pytest.mark.parametrize(
    "instant, is_open",
    [
        (et(2026, 11, 30, 9, 29), False),
        (et(2026, 11, 30, 9, 30), True),
        (et(2026, 11, 30, 15, 59), True),
        (et(2026, 11, 30, 16, 0), False),
        (et(2026, 11, 27, 12, 59), True),
        (et(2026, 11, 27, 13, 0), False),
        (et(2026, 11, 26, 11, 0), False),
    ],
    ids=str,
)
def test_is_open(calendar, instant, is_open):
    assert calendar.is_open(instant) is is_open


@pytest.mark.parametrize(
    "instant, day",
    [
        pytest.param(utc(2026, 12, 1, 1, 30), date(2026, 11, 30), id="2030-et-monday-after-utc-midnight"),
        pytest.param(et(2026, 11, 30, 16, 30), date(2026, 11, 30), id="after-the-close"),
        pytest.param(et(2026, 11, 30, 9, 30), date(2026, 11, 30), id="at-the-open"),
        pytest.param(et(2026, 11, 30, 9, 29), date(2026, 11, 27), id="just-before-the-open"),
        pytest.param(et(2026, 11, 30, 8, 0), date(2026, 11, 27), id="0800-et-belongs-to-the-previous-session"),
        pytest.param(utc(2026, 11, 30, 4, 59), date(2026, 11, 27), id="sunday-2359-et"),
        pytest.param(et(2026, 11, 28, 12, 0), date(2026, 11, 27), id="saturday"),
        pytest.param(et(2026, 11, 26, 20, 0), date(2026, 11, 25), id="thanksgiving-evening"),
        pytest.param(et(2026, 11, 27, 14, 0), date(2026, 11, 27), id="after-the-early-close"),
    ],
)
def test_current_or_previous_session(calendar, instant, day):
    assert calendar.current_or_previous_session(instant).day == day


def test_next_and_previous_session_skip_thanksgiving_and_weekends(calendar):
    assert calendar.next_session(date(2026, 11, 25)).day == date(2026, 11, 27)
    assert calendar.next_session(date(2026, 11, 27)).day == date(2026, 11, 30)
    assert calendar.previous_session(date(2026, 11, 30)).day == date(2026, 11, 27)
    assert calendar.previous_session(date(2026, 11, 27)).day == date(2026, 11, 25)


@pytest.mark.parametrize(
    "start, end, n",
    [
        pytest.param(date(2026, 11, 25), date(2026, 11, 30), 2, id="across-thanksgiving"),
        pytest.param(date(2026, 11, 25), date(2026, 11, 27), 1, id="wed-to-fri"),
        pytest.param(date(2026, 11, 26), date(2026, 11, 27), 1, id="from-the-holiday"),
        pytest.param(date(2026, 11, 30), date(2026, 11, 30), 0, id="same-day"),
        pytest.param(date(2026, 11, 30), date(2026, 12, 7), 5, id="one-week"),
        pytest.param(date(2026, 12, 31), date(2027, 1, 4), 1, id="across-new-year"),
        pytest.param(date(2026, 10, 31), date(2026, 11, 30), 20, id="november-has-20-sessions"),
    ],
)
def test_trading_days_between(calendar, start, end, n):
    assert calendar.trading_days_between(start, end) == n


# --- option expiry ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "expiration, instant",
    [
        pytest.param(date(2026, 11, 20), utc(2026, 11, 20, 21, 0), id="winter-2100-utc"),
        pytest.param(date(2026, 7, 17), utc(2026, 7, 17, 20, 0), id="summer-2000-utc"),
        pytest.param(date(2026, 3, 9), utc(2026, 3, 9, 20, 0), id="day-after-spring-forward"),
    ],
)
def test_option_expiry_instant_is_1600_et(expiration, instant):
    expiry = option_expiry_instant(expiration)
    assert expiry == instant
    assert expiry.utcoffset() == timedelta(0)
    assert expiry.astimezone(ET).time() == time(16, 0)


# --- unavailable and naive ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda c: c.session_on(date(2031, 6, 2)), id="session_on-after-range"),
        pytest.param(lambda c: c.session_on(date(2017, 6, 1)), id="session_on-before-range"),
        pytest.param(lambda c: c.session_at(utc(2035, 1, 2, 15)), id="session_at"),
        pytest.param(lambda c: c.is_open(utc(2035, 1, 2, 15)), id="is_open"),
        pytest.param(lambda c: c.current_or_previous_session(utc(2035, 1, 2, 15)), id="current_or_previous"),
        pytest.param(lambda c: c.trading_days_between(date(2026, 1, 2), date(2031, 6, 2)), id="trading_days_between"),
        pytest.param(lambda c: c.next_session(date(2030, 12, 31)), id="no-next-session-in-range"),
        pytest.param(lambda c: c.previous_session(c.first_day), id="no-previous-session-in-range"),
    ],
)
def test_dates_outside_the_loaded_range_raise_calendar_unavailable(calendar, call):
    with pytest.raises(CalendarUnavailable):
        call(calendar)


def test_an_empty_calendar_is_unavailable():
    with pytest.raises(CalendarUnavailable):
        SessionCalendar([])


def test_a_calendar_from_broker_sessions_answers_the_same_questions():
    days = [date(2026, 11, 25), date(2026, 11, 27), date(2026, 11, 30)]
    closes = {date(2026, 11, 27): time(13, 0)}
    sessions = [
        Session(d, datetime.combine(d, time(9, 30), ET).astimezone(UTC),
                datetime.combine(d, closes.get(d, time(16, 0)), ET).astimezone(UTC))
        for d in days
    ]
    cal = SessionCalendar(reversed(sessions))
    assert cal.session_on(date(2026, 11, 26)) is None
    assert cal.session_on(date(2026, 11, 27)).early_close
    assert cal.trading_days_between(date(2026, 11, 25), date(2026, 11, 30)) == 2
    assert cal.current_or_previous_session(et(2026, 11, 30, 8, 0)).day == date(2026, 11, 27)
    with pytest.raises(CalendarUnavailable):
        cal.session_on(date(2026, 12, 1))


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda c: c.session_at(datetime(2026, 11, 30, 12)), id="session_at"),
        pytest.param(lambda c: c.is_open(datetime(2026, 11, 30, 12)), id="is_open"),
        pytest.param(lambda c: c.current_or_previous_session(datetime(2026, 11, 30, 12)), id="current_or_previous"),
    ],
)
def test_naive_datetimes_are_rejected(calendar, call):
    with pytest.raises(ValueError, match="naive"):
        call(calendar)


def test_session_times_are_aware_utc(calendar):
    for s in calendar.sessions_between(date(2026, 1, 1), date(2026, 12, 31)):
        assert s.open.utcoffset() == timedelta(0) and s.close.utcoffset() == timedelta(0)
        assert s.open.astimezone(ET).time() == time(9, 30)
        assert s.close.astimezone(ET).time() in (time(16, 0), time(13, 0))

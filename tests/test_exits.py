"""Exit rules at their boundaries (just inside, exactly at, just past), for stock and options,
long and short, on a normal day (2026-11-30), on the 13:00 early close (2026-11-27) and on an
option's expiry day; precedence when several fire; stale data; the high-water mark; the params."""

from __future__ import annotations

import json
from datetime import date, datetime, timedelta
from decimal import Decimal as D

import pytest

from services.common.market_calendar import ET, nyse_calendar
from services.common.params import DEFAULT_PARAMS_PATH, ParamsError, as_params, default_params, validate_params
from services.domain.exits import (
    ExitDecision,
    evaluate_exit,
    evaluate_exit_rules,
    next_high_water_mark,
)

CAL = nyse_calendar()
PARAMS = default_params()
ENTRY = {"STOCK": D("100.00"), "OPTION": D("2.00")}
EXPIRY = date(2026, 12, 4)  # a Friday, normal close


def at(y: int, m: int, d: int, hh: int, mm: int = 0, ss: int = 0) -> datetime:
    return datetime(y, m, d, hh, mm, ss, tzinfo=ET)


def position(instrument="STOCK", side="long", strategy="day_trade", opened_at=None, expiration=EXPIRY, mark=None, entry=None):
    return {
        "instrument": instrument,
        "side": side,
        "strategy": strategy,
        "avg_price": entry if entry is not None else ENTRY[instrument],
        "opened_at": opened_at,
        "expiration": expiration if instrument == "OPTION" else None,
        "high_water_mark": mark,
    }


def fresh_bar(close, now: datetime, age_seconds: float = 0) -> dict:
    """A 1-minute bar that ended `age_seconds` before now."""
    return {"ts": now - timedelta(seconds=60 + age_seconds), "close": D(str(close))}


# Price rules run at 10:00 ET, ten minutes after entry, on each kind of day; the option expires
# on EXPIRY, so on the third day it is the option's last trading day (its cut-off is 14:30).
DAYS = [
    pytest.param(at(2026, 11, 30, 10), id="normal-day-2026-11-30"),
    pytest.param(at(2026, 11, 27, 10), id="early-close-2026-11-27"),
    pytest.param(at(2026, 12, 4, 10), id="option-expiry-day-2026-12-04"),
]


def run(pos, bar, now, params=PARAMS):
    return evaluate_exit_rules(pos, bar, None, params, now, CAL)


# --- Stop loss -------------------------------------------------------------------------------

STOP_CASES = [
    # instrument, side, close, fired, stop price
    ("STOCK", "long", "98.01", False, D("98.00")),
    ("STOCK", "long", "98.00", True, D("98.00")),
    ("STOCK", "long", "97.99", True, D("98.00")),
    ("STOCK", "short", "101.99", False, D("102.00")),
    ("STOCK", "short", "102.00", True, D("102.00")),
    ("STOCK", "short", "102.01", True, D("102.00")),
    ("OPTION", "long", "1.41", False, D("1.40")),
    ("OPTION", "long", "1.40", True, D("1.40")),
    ("OPTION", "long", "1.39", True, D("1.40")),
    ("OPTION", "short", "2.59", False, D("2.60")),
    ("OPTION", "short", "2.60", True, D("2.60")),
    ("OPTION", "short", "2.61", True, D("2.60")),
]


@pytest.mark.parametrize("now", DAYS)
@pytest.mark.parametrize(("instrument", "side", "close", "fired", "stop"), STOP_CASES)
def test_stop_loss_fires_at_and_past_the_stop_price_of_the_entry(now, instrument, side, close, fired, stop):
    pos = position(instrument, side, opened_at=now - timedelta(minutes=10))
    evaluation = run(pos, fresh_bar(close, now), now)
    result = evaluation.result("stop_loss")
    assert (result.fired, result.observed, result.limit) == (fired, D(close), stop)
    assert result.code == ("STOP_LOSS" if fired else "HOLD")
    assert evaluation.decision == (
        ExitDecision("stop_loss", "STOP_LOSS", result.reason, D(close), stop) if fired else None
    )


# --- Take profit -----------------------------------------------------------------------------

TARGET_CASES = [
    ("STOCK", "long", "103.99", False, D("104.00")),
    ("STOCK", "long", "104.00", True, D("104.00")),
    ("STOCK", "long", "104.01", True, D("104.00")),
    ("STOCK", "short", "96.01", False, D("96.00")),
    ("STOCK", "short", "96.00", True, D("96.00")),
    ("STOCK", "short", "95.99", True, D("96.00")),
    ("OPTION", "long", "2.99", False, D("3.00")),
    ("OPTION", "long", "3.00", True, D("3.00")),
    ("OPTION", "long", "3.01", True, D("3.00")),
    ("OPTION", "short", "1.01", False, D("1.00")),
    ("OPTION", "short", "1.00", True, D("1.00")),
    ("OPTION", "short", "0.99", True, D("1.00")),
]


@pytest.mark.parametrize("now", DAYS)
@pytest.mark.parametrize(("instrument", "side", "close", "fired", "target"), TARGET_CASES)
def test_take_profit_fires_at_and_past_the_target_price(now, instrument, side, close, fired, target):
    pos = position(instrument, side, opened_at=now - timedelta(minutes=10))
    evaluation = run(pos, fresh_bar(close, now), now)
    result = evaluation.result("take_profit")
    assert (result.fired, result.observed, result.limit) == (fired, D(close), target)
    # The close is the new best price, so the trailing stop (armed or not) stays quiet.
    assert not evaluation.result("trailing_stop").fired
    assert (evaluation.decision.code if evaluation.decision else None) == ("TAKE_PROFIT" if fired else None)


# --- Trailing stop ---------------------------------------------------------------------------

TRAILING_CASES = [
    # instrument, side, persisted mark, close, fired, trigger = mark x (1 -/+ trailing_stop_pct)
    ("STOCK", "long", "103", "101.456", False, D("101.455")),
    ("STOCK", "long", "103", "101.455", True, D("101.455")),
    ("STOCK", "long", "103", "101.454", True, D("101.455")),
    ("STOCK", "short", "97", "98.454", False, D("98.455")),
    ("STOCK", "short", "97", "98.455", True, D("98.455")),
    ("STOCK", "short", "97", "98.456", True, D("98.455")),
    ("OPTION", "long", "2.50", "2.01", False, D("2.00")),
    ("OPTION", "long", "2.50", "2.00", True, D("2.00")),
    ("OPTION", "long", "2.50", "1.99", True, D("2.00")),
    ("OPTION", "short", "1.50", "1.79", False, D("1.80")),
    ("OPTION", "short", "1.50", "1.80", True, D("1.80")),
    ("OPTION", "short", "1.50", "1.81", True, D("1.80")),
]


@pytest.mark.parametrize("now", DAYS)
@pytest.mark.parametrize(("instrument", "side", "mark", "close", "fired", "trigger"), TRAILING_CASES)
def test_trailing_stop_fires_at_and_past_the_trigger_below_the_high_water_mark(now, instrument, side, mark, close, fired, trigger):
    pos = position(instrument, side, opened_at=now - timedelta(minutes=10), mark=D(mark))
    evaluation = run(pos, fresh_bar(close, now), now)
    result = evaluation.result("trailing_stop")
    assert (result.fired, result.observed, result.limit) == (fired, D(close), trigger)
    assert (evaluation.decision.code if evaluation.decision else None) == ("TRAILING_STOP" if fired else None)


ARMING_CASES = [
    # The stock day trade arms once the mark gained 1% (101.00 long, 99.00 short); the close
    # sits between the trailing trigger and the fixed stop, so only arming decides.
    ("long", "100.99", "99.00", False, D("101.00")),
    ("long", "101.00", "99.00", True, D("99.485")),
    ("long", "101.01", "99.00", True, D("99.49485")),
    ("short", "99.01", "100.80", False, D("99.00")),
    ("short", "99.00", "100.80", True, D("100.485")),
    ("short", "98.99", "100.80", True, D("100.47485")),
]


@pytest.mark.parametrize(("side", "mark", "close", "fired", "limit"), ARMING_CASES)
def test_trailing_stop_arms_exactly_at_the_activation_gain(side, mark, close, fired, limit):
    now = at(2026, 11, 30, 10)
    pos = position("STOCK", side, opened_at=now - timedelta(minutes=10), mark=D(mark))
    result = run(pos, fresh_bar(close, now), now).result("trailing_stop")
    assert (result.fired, result.limit) == (fired, limit)
    assert result.observed == (D(close) if fired else D(mark))


def test_trailing_stop_uses_the_mark_raised_by_the_current_bar():
    now = at(2026, 11, 30, 10)
    pos = position("STOCK", "long", opened_at=now - timedelta(minutes=10), mark=D("103"))
    result = run(pos, fresh_bar("103.50", now), now).result("trailing_stop")
    assert (result.fired, result.limit) == (False, D("103.50") * (1 - D("0.015")))


@pytest.mark.parametrize(
    ("side", "mark", "close", "expected"),
    [
        ("long", None, "101", D("101")),
        ("long", None, "99", D("100.00")),
        ("long", D("103"), "104", D("104")),
        ("long", D("103"), "102", D("103")),
        ("short", None, "99", D("99")),
        ("short", None, "101", D("100.00")),
        ("short", D("97"), "96", D("96")),
        ("short", D("97"), "98", D("97")),
        ("long", D("103"), None, D("103")),
        ("long", D("103"), "0", D("103")),
    ],
)
def test_next_high_water_mark_keeps_the_best_close_since_entry(side, mark, close, expected):
    pos = position("STOCK", side, opened_at=at(2026, 11, 30, 10), mark=mark)
    bar = {"ts": at(2026, 11, 30, 10, 5), "close": None if close is None else D(close)}
    assert next_high_water_mark(pos, bar) == expected


# --- Maximum holding time --------------------------------------------------------------------

HOLD_60 = as_params({"exits": {"day_trade": {"max_holding_minutes": 60}}})
LONG_HOLD = as_params({"exits": {"day_trade": {"max_holding_minutes": 600}}})


@pytest.mark.parametrize("opened", [at(2026, 11, 30, 10), at(2026, 11, 27, 10), at(2026, 11, 30, 10)],
                         ids=["normal-day", "early-close", "option-expiry-day"])
@pytest.mark.parametrize(("instrument", "side"), [("STOCK", "long"), ("STOCK", "short"), ("OPTION", "long"), ("OPTION", "short")])
@pytest.mark.parametrize(("after", "fired"), [(timedelta(minutes=59, seconds=59), False), (timedelta(minutes=60), True), (timedelta(minutes=60, seconds=1), True)])
def test_max_holding_time_fires_from_exactly_the_limit(request, opened, instrument, side, after, fired):
    expiration = opened.date() if "expiry" in request.node.callspec.id else EXPIRY
    now = opened + after
    pos = position(instrument, side, opened_at=opened, expiration=expiration)
    evaluation = run(pos, fresh_bar(ENTRY[instrument], now), now, HOLD_60)
    result = evaluation.result("max_holding_time")
    assert (result.fired, result.observed, result.limit) == (fired, after.total_seconds() / 60, 60)
    assert (evaluation.decision.code if evaluation.decision else None) == ("MAX_HOLDING_TIME" if fired else None)


# --- End of day ------------------------------------------------------------------------------

EOD_CASES = [
    # now, deadline: 15 minutes before the close from the calendar (13:00 on 2026-11-27)
    (at(2026, 11, 30, 15, 44, 59), at(2026, 11, 30, 15, 45), False),
    (at(2026, 11, 30, 15, 45), at(2026, 11, 30, 15, 45), True),
    (at(2026, 11, 30, 15, 45, 1), at(2026, 11, 30, 15, 45), True),
    (at(2026, 11, 27, 12, 44, 59), at(2026, 11, 27, 12, 45), False),
    (at(2026, 11, 27, 12, 45), at(2026, 11, 27, 12, 45), True),
    (at(2026, 11, 27, 12, 45, 1), at(2026, 11, 27, 12, 45), True),
]


@pytest.mark.parametrize(("now", "deadline", "fired"), EOD_CASES)
@pytest.mark.parametrize(("instrument", "side"), [("STOCK", "long"), ("STOCK", "short"), ("OPTION", "long"), ("OPTION", "short")])
def test_day_trade_is_flattened_minutes_before_the_sessions_close(now, deadline, fired, instrument, side):
    pos = position(instrument, side, opened_at=now.replace(hour=10, minute=0, second=0), expiration=EXPIRY)
    evaluation = run(pos, fresh_bar(ENTRY[instrument], now), now, LONG_HOLD)
    result = evaluation.result("end_of_day")
    assert (result.fired, result.observed, result.limit) == (fired, now, deadline)
    assert (evaluation.decision.code if evaluation.decision else None) == ("END_OF_DAY" if fired else None)


@pytest.mark.parametrize(
    ("now", "fired"),
    [(at(2026, 12, 4, 15, 44, 59), False), (at(2026, 12, 4, 15, 45), True), (at(2026, 12, 4, 15, 45, 1), True)],
)
def test_day_trade_flatten_on_an_options_expiry_day_is_preceded_by_the_expiry_cutoff(now, fired):
    pos = position("OPTION", "long", opened_at=at(2026, 12, 4, 10), expiration=date(2026, 12, 4))
    evaluation = run(pos, fresh_bar("2.00", now), now, LONG_HOLD)
    assert (evaluation.result("end_of_day").fired, evaluation.result("end_of_day").limit) == (fired, at(2026, 12, 4, 15, 45))
    assert evaluation.decision.code == "EXPIRY_CUTOFF"


def test_day_trade_still_open_the_next_session_is_flattened_at_once():
    now = at(2026, 11, 30, 9, 31)
    pos = position("STOCK", opened_at=at(2026, 11, 27, 11))
    evaluation = run(pos, fresh_bar("100", now), now)
    assert evaluation.decision.code == "END_OF_DAY"
    assert evaluation.result("end_of_day").limit == at(2026, 11, 27, 12, 45)


def test_swing_trade_with_fresh_data_is_not_flattened_before_the_close():
    now = at(2026, 11, 30, 15, 50)
    pos = position("STOCK", strategy="swing_trade", opened_at=at(2026, 11, 25, 11))
    evaluation = run(pos, fresh_bar("100", now), now)
    assert evaluation.result("end_of_day").code == "NOT_APPLICABLE"
    assert evaluation.decision is None


# --- Option cut-off on the last trading day --------------------------------------------------

CUTOFF_CASES = [
    # expiration, now, cut-off = 90 minutes before that day's close
    (date(2026, 11, 30), at(2026, 11, 30, 14, 29, 59), at(2026, 11, 30, 14, 30), False),
    (date(2026, 11, 30), at(2026, 11, 30, 14, 30), at(2026, 11, 30, 14, 30), True),
    (date(2026, 11, 30), at(2026, 11, 30, 14, 30, 1), at(2026, 11, 30, 14, 30), True),
    (date(2026, 11, 27), at(2026, 11, 27, 11, 29, 59), at(2026, 11, 27, 11, 30), False),
    (date(2026, 11, 27), at(2026, 11, 27, 11, 30), at(2026, 11, 27, 11, 30), True),
    (date(2026, 11, 27), at(2026, 11, 27, 11, 30, 1), at(2026, 11, 27, 11, 30), True),
    # Expiring on Good Friday (a holiday): the last trading day is the Thursday before.
    (date(2026, 4, 3), at(2026, 4, 2, 14, 29, 59), at(2026, 4, 2, 14, 30), False),
    (date(2026, 4, 3), at(2026, 4, 2, 14, 30), at(2026, 4, 2, 14, 30), True),
    # The day after: long past the cut-off.
    (date(2026, 11, 27), at(2026, 11, 30, 9, 35), at(2026, 11, 27, 11, 30), True),
]


@pytest.mark.parametrize(("expiration", "now", "cutoff", "fired"), CUTOFF_CASES)
@pytest.mark.parametrize("strategy", ["day_trade", "swing_trade"])
@pytest.mark.parametrize("side", ["long", "short"])
def test_option_is_closed_from_the_cutoff_on_its_last_trading_day(expiration, now, cutoff, fired, strategy, side):
    opened = now - timedelta(minutes=5)
    pos = position("OPTION", side, strategy=strategy, opened_at=opened, expiration=expiration)
    evaluation = run(pos, fresh_bar("2.00", now), now)
    result = evaluation.result("option_expiry_cutoff")
    assert (result.fired, result.observed, result.limit) == (fired, now, cutoff)
    if fired:
        assert evaluation.decision.code == "EXPIRY_CUTOFF"


def test_stock_has_no_expiry_rules():
    now = at(2026, 11, 30, 15)
    evaluation = run(position("STOCK", strategy="swing_trade", opened_at=now - timedelta(hours=1)), fresh_bar("100", now), now)
    assert evaluation.result("option_expiry_cutoff").code == "NOT_APPLICABLE"
    assert evaluation.result("option_days_to_expiry").code == "NOT_APPLICABLE"


DAYS_LEFT_CASES = [
    # now, trading days left after today up to EXPIRY (2026-12-04); min 5; 2026-11-26 is a holiday
    (at(2026, 11, 25, 10), 6, False),
    (at(2026, 11, 27, 10), 5, False),
    (at(2026, 11, 30, 10), 4, True),
    (at(2026, 12, 4, 10), 0, True),
]


@pytest.mark.parametrize(("now", "left", "fired"), DAYS_LEFT_CASES)
@pytest.mark.parametrize("side", ["long", "short"])
def test_swing_option_is_closed_when_fewer_trading_days_remain_than_the_minimum(now, left, fired, side):
    pos = position("OPTION", side, strategy="swing_trade", opened_at=at(2026, 11, 20, 10))
    evaluation = run(pos, fresh_bar("2.00", now), now)
    result = evaluation.result("option_days_to_expiry")
    assert (result.fired, result.observed, result.limit) == (fired, left, 5)
    assert (evaluation.decision.code if evaluation.decision else None) == ("EXPIRY_APPROACHING" if fired else None)


def test_day_trade_option_has_no_days_to_expiry_rule():
    now = at(2026, 11, 30, 10)
    result = run(position("OPTION", opened_at=now - timedelta(minutes=5)), fresh_bar("2.00", now), now).result("option_days_to_expiry")
    assert result.code == "NOT_APPLICABLE"


# --- Stale data ------------------------------------------------------------------------------

STALE_CASES = [
    # bar age past its end (day trade limit 180 s), or its start ahead of now (skew 5 s)
    ("age 179s", lambda now: now - timedelta(seconds=239), False, 179.0),
    ("age 180s", lambda now: now - timedelta(seconds=240), False, 180.0),
    ("age 181s", lambda now: now - timedelta(seconds=241), True, 181.0),
    ("forming bar", lambda now: now - timedelta(seconds=30), False, -30.0),
    ("5s ahead", lambda now: now + timedelta(seconds=5), False, -65.0),
    ("6s ahead", lambda now: now + timedelta(seconds=6), True, -6.0),
]


@pytest.mark.parametrize("now", [at(2026, 11, 30, 11), at(2026, 11, 27, 11), at(2026, 12, 4, 11)],
                         ids=["normal-day", "early-close", "option-expiry-day"])
@pytest.mark.parametrize(("instrument", "side"), [("STOCK", "long"), ("STOCK", "short"), ("OPTION", "long"), ("OPTION", "short")])
@pytest.mark.parametrize(("case", "ts", "stale", "observed"), STALE_CASES)
def test_stale_bar_is_flagged_and_its_prices_are_not_judged(now, instrument, side, case, ts, stale, observed):
    # The close would hit the stop: only a fresh bar may act on it.
    close = "50" if instrument == "STOCK" else "1.00"
    close = close if side == "long" else ("150" if instrument == "STOCK" else "3.00")
    pos = position(instrument, side, opened_at=now - timedelta(minutes=10))
    evaluation = run(pos, {"ts": ts(now), "close": D(close)}, now)
    result = evaluation.result("data_freshness")
    assert (result.code, result.fired, result.observed, result.limit) == (("STALE_DATA" if stale else "HOLD"), False, observed, 180)
    assert evaluation.stale is stale
    assert evaluation.result("stop_loss").code == ("NOT_APPLICABLE" if stale else "STOP_LOSS")
    assert (evaluation.decision.code if evaluation.decision else None) == (None if stale else "STOP_LOSS")
    assert [n.name for n in evaluation.flags] == (["data_freshness"] if stale else [])


@pytest.mark.parametrize("bar", [None, {"ts": None, "close": D("100")}, {"ts": at(2026, 11, 30, 10, 59), "close": None}])
def test_missing_or_unusable_bar_is_stale(bar):
    now = at(2026, 11, 30, 11)
    evaluation = run(position("STOCK", opened_at=now - timedelta(minutes=10)), bar, now)
    assert evaluation.result("data_freshness").code == "STALE_DATA"
    assert evaluation.decision is None


@pytest.mark.parametrize(
    ("now", "fired"),
    [(at(2026, 11, 30, 15, 44, 59), False), (at(2026, 11, 30, 15, 45), True),
     (at(2026, 11, 27, 12, 44, 59), False), (at(2026, 11, 27, 12, 45), True)],
)
def test_swing_position_with_stale_data_is_closed_by_the_end_of_day_rule(now, fired):
    pos = position("STOCK", strategy="swing_trade", opened_at=at(2026, 11, 25, 10))
    evaluation = run(pos, fresh_bar("100", now, age_seconds=3600), now)
    assert evaluation.stale
    assert evaluation.result("end_of_day").fired is fired
    assert (evaluation.decision.code if evaluation.decision else None) == ("END_OF_DAY" if fired else None)


@pytest.mark.parametrize(
    ("now", "stale"),
    [
        (at(2026, 11, 30, 8), False),  # before the open: the last bar of Friday's 13:00 close is current
        (at(2026, 11, 28, 12), False),  # Saturday
        (at(2026, 11, 27, 18), False),  # after the early close
        (at(2026, 11, 30, 9, 30), True),  # the session opened: Friday's close is no price for Monday
    ],
)
def test_bar_age_outside_the_session_runs_only_to_the_last_close(now, stale):
    pos = position("STOCK", strategy="swing_trade", opened_at=at(2026, 11, 25, 10))
    bar = {"ts": at(2026, 11, 27, 12, 59), "close": D("100")}
    evaluation = run(pos, bar, now)
    assert evaluation.stale is stale
    assert evaluation.decision is None


# --- Precedence ------------------------------------------------------------------------------

PRECEDENCE_CASES = [
    # now, expiration, mark, close, params, rules expected to fire, decision
    (at(2026, 11, 30, 15, 45), date(2026, 11, 30), D("2.50"), "1.40", PARAMS,
     {"option_expiry_cutoff", "end_of_day", "stop_loss", "trailing_stop", "max_holding_time"}, "EXPIRY_CUTOFF"),
    (at(2026, 11, 30, 15, 45), EXPIRY, D("2.50"), "1.40", PARAMS,
     {"end_of_day", "stop_loss", "trailing_stop", "max_holding_time"}, "END_OF_DAY"),
    (at(2026, 11, 30, 14), EXPIRY, D("2.50"), "1.40", PARAMS,
     {"stop_loss", "trailing_stop", "max_holding_time"}, "STOP_LOSS"),
    (at(2026, 11, 30, 14), EXPIRY, D("4.00"), "3.10", PARAMS,
     {"trailing_stop", "take_profit", "max_holding_time"}, "TRAILING_STOP"),
    (at(2026, 11, 30, 14), EXPIRY, None, "3.10", PARAMS, {"take_profit", "max_holding_time"}, "TAKE_PROFIT"),
    (at(2026, 11, 30, 14), EXPIRY, None, "2.00", PARAMS, {"max_holding_time"}, "MAX_HOLDING_TIME"),
    (at(2026, 11, 30, 14), EXPIRY, None, "2.00", LONG_HOLD, set(), None),
]


@pytest.mark.parametrize(("now", "expiration", "mark", "close", "params", "fired", "decision"), PRECEDENCE_CASES)
def test_precedence_cutoffs_then_stop_trailing_target_holding_time(now, expiration, mark, close, params, fired, decision):
    pos = position("OPTION", opened_at=at(2026, 11, 30, 9, 45), expiration=expiration, mark=mark)
    evaluation = run(pos, fresh_bar(close, now), now, params)
    assert {n.name for n in evaluation.results if n.result.fired} == fired
    assert (evaluation.decision.code if evaluation.decision else None) == decision
    assert evaluate_exit(pos, fresh_bar(close, now), None, params, now, CAL) == evaluation.decision


def test_every_result_is_kept_in_precedence_order_and_serialises():
    now = at(2026, 11, 30, 14)
    evaluation = run(position("OPTION", opened_at=at(2026, 11, 30, 9, 45)), fresh_bar("1.40", now), now)
    assert [n.name for n in evaluation.results] == [
        "data_freshness", "option_expiry_cutoff", "option_days_to_expiry", "end_of_day",
        "stop_loss", "trailing_stop", "take_profit", "max_holding_time",
    ]
    rows = json.loads(json.dumps([n.as_json() for n in evaluation.results]))
    assert rows[4] == {"name": "stop_loss", "fired": True, "code": "STOP_LOSS", "reason": evaluation.results[4].result.reason,
                       "observed": "1.40", "limit": "1.400"}


# --- Bad inputs are flags, never exits -------------------------------------------------------


@pytest.mark.parametrize(
    "change",
    [{"opened_at": datetime(2026, 11, 30, 10)}, {"avg_price": D("0")}, {"side": "flat"}, {"strategy": "scalp"},
     {"instrument": "FUTURE"}, {"high_water_mark": "abc"}],
)
def test_unreadable_position_is_one_bad_position_flag(change):
    now = at(2026, 11, 30, 11)
    pos = {**position("STOCK", opened_at=at(2026, 11, 30, 10)), **change}
    evaluation = run(pos, fresh_bar("50", now), now)
    assert [(n.name, n.result.code, n.result.fired) for n in evaluation.results] == [("position", "BAD_POSITION", False)]
    assert evaluation.decision is None


def test_option_without_expiration_is_flagged_and_still_judged_on_price():
    now = at(2026, 11, 30, 11)
    pos = position("OPTION", opened_at=at(2026, 11, 30, 10), expiration=None)
    pos["expiration"] = None
    evaluation = run(pos, fresh_bar("1.40", now), now)
    assert evaluation.result("option_expiry_cutoff").code == "BAD_POSITION"
    assert evaluation.decision.code == "STOP_LOSS"


def test_expiration_outside_the_calendar_is_a_calendar_flag():
    now = at(2026, 11, 30, 11)
    pos = position("OPTION", opened_at=at(2026, 11, 30, 10), expiration=date(2031, 6, 20))
    evaluation = run(pos, fresh_bar("2.00", now), now)
    assert evaluation.result("option_expiry_cutoff").code == "CALENDAR_UNAVAILABLE"
    assert evaluation.decision is None


def test_naive_now_is_refused():
    with pytest.raises(ValueError):
        evaluate_exit(position(opened_at=at(2026, 11, 30, 10)), None, None, PARAMS, datetime(2026, 11, 30, 11), CAL)


# --- Params ----------------------------------------------------------------------------------


@pytest.fixture
def doc() -> dict:
    return json.loads(DEFAULT_PARAMS_PATH.read_text())


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        (("day_trade", "stock", "stop_loss_pct"), 1, "exits.day_trade.stock.stop_loss_pct: Input should be less than 1"),
        (("day_trade", "option", "stop_loss_pct"), 0, "exits.day_trade.option.stop_loss_pct: Input should be greater than 0"),
        (("swing_trade", "option", "take_profit_pct"), 11, "exits.swing_trade.option.take_profit_pct: Input should be less than or equal to 10"),
        (("day_trade", "option_expiry_cutoff_minutes_before_close"), 59,
         "exits.day_trade.option_expiry_cutoff_minutes_before_close: Input should be greater than or equal to 60"),
        (("swing_trade", "stale_bar_seconds"), 30, "exits.swing_trade.stale_bar_seconds: Input should be greater than or equal to 60"),
        (("day_trade", "min_trading_days_to_expiry"), 2, "exits.day_trade.min_trading_days_to_expiry: Extra inputs are not permitted"),
        (("day_trade", "stock", "stop_los_pct"), 0.1, "exits.day_trade.stock.stop_los_pct: Extra inputs are not permitted"),
        (("scalp",), {}, "exits.scalp: Extra inputs are not permitted"),
    ],
)
def test_exit_params_are_bounded_and_unknown_keys_refused(doc, path, value, expected):
    section = doc["exits"]
    for key in path[:-1]:
        section = section[key]
    section[path[-1]] = value
    with pytest.raises(ParamsError) as info:
        validate_params(doc)
    assert len(info.value.errors) == 1 and info.value.errors[0].startswith(expected)


def test_document_without_exits_is_refused(doc):
    del doc["exits"]
    with pytest.raises(ParamsError) as info:
        validate_params(doc)
    assert info.value.errors == ["exits: Field required"]


def test_overlay_of_one_nested_exit_field_keeps_its_siblings():
    p = as_params({"exits": {"day_trade": {"option": {"stop_loss_pct": 0.5}}}})
    assert p.exits.day_trade.option.stop_loss_pct == 0.5
    assert p.exits.day_trade.option.take_profit_pct == PARAMS.exits.day_trade.option.take_profit_pct
    assert p.exits.day_trade.stock == PARAMS.exits.day_trade.stock
    assert p.exits.swing_trade == PARAMS.exits.swing_trade

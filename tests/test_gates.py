"""The pure pre-trade gates: each rule as a table of cases, asserted on the result's fields.

Pins DESIGN.md's invariants for the gates: sessions and blocked windows in ET from the exchange
calendar (holidays, early closes, both DST changes), freshness from the data's own time,
exposure including the order under consideration and the option multiplier, fail-closed on
missing or malformed inputs, and every gate result kept and JSON-storable.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal

import pytest
from freezegun import freeze_time

from services.common.market_calendar import ET, Session, SessionCalendar
from services.common.params import TradingParams, as_params, default_params
from services.domain.broker import AccountSnapshot, AssetRecord
from services.dispatcher.risk.gates import (
    GateResult,
    check_market_open_for_exit,
    NamedGate,
    ProposedOrder,
    check_action_allowed,
    check_broker_reconciliation,
    check_bar_freshness,
    check_confidence,
    check_daily_loss_limit,
    check_feature_freshness,
    check_instrument_allowed,
    check_kill_switch,
    check_max_exposure,
    check_max_positions,
    check_no_open_position,
    check_not_future_dated,
    check_recommendation_age,
    check_ticker_cooldown,
    check_ticker_trades_today,
    check_trading_hours,
    evaluate_all_gates,
    first_denial,
)

UTC = timezone.utc
AAPL_ASSET = AssetRecord("AAPL", "active", tradable=True, shortable=True, fractionable=True, asset_class="us_equity",
                         easy_to_borrow=True)

# The seed's flat mapping; `as_params` overlays it on the reviewed defaults.
SEED_CONFIG = {
    "max_daily_loss": 500,
    "max_open_positions": 5,
    "max_notional_exposure": 10000,
    "max_option_spread": 0.10,
    "min_option_volume": 100,
    "min_open_interest": 100,
    "max_iv_percentile": 80,
}

# The seed's limits plus the sizing limits the exposure gate's observed values depend on, pinned
# so that a change to the reviewed defaults does not change what the tables prove.
PINNED_CONFIG = {**SEED_CONFIG, "max_notional_per_trade": 2500, "max_equity_pct_per_trade": 0.05}

# A Monday in November (EST), mid-session: 10:00 ET.
NOW = datetime(2026, 11, 30, 15, 0, tzinfo=UTC)

GATE_ORDER = [
    "kill_switch",
    "action_allowed",
    "instrument_allowed",
    "confidence",
    "recommendation_age",
    "bar_freshness",
    "asset",
    "feature_freshness",
    "trading_hours",
    "daily_loss",
    "broker_reconciliation",
    "ticker_trades_today",
    "ticker_cooldown",
    "open_position",
    "max_positions",
    "max_exposure",
]
ENTRY_ONLY = {
    "confidence",
    "feature_freshness",
    "daily_loss",
    "ticker_trades_today",
    "ticker_cooldown",
    "max_positions",
    "max_exposure",
}


@pytest.fixture(params=["seed_mapping", "typed_params"])
def config(request):
    """Every gate accepts both the seed's flat mapping and the typed params document."""
    if request.param == "seed_mapping":
        return dict(SEED_CONFIG)
    return default_params()


def et(day: date, hh: int, mm: int, ss: int = 0) -> datetime:
    return datetime(day.year, day.month, day.day, hh, mm, ss, tzinfo=ET)


def utc(y: int, mo: int, d: int, hh: int, mm: int, ss: int = 0) -> datetime:
    return datetime(y, mo, d, hh, mm, ss, tzinfo=UTC)


def assert_gate(result: GateResult, passed: bool, code: str) -> None:
    assert (result.passed, result.code) == (passed, code), result.reason


def test_seed_mapping_and_typed_params_give_the_same_limits():
    assert as_params(SEED_CONFIG) == default_params()


def test_gate_result_keeps_the_seed_tuple_shape():
    result = check_max_positions(1, SEED_CONFIG)
    passed, reason, observed, limit = result
    assert (passed, observed, limit) == (True, 2, 5)
    assert reason.startswith("OK: ")
    assert result.code == "OK"


# --- check_trading_hours ------------------------------------------------------------------------

MONDAY = date(2026, 11, 30)
EARLY_CLOSE = date(2026, 11, 27)  # day after Thanksgiving: closes 13:00 ET
THANKSGIVING = date(2026, 11, 26)


@pytest.mark.parametrize(
    "hh, mm, ss, passed, code",
    [
        (9, 29, 0, False, "MARKET_CLOSED"),
        (9, 29, 59, False, "MARKET_CLOSED"),
        (9, 30, 0, False, "OPENING_BLOCK"),
        (9, 34, 0, False, "OPENING_BLOCK"),
        (9, 34, 59, False, "OPENING_BLOCK"),
        (9, 35, 0, True, "OK"),
        (9, 36, 0, True, "OK"),
        (12, 0, 0, True, "OK"),
        (15, 44, 0, True, "OK"),
        (15, 44, 59, True, "OK"),
        (15, 45, 0, False, "CLOSING_BLOCK"),
        (15, 46, 0, False, "CLOSING_BLOCK"),
        (15, 59, 0, False, "CLOSING_BLOCK"),
        (16, 0, 0, False, "MARKET_CLOSED"),
        (20, 30, 0, False, "MARKET_CLOSED"),
    ],
    ids=lambda v: str(v),
)
def test_trading_hours_on_a_normal_weekday_blocks_first_5_and_last_15_minutes(config, hh, mm, ss, passed, code):
    result = check_trading_hours(config, now=et(MONDAY, hh, mm, ss))
    assert_gate(result, passed, code)
    assert result.observed == f"2026-11-30 {hh:02d}:{mm:02d}:{ss:02d} ET"
    assert result.limit == "09:35-15:45 ET"


@pytest.mark.parametrize(
    "hh, mm, passed, code",
    [
        (9, 34, False, "OPENING_BLOCK"),
        (9, 35, True, "OK"),
        (12, 44, True, "OK"),
        (12, 45, False, "CLOSING_BLOCK"),
        (12, 59, False, "CLOSING_BLOCK"),
        (13, 0, False, "MARKET_CLOSED"),
        (13, 30, False, "MARKET_CLOSED"),
        (15, 0, False, "MARKET_CLOSED"),
    ],
)
def test_trading_hours_on_the_early_close_blocks_12_45_to_13_00_and_closes_at_13_00(config, hh, mm, passed, code):
    result = check_trading_hours(config, now=et(EARLY_CLOSE, hh, mm))
    assert_gate(result, passed, code)
    assert result.limit == "09:35-12:45 ET"


@pytest.mark.parametrize("hh, mm", [(0, 0), (9, 35), (10, 0), (12, 44), (15, 0), (23, 59)])
def test_trading_hours_on_thanksgiving_is_market_closed_all_day(config, hh, mm):
    result = check_trading_hours(config, now=et(THANKSGIVING, hh, mm))
    assert_gate(result, False, "MARKET_CLOSED")
    assert result.limit is None


@pytest.mark.parametrize("day", [date(2026, 11, 28), date(2026, 11, 29)], ids=["saturday", "sunday"])
def test_trading_hours_on_a_weekend_is_market_closed(config, day):
    assert_gate(check_trading_hours(config, now=et(day, 11, 0)), False, "MARKET_CLOSED")


# `now` is built in UTC so that a wrong UTC offset would move the window by an hour.
@pytest.mark.parametrize(
    "now, passed, code",
    [
        # Monday after the 2026-03-08 change: EDT, UTC-4.
        pytest.param(utc(2026, 3, 9, 13, 29), False, "MARKET_CLOSED", id="mar09-0929EDT"),
        pytest.param(utc(2026, 3, 9, 13, 34), False, "OPENING_BLOCK", id="mar09-0934EDT"),
        pytest.param(utc(2026, 3, 9, 13, 35), True, "OK", id="mar09-0935EDT"),
        pytest.param(utc(2026, 3, 9, 19, 44), True, "OK", id="mar09-1544EDT"),
        pytest.param(utc(2026, 3, 9, 19, 45), False, "CLOSING_BLOCK", id="mar09-1545EDT"),
        pytest.param(utc(2026, 3, 9, 20, 0), False, "MARKET_CLOSED", id="mar09-1600EDT"),
        # Monday the week before: still EST, UTC-5.
        pytest.param(utc(2026, 3, 2, 13, 35), False, "MARKET_CLOSED", id="mar02-0835EST"),
        pytest.param(utc(2026, 3, 2, 14, 34), False, "OPENING_BLOCK", id="mar02-0934EST"),
        pytest.param(utc(2026, 3, 2, 14, 35), True, "OK", id="mar02-0935EST"),
        pytest.param(utc(2026, 3, 2, 20, 44), True, "OK", id="mar02-1544EST"),
        pytest.param(utc(2026, 3, 2, 20, 45), False, "CLOSING_BLOCK", id="mar02-1545EST"),
        # Monday after the 2026-11-01 change: EST, UTC-5.
        pytest.param(utc(2026, 11, 2, 13, 35), False, "MARKET_CLOSED", id="nov02-0835EST"),
        pytest.param(utc(2026, 11, 2, 14, 34), False, "OPENING_BLOCK", id="nov02-0934EST"),
        pytest.param(utc(2026, 11, 2, 14, 35), True, "OK", id="nov02-0935EST"),
        pytest.param(utc(2026, 11, 2, 20, 44), True, "OK", id="nov02-1544EST"),
        pytest.param(utc(2026, 11, 2, 20, 45), False, "CLOSING_BLOCK", id="nov02-1545EST"),
        pytest.param(utc(2026, 11, 2, 21, 0), False, "MARKET_CLOSED", id="nov02-1600EST"),
        # Monday the week before: still EDT, UTC-4.
        pytest.param(utc(2026, 10, 26, 13, 34), False, "OPENING_BLOCK", id="oct26-0934EDT"),
        pytest.param(utc(2026, 10, 26, 13, 35), True, "OK", id="oct26-0935EDT"),
        pytest.param(utc(2026, 10, 26, 19, 45), False, "CLOSING_BLOCK", id="oct26-1545EDT"),
        pytest.param(utc(2026, 10, 26, 20, 0), False, "MARKET_CLOSED", id="oct26-1600EDT"),
    ],
)
def test_trading_hours_across_dst_changes_uses_the_et_offset_of_the_day(config, now, passed, code):
    assert_gate(check_trading_hours(config, now=now), passed, code)


@pytest.mark.parametrize(
    "frozen, passed, code",
    [
        ("2026-11-30 15:00:00+00:00", True, "OK"),  # 10:00 EST
        ("2026-11-30 14:32:00+00:00", False, "OPENING_BLOCK"),  # 09:32 EST
        ("2026-11-26 15:00:00+00:00", False, "MARKET_CLOSED"),  # Thanksgiving
        ("2026-11-27 17:50:00+00:00", False, "CLOSING_BLOCK"),  # 12:50 EST on the early close
    ],
)
def test_trading_hours_without_now_reads_the_wall_clock(frozen, passed, code):
    with freeze_time(frozen):
        result = check_trading_hours(SEED_CONFIG)
    assert_gate(result, passed, code)


def test_trading_hours_with_a_naive_now_raises_rather_than_guess_a_zone():
    with pytest.raises(ValueError, match="naive"):
        check_trading_hours(SEED_CONFIG, now=datetime(2026, 11, 30, 10, 0))


def test_trading_hours_outside_the_loaded_calendar_denies_calendar_unavailable():
    one_day = SessionCalendar([Session(MONDAY, et(MONDAY, 9, 30).astimezone(UTC), et(MONDAY, 16, 0).astimezone(UTC))])
    assert_gate(check_trading_hours(SEED_CONFIG, now=et(MONDAY, 10, 0), calendar=one_day), True, "OK")
    result = check_trading_hours(SEED_CONFIG, now=et(date(2026, 12, 1), 10, 0), calendar=one_day)
    assert_gate(result, False, "CALENDAR_UNAVAILABLE")


def test_trading_hours_windows_follow_the_params():
    params = as_params({"block_after_open_minutes": 0, "block_before_close_minutes": 30})
    assert_gate(check_trading_hours(params, now=et(MONDAY, 9, 30)), True, "OK")
    assert_gate(check_trading_hours(params, now=et(MONDAY, 15, 29)), True, "OK")
    assert_gate(check_trading_hours(params, now=et(MONDAY, 15, 30)), False, "CLOSING_BLOCK")


# --- check_daily_loss_limit ---------------------------------------------------------------------


def account(equity, last_equity=Decimal("100000"), as_of=NOW, **extra) -> dict:
    return {"equity": equity, "last_equity": last_equity, "as_of": as_of, **extra}


@pytest.mark.parametrize(
    "state, passed, code, observed",
    [
        pytest.param(account(Decimal("99500.01")), True, "OK", Decimal("499.99"), id="loss-499.99-passes"),
        pytest.param(account(Decimal("99500.00")), False, "DAILY_LOSS_LIMIT", Decimal("500"), id="loss-500.00-denies"),
        pytest.param(account(Decimal("99000")), False, "DAILY_LOSS_LIMIT", Decimal("1000"), id="loss-1000-denies"),
        pytest.param(account(Decimal("100250")), True, "OK", Decimal("0"), id="gain-passes"),
        pytest.param(account(Decimal("100000")), True, "OK", Decimal("0"), id="flat-passes"),
        pytest.param(account("99500.01", "100000"), True, "OK", Decimal("499.99"), id="strings-are-parsed"),
        pytest.param(
            account(Decimal("1"), daily_pnl=Decimal("-100")), True, "OK", Decimal("100"), id="explicit-pnl-wins-pass"
        ),
        pytest.param(account(Decimal("100000"), daily_pnl="-500"), False, "DAILY_LOSS_LIMIT", Decimal("500"), id="explicit-pnl-wins-deny"),
    ],
)
def test_daily_loss_limit(config, state, passed, code, observed):
    result = check_daily_loss_limit(state, config, now=NOW)
    assert_gate(result, passed, code)
    assert result.observed == observed
    assert result.limit == Decimal(500)


def test_daily_loss_limit_accepts_the_broker_account_snapshot():
    snap = AccountSnapshot(
        equity=Decimal("99400"), last_equity=Decimal("100000"), cash=Decimal(0), buying_power=Decimal(0), as_of=NOW
    )
    result = check_daily_loss_limit(snap, SEED_CONFIG, now=NOW)
    assert_gate(result, False, "DAILY_LOSS_LIMIT")
    assert (result.observed, result.limit) == (Decimal("600"), Decimal(500))


def test_daily_loss_limit_without_now_keeps_the_seed_signature():
    assert_gate(check_daily_loss_limit(account(Decimal("99500")), SEED_CONFIG), False, "DAILY_LOSS_LIMIT")


@pytest.mark.parametrize(
    "state",
    [
        pytest.param(None, id="no-account-state"),
        pytest.param({}, id="empty-mapping"),
        pytest.param(account(float("nan")), id="nan-equity-float"),
        pytest.param(account(Decimal("NaN")), id="nan-equity-decimal"),
        pytest.param(account(Decimal("99000"), last_equity=float("inf")), id="infinite-last-equity"),
        pytest.param(account(None), id="missing-equity"),
        pytest.param(account(Decimal("99000"), last_equity=None), id="missing-last-equity"),
        pytest.param(account("lots"), id="garbage-equity"),
        pytest.param(account(Decimal("100000"), daily_pnl=float("nan")), id="nan-explicit-pnl"),
        pytest.param(account(Decimal("100000"), as_of=datetime(2026, 11, 30, 15, 0)), id="naive-as-of"),
    ],
)
def test_daily_loss_limit_without_usable_account_state_denies_no_account_state(config, state):
    result = check_daily_loss_limit(state, config, now=NOW)
    assert_gate(result, False, "NO_ACCOUNT_STATE")
    assert result.limit == Decimal(500)


@pytest.mark.parametrize(
    "age, passed, code",
    [(0, True, "OK"), (600, True, "OK"), (601, False, "STALE_ACCOUNT_STATE"), (86_400, False, "STALE_ACCOUNT_STATE")],
)
def test_daily_loss_limit_with_stale_account_state_denies(config, age, passed, code):
    result = check_daily_loss_limit(account(Decimal("100000"), as_of=NOW - timedelta(seconds=age)), config, now=NOW)
    assert_gate(result, passed, code)
    if not passed:
        assert (result.observed, result.limit) == (age, 600)


# --- check_max_positions ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "open_count, passed, code, observed",
    [
        (0, True, "OK", 1),
        (3, True, "OK", 4),
        (4, True, "OK", 5),  # 4 open + the proposed one = 5 of 5
        (5, False, "MAX_POSITIONS", 6),
        (22, False, "MAX_POSITIONS", 23),
    ],
)
def test_max_positions_counts_the_proposed_position(config, open_count, passed, code, observed):
    result = check_max_positions(open_count, config)
    assert_gate(result, passed, code)
    assert (result.observed, result.limit) == (observed, 5)


@pytest.mark.parametrize("bad", [None, -1, "4", 4.0, True, Decimal("4")], ids=repr)
def test_max_positions_with_a_bad_count_denies(config, bad):
    assert_gate(check_max_positions(bad, config), False, "NO_POSITION_COUNT")


# --- check_max_exposure -------------------------------------------------------------------------


def test_option_order_notional_counts_the_100_multiplier():
    assert ProposedOrder("OPTION", 2, Decimal("3.50")).notional == Decimal("700")
    assert ProposedOrder("STOCK", 2, Decimal("3.50")).notional == Decimal("7.00")


@pytest.mark.parametrize(
    "current, proposed, passed, code, observed",
    [
        pytest.param(Decimal("9000"), Decimal("1000"), True, "OK", Decimal("10000"), id="exactly-at-limit-passes"),
        pytest.param(Decimal("9000"), Decimal("1000.01"), False, "MAX_EXPOSURE", Decimal("10000.01"), id="a-cent-over-denies"),
        pytest.param(Decimal("9999.99"), Decimal("0.01"), True, "OK", Decimal("10000"), id="current-near-limit-small-order"),
        pytest.param(
            Decimal("9400"), ProposedOrder("OPTION", 2, Decimal("3.50")).notional, False, "MAX_EXPOSURE", Decimal("10100"),
            id="option-2-contracts-at-3.50-is-700-denies",
        ),
        pytest.param(
            Decimal("9300"), ProposedOrder("OPTION", 2, Decimal("3.50")).notional, True, "OK", Decimal("10000"),
            id="option-2-contracts-at-3.50-fits",
        ),
        pytest.param(Decimal("10000"), Decimal("0"), True, "OK", Decimal("10000"), id="seed-call-at-limit"),
        pytest.param("9000", "1000", True, "OK", Decimal("10000"), id="strings-are-parsed"),
    ],
)
def test_max_exposure_includes_the_proposed_order(config, current, proposed, passed, code, observed):
    result = check_max_exposure(current, config, proposed)
    assert_gate(result, passed, code)
    assert (result.observed, result.limit) == (observed, Decimal(10000))


def test_max_exposure_seed_signature_without_a_proposed_order():
    assert_gate(check_max_exposure(Decimal("10000.01"), SEED_CONFIG), False, "MAX_EXPOSURE")


@pytest.mark.parametrize(
    "current, proposed",
    [
        (None, Decimal(0)),
        (float("nan"), Decimal(0)),
        (Decimal("NaN"), Decimal(0)),
        (Decimal("-1"), Decimal(0)),
        ("lots", Decimal(0)),
        (Decimal(0), Decimal("NaN")),
        (Decimal(0), None),
        (Decimal(0), Decimal("-700")),
    ],
    ids=repr,
)
def test_max_exposure_with_bad_notionals_denies_no_exposure(config, current, proposed):
    assert_gate(check_max_exposure(current, config, proposed), False, "NO_EXPOSURE")


# --- check_kill_switch --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "state, action, passed, code",
    [
        ("ACTIVE", "BUY", True, "OK"),
        ("ACTIVE", "SELL", True, "OK"),
        ("ACTIVE", "EXIT", True, "OK"),
        ("REDUCING", "BUY", False, "KILL_SWITCH_REDUCING"),
        ("REDUCING", "SELL", False, "KILL_SWITCH_REDUCING"),
        ("REDUCING", "EXIT", True, "OK"),
        ("REDUCING", None, False, "KILL_SWITCH_REDUCING"),
        ("HALTED", "BUY", False, "KILL_SWITCH_HALTED"),
        ("HALTED", "EXIT", False, "KILL_SWITCH_HALTED"),
        ("active", "BUY", False, "NO_KILL_SWITCH_STATE"),
        ("PAUSED", "EXIT", False, "NO_KILL_SWITCH_STATE"),
        (None, "BUY", False, "NO_KILL_SWITCH_STATE"),
        ("", "EXIT", False, "NO_KILL_SWITCH_STATE"),
    ],
)
def test_kill_switch(state, action, passed, code):
    result = check_kill_switch(state, action)
    assert_gate(result, passed, code)
    assert result.limit == "ACTIVE"


@pytest.mark.parametrize(
    "state, action, exit_reason, passed, code",
    [
        ("HALTED", "EXIT", "OPERATOR_FLATTEN", True, "OK"),  # the flatten the operator asked for
        ("HALTED", "EXIT", "STOP_LOSS", False, "KILL_SWITCH_HALTED"),  # a rule's exit waits for resume
        ("HALTED", "EXIT", "DAILY_LOSS_FLATTEN", False, "KILL_SWITCH_HALTED"),
        ("HALTED", "EXIT", None, False, "KILL_SWITCH_HALTED"),
        ("HALTED", "BUY", "OPERATOR_FLATTEN", False, "KILL_SWITCH_HALTED"),  # the reason lets out exits only
        ("REDUCING", "EXIT", "DAILY_LOSS_FLATTEN", True, "OK"),
    ],
)
def test_kill_switch_lets_out_only_the_operators_flatten_while_halted(state, action, exit_reason, passed, code):
    assert_gate(check_kill_switch(state, action, exit_reason), passed, code)


def test_a_halt_that_asked_to_flatten_lets_out_every_exit_and_still_no_entry():
    assert_gate(check_kill_switch("HALTED", "EXIT", "STOP_LOSS", flatten=True), True, "OK")
    assert_gate(check_kill_switch("HALTED", "EXIT", None, flatten=True), True, "OK")
    assert_gate(check_kill_switch("HALTED", "BUY", None, flatten=True), False, "KILL_SWITCH_HALTED")


# --- check_action_allowed / check_instrument_allowed --------------------------------------------


@pytest.mark.parametrize(
    "action, instrument, passed, code",
    [
        ("BUY", "STOCK", True, "OK"),
        ("BUY", "OPTION", True, "OK"),
        ("SELL", "OPTION", True, "OK"),  # a bearish option entry buys a put
        ("SELL", "STOCK", False, "SHORT_NOT_ALLOWED"),
        ("EXIT", "STOCK", True, "OK"),
        ("HOLD", "STOCK", False, "UNKNOWN_ACTION"),
        (None, "STOCK", False, "UNKNOWN_ACTION"),
    ],
)
def test_action_allowed(config, action, instrument, passed, code):
    assert_gate(check_action_allowed(action, instrument, config), passed, code)


def test_action_allowed_sell_stock_when_shorting_is_allowed_passes():
    assert_gate(check_action_allowed("SELL", "STOCK", {"allow_short": True}), True, "OK")


OPTIONS_ONLY = {"allowed_instruments": ["OPTION"], "allow_stock_fallback": False}


@pytest.mark.parametrize(
    "instrument, cfg, passed, code",
    [
        ("STOCK", SEED_CONFIG, True, "OK"),
        ("OPTION", SEED_CONFIG, True, "OK"),
        ("OPTION", OPTIONS_ONLY, True, "OK"),
        ("STOCK", OPTIONS_ONLY, False, "INSTRUMENT_NOT_ALLOWED"),  # the $25K stock order on an options-only account
        ("FUTURE", SEED_CONFIG, False, "UNKNOWN_INSTRUMENT"),
        (None, SEED_CONFIG, False, "UNKNOWN_INSTRUMENT"),
    ],
)
def test_instrument_allowed(instrument, cfg, passed, code):
    assert_gate(check_instrument_allowed(instrument, cfg), passed, code)


# --- check_confidence ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "confidence, strategy, passed, code, limit",
    [
        (0.59, "day_trade", False, "LOW_CONFIDENCE", 0.6),
        (0.6, "day_trade", True, "OK", 0.6),
        (Decimal("0.6"), "day_trade", True, "OK", 0.6),
        ("0.6", "day_trade", True, "OK", 0.6),
        (0.55, "day_trade", False, "LOW_CONFIDENCE", 0.6),
        (0.55, "swing_trade", True, "OK", 0.5),  # the same confidence passes the swing threshold
        (0.5, "swing_trade", True, "OK", 0.5),
        (0.49, "swing_trade", False, "LOW_CONFIDENCE", 0.5),
        (1, "day_trade", True, "OK", 0.6),
    ],
)
def test_confidence_threshold_depends_on_the_strategy(confidence, strategy, passed, code, limit):
    thresholds = {"min_confidence_day_trade": 0.6, "min_confidence_swing_trade": 0.5}
    result = check_confidence(confidence, strategy, {**SEED_CONFIG, **thresholds})
    assert_gate(result, passed, code)
    assert result.limit == limit
    assert result.observed == float(confidence)


@pytest.mark.parametrize("strategy", ["scalp", None, "DAY_TRADE"])
def test_confidence_with_an_unknown_strategy_denies(config, strategy):
    assert_gate(check_confidence(0.9, strategy, config), False, "UNKNOWN_STRATEGY")


@pytest.mark.parametrize(
    "confidence", [float("nan"), Decimal("NaN"), float("inf"), None, "abc", 1.5, -0.1, True], ids=repr
)
def test_confidence_that_is_not_a_probability_denies_bad_confidence(config, confidence):
    assert_gate(check_confidence(confidence, "day_trade", config), False, "BAD_CONFIDENCE")


# --- check_bar_freshness ------------------------------------------------------------------------


def bar(ts, open_="100", high="101", low="99", close="100.5") -> dict:
    return {"ts": ts, "open": Decimal(open_) if open_ is not None else None,
            "high": high if high is None else Decimal(high), "low": low if low is None else Decimal(low),
            "close": close if close is None else Decimal(close), "volume": 1000}


@pytest.mark.parametrize(
    "began_seconds_ago, passed, code, observed",
    [
        pytest.param(60, True, "OK", 0.0, id="just-completed"),
        pytest.param(200, True, "OK", 140.0, id="began-200s-ago-ended-140s-ago"),
        pytest.param(240, True, "OK", 180.0, id="ended-exactly-180s-ago-at-limit"),
        pytest.param(241, False, "STALE_BAR", 181.0, id="ended-181s-ago"),
        pytest.param(3600, False, "STALE_BAR", 3540.0, id="an-hour-old"),
    ],
)
def test_bar_freshness_is_measured_from_the_bars_end(config, began_seconds_ago, passed, code, observed):
    result = check_bar_freshness(bar(NOW - timedelta(seconds=began_seconds_ago)), NOW, config)
    assert_gate(result, passed, code)
    assert (result.observed, result.limit) == (observed, 180)


@dataclass(frozen=True)
class BarRow:
    ts: datetime
    open: Decimal
    high: Decimal
    low: Decimal
    close: Decimal


def test_bar_freshness_accepts_an_attribute_object():
    row = BarRow(NOW - timedelta(seconds=90), Decimal(1), Decimal(2), Decimal(1), Decimal("1.5"))
    assert_gate(check_bar_freshness(row, NOW, SEED_CONFIG), True, "OK")


FRESH = NOW - timedelta(seconds=60)


@pytest.mark.parametrize(
    "b",
    [
        pytest.param(bar(FRESH, close="NaN"), id="nan-close"),
        pytest.param({**bar(FRESH), "close": float("nan")}, id="nan-close-float"),
        pytest.param(bar(FRESH, close="0"), id="zero-close"),
        pytest.param(bar(FRESH, close="-1"), id="negative-close"),
        pytest.param(bar(FRESH, close=None), id="missing-close"),
        pytest.param(bar(FRESH, open_=None), id="missing-open"),
        pytest.param({**bar(FRESH), "close": "abc"}, id="garbage-close"),
        pytest.param(bar(FRESH, high="99", low="101"), id="high-below-low"),
        pytest.param(bar(datetime(2026, 11, 30, 14, 59)), id="naive-ts"),
        pytest.param({**bar(FRESH), "ts": None}, id="missing-ts"),
        pytest.param({**bar(FRESH), "ts": FRESH.isoformat()}, id="string-ts"),
    ],
)
def test_bar_freshness_with_a_malformed_bar_denies_bad_bar(config, b):
    result = check_bar_freshness(b, NOW, config)
    assert_gate(result, False, "BAD_BAR")
    assert result.limit == 180


def test_bar_freshness_without_a_bar_denies_no_bar(config):
    assert_gate(check_bar_freshness(None, NOW, config), False, "NO_BAR")


# --- check_feature_freshness --------------------------------------------------------------------


@pytest.mark.parametrize(
    "ts_ago, computed_ago, passed, code",
    [
        pytest.param(60, 1, True, "OK", id="fresh"),
        pytest.param(360, 1, True, "OK", id="bar-ended-exactly-300s-ago"),
        pytest.param(361, 1, False, "STALE_FEATURES", id="old-ts-fresh-computed-at-is-stale"),
        pytest.param(7200, 0, False, "STALE_FEATURES", id="computed-just-now-from-2h-old-bars"),
        pytest.param(60, 7200, True, "OK", id="old-computed-at-fresh-ts"),
    ],
)
def test_feature_freshness_is_measured_from_features_ts_not_computed_at(config, ts_ago, computed_ago, passed, code):
    features = {"ts": NOW - timedelta(seconds=ts_ago), "computed_at": NOW - timedelta(seconds=computed_ago)}
    result = check_feature_freshness(features, NOW, config)
    assert_gate(result, passed, code)
    assert result.limit == 300


def test_feature_freshness_without_features_denies(config):
    assert_gate(check_feature_freshness(None, NOW, config), False, "NO_FEATURES")
    assert_gate(check_feature_freshness({"ts": datetime(2026, 11, 30, 14, 59)}, NOW, config), False, "BAD_FEATURES")
    assert_gate(check_feature_freshness({"computed_at": NOW}, NOW, config), False, "BAD_FEATURES")


# --- check_recommendation_age -------------------------------------------------------------------


@pytest.mark.parametrize(
    "created_at, passed, code",
    [
        (NOW - timedelta(seconds=300), True, "OK"),
        (NOW - timedelta(seconds=301), False, "STALE_RECOMMENDATION"),
        (NOW, True, "OK"),
        (datetime(2026, 11, 30, 14, 59), False, "BAD_RECOMMENDATION"),
        (None, False, "BAD_RECOMMENDATION"),
        ("2026-11-30T14:59:00+00:00", False, "BAD_RECOMMENDATION"),
    ],
    ids=repr,
)
def test_recommendation_age(config, created_at, passed, code):
    result = check_recommendation_age(created_at, NOW, config)
    assert_gate(result, passed, code)
    assert result.limit == 300


# --- time from other machines: FUTURE_DATED -----------------------------------------------------

# The reviewed default tolerance is 5 s; each case states its lead over NOW.
SKEW_CASES = [
    pytest.param(4.999, True, "OK", id="just-inside-the-tolerance"),
    pytest.param(5, True, "OK", id="exactly-at-the-tolerance"),
    pytest.param(5.001, False, "FUTURE_DATED", id="just-past-the-tolerance"),
    pytest.param(3600, False, "FUTURE_DATED", id="an-hour-ahead"),
]
FAR_FUTURE = [
    pytest.param(datetime(2999, 1, 1, tzinfo=UTC), id="2999-01-01"),
    pytest.param(datetime(9999, 12, 31, tzinfo=UTC), id="9999-12-31"),
]


def ahead(lead: float) -> datetime:
    return NOW + timedelta(seconds=lead)


def assert_future_dated(result: GateResult, lead: float | None = None) -> None:
    assert_gate(result, False, "FUTURE_DATED")
    assert result.limit == 5
    assert result.observed == (lead if lead is not None else result.observed) and result.observed > 5


def test_clock_skew_tolerance_is_a_bounded_param_defaulting_to_5_seconds():
    assert default_params().risk.max_clock_skew_seconds == 5
    assert as_params({"max_clock_skew_seconds": 0}).risk.max_clock_skew_seconds == 0
    for bad in (-1, 61):
        with pytest.raises(ValueError, match="max_clock_skew_seconds"):
            as_params({"max_clock_skew_seconds": bad})


@pytest.mark.parametrize("lead, passed, code", SKEW_CASES)
def test_not_future_dated_boundaries_observe_the_lead_against_the_tolerance(config, lead, passed, code):
    result = check_not_future_dated("created_at", ahead(lead), NOW, config)
    assert_gate(result, passed, code)
    assert (result.observed, result.limit) == (pytest.approx(lead), 5)


def test_not_future_dated_follows_the_params_tolerance():
    assert_gate(check_not_future_dated("x", ahead(1), NOW, {"max_clock_skew_seconds": 0}), False, "FUTURE_DATED")
    assert_gate(check_not_future_dated("x", ahead(30), NOW, {"max_clock_skew_seconds": 30}), True, "OK")


@pytest.mark.parametrize("lead, passed, code", SKEW_CASES)
def test_recommendation_created_in_the_future_denies_future_dated_not_a_negative_age(config, lead, passed, code):
    result = check_recommendation_age(ahead(lead), NOW, config)
    assert_gate(result, passed, code)
    if not passed:
        assert (result.observed, result.limit) == (pytest.approx(lead), 5)


@pytest.mark.parametrize("lead, passed, code", SKEW_CASES)
def test_recommendation_whose_signal_bar_is_in_the_future_denies_future_dated(config, lead, passed, code):
    result = check_recommendation_age(NOW - timedelta(seconds=10), NOW, config, bar_ts=ahead(lead))
    assert_gate(result, passed, code)
    if not passed:
        assert (result.observed, result.limit) == (pytest.approx(lead), 5)
        assert result.reason.startswith("FUTURE_DATED: bar_ts=")


@pytest.mark.parametrize("when", FAR_FUTURE)
def test_recommendation_dated_in_a_far_year_denies_future_dated(config, when):
    result = check_recommendation_age(when, NOW, config)
    assert_future_dated(result, (when - NOW).total_seconds())


def test_recommendation_with_a_naive_bar_ts_denies_bad_recommendation(config):
    result = check_recommendation_age(NOW, NOW, config, bar_ts=datetime(2026, 11, 30, 14, 59))
    assert_gate(result, False, "BAD_RECOMMENDATION")


@pytest.mark.parametrize("lead, passed, code", SKEW_CASES)
def test_bar_beginning_in_the_future_denies_future_dated_not_fresh(config, lead, passed, code):
    result = check_bar_freshness(bar(ahead(lead)), NOW, config)
    assert_gate(result, passed, code)
    if not passed:
        assert (result.observed, result.limit) == (pytest.approx(lead), 5)


@pytest.mark.parametrize("lead, passed, code", SKEW_CASES)
def test_features_from_a_future_bar_deny_future_dated(config, lead, passed, code):
    result = check_feature_freshness({"ts": ahead(lead)}, NOW, config)
    assert_gate(result, passed, code)


@pytest.mark.parametrize("when", FAR_FUTURE)
def test_every_gate_runs_and_the_far_future_recommendation_is_denied_future_dated(config, when):
    rec = {"action": "BUY", "instrument": "STOCK", "strategy": "day_trade", "confidence": 0.9,
           "created_at": when, "bar_ts": when}
    passed, gates = evaluate_all_gates(rec, bar(NOW - timedelta(seconds=60)), {"ts": NOW - timedelta(seconds=60)},
                                       0, None, False, config, now=NOW,
                                       account_state={"equity": 100000, "last_equity": 100000})
    assert passed is False
    assert [g.name for g in gates] == GATE_ORDER
    failed = first_denial(gates)
    assert (failed.name, failed.result.code) == ("recommendation_age", "FUTURE_DATED")
    assert json.loads(json.dumps(failed.as_json()))["observed"] == (when - NOW).total_seconds()


# --- check_ticker_trades_today / check_ticker_cooldown / check_no_open_position -----------------


@pytest.mark.parametrize(
    "count, passed, code", [(0, True, "OK"), (1, True, "OK"), (2, False, "TICKER_DAILY_TRADES"), (3, False, "TICKER_DAILY_TRADES")]
)
def test_ticker_trades_today_limit_2(config, count, passed, code):
    result = check_ticker_trades_today(count, config)
    assert_gate(result, passed, code)
    assert (result.observed, result.limit) == (count, 2)


@pytest.mark.parametrize(
    "bad",
    [
        None,
        -1,
        "1",
        1.0,
        pytest.param(
            True,
        ),
    ],
    ids=repr,
)
def test_ticker_trades_today_with_a_bad_count_denies(config, bad):
    assert_gate(check_ticker_trades_today(bad, config), False, "NO_TRADE_COUNT")


@pytest.mark.parametrize(
    "since, passed, code",
    [
        pytest.param(timedelta(minutes=29, seconds=59), False, "TICKER_COOLDOWN", id="29m59s-denies"),
        pytest.param(timedelta(minutes=30), True, "OK", id="30m00s-passes"),
        pytest.param(timedelta(seconds=1), False, "TICKER_COOLDOWN", id="1s-denies"),
        pytest.param(timedelta(hours=5), True, "OK", id="5h-passes"),
    ],
)
def test_ticker_cooldown_30_minutes(config, since, passed, code):
    result = check_ticker_cooldown(NOW - since, NOW, config)
    assert_gate(result, passed, code)
    assert (result.observed, result.limit) == (since.total_seconds(), 1800)


def test_ticker_cooldown_without_a_previous_trade_passes_and_with_a_naive_time_denies(config):
    assert_gate(check_ticker_cooldown(None, NOW, config), True, "OK")
    assert_gate(check_ticker_cooldown(datetime(2026, 11, 30, 14, 0), NOW, config), False, "BAD_LAST_TRADE_TIME")


@pytest.mark.parametrize(
    "has_position, action, passed, code",
    [
        (True, "BUY", False, "POSITION_ALREADY_OPEN"),
        (True, "SELL", False, "POSITION_ALREADY_OPEN"),
        (False, "BUY", True, "OK"),
        (True, "EXIT", True, "OK"),
        (False, "EXIT", False, "NO_POSITION_TO_EXIT"),
        (None, "BUY", False, "NO_POSITION_STATE"),
        (None, "EXIT", False, "NO_POSITION_STATE"),
        (1, "BUY", False, "NO_POSITION_STATE"),
    ],
)
def test_open_position(has_position, action, passed, code):
    assert_gate(check_no_open_position(has_position, action), passed, code)


# --- evaluate_all_gates -------------------------------------------------------------------------


def good_context(**overrides) -> dict:
    """Everything an entry needs to pass at 10:00 ET on a normal Monday.

    The recommendation, bar and features are dated just before `now` (an override moves them
    with it), so a case that changes the time isolates its own gate.
    """
    now = overrides.get("now", NOW)
    ctx = dict(
        recommendation={
            "ticker": "AAPL",
            "action": "BUY",
            "instrument": "STOCK",
            "strategy": "day_trade",
            "confidence": Decimal("0.72"),
            "created_at": now - timedelta(seconds=30),
        },
        bar=bar(now - timedelta(seconds=120), "100", "101", "99", "100"),
        features={"ts": now - timedelta(seconds=120), "computed_at": now - timedelta(seconds=5)},
        ticker_count_today=0,
        last_trade_time=None,
        has_open_position=False,
        config=PINNED_CONFIG,
        now=now,
        account_state=account(Decimal("100000")),
        kill_switch_state="ACTIVE",
        open_positions_count=0,
        total_notional=Decimal("0"),
        asset=AAPL_ASSET,
    )
    ctx.update(overrides)
    return ctx


@pytest.mark.parametrize(
    "reconciled_at, passed, code, observed",
    [
        pytest.param(NOW - timedelta(seconds=299), True, "OK", 299, id="299s-passes"),
        pytest.param(NOW - timedelta(seconds=300), True, "OK", 300, id="exactly-300s-passes"),
        pytest.param(NOW - timedelta(seconds=301), False, "STALE_RECONCILIATION", 301, id="301s-denies"),
        pytest.param(None, False, "NO_RECONCILIATION", None, id="never-reconciled-denies"),
    ],
)
def test_broker_reconciliation_ages_like_the_account_state(reconciled_at, passed, code, observed):
    params = as_params({"risk": {"max_reconciliation_age_seconds": 300}})
    result = check_broker_reconciliation(account(Decimal("100000"), orders_reconciled_at=reconciled_at), NOW, params)
    assert (result.passed, result.code, result.observed, result.limit) == (passed, code, observed, 300)


def test_broker_reconciliation_is_not_judged_for_a_caller_that_supplies_no_time():
    result = check_broker_reconciliation(account(Decimal("100000")), NOW, as_params({}))
    assert (result.passed, result.observed) == (True, None)
    assert "not evaluated" in result.reason


def test_stale_reconciliation_denies_entries_but_not_exits():
    stale = account(Decimal("100000"), orders_reconciled_at=NOW - timedelta(hours=1))
    _, entry = run_gates(account_state=stale)
    assert by_name(entry)["broker_reconciliation"].code == "STALE_RECONCILIATION"
    _, exit_ = run_gates(account_state=stale, recommendation={**good_context()["recommendation"], "action": "EXIT"},
                         has_open_position=True)
    assert by_name(exit_)["broker_reconciliation"].passed


def run_gates(**overrides):
    ctx = good_context(**overrides)
    return evaluate_all_gates(
        ctx.pop("recommendation"), ctx.pop("bar"), ctx.pop("features"), ctx.pop("ticker_count_today"),
        ctx.pop("last_trade_time"), ctx.pop("has_open_position"), ctx.pop("config"), **ctx,
    )


def by_name(gates: list[NamedGate]) -> dict[str, GateResult]:
    return {g.name: g.result for g in gates}


def test_all_gates_pass_for_a_good_entry_with_every_gate_in_order():
    passed, gates = run_gates()
    assert passed, [g.result.reason for g in gates if not g.result.passed]
    assert [g.name for g in gates] == GATE_ORDER
    assert all(g.result.code == "OK" for g in gates)
    exposure = by_name(gates)["max_exposure"]
    # Sized like the dispatcher: min(2500 per trade, 5% of 100k, room 10k) / 100 = 25 shares.
    assert (exposure.observed, exposure.limit) == (Decimal("2500"), Decimal(10000))


def test_all_gates_accept_typed_params():
    passed, gates = run_gates(config=default_params())
    assert passed and len(gates) == len(GATE_ORDER)


def test_all_gates_run_after_a_failure_and_keep_every_result():
    passed, gates = run_gates(
        kill_switch_state="HALTED",
        bar=bar(NOW - timedelta(hours=1)),
        has_open_position=True,
        open_positions_count=5,
        ticker_count_today=2,
    )
    assert not passed
    assert [g.name for g in gates] == GATE_ORDER
    codes = {g.name: g.result.code for g in gates}
    assert codes == {
        "kill_switch": "KILL_SWITCH_HALTED",
        "action_allowed": "OK",
        "instrument_allowed": "OK",
        "confidence": "OK",
        "recommendation_age": "OK",
        "bar_freshness": "STALE_BAR",
        "asset": "OK",
        "feature_freshness": "OK",
        "trading_hours": "OK",
        "daily_loss": "OK",
        "broker_reconciliation": "OK",
        "ticker_trades_today": "TICKER_DAILY_TRADES",
        "ticker_cooldown": "OK",
        "open_position": "POSITION_ALREADY_OPEN",
        "max_positions": "MAX_POSITIONS",
        "max_exposure": "OK",
    }
    assert first_denial(gates).name == "kill_switch"


@pytest.mark.parametrize(
    "overrides, gate, code",
    [
        pytest.param({"now": et(MONDAY, 9, 32)}, "trading_hours", "OPENING_BLOCK", id="opening-block"),
        pytest.param({"now": et(THANKSGIVING, 11, 0)}, "trading_hours", "MARKET_CLOSED", id="holiday"),
        pytest.param({"account_state": {"equity": Decimal("100000"), "last_equity": None, "as_of": NOW}},
                     "daily_loss", "NO_ACCOUNT_STATE", id="no-last-equity"),
        pytest.param({"account_state": account(Decimal("99500"))}, "daily_loss", "DAILY_LOSS_LIMIT", id="daily-loss"),
        pytest.param({"kill_switch_state": "REDUCING"}, "kill_switch", "KILL_SWITCH_REDUCING", id="reducing-blocks-entry"),
        pytest.param({"kill_switch_state": None}, "kill_switch", "NO_KILL_SWITCH_STATE", id="unknown-kill-switch-state"),
        pytest.param({"open_positions_count": 5}, "max_positions", "MAX_POSITIONS", id="five-of-five"),
        pytest.param({"total_notional": Decimal("9950")}, "max_exposure", "MAX_EXPOSURE", id="room-below-one-share"),
        pytest.param(
            {"account_state": account(Decimal("1999"), last_equity=Decimal("1999"))}, "max_exposure", "SIZE_ZERO",
            id="5pct-of-equity-below-one-share",
        ),
        pytest.param(
            {"total_notional": Decimal("9400"), "proposed_order": ProposedOrder("OPTION", 2, Decimal("3.50"))},
            "max_exposure", "MAX_EXPOSURE", id="option-order-x100-over-limit",
        ),
        pytest.param({"last_trade_time": NOW - timedelta(minutes=10)}, "ticker_cooldown", "TICKER_COOLDOWN", id="cooldown"),
        pytest.param(
            {"features": {"ts": NOW - timedelta(hours=1), "computed_at": NOW}}, "feature_freshness", "STALE_FEATURES",
            id="features-recomputed-from-old-bars",
        ),
    ],
)
def test_all_gates_deny_an_entry_with_the_failing_gates_code(overrides, gate, code):
    """Only the gate named fails: each case isolates one rule inside the full evaluation."""
    passed, gates = run_gates(**overrides)
    assert not passed
    assert len(gates) == len(GATE_ORDER)
    assert by_name(gates)[gate].code == code
    assert [g.name for g in gates if not g.result.passed] == [gate]


def test_exposure_room_below_one_share_reports_the_one_share_overshoot():
    _, gates = run_gates(total_notional=Decimal("9950"))  # bar close 100: one share would make 10050
    result = by_name(gates)["max_exposure"]
    assert (result.passed, result.code, result.observed, result.limit) == (False, "MAX_EXPOSURE", Decimal("10050"), Decimal(10000))


def test_option_order_exposure_observed_counts_the_multiplier():
    _, gates = run_gates(total_notional=Decimal("9400"), proposed_order=ProposedOrder("OPTION", 2, Decimal("3.50")))
    result = by_name(gates)["max_exposure"]
    assert (result.observed, result.limit) == (Decimal("10100"), Decimal(10000))


def test_exit_under_reducing_passes_with_entry_only_gates_not_applicable():
    passed, gates = run_gates(
        recommendation={**good_context()["recommendation"], "action": "EXIT", "confidence": None, "strategy": None},
        kill_switch_state="REDUCING",
        has_open_position=True,
        account_state=account(Decimal("90000")),  # the daily-loss trip that latched REDUCING
        open_positions_count=5,
        ticker_count_today=2,
        last_trade_time=NOW - timedelta(minutes=1),
        total_notional=Decimal("10000"),
        features=None,
    )
    assert passed, [g.result.reason for g in gates if not g.result.passed]
    assert [g.name for g in gates] == GATE_ORDER
    for g in gates:
        if g.name in ENTRY_ONLY:
            assert g.result.passed and g.result.reason == "OK: not applicable to a risk-reducing EXIT", g.name
        else:
            assert g.result.code == "OK", g.name


def test_all_gates_without_account_state_deny_daily_loss_and_sizing():
    passed, gates = run_gates(account_state=None)
    assert not passed
    denied = {g.name: g.result.code for g in gates if not g.result.passed}
    assert denied == {"daily_loss": "NO_ACCOUNT_STATE", "max_exposure": "NO_SIZE_INPUTS"}


def test_exit_with_a_stale_bar_passes_bar_freshness_with_the_finding_kept():
    stale = {"ts": NOW - timedelta(hours=2), "open": 100, "high": 100, "low": 100, "close": 100}
    rec = {**good_context()["recommendation"], "action": "EXIT"}
    passed, gates = run_gates(recommendation=rec, bar=stale, has_open_position=True)
    freshness = by_name(gates)["bar_freshness"]
    assert passed and freshness.passed
    assert freshness.reason.startswith("OK: not applicable to a risk-reducing EXIT: STALE_BAR")
    entry_passed, entry_gates = run_gates(bar=stale)
    assert not entry_passed and by_name(entry_gates)["bar_freshness"].code == "STALE_BAR"


def test_exit_under_halted_is_denied():
    passed, gates = run_gates(
        recommendation={**good_context()["recommendation"], "action": "EXIT"}, kill_switch_state="HALTED", has_open_position=True
    )
    assert not passed
    assert first_denial(gates).result.code == "KILL_SWITCH_HALTED"


GARBAGE = [
    pytest.param(
        dict(
            recommendation={"confidence": "abc", "action": None, "instrument": "STOCK", "strategy": "day_trade",
                            "created_at": NOW},
            bar={"ts": NOW - timedelta(seconds=60), "open": float("nan"), "high": float("nan"),
                 "low": float("nan"), "close": float("nan")},
        ),
        {"action_allowed": "UNKNOWN_ACTION", "confidence": "BAD_CONFIDENCE", "bar_freshness": "BAD_BAR",
         "max_exposure": "NO_SIZE_INPUTS"},
        id="abc-confidence-none-action-nan-bar",
    ),
    pytest.param(
        dict(
            recommendation=None, bar=None, features=None, ticker_count_today=None, last_trade_time="noon",
            has_open_position=None, account_state=None, kill_switch_state=None, open_positions_count=None,
            total_notional=None,
        ),
        {"kill_switch": "NO_KILL_SWITCH_STATE", "action_allowed": "UNKNOWN_ACTION", "instrument_allowed": "UNKNOWN_INSTRUMENT",
         "confidence": "UNKNOWN_STRATEGY", "recommendation_age": "BAD_RECOMMENDATION", "bar_freshness": "NO_BAR",
         "feature_freshness": "NO_FEATURES", "daily_loss": "NO_ACCOUNT_STATE", "ticker_trades_today": "NO_TRADE_COUNT",
         "ticker_cooldown": "BAD_LAST_TRADE_TIME", "open_position": "NO_POSITION_STATE",
         "max_positions": "NO_POSITION_COUNT", "max_exposure": "NO_SIZE_INPUTS"},
        id="everything-missing",
    ),
    pytest.param(
        dict(
            recommendation={"action": ["BUY"], "instrument": {"x": 1}, "strategy": ["day_trade"], "confidence": [],
                            "created_at": 12},
            features={"ts": "yesterday"}, ticker_count_today="two", account_state={"equity": "NaN", "last_equity": 1},
            total_notional="lots",
        ),
        {"action_allowed": "GATE_ERROR", "instrument_allowed": "GATE_ERROR", "confidence": "GATE_ERROR",
         "recommendation_age": "BAD_RECOMMENDATION", "feature_freshness": "BAD_FEATURES",
         "daily_loss": "NO_ACCOUNT_STATE", "ticker_trades_today": "NO_TRADE_COUNT", "max_exposure": "NO_SIZE_INPUTS"},
        id="unhashable-and-garbage-fields",
    ),
]


@pytest.mark.parametrize("overrides, expected_codes", GARBAGE)
def test_all_gates_with_garbage_inputs_deny_instead_of_raising(overrides, expected_codes):
    passed, gates = run_gates(**overrides)
    assert not passed
    assert [g.name for g in gates] == GATE_ORDER
    codes = {g.name: g.result.code for g in gates}
    assert {name: codes[name] for name in expected_codes} == expected_codes
    for g in gates:
        json.dumps(g.as_json())


def test_gate_json_has_name_passed_code_reason_observed_limit():
    _, gates = run_gates(total_notional=Decimal("9400"), proposed_order=ProposedOrder("OPTION", 2, Decimal("3.50")))
    stored = json.loads(json.dumps([g.as_json() for g in gates], allow_nan=False))
    assert [s["name"] for s in stored] == GATE_ORDER
    exposure = stored[-1]
    assert set(exposure) == {"name", "passed", "code", "reason", "observed", "limit"}
    assert exposure["passed"] is False and exposure["code"] == "MAX_EXPOSURE"
    assert (exposure["observed"], exposure["limit"]) == (10100, 10000)
    assert exposure["reason"] == exposure["code"] + ": notional=10100.00 (current=9400.00 proposed=700.00) limit=10000.00"


@pytest.mark.parametrize(
    "observed, expected",
    [
        (Decimal("10450.00"), 10450.0),
        (float("nan"), "nan"),
        (float("inf"), "inf"),
        (NOW, NOW.isoformat()),
        (["OPTION", "STOCK"], ["OPTION", "STOCK"]),
        (None, None),
        pytest.param(
            Decimal("NaN"), "NaN",
        ),
    ],
    ids=repr,
)
def test_named_gate_as_json_is_strict_json(observed, expected):
    gate = NamedGate("x", GateResult(False, "BAD: x", observed, Decimal(500)))
    text = json.dumps(gate.as_json(), allow_nan=False)
    stored = json.loads(text)
    assert stored["observed"] == expected
    assert stored["limit"] == 500


def test_all_gates_with_decimal_nan_confidence_store_as_strict_json():
    rec = {**good_context()["recommendation"], "confidence": Decimal("NaN")}
    passed, gates = run_gates(recommendation=rec)
    assert not passed and by_name(gates)["confidence"].code == "BAD_CONFIDENCE"
    json.dumps([g.as_json() for g in gates], allow_nan=False)


def test_gates_do_not_mutate_the_params_document():
    params = default_params()
    before = params.content_hash()
    run_gates(config=params)
    assert isinstance(params, TradingParams) and params.content_hash() == before
    assert math.isclose(params.confidence.min_confidence_day_trade, default_params().confidence.min_confidence_day_trade)


# --- exits and the session ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "when, passed, code",
    [
        (et(date(2026, 11, 30), 9, 32), True, "OK"),  # the opening block is for entries only
        (et(date(2026, 11, 30), 15, 50), True, "OK"),  # so is the closing block
        (et(date(2026, 11, 30), 20, 30), False, "MARKET_CLOSED"),  # no order after the close
        (et(date(2026, 11, 26), 11, 0), False, "MARKET_CLOSED"),  # Thanksgiving
    ],
)
def test_exit_passes_the_blocked_windows_but_not_a_closed_market(when, passed, code):
    result = check_market_open_for_exit(SEED_CONFIG, now=when)
    assert_gate(result, passed, code)


def test_exit_after_the_close_is_denied_by_evaluate_all_gates():
    when = et(date(2026, 11, 30), 20, 30)
    rec = {"action": "EXIT", "instrument": "STOCK", "strategy": "day_trade", "confidence": 0.9, "created_at": when}
    bar = {"ts": when - timedelta(minutes=1), "open": 10, "high": 10, "low": 10, "close": 10}
    ok, gates = evaluate_all_gates(rec, bar, None, 0, None, True, SEED_CONFIG, now=when,
                                   account_state={"equity": 1000, "last_equity": 1000})
    hours = next(g for g in gates if g.name == "trading_hours")
    assert not ok and hours.result.code == "MARKET_CLOSED"

"""Option gates, contract choice and the simulated chain."""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import subprocess
import sys
import time
from datetime import date, datetime, timedelta
from decimal import Decimal
from types import SimpleNamespace

import pytest

from services.common.market_calendar import ET, option_expiry_instant
from services.common.params import as_params, default_params
from services.domain.market_data import OptionQuote
from services.dispatcher.alpaca.options import (
    OPTION_GATE_NAMES,
    choose_contract,
    estimate_abs_delta,
    option_gate_results,
    size_option_order,
    validate_option_contract,
)
from services.domain.iv_percentile import iv_percentile
from services.adapters.sim.options import (
    SimChainSpec,
    black_scholes,
    contract_quote,
    simulate_chain,
    weekly_expirations,
)

# A Wednesday with a normal 16:00 close.
NOW = datetime(2026, 11, 18, 11, 0, tzinfo=ET)
NEXT_FRIDAY = date(2026, 11, 20)
PARAMS = default_params()
IV_OK = (40.0, "OK")


def quote(**kw) -> OptionQuote:
    """A liquid ATM call expiring two sessions out, quoted now: passes every option gate."""
    base = dict(
        symbol="SPY261120C00100000",
        underlying="SPY",
        expiration=NEXT_FRIDAY,
        strike=Decimal("100"),
        right="call",
        bid=Decimal("0.975"),
        ask=Decimal("1.025"),
        bid_size=10,
        ask_size=12,
        quote_time=NOW - timedelta(seconds=5),
        volume=500,
        open_interest=800,
        implied_volatility=0.3,
        delta=0.5,
        gamma=0.05,
        theta=-0.1,
        vega=0.05,
    )
    base.update(kw)
    return OptionQuote(**base)


def validate(contract, now=NOW, iv=IV_OK, config=PARAMS, calendar=None):
    return validate_option_contract(contract, config, now=now, iv_percentile=iv, calendar=calendar)


def code(reason: str) -> str:
    return reason.split(":", 1)[0]


# --- Boundaries of the liquidity gates ---------------------------------------------------------


def test_validate_when_all_gates_pass_then_ok_and_no_fallback():
    passed, reason, fallback = validate(quote())
    assert (passed, code(reason), fallback) == (True, "OK", False)


def test_spread_when_exactly_ten_percent_then_passes():
    passed, reason, _ = validate(quote(bid=Decimal("0.95"), ask=Decimal("1.05")))
    assert passed is True, reason
    assert "spread=0.1000" in reason


def test_spread_when_ten_point_zero_one_percent_then_denies_wide_spread():
    passed, reason, fallback = validate(quote(bid=Decimal("0.94995"), ask=Decimal("1.05005")))
    assert (passed, reason, fallback) == (False, "WIDE_SPREAD: spread=0.1001 limit=0.1000", True)


def test_spread_when_floats_at_exactly_ten_percent_then_passes():
    # 1.05 - 0.95 is 0.10000000000000009 in binary floats; the gate decides in Decimal.
    passed, reason, _ = validate(SimpleNamespace(bid=0.95, ask=1.05, volume=100, open_interest=100, iv_percentile=80))
    assert passed is True, reason


@pytest.mark.parametrize(
    "field,value,expected_passed,expected_code",
    [
        ("volume", 99, False, "LOW_VOLUME"),
        ("volume", 100, True, "OK"),
        ("open_interest", 99, False, "LOW_OPEN_INTEREST"),
        ("open_interest", 100, True, "OK"),
    ],
)
def test_liquidity_minimums_at_the_boundary(field, value, expected_passed, expected_code):
    passed, reason, fallback = validate(quote(**{field: value}))
    assert (passed, code(reason), fallback) == (expected_passed, expected_code, not expected_passed)


@pytest.mark.parametrize("pct,expected_passed", [(80, True), (80.0, True), (81, False), (80.5, False)])
def test_iv_percentile_at_the_boundary(pct, expected_passed):
    passed, reason, fallback = validate(quote(), iv=pct)
    assert passed is expected_passed
    if not expected_passed:
        assert code(reason) == "HIGH_IV_PERCENTILE"
        assert fallback is True


def test_low_volume_reason_carries_observed_and_limit():
    _, reason, _ = validate(quote(volume=99))
    assert reason == "LOW_VOLUME: volume=99 min=100"


# --- The seed's duck-typed contract and flat config -------------------------------------------

SEED_CONFIG = {"max_option_spread": 0.10, "min_option_volume": 100, "min_open_interest": 100, "max_iv_percentile": 80}


def test_seed_contract_with_plain_dict_config_when_liquid_then_passes():
    contract = SimpleNamespace(bid=2.00, ask=2.10, volume=150, open_interest=300, iv_percentile=55)
    passed, reason, fallback = validate_option_contract(contract, SEED_CONFIG, now=NOW)
    assert (passed, fallback) == (True, False)
    assert "iv_percentile=55.0" in reason


def test_seed_contract_with_plain_dict_config_honours_the_dict_limits():
    contract = SimpleNamespace(bid=2.00, ask=2.10, volume=150, open_interest=300, iv_percentile=55)
    tight = {**SEED_CONFIG, "max_option_spread": 0.04, "min_option_volume": 200}
    passed, reason, fallback = validate_option_contract(contract, tight, now=NOW)
    assert (passed, reason, fallback) == (False, "WIDE_SPREAD: spread=0.0488 limit=0.0400", True)


def test_seed_contract_iv_percentile_attribute_is_checked():
    contract = SimpleNamespace(bid=2.00, ask=2.10, volume=150, open_interest=300, iv_percentile=81)
    passed, reason, _ = validate_option_contract(contract, SEED_CONFIG, now=NOW)
    assert (passed, code(reason)) == (False, "HIGH_IV_PERCENTILE")


def test_seed_contract_result_unpacks_as_three_tuple():
    contract = SimpleNamespace(bid=2.00, ask=2.10, volume=150, open_interest=300, iv_percentile=10)
    result = validate_option_contract(contract, SEED_CONFIG, now=NOW)
    assert len(result) == 3 and result.passed is True


# --- The seed gates IV "when available" ---------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SeedContract:
    """The seed's contract as a dataclass: liquid, with an implied volatility but no IV percentile."""

    bid: float = 2.00
    ask: float = 2.10
    volume: int = 150
    open_interest: int = 300
    implied_volatility: float = 0.31


@dataclasses.dataclass(frozen=True)
class SeedContractWithIV(SeedContract):
    iv_percentile: float | None = None


SEED_DICT = {"bid": 2.00, "ask": 2.10, "volume": 150, "open_interest": 300, "implied_volatility": 0.31}
IV_NOT_EVALUATED = "OK: iv_percentile not evaluated: contract carries no iv_percentile"


def iv_gate(contract, **kw) -> dict:
    gates = option_gate_results(contract, SEED_CONFIG, NOW, **kw)
    return next(g for g in gates if g["name"] == "option_iv_percentile")


@pytest.mark.parametrize(
    "contract,expected_passed,expected_reason,expected_observed",
    [
        pytest.param(SeedContract(), True, IV_NOT_EVALUATED, None, id="dataclass-no-field"),
        pytest.param(SeedContractWithIV(iv_percentile=None), True, IV_NOT_EVALUATED, None, id="dataclass-field-none"),
        pytest.param(SEED_DICT, True, IV_NOT_EVALUATED, None, id="dict-missing-key"),
        pytest.param({**SEED_DICT, "iv_percentile": None}, True, IV_NOT_EVALUATED, None, id="dict-key-none"),
        pytest.param(quote(), True, IV_NOT_EVALUATED, None, id="option-quote-with-implied-volatility"),
        pytest.param(SeedContractWithIV(iv_percentile=80), True, "OK: iv_percentile=80.0 max=80", 80.0, id="dataclass-80"),
        pytest.param({**SEED_DICT, "iv_percentile": 80}, True, "OK: iv_percentile=80.0 max=80", 80.0, id="dict-80"),
        pytest.param(SeedContractWithIV(iv_percentile=81), False, "HIGH_IV_PERCENTILE: iv_percentile=81.0 max=80",
                     81.0, id="dataclass-81"),
        pytest.param({**SEED_DICT, "iv_percentile": 81}, False, "HIGH_IV_PERCENTILE: iv_percentile=81.0 max=80",
                     81.0, id="dict-81"),
        # Carried but broken is not "not available": it fails closed.
        pytest.param({**SEED_DICT, "iv_percentile": float("nan")}, False,
                     "NO_IV_PERCENTILE: iv_percentile=nan is not a percentile", None, id="dict-nan"),
        pytest.param(SeedContractWithIV(iv_percentile="high"), False,
                     "NO_IV_PERCENTILE: iv_percentile='high' is not a percentile", None, id="dataclass-not-a-number"),
    ],
)
def test_seed_validate_without_iv_keyword_gates_the_contracts_own_iv_percentile_when_available(
    contract, expected_passed, expected_reason, expected_observed
):
    gate = iv_gate(contract)
    assert (gate["passed"], gate["reason"], gate["observed"], gate["limit"]) == (
        expected_passed, expected_reason, expected_observed, 80)
    passed, reason, fallback = validate_option_contract(contract, SEED_CONFIG, now=NOW)
    assert (passed, fallback) == (expected_passed, not expected_passed)
    if expected_passed:
        assert reason.endswith(expected_reason.removeprefix("OK: "))
    else:
        assert reason == expected_reason


def test_seed_dict_contract_is_gated_on_its_quote_and_liquidity_like_an_object():
    passed, reason, fallback = validate_option_contract({**SEED_DICT, "volume": 99}, SEED_CONFIG, now=NOW)
    assert (passed, reason, fallback) == (False, "LOW_VOLUME: volume=99 min=100", True)
    passed, reason, _ = validate_option_contract({**SEED_DICT, "bid": None}, SEED_CONFIG, now=NOW)
    assert (passed, code(reason)) == (False, "NO_QUOTE")


@pytest.mark.parametrize(
    "iv,expected_passed,expected_code",
    [
        pytest.param(None, False, "NO_IV_PERCENTILE", id="explicit-none"),
        pytest.param(iv_percentile([0.2] * 30, None, min_sessions=20), False, "NO_IV_PERCENTILE", id="no-todays-iv"),
        pytest.param(iv_percentile([0.2] * 5, 0.3, min_sessions=20), True, "OK", id="short-history"),
        pytest.param(iv_percentile([0.2] * 30, 0.3, min_sessions=20), False, "HIGH_IV_PERCENTILE", id="history-says-high"),
    ],
)
def test_supplied_iv_decides_even_when_the_contract_carries_none(iv, expected_passed, expected_code):
    # The dispatcher's path: it always passes the keyword, so a contract without an IV
    # percentile does not turn its missing or broken IV inputs into "not evaluated".
    for contract in (SeedContract(), SEED_DICT, quote()):
        gate = iv_gate(contract, iv_percentile=iv)
        assert (gate["passed"], gate["code"]) == (expected_passed, expected_code)
        assert "contract carries no iv_percentile" not in gate["reason"]


def test_supplied_iv_overrides_the_contracts_own():
    gate = iv_gate(SeedContractWithIV(iv_percentile=10), iv_percentile=(95.0, "OK"))
    assert (gate["passed"], gate["code"], gate["observed"]) == (False, "HIGH_IV_PERCENTILE", 95.0)


def test_choose_contract_without_the_dispatchers_iv_denies_no_iv_percentile(calendar):
    selection = choose_contract(both_sides(NEXT_FRIDAY), "BULL", "day_trade", 100, PARAMS, NOW, calendar)
    assert selection.choice is not None
    assert (selection.choice.passed, code(selection.choice.reason)) == (False, "NO_IV_PERCENTILE")


# --- The IV percentile may be "not evaluated" only for a short history -------------------------


def test_iv_when_history_too_short_then_not_evaluated_and_passes():
    short = iv_percentile([0.2] * 5, 0.3, min_sessions=20)
    passed, reason, _ = validate(quote(), iv=short)
    assert passed is True
    assert "not evaluated: 5 sessions of history" in reason


def test_iv_when_missing_without_short_history_then_denies():
    passed, reason, fallback = validate(quote(), iv=None)
    assert (passed, code(reason), fallback) == (False, "NO_IV_PERCENTILE", True)


def test_iv_when_todays_iv_missing_then_denies_even_with_history():
    result = iv_percentile([0.2] * 30, None, min_sessions=20)
    passed, reason, _ = validate(quote(), iv=result)
    assert (passed, code(reason)) == (False, "NO_IV_PERCENTILE")


@pytest.mark.parametrize("bad", [float("nan"), -1, 101, "high"])
def test_iv_when_not_a_percentile_then_denies(bad):
    passed, reason, _ = validate(quote(), iv=bad)
    assert (passed, code(reason)) == (False, "NO_IV_PERCENTILE")


# --- Bad data denies with its own code ---------------------------------------------------------


@pytest.mark.parametrize(
    "overrides,expected_code",
    [
        ({"bid": None}, "NO_QUOTE"),
        ({"ask": None}, "NO_QUOTE"),
        ({"bid": Decimal("1.10"), "ask": Decimal("1.00")}, "CROSSED_QUOTE"),
        ({"bid": Decimal("NaN")}, "BAD_QUOTE"),
        ({"ask": float("nan")}, "BAD_QUOTE"),
        ({"ask": float("inf")}, "BAD_QUOTE"),
        ({"bid": Decimal("0"), "ask": Decimal("0")}, "BAD_QUOTE"),
        ({"ask": Decimal("0")}, "BAD_QUOTE"),
        ({"bid": Decimal("-0.05")}, "BAD_QUOTE"),
        ({"bid": Decimal("0")}, "NO_BID"),
        ({"quote_time": NOW - timedelta(seconds=121)}, "STALE_QUOTE"),
        ({"quote_time": None}, "STALE_QUOTE"),
        ({"quote_time": datetime(2026, 11, 18, 15, 59)}, "STALE_QUOTE"),  # naive
        ({"volume": None}, "NO_VOLUME"),
        ({"volume": float("nan")}, "NO_VOLUME"),
        ({"open_interest": None}, "NO_OPEN_INTEREST"),
        ({"open_interest": "n/a"}, "NO_OPEN_INTEREST"),
    ],
)
def test_bad_contract_data_denies_with_its_code_and_allows_fallback(overrides, expected_code):
    passed, reason, fallback = validate(quote(**overrides))
    assert (passed, code(reason), fallback) == (False, expected_code, True)


def test_quote_age_at_the_limit_passes():
    passed, reason, _ = validate(quote(quote_time=NOW - timedelta(seconds=120)))
    assert passed is True, reason


@pytest.mark.parametrize(
    "lead, passed, expected_code",
    [
        pytest.param(4.999, True, "OK", id="just-inside-the-5s-tolerance"),
        pytest.param(5, True, "OK", id="exactly-at-the-tolerance"),
        pytest.param(5.001, False, "FUTURE_DATED", id="just-past-the-tolerance"),
        pytest.param(3600, False, "FUTURE_DATED", id="an-hour-ahead"),
    ],
)
def test_quote_time_ahead_of_now_beyond_the_skew_tolerance_denies_future_dated(lead, passed, expected_code):
    contract = quote(quote_time=NOW + timedelta(seconds=lead))
    ok_, reason, fallback = validate(contract)
    assert (ok_, code(reason)) == (passed, expected_code), reason
    gate = next(g for g in option_gate_results(contract, PARAMS, NOW, IV_OK) if g["name"] == "option_quote_age")
    assert (gate["passed"], gate["code"]) == (passed, expected_code)
    if not passed:
        # Refused like a stale quote: this contract's market data is bad, the stock may be considered.
        assert fallback is True
        assert (gate["observed"], gate["limit"]) == (pytest.approx(lead), 5)


@pytest.mark.parametrize("when", [datetime(2999, 1, 1, tzinfo=ET), datetime(9999, 12, 31, tzinfo=ET)], ids=str)
def test_quote_dated_in_a_far_year_denies_future_dated(when):
    passed, reason, fallback = validate(quote(quote_time=when))
    assert (passed, code(reason), fallback) == (False, "FUTURE_DATED", True)


def test_quote_skew_tolerance_follows_the_params():
    contract = quote(quote_time=NOW + timedelta(seconds=20))
    assert code(validate(contract, config=as_params({"max_clock_skew_seconds": 30})).reason) == "OK"
    assert code(validate(contract, config={"max_clock_skew_seconds": 0}).reason) == "FUTURE_DATED"


def test_open_interest_as_string_from_the_broker_is_read_as_a_count():
    assert validate(quote(open_interest="1200")).passed is True


def test_locked_quote_passes_with_zero_spread():
    gates = option_gate_results(quote(bid=Decimal("1.00"), ask=Decimal("1.00")), PARAMS, NOW, IV_OK)
    spread = next(g for g in gates if g["name"] == "option_spread")
    assert (spread["passed"], spread["observed"]) == (True, 0.0)


# --- Expiry -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "expiration,now,expected_code",
    [
        (date(2026, 11, 17), NOW, "EXPIRED"),  # yesterday
        (date(2026, 11, 18), datetime(2026, 11, 18, 16, 1, tzinfo=ET), "EXPIRED"),
        (date(2026, 11, 18), datetime(2026, 11, 18, 16, 0, tzinfo=ET), "EXPIRED"),
        (date(2026, 11, 18), datetime(2026, 11, 18, 15, 0, tzinfo=ET), "EXPIRING_TODAY"),  # 60 min before 16:00
        (date(2026, 11, 18), datetime(2026, 11, 18, 15, 30, tzinfo=ET), "EXPIRING_TODAY"),
        (date(2026, 11, 18), datetime(2026, 11, 18, 14, 59, tzinfo=ET), "OK"),
        # 2026-11-27 closes at 13:00: the cutoff moves to 12:00.
        (date(2026, 11, 27), datetime(2026, 11, 27, 11, 59, tzinfo=ET), "OK"),
        (date(2026, 11, 27), datetime(2026, 11, 27, 12, 0, tzinfo=ET), "EXPIRING_TODAY"),
        (date(2026, 11, 27), datetime(2026, 11, 27, 12, 30, tzinfo=ET), "EXPIRING_TODAY"),
        (date(2026, 11, 27), datetime(2026, 11, 27, 13, 30, tzinfo=ET), "EXPIRING_TODAY"),  # after the early close
    ],
)
def test_expiry_gate(expiration, now, expected_code, calendar):
    contract = quote(expiration=expiration, quote_time=now)
    passed, reason, fallback = validate(contract, now=now, calendar=calendar)
    assert code(reason) == expected_code, reason
    assert passed is (expected_code == "OK")
    assert fallback is False  # the choice was wrong, not the market: pick another contract


def test_expiring_today_reason_names_the_early_close(calendar):
    now = datetime(2026, 11, 27, 12, 10, tzinfo=ET)
    _, reason, _ = validate(quote(expiration=date(2026, 11, 27), quote_time=now), now=now, calendar=calendar)
    assert reason == "EXPIRING_TODAY: expiration=2026-11-27 now=12:10 ET last_entry_before=12:00 ET close=13:00 ET"


def test_expiry_uses_the_et_date_not_utc():
    # 20:30 ET on the 17th is already the 18th in UTC; a contract expiring on the 17th is expired
    # (past 16:00 ET), one expiring on the 18th is tomorrow's.
    now = datetime(2026, 11, 17, 20, 30, tzinfo=ET)
    assert code(validate(quote(expiration=date(2026, 11, 17), quote_time=now), now=now).reason) == "EXPIRED"
    assert validate(quote(expiration=date(2026, 11, 18), quote_time=now), now=now).passed is True


# --- Gate results for the executions record ---------------------------------------------------


def test_option_gate_results_lists_every_gate_in_the_named_gate_shape():
    results = option_gate_results(quote(volume=99), PARAMS, NOW, IV_OK)
    assert [r["name"] for r in results] == list(OPTION_GATE_NAMES)
    assert all(set(r) == {"name", "passed", "code", "reason", "observed", "limit"} for r in results)
    volume = results[OPTION_GATE_NAMES.index("option_volume")]
    assert volume == {
        "name": "option_volume",
        "passed": False,
        "code": "LOW_VOLUME",
        "reason": "LOW_VOLUME: volume=99 min=100",
        "observed": 99,
        "limit": 100,
    }
    json.dumps(results)  # storable as jsonb


def test_validate_reason_is_the_first_failing_gate():
    contract = quote(bid=Decimal("0.5"), ask=Decimal("1.5"), volume=1, open_interest=1)
    results = option_gate_results(contract, PARAMS, NOW, IV_OK)
    failing = [r["code"] for r in results if not r["passed"]]
    assert failing == ["WIDE_SPREAD", "LOW_VOLUME", "LOW_OPEN_INTEREST"]
    assert code(validate(contract).reason) == "WIDE_SPREAD"


# --- Contract choice ----------------------------------------------------------------------------


def contract(right: str, strike: str, expiration: date, delta: float | None, **kw) -> OptionQuote:
    cp = "C" if right == "call" else "P"
    symbol = f"SPY{expiration:%y%m%d}{cp}{int(Decimal(strike) * 1000):08d}"
    return quote(symbol=symbol, right=right, strike=Decimal(strike), expiration=expiration, delta=delta, **kw)


def both_sides(expiration: date, **kw) -> list[OptionQuote]:
    return [
        contract("call", "100", expiration, 0.52, **kw),
        contract("put", "100", expiration, -0.48, **kw),
        contract("call", "110", expiration, 0.15, **kw),
        contract("put", "90", expiration, -0.15, **kw),
    ]


@pytest.mark.parametrize(
    "direction,right",
    [("BULL", "call"), ("BUY", "call"), ("BEAR", "put"), ("SELL", "put")],
)
def test_choose_contract_side_follows_direction(direction, right, calendar):
    selection = choose_contract(both_sides(NEXT_FRIDAY), direction, "day_trade", 100, PARAMS, NOW, calendar, iv_percentile=IV_OK)
    assert selection.choice is not None, selection.reason
    assert selection.choice.contract.right == right
    assert selection.choice.contract.strike == Decimal("100")  # the 0.15-delta wings are outside the band
    assert selection.choice.passed is True
    assert selection.reason.startswith("CHOSEN: ")


def test_choose_contract_unknown_direction_returns_none_with_reason(calendar):
    selection = choose_contract(both_sides(NEXT_FRIDAY), "SIDEWAYS", "day_trade", 100, PARAMS, NOW, calendar)
    assert selection == (None, "UNKNOWN_DIRECTION: direction='SIDEWAYS'")


def test_choose_contract_dte_counts_trading_days_across_thanksgiving(calendar):
    # Wednesday 2026-11-25; Thursday the 26th is a holiday. Friday the 27th is 2 calendar days
    # but 1 trading day away; 2026-12-04 is 9 calendar days but 6 trading days away.
    now = datetime(2026, 11, 25, 11, 0, tzinfo=ET)
    chain = [
        contract("call", "100", exp, 0.5, quote_time=now)
        for exp in (date(2026, 11, 27), date(2026, 12, 4), date(2026, 12, 11))
    ]
    window_2_6 = as_params({"day_trade_min_dte": 2, "day_trade_max_dte": 6})
    selection = choose_contract(chain, "BULL", "day_trade", 100, window_2_6, now, calendar, iv_percentile=IV_OK)
    assert selection.choice.contract.expiration == date(2026, 12, 4)
    assert selection.choice.dte == 6
    assert selection.choice.candidates == 1

    window_1_1 = as_params({"day_trade_min_dte": 1, "day_trade_max_dte": 1})
    selection = choose_contract(chain, "BULL", "day_trade", 100, window_1_1, now, calendar, iv_percentile=IV_OK)
    assert selection.choice.contract.expiration == date(2026, 11, 27)
    assert selection.choice.dte == 1


def test_choose_contract_swing_window_uses_swing_bounds(calendar):
    chain = [contract("call", "100", exp, 0.5) for exp in (NEXT_FRIDAY, date(2026, 12, 18), date(2027, 2, 19))]
    selection = choose_contract(chain, "BULL", "swing_trade", 100, PARAMS, NOW, calendar, iv_percentile=IV_OK)
    # 14..45 trading days: 2026-12-18 is 21 sessions out; 2027-02-19 is 63.
    assert selection.choice.contract.expiration == date(2026, 12, 18)
    assert selection.choice.dte == 21


def test_choose_contract_never_picks_an_expired_contract(calendar):
    now = datetime(2026, 11, 20, 16, 5, tzinfo=ET)  # Friday after the 16:00 expiry
    lenient = as_params({"day_trade_min_dte": 0})
    chain = [contract("call", "100", date(2026, 11, 20), 0.5), contract("call", "100", date(2026, 11, 13), 0.5)]
    selection = choose_contract(chain, "BULL", "day_trade", 100, lenient, now, calendar, iv_percentile=IV_OK)
    assert selection.choice is None
    assert selection.reason.startswith("NO_CANDIDATE: 0 of 2 calls")
    assert "expired=2" in selection.reason


def test_choose_contract_prefers_a_liquid_contract_over_a_better_scoring_illiquid_one(calendar):
    illiquid_but_ideal = contract("call", "100", NEXT_FRIDAY, 0.50, volume=40, bid=Decimal("1.00"), ask=Decimal("1.01"))
    liquid = contract("call", "102", NEXT_FRIDAY, 0.40, bid=Decimal("0.95"), ask=Decimal("1.03"))
    selection = choose_contract([illiquid_but_ideal, liquid], "BULL", "day_trade", 100, PARAMS, NOW, calendar, iv_percentile=IV_OK)
    choice = selection.choice
    assert choice.contract.symbol == liquid.symbol
    assert (choice.passed, choice.rank, choice.candidates) == (True, 1, 2)


def test_choose_contract_when_none_passes_returns_best_ranked_with_its_failure(calendar):
    best = contract("call", "100", NEXT_FRIDAY, 0.50, volume=40)
    worse = contract("call", "103", NEXT_FRIDAY, 0.35, volume=10, bid=Decimal("0.80"), ask=Decimal("1.20"))
    selection = choose_contract([worse, best], "BULL", "day_trade", 100, PARAMS, NOW, calendar, iv_percentile=IV_OK)
    choice = selection.choice
    assert choice.contract.symbol == best.symbol
    assert (choice.passed, choice.reason, choice.fallback_to_stock) == (False, "LOW_VOLUME: volume=40 min=100", True)
    assert selection.reason.startswith("NO_PASSING_CONTRACT: ")
    assert [g["code"] for g in choice.gate_results()].count("LOW_VOLUME") == 1


def test_choose_contract_prefers_the_delta_nearest_the_target(calendar):
    chain = [contract("call", str(k), NEXT_FRIDAY, d) for k, d in ((98, 0.66), (100, 0.51), (102, 0.36))]
    selection = choose_contract(chain, "BULL", "day_trade", 100, PARAMS, NOW, calendar, iv_percentile=IV_OK)
    assert selection.choice.contract.strike == Decimal("100")
    parts = selection.choice.score_parts
    assert set(parts) == {"spread", "liquidity", "delta_fit", "strike"}
    assert parts["delta_fit"] == pytest.approx(1 - 0.01 / 0.2)


def test_choose_contract_missing_delta_is_estimated_from_iv_or_skipped(calendar):
    no_greeks = contract("call", "100", NEXT_FRIDAY, None, implied_volatility=0.3)
    nothing = contract("call", "101", NEXT_FRIDAY, None, implied_volatility=None)
    selection = choose_contract([no_greeks, nothing], "BULL", "day_trade", 100, PARAMS, NOW, calendar, iv_percentile=IV_OK)
    assert selection.choice.contract.symbol == no_greeks.symbol
    assert selection.choice.delta_estimated is True
    assert 0.5 < selection.choice.abs_delta < 0.52
    assert selection.choice.candidates == 1

    only_nothing = choose_contract([nothing], "BULL", "day_trade", 100, PARAMS, NOW, calendar, iv_percentile=IV_OK)
    assert only_nothing.choice is None and "no_delta=1" in only_nothing.reason


def test_estimate_abs_delta_matches_black_scholes_without_rates():
    years = 10 / 365
    for right, strike in (("call", 95.0), ("call", 105.0), ("put", 95.0), ("put", 105.0)):
        expected = abs(black_scholes(right, 100.0, strike, years, 0.0, 0.3).delta)
        assert estimate_abs_delta(right, 100.0, strike, years, 0.3) == pytest.approx(expected, abs=1e-12)


def test_choose_contract_as_json_is_storable(calendar):
    selection = choose_contract(both_sides(NEXT_FRIDAY), "BULL", "day_trade", 100, PARAMS, NOW, calendar, iv_percentile=IV_OK)
    record = selection.choice.as_json()
    assert record["symbol"] == "SPY261120C00100000"
    assert record["expiration"] == "2026-11-20" and record["dte_trading_days"] == 2
    json.dumps(record)


def test_size_option_order_uses_the_ask_and_the_multiplier():
    size = size_option_order(quote(ask=Decimal("2.00")), Decimal("100000"), Decimal("0"), PARAMS)
    # budget = min(per trade 2500, premium cap 1500, 5% equity 5000, room 10000) = 1500 -> 7 x 200
    assert (size.qty, size.notional) == (7, Decimal("1400.00"))
    assert size_option_order(quote(ask=None), Decimal("100000"), Decimal("0"), PARAMS).qty == 0


def test_choose_and_validate_on_a_2000_contract_chain_is_fast(calendar):
    now = datetime(2026, 11, 24, 11, 0, tzinfo=ET)
    chain = simulate_chain("SPY", 450.0, now, seed=7, spec=SimChainSpec(strikes_each_side=71))[:2000]
    assert len(chain) == 2000
    samples = []
    for _ in range(30):
        t0 = time.perf_counter()
        selection = choose_contract(chain, "BULL", "swing_trade", 450.0, PARAMS, now, calendar, iv_percentile=IV_OK)
        validate_option_contract(selection.choice.contract, PARAMS, now=now, iv_percentile=IV_OK, calendar=calendar)
        samples.append(time.perf_counter() - t0)
    # The target is 5 ms; the test allows for a busy CI machine.
    assert statistics.median(samples) < 0.020


def test_options_module_imports_no_sdk_or_driver():
    code_ = (
        "import sys, services.dispatcher.alpaca.options, services.adapters.postgres.iv_history, "
        "services.adapters.sim.options\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('alpaca', 'psycopg', 'psycopg_pool', 'boto3'))\n"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code_], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


# --- The simulated chain ------------------------------------------------------------------------

SIM_NOW = datetime(2026, 11, 18, 10, 30, tzinfo=ET)


@pytest.fixture(scope="module")
def sim_chain():
    return simulate_chain("SPY", 100.0, SIM_NOW, seed=3)


def test_sim_chain_is_deterministic_given_the_seed(sim_chain):
    assert simulate_chain("SPY", 100.0, SIM_NOW, seed=3) == sim_chain
    other = simulate_chain("SPY", 100.0, SIM_NOW, seed=4)
    assert [c.volume for c in other] != [c.volume for c in sim_chain]


def test_sim_chain_quotes_have_the_adapter_types(sim_chain):
    c = sim_chain[0]
    assert isinstance(c, OptionQuote)
    assert isinstance(c.bid, Decimal) and isinstance(c.ask, Decimal) and isinstance(c.strike, Decimal)
    assert c.quote_time.tzinfo is not None
    assert {x.right for x in sim_chain} == {"call", "put"}


def test_sim_chain_expiries_are_weekly_nyse_sessions_within_45_days(sim_chain, calendar):
    expiries = sorted({c.expiration for c in sim_chain})
    # Fridays, except Christmas week: Friday 2026-12-25 is a holiday, so Thursday the 24th.
    assert expiries == [
        date(2026, 11, 20), date(2026, 11, 27), date(2026, 12, 4), date(2026, 12, 11),
        date(2026, 12, 18), date(2026, 12, 24), date(2026, 12, 31),
    ]
    assert all(calendar.session_on(e) is not None for e in expiries)


def test_weekly_expiry_moves_before_a_good_friday(calendar):
    # Good Friday 2027 is March 26: that week's options expire Thursday the 25th.
    expiries = weekly_expirations(datetime(2027, 3, 22, 10, 0, tzinfo=ET), calendar, max_days=11)
    assert expiries == [date(2027, 3, 25), date(2027, 4, 2)]


def test_weekly_expiry_today_is_dropped_after_16_et(calendar):
    friday = date(2026, 11, 20)
    before = weekly_expirations(datetime(2026, 11, 20, 15, 59, tzinfo=ET), calendar, max_days=7)
    after = weekly_expirations(option_expiry_instant(friday), calendar, max_days=7)
    assert before[0] == friday and friday not in after


def test_sim_contract_quote_priced_alone_equals_the_chains_quote_of_that_contract(sim_chain):
    for listed in (sim_chain[0], sim_chain[len(sim_chain) // 2], sim_chain[-1]):
        alone = contract_quote("SPY", listed.expiration, listed.strike, listed.right, 100.0, SIM_NOW, seed=3)
        assert alone == listed


def test_sim_contract_quote_prices_a_daily_expiry_the_weekly_chain_does_not_list(sim_chain):
    # A Wednesday expiry (today, 10:30 ET): not a weekly, yet a held one must still be marked.
    today = SIM_NOW.date()
    assert today not in {c.expiration for c in sim_chain}
    call = contract_quote("SPY", today, Decimal("95"), "call", 100.0, SIM_NOW, seed=3)
    assert call.symbol == "SPY261118C00095000" and call.expiration == today
    # In the money by 5 with hours to go: worth its intrinsic value, quoted around it.
    assert call.bid < call.ask and abs((call.bid + call.ask) / 2 - 5) < Decimal("0.2")


def test_sim_chain_with_a_window_prices_only_the_expiries_inside_it(sim_chain):
    window = (date(2026, 11, 27), date(2026, 12, 4))
    windowed = simulate_chain("SPY", 100.0, SIM_NOW, seed=3, window=window)
    assert {c.expiration for c in windowed} == {date(2026, 11, 27), date(2026, 12, 4)}
    assert windowed == [c for c in sim_chain if window[0] <= c.expiration <= window[1]]


def test_sim_chain_contains_deliberately_illiquid_contracts(sim_chain):
    def spread(c):
        return (c.ask - c.bid) / ((c.ask + c.bid) / 2)

    illiquid = [c for c in sim_chain if spread(c) > Decimal("0.10") and c.volume < 100 and c.open_interest < 100]
    near_money = [c for c in illiquid if abs(c.strike - 100) <= 5]
    assert len(illiquid) >= 10 and near_money
    assert all(validate(c, now=SIM_NOW).passed is False for c in illiquid)


def test_sim_chain_spreads_widen_and_activity_falls_away_from_the_money(sim_chain):
    exp = date(2026, 12, 4)
    calls = {c.strike: c for c in sim_chain if c.expiration == exp and c.right == "call" and c.volume >= 100}
    atm, otm = calls[Decimal("100")], calls[Decimal("110")]

    def rel(c):
        return (c.ask - c.bid) / ((c.ask + c.bid) / 2)

    assert rel(otm) > rel(atm)
    assert otm.volume < atm.volume and otm.open_interest < atm.open_interest
    later = next(c for c in sim_chain if c.expiration == date(2026, 12, 31) and c.right == "call" and c.strike == 100)
    if later.volume >= 100:  # both liquid: the longer expiry has the wider relative spread
        assert rel(later) > rel(atm)


def test_sim_chain_prices_satisfy_put_call_parity(sim_chain):
    spec = SimChainSpec()
    by_key = {(c.expiration, c.strike, c.right): c for c in sim_chain}
    checked = 0
    for (exp, strike, right), call in by_key.items():
        if right != "call" or abs(strike - 100) > 10:
            continue
        put = by_key[(exp, strike, "put")]
        years = (option_expiry_instant(exp) - SIM_NOW).total_seconds() / (365 * 24 * 3600)
        parity = 100.0 - float(strike) * math.exp(-spec.rate * years)
        mid_diff = float((call.bid + call.ask) / 2 - (put.bid + put.ask) / 2)
        tolerance = float((call.ask - call.bid) + (put.ask - put.bid)) / 2 + 0.02
        assert abs(mid_diff - parity) <= tolerance, (exp, strike)
        checked += 1
    assert checked > 100


def test_sim_chain_greeks_are_consistent(sim_chain):
    for c in sim_chain:
        if c.right == "call":
            assert 0 <= c.delta <= 1
        else:
            assert -1 <= c.delta <= 0
        assert c.gamma >= 0 and c.implied_volatility > 0


def test_choose_contract_on_the_sim_chain_chooses_a_liquid_contract(sim_chain, calendar):
    for direction, right in (("BULL", "call"), ("BEAR", "put")):
        selection = choose_contract(sim_chain, direction, "swing_trade", 100.0, PARAMS, SIM_NOW, calendar, iv_percentile=IV_OK)
        choice = selection.choice
        assert choice.passed is True, selection.reason
        assert choice.contract.right == right
        assert 14 <= choice.dte <= 45
        assert PARAMS.options.min_abs_delta <= abs(choice.contract.delta) <= PARAMS.options.max_abs_delta


def test_sim_chain_with_greeks_removed_still_yields_a_choice(sim_chain, calendar):
    stripped = [dataclasses.replace(c, delta=None) for c in sim_chain]
    selection = choose_contract(stripped, "BULL", "day_trade", 100.0, PARAMS, SIM_NOW, calendar, iv_percentile=IV_OK)
    assert selection.choice is not None and selection.choice.delta_estimated is True

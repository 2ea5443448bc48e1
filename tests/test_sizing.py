"""Order sizing: whole units by floor from the smallest budget, and the one contract multiplier.

budget = min(per-trade cap [options: also the premium cap], equity x pct, room under the
exposure limit); qty = floor(budget / (price x multiplier)); below one unit is SIZE_ZERO.
The tables pin their own limits (2500 per trade, 5% of equity, 10,000 exposure, 1500 premium,
10 contracts) so that a change to the reviewed defaults does not change what they prove.
"""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.common.params import as_params, default_params
from services.common.numbers import to_decimal
from services.domain.sizing import SizeResult, contract_multiplier, notional, size_order

D = Decimal
EQUITY = D("100000")


def code(result: SizeResult) -> str:
    return result.reason.split(":", 1)[0]


SIZING = {
    "max_notional_per_trade": 2500,
    "max_equity_pct_per_trade": 0.05,
    "max_notional_exposure": 10000,
    "max_premium_per_trade": 1500,
    "max_contracts_per_trade": 10,
}


@pytest.fixture
def params():
    return as_params(SIZING)


@pytest.mark.parametrize(
    "instrument, expected", [("OPTION", 100), ("STOCK", 1)]
)
def test_contract_multiplier(instrument, expected):
    assert contract_multiplier(instrument) == expected


@pytest.mark.parametrize("instrument", ["FUTURE", "option", None])
def test_contract_multiplier_of_an_unknown_instrument_raises(instrument):
    with pytest.raises(ValueError):
        contract_multiplier(instrument)


def test_option_notional_is_contracts_x_price_x_100():
    assert notional(2, D("3.50"), "OPTION") == D("700")
    assert notional(2, D("3.50"), "STOCK") == D("7")


@pytest.mark.parametrize(
    "price, equity, current, qty, total",
    [
        pytest.param(D("33"), EQUITY, D(0), 75, D("2475"), id="per-trade-cap-2500-floor-75.75"),
        pytest.param(D("100.01"), EQUITY, D(0), 24, D("2400.24"), id="24.9975-is-24-never-rounded-up"),
        pytest.param(D("25"), EQUITY, D(0), 100, D("2500"), id="exact-division"),
        pytest.param(D("33"), D("20000"), D(0), 30, D("990"), id="equity-pct-1000-is-smallest"),
        pytest.param(D("33"), EQUITY, D("9000"), 30, D("990"), id="exposure-room-1000-is-smallest"),
        pytest.param(D("0.37"), EQUITY, D(0), 6756, D("2499.72"), id="penny-stock"),
    ],
)
def test_stock_size_is_whole_shares_by_floor_from_the_smallest_budget(params, price, equity, current, qty, total):
    result = size_order("STOCK", price, equity, current, params)
    assert (result.qty, result.notional, code(result)) == (qty, total, "SIZED")
    assert current + result.notional <= params.risk.max_notional_exposure


@pytest.mark.parametrize(
    "price, equity, current",
    [
        pytest.param(D("60"), EQUITY, D("9950"), id="exposure-room-50-below-one-share-at-60"),
        pytest.param(D("100"), EQUITY, D("10000"), id="at-the-exposure-limit"),
        pytest.param(D("100"), EQUITY, D("12000"), id="over-the-exposure-limit"),
        pytest.param(D("2500.01"), EQUITY, D(0), id="one-share-costs-more-than-the-per-trade-cap"),
        pytest.param(D("100"), D("1999"), D(0), id="5pct-of-equity-below-one-share"),
    ],
)
def test_stock_size_below_one_share_is_size_zero(params, price, equity, current):
    result = size_order("STOCK", price, equity, current, params)
    assert (result.qty, result.notional, code(result)) == (0, D(0), "SIZE_ZERO")


@pytest.mark.parametrize(
    "ask, equity, current, qty, total",
    [
        pytest.param(D("3.50"), EQUITY, D(0), 4, D("1400"), id="premium-cap-1500-over-350-is-4"),
        pytest.param(D("2.00"), EQUITY, D(0), 7, D("1400"), id="7.5-is-7"),
        pytest.param(D("15.00"), EQUITY, D(0), 1, D("1500"), id="one-contract-exactly-at-premium-cap"),
        pytest.param(D("0.50"), EQUITY, D(0), 10, D("500"), id="capped-at-10-contracts"),
        pytest.param(D("0.05"), EQUITY, D(0), 10, D("50"), id="cheap-contract-capped-at-10"),
        pytest.param(D("1.00"), EQUITY, D("9700"), 3, D("300"), id="exposure-room-300"),
        pytest.param(D("1.00"), D("4000"), D(0), 2, D("200"), id="equity-pct-200"),
    ],
)
def test_option_size_is_contracts_from_ask_x_100_with_caps(params, ask, equity, current, qty, total):
    result = size_order("OPTION", ask, equity, current, params)
    assert (result.qty, result.notional, code(result)) == (qty, total, "SIZED")
    assert result.notional == notional(qty, ask, "OPTION")


def test_option_size_above_the_premium_cap_is_size_zero(params):
    result = size_order("OPTION", D("15.01"), EQUITY, D(0), params)
    assert (result.qty, code(result)) == (0, "SIZE_ZERO")


def test_option_size_follows_max_contracts_and_max_premium_params():
    tight = as_params({**SIZING, "max_contracts_per_trade": 3, "max_premium_per_trade": 5000})
    assert size_order("OPTION", D("0.50"), EQUITY, D(0), tight).qty == 3
    # The per-trade cap (2500) still applies when the premium cap is higher.
    assert size_order("OPTION", D("5.00"), EQUITY, D(0), as_params({**SIZING, "max_premium_per_trade": 5000})).qty == 5


def test_stock_size_ignores_the_option_caps():
    tight = as_params({**SIZING, "max_contracts_per_trade": 1, "max_premium_per_trade": 100})
    assert size_order("STOCK", D("10"), EQUITY, D(0), tight).qty == 250


@pytest.mark.parametrize("price", [D("NaN"), D("0"), D("-1"), D("Infinity"), None], ids=repr)
@pytest.mark.parametrize("instrument", ["STOCK", "OPTION"])
def test_size_with_a_bad_price_is_size_zero(params, instrument, price):
    result = size_order(instrument, price, EQUITY, D(0), params)
    assert (result.qty, result.notional, code(result)) == (0, D(0), "SIZE_ZERO")


@pytest.mark.parametrize("equity", [D("NaN"), D("0"), D("-5000"), None], ids=repr)
def test_size_with_bad_equity_is_size_zero(params, equity):
    result = size_order("STOCK", D("10"), equity, D(0), params)
    assert (result.qty, code(result)) == (0, "SIZE_ZERO")


@pytest.mark.parametrize(
    "current",
    [
        pytest.param(
            D("NaN"), id="nan",
        ),
        pytest.param(D("Infinity"), id="infinite"),
        pytest.param(D("12000"), id="over-the-limit"),
    ],
)
def test_size_with_unusable_current_exposure_is_size_zero(params, current):
    result = size_order("STOCK", D("10"), EQUITY, current, params)
    assert (result.qty, code(result)) == (0, "SIZE_ZERO")


@pytest.mark.parametrize(
    "value, expected",
    [
        ("3.50", D("3.50")),
        (3.5, D("3.5")),
        (7, D(7)),
        (D("1E+2"), D("100")),
        (float("nan"), None),
        (D("NaN"), None),
        (float("inf"), None),
        ("abc", None),
        (None, None),
        (True, None),
        ([1], None),
    ],
    ids=repr,
)
def test_to_decimal_is_finite_or_none(value, expected):
    assert to_decimal(value) == expected


money = st.decimals(min_value=D("0.01"), max_value=D("5000"), places=2)


@settings(max_examples=300, deadline=None, database=None)
@given(
    instrument=st.sampled_from(["STOCK", "OPTION"]),
    price=money,
    equity=st.decimals(min_value=D("1"), max_value=D("10000000"), places=2),
    current=st.decimals(min_value=D("0"), max_value=D("12000"), places=2),
)
def test_sized_order_never_exceeds_any_budget_and_is_the_largest_whole_size(instrument, price, equity, current):
    params = default_params()  # whatever the reviewed defaults are, the invariants hold
    risk, options = params.risk, params.options
    result = size_order(instrument, price, equity, current, params)
    unit = price * contract_multiplier(instrument)
    cap = min(risk.max_notional_per_trade, options.max_premium_per_trade) if instrument == "OPTION" else risk.max_notional_per_trade
    budget = min(cap, equity * D(str(risk.max_equity_pct_per_trade)), risk.max_notional_exposure - current)
    assert result.notional == result.qty * unit
    assert current + result.notional <= risk.max_notional_exposure or result.qty == 0
    assert result.notional <= budget or result.qty == 0
    if instrument == "OPTION":
        assert result.qty <= options.max_contracts_per_trade
    at_cap = instrument == "OPTION" and result.qty == options.max_contracts_per_trade
    if not at_cap:
        assert (result.qty + 1) * unit > budget  # one more unit would break a budget: floor, not less

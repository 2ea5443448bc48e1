"""Limit prices from a quote, re-pricing decisions, per-attempt client_order_ids: pure, no I/O."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest

from services.common.params import DEFAULT_PARAMS_PATH, ParamsError, default_params, validate_params
from services.domain.broker import OrderRequest, client_order_id
from services.domain.order_pricing import (
    GiveUp,
    Quote,
    Replace,
    Wait,
    limit_price,
    next_attempt,
    offset_limit_price,
)

D = Decimal
SENT = datetime(2026, 11, 30, 15, 0, tzinfo=timezone.utc)


@pytest.mark.parametrize(
    ("side", "bid", "ask", "aggressiveness", "expected"),
    [
        # Below $3.00: penny ticks.
        ("buy", "1.00", "1.10", 0, "1.05"),      # the mid
        ("buy", "1.00", "1.10", 0.5, "1.08"),    # 1.075 rounds up, toward the ask
        ("buy", "1.00", "1.10", 1, "1.10"),      # the far touch
        ("sell", "1.00", "1.10", 0, "1.05"),
        ("sell", "1.00", "1.10", 0.5, "1.02"),   # 1.025 rounds down, toward the bid
        ("sell", "1.00", "1.10", 1, "1.00"),
        ("buy", "0.01", "0.03", 0.5, "0.03"),    # 0.025 -> 0.03: never below a penny
        # At or above $3.00: nickel ticks.
        ("buy", "4.00", "4.40", 0, "4.20"),
        ("buy", "4.00", "4.40", 0.5, "4.30"),
        ("buy", "4.00", "4.40", 1, "4.40"),
        ("sell", "4.00", "4.40", 0.5, "4.10"),
        ("buy", "4.00", "4.30", 0.5, "4.25"),    # 4.225 up to the next nickel
        ("sell", "4.00", "4.30", 0.5, "4.05"),   # 4.075 down to the nickel below
        # Across the $3.00 boundary the tick follows the price.
        ("buy", "2.90", "3.10", 0, "3.00"),
        ("buy", "2.90", "3.10", 0.5, "3.05"),
        ("sell", "2.90", "3.10", 0.25, "2.97"),  # 2.975 is below $3: pennies
        ("buy", "2.98", "3.02", 0.4, "3.00"),    # 3.008 would be 3.05 past the ask: clamped to the tick below
        # An off-grid touch: never past it.
        ("buy", "4.00", "4.32", 1, "4.30"),      # 4.35 would cross the ask
        ("sell", "4.03", "4.40", 1, "4.05"),     # 4.00 would cross the bid
        # A locked quote prices at the touch.
        ("buy", "1.00", "1.00", 0.5, "1.00"),
    ],
)
def test_limit_price_table(side, bid, ask, aggressiveness, expected):
    priced = limit_price(side, D(bid), D(ask), aggressiveness)
    assert priced.code == "LIMIT_PRICED"
    assert priced.price == D(expected)
    if side == "buy":
        assert priced.price <= D(ask)
    else:
        assert priced.price >= D(bid)


def test_limit_price_with_a_fixed_tick_uses_it():
    assert limit_price("buy", D("10.00"), D("10.10"), 0.5, D("0.01")).price == D("10.08")


@pytest.mark.parametrize(
    ("bid", "ask", "code"),
    [
        (None, "1.10", "NO_QUOTE"),
        ("1.00", None, "NO_QUOTE"),
        (None, None, "NO_QUOTE"),
        ("0", "0.05", "ZERO_QUOTE"),     # no bid: nothing to price a mid from
        ("1.00", "0", "ZERO_QUOTE"),
        ("1.20", "1.10", "CROSSED_QUOTE"),
    ],
)
def test_limit_price_refuses_a_quote_it_cannot_price(bid, ask, code):
    for side in ("buy", "sell"):
        priced = limit_price(side, None if bid is None else D(bid), None if ask is None else D(ask), 0.5)
        assert (priced.price, priced.code, priced.ok) == (None, code, False)
        assert priced.reason.startswith(f"{code}: bid=")


def test_limit_price_refuses_an_aggressiveness_outside_zero_to_one():
    with pytest.raises(ValueError):
        limit_price("buy", D("1.00"), D("1.10"), 1.5)


@pytest.mark.parametrize(
    ("side", "reference", "bps", "expected"),
    [
        ("buy", "100.003", 10, "100.11"),   # 100.103 up to the cent
        ("sell", "100.003", 10, "99.90"),   # 99.903 down to the cent
        ("buy", "0.5000", 10, "0.5005"),    # below $1: sub-penny ticks
        ("buy", "50", 0, "50.00"),
    ],
)
def test_stock_limit_offset_through_the_reference(side, reference, bps, expected):
    assert offset_limit_price(side, D(reference), bps).price == D(expected)


def test_stock_limit_without_a_reference_price_is_refused():
    assert offset_limit_price("buy", None, 10).code == "NO_QUOTE"


# --- re-pricing -------------------------------------------------------------------------------


def execution(**overrides):
    base = dict(option_limit_aggressiveness=0.5, reprice_after_seconds=15, max_reprices=3, reprice_step=0.25)
    return default_params().execution.model_copy(update={**base, **overrides})


QUOTE = Quote(D("1.00"), D("1.10"))


def test_next_attempt_before_n_seconds_waits_until_they_are_up():
    decision = next_attempt(0, SENT, SENT + timedelta(seconds=14, microseconds=999_999), QUOTE, execution(), side="buy")
    assert decision == Wait(SENT + timedelta(seconds=15))


@pytest.mark.parametrize(
    ("attempt", "side", "expected"),
    [
        (0, "buy", Replace(1, D("1.09"), D("0.75"))),   # 1.0875 up
        (1, "buy", Replace(2, D("1.10"), D("1.00"))),   # the ask
        (2, "buy", Replace(3, D("1.10"), D("1"))),      # 1.25 capped at the far touch
        (0, "sell", Replace(1, D("1.01"), D("0.75"))),  # 1.0125 down
        (1, "sell", Replace(2, D("1.00"), D("1.00"))),  # the bid
    ],
)
def test_next_attempt_at_exactly_n_seconds_replaces_one_step_more_aggressive(attempt, side, expected):
    assert next_attempt(attempt, SENT, SENT + timedelta(seconds=15), QUOTE, execution(), side=side) == expected


def test_next_attempt_at_attempt_k_gives_up_once_due_and_waits_before():
    params = execution(max_reprices=3)
    assert next_attempt(3, SENT, SENT + timedelta(seconds=14), QUOTE, params, side="buy") == Wait(SENT + timedelta(seconds=15))
    decision = next_attempt(3, SENT, SENT + timedelta(seconds=15), QUOTE, params, side="buy")
    assert decision == GiveUp("REPRICE_EXHAUSTED", "REPRICE_EXHAUSTED: attempt=3 max_reprices=3")


def test_next_attempt_with_no_reprices_allowed_gives_up_the_first_order():
    decision = next_attempt(0, SENT, SENT + timedelta(seconds=15), QUOTE, execution(max_reprices=0), side="buy")
    assert isinstance(decision, GiveUp) and decision.code == "REPRICE_EXHAUSTED"


@pytest.mark.parametrize(
    ("quote", "code"),
    [(None, "NO_QUOTE"), (Quote(None, D("1.10")), "NO_QUOTE"), (Quote(D("1.20"), D("1.10")), "CROSSED_QUOTE"),
     (Quote(D("0"), D("0.10")), "ZERO_QUOTE")],
)
def test_next_attempt_without_a_usable_quote_gives_up_rather_than_price_blind(quote, code):
    decision = next_attempt(0, SENT, SENT + timedelta(seconds=60), quote, execution(), side="buy")
    assert isinstance(decision, GiveUp) and decision.code == code


def test_next_attempt_prices_against_the_fresh_quote_not_the_first_one():
    moved = Quote(D("1.20"), D("1.30"))
    assert next_attempt(0, SENT, SENT + timedelta(seconds=20), moved, execution(), side="buy") == Replace(1, D("1.29"), D("0.75"))


# --- client_order_id per attempt --------------------------------------------------------------


def test_client_order_id_attempt_zero_is_the_id_the_pipeline_always_used():
    # sha256("paper-main|42|0")[:20]: the id existing execution rows carry.
    assert client_order_id("paper-main", 42) == "ops-42-0-b5b5c039411d1c5751d0"
    assert client_order_id("paper-main", 42, 0, 0) == client_order_id("paper-main", 42)
    assert client_order_id("paper-main", 42, 0, attempt=0) == "ops-42-0-b5b5c039411d1c5751d0"


def test_client_order_id_attempts_are_distinct_stable_and_within_alpacas_length():
    ids = [client_order_id("paper-main", 42, leg, attempt) for leg in (0, 1) for attempt in range(6)]
    assert len(set(ids)) == len(ids)
    assert ids == [client_order_id("paper-main", 42, leg, attempt) for leg in (0, 1) for attempt in range(6)]
    assert client_order_id("paper-main", 42, 0, 1) != client_order_id("other-account", 42, 0, 1)
    assert client_order_id("paper-main", 42, 0, 2).startswith("ops-42-0-r2-")
    assert all(len(i) <= 128 for i in ids)
    with pytest.raises(ValueError):
        client_order_id("paper-main", 42, 0, -1)


# --- the order request and the params ---------------------------------------------------------


def order(**kw):
    base = dict(client_order_id="c", symbol="AAPL", underlying="AAPL", instrument="STOCK", side="buy", qty=1)
    return OrderRequest(**{**base, **kw})


def test_order_request_limit_needs_a_positive_price_and_market_none():
    assert order().order_type == "market" and order().limit_price is None
    assert order(order_type="limit", limit_price=D("1.05")).limit_price == D("1.05")
    for bad in (dict(order_type="limit"), dict(order_type="limit", limit_price=D("0")),
                dict(order_type="market", limit_price=D("1")), dict(order_type="stop", limit_price=D("1"))):
        with pytest.raises(ValueError):
            order(**bad)


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("option_limit_aggressiveness", 1.5, "execution.option_limit_aggressiveness: Input should be less than or equal to 1"),
        ("option_limit_aggressiveness", -0.1, "execution.option_limit_aggressiveness: Input should be greater than or equal to 0"),
        ("reprice_after_seconds", 0, "execution.reprice_after_seconds: Input should be greater than or equal to 1"),
        ("max_reprices", 21, "execution.max_reprices: Input should be less than or equal to 20"),
        ("reprice_step", 2, "execution.reprice_step: Input should be less than or equal to 1"),
        ("stock_order_type", "stop", "execution.stock_order_type: Input should be 'market' or 'limit'"),
        ("stock_limit_offset_bps", 501, "execution.stock_limit_offset_bps: Input should be less than or equal to 500"),
    ],
)
def test_execution_params_out_of_bounds_are_refused_naming_the_field(field, value, expected):
    doc = json.loads(DEFAULT_PARAMS_PATH.read_text())
    doc["execution"][field] = value
    with pytest.raises(ParamsError) as info:
        validate_params(doc)
    assert len(info.value.errors) == 1 and info.value.errors[0].startswith(expected)


def test_reviewed_defaults_price_options_at_mid_plus_half_the_half_spread_and_stocks_at_market():
    e = default_params().execution
    assert (e.option_limit_aggressiveness, e.reprice_after_seconds, e.max_reprices, e.reprice_step) == (0.5, 15, 3, 0.25)
    assert (e.stock_order_type, e.stock_limit_offset_bps) == ("market", 10)

"""The dispatcher's decision for an option recommendation (pure): contract, sizing, fallback."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from decimal import Decimal

import pytest

from services.common.params import as_params
from services.domain.broker import AssetRecord
from services.domain.decision import CHAIN_NOT_FETCHED, Context, OptionInputs, decide, denied_whatever_the_contract
from services.domain.iv_percentile import IVPercentile
from services.adapters.sim.options import SimChainSpec, simulate_chain
from tests.factories import et

NOW = et("2026-11-30", "11:00")
SPOT = Decimal("100.00")
LIQUID = SimChainSpec(illiquid_share=0.0)
# Every contract too thin to trade: volume and open interest far below the minimums.
ILLIQUID = SimChainSpec(illiquid_share=1.0, base_volume=1, base_open_interest=1)
IV_OK = IVPercentile(40.0, "OK: iv=0.3000 above 12 of 30 sessions")


def context(action="BUY", exposure="0", equity="100000") -> Context:
    bar_ts = NOW - timedelta(minutes=1)
    return Context(
        recommendation={"id": 1, "account_id": "a", "ticker": "XYZ", "action": action, "instrument": "OPTION",
                        "strategy": "day_trade", "confidence": Decimal("0.8"), "bar_ts": bar_ts,
                        "created_at": NOW, "reason": {}},
        bar={"ts": bar_ts, "open": SPOT, "high": SPOT, "low": SPOT, "close": SPOT, "volume": 1000},
        features={"ts": bar_ts}, last_trade_time=None, ticker_count_today=0, open_position=None,
        open_positions=0, exposure=Decimal(exposure),
        account_state={"equity": Decimal(equity), "last_equity": Decimal(equity), "as_of": NOW},
        kill_state="ACTIVE",
        asset=AssetRecord("XYZ", "active", tradable=True, shortable=True, fractionable=True, asset_class="us_equity",
                          easy_to_borrow=True),
    )


def chain(spec: SimChainSpec):
    return OptionInputs(simulate_chain("XYZ", SPOT, NOW, seed=3, spec=spec), IV_OK)


def test_liquid_chain_buys_whole_contracts_sized_from_the_ask_times_100():
    params = as_params({})
    d = decide(context(), params, NOW, None, chain(LIQUID))
    assert d.is_order and d.plan.instrument == "OPTION" and d.plan.position_intent == "buy_to_open"
    assert d.plan.symbol.startswith("XYZ") and "C" in d.plan.symbol[3:]  # a call for BUY
    unit = d.plan.est_price * 100
    budget = min(params.risk.max_notional_per_trade, params.options.max_premium_per_trade)
    assert d.plan.qty == min(int(budget // unit), params.options.max_contracts_per_trade)
    assert d.plan.notional == d.plan.qty * unit
    assert {g["name"] for g in d.gates_json()} >= {"option.option_spread", "option.option_volume", "max_exposure"}


def test_bearish_recommendation_buys_a_put():
    d = decide(context("SELL"), as_params({}), NOW, None, chain(LIQUID))
    assert d.is_order and d.plan.symbol[len("XYZ") + 6] == "P"


def test_illiquid_chain_falls_back_to_a_stock_order_that_respects_the_exposure_limit():
    params = as_params({"max_notional_exposure": 10000, "max_notional_per_trade": 2000})
    d = decide(context(exposure="9350"), params, NOW, None, chain(ILLIQUID))
    assert d.code == "ORDER_PLANNED_FALLBACK" and d.plan.instrument == "STOCK"
    assert d.plan.qty == 6  # the room under the limit (650) buys 6 shares at 100, not the 2,000 budget
    assert Decimal("9350") + d.plan.notional <= Decimal("10000")
    assert d.info["option"]["code"] in ("WIDE_SPREAD", "LOW_VOLUME", "LOW_OPEN_INTEREST", "NO_PASSING_CONTRACT")


def test_illiquid_chain_with_fallback_off_is_a_skip_with_the_option_reason():
    params = as_params({"allow_stock_fallback": False})
    d = decide(context(), params, NOW, None, chain(ILLIQUID))
    assert not d.is_order and d.info["fallback"] == "not allowed"
    assert d.code == d.info["option"]["code"]


def test_options_only_account_never_falls_back_to_stock():
    params = as_params({"allowed_instruments": ["OPTION"], "allow_stock_fallback": False})
    d = decide(context(), params, NOW, None, chain(ILLIQUID))
    assert not d.is_order


def test_bearish_fallback_without_shorting_is_a_skip():
    d = decide(context("SELL"), as_params({"allow_short": False}), NOW, None, chain(ILLIQUID))
    assert (d.is_order, d.code) == (False, "FALLBACK_SHORT_NOT_ALLOWED")


def test_chain_outage_denies_without_falling_back():
    d = decide(context(), as_params({}), NOW, None, OptionInputs(None, error="BrokerUnavailable: 503"))
    assert (d.is_order, d.code) == (False, "NO_OPTION_CHAIN")
    assert d.info["fallback"] == "not allowed"


@pytest.mark.parametrize("iv, passes", [(IVPercentile(80.0, "OK"), True), (IVPercentile(81.0, "OK"), False)])
def test_iv_percentile_above_the_limit_refuses_the_option(iv, passes):
    d = decide(context(), as_params({"allow_stock_fallback": False}), NOW, None,
               replace(chain(LIQUID), iv_percentile=iv))
    assert d.is_order is passes


# -- A gate that no contract could change denies before the chain is needed --------------------


@pytest.mark.parametrize("change, code", [
    ({"kill_state": "REDUCING"}, "KILL_SWITCH_REDUCING"),
    ({"ticker_count_today": 99}, "TICKER_DAILY_TRADES"),
    ({"open_positions": 99}, "MAX_POSITIONS"),
])
def test_a_contract_independent_denial_needs_no_chain_and_records_that_none_was_fetched(change, code):
    ctx = replace(context(), **change)
    early = denied_whatever_the_contract(ctx, as_params({}), NOW, None)
    assert early is not None and early.code == code
    assert early.info["option"]["code"] == CHAIN_NOT_FETCHED
    # The same decision with the chain at hand, or with none fetched: the gate decides it.
    with_chain = decide(ctx, as_params({}), NOW, None, chain(LIQUID))
    without = decide(ctx, as_params({}), NOW, None, OptionInputs.skipped(early))
    assert (with_chain.code, without.code) == (code, code)
    assert [g.as_json() for g in with_chain.gates] == [g.as_json() for g in without.gates]


def test_an_entry_every_contract_independent_gate_passes_needs_its_chain():
    assert denied_whatever_the_contract(context(), as_params({}), NOW, None) is None
    # Denied only by the asset record: the contract's path (and the stock fallback's) decides the code.
    no_asset = replace(context(), asset=None)
    assert denied_whatever_the_contract(no_asset, as_params({}), NOW, None) is None


def test_decided_again_where_the_gate_passes_an_entry_without_its_chain_is_not_a_chain_outage():
    early = denied_whatever_the_contract(replace(context(), kill_state="REDUCING"), as_params({}), NOW, None)
    d = decide(context(), as_params({}), NOW, None, OptionInputs.skipped(early))
    assert (d.is_order, d.code) == (False, CHAIN_NOT_FETCHED)
    # Even where a gate that depends on the order would deny it (here the exposure, as a stock
    # order would be sized): with a contract it might have passed, so it stays undetermined.
    full = decide(context(exposure="100000000"), as_params({}), NOW, None, OptionInputs.skipped(early))
    assert (full.is_order, full.code) == (False, CHAIN_NOT_FETCHED)
    assert not next(g for g in full.gates if g.name == "max_exposure").result.passed

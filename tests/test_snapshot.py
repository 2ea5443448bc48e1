"""The inputs of a decision, stored as JSON and restored, decide the same again (pure)."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import timedelta
from decimal import Decimal

from services.common.params import as_params
from services.dispatcher.risk.gates import AssetUnavailable
from services.domain.decision import Context, decide
from services.domain.order_pricing import Quote
from services.domain.snapshot import CHAIN_EXCERPT, restore, snapshot
from tests.test_option_decisions import LIQUID, NOW, chain, context


def roundtrip(data):
    return restore(json.loads(json.dumps(data)))


def same(a, b) -> None:
    assert (a.code, a.detail) == (b.code, b.detail)
    assert a.gates_json() == b.gates_json()
    assert a.plan == b.plan


def test_an_option_entry_restored_from_json_decides_the_same_contract_size_and_gates():
    ctx, inputs, params = context(), chain(LIQUID), as_params({})
    ctx2, now2, inputs2, _, _ = roundtrip(snapshot(ctx, NOW, inputs))
    assert now2 == NOW and len(inputs2.chain) == min(len(inputs.chain), CHAIN_EXCERPT)
    same(decide(ctx, params, NOW, None, inputs), decide(ctx2, params, now2, None, inputs2))


def test_a_stock_entry_and_its_denials_restore_exactly():
    stock = Context(**{**context().__dict__, "recommendation": {**context().recommendation, "instrument": "STOCK"}})
    full = replace(stock, open_positions=5, exposure=Decimal("9950.25"))
    cooling = replace(stock, last_trade_time=NOW - timedelta(minutes=3), ticker_count_today=1)
    for ctx in (stock, full, cooling, replace(stock, asset=None), replace(stock, asset=AssetUnavailable("timeout")),
                replace(stock, account_state=None, bar=None, features=None)):
        ctx2, now2, _, _, _ = roundtrip(snapshot(ctx, NOW))
        same(decide(ctx, as_params({}), NOW, None), decide(ctx2, as_params({}), now2, None))
    denied = decide(roundtrip(snapshot(full, NOW))[0], as_params({}), NOW, None)
    assert denied.code == "MAX_POSITIONS"


def test_an_option_exit_keeps_its_quote_and_the_capacity_recheck_its_counts():
    base = context("EXIT")
    ctx = Context(**{**base.__dict__, "open_position": {"id": 7, "status": "OPEN", "qty": 2, "instrument": "OPTION",
                                                        "symbol": "XYZ261204C00100000", "side": "long",
                                                        "market_price": 1.05, "version": 3}})
    quote = Quote(Decimal("1.00"), Decimal("1.10"))
    ctx2, now2, _, quote2, capacity = roundtrip(snapshot(ctx, NOW, exit_quote=quote,
                                                         capacity={"open_positions": 4, "exposure": Decimal("9000.5"),
                                                                   "has_open_position": False, "kill_state": "ACTIVE"}))
    assert quote2 == quote and capacity["exposure"] == Decimal("9000.5")
    same(decide(ctx, as_params({}), NOW, None, exit_quote=quote), decide(ctx2, as_params({}), now2, None, exit_quote=quote2))

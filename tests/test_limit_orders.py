"""Limit orders end to end: the Alpaca adapter's request bodies and cancels against the fake
server, the simulated broker's resting book, and the plan and execution row that carry the price.
"""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import pytest

from services.common.clock import FixedClock
from services.common.db import make_pool
from services.common.params import ParamsInForce, as_params
from services.domain.broker import BrokerRejected, BrokerUnavailable, OrderRequest, client_order_id
from services.domain.decision import Context, decide
from services.dispatcher.main import Dispatcher, StaticParams
from services.domain.order_pricing import Quote
from services.adapters.sim.broker import SimBroker
from tests.factories import ACCOUNT, add_bar, add_market, add_recommendation, et
from tests.fake_alpaca import fake_alpaca  # noqa: F401
from tests.test_alpaca_adapter import OCC, broker
from tests.test_option_decisions import LIQUID, chain, context

D = Decimal
NOW = et("2026-11-30", "11:00")


def option_order(cid="ops-1-0-x", side="buy", limit="1.05", intent="buy_to_open", qty=2) -> OrderRequest:
    return OrderRequest(client_order_id=cid, symbol=OCC, underlying="SPY", instrument="OPTION", side=side, qty=qty,
                        position_intent=intent, order_type="limit", limit_price=D(limit))


def stock_order(cid="ops-2-0-x", side="buy", limit: str | None = "100.11") -> OrderRequest:
    return OrderRequest(client_order_id=cid, symbol="AAPL", underlying="AAPL", instrument="STOCK", side=side, qty=3,
                        order_type="limit" if limit else "market", limit_price=D(limit) if limit else None)


# --- the Alpaca adapter against the fake server -----------------------------------------------


def test_option_limit_order_body_is_limit_day_with_intent_and_no_extended_hours(fake_alpaca):
    fake_alpaca.add_option(OCC, bid=1.00, ask=1.10)
    result = broker(fake_alpaca).submit_order(option_order(limit="1.05"))
    body = fake_alpaca.requests_to("/v2/orders", "POST")[0].json
    assert body["type"] == "limit" and body["limit_price"] == 1.05
    assert body["time_in_force"] == "day" and body["position_intent"] == "buy_to_open"
    assert body["qty"] == 2 and body["symbol"] == OCC and body["client_order_id"] == "ops-1-0-x"
    assert "extended_hours" not in body
    assert (result.status, result.filled_qty, result.filled_avg_price) == ("accepted", 0, None)


def test_option_limit_at_the_ask_fills_at_once_at_the_touch(fake_alpaca):
    fake_alpaca.add_option(OCC, bid=1.00, ask=1.10)
    result = broker(fake_alpaca).submit_order(option_order(limit="1.10"))
    assert (result.status, result.filled_qty, result.filled_avg_price) == ("filled", 2, D("1.10"))


def test_option_sell_to_close_limit_at_the_bid_fills(fake_alpaca):
    fake_alpaca.add_option(OCC, bid=1.00, ask=1.10)
    result = broker(fake_alpaca).submit_order(option_order(side="sell", limit="1.00", intent="sell_to_close"))
    body = fake_alpaca.requests_to("/v2/orders", "POST")[0].json
    assert (body["side"], body["position_intent"], body["limit_price"]) == ("sell", "sell_to_close", 1.0)
    assert (result.status, result.filled_avg_price) == ("filled", D("1.00"))


def test_stock_limit_body_carries_the_price_and_no_position_intent(fake_alpaca):
    fake_alpaca.set_quote("AAPL", "100.00", "100.10")
    result = broker(fake_alpaca).submit_order(stock_order(limit="100.11"))
    body = fake_alpaca.requests_to("/v2/orders", "POST")[0].json
    assert (body["type"], body["limit_price"], body["time_in_force"]) == ("limit", 100.11, "day")
    assert "position_intent" not in body and "extended_hours" not in body
    assert (result.status, result.filled_avg_price) == ("filled", D("100.10"))


def test_stock_market_order_body_is_unchanged(fake_alpaca):
    broker(fake_alpaca).submit_order(stock_order(limit=None))
    body = fake_alpaca.requests_to("/v2/orders", "POST")[0].json
    assert body["type"] == "market" and "limit_price" not in body


def test_option_limit_off_the_cent_is_refused_before_anything_is_sent(fake_alpaca):
    with pytest.raises(BrokerRejected):
        broker(fake_alpaca).submit_order(option_order(limit="1.055"))
    assert fake_alpaca.requests_to("/v2/orders", "POST") == []


def test_cancel_resting_order_deletes_it_by_broker_id_and_returns_canceled(fake_alpaca):
    fake_alpaca.add_option(OCC, bid=1.00, ask=1.10)
    b = broker(fake_alpaca)
    placed = b.submit_order(option_order())
    result = b.cancel_order("ops-1-0-x")
    assert [r.method for r in fake_alpaca.requests if r.path == f"/v2/orders/{placed.broker_order_id}"] == ["DELETE"]
    assert (result.status, result.broker_order_id, result.filled_qty) == ("canceled", placed.broker_order_id, 0)


def test_cancel_after_the_fill_returns_the_fill_not_an_error(fake_alpaca):
    fake_alpaca.add_option(OCC, bid=1.00, ask=1.10)
    b = broker(fake_alpaca)
    b.submit_order(option_order())
    fake_alpaca.fill_resting("ops-1-0-x", "1.04")  # the market came to it before the cancel
    result = b.cancel_order("ops-1-0-x")
    assert len(fake_alpaca.requests_to(f"/v2/orders/{result.broker_order_id}")) == 1  # the DELETE, answered 422
    assert (result.status, result.filled_qty, result.filled_avg_price) == ("filled", 2, D("1.04"))


def test_cancel_twice_returns_the_canceled_order_both_times(fake_alpaca):
    fake_alpaca.add_option(OCC, bid=1.00, ask=1.10)
    b = broker(fake_alpaca)
    b.submit_order(option_order())
    assert b.cancel_order("ops-1-0-x").status == "canceled"
    assert b.cancel_order("ops-1-0-x").status == "canceled"


def test_cancel_of_an_unknown_order_is_none_and_sends_no_delete(fake_alpaca):
    assert broker(fake_alpaca).cancel_order("ops-9-0-nothing") is None
    assert not [r for r in fake_alpaca.requests if r.method == "DELETE"]


def test_cancel_that_the_broker_cannot_answer_is_unavailable(fake_alpaca):
    fake_alpaca.add_option(OCC, bid=1.00, ask=1.10)
    b = broker(fake_alpaca)
    b.submit_order(option_order())
    fake_alpaca.fail_next("/v2/orders/*", 503, method="DELETE")
    with pytest.raises(BrokerUnavailable):
        b.cancel_order("ops-1-0-x")
    assert fake_alpaca.orders["ops-1-0-x"]["status"] == "accepted"


# --- the simulated broker -----------------------------------------------------------------------


@pytest.fixture
def sim(db_url, conn):
    clock = FixedClock(NOW)
    pool = make_pool(db_url)
    add_bar(conn, "AAPL", NOW - timedelta(minutes=1), 200)
    mark(conn, NOW - timedelta(minutes=1), "1.00", "1.10")
    yield SimBroker(pool, ACCOUNT, clock, slippage_bps=5), clock
    pool.close()


def mark(conn, ts, bid, ask):
    conn.execute("INSERT INTO sim_option_marks (symbol, ts, bid, ask) VALUES (%s, %s, %s, %s)", (OCC, ts, D(bid), D(ask)))


def cash(conn) -> Decimal:
    return conn.execute("SELECT cash FROM sim_account WHERE account_id = %s", (ACCOUNT,)).fetchone()["cash"]


def test_sim_limit_below_the_ask_rests_without_moving_cash(sim, conn):
    broker_, _ = sim
    result = broker_.submit_order(option_order(limit="1.05"))
    assert (result.status, result.filled_qty, result.filled_avg_price) == ("accepted", 0, None)
    assert cash(conn) == D("100000")
    row = conn.execute("SELECT order_type, limit_price FROM sim_orders").fetchone()
    assert (row["order_type"], row["limit_price"]) == ("limit", D("1.05"))


def test_sim_marketable_limit_fills_at_the_limit_or_better(sim, conn):
    broker_, _ = sim
    buy = broker_.submit_order(option_order(limit="1.10"))  # ask plus slippage is 1.1006: capped at the limit
    sell = broker_.submit_order(option_order(cid="s", side="sell", limit="0.95", intent="sell_to_close"))
    assert (buy.status, buy.filled_avg_price) == ("filled", D("1.10"))
    assert (sell.status, sell.filled_avg_price) == ("filled", D("0.9995"))  # bid less slippage, above its limit
    assert cash(conn) == D("100000") - 2 * D("1.10") * 100 + 2 * D("0.9995") * 100


def test_sim_market_order_still_fills_at_the_ask_plus_slippage(sim):
    broker_, _ = sim
    result = broker_.submit_order(stock_order(limit=None))
    assert result.status == "filled" and result.filled_avg_price == (D(200) * (1 + D("0.0002")) * D("1.0005")).quantize(D("0.0001"))


def test_sim_cancel_resting_then_again_then_a_filled_one(sim):
    broker_, _ = sim
    broker_.submit_order(option_order(limit="1.05"))
    broker_.submit_order(option_order(cid="f", limit="1.10"))
    assert broker_.cancel_order("ops-1-0-x").status == "canceled"
    assert broker_.cancel_order("ops-1-0-x").status == "canceled"
    filled = broker_.cancel_order("f")
    assert (filled.status, filled.filled_qty) == ("filled", 2)
    assert broker_.cancel_order("unknown") is None


def test_sim_match_resting_fills_what_the_moved_quote_reaches_and_nothing_else(sim, conn):
    broker_, clock = sim
    broker_.submit_order(option_order(cid="near", limit="1.05"))
    broker_.submit_order(option_order(cid="far", limit="0.90"))
    broker_.submit_order(option_order(cid="gone", limit="1.06"))
    broker_.cancel_order("gone")
    assert broker_.match_resting(NOW) == []  # the quote has not moved
    later = NOW + timedelta(minutes=1)
    mark(conn, later, "0.98", "1.04")
    clock.set(later)
    filled = broker_.match_resting(later)
    assert [(o.client_order_id, o.status, o.filled_avg_price, o.filled_at) for o in filled] == [
        ("near", "filled", D("1.0405"), later)]  # 1.04 plus slippage, within the limit
    assert broker_.get_order_by_client_id("far").status == "accepted"
    assert broker_.get_order_by_client_id("gone").status == "canceled"
    assert cash(conn) == D("100000") - 2 * D("1.0405") * 100
    assert broker_.match_resting(later) == []  # filled once


# --- the decision and the execution row ---------------------------------------------------------


def test_option_entry_plan_carries_the_limit_priced_from_the_chosen_quote():
    params = as_params({"execution": {"option_limit_aggressiveness": 0.5}})
    d = decide(context(), params, NOW, None, chain(LIQUID))
    quote = d.plan.option["quote"]
    mid, half = (quote["bid"] + quote["ask"]) / 2, (quote["ask"] - quote["bid"]) / 2
    assert d.plan.order_type == "limit"
    assert mid + half / 2 <= d.plan.limit_price <= quote["ask"]
    assert d.plan.est_price == quote["ask"]  # sized at the ask: the limit never buys more than the budget
    assert d.info["limit"].startswith(f"LIMIT_PRICED: buy limit={d.plan.limit_price}")


def test_option_entry_at_full_aggressiveness_is_priced_at_the_ask():
    d = decide(context(), as_params({"execution": {"option_limit_aggressiveness": 1}}), NOW, None, chain(LIQUID))
    assert d.plan.limit_price == d.plan.option["quote"]["ask"]


def exit_context(instrument="OPTION", symbol=OCC) -> Context:
    base = context("EXIT")
    return Context(**{**base.__dict__, "open_position": {
        "status": "OPEN", "qty": D(2), "instrument": instrument, "symbol": symbol, "side": "long",
        "market_price": D("1.05")}})


def test_option_exit_is_a_sell_to_close_limit_from_the_held_contracts_quote():
    d = decide(exit_context(), as_params({}), NOW, None, exit_quote=Quote(D("1.00"), D("1.10")))
    assert (d.plan.side, d.plan.position_intent, d.plan.order_type, d.plan.limit_price) == (
        "sell", "sell_to_close", "limit", D("1.02"))


@pytest.mark.parametrize("reason", ["EXPIRY_CUTOFF", "END_OF_DAY", "DAILY_LOSS_FLATTEN", "OPERATOR_FLATTEN"])
def test_option_exit_with_a_deadline_is_priced_at_the_bid(reason):
    ctx = exit_context()
    ctx = Context(**{**ctx.__dict__, "recommendation": {**ctx.recommendation, "exit_reason": reason}})
    d = decide(ctx, as_params({}), NOW, None, exit_quote=Quote(D("1.00"), D("1.10")))
    assert (d.plan.order_type, d.plan.limit_price) == ("limit", D("1.00"))


def test_option_exit_by_a_price_rule_keeps_the_configured_aggressiveness():
    ctx = exit_context()
    ctx = Context(**{**ctx.__dict__, "recommendation": {**ctx.recommendation, "exit_reason": "STOP_LOSS"}})
    d = decide(ctx, as_params({}), NOW, None, exit_quote=Quote(D("1.00"), D("1.10")))
    assert d.plan.limit_price == D("1.02")


def test_option_exit_without_a_quote_goes_at_market_and_says_why():
    d = decide(exit_context(), as_params({}), NOW, None)
    assert (d.plan.order_type, d.plan.limit_price) == ("market", None)
    assert d.info["order_type"] == "market: NO_QUOTE: no quote gathered for the exit"


def test_stock_entry_is_market_by_default_and_a_limit_through_the_close_when_asked():
    stock = Context(**{**context().__dict__, "recommendation": {**context().recommendation, "instrument": "STOCK"}})
    market = decide(stock, as_params({}), NOW, None)
    limit = decide(stock, as_params({"execution": {"stock_order_type": "limit", "stock_limit_offset_bps": 10}}), NOW, None)
    assert (market.plan.order_type, market.plan.limit_price) == ("market", None)
    assert (limit.plan.order_type, limit.plan.limit_price) == ("limit", D("100.10"))


@pytest.fixture
def dispatcher(db_url, conn):
    clock = FixedClock(NOW)
    pool = make_pool(db_url)
    add_market(conn, "AAPL", NOW, 200)
    params = as_params({"execution": {"stock_order_type": "limit", "stock_limit_offset_bps": 0}})
    in_force = ParamsInForce(params, "test", "1", params.content_hash())
    d = Dispatcher(pool, SimBroker(pool, ACCOUNT, clock), StaticParams(in_force), ACCOUNT, clock=clock, worker_id="w1")
    d.refresh_account(force=True)
    yield d
    pool.close()


def test_execution_row_records_order_type_limit_price_and_attempt_zero(dispatcher, conn):
    rec = add_recommendation(conn, "AAPL", NOW)
    outcome = dispatcher.process_next()
    row = conn.execute("SELECT client_order_id, order_type, limit_price, attempt, status FROM dispatch_executions").fetchone()
    assert row["client_order_id"] == client_order_id(ACCOUNT, rec)
    assert (row["order_type"], row["limit_price"], row["attempt"]) == ("limit", D("200.00"), 0)
    # A buy limit at the last close rests below the simulated ask: accepted, not filled.
    assert (row["status"], outcome.code) == ("ACCEPTED", "ORDER_ACCEPTED")
    order = conn.execute("SELECT order_type, limit_price FROM sim_orders").fetchone()
    assert (order["order_type"], order["limit_price"]) == ("limit", D("200.00"))


def test_execution_rows_from_before_the_migration_read_as_market_attempt_zero(conn):
    rec = add_recommendation(conn, "AAPL", NOW)
    conn.execute(
        """INSERT INTO dispatch_executions (account_id, recommendation_id, client_order_id, ticker, instrument, symbol,
               side, qty, est_price, status, submitted_at, updated_at, role)
           VALUES (%s, %s, 'old', 'AAPL', 'STOCK', 'AAPL', 'buy', 1, 200, 'FILLED', %s, %s, 'ENTRY')""",
        (ACCOUNT, rec, NOW, NOW))
    row = conn.execute("SELECT order_type, limit_price, attempt FROM dispatch_executions").fetchone()
    assert (row["order_type"], row["limit_price"], row["attempt"]) == ("market", None, 0)

"""Pushed trade updates drive the order lifecycle, through the same write path as every answer.

Alpaca's trade_updates stream (the real SDK's models against the local server's /stream) and
the simulated broker's in-process events reach the dispatcher as `on_trade_update`, which applies
them like a submit's answer or a poll: a fill arrives within a second without any poll, a stale
answer after it changes nothing, and an event for an order this database does not know is
left to reconciliation.
"""

from __future__ import annotations

import time
from decimal import Decimal


from services.common.clock import FixedClock
from services.adapters.alpaca.client import AlpacaBroker
from services.domain.broker import OrderResult, TradeUpdate, client_order_id
from services.dispatcher.main import Dispatcher, start_trade_updates
from services.adapters.sim.broker import SimBroker
from tests.broker_doubles import AcceptedFirst
from tests.factories import pinned_params, ACCOUNT, add_market, add_recommendation, et, recommendation
from tests.fake_alpaca import fake_alpaca  # noqa: F401
from tests.test_alpaca_adapter import SleepRecorder, settings

NOW = et("2026-11-30", "10:00")
PINNED = {"max_open_positions": 10, "max_notional_exposure": 10_000, "max_notional_per_trade": 2_000,
          "max_equity_pct_per_trade": 0.10}


def params():
    return pinned_params(PINNED)


def execution(conn, cid: str) -> dict:
    return conn.execute("SELECT status, filled_qty, filled_avg_price FROM dispatch_executions WHERE client_order_id = %s",
                        (cid,)).fetchone()


def wait_for(predicate, timeout: float = 1.0) -> float:
    """Seconds until `predicate()` held; fails past `timeout`."""
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout, "not within the time allowed"
        time.sleep(0.01)
    return time.monotonic() - started


def test_alpaca_stream_fill_reaches_the_lifecycle_within_a_second_without_a_poll(pool, conn, fake_alpaca):
    fake_alpaca.add_asset("AAPL")
    clock = FixedClock(NOW)
    broker = AlpacaBroker(settings(fake_alpaca), clock=clock, sleep=SleepRecorder())
    d = Dispatcher(pool, broker, params(), ACCOUNT, clock=clock)
    d.refresh_account(force=True)
    stop = start_trade_updates(d, broker)
    try:
        assert fake_alpaca.wait_listeners(1, timeout=2.0)
        add_market(conn, "AAPL", NOW, 100)
        rid = add_recommendation(conn, "AAPL", NOW)
        [outcome] = d.drain()  # the local server accepts the market order and leaves it open
        cid = client_order_id(ACCOUNT, rid)
        assert (outcome.status, outcome.code) == ("SUBMITTING", "ORDER_ACCEPTED")
        polls_before = len(fake_alpaca.requests_to("/v2/orders:by_client_order_id", "GET"))

        fake_alpaca.fill(cid, "100.05")
        waited = wait_for(lambda: execution(conn, cid)["status"] == "FILLED")
    finally:
        stop()
    assert waited < 1.0
    ex = execution(conn, cid)
    assert (ex["filled_avg_price"], ex["filled_qty"] > 0) == (Decimal("100.05"), True)
    rec = recommendation(conn, rid)
    assert (rec["status"], rec["outcome_code"]) == ("EXECUTED", "ORDER_FILLED")
    assert len(fake_alpaca.requests_to("/v2/orders:by_client_order_id", "GET")) == polls_before  # no poll needed


def test_sim_broker_events_fill_the_order_and_the_later_accepted_answer_changes_nothing(pool, conn):
    clock = FixedClock(NOW)
    sim = SimBroker(pool, ACCOUNT, clock)
    d = Dispatcher(pool, AcceptedFirst(sim), params(), ACCOUNT, clock=clock)
    d.refresh_account(force=True)
    stop = start_trade_updates(d, sim)
    try:
        add_market(conn, "AAPL", NOW, 100)
        rid = add_recommendation(conn, "AAPL", NOW)
        d.drain()
    finally:
        stop()
    # The events (new, fill) were applied during the submit; the "accepted" answer that came
    # after them is stale and was refused, not applied over the fill.
    assert execution(conn, client_order_id(ACCOUNT, rid))["status"] == "FILLED"
    rec = recommendation(conn, rid)
    assert (rec["status"], rec["outcome_code"]) == ("EXECUTED", "ORDER_FILLED")
    assert conn.execute("SELECT status FROM active_positions").fetchone()["status"] == "OPEN"


def test_an_update_for_an_order_this_database_does_not_know_is_left_to_reconciliation(pool, conn):
    clock = FixedClock(NOW)
    d = Dispatcher(pool, SimBroker(pool, ACCOUNT, clock), params(), ACCOUNT, clock=clock)
    stranger = OrderResult("b-1", "by-hand-1", "AAPL", "buy", Decimal(1), "filled", Decimal(1), Decimal(100),
                           NOW, NOW)
    d.on_trade_update(TradeUpdate("fill", stranger, NOW, qty=Decimal(1), price=Decimal(100)))  # no raise
    assert conn.execute("SELECT count(*)::int AS n FROM dispatch_executions").fetchone()["n"] == 0

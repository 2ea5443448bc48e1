"""The simulated broker emits the trade updates Alpaca's stream sends: new then fill, or rejected,
to in-process subscribers after commit, and NOTIFY sim_trade_updates <client_order_id> for
other processes.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import psycopg
import pytest

from services.common.clock import FixedClock
from services.common.db import make_pool
from services.domain.broker import BrokerRejected, DuplicateClientOrderId, OrderRequest, TradeUpdate
from services.adapters.sim.broker import TRADE_UPDATES_CHANNEL, SimBroker
from tests.factories import ACCOUNT, add_bar

NOW = datetime(2026, 11, 30, 15, 30, tzinfo=timezone.utc)


@pytest.fixture
def sim(db_url, conn):
    add_bar(conn, "AAPL", NOW - timedelta(minutes=1), "200.00")
    conn.commit()
    pool = make_pool(db_url)
    yield SimBroker(pool, ACCOUNT, FixedClock(NOW), slippage_bps=0, half_spread_bps=0)
    pool.close()


def buy(coid: str, symbol: str = "AAPL", qty: int = 5) -> OrderRequest:
    return OrderRequest(coid, symbol, symbol, "STOCK", "buy", qty)


def test_sim_submit_filled_emits_new_then_fill_with_the_execution(sim):
    seen: list[TradeUpdate] = []
    sim.subscribe(seen.append)
    result = sim.submit_order(buy("ops-1-0-x"))

    assert [u.event for u in seen] == ["new", "fill"]
    new, fill = seen
    assert (new.order.status, new.order.filled_qty, new.order.filled_avg_price, new.qty) == ("new", Decimal(0), None, None)
    assert (fill.qty, fill.price, fill.order) == (Decimal(5), Decimal("200.0000"), result)
    assert fill.at == NOW and fill.execution_id and fill.is_execution
    assert new.order.broker_order_id == fill.order.broker_order_id


def test_sim_submit_without_market_emits_rejected(sim):
    seen: list[TradeUpdate] = []
    sim.subscribe(seen.append)
    with pytest.raises(BrokerRejected):
        sim.submit_order(buy("ops-2-0-x", symbol="NOPE"))
    assert [(u.event, u.order.status, u.order.client_order_id) for u in seen] == [("rejected", "rejected", "ops-2-0-x")]


def test_sim_duplicate_submit_emits_nothing_and_unsubscribe_stops_delivery(sim):
    seen: list[TradeUpdate] = []
    unsubscribe = sim.subscribe(seen.append)
    sim.submit_order(buy("ops-3-0-x"))
    with pytest.raises(DuplicateClientOrderId):
        sim.submit_order(buy("ops-3-0-x"))
    assert len(seen) == 2
    unsubscribe()
    sim.submit_order(buy("ops-4-0-x"))
    assert len(seen) == 2


def test_sim_failing_subscriber_is_logged_and_the_others_still_get_updates(sim, caplog):
    def broken(update: TradeUpdate) -> None:
        raise RuntimeError("consumer down")

    seen: list[TradeUpdate] = []
    sim.subscribe(broken)
    sim.subscribe(seen.append)
    with caplog.at_level(logging.ERROR, logger="services.adapters.sim.broker"):
        sim.submit_order(buy("ops-5-0-x"))
    assert [u.event for u in seen] == ["new", "fill"]
    assert [r.event for r in caplog.records if r.getMessage() == "trade update callback failed"] == ["new", "fill"]


def test_sim_submit_notifies_other_processes_with_the_client_order_id(sim, db_url):
    with psycopg.connect(db_url, autocommit=True) as listener:
        listener.execute(f"LISTEN {TRADE_UPDATES_CHANNEL}")
        sim.submit_order(buy("ops-6-0-x"))
        with pytest.raises(BrokerRejected):
            sim.submit_order(buy("ops-7-0-x", symbol="NOPE"))
        payloads = [n.payload for n in listener.notifies(timeout=1.0, stop_after=2)]
    assert payloads == ["ops-6-0-x", "ops-7-0-x"]
    assert sim.get_order_by_client_id(payloads[0]).status == "filled"

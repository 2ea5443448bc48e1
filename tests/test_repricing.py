"""Limit orders that do not fill: canceled, re-priced, given up, and finished after a crash.

A resting limit order is re-priced after `reprice_after_seconds`, each attempt a new order with
its own deterministic client_order_id; after `max_reprices` attempts it is canceled for good. The
reason of each cancel (and the next price) is committed before the cancel goes out, and each
attempt's intent before it is sent, so a process that dies anywhere in a replace leaves enough in
the database for the next pass, of a new process, to finish it: no attempt lost, none doubled.

Stock limit orders on the simulated broker: its quote is the last close +- 2 bps, so a buy limit
at the close (offset 0) rests, a limit at 0.75 of the half-spread rests, and one at the ask fills.
"""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal as D

import pytest

from services.common.clock import FixedClock
from services.common.db import make_pool
from services.adapters.postgres import kill_switch
from services.domain.broker import client_order_id
from services.dispatcher.main import Dispatcher, StaticParams
from services.adapters.sim.broker import SimBroker
from tests.broker_doubles import Wrapping
from tests.factories import pinned_params, ACCOUNT, add_market, add_recommendation, et, recommendation

NOW = et("2026-11-30", "10:00")
EXECUTION = {"stock_order_type": "limit", "stock_limit_offset_bps": 0, "reprice_after_seconds": 15,
             "option_limit_aggressiveness": 0.5, "reprice_step": 0.25}


def params(**execution) -> StaticParams:
    return pinned_params({"execution": {**EXECUTION, **execution}})


@pytest.fixture
def world(db_url, conn):
    clock = FixedClock(NOW)
    pools = []

    def dispatcher(broker_wrap=lambda b: b, worker="w1", half_spread_bps=2, **execution) -> Dispatcher:
        pool = make_pool(db_url)
        pools.append(pool)
        sim = SimBroker(pool, ACCOUNT, clock, half_spread_bps=half_spread_bps, slippage_bps=5)
        d = Dispatcher(pool, broker_wrap(sim), params(**execution), ACCOUNT, clock=clock, worker_id=worker,
                       quotes=sim.quote)
        d.refresh_account(force=True)
        return d

    add_market(conn, "AAPL", NOW, 200)
    yield dispatcher, clock
    for p in pools:
        p.close()


def attempts(conn) -> list[tuple]:
    return [(r["attempt"], r["status"], r["limit_price"], r["client_order_id"], r["cancel_reason"]) for r in conn.execute(
        "SELECT attempt, status, limit_price, client_order_id, cancel_reason FROM dispatch_executions ORDER BY attempt"
    ).fetchall()]


def broker_orders(conn) -> list[tuple]:
    return [(r["client_order_id"], r["status"]) for r in conn.execute(
        "SELECT client_order_id, status FROM sim_orders ORDER BY submitted_at, client_order_id").fetchall()]


def position(conn) -> tuple:
    p = conn.execute("SELECT status, qty, avg_price FROM active_positions").fetchone()
    return p["status"], p["qty"], p["avg_price"]


def test_limit_order_repriced_twice_then_filled_each_attempt_recorded_once(world, conn):
    dispatcher, clock = world
    d = dispatcher(max_reprices=3)
    rid = add_recommendation(conn, "AAPL", NOW)
    cid = [client_order_id(ACCOUNT, rid, 0, k) for k in range(3)]

    d.drain()  # attempt 0: a buy limit at the close, below the ask of 200.04: it rests
    clock.advance(timedelta(seconds=14))
    assert d.reprice_working() == 0  # not due yet
    clock.advance(timedelta(seconds=1))
    assert d.reprice_working() == 2  # due: canceled, and attempt 1 sent at mid + 0.75 x 0.04
    assert recommendation(conn, rid)["status"] == "SUBMITTING"
    clock.advance(timedelta(seconds=15))
    d.reprice_working()  # attempt 2 at the ask: marketable, filled

    assert attempts(conn) == [
        (0, "CANCELED", D("200.00"), cid[0], "REPRICE"),
        (1, "CANCELED", D("200.03"), cid[1], "REPRICE"),
        (2, "FILLED", D("200.04"), cid[2], None),
    ]
    assert broker_orders(conn) == [(cid[0], "canceled"), (cid[1], "canceled"), (cid[2], "filled")]
    rec = recommendation(conn, rid)
    assert (rec["status"], rec["outcome_code"]) == ("EXECUTED", "ORDER_FILLED")
    status, qty, price = position(conn)
    assert (status, price) == ("OPEN", D("200.04"))
    assert d.reprice_working() == 0  # nothing left working


def test_limit_order_unfilled_after_its_last_attempt_is_given_up_and_the_reservation_released(world, conn):
    dispatcher, clock = world
    d = dispatcher(max_reprices=1, half_spread_bps=50)  # the ask (201.00) is never reached
    rid = add_recommendation(conn, "AAPL", NOW)
    d.drain()
    clock.advance(timedelta(seconds=15))
    d.reprice_working()  # attempt 1 at mid + 0.75 x 1.00: rests
    clock.advance(timedelta(seconds=15))
    d.reprice_working()  # the last attempt is due: canceled for good

    assert [(a[0], a[1], a[2], a[4]) for a in attempts(conn)] == [
        (0, "CANCELED", D("200.00"), "REPRICE"), (1, "CANCELED", D("200.75"), "GIVE_UP")]
    rec = recommendation(conn, rid)
    assert (rec["status"], rec["outcome_code"]) == ("REJECTED", "ORDER_GIVEN_UP")
    assert position(conn)[0] == "CANCELLED"
    assert [o[1] for o in broker_orders(conn)] == ["canceled", "canceled"]


class DiesAfterCancel(Wrapping):
    """The broker cancels the order, and the process dies before it records the answer."""

    def cancel_order(self, cid):
        self.inner.cancel_order(cid)
        raise SystemExit("killed between the cancel and the replace")


class DiesBeforeSubmit(Wrapping):
    """The next attempt's intent is committed, and the process dies before the order leaves."""

    def submit_order(self, order):
        raise SystemExit("killed before the submit")


def die_after_canceling_for_a_new_price(dispatcher, clock, conn) -> int:
    """A resting entry whose re-price is due; the process that cancels it dies before recording it."""
    first = dispatcher(max_reprices=3, worker="w1")
    rid = add_recommendation(conn, "AAPL", NOW)
    first.drain()
    clock.advance(timedelta(seconds=15))
    dying = dispatcher(DiesAfterCancel, max_reprices=3, worker="w2")
    with pytest.raises(SystemExit):
        dying.reprice_working()
    return rid


def test_crash_between_cancel_and_replace_then_a_new_process_sends_the_next_attempt_once(world, conn):
    dispatcher, clock = world
    rid = die_after_canceling_for_a_new_price(dispatcher, clock, conn)
    # The broker canceled attempt 0; the database still shows it working, with the reason.
    assert attempts(conn)[0][1::3] == ("ACCEPTED", "REPRICE")

    restarted = dispatcher(max_reprices=3, worker="w3")
    restarted.recover_in_flight()  # the poll sees the cancel: a replace, not the end
    restarted.reprice_working()  # the next attempt goes out
    restarted.reprice_working()  # and is not sent again

    cid = [client_order_id(ACCOUNT, rid, 0, k) for k in range(2)]
    assert [(a[0], a[1], a[3]) for a in attempts(conn)] == [(0, "CANCELED", cid[0]), (1, "ACCEPTED", cid[1])]
    assert broker_orders(conn) == [(cid[0], "canceled"), (cid[1], "accepted")]
    assert recommendation(conn, rid)["status"] == "SUBMITTING"
    assert position(conn)[0] == "PENDING"  # still reserved for the order that works


def test_crash_after_the_next_attempts_intent_is_recorded_once_and_never_sent_twice(world, conn):
    dispatcher, clock = world
    first = dispatcher(max_reprices=3)
    rid = add_recommendation(conn, "AAPL", NOW)
    first.drain()
    clock.advance(timedelta(seconds=15))
    dying = dispatcher(DiesBeforeSubmit, max_reprices=3, worker="w2")
    with pytest.raises(SystemExit):
        dying.reprice_working()
    assert [a[1] for a in attempts(conn)] == ["CANCELED", "SUBMITTING"]

    restarted = dispatcher(max_reprices=3, worker="w3")
    restarted.reprice_working()  # the intent exists: no second attempt 1, no attempt 2
    assert [a[0] for a in attempts(conn)] == [0, 1]
    clock.advance(timedelta(minutes=3))
    restarted.recover_in_flight()  # the broker never had attempt 1: not placed, recorded once
    assert [a[1] for a in attempts(conn)] == ["CANCELED", "FAILED"]
    rec = recommendation(conn, rid)
    assert (rec["status"], rec["outcome_code"]) == ("FAILED", "ORDER_NOT_PLACED")
    assert position(conn)[0] == "CANCELLED"
    assert len(broker_orders(conn)) == 1


def test_an_order_that_fills_while_its_cancel_is_on_the_way_is_recorded_as_filled(world, conn):
    dispatcher, clock = world
    d = dispatcher(max_reprices=3)
    rid = add_recommendation(conn, "AAPL", NOW)
    d.drain()
    # The market comes to the resting order just before the cancel reaches the broker.
    clock.advance(timedelta(seconds=15))
    conn.execute("UPDATE lane_telemetry SET close = 199.95 WHERE ticker = 'AAPL'")
    d.broker.match_resting(clock.now())
    d.reprice_working()
    assert [(a[0], a[1]) for a in attempts(conn)] == [(0, "FILLED")]
    assert recommendation(conn, rid)["outcome_code"] == "ORDER_FILLED"
    assert position(conn)[0] == "OPEN"


OCC = "AAPL261204C00200000"


def hold_two_calls_and_ask_to_exit(conn) -> int:
    """An OPEN position of 2 AAPL calls bought at 1.20, quoted 1.00 x 1.10, and an EXIT for it."""
    conn.execute(
        """INSERT INTO active_positions (account_id, ticker, instrument, symbol, side, qty, multiplier, avg_price,
                                         status, opened_at)
           VALUES (%s, 'AAPL', 'OPTION', %s, 'long', 2, 100, 1.20, 'OPEN', %s)""", (ACCOUNT, OCC, NOW))
    conn.execute("INSERT INTO sim_option_marks (symbol, ts, bid, ask) VALUES (%s, %s, 1.00, 1.10)",
                 (OCC, NOW - timedelta(seconds=30)))
    return add_recommendation(conn, "AAPL", NOW, action="EXIT", instrument="OPTION")


def test_option_exit_goes_as_a_sell_to_close_limit_priced_from_the_held_contracts_quote(world, conn):
    dispatcher, clock = world
    d = dispatcher()
    rid = hold_two_calls_and_ask_to_exit(conn)

    d.drain()

    ex = conn.execute("SELECT order_type, limit_price, side, position_intent, qty FROM dispatch_executions").fetchone()
    # mid 1.05 less half of the 0.05 half-spread, rounded down to the cent for a sell: 1.02.
    assert (ex["order_type"], ex["limit_price"], ex["side"], ex["position_intent"], ex["qty"]) == (
        "limit", D("1.02"), "sell", "sell_to_close", 2)
    order = conn.execute("SELECT order_type, limit_price FROM sim_orders").fetchone()
    assert (order["order_type"], order["limit_price"]) == ("limit", D("1.02"))
    assert recommendation(conn, rid)["status"] == "SUBMITTING"  # resting above the bid: re-priced toward it later


@pytest.mark.parametrize("state", ["HALTED", "REDUCING"])
def test_entry_limit_order_due_for_a_new_price_after_the_kill_switch_stops_entries_is_given_up_not_resent(
        world, conn, state):
    dispatcher, clock = world
    d = dispatcher(max_reprices=3)
    rid = add_recommendation(conn, "AAPL", NOW)
    d.drain()  # attempt 0 rests
    kill_switch.set_state(conn, ACCOUNT, state, "operator stop", "operator", NOW)
    clock.advance(timedelta(seconds=15))
    d.reprice_working()
    d.reprice_working()

    assert [(a[0], a[1], a[4]) for a in attempts(conn)] == [(0, "CANCELED", "GIVE_UP")]
    assert [o[1] for o in broker_orders(conn)] == ["canceled"]  # no new entry order went out
    rec = recommendation(conn, rid)
    assert (rec["status"], rec["outcome_code"]) == ("REJECTED", "ORDER_GIVEN_UP")
    assert position(conn)[0] == "CANCELLED"


def test_entry_replacement_left_by_a_crash_is_not_sent_once_the_account_is_halted_and_its_reservation_ends(
        world, conn):
    dispatcher, clock = world
    rid = die_after_canceling_for_a_new_price(dispatcher, clock, conn)
    kill_switch.set_state(conn, ACCOUNT, "HALTED", "operator stop", "operator", NOW)

    restarted = dispatcher(max_reprices=3, worker="w3")
    restarted.recover_in_flight()  # the poll sees the cancel
    restarted.reprice_working()
    restarted.reprice_working()

    assert [(a[0], a[1], a[4]) for a in attempts(conn)] == [(0, "CANCELED", "GIVE_UP")]
    assert len(broker_orders(conn)) == 1
    rec = recommendation(conn, rid)
    assert (rec["status"], rec["outcome_code"]) == ("REJECTED", "ORDER_GIVEN_UP")
    assert position(conn)[0] == "CANCELLED"


def test_exit_whose_position_changed_between_the_claim_and_taking_it_sells_nothing(world, conn, db_url):
    """Another worker's exit partly filled and ended between this claim's read of the position
    (2 contracts) and its take: the position is OPEN again with 1. Selling the 2 read would sell
    one contract not held; the take compares the version read and finds it moved."""
    import psycopg as pg

    dispatcher, clock = world
    d = dispatcher()
    rid = hold_two_calls_and_ask_to_exit(conn)
    quote = d.orders.quotes

    def quote_while_another_exit_ends(symbol, instrument, now):
        with pg.connect(db_url, autocommit=True) as other:
            other.execute("UPDATE active_positions SET qty = 1, version = version + 2 WHERE symbol = %s", (OCC,))
        return quote(symbol, instrument, now)

    d.orders.quotes = quote_while_another_exit_ends
    d.drain()

    assert conn.execute("SELECT count(*) AS n FROM sim_orders").fetchone()["n"] == 0
    assert recommendation(conn, rid)["status"] == "SKIPPED"

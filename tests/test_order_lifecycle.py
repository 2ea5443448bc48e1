"""An order's life after the submit: late fills, partial fills, cancels, exits, timeouts, live mode.

Each case here once went wrong: an exit filled after an "accepted" answer left its position
OPEN (so a second exit sold again, short); shares bought before a cancel were forgotten; a
timeout followed by a not-found lookup was recorded as "not placed" while the order landed.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from decimal import Decimal

from services.common.params import ParamsInForce, as_params
from services.adapters.postgres import kill_switch
from services.domain.broker import BrokerUnavailable, OrderRequest, client_order_id
from services.dispatcher.main import StaticParams
from services.adapters.sim.broker import SimBroker
from tests.broker_doubles import AcceptedFirst, TimesOutThenNotFound, Wrapping
from tests.factories import ACCOUNT, WORLD_NOW, add_market, add_recommendation, recommendation

NOW = WORLD_NOW


def positions(conn):
    return [(r["ticker"], r["status"], r["qty"]) for r in
            conn.execute("SELECT ticker, status, qty FROM active_positions ORDER BY id").fetchall()]


def sells(conn) -> int:
    return conn.execute("SELECT count(*)::int AS n FROM sim_orders WHERE side = 'sell'").fetchone()["n"]


def test_exit_filled_after_an_accepted_answer_closes_the_position_and_a_second_exit_sells_nothing(world, conn):
    dispatcher, clock = world
    d = dispatcher(AcceptedFirst)
    entry = add_recommendation(conn, "AAPL", NOW)
    d.drain()
    d.recover_in_flight()  # polls the accepted entry: filled
    assert positions(conn) == [("AAPL", "OPEN", Decimal("10"))]

    first_exit = add_recommendation(conn, "AAPL", NOW, action="EXIT")
    second_exit = add_recommendation(conn, "AAPL", NOW, action="EXIT")
    d.drain()
    assert recommendation(conn, first_exit)["outcome_code"] == "ORDER_ACCEPTED"
    assert (recommendation(conn, second_exit)["status"], recommendation(conn, second_exit)["outcome_code"]) == (
        "SKIPPED", "EXIT_IN_PROGRESS")
    assert positions(conn) == [("AAPL", "CLOSING", Decimal("10"))]

    d.recover_in_flight()  # the exit's fill arrives by the poll
    assert [p[1] for p in positions(conn)] == ["CLOSED"]
    assert recommendation(conn, first_exit)["outcome_code"] == "ORDER_FILLED"
    assert recommendation(conn, entry)["outcome_code"] == "ORDER_FILLED"
    assert sells(conn) == 1


def test_entry_partially_filled_then_canceled_keeps_the_shares_that_filled(world, conn):
    dispatcher, _ = world
    partial = lambda r: replace(r, status="canceled", filled_qty=Decimal(4))  # noqa: E731
    d = dispatcher(lambda b: AcceptedFirst(b, partial))
    rid = add_recommendation(conn, "AAPL", NOW)
    d.drain()
    d.recover_in_flight()
    assert positions(conn) == [("AAPL", "OPEN", Decimal("4"))]
    rec = recommendation(conn, rid)
    assert (rec["status"], rec["outcome_code"]) == ("EXECUTED", "ORDER_PARTIALLY_FILLED")


def test_entry_canceled_without_a_fill_releases_the_reservation_and_says_so(world, conn):
    dispatcher, _ = world
    d = dispatcher(lambda b: AcceptedFirst(b, lambda r: replace(r, status="canceled", filled_qty=Decimal(0))))
    rid = add_recommendation(conn, "AAPL", NOW)
    d.drain()
    assert recommendation(conn, rid)["outcome_code"] == "ORDER_ACCEPTED"
    d.recover_in_flight()
    assert positions(conn) == [("AAPL", "CANCELLED", Decimal("10"))]
    rec = recommendation(conn, rid)
    assert (rec["status"], rec["outcome_code"]) == ("REJECTED", "ORDER_CANCELED")


def test_timeout_then_not_found_stays_submitting_until_the_grace_period_has_passed(world, conn):
    dispatcher, clock = world
    d = dispatcher(TimesOutThenNotFound)
    rid = add_recommendation(conn, "AAPL", NOW)
    (outcome,) = d.drain()
    assert (outcome.status, outcome.code) == ("SUBMITTING", "ORDER_STATE_UNKNOWN")
    assert d.recover_in_flight() == 0  # the order may still land: the reservation holds
    assert positions(conn) == [("AAPL", "PENDING", Decimal("10"))]
    clock.advance(timedelta(minutes=3))
    assert d.recover_in_flight() == 1
    assert recommendation(conn, rid)["outcome_code"] == "ORDER_NOT_PLACED"
    assert positions(conn)[0][1] == "CANCELLED"


def test_reconciliation_never_loosens_an_operator_halt(world, conn):
    dispatcher, _ = world
    d = dispatcher()
    kill_switch.set_state(conn, ACCOUNT, "HALTED", "incident", "operator:carol", NOW)
    # An order placed by hand at the broker while halted.
    d.broker.submit_order(OrderRequest("manual-7", "AAPL", "AAPL", "STOCK", "buy", 1))
    assert d.reconcile_broker_orders() == 1
    assert kill_switch.read_state(conn, ACCOUNT)["state"] == "HALTED"


def test_live_broker_sends_nothing_once_the_params_in_force_turn_live_trading_off(world, conn):
    dispatcher, _ = world

    class LiveSim:
        paper = False

        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

    params = as_params({"live_trading_enabled": False})
    d = dispatcher(LiveSim, StaticParams(ParamsInForce(params, "test", "2", params.content_hash())))
    rid = add_recommendation(conn, "AAPL", NOW)
    d.drain()
    rec = recommendation(conn, rid)
    assert (rec["status"], rec["outcome_code"]) == ("SKIPPED", "LIVE_TRADING_DISABLED")
    assert conn.execute("SELECT count(*)::int AS n FROM sim_orders").fetchone()["n"] == 0
    assert client_order_id(ACCOUNT, rid)  # the id it would have used is still deterministic


def test_refresh_closes_a_position_the_broker_no_longer_holds_after_the_grace_period(world, conn):
    dispatcher, clock = world
    d = dispatcher()
    # An option bought yesterday expired overnight: our row is OPEN, the broker has nothing.
    conn.execute(
        """INSERT INTO active_positions (account_id, ticker, instrument, symbol, side, qty, multiplier, avg_price,
                                         status, opened_at)
           VALUES (%s, 'SPY', 'OPTION', 'SPY261127C00600000', 'long', 2, 100, 3.10, 'OPEN', %s)""",
        (ACCOUNT, NOW - timedelta(days=1)))
    d.refresh_account(force=True)
    assert positions(conn) == [("SPY", "CLOSED", Decimal("2"))]
    assert kill_switch.read_state(conn, ACCOUNT) is None  # nothing unknown at the broker


def test_refresh_stops_entries_when_the_broker_holds_a_position_we_do_not_know(world, conn):
    dispatcher, _ = world
    d = dispatcher()
    d.broker.submit_order(OrderRequest("by-hand-1", "AAPL", "AAPL", "STOCK", "buy", 3))
    d.refresh_account(force=True)
    state = kill_switch.read_state(conn, ACCOUNT)
    assert (state["state"], state["changed_by"]) == ("REDUCING", "reconciliation")
    assert state["reason"].startswith("UNKNOWN_BROKER_POSITION: the broker holds AAPL")


class OrdersListFails(Wrapping):
    """The broker answers everything but its order list, which keeps failing."""

    def __init__(self, inner: SimBroker):
        super().__init__(inner)
        self.failing = False

    def list_orders_since(self, since):
        if self.failing:
            raise BrokerUnavailable("GET /v2/orders: 503")
        return self.inner.list_orders_since(since)


def test_order_reconciliation_that_keeps_failing_ages_and_then_stops_entries(world, conn):
    dispatcher, clock = world
    d = dispatcher(OrdersListFails)  # reconciled once at NOW
    d.broker.failing = True
    params = d.params.current().params
    limit = params.risk.max_reconciliation_age_seconds

    clock.advance(timedelta(seconds=limit))
    add_market(conn, "AAPL", clock.now(), 200)
    within = add_recommendation(conn, "AAPL", clock.now())
    d.refresh_account(force=True)
    d.drain()
    assert recommendation(conn, within)["status"] == "EXECUTED"

    clock.advance(timedelta(seconds=1))
    add_market(conn, "MSFT", clock.now(), 300)
    past = add_recommendation(conn, "MSFT", clock.now())
    d.refresh_account(force=True)  # the account refreshes, the order list still fails
    d.drain()
    rec = recommendation(conn, past)
    assert (rec["status"], rec["outcome_code"]) == ("SKIPPED", "STALE_RECONCILIATION")
    gate = next(g for g in rec["gate_results"] if g["name"] == "broker_reconciliation")
    assert (gate["observed"], gate["limit"]) == (limit + 1, limit)


class CountsLookups(Wrapping):
    """Counts the broker lookups by client_order_id, across every wrapper that shares the list."""

    def __init__(self, inner: SimBroker, seen: list):
        super().__init__(inner)
        self.seen = seen

    def get_order_by_client_id(self, cid):
        self.seen.append(cid)
        return self.inner.get_order_by_client_id(cid)


def test_an_orphaned_order_is_looked_up_by_one_dispatcher_not_by_every_one(world, conn):
    dispatcher, clock = world
    crashed = dispatcher(TimesOutThenNotFound, worker="gone")
    rid = add_recommendation(conn, "AAPL", NOW)
    crashed.drain()  # left SUBMITTING by a worker that is gone
    seen: list[str] = []
    a = dispatcher(lambda b: CountsLookups(b, seen), worker="a")
    b = dispatcher(lambda b: CountsLookups(b, seen), worker="b")
    a.recover_in_flight()
    b.recover_in_flight()
    assert seen == [client_order_id(ACCOUNT, rid)]  # b left it to a
    clock.advance(timedelta(minutes=3))
    b.recover_in_flight()  # later, whoever comes first asks again
    assert seen == [client_order_id(ACCOUNT, rid)] * 2
    assert recommendation(conn, rid)["outcome_code"] == "ORDER_NOT_PLACED"

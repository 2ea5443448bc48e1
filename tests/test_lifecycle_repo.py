"""The lifecycle's one write path against real Postgres, and the races it closes.

Each interleaving here is engineered deterministically: a second dispatcher runs inside a hook
the first one reaches (a log line, a broker call), so the "meanwhile" happens at one exact point.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace
from datetime import timedelta
from decimal import Decimal

import psycopg
import pytest
from psycopg.rows import dict_row

from services.adapters.postgres import kill_switch
from services.domain.broker import OrderRequest, client_order_id
from services.adapters.sim.broker import SimBroker
from tests.broker_doubles import AcceptedFirst, Wrapping
from tests.broker_doubles import TimesOutThenNotFound as TimesOut
from tests.factories import ACCOUNT, WORLD_NOW, add_market, add_recommendation, et, recommendation

NOW = WORLD_NOW


def execution(conn, rec_id: int) -> dict:
    return conn.execute("SELECT * FROM dispatch_executions WHERE recommendation_id = %s", (rec_id,)).fetchone()


def position_of(conn, rec_id: int) -> dict:
    return conn.execute("SELECT * FROM active_positions WHERE recommendation_id = %s", (rec_id,)).fetchone()


# --- compare-and-set ----------------------------------------------------------------------------

@pytest.fixture
def accepted_entry(world, conn):
    """An entry the broker accepted (10 shares, nothing filled yet): execution ACCEPTED, position PENDING."""
    dispatcher, _ = world
    d = dispatcher(AcceptedFirst)
    rid = add_recommendation(conn, "AAPL", NOW)
    d.drain()
    assert (execution(conn, rid)["status"], position_of(conn, rid)["status"]) == ("ACCEPTED", "PENDING")
    return rid, client_order_id(ACCOUNT, rid)


def _wait_until_blocked(conn, pid: int) -> None:
    for _ in range(500):
        row = conn.execute("SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()
        if row and row["wait_event_type"] == "Lock":
            return
        time.sleep(0.005)
    raise AssertionError("the second connection never waited for the first")


def test_apply_event_on_two_connections_second_waits_and_applies_on_the_committed_state(accepted_entry, db_url, conn):
    from services.domain.lifecycle import Event
    from services.adapters.postgres.orders_repo import BrokerFacts, apply_event

    rid, cid = accepted_entry
    first = psycopg.connect(db_url, row_factory=dict_row)
    second = psycopg.connect(db_url, row_factory=dict_row)
    try:
        a = apply_event(first, ACCOUNT, cid, Event.report("partially_filled", Decimal(4)),
                        BrokerFacts(filled_avg_price=Decimal("200.10")), NOW)
        results = {}

        def late():  # the stream's "filled", loaded while the poll's partial fill is uncommitted
            results["b"] = apply_event(second, ACCOUNT, cid, Event.report("filled", Decimal(10)),
                                       BrokerFacts(filled_avg_price=Decimal("200.20")), NOW)
            second.commit()

        t = threading.Thread(target=late)
        t.start()
        _wait_until_blocked(conn, second.info.backend_pid)
        first.commit()
        t.join(5)
        assert not t.is_alive()
    finally:
        first.close()
        second.close()

    assert a.transition.execution == "PARTIALLY_FILLED"
    assert results["b"].transition.execution == "FILLED"
    ex = execution(conn, rid)
    # Both writes are there: the second built on the first (version 1 accepted, 2 partial, 3 filled).
    assert (ex["status"], ex["filled_qty"], ex["version"]) == ("FILLED", Decimal(10), 3)
    pos = position_of(conn, rid)
    assert (pos["status"], pos["qty"], pos["avg_price"]) == ("OPEN", Decimal(10), Decimal("200.20"))
    rec = recommendation(conn, rid)
    assert (rec["status"], rec["outcome_code"]) == ("EXECUTED", "ORDER_FILLED")


def test_apply_event_after_a_newer_commit_refuses_the_stale_answer(accepted_entry, db_url, conn):
    from services.domain.lifecycle import Event, Illegal
    from services.adapters.postgres.orders_repo import BrokerFacts, apply_event

    rid, cid = accepted_entry
    with psycopg.connect(db_url, row_factory=dict_row) as first:
        apply_event(first, ACCOUNT, cid, Event.report("partially_filled", Decimal(6)),
                    BrokerFacts(filled_avg_price=Decimal(200)), NOW)
    with psycopg.connect(db_url, row_factory=dict_row) as second:  # a poll answer older than that fill
        stale = apply_event(second, ACCOUNT, cid, Event.report("accepted", Decimal(0)), BrokerFacts(), NOW)
    assert isinstance(stale, Illegal)
    ex = execution(conn, rid)
    assert (ex["status"], ex["filled_qty"], ex["version"]) == ("PARTIALLY_FILLED", Decimal(6), 2)


def test_stale_poll_answer_after_the_stream_fill_does_not_undo_the_fill(world, accepted_entry, conn):
    dispatcher, _ = world
    rid, cid = accepted_entry
    d = dispatcher()
    at_broker = d.broker.get_order_by_client_id(cid)  # the sim filled it: 10 shares
    d.record_broker_answer(cid, at_broker)  # the stream's fill
    stale = replace(at_broker, status="accepted", filled_qty=Decimal(0), filled_avg_price=None, filled_at=None)
    assert d.record_broker_answer(cid, stale) == "EXECUTED"  # a poll answer taken before the fill
    ex = execution(conn, rid)
    assert (ex["status"], ex["filled_qty"], ex["filled_avg_price"]) == (
        "FILLED", Decimal(10), at_broker.filled_avg_price)
    pos = position_of(conn, rid)
    assert (pos["status"], pos["qty"]) == ("OPEN", Decimal(10))
    rec = recommendation(conn, rid)
    assert (rec["status"], rec["outcome_code"]) == ("EXECUTED", "ORDER_FILLED")


class BumpsVersionAfterLoad:
    """A connection on which the order's row changes right after apply_event loaded it."""

    def __init__(self, conn, load_sql: str):
        self.conn, self.load_sql = conn, load_sql

    def execute(self, query, params=None):
        cur = self.conn.execute(query, params)
        if query == self.load_sql:  # the result is already fetched; then another write lands
            self.conn.execute("UPDATE dispatch_executions SET version = version + 1 WHERE client_order_id = %s",
                              (params["client_order_id"],))
        return cur


def test_apply_event_raises_conflict_when_the_execution_changed_after_it_was_loaded(accepted_entry, db_url, conn):
    from services.adapters.postgres import orders_repo
    from services.domain.lifecycle import Event

    rid, cid = accepted_entry
    with psycopg.connect(db_url, row_factory=dict_row) as c:
        with pytest.raises(orders_repo.Conflict):
            orders_repo.apply_event(BumpsVersionAfterLoad(c, orders_repo.LOAD_ORDER), ACCOUNT, cid,
                                    Event.report("filled", Decimal(10)),
                                    orders_repo.BrokerFacts(filled_avg_price=Decimal("200.00")), NOW)
        c.rollback()
    assert (execution(conn, rid)["status"], position_of(conn, rid)["status"]) == ("ACCEPTED", "PENDING")
    assert recommendation(conn, rid)["status"] == "SUBMITTING"


def test_update_execution_with_a_stale_version_changes_nothing(accepted_entry, conn):
    from services.adapters.postgres import orders_repo

    rid, _ = accepted_entry
    ex = execution(conn, rid)
    args = {"id": ex["id"], "expected": "ACCEPTED", "status": "FILLED", "broker_order_id": None, "filled_qty": 10,
            "filled_avg_price": None, "message": None, "filled_at": None, "now": NOW}
    assert conn.execute(orders_repo.UPDATE_EXECUTION, {**args, "version": ex["version"] - 1}).rowcount == 0
    assert conn.execute(orders_repo.UPDATE_EXECUTION, {**args, "expected": "SUBMITTING",
                                                       "version": ex["version"]}).rowcount == 0
    assert execution(conn, rid)["status"] == "ACCEPTED"


# --- positions by id ----------------------------------------------------------------------------

def test_repeated_fill_of_an_old_exit_does_not_close_todays_position_in_the_same_ticker(world, conn):
    dispatcher, clock = world
    day1 = et("2026-11-25", "10:00")
    clock.set(day1)
    add_market(conn, "AAPL", day1, 190)
    d = dispatcher()
    first_entry = add_recommendation(conn, "AAPL", day1)
    first_exit = add_recommendation(conn, "AAPL", day1, action="EXIT")
    d.drain()
    p1_before = position_of(conn, first_entry)
    assert p1_before["status"] == "CLOSED"
    exit_cid = client_order_id(ACCOUNT, first_exit)
    exit_fill = d.broker.get_order_by_client_id(exit_cid)

    clock.set(NOW)
    d.refresh_account(force=True)
    entry = add_recommendation(conn, "AAPL", NOW)
    d.drain()
    assert position_of(conn, entry)["status"] == "OPEN"

    # The old exit's fill arrives again (a stream redelivery, a late poll): it closed its own
    # position days ago and must not close today's.
    d.record_broker_answer(exit_cid, exit_fill)
    p2 = position_of(conn, entry)
    assert (p2["status"], p2["qty"], p2["realized_pnl"]) == ("OPEN", Decimal(10), None)

    # Today's exit closes today's position, and only it.
    exit_today = add_recommendation(conn, "AAPL", NOW, action="EXIT")
    d.drain()
    assert recommendation(conn, exit_today)["outcome_code"] == "ORDER_FILLED"
    assert position_of(conn, entry)["status"] == "CLOSED"
    p1 = position_of(conn, first_entry)
    assert {k: p1[k] for k in ("status", "closed_at", "close_price", "realized_pnl", "qty")} == {
        k: p1_before[k] for k in ("status", "closed_at", "close_price", "realized_pnl", "qty")}


# --- failure marking ----------------------------------------------------------------------------

class ExplodesWhenArmed:
    """A broker whose `paper` flag raises once armed: a bug inside the decision, after the claim."""

    def __init__(self, inner: SimBroker):
        self.inner, self.armed = inner, False

    @property
    def paper(self):
        if self.armed:
            raise RuntimeError("flag lookup failed")
        return True

    def __getattr__(self, name):
        return getattr(self.inner, name)


class RunOnce(logging.Handler):
    """Runs `action` the first time `message` is logged: the exact moment of an interleaving."""

    def __init__(self, message: str, action):
        super().__init__(logging.DEBUG)
        self.message, self.action, self.fired = message, action, False

    def emit(self, record):
        if record.getMessage() == self.message and not self.fired:
            self.fired = True
            self.action()


def test_decision_error_on_a_row_another_worker_claimed_meanwhile_leaves_that_workers_order_intact(world, conn):
    dispatcher, _ = world
    a = dispatcher(ExplodesWhenArmed, worker="worker-a")
    b = dispatcher(TimesOut, worker="worker-b")
    rid = add_recommendation(conn, "AAPL", NOW)
    a.broker.armed = True
    # A's decision fails and its claim rolls back; before A records the failure, B claims the
    # row, commits its intent and is left SUBMITTING by a timeout.
    b_outcomes = []
    hook = RunOnce("decision failed", lambda: b_outcomes.append(b.process_next()))
    logger = logging.getLogger("dispatcher")
    logger.addHandler(hook)
    try:
        a_outcome = a.process_next()
    finally:
        logger.removeHandler(hook)
    assert [(o.recommendation_id, o.status) for o in b_outcomes] == [(rid, "SUBMITTING")]
    assert (a_outcome.recommendation_id, a_outcome.status, a_outcome.code) == (
        rid, "PENDING", "DECISION_ERROR_NOT_RECORDED")

    rec = recommendation(conn, rid)
    assert (rec["status"], rec["claimed_by"], rec["outcome_code"]) == ("SUBMITTING", "worker-b", "ORDER_SUBMITTING")
    assert execution(conn, rid)["status"] == "SUBMITTING"
    pos = position_of(conn, rid)
    assert (pos["status"], pos["qty"]) == ("PENDING", Decimal(10))


def test_fail_pending_fails_only_a_pending_row_no_one_holds(world, conn, db_url):
    from services.adapters.postgres import orders_repo

    dispatcher, _ = world
    b = dispatcher(TimesOut, worker="worker-b")
    submitting = add_recommendation(conn, "AAPL", NOW)
    b.drain()
    assert not orders_repo.fail_pending(conn, ACCOUNT, submitting, "DECISION_ERROR", "x", NOW, "worker-a")
    assert recommendation(conn, submitting)["status"] == "SUBMITTING"

    held = add_recommendation(conn, "AAPL", NOW)
    with psycopg.connect(db_url) as other:
        other.execute("SELECT id FROM dispatch_recommendations WHERE id = %s FOR UPDATE", (held,))
        assert not orders_repo.fail_pending(conn, ACCOUNT, held, "DECISION_ERROR", "x", NOW, "worker-a")
    assert recommendation(conn, held)["status"] == "PENDING"

    assert orders_repo.fail_pending(conn, ACCOUNT, held, "DECISION_ERROR", "boom", NOW, "worker-a")
    rec = recommendation(conn, held)
    assert (rec["status"], rec["outcome_code"], rec["outcome_detail"]) == ("FAILED", "DECISION_ERROR", "boom")


# --- reconciliation against a snapshot older than local activity --------------------------------

class SnapshotThen(Wrapping):
    """A broker whose positions snapshot is taken, then `hook` runs before the caller uses it."""

    def __init__(self, inner: SimBroker):
        super().__init__(inner)
        self.hook = None

    def get_positions(self):
        snapshot = self.inner.get_positions()
        hook, self.hook = self.hook, None
        if hook is not None:
            hook()
        return snapshot


@pytest.fixture
def exit_between_snapshot_and_write(world, conn):
    dispatcher, clock = world
    a = dispatcher(SnapshotThen, worker="worker-a")
    entry = add_recommendation(conn, "AAPL", NOW)
    a.drain()
    assert position_of(conn, entry)["status"] == "OPEN"
    clock.advance(timedelta(minutes=1))
    # B has just refreshed: only A's reconciliation judges the account here.
    b = dispatcher(worker="worker-b")
    exit_rec = add_recommendation(conn, "AAPL", clock.now(), action="EXIT")
    # A's snapshot still shows AAPL; B's exit fills and closes it before A compares.
    a.broker.hook = b.drain
    return a, entry, exit_rec


def test_exit_recorded_after_the_snapshot_does_not_make_the_position_unknown(exit_between_snapshot_and_write, conn):
    a, entry, exit_rec = exit_between_snapshot_and_write
    a.refresh_account(force=True)
    assert recommendation(conn, exit_rec)["outcome_code"] == "ORDER_FILLED"
    assert position_of(conn, entry)["status"] == "CLOSED"
    assert kill_switch.read_state(conn, ACCOUNT) is None
    # The next snapshot, taken after the exit, agrees with the database.
    a.refresh_account(force=True)
    assert kill_switch.read_state(conn, ACCOUNT) is None


def test_symbol_really_unknown_still_restricts_the_account_beside_a_recent_exit(exit_between_snapshot_and_write,
                                                                               conn):
    a, _, _ = exit_between_snapshot_and_write
    add_market(conn, "MSFT", a.clock.now(), 100)
    a.broker.inner.submit_order(OrderRequest("by-hand-1", "MSFT", "MSFT", "STOCK", "buy", 3))
    a.refresh_account(force=True)
    state = kill_switch.read_state(conn, ACCOUNT)
    assert (state["state"], state["changed_by"]) == ("REDUCING", "reconciliation")
    assert state["reason"] == "UNKNOWN_BROKER_POSITION: the broker holds MSFT, which this database does not"


# --- a row the driver cannot load -------------------------------------------------------------

@pytest.mark.parametrize("bad_created_at", ["-infinity", "infinity"])
def test_undecodable_recommendation_is_failed_and_the_queue_behind_it_is_decided(world, conn, bad_created_at):
    dispatcher, _ = world
    d = dispatcher()
    bad = conn.execute(
        """INSERT INTO dispatch_recommendations (account_id, ticker, action, instrument, strategy, confidence, created_at)
           VALUES (%s, 'AAPL', 'BUY', 'STOCK', 'day_trade', 0.8, %s::timestamptz) RETURNING id""",
        (ACCOUNT, bad_created_at)).fetchone()["id"]
    good = [add_recommendation(conn, "AAPL", NOW) for _ in range(3)]
    outcomes = d.drain(limit=10)
    statuses = {r["id"]: (r["status"], r["outcome_code"]) for r in conn.execute(
        "SELECT id, status, outcome_code FROM dispatch_recommendations").fetchall()}
    assert statuses[bad] == ("FAILED", "UNLOADABLE_RECOMMENDATION")
    assert all(statuses[g][0] in ("EXECUTED", "SKIPPED", "REJECTED", "FAILED") for g in good)
    assert statuses[good[0]] == ("EXECUTED", "ORDER_FILLED")
    assert sorted(o.recommendation_id for o in outcomes) == sorted([bad, *good])


# --- the option chain is fetched with no claim held ---------------------------------------------

def test_option_chain_is_fetched_outside_the_claim_and_only_for_the_strategys_window(world, conn, db_url):
    from services.adapters.option_data import OptionData
    from services.adapters.sim.market import SimOptionMarket

    dispatcher, _ = world
    calls = []
    market = {}
    rid = add_recommendation(conn, "AAPL", NOW, instrument="OPTION", strategy="day_trade")

    def chain_source(ticker, spot, now, window=None):
        with psycopg.connect(db_url, row_factory=dict_row) as other:
            try:
                other.execute("SELECT id FROM dispatch_recommendations WHERE id = %s FOR UPDATE NOWAIT", (rid,))
                row_free = True
            except psycopg.errors.LockNotAvailable:
                row_free = False
            other.rollback()
            open_tx = other.execute(
                """SELECT count(*)::int AS n FROM pg_stat_activity
                   WHERE datname = current_database() AND pid <> pg_backend_pid()
                     AND state LIKE 'idle in transaction%%'""").fetchone()["n"]
        calls.append({"ticker": ticker, "row_free": row_free, "open_transactions": open_tx, "window": window})
        sim = market["sim"]
        return sim.chain(ticker, spot, now) if window is None else sim.chain(ticker, spot, now, window)

    d = dispatcher(option_data=OptionData(chain_source))
    market["sim"] = SimOptionMarket(d.pool)
    d.drain()

    assert calls, "the chain source was never asked"
    today = NOW.date()
    for call in calls:
        assert (call["ticker"], call["row_free"], call["open_transactions"]) == ("AAPL", True, 0)
        first, last = call["window"]
        # day_trade: 1..7 trading days out; the window may be wider in calendar days, never open-ended.
        assert today + timedelta(days=1) <= first <= today + timedelta(days=7)
        assert today + timedelta(days=7) <= last <= today + timedelta(days=31)
    rec = recommendation(conn, rid)
    assert rec["status"] != "PENDING" and rec["outcome_code"] != "DECISION_ERROR"


# --- an error that is not the database's, after the intent's commit -----------------------------

class SendsThenRaises(Wrapping):
    """The first order reaches the broker, then a bug on our side loses the answer."""

    def __init__(self, inner: SimBroker):
        super().__init__(inner)
        self.raised = False

    def submit_order(self, order):
        result = self.inner.submit_order(order)
        if not self.raised:
            self.raised = True
            raise RuntimeError("answer lost after the send")
        return result


def test_plain_exception_after_the_intent_leaves_it_submitting_and_recovery_resolves_it(world, conn):
    dispatcher, _ = world
    d = dispatcher(SendsThenRaises)
    add_market(conn, "MSFT", NOW, 100)
    lost = add_recommendation(conn, "AAPL", NOW)
    nxt = add_recommendation(conn, "MSFT", NOW + timedelta(seconds=1))
    outcomes = d.drain()

    assert [(o.recommendation_id, o.status) for o in outcomes] == [(lost, "SUBMITTING"), (nxt, "EXECUTED")]
    rec = recommendation(conn, lost)
    assert rec["status"] == "SUBMITTING"
    assert rec["outcome_detail"] == "SUBMIT_ERROR: RuntimeError: answer lost after the send"
    assert (execution(conn, lost)["status"], position_of(conn, lost)["status"]) == ("SUBMITTING", "PENDING")
    assert position_of(conn, nxt)["status"] == "OPEN"

    assert d.recover_in_flight() == 1
    rec = recommendation(conn, lost)
    assert (rec["status"], rec["outcome_code"]) == ("EXECUTED", "ORDER_FILLED")
    pos = position_of(conn, lost)
    assert (pos["status"], pos["qty"]) == ("OPEN", Decimal(10))


def test_a_fill_reported_without_its_price_is_refused_and_the_next_report_with_it_applies(accepted_entry, conn):
    from services.adapters.postgres.orders_repo import BrokerFacts, apply_event
    from services.domain.lifecycle import Event, Illegal

    rid, cid = accepted_entry
    refused = apply_event(conn, ACCOUNT, cid, Event.report("filled", Decimal(10)), BrokerFacts(), NOW)
    assert isinstance(refused, Illegal) and refused.code == "NO_FILL_PRICE"
    ex = conn.execute("SELECT status, filled_qty FROM dispatch_executions WHERE client_order_id = %s", (cid,)).fetchone()
    assert (ex["status"], ex["filled_qty"]) == ("ACCEPTED", None)

    applied = apply_event(conn, ACCOUNT, cid, Event.report("filled", Decimal(10)),
                          BrokerFacts(filled_avg_price=Decimal("200.30")), NOW)
    assert applied.transition.execution == "FILLED"
    pos = conn.execute("SELECT status, avg_price FROM active_positions").fetchone()
    assert (pos["status"], pos["avg_price"]) == ("OPEN", Decimal("200.30"))

"""The alerts raised by the trading path itself: kill switch, reconciliation, broker answers and
outages, loop failures; and a hanging sink that does not slow a decision."""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from datetime import timedelta
from decimal import Decimal

import psycopg
import pytest

from services.adapters import alerts
from services.adapters.alerts import Alerter, WebhookSink
from services.adapters.postgres import kill_switch
from services.dispatcher.main import Dispatcher
from services.domain.broker import BrokerRejected, BrokerUnavailable, OrderRequest, client_order_id
from services.runtime import run_periodic
from tests.alert_doubles import installed, webhook  # noqa: F401
from tests.broker_doubles import Wrapping
from tests.factories import ACCOUNT, WORLD_NOW, add_recommendation, recommendation

NOW = WORLD_NOW


class Rejects(Wrapping):
    def submit_order(self, order):
        raise BrokerRejected("insufficient buying power")


class Unreachable(Wrapping):
    def get_account(self):
        raise BrokerUnavailable("GET /v2/account: connection timed out")


def received(a: Alerter, hook) -> list[tuple[str, str]]:
    assert a.flush(5)
    return [(b["alert"]["event"], b["alert"]["subject"]) for b in hook.bodies]


def test_kill_switch_halt_resume_and_trip_each_alert_with_the_reason(conn, webhook):
    with installed(Alerter([WebhookSink(webhook.url)], dedupe_seconds=0)) as a:
        kill_switch.set_state(conn, ACCOUNT, "HALTED", "operator: investigating", "ops@desk", NOW)
        kill_switch.set_state(conn, ACCOUNT, "ACTIVE", "operator: resolved", "ops@desk", NOW)
        kill_switch.trip_daily_loss(conn, ACCOUNT, "DAILY_LOSS_LIMIT: pnl=-510.00 limit=500.00", NOW, NOW.date())
        assert received(a, webhook) == [("HALT", ACCOUNT), ("RESUME", ACCOUNT), ("KILL_SWITCH_TRIP", ACCOUNT)]
    trip = webhook.bodies[2]["alert"]["fields"]
    assert (trip["from_state"], trip["state"], trip["changed_by"]) == ("ACTIVE", "REDUCING", "daily-loss-limit")
    assert trip["reason"] == "DAILY_LOSS_LIMIT: pnl=-510.00 limit=500.00"


def test_a_trip_rolled_back_is_never_alerted_and_a_committed_one_only_after_its_commit(conn, webhook):
    reason = "DAILY_LOSS_LIMIT: pnl=-510.00 limit=500.00"
    with installed(Alerter([WebhookSink(webhook.url)], dedupe_seconds=0)) as a:
        with pytest.raises(RuntimeError):
            with alerts.held_until_commit(), conn.transaction():
                assert kill_switch.trip_daily_loss(conn, ACCOUNT, reason, NOW, NOW.date())
                raise RuntimeError("the refresh failed after the trip")
        assert received(a, webhook) == []
        assert conn.execute("SELECT count(*) AS n FROM kill_switch WHERE state <> 'ACTIVE'").fetchone()["n"] == 0
        with alerts.held_until_commit(), conn.transaction():
            assert kill_switch.trip_daily_loss(conn, ACCOUNT, reason, NOW, NOW.date())
            assert received(a, webhook) == []  # the transaction is still open
        assert received(a, webhook) == [("KILL_SWITCH_TRIP", ACCOUNT)]


class LosingDay(Wrapping):
    def get_account(self):
        return replace(self.inner.get_account(), equity=Decimal("99400"), last_equity=Decimal("100000"))


def test_a_refresh_whose_transaction_fails_after_the_trip_alerts_nothing(world, conn, webhook, monkeypatch):
    dispatcher, _ = world
    d = dispatcher(LosingDay, refresh=False)

    def flatten_fails(*args, **kwargs):
        raise psycopg.OperationalError("connection lost while writing the exits")

    monkeypatch.setattr(kill_switch.exits_repo, "flatten", flatten_fails)
    with installed(Alerter([WebhookSink(webhook.url)], dedupe_seconds=0)) as a:
        with pytest.raises(psycopg.OperationalError):
            d.refresh_account(force=True)
        assert ("KILL_SWITCH_TRIP", ACCOUNT) not in received(a, webhook)
    # The trip itself rolled back with its transaction: no kill-switch row was ever committed.
    assert conn.execute("SELECT state FROM kill_switch WHERE account_id = %s", (ACCOUNT,)).fetchone() is None


def test_alerts_held_by_an_inner_block_wait_for_the_outer_one(webhook):
    with installed(Alerter([WebhookSink(webhook.url)], dedupe_seconds=0)) as a:
        with pytest.raises(RuntimeError):
            with alerts.held_until_commit():
                with alerts.held_until_commit():
                    alerts.emit(alerts.Event.UNKNOWN_BROKER_ORDER, ACCOUNT, orders=[])
                assert received(a, webhook) == []
                raise RuntimeError("the outer transaction rolled back")
        with alerts.held_until_commit():
            with alerts.held_until_commit():
                alerts.emit(alerts.Event.UNKNOWN_BROKER_ORDER, ACCOUNT, orders=[])
        assert received(a, webhook) == [("UNKNOWN_BROKER_ORDER", ACCOUNT)]


def test_an_order_and_a_position_unknown_to_the_database_each_alert(world, webhook):
    dispatcher, _ = world
    d = dispatcher(refresh=False)
    d.broker.submit_order(OrderRequest("by-hand-1", "AAPL", "AAPL", "STOCK", "buy", 3))
    with installed(Alerter([WebhookSink(webhook.url)])) as a:
        d.refresh_account(force=True)
        events = received(a, webhook)
    assert sorted(events) == [("KILL_SWITCH_TRIP", ACCOUNT), ("UNKNOWN_BROKER_ORDER", ACCOUNT),
                              ("UNKNOWN_BROKER_POSITION", ACCOUNT)]
    by_event = {b["alert"]["event"]: b["alert"]["fields"] for b in webhook.bodies}
    assert by_event["UNKNOWN_BROKER_POSITION"] == {"symbols": ["AAPL"]}
    (order,) = by_event["UNKNOWN_BROKER_ORDER"]["orders"]
    assert (order["client_order_id"], order["symbol"], order["side"]) == ("by-hand-1", "AAPL", "buy")


def test_an_order_rejected_by_the_broker_alerts_with_its_message(world, conn, webhook):
    dispatcher, _ = world
    d = dispatcher(Rejects, refresh=False)
    d.refresh_account(force=True)
    rid = add_recommendation(conn, "AAPL", NOW)
    with installed(Alerter([WebhookSink(webhook.url)])) as a:
        d.drain()
        assert received(a, webhook) == [("ORDER_REJECTED", ACCOUNT)]
    assert recommendation(conn, rid)["status"] == "REJECTED"
    fields = webhook.bodies[0]["alert"]["fields"]
    assert fields == {"client_order_id": client_order_id(ACCOUNT, rid), "message": "insufficient buying power"}


def test_broker_unreachable_for_longer_than_the_threshold_alerts_once(world, webhook):
    dispatcher, clock = world
    d = dispatcher(Unreachable, refresh=False)
    with installed(Alerter([WebhookSink(webhook.url)], broker_down_seconds=120, clock=clock)) as a:
        for _ in range(6):                          # every 30 s for 2.5 minutes
            d.refresh_account(force=True)
            clock.advance(timedelta(seconds=30))
        assert received(a, webhook) == [("BROKER_UNAVAILABLE", ACCOUNT)]
    assert webhook.bodies[0]["alert"]["fields"]["down_seconds"] == 120


def test_a_periodic_loop_failing_repeatedly_alerts_once_at_the_threshold(db_url, webhook):
    stop = threading.Event()
    calls = []

    def cycle(conn):
        calls.append(1)
        if len(calls) == 5:
            stop.set()
        raise psycopg.OperationalError("server closed the connection unexpectedly")

    with installed(Alerter([WebhookSink(webhook.url)], loop_failures=3)) as a:
        run_periodic("feature-computer", db_url, cycle, interval=0, stop=stop)
        assert received(a, webhook) == [("LOOP_FAILURES", "feature-computer")]
    assert webhook.bodies[0]["alert"]["fields"]["consecutive"] == 3


def _timed_rejected_decision(d: Dispatcher, conn) -> float:
    # A rejected order frees its ticker at once (no trade counted, no position), so one ticker serves.
    add_recommendation(conn, "AAPL", NOW)
    started = time.perf_counter()
    (outcome,) = d.drain()
    elapsed = time.perf_counter() - started
    assert outcome.code == "BROKER_REJECTED"
    return elapsed


def test_a_sink_that_hangs_does_not_delay_a_decision(world, conn, webhook):
    dispatcher, _ = world
    d = dispatcher(Rejects, refresh=False)
    d.refresh_account(force=True)
    _timed_rejected_decision(d, conn)        # first decision pays imports and caches
    with installed(Alerter([])):
        baseline = min(_timed_rejected_decision(d, conn) for _ in range(3))

    webhook.hang()                                   # every request blocks until released (30 s or more)
    # No dedupe: every decision queues its alert behind the stuck one.
    with installed(Alerter([WebhookSink(webhook.url, timeout=60)], dedupe_seconds=0)) as a:
        hanging = [_timed_rejected_decision(d, conn) for _ in range(3)]
        assert webhook.entered.wait(5)               # the sink really is stuck inside a request
        assert a.stats()["webhook"]["delivered"] == 0
        webhook.release.set()
        assert a.flush(5)
    assert max(hanging) < baseline + 0.25, (baseline, hanging)

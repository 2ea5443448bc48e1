"""The dispatcher end to end on a real Postgres and the simulated paper broker.

Each test builds its rows with tests/factories.py, runs the real Dispatcher (claim, gather,
gates, sizing, submit, record) and asserts on what the database holds afterwards: statuses,
outcome codes, every gate result (name, passed, code, observed, limit), executions, positions,
kill-switch state and history. Invariants of DESIGN.md pinned here: 1 (one account key),
2 (ET days), 4 (exposure with the multiplier and the proposed order), 5 (fail closed),
6 (exactly once), 8 (kill switch in Postgres), 10 (every gate result stored).
"""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import freezegun
import pytest
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from services.common.clock import FixedClock
from services.adapters.postgres import claims
from services.common.db import connect, make_pool, round_trip_counting
from services.common.market_calendar import CalendarUnavailable, SessionCalendar
from services.common.params import ParamsInForce, as_params, load_params_file
from services.domain.broker import (
    BrokerRejected,
    BrokerUnavailable,
    OrderRequest,
    client_order_id,
)
from services.domain.decision import OptionInputs
from services.dispatcher import main as dispatcher_main
from services.dispatcher.main import Dispatcher, StaticParams
from services.dispatcher.reconciliation import IN_FLIGHT_GRACE
from services.adapters.sim.broker import SimBroker
from tests.factories import (
    ACCOUNT,
    add_bar,
    add_features,
    add_market,
    add_recommendation,
    et,
    recommendation,
    set_account_state,
    wait_until,
)

REPO = Path(__file__).resolve().parents[1]
NOW = et("2026-11-30", "10:00")  # a Monday session, 25 minutes after the opening block ends
GATE_NAMES = {
    "kill_switch", "action_allowed", "instrument_allowed", "confidence", "recommendation_age",
    "bar_freshness", "asset", "feature_freshness", "trading_hours", "daily_loss", "broker_reconciliation",
    "ticker_trades_today",
    "ticker_cooldown", "open_position", "max_positions", "max_exposure",
}


# --- harness -------------------------------------------------------------------------------------


# The limits these tests are written against, pinned so that a review of the defaults file
# does not silently change what a test proves.
PINNED = {
    "max_daily_loss": 500, "max_open_positions": 5, "max_notional_exposure": 10_000,
    "max_notional_per_trade": 2_000, "max_equity_pct_per_trade": 0.05, "max_trades_per_ticker_per_day": 2,
    "ticker_cooldown_minutes": 30, "max_bar_age_seconds": 180, "max_feature_age_seconds": 300,
    "max_recommendation_age_seconds": 300, "max_account_state_age_seconds": 600, "max_clock_skew_seconds": 5,
    "block_after_open_minutes": 5, "block_before_close_minutes": 15, "min_confidence_day_trade": 0.6,
}


def params_in_force(overrides: dict[str, Any] | None = None, *, reviewed_file: bool = False) -> StaticParams:
    """The reviewed defaults file as it is, or the pinned limits plus overrides (recorded as source "test")."""
    if reviewed_file:
        return StaticParams(load_params_file())
    params = as_params({**PINNED, **(overrides or {})})
    return StaticParams(ParamsInForce(params, "test", "1", params.content_hash()))


class Harness:
    """Pools, a fixed clock, the simulated broker and dispatchers over one test database."""

    def __init__(self, db_url: str, now: datetime, overrides: dict[str, Any] | None = None,
                 reviewed_file: bool = False):
        self.db_url = db_url
        self.clock = FixedClock(now)
        self.params = params_in_force(overrides, reviewed_file=reviewed_file)
        self._pools: list = []
        self.pool = self.new_pool()
        self.broker = SimBroker(self.pool, ACCOUNT, self.clock)

    def new_pool(self, **kwargs):
        pool = make_pool(self.db_url, **kwargs)
        self._pools.append(pool)
        return pool

    def dispatcher(self, broker=None, *, pool=None, **kwargs) -> Dispatcher:
        return Dispatcher(pool or self.pool, broker or self.broker, self.params, ACCOUNT, clock=self.clock, **kwargs)

    def close(self) -> None:
        for pool in self._pools:
            pool.close()


@pytest.fixture
def harness(db_url):
    made: list[Harness] = []

    def make(now: datetime = NOW, overrides: dict[str, Any] | None = None, reviewed_file: bool = False) -> Harness:
        h = Harness(db_url, now, overrides, reviewed_file)
        made.append(h)
        return h

    yield make
    for h in made:
        h.close()


class PassThroughBroker:
    """The simulated broker behind a seam where a test injects a fault; counts submissions."""

    paper = True

    def __init__(self, inner: SimBroker):
        self.inner = inner
        self.submits = 0

    def submit_order(self, order: OrderRequest):
        self.submits += 1
        return self.inner.submit_order(order)

    def get_order_by_client_id(self, cid: str):
        return self.inner.get_order_by_client_id(cid)

    def get_account(self):
        return self.inner.get_account()

    def get_positions(self):
        return self.inner.get_positions()

    def list_orders_since(self, since):
        return self.inner.list_orders_since(since)

    def get_asset(self, symbol: str):
        return self.inner.get_asset(symbol)


class SimulatedCrash(BaseException):
    """The process dies at this point: nothing after it runs (not an Exception, so nothing catches it)."""


class CrashAfterBrokerAccepted(PassThroughBroker):
    def submit_order(self, order):
        super().submit_order(order)
        raise SimulatedCrash("killed after the broker accepted the order")


class CrashBeforeBrokerGotOrder(PassThroughBroker):
    def submit_order(self, order):
        self.submits += 1
        raise SimulatedCrash("killed before the order left")


class TimeoutAfterAccepted(PassThroughBroker):
    """An HTTP 504 after the broker accepted the order (alpaca-py's retry path)."""

    def submit_order(self, order):
        super().submit_order(order)
        raise BrokerUnavailable("HTTP 504 Gateway Timeout")


class RejectingBroker(PassThroughBroker):
    """Refuses orders for one symbol, fills the others."""

    def __init__(self, inner: SimBroker, symbol: str):
        super().__init__(inner)
        self.symbol = symbol

    def submit_order(self, order):
        if order.symbol != self.symbol:
            return super().submit_order(order)
        self.submits += 1
        raise BrokerRejected("insufficient buying power")


class AccountUnavailableBroker(PassThroughBroker):
    def get_account(self):
        raise BrokerUnavailable("GET /v2/account: connection timed out")

    def get_positions(self):
        raise BrokerUnavailable("GET /v2/positions: connection timed out")


class BrokenCalendar(SessionCalendar):
    """A calendar that cannot answer: every lookup raises CalendarUnavailable."""

    def __init__(self):
        pass

    def session_on(self, day):
        raise CalendarUnavailable("calendar source unreachable")

    def session_at(self, now):
        raise CalendarUnavailable("calendar source unreachable")


def gate(rec: dict, name: str) -> dict:
    matches = [g for g in rec["gate_results"] if g["name"] == name]
    assert len(matches) == 1, f"gate {name} recorded {len(matches)} times: {rec['gate_results']}"
    return matches[0]


def add_position(conn, ticker: str, qty, avg_price, *, instrument: str = "STOCK", symbol: str | None = None,
                 status: str = "OPEN", opened_at: datetime = NOW, account: str = ACCOUNT) -> int:
    multiplier = 100 if instrument == "OPTION" else 1
    return conn.execute(
        """INSERT INTO active_positions (account_id, ticker, instrument, symbol, side, qty, multiplier, avg_price,
                                         status, opened_at)
           VALUES (%s, %s, %s, %s, 'long', %s, %s, %s, %s, %s) RETURNING id""",
        (account, ticker, instrument, symbol or ticker, Decimal(str(qty)), multiplier, Decimal(str(avg_price)),
         status, opened_at),
    ).fetchone()["id"]


def add_execution(conn, ticker: str, submitted_at: datetime, *, status: str = "FILLED") -> int:
    """A past trade in a ticker (with the recommendation it came from), as the dispatcher records one."""
    rid = add_recommendation(conn, ticker, submitted_at)
    conn.execute("UPDATE dispatch_recommendations SET status = 'EXECUTED' WHERE id = %s", (rid,))
    conn.execute(
        """INSERT INTO dispatch_executions (account_id, recommendation_id, client_order_id, ticker, instrument, symbol,
                                            side, qty, est_price, status, submitted_at, updated_at, role)
           VALUES (%s, %s, %s, %s, 'STOCK', %s, 'buy', 1, 100, %s, %s, %s, 'ENTRY')""",
        (ACCOUNT, rid, client_order_id(ACCOUNT, rid), ticker, ticker, status, submitted_at, submitted_at),
    )
    return rid


def kill_switch_row(conn) -> dict | None:
    return conn.execute("SELECT * FROM kill_switch WHERE account_id = %s", (ACCOUNT,)).fetchone()


def history(conn) -> list[dict]:
    return conn.execute(
        "SELECT * FROM kill_switch_history WHERE account_id = %s ORDER BY id", (ACCOUNT,)
    ).fetchall()


def count(conn, sql: str, *args) -> int:
    return conn.execute(sql, args).fetchone()["n"]


# --- a filled entry ------------------------------------------------------------------------------


def test_stock_entry_when_all_gates_pass_then_filled_and_recorded_with_every_gate_and_params(harness, conn):
    h = harness(reviewed_file=True)
    d = h.dispatcher()
    add_market(conn, "AAPL", NOW, 200)
    rid = add_recommendation(conn, "AAPL", NOW)
    d.refresh_account(force=True)

    outcomes = d.drain()

    assert [(o.recommendation_id, o.status, o.code) for o in outcomes] == [(rid, "EXECUTED", "ORDER_FILLED")]
    rec = recommendation(conn, rid)
    assert (rec["status"], rec["outcome_code"], rec["claimed_by"]) == ("EXECUTED", "ORDER_FILLED", d.worker_id)
    params = d.params.current()
    assert (rec["params_source"], rec["params_version"], rec["params_hash"]) == (
        params.source, params.version, params.content_hash)
    assert rec["params_source"].startswith("file:") and len(rec["params_hash"]) == 64

    assert len(rec["gate_results"]) == len(GATE_NAMES)
    assert {g["name"] for g in rec["gate_results"]} == GATE_NAMES
    for g in rec["gate_results"]:
        assert set(g) >= {"name", "passed", "code", "reason", "observed", "limit"}
        assert (g["passed"], g["code"]) == (True, "OK"), g
    # Sized from the params in force: min(per-trade, pct of the 100,000 equity, room) / 200, whole shares.
    risk = params.params.risk
    budget = min(risk.max_notional_per_trade, Decimal("100000") * Decimal(str(risk.max_equity_pct_per_trade)),
                 risk.max_notional_exposure)
    qty = int(budget // 200)
    assert qty >= 1
    assert gate(rec, "max_exposure")["observed"] == qty * 200
    assert gate(rec, "max_positions")["observed"] == 1

    cid = client_order_id(ACCOUNT, rid)
    execs = conn.execute("SELECT * FROM dispatch_executions WHERE recommendation_id = %s", (rid,)).fetchall()
    assert len(execs) == 1
    ex = execs[0]
    assert (ex["account_id"], ex["client_order_id"], ex["status"], ex["side"], ex["qty"], ex["filled_qty"]) == (
        ACCOUNT, cid, "FILLED", "buy", qty, qty)
    # The simulated fill: ask (close + 2 bps) plus 5 bps slippage.
    assert ex["filled_avg_price"] == Decimal("200.1400")
    sim = conn.execute("SELECT * FROM sim_orders WHERE client_order_id = %s", (cid,)).fetchall()
    assert len(sim) == 1 and str(sim[0]["id"]) == ex["broker_order_id"]

    positions = conn.execute("SELECT * FROM active_positions WHERE account_id = %s", (ACCOUNT,)).fetchall()
    assert [(p["ticker"], p["status"], p["qty"], p["avg_price"], p["execution_id"]) for p in positions] == [
        ("AAPL", "OPEN", qty, Decimal("200.1400"), ex["id"])]

    why = conn.execute("SELECT * FROM decision_log WHERE account_id = %s AND recommendation_id = %s",
                       (ACCOUNT, rid)).fetchall()
    assert len(why) == 1
    assert (why[0]["status"], why[0]["outcome_code"], why[0]["client_order_id"], why[0]["qty"],
            why[0]["params_source"]) == ("EXECUTED", "ORDER_FILLED", cid, qty, params.source)
    assert len(why[0]["gate_results"]) == len(GATE_NAMES)


# --- exposure and positions count the proposed order --------------------------------------------


def test_max_exposure_when_existing_positions_near_limit_then_order_sized_down_to_fit(harness, conn):
    h = harness()
    add_position(conn, "MSFT", 30, 300)  # 9,000 of the 10,000 limit
    add_market(conn, "AAPL", NOW, 200)
    rid = add_recommendation(conn, "AAPL", NOW)
    d = h.dispatcher()
    d.refresh_account(force=True)

    d.drain()

    rec = recommendation(conn, rid)
    assert (rec["status"], rec["outcome_code"]) == ("EXECUTED", "ORDER_FILLED")
    exposure = gate(rec, "max_exposure")
    assert (exposure["passed"], exposure["observed"], exposure["limit"]) == (True, Decimal("10000"), Decimal("10000"))
    ex = conn.execute("SELECT qty FROM dispatch_executions WHERE recommendation_id = %s", (rid,)).fetchone()
    assert ex["qty"] == 5  # room 1,000 / 200 a share, not the 10 the per-trade budget allows


def test_max_exposure_when_room_below_one_share_then_skipped_with_observed_above_limit(harness, conn):
    h = harness()
    add_position(conn, "MSFT", 33, 300)  # 9,900: room 100 < one share at 200
    add_market(conn, "AAPL", NOW, 200)
    rid = add_recommendation(conn, "AAPL", NOW)
    d = h.dispatcher()
    d.refresh_account(force=True)

    d.drain()

    rec = recommendation(conn, rid)
    assert (rec["status"], rec["outcome_code"]) == ("SKIPPED", "MAX_EXPOSURE")
    exposure = gate(rec, "max_exposure")
    assert (exposure["passed"], exposure["code"]) == (False, "MAX_EXPOSURE")
    assert exposure["observed"] == Decimal("10100") and exposure["limit"] == Decimal("10000")
    assert exposure["observed"] > exposure["limit"]
    assert count(conn, "SELECT count(*) AS n FROM sim_orders") == 0
    assert count(conn, "SELECT count(*) AS n FROM dispatch_executions") == 0


def test_max_exposure_counts_an_open_option_position_at_contracts_times_price_times_100(harness, conn):
    h = harness()
    add_position(conn, "SPY", 3, 10, instrument="OPTION", symbol="SPY261204C00600000")  # 3 x 10 x 100
    add_market(conn, "AAPL", NOW, 200)
    rid = add_recommendation(conn, "AAPL", NOW)
    d = h.dispatcher()
    d.refresh_account(force=True)

    d.drain()

    rec = recommendation(conn, rid)
    exposure = gate(rec, "max_exposure")
    # 3,000 held + the proposed 10 shares x 200; without the multiplier it would be 2,030.
    assert exposure["observed"] == Decimal("5000")
    assert "current=3000.00" in exposure["reason"]
    assert rec["status"] == "EXECUTED"


def test_max_positions_when_limit_two_then_third_entry_denied_counting_the_proposed_one(harness, conn):
    h = harness(overrides={"max_open_positions": 2})
    for i, ticker in enumerate(["AAPL", "MSFT", "NVDA"]):
        add_market(conn, ticker, NOW, 100)
    rids = [add_recommendation(conn, t, NOW - timedelta(seconds=3 - i)) for i, t in enumerate(["AAPL", "MSFT", "NVDA"])]
    d = h.dispatcher()
    d.refresh_account(force=True)

    d.drain()

    recs = [recommendation(conn, r) for r in rids]
    assert [(r["status"], r["outcome_code"]) for r in recs] == [
        ("EXECUTED", "ORDER_FILLED"), ("EXECUTED", "ORDER_FILLED"), ("SKIPPED", "MAX_POSITIONS")]
    assert [gate(r, "max_positions")["observed"] for r in recs] == [1, 2, 3]
    third = gate(recs[2], "max_positions")
    assert (third["passed"], third["limit"]) == (False, 2)
    assert recs[2]["params_source"] == "test"
    assert count(conn, "SELECT count(*) AS n FROM active_positions WHERE status = 'OPEN'") == 2


def test_another_accounts_positions_and_recommendations_are_invisible_to_this_account(harness, conn):
    h = harness(overrides={"max_open_positions": 1})
    other = "acct-other"
    add_position(conn, "MSFT", 40, 300, account=other)  # would fill both limits of this account
    add_market(conn, "AAPL", NOW, 200)
    theirs = add_recommendation(conn, "AAPL", NOW - timedelta(seconds=1), account=other)
    ours = add_recommendation(conn, "AAPL", NOW)
    d = h.dispatcher()
    d.refresh_account(force=True)

    outcomes = d.drain()

    assert [o.recommendation_id for o in outcomes] == [ours]
    rec = recommendation(conn, ours)
    assert rec["status"] == "EXECUTED"
    assert (gate(rec, "max_positions")["observed"], gate(rec, "open_position")["passed"]) == (1, True)
    assert gate(rec, "max_exposure")["observed"] == Decimal("2000")
    assert recommendation(conn, theirs)["status"] == "PENDING"
    assert conn.execute("SELECT account_id FROM dispatch_executions").fetchall() == [{"account_id": ACCOUNT}]
    assert conn.execute("SELECT account_id FROM sim_orders").fetchall() == [{"account_id": ACCOUNT}]


# --- the kill switch -----------------------------------------------------------------------------


def test_daily_loss_trip_latches_through_recovery_and_restart_until_the_next_session(harness, conn):
    # reduce_only: the book is left as it is, so the latch is seen alone (flatten: tests/test_exits_pipeline.py).
    h = harness(overrides={"risk": {"on_daily_loss": "reduce_only"}})
    d = h.dispatcher()
    add_market(conn, "AAPL", NOW, 200)
    entry = add_recommendation(conn, "AAPL", NOW)
    d.refresh_account(force=True)
    d.drain()
    assert recommendation(conn, entry)["status"] == "EXECUTED"  # 10 AAPL at 200.14

    # AAPL falls to 140: a loss of about 601 against the 500 limit. The refresh alone trips it.
    h.clock.set(NOW + timedelta(minutes=1))
    add_bar(conn, "AAPL", NOW, 140)
    d.refresh_account(force=True)
    ks = kill_switch_row(conn)
    assert (ks["state"], ks["changed_by"], ks["tripped_session"]) == ("REDUCING", "daily-loss-limit", NOW.date())
    assert [(r["from_state"], r["to_state"], r["changed_by"]) for r in history(conn)] == [
        (None, "REDUCING", "daily-loss-limit")]
    assert history(conn)[0]["reason"].startswith("DAILY_LOSS_LIMIT")

    # The P&L recovers; the latch does not.
    later = NOW + timedelta(minutes=2)
    h.clock.set(later)
    add_bar(conn, "AAPL", NOW + timedelta(minutes=1), 201)
    d.refresh_account(force=True)
    acct = conn.execute("SELECT equity, last_equity FROM account_state WHERE account_id = %s", (ACCOUNT,)).fetchone()
    assert acct["equity"] > acct["last_equity"]
    add_market(conn, "MSFT", later, 300)
    buy = add_recommendation(conn, "MSFT", later)
    d.drain()
    rec = recommendation(conn, buy)
    assert (rec["status"], rec["outcome_code"]) == ("SKIPPED", "KILL_SWITCH_REDUCING")
    assert gate(rec, "daily_loss")["passed"] is True
    assert (gate(rec, "kill_switch")["observed"], gate(rec, "kill_switch")["passed"]) == ("REDUCING", False)

    # A restart (a new dispatcher, a new pool) changes nothing.
    restarted = h.dispatcher(pool=h.new_pool())
    add_market(conn, "NVDA", later, 150)
    buy2 = add_recommendation(conn, "NVDA", later)
    restarted.refresh_account(force=True)
    restarted.drain()
    assert (recommendation(conn, buy2)["status"], recommendation(conn, buy2)["outcome_code"]) == (
        "SKIPPED", "KILL_SWITCH_REDUCING")

    # Reducing risk is allowed.
    exit_id = add_recommendation(conn, "AAPL", later, action="EXIT")
    restarted.drain()
    rec = recommendation(conn, exit_id)
    assert (rec["status"], rec["outcome_code"]) == ("EXECUTED", "ORDER_FILLED")
    assert gate(rec, "kill_switch")["passed"] is True
    pos = conn.execute("SELECT status, realized_pnl FROM active_positions WHERE ticker = 'AAPL'").fetchone()
    assert pos["status"] == "CLOSED" and pos["realized_pnl"] is not None
    assert kill_switch_row(conn)["state"] == "REDUCING"

    # The next session: the latch has expired.
    next_day = et("2026-12-01", "10:00")
    h.clock.set(next_day)
    add_market(conn, "AMZN", next_day, 100)
    buy3 = add_recommendation(conn, "AMZN", next_day)
    restarted.refresh_account(force=True)
    restarted.drain()
    rec = recommendation(conn, buy3)
    assert (rec["status"], rec["outcome_code"]) == ("EXECUTED", "ORDER_FILLED")
    assert gate(rec, "kill_switch")["observed"] == "ACTIVE"
    ks = kill_switch_row(conn)
    assert (ks["state"], ks["changed_by"]) == ("ACTIVE", "session-roll")
    rows = history(conn)
    assert [(r["from_state"], r["to_state"], r["changed_by"]) for r in rows] == [
        (None, "REDUCING", "daily-loss-limit"), ("REDUCING", "ACTIVE", "session-roll")]
    assert rows[1]["changed_at"] == next_day


def test_daily_loss_in_account_state_when_a_buy_is_decided_then_denied_and_switch_trips(harness, conn):
    h = harness()
    set_account_state(conn, NOW, 99_500, 100_000)  # a loss of exactly the limit
    add_market(conn, "AAPL", NOW, 200)
    rid = add_recommendation(conn, "AAPL", NOW)

    h.dispatcher().drain()

    rec = recommendation(conn, rid)
    assert (rec["status"], rec["outcome_code"]) == ("SKIPPED", "DAILY_LOSS_LIMIT")
    loss = gate(rec, "daily_loss")
    assert (loss["observed"], loss["limit"]) == (Decimal("500"), Decimal("500"))
    ks = kill_switch_row(conn)
    assert (ks["state"], ks["changed_by"]) == ("REDUCING", "daily-loss-limit")
    assert count(conn, "SELECT count(*) AS n FROM sim_orders") == 0


def test_kill_switch_history_records_the_state_it_changed_from(harness, conn, db_url):
    from services.adapters.postgres import kill_switch

    kill_switch.set_state(conn, ACCOUNT, "HALTED", "incident", "ops-oncall", NOW)
    kill_switch.set_state(conn, ACCOUNT, "ACTIVE", "resolved", "ops-oncall", NOW + timedelta(minutes=5))
    assert [(r["from_state"], r["to_state"]) for r in history(conn)] == [(None, "HALTED"), ("HALTED", "ACTIVE")]



def test_operator_halt_and_resume_from_the_cli_with_history_and_status(harness, conn, db_url, monkeypatch, capsys,
                                                                      restore_logging):
    from services.cli import main as cli

    monkeypatch.setenv("DATABASE_URL", db_url)
    h = harness()
    add_market(conn, "AAPL", NOW, 200)
    add_position(conn, "AAPL", 5, 200)
    set_account_state(conn, NOW, 99_900, 100_000)
    d = h.dispatcher()

    with freezegun.freeze_time(NOW):
        assert cli(["halt", "--reason", "test", "--account", ACCOUNT, "--by", "ops-oncall"]) == 0
    assert kill_switch_row(conn)["state"] == "HALTED"
    exit_id = add_recommendation(conn, "AAPL", NOW, action="EXIT")
    d.drain()
    rec = recommendation(conn, exit_id)
    assert (rec["status"], rec["outcome_code"]) == ("SKIPPED", "KILL_SWITCH_HALTED")
    assert count(conn, "SELECT count(*) AS n FROM sim_orders") == 0

    later = NOW + timedelta(minutes=1)
    with freezegun.freeze_time(later):
        assert cli(["resume", "--account", ACCOUNT]) == 0
    assert kill_switch_row(conn)["state"] == "ACTIVE"
    rows = history(conn)
    assert [(r["from_state"], r["to_state"], r["changed_by"], r["reason"], r["changed_at"]) for r in rows] == [
        (None, "HALTED", "ops-oncall", "test", NOW),
        ("HALTED", "ACTIVE", rows[1]["changed_by"], "resumed by operator", later),
    ]
    assert rows[1]["changed_by"].startswith("operator:")

    capsys.readouterr()
    with freezegun.freeze_time(later):
        assert cli(["status", "--account", ACCOUNT]) == 0
    out = capsys.readouterr().out
    assert "kill switch   ACTIVE" in out
    assert "daily P&L     -100.00" in out
    assert "exposure      1,000.00 in 1 position(s)" in out
    assert "today (ET): SKIPPED 1" in out
    assert "blocked by KILL_SWITCH_HALTED" in out

    exit2 = add_recommendation(conn, "AAPL", NOW, action="EXIT")
    d.drain()
    assert recommendation(conn, exit2)["status"] == "EXECUTED"


# --- time is ET ----------------------------------------------------------------------------------


def test_trades_today_at_2030_et_after_utc_midnight_counts_the_et_day(harness, conn):
    evening = et("2026-11-30", "20:30")
    assert evening.astimezone(timezone.utc).date().isoformat() == "2026-12-01"
    h = harness(now=evening)
    add_execution(conn, "AAPL", et("2026-11-30", "10:00"))   # today in ET (15:00 UTC)
    add_execution(conn, "AAPL", et("2026-11-29", "22:00"))   # yesterday in ET, but 2026-11-30 in UTC
    add_market(conn, "AAPL", evening, 200)
    rid = add_recommendation(conn, "AAPL", evening)

    h.dispatcher().drain()

    rec = recommendation(conn, rid)
    trades = gate(rec, "ticker_trades_today")
    assert (trades["observed"], trades["passed"]) == (1, True)
    assert rec["status"] == "SKIPPED"
    assert gate(rec, "trading_hours")["code"] == "MARKET_CLOSED"


def test_bar_freshness_measured_from_the_bars_own_time_not_its_ingestion(harness, conn):
    h = harness()
    bar_ts = NOW - timedelta(minutes=10)
    conn.execute(
        """INSERT INTO lane_telemetry (ticker, ts, open, high, low, close, volume, ingested_at)
           VALUES ('AAPL', %s, 200, 200.1, 199.9, 200, 10000, %s)""", (bar_ts, NOW))
    add_features(conn, "AAPL", NOW - timedelta(minutes=1), 200)
    rid = add_recommendation(conn, "AAPL", NOW)
    d = h.dispatcher()
    d.refresh_account(force=True)

    d.drain()

    rec = recommendation(conn, rid)
    assert (rec["status"], rec["outcome_code"]) == ("SKIPPED", "STALE_BAR")
    fresh = gate(rec, "bar_freshness")
    assert (fresh["passed"], fresh["observed"], fresh["limit"]) == (False, Decimal("540"), 180)
    assert gate(rec, "feature_freshness")["passed"] is True
    assert count(conn, "SELECT count(*) AS n FROM sim_orders") == 0


# --- time from other machines --------------------------------------------------------------------


def test_recommendations_dated_in_the_future_then_skipped_future_dated_without_an_order_and_the_next_trades(
        harness, conn):
    """DESIGN.md invariant 15: a future date is refused, not read as a negative (always fresh) age."""
    h = harness()
    broker = PassThroughBroker(h.broker)
    d = h.dispatcher(broker)
    add_market(conn, "AAPL", NOW, 200)
    future = {
        "now+1h": NOW + timedelta(hours=1),
        "2999-01-01": datetime(2999, 1, 1, tzinfo=timezone.utc),
        "9999-12-31": datetime(9999, 12, 31, tzinfo=timezone.utc),
    }
    dated = {label: add_recommendation(conn, "AAPL", when) for label, when in future.items()}
    # Written just now, but from a signal on a bar an hour ahead of this clock.
    signal_bar = add_recommendation(conn, "AAPL", NOW - timedelta(seconds=1))
    conn.execute("UPDATE dispatch_recommendations SET bar_ts = %s WHERE id = %s",
                 (NOW + timedelta(hours=1), signal_bar))
    d.refresh_account(force=True)

    outcomes = d.drain()

    # Claimed oldest first: the one created now, then the future dates in order.
    assert [(o.recommendation_id, o.status, o.code) for o in outcomes] == [
        (rid, "SKIPPED", "FUTURE_DATED") for rid in (signal_bar, *dated.values())]
    for label, rid in dated.items():
        rec = recommendation(conn, rid)
        assert (rec["status"], rec["outcome_code"]) == ("SKIPPED", "FUTURE_DATED"), label
        age = gate(rec, "recommendation_age")
        lead = (future[label] - NOW).total_seconds()
        assert (age["passed"], age["code"], float(age["observed"]), age["limit"]) == (False, "FUTURE_DATED", lead, 5)
        assert rec["outcome_detail"].startswith("FUTURE_DATED: created_at=")
    rec = recommendation(conn, signal_bar)
    assert rec["outcome_detail"].startswith("FUTURE_DATED: bar_ts=")
    assert float(gate(rec, "recommendation_age")["observed"]) == 3600.0
    assert broker.submits == 0
    assert count(conn, "SELECT count(*) AS n FROM sim_orders") == 0
    assert count(conn, "SELECT count(*) AS n FROM dispatch_executions") == 0
    assert count(conn, "SELECT count(*) AS n FROM active_positions") == 0

    normal = add_recommendation(conn, "AAPL", NOW)
    assert [(o.recommendation_id, o.status, o.code) for o in d.drain()] == [(normal, "EXECUTED", "ORDER_FILLED")]
    assert broker.submits == 1
    assert gate(recommendation(conn, normal), "recommendation_age")["passed"] is True


def test_a_bar_dated_after_now_is_not_the_bar_a_recommendation_trades_on(harness, conn):
    """The freshness bar is the latest one that has begun: a future-dated row cannot stand in for a fresh one."""
    h = harness()
    d = h.dispatcher()
    add_bar(conn, "AAPL", NOW - timedelta(minutes=30), 200)
    add_bar(conn, "AAPL", NOW + timedelta(hours=1), 200)
    add_features(conn, "AAPL", NOW - timedelta(minutes=1), 200)
    rid = add_recommendation(conn, "AAPL", NOW)
    d.refresh_account(force=True)

    d.drain()

    rec = recommendation(conn, rid)
    assert (rec["status"], rec["outcome_code"]) == ("SKIPPED", "STALE_BAR")
    assert gate(rec, "bar_freshness")["observed"] == Decimal("1740")
    assert count(conn, "SELECT count(*) AS n FROM sim_orders") == 0


# --- fail closed ---------------------------------------------------------------------------------


def test_account_unavailable_then_no_account_state_and_entry_denied_without_an_order(harness, conn):
    h = harness()
    broker = AccountUnavailableBroker(h.broker)
    d = h.dispatcher(broker)
    add_market(conn, "AAPL", NOW, 200)
    rid = add_recommendation(conn, "AAPL", NOW)

    d.refresh_account(force=True)
    assert conn.execute("SELECT 1 FROM account_state").fetchone() is None
    d.drain()

    rec = recommendation(conn, rid)
    assert (rec["status"], rec["outcome_code"]) == ("SKIPPED", "NO_ACCOUNT_STATE")
    loss = gate(rec, "daily_loss")
    assert (loss["passed"], loss["code"], loss["observed"]) == (False, "NO_ACCOUNT_STATE", None)
    assert gate(rec, "max_exposure")["passed"] is False
    assert broker.submits == 0
    assert count(conn, "SELECT count(*) AS n FROM sim_orders") == 0


def test_stale_account_state_then_entry_denied_without_an_order(harness, conn):
    h = harness()
    set_account_state(conn, NOW - timedelta(minutes=20), 100_000, 100_000)  # the broker stopped answering
    add_market(conn, "AAPL", NOW, 200)
    rid = add_recommendation(conn, "AAPL", NOW)

    h.dispatcher(AccountUnavailableBroker(h.broker)).drain()

    rec = recommendation(conn, rid)
    assert (rec["status"], rec["outcome_code"]) == ("SKIPPED", "STALE_ACCOUNT_STATE")
    loss = gate(rec, "daily_loss")
    assert (loss["passed"], loss["observed"], loss["limit"]) == (False, Decimal("1200"), 600)
    assert count(conn, "SELECT count(*) AS n FROM sim_orders") == 0


def test_calendar_unavailable_then_entry_denied_in_trading_hours_without_an_order(harness, conn):
    h = harness()
    broker = PassThroughBroker(h.broker)
    d = h.dispatcher(broker, calendar=BrokenCalendar())
    add_market(conn, "AAPL", NOW, 200)
    rid = add_recommendation(conn, "AAPL", NOW)
    d.refresh_account(force=True)

    d.drain()

    rec = recommendation(conn, rid)
    assert (rec["status"], rec["outcome_code"]) == ("SKIPPED", "CALENDAR_UNAVAILABLE")
    hours = gate(rec, "trading_hours")
    assert (hours["passed"], hours["code"]) == (False, "CALENDAR_UNAVAILABLE")
    assert broker.submits == 0
    assert count(conn, "SELECT count(*) AS n FROM sim_orders") == 0


# --- exactly once ----------------------------------------------------------------------------------


def test_crash_after_the_broker_accepted_then_recovery_records_its_order_once(harness, conn):
    h = harness()
    crashed_pool = h.new_pool(application_name="ops-dispatcher:worker-a")
    crashing = h.dispatcher(CrashAfterBrokerAccepted(SimBroker(crashed_pool, ACCOUNT, h.clock)),
                            pool=crashed_pool, worker_id="worker-a")
    add_market(conn, "AAPL", NOW, 200)
    rid = add_recommendation(conn, "AAPL", NOW)
    crashing.refresh_account(force=True)

    with pytest.raises(SimulatedCrash):
        crashing.drain()
    crashed_pool.close()  # the process is gone, and its connections with it

    cid = client_order_id(ACCOUNT, rid)
    rec = recommendation(conn, rid)
    assert (rec["status"], rec["claimed_by"]) == ("SUBMITTING", "worker-a")
    assert count(conn, "SELECT count(*) AS n FROM sim_orders WHERE client_order_id = %s", cid) == 1
    assert conn.execute("SELECT status FROM active_positions").fetchone()["status"] == "PENDING"

    survivor = h.dispatcher(pool=h.new_pool(application_name="ops-dispatcher:worker-b"), worker_id="worker-b")
    assert wait_until(lambda: survivor.recover_in_flight() == 1, timeout=3)

    rec = recommendation(conn, rid)
    assert (rec["status"], rec["outcome_code"]) == ("EXECUTED", "ORDER_FILLED")
    sim = conn.execute("SELECT * FROM sim_orders WHERE client_order_id = %s", (cid,)).fetchall()
    execs = conn.execute("SELECT * FROM dispatch_executions WHERE recommendation_id = %s", (rid,)).fetchall()
    assert len(sim) == 1 and len(execs) == 1
    assert (execs[0]["status"], execs[0]["broker_order_id"]) == ("FILLED", str(sim[0]["id"]))
    positions = conn.execute("SELECT status, qty FROM active_positions").fetchall()
    assert positions == [{"status": "OPEN", "qty": Decimal("10")}]
    assert survivor.recover_in_flight() == 0  # nothing left, nothing recorded twice


def test_crash_before_the_broker_got_the_order_then_recovery_fails_it_and_releases_the_position(harness, conn):
    h = harness()
    crashed_pool = h.new_pool(application_name="ops-dispatcher:worker-a")
    crashing = h.dispatcher(CrashBeforeBrokerGotOrder(SimBroker(crashed_pool, ACCOUNT, h.clock)),
                            pool=crashed_pool, worker_id="worker-a")
    add_market(conn, "AAPL", NOW, 200)
    rid = add_recommendation(conn, "AAPL", NOW)
    crashing.refresh_account(force=True)
    with pytest.raises(SimulatedCrash):
        crashing.drain()
    crashed_pool.close()
    assert recommendation(conn, rid)["status"] == "SUBMITTING"

    survivor = h.dispatcher(pool=h.new_pool(application_name="ops-dispatcher:worker-b"), worker_id="worker-b")
    # Within the grace period an order not yet visible at the broker may still be on its way.
    assert survivor.recover_in_flight() == 0
    assert recommendation(conn, rid)["status"] == "SUBMITTING"
    h.clock.advance(IN_FLIGHT_GRACE + timedelta(seconds=1))
    assert wait_until(lambda: survivor.recover_in_flight() == 1, timeout=3)

    rec = recommendation(conn, rid)
    assert (rec["status"], rec["outcome_code"]) == ("FAILED", "ORDER_NOT_PLACED")
    ex = conn.execute("SELECT status FROM dispatch_executions WHERE recommendation_id = %s", (rid,)).fetchone()
    assert ex["status"] == "FAILED"
    assert [r["status"] for r in conn.execute("SELECT status FROM active_positions").fetchall()] == ["CANCELLED"]
    assert count(conn, "SELECT count(*) AS n FROM sim_orders") == 0


def test_recovery_leaves_a_live_workers_submitting_recommendation_alone(harness, conn):
    h = harness()
    live_pool = h.new_pool(application_name="ops-dispatcher:worker-a")
    live = h.dispatcher(CrashAfterBrokerAccepted(SimBroker(live_pool, ACCOUNT, h.clock)),
                        pool=live_pool, worker_id="worker-a")
    add_market(conn, "AAPL", NOW, 200)
    rid = add_recommendation(conn, "AAPL", NOW)
    live.refresh_account(force=True)
    with pytest.raises(SimulatedCrash):  # stands in for "still talking to the broker"
        live.drain()
    assert wait_until(lambda: conn.execute(
        "SELECT 1 FROM pg_stat_activity WHERE application_name = 'ops-dispatcher:worker-a'").fetchone(), timeout=3)

    other = h.dispatcher(pool=h.new_pool(application_name="ops-dispatcher:worker-b"), worker_id="worker-b")
    assert other.recover_in_flight() == 0
    rec = recommendation(conn, rid)
    assert (rec["status"], rec["claimed_by"]) == ("SUBMITTING", "worker-a")
    ex = conn.execute("SELECT status FROM dispatch_executions WHERE recommendation_id = %s", (rid,)).fetchone()
    assert ex["status"] == "SUBMITTING"

    live_pool.close()
    assert wait_until(lambda: other.recover_in_flight() == 1, timeout=3)
    assert recommendation(conn, rid)["status"] == "EXECUTED"


def test_crash_of_a_dispatcher_process_inside_submit_then_recovery_records_once(harness, conn, db_url):
    """The same as above with a real process killed (os._exit) right after the broker accepted."""
    h = harness()
    add_market(conn, "AAPL", NOW, 200)
    set_account_state(conn, NOW, 100_000, 100_000)
    rid = add_recommendation(conn, "AAPL", NOW)
    proc = subprocess.run(
        [sys.executable, "-m", "tests.dispatcher_worker", db_url, ACCOUNT, NOW.isoformat(), "9", "{}",
         "crash-after-submit"],
        cwd=REPO, input="go\n", capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 9, proc.stderr[-2000:]
    cid = client_order_id(ACCOUNT, rid)
    assert recommendation(conn, rid)["status"] == "SUBMITTING"

    survivor = h.dispatcher(pool=h.new_pool(application_name="ops-dispatcher:worker-b"), worker_id="worker-b")
    assert wait_until(lambda: survivor.recover_in_flight() == 1, timeout=3)

    assert recommendation(conn, rid)["status"] == "EXECUTED"
    assert count(conn, "SELECT count(*) AS n FROM sim_orders WHERE client_order_id = %s", cid) == 1
    assert count(conn, "SELECT count(*) AS n FROM dispatch_executions WHERE client_order_id = %s", cid) == 1
    assert count(conn, "SELECT count(*) AS n FROM active_positions WHERE status = 'OPEN'") == 1


def test_gateway_timeout_after_the_broker_accepted_then_recorded_executed_with_one_order(harness, conn):
    h = harness()
    broker = TimeoutAfterAccepted(h.broker)
    d = h.dispatcher(broker)
    add_market(conn, "AAPL", NOW, 200)
    rid = add_recommendation(conn, "AAPL", NOW)
    d.refresh_account(force=True)

    d.drain()

    rec = recommendation(conn, rid)
    assert (rec["status"], rec["outcome_code"]) == ("EXECUTED", "ORDER_FILLED")
    cid = client_order_id(ACCOUNT, rid)
    sim = conn.execute("SELECT id FROM sim_orders").fetchall()
    ex = conn.execute("SELECT * FROM dispatch_executions WHERE recommendation_id = %s", (rid,)).fetchone()
    assert broker.submits == 1 and len(sim) == 1
    assert (ex["client_order_id"], ex["status"], ex["broker_order_id"]) == (cid, "FILLED", str(sim[0]["id"]))
    assert count(conn, "SELECT count(*) AS n FROM active_positions WHERE status = 'OPEN'") == 1


def test_duplicate_client_order_id_then_recorded_as_the_existing_order(harness, conn):
    h = harness()
    add_market(conn, "AAPL", NOW, 200)
    rid = add_recommendation(conn, "AAPL", NOW)
    cid = client_order_id(ACCOUNT, rid)
    d = h.dispatcher()
    d.refresh_account(force=True)
    # An earlier attempt got through (a retry of alpaca-py, a previous process).
    existing = h.broker.submit_order(OrderRequest(cid, "AAPL", "AAPL", "STOCK", "buy", 10))

    d.drain()

    rec = recommendation(conn, rid)
    assert (rec["status"], rec["outcome_code"]) == ("EXECUTED", "ORDER_FILLED")
    ex = conn.execute("SELECT * FROM dispatch_executions WHERE recommendation_id = %s", (rid,)).fetchone()
    assert (ex["broker_order_id"], ex["filled_avg_price"]) == (existing.broker_order_id, existing.filled_avg_price)
    assert count(conn, "SELECT count(*) AS n FROM sim_orders") == 1
    assert count(conn, "SELECT count(*) AS n FROM active_positions WHERE status = 'OPEN'") == 1


def test_broker_rejection_then_rejected_the_reserved_position_released_and_the_next_decided(harness, conn):
    h = harness()
    broker = RejectingBroker(h.broker, "AAPL")
    d = h.dispatcher(broker)
    add_market(conn, "AAPL", NOW, 200)
    add_market(conn, "MSFT", NOW, 300)
    rid = add_recommendation(conn, "AAPL", NOW - timedelta(seconds=1))
    nxt = add_recommendation(conn, "MSFT", NOW)
    d.refresh_account(force=True)

    outcomes = d.drain()

    assert [(o.status, o.code) for o in outcomes] == [("REJECTED", "BROKER_REJECTED"), ("EXECUTED", "ORDER_FILLED")]
    assert recommendation(conn, nxt)["status"] == "EXECUTED"
    rec = recommendation(conn, rid)
    assert (rec["status"], rec["outcome_code"]) == ("REJECTED", "BROKER_REJECTED")
    assert "insufficient buying power" in rec["outcome_detail"]
    ex = conn.execute("SELECT status, broker_message FROM dispatch_executions WHERE recommendation_id = %s",
                      (rid,)).fetchone()
    assert (ex["status"], ex["broker_message"]) == ("REJECTED", "insufficient buying power")
    assert [r["status"] for r in conn.execute(
        "SELECT status FROM active_positions WHERE ticker = 'AAPL'").fetchall()] == ["CANCELLED"]
    assert count(conn, "SELECT count(*) AS n FROM active_positions WHERE ticker = 'AAPL' AND status IN ('OPEN', 'PENDING')") == 0


class ExplodingContract:
    """A chain entry the parser mangled: touching any field raises."""

    def __getattr__(self, name):
        raise RuntimeError("chain parser bug")


class CorruptOptionData:
    """Option market data whose chain holds a corrupt entry: the contract choice inside decide() raises."""

    def gather(self, conn, ticker, spot, now, params, strategy=None):
        return OptionInputs([ExplodingContract()], None)


def test_exception_inside_decide_then_that_recommendation_failed_and_the_next_still_decided(harness, conn):
    h = harness()
    d = h.dispatcher(option_data=CorruptOptionData())
    add_market(conn, "AAPL", NOW, 200)
    add_market(conn, "MSFT", NOW, 300)
    bad = add_recommendation(conn, "AAPL", NOW - timedelta(seconds=1), instrument="OPTION")
    good = add_recommendation(conn, "MSFT", NOW)
    d.refresh_account(force=True)

    outcomes = d.drain()

    assert [(o.recommendation_id, o.status) for o in outcomes] == [(bad, "FAILED"), (good, "EXECUTED")]
    rec = recommendation(conn, bad)
    assert (rec["status"], rec["outcome_code"]) == ("FAILED", "DECISION_ERROR")
    assert "RuntimeError: chain parser bug" in rec["outcome_detail"]
    assert count(conn, "SELECT count(*) AS n FROM dispatch_executions WHERE recommendation_id = %s", bad) == 0
    assert recommendation(conn, good)["outcome_code"] == "ORDER_FILLED"


# --- the loop ----------------------------------------------------------------------------------------


class LoopThread:
    """run_forever in a thread, stopped and joined at the end of the test."""

    def __init__(self, dispatcher: Dispatcher, db_url: str):
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, args=(dispatcher, db_url), daemon=True)

    def _run(self, dispatcher, db_url):
        try:
            dispatcher.run_forever(db_url, self.stop)
        except BaseException as e:  # surfaced by the test
            self.errors.append(e)

    def start(self, db_url: str, worker_id: str) -> None:
        self.thread.start()
        # Listening: the listener connection exists and has issued LISTEN.
        with connect(db_url) as c:
            assert wait_until(lambda: c.execute(
                "SELECT 1 FROM pg_stat_activity WHERE application_name = %s AND query LIKE 'LISTEN%%'",
                (f"ops-dispatcher:{worker_id}:listen"[:63],)).fetchone(), timeout=10)
        time.sleep(0.3)  # the first drain of an empty queue is done; the loop now waits

    def shutdown(self, db_url: str) -> float:
        started = time.monotonic()
        self.stop.set()
        with connect(db_url) as c:
            c.execute("NOTIFY recommendations")
        self.thread.join(timeout=10)
        return time.monotonic() - started


def _decided(db_url: str, rid: int) -> bool:
    with connect(db_url) as c:
        return recommendation(c, rid)["status"] not in ("PENDING", "SUBMITTING")


def test_notify_wakes_the_loop_long_before_its_poll_interval(harness, db_url):
    h = harness(overrides={"execution": {"poll_interval_seconds": 30}})
    d = h.dispatcher(worker_id="loop-a")
    with connect(db_url) as c:
        add_market(c, "AAPL", NOW, 200)
    loop = LoopThread(d, db_url)
    loop.start(db_url, "loop-a")
    try:
        with connect(db_url) as c:
            rid = add_recommendation(c, "AAPL", NOW)
            sent = time.monotonic()
            c.execute("NOTIFY recommendations")
        assert wait_until(lambda: _decided(db_url, rid), timeout=5)
        latency = time.monotonic() - sent
        assert latency < 1.5, f"decided {latency:.2f}s after NOTIFY with a 30 s poll interval"
        with connect(db_url) as c:
            assert recommendation(c, rid)["status"] == "EXECUTED"
    finally:
        elapsed = loop.shutdown(db_url)
    assert not loop.thread.is_alive() and elapsed < 3
    assert loop.errors == []


class CallOrderBroker(PassThroughBroker):
    """Records the order of submissions and account reads; `fail_account`: what the account read raises."""

    def __init__(self, inner: SimBroker, fail_account: Exception | None = None):
        super().__init__(inner)
        self.calls: list[str] = []
        self.fail_account = fail_account

    def submit_order(self, order: OrderRequest):
        self.calls.append("submit_order")
        return super().submit_order(order)

    def get_account(self):
        self.calls.append("get_account")
        if self.fail_account is not None:
            raise self.fail_account
        return super().get_account()


def test_account_refresh_due_when_a_notify_wakes_the_loop_then_the_order_leaves_before_the_refresh(
        harness, db_url, monkeypatch):
    """The scheduled refresh (two broker requests and the marks of the book: ~13 ms with 400
    positions, more against a live account) waits for a quiet moment; it is not between a
    wake-up and its order."""
    monkeypatch.setattr(dispatcher_main, "QUIET_SECONDS", 1.0)  # no quiet moment between the clock's move and the NOTIFY
    h = harness(overrides={"execution": {"poll_interval_seconds": 30, "account_refresh_seconds": 1}})
    broker = CallOrderBroker(h.broker)
    d = h.dispatcher(broker, worker_id="loop-r")
    with connect(db_url) as c:
        add_market(c, "AAPL", NOW, 200)
    loop = LoopThread(d, db_url)
    loop.start(db_url, "loop-r")
    try:
        assert broker.calls == ["get_account"]  # the first snapshot, before any decision
        with connect(db_url) as c:
            rid = add_recommendation(c, "AAPL", NOW + timedelta(seconds=1))  # no NOTIFY yet: the loop sleeps on
            h.clock.advance(timedelta(seconds=2))  # the next snapshot is due...
            c.execute("NOTIFY recommendations")  # ...when a recommendation wakes the loop
        assert wait_until(lambda: _decided(db_url, rid), timeout=5)
        assert wait_until(lambda: len(broker.calls) >= 3, timeout=5)  # the refresh, once the queue is quiet
        assert broker.calls[:3] == ["get_account", "submit_order", "get_account"]
        with connect(db_url) as c:
            assert recommendation(c, rid)["status"] == "EXECUTED"
    finally:
        loop.shutdown(db_url)
    assert loop.errors == []


@pytest.mark.parametrize("failure", [BrokerUnavailable("account endpoint down"),
                                     InvalidOperation("an equity that is not a number")])
def test_account_refresh_when_it_fails_then_retried_every_5_seconds_not_at_every_quiet_moment(harness, db_url, failure):
    """A broker outage, or an answer that cannot be read (raised to the loop, which logs it and goes on)."""
    h = harness(overrides={"execution": {"poll_interval_seconds": 30, "account_refresh_seconds": 1}})
    broker = CallOrderBroker(h.broker, fail_account=failure)
    d = h.dispatcher(broker, worker_id="loop-f")
    loop = LoopThread(d, db_url)
    loop.start(db_url, "loop-f")  # the first refresh fails at once
    try:
        time.sleep(0.6)  # ~30 quiet moments of 20 ms
        assert broker.calls == ["get_account"]
        h.clock.advance(timedelta(seconds=5))
        assert wait_until(lambda: len(broker.calls) == 2, timeout=2)
        time.sleep(0.3)
        assert broker.calls == ["get_account", "get_account"]
    finally:
        loop.shutdown(db_url)
    assert loop.errors == []


def test_stop_ends_the_loop_promptly_without_a_notify(harness, db_url):
    h = harness(overrides={"execution": {"poll_interval_seconds": 30}})
    d = h.dispatcher(worker_id="loop-s")
    loop = LoopThread(d, db_url)
    loop.start(db_url, "loop-s")
    started = time.monotonic()
    loop.stop.set()
    loop.thread.join(timeout=3)
    alive = loop.thread.is_alive()
    if alive:
        loop.shutdown(db_url)
    assert not alive, "run_forever kept waiting out its 30 s poll interval after stop"
    assert time.monotonic() - started < 1.0
    assert loop.errors == []


def test_database_restart_then_the_loop_reconnects_and_still_decides(harness, db_url):
    h = harness(overrides={"execution": {"poll_interval_seconds": 30}})
    d = h.dispatcher(worker_id="loop-b")
    with connect(db_url) as c:
        add_market(c, "AAPL", NOW, 200)
    loop = LoopThread(d, db_url)
    loop.start(db_url, "loop-b")
    try:
        with connect(db_url) as c:
            killed = c.execute(
                """SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) AS n FROM pg_stat_activity
                   WHERE datname = current_database() AND pid <> pg_backend_pid()""").fetchone()["n"]
            assert killed >= 2  # the listener and the pool's connection
            rid = add_recommendation(c, "AAPL", NOW)
            c.execute("NOTIFY recommendations")
        assert wait_until(lambda: _decided(db_url, rid), timeout=10)
        with connect(db_url) as c:
            assert recommendation(c, rid)["status"] == "EXECUTED"
            assert c.execute("SELECT 1 FROM pg_stat_activity WHERE application_name = %s",
                             ("ops-dispatcher:loop-b:listen",)).fetchone()
    finally:
        loop.shutdown(db_url)
    assert not loop.thread.is_alive()
    assert loop.errors == []


def test_sigterm_then_the_service_exits_zero(db_url):
    env = {**os.environ, "DATABASE_URL": db_url, "ACCOUNT_ID": ACCOUNT, "LOG_LEVEL": "INFO", "OPS_BROKER": "sim"}
    env.pop("OPS_PARAMS_SOURCE", None)
    proc = subprocess.Popen([sys.executable, "-m", "services.dispatcher"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any('"params in force"' in line for line in lines):
            if sel.select(timeout=0.5):
                line = proc.stdout.readline()
                if not line:
                    break
                lines.append(line)
        assert any('"params in force"' in line for line in lines), "".join(lines)[-3000:]
        with connect(db_url) as c:  # the loop is up: it is listening
            assert wait_until(lambda: c.execute(
                "SELECT 1 FROM pg_stat_activity WHERE application_name LIKE 'ops-dispatcher:%%:listen'").fetchone(),
                timeout=10)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=10)
        assert rc == 0, "".join(lines)[-3000:] + proc.stdout.read()[-3000:]
        assert time.monotonic() - sent < 5
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --- batches -----------------------------------------------------------------------------------------


def test_a_single_recommendation_on_an_idle_queue_is_claimed_alone_at_once(harness, conn):
    h = harness()
    d = h.dispatcher()
    add_market(conn, "AAPL", NOW, 200)
    rec = add_recommendation(conn, "AAPL", NOW)
    d.refresh_account(force=True)
    assert [o.recommendation_id for o in d.drain()] == [rec]
    assert list(d.claims) == [1]  # not held back waiting for a batch to fill


def test_a_deep_queue_is_claimed_in_growing_batches_and_decided_in_created_order(harness, conn):
    h = harness(overrides={"max_trades_per_ticker_per_day": 1000})
    d = h.dispatcher()
    add_market(conn, "AAPL", NOW, 200)
    made = [add_recommendation(conn, "AAPL", NOW - timedelta(seconds=200 - i)) for i in range(150)]
    d.refresh_account(force=True)
    outcomes = d.drain()
    assert [o.recommendation_id for o in outcomes] == made
    assert list(d.claims) == [1, 4, 16, 64, 64, 1]  # 149 after the first; the last claim finds the queue short
    assert [o.status for o in outcomes].count("EXECUTED") == 1  # the rest: AAPL is held
    assert count(conn, "SELECT count(*) AS n FROM dispatch_recommendations WHERE status = 'PENDING'") == 0


def test_a_batch_that_straddles_the_position_limit_gives_the_fifth_position_to_exactly_one(harness, conn):
    h = harness()  # max_open_positions 5
    d = h.dispatcher()
    for t in ("HA", "HB", "HC", "HD"):
        add_position(conn, t, 1, 100)
    tickers = [f"N{chr(65 + i)}" for i in range(12)]
    recs = []
    for t in tickers:
        add_market(conn, t, NOW, 50)
        recs.append(add_recommendation(conn, t, NOW))
    d.refresh_account(force=True)
    outcomes = d.process_batch(12)
    assert list(d.claims) == [12]
    assert [o.status for o in outcomes] == ["EXECUTED"] + ["SKIPPED"] * 11
    assert {o.code for o in outcomes[1:]} == {"MAX_POSITIONS"}
    denied = recommendation(conn, recs[1])
    assert denied["decision"]["capacity"] == "denied on recheck under the account lock"
    assert gate(denied, "max_positions")["observed"] == 6  # the 5 held, the batch's included, plus this one
    assert count(conn, "SELECT count(*) AS n FROM active_positions WHERE status IN ('PENDING', 'OPEN')") == 5


def test_a_batch_with_a_recommendation_that_breaks_the_decision_is_decided_again_one_at_a_time(harness, conn):
    h = harness()
    d = h.dispatcher(option_data=CorruptOptionData())
    add_market(conn, "AAPL", NOW, 200)
    add_market(conn, "MSFT", NOW, 300)
    good_first = add_recommendation(conn, "MSFT", NOW - timedelta(seconds=2))
    bad = add_recommendation(conn, "AAPL", NOW - timedelta(seconds=1), instrument="OPTION")
    skip = add_recommendation(conn, "MSFT", NOW)
    d.refresh_account(force=True)
    outcomes = d.process_batch(3)
    assert [(o.recommendation_id, o.status) for o in outcomes] == [(good_first, "EXECUTED")]
    rest = d.drain()
    assert [(o.recommendation_id, o.status, o.code) for o in rest] == [
        (bad, "FAILED", "DECISION_ERROR"), (skip, "SKIPPED", "TICKER_COOLDOWN")]
    assert list(d.claims)[:2] == [3, 1]  # the failed batch of 3, then the same rows one by one
    assert count(conn, "SELECT count(*) AS n FROM dispatch_executions") == 1


# --- round trips -------------------------------------------------------------------------------------


# Round trips of a pool's connections: each wait on the server that does I/O.
RoundTrips = round_trip_counting()


def counted_dispatcher(h: Harness) -> Dispatcher:
    """A dispatcher on a counted pool; the simulated broker keeps its own (it stands in for HTTP).

    Both of the pool's connections have the claim prepared: whichever one a decision is handed,
    its count is that of a dispatcher that has run a while."""
    pool = ConnectionPool(h.db_url, min_size=2, max_size=2, connection_class=RoundTrips,
                          kwargs={"autocommit": True, "row_factory": dict_row}, open=True)
    h._pools.append(pool)
    with pool.connection() as first, pool.connection() as second:
        claims.prepare(first)
        claims.prepare(second)
    d = h.dispatcher(pool=pool)
    d.refresh_account(force=True)
    return d


def test_a_lone_skip_costs_two_round_trips_begin_with_the_claim_then_the_record_with_commit(harness, conn):
    d = counted_dispatcher(harness())
    add_market(conn, "AAPL", NOW, 200)
    add_position(conn, "AAPL", 1, 200)  # held: every AAPL entry is skipped
    add_recommendation(conn, "AAPL", NOW - timedelta(seconds=1))
    assert d.process_next().status == "SKIPPED"  # the first decision warms the caches
    add_recommendation(conn, "AAPL", NOW)
    before = RoundTrips.waits
    assert d.process_next().status == "SKIPPED"
    assert RoundTrips.waits - before == 2


def submissions_after_round_trips(d: Dispatcher) -> list[int]:
    """The round trips made before each order left, from the next decision on."""
    seen: list[int] = []
    start = RoundTrips.waits
    submit = d.broker.submit_order

    def counting_submit(order):
        seen.append(RoundTrips.waits - start)
        return submit(order)

    d.broker.submit_order = counting_submit
    return seen


def test_a_lone_order_costs_two_round_trips_until_it_leaves_its_claim_taken_under_the_capacity_lock(
        harness, conn):
    d = counted_dispatcher(harness())
    for t in ("AAPL", "MSFT"):
        add_market(conn, t, NOW, 200)
    add_recommendation(conn, "AAPL", NOW - timedelta(seconds=1))
    assert d.process_next().status == "EXECUTED"
    add_recommendation(conn, "MSFT", NOW)
    seen = submissions_after_round_trips(d)
    assert d.process_next().status == "EXECUTED"
    assert seen == [2]  # BEGIN + capacity lock + claim; intent + COMMIT
    assert count(conn, "SELECT count(*) AS n FROM active_positions WHERE status = 'OPEN'") == 2


def test_a_lone_order_on_an_idle_queue_costs_at_most_four_round_trips_counted_whole_intent_and_answer(
        harness, conn):
    d = counted_dispatcher(harness())
    for t in ("AAPL", "MSFT"):
        add_market(conn, t, NOW, 200)
    add_recommendation(conn, "AAPL", NOW - timedelta(seconds=1))
    assert d.process_next().status == "EXECUTED"  # the first decision warms the caches
    rec = add_recommendation(conn, "MSFT", NOW)
    before = RoundTrips.waits
    outcome = d.process_next()
    trips = RoundTrips.waits - before
    assert (outcome.recommendation_id, outcome.status, outcome.code) == (rec, "EXECUTED", "ORDER_FILLED")
    assert trips <= 4
    assert trips == 3  # BEGIN + capacity lock + claim; intent + COMMIT; the broker's answer in one statement
    row = conn.execute("""SELECT e.status, e.filled_qty, e.version, p.status AS position_status, p.qty,
                                 r.status AS rec_status, r.outcome_code
                          FROM dispatch_executions e JOIN active_positions p ON p.id = e.position_id
                          JOIN dispatch_recommendations r ON r.id = e.recommendation_id
                          WHERE e.recommendation_id = %s""", (rec,)).fetchone()
    assert (row["status"], row["version"], row["position_status"], row["qty"], row["rec_status"],
            row["outcome_code"]) == ("FILLED", 1, "OPEN", row["filled_qty"], "EXECUTED", "ORDER_FILLED")


class RecordingBroker(PassThroughBroker):
    """Records submissions and account reads in order; each submission takes `submit_takes` of the clock."""

    def __init__(self, inner: SimBroker, clock: FixedClock, submit_takes: timedelta = timedelta(seconds=1.5)):
        super().__init__(inner)
        self.clock, self.submit_takes = clock, submit_takes
        self.calls: list[str] = []
        self.on_account = lambda: None

    def submit_order(self, order):
        self.calls.append("submit")
        self.clock.advance(self.submit_takes)  # past FILL_REFRESH_SECONDS: each fill may refresh the account
        return super().submit_order(order)

    def get_account(self):
        self.calls.append("account")
        self.on_account()
        return super().get_account()


def test_a_fills_account_refresh_waits_until_the_queue_is_drained_then_runs_once(harness, conn):
    h = harness()
    broker = RecordingBroker(h.broker, h.clock)
    d = h.dispatcher(broker)
    for t in ("AAPL", "MSFT"):
        add_market(conn, t, NOW, 200)
    d.refresh_account(force=True)
    broker.calls.clear()
    add_recommendation(conn, "AAPL", NOW - timedelta(seconds=1))
    add_recommendation(conn, "MSFT", NOW)
    assert [o.status for o in d.drain()] == ["EXECUTED", "EXECUTED"]
    assert broker.calls == ["submit", "submit", "account"]  # not between the two orders


def test_the_loop_puts_off_a_fills_account_refresh_while_notifies_come_and_does_it_once_quiet(harness, conn, db_url):
    h = harness()
    broker = RecordingBroker(h.broker, h.clock)
    d = h.dispatcher(broker)
    add_market(conn, "AAPL", NOW, 200)
    d.refresh_account(force=True)
    broker.calls.clear()
    add_recommendation(conn, "AAPL", NOW)
    assert [o.status for o in d.drain(defer=True)] == ["EXECUTED"]
    assert broker.calls == ["submit"]
    stop = threading.Event()
    with connect(db_url) as listener:
        listener.execute("LISTEN recommendations")
        conn.execute("SELECT pg_notify('recommendations', %s)", (ACCOUNT,))
        d._wait_for_work(listener, stop)  # woken at once: the next recommendation comes first
        assert broker.calls == ["submit"]
        broker.on_account = stop.set
        started = time.monotonic()
        d._wait_for_work(listener, stop)  # nothing comes: the refresh is done once the queue is quiet
    assert broker.calls == ["submit", "account"]
    assert time.monotonic() - started < 0.5  # a quiet slice, not the poll interval (1 s)


def test_orders_in_a_batch_each_take_the_capacity_lock_with_their_recheck_in_one_round_trip(harness, conn):
    d = counted_dispatcher(harness())
    for t in ("AAPL", "MSFT", "NVDA"):
        add_market(conn, t, NOW, 200)
    add_recommendation(conn, "AAPL", NOW - timedelta(seconds=2))
    assert d.process_next().status == "EXECUTED"
    add_recommendation(conn, "MSFT", NOW - timedelta(seconds=1))
    add_recommendation(conn, "NVDA", NOW)
    seen = submissions_after_round_trips(d)
    assert [o.status for o in d.process_batch(2)] == ["EXECUTED", "EXECUTED"]
    assert seen[0] == 6  # BEGIN + claim; lock + recheck, intent; lock + recheck, intent; COMMIT


def test_a_claim_on_a_connection_the_pool_replaced_prepares_its_queries_again(harness, conn, db_url):
    h = harness()
    d = h.dispatcher()
    for t in ("AAPL", "MSFT"):
        add_market(conn, t, NOW, 200)
    d.refresh_account(force=True)
    add_recommendation(conn, "AAPL", NOW - timedelta(seconds=1))
    assert d.process_next().status == "EXECUTED"
    conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid <> pg_backend_pid() "
                 "AND datname = current_database()")
    wait_until(lambda: count(conn, "SELECT count(*) AS n FROM pg_stat_activity WHERE pid <> pg_backend_pid() "
                                 "AND datname = current_database() AND backend_type = 'client backend'") == 0, 5)
    rec = add_recommendation(conn, "MSFT", NOW)
    outcome = d.process_next()  # the pool's check replaces the dead connections on checkout
    assert (outcome.recommendation_id, outcome.status) == (rec, "EXECUTED")  # the claim and the recheck ran


def test_a_claim_whose_prepared_statement_was_deallocated_prepares_it_again_and_claims(harness, conn):
    h = harness()
    pool = h.new_pool(min_size=2, max_size=2)
    d = h.dispatcher(pool=pool)
    for t in ("AAPL", "MSFT"):
        add_market(conn, t, NOW, 200)
    d.refresh_account(force=True)
    add_recommendation(conn, "AAPL", NOW - timedelta(seconds=1))
    assert d.process_next().status == "EXECUTED"
    with pool.connection() as one, pool.connection() as other:  # as psycopg does after a rollback
        for pooled in (one, other):
            pooled.execute("DEALLOCATE ALL")
            assert pooled.execute("SELECT count(*) AS n FROM pg_prepared_statements").fetchone()["n"] == 0
    rec = add_recommendation(conn, "MSFT", NOW)
    outcome = d.process_next()
    assert (outcome.recommendation_id, outcome.status) == (rec, "EXECUTED")
    assert list(d.claims) == [1, 1]  # claimed once, not failed and retried as a batch

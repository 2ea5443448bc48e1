"""Exits end to end: the position manager writes EXITs, the dispatcher executes them, the kill
switch flattens the book. Real Postgres, the simulated broker, the real dispatcher.

The rules themselves, at every boundary, are in tests/test_exits.py; here each path from a
price (or a kill switch) to a closed position is run once, with the rows it leaves asserted.
"""

from __future__ import annotations

import threading
from datetime import datetime, timedelta
from decimal import Decimal

import pytest

from services.adapters.postgres import kill_switch
from services.adapters.sim.broker import SimBroker
from services.common.clock import FixedClock
from services.common.db import connect, make_pool
from services.common.market_calendar import nyse_calendar
from services.dispatcher.main import Dispatcher
from services.domain.order_pricing import Quote
from services.position_manager.main import run_position_cycle
from tests.alert_doubles import installed, webhook  # noqa: F401
from tests.factories import ACCOUNT, add_bar, add_market, add_recommendation, et, pinned_params, recommendation

NOW = et("2026-11-30", "10:00")  # a Monday session
CALENDAR = nyse_calendar()
BASE = {
    "risk": {"max_open_positions": 25, "max_notional_exposure": 100_000, "max_notional_per_trade": 2_000,
             "max_daily_loss": 500},
    "fees": {"per_share": "0.01", "per_contract": "0.65"},
}


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class Book:
    """A dispatcher and the simulated broker over one test database, on a fixed clock."""

    def __init__(self, db_url: str, overrides: dict | None = None):
        self.db_url = db_url
        self.clock = FixedClock(NOW)
        self.params = pinned_params(_merge(BASE, overrides or {}))
        fees = self.params.current().params.fees
        self.pools = []
        self.pool = self.new_pool()
        self.broker = SimBroker(self.pool, ACCOUNT, self.clock, fee_per_share=fees.per_share,
                                fee_per_contract=fees.per_contract)
        self.dispatcher = self.new_dispatcher()

    def new_pool(self):
        pool = make_pool(self.db_url)
        self.pools.append(pool)
        return pool

    def new_dispatcher(self) -> Dispatcher:
        return Dispatcher(self.new_pool(), self.broker, self.params, ACCOUNT, clock=self.clock, calendar=CALENDAR)

    def at(self, when: datetime) -> None:
        self.clock.set(when)

    def buy(self, conn, ticker: str, price, strategy: str = "day_trade") -> dict:
        add_market(conn, ticker, self.clock.now(), price)
        rec = add_recommendation(conn, ticker, self.clock.now(), strategy=strategy)
        self.dispatcher.refresh_account(force=True)
        self.dispatcher.drain()
        assert recommendation(conn, rec)["status"] == "EXECUTED", recommendation(conn, rec)
        return position(conn, ticker)

    def manage(self, conn, quotes=None):
        return run_position_cycle(conn, ACCOUNT, self.params.current(), self.clock.now(), CALENDAR, quotes)

    def close(self) -> None:
        for p in self.pools:
            p.close()


@pytest.fixture
def book(db_url):
    made = []

    def make(overrides: dict | None = None) -> Book:
        b = Book(db_url, overrides)
        made.append(b)
        return b

    yield make
    for b in made:
        b.close()


def position(conn, ticker: str) -> dict:
    return conn.execute("SELECT * FROM active_positions WHERE account_id = %s AND ticker = %s ORDER BY id DESC LIMIT 1",
                        (ACCOUNT, ticker)).fetchone()


def exits_of(conn, position_id: int) -> list[dict]:
    return conn.execute("SELECT * FROM dispatch_recommendations WHERE action = 'EXIT' AND position_id = %s ORDER BY id",
                        (position_id,)).fetchall()


def bar_at(conn, ticker: str, now: datetime, close) -> None:
    """The bar that ended at `now` (fresh for the rules and the gates)."""
    add_bar(conn, ticker, now.replace(second=0, microsecond=0) - timedelta(minutes=1), close)


# --- one rule, end to end --------------------------------------------------------------------------


def test_stop_loss_closes_the_position_through_the_dispatcher_with_fees_in_its_pnl(book, conn):
    b = book()
    entry = b.buy(conn, "AAPL", 200)
    assert (entry["status"], entry["strategy"], entry["fees"]) == ("OPEN", "day_trade", Decimal("0.10"))
    assert entry["high_water_mark"] == entry["avg_price"]  # the mark starts at the entry

    b.at(NOW + timedelta(minutes=5))
    bar_at(conn, "AAPL", b.clock.now(), 195)  # -2.6% against the 2% day-trade stop
    cycle = b.manage(conn)
    [exit_] = cycle.exits
    assert (exit_.code, exit_.ticker) == ("STOP_LOSS", "AAPL") and exit_.recommendation_id is not None
    rec = recommendation(conn, exit_.recommendation_id)
    assert (rec["action"], rec["position_id"], rec["exit_reason"], rec["status"]) == (
        "EXIT", entry["id"], "STOP_LOSS", "PENDING")
    rules = {r["name"]: r for r in rec["reason"]["rules"]}
    assert rules["stop_loss"]["fired"] is True and rules["take_profit"]["fired"] is False

    b.dispatcher.drain()
    assert (recommendation(conn, rec["id"])["status"], recommendation(conn, rec["id"])["outcome_code"]) == (
        "EXECUTED", "ORDER_FILLED")
    closed = position(conn, "AAPL")
    assert (closed["status"], closed["exit_reason"], closed["fees"]) == ("CLOSED", "STOP_LOSS", Decimal("0.20"))
    gross = (closed["close_price"] - closed["avg_price"]) * closed["qty"]
    assert closed["realized_pnl"] == gross - Decimal("0.20")
    # The broker charged the same fees: with the book flat, its equity-based day P&L is the realized P&L.
    account = b.broker.get_account()
    assert account.equity - account.last_equity == closed["realized_pnl"]

    # The next cycle has nothing to judge, and writes nothing.
    assert b.manage(conn).exits == []


def test_trailing_stop_keeps_its_high_water_mark_across_a_restart_of_the_manager(book, conn):
    b = book()
    entry = b.buy(conn, "MSFT", 200)
    avg = entry["avg_price"]

    b.at(NOW + timedelta(minutes=3))
    # +3%: past the 1% activation of the day-trade trailing stop, under its 4% target.
    bar_at(conn, "MSFT", b.clock.now(), avg * Decimal("1.03"))
    assert b.manage(conn).exits == []
    high = position(conn, "MSFT")["high_water_mark"]
    assert high == avg * Decimal("1.03")

    # A new manager process: nothing in memory, only the row. The latest bar is lower than the
    # mark but above the trigger: it holds, and the mark does not come down.
    b.at(NOW + timedelta(minutes=4))
    trigger = high * (1 - Decimal("0.015"))
    bar_at(conn, "MSFT", b.clock.now(), trigger + Decimal("0.05"))
    assert run_position_cycle(conn, ACCOUNT, b.params.current(), b.clock.now(), nyse_calendar()).exits == []
    assert position(conn, "MSFT")["high_water_mark"] == high

    # At the trigger, computed from the persisted mark, it fires.
    b.at(NOW + timedelta(minutes=5))
    bar_at(conn, "MSFT", b.clock.now(), trigger)
    [exit_] = b.manage(conn).exits
    assert exit_.code == "TRAILING_STOP"
    rules = {r["name"]: r for r in recommendation(conn, exit_.recommendation_id)["reason"]["rules"]}
    assert Decimal(rules["trailing_stop"]["limit"]) == trigger
    b.dispatcher.drain()
    assert position(conn, "MSFT")["exit_reason"] == "TRAILING_STOP"


def test_two_managers_at_once_write_one_exit_per_position(book, db_url, conn):
    b = book()
    tickers = ["AAPL", "MSFT", "NVDA", "AMD"]
    for t in tickers:
        b.buy(conn, t, 100)
    b.at(NOW + timedelta(minutes=5))
    for t in tickers:
        bar_at(conn, t, b.clock.now(), 90)
    start = threading.Barrier(2)
    written = []

    def manager():
        with connect(db_url) as c:
            start.wait()
            written.append(b.manage(c))

    threads = [threading.Thread(target=manager) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    per_position = conn.execute(
        "SELECT position_id, count(*)::int AS n FROM dispatch_recommendations WHERE action = 'EXIT' GROUP BY 1").fetchall()
    assert sorted(r["n"] for r in per_position) == [1, 1, 1, 1]
    assert sum(c.counts["exits"] for c in written) == 4

    # While they are live, a third cycle writes none; after they filled, nothing is OPEN to exit.
    assert b.manage(conn).counts["exits"] == 0
    b.dispatcher.drain()
    assert b.manage(conn).counts["exits"] == 0
    sells = conn.execute("SELECT symbol, count(*)::int AS n FROM sim_orders WHERE side = 'sell' GROUP BY 1").fetchall()
    assert sorted((r["symbol"], r["n"]) for r in sells) == [(t, 1) for t in sorted(tickers)]


def test_an_exit_written_for_a_position_since_closed_does_not_close_the_ticker_next_one(book, conn):
    b = book({"risk": {"max_trades_per_ticker_per_day": 5}})
    first = b.buy(conn, "AAPL", 200)
    b.at(NOW + timedelta(minutes=1))
    bar_at(conn, "AAPL", b.clock.now(), 190)
    [stop] = b.manage(conn).exits
    b.dispatcher.drain()
    assert position(conn, "AAPL")["status"] == "CLOSED"

    b.at(NOW + timedelta(minutes=40))  # past the ticker cooldown: a new position in AAPL
    second = b.buy(conn, "AAPL", 191)
    assert second["id"] != first["id"]
    stale = conn.execute(
        """INSERT INTO dispatch_recommendations (account_id, ticker, action, instrument, strategy, created_at,
                                                 position_id, exit_reason)
           VALUES (%s, 'AAPL', 'EXIT', 'STOCK', 'day_trade', %s, %s, 'STOP_LOSS') RETURNING id""",
        (ACCOUNT, b.clock.now(), first["id"])).fetchone()["id"]
    b.dispatcher.drain()
    rec = recommendation(conn, stale)
    assert (rec["status"], rec["outcome_code"]) == ("SKIPPED", "EXIT_POSITION_GONE")
    assert position(conn, "AAPL")["status"] == "OPEN"


# --- stale data, the market's hours -----------------------------------------------------------------


def test_a_position_whose_bars_stopped_is_flagged_once_and_closed_by_the_end_of_day_rule(book, conn):
    b = book()
    entry = b.buy(conn, "F", 11, strategy="swing_trade")
    b.at(NOW + timedelta(hours=1))  # no bar for an hour: stale (swing: 300 s)
    cycle = b.manage(conn)
    assert cycle.exits == [] and [f[2].split(":")[0] for f in cycle.flags] == ["STALE_DATA"]
    flagged = position(conn, "F")
    assert flagged["stale_since"] == b.clock.now() and flagged["high_water_mark"] == entry["avg_price"]

    b.at(et("2026-11-30", "15:44"))
    assert b.manage(conn).exits == []
    assert position(conn, "F")["stale_since"] == NOW + timedelta(hours=1)  # flagged once, not re-stamped

    b.at(et("2026-11-30", "15:45"))  # 15 minutes before the close: a stale swing trade is flattened
    [exit_] = b.manage(conn).exits
    assert exit_.code == "END_OF_DAY"
    b.dispatcher.refresh_account(force=True)
    b.dispatcher.drain()
    rec = recommendation(conn, exit_.recommendation_id)
    assert rec["status"] == "EXECUTED"
    freshness = next(g for g in rec["gate_results"] if g["name"] == "bar_freshness")
    assert freshness["passed"] is True and "STALE_BAR" in freshness["reason"]  # noted, not blocking
    assert position(conn, "F")["exit_reason"] == "END_OF_DAY"


def test_no_exit_is_written_while_the_market_is_closed_but_the_marks_are_kept(book, conn):
    b = book()
    b.buy(conn, "AAPL", 200)
    b.at(et("2026-11-30", "16:30"))
    add_bar(conn, "AAPL", et("2026-11-30", "15:59"), 150)
    cycle = b.manage(conn)
    assert cycle.held_back.startswith("MARKET_CLOSED")
    # What would close it at the open is known (the day trade's end-of-day deadline has passed)...
    assert [e.code for e in cycle.exits] == ["END_OF_DAY"] and cycle.exits[0].recommendation_id is None
    # ...but nothing is written for the market-closed gate to refuse.
    assert conn.execute("SELECT count(*) AS n FROM dispatch_recommendations WHERE action = 'EXIT'").fetchone()["n"] == 0
    assert position(conn, "AAPL")["market_price"] == Decimal("150")


# --- options -----------------------------------------------------------------------------------------

OCC = "SPY261204C00600000"  # expires Friday 2026-12-04


def _option_position(conn, opened_at: datetime, strategy: str = "day_trade") -> int:
    return conn.execute(
        """INSERT INTO active_positions (account_id, ticker, instrument, symbol, side, qty, multiplier, avg_price,
                                         status, opened_at, updated_at, strategy)
           VALUES (%s, 'SPY', 'OPTION', %s, 'long', 2, 100, 3.00, 'OPEN', %s, %s, %s) RETURNING id""",
        (ACCOUNT, OCC, opened_at, opened_at, strategy)).fetchone()["id"]


def test_an_option_is_marked_at_mid_and_closed_at_its_expiry_day_cutoff(book, conn):
    b = book()
    opened = et("2026-12-04", "12:00")
    pid = _option_position(conn, opened)
    quotes = {OCC: Quote(Decimal("3.10"), Decimal("3.30"))}
    b.at(et("2026-12-04", "14:29"))
    assert b.manage(conn, lambda symbols, now: {s: quotes.get(s) for s in symbols}).exits == []
    assert position(conn, "SPY")["market_price"] == Decimal("3.20")

    b.at(et("2026-12-04", "14:30"))  # 90 minutes before the 16:00 close of its last trading day
    [exit_] = b.manage(conn, lambda symbols, now: {s: quotes.get(s) for s in symbols}).exits
    assert (exit_.position_id, exit_.code) == (pid, "EXPIRY_CUTOFF")


def test_an_option_with_a_crossed_quote_is_not_judged_on_it(book, conn):
    b = book()
    _option_position(conn, et("2026-12-01", "09:45"))
    b.at(et("2026-12-01", "10:00"))
    crossed = {OCC: Quote(Decimal("1.00"), Decimal("0.90"))}  # would be a stop at mid 0.95
    cycle = b.manage(conn, lambda symbols, now: crossed)
    assert cycle.exits == [] and cycle.flags[0][2].startswith("STALE_DATA")
    assert position(conn, "SPY")["market_price"] is None


# --- the kill switch halts losses ---------------------------------------------------------------------


def test_daily_loss_trip_flattens_twenty_positions_once_and_nothing_reopens(book, conn):
    b = book()
    tickers = [f"T{chr(65 + i)}" for i in range(20)]  # TA .. TT
    for t in tickers:
        b.buy(conn, t, 100)  # 20 x 20 shares at ~100: 40,000 of exposure
    b.at(NOW + timedelta(minutes=2))
    for t in tickers:
        bar_at(conn, t, b.clock.now(), 98)  # -2%: about -800 against the 500 limit
    b.dispatcher.refresh_account(force=True)
    ks = kill_switch.read_state(conn, ACCOUNT)
    assert (ks["state"], ks["changed_by"]) == ("REDUCING", "daily-loss-limit")
    written = conn.execute("SELECT position_id, exit_reason, status FROM dispatch_recommendations "
                           "WHERE action = 'EXIT'").fetchall()
    assert len(written) == 20 and {w["exit_reason"] for w in written} == {"DAILY_LOSS_FLATTEN"}

    # Whoever else looks now (the manager, the dispatcher's sweep) writes nothing more.
    assert b.manage(conn).counts["exits"] == 0
    assert b.dispatcher.enforce_kill_switch()["exits"] == 0
    b.dispatcher.drain()
    rows = conn.execute("SELECT status, exit_reason FROM active_positions").fetchall()
    assert {(r["status"], r["exit_reason"]) for r in rows} == {("CLOSED", "DAILY_LOSS_FLATTEN")}
    sells = conn.execute("SELECT symbol, count(*)::int AS n, sum(qty) AS q FROM sim_orders WHERE side = 'sell' "
                         "GROUP BY 1").fetchall()
    assert len(sells) == 20 and {(r["n"], r["q"]) for r in sells} == {(1, Decimal(20))}

    # No entry reopens the book in this session, across a restart of the dispatcher.
    b.at(NOW + timedelta(minutes=45))
    restarted = b.new_dispatcher()
    add_market(conn, "TA", b.clock.now(), 99)
    again = add_recommendation(conn, "TA", b.clock.now())
    restarted.refresh_account(force=True)
    restarted.drain()
    assert recommendation(conn, again)["outcome_code"] == "KILL_SWITCH_REDUCING"
    assert restarted.enforce_kill_switch() == {"exits": 0, "cancels": 0}
    assert kill_switch.read_state(conn, ACCOUNT)["state"] == "REDUCING"
    assert conn.execute("SELECT count(*)::int AS n FROM active_positions WHERE status <> 'CLOSED'").fetchone()["n"] == 0


def test_reduce_only_policy_leaves_the_book_as_it_is(book, conn):
    b = book({"risk": {"on_daily_loss": "reduce_only"}})
    b.buy(conn, "AAPL", 100)
    b.buy(conn, "MSFT", 100)
    b.at(NOW + timedelta(minutes=2))
    for t in ("AAPL", "MSFT"):
        bar_at(conn, t, b.clock.now(), 85)  # far past the loss limit
    b.dispatcher.refresh_account(force=True)
    assert kill_switch.read_state(conn, ACCOUNT)["state"] == "REDUCING"
    assert b.dispatcher.enforce_kill_switch()["exits"] == 0
    reasons = {e.code for e in b.manage(conn).exits}
    assert reasons == {"STOP_LOSS"}  # the rules still close positions; the switch itself does not


def test_the_kill_switch_cancels_entry_orders_still_working(book, conn):
    # Stock entries as limits at the last price: the simulated ask is above it, so they rest.
    b = book({"execution": {"stock_order_type": "limit", "stock_limit_offset_bps": 0}})
    add_market(conn, "AAPL", NOW, 200)
    rec = add_recommendation(conn, "AAPL", NOW)
    b.dispatcher.refresh_account(force=True)
    b.dispatcher.drain()
    assert recommendation(conn, rec)["status"] == "SUBMITTING"
    assert b.dispatcher.enforce_kill_switch() == {"exits": 0, "cancels": 0}  # ACTIVE: it works on

    with conn.transaction():
        kill_switch.set_state(conn, ACCOUNT, "HALTED", "test halt", "operator:test", NOW)
    assert b.dispatcher.enforce_kill_switch() == {"exits": 0, "cancels": 1}
    done = recommendation(conn, rec)
    assert (done["status"], done["outcome_code"]) == ("REJECTED", "ORDER_CANCELED_KILL_SWITCH")
    execution = conn.execute("SELECT status, cancel_reason FROM dispatch_executions").fetchone()
    assert (execution["status"], execution["cancel_reason"]) == ("CANCELED", "KILL_SWITCH")
    assert position(conn, "AAPL")["status"] == "CANCELLED"
    assert b.dispatcher.enforce_kill_switch() == {"exits": 0, "cancels": 0}


def _cli(b: Book, monkeypatch, *argv) -> int:
    """An operator command against the book's database, on the book's clock."""
    from services.cli import admin, main

    monkeypatch.setenv("DATABASE_URL", b.db_url)
    monkeypatch.setattr(admin, "SystemClock", lambda: b.clock)
    return main([*argv, "--account", ACCOUNT])


def test_halt_with_flatten_lets_out_only_the_operators_exits(book, conn, db_url, monkeypatch, capsys):
    b = book()
    b.buy(conn, "AAPL", 200)
    b.buy(conn, "MSFT", 100)
    b.at(NOW + timedelta(minutes=1))
    for t, p in (("AAPL", 200), ("MSFT", 100)):
        bar_at(conn, t, b.clock.now(), p)
    assert _cli(b, monkeypatch, "halt", "--flatten", "--reason", "broker incident", "--by", "operator:test") == 0
    out = capsys.readouterr().out
    assert "HALTED" in out and "2 exit(s) queued" in out
    ks = kill_switch.read_state(conn, ACCOUNT)
    assert (ks["state"], ks["flatten"]) == ("HALTED", True)

    buy = add_recommendation(conn, "NVDA", b.clock.now())
    add_market(conn, "NVDA", b.clock.now(), 50)
    b.dispatcher.drain()
    assert recommendation(conn, buy)["outcome_code"] == "KILL_SWITCH_HALTED"
    rows = conn.execute("SELECT ticker, status, exit_reason FROM active_positions ORDER BY ticker").fetchall()
    assert [(r["ticker"], r["status"], r["exit_reason"]) for r in rows] == [
        ("AAPL", "CLOSED", "OPERATOR_FLATTEN"), ("MSFT", "CLOSED", "OPERATOR_FLATTEN")]


def test_a_plain_halt_stops_the_managers_exits_and_the_desks(book, conn):
    b = book()
    b.buy(conn, "AAPL", 200)
    with conn.transaction():
        kill_switch.set_state(conn, ACCOUNT, "HALTED", "test halt", "operator:test", NOW)
    b.at(NOW + timedelta(minutes=1))
    bar_at(conn, "AAPL", b.clock.now(), 150)
    cycle = b.manage(conn)
    assert cycle.held_back.startswith("KILL_SWITCH_HALTED") and cycle.counts["exits"] == 0
    desk = add_recommendation(conn, "AAPL", b.clock.now(), action="EXIT")
    b.dispatcher.drain()
    assert recommendation(conn, desk)["outcome_code"] == "KILL_SWITCH_HALTED"
    assert position(conn, "AAPL")["status"] == "OPEN"


def test_flatten_one_ticker_closes_it_without_halting(book, conn, db_url, monkeypatch, capsys):
    b = book()
    b.buy(conn, "AAPL", 200)
    b.buy(conn, "MSFT", 100)
    assert _cli(b, monkeypatch, "flatten", "--ticker", "aapl", "--by", "operator:test") == 0
    assert "1 exit(s) queued" in capsys.readouterr().out
    b.dispatcher.drain()
    assert (position(conn, "AAPL")["status"], position(conn, "AAPL")["exit_reason"]) == ("CLOSED", "OPERATOR_FLATTEN")
    assert position(conn, "MSFT")["status"] == "OPEN"
    assert kill_switch.read_state(conn, ACCOUNT) is None  # the account was never halted
    # Asked again, nothing is left to close.
    assert _cli(b, monkeypatch, "flatten", "--ticker", "AAPL") == 0
    assert "nothing to close" in capsys.readouterr().out


def test_status_lists_todays_closed_positions_with_exit_reason_fees_and_pnl(book, conn):
    from services.adapters.postgres.status import status_report
    from services.cli.admin import format_status

    b = book()
    b.buy(conn, "AAPL", 200)
    b.at(NOW + timedelta(minutes=5))
    bar_at(conn, "AAPL", b.clock.now(), 195)
    b.manage(conn)
    b.dispatcher.drain()
    report = status_report(conn, ACCOUNT, b.clock.now())
    [closed] = report["closed_today"]
    assert (closed["ticker"], closed["exit_reason"], closed["fees"]) == ("AAPL", "STOP_LOSS", Decimal("0.20"))
    assert report["realized_today"] == closed["realized_pnl"] < 0
    text = format_status(report)
    assert "closed today  1 position(s), realized" in text and "STOP_LOSS" in text


def test_a_position_going_stale_and_a_flatten_each_reach_the_operator_once(book, conn, db_url, monkeypatch, webhook):
    from services.adapters.alerts import Alerter, WebhookSink

    b = book()
    b.buy(conn, "F", 11, strategy="swing_trade")
    with installed(Alerter([WebhookSink(webhook.url)], dedupe_seconds=0)) as a:
        b.at(NOW + timedelta(hours=1))
        b.manage(conn)
        b.at(NOW + timedelta(hours=1, minutes=1))
        b.manage(conn)  # still stale: not said again
        assert _cli(b, monkeypatch, "flatten", "--ticker", "F", "--by", "operator:test") == 0
        assert a.flush(5)
    events = [(x["alert"]["event"], x["alert"]["subject"]) for x in webhook.bodies]
    pid = position(conn, "F")["id"]
    assert events == [("DATA_STALE", f"{ACCOUNT}:position:{pid}"), ("FLATTEN", ACCOUNT)]
    assert webhook.bodies[0]["alert"]["fields"]["ticker"] == "F"
    assert (webhook.bodies[1]["alert"]["fields"]["positions"], webhook.bodies[1]["alert"]["fields"]["ticker"]) == (1, "F")


def test_halt_with_flatten_lets_a_rules_exit_already_queued_go_out_too(book, conn, monkeypatch):
    b = book()
    b.buy(conn, "AAPL", 200)
    b.at(NOW + timedelta(minutes=5))
    bar_at(conn, "AAPL", b.clock.now(), 190)
    [stop] = b.manage(conn).exits  # a STOP_LOSS exit, PENDING: the flatten writes none beside it
    assert _cli(b, monkeypatch, "halt", "--flatten", "--reason", "incident", "--by", "operator:test") == 0
    b.dispatcher.drain()
    rec = recommendation(conn, stop.recommendation_id)
    assert (rec["status"], rec["exit_reason"]) == ("EXECUTED", "STOP_LOSS")
    assert next(g for g in rec["gate_results"] if g["name"] == "kill_switch")["passed"] is True
    assert position(conn, "AAPL")["status"] == "CLOSED"


def test_flatten_while_the_market_is_closed_is_refused_and_writes_nothing(book, conn, monkeypatch, capsys):
    b = book()
    b.buy(conn, "AAPL", 200)
    b.at(et("2026-11-30", "17:00"))
    assert _cli(b, monkeypatch, "flatten") == 1
    assert "the market is closed" in capsys.readouterr().err
    assert conn.execute("SELECT count(*)::int AS n FROM dispatch_recommendations WHERE action = 'EXIT'").fetchone()["n"] == 0


def test_a_flatten_whose_exit_just_ended_waits_a_minute_before_writing_another(book, conn):
    from services.adapters.postgres import exits_repo

    b = book()
    pos = b.buy(conn, "AAPL", 200)
    now = b.clock.now()
    conn.execute("""INSERT INTO dispatch_recommendations (account_id, ticker, action, instrument, strategy, created_at,
                                                          status, decided_at, position_id, exit_reason, outcome_code)
                    VALUES (%s, 'AAPL', 'EXIT', 'STOCK', 'day_trade', %s, 'REJECTED', %s, %s, 'DAILY_LOSS_FLATTEN',
                            'BROKER_REJECTED')""", (ACCOUNT, now, now, pos["id"]))
    assert exits_repo.flatten(conn, ACCOUNT, "DAILY_LOSS_FLATTEN", "sweep", now + timedelta(seconds=59)) == []
    [again] = exits_repo.flatten(conn, ACCOUNT, "DAILY_LOSS_FLATTEN", "sweep", now + timedelta(seconds=61))
    assert again["position_id"] == pos["id"]

"""The IV percentile gate on the dispatcher's path: IV comes from iv_history, never from the contract.

The seed's `validate_option_contract` passes a contract without an IV percentile as "not
evaluated" (tests/test_options.py). The dispatcher always supplies the percentile from its own
history, so its rules stand: too short a history is "not evaluated" and the entry proceeds; a
history that says the IV is high denies the option.
"""

from __future__ import annotations

from datetime import date

import pytest

from services.common.clock import FixedClock
from services.common.db import make_pool
from services.common.market_calendar import et_date
from services.common.params import load_params_file
from services.adapters.postgres.iv_history import record_atm_iv
from services.dispatcher.main import Dispatcher, StaticParams
from services.adapters.option_data import OptionData
from services.adapters.sim.broker import SimBroker
from services.adapters.sim.market import SimOptionMarket
from tests.factories import ACCOUNT, add_market, add_recommendation, et, recommendation

NOW = et("2026-11-30", "10:00")  # a Monday session, after the opening block


@pytest.fixture
def dispatcher(db_url):
    pool = make_pool(db_url)
    clock = FixedClock(NOW)
    broker = SimBroker(pool, ACCOUNT, clock)
    d = Dispatcher(pool, broker, StaticParams(load_params_file()), ACCOUNT, clock=clock,
                   option_data=OptionData(SimOptionMarket(pool).chain))
    d.refresh_account(force=True)
    yield d
    pool.close()


def option_entry(conn) -> int:
    add_market(conn, "AAPL", NOW, 200)
    return add_recommendation(conn, "AAPL", NOW, instrument="OPTION", strategy="day_trade")


def iv_gate(gates: list[dict]) -> dict:
    return next(g for g in gates if g["name"].endswith("option_iv_percentile"))


def test_option_entry_with_too_short_iv_history_records_the_gate_not_evaluated_and_proceeds(dispatcher, conn, calendar):
    sessions = calendar.sessions_between(date(2026, 11, 1), date(2026, 11, 27))[-3:]
    for s in sessions:
        record_atm_iv(conn, "AAPL", s.day, 0.30, NOW)
    rid = option_entry(conn)

    dispatcher.drain()

    ex = conn.execute("SELECT instrument, status, option_gates FROM dispatch_executions WHERE recommendation_id = %s",
                      (rid,)).fetchone()
    min_sessions = load_params_file().params.options.iv_min_history_sessions
    expected = (True, "OK", f"OK: iv_percentile not evaluated: 3 sessions of history (min {min_sessions})", None)
    assert ex is not None and ex["instrument"] == "OPTION", ex
    gate = iv_gate(ex["option_gates"])
    assert (gate["passed"], gate["code"], gate["reason"], gate["observed"]) == expected
    rec = recommendation(conn, rid)
    gate = iv_gate(rec["gate_results"])
    assert (gate["passed"], gate["code"], gate["reason"], gate["observed"]) == expected
    assert rec["decision"].get("fallback") is None
    # Today's ATM IV joined the history, for the sessions to come.
    days = [r["session_day"] for r in conn.execute(
        "SELECT session_day FROM iv_history WHERE ticker = 'AAPL' ORDER BY session_day").fetchall()]
    assert days == [s.day for s in sessions] + [et_date(NOW)]


def test_option_entry_whose_iv_history_says_high_is_denied_the_option(dispatcher, conn, calendar):
    # 30 earlier sessions with an IV far below today's: today's percentile is 100.
    for s in calendar.sessions_between(date(2026, 10, 1), date(2026, 11, 27))[-30:]:
        record_atm_iv(conn, "AAPL", s.day, 0.01, NOW)
    rid = option_entry(conn)

    dispatcher.drain()

    rec = recommendation(conn, rid)
    gate = iv_gate(rec["gate_results"])
    assert (gate["passed"], gate["code"], gate["observed"]) == (False, "HIGH_IV_PERCENTILE", 100)
    assert rec["decision"]["fallback"] == "stock instead of option (HIGH_IV_PERCENTILE)"
    instruments = [r["instrument"] for r in conn.execute(
        "SELECT instrument FROM dispatch_executions WHERE recommendation_id = %s", (rid,)).fetchall()]
    assert instruments == ["STOCK"]

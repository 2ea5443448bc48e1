"""IV percentile (pure) and the IV history in Postgres."""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone
from decimal import Decimal

import pytest

from services.common.market_calendar import ET
from services.common.params import default_params
from services.domain.market_data import OptionQuote
from services.dispatcher.alpaca.options import validate_option_contract
from services.adapters.postgres.iv_history import current_iv_percentile, load_iv_history, record_atm_iv
from services.domain.iv_percentile import HISTORY_WINDOW, atm_iv_from_chain, iv_percentile
from services.adapters.sim.options import simulate_chain

NOW = datetime(2026, 11, 18, 11, 0, tzinfo=ET)


# --- The percentile -----------------------------------------------------------------------------


def test_iv_percentile_by_hand():
    # 15 of the 20 values (10..24) are strictly below 25.
    assert iv_percentile(list(range(10, 30)), 25, min_sessions=20) == (75.0, "OK: iv=25.0000 above 15 of 20 sessions")


@pytest.mark.parametrize(
    "history,today,expected",
    [
        ([0.20] * 20, 0.20, 0.0),  # ties are not below
        ([0.20] * 20, 0.21, 100.0),
        ([0.1, 0.2, 0.3, 0.4] * 5, 0.35, 75.0),
        ([0.1, 0.2, 0.3, 0.4] * 5, 0.05, 0.0),
    ],
)
def test_iv_percentile_counts_strictly_below(history, today, expected):
    assert iv_percentile(history, today, min_sessions=20).percentile == expected


def test_iv_percentile_uses_only_the_last_252_sessions():
    # 48 old sessions at 0.10 then 252 at 0.50: against the window, 0.40 is below everything.
    history = [0.10] * 48 + [0.50] * 252
    assert iv_percentile(history, 0.40, min_sessions=20).percentile == 0.0
    # With one more recent low session the oldest 0.50 leaves the window: 1 of 252 below.
    pct = iv_percentile(history + [0.30], 0.40, min_sessions=20).percentile
    assert pct == pytest.approx(100 / 252)
    assert HISTORY_WINDOW == 252


def test_iv_percentile_when_history_short_then_not_evaluated_with_count():
    assert iv_percentile([0.2] * 19, 0.3, min_sessions=20) == (None, "not evaluated: 19 sessions of history (min 20)")
    assert iv_percentile([], 0.3, min_sessions=20) == (None, "not evaluated: 0 sessions of history (min 20)")
    assert iv_percentile([0.2] * 20, 0.3, min_sessions=20).percentile == 100.0


def test_iv_percentile_drops_missing_values_before_counting():
    history = [0.2] * 19 + [None, float("nan")]
    assert iv_percentile(history, 0.3, min_sessions=20).reason == "not evaluated: 19 sessions of history (min 20)"


@pytest.mark.parametrize("today", [None, float("nan"), 0, -0.1])
def test_iv_percentile_when_todays_iv_missing_then_no_iv_not_not_evaluated(today):
    result = iv_percentile([0.2] * 30, today, min_sessions=20)
    assert result.percentile is None
    assert result.reason.startswith("NO_IV: ")


def test_short_history_result_passes_the_gate_and_says_why():
    contract = type("C", (), {"bid": 1.0, "ask": 1.05, "volume": 500, "open_interest": 500})()
    passed, reason, _ = validate_option_contract(
        contract, default_params(), now=NOW, iv_percentile=iv_percentile([0.2] * 3, 0.3, 20)
    )
    assert passed is True
    assert "not evaluated: 3 sessions of history" in reason


# --- ATM IV from a chain ------------------------------------------------------------------------


def q(expiration: date, strike: str, right: str, iv: float | None) -> OptionQuote:
    return OptionQuote(
        symbol=f"SPY{expiration:%y%m%d}{right[0].upper()}{int(Decimal(strike) * 1000):08d}",
        underlying="SPY",
        expiration=expiration,
        strike=Decimal(strike),
        right=right,
        bid=Decimal("1"),
        ask=Decimal("1.05"),
        bid_size=1,
        ask_size=1,
        quote_time=NOW,
        volume=100,
        open_interest=100,
        implied_volatility=iv,
        delta=None,
        gamma=None,
        theta=None,
        vega=None,
    )


def test_atm_iv_is_the_mean_of_call_and_put_at_the_nearest_strike_of_the_nearest_expiry():
    today, friday, later = date(2026, 11, 18), date(2026, 11, 20), date(2026, 11, 27)
    chain = [
        q(today, "100", "call", 0.90),  # expiring today: skipped
        q(today, "100", "put", 0.95),
        q(friday, "100", "call", 0.30),
        q(friday, "100", "put", 0.34),
        q(friday, "105", "call", 0.28),
        q(friday, "95", "put", 0.40),
        q(later, "101", "call", 0.25),  # a later expiry, even if nearer the spot, is not used
    ]
    assert atm_iv_from_chain(chain, 101, NOW) == pytest.approx(0.32)


def test_atm_iv_uses_the_one_side_that_has_an_iv_and_skips_expiries_without_any():
    friday, later = date(2026, 11, 20), date(2026, 11, 27)
    chain = [q(friday, "100", "call", None), q(friday, "100", "put", None), q(later, "100", "call", 0.31), q(later, "100", "put", None)]
    assert atm_iv_from_chain(chain, 100, NOW) == pytest.approx(0.31)


def test_atm_iv_is_none_without_a_usable_contract():
    assert atm_iv_from_chain([q(date(2026, 11, 18), "100", "call", 0.3)], 100, NOW) is None
    assert atm_iv_from_chain([], 100, NOW) is None
    assert atm_iv_from_chain([q(date(2026, 11, 20), "100", "call", 0.3)], None, NOW) is None


# --- Postgres -----------------------------------------------------------------------------------


def test_record_keeps_the_days_first_value(conn):
    day = date(2026, 11, 18)
    assert record_atm_iv(conn, "SPY", day, 0.25, NOW) is True
    assert record_atm_iv(conn, "SPY", day, 0.40, NOW + timedelta(hours=2)) is False
    row = conn.execute("SELECT atm_iv, recorded_at FROM iv_history WHERE ticker = 'SPY'").fetchone()
    assert row["atm_iv"] == Decimal("0.25")
    assert row["recorded_at"] == NOW.astimezone(timezone.utc)


def test_record_refuses_a_bad_iv_or_a_naive_time(conn):
    with pytest.raises(ValueError):
        record_atm_iv(conn, "SPY", date(2026, 11, 18), float("nan"), NOW)
    with pytest.raises(ValueError):
        record_atm_iv(conn, "SPY", date(2026, 11, 18), 0.2, datetime(2026, 11, 18, 11, 0))
    assert conn.execute("SELECT count(*) AS n FROM iv_history").fetchone()["n"] == 0


def test_load_returns_days_before_the_given_day_oldest_first_per_ticker(conn):
    start = date(2026, 10, 1)
    for i in range(10):
        record_atm_iv(conn, "SPY", start + timedelta(days=i), 0.10 + i / 100, NOW)
    record_atm_iv(conn, "QQQ", start, 0.99, NOW)
    history = load_iv_history(conn, "SPY", start + timedelta(days=8))
    assert history == pytest.approx([0.10 + i / 100 for i in range(8)])
    assert load_iv_history(conn, "SPY", start + timedelta(days=8), limit=3) == pytest.approx([0.15, 0.16, 0.17])
    assert load_iv_history(conn, "QQQ", start + timedelta(days=1)) == [0.99]
    assert load_iv_history(conn, "IWM", start + timedelta(days=30)) == []


def test_current_iv_percentile_records_today_and_ranks_against_earlier_days(conn, calendar):
    chain = simulate_chain("SPY", 100.0, NOW, seed=1)
    today_iv = atm_iv_from_chain(chain, 100.0, NOW)
    # 25 earlier sessions: 10 below today's IV, 15 above.
    days = calendar.sessions_between(date(2026, 10, 1), date(2026, 11, 17))[-25:]
    for i, s in enumerate(days):
        record_atm_iv(conn, "SPY", s.day, today_iv - 0.05 if i < 10 else today_iv + 0.05, NOW)
    result = current_iv_percentile(conn, "SPY", chain, 100.0, NOW, min_sessions=20)
    assert result.percentile == pytest.approx(40.0)
    stored = conn.execute("SELECT atm_iv FROM iv_history WHERE ticker = 'SPY' AND session_day = %s", (date(2026, 11, 18),)).fetchone()
    assert float(stored["atm_iv"]) == pytest.approx(today_iv)


def test_current_iv_percentile_with_a_new_ticker_is_not_evaluated(conn):
    chain = simulate_chain("NEW", 50.0, NOW, seed=1)
    result = current_iv_percentile(conn, "NEW", chain, 50.0, NOW, min_sessions=20)
    assert result == (None, "not evaluated: 0 sessions of history (min 20)")


# --- The migration ------------------------------------------------------------------------------


def test_executions_carry_option_columns_and_decision_log_shows_them(conn):
    rec = conn.execute(
        """INSERT INTO dispatch_recommendations (account_id, ticker, action, instrument, strategy, created_at)
           VALUES ('acct', 'SPY', 'BUY', 'OPTION', 'day_trade', %s) RETURNING id""",
        (NOW,),
    ).fetchone()["id"]
    conn.execute(
        """INSERT INTO dispatch_executions (account_id, recommendation_id, client_order_id, ticker, instrument,
               symbol, side, qty, multiplier, est_price, status, submitted_at, updated_at,
               strike, expiration, option_right, premium, quote, greeks, option_gates, role)
           VALUES ('acct', %s, 'coid-1', 'SPY', 'OPTION', 'SPY261120C00100000', 'buy', 2, 100, 1.05,
               'ACCEPTED', %s, %s, 100, '2026-11-20', 'call', 1.05, '{"bid": 1.0, "ask": 1.05}',
               '{"delta": 0.5}', '[]', 'ENTRY')""",
        (rec, NOW, NOW),
    )
    row = conn.execute("SELECT strike, expiration, option_right, premium, option_gates FROM decision_log").fetchone()
    assert row == {
        "strike": Decimal("100"),
        "expiration": date(2026, 11, 20),
        "option_right": "call",
        "premium": Decimal("1.05"),
        "option_gates": [],
    }


def test_option_right_must_be_call_or_put(conn):
    import psycopg

    rec = conn.execute(
        """INSERT INTO dispatch_recommendations (account_id, ticker, action, instrument, strategy, created_at)
           VALUES ('acct', 'SPY', 'BUY', 'OPTION', 'day_trade', %s) RETURNING id""",
        (NOW,),
    ).fetchone()["id"]
    with pytest.raises(psycopg.errors.CheckViolation):
        conn.execute(
            """INSERT INTO dispatch_executions (account_id, recommendation_id, client_order_id, ticker, instrument,
                   symbol, side, qty, est_price, status, submitted_at, updated_at, option_right, role)
               VALUES ('acct', %s, 'coid-2', 'SPY', 'OPTION', 'X', 'buy', 1, 1, 'ACCEPTED', %s, %s, 'C', 'ENTRY')""",
            (rec, NOW, NOW),
        )

"""The claim-and-gather: its probes of a big book stay index probes, however young the tables'
statistics, and the literals of its message claim exactly the account and the times asked."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from services.adapters.postgres import claims, queries
from services.common.market_calendar import et_date, et_day_bounds

from tests.factories import ACCOUNT, add_recommendation, et


def test_claim_when_book_holds_400_positions_then_ticker_probe_reads_one_index_entry(conn):
    """The live position of the claimed ticker is found through (account, ticker), not by filtering
    every live position of the account: the claim runs on the latency path with the book at 400."""
    now = et("2026-11-30", "10:00")
    conn.execute(
        """INSERT INTO active_positions (account_id, ticker, instrument, symbol, side, qty, avg_price, status, opened_at,
                                         updated_at)
           SELECT %s, 'P' || i, 'STOCK', 'P' || i, 'long', 1, 50, 'OPEN', %s, %s FROM generate_series(1, 400) i""",
        (ACCOUNT, now, now))
    add_recommendation(conn, "NEWT", now - timedelta(seconds=1))
    day_start, day_end = et_day_bounds(et_date(now))
    with conn.transaction(force_rollback=True):  # the claim locks its row: nothing kept
        plan = "\n".join(r["QUERY PLAN"] for r in conn.execute(
            "EXPLAIN (ANALYZE, COSTS OFF) " + queries.CLAIM_AND_GATHER,
            {"account_id": ACCOUNT, "now": now, "day_start": day_start, "day_end": day_end, "limit": 1}))
    probe = plan[plan.index("SubPlan"):]
    assert "active_positions_one_per_ticker" in probe
    assert "Rows Removed by Filter" not in probe
    assert "active_positions_live" not in plan


def test_claim_when_account_id_holds_quotes_and_backslashes_then_only_that_accounts_row_is_claimed(conn):
    now = et("2026-11-30", "10:00")
    odd = "o'brien\\'; DROP TABLE dispatch_recommendations; --"
    add_recommendation(conn, "AAPL", now - timedelta(seconds=2))  # the test account's, older
    mine = add_recommendation(conn, "MSFT", now - timedelta(seconds=1), account=odd)
    day_start, day_end = et_day_bounds(et_date(now))
    rows = claims.begin_and_claim(conn, {"account_id": odd, "now": now, "day_start": day_start, "day_end": day_end,
                                         "limit": 5}, lock=True)
    conn.rollback()
    assert [(r["id"], r["account_id"], r["ticker"]) for r in rows] == [(mine, odd, "MSFT")]
    assert conn.execute("SELECT count(*) AS n FROM dispatch_recommendations").fetchone()["n"] == 2


def test_claim_literal_when_timestamp_has_an_offset_then_postgres_reads_the_same_instant(conn):
    at = et("2026-11-30", "09:31") + timedelta(microseconds=123456)
    assert conn.execute(f"SELECT {claims.literal(conn, at)}::timestamptz AS t").fetchone()["t"] == at


@pytest.mark.parametrize("value, error", [
    (datetime(2026, 11, 30, 10, 0), ValueError),  # naive: the session's time zone would decide the instant
    (True, TypeError),  # a bool is an int to Python, not to the claim's LIMIT
    (1.5, TypeError),
])
def test_claim_literal_when_value_is_not_an_aware_time_a_text_or_an_int_then_refused(conn, value, error):
    with pytest.raises(error):
        claims.literal(conn, value)

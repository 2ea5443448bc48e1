"""The claim-and-gather's probes of a big book stay index probes, however young the tables' statistics."""

from __future__ import annotations

from datetime import timedelta

from services.adapters.postgres import queries
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

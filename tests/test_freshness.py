"""The watched tickers whose bars stopped: measured from the bar's own end, per account."""

from __future__ import annotations

from datetime import timedelta

import pytest

from services.adapters.postgres.freshness import stale_watched_tickers
from tests.factories import ACCOUNT, add_bar, et

NOW = et("2026-11-18", "11:00")


def watch(conn, ticker: str, *, selected: bool = True, account: str = ACCOUNT) -> None:
    conn.execute(
        "INSERT INTO watchlist_state (account_id, ticker, selected, updated_at) VALUES (%s, %s, %s, %s)",
        (account, ticker, selected, NOW),
    )


def test_stale_watched_tickers_when_bar_too_old_or_missing_then_listed_stalest_first(conn):
    for ticker in ("AAPL", "MSFT", "NVDA", "TSLA"):
        watch(conn, ticker)
    add_bar(conn, "AAPL", NOW - timedelta(minutes=1), 100)   # ended at NOW: fresh
    add_bar(conn, "MSFT", NOW - timedelta(minutes=5), 100)   # ended 240 s ago
    add_bar(conn, "MSFT", NOW - timedelta(minutes=30), 100)  # older bars do not matter
    # NVDA: no bar at all.
    add_bar(conn, "TSLA", NOW - timedelta(minutes=10), 100)  # ended 540 s ago
    assert stale_watched_tickers(conn, NOW, 120) == [
        ("NVDA", None),
        ("TSLA", NOW - timedelta(minutes=10)),
        ("MSFT", NOW - timedelta(minutes=5)),
    ]


@pytest.mark.parametrize("ended_ago_s,stale", [(119, False), (120, False), (121, True)])
def test_stale_watched_tickers_boundary_is_age_greater_than_limit(conn, ended_ago_s, stale):
    watch(conn, "AAPL")
    add_bar(conn, "AAPL", NOW - timedelta(seconds=60 + ended_ago_s), 100)
    assert bool(stale_watched_tickers(conn, NOW, 120)) is stale


def test_stale_watched_tickers_ignores_unselected_and_future_bars(conn):
    watch(conn, "AAPL", selected=False)
    watch(conn, "MSFT")
    add_bar(conn, "MSFT", NOW + timedelta(minutes=5), 100)  # dated ahead of now: not data yet
    assert stale_watched_tickers(conn, NOW, 120) == [("MSFT", None)]


def test_stale_watched_tickers_per_account_or_across_accounts(conn):
    watch(conn, "AAPL", account="a1")
    watch(conn, "MSFT", account="a2")
    watch(conn, "MSFT", account="a1", selected=False)
    assert stale_watched_tickers(conn, NOW, 120, account_id="a1") == [("AAPL", None)]
    assert stale_watched_tickers(conn, NOW, 120) == [("AAPL", None), ("MSFT", None)]


def test_stale_watched_tickers_refuses_naive_now(conn):
    with pytest.raises(ValueError):
        stale_watched_tickers(conn, NOW.replace(tzinfo=None), 120)

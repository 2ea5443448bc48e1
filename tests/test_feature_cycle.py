"""The incremental feature cycle: the values pinned before it (tests/feature_fixture.py) row for
row, only new bars computed, nothing written when nothing is new, revisions read afresh."""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest

from services.feature_computer.main import FeatureCycle, backfill_features, compute_features
from tests.feature_fixture import VALUE_COLUMNS, insert, read_fixture, sp500_bars, stored_rows, synthetic_bars

UTC = timezone.utc
# Exact: the inputs copied from the bars and every value decided by a comparison or a count.
EXACT = {"session_day", "close", "volume", "prev_close", "close_5m_ago", "close_15m_ago",
         "volume_surge", "trend_state", "short_inputs"}
# The derived values were numeric (16-20 significant digits) and are now doubles stored with 15;
# each is one correctly rounded division of exact sums, except the stdevs (two-pass in doubles).
REL, ABS = 1e-12, 1e-15

MARKETS = {"sp500": sp500_bars, "synthetic": synthetic_bars}


def assert_same_as_fixture(name: str, got: dict) -> None:
    want = read_fixture(name)
    assert set(got) == set(want)
    for key, row in want.items():
        for col in VALUE_COLUMNS:
            a, b = got[key][col], row[col]
            if col in EXACT or a == "" or b == "":
                if col in ("close", "prev_close", "close_5m_ago", "close_15m_ago") and a and b:
                    assert Decimal(a) == Decimal(b), (key, col, a, b)
                else:
                    assert a == b, (key, col, a, b)
            else:
                assert math.isclose(float(a), float(b), rel_tol=REL, abs_tol=ABS), (key, col, a, b)


@pytest.mark.parametrize("name", sorted(MARKETS))
def test_live_cycle_when_run_minute_by_minute_then_rows_equal_pinned_fixture(conn, name):
    bars = MARKETS[name]()
    insert(conn, bars)
    cycle = FeatureCycle()
    for minute in sorted({ts for _, ts, _, _ in bars}):
        compute_features(conn, now=minute + timedelta(minutes=1), cycle=cycle)
    assert_same_as_fixture(name, stored_rows(conn))


@pytest.mark.parametrize("name", sorted(MARKETS))
def test_backfill_when_every_bar_then_rows_equal_pinned_fixture(conn, name):
    bars = MARKETS[name]()
    insert(conn, bars)
    assert backfill_features(conn, bars[0][1] - timedelta(days=1), datetime.max.replace(tzinfo=UTC)) == len(bars)
    assert_same_as_fixture(name, stored_rows(conn))


def test_live_cycle_when_bars_arrive_minute_by_minute_then_each_new_bar_computed_once(conn):
    """As in production: the loader appends each minute's bars, the cycle follows."""
    bars = synthetic_bars()
    by_minute: dict[datetime, list] = {}
    for bar in bars:
        by_minute.setdefault(bar[1], []).append(bar)
    cycle = FeatureCycle()
    for minute in sorted(by_minute):
        insert(conn, by_minute[minute])
        assert compute_features(conn, now=minute + timedelta(minutes=1), cycle=cycle) == len(by_minute[minute])
        assert compute_features(conn, now=minute + timedelta(minutes=1, seconds=30), cycle=cycle) == 0
    assert_same_as_fixture("synthetic", stored_rows(conn))


@pytest.fixture
def computed(monkeypatch):
    """The tickers each cycle computed, in order (a spy on the pure definitions' input)."""
    import services.feature_computer.main as main

    seen: list[int] = []
    real = main.window_features

    def spy(windows):
        seen.append(len(windows.n))
        return real(windows)

    monkeypatch.setattr(main, "window_features", spy)
    return seen


def tuples_written(conn) -> int:
    return conn.execute("SELECT coalesce(sum(n_tup_ins + n_tup_upd), 0) AS n FROM pg_stat_xact_user_tables "
                        "WHERE relname = 'lane_features'").fetchone()["n"]


def test_cycle_when_nothing_new_then_computes_nothing_and_writes_nothing(conn, computed):
    insert(conn, synthetic_bars())
    cycle = FeatureCycle()
    assert compute_features(conn, cycle=cycle) == 6
    before = conn.execute("SELECT ticker, ts, computed_at FROM lane_features ORDER BY ticker").fetchall()
    written = tuples_written(conn)
    assert compute_features(conn, cycle=cycle) == 0
    assert computed == [6]  # the second cycle did not even compute
    assert tuples_written(conn) == written
    assert conn.execute("SELECT ticker, ts, computed_at FROM lane_features ORDER BY ticker").fetchall() == before


def test_cycle_when_one_ticker_has_a_new_bar_then_only_that_ticker_is_computed(conn, computed):
    bars = synthetic_bars()
    last = max(ts for _, ts, _, _ in bars)
    insert(conn, [b for b in bars if b[1] < last])
    cycle = FeatureCycle()
    compute_features(conn, cycle=cycle)
    insert(conn, [b for b in bars if b[1] == last and b[0] == "RW1"])
    assert compute_features(conn, cycle=cycle) == 1
    assert computed == [6, 1]
    assert conn.execute("SELECT ts FROM latest_features WHERE ticker = 'RW1'").fetchone()["ts"] == last


def test_cycle_when_bar_is_complete_only_later_then_computed_when_its_minute_ends(conn, computed):
    t0 = datetime(2026, 3, 10, 14, 0, tzinfo=UTC)
    insert(conn, [("ABC", t0, Decimal("10.00"), 100), ("ABC", t0 + timedelta(minutes=1), Decimal("10.10"), 100)])
    cycle = FeatureCycle()
    assert compute_features(conn, now=t0 + timedelta(seconds=90), cycle=cycle) == 1  # 14:01 still forming
    assert compute_features(conn, now=t0 + timedelta(seconds=110), cycle=cycle) == 0
    assert compute_features(conn, now=t0 + timedelta(minutes=2), cycle=cycle) == 1
    row = conn.execute("SELECT ts, close, prev_close FROM latest_features").fetchone()
    assert row == {"ts": t0 + timedelta(minutes=1), "close": Decimal("10.1"), "prev_close": Decimal("10")}
    assert computed == [1, 1]


@pytest.mark.parametrize("change", [
    "UPDATE lane_telemetry SET close = close + 1 WHERE ticker = 'RW1' AND ts = %(ts)s",
    "DELETE FROM lane_telemetry WHERE ticker = 'RW1' AND ts = %(ts)s",
])
def test_cycle_when_a_bar_inside_the_window_is_revised_then_window_read_again(conn, change):
    """A revision 10 bars back changes the latest bar's sma20: the cycle must not extend a stale window."""
    bars = [b for b in synthetic_bars() if b[0] == "RW1"]
    insert(conn, bars[:-1])
    cycle = FeatureCycle()
    compute_features(conn, cycle=cycle)
    conn.execute(change, {"ts": bars[-12][1]})
    insert(conn, bars[-1:])
    assert compute_features(conn, cycle=cycle) == 1
    live = conn.execute("SELECT sma20, sma50, recent_vol FROM lane_features WHERE ts = %s", (bars[-1][1],)).fetchone()
    conn.execute("DELETE FROM lane_features")
    backfill_features(conn, bars[-1][1], bars[-1][1] + timedelta(minutes=1))
    fresh = conn.execute("SELECT sma20, sma50, recent_vol FROM lane_features").fetchone()
    assert live == fresh


def test_cycle_when_a_late_bar_fills_a_gap_then_latest_row_sees_it(conn):
    t0 = datetime(2026, 3, 10, 14, 0, tzinfo=UTC)
    insert(conn, [("ABC", t0, Decimal("10.00"), 100), ("ABC", t0 + timedelta(minutes=2), Decimal("10.20"), 100)])
    cycle = FeatureCycle()
    compute_features(conn, cycle=cycle)
    assert conn.execute("SELECT prev_close FROM latest_features").fetchone()["prev_close"] is None
    insert(conn, [("ABC", t0 + timedelta(minutes=1), Decimal("10.10"), 100)])  # arrives late
    assert compute_features(conn, cycle=cycle) == 1
    assert conn.execute("SELECT prev_close FROM latest_features").fetchone()["prev_close"] == Decimal("10.1")


def test_cycle_when_revised_window_has_no_complete_bar_then_later_bar_is_not_merged_with_stale_window(conn):
    t0 = datetime(2026, 3, 10, 14, 0, tzinfo=UTC)
    insert(conn, [("ABC", t0 + timedelta(minutes=m), Decimal("10.00"), 100) for m in range(3)])
    cycle = FeatureCycle()
    compute_features(conn, now=t0 + timedelta(minutes=3), cycle=cycle)
    conn.execute("DELETE FROM lane_telemetry")
    insert(conn, [("ABC", t0 + timedelta(minutes=5), Decimal("12.00"), 100)])
    assert compute_features(conn, now=t0 + timedelta(minutes=5), cycle=cycle) == 0  # 14:05 still forming
    assert compute_features(conn, now=t0 + timedelta(minutes=6), cycle=cycle) == 1
    row = conn.execute("SELECT close_5m_ago, short_inputs FROM lane_features WHERE ts = %s",
                       (t0 + timedelta(minutes=5),)).fetchone()
    assert row["close_5m_ago"] is None and "close_5m_ago" in row["short_inputs"]  # 14:00 was deleted


def test_cycle_when_write_fails_then_next_cycle_writes_the_row(conn, monkeypatch):
    import services.feature_computer.main as main

    t0 = datetime(2026, 3, 10, 14, 0, tzinfo=UTC)
    insert(conn, [("ABC", t0, Decimal("10.00"), 100)])
    cycle = FeatureCycle()
    compute_features(conn, cycle=cycle)
    insert(conn, [("ABC", t0 + timedelta(minutes=1), Decimal("10.10"), 100)])
    real = main.write_features

    def outage(*args):
        raise main.psycopg.OperationalError("connection lost")

    monkeypatch.setattr(main, "write_features", outage)
    with pytest.raises(main.psycopg.OperationalError):
        compute_features(conn, cycle=cycle)
    monkeypatch.setattr(main, "write_features", real)
    assert compute_features(conn, cycle=cycle) == 1
    assert conn.execute("SELECT ts, prev_close FROM latest_features").fetchone() == {
        "ts": t0 + timedelta(minutes=1), "prev_close": Decimal("10")}


def test_bar_heads_when_appended_revised_truncated_then_revision_changes_only_off_append(conn):
    t0 = datetime(2026, 3, 10, 14, 0, tzinfo=UTC)

    def head():
        return conn.execute("SELECT latest_ts, revision FROM lane_bar_heads WHERE ticker = 'ABC'").fetchone()

    insert(conn, [("ABC", t0, Decimal("1"), 1)])
    first = head()
    insert(conn, [("ABC", t0 + timedelta(minutes=1), Decimal("1"), 1)])
    assert head() == {"latest_ts": t0 + timedelta(minutes=1), "revision": first["revision"]}
    insert(conn, [("ABC", t0 - timedelta(minutes=1), Decimal("1"), 1)])
    late = head()
    assert late["latest_ts"] == t0 + timedelta(minutes=1) and late["revision"] != first["revision"]
    conn.execute("DELETE FROM lane_telemetry WHERE ts = %s", (t0 + timedelta(minutes=1),))
    deleted = head()
    assert deleted["latest_ts"] == t0 and deleted["revision"] != late["revision"]
    conn.execute("TRUNCATE lane_telemetry")
    assert head() is None
    insert(conn, [("ABC", t0, Decimal("1"), 1)])
    assert head()["revision"] not in {first["revision"], late["revision"], deleted["revision"]}

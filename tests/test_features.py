"""Feature computer: values against an independent computation, gaps, session bounds, idempotence."""

from __future__ import annotations

import random
import statistics
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import pytest

from services.common.market_calendar import ET
from services.feature_computer.main import backfill_features, compute_features
from services.ingest import load_csv

UTC = timezone.utc
DAY = date(2026, 3, 10)       # a Tuesday, EDT (UTC-4)
PREV_DAY = date(2026, 3, 9)
# Missing bars on DAY (ET wall times): single gaps and a 5-minute hole.
GAPS = {time(9, 33), time(10, 0), time(10, 1), time(10, 2), time(10, 3), time(10, 4), time(12, 17)}
DATA_FILE = Path(__file__).resolve().parent / "data" / "sp500_2019-11-05_08_1min.csv"

COLUMNS = ("ticker, ts, close, prev_close, close_5m_ago, close_15m_ago, sma20, sma50, distance_sma20, "
           "distance_sma50, recent_vol, baseline_vol, vol_ratio, volume_ratio, volume_surge, "
           "trend_state, short_inputs, session_day, volume, computed_at")


def et(day: date, hh: int, mm: int) -> datetime:
    return datetime.combine(day, time(hh, mm), tzinfo=ET).astimezone(UTC)


def session_bars(day: date, seed: int, gaps=frozenset()) -> list[tuple]:
    """A regular session of 1-minute bars (09:30..15:59 ET) minus `gaps`, as (ts, close, volume)."""
    rng = random.Random(seed)
    price = Decimal("100.00")
    bars = []
    for m in range(390):
        wall = (datetime.combine(day, time(9, 30)) + timedelta(minutes=m)).time()
        price = (price * Decimal(str(1 + rng.gauss(0, 0.002)))).quantize(Decimal("0.01"))
        volume = rng.randint(1_000, 50_000)
        if wall in gaps:
            continue
        bars.append((datetime.combine(day, wall, tzinfo=ET).astimezone(UTC), price, volume))
    return bars


def insert_bars(conn, ticker: str, bars: list[tuple]) -> None:
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO lane_telemetry (ticker, ts, open, high, low, close, volume) VALUES (%s, %s, %s, %s, %s, %s, %s)",
            [(ticker, ts, c, c, c, c, v) for ts, c, v in bars])


def expected_features(bars: list[tuple]) -> dict[datetime, dict]:
    """The definitions of features.py, computed bar by bar in plain Python over ONE session."""
    closes = {ts: c for ts, c, _ in bars}
    out = {}
    rets: list[Decimal | None] = []
    for j, (ts, close, volume) in enumerate(bars):
        prev = closes.get(ts - timedelta(minutes=1))
        rets.append(close / prev - 1 if prev is not None else None)
        sma20 = sum(c for _, c, _ in bars[j - 19:j + 1]) / 20 if j >= 19 else None
        sma50 = sum(c for _, c, _ in bars[j - 49:j + 1]) / 50 if j >= 49 else None
        recent = [r for r in rets[max(0, j - 9):j + 1] if r is not None]
        baseline = [r for r in rets[max(0, j - 49):j + 1] if r is not None]
        recent_vol = statistics.stdev(recent) if len(recent) >= 5 else None
        baseline_vol = statistics.stdev(baseline) if len(baseline) >= 20 else None
        volume_ratio = (Decimal(volume) / (Decimal(sum(v for _, _, v in bars[j - 20:j])) / 20)) if j >= 20 else None
        if sma20 is None or sma50 is None:
            trend = None
        elif close > sma20 > sma50:
            trend = 1
        elif close < sma20 < sma50:
            trend = -1
        else:
            trend = 0
        out[ts] = {
            "close": close, "prev_close": prev,
            "close_5m_ago": closes.get(ts - timedelta(minutes=5)),
            "close_15m_ago": closes.get(ts - timedelta(minutes=15)),
            "sma20": sma20, "sma50": sma50,
            "distance_sma20": close / sma20 - 1 if sma20 else None,
            "distance_sma50": close / sma50 - 1 if sma50 else None,
            "recent_vol": recent_vol, "baseline_vol": baseline_vol,
            "vol_ratio": recent_vol / baseline_vol if recent_vol is not None and baseline_vol else None,
            "volume_ratio": volume_ratio,
            "volume_surge": volume_ratio >= 2 if volume_ratio is not None else None,
            "trend_state": trend,
        }
    return out


def assert_row_matches(row: dict, exp: dict) -> None:
    for key, want in exp.items():
        got = row[key]
        if want is None or isinstance(want, bool) or key == "trend_state":
            assert got == want, (row["ts"], key, got, want)
        else:
            assert got is not None, (row["ts"], key)
            assert float(got) == pytest.approx(float(want), rel=1e-12, abs=1e-15), (row["ts"], key, got, want)
    expected_short = {k for k in ("sma20", "sma50", "recent_vol", "baseline_vol", "volume_ratio",
                                  "prev_close", "close_5m_ago", "close_15m_ago") if exp[k] is None}
    assert set(row["short_inputs"]) == expected_short, row["ts"]


@pytest.fixture
def gappy_day(conn):
    """SYN: the previous day in full, then DAY with gaps."""
    prev = session_bars(PREV_DAY, seed=1)
    bars = session_bars(DAY, seed=2, gaps=GAPS)
    insert_bars(conn, "SYN", prev + bars)
    return bars


def rows_by_ts(conn, ticker: str) -> dict[datetime, dict]:
    return {r["ts"]: r for r in conn.execute(
        f"SELECT {COLUMNS} FROM lane_features WHERE ticker = %s ORDER BY ts", (ticker,))}


def test_backfill_when_day_has_gaps_then_every_bar_matches_independent_computation(conn, gappy_day):
    written = backfill_features(conn, et(DAY, 0, 0), et(DAY, 23, 0))
    rows = rows_by_ts(conn, "SYN")
    assert written == len(gappy_day) == 390 - len(GAPS)
    expected = expected_features(gappy_day)
    assert set(rows) == set(expected)
    for ts, exp in expected.items():
        assert_row_matches(rows[ts], exp)


def test_latest_bar_cycle_when_replayed_minute_by_minute_then_equals_backfill_digit_for_digit(conn, gappy_day):
    backfill_features(conn, et(DAY, 0, 0), et(DAY, 23, 0))
    backfilled = rows_by_ts(conn, "SYN")
    conn.execute("DELETE FROM lane_features")
    for ts, _, _ in gappy_day:
        # The bar that began at ts is complete one minute later.
        assert compute_features(conn, now=ts + timedelta(minutes=1)) == 1
    replayed = rows_by_ts(conn, "SYN")
    assert set(replayed) == set(backfilled)
    for ts in backfilled:
        a = {k: v for k, v in backfilled[ts].items() if k != "computed_at"}
        b = {k: v for k, v in replayed[ts].items() if k != "computed_at"}
        assert a == b, ts


def test_close_5m_ago_when_session_starts_or_bar_missing_then_null_not_neighbour(conn, gappy_day):
    backfill_features(conn, et(DAY, 0, 0), et(DAY, 23, 0))
    rows = rows_by_ts(conn, "SYN")
    closes = {ts: c for ts, c, _ in gappy_day}
    # Session start: nothing 5 / 15 minutes earlier on this day (the previous day is full of bars).
    for hh, mm in [(9, 30), (9, 31), (9, 34)]:
        assert rows[et(DAY, hh, mm)]["close_5m_ago"] is None
        assert "close_5m_ago" in rows[et(DAY, hh, mm)]["short_inputs"]
    assert rows[et(DAY, 9, 35)]["close_5m_ago"] == closes[et(DAY, 9, 30)]
    assert rows[et(DAY, 9, 44)]["close_15m_ago"] is None
    assert rows[et(DAY, 9, 45)]["close_15m_ago"] == closes[et(DAY, 9, 30)]
    # 09:33 is missing: 09:38 has no close_5m_ago although 09:32 and 09:34 exist.
    assert rows[et(DAY, 9, 38)]["close_5m_ago"] is None
    assert rows[et(DAY, 9, 48)]["close_15m_ago"] is None
    assert rows[et(DAY, 9, 39)]["close_5m_ago"] == closes[et(DAY, 9, 34)]
    # After the 10:00-10:04 hole, 10:05 has no 1-minute return and no bar 5 minutes back.
    assert rows[et(DAY, 10, 5)]["prev_close"] is None
    assert rows[et(DAY, 10, 9)]["close_5m_ago"] is None
    assert rows[et(DAY, 10, 10)]["close_5m_ago"] == closes[et(DAY, 10, 5)]


def test_windows_when_session_is_young_then_short_not_filled_from_previous_day(conn, gappy_day):
    backfill_features(conn, et(PREV_DAY, 0, 0), et(DAY, 23, 0))
    rows = rows_by_ts(conn, "SYN")
    first = rows[et(DAY, 9, 30)]
    assert first["sma20"] is None and first["sma50"] is None and first["volume_ratio"] is None
    assert first["trend_state"] is None and first["session_day"] == DAY
    assert set(first["short_inputs"]) >= {"sma20", "sma50", "recent_vol", "baseline_vol", "volume_ratio",
                                          "prev_close", "close_5m_ago", "close_15m_ago"}
    # The 20th bar of DAY (09:30..09:50 minus the 09:33 gap) is the first with an sma20.
    assert rows[et(DAY, 9, 49)]["sma20"] is None
    assert rows[et(DAY, 9, 50)]["sma20"] is not None
    # The previous day's own late bars have all their windows (the same code reads both days).
    assert rows[et(PREV_DAY, 15, 59)]["short_inputs"] == []


def test_close_5m_ago_when_earlier_bar_is_on_previous_et_date_then_null(conn):
    # Extended-hours bars around midnight ET: 23:58 is exactly 5 minutes before 00:03 but on
    # another ET date, so it is another session.
    bars = [(et(PREV_DAY, 23, 58), Decimal("10.00"), 100), (et(DAY, 0, 3), Decimal("11.00"), 100)]
    insert_bars(conn, "EXT", bars)
    assert compute_features(conn, now=et(DAY, 0, 4), tickers=["EXT"]) == 1
    row = conn.execute("SELECT close_5m_ago, session_day FROM lane_features WHERE ticker = 'EXT'").fetchone()
    assert row == {"close_5m_ago": None, "session_day": DAY}


def test_compute_features_when_run_twice_then_second_run_writes_nothing_and_rows_identical(conn, gappy_day):
    now = et(DAY, 11, 0)
    assert compute_features(conn, now=now) == 1
    first = rows_by_ts(conn, "SYN")
    assert compute_features(conn, now=now) == 0
    assert backfill_features(conn, et(DAY, 10, 59), et(DAY, 11, 0)) == 0
    assert rows_by_ts(conn, "SYN") == first
    # The feature row is the latest COMPLETE bar: 10:59 at 11:00, 11:00 only at 11:01.
    assert list(first) == [et(DAY, 10, 59)]


def test_compute_features_when_a_bar_is_corrected_then_row_is_rewritten(conn, gappy_day):
    now = et(DAY, 11, 0)
    compute_features(conn, now=now)
    conn.execute("UPDATE lane_telemetry SET close = close + 1 WHERE ticker = 'SYN' AND ts = %s", (et(DAY, 10, 59),))
    assert compute_features(conn, now=now) == 1
    row = rows_by_ts(conn, "SYN")[et(DAY, 10, 59)]
    closes = {ts: c for ts, c, _ in gappy_day}
    assert row["close"] == closes[et(DAY, 10, 59)] + 1


def test_compute_features_when_several_tickers_then_one_row_each_at_own_latest_bar(conn, gappy_day):
    insert_bars(conn, "OTHER", session_bars(DAY, seed=3)[:100])  # ends at 11:09 ET
    assert compute_features(conn, now=et(DAY, 16, 0)) == 2
    latest = {r["ticker"]: r["ts"] for r in conn.execute("SELECT ticker, ts FROM latest_features")}
    assert latest == {"SYN": et(DAY, 15, 59), "OTHER": et(DAY, 11, 9)}
    view_cols = {r["column_name"] for r in conn.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_name = 'latest_features'")}
    assert {"close_5m_ago", "close_15m_ago", "prev_close"} <= view_cols


@pytest.mark.skipif(not DATA_FILE.exists(), reason=f"real data file not found at {DATA_FILE} "
                    "(the repo expects shared/data beside its checkout)")
def test_features_on_real_sp500_data_when_session_opens_then_close_5m_ago_null_until_0935(conn):
    load_csv(conn, DATA_FILE, "SPX")
    day = date(2019, 11, 5)
    backfill_features(conn, et(day, 0, 0), et(day, 23, 0))
    rows = {r["ts"]: r for r in conn.execute(
        "SELECT f.ts, f.close, f.close_5m_ago FROM lane_features f WHERE f.ticker = 'SPX'")}
    close_0930 = conn.execute("SELECT close FROM lane_telemetry WHERE ticker = 'SPX' AND ts = %s",
                              (datetime(2019, 11, 5, 14, 30, tzinfo=UTC),)).fetchone()["close"]
    assert close_0930 == Decimal("3080.49")
    assert rows[et(day, 9, 30)]["close_5m_ago"] is None
    assert rows[et(day, 9, 34)]["close_5m_ago"] is None
    assert rows[et(day, 9, 35)]["close_5m_ago"] == close_0930
    # The latest-bar cycle at 09:36 agrees, and so does the next morning's open (a new session).
    conn.execute("DELETE FROM lane_features")
    compute_features(conn, now=et(day, 9, 36))
    assert conn.execute("SELECT close_5m_ago FROM lane_features").fetchone()["close_5m_ago"] == close_0930
    compute_features(conn, now=et(date(2019, 11, 6), 9, 31))
    row = conn.execute("SELECT ts, close_5m_ago, sma20 FROM latest_features").fetchone()
    assert row == {"ts": et(date(2019, 11, 6), 9, 30), "close_5m_ago": None, "sma20": None}

"""Bar ingestion: the CSV loader on the real S&P 500 file, and the telemetry task."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import pytest

from services.ingest import BadBar, load_csv, run_telemetry
from tests.fake_alpaca import fake_alpaca  # noqa: F401  (fixture)

UTC = timezone.utc
DATA_FILE = Path(__file__).resolve().parents[2] / "shared" / "data" / "sp500_2019-11-05_08_1min.csv"
needs_data = pytest.mark.skipif(
    not DATA_FILE.exists(),
    reason=f"real data file not found at {DATA_FILE} (the repo expects shared/data beside its checkout)")


@needs_data
def test_load_csv_when_real_file_then_1563_bars_in_utc_and_reload_is_idempotent(conn):
    assert load_csv(conn, DATA_FILE, "SPX") == 1563
    first = conn.execute("SELECT ts, open, high, low, close, volume, ingested_at FROM lane_telemetry "
                         "WHERE ticker = 'SPX' ORDER BY ts").fetchall()
    assert len(first) == 1563
    # 2019-11-05 09:30 EST is 14:30 UTC; the last bar is 2019-11-08 15:59 EST (no 16:00 bar that day).
    assert first[0] == {**first[0], "ts": datetime(2019, 11, 5, 14, 30, tzinfo=UTC), "open": Decimal("3080.8"),
                        "close": Decimal("3080.49"), "high": Decimal("3081.47"), "low": Decimal("3080.3"),
                        "volume": 2209795}
    assert first[-1]["ts"] == datetime(2019, 11, 8, 20, 59, tzinfo=UTC)
    per_day = conn.execute("SELECT (ts AT TIME ZONE 'America/New_York')::date AS day, count(*) AS n, "
                           "min((ts AT TIME ZONE 'America/New_York')::time) AS first FROM lane_telemetry "
                           "GROUP BY 1 ORDER BY 1").fetchall()
    assert [(str(r["day"]), r["n"], str(r["first"])) for r in per_day] == [
        ("2019-11-05", 391, "09:30:00"), ("2019-11-06", 391, "09:30:00"),
        ("2019-11-07", 391, "09:30:00"), ("2019-11-08", 390, "09:30:00")]

    assert load_csv(conn, DATA_FILE, "SPX") == 1563
    again = conn.execute("SELECT ts, open, high, low, close, volume, ingested_at FROM lane_telemetry "
                         "WHERE ticker = 'SPX' ORDER BY ts").fetchall()
    assert again == first  # same rows, same ingested_at: nothing was rewritten


def test_load_csv_when_summer_date_then_edt_offset_and_revised_bar_replaced(conn, tmp_path):
    f = tmp_path / "bars.csv"
    f.write_text("Date,Open,Close,High,Low,Volume\n2026-07-01 09:30:00,10,10.5,11,9.5,100\n")
    assert load_csv(conn, f, "ABC") == 1
    f.write_text("Date,Open,Close,High,Low,Volume\n2026-07-01 09:30:00,10,10.6,11,9.5,120.0\n")
    load_csv(conn, f, "ABC")
    rows = conn.execute("SELECT ts, close, volume FROM lane_telemetry").fetchall()
    assert rows == [{"ts": datetime(2026, 7, 1, 13, 30, tzinfo=UTC), "close": Decimal("10.6"), "volume": 120}]


def test_load_csv_when_value_not_a_number_then_bad_bar_and_nothing_written(conn, tmp_path):
    f = tmp_path / "bad.csv"
    f.write_text("Date,Open,Close,High,Low,Volume\n2026-07-01 09:30:00,10,10.5,11,9.5,100\n"
                 "2026-07-01 09:31:00,10,oops,11,9.5,100\n")
    with pytest.raises(BadBar, match=r"bad.csv:3: Close='oops'"):
        load_csv(conn, f, "ABC")
    assert conn.execute("SELECT count(*) AS n FROM lane_telemetry").fetchone()["n"] == 0


class FakeMarketData:
    """Stands in for AlpacaMarketData.stock_bars (the alpaca adapter has its own tests)."""

    def __init__(self, bars):
        self.bars = bars
        self.calls = []

    def stock_bars(self, symbols, start, end):
        self.calls.append((list(symbols), start, end))
        return [b for b in self.bars if b["ticker"] in symbols and start <= b["ts"] < end]


def bar(ticker, ts, close="10"):
    c = Decimal(close)
    return {"ticker": ticker, "ts": ts, "open": c, "high": c, "low": c, "close": c, "volume": 100}


def test_run_telemetry_when_bars_arrive_then_complete_ones_upserted_and_resume_after_last(conn):
    t0 = datetime(2026, 3, 10, 14, 0, tzinfo=UTC)
    md = FakeMarketData([bar("ABC", t0 + timedelta(minutes=i), str(10 + i)) for i in range(5)]
                        + [bar("XYZ", t0, "50"), bar("OTHER", t0, "1")])
    now = t0 + timedelta(minutes=4, seconds=30)   # the 14:04 bar is still forming
    assert run_telemetry(conn, md, ["ABC", "XYZ"], now) == 5
    stored = [(r["ticker"], r["ts"]) for r in conn.execute("SELECT ticker, ts FROM lane_telemetry ORDER BY ticker, ts")]
    assert stored == [("ABC", t0 + timedelta(minutes=i)) for i in range(4)] + [("XYZ", t0)]
    assert md.calls[0][1] == now - timedelta(hours=12)
    # Next run resumes after the oldest ticker's last stored bar, and re-fetched bars change nothing.
    later = t0 + timedelta(minutes=5, seconds=1)
    assert run_telemetry(conn, md, ["ABC", "XYZ"], later) == 1
    assert md.calls[1][1] == t0 + timedelta(minutes=1)
    assert conn.execute("SELECT close FROM lane_telemetry WHERE ts = %s", (t0 + timedelta(minutes=4),)).fetchone() == {
        "close": Decimal("14")}


def test_run_telemetry_when_naive_timestamp_then_refused(conn):
    md = FakeMarketData([])
    md.stock_bars = lambda symbols, start, end: [bar("ABC", datetime(2026, 3, 10, 14, 0))]
    with pytest.raises(BadBar, match="not an aware datetime"):
        run_telemetry(conn, md, ["ABC"], datetime(2026, 3, 10, 15, 0, tzinfo=UTC))


def test_cli_registers_load_csv_and_telemetry():
    import argparse

    from services.cli.loops import register_ingest as register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["load-csv", "x.csv", "--ticker", "SPX"])
    assert (args.file, args.ticker, args.tz) == ("x.csv", "SPX", "America/New_York")
    assert parser.parse_args(["telemetry", "--once"]).once is True


def test_run_telemetry_through_the_real_sdk_against_a_local_alpaca_server(conn, fake_alpaca):
    """alpaca-py's stock data client -> our adapter -> run_telemetry -> lane_telemetry."""
    from services.adapters.alpaca.client import AlpacaMarketData
    from tests.test_alpaca_adapter import settings

    t0 = datetime(2026, 11, 27, 14, 30, tzinfo=timezone.utc)  # 09:30 ET
    for i, close in enumerate(["600.10", "600.40", "600.25"]):
        fake_alpaca.add_bar("SPY", t0 + timedelta(minutes=i), 600.0, 601.0, 599.5, float(close), 1000 + i)
    market = AlpacaMarketData(settings(fake_alpaca))

    # At 09:32:30 the 09:32 bar is still forming: only the two complete bars are stored.
    written = run_telemetry(conn, market, ["SPY"], t0 + timedelta(minutes=2, seconds=30))

    rows = conn.execute("SELECT ts, close, volume FROM lane_telemetry WHERE ticker = 'SPY' ORDER BY ts").fetchall()
    assert written == 2
    assert [(r["ts"], r["close"], r["volume"]) for r in rows] == [
        (t0, Decimal("600.1"), 1000), (t0 + timedelta(minutes=1), Decimal("600.4"), 1001)]

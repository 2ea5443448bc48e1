"""Bar ingestion: the CSV loader on the real S&P 500 and FXY files and on malformed ones, and
the telemetry task."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import logging

import pytest

from services.ingest import BadBar, BadFile, load_csv, load_csv_file, parse_time, read_csv_file, run_telemetry, ticker_from_name
from tests.fake_alpaca import fake_alpaca  # noqa: F401  (fixture)

UTC = timezone.utc
DATA = Path(__file__).resolve().parent / "data"
DATA_FILE = DATA / "sp500_2019-11-05_08_1min.csv"
# Two real FXY sessions around the 2024 DST change (naive UTC, extended hours, thin: gaps).
FXY_FILE = DATA / "FXY_2024-03-08_11_1min.csv"


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
    assert (args.files, args.ticker, args.tz, args.skip_bad) == (["x.csv"], "SPX", "America/New_York", False)
    assert parser.parse_args(["load-csv", "a.csv", "dir/", "--tz", "UTC"]).files == ["a.csv", "dir/"]
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


# --- the files people have ----------------------------------------------------------------------


def stored(conn, ticker):
    return conn.execute("SELECT ts, open, high, low, close, volume, extended_hours FROM lane_telemetry "
                        "WHERE ticker = %s ORDER BY ts", (ticker,)).fetchall()


def test_load_csv_when_common_utc_file_with_extended_hours_then_loaded_and_session_flagged(conn):
    """timestamp,open,high,low,close,volume in naive UTC: once refused for 'missing columns'."""
    r = load_csv_file(conn, FXY_FILE, tz="UTC")
    rows = stored(conn, "FXY")
    assert (r.ticker, r.bars, r.written, len(rows)) == ("FXY", 325, 325, 325)
    flag = {row["ts"]: row["extended_hours"] for row in rows}
    # Friday 2024-03-08 is EST (session 14:30-21:00 UTC); Monday 2024-03-11 is EDT (13:30-20:00 UTC).
    assert flag[datetime(2024, 3, 8, 14, 22, tzinfo=UTC)] is True
    assert flag[datetime(2024, 3, 8, 14, 30, tzinfo=UTC)] is False
    assert flag[datetime(2024, 3, 8, 20, 50, tzinfo=UTC)] is False
    assert flag[datetime(2024, 3, 11, 13, 26, tzinfo=UTC)] is True
    assert flag[datetime(2024, 3, 11, 13, 30, tzinfo=UTC)] is False
    assert flag[datetime(2024, 3, 11, 19, 50, tzinfo=UTC)] is False
    session = {(row["ts"].date(), row["extended_hours"]) for row in rows}
    assert all(not ext or not (datetime(2024, 3, 8, 14, 30, tzinfo=UTC) <= ts < datetime(2024, 3, 8, 21, 0, tzinfo=UTC))
               for ts, ext in flag.items())
    assert r.extended == sum(flag.values()) and 0 < r.extended < 325 and len(session) == 4
    first = rows[0]
    assert (first["ts"], first["open"], first["volume"]) == (datetime(2024, 3, 8, 10, 46, tzinfo=UTC), Decimal("63.03"), 450)
    assert load_csv_file(conn, FXY_FILE, tz="UTC").written == 0  # idempotent


def test_load_csv_when_sp500_closing_print_at_1600_then_kept_but_flagged(conn):
    load_csv(conn, DATA_FILE, "SPX")
    flagged = [r["ts"] for r in stored(conn, "SPX") if r["extended_hours"]]
    # 16:00 EST bars of 11-05..11-07 (11-08 has none): at the close, not in the session.
    assert flagged == [datetime(2019, 11, d, 21, 0, tzinfo=UTC) for d in (5, 6, 7)]


def test_features_when_bars_outside_session_then_computed_from_session_bars_only(conn):
    from services.feature_computer.main import FeatureCycle, backfill_features, compute_features

    load_csv_file(conn, FXY_FILE, tz="UTC")
    backfill_features(conn, datetime(2024, 3, 8, tzinfo=UTC), datetime(2024, 3, 12, tzinfo=UTC))
    features = {r["ts"] for r in conn.execute("SELECT ts FROM lane_features WHERE ticker = 'FXY'")}
    session = {r["ts"] for r in stored(conn, "FXY") if not r["extended_hours"]}
    assert features == session
    # The live cycle: an after-hours bar is nothing new (no row, no window read).
    cycle = FeatureCycle()
    compute_features(conn, cycle=cycle)
    late = datetime(2024, 3, 11, 23, 59, tzinfo=UTC)
    conn.execute("INSERT INTO lane_telemetry (ticker, ts, open, high, low, close, volume, extended_hours) "
                 "VALUES ('FXY', %s, 63, 63, 63, 63, 5, true)", (late,))
    assert compute_features(conn, cycle=cycle) == 0
    assert conn.execute("SELECT max(ts) AS ts FROM lane_features").fetchone()["ts"] < late


@pytest.mark.parametrize("header, rows, tz", [
    ("Datetime,O,H,L,C,V", ["2024-03-11T09:30:00-04:00,10,11,9,10.5,100", "2024-03-11T09:31:00-04:00,10,11,9,10.6,200"], "Asia/Tokyo"),
    (" TIMESTAMP , Open , High , Low , Close , Volume ", ["2024-03-11T13:30:00Z,10,11,9,10.5,100", "2024-03-11T13:31:00+00:00,10,11,9,10.6,200.0"], "UTC"),
    ("date,time,open,high,low,close,vol", ["2024-03-11,09:30,10,11,9,10.5,100", "2024-03-11,09:31:00,10,11,9,10.6,200"], "America/New_York"),
    ("time,open,high,low,close,volume", ["1710163800,10,11,9,10.5,100", "1710163860,10,11,9,10.6,200"], "America/New_York"),
    ("t,o,h,l,c,v", ["1710163800000,10,11,9,10.5,100", "1710163860000,10,11,9,10.6,200"], "America/New_York"),
    ("\ufeffDate,Open,Close,High,Low,Volume", ["2024-03-11 09:30:00,10,10.5,11,9,100", "2024-03-11 09:31:00,10,10.6,11,9,200"], "America/New_York"),
], ids=["iso-offset-aliases", "zulu-padded-upper", "date-plus-time", "epoch-s", "epoch-ms", "bom-sp500-shape"])
def test_load_csv_when_header_and_time_shapes_vary_then_same_bars(conn, tmp_path, header, rows, tz):
    f = tmp_path / "abc_1min.csv"
    f.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    assert load_csv_file(conn, f, tz=tz).ticker == "ABC"
    got = [(r["ts"], r["close"], r["volume"], r["extended_hours"]) for r in stored(conn, "ABC")]
    assert got == [(datetime(2024, 3, 11, 13, 30, tzinfo=UTC), Decimal("10.5"), 100, False),
                   (datetime(2024, 3, 11, 13, 31, tzinfo=UTC), Decimal("10.6"), 200, False)]


def test_parse_time_when_epoch_units_then_told_apart_by_magnitude():
    from zoneinfo import ZoneInfo

    want = datetime(2024, 3, 11, 13, 30, tzinfo=UTC)
    for text in ("1710163800", "1710163800000", "1710163800000000", "1710163800.0"):
        assert parse_time(text, ZoneInfo("UTC")) == want, text


def test_ticker_from_file_name_when_common_names_then_prefix_upper_case():
    assert ticker_from_name("data/FXY_2023-07-10_2025-07-08_1min.csv") == "FXY"
    assert ticker_from_name("aapl.csv.gz") == "AAPL"
    assert ticker_from_name("BRK.B.csv") == "BRK.B"
    with pytest.raises(BadFile, match="pass --ticker"):
        ticker_from_name("(copy) bars.csv")


def test_load_csv_when_rows_malformed_then_each_reported_by_line_and_nothing_written(conn, tmp_path):
    f = tmp_path / "xyz.csv"
    f.write_text("timestamp,open,high,low,close,volume\n"
                 "2024-03-11 13:30:00,10,11,9,10.5,100\n"      # line 2: good
                 "2024-03-11 13:31:00,10,11,9,abc,100\n"       # 3: not a number
                 "yesterday,10,11,9,10,100\n"                  # 4: not a time
                 "2024-03-11 13:30:00,10,11,9,10,100\n"        # 5: duplicate of line 2
                 "2024-03-11 13:33:00,10,9,11,10,100\n"        # 6: high below low
                 "2024-03-11 13:34:00,10,11\n"                 # 7: short row
                 "2024-03-11 13:35:30,10,11,9,10,100\n"        # 8: not a minute
                 "\n"
                 "2024-03-11 13:36:00,10,11,9,10,100\n", encoding="utf-8")
    bars = read_csv_file(f, tz="UTC")
    assert [m.split(": ", 1)[0] for m in bars.bad] == [f"{f}:{n}" for n in (3, 4, 5, 6, 7, 8)]
    assert bars.bad[0].endswith("close='abc' is not a number")
    assert bars.bad[2].endswith("duplicate of line 2")
    with pytest.raises(BadFile) as e:
        load_csv_file(conn, f, tz="UTC")
    assert str(e.value).count("\n") == 5
    assert stored(conn, "XYZ") == []
    r = load_csv_file(conn, f, tz="UTC", skip_bad=True)
    assert (r.bars, r.skipped) == (2, 6)


def test_load_csv_when_file_has_no_bars_or_no_time_column_then_refused(conn, tmp_path):
    empty = tmp_path / "abc.csv"
    empty.write_text("timestamp,open,high,low,close,volume\n")
    with pytest.raises(BadFile, match="no bars loaded"):
        load_csv_file(conn, empty)
    headless = tmp_path / "def.csv"
    headless.write_text("when,open,high,low,close,volume\n1,2,3,4,5,6\n")
    with pytest.raises(BadFile, match=r"missing columns \['time"):
        load_csv_file(conn, headless)


@pytest.fixture
def restore_logging():
    """The CLI installs its own root handler; put pytest's back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_cli_load_csv_when_folder_then_every_file_loaded_by_name_and_a_bad_one_exits_1(
        conn, db_url, tmp_path, monkeypatch, capsys, restore_logging):
    from services.cli import main as cli

    monkeypatch.setenv("DATABASE_URL", db_url)
    folder = tmp_path / "bars"
    folder.mkdir()
    (folder / "FXY_2024-03-08_11_1min.csv").write_bytes(FXY_FILE.read_bytes())
    (folder / "spx_2019.csv").write_bytes(DATA_FILE.read_bytes())
    (folder / "notes.txt").write_text("not a csv")
    assert cli(["load-csv", str(folder), "--tz", "UTC"]) == 0
    out = capsys.readouterr().out
    assert "325 bars loaded for FXY" in out and "1563 bars loaded for SPX" in out
    assert {r["ticker"]: r["n"] for r in conn.execute(
        "SELECT ticker, count(*) AS n FROM lane_telemetry GROUP BY ticker")} == {"FXY": 325, "SPX": 1563}

    (folder / "bad.csv").write_text("timestamp,open,high,low,close,volume\n2024-03-11 13:30:00,1,1,1,x,1\n")
    assert cli(["load-csv", str(folder), "--tz", "UTC"]) == 1
    assert f"bad.csv:2: close='x' is not a number" in capsys.readouterr().out
    assert cli(["load-csv", str(folder / "spx_2019.csv"), str(folder / "bad.csv"), "--ticker", "SPX"]) == 2
    assert cli(["load-csv", str(tmp_path / "missing.csv")]) == 1

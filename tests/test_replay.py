"""Replay: recorded bars (here CSV files) run minute by minute through the production pipeline.

The market is the demo's synthetic one for a session, written as one CSV per ticker in the
common `timestamp,open,high,low,close,volume` shape (UTC), so the loader, the feature cycle, the
signal engine, the position manager and the dispatcher all have work: signals, orders, exits.
"""

from __future__ import annotations

import csv
import json
from datetime import date, timedelta, timezone
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from services.common.db import connect
from services.common.market_calendar import nyse_calendar
from services.common.params import ParamsInForce, as_params, load_params_file
from services.replay import REPLAY_ACCOUNT, bars_from_csv, flipped_decisions, run_replay

CALENDAR = nyse_calendar()
DAY = CALENDAR.session_on(date(2026, 11, 24))


@pytest.fixture(scope="module")
def market_csv(tmp_path_factory) -> Path:
    from services.adapters.sim.market import SimMarket
    from services.demo import CALM, TICKERS

    folder = tmp_path_factory.mktemp("bars")
    market = SimMarket(list(TICKERS), DAY, CALM.moves, seed=3)
    rows: dict[str, list] = {}
    for minute in range(market.minutes):
        for b in market.next_bars(minute):
            rows.setdefault(b["ticker"], []).append(b)
    for ticker, bars in rows.items():
        with open(folder / f"{ticker}_1min.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["timestamp", "open", "high", "low", "close", "volume"])
            for b in bars:
                w.writerow([b["ts"].astimezone(timezone.utc).isoformat(),
                            b["open"], b["high"], b["low"], b["close"], b["volume"]])
    return folder


DECISIONS = """
SELECT id, ticker, action, instrument, status, outcome_code, outcome_detail, gate_results, decision,
       position_id, exit_reason, created_at, decided_at
FROM dispatch_recommendations ORDER BY id
"""
FILLS = """
SELECT client_order_id, symbol, side, qty, status, filled_qty, filled_avg_price, limit_price, submitted_at, filled_at
FROM dispatch_executions ORDER BY id
"""
POSITIONS = """
SELECT id, ticker, symbol, side, qty, avg_price, status, close_price, exit_reason, fees, realized_pnl
FROM active_positions ORDER BY id
"""


def tables(url: str) -> dict[str, list]:
    with connect(url) as conn:
        return {name: conn.execute(sql).fetchall() for name, sql in
                (("decisions", DECISIONS), ("fills", FILLS), ("positions", POSITIONS))}


def test_two_replays_with_the_same_seed_write_identical_decisions_fills_and_positions(
        market_csv, db_url, second_db_url):
    rows, names = bars_from_csv([market_csv], tz="UTC")
    in_force = load_params_file()
    first = run_replay(rows, in_force, inputs={"source": "csv", "files": names}, seed=7, url=db_url, run_id="a")
    # The second with its watchlist's option liquidity read ahead by a second process.
    second = run_replay(rows, in_force, inputs={"source": "csv", "files": names}, seed=7, url=second_db_url,
                        run_id="a", workers=2)
    a, b = tables(db_url), tables(second_db_url)
    assert a == b
    assert second.counts["liquidity_read_ahead"] == 9 * 13  # nine tickers, every 30 minutes
    # Not a comparison of two empty books: the session traded and closed positions by rule.
    assert first.counts["emitted"] > 5 and first.counts["decision:EXECUTED"] >= 5
    assert {p["status"] for p in a["positions"]} <= {"CLOSED", "CANCELLED"}  # day trades flattened by 15:45
    assert {p["exit_reason"] for p in a["positions"] if p["status"] == "CLOSED"} >= {"END_OF_DAY"}
    assert first.inputs["digest"] == second.inputs["digest"] and first.bars == len(rows) == 390 * 9
    with connect(db_url) as conn:
        run = conn.execute("SELECT * FROM replay_runs WHERE run_id = 'a'").fetchone()
    assert (run["params_hash"], run["seed"], run["inputs"]["sessions"]) == (in_force.content_hash, 7, ["2026-11-24"])
    assert run["finished_at"] == DAY.close and run["counts"]["emitted"] == first.counts["emitted"]


def every_service_every_minute(url: str, rows: list[tuple], in_force) -> None:
    """The reference a replay's shortcuts are held to: each session minute, the bars written, then
    every service's cycle (features computed by the live incremental cycle, the signal engine and
    the book's services whatever the book holds) and the order phase."""
    from services.common.clock import FixedClock
    from services.common.db import make_pool
    from services.dispatcher.main import start_trade_updates
    from services.ingest import _write_bars
    from services.replay import STARTING_CASH, WATCHLIST_EVERY_MINUTES
    from services.simulation import Pipeline

    rows = [r for r in rows if not r[7]]
    sessions = sorted({CALENDAR.session_at(r[1]) for r in rows} - {None}, key=lambda s: s.day)
    clock = FixedClock(sessions[0].open)
    pool = make_pool(url, min_size=1, max_size=2)
    try:
        with connect(url) as conn:
            pipeline = Pipeline.simulated(conn, pool, REPLAY_ACCOUNT, in_force, CALENDAR, clock, seed=7,
                                          broker_options={"starting_cash": STARTING_CASH}, worker_id="replay",
                                          watchlist_every_minutes=WATCHLIST_EVERY_MINUTES)
            stop = start_trade_updates(pipeline.dispatcher, pipeline.broker)
            for session in sessions:
                clock.set(session.open)
                pipeline.dispatcher.refresh_account(force=True)
                for minute in range(int((session.close - session.open) / timedelta(minutes=1))):
                    ts = session.open + timedelta(minutes=minute)
                    clock.set(ts + timedelta(minutes=1))
                    bars = [r for r in rows if r[1] == ts]
                    if bars:
                        _write_bars(conn, bars)
                    pipeline.before_orders(minute, clock.now())
                    pipeline.orders()
                clock.set(session.close)
                pipeline.dispatcher.refresh_account(force=True)
            stop()
    finally:
        pool.close()


def test_a_replay_that_skips_quiet_minutes_equals_every_service_run_every_minute(market_csv, db_url, second_db_url):
    """The replay's shortcuts (features planned for the session, the signal engine only where the
    screen, the cooldowns and the watchlist leave a ticker, nothing for a flat idle book) change
    no decision, gate result, fill or position of a day that trades nine tickers."""
    rows, names = bars_from_csv([market_csv], tz="UTC")
    in_force = load_params_file()
    replay = run_replay(rows, in_force, inputs={"source": "csv", "files": names}, seed=7, url=db_url, run_id="a")
    every_service_every_minute(second_db_url, rows, in_force)
    assert tables(db_url) == tables(second_db_url)
    assert replay.counts["decision:EXECUTED"] >= 5
    assert replay.counts["signal_cycles_skipped"] > 100 and replay.counts["idle_minutes"] > 0


def test_a_replay_of_thin_fxy_sessions_with_gaps_equals_every_service_run_every_minute(db_url, second_db_url):
    """Four FXY sessions of April 2025 (thin: 25-40 minutes a session without a bar), with
    thresholds they pass: features go stale over the gaps and a screened bar stays the latest
    until the next one; the shortcuts still change no decision, fill or position."""
    rows, names = bars_from_csv([Path(__file__).parent / "data" / "FXY_2025-04-09_14_1min.csv"], tz="UTC")
    doc = load_params_file().params.model_dump(mode="json")
    doc["signal"].update(min_volume_ratio=1.0, breakout_min_distance_sma20=0.0002, bull_min_ret_5m=0.0003,
                         bull_min_ret_15m=0.0006, bear_max_ret_5m=-0.0003, bear_max_ret_15m=-0.0006)
    params = as_params(doc)
    in_force = ParamsInForce(params, "test", None, params.content_hash())
    replay = run_replay(rows, in_force, inputs={"source": "csv", "files": names}, seed=7, url=db_url, run_id="f",
                        workers=2)
    every_service_every_minute(second_db_url, rows, in_force)
    assert tables(db_url) == tables(second_db_url)
    assert len(replay.sessions) == 4 and replay.bars < 4 * 390 - 100  # the gaps
    assert replay.counts["liquidity_read_ahead"] == 4 * 13  # read ahead across the gaps too
    assert replay.counts["emitted"] >= 10 and replay.counts["decision:EXECUTED"] >= 2


def test_a_replay_writes_into_its_own_database_never_the_live_one(market_csv, db_url, monkeypatch, capsys):
    from services.cli import main

    monkeypatch.setenv("DATABASE_URL", db_url)  # the live database
    assert main(["replay", "--csv", str(market_csv / "AAPL_1min.csv"), "--tz", "UTC"]) == 0
    out = capsys.readouterr().out
    assert "1 session(s) 2026-11-24 .. 2026-11-24, 390 bars" in out
    replay_url = next(line.split("database:", 1)[1].strip() for line in out.splitlines() if "database:" in line)
    assert "ops_replay_" in replay_url
    with connect(db_url) as live:
        for table in ("lane_telemetry", "lane_features", "dispatch_recommendations", "replay_runs"):
            assert live.execute(f"SELECT count(*) AS n FROM {table}").fetchone()["n"] == 0, table
    with connect(replay_url) as replayed:
        assert replayed.execute("SELECT count(*) AS n FROM lane_telemetry").fetchone()["n"] == 390
        assert replayed.execute("SELECT count(*) AS n FROM replay_runs").fetchone()["n"] == 1
    name = conninfo_to_dict(replay_url)["dbname"]
    run_id = name.removeprefix("ops_replay_")
    try:
        # The report of the run, from its own database, by id and as the latest.
        for which in (run_id, "latest"):
            assert main(["report", "--run", which, "--json"]) == 0
            doc = json.loads(capsys.readouterr().out)
            assert (doc["source"], doc["account_id"]) == (f"replay {run_id}", REPLAY_ACCOUNT)
            assert doc["period"] == {"from": "2026-11-24", "to": "2026-11-24"}
        with pytest.raises(SystemExit, match="no replay run nosuchrun"):
            main(["report", "--run", "nosuchrun", "--json"])
    finally:
        with psycopg.connect(db_url, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def _rec(ticker, minute, status, code, action="BUY"):
    return {"ticker": ticker, "action": action, "instrument": "STOCK", "status": status, "outcome_code": code,
            "created_at": DAY.open + timedelta(minutes=minute), "exit_reason": None}


def test_flipped_decisions_match_by_ticker_and_minute_and_name_the_gate_and_direction():
    a = [_rec("AAPL", 10, "EXECUTED", "ORDER_FILLED"), _rec("MSFT", 11, "EXECUTED", "ORDER_FILLED"),
         _rec("NVDA", 12, "SKIPPED", "MAX_POSITIONS"), _rec("F", 13, "SKIPPED", "LOW_CONFIDENCE")]
    b = [_rec("AAPL", 10, "EXECUTED", "ORDER_FILLED"), _rec("MSFT", 11, "SKIPPED", "MAX_POSITIONS"),
         _rec("NVDA", 12, "EXECUTED", "ORDER_FILLED"), _rec("TSLA", 14, "SKIPPED", "LOW_CONFIDENCE")]
    flips = flipped_decisions(a, b)
    assert (flips["matched"], flips["only_a"], flips["only_b"]) == (3, 1, 1)
    assert flips["flips"] == {"EXECUTED ORDER_FILLED -> SKIPPED MAX_POSITIONS": 1,
                              "SKIPPED MAX_POSITIONS -> EXECUTED ORDER_FILLED": 1}
    assert flips["examples"]["EXECUTED ORDER_FILLED -> SKIPPED MAX_POSITIONS"] == ["2026-11-24 09:41 ET MSFT BUY"]

"""The demo, run as a user runs it: one subprocess, then its claims checked in the database."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from services.common.db import connect
from services.common.market_calendar import ET, nyse_calendar
from services.common.params import load_params_file
from services.demo import DEMO_DAY, STARTING_CASH

ROOT = Path(__file__).resolve().parents[1]
SECRETS = {"ALPACA_API_KEY": "PKDEMOLEAKCHECK1234567", "ALPACA_SECRET_KEY": "s3cret-demo-value-that-must-not-leak"}


@pytest.fixture(scope="module")
def demo_run(pg_server, tmp_path_factory):
    import psycopg

    with psycopg.connect(pg_server.get_uri("postgres"), autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS demo_run WITH (FORCE)")
        conn.execute("CREATE DATABASE demo_run")
    url = pg_server.get_uri("demo_run")
    # The embedded server trusts its socket, so a password in the URL connects and must not be logged.
    password_url = url.replace("postgres:@", "postgres:pg-password-not-to-log@")
    assert password_url != url
    env = {**os.environ, **SECRETS, "DATABASE_URL": password_url}
    proc = subprocess.run(
        [sys.executable, "-m", "services.cli", "demo", "--verbose"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return url, proc.stdout, proc.stderr


def gate_blocks(conn) -> dict[str, int]:
    rows = conn.execute(
        """SELECT g->>'name' AS gate, g->>'code' AS code, count(*)::int AS n
           FROM dispatch_recommendations r, jsonb_array_elements(r.gate_results) g
           WHERE r.account_id = 'demo' AND (g->>'passed')::boolean = false
           GROUP BY 1, 2""").fetchall()
    return {f"{r['gate']}:{r['code']}": r["n"] for r in rows}


def test_demo_blocks_with_every_account_kill_switch(demo_run):
    url, _, _ = demo_run
    with connect(url) as conn:
        blocks = gate_blocks(conn)
    for expected in ("daily_loss:DAILY_LOSS_LIMIT", "max_positions:MAX_POSITIONS", "max_exposure:MAX_EXPOSURE",
                     "trading_hours:OPENING_BLOCK", "trading_hours:CLOSING_BLOCK",
                     "kill_switch:KILL_SWITCH_REDUCING", "kill_switch:KILL_SWITCH_HALTED"):
        assert blocks.get(expected, 0) >= 1, (expected, blocks)


def test_demo_daily_loss_trip_latches_for_the_rest_of_the_session(demo_run):
    url, _, _ = demo_run
    with connect(url) as conn:
        history = conn.execute(
            "SELECT from_state, to_state, changed_by, changed_at FROM kill_switch_history WHERE account_id = 'demo' ORDER BY id"
        ).fetchall()
        # After the trip, no entry was executed until the operator's halt.
        trip = next(h for h in history if h["changed_by"] == "daily-loss-limit")
        entries_after = conn.execute(
            """SELECT count(*)::int AS n FROM dispatch_recommendations
               WHERE account_id = 'demo' AND status = 'EXECUTED' AND action <> 'EXIT' AND decided_at > %s""",
            (trip["changed_at"],)).fetchone()["n"]
    assert [(h["from_state"], h["to_state"], h["changed_by"]) for h in history] == [
        (None, "REDUCING", "daily-loss-limit"), ("REDUCING", "HALTED", "operator:demo")]
    assert entries_after == 0


def test_demo_trades_options_and_falls_back_to_stock(demo_run):
    url, stdout, _ = demo_run
    with connect(url) as conn:
        kinds = {r["instrument"]: r["n"] for r in conn.execute(
            "SELECT instrument, count(*)::int AS n FROM dispatch_executions WHERE account_id = 'demo' AND status = 'FILLED' GROUP BY 1")}
        fallbacks = conn.execute(
            "SELECT count(*)::int AS n FROM dispatch_recommendations WHERE account_id = 'demo' AND outcome_code IS NOT NULL "
            "AND instrument = 'OPTION' AND decision->'plan'->>'instrument' = 'STOCK'").fetchone()["n"]
        options = conn.execute(
            "SELECT strike, expiration, option_right, premium, option_gates FROM dispatch_executions "
            "WHERE account_id = 'demo' AND instrument = 'OPTION' AND role = 'ENTRY' AND recommendation_id NOT IN "
            "(SELECT id FROM dispatch_recommendations WHERE reason->>'source' = 'seed') LIMIT 1").fetchone()
        terminal = conn.execute(
            "SELECT count(*)::int AS n FROM dispatch_recommendations WHERE account_id = 'demo' AND status IN ('PENDING', 'SUBMITTING')"
        ).fetchone()["n"]
    assert kinds.get("OPTION", 0) >= 1 and kinds.get("STOCK", 0) >= 1
    assert fallbacks >= 1
    assert options["option_right"] in ("call", "put") and options["strike"] > 0 and options["premium"] > 0
    assert {g["name"] for g in options["option_gates"]} >= {"option_spread", "option_volume", "option_open_interest"}
    assert terminal == 0
    assert "Summary" in stdout and "kill switch" in stdout


def test_demo_output_and_logs_carry_no_secret(demo_run):
    _, stdout, stderr = demo_run
    assert '"settings"' in stderr  # the start-up line that describes the settings was logged
    for value in (*SECRETS.values(), "pg-password-not-to-log"):
        assert value not in stdout and value not in stderr


def test_demo_refuses_the_malformed_ticker_at_the_asset_gate_and_sends_it_nowhere(demo_run):
    url, _, _ = demo_run
    with connect(url) as conn:
        rec = conn.execute("SELECT status, gate_results FROM dispatch_recommendations WHERE account_id = 'demo' "
                           "AND ticker = 'b00'").fetchone()
        orders = conn.execute("SELECT count(*)::int AS n FROM sim_orders WHERE account_id = 'demo' AND symbol = 'b00'"
                              ).fetchone()["n"]
    asset = next(g for g in rec["gate_results"] if g["name"] == "asset")
    assert (rec["status"], asset["passed"], asset["code"]) == ("SKIPPED", False, "BAD_SYMBOL")
    assert orders == 0


CALM_DAY = nyse_calendar().previous_session(DEMO_DAY).day


def closed_positions(conn) -> list[dict]:
    return conn.execute(
        """SELECT p.*, (p.closed_at AT TIME ZONE 'America/New_York')::date AS closed_day,
                  (p.opened_at AT TIME ZONE 'America/New_York')::date AS opened_day,
                  (SELECT e.expiration FROM dispatch_executions e WHERE e.position_id = p.id AND e.role = 'ENTRY'
                   LIMIT 1) AS expiration
           FROM active_positions p
           WHERE p.account_id = 'demo' AND p.status = 'CLOSED' ORDER BY p.closed_at, p.id""").fetchall()


def test_demo_closes_positions_by_every_exit_rule_across_its_two_sessions(demo_run):
    url, _, _ = demo_run
    with connect(url) as conn:
        closed = closed_positions(conn)
        live = conn.execute("SELECT count(*)::int AS n FROM active_positions WHERE account_id = 'demo' "
                            "AND status IN ('PENDING', 'OPEN', 'CLOSING')").fetchone()["n"]
        by_hand = conn.execute("SELECT count(*)::int AS n FROM dispatch_recommendations WHERE account_id = 'demo' "
                               "AND action = 'EXIT' AND exit_reason IS NULL").fetchone()["n"]
    reasons = {(p["closed_day"], p["exit_reason"]) for p in closed}
    for reason in ("STOP_LOSS", "TAKE_PROFIT", "TRAILING_STOP", "END_OF_DAY", "EXPIRY_APPROACHING"):
        assert (CALM_DAY, reason) in reasons, (reason, reasons)
    assert (DEMO_DAY, "DAILY_LOSS_FLATTEN") in reasons, reasons
    # Nothing is left open, no exit was written by hand, and each position closed once.
    assert live == 0 and by_hand == 0
    assert len({p["id"] for p in closed}) == len(closed)
    for p in closed:
        assert p["realized_pnl"] is not None and p["close_price"] > 0 and p["fees"] >= 0


def test_demo_end_of_day_flatten_closes_day_trades_in_the_last_fifteen_minutes(demo_run):
    url, _, _ = demo_run
    with connect(url) as conn:
        flattened = [p for p in closed_positions(conn) if p["exit_reason"] == "END_OF_DAY"]
    assert flattened
    for p in flattened:
        closed_et = p["closed_at"].astimezone(ET)
        assert p["strategy"] == "day_trade" and p["closed_day"] == p["opened_day"] == CALM_DAY
        assert (15, 45) <= (closed_et.hour, closed_et.minute) < (16, 0)


def test_demo_carried_option_closes_on_its_last_trading_day_in_both_books(demo_run):
    url, stdout, _ = demo_run
    with connect(url) as conn:
        carried = next(p for p in closed_positions(conn) if p["exit_reason"] in ("EXPIRY_CUTOFF", "EXPIRY_APPROACHING"))
        broker = conn.execute(
            """SELECT sum(CASE WHEN side = 'buy' THEN filled_qty ELSE -filled_qty END) AS net,
                      min(submitted_at) AS bought_at
               FROM sim_orders WHERE account_id = 'demo' AND symbol = %s AND status = 'filled'""",
            (carried["symbol"],)).fetchone()
    assert carried["instrument"] == "OPTION" and carried["strategy"] == "swing_trade"
    assert carried["expiration"] == carried["closed_day"] == CALM_DAY
    assert carried["opened_day"] < CALM_DAY
    # The simulated broker bought it when the database says, and holds none of it afterwards.
    assert broker["bought_at"] == carried["opened_at"] and broker["net"] == 0
    assert "carried in" in stdout


def test_demo_daily_loss_trip_flattens_and_the_loss_ends_within_the_limit_plus_that_minute(demo_run):
    url, _, _ = demo_run
    limit = load_params_file().params.risk.max_daily_loss
    with connect(url) as conn:
        trip = conn.execute("SELECT changed_at FROM kill_switch_history WHERE account_id = 'demo' "
                            "AND changed_by = 'daily-loss-limit'").fetchone()["changed_at"]
        account = conn.execute("SELECT equity - last_equity AS pnl FROM account_state WHERE account_id = 'demo'"
                               ).fetchone()
        flattened = [p for p in closed_positions(conn) if p["exit_reason"] == "DAILY_LOSS_FLATTEN"]
        # The move of the minute the exits went out: from each flattened position's mark at the
        # previous minute (when the loss was still inside the limit) to its exit, and the exit's fee.
        move = Decimal(0)
        for p in flattened:
            if p["instrument"] == "OPTION":
                mark = conn.execute("SELECT (bid + ask) / 2 AS m FROM sim_option_marks WHERE symbol = %s "
                                    "AND ts <= %s ORDER BY ts DESC LIMIT 1",
                                    (p["symbol"], trip - timedelta(minutes=1))).fetchone()["m"]
            else:
                mark = conn.execute("SELECT close AS m FROM lane_telemetry WHERE ticker = %s AND ts < %s "
                                    "ORDER BY ts DESC LIMIT 1", (p["symbol"], trip - timedelta(minutes=1))).fetchone()["m"]
            fee_per_unit = conn.execute("SELECT fee_per_unit FROM dispatch_executions WHERE position_id = %s "
                                        "AND role = 'EXIT' AND status = 'FILLED'", (p["id"],)).fetchone()["fee_per_unit"]
            side = -1 if p["side"] == "short" else 1
            move += side * (mark - p["close_price"]) * p["qty"] * p["multiplier"] + p["qty"] * fee_per_unit
    assert flattened and all(p["closed_at"] >= trip and p["closed_day"] == DEMO_DAY for p in flattened)
    assert trip.astimezone(ET).date() == DEMO_DAY
    loss = -account["pnl"]
    assert limit < loss <= limit + move, (loss, limit, move)


def test_demo_realized_pnl_net_of_fees_matches_the_brokers_equity_based_pnl_each_day(demo_run):
    url, stdout, _ = demo_run
    with connect(url) as conn:
        account = conn.execute("SELECT equity, last_equity FROM account_state WHERE account_id = 'demo'").fetchone()
        closed = closed_positions(conn)
        broker_fees = conn.execute(
            """SELECT sum(o.filled_qty * CASE WHEN o.multiplier > 1 THEN %s ELSE %s END) AS fees
               FROM sim_orders o WHERE o.account_id = 'demo' AND o.status = 'filled'""",
            (load_params_file().params.fees.per_contract, load_params_file().params.fees.per_share)).fetchone()["fees"]
    by_day = {}
    for p in closed:
        by_day[p["closed_day"]] = by_day.get(p["closed_day"], Decimal(0)) + p["realized_pnl"]
    # The book is flat after each session: the calm day's P&L (since the account opened with the
    # carried option) is the equity it ended with; the sell-off day's is equity - last close.
    assert account["last_equity"] - STARTING_CASH == by_day[CALM_DAY]
    assert account["equity"] - account["last_equity"] == by_day[DEMO_DAY]
    assert sum(p["fees"] for p in closed) == broker_fees > 0
    assert stdout.count("MISMATCH") == 0 and stdout.count("realized") >= 2

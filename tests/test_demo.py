"""The demo, run as a user runs it: one subprocess, then its claims checked in the database."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from services.common.db import connect

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
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
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
            "WHERE account_id = 'demo' AND instrument = 'OPTION' LIMIT 1").fetchone()
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

"""Several dispatcher processes on one account: each recommendation decided once, limits held jointly.

DESIGN.md invariants 6 and 7: claims are FOR UPDATE SKIP LOCKED, orders carry a deterministic
client_order_id, and the capacity check is serialised per account, so four processes racing
through 200 recommendations never open more than max_open_positions nor two in one ticker.
Each process is a real OS process (tests/dispatcher_worker.py) with its own pool and broker.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest

from services.dispatcher.main import TERMINAL
from tests.factories import ACCOUNT, add_market, et, set_account_state

REPO = Path(__file__).resolve().parents[1]
NOW = et("2026-11-30", "11:00")
WORKERS = 4
RECOMMENDATIONS = 200
TICKERS = [f"T{chr(ord('A') + i)}" for i in range(20)]  # letters only, as tickers are
MAX_POSITIONS = 5
# Positions bind, not exposure: 5 x 2,000 per trade is far below this.
OVERRIDES = {"max_open_positions": MAX_POSITIONS, "max_notional_exposure": 1_000_000}


# Latency between a dispatcher's capacity check and its commit (a slow disk, a busy database):
# without a per-account lock, the other processes read the same counts inside this window.
SLOW_RESERVATION = """
CREATE FUNCTION test_slow_reservation() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_sleep(0.03); RETURN NEW; END $$;
CREATE TRIGGER test_slow_reservation BEFORE INSERT ON active_positions
    FOR EACH ROW EXECUTE FUNCTION test_slow_reservation();
"""


def _seed(conn) -> list[int]:
    conn.execute(SLOW_RESERVATION)
    for i, ticker in enumerate(TICKERS):
        add_market(conn, ticker, NOW, 50 + i)
    set_account_state(conn, NOW, 100_000, 100_000)
    rows = [
        (ACCOUNT, TICKERS[i % len(TICKERS)], "BUY", "STOCK", "day_trade", 0.8,
         NOW - timedelta(milliseconds=RECOMMENDATIONS - i))
        for i in range(RECOMMENDATIONS)
    ]
    with conn.cursor() as cur:
        cur.executemany(
            """INSERT INTO dispatch_recommendations (account_id, ticker, action, instrument, strategy, confidence, created_at)
               VALUES (%s, %s, %s, %s, %s, %s, %s)""", rows)
    return [r["id"] for r in conn.execute("SELECT id FROM dispatch_recommendations ORDER BY id").fetchall()]


def _start_workers(db_url: str) -> list[subprocess.Popen]:
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.dispatcher_worker", db_url, ACCOUNT, NOW.isoformat(), str(i),
             json.dumps(OVERRIDES)],
            cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i in range(WORKERS)
    ]
    for p in procs:
        line = p.stdout.readline()
        assert line.strip() == "ready", line + p.stderr.read()[-3000:]
    return procs


@pytest.mark.slow
def test_four_dispatcher_processes_decide_each_recommendation_once_and_hold_the_position_limit(db_url, conn):
    ids = _seed(conn)
    procs = _start_workers(db_url)
    try:
        started = time.monotonic()
        for p in procs:  # every process starts deciding at the same moment
            p.stdin.write("go\n")
            p.stdin.flush()
        reports = []
        for p in procs:
            out, err = p.communicate(timeout=60)
            assert p.returncode == 0, err[-3000:]
            reports.append(json.loads(out.strip().splitlines()[-1]))
        elapsed = time.monotonic() - started
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    # Each recommendation decided by exactly one process.
    decided_ids = [i for r in reports for i in r["ids"]]
    assert sorted(decided_ids) == ids
    assert sum(r["decided"] for r in reports) == RECOMMENDATIONS

    statuses = conn.execute(
        "SELECT status, count(*)::int AS n FROM dispatch_recommendations GROUP BY status").fetchall()
    by_status = {r["status"]: r["n"] for r in statuses}
    assert set(by_status) <= set(TERMINAL), by_status
    assert sum(by_status.values()) == RECOMMENDATIONS
    assert conn.execute(
        "SELECT count(*)::int AS n FROM dispatch_recommendations WHERE outcome_code IS NULL").fetchone()["n"] == 0

    # The limit held jointly: exactly five entries, one per ticker.
    open_positions = conn.execute(
        "SELECT ticker FROM active_positions WHERE account_id = %s AND status = 'OPEN'", (ACCOUNT,)).fetchall()
    assert len(open_positions) == MAX_POSITIONS
    assert len({p["ticker"] for p in open_positions}) == len(open_positions)
    assert conn.execute(
        """SELECT count(*)::int AS n FROM (SELECT ticker FROM active_positions
           WHERE status <> 'CANCELLED' GROUP BY ticker HAVING count(*) > 1) t""").fetchone()["n"] == 0
    assert by_status.get("EXECUTED") == MAX_POSITIONS
    denials = conn.execute(
        """SELECT outcome_code, count(*)::int AS n FROM dispatch_recommendations
           WHERE status = 'SKIPPED' GROUP BY outcome_code""").fetchall()
    assert {d["outcome_code"] for d in denials} <= {
        "MAX_POSITIONS", "POSITION_ALREADY_OPEN", "TICKER_COOLDOWN", "TICKER_DAILY_TRADES"}
    assert sum(d["n"] for d in denials) == RECOMMENDATIONS - MAX_POSITIONS

    # Exactly once at the broker.
    for table in ("sim_orders", "dispatch_executions"):
        dupes = conn.execute(
            f"SELECT count(*)::int AS n FROM (SELECT client_order_id FROM {table} GROUP BY client_order_id "
            f"HAVING count(*) > 1) t").fetchone()["n"]
        assert dupes == 0, table
    n_exec = conn.execute("SELECT count(*)::int AS n FROM dispatch_executions").fetchone()["n"]
    n_sim = conn.execute("SELECT count(*)::int AS n FROM sim_orders").fetchone()["n"]
    assert n_exec == n_sim == MAX_POSITIONS
    assert conn.execute(
        """SELECT count(*)::int AS n FROM dispatch_executions e
           JOIN sim_orders s ON s.client_order_id = e.client_order_id AND s.id::text = e.broker_order_id
           WHERE e.status = 'FILLED'""").fetchone()["n"] == MAX_POSITIONS
    assert elapsed < 30, f"{RECOMMENDATIONS} recommendations took {elapsed:.1f}s with {WORKERS} processes"

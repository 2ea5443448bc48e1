"""Exits under concurrency and crashes: position managers and dispatchers as separate processes.

Issue 9's proofs of "each position exactly once" (DESIGN.md invariants 6 and 13):
1. 2 position managers and 4 dispatchers (tests/exit_worker.py: the real loops on the simulated
   broker shared through Postgres) over 50 open positions whose prices cross their stops in
   waves. One dispatcher is killed (SIGKILL) with its order at the broker and its answer not
   recorded, a manager is killed mid-run; each is replaced. At the end every position has
   exactly one filled exit, the broker's net quantity of every symbol is zero and never went
   below zero, every EXIT recommendation has ended, and nothing is left PENDING or SUBMITTING.
2. A daily-loss trip under `risk.on_daily_loss: flatten` with 20 open positions (a position
   manager and 2 dispatchers): all closed, each once; entries asked for afterwards are refused
   for the rest of the session, also by processes started after every earlier one was killed
   (the latch is in Postgres).

The positions are opened in the test's own process by the Dispatcher on the same simulated
broker, so the broker's book holds their buys.
"""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import pytest

from services.adapters.sim.broker import SimBroker
from services.common.clock import FixedClock
from services.common.db import make_pool
from services.dispatcher.main import TERMINAL, Dispatcher
from tests.factories import (ACCOUNT, add_bar, add_features, add_recommendation, et, pinned_params, set_account_state,
                             wait_until)

REPO = Path(__file__).resolve().parents[1]
SIM_START = et("2026-11-30", "11:00")
# Bars run this far past the start, so every process's clock (moved by the jump) sees fresh ones.
BAR_MINUTES = 15
# Past IN_FLIGHT_GRACE and RECONCILE_EVERY: every dispatcher asks the broker about orders in flight.
JUMP_SECONDS = 150
# Waits are hang guards with room for a loaded machine (start-up alone is ~1 s of CPU a process);
# each test takes 10-15 s on a busy 2-core machine.
HANG_GUARD = 90
BASE = {"max_open_positions": 100, "max_notional_exposure": 1_000_000, "max_trades_per_ticker_per_day": 100,
        "account_refresh_seconds": 1, "poll_interval_seconds": 0.25}


def tickers(n: int) -> list[str]:
    """Letters only, as tickers are: XAA, XAB, ..."""
    return [f"X{chr(ord('A') + i // 26)}{chr(ord('A') + i % 26)}" for i in range(n)]


def price(i: int) -> Decimal:
    return Decimal(20 + i)


class Worker:
    """One tests/exit_worker.py process; its stdout lines arrive on a queue."""

    def __init__(self, proc: subprocess.Popen, worker_id: str, log: Path):
        self.proc, self.worker_id, self.log = proc, worker_id, log
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.strip())

    def expect(self, line: str, timeout: float) -> None:
        try:
            got = self.lines.get(timeout=timeout)
        except queue.Empty:
            got = None
        assert got == line, f"{self.worker_id}: expected {line!r}, got {got!r}\n{self.log.read_text()[-3000:]}"

    def go(self) -> None:
        """Start its loop (the process has started up and waits for this line)."""
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)


class Workers:
    def __init__(self, db_url: str, workdir: Path, offset: float, overrides: dict):
        self.db_url, self.workdir, self.offset, self.overrides = db_url, workdir, offset, overrides
        self.jump_file = workdir / "jump"
        self.jump_file.write_text("0")
        self.all: list[Worker] = []

    def spawn(self, role: str, *more: str) -> list[Worker]:
        """Processes of `role` (then of each role in `more`), started at once, their loops waiting for `go`."""
        started = []
        for r in (role, *more):
            worker_id = f"{r}-{len(self.all)}"
            log = self.workdir / f"{worker_id}.log"
            proc = subprocess.Popen(
                [sys.executable, "-m", "tests.exit_worker", r, self.db_url, ACCOUNT, worker_id, str(self.offset),
                 str(self.jump_file), json.dumps(self.overrides)],
                cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(log, "w"), text=True)
            worker = Worker(proc, worker_id, log)
            self.all.append(worker)
            started.append(worker)
        return started

    def wait_ready(self) -> None:
        for worker in self.all:
            worker.expect("ready", timeout=HANG_GUARD)

    def jump(self, seconds: float) -> None:
        self.jump_file.write_text(str(seconds))

    def stop_all(self) -> dict[str, int | None]:
        live = [w for w in self.all if w.proc.poll() is None]
        for w in live:
            w.proc.send_signal(signal.SIGTERM)
        codes = {}
        for w in live:
            try:
                codes[w.worker_id] = w.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                codes[w.worker_id] = None
        return codes

    def kill_all(self) -> None:
        for w in self.all:
            if w.proc.poll() is None:
                w.proc.kill()
                w.proc.wait()

    def logs(self) -> str:
        return "\n".join(f"--- {w.worker_id}\n{w.log.read_text()[-1500:]}" for w in self.all)


def open_book(db_url: str, conn, names: list[str], overrides: dict) -> None:
    """A fresh bar every minute of the run for each ticker, and one long day-trade position each,
    opened through the Dispatcher on the simulated broker."""
    for i, t in enumerate(names):
        for m in range(-2, BAR_MINUTES):
            add_bar(conn, t, SIM_START + timedelta(minutes=m), price(i))
        add_features(conn, t, SIM_START - timedelta(minutes=1), price(i))
        add_recommendation(conn, t, SIM_START - timedelta(seconds=5))
    set_account_state(conn, SIM_START, 100_000, 100_000)
    clock = FixedClock(SIM_START)
    pool = make_pool(db_url)
    try:
        dispatcher = Dispatcher(pool, SimBroker(pool, ACCOUNT, clock), pinned_params(overrides), ACCOUNT, clock=clock)
        dispatcher.refresh_account(force=True)
        outcomes = dispatcher.drain()
    finally:
        pool.close()
    assert [o.status for o in outcomes] == ["EXECUTED"] * len(names), [(o.status, o.code, o.detail) for o in outcomes]
    assert open_positions(conn) == len(names)


def move_prices(conn, workers: Workers, names: list[str], factor: str) -> None:
    """Every bar of these tickers from the workers' current minute on at price x factor."""
    now = datetime.now(timezone.utc) + timedelta(seconds=workers.offset)
    conn.execute("UPDATE lane_telemetry SET close = close * %s::numeric WHERE ticker = ANY(%s) AND ts >= %s",
                 (factor, names, now.replace(second=0, microsecond=0) - timedelta(minutes=1)))


def start_offset() -> float:
    """Real time to simulated: the workers' clocks start just after SIM_START, when the book was opened."""
    return (SIM_START + timedelta(seconds=2) - datetime.now(timezone.utc)).total_seconds()


def open_positions(conn) -> int:
    return conn.execute("SELECT count(*)::int AS n FROM active_positions WHERE account_id = %s AND status = 'OPEN'",
                        (ACCOUNT,)).fetchone()["n"]


def settled(conn, positions: int) -> bool:
    row = conn.execute(
        """SELECT (SELECT count(*) FROM active_positions WHERE account_id = %(a)s AND status = 'CLOSED')::int AS closed,
                  (SELECT count(*) FROM dispatch_recommendations
                   WHERE account_id = %(a)s AND status IN ('PENDING', 'SUBMITTING'))::int AS live,
                  (SELECT count(*) FROM dispatch_executions
                   WHERE account_id = %(a)s AND status IN ('SUBMITTING', 'ACCEPTED', 'PARTIALLY_FILLED'))::int AS working""",
        {"a": ACCOUNT}).fetchone()
    return row["closed"] == positions and row["live"] == 0 and row["working"] == 0


def assert_each_position_closed_once(conn, names: list[str]) -> None:
    """One filled exit per position, the broker's net zero per symbol and never below it."""
    positions = conn.execute(
        "SELECT id, ticker, status, exit_reason FROM active_positions WHERE account_id = %s ORDER BY id",
        (ACCOUNT,)).fetchall()
    assert sorted(p["ticker"] for p in positions) == sorted(names)  # one position per ticker: none reopened
    assert {p["status"] for p in positions} == {"CLOSED"}
    filled_exits = conn.execute(
        """SELECT position_id, count(*)::int AS n FROM dispatch_executions
           WHERE account_id = %s AND role = 'EXIT' AND status = 'FILLED' GROUP BY position_id""",
        (ACCOUNT,)).fetchall()
    assert {r["position_id"]: r["n"] for r in filled_exits} == {p["id"]: 1 for p in positions}
    orders = conn.execute(
        """SELECT symbol, side, filled_qty FROM sim_orders
           WHERE account_id = %s AND status = 'filled' ORDER BY filled_at, submitted_at""", (ACCOUNT,)).fetchall()
    net: dict[str, Decimal] = defaultdict(Decimal)
    lowest: dict[str, Decimal] = defaultdict(Decimal)
    sells: dict[str, int] = defaultdict(int)
    for o in orders:
        net[o["symbol"]] += o["filled_qty"] if o["side"] == "buy" else -o["filled_qty"]
        lowest[o["symbol"]] = min(lowest[o["symbol"]], net[o["symbol"]])
        sells[o["symbol"]] += o["side"] == "sell"
    assert {s: q for s, q in net.items() if q != 0} == {}
    assert {s: q for s, q in lowest.items() if q < 0} == {}
    assert dict(sells) == {t: 1 for t in names}
    assert conn.execute("SELECT count(*)::int AS n FROM sim_orders WHERE account_id = %s AND status <> 'filled'",
                        (ACCOUNT,)).fetchone()["n"] == 0
    statuses = conn.execute(
        "SELECT status, count(*)::int AS n FROM dispatch_recommendations WHERE account_id = %s AND action = 'EXIT' "
        "GROUP BY status", (ACCOUNT,)).fetchall()
    assert {r["status"] for r in statuses} <= set(TERMINAL), statuses


@pytest.mark.slow
def test_two_managers_and_four_dispatchers_with_kills_close_each_of_50_positions_exactly_once(db_url, conn, tmp_path):
    names = tickers(50)
    overrides = {**BASE, "max_daily_loss": 1_000_000, "max_notional_per_trade": 1000}
    workers = Workers(db_url, tmp_path, start_offset(), overrides)
    waves = [names[i:i + 10] for i in range(0, 50, 10)]
    try:
        first_manager, second_manager, staller, *dispatchers, next_dispatcher, next_manager = workers.spawn(
            "manager", "manager", "dispatcher-stall", "dispatcher", "dispatcher", "dispatcher", "dispatcher", "manager")
        open_book(db_url, conn, names, overrides)  # while the processes start up
        workers.wait_ready()
        for worker in (first_manager, second_manager, staller):
            worker.go()
        # Alone, the staller takes the first exit; it stops with the order at the broker.
        move_prices(conn, workers, waves[0], "0.95")  # 5% down: past the day trade's 2% stop
        staller.expect("stalled", timeout=HANG_GUARD)
        for worker in dispatchers:
            worker.go()
        staller.kill()
        next_dispatcher.go()  # its replacement
        for k, wave in enumerate(waves[1:], start=1):
            move_prices(conn, workers, wave, "0.95")
            if k == 2:
                first_manager.kill()  # mid-run: exits of this wave may be half written
                next_manager.go()
            time.sleep(0.5)
        # Past the grace periods: the staller's order, found at the broker, is recorded as filled.
        workers.jump(JUMP_SECONDS)
        done = wait_until(lambda: settled(conn, len(names)), timeout=HANG_GUARD)
        assert done, conn.execute("SELECT status, outcome_code, count(*)::int AS n FROM dispatch_recommendations "
                                  "GROUP BY 1, 2").fetchall()
        codes = workers.stop_all()
        assert codes == {w: 0 for w in codes}, workers.logs()
    finally:
        workers.kill_all()

    assert_each_position_closed_once(conn, names)
    reasons = conn.execute("SELECT exit_reason, count(*)::int AS n FROM active_positions GROUP BY 1").fetchall()
    assert [(r["exit_reason"], r["n"]) for r in reasons] == [("STOP_LOSS", 50)]
    # The staller's exit: its order was at the broker; another process found it and recorded the fill.
    stalled = conn.execute("SELECT status FROM dispatch_recommendations WHERE claimed_by = %s",
                           (staller.worker_id,)).fetchall()
    assert [r["status"] for r in stalled] == ["EXECUTED"]


@pytest.mark.slow
def test_daily_loss_trip_flattens_20_positions_once_and_the_latch_outlives_a_restart(db_url, conn, tmp_path):
    names = tickers(20)
    overrides = {**BASE, "max_daily_loss": 500, "max_notional_per_trade": 3000, "on_daily_loss": "flatten"}
    workers = Workers(db_url, tmp_path, start_offset(), overrides)
    try:
        *first, next_manager, next_dispatcher = workers.spawn(
            "manager", "dispatcher", "dispatcher", "manager", "dispatcher")
        open_book(db_url, conn, names, overrides)  # while the processes start up
        workers.wait_ready()
        for worker in first:
            worker.go()
        # 1.5% down: inside every stop (2%), but 20 x ~3,000 x 1.5% is past the 500 daily loss.
        move_prices(conn, workers, names, "0.985")
        assert wait_until(lambda: settled(conn, len(names)), timeout=HANG_GUARD), workers.logs()
        # Entries asked for after the trip, in the same session, are refused.
        for t in names[:5]:
            add_recommendation(conn, t, SIM_START + timedelta(seconds=10))
        assert wait_until(lambda: _pending(conn) == 0, timeout=HANG_GUARD)
        for worker in first:
            worker.kill()
        # Every process gone: new ones read the latch from Postgres and refuse entries too.
        next_manager.go()
        next_dispatcher.go()
        for t in names[5:10]:
            add_recommendation(conn, t, SIM_START + timedelta(seconds=20))
        assert wait_until(lambda: _pending(conn) == 0, timeout=HANG_GUARD)
        time.sleep(0.5)  # a few manager cycles over the closed book
        codes = workers.stop_all()
        assert codes == {w: 0 for w in codes}, workers.logs()
    finally:
        workers.kill_all()

    assert_each_position_closed_once(conn, names)
    reasons = conn.execute("SELECT exit_reason, count(*)::int AS n FROM active_positions GROUP BY 1").fetchall()
    assert [(r["exit_reason"], r["n"]) for r in reasons] == [("DAILY_LOSS_FLATTEN", 20)]
    switch = conn.execute("SELECT state, changed_by, tripped_session FROM kill_switch WHERE account_id = %s",
                          (ACCOUNT,)).fetchone()
    assert (switch["state"], switch["changed_by"], switch["tripped_session"]) == (
        "REDUCING", "daily-loss-limit", SIM_START.date())
    entries = conn.execute(
        """SELECT status, outcome_code, count(*)::int AS n FROM dispatch_recommendations
           WHERE account_id = %s AND action = 'BUY' AND created_at > %s GROUP BY 1, 2""",
        (ACCOUNT, SIM_START)).fetchall()
    assert [(r["status"], r["n"]) for r in entries] == [("SKIPPED", 10)], entries
    refused = conn.execute(
        """SELECT g->>'code' AS code FROM dispatch_recommendations r, jsonb_array_elements(r.gate_results) g
           WHERE r.account_id = %s AND r.action = 'BUY' AND r.created_at > %s AND g->>'name' = 'kill_switch'""",
        (ACCOUNT, SIM_START)).fetchall()
    assert [r["code"] for r in refused] == ["KILL_SWITCH_REDUCING"] * 10
    assert conn.execute("SELECT count(*)::int AS n FROM kill_switch_history WHERE account_id = %s",
                        (ACCOUNT,)).fetchone()["n"] == 1  # tripped once; no restart re-tripped or released it


def _pending(conn) -> int:
    return conn.execute("SELECT count(*)::int AS n FROM dispatch_recommendations WHERE account_id = %s "
                        "AND status IN ('PENDING', 'SUBMITTING')", (ACCOUNT,)).fetchone()["n"]

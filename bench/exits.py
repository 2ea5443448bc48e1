"""Benchmark: one position-manager cycle over 500 open positions on the embedded Postgres.

    python -m bench.exits [--stocks 440] [--options 60] [--runs 30] [--exits 50]

The book: stocks with a session of 1-minute bars each (the newest one fresh) and options marked
from a local quote source (an in-memory dict, as the simulated market's would be), day and swing
trades, longs and shorts, beside a month of decided recommendations. Two cases, each timed over
repeated cycles at one `now`:

1. steady: every position holds (prices inside their stops and targets): gather, evaluate,
   write the marks, insert nothing;
2. moving: each cycle a minute later, with a new bar for every stock and a new quote for every
   option (inserted untimed before the cycle), every price inside its stops: every position's
   mark changes, so every row is written, as in a live session's minute;
3. exits: `--exits` of the stocks trade below their stop: the cycle also inserts that many EXIT
   recommendations (deleted again, untimed, before the next cycle, so every cycle writes them).

Case 1 repeats one minute: the marks are as stored after the first cycle, so nothing is written;
case 2 is the figure of a session's minute.

Printed: p50/p95 of the whole `run_position_cycle` (wall clock, and the CPU time of this
process: the Python side, which a loaded machine inflates less), and its split into the gather
(the open positions with their bars, the kill switch: SQL), the rules (`ExitRules.evaluate` over
the book: pure), the write (the marks and the exits in one transaction, with its commit) and the
rest (bars from quotes, mark rows, logging). The split comes from timing wrappers around the
production functions, never a copy of them. The database keeps its default durability settings.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import statistics
import time
from collections import defaultdict
from contextlib import contextmanager
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal

import psycopg

from bench.common import database, embedded_postgres, letters
from services.adapters.postgres import exits_repo, kill_switch
from services.common import db as dbmod
from services.common.logs import configure_logging
from services.common.market_calendar import nyse_calendar
from services.common.params import ParamsInForce, load_params_file
from services.domain.order_pricing import Quote
from services.position_manager import main as pm

ACCOUNT = "bench"
SESSION_OPEN = datetime(2026, 11, 30, 14, 30, tzinfo=timezone.utc)  # Monday 09:30 ET
NOW = SESSION_OPEN + timedelta(hours=3, seconds=5)  # 12:30:05 ET: the 12:29 bar is the newest, fresh
EXPIRATIONS = (date(2026, 12, 4), date(2026, 12, 18))  # a day trade's week, a swing trade's month
STOCK_PRICE = Decimal("100")
OPTION_ENTRY = Decimal("2.00")
HISTORY = 20_000


def ticker(i: int) -> str:
    """Letters only, as real tickers are: SAAA, SAAB, ..."""
    return "S" + letters(i, 3)


def occ(root: str, expiration: date, strike: int) -> str:
    return f"{root}{expiration:%y%m%d}C{strike * 1000:08d}"


def _bars_copy(tickers: list[str], minutes: int) -> io.StringIO:
    buf = io.StringIO()
    for t in tickers:
        for m in range(minutes):
            ts = SESSION_OPEN + timedelta(minutes=m)
            buf.write(f"{t}\t{ts.isoformat()}\t{STOCK_PRICE}\t{STOCK_PRICE + 1}\t{STOCK_PRICE - 1}\t{STOCK_PRICE}\t1000\n")
    buf.seek(0)
    return buf


def seed(conn: psycopg.Connection, stocks: int, options: int) -> tuple[list[str], dict[str, Quote]]:
    """The book and its market: `stocks` stock positions with a session of bars, `options` option positions."""
    tickers = [ticker(i) for i in range(stocks)]
    minutes = int((NOW - SESSION_OPEN).total_seconds() // 60)  # bars up to the one that ended before now
    with conn.cursor() as cur, cur.copy(
            "COPY lane_telemetry (ticker, ts, open, high, low, close, volume) FROM STDIN") as copy:
        copy.write(_bars_copy(tickers, minutes).read())
    opened = SESSION_OPEN + timedelta(minutes=30)
    rows = []
    for i, t in enumerate(tickers):
        opened = SESSION_OPEN + timedelta(minutes=30, seconds=7 * i)  # each its own time, as live entries are
        strategy = "day_trade" if i % 2 == 0 else "swing_trade"
        side = "short" if i % 5 == 0 else "long"
        rows.append((ACCOUNT, t, "STOCK", t, side, 10, 1, STOCK_PRICE, "OPEN", opened, strategy))
    quotes: dict[str, Quote] = {}
    for i in range(options):
        opened = SESSION_OPEN + timedelta(minutes=45, seconds=11 * i)
        root = "O" + ticker(i)[1:]
        strategy = "day_trade" if i % 2 == 0 else "swing_trade"
        symbol = occ(root, EXPIRATIONS[i % 2], 100)
        quotes[symbol] = Quote(OPTION_ENTRY - Decimal("0.05"), OPTION_ENTRY + Decimal("0.05"))
        rows.append((ACCOUNT, root, "OPTION", symbol, "long", 2, 100, OPTION_ENTRY, "OPEN", opened, strategy))
    with conn.cursor() as cur:
        cur.executemany(
            """INSERT INTO active_positions (account_id, ticker, instrument, symbol, side, qty, multiplier, avg_price,
                                             status, opened_at, strategy)
               VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)""", rows)
    # A month of decided recommendations, as a live table holds: the live-exit check per
    # position then goes through its partial index, as it would in production.
    conn.execute("""INSERT INTO dispatch_recommendations (account_id, ticker, action, instrument, strategy, created_at,
                                                          status)
                    SELECT %s, 'HIST', 'BUY', 'STOCK', 'day_trade', %s - g * interval '1 minute', 'SKIPPED'
                    FROM generate_series(1, %s) g""", (ACCOUNT, SESSION_OPEN, HISTORY))
    conn.execute("VACUUM ANALYZE")
    return tickers, quotes


class Split:
    """Time spent inside the production functions of one cycle, by part."""

    def __init__(self) -> None:
        self.ms: dict[str, float] = defaultdict(float)

    @contextmanager
    def timing(self, part: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.ms[part] += (time.perf_counter() - t0) * 1000

    def wrap(self, part: str, fn):
        def timed(*args, **kwargs):
            with self.timing(part):
                return fn(*args, **kwargs)
        return timed


class TimedConnection:
    """The cycle's connection, with its transaction (the write, ended by the commit) timed."""

    def __init__(self, conn: psycopg.Connection, split: Split):
        self._conn, self._split = conn, split

    @contextmanager
    def transaction(self):
        with self._split.timing("write"), self._conn.transaction() as tx:
            yield tx

    def __getattr__(self, name):
        return getattr(self._conn, name)


def instrument(split: Split) -> None:
    """Timing wrappers around the production functions the cycle calls (module attributes)."""
    exits_repo.open_positions = split.wrap("gather", exits_repo.open_positions)
    kill_switch.read_state = split.wrap("gather", kill_switch.read_state)
    pm.ExitRules.evaluate = split.wrap("rules", pm.ExitRules.evaluate)
    pm.ExitRules.quick_hold = split.wrap("rules", pm.ExitRules.quick_hold)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def _next_minute(conn, tickers: list[str], quotes: dict[str, Quote], k: int) -> datetime:
    """The market a minute later (k minutes after NOW): a bar for every stock, every quote moved."""
    if k == 0:
        return NOW
    ts = NOW - timedelta(seconds=65) + timedelta(minutes=k)
    close = STOCK_PRICE + (Decimal("0.10") if k % 2 else Decimal("-0.10"))
    with conn.cursor() as cur, cur.copy(
            "COPY lane_telemetry (ticker, ts, open, high, low, close, volume) FROM STDIN") as copy:
        copy.write("".join(f"{t}\t{ts.isoformat()}\t{close}\t{close}\t{close}\t{close}\t1000\n" for t in tickers))
    mid = OPTION_ENTRY + (Decimal("0.02") if k % 2 else Decimal("-0.02"))
    for symbol in quotes:
        quotes[symbol] = Quote(mid - Decimal("0.05"), mid + Decimal("0.05"))
    return NOW + timedelta(minutes=k)


def run_case(conn, in_force, calendar, quotes, runs: int, split: Split, clear_exits: bool,
             moving: list[str] | None = None) -> dict:
    totals: list[float] = []
    cpus: list[float] = []
    parts: dict[str, list[float]] = defaultdict(list)
    timed = TimedConnection(conn, split)
    source = lambda symbols, now: {s: quotes.get(s) for s in symbols}  # noqa: E731
    exits = 0
    for k in range(runs + 2):
        if clear_exits:
            conn.execute("DELETE FROM dispatch_recommendations WHERE action = 'EXIT'")
        now = _next_minute(conn, moving, quotes, k) if moving is not None else NOW
        split.ms.clear()
        c0, t0 = time.process_time(), time.perf_counter()
        cycle = pm.run_position_cycle(timed, ACCOUNT, in_force, now, calendar, source)
        total = (time.perf_counter() - t0) * 1000
        cpu = (time.process_time() - c0) * 1000
        if k < 2:
            continue  # warm-up: plans cached, the first Decimal contexts and calendar lookups made
        totals.append(total)
        cpus.append(cpu)
        for part in ("gather", "rules", "write"):
            parts[part].append(split.ms[part])
        parts["other"].append(total - sum(split.ms[p] for p in ("gather", "rules", "write")))
        exits = cycle.counts["exits"]
        assert cycle.evaluated > 0 and cycle.held_back is None, (cycle.evaluated, cycle.held_back)
    return {"totals": totals, "cpus": cpus, "parts": parts, "exits": exits, "evaluated": cycle.evaluated}


def report(name: str, r: dict) -> None:
    t = r["totals"]
    print(f"{name}: {r['evaluated']} positions, {r['exits']} exits written per cycle, {len(t)} cycles")
    print(f"  cycle p50 {statistics.median(t):.2f} ms, p95 {percentile(t, 0.95):.2f} ms, min {min(t):.2f} ms"
          f" (this process's CPU: p50 {statistics.median(r['cpus']):.2f} ms)")
    split = ", ".join(f"{p} {statistics.median(v):.2f}" for p, v in r["parts"].items())
    print(f"  split (median ms): {split}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--stocks", type=int, default=440)
    ap.add_argument("--options", type=int, default=60)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--exits", type=int, default=50)
    args = ap.parse_args()

    # The service logs as JSON at INFO; the lines go nowhere here but are still formatted.
    configure_logging("INFO", stream=open(os.devnull, "w"))
    logging.getLogger("pgserver").setLevel(logging.ERROR)
    server = embedded_postgres()
    url = database(server)
    in_force: ParamsInForce = load_params_file()
    calendar = nyse_calendar()
    split = Split()
    instrument(split)

    with dbmod.connect(url) as conn:
        tickers, quotes = seed(conn, args.stocks, args.options)
        report("steady (every position holds)", run_case(conn, in_force, calendar, quotes, args.runs, split, False))
        report("moving (a new bar and quote each minute: every mark written)",
               run_case(conn, in_force, calendar, dict(quotes), args.runs, split, False, moving=tickers))
        conn.execute("DELETE FROM lane_telemetry WHERE ts > %s", (NOW,))  # back to NOW's market
        conn.execute("VACUUM ANALYZE active_positions, lane_telemetry")

        # Below the stop: the long stocks' newest bar 5% under entry (the day and swing stops are 2% and 5%).
        longs = [t for i, t in enumerate(tickers) if i % 5 != 0][: args.exits]
        conn.execute("UPDATE lane_telemetry SET close = close * 0.94 WHERE ticker = ANY(%s) AND ts = "
                     "(SELECT max(ts) FROM lane_telemetry)", (longs,))
        report(f"exits ({len(longs)} stocks under their stop)",
               run_case(conn, in_force, calendar, quotes, args.runs, split, True))


if __name__ == "__main__":
    main()

"""Benchmark: the feature-computer cycle for 500 tickers x 390 bars on the embedded Postgres.

Loads a session of synthetic 1-minute bars for 500 tickers into a throwaway pgserver database,
all but the last `runs` minutes. Then, as in production, each minute's 500 bars are appended
(not timed) and the loop's cycle runs (timed): every timed cycle computes and writes 500 new
rows. Prints the median of those full cycles, of cycles with nothing new (the loop's usual tick
between two minutes), of a cold cycle (a fresh process reading every window), and a backfill.
On a shared machine wall times swell with the load, so the CPU spent per cycle (this process
plus its Postgres backend, from /proc) is printed beside them.

    python -m bench.features [--tickers 500] [--bars 390] [--runs 15]
"""

from __future__ import annotations

import argparse
import io
import os
import random
import statistics
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from bench.common import database, embedded_postgres
from services.common import db as dbmod
from services.feature_computer.main import FeatureCycle, backfill_features, compute_features

SESSION_OPEN = datetime(2026, 3, 10, 13, 30, tzinfo=timezone.utc)  # 09:30 EDT


def _bars_copy(tickers: int, bars: int, seed: int = 7) -> io.StringIO:
    rng = random.Random(seed)
    buf = io.StringIO()
    for i in range(tickers):
        price = 20 + rng.random() * 400
        for m in range(bars):
            price *= 1 + rng.gauss(0, 0.001)
            ts = SESSION_OPEN + timedelta(minutes=m)
            c = round(price, 2)
            buf.write(f"T{i:04d}\t{ts.isoformat()}\t{c}\t{c + 0.05}\t{c - 0.05}\t{c}\t{rng.randint(1000, 90000)}\n")
    buf.seek(0)
    return buf


def _backend_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of a Postgres backend, or NaN where /proc is not readable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tickers", type=int, default=500)
    ap.add_argument("--bars", type=int, default=390)
    ap.add_argument("--runs", type=int, default=15)
    args = ap.parse_args()

    server = embedded_postgres()
    url = database(server)

    first = args.bars - args.runs
    lines = _bars_copy(args.tickers, args.bars).read().splitlines(keepends=True)
    minute_of = [SESSION_OPEN + timedelta(minutes=m) for m in range(args.bars)]
    by_minute = [lines[m::args.bars] for m in range(args.bars)]  # each ticker's bar of minute m

    def append(conn, minutes) -> None:
        with conn.cursor() as cur, cur.copy(
                "COPY lane_telemetry (ticker, ts, open, high, low, close, volume) FROM STDIN") as copy:
            for m in minutes:
                copy.write("".join(by_minute[m]))

    with dbmod.connect(url, autocommit=True) as conn:
        started = time.perf_counter()
        append(conn, range(first))
        conn.execute("VACUUM ANALYZE lane_telemetry")
        print(f"loaded {args.tickers} x {first} bars in {time.perf_counter() - started:.2f} s")

        cycle = FeatureCycle()
        cold_t0 = time.perf_counter()
        rows = compute_features(conn, now=minute_of[first - 1] + timedelta(minutes=1), cycle=cycle)
        cold_ms = (time.perf_counter() - cold_t0) * 1000
        assert rows == args.tickers, rows

        backend = conn.execute("SELECT pg_backend_pid() AS pid").fetchone()["pid"]
        full, idle = [], []
        cpu = {"full": 0.0, "idle": 0.0}
        for k in range(args.runs):
            append(conn, [first + k])
            # The bar of minute first+k completes at first+k+1: the cycle sees one new bar per ticker.
            now = minute_of[first + k] + timedelta(minutes=1)
            c0, b0, t0 = time.process_time(), _backend_cpu_s(backend), time.perf_counter()
            rows = compute_features(conn, now=now, cycle=cycle)
            full.append((time.perf_counter() - t0) * 1000)
            cpu["full"] += time.process_time() - c0 + _backend_cpu_s(backend) - b0
            assert rows == args.tickers, rows
            c0, b0 = time.process_time(), _backend_cpu_s(backend)
            for tick in range(5):
                t0 = time.perf_counter()
                rows = compute_features(conn, now=now + timedelta(seconds=5 * (tick + 1)), cycle=cycle)
                idle.append((time.perf_counter() - t0) * 1000)
                assert rows == 0, rows
            cpu["idle"] += time.process_time() - c0 + _backend_cpu_s(backend) - b0

        t0 = time.perf_counter()
        rows = backfill_features(conn, SESSION_OPEN, SESSION_OPEN + timedelta(days=1))
        backfill_ms = (time.perf_counter() - t0) * 1000

    print(f"full cycle ({args.tickers} tickers, one new bar each, computed and written): "
          f"median {statistics.median(full):.1f} ms, min {min(full):.1f} ms, max {max(full):.1f} ms "
          f"over {args.runs} runs, CPU {cpu['full'] / args.runs * 1000:.1f} ms per cycle (target <= 15 ms)")
    print(f"cycle with nothing new: median {statistics.median(idle):.2f} ms, max {max(idle):.2f} ms "
          f"over {len(idle)} runs, CPU {cpu['idle'] / len(idle) * 1000:.2f} ms per cycle, 0 rows written (target < 2 ms)")
    print(f"cold cycle (fresh process, every ticker's window read): {cold_ms:.1f} ms")
    print(f"backfill of every bar: {rows} rows in {backfill_ms:.0f} ms ({rows / backfill_ms * 1000:,.0f} bars/s)")


if __name__ == "__main__":
    main()

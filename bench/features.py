"""Benchmark: one feature-computer cycle for 500 tickers x 390 bars on the embedded Postgres.

Loads a full session of synthetic 1-minute bars for 500 tickers into a throwaway pgserver
database, then times `compute_features` at successive minutes near the close, so that every
timed cycle writes 500 new rows (the realistic case), and prints the median.

    python -m bench.features [--tickers 500] [--bars 390] [--runs 9]
"""

from __future__ import annotations

import argparse
import io
import random
import statistics
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psycopg

from services.common import db as dbmod
from services.common.migrate import migrate
from services.feature_computer.main import backfill_features, compute_features

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tickers", type=int, default=500)
    ap.add_argument("--bars", type=int, default=390)
    ap.add_argument("--runs", type=int, default=9)
    args = ap.parse_args()

    pgdata = Path(tempfile.mkdtemp(prefix="ops-bench-")) / "data"
    server = dbmod.embedded_server(pgdata, cleanup_mode="delete")
    with psycopg.connect(server.get_uri("postgres"), autocommit=True) as admin:
        admin.execute("CREATE DATABASE bench")
    url = server.get_uri("bench")
    migrate(url)

    with dbmod.connect(url) as conn:
        started = time.perf_counter()
        with conn.cursor() as cur, cur.copy(
                "COPY lane_telemetry (ticker, ts, open, high, low, close, volume) FROM STDIN") as copy:
            copy.write(_bars_copy(args.tickers, args.bars).read())
        conn.execute("VACUUM ANALYZE lane_telemetry")
        load_s = time.perf_counter() - started
        print(f"loaded {args.tickers} x {args.bars} bars in {load_s:.2f} s")

        timings = []
        first = args.bars - args.runs
        for k in range(args.runs):
            # The bar at minute first+k completes at first+k+1: each cycle sees one new bar per ticker.
            now = SESSION_OPEN + timedelta(minutes=first + k + 1)
            t0 = time.perf_counter()
            rows = compute_features(conn, now=now)
            timings.append((time.perf_counter() - t0) * 1000)
            assert rows == args.tickers, rows
        given = []
        tickers = [f"T{i:04d}" for i in range(args.tickers)]
        conn.execute("DELETE FROM lane_features WHERE ts >= %s", (SESSION_OPEN + timedelta(minutes=first),))
        for k in range(args.runs):
            now = SESSION_OPEN + timedelta(minutes=first + k + 1)
            t0 = time.perf_counter()
            rows = compute_features(conn, now=now, tickers=tickers)
            given.append((time.perf_counter() - t0) * 1000)
            assert rows == args.tickers, rows
        again = time.perf_counter()
        unchanged = compute_features(conn, now=now)
        again_ms = (time.perf_counter() - again) * 1000

        t0 = time.perf_counter()
        rows = backfill_features(conn, SESSION_OPEN, SESSION_OPEN + timedelta(days=1))
        backfill_ms = (time.perf_counter() - t0) * 1000

    print(f"feature cycle ({args.tickers} tickers, latest bar each, one statement): "
          f"median {statistics.median(timings):.1f} ms, min {min(timings):.1f} ms, "
          f"max {max(timings):.1f} ms over {args.runs} runs")
    print(f"same with the ticker list given (no skip scan): median {statistics.median(given):.1f} ms, "
          f"min {min(given):.1f} ms")
    print(f"repeat cycle with nothing new: {again_ms:.1f} ms ({unchanged} rows written)")
    print(f"backfill of every bar: {rows} rows in {backfill_ms:.0f} ms")


if __name__ == "__main__":
    main()

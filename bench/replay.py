"""Benchmark: replay throughput, on a throwaway embedded Postgres.

1. Features and signals: synthetic 1-minute bars for T tickers over S sessions, run minute by
   minute through the feature computer's incremental cycle and the signal engine's cycle, as a
   replay runs them; bars per second.
2. The whole pipeline: the same bars through `services.replay.run_replay` (features, watchlist,
   signals, position manager, dispatcher with the simulated broker); bars per second, sessions
   per minute, and what a replay of 20 tickers x 20 sessions takes at that rate.

    python -m bench.replay [--tickers 20] [--sessions 2]

The issue's targets: >= 250,000 bars/s through features and signals; 20 tickers x 20 sessions
end to end in under 60 s on 2 cores.
"""

from __future__ import annotations

import argparse
import logging
import random
import tempfile
import time
from datetime import date, timedelta
from decimal import Decimal
from pathlib import Path

import psycopg


def synthetic_rows(tickers: int, sessions, seed: int = 7) -> list[tuple]:
    """(ticker, ts, open, high, low, close, volume, extended_hours) for every session minute, by time."""
    rng = random.Random(seed)
    names = [f"R{chr(65 + i // 26)}{chr(65 + i % 26)}" for i in range(tickers)]
    price = {n: 20 + rng.random() * 400 for n in names}
    rows = []
    for s in sessions:
        ts = s.open
        while ts < s.close:
            for n in names:
                o = price[n]
                c = o * (1 + rng.gauss(0.0001, 0.0015))
                price[n] = c
                q = Decimal("0.01")
                rows.append((n, ts, Decimal(str(o)).quantize(q), Decimal(str(max(o, c) * 1.0005)).quantize(q),
                             Decimal(str(min(o, c) * 0.9995)).quantize(q), Decimal(str(c)).quantize(q),
                             rng.randint(5_000, 90_000), False))
            ts += timedelta(minutes=1)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tickers", type=int, default=20)
    ap.add_argument("--sessions", type=int, default=2)
    args = ap.parse_args()
    logging.disable(logging.WARNING)

    from services.common import db as dbmod
    from services.common.market_calendar import nyse_calendar
    from services.common.migrate import migrate
    from services.common.params import load_params_file
    from services.feature_computer.main import FeatureCycle, compute_features
    from services.ingest import _write_bars
    from services.replay import run_replay
    from services.signal_engine.main import run_signal_cycle

    calendar = nyse_calendar()
    sessions = calendar.sessions_between(date(2026, 11, 2), date(2026, 12, 31))[: args.sessions]
    rows = synthetic_rows(args.tickers, sessions)
    in_force = load_params_file()
    with tempfile.TemporaryDirectory() as tmp:
        server = dbmod.embedded_server(Path(tmp) / "pg", cleanup_mode="stop")
        admin = server.get_uri("postgres")
        with psycopg.connect(admin, autocommit=True) as conn:
            for name in ("bench_fs", "bench_all"):
                conn.execute(f"CREATE DATABASE {name}")
                conn.execute(f"ALTER DATABASE {name} SET synchronous_commit = off")

        url = server.get_uri("bench_fs")
        migrate(url)
        by_minute: dict = {}
        for r in rows:
            by_minute.setdefault(r[1], []).append(r)
        cycle = FeatureCycle()
        started = time.perf_counter()
        with dbmod.connect(url) as conn:
            for ts in sorted(by_minute):
                now = ts + timedelta(minutes=1)
                _write_bars(conn, by_minute[ts])
                compute_features(conn, now=now, cycle=cycle)
                run_signal_cycle(conn, "bench", in_force, now)
        fs = time.perf_counter() - started
        print(f"features + signals: {len(rows):,} bars ({args.tickers} tickers x {len(sessions)} sessions) "
              f"in {fs:.1f} s: {len(rows) / fs:,.0f} bars/s (target >= 250,000)")

        url = server.get_uri("bench_all")
        result = run_replay(rows, in_force, inputs={"source": "bench"}, seed=7, url=url, calendar=calendar)
        per_session = result.seconds / len(sessions)
        print(f"whole pipeline: {result.bars:,} bars in {result.seconds:.1f} s: {result.bars_per_second:,.0f} bars/s, "
              f"{60 / per_session:.2f} sessions/minute; 20 sessions of {args.tickers} tickers: "
              f"~{20 * per_session:.0f} s (target < 60 s)")
        print(f"  decisions {sum(v for k, v in result.counts.items() if k.startswith('decision:'))}, "
              f"signals emitted {result.counts.get('emitted', 0)}")


if __name__ == "__main__":
    main()

"""Dispatcher throughput and wake-up latency with the simulated paper broker.

    python bench/dispatch.py [--recs 10000] [--tickers 2000] [--latency-recs 400]

1. Throughput: N pending recommendations over many tickers for one account with up to 50 open
   positions (the first 50 execute; the rest are denied by the position, exposure and cooldown
   gates, as most recommendations are once an account is full), decided by 1 and then 2
   dispatcher processes; decisions per second from the start signal until none is pending.
2. Latency: dispatcher processes wait on LISTEN; the producer commits one recommendation at a
   time (each for a new ticker, so each leads to an order) and NOTIFYs; latency is the order's
   submission time at the broker minus the recommendation's commit time (p50, p99).

The database is an embedded Postgres in a temporary directory with its default durability
settings (fsync and synchronous_commit on), as a production database would run.
"""

from __future__ import annotations

import argparse
import os
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SESSION_START = datetime(2026, 11, 30, 15, 0, tzinfo=timezone.utc)  # 10:00 ET
ACCOUNT = "bench"


def ticker(i: int) -> str:
    """The i-th synthetic ticker, letters only as real tickers are (the asset gate refuses digits): TAAAA, TAAAB, ..."""
    letters = ""
    for _ in range(4):
        i, r = divmod(i, 26)
        letters = chr(ord("A") + r) + letters
    return "T" + letters


def bench_params(max_open_positions: int = 50):
    from services.common.params import ParamsInForce, as_params

    params = as_params({
        "max_open_positions": max_open_positions, "max_notional_exposure": 100_000_000,
        "max_notional_per_trade": 1000, "max_trades_per_ticker_per_day": 1000,
        "ticker_cooldown_minutes": 30, "max_recommendation_age_seconds": 86_400,
        "max_bar_age_seconds": 3600, "max_feature_age_seconds": 3600,
        "max_account_state_age_seconds": 86_400, "poll_interval_seconds": 1.0,
    })
    return ParamsInForce(params, "bench", "1", params.content_hash())


def worker(url: str, offset_s: float, start, stop, mode: str, index: int) -> None:
    import threading

    from services.common.clock import OffsetClock
    from services.common.db import make_pool
    from services.dispatcher.main import Dispatcher, StaticParams
    from services.adapters.sim.broker import SimBroker

    worker_id = f"bench-{mode}-{index}"
    clock = OffsetClock(timedelta(seconds=offset_s))
    pool = make_pool(url, min_size=2, max_size=2, application_name=f"ops-dispatcher:{worker_id}", check=False)
    broker = SimBroker(pool, ACCOUNT, clock, starting_cash=Decimal("100000000"))
    # Throughput: a realistic book (50 positions); latency: every recommendation leads to an order.
    d = Dispatcher(pool, broker, StaticParams(bench_params(50 if mode == "drain" else 500)), ACCOUNT,
                   clock=clock, worker_id=worker_id)
    d.refresh_account(force=True)
    start.wait()
    if mode == "drain":
        d.drain()
    else:
        halt = threading.Event()
        t = threading.Thread(target=d.run_forever, args=(url, halt), daemon=True)
        t.start()
        stop.wait()
        halt.set()
        t.join(timeout=10)
    pool.close()


def seed(url: str, tickers: int, now: datetime) -> None:
    from services.common.db import connect

    bar_ts = now.replace(second=0, microsecond=0) - timedelta(minutes=1)
    rows = [(ticker(i), bar_ts, Decimal("50"), Decimal("50.1"), Decimal("49.9"), Decimal("50"), 1000) for i in range(tickers)]
    with connect(url) as conn, conn.cursor() as cur:
        cur.executemany("INSERT INTO lane_telemetry (ticker, ts, open, high, low, close, volume) VALUES (%s,%s,%s,%s,%s,%s,%s)", rows)
        cur.executemany("INSERT INTO lane_features (ticker, ts, close) VALUES (%s, %s, %s)", [(r[0], r[1], r[5]) for r in rows])


def reset(url: str) -> None:
    from services.common.db import connect

    with connect(url) as conn:
        conn.execute("TRUNCATE active_positions, dispatch_executions, dispatch_recommendations, sim_orders, sim_account, account_state, kill_switch, kill_switch_history")


def insert_recs(url: str, n: int, tickers: int, now: datetime) -> None:
    from services.common.db import connect

    rows = [(ACCOUNT, ticker(i % tickers), "BUY", "STOCK", "day_trade", 0.8, now) for i in range(n)]
    with connect(url) as conn, conn.cursor() as cur:
        cur.executemany("""INSERT INTO dispatch_recommendations (account_id, ticker, action, instrument, strategy, confidence, created_at)
                           VALUES (%s, %s, %s, %s, %s, %s, %s)""", rows)


def pending(url: str) -> int:
    from services.common.db import connect

    with connect(url) as conn:
        return conn.execute("SELECT count(*) AS n FROM dispatch_recommendations WHERE status IN ('PENDING', 'SUBMITTING')").fetchone()["n"]


def start_workers(ctx, url: str, offset_s: float, n: int, mode: str):
    start, stop = ctx.Event(), ctx.Event()
    procs = [ctx.Process(target=worker, args=(url, offset_s, start, stop, mode, i)) for i in range(n)]
    for p in procs:
        p.start()
    time.sleep(3.0)  # let every process import, connect and refresh its account
    return procs, start, stop


def throughput(ctx, url: str, offset_s: float, n_workers: int, recs: int, tickers: int, now: datetime) -> dict:
    from services.common.db import connect

    reset(url)
    insert_recs(url, recs, tickers, now)
    procs, start, stop = start_workers(ctx, url, offset_s, n_workers, "drain")
    t0 = time.perf_counter()
    start.set()
    for p in procs:
        p.join()
    elapsed = time.perf_counter() - t0
    if any(p.exitcode != 0 for p in procs):
        raise SystemExit(f"a dispatcher process failed: exit codes {[p.exitcode for p in procs]}")
    with connect(url) as conn:
        counts = {r["status"]: r["n"] for r in conn.execute(
            "SELECT status, count(*)::int AS n FROM dispatch_recommendations GROUP BY status")}
    return {"workers": n_workers, "seconds": elapsed, "per_second": recs / elapsed, "counts": counts}


def latency(ctx, url: str, offset_s: float, n_workers: int, n: int, now: datetime) -> dict:
    from services.common.db import connect

    reset(url)
    procs, start, stop = start_workers(ctx, url, offset_s, n_workers, "listen")
    start.set()
    time.sleep(1.0)
    committed: dict[int, float] = {}
    with connect(url) as conn:
        for i in range(n):
            with conn.transaction():
                rid = conn.execute(
                    """INSERT INTO dispatch_recommendations (account_id, ticker, action, instrument, strategy, confidence, created_at)
                       VALUES (%s, %s, 'BUY', 'STOCK', 'day_trade', 0.8, %s) RETURNING id""",
                    (ACCOUNT, ticker(i), now),
                ).fetchone()["id"]
                conn.execute("SELECT pg_notify('recommendations', %s)", (ACCOUNT,))
            committed[rid] = time.time()
            time.sleep(0.01)
        deadline = time.time() + 30
        while pending(url) and time.time() < deadline:
            time.sleep(0.1)
        rows = conn.execute(
            """SELECT e.recommendation_id, o.submitted_at FROM dispatch_executions e
               JOIN sim_orders o ON o.account_id = e.account_id AND o.client_order_id = e.client_order_id""").fetchall()
        if not rows:
            raise SystemExit(f"no orders: {conn.execute('SELECT status, outcome_code, outcome_detail FROM dispatch_recommendations LIMIT 3').fetchall()}")
    stop.set()
    for p in procs:
        p.join()
    lat = sorted((r["submitted_at"].timestamp() - offset_s - committed[r["recommendation_id"]]) * 1000 for r in rows)
    return {"workers": n_workers, "orders": len(lat), "p50_ms": statistics.median(lat),
            "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))], "max_ms": lat[-1]}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recs", type=int, default=10_000)
    parser.add_argument("--tickers", type=int, default=2_000)
    parser.add_argument("--latency-recs", type=int, default=400)
    args = parser.parse_args()

    from services.common.db import embedded_server
    from services.common.migrate import migrate

    import psycopg

    server = embedded_server(Path(tempfile.mkdtemp(prefix="ops-bench-")) / "pg", cleanup_mode="delete")
    with psycopg.connect(server.get_uri("postgres"), autocommit=True) as conn:
        conn.execute("CREATE DATABASE bench")
    url = server.get_uri("bench")
    if os.environ.get("BENCH_ASYNC_COMMIT"):
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("ALTER DATABASE bench SET synchronous_commit = off")
    migrate(url)
    offset_s = (SESSION_START - datetime.now(timezone.utc)).total_seconds()
    seed(url, max(args.tickers, args.latency_recs), SESSION_START)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("ANALYZE")  # a production database has statistics; a fresh one has none
    ctx = mp.get_context("spawn")

    # Untimed warm-up: the tables see their first updates, autovacuum analyzes them, plans settle.
    throughput(ctx, url, offset_s, 1, min(args.recs, 2000), args.tickers, SESSION_START)
    print(f"throughput: {args.recs} recommendations over {args.tickers} tickers, simulated broker")
    for n in (1, 2):
        r = throughput(ctx, url, offset_s, n, args.recs, args.tickers, SESSION_START)
        print(f"  {n} process(es): {r['per_second']:,.0f} decisions/s ({r['seconds']:.2f} s)  outcomes {r['counts']}")
    print(f"latency: commit -> order submission, woken by NOTIFY, {args.latency_recs} recommendations 10 ms apart")
    for n in (1, 2):
        r = latency(ctx, url, offset_s, n, args.latency_recs, SESSION_START)
        print(f"  {n} process(es): p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms, max {r['max_ms']:.2f} ms ({r['orders']} orders)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

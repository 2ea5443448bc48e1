"""Dispatcher throughput and wake-up latency with the simulated paper broker.

    python bench/dispatch.py [--recs 10000] [--tickers 2000] [--latency-recs 400] [--no-pgbench] [--log-to-stderr]
                             [--only throughput,pgbench,trips,latency,floor,gaps]

1. Throughput: N pending recommendations over many tickers for one account with up to 50 open
   positions (the first 50 execute; the rest are denied by the position, exposure and cooldown
   gates, as most recommendations are once an account is full), decided by 1 and then 2
   dispatcher processes; decisions per second from the start signal until none is pending.
2. Latency: dispatcher processes wait on LISTEN; the producer commits one recommendation at a
   time (each for a new ticker, so each leads to an order) and NOTIFYs; latency is the order's
   submission time at the broker minus the recommendation's commit time (p50, p99).
3. Round trips per decision, on the skip path and on the order path: each time a dispatcher
   connection blocks on the server's socket is one round trip (psycopg's `Connection.wait`, which
   every statement, BEGIN and COMMIT goes through, counted when it does I/O; a libpq protocol
   trace, counting the Query and Sync messages sent, gives the same figures). Counted for
   recommendations decided alone (an idle queue, a batch of one) and across a drained queue
   (batches). The order path is counted whole and split: up to the order's submission (the
   intent), and the recording of the broker's answer after it. In pipeline mode a Sync and its
   answers are one round trip, whatever number of statements it carries. The simulated broker
   has its own pool, not counted: it stands in for HTTP requests to Alpaca.
4. The floor under the latency: the same wake-up, two round trips and durable commit with nothing
   to decide and one-row statements, in a process of its own.
5. pgbench side by side (`--no-pgbench` to skip): the dispatcher's own claim-and-gather and
   its outcome update, as SQL alone, on the same database and data, 2 clients: the floor the
   database sets under the dispatcher's figure.
6. Latency against the idle time before each wake-up (`gaps`): the latency and the floor, one
   process, with the recommendations 5, 10 and 30 ms apart. A process woken after a longer sleep
   runs its first instructions slower (its code and data out of the CPU's caches, the core come
   out of a deeper idle state), its Postgres backend too: the ratio to the floor says what the
   dispatcher's own work costs, whatever the machine's wake-up.

Each process logs as production does (JSON lines, one per decision) into /dev/null, so the
formatting is paid and the terminal is not; `--log-to-stderr` shows them.

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

from bench.common import database, embedded_postgres, letters  # noqa: E402 (after the path)

SESSION_START = datetime(2026, 11, 30, 15, 0, tzinfo=timezone.utc)  # 10:00 ET
ACCOUNT = "bench"


def ticker(i: int) -> str:
    """The i-th synthetic ticker, letters only as real tickers are (the asset gate refuses digits): TAAAA, TAAAB, ..."""
    return "T" + letters(i, 4)


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


def quiet_logging(to_stderr: bool) -> None:
    """Production's JSON logging, into /dev/null unless asked: without a handler, Python's
    last-resort handler would print every warning (each skip) as a bare "decision" on stderr."""
    from services.common.logs import configure_logging

    configure_logging("INFO", None if to_stderr else open(os.devnull, "w"))


def worker(url: str, offset_s: float, start, stop, mode: str, index: int, log_to_stderr: bool = False,
           known_tickers: int = 0) -> None:
    import threading

    quiet_logging(log_to_stderr)

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
    # A dispatcher that has run a while has its session's asset records cached; the latency run
    # gives each recommendation a new ticker (one position per ticker), all of them known ones.
    for i in range(known_tickers):
        d.assets.lookup(ticker(i), clock.now())
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


LOG_TO_STDERR = False


def start_workers(ctx, url: str, offset_s: float, n: int, mode: str, known_tickers: int = 0):
    start, stop = ctx.Event(), ctx.Event()
    procs = [ctx.Process(target=worker, args=(url, offset_s, start, stop, mode, i, LOG_TO_STDERR, known_tickers))
             for i in range(n)]
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


def latency(ctx, url: str, offset_s: float, n_workers: int, n: int, now: datetime, gap: float = 0.01) -> dict:
    from services.common.db import connect

    reset(url)
    procs, start, stop = start_workers(ctx, url, offset_s, n_workers, "listen", known_tickers=n)
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
            time.sleep(gap)
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


def floor_listener(url: str, ready, results) -> None:
    """The mechanics of the latency path with nothing to decide: woken by NOTIFY, BEGIN + the
    capacity lock + a one-row read in one message, then an insert and its COMMIT in one round trip."""
    import psycopg

    listener = psycopg.connect(url, autocommit=True)
    listener.execute("LISTEN bench_floor")
    conn = psycopg.connect(url, autocommit=True)
    ready.set()
    done = []
    for note in listener.notifies():
        if note.payload == "stop":
            break
        psycopg.ClientCursor(conn).execute("BEGIN; SELECT pg_advisory_xact_lock(1); SELECT 1")
        with conn.pipeline():
            conn.execute("INSERT INTO bench_floor (n) VALUES (%s)", (int(note.payload),))
            conn.execute("COMMIT")
        done.append((int(note.payload), time.time()))
    results.put(done)


def floor(ctx, url: str, n: int, gap: float = 0.01) -> dict:
    """commit -> the end of a durable intent with no work in it: what the machine itself costs."""
    from services.common.db import connect

    with connect(url) as conn:
        conn.execute("DROP TABLE IF EXISTS bench_floor")
        conn.execute("CREATE TABLE bench_floor (id bigserial PRIMARY KEY, n int)")
    ready, results = ctx.Event(), ctx.Queue()
    proc = ctx.Process(target=floor_listener, args=(url, ready, results))
    proc.start()
    ready.wait()
    time.sleep(0.5)
    sent: dict[int, float] = {}
    with connect(url) as conn:
        for i in range(n):
            with conn.transaction():
                conn.execute("SELECT pg_notify('bench_floor', %s)", (str(i),))
            sent[i] = time.time()
            time.sleep(gap)
        conn.execute("SELECT pg_notify('bench_floor', 'stop')")
    done = results.get()
    proc.join()
    with connect(url) as conn:
        conn.execute("DROP TABLE bench_floor")
    lat = sorted((at - sent[i]) * 1000 for i, at in done)
    return {"p50_ms": statistics.median(lat), "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))]}


def round_trips(url: str, offset_s: float, tickers: int, alone: int = 150, drained: int = 2000) -> dict:
    """Round trips per decision: recommendations decided alone (the first 50 become orders, the
    rest are skipped by the position limit), then a queue of `drained` drained in batches."""
    from psycopg.rows import dict_row
    from psycopg_pool import ConnectionPool

    from services.common.clock import OffsetClock
    from services.common.db import connect, make_pool, round_trip_counting
    from services.dispatcher.main import Dispatcher, StaticParams
    from services.adapters.sim.broker import SimBroker

    Counting = round_trip_counting()

    reset(url)
    clock = OffsetClock(timedelta(seconds=offset_s))
    pool = ConnectionPool(url, min_size=2, max_size=2, connection_class=Counting,
                          kwargs={"autocommit": True, "row_factory": dict_row}, open=True)
    broker_pool = make_pool(url, min_size=1, max_size=2, check=False)
    broker = SimBroker(broker_pool, ACCOUNT, clock, starting_cash=Decimal("100000000"))
    d = Dispatcher(pool, broker, StaticParams(bench_params(50)), ACCOUNT, clock=clock, worker_id="bench-trips")
    d.refresh_account(force=True)
    for i in range(tickers):  # the asset cache warm, as in a process that has run a while
        d.assets.lookup(ticker(i), clock.now())
    answer = 0  # round trips recording the broker's answer, within the last decision
    record_broker_answer = d.record_broker_answer

    def counted_answer(*args, **kwargs):
        nonlocal answer
        before = Counting.waits
        try:
            return record_broker_answer(*args, **kwargs)
        finally:
            answer += Counting.waits - before

    d.record_broker_answer = counted_answer
    paths: dict[str, list[int]] = {}
    answers: list[int] = []
    with connect(url) as conn:
        for i in range(alone):
            conn.execute("""INSERT INTO dispatch_recommendations (account_id, ticker, action, instrument, strategy, confidence, created_at)
                            VALUES (%s, %s, 'BUY', 'STOCK', 'day_trade', 0.8, %s)""", (ACCOUNT, ticker(i), SESSION_START))
            before, answer = Counting.waits, 0
            outcome = d.process_next()
            paths.setdefault(outcome.status, []).append(Counting.waits - before - answer)
            if outcome.status == "EXECUTED":
                answers.append(answer)
    insert_recs(url, drained, tickers, SESSION_START)
    before = Counting.waits
    decided = len(d.drain())
    per_drained = (Counting.waits - before) / decided
    pool.close()
    broker_pool.close()
    return {"order": statistics.median(paths.get("EXECUTED", [0])), "order_max": max(paths.get("EXECUTED", [0])),
            "answer": statistics.median(answers or [0]), "answer_max": max(answers or [0]),
            "skip": statistics.median(paths.get("SKIPPED", [0])), "skip_max": max(paths.get("SKIPPED", [0])),
            "drained": per_drained, "batches": decided / max(1, len(d.claims) - alone)}


PGBENCH_CLAIM_AND_SKIP = """
BEGIN;
{claim};
UPDATE dispatch_recommendations r
SET status = 'SKIPPED', decided_at = now(), claimed_by = 'pgbench', claimed_at = now(),
    outcome_code = s.outcome_code, outcome_detail = s.outcome_detail, gate_results = s.gate_results,
    decision = s.decision, params_source = 'bench', params_version = '1', params_hash = 'x', version = r.version + 1
FROM bench_sample s
WHERE r.id IN (SELECT id FROM dispatch_recommendations
               WHERE account_id = '{account}' AND status = 'PENDING'
               ORDER BY created_at, id LIMIT {limit} FOR UPDATE SKIP LOCKED);
END;
"""


def pgbench(url: str, recs: int, tickers: int, limit: int, clients: int = 2) -> dict:
    """The dispatcher's SQL alone under pgbench: per transaction, CLAIM_AND_GATHER of `limit`
    rows and the skip of those rows with a real decision's gate results (one round trip each
    for BEGIN, the claim, the update and COMMIT, as the dispatcher's batch). The rows the claim
    locked are the ones the update's own claim finds: a transaction does not skip its own locks."""
    import re
    import subprocess

    import pgserver
    from psycopg.conninfo import conninfo_to_dict

    from services.adapters.postgres import queries
    from services.common.db import connect
    from services.common.market_calendar import et_date, et_day_bounds

    day_start, day_end = et_day_bounds(et_date(SESSION_START))
    # Times as epoch seconds: a colon in a literal would read as a pgbench variable.
    values = {"account_id": f"'{ACCOUNT}'", "now": f"to_timestamp({SESSION_START.timestamp():.0f})",
              "day_start": f"to_timestamp({day_start.timestamp():.0f})", "day_end": f"to_timestamp({day_end.timestamp():.0f})",
              "limit": str(limit)}
    claim = re.sub(r"%\((\w+)\)s", lambda m: values[m.group(1)], queries.CLAIM_AND_GATHER).strip()
    script = Path(tempfile.mkdtemp(prefix="ops-pgbench-")) / "claim_and_skip.sql"
    script.write_text(PGBENCH_CLAIM_AND_SKIP.format(claim=claim, account=ACCOUNT, limit=limit))
    with connect(url) as conn:
        # The account as the throughput run leaves it (50 positions), a fresh queue, a real decision's JSON.
        conn.execute("DROP TABLE IF EXISTS bench_sample")
        conn.execute("""CREATE TABLE bench_sample AS SELECT outcome_code, outcome_detail, gate_results, decision
                        FROM dispatch_recommendations WHERE status = 'SKIPPED' ORDER BY id DESC LIMIT 1""")
        conn.execute("DELETE FROM dispatch_recommendations WHERE status = 'SKIPPED'")
    insert_recs(url, recs, tickers, SESSION_START)
    with connect(url) as conn:
        conn.execute("VACUUM ANALYZE dispatch_recommendations")
    info = conninfo_to_dict(url)
    exe = Path(pgserver.__file__).parent / "pginstall" / "bin" / "pgbench"
    per_client = int(recs * 0.95) // limit // clients  # stop short of an empty queue
    out = subprocess.run([str(exe), "-n", "-M", "prepared", "-c", str(clients), "-j", str(clients), "-t", str(per_client),
                          "-f", str(script), "-h", info["host"], "-U", info.get("user", "postgres"), info["dbname"]],
                         capture_output=True, text=True, check=True).stdout
    tps = float(re.search(r"tps = ([\d.]+)", out).group(1))
    with connect(url) as conn:
        conn.execute("DROP TABLE bench_sample")
    return {"limit": limit, "tps": tps, "rows_per_second": tps * limit}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recs", type=int, default=10_000)
    parser.add_argument("--tickers", type=int, default=2_000)
    parser.add_argument("--latency-recs", type=int, default=400)
    parser.add_argument("--no-pgbench", action="store_true")
    parser.add_argument("--log-to-stderr", action="store_true")
    parser.add_argument("--only", default="throughput,pgbench,trips,latency,floor,gaps",
                        help="the parts to run, comma-separated")
    args = parser.parse_args()
    parts = set(args.only.split(","))
    global LOG_TO_STDERR
    LOG_TO_STDERR = args.log_to_stderr
    quiet_logging(args.log_to_stderr)

    import psycopg

    server = embedded_postgres()
    url = database(server, asynchronous=bool(os.environ.get("BENCH_ASYNC_COMMIT")))
    offset_s = (SESSION_START - datetime.now(timezone.utc)).total_seconds()
    seed(url, max(args.tickers, args.latency_recs), SESSION_START)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("ANALYZE")  # a production database has statistics; a fresh one has none
    ctx = mp.get_context("spawn")

    # Untimed warm-up: the tables see their first updates, autovacuum analyzes them, plans settle.
    throughput(ctx, url, offset_s, 1, min(args.recs, 2000), args.tickers, SESSION_START)
    print(f"load average {os.getloadavg()[0]:.2f}")
    if "throughput" in parts:
        print(f"throughput: {args.recs} recommendations over {args.tickers} tickers, simulated broker")
        for n in (1, 2):
            r = throughput(ctx, url, offset_s, n, args.recs, args.tickers, SESSION_START)
            print(f"  {n} process(es): {r['per_second']:,.0f} decisions/s ({r['seconds']:.2f} s)  outcomes {r['counts']}")
    if "pgbench" in parts and not args.no_pgbench:
        print(f"pgbench, the same SQL alone ({args.recs} recommendations, 2 clients, BEGIN / claim-and-gather / skip update / COMMIT)")
        for limit in (64, 1):
            r = pgbench(url, args.recs, args.tickers, limit)
            print(f"  claim {limit:>2}: {r['rows_per_second']:,.0f} decisions/s ({r['tps']:,.0f} transactions/s)")
        reset(url)
    if "trips" in parts:
        r = round_trips(url, offset_s, args.tickers)
        print("round trips per decision (waits on the server by the dispatcher's connections)")
        print(f"  alone (idle queue, batch of 1): skip {r['skip']:.0f} (max {r['skip_max']}), "
              f"order {r['order'] + r['answer']:.0f} whole (max {r['order_max'] + r['answer_max']}): "
              f"{r['order']:.0f} up to its submission + {r['answer']:.0f} recording the broker's answer")
        print(f"  drained queue (batches of ~{r['batches']:.0f}): {r['drained']:.2f}")
    if "latency" in parts:
        print(f"latency: commit -> order submission, woken by NOTIFY, {args.latency_recs} recommendations 10 ms apart")
        for n in (1, 2):
            r = latency(ctx, url, offset_s, n, args.latency_recs, SESSION_START)
            print(f"  {n} process(es): p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms, max {r['max_ms']:.2f} ms "
                  f"({r['orders']} orders)")
    if "floor" in parts:
        r = floor(ctx, url, args.latency_recs)
        print(f"  the same path with nothing to decide (wake, lock + one-row read, insert + durable COMMIT): "
              f"p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms")
    if "gaps" in parts:
        print("latency against the idle time before each wake-up, 1 process (the floor beside it)")
        for gap_ms in (5, 10, 30):
            r = latency(ctx, url, offset_s, 1, args.latency_recs, SESSION_START, gap=gap_ms / 1000)
            f = floor(ctx, url, args.latency_recs, gap=gap_ms / 1000)
            print(f"  {gap_ms:>2} ms apart: p50 {r['p50_ms']:.2f} ms, floor {f['p50_ms']:.2f} ms "
                  f"({r['p50_ms'] / f['p50_ms']:.1f}x)")
    print(f"load average {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`ops-pipeline replay`: recorded bars run minute by minute through the production pipeline.

The bars come from the live database's lane_telemetry (`--from D --to D [--tickers ...]`) or from
CSV files (`--csv PATH...`, read by the loader `load-csv` uses). Each NYSE session minute of the
period, in order, on a fixed clock: that minute's bars and their features are written (a
session's features are computed at once before it, by the feature computer's definitions), then
the same code as the services runs: the watchlist engine (every 30 minutes, its option liquidity
from the simulated chain, read ahead by a second process with `workers=2`), the signal engine (in the minutes where the rules' screen leaves a
ticker that could emit), the position manager and the dispatcher with the simulated paper broker
(fills at the quote plus slippage; options from the simulated chain anchored to the replayed
underlying), unless the book is flat with nothing pending or working. Nothing of the pipeline is
re-implemented here: this module only orders the steps, feeds the bars and skips the cycles that
would write nothing (tests hold it to every service run every minute).

A replay writes into a database of its own (`ops_replay_<run id>` on the same server), never into
the live tables, and records its run (id, params source and hash, seed, inputs, counts) in
`replay_runs` there. Given the same bars, params and seed it produces the same decisions and
fills, row for row.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from services.adapters.option_liquidity import OptionLiquiditySource
from services.common.clock import FixedClock
from services.common.logs import json_default
from services.common.market_calendar import ET, SessionCalendar, nyse_calendar
from services.common.params import ParamsInForce
from services.dispatcher.main import start_trade_updates
from services.domain.features import PRICE_SCALE, Features, bar_windows, session_groups, window_features
from services.domain.lifecycle import LIVE_POSITION, TERMINAL_EXECUTION, TERMINAL_RECOMMENDATION
from services.feature_computer.main import write_features
from services.ingest import csv_paths, read_csv_file, write_bar_arrays
from services.signal_engine.main import CycleResult
from services.signal_engine.rules import could_emit
from services.simulation import Pipeline, sim_liquidity_source

log = logging.getLogger("replay")

REPLAY_ACCOUNT = "replay"
WATCHLIST_EVERY_MINUTES = 30
STARTING_CASH = Decimal("100000")
BAR = timedelta(minutes=1)

RECORDED_BARS = """
SELECT ticker, ts, open, high, low, close, volume, extended_hours FROM lane_telemetry
WHERE ts >= %(start)s AND ts < %(end)s AND (%(tickers)s::text[] IS NULL OR ticker = ANY(%(tickers)s))
ORDER BY ts, ticker
"""
# Anything for the book's services to do: a live position, an order working (ours or resting at
# the simulated broker), a recommendation not yet decided.
BOOK_BUSY = """
SELECT EXISTS (SELECT 1 FROM active_positions WHERE account_id = %(account_id)s AND status = ANY(%(live)s)) AS positions,
       EXISTS (SELECT 1 FROM dispatch_executions WHERE account_id = %(account_id)s AND status <> ALL(%(terminal)s))
    OR EXISTS (SELECT 1 FROM sim_orders WHERE account_id = %(account_id)s AND status IN ('new', 'accepted')) AS working,
       EXISTS (SELECT 1 FROM dispatch_recommendations WHERE account_id = %(account_id)s AND status <> ALL(%(decided)s))
           AS pending
"""
# The signal engine's universe, when the watchlist has selected any ticker.
SELECTED = "SELECT ticker FROM watchlist_state WHERE account_id = %(account_id)s AND selected"
RECORD_RUN = """
INSERT INTO replay_runs (run_id, started_at, params_source, params_version, params_hash, seed, inputs)
VALUES (%(run_id)s, %(started_at)s, %(params_source)s, %(params_version)s, %(params_hash)s, %(seed)s, %(inputs)s)
"""
FINISH_RUN = """
UPDATE replay_runs SET finished_at = %(finished_at)s, counts = %(counts)s WHERE run_id = %(run_id)s
"""


@dataclass
class ReplayResult:
    run_id: str
    url: str
    params_hash: str
    inputs: dict[str, Any]
    sessions: list[date] = field(default_factory=list)
    bars: int = 0
    counts: Counter = field(default_factory=Counter)
    seconds: float = 0.0

    @property
    def bars_per_second(self) -> float:
        return self.bars / self.seconds if self.seconds else 0.0


# Bars per window_features call when a session is planned: a chunk's windows (3 x 1,024 x 51
# int64) stay in the CPU's cache, which measured ~25% faster than one call per session.
PLAN_CHUNK = 1024


@dataclass
class SessionPlan:
    """What a replay works out for a session before stepping it, from the session's bars alone.

    features: every bar's features, by the shared definitions over the windows the live cycle
    holds (one ticker's bars of the session day), computed for the whole session at once as a
    backfill does; they are written minute by minute as the bars are, so nothing reads ahead.
    signal_due: the minutes (epoch seconds of `now`) in which the signal engine could emit, and
    for which tickers (with the bar whose features it would judge): a bar that passes the rules'
    screen (rules.could_emit) stays the ticker's latest features from its end until the
    ticker's next bar ends, or until it is too old (risk.max_feature_age_seconds). In every
    other minute the engine would write nothing.
    """

    tickers: list[str]
    features: Features
    rows_at: dict[int, np.ndarray]
    signal_due: dict[int, dict[str, int]]

    def features_at(self, bar_start: datetime) -> tuple[list[str], Features] | None:
        """The features of the bars that began at `bar_start`, with their tickers."""
        idx = self.rows_at.get(int(bar_start.timestamp()))
        if idx is None:
            return None
        return [self.tickers[i] for i in idx], self.features.take(idx)


@dataclass(frozen=True)
class SessionBars:
    """One session's bars as arrays, sorted by (ticker, ts): prices in PRICE_SCALE units, ts in
    epoch seconds, `key` a number per ticker."""

    tickers: list[str]
    key: np.ndarray
    ts: np.ndarray
    close: np.ndarray
    volume: np.ndarray


def session_bars(rows: Sequence[tuple]) -> SessionBars:
    """The arrays of one session's rows (ticker, ts, open, high, low, close, volume, ...), the
    closes converted as the feature computer's query converts them (round half away from zero)."""
    rows = sorted(rows, key=lambda r: (r[0], r[1]))
    tickers = [r[0] for r in rows]
    number = {t: i for i, t in enumerate(sorted(set(tickers)))}
    return SessionBars(
        tickers, np.array([number[t] for t in tickers], np.int64),
        np.array([int(r[1].timestamp()) for r in rows], np.int64),
        np.array([int((Decimal(r[5]) * PRICE_SCALE).to_integral_value(ROUND_HALF_UP)) for r in rows], np.int64),
        np.array([int(r[6]) for r in rows], np.int64))


def plan_session(bars: SessionBars | Sequence[tuple], in_force: ParamsInForce) -> SessionPlan:
    """The plan of one session from its bars."""
    b = bars if isinstance(bars, SessionBars) else session_bars(bars)
    n = len(b.ts)
    group = session_groups(b.key, np.zeros(n, np.int64))  # one session: one ET day
    parts = [window_features(bar_windows(b.ts, b.close, b.volume, group, np.arange(lo, min(lo + PLAN_CHUNK, n))))
             for lo in range(0, n, PLAN_CHUNK)]
    features = parts[0] if len(parts) == 1 else Features(
        **{name: np.concatenate([getattr(f, name) for f in parts]) for name in Features.__dataclass_fields__})
    order = np.argsort(b.ts, kind="stable")
    starts, cuts = np.unique(b.ts[order], return_index=True)
    rows_at = dict(zip(starts.tolist(), np.split(order, cuts[1:])))

    max_age = in_force.params.risk.max_feature_age_seconds
    bar = int(BAR.total_seconds())
    last_of_ticker = np.r_[b.key[1:] != b.key[:-1], True]
    signal_due: dict[int, dict[str, int]] = {}
    for i in np.flatnonzero(could_emit(features, in_force.params)).tolist():
        first = int(b.ts[i]) + bar
        until = first + max_age if last_of_ticker[i] else min(first + max_age, int(b.ts[i + 1]) + bar - 1)
        for now in range(first, until + 1, bar):
            signal_due.setdefault(now, {})[b.tickers[i]] = i
    return SessionPlan(b.tickers, features, rows_at, signal_due)


def bars_digest(rows: Sequence[tuple]) -> str:
    """The inputs' fingerprint: the same bars give the same digest, whatever file or table held them."""
    h = hashlib.sha256()
    for row in rows:
        h.update(("|".join(str(v) for v in row[:7]) + "\n").encode())
    return h.hexdigest()


def bars_from_csv(paths: Sequence[str | Path], tz: str = "America/New_York") -> tuple[list[tuple], list[str]]:
    """Rows (ticker, ts, open, high, low, close, volume, extended_hours) of CSV files or folders."""
    rows: list[tuple] = []
    names: list[str] = []
    for path in csv_paths(paths):
        read = read_csv_file(path, tz=tz)
        if read.bad:
            raise SystemExit(f"{path}: {len(read.bad)} malformed rows, first: {read.bad[0]}")
        rows.extend(read.rows)
        names.append(str(path))
    rows.sort(key=lambda r: (r[1], r[0]))
    return rows, names


def bars_from_database(url: str, start: date, end: date, tickers: Sequence[str] | None,
                       calendar: SessionCalendar) -> list[tuple]:
    """The recorded bars of the sessions from `start` to `end` (ET days, both included)."""
    from services.common.db import connect

    sessions = calendar.sessions_between(start, end)
    if not sessions:
        return []
    with connect(url) as conn:
        found = conn.execute(RECORDED_BARS, {"start": sessions[0].open, "end": sessions[-1].close,
                                             "tickers": list(tickers) if tickers else None}).fetchall()
    return [(r["ticker"], r["ts"], r["open"], r["high"], r["low"], r["close"], r["volume"], r["extended_hours"])
            for r in found]


def replay_database(run_id: str) -> str:
    """A fresh database for the run on the server of the live one (DATABASE_URL or the embedded one)."""
    import psycopg
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    from services.common.db import database_url

    live = database_url()
    name = f"ops_replay_{run_id}"
    admin = make_conninfo(live, dbname="postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
        # A replay needs no durability: its commits skip the WAL flush.
        conn.execute(f"ALTER DATABASE {name} SET synchronous_commit = off")
    assert conninfo_to_dict(live).get("dbname") != name
    return make_conninfo(live, dbname=name)


class Progress:
    """One line on a terminal, rewritten: the session, how far, and bars per second."""

    def __init__(self, total_minutes: int, out: TextIO | None):
        self.total = max(total_minutes, 1)
        self.out = out
        self.done = 0
        self.started = time.perf_counter()
        self._last = 0.0

    def step(self, day: date, bars: int) -> None:
        self.done += 1
        now = time.perf_counter()
        if self.out is None or (now - self._last < 0.2 and self.done < self.total):
            return
        self._last = now
        width = 30
        filled = int(width * self.done / self.total)
        rate = bars / (now - self.started) if now > self.started else 0.0
        self.out.write(f"\r{day} [{'#' * filled}{'.' * (width - filled)}] {100 * self.done / self.total:5.1f}% "
                       f"{bars:,} bars {rate:,.0f} bars/s")
        if self.done >= self.total:
            self.out.write("\n")
        self.out.flush()


def run_replay(
    rows: Sequence[tuple],
    in_force: ParamsInForce,
    *,
    inputs: dict[str, Any],
    seed: int = 7,
    url: str | None = None,
    run_id: str | None = None,
    progress: TextIO | None = None,
    calendar: SessionCalendar | None = None,
    workers: int = 1,
) -> ReplayResult:
    """Replay `rows` (sorted by time) through the pipeline, into `url` or a new replay database.

    workers=2: a second process reads the watchlist's option liquidity ahead (`LiquidityAhead`);
    the run is the same, row for row."""
    from services.common.db import connect, make_pool
    from services.common.migrate import migrate

    started = time.perf_counter()
    calendar = calendar or nyse_calendar()
    run_id = run_id or uuid.uuid4().hex[:12]
    url = url or replay_database(run_id)
    migrate(url)
    session_rows = [r for r in rows if not r[7]]
    by_minute: dict[datetime, list[tuple]] = {}
    for r in session_rows:
        by_minute.setdefault(r[1], []).append(r)
    days = sorted({s for s in (calendar.session_at(ts) for ts in by_minute) if s is not None}, key=lambda s: s.day)
    inputs = {**inputs, "bars": len(session_rows), "digest": bars_digest(session_rows),
              "tickers": sorted({r[0] for r in session_rows}), "sessions": [s.day.isoformat() for s in days]}
    result = ReplayResult(run_id, url, in_force.content_hash, inputs, [s.day for s in days])
    if not days:
        raise SystemExit("no bars inside a NYSE session to replay")
    clock = FixedClock(days[0].open)
    ahead = LiquidityAhead.start(days, by_minute, seed) if workers > 1 else None
    pool = None
    try:
        pool = make_pool(url, min_size=1, max_size=2, application_name="ops-dispatcher:replay", check=False)
        minutes_total = sum(int((s.close - s.open) / BAR) for s in days)
        bar = Progress(minutes_total, progress)
        with connect(url) as conn:
            pipeline = Pipeline.simulated(conn, pool, REPLAY_ACCOUNT, in_force, calendar, clock, seed=seed,
                                          broker_options={"starting_cash": STARTING_CASH}, worker_id="replay",
                                          watchlist_every_minutes=WATCHLIST_EVERY_MINUTES)
            dispatcher = pipeline.dispatcher
            if ahead is not None:
                pipeline.liquidity = sim_liquidity_source(pipeline.options, _ReadAhead)
            conn.execute(RECORD_RUN, {"run_id": run_id, "started_at": days[0].open, "params_source": in_force.source,
                                      "params_version": in_force.version, "params_hash": in_force.content_hash,
                                      "seed": seed, "inputs": json.dumps(inputs, default=json_default)})
            stop_updates = start_trade_updates(dispatcher, pipeline.broker)
            try:
                engine = _SignalMinutes(timedelta(minutes=in_force.params.signal.signal_cooldown_minutes))
                busy_params = {"account_id": REPLAY_ACCOUNT, "live": sorted(LIVE_POSITION),
                               "terminal": sorted(TERMINAL_EXECUTION), "decided": sorted(TERMINAL_RECOMMENDATION)}
                for session in days:
                    clock.set(session.open)
                    dispatcher.refresh_account(force=True)  # the broker rolls its day at the first look
                    plan = plan_session([r for ts in _minutes(session) for r in by_minute.get(ts, ())], in_force)
                    minute = 0
                    for ts in _minutes(session):
                        now = ts + BAR
                        clock.set(now)
                        fresh = by_minute.get(ts, [])
                        if fresh:  # the minute's bars and their features, in one round trip
                            with conn.pipeline():
                                write_bar_arrays(conn, fresh)
                                write_features(conn, *plan.features_at(ts))
                            result.bars += len(fresh)
                        watchlist = minute % WATCHLIST_EVERY_MINUTES == 0
                        if watchlist and ahead is not None:
                            pipeline.liquidity.ready = ahead.readings(now)
                        due = engine.due(plan, now, watchlist)
                        engine.ran(pipeline.signals_phase(minute, now, features=False, signals=due), now)
                        if watchlist:
                            engine.universe_from(conn)
                        result.counts["signal_cycles" if due else "signal_cycles_skipped"] += 1
                        # A flat book with nothing pending or working leaves the position manager,
                        # the broker and the dispatcher nothing to do: the minute ends here. (The
                        # account, all cash, is refreshed when work next comes, before it is decided.)
                        # Without working orders there is nothing to match or re-price, and without
                        # positions nothing to mark or judge.
                        busy = conn.execute(BOOK_BUSY, busy_params).fetchone()
                        if not any(busy.values()):
                            result.counts["idle_minutes"] += 1
                        else:
                            pipeline.book(now, working=busy["working"], positions=busy["positions"])
                            for outcome in pipeline.orders():
                                result.counts[f"decision:{outcome.status}"] += 1
                        bar.step(session.day, result.bars)
                        minute += 1
                    clock.set(session.close)
                    dispatcher.refresh_account(force=True)
            finally:
                stop_updates()
            result.counts.update(pipeline.signals)
            if ahead is not None:  # the readings the second process made that the watchlist used
                result.counts["liquidity_read_ahead"] = pipeline.liquidity.used
            result.seconds = time.perf_counter() - started
            conn.execute(FINISH_RUN, {"run_id": run_id, "finished_at": clock.now(),
                                      "counts": json.dumps(dict(result.counts), default=json_default)})
    finally:
        if ahead is not None:
            ahead.close()
        if pool is not None:
            pool.close()
    return result


class _ReadAhead(OptionLiquiditySource):
    """The watchlist's liquidity source, answering from the readings a second process made for
    this session (`ready`) when it is asked for the same ticker, spot and minute; anything else
    it reads itself."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.ready: dict[tuple[str, datetime], tuple[Any, Any]] = {}
        self.used = 0

    def read(self, ticker: str, spot: Any, now: datetime):
        made = self.ready.pop((ticker, now), None)
        if made is not None and made[0] == spot:
            self.fetches += 1
            self.used += 1
            return made[1]
        return super().read(ticker, spot, now)


class LiquidityAhead:
    """The watchlist's option liquidity readings of every watchlist minute, made by a second
    process ahead of the replay: the simulated market's near-expiry chains are the replay's largest
    computation, and each reading needs only its ticker's spot at its minute, which the bars
    give (the close of the ticker's latest bar at or before the minute's cutoff, as the
    watchlist's gather reads it). The same source (`sim_liquidity_source`) makes them; the
    replay uses a reading only when asked for that ticker, spot and minute, and reads anything
    else itself, so the run is the same with or without it."""

    def __init__(self, pool, futures: dict[datetime, Any]):
        self.pool = pool
        self.futures = futures

    @classmethod
    def start(cls, days: Sequence, by_minute: dict[datetime, list[tuple]], seed: int) -> LiquidityAhead:
        """One task per watchlist minute, in order: the replay waits at most for its own minute's."""
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # Forked before the replay opens its pool and starts its threads (the executor starts its
        # process at once under fork), so the child holds no lock and needs no imports; it
        # touches no connection it inherits.
        pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork"))
        asks = [(now, minute_asks) for s in days for now, minute_asks in _liquidity_asks(s, by_minute)]
        return cls(pool, {now: pool.submit(_read_liquidity, seed, minute_asks) for now, minute_asks in asks})

    def readings(self, now: datetime) -> dict[tuple[str, datetime], tuple[Any, Any]]:
        """The readings made for the watchlist minute that ends at `now` (none when there are none)."""
        future = self.futures.pop(now, None)
        if future is None:
            return {}
        try:
            return future.result()
        except Exception as e:  # the second process failed: the replay reads them itself
            log.warning("liquidity read ahead failed; reading inline", extra={"error": f"{type(e).__name__}: {e}"})
            return {}

    def close(self) -> None:
        """The readings not yet begun are dropped; the one under way ends (a minute's: ~50 ms)."""
        self.pool.shutdown(wait=True, cancel_futures=True)


def _liquidity_asks(session, by_minute: dict[datetime, list[tuple]]) -> list[tuple[datetime, list[tuple]]]:
    """At each watchlist minute of the session (`now`): (ticker, spot, now) of every ticker with a
    bar in the session so far."""
    asks = []
    latest: dict[str, Any] = {}
    for minute, ts in enumerate(_minutes(session)):
        for r in by_minute.get(ts, ()):
            latest[r[0]] = r[5]
        if minute % WATCHLIST_EVERY_MINUTES == 0 and latest:
            asks.append((ts + BAR, [(ticker, close, ts + BAR) for ticker, close in sorted(latest.items())]))
    return asks


def _read_liquidity(seed: int, asks: list[tuple[str, Any, datetime]]) -> dict[tuple[str, datetime], tuple[Any, Any]]:
    """In the second process: each ask's reading, by the replay's own source (the market as
    `Pipeline.simulated` makes it for a replay: its seed, the default liquidity)."""
    from services.adapters.sim.market import SimOptionMarket

    source = sim_liquidity_source(SimOptionMarket(None, seed=seed))
    return {(ticker, now): (spot, source.read(ticker, spot, now)) for ticker, spot, now in asks}


class _SignalMinutes:
    """Whether the signal engine could write anything this minute: a ticker the session's plan
    screened in, out of its cooldown (the engine's own check, on the times of its own
    recommendations) and in its universe (the watchlist's selection, or every ticker when nothing
    is selected; a watchlist minute may change it, so the engine runs then)."""

    def __init__(self, cooldown: timedelta):
        self.cooldown = cooldown
        self.last_emitted: dict[str, datetime] = {}
        self.universe: set[str] | None = None

    def due(self, plan: SessionPlan, now: datetime, watchlist_minute: bool) -> bool:
        for ticker in plan.signal_due.get(int(now.timestamp()), ()):
            last = self.last_emitted.get(ticker)
            if self.cooldown and last is not None and now - last < self.cooldown:
                continue
            if self.universe is None or ticker in self.universe or watchlist_minute:
                return True
        return False

    def ran(self, result: CycleResult | None, now: datetime) -> None:
        for o in result.outcomes if result is not None else ():
            if o.outcome == "emitted":
                self.last_emitted[o.ticker] = now

    def universe_from(self, conn) -> None:
        self.universe = {r["ticker"] for r in conn.execute(SELECTED, {"account_id": REPLAY_ACCOUNT})} or None


def _minutes(session) -> list[datetime]:
    """The start of every minute of the session."""
    return [session.open + BAR * i for i in range(int((session.close - session.open) / BAR))]


def _print_summary(result: ReplayResult, url: str, out: TextIO | None = None) -> None:
    from services.adapters.postgres.status import status_report
    from services.common.db import connect

    w = (out or sys.stdout).write
    w(f"replay {result.run_id}: {len(result.sessions)} session(s) "
      f"{result.sessions[0]} .. {result.sessions[-1]}, {result.bars:,} bars, params {result.params_hash[:12]}\n")
    w(f"  {result.seconds:.1f} s, {result.bars_per_second:,.0f} bars/s through the whole pipeline\n")
    with connect(url) as conn:
        closed = conn.execute(
            "SELECT count(*)::int AS n, coalesce(sum(realized_pnl), 0) AS pnl, coalesce(sum(fees), 0) AS fees "
            "FROM active_positions WHERE account_id = %s AND status = 'CLOSED'", (REPLAY_ACCOUNT,)).fetchone()
        finished = conn.execute("SELECT finished_at FROM replay_runs WHERE run_id = %s",
                                (result.run_id,)).fetchone()["finished_at"]
        report = status_report(conn, REPLAY_ACCOUNT, finished)
        decisions = {r["status"]: r["n"] for r in conn.execute(
            "SELECT status, count(*)::int AS n FROM dispatch_recommendations WHERE account_id = %s GROUP BY 1 ORDER BY 1",
            (REPLAY_ACCOUNT,))}
    w(f"  signals emitted {result.counts.get('emitted', 0)}, decisions "
      + (", ".join(f"{k} {v}" for k, v in sorted(decisions.items())) or "none") + "\n")
    w(f"  closed positions {closed['n']}, realized P&L {closed['pnl']:+,.2f} (net of {closed['fees']:,.2f} fees); "
      f"open at the end {len(report['positions'])}\n")
    w(f"  database: {url}\n")
    w(f"  report:   DATABASE_URL='{url}' ops-pipeline report --account {REPLAY_ACCOUNT} "
      f"--from {result.sessions[0]} --to {result.sessions[-1]}\n")


# --- runs, and two runs side by side ------------------------------------------------------------


def run_url(run_id: str) -> str:
    """The database of replay `run_id` on the server of the live one."""
    from psycopg.conninfo import make_conninfo

    from services.common.db import database_url

    if not run_id.isalnum():
        raise SystemExit(f"not a replay run id: {run_id!r}")
    return make_conninfo(database_url(), dbname=f"ops_replay_{run_id}")


def find_run(run_id: str) -> tuple[str, dict[str, Any]]:
    """(url, its replay_runs row) of a run id, or of the latest finished run for "latest"."""
    import psycopg
    from psycopg.conninfo import make_conninfo

    from services.common.db import connect, database_url

    if run_id != "latest":
        url = run_url(run_id)
        try:
            with connect(url) as conn:
                row = conn.execute("SELECT * FROM replay_runs WHERE run_id = %s", (run_id,)).fetchone()
        except psycopg.OperationalError as e:
            raise SystemExit(f"no replay run {run_id}: {e}") from e
        if row is None:
            raise SystemExit(f"no replay run {run_id} in its database")
        return url, row
    with psycopg.connect(make_conninfo(database_url(), dbname="postgres"), autocommit=True) as admin:
        names = [r[0] for r in admin.execute("SELECT datname FROM pg_database WHERE datname LIKE 'ops_replay_%'")]
    found: list[tuple[datetime, str, dict[str, Any]]] = []
    for name in names:
        url = make_conninfo(database_url(), dbname=name)
        with connect(url) as conn:
            for row in conn.execute("SELECT * FROM replay_runs WHERE finished_at IS NOT NULL"):
                found.append((row["finished_at"], url, row))
    if not found:
        raise SystemExit("no finished replay run on this server")
    _, url, row = max(found, key=lambda f: f[0])
    return url, row


def run_report(url: str, run: ReplayResult | dict[str, Any]):
    """The report (services/domain/report.py) of a replay run, over its sessions."""
    from services.adapters.postgres.report_data import gather_report_inputs
    from services.common.db import connect
    from services.common.market_calendar import et_day_bounds
    from services.domain.report import build_report

    sessions = run.sessions if isinstance(run, ReplayResult) else [date.fromisoformat(d) for d in run["inputs"]["sessions"]]
    run_id = run.run_id if isinstance(run, ReplayResult) else run["run_id"]
    with connect(url) as conn:
        inputs = gather_report_inputs(conn, REPLAY_ACCOUNT, sessions[0], sessions[-1], source=f"replay {run_id}")
    return build_report(inputs, period_end=et_day_bounds(sessions[-1])[1])


COMPARED_DECISIONS = """
SELECT ticker, action, instrument, created_at, status, outcome_code, exit_reason
FROM dispatch_recommendations WHERE account_id = %(account_id)s ORDER BY created_at, id
"""


def flipped_decisions(a: Sequence[dict[str, Any]], b: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The decisions of run A and run B matched by (ticker, action, instrument, time), and what differs.

    A decision flips when its status or its code changes ("EXECUTED -> SKIPPED by MAX_POSITIONS");
    a recommendation only one run wrote (its signal or exit depends on what happened before) is
    counted apart.
    """
    def key(r: dict[str, Any]) -> tuple:
        return (r["ticker"], r["action"], r["instrument"], r["created_at"])

    left = {key(r): r for r in a}
    right = {key(r): r for r in b}
    flips: Counter = Counter()
    examples: dict[str, list[str]] = {}
    for k in sorted(left.keys() & right.keys(), key=lambda k: (k[3], k[0])):
        x, y = left[k], right[k]
        if (x["status"], x["outcome_code"]) == (y["status"], y["outcome_code"]):
            continue
        what = f"{x['status']} {x['outcome_code']} -> {y['status']} {y['outcome_code']}"
        flips[what] += 1
        examples.setdefault(what, []).append(f"{k[3].astimezone(ET):%Y-%m-%d %H:%M} ET {k[0]} {k[1]}")
    return {"matched": len(left.keys() & right.keys()), "only_a": len(left.keys() - right.keys()),
            "only_b": len(right.keys() - left.keys()), "flips": dict(flips.most_common()),
            "examples": {k: v[:3] for k, v in examples.items()}}


def print_comparison(a: tuple[str, ReplayResult], b: tuple[str, ReplayResult], out: TextIO | None = None) -> dict:
    """Two runs side by side: trades, P&L, drawdown, win rate; then the decisions that flipped."""
    from services.common.db import connect

    w = (out or sys.stdout).write
    (name_a, run_a), (name_b, run_b) = a, b
    ta, tb = run_report(run_a.url, run_a).totals, run_report(run_b.url, run_b).totals
    rows = [("trades", "trades"), ("wins", "wins"), ("realized P&L", "realized_pnl"), ("fees", "fees"),
            ("max drawdown", "max_drawdown"), ("win rate", "win_rate"), ("profit factor", "profit_factor")]
    width = max(len(name_a), len(name_b), 14)
    w(f"\n{'':<16} {name_a:>{width}} {name_b:>{width}}\n")
    for label, k in rows:
        w(f"{label:<16} {_fmt(ta.get(k)):>{width}} {_fmt(tb.get(k)):>{width}}\n")
    decisions = []
    for run in (run_a, run_b):
        with connect(run.url) as conn:
            decisions.append(conn.execute(COMPARED_DECISIONS, {"account_id": REPLAY_ACCOUNT}).fetchall())
    flips = flipped_decisions(*decisions)
    w(f"\ndecisions matched {flips['matched']}, only in {name_a} {flips['only_a']}, only in {name_b} {flips['only_b']}\n")
    if not flips["flips"]:
        w("no decision flipped\n")
    for what, n in flips["flips"].items():
        w(f"  {n:>5}  {what}   e.g. {'; '.join(flips['examples'][what])}\n")
    return {"a": ta, "b": tb, "decisions": flips}


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, Decimal):
        return f"{value:,.2f}" if abs(value) >= 1 or value == 0 else f"{value:.3f}"
    return str(value)


def cmd_replay(args: argparse.Namespace) -> int:
    from services.common.db import database_url
    from services.common.params import load_params_file

    # Quiet unless asked: a replay decides thousands of recommendations; the summary says what happened.
    logging.getLogger().setLevel(logging.ERROR if not args.verbose else logging.INFO)
    in_force = load_params_file(args.params) if args.params else load_params_file()
    calendar = nyse_calendar()
    if args.csv:
        rows, names = bars_from_csv(args.csv, tz=args.tz)
        if args.tickers:
            wanted = {t.strip().upper() for t in args.tickers.split(",")}
            rows = [r for r in rows if r[0] in wanted]
        inputs = {"source": "csv", "files": names}
    else:
        if not (args.date_from and args.date_to):
            raise SystemExit("replay needs --from and --to (recorded bars), or --csv")
        start, end = date.fromisoformat(args.date_from), date.fromisoformat(args.date_to)
        tickers = [t.strip().upper() for t in args.tickers.split(",")] if args.tickers else None
        rows = bars_from_database(database_url(), start, end, tickers, calendar)
        inputs = {"source": "lane_telemetry", "from": start.isoformat(), "to": end.isoformat(), "tickers": tickers}
    if args.date_from and args.csv:
        start = date.fromisoformat(args.date_from)
        end = date.fromisoformat(args.date_to) if args.date_to else start
        rows = [r for r in rows if start <= calendar.current_or_previous_session(r[1]).day <= end]
    if not rows:
        print("no bars to replay", file=sys.stderr)
        return 1
    progress = sys.stderr if sys.stderr.isatty() or args.progress else None
    result = run_replay(rows, in_force, inputs=inputs, seed=args.seed, progress=progress, calendar=calendar,
                        workers=args.workers)
    _print_summary(result, result.url)
    if args.compare:
        other = load_params_file(args.compare)
        compared = run_replay(rows, other, inputs=inputs, seed=args.seed, progress=progress, calendar=calendar,
                              workers=args.workers)
        _print_summary(compared, compared.url)
        print_comparison((Path(args.params).name if args.params else "params file", result),
                         (Path(args.compare).name, compared))
    return 0


"""`ops-pipeline demo`: one simulated trading session on the embedded Postgres.

The whole pipeline runs minute by minute: a seeded synthetic market writes 1-minute bars (and
the news classifier's sentiment), the feature computer turns them into features, the watchlist
engine scores the tickers, the signal engine writes recommendations, and the dispatcher decides
each one through every gate and trades stock and options on the simulated paper broker, with
the repo's params file. A desk stream of recommendations (exits, and a few malformed ones)
runs beside the signals.
The scenario is built so that every account kill switch blocks at least once: orders before
09:35 and after 15:45, positions and exposure at their limits, and a sell-off that trips the
daily-loss switch, which then stays tripped while the market recovers.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any, TextIO

from services.common.clock import FixedClock
from services.common.market_calendar import ET, nyse_calendar
from services.common.params import ParamsInForce, load_params_file
from services.adapters.postgres import kill_switch
from services.dispatcher.main import Dispatcher, Outcome, StaticParams, start_trade_updates
from services.adapters.sim.broker import SimBroker
from services.adapters.option_data import OptionData
from services.feature_computer.main import FeatureCycle, compute_features
from services.signal_engine.main import run_signal_cycle
from services.adapters.sim.market import Move, SimMarket, SimOptionMarket, TickerSpec, write_bars
from services.watchlist_engine.main import run_watchlist_cycle

log = logging.getLogger("demo")

DEMO_ACCOUNT = "demo"
DEMO_DAY = date(2026, 11, 25)

TICKERS = [
    TickerSpec("AAPL", 231.0, 0.0008, 40_000, 1.0),
    TickerSpec("AMD", 152.0, 0.0012, 30_000, 0.8),
    TickerSpec("BKNG", 5150.0, 0.0006, 2_000, 0.3),
    TickerSpec("F", 11.2, 0.0010, 60_000, 0.05),
    TickerSpec("META", 590.0, 0.0009, 15_000, 0.9),
    TickerSpec("MSFT", 421.0, 0.0007, 25_000, 1.0),
    TickerSpec("NVDA", 181.0, 0.0013, 80_000, 1.2),
    TickerSpec("SPY", 601.0, 0.0005, 90_000, 1.5),
    TickerSpec("TSLA", 342.0, 0.0016, 50_000, 0.6),
]
ALL = tuple(t.ticker for t in TICKERS)

# Minutes after the open. Trends the signal rules can find from 10:20 ET (the features need 50
# bars of the session); the sell-off runs 12:50-13:30 ET, the recovery 13:50-15:00 ET.
MOVES = [
    Move(("AAPL", "NVDA"), 52, 80, 0.010, volume_factor=3.0),
    Move(("AMD", "TSLA"), 85, 115, 0.012, volume_factor=3.0),
    Move(("F",), 120, 140, 0.015, volume_factor=3.0),
    Move(("META", "MSFT"), 150, 180, 0.009, volume_factor=3.0),
    Move(ALL, 200, 240, -0.085, volume_factor=3.0),
    Move(ALL, 260, 330, 0.075, volume_factor=2.0),
]
# News the classifier scored: (minute, ticker, signed score, confidence).
SENTIMENT = [
    (45, "AAPL", 0.8, 0.9), (45, "NVDA", 0.6, 0.8), (80, "AMD", 0.7, 0.85), (80, "TSLA", -0.7, 0.8),
    (115, "F", 0.5, 0.7), (145, "META", 0.6, 0.8), (145, "MSFT", -0.4, 0.6),
]
# Spread quality and an option open-interest proxy for the watchlist's liquidity term.
LIQUIDITY = {t.ticker: {"spread_quality": t.option_liquidity, "oi_proxy": t.option_liquidity * t.avg_volume}
             for t in TICKERS}
# IV history (the last 30 sessions' ATM IV): TSLA's options are dear against their own
# history, so its IV percentile gate blocks and stock stands in.
IV_HISTORY = {t.ticker: (0.15, 0.22) if t.ticker == "TSLA" else (0.22, 0.38) for t in TICKERS}


@dataclass(frozen=True)
class DeskRec:
    minute: int
    ticker: str
    action: str
    instrument: str = "STOCK"
    strategy: str = "day_trade"
    confidence: float = 0.75
    note: str = ""


# The desk's stream: entries through the day, exits, and a few malformed recommendations.
DESK = [
    DeskRec(1, "SPY", "BUY", note="before 09:35: opening block"),
    DeskRec(10, "SPY", "BUY", "OPTION", "swing_trade", 0.7, note="one contract costs more than the budget"),
    DeskRec(12, "MSFT", "BUY", note="desk: stock"),
    DeskRec(14, "MSFT", "BUY", note="ticker already held, in cooldown"),
    DeskRec(16, "TSLA", "BUY", "OPTION", note="IV dear against its history"),
    DeskRec(18, "F", "BUY", "OPTION", note="thin option market"),
    DeskRec(20, "META", "BUY", "OPTION", note="desk: call"),
    DeskRec(22, "AMD", "SELL", note="bearish stock entry: a short sale"),
    DeskRec(24, "XYZ", "BUY", note="no market data"),
    DeskRec(26, "AAPL", "HOLD", note="unknown action"),
    DeskRec(28, "AAPL", "BUY", confidence=0.4, note="low confidence"),
    DeskRec(30, "b00", "BUY", note="malformed ticker: no such asset"),
    DeskRec(110, "MSFT", "EXIT", note="desk: take profit"),
    DeskRec(112, "BKNG", "BUY", note="one share would breach the exposure limit"),
    DeskRec(245, "MSFT", "BUY", note="after the daily-loss trip"),
    DeskRec(250, "META", "EXIT", note="risk-reducing: allowed while REDUCING"),
    DeskRec(340, "AAPL", "BUY", note="P&L recovered; the switch stays tripped"),
    DeskRec(378, "MSFT", "BUY", note="after 15:45"),
    DeskRec(386, "SPY", "EXIT", note="after the operator's halt"),
]
HALT_MINUTE = 384


@dataclass
class DemoResult:
    rows: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


def _demo_database() -> str:
    """A fresh demo database: on the embedded server by default, or DATABASE_URL's server."""
    import psycopg

    from services.common.db import embedded_server

    url = os.environ.get("DATABASE_URL")
    if url:
        return url
    server = embedded_server()
    with psycopg.connect(server.get_uri("postgres"), autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS ops_demo WITH (FORCE)")
        conn.execute("CREATE DATABASE ops_demo")
        # A replay needs no durability; commits that skip the WAL flush make the demo several times faster.
        conn.execute("ALTER DATABASE ops_demo SET synchronous_commit = off")
    return server.get_uri("ops_demo")


def _reset_account(conn, account: str) -> None:
    # Only needed on a shared DATABASE_URL: the demo's own account starts from nothing.
    for table in ("active_positions", "dispatch_executions", "dispatch_recommendations", "account_state",
                  "kill_switch", "kill_switch_history", "sim_orders", "sim_account"):
        conn.execute(f"DELETE FROM {table} WHERE account_id = %s", (account,))


def run_demo(day: date = DEMO_DAY, seed: int = 7, in_force: ParamsInForce | None = None,
             url: str | None = None) -> DemoResult:
    from services.common.db import connect, make_pool
    from services.common.migrate import migrate

    started = time.perf_counter()
    calendar = nyse_calendar()
    session = calendar.session_on(day)
    if session is None:
        raise SystemExit(f"{day} is not a trading day")
    url = url or _demo_database()
    migrate(url)
    in_force = in_force or load_params_file()
    clock = FixedClock(session.open)
    pool = make_pool(url, min_size=1, max_size=2, application_name="ops-dispatcher:demo")
    result = DemoResult()
    try:
        with connect(url) as conn:
            _reset_account(conn, DEMO_ACCOUNT)
        broker = SimBroker(pool, DEMO_ACCOUNT, clock, slippage_bps=in_force.params.execution.slippage_bps,
                           universe=ALL)
        options = SimOptionMarket(pool, seed=seed, liquidity={t.ticker: t.option_liquidity for t in TICKERS})
        dispatcher = Dispatcher(pool, broker, StaticParams(in_force), DEMO_ACCOUNT, clock=clock,
                                calendar=calendar, worker_id="demo", option_data=OptionData(options.chain))
        stop_updates = start_trade_updates(dispatcher, broker)  # the broker's events feed the lifecycle
        market = SimMarket(TICKERS, session, MOVES, seed=seed)
        desk = {}
        for rec in DESK:
            desk.setdefault(rec.minute, []).append(rec)
        news = {}
        for minute, ticker, score, confidence in SENTIMENT:
            news.setdefault(minute, []).append((ticker, score, confidence))
        trip_seen: dict[str, Any] = {}
        signal_counts: Counter = Counter()
        with connect(url) as conn:
            _seed_iv_history(conn, calendar, day, seed)
            features = FeatureCycle()
            for minute in range(market.minutes):
                bars = market.next_bars(minute)
                clock.set(market.bar_time(minute) + timedelta(minutes=1))
                now = clock.now()
                write_bars(conn, bars)
                for ticker, score, confidence in news.get(minute, []):
                    conn.execute("INSERT INTO sentiment (ticker, ts, score, confidence, source) VALUES (%s, %s, %s, %s, 'demo-news')",
                                 (ticker, now, score, confidence))
                compute_features(conn, now=now, cycle=features)
                if minute % 30 == 0:
                    run_watchlist_cycle(conn, DEMO_ACCOUNT, in_force, now, liquidity_inputs=LIQUIDITY)
                signal_counts.update(run_signal_cycle(conn, DEMO_ACCOUNT, in_force, now).counts)
                options.mark_held(conn, now)
                # Resting limit orders the moved market has reached fill (the broker's events record
                # them); those still unfilled are re-priced, or given up after their last attempt.
                broker.match_resting(now)
                dispatcher.reprice_working()
                if minute == HALT_MINUTE:
                    with conn.transaction():
                        kill_switch.set_state(conn, DEMO_ACCOUNT, "HALTED", "operator halt (demo)", "operator:demo", now)
                    result.rows.append({"time": now, "ticker": "-", "action": "HALT", "instrument": "-",
                                        "status": "HALTED", "codes": "operator halt", "detail": ""})
                notes = {}
                for rec in desk.get(minute, []):
                    rec_id = _insert_rec(conn, rec, now)
                    notes[rec_id] = rec.note
                dispatcher.refresh_account()
                for outcome in dispatcher.drain():
                    result.rows.append(_row(conn, outcome, now, notes.get(outcome.recommendation_id, "")))
                if not trip_seen:
                    ks = kill_switch.read_state(conn, DEMO_ACCOUNT)
                    if ks and ks["state"] == "REDUCING":
                        trip_seen.update(ks)
                        result.rows.append({"time": now, "ticker": "-", "action": "TRIP", "instrument": "-",
                                            "status": "REDUCING", "codes": "daily loss limit", "detail": ks["reason"]})
            result.summary = {**_summary(conn, dispatcher, trip_seen), "signals": dict(signal_counts)}
        stop_updates()
    finally:
        pool.close()
    result.seconds = time.perf_counter() - started
    return result


def _seed_iv_history(conn, calendar, day: date, seed: int) -> None:
    """Thirty earlier sessions of ATM IV per ticker, so the IV percentile gate is evaluated."""
    import random

    rng = random.Random(seed)
    sessions = calendar.sessions_between(day - timedelta(days=60), day - timedelta(days=1))[-30:]
    rows = [(t, s.day, round(rng.uniform(*IV_HISTORY[t]), 4), s.close) for t in sorted(IV_HISTORY) for s in sessions]
    with conn.cursor() as cur:
        cur.executemany("INSERT INTO iv_history (ticker, session_day, atm_iv, recorded_at) VALUES (%s, %s, %s, %s) "
                        "ON CONFLICT DO NOTHING", rows)


def _insert_rec(conn, rec: DeskRec, now: datetime) -> int:
    return conn.execute(
        """INSERT INTO dispatch_recommendations (account_id, ticker, action, instrument, strategy, confidence,
                                                 reason, created_at)
           VALUES (%s, %s, %s, %s, %s, %s, %s::jsonb, %s) RETURNING id""",
        (DEMO_ACCOUNT, rec.ticker, rec.action, rec.instrument, rec.strategy, rec.confidence,
         '{"source": "desk"}', now),
    ).fetchone()["id"]


def _row(conn, outcome: Outcome, now: datetime, note: str) -> dict[str, Any]:
    rec = conn.execute(
        "SELECT instrument, gate_results, decision FROM dispatch_recommendations WHERE id = %s",
        (outcome.recommendation_id,),
    ).fetchone()
    failed = [g["code"] for g in (rec["gate_results"] or []) if not g["passed"]]
    codes = ", ".join(dict.fromkeys(failed)) if failed and outcome.status != "EXECUTED" else outcome.code
    instrument = rec["instrument"]
    plan = (rec["decision"] or {}).get("plan")
    if plan and plan.get("instrument") != instrument:
        instrument = f"{instrument}->{plan['instrument']}"
        option = (rec["decision"] or {}).get("option") or {}
        note = f"{note + ': ' if note else ''}option refused ({option.get('code')})"
    return {"time": now, "ticker": outcome.ticker, "action": outcome.action, "instrument": instrument,
            "status": outcome.status, "codes": codes, "detail": note or outcome.detail}


def _summary(conn, dispatcher: Dispatcher, trip: dict[str, Any]) -> dict[str, Any]:
    from services.adapters.postgres.status import status_report

    report = status_report(conn, DEMO_ACCOUNT, dispatcher.clock.now())
    orders = conn.execute(
        "SELECT count(*)::int AS n, count(*) FILTER (WHERE status = 'FILLED')::int AS filled FROM dispatch_executions WHERE account_id = %s",
        (DEMO_ACCOUNT,),
    ).fetchone()
    gate_blocks = Counter()
    for row in conn.execute(
        "SELECT gate_results FROM dispatch_recommendations WHERE account_id = %s AND gate_results IS NOT NULL",
        (DEMO_ACCOUNT,),
    ):
        for g in row["gate_results"]:
            if not g["passed"]:
                gate_blocks[g["name"]] += 1
    realized = conn.execute(
        "SELECT coalesce(sum(realized_pnl), 0) AS r FROM active_positions WHERE account_id = %s AND status = 'CLOSED'",
        (DEMO_ACCOUNT,),
    ).fetchone()["r"]
    return {**report, "orders": orders["n"], "filled": orders["filled"], "gate_blocks": dict(gate_blocks),
            "realized_pnl": realized, "trip": trip}


def print_report(result: DemoResult, out: TextIO = sys.stdout) -> None:
    w = out.write
    w(f"{'time (ET)':<9} {'ticker':<6} {'action':<5} {'instrument':<13} {'outcome':<10} {'gate / code':<44} note\n")
    w("-" * 120 + "\n")
    for r in result.rows:
        w(f"{r['time'].astimezone(ET):%H:%M}     {r['ticker']:<6} {r['action']:<5} {r['instrument']:<13} "
          f"{r['status']:<10} {r['codes'][:44]:<44} {r['detail'][:60]}\n")
    s = result.summary
    ks = s["kill_switch"]
    acct = s["account"] or {}
    w("\nSummary\n-------\n")
    w(f"orders            {s['orders']} submitted, {s['filled']} filled\n")
    w(f"open positions    {len(s['positions'])}   exposure {s['exposure']:,.2f}\n")
    for p in s["positions"]:
        w(f"  {p['ticker']:<6} {p['instrument']:<6} {p['symbol']:<22} {p['qty']:>6} @ {p['avg_price']:.2f}  "
          f"marked {p['market_price'] or p['avg_price']:.2f}\n")
    if acct:
        w(f"P&L today         {acct['daily_pnl']:+,.2f}  (realized {s['realized_pnl']:+,.2f}; equity {acct['equity']:,.2f})\n")
    w(f"kill switch       {ks['state']}: {ks.get('reason')}\n")
    if s["trip"]:
        w(f"daily-loss trip   at {s['trip']['changed_at'].astimezone(ET):%H:%M} ET, latched for the session of {s['trip']['tripped_session']}\n")
    sig = s.get("signals", {})
    if sig:
        w("signals           " + ", ".join(f"{k} {v}" for k, v in sig.items() if v) + "\n")
    w("decisions         " + ", ".join(f"{k} {v}" for k, v in s["decisions_by_status"].items()) + "\n")
    w("blocked by gate   " + ", ".join(f"{k} {v}" for k, v in sorted(s["gate_blocks"].items(), key=lambda kv: -kv[1])) + "\n")
    w(f"\nsimulated {len(result.rows)} events in {result.seconds:.1f} s\n")


def cmd_demo(args) -> int:
    from services.common.settings import load_settings, trading_mode

    logging.getLogger().setLevel(logging.ERROR if not args.verbose else logging.INFO)
    settings = load_settings()
    in_force = load_params_file(settings.ops_params_file)
    mode = trading_mode(settings, in_force.params)
    log.info("demo start-up", extra={"settings": settings.describe(), "mode": mode.mode, "mode_reason": mode.reason,
                                     "params_source": in_force.source, "params_hash": in_force.content_hash})
    result = run_demo(day=date.fromisoformat(args.date), seed=args.seed, in_force=in_force)
    print_report(result)
    return 0

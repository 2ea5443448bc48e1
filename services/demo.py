"""`ops-pipeline demo`: two simulated trading sessions on the embedded Postgres.

The whole pipeline runs minute by minute: a seeded synthetic market writes 1-minute bars (and
the news classifier's sentiment), the feature computer turns them into features, the watchlist
engine scores the tickers, the signal engine writes recommendations, the position manager
judges every open position by the exit rules, and the dispatcher decides each recommendation
through every gate and trades stock and options on the simulated paper broker, with the repo's
params file. A desk stream of recommendations (entries, and a few malformed ones) runs beside
the signals. Nothing closes a position by hand: every exit is a rule's or the kill switch's.

Two sessions, because a daily-loss trip latches REDUCING for the rest of its session, and a
book the trip has flattened leaves nothing for the end-of-day flatten:
- a calm day with trends (by default 2026-11-24): a stop loss, a take profit, a trailing stop,
  the day trades' flatten before the close, and an option carried in from an earlier session
  closed on its last trading day;
- the day of `--date` (2026-11-25): every account kill switch blocks at least once (orders
  before 09:35 and after 15:45, positions and exposure at their limits), and a sell-off trips
  the daily-loss switch, which flattens the book and stays tripped while the market recovers,
  until the operator halts.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any, TextIO

from services.common.clock import FixedClock
from services.common.market_calendar import ET, Session, nyse_calendar
from services.common.params import ParamsInForce, load_params_file
from services.adapters.postgres import kill_switch, orders_repo
from services.simulation import Pipeline
from services.adapters.postgres.orders_repo import jsonb
from services.dispatcher.main import Outcome, start_trade_updates
from services.domain.broker import OrderRequest, client_order_id
from services.adapters.sim.options import contract_quote, occ_symbol, strike_step
from services.adapters.sim.market import Move, SimMarket, TickerSpec, write_bars

log = logging.getLogger("demo")

DEMO_ACCOUNT = "demo"
DEMO_DAY = date(2026, 11, 25)  # the sell-off; the calm day is the session before it
STARTING_CASH = Decimal("100000")

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


@dataclass(frozen=True)
class Scenario:
    """One session's script: moves (minutes after the open), news, the desk's stream, a halt."""

    title: str
    moves: list[Move]
    sentiment: list[tuple[int, str, float, float]]  # (minute, ticker, signed score, confidence)
    desk: list[DeskRec]
    halt_minute: int | None = None
    carried_option: bool = False  # an option from an earlier session that expires today
    noise: float = 1.0  # scales each ticker's minute-to-minute volatility


# The calm day: trends that each exit rule closes. Stock entries by the desk, early: AMD falls
# through its stop; MSFT climbs to its target; META rises far enough to arm the trailing stop,
# then gives back; SPY, bought after midday, drifts and is flattened 15 minutes before the close.
CALM = Scenario(
    title="a calm day with trends",
    moves=[
        Move(("AMD",), 30, 60, -0.035, volume_factor=2.0),
        Move(("MSFT",), 40, 90, 0.055, volume_factor=2.0),
        Move(("META",), 30, 60, 0.025, volume_factor=2.0),
        Move(("META",), 70, 100, -0.030, volume_factor=2.0),
        Move(("NVDA", "AAPL"), 150, 200, 0.012, volume_factor=3.0),
    ],
    sentiment=[(20, "MSFT", 0.6, 0.8), (140, "NVDA", 0.6, 0.8), (140, "AAPL", 0.5, 0.7)],
    desk=[
        DeskRec(10, "AMD", "BUY", note="desk: stock"),
        DeskRec(12, "MSFT", "BUY", note="desk: stock"),
        DeskRec(14, "META", "BUY", note="desk: stock"),
        DeskRec(200, "SPY", "BUY", note="desk: stock, held into the close"),
    ],
    carried_option=True,
    noise=0.5,
)

# The sell-off day. Trends the signal rules can find from 10:20 ET (the features need 50 bars
# of the session). The desk buys calls before the sell-off of 12:50-13:30 ET, where the stops
# take their losses; the signals buy puts near its bottom, and the recovery of 13:50-15:00 ET
# takes the day's loss past the limit: the trip flattens what is left and latches.
SELL_OFF = Scenario(
    title="a sell-off",
    moves=[
        Move(("AAPL", "NVDA"), 52, 80, 0.010, volume_factor=3.0),
        Move(("TSLA",), 85, 115, 0.012, volume_factor=3.0),
        Move(("F",), 120, 140, 0.015, volume_factor=3.0),
        Move(("META", "MSFT"), 150, 180, 0.009, volume_factor=3.0),
        Move(ALL, 200, 240, -0.085, volume_factor=3.0),
        Move(ALL, 260, 330, 0.075, volume_factor=2.0),
    ],
    sentiment=[
        (45, "AAPL", 0.8, 0.9), (45, "NVDA", 0.6, 0.8), (80, "AMD", 0.7, 0.85), (80, "TSLA", -0.7, 0.8),
        (115, "F", 0.5, 0.7), (145, "META", 0.6, 0.8), (145, "MSFT", -0.4, 0.6),
    ],
    # Entries through the day and a few malformed recommendations. No exits: the rules and the
    # kill switch close what is held.
    desk=[
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
        DeskRec(112, "BKNG", "BUY", note="one share would breach the exposure limit"),
        DeskRec(186, "AMD", "BUY", "OPTION", note="desk: call"),
        DeskRec(188, "AAPL", "BUY", "OPTION", note="desk: call"),
        DeskRec(190, "SPY", "BUY", "OPTION", note="desk: call"),
        DeskRec(300, "MSFT", "BUY", note="after the daily-loss trip"),
        DeskRec(340, "AAPL", "BUY", note="P&L recovered; the switch stays tripped"),
        DeskRec(378, "MSFT", "BUY", note="after 15:45"),
    ],
    halt_minute=384,
)

# The option carried into the calm day: a swing-trade SPY call bought about four weeks earlier
# (inside the swing window of 14-45 days to expiry), expiring on the calm day. Seeded: the demo's
# database starts on the calm day, so no position manager ran while it approached expiry.
CARRIED_TICKER = "SPY"
CARRIED_QTY = 2
CARRIED_DAYS_BEFORE = 28


@dataclass
class SessionResult:
    session: Session
    title: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass
class DemoResult:
    sessions: list[SessionResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def rows(self) -> list[dict[str, Any]]:
        return [r for s in self.sessions for r in s.rows]


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
    # Positions and their orders name each other: the links go first, then the rows.
    conn.execute("UPDATE dispatch_recommendations SET position_id = NULL WHERE account_id = %s", (account,))
    conn.execute("UPDATE dispatch_executions SET position_id = NULL WHERE account_id = %s", (account,))
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
    calm = calendar.previous_session(day)
    url = url or _demo_database()
    migrate(url)
    in_force = in_force or load_params_file()
    clock = FixedClock(calm.open)
    pool = make_pool(url, min_size=1, max_size=2, application_name="ops-dispatcher:demo")
    result = DemoResult()
    try:
        with connect(url) as conn:
            _reset_account(conn, DEMO_ACCOUNT)
        with connect(url) as conn:
            run = _Run.simulated(conn, pool, DEMO_ACCOUNT, in_force, calendar, clock, seed=seed, worker_id="demo",
                                 broker_options={"universe": ALL, "starting_cash": STARTING_CASH},
                                 option_liquidity={t.ticker: t.option_liquidity for t in TICKERS})
            broker, dispatcher = run.broker, run.dispatcher
            _seed_iv_history(conn, calendar, day, seed)
            carried = _seed_carried_option(run, calm, seed) if CALM.carried_option else None
            stop_updates = start_trade_updates(dispatcher, broker)  # the broker's events feed the lifecycle
            try:
                specs = TICKERS
                for number, (this, scenario) in enumerate(((calm, CALM), (session, SELL_OFF))):
                    # Each session opens where the last one closed; its noise has a seed of its own.
                    market = SimMarket([replace(t, minute_vol=t.minute_vol * scenario.noise) for t in specs], this,
                                       scenario.moves, seed=seed + 1 - number)
                    result.sessions.append(run.session(this, scenario, market, carried if number == 0 else None))
                    specs = [TickerSpec(t.ticker, market.price(t.ticker), t.minute_vol, t.avg_volume,
                                        t.option_liquidity) for t in TICKERS]
            finally:
                stop_updates()
    finally:
        pool.close()
    result.seconds = time.perf_counter() - started
    return result


class _Run(Pipeline):
    """What the sessions share: the services over the demo's database, its clock, broker and option market."""

    def session(self, session: Session, scenario: Scenario, market: SimMarket,
                carried: dict[str, Any] | None) -> SessionResult:
        conn, clock, dispatcher = self.conn, self.clock, self.dispatcher
        out = SessionResult(session, scenario.title)
        # The broker rolls its last_equity to the previous close at the session's first look.
        clock.set(session.open)
        dispatcher.refresh_account(force=True)
        if carried is not None:
            out.rows.append({"time": session.open, "ticker": carried["ticker"], "action": "HELD",
                             "instrument": "OPTION", "status": "OPEN", "codes": "carried in",
                             "detail": carried["label"]})
        desk: dict[int, list[DeskRec]] = {}
        for rec in scenario.desk:
            desk.setdefault(rec.minute, []).append(rec)
        news: dict[int, list] = {}
        for minute, ticker, score, confidence in scenario.sentiment:
            news.setdefault(minute, []).append((ticker, score, confidence))
        trip_seen: dict[str, Any] = {}
        self.signals = Counter()
        for minute in range(market.minutes):
            bars = market.next_bars(minute)
            clock.set(market.bar_time(minute) + timedelta(minutes=1))
            now = clock.now()
            write_bars(conn, bars)
            for ticker, score, confidence in news.get(minute, []):
                conn.execute("INSERT INTO sentiment (ticker, ts, score, confidence, source) VALUES (%s, %s, %s, %s, 'demo-news')",
                             (ticker, now, score, confidence))
            self.before_orders(minute, now)
            if minute == scenario.halt_minute:
                with conn.transaction():
                    kill_switch.set_state(conn, DEMO_ACCOUNT, "HALTED", "operator halt (demo)", "operator:demo", now)
                out.rows.append({"time": now, "ticker": "-", "action": "HALT", "instrument": "-",
                                 "status": "HALTED", "codes": "operator halt", "detail": ""})
            notes = {}
            for rec in desk.get(minute, []):
                rec_id = _insert_rec(conn, rec, now)
                notes[rec_id] = rec.note
            # A loss past the limit trips the switch here, and the trip flattens the book.
            dispatcher.refresh_account()
            if not trip_seen:
                ks = kill_switch.read_state(conn, DEMO_ACCOUNT)
                if ks and ks["state"] == "REDUCING" and ks["tripped_session"] == session.day:
                    trip_seen.update(ks)
                    out.rows.append({"time": now, "ticker": "-", "action": "TRIP", "instrument": "-",
                                     "status": "REDUCING", "codes": "daily loss limit", "detail": ks["reason"]})
            for outcome in dispatcher.drain():
                out.rows.append(_row(conn, outcome, now, notes.get(outcome.recommendation_id, "")))
        # The last word on the session: the account and the marks as of its close.
        clock.set(session.close)
        dispatcher.refresh_account(force=True)
        out.summary = {**_summary(conn, session, trip_seen), "signals": dict(self.signals)}
        return out


def _seed_iv_history(conn, calendar, day: date, seed: int) -> None:
    """Thirty earlier sessions of ATM IV per ticker, so the IV percentile gate is evaluated."""
    import random

    rng = random.Random(seed)
    sessions = calendar.sessions_between(day - timedelta(days=60), day - timedelta(days=1))[-30:]
    rows = [(t, s.day, round(rng.uniform(*IV_HISTORY[t]), 4), s.close) for t in sorted(IV_HISTORY) for s in sessions]
    with conn.cursor() as cur:
        cur.executemany("INSERT INTO iv_history (ticker, session_day, atm_iv, recorded_at) VALUES (%s, %s, %s, %s) "
                        "ON CONFLICT DO NOTHING", rows)


def _seed_carried_option(run: _Run, calm: Session, seed: int) -> dict[str, Any]:
    """A swing-trade call bought weeks before the calm day and expiring on it, in both books.

    It goes through the real paths, dated when it was bought: the recommendation, the intent
    (execution row, reserved position) by the orders repository, the order by the simulated
    broker at the contract's quote then, and the fill by the lifecycle. Then the contract is
    marked at the previous session's close, the mark the broker's day starts from.
    """
    conn, clock, calendar, in_force = run.conn, run.clock, run.calendar, run.in_force
    spec = next(t for t in TICKERS if t.ticker == CARRIED_TICKER)
    bought_session = calendar.previous_session(calm.day - timedelta(days=CARRIED_DAYS_BEFORE - 1))
    bought_at = bought_session.open + timedelta(minutes=30)
    spot = spec.start_price
    spot_then = round(spot * 0.965, 2)  # SPY was lower when it was bought
    step = strike_step(spot_then)
    strike = (Decimal(str(spot_then)) / step).to_integral_value() * step  # at the money then
    chain_spec = run.options.spec_for(CARRIED_TICKER)
    bought = contract_quote(CARRIED_TICKER, calm.day, strike, "call", spot_then, bought_at, seed=seed, spec=chain_spec)
    symbol = occ_symbol(CARRIED_TICKER, calm.day, "call", strike)
    last_close = calendar.previous_session(calm.day).close
    at_close = contract_quote(CARRIED_TICKER, calm.day, strike, "call", spot, last_close, seed=seed, spec=chain_spec)
    with conn.cursor() as cur:
        cur.executemany("INSERT INTO sim_option_marks (symbol, ts, bid, ask) VALUES (%s, %s, %s, %s) "
                        "ON CONFLICT DO NOTHING",
                        [(symbol, bought_at, bought.bid, bought.ask), (symbol, last_close, at_close.bid, at_close.ask)])
    clock.set(bought_at)
    note = f"carried in: swing call bought {bought_session.day}, expires {calm.day} (seeded)"
    rec = DeskRec(0, CARRIED_TICKER, "BUY", "OPTION", "swing_trade", 0.7, note)
    fee = in_force.params.fees.per_unit("OPTION")
    with conn.transaction():
        rec_id = _insert_rec(conn, rec, bought_at, source="seed")
        cid = client_order_id(DEMO_ACCOUNT, rec_id)
        orders_repo.record_intent(conn, **{
            "position_id": None, "recommendation_id": rec_id, "account_id": DEMO_ACCOUNT, "worker": "demo-seed",
            "now": bought_at, "gates": jsonb([]), "decision": jsonb({"seeded": note}), "inputs": None,
            "leg": 0, "client_order_id": cid, "ticker": CARRIED_TICKER, "instrument": "OPTION", "symbol": symbol,
            "side": "buy", "position_intent": "buy_to_open", "qty": CARRIED_QTY, "multiplier": 100,
            "est_price": bought.ask, "notional": bought.ask * CARRIED_QTY * 100, "position_side": "long",
            "opens_position": True, "order_type": "market", "limit_price": None, "attempt": 0,
            "fee_per_unit": fee, "strategy": "swing_trade", "strike": strike, "expiration": calm.day,
            "option_right": "call", "premium": bought.ask, "quote": None, "greeks": None, "option_gates": None,
            "params_source": in_force.source, "params_version": in_force.version, "params_hash": in_force.content_hash,
        })
    order = OrderRequest(client_order_id=cid, symbol=symbol, underlying=CARRIED_TICKER, instrument="OPTION",
                         side="buy", qty=Decimal(CARRIED_QTY), position_intent="buy_to_open")
    run.dispatcher.record_broker_answer(cid, run.broker.submit_order(order))
    return {"ticker": CARRIED_TICKER, "symbol": symbol, "label": note}


def _insert_rec(conn, rec: DeskRec, now: datetime, source: str = "desk") -> int:
    return conn.execute(
        """INSERT INTO dispatch_recommendations (account_id, ticker, action, instrument, strategy, confidence,
                                                 reason, created_at)
           VALUES (%s, %s, %s, %s, %s, %s, %s, %s) RETURNING id""",
        (DEMO_ACCOUNT, rec.ticker, rec.action, rec.instrument, rec.strategy, rec.confidence,
         jsonb({"source": source, "note": rec.note}), now),
    ).fetchone()["id"]


def _row(conn, outcome: Outcome, now: datetime, note: str) -> dict[str, Any]:
    rec = conn.execute(
        "SELECT instrument, gate_results, decision, exit_reason, reason FROM dispatch_recommendations WHERE id = %s",
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
    if rec["exit_reason"]:
        # An exit by rule or by the kill switch: the rule's own words say why.
        note = ((rec["reason"] or {}).get("exit") or {}).get("reason") or rec["exit_reason"]
        codes = f"{rec['exit_reason']}" if outcome.status == "EXECUTED" else f"{rec['exit_reason']} {codes}"
    return {"time": now, "ticker": outcome.ticker, "action": outcome.action, "instrument": instrument,
            "status": outcome.status, "codes": codes, "detail": note or outcome.detail}


# -- closed_positions --
# The positions closed in a session, with their entry and exit, why, fees and realized P&L
# (net of the fees of both fills).
CLOSED_POSITIONS = """
SELECT id, ticker, instrument, symbol, side, qty, multiplier, avg_price, close_price, exit_reason, fees, realized_pnl,
       opened_at, closed_at, strategy
FROM active_positions
WHERE account_id = %(account_id)s AND status = 'CLOSED' AND closed_at >= %(open)s AND closed_at <= %(close)s
ORDER BY closed_at, id
"""

# -- carried_in --
# What the positions held at the session's open had gained or lost before it, net of their
# entry fees: the day's equity-based P&L starts from their marks at the previous close.
CARRIED_IN = """
SELECT coalesce(sum(
         (m.mark - p.avg_price) * p.qty * p.multiplier * CASE WHEN p.side = 'short' THEN -1 ELSE 1 END
         - p.qty * e.fee_per_unit), 0) AS pnl
FROM active_positions p
JOIN dispatch_executions e ON e.position_id = p.id AND e.role = 'ENTRY' AND e.status = 'FILLED'
LEFT JOIN LATERAL (
    SELECT CASE WHEN p.instrument = 'OPTION'
                THEN (SELECT (o.bid + o.ask) / 2 FROM sim_option_marks o
                      WHERE o.symbol = p.symbol AND o.ts <= %(open)s ORDER BY o.ts DESC LIMIT 1)
                ELSE (SELECT b.close FROM lane_telemetry b
                      WHERE b.ticker = p.symbol AND b.ts <= %(open)s ORDER BY b.ts DESC LIMIT 1)
           END AS mark) m ON true
WHERE p.account_id = %(account_id)s AND p.opened_at < %(open)s AND (p.closed_at IS NULL OR p.closed_at >= %(open)s)
"""


# -- flatten_move --
# What the book the trip flattened lost from its marks of the minute before the trip (when the
# day's loss was still inside the limit) to its exit fills, exit fees included: the day's loss
# ends within the limit plus this.
FLATTEN_MOVE = """
SELECT coalesce(sum(
         (m.mark - p.close_price) * p.qty * p.multiplier * CASE WHEN p.side = 'short' THEN -1 ELSE 1 END
         + p.qty * e.fee_per_unit), 0) AS move
FROM active_positions p
JOIN dispatch_executions e ON e.position_id = p.id AND e.role = 'EXIT' AND e.status = 'FILLED'
LEFT JOIN LATERAL (
    SELECT CASE WHEN p.instrument = 'OPTION'
                THEN (SELECT (o.bid + o.ask) / 2 FROM sim_option_marks o
                      WHERE o.symbol = p.symbol AND o.ts <= %(before)s ORDER BY o.ts DESC LIMIT 1)
                ELSE (SELECT b.close FROM lane_telemetry b
                      WHERE b.ticker = p.symbol AND b.ts < %(before)s ORDER BY b.ts DESC LIMIT 1)
           END AS mark) m ON true
WHERE p.account_id = %(account_id)s AND p.status = 'CLOSED' AND p.exit_reason = 'DAILY_LOSS_FLATTEN'
  AND p.closed_at >= %(trip)s AND p.closed_at <= %(close)s
"""


def _summary(conn, session: Session, trip: dict[str, Any]) -> dict[str, Any]:
    from services.adapters.postgres.status import status_report

    report = status_report(conn, DEMO_ACCOUNT, session.close)
    window = {"account_id": DEMO_ACCOUNT, "open": session.open, "close": session.close}
    orders = conn.execute(
        "SELECT count(*)::int AS n, count(*) FILTER (WHERE status = 'FILLED')::int AS filled FROM dispatch_executions "
        "WHERE account_id = %(account_id)s AND submitted_at >= %(open)s AND submitted_at <= %(close)s",
        window,
    ).fetchone()
    gate_blocks = Counter()
    for row in conn.execute(
        "SELECT gate_results FROM dispatch_recommendations WHERE account_id = %(account_id)s "
        "AND gate_results IS NOT NULL AND created_at >= %(open)s AND created_at <= %(close)s",
        window,
    ):
        for g in row["gate_results"]:
            if not g["passed"]:
                gate_blocks[g["name"]] += 1
    closed = conn.execute(CLOSED_POSITIONS, window).fetchall()
    realized = sum((p["realized_pnl"] for p in closed), Decimal(0))
    unrealized = sum(((p["market_price"] or p["avg_price"]) - p["avg_price"]) * p["qty"] * p["multiplier"]
                     * (-1 if p["side"] == "short" else 1) for p in report["positions"])
    carried_in = conn.execute(CARRIED_IN, window).fetchone()["pnl"]
    flatten_move = None
    if trip:
        flatten_move = conn.execute(FLATTEN_MOVE, {**window, "trip": trip["changed_at"],
                                                   "before": trip["changed_at"] - timedelta(minutes=1)}).fetchone()["move"]
    return {**report, "orders": orders["n"], "filled": orders["filled"], "gate_blocks": dict(gate_blocks),
            "closed": closed, "realized_pnl": realized, "fees": sum((p["fees"] for p in closed), Decimal(0)),
            "unrealized_pnl": unrealized, "carried_in_pnl": carried_in, "trip": trip, "flatten_move": flatten_move}


def print_report(result: DemoResult, out: TextIO = sys.stdout) -> None:
    for number, session in enumerate(result.sessions, 1):
        _print_session(number, session, out)
    out.write(f"\nsimulated {len(result.rows)} events over {len(result.sessions)} sessions in {result.seconds:.1f} s\n")


def _print_session(number: int, result: SessionResult, out: TextIO) -> None:
    w = out.write
    day = result.session.day
    w(f"\nSession {number}: {day:%a %Y-%m-%d}, {result.title}\n" + "=" * 120 + "\n")
    w(f"{'time (ET)':<9} {'ticker':<6} {'action':<5} {'instrument':<13} {'outcome':<10} {'gate / code':<44} note\n")
    w("-" * 120 + "\n")
    for r in result.rows:
        w(f"{r['time'].astimezone(ET):%H:%M}     {r['ticker']:<6} {r['action']:<5} {r['instrument']:<13} "
          f"{r['status']:<10} {r['codes'][:44]:<44} {r['detail'][:60]}\n")
    s = result.summary
    ks = s["kill_switch"]
    acct = s["account"] or {}
    w(f"\nSummary of {day}\n" + "-" * 22 + "\n")
    w(f"orders            {s['orders']} submitted, {s['filled']} filled\n")
    w(f"closed positions  {len(s['closed'])}\n")
    for p in s["closed"]:
        w(f"  {p['opened_at'].astimezone(ET):%m-%d %H:%M}-{p['closed_at'].astimezone(ET):%H:%M} "
          f"{p['ticker']:<5} {p['symbol']:<19} {p['qty']:>4} @ {p['avg_price']:>8.2f} -> {p['close_price']:>8.2f}  "
          f"{p['exit_reason']:<19} fees {p['fees']:>5.2f}  P&L {p['realized_pnl']:>+9.2f}\n")
    w(f"open positions    {len(s['positions'])}   exposure {s['exposure']:,.2f}\n")
    for p in s["positions"]:
        w(f"  {p['ticker']:<6} {p['instrument']:<6} {p['symbol']:<22} {p['qty']:>6} @ {p['avg_price']:.2f}  "
          f"marked {p['market_price'] or p['avg_price']:.2f}\n")
    if acct:
        carried = s["carried_in_pnl"]
        total = s["realized_pnl"] + s["unrealized_pnl"] - carried
        carried_text = f" - carried in at the last close {carried:+,.2f}" if carried else ""
        w(f"P&L today         {acct['daily_pnl']:+,.2f}  (broker: equity {acct['equity']:,.2f} - last close "
          f"{acct['last_equity']:,.2f})\n")
        w(f"                  = realized {s['realized_pnl']:+,.2f} (net of {s['fees']:.2f} fees) + unrealized "
          f"{s['unrealized_pnl']:+,.2f}{carried_text} = {total:+,.2f}"
          f"{'' if abs(total - acct['daily_pnl']) < Decimal('0.005') else '  (MISMATCH)'}\n")
    w(f"kill switch       {ks['state']}: {ks.get('reason')}\n")
    if s["trip"]:
        w(f"daily-loss trip   at {s['trip']['changed_at'].astimezone(ET):%H:%M} ET, latched for the session of {s['trip']['tripped_session']}\n")
    if s["trip"] and acct:
        w(f"                  {s['trip']['reason']}; the flattened book moved {-s['flatten_move']:+,.2f} from the minute "
          f"before to its exits: the day ends {acct['daily_pnl']:+,.2f}\n")
    sig = s.get("signals", {})
    if sig:
        w("signals           " + ", ".join(f"{k} {v}" for k, v in sig.items() if v) + "\n")
    w("decisions         " + ", ".join(f"{k} {v}" for k, v in s["decisions_by_status"].items()) + "\n")
    w("blocked by gate   " + ", ".join(f"{k} {v}" for k, v in sorted(s["gate_blocks"].items(), key=lambda kv: (-kv[1], kv[0]))) + "\n")


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

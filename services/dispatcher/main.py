"""The dispatcher: claim a recommendation, gather its inputs, decide, submit, record.

One recommendation at a time per process; several processes (ECS tasks) share an account and
coordinate through Postgres only:
- the claim is `FOR UPDATE SKIP LOCKED`, so each recommendation is decided by one process;
- the capacity gates are re-checked under a per-account advisory lock, so two processes cannot
  jointly exceed a position or exposure limit;
- the intent (execution row with its deterministic client_order_id, reserved position,
  SUBMITTING status) is committed before the order leaves, and the broker's answer is recorded
  in one later transaction. A crash in between leaves a SUBMITTING recommendation that
  recovery resolves by asking the broker for that client_order_id: nothing lost, nothing twice.

Woken by NOTIFY on the `recommendations` channel, with polling as the fallback. SIGTERM
finishes the recommendation in hand and exits 0.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from collections.abc import Callable
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool

from services.common.clock import Clock, SystemClock
from services.common.market_calendar import CalendarUnavailable, SessionCalendar, et_date, et_day_bounds, nyse_calendar
from services.common.params import ParamsInForce
from services.adapters.postgres import kill_switch, orders_repo, queries, request_budget
from services.adapters.assets import MISSING as MISSING_ASSET
from services.adapters.assets import AssetCache
from services.adapters.postgres.asset_records import AssetRecordStore
from services.domain.broker import (
    Broker,
    TradeUpdate,
    BrokerError,
    BrokerRejected,
    BrokerUnavailable,
    OrderRequest,
    OrderResult,
    client_order_id,
    submit_exactly_once,
)
from services.domain.decision import (
    Context,
    Decision,
    OptionInputs,
    decide,
    exit_unavailable,
    is_option_entry,
    live_trading_check,
    recheck_capacity,
)
from services.domain.lifecycle import LIVE_POSITION, CancelReason, TERMINAL_RECOMMENDATION, Event, EventKind, Illegal
from services.domain.order_pricing import Quote, Replace, Wait, next_attempt, option_tick, stock_tick
from services.adapters.postgres.orders_repo import BrokerFacts, jsonb
from services.dispatcher.risk.gates import AssetUnavailable, check_daily_loss_limit
from services.adapters.sim.broker import SimBroker

log = logging.getLogger("dispatcher")

TERMINAL = tuple(s.value for s in TERMINAL_RECOMMENDATION)
# After a fill the account is refreshed, but at most this often: two trading-API requests a
# refresh against a budget of 200 a minute.
FILL_REFRESH_SECONDS = 1.0
# A decision whose network inputs (asset record, option chain) are not cached lets its claim go,
# fetches them and claims again (maybe another row, when other dispatchers took that one).
MAX_FETCHES = 20
# An order the broker does not show this long after it was sent was not placed.
IN_FLIGHT_GRACE = timedelta(minutes=2)
# An option exit is priced from a quote at most this old.
EXIT_QUOTE_FRESH = timedelta(seconds=5)
# SIGTERM: the recommendation in hand gets this long; then its order is left SUBMITTING for recovery.
SHUTDOWN_BUDGET_SECONDS = 15.0
# In-flight orders, working orders and the broker's order list are compared with ours this often.
RECONCILE_EVERY = timedelta(seconds=30)
# Clocks of two dispatchers differ a little: activity this close before a snapshot counts as after it.
SNAPSHOT_SKEW = timedelta(seconds=2)


def new_worker_id() -> str:
    return f"{socket.gethostname()[:20]}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class StaticParams:
    """A params provider that always returns one document (tests, the demo's fixed scenario)."""

    def __init__(self, in_force: ParamsInForce):
        self._in_force = in_force

    def current(self) -> ParamsInForce:
        return self._in_force

    def status(self) -> dict[str, Any]:
        p = self._in_force
        return {"source": p.source, "version": p.version, "hash": p.content_hash, "last_error": None}


class _FetchFirst(Exception):
    """Raised inside the claim transaction to let the claim go while a network input is fetched.

    Market data and asset records come over the network, with retries and rate-limit waits;
    fetched inside the claim they would hold the row lock and a pooled connection for seconds.
    """

    def __init__(self, what: str, fetch: Callable[[], None]):
        super().__init__(what)
        self.fetch = fetch


@dataclass
class Outcome:
    recommendation_id: int
    status: str
    code: str
    detail: str
    ticker: str = ""
    action: str = ""


class Dispatcher:
    def __init__(
        self,
        pool: ConnectionPool,
        broker: Broker,
        params: Any,
        account_id: str,
        *,
        clock: Clock | None = None,
        calendar: SessionCalendar | None = None,
        worker_id: str | None = None,
        option_data: Any = None,
        quotes: Callable[[str, str, datetime], Quote | None] | None = None,
        assets: AssetCache | None = None,
    ):
        self.pool = pool
        self.broker = broker
        self.params = params
        self.account_id = account_id
        self.clock = clock or SystemClock()
        self._calendar = calendar
        self.worker_id = worker_id or new_worker_id()
        self.option_data = option_data
        self.quotes = quotes if quotes is not None else getattr(broker, "quote", None)
        # A remote broker's answers are shared through Postgres: one request per symbol per
        # session for every dispatcher task, not one per task.
        store = AssetRecordStore(pool) if getattr(broker, "remote", True) else None
        self.assets = assets or AssetCache(lambda symbol: self.broker.get_asset(symbol), self.clock, store)
        self._last_refresh: datetime | None = None
        self._last_reconcile: datetime | None = None
        self._last_orders_reconcile: datetime | None = None
        self._chain_errors: dict[str, str] = {}
        self._asset_errors: dict[str, AssetUnavailable] = {}
        self._exit_quotes: dict[str, tuple[datetime, Quote | None]] = {}

    @property
    def calendar(self) -> SessionCalendar:
        return self._calendar or nyse_calendar()

    # --- one recommendation ---------------------------------------------------------------

    def process_next(self) -> Outcome | None:
        """Decide the oldest pending recommendation; None when there is none."""
        for _ in range(MAX_FETCHES):
            outcome = self._process_once()
            if not isinstance(outcome, _FetchFirst):
                return outcome
            outcome.fetch()  # the claim was let go: fetch with no transaction open, then claim again
        # Each pass cached what the row it claimed needed; other dispatchers kept taking those rows.
        log.warning("no decision after fetching inputs; yielding", extra={"account_id": self.account_id,
                                                                            "fetches": MAX_FETCHES})
        return None

    def _process_once(self) -> Outcome | _FetchFirst | None:
        now = self.clock.now()
        in_force = self.params.current()
        day_start, day_end = et_day_bounds(et_date(now))
        rec_id: int | None = None
        decision: Decision | None = None
        ctx: Context | None = None
        try:
            with self.pool.connection() as conn, conn.transaction():
                row = conn.execute(
                    queries.CLAIM_AND_GATHER,
                    {"account_id": self.account_id, "now": now, "day_start": day_start, "day_end": day_end},
                ).fetchone()
                if row is None:
                    return None
                rec_id = row["id"]
                ctx = self._context(conn, row, now)
                option_inputs = None
                if is_option_entry(ctx.recommendation):
                    option_inputs = self._gather_options(conn, ctx, in_force, now)
                    if option_inputs is None:  # rolls the claim back: nothing recorded
                        raise _FetchFirst(f"option chain {ctx.ticker}", lambda: self._fetch_chain(ctx))
                exit_quote = None
                if ctx.action == "EXIT" and (ctx.open_position or {}).get("instrument") == "OPTION":
                    exit_quote = self._exit_quote(ctx.open_position["symbol"], now)
                decision = decide(ctx, in_force.params, now, self._calendar, option_inputs, exit_quote=exit_quote)
                decision = live_trading_check(decision, not self.broker.paper, in_force.params)
                position_id = None
                if decision.is_order and decision.plan.opens_position:
                    conn.execute(queries.CAPACITY_LOCK, {"account_id": self.account_id})
                    fresh = conn.execute(
                        queries.CAPACITY_RECHECK, {"account_id": self.account_id, "ticker": ctx.ticker}
                    ).fetchone()
                    decision = recheck_capacity(decision, ctx, fresh, in_force.params)
                elif decision.is_order:
                    # An exit takes its position by id, under the row lock, or finds another exit has.
                    position_id = (ctx.open_position or {}).get("id")
                    taken = position_id is not None and orders_repo.take_position(
                        conn, self.account_id, position_id, now)
                    if not taken:
                        decision = exit_unavailable(decision, "CLOSING")
                cid = client_order_id(self.account_id, rec_id)
                if decision.is_order:
                    self._record_intent(conn, ctx, decision, cid, in_force, now, position_id)
                else:
                    self._record_skip(conn, rec_id, decision, in_force, now)
                    loss = next((g.result for g in decision.gates if g.result.code == "DAILY_LOSS_LIMIT"), None)
                    if loss is not None:  # whichever gate failed first, the loss trips the switch
                        self._trip(conn, loss.reason, now)
        except _FetchFirst as fetch:
            return fetch
        except (psycopg.OperationalError, psycopg.InterfaceError):
            raise  # the database is down: the loop backs off; nothing was committed
        except Exception as e:  # a bug or bad data: recorded, rolled back, and the loop goes on
            log.exception("decision failed", extra={"recommendation_id": rec_id, "account_id": self.account_id})
            if rec_id is None:
                # The claimed row could not even be loaded (a value the driver cannot decode):
                # claim it again by id alone and fail it, or every dispatcher would stop on it.
                return self._fail_unloadable(e, now)
            detail = f"DECISION_ERROR: {type(e).__name__}: {e}"
            with self.pool.connection() as conn:
                failed = orders_repo.fail_pending(conn, self.account_id, rec_id, "DECISION_ERROR", detail, now,
                                                  self.worker_id)
            if not failed:  # another worker holds it now: its to finish
                return Outcome(rec_id, "PENDING", "DECISION_ERROR_NOT_RECORDED", str(e))
            return Outcome(rec_id, "FAILED", "DECISION_ERROR", str(e))

        assert ctx is not None and decision is not None
        if not decision.is_order:
            self._log_decision(ctx, "SKIPPED", decision.code, decision.detail)
            return Outcome(rec_id, "SKIPPED", decision.code, decision.detail, ctx.ticker, ctx.action)
        try:
            return self._submit(ctx, decision, cid, now)
        except (psycopg.OperationalError, psycopg.InterfaceError):
            raise
        except Exception as e:  # after the intent's commit: the order may be out, recovery asks the broker
            log.exception("submit failed", extra={"recommendation_id": rec_id, "client_order_id": cid,
                                                  "account_id": self.account_id})
            detail = f"SUBMIT_ERROR: {type(e).__name__}: {e}"
            with self.pool.connection() as conn:
                orders_repo.note_error(conn, self.account_id, rec_id, detail)
            return Outcome(rec_id, "SUBMITTING", "SUBMIT_ERROR", detail, ctx.ticker, ctx.action)

    def _fail_unloadable(self, error: Exception, now: datetime) -> Outcome | None:
        with self.pool.connection() as conn, conn.transaction():
            row = conn.execute(queries.CLAIM_ID, {"account_id": self.account_id}).fetchone()
            if row is None:
                return None
            detail = f"UNLOADABLE_RECOMMENDATION: {type(error).__name__}: {error}"
            orders_repo.fail_pending(conn, self.account_id, row["id"], "UNLOADABLE_RECOMMENDATION", detail, now,
                                     self.worker_id)
        return Outcome(row["id"], "FAILED", "UNLOADABLE_RECOMMENDATION", detail)

    def _context(self, conn: psycopg.Connection, row: dict[str, Any], now: datetime) -> Context:
        bar = None
        if row["bar_ts_latest"] is not None:
            bar = {"ts": row["bar_ts_latest"], "open": row["bar_open"], "high": row["bar_high"],
                   "low": row["bar_low"], "close": row["bar_close"], "volume": row["bar_volume"]}
        account = None
        if row["equity"] is not None:
            account = {"equity": row["equity"], "last_equity": row["last_equity"], "as_of": row["account_as_of"],
                       "orders_reconciled_at": row["orders_reconciled_at"]}
        kill_state = row["kill_state"] or "ACTIVE"
        if row["kill_state"] is not None:
            try:
                session_day = self.calendar.current_or_previous_session(now).day
            except CalendarUnavailable:
                session_day = None  # the latch cannot be shown expired: it stays in force
            if session_day is not None:
                switch = kill_switch.KillSwitch(row["kill_state"], row["kill_changed_by"], row["kill_tripped_session"])
                kill_state, expired = kill_switch.effective_state(switch, session_day)
                if expired:
                    kill_switch.expire_latch(conn, self.account_id, now, session_day)
        rec = {k: row[k] for k in ("id", "account_id", "ticker", "action", "instrument", "strategy",
                                   "confidence", "bar_ts", "created_at", "reason")}
        return Context(
            recommendation=rec,
            bar=bar,
            features={"ts": row["features_ts"]} if row["features_ts"] is not None else None,
            last_trade_time=row["last_trade_time"],
            ticker_count_today=row["ticker_count_today"],
            open_position=row["open_position"],
            open_positions=row["open_positions"],
            exposure=row["exposure"],
            account_state=account,
            kill_state=kill_state,
            asset=self._asset(row["ticker"], now),
        )

    def _asset(self, ticker: str, now: datetime):
        asset = self.assets.cached(ticker, now)
        if asset is MISSING_ASSET:
            if ticker in self._asset_errors:  # the fetch just made failed: that is the answer, once
                return self._asset_errors.pop(ticker)
            if getattr(self.broker, "remote", True):
                raise _FetchFirst(f"asset {ticker}", lambda: self._fetch_asset(ticker, now))
            return self.assets.lookup(ticker, now)  # a local broker: no network held under the lock
        return asset

    def _fetch_asset(self, ticker: str, now: datetime) -> None:
        answer = self.assets.lookup(ticker, now)
        if isinstance(answer, AssetUnavailable):
            self._asset_errors[ticker] = answer

    def _exit_quote(self, symbol: str, now: datetime) -> Quote | None:
        """The held contract's quote, to price an option exit as a limit; None: it goes at market."""
        hit = self._exit_quotes.get(symbol)
        if hit is not None and timedelta(0) <= now - hit[0] < EXIT_QUOTE_FRESH:
            return hit[1]
        if getattr(self.broker, "remote", True):
            raise _FetchFirst(f"quote {symbol}", lambda: self._fetch_exit_quote(symbol, now))
        self._fetch_exit_quote(symbol, now)
        return self._exit_quotes[symbol][1]

    def _fetch_exit_quote(self, symbol: str, now: datetime) -> None:
        # A quote that cannot be had is remembered as None for its freshness window: the exit
        # then goes at market, with the reason in its decision, rather than not at all.
        self._exit_quotes[symbol] = (now, self._quote(symbol, "OPTION", now))

    def _fetch_chain(self, ctx: Context) -> None:
        try:
            self.option_data.fetch(ctx.ticker, ctx.recommendation.get("strategy"), (ctx.bar or {}).get("close"),
                                   self.clock.now(), self.params.current().params)
        except BrokerError as e:
            self._chain_errors[ctx.ticker] = f"{type(e).__name__}: {e}"

    def _gather_options(self, conn, ctx: Context, in_force: ParamsInForce, now: datetime) -> OptionInputs | None:
        """The chain and the IV percentile for an option entry, from the cache; None: fetch it first.

        An outage met while fetching becomes the recorded reason of the next decision on that ticker.
        """
        if self.option_data is None:
            return OptionInputs(None, error="no option market data configured")
        error = self._chain_errors.pop(ctx.ticker, None)
        if error is not None:
            return OptionInputs(None, error=error)
        spot = (ctx.bar or {}).get("close")
        return self.option_data.gather(conn, ctx.ticker, spot, now, in_force.params,
                                       strategy=ctx.recommendation.get("strategy"))

    def _params_columns(self, in_force: ParamsInForce) -> dict[str, Any]:
        return {"params_source": in_force.source, "params_version": in_force.version, "params_hash": in_force.content_hash}

    def _record_skip(self, conn, rec_id: int, decision: Decision, in_force: ParamsInForce, now: datetime) -> None:
        orders_repo.record_outcome(conn, **{
            "id": rec_id, "account_id": self.account_id, "status": "SKIPPED", "now": now, "worker": self.worker_id,
            "code": decision.code, "detail": decision.detail,
            "gates": jsonb(decision.gates_json()), "decision": jsonb(decision.info),
            **self._params_columns(in_force),
        })

    def _record_intent(self, conn, ctx: Context, decision: Decision, cid: str, in_force: ParamsInForce, now: datetime,
                       position_id: int | None) -> None:
        plan = decision.plan
        info = {**decision.info, "plan": {"instrument": plan.instrument, "symbol": plan.symbol, "side": plan.side,
                                          "qty": plan.qty, "est_price": plan.est_price, "notional": plan.notional}}
        orders_repo.record_intent(conn, **{
            "position_id": position_id, "recommendation_id": ctx.recommendation["id"], "account_id": self.account_id, "worker": self.worker_id,
            "now": now, "gates": jsonb(decision.gates_json()), "decision": jsonb(info),
            "leg": 0, "client_order_id": cid, "ticker": ctx.ticker, "instrument": plan.instrument,
            "symbol": plan.symbol, "side": plan.side, "position_intent": plan.position_intent, "qty": plan.qty,
            "multiplier": plan.multiplier, "est_price": plan.est_price, "notional": plan.notional,
            "position_side": plan.position_side, "opens_position": plan.opens_position,
            "order_type": plan.order_type, "limit_price": plan.limit_price, "attempt": 0,
            **self._option_columns(plan),
            **self._params_columns(in_force),
        })

    @staticmethod
    def _option_columns(plan) -> dict[str, Any]:
        option = plan.option or {}
        return {
            "strike": option.get("strike"), "expiration": option.get("expiration"),
            "option_right": option.get("right"),
            "premium": plan.est_price if plan.instrument == "OPTION" else None,
            "quote": jsonb(option["quote"]) if option.get("quote") else None,
            "greeks": jsonb(option["greeks"]) if option.get("greeks") else None,
            "option_gates": jsonb(option["gates"]) if option.get("gates") else None,
        }

    def _session_day(self, now: datetime):
        try:
            return self.calendar.current_or_previous_session(now).day
        except CalendarUnavailable:
            return et_date(now)

    def _trip(self, conn, reason: str, now: datetime) -> None:
        kill_switch.trip_daily_loss(conn, self.account_id, reason, now, self._session_day(now))

    # --- the order ------------------------------------------------------------------------

    def _submit(self, ctx: Context, decision: Decision, cid: str, now: datetime) -> Outcome:
        plan = decision.plan
        rec_id = ctx.recommendation["id"]
        order = OrderRequest(
            client_order_id=cid, symbol=plan.symbol, underlying=plan.underlying, instrument=plan.instrument,
            side=plan.side, qty=plan.qty, position_intent=plan.position_intent,
            order_type=plan.order_type, limit_price=plan.limit_price,
        )
        try:
            result = submit_exactly_once(self.broker, order)
        except BrokerRejected as e:
            self.record_broker_answer(cid, None, rejected=str(e))
            self._log_decision(ctx, "REJECTED", "BROKER_REJECTED", str(e))
            return Outcome(rec_id, "REJECTED", "BROKER_REJECTED", str(e), ctx.ticker, ctx.action)
        except BrokerUnavailable as e:
            # A timeout or 5xx may hide an order still on its way: left SUBMITTING, and recovery
            # asks the broker again. Never resubmitted under a new id.
            log.warning("order state unknown", extra={"recommendation_id": rec_id, "client_order_id": cid, "error": str(e)})
            return Outcome(rec_id, "SUBMITTING", "ORDER_STATE_UNKNOWN", str(e), ctx.ticker, ctx.action)
        status = self.record_broker_answer(cid, result)
        self.refresh_account(min_interval=FILL_REFRESH_SECONDS)
        code = "ORDER_FILLED" if result.is_filled else "ORDER_ACCEPTED"
        detail = f"{plan.side} {result.filled_qty or plan.qty} {plan.symbol} @ {result.filled_avg_price}"
        if decision.code == "ORDER_PLANNED_FALLBACK":
            detail += f" ({decision.info.get('fallback')})"
        self._log_decision(ctx, status, code, detail)
        return Outcome(rec_id, status, code, detail, ctx.ticker, ctx.action)

    def record_broker_answer(self, cid: str, result: OrderResult | None, *, rejected: str | None = None,
                             failed: str | None = None) -> str:
        """Apply the broker's answer (or its refusal, or a lookup that found nothing) to the order.

        The same path serves the answer to a submit, the trade-updates stream, a later poll and
        recovery, so a fill that arrives late closes an exit just as an immediate one does.
        Returns the recommendation's status after it.
        """
        if result is not None:
            event = Event.report(result.status, result.filled_qty, result.reject_reason)
            facts = BrokerFacts(result.broker_order_id, result.filled_avg_price, result.filled_at, result.reject_reason)
        elif rejected is not None:
            event, facts = Event(EventKind.BROKER_REFUSED, message=rejected), BrokerFacts(message=rejected)
        else:
            event, facts = Event(EventKind.NOT_FOUND, message=failed), BrokerFacts(message=failed)
        now = self.clock.now()
        with self.pool.connection() as conn, conn.transaction():
            applied = orders_repo.apply_event(conn, self.account_id, cid, event, facts, now)
        if isinstance(applied, Illegal):
            with self.pool.connection() as conn:
                row = conn.execute(queries.RECOMMENDATION_STATUS_BY_ORDER,
                                   {"account_id": self.account_id, "client_order_id": cid}).fetchone()
            return row["status"] if row else "UNKNOWN"
        return applied.transition.recommendation.value

    def on_trade_update(self, update: TradeUpdate) -> None:
        """A pushed trade update (Alpaca's stream, the simulated broker), applied through the same
        path as a submit's answer or a poll; polling still catches what a gap in the stream missed."""
        try:
            self.record_broker_answer(update.client_order_id, update.order)
        except LookupError:
            # Not one of ours: the broker-orders reconciliation judges it.
            log.warning("trade update for an order this database does not know",
                        extra={"client_order_id": update.client_order_id, "event": update.event})
        except Exception:
            log.exception("trade update not applied", extra={"client_order_id": update.client_order_id,
                                                             "event": update.event})

    def request_reconcile(self) -> None:
        """Ask the loop to poll the broker at its next pass (the stream was away: updates may be lost)."""
        self._last_reconcile = None

    # --- account state, recovery ----------------------------------------------------------

    def refresh_account(self, force: bool = False, min_interval: float | None = None) -> None:
        """Account snapshot and position marks from the broker, on a schedule and after fills.

        The trading API allows 200 requests a minute: this is the only place that asks for
        account and positions, never once per recommendation. A daily loss past the limit trips
        the kill switch here too, so it trips even when no recommendation arrives.
        """
        now = self.clock.now()
        in_force = self.params.current()
        every = timedelta(seconds=min_interval if min_interval is not None
                          else in_force.params.execution.account_refresh_seconds)
        if not force and self._last_refresh is not None and now - self._last_refresh < every:
            return
        try:
            snapshot = self.broker.get_account()
            positions = self.broker.get_positions()
        except BrokerError as e:
            log.warning("account refresh failed", extra={"account_id": self.account_id, "error": str(e)})
            return  # the stale account state will deny entries once it is too old
        self._last_refresh = now
        with self.pool.connection() as conn, conn.transaction():
            conn.execute(queries.UPSERT_ACCOUNT_STATE, {
                "account_id": self.account_id, "equity": snapshot.equity, "last_equity": snapshot.last_equity,
                "cash": snapshot.cash, "buying_power": snapshot.buying_power, "as_of": snapshot.as_of,
                "source": "paper" if self.broker.paper else "live",
            })
            orders_repo.mark_positions(conn, self.account_id,
                                       {p.symbol: p.current_price for p in positions if p.current_price is not None})
            self._reconcile_positions(conn, positions, now)
            result = check_daily_loss_limit({"equity": snapshot.equity, "last_equity": snapshot.last_equity},
                                            in_force.params)
            if result.code == "DAILY_LOSS_LIMIT":
                self._trip(conn, result.reason, now)
        if force or self._last_orders_reconcile is None or now - self._last_orders_reconcile >= RECONCILE_EVERY:
            self._last_orders_reconcile = now
            self.reconcile_broker_orders()

    def _reconcile_positions(self, conn, broker_positions, snapshot_at: datetime) -> None:
        """Compare our live positions with the broker's snapshot, taken at `snapshot_at`.

        One we hold OPEN that the broker no longer has (an option expired, was exercised or
        assigned; someone closed it by hand) is closed here, after a grace period that covers a
        fill not yet visible. One the broker has that we do not know is exposure the gates
        cannot see: new entries stop until an operator has looked.

        A snapshot is only as new as the moment it was asked for: a symbol with local activity
        since then (another dispatcher recorded an exit fill, an entry opened) is judged at the
        next refresh, not on a picture that predates it.
        """
        now = self.clock.now()
        since = snapshot_at - SNAPSHOT_SKEW
        held = {p.symbol for p in broker_positions if p.qty != 0}
        rows = conn.execute(queries.RECONCILE_POSITIONS, {"account_id": self.account_id, "since": since}).fetchall()
        ours = [p for p in rows if p["status"] in LIVE_POSITION]
        active_since = {p["symbol"] for p in rows if p["updated_at"] >= since}
        vanished = [p for p in ours if p["status"] == "OPEN" and p["symbol"] not in held
                    and p["symbol"] not in active_since and now - p["opened_at"] > IN_FLIGHT_GRACE]
        if vanished:
            closed = orders_repo.close_vanished(conn, self.account_id, [p["id"] for p in vanished], now)
            log.warning("positions gone at the broker closed", extra={
                "account_id": self.account_id, "symbols": [p["symbol"] for p in closed]})
        unknown = sorted(held - {p["symbol"] for p in ours} - active_since)
        if unknown:
            log.error("unknown broker positions", extra={"account_id": self.account_id, "symbols": unknown})
            kill_switch.restrict(conn, self.account_id,
                                 f"UNKNOWN_BROKER_POSITION: the broker holds {', '.join(unknown)}, which this database does not",
                                 "reconciliation", now, self._session_day(now))

    def recover_in_flight(self) -> int:
        """Resolve SUBMITTING recommendations whose dispatcher is gone, and poll working orders.

        Found: recorded as the broker has it. Not found: nothing was placed, recorded FAILED
        once the grace period has passed. The broker unreachable: left for the next pass. Never
        resubmitted. One order's error is logged against it and the others go on.
        """
        with self.pool.connection() as conn:
            rows = self._mine_to_ask(conn, conn.execute(
                queries.IN_FLIGHT, {"account_id": self.account_id, "worker": self.worker_id}).fetchall())
        resolved = 0
        for row in rows:
            try:
                resolved += self._resolve_in_flight(row)
            except (psycopg.OperationalError, psycopg.InterfaceError):
                raise
            except Exception:
                log.exception("in-flight order not resolved", extra={
                    "recommendation_id": row["recommendation_id"], "client_order_id": row["client_order_id"]})
        with self.pool.connection() as conn:
            unfilled = self._mine_to_ask(conn, conn.execute(queries.UNFILLED, {"account_id": self.account_id}).fetchall())
        for row in unfilled:
            try:
                found = self.broker.get_order_by_client_id(row["client_order_id"])
                if found is not None:
                    self.record_broker_answer(row["client_order_id"], found)
            except BrokerError:
                continue
            except (psycopg.OperationalError, psycopg.InterfaceError):
                raise
            except Exception:
                log.exception("working order not polled", extra={"client_order_id": row["client_order_id"]})
        return resolved

    def _mine_to_ask(self, conn, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The orders this process asks the broker about now: one process per order per interval,
        so several dispatchers do not spend the account's request budget on the same lookup."""
        mine = request_budget.claim_lookups(conn, self.account_id, [r["client_order_id"] for r in rows],
                                            self.clock.now())
        return [r for r in rows if r["client_order_id"] in mine]

    def _resolve_in_flight(self, row: dict[str, Any]) -> int:
        try:
            found = self.broker.get_order_by_client_id(row["client_order_id"])
        except BrokerError as e:
            log.warning("reconcile lookup failed", extra={"client_order_id": row["client_order_id"], "error": str(e)})
            return 0
        if found is None:
            if self.clock.now() - row["submitted_at"] < IN_FLIGHT_GRACE:
                return 0  # an order sent moments ago may not be visible yet: ask again later
            self.record_broker_answer(row["client_order_id"], None,
                                      failed="ORDER_NOT_PLACED: the broker has no such order "
                                             f"{IN_FLIGHT_GRACE.total_seconds():.0f} s after it was sent")
        else:
            self.record_broker_answer(row["client_order_id"], found)
        log.info("reconciled in-flight order", extra={"recommendation_id": row["recommendation_id"],
                                                      "client_order_id": row["client_order_id"],
                                                      "found": found is not None})
        return 1

    def reconcile_broker_orders(self, lookback: timedelta = timedelta(days=1)) -> int:
        """Record the broker's recent orders that this database does not know, and stop new entries.

        Our orders are recorded before they are sent, so an unknown order came from elsewhere
        (a restored database, a manual trade on the account): its exposure is invisible to the
        gates, so the account goes to REDUCING until an operator has looked and resumes.
        """
        now = self.clock.now()
        try:
            orders = self.broker.list_orders_since(now - lookback)
        except BrokerError as e:
            # Not swallowed: orders_reconciled_at stops moving, and entries stop once it is too old.
            log.warning("broker order reconciliation failed", extra={"account_id": self.account_id, "error": str(e)})
            return 0
        rows = [{"broker_order_id": o.broker_order_id, "client_order_id": o.client_order_id, "symbol": o.symbol,
                 "side": o.side, "qty": o.qty, "status": o.status, "submitted_at": o.submitted_at} for o in orders]
        with self.pool.connection() as conn, conn.transaction():
            conn.execute(queries.ORDERS_RECONCILED, {"account_id": self.account_id, "now": now})
            unknown = conn.execute(queries.RECORD_UNKNOWN_ORDERS, {
                "account_id": self.account_id, "now": now, "orders": jsonb(rows)}).fetchall()
            if unknown:
                symbols = ", ".join(f"{u['side']} {u['qty']} {u['symbol']}" for u in unknown)
                kill_switch.restrict(conn, self.account_id,
                                     f"UNKNOWN_BROKER_ORDER: the broker has {len(unknown)} order(s) this database "
                                     f"does not: {symbols}", "reconciliation", now, self._session_day(now))
        for u in unknown:
            log.error("unknown broker order", extra={"account_id": self.account_id, **u})
        return len(unknown)

    def _log_decision(self, ctx: Context, status: str, code: str, detail: str) -> None:
        level = logging.INFO if status == "EXECUTED" else logging.WARNING
        log.log(level, "decision", extra={
            "decision": status, "code": code, "detail": detail, "recommendation_id": ctx.recommendation["id"],
            "account_id": self.account_id, "ticker": ctx.ticker, "action": ctx.action,
            "instrument": ctx.recommendation.get("instrument"),
        })

    # --- the loop -------------------------------------------------------------------------

    def drain(self, stop: threading.Event | None = None, limit: int | None = None) -> list[Outcome]:
        """Decide pending recommendations until none is left (or `stop`, or `limit`)."""
        outcomes: list[Outcome] = []
        while not (stop and stop.is_set()) and (limit is None or len(outcomes) < limit):
            outcome = self.process_next()
            if outcome is None:
                break
            outcomes.append(outcome)
        return outcomes

    def run_forever(self, conninfo: str, stop: threading.Event) -> None:
        """LISTEN for new recommendations, poll as the fallback, survive a database restart."""
        backoff = 0.5
        listener: psycopg.Connection | None = None
        while not stop.is_set():
            try:
                if listener is None or listener.closed:
                    listener = psycopg.connect(conninfo, autocommit=True,
                                               application_name=f"ops-dispatcher:{self.worker_id}:listen"[:63])
                    listener.execute(f"LISTEN {queries.NOTIFY_CHANNEL}")
                    self.recover_in_flight()
                self.refresh_account()
                self.drain(stop)
                self._periodic()
                backoff = 0.5
                self._wait_for_work(listener, stop)
            except (psycopg.OperationalError, psycopg.InterfaceError) as e:
                log.error("database unavailable; retrying", extra={"error": str(e), "backoff_s": backoff})
                if listener is not None:
                    listener.close()
                listener = None
                stop.wait(backoff)
                backoff = min(backoff * 2, 30)
            except Exception:  # a bug outside any one recommendation: logged, and the loop goes on
                log.exception("dispatcher pass failed; retrying", extra={"backoff_s": backoff})
                stop.wait(backoff)
                backoff = min(backoff * 2, 30)
        if listener is not None:
            listener.close()

    def _wait_for_work(self, listener: psycopg.Connection, stop: threading.Event) -> None:
        """Until a NOTIFY, the poll interval, or `stop`, whichever comes first."""
        poll = self.params.current().params.execution.poll_interval_seconds
        deadline = time.monotonic() + poll
        while not stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            # Short slices so a SIGTERM is seen within a quarter second.
            if any(True for _ in listener.notifies(timeout=min(remaining, 0.25), stop_after=1)):
                return

    def _periodic(self) -> None:
        now = self.clock.now()
        if self._last_reconcile is None or now - self._last_reconcile >= RECONCILE_EVERY:
            self._last_reconcile = now
            self.recover_in_flight()
        self.reprice_working()

    # --- limit orders: cancel, re-price, give up ------------------------------------------

    def reprice_working(self) -> int:
        """Limit orders unfilled past `reprice_after_seconds`: canceled and sent again at a more
        aggressive price, up to `max_reprices` attempts, then canceled for good.

        The reason of each cancel is committed before the cancel is sent, and each new attempt's
        intent before it is sent, so a crash at any step is finished by the next pass (of this
        process or another): no attempt is lost, none is sent twice. Returns the orders acted on.
        """
        now = self.clock.now()
        execution = self.params.current().params.execution
        with self.pool.connection() as conn:
            working = orders_repo.working_limit_orders(conn, self.account_id)
        acted = sum(self._guarded(self._reprice, row, now, execution) for row in working)
        with self.pool.connection() as conn:
            waiting = orders_repo.awaiting_replacement(conn, self.account_id)
        return acted + sum(self._guarded(self._send_next_attempt, row, now) for row in waiting)

    def _guarded(self, step: Callable[..., int], row: dict[str, Any], *args: Any) -> int:
        """One order's step; its failure is logged against it and the others go on."""
        try:
            return step(row, *args)
        except (psycopg.OperationalError, psycopg.InterfaceError):
            raise
        except BrokerError as e:
            log.warning("order step failed at the broker", extra={"client_order_id": row.get("client_order_id"),
                                                                   "recommendation_id": row["recommendation_id"],
                                                                   "error": str(e)})
        except Exception:
            log.exception("order step failed", extra={"recommendation_id": row["recommendation_id"]})
        return 0

    def _reprice(self, row: dict[str, Any], now: datetime, execution) -> int:
        cid = row["client_order_id"]
        if row["cancel_reason"] is None:
            tick = option_tick if row["instrument"] == "OPTION" else stock_tick
            quote = self._quote(row["symbol"], row["instrument"], now)
            step = next_attempt(row["attempt"], row["submitted_at"], now, quote, execution, side=row["side"], tick=tick)
            if isinstance(step, Wait):
                return 0
            reason = CancelReason.REPRICE if isinstance(step, Replace) else CancelReason.GIVE_UP
            price = step.price if isinstance(step, Replace) else None
            with self.pool.connection() as conn:
                if not orders_repo.request_cancel(conn, self.account_id, cid, reason, price, now):
                    return 0  # another dispatcher took it, or it filled meanwhile
            log.info("limit order canceled to re-price" if price else "limit order given up", extra={
                "client_order_id": cid, "recommendation_id": row["recommendation_id"], "attempt": row["attempt"],
                "new_limit_price": price, "reason": getattr(step, "reason", None)})
        elif now - row["updated_at"] < timedelta(seconds=execution.reprice_after_seconds):
            return 0  # its cancel went out moments ago: the answer (stream or poll) will come
        after = self.broker.cancel_order(cid)
        if after is not None:
            self.record_broker_answer(cid, after)  # canceled (replaced or ended) or, if it raced, filled
        return 1

    def _send_next_attempt(self, row: dict[str, Any], now: datetime) -> int:
        cid = client_order_id(self.account_id, row["recommendation_id"], row["leg"], row["attempt"] + 1)
        with self.pool.connection() as conn, conn.transaction():
            intent = orders_repo.record_next_attempt(conn, row["id"], cid, now)
        if intent is None:
            return 0  # another dispatcher recorded (and sends) it
        order = OrderRequest(
            client_order_id=cid, symbol=intent["symbol"], underlying=intent["ticker"],
            instrument=intent["instrument"], side=intent["side"], qty=int(intent["qty"]),
            position_intent=intent["position_intent"], order_type="limit", limit_price=intent["limit_price"],
        )
        try:
            result = submit_exactly_once(self.broker, order)
        except BrokerRejected as e:
            self.record_broker_answer(cid, None, rejected=str(e))
            return 1
        except BrokerUnavailable as e:
            log.warning("order state unknown", extra={"recommendation_id": row["recommendation_id"],
                                                      "client_order_id": cid, "error": str(e)})
            return 1
        self.record_broker_answer(cid, result)
        return 1

    def _quote(self, symbol: str, instrument: str, now: datetime) -> Quote | None:
        if self.quotes is None:
            return None
        try:
            return self.quotes(symbol, instrument, now)
        except BrokerError as e:
            log.warning("quote unavailable", extra={"symbol": symbol, "error": str(e)})
            return None


# --- process wiring ------------------------------------------------------------------------


def build_broker(pool: ConnectionPool, account_id: str, clock: Clock, in_force: ParamsInForce) -> Broker:
    """The simulated paper broker by default; Alpaca when OPS_BROKER=alpaca."""
    kind = os.environ.get("OPS_BROKER", "sim")
    if kind == "alpaca":
        from services.common.settings import load_settings, trading_mode
        from services.adapters.alpaca.client import AlpacaBroker, postgres_trading_budget
        from services.adapters.alpaca.settings import AlpacaSettings

        mode, reason = trading_mode(load_settings(), in_force.params)
        # Live needs both keys (environment and params) and the adapter not pinned to paper:
        # any one of them saying paper means paper.
        alpaca = AlpacaSettings()
        settings = alpaca.model_copy(update={"paper": alpaca.paper or mode != "live"})
        if mode == "live" and settings.paper:
            mode, reason = "paper", "PAPER: ALPACA_PAPER is true"
        log.warning("trading mode", extra={"mode": mode, "reason": reason})
        # Alpaca's 200 requests a minute are the account's: every dispatcher spends one budget.
        budget = postgres_trading_budget(settings, pool.conninfo, account_id) if pool is not None else None
        return AlpacaBroker(settings, clock=clock, budget=budget)
    if kind != "sim":
        raise SystemExit(f"OPS_BROKER must be 'sim' or 'alpaca', got {kind!r}")
    log.info("trading mode", extra={"mode": "paper", "reason": "simulated paper broker"})
    return SimBroker(pool, account_id, clock, slippage_bps=in_force.params.execution.slippage_bps)


def params_provider():
    """The params in force: SSM when configured, else the reviewed file; reloaded on an interval."""
    from services.adapters.params_source import provider_from_settings
    from services.common.settings import load_settings

    return provider_from_settings(load_settings())


def log_startup(dispatcher: Dispatcher) -> None:
    in_force = dispatcher.params.current()
    p = in_force.params
    log.info("params in force", extra={"source": in_force.source, "version": in_force.version, "hash": in_force.content_hash})
    for name, limit in [
        ("daily_loss", f"max_daily_loss={p.risk.max_daily_loss}"),
        ("max_positions", f"max_open_positions={p.risk.max_open_positions}"),
        ("max_exposure", f"max_notional_exposure={p.risk.max_notional_exposure}"),
        ("trading_hours", f"blocked first {p.trading_hours.block_after_open_minutes}m and last {p.trading_hours.block_before_close_minutes}m"),
        ("ticker_cooldown", f"{p.risk.ticker_cooldown_minutes}m"),
        ("ticker_trades_today", f"max {p.risk.max_trades_per_ticker_per_day}"),
        ("asset", "ticker well-formed; broker asset active, tradable (shortable for a short sale), cached per session"),
        ("option_liquidity", f"spread<={p.options.max_option_spread} volume>={p.options.min_option_volume} "
                             f"oi>={p.options.min_open_interest} iv_pct<={p.options.max_iv_percentile}"),
    ]:
        log.info("gate", extra={"gate": name, "limit": limit})


def run_dispatcher(once: bool = False) -> int:
    from services.common.db import database_url, make_pool
    from services.common.migrate import migrate_when_ready

    url = database_url()
    migrate_when_ready(url)
    account_id = os.environ.get("ACCOUNT_ID", "paper-main")
    worker_id = new_worker_id()
    pool = make_pool(url, min_size=1, max_size=2, application_name=f"ops-dispatcher:{worker_id}"[:63], check=False)
    provider = params_provider()
    clock = SystemClock()
    broker = build_broker(pool, account_id, clock, provider.current())
    option_data, quotes = build_market(broker)
    dispatcher = Dispatcher(pool, broker, provider, account_id, clock=clock, worker_id=worker_id,
                            option_data=option_data, quotes=quotes)
    log_startup(dispatcher)
    stop = threading.Event()

    def on_stop(*_: Any) -> None:
        stop.set()
        # The recommendation in hand gets this long to finish; past it, its order is left
        # SUBMITTING for recovery. Within ECS's 30 s stop timeout with the request in flight.
        if hasattr(broker, "set_deadline"):
            broker.set_deadline(time.monotonic() + SHUTDOWN_BUDGET_SECONDS)

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    stop_updates = (lambda: None) if once else start_trade_updates(dispatcher, broker)
    try:
        if once:
            dispatcher.recover_in_flight()
            dispatcher.refresh_account(force=True)
            outcomes = dispatcher.drain(stop)
            log.info("dispatcher pass done", extra={"decided": len(outcomes)})
        else:
            dispatcher.run_forever(url, stop)
    finally:
        stop_updates()
        pool.close()
    return 0


def start_trade_updates(dispatcher: Dispatcher, broker: Broker) -> Callable[[], None]:
    """Feed the broker's pushed trade updates to the dispatcher; returns the function that stops them.

    Alpaca: the trade_updates websocket, reconnecting with backoff; after each (re)connection the
    loop polls what the gap may have missed. Simulated broker: its in-process events.
    """
    if isinstance(broker, SimBroker):
        return broker.subscribe(dispatcher.on_trade_update)
    from services.adapters.alpaca.stream import TradeUpdateStream

    stream = TradeUpdateStream(broker.settings, dispatcher.on_trade_update, on_connect=dispatcher.request_reconcile)
    stream.start()
    return stream.stop


def build_market(broker: Broker):
    """Option chains and quotes: Alpaca's data API with the Alpaca broker, the simulated market with the simulated one."""
    from services.adapters.option_data import OptionData

    if isinstance(broker, SimBroker):
        from services.adapters.sim.market import SimOptionMarket

        return OptionData(SimOptionMarket(broker.pool).chain, remote=False), broker.quote
    from services.adapters.alpaca.client import AlpacaMarketData

    market = AlpacaMarketData(broker.settings, trading_client=broker.trading_client)

    def quote(symbol: str, instrument: str, now: datetime) -> Quote | None:
        # Stocks go at market by default; a stock limit order with no quote source is given up
        # at its re-pricing time rather than re-priced blind.
        if instrument != "OPTION":
            return None
        found = market.option_quotes([symbol]).get(symbol)
        return Quote(found.bid, found.ask) if found is not None else None

    option_data = OptionData(lambda ticker, spot, now, window: market.option_chain(
        ticker, expiration_gte=window[0] if window else None, expiration_lte=window[1] if window else None))
    return option_data, quote

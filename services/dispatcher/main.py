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

import json
import logging
import os
import signal
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

from services.common.clock import Clock, SystemClock
from services.common.logs import json_default
from services.common.market_calendar import CalendarUnavailable, SessionCalendar, et_date, et_day_bounds, nyse_calendar
from services.common.params import ParamsInForce
from services.dispatcher import kill_switch, queries
from services.dispatcher.broker import (
    Broker,
    BrokerError,
    BrokerRejected,
    BrokerUnavailable,
    OrderRequest,
    OrderResult,
    client_order_id,
    submit_exactly_once,
)
from services.dispatcher.decision import (
    Context,
    Decision,
    OptionInputs,
    decide,
    exit_unavailable,
    is_option_entry,
    live_trading_check,
    recheck_capacity,
)
from services.dispatcher.risk.gates import check_daily_loss_limit
from services.dispatcher.sim_broker import SimBroker

log = logging.getLogger("dispatcher")

TERMINAL = ("EXECUTED", "SKIPPED", "REJECTED", "FAILED")
# After a fill the account is refreshed, but at most this often: two trading-API requests a
# refresh against a budget of 200 a minute.
FILL_REFRESH_SECONDS = 1.0
# An order the broker does not show this long after it was sent was not placed.
IN_FLIGHT_GRACE = timedelta(minutes=2)
_BROKER_STATUS = {
    "filled": "FILLED",
    "partially_filled": "PARTIALLY_FILLED",
    "rejected": "REJECTED",
    "canceled": "CANCELED",
    "expired": "CANCELED",
    "done_for_day": "CANCELED",
}


def jsonb(value: Any) -> Jsonb:
    return Jsonb(value, dumps=lambda v: json.dumps(v, default=json_default))


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
    ):
        self.pool = pool
        self.broker = broker
        self.params = params
        self.account_id = account_id
        self.clock = clock or SystemClock()
        self._calendar = calendar
        self.worker_id = worker_id or new_worker_id()
        self.option_data = option_data
        self._last_refresh: datetime | None = None
        self._last_reconcile: datetime | None = None

    @property
    def calendar(self) -> SessionCalendar:
        return self._calendar or nyse_calendar()

    # --- one recommendation ---------------------------------------------------------------

    def process_next(self) -> Outcome | None:
        """Decide the oldest pending recommendation; None when there is none."""
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
                decision = decide(ctx, in_force.params, now, self._calendar, option_inputs)
                decision = live_trading_check(decision, not self.broker.paper, in_force.params)
                if decision.is_order and decision.plan.opens_position:
                    conn.execute(queries.CAPACITY_LOCK, {"account_id": self.account_id})
                    fresh = conn.execute(
                        queries.CAPACITY_RECHECK, {"account_id": self.account_id, "ticker": ctx.ticker}
                    ).fetchone()
                    decision = recheck_capacity(decision, ctx, fresh, in_force.params)
                elif decision.is_order:
                    # An exit takes its position, under the row lock, or finds another exit has.
                    taken = conn.execute(queries.MARK_CLOSING, {"account_id": self.account_id,
                                                                "ticker": ctx.ticker}).fetchone()
                    if taken is None:
                        decision = exit_unavailable(decision, "CLOSING")
                cid = client_order_id(self.account_id, rec_id)
                if decision.is_order:
                    self._record_intent(conn, ctx, decision, cid, in_force, now)
                else:
                    self._record_skip(conn, rec_id, decision, in_force, now)
                    loss = next((g.result for g in decision.gates if g.result.code == "DAILY_LOSS_LIMIT"), None)
                    if loss is not None:  # whichever gate failed first, the loss trips the switch
                        self._trip(conn, loss.reason, now)
        except (psycopg.OperationalError, psycopg.InterfaceError):
            raise  # the database is down: the loop backs off; nothing was committed
        except Exception as e:  # a bug or bad data: recorded, rolled back, and the loop goes on
            log.exception("decision failed", extra={"recommendation_id": rec_id, "account_id": self.account_id})
            if rec_id is None:
                raise
            self._mark_failed(rec_id, "DECISION_ERROR", f"DECISION_ERROR: {type(e).__name__}: {e}", now)
            return Outcome(rec_id, "FAILED", "DECISION_ERROR", str(e))

        assert ctx is not None and decision is not None
        if not decision.is_order:
            self._log_decision(ctx, "SKIPPED", decision.code, decision.detail)
            return Outcome(rec_id, "SKIPPED", decision.code, decision.detail, ctx.ticker, ctx.action)
        return self._submit(ctx, decision, cid, now)

    def _context(self, conn: psycopg.Connection, row: dict[str, Any], now: datetime) -> Context:
        bar = None
        if row["bar_ts_latest"] is not None:
            bar = {"ts": row["bar_ts_latest"], "open": row["bar_open"], "high": row["bar_high"],
                   "low": row["bar_low"], "close": row["bar_close"], "volume": row["bar_volume"]}
        account = None
        if row["equity"] is not None:
            account = {"equity": row["equity"], "last_equity": row["last_equity"], "as_of": row["account_as_of"]}
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
        )

    def _gather_options(self, conn, ctx: Context, in_force: ParamsInForce, now: datetime) -> OptionInputs:
        """The chain and the IV percentile for an option entry; an outage becomes a recorded reason."""
        if self.option_data is None:
            return OptionInputs(None, error="no option market data configured")
        spot = (ctx.bar or {}).get("close")
        try:
            return self.option_data.gather(conn, ctx.ticker, spot, now, in_force.params)
        except BrokerError as e:
            return OptionInputs(None, error=f"{type(e).__name__}: {e}")

    def _params_columns(self, in_force: ParamsInForce) -> dict[str, Any]:
        return {"params_source": in_force.source, "params_version": in_force.version, "params_hash": in_force.content_hash}

    def _record_skip(self, conn, rec_id: int, decision: Decision, in_force: ParamsInForce, now: datetime) -> None:
        conn.execute(queries.RECORD_OUTCOME, {
            "id": rec_id, "account_id": self.account_id, "status": "SKIPPED", "now": now, "worker": self.worker_id,
            "code": decision.code, "detail": decision.detail,
            "gates": jsonb(decision.gates_json()), "decision": jsonb(decision.info),
            **self._params_columns(in_force),
        })

    def _record_intent(self, conn, ctx: Context, decision: Decision, cid: str, in_force: ParamsInForce, now: datetime) -> None:
        plan = decision.plan
        info = {**decision.info, "plan": {"instrument": plan.instrument, "symbol": plan.symbol, "side": plan.side,
                                          "qty": plan.qty, "est_price": plan.est_price, "notional": plan.notional}}
        conn.execute(queries.RECORD_INTENT, {
            "recommendation_id": ctx.recommendation["id"], "account_id": self.account_id, "worker": self.worker_id,
            "now": now, "gates": jsonb(decision.gates_json()), "decision": jsonb(info),
            "leg": 0, "client_order_id": cid, "ticker": ctx.ticker, "instrument": plan.instrument,
            "symbol": plan.symbol, "side": plan.side, "position_intent": plan.position_intent, "qty": plan.qty,
            "multiplier": plan.multiplier, "est_price": plan.est_price, "notional": plan.notional,
            "position_side": plan.position_side, "opens_position": plan.opens_position,
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

    def _mark_failed(self, rec_id: int, code: str, detail: str, now: datetime) -> None:
        with self.pool.connection() as conn:
            conn.execute(
                """UPDATE dispatch_recommendations
                   SET status = 'FAILED', decided_at = %(now)s, outcome_code = %(code)s, outcome_detail = %(detail)s,
                       claimed_by = %(worker)s
                   WHERE id = %(id)s AND account_id = %(account_id)s AND status IN ('PENDING', 'SUBMITTING')""",
                {"now": now, "code": code, "detail": detail[:2000], "worker": self.worker_id,
                 "id": rec_id, "account_id": self.account_id},
            )

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
        """Execution, position and the recommendation's status from the broker's answer, in one transaction.

        The same path serves the answer to a submit, a later poll, and recovery, so a fill that
        arrives late closes an exit just as an immediate one does.
        """
        now = self.clock.now()
        with self.pool.connection() as conn, conn.transaction():
            return self._apply_answer(conn, cid, result, rejected, failed, now)

    def _apply_answer(self, conn, cid: str, result: OrderResult | None, rejected: str | None,
                      failed: str | None, now: datetime) -> str:
        if result is not None:
            exec_status = _BROKER_STATUS.get(result.status, "ACCEPTED")
            message = result.reject_reason
        else:
            exec_status = "REJECTED" if rejected else "FAILED"
            message = rejected or failed
        filled = result.filled_qty if result is not None and result.filled_qty else Decimal(0)
        price = result.filled_avg_price if result is not None else None
        ex = conn.execute(queries.UPDATE_EXECUTION, {
            "account_id": self.account_id, "client_order_id": cid, "status": exec_status, "now": now,
            "broker_order_id": result.broker_order_id if result else None,
            "filled_qty": filled or None, "filled_avg_price": price,
            "message": message, "filled_at": result.filled_at if result else None,
        }).fetchone()
        if ex is None:
            raise RuntimeError(f"no execution row for client_order_id {cid}")
        args = {"account_id": self.account_id, "execution_id": ex["id"], "now": now, "ticker": ex["ticker"]}
        ended = exec_status in ("REJECTED", "CANCELED", "FAILED")
        if ex["opens_position"]:
            if exec_status == "FILLED" or (ended and filled > 0):
                # Shares bought before a cancel are held: the position opens with what filled.
                conn.execute(queries.OPEN_POSITION, {**args, "qty": filled, "price": price})
            elif ended:
                conn.execute(queries.RELEASE_POSITION, args)
        elif exec_status == "FILLED":
            conn.execute(queries.CLOSE_POSITION, {**args, "price": price})
        elif ended:
            conn.execute(queries.REOPEN_POSITION, {**args, "filled": filled, "price": price})
        if exec_status == "FILLED":
            rec_status, code = "EXECUTED", "ORDER_FILLED"
        elif exec_status in ("ACCEPTED", "PARTIALLY_FILLED"):
            rec_status, code = "EXECUTED", "ORDER_ACCEPTED" if exec_status == "ACCEPTED" else "ORDER_PARTIALLY_FILLED"
        elif ended and filled > 0:
            rec_status, code = "EXECUTED", "ORDER_PARTIALLY_FILLED"
        else:
            rec_status, code = {"REJECTED": ("REJECTED", "BROKER_REJECTED"), "CANCELED": ("REJECTED", "ORDER_CANCELED"),
                                "FAILED": ("FAILED", "ORDER_NOT_PLACED")}[exec_status]
        # SUBMITTING, or a later answer for an order first recorded as accepted.
        conn.execute(
            """UPDATE dispatch_recommendations
               SET status = %(status)s, decided_at = coalesce(decided_at, %(now)s), outcome_code = %(code)s,
                   outcome_detail = %(detail)s
               WHERE id = %(id)s AND account_id = %(account_id)s
                 AND (status = 'SUBMITTING' OR (status = 'EXECUTED' AND outcome_code IN ('ORDER_ACCEPTED', 'ORDER_PARTIALLY_FILLED')))""",
            {"status": rec_status, "now": now, "code": code, "id": ex["recommendation_id"],
             "account_id": self.account_id,
             "detail": message or (f"{result.status} {result.filled_qty} @ {result.filled_avg_price}" if result else None)},
        )
        return rec_status

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
            marked = [p for p in positions if p.current_price is not None]
            conn.execute(queries.MARK_POSITIONS, {"account_id": self.account_id,
                                                  "symbols": [p.symbol for p in marked],
                                                  "prices": [p.current_price for p in marked]})
            self._reconcile_positions(conn, positions, now)
            result = check_daily_loss_limit({"equity": snapshot.equity, "last_equity": snapshot.last_equity},
                                            in_force.params)
            if result.code == "DAILY_LOSS_LIMIT":
                self._trip(conn, result.reason, now)

    def _reconcile_positions(self, conn, broker_positions, now: datetime) -> None:
        """Compare our live positions with the broker's.

        One we hold OPEN that the broker no longer has (an option expired, was exercised or
        assigned; someone closed it by hand) is closed here, after a grace period that covers a
        fill not yet visible. One the broker has that we do not know is exposure the gates
        cannot see: new entries stop until an operator has looked.
        """
        held = {p.symbol for p in broker_positions if p.qty != 0}
        ours = conn.execute(queries.LIVE_POSITIONS, {"account_id": self.account_id}).fetchall()
        vanished = [p for p in ours if p["status"] == "OPEN" and p["symbol"] not in held
                    and now - p["opened_at"] > IN_FLIGHT_GRACE]
        if vanished:
            conn.execute(queries.CLOSE_VANISHED, {"account_id": self.account_id, "now": now,
                                                  "ids": [p["id"] for p in vanished]})
            log.warning("positions gone at the broker closed", extra={
                "account_id": self.account_id, "symbols": [p["symbol"] for p in vanished]})
        unknown = sorted(held - {p["symbol"] for p in ours})
        if unknown:
            log.error("unknown broker positions", extra={"account_id": self.account_id, "symbols": unknown})
            kill_switch.restrict(conn, self.account_id,
                                 f"UNKNOWN_BROKER_POSITION: the broker holds {', '.join(unknown)}, which this database does not",
                                 "reconciliation", now, self._session_day(now))

    def recover_in_flight(self) -> int:
        """Resolve SUBMITTING recommendations whose dispatcher is gone: ask the broker, record its answer.

        Found: recorded as the broker has it. Not found: nothing was placed, recorded FAILED.
        The broker unreachable: left for the next pass. Never resubmitted.
        """
        with self.pool.connection() as conn:
            rows = conn.execute(queries.IN_FLIGHT, {"account_id": self.account_id, "worker": self.worker_id}).fetchall()
        resolved = 0
        for row in rows:
            try:
                found = self.broker.get_order_by_client_id(row["client_order_id"])
            except BrokerError as e:
                log.warning("reconcile lookup failed", extra={"client_order_id": row["client_order_id"], "error": str(e)})
                continue
            if found is None:
                if self.clock.now() - row["submitted_at"] < IN_FLIGHT_GRACE:
                    continue  # an order sent moments ago may not be visible yet: ask again later
                self.record_broker_answer(row["client_order_id"], None,
                                          failed="ORDER_NOT_PLACED: the broker has no such order "
                                                 f"{IN_FLIGHT_GRACE.total_seconds():.0f} s after it was sent")
            else:
                self.record_broker_answer(row["client_order_id"], found)
            log.info("reconciled in-flight order", extra={"recommendation_id": row["recommendation_id"],
                                                          "client_order_id": row["client_order_id"],
                                                          "found": found is not None})
            resolved += 1
        self.reconcile_broker_orders()
        with self.pool.connection() as conn:
            unfilled = conn.execute(queries.UNFILLED, {"account_id": self.account_id}).fetchall()
        for row in unfilled:
            try:
                found = self.broker.get_order_by_client_id(row["client_order_id"])
            except BrokerError:
                continue
            if found is not None and found.status not in ("new", "accepted", "pending_new"):
                self.record_broker_answer(row["client_order_id"], found)
        return resolved

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
            log.warning("broker order reconciliation failed", extra={"account_id": self.account_id, "error": str(e)})
            return 0
        rows = [{"broker_order_id": o.broker_order_id, "client_order_id": o.client_order_id, "symbol": o.symbol,
                 "side": o.side, "qty": o.qty, "status": o.status, "submitted_at": o.submitted_at} for o in orders]
        with self.pool.connection() as conn, conn.transaction():
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
        if self._last_reconcile is None or now - self._last_reconcile >= timedelta(seconds=30):
            self._last_reconcile = now
            self.recover_in_flight()


# --- process wiring ------------------------------------------------------------------------


def build_broker(pool: ConnectionPool, account_id: str, clock: Clock, in_force: ParamsInForce) -> Broker:
    """The simulated paper broker by default; Alpaca when OPS_BROKER=alpaca."""
    kind = os.environ.get("OPS_BROKER", "sim")
    if kind == "alpaca":
        from services.common.settings import load_settings, trading_mode
        from services.dispatcher.alpaca.client import AlpacaBroker, postgres_trading_budget
        from services.dispatcher.alpaca.settings import AlpacaSettings

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
    from services.common.params_source import provider_from_settings
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
        ("option_liquidity", f"spread<={p.options.max_option_spread} volume>={p.options.min_option_volume} "
                             f"oi>={p.options.min_open_interest} iv_pct<={p.options.max_iv_percentile}"),
    ]:
        log.info("gate", extra={"gate": name, "limit": limit})


def run_dispatcher(once: bool = False) -> int:
    from services.common.db import database_url, make_pool
    from services.common.migrate import migrate

    url = database_url()
    migrate(url)
    account_id = os.environ.get("ACCOUNT_ID", "paper-main")
    worker_id = new_worker_id()
    pool = make_pool(url, min_size=1, max_size=2, application_name=f"ops-dispatcher:{worker_id}"[:63], check=False)
    provider = params_provider()
    clock = SystemClock()
    broker = build_broker(pool, account_id, clock, provider.current())
    dispatcher = Dispatcher(pool, broker, provider, account_id, clock=clock, worker_id=worker_id,
                            option_data=build_option_data(broker))
    log_startup(dispatcher)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        if once:
            dispatcher.recover_in_flight()
            dispatcher.refresh_account(force=True)
            outcomes = dispatcher.drain(stop)
            log.info("dispatcher pass done", extra={"decided": len(outcomes)})
        else:
            dispatcher.run_forever(url, stop)
    finally:
        pool.close()
    return 0


def build_option_data(broker: Broker):
    """Option chains from Alpaca's data API with the Alpaca broker; the simulated chain with the simulated broker."""
    from services.dispatcher.option_data import OptionData

    if isinstance(broker, SimBroker):
        from services.sim_market import SimOptionMarket

        return OptionData(SimOptionMarket(broker.pool).chain)
    from services.dispatcher.alpaca.client import AlpacaMarketData

    market = AlpacaMarketData(broker.settings, trading_client=broker.trading_client)
    return OptionData(lambda ticker, spot, now: market.option_chain(ticker))


def register(subparsers) -> None:
    p = subparsers.add_parser("dispatcher", help="decide and execute pending recommendations")
    p.add_argument("--once", action="store_true", help="decide what is pending, then exit")
    p.set_defaults(handler=lambda args: run_dispatcher(once=args.once))


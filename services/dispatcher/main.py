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
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool

from services.common import metrics
from services.common.clock import Clock, SystemClock
from services.common.market_calendar import CalendarUnavailable, SessionCalendar, et_date, et_day_bounds, nyse_calendar
from services.common.params import ACCOUNT_REFRESH_DEFER_SECONDS, ParamsInForce
from services.adapters.assets import MISSING as MISSING_ASSET
from services.adapters.assets import AssetCache
from services.adapters import alerts
from services.adapters.postgres import claims, exits_repo, kill_switch, orders_repo, queries
from services.adapters.postgres.asset_records import AssetRecordStore
from services.adapters.postgres.orders_repo import jsonb
from services.dispatcher.execution import OrderDesk
from services.dispatcher.reconciliation import RECONCILE_EVERY, Reconciler
from services.dispatcher.risk.gates import AssetUnavailable
from services.dispatcher.wiring import build_broker, build_market, log_startup, params_provider, start_trade_updates
from services.domain.broker import (
    Broker,
    BrokerError,
    BrokerRejected,
    BrokerUnavailable,
    OrderRequest,
    OrderResult,
    TradeUpdate,
    client_order_id,
    submit_exactly_once,
)
from services.domain.decision import (
    Context,
    Decision,
    OptionInputs,
    decide,
    denied_whatever_the_contract,
    exit_unavailable,
    is_option_entry,
    live_trading_check,
    recheck_capacity,
)
from services.domain.lifecycle import TERMINAL_RECOMMENDATION
from services.domain.snapshot import snapshot
from services.domain.order_pricing import Quote

log = logging.getLogger("dispatcher")

TERMINAL = tuple(s.value for s in TERMINAL_RECOMMENDATION)
# After a fill the account is refreshed, but at most this often: two trading-API requests a
# refresh against a budget of 200 a minute.
FILL_REFRESH_SECONDS = 1.0
# A decision whose network inputs (asset record, option chain) are not cached lets its claim go,
# fetches them and claims again (maybe another row, when other dispatchers took that one).
MAX_FETCHES = 20
# The most recommendations one claim takes when the queue is deep. The account's capacity lock
# is held until the batch commits, so a batch is also how long another dispatcher's order waits.
MAX_BATCH = 64
# An option exit is priced from a quote at most this old.
EXIT_QUOTE_FRESH = timedelta(seconds=5)
# The kill switch's enforcement and the re-pricing of working orders run after a pass that found
# nothing to decide, and otherwise at most this often: each costs queries, and on a busy queue they
# would sit between a wake-up and the next submission. A trip made here brings the next one forward.
PERIODIC_SECONDS = 0.5
# Work that can wait (the account refresh, after a fill or on its schedule: ~13 ms with 400
# positions, and two broker requests against a live account; on a busy queue, the periodic pass
# above) is done by the loop once no recommendation has come for this long, not between a wake-up
# and the next order...
QUIET_SECONDS = 0.02
# ...and is never put off longer than this, however busy the queue. Entries are stopped by the kill
# switch's gate at once whatever this is; what waits is the cancel of working orders (a trip brings
# that forward), a re-pricing step, the account's snapshot and marks (and a daily-loss trip the
# refresh would make; the claim's own daily-loss gate reads the last snapshot). Run on the path,
# it is the tail of the latency (a refresh with 400 positions: ~12 ms): at 2 s a one-process stream
# 10 ms apart had its p99 at 11-13 ms, at 5 s 4.6-8 ms.
DEFER_AT_MOST_SECONDS = float(ACCOUNT_REFRESH_DEFER_SECONDS)  # params' age limits are checked against it
# SIGTERM: the recommendation in hand gets this long; then its order is left SUBMITTING for recovery.
SHUTDOWN_BUDGET_SECONDS = 15.0


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


# A batch that failed is decided again one recommendation at a time.
_ONE_AT_A_TIME = object()


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
        # A remote broker's answers are shared through Postgres: one request per symbol per
        # session for every dispatcher task, not one per task.
        store = AssetRecordStore(pool) if getattr(broker, "remote", True) else None
        self.assets = assets or AssetCache(lambda symbol: self.broker.get_asset(symbol), self.clock, store)
        # The two components beside the loop: the orders after the decision, and the broker's picture.
        self.orders = OrderDesk(pool, broker, params, account_id, self.clock,
                                quotes if quotes is not None else getattr(broker, "quote", None))
        self.reconciler = Reconciler(pool, broker, params, account_id, self.clock, self.worker_id, self.orders,
                                     self._session_day)
        self._last_reconcile: datetime | None = None
        self._periodic_due = 0.0  # time.monotonic() of the next _periodic on a busy queue
        self._fill_refresh_since: float | None = None  # time.monotonic() of the first fill not refreshed after
        self._chain_errors: dict[str, str] = {}
        self._asset_errors: dict[str, AssetUnavailable] = {}
        self._exit_quotes: dict[str, tuple[datetime, Quote | None]] = {}
        # The size of each claim, in order (bounded): how the batches adapt to the queue's depth.
        self.claims: deque[int] = deque(maxlen=1000)

    @property
    def calendar(self) -> SessionCalendar:
        return self._calendar or nyse_calendar()

    # The components' entry points, for the loop, the process wiring and the operator's tools.

    def record_broker_answer(self, cid: str, result: OrderResult | None, **outcome: Any) -> str:
        return self.orders.record_broker_answer(cid, result, **outcome)

    def on_trade_update(self, update: TradeUpdate) -> None:
        self.orders.on_trade_update(update)

    def reprice_working(self) -> int:
        return self.orders.reprice_working()

    def refresh_account(self, force: bool = False, min_interval: float | None = None) -> None:
        if self.reconciler.refresh_account(force, min_interval):
            self._periodic_due = 0.0  # the refresh tripped the kill switch: enforced after this pass

    def recover_in_flight(self) -> int:
        return self.reconciler.recover_in_flight()

    def reconcile_broker_orders(self, lookback: timedelta = timedelta(days=1)) -> int:
        return self.reconciler.reconcile_broker_orders(lookback)

    def request_reconcile(self) -> None:
        """Ask the loop to poll the broker at its next pass (the stream was away: updates may be lost)."""
        self._last_reconcile = None

    # --- one recommendation ---------------------------------------------------------------

    def process_next(self) -> Outcome | None:
        """Decide the oldest pending recommendation; None when there is none."""
        outcomes = self.process_batch(1)
        return outcomes[0] if outcomes else None

    def process_batch(self, size: int) -> list[Outcome] | None:
        """Decide up to `size` of the oldest pending recommendations, in order; None when none is pending.

        One transaction claims them (SKIP LOCKED) with every gate input, decides each in created
        order, records each order's intent as it is decided (so the capacity recheck of the next
        one, under the account lock, counts it), records every skip in one statement and commits
        once; the orders leave after that commit, in order. A batch that fails for a reason that
        is not the database's is decided again one recommendation at a time, where the failing
        one is recorded alone.
        """
        for _ in range(MAX_FETCHES):
            outcome = self._process_batch(size)
            if outcome is _ONE_AT_A_TIME:
                size = 1
                continue
            if not isinstance(outcome, _FetchFirst):
                return outcome
            outcome.fetch()  # the claim was let go: fetch with no transaction open, then claim again
            # Claim one next: the oldest row's inputs are fresh now, and a batch of rows that each
            # need a fetch would fetch again what aged while the others were fetched.
            size = 1
        # Each pass cached what the rows it claimed needed; other dispatchers kept taking those rows.
        log.warning("no decision after fetching inputs; yielding", extra={"account_id": self.account_id,
                                                                            "fetches": MAX_FETCHES})
        return []

    def _process_batch(self, size: int) -> list[Outcome] | _FetchFirst | object | None:
        now = self.clock.now()
        in_force = self.params.current()
        day_start, day_end = et_day_bounds(et_date(now))
        rec_id: int | None = None
        decided: list[tuple[Context, Decision, str, orders_repo.Intent | None]] = []
        try:
            # The transaction opens with the claim (one round trip) and ends when the connection
            # goes back to the pool: committed, or rolled back on an exception. A claim of one (an
            # idle queue: the latency path) takes the account's capacity lock first, in the same
            # message, and its order needs no recheck; a batch takes it only before its first order.
            locked = size == 1
            # A daily-loss trip in the batch is alerted once it is committed, not if it rolls back.
            with alerts.held_until_commit(), self.pool.connection() as conn:
                rows = claims.begin_and_claim(
                    conn, {"account_id": self.account_id, "now": now, "day_start": day_start, "day_end": day_end,
                           "limit": size}, lock=locked)
                if not rows:
                    return None
                self.claims.append(len(rows))
                prepared, fetches = [], []
                for row in rows:
                    rec_id = row["id"]
                    try:
                        prepared.append(self._prepare(conn, row, in_force, now))
                    except _FetchFirst as fetch:
                        fetches.append(fetch)
                if fetches:  # rolls the whole claim back: nothing recorded; every fetch, then claim again
                    raise _FetchFirst(", ".join(str(f) for f in fetches), lambda: [f.fetch() for f in fetches])
                loss: str | None = None
                skips: list[tuple[Context, Decision, dict]] = []
                # The transaction's last statement carries its COMMIT in the same round trip when
                # nothing committed with it could be left unsent: the intent of a lone decision,
                # the skips of a batch without orders.
                alone = len(prepared) == 1
                for ctx, option_inputs, exit_quote in prepared:
                    rec_id = ctx.recommendation["id"]
                    decision, position_id, capacity = self._decide(conn, ctx, in_force, now, option_inputs,
                                                                   exit_quote, locked)
                    # What it was decided from, kept with it: `params whatif` decides it again.
                    inputs = snapshot(ctx, now, option_inputs, exit_quote, capacity)
                    cid = client_order_id(self.account_id, rec_id)
                    intent = None
                    if decision.is_order:
                        intent = self._record_intent(conn, ctx, decision, cid, in_force, now, position_id, inputs,
                                                     commit=alone)
                    else:
                        skips.append((ctx, decision, inputs))
                        if loss is None:
                            # Whichever gate failed first, the loss trips the switch (once a batch).
                            loss = next((g.result.reason for g in decision.gates
                                         if g.result.code == "DAILY_LOSS_LIMIT"), None)
                    decided.append((ctx, decision, cid, intent))
                self._record_skips(conn, skips, in_force, now,
                                   commit=loss is None and not any(d.is_order for _, d, _, _ in decided))
                if loss is not None:
                    self._trip(conn, loss, now)
        except _FetchFirst as fetch:
            return fetch
        except (psycopg.OperationalError, psycopg.InterfaceError):
            raise  # the database is down: the loop backs off; nothing was committed
        except Exception as e:  # a bug or bad data: recorded, rolled back, and the loop goes on
            if size > 1:
                log.warning("batch failed; deciding its recommendations one at a time", extra={
                    "account_id": self.account_id, "size": size, "error": f"{type(e).__name__}: {e}"})
                return _ONE_AT_A_TIME
            log.exception("decision failed", extra={"recommendation_id": rec_id, "account_id": self.account_id})
            if rec_id is None:
                # The claimed row could not even be loaded (a value the driver cannot decode):
                # claim it again by id alone and fail it, or every dispatcher would stop on it.
                return [o for o in [self._fail_unloadable(e, now)] if o is not None] or None
            detail = f"DECISION_ERROR: {type(e).__name__}: {e}"
            with self.pool.connection() as conn:
                failed = orders_repo.fail_pending(conn, self.account_id, rec_id, "DECISION_ERROR", detail, now,
                                                  self.worker_id)
            if not failed:  # another worker holds it now: it is that worker's to finish
                return [Outcome(rec_id, "PENDING", "DECISION_ERROR_NOT_RECORDED", str(e))]
            return [Outcome(rec_id, "FAILED", "DECISION_ERROR", str(e))]

        # Every committed intent is sent, in order: a database error while one order's answer is
        # recorded does not keep the next ones from leaving (recovery records the answer it
        # missed); it is raised once the batch is out.
        outcomes: list[Outcome] = []
        database_error: Exception | None = None
        for ctx, decision, cid, intent in decided:
            try:
                outcomes.append(self._after_commit(ctx, decision, cid, now, intent))
            except (psycopg.OperationalError, psycopg.InterfaceError) as e:
                database_error = database_error or e
                outcomes.append(Outcome(ctx.recommendation["id"], "SUBMITTING", "ANSWER_NOT_RECORDED", str(e),
                                        ctx.ticker, ctx.action))
        if database_error is not None:
            raise database_error
        return outcomes

    def _prepare(self, conn, row: dict[str, Any], in_force: ParamsInForce, now: datetime):
        """The context of one claimed row and its network inputs from the caches; _FetchFirst: fetch first."""
        ctx = self._context(conn, row, now)
        option_inputs = None
        if is_option_entry(ctx.recommendation):
            # A kill switch in force or the ticker's trades used up deny it whatever the chain holds.
            early = denied_whatever_the_contract(ctx, in_force.params, now, self._calendar)
            if early is not None:
                self._chain_errors.pop(ctx.ticker, None)  # a failed fetch is this entry's, not a later one's
            option_inputs = (OptionInputs.skipped(early) if early is not None
                             else self._gather_options(conn, ctx, in_force, now))
            if option_inputs is None:
                raise _FetchFirst(f"option chain {ctx.ticker}", lambda: self._fetch_chain(ctx))
        exit_quote = None
        if ctx.action == "EXIT" and (ctx.open_position or {}).get("instrument") == "OPTION":
            exit_quote = self._exit_quote(ctx.open_position["symbol"], now)
        return ctx, option_inputs, exit_quote

    def _decide(self, conn, ctx: Context, in_force: ParamsInForce, now: datetime, option_inputs,
                exit_quote, locked: bool = False) -> tuple[Decision, int | None, dict | None]:
        """The decision, with capacity re-checked under the account lock (entries) or the position
        taken (exits); the position an exit took, and the counts an entry was re-checked on."""
        decision = decide(ctx, in_force.params, now, self._calendar, option_inputs, exit_quote=exit_quote)
        decision = live_trading_check(decision, not self.broker.paper, in_force.params)
        position_id = fresh = None
        if decision.is_order and decision.plan.opens_position:
            if locked:  # claimed alone under the lock: the claim's gather was read under it
                fresh = {"open_positions": ctx.open_positions, "exposure": ctx.exposure,
                         "has_open_position": ctx.open_position is not None, "kill_state": ctx.kill_state}
            else:
                fresh = claims.lock_and_recheck(conn, {"account_id": self.account_id, "ticker": ctx.ticker})
            decision = recheck_capacity(decision, ctx, fresh, in_force.params)
        elif decision.is_order:
            # An exit takes its position by id, under the row lock, or finds another exit has.
            position_id = (ctx.open_position or {}).get("id")
            taken = position_id is not None and orders_repo.take_position(
                conn, self.account_id, position_id, ctx.open_position.get("version"), now)
            if not taken:
                decision = exit_unavailable(decision, "CLOSING")
        return decision, position_id, fresh

    def _after_commit(self, ctx: Context, decision: Decision, cid: str, now: datetime,
                      intent: orders_repo.Intent | None = None) -> Outcome:
        rec_id = ctx.recommendation["id"]
        if not decision.is_order:
            self._log_decision(ctx, "SKIPPED", decision.code, decision.detail)
            return Outcome(rec_id, "SKIPPED", decision.code, decision.detail, ctx.ticker, ctx.action)
        try:
            return self._submit(ctx, decision, cid, now, intent)
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
                                   "confidence", "bar_ts", "created_at", "reason", "position_id", "exit_reason")}
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
            kill_flatten=bool(row["kill_flatten"]) and kill_state == "HALTED",
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
        # then goes at market, with the reason in its decision, rather than not at all. Dated
        # when the answer came, not when the pass that asked for it began.
        quote = self.orders.quote(symbol, "OPTION", now)
        self._exit_quotes[symbol] = (self.clock.now(), quote)

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

    def _record_skips(self, conn, skips: list[tuple[Context, Decision, dict]], in_force: ParamsInForce,
                      now: datetime, commit: bool = False) -> None:
        if not skips:
            return
        orders_repo.record_skips(conn, self.account_id, [
            {"id": ctx.recommendation["id"], "code": d.code, "detail": d.detail, "gates": d.gates_json(),
             "decision": d.info, "inputs": inputs} for ctx, d, inputs in skips], now, self.worker_id,
            commit=commit, **self._params_columns(in_force))

    def _record_intent(self, conn, ctx: Context, decision: Decision, cid: str, in_force: ParamsInForce, now: datetime,
                       position_id: int | None, inputs: dict | None = None,
                       commit: bool = False) -> orders_repo.Intent:
        plan = decision.plan
        info = {**decision.info, "plan": {"instrument": plan.instrument, "symbol": plan.symbol, "side": plan.side,
                                          "qty": plan.qty, "est_price": plan.est_price, "notional": plan.notional}}
        return orders_repo.record_intent(conn, commit=commit, exit_reason=ctx.recommendation.get("exit_reason"), **{
            "position_id": position_id, "recommendation_id": ctx.recommendation["id"], "account_id": self.account_id, "worker": self.worker_id,
            "now": now, "gates": jsonb(decision.gates_json()), "decision": jsonb(info),
            "inputs": jsonb(inputs) if inputs is not None else None,
            "leg": 0, "client_order_id": cid, "ticker": ctx.ticker, "instrument": plan.instrument,
            "symbol": plan.symbol, "side": plan.side, "position_intent": plan.position_intent, "qty": plan.qty,
            "multiplier": plan.multiplier, "est_price": plan.est_price, "notional": plan.notional,
            "position_side": plan.position_side, "opens_position": plan.opens_position,
            "order_type": plan.order_type, "limit_price": plan.limit_price, "attempt": 0,
            "fee_per_unit": in_force.params.fees.per_unit(plan.instrument),
            "strategy": ctx.recommendation.get("strategy"),
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
        self._periodic_due = 0.0  # what the trip stops is enforced after this pass, busy or not
        kill_switch.trip_daily_loss(conn, self.account_id, reason, now, self._session_day(now),
                                    self.params.current().params.risk.on_daily_loss)

    # --- the order ------------------------------------------------------------------------

    def _submit(self, ctx: Context, decision: Decision, cid: str, now: datetime,
                intent: orders_repo.Intent | None = None) -> Outcome:
        plan = decision.plan
        rec_id = ctx.recommendation["id"]
        order = OrderRequest(
            client_order_id=cid, symbol=plan.symbol, underlying=plan.underlying, instrument=plan.instrument,
            side=plan.side, qty=plan.qty, position_intent=plan.position_intent,
            order_type=plan.order_type, limit_price=plan.limit_price,
        )
        try:
            result = submit_exactly_once(self.broker, order)
            metrics.COMMIT_TO_SUBMIT.observe((self.clock.now() - now).total_seconds())
        except BrokerRejected as e:
            self.record_broker_answer(cid, None, rejected=str(e), intent=intent)
            self._log_decision(ctx, "REJECTED", "BROKER_REJECTED", str(e))
            return Outcome(rec_id, "REJECTED", "BROKER_REJECTED", str(e), ctx.ticker, ctx.action)
        except BrokerUnavailable as e:
            # A timeout or 5xx may hide an order still on its way: left SUBMITTING, and recovery
            # asks the broker again. Never resubmitted under a new id.
            log.warning("order state unknown", extra={"recommendation_id": rec_id, "client_order_id": cid, "error": str(e)})
            return Outcome(rec_id, "SUBMITTING", "ORDER_STATE_UNKNOWN", str(e), ctx.ticker, ctx.action)
        status = self.record_broker_answer(cid, result, intent=intent)
        if self._fill_refresh_since is None:  # the account is refreshed after the pending work (drain, the loop)
            self._fill_refresh_since = time.monotonic()
        code = "ORDER_FILLED" if result.is_filled else "ORDER_ACCEPTED"
        detail = f"{plan.side} {result.filled_qty or plan.qty} {plan.symbol} @ {result.filled_avg_price}"
        if decision.code == "ORDER_PLANNED_FALLBACK":
            detail += f" ({decision.info.get('fallback')})"
        self._log_decision(ctx, status, code, detail)
        return Outcome(rec_id, status, code, detail, ctx.ticker, ctx.action)

    def _log_decision(self, ctx: Context, status: str, code: str, detail: str) -> None:
        level = logging.INFO if status == "EXECUTED" else logging.WARNING
        metrics.record_decision(status, code)
        log.log(level, "decision", extra={
            "decision": status, "code": code, "detail": detail, "recommendation_id": ctx.recommendation["id"],
            "account_id": self.account_id, "ticker": ctx.ticker, "action": ctx.action,
            "instrument": ctx.recommendation.get("instrument"),
        })

    # --- the loop -------------------------------------------------------------------------

    def drain(self, stop: threading.Event | None = None, limit: int | None = None, *,
              defer: bool = False) -> list[Outcome]:
        """Decide pending recommendations until none is left (or `stop`, or `limit`), then refresh
        the account if an order was answered. `defer`: leave that refresh to the caller (the loop
        does it at a quiet moment)."""
        outcomes: list[Outcome] = []
        size = 1  # an idle queue's recommendation is claimed alone, at once
        while not (stop and stop.is_set()) and (limit is None or len(outcomes) < limit):
            want = size if limit is None else min(size, limit - len(outcomes))
            batch = self.process_batch(want)
            if not batch:  # none pending, or no decision after fetching: the loop's other duties come first
                break
            outcomes.extend(batch)
            # A full claim means a deep queue: claim more next time (throughput); a short one, one.
            size = min(size * 4, MAX_BATCH) if len(batch) >= want else 1
        if not defer:
            self._refresh_after_fills()
        return outcomes

    def _refresh_after_fills(self) -> None:
        if self._fill_refresh_since is not None:
            self._fill_refresh_since = None
            self.refresh_account(min_interval=FILL_REFRESH_SECONDS)

    def _deferred_due(self) -> float | None:
        """Since when (time.monotonic()) work that waits for a quiet moment has been due; None: none is."""
        clock_now = time.monotonic()
        overdue = self.reconciler.refresh_overdue(self.clock.now())
        scheduled = None if overdue is None else clock_now - overdue.total_seconds()
        due = [t for t in (self._fill_refresh_since, self._periodic_due, scheduled) if t is not None and t <= clock_now]
        return min(due) if due else None

    def _run_deferred(self) -> None:
        if self._fill_refresh_since is not None:
            self._refresh_after_fills()
        self.refresh_account()  # the schedule's, if it is due (a fill's just now counts as one)
        if time.monotonic() >= self._periodic_due:
            self._periodic()

    def run_forever(self, conninfo: str, stop: threading.Event) -> None:
        """LISTEN for new recommendations, poll as the fallback, survive a database restart."""
        backoff = 0.5
        listener: psycopg.Connection | None = None
        while not stop.is_set():
            metrics.beat("dispatcher")
            try:
                if listener is None or listener.closed:
                    listener = psycopg.connect(conninfo, autocommit=True,
                                               application_name=f"ops-dispatcher:{self.worker_id}:listen"[:63])
                    listener.execute(f"LISTEN {queries.NOTIFY_CHANNEL}")
                    self.recover_in_flight()
                if not self.reconciler.ever_refreshed:
                    self.refresh_account()  # the first snapshot comes before the first decision
                idle = not self.drain(stop, defer=True)
                if idle or self._periodic_due == 0.0:  # nothing decided, or a trip brought it forward
                    self._periodic()
                due = self._deferred_due()
                if due is not None and time.monotonic() - due >= DEFER_AT_MOST_SECONDS:
                    self._run_deferred()  # a queue never quiet for long: waited long enough
                alerts.loop_ok(f"dispatcher:{self.account_id}")
                backoff = 0.5
                self._wait_for_work(listener, stop)
            except (psycopg.OperationalError, psycopg.InterfaceError) as e:
                log.error("database unavailable; retrying", extra={"error": str(e), "backoff_s": backoff})
                alerts.loop_failed(f"dispatcher:{self.account_id}", str(e))
                if listener is not None:
                    listener.close()
                listener = None
                stop.wait(backoff)
                backoff = min(backoff * 2, 30)
            except Exception as e:  # a bug outside any one recommendation: logged, and the loop goes on
                log.exception("dispatcher pass failed; retrying", extra={"backoff_s": backoff})
                alerts.loop_failed(f"dispatcher:{self.account_id}", str(e))
                stop.wait(backoff)
                backoff = min(backoff * 2, 30)
        if listener is not None:
            listener.close()

    def _wait_for_work(self, listener: psycopg.Connection, stop: threading.Event) -> None:
        """Until a NOTIFY, the poll interval, or `stop`, whichever comes first. Work put off for a
        quiet moment is done once QUIET_SECONDS pass without a NOTIFY."""
        poll = self.params.current().params.execution.poll_interval_seconds
        deadline = time.monotonic() + poll
        while not stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            deferred = self._deferred_due() is not None
            # Short slices so a SIGTERM is seen within a quarter second.
            timeout = min(remaining, QUIET_SECONDS if deferred else 0.25)
            if any(True for _ in listener.notifies(timeout=timeout, stop_after=1)):
                return
            if deferred:
                self._run_deferred()

    def _periodic(self) -> None:
        self._periodic_due = time.monotonic() + PERIODIC_SECONDS
        now = self.clock.now()
        if self._last_reconcile is None or now - self._last_reconcile >= RECONCILE_EVERY:
            self._last_reconcile = now
            self.recover_in_flight()
        self.enforce_kill_switch()
        self.reprice_working()

    def enforce_kill_switch(self) -> dict[str, int]:
        """What a kill switch does to orders already out and positions already held.

        HALTED: entry orders still working are canceled. A switch that flattens (a daily-loss
        trip under `risk.on_daily_loss: flatten`, `halt --flatten`): the same, and every OPEN
        position without a working exit gets one, while the market is open. The trip itself
        wrote the first exits; this pass catches a position that opened later (an entry that
        filled before its cancel) and one whose exit ended unfilled.
        """
        now = self.clock.now()
        with self.pool.connection() as conn:
            row = kill_switch.read_state(conn, self.account_id)
            if row is None:
                return {"exits": 0, "cancels": 0}
            state, code = kill_switch.in_force(row, self._session_day(now),
                                               self.params.current().params.risk.on_daily_loss)
            exits = []
            if code is not None and self._market_open(now):
                exits = exits_repo.flatten(conn, self.account_id, code, f"kill switch {state}: {row['reason']}", now,
                                           by=f"dispatcher:{self.worker_id}")
        if exits:
            log.warning("kill switch flattens positions", extra={
                "account_id": self.account_id, "code": code, "positions": [e["ticker"] for e in exits]})
        cancels = self.orders.cancel_entries(code or state) if state == "HALTED" or code is not None else 0
        return {"exits": len(exits), "cancels": cancels}

    def _market_open(self, now: datetime) -> bool:
        try:
            return self.calendar.is_open(now)
        except CalendarUnavailable:
            return False  # no exit written that the market-closed gate would refuse anyway

# --- process wiring ------------------------------------------------------------------------


def run_dispatcher(once: bool = False) -> int:
    from services.common.db import database_url, make_pool
    from services.common.migrate import migrate_when_ready
    from services.runtime import serve_health

    url = database_url()
    migrate_when_ready(url)
    account_id = os.environ.get("ACCOUNT_ID", "paper-main")
    worker_id = new_worker_id()
    pool = make_pool(url, min_size=1, max_size=2, application_name=f"ops-dispatcher:{worker_id}"[:63], check=False)
    provider = params_provider(url)
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
    health = None if once else serve_health("dispatcher", url, interval=20.0, account_id=account_id,
                                            params=provider, broker=broker)
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
        if health is not None:
            health.stop()
        pool.close()
    return 0

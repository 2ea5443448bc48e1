"""After the decision: every answer about an order applied through the lifecycle, and limit orders re-priced.

The answer to a submit, a pushed trade update (Alpaca's stream, the simulated broker), a poll and
recovery all reach `record_broker_answer`, which hands the event to the one write path
(`orders_repo.apply_event`; the answer to a submission first to `orders_repo.apply_answer`, the
same compare-and-sets in one statement on the state the intent recorded). Limit orders still
unfilled after their time are canceled and sent again more aggressively, attempt by attempt, each
step committed before it leaves.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool

from services.adapters import alerts
from services.adapters.postgres import kill_switch, orders_repo, queries
from services.adapters.postgres.orders_repo import BrokerFacts, Intent
from services.common import metrics
from services.common.clock import Clock
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
from services.dispatcher.risk.gates import check_kill_switch
from services.domain.lifecycle import CancelReason, Event, EventKind, Illegal, OrderRole
from services.domain.order_pricing import Quote, Replace, Wait, next_attempt, option_tick, stock_tick

log = logging.getLogger("dispatcher")

QuoteSource = Callable[[str, str, datetime], Quote | None]


class OrderDesk:
    """One account's orders after the decision, for one dispatcher process."""

    def __init__(self, pool: ConnectionPool, broker: Broker, params: Any, account_id: str, clock: Clock,
                 quotes: QuoteSource | None = None):
        self.pool = pool
        self.broker = broker
        self.params = params
        self.account_id = account_id
        self.clock = clock
        self.quotes = quotes

    def record_broker_answer(self, cid: str, result: OrderResult | None, *, rejected: str | None = None,
                             failed: str | None = None, intent: Intent | None = None) -> str:
        """Apply the broker's answer (or its refusal, or a lookup that found nothing) to the order.

        The same path serves the answer to a submit, the trade-updates stream, a later poll and
        recovery, so a fill that arrives late closes an exit just as an immediate one does.
        `intent`: the answer is to the submission of this intent, applied to the state it
        recorded in one round trip; when the order moved since (or the answer is not a plain
        step from SUBMITTING) it goes the general way, the order loaded first.
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
        applied = None
        if intent is not None:
            with self.pool.connection() as conn:
                applied = orders_repo.apply_answer(conn, intent, event, facts, now)
        if applied is None:
            with self.pool.connection() as conn, conn.transaction():
                applied = orders_repo.apply_event(conn, self.account_id, cid, event, facts, now)
        if rejected is not None or (result is not None and result.status == "rejected"):
            alerts.emit(alerts.Event.ORDER_REJECTED, self.account_id, client_order_id=cid, message=facts.message)
        if isinstance(applied, Illegal):
            with self.pool.connection() as conn:
                row = conn.execute(queries.RECOMMENDATION_STATUS_BY_ORDER,
                                   {"account_id": self.account_id, "client_order_id": cid}).fetchone()
            return row["status"] if row else "UNKNOWN"
        filled = applied.transition.changed and applied.transition.execution == "FILLED"
        if filled and result is not None and result.submitted_at and result.filled_at:
            metrics.SUBMIT_TO_FILL.observe(max(0.0, (result.filled_at - result.submitted_at).total_seconds()))
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
            quote = self.quote(row["symbol"], row["instrument"], now)
            step = next_attempt(row["attempt"], row["submitted_at"], now, quote, execution, side=row["side"], tick=tick)
            if isinstance(step, Wait):
                return 0
            stopped = self._stopped_by_kill_switch(row["role"], row.get("exit_reason"))
            if stopped is not None and row["role"] != OrderRole.ENTRY:
                return 0  # a halted account sends nothing; the exit already working stays
            reason = CancelReason.REPRICE if isinstance(step, Replace) and stopped is None else CancelReason.GIVE_UP
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
        stopped = self._stopped_by_kill_switch(row["role"], row.get("exit_reason"))
        if stopped is not None:
            # The next attempt is a new order: the kill switch decides whether it may go out.
            with self.pool.connection() as conn, conn.transaction():
                ended = orders_repo.give_up_replacement(conn, row["id"], f"ORDER_GIVEN_UP: {stopped}", now)
            if ended:
                log.warning("re-priced order given up: the kill switch stops its next attempt", extra={
                    "recommendation_id": row["recommendation_id"], "attempt": row["attempt"], "reason": stopped})
            return int(ended)
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

    def cancel_entries(self, why: str) -> int:
        """Cancel every entry order still working (the kill switch flattens the book).

        The reason is committed before each cancel is sent; one already asked is asked again
        after reprice_after_seconds without an answer. What filled before the cancel opens a
        position, which the flatten closes in turn. Returns the cancels sent.
        """
        now = self.clock.now()
        wait = timedelta(seconds=self.params.current().params.execution.reprice_after_seconds)
        with self.pool.connection() as conn:
            working = orders_repo.working_entries(conn, self.account_id)
        sent = 0
        for row in working:
            cid = row["client_order_id"]
            if row["cancel_reason"] is None:
                with self.pool.connection() as conn:
                    if not orders_repo.request_entry_cancel(conn, self.account_id, cid, now):
                        continue  # it moved meanwhile (filled, or another dispatcher asked)
                log.warning("entry order canceled by the kill switch", extra={
                    "client_order_id": cid, "recommendation_id": row["recommendation_id"], "reason": why})
            elif row["cancel_reason"] != CancelReason.KILL_SWITCH or now - row["updated_at"] < wait:
                continue  # a re-pricing cancel (its next attempt is stopped), or asked moments ago
            sent += self._guarded(self._send_cancel, row)
        return sent

    def _send_cancel(self, row: dict[str, Any]) -> int:
        after = self.broker.cancel_order(row["client_order_id"])
        if after is not None:
            self.record_broker_answer(row["client_order_id"], after)
        return 1

    def _stopped_by_kill_switch(self, role: str, exit_reason: str | None = None) -> str | None:
        """The kill switch's reason when it stops a new order of this role (entries unless ACTIVE,
        everything when HALTED but the operator's flatten); None when the order may go out.
        Read fresh from Postgres."""
        with self.pool.connection() as conn:
            switch = kill_switch.read_state(conn, self.account_id)
        result = check_kill_switch(switch["state"] if switch else "ACTIVE",
                                   "EXIT" if role == OrderRole.EXIT else "BUY", exit_reason,
                                   bool(switch and switch.get("flatten")))
        return None if result.passed else result.reason

    def quote(self, symbol: str, instrument: str, now: datetime) -> Quote | None:
        if self.quotes is None:
            return None
        try:
            return self.quotes(symbol, instrument, now)
        except BrokerError as e:
            log.warning("quote unavailable", extra={"symbol": symbol, "error": str(e)})
            return None

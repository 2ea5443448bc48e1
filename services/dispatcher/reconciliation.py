"""Comparing the broker's account, positions and orders with ours, and resolving orders left in flight.

Reconciliation is judged against the database's own latest activity: a symbol with local
activity since the broker's snapshot was asked for is not judged on that snapshot. What it
finds is applied through the same path as live answers (`OrderDesk.record_broker_answer`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import date, datetime, timedelta
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool

from services.adapters import alerts
from services.adapters.postgres import kill_switch, orders_repo, queries, request_budget
from services.adapters.postgres.orders_repo import jsonb
from services.common.clock import Clock
from services.dispatcher.execution import OrderDesk
from services.dispatcher.risk.gates import check_daily_loss_limit
from services.domain.broker import Broker, BrokerError
from services.domain.lifecycle import LIVE_POSITION

log = logging.getLogger("dispatcher")

# An order the broker does not show this long after it was sent was not placed.
IN_FLIGHT_GRACE = timedelta(minutes=2)
# In-flight orders, working orders and the broker's order list are compared with ours this often.
RECONCILE_EVERY = timedelta(seconds=30)
# Between two of these, an order compared once is not sent to the database again; then the whole
# list is compared afresh (a database restored or failed over under a running process is caught).
FULL_ORDER_COMPARE_EVERY = timedelta(minutes=5)
# A failed account refresh is tried again after this long, whatever its schedule: the loop looks
# for due work every 20 ms of quiet, and the broker's budget is 200 requests a minute.
REFRESH_RETRY = timedelta(seconds=5)
# Clocks of two dispatchers differ a little: activity this close before a snapshot counts as after it.
SNAPSHOT_SKEW = timedelta(seconds=2)


class Reconciler:
    """One account's broker picture, for one dispatcher process."""

    def __init__(self, pool: ConnectionPool, broker: Broker, params: Any, account_id: str, clock: Clock,
                 worker_id: str, orders: OrderDesk, session_day: Callable[[datetime], date]):
        self.pool = pool
        self.broker = broker
        self.params = params
        self.account_id = account_id
        self.clock = clock
        self.worker_id = worker_id
        self.orders = orders
        self.session_day = session_day
        self._last_refresh: datetime | None = None
        self._refresh_failed_at: datetime | None = None
        self._last_orders_reconcile: datetime | None = None
        # Broker order ids compared with this database (ours, or recorded as unknown) since the
        # last full comparison.
        self._compared: set[str] = set()
        self._full_compare_at: datetime | None = None

    def refresh_overdue(self, now: datetime) -> timedelta | None:
        """How long the scheduled refresh has been due; None: not yet. A first one is due at once,
        and one that failed again REFRESH_RETRY after the failure."""
        if self._refresh_failed_at is not None:
            retry = now - self._refresh_failed_at - REFRESH_RETRY
            return retry if retry >= timedelta(0) else None
        if self._last_refresh is None:
            return timedelta(0)
        every = timedelta(seconds=self.params.current().params.execution.account_refresh_seconds)
        overdue = now - self._last_refresh - every
        return overdue if overdue >= timedelta(0) else None

    @property
    def ever_refreshed(self) -> bool:
        return self._last_refresh is not None

    def refresh_account(self, force: bool = False, min_interval: float | None = None) -> bool:
        """Account snapshot and position marks from the broker, on a schedule and after fills;
        True when the snapshot tripped the kill switch.

        The trading API allows 200 requests a minute: this is the only place that asks for
        account and positions, never once per recommendation. A daily loss past the limit trips
        the kill switch here too, so it trips even when no recommendation arrives. After a
        failure, only `force` asks again before REFRESH_RETRY has passed.
        """
        now = self.clock.now()
        if not force:
            if min_interval is None:  # the schedule's, which waits out a failure's retry itself
                if self.refresh_overdue(now) is None:
                    return False
            elif self._refresh_failed_at is not None and now - self._refresh_failed_at < REFRESH_RETRY:
                return False
            elif self._last_refresh is not None and now - self._last_refresh < timedelta(seconds=min_interval):
                return False
        try:
            snapshot = self.broker.get_account()
            positions = self.broker.get_positions()
        except BrokerError as e:
            log.warning("account refresh failed", extra={"account_id": self.account_id, "error": str(e)})
            alerts.broker_failed(self.account_id, str(e))
            self._refresh_failed_at = now
            return False  # the stale account state will deny entries once it is too old
        except Exception:
            self._refresh_failed_at = now  # an answer that cannot be read: raised, and not asked again at every pass
            raise
        self._last_refresh = now
        self._refresh_failed_at = None
        in_force = self.params.current()
        tripped = False
        alerts.broker_ok(self.account_id)
        with alerts.held_until_commit(), self.pool.connection() as conn, conn.transaction():
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
                tripped = kill_switch.trip_daily_loss(conn, self.account_id, result.reason, now, self.session_day(now),
                                                      in_force.params.risk.on_daily_loss)
        if force or self._last_orders_reconcile is None or now - self._last_orders_reconcile >= RECONCILE_EVERY:
            self._last_orders_reconcile = now
            self.reconcile_broker_orders()
        return tripped

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
            alerts.emit(alerts.Event.UNKNOWN_BROKER_POSITION, self.account_id, symbols=unknown)
            kill_switch.restrict(conn, self.account_id,
                                 f"UNKNOWN_BROKER_POSITION: the broker holds {', '.join(unknown)}, which this database does not",
                                 "reconciliation", now, self.session_day(now))

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
                    self.orders.record_broker_answer(row["client_order_id"], found)
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
            self.orders.record_broker_answer(row["client_order_id"], None,
                                      failed="ORDER_NOT_PLACED: the broker has no such order "
                                             f"{IN_FLIGHT_GRACE.total_seconds():.0f} s after it was sent")
        else:
            self.orders.record_broker_answer(row["client_order_id"], found)
        log.info("reconciled in-flight order", extra={"recommendation_id": row["recommendation_id"],
                                                      "client_order_id": row["client_order_id"],
                                                      "found": found is not None})
        return 1

    def reconcile_broker_orders(self, lookback: timedelta = timedelta(days=1)) -> int:
        """Record the broker's recent orders that this database does not know, and stop new entries.

        Our orders are recorded before they are sent, so an unknown order came from elsewhere
        (a restored database, a manual trade on the account): its exposure is invisible to the
        gates, so the account goes to REDUCING until an operator has looked and resumes. Between
        full comparisons (every FULL_ORDER_COMPARE_EVERY) an order already compared is not sent
        again: what it was found to be changes only if the database loses rows under us.
        """
        now = self.clock.now()
        try:
            orders = self.broker.list_orders_since(now - lookback)
        except BrokerError as e:
            # Not swallowed: orders_reconciled_at stops moving, and entries stop once it is too old.
            log.warning("broker order reconciliation failed", extra={"account_id": self.account_id, "error": str(e)})
            return 0
        # Only orders not compared since the last full comparison: one compared was ours (our
        # intent is committed before an order leaves) or has been recorded as unknown.
        if self._full_compare_at is None or now - self._full_compare_at >= FULL_ORDER_COMPARE_EVERY:
            self._compared.clear()
            self._full_compare_at = now
        rows = [{"broker_order_id": o.broker_order_id, "client_order_id": o.client_order_id, "symbol": o.symbol,
                 "side": o.side, "qty": o.qty, "status": o.status, "submitted_at": o.submitted_at}
                for o in orders if o.broker_order_id not in self._compared]
        if not rows:
            with self.pool.connection() as conn:
                conn.execute(queries.ORDERS_RECONCILED, {"account_id": self.account_id, "now": now})
            return 0
        with alerts.held_until_commit(), self.pool.connection() as conn, conn.transaction():
            conn.execute(queries.ORDERS_RECONCILED, {"account_id": self.account_id, "now": now})
            unknown = conn.execute(queries.RECORD_UNKNOWN_ORDERS, {
                "account_id": self.account_id, "now": now, "orders": jsonb(rows)}).fetchall()
            if unknown:
                symbols = ", ".join(f"{u['side']} {u['qty']} {u['symbol']}" for u in unknown)
                kill_switch.restrict(conn, self.account_id,
                                     f"UNKNOWN_BROKER_ORDER: the broker has {len(unknown)} order(s) this database "
                                     f"does not: {symbols}", "reconciliation", now, self.session_day(now))
        self._compared.update(r["broker_order_id"] for r in rows)  # committed
        for u in unknown:
            log.error("unknown broker order", extra={"account_id": self.account_id, **u})
        if unknown:
            alerts.emit(alerts.Event.UNKNOWN_BROKER_ORDER, self.account_id, orders=[dict(u) for u in unknown])
        return len(unknown)

"""The one write path of the order lifecycle: recommendations, executions and positions.

Every change of those three tables goes through a function here, and every UPDATE names the
state (and, for a broker event, the version) it expects the row to be in: a row another worker
changed meanwhile is left alone, and the function says so (`Conflict`) instead of overwriting
it. Which changes are legal is decided by the pure table in `services/domain/lifecycle.py`; this module only
loads, asks and writes. Positions are addressed by id, never by ticker.

Each function runs on the caller's connection, inside the caller's transaction; `commit=True`
ends that transaction with the function's statement, and `apply_answer` runs with none open (its
one statement is its own transaction).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from services.common.logs import json_default
from services.domain.lifecycle import (
    CancelReason,
    Event,
    ExecutionStatus,
    Illegal,
    OrderRole,
    OrderState,
    PositionAction,
    PositionStatus,
    Transition,
    transition,
)

log = logging.getLogger("dispatcher.lifecycle")


class Conflict(RuntimeError):
    """A row was not in the state this worker loaded: another worker changed it first.

    Resolves itself: the transaction is rolled back and the next pass sees the new state.
    """


def jsonb(value: Any) -> Jsonb:
    return Jsonb(value, dumps=lambda v: json.dumps(v, default=json_default))


def execute_and_commit(conn: psycopg.Connection, sql: str, params: dict[str, Any]) -> psycopg.Cursor:
    """The last statement of the caller's transaction and its COMMIT, in one round trip (pipeline mode).

    When the statement fails the server skips the COMMIT, the error is raised here and the
    caller's connection context rolls the transaction back. What the statement returns is read
    after the commit: a check on it that fails can no longer roll back, so callers use this only
    where a statement that matched nothing has written nothing.
    """
    with conn.pipeline():
        cur = conn.execute(sql, params)
        conn.execute("COMMIT")  # queued: conn.commit() would sync, and the pipeline's exit sync again
    return cur


# --- recommendations ------------------------------------------------------------------------

# -- record_skips --
# A batch's recommendations decided without an order, in one statement, each only from PENDING
# under the claim's row lock. The ids come back rather than a row count: in pipeline mode a
# count is only known once the results are fetched.
RECORD_SKIPS = """
UPDATE dispatch_recommendations r
SET status = 'SKIPPED', decided_at = %(now)s, claimed_by = %(worker)s, claimed_at = coalesce(r.claimed_at, %(now)s),
    outcome_code = s.code, outcome_detail = s.detail, gate_results = s.gates, decision = s.decision,
    inputs = s.inputs, params_source = %(params_source)s, params_version = %(params_version)s, params_hash = %(params_hash)s,
    version = r.version + 1
FROM jsonb_to_recordset(%(skips)s) AS s(id bigint, code text, detail text, gates jsonb, decision jsonb,
                                        inputs jsonb)
WHERE r.id = s.id AND r.account_id = %(account_id)s AND r.status = 'PENDING'
RETURNING r.id
"""


def record_skips(conn: psycopg.Connection, account_id: str, skips: list[dict[str, Any]], now: datetime,
                 worker: str, *, commit: bool = False, **params_columns: Any) -> None:
    """`commit`: the statement ends the caller's transaction, its COMMIT sent in the same round trip."""
    params = {"account_id": account_id, "skips": jsonb(skips), "now": now, "worker": worker, **params_columns}
    changed = len((execute_and_commit(conn, RECORD_SKIPS, params) if commit
                   else conn.execute(RECORD_SKIPS, params)).fetchall())
    if changed != len(skips):
        raise Conflict(f"{len(skips) - changed} of {len(skips)} recommendations are no longer PENDING")


# -- fail_pending --
# A recommendation that could not be decided (a bug, a row that cannot be loaded) is FAILED by
# id, and only while it is still PENDING and no other worker holds it: a row another worker
# claimed meanwhile is that worker's to finish (it used to be failed here while its execution
# stayed SUBMITTING and its reserved position PENDING, leaking the slot for good).
FAIL_PENDING = """
UPDATE dispatch_recommendations r
SET status = 'FAILED', decided_at = %(now)s, outcome_code = %(code)s, outcome_detail = %(detail)s,
    claimed_by = %(worker)s, claimed_at = coalesce(r.claimed_at, %(now)s), version = r.version + 1
WHERE r.id = (SELECT id FROM dispatch_recommendations
              WHERE id = %(id)s AND account_id = %(account_id)s AND status = 'PENDING'
              FOR UPDATE SKIP LOCKED)
"""


def fail_pending(conn: psycopg.Connection, account_id: str, rec_id: int, code: str, detail: str,
                 now: datetime, worker: str) -> bool:
    """FAILED with its reason if still PENDING and unclaimed; False when another worker has it."""
    changed = conn.execute(FAIL_PENDING, {"id": rec_id, "account_id": account_id, "code": code,
                                          "detail": detail[:2000], "now": now, "worker": worker}).rowcount
    return changed == 1


# -- note_error --
# An error after the intent was committed (the order may be at the broker): the recommendation
# stays SUBMITTING for recovery to resolve by asking the broker, and the error is kept on it.
NOTE_ERROR = """
UPDATE dispatch_recommendations SET outcome_detail = %(detail)s, version = version + 1
WHERE id = %(id)s AND account_id = %(account_id)s AND status = 'SUBMITTING'
"""


def note_error(conn: psycopg.Connection, account_id: str, rec_id: int, detail: str) -> bool:
    return conn.execute(NOTE_ERROR, {"id": rec_id, "account_id": account_id, "detail": detail[:2000]}).rowcount == 1


# --- the intent -------------------------------------------------------------------------------

# -- take_position --
# An exit takes the position it closes, by id, under the row lock: a second exit finds it
# CLOSING and sells nothing. Runs in the transaction that records the exit order. The version
# is the one the exit was sized from: a position another exit partly sold meanwhile is OPEN
# again with fewer shares, and selling the quantity read would sell what is not held.
TAKE_POSITION = """
UPDATE active_positions SET status = 'CLOSING', updated_at = %(now)s, version = version + 1
WHERE id = %(position_id)s AND account_id = %(account_id)s AND status = 'OPEN' AND version = %(version)s
RETURNING id, qty
"""


def take_position(conn: psycopg.Connection, account_id: str, position_id: int, version: int,
                  now: datetime) -> dict | None:
    return conn.execute(TAKE_POSITION, {"account_id": account_id, "position_id": position_id, "version": version,
                                        "now": now}).fetchone()


# -- record_intent --
# Before the order leaves: the execution row (with its deterministic client_order_id), the
# reserved position for an entry, and the recommendation moved PENDING -> SUBMITTING, in the
# claiming transaction. A crash after this commit leaves a SUBMITTING row that recovery
# resolves by asking the broker for that client_order_id; a crash before it leaves the
# recommendation PENDING, and nothing was sent.
RECORD_INTENT = """
WITH reserved AS (
    -- the entry's position id, taken first so the execution row can name it
    SELECT CASE WHEN %(opens_position)s THEN nextval(pg_get_serial_sequence('active_positions', 'id')) END AS id
), rec AS (
    UPDATE dispatch_recommendations
    SET status = 'SUBMITTING', claimed_by = %(worker)s, claimed_at = %(now)s, outcome_code = 'ORDER_SUBMITTING',
        gate_results = %(gates)s, decision = %(decision)s, inputs = %(inputs)s,
        params_source = %(params_source)s, params_version = %(params_version)s, params_hash = %(params_hash)s,
        version = version + 1
    WHERE id = %(recommendation_id)s AND account_id = %(account_id)s AND status = 'PENDING'
    RETURNING id
), exec AS (
    INSERT INTO dispatch_executions (
        account_id, recommendation_id, leg, client_order_id, ticker, instrument, symbol, side,
        position_intent, qty, multiplier, est_price, notional, status, submitted_at, updated_at,
        strike, expiration, option_right, premium, quote, greeks, option_gates, role, position_id,
        order_type, limit_price, attempt, fee_per_unit)
    SELECT %(account_id)s, rec.id, %(leg)s, %(client_order_id)s, %(ticker)s, %(instrument)s, %(symbol)s,
           %(side)s, %(position_intent)s, %(qty)s, %(multiplier)s, %(est_price)s, %(notional)s,
           'SUBMITTING', %(now)s, %(now)s,
           %(strike)s, %(expiration)s, %(option_right)s, %(premium)s, %(quote)s, %(greeks)s, %(option_gates)s,
           CASE WHEN %(opens_position)s THEN 'ENTRY' ELSE 'EXIT' END, coalesce(%(position_id)s, reserved.id),
           %(order_type)s, %(limit_price)s, %(attempt)s, %(fee_per_unit)s
    FROM rec, reserved
    RETURNING id, position_id, version
), pos AS (
    INSERT INTO active_positions (id, account_id, ticker, instrument, symbol, side, qty, multiplier, avg_price,
                                  status, recommendation_id, execution_id, opened_at, updated_at, strategy)
    SELECT exec.position_id, %(account_id)s, %(ticker)s, %(instrument)s, %(symbol)s, %(position_side)s, %(qty)s,
           %(multiplier)s, %(est_price)s, 'PENDING', %(recommendation_id)s, exec.id, %(now)s, %(now)s, %(strategy)s
    FROM exec
    WHERE %(opens_position)s
)
SELECT id AS execution_id, position_id, version FROM exec
"""


@dataclass(frozen=True)
class Intent:
    """An order as its intent recorded it (SUBMITTING, nothing filled): the answer to its
    submission is applied to this state without loading it again (`apply_answer`)."""

    execution_id: int
    version: int
    recommendation_id: int
    position_id: int | None
    role: OrderRole
    qty: Decimal
    fee_per_unit: Decimal
    exit_reason: str | None = None


def record_intent(conn: psycopg.Connection, *, commit: bool = False, exit_reason: str | None = None,
                  **fields: Any) -> Intent:
    """The execution row, the reservation (entries) and SUBMITTING.

    `commit`: the intent ends the caller's transaction, its COMMIT sent in the same round trip.
    A recommendation no longer PENDING matches nothing and writes nothing, so that commit has
    nothing to undo. `exit_reason`: the recommendation's, kept on the Intent for a CLOSE.
    """
    row = (execute_and_commit(conn, RECORD_INTENT, fields) if commit
           else conn.execute(RECORD_INTENT, fields)).fetchone()
    if row is None:
        raise Conflict(f"recommendation {fields['recommendation_id']} is no longer PENDING")
    return Intent(row["execution_id"], row["version"], fields["recommendation_id"], row["position_id"],
                  OrderRole.ENTRY if fields["opens_position"] else OrderRole.EXIT, Decimal(fields["qty"]),
                  Decimal(fields["fee_per_unit"]), exit_reason)


# --- broker events ----------------------------------------------------------------------------

# -- load_order --
# One order as the lifecycle table needs it, with its position and recommendation, locked so
# that two workers applying events to the same order (the stream and a poll) take turns.
LOAD_ORDER = """
SELECT e.id, e.status, e.role, e.qty, coalesce(e.filled_qty, 0) AS filled_qty, e.version, e.recommendation_id,
       e.position_id, e.ticker, e.symbol, e.multiplier, e.cancel_reason, e.fee_per_unit, r.exit_reason,
       p.status AS position_status, p.qty AS position_qty, p.version AS position_version,
       r.status AS recommendation_status
FROM dispatch_executions e
LEFT JOIN active_positions p ON p.id = e.position_id
JOIN dispatch_recommendations r ON r.id = e.recommendation_id
WHERE e.account_id = %(account_id)s AND e.client_order_id = %(client_order_id)s
FOR UPDATE OF e
"""

# -- update_execution --
# Compare-and-set on the state and version loaded above.
UPDATE_EXECUTION = """
UPDATE dispatch_executions
SET status = %(status)s, broker_order_id = coalesce(%(broker_order_id)s, broker_order_id),
    filled_qty = %(filled_qty)s, filled_avg_price = coalesce(%(filled_avg_price)s, filled_avg_price),
    notional = coalesce(%(filled_qty)s::numeric * %(filled_avg_price)s::numeric * multiplier, notional),
    broker_message = coalesce(%(message)s, broker_message), filled_at = coalesce(%(filled_at)s, filled_at),
    updated_at = %(now)s, version = version + 1
WHERE id = %(id)s AND status = %(expected)s AND version = %(version)s
"""

# Position moves, each from the one state it may start in. Each fill adds its fee (the order's
# fee per share or contract, times the quantity filled); a CLOSED position's realized P&L is the
# gross of its exit fills less every fee it paid, entry and exit.
OPEN_POSITION = """
UPDATE active_positions
SET status = 'OPEN', qty = %(qty)s, avg_price = %(price)s, market_price = %(price)s, updated_at = %(now)s,
    high_water_mark = %(price)s, fees = fees + %(qty)s::numeric * %(fee_per_unit)s::numeric, version = version + 1
WHERE id = %(position_id)s AND status = 'PENDING'
"""
RELEASE_POSITION = """
UPDATE active_positions SET status = 'CANCELLED', closed_at = %(now)s, updated_at = %(now)s, version = version + 1
WHERE id = %(position_id)s AND status = 'PENDING'
"""
CLOSE_POSITION = """
UPDATE active_positions
SET status = 'CLOSED', closed_at = %(now)s, close_price = %(price)s, updated_at = %(now)s, version = version + 1,
    exit_reason = coalesce(%(exit_reason)s, 'MANUAL_EXIT'),
    fees = fees + qty * %(fee_per_unit)s::numeric,
    realized_pnl = coalesce(realized_pnl, 0)
                   + (%(price)s::numeric - avg_price) * qty * multiplier * CASE WHEN side = 'short' THEN -1 ELSE 1 END
                   - (fees + qty * %(fee_per_unit)s::numeric)
WHERE id = %(position_id)s AND status = 'CLOSING'
"""
REOPEN_POSITION = """
UPDATE active_positions
SET status = 'OPEN', qty = qty - %(filled)s::numeric, updated_at = %(now)s, version = version + 1,
    fees = fees + %(filled)s::numeric * %(fee_per_unit)s::numeric,
    realized_pnl = coalesce(realized_pnl, 0)
                   + (coalesce(%(price)s::numeric, avg_price) - avg_price) * %(filled)s::numeric * multiplier
                     * CASE WHEN side = 'short' THEN -1 ELSE 1 END
WHERE id = %(position_id)s AND status = 'CLOSING'
"""
_POSITION_SQL = {
    PositionAction.OPEN: OPEN_POSITION,
    PositionAction.RELEASE: RELEASE_POSITION,
    PositionAction.CLOSE: CLOSE_POSITION,
    PositionAction.REOPEN: REOPEN_POSITION,
}

# -- finish_recommendation --
# The recommendation follows its order: SUBMITTING while it works, one terminal status when it ends.
FINISH_RECOMMENDATION = """
UPDATE dispatch_recommendations
SET status = %(status)s, outcome_code = %(code)s, outcome_detail = %(detail)s, version = version + 1,
    decided_at = CASE WHEN %(status)s = 'SUBMITTING' THEN decided_at ELSE coalesce(decided_at, %(now)s) END
WHERE id = %(id)s AND status = 'SUBMITTING'
"""


@dataclass(frozen=True)
class BrokerFacts:
    """What a broker report carries besides its status: ids, prices, times, message."""

    broker_order_id: str | None = None
    filled_avg_price: Decimal | None = None
    filled_at: datetime | None = None
    message: str | None = None


@dataclass(frozen=True)
class Applied:
    """An event applied to one order: what changed, and the recommendation it belongs to."""

    recommendation_id: int
    transition: Transition


def apply_event(conn: psycopg.Connection, account_id: str, client_order_id: str, event: Event,
                facts: BrokerFacts, now: datetime) -> Applied | Illegal:
    """Apply one event to one order, its position and its recommendation, with compare-and-set.

    Returns what changed, or why nothing did (an illegal or stale event is logged, never
    applied). Raises Conflict when a row was not in the state loaded, and LookupError when the
    database has no such order.
    """
    row = conn.execute(LOAD_ORDER, {"account_id": account_id, "client_order_id": client_order_id}).fetchone()
    if row is None:
        raise LookupError(f"no execution row for client_order_id {client_order_id}")
    order = OrderState(ExecutionStatus(row["status"]), OrderRole(row["role"]), row["qty"], row["filled_qty"],
                       CancelReason(row["cancel_reason"]) if row["cancel_reason"] else None)
    result = transition(order, event)
    if isinstance(result, Illegal):
        log.log(logging.INFO if result.stale else logging.WARNING, "order event refused", extra={
            "client_order_id": client_order_id, "recommendation_id": row["recommendation_id"],
            "code": result.code, "reason": result.reason, "account_id": account_id})
        return result
    if not result.changed:
        return Applied(row["recommendation_id"], result)
    if result.filled_qty > order.filled_qty and facts.filled_avg_price is None:
        # A fill without its price cannot open or close a position at a known cost: wait for a
        # report that carries it (the next poll or stream update) rather than guess.
        refused = Illegal("NO_FILL_PRICE", f"filled_qty {order.filled_qty} -> {result.filled_qty} without a price")
        log.warning("order event refused", extra={
            "client_order_id": client_order_id, "recommendation_id": row["recommendation_id"],
            "code": refused.code, "reason": refused.reason, "account_id": account_id})
        return refused
    detail = facts.message or _fill_detail(event, facts)
    if conn.execute(UPDATE_EXECUTION, {
        "id": row["id"], "expected": row["status"], "version": row["version"], "status": result.execution,
        "broker_order_id": facts.broker_order_id, "filled_qty": result.filled_qty or None,
        "filled_avg_price": facts.filled_avg_price, "message": facts.message, "filled_at": facts.filled_at,
        "now": now,
    }).rowcount != 1:
        raise Conflict(f"execution {client_order_id} changed under this worker")
    if result.position is not PositionAction.NONE:
        _move_position(conn, row, result, facts, now)
    if conn.execute(FINISH_RECOMMENDATION, {
        "id": row["recommendation_id"], "status": result.recommendation, "code": result.code,
        "detail": detail, "now": now,
    }).rowcount != 1:
        # The order's truth is recorded; the recommendation was already final (rows from before
        # this table existed). Said loudly, never silently.
        log.error("recommendation not SUBMITTING while its order moved", extra={
            "recommendation_id": row["recommendation_id"], "recommendation_status": row["recommendation_status"],
            "client_order_id": client_order_id, "account_id": account_id})
    return Applied(row["recommendation_id"], result)


# -- apply_answer --
# The answer to a submission applied to the state its intent recorded, in one statement: the
# execution's compare-and-set (status and version), then its position's and its recommendation's,
# each only once the one before it matched. An execution that moved since its intent (a trade
# update or a poll applied first) matches nothing and nothing is written; a later miss calls
# lifecycle_conflict(), whose error undoes the whole statement. Sent with no transaction open,
# the statement is its own transaction: one round trip where apply_event takes six.
def _renamed(sql: str, **names: str) -> str:
    for old, new in names.items():
        sql = sql.replace(f"%({old})s", f"%({new})s")
    return sql.strip()


def _answer_sql(position_sql: str | None) -> str:
    execution = _renamed(UPDATE_EXECUTION, id="execution_id", status="execution_status")
    finish = _renamed(FINISH_RECOMMENDATION, id="recommendation_id", status="recommendation_status")
    position, after = "", "exec"
    if position_sql is not None:
        position = f"pos AS (\n{position_sql.strip()} AND EXISTS (SELECT 1 FROM exec)\nRETURNING id\n), "
        after = "pos"
    return f"""
WITH exec AS (
{execution}
RETURNING id
), {position}rec AS (
{finish} AND EXISTS (SELECT 1 FROM {after})
RETURNING id
)
SELECT CASE WHEN NOT EXISTS (SELECT 1 FROM exec) THEN false
            WHEN EXISTS (SELECT 1 FROM rec) THEN true
            ELSE lifecycle_conflict('answer to execution ' || %(execution_id)s) END AS applied
"""


APPLY_ANSWER = {action: _answer_sql(_POSITION_SQL.get(action)) for action in PositionAction}


def apply_answer(conn: psycopg.Connection, intent: Intent, event: Event, facts: BrokerFacts,
                 now: datetime) -> Applied | None:
    """Apply the answer to a submission to the state its intent recorded, in one round trip.

    None when it cannot be applied so: the order moved since its intent, or the answer is one
    the lifecycle table refuses, changes nothing, or fills without a price. The caller then
    applies it with `apply_event`, which loads the order first and says why. `conn` must have
    no transaction open.
    """
    order = OrderState(ExecutionStatus.SUBMITTING, intent.role, intent.qty)
    result = transition(order, event)
    if isinstance(result, Illegal) or not result.changed:
        return None
    if result.filled_qty > order.filled_qty and facts.filled_avg_price is None:
        return None
    if result.position is not PositionAction.NONE and intent.position_id is None:
        return None
    try:
        applied = conn.execute(APPLY_ANSWER[result.position], {
            "execution_id": intent.execution_id, "expected": order.status, "version": intent.version,
            "execution_status": result.execution, "broker_order_id": facts.broker_order_id,
            "filled_qty": result.filled_qty or None, "filled_avg_price": facts.filled_avg_price,
            "message": facts.message, "filled_at": facts.filled_at, "now": now,
            "position_id": intent.position_id, "qty": result.filled_qty, "filled": result.filled_qty,
            "price": facts.filled_avg_price, "fee_per_unit": intent.fee_per_unit, "exit_reason": intent.exit_reason,
            "recommendation_id": intent.recommendation_id, "recommendation_status": result.recommendation,
            "code": result.code, "detail": facts.message or _fill_detail(event, facts),
        }).fetchone()["applied"]
    except psycopg.errors.SerializationFailure:
        return None  # a position or recommendation moved while its execution had not: nothing written
    return Applied(intent.recommendation_id, result) if applied else None


def _move_position(conn: psycopg.Connection, row: dict, result: Transition, facts: BrokerFacts,
                   now: datetime) -> None:
    expected = PositionStatus.PENDING if row["role"] == OrderRole.ENTRY else PositionStatus.CLOSING
    if row["position_id"] is None or row["position_status"] != expected:
        log.error("position not in the state its order expects", extra={
            "position_id": row["position_id"], "position_status": row["position_status"],
            "expected": expected, "action": result.position, "recommendation_id": row["recommendation_id"]})
        return
    changed = conn.execute(_POSITION_SQL[result.position], {
        "position_id": row["position_id"], "qty": result.filled_qty, "filled": result.filled_qty,
        "price": facts.filled_avg_price, "now": now, "fee_per_unit": row["fee_per_unit"],
        "exit_reason": row["exit_reason"],
    }).rowcount
    if changed != 1:
        raise Conflict(f"position {row['position_id']} changed under this worker")


def _fill_detail(event: Event, facts: BrokerFacts) -> str:
    if event.broker_status is None:
        return event.kind.value
    return f"{event.broker_status} {event.filled_qty} @ {facts.filled_avg_price}"


# --- re-pricing -------------------------------------------------------------------------------

# -- working_limit_orders --
# Limit orders working at the broker with nothing filled yet: candidates for a new price. Those
# whose cancel was asked for already come too, to ask again when no answer came.
WORKING_LIMIT_ORDERS = """
SELECT e.id, e.client_order_id, e.recommendation_id, e.leg, e.attempt, e.side, e.symbol, e.instrument,
       e.submitted_at, e.updated_at, e.cancel_reason, e.role,
       (SELECT r.exit_reason FROM dispatch_recommendations r WHERE r.id = e.recommendation_id) AS exit_reason
FROM dispatch_executions e
WHERE e.account_id = %(account_id)s AND e.status = 'ACCEPTED' AND e.order_type = 'limit'
ORDER BY e.id
"""

# -- request_cancel --
# Why the cancel is about to be sent, recorded first: whoever sees the broker's "canceled" next
# (this process, another one, the stream, a poll after a crash) knows what follows it.
REQUEST_CANCEL = """
UPDATE dispatch_executions
SET cancel_reason = %(reason)s, replace_price = %(replace_price)s, updated_at = %(now)s, version = version + 1
WHERE account_id = %(account_id)s AND client_order_id = %(client_order_id)s
  AND status = 'ACCEPTED' AND cancel_reason IS NULL
"""

# -- awaiting_replacement --
# Attempts canceled for a new price whose next attempt is not recorded yet (the process that
# canceled may have died in between): the recommendation still waits for it.
AWAITING_REPLACEMENT = """
SELECT e.id, e.recommendation_id, e.leg, e.attempt, e.role, r.exit_reason
FROM dispatch_executions e
JOIN dispatch_recommendations r ON r.id = e.recommendation_id AND r.status = 'SUBMITTING'
WHERE e.account_id = %(account_id)s AND e.status = 'CANCELED' AND e.cancel_reason = 'REPRICE'
  AND coalesce(e.filled_qty, 0) = 0
  AND NOT EXISTS (SELECT 1 FROM dispatch_executions n
                  WHERE n.account_id = e.account_id AND n.recommendation_id = e.recommendation_id
                    AND n.leg = e.leg AND n.attempt > e.attempt)
ORDER BY e.id
"""

# -- record_next_attempt --
# The next attempt's intent, a copy of the canceled one at its new price and id, committed
# before it is sent. Two processes racing here insert one row: the unique (recommendation, leg,
# attempt) lets only one through, and only that one sends it.
RECORD_NEXT_ATTEMPT = """
INSERT INTO dispatch_executions (
    account_id, recommendation_id, leg, client_order_id, ticker, instrument, symbol, side, position_intent,
    qty, multiplier, est_price, notional, status, submitted_at, updated_at, strike, expiration, option_right,
    premium, quote, greeks, option_gates, role, position_id, order_type, limit_price, attempt, fee_per_unit)
SELECT account_id, recommendation_id, leg, %(client_order_id)s, ticker, instrument, symbol, side, position_intent,
       qty, multiplier, est_price, notional, 'SUBMITTING', %(now)s, %(now)s, strike, expiration, option_right,
       premium, quote, greeks, option_gates, role, position_id, 'limit', replace_price, attempt + 1, fee_per_unit
FROM dispatch_executions
WHERE id = %(execution_id)s AND status = 'CANCELED' AND cancel_reason = 'REPRICE'
ON CONFLICT (account_id, recommendation_id, leg, attempt) DO NOTHING
RETURNING id, recommendation_id, client_order_id, symbol, ticker, instrument, side, qty, position_intent,
          limit_price, attempt
"""


# -- give_up_replacement --
# An attempt canceled for a new price whose next attempt may not go out (the kill switch stops
# it): the cancel becomes the end of the order, so its reservation is released (an exit's
# position is OPEN again) and the recommendation ends, instead of waiting for a replacement
# that never comes. Only while no next attempt is recorded.
# -- lock_recommendation_of --
# The next attempt and its giving up both start here, so they take turns on the recommendation:
# the one that comes second runs its statement on a fresh snapshot and finds the first one's
# work (an attempt recorded, or the recommendation ended). Its own statement, for that reason.
LOCK_RECOMMENDATION_OF = """
SELECT r.status FROM dispatch_recommendations r
WHERE r.id = (SELECT recommendation_id FROM dispatch_executions WHERE id = %(execution_id)s)
FOR UPDATE
"""

GIVE_UP_REPLACEMENT = """
UPDATE dispatch_executions e
SET cancel_reason = 'GIVE_UP', replace_price = NULL, updated_at = %(now)s, version = e.version + 1
WHERE e.id = %(execution_id)s AND e.status = 'CANCELED' AND e.cancel_reason = 'REPRICE'
  AND coalesce(e.filled_qty, 0) = 0
  AND NOT EXISTS (SELECT 1 FROM dispatch_executions n
                  WHERE n.account_id = e.account_id AND n.recommendation_id = e.recommendation_id
                    AND n.leg = e.leg AND n.attempt > e.attempt)
RETURNING e.recommendation_id, e.role, e.position_id
"""


def give_up_replacement(conn: psycopg.Connection, execution_id: int, detail: str, now: datetime) -> bool:
    """End a re-priced order without its next attempt; False when another worker moved it first."""
    if not _recommendation_still_submitting(conn, execution_id):
        return False
    row = conn.execute(GIVE_UP_REPLACEMENT, {"execution_id": execution_id, "now": now}).fetchone()
    if row is None:
        return False
    if row["position_id"] is not None:
        sql = RELEASE_POSITION if row["role"] == OrderRole.ENTRY else REOPEN_POSITION
        if conn.execute(sql, {"position_id": row["position_id"], "filled": 0, "price": None, "now": now}).rowcount != 1:
            raise Conflict(f"position {row['position_id']} changed under this worker")
    conn.execute(FINISH_RECOMMENDATION, {"id": row["recommendation_id"], "status": "REJECTED",
                                         "code": "ORDER_GIVEN_UP", "detail": detail, "now": now})
    return True


def working_limit_orders(conn: psycopg.Connection, account_id: str) -> list[dict]:
    return conn.execute(WORKING_LIMIT_ORDERS, {"account_id": account_id}).fetchall()


def request_cancel(conn: psycopg.Connection, account_id: str, client_order_id: str, reason: CancelReason,
                   replace_price: Decimal | None, now: datetime) -> bool:
    """Record why a cancel is about to be sent; False when another worker already did, or the order moved."""
    return conn.execute(REQUEST_CANCEL, {
        "account_id": account_id, "client_order_id": client_order_id, "reason": reason.value,
        "replace_price": replace_price if reason is CancelReason.REPRICE else None, "now": now,
    }).rowcount == 1


# -- working_entries --
# Entry orders still working at the broker (nothing or part filled), for a kill switch that
# flattens the book: each is canceled, its cancel reason recorded first.
WORKING_ENTRIES = """
SELECT e.id, e.client_order_id, e.recommendation_id, e.cancel_reason, e.updated_at
FROM dispatch_executions e
WHERE e.account_id = %(account_id)s AND e.role = 'ENTRY' AND e.status IN ('ACCEPTED', 'PARTIALLY_FILLED')
ORDER BY e.id
"""
REQUEST_ENTRY_CANCEL = """
UPDATE dispatch_executions
SET cancel_reason = 'KILL_SWITCH', replace_price = NULL, updated_at = %(now)s, version = version + 1
WHERE account_id = %(account_id)s AND client_order_id = %(client_order_id)s AND role = 'ENTRY'
  AND status IN ('ACCEPTED', 'PARTIALLY_FILLED') AND cancel_reason IS NULL
"""


def working_entries(conn: psycopg.Connection, account_id: str) -> list[dict]:
    return conn.execute(WORKING_ENTRIES, {"account_id": account_id}).fetchall()


def request_entry_cancel(conn: psycopg.Connection, account_id: str, client_order_id: str, now: datetime) -> bool:
    """Record that the kill switch cancels this entry; False when already asked, or the order moved."""
    return conn.execute(REQUEST_ENTRY_CANCEL, {"account_id": account_id, "client_order_id": client_order_id,
                                               "now": now}).rowcount == 1


def awaiting_replacement(conn: psycopg.Connection, account_id: str) -> list[dict]:
    return conn.execute(AWAITING_REPLACEMENT, {"account_id": account_id}).fetchall()


def record_next_attempt(conn: psycopg.Connection, execution_id: int, client_order_id: str,
                        now: datetime) -> dict | None:
    """The next attempt's execution row (SUBMITTING), or None when another worker recorded it or
    the recommendation has ended (its replacement was given up)."""
    if not _recommendation_still_submitting(conn, execution_id):
        return None
    row = conn.execute(RECORD_NEXT_ATTEMPT, {"execution_id": execution_id, "client_order_id": client_order_id,
                                             "now": now}).fetchone()
    if row is not None:
        conn.execute(FINISH_RECOMMENDATION, {"id": row["recommendation_id"], "status": "SUBMITTING",
                                             "code": "ORDER_REPRICED",
                                             "detail": f"attempt {row['attempt']} at {row['limit_price']}",
                                             "now": now})
    return row


def _recommendation_still_submitting(conn: psycopg.Connection, execution_id: int) -> bool:
    row = conn.execute(LOCK_RECOMMENDATION_OF, {"execution_id": execution_id}).fetchone()
    return row is not None and row["status"] == "SUBMITTING"


# --- reconciliation -------------------------------------------------------------------------

# -- close_vanished --
# A position the broker no longer holds (expired, exercised, assigned, closed by hand), by id,
# only while it is still OPEN.
CLOSE_VANISHED = """
UPDATE active_positions SET status = 'CLOSED', closed_at = %(now)s, updated_at = %(now)s, version = version + 1,
    exit_reason = 'GONE_AT_BROKER'
WHERE account_id = %(account_id)s AND id = ANY(%(ids)s) AND status = 'OPEN'
RETURNING id, symbol
"""


def close_vanished(conn: psycopg.Connection, account_id: str, ids: list[int], now: datetime) -> list[dict]:
    return conn.execute(CLOSE_VANISHED, {"account_id": account_id, "ids": ids, "now": now}).fetchall()


# Marks live positions to the broker's current prices, all in one statement. A mark is not a
# state change: it neither bumps the version nor counts as activity. A row whose price did not
# move is not rewritten (a book of hundreds of positions costed ~9 ms a refresh otherwise).
MARK_POSITIONS = """
UPDATE active_positions p SET market_price = m.price
FROM unnest(%(symbols)s::text[], %(prices)s::numeric[]) AS m(symbol, price)
WHERE p.account_id = %(account_id)s AND p.symbol = m.symbol AND p.status IN ('OPEN', 'CLOSING')
  AND p.market_price IS DISTINCT FROM m.price
"""


def mark_positions(conn: psycopg.Connection, account_id: str, marks: dict[str, Decimal]) -> None:
    conn.execute(MARK_POSITIONS, {"account_id": account_id, "symbols": list(marks), "prices": list(marks.values())})


"""The account kill switch: state in Postgres, with a history of every change.

ACTIVE: trading. REDUCING: only risk-reducing orders; a daily-loss trip puts the account here
and it stays until the next session opens, whatever the P&L does meanwhile and across
restarts. HALTED: nothing goes out until an operator resumes, but the exits of a flatten the
operator asked for.

Flatten: with `risk.on_daily_loss: flatten` a trip writes an EXIT for every open position in
the transaction that trips it, so it happens once, with the trip; `halt --flatten` does the
same for the operator and keeps `flatten` set, so a position that opens later (an entry filled
after the halt) is flattened too. See `flatten_policy`.
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from datetime import date, datetime

import psycopg
from psycopg.pq import TransactionStatus

from services.adapters.postgres import exits_repo
from services.adapters import alerts
from services.domain.alerts import kill_switch_event


def atomic(conn: psycopg.Connection) -> AbstractContextManager:
    """A transaction for these statements, or the caller's when one is open: a savepoint there
    would cost two round trips and buy nothing (an error in here fails the caller's transaction
    as it is)."""
    if conn.info.transaction_status == TransactionStatus.INTRANS:
        return nullcontext()
    return conn.transaction()

log = logging.getLogger(__name__)

DAILY_LOSS_ACTOR = "daily-loss-limit"
SESSION_ROLL_ACTOR = "session-roll"


@dataclass(frozen=True)
class KillSwitch:
    state: str
    changed_by: str | None = None
    tripped_session: date | None = None
    flatten: bool = False


def flatten_policy(state: str, changed_by: str | None, flatten: bool, on_daily_loss: str) -> str | None:
    """The exit reason under which every open position is to be closed now, or None.

    A daily-loss REDUCING with the `flatten` policy: DAILY_LOSS_FLATTEN. A HALTED set with
    `halt --flatten`: OPERATOR_FLATTEN. Anything else (a REDUCING set by reconciliation or an
    operator, a plain halt) stops entries and leaves the book alone.
    """
    if state == "REDUCING" and changed_by == DAILY_LOSS_ACTOR and on_daily_loss == "flatten":
        return exits_repo.DAILY_LOSS_FLATTEN
    if state == "HALTED" and flatten:
        return exits_repo.OPERATOR_FLATTEN
    return None


def in_force(row: dict | None, session_day: date | None, on_daily_loss: str) -> tuple[str, str | None]:
    """(the state in force, the flatten's exit reason or None) of a `read_state` row.

    Without a session day (the calendar unavailable) a daily-loss latch cannot be shown expired:
    it stays in force.
    """
    if row is None:
        return "ACTIVE", None
    switch = KillSwitch(row["state"], row["changed_by"], row["tripped_session"], bool(row["flatten"]))
    state = effective_state(switch, session_day)[0] if session_day is not None else switch.state
    return state, flatten_policy(state, switch.changed_by, switch.flatten, on_daily_loss)


def effective_state(switch: KillSwitch | None, session_day: date) -> tuple[str, bool]:
    """The state in force on a trading day, and whether a latched daily-loss trip has expired.

    A daily-loss REDUCING belongs to the session it tripped in; from the next session on the
    account is ACTIVE again. Operator states never expire by themselves.
    """
    if switch is None or switch.state is None:
        return "ACTIVE", False
    if (
        switch.state == "REDUCING"
        and switch.changed_by == DAILY_LOSS_ACTOR
        and switch.tripped_session is not None
        and session_day > switch.tripped_session
    ):
        return "ACTIVE", True
    return switch.state, False


# The previous state is read by its own statement first: every part of one statement sees the
# same snapshot, so a CTE cannot read the row that the upsert beside it changes.
_PREVIOUS_STATE = "SELECT state FROM kill_switch WHERE account_id = %(account_id)s FOR UPDATE"

_SET_STATE = """
WITH upsert AS (
    INSERT INTO kill_switch (account_id, state, reason, changed_by, changed_at, tripped_session, flatten)
    VALUES (%(account_id)s, %(state)s, %(reason)s, %(by)s, %(now)s, %(tripped_session)s, %(flatten)s)
    ON CONFLICT (account_id) DO UPDATE
    SET state = EXCLUDED.state, reason = EXCLUDED.reason, changed_by = EXCLUDED.changed_by,
        changed_at = EXCLUDED.changed_at, tripped_session = EXCLUDED.tripped_session, flatten = EXCLUDED.flatten
    RETURNING account_id
)
INSERT INTO kill_switch_history (account_id, from_state, to_state, reason, changed_by, changed_at)
SELECT %(account_id)s, %(from_state)s, %(state)s, %(reason)s, %(by)s, %(now)s
FROM upsert
"""


def set_state(
    conn: psycopg.Connection,
    account_id: str,
    state: str,
    reason: str,
    changed_by: str,
    now: datetime,
    tripped_session: date | None = None,
    flatten: bool = False,
) -> list[dict]:
    """Set the state and append to the history, atomically (joins the caller's transaction).

    With `flatten` (HALTED only: `halt --flatten`) every open position gets its exit in the
    same transaction; returns those exits.
    """
    if state not in {"ACTIVE", "REDUCING", "HALTED"}:
        raise ValueError(f"unknown kill-switch state {state!r}")
    if flatten and state != "HALTED":
        raise ValueError("flatten is set with a halt; a daily-loss trip flattens by its policy")
    args = {"account_id": account_id, "state": state, "reason": reason, "by": changed_by,
            "now": now, "tripped_session": tripped_session, "flatten": flatten}
    exits: list[dict] = []
    with atomic(conn):
        previous = conn.execute(_PREVIOUS_STATE, args).fetchone()
        from_state = (previous["state"] if isinstance(previous, dict) else previous[0]) if previous else None
        conn.execute(_SET_STATE, {**args, "from_state": from_state})
        if flatten:
            exits = exits_repo.flatten(conn, account_id, exits_repo.OPERATOR_FLATTEN, reason, now, by=changed_by)
    log.warning("kill switch set", extra={"account_id": account_id, "state": state, "reason": reason,
                                          "changed_by": changed_by, "flatten": flatten, "exits": len(exits)})
    alerts.emit(kill_switch_event(state), account_id, from_state=from_state, state=state, reason=reason, changed_by=changed_by)
    if exits:
        alerts.emit(alerts.Event.FLATTEN, account_id, reason=reason, positions=len(exits), by=changed_by)
    return exits


def trip_daily_loss(conn: psycopg.Connection, account_id: str, reason: str, now: datetime, session_day: date,
                    on_daily_loss: str = "reduce_only") -> bool:
    """Move an ACTIVE account to REDUCING for the rest of the session. True when it tripped now.

    With `on_daily_loss="flatten"` the trip writes an EXIT for every open position in the same
    transaction: the trip happens once, and so do its exits.
    """
    with atomic(conn):
        tripped = restrict(conn, account_id, reason, DAILY_LOSS_ACTOR, now, session_day, latch_session=True)
        if tripped and on_daily_loss == "flatten":
            exits = exits_repo.flatten(conn, account_id, exits_repo.DAILY_LOSS_FLATTEN, reason, now, by=DAILY_LOSS_ACTOR)
            log.warning("daily-loss trip flattens the book", extra={
                "account_id": account_id, "positions": [e["ticker"] for e in exits]})
    return tripped


def restrict(conn: psycopg.Connection, account_id: str, reason: str, changed_by: str, now: datetime,
             session_day: date, latch_session: bool = False) -> bool:
    """Move an ACTIVE account to REDUCING; True when it changed. Never loosens a state.

    A HALTED account stays HALTED (stricter); an account already REDUCING is left as it is.
    With `latch_session` the restriction ends with the session (the daily-loss latch);
    otherwise an operator resumes.
    """
    with atomic(conn):
        row = conn.execute(
            "SELECT state, changed_by, tripped_session FROM kill_switch WHERE account_id = %s FOR UPDATE",
            (account_id,),
        ).fetchone()
        switch = KillSwitch(row["state"], row["changed_by"], row["tripped_session"]) if row else None
        # A latch from an earlier session has expired: today's loss trips it anew, for today.
        current, _ = effective_state(switch, session_day)
        if current != "ACTIVE":
            return False
        set_state(conn, account_id, "REDUCING", reason, changed_by, now,
                  tripped_session=session_day if latch_session else None)
    return True


def expire_latch(conn: psycopg.Connection, account_id: str, now: datetime, session_day: date) -> None:
    """Record the end of a daily-loss latch when a new session begins."""
    with atomic(conn):
        row = conn.execute(
            "SELECT state, changed_by, tripped_session FROM kill_switch WHERE account_id = %s FOR UPDATE",
            (account_id,),
        ).fetchone()
        if not row:
            return
        switch = KillSwitch(row["state"], row["changed_by"], row["tripped_session"])
        state, expired = effective_state(switch, session_day)
        if expired:
            set_state(conn, account_id, state, f"daily-loss latch of {switch.tripped_session} ended: new session {session_day}",
                      SESSION_ROLL_ACTOR, now)


def read_state(conn: psycopg.Connection, account_id: str) -> dict | None:
    return conn.execute(
        "SELECT state, reason, changed_by, changed_at, tripped_session, flatten FROM kill_switch WHERE account_id = %s",
        (account_id,),
    ).fetchone()

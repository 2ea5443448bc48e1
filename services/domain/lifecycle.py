"""The life of an order, its position and its recommendation: one pure, typed transition table.

Four vocabularies meet here, each a StrEnum:
- `BrokerOrderStatus`: Alpaca's order statuses, as the submit answer, the trade-updates stream
  and a lookup report them;
- `ExecutionStatus`: our execution row (one order);
- `PositionStatus`: the position the order opens or closes;
- `RecommendationStatus`: the recommendation that asked for the order.

`transition(order, event)` takes what we have recorded for one order and one event (a broker
report, a lookup that found nothing, a failure, an operator's word) and returns what changes
(the execution's new state and fill, what happens to the position, the recommendation's state
and outcome code) or an `Illegal` saying why the event cannot apply. Nothing here reads or
writes anything: the repository (`services/adapters/postgres/orders_repo.py`) loads the rows, asks this table, and writes
the answer with compare-and-set on the states it loaded.

Rules the table keeps:
- an order in a terminal state stays there; a repeated report of that state changes nothing;
- the filled quantity never goes down and never exceeds the order's quantity (a stale poll
  answer after a stream fill is refused, not applied);
- an entry's position is reserved (PENDING) while the order works, opens with what filled,
  and is released when nothing did; an exit's position is CLOSING while the order works,
  closes when everything filled, and is OPEN again with what is left otherwise;
- the recommendation stays SUBMITTING while its order works and takes exactly one terminal
  status when the order ends.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from enum import StrEnum


class BrokerOrderStatus(StrEnum):
    """Alpaca's order statuses (alpaca-py `OrderStatus`), every one of them."""

    NEW = "new"
    ACCEPTED = "accepted"
    PENDING_NEW = "pending_new"
    ACCEPTED_FOR_BIDDING = "accepted_for_bidding"
    PARTIALLY_FILLED = "partially_filled"
    FILLED = "filled"
    DONE_FOR_DAY = "done_for_day"
    CANCELED = "canceled"
    EXPIRED = "expired"
    REPLACED = "replaced"
    PENDING_CANCEL = "pending_cancel"
    PENDING_REPLACE = "pending_replace"
    PENDING_REVIEW = "pending_review"
    STOPPED = "stopped"
    REJECTED = "rejected"
    SUSPENDED = "suspended"
    CALCULATED = "calculated"
    HELD = "held"


class ExecutionStatus(StrEnum):
    SUBMITTING = "SUBMITTING"  # intent recorded; the order may or may not have reached the broker
    ACCEPTED = "ACCEPTED"  # working at the broker, nothing filled yet
    PARTIALLY_FILLED = "PARTIALLY_FILLED"  # working, some filled
    FILLED = "FILLED"
    CANCELED = "CANCELED"  # ended by the broker (canceled, expired, done for day, replaced), maybe partly filled
    REJECTED = "REJECTED"  # refused by the broker, nothing filled
    FAILED = "FAILED"  # never placed (not found after the grace period, or abandoned by an operator)


class PositionStatus(StrEnum):
    PENDING = "PENDING"  # reserved by an entry order still working
    OPEN = "OPEN"
    CLOSING = "CLOSING"  # an exit order is working on it
    CLOSED = "CLOSED"
    CANCELLED = "CANCELLED"  # the reservation was released: the entry filled nothing


class RecommendationStatus(StrEnum):
    PENDING = "PENDING"
    SUBMITTING = "SUBMITTING"  # its order is in flight or working
    EXECUTED = "EXECUTED"
    SKIPPED = "SKIPPED"
    REJECTED = "REJECTED"
    FAILED = "FAILED"


class CancelReason(StrEnum):
    """Why this system asked the broker to cancel an order (recorded before the cancel is sent)."""

    REPRICE = "REPRICE"  # replaced by the next attempt at a new limit price
    GIVE_UP = "GIVE_UP"  # unfilled after the last attempt: the order ends
    KILL_SWITCH = "KILL_SWITCH"  # an entry canceled because the kill switch flattens the book


class OrderRole(StrEnum):
    ENTRY = "ENTRY"  # opens the position it reserved
    EXIT = "EXIT"  # closes the position it took


class PositionAction(StrEnum):
    NONE = "NONE"
    OPEN = "OPEN"  # PENDING -> OPEN with the filled quantity and price
    RELEASE = "RELEASE"  # PENDING -> CANCELLED: nothing filled
    CLOSE = "CLOSE"  # CLOSING -> CLOSED: the exit filled everything
    REOPEN = "REOPEN"  # CLOSING -> OPEN with what the exit did not sell


class EventKind(StrEnum):
    BROKER_REPORT = "BROKER_REPORT"  # the submit answer, a stream update, a poll or a recovery lookup
    BROKER_REFUSED = "BROKER_REFUSED"  # the broker said no to the submit (HTTP 403/422): nothing placed
    NOT_FOUND = "NOT_FOUND"  # the broker has no such order, past the grace period: nothing placed
    OPERATOR_ABANDON = "OPERATOR_ABANDON"  # an operator, having checked the broker, declares it not placed


TERMINAL_EXECUTION = frozenset(
    {ExecutionStatus.FILLED, ExecutionStatus.CANCELED, ExecutionStatus.REJECTED, ExecutionStatus.FAILED}
)
WORKING_EXECUTION = frozenset({ExecutionStatus.ACCEPTED, ExecutionStatus.PARTIALLY_FILLED})
TERMINAL_RECOMMENDATION = frozenset(
    {RecommendationStatus.EXECUTED, RecommendationStatus.SKIPPED, RecommendationStatus.REJECTED,
     RecommendationStatus.FAILED}
)
LIVE_POSITION = frozenset({PositionStatus.PENDING, PositionStatus.OPEN, PositionStatus.CLOSING})

# What each broker status means for our execution row. Statuses not named as ending the order
# leave it working: the broker may still fill it (stopped, suspended, held, pending_*).
_ENDED = frozenset({BrokerOrderStatus.CANCELED, BrokerOrderStatus.EXPIRED, BrokerOrderStatus.DONE_FOR_DAY,
                    BrokerOrderStatus.REPLACED})


def execution_status_for(status: BrokerOrderStatus, filled_qty: Decimal, qty: Decimal) -> ExecutionStatus:
    """Our execution state for a broker status and fill. The one place that maps Alpaca's words to ours."""
    if status is BrokerOrderStatus.FILLED or (status is BrokerOrderStatus.CALCULATED and filled_qty >= qty):
        return ExecutionStatus.FILLED
    if (status is BrokerOrderStatus.REJECTED or status in _ENDED) and filled_qty >= qty:
        # Everything traded before the order ended: it filled. As a cancel, an exit would
        # reopen its position with nothing left in it.
        return ExecutionStatus.FILLED
    if status is BrokerOrderStatus.REJECTED:
        # A rejection after a partial fill keeps what filled: it ended like a cancel.
        return ExecutionStatus.CANCELED if filled_qty > 0 else ExecutionStatus.REJECTED
    if status in _ENDED:
        return ExecutionStatus.CANCELED
    return ExecutionStatus.PARTIALLY_FILLED if filled_qty > 0 else ExecutionStatus.ACCEPTED


def parse_broker_status(value: str) -> BrokerOrderStatus | None:
    """Alpaca's status string as the enum, or None for a word this table does not know."""
    try:
        return BrokerOrderStatus(str(value).lower())
    except ValueError:
        return None


@dataclass(frozen=True)
class OrderState:
    """What the database holds for one order, as the table needs it."""

    status: ExecutionStatus
    role: OrderRole
    qty: Decimal
    filled_qty: Decimal = Decimal(0)
    cancel_reason: CancelReason | None = None


@dataclass(frozen=True)
class Event:
    kind: EventKind
    broker_status: BrokerOrderStatus | None = None
    filled_qty: Decimal = Decimal(0)
    message: str | None = None

    @classmethod
    def report(cls, status: BrokerOrderStatus | str, filled_qty: Decimal | None = None,
               message: str | None = None) -> Event:
        parsed = status if isinstance(status, BrokerOrderStatus) else parse_broker_status(status)
        return cls(EventKind.BROKER_REPORT, parsed, filled_qty or Decimal(0), message)


@dataclass(frozen=True)
class Transition:
    """What one event changes. `changed` is False for a repeated report: nothing to write."""

    execution: ExecutionStatus
    filled_qty: Decimal
    position: PositionAction
    recommendation: RecommendationStatus
    code: str
    changed: bool = True


@dataclass(frozen=True)
class Illegal:
    """The event cannot apply to the order as recorded; it is logged and nothing is written.

    STALE_REPORT and FILL_WENT_BACK are older news (expected when a stream and a poll race);
    the other codes contradict what is recorded and deserve a look.
    """

    code: str
    reason: str

    @property
    def stale(self) -> bool:
        return self.code in ("STALE_REPORT", "FILL_WENT_BACK")


# Legal moves of an execution row. A terminal state has none: a later report that differs from
# it is refused (reconciliation finds what the broker really holds).
ALLOWED: dict[ExecutionStatus, frozenset[ExecutionStatus]] = {
    ExecutionStatus.SUBMITTING: frozenset(ExecutionStatus) - {ExecutionStatus.SUBMITTING},
    ExecutionStatus.ACCEPTED: frozenset({ExecutionStatus.ACCEPTED, ExecutionStatus.PARTIALLY_FILLED,
                                         ExecutionStatus.FILLED, ExecutionStatus.CANCELED, ExecutionStatus.REJECTED}),
    ExecutionStatus.PARTIALLY_FILLED: frozenset({ExecutionStatus.PARTIALLY_FILLED, ExecutionStatus.FILLED,
                                                 ExecutionStatus.CANCELED}),
    ExecutionStatus.FILLED: frozenset(),
    ExecutionStatus.CANCELED: frozenset(),
    ExecutionStatus.REJECTED: frozenset(),
    ExecutionStatus.FAILED: frozenset(),
}


def _target(order: OrderState, event: Event) -> tuple[ExecutionStatus, Decimal] | Illegal:
    if event.kind is EventKind.BROKER_REPORT:
        if event.broker_status is None:
            return Illegal("UNKNOWN_BROKER_STATUS", "the broker reported a status this system does not know")
        filled = event.filled_qty
        if filled < 0 or filled > order.qty:
            return Illegal("BAD_FILL", f"filled_qty={filled} outside 0..{order.qty}")
        return execution_status_for(event.broker_status, filled, order.qty), filled
    if event.kind is EventKind.BROKER_REFUSED:
        return ExecutionStatus.REJECTED, Decimal(0)
    if event.kind in (EventKind.NOT_FOUND, EventKind.OPERATOR_ABANDON):
        return ExecutionStatus.FAILED, Decimal(0)
    return Illegal("UNKNOWN_EVENT", f"event {event.kind}")


def transition(order: OrderState, event: Event) -> Transition | Illegal:
    """The change one event makes to an order, its position and its recommendation."""
    target = _target(order, event)
    if isinstance(target, Illegal):
        return target
    new, filled = target
    if new is order.status and filled == order.filled_qty:
        return Transition(new, filled, PositionAction.NONE, _recommendation(new, filled)[0],
                          _recommendation(new, filled)[1], changed=False)
    if new in WORKING_EXECUTION and filled <= order.filled_qty and order.status is not ExecutionStatus.SUBMITTING \
            and (order.status in TERMINAL_EXECUTION or filled < order.filled_qty):
        # An older picture of the order than the one recorded: the stream's "new" arriving after
        # the fill it preceded, a poll answered before a fill. Expected, and nothing to apply.
        return Illegal("STALE_REPORT", f"{order.status} filled={order.filled_qty} is newer than {_describe(event)}")
    if order.status in TERMINAL_EXECUTION or new not in ALLOWED[order.status]:
        return Illegal("ILLEGAL_TRANSITION", f"{order.status} -> {new} ({_describe(event)})")
    if filled < order.filled_qty:
        return Illegal("FILL_WENT_BACK", f"filled_qty {order.filled_qty} -> {filled} ({_describe(event)})")
    if new is ExecutionStatus.CANCELED and filled == 0 and order.cancel_reason is CancelReason.REPRICE:
        # Canceled to be replaced: the position stays reserved (or taken) for the next attempt,
        # and the recommendation waits for it.
        return Transition(new, filled, PositionAction.NONE, RecommendationStatus.SUBMITTING, "ORDER_REPRICING")
    rec, code = _recommendation(new, filled)
    if new is ExecutionStatus.CANCELED and filled == 0 and order.cancel_reason is CancelReason.GIVE_UP:
        code = "ORDER_GIVEN_UP"  # unfilled after its last price
    if new is ExecutionStatus.CANCELED and order.cancel_reason is CancelReason.KILL_SWITCH:
        code = "ORDER_CANCELED_KILL_SWITCH"  # what filled before the cancel is a position, flattened in turn
    return Transition(new, filled, _position_action(order.role, new, filled), rec, code)



def _position_action(role: OrderRole, new: ExecutionStatus, filled: Decimal) -> PositionAction:
    if new in WORKING_EXECUTION:
        return PositionAction.NONE
    if role is OrderRole.ENTRY:
        return PositionAction.OPEN if filled > 0 else PositionAction.RELEASE
    return PositionAction.CLOSE if new is ExecutionStatus.FILLED else PositionAction.REOPEN


def _recommendation(new: ExecutionStatus, filled: Decimal) -> tuple[RecommendationStatus, str]:
    if new is ExecutionStatus.SUBMITTING:
        return RecommendationStatus.SUBMITTING, "ORDER_SUBMITTING"
    if new is ExecutionStatus.ACCEPTED:
        return RecommendationStatus.SUBMITTING, "ORDER_ACCEPTED"
    if new is ExecutionStatus.PARTIALLY_FILLED:
        return RecommendationStatus.SUBMITTING, "ORDER_PARTIALLY_FILLED"
    if new is ExecutionStatus.FILLED:
        return RecommendationStatus.EXECUTED, "ORDER_FILLED"
    if filled > 0:  # ended with part of it filled: those shares are held
        return RecommendationStatus.EXECUTED, "ORDER_PARTIALLY_FILLED"
    if new is ExecutionStatus.CANCELED:
        return RecommendationStatus.REJECTED, "ORDER_CANCELED"
    if new is ExecutionStatus.REJECTED:
        return RecommendationStatus.REJECTED, "BROKER_REJECTED"
    return RecommendationStatus.FAILED, "ORDER_NOT_PLACED"


def _describe(event: Event) -> str:
    if event.kind is EventKind.BROKER_REPORT:
        return f"broker reports {event.broker_status} filled={event.filled_qty}"
    return event.kind.value


# --- recommendations without an order -----------------------------------------------------

# A recommendation's own moves. An order's outcome reaches it only through `transition`.
RECOMMENDATION_ALLOWED: dict[RecommendationStatus, frozenset[RecommendationStatus]] = {
    RecommendationStatus.PENDING: frozenset({RecommendationStatus.SUBMITTING, RecommendationStatus.SKIPPED,
                                             RecommendationStatus.FAILED}),
    RecommendationStatus.SUBMITTING: frozenset({RecommendationStatus.SUBMITTING, RecommendationStatus.EXECUTED,
                                                RecommendationStatus.REJECTED, RecommendationStatus.FAILED}),
    RecommendationStatus.EXECUTED: frozenset(),
    RecommendationStatus.SKIPPED: frozenset(),
    RecommendationStatus.REJECTED: frozenset(),
    RecommendationStatus.FAILED: frozenset(),
}


def recommendation_may_move(current: RecommendationStatus, new: RecommendationStatus) -> bool:
    return new in RECOMMENDATION_ALLOWED[current]

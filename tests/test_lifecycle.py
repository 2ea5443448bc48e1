"""The order lifecycle table: every broker status, the refusals, and random event sequences.

The expected table is written out by hand, one row per (broker status, fill), so a change to the
mapping shows up here as a changed row, not as a silently recomputed expectation.
"""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.domain.lifecycle import (
    TERMINAL_EXECUTION,
    TERMINAL_RECOMMENDATION,
    BrokerOrderStatus,
    Event,
    EventKind,
    ExecutionStatus,
    Illegal,
    OrderRole,
    OrderState,
    PositionAction,
    PositionStatus,
    RecommendationStatus,
    Transition,
    recommendation_may_move,
    transition,
)

B, X, P, R = BrokerOrderStatus, ExecutionStatus, PositionAction, RecommendationStatus
QTY = Decimal(10)
FILLS = {"none": Decimal(0), "partial": Decimal(4), "full": Decimal(10)}

# (broker status, fill) -> (execution, entry's position action, exit's position action, recommendation, code)
WORKING_NONE = (X.ACCEPTED, P.NONE, P.NONE, R.SUBMITTING, "ORDER_ACCEPTED")
WORKING_PART = (X.PARTIALLY_FILLED, P.NONE, P.NONE, R.SUBMITTING, "ORDER_PARTIALLY_FILLED")
FILLED = (X.FILLED, P.OPEN, P.CLOSE, R.EXECUTED, "ORDER_FILLED")
ENDED_NONE = (X.CANCELED, P.RELEASE, P.REOPEN, R.REJECTED, "ORDER_CANCELED")
ENDED_PART = (X.CANCELED, P.OPEN, P.REOPEN, R.EXECUTED, "ORDER_PARTIALLY_FILLED")
EXPECTED = {
    (B.NEW, "none"): WORKING_NONE,
    (B.NEW, "partial"): WORKING_PART,
    (B.NEW, "full"): WORKING_PART,
    (B.ACCEPTED, "none"): WORKING_NONE,
    (B.ACCEPTED, "partial"): WORKING_PART,
    (B.ACCEPTED, "full"): WORKING_PART,
    (B.PENDING_NEW, "none"): WORKING_NONE,
    (B.PENDING_NEW, "partial"): WORKING_PART,
    (B.PENDING_NEW, "full"): WORKING_PART,
    (B.ACCEPTED_FOR_BIDDING, "none"): WORKING_NONE,
    (B.ACCEPTED_FOR_BIDDING, "partial"): WORKING_PART,
    (B.ACCEPTED_FOR_BIDDING, "full"): WORKING_PART,
    (B.PARTIALLY_FILLED, "none"): WORKING_NONE,
    (B.PARTIALLY_FILLED, "partial"): WORKING_PART,
    # Working with everything filled: still working until the broker says filled.
    (B.PARTIALLY_FILLED, "full"): WORKING_PART,
    # "filled" is taken at its word whatever the fill says (the adapter reads filled_qty from the same order).
    (B.FILLED, "none"): (X.FILLED, P.RELEASE, P.CLOSE, R.EXECUTED, "ORDER_FILLED"),
    (B.FILLED, "partial"): FILLED,
    (B.FILLED, "full"): FILLED,
    (B.DONE_FOR_DAY, "none"): ENDED_NONE,
    (B.DONE_FOR_DAY, "partial"): ENDED_PART,
    (B.DONE_FOR_DAY, "full"): FILLED,
    (B.CANCELED, "none"): ENDED_NONE,
    (B.CANCELED, "partial"): ENDED_PART,
    # Everything traded before the cancel landed: the order filled (an exit closes, never
    # reopens a position of zero).
    (B.CANCELED, "full"): FILLED,
    (B.EXPIRED, "none"): ENDED_NONE,
    (B.EXPIRED, "partial"): ENDED_PART,
    (B.EXPIRED, "full"): FILLED,
    (B.REPLACED, "none"): ENDED_NONE,
    (B.REPLACED, "partial"): ENDED_PART,
    (B.REPLACED, "full"): FILLED,
    (B.PENDING_CANCEL, "none"): WORKING_NONE,
    (B.PENDING_CANCEL, "partial"): WORKING_PART,
    (B.PENDING_CANCEL, "full"): WORKING_PART,
    (B.PENDING_REPLACE, "none"): WORKING_NONE,
    (B.PENDING_REPLACE, "partial"): WORKING_PART,
    (B.PENDING_REPLACE, "full"): WORKING_PART,
    (B.PENDING_REVIEW, "none"): WORKING_NONE,
    (B.PENDING_REVIEW, "partial"): WORKING_PART,
    (B.PENDING_REVIEW, "full"): WORKING_PART,
    (B.STOPPED, "none"): WORKING_NONE,
    (B.STOPPED, "partial"): WORKING_PART,
    (B.STOPPED, "full"): WORKING_PART,
    (B.REJECTED, "none"): (X.REJECTED, P.RELEASE, P.REOPEN, R.REJECTED, "BROKER_REJECTED"),
    # A rejection after a partial fill keeps what filled: it ended like a cancel.
    (B.REJECTED, "partial"): ENDED_PART,
    (B.REJECTED, "full"): FILLED,
    (B.SUSPENDED, "none"): WORKING_NONE,
    (B.SUSPENDED, "partial"): WORKING_PART,
    (B.SUSPENDED, "full"): WORKING_PART,
    (B.CALCULATED, "none"): WORKING_NONE,
    (B.CALCULATED, "partial"): WORKING_PART,
    (B.CALCULATED, "full"): FILLED,
    (B.HELD, "none"): WORKING_NONE,
    (B.HELD, "partial"): WORKING_PART,
    (B.HELD, "full"): WORKING_PART,
}


def test_the_expected_table_names_every_alpaca_status_with_every_fill():
    assert set(EXPECTED) == {(s, f) for s in BrokerOrderStatus for f in FILLS}
    assert {s.value for s in BrokerOrderStatus} >= {"new", "filled", "canceled", "rejected", "held", "calculated"}


@pytest.mark.parametrize("role", list(OrderRole))
@pytest.mark.parametrize(("status", "fill"), sorted(EXPECTED, key=lambda k: (k[0].value, k[1])),
                         ids=lambda v: str(v))
def test_broker_report_from_submitting_gives_the_tabled_execution_position_and_recommendation(status, fill, role):
    execution, entry_action, exit_action, rec, code = EXPECTED[(status, fill)]
    result = transition(OrderState(X.SUBMITTING, role, QTY), Event.report(status, FILLS[fill]))
    assert result == Transition(execution, FILLS[fill], entry_action if role is OrderRole.ENTRY else exit_action,
                                rec, code, changed=True)


@pytest.mark.parametrize(("kind", "execution", "rec", "code"), [
    (EventKind.BROKER_REFUSED, X.REJECTED, R.REJECTED, "BROKER_REJECTED"),
    (EventKind.NOT_FOUND, X.FAILED, R.FAILED, "ORDER_NOT_PLACED"),
    (EventKind.OPERATOR_ABANDON, X.FAILED, R.FAILED, "ORDER_NOT_PLACED"),
])
@pytest.mark.parametrize(("role", "action"), [(OrderRole.ENTRY, P.RELEASE), (OrderRole.EXIT, P.REOPEN)])
def test_order_not_placed_from_submitting_releases_or_returns_the_position(kind, execution, rec, code, role, action):
    result = transition(OrderState(X.SUBMITTING, role, QTY), Event(kind))
    assert result == Transition(execution, Decimal(0), action, rec, code)


def test_broker_status_strings_are_read_case_insensitively():
    assert transition(OrderState(X.SUBMITTING, OrderRole.ENTRY, QTY), Event.report("FILLED", QTY)).execution is X.FILLED


# --- refusals -----------------------------------------------------------------------------------

TERMINAL_STATES = [(X.FILLED, QTY), (X.CANCELED, Decimal(4)), (X.CANCELED, Decimal(0)), (X.REJECTED, Decimal(0)),
                   (X.FAILED, Decimal(0))]
ANY_EVENT = [Event.report(B.FILLED, QTY), Event.report(B.CANCELED, Decimal(0)), Event.report(B.ACCEPTED),
             Event.report(B.PARTIALLY_FILLED, Decimal(6)), Event.report(B.REJECTED), Event(EventKind.NOT_FOUND),
             Event(EventKind.BROKER_REFUSED), Event(EventKind.OPERATOR_ABANDON)]


@pytest.mark.parametrize(("status", "filled"), TERMINAL_STATES, ids=lambda v: str(v))
@pytest.mark.parametrize("event", ANY_EVENT, ids=lambda e: f"{e.kind}-{e.broker_status}-{e.filled_qty}")
@pytest.mark.parametrize("role", list(OrderRole))
def test_terminal_order_refuses_any_different_report(status, filled, event, role):
    order = OrderState(status, role, QTY, filled)
    result = transition(order, event)
    if isinstance(result, Transition):  # only the identical report passes, and it changes nothing
        assert (result.execution, result.filled_qty, result.changed, result.position) == (
            status, filled, False, P.NONE)
    elif event.broker_status in (B.ACCEPTED, B.PARTIALLY_FILLED) and event.filled_qty <= filled:
        assert (result.code, result.stale) == ("STALE_REPORT", True)  # an older picture: expected
    else:
        assert (result.code, result.stale) == ("ILLEGAL_TRANSITION", False)


@pytest.mark.parametrize(("status", "filled", "event"), [
    (X.PARTIALLY_FILLED, Decimal(6), Event.report(B.PARTIALLY_FILLED, Decimal(4))),
    (X.PARTIALLY_FILLED, Decimal(6), Event.report(B.CANCELED, Decimal(4))),
    (X.PARTIALLY_FILLED, Decimal(6), Event.report(B.FILLED, Decimal(5))),
])
def test_fill_going_back_is_refused(status, filled, event):
    result = transition(OrderState(status, OrderRole.ENTRY, QTY, filled), event)
    assert isinstance(result, Illegal) and result.code in ("FILL_WENT_BACK", "STALE_REPORT") and result.stale


def test_stale_accepted_poll_after_a_partial_fill_is_refused():
    # A poll answer older than a stream fill: "accepted, nothing filled" must not undo the fill.
    result = transition(OrderState(X.PARTIALLY_FILLED, OrderRole.EXIT, QTY, Decimal(6)), Event.report(B.ACCEPTED))
    assert isinstance(result, Illegal) and result.stale


def test_the_streams_new_event_after_the_fill_it_preceded_is_stale_not_a_contradiction():
    result = transition(OrderState(X.FILLED, OrderRole.ENTRY, QTY, QTY), Event.report(B.NEW))
    assert (result.code, result.stale) == ("STALE_REPORT", True)


@pytest.mark.parametrize("filled", [Decimal(11), Decimal("10.0001"), Decimal(-1)])
@pytest.mark.parametrize("status", [X.SUBMITTING, X.ACCEPTED, X.PARTIALLY_FILLED])
def test_fill_outside_zero_to_qty_is_refused(status, filled):
    result = transition(OrderState(status, OrderRole.ENTRY, QTY, Decimal(0) if status is not X.PARTIALLY_FILLED
                                   else Decimal(2)), Event.report(B.PARTIALLY_FILLED, filled))
    assert isinstance(result, Illegal) and result.code == "BAD_FILL"


@pytest.mark.parametrize("kind", [EventKind.NOT_FOUND, EventKind.OPERATOR_ABANDON])
@pytest.mark.parametrize("status", [X.ACCEPTED, X.PARTIALLY_FILLED])
def test_not_placed_after_the_broker_accepted_is_refused(kind, status):
    filled = Decimal(3) if status is X.PARTIALLY_FILLED else Decimal(0)
    result = transition(OrderState(status, OrderRole.ENTRY, QTY, filled), Event(kind))
    assert isinstance(result, Illegal) and result.code == "ILLEGAL_TRANSITION"


@pytest.mark.parametrize("word", ["", "zombie", "partially filled", "cancelled"])
def test_unknown_broker_status_is_refused(word):
    result = transition(OrderState(X.SUBMITTING, OrderRole.ENTRY, QTY), Event.report(word, Decimal(0)))
    assert result == Illegal("UNKNOWN_BROKER_STATUS", "the broker reported a status this system does not know")


@pytest.mark.parametrize(("status", "filled", "event", "rec", "code"), [
    (X.ACCEPTED, Decimal(0), Event.report(B.NEW), R.SUBMITTING, "ORDER_ACCEPTED"),
    (X.PARTIALLY_FILLED, Decimal(4), Event.report(B.PARTIALLY_FILLED, Decimal(4)), R.SUBMITTING,
     "ORDER_PARTIALLY_FILLED"),
    (X.FILLED, QTY, Event.report(B.FILLED, QTY), R.EXECUTED, "ORDER_FILLED"),
    (X.CANCELED, Decimal(0), Event.report(B.EXPIRED), R.REJECTED, "ORDER_CANCELED"),
    (X.REJECTED, Decimal(0), Event(EventKind.BROKER_REFUSED), R.REJECTED, "BROKER_REJECTED"),
    (X.FAILED, Decimal(0), Event(EventKind.NOT_FOUND), R.FAILED, "ORDER_NOT_PLACED"),
])
@pytest.mark.parametrize("role", list(OrderRole))
def test_repeated_identical_report_changes_nothing(status, filled, event, rec, code, role):
    result = transition(OrderState(status, role, QTY, filled), event)
    assert result == Transition(status, filled, P.NONE, rec, code, changed=False)


# --- random event sequences ---------------------------------------------------------------------

_EXPECTED_POSITION = {OrderRole.ENTRY: PositionStatus.PENDING, OrderRole.EXIT: PositionStatus.CLOSING}
_FINAL_POSITION = frozenset({PositionStatus.CLOSED, PositionStatus.CANCELLED})


class Model:
    """The three rows of one order as the repository writes them: each move from the one state it expects."""

    def __init__(self, role: OrderRole, qty: Decimal):
        self.order = OrderState(X.SUBMITTING, role, qty)
        # An entry reserves its position; an exit has taken an OPEN one (CLOSING) of the same size.
        self.position = (_EXPECTED_POSITION[role], qty)
        self.recommendation = R.SUBMITTING
        self.recommendation_moves = 0

    def apply(self, event: Event) -> None:
        result = transition(self.order, event)
        if isinstance(result, Illegal) or not result.changed:
            return
        self.order = OrderState(result.execution, self.order.role, self.order.qty, result.filled_qty)
        status, qty = self.position
        if result.position is not P.NONE and status is _EXPECTED_POSITION[self.order.role]:
            self.position = {
                P.OPEN: (PositionStatus.OPEN, result.filled_qty),
                P.RELEASE: (PositionStatus.CANCELLED, qty),
                P.CLOSE: (PositionStatus.CLOSED, qty),
                P.REOPEN: (PositionStatus.OPEN, qty - result.filled_qty),
            }[result.position]
        if self.recommendation is R.SUBMITTING and result.recommendation is not R.SUBMITTING:
            assert recommendation_may_move(self.recommendation, result.recommendation)
            self.recommendation = result.recommendation
            self.recommendation_moves += 1


def events(qty: int):
    fill = st.integers(min_value=-1, max_value=qty + 1).map(Decimal)
    report = st.builds(Event.report, st.sampled_from(list(BrokerOrderStatus) + ["zombie"]), fill)
    other = st.sampled_from([Event(EventKind.NOT_FOUND), Event(EventKind.BROKER_REFUSED),
                             Event(EventKind.OPERATOR_ABANDON)])
    return st.lists(st.one_of(report, report, report, other), max_size=12)


@st.composite
def scenarios(draw):
    qty = draw(st.integers(min_value=1, max_value=12))
    role = draw(st.sampled_from(list(OrderRole)))
    if draw(st.booleans()):
        evs = draw(events(qty))
    else:  # fills that only grow: the orderly life of a working order
        steps = draw(st.lists(st.tuples(st.sampled_from(list(BrokerOrderStatus)), st.integers(0, 3)), max_size=8))
        filled, evs = 0, []
        for status, step in steps:
            filled = min(qty, filled + step)
            evs.append(Event.report(status, Decimal(filled)))
    return role, Decimal(qty), evs


@settings(max_examples=200, deadline=None)
@given(scenarios())
def test_random_event_sequences_keep_order_position_and_recommendation_consistent(scenario):
    role, qty, evs = scenario
    m = Model(role, qty)
    seen_final_position = None
    for event in evs:
        before = (m.order, m.recommendation)
        m.apply(event)
        status, pos_qty = m.position
        # Quantities: never negative; an open position holds something.
        assert pos_qty >= 0
        assert status is not PositionStatus.OPEN or pos_qty > 0
        # The fill never decreases and never exceeds the order.
        assert before[0].filled_qty <= m.order.filled_qty <= qty
        # A terminal execution never moves.
        if before[0].status in TERMINAL_EXECUTION:
            assert m.order == before[0]
        # One status at a time, and a closed or released position never moves again.
        assert isinstance(status, PositionStatus)
        if seen_final_position is not None:
            assert m.position == seen_final_position
        if status in _FINAL_POSITION:
            seen_final_position = m.position
        # The recommendation leaves SUBMITTING at most once, for a terminal status, and stays there.
        assert m.recommendation_moves <= 1
        if before[1] in TERMINAL_RECOMMENDATION:
            assert m.recommendation is before[1]
        assert m.recommendation is R.SUBMITTING or m.recommendation in TERMINAL_RECOMMENDATION
        # An ended order has a final recommendation and a settled position.
        if m.order.status in TERMINAL_EXECUTION:
            assert m.recommendation in TERMINAL_RECOMMENDATION
            assert status not in (PositionStatus.PENDING, PositionStatus.CLOSING)
        else:
            assert m.recommendation is R.SUBMITTING

"""The answer to a submission applied in one statement to the state its intent recorded.

The statement is compare-and-set on each row (execution, position, recommendation). When the
order moved after its intent (the stream's fill applied first) or a row moved under it, nothing
of it is written and the answer goes the general way, the order loaded first: applied once.
"""

from __future__ import annotations

from decimal import Decimal

from services.adapters.postgres import orders_repo
from services.adapters.postgres.orders_repo import BrokerFacts
from services.dispatcher.main import Dispatcher
from services.domain.broker import TradeUpdate, client_order_id
from services.domain.lifecycle import Event, OrderRole, PositionAction
from tests.broker_doubles import TimesOutThenNotFound, Wrapping
from tests.factories import ACCOUNT, WORLD_NOW, add_recommendation

NOW = WORLD_NOW


def order_rows(conn, rec_id: int) -> dict:
    return conn.execute("""
        SELECT e.id, e.status, e.version, e.filled_qty, e.qty, e.fee_per_unit, p.id AS position_id,
               p.status AS position_status, p.qty AS position_qty, p.fees, p.version AS position_version,
               r.status AS rec_status, r.outcome_code, r.version AS rec_version
        FROM dispatch_executions e JOIN active_positions p ON p.id = e.position_id
        JOIN dispatch_recommendations r ON r.id = e.recommendation_id
        WHERE e.recommendation_id = %s""", (rec_id,)).fetchone()


def submitting_entry(world, conn) -> tuple[Dispatcher, int, orders_repo.Intent]:
    """An entry whose intent is committed and whose submission never answered (left SUBMITTING)."""
    dispatcher, _ = world
    d = dispatcher(TimesOutThenNotFound)
    rid = add_recommendation(conn, "AAPL", NOW)
    assert d.process_next().code == "ORDER_STATE_UNKNOWN"
    row = order_rows(conn, rid)
    assert (row["status"], row["position_status"], row["rec_status"]) == ("SUBMITTING", "PENDING", "SUBMITTING")
    return d, rid, orders_repo.Intent(row["id"], row["version"], rid, row["position_id"], OrderRole.ENTRY,
                                      row["qty"], row["fee_per_unit"])


def fill(qty) -> tuple[Event, BrokerFacts]:
    return Event.report("filled", Decimal(qty)), BrokerFacts("b-1", Decimal("200.10"), NOW)


def test_apply_answer_when_every_row_is_as_its_intent_left_it_then_all_three_move_in_one_statement(world, conn):
    d, rid, intent = submitting_entry(world, conn)
    event, facts = fill(intent.qty)
    with d.pool.connection() as c:
        applied = orders_repo.apply_answer(c, intent, event, facts, NOW)
    assert applied is not None and applied.transition.position is PositionAction.OPEN
    row = order_rows(conn, rid)
    assert (row["status"], row["version"], row["filled_qty"]) == ("FILLED", 1, intent.qty)
    assert (row["position_status"], row["position_qty"], row["rec_status"], row["outcome_code"]) == (
        "OPEN", intent.qty, "EXECUTED", "ORDER_FILLED")


def test_apply_answer_when_the_execution_moved_since_its_intent_then_writes_nothing_and_says_so(world, conn):
    d, rid, intent = submitting_entry(world, conn)
    conn.execute("UPDATE dispatch_executions SET version = version + 1 WHERE id = %s", (intent.execution_id,))
    before = order_rows(conn, rid)
    with d.pool.connection() as c:
        assert orders_repo.apply_answer(c, intent, *fill(intent.qty), NOW) is None
    assert order_rows(conn, rid) == before


def test_apply_answer_when_the_position_moved_but_not_the_execution_then_the_whole_statement_is_undone(
        world, conn):
    d, rid, intent = submitting_entry(world, conn)
    # A writer outside the order's events (none exists today) moves the reserved position.
    conn.execute("UPDATE active_positions SET status = 'CANCELLED' WHERE id = %s", (intent.position_id,))
    before = order_rows(conn, rid)
    with d.pool.connection() as c:
        assert orders_repo.apply_answer(c, intent, *fill(intent.qty), NOW) is None
    after = order_rows(conn, rid)
    assert after == before  # the execution's update, which matched, was undone with the statement
    assert (after["status"], after["version"]) == ("SUBMITTING", 0)


def test_apply_answer_when_the_recommendation_moved_then_nothing_is_written(world, conn):
    d, rid, intent = submitting_entry(world, conn)
    conn.execute("UPDATE dispatch_recommendations SET status = 'FAILED' WHERE id = %s", (rid,))
    before = order_rows(conn, rid)
    with d.pool.connection() as c:
        assert orders_repo.apply_answer(c, intent, *fill(intent.qty), NOW) is None
    assert order_rows(conn, rid) == before


def test_apply_answer_when_the_answer_is_no_step_from_submitting_then_left_to_the_general_path(world, conn):
    d, rid, intent = submitting_entry(world, conn)
    before = order_rows(conn, rid)
    with d.pool.connection() as c:
        # A fill without its price: the general path refuses it with its reason.
        assert orders_repo.apply_answer(c, intent, Event.report("filled", intent.qty), BrokerFacts(), NOW) is None
    assert order_rows(conn, rid) == before


class StreamFirst(Wrapping):
    """The trade-updates stream delivers the fill before the submit's own answer comes back."""

    dispatcher: Dispatcher

    def submit_order(self, order):
        result = self.inner.submit_order(order)
        self.dispatcher.on_trade_update(TradeUpdate("fill", result, NOW, result.filled_qty, result.filled_avg_price))
        return result


def test_submit_answer_after_the_stream_applied_the_fill_then_the_fill_is_recorded_once(world, conn):
    dispatcher, _ = world
    d = dispatcher(StreamFirst)
    d.broker.dispatcher = d
    rid = add_recommendation(conn, "AAPL", NOW)
    outcome = d.process_next()
    assert (outcome.status, outcome.code) == ("EXECUTED", "ORDER_FILLED")
    row = order_rows(conn, rid)
    # One transition each: the stream's; the submit's answer found the order moved and changed nothing.
    assert (row["status"], row["version"], row["position_status"], row["position_version"], row["rec_status"]) == (
        "FILLED", 1, "OPEN", 1, "EXECUTED")
    assert row["position_qty"] == row["filled_qty"] == row["qty"]
    assert row["fees"] == row["qty"] * row["fee_per_unit"]  # the entry's fee, paid once
    assert client_order_id(ACCOUNT, rid) == conn.execute(
        "SELECT client_order_id FROM dispatch_executions WHERE recommendation_id = %s", (rid,)).fetchone()[
        "client_order_id"]

"""The kill switch's latch rule (pure) and its state transitions in Postgres."""

from datetime import date, datetime, timezone

import pytest

from services.adapters.postgres import kill_switch
from services.adapters.postgres.kill_switch import DAILY_LOSS_ACTOR, KillSwitch, effective_state

WED, FRI = date(2026, 11, 25), date(2026, 11, 27)  # Thanksgiving between them
NOW = datetime(2026, 11, 27, 15, 0, tzinfo=timezone.utc)
ACCOUNT = "acct-ks"


@pytest.mark.parametrize(
    "switch, session_day, state, expired",
    [
        (None, WED, "ACTIVE", False),
        (KillSwitch("REDUCING", DAILY_LOSS_ACTOR, WED), WED, "REDUCING", False),  # same session: latched
        (KillSwitch("REDUCING", DAILY_LOSS_ACTOR, WED), FRI, "ACTIVE", True),  # next session: expired
        (KillSwitch("REDUCING", "operator:alice", WED), FRI, "REDUCING", False),  # an operator's never expires
        (KillSwitch("HALTED", "operator:alice", None), FRI, "HALTED", False),
    ],
)
def test_effective_state_latches_a_daily_loss_trip_until_the_next_session(switch, session_day, state, expired):
    assert effective_state(switch, session_day) == (state, expired)


def test_trip_on_a_new_session_replaces_yesterdays_expired_latch(conn):
    kill_switch.set_state(conn, ACCOUNT, "REDUCING", "loss", DAILY_LOSS_ACTOR, NOW, tripped_session=WED)
    assert kill_switch.trip_daily_loss(conn, ACCOUNT, "loss again", NOW, FRI) is True
    row = kill_switch.read_state(conn, ACCOUNT)
    assert (row["state"], row["tripped_session"]) == ("REDUCING", FRI)


def test_trip_leaves_a_halted_account_halted(conn):
    kill_switch.set_state(conn, ACCOUNT, "HALTED", "incident", "operator:bob", NOW)
    assert kill_switch.trip_daily_loss(conn, ACCOUNT, "loss", NOW, FRI) is False
    assert kill_switch.read_state(conn, ACCOUNT)["state"] == "HALTED"


def test_unknown_state_is_refused(conn):
    with pytest.raises(ValueError):
        kill_switch.set_state(conn, ACCOUNT, "PAUSED", "typo", "operator:bob", NOW)


def test_reconciliation_records_an_order_the_database_does_not_know_and_stops_entries(db_url, conn):
    """A broker order with no execution row (a restored database, a manual trade) is recorded, and
    the account goes to REDUCING; a second pass records nothing new."""
    import uuid
    from decimal import Decimal

    from services.common.clock import FixedClock
    from services.common.db import make_pool
    from services.common.params import load_params_file
    from services.dispatcher.main import Dispatcher, StaticParams
    from services.adapters.sim.broker import SimBroker

    clock = FixedClock(NOW)
    conn.execute(
        """INSERT INTO sim_orders (id, account_id, client_order_id, symbol, underlying, asset_class, side, qty,
                                   multiplier, status, filled_qty, filled_avg_price, submitted_at, filled_at)
           VALUES (%s, %s, 'manual-1', 'AAPL', 'AAPL', 'us_equity', 'buy', 10, 1, 'filled', 10, 200, %s, %s)""",
        (uuid.uuid4(), ACCOUNT, NOW, NOW))
    pool = make_pool(db_url)
    try:
        d = Dispatcher(pool, SimBroker(pool, ACCOUNT, clock), StaticParams(load_params_file()), ACCOUNT, clock=clock)
        assert d.reconcile_broker_orders() == 1
        assert d.reconcile_broker_orders() == 0
    finally:
        pool.close()
    row = conn.execute("SELECT client_order_id, symbol, qty FROM unknown_broker_orders WHERE account_id = %s",
                       (ACCOUNT,)).fetchone()
    assert (row["client_order_id"], row["symbol"], row["qty"]) == ("manual-1", "AAPL", Decimal("10"))
    state = kill_switch.read_state(conn, ACCOUNT)
    assert (state["state"], state["changed_by"]) == ("REDUCING", "reconciliation")
    assert state["reason"].startswith("UNKNOWN_BROKER_ORDER")


def test_a_daily_loss_trips_the_switch_even_when_another_gate_denied_first(db_url, conn):
    from services.common.clock import FixedClock
    from services.common.db import make_pool
    from services.common.params import load_params_file
    from services.dispatcher.main import Dispatcher, StaticParams
    from services.adapters.sim.broker import SimBroker
    from tests.factories import add_market, add_recommendation, et, set_account_state

    now = et("2026-11-30", "10:00")
    add_market(conn, "AAPL", now, 200)
    set_account_state(conn, now, equity=99_000, last_equity=100_000, account=ACCOUNT)  # a 1,000 loss
    add_recommendation(conn, "AAPL", now, confidence=0.1, account=ACCOUNT)  # low confidence fails first
    pool = make_pool(db_url)
    try:
        clock = FixedClock(now)
        Dispatcher(pool, SimBroker(pool, ACCOUNT, clock), StaticParams(load_params_file()), ACCOUNT,
                   clock=clock).drain()
    finally:
        pool.close()
    state = kill_switch.read_state(conn, ACCOUNT)
    assert (state["state"], state["changed_by"]) == ("REDUCING", DAILY_LOSS_ACTOR)


def test_reconciliation_compares_each_broker_order_once_and_still_catches_a_new_one(db_url, conn):
    """The broker's list of the day is compared every 30 s; an order compared once (ours, or
    recorded unknown) is not sent again until the next full comparison, yet the comparison
    stays fresh and a later manual order is caught at once."""
    import uuid
    from datetime import timedelta

    from services.common.clock import FixedClock
    from services.common.db import make_pool
    from services.common.params import load_params_file
    from services.dispatcher.main import Dispatcher, StaticParams
    from services.dispatcher.reconciliation import FULL_ORDER_COMPARE_EVERY
    from services.adapters.sim.broker import SimBroker
    from tests.factories import set_account_state

    def manual(cid: str) -> None:
        conn.execute(
            """INSERT INTO sim_orders (id, account_id, client_order_id, symbol, underlying, asset_class, side, qty,
                                       multiplier, status, filled_qty, filled_avg_price, submitted_at, filled_at)
               VALUES (%s, %s, %s, 'AAPL', 'AAPL', 'us_equity', 'buy', 10, 1, 'filled', 10, 200, %s, %s)""",
            (uuid.uuid4(), ACCOUNT, cid, clock.now(), clock.now()))

    clock = FixedClock(NOW)
    set_account_state(conn, NOW, 100_000, 100_000, account=ACCOUNT, orders_reconciled_at=None)
    manual("manual-1")
    pool = make_pool(db_url)
    try:
        d = Dispatcher(pool, SimBroker(pool, ACCOUNT, clock), StaticParams(load_params_file()), ACCOUNT, clock=clock)
        assert d.reconcile_broker_orders() == 1
        assert d.reconciler._compared == {r["id"] for r in conn.execute("SELECT id::text FROM sim_orders")}
        clock.advance(timedelta(seconds=30))
        assert d.reconcile_broker_orders() == 0
        reconciled = conn.execute("SELECT orders_reconciled_at FROM account_state WHERE account_id = %s",
                                  (ACCOUNT,)).fetchone()["orders_reconciled_at"]
        assert reconciled == clock.now()  # nothing new to compare, and the comparison is still fresh
        clock.advance(timedelta(seconds=30))
        manual("manual-2")
        assert d.reconcile_broker_orders() == 1
        # A database that lost what it knew under the running process (restored, failed over):
        # the next full comparison, within FULL_ORDER_COMPARE_EVERY, finds the order again.
        conn.execute("DELETE FROM unknown_broker_orders WHERE client_order_id = 'manual-1'")
        clock.advance(timedelta(seconds=30))
        assert d.reconcile_broker_orders() == 0
        clock.advance(FULL_ORDER_COMPARE_EVERY)
        assert d.reconcile_broker_orders() == 1
    finally:
        pool.close()
    assert [r["client_order_id"] for r in conn.execute(
        "SELECT client_order_id FROM unknown_broker_orders ORDER BY found_at")] == ["manual-2", "manual-1"]

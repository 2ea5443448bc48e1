"""Orders for symbols that do not exist never leave: the dispatcher with the asset gate, end to end.

With bars and features present for them, recommendations for `b00`, `NULL`, an emoji and an SQL
fragment once passed every gate and reached POST /v2/orders (422 "asset not found"). Here the
real dispatcher decides them over the real SDK against the local Alpaca server (and over the
simulated broker): each ends SKIPPED with its code, no order request is made for it, and a
valid recommendation queued behind them still trades.
"""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal


from services.common.clock import FixedClock
from services.adapters.alpaca.client import AlpacaBroker
from services.domain.broker import client_order_id
from services.dispatcher.main import Dispatcher
from services.adapters.sim.broker import SimBroker
from tests.factories import pinned_params, ACCOUNT, add_market, add_recommendation, et, recommendation
from tests.fake_alpaca import FakeAlpaca, fake_alpaca  # noqa: F401
from tests.test_alpaca_adapter import SleepRecorder, settings

NOW = et("2026-11-30", "10:00")
GOOD = "GOODT"
SQL = "AAPL'; DROP TABLE x;--"
# Each symbol that does not exist, and the code it must end with.
NONEXISTENT = [("b00", "BAD_SYMBOL"), ("NULL", "NO_ASSET"), ("📈", "BAD_SYMBOL"), (SQL, "BAD_SYMBOL")]
PINNED = {"max_bar_age_seconds": 180, "max_feature_age_seconds": 300, "min_confidence_day_trade": 0.6,
          "max_open_positions": 10, "max_notional_exposure": 10_000, "max_notional_per_trade": 2_000,
          "max_equity_pct_per_trade": 0.10, "max_account_state_age_seconds": 600}


def params():
    return pinned_params(PINNED)


def alpaca_dispatcher(pool, fake: FakeAlpaca, clock: FixedClock) -> Dispatcher:
    broker = AlpacaBroker(settings(fake), clock=clock, sleep=SleepRecorder())
    return Dispatcher(pool, broker, params(), ACCOUNT, clock=clock)


def plant(conn, symbols: list[str]) -> dict[str, int]:
    """Fresh bars and features for every symbol, and one BUY each, queued in this order."""
    ids = {}
    for i, symbol in enumerate(symbols):
        add_market(conn, symbol, NOW, 100)
        ids[symbol] = add_recommendation(conn, symbol, NOW - timedelta(seconds=len(symbols) - i))
    return ids


def asset_gate(rec: dict) -> dict:
    found = [g for g in rec["gate_results"] if g["name"] == "asset"]
    assert len(found) == 1, rec["gate_results"]
    return found[0]


def test_nonexistent_symbols_with_bars_then_skipped_with_their_code_and_no_order_request(pool, conn, fake_alpaca):
    fake_alpaca.add_asset(GOOD)
    fake_alpaca.fill_prices[GOOD] = Decimal("100.02")
    clock = FixedClock(NOW)
    d = alpaca_dispatcher(pool, fake_alpaca, clock)
    d.refresh_account(force=True)
    ids = plant(conn, [s for s, _ in NONEXISTENT] + [GOOD])

    outcomes = d.drain()

    assert [(o.recommendation_id, o.status, o.code) for o in outcomes] == (
        [(ids[s], "SKIPPED", code) for s, code in NONEXISTENT] + [(ids[GOOD], "EXECUTED", "ORDER_FILLED")])
    for symbol, code in NONEXISTENT:
        rec = recommendation(conn, ids[symbol])
        assert (rec["status"], rec["outcome_code"]) == ("SKIPPED", code)
        gate = asset_gate(rec)
        assert (gate["passed"], gate["code"]) == (False, code)
        # Every other gate passed: the asset gate alone stood between the symbol and the broker.
        assert [g["name"] for g in rec["gate_results"] if not g["passed"]] == ["asset"]
        assert conn.execute("SELECT count(*)::int AS n FROM dispatch_executions WHERE recommendation_id = %s",
                            (ids[symbol],)).fetchone()["n"] == 0
    assert recommendation(conn, ids["NULL"])["outcome_detail"] == "NO_ASSET: the broker has no asset NULL"

    orders = fake_alpaca.requests_to("/v2/orders", "POST")
    assert [(o.json["symbol"], o.json["client_order_id"]) for o in orders] == [(GOOD, client_order_id(ACCOUNT, ids[GOOD]))]
    # Only the well-formed symbols were looked up; the malformed ones never became a URL.
    lookups = [r.path for r in fake_alpaca.requests if r.path.startswith("/v2/assets/")]
    assert lookups == ["/v2/assets/NULL", f"/v2/assets/{GOOD}"]


def test_asset_record_is_asked_once_per_symbol_per_session(pool, conn, fake_alpaca):
    fake_alpaca.add_asset(GOOD)
    clock = FixedClock(NOW)
    d = alpaca_dispatcher(pool, fake_alpaca, clock)
    d.refresh_account(force=True)
    for i in range(3):
        add_market(conn, "NULL", NOW, 100)
        add_recommendation(conn, "NULL", NOW - timedelta(seconds=3 - i))

    outcomes = d.drain()

    assert [o.code for o in outcomes] == ["NO_ASSET"] * 3
    assert len(fake_alpaca.requests_to("/v2/assets/NULL", "GET")) == 1


def test_asset_lookup_outage_then_entry_denied_with_the_error_and_asked_again_next_time(pool, conn, fake_alpaca):
    fake_alpaca.add_asset(GOOD)
    fake_alpaca.fail_next(f"/v2/assets/{GOOD}", 503, times=3)  # every attempt of one lookup
    clock = FixedClock(NOW)
    d = alpaca_dispatcher(pool, fake_alpaca, clock)
    d.refresh_account(force=True)
    first = plant(conn, [GOOD])[GOOD]

    [denied] = d.drain()
    second = add_recommendation(conn, GOOD, NOW)
    [traded] = d.drain()

    assert (denied.recommendation_id, denied.status, denied.code) == (first, "SKIPPED", "NO_ASSET")
    assert "asset lookup failed: BrokerUnavailable: get asset GOODT: HTTP 503" in recommendation(conn, first)["outcome_detail"]
    assert (traded.recommendation_id, traded.status, traded.code) == (second, "SUBMITTING", "ORDER_ACCEPTED")
    assert len(fake_alpaca.requests_to(f"/v2/assets/{GOOD}", "GET")) == 4
    assert [o.json["symbol"] for o in fake_alpaca.requests_to("/v2/orders", "POST")] == [GOOD]


def test_exit_of_a_held_position_in_a_halted_stock_still_goes_out(pool, conn, fake_alpaca):
    fake_alpaca.add_asset("HALT")
    fake_alpaca.fill_prices["HALT"] = Decimal("100.00")
    clock = FixedClock(NOW)
    d = alpaca_dispatcher(pool, fake_alpaca, clock)
    d.refresh_account(force=True)
    plant(conn, ["HALT"])
    assert [o.code for o in d.drain()] == ["ORDER_FILLED"]

    # Halted after the entry; a new process (a fresh cache, and no record shared for the day)
    # sees the record as it is now.
    fake_alpaca.add_asset("HALT", status="inactive", tradable=False)
    conn.execute("DELETE FROM asset_records")
    clock.set(NOW + timedelta(minutes=1))
    exit_id = add_recommendation(conn, "HALT", NOW + timedelta(minutes=1), action="EXIT")
    [exited] = alpaca_dispatcher(pool, fake_alpaca, clock).drain()

    assert (exited.recommendation_id, exited.status, exited.code) == (exit_id, "EXECUTED", "ORDER_FILLED")
    gate = asset_gate(recommendation(conn, exit_id))
    assert gate["passed"] is True
    assert gate["reason"] == "OK: an exit is not blocked by the asset record (ASSET_INACTIVE: HALT status=inactive)"
    assert [(o.json["symbol"], o.json["side"]) for o in fake_alpaca.requests_to("/v2/orders", "POST")] == [
        ("HALT", "buy"), ("HALT", "sell")]


def test_malformed_exit_symbol_is_refused_even_for_an_exit(pool, conn, fake_alpaca):
    clock = FixedClock(NOW)
    d = alpaca_dispatcher(pool, fake_alpaca, clock)
    add_market(conn, "b00", NOW, 100)
    rid = add_recommendation(conn, "b00", NOW, action="EXIT")

    [outcome] = d.drain()

    assert (outcome.recommendation_id, outcome.status, outcome.code) == (rid, "SKIPPED", "BAD_SYMBOL")
    assert fake_alpaca.requests_to("/v2/orders", "POST") == []


def test_simulated_broker_book_gets_no_order_for_nonexistent_symbols(pool, conn):
    clock = FixedClock(NOW)
    broker = SimBroker(pool, ACCOUNT, clock, universe=[GOOD])
    d = Dispatcher(pool, broker, params(), ACCOUNT, clock=clock)
    d.refresh_account(force=True)
    ids = plant(conn, [s for s, _ in NONEXISTENT] + [GOOD])

    outcomes = d.drain()

    assert [(o.status, o.code) for o in outcomes] == (
        [("SKIPPED", code) for _, code in NONEXISTENT] + [("EXECUTED", "ORDER_FILLED")])
    book = conn.execute("SELECT symbol FROM sim_orders WHERE account_id = %s", (ACCOUNT,)).fetchall()
    assert [r["symbol"] for r in book] == [GOOD]
    assert recommendation(conn, ids["NULL"])["outcome_code"] == "NO_ASSET"


def test_simulated_broker_without_a_universe_lists_what_it_has_bars_for(pool, conn):
    clock = FixedClock(NOW)
    broker = SimBroker(pool, ACCOUNT, clock)
    add_market(conn, GOOD, NOW, 100)

    listed = broker.get_asset(GOOD)

    assert (listed.symbol, listed.status, listed.tradable, listed.asset_class) == (GOOD, "active", True, "us_equity")
    assert broker.get_asset("NOBARS") is None
    assert SimBroker(pool, ACCOUNT, clock, universe=["OTHER"]).get_asset(GOOD) is None


def test_a_second_dispatcher_reads_the_asset_record_the_first_one_fetched_today(pool, conn, fake_alpaca):
    fake_alpaca.add_asset(GOOD)
    clock = FixedClock(NOW)
    first = alpaca_dispatcher(pool, fake_alpaca, clock)
    second = alpaca_dispatcher(pool, fake_alpaca, clock)
    first.refresh_account(force=True)
    plant(conn, [GOOD, "NULL"])
    first.drain()
    add_recommendation(conn, GOOD, NOW)
    add_recommendation(conn, "NULL", NOW)

    outcomes = second.drain()

    assert len(fake_alpaca.requests_to(f"/v2/assets/{GOOD}", "GET")) == 1  # one request for both tasks
    assert len(fake_alpaca.requests_to("/v2/assets/NULL", "GET")) == 1  # "no such asset" is shared too
    assert [o.code for o in outcomes if o.code == "NO_ASSET"] == ["NO_ASSET"]

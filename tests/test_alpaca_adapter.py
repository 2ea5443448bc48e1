"""The alpaca-py adapter driven through the real SDK against a local server speaking Alpaca's paths.

Each test asserts on what the adapter returned and on what the server received.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import pytest
import requests

from services.common.clock import FixedClock
from services.adapters.alpaca.client import (
    AlpacaBroker,
    AlpacaMarketData,
)
from services.domain.market_data import parse_occ_symbol
from services.adapters.alpaca.settings import AlpacaSettings
from services.domain.broker import (
    BrokerRejected,
    BrokerUnavailable,
    DuplicateClientOrderId,
    OrderRequest,
    OrderStateUnknown,
    submit_exactly_once,
)
from services.adapters.postgres.request_budget import LocalRequestBudget, RequestKind
from tests.fake_alpaca import FAKE_KEY, FAKE_SECRET, FakeAlpaca, fake_alpaca  # noqa: F401

UTC = timezone.utc
OCC = "SPY261204C00600000"
NOW = datetime(2026, 11, 27, 15, 0, tzinfo=UTC)


class SleepRecorder:
    """Records sleeps instead of sleeping, and is the monotonic clock they advance (`now`).

    Keeps the tests fast and the delays visible; an HTTP request takes no time on this clock.
    """

    def __init__(self):
        self.calls: list[float] = []
        self.t = 0.0

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)
        self.t += seconds

    def now(self) -> float:
        return self.t


def settings(fake: FakeAlpaca, **overrides) -> AlpacaSettings:
    values = dict(
        api_key=FAKE_KEY,
        secret_key=FAKE_SECRET,
        trading_url=fake.url,
        data_url=fake.url,
        timeout_seconds=0.5,
        read_attempts=3,
        retry_backoff_seconds=0.2,
    )
    values.update(overrides)
    return AlpacaSettings(**values)


def broker(fake: FakeAlpaca, sleep=None, monotonic=None, **overrides) -> AlpacaBroker:
    sleep = sleep or SleepRecorder()
    return AlpacaBroker(
        settings(fake, **overrides), clock=FixedClock(NOW), sleep=sleep, monotonic=monotonic or sleep.now
    )


def option_order(coid: str = "ops-1-0-abc", qty: int = 2) -> OrderRequest:
    return OrderRequest(
        client_order_id=coid,
        symbol=OCC,
        underlying="SPY",
        instrument="OPTION",
        side="buy",
        qty=qty,
        position_intent="buy_to_open",
    )


# Orders -----------------------------------------------------------------------------------------


def test_submit_option_order_sends_exact_body_and_returns_decimal_result(fake_alpaca):
    result = broker(fake_alpaca).submit_order(option_order(qty=2))

    posts = fake_alpaca.requests_to("/v2/orders", "POST")
    assert len(posts) == 1
    body = posts[0].json
    assert set(body) == {
        "symbol", "qty", "side", "type", "time_in_force", "client_order_id", "position_intent"
    }
    assert body["symbol"] == OCC
    assert body["qty"] == 2
    assert body["side"] == "buy"
    assert body["type"] == "market"
    assert body["time_in_force"] == "day"
    assert body["client_order_id"] == "ops-1-0-abc"
    assert body["position_intent"] == "buy_to_open"

    booked = fake_alpaca.orders["ops-1-0-abc"]
    assert result.broker_order_id == booked["id"]
    assert result.client_order_id == "ops-1-0-abc"
    assert result.symbol == OCC
    assert result.side == "buy"
    assert result.qty == Decimal("2") and isinstance(result.qty, Decimal)
    assert result.filled_qty == Decimal("0") and isinstance(result.filled_qty, Decimal)
    assert result.filled_avg_price is None
    assert result.status == "accepted"
    assert result.submitted_at is not None and result.submitted_at.utcoffset() == timedelta(0)


def test_submit_when_filled_at_once_then_fill_price_is_decimal(fake_alpaca):
    fake_alpaca.fill_prices[OCC] = Decimal("1.37")

    result = broker(fake_alpaca).submit_order(option_order())

    assert result.is_filled
    assert result.filled_avg_price == Decimal("1.37")
    assert result.filled_qty == Decimal("2")
    assert result.filled_at is not None and result.filled_at.tzinfo is not None


def test_submit_exactly_once_when_504_after_accept_then_one_order_found_by_client_id(fake_alpaca):
    fake_alpaca.fail_next("/v2/orders", 504, method="POST", after_accept=True)
    adapter = broker(fake_alpaca)

    started = time.perf_counter()
    result = submit_exactly_once(adapter, option_order("ops-7-0-x"))
    elapsed = time.perf_counter() - started

    assert len(fake_alpaca.orders) == 1
    assert result.broker_order_id == fake_alpaca.orders["ops-7-0-x"]["id"]
    assert result.client_order_id == "ops-7-0-x"
    # The 504 came after the order was booked: the resend under the same id is refused as a
    # duplicate, and the lookup by client_order_id finds the one order.
    assert [(r.method, r.path, r.status) for r in fake_alpaca.requests] == [
        ("POST", "/v2/orders", 504),
        ("POST", "/v2/orders", 422),
        ("GET", "/v2/orders:by_client_order_id", 200),
    ]
    assert [r.json["client_order_id"] for r in fake_alpaca.requests_to("/v2/orders", "POST")] == ["ops-7-0-x"] * 2
    assert fake_alpaca.requests[2].query == {"client_order_id": "ops-7-0-x"}
    assert elapsed < 2.0  # the SDK's own retry would sleep 3 x 3 s


def test_submit_order_when_504_after_accept_then_resend_is_refused_as_duplicate(fake_alpaca):
    fake_alpaca.fail_next("/v2/orders", 504, method="POST", after_accept=True)

    with pytest.raises(DuplicateClientOrderId):
        broker(fake_alpaca).submit_order(option_order())

    assert [r.status for r in fake_alpaca.requests_to("/v2/orders", "POST")] == [504, 422]
    assert len(fake_alpaca.orders) == 1


def test_submit_exactly_once_when_client_order_id_reused_then_returns_existing_order(fake_alpaca):
    adapter = broker(fake_alpaca)
    first = adapter.submit_order(option_order("ops-9-0-d"))

    with pytest.raises(DuplicateClientOrderId, match="client_order_id must be unique"):
        adapter.submit_order(option_order("ops-9-0-d"))
    again = submit_exactly_once(adapter, option_order("ops-9-0-d"))

    assert again.broker_order_id == first.broker_order_id
    assert len(fake_alpaca.orders) == 1
    assert len(fake_alpaca.requests_to("/v2/orders", "POST")) == 3


def test_submit_exactly_once_when_injected_422_duplicate_then_returns_booked_order(fake_alpaca):
    adapter = broker(fake_alpaca)
    first = adapter.submit_order(option_order("ops-10-0-e"))
    fake_alpaca.duplicate_next()

    result = submit_exactly_once(adapter, option_order("ops-10-0-e"))

    assert result.broker_order_id == first.broker_order_id
    assert fake_alpaca.requests[-1].path == "/v2/orders:by_client_order_id"


def test_get_account_when_429_then_backs_off_and_succeeds(fake_alpaca):
    fake_alpaca.fail_next("/v2/account", 429, message="too many requests")
    fake_alpaca.account.update(equity="19450.25", last_equity="20000.00", cash="12000.5", buying_power="24001")
    sleeps = SleepRecorder()

    account = broker(fake_alpaca, sleep=sleeps).get_account()

    assert len(fake_alpaca.requests_to("/v2/account")) == 2
    assert fake_alpaca.requests_to("/v2/account")[0].fault == "429"
    assert sleeps.calls == [0.2]
    assert account.equity == Decimal("19450.25")
    assert account.last_equity == Decimal("20000.00")
    assert account.cash == Decimal("12000.5")
    assert account.buying_power == Decimal("24001")
    assert account.daily_pnl == Decimal("-549.75")
    assert account.as_of == NOW


def test_get_account_when_5xx_persists_then_unavailable_after_bounded_backoff(fake_alpaca):
    fake_alpaca.fail_next("/v2/account", 500, times=10)
    sleeps = SleepRecorder()

    with pytest.raises(BrokerUnavailable, match="500"):
        broker(fake_alpaca, sleep=sleeps).get_account()

    assert len(fake_alpaca.requests_to("/v2/account")) == 3
    assert sleeps.calls == [0.2, 0.4]


def test_submit_when_429_with_retry_after_then_waits_that_long_and_resends_same_id(fake_alpaca):
    fake_alpaca.fail_next("/v2/orders", 429, method="POST", message="rate limit exceeded", retry_after="2")
    sleeps = SleepRecorder()

    result = submit_exactly_once(broker(fake_alpaca, sleep=sleeps), option_order("ops-11-0-f"))

    posts = fake_alpaca.requests_to("/v2/orders", "POST")
    assert [(r.status, r.json["client_order_id"]) for r in posts] == [(429, "ops-11-0-f"), (200, "ops-11-0-f")]
    assert sleeps.calls == [2.0]
    assert list(fake_alpaca.orders) == ["ops-11-0-f"]
    assert result.broker_order_id == fake_alpaca.orders["ops-11-0-f"]["id"]
    assert fake_alpaca.requests_to("/v2/orders:by_client_order_id") == []


def test_submit_when_retry_after_is_long_then_capped(fake_alpaca):
    fake_alpaca.fail_next("/v2/orders", 429, method="POST", retry_after="120")
    sleeps = SleepRecorder()

    broker(fake_alpaca, sleep=sleeps, retry_after_max_seconds=3).submit_order(option_order("ops-11-1-f"))

    assert sleeps.calls == [3.0]
    assert [r.status for r in fake_alpaca.requests_to("/v2/orders", "POST")] == [429, 200]


def test_submit_when_500_twice_then_third_send_places_one_order(fake_alpaca):
    fake_alpaca.fail_next("/v2/orders", 500, method="POST", times=2)
    sleeps = SleepRecorder()

    result = submit_exactly_once(broker(fake_alpaca, sleep=sleeps), option_order("ops-13-0-k"))

    posts = fake_alpaca.requests_to("/v2/orders", "POST")
    assert [(r.status, r.json["client_order_id"]) for r in posts] == [
        (500, "ops-13-0-k"), (500, "ops-13-0-k"), (200, "ops-13-0-k"),
    ]
    assert sleeps.calls == [0.2, 0.4]
    assert list(fake_alpaca.orders) == ["ops-13-0-k"]
    assert result.broker_order_id == fake_alpaca.orders["ops-13-0-k"]["id"]


def test_submit_when_connection_reset_then_resends_same_id(fake_alpaca):
    fake_alpaca.reset_next("/v2/orders", method="POST")

    result = submit_exactly_once(broker(fake_alpaca), option_order("ops-14-0-r"))

    posts = fake_alpaca.requests_to("/v2/orders", "POST")
    assert [(r.fault, r.status, r.json["client_order_id"]) for r in posts] == [
        ("reset", None, "ops-14-0-r"), (None, 200, "ops-14-0-r"),
    ]
    assert list(fake_alpaca.orders) == ["ops-14-0-r"]
    assert result.broker_order_id == fake_alpaca.orders["ops-14-0-r"]["id"]


def test_submit_when_reset_after_accept_then_duplicate_is_looked_up_and_one_order_stands(fake_alpaca):
    fake_alpaca.reset_next("/v2/orders", method="POST", after_accept=True)

    result = submit_exactly_once(broker(fake_alpaca), option_order("ops-15-0-r"))

    assert [(r.method, r.status) for r in fake_alpaca.requests] == [
        ("POST", None), ("POST", 422), ("GET", 200),
    ]
    assert list(fake_alpaca.orders) == ["ops-15-0-r"]
    assert result.broker_order_id == fake_alpaca.orders["ops-15-0-r"]["id"]


def test_submit_when_refused_after_a_send_that_got_through_then_the_booked_order_is_returned(fake_alpaca):
    # The first send was booked but its answer lost; the resend is refused for buying power
    # (spent by that very order), which must not be recorded as a rejection.
    fake_alpaca.fail_next("/v2/orders", 504, method="POST", after_accept=True)
    fake_alpaca.fail_next("/v2/orders", 403, method="POST", message="insufficient buying power")

    result = broker(fake_alpaca).submit_order(option_order("ops-16-0-b"))

    assert [(r.method, r.status) for r in fake_alpaca.requests] == [
        ("POST", 504), ("POST", 403), ("GET", 200),
    ]
    assert result.broker_order_id == fake_alpaca.orders["ops-16-0-b"]["id"]


def test_submit_when_unavailable_past_the_retry_window_then_lookup_finds_nothing_and_state_unknown(fake_alpaca):
    fake_alpaca.fail_next("/v2/orders", 503, method="POST", times=100)
    sleeps = SleepRecorder()

    with pytest.raises(OrderStateUnknown, match="503"):
        submit_exactly_once(broker(fake_alpaca, sleep=sleeps, submit_retry_seconds=1.5), option_order("ops-17-0-u"))

    posts = fake_alpaca.requests_to("/v2/orders", "POST")
    assert [r.status for r in posts] == [503, 503, 503]
    # A third wait (0.8 s from 0.6 s) would leave less than a request's minimum before 1.5 s.
    assert sleeps.calls == [0.2, 0.4]
    assert len(fake_alpaca.requests_to("/v2/orders:by_client_order_id")) == 1
    assert fake_alpaca.orders == {}


def test_submit_when_server_hangs_once_then_times_out_and_resends_same_id(fake_alpaca):
    fake_alpaca.hang_next("/v2/orders", 10, method="POST")
    adapter = broker(fake_alpaca, monotonic=time.monotonic, timeout_seconds=0.5)

    started = time.perf_counter()
    result = adapter.submit_order(option_order("ops-18-0-t"))
    elapsed = time.perf_counter() - started

    assert 0.4 <= elapsed < 1.5
    posts = fake_alpaca.requests_to("/v2/orders", "POST")
    assert [(r.fault, r.json["client_order_id"]) for r in posts] == [("hang10", "ops-18-0-t"), (None, "ops-18-0-t")]
    assert result.broker_order_id == fake_alpaca.orders["ops-18-0-t"]["id"]


def test_submit_when_server_hangs_past_the_retry_window_then_unavailable_timed_out(fake_alpaca):
    fake_alpaca.hang_next("/v2/orders", 10, method="POST", times=5)
    adapter = broker(fake_alpaca, monotonic=time.monotonic, timeout_seconds=0.5, submit_retry_seconds=0.6)

    started = time.perf_counter()
    with pytest.raises(BrokerUnavailable, match="timed out") as info:
        adapter.submit_order(option_order())
    elapsed = time.perf_counter() - started

    assert 0.4 <= elapsed < 1.5
    assert isinstance(info.value.__cause__, requests.Timeout)
    assert len(fake_alpaca.requests_to("/v2/orders", "POST")) == 1
    assert fake_alpaca.orders == {}


def test_submit_exactly_once_when_response_hangs_after_accept_then_finds_order(fake_alpaca):
    fake_alpaca.hang_next("/v2/orders", 10, method="POST", after_accept=True)

    result = submit_exactly_once(broker(fake_alpaca, timeout_seconds=0.5), option_order("ops-12-0-g"))

    assert result.broker_order_id == fake_alpaca.orders["ops-12-0-g"]["id"]
    assert len(fake_alpaca.orders) == 1


def test_read_when_server_hangs_then_each_attempt_times_out_and_raises(fake_alpaca):
    fake_alpaca.hang_next("/v2/positions", 10, times=5)
    sleeps = SleepRecorder()
    adapter = broker(fake_alpaca, sleep=sleeps, timeout_seconds=0.3, read_attempts=2)

    started = time.perf_counter()
    with pytest.raises(BrokerUnavailable, match="timed out"):
        adapter.get_positions()
    elapsed = time.perf_counter() - started

    assert len(fake_alpaca.requests_to("/v2/positions")) == 2
    assert elapsed < 1.5


@pytest.mark.parametrize(
    ("status", "message"),
    [
        (403, "insufficient buying power"),
        (422, "qty must be a whole number for options"),
        (403, "options trading is not enabled for this account"),
    ],
)
def test_submit_when_broker_refuses_then_rejected_with_its_message(fake_alpaca, status, message):
    fake_alpaca.fail_next("/v2/orders", status, method="POST", message=message)

    with pytest.raises(BrokerRejected) as info:
        submit_exactly_once(broker(fake_alpaca), option_order())

    assert not isinstance(info.value, DuplicateClientOrderId)
    assert info.value.broker_message == message
    assert info.value.status_code == status
    assert message in str(info.value)
    # A rejection is final: no retry, no lookup.
    assert [(r.method, r.path) for r in fake_alpaca.requests] == [("POST", "/v2/orders")]


def test_get_order_by_client_id_when_unknown_then_none(fake_alpaca):
    assert broker(fake_alpaca).get_order_by_client_id("ops-404-0-z") is None
    assert fake_alpaca.requests_to("/v2/orders:by_client_order_id")[0].query == {
        "client_order_id": "ops-404-0-z"
    }


def test_list_orders_since_when_more_than_a_page_then_follows_pages(fake_alpaca):
    base = datetime(2026, 11, 27, 14, 31, tzinfo=UTC)
    for i in range(503):
        fake_alpaca.now = lambda i=i: base + timedelta(seconds=i)
        fake_alpaca._submit(
            {"symbol": "SPY", "qty": 1, "side": "buy", "type": "market",
             "time_in_force": "day", "client_order_id": f"c{i}"}
        )

    orders = broker(fake_alpaca).list_orders_since(base - timedelta(minutes=1))

    assert [o.client_order_id for o in orders] == [f"c{i}" for i in range(503)]
    pages = fake_alpaca.requests_to("/v2/orders", "GET")
    assert len(pages) == 2
    assert pages[0].query["status"] == "all"
    assert pages[0].query["direction"] == "asc"
    assert pages[0].query["limit"] == "500"
    assert datetime.fromisoformat(pages[0].query["after"]) == base - timedelta(minutes=1)


def test_get_positions_parses_decimal_and_short_quantity(fake_alpaca):
    fake_alpaca.add_position(OCC, "3", "1.10", "1.25")
    fake_alpaca.add_position("AAPL", "-5", "190.5", None)

    positions = {p.symbol: p for p in broker(fake_alpaca).get_positions()}

    assert positions[OCC].qty == Decimal("3")
    assert positions[OCC].avg_entry_price == Decimal("1.10")
    assert positions[OCC].current_price == Decimal("1.25")
    assert positions[OCC].asset_class == "us_option"
    assert positions["AAPL"].qty == Decimal("-5")
    assert positions["AAPL"].current_price is None
    assert positions["AAPL"].asset_class == "us_equity"


# Clock and calendar ---------------------------------------------------------------------------


def test_get_calendar_converts_naive_et_times_to_utc_on_early_close_day(fake_alpaca):
    sessions = broker(fake_alpaca).get_calendar(date(2026, 11, 25), date(2026, 11, 30))

    by_day = {s.day: s for s in sessions}
    assert date(2026, 11, 26) not in by_day  # Thanksgiving
    early = by_day[date(2026, 11, 27)]
    assert early.open == datetime(2026, 11, 27, 14, 30, tzinfo=UTC)
    assert early.close == datetime(2026, 11, 27, 18, 0, tzinfo=UTC)  # 13:00 EST
    assert early.early_close
    assert by_day[date(2026, 11, 25)].close == datetime(2026, 11, 25, 21, 0, tzinfo=UTC)
    assert fake_alpaca.requests_to("/v2/calendar")[0].query == {"start": "2026-11-25", "end": "2026-11-30"}


def test_get_calendar_in_summer_uses_daylight_time(fake_alpaca):
    (session,) = broker(fake_alpaca).get_calendar(date(2026, 7, 8), date(2026, 7, 8))

    assert session.open == datetime(2026, 7, 8, 13, 30, tzinfo=UTC)  # 09:30 EDT
    assert session.close == datetime(2026, 7, 8, 20, 0, tzinfo=UTC)


def test_get_clock_returns_aware_utc(fake_alpaca):
    fake_alpaca.clock = {
        "timestamp": "2026-11-27T12:59:00-05:00",
        "is_open": True,
        "next_open": "2026-11-30T09:30:00-05:00",
        "next_close": "2026-11-27T13:00:00-05:00",
    }

    clock = broker(fake_alpaca).get_clock()

    assert clock.is_open is True
    assert clock.timestamp == datetime(2026, 11, 27, 17, 59, tzinfo=UTC)
    assert clock.next_close == datetime(2026, 11, 27, 18, 0, tzinfo=UTC)
    assert clock.next_open.utcoffset() == timedelta(0)


# Market data ----------------------------------------------------------------------------------


def test_option_chain_follows_contract_pages_and_merges_snapshots(fake_alpaca):
    fake_alpaca.contracts_page_size = 2
    quote_time = datetime(2026, 11, 27, 15, 59, 30, tzinfo=UTC)
    fake_alpaca.add_option(
        "SPY261204C00600000", bid=2.15, ask=2.25, bid_size=7, ask_size=9, quote_time=quote_time,
        iv=0.183, greeks={"delta": 0.52, "gamma": 0.031, "rho": 0.05, "theta": -0.21, "vega": 0.44},
        open_interest="12345", volume=4321,
    )
    fake_alpaca.add_option("SPY261204P00595500", open_interest="0")
    fake_alpaca.add_option("SPY261211C00605000", bid=None, ask=None, iv=None, greeks={}, volume=None)
    fake_alpaca.add_option("SPY261211P00590000", open_interest=None)
    fake_alpaca.add_option("SPY261218C00610000", snapshot=False)  # contract, no snapshot at all
    fake_alpaca.add_option("SPY261218P00580000", contract=False)  # snapshot, no contract
    fake_alpaca.add_option("QQQ261204C00500000")  # another underlying

    market = AlpacaMarketData(settings(fake_alpaca, option_contracts_page_size=50), sleep=SleepRecorder())
    chain = {q.symbol: q for q in market.option_chain("SPY")}

    pages = fake_alpaca.requests_to("/v2/options/contracts")
    assert [p.query.get("page_token") for p in pages] == [None, "2", "4"]
    assert all(p.query["underlying_symbols"] == "SPY" and p.query["status"] == "active" for p in pages)
    assert len(fake_alpaca.requests_to("/v1beta1/options/snapshots/SPY")) == 1
    assert set(chain) == {
        "SPY261204C00600000", "SPY261204P00595500", "SPY261211C00605000",
        "SPY261211P00590000", "SPY261218C00610000", "SPY261218P00580000",
    }

    q = chain["SPY261204C00600000"]
    assert (q.underlying, q.expiration, q.strike, q.right) == ("SPY", date(2026, 12, 4), Decimal("600"), "call")
    assert (q.bid, q.ask, q.bid_size, q.ask_size) == (Decimal("2.15"), Decimal("2.25"), 7, 9)
    assert q.quote_time == quote_time
    assert q.open_interest == 12345
    assert q.volume == 4321
    assert q.implied_volatility == pytest.approx(0.183)
    assert (q.delta, q.gamma, q.theta, q.vega) == (0.52, 0.031, -0.21, 0.44)

    put = chain["SPY261204P00595500"]
    assert (put.right, put.strike, put.open_interest) == ("put", Decimal("595.5"), 0)
    no_quote = chain["SPY261211C00605000"]
    assert (no_quote.bid, no_quote.ask, no_quote.quote_time) == (None, None, None)
    assert (no_quote.implied_volatility, no_quote.delta, no_quote.volume) == (None, None, None)
    assert no_quote.open_interest == 1500
    assert chain["SPY261211P00590000"].open_interest is None
    no_snapshot = chain["SPY261218C00610000"]
    assert (no_snapshot.bid, no_snapshot.ask, no_snapshot.open_interest) == (None, None, 1500)
    assert chain["SPY261218P00580000"].open_interest is None
    assert chain["SPY261218P00580000"].bid == Decimal("1.0")


def test_option_quotes_for_symbols_uses_snapshots_by_symbol(fake_alpaca):
    fake_alpaca.add_option(OCC, bid=3.1, ask=3.3)
    fake_alpaca.add_option("SPY261204P00590000", bid=0.5, ask=0)  # no offer

    market = AlpacaMarketData(settings(fake_alpaca), sleep=SleepRecorder())
    quotes = market.option_quotes([OCC, "SPY261204P00590000", "SPY261204C00999000"])

    assert fake_alpaca.requests_to("/v1beta1/options/snapshots")[0].query["symbols"] == (
        f"{OCC},SPY261204P00590000,SPY261204C00999000"
    )
    assert (quotes[OCC].bid, quotes[OCC].ask) == (Decimal("3.1"), Decimal("3.3"))
    assert (quotes["SPY261204P00590000"].bid, quotes["SPY261204P00590000"].ask) == (Decimal("0.5"), None)
    assert quotes["SPY261204C00999000"].bid is None


@pytest.mark.parametrize(
    ("symbol", "underlying", "expiration", "right", "strike"),
    [
        ("SPY261204C00600000", "SPY", date(2026, 12, 4), "call", Decimal("600")),
        ("SPY261204P00602500", "SPY", date(2026, 12, 4), "put", Decimal("602.5")),
        ("BRKB270115C00000500", "BRKB", date(2027, 1, 15), "call", Decimal("0.5")),
        ("F261120P00012125", "F", date(2026, 11, 20), "put", Decimal("12.125")),
    ],
)
def test_parse_occ_symbol(symbol, underlying, expiration, right, strike):
    occ = parse_occ_symbol(symbol)
    assert (occ.underlying, occ.expiration, occ.right, occ.strike) == (underlying, expiration, right, strike)


@pytest.mark.parametrize("bad", ["SPY", "SPY261204X00600000", "SPY2612O4C00600000", "SPY261204C0060000A"])
def test_parse_occ_symbol_when_malformed_then_value_error(bad):
    with pytest.raises(ValueError):
        parse_occ_symbol(bad)


def test_stock_bars_returns_decimal_ohlc_and_utc_times(fake_alpaca):
    t0 = datetime(2026, 11, 27, 14, 30, tzinfo=UTC)
    fake_alpaca.add_bar("SPY", t0, 600.1, 600.9, 599.7, 600.45, 120000)
    fake_alpaca.add_bar("SPY", t0 + timedelta(minutes=1), 600.45, 601.0, 600.2, 600.8, 98000)
    fake_alpaca.add_bar("AAPL", t0, 190.0, 190.5, 189.9, 190.2, 50000)
    fake_alpaca.add_bar("AAPL", t0 + timedelta(hours=2), 191.0, 191.0, 191.0, 191.0, 1)

    market = AlpacaMarketData(settings(fake_alpaca), sleep=SleepRecorder())
    rows = market.stock_bars(["SPY", "AAPL"], t0, t0 + timedelta(minutes=30))

    assert rows == [
        {"ticker": "AAPL", "ts": t0, "open": Decimal("190.0"), "high": Decimal("190.5"),
         "low": Decimal("189.9"), "close": Decimal("190.2"), "volume": 50000},
        {"ticker": "SPY", "ts": t0, "open": Decimal("600.1"), "high": Decimal("600.9"),
         "low": Decimal("599.7"), "close": Decimal("600.45"), "volume": 120000},
        {"ticker": "SPY", "ts": t0 + timedelta(minutes=1), "open": Decimal("600.45"),
         "high": Decimal("601.0"), "low": Decimal("600.2"), "close": Decimal("600.8"), "volume": 98000},
    ]
    (req,) = fake_alpaca.requests_to("/v2/stocks/bars")
    assert req.query["symbols"] == "SPY,AAPL"
    assert req.query["timeframe"] == "1Min"
    assert req.query["feed"] == "iex"
    assert datetime.fromisoformat(req.query["start"]) == t0


# Rate limiting ----------------------------------------------------------------------------------


class FakeMonotonic:
    def __init__(self):
        self.t = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.t += seconds


def take(budget, kind: RequestKind, mono: FakeMonotonic) -> float:
    """Ask until a token is taken, sleeping as told; the total wait."""
    waited = 0.0
    while (wait := budget.acquire(kind)) > 0:
        mono.sleep(wait)
        waited += wait
    return waited


def test_local_budget_spaces_requests_after_the_burst():
    mono = FakeMonotonic()
    budget = LocalRequestBudget(120, capacity=2, monotonic=mono)

    waits = [take(budget, RequestKind.ORDER, mono) for _ in range(5)]

    assert waits[:2] == [0.0, 0.0]
    assert waits[2:] == pytest.approx([0.5, 0.5, 0.5])
    mono.t += 10  # idle: refills, but only up to the capacity
    assert [take(budget, RequestKind.ORDER, mono) for _ in range(3)] == pytest.approx([0.0, 0.0, 0.5])


def test_local_budget_when_reads_reach_the_reserve_then_only_orders_pass():
    mono = FakeMonotonic()
    budget = LocalRequestBudget(60, capacity=5, read_reserve=3, monotonic=mono)

    assert [budget.acquire(RequestKind.READ) for _ in range(2)] == [0.0, 0.0]
    assert budget.acquire(RequestKind.READ) == pytest.approx(1.0)  # 3 left: the reserve
    assert [budget.acquire(RequestKind.ORDER) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert budget.acquire(RequestKind.ORDER) == pytest.approx(1.0)
    mono.t += 1.0
    assert budget.acquire(RequestKind.READ) == pytest.approx(3.0)  # the refill goes to orders first
    assert budget.acquire(RequestKind.ORDER) == 0.0


def test_local_budget_default_keeps_any_minute_under_alpaca_limit():
    mono = FakeMonotonic()
    s = AlpacaSettings(api_key="k", secret_key="s")
    budget = LocalRequestBudget(
        s.trading_requests_per_minute, s.trading_burst, s.read_reserve_tokens, monotonic=mono
    )

    stamps = []
    for i in range(400):
        take(budget, RequestKind.READ if i % 3 else RequestKind.ORDER, mono)
        stamps.append(mono.t)

    worst = max(sum(1 for t in stamps if start <= t < start + 60) for start in stamps)
    assert worst <= 200


@pytest.mark.parametrize(
    ("rate", "burst", "reserve"), [(190, 20, 10), (200, 1, 0), (180, 20, 20)]
)
def test_settings_when_budget_exceeds_alpaca_limit_or_reserve_fills_bucket_then_refused(rate, burst, reserve):
    with pytest.raises(ValueError):
        AlpacaSettings(
            api_key="k", secret_key="s", trading_requests_per_minute=rate, trading_burst=burst,
            read_reserve_tokens=reserve,
        )


class RecordingBudget:
    """Hands out the given waits, then tokens; records the kind of each request."""

    def __init__(self, waits=()):
        self.kinds: list[RequestKind] = []
        self._waits = list(waits)

    def acquire(self, kind: RequestKind) -> float:
        self.kinds.append(kind)
        return self._waits.pop(0) if self._waits else 0.0


def test_every_trading_request_spends_the_budget_reads_as_reads_submits_as_orders(fake_alpaca):
    budget = RecordingBudget(waits=[1.5])
    sleeps = SleepRecorder()
    fake_alpaca.fail_next("/v2/account", 429)
    adapter = AlpacaBroker(settings(fake_alpaca), budget=budget, sleep=sleeps, monotonic=sleeps.now)

    adapter.get_account()  # 2 HTTP requests: the 429 and its retry; the first waited 1.5 s for a token
    adapter.get_clock()
    adapter.submit_order(option_order())

    assert len(fake_alpaca.requests) == 4
    assert budget.kinds == [RequestKind.READ] * 4 + [RequestKind.ORDER]
    assert sleeps.calls == [1.5, 0.2]


# Secrets ----------------------------------------------------------------------------------------


def test_settings_read_from_environment_and_reprs_hide_key_and_secret(fake_alpaca, monkeypatch, caplog):
    monkeypatch.setenv("ALPACA_API_KEY", FAKE_KEY)
    monkeypatch.setenv("ALPACA_SECRET_KEY", FAKE_SECRET)
    monkeypatch.setenv("ALPACA_TRADING_URL", fake_alpaca.url + "/")
    monkeypatch.setenv("ALPACA_DATA_URL", fake_alpaca.url)
    s = AlpacaSettings()
    assert s.paper is True
    assert s.trading_url == fake_alpaca.url  # trailing slash removed
    assert s.api_key.get_secret_value() == FAKE_KEY

    adapter = AlpacaBroker(s, sleep=SleepRecorder())
    market = AlpacaMarketData(s, sleep=SleepRecorder())
    fake_alpaca.fail_next("/v2/account", 503)
    with caplog.at_level(logging.DEBUG):
        adapter.get_account()

    texts = [repr(s), str(s), repr(adapter), str(adapter), repr(market), s.model_dump_json(), caplog.text]
    for text in texts:
        assert FAKE_KEY not in text
        assert FAKE_SECRET not in text
    assert "**********" in repr(s)
    assert "paper=True" in repr(adapter)


def test_settings_when_url_override_includes_version_then_refused():
    with pytest.raises(ValueError, match="API version"):
        AlpacaSettings(api_key="k", secret_key="s", trading_url="http://127.0.0.1:9/v2")


def test_wrong_credentials_are_rejected_without_echoing_them(fake_alpaca):
    adapter = AlpacaBroker(
        AlpacaSettings(api_key="PKWRONGKEY000000000", secret_key="wrong-secret-xyz", trading_url=fake_alpaca.url),
        sleep=SleepRecorder(),
    )
    with pytest.raises(BrokerRejected) as info:
        adapter.get_account()
    assert "401" in str(info.value)
    assert "PKWRONGKEY000000000" not in str(info.value) and "wrong-secret-xyz" not in str(info.value)


# Separate process: the order book survives a crash of the server -----------------------------


def _start_server(state: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.fake_alpaca", "--port", "0", "--state", str(state)],
        cwd=Path(__file__).resolve().parents[1],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    line = proc.stdout.readline()
    assert line.startswith("listening on "), line
    return proc, line.split()[-1]


def test_server_process_keeps_its_order_book_across_a_crash(tmp_path):
    state = tmp_path / "book.json"
    proc, url = _start_server(state)
    try:
        s = AlpacaSettings(api_key=FAKE_KEY, secret_key=FAKE_SECRET, trading_url=url, timeout_seconds=2)
        first = AlpacaBroker(s, sleep=SleepRecorder()).submit_order(option_order("ops-20-0-h"))
    finally:
        proc.kill()
        proc.wait(timeout=5)

    proc, url = _start_server(state)
    try:
        s = AlpacaSettings(api_key=FAKE_KEY, secret_key=FAKE_SECRET, trading_url=url, timeout_seconds=2)
        again = submit_exactly_once(AlpacaBroker(s, sleep=SleepRecorder()), option_order("ops-20-0-h"))
        book = requests.get(f"{url}/_fake/orders", timeout=2).json()
    finally:
        proc.kill()
        proc.wait(timeout=5)

    assert again.broker_order_id == first.broker_order_id
    assert [o["client_order_id"] for o in book] == ["ops-20-0-h"]
    assert json.loads(state.read_text())["orders"][0]["id"] == first.broker_order_id


def test_submit_stock_order_sends_no_position_intent(fake_alpaca):
    order = OrderRequest(
        client_order_id="ops-30-0-s", symbol="AAPL", underlying="AAPL", instrument="STOCK", side="buy", qty=5
    )

    result = broker(fake_alpaca).submit_order(order)

    body = fake_alpaca.requests_to("/v2/orders", "POST")[0].json
    assert body == {
        "symbol": "AAPL", "qty": 5, "side": "buy", "type": "market",
        "time_in_force": "day", "client_order_id": "ops-30-0-s",
    }
    assert result.qty == Decimal("5")


def test_option_chain_when_data_server_hangs_then_unavailable_within_timeout(fake_alpaca):
    fake_alpaca.add_option(OCC)
    fake_alpaca.hang_next("/v1beta1/options/snapshots/SPY", 10, times=5)
    market = AlpacaMarketData(settings(fake_alpaca, timeout_seconds=0.3, read_attempts=1), sleep=SleepRecorder())

    started = time.perf_counter()
    with pytest.raises(BrokerUnavailable, match="timed out"):
        market.option_chain("SPY")

    assert time.perf_counter() - started < 1.0
    assert len(fake_alpaca.requests_to("/v1beta1/options/snapshots/SPY")) == 1

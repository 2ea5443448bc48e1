"""The trade-updates stream adapter, driven through alpaca-py's TradingStream protocol against the
fake server's /stream: orders submitted with the real SDK arrive as TradeUpdate events, a cut
connection is re-established, bad messages and failing callbacks do not end the stream.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from datetime import timezone
from decimal import Decimal

import pytest

from services.adapters.alpaca.client import AlpacaBroker
from services.adapters.alpaca.settings import AlpacaSettings
from services.adapters.alpaca.stream import TradeUpdateStream, stream_url
from services.domain.broker import OrderRequest, TradeUpdate
from tests.fake_alpaca import FAKE_KEY, FAKE_SECRET, FakeAlpaca, fake_alpaca  # noqa: F401

UTC = timezone.utc
OCC = "SPY261204C00600000"
WAIT = 2.0  # seconds; every wait ends as soon as its event comes


def settings(fake: FakeAlpaca, **overrides) -> AlpacaSettings:
    values = dict(
        api_key=FAKE_KEY, secret_key=FAKE_SECRET, trading_url=fake.url, data_url=fake.url, timeout_seconds=1.0
    )
    values.update(overrides)
    return AlpacaSettings(**values)


class Updates:
    """The on_update callback of a test: a queue to wait on."""

    def __init__(self):
        self.queue: queue.Queue[TradeUpdate] = queue.Queue()

    def __call__(self, update: TradeUpdate) -> None:
        self.queue.put(update)

    def next(self, timeout: float = WAIT) -> TradeUpdate:
        return self.queue.get(timeout=timeout)

    def empty(self) -> bool:
        return self.queue.empty()


@pytest.fixture
def updates():
    return Updates()


@pytest.fixture
def stream(fake_alpaca, updates):
    s = TradeUpdateStream(settings(fake_alpaca), updates, min_backoff=0.02, max_backoff=0.1)
    s.start()
    yield s
    s.stop()


def submit(fake: FakeAlpaca, coid: str, qty: int = 3, symbol: str = OCC) -> None:
    broker = AlpacaBroker(settings(fake))
    instrument = "OPTION" if symbol == OCC else "STOCK"
    broker.submit_order(OrderRequest(coid, symbol, "SPY", instrument, "buy", qty))


def test_stream_url_is_the_trading_url_with_ws_scheme_and_stream_path(fake_alpaca):
    assert stream_url(settings(fake_alpaca)) == fake_alpaca.stream_url
    https = AlpacaSettings(api_key="k" * 8, secret_key="s" * 8, trading_url="https://paper-api.example:8443")
    assert stream_url(https) == "wss://paper-api.example:8443/stream"
    assert stream_url(AlpacaSettings(api_key="k" * 8, secret_key="s" * 8)) is None


def test_stream_handshake_authenticates_with_the_key_then_listens_to_trade_updates(fake_alpaca, stream):
    assert stream.wait_connected(WAIT)
    assert stream.connected and stream.connects == 1
    assert fake_alpaca.stream_requests == [
        {"action": "authenticate", "data": {"key_id": FAKE_KEY, "secret_key": FAKE_SECRET}},
        {"action": "listen", "data": {"streams": ["trade_updates"]}},
    ]
    assert stream.last_message_at is not None and stream.last_message_at.tzinfo is not None


def test_stream_order_submitted_through_sdk_arrives_as_new_then_fill_within_a_second(fake_alpaca, updates, stream):
    assert stream.wait_connected(WAIT)
    fake_alpaca.fill_prices[OCC] = Decimal("1.37")
    started = time.monotonic()
    submit(fake_alpaca, "ops-7-0-abc", qty=3)
    new, fill = updates.next(), updates.next()
    assert time.monotonic() - started < 1.0

    assert (new.event, new.order.client_order_id, new.order.status) == ("new", "ops-7-0-abc", "new")
    assert (new.qty, new.price, new.order.filled_qty) == (None, None, Decimal(0))
    assert fill.event == "fill" and fill.is_execution
    assert (fill.qty, fill.price, fill.position_qty) == (Decimal("3"), Decimal("1.37"), Decimal("3"))
    assert (fill.order.status, fill.order.filled_qty, fill.order.filled_avg_price) == ("filled", Decimal("3"), Decimal("1.37"))
    assert fill.order.symbol == OCC and fill.order.broker_order_id == new.order.broker_order_id
    assert fill.at.tzinfo == UTC and fill.execution_id


def test_stream_partial_fills_then_cancel_carry_each_execution_and_the_running_average(fake_alpaca, updates, stream):
    assert stream.wait_connected(WAIT)
    submit(fake_alpaca, "ops-8-0-abc", qty=10)
    assert updates.next().event == "new"

    fake_alpaca.fill("ops-8-0-abc", price="2.00", qty=4)
    fake_alpaca.fill("ops-8-0-abc", price="2.10", qty=2)
    fake_alpaca.cancel("ops-8-0-abc")

    first, second, canceled = updates.next(), updates.next(), updates.next()
    assert (first.event, first.qty, first.price, first.order.status) == ("partial_fill", Decimal(4), Decimal("2.00"), "partially_filled")
    assert (second.event, second.qty, second.price) == ("partial_fill", Decimal(2), Decimal("2.10"))
    # (4 * 2.00 + 2 * 2.10) / 6 = 2.0333...
    assert second.order.filled_qty == Decimal(6)
    assert second.order.filled_avg_price == (Decimal("12.2") / 6).normalize()
    assert (canceled.event, canceled.qty, canceled.order.status, canceled.order.filled_qty) == ("canceled", None, "canceled", Decimal(6))


def test_stream_rejected_order_arrives_as_rejected(fake_alpaca, updates, stream):
    assert stream.wait_connected(WAIT)
    submit(fake_alpaca, "ops-9-0-abc")
    updates.next()
    fake_alpaca.reject("ops-9-0-abc")
    rejected = updates.next()
    assert (rejected.event, rejected.order.status) == ("rejected", "rejected")


def test_stream_dropped_connection_reconnects_and_later_events_arrive(fake_alpaca, updates):
    reconnected = threading.Event()
    with TradeUpdateStream(
        settings(fake_alpaca), updates, on_connect=reconnected.set, min_backoff=0.02, max_backoff=0.1
    ) as s:
        assert s.wait_connected(WAIT) and reconnected.wait(WAIT)
        reconnected.clear()

        assert fake_alpaca.drop_streams() == 1
        assert reconnected.wait(WAIT), "no reconnection"
        assert s.connects == 2 and fake_alpaca.wait_listeners(1)

        submit(fake_alpaca, "ops-10-0-abc")
        update = updates.next()
        assert (update.event, update.order.client_order_id) == ("new", "ops-10-0-abc")


def test_stream_refused_connections_back_off_and_connect_when_the_server_accepts_again(fake_alpaca, updates):
    fake_alpaca.refuse_streams()  # every upgrade: HTTP 429
    with TradeUpdateStream(settings(fake_alpaca), updates, min_backoff=0.02, max_backoff=0.1) as s:
        assert not s.wait_connected(0.3)
        assert s.connects == 0 and fake_alpaca.stream_connects == 0
        fake_alpaca.accept_streams()
        assert s.wait_connected(WAIT)
        submit(fake_alpaca, "ops-11-0-abc")
        assert updates.next().event == "new"


def test_stream_bad_key_is_never_connected_and_retries(fake_alpaca, updates, caplog):
    wrong = settings(fake_alpaca, secret_key="not-the-secret-0000")
    with caplog.at_level(logging.WARNING, logger="services.adapters.alpaca.stream"):
        with TradeUpdateStream(wrong, updates, min_backoff=0.02, max_backoff=0.05) as s:
            deadline = time.monotonic() + WAIT
            while sum(1 for r in fake_alpaca.stream_requests if r["action"] == "authenticate") < 2:
                assert time.monotonic() < deadline, "no second attempt"
                time.sleep(0.01)
            assert not s.connected and s.connects == 0
    assert not any(r["action"] == "listen" for r in fake_alpaca.stream_requests)
    assert any("disconnected" in r.getMessage() for r in caplog.records)


def test_stream_unknown_event_is_logged_and_ignored_and_later_events_arrive(fake_alpaca, updates, stream, caplog):
    assert stream.wait_connected(WAIT)
    submit(fake_alpaca, "ops-12-0-abc")
    new = updates.next()
    order = fake_alpaca.orders["ops-12-0-abc"]
    with caplog.at_level(logging.WARNING, logger="services.adapters.alpaca.stream"):
        fake_alpaca.push_trade_update("trade_bust", order)
        fake_alpaca.push_trade_update("fill", {"id": "not an order"})  # fails the SDK model
        fake_alpaca.fill("ops-12-0-abc", price="1.50")
        fill = updates.next()
    assert fill.event == "fill" and fill.order.broker_order_id == new.order.broker_order_id
    assert updates.empty()
    warnings = [(r.getMessage(), getattr(r, "event", None)) for r in caplog.records]
    assert ("trade update with an unknown event ignored", "trade_bust") in warnings
    assert any(m == "trade update stream: malformed trade update ignored" for m, _ in warnings)
    assert stream.connected and stream.connects == 1


def test_stream_callback_that_raises_is_logged_and_the_stream_goes_on(fake_alpaca, caplog):
    seen: list[str] = []
    second = threading.Event()

    def flaky(update: TradeUpdate) -> None:
        seen.append(update.client_order_id)
        if len(seen) == 1:
            raise RuntimeError("database down")
        second.set()

    with caplog.at_level(logging.ERROR, logger="services.adapters.alpaca.stream"):
        with TradeUpdateStream(settings(fake_alpaca), flaky, min_backoff=0.02) as s:
            assert s.wait_connected(WAIT)
            submit(fake_alpaca, "ops-13-0-abc")
            submit(fake_alpaca, "ops-14-0-abc")
            assert second.wait(WAIT)
            assert s.connects == 1
    assert seen == ["ops-13-0-abc", "ops-14-0-abc"]
    failed = [r for r in caplog.records if r.getMessage() == "trade update callback failed"]
    assert len(failed) == 1 and failed[0].client_order_id == "ops-13-0-abc" and failed[0].exc_info


def test_stream_stop_is_prompt_while_connected_and_while_backing_off(fake_alpaca, updates):
    s = TradeUpdateStream(settings(fake_alpaca), updates).start()
    assert s.wait_connected(WAIT)
    started = time.monotonic()
    s.stop()
    assert time.monotonic() - started < 1.0
    assert not s.connected and not s._thread.is_alive()
    assert fake_alpaca.wait_listeners(0)  # the server saw the connection end

    fake_alpaca.refuse_streams()
    backing_off = TradeUpdateStream(settings(fake_alpaca), updates, min_backoff=30, max_backoff=60).start()
    deadline = time.monotonic() + WAIT
    while fake_alpaca.stream_refusals == 0:
        assert time.monotonic() < deadline, "no connection attempt"
        time.sleep(0.01)
    time.sleep(0.05)  # now in its 15-30 s backoff
    started = time.monotonic()
    backing_off.stop()
    assert time.monotonic() - started < 1.0 and not backing_off._thread.is_alive()


def test_stream_stop_before_it_ever_connected_returns_at_once(updates):
    unreachable = AlpacaSettings(api_key="k" * 8, secret_key="s" * 8, trading_url="http://127.0.0.1:9")
    s = TradeUpdateStream(unreachable, updates, min_backoff=30).start()
    started = time.monotonic()
    s.stop()
    assert time.monotonic() - started < 1.0 and not s._thread.is_alive()


def test_stream_repr_shows_no_secret(fake_alpaca, updates):
    s = TradeUpdateStream(settings(fake_alpaca), updates)
    assert FAKE_SECRET not in repr(s) and FAKE_KEY not in repr(s)


def test_fake_stream_serves_the_sdks_own_trading_stream(fake_alpaca):
    """The SDK's TradingStream, run as its docs show, gets the fake's updates as its own model."""
    from alpaca.trading.stream import TradingStream

    got: queue.Queue = queue.Queue()

    async def handler(update):
        got.put(update)

    sdk = TradingStream(FAKE_KEY, FAKE_SECRET, url_override=fake_alpaca.stream_url)
    sdk.subscribe_trade_updates(handler)
    thread = threading.Thread(target=sdk.run, daemon=True)
    thread.start()
    try:
        assert fake_alpaca.wait_listeners(1)
        submit(fake_alpaca, "ops-15-0-abc")
        update = got.get(timeout=WAIT)
        assert (update.event, update.order.client_order_id) == ("new", "ops-15-0-abc")
    finally:
        sdk.stop()
        # TradingStream looks at its stop request after each message (or a 5 s receive timeout).
        fake_alpaca.push_trade_update("new", fake_alpaca.orders["ops-15-0-abc"])
        thread.join(WAIT)
    assert not thread.is_alive()

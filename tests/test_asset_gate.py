"""The asset gate (pure) and the per-session cache of the broker's asset records.

A recommendation for a symbol the broker does not trade once reached POST /v2/orders and came
back 422 "asset not found": `b00`, `NULL`, an emoji, an SQL fragment. The gate refuses a
malformed symbol by its form, and anything else the broker's record does not allow.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta, timezone

import pytest

from services.common.clock import FixedClock
from services.adapters.assets import AssetCache
from services.domain.broker import AssetRecord, BrokerRejected, BrokerUnavailable
from services.dispatcher.risk.gates import (
    ASSET_NOT_GATHERED,
    SYMBOL_PATTERN,
    AssetUnavailable,
    check_asset,
    symbol_problem,
)

UTC = timezone.utc
ACTIVE = AssetRecord("AAPL", "active", tradable=True, shortable=True, fractionable=True, asset_class="us_equity",
                     easy_to_borrow=True)


def record(symbol: str = "AAPL", **changes) -> AssetRecord:
    return replace(ACTIVE, symbol=symbol, **changes)


# --- the symbol's form ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "symbol",
    ["b00", "aapl", "Aapl", "AAPL ", " AAPL", "AA PL", "AAPL\n", "\t", "", "📈", "AAPL📈", "ＡＡＰＬ",
     "AAPL'; DROP TABLE x;--", "' OR 1=1 --", "AAPL;", "../orders", "BRK/B", "BRK.", ".B", "BRK..B", "BRK.B.C",
     "BRK.b", "T00", "SPY261204C00600000", "ABCDEFG", "ABCDEF.GHI", "BTC/USD", "ÄPFEL", None, 123, b"AAPL", ["AAPL"]],
    ids=repr,
)
def test_malformed_symbol_then_bad_symbol_for_entries_and_exits_alike(symbol):
    for action in ("BUY", "SELL", "EXIT"):
        result = check_asset(symbol, ACTIVE, action, "STOCK")
        assert (result.passed, result.code, result.limit) == (False, "BAD_SYMBOL", SYMBOL_PATTERN), (action, result)
        assert symbol_problem(symbol) is not None


@pytest.mark.parametrize("symbol", ["A", "F", "AAPL", "GOOGL", "BRK.B", "BF.B", "AGM.A", "NULL", "ABCDEF", "ABCDEF.GH"])
def test_well_formed_symbol_with_an_active_record_then_passes(symbol):
    result = check_asset(symbol, record(symbol), "BUY", "STOCK", 10)
    assert (result.passed, result.code, result.observed, result.limit) == (True, "OK", "active", "active")
    assert symbol_problem(symbol) is None


def test_null_is_a_well_formed_ticker_refused_because_the_broker_has_no_such_asset():
    assert symbol_problem("NULL") is None
    result = check_asset("NULL", None, "BUY", "STOCK")
    assert (result.passed, result.code) == (False, "NO_ASSET")
    assert result.reason == "NO_ASSET: the broker has no asset NULL"


def test_long_garbage_symbol_is_truncated_in_the_stored_observation():
    result = check_asset("X" * 500, ACTIVE, "BUY", "STOCK")
    assert result.code == "BAD_SYMBOL" and result.observed == "X" * 40
    assert len(result.reason) < 120


# --- the broker's record --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "asset, action, instrument, qty, code, observed, limit",
    [
        pytest.param(ACTIVE, "BUY", "STOCK", 10, "OK", "active", "active", id="active-tradable"),
        pytest.param(ACTIVE, "SELL", "STOCK", 10, "OK", "active", "active", id="short-easy-to-borrow"),
        pytest.param(ACTIVE, "BUY", "OPTION", 2, "OK", "active", "active", id="option-on-active-underlying"),
        pytest.param(None, "BUY", "STOCK", 10, "NO_ASSET", None, "active", id="broker-has-none"),
        pytest.param(AssetUnavailable("asset lookup failed: BrokerUnavailable: HTTP 503"), "BUY", "STOCK", 10,
                     "NO_ASSET", None, "active", id="lookup-failed"),
        pytest.param(ASSET_NOT_GATHERED, "BUY", "OPTION", 1, "NO_ASSET", None, "active", id="not-gathered"),
        pytest.param(record("MSFT"), "BUY", "STOCK", 10, "NO_ASSET", "MSFT", "AAPL", id="record-of-another-symbol"),
        pytest.param(record(status="inactive"), "BUY", "STOCK", 10, "ASSET_INACTIVE", "inactive", "active",
                     id="inactive"),
        pytest.param(record(tradable=False), "BUY", "STOCK", 10, "ASSET_NOT_TRADABLE", False, True, id="not-tradable"),
        pytest.param(record(tradable=False), "BUY", "OPTION", 1, "ASSET_NOT_TRADABLE", False, True,
                     id="option-on-untradable-underlying"),
        pytest.param(record(asset_class="crypto"), "BUY", "STOCK", 10, "NOT_US_EQUITY", "crypto", "us_equity",
                     id="crypto"),
        pytest.param(record(shortable=False), "SELL", "STOCK", 10, "NOT_SHORTABLE", False, True, id="not-shortable"),
        pytest.param(record(easy_to_borrow=False), "SELL", "STOCK", 10, "NOT_SHORTABLE", False, True,
                     id="hard-to-borrow"),
        pytest.param(record(shortable=False), "BUY", "STOCK", 10, "OK", "active", "active", id="long-needs-no-borrow"),
        pytest.param(record(shortable=False), "SELL", "OPTION", 1, "OK", "active", "active",
                     id="bearish-option-buys-a-put-no-borrow"),
        pytest.param(record(fractionable=False), "BUY", "STOCK", "2.5", "NOT_FRACTIONABLE", 2.5, "whole shares",
                     id="fractional-qty-not-fractionable"),
        pytest.param(record(fractionable=True), "BUY", "STOCK", "2.5", "OK", "active", "active",
                     id="fractional-qty-fractionable"),
        pytest.param(record(fractionable=False), "BUY", "STOCK", 3, "OK", "active", "active",
                     id="whole-shares-need-no-fractions"),
        pytest.param({"symbol": "AAPL", "status": "active", "tradable": True, "asset_class": "us_equity"}, "BUY",
                     "STOCK", 1, "OK", "active", "active", id="record-as-a-mapping"),
        pytest.param({"symbol": "AAPL", "status": "active", "asset_class": "us_equity"}, "BUY", "STOCK", 1,
                     "ASSET_NOT_TRADABLE", None, True, id="tradable-missing-is-not-tradable"),
    ],
)
def test_asset_record_gate_for_an_entry(asset, action, instrument, qty, code, observed, limit):
    result = check_asset("AAPL", asset, action, instrument, qty)
    assert (result.passed, result.code, result.limit) == (code == "OK", code, limit), result
    assert result.observed == observed or float(result.observed) == observed


@pytest.mark.parametrize(
    "asset, code",
    [
        (record(status="inactive"), "ASSET_INACTIVE"),
        (record(tradable=False), "ASSET_NOT_TRADABLE"),
        (None, "NO_ASSET"),
        (AssetUnavailable("asset lookup failed: timed out"), "NO_ASSET"),
        (record(shortable=False), None),
    ],
    ids=["inactive", "halted", "no-record", "lookup-failed", "not-shortable"],
)
def test_exit_of_a_held_position_passes_a_bad_asset_record_and_records_why(asset, code):
    """A halted or delisted stock still needs closing: the record is noted, not obeyed."""
    result = check_asset("AAPL", asset, "EXIT", "STOCK", 10)
    assert (result.passed, result.code) == (True, "OK")
    if code is not None:
        assert result.reason.startswith(f"OK: an exit is not blocked by the asset record ({code}: ")


# --- the cache ------------------------------------------------------------------------------------


class CountingBroker:
    """get_asset over a dict, counting calls; `fail` raises instead."""

    def __init__(self, assets: dict[str, AssetRecord]):
        self.assets = assets
        self.calls: list[str] = []
        self.fail: Exception | None = None

    def get_asset(self, symbol: str) -> AssetRecord | None:
        self.calls.append(symbol)
        if self.fail is not None:
            raise self.fail
        return self.assets.get(symbol)


MORNING = datetime(2026, 11, 30, 15, 0, tzinfo=UTC)  # 10:00 ET


def test_cache_asks_the_broker_once_per_symbol_per_session_day_including_no_such_asset():
    broker = CountingBroker({"AAPL": ACTIVE})
    clock = FixedClock(MORNING)
    cache = AssetCache(broker.get_asset, clock)

    first = [cache.lookup("AAPL"), cache.lookup("NULL")]
    again = [cache.lookup("AAPL"), cache.lookup("NULL")]
    clock.set(MORNING + timedelta(hours=13, minutes=59))  # 23:59 ET: the same ET day (04:59 UTC the next)
    late = cache.lookup("AAPL")

    assert first == again == [ACTIVE, None] and late == ACTIVE
    assert broker.calls == ["AAPL", "NULL"]
    assert cache.requests == 2


def test_cache_asks_again_on_the_next_et_day():
    broker = CountingBroker({"AAPL": ACTIVE})
    clock = FixedClock(MORNING)
    cache = AssetCache(broker.get_asset, clock)
    cache.lookup("AAPL")
    clock.set(MORNING + timedelta(hours=14, minutes=1))  # 00:01 ET the next day
    broker.assets["AAPL"] = record(status="inactive")

    assert cache.lookup("AAPL").status == "inactive"
    assert broker.calls == ["AAPL", "AAPL"]


def test_cache_takes_the_day_from_an_explicit_now_over_its_clock():
    broker = CountingBroker({"AAPL": ACTIVE})
    cache = AssetCache(broker.get_asset, FixedClock(MORNING))
    cache.lookup("AAPL", MORNING)
    cache.lookup("AAPL", MORNING + timedelta(days=1))
    assert broker.calls == ["AAPL", "AAPL"]


@pytest.mark.parametrize("error", [BrokerUnavailable("get asset AAPL: HTTP 503: fake 503"),
                                   BrokerRejected("get asset AAPL: HTTP 403: forbidden")], ids=["5xx", "403"])
def test_cache_lookup_error_is_unavailable_not_cached_and_denies_with_the_error(error):
    broker = CountingBroker({"AAPL": ACTIVE})
    cache = AssetCache(broker.get_asset, FixedClock(MORNING))
    broker.fail = error

    failed = cache.lookup("AAPL")
    broker.fail = None
    recovered = cache.lookup("AAPL")

    assert isinstance(failed, AssetUnavailable)
    assert failed.reason == f"asset lookup failed: {type(error).__name__}: {error}"
    result = check_asset("AAPL", failed, "BUY", "STOCK", 1)
    assert (result.passed, result.code) == (False, "NO_ASSET")
    assert str(error) in result.reason
    assert recovered == ACTIVE
    assert broker.calls == ["AAPL", "AAPL"]


@pytest.mark.parametrize("symbol", ["b00", "📈", "AAPL'; DROP TABLE x;--", "../orders", ""], ids=repr)
def test_cache_never_sends_a_malformed_symbol_to_the_broker(symbol):
    broker = CountingBroker({})
    cache = AssetCache(broker.get_asset, FixedClock(MORNING))
    found = cache.lookup(symbol)
    assert isinstance(found, AssetUnavailable) and found.reason.startswith("not looked up: ")
    assert broker.calls == []
    assert check_asset(symbol, found, "BUY", "STOCK").code == "BAD_SYMBOL"

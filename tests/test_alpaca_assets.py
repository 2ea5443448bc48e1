"""AlpacaBroker.get_asset through the real SDK against the local server: GET /v2/assets/{symbol}."""

from __future__ import annotations

import pytest

from services.domain.broker import AssetRecord, BrokerUnavailable
from tests.fake_alpaca import FakeAlpaca, fake_alpaca  # noqa: F401
from tests.test_alpaca_adapter import SleepRecorder, broker


def test_get_asset_returns_the_record_from_the_assets_path(fake_alpaca):
    fake_alpaca.add_asset("AAPL")
    fake_alpaca.add_asset("BRK.B", shortable=False, easy_to_borrow=False, fractionable=False, exchange="NYSE")

    aapl = broker(fake_alpaca).get_asset("AAPL")
    brk = broker(fake_alpaca).get_asset("BRK.B")

    assert aapl == AssetRecord("AAPL", "active", tradable=True, shortable=True, fractionable=True,
                               asset_class="us_equity", easy_to_borrow=True)
    assert brk == AssetRecord("BRK.B", "active", tradable=True, shortable=False, fractionable=False,
                              asset_class="us_equity", easy_to_borrow=False)
    assert [(r.method, r.path) for r in fake_alpaca.requests] == [("GET", "/v2/assets/AAPL"), ("GET", "/v2/assets/BRK.B")]


def test_get_asset_of_an_inactive_untradable_asset_reports_its_flags(fake_alpaca):
    fake_alpaca.add_asset("DELIST", status="inactive", tradable=False)
    found = broker(fake_alpaca).get_asset("DELIST")
    assert (found.status, found.tradable) == ("inactive", False)


def test_get_asset_404_then_none_asked_once(fake_alpaca):
    sleeps = SleepRecorder()
    assert broker(fake_alpaca, sleep=sleeps).get_asset("NULL") is None
    assert [r.path for r in fake_alpaca.requests] == ["/v2/assets/NULL"]
    assert sleeps.calls == []  # a 404 is an answer, not an outage


def test_get_asset_5xx_then_retried_with_backoff_and_unavailable(fake_alpaca):
    fake_alpaca.add_asset("AAPL")
    fake_alpaca.fail_next("/v2/assets/AAPL", 503, times=3)
    sleeps = SleepRecorder()

    with pytest.raises(BrokerUnavailable, match=r"get asset AAPL: HTTP 503"):
        broker(fake_alpaca, sleep=sleeps).get_asset("AAPL")

    assert len(fake_alpaca.requests_to("/v2/assets/AAPL", "GET")) == 3
    assert sleeps.calls == [0.2, 0.4]


def test_get_asset_one_5xx_then_the_retry_answers(fake_alpaca):
    fake_alpaca.add_asset("AAPL")
    fake_alpaca.fail_next("/v2/assets/AAPL", 500)
    assert broker(fake_alpaca).get_asset("AAPL").symbol == "AAPL"
    assert [r.fault for r in fake_alpaca.requests_to("/v2/assets/AAPL")] == ["500", None]


def test_get_asset_hang_then_unavailable_within_the_timeout(fake_alpaca):
    fake_alpaca.hang_next("/v2/assets/AAPL", 5, times=3)
    with pytest.raises(BrokerUnavailable, match="timed out"):
        broker(fake_alpaca, timeout_seconds=0.2).get_asset("AAPL")


def test_get_asset_unexpected_shape_then_unavailable(fake_alpaca):
    fake_alpaca.add_asset("AAPL")
    del fake_alpaca.assets["AAPL"]["tradable"]
    with pytest.raises(BrokerUnavailable, match="unexpected response shape"):
        broker(fake_alpaca, read_attempts=1).get_asset("AAPL")


@pytest.mark.parametrize("symbol, path", [("../orders", "/v2/assets/..%2Forders"), ("A B", "/v2/assets/A%20B"),
                                          ("X?y=1", "/v2/assets/X%3Fy%3D1")])
def test_get_asset_keeps_any_symbol_inside_its_one_path_segment(fake_alpaca, symbol, path):
    assert broker(fake_alpaca).get_asset(symbol) is None
    assert [(r.method, r.path, r.query) for r in fake_alpaca.requests] == [("GET", path, {})]

"""The dispatcher's broker is live only when every switch says live."""

import pytest

from services.common.params import ParamsInForce, as_params
from services.common.clock import FixedClock
from services.dispatcher.main import build_broker
from tests.factories import et


@pytest.mark.parametrize(
    "env_live, params_live, alpaca_paper, paper",
    [
        ("1", True, "false", False),  # every switch turned: live
        ("1", True, "true", True),  # the adapter pinned to paper wins
        ("0", True, "false", True),  # no environment switch
        ("1", False, "false", True),  # no params switch
        ("0", False, "true", True),
    ],
)
def test_alpaca_broker_is_live_only_when_every_switch_says_live(monkeypatch, env_live, params_live, alpaca_paper, paper):
    for key, value in {"OPS_BROKER": "alpaca", "OPS_LIVE_TRADING": env_live, "ALPACA_PAPER": alpaca_paper,
                       "ALPACA_API_KEY": "PKWIRINGTEST000000000", "ALPACA_SECRET_KEY": "wiring-secret"}.items():
        monkeypatch.setenv(key, value)
    params = as_params({"live_trading_enabled": params_live})
    broker = build_broker(None, "acct", FixedClock(et("2026-11-30", "10:00")), ParamsInForce(params, "test", "1", params.content_hash()))
    assert broker.paper is paper

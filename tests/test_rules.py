"""Signal rules V2: momentum boundaries, filters, confidence from sentiment."""

from __future__ import annotations

from datetime import datetime, timezone
from decimal import Decimal

import pytest

from services.common.params import default_params
from services.signal_engine.rules import check_momentum, evaluate_signal

D = Decimal


def exact(close_now: str, close_5m: str | None, close_15m: str | None) -> dict:
    return {"close": D(close_now), "close_5m_ago": None if close_5m is None else D(close_5m),
            "close_15m_ago": None if close_15m is None else D(close_15m)}


@pytest.mark.parametrize("features, direction, confirmed, code", [
    # ret_5m exactly +0.002 (100.2 / 100 - 1): confirms, although 1.002 - 1 is 0.0020000000000000018 in float.
    (exact("100.2", "100", "100.2"), "BULL", True, "OK"),
    # ret_15m exactly +0.004 alone confirms.
    (exact("100.4", "100.4", "100"), "BULL", True, "OK"),
    # 0.0019 and 0.0039: just short on both horizons.
    (exact("100.19", "100", None), "BULL", False, "NO_MOMENTUM_HISTORY"),
    (exact("100.39", "100.2", "100"), "BULL", False, "NO_MOMENTUM"),
    # The BEAR mirror: exactly -0.002 confirms, -0.0019 / -0.0039 does not.
    (exact("99.8", "100", "99.8"), "BEAR", True, "OK"),
    (exact("99.6", "99.6", "100"), "BEAR", True, "OK"),
    (exact("99.61", "99.8", "100"), "BEAR", False, "NO_MOMENTUM"),
    # A rise does not confirm a BEAR, nor a fall a BULL.
    (exact("100.5", "100", "100"), "BEAR", False, "NO_MOMENTUM"),
    (exact("99.5", "100", "100"), "BULL", False, "NO_MOMENTUM"),
    # Missing history: a gap or the start of a session.
    (exact("100.5", None, None), "BULL", False, "NO_MOMENTUM_HISTORY"),
    (exact("100.5", "100", None), "BULL", False, "NO_MOMENTUM_HISTORY"),
    (exact("99.5", None, "100"), "BEAR", False, "NO_MOMENTUM_HISTORY"),
])
def test_check_momentum_boundaries(features, direction, confirmed, code):
    result = check_momentum(features, direction, default_params())
    assert result.confirmed is confirmed
    assert result.reason.split(":")[0] == code


def test_check_momentum_when_ret_5m_is_exactly_threshold_then_confirms_with_exact_returns():
    result = check_momentum(exact("100.2", "100", "100.2"), "BULL", default_params())
    assert result == (True, result.reason, D("0.002"), D("0"))


def test_check_momentum_when_0_0019_and_0_0039_then_not_confirmed():
    confirmed, reason, ret_5m, ret_15m = check_momentum(exact("100.39", "100.2", "100"), "BULL", default_params())
    assert (ret_5m.quantize(D("0.000001")), ret_15m) == (D("0.001896"), D("0.0039"))
    assert not confirmed and reason.startswith("NO_MOMENTUM:")
    confirmed, _, ret_5m, ret_15m = check_momentum(exact("100.0019", "100", "99.61"), "BULL", default_params())
    assert ret_5m == D("0.000019") and not confirmed
    # Exactly 0.0019 and 0.0039: 1005.80741 = 1003.9 x 1.0019 = 1001.9 x 1.0039.
    confirmed, reason, ret_5m, ret_15m = check_momentum(exact("1005.80741", "1003.9", "1001.9"), "BULL", default_params())
    assert (confirmed, ret_5m, ret_15m) == (False, D("0.0019"), D("0.0039"))
    assert reason == "NO_MOMENTUM: BULL ret_5m=0.001900 < 0.002 and ret_15m=0.003900 < 0.004"
    # The BEAR mirror: exactly -0.0019 and -0.0039 do not confirm, -0.002 does.
    confirmed, _, ret_5m, ret_15m = check_momentum(exact("99.81", "100", "100.2"), "BEAR", default_params())
    assert ret_5m == D("-0.0019") and not confirmed


def test_check_momentum_when_history_missing_then_reason_names_missing_input_and_returns_known_ret():
    confirmed, reason, ret_5m, ret_15m = check_momentum(exact("100.5", "100", None), "BULL", default_params())
    assert (confirmed, reason, ret_5m, ret_15m) == (False, "NO_MOMENTUM_HISTORY: missing close_15m_ago", D("0.005"), None)


def test_check_momentum_when_seed_style_flat_config_then_its_thresholds_apply():
    features = exact("100.3", "100", "100.3")
    assert check_momentum(features, "BULL", {"bull_min_ret_5m": 0.003}).confirmed is True
    assert check_momentum(features, "BULL", {"bull_min_ret_5m": 0.0031}).confirmed is False


# --- evaluate_signal ---------------------------------------------------------------------------

BAR_TS = datetime(2026, 3, 10, 15, 0, tzinfo=timezone.utc)


def bull_setup(**overrides) -> dict:
    """close 101 above sma20 100.5 above sma50 100, volume 1.5x, up 0.3% in 5 minutes."""
    f = {"ticker": "ABC", "ts": BAR_TS, "close": D("101"), "sma20": D("100.5"), "sma50": D("100"),
         "distance_sma20": D("101") / D("100.5") - 1, "volume_ratio": D("1.5"), "trend_state": 1,
         "close_5m_ago": D("100.7"), "close_15m_ago": D("100.6"), "vol_ratio": D("1.1"), "short_inputs": []}
    f.update(overrides)
    return f


def bear_setup(**overrides) -> dict:
    f = {"ticker": "XYZ", "ts": BAR_TS, "close": D("99"), "sma20": D("99.5"), "sma50": D("100"),
         "distance_sma20": D("99") / D("99.5") - 1, "volume_ratio": D("1.5"), "trend_state": -1,
         "close_5m_ago": D("99.3"), "close_15m_ago": D("99.4"), "short_inputs": []}
    f.update(overrides)
    return f


def test_evaluate_signal_when_bull_setup_confirmed_then_buy_with_base_confidence():
    d = evaluate_signal(bull_setup(), None, default_params())
    assert (d.emit, d.direction, d.action, d.outcome) == (True, "BULL", "BUY", "EMIT")
    assert d.confidence == D("0.55")
    assert [f.passed for f in d.filters] == [True, True, True, True]
    assert d.reason["filters"]["volume"]["threshold"] == D("1.2")
    assert d.reason["filters"]["momentum"]["value"]["ret_5m"] == D("101") / D("100.7") - 1


def test_evaluate_signal_when_bear_setup_confirmed_then_sell():
    d = evaluate_signal(bear_setup(), None, default_params())
    assert (d.emit, d.direction, d.action) == (True, "BEAR", "SELL")
    assert d.reason["filters"]["breakout"]["threshold"] == D("-0.001")


def test_evaluate_signal_when_price_above_sma20_but_no_move_in_15_minutes_then_no_recommendation():
    # The seed's V1 would have bought this: above sma20, trend up, volume up, but flat for 15 min.
    flat = bull_setup(close_5m_ago=D("101"), close_15m_ago=D("100.9"))
    d = evaluate_signal(flat, None, default_params())
    assert d.emit is False and d.action is None
    assert d.outcome == "NO_MOMENTUM" and d.failed_filter == "momentum"
    momentum = d.reason["filters"]["momentum"]
    assert momentum["passed"] is False
    assert momentum["value"] == {"ret_5m": D("0"), "ret_15m": D("101") / D("100.9") - 1}
    assert momentum["threshold"] == {"ret_5m": D("0.002"), "ret_15m": D("0.004")}
    assert momentum["reason"].startswith("NO_MOMENTUM: BULL ret_5m=0.000000 < 0.002 and ret_15m=")
    # Every other filter passed and is recorded as such.
    assert [d.reason["filters"][n]["passed"] for n in ("trend", "volume", "breakout")] == [True, True, True]


@pytest.mark.parametrize("overrides, outcome, failed", [
    ({"trend_state": 0, "sma20": D("100"), "sma50": D("100.5")}, "NO_TREND", "trend"),
    ({"sma50": None, "trend_state": None}, "NO_TREND", "trend"),
    ({"volume_ratio": D("1.19")}, "LOW_VOLUME", "volume"),
    ({"volume_ratio": None}, "LOW_VOLUME", "volume"),
    ({"distance_sma20": D("0.0009")}, "NO_BREAKOUT", "breakout"),
    ({"close_15m_ago": None}, "NO_MOMENTUM_HISTORY", "momentum"),
])
def test_evaluate_signal_when_one_filter_fails_then_outcome_names_it(overrides, outcome, failed):
    d = evaluate_signal(bull_setup(**overrides), None, default_params())
    assert (d.emit, d.outcome, d.failed_filter) == (False, outcome, failed)
    assert set(d.reason["filters"]) == {"trend", "volume", "breakout", "momentum"}


def test_evaluate_signal_when_volume_ratio_equals_minimum_then_passes():
    d = evaluate_signal(bull_setup(volume_ratio=D("1.2")), None, default_params())
    assert d.reason["filters"]["volume"]["passed"] is True and d.emit


@pytest.mark.parametrize("setup, score, expected, effect", [
    (bull_setup, D("0.5"), D("0.65"), "boost"),      # agrees: +sentiment_boost 0.10
    (bull_setup, D("-0.5"), D("0.40"), "penalty"),   # opposes: -sentiment_penalty 0.15
    (bear_setup, D("-0.5"), D("0.65"), "boost"),
    (bear_setup, D("0.5"), D("0.40"), "penalty"),
    (bull_setup, D("0.2"), D("0.65"), "boost"),      # |score| exactly the minimum counts
    (bull_setup, D("0.19"), D("0.55"), "none"),      # below the minimum: no effect
    (bull_setup, None, D("0.55"), "none"),
])
def test_confidence_when_sentiment_agrees_or_opposes_then_moves_by_configured_amount(setup, score, expected, effect):
    sentiment = None if score is None else {"score": score, "n": 3}
    d = evaluate_signal(setup(), sentiment, default_params())
    assert d.confidence == expected
    assert d.reason["confidence"]["sentiment_effect"].startswith(effect)


def test_confidence_when_boost_and_penalty_configured_then_uses_those_amounts_and_clamps():
    params = {"base_confidence": 0.95, "sentiment_boost": 0.2, "sentiment_penalty": 0.3}
    assert evaluate_signal(bull_setup(), {"score": 0.9}, params).confidence == D("1")  # 1.15 clamped
    assert evaluate_signal(bull_setup(), {"score": -0.9}, params).confidence == D("0.65")
    d = evaluate_signal(bull_setup(), {"score": 0.9}, params)
    assert d.reason["confidence"]["raw"] == D("1.15")


def test_rules_module_imports_no_driver_or_sdk():
    import ast
    import inspect

    import services.signal_engine.rules as rules

    tree = ast.parse(inspect.getsource(rules))
    imported = {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    imported |= {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not imported & {"psycopg", "psycopg_pool", "alpaca", "boto3", "botocore"}

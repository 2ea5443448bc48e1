"""The params model itself: the reviewed defaults validate, bounds and unknown keys are refused
with the field's path, cross-field rules hold, and the content hash identifies the limits."""

from __future__ import annotations

import copy
import json
from decimal import Decimal

import pytest

from services.common.params import (
    DEFAULT_PARAMS_PATH,
    ParamsError,
    as_params,
    default_params,
    load_params_file,
    parse_params,
    validate_params,
)


@pytest.fixture
def doc() -> dict:
    return json.loads(DEFAULT_PARAMS_PATH.read_text())


def refused(document: dict) -> list[str]:
    with pytest.raises(ParamsError) as info:
        validate_params(document)
    return info.value.errors


def test_reviewed_defaults_file_validates_with_the_seed_limits():
    in_force = load_params_file()
    p = in_force.params
    assert in_force.source == f"file:{DEFAULT_PARAMS_PATH}"
    assert in_force.version == "file"
    assert in_force.content_hash == p.content_hash()
    assert p.live_trading_enabled is False
    assert p.options.max_option_spread == 0.10
    assert p.options.min_option_volume == 100
    assert p.options.min_open_interest == 100
    assert p.options.max_iv_percentile == 80
    assert p.risk.max_daily_loss == Decimal("500")
    assert p.risk.max_open_positions == 5
    assert p.risk.max_notional_exposure == Decimal("10000")
    assert (p.trading_hours.block_after_open_minutes, p.trading_hours.block_before_close_minutes) == (5, 15)


def test_model_is_frozen():
    p = default_params()
    with pytest.raises(Exception):
        p.risk.max_daily_loss = Decimal("1")  # type: ignore[misc]


@pytest.mark.parametrize(
    ("section", "field", "value", "expected"),
    [
        ("options", "max_option_spread", 1.5, "options.max_option_spread: Input should be less than or equal to 1"),
        ("options", "max_option_spread", 0, "options.max_option_spread: Input should be greater than 0"),
        ("risk", "max_daily_loss", -1, "risk.max_daily_loss: Input should be greater than 0"),
        ("risk", "max_open_positions", 501, "risk.max_open_positions: Input should be less than or equal to 500"),
        ("risk", "max_equity_pct_per_trade", 1.01, "risk.max_equity_pct_per_trade: Input should be less than or equal to 1"),
        ("options", "max_iv_percentile", 101, "options.max_iv_percentile: Input should be less than or equal to 100"),
        ("signal", "bear_max_ret_5m", 0.002, "signal.bear_max_ret_5m: Input should be less than 0"),
        ("execution", "params_reload_seconds", 0, "execution.params_reload_seconds: Input should be greater than or equal to 1"),
        ("risk", "max_open_positions", "five", "risk.max_open_positions: Input should be a valid integer"),
        ("signal", "default_instrument", "FUTURE", "signal.default_instrument: Input should be 'STOCK' or 'OPTION'"),
    ],
)
def test_out_of_bounds_value_is_refused_naming_the_field(doc, section, field, value, expected):
    doc[section][field] = value
    errors = refused(doc)
    assert len(errors) == 1 and errors[0].startswith(expected)


def test_every_invalid_field_is_named_not_only_the_first(doc):
    doc["options"]["max_option_spread"] = 1.5
    doc["risk"]["max_daily_loss"] = -1
    errors = refused(doc)
    assert sorted(e.split(":")[0] for e in errors) == ["options.max_option_spread", "risk.max_daily_loss"]


def test_unknown_top_level_key_is_refused(doc):
    doc["max_daily_los"] = 100
    assert refused(doc) == ["max_daily_los: Extra inputs are not permitted"]


def test_unknown_key_inside_a_section_is_refused(doc):
    doc["risk"]["max_dialy_loss"] = 100
    assert refused(doc) == ["risk.max_dialy_loss: Extra inputs are not permitted"]


def test_missing_field_is_refused_not_defaulted(doc):
    del doc["options"]["max_option_spread"]
    assert refused(doc) == ["options.max_option_spread: Field required"]


def test_schema_version_must_match(doc):
    doc["schema_version"] = 2
    assert refused(doc) == ["schema_version: Input should be 1"]


def test_final_weights_must_sum_to_one(doc):
    doc["watchlist"]["weight_volatility"] = 0.2
    errors = refused(doc)
    assert len(errors) == 1 and errors[0].startswith("watchlist: ")
    assert "final score weights must sum to 1, got 1.1" in errors[0]


def test_liquidity_weights_must_sum_to_one(doc):
    doc["watchlist"]["liquidity_weight_open_interest"] = 0.1
    errors = refused(doc)
    assert len(errors) == 1 and "liquidity weights must sum to 1, got 0.9" in errors[0]


@pytest.mark.parametrize(
    ("after_open", "before_close", "valid"),
    [(5, 15, True), (100, 109, True), (100, 110, False), (120, 120, False)],
)
def test_blocked_windows_must_leave_an_early_close_session_open(doc, after_open, before_close, valid):
    doc["trading_hours"] = {"block_after_open_minutes": after_open, "block_before_close_minutes": before_close}
    if valid:
        assert validate_params(doc).trading_hours.block_before_close_minutes == before_close
    else:
        errors = refused(doc)
        assert len(errors) == 1 and errors[0].startswith("trading_hours: ")
        assert "13:00 early-close session" in errors[0]


@pytest.mark.parametrize(("refresh", "max_age", "valid"), [(30, 36, True), (30, 35, False), (30, 30, False), (1, 7, True)])
def test_account_state_age_limit_must_leave_room_for_a_refresh_put_off_to_a_quiet_moment(doc, refresh, max_age, valid):
    doc["execution"]["account_refresh_seconds"] = refresh
    doc["risk"]["max_account_state_age_seconds"] = max_age
    if valid:
        assert validate_params(doc).risk.max_account_state_age_seconds == max_age
    else:
        errors = refused(doc)
        assert errors == [f"<document>: Value error, risk.max_account_state_age_seconds ({max_age}) must exceed "
                          f"execution.account_refresh_seconds + 5 ({refresh + 5}): an account state refreshed on "
                          "schedule would be judged stale"]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"day_trade_min_dte": 8, "day_trade_max_dte": 7}, "day_trade_min_dte must not exceed day_trade_max_dte"),
        ({"swing_trade_min_dte": 50, "swing_trade_max_dte": 45}, "swing_trade_min_dte must not exceed swing_trade_max_dte"),
        ({"target_abs_delta": 0.8}, "min_abs_delta <= target_abs_delta <= max_abs_delta"),
    ],
)
def test_dte_and_delta_windows_must_be_ordered(doc, changes, message):
    doc["options"].update(changes)
    errors = refused(doc)
    assert len(errors) == 1 and errors[0].startswith("options: ") and message in errors[0]


def test_equal_dte_bounds_are_a_valid_window(doc):
    doc["options"].update(day_trade_min_dte=3, day_trade_max_dte=3)
    assert validate_params(doc).options.day_trade_max_dte == 3


def test_stock_fallback_requires_stock_in_allowed_instruments(doc):
    doc["instruments"] = {"allowed_instruments": ["OPTION"], "allow_stock_fallback": True, "allow_short": False}
    errors = refused(doc)
    assert len(errors) == 1 and "allow_stock_fallback requires STOCK in allowed_instruments" in errors[0]
    doc["instruments"]["allow_stock_fallback"] = False
    assert validate_params(doc).instruments.allowed_instruments == ("OPTION",)


def test_empty_allowed_instruments_is_refused(doc):
    doc["instruments"]["allowed_instruments"] = []
    doc["instruments"]["allow_stock_fallback"] = False
    errors = refused(doc)
    assert [e.split(":")[0] for e in errors] == ["instruments.allowed_instruments"]


def test_as_params_overlays_seed_flat_keys_on_the_defaults():
    p = as_params({"max_daily_loss": 300, "max_open_positions": 3, "max_option_spread": 0.05})
    assert p.risk.max_daily_loss == Decimal("300")
    assert p.risk.max_open_positions == 3
    assert p.options.max_option_spread == 0.05
    # Everything else is the reviewed defaults.
    assert p.risk.max_notional_exposure == default_params().risk.max_notional_exposure
    assert p.options.min_open_interest == 100


def test_as_params_accepts_a_section_mapping_and_passes_typed_params_through():
    p = as_params({"risk": {"max_daily_loss": 250}})
    assert p.risk.max_daily_loss == Decimal("250")
    assert p.risk.max_open_positions == 5
    assert as_params(p) is p


def test_as_params_refuses_unknown_keys_and_bad_values():
    with pytest.raises(ParamsError) as info:
        as_params({"max_dialy_loss": 300})
    assert info.value.errors == ["max_dialy_loss: Extra inputs are not permitted"]
    with pytest.raises(ParamsError) as info:
        as_params({"max_option_spread": 1.5})
    assert info.value.errors == ["options.max_option_spread: Input should be less than or equal to 1"]


def _reversed(value):
    if isinstance(value, dict):
        return {k: _reversed(value[k]) for k in reversed(list(value))}
    return value


def test_content_hash_is_stable_under_key_order_and_formatting(doc):
    original = parse_params(json.dumps(doc, indent=2))
    reordered = parse_params(json.dumps(_reversed(doc), separators=(",", ":")))
    assert list(_reversed(doc)) != list(doc)
    assert reordered.content_hash() == original.content_hash()
    assert len(original.content_hash()) == 64


def test_content_hash_changes_when_a_limit_changes(doc):
    before = validate_params(doc).content_hash()
    changed = copy.deepcopy(doc)
    changed["risk"]["max_daily_loss"] = 300
    assert validate_params(changed).content_hash() != before

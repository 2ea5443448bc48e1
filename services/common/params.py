"""The trading parameters: one typed, validated, frozen document for every service.

Operators tune it in SSM (`/ops-pipeline/trading-params`); `config/trading_params.json` holds
the reviewed defaults and is validated by the same model. A document that fails validation is
refused as a whole: nothing here ever fills a bad value with a permissive default.

Sections group the limits by the part of the system that enforces them. Every field name is
unique across sections, so the seed's flat mappings (``{"max_daily_loss": 500}``) can be
overlaid on the defaults by `as_params`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

SCHEMA_VERSION = 1
DEFAULT_PARAMS_PATH = Path(__file__).resolve().parents[2] / "config" / "trading_params.json"

Instrument = Literal["STOCK", "OPTION"]
Strategy = Literal["day_trade", "swing_trade"]


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class RiskParams(_Section):
    """Account kill switches and per-ticker limits, enforced by the dispatcher's gates."""

    max_daily_loss: Decimal = Field(gt=0, le=1_000_000)
    max_open_positions: int = Field(ge=0, le=500)
    max_notional_exposure: Decimal = Field(gt=0, le=100_000_000)
    max_notional_per_trade: Decimal = Field(gt=0, le=10_000_000)
    max_equity_pct_per_trade: float = Field(gt=0, le=1)
    max_trades_per_ticker_per_day: int = Field(ge=0, le=1000)
    ticker_cooldown_minutes: int = Field(ge=0, le=24 * 60)
    max_bar_age_seconds: int = Field(ge=1, le=3600)
    max_feature_age_seconds: int = Field(ge=1, le=3600)
    max_recommendation_age_seconds: int = Field(ge=1, le=86_400)
    max_account_state_age_seconds: int = Field(ge=1, le=86_400)
    # How old the last successful comparison of the broker's orders with ours may be before
    # entries stop (unknown orders are exposure the gates cannot see).
    max_reconciliation_age_seconds: int = Field(ge=30, le=86_400)
    # How far into the future another machine's timestamp may lie before it is refused. Small:
    # beyond a few seconds the other clock (or the row) is wrong, not merely ahead.
    max_clock_skew_seconds: int = Field(ge=0, le=60)
    # What a daily-loss trip does besides stopping entries: `flatten` closes every open position
    # (once each) and cancels working entry orders; `reduce_only` leaves the book as it is.
    on_daily_loss: Literal["reduce_only", "flatten"] = "flatten"


class TradingHoursParams(_Section):
    """Windows of the NYSE session in which no new entry goes out."""

    block_after_open_minutes: int = Field(ge=0, le=120)
    block_before_close_minutes: int = Field(ge=0, le=120)

    @model_validator(mode="after")
    def _leaves_a_session(self) -> TradingHoursParams:
        # An early close (13:00) is the shortest session: 210 minutes.
        if self.block_after_open_minutes + self.block_before_close_minutes >= 210:
            raise ValueError("blocked windows must leave part of a 13:00 early-close session open")
        return self


class ConfidenceParams(_Section):
    """Minimum confidence a recommendation needs, by strategy."""

    min_confidence_day_trade: float = Field(ge=0, le=1)
    min_confidence_swing_trade: float = Field(ge=0, le=1)


class InstrumentParams(_Section):
    """What the account may trade, and what happens when an option fails its gates."""

    allowed_instruments: tuple[Instrument, ...] = Field(min_length=1)
    allow_stock_fallback: bool
    allow_short: bool

    @model_validator(mode="after")
    def _fallback_needs_stock(self) -> InstrumentParams:
        if self.allow_stock_fallback and "STOCK" not in self.allowed_instruments:
            raise ValueError("allow_stock_fallback requires STOCK in allowed_instruments")
        return self


class OptionParams(_Section):
    """Option liquidity gates, contract choice and option sizing."""

    max_option_spread: float = Field(gt=0, le=1)
    min_option_volume: int = Field(ge=0, le=10_000_000)
    min_open_interest: int = Field(ge=0, le=10_000_000)
    max_iv_percentile: float = Field(ge=0, le=100)
    iv_min_history_sessions: int = Field(ge=1, le=252)
    max_quote_age_seconds: int = Field(ge=1, le=3600)
    expiry_day_cutoff_minutes_before_close: int = Field(ge=0, le=390)
    day_trade_min_dte: int = Field(ge=0, le=30)
    day_trade_max_dte: int = Field(ge=0, le=30)
    swing_trade_min_dte: int = Field(ge=0, le=365)
    swing_trade_max_dte: int = Field(ge=0, le=365)
    min_abs_delta: float = Field(ge=0, le=1)
    max_abs_delta: float = Field(ge=0, le=1)
    target_abs_delta: float = Field(ge=0, le=1)
    max_contracts_per_trade: int = Field(ge=1, le=1000)
    max_premium_per_trade: Decimal = Field(gt=0, le=10_000_000)

    @model_validator(mode="after")
    def _windows_ordered(self) -> OptionParams:
        if self.day_trade_min_dte > self.day_trade_max_dte:
            raise ValueError("day_trade_min_dte must not exceed day_trade_max_dte")
        if self.swing_trade_min_dte > self.swing_trade_max_dte:
            raise ValueError("swing_trade_min_dte must not exceed swing_trade_max_dte")
        if not self.min_abs_delta <= self.target_abs_delta <= self.max_abs_delta:
            raise ValueError("delta band must satisfy min_abs_delta <= target_abs_delta <= max_abs_delta")
        return self


class SignalParams(_Section):
    """Signal engine V2 rules: momentum, trend, volume, breakout, sentiment, cooldown."""

    bull_min_ret_5m: float = Field(gt=0, le=0.5)
    bull_min_ret_15m: float = Field(gt=0, le=0.5)
    bear_max_ret_5m: float = Field(ge=-0.5, lt=0)
    bear_max_ret_15m: float = Field(ge=-0.5, lt=0)
    min_volume_ratio: float = Field(ge=0, le=100)
    breakout_min_distance_sma20: float = Field(ge=0, le=1)
    base_confidence: float = Field(ge=0, le=1)
    sentiment_boost: float = Field(ge=0, le=1)
    sentiment_penalty: float = Field(ge=0, le=1)
    sentiment_min_abs_score: float = Field(ge=0, le=1)
    sentiment_lookback_minutes: int = Field(ge=1, le=7 * 24 * 60)
    signal_cooldown_minutes: int = Field(ge=0, le=24 * 60)
    default_instrument: Instrument
    default_strategy: Strategy


class WatchlistParams(_Section):
    """Watchlist scoring weights and selection."""

    weight_sentiment_momentum: float = Field(ge=0, le=1)
    weight_liquidity: float = Field(ge=0, le=1)
    weight_technical: float = Field(ge=0, le=1)
    weight_volatility: float = Field(ge=0, le=1)
    liquidity_weight_volume: float = Field(ge=0, le=1)
    liquidity_weight_spread: float = Field(ge=0, le=1)
    liquidity_weight_open_interest: float = Field(ge=0, le=1)
    top_n: int = Field(ge=1, le=500)
    hysteresis: float = Field(ge=0, le=1)

    @model_validator(mode="after")
    def _weights_sum_to_one(self) -> WatchlistParams:
        final = (
            self.weight_sentiment_momentum
            + self.weight_liquidity
            + self.weight_technical
            + self.weight_volatility
        )
        liquidity = (
            self.liquidity_weight_volume
            + self.liquidity_weight_spread
            + self.liquidity_weight_open_interest
        )
        if abs(final - 1) > 1e-9:
            raise ValueError(f"final score weights must sum to 1, got {final:g}")
        if abs(liquidity - 1) > 1e-9:
            raise ValueError(f"liquidity weights must sum to 1, got {liquidity:g}")
        return self


class ExecutionParams(_Section):
    """Order execution: order types and re-pricing, the simulated broker's slippage, the dispatcher's cadence.

    Options go out as limit orders at mid + option_limit_aggressiveness x half-spread (1 is the
    far touch); unfilled after reprice_after_seconds they are re-priced reprice_step more
    aggressively, at most max_reprices times. Stocks go at market, or as limits
    stock_limit_offset_bps through the last price.
    """

    slippage_bps: float = Field(ge=0, le=500)
    account_refresh_seconds: int = Field(ge=1, le=3600)
    poll_interval_seconds: float = Field(gt=0, le=60)
    params_reload_seconds: int = Field(ge=1, le=3600)
    option_limit_aggressiveness: float = Field(ge=0, le=1)
    reprice_after_seconds: int = Field(ge=1, le=3600)
    max_reprices: int = Field(ge=0, le=20)
    reprice_step: float = Field(ge=0, le=1)
    stock_order_type: Literal["market", "limit"]
    stock_limit_offset_bps: float = Field(ge=0, le=500)


class InstrumentExitParams(_Section):
    """Price exits of one instrument, as fractions of the entry price (premium for an option).

    0.25 is 25%. Long: the stop is entry x (1 - stop_loss_pct), the target entry x (1 +
    take_profit_pct); a short mirrors them. The trailing stop arms once the best price since
    entry (the high-water mark) has gained trailing_activation_pct on the entry, and then fires
    trailing_stop_pct below that mark.
    """

    stop_loss_pct: float = Field(gt=0, lt=1)
    take_profit_pct: float = Field(gt=0, le=10)
    trailing_stop_pct: float = Field(gt=0, lt=1)
    trailing_activation_pct: float = Field(ge=0, le=10)


class _StrategyExitParams(_Section):
    stock: InstrumentExitParams
    option: InstrumentExitParams
    max_holding_minutes: int = Field(ge=1, le=365 * 24 * 60)
    # Prices older than this (from the bar's end) are not judged; see services/domain/exits.py.
    stale_bar_seconds: int = Field(ge=60, le=3600)
    # At least an hour before the close: the broker liquidates expiring positions it judges at
    # risk from about 15:15 ET, and the exit order needs time to work (and to be re-priced).
    option_expiry_cutoff_minutes_before_close: int = Field(ge=60, le=390)
    # Day trades are flattened this long before the close (an early close moves it); other
    # positions only when their data is stale.
    flatten_minutes_before_close: int = Field(ge=1, le=180)


class DayTradeExitParams(_StrategyExitParams):
    """Exit rules of a day trade: price exits, holding time, the flatten before the close, expiry."""


class SwingTradeExitParams(_StrategyExitParams):
    """Exit rules of a swing trade; an option is also closed when fewer trading days than
    min_trading_days_to_expiry remain before its last trading day."""

    min_trading_days_to_expiry: int = Field(ge=0, le=60)


class ExitParams(_Section):
    """Exit rules by strategy, evaluated by services/domain/exits.py for every open position."""

    day_trade: DayTradeExitParams
    swing_trade: SwingTradeExitParams

    def for_strategy(self, strategy: Strategy) -> DayTradeExitParams | SwingTradeExitParams:
        return self.day_trade if strategy == "day_trade" else self.swing_trade


class FeeParams(_Section):
    """Fees charged per fill: per share of stock and per option contract, in dollars.

    Charged on the entry and on the exit; a closed position's realized P&L is net of them. The
    simulated broker charges the same, so its equity-based daily P&L matches the positions'.
    """

    per_share: Decimal = Field(default=Decimal(0), ge=0, le=1)
    per_contract: Decimal = Field(default=Decimal(0), ge=0, le=10)

    def per_unit(self, instrument: str) -> Decimal:
        return self.per_contract if instrument == "OPTION" else self.per_share


# A dispatcher may put a due account refresh off this long, to a moment when no recommendation is
# waiting (services/dispatcher/main.py): the account state's age limit must leave room for it.
ACCOUNT_REFRESH_DEFER_SECONDS = 5


class TradingParams(_Section):
    """The whole document. `schema_version` must match this code's."""

    schema_version: Literal[1]
    live_trading_enabled: bool
    risk: RiskParams
    trading_hours: TradingHoursParams
    confidence: ConfidenceParams
    instruments: InstrumentParams
    options: OptionParams
    signal: SignalParams
    watchlist: WatchlistParams
    execution: ExecutionParams
    exits: ExitParams
    fees: FeeParams = Field(default_factory=FeeParams)

    @model_validator(mode="after")
    def _account_state_outlives_its_refresh(self) -> TradingParams:
        least = self.execution.account_refresh_seconds + ACCOUNT_REFRESH_DEFER_SECONDS
        if self.risk.max_account_state_age_seconds <= least:
            raise ValueError(
                f"risk.max_account_state_age_seconds ({self.risk.max_account_state_age_seconds}) must exceed "
                f"execution.account_refresh_seconds + {ACCOUNT_REFRESH_DEFER_SECONDS} ({least}): an account "
                "state refreshed on schedule would be judged stale")
        return self

    def content_hash(self) -> str:
        """sha256 of the canonical JSON form: the same limits give the same hash."""
        # Decimals normalised, so 500 and 500.00 are the same limit and give the same hash.
        canonical = json.dumps(self.model_dump(), sort_keys=True, separators=(",", ":"), default=_canonical)
        return hashlib.sha256(canonical.encode()).hexdigest()


def _canonical(value: Any) -> Any:
    if isinstance(value, Decimal):
        return format(value.normalize(), "f")
    raise TypeError(f"not serialisable: {type(value).__name__}")


class ParamsError(ValueError):
    """A parameter document was refused. `errors` names every invalid field by its path.

    Operator action: fix the document; the service keeps the last good one meanwhile.
    """

    def __init__(self, message: str, errors: list[str]):
        super().__init__(message + ("\n  " + "\n  ".join(errors) if errors else ""))
        self.errors = errors


@dataclass(frozen=True)
class ParamsInForce:
    """A validated document and where it came from; recorded with every decision."""

    params: TradingParams
    source: str  # "file:<path>" or "ssm:<name>"
    version: str  # SSM parameter version, or "file"
    content_hash: str


def format_validation_errors(exc: ValidationError) -> list[str]:
    """One line per invalid field: `risk.max_daily_loss: Input should be greater than 0`."""
    lines = []
    for err in exc.errors():
        path = ".".join(str(p) for p in err["loc"]) or "<document>"
        lines.append(f"{path}: {err['msg']}")
    return lines


def parse_params(text: str, origin: str = "document") -> TradingParams:
    """Parse and validate a JSON document. Raises ParamsError naming every bad field."""
    try:
        raw = json.loads(text, parse_float=Decimal, object_pairs_hook=_no_duplicate_keys)
    except _DuplicateKey as e:
        raise ParamsError(f"{origin}: a key appears twice", [f"{e.args[0]}: duplicate key (the later value would silently win)"]) from e
    except json.JSONDecodeError as e:
        raise ParamsError(f"{origin}: not valid JSON", [f"<document>: {e.msg} at line {e.lineno} column {e.colno}"]) from e
    if not isinstance(raw, dict):
        raise ParamsError(f"{origin}: not a JSON object", [f"<document>: expected an object, got {type(raw).__name__}"])
    return validate_params(raw, origin)


class _DuplicateKey(ValueError):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


def validate_params(raw: Mapping[str, Any], origin: str = "document") -> TradingParams:
    try:
        return TradingParams.model_validate(raw)
    except ValidationError as e:
        raise ParamsError(f"{origin}: invalid trading params", format_validation_errors(e)) from e



def load_params_file(path: Path | str = DEFAULT_PARAMS_PATH) -> ParamsInForce:
    path = Path(path)
    params = parse_params(path.read_text(), origin=str(path))
    return ParamsInForce(params, f"file:{path}", "file", params.content_hash())


@lru_cache(maxsize=1)
def default_params() -> TradingParams:
    """The reviewed defaults from config/trading_params.json."""
    return load_params_file().params


def _field_index() -> dict[str, str]:
    index: dict[str, str] = {}
    for section, info in TradingParams.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, _Section):
            for name in annotation.model_fields:
                index[name] = section
    return index


FIELD_SECTIONS: dict[str, str] = _field_index()


def _overlay(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """`over` on `base`, section by section: {"exits": {"day_trade": {"stock": {...}}}} keeps the rest."""
    merged = dict(base)
    for key, value in over.items():
        if isinstance(merged.get(key), dict) and isinstance(value, Mapping):
            merged[key] = _overlay(merged[key], value)
        else:
            merged[key] = value
    return merged


def as_params(config: TradingParams | Mapping[str, Any]) -> TradingParams:
    """Accept the typed params or a seed-style mapping of flat keys over the defaults.

    ``{"max_daily_loss": 500, "max_open_positions": 5}`` becomes the defaults with those two
    limits, validated like any other document: an unknown key or a bad value raises ParamsError.
    """
    if isinstance(config, TradingParams):
        return config
    base = default_params().model_dump()
    for key, value in config.items():
        if key in base and isinstance(base[key], dict) and isinstance(value, Mapping):
            base[key] = _overlay(base[key], value)
        elif key in FIELD_SECTIONS:
            base[FIELD_SECTIONS[key]][key] = value
        elif key in base:
            base[key] = value
        else:
            raise ParamsError("invalid trading params", [f"{key}: Extra inputs are not permitted"])
    return validate_params(base, origin="mapping")

"""Signal engine V2 rules: pure decisions over one ticker's features and sentiment.

A recommendation needs a trend, volume behind it, a breakout from the 20-bar mean in the
trend's direction, and a CONFIRMED MOVE (momentum over the last 5 or 15 minutes). The seed's
V1 entered on price above sma20 alone and bought tops of moves that were already over; the
momentum check is what stops that, so it never passes on missing history.

Every filter runs and is recorded (value, threshold, verdict, reason) even after one fails, so
"why no signal?" is answered from the reason stored with the decision. The outcome is the first
failing filter in the fixed order trend, volume, breakout, momentum.

Arithmetic is Decimal: bar prices are exact decimals, and thresholds are converted from their
decimal text (0.002 stays 0.002), so a move of exactly the threshold confirms.

`config` / `params` is the typed TradingParams or a seed-style flat mapping (see `as_params`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal, NamedTuple

import numpy as np

from services.common.numbers import to_decimal
from services.common.params import TradingParams, as_params

Direction = Literal["BULL", "BEAR"]
ACTION_BY_DIRECTION: dict[str, str] = {"BULL": "BUY", "BEAR": "SELL"}

# Outcome codes, in the order the filters are applied.
EMIT = "EMIT"
NO_TREND = "NO_TREND"
LOW_VOLUME = "LOW_VOLUME"
NO_BREAKOUT = "NO_BREAKOUT"
NO_MOMENTUM = "NO_MOMENTUM"
NO_MOMENTUM_HISTORY = "NO_MOMENTUM_HISTORY"
FILTER_ORDER = ("trend", "volume", "breakout", "momentum")

ONE = Decimal(1)
ZERO = Decimal(0)


_THRESHOLDS: dict[tuple[type, Any], Decimal | None] = {}


def _threshold(value: Any) -> Decimal | None:
    """A param's Decimal (from its decimal text: 0.002 stays 0.002), converted once per value."""
    key = (type(value), value)
    d = _THRESHOLDS.get(key)
    if d is None:
        d = _THRESHOLDS[key] = to_decimal(value)
    return d


def _get(obj: Any, name: str) -> Any:
    if type(obj) is dict:  # the common case, a database row: no ABC check
        return obj.get(name)
    if obj is None:
        return None
    if isinstance(obj, Mapping):
        return obj.get(name)
    return getattr(obj, name, None)


class MomentumCheck(NamedTuple):
    """The seed's tuple (confirmed, reason, ret_5m, ret_15m), with names."""

    confirmed: bool
    reason: str
    ret_5m: Decimal | None
    ret_15m: Decimal | None


def _ret(close: Decimal | None, earlier: Decimal | None) -> Decimal | None:
    if close is None or earlier is None or earlier <= 0:
        return None
    return close / earlier - ONE


def check_momentum(features: Any, direction: str, config: TradingParams | Mapping[str, Any]) -> MomentumCheck:
    """Is there a confirmed move in `direction` over the last 5 or 15 minutes?

    ret_Nm = close / close_Nm_ago - 1. BULL: ret_5m >= bull_min_ret_5m or ret_15m >=
    bull_min_ret_15m. BEAR: ret_5m <= bear_max_ret_5m or ret_15m <= bear_max_ret_15m.
    Either past close missing (a gap, the first 15 minutes of a session) denies with
    NO_MOMENTUM_HISTORY: the rule was defined on both horizons, and a move we cannot see is not
    a confirmed move. The returns that could be computed are still returned for the record.
    """
    signal = as_params(config).signal
    close = to_decimal(_get(features, "close"))
    c5 = to_decimal(_get(features, "close_5m_ago"))
    c15 = to_decimal(_get(features, "close_15m_ago"))
    ret_5m, ret_15m = _ret(close, c5), _ret(close, c15)
    if direction not in ACTION_BY_DIRECTION:
        return MomentumCheck(False, f"NO_DIRECTION: direction={direction!r}", ret_5m, ret_15m)
    if ret_5m is None or ret_15m is None:
        missing = [name for name, r in (("close_5m_ago", ret_5m), ("close_15m_ago", ret_15m)) if r is None]
        return MomentumCheck(False, f"{NO_MOMENTUM_HISTORY}: missing {','.join(missing)}", ret_5m, ret_15m)
    if direction == "BULL":
        t5, t15 = _threshold(signal.bull_min_ret_5m), _threshold(signal.bull_min_ret_15m)
        hit5, hit15 = ret_5m >= t5, ret_15m >= t15
        cmp5, cmp15 = (">=" if hit5 else "<"), (">=" if hit15 else "<")
    else:
        t5, t15 = _threshold(signal.bear_max_ret_5m), _threshold(signal.bear_max_ret_15m)
        hit5, hit15 = ret_5m <= t5, ret_15m <= t15
        cmp5, cmp15 = ("<=" if hit5 else ">"), ("<=" if hit15 else ">")
    detail = f"{direction} ret_5m={ret_5m:.6f} {cmp5} {t5} {'or' if hit5 or hit15 else 'and'} ret_15m={ret_15m:.6f} {cmp15} {t15}"
    if hit5 or hit15:
        return MomentumCheck(True, f"OK: {detail}", ret_5m, ret_15m)
    return MomentumCheck(False, f"{NO_MOMENTUM}: {detail}", ret_5m, ret_15m)


@dataclass(frozen=True)
class FilterResult:
    """One filter's verdict: passed is None when it could not be evaluated (no direction)."""

    name: str
    passed: bool | None
    reason: str
    value: Any
    threshold: Any

    @property
    def code(self) -> str:
        return self.reason.split(":", 1)[0]

    def as_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "reason": self.reason, "value": self.value, "threshold": self.threshold}


@dataclass(frozen=True)
class SignalDecision:
    """The outcome for one ticker and bar. `emit` only when every filter passed."""

    ticker: str | None
    bar_ts: datetime | None
    direction: Direction | None
    action: str | None
    emit: bool
    outcome: str                      # EMIT or the first failing filter's code
    confidence: Decimal | None
    filters: tuple[FilterResult, ...]
    reason: dict[str, Any] = field(compare=False)

    @property
    def failed_filter(self) -> str | None:
        """The first failing filter's name (trend, volume, breakout, momentum), "confidence" when
        every filter passed but the confidence is below the strategy's threshold, None on EMIT."""
        for f in self.filters:
            if f.passed is not True:
                return f.name
        return None if self.emit else "confidence"


def _trend(features: Any) -> tuple[Direction | None, FilterResult]:
    close = to_decimal(_get(features, "close"))
    sma20 = to_decimal(_get(features, "sma20"))
    sma50 = to_decimal(_get(features, "sma50"))
    state = _get(features, "trend_state")
    value = {"close": close, "sma20": sma20, "sma50": sma50, "trend_state": state}
    if close is None or sma20 is None or sma50 is None or state is None:
        missing = [k for k, v in value.items() if v is None]
        return None, FilterResult("trend", False, f"{NO_TREND}: missing {','.join(missing)}", value,
                                  "close > sma20 > sma50 (BULL) or close < sma20 < sma50 (BEAR)")
    if int(state) == 1 and close > sma20 > sma50:
        return "BULL", FilterResult("trend", True, f"OK: BULL close={close} > sma20={sma20:.4f} > sma50={sma50:.4f}",
                                    value, "close > sma20 > sma50")
    if int(state) == -1 and close < sma20 < sma50:
        return "BEAR", FilterResult("trend", True, f"OK: BEAR close={close} < sma20={sma20:.4f} < sma50={sma50:.4f}",
                                    value, "close < sma20 < sma50")
    return None, FilterResult("trend", False,
                              f"{NO_TREND}: trend_state={state} close={close} sma20={sma20:.4f} sma50={sma50:.4f}",
                              value, "close > sma20 > sma50 (BULL) or close < sma20 < sma50 (BEAR)")


def _volume(features: Any, signal) -> FilterResult:
    ratio = to_decimal(_get(features, "volume_ratio"))
    limit = _threshold(signal.min_volume_ratio)
    if ratio is None:
        return FilterResult("volume", False, f"{LOW_VOLUME}: volume_ratio missing", None, limit)
    if ratio >= limit:
        return FilterResult("volume", True, f"OK: volume_ratio={ratio:.4f} >= {limit}", ratio, limit)
    return FilterResult("volume", False, f"{LOW_VOLUME}: volume_ratio={ratio:.4f} < {limit}", ratio, limit)


def _breakout(features: Any, direction: Direction | None, signal) -> FilterResult:
    distance = to_decimal(_get(features, "distance_sma20"))
    minimum = _threshold(signal.breakout_min_distance_sma20)
    if direction is None:
        return FilterResult("breakout", None, f"{NO_BREAKOUT}: no trend direction", distance, minimum)
    threshold = minimum if direction == "BULL" else -minimum
    if distance is None:
        return FilterResult("breakout", False, f"{NO_BREAKOUT}: distance_sma20 missing", None, threshold)
    ok = distance >= threshold if direction == "BULL" else distance <= threshold
    cmp = (">=" if ok else "<") if direction == "BULL" else ("<=" if ok else ">")
    detail = f"{direction} distance_sma20={distance:.6f} {cmp} {threshold}"
    return FilterResult("breakout", ok, f"OK: {detail}" if ok else f"{NO_BREAKOUT}: {detail}", distance, threshold)


def _momentum(features: Any, direction: Direction | None, params: TradingParams) -> FilterResult:
    s = params.signal
    if direction is None:
        m = check_momentum(features, "BULL", params)
        return FilterResult("momentum", None, f"{NO_MOMENTUM}: no trend direction",
                            {"ret_5m": m.ret_5m, "ret_15m": m.ret_15m}, None)
    m = check_momentum(features, direction, params)
    threshold = ({"ret_5m": _threshold(s.bull_min_ret_5m), "ret_15m": _threshold(s.bull_min_ret_15m)}
                 if direction == "BULL" else
                 {"ret_5m": _threshold(s.bear_max_ret_5m), "ret_15m": _threshold(s.bear_max_ret_15m)})
    return FilterResult("momentum", m.confirmed, m.reason, {"ret_5m": m.ret_5m, "ret_15m": m.ret_15m}, threshold)


def sentiment_score(sentiment: Any) -> Decimal | None:
    """The signed score of a sentiment input: a number, or a mapping/object with `score`."""
    if sentiment is None:
        return None
    if isinstance(sentiment, (int, float, Decimal, str)) and not isinstance(sentiment, bool):
        return to_decimal(sentiment)
    return to_decimal(_get(sentiment, "score"))


def confidence_for(direction: Direction, sentiment: Any, params: TradingParams) -> tuple[Decimal, dict[str, Any]]:
    """base_confidence, plus sentiment_boost when sentiment agrees with the direction, minus
    sentiment_penalty when it opposes it (only if |score| >= sentiment_min_abs_score), clamped
    to [0, 1]. Returns the confidence and its factors."""
    s = params.signal
    base = _threshold(s.base_confidence)
    score = sentiment_score(sentiment)
    min_abs = _threshold(s.sentiment_min_abs_score)
    adjustment = ZERO
    if score is None:
        effect = "none: no sentiment in the lookback"
    elif abs(score) < min_abs:
        effect = f"none: |score|={abs(score)} < {min_abs}"
    elif (score > 0) == (direction == "BULL"):
        adjustment = _threshold(s.sentiment_boost)
        effect = "boost: sentiment agrees"
    else:
        adjustment = -_threshold(s.sentiment_penalty)
        effect = "penalty: sentiment opposes"
    raw = base + adjustment
    confidence = min(ONE, max(ZERO, raw))
    factors = {
        "base_confidence": base,
        "sentiment_score": score,
        "sentiment_min_abs_score": min_abs,
        "sentiment_effect": effect,
        "sentiment_adjustment": adjustment,
        "sentiment_n": _get(sentiment, "n") if isinstance(sentiment, Mapping) else None,
        "raw": raw,
        "confidence": confidence,
    }
    return confidence, factors


def min_confidence(params: TradingParams, strategy: str) -> Decimal:
    """The confidence a recommendation of this strategy needs (the dispatcher's confidence gate)."""
    c = params.confidence
    value = c.min_confidence_swing_trade if strategy == "swing_trade" else c.min_confidence_day_trade
    return to_decimal(value)


def evaluate_signal(features: Any, sentiment: Any, params: TradingParams | Mapping[str, Any]) -> SignalDecision:
    """Decide whether this ticker's latest features make a recommendation, and explain it.

    Direction: BULL when the trend is up (close > sma20 > sma50, trend_state 1), BEAR when down.
    Filters: trend, volume (volume_ratio >= min_volume_ratio), breakout (distance_sma20 beyond
    breakout_min_distance_sma20 in the direction), momentum (check_momentum). Only when all pass
    is the decision an emit, with action BUY (BULL) or SELL (BEAR).
    """
    p = as_params(params)
    direction, trend = _trend(features)
    filters = (trend, _volume(features, p.signal), _breakout(features, direction, p.signal), _momentum(features, direction, p))
    first_failed = next((f for f in filters if f.passed is not True), None)
    outcome = EMIT if first_failed is None else first_failed.code
    confidence, factors = (confidence_for(direction, sentiment, p) if direction is not None else (None, None))
    emit = first_failed is None
    if emit:
        # A confirmed move still needs the confidence its strategy requires: what the dispatcher
        # would deny anyway is not worth a recommendation.
        threshold = min_confidence(p, p.signal.default_strategy)
        factors = {**factors, "threshold": threshold, "strategy": p.signal.default_strategy}
        if confidence is None or confidence < threshold:
            emit, outcome = False, "confidence"
    reason = {
        "outcome": outcome,
        "direction": direction,
        "filters": {f.name: f.as_dict() for f in filters},
        "confidence": factors,
        "features": {k: _get(features, k) for k in (
            "ts", "close", "close_5m_ago", "close_15m_ago", "sma20", "sma50", "distance_sma20",
            "volume_ratio", "vol_ratio", "trend_state", "short_inputs")},
    }
    return SignalDecision(
        ticker=_get(features, "ticker"),
        bar_ts=_get(features, "ts"),
        direction=direction,
        action=ACTION_BY_DIRECTION[direction] if emit and direction else None,
        emit=emit,
        outcome=outcome,
        confidence=confidence,
        filters=filters,
        reason=reason,
    )


# How far the screen below relaxes each threshold: the rules compare Decimals read back from the
# stored features (15 significant digits) where the screen compares the doubles they came from.
_SCREEN_SLACK = 1e-9


def _at_least(x: np.ndarray, threshold: float) -> np.ndarray:
    return x >= threshold - (abs(threshold) * _SCREEN_SLACK + 1e-12)


def _at_most(x: np.ndarray, threshold: float) -> np.ndarray:
    return x <= threshold + (abs(threshold) * _SCREEN_SLACK + 1e-12)


def could_emit(features: Any, params: TradingParams | Mapping[str, Any]) -> np.ndarray:
    """A necessary condition of `evaluate_signal` emitting, over arrays of bars at once.

    `features` has the arrays of services.domain.features.Features (prices in any one unit).
    The mask is True wherever evaluate_signal could emit on those features: each filter's
    condition with its threshold relaxed by a part in 10**9, and the best confidence sentiment
    could give (base + boost) against the strategy's threshold. It decides nothing: a replay runs
    the signal engine only in the minutes where some ticker passes it, and the engine's own
    rules decide there. False means no emit, whatever the sentiment, cooldown or watchlist.
    """
    p = as_params(params)
    s = p.signal
    best = min(ONE, _threshold(s.base_confidence) + _threshold(s.sentiment_boost))
    if best < min_confidence(p, s.default_strategy):
        return np.zeros(len(features.trend_state), dtype=bool)
    trend = features.trend_state
    close = features.close
    with np.errstate(divide="ignore", invalid="ignore"):
        ret_5m = np.where(features.close_5m_ago > 0, close / features.close_5m_ago - 1, np.nan)
        ret_15m = np.where(features.close_15m_ago > 0, close / features.close_15m_ago - 1, np.nan)
    history = ~np.isnan(ret_5m) & ~np.isnan(ret_15m)
    volume = _at_least(features.volume_ratio, s.min_volume_ratio)
    bull = ((trend == 1) & _at_least(features.distance_sma20, s.breakout_min_distance_sma20)
            & (_at_least(ret_5m, s.bull_min_ret_5m) | _at_least(ret_15m, s.bull_min_ret_15m)))
    bear = ((trend == -1) & _at_most(features.distance_sma20, -s.breakout_min_distance_sma20)
            & (_at_most(ret_5m, s.bear_max_ret_5m) | _at_most(ret_15m, s.bear_max_ret_15m)))
    return volume & history & (bull | bear)

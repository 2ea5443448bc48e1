"""Watchlist scoring: pure ranking of candidate tickers, with a liquidity term and hysteresis.

    liquidity = 0.5*norm(avg daily volume) + 0.3*norm(spread quality) + 0.2*norm(option OI proxy)
    final     = 0.40*sentiment_momentum + 0.30*liquidity + 0.20*technical + 0.10*volatility

(the weights come from params.watchlist). Every term is in [0, 1].

Normalisation, `norm`: the percentile rank among the candidates that have the input,
rank / n with ties sharing the higher rank; a candidate without the input gets no credit for
it (0 in the sum) and its component says "missing", with the reason when the caller knows it
(`liquidity_detail`): a market we could not see is not taken for a liquid one, nor reported as
one that was seen and found wanting. It is
bounded, needs no scale, and one huge value (an index ETF's volume next to mid-caps) only
takes the top rank: min-max scaling would squash every other ticker to ~0, and a
log-winsorized scale would need thresholds to tune. The lowest present value scores 1/n, not 0.

The volume input is the average daily dollar volume when the caller has it (the cycle always
does: 10,000 shares of a $5 stock are not 10,000 of a $500 one), else the share volume.

Terms:
- sentiment_momentum = |confidence-weighted mean sentiment score| over the lookback, in [0, 1]:
  news flow in either direction makes a ticker worth watching (the signal engine trades both);
- technical = 0.5 * |trend_state| + 0.5 * norm(|distance_sma20|): a trend, and how far price
  has moved from its 20-bar mean;
- volatility = norm(vol_ratio): recent versus baseline 1-minute volatility.

Selection: the top `top_n` by score, with hysteresis: a ticker selected in the previous cycle
keeps its place unless a challenger beats it by more than `hysteresis` (it competes with
score + hysteresis), so the list does not churn on noise.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from services.common.numbers import finite_float
from services.common.params import TradingParams, as_params


@dataclass(frozen=True)
class WatchlistInput:
    """One candidate's raw inputs; None where the input is unavailable."""

    ticker: str
    sentiment_score: float | None = None      # signed, -1..1
    avg_daily_volume: float | None = None     # shares per session
    spread_quality: float | None = None       # higher is better, any scale (e.g. 1 - relative spread)
    oi_proxy: float | None = None             # higher is more option open interest, any scale
    trend_state: int | None = None
    distance_sma20: float | None = None
    vol_ratio: float | None = None
    avg_daily_dollar_volume: float | None = None  # sum(volume * close) per session
    liquidity_detail: Mapping[str, Any] | None = None  # where spread quality and OI came from, or why not


@dataclass(frozen=True)
class WatchlistScore:
    ticker: str
    score: float
    components: Mapping[str, Any]
    rank: int          # 1 = highest score
    selected: bool




def percentile_ranks(values: Mapping[str, Any]) -> dict[str, float]:
    """norm(): rank / n among present values (ties share the higher rank); missing -> 0.0."""
    present = {k: v for k, v in ((k, finite_float(v)) for k, v in values.items()) if v is not None}
    n = len(present)
    ordered = sorted(present.values())
    out = {k: 0.0 for k in values}
    for k, v in present.items():
        # Count of values <= v: bisect_right on the sorted list.
        lo, hi = 0, n
        while lo < hi:
            mid = (lo + hi) // 2
            if ordered[mid] <= v:
                lo = mid + 1
            else:
                hi = mid
        out[k] = lo / n
    return out


def score_watchlist(candidates: Iterable[WatchlistInput], params: TradingParams | Mapping[str, Any],
                    incumbents: Iterable[str] = ()) -> list[WatchlistScore]:
    """Score every candidate and select the top N with hysteresis; sorted by rank."""
    w = as_params(params).watchlist
    cands: Sequence[WatchlistInput] = list(candidates)
    held = set(incumbents)
    volume_n = percentile_ranks({c.ticker: _volume_input(c) for c in cands})
    spread_n = percentile_ranks({c.ticker: c.spread_quality for c in cands})
    oi_n = percentile_ranks({c.ticker: c.oi_proxy for c in cands})
    distance_n = percentile_ranks({c.ticker: abs(finite_float(c.distance_sma20)) if finite_float(c.distance_sma20) is not None
                                   else None for c in cands})
    volatility_n = percentile_ranks({c.ticker: c.vol_ratio for c in cands})

    scored = []
    for c in cands:
        sentiment = finite_float(c.sentiment_score)
        sentiment_momentum = min(1.0, abs(sentiment)) if sentiment is not None else 0.0
        liquidity = (w.liquidity_weight_volume * volume_n[c.ticker]
                     + w.liquidity_weight_spread * spread_n[c.ticker]
                     + w.liquidity_weight_open_interest * oi_n[c.ticker])
        trend = abs(int(c.trend_state)) if c.trend_state is not None else 0
        technical = 0.5 * trend + 0.5 * distance_n[c.ticker]
        volatility = volatility_n[c.ticker]
        score = (w.weight_sentiment_momentum * sentiment_momentum + w.weight_liquidity * liquidity
                 + w.weight_technical * technical + w.weight_volatility * volatility)
        components = {
            "sentiment_momentum": sentiment_momentum, "sentiment_score": sentiment,
            "liquidity": liquidity,
            "liquidity_volume": _term(volume_n[c.ticker], _volume_input(c)),
            "avg_daily_volume": finite_float(c.avg_daily_volume),
            "avg_daily_dollar_volume": finite_float(c.avg_daily_dollar_volume),
            "liquidity_spread": _term(spread_n[c.ticker], c.spread_quality), "spread_quality": finite_float(c.spread_quality),
            "liquidity_open_interest": _term(oi_n[c.ticker], c.oi_proxy), "oi_proxy": finite_float(c.oi_proxy),
            "option_liquidity": _liquidity_detail(c),
            "technical": technical, "trend_state": c.trend_state, "distance_sma20_norm": distance_n[c.ticker],
            "volatility": volatility, "vol_ratio": finite_float(c.vol_ratio),
            "weights": {"sentiment_momentum": w.weight_sentiment_momentum, "liquidity": w.weight_liquidity,
                        "technical": w.weight_technical, "volatility": w.weight_volatility},
            "incumbent": c.ticker in held,
            "missing": [k for k, v in (("sentiment", sentiment), ("avg_daily_volume", finite_float(c.avg_daily_volume)),
                                       ("spread_quality", finite_float(c.spread_quality)), ("oi_proxy", finite_float(c.oi_proxy)),
                                       ("trend_state", c.trend_state), ("vol_ratio", finite_float(c.vol_ratio)))
                        if v is None],
        }
        scored.append((c.ticker, round(score, 10), components))

    by_score = sorted(scored, key=lambda s: (-s[1], s[0]))
    by_effective = sorted(scored, key=lambda s: (-(s[1] + (w.hysteresis if s[0] in held else 0.0)), s[0]))
    chosen = {s[0] for s in by_effective[:w.top_n]}
    return [WatchlistScore(t, score, components, rank, t in chosen)
            for rank, (t, score, components) in enumerate(by_score, start=1)]


MISSING = "missing"


def _volume_input(c: WatchlistInput) -> float | None:
    dollars = finite_float(c.avg_daily_dollar_volume)
    return dollars if dollars is not None else finite_float(c.avg_daily_volume)


def _term(normed: float, raw: Any) -> float | str:
    """A liquidity term as stored: its normalised value, or "missing" when the input was absent."""
    return normed if finite_float(raw) is not None else MISSING


def _liquidity_detail(c: WatchlistInput) -> Mapping[str, Any]:
    if c.liquidity_detail is not None:
        return dict(c.liquidity_detail)
    if finite_float(c.spread_quality) is None and finite_float(c.oi_proxy) is None:
        return {"status": MISSING, "reason": "NO_SOURCE: no option liquidity inputs were supplied"}
    return {"status": "supplied"}


def as_float(value: Decimal | float | int | None) -> float | None:
    """Database numerics to the floats this module scores with (scores are not money)."""
    return finite_float(value)

"""Feature definitions: one pure function over windows of bars, for the live cycle and replays.

A window is the bars of ONE ET session day ending at the bar the features are for, newest
last, at most LOOKBACK_BARS long; a window never reaches into the previous day, so the first
bars of a day have short inputs. Definitions, per bar:

- sma20 / sma50: the mean close of the last 20 / 50 bars up to and including the bar; NaN until
  the session has that many bars (bars, not minutes: a gap does not shorten the window).
- distance_sma20 = close / sma20 - 1, distance_sma50 likewise.
- ret_1m: close / prev_close - 1, where prev_close is the close of the bar that began exactly
  60 s earlier; after a gap there is no 1-minute return at that bar.
- recent_vol: sample stdev of the 1-minute returns at the last 10 bars (at least 5 returns);
  baseline_vol: the same over the last 50 bars (at least 20); vol_ratio = recent / baseline.
- volume_ratio = volume / mean volume of the previous 20 bars (all 20 must exist, mean > 0);
  volume_surge when volume_ratio >= VOLUME_SURGE_RATIO.
- trend_state: 1 when close > sma20 > sma50, -1 when close < sma20 < sma50, 0 otherwise; NaN
  while an SMA is short.
- close_5m_ago / close_15m_ago: the close of the bar that began EXACTLY 5 / 15 minutes before,
  in the same window (same session day): NaN on a gap or at the start of a session, never a
  neighbouring bar's close.

Prices come as integers of PRICE_SCALE units (micro-dollars) and volumes as integers, so every
sum is exact and every comparison (trend_state, volume_surge, the SMA and volume gates on bar
counts) is decided in exact integer arithmetic: a flat market has close = sma20 = sma50 and a
trend of 0, never a float's 1e-16 either way. The derived values (means, ratios, stdevs) are
each one correctly rounded double division of exact integers, except the stdevs (two-pass over
doubles). The closes copied into prev_close / close_5m_ago / close_15m_ago are the bars' own.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

SMA_SHORT_BARS = 20
SMA_LONG_BARS = 50
RECENT_VOL_BARS = 10
RECENT_VOL_MIN_RETURNS = 5
BASELINE_VOL_BARS = 50
BASELINE_VOL_MIN_RETURNS = 20
VOLUME_AVG_BARS = 20
VOLUME_SURGE_RATIO = 2
# The most bars any window above needs, plus one for the oldest bar's 1-minute return.
LOOKBACK_BARS = max(SMA_LONG_BARS, BASELINE_VOL_BARS, VOLUME_AVG_BARS + 1) + 1
PRICE_SCALE = 1_000_000
BAR_SECONDS = 60

NAN = np.nan


@dataclass(frozen=True, slots=True)
class Windows:
    """k windows of LOOKBACK_BARS slots, right-aligned: window i holds its n[i] bars in its last
    n[i] slots (oldest first), the slots before them are ignored whatever they contain.

    ts: epoch seconds of each bar's start; close: price in PRICE_SCALE units; volume: shares.
    All (k, LOOKBACK_BARS) int64; n: (k,) int64, 1..LOOKBACK_BARS.
    """

    ts: np.ndarray
    close: np.ndarray
    volume: np.ndarray
    n: np.ndarray


@dataclass(frozen=True, slots=True)
class Features:
    """The features of each window's newest bar, (k,) float64, NaN where an input lacked bars.

    Prices (close, prev_close, close_5m_ago, close_15m_ago) stay in PRICE_SCALE units (exact
    integers as doubles); trend_state is -1/0/1 and volume_surge 0/1.
    """

    ts: np.ndarray
    close: np.ndarray
    volume: np.ndarray
    prev_close: np.ndarray
    close_5m_ago: np.ndarray
    close_15m_ago: np.ndarray
    sma20: np.ndarray
    sma50: np.ndarray
    distance_sma20: np.ndarray
    distance_sma50: np.ndarray
    recent_vol: np.ndarray
    baseline_vol: np.ndarray
    vol_ratio: np.ndarray
    volume_ratio: np.ndarray
    volume_surge: np.ndarray
    trend_state: np.ndarray

    def take(self, index: np.ndarray) -> Features:
        """The rows at `index` (an integer array or a mask)."""
        return Features(**{f.name: getattr(self, f.name)[index] for f in fields(self)})


def _close_exactly_before(w: Windows, valid: np.ndarray, seconds: int) -> np.ndarray:
    """The close of the bar that began `seconds` before the newest one, NaN when there is none.

    Bars are at least a minute apart, so that bar is among the seconds/60 slots before the newest.
    """
    depth = seconds // BAR_SECONDS
    ts = w.ts[:, -depth - 1:-1]
    hit = (ts == (w.ts[:, -1] - seconds)[:, None]) & valid[:, -depth - 1:-1]
    picked = w.close[:, -depth - 1:-1][np.arange(len(ts)), hit.argmax(axis=1)]
    return np.where(hit.any(axis=1), picked.astype(np.float64), NAN)


def _stdev(returns: np.ndarray, min_returns: int) -> np.ndarray:
    """Sample stdev of each row's non-NaN returns; NaN with fewer than `min_returns`."""
    count = np.count_nonzero(~np.isnan(returns), axis=1)
    enough = count >= min_returns
    safe = np.where(enough, count, 2)
    mean = np.nansum(returns, axis=1) / safe
    var = np.nansum((returns - mean[:, None]) ** 2, axis=1) / (safe - 1)
    return np.where(enough, np.sqrt(var), NAN)


def window_features(w: Windows) -> Features:
    """The features of the newest bar of every window (see the module's definitions)."""
    k, width = w.close.shape
    n = w.n
    valid = np.arange(width)[None, :] >= (width - n)[:, None]
    close = w.close[:, -1]
    volume = w.volume[:, -1]
    priced = np.where(valid, w.close, 0)

    # SMAs as exact sums; the comparisons are cross-multiplied so no rounding can tip them.
    s_short = priced[:, -SMA_SHORT_BARS:].sum(axis=1)
    s_long = priced[:, -SMA_LONG_BARS:].sum(axis=1)
    has_short = n >= SMA_SHORT_BARS
    has_long = n >= SMA_LONG_BARS
    d_short = np.where(has_short, s_short, 1)
    d_long = np.where(has_long, s_long, 1)
    sma20 = np.where(has_short, s_short / (SMA_SHORT_BARS * PRICE_SCALE), NAN)
    sma50 = np.where(has_long, s_long / (SMA_LONG_BARS * PRICE_SCALE), NAN)
    distance_sma20 = np.where(has_short, (SMA_SHORT_BARS * close - s_short) / d_short, NAN)
    distance_sma50 = np.where(has_long, (SMA_LONG_BARS * close - s_long) / d_long, NAN)
    above_short = SMA_SHORT_BARS * close - s_short          # sign of close - sma20
    short_over_long = SMA_LONG_BARS * s_short - SMA_SHORT_BARS * s_long  # sign of sma20 - sma50
    trend = np.where((above_short > 0) & (short_over_long > 0), 1,
                     np.where((above_short < 0) & (short_over_long < 0), -1, 0))
    trend_state = np.where(has_short & has_long, trend, NAN)

    # 1-minute returns at slots 1..width-1: the bar one slot back must be valid and 60 s earlier.
    stepped = valid[:, :-1] & (w.ts[:, 1:] - w.ts[:, :-1] == BAR_SECONDS)
    prev = np.where(stepped, w.close[:, :-1], 1)
    returns = np.where(stepped, (w.close[:, 1:] - prev) / prev, NAN)
    recent_vol = _stdev(returns[:, -RECENT_VOL_BARS:], RECENT_VOL_MIN_RETURNS)
    baseline_vol = _stdev(returns[:, -BASELINE_VOL_BARS:], BASELINE_VOL_MIN_RETURNS)
    has_baseline = baseline_vol > 0
    vol_ratio = np.where(has_baseline, recent_vol / np.where(has_baseline, baseline_vol, 1), NAN)

    # volume / (sum of the previous 20 / 20), as one division of exact integers.
    prev_volume = np.where(valid[:, -VOLUME_AVG_BARS - 1:-1], w.volume[:, -VOLUME_AVG_BARS - 1:-1], 0).sum(axis=1)
    has_volume = (n >= VOLUME_AVG_BARS + 1) & (prev_volume > 0)
    volume_ratio = np.where(has_volume, VOLUME_AVG_BARS * volume / np.where(has_volume, prev_volume, 1), NAN)
    volume_surge = np.where(has_volume, VOLUME_AVG_BARS * volume >= VOLUME_SURGE_RATIO * prev_volume, NAN)

    return Features(
        ts=w.ts[:, -1], close=close.astype(np.float64), volume=volume.astype(np.float64),
        prev_close=_close_exactly_before(w, valid, BAR_SECONDS),
        close_5m_ago=_close_exactly_before(w, valid, 5 * BAR_SECONDS),
        close_15m_ago=_close_exactly_before(w, valid, 15 * BAR_SECONDS),
        sma20=sma20, sma50=sma50, distance_sma20=distance_sma20, distance_sma50=distance_sma50,
        recent_vol=recent_vol, baseline_vol=baseline_vol, vol_ratio=vol_ratio,
        volume_ratio=volume_ratio, volume_surge=volume_surge.astype(np.float64),
        trend_state=trend_state.astype(np.float64),
    )


def session_groups(key: np.ndarray, day: np.ndarray) -> np.ndarray:
    """Group numbers of a series sorted by (key, ts): a new group at each change of key (the
    ticker) or of ET session day, since a window never crosses either."""
    return np.cumsum(np.r_[True, (key[1:] != key[:-1]) | (day[1:] != day[:-1])])


def bar_windows(ts: np.ndarray, close: np.ndarray, volume: np.ndarray, group: np.ndarray,
                which: np.ndarray) -> Windows:
    """The windows of the bars at positions `which` of a series sorted by (group, ts), where a
    group is one ticker's session day: what the live cycle held at each of those bars (replays
    and backfills)."""
    starts = np.flatnonzero(np.r_[True, group[1:] != group[:-1]])
    first = starts[np.searchsorted(starts, which, side="right") - 1]
    idx = np.maximum(which[:, None] + np.arange(-LOOKBACK_BARS + 1, 1)[None, :], 0)
    return Windows(ts=ts[idx], close=close[idx], volume=volume[idx],
                   n=np.minimum(which - first + 1, LOOKBACK_BARS))

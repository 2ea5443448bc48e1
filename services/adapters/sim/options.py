"""A simulated option chain for the simulated market, in the adapter's own OptionQuote shape.

The same choice and validation code (alpaca/options.py) runs on it as on Alpaca's chain, so the
simulated chain must look like a real one where the gates look:

- weekly expirations within `max_days` calendar days, each on a real NYSE session (a Friday
  holiday moves the expiry to the session before, as listed options do), expiring 16:00 ET;
- strikes on a grid around the spot, Black-Scholes prices for calls and puts from one
  volatility per (strike, expiry) with a skew, so put-call parity holds up to the spread;
- spreads that widen away from the money and with time to expiry, volume and open interest
  that fall with moneyness;
- some deliberately illiquid contracts (spread > 10%, volume < 100, open interest < 100).

Everything is deterministic given the seed: the per-contract randomness is a hash of
(seed, symbol, ET date), so a contract keeps its character through a simulated day.
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from typing import NamedTuple

from services.common.market_calendar import SessionCalendar, et_date, nyse_calendar, option_expiry_instant
from services.domain.market_data import OptionQuote

_SECONDS_PER_YEAR = 365.0 * 24 * 3600
_CENT = Decimal("0.01")


@dataclass(frozen=True)
class SimChainSpec:
    """The shape of a simulated chain. Defaults make ~7 expiries x 41 strikes x 2 rights."""

    strikes_each_side: int = 20
    max_days: int = 45
    base_vol: float = 0.30
    rate: float = 0.04
    illiquid_share: float = 0.08  # share of contracts made deliberately illiquid
    base_volume: int = 5000
    base_open_interest: int = 20000


def strike_step(spot: float) -> Decimal:
    """The listed strike interval for a price level, as exchanges list them (roughly)."""
    if spot < 25:
        return Decimal("0.5")
    if spot < 200:
        return Decimal("1")
    if spot < 500:
        return Decimal("5")
    return Decimal("10")


@functools.lru_cache(maxsize=1 << 16)  # a chain lists the same contracts minute after minute
def occ_symbol(underlying: str, expiration: date, right: str, strike: Decimal) -> str:
    """SPY261204C00600000: root, YYMMDD, C/P, strike x 1000 in 8 digits."""
    return f"{underlying}{expiration:%y%m%d}{'C' if right == 'call' else 'P'}{int(strike * 1000):08d}"


def weekly_expirations(now: datetime, calendar: SessionCalendar, max_days: int = 45) -> list[date]:
    """Weekly expirations from today's ET date to max_days later, each on an NYSE session.

    Each week expires on its Friday, or on the last session before it when the Friday is a
    holiday (Good Friday). An expiration whose 16:00 ET has passed is left out.
    """
    today = et_date(now)
    friday = today + timedelta(days=(4 - today.weekday()) % 7)
    out: list[date] = []
    while friday <= today + timedelta(days=max_days):
        day = friday
        if calendar.session_on(day) is None:
            day = calendar.previous_session(day).day
        if day >= today and now < option_expiry_instant(day) and (not out or day > out[-1]):
            out.append(day)
        friday += timedelta(days=7)
    return out


def _norm_cdf(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def _norm_pdf(x: float) -> float:
    return math.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)


@dataclass(frozen=True)
class BSResult:
    price: float
    delta: float
    gamma: float
    theta: float  # per calendar day
    vega: float  # per 1.00 of volatility / 100 (per vol point)


class _BSCore(NamedTuple):
    """What a call and a put on the same strike and expiry share."""

    d1: float
    d2: float
    disc: float
    pdf: float
    sqrt_t: float


def _bs_core(spot: float, strike: float, years: float, rate: float, vol: float) -> _BSCore:
    years = max(years, 1e-6)
    sqrt_t = math.sqrt(years)
    d1 = (math.log(spot / strike) + (rate + 0.5 * vol * vol) * years) / (vol * sqrt_t)
    return _BSCore(d1, d1 - vol * sqrt_t, math.exp(-rate * years), _norm_pdf(d1), sqrt_t)


def _bs_right(right: str, c: _BSCore, spot: float, strike: float, rate: float, vol: float) -> BSResult:
    gamma = c.pdf / (spot * vol * c.sqrt_t)
    vega = spot * c.pdf * c.sqrt_t / 100.0
    n_d1 = _norm_cdf(c.d1)
    if right == "call":
        n_d2 = _norm_cdf(c.d2)
        price = spot * n_d1 - strike * c.disc * n_d2
        delta = n_d1
        theta = (-spot * c.pdf * vol / (2 * c.sqrt_t) - rate * strike * c.disc * n_d2) / 365.0
    else:
        n_minus_d2 = _norm_cdf(-c.d2)
        price = strike * c.disc * n_minus_d2 - spot * _norm_cdf(-c.d1)
        delta = n_d1 - 1.0
        theta = (-spot * c.pdf * vol / (2 * c.sqrt_t) + rate * strike * c.disc * n_minus_d2) / 365.0
    return BSResult(max(price, 0.0), delta, gamma, theta, vega)


def black_scholes(right: str, spot: float, strike: float, years: float, rate: float, vol: float) -> BSResult:
    """European Black-Scholes price and greeks, no dividends."""
    return _bs_right(right, _bs_core(spot, strike, years, rate, vol), spot, strike, rate, vol)


def _uniform(seed: int, symbol: str, day: date, salt: str) -> float:
    digest = hashlib.blake2b(f"{seed}|{symbol}|{day}|{salt}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


@functools.lru_cache(maxsize=1 << 16)  # a chain is priced again every minute; a contract's draws are per day
def _draws(seed: int, symbol: str, day: date) -> tuple[float, float, float]:
    """A contract's three draws of the day: illiquid, activity, size."""
    return (_uniform(seed, symbol, day, "illiquid"), _uniform(seed, symbol, day, "activity"),
            _uniform(seed, symbol, day, "size"))


def smile_vol(base_vol: float, moneyness: float) -> float:
    """A skewed smile: higher vol away from the money, more on the downside (log moneyness < 0)."""
    return max(0.05, base_vol * (1.0 + 1.5 * moneyness * moneyness) - 0.10 * moneyness)


def contract_quote(
    underlying: str,
    expiration: date,
    strike: Decimal,
    right: str,
    spot: float,
    now: datetime,
    *,
    seed: int = 0,
    spec: SimChainSpec = SimChainSpec(),
) -> OptionQuote:
    """One contract's quote at `now`: the same price, spread and activity the chain gives it.

    A held contract is re-marked with this alone, whether or not it is still inside the window
    of expiries a chain lists (a daily expiry, a contract bought further out).
    """
    today = et_date(now)
    years = (option_expiry_instant(expiration) - now).total_seconds() / _SECONDS_PER_YEAR
    k = float(strike)
    moneyness = math.log(k / spot)
    vol = smile_vol(spec.base_vol, moneyness)
    return _quote(underlying, expiration, strike, right, spot, now.astimezone(timezone.utc), today,
                  (expiration - today).days, moneyness, vol, _bs_core(spot, k, years, spec.rate, vol), seed, spec)


def _quote(underlying: str, expiration: date, strike: Decimal, right: str, spot: float, quote_time: datetime,
           today: date, days_out: int, moneyness: float, vol: float, core: _BSCore, seed: int,
           spec: SimChainSpec) -> OptionQuote:
    symbol = occ_symbol(underlying, expiration, right, strike)
    bs = _bs_right(right, core, spot, float(strike), spec.rate, vol)
    u_illiquid, u_activity, u_size = _draws(seed, symbol, today)
    illiquid = u_illiquid < spec.illiquid_share
    # Spread as a share of the price: tight at the money, wider away from it and
    # further out in time.
    rel = 0.02 + 0.6 * abs(moneyness) + 0.0015 * days_out
    if illiquid:
        rel = max(rel, 0.15 + 0.25 * u_activity)
    half = max(0.005, bs.price * rel / 2)
    bid = Decimal(repr(max(bs.price - half, 0.0))).quantize(_CENT, rounding=ROUND_FLOOR)
    ask = Decimal(repr(bs.price + half)).quantize(_CENT, rounding=ROUND_CEILING)
    ask = max(ask, bid + _CENT, _CENT)
    activity = math.exp(-25.0 * moneyness * moneyness) * (0.5 + u_activity)
    if illiquid:
        volume = int(u_activity * 99)
        open_interest = int(u_size * 99)
    else:
        volume = int(spec.base_volume * activity / (1 + days_out / 14))
        open_interest = int(spec.base_open_interest * activity)
    size = 1 + int(u_size * 50)
    # Positional: the dataclass's field order (symbol, underlying, expiration, strike, right, bid,
    # ask, bid_size, ask_size, quote_time, volume, open_interest, iv, delta, gamma, theta, vega).
    return OptionQuote(symbol, underlying, expiration, strike, right, bid, ask, size, size + 3, quote_time,
                       volume, open_interest, round(vol, 6), round(bs.delta, 6), round(bs.gamma, 6),
                       round(bs.theta, 6), round(bs.vega, 6))


def simulate_chain(
    underlying: str,
    spot: float | Decimal,
    now: datetime,
    *,
    seed: int = 0,
    calendar: SessionCalendar | None = None,
    spec: SimChainSpec = SimChainSpec(),
    window: tuple[date, date] | None = None,
) -> list[OptionQuote]:
    """The chain of `underlying` at `now` for a simulated spot price, as OptionQuotes.

    With `window` (first, last), only the expiries inside it are priced.
    """
    if now.tzinfo is None:
        raise ValueError("naive datetime: pass an aware `now`")
    spot_f = float(spot)
    if not spot_f > 0:
        raise ValueError(f"spot={spot!r} must be positive")
    cal = calendar or nyse_calendar()
    step = strike_step(spot_f)
    atm = (Decimal(str(spot_f)) / step).to_integral_value() * step
    strikes = [atm + step * i for i in range(-spec.strikes_each_side, spec.strikes_each_side + 1)]
    strikes = [k for k in strikes if k > 0]
    expirations = weekly_expirations(now, cal, spec.max_days)
    if window is not None:
        expirations = [e for e in expirations if window[0] <= e <= window[1]]
    # What a contract's quote shares with the rest of its expiry, and with the other right of
    # its strike, is computed once: the same arithmetic as contract_quote, in the same order.
    today = et_date(now)
    quote_time = now.astimezone(timezone.utc)
    per_strike = []
    for strike in strikes:
        k = float(strike)
        moneyness = math.log(k / spot_f)
        per_strike.append((strike, k, moneyness, smile_vol(spec.base_vol, moneyness)))
    out = []
    for expiration in expirations:
        years = (option_expiry_instant(expiration) - now).total_seconds() / _SECONDS_PER_YEAR
        days_out = (expiration - today).days
        for strike, k, moneyness, vol in per_strike:
            core = _bs_core(spot_f, k, years, spec.rate, vol)
            for right in ("call", "put"):
                out.append(_quote(underlying, expiration, strike, right, spot_f, quote_time, today, days_out,
                                  moneyness, vol, core, seed, spec))
    return out

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


def _bs_pair(c: _BSCore, spot: float, strike: float, rate: float, vol: float):
    """The call's and the put's (price, delta, theta) on one strike, and their shared gamma and vega."""
    gamma = c.pdf / (spot * vol * c.sqrt_t)
    vega = spot * c.pdf * c.sqrt_t / 100.0
    n_d1 = _norm_cdf(c.d1)
    decay = -spot * c.pdf * vol / (2 * c.sqrt_t)
    n_d2 = _norm_cdf(c.d2)
    call = (max(spot * n_d1 - strike * c.disc * n_d2, 0.0), n_d1, (decay - rate * strike * c.disc * n_d2) / 365.0)
    n_minus_d2 = _norm_cdf(-c.d2)
    put = (max(strike * c.disc * n_minus_d2 - spot * _norm_cdf(-c.d1), 0.0), n_d1 - 1.0,
           (decay + rate * strike * c.disc * n_minus_d2) / 365.0)
    return call, put, gamma, vega


def black_scholes(right: str, spot: float, strike: float, years: float, rate: float, vol: float) -> BSResult:
    """European Black-Scholes price and greeks, no dividends."""
    call, put, gamma, vega = _bs_pair(_bs_core(spot, strike, years, rate, vol), spot, strike, rate, vol)
    price, delta, theta = call if right == "call" else put
    return BSResult(price, delta, gamma, theta, vega)


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
    terms = _strike_terms(strike, spot, spec)
    call, put = _pair(underlying, expiration, *terms, spot, now.astimezone(timezone.utc), today,
                      (expiration - today).days, _bs_core(spot, terms[1], years, spec.rate, terms[3]), seed, spec)
    return call if right == "call" else put


def _strike_terms(strike: Decimal, spot: float, spec: SimChainSpec) -> tuple[Decimal, float, float, float, float, float]:
    """What a strike's quotes share across expiries: (strike, as float, log moneyness, volatility,
    volatility as quoted, the activity's smile)."""
    k = float(strike)
    moneyness = math.log(k / spot)
    vol = smile_vol(spec.base_vol, moneyness)
    return strike, k, moneyness, vol, round(vol, 6), math.exp(-25.0 * moneyness * moneyness)


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
    # What a contract's quote shares with the other expiries of its strike, and with the other
    # right, is computed once; contract_quote prices one contract with the same _pair.
    today = et_date(now)
    quote_time = now.astimezone(timezone.utc)
    per_strike = [_strike_terms(strike, spot_f, spec) for strike in strikes]
    out: list[OptionQuote] = []
    for expiration in expirations:
        years = (option_expiry_instant(expiration) - now).total_seconds() / _SECONDS_PER_YEAR
        days_out = (expiration - today).days
        for terms in per_strike:
            out.extend(_pair(underlying, expiration, *terms, spot_f, quote_time, today, days_out,
                             _bs_core(spot_f, terms[1], years, spec.rate, terms[3]), seed, spec))
    return out


def _pair(underlying: str, expiration: date, strike: Decimal, k: float, moneyness: float, vol: float, vol_6: float,
          smile_activity: float, spot: float, quote_time: datetime, today: date, days_out: int, c: _BSCore, seed: int,
          spec: SimChainSpec) -> tuple[OptionQuote, OptionQuote]:
    """The call's and the put's quotes of one strike, with what the two share (the pricing terms,
    gamma, vega, the spread's share, the activity's smile) computed once."""
    call, put, gamma, vega = _bs_pair(c, spot, k, spec.rate, vol)
    gamma_6, vega_6 = round(gamma, 6), round(vega, 6)
    base_rel = 0.02 + 0.6 * abs(moneyness) + 0.0015 * days_out
    quotes = []
    for right, (price, delta, theta) in (("call", call), ("put", put)):
        symbol = occ_symbol(underlying, expiration, right, strike)
        u_illiquid, u_activity, u_size = _draws(seed, symbol, today)
        illiquid = u_illiquid < spec.illiquid_share
        rel = max(base_rel, 0.15 + 0.25 * u_activity) if illiquid else base_rel
        half = max(0.005, price * rel / 2)
        bid = Decimal(repr(max(price - half, 0.0))).quantize(_CENT, rounding=ROUND_FLOOR)
        ask = max(Decimal(repr(price + half)).quantize(_CENT, rounding=ROUND_CEILING), bid + _CENT, _CENT)
        if illiquid:
            volume = int(u_activity * 99)
            open_interest = int(u_size * 99)
        else:
            activity = smile_activity * (0.5 + u_activity)
            volume = int(spec.base_volume * activity / (1 + days_out / 14))
            open_interest = int(spec.base_open_interest * activity)
        size = 1 + int(u_size * 50)
        quotes.append(OptionQuote(symbol, underlying, expiration, strike, right, bid, ask, size, size + 3, quote_time,
                                  volume, open_interest, vol_6, round(delta, 6), gamma_6, round(theta, 6), vega_6))
    return quotes[0], quotes[1]

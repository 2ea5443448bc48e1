"""Market data shapes handed out by the adapter, free of SDK types.

The option-contract choice (`options.py`) and the gates consume these; they never see alpaca-py
models, so the pure decision logic stays importable without the SDK.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal


@dataclass(frozen=True, slots=True)
class OptionQuote:
    """One option contract with its latest quote, activity and greeks.

    Prices are Decimal; None means the broker had no value (no quote yet, no trade today, no
    open interest published), which the gates treat as a denial, never as zero.
    `quote_time` is the quote's own timestamp (aware), the base of any freshness check.
    """

    symbol: str  # OCC, e.g. SPY261204C00600000
    underlying: str
    expiration: date
    strike: Decimal
    right: str  # call / put
    bid: Decimal | None
    ask: Decimal | None
    bid_size: int | None
    ask_size: int | None
    quote_time: datetime | None
    volume: int | None
    open_interest: int | None
    implied_volatility: float | None
    delta: float | None
    gamma: float | None
    theta: float | None
    vega: float | None


@dataclass(frozen=True, slots=True)
class OccSymbol:
    """The parts of an OCC option symbol: root, expiration, right, strike."""

    underlying: str
    expiration: date
    right: str  # call / put
    strike: Decimal


def parse_occ_symbol(symbol: str) -> OccSymbol:
    """Parse an OCC symbol such as SPY261204C00600000 (root, YYMMDD, C/P, strike x 1000 in 8 digits).

    The strike is read from the symbol as an exact Decimal rather than from the broker's float.
    Raises ValueError on anything that is not an OCC symbol.
    """
    s = symbol.strip().replace(" ", "")
    if len(s) < 16:
        raise ValueError(f"not an OCC option symbol: {symbol!r}")
    root, yymmdd, cp, strike_digits = s[:-15], s[-15:-9], s[-9], s[-8:]
    if not root.isalnum() or not yymmdd.isdigit() or cp not in "CP" or not strike_digits.isdigit():
        raise ValueError(f"not an OCC option symbol: {symbol!r}")
    expiration = date(2000 + int(yymmdd[:2]), int(yymmdd[2:4]), int(yymmdd[4:6]))
    strike = (Decimal(strike_digits) / Decimal(1000)).normalize()
    if strike == strike.to_integral_value():
        strike = strike.quantize(Decimal(1))
    return OccSymbol(
        underlying=root,
        expiration=expiration,
        right="call" if cp == "C" else "put",
        strike=strike,
    )


@dataclass(frozen=True, slots=True)
class MarketClock:
    """The broker's market clock, all instants aware UTC."""

    timestamp: datetime
    is_open: bool
    next_open: datetime
    next_close: datetime

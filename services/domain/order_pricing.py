"""Limit prices from a quote, and when to re-price a resting order: pure.

An option goes out as a limit order priced from its quote: mid plus a fraction (the
aggressiveness) of the half-spread, 0 at the mid and 1 at the far touch (the ask for a buy, the
bid for a sell), never past it. Prices sit on Alpaca's option ticks: 0.01 below $3.00, 0.05 at
or above (penny-pilot contracts trade in pennies up to $3 and nickels above; the simple rule
is the conservative one). A price between ticks rounds toward the marketable side, which
crosses no touch since the touch itself is on a tick.

An order left unfilled for `reprice_after_seconds` is canceled and sent again, each attempt
`reprice_step` more aggressive up to the far touch, at most `max_reprices` times; then it is
given up and recorded. The caller asks `next_attempt` with `now` and a fresh quote; nothing
here reads a clock or the broker.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal

from services.common.params import ExecutionParams

PENNY = Decimal("0.01")
NICKEL = Decimal("0.05")
OPTION_NICKEL_FROM = Decimal("3.00")
SUB_PENNY = Decimal("0.0001")

TickRule = Callable[[Decimal], Decimal]


def option_tick(price: Decimal) -> Decimal:
    """Alpaca's option tick: 0.01 below $3.00, 0.05 at or above."""
    return PENNY if price < OPTION_NICKEL_FROM else NICKEL


def stock_tick(price: Decimal) -> Decimal:
    """Reg NMS: whole cents at or above $1.00, 0.0001 below."""
    return PENNY if price >= 1 else SUB_PENNY


def round_to_tick(price: Decimal, side: str, tick: TickRule | Decimal = option_tick) -> Decimal:
    """Onto the tick grid toward the marketable side: up for a buy, down for a sell."""
    step = tick(price) if callable(tick) else tick
    mode = ROUND_CEILING if side == "buy" else ROUND_FLOOR
    return ((price / step).to_integral_value(rounding=mode) * step).quantize(step)


@dataclass(frozen=True)
class Quote:
    bid: Decimal | None
    ask: Decimal | None


@dataclass(frozen=True)
class LimitPrice:
    """A limit price, or why none can be set (`price` None, `code` NO_QUOTE / ZERO_QUOTE / CROSSED_QUOTE)."""

    price: Decimal | None
    code: str
    reason: str

    @property
    def ok(self) -> bool:
        return self.price is not None


def limit_price(
    side: str,
    bid: Decimal | None,
    ask: Decimal | None,
    aggressiveness: float | Decimal,
    tick: TickRule | Decimal = option_tick,
) -> LimitPrice:
    """mid +/- aggressiveness x half-spread on the tick grid, never past the ask (buy) or bid (sell)."""
    if side not in ("buy", "sell"):
        raise ValueError(f"side must be buy or sell, got {side!r}")
    a = Decimal(str(aggressiveness))
    if not 0 <= a <= 1:
        raise ValueError(f"aggressiveness must be within 0..1, got {aggressiveness}")
    if bid is None or ask is None:
        return LimitPrice(None, "NO_QUOTE", f"NO_QUOTE: bid={bid} ask={ask}")
    if bid <= 0 or ask <= 0:
        # An option without a bid is not "worth zero": nothing sensible can be priced against it.
        return LimitPrice(None, "ZERO_QUOTE", f"ZERO_QUOTE: bid={bid} ask={ask}")
    if bid > ask:
        return LimitPrice(None, "CROSSED_QUOTE", f"CROSSED_QUOTE: bid={bid} ask={ask}")
    mid = (bid + ask) / 2
    half = (ask - bid) / 2
    if side == "buy":
        price = round_to_tick(mid + a * half, "buy", tick)
        if price > ask:
            price = round_to_tick(ask, "sell", tick)  # an off-grid ask: the tick below it
    else:
        price = round_to_tick(mid - a * half, "sell", tick)
        if price < bid:
            price = round_to_tick(bid, "buy", tick)
    if price <= 0:
        return LimitPrice(None, "ZERO_QUOTE", f"ZERO_QUOTE: bid={bid} ask={ask} rounds to {price}")
    return LimitPrice(price, "LIMIT_PRICED", f"LIMIT_PRICED: {side} limit={price} bid={bid} ask={ask} aggressiveness={a}")


def offset_limit_price(side: str, reference: Decimal | None, offset_bps: float, tick: TickRule | Decimal = stock_tick) -> LimitPrice:
    """A stock limit `offset_bps` through a reference price (above for a buy, below for a sell)."""
    if reference is None or reference <= 0:
        return LimitPrice(None, "NO_QUOTE", f"NO_QUOTE: reference={reference}")
    offset = Decimal(str(offset_bps)) / Decimal(10_000)
    raw = reference * (1 + offset) if side == "buy" else reference * (1 - offset)
    price = round_to_tick(raw, side, tick)
    if price <= 0:
        return LimitPrice(None, "ZERO_QUOTE", f"ZERO_QUOTE: reference={reference} rounds to {price}")
    return LimitPrice(price, "LIMIT_PRICED", f"LIMIT_PRICED: {side} limit={price} reference={reference} offset_bps={offset_bps}")


def attempt_aggressiveness(attempt: int, execution: ExecutionParams) -> Decimal:
    """Attempt 0 at the configured aggressiveness, each later one `reprice_step` further, capped at 1."""
    base = Decimal(str(execution.option_limit_aggressiveness))
    step = Decimal(str(execution.reprice_step))
    return min(Decimal(1), base + step * attempt)


# --- re-pricing -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Wait:
    """Leave the order resting until `until`."""

    until: datetime


@dataclass(frozen=True)
class Replace:
    """Cancel the resting order and send attempt `attempt` at `price`."""

    attempt: int
    price: Decimal
    aggressiveness: Decimal


@dataclass(frozen=True)
class GiveUp:
    """Cancel and record; `code` is REPRICE_EXHAUSTED or the pricing refusal (NO_QUOTE, ...)."""

    code: str
    reason: str


RepriceDecision = Wait | Replace | GiveUp


def next_attempt(
    attempt: int,
    submitted_at: datetime,
    now: datetime,
    quote: Quote | None,
    params: ExecutionParams,
    *,
    side: str,
    tick: TickRule | Decimal = option_tick,
) -> RepriceDecision:
    """What to do with attempt `attempt`, sent at `submitted_at` and still unfilled at `now`.

    Exactly `reprice_after_seconds` after the submit the order is due. The last allowed attempt
    is `max_reprices`; once it is due the order is given up. A quote that cannot be priced
    gives up too: re-pricing blind could cross a market that moved away.
    """
    due = submitted_at + timedelta(seconds=params.reprice_after_seconds)
    if now < due:
        return Wait(due)
    if attempt >= params.max_reprices:
        return GiveUp("REPRICE_EXHAUSTED",
                      f"REPRICE_EXHAUSTED: attempt={attempt} max_reprices={params.max_reprices}")
    aggressiveness = attempt_aggressiveness(attempt + 1, params)
    priced = limit_price(side, quote.bid if quote else None, quote.ask if quote else None, aggressiveness, tick)
    if priced.price is None:
        return GiveUp(priced.code, priced.reason)
    return Replace(attempt + 1, priced.price, aggressiveness)

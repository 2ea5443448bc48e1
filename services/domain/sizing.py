"""Order sizing and notional: pure functions, money in Decimal.

The contract multiplier lives here and nowhere else: a stock share is 1, an equity option
contract is 100 shares, so an option position's notional is contracts x price x 100.
"""

from __future__ import annotations

from decimal import ROUND_FLOOR, Decimal
from typing import NamedTuple

from services.common.params import TradingParams

OPTION_MULTIPLIER = 100


def contract_multiplier(instrument: str) -> int:
    """Shares per unit of an instrument: 100 for an equity option, 1 for stock."""
    if instrument == "OPTION":
        return OPTION_MULTIPLIER
    if instrument == "STOCK":
        return 1
    raise ValueError(f"unknown instrument {instrument!r}")


def notional(qty: Decimal | int, price: Decimal, instrument: str) -> Decimal:
    """Exposure of a position or an order: qty x price x multiplier."""
    return Decimal(qty) * price * contract_multiplier(instrument)




class SizeResult(NamedTuple):
    """Whole units to order (shares or contracts); qty 0 means skip, with the reason."""

    qty: int
    notional: Decimal
    reason: str


def _budget(equity: Decimal, current_exposure: Decimal, params: TradingParams, cap: Decimal) -> tuple[Decimal, str]:
    risk = params.risk
    pct_budget = equity * Decimal(str(risk.max_equity_pct_per_trade))
    room = risk.max_notional_exposure - current_exposure
    budget = min(cap, pct_budget, room)
    detail = f"per_trade={cap:.2f} equity_pct={pct_budget:.2f} exposure_room={room:.2f}"
    return budget, detail


def size_order(
    instrument: str,
    price: Decimal,
    equity: Decimal,
    current_exposure: Decimal,
    params: TradingParams,
) -> SizeResult:
    """Whole shares or contracts from the per-trade budget, reduced so the exposure limit holds.

    budget = min(max notional per trade [options: also max premium], equity x pct, room under
    the exposure limit); qty = floor(budget / (price x multiplier)). A result below one unit is
    a skip (SIZE_ZERO), never rounded up.
    """
    if price is None or not price.is_finite() or price <= 0:
        return SizeResult(0, Decimal(0), f"SIZE_ZERO: price={price} is not a positive price")
    if equity is None or not equity.is_finite() or equity <= 0:
        return SizeResult(0, Decimal(0), f"SIZE_ZERO: equity={equity} is not positive")
    if current_exposure is None or not current_exposure.is_finite():
        return SizeResult(0, Decimal(0), f"SIZE_ZERO: current_exposure={current_exposure} is not a notional")
    cap = params.risk.max_notional_per_trade
    if instrument == "OPTION":
        cap = min(cap, params.options.max_premium_per_trade)
    budget, detail = _budget(equity, current_exposure, params, cap)
    unit = price * contract_multiplier(instrument)
    qty = int((budget / unit).to_integral_value(rounding=ROUND_FLOOR)) if budget > 0 else 0
    if instrument == "OPTION":
        qty = min(qty, params.options.max_contracts_per_trade)
    if qty < 1:
        return SizeResult(0, Decimal(0), f"SIZE_ZERO: budget={max(budget, Decimal(0)):.2f} unit_cost={unit:.2f} ({detail})")
    return SizeResult(qty, notional(qty, price, instrument), f"SIZED: qty={qty} unit_cost={unit:.2f} ({detail})")

"""An underlying's option liquidity, summarised from its near-expiry chain for the watchlist.

The watchlist's liquidity term (`services/watchlist_engine/scoring.py`) ranks tickers on two
option inputs besides their share volume:

- spread quality = 1 - the median relative spread, (ask - bid) / mid, of the quoted contracts
  whose strike lies within `moneyness` of the spot (all quoted contracts when the spot is not
  known). Near the money is where the pipeline trades; far strikes with wide spreads would
  punish a liquid underlying for the breadth of its listing. The median, so a few stale
  quotes do not decide it. In [0, 1], higher is better;
- open-interest proxy = the total open interest of the near-expiry contracts that publish it.

Either is None, with a reason code, when the chain cannot give it (no contracts, no two-sided
quote, no open interest published). None is "missing", which the scorer reports as such and
credits nothing: an option market we cannot see is not taken for a liquid one.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal
from statistics import median

from services.domain.market_data import OptionQuote

DEFAULT_MONEYNESS = Decimal("0.10")


@dataclass(frozen=True)
class OptionLiquidity:
    """The two option inputs of one underlying, with what they were computed from."""

    spread_quality: float | None
    oi_proxy: float | None
    contracts: int                 # contracts in the near expiries
    quoted: int                    # of which near the money with a two-sided quote
    expirations: tuple[str, ...]   # ISO dates seen
    missing: tuple[str, ...] = ()  # reason codes for each input that is None

    def as_components(self) -> dict[str, object]:
        return {"contracts": self.contracts, "quoted": self.quoted, "expirations": list(self.expirations),
                "missing": list(self.missing)}


def _relative_spread(q: OptionQuote) -> Decimal | None:
    if q.bid is None or q.ask is None or q.bid <= 0 or q.ask < q.bid:
        return None  # one-sided, crossed or no quote: says nothing about the spread we would pay
    mid = (q.bid + q.ask) / 2
    return (q.ask - q.bid) / mid


def summarize_chain(chain: Iterable[OptionQuote], spot: Decimal | None,
                    moneyness: Decimal = DEFAULT_MONEYNESS) -> OptionLiquidity:
    """Spread quality and open-interest proxy of a chain already limited to the near expiries."""
    quotes = list(chain)
    near = quotes
    if spot is not None and spot > 0:
        near = [q for q in quotes if abs(q.strike - spot) <= spot * moneyness]
    spreads = [s for s in (_relative_spread(q) for q in near) if s is not None]
    interest = [q.open_interest for q in quotes if q.open_interest is not None]
    missing = []
    if not quotes:
        missing += ["NO_CONTRACTS: no contract in the near expiries"]
    spread_quality = None
    if spreads:
        spread_quality = float(max(Decimal(0), 1 - median(spreads)))
    elif quotes:
        missing.append(f"NO_QUOTES: none of {len(near)} contracts near the money has a two-sided quote")
    oi_proxy = float(sum(interest)) if interest else None
    if quotes and not interest:
        missing.append(f"NO_OPEN_INTEREST: none of {len(quotes)} contracts publishes it")
    return OptionLiquidity(
        spread_quality=spread_quality,
        oi_proxy=oi_proxy,
        contracts=len(quotes),
        quoted=len(spreads),
        expirations=tuple(sorted({q.expiration.isoformat() for q in quotes})),
        missing=tuple(missing),
    )

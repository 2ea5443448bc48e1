"""The watchlist's option liquidity inputs: near-expiry chains, fetched within the rate budget.

The watchlist engine scores every candidate ticker each cycle, but an option market's depth
does not change in minutes, and each chain costs requests of the account's budget (contracts
on the trading API, snapshots on the data API). So a ticker's reading is kept for `ttl`, at
most `max_fetches_per_cycle` chains are fetched per cycle (the stalest first), and a failed
fetch is not retried before `failure_ttl`, so one broken underlying cannot spend the budget
every cycle.

Fail closed, per ticker: a fetch that fails (the broker is down, the chain is malformed), a
ticker never fetched yet, or a reading older than `max_age` gives that ticker no inputs, with
the reason in its detail; the other tickers are unaffected. The scorer then reports the inputs
as missing, never as zero.

The chain comes from `fetch_chain(ticker, spot, now, (first, last expiration))`: Alpaca's
(`AlpacaMarketData.option_chain`) in production, the simulated market's in the demo.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any

from services.common.market_calendar import et_date
from services.domain.broker import BrokerError
from services.domain.market_data import OptionQuote
from services.domain.option_liquidity import DEFAULT_MONEYNESS, summarize_chain

log = logging.getLogger(__name__)

ChainFetch = Callable[[str, Decimal | None, datetime, tuple[date, date]], list[OptionQuote]]


@dataclass(frozen=True)
class LiquidityReading:
    """One ticker's inputs as the watchlist takes them, and where they came from."""

    spread_quality: float | None
    oi_proxy: float | None
    detail: Mapping[str, Any] = field(default_factory=dict)

    def as_inputs(self) -> dict[str, Any]:
        return {"spread_quality": self.spread_quality, "oi_proxy": self.oi_proxy, "detail": dict(self.detail)}


@dataclass(frozen=True)
class _Entry:
    fetched_at: datetime
    reading: LiquidityReading
    ok: bool


class OptionLiquiditySource:
    """Per-ticker option liquidity from near-expiry chains, cached; call it once per watchlist cycle."""

    def __init__(
        self,
        fetch_chain: ChainFetch,
        *,
        source: str,
        ttl: timedelta = timedelta(minutes=30),
        failure_ttl: timedelta = timedelta(minutes=5),
        max_age: timedelta | None = None,
        near_expiry_days: int = 30,
        max_fetches_per_cycle: int = 25,
        moneyness: Decimal = DEFAULT_MONEYNESS,
    ):
        self.fetch_chain = fetch_chain
        self.source = source
        self.ttl = ttl
        self.failure_ttl = failure_ttl
        self.max_age = max_age if max_age is not None else 2 * ttl
        self.near_expiry_days = near_expiry_days
        self.max_fetches_per_cycle = max_fetches_per_cycle
        self.moneyness = moneyness
        self._cache: dict[str, _Entry] = {}
        self.fetches = 0  # chains requested since start: what the budget paid for

    def _fresh(self, entry: _Entry | None, now: datetime) -> bool:
        if entry is None:
            return False
        return now - entry.fetched_at < (self.ttl if entry.ok else self.failure_ttl)

    def __call__(self, spots: Mapping[str, Decimal | None], now: datetime) -> dict[str, dict[str, Any]]:
        """{ticker: {"spread_quality", "oi_proxy", "detail"}} for every ticker of `spots`.

        Network I/O: call it outside any transaction.
        """
        if now.tzinfo is None:
            raise ValueError("naive datetime: the liquidity source needs an aware `now`")
        stale = [t for t in spots if not self._fresh(self._cache.get(t), now)]
        # Never fetched first, then the oldest readings.
        stale.sort(key=lambda t: (t in self._cache, self._cache[t].fetched_at if t in self._cache else now, t))
        for ticker in stale[: self.max_fetches_per_cycle]:
            self._cache[ticker] = self.read(ticker, spots[ticker], now)
        return {t: self._reading(t, now).as_inputs() for t in spots}

    def _reading(self, ticker: str, now: datetime) -> LiquidityReading:
        entry = self._cache.get(ticker)
        if entry is None:
            return self._missing(f"NOT_FETCHED: over the per-cycle limit of {self.max_fetches_per_cycle} chains")
        age = now - entry.fetched_at
        if entry.ok and age > self.max_age:
            return self._missing(f"STALE: reading of {entry.fetched_at.isoformat()} is older than "
                                 f"{self.max_age.total_seconds():.0f}s")
        return entry.reading

    def _missing(self, reason: str) -> LiquidityReading:
        return LiquidityReading(None, None, {"status": "missing", "source": self.source, "reason": reason})

    def read(self, ticker: str, spot: Decimal | None, now: datetime) -> _Entry:
        """One ticker's reading from its chain fetched now (network I/O), or why there is none."""
        today = et_date(now)
        window = (today, today + timedelta(days=self.near_expiry_days))
        self.fetches += 1
        try:
            chain = self.fetch_chain(ticker, spot, now, window)
        except (BrokerError, ValueError) as e:
            log.warning("option liquidity not fetched", extra={"ticker": ticker, "error": str(e)})
            reason = f"FETCH_FAILED: {type(e).__name__}: {e}"
            return _Entry(now, self._missing(reason), ok=False)
        summary = summarize_chain([q for q in chain if window[0] <= q.expiration <= window[1]], spot, self.moneyness)
        status = "ok" if summary.spread_quality is not None and summary.oi_proxy is not None else (
            "missing" if summary.spread_quality is None and summary.oi_proxy is None else "partial")
        detail = {"status": status, "source": self.source, "as_of": now.isoformat(),
                  "spot": None if spot is None else float(spot), **summary.as_components()}
        if summary.missing:
            detail["reason"] = "; ".join(summary.missing)
        return _Entry(now, LiquidityReading(summary.spread_quality, summary.oi_proxy, detail), ok=True)

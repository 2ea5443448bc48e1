"""Gathering an option entry's inputs: the underlying's chain and its IV percentile.

I/O only; the choice and validation of a contract are pure (`services/dispatcher/alpaca/options.py`, `services/domain/decision.py`).

The chain comes over the network (retries, rate-limit waits), so it is never fetched inside the
claim transaction, where it would hold the recommendation's row lock and a pooled connection
for seconds: `gather` answers from the cache only, and returns None when the chain is not
there; the dispatcher then lets the claim go, calls `fetch` outside any transaction and claims
again. Only the expiries the strategy's DTE window can choose are fetched. A chain is cached per
(underlying, window) for a few seconds, so a burst of recommendations on one ticker costs one
market-data request.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any

from services.common.market_calendar import et_date
from services.common.params import TradingParams
from services.dispatcher.alpaca.options import expiration_window
from services.domain.decision import OptionInputs
from services.adapters.postgres.iv_history import current_iv_percentile

Window = tuple[date, date] | None
ChainSource = Callable[[str, Decimal, datetime, Window], list[Any]]


class OptionData:
    def __init__(self, chain_source: ChainSource, cache_seconds: float = 5.0, *, remote: bool = True):
        """`remote=False` for a chain computed in this process (the simulated market): it is
        fetched where it is needed, inside the claim, as it holds nothing but CPU."""
        self.chain_source = chain_source
        self.remote = remote
        self.cache = timedelta(seconds=cache_seconds)
        self._cached: dict[tuple[str, Window], tuple[datetime, list[Any]]] = {}

    @staticmethod
    def window(strategy: str | None, now: datetime, params: TradingParams) -> Window:
        return expiration_window(strategy, params, et_date(now))

    def cached(self, ticker: str, window: Window, now: datetime) -> list[Any] | None:
        hit = self._cached.get((ticker, window))
        if hit is not None and timedelta(0) <= now - hit[0] < self.cache:
            return hit[1]
        return None

    def fetch(self, ticker: str, strategy: str | None, spot: Any, now: datetime, params: TradingParams) -> None:
        """Fetch the chain into the cache. Network I/O: call it outside any transaction."""
        window = self.window(strategy, now, params)
        if spot is None or self.cached(ticker, window, now) is not None:
            return
        self._cached[(ticker, window)] = (now, self.chain_source(ticker, spot, now, window))

    def gather(self, conn, ticker: str, spot: Any, now: datetime, params: TradingParams,
               strategy: str | None = None) -> OptionInputs | None:
        """The inputs from the cached chain; None when the chain must be fetched first."""
        if spot is None:
            return OptionInputs(None, error="no underlying price to choose a strike against")
        window = self.window(strategy, now, params)
        chain = self.cached(ticker, window, now)
        if chain is None and not self.remote:
            self.fetch(ticker, strategy, spot, now, params)
            chain = self.cached(ticker, window, now)
        if chain is None:
            return None
        iv = current_iv_percentile(conn, ticker, chain, spot, now, params.options.iv_min_history_sessions)
        return OptionInputs(chain, iv)

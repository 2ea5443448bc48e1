"""Gathering an option entry's inputs: the underlying's chain and its IV percentile.

I/O only; the choice and validation of a contract are pure (alpaca/options.py, decision.py).
A chain is cached per underlying for a few seconds, so a burst of recommendations on one
ticker costs one market-data request.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from services.common.params import TradingParams
from services.dispatcher.decision import OptionInputs
from services.dispatcher.iv_history import current_iv_percentile

ChainSource = Callable[[str, Decimal, datetime], list[Any]]


class OptionData:
    def __init__(self, chain_source: ChainSource, cache_seconds: float = 5.0):
        self.chain_source = chain_source
        self.cache = timedelta(seconds=cache_seconds)
        self._cached: dict[str, tuple[datetime, list[Any]]] = {}

    def chain(self, ticker: str, spot: Decimal | None, now: datetime) -> list[Any]:
        hit = self._cached.get(ticker)
        if hit is not None and timedelta(0) <= now - hit[0] < self.cache:
            return hit[1]
        chain = self.chain_source(ticker, spot, now)
        self._cached[ticker] = (now, chain)
        return chain

    def gather(self, conn, ticker: str, spot: Any, now: datetime, params: TradingParams) -> OptionInputs:
        if spot is None:
            return OptionInputs(None, error="no underlying price to choose a strike against")
        chain = self.chain(ticker, spot, now)
        iv = current_iv_percentile(conn, ticker, chain, spot, now, params.options.iv_min_history_sessions)
        return OptionInputs(chain, iv)

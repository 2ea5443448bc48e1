"""The broker's asset records, asked once per symbol per session per process.

The asset gate needs the record of every recommendation's ticker; asking the broker each time
would spend the account's 200 requests a minute on the same few answers. A record (or the
broker's "no such asset") is kept until the ET date changes: a listing, delisting or halt
during the session is seen the next session, and until then the broker's own refusal of an
order stands behind the gate.

A lookup that fails is not kept: the gate denies that recommendation (NO_ASSET, with the
error) and the next one asks again. A malformed symbol is never sent to the broker.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import date, datetime
from typing import Any

from services.common.clock import Clock
from services.common.market_calendar import et_date
from services.domain.broker import AssetRecord, BrokerError
from services.dispatcher.risk.gates import AssetUnavailable, symbol_problem

log = logging.getLogger(__name__)

MISSING = object()  # not in the cache: ask the broker (outside any transaction) first


class AssetCache:
    """`lookup(symbol)` -> AssetRecord, None (no such asset) or AssetUnavailable (could not be had)."""

    def __init__(self, get_asset: Callable[[str], AssetRecord | None], clock: Clock, store: Any = None):
        """`store` (an AssetRecordStore) shares the answers with the other processes of the day."""
        self._get_asset = get_asset
        self._store = store
        self._clock = clock
        self._day: date | None = None
        self._records: dict[str, AssetRecord | None] = {}
        self.requests = 0  # broker lookups made, for the start-up and test view of its cost

    def cached(self, symbol: str, now: datetime | None = None) -> AssetRecord | None | AssetUnavailable | object:
        """The answer without asking the broker: a record, None, AssetUnavailable, or MISSING."""
        problem = symbol_problem(symbol)
        if problem:
            return AssetUnavailable(f"not looked up: {problem}")
        if et_date(now or self._clock.now()) != self._day:
            return MISSING
        return self._records.get(symbol, MISSING)

    def lookup(self, symbol: str, now: datetime | None = None) -> AssetRecord | None | AssetUnavailable:
        problem = symbol_problem(symbol)
        if problem:
            return AssetUnavailable(f"not looked up: {problem}")
        day = et_date(now or self._clock.now())
        if day != self._day:
            self._day, self._records = day, {}
        if symbol in self._records:
            return self._records[symbol]
        if self._store is not None:
            shared = self._store.get(symbol, day)
            if shared is not self._store.MISSING_ROW:
                self._records[symbol] = shared
                return shared
        self.requests += 1
        try:
            record = self._get_asset(symbol)
        except BrokerError as e:
            log.warning("asset lookup failed", extra={"symbol": symbol, "error": str(e)})
            return AssetUnavailable(f"asset lookup failed: {type(e).__name__}: {e}")
        self._records[symbol] = record
        if self._store is not None:
            self._store.put(symbol, day, record, now or self._clock.now())
        return record

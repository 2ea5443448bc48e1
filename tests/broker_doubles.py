"""Brokers that misbehave in one named way, wrapped around a real one (the simulated broker).

Each double changes one method and hands every other call to the broker it wraps, so the order
book, positions and account stay real and only the fault under test is staged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from decimal import Decimal
from typing import Any

from services.domain.broker import BrokerUnavailable, OrderResult


class Wrapping:
    """A paper broker that is `inner` in every method it does not override."""

    paper = True

    def __init__(self, inner: Any):
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class AcceptedFirst(Wrapping):
    """Answers a submit with "accepted" (as Alpaca does); what the order became is only seen by a
    later lookup, passed through `later` (a fill by default, or what a test makes of it)."""

    def __init__(self, inner: Any, later: Callable[[OrderResult], OrderResult] = lambda result: result):
        super().__init__(inner)
        self.later = later

    def submit_order(self, order):
        result = self.inner.submit_order(order)
        return replace(result, status="accepted", filled_qty=Decimal(0), filled_avg_price=None, filled_at=None)

    def get_order_by_client_id(self, cid):
        found = self.inner.get_order_by_client_id(cid)
        return self.later(found) if found else None


class TimesOutThenNotFound(Wrapping):
    """The submit times out before reaching the broker, and the lookup finds nothing (yet)."""

    def submit_order(self, order):
        raise BrokerUnavailable("read timed out")

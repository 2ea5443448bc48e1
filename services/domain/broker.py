"""The broker interface the dispatcher trades through, and the errors it may raise.

Two implementations: the simulated paper broker (`services.adapters.sim.broker.SimBroker`) and the alpaca-py
adapter (`alpaca.client.AlpacaBroker`). Both keep money in Decimal and times aware.

Errors are kept in three kinds, as the dispatcher records them differently:
- BrokerRejected: the broker said no (recorded with its message; the recommendation is REJECTED).
- DuplicateClientOrderId: the client_order_id was used before, i.e. the order was already
  submitted; look it up and record it.
- BrokerUnavailable: a timeout, a 5xx, a 429 after retries. The order MAY have been accepted:
  look it up by client_order_id before deciding anything.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Protocol


class BrokerError(Exception):
    """Base of the broker errors."""


class BrokerRejected(BrokerError):
    """The broker refused the order (buying power, asset not tradable, ...).

    Requires no retry: the same order would be refused again. Recorded as REJECTED.
    """


class DuplicateClientOrderId(BrokerError):
    """The client_order_id was already used: the order was submitted before (a retry, a crash).

    Resolves itself: look the order up by client_order_id and record what the broker has.
    """


class BrokerUnavailable(BrokerError):
    """Timeout, connection error, HTTP 5xx or 429 after retries. Usually resolves itself.

    An order may or may not have been accepted: look it up by client_order_id.
    """


class OrderStateUnknown(BrokerUnavailable):
    """The order may or may not have been placed, and the broker could not be asked.

    Resolves itself: the recommendation stays SUBMITTING and reconciliation asks the broker
    for the client_order_id again. Never resubmit under a new id.
    """


ORDER_TYPES = ("market", "limit")


@dataclass(frozen=True)
class OrderRequest:
    """A market or limit order, day only, never in extended hours (options cannot trade there).

    `symbol` is the ticker, or the OCC symbol for an option. A limit order carries its price,
    a market order none.
    """

    client_order_id: str
    symbol: str
    underlying: str
    instrument: str  # STOCK / OPTION
    side: str  # buy / sell
    qty: int
    position_intent: str | None = None  # buy_to_open, sell_to_close, ... (options)
    time_in_force: str = "day"
    order_type: str = "market"
    limit_price: Decimal | None = None

    def __post_init__(self) -> None:
        if self.order_type not in ORDER_TYPES:
            raise ValueError(f"order_type must be one of {ORDER_TYPES}, got {self.order_type!r}")
        if self.order_type == "limit" and (self.limit_price is None or self.limit_price <= 0):
            raise ValueError(f"a limit order needs a positive limit_price, got {self.limit_price}")
        if self.order_type == "market" and self.limit_price is not None:
            raise ValueError("a market order carries no limit_price")


@dataclass(frozen=True)
class OrderResult:
    """What the broker has for an order."""

    broker_order_id: str
    client_order_id: str
    symbol: str
    side: str
    qty: Decimal
    status: str  # broker's status: new, accepted, filled, partially_filled, rejected, canceled, ...
    filled_qty: Decimal
    filled_avg_price: Decimal | None
    submitted_at: datetime | None
    filled_at: datetime | None
    reject_reason: str | None = None

    @property
    def is_filled(self) -> bool:
        return self.status == "filled"

    @property
    def is_rejected(self) -> bool:
        return self.status in {"rejected", "canceled", "expired"}


# Alpaca's trade events (the `event` of a trade_updates message). A stream adapter drops any
# other event name with a warning: the order's later events, or the polling fallback, still
# bring its state. "accepted" and "restated" are in alpaca-py's TradeEvent as well.
TRADE_EVENTS = frozenset(
    {
        "new", "fill", "partial_fill", "canceled", "expired", "done_for_day", "replaced",
        "rejected", "pending_new", "stopped", "pending_cancel", "pending_replace", "calculated",
        "suspended", "order_replace_rejected", "order_cancel_rejected", "accepted", "restated",
    }
)
# Events that carry an execution: qty and price are that execution's, not the order's totals.
EXECUTION_EVENTS = frozenset({"fill", "partial_fill"})


@dataclass(frozen=True)
class TradeUpdate:
    """One change of an order at the broker, pushed as it happens.

    `order` is the order as the broker has it after the change (status, cumulative filled_qty
    and filled_avg_price). For fill and partial_fill, `qty` and `price` are this execution's
    and `position_qty` the position in the symbol after it; other events carry none of them.
    `at` is the broker's time of the event. Updates of one order arrive in order on one
    connection, but a reconnect can lose some: the lifecycle must accept any later state and
    polling fills the gaps.
    """

    event: str
    order: OrderResult
    at: datetime
    qty: Decimal | None = None
    price: Decimal | None = None
    position_qty: Decimal | None = None
    execution_id: str | None = None

    def __post_init__(self) -> None:
        if self.at.tzinfo is None:
            raise ValueError("TradeUpdate.at must be aware")

    @property
    def client_order_id(self) -> str:
        return self.order.client_order_id

    @property
    def is_execution(self) -> bool:
        return self.event in EXECUTION_EVENTS


@dataclass(frozen=True)
class AccountSnapshot:
    """equity - last_equity is the day's P&L (realized + unrealized), as Alpaca reports it."""

    equity: Decimal
    last_equity: Decimal
    cash: Decimal
    buying_power: Decimal
    as_of: datetime

    @property
    def daily_pnl(self) -> Decimal:
        return self.equity - self.last_equity


@dataclass(frozen=True)
class BrokerPosition:
    symbol: str
    qty: Decimal  # negative for short
    avg_entry_price: Decimal
    current_price: Decimal | None
    asset_class: str  # us_equity / us_option


@dataclass(frozen=True)
class AssetRecord:
    """The broker's record of a tradable symbol (Alpaca's GET /v2/assets/{symbol})."""

    symbol: str
    status: str  # active / inactive
    tradable: bool
    shortable: bool
    fractionable: bool
    asset_class: str  # us_equity / us_option / crypto
    easy_to_borrow: bool = False  # Alpaca opens short positions only in easy-to-borrow names


class Broker(Protocol):
    """What the dispatcher needs from a broker."""

    paper: bool
    # True when its calls leave the process (a network, retries, rate-limit waits): never made
    # while a transaction holds a recommendation's row lock. The simulated broker is local.
    remote: bool

    def submit_order(self, order: OrderRequest) -> OrderResult:
        """Place the order (an adapter may resend it, always under its client_order_id).

        Raises BrokerRejected, DuplicateClientOrderId or BrokerUnavailable.
        """
        ...

    def get_order_by_client_id(self, client_order_id: str) -> OrderResult | None:
        """The order with that client_order_id, or None when the broker has none."""
        ...

    def get_account(self) -> AccountSnapshot: ...

    def get_positions(self) -> Sequence[BrokerPosition]: ...

    def get_asset(self, symbol: str) -> AssetRecord | None:
        """The broker's record of a symbol, or None when it has no such asset. Raises BrokerUnavailable."""
        ...

    def list_orders_since(self, since: datetime) -> Sequence[OrderResult]:
        """Orders submitted since an instant, for reconciliation."""
        ...

    def cancel_order(self, client_order_id: str) -> OrderResult | None:
        """Cancel a resting order; the order as the broker then has it, None when it has none.

        An order already filled (or otherwise done) is not an error: its state is returned and
        the caller records it, e.g. a fill that raced the cancel.
        """
        ...


def client_order_id(account_id: str, recommendation_id: int, leg: int = 0, attempt: int = 0) -> str:
    """Deterministic id of an order: the same (account, recommendation, leg, attempt) always gives the same id.

    Each re-priced attempt is a new order with its own id, so a crash between the cancel and the
    replacement neither loses it (the id is known before it is sent) nor doubles it (the broker
    refuses the id twice). Attempt 0 keeps the id the pipeline has always used.
    Alpaca allows 128 characters; a digest keeps the account name out of the broker's records.
    """
    if attempt < 0:
        raise ValueError(f"attempt must be >= 0, got {attempt}")
    if attempt == 0:
        digest = hashlib.sha256(f"{account_id}|{recommendation_id}|{leg}".encode()).hexdigest()[:20]
        return f"ops-{recommendation_id}-{leg}-{digest}"
    digest = hashlib.sha256(f"{account_id}|{recommendation_id}|{leg}|{attempt}".encode()).hexdigest()[:20]
    return f"ops-{recommendation_id}-{leg}-r{attempt}-{digest}"


def submit_exactly_once(broker: Broker, order: OrderRequest) -> OrderResult:
    """Submit, and turn "maybe submitted" into what the broker really has.

    A duplicate client_order_id means an earlier attempt got through: return that order.
    An unavailable broker may have accepted the order: look it up; if the broker has no such
    order the error is re-raised (nothing was placed), and if the lookup fails too the order's
    fate is unknown and the caller leaves it for reconciliation.
    """
    try:
        return broker.submit_order(order)
    except DuplicateClientOrderId as e:
        existing = _lookup(broker, order.client_order_id, e)
        if existing is None:
            raise OrderStateUnknown(
                f"broker reports client_order_id {order.client_order_id} as used but cannot find it"
            ) from e
        return existing
    except BrokerUnavailable as e:
        existing = _lookup(broker, order.client_order_id, e)
        if existing is not None:
            return existing
        # Not found yet is not "not placed": a request that timed out may still be on its way.
        raise OrderStateUnknown(f"order {order.client_order_id} not found after: {e}") from e


def _lookup(broker: Broker, client_order_id: str, cause: Exception) -> OrderResult | None:
    try:
        return broker.get_order_by_client_id(client_order_id)
    except BrokerUnavailable as e:
        raise OrderStateUnknown(
            f"order {client_order_id} may have been placed ({cause}); lookup failed: {e}"
        ) from e

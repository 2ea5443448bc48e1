"""The alpaca-py adapter: orders, account, positions, clock and calendar, and market data.

This is the only module that talks to the SDK. Everything it hands out is the product's own
types (broker.OrderResult, AccountSnapshot, market_calendar.Session, models.OptionQuote) with
Decimal money and aware UTC times, and every SDK or HTTP error leaves it translated into
BrokerRejected / DuplicateClientOrderId / BrokerUnavailable.

Three things the SDK does by default that a trading system cannot live with, and what we do:

- No HTTP timeout: a hung server hangs the caller forever. Every client gets a session that
  passes `timeout=` on every request.
- It retries HTTP 429 and 504 three times, 3 s apart, for every method, POST /v2/orders
  included, with the 9 s of sleeping inside the dispatcher's claim. We turn the SDK's retry off
  and retry ourselves: reads with exponential backoff; an order submit resent with the same
  client_order_id for a few seconds (a 429, 5xx, timeout or reset before the order was taken
  would otherwise hold its position slot until recovery gives up on it). The fixed id makes
  the resend safe: an order that did get through answers 422 duplicate and is looked up.
  Both honour the server's Retry-After (capped).
- Nothing spaces requests: the trading API allows 200 requests/minute per account, however many
  processes share it. Every trading HTTP request (retries and pages included) spends a token of
  the account's request budget (`services/adapters/postgres/request_budget.py`), reads leaving a reserve to orders.

A deadline (`AlpacaBroker.set_deadline`) bounds all of it, so a dispatcher told to stop ends
the order in hand within the container's stop timeout.

Account and positions are refreshed on a schedule by the dispatcher, not once per
recommendation: with several dispatcher tasks per account, per-recommendation reads would spend
the rate budget that order submits need.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit

import requests
from alpaca.common.enums import Sort
from alpaca.common.exceptions import APIError
from alpaca.data.enums import DataFeed, OptionsFeed
from alpaca.data.historical.option import OptionHistoricalDataClient
from alpaca.data.historical.stock import StockHistoricalDataClient
from alpaca.data.models.snapshots import OptionsSnapshot
from alpaca.data.requests import OptionChainRequest, OptionSnapshotRequest, StockBarsRequest
from alpaca.data.timeframe import TimeFrame, TimeFrameUnit
from alpaca.trading.client import TradingClient
from alpaca.trading.enums import (
    AssetStatus,
    OrderSide,
    PositionIntent,
    QueryOrderStatus,
    TimeInForce,
)
from alpaca.trading.models import Asset, OptionContract, Order
from alpaca.trading.requests import (
    GetCalendarRequest,
    GetOptionContractsRequest,
    GetOrdersRequest,
    LimitOrderRequest,
    MarketOrderRequest,
)
from pydantic import ValidationError

from services.common import metrics
from services.common.clock import Clock, SystemClock
from services.common.logs import register_secret
from services.common.market_calendar import ET, Session
from services.domain.market_data import MarketClock, OptionQuote, parse_occ_symbol
from services.domain.news import NewsArticle
from services.adapters.alpaca.settings import AlpacaSettings
from services.domain.broker import (
    AccountSnapshot,
    AssetRecord,
    BrokerError,
    BrokerPosition,
    BrokerRejected,
    BrokerUnavailable,
    DuplicateClientOrderId,
    OrderRequest,
    OrderResult,
)
from services.adapters.postgres.request_budget import (
    LocalRequestBudget,
    PostgresRequestBudget,
    RequestBudget,
    RequestBudgetUnavailable,
    RequestKind,
)

log = logging.getLogger(__name__)

UTC = timezone.utc
T = TypeVar("T")

DUPLICATE_CLIENT_ORDER_ID_MESSAGE = "client_order_id must be unique"
ORDERS_PAGE_SIZE = 500  # Alpaca's maximum for GET /v2/orders
MAX_PAGES = 1000  # a broker that never stops paging is an outage, not an infinite loop


# --------------------------------------------------------------------------------------------
# The HTTP session: request budget, timeout, deadline


MIN_REQUEST_SECONDS = 0.5  # a request with less time than this before the deadline is not sent


class _NotSent(requests.RequestException):
    """Raised before a request leaves: the deadline is (nearly) past, or the budget is unreadable.

    A requests exception, so that it is translated like any other failure to reach the broker
    (BrokerUnavailable); unlike the others, the broker certainly did not see the request.
    """


def _no_deadline() -> float | None:
    return None


class _GuardedSession(requests.Session):
    """A requests session that spends the request budget and bounds the time of every request.

    alpaca-py calls `self._session.request(method, url, headers=..., params|json=...)` and never
    passes a timeout; this is the one place that sees every HTTP call of a client. A GET spends
    a read's token, anything else an order's. The timeout is the settings' or what is left
    before the deadline, whichever is shorter.
    """

    def __init__(
        self,
        timeout: float,
        budget: RequestBudget | None,
        *,
        deadline: Callable[[], float | None] = _no_deadline,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ):
        super().__init__()
        self._timeout = timeout
        self._budget = budget
        self._deadline = deadline
        self._monotonic = monotonic
        self._sleep = sleep

    def request(self, method, url, *args, **kwargs):  # type: ignore[override]
        kind = RequestKind.READ if str(method).upper() in ("GET", "HEAD") else RequestKind.ORDER
        self._time_left()  # out of time: not even a token is spent
        if self._budget is not None:
            self._take_token(kind)
        timeout = kwargs.get("timeout") or self._timeout
        left = self._time_left()
        kwargs["timeout"] = timeout if left is None else min(timeout, left)
        metrics.BROKER_REQUESTS.labels(broker="alpaca", endpoint=_endpoint(url)).inc()
        try:
            response = super().request(method, url, *args, **kwargs)
        except requests.Timeout:
            metrics.BROKER_ERRORS.labels(broker="alpaca", kind="timeout").inc()
            raise
        except requests.RequestException:
            metrics.BROKER_ERRORS.labels(broker="alpaca", kind="connection").inc()
            raise
        if response.status_code >= 400:
            metrics.BROKER_ERRORS.labels(broker="alpaca", kind=_error_kind(response.status_code)).inc()
        return response

    def _time_left(self) -> float | None:
        deadline = self._deadline()
        if deadline is None:
            return None
        remaining = deadline - self._monotonic()
        if remaining < MIN_REQUEST_SECONDS:
            raise _NotSent(f"deadline: {max(remaining, 0):.2f}s left, request not sent")
        return remaining

    def _take_token(self, kind: RequestKind) -> None:
        while True:
            try:
                wait = self._budget.acquire(kind)
            except RequestBudgetUnavailable as e:
                raise _NotSent(str(e)) from e
            if wait <= 0:
                return
            deadline = self._deadline()
            if deadline is not None and self._monotonic() + wait > deadline:
                raise _NotSent(f"deadline: the request budget frees a token in {wait:.2f}s, too late")
            metrics.RATE_LIMIT_WAITS.inc()
            metrics.RATE_LIMIT_WAIT_SECONDS.inc(wait)
            self._sleep(wait)


# The endpoint label of a request: the resource after the API version, from a fixed set (an
# order id or a symbol in the path must not become a label value).
_ENDPOINTS = {"orders", "account", "positions", "clock", "calendar", "assets", "options", "stocks", "news"}


def _endpoint(url: str) -> str:
    parts = [p for p in urlsplit(str(url)).path.split("/") if p]
    # /v2/orders:by_client_order_id is an orders request.
    resource = parts[1].split(":", 1)[0] if len(parts) > 1 and parts[0] in ("v1", "v2", "v1beta1", "v1beta3") else ""
    return resource if resource in _ENDPOINTS else "other"


def _error_kind(status: int) -> str:
    if status == 429:
        return "rate_limited"
    if status == 422:
        return "unprocessable"
    return "http_5xx" if status >= 500 else "http_4xx"


def _harden(
    client: Any,
    timeout: float,
    budget: RequestBudget | None,
    *,
    deadline: Callable[[], float | None] = _no_deadline,
    monotonic: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Give an SDK client our session and switch its own 429/504 retry off.

    RESTClient._request loops `while retry >= 0` and raises RetryException (then sleeps
    `_retry_wait`) only when `retry > 0` and the status is in `_retry_codes`; with `_retry = 0`
    and no retry codes each call is exactly one HTTP request. The constructor ignores 0 for
    retry_attempts, hence the attributes.
    """
    old = client._session
    client._session = _GuardedSession(timeout, budget, deadline=deadline, monotonic=monotonic, sleep=sleep)
    old.close()
    client._retry = 0
    client._retry_wait = 0
    client._retry_codes = []


def postgres_trading_budget(settings: AlpacaSettings, conninfo: str, account_id: str) -> PostgresRequestBudget:
    """The account's budget shared through Postgres by every process trading it (dispatchers)."""
    return PostgresRequestBudget(
        conninfo,
        account_id,
        requests_per_minute=settings.trading_requests_per_minute,
        capacity=settings.trading_burst,
        read_reserve=settings.read_reserve_tokens,
        application_name=f"ops-request-budget:{account_id}",
    )


def local_trading_budget(settings: AlpacaSettings, monotonic: Callable[[], float] = time.monotonic) -> LocalRequestBudget:
    """This process's own budget from the settings (one process per account: demo, tools)."""
    return LocalRequestBudget(
        settings.trading_requests_per_minute,
        settings.trading_burst,
        settings.read_reserve_tokens,
        monotonic=monotonic,
    )


# --------------------------------------------------------------------------------------------
# Error translation


def _api_error_message(error: APIError) -> str:
    """The broker's own message (Alpaca sends {"code": ..., "message": ...}), else the raw text."""
    try:
        body = json.loads(str(error))
    except (TypeError, ValueError):
        return str(error)[:500]
    if isinstance(body, dict) and body.get("message"):
        return str(body["message"])
    return str(error)[:500]


def _status_of(error: APIError) -> int | None:
    try:
        return error.status_code
    except AttributeError:
        return None


def translate_error(error: Exception, what: str) -> BrokerError:
    """Map an SDK/HTTP failure to the product's broker errors (the caller raises it `from` error).

    - 422 "client_order_id must be unique" -> DuplicateClientOrderId (already submitted)
    - 429, 5xx, timeouts, connection errors, unreadable responses -> BrokerUnavailable
    - any other 4xx (403 buying power, 422 invalid order, 401 bad keys) -> BrokerRejected with
      the broker's message in `broker_message` and the status in `status_code`; these need a
      person (or a different order), not a retry
    """
    if isinstance(error, BrokerError):
        return error
    if isinstance(error, APIError):
        status = _status_of(error)
        message = _api_error_message(error)
        if status == 422 and DUPLICATE_CLIENT_ORDER_ID_MESSAGE in message.lower():
            return DuplicateClientOrderId(f"{what}: {message}")
        if status is None or status == 429 or status >= 500:
            return BrokerUnavailable(f"{what}: HTTP {status}: {message}")
        rejected = BrokerRejected(f"{what}: HTTP {status}: {message}")
        rejected.status_code = status  # type: ignore[attr-defined]
        rejected.broker_message = message  # type: ignore[attr-defined]
        return rejected
    if isinstance(error, requests.Timeout):
        return BrokerUnavailable(f"{what}: timed out: {type(error).__name__}")
    if isinstance(error, requests.RequestException):
        return BrokerUnavailable(f"{what}: {type(error).__name__}: {error}")
    if isinstance(error, ValidationError):
        return BrokerUnavailable(f"{what}: unexpected response shape: {error.error_count()} errors")
    raise TypeError(f"not a broker failure: {error!r}")


_FAILURES = (APIError, requests.RequestException, ValidationError)


def _is_not_found(error: APIError) -> bool:
    return _status_of(error) == 404


def _retry_after(error: Exception, cap: float) -> float | None:
    """The server's Retry-After in seconds (capped), when it sent one we can read."""
    response = getattr(error, "response", None) if isinstance(error, APIError) else None
    value = response.headers.get("Retry-After") if response is not None else None
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = (parsedate_to_datetime(value) - datetime.now(UTC)).total_seconds()
        except (TypeError, ValueError):
            return None
    return min(cap, max(0.0, seconds))


def _refused_unseen(error: Exception) -> bool:
    """The broker certainly did not act on the request: a 429, a connect timeout, not sent at all.

    Anything else (5xx, a read timeout, a reset connection) may have come after the order was
    accepted.
    """
    if isinstance(error, APIError):
        return _status_of(error) == 429
    return isinstance(error, (_NotSent, requests.ConnectTimeout))


class _Retrying:
    """Retries with exponential backoff (or the server's Retry-After), within the deadline.

    Only BrokerUnavailable is retried, never a 4xx; a retry that would start after the deadline
    is not made.
    """

    def __init__(
        self,
        attempts: int,
        backoff: float,
        backoff_max: float,
        sleep: Callable[[float], None],
        *,
        retry_after_max: float = 5.0,
        deadline: Callable[[], float | None] = _no_deadline,
        monotonic: Callable[[], float] = time.monotonic,
    ):
        self.attempts = attempts
        self.backoff = backoff
        self.backoff_max = backoff_max
        self.retry_after_max = retry_after_max
        self.sleep = sleep
        self.deadline = deadline
        self.monotonic = monotonic

    def delay(self, error: Exception, attempt: int) -> float:
        after = _retry_after(error, self.retry_after_max)
        if after is not None:
            return after
        return min(self.backoff_max, self.backoff * (2 ** (attempt - 1)))

    def in_time(self, delay: float) -> bool:
        """Whether a retry after `delay` still starts before the deadline (always, without one)."""
        deadline = self.deadline()
        return deadline is None or self.monotonic() + delay + MIN_REQUEST_SECONDS <= deadline

    def read(self, what: str, call: Callable[[], T]) -> T:
        attempt = 1
        while True:
            try:
                return call()
            except _FAILURES as e:
                err = translate_error(e, what)
                if not isinstance(err, BrokerUnavailable) or attempt >= self.attempts:
                    raise err from e
                delay = self.delay(e, attempt)
                if not self.in_time(delay):
                    raise err from e
                log.warning(
                    "broker read failed, retrying",
                    extra={"call": what, "attempt": attempt, "delay_s": delay, "error": str(err)},
                )
                self.sleep(delay)
                attempt += 1


# --------------------------------------------------------------------------------------------
# Conversions


def _dec(value: Any) -> Decimal | None:
    """Decimal from the SDK's strings and floats (via str, so 0.1 stays 0.1)."""
    if value is None or value == "":
        return None
    return Decimal(str(value))


def _dec0(value: Any) -> Decimal:
    d = _dec(value)
    return Decimal(0) if d is None else d


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    if value.tzinfo is None:
        raise ValueError(f"naive datetime from the broker: {value!r}")
    return value.astimezone(UTC)


def _url(client: Any) -> str:
    return _enum_value(client._base_url)


def _enum_value(value: Any) -> str:
    return str(getattr(value, "value", value) or "")


def order_result(order: Order) -> OrderResult:
    """alpaca-py Order -> OrderResult (Decimal quantities and price, aware UTC times)."""
    return OrderResult(
        broker_order_id=str(order.id),
        client_order_id=order.client_order_id,
        symbol=order.symbol or "",
        side=_enum_value(order.side),
        qty=_dec0(order.qty),
        status=_enum_value(order.status),
        filled_qty=_dec0(order.filled_qty),
        filled_avg_price=_dec(order.filled_avg_price),
        submitted_at=_utc(order.submitted_at),
        filled_at=_utc(order.filled_at),
    )


def asset_record(asset: Asset) -> AssetRecord:
    """alpaca-py Asset -> AssetRecord (enum values as plain strings)."""
    return AssetRecord(
        symbol=asset.symbol,
        status=_enum_value(asset.status),
        tradable=bool(asset.tradable),
        shortable=bool(asset.shortable),
        fractionable=bool(asset.fractionable),
        asset_class=_enum_value(asset.asset_class),
        easy_to_borrow=bool(asset.easy_to_borrow),
    )


def calendar_session(day: date, open_naive: datetime, close_naive: datetime) -> Session:
    """alpaca-py's Calendar.open/close are naive ET wall times: attach ET, then convert to UTC."""

    def to_utc(value: datetime) -> datetime:
        aware = value if value.tzinfo is not None else value.replace(tzinfo=ET)
        return aware.astimezone(UTC)

    return Session(day=day, open=to_utc(open_naive), close=to_utc(close_naive))


def _wire_price(price: Decimal, instrument: str) -> float:
    """The limit as the SDK sends it (a JSON number): cents for options and for stocks from $1."""
    places = Decimal("0.01") if instrument == "OPTION" or price >= 1 else Decimal("0.0001")
    exact = price.quantize(places)
    if exact != price:
        # Rounding here would move the limit the decision chose; the pricing module puts it on a tick.
        raise BrokerRejected(f"limit_price {price} is not on a {places} tick")
    return float(exact)


def _position_intent(order: OrderRequest) -> PositionIntent | None:
    """The option order's intent; the pipeline opens long options and closes them by selling."""
    if order.position_intent:
        return PositionIntent(order.position_intent)
    if order.instrument == "OPTION":
        return PositionIntent.BUY_TO_OPEN if order.side == "buy" else PositionIntent.SELL_TO_CLOSE
    return None


# --------------------------------------------------------------------------------------------
# The broker


def _secrets(settings: AlpacaSettings) -> tuple[str, str]:
    """The API key and secret, registered so that no log line or alert ever carries them."""
    key = settings.api_key.get_secret_value()
    secret = settings.secret_key.get_secret_value()
    register_secret(key)
    register_secret(secret)
    return key, secret


def _read_retrying(settings: AlpacaSettings, sleep: Callable[[float], None]) -> _Retrying:
    """Reads retried with backoff as the settings say (never an order: see submit_exactly_once)."""
    return _Retrying(settings.read_attempts, settings.retry_backoff_seconds, settings.retry_backoff_max_seconds,
                     sleep, retry_after_max=settings.retry_after_max_seconds)


class AlpacaBroker:
    """The `Broker` of `services/domain/broker.py` on Alpaca's trading API (paper by default).

    `budget` is the account's request budget: a `request_budget.PostgresRequestBudget` when
    several processes trade the account, this process's own bucket otherwise.

    `set_deadline(at)` bounds everything the adapter does from then on (submits, their
    retries, lookups, reads) to a monotonic instant: a request is not started after it, a
    timeout never reaches past it (the one request already in flight keeps its own). On
    SIGTERM, the order in hand then ends within the stop timeout: placed, refused, or
    OrderStateUnknown for recovery to resolve.
    """

    remote = True

    def __init__(
        self,
        settings: AlpacaSettings,
        *,
        clock: Clock | None = None,
        budget: RequestBudget | None = None,
        sleep: Callable[[float], None] = time.sleep,
        monotonic: Callable[[], float] = time.monotonic,
    ):
        key, secret = _secrets(settings)
        self.paper = settings.paper
        self.settings = settings
        self.clock: Clock = clock or SystemClock()
        self.budget: RequestBudget = budget or local_trading_budget(settings, monotonic)
        self._sleep = sleep
        self._monotonic = monotonic
        self._deadline: float | None = None
        self._submit_window = threading.local()
        self._retrying = _Retrying(
            settings.read_attempts,
            settings.retry_backoff_seconds,
            settings.retry_backoff_max_seconds,
            sleep,
            retry_after_max=settings.retry_after_max_seconds,
            deadline=self._current_deadline,
            monotonic=monotonic,
        )
        self._client = TradingClient(
            key, secret, paper=settings.paper, url_override=settings.trading_url
        )
        _harden(
            self._client,
            settings.timeout_seconds,
            self.budget,
            deadline=self._current_deadline,
            monotonic=monotonic,
            sleep=sleep,
        )

    def __repr__(self) -> str:
        return (
            f"AlpacaBroker(paper={self.paper}, url={_url(self._client)}, "
            f"timeout={self.settings.timeout_seconds}s)"
        )

    __str__ = __repr__

    @property
    def trading_client(self) -> TradingClient:
        """The hardened SDK client (timeout, no SDK retry, budgeted, deadline), for other adapters."""
        return self._client

    def set_deadline(self, at: float | None) -> None:
        """Finish or give up by `at` (on `time.monotonic()`'s clock); None lifts the bound."""
        self._deadline = at

    def _current_deadline(self) -> float | None:
        bounds = [d for d in (self._deadline, getattr(self._submit_window, "until", None)) if d is not None]
        return min(bounds) if bounds else None

    # Orders ---------------------------------------------------------------------------------

    def submit_order(self, order: OrderRequest) -> OrderResult:
        """Submit one market or limit order, resending it with the same client_order_id for a short while.

        A 429, a 5xx, a timeout or a reset connection is retried (after the server's
        Retry-After, capped, or a backoff) until `settings.submit_retry_seconds` have passed:
        the deterministic client_order_id makes a resend safe, as an order that did get through
        answers 422 "client_order_id must be unique" (DuplicateClientOrderId, which the caller
        looks up). When the time is up, BrokerUnavailable: the order may have been accepted, so
        `submit_exactly_once` looks it up by client_order_id.

        A refusal (4xx) after an attempt that may have got through is not believed at once:
        the order that got through may be why (its buying power is spent), so the broker's
        book decides.
        """
        if order.qty <= 0:
            raise BrokerRejected(f"qty must be positive, got {order.qty}")
        fields = dict(
            symbol=order.symbol,
            qty=order.qty,
            side=OrderSide(order.side),
            time_in_force=TimeInForce(order.time_in_force),
            client_order_id=order.client_order_id,
            position_intent=_position_intent(order),
        )
        if order.order_type == "limit":
            assert order.limit_price is not None  # OrderRequest refuses a limit without a price
            request: MarketOrderRequest | LimitOrderRequest = LimitOrderRequest(
                **fields, limit_price=_wire_price(order.limit_price, order.instrument)
            )
        else:
            request = MarketOrderRequest(**fields)
        self._submit_window.until = self._monotonic() + self.settings.submit_retry_seconds
        try:
            return self._submit_until_answered(order.client_order_id, request)
        finally:
            self._submit_window.until = None

    def _submit_until_answered(self, client_order_id: str,
                               request: MarketOrderRequest | LimitOrderRequest) -> OrderResult:
        what = f"submit {client_order_id}"
        maybe_placed: BrokerError | None = None
        attempt = 1
        while True:
            try:
                return order_result(self._client.submit_order(request))
            except _FAILURES as e:
                err = translate_error(e, what)
                if isinstance(err, BrokerRejected):
                    if maybe_placed is not None:
                        found = self.get_order_by_client_id(client_order_id)
                        if found is not None:
                            return found
                    raise err from e
                if not isinstance(err, BrokerUnavailable):
                    raise err from e
                if not _refused_unseen(e):
                    maybe_placed = err
                delay = self._retrying.delay(e, attempt)
                if not self._retrying.in_time(delay):
                    raise err from e
                log.warning(
                    "order submit failed, resending with the same client_order_id",
                    extra={"client_order_id": client_order_id, "attempt": attempt, "delay_s": delay,
                           "error": str(err)},
                )
                self._sleep(delay)
                attempt += 1

    def cancel_order(self, client_order_id: str) -> OrderResult | None:
        """Cancel by client_order_id: look up the broker's id, DELETE /v2/orders/{id}, read it back.

        None when the broker has no such order. A 422 (already filled, already canceled: "not
        cancelable") is the order's state, not an error: what the broker has is returned, so a
        fill that raced the cancel is recorded as a fill. The DELETE is not retried here; a
        failed one raises BrokerUnavailable and the caller asks again.
        """
        found = self.get_order_by_client_id(client_order_id)
        if found is None:
            return None
        try:
            self._client.cancel_order_by_id(found.broker_order_id)
        except APIError as e:
            if _status_of(e) not in (404, 422):
                raise translate_error(e, f"cancel {client_order_id}") from e
            log.info("order not cancelable", extra={"client_order_id": client_order_id,
                                                    "error": _api_error_message(e)})
        except _FAILURES as e:
            raise translate_error(e, f"cancel {client_order_id}") from e
        return self.get_order_by_client_id(client_order_id)

    def get_order_by_client_id(self, client_order_id: str) -> OrderResult | None:
        """The broker's order for a client_order_id; None on 404 (nothing was placed)."""

        def call() -> OrderResult | None:
            try:
                return order_result(self._client.get_order_by_client_id(client_order_id))
            except APIError as e:
                if _is_not_found(e):
                    return None
                raise

        return self._retrying.read(f"get order {client_order_id}", call)

    def list_orders_since(self, since: datetime) -> list[OrderResult]:
        """Every order submitted after `since` (all statuses), oldest first, all pages."""
        if since.tzinfo is None:
            raise ValueError("since must be aware")
        seen: dict[str, OrderResult] = {}
        after = since.astimezone(UTC)
        for _ in range(MAX_PAGES):
            request = GetOrdersRequest(
                status=QueryOrderStatus.ALL, after=after, limit=ORDERS_PAGE_SIZE, direction=Sort.ASC
            )
            page = self._retrying.read("list orders", lambda: self._client.get_orders(request))
            new = [order_result(o) for o in page if str(o.id) not in seen]
            for r in new:
                seen[r.broker_order_id] = r
            if len(page) < ORDERS_PAGE_SIZE:
                return sorted(seen.values(), key=lambda r: (r.submitted_at or since, r.broker_order_id))
            if not new:
                # A full page of orders already seen: more than a page share one timestamp and
                # `after` cannot move past them. Say so rather than return a partial list.
                raise BrokerUnavailable(f"list orders: cannot page past {after.isoformat()}")
            # `after` is exclusive: step back a microsecond so orders sharing the last
            # timestamp are not skipped; the ids already seen are dropped above.
            last = max(r.submitted_at for r in new if r.submitted_at is not None)
            after = last - timedelta(microseconds=1)
        raise BrokerUnavailable(f"list orders: more than {MAX_PAGES} pages")

    # Account ----------------------------------------------------------------------------------

    def get_account(self) -> AccountSnapshot:
        account = self._retrying.read("get account", self._client.get_account)
        fields = {
            "equity": account.equity,
            "last_equity": account.last_equity,
            "cash": account.cash,
            "buying_power": account.buying_power,
        }
        missing = [name for name, value in fields.items() if value in (None, "")]
        if missing:
            # Missing account state blocks entries upstream (NO_ACCOUNT_STATE), never zero.
            raise BrokerUnavailable(f"get account: broker omitted {', '.join(missing)}")
        return AccountSnapshot(
            equity=Decimal(account.equity),
            last_equity=Decimal(account.last_equity),
            cash=Decimal(account.cash),
            buying_power=Decimal(account.buying_power),
            as_of=self.clock.now(),
        )

    def get_positions(self) -> list[BrokerPosition]:
        positions = self._retrying.read("get positions", self._client.get_all_positions)
        out = []
        for p in positions:
            qty = Decimal(p.qty)
            if _enum_value(p.side) == "short" and qty > 0:
                qty = -qty
            out.append(
                BrokerPosition(
                    symbol=p.symbol,
                    qty=qty,
                    avg_entry_price=Decimal(p.avg_entry_price),
                    current_price=_dec(p.current_price),
                    asset_class=_enum_value(p.asset_class),
                )
            )
        return out

    # Assets -----------------------------------------------------------------------------------

    def get_asset(self, symbol: str) -> AssetRecord | None:
        """GET /v2/assets/{symbol}: the asset's record; None on 404 (the broker has no such asset).

        The symbol is one URL path segment, quoted: whatever a recommendation carries cannot
        reach another path. The dispatcher caches the answer per session (assets.AssetCache).
        """

        def call() -> AssetRecord | None:
            try:
                return asset_record(self._client.get_asset(quote(symbol, safe=".")))
            except APIError as e:
                if _is_not_found(e):
                    return None
                raise

        return self._retrying.read(f"get asset {symbol}", call)

    # Clock and calendar -----------------------------------------------------------------------

    def get_clock(self) -> MarketClock:
        clock = self._retrying.read("get clock", self._client.get_clock)
        return MarketClock(
            timestamp=_utc(clock.timestamp),
            is_open=clock.is_open,
            next_open=_utc(clock.next_open),
            next_close=_utc(clock.next_close),
        )

    def get_calendar(self, start: date, end: date) -> list[Session]:
        """Sessions from start to end (ET dates, inclusive), open/close as aware UTC."""
        request = GetCalendarRequest(start=start, end=end)
        days = self._retrying.read("get calendar", lambda: self._client.get_calendar(request))
        return [calendar_session(d.date, d.open, d.close) for d in days]


# --------------------------------------------------------------------------------------------
# Market data


def _option_quote(
    symbol: str,
    snapshot: OptionsSnapshot | None,
    daily_volume: int | None,
    contract: OptionContract | None,
    underlying: str | None,
) -> OptionQuote:
    occ = parse_occ_symbol(symbol)
    quote = snapshot.latest_quote if snapshot is not None else None
    greeks = snapshot.greeks if snapshot is not None else None
    bid = ask = None
    bid_size = ask_size = None
    quote_time = None
    if quote is not None:
        bid = Decimal(str(quote.bid_price))
        # Alpaca reports "no offer" as an ask of 0: that is no quote, not a free option.
        ask = Decimal(str(quote.ask_price)) if quote.ask_price > 0 else None
        bid_size = int(quote.bid_size)
        ask_size = int(quote.ask_size)
        quote_time = _utc(quote.timestamp)
    open_interest = None
    if contract is not None and contract.open_interest not in (None, ""):
        open_interest = int(Decimal(contract.open_interest))
    return OptionQuote(
        symbol=symbol,
        underlying=(contract.underlying_symbol if contract is not None else underlying) or occ.underlying,
        expiration=contract.expiration_date if contract is not None else occ.expiration,
        strike=occ.strike,
        right=occ.right,
        bid=bid,
        ask=ask,
        bid_size=bid_size,
        ask_size=ask_size,
        quote_time=quote_time,
        volume=daily_volume,
        open_interest=open_interest,
        implied_volatility=snapshot.implied_volatility if snapshot is not None else None,
        delta=greeks.delta if greeks is not None else None,
        gamma=greeks.gamma if greeks is not None else None,
        theta=greeks.theta if greeks is not None else None,
        vega=greeks.vega if greeks is not None else None,
    )


def _daily_volume(raw: Mapping[str, Any]) -> int | None:
    """The day's volume from the snapshot's daily bar.

    OptionsSnapshot drops `dailyBar`, so the chain is fetched raw and parsed here. A latest
    trade's size is one print, not the day's volume, so it is not used as a stand-in.
    """
    bar = raw.get("dailyBar")
    if not isinstance(bar, Mapping) or bar.get("v") is None:
        return None
    return int(bar["v"])


class AlpacaMarketData:
    """Option chains (snapshots + contracts) and stock bars through the official data clients."""

    def __init__(
        self,
        settings: AlpacaSettings,
        *,
        trading_client: TradingClient | None = None,
        trading_budget: RequestBudget | None = None,
        data_budget: RequestBudget | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ):
        """Pass `AlpacaBroker.trading_client` so contract lookups share the account's rate budget."""
        key, secret = _secrets(settings)
        self.settings = settings
        self._retrying = _read_retrying(settings, sleep)
        if trading_client is None:
            trading_client = TradingClient(
                key, secret, paper=settings.paper, url_override=settings.trading_url
            )
            _harden(
                trading_client,
                settings.timeout_seconds,
                trading_budget or local_trading_budget(settings),
                sleep=sleep,
            )
        self._trading = trading_client
        # The data API's limit is its own; all its requests are reads, none needs a reserve.
        data_budget = data_budget or LocalRequestBudget(
            settings.trading_requests_per_minute, settings.trading_burst
        )
        # raw_data: the chain's daily bar (volume) is dropped by OptionsSnapshot; we parse
        # each snapshot with the SDK model ourselves and read the bar from the raw dict.
        self._options = OptionHistoricalDataClient(
            key, secret, raw_data=True, url_override=settings.data_url
        )
        self._stocks = StockHistoricalDataClient(key, secret, url_override=settings.data_url)
        for client in (self._options, self._stocks):
            _harden(client, settings.timeout_seconds, data_budget, sleep=sleep)

    def __repr__(self) -> str:
        return f"AlpacaMarketData(data_url={_url(self._options)}, paper={self.settings.paper})"

    __str__ = __repr__

    def option_contracts(
        self,
        underlying: str,
        *,
        expiration_gte: date | None = None,
        expiration_lte: date | None = None,
    ) -> list[OptionContract]:
        """Active contracts of an underlying, every page (the SDK does not follow page_token)."""
        contracts: list[OptionContract] = []
        token: str | None = None
        seen_tokens: set[str] = set()
        for _ in range(MAX_PAGES):
            request = GetOptionContractsRequest(
                underlying_symbols=[underlying],
                status=AssetStatus.ACTIVE,
                expiration_date_gte=expiration_gte,
                expiration_date_lte=expiration_lte,
                limit=self.settings.option_contracts_page_size,
                page_token=token,
            )
            page = self._retrying.read(
                f"option contracts {underlying}", lambda: self._trading.get_option_contracts(request)
            )
            contracts.extend(page.option_contracts or [])
            token = page.next_page_token
            if not token:
                return contracts
            if token in seen_tokens:
                raise BrokerUnavailable(f"option contracts {underlying}: page token repeats")
            seen_tokens.add(token)
        raise BrokerUnavailable(f"option contracts {underlying}: more than {MAX_PAGES} pages")

    def option_chain(
        self,
        underlying: str,
        *,
        expiration_gte: date | None = None,
        expiration_lte: date | None = None,
    ) -> list[OptionQuote]:
        """Every active contract of an underlying with its quote, volume, open interest and greeks.

        Snapshots (quote, IV, greeks, daily bar) and contracts (open interest) are merged by OCC
        symbol. A contract without a snapshot has no quote (bid/ask None); a snapshot without a
        contract has no open interest (None). Sorted by expiration, strike, right.
        """
        contracts = {
            c.symbol: c
            for c in self.option_contracts(
                underlying, expiration_gte=expiration_gte, expiration_lte=expiration_lte
            )
        }
        request = OptionChainRequest(
            underlying_symbol=underlying,
            feed=OptionsFeed(self.settings.options_feed) if self.settings.options_feed else None,
            expiration_date_gte=expiration_gte,
            expiration_date_lte=expiration_lte,
        )
        raw = self._retrying.read(
            f"option chain {underlying}", lambda: self._options.get_option_chain(request)
        ) or {}
        quotes = self._merge(raw, contracts, underlying)
        return sorted(quotes, key=lambda q: (q.expiration, q.strike, q.right, q.symbol))

    def option_quotes(
        self, symbols: Sequence[str], contracts: Mapping[str, OptionContract] | None = None
    ) -> dict[str, OptionQuote]:
        """Fresh snapshots of given contracts (GET /v1beta1/options/snapshots?symbols=), by symbol.

        Open interest is filled from `contracts` when given (it is not part of a snapshot).
        """
        if not symbols:
            return {}
        request = OptionSnapshotRequest(
            symbol_or_symbols=list(symbols),
            feed=OptionsFeed(self.settings.options_feed) if self.settings.options_feed else None,
        )
        raw = self._retrying.read(
            "option snapshots", lambda: self._options.get_option_snapshot(request)
        ) or {}
        wanted = {s: (contracts or {}).get(s) for s in symbols}
        merged = self._merge(raw, wanted, None, only=set(symbols))
        return {q.symbol: q for q in merged}

    @staticmethod
    def _merge(
        raw_snapshots: Mapping[str, Any],
        contracts: Mapping[str, OptionContract | None],
        underlying: str | None,
        only: set[str] | None = None,
    ) -> list[OptionQuote]:
        symbols = set(contracts) | {s for s, v in raw_snapshots.items() if v is not None}
        if only is not None:
            symbols &= only
        out = []
        for symbol in symbols:
            raw = raw_snapshots.get(symbol)
            try:
                snapshot = OptionsSnapshot(symbol, raw) if raw else None
            except ValidationError as e:
                raise BrokerUnavailable(f"option snapshot {symbol}: unexpected shape") from e
            out.append(
                _option_quote(
                    symbol,
                    snapshot,
                    _daily_volume(raw) if raw else None,
                    contracts.get(symbol),
                    underlying,
                )
            )
        return out

    def stock_bars(
        self,
        symbols: Iterable[str],
        start: datetime,
        end: datetime,
        *,
        timeframe: TimeFrame | None = None,
    ) -> list[dict[str, Any]]:
        """Bars (1-minute by default) as dicts: ticker, ts (bar start, aware UTC), OHLC Decimal, volume int."""
        if start.tzinfo is None or end.tzinfo is None:
            raise ValueError("start and end must be aware")
        symbols = list(symbols)
        if not symbols:
            return []
        request = StockBarsRequest(
            symbol_or_symbols=symbols,
            timeframe=timeframe or TimeFrame(1, TimeFrameUnit.Minute),
            start=start,
            end=end,
            feed=DataFeed(self.settings.stock_feed) if self.settings.stock_feed else None,
        )
        barset = self._retrying.read("stock bars", lambda: self._stocks.get_stock_bars(request))
        rows = []
        for ticker, bars in barset.data.items():
            for bar in bars:
                rows.append(
                    {
                        "ticker": ticker,
                        "ts": _utc(bar.timestamp),
                        "open": Decimal(str(bar.open)),
                        "high": Decimal(str(bar.high)),
                        "low": Decimal(str(bar.low)),
                        "close": Decimal(str(bar.close)),
                        "volume": int(bar.volume),
                    }
                )
        rows.sort(key=lambda r: (r["ticker"], r["ts"]))
        return rows


# --------------------------------------------------------------------------------------------
# News


class AlpacaNewsFeed:
    """Articles from Alpaca's news API (GET /v1beta1/news) through alpaca-py's NewsClient."""

    def __init__(
        self,
        settings: AlpacaSettings,
        *,
        data_budget: RequestBudget | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ):
        from alpaca.data.historical.news import NewsClient

        key, secret = _secrets(settings)
        self.settings = settings
        self._retrying = _read_retrying(settings, sleep)
        self._client = NewsClient(key, secret, url_override=settings.data_url)
        # The data API's limit, not the account's trading budget: news is never an order's rival.
        _harden(
            self._client,
            settings.timeout_seconds,
            data_budget or LocalRequestBudget(settings.trading_requests_per_minute, settings.trading_burst),
            sleep=sleep,
        )

    def __repr__(self) -> str:
        return f"AlpacaNewsFeed(data_url={_url(self._client)})"

    __str__ = __repr__

    def articles(self, symbols: Sequence[str], start: datetime, end: datetime, *, limit: int = 1000) -> list[NewsArticle]:
        """Articles naming any of `symbols` created in [start, end], oldest first, at most `limit`.

        The SDK follows next_page_token itself (50 a page) until `limit` articles are read.
        """
        if start.tzinfo is None or end.tzinfo is None:
            raise ValueError("start and end must be aware")
        symbols = sorted(set(symbols))
        if not symbols:
            return []
        from alpaca.data.requests import NewsRequest

        request = NewsRequest(start=start.astimezone(UTC), end=end.astimezone(UTC), symbols=",".join(symbols),
                              sort="asc", limit=limit)
        news = self._retrying.read("news", lambda: self._client.get_news(request))
        out = [
            NewsArticle(
                article_id=str(a.id),
                headline=a.headline or "",
                summary=a.summary or "",
                symbols=tuple(a.symbols or ()),
                created_at=_utc(a.created_at),
                updated_at=_utc(a.updated_at),
                source=a.source or "",
            )
            for a in news.data.get("news", [])
        ]
        return sorted(out, key=lambda a: (a.created_at, a.article_id))

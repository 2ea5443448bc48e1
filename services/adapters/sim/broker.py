"""The simulated paper broker: fills market orders at the quote plus slippage.

Its book lives in Postgres (sim_account, sim_orders), so several dispatcher processes share
one broker and a reused client_order_id is refused across processes, as Alpaca refuses it.

Quotes: a stock's quote is built around the close of its latest 1-minute bar (bid/ask at
`half_spread_bps` either side); an option's comes from `sim_option_marks`, written by the
simulated market. A market buy fills at the ask plus `slippage_bps`, a sell at the bid minus
it. A limit order fills at once only when marketable against the quote (a buy's limit at or
above the ask), at that price capped by its limit; otherwise it rests as `accepted` until
`match_resting` finds the quote has come to it, or it is canceled.
Positions are marked to mid. equity = cash + marked positions; last_equity is rolled to the
equity at the first look of each new ET session, so equity - last_equity is the day's P&L, as
Alpaca reports it.

Assets: the simulated universe is the `universe` given (the demo's tickers), else every ticker
the simulated market has bars for; each is an active, tradable, shortable us_equity, and any
other symbol has no asset record (None), as Alpaca answers 404.

Trade updates: like Alpaca's stream, every order it takes produces "new" then "fill" (or
"rejected") as broker.TradeUpdate, handed to the callbacks given to `subscribe` in this process
after the order's transaction commits; other processes hear `NOTIFY sim_trade_updates` with the
client_order_id as payload (sent by the same transaction, so only for committed orders) and
read the order with `get_order_by_client_id`.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable, Collection, Sequence
from dataclasses import replace
from datetime import datetime
from decimal import Decimal

from psycopg_pool import ConnectionPool

from services.common import metrics
from services.common.clock import Clock
from services.common.market_calendar import SessionCalendar, nyse_calendar
from services.domain.order_pricing import Quote
from services.domain.broker import (
    AccountSnapshot,
    AssetRecord,
    BrokerPosition,
    BrokerRejected,
    DuplicateClientOrderId,
    OrderRequest,
    OrderResult,
    TradeUpdate,
)
from services.domain.sizing import contract_multiplier

log = logging.getLogger(__name__)

_BPS = Decimal("0.0001")
TRADE_UPDATES_CHANNEL = "sim_trade_updates"

_STOCK_QUOTE = """
SELECT close FROM lane_telemetry WHERE ticker = %(symbol)s AND ts <= %(now)s ORDER BY ts DESC LIMIT 1
"""
_HAS_BARS = """
SELECT EXISTS (SELECT 1 FROM lane_telemetry WHERE ticker = %(symbol)s) AS listed
"""
_OPTION_QUOTE = """
SELECT bid, ask FROM sim_option_marks WHERE symbol = %(symbol)s AND ts <= %(now)s ORDER BY ts DESC LIMIT 1
"""
# The live positions, kept by sim_orders' trigger as orders fill (migration 021): the net filled
# quantity, the average price of the filled buys, and the mark (an option's latest mid, a stock's
# latest close).
_POSITIONS = """
SELECT p.symbol, p.asset_class, p.multiplier, p.qty, p.bought_cost / nullif(p.bought_qty, 0) AS avg_entry_price,
       CASE WHEN p.asset_class = 'us_option'
            THEN (SELECT (m.bid + m.ask) / 2 FROM sim_option_marks m
                  WHERE m.symbol = p.symbol AND m.ts <= %(now)s ORDER BY m.ts DESC LIMIT 1)
            ELSE (SELECT b.close FROM lane_telemetry b
                  WHERE b.ticker = p.symbol AND b.ts <= %(now)s ORDER BY b.ts DESC LIMIT 1)
       END AS mark
FROM sim_positions p
WHERE p.account_id = %(account_id)s AND p.qty <> 0
"""
_ORDER_COLUMNS = "id, client_order_id, symbol, side, qty, status, filled_qty, filled_avg_price, submitted_at, filled_at, reject_reason"


def _order_result(row: dict) -> OrderResult:
    return OrderResult(
        broker_order_id=str(row["id"]),
        client_order_id=row["client_order_id"],
        symbol=row["symbol"],
        side=row["side"],
        qty=Decimal(row["qty"]),
        status=row["status"],
        filled_qty=Decimal(row["filled_qty"]),
        filled_avg_price=row["filled_avg_price"],
        submitted_at=row["submitted_at"],
        filled_at=row["filled_at"],
        reject_reason=row["reject_reason"],
    )


class SimBroker:
    """A paper broker over Postgres. Every method is one short transaction."""

    paper = True
    remote = False  # its answers are queries of this database, not requests over a network

    def __init__(
        self,
        pool: ConnectionPool,
        account_id: str,
        clock: Clock,
        *,
        slippage_bps: float = 5,
        half_spread_bps: float = 2,
        starting_cash: Decimal = Decimal("100000"),
        calendar: SessionCalendar | None = None,
        universe: Collection[str] | None = None,
        fee_per_share: Decimal = Decimal(0),
        fee_per_contract: Decimal = Decimal(0),
    ):
        self.pool = pool
        self.account_id = account_id
        self.clock = clock
        self.slippage = Decimal(str(slippage_bps)) * _BPS
        self.half_spread = Decimal(str(half_spread_bps)) * _BPS
        self.starting_cash = starting_cash
        # Charged on every fill, as the params' fees say: the equity-based daily P&L then
        # matches the positions' realized P&L, which is net of the same fees.
        self.fee_per_share = Decimal(fee_per_share)
        self.fee_per_contract = Decimal(fee_per_contract)
        self.calendar = calendar or nyse_calendar()
        self._account_created = False
        self.universe = frozenset(universe) if universe is not None else None
        self._subscribers: list[Callable[[TradeUpdate], None]] = []
        self._subscribers_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"SimBroker(account_id={self.account_id!r})"

    # --- orders -------------------------------------------------------------------------

    def quote(self, symbol: str, instrument: str, now: datetime | None = None) -> Quote | None:
        """The simulated market's bid and ask for a symbol at `now`, as re-pricing needs them."""
        with self.pool.connection() as conn:
            touch = self._quote_of(conn, instrument, symbol, now or self.clock.now())
        return Quote(touch[0], touch[1]) if touch else None

    def _quote_of(self, conn, instrument: str, symbol: str, now: datetime) -> tuple[Decimal, Decimal] | None:
        if instrument == "OPTION":
            row = conn.execute(_OPTION_QUOTE, {"symbol": symbol, "now": now}).fetchone()
            return (row["bid"], row["ask"]) if row else None
        row = conn.execute(_STOCK_QUOTE, {"symbol": symbol, "now": now}).fetchone()
        if not row:
            return None
        close = row["close"]
        return close * (1 - self.half_spread), close * (1 + self.half_spread)

    def _fill_price(self, side: str, quote: tuple[Decimal, Decimal], limit: Decimal | None) -> Decimal | None:
        """The fill a quote gives: the touch plus slippage, and for a limit never worse than the limit.

        None for a limit the quote does not reach (a buy limit below the ask): it rests.
        """
        bid, ask = quote
        if limit is not None and (ask > limit if side == "buy" else bid < limit):
            return None
        price = (ask * (1 + self.slippage) if side == "buy" else bid * (1 - self.slippage)).quantize(Decimal("0.0001"))
        if limit is not None:
            price = min(price, limit) if side == "buy" else max(price, limit)
        return price

    def _book_fill(self, conn, side: str, qty: Decimal, price: Decimal, multiplier: int, now: datetime) -> None:
        cash_flow = Decimal(qty) * price * multiplier
        fee = Decimal(qty) * (self.fee_per_contract if multiplier > 1 else self.fee_per_share)
        conn.execute(
            "UPDATE sim_account SET cash = cash + %(flow)s, updated_at = %(now)s WHERE account_id = %(a)s",
            {"flow": (-cash_flow if side == "buy" else cash_flow) - fee, "now": now, "a": self.account_id},
        )

    def submit_order(self, order: OrderRequest) -> OrderResult:
        metrics.BROKER_REQUESTS.labels(broker="sim", endpoint="orders").inc()
        now = self.clock.now()
        if order.qty <= 0:
            raise BrokerRejected(f"qty must be positive, got {order.qty}")
        multiplier = contract_multiplier(order.instrument)
        with self.pool.connection() as conn, conn.transaction():
            self._ensure_account(conn, now)
            quote = self._quote_of(conn, order.instrument, order.symbol, now)
            status, price, reject = "filled", None, None
            if quote is None or quote[0] <= 0 or quote[1] <= 0:
                status, reject = "rejected", f"no market for {order.symbol}"
            else:
                price = self._fill_price(order.side, quote, order.limit_price)
                if price is None:
                    status = "accepted"
            row = conn.execute(
                f"""INSERT INTO sim_orders (id, account_id, client_order_id, symbol, underlying, asset_class, side,
                        position_intent, qty, multiplier, status, filled_qty, filled_avg_price, reject_reason,
                        submitted_at, filled_at, order_type, limit_price)
                    VALUES (%(id)s, %(account_id)s, %(cid)s, %(symbol)s, %(underlying)s, %(asset_class)s, %(side)s,
                        %(intent)s, %(qty)s, %(multiplier)s, %(status)s, %(filled_qty)s, %(price)s, %(reject)s,
                        %(now)s, %(filled_at)s, %(order_type)s, %(limit_price)s)
                    ON CONFLICT (account_id, client_order_id) DO NOTHING
                    RETURNING {_ORDER_COLUMNS}""",
                {
                    "id": uuid.uuid4(), "account_id": self.account_id, "cid": order.client_order_id,
                    "symbol": order.symbol, "underlying": order.underlying,
                    "asset_class": "us_option" if order.instrument == "OPTION" else "us_equity",
                    "side": order.side, "intent": order.position_intent, "qty": order.qty,
                    "multiplier": multiplier, "status": status,
                    "filled_qty": order.qty if status == "filled" else 0, "price": price,
                    "reject": reject, "now": now, "filled_at": now if status == "filled" else None,
                    "order_type": order.order_type, "limit_price": order.limit_price,
                },
            ).fetchone()
            if row is None:
                raise DuplicateClientOrderId(f"client_order_id must be unique: {order.client_order_id}")
            conn.execute("SELECT pg_notify(%s, %s)", (TRADE_UPDATES_CHANNEL, order.client_order_id))
            if status == "filled":
                self._book_fill(conn, order.side, Decimal(order.qty), price, multiplier, now)
        self._account_created = True  # committed: later calls may skip the insert
        result = _order_result(row)
        self._publish_submit(result, order, now)
        if result.is_rejected:
            raise BrokerRejected(result.reject_reason or "rejected")
        return result

    # --- trade updates ----------------------------------------------------------------------

    def subscribe(self, callback: Callable[[TradeUpdate], None]) -> Callable[[], None]:
        """Call `callback` with each trade update of this broker's orders; returns unsubscribe.

        Callbacks run on the submitting thread after the order is committed, in subscription
        order; one that raises is logged and the others still run.
        """
        with self._subscribers_lock:
            self._subscribers.append(callback)

        def unsubscribe() -> None:
            with self._subscribers_lock:
                if callback in self._subscribers:
                    self._subscribers.remove(callback)

        return unsubscribe

    def _publish_submit(self, result: OrderResult, order: OrderRequest, now: datetime) -> None:
        """The events Alpaca's stream sends for an order filled or rejected on arrival."""
        if result.status == "rejected":
            self._publish(TradeUpdate("rejected", result, now))
            return
        unfilled = replace(result, status="new", filled_qty=Decimal(0), filled_avg_price=None, filled_at=None)
        self._publish(TradeUpdate("new", unfilled, now))
        if result.status == "filled":
            self._publish(
                TradeUpdate(
                    "fill", result, now, qty=result.filled_qty, price=result.filled_avg_price,
                    execution_id=str(uuid.uuid4()),
                )
            )

    def _publish(self, update: TradeUpdate) -> None:
        with self._subscribers_lock:
            subscribers = list(self._subscribers)
        for callback in subscribers:
            try:
                callback(update)
            except Exception:  # noqa: BLE001 - one failing consumer must not stop the others
                log.exception(
                    "trade update callback failed",
                    extra={"event": update.event, "client_order_id": update.client_order_id},
                )

    def cancel_order(self, client_order_id: str) -> OrderResult | None:
        """Cancel a resting order; an order already done is returned as it is (a fill is not undone)."""
        metrics.BROKER_REQUESTS.labels(broker="sim", endpoint="orders").inc()
        now = self.clock.now()
        with self.pool.connection() as conn, conn.transaction():
            row = conn.execute(
                f"""UPDATE sim_orders SET status = 'canceled'
                    WHERE account_id = %s AND client_order_id = %s AND status IN ('new', 'accepted')
                    RETURNING {_ORDER_COLUMNS}""",
                (self.account_id, client_order_id),
            ).fetchone()
        if row is not None:
            log.info("sim order canceled", extra={"client_order_id": client_order_id, "at": now.isoformat()})
            result = _order_result(row)
            self._publish(TradeUpdate("canceled", result, now))
            return result
        return self.get_order_by_client_id(client_order_id)

    def match_resting(self, now: datetime | None = None) -> list[OrderResult]:
        """Fill the resting limit orders the quote at `now` has reached; the orders filled.

        The simulated market's stand-in for the exchange's matching: the demo calls it once a
        simulated minute, after the new bars and option marks are written.
        """
        now = now or self.clock.now()
        filled = []
        with self.pool.connection() as conn, conn.transaction():
            resting = conn.execute(
                """SELECT id, symbol, side, qty, multiplier, limit_price, asset_class FROM sim_orders
                   WHERE account_id = %s AND status IN ('new', 'accepted') AND submitted_at <= %s
                   ORDER BY submitted_at FOR UPDATE SKIP LOCKED""",
                (self.account_id, now),
            ).fetchall()
            for r in resting:
                instrument = "OPTION" if r["asset_class"] == "us_option" else "STOCK"
                quote = self._quote_of(conn, instrument, r["symbol"], now)
                if quote is None or quote[0] <= 0 or quote[1] <= 0:
                    continue
                price = self._fill_price(r["side"], quote, r["limit_price"])
                if price is None:
                    continue
                row = conn.execute(
                    f"""UPDATE sim_orders SET status = 'filled', filled_qty = qty, filled_avg_price = %s, filled_at = %s
                        WHERE id = %s AND status IN ('new', 'accepted') RETURNING {_ORDER_COLUMNS}""",
                    (price, now, r["id"]),
                ).fetchone()
                self._book_fill(conn, r["side"], r["qty"], price, r["multiplier"], now)
                filled.append(_order_result(row))
        for result in filled:  # committed: now the subscribers hear of it
            self._publish(TradeUpdate("fill", result, now, qty=result.filled_qty, price=result.filled_avg_price,
                                      execution_id=str(uuid.uuid4())))
        return filled

    def get_order_by_client_id(self, client_order_id: str) -> OrderResult | None:
        metrics.BROKER_REQUESTS.labels(broker="sim", endpoint="orders").inc()
        with self.pool.connection() as conn:
            row = conn.execute(
                f"SELECT {_ORDER_COLUMNS} FROM sim_orders WHERE account_id = %s AND client_order_id = %s",
                (self.account_id, client_order_id),
            ).fetchone()
        return _order_result(row) if row else None

    def list_orders_since(self, since: datetime) -> Sequence[OrderResult]:
        metrics.BROKER_REQUESTS.labels(broker="sim", endpoint="orders").inc()
        with self.pool.connection() as conn:
            rows = conn.execute(
                f"SELECT {_ORDER_COLUMNS} FROM sim_orders WHERE account_id = %s AND submitted_at >= %s ORDER BY submitted_at",
                (self.account_id, since),
            ).fetchall()
        return [_order_result(r) for r in rows]

    # --- assets ---------------------------------------------------------------------------

    def get_asset(self, symbol: str) -> AssetRecord | None:
        if self.universe is not None:
            listed = symbol in self.universe
        else:
            with self.pool.connection() as conn:
                listed = conn.execute(_HAS_BARS, {"symbol": symbol}).fetchone()["listed"]
        if not listed:
            return None
        return AssetRecord(symbol=symbol, status="active", tradable=True, shortable=True, fractionable=True,
                           asset_class="us_equity", easy_to_borrow=True)

    # --- account --------------------------------------------------------------------------

    def _ensure_account(self, conn, now: datetime) -> None:
        if self._account_created:
            return
        day = self.calendar.current_or_previous_session(now).day
        conn.execute(
            """INSERT INTO sim_account (account_id, cash, last_equity, session_day, updated_at)
               VALUES (%s, %s, %s, %s, %s) ON CONFLICT (account_id) DO NOTHING""",
            (self.account_id, self.starting_cash, self.starting_cash, day, now),
        )

    def get_positions(self) -> Sequence[BrokerPosition]:
        metrics.BROKER_REQUESTS.labels(broker="sim", endpoint="positions").inc()
        now = self.clock.now()
        with self.pool.connection() as conn:
            rows = conn.execute(_POSITIONS, {"account_id": self.account_id, "now": now}).fetchall()
        return [
            BrokerPosition(r["symbol"], r["qty"], r["avg_entry_price"] or Decimal(0), r["mark"], r["asset_class"])
            for r in rows
        ]

    def get_account(self) -> AccountSnapshot:
        metrics.BROKER_REQUESTS.labels(broker="sim", endpoint="account").inc()
        now = self.clock.now()
        day = self.calendar.current_or_previous_session(now).day
        with self.pool.connection() as conn, conn.transaction():
            self._ensure_account(conn, now)
            acct = conn.execute(
                "SELECT cash, last_equity, session_day FROM sim_account WHERE account_id = %s FOR UPDATE",
                (self.account_id,),
            ).fetchone()
            rows = conn.execute(_POSITIONS, {"account_id": self.account_id, "now": now}).fetchall()
            market_value = sum(
                (r["qty"] * (r["mark"] if r["mark"] is not None else r["avg_entry_price"] or 0) * r["multiplier"] for r in rows),
                Decimal(0),
            )
            equity = acct["cash"] + market_value
            last_equity = acct["last_equity"]
            if day > acct["session_day"]:
                # A new session: the equity carried over is the previous close's.
                last_equity = equity
                conn.execute(
                    "UPDATE sim_account SET last_equity = %s, session_day = %s, updated_at = %s WHERE account_id = %s",
                    (equity, day, now, self.account_id),
                )
        self._account_created = True
        return AccountSnapshot(
            equity=equity, last_equity=last_equity, cash=acct["cash"], buying_power=max(acct["cash"], Decimal(0)), as_of=now
        )

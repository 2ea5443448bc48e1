"""A local HTTP server that speaks the Alpaca REST paths alpaca-py calls, for driving the real SDK.

It keeps an order book in memory (optionally persisted to a JSON file, so a crash/restart test
can run it as a separate process), records every request it receives for assertions, and
injects faults into the next n requests of a path: an HTTP status before or AFTER the order was
accepted, a hang longer than the client's timeout, a 422 duplicate client_order_id, a 429 with
Retry-After, a connection reset. With `rate_limit_per_minute` set it answers 429 past that many
requests in any 60 s per API key, as Alpaca does per account (time from `now`, injectable).

In-process (pytest):

    from tests.fake_alpaca import fake_alpaca  # noqa: F401  (the fixture)

    def test_x(fake_alpaca):
        fake_alpaca.fail_next("/v2/orders", 504, after_accept=True)
        ... TradingClient(..., url_override=fake_alpaca.url) ...
        assert fake_alpaca.requests_to("/v2/orders")[0].json["qty"] == 1

As a process (the state file survives a restart; faults and requests via /_fake/ endpoints):

    python -m tests.fake_alpaca --port 0 --state /tmp/book.json
    (prints "listening on http://127.0.0.1:PORT" once it accepts connections)

The trading stream (alpaca-py's TradingStream, `trade_updates`) is served on the same port at
/stream, as Alpaca serves it beside its REST API (wss://paper-api.alpaca.markets/stream): the
authenticate and listen handshake, then a trade update whenever an order changes here (new on
submit, fill and partial_fill, canceled, rejected), sent as binary frames of JSON like Alpaca's.
`drop_streams()` cuts every connection as a network fault would; `refuse_streams()` answers the
next upgrades with HTTP 429, as Alpaca answers a connection over the account's limit.

Responses carry the field names alpaca-py parses (Order, TradeAccount, Clock, Calendar,
Position, Asset, OptionContractsResponse, OptionsSnapshot, BarSet, NewsSet). GET /v2/assets/{symbol} answers
for the assets a test registered with `add_asset` and 404s every other symbol, as Alpaca does. Market data responses carry exactly
one payload key plus "next_page_token": null, or the SDK keeps paging.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import sys
import threading
import uuid
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qs, unquote, urlsplit
from zoneinfo import ZoneInfo

import pytest
from websockets.exceptions import InvalidState
from websockets.frames import Opcode
from websockets.http11 import Request
from websockets.server import ServerProtocol

UTC = timezone.utc
ET = ZoneInfo("America/New_York")

FAKE_KEY = "PKFAKETESTKEY0000000"
FAKE_SECRET = "fake-secret-value-0123456789"

DUPLICATE_BODY = {"code": 40010001, "message": "client_order_id must be unique"}
OPEN_STATUSES = {
    "new", "accepted", "pending_new", "partially_filled", "accepted_for_bidding",
    "pending_cancel", "pending_replace", "held", "calculated", "done_for_day",
}


def _iso(ts: datetime) -> str:
    return ts.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _parse_ts(value: str) -> datetime:
    ts = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return ts if ts.tzinfo is not None else ts.replace(tzinfo=UTC)


def _is_data_path(path: str) -> bool:
    """Market data (data.alpaca.markets at Alpaca), served here beside the trading API."""
    return path.startswith(("/v1beta1/", "/v2/stocks/"))


def _is_occ(symbol: str) -> bool:
    return len(symbol) >= 16 and symbol[-9] in "CP" and symbol[-8:].isdigit() and symbol[-15:-9].isdigit()


def _expires_within(occ: str, q: dict[str, str]) -> bool:
    """The chain's expiration_date_gte/lte filters, as Alpaca applies them (ISO dates compare as text)."""
    expiration = f"20{occ[-15:-13]}-{occ[-13:-11]}-{occ[-11:-9]}"
    return (not q.get("expiration_date_gte") or expiration >= q["expiration_date_gte"]) and (
        not q.get("expiration_date_lte") or expiration <= q["expiration_date_lte"])


@dataclass
class RecordedRequest:
    """One request as the server received it (query values: the last one of each name)."""

    method: str
    path: str
    query: dict[str, str]
    json: Any
    fault: str | None = None
    at: datetime | None = None  # the server's `now` when it arrived
    key: str | None = None  # the APCA-API-KEY-ID it carried
    status: int | None = None  # what it was answered (None: no answer, the connection was cut)


@dataclass
class Fault:
    """Applied to the next `times` requests whose path (and method, if set) match.

    after_accept: process the request (e.g. book the order) before failing, like a gateway
    timing out behind an exchange that already took the order.
    hang_seconds: hold the response that long (longer than the client's timeout).
    status/body: the response to send instead of the real one (None with a hang: 504).
    headers: extra response headers (Retry-After).
    reset: cut the connection without an answer (after booking it if after_accept).
    """

    path: str
    times: int = 1
    method: str | None = None
    status: int | None = None
    body: Any = None
    after_accept: bool = False
    hang_seconds: float | None = None
    headers: dict[str, str] | None = None
    reset: bool = False

    def matches(self, method: str, path: str) -> bool:
        if self.times <= 0 or (self.method and self.method.upper() != method):
            return False
        if self.path.endswith("*"):
            return path.startswith(self.path[:-1])
        return path == self.path

    @property
    def label(self) -> str:
        parts = [str(self.status) if self.status else ""]
        if self.hang_seconds:
            parts.append(f"hang{self.hang_seconds}")
        if self.reset:
            parts.append("reset")
        if self.after_accept:
            parts.append("after_accept")
        return "+".join(p for p in parts if p)


class _StreamConnection:
    """One websocket client of /stream: its socket and the sans-I/O protocol state.

    The handler thread reads; any thread that changes an order writes. The lock keeps one
    writer at a time on the protocol and the socket.
    """

    def __init__(self, sock: socket.socket, protocol: ServerProtocol):
        self.sock = sock
        self.protocol = protocol
        self.lock = threading.Lock()
        self.authenticated = False
        self.streams: set[str] = set()

    def flush(self) -> None:
        for data in self.protocol.data_to_send():
            if data:
                self.sock.sendall(data)
            else:
                self.sock.shutdown(socket.SHUT_WR)

    def send(self, message: dict) -> bool:
        """Send one message as a binary frame of JSON; False when the connection is gone."""
        try:
            with self.lock:
                self.protocol.send_binary(json.dumps(message).encode())
                self.flush()
            return True
        except (OSError, InvalidState):  # the client is gone: it is dropped, not an error here
            return False

    def close(self, code: int = 1000, reason: str = "") -> None:
        try:
            with self.lock:
                self.protocol.send_close(code, reason)
                self.flush()
        except (OSError, InvalidState):  # already closed
            pass

    def drop(self) -> None:
        """Cut the TCP connection without a close frame, as a network fault does."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class _Reset(Exception):
    """Close the connection without answering."""


class _Reply(Exception):
    def __init__(self, status: int, body: Any):
        self.status = status
        self.body = body


@dataclass
class FakeAlpaca:
    """The server's state and behaviour; `start()`/`stop()` or use as a context manager."""

    state_file: Path | None = None
    port: int = 0
    key: str | None = FAKE_KEY
    secret: str | None = FAKE_SECRET
    now: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    contracts_page_size: int = 100
    default_order_status: str = "accepted"
    rate_limit_per_minute: int | None = None
    # Positions as the fills of the book make them (net filled qty per symbol), instead of the
    # fixed list add_position builds: the broker's side of a reconciliation test.
    positions_from_fills: bool = False

    def __post_init__(self) -> None:
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self.orders: dict[str, dict] = {}  # by client_order_id, insertion ordered
        self.requests: list[RecordedRequest] = []
        self.faults: list[Fault] = []
        self.fill_prices: dict[str, Decimal] = {}
        self.quotes: dict[str, tuple[Decimal, Decimal]] = {}  # stock quotes for limit orders
        self.account: dict[str, Any] = {
            "id": str(uuid.uuid4()),
            "account_number": "PA0000FAKE",
            "status": "ACTIVE",
            "crypto_status": "ACTIVE",
            "currency": "USD",
            "buying_power": "40000.00",
            "regt_buying_power": "40000.00",
            "daytrading_buying_power": "0",
            "non_marginable_buying_power": "20000.00",
            "options_buying_power": "20000.00",
            "cash": "20000.00",
            "portfolio_value": "20000.00",
            "equity": "20000.00",
            "last_equity": "20000.00",
            "long_market_value": "0",
            "short_market_value": "0",
            "initial_margin": "0",
            "maintenance_margin": "0",
            "last_maintenance_margin": "0",
            "sma": "0",
            "multiplier": "2",
            "pattern_day_trader": False,
            "trading_blocked": False,
            "transfers_blocked": False,
            "account_blocked": False,
            "trade_suspended_by_user": False,
            "shorting_enabled": True,
            "daytrade_count": 0,
            "options_approved_level": 2,
            "options_trading_level": 2,
            "created_at": "2024-01-02T15:00:00Z",
        }
        self.positions: list[dict] = []
        self.clock: dict[str, Any] | None = None  # None: computed from the NYSE calendar
        self.calendar_days: list[dict] | None = None  # None: from the NYSE calendar
        self.contracts: list[dict] = []
        self.snapshots: dict[str, dict] = {}
        self.bars: dict[str, list[dict]] = {}
        self.assets: dict[str, dict] = {}  # by symbol
        self.news: list[dict] = []  # articles in Alpaca's shape (GET /v1beta1/news)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._streams: list[_StreamConnection] = []
        self._streams_changed = threading.Condition(self._lock)
        self._refuse_streams: int | None = 0  # upgrades still to refuse; None: until accept_streams
        self.stream_requests: list[dict] = []  # every message a stream client sent
        self.stream_connects = 0  # upgrades accepted
        self.stream_refusals = 0  # upgrades refused by refuse_streams()
        self._load()

    # Lifecycle --------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The url_override for alpaca-py: scheme://host:port, no /v2, no trailing slash."""
        assert self._server is not None, "server not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def stream_url(self) -> str:
        """Where TradingStream connects (its url_override): ws://host:port/stream."""
        return self.url.replace("http://", "ws://", 1) + "/stream"

    def start(self) -> FakeAlpaca:
        self._stop.clear()
        self._server = _Server(("127.0.0.1", self.port), _Handler)
        self._server.app = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()  # releases hanging handlers
        self.drop_streams()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def serve_forever(self) -> None:
        """Run in the foreground (the separate-process mode)."""
        self._server = _Server(("127.0.0.1", self.port), _Handler)
        self._server.app = self  # type: ignore[attr-defined]
        print(f"listening on {self.url}", flush=True)
        try:
            self._server.serve_forever(poll_interval=0.05)
        finally:
            self._server.server_close()

    def __enter__(self) -> FakeAlpaca:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # Fault injection ------------------------------------------------------------------------

    def inject(self, fault: Fault) -> Fault:
        with self._lock:
            self.faults.append(fault)
        return fault

    def fail_next(
        self,
        path: str,
        status: int,
        *,
        times: int = 1,
        method: str | None = None,
        message: str | None = None,
        after_accept: bool = False,
        retry_after: str | None = None,
    ) -> Fault:
        """The next `times` matching requests get `status` (after booking them if after_accept)."""
        body = {"code": status * 100000 + 10000, "message": message or f"fake {status}"}
        headers = {"Retry-After": retry_after} if retry_after is not None else None
        return self.inject(
            Fault(path=path, times=times, method=method, status=status, body=body, after_accept=after_accept,
                  headers=headers)
        )

    def reset_next(self, path: str, *, times: int = 1, method: str | None = None, after_accept: bool = False) -> Fault:
        """The next `times` matching requests get no answer: the connection is cut."""
        return self.inject(Fault(path=path, times=times, method=method, reset=True, after_accept=after_accept))

    def hang_next(
        self, path: str, seconds: float, *, times: int = 1, method: str | None = None, after_accept: bool = False
    ) -> Fault:
        return self.inject(
            Fault(path=path, times=times, method=method, hang_seconds=seconds, after_accept=after_accept)
        )

    def duplicate_next(self, *, times: int = 1) -> Fault:
        """The next order submits are refused as a reused client_order_id (nothing is booked)."""
        return self.inject(
            Fault(path="/v2/orders", method="POST", times=times, status=422, body=dict(DUPLICATE_BODY))
        )

    # The trading stream -----------------------------------------------------------------------

    def drop_streams(self) -> int:
        """Cut every stream connection (no close frame). Returns how many were cut."""
        with self._lock:
            streams = list(self._streams)
        for conn in streams:
            conn.drop()
        return len(streams)

    def refuse_streams(self, times: int | None = None) -> None:
        """Answer the next `times` stream upgrades (every one, if None) with HTTP 429."""
        with self._lock:
            self._refuse_streams = times

    def accept_streams(self) -> None:
        with self._lock:
            self._refuse_streams = 0

    def listeners(self) -> int:
        """Stream connections authenticated and listening to trade_updates."""
        with self._lock:
            return sum(1 for c in self._streams if "trade_updates" in c.streams)

    def wait_listeners(self, n: int = 1, timeout: float = 2.0) -> bool:
        """Wait until at least n clients listen to trade_updates."""
        with self._streams_changed:
            return self._streams_changed.wait_for(lambda: self.listeners() >= n, timeout)

    def push_trade_update(self, event: str, order: dict, **fields: Any) -> int:
        """Send {"stream": "trade_updates", "data": {...}} to every listener; returns how many.

        `fields` are the event's own keys (execution_id, qty, price, position_qty); values are
        sent as Alpaca sends them, numbers as strings.
        """
        data: dict[str, Any] = {"event": event, "timestamp": _iso(self.now()), "order": dict(order)}
        data.update({k: (str(v) if isinstance(v, Decimal) else v) for k, v in fields.items()})
        message = {"stream": "trade_updates", "data": data}
        with self._lock:
            listeners = [c for c in self._streams if "trade_updates" in c.streams]
        return sum(1 for c in listeners if c.send(message))

    def fill(self, client_order_id: str, price: Decimal | str, qty: Decimal | str | None = None) -> dict:
        """Execute `qty` (the rest of the order if None) at `price`: partial_fill or fill."""
        now = self.now()
        with self._lock:
            order = self.orders[client_order_id]
            ordered = Decimal(order["qty"])
            done = Decimal(order["filled_qty"] or "0")
            q = ordered - done if qty is None else Decimal(str(qty))
            p = Decimal(str(price))
            if q <= 0 or done + q > ordered:
                raise ValueError(f"cannot fill {q} of {client_order_id}: {done} of {ordered} filled")
            before = Decimal(order["filled_avg_price"] or "0") * done
            filled = done + q
            order["filled_qty"] = str(filled.normalize())
            order["filled_avg_price"] = str(((before + q * p) / filled).normalize())
            order["status"] = "filled" if filled == ordered else "partially_filled"
            order["updated_at"] = _iso(now)
            if filled == ordered:
                order["filled_at"] = _iso(now)
            self._save()
            event = "fill" if filled == ordered else "partial_fill"
            self.push_trade_update(
                event, order, execution_id=str(uuid.uuid4()), qty=str(q.normalize()), price=str(p),
                position_qty=str(filled.normalize() if order["side"] == "buy" else -filled.normalize()),
            )
            return dict(order)

    def cancel(self, client_order_id: str) -> dict:
        """Cancel an open order (what remains unfilled): canceled."""
        return self._close_order(client_order_id, "canceled", "canceled_at")

    def reject(self, client_order_id: str) -> dict:
        return self._close_order(client_order_id, "rejected", "failed_at")

    def _close_order(self, client_order_id: str, status: str, stamp: str) -> dict:
        now = self.now()
        with self._lock:
            order = self.orders[client_order_id]
            if order["status"] not in OPEN_STATUSES:
                raise ValueError(f"{client_order_id} is {order['status']}, not open")
            order["status"] = status
            order[stamp] = _iso(now)
            order["updated_at"] = _iso(now)
            self._save()
            self.push_trade_update(status, order)
            return dict(order)

    def _serve_stream(self, handler: BaseHTTPRequestHandler) -> None:
        """Run one websocket connection of /stream on the handler's thread until it ends."""
        handler.close_connection = True
        with self._lock:
            refuse = self._refuse_streams is None or self._refuse_streams > 0
            if refuse:
                self.stream_refusals += 1
                if self._refuse_streams is not None:
                    self._refuse_streams -= 1
        if urlsplit(handler.path).path != "/stream" or refuse:
            status = 404 if not refuse else 429
            body = json.dumps({"code": status * 100000, "message": "connection refused"}).encode()
            handler.send_response(status)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(body)))
            handler.end_headers()
            handler.wfile.write(body)
            return
        protocol = ServerProtocol()
        # http.server has read the upgrade request already; the protocol must parse it too to
        # move on to frames, so it gets the request back as bytes.
        head = f"GET {handler.path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in handler.headers.items())
        protocol.receive_data((head + "\r\n").encode("latin-1"))
        request = next(e for e in protocol.events_received() if isinstance(e, Request))
        response = protocol.accept(request)
        protocol.send_response(response)
        conn = _StreamConnection(handler.connection, protocol)
        conn.flush()
        if response.status_code != 101:
            return
        with self._lock:
            self._streams.append(conn)
            self.stream_connects += 1
        try:
            while True:
                # read1: whatever the request's buffered reader holds, then the socket.
                data = handler.rfile.read1(65536)
                with conn.lock:
                    if data:
                        protocol.receive_data(data)
                    else:
                        protocol.receive_eof()
                    events = protocol.events_received()
                    conn.flush()  # pongs and close replies
                for frame in events:
                    if frame.opcode in (Opcode.TEXT, Opcode.BINARY):
                        self._stream_message(conn, frame.data)
                if not data or protocol.close_expected():
                    return
        except OSError:
            return
        finally:
            with self._streams_changed:
                self._streams.remove(conn)
                self._streams_changed.notify_all()

    def _stream_message(self, conn: _StreamConnection, raw: bytes) -> None:
        try:
            message = json.loads(raw)
            action, data = message.get("action"), message.get("data") or {}
        except (ValueError, AttributeError):
            conn.send({"stream": "error", "data": {"error_message": "invalid syntax"}})
            return
        with self._lock:
            self.stream_requests.append(message)
        if action == "authenticate":
            ok = self.key is None or (data.get("key_id") == self.key and data.get("secret_key") == self.secret)
            status = "authorized" if ok else "unauthorized"
            conn.send({"stream": "authorization", "data": {"action": "authenticate", "status": status}})
            if ok:
                conn.authenticated = True
            else:
                conn.close(1008, "unauthorized")
        elif action == "listen":
            if not conn.authenticated:
                conn.send({"stream": "authorization", "data": {"action": "listen", "status": "unauthorized"}})
                conn.close(1008, "unauthorized")
                return
            wanted = {s for s in data.get("streams") or [] if s == "trade_updates"}
            with self._streams_changed:
                conn.streams = wanted
                self._streams_changed.notify_all()
            conn.send({"stream": "listening", "data": {"streams": sorted(wanted)}})
        else:
            conn.send({"stream": "error", "data": {"error_message": f"unknown action {action!r}"}})

    # Fixtures for data ------------------------------------------------------------------------

    def add_option(
        self,
        symbol: str,
        *,
        bid: float | None = 1.00,
        ask: float | None = 1.10,
        bid_size: int = 10,
        ask_size: int = 12,
        quote_time: datetime | None = None,
        iv: float | None = 0.25,
        greeks: dict[str, float] | None = None,
        open_interest: str | None = "1500",
        volume: int | None = 800,
        contract: bool = True,
        snapshot: bool = True,
    ) -> None:
        """A contract (for open interest) and/or a snapshot (quote, IV, greeks, daily bar)."""
        underlying = symbol[:-15]
        expiration = date(2000 + int(symbol[-15:-13]), int(symbol[-13:-11]), int(symbol[-11:-9]))
        strike = Decimal(symbol[-8:]) / 1000
        if contract:
            self.contracts.append(
                {
                    "id": str(uuid.uuid4()),
                    "symbol": symbol,
                    "name": f"{underlying} {expiration:%b %d %Y} {strike} {'Call' if symbol[-9] == 'C' else 'Put'}",
                    "status": "active",
                    "tradable": True,
                    "expiration_date": expiration.isoformat(),
                    "root_symbol": underlying,
                    "underlying_symbol": underlying,
                    "underlying_asset_id": str(uuid.uuid5(uuid.NAMESPACE_DNS, underlying)),
                    "type": "call" if symbol[-9] == "C" else "put",
                    "style": "american",
                    "strike_price": str(strike),
                    "multiplier": "100",
                    "size": "100",
                    "open_interest": open_interest,
                    "open_interest_date": (expiration - timedelta(days=30)).isoformat() if open_interest else None,
                    "close_price": "1.05",
                    "close_price_date": (expiration - timedelta(days=30)).isoformat(),
                }
            )
        if snapshot:
            ts = _iso(quote_time or self.now())
            snap: dict[str, Any] = {}
            if bid is not None or ask is not None:
                snap["latestQuote"] = {
                    "t": ts, "bx": "C", "bp": bid or 0, "bs": bid_size,
                    "ax": "C", "ap": ask or 0, "as": ask_size, "c": "A",
                }
                snap["latestTrade"] = {"t": ts, "x": "C", "p": ask or bid, "s": 1, "c": "I"}
            if iv is not None:
                snap["impliedVolatility"] = iv
            g = greeks if greeks is not None else {"delta": 0.5, "gamma": 0.02, "rho": 0.1, "theta": -0.05, "vega": 0.3}
            if g:
                snap["greeks"] = g
            if volume is not None:
                snap["dailyBar"] = {"t": ts, "o": 1.0, "h": 1.2, "l": 0.9, "c": 1.05, "v": volume, "n": 40, "vw": 1.04}
            self.snapshots[symbol] = snap

    def add_news(
        self,
        headline: str,
        symbols: list[str],
        created_at: datetime,
        *,
        summary: str = "",
        article_id: int | None = None,
        updated_at: datetime | None = None,
        source: str = "benzinga",
    ) -> dict:
        """A news article as GET /v1beta1/news returns it; the same id again replaces it (an update)."""
        with self._lock:
            article_id = article_id if article_id is not None else 40_000_000 + len(self.news)
            article = {
                "id": article_id, "headline": headline, "summary": summary, "author": "Fake Newsroom",
                "created_at": _iso(created_at), "updated_at": _iso(updated_at or created_at),
                "url": f"https://news.example/{article_id}", "content": "", "symbols": list(symbols),
                "source": source, "images": [],
            }
            self.news = [a for a in self.news if a["id"] != article_id] + [article]
            return article

    def _news(self, q: dict[str, str]) -> dict:
        """Articles naming any of `symbols`, created in [start, end], a page of `limit` (50 at most)."""
        symbols = {s for s in q.get("symbols", "").split(",") if s}
        start = _parse_ts(q["start"]) if q.get("start") else None
        end = _parse_ts(q["end"]) if q.get("end") else None
        with self._lock:
            rows = [
                a for a in self.news
                if (not symbols or symbols & set(a["symbols"]))
                and (start is None or _parse_ts(a["created_at"]) >= start)
                and (end is None or _parse_ts(a["created_at"]) <= end)
            ]
        rows.sort(key=lambda a: (a["created_at"], a["id"]), reverse=q.get("sort", "desc") == "desc")
        size = min(int(q.get("limit") or 10), 50)
        offset = int(q.get("page_token") or 0)
        more = offset + size < len(rows)
        return {"news": rows[offset : offset + size], "next_page_token": str(offset + size) if more else None}

    def add_bar(self, symbol: str, ts: datetime, o: float, h: float, low: float, c: float, v: int) -> None:
        self.bars.setdefault(symbol, []).append(
            {"t": _iso(ts), "o": o, "h": h, "l": low, "c": c, "v": v, "n": 10, "vw": (h + low) / 2}
        )

    def add_asset(
        self,
        symbol: str,
        *,
        status: str = "active",
        tradable: bool = True,
        shortable: bool = True,
        easy_to_borrow: bool = True,
        fractionable: bool = True,
        asset_class: str = "us_equity",
        exchange: str = "NASDAQ",
    ) -> None:
        """An asset record in Alpaca's shape (GET /v2/assets/{symbol})."""
        self.assets[symbol] = {
            "id": str(uuid.uuid5(uuid.NAMESPACE_DNS, symbol)),
            "class": asset_class,
            "exchange": exchange,
            "symbol": symbol,
            "name": f"{symbol} Inc. Common Stock",
            "status": status,
            "tradable": tradable,
            "marginable": tradable,
            "maintenance_margin_requirement": 30,
            "margin_requirement_long": "30",
            "margin_requirement_short": "100",
            "shortable": shortable,
            "easy_to_borrow": easy_to_borrow,
            "fractionable": fractionable,
            "attributes": ["fractional_eh_enabled"] if fractionable else [],
        }

    def add_position(self, symbol: str, qty: str, avg_entry_price: str, current_price: str | None = None) -> None:
        option = _is_occ(symbol)
        q = Decimal(qty)
        mult = 100 if option else 1
        price = Decimal(current_price or avg_entry_price)
        self.positions.append(
            {
                "asset_id": str(uuid.uuid5(uuid.NAMESPACE_DNS, symbol)),
                "symbol": symbol,
                "exchange": "" if option else "NASDAQ",
                "asset_class": "us_option" if option else "us_equity",
                "asset_marginable": not option,
                "avg_entry_price": avg_entry_price,
                "qty": qty,
                "qty_available": qty,
                "side": "long" if q > 0 else "short",
                "market_value": str(q * price * mult),
                "cost_basis": str(q * Decimal(avg_entry_price) * mult),
                "unrealized_pl": str(q * (price - Decimal(avg_entry_price)) * mult),
                "current_price": current_price,
                "lastday_price": current_price,
                "change_today": "0",
            }
        )

    def _positions(self) -> list[dict]:
        if not self.positions_from_fills:
            return list(self.positions)
        net: dict[str, Decimal] = {}
        cost: dict[str, Decimal] = {}
        bought: dict[str, Decimal] = {}
        last: dict[str, str] = {}
        with self._lock:
            for o in self.orders.values():
                filled = Decimal(o["filled_qty"] or "0")
                if filled == 0:
                    continue
                symbol = o["symbol"]
                sign = 1 if o["side"] == "buy" else -1
                net[symbol] = net.get(symbol, Decimal(0)) + sign * filled
                last[symbol] = o["filled_avg_price"]
                if sign > 0:
                    bought[symbol] = bought.get(symbol, Decimal(0)) + filled
                    cost[symbol] = cost.get(symbol, Decimal(0)) + filled * Decimal(o["filled_avg_price"])
        saved, self.positions = self.positions, []
        try:
            for symbol, qty in net.items():
                if qty != 0:
                    avg = cost.get(symbol, Decimal(0)) / bought[symbol] if bought.get(symbol) else Decimal(last[symbol])
                    self.add_position(symbol, str(qty.normalize()), str(avg.normalize()), str(last[symbol]))
            return self.positions
        finally:
            self.positions = saved

    def set_quote(self, symbol: str, bid: float | str, ask: float | str) -> None:
        """The quote a limit order on `symbol` is marketable against (options: add_option's bid/ask)."""
        with self._lock:
            self.quotes[symbol] = (Decimal(str(bid)), Decimal(str(ask)))

    def quote(self, symbol: str) -> tuple[Decimal, Decimal] | None:
        with self._lock:
            if symbol in self.quotes:
                return self.quotes[symbol]
            q = (self.snapshots.get(symbol) or {}).get("latestQuote")
        if q is None:
            return None
        return Decimal(str(q["bp"])), Decimal(str(q["ap"]))

    def fill_resting(self, client_order_id: str, price: float | str | None = None) -> dict:
        """The market came to a resting order: fill it at `price` (default its limit)."""
        with self._lock:
            order = self.orders[client_order_id]
            if order["status"] not in OPEN_STATUSES:
                raise ValueError(f"order {client_order_id} is {order['status']}, not resting")
            fill = Decimal(str(price if price is not None else order["limit_price"]))
            now = _iso(self.now())
            order.update(status="filled", filled_qty=order["qty"], filled_avg_price=str(fill),
                         filled_at=now, updated_at=now)
            self._save()
            return dict(order)

    # Queries for assertions -------------------------------------------------------------------

    def requests_to(self, path: str, method: str | None = None) -> list[RecordedRequest]:
        with self._lock:
            return [
                r for r in self.requests
                if r.path == path and (method is None or r.method == method.upper())
            ]

    # Persistence ------------------------------------------------------------------------------

    def _load(self) -> None:
        if self.state_file is not None and Path(self.state_file).exists():
            data = json.loads(Path(self.state_file).read_text())
            self.orders = {o["client_order_id"]: o for o in data.get("orders", [])}

    def _save(self) -> None:
        if self.state_file is None:
            return
        path = Path(self.state_file)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps({"orders": list(self.orders.values())}, indent=1))
        os.replace(tmp, path)  # a crash mid-write leaves the previous book, never half a file

    # Request handling -------------------------------------------------------------------------

    def _handle(self, method: str, raw_path: str, headers: Any, body: bytes) -> tuple[int, Any, dict[str, str]]:
        parts = urlsplit(raw_path)
        path = parts.path
        query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        payload = json.loads(body) if body else None
        if path.startswith("/_fake/"):
            return (*self._control(method, path, payload), {})
        key = headers.get("APCA-API-KEY-ID")
        with self._lock:
            now = self.now()
            fault = next((f for f in self.faults if f.matches(method, path)), None)
            if fault is not None:
                fault.times -= 1
            record = RecordedRequest(method, path, query, payload, fault.label if fault else None, at=now, key=key)
            limited = self._over_rate_limit(key, now, path)
            self.requests.append(record)
        try:
            status, answer, extra = self._answer(method, path, query, payload, headers, fault, limited)
        except _Reset:
            record.status = None
            raise
        record.status = status
        return status, answer, extra

    def _over_rate_limit(self, key: str | None, now: datetime, path: str = "") -> int | None:
        """Seconds until a slot frees when `key` already made the limit's worth in the last 60 s.

        The trading API and the market data API have a limit each, as at Alpaca: a chain
        snapshot does not spend the account's trading requests.
        """
        if self.rate_limit_per_minute is None:
            return None
        data = _is_data_path(path)
        window = [
            r.at for r in self.requests
            if r.key == key and r.at is not None and r.status != 429 and now - r.at < timedelta(seconds=60)
            and _is_data_path(r.path) == data
        ]
        if len(window) < self.rate_limit_per_minute:
            return None
        return max(1, int((min(window) + timedelta(seconds=60) - now).total_seconds()) + 1)

    def _answer(
        self, method: str, path: str, query: dict, payload: Any, headers: Any, fault: Fault | None, limited: int | None
    ) -> tuple[int, Any, dict[str, str]]:
        if self.key is not None and (
            headers.get("APCA-API-KEY-ID") != self.key or headers.get("APCA-API-SECRET-KEY") != self.secret
        ):
            return 401, {"code": 40110000, "message": "request is not authorized"}, {}
        if limited is not None:
            return 429, {"code": 42910000, "message": "rate limit exceeded"}, {"Retry-After": str(limited)}
        if fault is None:
            return (*self._route(method, path, query, payload), {})
        real: tuple[int, Any] | None = None
        if fault.after_accept:
            real = self._route(method, path, query, payload)
        if fault.hang_seconds:
            self._stop.wait(fault.hang_seconds)
        if fault.reset:
            raise _Reset()
        if fault.status is not None:
            return fault.status, fault.body, dict(fault.headers or {})
        if real is not None:
            return (*real, {})
        return 504, {"code": 50400000, "message": "gateway timeout"}, {}

    def _route(self, method: str, path: str, q: dict[str, str], body: Any) -> tuple[int, Any]:
        try:
            if method == "POST" and path == "/v2/orders":
                return 200, self._submit(body or {})
            if method == "DELETE" and path.startswith("/v2/orders/"):
                return self._cancel(path.rsplit("/", 1)[1])
            if method == "GET":
                if path == "/v2/account":
                    return 200, dict(self.account)
                if path == "/v2/clock":
                    return 200, self._clock()
                if path == "/v2/calendar":
                    return 200, self._calendar(q)
                if path == "/v2/positions":
                    return 200, self._positions()
                if path == "/v2/orders":
                    return 200, self._list_orders(q)
                if path == "/v2/orders:by_client_order_id":
                    with self._lock:
                        order = self.orders.get(q.get("client_order_id", ""))
                    if order is None:
                        raise _Reply(404, {"code": 40410000, "message": "order not found"})
                    return 200, order
                if path.startswith("/v2/orders/"):
                    order_id = path.rsplit("/", 1)[1]
                    with self._lock:
                        found = [o for o in self.orders.values() if o["id"] == order_id]
                    if not found:
                        raise _Reply(404, {"code": 40410000, "message": "order not found"})
                    return 200, found[0]
                if path.startswith("/v2/assets/"):
                    symbol = unquote(path[len("/v2/assets/"):])
                    with self._lock:
                        asset = self.assets.get(symbol)
                    if asset is None:
                        raise _Reply(404, {"code": 40410000, "message": f"asset not found for {symbol}"})
                    return 200, dict(asset)
                if path == "/v2/options/contracts":
                    return 200, self._contracts(q)
                if path == "/v1beta1/options/snapshots":
                    wanted = [s for s in q.get("symbols", "").split(",") if s]
                    return 200, {
                        "snapshots": {s: self.snapshots[s] for s in wanted if s in self.snapshots},
                        "next_page_token": None,
                    }
                if path.startswith("/v1beta1/options/snapshots/"):
                    underlying = path.rsplit("/", 1)[1]
                    return 200, {
                        "snapshots": {
                            s: snap for s, snap in self.snapshots.items()
                            if _is_occ(s) and s[:-15] == underlying and _expires_within(s, q)
                        },
                        "next_page_token": None,
                    }
                if path == "/v1beta1/news":
                    return 200, self._news(q)
                if path == "/v2/stocks/bars":
                    symbols = [s for s in q.get("symbols", "").split(",") if s]
                    return 200, {
                        "bars": {s: self._bars_in_range(s, q) for s in symbols if self.bars.get(s)},
                        "next_page_token": None,
                    }
                if path.startswith("/v2/stocks/") and path.endswith("/bars"):
                    symbol = path.split("/")[3]
                    return 200, {"bars": self._bars_in_range(symbol, q), "symbol": symbol, "next_page_token": None}
            return 404, {"code": 40410000, "message": f"no route {method} {path}"}
        except _Reply as r:
            return r.status, r.body

    def _submit(self, body: dict) -> dict:
        required = ("symbol", "side", "type", "time_in_force")
        missing = [k for k in required if not body.get(k)]
        if missing or not (body.get("qty") or body.get("notional")):
            raise _Reply(422, {"code": 40010001, "message": f"missing {', '.join(missing) or 'qty'}"})
        if body["side"] not in ("buy", "sell"):
            raise _Reply(422, {"code": 40010001, "message": "invalid side"})
        now = self.now()
        with self._lock:
            coid = body.get("client_order_id") or str(uuid.uuid4())
            if coid in self.orders:
                raise _Reply(422, dict(DUPLICATE_BODY))
            symbol = body["symbol"]
            qty = Decimal(str(body.get("qty") or 0))
            fill = self.fill_prices.get(symbol)
            if body["type"] == "limit":
                fill = self._limit_fill(symbol, body["side"], body.get("limit_price"), fill)
            order = {
                "id": str(uuid.uuid4()),
                "client_order_id": coid,
                "created_at": _iso(now),
                "updated_at": _iso(now),
                "submitted_at": _iso(now),
                "filled_at": _iso(now) if fill is not None else None,
                "expired_at": None,
                "canceled_at": None,
                "failed_at": None,
                "replaced_at": None,
                "replaced_by": None,
                "replaces": None,
                "asset_id": str(uuid.uuid5(uuid.NAMESPACE_DNS, symbol)),
                "symbol": symbol,
                "asset_class": "us_option" if _is_occ(symbol) else "us_equity",
                "notional": body.get("notional"),
                "qty": str(qty.normalize()),
                "filled_qty": str(qty.normalize()) if fill is not None else "0",
                "filled_avg_price": str(fill) if fill is not None else None,
                "order_class": body.get("order_class") or "simple",
                "order_type": body["type"],
                "type": body["type"],
                "side": body["side"],
                "position_intent": body.get("position_intent"),
                "time_in_force": body["time_in_force"],
                "limit_price": None if body.get("limit_price") is None else str(body["limit_price"]),
                "stop_price": body.get("stop_price"),
                "status": "filled" if fill is not None else self.default_order_status,
                "extended_hours": bool(body.get("extended_hours", False)),
                "legs": None,
                "trail_percent": None,
                "trail_price": None,
                "hwm": None,
            }
            self.orders[coid] = order
            self._save()
            if fill is None:
                self.push_trade_update("new", order)
            else:
                # The order was new for an instant before it filled: the "new" event shows that.
                unfilled = {"status": "new", "filled_qty": "0", "filled_avg_price": None, "filled_at": None}
                self.push_trade_update("new", {**order, **unfilled})
                self.push_trade_update(
                    "fill", order, execution_id=str(uuid.uuid4()), qty=order["qty"], price=str(fill),
                    position_qty=order["qty"] if order["side"] == "buy" else f"-{order['qty']}",
                )
        return order

    def _limit_fill(self, symbol: str, side: str, limit: Any, market: Decimal | None) -> Decimal | None:
        """A limit order fills at once only when marketable: at the touch, never worse than its limit."""
        if limit is None:
            raise _Reply(422, {"code": 40010001, "message": "limit_price is required for limit orders"})
        limit = Decimal(str(limit))
        quote = self.quote(symbol)
        touch = None
        if quote is not None:
            bid, ask = quote
            touch = ask if side == "buy" else bid
        elif market is not None:
            touch = market
        if touch is None or touch <= 0:
            return None
        if side == "buy" and touch <= limit or side == "sell" and touch >= limit:
            return touch
        return None

    def _cancel(self, order_id: str) -> tuple[int, Any]:
        """DELETE /v2/orders/{id}: 204 once canceled, 422 when the order is done (filled, canceled)."""
        with self._lock:
            found = [o for o in self.orders.values() if o["id"] == order_id]
            if not found:
                raise _Reply(404, {"code": 40410000, "message": "order not found"})
            order = found[0]
            if order["status"] not in OPEN_STATUSES:
                raise _Reply(422, {"code": 42210000, "message": f"order is not cancelable: {order['status']}"})
            now = _iso(self.now())
            order.update(status="canceled", canceled_at=now, updated_at=now)
            self._save()
        return 204, None

    def _list_orders(self, q: dict[str, str]) -> list[dict]:
        status = q.get("status", "open")
        after = _parse_ts(q["after"]) if q.get("after") else None
        until = _parse_ts(q["until"]) if q.get("until") else None
        limit = min(int(q.get("limit") or 50), 500)
        symbols = {s for s in q.get("symbols", "").split(",") if s}
        with self._lock:
            orders = list(self.orders.values())
        out = []
        for o in orders:
            submitted = _parse_ts(o["submitted_at"])
            if after is not None and submitted <= after:
                continue
            if until is not None and submitted >= until:
                continue
            if symbols and o["symbol"] not in symbols:
                continue
            is_open = o["status"] in OPEN_STATUSES
            if (status == "open" and not is_open) or (status == "closed" and is_open):
                continue
            out.append(o)
        out.sort(key=lambda o: o["submitted_at"], reverse=q.get("direction", "desc") == "desc")
        return out[:limit]

    def _contracts(self, q: dict[str, str]) -> dict:
        underlyings = {s for s in q.get("underlying_symbols", "").split(",") if s}
        rows = [
            c for c in self.contracts
            if (not underlyings or c["underlying_symbol"] in underlyings)
            and (not q.get("status") or c["status"] == q["status"])
            and (not q.get("type") or c["type"] == q["type"])
            and (not q.get("expiration_date_gte") or c["expiration_date"] >= q["expiration_date_gte"])
            and (not q.get("expiration_date_lte") or c["expiration_date"] <= q["expiration_date_lte"])
        ]
        size = min(int(q.get("limit") or 100), self.contracts_page_size)
        start = int(q.get("page_token") or 0)
        page = rows[start : start + size]
        more = start + size < len(rows)
        return {"option_contracts": page, "next_page_token": str(start + size) if more else None}

    def _bars_in_range(self, symbol: str, q: dict[str, str]) -> list[dict]:
        start = _parse_ts(q["start"]) if q.get("start") else None
        end = _parse_ts(q["end"]) if q.get("end") else None
        return [
            b for b in self.bars.get(symbol, [])
            if (start is None or _parse_ts(b["t"]) >= start) and (end is None or _parse_ts(b["t"]) <= end)
        ]

    def _nyse(self):
        from services.common.market_calendar import nyse_calendar

        return nyse_calendar()

    def _calendar(self, q: dict[str, str]) -> list[dict]:
        start = date.fromisoformat(q["start"]) if q.get("start") else None
        end = date.fromisoformat(q["end"]) if q.get("end") else None
        if self.calendar_days is not None:
            days = self.calendar_days
        else:
            cal = self._nyse()
            lo = start or cal.first_day
            hi = end or cal.last_day
            days = [
                {
                    "date": s.day.isoformat(),
                    "open": s.open.astimezone(ET).strftime("%H:%M"),
                    "close": s.close.astimezone(ET).strftime("%H:%M"),
                    "session_open": "0400",
                    "session_close": "2000",
                    "settlement_date": (s.day + timedelta(days=1)).isoformat(),
                }
                for s in cal.sessions_between(lo, hi)
            ]
        return [
            d for d in days
            if (start is None or d["date"] >= start.isoformat()) and (end is None or d["date"] <= end.isoformat())
        ]

    def _clock(self) -> dict:
        if self.clock is not None:
            return dict(self.clock)
        now = self.now()
        cal = self._nyse()
        today = cal.session_on(now.astimezone(ET).date())
        is_open = today is not None and today.open <= now < today.close
        if today is not None and now < today.open:
            next_open = today
        else:
            next_open = cal.next_session(now.astimezone(ET).date())
        next_close = today if today is not None and now < today.close else next_open
        return {
            "timestamp": now.astimezone(ET).isoformat(),
            "is_open": is_open,
            "next_open": next_open.open.astimezone(ET).isoformat(),
            "next_close": next_close.close.astimezone(ET).isoformat(),
        }

    def _control(self, method: str, path: str, payload: Any) -> tuple[int, Any]:
        """Out-of-band control for the separate-process mode (not recorded, no auth)."""
        if method == "POST" and path == "/_fake/faults":
            self.inject(Fault(**payload))
            return 200, {"ok": True}
        if method == "POST" and path == "/_fake/fill_resting":
            try:
                return 200, self.fill_resting(payload["client_order_id"], payload.get("price"))
            except (KeyError, ValueError) as e:
                return 422, {"message": str(e)}
        if method == "POST" and path == "/_fake/quotes":
            for symbol, (bid, ask) in payload.items():
                self.set_quote(symbol, bid, ask)
            return 200, {"ok": True}
        if method == "POST" and path == "/_fake/fill_prices":
            with self._lock:
                self.fill_prices.update({k: Decimal(str(v)) for k, v in payload.items()})
            return 200, {"ok": True}
        if method == "GET" and path == "/_fake/requests":
            with self._lock:
                return 200, [asdict(r) for r in self.requests]
        if method == "POST" and path == "/_fake/streams/drop":
            return 200, {"dropped": self.drop_streams()}
        if method == "GET" and path == "/_fake/positions":
            return 200, self._positions()
        if method == "GET" and path == "/_fake/orders":
            with self._lock:
                return 200, list(self.orders.values())
        return 404, {"message": f"no control route {method} {path}"}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # a hanging handler must not hold up stop()
    allow_reuse_address = True

    def get_request(self):  # type: ignore[override]
        sock, addr = super().get_request()
        # Without TCP_NODELAY each keep-alive response waits ~40 ms on delayed ACK.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock, addr


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _dispatch(self) -> None:
        app: FakeAlpaca = self.server.app  # type: ignore[attr-defined]
        if self.command == "GET" and self.headers.get("Upgrade", "").lower() == "websocket":
            app._serve_stream(self)
            return
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        try:
            status, payload, headers = app._handle(self.command, self.path, self.headers, body)
        except _Reset:
            # SO_LINGER 0: close with a TCP RST, as a proxy dropping the connection would.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            return
        data = b"" if status == 204 else json.dumps(payload, default=str).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client gave up (timeout): nothing to answer

    do_GET = do_POST = do_DELETE = do_PATCH = _dispatch

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


@pytest.fixture
def fake_alpaca():
    """A FakeAlpaca on 127.0.0.1:<free port>, stopped after the test."""
    with FakeAlpaca() as fake:
        yield fake


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A local server speaking Alpaca's REST paths.")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--state", type=Path, default=None, help="JSON file that keeps the order book")
    parser.add_argument("--fill-price", action="append", default=[], metavar="SYMBOL=PRICE",
                        help="fill market orders for SYMBOL at PRICE at once")
    parser.add_argument("--setup", type=Path, default=None,
                        help="JSON: rate_limit_per_minute, positions_from_fills, offset_seconds (the server's "
                             "clock is real time shifted by it), assets [symbol], options [add_option kwargs "
                             "with symbol], fill_prices {symbol: price}, account {field: value}")
    args = parser.parse_args(argv)
    setup = json.loads(args.setup.read_text()) if args.setup else {}
    offset = timedelta(seconds=float(setup.get("offset_seconds", 0)))
    fake = FakeAlpaca(state_file=args.state, port=args.port, now=lambda: datetime.now(UTC) + offset,
                      rate_limit_per_minute=setup.get("rate_limit_per_minute"),
                      positions_from_fills=bool(setup.get("positions_from_fills", False)))
    for symbol in setup.get("assets", []):
        fake.add_asset(symbol)
    for option in setup.get("options", []):
        fake.add_option(**option)
    fake.account.update(setup.get("account", {}))
    fake.fill_prices.update({k: Decimal(str(v)) for k, v in setup.get("fill_prices", {}).items()})
    for item in args.fill_price:
        symbol, price = item.split("=", 1)
        fake.fill_prices[symbol] = Decimal(price)
    try:
        fake.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())

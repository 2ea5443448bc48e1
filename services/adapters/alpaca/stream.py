"""Trade updates from Alpaca's trading stream (websocket `trade_updates`) as broker.TradeUpdate.

Alpaca pushes every change of an order (new, partial_fill, fill, canceled, rejected, ...) on
wss://paper-api.alpaca.markets/stream (api.alpaca.markets for live) within a second of the
change; polling the REST API remains the fallback for what a disconnection misses.

The protocol is alpaca-py's TradingStream (0.44), used here for its connection and handshake:
JSON `{"action": "authenticate", "data": {"key_id", "secret_key"}}`, answered by
`{"stream": "authorization", "data": {"status": "authorized"}}`; then `{"action": "listen",
"data": {"streams": ["trade_updates"]}}`, answered by `{"stream": "listening", ...}`; then
`{"stream": "trade_updates", "data": <TradeUpdate>}` messages. Alpaca sends binary frames of
JSON; the SDK reads text or binary alike. Each message is parsed by the SDK's TradeUpdate model.

What this adds to TradingStream, and why its own run loop is not used:
- stop() returns at once: TradingStream looks at its stop queue only between 5 s receive
  timeouts, and its handshake has no timeout (a server that accepts and never answers hangs it).
- `connected` means authorized AND listening, confirmed by the server's reply; TradingStream
  exposes no state a health check can read.
- a callback that raises is logged and the stream goes on; a message that does not parse, or an
  event we do not know, is logged and dropped.
- pings every 10 s with a 20 s timeout, so a dead connection is noticed within half a minute
  (the SDK's 180 s timeout would leave the dispatcher blind for three minutes).
Reconnection uses the SDK's backoff (exponential with jitter, bounded).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

import websockets
from alpaca.common.utils import reconnect_delay
from alpaca.trading.models import TradeUpdate as SdkTradeUpdate
from alpaca.trading.stream import TradingStream
from pydantic import ValidationError

from services.common.clock import Clock, SystemClock
from services.common.logs import register_secret
from services.adapters.alpaca.client import _dec, _enum_value, _utc, order_result
from services.adapters.alpaca.settings import AlpacaSettings
from services.domain.broker import TRADE_EVENTS, TradeUpdate

log = logging.getLogger(__name__)

STREAM_PATH = "/stream"
CLOSE_TIMEOUT = 0.3  # seconds for the close handshake; then the connection is dropped


def stream_url(settings: AlpacaSettings) -> str | None:
    """The stream's url_override: Alpaca serves it beside the trading API, at /stream.

    None when the trading API is Alpaca's own: TradingStream then picks paper or live itself.
    """
    if settings.trading_url is None:
        return None
    base = settings.trading_url
    scheme, rest = base.split("://", 1)
    return f"{'wss' if scheme == 'https' else 'ws'}://{rest}{STREAM_PATH}"


def trade_update(data: Mapping[str, Any]) -> TradeUpdate | None:
    """The `data` of a trade_updates message -> TradeUpdate; None for an event we do not know.

    The SDK model validates the message and the order; quantities and prices are read from the
    message's own strings, not the model's floats, so they stay exact in Decimal.
    Raises pydantic.ValidationError for a message that is not a trade update.
    """
    sdk = SdkTradeUpdate(**data)
    event = _enum_value(sdk.event)
    if event not in TRADE_EVENTS:
        log.warning(
            "trade update with an unknown event ignored",
            extra={"event": event, "client_order_id": sdk.order.client_order_id},
        )
        return None
    at = _utc(sdk.timestamp)
    assert at is not None  # the model requires a timestamp
    return TradeUpdate(
        event=event,
        order=order_result(sdk.order),
        at=at,
        qty=_dec(data.get("qty")),
        price=_dec(data.get("price")),
        position_qty=_dec(data.get("position_qty")),
        execution_id=str(sdk.execution_id) if sdk.execution_id is not None else None,
    )


async def _noop(_: Any) -> None:
    """TradingStream sends `listen` only once a handler is subscribed; messages come to us."""


class TradeUpdateStream:
    """Runs the trade_updates stream on a background thread and hands each update to a callback.

    `on_update(update)` and `on_connect()` run on the stream's thread, one at a time, in the
    order the broker sent the updates; keep them short (one database transaction): while they
    run, nothing else is read. An exception from either is logged and the stream goes on.
    `on_connect` is called each time the stream is listening again after a (re)connection: what
    happened while it was away is only in the REST API, so that is the moment to poll.

    Usage: `stream.start()`, later `stream.stop()`. `connected` and `last_message_at` tell a
    health check whether updates are flowing; while not connected, polling is the only source.
    """

    def __init__(
        self,
        settings: AlpacaSettings,
        on_update: Callable[[TradeUpdate], None],
        *,
        on_connect: Callable[[], None] | None = None,
        url: str | None = None,
        min_backoff: float = 0.5,
        max_backoff: float = 30.0,
        handshake_timeout: float = 10.0,
        ping_interval: float = 10.0,
        ping_timeout: float = 20.0,
        clock: Clock | None = None,
    ):
        key = settings.api_key.get_secret_value()
        secret = settings.secret_key.get_secret_value()
        register_secret(key)
        register_secret(secret)
        self.url = url or stream_url(settings)
        self.paper = settings.paper
        self.on_update = on_update
        self.on_connect = on_connect
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self.handshake_timeout = handshake_timeout
        self.clock: Clock = clock or SystemClock()
        self._sdk = TradingStream(
            key,
            secret,
            paper=settings.paper,
            url_override=self.url,
            websocket_params={
                "ping_interval": ping_interval,
                "ping_timeout": ping_timeout,
                "max_queue": 1024,
                "open_timeout": handshake_timeout,
                "close_timeout": CLOSE_TIMEOUT,
            },
        )
        self._sdk.subscribe_trade_updates(_noop)
        self._connected = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self.last_message_at: datetime | None = None
        self.connected_since: datetime | None = None
        self.connects = 0  # times the stream reached "listening"

    def __repr__(self) -> str:
        return f"TradeUpdateStream(url={self.url or 'alpaca ' + ('paper' if self.paper else 'live')}, connected={self.connected})"

    __str__ = __repr__

    # Control ----------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Authorized and listening to trade_updates right now."""
        return self._connected.is_set()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def start(self) -> TradeUpdateStream:
        if self._thread is not None:
            raise RuntimeError("the trade update stream was started already")
        self._thread = threading.Thread(target=self._run, name="trade-updates", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 1.0) -> None:
        """Close the connection and end the thread; returns within about `timeout` seconds."""
        self._stopping = True
        if self._thread is None:
            return
        deadline = time.monotonic() + timeout
        while self._thread.is_alive() and time.monotonic() < deadline:
            # Cancel again until the thread ends: a cancel can land while the task is between
            # awaits of a library that absorbs it.
            loop, task = self._loop, self._task
            if loop is not None and task is not None:
                try:
                    loop.call_soon_threadsafe(task.cancel)
                except RuntimeError:  # the loop has finished already
                    pass
            self._thread.join(min(0.05, max(0.0, deadline - time.monotonic())))
        if self._thread.is_alive():
                log.warning("trade update stream did not stop in time", extra={"timeout": timeout})

    def __enter__(self) -> TradeUpdateStream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # The thread -------------------------------------------------------------------------------

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        # stop() sets _stopping before it reads _loop: one of the two sees the other.
        attempt = 0
        try:
            while not self._stopping:
                listened = await self._session()
                attempt = 1 if listened else attempt + 1
                delay = reconnect_delay(attempt, self.min_backoff, self.max_backoff)
                log.info("trade update stream reconnecting", extra={"attempt": attempt, "delay_s": round(delay, 3)})
                await asyncio.sleep(delay)
        except asyncio.CancelledError:
            pass
        finally:
            self._connected.clear()

    async def _session(self) -> bool:
        """One connection: handshake, then read until it ends. True if it reached listening."""
        listened = False
        try:
            # connect + authenticate (raises ValueError when refused) + listen
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel (stop())
            # that lands as the awaited step completes.
            async with asyncio.timeout(self.handshake_timeout):
                await self._sdk._start_ws()
                listened = await self._await_listening(self._sdk._ws)
            async for raw in self._sdk._ws:
                self._handle(raw)
            log.warning("trade update stream closed by the server")
        except asyncio.CancelledError:
            raise
        except asyncio.TimeoutError:
            log.warning("trade update stream handshake timed out", extra={"timeout": self.handshake_timeout})
        except Exception as e:  # noqa: BLE001 - any failure of the connection means: reconnect
            log.warning(
                "trade update stream disconnected",
                extra={"error": f"{type(e).__name__}: {e}", "was_listening": listened},
            )
        finally:
            self._connected.clear()
            self.connected_since = None
            await self._close()
        return listened

    async def _await_listening(self, ws: Any) -> bool:
        """Read until the server confirms trade_updates; anything else before that is handled."""
        while True:
            message = self._handle(await ws.recv())
            if message is None or message.get("stream") != "listening":
                continue
            streams = (message.get("data") or {}).get("streams") or []
            if "trade_updates" not in streams:
                raise ValueError(f"server did not listen to trade_updates: {message.get('data')}")
            self.connected_since = self.clock.now()
            self.connects += 1
            self._connected.set()
            log.info("trade update stream listening", extra={"connects": self.connects})
            self._call(self.on_connect, "on_connect")
            return True

    async def _close(self) -> None:
        """Close politely if the server answers at once, else drop the connection: stop() waits."""
        ws, self._sdk._ws = self._sdk._ws, None
        self._sdk._running = False
        if ws is None:
            return
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await ws.close()
        except (asyncio.TimeoutError, OSError, websockets.WebSocketException):
            pass
        finally:
            ws.transport.abort()

    # Messages ---------------------------------------------------------------------------------

    def _handle(self, raw: str | bytes) -> dict | None:
        """Parse one message and deliver it if it is a trade update; returns the message."""
        self.last_message_at = self.clock.now()
        try:
            message = json.loads(raw)
        except ValueError:
            log.warning("trade update stream: unreadable message ignored", extra={"size": len(raw)})
            return None
        if not isinstance(message, dict):
            log.warning("trade update stream: unexpected message ignored", extra={"type": type(message).__name__})
            return None
        if message.get("stream") != "trade_updates":
            return message
        try:
            update = trade_update(message.get("data") or {})
        except (ValidationError, ValueError, TypeError) as e:
            log.warning("trade update stream: malformed trade update ignored", extra={"error": str(e)[:500]})
            return message
        if update is not None:
            self._call(self.on_update, "on_update", update)
        return message

    def _call(self, callback: Callable[..., None] | None, name: str, *args: Any) -> None:
        if callback is None:
            return
        try:
            callback(*args)
        except Exception:  # noqa: BLE001 - a failing consumer must not end the stream
            extra = {"callback": name}
            if args and isinstance(args[0], TradeUpdate):
                extra.update(event=args[0].event, client_order_id=args[0].client_order_id)
            log.exception("trade update callback failed", extra=extra)

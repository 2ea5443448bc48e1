"""Process wiring of the dispatcher: the broker, the market data, the trade updates and the params in force.

`OPS_BROKER` picks the simulated paper broker (default) or Alpaca; live trading needs every
switch (environment, params, ALPACA_PAPER=false). Nothing here decides anything.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from datetime import datetime
from typing import Any

from psycopg_pool import ConnectionPool

from services.adapters.sim.broker import SimBroker
from services.common.clock import Clock
from services.common.params import ParamsInForce
from services.domain.broker import Broker
from services.domain.order_pricing import Quote

log = logging.getLogger("dispatcher")


def build_broker(pool: ConnectionPool, account_id: str, clock: Clock, in_force: ParamsInForce) -> Broker:
    """The simulated paper broker by default; Alpaca when OPS_BROKER=alpaca."""
    kind = os.environ.get("OPS_BROKER", "sim")
    if kind == "alpaca":
        from services.common.settings import load_settings, trading_mode
        from services.adapters.alpaca.client import AlpacaBroker, postgres_trading_budget
        from services.adapters.alpaca.settings import AlpacaSettings

        mode, reason = trading_mode(load_settings(), in_force.params)
        # Live needs both keys (environment and params) and the adapter not pinned to paper:
        # any one of them saying paper means paper.
        alpaca = AlpacaSettings()
        settings = alpaca.model_copy(update={"paper": alpaca.paper or mode != "live"})
        if mode == "live" and settings.paper:
            mode, reason = "paper", "PAPER: ALPACA_PAPER is true"
        log.warning("trading mode", extra={"mode": mode, "reason": reason})
        # Alpaca's 200 requests a minute are the account's: every dispatcher spends one budget.
        budget = postgres_trading_budget(settings, pool.conninfo, account_id) if pool is not None else None
        return AlpacaBroker(settings, clock=clock, budget=budget)
    if kind != "sim":
        raise SystemExit(f"OPS_BROKER must be 'sim' or 'alpaca', got {kind!r}")
    log.info("trading mode", extra={"mode": "paper", "reason": "simulated paper broker"})
    fees = in_force.params.fees
    return SimBroker(pool, account_id, clock, slippage_bps=in_force.params.execution.slippage_bps,
                     fee_per_share=fees.per_share, fee_per_contract=fees.per_contract)


def params_provider(conninfo: str | None = None):
    """The params in force: SSM when configured, else the reviewed file; reloaded on an interval.

    With `conninfo`, the last good SSM document is kept in that database for an SSM outage at start-up.
    """
    from services.adapters.params_source import provider_from_settings
    from services.common.settings import load_settings

    return provider_from_settings(load_settings(), conninfo)


def log_startup(dispatcher: Any) -> None:
    in_force = dispatcher.params.current()
    p = in_force.params
    log.info("params in force", extra={"source": in_force.source, "version": in_force.version, "hash": in_force.content_hash})
    for name, limit in [
        ("daily_loss", f"max_daily_loss={p.risk.max_daily_loss}"),
        ("max_positions", f"max_open_positions={p.risk.max_open_positions}"),
        ("max_exposure", f"max_notional_exposure={p.risk.max_notional_exposure}"),
        ("trading_hours", f"blocked first {p.trading_hours.block_after_open_minutes}m and last {p.trading_hours.block_before_close_minutes}m"),
        ("ticker_cooldown", f"{p.risk.ticker_cooldown_minutes}m"),
        ("ticker_trades_today", f"max {p.risk.max_trades_per_ticker_per_day}"),
        ("asset", "ticker well-formed; broker asset active, tradable (shortable for a short sale), cached per session"),
        ("option_liquidity", f"spread<={p.options.max_option_spread} volume>={p.options.min_option_volume} "
                             f"oi>={p.options.min_open_interest} iv_pct<={p.options.max_iv_percentile}"),
    ]:
        log.info("gate", extra={"gate": name, "limit": limit})


def start_trade_updates(dispatcher: Any, broker: Broker) -> Callable[[], None]:
    """Feed the broker's pushed trade updates to the dispatcher; returns the function that stops them.

    Alpaca: the trade_updates websocket, reconnecting with backoff; after each (re)connection the
    loop polls what the gap may have missed. Simulated broker: its in-process events.
    """
    if isinstance(broker, SimBroker):
        return broker.subscribe(dispatcher.on_trade_update)
    from services.adapters.alpaca.stream import TradeUpdateStream

    stream = TradeUpdateStream(broker.settings, dispatcher.on_trade_update, on_connect=dispatcher.request_reconcile)
    stream.start()
    return stream.stop


def build_market(broker: Broker):
    """Option chains and quotes: Alpaca's data API with the Alpaca broker, the simulated market with the simulated one."""
    from services.adapters.option_data import OptionData

    if isinstance(broker, SimBroker):
        from services.adapters.sim.market import SimOptionMarket

        return OptionData(SimOptionMarket(broker.pool).chain, remote=False), broker.quote
    from services.adapters.alpaca.client import AlpacaMarketData

    market = AlpacaMarketData(broker.settings, trading_client=broker.trading_client)

    def quote(symbol: str, instrument: str, now: datetime) -> Quote | None:
        # Stocks go at market by default; a stock limit order with no quote source is given up
        # at its re-pricing time rather than re-priced blind.
        if instrument != "OPTION":
            return None
        found = market.option_quotes([symbol]).get(symbol)
        return Quote(found.bid, found.ask) if found is not None else None

    option_data = OptionData(lambda ticker, spot, now, window: market.option_chain(
        ticker, expiration_gte=window[0] if window else None, expiration_lte=window[1] if window else None))
    return option_data, quote


def option_quotes_source(broker: Broker):
    """The held option contracts' quotes, for the position manager's marks: one request for all of them."""
    if isinstance(broker, SimBroker):
        return lambda symbols, now: {s: broker.quote(s, "OPTION", now) for s in symbols}
    from services.adapters.alpaca.client import AlpacaMarketData

    market = AlpacaMarketData(broker.settings, trading_client=broker.trading_client)

    # The snapshots carry their own quote time: an option whose quote stopped is judged stale.
    return lambda symbols, now: market.option_quotes(list(symbols))

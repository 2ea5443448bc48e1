"""The position manager: every minute, mark the open positions, judge them by the exit rules, and
write an EXIT recommendation for each one a rule closes.

One cycle for one account:
1. gather, in one round trip, the OPEN positions with the newest bar of what each holds (the
   stock's bar; for an option its quote, asked for all held contracts at once, marked at mid);
2. decide with the pure rules (services/domain/exits.py): the first rule that fires, or the
   kill switch's flatten when the switch says so (a daily-loss trip under the `flatten` policy,
   an operator's `halt --flatten`);
3. write, in one transaction: the marks (price, high-water mark, staleness: a restart keeps the
   trailing stop where it was), and one EXIT per closing position with every rule's result in
   its reason, then NOTIFY the dispatchers. At most one exit per position is live at a time
   (migration 012), so two managers, or a manager and a flatten, never write two.

Exits are written only while the market is open (the dispatcher's market-closed gate would
refuse them) and not while the account is HALTED without a flatten (the kill switch would).
A position whose data is stale is not judged on its prices: it is flagged once (logged, and
`stale_since` set) and closed by the end-of-day rule at the latest.
"""

from __future__ import annotations

import argparse
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from functools import lru_cache
from decimal import Decimal
from typing import Any

import psycopg

from services.adapters import alerts
from services.adapters.postgres import exits_repo, kill_switch
from services.common.market_calendar import CalendarUnavailable, SessionCalendar
from services.common.numbers import to_decimal
from services.common.params import ParamsInForce
from services.domain.exits import BAR_SECONDS, ExitRules, next_high_water_mark
from services.domain.market_data import parse_occ_symbol
from services.domain.order_pricing import Quote

log = logging.getLogger("position_manager")

# Option marks: the held contracts' quotes, all in one request where the source allows it.
# Each quote has bid and ask (a Quote, or an OptionQuote with its quote_time).
OptionQuotes = Callable[[Sequence[str], datetime], Mapping[str, Any]]


@dataclass(frozen=True)
class PositionExit:
    position_id: int
    ticker: str
    code: str
    reason: str
    recommendation_id: int | None  # None: an exit for it was already live (another writer's)


@dataclass
class PositionCycle:
    account_id: str
    now: datetime
    evaluated: int = 0
    exits: list[PositionExit] = field(default_factory=list)
    flags: list[tuple[int, str, str]] = field(default_factory=list)  # (position id, ticker, reason)
    held_back: str | None = None  # why no exit was written this cycle (market closed, halted)

    @property
    def counts(self) -> dict[str, int]:
        return {"evaluated": self.evaluated, "exits": sum(1 for e in self.exits if e.recommendation_id),
                "flags": len(self.flags)}


def _mid(quote: Quote | None) -> Decimal | None:
    if quote is None:
        return None
    bid, ask = to_decimal(quote.bid), to_decimal(quote.ask)
    if bid is None or ask is None or not (bid.is_finite() and ask.is_finite()) or bid <= 0 or ask < bid:
        return None  # no two-sided market: the position is not marked (and is flagged stale)
    return (bid + ask) / 2


def _option_bars(rows: Sequence[exits_repo.OpenPosition], option_quotes: OptionQuotes | None,
                 now: datetime) -> dict[str, tuple[datetime, Decimal] | None]:
    """Each held contract's quote at mid as a bar (ts, close), or None when it has no two-sided market."""
    symbols = [r.symbol for r in rows if r.instrument == "OPTION"]
    if not symbols:
        return {}
    quotes: Mapping[str, Quote | None] = {}
    if option_quotes is not None:
        try:
            quotes = option_quotes(symbols, now)
        except Exception as e:  # an outage: the options are unmarked this minute, flagged stale
            log.warning("option quotes unavailable", extra={"symbols": len(symbols), "error": str(e)})
    bars: dict[str, tuple[datetime, Decimal] | None] = {}
    for symbol in symbols:
        quote = quotes.get(symbol)
        mid = _mid(quote)
        # As a bar, the quote covers the minute that ends at its own time (a snapshot's
        # quote_time), or now for a source that quotes the present.
        at = getattr(quote, "quote_time", None) or now
        bars[symbol] = (at - timedelta(seconds=BAR_SECONDS), mid) if mid is not None else None
    return bars


@lru_cache(maxsize=4096)
def _expiration(symbol: str) -> date | None:
    try:
        return parse_occ_symbol(symbol).expiration
    except ValueError:
        return None  # the rules flag it: an option whose last day cannot be known


def run_position_cycle(
    conn: psycopg.Connection,
    account_id: str,
    in_force: ParamsInForce,
    now: datetime,
    calendar: SessionCalendar,
    option_quotes: OptionQuotes | None = None,
) -> PositionCycle:
    params = in_force.params
    result = PositionCycle(account_id, now)
    rows = exits_repo.open_positions(conn, account_id, now)
    switch_row = kill_switch.read_state(conn, account_id)
    try:
        session_day = calendar.current_or_previous_session(now).day
        market_open = calendar.is_open(now)
    except CalendarUnavailable as e:
        session_day, market_open = None, False
        result.held_back = f"CALENDAR_UNAVAILABLE: {e}"
    state, flatten_code = kill_switch.in_force(switch_row, session_day, params.risk.on_daily_loss)
    if result.held_back is None and not market_open:
        result.held_back = "MARKET_CLOSED: exits are written while the market is open"
    elif state == "HALTED" and flatten_code is None:
        result.held_back = "KILL_SWITCH_HALTED: a halted account sends no exit but the operator's flatten"

    option_bars = _option_bars(rows, option_quotes, now)
    rules = ExitRules(params, now, calendar)  # one pass: the calendar's lookups made once, not per position
    marks: list[exits_repo.Mark] = []
    to_exit: list[dict[str, Any]] = []
    decided: dict[int, tuple[exits_repo.OpenPosition, str, str]] = {}
    for row in rows:
        if row.instrument == "OPTION":
            bar = option_bars.get(row.symbol)
            bar_ts, close = bar if bar is not None else (None, None)
            expiration = _expiration(row.symbol)
        else:
            bar_ts, close, expiration = row.bar_ts, row.bar_close, None
        if flatten_code is None:
            # Most positions hold with nothing to say: marked without building every rule's text.
            mark = rules.quick_hold(row.instrument, row.side, row.strategy, row.avg_price, row.opened_at, expiration,
                                    row.high_water_mark, bar_ts, close)
            if mark is not None:
                if close != row.market_price or mark != row.high_water_mark or row.stale_since is not None:
                    marks.append(exits_repo.Mark(row.id, close, mark, False))
                continue
        bar = {"ts": bar_ts, "close": close} if bar_ts is not None else None
        held = row._asdict()
        if row.instrument == "OPTION":
            held["expiration"] = expiration
        evaluation = rules.evaluate(held, bar)
        stale = evaluation.stale
        if bar is not None and not stale:
            marks.append(exits_repo.Mark(row.id, close, _high_water(evaluation.held or held, bar), False))
        elif row.stale_since is None:
            marks.append(exits_repo.Mark(row.id, None, None, True))
        for named in evaluation.flags:
            result.flags.append((row.id, row.ticker, named.result.reason))
            if named.result.code == "STALE_DATA" and row.stale_since is not None:
                continue  # flagged when it went stale; said again only when it changes
            log.warning("position flagged", extra={"account_id": account_id, "position_id": row.id,
                                                   "ticker": row.ticker, "flag": named.result.reason})
            if named.result.code == "STALE_DATA":
                # Not judged on its prices until its data returns; the end-of-day rule closes it at the latest.
                alerts.emit(alerts.Event.DATA_STALE, f"{account_id}:position:{row.id}", ticker=row.ticker,
                            symbol=row.symbol, reason=named.result.reason)
        if flatten_code is not None:
            code, reason = flatten_code, f"{flatten_code}: kill switch {state}: {switch_row['reason']}"
        elif evaluation.decision is not None:
            code, reason = evaluation.decision.code, evaluation.decision.reason
        else:
            continue
        if row.exit_live or result.held_back is not None:
            result.exits.append(PositionExit(row.id, row.ticker, code, reason, None))
            continue
        decided[row.id] = (row, code, reason)
        to_exit.append({"position_id": row.id, "code": code, "reason": {
            "source": "position-manager", "exit": {"code": code, "reason": reason},
            "rules": [n.as_json() for n in evaluation.results],
            "params": {"source": in_force.source, "version": in_force.version, "hash": in_force.content_hash},
        }})
    result.evaluated = len(rows)

    inserted: dict[int, int] = {}
    if marks or to_exit:  # a minute whose marks are as stored and that closes nothing writes nothing
        with conn.transaction():
            exits_repo.save_marks(conn, account_id, marks, now)
            inserted = {r["position_id"]: r["id"] for r in exits_repo.insert_exits(conn, account_id, to_exit, now)}
    for position_id, (row, code, reason) in decided.items():
        rec_id = inserted.get(position_id)
        result.exits.append(PositionExit(position_id, row.ticker, code, reason, rec_id))
        if rec_id is not None:
            log.warning("exit", extra={"account_id": account_id, "position_id": position_id, "ticker": row.ticker,
                                       "code": code, "reason": reason, "recommendation_id": rec_id})
    log.info("position cycle", extra={"account_id": account_id, "now": now, **result.counts,
                                      "held_back": result.held_back})
    return result


def _high_water(held: Any, bar: dict) -> Decimal | None:
    try:
        return next_high_water_mark(held, bar)
    except ValueError:
        return None  # an unreadable position (flagged BAD_POSITION): its mark is left as it was


# --- the loop and the command line -------------------------------------------------------------


def run_loop(conninfo: str, account_id: str, provider, calendar: SessionCalendar, *, interval: float = 60.0,
             once: bool = False, stop: threading.Event | None = None, clock=None,
             option_quotes: OptionQuotes | None = None) -> int:
    """Run a cycle every `interval` seconds with the params the provider has in force."""
    from services.common.clock import SystemClock
    from services.common.params import ParamsError
    from services.runtime import run_periodic

    clock = clock or SystemClock()
    return run_periodic("position-manager", conninfo,
                        lambda conn: run_position_cycle(conn, account_id, provider.current(), clock.now(), calendar,
                                                        option_quotes),
                        interval=interval, once=once, stop=stop, retry_on=(ParamsError,),
                        health_checks={"params": provider, "account_id": account_id})


def run_command(args: argparse.Namespace) -> int:
    from services.common.clock import SystemClock
    from services.common.db import make_pool
    from services.common.market_calendar import nyse_calendar
    from services.dispatcher.wiring import build_broker, option_quotes_source
    from services.runtime import bootstrap, stop_on_sigterm

    _, account_id, url, provider = bootstrap(args.account)
    pool = make_pool(url, min_size=1, max_size=1, application_name="ops-position-manager", check=False)
    try:
        broker = build_broker(pool, account_id, SystemClock(), provider.current())
        log.info("position manager starting", extra={"account_id": account_id, "interval": args.interval})
        return run_loop(url, account_id, provider, nyse_calendar(), interval=args.interval, once=args.once,
                        stop=stop_on_sigterm(), option_quotes=option_quotes_source(broker))
    finally:
        pool.close()

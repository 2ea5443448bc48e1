"""Pre-trade gates: pure functions over inputs gathered beforehand, with `now` passed in.

Each gate returns a GateResult, a 4-tuple (passed, reason, observed, limit) as in the seed.
The reason starts with a code (`MAX_EXPOSURE: notional=10450.00 limit=10000.00`); a pass has
the code OK. Missing or malformed inputs deny with their own code (NO_ACCOUNT_STATE, NO_BAR,
BAD_BAR, ...): a gate never passes on data it does not have.

Times written by other machines (a recommendation's created_at and bar_ts, a bar's or the
features' ts, an option quote's time) are not trusted blindly: one further ahead of `now` than
`max_clock_skew_seconds` is denied as FUTURE_DATED, since its age would come out negative and
pass every staleness limit.

`evaluate_all_gates` runs every gate, keeps every result, and turns an exception inside a
gate into a denial (GATE_ERROR), so one bad field cannot crash the dispatcher's loop.

`config` is the typed TradingParams or a seed-style mapping of flat keys (see `as_params`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, NamedTuple

from services.common.market_calendar import ET, CalendarUnavailable, SessionCalendar, nyse_calendar
from services.common.params import TradingParams, as_params
from services.common.numbers import to_decimal
from services.domain.sizing import notional, size_order

BAR_SECONDS = 60
ENTRY_ACTIONS = frozenset({"BUY", "SELL"})
ACTIONS = ENTRY_ACTIONS | {"EXIT"}
INSTRUMENTS = frozenset({"STOCK", "OPTION"})
KILL_SWITCH_STATES = frozenset({"ACTIVE", "REDUCING", "HALTED"})


class GateResult(NamedTuple):
    passed: bool
    reason: str
    observed: Any
    limit: Any

    @property
    def code(self) -> str:
        return self.reason.split(":", 1)[0]


def ok(detail: str, observed: Any, limit: Any) -> GateResult:
    """A pass: reason `OK: detail`."""
    return GateResult(True, f"OK: {detail}", observed, limit)


def deny(code: str, detail: str, observed: Any, limit: Any) -> GateResult:
    """A denial: reason `CODE: detail`."""
    return GateResult(False, f"{code}: {detail}", observed, limit)


def _field(obj: Any, name: str, default: Any = None) -> Any:
    if obj is None:
        return default
    if type(obj) is dict:  # the usual case, without the ABC check below (~1/10 of the gates' time)
        return obj.get(name, default)
    if isinstance(obj, Mapping):
        return obj.get(name, default)
    return getattr(obj, name, default)


def _has_field(obj: Any, name: str) -> bool:
    if obj is None:
        return False
    if type(obj) is dict or isinstance(obj, Mapping):
        return name in obj
    return hasattr(obj, name)


def _aware(value: Any) -> datetime | None:
    if isinstance(value, datetime) and value.tzinfo is not None:
        return value
    return None


def aware_now(now: datetime | None) -> datetime:
    """`now` as given (it must be aware), or the wall clock."""
    if now is None:
        from services.common.clock import SystemClock

        return SystemClock().now()
    if now.tzinfo is None:
        raise ValueError("naive datetime: gates need an aware `now`")
    return now


def check_not_future_dated(what: str, ts: datetime, now: datetime, config: TradingParams | Mapping) -> GateResult:
    """Deny an aware time `ts` that lies more than max_clock_skew_seconds after `now`.

    Observed is the lead in seconds (ts - now), the limit the tolerance; exactly the
    tolerance passes. `what` names the time in the reason (created_at, bar_ts, quote_time).
    """
    limit = as_params(config).risk.max_clock_skew_seconds
    lead = (ts - now).total_seconds()
    detail = f"{what}={ts.isoformat()} lead={lead:.3f}s limit={limit}s"
    if lead > limit:
        return deny("FUTURE_DATED", detail, lead, limit)
    return ok(detail, lead, limit)


def _future_dated(what: str, ts: datetime, now: datetime, config: TradingParams | Mapping) -> GateResult | None:
    result = check_not_future_dated(what, ts, now, config)
    return None if result.passed else result


# --- The seed's account kill switches ---------------------------------------------------------


def daily_pnl(account_state: Any) -> Decimal | None:
    """The day's P&L as Alpaca reports it: equity - last_equity (realized + unrealized).

    An explicit `daily_pnl` field wins. None when the inputs are missing or not finite.
    """
    explicit = _field(account_state, "daily_pnl")
    if explicit is not None:
        return to_decimal(explicit)
    equity = to_decimal(_field(account_state, "equity"))
    last_equity = to_decimal(_field(account_state, "last_equity"))
    if equity is None or last_equity is None:
        return None
    return equity - last_equity


def check_daily_loss_limit(
    account_state: Any, config: TradingParams | Mapping, now: datetime | None = None
) -> GateResult:
    """Deny when the day's loss reaches max_daily_loss, or when the account state is missing or stale."""
    params = as_params(config)
    limit = params.risk.max_daily_loss
    if account_state is None:
        return deny("NO_ACCOUNT_STATE", "no account state to compute the daily P&L", None, limit)
    pnl = daily_pnl(account_state)
    if pnl is None:
        return deny("NO_ACCOUNT_STATE", "equity/last_equity missing or not finite", None, limit)
    as_of = _aware(_field(account_state, "as_of"))
    if now is not None and _field(account_state, "as_of") is not None:
        max_age = params.risk.max_account_state_age_seconds
        if as_of is None:
            return deny("NO_ACCOUNT_STATE", "account state has no aware as_of time", None, limit)
        age = (now - as_of).total_seconds()
        if age > max_age:
            return deny("STALE_ACCOUNT_STATE", f"age={age:.0f}s limit={max_age}s", age, max_age)
    loss = -pnl if pnl < 0 else Decimal(0)
    if loss >= limit:
        return deny("DAILY_LOSS_LIMIT", f"loss={loss:.2f} limit={limit:.2f}", loss, limit)
    return ok(f"loss={loss:.2f} limit={limit:.2f}", loss, limit)


def check_broker_reconciliation(account_state: Any, now: datetime | None, config: TradingParams | Mapping) -> GateResult:
    """Deny entries when the broker's orders have not been compared with ours recently.

    Orders at the broker that this database does not know are exposure no other gate sees; a
    comparison that keeps failing must stop entries, as a stale account state does. A caller
    that supplies no `orders_reconciled_at` at all (the seed's account dicts) is not judged.
    """
    params = as_params(config)
    limit = params.risk.max_reconciliation_age_seconds
    if not _has_field(account_state, "orders_reconciled_at"):
        return ok("OK: not evaluated: no reconciliation time supplied", None, limit)
    reconciled_at = _aware(_field(account_state, "orders_reconciled_at"))
    if reconciled_at is None:
        return deny("NO_RECONCILIATION", "the broker's orders have not been compared with ours yet", None, limit)
    age = (aware_now(now) - reconciled_at).total_seconds()
    if age > limit:
        return deny("STALE_RECONCILIATION", f"age={age:.0f}s limit={limit}s", age, limit)
    return ok(f"age={age:.0f}s limit={limit}s", age, limit)


def check_max_positions(active_positions_count: Any, config: TradingParams | Mapping, proposed: int = 1) -> GateResult:
    """Deny unless current open positions + the proposed one <= max_open_positions."""
    limit = as_params(config).risk.max_open_positions
    if not isinstance(active_positions_count, int) or isinstance(active_positions_count, bool) or active_positions_count < 0:
        return deny("NO_POSITION_COUNT", f"count={active_positions_count!r} is not a count", active_positions_count, limit)
    total = active_positions_count + proposed
    if total > limit:
        return deny("MAX_POSITIONS", f"open={active_positions_count} proposed={proposed} limit={limit}", total, limit)
    return ok(f"open={active_positions_count} proposed={proposed} limit={limit}", total, limit)


def check_max_exposure(
    total_notional: Any, config: TradingParams | Mapping, proposed_notional: Any = Decimal(0)
) -> GateResult:
    """Deny unless current notional + the proposed order's notional <= max_notional_exposure."""
    limit = as_params(config).risk.max_notional_exposure
    current = to_decimal(total_notional)
    proposed = to_decimal(proposed_notional)
    if current is None or current < 0:
        return deny("NO_EXPOSURE", f"notional={total_notional!r} is not a notional", None, limit)
    if proposed is None or proposed < 0:
        return deny("NO_EXPOSURE", f"proposed={proposed_notional!r} is not a notional", None, limit)
    total = current + proposed
    detail = f"notional={total:.2f} (current={current:.2f} proposed={proposed:.2f}) limit={limit:.2f}"
    if total > limit:
        return deny("MAX_EXPOSURE", detail, total, limit)
    return ok(detail, total, limit)


def check_trading_hours(
    config: TradingParams | Mapping, now: datetime | None = None, calendar: SessionCalendar | None = None
) -> GateResult:
    """Deny outside NYSE sessions and in the blocked windows after the open and before the close.

    Sessions (holidays, early closes) come from the exchange calendar; the windows are
    [open, open + block_after_open) and [close - block_before_close, close).
    """
    hours = as_params(config).trading_hours
    now = aware_now(now)
    et_now = now.astimezone(ET)
    observed = et_now.strftime("%Y-%m-%d %H:%M:%S ET")
    try:
        session = (calendar or nyse_calendar()).session_at(now)
    except CalendarUnavailable as e:
        return deny("CALENDAR_UNAVAILABLE", str(e), observed, None)
    if session is None:
        return deny("MARKET_CLOSED", f"{et_now:%Y-%m-%d} ({et_now:%A}) is not a trading day", observed, None)
    first_ok = session.open + timedelta(minutes=hours.block_after_open_minutes)
    last_ok = session.close - timedelta(minutes=hours.block_before_close_minutes)
    window = f"{first_ok.astimezone(ET):%H:%M}-{last_ok.astimezone(ET):%H:%M} ET"
    if now < session.open or now >= session.close:
        return deny("MARKET_CLOSED", f"now={et_now:%H:%M} session={session.open.astimezone(ET):%H:%M}-{session.close.astimezone(ET):%H:%M} ET", observed, window)
    if now < first_ok:
        return deny("OPENING_BLOCK", f"now={et_now:%H:%M:%S} first_entry={first_ok.astimezone(ET):%H:%M} ET", observed, window)
    if now >= last_ok:
        return deny("CLOSING_BLOCK", f"now={et_now:%H:%M:%S} last_entry_before={last_ok.astimezone(ET):%H:%M} ET", observed, window)
    return ok(f"now={et_now:%H:%M} window={window}", observed, window)


def check_market_open_for_exit(
    config: TradingParams | Mapping, now: datetime | None = None, calendar: SessionCalendar | None = None
) -> GateResult:
    """An exit may go out in the blocked windows (it reduces risk) but not while the market is closed."""
    result = check_trading_hours(config, now, calendar)
    if result.code in ("OPENING_BLOCK", "CLOSING_BLOCK"):
        return ok(f"exit allowed in the blocked window ({result.reason})", result.observed, result.limit)
    return result


# --- Gates on the recommendation, its data and the ticker ------------------------------------


# The exit reason of the flatten an operator asks for (`halt --flatten`, `flatten`): the one
# kind of order a HALTED account lets out.
OPERATOR_FLATTEN = "OPERATOR_FLATTEN"


def check_kill_switch(state: Any, action: Any, exit_reason: Any = None, flatten: bool = False) -> GateResult:
    """ACTIVE passes; REDUCING passes only risk-reducing orders (EXIT); HALTED passes nothing
    but the exits of a flatten the operator asked for: an exit with reason OPERATOR_FLATTEN, and
    while the halt itself asked to flatten (`halt --flatten`), every exit (a rule's exit already
    working is then re-priced and finished, not frozen)."""
    if state not in KILL_SWITCH_STATES:
        return deny("NO_KILL_SWITCH_STATE", f"state={state!r}", state, "ACTIVE")
    if state == "HALTED":
        if action == "EXIT" and (exit_reason == OPERATOR_FLATTEN or flatten is True):
            return ok("state=HALTED: the operator's flatten goes out", state, "ACTIVE")
        return deny("KILL_SWITCH_HALTED", "account halted by operator", state, "ACTIVE")
    if state == "REDUCING" and action != "EXIT":
        return deny("KILL_SWITCH_REDUCING", f"only risk-reducing orders; action={action}", state, "ACTIVE")
    return ok(f"state={state}", state, "ACTIVE")


def check_action_allowed(action: Any, instrument: Any, config: TradingParams | Mapping) -> GateResult:
    params = as_params(config)
    if action not in ACTIONS:
        return deny("UNKNOWN_ACTION", f"action={action!r}", action, sorted(ACTIONS))
    if action == "SELL" and instrument == "STOCK" and not params.instruments.allow_short:
        return deny("SHORT_NOT_ALLOWED", "a bearish stock entry is a short sale; allow_short=false", action, "allow_short")
    return ok(f"action={action}", action, sorted(ACTIONS))


def check_instrument_allowed(instrument: Any, config: TradingParams | Mapping) -> GateResult:
    allowed = list(as_params(config).instruments.allowed_instruments)
    if instrument not in INSTRUMENTS:
        return deny("UNKNOWN_INSTRUMENT", f"instrument={instrument!r}", instrument, allowed)
    if instrument not in allowed:
        return deny("INSTRUMENT_NOT_ALLOWED", f"instrument={instrument} allowed={','.join(allowed)}", instrument, allowed)
    return ok(f"instrument={instrument}", instrument, allowed)


def check_confidence(confidence: Any, strategy: Any, config: TradingParams | Mapping) -> GateResult:
    thresholds = as_params(config).confidence
    limits = {"day_trade": thresholds.min_confidence_day_trade, "swing_trade": thresholds.min_confidence_swing_trade}
    if strategy not in limits:
        return deny("UNKNOWN_STRATEGY", f"strategy={strategy!r}", strategy, sorted(limits))
    limit = limits[strategy]
    value = to_decimal(confidence)
    if value is None or not 0 <= value <= 1:
        return deny("BAD_CONFIDENCE", f"confidence={confidence!r}", confidence, limit)
    if float(value) < limit:
        return deny("LOW_CONFIDENCE", f"confidence={value} min={limit} strategy={strategy}", float(value), limit)
    return ok(f"confidence={value} min={limit} strategy={strategy}", float(value), limit)


def check_recommendation_age(
    created_at: Any, now: datetime, config: TradingParams | Mapping, bar_ts: Any = None
) -> GateResult:
    """Deny a recommendation older than max_recommendation_age_seconds, or dated in the future.

    Both its own times come from the machine that wrote it: created_at, and bar_ts (the bar
    its signal was computed from) when it has one.
    """
    params = as_params(config)
    limit = params.risk.max_recommendation_age_seconds
    created = _aware(created_at)
    if created is None:
        return deny("BAD_RECOMMENDATION", f"created_at={created_at!r} is not an aware time", None, limit)
    signal_bar = _aware(bar_ts)
    if bar_ts is not None and signal_bar is None:
        return deny("BAD_RECOMMENDATION", f"bar_ts={bar_ts!r} is not an aware time", None, limit)
    for what, ts in (("created_at", created), ("bar_ts", signal_bar)):
        if ts is not None and (future := _future_dated(what, ts, now, params)):
            return future
    age = (now - created).total_seconds()
    if age > limit:
        return deny("STALE_RECOMMENDATION", f"age={age:.0f}s limit={limit}s", age, limit)
    return ok(f"age={age:.0f}s limit={limit}s", age, limit)


def bar_problem(bar: Any) -> str | None:
    """Why a bar cannot be used, or None: missing prices, NaN, non-positive, high below low."""
    prices = {k: to_decimal(_field(bar, k)) for k in ("open", "high", "low", "close")}
    bad = [k for k, v in prices.items() if v is None or v <= 0]
    if bad:
        return f"non-positive or missing {','.join(bad)}"
    if prices["high"] < prices["low"]:
        return f"high={prices['high']} below low={prices['low']}"
    return None


def check_bar_freshness(bar: Any, now: datetime, config: TradingParams | Mapping) -> GateResult:
    """The bar covers [ts, ts + 60 s): its age is measured from its end, not from when it was stored."""
    params = as_params(config)
    limit = params.risk.max_bar_age_seconds
    if bar is None:
        return deny("NO_BAR", "no bar for the ticker", None, limit)
    ts = _aware(_field(bar, "ts"))
    if ts is None:
        return deny("BAD_BAR", f"ts={_field(bar, 'ts')!r} is not an aware time", None, limit)
    problem = bar_problem(bar)
    if problem:
        return deny("BAD_BAR", problem, None, limit)
    # A bar still forming began before now; one that begins later than the tolerance is not data yet.
    if future := _future_dated("bar_ts", ts, now, params):
        return future
    age = (now - (ts + timedelta(seconds=BAR_SECONDS))).total_seconds()
    if age > limit:
        return deny("STALE_BAR", f"age={age:.0f}s limit={limit}s bar={ts.isoformat()}", age, limit)
    return ok(f"age={age:.0f}s limit={limit}s", age, limit)


def check_feature_freshness(features: Any, now: datetime, config: TradingParams | Mapping) -> GateResult:
    """Features are as old as the latest bar they were computed from (`ts`), not their computed_at."""
    params = as_params(config)
    limit = params.risk.max_feature_age_seconds
    if features is None:
        return deny("NO_FEATURES", "no features for the ticker", None, limit)
    ts = _aware(_field(features, "ts"))
    if ts is None:
        return deny("BAD_FEATURES", f"ts={_field(features, 'ts')!r} is not an aware time", None, limit)
    if future := _future_dated("features_ts", ts, now, params):
        return future
    age = (now - (ts + timedelta(seconds=BAR_SECONDS))).total_seconds()
    if age > limit:
        return deny("STALE_FEATURES", f"age={age:.0f}s limit={limit}s", age, limit)
    return ok(f"age={age:.0f}s limit={limit}s", age, limit)


def check_ticker_trades_today(ticker_count_today: Any, config: TradingParams | Mapping) -> GateResult:
    limit = as_params(config).risk.max_trades_per_ticker_per_day
    if not isinstance(ticker_count_today, int) or isinstance(ticker_count_today, bool) or ticker_count_today < 0:
        return deny("NO_TRADE_COUNT", f"count={ticker_count_today!r}", None, limit)
    if ticker_count_today >= limit:
        return deny("TICKER_DAILY_TRADES", f"trades_today={ticker_count_today} limit={limit}", ticker_count_today, limit)
    return ok(f"trades_today={ticker_count_today} limit={limit}", ticker_count_today, limit)


def check_ticker_cooldown(last_trade_time: Any, now: datetime, config: TradingParams | Mapping) -> GateResult:
    minutes = as_params(config).risk.ticker_cooldown_minutes
    limit = minutes * 60
    if last_trade_time is None:
        return ok("no previous trade", None, limit)
    last = _aware(last_trade_time)
    if last is None:
        return deny("BAD_LAST_TRADE_TIME", f"last_trade_time={last_trade_time!r}", None, limit)
    since = (now - last).total_seconds()
    if since < limit:
        return deny("TICKER_COOLDOWN", f"since_last={since:.0f}s cooldown={limit}s", since, limit)
    return ok(f"since_last={since:.0f}s cooldown={limit}s", since, limit)


def check_no_open_position(has_open_position: Any, action: Any) -> GateResult:
    """An entry needs no live position in the ticker; an EXIT needs one."""
    if not isinstance(has_open_position, bool):
        return deny("NO_POSITION_STATE", f"has_open_position={has_open_position!r}", None, None)
    if action == "EXIT":
        if not has_open_position:
            return deny("NO_POSITION_TO_EXIT", "no open position in the ticker", False, True)
        return ok("open position to exit", True, True)
    if has_open_position:
        return deny("POSITION_ALREADY_OPEN", "the ticker already has a live position", True, False)
    return ok("no open position", False, False)


# --- The asset: is the ticker a US equity the broker trades? ------------------------------------

# US equity tickers as Alpaca writes them: upper-case ASCII letters, optionally a share-class
# suffix after a dot (BRK.B, BF.B). Nothing else reaches the broker, not even as a URL path.
SYMBOL_PATTERN = r"[A-Z]{1,6}(\.[A-Z]{1,2})?"
_SYMBOL = re.compile(SYMBOL_PATTERN)
SYMBOL_MAX_LENGTH = 9


@dataclass(frozen=True)
class AssetUnavailable:
    """The broker's asset record could not be had (the lookup failed, or none was made).

    Distinct from None, which means the broker answered that it has no such asset.
    """

    reason: str


ASSET_NOT_GATHERED = AssetUnavailable("no asset record was gathered")


def symbol_problem(symbol: Any) -> str | None:
    """Why `symbol` is not a US equity ticker as Alpaca writes it, or None."""
    if not isinstance(symbol, str):
        return f"symbol={symbol!r} is not a string"
    if len(symbol) > SYMBOL_MAX_LENGTH:
        return f"symbol={symbol[:20]!r}{'...' if len(symbol) > 20 else ''} longer than {SYMBOL_MAX_LENGTH}"
    if not _SYMBOL.fullmatch(symbol):
        return f"symbol={symbol!r} is not upper-case letters with an optional .CLASS suffix"
    return None


def check_asset(symbol: Any, asset: Any, action: Any, instrument: Any, qty: Any = None) -> GateResult:
    """The ticker is well-formed and the broker trades it: active, tradable, shortable for a short sale.

    `asset` is the broker's record (symbol, status, tradable, shortable, easy_to_borrow,
    fractionable, asset_class), None when the broker has no such asset, or AssetUnavailable
    when the record could not be had: entries then fail closed (NO_ASSET).

    A malformed symbol is refused always. An EXIT closes a position we hold: a halted or
    delisted stock still needs closing, so the record's verdict is kept in the reason but
    does not block it.
    """
    problem = symbol_problem(symbol)
    if problem:
        return deny("BAD_SYMBOL", problem, (symbol if isinstance(symbol, str) else repr(symbol))[:40], SYMBOL_PATTERN)
    result = _asset_record_check(symbol, asset, action, instrument, qty)
    if action == "EXIT" and not result.passed:
        return ok(f"an exit is not blocked by the asset record ({result.reason})", result.observed, result.limit)
    return result


def _asset_record_check(symbol: str, asset: Any, action: Any, instrument: Any, qty: Any) -> GateResult:
    if isinstance(asset, AssetUnavailable):
        return deny("NO_ASSET", f"{symbol}: {asset.reason}", None, "active")
    if asset is None:
        return deny("NO_ASSET", f"the broker has no asset {symbol}", None, "active")
    if _field(asset, "symbol") != symbol:
        return deny("NO_ASSET", f"record is for {_field(asset, 'symbol')!r}, not {symbol}", _field(asset, "symbol"), symbol)
    asset_class = _field(asset, "asset_class")
    if asset_class != "us_equity":
        return deny("NOT_US_EQUITY", f"{symbol} asset_class={asset_class}", asset_class, "us_equity")
    status = _field(asset, "status")
    if status != "active":
        return deny("ASSET_INACTIVE", f"{symbol} status={status}", status, "active")
    if _field(asset, "tradable") is not True:
        return deny("ASSET_NOT_TRADABLE", f"{symbol} tradable={_field(asset, 'tradable')}", _field(asset, "tradable"), True)
    if action == "SELL" and instrument == "STOCK":
        # A bearish stock entry is a short sale; Alpaca opens shorts only in easy-to-borrow names.
        shortable, etb = _field(asset, "shortable"), _field(asset, "easy_to_borrow")
        if shortable is not True or etb is not True:
            return deny("NOT_SHORTABLE", f"{symbol} shortable={shortable} easy_to_borrow={etb}", shortable and etb, True)
    units = to_decimal(qty)
    if instrument == "STOCK" and units is not None and units != units.to_integral_value():
        fractionable = _field(asset, "fractionable")
        if fractionable is not True:
            return deny("NOT_FRACTIONABLE", f"{symbol} qty={units} fractionable={fractionable}", units, "whole shares")
    return ok(f"{symbol} active tradable {asset_class}", status, "active")


# --- All gates ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProposedOrder:
    """The order under consideration: its size and price decide the exposure it adds."""

    instrument: str
    qty: int
    price: Decimal

    @property
    def notional(self) -> Decimal:
        return notional(self.qty, self.price, self.instrument)


@dataclass(frozen=True)
class NamedGate:
    name: str
    result: GateResult

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "passed": self.result.passed,
            "code": self.result.code,
            "reason": self.result.reason,
            "observed": _jsonable(self.result.observed),
            "limit": _jsonable(self.result.limit),
        }


_PLAIN = (str, int, bool, type(None))


def _jsonable(value: Any) -> Any:
    if type(value) in _PLAIN:
        return value
    if isinstance(value, Decimal):
        return float(value) if value.is_finite() else str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    return value


_RISK_REDUCING_NA = "OK: not applicable to a risk-reducing EXIT"


def evaluate_all_gates(
    recommendation: Any,
    bar: Any,
    features: Any,
    ticker_count_today: Any,
    last_trade_time: Any,
    has_open_position: Any,
    config: TradingParams | Mapping,
    *,
    now: datetime | None = None,
    account_state: Any = None,
    kill_switch_state: Any = "ACTIVE",
    kill_switch_flatten: bool = False,
    open_positions_count: Any = 0,
    total_notional: Any = Decimal(0),
    proposed_order: ProposedOrder | None = None,
    calendar: SessionCalendar | None = None,
    asset: Any = ASSET_NOT_GATHERED,
) -> tuple[bool, list[NamedGate]]:
    """Run every gate; return (all passed, every result in a fixed order).

    The exposure gate counts `proposed_order`; without one, a stock order is sized from the
    bar's close and the account's equity, as the dispatcher would size it. A size of zero is a
    denial (SIZE_ZERO). An EXIT reduces risk: the entry-only gates report "not applicable".
    `asset` is the broker's record of the ticker (see `check_asset`); without one, entries are
    denied (NO_ASSET).
    """
    params = as_params(config)
    now = aware_now(now)
    action = _field(recommendation, "action")
    instrument = _field(recommendation, "instrument")
    is_exit = action == "EXIT"

    def run(name: str, fn, *args) -> NamedGate:
        try:
            result = fn(*args)
        except (ArithmeticError, TypeError, ValueError, KeyError, AttributeError, CalendarUnavailable) as e:
            result = deny("GATE_ERROR", f"{name}: {type(e).__name__}: {e}", None, None)
        return NamedGate(name, result)

    def entry_only(name: str, fn, *args) -> NamedGate:
        if is_exit:
            return NamedGate(name, GateResult(True, _RISK_REDUCING_NA, None, None))
        return run(name, fn, *args)

    def exit_informed(name: str, fn, *args) -> NamedGate:
        # A stale or unusable bar stops an entry; an exit still goes (it is sized from the
        # position, and a position whose data stopped is the one to close), with the finding kept.
        gate = run(name, fn, *args)
        if is_exit and not gate.result.passed:
            return NamedGate(name, GateResult(True, f"{_RISK_REDUCING_NA}: {gate.result.reason}",
                                              gate.result.observed, gate.result.limit))
        return gate

    gates = [
        run("kill_switch", check_kill_switch, kill_switch_state, action, _field(recommendation, "exit_reason"),
            kill_switch_flatten),
        run("action_allowed", check_action_allowed, action, instrument, params),
        exit_informed("instrument_allowed", check_instrument_allowed, instrument, params),
        entry_only("confidence", check_confidence, _field(recommendation, "confidence"), _field(recommendation, "strategy"), params),
        run("recommendation_age", check_recommendation_age, _field(recommendation, "created_at"), now, params,
            _field(recommendation, "bar_ts")),
        exit_informed("bar_freshness", check_bar_freshness, bar, now, params),
        run("asset", check_asset, _field(recommendation, "ticker"), asset, action, instrument,
            proposed_order.qty if proposed_order is not None else None),
        entry_only("feature_freshness", check_feature_freshness, features, now, params),
        run("trading_hours", check_market_open_for_exit if is_exit else check_trading_hours, params, now, calendar),
        entry_only("daily_loss", check_daily_loss_limit, account_state, params, now),
        entry_only("broker_reconciliation", check_broker_reconciliation, account_state, now, params),
        entry_only("ticker_trades_today", check_ticker_trades_today, ticker_count_today, params),
        entry_only("ticker_cooldown", check_ticker_cooldown, last_trade_time, now, params),
        run("open_position", check_no_open_position, has_open_position, action),
        entry_only("max_positions", check_max_positions, open_positions_count, params),
    ]
    gates.append(entry_only("max_exposure", _exposure_gate, recommendation, bar, account_state, total_notional, proposed_order, params))
    return all(g.result.passed for g in gates), gates


def _exposure_gate(recommendation, bar, account_state, total_notional, proposed_order, params) -> GateResult:
    if proposed_order is None:
        price = to_decimal(_field(bar, "close"))
        equity = to_decimal(_field(account_state, "equity"))
        current = to_decimal(total_notional)
        if price is None or equity is None or current is None:
            return deny("NO_SIZE_INPUTS", f"price={price} equity={equity} exposure={current}", None, params.risk.max_notional_exposure)
        size = size_order("STOCK", price, equity, current, params)
        if size.qty == 0:
            # When not even one share fits under the limit, the exposure limit is what blocks.
            one_share = check_max_exposure(current, params, price)
            if not one_share.passed:
                return one_share
            return GateResult(False, size.reason, current, params.risk.max_notional_exposure)
        proposed_order = ProposedOrder("STOCK", size.qty, price)
    return check_max_exposure(total_notional, params, proposed_order.notional)


def first_denial(gates: list[NamedGate]) -> NamedGate | None:
    return next((g for g in gates if not g.result.passed), None)

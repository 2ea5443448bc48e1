"""Exit rules: whether an open position should be closed now, and why. Pure, with `now` passed in.

The position manager gathers each open position, the latest 1-minute bar of the held symbol
(the contract's own bar for an option: its premium), the features and the calendar, then calls
`evaluate_exit` (the decision) or `evaluate_exit_rules` (the decision with every rule's result,
to store beside the EXIT recommendation so "why did it close?" is answerable from the database).

Each rule returns an ExitResult shaped like a gate's result: (fired, reason, observed, limit), the
reason starting with a code built from the fields (`STOP_LOSS: close=1.40 stop=1.40 ...`). A rule
that did not fire says HOLD, one that does not apply to the position NOT_APPLICABLE. A flag is a
result that is neither an exit nor a hold: STALE_DATA, BAD_POSITION, CALENDAR_UNAVAILABLE,
RULE_ERROR. The caller alerts on flags; it never closes on them alone.

Precedence, when several rules fire, is the order of RULES: the expiry and end-of-day cut-offs
first (a deadline that passes is not re-checked later), then the stop loss, the trailing stop,
the take profit, and the maximum holding time. The decision carries the first that fired.

Prices: percentages are fractions of the entry price (0.25 is 25%) in Decimal, so a threshold
is a price computed exactly: long stop = entry x (1 - stop_loss_pct), long target = entry x
(1 + take_profit_pct), a short mirrored. Rules compare the bar's close, the price the position
could be closed near now; an intrabar wick neither triggers nor arms anything the closes do not show.

Thresholds, exactly at: a price rule fires at its threshold price; a time rule fires at its
deadline; a bar exactly stale_bar_seconds old is still fresh; an option with exactly
min_trading_days_to_expiry trading days left is held. Each rule's docstring says so again.

Stale data: prices are judged only when the bar is fresh. The bar covers [ts, ts + 60 s); its
age runs from its end to the last instant the market traded (now during a session, the close
outside one, so a swing position is not stale overnight), and a bar dated more than
risk.max_clock_skew_seconds after now counts as stale. A position with stale (or no) data gets
a STALE_DATA flag, its price rules are not evaluated, and the end-of-day rule closes it at the
latest, whatever its strategy. Time rules do not need prices and always run.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import Decimal
from functools import cached_property, lru_cache
from typing import Any, NamedTuple

from services.common.market_calendar import ET, CalendarUnavailable, Session, SessionCalendar, et_date
from services.common.numbers import to_decimal
from services.common.params import InstrumentExitParams, TradingParams, as_params

BAR_SECONDS = 60
STRATEGIES = frozenset({"day_trade", "swing_trade"})
INSTRUMENTS = frozenset({"STOCK", "OPTION"})
SIDES = frozenset({"long", "short"})

HOLD = "HOLD"
NOT_APPLICABLE = "NOT_APPLICABLE"
STALE_DATA = "STALE_DATA"
BAD_POSITION = "BAD_POSITION"
RULE_ERROR = "RULE_ERROR"

# Precedence: the first rule in this order that fires is the decision.
RULES = (
    "option_expiry_cutoff",
    "option_days_to_expiry",
    "end_of_day",
    "stop_loss",
    "trailing_stop",
    "take_profit",
    "max_holding_time",
)
PRICE_RULES = frozenset({"stop_loss", "trailing_stop", "take_profit"})
# The reasons of a rule that neither fired nor flagged (`code` is the part before the colon).
_QUIET = (f"{HOLD}:", f"{NOT_APPLICABLE}:")
_STALE = f"{STALE_DATA}:"


class ExitResult(NamedTuple):
    fired: bool
    reason: str
    observed: Any
    limit: Any

    @property
    def code(self) -> str:
        return self.reason.partition(":")[0]

    @property
    def is_flag(self) -> bool:
        return not self.fired and not self.reason.startswith(_QUIET)


def fire(code: str, detail: str, observed: Any, limit: Any) -> ExitResult:
    return ExitResult(True, f"{code}: {detail}", observed, limit)


def hold(detail: str, observed: Any, limit: Any) -> ExitResult:
    return ExitResult(False, f"{HOLD}: {detail}", observed, limit)


def flag(code: str, detail: str, observed: Any = None, limit: Any = None) -> ExitResult:
    return ExitResult(False, f"{code}: {detail}", observed, limit)


def not_applicable(detail: str) -> ExitResult:
    return ExitResult(False, f"{NOT_APPLICABLE}: {detail}", None, None)


@dataclass(frozen=True)
class NamedExit:
    name: str
    result: ExitResult

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "fired": self.result.fired,
            "code": self.result.code,
            "reason": self.result.reason,
            "observed": _jsonable(self.result.observed),
            "limit": _jsonable(self.result.limit),
        }


@dataclass(frozen=True)
class ExitDecision:
    """Close the position: the rule that decided, its code (the exit reason), observed and limit."""

    rule: str
    code: str
    reason: str
    observed: Any
    limit: Any


@dataclass(frozen=True)
class ExitEvaluation:
    """Every rule's result in precedence order (after the data check), and the decision."""

    results: tuple[NamedExit, ...]
    decision: ExitDecision | None
    # The position as the rules read it (None when unreadable): the caller's next_high_water_mark
    # takes it as it is instead of checking the row again.
    held: HeldPosition | None = None

    def result(self, name: str) -> ExitResult:
        for named in self.results:
            if named.name == name:
                return named.result
        raise KeyError(name)

    @cached_property
    def flags(self) -> tuple[NamedExit, ...]:
        return tuple(n for n in self.results if n.result.is_flag)

    @cached_property
    def stale(self) -> bool:
        return any(n.result.reason.startswith(_STALE) for n in self.results)


@dataclass(frozen=True)
class HeldPosition:
    """The fields of an open position the rules read, checked once.

    `high_water_mark` is the best close since entry (highest for a long, lowest for a short),
    persisted by the caller from `next_high_water_mark`; None means no bar since entry yet.
    """

    instrument: str
    side: str
    strategy: str
    entry_price: Decimal
    opened_at: datetime
    expiration: date | None = None
    high_water_mark: Decimal | None = None

    @classmethod
    def of(cls, position: Any) -> HeldPosition:
        """From a HeldPosition, a mapping (a database row) or an object; ValueError names what is wrong."""
        if isinstance(position, HeldPosition):
            return position
        instrument = _field(position, "instrument")
        side = _field(position, "side")
        strategy = _field(position, "strategy")
        entry = to_decimal(_field(position, "avg_price", _field(position, "entry_price")))
        opened_at = _field(position, "opened_at")
        expiration = _field(position, "expiration")
        mark_raw = _field(position, "high_water_mark")
        mark = to_decimal(mark_raw)
        if instrument not in INSTRUMENTS:
            raise ValueError(f"instrument={instrument!r}")
        if side not in SIDES:
            raise ValueError(f"side={side!r}")
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy={strategy!r}")
        if entry is None or entry <= 0:
            raise ValueError(f"entry price={_field(position, 'avg_price')!r}")
        if not isinstance(opened_at, datetime) or opened_at.tzinfo is None:
            raise ValueError(f"opened_at={opened_at!r} is not an aware time")
        if expiration is not None and (not isinstance(expiration, date) or isinstance(expiration, datetime)):
            raise ValueError(f"expiration={expiration!r} is not a date")
        if mark_raw is not None and (mark is None or mark <= 0):
            raise ValueError(f"high_water_mark={mark_raw!r}")
        return cls(instrument, side, strategy, entry, opened_at, expiration, mark)

    def mark(self) -> Decimal:
        return self.high_water_mark if self.high_water_mark is not None else self.entry_price


def _field(obj: Any, name: str, default: Any = None) -> Any:
    if obj is None:
        return default
    if type(obj) is dict:  # a database row: the common case, without the ABC check below
        return obj.get(name, default)
    if isinstance(obj, Mapping):
        return obj.get(name, default)
    return getattr(obj, name, default)


def _close(bar: Any) -> Decimal | None:
    close = to_decimal(_field(bar, "close"))
    return close if close is not None and close.is_finite() and close > 0 else None


@lru_cache(maxsize=256, typed=True)
def _pct(value: float) -> Decimal:
    # Through str: 0.3 the param, not 0.299999999999999988897769753748 the binary float.
    return Decimal(str(value))


@lru_cache(maxsize=1024)
def _et(ts: datetime) -> str:
    # Cached: a cycle formats the same now and the same few deadlines for every position.
    return f"{ts.astimezone(ET):%Y-%m-%d %H:%M:%S} ET"


@lru_cache(maxsize=256)
def _et_hhmm(ts: datetime) -> str:
    return f"{ts.astimezone(ET):%H:%M}"


# --- The high-water mark ---------------------------------------------------------------------


def next_high_water_mark(position: Any, bar: Any) -> Decimal:
    """The position's best close since entry after `bar`: the caller persists it for restarts.

    A long keeps the highest close, a short the lowest; the mark starts at the entry price.
    A bar without a usable close leaves the mark as it was. The caller passes only bars it
    judged fresh (`evaluate_exit_rules` reports STALE_DATA otherwise).
    """
    held = HeldPosition.of(position)
    mark = held.mark()
    close = _close(bar)
    if close is None:
        return mark
    return max(mark, close) if held.side == "long" else min(mark, close)


# --- Data freshness --------------------------------------------------------------------------


def _market_time(now: datetime, calendar: SessionCalendar) -> datetime:
    """The last instant the market traded: now during a session, else the last session's close."""
    session = calendar.current_or_previous_session(now)
    return min(now, session.close)


def check_data_freshness(bar: Any, now: datetime, limit: int, max_skew: int, calendar: SessionCalendar) -> ExitResult:
    """STALE_DATA (a flag, not an exit) when the bar is missing, unusable, too old or future-dated.

    Age = the market's last traded instant - (ts + 60 s). Exactly `limit` seconds old is fresh;
    a second more is stale. A bar starting more than `max_skew` seconds after now is stale
    (exactly `max_skew` ahead is accepted, as the gates accept it).
    """
    if bar is None:
        return flag(STALE_DATA, "no bar for the position", None, limit)
    ts = _field(bar, "ts")
    if not isinstance(ts, datetime) or ts.tzinfo is None:
        return flag(STALE_DATA, f"bar ts={ts!r} is not an aware time", None, limit)
    if _close(bar) is None:
        return flag(STALE_DATA, f"bar close={_field(bar, 'close')!r} is not a price", None, limit)
    lead = (ts - now).total_seconds()
    if lead > max_skew:
        return flag(STALE_DATA, f"bar ts={ts.isoformat()} is {lead:.0f}s in the future (skew limit {max_skew}s)", -lead, limit)
    age = (_market_time(now, calendar) - (ts + timedelta(seconds=BAR_SECONDS))).total_seconds()
    if age > limit:
        return flag(STALE_DATA, f"age={age:.0f}s limit={limit}s bar={ts.isoformat()}", age, limit)
    return hold(f"fresh: age={age:.0f}s limit={limit}s", age, limit)


# --- Time rules ------------------------------------------------------------------------------


def _last_trading_session(expiration: date, calendar: SessionCalendar) -> Session:
    """The session an option last trades in: its expiration date's, or the one before a holiday."""
    return calendar.session_on(expiration) or calendar.previous_session(expiration)


def check_option_expiry_cutoff(held: HeldPosition, now: datetime, cutoff_minutes: int, calendar: SessionCalendar) -> ExitResult:
    """Close an option from `cutoff_minutes` before the close of its last trading day.

    The close comes from the calendar, so on a 13:00 early close the cut-off moves earlier with
    it (90 minutes: 14:30 ET on a normal day, 11:30 ET on 2026-11-27). Exactly at the cut-off fires.
    """
    if held.instrument != "OPTION":
        return not_applicable("not an option")
    if held.expiration is None:
        return flag(BAD_POSITION, "option without an expiration: its last day cannot be known")
    session = _last_trading_session(held.expiration, calendar)
    deadline = session.close - timedelta(minutes=cutoff_minutes)
    detail = f"now={_et(now)} cutoff={_et(deadline)} last_day={session.day} close={_et_hhmm(session.close)} ET"
    if now >= deadline:
        return fire("EXPIRY_CUTOFF", detail, now, deadline)
    return hold(detail, now, deadline)


def check_option_days_to_expiry(held: HeldPosition, now: datetime, min_days: int | None, calendar: SessionCalendar) -> ExitResult:
    """Close a swing trade's option when fewer than `min_days` trading days remain.

    Remaining = sessions after today's ET date up to and including the option's last trading
    day (0 on that day). Exactly `min_days` remaining holds; one fewer fires.
    """
    if held.instrument != "OPTION":
        return not_applicable("not an option")
    if min_days is None:
        return not_applicable(f"no days-to-expiry rule for {held.strategy}")
    if held.expiration is None:
        return flag(BAD_POSITION, "option without an expiration: its last day cannot be known")
    last_day = _last_trading_session(held.expiration, calendar).day
    today = et_date(now)
    remaining = max(0, calendar.trading_days_between(today, last_day)) if last_day >= today else 0
    detail = f"trading_days_left={remaining} min={min_days} last_day={last_day}"
    if remaining < min_days:
        return fire("EXPIRY_APPROACHING", detail, remaining, min_days)
    return hold(detail, remaining, min_days)


def check_end_of_day(held: HeldPosition, now: datetime, minutes: int, stale: bool, calendar: SessionCalendar) -> ExitResult:
    """Flatten day trades, and any position whose data is stale, `minutes` before the close.

    A day trade's deadline is in the session it was opened in, so one still open a day later
    fires at once. A stale position's deadline is in the current (or last) session. The close
    comes from the calendar (13:00 on an early close). Exactly at the deadline fires.
    """
    if held.strategy == "day_trade":
        session = calendar.current_or_previous_session(held.opened_at)
        why = "day trade"
    elif stale:
        session = calendar.current_or_previous_session(now)
        why = "stale data"
    else:
        return not_applicable(f"{held.strategy} with fresh data")
    deadline = session.close - timedelta(minutes=minutes)
    detail = f"{why}: now={_et(now)} flatten_at={_et(deadline)} close={_et_hhmm(session.close)} ET"
    if now >= deadline:
        return fire("END_OF_DAY", detail, now, deadline)
    return hold(detail, now, deadline)


def check_max_holding_time(held: HeldPosition, now: datetime, max_minutes: int) -> ExitResult:
    """Close a position held `max_minutes` or longer (wall-clock time since it opened). Exactly at fires."""
    held_minutes = (now - held.opened_at).total_seconds() / 60
    detail = f"held={held_minutes:.2f}min limit={max_minutes}min"
    if held_minutes >= max_minutes:
        return fire("MAX_HOLDING_TIME", detail, held_minutes, max_minutes)
    return hold(detail, held_minutes, max_minutes)


# --- Price rules -----------------------------------------------------------------------------


def _ret(held: HeldPosition, close: Decimal) -> Decimal:
    """The position's return on entry at `close`: positive is profit, for a long or a short."""
    move = close / held.entry_price - 1
    return move if held.side == "long" else -move


def check_stop_loss(held: HeldPosition, close: Decimal, rules: InstrumentExitParams) -> ExitResult:
    """Long: fire when close <= entry x (1 - stop_loss_pct); short: close >= entry x (1 + pct). At the stop fires."""
    pct = _pct(rules.stop_loss_pct)
    if held.side == "long":
        stop = held.entry_price * (1 - pct)
        fired = close <= stop
    else:
        stop = held.entry_price * (1 + pct)
        fired = close >= stop
    detail = f"close={close} stop={stop} entry={held.entry_price} {held.side} return={_ret(held, close):+.4f}"
    return fire("STOP_LOSS", detail, close, stop) if fired else hold(detail, close, stop)


def check_take_profit(held: HeldPosition, close: Decimal, rules: InstrumentExitParams) -> ExitResult:
    """Long: fire when close >= entry x (1 + take_profit_pct); short: close <= entry x (1 - pct). At the target fires."""
    pct = _pct(rules.take_profit_pct)
    if held.side == "long":
        target = held.entry_price * (1 + pct)
        fired = close >= target
    else:
        target = held.entry_price * (1 - pct)
        fired = close <= target
    detail = f"close={close} target={target} entry={held.entry_price} {held.side} return={_ret(held, close):+.4f}"
    return fire("TAKE_PROFIT", detail, close, target) if fired else hold(detail, close, target)


def check_trailing_stop(held: HeldPosition, close: Decimal, mark: Decimal, rules: InstrumentExitParams) -> ExitResult:
    """A stop that follows the high-water mark once it has gained trailing_activation_pct on entry.

    Long: armed when mark >= entry x (1 + activation) (exactly at arms), then fires when
    close <= mark x (1 - trailing_stop_pct) (exactly at fires). A short mirrors both with its
    lowest close. Before it arms, the fixed stop loss is the position's only stop: observed is
    the mark, limit the arming price.
    """
    activation = _pct(rules.trailing_activation_pct)
    trail = _pct(rules.trailing_stop_pct)
    if held.side == "long":
        arm_at = held.entry_price * (1 + activation)
        armed = mark >= arm_at
        trigger = mark * (1 - trail)
        fired = armed and close <= trigger
    else:
        arm_at = held.entry_price * (1 - activation)
        armed = mark <= arm_at
        trigger = mark * (1 + trail)
        fired = armed and close >= trigger
    if not armed:
        return hold(f"not armed: mark={mark} arms_at={arm_at} entry={held.entry_price} {held.side}", mark, arm_at)
    detail = f"close={close} trigger={trigger} mark={mark} entry={held.entry_price} {held.side}"
    return fire("TRAILING_STOP", detail, close, trigger) if fired else hold(detail, close, trigger)


# --- Evaluation ------------------------------------------------------------------------------

_RULE_ERRORS = (ArithmeticError, TypeError, ValueError, KeyError, AttributeError)


class _SessionMemo:
    """A calendar's answers for one pass over a book: each day asked once, not once per position.

    Only answers are kept; a CalendarUnavailable is raised again at each ask, as the calendar would.
    """

    def __init__(self, calendar: SessionCalendar):
        self._calendar = calendar
        self._answers: dict[tuple, Any] = {}

    def _ask(self, name: str, *args: Any) -> Any:
        key = (name, *args)
        try:
            return self._answers[key]
        except KeyError:
            answer = self._answers[key] = getattr(self._calendar, name)(*args)
            return answer

    def session_on(self, day: date) -> Session | None:
        return self._ask("session_on", day)

    def previous_session(self, before: date) -> Session:
        return self._ask("previous_session", before)

    def current_or_previous_session(self, now: datetime) -> Session:
        return self._ask("current_or_previous_session", now)

    def trading_days_between(self, start: date, end: date) -> int:
        return self._ask("trading_days_between", start, end)


_BAR = timedelta(seconds=BAR_SECONDS)


class _QuickPlan(NamedTuple):
    max_skew: int
    stale_seconds: int
    market_time: datetime
    cutoff_minutes: int
    min_days: int | None
    max_minutes: int
    flatten_minutes: int | None  # a day trade's; None for a swing trade with fresh data
    stop_factor: Decimal
    target_factor: Decimal
    arm_factor: Decimal
    trail_factor: Decimal


class ExitRules:
    """The exit rules of one pass over a book: params, now and calendar fixed for every position.

    What is the same for every position (the params' sections, the calendar's sessions and
    deadlines) is looked up once per pass; `evaluate` is then `evaluate_exit_rules` of one
    position, with identical results. The position manager makes one per cycle.
    """

    def __init__(self, params: TradingParams | Mapping, now: datetime, calendar: SessionCalendar):
        if not isinstance(now, datetime) or now.tzinfo is None:
            raise ValueError("naive or missing `now`: exit rules need an aware time")
        self.params = as_params(params)
        self.now = now
        self.calendar = _SessionMemo(calendar)
        # Per strategy: its section and its days-to-expiry minimum (a swing trade's only).
        self._deadlines: dict[tuple, Any] = {}  # the fast path's per-expiration answers
        self._strategies = {
            name: (rules, getattr(rules, "min_trading_days_to_expiry", None))
            for name, rules in ((s, self.params.exits.for_strategy(s)) for s in STRATEGIES)  # type: ignore[arg-type]
        }

    def quick_hold(self, instrument: Any, side: Any, strategy: Any, entry: Any, opened_at: Any, expiration: Any,
                   high_water_mark: Any, bar_ts: Any, close: Any) -> Decimal | None:
        """The position's next high-water mark when it holds with nothing flagged, else None.

        A fast path for the common case of a cycle, where `evaluate` would build every rule's
        reason text only to say HOLD: the same comparisons, on the same Decimal and float
        expressions, against this pass's deadlines computed once. None means "evaluate it": a
        rule fires or may fire, the data is stale, the position or its values are unusual
        (anything not shaped as the database returns it), or a lookup failed. Whenever this
        returns a mark, `evaluate` has no decision and no flag, and `next_high_water_mark` gives
        the same mark (tests/test_exits_fast_path.py).
        """
        try:
            plan = self._quick_plans()[(strategy, instrument, side)]
        except (KeyError, TypeError, CalendarUnavailable):
            return None  # an unknown strategy, instrument or side (BAD_POSITION), or no calendar
        try:
            if (type(entry) is not Decimal or not entry.is_finite() or entry <= 0
                    or type(close) is not Decimal or not close.is_finite() or close <= 0
                    or not isinstance(opened_at, datetime) or opened_at.tzinfo is None
                    or not isinstance(bar_ts, datetime) or bar_ts.tzinfo is None):
                return None
            if high_water_mark is None:
                mark = entry
            elif type(high_water_mark) is Decimal and high_water_mark.is_finite() and high_water_mark > 0:
                mark = high_water_mark
            else:
                return None
            now = self.now
            # data_freshness: the expressions of check_data_freshness
            if (bar_ts - now).total_seconds() > plan.max_skew:
                return None
            if (plan.market_time - (bar_ts + _BAR)).total_seconds() > plan.stale_seconds:
                return None
            if instrument == "OPTION":
                if expiration is None or not isinstance(expiration, date) or isinstance(expiration, datetime):
                    return None
                if now >= self._expiry_cutoff(expiration, plan.cutoff_minutes):
                    return None
                if plan.min_days is not None and self._trading_days_left(expiration) < plan.min_days:
                    return None
            elif expiration is not None and (not isinstance(expiration, date) or isinstance(expiration, datetime)):
                return None
            if plan.flatten_minutes is not None:  # a day trade: flattened in the session it opened in
                if now >= self._day_trade_flatten_at(opened_at, plan.flatten_minutes):
                    return None
            if side == "long":
                if close <= entry * plan.stop_factor or close >= entry * plan.target_factor:
                    return None
                mark = max(mark, close)
                if mark >= entry * plan.arm_factor and close <= mark * plan.trail_factor:
                    return None
            else:
                if close >= entry * plan.stop_factor or close <= entry * plan.target_factor:
                    return None
                mark = min(mark, close)
                if mark <= entry * plan.arm_factor and close >= mark * plan.trail_factor:
                    return None
            if (now - opened_at).total_seconds() / 60 >= plan.max_minutes:
                return None
            return mark
        except (*_RULE_ERRORS, CalendarUnavailable):
            return None

    def _quick_plans(self) -> dict[tuple[str, str, str], _QuickPlan]:
        """Per (strategy, instrument, side): the factors and limits the fast path compares with."""
        plans = self.__dict__.get("_plans")
        if plans is None:
            session = self.calendar.current_or_previous_session(self.now)  # CalendarUnavailable: no fast path
            market_time = min(self.now, session.close)  # as _market_time
            plans = {}
            for strategy, (rules, min_days) in self._strategies.items():
                for instrument in INSTRUMENTS:
                    prices = rules.option if instrument == "OPTION" else rules.stock
                    stop, target = _pct(prices.stop_loss_pct), _pct(prices.take_profit_pct)
                    arm, trail = _pct(prices.trailing_activation_pct), _pct(prices.trailing_stop_pct)
                    common = dict(
                        max_skew=self.params.risk.max_clock_skew_seconds, stale_seconds=rules.stale_bar_seconds,
                        market_time=market_time, cutoff_minutes=rules.option_expiry_cutoff_minutes_before_close,
                        min_days=min_days, max_minutes=rules.max_holding_minutes,
                        flatten_minutes=rules.flatten_minutes_before_close if strategy == "day_trade" else None,
                    )
                    # The factors as the check_* functions write them: 1 - pct, 1 + pct.
                    plans[(strategy, instrument, "long")] = _QuickPlan(
                        stop_factor=1 - stop, target_factor=1 + target, arm_factor=1 + arm, trail_factor=1 - trail,
                        **common)
                    plans[(strategy, instrument, "short")] = _QuickPlan(
                        stop_factor=1 + stop, target_factor=1 - target, arm_factor=1 - arm, trail_factor=1 + trail,
                        **common)
            self._plans = plans
            self._session = session
        return plans

    def _expiry_cutoff(self, expiration: date, cutoff_minutes: int) -> datetime:
        key = ("cutoff", expiration, cutoff_minutes)
        deadline = self._deadlines.get(key)
        if deadline is None:
            deadline = _last_trading_session(expiration, self.calendar).close - timedelta(minutes=cutoff_minutes)
            self._deadlines[key] = deadline
        return deadline

    def _trading_days_left(self, expiration: date) -> int:
        key = ("days", expiration)
        remaining = self._deadlines.get(key)
        if remaining is None:
            last_day = _last_trading_session(expiration, self.calendar).day
            today = et_date(self.now)
            remaining = max(0, self.calendar.trading_days_between(today, last_day)) if last_day >= today else 0
            self._deadlines[key] = remaining
        return remaining

    def _day_trade_flatten_at(self, opened_at: datetime, minutes: int) -> datetime:
        # A position opened between this session's open and now belongs to it (no session opens
        # in between: it is the latest to have opened by now), so the calendar is asked only for
        # the others, as check_end_of_day asks it.
        session = self._session
        if not session.open <= opened_at <= self.now:
            session = self.calendar.current_or_previous_session(opened_at)
        return session.close - timedelta(minutes=minutes)

    def evaluate(self, position: Any, bar: Any) -> ExitEvaluation:
        """Every rule's result for one position, and the decision; see `evaluate_exit_rules`."""
        now, calendar, p = self.now, self.calendar, self.params
        try:
            held = HeldPosition.of(position)
        except ValueError as e:
            return ExitEvaluation((NamedExit("position", flag(BAD_POSITION, str(e))),), None)
        strategy_rules, min_days = self._strategies[held.strategy]
        price_rules = strategy_rules.option if held.instrument == "OPTION" else strategy_rules.stock

        def run(name: str, fn: Callable[..., ExitResult], *args: Any) -> NamedExit:
            try:
                return NamedExit(name, fn(*args))
            except CalendarUnavailable as e:
                return NamedExit(name, flag("CALENDAR_UNAVAILABLE", f"{name}: {e}"))
            except _RULE_ERRORS as e:
                return NamedExit(name, flag(RULE_ERROR, f"{name}: {type(e).__name__}: {e}"))

        freshness = run(
            "data_freshness", check_data_freshness, bar, now, strategy_rules.stale_bar_seconds,
            p.risk.max_clock_skew_seconds, calendar,
        )
        fresh = freshness.result.code == HOLD
        close = _close(bar) if fresh else None
        mark = next_high_water_mark(held, bar) if fresh else held.mark()

        def priced(name: str, fn: Callable[..., ExitResult], *args: Any) -> NamedExit:
            if close is None:
                return NamedExit(name, not_applicable(f"not judged on stale data ({freshness.result.code})"))
            return run(name, fn, *args)

        results = (
            freshness,
            run("option_expiry_cutoff", check_option_expiry_cutoff, held, now,
                strategy_rules.option_expiry_cutoff_minutes_before_close, calendar),
            run("option_days_to_expiry", check_option_days_to_expiry, held, now, min_days, calendar),
            run("end_of_day", check_end_of_day, held, now, strategy_rules.flatten_minutes_before_close, not fresh,
                calendar),
            priced("stop_loss", check_stop_loss, held, close, price_rules),
            priced("trailing_stop", check_trailing_stop, held, close, mark, price_rules),
            priced("take_profit", check_take_profit, held, close, price_rules),
            run("max_holding_time", check_max_holding_time, held, now, strategy_rules.max_holding_minutes),
        )
        decision = next(
            (ExitDecision(n.name, n.result.code, n.result.reason, n.result.observed, n.result.limit)
             for n in results if n.result.fired),
            None,
        )
        return ExitEvaluation(results, decision, held)


def evaluate_exit_rules(
    position: Any,
    bar: Any,
    features: Any,
    params: TradingParams | Mapping,
    now: datetime,
    calendar: SessionCalendar,
) -> ExitEvaluation:
    """Run every rule for one position; return every result and the decision by precedence.

    Results: `data_freshness` first (HOLD or the STALE_DATA flag), then RULES in precedence
    order. A rule that raises becomes a flag (CALENDAR_UNAVAILABLE, RULE_ERROR), never an exit
    and never a crash of the caller's loop; an unreadable position yields one BAD_POSITION flag.
    `features` is accepted for rules on indicators; none of the current rules reads it. A pass
    over many positions at one `now` makes one ExitRules and calls its `evaluate` instead.
    """
    return ExitRules(params, now, calendar).evaluate(position, bar)


def evaluate_exit(
    position: Any,
    bar: Any,
    features: Any,
    params: TradingParams | Mapping,
    now: datetime,
    calendar: SessionCalendar,
) -> ExitDecision | None:
    """The exit decision for one position, or None to hold. See `evaluate_exit_rules`."""
    return evaluate_exit_rules(position, bar, features, params, now, calendar).decision


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (str, int, bool)):
        return value
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    return str(value)

"""Option contract choice and the option gates: pure functions over a chain already fetched.

Nothing here imports alpaca-py, a database driver or boto3. The adapter turns the broker's
chain into `OptionQuote`s (`services/domain/market_data.py`); the simulated market builds the same objects
(`services/adapters/sim/options.py`); this module decides on either without knowing which.

Two steps, both with `now` passed in:

- `choose_contract` filters the chain to the recommendation's side (calls for a bullish BUY,
  puts for a bearish SELL), the strategy's expiry window in NYSE trading days and the delta
  band, ranks what is left, and returns the best contract with its rank details.
- `validate_option_contract` (the seed's interface) and `option_gate_results` (every gate, for
  the executions record) check one contract's quote, expiry, liquidity and IV percentile.

Reasons start with a code (`WIDE_SPREAD: spread=0.1200 limit=0.1000`). Missing or malformed
data is a denial with its own code, never a pass. The IV percentile alone may be "not
evaluated", in two cases that say so in their reason: the dispatcher's IV history is too short
("not evaluated: N sessions of history"), or the seed's interface was called with a contract
that carries no IV percentile and no `iv_percentile` keyword (the seed gates IV "when
available"). IV the caller did supply but that is missing or broken is NO_IV_PERCENTILE.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any, NamedTuple

from services.common.market_calendar import (
    ET,
    CalendarUnavailable,
    SessionCalendar,
    et_date,
    nyse_calendar,
    option_expiry_instant,
)
from services.common.params import OptionParams, TradingParams, as_params
from services.common.numbers import to_decimal
from services.dispatcher.risk.gates import GateResult, NamedGate, aware_now, check_not_future_dated, deny, ok
from services.domain.sizing import SizeResult, size_order

_MISSING = object()

# Failures that belong to this contract's market (its quote, liquidity or IV): another
# instrument may still be fine, so the caller may consider the stock (re-gated). Expiry and
# calendar failures are not in this set: they say the choice or the clock is wrong, not the market.
FALLBACK_CODES = frozenset(
    {
        "NO_QUOTE",
        "BAD_QUOTE",
        "NO_BID",
        "CROSSED_QUOTE",
        "STALE_QUOTE",
        "FUTURE_DATED",  # a quote time ahead of our clock is refused like a stale one
        "WIDE_SPREAD",
        "NO_VOLUME",
        "LOW_VOLUME",
        "NO_OPEN_INTEREST",
        "LOW_OPEN_INTEREST",
        "NO_IV_PERCENTILE",
        "HIGH_IV_PERCENTILE",
    }
)

NOT_EVALUATED = "not evaluated"


class _NotSupplied:
    """The IV percentile nobody supplied: no keyword given, and the contract carries none."""

    def __repr__(self) -> str:
        return "NOT_SUPPLIED"


NOT_SUPPLIED = _NotSupplied()

OPTION_GATE_NAMES = (
    "option_expiry",
    "option_quote",
    "option_quote_age",
    "option_spread",
    "option_volume",
    "option_open_interest",
    "option_iv_percentile",
)


class OptionValidation(NamedTuple):
    """The seed's 3-tuple: (passed, reason, fallback_to_stock)."""

    passed: bool
    reason: str
    fallback_to_stock: bool


def _get(contract: Any, name: str, default: Any = _MISSING) -> Any:
    """A contract's field, from an object's attribute or a mapping's key (the seed passes either)."""
    if isinstance(contract, Mapping):
        return contract.get(name, default)
    return getattr(contract, name, default)


def _count(value: Any) -> int | None:
    """A non-negative whole count, or None for a missing, NaN or malformed value.

    Open interest arrives from the broker as a string; the adapter converts it, but a duck-typed
    contract may still carry "1200" or 1200.0.
    """
    d = to_decimal(value)
    if d is None or d < 0 or d != d.to_integral_value():
        return None
    return int(d)


# --- The gates -------------------------------------------------------------------------------


def check_option_expiry(
    expiration: Any, now: datetime, params: TradingParams, calendar: SessionCalendar | None = None
) -> GateResult:
    """Deny an expired contract and one too close to its last session's close.

    An option expires at 16:00 ET on its expiration date. On the expiration day, entries stop
    `expiry_day_cutoff_minutes_before_close` before the session's close from the NYSE calendar,
    so on an early close (13:00) the cutoff moves with it. A contract without an expiration
    attribute (the seed's duck-typed contracts) is not evaluated here; one whose expiration is
    present but not a date is denied.
    """
    cutoff = params.options.expiry_day_cutoff_minutes_before_close
    if expiration is _MISSING:
        return ok(f"{NOT_EVALUATED}: contract carries no expiration", None, cutoff)
    if not isinstance(expiration, date) or isinstance(expiration, datetime):
        return deny("BAD_EXPIRATION", f"expiration={expiration!r} is not a date", None, cutoff)
    today = et_date(now)
    observed = expiration.isoformat()
    if expiration < today or (expiration == today and now >= option_expiry_instant(expiration)):
        return deny("EXPIRED", f"expiration={expiration} now={now.astimezone(ET):%Y-%m-%d %H:%M} ET", observed, cutoff)
    if expiration > today:
        return ok(f"expiration={expiration}", observed, cutoff)
    try:
        session = (calendar or nyse_calendar()).session_on(today)
    except CalendarUnavailable as e:
        return deny("CALENDAR_UNAVAILABLE", str(e), observed, cutoff)
    if session is None:
        return deny("EXPIRING_TODAY", f"expiration={expiration} is not a trading day", observed, cutoff)
    last_entry = session.close - timedelta(minutes=cutoff)
    if now >= last_entry:
        return deny(
            "EXPIRING_TODAY",
            f"expiration={expiration} now={now.astimezone(ET):%H:%M} ET "
            f"last_entry_before={last_entry.astimezone(ET):%H:%M} ET close={session.close.astimezone(ET):%H:%M} ET",
            observed,
            cutoff,
        )
    return ok(f"expiration={expiration} (today) last_entry_before={last_entry.astimezone(ET):%H:%M} ET", observed, cutoff)


def check_option_quote(bid_raw: Any, ask_raw: Any) -> GateResult:
    """The quote must be two-sided, finite, positive and not crossed.

    A zero bid means there is no market to sell into when the position is closed: denied as
    NO_BID. A locked quote (bid == ask) passes with spread 0.
    """
    if bid_raw is None or ask_raw is None:
        return deny("NO_QUOTE", f"bid={bid_raw} ask={ask_raw}", None, None)
    bid, ask = to_decimal(bid_raw), to_decimal(ask_raw)
    if bid is None or ask is None or bid < 0 or ask <= 0:
        return deny("BAD_QUOTE", f"bid={bid_raw} ask={ask_raw}", None, None)
    if bid == 0:
        return deny("NO_BID", f"bid=0 ask={ask}: no market to exit into", None, None)
    if bid > ask:
        return deny("CROSSED_QUOTE", f"bid={bid} > ask={ask}", None, None)
    return ok(f"bid={bid} ask={ask}", None, None)


def check_option_quote_age(quote_time: Any, now: datetime, params: TradingParams) -> GateResult:
    """The quote's age from its own timestamp. Not evaluated for a contract without the attribute.

    A quote time further ahead of `now` than max_clock_skew_seconds is FUTURE_DATED: its
    negative age would otherwise pass.
    """
    limit = params.options.max_quote_age_seconds
    if quote_time is _MISSING:
        return ok(f"{NOT_EVALUATED}: contract carries no quote time", None, limit)
    if not isinstance(quote_time, datetime) or quote_time.tzinfo is None:
        return deny("STALE_QUOTE", f"quote_time={quote_time!r} is not an aware time", None, limit)
    ahead = check_not_future_dated("quote_time", quote_time, now, params)
    if not ahead.passed:
        return ahead
    age = (now - quote_time).total_seconds()
    if age > limit:
        return deny("STALE_QUOTE", f"age={age:.0f}s limit={limit}s quote_time={quote_time.isoformat()}", age, limit)
    return ok(f"age={age:.0f}s limit={limit}s", age, limit)


def check_option_spread(bid_raw: Any, ask_raw: Any, params: TradingParams) -> GateResult:
    """(ask - bid) / mid, computed in Decimal so exactly the limit passes."""
    limit = params.options.max_option_spread
    quote = check_option_quote(bid_raw, ask_raw)
    if not quote.passed:
        return GateResult(False, quote.reason, None, limit)
    bid, ask = to_decimal(bid_raw), to_decimal(ask_raw)
    mid = (bid + ask) / 2
    spread = (ask - bid) / mid
    limit_d = Decimal(str(limit))
    detail = f"spread={spread:.4f} limit={limit_d:.4f}"
    if spread > limit_d:
        return deny("WIDE_SPREAD", detail, float(spread), limit)
    return ok(detail, float(spread), limit)


def check_option_volume(volume_raw: Any, params: TradingParams) -> GateResult:
    limit = params.options.min_option_volume
    volume = _count(volume_raw)
    if volume is None:
        return deny("NO_VOLUME", f"volume={volume_raw!r}", None, limit)
    if volume < limit:
        return deny("LOW_VOLUME", f"volume={volume} min={limit}", volume, limit)
    return ok(f"volume={volume} min={limit}", volume, limit)


def check_option_open_interest(oi_raw: Any, params: TradingParams) -> GateResult:
    limit = params.options.min_open_interest
    oi = _count(oi_raw)
    if oi is None:
        return deny("NO_OPEN_INTEREST", f"open_interest={oi_raw!r}", None, limit)
    if oi < limit:
        return deny("LOW_OPEN_INTEREST", f"open_interest={oi} min={limit}", oi, limit)
    return ok(f"open_interest={oi} min={limit}", oi, limit)


def _split_iv(iv_percentile: Any) -> tuple[Any, str | None]:
    """Accept a number, or the (percentile, reason) pair from services.domain.iv_percentile."""
    if isinstance(iv_percentile, tuple) and len(iv_percentile) == 2:
        return iv_percentile[0], iv_percentile[1]
    return iv_percentile, None


def check_option_iv_percentile(iv_percentile: Any, params: TradingParams) -> GateResult:
    """Deny above max_iv_percentile (exactly the limit passes).

    `iv_percentile` is a number, or the (percentile, reason) pair from
    `services.domain.iv_percentile.iv_percentile`. A None percentile passes only when its reason says the history is
    too short ("not evaluated: N sessions of history"); any other missing value is NO_IV_PERCENTILE.
    NOT_SUPPLIED (no keyword, and the contract carries none) passes as not evaluated.
    """
    limit = params.options.max_iv_percentile
    if iv_percentile is NOT_SUPPLIED:
        return ok(f"iv_percentile {NOT_EVALUATED}: contract carries no iv_percentile", None, limit)
    value, why = _split_iv(iv_percentile)
    if value is None:
        if why and why.startswith(NOT_EVALUATED):
            return ok(f"iv_percentile {why}", None, limit)
        return deny("NO_IV_PERCENTILE", why or "no IV percentile for the underlying", None, limit)
    d = to_decimal(value)
    if d is None or not 0 <= d <= 100:
        return deny("NO_IV_PERCENTILE", f"iv_percentile={value!r} is not a percentile", None, limit)
    pct = float(d)
    detail = f"iv_percentile={pct:.1f} max={limit:g}"
    if pct > limit:
        return deny("HIGH_IV_PERCENTILE", detail, pct, limit)
    return ok(detail, pct, limit)


def option_gate_results(
    contract: Any,
    params: TradingParams | Mapping,
    now: datetime | None = None,
    iv_percentile: Any = _MISSING,
    *,
    calendar: SessionCalendar | None = None,
) -> list[dict[str, Any]]:
    """Every option gate's result as JSON (name, passed, code, reason, observed, limit).

    The shape is `gates.NamedGate.as_json()`, so the executions record stores option gates next
    to the pre-trade gates. `iv_percentile` as in `option_gates`.
    """
    return [g.as_json() for g in option_gates(contract, params, now, iv_percentile, calendar=calendar)]


def option_gates(
    contract: Any,
    params: TradingParams | Mapping,
    now: datetime | None = None,
    iv_percentile: Any = _MISSING,
    *,
    calendar: SessionCalendar | None = None,
) -> list[NamedGate]:
    """Every option gate, in a fixed order (OPTION_GATE_NAMES); the first failure decides.

    `contract` is an object or a mapping with the same field names. The IV percentile is the
    `iv_percentile` argument when it is not None, else the contract's own `iv_percentile`.
    Without the argument, a contract with no IV percentile (no such field, or None) is not
    gated on IV. An explicit None says the caller's IV inputs are missing: unless the
    contract carries its own, that is NO_IV_PERCENTILE, as the dispatcher always supplies one.
    """
    params = as_params(params)
    now = aware_now(now)
    bid = _get(contract, "bid", None)
    ask = _get(contract, "ask", None)
    if iv_percentile is _MISSING or iv_percentile is None:
        own = _get(contract, "iv_percentile", None)
        if own is not None:
            iv_percentile = own
        elif iv_percentile is _MISSING:
            iv_percentile = NOT_SUPPLIED
    results = (
        check_option_expiry(_get(contract, "expiration"), now, params, calendar),
        check_option_quote(bid, ask),
        check_option_quote_age(_get(contract, "quote_time"), now, params),
        check_option_spread(bid, ask, params),
        check_option_volume(_get(contract, "volume", None), params),
        check_option_open_interest(_get(contract, "open_interest", None), params),
        check_option_iv_percentile(iv_percentile, params),
    )
    return [NamedGate(name, result) for name, result in zip(OPTION_GATE_NAMES, results)]


def validation_from_gates(gates: Sequence[NamedGate]) -> OptionValidation:
    """The seed's tuple from the gate list: the first failure decides reason and fallback."""
    for g in gates:
        if not g.result.passed:
            return OptionValidation(False, g.result.reason, g.result.code in FALLBACK_CODES)
    details = "; ".join(g.result.reason.removeprefix("OK: ") for g in gates[3:])
    return OptionValidation(True, f"OK: {details}", False)


def validate_option_contract(
    contract: Any,
    config: TradingParams | Mapping,
    *,
    now: datetime | None = None,
    iv_percentile: Any = _MISSING,
    calendar: SessionCalendar | None = None,
) -> OptionValidation:
    """The seed's interface: (passed, reason, fallback_to_stock).

    `contract` is duck-typed, an object or a mapping: bid, ask, volume, open_interest, and
    optionally iv_percentile, quote_time and expiration (an OptionQuote has all but
    iv_percentile, which then comes from the keyword). `config` is TradingParams or a mapping of
    the seed's flat keys.
    The seed gates the IV percentile when available: called without the keyword, a contract
    that carries none passes that gate as "not evaluated: contract carries no iv_percentile".
    The dispatcher passes the keyword from `iv_history`, whose rules then apply (see
    `option_gates`).
    fallback_to_stock is True when this contract's market failed (quote, spread, volume, open
    interest, IV) so the stock may be considered; False when it passed or the failure is about
    expiry or the calendar.
    """
    return validation_from_gates(option_gates(contract, config, now, iv_percentile, calendar=calendar))


# --- Contract choice --------------------------------------------------------------------------

_CALL_DIRECTIONS = frozenset({"BULL", "BULLISH", "BUY", "LONG", "CALL"})
_PUT_DIRECTIONS = frozenset({"BEAR", "BEARISH", "SELL", "SHORT", "PUT"})

# Weights of the quality score (they sum to 1). Spread weighs most: it is paid on entry and
# again on exit. Liquidity is the log-scaled volume and open interest. Delta fit measures the
# distance to the target delta within the band; strike distance prefers strikes near the spot
# when deltas tie (and decides for contracts whose delta was estimated).
SCORE_WEIGHTS = {"spread": 0.35, "liquidity": 0.25, "delta_fit": 0.25, "strike": 0.15}
# A strike this far from the spot (as a fraction of it) scores 0 on strike distance.
STRIKE_DISTANCE_ZERO = 0.10
# Volume/open interest at this multiple of their minimum score 1 on liquidity.
LIQUIDITY_SATURATION = 10
# The quick liquidity check compares floats; this tolerance keeps a contract exactly at the
# spread limit (which the Decimal gate passes) from being ranked as failing.
_FLOAT_TOLERANCE = 1e-9
_SECONDS_PER_YEAR = 365.0 * 24 * 3600
_INV_SQRT2 = 1.0 / math.sqrt(2.0)
# The shortest time to expiry used in a delta estimate (a minute), so the estimate stays finite.
_MIN_YEARS = 60.0 / _SECONDS_PER_YEAR


@dataclass(frozen=True)
class ContractChoice:
    """The contract chosen and why: its rank, score parts and its own gate results.

    `passed` is the contract's validation. When no candidate passes, the best-ranked one is
    still returned (passed=False) so the caller records why the option was refused.
    """

    contract: Any
    right: str
    dte: int
    abs_delta: float
    delta_estimated: bool
    score: float
    score_parts: dict[str, float]
    rank: int
    candidates: int
    passed: bool
    reason: str
    fallback_to_stock: bool
    gates: tuple[NamedGate, ...] = field(repr=False)

    def gate_results(self) -> list[dict[str, Any]]:
        return [g.as_json() for g in self.gates]

    def as_json(self) -> dict[str, Any]:
        c = self.contract
        return {
            "symbol": getattr(c, "symbol", None),
            "right": self.right,
            "strike": float(c.strike) if getattr(c, "strike", None) is not None else None,
            "expiration": c.expiration.isoformat() if getattr(c, "expiration", None) else None,
            "dte_trading_days": self.dte,
            "abs_delta": round(self.abs_delta, 4),
            "delta_estimated": self.delta_estimated,
            "score": round(self.score, 4),
            "score_parts": {k: round(v, 4) for k, v in self.score_parts.items()},
            "rank": self.rank,
            "candidates": self.candidates,
            "passed": self.passed,
            "reason": self.reason,
            "fallback_to_stock": self.fallback_to_stock,
        }


class ContractSelection(NamedTuple):
    """(choice or None, reason). The reason starts with a code: CHOSEN, NO_PASSING_CONTRACT,
    NO_CANDIDATE, UNKNOWN_DIRECTION, UNKNOWN_STRATEGY or BAD_SPOT."""

    choice: ContractChoice | None
    reason: str


def right_for(direction: str) -> str | None:
    """call for a bullish signal (action BUY), put for a bearish one (action SELL)."""
    d = str(direction).upper()
    if d in _CALL_DIRECTIONS:
        return "call"
    if d in _PUT_DIRECTIONS:
        return "put"
    return None


def _norm_cdf(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def estimate_abs_delta(right: str, spot: float, strike: float, years: float, iv: float) -> float:
    """|delta| from Black-Scholes (no rates, no dividends) when the broker sent no greeks."""
    if years <= 0 or iv <= 0:
        itm = spot > strike if right == "call" else spot < strike
        return 1.0 if itm else 0.0
    d1 = (math.log(spot / strike) + 0.5 * iv * iv * years) / (iv * math.sqrt(years))
    call_delta = _norm_cdf(d1)
    return call_delta if right == "call" else 1.0 - call_delta


def _quick_liquid(bid: Any, ask: Any, volume: Any, oi: Any, o: OptionParams) -> tuple[bool, float]:
    """A float pre-check of the quote and liquidity gates, and the spread for the score.

    It never fails a contract the Decimal gates would pass (a failure here implies a failure
    there), so ranking on it puts failing contracts below passing ones; the full gates then run
    on the ranked list in order.
    """
    try:
        b = float(bid)
        a = float(ask)
    except (TypeError, ValueError):
        return False, math.inf
    if not (b > 0 and a > 0 and b <= a and math.isfinite(a)):
        return False, math.inf
    spread = (a - b) / ((a + b) / 2)
    ok = spread <= o.max_option_spread * (1 + _FLOAT_TOLERANCE)
    try:
        ok = ok and volume is not None and float(volume) >= o.min_option_volume
        ok = ok and oi is not None and float(oi) >= o.min_open_interest
    except (TypeError, ValueError):
        ok = False
    return ok, spread


def _expiry_facts(
    exp: date, today: date, today_expired: bool, now: datetime, cal: SessionCalendar
) -> tuple[int, float] | None:
    """(trading days from today's ET date to exp, sqrt of years to its 16:00 ET expiry), None if expired.

    An expiration beyond the loaded calendar gets a DTE no window contains (-1).
    """
    if exp < today or (exp == today and today_expired):
        return None
    try:
        dte = cal.trading_days_between(today, exp)
    except CalendarUnavailable:
        dte = -1
    years = max((option_expiry_instant(exp) - now).total_seconds() / _SECONDS_PER_YEAR, _MIN_YEARS)
    return dte, math.sqrt(years)


def expiration_window(strategy: str | None, params: Any, today: date) -> tuple[date, date] | None:
    """The calendar dates that can hold an expiry inside the strategy's DTE window, or None.

    DTE counts trading days, which never outnumber calendar days: min_dte calendar days is a
    safe lower bound. Above, a week holds at least 3 trading days even with two holidays, so
    max_dte * 7 / 3 + 7 calendar days holds every expiry the window can choose. Only this
    range is fetched from the market-data API; the exact DTE is checked by `choose_contract`.
    """
    o = as_params(params).options
    windows = {"day_trade": (o.day_trade_min_dte, o.day_trade_max_dte),
               "swing_trade": (o.swing_trade_min_dte, o.swing_trade_max_dte)}
    if strategy not in windows:
        return None
    min_dte, max_dte = windows[strategy]
    return today + timedelta(days=min_dte), today + timedelta(days=max_dte * 7 // 3 + 7)


def choose_contract(
    chain: Iterable[Any],
    direction: str,
    strategy: str,
    spot: Any,
    params: TradingParams | Mapping,
    now: datetime,
    calendar: SessionCalendar | None = None,
    *,
    iv_percentile: Any = None,
) -> ContractSelection:
    """Choose the best contract of a chain for a directional entry.

    Filters, in order: the right (call for BULL/BUY, put for BEAR/SELL); the expiry window in
    NYSE trading days from today's ET date (`trading_days_between`, cached per expiration; an
    expired contract or one past 16:00 ET on its expiration date is never a candidate);
    the delta band [min_abs_delta, max_abs_delta].

    Missing delta: when the contract has an implied volatility, |delta| is estimated with
    Black-Scholes from the spot, strike and time to the 16:00 ET expiry (`delta_estimated`
    is then True); without delta and IV the contract is skipped, since its moneyness alone says
    nothing about the band.

    Ranking: contracts that pass the quote and liquidity pre-check come first; within each
    group, by score (SCORE_WEIGHTS), then nearer expiry, then symbol:
      spread    = 1 - spread / max_option_spread   (clamped to [0, 1]; a bad quote scores 0)
      liquidity = mean of log(1+volume)/log(1+10*min_volume) and the same for open interest (<= 1)
      delta_fit = 1 - | |delta| - target_abs_delta | / widest half of the band   (clamped)
      strike    = 1 - |strike - spot| / spot / 0.10   (clamped)
    The full option gates then run down the ranking; the first contract that passes is chosen.
    If none passes, the best-ranked contract is returned with passed=False and its reason.

    `iv_percentile` is the dispatcher's, from `iv_history.current_iv_percentile`; chain contracts
    carry none, so without it (None) every contract is denied NO_IV_PERCENTILE: missing IV inputs
    fail closed here, unlike the seed's `validate_option_contract` called without the keyword.
    """
    p = as_params(params)
    o = p.options
    right = right_for(direction)
    if right is None:
        return ContractSelection(None, f"UNKNOWN_DIRECTION: direction={direction!r}")
    if strategy == "day_trade":
        min_dte, max_dte = o.day_trade_min_dte, o.day_trade_max_dte
    elif strategy == "swing_trade":
        min_dte, max_dte = o.swing_trade_min_dte, o.swing_trade_max_dte
    else:
        return ContractSelection(None, f"UNKNOWN_STRATEGY: strategy={strategy!r}")
    spot_d = to_decimal(spot)
    if spot_d is None or spot_d <= 0:
        return ContractSelection(None, f"BAD_SPOT: spot={spot!r}")
    spot_f = float(spot_d)
    now = aware_now(now)
    cal = calendar or nyse_calendar()
    today = et_date(now)
    today_expired = now >= option_expiry_instant(today)

    lo_delta, hi_delta, target = o.min_abs_delta, o.max_abs_delta, o.target_abs_delta
    half_band = max(target - lo_delta, hi_delta - target) or 1.0
    max_spread = o.max_option_spread
    vol_scale = math.log1p(LIQUIDITY_SATURATION * max(o.min_option_volume, 1))
    oi_scale = math.log1p(LIQUIDITY_SATURATION * max(o.min_open_interest, 1))
    w_spread, w_liq, w_delta, w_strike = (
        SCORE_WEIGHTS["spread"],
        SCORE_WEIGHTS["liquidity"],
        SCORE_WEIGHTS["delta_fit"],
        SCORE_WEIGHTS["strike"],
    )

    # Per expiration: (trading days to it, sqrt(years) to its 16:00 ET expiry), or None when
    # it has expired. Computed once per expiration, not once per contract.
    expiry_cache: dict[date, tuple[int, float] | None] = {}
    skipped = {"right": 0, "expired": 0, "dte": 0, "no_delta": 0, "delta_band": 0}
    total = 0
    ranked: list[tuple] = []
    log, erf = math.log, math.erf
    is_call = right == "call"

    for c in chain:
        total += 1
        if c.right != right:
            skipped["right"] += 1
            continue
        exp = c.expiration
        cached = expiry_cache.get(exp, _MISSING)
        if cached is _MISSING:
            cached = _expiry_facts(exp, today, today_expired, now, cal)
            expiry_cache[exp] = cached
        if cached is None:
            skipped["expired"] += 1
            continue
        dte, sqrt_years = cached
        if dte < min_dte or dte > max_dte:
            skipped["dte"] += 1
            continue
        delta = c.delta
        estimated = False
        if delta is None or delta != delta:
            iv = c.implied_volatility
            if iv is None or not iv > 0:
                skipped["no_delta"] += 1
                continue
            # Black-Scholes |delta| without rates or dividends (see estimate_abs_delta), inlined:
            # this runs for every in-window contract of a chain without greeks.
            vol_t = iv * sqrt_years
            d1 = (log(spot_f / float(c.strike)) + 0.5 * vol_t * vol_t) / vol_t
            call_delta = 0.5 * (1.0 + erf(d1 * _INV_SQRT2))
            abs_delta = call_delta if is_call else 1.0 - call_delta
            estimated = True
        else:
            abs_delta = -delta if delta < 0 else delta
        if abs_delta < lo_delta or abs_delta > hi_delta:
            skipped["delta_band"] += 1
            continue

        volume, oi = c.volume, c.open_interest
        liquid, spread = _quick_liquid(c.bid, c.ask, volume, oi, o)
        s_spread = 1.0 - spread / max_spread if spread < max_spread else 0.0
        s_vol = min(1.0, math.log1p(volume) / vol_scale) if volume and volume > 0 else 0.0
        s_oi = min(1.0, math.log1p(oi) / oi_scale) if oi and oi > 0 else 0.0
        s_liq = 0.5 * (s_vol + s_oi)
        s_delta = max(0.0, 1.0 - abs(abs_delta - target) / half_band)
        s_strike = max(0.0, 1.0 - abs(float(c.strike) - spot_f) / spot_f / STRIKE_DISTANCE_ZERO)
        score = w_spread * s_spread + w_liq * s_liq + w_delta * s_delta + w_strike * s_strike
        ranked.append(
            (not liquid, -score, dte, c.symbol, c, abs_delta, estimated, (s_spread, s_liq, s_delta, s_strike))
        )

    if not ranked:
        detail = " ".join(f"{k}={v}" for k, v in skipped.items())
        return ContractSelection(
            None,
            f"NO_CANDIDATE: 0 of {total} {right}s in window dte={min_dte}..{max_dte} "
            f"delta={lo_delta:g}..{hi_delta:g} (skipped {detail})",
        )
    ranked.sort(key=lambda r: r[:4])

    chosen_index = 0
    chosen_gates: list[NamedGate] | None = None
    for i, r in enumerate(ranked):
        if r[0]:  # the rest failed the pre-check, so they fail the gates too
            break
        gates = option_gates(r[4], p, now, iv_percentile, calendar=cal)
        if all(g.result.passed for g in gates):
            chosen_index, chosen_gates = i, gates
            break
    if chosen_gates is None:
        chosen_index = 0
        chosen_gates = option_gates(ranked[0][4], p, now, iv_percentile, calendar=cal)
    validation = validation_from_gates(chosen_gates)
    r = ranked[chosen_index]
    parts = dict(zip(("spread", "liquidity", "delta_fit", "strike"), r[7]))
    choice = ContractChoice(
        contract=r[4],
        right=right,
        dte=r[2],
        abs_delta=r[5],
        delta_estimated=r[6],
        score=-r[1],
        score_parts=parts,
        rank=chosen_index + 1,
        candidates=len(ranked),
        passed=validation.passed,
        reason=validation.reason,
        fallback_to_stock=validation.fallback_to_stock,
        gates=tuple(chosen_gates),
    )
    head = "CHOSEN" if validation.passed else "NO_PASSING_CONTRACT"
    return ContractSelection(
        choice,
        f"{head}: {r[3]} rank={chosen_index + 1}/{len(ranked)} score={-r[1]:.4f} dte={r[2]} "
        f"abs_delta={r[5]:.3f}{' (estimated)' if r[6] else ''}"
        + ("" if validation.passed else f"; best candidate fails: {validation.reason}"),
    )


def size_option_order(
    contract: Any, equity: Decimal, current_exposure: Decimal, params: TradingParams | Mapping
) -> SizeResult:
    """Contracts to buy at the ask, by the shared sizing rule (x100 multiplier, premium cap)."""
    ask = to_decimal(_get(contract, "ask", None))
    if ask is None:
        return SizeResult(0, Decimal(0), "SIZE_ZERO: no ask to size at")
    return size_order("OPTION", ask, equity, current_exposure, as_params(params))

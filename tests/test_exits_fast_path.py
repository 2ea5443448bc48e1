"""The position manager's fast path (`ExitRules.quick_hold`) against the full evaluation.

Over randomized positions and bars on a normal day (2026-11-30), the 13:00 early close
(2026-11-27), an option's expiry day (2026-12-04), a weekend and before the open, with prices
and times drawn at and around every rule's threshold, stale, future-dated and missing bars, and
unreadable positions: the fast path returns a mark exactly when `evaluate` has no decision and
no flag, and that mark is `next_high_water_mark`'s, to the digit.
"""

from __future__ import annotations

import json
from datetime import date, datetime, timedelta
from decimal import Decimal as D

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from services.common.market_calendar import ET, nyse_calendar
from services.common.params import DEFAULT_PARAMS_PATH, default_params, validate_params
from services.domain.exits import ExitRules, HeldPosition, next_high_water_mark

CAL = nyse_calendar()
PARAMS = default_params()


def _variant() -> object:
    """The defaults with a trailing stop that arms at entry and a short holding time."""
    doc = json.loads(DEFAULT_PARAMS_PATH.read_text())
    for strategy in ("day_trade", "swing_trade"):
        doc["exits"][strategy]["max_holding_minutes"] = 30
        for instrument in ("stock", "option"):
            doc["exits"][strategy][instrument]["trailing_activation_pct"] = 0
    return validate_params(doc)


PARAM_SETS = (PARAMS, _variant())

DAYS = (date(2026, 11, 30), date(2026, 11, 27), date(2026, 12, 4), date(2026, 11, 28), date(2026, 12, 24))
# Times of day (ET) at the rules' deadlines and around them: the open, the blocked windows, the
# early and normal closes' flatten (15 min) and option cut-offs (90 and 120 min), the close.
MOMENTS = ("08:00", "09:30", "09:31", "10:00", "11:00", "11:30", "12:45", "12:59:59", "13:00", "13:30",
           "14:00", "14:30", "14:44:59", "14:45", "15:45", "15:59", "16:00", "18:00")
EXPIRATIONS = (None, date(2026, 11, 27), date(2026, 11, 26), date(2026, 11, 30), date(2026, 12, 1),
               date(2026, 12, 4), date(2026, 12, 5), date(2026, 12, 8), date(2026, 12, 18), date(2026, 12, 24),
               date(2027, 1, 15))


@st.composite
def moments(draw) -> datetime:
    day = draw(st.sampled_from(DAYS))
    hhmm = draw(st.sampled_from(MOMENTS)).split(":")
    base = datetime(day.year, day.month, day.day, int(hhmm[0]), int(hhmm[1]), int(hhmm[2]) if len(hhmm) > 2 else 0,
                    tzinfo=ET)
    return base + timedelta(seconds=draw(st.sampled_from((0, 0, 0, -1, 1, 0.5, 37))))


def _price_near(draw, entry: D, params, strategy: str, instrument: str) -> D:
    """A price at, just inside or just past one of the position's thresholds, or anywhere."""
    rules = getattr(params.exits, strategy)
    prices = rules.option if instrument == "OPTION" else rules.stock
    pct = D(str(draw(st.sampled_from((prices.stop_loss_pct, prices.take_profit_pct, prices.trailing_stop_pct,
                                      prices.trailing_activation_pct, 0)))))
    at = entry * (1 + pct) if draw(st.booleans()) else entry * (1 - pct)
    nudge = draw(st.sampled_from((D(0), D(0), D("0.01"), D("-0.01"), D("0.0001"), D("-0.0001"))))
    anywhere = draw(st.decimals(min_value=D("0.01"), max_value=entry * 3, places=4))
    return draw(st.sampled_from((at + nudge, at + nudge, anywhere)))


@st.composite
def cases(draw):
    params = draw(st.sampled_from(PARAM_SETS))
    # Three cases in four are well formed with a fresh bar (where the fast path matters); the
    # fourth may have any field unusual: an unknown instrument, side or strategy, a bad entry or
    # mark, a naive time, a missing, stale or future-dated bar, no price.
    odd = draw(st.sampled_from((False, False, False, True)))

    def pick(usual, unusual=()):
        return draw(st.sampled_from(tuple(usual) + (tuple(unusual) if odd else ())))

    now = draw(moments())
    instrument = pick(("STOCK", "OPTION"), ("FUTURE",))
    side = pick(("long", "short"), ("flat",))
    strategy = pick(("day_trade", "swing_trade"), ("scalp",))
    known = instrument if instrument in ("STOCK", "OPTION") else "STOCK"
    known_strategy = strategy if strategy in ("day_trade", "swing_trade") else "day_trade"
    entry = pick((D("100.00"), D("2.00"), D("37.45"), D("0.55")), (D(0), D(-1), D("NaN")))
    priced = entry.is_finite() and entry > 0
    close = _price_near(draw, entry, params, known_strategy, known) if priced else D("1.00")
    close = pick((close,), (None, D(0), D("-1"), D("Infinity")))
    mark = pick(("none", "entry", "near", "near"), ("bad",))
    high_water_mark = {"none": None, "entry": entry,
                       "near": _price_near(draw, entry, params, known_strategy, known) if priced else None,
                       "bad": draw(st.sampled_from((D(0), D(-5), D("NaN"))))}[mark]
    rules = getattr(params.exits, known_strategy)
    held_for = draw(st.sampled_from((0, 1, 10, 29, 30, 31, 239, 240, 241, 60 * 24, 60 * 24 * 3, 14399, 14400,
                                     14401, -5)))
    opened_at = now - timedelta(minutes=held_for, seconds=draw(st.sampled_from((0, 0, 1, -1, 0.25))))
    opened_at = pick((opened_at,), (opened_at.replace(tzinfo=None),))
    expiration = pick(EXPIRATIONS[1:], (None,)) if instrument == "OPTION" else None
    age = pick((0, 5, rules.stale_bar_seconds - 1, rules.stale_bar_seconds),
               (rules.stale_bar_seconds + 1, 3 * 3600, 24 * 3600))
    bar_ts = now - timedelta(seconds=60 + age)
    skew = params.risk.max_clock_skew_seconds
    bar_ts = pick((bar_ts, now + timedelta(seconds=skew)),
                  (None, now + timedelta(seconds=skew + 1), bar_ts.replace(tzinfo=None)))
    return params, now, (instrument, side, strategy, entry, opened_at, expiration, high_water_mark, bar_ts, close)


def _full(rules: ExitRules, args):
    instrument, side, strategy, entry, opened_at, expiration, high_water_mark, bar_ts, close = args
    position = {"instrument": instrument, "side": side, "strategy": strategy, "avg_price": entry,
                "opened_at": opened_at, "expiration": expiration, "high_water_mark": high_water_mark}
    bar = {"ts": bar_ts, "close": close} if bar_ts is not None else None
    return position, bar, rules.evaluate(position, bar)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
@example((PARAMS, datetime(2026, 11, 30, 12, 0, tzinfo=ET),
          ("STOCK", "long", "day_trade", D("100.00"), datetime(2026, 11, 30, 10, 0, tzinfo=ET), None, None,
           datetime(2026, 11, 30, 11, 59, tzinfo=ET), D("100.50"))))
def test_fast_path_holds_exactly_when_the_full_evaluation_has_no_decision_and_no_flag(case):
    params, now, args = case
    rules = ExitRules(params, now, CAL)
    mark = rules.quick_hold(*args)
    position, bar, evaluation = _full(rules, args)
    holds = evaluation.decision is None and not evaluation.flags
    assert (mark is not None) == holds, (evaluation.decision, evaluation.flags)
    if mark is not None:
        expected = next_high_water_mark(HeldPosition.of(position), bar)
        assert str(mark) == str(expected)


def test_fast_path_over_a_book_when_mostly_holding_then_each_agrees_with_its_full_evaluation():
    """One ExitRules over many positions, as a cycle uses it: the per-pass memos give each the same answer."""
    now = datetime(2026, 11, 27, 12, 40, tzinfo=ET)  # five minutes before the early close's flatten
    rules = ExitRules(PARAMS, now, CAL)
    held = fired = 0
    for i in range(200):
        instrument = "OPTION" if i % 4 == 0 else "STOCK"
        entry = D("2.00") if instrument == "OPTION" else D("100.00")
        strategy = "day_trade" if i % 3 else "swing_trade"
        opened_at = now - timedelta(minutes=i * 7)  # today, yesterday (a day trade left over), last week
        args = (instrument, "short" if i % 5 == 0 else "long", strategy, entry, opened_at,
                EXPIRATIONS[1 + i % (len(EXPIRATIONS) - 1)] if instrument == "OPTION" else None, None,
                now - timedelta(seconds=65), entry * (1 + D(i % 7 - 3) / 100))
        mark = rules.quick_hold(*args)
        _, _, evaluation = _full(rules, args)
        assert (mark is not None) == (evaluation.decision is None and not evaluation.flags)
        held += mark is not None
        fired += evaluation.decision is not None
    assert held > 20 and fired > 20  # both kinds of answer were exercised


def _grid_prices(entry: D, params, strategy: str, instrument: str) -> list[D]:
    rules = getattr(params.exits, strategy)
    prices = rules.option if instrument == "OPTION" else rules.stock
    levels = [entry]
    for pct in (prices.stop_loss_pct, prices.take_profit_pct, prices.trailing_activation_pct):
        levels += [entry * (1 - D(str(pct))), entry * (1 + D(str(pct)))]
    return levels


def test_fast_path_on_a_grid_of_every_price_threshold_exactly_at_and_one_tick_either_side():
    """Every price threshold (stop, target, arming, trailing trigger) exactly at and a tick past, with
    both param sets, each strategy, instrument and side, at deadlines and a second before them."""
    checked = held = 0
    for params in PARAM_SETS:
        for now, opened_minutes in ((datetime(2026, 11, 30, 10, 0, tzinfo=ET), 20),
                                    (datetime(2026, 11, 27, 12, 44, 59, tzinfo=ET), 30),
                                    (datetime(2026, 11, 27, 12, 45, tzinfo=ET), 30),
                                    (datetime(2026, 12, 4, 14, 30, tzinfo=ET), 29)):
            rules = ExitRules(params, now, CAL)
            for strategy in ("day_trade", "swing_trade"):
                for instrument in ("STOCK", "OPTION"):
                    entry = D("2.00") if instrument == "OPTION" else D("100.00")
                    trail = D(str(getattr(getattr(params.exits, strategy),
                                          instrument.lower()).trailing_stop_pct))
                    marks = [None, *_grid_prices(entry, params, strategy, instrument)]
                    for side in ("long", "short"):
                        for mark in marks:
                            base = mark if mark is not None else entry
                            closes = _grid_prices(entry, params, strategy, instrument) + [base * (1 - trail),
                                                                                          base * (1 + trail)]
                            for close in closes:
                                for tick in (D(0), D("0.01"), D("-0.01")):
                                    args = (instrument, side, strategy, entry, now - timedelta(minutes=opened_minutes),
                                            date(2026, 12, 4) if instrument == "OPTION" else None, mark,
                                            now - timedelta(seconds=65), close + tick)
                                    got = rules.quick_hold(*args)
                                    position, bar, evaluation = _full(rules, args)
                                    holds = evaluation.decision is None and not evaluation.flags
                                    assert (got is not None) == holds, (args, evaluation.decision)
                                    if got is not None:
                                        assert str(got) == str(next_high_water_mark(HeldPosition.of(position), bar))
                                    checked += 1
                                    held += holds
    assert held > 100 and checked - held > 100

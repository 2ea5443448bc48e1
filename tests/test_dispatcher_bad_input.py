"""Bad recommendations and bad market data: denied or failed with a code, never an order, and the loop goes on.

DESIGN.md invariants 5 and 10: NaN, zero or negative prices, unknown actions, instruments and
strategies, missing features, stale bars and out-of-range confidence each end in a terminal
status with a reason code, no order reaches the broker for them, and a valid recommendation
queued behind the bad one is still executed. A table pins the exact code of each known case;
hypothesis then throws generated variants at the same loop.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.common.clock import FixedClock
from services.common.db import connect, make_pool
from services.common.params import ParamsInForce, as_params
from services.domain.broker import client_order_id
from services.dispatcher.main import Dispatcher, StaticParams
from services.dispatcher.risk.gates import ACTIONS, INSTRUMENTS
from services.adapters.sim.broker import SimBroker
from tests.factories import ACCOUNT, add_bar, add_features, add_market, add_recommendation, et, recommendation

NOW = et("2026-11-30", "10:00")
BAD, GOOD = "BADT", "GOODT"
RESET = """TRUNCATE dispatch_recommendations, dispatch_executions, active_positions, sim_orders, sim_account,
                    lane_telemetry, lane_features, account_state, kill_switch, kill_switch_history
           RESTART IDENTITY CASCADE"""
CODE = re.compile(r"^[A-Z][A-Z_]+$")
# The limits the cases are written against (a stale bar is older than 180 s, and so on).
PINNED = {"max_bar_age_seconds": 180, "max_feature_age_seconds": 300, "max_clock_skew_seconds": 5, "min_confidence_day_trade": 0.6,
          "max_open_positions": 5, "max_notional_exposure": 10_000, "max_notional_per_trade": 2_000}


@dataclass(frozen=True)
class BadCase:
    """One kind of bad input and its value."""

    kind: str
    value: Any = None


def _bar(conn, ticker: str, ts, *, open_, high, low, close) -> None:
    conn.execute(
        "INSERT INTO lane_telemetry (ticker, ts, open, high, low, close, volume) VALUES (%s, %s, %s, %s, %s, %s, 1000)",
        (ticker, ts, open_, high, low, close),
    )


def plant(conn, case: BadCase) -> int:
    """Market data and a recommendation for BAD, wrong in the way `case` says; returns its id."""
    bar_ts = NOW - timedelta(minutes=1)
    created = NOW - timedelta(seconds=1)  # queued ahead of the valid one
    rec: dict[str, Any] = {}
    if case.kind == "bar_close":
        add_bar(conn, BAD, bar_ts, case.value)  # open = close, high/low around it
        add_features(conn, BAD, bar_ts, 100)
    elif case.kind == "high_below_low":
        _bar(conn, BAD, bar_ts, open_=100, high=99, low=101, close=100)
        add_features(conn, BAD, bar_ts, 100)
    elif case.kind == "stale_bar":
        add_bar(conn, BAD, bar_ts - timedelta(seconds=case.value), 100)
        add_features(conn, BAD, bar_ts, 100)
    elif case.kind == "missing_features":
        add_bar(conn, BAD, bar_ts, 100)
    elif case.kind == "no_bar":
        pass
    else:
        add_market(conn, BAD, NOW, 100)
        if case.kind in ("action", "instrument", "strategy", "confidence"):
            rec[case.kind] = case.value
        elif case.kind != "exit_without_position":
            raise AssertionError(case.kind)
    if case.kind == "exit_without_position":
        rec["action"] = "EXIT"
    return add_recommendation(conn, BAD, created, **rec)


class Loop:
    """One pool and broker for a test; a fresh dispatcher and clean tables for each example."""

    def __init__(self, db_url: str):
        self.db_url = db_url
        self.clock = FixedClock(NOW)
        self.pool = make_pool(db_url)
        params = as_params(PINNED)
        self.params = StaticParams(ParamsInForce(params, "test", "1", params.content_hash()))

    def run(self, case: BadCase) -> tuple[list, dict, dict]:
        with connect(self.db_url) as conn:
            conn.execute(RESET)
            bad_id = plant(conn, case)
            add_market(conn, GOOD, NOW, 100)
            good_id = add_recommendation(conn, GOOD, NOW)
        d = Dispatcher(self.pool, SimBroker(self.pool, ACCOUNT, self.clock), self.params, ACCOUNT, clock=self.clock)
        d.refresh_account(force=True)
        outcomes = d.drain()
        with connect(self.db_url) as conn:
            bad, good = recommendation(conn, bad_id), recommendation(conn, good_id)
            bad["orders"] = conn.execute(
                "SELECT count(*)::int AS n FROM sim_orders WHERE underlying = %s OR client_order_id = %s",
                (BAD, client_order_id(ACCOUNT, bad_id))).fetchone()["n"]
            bad["executions"] = conn.execute(
                "SELECT count(*)::int AS n FROM dispatch_executions WHERE recommendation_id = %s", (bad_id,)
            ).fetchone()["n"]
            good["orders"] = conn.execute(
                "SELECT count(*)::int AS n FROM sim_orders WHERE client_order_id = %s",
                (client_order_id(ACCOUNT, good_id),)).fetchone()["n"]
        return outcomes, bad, good

    def close(self) -> None:
        self.pool.close()


@pytest.fixture
def loop(db_url):
    lp = Loop(db_url)
    yield lp
    lp.close()


def assert_contained(outcomes: list, bad: dict, good: dict) -> None:
    """The bad one ended with a code and no order; the valid one behind it still traded."""
    assert [o.recommendation_id for o in outcomes] == [bad["id"], good["id"]]
    assert bad["status"] in ("SKIPPED", "FAILED"), bad
    assert bad["outcome_code"] and CODE.match(bad["outcome_code"]), bad["outcome_code"]
    assert bad["outcome_detail"]
    assert (bad["orders"], bad["executions"]) == (0, 0)
    if bad["status"] == "SKIPPED":
        failing = [g["code"] for g in bad["gate_results"] if not g["passed"]]
        assert bad["outcome_code"] in failing, bad["gate_results"]
    assert (good["status"], good["outcome_code"], good["orders"]) == ("EXECUTED", "ORDER_FILLED", 1)


KNOWN = [
    (BadCase("bar_close", "NaN"), "BAD_BAR", "bar_freshness"),
    (BadCase("bar_close", "0"), "BAD_BAR", "bar_freshness"),
    (BadCase("bar_close", "-1"), "BAD_BAR", "bar_freshness"),
    (BadCase("bar_close", "Infinity"), "BAD_BAR", "bar_freshness"),
    (BadCase("high_below_low"), "BAD_BAR", "bar_freshness"),
    (BadCase("stale_bar", 600), "STALE_BAR", "bar_freshness"),
    (BadCase("no_bar"), "NO_BAR", "bar_freshness"),
    (BadCase("missing_features"), "NO_FEATURES", "feature_freshness"),
    (BadCase("action", "HOLD"), "UNKNOWN_ACTION", "action_allowed"),
    (BadCase("action", "buy"), "UNKNOWN_ACTION", "action_allowed"),
    (BadCase("instrument", "FUTURE"), "UNKNOWN_INSTRUMENT", "instrument_allowed"),
    (BadCase("strategy", "scalp"), "UNKNOWN_STRATEGY", "confidence"),
    (BadCase("confidence", None), "BAD_CONFIDENCE", "confidence"),
    (BadCase("confidence", Decimal("NaN")), "BAD_CONFIDENCE", "confidence"),
    (BadCase("confidence", Decimal("Infinity")), "BAD_CONFIDENCE", "confidence"),
    (BadCase("confidence", Decimal("1.5")), "BAD_CONFIDENCE", "confidence"),
    (BadCase("confidence", Decimal("-0.1")), "BAD_CONFIDENCE", "confidence"),
    (BadCase("exit_without_position"), "NO_POSITION_TO_EXIT", "open_position"),
]


@pytest.mark.parametrize("case,code,gate_name", KNOWN, ids=[f"{c.kind}={c.value}" for c, _, _ in KNOWN])
def test_bad_recommendation_then_skipped_with_its_code_every_gate_stored_and_the_next_executes(loop, case, code,
                                                                                              gate_name):
    outcomes, bad, good = loop.run(case)

    assert_contained(outcomes, bad, good)
    assert (bad["status"], bad["outcome_code"]) == ("SKIPPED", code)
    assert len(bad["gate_results"]) >= 15
    denied = [g for g in bad["gate_results"] if g["name"] == gate_name]
    assert len(denied) == 1 and (denied[0]["passed"], denied[0]["code"]) == (False, code), bad["gate_results"]


# --- generated --------------------------------------------------------------------------------------

_text = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\x00"), max_size=12)
_out_of_range = st.one_of(
    st.decimals(min_value=Decimal("1.0001"), max_value=Decimal("1e9"), places=4),
    st.decimals(min_value=Decimal("-1e9"), max_value=Decimal("-0.0001"), places=4),
    st.sampled_from([Decimal("NaN"), Decimal("Infinity"), Decimal("-Infinity"), None]),
)
bad_cases = st.one_of(
    st.builds(BadCase, st.just("bar_close"), st.one_of(
        st.sampled_from(["NaN", "Infinity", "-Infinity", "0"]),
        st.decimals(min_value=Decimal("-1e6"), max_value=Decimal("-0.0001"), places=4).map(str),
    )),
    st.builds(BadCase, st.just("high_below_low")),
    st.builds(BadCase, st.just("stale_bar"), st.integers(min_value=181, max_value=7 * 86_400)),
    st.builds(BadCase, st.just("missing_features")),
    st.builds(BadCase, st.just("no_bar")),
    st.builds(BadCase, st.just("action"), _text.filter(lambda s: s not in ACTIONS)),
    st.builds(BadCase, st.just("instrument"), _text.filter(lambda s: s not in INSTRUMENTS)),
    st.builds(BadCase, st.just("strategy"), _text.filter(lambda s: s not in ("day_trade", "swing_trade"))),
    st.builds(BadCase, st.just("confidence"), _out_of_range),
    st.builds(BadCase, st.just("exit_without_position")),
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=bad_cases)
def test_generated_bad_input_never_reaches_the_broker_and_the_loop_goes_on(loop, case):
    outcomes, bad, good = loop.run(case)

    assert_contained(outcomes, bad, good)

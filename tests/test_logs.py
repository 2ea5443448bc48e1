"""The log rate limiter: one warning per subject a minute, the count of what it dropped, errors always.

Driven through a real handler with the JSON formatter and an injected monotonic clock, and
asserted on the JSON lines written.
"""

from __future__ import annotations

import io
import json
import logging

import pytest

from services.common.logs import JsonFormatter, RateLimitFilter


class FakeMonotonic:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


class Captured:
    """A logger whose one handler rate-limits and writes JSON lines into a buffer."""

    def __init__(self, name: str, clock: FakeMonotonic, **kwargs) -> None:
        self.buffer = io.StringIO()
        self.filter = RateLimitFilter(60.0, clock=clock, **kwargs)
        handler = logging.StreamHandler(self.buffer)
        handler.setFormatter(JsonFormatter())
        handler.addFilter(self.filter)
        self.log = logging.getLogger(name)
        self.log.handlers[:] = [handler]
        self.log.setLevel(logging.DEBUG)
        self.log.propagate = False

    def lines(self) -> list[dict]:
        return [json.loads(line) for line in self.buffer.getvalue().splitlines()]


@pytest.fixture
def clock() -> FakeMonotonic:
    return FakeMonotonic()


@pytest.fixture
def captured(request, clock):
    made: list[Captured] = []

    def make(**kwargs) -> Captured:
        c = Captured(f"test-logs.{request.node.name}.{len(made)}", clock, **kwargs)
        made.append(c)
        return c

    yield make
    for c in made:
        c.log.handlers.clear()


def unknown_order(log: logging.Logger, rec_id: int, error: str = "HTTP 504") -> None:
    log.warning("order state unknown",
                extra={"recommendation_id": rec_id, "client_order_id": f"cid-{rec_id}", "error": error})


def test_order_state_unknown_for_different_recommendations_writes_one_line_each(captured):
    c = captured()
    for rec_id in (1, 2, 3):
        unknown_order(c.log, rec_id)

    assert [(l["msg"], l["recommendation_id"]) for l in c.lines()] == [
        ("order state unknown", 1), ("order state unknown", 2), ("order state unknown", 3)]


def test_repeats_of_one_subject_are_dropped_for_a_minute_then_the_next_line_counts_them(captured, clock):
    c = captured()
    unknown_order(c.log, 7, "first")
    for n in range(4):
        clock.advance(10)
        unknown_order(c.log, 7, f"repeat {n}")
    assert [l["error"] for l in c.lines()] == ["first"]

    clock.advance(20)  # 60 s after the first line
    unknown_order(c.log, 7, "after the minute")

    lines = c.lines()
    assert [(l["error"], l.get("suppressed")) for l in lines] == [("first", None), ("after the minute", 4)]


def test_the_count_starts_again_after_it_was_reported(captured, clock):
    c = captured()
    unknown_order(c.log, 7)
    unknown_order(c.log, 7)
    clock.advance(60)
    unknown_order(c.log, 7)  # suppressed=1
    clock.advance(60)
    unknown_order(c.log, 7)  # nothing dropped in between

    assert [l.get("suppressed") for l in c.lines()] == [None, 1, None]


def test_one_subject_being_limited_does_not_hold_back_another(captured, clock):
    c = captured()
    for _ in range(3):
        unknown_order(c.log, 1)
    unknown_order(c.log, 2)
    clock.advance(60)
    unknown_order(c.log, 1)
    unknown_order(c.log, 2)

    assert [(l["recommendation_id"], l.get("suppressed")) for l in c.lines()] == [
        (1, None), (2, None), (1, 2), (2, None)]


@pytest.mark.parametrize(
    "first, second, both_written",
    [
        pytest.param({"ticker": "AAPL"}, {"ticker": "AAPL"}, False, id="same-ticker"),
        pytest.param({"ticker": "AAPL"}, {"ticker": "MSFT"}, True, id="another-ticker"),
        pytest.param({"account_id": "a"}, {"account_id": "b"}, True, id="another-account"),
        pytest.param({"client_order_id": "x"}, {"client_order_id": "y"}, True, id="another-client-order-id"),
        pytest.param({"symbols": ["AAPL"]}, {"symbols": ["MSFT"]}, True, id="other-symbols"),
        pytest.param({"error": "timeout"}, {"error": "HTTP 503"}, False, id="a-detail-is-not-a-subject"),
        pytest.param({}, {}, False, id="no-subject-at-all"),
    ],
)
def test_the_subject_is_the_message_plus_the_identifying_extras_present(captured, first, second, both_written):
    c = captured()
    c.log.warning("reconcile lookup failed", extra=first)
    c.log.warning("reconcile lookup failed", extra=second)
    assert len(c.lines()) == (2 if both_written else 1)


def test_errors_are_never_rate_limited(captured):
    c = captured()
    for _ in range(5):
        c.log.error("database unavailable; retrying", extra={"error": "connection refused"})
    unknown_order(c.log, 1)
    for _ in range(3):
        c.log.error("order state unknown", extra={"recommendation_id": 1})

    lines = c.lines()
    assert [l["level"] for l in lines] == ["error"] * 5 + ["warning"] + ["error"] * 3
    assert all("suppressed" not in l for l in lines)


def test_decision_warnings_are_never_rate_limited(captured):
    c = captured()
    for _ in range(3):
        c.log.warning("decision", extra={"decision": "SKIPPED", "code": "STALE_BAR", "ticker": "AAPL"})
    assert len(c.lines()) == 3


def test_idle_subjects_are_forgotten_so_one_per_recommendation_stays_bounded(captured, clock):
    c = captured()
    for rec_id in range(100):
        unknown_order(c.log, rec_id)
    assert c.filter.tracked == 100
    clock.advance(61)
    unknown_order(c.log, 1000)  # the next line after a quiet minute prunes the idle ones
    assert c.filter.tracked == 1
    assert len(c.lines()) == 101


def test_a_subject_with_a_pending_count_is_kept_until_it_is_reported(captured, clock):
    c = captured()
    unknown_order(c.log, 1)
    unknown_order(c.log, 1)  # dropped: its count waits for the next line
    clock.advance(61)
    unknown_order(c.log, 2)  # prunes, but not subject 1
    clock.advance(200)
    unknown_order(c.log, 1)

    assert [(l["recommendation_id"], l.get("suppressed")) for l in c.lines()] == [(1, None), (2, None), (1, 1)]


def test_past_max_subjects_the_oldest_are_forgotten(captured):
    c = captured(max_subjects=3)
    for rec_id in range(5):
        unknown_order(c.log, rec_id)
    assert c.filter.tracked == 3
    unknown_order(c.log, 0)  # forgotten, so written again
    unknown_order(c.log, 4)  # still remembered, so dropped
    assert [l["recommendation_id"] for l in c.lines()] == [0, 1, 2, 3, 4, 0]

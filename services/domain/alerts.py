"""What an operator is told, and when: the alert events, their dedupe and their text. Pure.

Sending lives in services/adapters/alerts.py; this module decides what an alert says, whether
it is a repeat, and what must never leave the process (secrets).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from enum import StrEnum
from typing import Any

from services.common.logs import redact


class Event(StrEnum):
    """Every event an operator must act on. The value is the stable name sinks and filters see."""

    KILL_SWITCH_TRIP = "KILL_SWITCH_TRIP"
    HALT = "HALT"
    RESUME = "RESUME"
    FLATTEN = "FLATTEN"
    UNKNOWN_BROKER_ORDER = "UNKNOWN_BROKER_ORDER"
    UNKNOWN_BROKER_POSITION = "UNKNOWN_BROKER_POSITION"
    PARAMS_REFUSED = "PARAMS_REFUSED"
    PARAMS_FALLBACK = "PARAMS_FALLBACK"
    BROKER_UNAVAILABLE = "BROKER_UNAVAILABLE"
    DATA_STALE = "DATA_STALE"
    LOOP_FAILURES = "LOOP_FAILURES"
    ORDER_REJECTED = "ORDER_REJECTED"


# What each event means for the operator, first line of every message.
SUMMARY: dict[Event, str] = {
    Event.KILL_SWITCH_TRIP: "kill switch tripped: only risk-reducing orders go out",
    Event.HALT: "trading halted: nothing goes out until an operator resumes",
    Event.RESUME: "trading resumed",
    Event.FLATTEN: "positions being flattened",
    Event.UNKNOWN_BROKER_ORDER: "the broker has an order this database does not know: entries stopped",
    Event.UNKNOWN_BROKER_POSITION: "the broker holds a position this database does not know: entries stopped",
    Event.PARAMS_REFUSED: "a params document was refused; the previous one stays in force",
    Event.PARAMS_FALLBACK: "params from SSM unavailable at start-up; a fallback document is in force",
    Event.BROKER_UNAVAILABLE: "the broker has been unreachable",
    Event.DATA_STALE: "watched tickers have stale bars during the session: their entries are denied",
    Event.LOOP_FAILURES: "a service loop keeps failing",
    Event.ORDER_REJECTED: "the broker rejected an order",
}

SEVERITY: dict[Event, str] = {
    Event.KILL_SWITCH_TRIP: "critical", Event.HALT: "critical", Event.FLATTEN: "critical",
    Event.UNKNOWN_BROKER_ORDER: "critical", Event.UNKNOWN_BROKER_POSITION: "critical",
    Event.BROKER_UNAVAILABLE: "critical", Event.LOOP_FAILURES: "critical",
    Event.PARAMS_REFUSED: "warning", Event.PARAMS_FALLBACK: "warning", Event.DATA_STALE: "warning",
    Event.ORDER_REJECTED: "warning", Event.RESUME: "info",
}


def kill_switch_event(state: str) -> Event:
    """The alert for a kill-switch state being set: REDUCING is a trip, HALTED a halt, ACTIVE a resume."""
    return {"REDUCING": Event.KILL_SWITCH_TRIP, "HALTED": Event.HALT}.get(state, Event.RESUME)


@dataclass(frozen=True)
class Alert:
    """One event about one subject (an account, a service, a params source), with scrubbed fields."""

    event: Event
    subject: str
    at: datetime
    fields: Mapping[str, Any] = field(default_factory=dict)

    @property
    def severity(self) -> str:
        return SEVERITY[self.event]

    @property
    def title(self) -> str:
        return f"[{self.severity.upper()}] {self.event.value} {self.subject}"

    def text(self) -> str:
        """The body every sink carries: the summary, then one `key: value` line per field."""
        lines = [f"{self.title}: {SUMMARY[self.event]}", f"at: {self.at.isoformat()}"]
        lines += [f"{k}: {_plain(v)}" for k, v in self.fields.items()]
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {"event": self.event.value, "subject": self.subject, "severity": self.severity,
                "at": self.at.isoformat(), "summary": SUMMARY[self.event],
                "fields": {k: _plain(v) for k, v in self.fields.items()}}


def slack_payload(alert: Alert) -> dict[str, Any]:
    """A Slack-compatible incoming-webhook body: `text` for Slack, the structured alert beside it."""
    return {"text": alert.text(), "alert": alert.as_dict()}


def sns_subject(alert: Alert) -> str:
    """SNS subjects are ASCII, at most 100 characters, without line breaks."""
    ascii_only = alert.title.encode("ascii", "replace").decode().replace("\n", " ")
    return ascii_only[:100]


# --- Never a secret ------------------------------------------------------------------------

_SECRET_KEY = re.compile(r"(secret|password|passwd|token|api_?key|credential|authorization|private|session_key)",
                         re.IGNORECASE)
_URL_PASSWORD = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://[^:/@\s]+):(?P<pw>[^@\s]+)@", re.IGNORECASE)
_AWS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b")


def scrub(fields: Mapping[str, Any]) -> dict[str, Any]:
    """The fields an alert may carry: a field named like a secret is masked whatever its value;
    every other value has registered secrets, Alpaca/AWS key ids and URL passwords masked."""
    return {str(k): ("***" if _SECRET_KEY.search(str(k)) else _scrub_value(v)) for k, v in fields.items()}


def _scrub_value(value: Any) -> Any:
    if isinstance(value, Mapping):
        return scrub(value)
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_scrub_value(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, Decimal, datetime)):
        return value
    text = redact(str(value))
    text = _URL_PASSWORD.sub(lambda m: f"{m.group('scheme')}:***@", text)
    return _AWS_KEY_ID.sub("***", text)


def _plain(value: Any) -> Any:
    """JSON-safe values: Decimal and datetime as text; containers kept."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


# --- Dedupe and thresholds -------------------------------------------------------------------


class Deduper:
    """One alert per (event, subject) per window, on a monotonic clock passed in.

    Keys idle past the window are forgotten when the map grows past `max_keys`, so one subject
    per ticker or order cannot grow it without bound.
    """

    def __init__(self, window_seconds: float, max_keys: int = 10_000):
        self.window = window_seconds
        self.max_keys = max_keys
        self._sent: dict[tuple[str, str], float] = {}
        self.suppressed = 0

    def admit(self, event: Event, subject: str, now: float) -> bool:
        key = (event.value, subject)
        last = self._sent.get(key)
        if last is not None and now - last < self.window:
            self.suppressed += 1
            return False
        self._sent[key] = now
        if len(self._sent) > self.max_keys:
            self._sent = {k: t for k, t in self._sent.items() if now - t < self.window}
        return True


class Outage:
    """How long something has been failing: the first failure since the last success."""

    def __init__(self) -> None:
        self.since: dict[str, float] = {}
        self.failures: dict[str, int] = {}

    def failed(self, subject: str, now: float) -> tuple[float, int]:
        """Record a failure; returns (seconds since the first one, consecutive failures)."""
        started = self.since.setdefault(subject, now)
        self.failures[subject] = self.failures.get(subject, 0) + 1
        return now - started, self.failures[subject]

    def ok(self, subject: str) -> None:
        self.since.pop(subject, None)
        self.failures.pop(subject, None)


# --- Stale data ------------------------------------------------------------------------------

BAR_SECONDS = 60


def stale_data_watch_due(now: datetime, session: Any, max_bar_age_seconds: int) -> bool:
    """Whether stale bars are news at `now`: only inside the session, and only once its first bar
    has had time to arrive and age past the limit (before that, yesterday's close is stale by
    definition and says nothing about today's feed)."""
    if session is None:
        return False
    first_judgeable = session.open + timedelta(seconds=BAR_SECONDS + max_bar_age_seconds)
    return first_judgeable <= now < session.close

"""Structured JSON logs: one object per line, with the record's `extra` fields.

Secrets never reach a log line: configure_logging installs a filter that replaces every
registered secret value (and anything that looks like an Alpaca key) with `***`.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
_SECRETS: set[str] = set()
_KEY_PATTERN = re.compile(r"\b(?:PK|AK|CK)[A-Z0-9]{14,}\b")


def register_secret(value: str | None) -> None:
    """Redact this value wherever it would appear in a log line."""
    if value and len(value) >= 4:
        _SECRETS.add(value)


def redact(text: str) -> str:
    for secret in _SECRETS:
        text = text.replace(secret, "***")
    return _KEY_PATTERN.sub("***", text)


def json_default(value: Any) -> Any:
    """JSON for the values our records carry: Decimal as a number, datetime as ISO 8601."""
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                payload[key] = value
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        return redact(json.dumps(payload, default=json_default))


# Extras that name what a line is about. Two warnings alike but for one of these are two
# events (two recommendations whose order state is unknown), not one event repeated.
SUBJECT_FIELDS = ("account_id", "recommendation_id", "client_order_id", "ticker", "symbol", "symbols")


class RateLimitFilter(logging.Filter):
    """At most one warning per subject each `interval` seconds, and a count of what was dropped.

    A subject is the logger, the message and whichever SUBJECT_FIELDS the record carries. The
    first line written for a subject after its interval carries `suppressed=N`, the number of
    its lines dropped since the last one written. Errors and decision lines are never dropped.

    Subjects idle for a whole interval are forgotten (their next line is written anyway), so
    one subject per recommendation does not grow without bound; past `max_subjects` the oldest
    are forgotten even with a count pending.
    """

    def __init__(self, interval: float = 60.0, *, clock: Callable[[], float] = time.monotonic,
                 max_subjects: int = 10_000):
        super().__init__()
        self.interval = interval
        self.max_subjects = max_subjects
        self._clock = clock
        self._lock = threading.Lock()
        # subject -> [time its last line was written, lines dropped since]; oldest first
        self._subjects: dict[tuple, list] = {}
        self._next_prune = clock() + interval

    @property
    def tracked(self) -> int:
        """How many subjects are remembered now."""
        return len(self._subjects)

    def filter(self, record: logging.LogRecord) -> bool:
        # Only warnings repeat harmlessly; an error is always written, whatever its neighbours said.
        if record.levelno != logging.WARNING or getattr(record, "decision", None) is not None:
            return True
        key = _subject(record)
        now = self._clock()
        with self._lock:
            if now >= self._next_prune:
                self._prune(now)
            entry = self._subjects.get(key)
            if entry is not None and now - entry[0] < self.interval:
                entry[1] += 1
                return False
            suppressed = entry[1] if entry is not None else 0
            self._subjects.pop(key, None)  # re-inserted last: the dict stays in order of last write
            self._subjects[key] = [now, 0]
            while len(self._subjects) > self.max_subjects:
                del self._subjects[next(iter(self._subjects))]
        if suppressed:
            record.suppressed = suppressed
        return True

    def _prune(self, now: float) -> None:
        self._next_prune = now + self.interval
        idle = [k for k, (last, dropped) in self._subjects.items() if dropped == 0 and now - last >= self.interval]
        for key in idle:
            del self._subjects[key]


def _subject(record: logging.LogRecord) -> tuple:
    extras = tuple((name, str(value)) for name in SUBJECT_FIELDS
                   if (value := getattr(record, name, None)) is not None)
    return record.name, record.getMessage(), extras


def configure_logging(level: str = "INFO", stream=None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RateLimitFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # The embedded server narrates every pg_ctl call at INFO; its warnings still come through.
    logging.getLogger("pgserver").setLevel(logging.WARNING)

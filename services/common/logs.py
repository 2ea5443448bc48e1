"""Structured JSON logs: one object per line, with the record's `extra` fields.

Secrets never reach a log line: configure_logging installs a filter that replaces every
registered secret value (and anything that looks like an Alpaca key) with `***`.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
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


class RateLimitFilter(logging.Filter):
    """Drop a repeated identical warning more than once per `interval` seconds."""

    def __init__(self, interval: float = 60.0):
        super().__init__()
        self.interval = interval
        self._last: dict[tuple[str, str], float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        # Only warnings repeat harmlessly; an error is always written, whatever its neighbours said.
        if record.levelno != logging.WARNING or getattr(record, "decision", None) is not None:
            return True
        key = (record.name, record.getMessage())
        now = time.monotonic()
        if now - self._last.get(key, -1e9) < self.interval:
            return False
        self._last[key] = now
        return True


def configure_logging(level: str = "INFO", stream=None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RateLimitFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # The embedded server narrates every pg_ctl call at INFO; its warnings still come through.
    logging.getLogger("pgserver").setLevel(logging.WARNING)

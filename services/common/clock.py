"""Clocks: the code asks an injected clock for `now`, so tests and the demo control time."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone
from typing import Protocol


class Clock(Protocol):
    def now(self) -> datetime:
        """An aware UTC datetime."""
        ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(timezone.utc)


class FixedClock:
    """A clock that moves only when told to: tests and the simulated session."""

    def __init__(self, start: datetime):
        if start.tzinfo is None:
            raise ValueError("FixedClock needs an aware datetime")
        self._now = start.astimezone(timezone.utc)
        self._lock = threading.Lock()

    def now(self) -> datetime:
        with self._lock:
            return self._now

    def set(self, when: datetime) -> None:
        if when.tzinfo is None:
            raise ValueError("FixedClock needs an aware datetime")
        with self._lock:
            self._now = when.astimezone(timezone.utc)

    def advance(self, delta: timedelta) -> datetime:
        with self._lock:
            self._now += delta
            return self._now


class OffsetClock:
    """Real time shifted by a constant: a replay or benchmark that runs inside a past session."""

    def __init__(self, offset: timedelta):
        self.offset = offset

    @classmethod
    def starting_at(cls, start: datetime) -> OffsetClock:
        return cls(start - datetime.now(timezone.utc))

    def now(self) -> datetime:
        return datetime.now(timezone.utc) + self.offset

"""The broker request budget: Alpaca's 200 trading-API requests a minute, per account.

The limit belongs to the account, not to a process: four dispatchers with a bucket each asked
up to 340 a minute and got 429s, order submits among them. `PostgresRequestBudget` keeps one
token bucket per account in Postgres, so every process trading the account spends the same
tokens; `LocalRequestBudget` is the same bucket in memory, for a single process (the demo,
market data, tools).

Orders come first. Both kinds of request spend the same tokens, but a read takes one only
while more than `read_reserve` are left: the reserve is for order submits and cancels, which
may spend the bucket to the last token. When reads are waiting for the bucket to climb back
above the reserve, an order takes the refilled token before them.

A bucket of `capacity` tokens refilled at `requests_per_minute` lets through at most
capacity + requests_per_minute requests in any 60 s, so the two must add up to <= 200.

`acquire(kind)` never sleeps: it takes a token and answers 0.0, or answers how long to wait
before asking again. The caller sleeps, so it can give up instead when a deadline is near.

`claim_lookups` keeps the dispatchers from all asking the broker about the same orphaned or
unfilled order on every recovery pass: the first to claim an order asks, the others skip it
for `min_interval`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Protocol

import psycopg

ALPACA_REQUESTS_PER_MINUTE = 200


class RequestKind(StrEnum):
    ORDER = "order"  # submit, replace, cancel: may spend the whole budget
    READ = "read"  # everything else: leaves the reserve to orders


class RequestBudget(Protocol):
    def acquire(self, kind: RequestKind) -> float:
        """Take one request's token (0.0), or the seconds to wait before asking again."""
        ...


class RequestBudgetUnavailable(Exception):
    """The shared budget could not be read (the database is unreachable).

    Nothing was sent to the broker. Resolves itself when the database is back; until then no
    trading request leaves, as the budget of the account cannot be known.
    """


def check_limits(requests_per_minute: float, capacity: int, read_reserve: int) -> None:
    if requests_per_minute <= 0 or capacity < 1:
        raise ValueError("requests_per_minute must be > 0 and capacity >= 1")
    if requests_per_minute + capacity > ALPACA_REQUESTS_PER_MINUTE:
        raise ValueError(
            f"capacity + requests_per_minute must be <= {ALPACA_REQUESTS_PER_MINUTE}: a full bucket "
            f"then a minute of refill is {capacity + requests_per_minute} requests in 60 s"
        )
    if not 0 <= read_reserve < capacity:
        raise ValueError("read_reserve must be >= 0 and below capacity")


# A token is "there" within this much: a wait computed to the token's arrival can land a hair
# short of it in floating point (or a clock's resolution), and asking again must then succeed
# rather than ask for a wait too small to move the clock.
EPSILON = 1e-5


def _floor(kind: RequestKind, read_reserve: int) -> float:
    """The tokens that must be left after this request takes one."""
    return 0.0 if kind == RequestKind.ORDER else float(read_reserve)


class LocalRequestBudget:
    """The budget of one process, in memory (thread-safe)."""

    def __init__(
        self,
        requests_per_minute: float,
        capacity: int,
        read_reserve: int = 0,
        *,
        monotonic: Callable[[], float] = time.monotonic,
    ):
        check_limits(requests_per_minute, capacity, read_reserve)
        self.rate_per_second = requests_per_minute / 60.0
        self.capacity = capacity
        self.read_reserve = read_reserve
        self._monotonic = monotonic
        self._tokens = float(capacity)
        self._last = monotonic()
        self._lock = threading.Lock()

    def acquire(self, kind: RequestKind = RequestKind.READ) -> float:
        with self._lock:
            now = self._monotonic()
            level = min(self.capacity, self._tokens + max(0.0, now - self._last) * self.rate_per_second)
            self._last = max(self._last, now)
            need = _floor(kind, self.read_reserve) + 1.0
            if level >= need - EPSILON:
                self._tokens = level - 1.0
                return 0.0
            self._tokens = level
            return (need - level) / self.rate_per_second


# -- take_token --
# Refill the account's bucket for the time since it was last touched, and take one token if
# more than `floor` would be left; one statement, one round trip. FOR UPDATE in the CTE takes
# the row lock first, so concurrent takers queue on the row and each computes from the
# version the previous one wrote (READ COMMITTED re-reads a row it waited for).
# `now` is the caller's clock, or the database's when NULL: one clock for every process.
TAKE_TOKEN = """
WITH cur AS (
    SELECT b.account_id, t.now,
           least(%(capacity)s::float8,
                 b.tokens + %(rate)s::float8 * greatest(0, extract(epoch FROM t.now - b.refilled_at)::float8)) AS level
    FROM broker_request_budget b,
         (SELECT COALESCE(%(now)s::timestamptz, clock_timestamp()) AS now) t
    WHERE b.account_id = %(account_id)s
    FOR UPDATE OF b
)
UPDATE broker_request_budget b
SET tokens = CASE WHEN cur.level >= %(floor)s::float8 + 1 - %(epsilon)s THEN cur.level - 1 ELSE cur.level END,
    refilled_at = greatest(b.refilled_at, cur.now)
FROM cur
WHERE b.account_id = cur.account_id
RETURNING CASE WHEN cur.level >= %(floor)s::float8 + 1 - %(epsilon)s THEN 0.0
               ELSE (%(floor)s::float8 + 1 - cur.level) / %(rate)s::float8 END AS wait_s
"""

# -- ensure_budget --
# The account's bucket, full, the first time any process asks.
ENSURE_BUDGET = """
INSERT INTO broker_request_budget (account_id, tokens, refilled_at)
VALUES (%(account_id)s, %(capacity)s, COALESCE(%(now)s::timestamptz, clock_timestamp()))
ON CONFLICT (account_id) DO NOTHING
"""

# -- claim_lookups --
# Of the given orders, those no process has asked the broker about within `min_interval`,
# stamped as asked now. ON CONFLICT re-checks the WHERE against the row another process may
# have just written, so two processes never both claim one order in one interval. Stamps older
# than a day are of orders long settled: dropped in passing.
CLAIM_LOOKUPS = """
WITH old AS (
    DELETE FROM broker_order_lookups
    WHERE account_id = %(account_id)s AND looked_at < %(now)s - interval '1 day'
      AND client_order_id <> ALL(%(client_order_ids)s::text[])
)
INSERT INTO broker_order_lookups (account_id, client_order_id, looked_at)
SELECT %(account_id)s, cid, %(now)s FROM unnest(%(client_order_ids)s::text[]) AS cid
ON CONFLICT (account_id, client_order_id) DO UPDATE SET looked_at = EXCLUDED.looked_at
WHERE broker_order_lookups.looked_at <= EXCLUDED.looked_at - %(min_interval)s
RETURNING client_order_id
"""

LOOKUP_INTERVAL = timedelta(seconds=25)


class PostgresRequestBudget:
    """The account's budget in Postgres, shared by every process trading the account.

    One dedicated autocommit connection (not the dispatcher's pool: a broker call made while
    the pool is busy must not wait for a pooled connection), reopened once on failure.
    """

    def __init__(
        self,
        conninfo: str,
        account_id: str,
        *,
        requests_per_minute: float = 180,
        capacity: int = 20,
        read_reserve: int = 10,
        now: Callable[[], datetime] | None = None,
        application_name: str = "ops-request-budget",
    ):
        check_limits(requests_per_minute, capacity, read_reserve)
        self.account_id = account_id
        self.rate_per_second = requests_per_minute / 60.0
        self.capacity = capacity
        self.read_reserve = read_reserve
        self._conninfo = conninfo
        self._now = now
        self._application_name = application_name
        self._conn: psycopg.Connection | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"PostgresRequestBudget(account_id={self.account_id!r}, capacity={self.capacity})"

    def acquire(self, kind: RequestKind = RequestKind.READ) -> float:
        params = {
            "account_id": self.account_id,
            "capacity": self.capacity,
            "rate": self.rate_per_second,
            "floor": _floor(kind, self.read_reserve),
            "epsilon": EPSILON,
            "now": self._now() if self._now is not None else None,
        }
        with self._lock:
            for attempt in (1, 2):
                try:
                    conn = self._connection()
                    row = conn.execute(TAKE_TOKEN, params).fetchone()
                    if row is None:
                        conn.execute(ENSURE_BUDGET, params)
                        row = conn.execute(TAKE_TOKEN, params).fetchone()
                    return float(row[0])
                except (psycopg.OperationalError, psycopg.InterfaceError) as e:
                    self.close()
                    if attempt == 2:
                        raise RequestBudgetUnavailable(f"request budget of {self.account_id}: {e}") from e
        raise AssertionError("unreachable")

    def _connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(
                self._conninfo, autocommit=True, application_name=self._application_name[:63]
            )
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None


def claim_lookups(
    conn: psycopg.Connection,
    account_id: str,
    client_order_ids: Iterable[str],
    now: datetime,
    min_interval: timedelta = LOOKUP_INTERVAL,
) -> set[str]:
    """The orders this process may ask the broker about now; the others were asked moments ago.

    Call it before each recovery pass's broker lookups and skip the orders it leaves out: the
    process that claimed one records the broker's answer, which the others then read from the
    database.
    """
    if now.tzinfo is None:
        raise ValueError("now must be aware")
    ids = sorted(set(client_order_ids))
    if not ids:
        return set()
    rows = conn.execute(
        CLAIM_LOOKUPS,
        {"account_id": account_id, "client_order_ids": ids, "now": now, "min_interval": min_interval},
    ).fetchall()
    return {row["client_order_id"] if isinstance(row, dict) else row[0] for row in rows}

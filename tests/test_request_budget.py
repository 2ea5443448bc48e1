"""The account's request budget shared in Postgres, the shared lookup claims, and the deadline.

Alpaca's 200 requests a minute belong to the account: several dispatchers, each with its own
adapter, must jointly stay under them, and order submits must never be the ones refused.
"""

from __future__ import annotations

import heapq
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone

import pytest

from services.common import db as dbmod
from services.common.clock import FixedClock
from services.adapters.alpaca.client import AlpacaBroker, local_trading_budget
from services.adapters.alpaca.settings import AlpacaSettings
from services.domain.broker import BrokerUnavailable, OrderRequest, OrderStateUnknown, submit_exactly_once
from services.adapters.postgres.request_budget import (
    PostgresRequestBudget,
    RequestKind,
    claim_lookups,
)
from tests.fake_alpaca import FAKE_KEY, FAKE_SECRET, FakeAlpaca, fake_alpaca  # noqa: F401

UTC = timezone.utc
START = datetime(2026, 11, 30, 15, 0, tzinfo=UTC)
ACCOUNT = "paper-main"


class VirtualTime:
    """Time that moves only when every worker sleeps, and then to the earliest wake-up.

    An HTTP request or a database round trip takes no time on it, so what the server sees
    at an instant is exactly what the budgets granted at that instant.
    """

    def __init__(self, start: datetime, workers: int):
        self.start = start
        self._t = 0.0
        self._running = workers
        self._wakes: list[float] = []
        self._cond = threading.Condition()

    def monotonic(self) -> float:
        with self._cond:
            return self._t

    def now(self) -> datetime:
        return self.start + timedelta(seconds=self.monotonic())

    def sleep(self, seconds: float) -> None:
        with self._cond:
            wake = self._t + seconds
            if wake <= self._t:
                return
            heapq.heappush(self._wakes, wake)
            self._running -= 1
            self._advance()
            while self._t < wake:
                self._cond.wait()

    def done(self) -> None:
        with self._cond:
            self._running -= 1
            self._advance()

    def _advance(self) -> None:
        if self._running == 0 and self._wakes:
            self._t = self._wakes[0]
            while self._wakes and self._wakes[0] <= self._t:
                heapq.heappop(self._wakes)
                self._running += 1  # counted here, so no one advances past a waking worker
            self._cond.notify_all()


def settings(fake: FakeAlpaca, **overrides) -> AlpacaSettings:
    values = dict(api_key=FAKE_KEY, secret_key=FAKE_SECRET, trading_url=fake.url, timeout_seconds=2.0)
    values.update(overrides)
    return AlpacaSettings(**values)


def order(coid: str) -> OrderRequest:
    return OrderRequest(client_order_id=coid, symbol="SPY", underlying="SPY", instrument="STOCK", side="buy", qty=1)


def busiest_minute(stamps: list[datetime]) -> int:
    stamps = sorted(stamps)
    return max(sum(1 for t in stamps if s <= t < s + timedelta(seconds=60)) for s in stamps)


WORKERS = 4
STEPS = 75  # 4 x 75 = 300 requests, half as much again as a minute allows
SUBMIT_EVERY = 5


def run_workers(fake: FakeAlpaca, clock: VirtualTime, make_budget) -> list[str]:
    """WORKERS adapters, each reading the account and submitting an order every SUBMIT_EVERY steps."""
    errors: list[str] = []

    def work(w: int) -> None:
        try:
            adapter = AlpacaBroker(
                settings(fake), clock=FixedClock(START), budget=make_budget(),
                sleep=clock.sleep, monotonic=clock.monotonic,
            )
            for i in range(STEPS):
                try:
                    if i % SUBMIT_EVERY == 0:
                        submit_exactly_once(adapter, order(f"ops-{w}-{i}"))
                    else:
                        adapter.get_account()
                except BrokerUnavailable as e:
                    errors.append(str(e))
        finally:
            clock.done()

    with ThreadPoolExecutor(WORKERS) as pool:
        list(pool.map(work, range(WORKERS)))
    return errors


def test_several_adapters_sharing_the_postgres_budget_never_exceed_200_a_minute_nor_see_a_429(db_url):
    clock = VirtualTime(START, WORKERS)
    budgets: list[PostgresRequestBudget] = []

    def make_budget() -> PostgresRequestBudget:
        budget = PostgresRequestBudget(db_url, ACCOUNT, now=clock.now)
        budgets.append(budget)
        return budget

    with FakeAlpaca(now=clock.now, rate_limit_per_minute=200) as fake:
        errors = run_workers(fake, clock, make_budget)
        seen = list(fake.requests)
        booked = set(fake.orders)
    for budget in budgets:
        budget.close()

    assert errors == []
    assert len(seen) == WORKERS * STEPS
    assert [r for r in seen if r.status != 200] == []  # not one 429, submits or reads
    assert busiest_minute([r.at for r in seen]) <= 200
    assert clock.now() - START > timedelta(seconds=60)  # the work did need more than a minute
    assert booked == {f"ops-{w}-{i}" for w in range(WORKERS) for i in range(0, STEPS, SUBMIT_EVERY)}


def test_several_adapters_with_a_budget_each_are_refused_past_200_a_minute():
    """The same work with a bucket per process, as before: the server's limit is real."""
    clock = VirtualTime(START, WORKERS)

    with FakeAlpaca(now=clock.now, rate_limit_per_minute=200) as fake:
        run_workers(fake, clock, lambda: local_trading_budget(settings(fake), clock.monotonic))
        refused = [r for r in fake.requests if r.status == 429]

    assert refused


def test_orders_spend_the_reserve_that_reads_leave(db_url):
    clock = FixedClock(START)
    reads = PostgresRequestBudget(db_url, ACCOUNT, requests_per_minute=60, capacity=20, read_reserve=10, now=clock.now)
    orders = PostgresRequestBudget(db_url, ACCOUNT, requests_per_minute=60, capacity=20, read_reserve=10, now=clock.now)
    try:
        assert [reads.acquire(RequestKind.READ) for _ in range(10)] == [0.0] * 10
        assert reads.acquire(RequestKind.READ) == pytest.approx(1.0)  # 10 left: the reserve
        assert [orders.acquire(RequestKind.ORDER) for _ in range(10)] == [0.0] * 10
        assert orders.acquire(RequestKind.ORDER) == pytest.approx(1.0)
        clock.advance(timedelta(seconds=1))
        assert reads.acquire(RequestKind.READ) == pytest.approx(10.0)
        assert orders.acquire(RequestKind.ORDER) == 0.0  # the refilled token goes to the order
    finally:
        reads.close()
        orders.close()


def test_postgres_budget_under_concurrent_takers_grants_exactly_the_bucket(db_url):
    clock = FixedClock(START)  # no time passes: no refill, exactly `capacity` tokens to share
    budgets = [PostgresRequestBudget(db_url, ACCOUNT, capacity=20, read_reserve=5, now=clock.now) for _ in range(8)]

    def take(budget: PostgresRequestBudget) -> list[float]:
        return [budget.acquire(RequestKind.ORDER) for _ in range(10)]

    try:
        with ThreadPoolExecutor(8) as pool:
            waits = [w for ws in pool.map(take, budgets) for w in ws]
    finally:
        for budget in budgets:
            budget.close()

    assert waits.count(0.0) == 20
    with dbmod.connect(db_url) as conn:
        row = conn.execute("SELECT tokens FROM broker_request_budget WHERE account_id = %s", (ACCOUNT,)).fetchone()
    assert row["tokens"] == pytest.approx(0.0, abs=1e-4)


def test_postgres_budget_when_database_unreachable_then_nothing_is_sent(fake_alpaca):
    budget = PostgresRequestBudget("postgresql://nobody@127.0.0.1:1/none?connect_timeout=1", ACCOUNT)
    adapter = AlpacaBroker(settings(fake_alpaca, submit_retry_seconds=0.6), budget=budget, sleep=lambda s: None)

    with pytest.raises(BrokerUnavailable, match="request budget"):
        adapter.submit_order(order("ops-1-0-db"))

    assert fake_alpaca.requests == []


def test_claim_lookups_lets_one_process_ask_about_an_order_per_interval(db_url):
    ids = [f"ops-{i}-0-x" for i in range(6)]

    def claim(at: datetime) -> set[str]:
        with dbmod.connect(db_url) as conn:
            return claim_lookups(conn, ACCOUNT, ids, at, timedelta(seconds=25))

    with ThreadPoolExecutor(4) as pool:
        claimed = list(pool.map(lambda _: claim(START), range(4)))

    assert sorted(c for got in claimed for c in got) == sorted(ids)  # each order once, by one process
    assert claim(START + timedelta(seconds=10)) == set()
    assert claim(START + timedelta(seconds=25)) == set(ids)
    with dbmod.connect(db_url) as conn:
        assert claim_lookups(conn, "other-account", ids[:1], START, timedelta(seconds=25)) == set(ids[:1])
        assert claim_lookups(conn, ACCOUNT, [], START) == set()


# Deadline -------------------------------------------------------------------------------------


def test_submit_with_a_2s_deadline_when_every_request_hangs_then_state_unknown_within_2s_and_a_timeout(fake_alpaca):
    fake_alpaca.hang_next("/*", 30, times=100)
    adapter = AlpacaBroker(settings(fake_alpaca, timeout_seconds=1.0, retry_backoff_seconds=0.2))

    started = time.monotonic()
    adapter.set_deadline(started + 2.0)
    with pytest.raises(OrderStateUnknown):
        submit_exactly_once(adapter, order("ops-40-0-d"))
    elapsed = time.monotonic() - started

    assert elapsed < 2.0 + 1.0
    posts = fake_alpaca.requests_to("/v2/orders", "POST")
    assert [r.json["client_order_id"] for r in posts] == ["ops-40-0-d", "ops-40-0-d"]
    assert fake_alpaca.requests_to("/v2/orders:by_client_order_id") == []  # no time left to ask


def test_deadline_set_while_a_submit_hangs_ends_it_after_the_request_in_flight(fake_alpaca):
    """SIGTERM during a submit: the request in flight keeps its timeout, nothing starts after."""
    fake_alpaca.hang_next("/*", 30, times=100)
    adapter = AlpacaBroker(settings(fake_alpaca, timeout_seconds=0.8))  # retry window 10 s by default
    stop = threading.Timer(0.1, lambda: adapter.set_deadline(time.monotonic() + 0.3))

    started = time.monotonic()
    stop.start()
    with pytest.raises(OrderStateUnknown):
        submit_exactly_once(adapter, order("ops-41-0-d"))
    elapsed = time.monotonic() - started

    assert elapsed < 0.8 + 0.5
    assert len(fake_alpaca.requests) == 1


def test_dispatcher_alpaca_broker_spends_the_accounts_shared_budget(db_url, monkeypatch):
    from psycopg_pool import ConnectionPool

    from services.common.params import ParamsInForce, as_params
    from services.dispatcher.main import build_broker

    for key, value in {"OPS_BROKER": "alpaca", "ALPACA_API_KEY": "PKWIRINGTEST000000000",
                       "ALPACA_SECRET_KEY": "wiring-secret"}.items():
        monkeypatch.setenv(key, value)
    params = as_params({})
    with ConnectionPool(db_url, open=False) as pool:
        broker = build_broker(pool, ACCOUNT, FixedClock(START), ParamsInForce(params, "test", "1", params.content_hash()))

    assert isinstance(broker.budget, PostgresRequestBudget)
    assert broker.budget.account_id == ACCOUNT
    assert (broker.budget.capacity, broker.budget.read_reserve) == (20, 10)
    assert broker.budget.acquire(RequestKind.ORDER) == 0.0
    broker.budget.close()

"""/healthz, /readyz and /metrics over HTTP, on the real Postgres and the simulated broker.

A dispatcher loop runs in a thread with its health server on a free port: after a run of
decisions, /metrics carries each series the issue names with values that match what the
database holds. The database "stops" by its socket leaving the directory the URL points at (as
for a stopped server, connects fail at once) and /readyz turns 503 within one check interval,
then 200 again when the socket is back.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.adapters.health import DatabaseProbe, HealthConfigError, HealthServer, Readiness, port_from_env, serve
from services.adapters.sim.broker import SimBroker
from services.common import metrics
from services.common.clock import FixedClock
from services.common.db import make_pool
from services.common.market_calendar import nyse_calendar
from services.dispatcher.main import Dispatcher
from services.runtime import run_periodic
from tests.factories import ACCOUNT, add_bar, add_market, add_recommendation, et, recommendation, wait_until
from tests.fake_alpaca import fake_alpaca  # noqa: F401
from tests.test_dispatcher import params_in_force

NOW = et("2026-11-30", "10:00")  # a Monday session
CLOSED = et("2026-11-28", "10:00")  # a Saturday
FAST = 0.1  # the check interval of these tests, seconds


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.02):
    """wait_until's value, or an AssertionError when the time ran out."""
    value = wait_until(predicate, timeout, interval)
    if not value:
        raise AssertionError("condition not met in time")
    return value


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """Every sample of an exposition: (name, sorted labels) -> value."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(found: dict, name: str, **labels) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


def watch(conn, *tickers: str) -> None:
    for i, t in enumerate(tickers):
        conn.execute("INSERT INTO watchlist_state (account_id, ticker, selected, rank, updated_at) "
                     "VALUES (%s, %s, true, %s, %s)", (ACCOUNT, t, i + 1, NOW))


# --- the dispatcher's three endpoints after a run of decisions -----------------------------------


def test_dispatcher_serves_healthz_readyz_and_metrics_with_each_series_after_decisions(db_url, conn):
    clock = FixedClock(NOW)
    params = params_in_force()
    pool = make_pool(db_url)
    broker = SimBroker(pool, ACCOUNT, clock)
    dispatcher = Dispatcher(pool, broker, params, ACCOUNT, clock=clock, calendar=nyse_calendar())
    add_market(conn, "AAPL", NOW, 200)
    watch(conn, "AAPL")
    before = samples(metrics_text())
    filled = add_recommendation(conn, "AAPL", NOW)
    denied = add_recommendation(conn, "MSFT", NOW)  # no bar at all: the freshness gate says no

    server = serve("dispatcher", db_url, max_loop_age=60, account_id=ACCOUNT, params=params, broker=broker,
                   port=0, check_interval=FAST, calendar=nyse_calendar(), now=clock.now)
    stop = threading.Event()
    loop = threading.Thread(target=dispatcher.run_forever, args=(db_url, stop), daemon=True)
    loop.start()
    try:
        wait_for(lambda: recommendation(conn, denied)["status"] == "SKIPPED"
                 and recommendation(conn, filled)["status"] == "EXECUTED")
        # A check round begun after the decisions sees the position the run opened.
        for _ in range(2):
            seen = server.readiness.checked_at
            wait_for(lambda: server.readiness.checked_at != seen)

        status, body = get(server.port, "/healthz")
        assert status == 200 and json.loads(body)["alive"] is True
        status, body = get(server.port, "/readyz")
        report = json.loads(body)
        assert (status, report["ready"], report["failed"]) == (200, True, [])
        assert set(report["checks"]) == {"database", "migrations", "params", "broker", "data_fresh"}

        status, text = get(server.port, "/metrics")
        assert status == 200
        after = samples(text)
    finally:
        stop.set()
        loop.join(5)
        server.stop()
        pool.close()

    def delta(name: str, **labels) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("ops_decisions_total", outcome="EXECUTED", gate="none") == 1
    skipped = recommendation(conn, denied)["outcome_code"]
    assert delta("ops_decisions_total", outcome="SKIPPED", gate=skipped) == 1
    assert delta("ops_commit_to_submit_seconds_count") == 1
    assert 0 <= delta("ops_commit_to_submit_seconds_sum") < 5
    assert delta("ops_broker_requests_total", broker="sim", endpoint="orders") >= 1
    assert delta("ops_broker_requests_total", broker="sim", endpoint="account") >= 1
    assert value(after, "ops_kill_switch_state", account_id=ACCOUNT, state="ACTIVE") == 1
    assert value(after, "ops_kill_switch_state", account_id=ACCOUNT, state="HALTED") == 0
    position = conn.execute("SELECT qty * coalesce(market_price, avg_price) * multiplier AS notional "
                            "FROM active_positions").fetchone()
    assert value(after, "ops_exposure_dollars", account_id=ACCOUNT) == pytest.approx(float(position["notional"]))
    pnl = conn.execute("SELECT equity - last_equity AS pnl FROM account_state WHERE account_id = %s",
                       (ACCOUNT,)).fetchone()["pnl"]
    assert value(after, "ops_daily_pnl_dollars", account_id=ACCOUNT) == pytest.approx(float(pnl))
    assert value(after, "ops_orders_in_flight", account_id=ACCOUNT) == 0
    # The bar began a minute before NOW and covers one minute: its data is as of NOW.
    assert value(after, "ops_oldest_bar_lag_seconds") == 0
    assert value(after, "ops_params_info", source="test", version="1",
                 hash=params.current().content_hash[:12]) == 1
    assert value(after, "ops_ready", service="dispatcher") == 1
    assert value(after, "ops_loop_last_iteration_timestamp_seconds", service="dispatcher") > 1.7e9
    # Series that only move with a remote broker or the other loops are still declared.
    for name in ("ops_submit_to_fill_seconds", "ops_rate_limit_waits_total", "ops_broker_errors_total",
                 "ops_feature_cycle_seconds", "ops_signal_cycle_seconds"):
        assert f"# TYPE {name.removesuffix('_total')}" in text, name
    # No ticker or symbol label anywhere: label values stay bounded.
    assert not any(key in ("ticker", "symbol") for (_, labels) in after for key, _ in labels)


def metrics_text() -> str:
    from prometheus_client import generate_latest

    return generate_latest().decode()


# --- readiness follows the database ------------------------------------------------------------


def test_readyz_turns_503_within_one_check_interval_when_the_database_stops_and_200_when_it_returns(
        db_url, tmp_path):
    real = psycopg.conninfo.conninfo_to_dict(db_url)
    socket_dir = tmp_path / "sock"
    socket_dir.mkdir()
    socket_name = f".s.PGSQL.{real.get('port') or 5432}"
    link = socket_dir / socket_name
    link.symlink_to(Path(real["host"]) / socket_name)
    url = f"postgresql://{real.get('user', 'postgres')}:@/{real['dbname']}?host={socket_dir}"

    server = serve("feature-computer", url, max_loop_age=60, port=0, check_interval=FAST,
                   calendar=nyse_calendar(), now=lambda: CLOSED)
    try:
        wait_for(lambda: get(server.port, "/readyz")[0] == 200)

        link.unlink()  # the server stops accepting connections
        stopped = time.monotonic()
        status, body = wait_for(lambda: (r := get(server.port, "/readyz"))[0] == 503 and r, timeout=5)
        assert time.monotonic() - stopped <= FAST + 1.0  # one interval, plus a round on a loaded machine
        report = json.loads(body)
        assert report["ready"] is False
        assert {"database", "migrations", "data_fresh"} <= set(report["failed"])
        assert report["checks"]["database"]["detail"].startswith("database unreachable")

        link.symlink_to(Path(real["host"]) / socket_name)  # and comes back
        status, body = wait_for(lambda: (r := get(server.port, "/readyz"))[0] == 200 and r, timeout=5)
        assert json.loads(body)["failed"] == []
    finally:
        server.stop()


def test_readyz_names_pending_migrations(empty_db_url):
    probe = DatabaseProbe(empty_db_url, calendar=nyse_calendar(), now=lambda: CLOSED)
    with psycopg.connect(empty_db_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE schema_migrations (version integer PRIMARY KEY, name text, checksum text)")
    readiness = Readiness("dispatcher", {"database": probe.database, "migrations": probe.migrations})

    results = readiness.run_checks()

    assert results["database"].ok is True
    assert results["migrations"].ok is False
    assert results["migrations"].detail.startswith("pending: 001_core.sql, 002_sim_broker.sql")
    assert readiness.report()["failed"] == ["migrations"]


# --- readiness: the watched tickers' data during the session --------------------------------------


@pytest.mark.parametrize("now, expect_ready", [(NOW, False), (CLOSED, True)], ids=["in-session", "weekend"])
def test_data_fresh_fails_for_stale_watched_tickers_only_during_the_session(conn, db_url, now, expect_ready):
    watch(conn, "AAPL", "MSFT", "NVDA")
    add_bar(conn, "AAPL", now - timedelta(minutes=1), 200)  # fresh
    add_bar(conn, "MSFT", now - timedelta(minutes=10), 300)  # ten minutes old
    # NVDA: no bar at all
    probe = DatabaseProbe(db_url, params=params_in_force(), calendar=nyse_calendar(), now=lambda: now)
    probe.database()

    failure = probe.data_fresh()

    if expect_ready:
        assert failure is None
        return
    # Stalest first: no bar at all, then the oldest bar.
    assert failure.startswith("2 watched ticker(s) stale beyond 180s: NVDA (no bar), MSFT (last bar ")
    assert "AAPL" not in failure
    assert samples(metrics_text())[("ops_stale_watched_tickers", ())] == 2
    assert samples(metrics_text())[("ops_oldest_bar_lag_seconds", ())] == 9 * 60


# --- liveness -------------------------------------------------------------------------------------


def test_healthz_is_200_while_the_loop_goes_round_and_503_once_it_stops_for_longer_than_the_limit():
    now = [1000.0]
    server = HealthServer("test-loop", Readiness("test-loop", {}), port=0, max_loop_age=30,
                          check_interval=60, host="127.0.0.1", monotonic=lambda: now[0]).start()
    try:
        assert get(server.port, "/healthz")[0] == 503  # never went round
        metrics.beat("test-loop", monotonic=lambda: now[0])
        now[0] += 29
        status, body = get(server.port, "/healthz")
        assert (status, json.loads(body)["last_iteration_age_s"]) == (200, 29)
        now[0] += 2
        assert get(server.port, "/healthz")[0] == 503
        assert get(server.port, "/nope")[0] == 404
    finally:
        server.stop()


def test_a_periodic_loop_beats_each_cycle_and_serves_its_endpoints_when_the_port_is_set(db_url, monkeypatch):
    monkeypatch.setenv("OPS_METRICS_PORT", "0")
    monkeypatch.setenv("OPS_READY_CHECK_SECONDS", "60")
    stop = threading.Event()
    seen: list[tuple[int, str]] = []
    before = value(samples(metrics_text()), "ops_signal_cycle_seconds_count")

    def cycle(conn) -> None:
        if len(seen) == 1:
            stop.set()
        port = next(t for t in threading.enumerate() if t.name == "health-http:signal-engine")
        assert port.is_alive()
        seen.append((len(seen), "beat" if metrics.last_beat("signal-engine") is not None else "none"))

    code = run_periodic("signal-engine", db_url, cycle, interval=0.01, stop=stop)

    assert code == 0 and seen == [(0, "beat"), (1, "beat")]
    assert value(samples(metrics_text()), "ops_signal_cycle_seconds_count") - before == 2
    assert not any(t.name == "health-http:signal-engine" for t in threading.enumerate())  # stopped with the loop


@pytest.mark.parametrize("raw, expected", [("", None), ("0", 0), ("9108", 9108)])
def test_the_port_comes_from_ops_metrics_port_unset_meaning_no_server(monkeypatch, raw, expected):
    monkeypatch.setenv("OPS_METRICS_PORT", raw)
    assert port_from_env() == expected


@pytest.mark.parametrize("raw", ["http", "-1", "70000"])
def test_a_bad_port_is_refused_by_its_variable_name(monkeypatch, raw):
    monkeypatch.setenv("OPS_METRICS_PORT", raw)
    with pytest.raises(HealthConfigError, match="^OPS_METRICS_PORT must be a port number"):
        port_from_env()


# --- the Alpaca adapter's requests and errors -------------------------------------------------------


def test_alpaca_requests_are_counted_by_endpoint_and_failures_by_kind_without_ids_in_labels(fake_alpaca):
    from tests.fake_alpaca import Fault
    from tests.test_alpaca_adapter import broker, option_order

    before = samples(metrics_text())
    fake_alpaca.inject(Fault(path="/v2/account", status=500, times=1))
    adapter = broker(fake_alpaca)

    adapter.get_account()  # one 500, then the retry answers
    adapter.submit_order(option_order())
    assert adapter.get_order_by_client_id("ops-1-0-abc") is not None

    after = samples(metrics_text())

    def delta(name: str, **labels) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("ops_broker_requests_total", broker="alpaca", endpoint="account") == 2
    assert delta("ops_broker_requests_total", broker="alpaca", endpoint="orders") == 2
    assert delta("ops_broker_errors_total", broker="alpaca", kind="http_5xx") == 1
    endpoints = {dict(labels).get("endpoint") for (name, labels) in after if name == "ops_broker_requests_total"}
    assert endpoints <= {"orders", "account", "positions", "clock", "calendar", "assets", "options", "stocks",
                         "news", "other"}

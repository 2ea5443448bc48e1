"""/healthz, /readyz and /metrics of a long-running service, on OPS_METRICS_PORT.

- /healthz: the loop is alive, i.e. it went round within `max_loop_age` seconds (200, else 503).
  A loop retrying through a database outage is alive: readiness, not liveness, says the
  database is gone, so ECS does not restart a task that a restart would not fix.
- /readyz: the last background check passed: database reachable, migrations current, params
  valid, broker reachable (where the service has one), and during the NYSE session the watched
  tickers' bars fresh. 503 with a JSON body naming each check that failed.
- /metrics: the Prometheus series of services/common/metrics.py.

The checks run in a daemon thread every `check_interval` seconds on their own connection, and
the HTTP server in another daemon thread: a request never waits on the database, and nothing
here runs on the trading path.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import psycopg
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from psycopg.rows import dict_row

from services.adapters.postgres.freshness import stale_watched_tickers
from services.common import metrics
from services.common.logs import json_default
from services.common.migrate import MIGRATIONS_DIR, discover

log = logging.getLogger("health")

PORT_ENV = "OPS_METRICS_PORT"
CHECK_INTERVAL_ENV = "OPS_READY_CHECK_SECONDS"
DEFAULT_CHECK_INTERVAL = 15.0
# Bars older than this (from the bar's end) are stale when the params in force do not say.
DEFAULT_MAX_BAR_AGE_SECONDS = 180
DB_CONNECT_TIMEOUT_SECONDS = 5
# What a check returns: None when it passed, else why it failed (one line).
Check = Callable[[], "str | None"]


class HealthConfigError(ValueError):
    """OPS_METRICS_PORT or OPS_READY_CHECK_SECONDS is not a valid value. Operator action: fix the variable."""


def port_from_env() -> int | None:
    """OPS_METRICS_PORT: unset or empty means no server; 0 means any free port (logged)."""
    raw = os.environ.get(PORT_ENV, "").strip()
    if not raw:
        return None
    try:
        port = int(raw)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise HealthConfigError(f"{PORT_ENV} must be a port number 0-65535 (0: any free port), got {raw!r}")
    return port


def check_interval_from_env() -> float:
    raw = os.environ.get(CHECK_INTERVAL_ENV, "").strip()
    if not raw:
        return DEFAULT_CHECK_INTERVAL
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value <= 600:
        raise HealthConfigError(f"{CHECK_INTERVAL_ENV} must be seconds in (0, 600], got {raw!r}")
    return value


@dataclass
class CheckResult:
    ok: bool
    detail: str


@dataclass
class Readiness:
    """The checks of one service and their last results; `run_checks` is called by the checker thread."""

    service: str
    checks: dict[str, Check]
    results: dict[str, CheckResult] = field(default_factory=dict)
    checked_at: datetime | None = None
    clock: Callable[[], datetime] = lambda: datetime.now().astimezone()
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def run_checks(self) -> dict[str, CheckResult]:
        results = {}
        for name, check in self.checks.items():
            try:
                failure = check()
            except Exception as e:  # a check that breaks is a failed check, named, never a dead thread
                failure = f"{type(e).__name__}: {e}"
            results[name] = CheckResult(failure is None, failure or "ok")
            metrics.READY_CHECK.labels(check=name).set(1 if failure is None else 0)
        with self._lock:
            self.results = results
            self.checked_at = self.clock()
        metrics.READY.labels(service=self.service).set(1 if self.ready else 0)
        return results

    @property
    def ready(self) -> bool:
        with self._lock:
            return bool(self.results) and all(r.ok for r in self.results.values())

    def report(self) -> dict[str, Any]:
        with self._lock:
            results = dict(self.results)
            checked_at = self.checked_at
        failed = sorted(name for name, r in results.items() if not r.ok)
        if not results:
            failed = ["not_checked_yet"]
        return {
            "service": self.service,
            "ready": not failed,
            "failed": failed,
            "checked_at": checked_at,
            "checks": {name: {"ok": r.ok, "detail": r.detail} for name, r in results.items()},
        }


class HealthServer:
    """The HTTP server and the checker thread of one service. `stop()` ends both."""

    def __init__(self, service: str, readiness: Readiness, *, port: int, max_loop_age: float,
                 check_interval: float = DEFAULT_CHECK_INTERVAL, host: str = "0.0.0.0",
                 monotonic: Callable[[], float] = time.monotonic):
        self.service = service
        self.readiness = readiness
        self.max_loop_age = max_loop_age
        self.check_interval = check_interval
        self._monotonic = monotonic
        self._stop = threading.Event()
        self._httpd = ThreadingHTTPServer((host, port), _handler(self))
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self._threads = [
            threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2},
                             name=f"health-http:{service}", daemon=True),
            threading.Thread(target=self._check_loop, name=f"health-checks:{service}", daemon=True),
        ]

    def start(self) -> HealthServer:
        for thread in self._threads:
            thread.start()
        log.info("health server listening", extra={"service": self.service, "port": self.port,
                                                   "check_interval_s": self.check_interval,
                                                   "max_loop_age_s": self.max_loop_age})
        return self

    def stop(self) -> None:
        self._stop.set()
        self._httpd.shutdown()
        self._httpd.server_close()

    def _check_loop(self) -> None:
        while not self._stop.is_set():
            results = self.readiness.run_checks()
            failed = {name: r.detail for name, r in results.items() if not r.ok}
            if failed:
                log.warning("not ready", extra={"service": self.service, "failed": failed})
            self._stop.wait(self.check_interval)

    def health(self) -> tuple[int, dict[str, Any]]:
        last = metrics.last_beat(self.service)
        age = None if last is None else self._monotonic() - last
        alive = age is not None and age <= self.max_loop_age
        return (200 if alive else 503), {"service": self.service, "alive": alive,
                                         "last_iteration_age_s": None if age is None else round(age, 3),
                                         "max_age_s": self.max_loop_age}

    def ready(self) -> tuple[int, dict[str, Any]]:
        report = self.readiness.report()
        return (200 if report["ready"] else 503), report


def _handler(server: HealthServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            super().setup()
            # Without it every keep-alive request waits ~40 ms for a delayed ACK.
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
            path = self.path.split("?", 1)[0]
            if path == "/healthz":
                self._json(*server.health())
            elif path == "/readyz":
                self._json(*server.ready())
            elif path == "/metrics":
                self._send(200, generate_latest(), CONTENT_TYPE_LATEST)
            else:
                self._json(404, {"error": f"no such path {path}; try /healthz, /readyz, /metrics"})

        def _json(self, status: int, body: dict[str, Any]) -> None:
            self._send(status, json.dumps(body, default=json_default).encode(), "application/json")

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass  # a probe every few seconds is not worth a log line

    return Handler


# --- the standard checks ----------------------------------------------------------------------


class DatabaseProbe:
    """One connection per round, shared by the database checks of that round.

    A fresh connection each round: a pooled one could outlive a database that no longer accepts
    new connections, and what a restarted task needs is exactly a new connection.
    """

    def __init__(self, conninfo: str, *, account_id: str | None = None, params: Any = None,
                 calendar: Any = None, now: Callable[[], datetime] | None = None):
        self.conninfo = conninfo
        self.account_id = account_id
        self.params = params
        self._calendar = calendar
        self._now = now or (lambda: datetime.now().astimezone())
        self._error: str | None = None

    def checks(self) -> dict[str, Check]:
        return {"database": self.database, "migrations": self.migrations, "data_fresh": self.data_fresh}

    def _connect(self) -> psycopg.Connection:
        return psycopg.connect(self.conninfo, autocommit=True, row_factory=dict_row,
                               connect_timeout=DB_CONNECT_TIMEOUT_SECONDS, application_name="ops-health")

    def database(self) -> str | None:
        # The round starts here: the later checks of this round reuse its answer.
        self._error = None
        try:
            with self._connect() as conn:
                conn.execute("SELECT 1")
                if self.account_id is not None:
                    self._collect(conn)
        except psycopg.Error as e:
            self._error = f"database unreachable: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}"
            return self._error
        return None

    def migrations(self) -> str | None:
        if self._error:
            return self._error
        wanted = {m.version: m for m in discover(MIGRATIONS_DIR)}
        with self._connect() as conn:
            rows = conn.execute("SELECT version, checksum FROM schema_migrations").fetchall()
        applied = {r["version"]: r["checksum"] for r in rows}
        pending = [m.name for v, m in sorted(wanted.items()) if v not in applied]
        edited = [m.name for v, m in sorted(wanted.items()) if v in applied and applied[v] != m.checksum]
        unknown = sorted(set(applied) - set(wanted))
        problems = []
        if pending:
            problems.append("pending: " + ", ".join(pending))
        if edited:
            problems.append("edited after being applied: " + ", ".join(edited))
        if unknown:
            problems.append(f"applied but unknown to this code: {unknown}")
        return "; ".join(problems) or None

    def data_fresh(self) -> str | None:
        if self._error:
            return self._error
        now = self._now()
        max_age = self._max_bar_age()
        with self._connect() as conn:
            behind = stale_watched_tickers(conn, now, 0)
        lags = [(now - (ts + timedelta(seconds=60))).total_seconds() for _, ts in behind if ts is not None]
        metrics.OLDEST_BAR_LAG.set(max(lags, default=0.0))
        stale = [(t, ts) for t, ts in behind if ts is None or (now - (ts + timedelta(seconds=60))).total_seconds() > max_age]
        calendar = self._calendar
        if calendar is None:
            from services.common.market_calendar import nyse_calendar

            calendar = nyse_calendar()
        if not calendar.is_open(now):
            metrics.STALE_TICKERS.set(0)
            return None  # outside the session no bar is due
        metrics.STALE_TICKERS.set(len(stale))
        if not stale:
            return None
        shown = ", ".join(f"{t} ({'no bar' if ts is None else 'last bar ' + ts.isoformat()})" for t, ts in stale[:10])
        more = f" and {len(stale) - 10} more" if len(stale) > 10 else ""
        return f"{len(stale)} watched ticker(s) stale beyond {max_age}s: {shown}{more}"

    def _max_bar_age(self) -> int:
        if self.params is None:
            return DEFAULT_MAX_BAR_AGE_SECONDS
        try:
            return int(self.params.current().params.risk.max_bar_age_seconds)
        except Exception:  # the params check reports a broken provider; freshness keeps a sane limit
            return DEFAULT_MAX_BAR_AGE_SECONDS

    def _collect(self, conn: psycopg.Connection) -> None:
        """The account's gauges: kill switch, positions, exposure, P&L, in-flight orders."""
        row = conn.execute(ACCOUNT_GAUGES, {"account_id": self.account_id}).fetchone()
        account = self.account_id
        for state in ("ACTIVE", "REDUCING", "HALTED"):
            metrics.KILL_SWITCH_STATE.labels(account_id=account, state=state).set(1 if row["kill_state"] == state else 0)
        metrics.OPEN_POSITIONS.labels(account_id=account).set(row["open_positions"])
        metrics.EXPOSURE.labels(account_id=account).set(float(row["exposure"]))
        if row["daily_pnl"] is not None:
            metrics.DAILY_PNL.labels(account_id=account).set(float(row["daily_pnl"]))
        metrics.ORDERS_IN_FLIGHT.labels(account_id=account).set(row["in_flight"])


# -- account_gauges --
# The account-level series in one round trip, read by the checker thread every interval.
ACCOUNT_GAUGES = """
SELECT coalesce((SELECT state FROM kill_switch WHERE account_id = %(account_id)s), 'ACTIVE') AS kill_state,
       (SELECT count(*)::int FROM active_positions
         WHERE account_id = %(account_id)s AND status IN ('PENDING', 'OPEN', 'CLOSING')) AS open_positions,
       (SELECT coalesce(sum(qty * coalesce(market_price, avg_price) * multiplier), 0) FROM active_positions
         WHERE account_id = %(account_id)s AND status IN ('PENDING', 'OPEN', 'CLOSING')) AS exposure,
       (SELECT equity - last_equity FROM account_state WHERE account_id = %(account_id)s) AS daily_pnl,
       (SELECT count(*)::int FROM dispatch_executions
         WHERE account_id = %(account_id)s AND status IN ('SUBMITTING', 'ACCEPTED', 'PARTIALLY_FILLED')) AS in_flight
"""


def params_check(provider: Any) -> Check:
    """The params in force parse and validate; a refused newer document is named but the check passes
    while a valid one stays in force (the services keep trading on it)."""

    def check() -> str | None:
        in_force = provider.current()
        metrics.params_in_force(in_force.source, in_force.version, in_force.content_hash)
        return None

    return check


def broker_check(call: Callable[[], object]) -> Check:
    def check() -> str | None:
        call()
        return None

    return check


def serve(service: str, conninfo: str, *, max_loop_age: float, account_id: str | None = None,
          params: Any = None, broker: Any = None, port: int | None = None,
          check_interval: float | None = None, calendar: Any = None,
          now: Callable[[], datetime] | None = None) -> HealthServer | None:
    """Start the health server of `service` when OPS_METRICS_PORT (or `port`) says so; else None."""
    port = port_from_env() if port is None else port
    if port is None:
        return None
    probe = DatabaseProbe(conninfo, account_id=account_id, params=params, calendar=calendar, now=now)
    checks = probe.checks()
    if params is not None:
        checks["params"] = params_check(params)
    if broker is not None:
        checks["broker"] = broker_check(broker.get_account)
    interval = check_interval_from_env() if check_interval is None else check_interval
    return HealthServer(service, Readiness(service, checks), port=port, max_loop_age=max_loop_age,
                        check_interval=interval).start()

"""The loop every periodic service runs: a cycle each interval, until SIGTERM or once.

A failed cycle (a database blip, an outage upstream, refused params) is logged and retried at
the next tick on a fresh connection, so a database restart is survived; the loop itself never
dies of one bad cycle.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable

import psycopg

from services.common import metrics
from services.adapters import alerts
from services.common.db import connect

log = logging.getLogger(__name__)


def bootstrap(account: str | None = None):
    """What every account service starts with: settings, the account, a migrated database, the params.

    Returns (settings, account_id, conninfo, params provider).
    """
    from services.common.db import database_url
    from services.common.migrate import migrate_when_ready
    from services.adapters.params_source import provider_from_settings
    from services.common.settings import load_settings

    settings = load_settings()
    url = database_url()
    migrate_when_ready(url)
    return settings, account or settings.account_id, url, provider_from_settings(settings, url)


def stop_on_sigterm() -> threading.Event:
    """An event set by SIGTERM (and SIGINT): the loop finishes its cycle and returns."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    return stop


def loop_max_age(interval: float) -> float:
    """How long /healthz tolerates no iteration: three intervals, and never under a minute."""
    return max(60.0, 3 * interval)


def serve_health(service: str, conninfo: str, *, interval: float, **checks):
    """Serve /healthz, /readyz and /metrics on OPS_METRICS_PORT (unset: nothing is started).

    `checks`: account_id (account gauges), params (a provider: checked valid), broker (reachable).
    The loop then calls `metrics.beat(service)` once per iteration. Returns the server, or None.
    """
    from services.adapters.health import serve

    return serve(service, conninfo, max_loop_age=loop_max_age(interval), **checks)


# The issue names these two cycles' durations; every loop also has ops_loop_cycle_seconds.
_CYCLE_HISTOGRAMS = {"feature-computer": metrics.FEATURE_CYCLE, "signal-engine": metrics.SIGNAL_CYCLE}


def run_periodic(
    name: str,
    conninfo: str,
    cycle: Callable[[psycopg.Connection], object],
    *,
    interval: float,
    once: bool = False,
    stop: threading.Event | None = None,
    retry_on: tuple[type[BaseException], ...] = (),
    health_checks: dict | None = None,
) -> int:
    """Run `cycle(conn)` every `interval` seconds. Exit code: with `once`, 1 when the cycle failed.

    Unless `once`, the health server is started when OPS_METRICS_PORT is set, with
    `health_checks` (see serve_health) beside the database checks.
    """
    stop = stop or threading.Event()
    errors = (psycopg.Error, *retry_on)
    conn: psycopg.Connection | None = None
    health = None if once else serve_health(name, conninfo, interval=interval, **(health_checks or {}))
    cycle_seconds = _CYCLE_HISTOGRAMS.get(name, metrics.LOOP_CYCLE.labels(service=name))
    try:
        while True:
            metrics.beat(name)
            started = time.monotonic()
            status = 0
            try:
                if conn is None or conn.closed:
                    conn = connect(conninfo, application_name=name)
                cycle(conn)
                cycle_seconds.observe(time.monotonic() - started)
                alerts.loop_ok(name)
            except errors as e:
                log.error("cycle failed", extra={"service": name, "error": str(e)})
                metrics.LOOP_FAILURES.labels(service=name).inc()
                alerts.loop_failed(name, str(e))
                status = 1
                if conn is not None:
                    conn.close()
                conn = None
            if once:
                return status
            if stop.wait(max(0.0, interval - (time.monotonic() - started))):
                return 0
    finally:
        if conn is not None:
            conn.close()
        if health is not None:
            health.stop()

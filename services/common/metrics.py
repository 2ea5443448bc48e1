"""The process's Prometheus series, defined once and served at /metrics (services/adapters/health.py).

Hooks in the loops and adapters are one line each (`metrics.DECISIONS.labels(...).inc()`); the
account-level gauges (kill switch, positions, exposure, P&L, in-flight orders, bar lag) are
read from the database by the readiness checker on its interval, never on the trading path.

Label values are bounded: outcomes, gate codes, request kinds and services, never a ticker, a
symbol or an order id. An account label is one value per task.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from prometheus_client import Counter, Gauge, Histogram, Info

# Latencies from a decision's commit to the broker's answer, and from that answer to the fill:
# milliseconds for the simulated broker, seconds for a resting limit order.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_CYCLE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

DECISIONS = Counter("ops_decisions_total", "Recommendations decided, by final outcome and the code that decided it "
                    "(the blocking gate for a denial)", ["outcome", "gate"])
COMMIT_TO_SUBMIT = Histogram("ops_commit_to_submit_seconds", "From the intent's commit to the broker's answer "
                             "to the order", buckets=_LATENCY_BUCKETS)
SUBMIT_TO_FILL = Histogram("ops_submit_to_fill_seconds", "From an order's submission to its fill",
                           buckets=_LATENCY_BUCKETS)
BROKER_REQUESTS = Counter("ops_broker_requests_total", "Requests to the broker, by broker and endpoint",
                          ["broker", "endpoint"])
BROKER_ERRORS = Counter("ops_broker_errors_total", "Broker requests that failed, by broker and kind of failure",
                        ["broker", "kind"])
RATE_LIMIT_WAITS = Counter("ops_rate_limit_waits_total", "Requests held back by the account's request budget")
RATE_LIMIT_WAIT_SECONDS = Counter("ops_rate_limit_wait_seconds_total", "Time spent waiting for the request budget")
KILL_SWITCH_STATE = Gauge("ops_kill_switch_state", "1 for the account's kill-switch state, 0 for the others",
                          ["account_id", "state"])
OPEN_POSITIONS = Gauge("ops_open_positions", "Positions pending, open or closing", ["account_id"])
EXPOSURE = Gauge("ops_exposure_dollars", "Notional of the open positions (options x 100)", ["account_id"])
DAILY_PNL = Gauge("ops_daily_pnl_dollars", "Equity minus the previous session's closing equity", ["account_id"])
ORDERS_IN_FLIGHT = Gauge("ops_orders_in_flight", "Orders sent and not yet final (submitting, accepted, "
                         "partially filled)", ["account_id"])
OLDEST_BAR_LAG = Gauge("ops_oldest_bar_lag_seconds", "Age of the newest bar of the stalest watched ticker "
                       "(from the bar's end)")
STALE_TICKERS = Gauge("ops_stale_watched_tickers", "Watched tickers whose data is stale during the session")
FEATURE_CYCLE = Histogram("ops_feature_cycle_seconds", "Duration of a feature-computer cycle", buckets=_CYCLE_BUCKETS)
SIGNAL_CYCLE = Histogram("ops_signal_cycle_seconds", "Duration of a signal-engine cycle", buckets=_CYCLE_BUCKETS)
LOOP_CYCLE = Histogram("ops_loop_cycle_seconds", "Duration of a service loop's cycle", ["service"],
                       buckets=_CYCLE_BUCKETS)
LOOP_FAILURES = Counter("ops_loop_failures_total", "Loop cycles that failed", ["service"])
LOOP_LAST_ITERATION = Gauge("ops_loop_last_iteration_timestamp_seconds", "When the loop last went round",
                            ["service"])
READY = Gauge("ops_ready", "1 when every readiness check passed at the last check", ["service"])
READY_CHECK = Gauge("ops_readiness_check", "1 when the named readiness check passed", ["check"])
PARAMS = Info("ops_params", "The trading params in force: source, version, hash")

# Liveness for /healthz: the monotonic time of each loop's last iteration.
_beats: dict[str, float] = {}
_beats_lock = threading.Lock()


def beat(service: str, monotonic: Callable[[], float] = time.monotonic) -> None:
    """The loop went round: /healthz is answered from this."""
    with _beats_lock:
        _beats[service] = monotonic()
    LOOP_LAST_ITERATION.labels(service=service).set(time.time())


def last_beat(service: str) -> float | None:
    with _beats_lock:
        return _beats.get(service)


def record_decision(outcome: str, code: str) -> None:
    """A decision's outcome; the gate label is the deciding code of a denial, "none" otherwise."""
    DECISIONS.labels(outcome=outcome, gate=code if outcome in {"SKIPPED", "REJECTED", "FAILED"} else "none").inc()


def params_in_force(source: str, version: object, content_hash: object) -> None:
    PARAMS.info({"source": str(source), "version": str(version), "hash": str(content_hash)[:12]})

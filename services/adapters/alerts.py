"""Alerts to the operators: SNS and a Slack-compatible webhook, off the trading path.

`emit(Event.KILL_SWITCH_TRIP, subject=account, reason=...)` never blocks and never raises: it
scrubs the fields, drops a repeat of the same (event, subject) within the dedupe window, writes
one log line, and hands the alert to each sink's own background thread through a bounded queue.
A full queue drops the alert with a counted log line; a sink that fails is retried with backoff;
a sink that hangs holds up only its own thread, never a decision and never the other sink.

Sinks come from the environment: OPS_ALERT_SNS_TOPIC_ARN (boto3 SNS, region from AWS_REGION)
and OPS_ALERT_WEBHOOK_URL (the URL is itself a secret: it is registered with the log redactor).
With neither, alerts are log lines only. OPS_ALERT_DEDUPE_SECONDS (default 300),
OPS_ALERT_BROKER_DOWN_SECONDS (default 120) and OPS_ALERT_LOOP_FAILURES (default 3) set the
thresholds.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

from services.common.clock import Clock, SystemClock
from services.common.logs import json_default, register_secret
from services.domain.alerts import Alert, Deduper, Event, Outage, scrub, slack_payload, sns_subject

log = logging.getLogger("alerts")

__all__ = ["Alerter", "Event", "SnsSink", "WebhookSink", "configure", "emit", "get"]

DEFAULT_DEDUPE_SECONDS = 300.0
DEFAULT_BROKER_DOWN_SECONDS = 120.0
DEFAULT_LOOP_FAILURES = 3
DEFAULT_QUEUE_SIZE = 256
DEFAULT_BACKOFF = (1.0, 2.0, 4.0, 8.0)
WEBHOOK_TIMEOUT_SECONDS = 10.0


class Sink(Protocol):
    name: str

    def send(self, alert: Alert) -> None:
        """Deliver one alert; raise on failure (the worker retries)."""
        ...


class WebhookSink:
    """POST the alert as Slack-compatible JSON. A non-2xx answer or a timeout is a failure."""

    name = "webhook"

    def __init__(self, url: str, timeout: float = WEBHOOK_TIMEOUT_SECONDS):
        self._url = url
        self.timeout = timeout
        register_secret(url)  # a Slack webhook URL is a credential: never in a log line

    def __repr__(self) -> str:
        return "WebhookSink(url=***)"

    def send(self, alert: Alert) -> None:
        body = json.dumps(slack_payload(alert), default=json_default).encode()
        request = urllib.request.Request(self._url, data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            if not 200 <= response.status < 300:
                raise RuntimeError(f"webhook answered HTTP {response.status}")


class SnsSink:
    """Publish to an SNS topic (email, SMS, PagerDuty and chat subscribe there)."""

    name = "sns"

    def __init__(self, topic_arn: str, client: Any = None, region: str | None = None):
        self.topic_arn = topic_arn
        self._client = client if client is not None else _sns_client(region)

    def __repr__(self) -> str:
        return f"SnsSink(topic_arn={self.topic_arn!r})"

    def send(self, alert: Alert) -> None:
        self._client.publish(TopicArn=self.topic_arn, Subject=sns_subject(alert), Message=alert.text(),
                             MessageAttributes={"event": {"DataType": "String", "StringValue": alert.event.value}})


def _sns_client(region: str | None) -> Any:
    import boto3
    from botocore.config import Config

    config = Config(connect_timeout=3, read_timeout=5, retries={"max_attempts": 1})
    return boto3.client("sns", region_name=region, config=config)


class _SinkWorker:
    """One sink's thread and bounded queue: its slowness is its own."""

    def __init__(self, sink: Sink, size: int, backoff: Sequence[float], stop: threading.Event):
        self.sink = sink
        self.queue: queue.Queue[Alert] = queue.Queue(maxsize=size)
        self.backoff = tuple(backoff)
        self.stop = stop
        self.dropped = 0
        self.delivered = 0
        self.failed = 0
        self.thread = threading.Thread(target=self._run, name=f"alerts-{sink.name}", daemon=True)
        self.thread.start()

    def offer(self, alert: Alert) -> bool:
        try:
            self.queue.put_nowait(alert)
            return True
        except queue.Full:
            self.dropped += 1
            log.warning("alert dropped: sink queue full", extra={
                "sink": self.sink.name, "alert_event": alert.event.value, "subject": alert.subject,
                "dropped_total": self.dropped})
            return False

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                alert = self.queue.get(timeout=0.5)
            except queue.Empty:
                continue
            try:
                self._deliver(alert)
            finally:
                self.queue.task_done()

    def _deliver(self, alert: Alert) -> None:
        for attempt in range(len(self.backoff) + 1):
            try:
                self.sink.send(alert)
                self.delivered += 1
                return
            except Exception as e:  # any sink failure (HTTP, botocore, socket) is retried the same way
                if attempt == len(self.backoff) or self.stop.wait(self.backoff[attempt]):
                    self.failed += 1
                    log.error("alert not delivered", extra={
                        "sink": self.sink.name, "alert_event": alert.event.value, "subject": alert.subject,
                        "attempts": attempt + 1, "error": str(e)})
                    return
                log.warning("alert delivery failed; retrying", extra={
                    "sink": self.sink.name, "alert_event": alert.event.value, "subject": alert.subject,
                    "attempt": attempt + 1, "error": str(e)})


class Alerter:
    """Dedupe, log, and hand off to the sinks' threads. Thread-safe; `emit` never blocks."""

    def __init__(self, sinks: Sequence[Sink] = (), *, dedupe_seconds: float = DEFAULT_DEDUPE_SECONDS,
                 queue_size: int = DEFAULT_QUEUE_SIZE, backoff: Sequence[float] = DEFAULT_BACKOFF,
                 broker_down_seconds: float = DEFAULT_BROKER_DOWN_SECONDS,
                 loop_failures: int = DEFAULT_LOOP_FAILURES, clock: Clock | None = None):
        self.clock = clock or SystemClock()
        self.broker_down_seconds = broker_down_seconds
        self.loop_failures = loop_failures
        self._lock = threading.Lock()
        self._dedupe = Deduper(dedupe_seconds)
        self._broker = Outage()
        self._loops = Outage()
        self._stop = threading.Event()
        self._workers = [_SinkWorker(s, queue_size, backoff, self._stop) for s in sinks]

    @property
    def sinks(self) -> list[str]:
        return [w.sink.name for w in self._workers]

    @property
    def dropped(self) -> int:
        return sum(w.dropped for w in self._workers)

    def emit(self, event: Event, subject: str, **fields: Any) -> bool:
        """Queue an alert for every sink; False when it was a repeat within the window."""
        alert = Alert(Event(event), str(subject), self.clock.now(), scrub(fields))
        with self._lock:
            if not self._dedupe.admit(alert.event, alert.subject, alert.at.timestamp()):
                return False
        # The message names the (event, subject): the log's rate limit then never merges two alerts.
        log.warning("alert %s %s", alert.event.value, alert.subject, extra={
            "alert_event": alert.event.value, "subject": alert.subject, "severity": alert.severity,
            "sinks": self.sinks, "fields": alert.as_dict()["fields"]})
        for worker in self._workers:
            worker.offer(alert)
        return True

    def broker_failed(self, subject: str, error: str) -> bool:
        """A broker call failed; alerts once the outage has lasted `broker_down_seconds`."""
        with self._lock:
            down_for, failures = self._broker.failed(subject, self.clock.now().timestamp())
        if down_for < self.broker_down_seconds:
            return False
        return self.emit(Event.BROKER_UNAVAILABLE, subject, down_seconds=round(down_for), failures=failures,
                         error=error)

    def broker_ok(self, subject: str) -> None:
        with self._lock:
            self._broker.ok(subject)

    def loop_failed(self, service: str, error: str) -> bool:
        """A loop pass failed; alerts at `loop_failures` consecutive failures (then per window)."""
        with self._lock:
            failing_for, failures = self._loops.failed(service, self.clock.now().timestamp())
        if failures < self.loop_failures:
            return False
        return self.emit(Event.LOOP_FAILURES, service, consecutive=failures, failing_seconds=round(failing_for),
                         error=error)

    def loop_ok(self, service: str) -> None:
        with self._lock:
            self._loops.ok(service)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every queued alert was delivered or given up; False on timeout."""
        deadline = time.monotonic() + timeout
        for worker in self._workers:
            done = worker.queue.all_tasks_done
            with done:
                while worker.queue.unfinished_tasks:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return False
                    done.wait(remaining)
        return True

    def close(self, timeout: float = 5.0) -> None:
        """Deliver what is queued (up to `timeout`), then stop the threads."""
        self.flush(timeout)
        self._stop.set()

    def stats(self) -> dict[str, dict[str, int]]:
        return {w.sink.name: {"delivered": w.delivered, "failed": w.failed, "dropped": w.dropped,
                              "queued": w.queue.qsize()} for w in self._workers}


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not a number") from None


def from_env(clock: Clock | None = None) -> Alerter:
    """The alerter the environment configures (see the module docstring)."""
    sinks: list[Sink] = []
    topic = os.environ.get("OPS_ALERT_SNS_TOPIC_ARN", "").strip()
    if topic:
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or topic.split(":")[3] or None
        sinks.append(SnsSink(topic, region=region))
    url = os.environ.get("OPS_ALERT_WEBHOOK_URL", "").strip()
    if url:
        sinks.append(WebhookSink(url))
    return Alerter(
        sinks,
        dedupe_seconds=_env_float("OPS_ALERT_DEDUPE_SECONDS", DEFAULT_DEDUPE_SECONDS),
        broker_down_seconds=_env_float("OPS_ALERT_BROKER_DOWN_SECONDS", DEFAULT_BROKER_DOWN_SECONDS),
        loop_failures=int(_env_float("OPS_ALERT_LOOP_FAILURES", DEFAULT_LOOP_FAILURES)),
        clock=clock,
    )


# --- The process's alerter -------------------------------------------------------------------
# One per process, built from the environment on first use, so the hooks in other modules are
# one line and need no wiring. configure() replaces it (tests, the CLI).

_current: Alerter | None = None
_current_lock = threading.Lock()


def get() -> Alerter:
    global _current
    if _current is None:
        with _current_lock:
            if _current is None:
                _current = from_env()
    return _current


def configure(alerter: Alerter | None) -> Alerter | None:
    """Install `alerter` as the process's (None: rebuild from the environment on next use); returns the previous."""
    global _current
    with _current_lock:
        previous, _current = _current, alerter
    return previous


def _safely(method: str, *args: Any, **kwargs: Any) -> bool:
    # An alert is never the reason a decision fails: a bad sink configuration is logged, not raised.
    try:
        return getattr(get(), method)(*args, **kwargs)
    except Exception as e:
        log.error("alert not emitted", extra={"alert_call": method, "error": str(e)})
        return False


# The alerts held by the innermost `held_until_commit` block of each thread.
_held = threading.local()


@contextmanager
def held_until_commit() -> Iterator[None]:
    """Alerts emitted in the block go out when it ends normally, and not at all when it raises.

    Wrap a transaction with it (`with alerts.held_until_commit(), pool.connection() as conn,
    conn.transaction():`) so an alert about a change the transaction writes (a kill-switch trip,
    an unknown order) is sent once the change is committed, never for one rolled back. A block
    inside another hands its alerts to the outer one.
    """
    outer = getattr(_held, "alerts", None)
    _held.alerts = held = []
    try:
        yield
    except BaseException:
        if held:
            log.warning("alerts dropped: their transaction did not commit",
                        extra={"alert_events": [str(e) for e, _, _ in held]})
        raise
    finally:
        _held.alerts = outer
    if outer is not None:
        outer.extend(held)
        return
    for event, subject, fields in held:
        _safely("emit", event, subject, **fields)


def emit(event: Event, subject: str, **fields: Any) -> bool:
    """Alert the operators (see Alerter.emit); never raises, never blocks. Inside
    `held_until_commit`, the alert waits for the block's end (and True means queued)."""
    held = getattr(_held, "alerts", None)
    if held is not None:
        held.append((event, subject, fields))
        return True
    return _safely("emit", event, subject, **fields)


def broker_failed(subject: str, error: str) -> bool:
    return _safely("broker_failed", subject, error)


def broker_ok(subject: str) -> None:
    _safely("broker_ok", subject)


def loop_failed(service: str, error: str) -> bool:
    return _safely("loop_failed", service, error)


def loop_ok(service: str) -> None:
    _safely("loop_ok", service)

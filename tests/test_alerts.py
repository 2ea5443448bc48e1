"""Alerts: every event reaches a webhook and an SNS topic once per window, off the trading path,
and carries no secret."""

from __future__ import annotations

import logging
import time
from datetime import timedelta

import pytest

from services.adapters import alerts
from services.adapters.alerts import Alerter, SnsSink, WebhookSink
from services.common.clock import FixedClock
from services.common.logs import register_secret
from services.domain.alerts import Alert, Deduper, Event, kill_switch_event, scrub, sns_subject
from tests.alert_doubles import installed, sns_topic, webhook  # noqa: F401
from tests.factories import et

NOW = et("2026-11-30", "10:00")


def alerter(*sinks, **kwargs) -> Alerter:
    kwargs.setdefault("clock", FixedClock(NOW))
    kwargs.setdefault("backoff", (0.01, 0.01, 0.01))
    return Alerter(sinks, **kwargs)


def test_each_event_reaches_the_webhook_and_sns_exactly_once_within_the_dedupe_window(webhook, sns_topic):
    a = alerter(WebhookSink(webhook.url), SnsSink(sns_topic.arn, client=sns_topic.sns), dedupe_seconds=300)
    for _ in range(3):
        for event in Event:
            a.emit(event, "acct-1", reason="test")
    assert a.flush(10)

    assert sorted(webhook.events()) == sorted(e.value for e in Event)
    published = sns_topic.messages()
    assert sorted(m["MessageAttributes"]["event"]["Value"] for m in published) == sorted(e.value for e in Event)
    trip = next(m for m in published if m["MessageAttributes"]["event"]["Value"] == "KILL_SWITCH_TRIP")
    assert trip["Subject"] == "[CRITICAL] KILL_SWITCH_TRIP acct-1"
    assert "reason: test" in trip["Message"]
    body = next(b for b in webhook.bodies if b["alert"]["event"] == "KILL_SWITCH_TRIP")
    assert body["alert"]["fields"] == {"reason": "test"}
    assert body["text"].startswith("[CRITICAL] KILL_SWITCH_TRIP acct-1: kill switch tripped")
    a.close()


def test_dedupe_is_per_event_and_subject_and_ends_with_the_window(webhook):
    clock = FixedClock(NOW)
    a = alerter(WebhookSink(webhook.url), dedupe_seconds=60, clock=clock)
    assert a.emit(Event.HALT, "acct-1") is True
    assert a.emit(Event.HALT, "acct-1") is False
    assert a.emit(Event.HALT, "acct-2") is True          # another subject
    assert a.emit(Event.RESUME, "acct-1") is True        # another event
    clock.advance(timedelta(seconds=59))
    assert a.emit(Event.HALT, "acct-1") is False
    clock.advance(timedelta(seconds=1))
    assert a.emit(Event.HALT, "acct-1") is True
    assert a.flush(5)
    assert [(b["alert"]["event"], b["alert"]["subject"]) for b in webhook.bodies] == [
        ("HALT", "acct-1"), ("HALT", "acct-2"), ("RESUME", "acct-1"), ("HALT", "acct-1")]
    a.close()


def test_a_failing_webhook_is_retried_with_backoff_until_it_answers(webhook):
    webhook.fail_next = 2
    a = alerter(WebhookSink(webhook.url), backoff=(0.01, 0.02, 0.04))
    a.emit(Event.ORDER_REJECTED, "acct-1")
    assert a.flush(5)
    assert (webhook.requests, webhook.events()) == (3, ["ORDER_REJECTED"])
    assert a.stats()["webhook"] == {"delivered": 1, "failed": 0, "dropped": 0, "queued": 0}
    a.close()


def test_a_webhook_that_never_answers_is_given_up_after_the_retries(webhook):
    webhook.fail_next = 10
    a = alerter(WebhookSink(webhook.url), backoff=(0.01, 0.01))
    a.emit(Event.ORDER_REJECTED, "acct-1")
    assert a.flush(5)
    assert (webhook.requests, webhook.bodies) == (3, [])
    assert a.stats()["webhook"]["failed"] == 1
    a.close()


def test_when_the_queue_is_full_alerts_are_dropped_counted_and_emit_never_blocks(webhook, caplog):
    webhook.hang()
    a = alerter(WebhookSink(webhook.url), queue_size=2)
    a.emit(Event.DATA_STALE, "s0")
    assert webhook.entered.wait(5)                       # the first is in flight, hanging
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="alerts"):
        for i in range(1, 10):
            a.emit(Event.DATA_STALE, f"s{i}")
    assert time.monotonic() - started < 0.5
    assert a.dropped == 7                                # 1 in flight + 2 queued of 10
    drops = [r for r in caplog.records if r.getMessage() == "alert dropped: sink queue full"]
    assert [r.dropped_total for r in drops] == list(range(1, 8))
    webhook.release.set()
    assert a.flush(5)
    assert webhook.events() == ["DATA_STALE"] * 3
    a.close()


def test_a_hanging_sink_does_not_hold_up_the_other_sink(webhook, sns_topic):
    webhook.hang()
    a = alerter(WebhookSink(webhook.url), SnsSink(sns_topic.arn, client=sns_topic.sns))
    a.emit(Event.HALT, "acct-1")
    deadline = time.monotonic() + 5
    published: list = []
    while not published and time.monotonic() < deadline:
        published = sns_topic.messages()
        time.sleep(0.01)
    assert [m["MessageAttributes"]["event"]["Value"] for m in published] == ["HALT"]
    assert webhook.bodies == []
    webhook.release.set()
    assert a.flush(5)
    a.close()


# --- secrets ------------------------------------------------------------------------------------


def test_alerts_carry_no_secret_to_any_sink(webhook, sns_topic):
    register_secret("s3cr3t-registered-value")
    a = alerter(WebhookSink(webhook.url), SnsSink(sns_topic.arn, client=sns_topic.sns))
    a.emit(
        Event.PARAMS_REFUSED, "ssm:/ops-pipeline/trading-params",
        api_key="PKABCDEFGHIJKLMNOP12", alpaca_secret_key="plain-secret", password="hunter2",
        database_url="postgresql://ops:pg-pass-123@db.internal:5432/ops",
        error="request failed with s3cr3t-registered-value and AKIAABCDEFGHIJKLMNOP in it",
        nested={"token": "tok-999", "note": "key PKZZZZZZZZZZZZZZZZZZ"},
        version="7",
    )
    assert a.flush(10)
    (body,) = webhook.bodies
    (message,) = sns_topic.messages()
    for text in (str(body), message["Message"], message["Subject"]):
        for secret in ("PKABCDEFGHIJKLMNOP12", "plain-secret", "hunter2", "pg-pass-123", "s3cr3t-registered-value",
                       "AKIAABCDEFGHIJKLMNOP", "tok-999", "PKZZZZZZZZZZZZZZZZZZ", "secret-path"):
            assert secret not in text
    fields = body["alert"]["fields"]
    assert fields["api_key"] == fields["alpaca_secret_key"] == fields["password"] == "***"
    assert fields["database_url"] == "postgresql://ops:***@db.internal:5432/ops"
    assert fields["nested"] == {"token": "***", "note": "key ***"}
    assert fields["version"] == "7"
    a.close()


def test_the_webhook_url_is_a_secret_in_reprs_and_logs(webhook, caplog):
    sink = WebhookSink(webhook.url)
    assert "secret-path" not in repr(sink)
    assert "secret-path" not in repr(Alerter([sink], clock=FixedClock(NOW)).sinks)


# --- pure parts ---------------------------------------------------------------------------------


@pytest.mark.parametrize("state,event", [("REDUCING", Event.KILL_SWITCH_TRIP), ("HALTED", Event.HALT),
                                          ("ACTIVE", Event.RESUME)])
def test_kill_switch_state_maps_to_its_event(state, event):
    assert kill_switch_event(state) is event


def test_deduper_forgets_idle_keys_past_max_keys():
    d = Deduper(window_seconds=10, max_keys=2)
    assert d.admit(Event.HALT, "a", 0) and d.admit(Event.HALT, "b", 0)
    assert d.admit(Event.HALT, "c", 20)                    # a and b idle past the window: forgotten
    assert set(d._sent) == {("HALT", "c")}
    assert d.admit(Event.HALT, "c", 25) is False and d.suppressed == 1


def test_sns_subject_is_ascii_and_at_most_100_characters():
    subject = sns_subject(Alert(Event.DATA_STALE, "ticker-é" + "x" * 200, NOW))
    assert len(subject) == 100 and subject.isascii()


def test_scrub_keeps_numbers_and_masks_secret_named_keys_of_any_case():
    assert scrub({"Authorization": "Bearer x", "qty": 3, "SessionToken": "t"}) == {
        "Authorization": "***", "qty": 3, "SessionToken": "***"}


# --- the process's alerter ----------------------------------------------------------------------


def test_without_sinks_configured_alerts_are_log_lines_only(monkeypatch, caplog):
    monkeypatch.delenv("OPS_ALERT_SNS_TOPIC_ARN", raising=False)
    monkeypatch.delenv("OPS_ALERT_WEBHOOK_URL", raising=False)
    a = alerts.from_env(clock=FixedClock(NOW))
    with installed(a), caplog.at_level(logging.WARNING, logger="alerts"):
        assert alerts.emit(Event.RESUME, "acct-1", reason="operator") is True
    assert a.sinks == []
    (line,) = [r for r in caplog.records if r.getMessage() == "alert RESUME acct-1"]
    assert (line.alert_event, line.fields) == ("RESUME", {"reason": "operator"})


def test_from_env_reads_sinks_and_thresholds(monkeypatch, webhook):
    monkeypatch.setenv("OPS_ALERT_WEBHOOK_URL", webhook.url)
    monkeypatch.setenv("OPS_ALERT_SNS_TOPIC_ARN", "arn:aws:sns:eu-west-1:123456789012:ops")
    monkeypatch.setenv("OPS_ALERT_DEDUPE_SECONDS", "30")
    monkeypatch.setenv("OPS_ALERT_LOOP_FAILURES", "5")
    a = alerts.from_env()
    assert (sorted(a.sinks), a._dedupe.window, a.loop_failures) == (["sns", "webhook"], 30.0, 5)
    a.close(timeout=0)


def test_a_bad_configuration_is_logged_and_never_raised_into_the_caller(monkeypatch, caplog):
    monkeypatch.setenv("OPS_ALERT_DEDUPE_SECONDS", "five minutes")
    previous = alerts.configure(None)
    try:
        with caplog.at_level(logging.ERROR, logger="alerts"):
            assert alerts.emit(Event.HALT, "acct-1") is False
    finally:
        alerts.configure(previous)
    assert any("OPS_ALERT_DEDUPE_SECONDS" in r.error for r in caplog.records if r.getMessage() == "alert not emitted")


def test_broker_unavailable_alerts_only_after_the_threshold_and_resets_on_success(webhook):
    clock = FixedClock(NOW)
    a = alerter(WebhookSink(webhook.url), broker_down_seconds=120, clock=clock)
    assert a.broker_failed("acct-1", "timeout") is False
    clock.advance(timedelta(seconds=119))
    assert a.broker_failed("acct-1", "timeout") is False
    clock.advance(timedelta(seconds=1))
    assert a.broker_failed("acct-1", "timeout") is True
    a.broker_ok("acct-1")
    clock.advance(timedelta(seconds=1000))
    assert a.broker_failed("acct-1", "timeout") is False   # a new outage starts its own count
    assert a.flush(5)
    assert [b["alert"]["fields"] for b in webhook.bodies] == [{"down_seconds": 120, "failures": 3, "error": "timeout"}]
    a.close()


def test_loop_failures_alert_at_the_threshold_of_consecutive_failures(webhook):
    a = alerter(WebhookSink(webhook.url), loop_failures=3)
    assert [a.loop_failed("signal-engine", "boom") for _ in range(2)] == [False, False]
    a.loop_ok("signal-engine")
    assert [a.loop_failed("signal-engine", "boom") for _ in range(3)] == [False, False, True]
    assert a.flush(5)
    assert webhook.events() == ["LOOP_FAILURES"]
    a.close()

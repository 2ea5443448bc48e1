"""The stale-data watchdog: an alert within a minute of bars going stale during the session, none
outside it; and `ops-pipeline alerts test`."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from services.adapters.alerts import Alerter, WebhookSink
from services.cli import main as cli_main
from services.common.clock import FixedClock
from services.common.market_calendar import nyse_calendar
from services.common.params import ParamsInForce, as_params
from services.domain.alerts import Event, stale_data_watch_due
from services.watchdog import DEFAULT_INTERVAL_SECONDS, StaleDataWatchdog
from tests.alert_doubles import installed, sns_topic, webhook  # noqa: F401
from tests.factories import ACCOUNT, add_bar, et


class Params:
    def __init__(self, max_bar_age_seconds: int):
        params = as_params({"max_bar_age_seconds": max_bar_age_seconds})
        self._in_force = ParamsInForce(params, "test", "1", params.content_hash())

    def current(self) -> ParamsInForce:
        return self._in_force


def watch(conn, *tickers: str) -> None:
    for ticker in tickers:
        conn.execute("INSERT INTO watchlist_state (account_id, ticker, selected, updated_at) VALUES (%s, %s, true, %s)",
                     (ACCOUNT, ticker, et("2026-11-30", "09:00")))


def bars_until(conn, ticker: str, last_end: datetime, minutes: int = 10) -> None:
    """1-minute bars for `minutes` minutes, the last one ending at `last_end`."""
    for i in range(1, minutes + 1):
        add_bar(conn, ticker, last_end - timedelta(minutes=i), 100)


def run_watchdog(conn, dog: StaleDataWatchdog, clock: FixedClock, until: datetime) -> list[datetime]:
    """Check every DEFAULT_INTERVAL_SECONDS as the loop does; the times at which it found stale tickers."""
    found = []
    while clock.now() <= until:
        if dog.check(conn):
            found.append(clock.now())
        clock.advance(timedelta(seconds=DEFAULT_INTERVAL_SECONDS))
    return found


@pytest.mark.parametrize("max_age", [20, 180])
def test_watchdog_alerts_within_a_minute_of_bars_going_stale_during_the_session(conn, webhook, max_age):
    stopped = et("2026-11-30", "11:00")                     # the feed's last bar ended here
    watch(conn, "AAPL", "MSFT")
    bars_until(conn, "AAPL", stopped)
    bars_until(conn, "MSFT", stopped + timedelta(hours=1), minutes=90)  # MSFT keeps flowing
    clock = FixedClock(stopped - timedelta(minutes=2))
    dog = StaleDataWatchdog(ACCOUNT, Params(max_age), nyse_calendar(), clock)
    with installed(Alerter([WebhookSink(webhook.url)], clock=clock)) as a:
        found = run_watchdog(conn, dog, clock, stopped + timedelta(seconds=max_age + 120))
        assert a.flush(5)
    stale_from = stopped + timedelta(seconds=max_age)
    assert found and stale_from < found[0] <= stale_from + timedelta(minutes=1)
    (body,) = webhook.bodies                                # repeats within the dedupe window: one alert
    assert (body["alert"]["event"], body["alert"]["subject"]) == ("DATA_STALE", ACCOUNT)
    assert body["alert"]["fields"] == {
        "max_bar_age_seconds": max_age, "tickers": {"AAPL": (stopped - timedelta(minutes=1)).astimezone(timezone.utc).isoformat()}}


@pytest.mark.parametrize("now", [
    et("2026-11-30", "09:00"),   # before the open
    et("2026-11-30", "09:31"),   # open, but today's first bar cannot be stale yet
    et("2026-11-30", "16:00"),   # at the close
    et("2026-11-30", "20:00"),   # evening
    et("2026-11-28", "11:00"),   # Saturday
    et("2026-11-26", "11:00"),   # Thanksgiving
    et("2026-11-27", "13:30"),   # after the 13:00 early close
])
def test_watchdog_is_silent_outside_the_session(conn, webhook, now):
    watch(conn, "AAPL")                                     # no bars at all: as stale as it gets
    clock = FixedClock(now)
    dog = StaleDataWatchdog(ACCOUNT, Params(120), nyse_calendar(), clock)
    with installed(Alerter([WebhookSink(webhook.url)], clock=clock)) as a:
        assert dog.check(conn) == []
        assert a.flush(5)
    assert webhook.bodies == []


def test_watch_due_starts_once_the_first_bar_could_have_aged_past_the_limit(calendar):
    session = calendar.session_on(et("2026-11-30", "12:00").date())
    opened = et("2026-11-30", "09:30")
    assert stale_data_watch_due(opened + timedelta(seconds=60 + 120), session, 120) is True
    assert stale_data_watch_due(opened + timedelta(seconds=60 + 119), session, 120) is False
    assert stale_data_watch_due(et("2026-11-30", "15:59"), session, 120) is True
    assert stale_data_watch_due(et("2026-11-30", "12:00"), None, 120) is False


# --- ops-pipeline alerts test -------------------------------------------------------------------


def test_alerts_test_command_sends_one_of_each_event_to_every_sink(monkeypatch, webhook, sns_topic, capsys):
    monkeypatch.setenv("OPS_ALERT_WEBHOOK_URL", webhook.url)
    monkeypatch.setenv("OPS_ALERT_SNS_TOPIC_ARN", sns_topic.arn)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    assert cli_main(["alerts", "test"]) == 0
    assert sorted(webhook.events()) == sorted(e.value for e in Event)
    assert sorted(m["MessageAttributes"]["event"]["Value"] for m in sns_topic.messages()) == sorted(
        e.value for e in Event)
    out = capsys.readouterr().out
    assert f"delivered={len(Event)}/{len(Event)} failed=0" in out and "sns" in out and "webhook" in out


def test_alerts_test_command_without_sinks_exits_2_and_says_what_to_set(monkeypatch, capsys):
    monkeypatch.delenv("OPS_ALERT_WEBHOOK_URL", raising=False)
    monkeypatch.delenv("OPS_ALERT_SNS_TOPIC_ARN", raising=False)
    assert cli_main(["alerts", "test"]) == 2
    assert "OPS_ALERT_WEBHOOK_URL" in capsys.readouterr().err

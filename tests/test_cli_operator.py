"""Operator commands: `status --json/--watch`, configuration errors said by their variable, and a
missing AWS region or credentials answered in one line with exit 2."""

from __future__ import annotations

import io
import json
import os
import threading
from datetime import timedelta
from pathlib import Path

import freezegun
import pytest
from pydantic import ValidationError

from services.adapters.alpaca.settings import AlpacaSettings
from services.cli import main as cli
from services.cli.config_errors import settings_error_lines
from services.cli.status import watch
from services.common.settings import Settings
from tests.factories import ACCOUNT, add_bar, add_recommendation, et, set_account_state

REPO = Path(__file__).resolve().parents[1]
NOW = et("2026-11-30", "10:00")  # a Monday session



@pytest.fixture
def no_aws(monkeypatch, tmp_path):
    """No region, no credentials, and no instance metadata to look for them in."""
    for name in [n for n in os.environ if n.startswith("AWS_")]:
        monkeypatch.delenv(name)
    empty = tmp_path / "aws-empty"
    empty.write_text("")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(empty))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


# --- status ---------------------------------------------------------------------------------------


def test_status_json_has_the_documented_shape_and_names_stale_watched_tickers(db_url, conn, monkeypatch, capsys,
                                                                              restore_logging):
    monkeypatch.setenv("DATABASE_URL", db_url)
    monkeypatch.setenv("OPS_PARAMS_SOURCE", "file")
    set_account_state(conn, NOW, 99_900, 100_000)
    conn.execute("INSERT INTO watchlist_state (account_id, ticker, selected, rank, updated_at) VALUES "
                 "(%s, 'AAPL', true, 1, %s), (%s, 'MSFT', true, 2, %s)", (ACCOUNT, NOW, ACCOUNT, NOW))
    add_bar(conn, "AAPL", NOW - timedelta(minutes=1), 200)
    add_bar(conn, "MSFT", NOW - timedelta(minutes=20), 300)
    add_recommendation(conn, "AAPL", NOW)

    with freezegun.freeze_time(NOW):
        assert cli(["status", "--json", "--account", ACCOUNT]) == 0
    captured = capsys.readouterr()

    assert captured.err == ""  # operator commands are quiet: stdout carries the answer alone
    doc = json.loads(captured.out)
    assert set(doc) == {"account_id", "as_of", "kill_switch", "account", "exposure", "positions",
                        "closed_today", "realized_today", "decisions_by_status", "blocked_by", "params", "params_in_force", "data"}
    assert doc["account_id"] == ACCOUNT
    assert doc["kill_switch"]["state"] == "ACTIVE"
    assert (doc["account"]["equity"], doc["account"]["daily_pnl"]) == (99_900, -100)
    assert (doc["exposure"], doc["positions"]) == (0, [])
    assert doc["decisions_by_status"] == {"PENDING": 1}
    assert doc["params"]["source"].startswith("file:") and len(doc["params"]["hash"]) == 64
    data = doc["data"]
    assert (data["session_open"], data["max_bar_age_seconds"]) == (True, 180)
    assert [(s["ticker"], s["last_bar_ts"][:19]) for s in data["stale_tickers"]] == [("MSFT", "2026-11-30T14:40:00")]

    with freezegun.freeze_time(NOW):
        assert cli(["status", "--account", ACCOUNT]) == 0
    table = capsys.readouterr().out
    assert "kill switch   ACTIVE" in table
    assert "data          STALE beyond 180s: MSFT (last bar 2026-11-30 14:40:00+0000)" in table


def test_status_watch_refreshes_every_interval_until_its_count():
    out = io.StringIO()
    renders = iter(["first", "second", "third"])
    stop = threading.Event()
    waits: list[float] = []

    class Recorder(threading.Event):
        def wait(self, timeout=None):
            waits.append(timeout)
            return False

    done = watch(lambda: next(renders), 2.5, out, count=3, clear="<clear>", stop=Recorder())

    assert done == 3
    assert out.getvalue() == "<clear>first\n<clear>second\n<clear>third\n"
    assert waits == [2.5, 2.5]
    assert not stop.is_set()


def test_status_watch_json_prints_one_document_per_line(db_url, monkeypatch, capsys, restore_logging):
    monkeypatch.setenv("DATABASE_URL", db_url)
    monkeypatch.setenv("OPS_PARAMS_SOURCE", "file")

    assert cli(["status", "--json", "--watch", "--interval", "0.01", "--count", "2", "--account", ACCOUNT]) == 0

    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line)["account_id"] for line in lines] == [ACCOUNT, ACCOUNT]


# --- configuration errors by their variable -------------------------------------------------------


def test_missing_alpaca_keys_are_named_by_their_environment_variables(monkeypatch):
    for name in ("ALPACA_API_KEY", "ALPACA_SECRET_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ALPACA_TIMEOUT_SECONDS", "soon")
    with pytest.raises(ValidationError) as caught:
        AlpacaSettings()

    assert settings_error_lines(caught.value) == [
        "ALPACA_API_KEY is required but not set",
        "ALPACA_SECRET_KEY is required but not set",
        "ALPACA_TIMEOUT_SECONDS is invalid: Input should be a valid number, unable to parse string as a number",
    ]


def test_bad_service_settings_are_named_by_their_environment_variables_and_never_echo_the_value(monkeypatch):
    monkeypatch.setenv("ACCOUNT_ID", "")
    monkeypatch.setenv("OPS_PARAMS_SOURCE", "vault-secret-123")
    with pytest.raises(ValidationError) as caught:
        Settings()

    lines = settings_error_lines(caught.value)
    assert [line.split(" ", 1)[0] for line in lines] == ["ACCOUNT_ID", "OPS_PARAMS_SOURCE"]
    assert all(" is invalid: " in line for line in lines)
    assert not any("vault-secret-123" in line for line in lines)


def test_a_service_started_without_its_alpaca_key_exits_2_naming_the_variable(db_url, monkeypatch, capsys,
                                                                              restore_logging):
    monkeypatch.setenv("DATABASE_URL", db_url)
    monkeypatch.delenv("ALPACA_API_KEY", raising=False)
    monkeypatch.setenv("ALPACA_SECRET_KEY", "s" * 20)

    assert cli(["telemetry", "--once"]) == 2

    err = capsys.readouterr().err
    assert "error: ALPACA_API_KEY is required but not set\n" in err
    assert "Traceback" not in err and "Field required" not in err


def test_a_bad_metrics_port_exits_2_naming_the_variable(db_url, monkeypatch, capsys, restore_logging):
    monkeypatch.setenv("DATABASE_URL", db_url)
    monkeypatch.setenv("OPS_METRICS_PORT", "metrics")

    assert cli(["feature-computer", "--interval", "0.01"]) == 2

    assert "error: OPS_METRICS_PORT must be a port number 0-65535" in capsys.readouterr().err


# --- AWS: one line and exit 2 ---------------------------------------------------------------------


@pytest.mark.parametrize("argv", [
    ["params", "history"],
    ["params", "diff", str(REPO / "config" / "trading_params.json")],
    ["params", "push", "--yes", str(REPO / "config" / "trading_params.json")],
    ["params", "show", "--source", "ssm"],
], ids=["history", "diff", "push", "show"])
def test_params_commands_without_an_aws_region_say_so_in_one_line_and_exit_2(argv, no_aws, capsys,
                                                                              restore_logging):
    code = cli(argv)

    captured = capsys.readouterr()
    assert (code, captured.err) == (2, "error: no AWS region: set AWS_REGION (or AWS_DEFAULT_REGION), "
                                       "or pass --region\n")


@pytest.mark.parametrize("argv", [
    ["params", "history"],
    ["params", "push", "--yes", str(REPO / "config" / "trading_params.json")],
], ids=["history", "push"])
def test_params_commands_without_aws_credentials_say_so_in_one_line_and_exit_2(argv, no_aws, monkeypatch,
                                                                                capsys, restore_logging):
    monkeypatch.setenv("AWS_REGION", "us-east-1")

    code = cli(argv)

    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: no AWS credentials") and err.count("\n") == 1, err

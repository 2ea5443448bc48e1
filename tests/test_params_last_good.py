"""SSM down at start-up: the last good SSM document kept in Postgres is used, not the reviewed
file; the file only when no SSM document was ever good. Both alert, and `status` says which."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import boto3
from botocore.config import Config

from services.adapters.alerts import Alerter, WebhookSink
from services.adapters.params_source import SsmParamsProvider
from services.adapters.postgres.params_store import PostgresParamsStore, params_in_force
from services.cli import main as cli_main
from services.common.clock import FixedClock
from services.common.params import DEFAULT_PARAMS_PATH
from tests.alert_doubles import installed, webhook  # noqa: F401
from tests.test_params_source import aws_env, ssm  # noqa: F401  (the moto SSM fixtures)

NAME = "/ops-pipeline/trading-params"
START = datetime(2026, 3, 2, 15, 0, tzinfo=timezone.utc)
CLOSED_PORT = "http://127.0.0.1:9"


def unreachable_ssm():
    return boto3.client("ssm", region_name="us-east-1", endpoint_url=CLOSED_PORT,
                        config=Config(connect_timeout=1, retries={"total_max_attempts": 1}))


def put(ssm, max_daily_loss: int) -> int:
    doc = json.loads(DEFAULT_PARAMS_PATH.read_text())
    doc["risk"]["max_daily_loss"] = max_daily_loss
    return ssm.put_parameter(Name=NAME, Value=json.dumps(doc), Type="String", Overwrite=True)["Version"]


def provider(client, db_url, clock=None) -> SsmParamsProvider:
    return SsmParamsProvider(NAME, ssm_client=client, reload_seconds=30, clock=clock or FixedClock(START),
                             store=PostgresParamsStore(db_url))


def stored(conn) -> list[tuple[str, str]]:
    return [(r["version"], r["content_hash"]) for r in conn.execute(
        "SELECT version, content_hash FROM params_ssm_documents WHERE name = %s ORDER BY stored_at", (NAME,))]


def test_each_good_ssm_document_is_kept_in_postgres_with_its_version_and_hash(ssm, db_url, conn):
    put(ssm, 300)
    clock = FixedClock(START)
    p = provider(ssm, db_url, clock)
    first = p.current()
    put(ssm, 250)
    clock.advance(timedelta(seconds=30))
    second = p.current()
    assert (first.version, second.version) == ("1", "2")
    assert stored(conn) == [("1", first.content_hash), ("2", second.content_hash)]
    (row,) = params_in_force(conn)
    assert (row["source"], row["version"], row["using_fallback"]) == (f"ssm:{NAME}", "2", False)


def test_ssm_unreachable_at_start_uses_the_last_good_version_not_the_file_and_alerts(ssm, db_url, conn, webhook):
    put(ssm, 300)
    put(ssm, 250)                                     # version 2: the operators' tighter limit
    provider(ssm, db_url)                             # a service started while SSM answered

    with installed(Alerter([WebhookSink(webhook.url)])) as a:
        p = provider(unreachable_ssm(), db_url)       # the next start-up: SSM is down
        assert a.flush(5)
    in_force = p.current()
    assert (in_force.source, in_force.version) == (f"ssm-last-good:{NAME}", "2")
    assert in_force.params.risk.max_daily_loss == Decimal("250")   # not the file's 500
    status = p.status()
    assert status["using_fallback"] is True
    assert "using its last good version 2" in status["note"] and "Could not connect" in status["last_error"]

    (alert,) = webhook.bodies
    assert (alert["alert"]["event"], alert["alert"]["subject"]) == ("PARAMS_FALLBACK", f"ssm:{NAME}")
    assert (alert["alert"]["fields"]["in_force"], alert["alert"]["fields"]["version"]) == (f"ssm-last-good:{NAME}", "2")
    (row,) = params_in_force(conn)
    assert (row["source"], row["version"], row["using_fallback"]) == (f"ssm-last-good:{NAME}", "2", True)


def test_parameter_removed_at_start_uses_the_last_good_version(ssm, db_url):
    put(ssm, 250)
    provider(ssm, db_url)
    ssm.delete_parameter(Name=NAME)
    p = provider(ssm, db_url)
    assert (p.current().source, p.current().version) == (f"ssm-last-good:{NAME}", "1")
    assert "ParameterNotFound" in p.status()["last_error"]


def test_no_ssm_document_ever_good_then_the_file_and_an_alert_that_says_so(aws_env, db_url, conn, webhook):
    with installed(Alerter([WebhookSink(webhook.url)])) as a:
        p = provider(unreachable_ssm(), db_url)
        assert a.flush(5)
    assert p.current().source == f"file:{DEFAULT_PARAMS_PATH}"
    assert "none ever stored" in p.status()["note"]
    (alert,) = webhook.bodies
    assert (alert["alert"]["event"], alert["alert"]["fields"]["in_force"]) == (
        "PARAMS_FALLBACK", f"file:{DEFAULT_PARAMS_PATH}")
    (row,) = params_in_force(conn)
    assert (row["source"], row["using_fallback"]) == (f"file:{DEFAULT_PARAMS_PATH}", True)


def test_a_stored_document_the_model_no_longer_accepts_is_skipped_for_the_file(ssm, db_url, conn):
    put(ssm, 250)
    provider(ssm, db_url)
    conn.execute("UPDATE params_ssm_documents SET document = '{\"risk\": {}}'")
    p = provider(unreachable_ssm(), db_url)
    assert p.current().source == f"file:{DEFAULT_PARAMS_PATH}"


def test_when_ssm_answers_again_its_document_replaces_the_last_good_one(ssm, db_url, conn):
    put(ssm, 250)
    provider(ssm, db_url)
    ssm.delete_parameter(Name=NAME)
    clock = FixedClock(START)
    p = provider(ssm, db_url, clock)
    assert p.current().source == f"ssm-last-good:{NAME}"
    put(ssm, 200)
    clock.advance(timedelta(seconds=30))
    assert (p.current().source, p.current().params.risk.max_daily_loss) == (f"ssm:{NAME}", Decimal("200"))
    assert p.status()["using_fallback"] is False
    (row,) = params_in_force(conn)
    assert (row["source"], row["using_fallback"]) == (f"ssm:{NAME}", False)


def test_the_database_down_too_then_the_file_still_starts_the_service(aws_env):
    p = SsmParamsProvider(NAME, ssm_client=unreachable_ssm(), clock=FixedClock(START),
                          store=PostgresParamsStore("postgresql://nobody@127.0.0.1:9/none?connect_timeout=1"))
    assert p.current().source == f"file:{DEFAULT_PARAMS_PATH}"


def test_status_says_the_last_good_ssm_version_is_in_force(ssm, db_url, monkeypatch, capsys):
    put(ssm, 250)
    provider(ssm, db_url)                             # a service started while SSM answered
    provider(unreachable_ssm(), db_url)               # and restarted while it is down
    monkeypatch.setenv("DATABASE_URL", db_url)
    monkeypatch.setenv("OPS_PARAMS_SOURCE", "ssm")
    monkeypatch.setenv("AWS_ENDPOINT_URL_SSM", CLOSED_PORT)
    assert cli_main(["status", "--account", "acct-test"]) == 0
    out = capsys.readouterr().out
    params_line = next(line for line in out.splitlines() if line.startswith("params"))
    assert params_line.startswith(f"params        ssm-last-good:{NAME} version 1")
    assert "FALLBACK: no good document in ssm:" in params_line and "last good version 1" in params_line
    assert f"services on ssm:{NAME}: ssm-last-good:{NAME} version 1" in out

"""A running dispatcher picks up a document pushed to SSM within one reload interval, records
its version with the next decision, and keeps the last good limits when a bad one is pushed."""

from __future__ import annotations

import json
from datetime import timedelta

import boto3
import pytest
from moto import mock_aws

from services.common.clock import FixedClock
from services.common.db import connect, make_pool
from services.common.params import DEFAULT_PARAMS_PATH
from services.adapters.params_source import SsmParamsProvider
from services.dispatcher.main import Dispatcher
from services.adapters.sim.broker import SimBroker
from tests.factories import ACCOUNT, add_market, add_recommendation, et, recommendation

NAME = "/ops-pipeline/trading-params"
RELOAD = 30


@pytest.fixture
def ssm(monkeypatch):
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    with mock_aws():
        yield boto3.client("ssm", region_name="us-east-1")


def document(**risk) -> str:
    doc = json.loads(DEFAULT_PARAMS_PATH.read_text())
    doc["risk"].update(risk)
    return json.dumps(doc)


def test_running_dispatcher_applies_a_pushed_document_within_one_reload_interval(ssm, db_url):
    ssm.put_parameter(Name=NAME, Value=document(max_open_positions=5), Type="String")
    now = et("2026-11-30", "10:00")
    clock = FixedClock(now)
    provider = SsmParamsProvider(NAME, ssm_client=ssm, reload_seconds=RELOAD, clock=clock)
    pool = make_pool(db_url)
    dispatcher = Dispatcher(pool, SimBroker(pool, ACCOUNT, clock), provider, ACCOUNT, clock=clock)
    try:
        with connect(db_url) as conn:
            add_market(conn, "AAPL", now, 200)
            first = add_recommendation(conn, "AAPL", now, confidence=0.9)
        dispatcher.refresh_account(force=True)
        dispatcher.drain()

        # The operator lowers the position limit to 0: version 2.
        ssm.put_parameter(Name=NAME, Value=document(max_open_positions=0), Type="String", Overwrite=True)
        later = clock.advance(timedelta(seconds=RELOAD + 1))
        with connect(db_url) as conn:
            add_market(conn, "MSFT", later, 400)
            second = add_recommendation(conn, "MSFT", later, confidence=0.9)
        dispatcher.refresh_account(force=True)
        dispatcher.drain()

        # A malformed push (version 3) is refused; version 2's limits stay in force.
        ssm.put_parameter(Name=NAME, Value='{"schema_version": 1, "risk": ', Type="String", Overwrite=True)
        last = clock.advance(timedelta(seconds=RELOAD + 1))
        with connect(db_url) as conn:
            add_market(conn, "NVDA", last, 180)
            third = add_recommendation(conn, "NVDA", last, confidence=0.9)
        dispatcher.refresh_account(force=True)
        dispatcher.drain()

        with connect(db_url) as conn:
            r1, r2, r3 = (recommendation(conn, r) for r in (first, second, third))
    finally:
        pool.close()

    assert (r1["status"], r1["params_source"], r1["params_version"]) == ("EXECUTED", f"ssm:{NAME}", "1")
    assert (r2["status"], r2["outcome_code"], r2["params_version"]) == ("SKIPPED", "MAX_POSITIONS", "2")
    assert r2["params_hash"] != r1["params_hash"]
    assert (r3["status"], r3["outcome_code"], r3["params_version"]) == ("SKIPPED", "MAX_POSITIONS", "2")
    status = provider.status()
    assert status["last_error"] and status["last_error"].startswith("PARAMS_INVALID")

"""Params providers against SSM (moto, in-process): hot reload, refusal of bad documents, the
loud fallback at start-up; the service settings, secrets, and the two-key live trading rule."""

from __future__ import annotations

import io
import json
import logging
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import boto3
import pytest
from botocore.config import Config
from moto import mock_aws

from services.common.clock import FixedClock
from services.common.logs import JsonFormatter, register_secret
from services.common.params import DEFAULT_PARAMS_PATH, ParamsError, default_params
from services.adapters.params_source import (
    FileParamsProvider,
    SsmParamsProvider,
    provider_from_settings,
)
from services.common.settings import Settings, redact_database_url, trading_mode

NAME = "/ops-pipeline/trading-params"
PROVIDER_LOG = "services.adapters.params_source"
RELOAD = 30
START = datetime(2026, 3, 2, 15, 0, tzinfo=timezone.utc)


@pytest.fixture
def aws_env(monkeypatch):
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_SSM", "AWS_PROFILE", "AWS_REGION"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def ssm(aws_env):
    with mock_aws():
        yield boto3.client("ssm", region_name="us-east-1")


@pytest.fixture
def clock():
    return FixedClock(START)


def base_doc() -> dict:
    return json.loads(DEFAULT_PARAMS_PATH.read_text())


def put(ssm, document, *, overwrite=True) -> int:
    value = document if isinstance(document, str) else json.dumps(document)
    return ssm.put_parameter(Name=NAME, Value=value, Type="String", Overwrite=overwrite)["Version"]


def doc_with(section: str, field: str, value) -> dict:
    doc = base_doc()
    doc[section][field] = value
    return doc


def running_provider(ssm, clock) -> SsmParamsProvider:
    """A provider with version 1 (max_daily_loss 400) in force."""
    put(ssm, doc_with("risk", "max_daily_loss", 400), overwrite=False)
    provider = SsmParamsProvider(NAME, ssm_client=ssm, reload_seconds=RELOAD, clock=clock)
    assert provider.current().version == "1"
    return provider


# -- hot reload -------------------------------------------------------------------------------


def test_pushed_document_is_picked_up_within_one_reload_interval(ssm, clock):
    provider = running_provider(ssm, clock)
    v1 = provider.current()
    assert v1.source == f"ssm:{NAME}"
    assert v1.params.risk.max_daily_loss == Decimal("400")

    new_doc = doc_with("risk", "max_daily_loss", 300)
    assert put(ssm, new_doc) == 2

    clock.advance(timedelta(seconds=RELOAD - 1))
    assert provider.current().version == "1"  # not yet due: no SSM call per decision

    clock.advance(timedelta(seconds=1))
    in_force = provider.current()
    assert in_force.version == "2"
    assert in_force.params.risk.max_daily_loss == Decimal("300")
    assert in_force.content_hash == in_force.params.content_hash() != v1.content_hash
    status = provider.status()
    assert (status["source"], status["version"], status["hash"]) == (f"ssm:{NAME}", "2", in_force.content_hash)
    assert status["using_fallback"] is False and status["last_error"] is None
    assert status["loaded_at"] == (START + timedelta(seconds=RELOAD)).isoformat()


def test_unchanged_version_keeps_the_same_document_object(ssm, clock):
    provider = running_provider(ssm, clock)
    first = provider.current()
    clock.advance(timedelta(seconds=RELOAD * 3))
    assert provider.current() is first
    assert provider.status()["loaded_at"] == START.isoformat()


BAD_DOCUMENTS = [
    ("malformed_json", lambda: json.dumps(base_doc())[:-20], "<document>"),
    ("yaml_text", lambda: "schema_version: 1\nrisk:\n  max_daily_loss: 300\n", "<document>"),
    ("spread_above_one", lambda: json.dumps(doc_with("options", "max_option_spread", 1.5)), "options.max_option_spread"),
    ("negative_daily_loss", lambda: json.dumps(doc_with("risk", "max_daily_loss", -1)), "risk.max_daily_loss"),
    ("unknown_top_level_key", lambda: json.dumps({**base_doc(), "allow_everything": True}), "allow_everything"),
    ("unknown_key_in_section", lambda: json.dumps(doc_with("risk", "max_dialy_loss", 5000)), "risk.max_dialy_loss"),
]


@pytest.mark.parametrize(("case", "make_text", "field"), BAD_DOCUMENTS, ids=[c[0] for c in BAD_DOCUMENTS])
def test_bad_document_is_refused_naming_the_field_and_previous_limits_stay(ssm, clock, caplog, case, make_text, field):
    provider = running_provider(ssm, clock)
    before = provider.current()

    put(ssm, make_text())
    clock.advance(timedelta(seconds=RELOAD))
    with caplog.at_level(logging.INFO, logger="services.adapters.params_source"):
        in_force = provider.current()

    assert in_force is before
    assert in_force.version == "1" and in_force.params.risk.max_daily_loss == Decimal("400")
    status = provider.status()
    assert status["version"] == "1" and status["refused_version"] == "2"
    assert status["last_error"].startswith(f"PARAMS_INVALID: ssm:{NAME} version 2 refused: {field}")
    assert status["last_error_at"] == (START + timedelta(seconds=RELOAD)).isoformat()
    assert status["refused_errors"][0].startswith(f"{field}: ")
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert f"{field}: " in errors[0].getMessage()
    assert errors[0].errors == status["refused_errors"]

    # The same bad version is not parsed and logged again on every reload.
    caplog.clear()
    clock.advance(timedelta(seconds=RELOAD))
    with caplog.at_level(logging.INFO, logger="services.adapters.params_source"):
        assert provider.current() is before
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert provider.status()["refused_version"] == "2"


def test_good_version_after_a_refused_one_is_installed_and_clears_the_error(ssm, clock):
    provider = running_provider(ssm, clock)
    put(ssm, doc_with("options", "max_option_spread", 1.5))
    clock.advance(timedelta(seconds=RELOAD))
    assert provider.current().version == "1"
    put(ssm, doc_with("options", "max_option_spread", 0.05))
    clock.advance(timedelta(seconds=RELOAD))
    in_force = provider.current()
    assert in_force.version == "3" and in_force.params.options.max_option_spread == 0.05
    status = provider.status()
    assert status["last_error"] is None and status["refused_version"] is None


def test_all_invalid_fields_are_logged_in_one_error(ssm, clock, caplog):
    provider = running_provider(ssm, clock)
    doc = doc_with("options", "max_option_spread", 1.5)
    doc["risk"]["max_daily_loss"] = -1
    put(ssm, doc)
    clock.advance(timedelta(seconds=RELOAD))
    with caplog.at_level(logging.ERROR, logger="services.adapters.params_source"):
        provider.current()
    (record,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert sorted(e.split(":")[0] for e in record.errors) == ["options.max_option_spread", "risk.max_daily_loss"]
    assert "options.max_option_spread" in record.getMessage() and "risk.max_daily_loss" in record.getMessage()


def test_ssm_unavailable_later_keeps_last_good_and_records_the_error(ssm, clock, caplog):
    provider = running_provider(ssm, clock)
    ssm.delete_parameter(Name=NAME)
    clock.advance(timedelta(seconds=RELOAD))
    with caplog.at_level(logging.WARNING, logger="services.adapters.params_source"):
        in_force = provider.current()
    assert in_force.version == "1" and in_force.params.risk.max_daily_loss == Decimal("400")
    status = provider.status()
    assert status["last_error"].startswith("PARAMS_SOURCE_UNAVAILABLE: ") and "ParameterNotFound" in status["last_error"]
    assert status["using_fallback"] is False
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1

    # Same outage on the next reload: recorded, not logged again.
    caplog.clear()
    clock.advance(timedelta(seconds=RELOAD))
    with caplog.at_level(logging.WARNING, logger="services.adapters.params_source"):
        provider.current()
    assert caplog.records == []


def test_ssm_reachable_again_with_same_version_clears_the_error(ssm, clock):
    provider = running_provider(ssm, clock)

    def failing(**kwargs):
        from botocore.exceptions import EndpointConnectionError

        raise EndpointConnectionError(endpoint_url="https://ssm.us-east-1.amazonaws.com/")

    real = ssm.get_parameter
    ssm.get_parameter = failing
    clock.advance(timedelta(seconds=RELOAD))
    assert provider.current().version == "1"
    assert "Could not connect to the endpoint URL" in provider.status()["last_error"]
    ssm.get_parameter = real
    clock.advance(timedelta(seconds=RELOAD))
    assert provider.current().version == "1"
    assert provider.status()["last_error"] is None


# -- start-up without a good document ---------------------------------------------------------


def assert_fallback(provider: SsmParamsProvider, problem: str) -> None:
    in_force = provider.current()
    assert in_force.source == f"file:{DEFAULT_PARAMS_PATH}"
    assert in_force.version == "file"
    assert in_force.content_hash == default_params().content_hash()
    status = provider.status()
    assert status["using_fallback"] is True
    assert status["source"] == f"file:{DEFAULT_PARAMS_PATH}"
    assert "using the reviewed defaults" in status["note"]
    assert problem in status["last_error"]


def test_parameter_missing_at_startup_uses_file_defaults_and_says_so(ssm, clock, caplog):
    with caplog.at_level(logging.WARNING, logger="services.adapters.params_source"):
        provider = SsmParamsProvider(NAME, ssm_client=ssm, reload_seconds=RELOAD, clock=clock)
    assert_fallback(provider, "ParameterNotFound")
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == PROVIDER_LOG]
    assert "using the reviewed defaults" in warning.getMessage()

    # The operators' document is picked up as soon as it appears.
    put(ssm, doc_with("risk", "max_daily_loss", 250), overwrite=False)
    clock.advance(timedelta(seconds=RELOAD))
    in_force = provider.current()
    assert (in_force.source, in_force.version) == (f"ssm:{NAME}", "1")
    assert in_force.params.risk.max_daily_loss == Decimal("250")
    assert provider.status()["using_fallback"] is False and provider.status()["note"] is None


def test_unreachable_endpoint_at_startup_uses_file_defaults_and_says_so(aws_env, clock, caplog):
    client = boto3.client(
        "ssm", region_name="us-east-1", endpoint_url="http://127.0.0.1:9",
        config=Config(connect_timeout=1, retries={"total_max_attempts": 1}),
    )
    with caplog.at_level(logging.WARNING, logger="services.adapters.params_source"):
        provider = SsmParamsProvider(NAME, ssm_client=client, reload_seconds=RELOAD, clock=clock)
    assert_fallback(provider, "Could not connect to the endpoint URL")
    assert any(r.levelno == logging.WARNING and "using the reviewed defaults" in r.getMessage() for r in caplog.records)


def test_invalid_document_at_startup_uses_file_defaults_and_names_the_field(ssm, clock, caplog):
    put(ssm, doc_with("options", "max_option_spread", 1.5), overwrite=False)
    with caplog.at_level(logging.WARNING, logger="services.adapters.params_source"):
        provider = SsmParamsProvider(NAME, ssm_client=ssm, reload_seconds=RELOAD, clock=clock)
    assert_fallback(provider, "options.max_option_spread: Input should be less than or equal to 1")
    assert provider.status()["refused_version"] == "1"
    assert [r.levelname for r in caplog.records if r.name == PROVIDER_LOG] == ["ERROR", "WARNING"]


def test_invalid_fallback_file_and_no_ssm_document_refuses_to_start(ssm, clock, tmp_path):
    bad = tmp_path / "params.json"
    bad.write_text(json.dumps(doc_with("risk", "max_daily_loss", -1)))
    with pytest.raises(ParamsError) as info:
        SsmParamsProvider(NAME, ssm_client=ssm, fallback_path=bad, clock=clock)
    assert info.value.errors == ["risk.max_daily_loss: Input should be greater than 0"]


# -- the file provider ------------------------------------------------------------------------


def test_file_provider_reads_once_without_reload(tmp_path, clock):
    path = tmp_path / "params.json"
    path.write_text(json.dumps(doc_with("risk", "max_daily_loss", 450)))
    provider = FileParamsProvider(path, clock=clock)
    path.write_text(json.dumps(doc_with("risk", "max_daily_loss", 50)))
    clock.advance(timedelta(days=1))
    in_force = provider.current()
    assert (in_force.source, in_force.version) == (f"file:{path}", "file")
    assert in_force.params.risk.max_daily_loss == Decimal("450")


def test_file_provider_with_reload_refuses_bad_edit_and_takes_good_one(tmp_path, clock):
    path = tmp_path / "params.json"
    path.write_text(json.dumps(base_doc()))
    provider = FileParamsProvider(path, reload_seconds=5, clock=clock)
    path.write_text(json.dumps(doc_with("options", "max_option_spread", 1.5)))
    clock.advance(timedelta(seconds=5))
    assert provider.current().params.options.max_option_spread == 0.10
    assert "options.max_option_spread" in provider.status()["last_error"]
    path.write_text(json.dumps(doc_with("options", "max_option_spread", 0.08)))
    clock.advance(timedelta(seconds=5))
    assert provider.current().params.options.max_option_spread == 0.08
    assert provider.status()["last_error"] is None


def test_file_provider_refuses_invalid_file_at_startup(tmp_path):
    path = tmp_path / "params.json"
    path.write_text("risk:\n  max_daily_loss: 300\n")
    with pytest.raises(ParamsError) as info:
        FileParamsProvider(path)
    assert info.value.errors[0].startswith("<document>: Expecting value")


def test_provider_from_settings_file_is_the_default(monkeypatch, aws_env):
    monkeypatch.delenv("OPS_PARAMS_SOURCE", raising=False)
    monkeypatch.delenv("OPS_PARAMS_FILE", raising=False)
    provider = provider_from_settings(Settings())
    assert isinstance(provider, FileParamsProvider)
    assert provider.current().source == f"file:{DEFAULT_PARAMS_PATH}"


def test_provider_from_settings_ssm_reloads_at_the_documents_interval(monkeypatch, ssm):
    doc = base_doc()
    doc["execution"]["params_reload_seconds"] = 12
    ssm.put_parameter(Name="/other/params", Value=json.dumps(doc), Type="String")
    monkeypatch.setenv("OPS_PARAMS_SOURCE", "ssm")
    monkeypatch.setenv("OPS_PARAMS_SSM_NAME", "/other/params")
    provider = provider_from_settings(Settings())
    assert isinstance(provider, SsmParamsProvider)
    status = provider.status()
    assert (status["source"], status["version"], status["reload_seconds"]) == ("ssm:/other/params", "1", 12)


# -- settings, secrets, trading mode ----------------------------------------------------------


SECRET_KEY_ID = "PKTESTKEYID0123456789"
SECRET_SECRET = "s3cr3t-alpaca-value-xyz"
DB_PASSWORD = "db-pa55word-q"


@pytest.fixture
def secret_env(monkeypatch):
    monkeypatch.setenv("ALPACA_API_KEY", SECRET_KEY_ID)
    monkeypatch.setenv("ALPACA_SECRET_KEY", SECRET_SECRET)
    monkeypatch.setenv("DATABASE_URL", f"postgresql://ops:{DB_PASSWORD}@db.internal:5432/ops")
    for var in ("OPS_LIVE_TRADING", "ACCOUNT_ID", "OPS_PARAMS_SOURCE", "OPS_PARAMS_SSM_NAME", "OPS_PARAMS_FILE"):
        monkeypatch.delenv(var, raising=False)


def test_settings_defaults(secret_env):
    s = Settings()
    assert s.account_id == "paper-main"
    assert s.ops_params_ssm_name == "/ops-pipeline/trading-params"
    assert s.ops_params_source == "file"
    assert s.ops_params_file == DEFAULT_PARAMS_PATH
    assert s.ops_live_trading is False
    assert s.alpaca_api_key.get_secret_value() == SECRET_KEY_ID
    assert s.database_conninfo() == f"postgresql://ops:{DB_PASSWORD}@db.internal:5432/ops"


def test_repr_str_and_description_of_settings_hold_no_secret(secret_env):
    s = Settings()
    for text in (repr(s), str(s), json.dumps(s.describe()), str(s.model_dump())):
        for secret in (SECRET_KEY_ID, SECRET_SECRET, DB_PASSWORD):
            assert secret not in text
    assert s.describe()["database_url"] == "postgresql://ops:***@db.internal:5432/ops"
    assert s.describe()["alpaca_api_key_set"] is True


def test_loaded_secrets_are_redacted_from_json_log_lines(secret_env):
    Settings()  # loading registers every secret value with the redactor
    record = logging.makeLogRecord({
        "name": "t", "levelno": logging.ERROR, "levelname": "ERROR",
        "msg": "connect failed for %s with %s / %s",
        "args": (f"postgresql://ops:{DB_PASSWORD}@db.internal/ops", SECRET_KEY_ID, SECRET_SECRET),
        "extra_field": SECRET_SECRET,
    })
    line = JsonFormatter().format(record)
    for secret in (SECRET_KEY_ID, SECRET_SECRET, DB_PASSWORD):
        assert secret not in line
    assert json.loads(line)["msg"] == "connect failed for postgresql://ops:***@db.internal/ops with *** / ***"


def test_register_secret_redacts_through_a_real_logger():
    value = "vault-token-8d7f6e"
    register_secret(value)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("tests.secret")
    logger.addHandler(handler)
    try:
        logger.warning("token is %s", value)
    finally:
        logger.removeHandler(handler)
    assert value not in stream.getvalue()
    assert json.loads(stream.getvalue())["msg"] == "token is ***"


def test_redact_database_url_handles_conninfo_strings():
    assert redact_database_url("host=db user=ops password=hunter2 dbname=ops") == "host=db user=ops password=*** dbname=ops"
    assert redact_database_url("postgresql:///ops?host=/tmp") == "postgresql:///ops?host=/tmp"
    assert redact_database_url(None) is None


@pytest.mark.parametrize(
    ("env_value", "params_flag", "mode", "reason"),
    [
        (None, False, "paper", "PAPER: OPS_LIVE_TRADING is not set and params.live_trading_enabled is false"),
        ("1", False, "paper", "PAPER: params.live_trading_enabled is false"),
        (None, True, "paper", "PAPER: OPS_LIVE_TRADING is not set"),
        ("true", True, "live", "LIVE: OPS_LIVE_TRADING is set and params.live_trading_enabled is true"),
        ("1", True, "live", "LIVE: OPS_LIVE_TRADING is set and params.live_trading_enabled is true"),
        ("0", True, "paper", "PAPER: OPS_LIVE_TRADING is not set"),
        ("false", True, "paper", "PAPER: OPS_LIVE_TRADING is not set"),
    ],
)
def test_trading_mode_is_live_only_with_both_keys(monkeypatch, env_value, params_flag, mode, reason):
    if env_value is None:
        monkeypatch.delenv("OPS_LIVE_TRADING", raising=False)
    else:
        monkeypatch.setenv("OPS_LIVE_TRADING", env_value)
    params = default_params().model_copy(update={"live_trading_enabled": params_flag})
    result = trading_mode(Settings(), params)
    assert (result.mode, result.reason) == (mode, reason)
    assert tuple(result) == (mode, reason)


def test_trading_mode_accepts_params_in_force(monkeypatch, tmp_path):
    monkeypatch.setenv("OPS_LIVE_TRADING", "1")
    path = tmp_path / "live.json"
    doc = base_doc()
    doc["live_trading_enabled"] = True
    path.write_text(json.dumps(doc))
    assert trading_mode(Settings(), FileParamsProvider(path).current()).mode == "live"


def test_unrecognised_live_flag_is_an_error_not_a_guess(monkeypatch):
    monkeypatch.setenv("OPS_LIVE_TRADING", "yes please")
    with pytest.raises(Exception) as info:
        Settings()
    assert "OPS_LIVE_TRADING" in str(info.value)

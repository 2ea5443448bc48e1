"""`ops-pipeline params ...` against SSM (moto, in-process), called through services.cli.main."""

from __future__ import annotations

import io
import json

import boto3
import pytest
from moto import mock_aws

from services.cli import main
from services.common.params import DEFAULT_PARAMS_PATH, default_params

NAME = "/ops-pipeline/trading-params"



@pytest.fixture
def ssm(monkeypatch):
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_SSM", "AWS_PROFILE", "AWS_REGION",
                "OPS_PARAMS_SSM_NAME", "OPS_PARAMS_SOURCE", "OPS_PARAMS_FILE", "OPS_LIVE_TRADING"):
        monkeypatch.delenv(var, raising=False)
    with mock_aws():
        yield boto3.client("ssm", region_name="us-east-1")


def base_doc() -> dict:
    return json.loads(DEFAULT_PARAMS_PATH.read_text())


def write(tmp_path, name: str, content) -> str:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content, indent=2))
    return str(path)


def doc_with(section: str, field: str, value) -> dict:
    doc = base_doc()
    doc[section][field] = value
    return doc


def seed(ssm, doc=None) -> None:
    ssm.put_parameter(Name=NAME, Value=json.dumps(doc or base_doc()), Type="String")


def ssm_version(ssm) -> int:
    return ssm.get_parameter(Name=NAME)["Parameter"]["Version"]


BAD_FILES = [
    ("malformed_json", lambda: json.dumps(base_doc())[:-20], "<document>: "),
    ("yaml_text", lambda: "schema_version: 1\nrisk:\n  max_daily_loss: 300\n", "<document>: the params document must be JSON"),
    ("spread_above_one", lambda: doc_with("options", "max_option_spread", 1.5),
     "options.max_option_spread: Input should be less than or equal to 1"),
    ("negative_daily_loss", lambda: doc_with("risk", "max_daily_loss", -1),
     "risk.max_daily_loss: Input should be greater than 0"),
    ("unknown_top_level_key", lambda: {**base_doc(), "allow_everything": True},
     "allow_everything: Extra inputs are not permitted"),
    ("unknown_key_in_section", lambda: doc_with("risk", "max_dialy_loss", 5000),
     "risk.max_dialy_loss: Extra inputs are not permitted"),
]
BAD_IDS = [case[0] for case in BAD_FILES]


@pytest.mark.parametrize(("case", "make", "expected"), BAD_FILES, ids=BAD_IDS)
def test_validate_bad_file_prints_the_field_path_and_exits_1(tmp_path, capsys, case, make, expected):
    path = write(tmp_path, f"{case}.json", make())
    assert main(["params", "validate", path]) == 1
    out = capsys.readouterr().out
    assert f"{path}: invalid" in out
    assert f"  {expected}" in out


def test_validate_good_file_says_valid(capsys):
    assert main(["params", "validate", str(DEFAULT_PARAMS_PATH)]) == 0
    out = capsys.readouterr().out
    assert out.strip() == f"{DEFAULT_PARAMS_PATH}: valid (hash {default_params().content_hash()})"


def test_validate_missing_file_exits_1(tmp_path, capsys):
    assert main(["params", "validate", str(tmp_path / "nope.json")]) == 1
    assert "cannot read" in capsys.readouterr().out


@pytest.mark.parametrize(("case", "make", "expected"), BAD_FILES, ids=BAD_IDS)
def test_push_refuses_invalid_file_and_leaves_ssm_unchanged(ssm, tmp_path, capsys, case, make, expected):
    seed(ssm)
    path = write(tmp_path, f"{case}.json", make())
    assert main(["params", "push", path, "--yes"]) == 1
    out = capsys.readouterr().out
    assert f"  {expected}" in out
    assert f"refused: ssm:{NAME} unchanged" in out
    assert ssm_version(ssm) == 1
    assert json.loads(ssm.get_parameter(Name=NAME)["Parameter"]["Value"]) == base_doc()


def test_push_yes_of_good_file_creates_a_new_version(ssm, tmp_path, capsys):
    seed(ssm)
    doc = doc_with("risk", "max_daily_loss", 300)
    path = write(tmp_path, "good.json", doc)
    assert main(["params", "push", path, "--yes"]) == 0
    out = capsys.readouterr().out
    assert "  risk.max_daily_loss: 500 -> 300" in out
    assert f"pushed ssm:{NAME} version 2 hash " in out
    parameter = ssm.get_parameter(Name=NAME)["Parameter"]
    assert parameter["Version"] == 2 and parameter["Type"] == "String"
    assert json.loads(parameter["Value"]) == doc


def test_push_creates_a_missing_parameter(ssm, tmp_path, capsys):
    path = write(tmp_path, "good.json", base_doc())
    assert main(["params", "push", path, "--yes"]) == 0
    out = capsys.readouterr().out
    assert f"ssm:{NAME} does not exist" in out
    assert ssm_version(ssm) == 1


def test_push_asks_for_confirmation_and_no_leaves_ssm_unchanged(ssm, tmp_path, capsys, monkeypatch):
    seed(ssm)
    path = write(tmp_path, "good.json", doc_with("risk", "max_daily_loss", 300))
    monkeypatch.setattr("sys.stdin", io.StringIO("n\n"))
    assert main(["params", "push", path]) == 1
    assert f"aborted: ssm:{NAME} unchanged" in capsys.readouterr().out
    assert ssm_version(ssm) == 1

    monkeypatch.setattr("sys.stdin", io.StringIO("y\n"))
    assert main(["params", "push", path]) == 0
    assert ssm_version(ssm) == 2


def test_push_of_identical_document_does_not_create_a_version(ssm, tmp_path, capsys):
    seed(ssm)
    path = write(tmp_path, "same.json", base_doc())
    assert main(["params", "push", path, "--yes"]) == 0
    out = capsys.readouterr().out
    assert "no changes" in out and "nothing pushed" in out
    assert ssm_version(ssm) == 1


def test_diff_prints_field_changes(ssm, tmp_path, capsys):
    seed(ssm)
    doc = doc_with("risk", "max_daily_loss", 300)
    doc["options"]["max_option_spread"] = 0.05
    doc["instruments"]["allowed_instruments"] = ["OPTION"]
    doc["instruments"]["allow_stock_fallback"] = False
    path = write(tmp_path, "new.json", doc)
    assert main(["params", "diff", path]) == 0
    lines = [line.strip() for line in capsys.readouterr().out.splitlines()]
    assert lines[0] == f"ssm:{NAME} version 1 -> file:"
    assert lines[1:] == [
        "risk.max_daily_loss: 500 -> 300",
        "instruments.allowed_instruments: [OPTION, STOCK] -> [OPTION]",
        "instruments.allow_stock_fallback: true -> false",
        "options.max_option_spread: 0.1 -> 0.05",
    ]
    assert ssm_version(ssm) == 1


def test_diff_of_same_limits_spelled_differently_shows_no_changes(ssm, tmp_path, capsys):
    seed(ssm)
    text = json.dumps(base_doc()).replace('"max_daily_loss": 500', '"max_daily_loss": 500.00')
    path = write(tmp_path, "spelled.json", text)
    assert main(["params", "diff", path]) == 0
    assert "no changes" in capsys.readouterr().out


def test_diff_refuses_invalid_file(ssm, tmp_path, capsys):
    seed(ssm)
    path = write(tmp_path, "bad.json", doc_with("options", "max_option_spread", 1.5))
    assert main(["params", "diff", path]) == 1
    assert "options.max_option_spread: Input should be less than or equal to 1" in capsys.readouterr().out


def test_history_lists_versions_with_dates(ssm, tmp_path, capsys):
    seed(ssm)
    main(["params", "push", write(tmp_path, "v2.json", doc_with("risk", "max_daily_loss", 300)), "--yes"])
    ssm.put_parameter(Name=NAME, Value="not json", Type="String", Overwrite=True)
    capsys.readouterr()
    assert main(["params", "history"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"ssm:{NAME}: 3 version(s)"
    rows = [line.split() for line in out[2:]]
    assert [r[0] for r in rows] == ["1", "2", "3"]
    for r in rows:
        assert len(r[1]) == 10 and r[1][4] == "-" and r[2].count(":") == 2  # date and time
    assert "valid" in out[2] and "INVALID" in out[4] and out[4].endswith("(current)")


def test_history_of_missing_parameter_exits_1(ssm, capsys):
    assert main(["params", "history"]) == 1
    assert "no such parameter" in capsys.readouterr().out


def test_show_file_source_prints_source_version_hash_and_document(ssm, capsys):
    assert main(["params", "show", "--source", "file"]) == 0
    out = capsys.readouterr().out
    assert f"source:   file:{DEFAULT_PARAMS_PATH}" in out
    assert "version:  file" in out
    assert f"hash:     {default_params().content_hash()}" in out
    document = json.loads(out[out.index("{"):])
    assert document["risk"]["max_daily_loss"] == 500
    assert document["options"]["max_option_spread"] == 0.1


def test_show_ssm_source_prints_the_ssm_version(ssm, capsys):
    seed(ssm, doc_with("risk", "max_daily_loss", 275))
    assert main(["params", "show", "--source", "ssm"]) == 0
    out = capsys.readouterr().out
    assert f"source:   ssm:{NAME}" in out and "version:  1" in out
    assert json.loads(out[out.index("{"):])["risk"]["max_daily_loss"] == 275


def test_show_ssm_missing_says_it_uses_the_reviewed_defaults(ssm, capsys):
    assert main(["params", "show", "--source", "ssm"]) == 0
    out = capsys.readouterr().out
    assert f"source:   file:{DEFAULT_PARAMS_PATH}" in out
    assert "WARNING:" in out and "using the reviewed defaults" in out
    assert "ParameterNotFound" in out


def test_name_option_targets_another_parameter(ssm, tmp_path, capsys):
    path = write(tmp_path, "good.json", base_doc())
    assert main(["params", "push", path, "--yes", "--name", "/other/params"]) == 0
    assert ssm.get_parameter(Name="/other/params")["Parameter"]["Version"] == 1
    with pytest.raises(ssm.exceptions.ParameterNotFound):
        ssm.get_parameter(Name=NAME)


def test_aws_endpoint_url_is_honoured(monkeypatch, capsys):
    # Where a moto server (or any SSM endpoint) would be reached; nothing listens on port 9.
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.delenv("AWS_ENDPOINT_URL_SSM", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    assert main(["params", "history"]) == 2
    assert 'Could not connect to the endpoint URL: "http://127.0.0.1:9/"' in capsys.readouterr().err

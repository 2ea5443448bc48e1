"""`ops-pipeline params ...`: how operators read, check and change the trading params in SSM.

    show [--source file|ssm]   the document in force and where it came from
    validate FILE              every error with its field path; exit 1 on any
    diff FILE                  field-by-field changes against SSM
    push FILE [--yes]          validate, show the diff, confirm, PutParameter
    history                    SSM versions with their dates
    whatif FILE [--since 10d]  the recorded decisions made again with FILE: what flips

A document is validated by the same model the services use before anything reaches SSM, so a
push can never install a document the dispatcher would refuse. The SSM client honours
AWS_ENDPOINT_URL and the region variables, so a moto server can stand in for SSM.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

from services.common.params import ParamsError, TradingParams, parse_params
from services.adapters.params_source import FileParamsProvider, SsmParamsProvider, make_ssm_client
from services.common.settings import load_settings

SSM_STANDARD_MAX_BYTES = 4096
ABSENT = "(absent)"


def register(subparsers: argparse._SubParsersAction) -> None:
    settings_defaults = argparse.ArgumentParser(add_help=False)
    settings_defaults.add_argument("--name", help="SSM parameter name (default: OPS_PARAMS_SSM_NAME)")
    settings_defaults.add_argument("--region", help="AWS region (default: AWS_REGION / AWS_DEFAULT_REGION)")

    params = subparsers.add_parser("params", help="show, validate, diff, push the trading params (SSM)")
    sub = params.add_subparsers(dest="params_command", required=True)

    show = sub.add_parser("show", parents=[settings_defaults], help="the document in force and its source")
    show.add_argument("--source", choices=["file", "ssm"], help="default: OPS_PARAMS_SOURCE")
    show.add_argument("--file", type=Path, help="params file (default: OPS_PARAMS_FILE)")
    show.set_defaults(handler=cmd_show)

    validate = sub.add_parser("validate", help="validate a params file; exit 1 on any error")
    validate.add_argument("file", type=Path)
    validate.set_defaults(handler=cmd_validate)

    diff = sub.add_parser("diff", parents=[settings_defaults], help="what a push of FILE would change in SSM")
    diff.add_argument("file", type=Path)
    diff.set_defaults(handler=cmd_diff)

    push = sub.add_parser("push", parents=[settings_defaults], help="validate FILE and write it to SSM")
    push.add_argument("file", type=Path)
    push.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    push.set_defaults(handler=cmd_push)

    history = sub.add_parser("history", parents=[settings_defaults], help="SSM versions with their dates")
    history.set_defaults(handler=cmd_history)

    whatif = sub.add_parser("whatif", help="the recorded decisions made again with FILE: what would flip")
    whatif.add_argument("file", type=Path)
    whatif.add_argument("--since", default="10d", help="how far back: 10d, 36h, or an ET date YYYY-MM-DD (default 10d)")
    whatif.add_argument("--account", help="account id (default $ACCOUNT_ID or paper-main)")
    whatif.add_argument("--json", action="store_true", help="print the result as JSON")
    whatif.set_defaults(handler=cmd_whatif)


# -- handlers ---------------------------------------------------------------------------------


def cmd_show(args: argparse.Namespace) -> int:
    settings = load_settings()
    source = args.source or settings.ops_params_source
    path = args.file or settings.ops_params_file
    try:
        if source == "ssm":
            provider: FileParamsProvider | SsmParamsProvider = SsmParamsProvider(
                _name(args, settings), ssm_client=_client(args, settings), fallback_path=path, reload_seconds=None
            )
        else:
            provider = FileParamsProvider(path)
    except ParamsError as e:
        _print_errors(str(e).splitlines()[0], e.errors)
        return 1
    except OSError as e:
        print(f"error: {path}: {e.strerror or e}", file=sys.stderr)
        return 1
    status = provider.status()
    in_force = provider.current()
    print(f"source:   {in_force.source}")
    print(f"version:  {in_force.version}")
    print(f"hash:     {in_force.content_hash}")
    if status["using_fallback"]:
        print(f"WARNING:  {status['note']}")
    if status["last_error"]:
        print(f"error:    {status['last_error']}")
    print(render_document(in_force.params))
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    try:
        params = _read_valid(args.file)
    except _Refused as e:
        _print_errors(e.headline, e.errors)
        return 1
    print(f"{args.file}: valid (hash {params.content_hash()})")
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    from botocore.exceptions import BotoCoreError, ClientError

    settings = load_settings()
    try:
        params = _read_valid(args.file)
    except _Refused as e:
        _print_errors(e.headline, e.errors)
        return 1
    name = _name(args, settings)
    try:
        current = _get_current(_client(args, settings), name)
    except (BotoCoreError, ClientError) as e:
        return _aws_failed(name, e)
    _print_diff(name, current, params)
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from botocore.exceptions import BotoCoreError, ClientError

    settings = load_settings()
    name = _name(args, settings)
    try:
        params = _read_valid(args.file)
    except _Refused as e:
        _print_errors(e.headline, e.errors)
        print(f"refused: ssm:{name} unchanged")
        return 1
    value = _ssm_value(args.file.read_text())
    if len(value.encode()) > SSM_STANDARD_MAX_BYTES:
        print(f"refused: document is {len(value.encode())} bytes; a standard SSM parameter holds {SSM_STANDARD_MAX_BYTES}")
        return 1
    client = _client(args, settings)
    try:
        current = _get_current(client, name)
        changes = _print_diff(name, current, params)
        if current is not None and not changes:
            print("nothing pushed")
            return 0
        if not args.yes and not _confirm(f"push {args.file} to ssm:{name}? [y/N] "):
            print(f"aborted: ssm:{name} unchanged")
            return 1
        # Someone else may have pushed while we asked: never overwrite a version not shown.
        seen, latest = _version(current), _version(_get_current(client, name))
        if latest != seen:
            print(f"refused: ssm:{name} changed while confirming (version {seen} -> {latest}); run diff again")
            return 1
        response = client.put_parameter(Name=name, Value=value, Type="String", Overwrite=True)
    except (BotoCoreError, ClientError) as e:
        return _aws_failed(name, e)
    print(f"pushed ssm:{name} version {response['Version']} hash {params.content_hash()}")
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    from botocore.exceptions import BotoCoreError, ClientError

    settings = load_settings()
    name = _name(args, settings)
    client = _client(args, settings)
    rows = []
    try:
        for page in client.get_paginator("get_parameter_history").paginate(Name=name, WithDecryption=True):
            rows.extend(page.get("Parameters", []))
    except ClientError as e:
        if e.response.get("Error", {}).get("Code") == "ParameterNotFound":
            print(f"ssm:{name}: no such parameter")
            return 1
        return _aws_failed(name, e)
    except BotoCoreError as e:
        return _aws_failed(name, e)
    rows.sort(key=lambda r: int(r["Version"]))
    print(f"ssm:{name}: {len(rows)} version(s)")
    print(f"{'VERSION':>7}  {'LAST MODIFIED (UTC)':<25}  {'BY':<20}  DOCUMENT")
    for i, row in enumerate(rows):
        when = row.get("LastModifiedDate")
        when_text = when.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S") if when else "?"
        who = (row.get("LastModifiedUser") or "?").rsplit("/", 1)[-1]
        marker = "  (current)" if i == len(rows) - 1 else ""
        print(f"{row['Version']:>7}  {when_text:<25}  {who:<20}  {_describe_value(row.get('Value', ''))}{marker}")
    return 0


# -- helpers ----------------------------------------------------------------------------------


class _Refused(Exception):
    def __init__(self, headline: str, errors: list[str]):
        super().__init__(headline)
        self.headline = headline
        self.errors = errors


def _read_valid(path: Path) -> TradingParams:
    try:
        text = path.read_text()
    except OSError as e:
        raise _Refused(f"{path}: cannot read", [f"<file>: {e.strerror or e}"]) from e
    try:
        return parse_params(text, origin=str(path))
    except ParamsError as e:
        errors = list(e.errors)
        if errors and errors[0].startswith("<document>: Expecting value") and ":" in text.split("\n", 1)[0]:
            errors.append("<document>: the params document must be JSON (YAML is not accepted)")
        raise _Refused(f"{path}: invalid ({len(e.errors)} error(s))", errors) from e


def _aws_failed(name: str, error: Exception) -> int:
    """One line on stderr, exit 2: a missing region or credentials said as such, else SSM's answer."""
    from services.cli.config_errors import aws_error_line

    print(aws_error_line(error) or f"error: ssm:{name}: {error}", file=sys.stderr)
    return 2


def _print_errors(headline: str, errors: list[str]) -> None:
    print(headline)
    for line in errors:
        print(f"  {line}")


def _name(args: argparse.Namespace, settings: Any) -> str:
    return args.name or settings.ops_params_ssm_name


def _client(args: argparse.Namespace, settings: Any) -> Any:
    endpoint = os.environ.get("AWS_ENDPOINT_URL_SSM") or os.environ.get("AWS_ENDPOINT_URL") or None
    return make_ssm_client(args.region or settings.aws_region, endpoint_url=endpoint)


def _confirm(prompt: str) -> bool:
    try:
        answer = input(prompt)
    except (EOFError, OSError):
        return False
    return answer.strip().lower() in {"y", "yes"}


def _ssm_value(text: str) -> str:
    """The file as written, or compacted when the indentation alone would exceed the SSM limit."""
    text = text.strip()
    if len(text.encode()) <= SSM_STANDARD_MAX_BYTES:
        return text
    return json.dumps(json.loads(text), separators=(",", ":"))


def _get_current(client: Any, name: str) -> dict[str, Any] | None:
    """The parameter's version and value, or None when it does not exist yet."""
    from botocore.exceptions import ClientError

    try:
        parameter = client.get_parameter(Name=name, WithDecryption=True)["Parameter"]
    except ClientError as e:
        if e.response.get("Error", {}).get("Code") == "ParameterNotFound":
            return None
        raise
    return {"version": str(parameter["Version"]), "value": parameter["Value"]}


def _version(current: dict[str, Any] | None) -> str | None:
    return current["version"] if current else None


def _describe_value(text: str) -> str:
    try:
        params = parse_params(text)
    except ParamsError as e:
        return f"INVALID ({len(e.errors)} error(s)): {e.errors[0] if e.errors else ''}"
    return f"valid hash={params.content_hash()[:12]} live_trading_enabled={str(params.live_trading_enabled).lower()}"


def _print_diff(name: str, current: dict[str, Any] | None, new: TradingParams) -> list[str]:
    """Print the field changes from the SSM document to `new`; return them."""
    new_fields = flatten(new.model_dump())
    if current is None:
        print(f"ssm:{name} does not exist; a push creates it with {len(new_fields)} fields")
        old_fields: dict[str, Any] = {}
    else:
        try:
            old_fields = flatten(parse_params(current["value"]).model_dump())
            print(f"ssm:{name} version {current['version']} -> file:")
        except ParamsError as e:
            print(f"ssm:{name} version {current['version']} is itself invalid ({'; '.join(e.errors)}); comparing its raw fields")
            try:
                raw = json.loads(current["value"], parse_float=Decimal)
            except json.JSONDecodeError:
                raw = None
            old_fields = flatten(raw) if isinstance(raw, dict) else {}
    changes = diff_fields(old_fields, new_fields)
    for line in changes:
        print(f"  {line}")
    if not changes:
        print("  no changes")
    return changes


def flatten(document: Any, prefix: str = "") -> dict[str, Any]:
    """Nested sections to dotted field paths: {"risk": {"max_daily_loss": 500}} -> risk.max_daily_loss."""
    if not isinstance(document, dict):
        return {prefix: document}
    out: dict[str, Any] = {}
    for key, value in document.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            out.update(flatten(value, path))
        else:
            out[path] = value
    return out


def diff_fields(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """`path: old -> new` for every field whose value differs, in document order."""
    lines = []
    for path in list(old) + [p for p in new if p not in old]:
        before = format_value(old[path]) if path in old else ABSENT
        after = format_value(new[path]) if path in new else ABSENT
        if before != after:
            lines.append(f"{path}: {before} -> {after}")
    return lines


def format_value(value: Any) -> str:
    """One spelling per value, so 500, 500.0 and Decimal("500.00") compare equal."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Decimal):
        return format(value.normalize(), "f")
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return json.dumps(value, default=str, sort_keys=True)
    return str(value)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def render_document(params: TradingParams) -> str:
    return json.dumps(_jsonable(params.model_dump()), indent=2)


WHATIF_HORIZONS = (5, 15, 60)


def _since(text: str, now: Any) -> Any:
    """--since: a duration back from now (10d, 36h, 90m) or an ET date (its start)."""
    from datetime import date, timedelta

    from services.common.market_calendar import et_day_bounds

    try:
        return et_day_bounds(date.fromisoformat(text))[0]
    except ValueError:
        pass
    unit = {"d": "days", "h": "hours", "m": "minutes"}.get(text[-1:])
    try:
        amount = float(text[:-1])
    except ValueError:
        amount = -1
    if unit is None or amount <= 0:
        raise SystemExit(f"--since must be a duration (10d, 36h, 90m) or a date (YYYY-MM-DD), got {text!r}")
    return now - timedelta(**{unit: amount})


def cmd_whatif(args: argparse.Namespace) -> int:
    """Every recorded decision (with its stored inputs) since --since, decided again with FILE."""
    from services.adapters.postgres.whatif_data import decisions_with_inputs
    from services.cli.admin import _account, _url
    from services.common.clock import SystemClock
    from services.common.db import connect
    from services.common.logs import json_default
    from services.common.market_calendar import ET, nyse_calendar
    from services.domain.whatif import whatif

    try:
        candidate = parse_params(args.file.read_text(), origin=str(args.file))
    except (OSError, ParamsError) as e:
        print(f"{args.file}: {e}", file=sys.stderr)
        return 1
    since = _since(args.since, SystemClock().now())
    account = _account(args)
    with connect(_url()) as conn:
        rows = decisions_with_inputs(conn, account, since, WHATIF_HORIZONS)
    result = whatif(rows, candidate, nyse_calendar(), WHATIF_HORIZONS)
    if args.json:
        doc = {**{k: v for k, v in result.items() if k != "flips"},
               "flips": [{"recommendation_id": f.recommendation_id, "ticker": f.ticker, "action": f.action,
                          "at": f.at, "before": f.label.split(" -> ")[0], "after": f.label.split(" -> ")[1],
                          "forward": f.forward} for f in result["flips"]]}
        print(json.dumps(doc, default=json_default, indent=2))
        return 0
    print(f"what-if of {args.file} against {result['decisions']} recorded decision(s) of {account} "
          f"since {since.astimezone(ET):%Y-%m-%d %H:%M} ET")
    print(f"  unchanged {result['unchanged']}, flipped {result['flipped']}")
    if result["undetermined"]:
        print(f"  of which {result['undetermined']} undetermined: option entries that a gate the candidate passes "
              "denied before their chain was fetched")
    for label, n in result["by_kind"].items():
        print(f"  {n:>5}  {label}")
    if result["flips"]:
        print("\nflipped decisions (forward move of the recommendation's direction from its bar):")
    for f in result["flips"]:
        moves = "  ".join(f"{h} {'n/a' if v is None else f'{v * 100:+.2f}%'}" for h, v in f.forward.items())
        print(f"  {f.at.astimezone(ET):%Y-%m-%d %H:%M} ET  {f.ticker:<6} {f.action:<4} {f.label:<40} {moves}")
    print("\nEach decision is made again on the inputs it was made from, one at a time: a trade the candidate"
          "\ntakes or refuses would have changed what later decisions saw (positions, exposure, cooldowns),"
          "\nand later decisions could differ. `ops-pipeline replay ... --params A.json --compare B.json` re-runs"
          "\nthe whole path.")
    return 0

"""`ops-pipeline`: the command line of the services and of the operators."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from services.common.logs import configure_logging
from services.common.migrate import MigrationError

# Subcommand groups, each registered by its own module: (module, function). Imported when the
# parser is built, so `import services.cli` stays cheap.
_REGISTRARS = [
    ("services.cli.admin", "register"),                      # migrate, halt, resume, flatten, status
    ("services.cli.loops", "register_dispatcher"),           # dispatcher
    ("services.cli.loops", "register_demo"),                 # demo
    ("services.cli.loops", "register_replay"),               # replay
    ("services.cli.params", "register"),                     # params show/validate/diff/push/history
    ("services.cli.loops", "register_signal_engine"),        # signal-engine
    ("services.cli.loops", "register_feature_computer"),     # feature-computer
    ("services.cli.loops", "register_watchlist_engine"),     # watchlist-engine
    ("services.cli.loops", "register_position_manager"),     # position-manager
    ("services.cli.loops", "register_ingest"),               # load-csv, telemetry
    ("services.cli.loops", "register_news"),                 # news
    ("services.cli.loops", "register_watchdog"),             # watchdog
    ("services.cli.alerts", "register"),                     # alerts test
    ("services.cli.report", "register"),                     # report
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ops-pipeline", description=__doc__)
    parser.add_argument("--log-level", default=os.environ.get("LOG_LEVEL"),
                        help="default: LOG_LEVEL, else INFO for services and WARNING for operator commands")
    sub = parser.add_subparsers(dest="command", required=True)
    for module_name, func in _REGISTRARS:
        getattr(importlib.import_module(module_name), func)(sub)
    return parser


# The long-running services log their decisions; every other command is an operator's, whose
# output is its answer on stdout, with only warnings and errors on stderr.
SERVICES = {"dispatcher", "signal-engine", "feature-computer", "watchlist-engine", "telemetry", "position-manager",
            "demo", "load-csv"}


def main(argv: list[str] | None = None) -> int:
    from botocore.exceptions import BotoCoreError
    from pydantic import ValidationError

    from services.adapters.health import HealthConfigError
    from services.cli.config_errors import aws_error_line, settings_error_lines

    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level or ("INFO" if args.command in SERVICES else "WARNING"))
    try:
        return int(args.handler(args) or 0)
    except ValidationError as e:
        lines = settings_error_lines(e)
        if lines is None:
            raise
        for line in lines:
            print(f"error: {line}", file=sys.stderr)
        return 2
    except HealthConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BotoCoreError as e:
        line = aws_error_line(e)
        if line is None:
            raise
        print(line, file=sys.stderr)
        return 2
    except MigrationError as e:
        # A service cannot start on a schema it could not check: say why in one line, exit 1.
        logging.getLogger("ops-pipeline").error("start-up failed: the database is not ready", extra={
            "command": args.command, "reason": type(e).__name__, "error": str(e)})
        return 1


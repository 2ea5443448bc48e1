"""`ops-pipeline`: the command line of the services and of the operators."""

from __future__ import annotations

import argparse
import importlib
import logging
import os

from services.common.logs import configure_logging
from services.common.migrate import MigrationError

# Subcommand groups, each registered by its own module: (module, function). Imported when the
# parser is built, so `import services.cli` stays cheap.
_REGISTRARS = [
    ("services.cli.admin", "register"),                      # migrate, halt, resume, flatten, status
    ("services.cli.loops", "register_dispatcher"),           # dispatcher
    ("services.cli.loops", "register_demo"),                 # demo
    ("services.cli.params", "register"),                     # params show/validate/diff/push/history
    ("services.cli.loops", "register_signal_engine"),        # signal-engine
    ("services.cli.loops", "register_feature_computer"),     # feature-computer
    ("services.cli.loops", "register_watchlist_engine"),     # watchlist-engine
    ("services.cli.loops", "register_position_manager"),     # position-manager
    ("services.cli.loops", "register_ingest"),               # load-csv, telemetry
    ("services.cli.loops", "register_news"),                 # news
    ("services.cli.report", "register"),                     # report
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ops-pipeline", description=__doc__)
    parser.add_argument("--log-level", default=os.environ.get("LOG_LEVEL", "INFO"))
    sub = parser.add_subparsers(dest="command", required=True)
    for module_name, func in _REGISTRARS:
        getattr(importlib.import_module(module_name), func)(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    try:
        return int(args.handler(args) or 0)
    except MigrationError as e:
        # A service cannot start on a schema it could not check: say why in one line, exit 1.
        logging.getLogger("ops-pipeline").error("start-up failed: the database is not ready", extra={
            "command": args.command, "reason": type(e).__name__, "error": str(e)})
        return 1


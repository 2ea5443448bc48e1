"""`ops-pipeline`: the command line of the services and of the operators."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from services.common.logs import configure_logging
from services.common.migrate import MigrationError

# Subcommand groups, each registered by its own module: (module, function).
_REGISTRARS = [
    ("services.common.admin_cli", "register"),       # migrate, halt, resume, status
    ("services.dispatcher.main", "register"),        # dispatcher
    ("services.demo", "register"),                   # demo
    ("services.common.params_cli", "register"),      # params show/validate/diff/push/history
    ("services.signal_engine.main", "register"),     # signal-engine
    ("services.feature_computer.main", "register"),  # feature-computer
    ("services.watchlist_engine.main", "register"),  # watchlist-engine
    ("services.ingest", "register"),                 # load-csv, telemetry
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


if __name__ == "__main__":
    sys.exit(main())

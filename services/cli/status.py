"""`ops-pipeline status [--json] [--watch [--interval S] [--count N]]`: the operator's first question.

The table (or the JSON document) goes to stdout and nothing else does: logs go to stderr, and
operator commands log only warnings unless --log-level says otherwise, so
`ops-pipeline status --json | jq .kill_switch.state` works.

The JSON document (one per refresh with --watch, one per line):

    {
      "account_id": "paper-main",
      "as_of": "2026-11-30T15:00:00+00:00",          # when the report was read (UTC)
      "kill_switch": {"state": "ACTIVE" | "REDUCING" | "HALTED", "reason": str,
                      "changed_by": str | null, "changed_at": str | null, "tripped_session": str | null},
      "account": null | {"equity": number, "last_equity": number, "daily_pnl": number, "as_of": str},
      "exposure": number,                              # notional of open positions (options x 100)
      "positions": [{"ticker", "instrument", "symbol", "side", "qty", "avg_price", "market_price",
                     "multiplier", "status", "notional"}],
      "closed_today": [{"ticker", "instrument", "symbol", "side", "qty", "avg_price", "close_price",
                        "exit_reason", "fees", "realized_pnl", "opened_at", "closed_at"}],   # today, ET
      "realized_today": number,                        # their realized P&L, net of fees
      "decisions_by_status": {"EXECUTED": int, "SKIPPED": int, ...},   # today, ET
      "blocked_by": {"<outcome code>": int, ...},                        # today, ET
      "params": {"source": str, "version": str, "hash": str, "last_error": str | null, ...},
      "params_in_force": [{"configured_source": str, "source": str, "version": str, "since": str,
                           "using_fallback": bool, "note": str | null}],   # what each service reported
      "data": {"session_open": bool, "max_bar_age_seconds": int,
               "stale_tickers": [{"ticker": str, "last_bar_ts": str | null}]}
    }

Money is a JSON number, times are ISO 8601 with their offset. `stale_tickers` lists watched
tickers whose newest bar is older than max_bar_age_seconds, and only while the session is open.
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Callable
from datetime import datetime
from typing import Any, TextIO

from services.common.logs import json_default

DEFAULT_MAX_BAR_AGE_SECONDS = 180
CLEAR_SCREEN = "\x1b[H\x1b[2J"


def register(subparsers) -> None:
    from services.cli.admin import DEFAULT_ACCOUNT

    p = subparsers.add_parser("status", help="kill switch, P&L, exposure, positions, today's decisions, stale data")
    p.add_argument("--account", help=f"account id (default $ACCOUNT_ID or {DEFAULT_ACCOUNT})")
    p.add_argument("--json", action="store_true", help="print the report as one JSON document (shape: see --help of the module)")
    p.add_argument("--watch", action="store_true", help="refresh until Ctrl-C")
    p.add_argument("--interval", type=_positive, default=5.0, help="seconds between refreshes with --watch (default 5)")
    p.add_argument("--count", type=int, help="with --watch: stop after this many refreshes")
    p.set_defaults(handler=cmd_status)


def _positive(text: str) -> float:
    import argparse

    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def cmd_status(args) -> int:
    from services.cli.admin import _account, _url
    from services.dispatcher.main import params_provider

    url = _url()
    provider = params_provider(url)
    account = _account(args)

    def render() -> str:
        document = status_document(url, account, provider)
        if args.json:
            return json.dumps(document, default=json_default)
        return format_document(document)

    if not args.watch:
        print(render())
        return 0
    clear = "" if args.json or not sys.stdout.isatty() else CLEAR_SCREEN
    try:
        watch(render, args.interval, sys.stdout, count=args.count, clear=clear)
    except KeyboardInterrupt:
        pass
    return 0


def status_document(url: str, account_id: str, provider: Any, now: datetime | None = None,
                    calendar: Any = None) -> dict[str, Any]:
    """The report, the params in force and the stale watched tickers, as one JSON-ready document."""
    from services.adapters.postgres.freshness import stale_watched_tickers
    from services.adapters.postgres.status import status_report
    from services.common.clock import SystemClock
    from services.common.db import connect
    from services.common.market_calendar import nyse_calendar

    now = now or SystemClock().now()
    params_status = dict(provider.status())
    try:
        max_age = int(provider.current().params.risk.max_bar_age_seconds)
    except Exception as e:  # the report still shows what it can; params_status names the problem
        params_status.setdefault("last_error", f"{type(e).__name__}: {e}")
        max_age = DEFAULT_MAX_BAR_AGE_SECONDS
    session_open = (calendar or nyse_calendar()).is_open(now)
    with connect(url) as conn:
        report = status_report(conn, account_id, now)
        stale = stale_watched_tickers(conn, now, max_age, account_id=account_id) if session_open else []
    return {
        "account_id": report["account_id"],
        "as_of": now,
        "kill_switch": {key: report["kill_switch"].get(key) for key in
                        ("state", "reason", "changed_by", "changed_at", "tripped_session")},
        "account": report["account"],
        "exposure": report["exposure"],
        "positions": report["positions"],
        "closed_today": report["closed_today"],
        "realized_today": report["realized_today"],
        "decisions_by_status": report["decisions_by_status"],
        "blocked_by": report["blocked_by"],
        "params": params_status,
        "params_in_force": report.get("params_in_force", []),
        "data": {"session_open": session_open, "max_bar_age_seconds": max_age,
                 "stale_tickers": [{"ticker": t, "last_bar_ts": ts} for t, ts in stale]},
    }


def format_document(document: dict[str, Any]) -> str:
    from services.cli.admin import format_status

    text = format_status(document, document["params"])
    data = document["data"]
    if not data["session_open"]:
        line = "data          market closed"
    elif not data["stale_tickers"]:
        line = f"data          fresh (every watched ticker within {data['max_bar_age_seconds']}s)"
    else:
        shown = ", ".join(f"{s['ticker']} ({_last_bar(s['last_bar_ts'])})" for s in data["stale_tickers"])
        line = f"data          STALE beyond {data['max_bar_age_seconds']}s: {shown}"
    return f"{text}\n{line}"


def _last_bar(ts: datetime | None) -> str:
    return "no bar" if ts is None else f"last bar {ts:%Y-%m-%d %H:%M:%S%z}"


def watch(render: Callable[[], str], interval: float, out: TextIO, *, count: int | None = None, clear: str = "",
          stop: threading.Event | None = None) -> int:
    """Print `render()` every `interval` seconds until `count` refreshes, `stop`, or Ctrl-C. Returns the refreshes."""
    stop = stop or threading.Event()
    done = 0
    while not stop.is_set():
        out.write(clear + render() + "\n")
        out.flush()
        done += 1
        if count is not None and done >= count:
            break
        stop.wait(interval)
    return done

"""`ops-pipeline report`: P&L, execution, signal and gate quality over the recorded history."""

from __future__ import annotations

import json
import sys
from datetime import date, timedelta

from services.cli.admin import _account, _url
from services.common.clock import SystemClock
from services.common.market_calendar import et_date

DEFAULT_DAYS = 7


def period(args, today: date) -> tuple[date, date]:
    """--from / --to as ET days, both included; by default the week ending today."""
    end = date.fromisoformat(args.to) if args.to else today
    start = date.fromisoformat(args.from_) if args.from_ else end - timedelta(days=DEFAULT_DAYS - 1)
    return start, end


def cmd_report(args) -> int:
    from services.adapters.postgres.report_data import gather_report_inputs
    from services.adapters.report_render import render_text, write_html
    from services.common.db import connect
    from services.common.market_calendar import et_day_bounds
    from services.domain.report import build_report

    url, account, source = None, _account(args), "live"
    today = et_date(SystemClock().now())
    if args.run:
        from services.replay import REPLAY_ACCOUNT, find_run

        url, run = find_run(args.run)
        account, source = REPLAY_ACCOUNT, f"replay {run['run_id']}"
        sessions = run["inputs"]["sessions"]
        args.from_, args.to = args.from_ or sessions[0], args.to or sessions[-1]
    start, end = period(args, today)
    if end < start:
        print(f"report: --to {end} is before --from {start}", file=sys.stderr)
        return 2
    with connect(url or _url()) as conn:
        inputs = gather_report_inputs(conn, account, start, end, source=source)
    report = build_report(inputs, period_end=et_day_bounds(end)[1])
    if args.out:
        write_html(report, args.out)
    if args.json:
        json.dump(report.as_json(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(render_text(report))
        if args.out:
            print(f"\nHTML report written to {args.out}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("report", help="P&L, execution, signal and gate quality over a period")
    p.add_argument("--account", help="account id (default $ACCOUNT_ID or paper-main)")
    p.add_argument("--run", metavar="ID|latest", help="the report of a replay run (its own database) instead of the live history")
    p.add_argument("--from", dest="from_", metavar="YYYY-MM-DD", help="first ET day (default: 6 days before --to)")
    p.add_argument("--to", metavar="YYYY-MM-DD", help="last ET day, included (default: today, ET)")
    p.add_argument("--out", metavar="FILE.html", help="also write a self-contained HTML report with plots")
    p.add_argument("--json", action="store_true", help="print the report as JSON (see README: Report)")
    p.set_defaults(handler=cmd_report)

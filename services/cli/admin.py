"""Operator commands: migrate, halt, resume, flatten, status."""

from __future__ import annotations

import getpass
import os
import sys
from typing import Any

from services.common.clock import SystemClock

DEFAULT_ACCOUNT = "paper-main"


def _account(args) -> str:
    return args.account or os.environ.get("ACCOUNT_ID", DEFAULT_ACCOUNT)


def _url() -> str:
    from services.common.db import database_url
    from services.common.migrate import migrate

    url = database_url()
    migrate(url)
    return url


def cmd_migrate(args) -> int:
    from services.common.db import database_url
    from services.common.migrate import MigrationError, migrate

    try:
        applied = migrate(database_url())
    except MigrationError as e:
        print(f"migration failed: {e}", file=sys.stderr)
        return 1
    print(f"applied {len(applied)} migration(s)" + (": " + ", ".join(applied) if applied else ""))
    return 0


def _actor(args) -> str:
    return args.by or f"operator:{getpass.getuser()}"


def _set(args, state: str, reason: str, flatten: bool = False) -> int:
    from services.common.db import connect
    from services.adapters.postgres.kill_switch import set_state

    actor = _actor(args)
    with connect(_url()) as conn, conn.transaction():
        exits = set_state(conn, _account(args), state, reason, actor, SystemClock().now(), flatten=flatten)
    print(f"{_account(args)}: {state} ({reason}) by {actor}")
    _print_exits(exits)
    return 0


def _print_exits(exits: list[dict]) -> None:
    for e in exits:
        print(f"  exit {e['id']}: {e['ticker']} position {e['position_id']} ({e['exit_reason']})")
    if exits:
        print(f"{len(exits)} exit(s) queued for the dispatcher")


def cmd_halt(args) -> int:
    return _set(args, "HALTED", args.reason, flatten=args.flatten)


def cmd_flatten(args) -> int:
    """Close every open position (or one ticker's) without halting: entries go on unless halted."""
    from services.common.db import connect
    from services.adapters.postgres import exits_repo

    from services.common.market_calendar import CalendarUnavailable, nyse_calendar

    reason = args.reason or "operator flatten"
    now = SystemClock().now()
    try:
        market_open = nyse_calendar().is_open(now)
    except CalendarUnavailable:
        market_open = False
    if not market_open:
        # Exits written now would be refused by the market-closed gate, and nothing writes them
        # again at the open: say so rather than report exits that will not go out.
        print(f"{_account(args)}: the market is closed: no exit would go out now. Run flatten during the "
              "session, or `halt --flatten`, which flattens at the open.", file=sys.stderr)
        return 1
    with connect(_url()) as conn, conn.transaction():
        exits = exits_repo.flatten(conn, _account(args), exits_repo.OPERATOR_FLATTEN, reason, now,
                                   ticker=args.ticker.upper() if args.ticker else None, by=_actor(args))
    what = args.ticker.upper() if args.ticker else "every open position"
    if exits:
        from services.adapters import alerts

        alerts.emit(alerts.Event.FLATTEN, _account(args), reason=reason, positions=len(exits), by=_actor(args),
                    ticker=args.ticker.upper() if args.ticker else None)
    print(f"{_account(args)}: flatten {what} ({reason}) by {_actor(args)}")
    _print_exits(exits)
    if not exits:
        print("nothing to close: no OPEN position without an exit already working")
    return 0


def cmd_resume(args) -> int:
    return _set(args, "ACTIVE", args.reason or "resumed by operator")


def format_status(report: dict[str, Any], params_status: dict[str, Any] | None = None) -> str:
    ks = report["kill_switch"]
    lines = [f"account       {report['account_id']}",
             f"kill switch   {ks['state']}  ({ks.get('reason')}"
             + (f", by {ks['changed_by']} at {ks['changed_at']:%Y-%m-%d %H:%M:%S%z}" if ks.get("changed_by") else "") + ")"]
    acct = report["account"]
    if acct:
        lines.append(f"daily P&L     {acct['daily_pnl']:+,.2f}  (equity {acct['equity']:,.2f}, last_equity "
                     f"{acct['last_equity']:,.2f}, as of {acct['as_of']:%Y-%m-%d %H:%M:%S%z})")
    else:
        lines.append("daily P&L     unknown: no account state yet (entries are denied until there is one)")
    lines.append(f"exposure      {report['exposure']:,.2f} in {len(report['positions'])} position(s)")
    for p in report["positions"]:
        lines.append(f"  {p['ticker']:<6} {p['instrument']:<6} {p['symbol']:<22} {p['side']:<5} {p['qty']:>6} "
                     f"@ {p['avg_price']:.2f}  notional {p['notional']:,.2f}  {p['status']}")
    closed = report.get("closed_today", [])
    if closed:
        lines.append(f"closed today  {len(closed)} position(s), realized {report['realized_today']:+,.2f} (net of fees)")
    for c in closed:
        pnl = f"{c['realized_pnl']:+,.2f}" if c["realized_pnl"] is not None else "n/a"
        lines.append(f"  {c['ticker']:<6} {c['instrument']:<6} {c['symbol']:<22} {c['qty']:>6} @ {c['avg_price']:.2f}"
                     f" -> {c['close_price'] if c['close_price'] is not None else 'n/a'}  {c['exit_reason'] or '':<18} "
                     f"fees {c['fees']:.2f}  P&L {pnl}")
    statuses = ", ".join(f"{k} {v}" for k, v in report["decisions_by_status"].items()) or "none"
    lines.append(f"decisions     today (ET): {statuses}")
    for code, n in report["blocked_by"].items():
        lines.append(f"  blocked by {code:<28} {n}")
    if params_status:
        lines.append(f"params        {params_status.get('source')} version {params_status.get('version')} "
                     f"hash {str(params_status.get('hash'))[:12]}"
                     + (f"  LAST ERROR: {params_status['last_error']}" if params_status.get("last_error") else "")
                     + (f"  FALLBACK: {params_status['note']}" if params_status.get("using_fallback") else ""))
    for p in report.get("params_in_force", []):
        lines.append(f"  services on {p['configured_source']}: {p['source']} version {p['version']} since "
                     f"{p['since']:%Y-%m-%d %H:%M:%S%z}" + (f"  FALLBACK: {p['note']}" if p["using_fallback"] else ""))
    return "\n".join(lines)


def register(subparsers) -> None:
    p = subparsers.add_parser("migrate", help="apply pending database migrations")
    p.set_defaults(handler=cmd_migrate)

    for name, handler, help_text in [
        ("halt", cmd_halt, "halt the account: no order goes out until resume"),
        ("resume", cmd_resume, "return the account to ACTIVE"),
    ]:
        p = subparsers.add_parser(name, help=help_text)
        p.add_argument("--account", help="account id (default $ACCOUNT_ID or paper-main)")
        p.add_argument("--reason", required=(name == "halt"), help="why, recorded in the history")
        p.add_argument("--by", help="who (default operator:<user>)")
        if name == "halt":
            p.add_argument("--flatten", action="store_true",
                           help="also close every open position (the only orders a halted account lets out)")
        p.set_defaults(handler=handler)

    p = subparsers.add_parser("flatten", help="close every open position (or one ticker's) without halting")
    p.add_argument("--account", help="account id (default $ACCOUNT_ID or paper-main)")
    p.add_argument("--ticker", help="only this ticker's position")
    p.add_argument("--reason", help="why, recorded on each exit")
    p.add_argument("--by", help="who (default operator:<user>)")
    p.set_defaults(handler=cmd_flatten)

    from services.cli import status

    status.register(subparsers)

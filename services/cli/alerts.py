"""`ops-pipeline alerts test`: one alert of each event to the configured sinks, to prove the
path from this task to a person works before it is needed."""

from __future__ import annotations

import argparse
import sys

from services.adapters import alerts
from services.domain.alerts import Event

DELIVERY_TIMEOUT_SECONDS = 60.0


def register(subparsers) -> None:
    p = subparsers.add_parser("alerts", help="operator alerts (SNS, webhook)")
    sub = p.add_subparsers(dest="alerts_command", required=True)
    t = sub.add_parser("test", help="send one alert of each event to the configured sinks")
    t.add_argument("--subject", default="alerts-test", help="subject of the test alerts (default %(default)s)")
    t.set_defaults(handler=cmd_test)


def cmd_test(args: argparse.Namespace) -> int:
    """Exit 0 when every sink took every event, 1 when one failed, 2 when no sink is configured."""
    try:
        alerter = alerts.from_env()
    except ValueError as e:
        print(f"alerts: {e}", file=sys.stderr)
        return 2
    if not alerter.sinks:
        print("alerts: no sink configured (set OPS_ALERT_SNS_TOPIC_ARN and/or OPS_ALERT_WEBHOOK_URL); "
              "alerts are log lines only", file=sys.stderr)
        return 2
    for event in Event:
        alerter.emit(event, args.subject, test=True, note="sent by `ops-pipeline alerts test`")
    finished = alerter.flush(DELIVERY_TIMEOUT_SECONDS)
    stats = alerter.stats()
    alerter.close(timeout=0)
    for sink, s in stats.items():
        print(f"{sink:8} delivered={s['delivered']}/{len(Event)} failed={s['failed']} dropped={s['dropped']}")
    ok = finished and all(s["delivered"] == len(Event) for s in stats.values())
    return 0 if ok else 1

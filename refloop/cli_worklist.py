"""`refloop scan | worklist | alert | outbox`: the stall worklist without a daemon.

``refloop scan --as-of`` runs exactly the daemon's scan at a chosen instant, so a coordinator (or a test)
can ask "what would be overdue on that day" against the real database. It writes what a scheduled scan
would (alerts and outbox rows), because a scan is idempotent: the daemon's next run finds nothing new.
Output holds IDs, stages and owners only.
"""

from __future__ import annotations

import argparse
import json
import os
from datetime import datetime
from typing import Any

from refloop.cli_common import EXIT_FAIL, EXIT_OK, parse_time, with_config
from refloop.cli_common import engine_from as _engine
from refloop.cli_common import print_table as _table
from refloop.cli_common import settings_from as _settings
from refloop.clock import SystemClock

_COLUMNS = ("alert_id", "referral", "placer_id", "stage", "level", "level_name", "overdue_days", "owner", "status",
            "mode", "last_action")


def _time(value: str | None, flag: str) -> datetime | None:
    return parse_time(value, flag)


def cmd_scan(args: argparse.Namespace) -> int:
    from refloop.store import scan as stall_scan

    settings = _settings(args)
    now = _time(args.as_of, "--as-of") or SystemClock().now()
    with _engine(args) as engine:
        result = stall_scan.run_scan(engine, settings, now)
    if result is None:
        print(json.dumps({"skipped": True}) if args.json else "scan skipped: another daemon is scanning")
        return EXIT_OK
    if args.json:
        print(json.dumps(result.as_json(), indent=2))
        return EXIT_OK
    for name in ("raised", "escalated", "resolved"):
        rows: list[dict[str, Any]] = getattr(result, name)
        print(f"{name}: {len(rows)}")
        if rows:
            _table(rows, _COLUMNS)
    return EXIT_OK


def cmd_worklist(args: argparse.Namespace) -> int:
    from refloop.store import alerts

    settings = _settings(args)
    with _engine(args) as engine, engine.connect() as conn:
        rows = alerts.worklist(conn, settings, SystemClock().now(), owner=args.owner)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        _table(rows, (*_COLUMNS, "delivery"))
    return EXIT_OK


def cmd_alert(args: argparse.Namespace) -> int:
    from refloop.store import alerts

    settings = _settings(args)
    until = _time(args.until, "--until")
    try:
        with _engine(args) as engine, engine.begin() as conn:
            doc = alerts.act(conn, settings, args.alert_id, args.action, SystemClock().now(),
                             actor=args.actor or os.environ.get("USER", "cli"), note=args.note or "", until=until,
                             owner=args.owner or "", reason=args.reason or "")
    except alerts.ActionError as exc:
        print(f"refloop: {exc}")
        return EXIT_FAIL
    print(json.dumps(doc, indent=2))
    return EXIT_OK


def cmd_outbox(args: argparse.Namespace) -> int:
    from refloop.store import outbox

    with _engine(args) as engine:
        if args.outbox_command == "retry":
            if args.id is None:
                print("refloop: outbox retry needs an ID")
                return EXIT_FAIL
            with engine.begin() as conn:
                ok = outbox.retry(conn, args.id, SystemClock().now())
            print(f"outbox {args.id} re-queued" if ok else f"refloop: outbox {args.id} is not dead or failed")
            return EXIT_OK if ok else EXIT_FAIL
        with engine.connect() as conn:
            rows = outbox.listing(conn, status=args.status)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        _table(rows, ("id", "event", "channel", "status", "attempts", "referral_id", "alert_id", "next_attempt_at",
                      "last_error"))
    return EXIT_OK


def register(sub: argparse._SubParsersAction) -> None:
    """Add the worklist subcommands to `refloop` (called from cli.build_parser)."""


    sp = with_config(sub.add_parser("scan", help="run one stall scan now (or --as-of a given instant)"))
    sp.add_argument("--as-of", dest="as_of", metavar="ISO8601", help="scan as if it were this instant")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_scan)

    sp = with_config(sub.add_parser("worklist", help="open stall alerts, most overdue first"))
    sp.add_argument("--owner", help="only this owner's alerts")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_worklist)

    sp = with_config(sub.add_parser("alert", help="act on an alert: acknowledge, snooze, assign, note, close"))
    sp.add_argument("action", choices=["acknowledge", "snooze", "assign", "note", "close"])
    sp.add_argument("alert_id", metavar="ALERT_ID", type=int)
    sp.add_argument("--actor")
    sp.add_argument("--note")
    sp.add_argument("--until", help="snooze until this ISO 8601 date")
    sp.add_argument("--owner", help="assign to this owner")
    sp.add_argument("--reason", help="why the referral is closed by hand")
    sp.set_defaults(func=cmd_alert)

    sp = with_config(sub.add_parser("outbox", help="notifications and their delivery state; `outbox retry ID`"))
    sp.add_argument("outbox_command", nargs="?", choices=["list", "retry"], default="list")
    sp.add_argument("id", nargs="?", type=int)
    sp.add_argument("--status", choices=["pending", "delivered", "failed", "dead", "suppressed"])
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_outbox)

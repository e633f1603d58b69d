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
        rows = result.rows(name)
        print(f"{name}: {len(rows)}")
        if rows:
            _table(rows, _COLUMNS)
    return EXIT_OK


def cmd_worklist(args: argparse.Namespace) -> int:
    """The worklist with the page's filters (refloop.store.worklist_view): everyone unless --owner."""
    from refloop.config import ConfigError
    from refloop.store import worklist_view as wv

    settings = _settings(args)
    query = {name: str(getattr(args, name)) for name in _FILTERS if getattr(args, name, None)}
    query.setdefault("owner", "")
    try:
        view = wv.Filters.from_query(query)
    except ValueError as exc:
        raise ConfigError("worklist", str(exc)) from None
    with _engine(args) as engine, engine.connect() as conn:
        now = _time(args.as_of, "--as-of") or SystemClock().now()
        if args.limit:
            try:
                p = wv.page(conn, settings, now, view, after=args.after or "", limit=args.limit, with_counts=False)
            except ValueError as exc:
                raise ConfigError("--after", str(exc)) from None
            rows = p.rows
            if p.next_cursor:  # on stderr, so stdout stays one JSON/CSV document
                import sys

                print(f"next page: --after={p.next_cursor}", file=sys.stderr)
        else:
            rows = list(wv.iterate(conn, settings, now, view))
    if args.json:
        print(json.dumps(rows, indent=2))
    elif args.csv:
        import csv
        import sys

        writer = csv.DictWriter(sys.stdout, fieldnames=list(wv.COLUMNS), extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    else:
        _table(rows, ("alert_id", "referral", "placer_id", "stage", "level_name", "overdue_days", "due_at", "owner",
                      "status", "priority", "specialty", "mode", "delivery"))
    return EXIT_OK


_FILTERS = ("owner", "stage", "level", "priority", "specialty", "referred_to", "practice", "mode", "status", "sort")


def cmd_weekly(args: argparse.Namespace, now: datetime) -> int:
    """`refloop report --weekly`: this week and last, by owner and specialty (refloop.store.weekly)."""
    from refloop.store import weekly
    from refloop.store import worklist_view as wv

    settings = _settings(args)
    with _engine(args) as engine, engine.connect() as conn:
        doc = weekly.review(conn, settings, now, wv.clinic_zone(settings), weeks_back=args.weeks_back)
    if args.format == "json":
        print(json.dumps(doc, indent=2, default=str))
        return EXIT_OK
    this, last = doc["this_week"], doc["last_week"]
    rows: list[dict[str, Any]] = []
    for group, key in (("total", None), ("owner", "by_owner"), ("specialty", "by_specialty")):
        names = [""] if key is None else sorted(set(this[key]) | set(last[key]))
        for name in names:
            a = this["totals"] if key is None else this[key].get(name, {})
            b = last["totals"] if key is None else last[key].get(name, {})
            row: dict[str, Any] = {"group": group, "name": name}
            for f in weekly.FIGURES:
                row[f] = a.get(f, 0)
                row[f"last_{f}"] = b.get(f, 0)
            rows.append(row)
    cols = ("group", "name", *(c for f in weekly.FIGURES for c in (f, f"last_{f}")))
    if args.format == "csv":
        import csv
        import sys

        writer = csv.DictWriter(sys.stdout, fieldnames=list(cols), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    else:
        print(f"week from {this['from']} to {doc['week_end']} (last_*: the week before)")
        _table(rows, cols)
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
    sp.add_argument("--json", action="store_true", help="print JSON instead of a table")
    sp.set_defaults(func=cmd_scan)

    sp = with_config(sub.add_parser("worklist", help="open stall alerts with the worklist page's filters, most "
                                                     "urgent first"))
    sp.add_argument("--owner", help="only this owner's alerts (default: everyone)")
    sp.add_argument("--stage", choices=["scheduling", "visit", "rebooking", "note"], help="only this stage")
    sp.add_argument("--level", help="only this level (1, 2, 3+)")
    sp.add_argument("--priority", choices=["stat", "urgent", "routine"], help="only this priority class")
    sp.add_argument("--specialty", help="only this specialty (case-insensitive)")
    sp.add_argument("--referred-to", dest="referred_to", help="only referrals to this provider/organisation")
    sp.add_argument("--practice", help="only this referring practice (RF1-6.2)")
    sp.add_argument("--mode", choices=["observe", "active"], help="only relationships in this rollout mode")
    sp.add_argument("--status", choices=["active", "open", "acknowledged", "snoozed", "all"],
                    help="alert status (default: active = open + acknowledged)")
    sp.add_argument("--sort", choices=["due", "level", "priority", "raised"], help="order (default: due)")
    sp.add_argument("--limit", type=int, default=0, help="one page of this many rows (default: every row)")
    sp.add_argument("--as-of", dest="as_of", metavar="ISO8601",
                    help="how overdue each row is at this instant (default: now)")
    sp.add_argument("--after", help="the page after this cursor (from a previous page's last row: see docs)")
    out = sp.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print JSON")
    out.add_argument("--csv", action="store_true", help="print CSV (the page's export columns)")
    sp.set_defaults(func=cmd_worklist)

    sp = with_config(sub.add_parser("alert", help="act on an alert: acknowledge, snooze, assign, note, hold, close"))
    sp.add_argument("action", choices=["acknowledge", "snooze", "assign", "note", "hold", "close"], help="what to do")
    sp.add_argument("alert_id", metavar="ALERT_ID", type=int, help="the alert (see `refloop worklist`)")
    sp.add_argument("--actor", help="who acts, for the audit log (default: $USER)")
    sp.add_argument("--note", help="free-text note kept with the alert (no PHI, please)")
    sp.add_argument("--until", help="snooze (or hold) until this ISO 8601 date")
    sp.add_argument("--owner", help="assign to this owner")
    sp.add_argument("--reason", help="why the referral is held or closed by hand")
    sp.set_defaults(func=cmd_alert)

    sp = with_config(sub.add_parser("outbox", help="notifications and their delivery state; `outbox retry ID`"))
    sp.add_argument("outbox_command", nargs="?", choices=["list", "retry"], default="list",
                    help="list notifications (default) or retry one dead-lettered notification")
    sp.add_argument("id", nargs="?", type=int, help="the notification to retry")
    sp.add_argument("--status", choices=["pending", "delivered", "failed", "dead", "suppressed"],
                    help="only notifications in this delivery state")
    sp.add_argument("--json", action="store_true", help="print JSON instead of a table")
    sp.set_defaults(func=cmd_outbox)

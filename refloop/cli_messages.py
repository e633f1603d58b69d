"""`refloop messages` (find any message; `--raw ID` shows one, audited) and `refloop find ID^AUTHORITY`.

The filters are :mod:`refloop.store.message_search`'s, the same as ``GET /api/messages``. A patient is
typed as ``ID^AUTHORITY`` and only its hash reaches the database; it is never printed, logged or written
to the audit trail (the audit row says a patient search happened, not whose). Reading a raw message is a
PHI read, so it writes an audit row (``action=raw``) before printing.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys

from refloop.cli_common import EXIT_CONFIG, EXIT_FAIL, EXIT_OK, engine_from, print_table, with_config

COLUMNS = ("id", "received_at", "sender", "type", "control_id", "outcome", "ack_code", "detail")


def _actor() -> str:
    return f"cli:{getpass.getuser()}"


def cmd_messages(args: argparse.Namespace) -> int:
    from refloop.clock import SystemClock
    from refloop.store import audit
    from refloop.store import message_search as ms

    if args.raw is not None:
        with engine_from(args) as engine, audit.audited_read(engine) as conn:
            text = ms.raw_message(conn, args.raw)
            if text is None:
                print(f"refloop: no stored message {args.raw} (unknown id, or its body was purged by retention)",
                      file=sys.stderr)
                return EXIT_FAIL
            audit.record(conn, now=SystemClock().now(), actor=_actor(), action="raw", target=f"message:{args.raw}",
                         detail="cli")
        print(text.replace("\r\n", "\r").replace("\r", "\n").rstrip("\n"))
        return EXIT_OK
    values = {"sender": args.sender, "type": args.type, "outcome": args.outcome, "since": args.since,
              "until": args.until, "patient": args.patient, "referral": args.referral, "control_id": args.control_id}
    try:
        f = ms.parse_filter(values, args.limit)
    except ms.FilterError as exc:
        print(f"refloop messages: --{exc}", file=sys.stderr)
        return EXIT_CONFIG
    with engine_from(args) as engine, audit.audited_read(engine) as conn:
        rows = ms.search(conn, f)
        if f.patient_hash:
            audit.record(conn, now=SystemClock().now(), actor=_actor(), action="search", target="messages:patient",
                         detail=f"{len(rows)} message(s)")
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print_table(rows, COLUMNS)
    return EXIT_OK


def cmd_find(args: argparse.Namespace) -> int:
    from refloop.clock import SystemClock
    from refloop.patient import hash_id, parse_id
    from refloop.store import audit, identity
    from refloop.store import referrals as repo

    ident, authority = parse_id(args.patient)
    if not ident:
        print("refloop find: give ID^AUTHORITY (the authority as PID-3.4 sends it)", file=sys.stderr)
        return EXIT_CONFIG
    with engine_from(args) as engine, audit.audited_read(engine) as conn:
        ids = identity.referrals_for_key(conn, hash_id(ident, authority))
        rows = [r for rid in ids for r in repo.list_referrals_by_id(conn, rid)]
        audit.record(conn, now=SystemClock().now(), actor=_actor(), action="search", target="referrals:patient",
                     detail=f"{len(rows)} referral(s)")
    if args.json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print("no referral for this patient identifier")
    else:
        print_table(rows, ("id", "placer_id", "status", "priority", "referred_to", "sent_at", "appointment_at",
                           "flags"))
    return EXIT_OK


def register(sub: argparse._SubParsersAction) -> None:
    """Add `messages` and `find` to `refloop` (called from cli.build_parser)."""
    sp = with_config(sub.add_parser(
        "messages", help="find messages in the journal (by sender, type, outcome, time, patient, referral)"))
    sp.add_argument("--sender", metavar="APP[^FAC]", help="MSH-3 (and MSH-4) as sent")
    sp.add_argument("--type", metavar="TYPE[^EVENT]", help="MSH-9, e.g. SIU or SIU^S12")
    sp.add_argument("--outcome", metavar="O", help="processed, ignored, rejected, error, failed, duplicate, ...")
    sp.add_argument("--since", metavar="TIME", help="received at or after this ISO 8601 time (naive = UTC)")
    sp.add_argument("--until", metavar="TIME", help="received before this ISO 8601 time")
    sp.add_argument("--patient", metavar="ID^AUTHORITY", help="any patient identifier of the message (hashed, "
                    "never stored or logged)")
    sp.add_argument("--referral", metavar="KEY", help="messages placed on this referral (id, placer ID or alias)")
    sp.add_argument("--control-id", dest="control_id", metavar="MSH-10", help="only messages with this control ID")
    sp.add_argument("--limit", type=int, default=50, metavar="N", help="at most N rows (default: %(default)s)")
    sp.add_argument("--json", action="store_true", help="print JSON instead of a table")
    sp.add_argument("--raw", type=int, metavar="ID", help="print one stored message, decoded (audited)")
    sp.set_defaults(func=cmd_messages)

    sp = with_config(sub.add_parser("find", help="the referrals of a patient, by any identifier ID^AUTHORITY"))
    sp.add_argument("patient", metavar="ID^AUTHORITY", help="one patient identifier with its assigning authority "
                    "(hashed, never stored or logged)")
    sp.add_argument("--json", action="store_true", help="print JSON instead of a table")
    sp.set_defaults(func=cmd_find)

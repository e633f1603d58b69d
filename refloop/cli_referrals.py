"""`refloop referrals | show | unmatched | link | unlink`: the coordinator's view of the referral loop.

Printing lives here (like cli.py) and the queries in ``refloop.store.referrals``, which the HTTP API
shares, so both front ends return the same JSON. Output holds IDs, codes and provider names only: the
patient is never printed (the store keeps only a hash of the identifier).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from typing import Any

from sqlalchemy import Connection, select

from refloop.cli_common import EXIT_FAIL, EXIT_OK, with_config
from refloop.cli_common import cell as _cell
from refloop.cli_common import engine_from as _engine
from refloop.cli_common import print_table as _table
from refloop.clock import SystemClock


def cmd_referrals(args: argparse.Namespace) -> int:
    from refloop.store import referrals as repo

    with _engine(args) as engine, engine.connect() as conn:
        rows = repo.list_referrals(conn, status=args.status)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        _table(rows, ("id", "placer_id", "status", "priority", "referred_to", "sent_at", "appointment_at", "flags"))
    return EXIT_OK


def cmd_show(args: argparse.Namespace) -> int:
    from refloop.store import referrals as repo

    with _engine(args) as engine, engine.connect() as conn:
        rid = repo.resolve_key(conn, args.key)
        doc = repo.referral_json(conn, rid, SystemClock().now()) if rid is not None else None
    if doc is None:
        print(f"refloop: no referral {args.key!r}")
        return EXIT_FAIL
    if args.json:
        print(json.dumps(doc, indent=2))
        return EXIT_OK
    for key in ("id", "placer_id", "status", "priority", "referred_to", "referring_provider", "sent_at",
                "accepted_at", "scheduled_at", "appointment_at", "completed_at", "note_received_at", "closed_at"):
        value = f"{doc[key]} (360X: {doc['x360_state']})" if key == "status" else _cell(doc[key])
        print(f"{key:20} {value}")
    print(f"{'flags':20} {_cell(doc['flags'])}")
    print("\nappointments")
    _table(doc["appointments"], ("appointment_id", "status", "start"))
    print("\ndocuments")
    _table(doc["documents"], ("id", "type", "status", "final"))
    print("\ntimeline")
    _table(doc["timeline"], ("at", "event", "control_id", "detail"))
    print("\nlinks")
    _table(doc["links"], ("control_id", "matched_by"))
    return EXIT_OK


def cmd_unmatched(args: argparse.Namespace) -> int:
    from refloop.store import referrals as repo

    with _engine(args) as engine, engine.connect() as conn:
        rows = repo.list_unmatched(conn)
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    flat = [{**r, "candidates": [f"{c['id']}:{c['placer_id']}({'+'.join(_matched(c))})" for c in r["candidates"]]}
            for r in rows]
    _table(flat, ("message_id", "control_id", "type", "state", "candidates"))
    return EXIT_OK


def _matched(candidate: dict[str, Any]) -> list[str]:
    """What a review candidate shares with the message, naming the identifier's authority (never the ID)."""
    auth = candidate.get("authority", "")
    return [f"patient@{auth}" if m == "patient" and auth else m for m in candidate["matched"]]


def message_for_control_id(conn: Connection, control_id: str) -> int | None:
    """The newest journal row with this MSH-10 that the referral handlers placed (link or review)."""
    from refloop.store.referrals import LINKS

    row = conn.execute(select(LINKS.c.message_id).where(LINKS.c.control_id == control_id)
                       .order_by(LINKS.c.message_id.desc()).limit(1)).first()
    return int(row.message_id) if row is not None else None


def _coordinator_action(args: argparse.Namespace, action: Callable[[Connection, int], str]) -> int:
    with _engine(args) as engine, engine.begin() as conn:
        mid = message_for_control_id(conn, args.control_id)
        if mid is None:
            print(f"refloop: no referral-loop message with control ID {args.control_id!r}")
            return EXIT_FAIL
        print(action(conn, mid))
    return EXIT_OK


def cmd_link(args: argparse.Namespace) -> int:
    from refloop.store import referrals as repo

    def action(conn: Connection, mid: int) -> str:
        rid = repo.resolve_key(conn, args.key)
        if rid is None:
            raise LookupError(args.key)
        repo.manual_link(conn, mid, rid, SystemClock().now(), actor=os.environ.get("USER", "cli"))
        return f"message {mid} linked to referral {rid}"

    try:
        return _coordinator_action(args, action)
    except LookupError:
        print(f"refloop: no referral {args.key!r}")
        return EXIT_FAIL


def cmd_unlink(args: argparse.Namespace) -> int:
    from refloop.store import referrals as repo

    def action(conn: Connection, mid: int) -> str:
        before = repo.manual_unlink(conn, mid, SystemClock().now(), actor=os.environ.get("USER", "cli"))
        return f"message {mid} unlinked from referral(s) {', '.join(map(str, before)) or 'none'}"

    return _coordinator_action(args, action)


def register(sub: argparse._SubParsersAction) -> None:
    """Add the referral subcommands to `refloop` (called from cli.build_parser)."""


    sp = with_config(sub.add_parser("referrals", help="list referrals (the worklist)"))
    sp.add_argument("--status", help="only this status (sent, scheduled, completed, no_show, closed, ...)")
    sp.add_argument("--json", action="store_true", help="print JSON instead of a table")
    sp.set_defaults(func=cmd_referrals)

    sp = with_config(sub.add_parser("show", help="one referral: milestones, appointments, documents, timeline"))
    sp.add_argument("key", metavar="KEY", help="numeric id, placer referral ID (RF1-6/ORC-2) or an alias")
    sp.add_argument("--json", action="store_true", help="print JSON instead of a table")
    sp.set_defaults(func=cmd_show)

    sp = with_config(sub.add_parser("unmatched", help="messages waiting for review or for their referral"))
    sp.add_argument("--json", action="store_true", help="print JSON instead of a table")
    sp.set_defaults(func=cmd_unmatched)

    sp = with_config(sub.add_parser("link", help="link a message (by MSH-10) to a referral"))
    sp.add_argument("control_id", metavar="CONTROL_ID", help="the message's control ID (MSH-10)")
    sp.add_argument("key", metavar="KEY", help="the referral: numeric id, placer referral ID or an alias")
    sp.set_defaults(func=cmd_link)

    sp = with_config(sub.add_parser("unlink", help="detach a message (by MSH-10) from its referral"))
    sp.add_argument("control_id", metavar="CONTROL_ID", help="the message's control ID (MSH-10)")
    sp.set_defaults(func=cmd_unlink)

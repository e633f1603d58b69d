"""`refloop report` and `refloop simulate`: the analytics commands (the cohort report and its test traffic).

Both live here so that cli.py only gains one registration line. Printing and exit codes stay in the CLI;
the report itself is :func:`refloop.store.report_queries.build_report`, the same function behind
``GET /api/report``, so the CLI's JSON and the API's JSON are the same document.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import UTC, datetime
from pathlib import Path

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


def _aware(text: str) -> datetime:
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).astimezone(UTC)


def cmd_report(args: argparse.Namespace) -> int:
    from refloop import report as rp
    from refloop.clock import SystemClock
    from refloop.config import load_settings
    from refloop.config.windows import windows_from_settings
    from refloop.store import report_queries as rq
    from refloop.store import scan as stall_scan
    from refloop.store.engine import make_engine

    settings = load_settings(args.config or os.environ.get("REFLOOP_CONFIG") or None, os.environ)
    now = _aware(args.now) if args.now else SystemClock().now()
    filters = {k: getattr(args, k) for k in rp.FILTER_FIELDS if getattr(args, k, None)}
    try:
        params = rq.default_params(now, start=args.start, end=args.end, by=args.by, filters=filters,
                                   year=args.year)
    except ValueError as exc:
        print(f"refloop report: {exc}", file=sys.stderr)
        return EXIT_USAGE
    engine = make_engine(settings.database)
    windows = windows_from_settings(settings.stall)
    try:
        # rows no daemon has brought to the current windows yet (after an upgrade): rewritten first, in chunks
        stall_scan.recompute_stale(engine, windows, now)
        with engine.connect() as conn:
            doc = rq.build_report(conn, params, windows)
    finally:
        engine.dispose()
    if args.format == "json":
        print(json.dumps(doc, indent=2))
    elif args.format == "csv":
        sys.stdout.write(rp.render_csv(doc))
    else:
        print(rp.render_table(doc))
    return EXIT_OK


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


def cmd_simulate(args: argparse.Namespace) -> int:
    from refloop import simulate as sim

    styles = tuple(s.strip() for s in args.styles.split(",") if s.strip())
    if not set(styles) <= {"epic", "360x"} or not styles:
        print("refloop simulate: --styles takes epic and/or 360x", file=sys.stderr)
        return EXIT_USAGE
    if args.out is None and args.send is None:
        print("refloop simulate: give --out DIR and/or --send HOST:PORT", file=sys.stderr)
        return EXIT_USAGE
    now = _aware(args.now) if args.now else None
    if now is None and args.send is not None:
        # the daemon applies each message at its own clock (a referral already overdue gets its alert then),
        # so a simulation sent to it ends now, not on the fixed default date the files use
        from refloop.clock import SystemClock

        now = SystemClock().now().replace(microsecond=0)
    run = sim.Simulation(args.referrals, days=args.days, seed=args.seed, now=now, styles=styles).build()
    if args.out is not None:
        paths = run.write(Path(args.out))
        print(f"wrote {len(run.messages)} messages and ground truth to {args.out} "
              f"({', '.join(p.name for p in paths.values())})")
    if args.send is None:
        return EXIT_OK
    host, port = _hostport(args.send)
    codes = sim.send(run, host, port, progress=sys.stderr)
    print(f"sent {len(run.messages)} messages: " + ", ".join(f"{k or '?'} {v}" for k, v in sorted(codes.items())))
    if not args.check:
        return EXIT_OK
    http = args.http or f"{host}:8080"
    token = os.environ.get("REFLOOP_HTTP_TOKEN", "")
    sim.wait_settled(http, len(run.messages), token)
    result = sim.check(run, http, token=token)
    print(json.dumps(result, indent=2))
    return EXIT_OK if result["ok"] else EXIT_FAIL


def register(sub: argparse._SubParsersAction) -> None:
    """Add `report` and `simulate` to `refloop` (called from cli.build_parser)."""
    from refloop.report import GROUP_FIELDS

    sp = sub.add_parser("report", help="cohort report: rates, days, leaks and the CMS50-style figure")
    sp.add_argument("--config", metavar="PATH", help="TOML configuration file (or $REFLOOP_CONFIG)")
    sp.add_argument("--from", dest="start", metavar="DATE", help="first sent date (default: 365 days before --to)")
    sp.add_argument("--to", dest="end", metavar="DATE", help="end of the cohort, exclusive (default: tomorrow UTC)")
    sp.add_argument("--by", choices=GROUP_FIELDS, help="group the figures by this field")
    sp.add_argument("--format", choices=("table", "json", "csv"), default="table")
    sp.add_argument("--now", metavar="TIME", help="evaluate censoring and ages at this ISO time (default: now)")
    sp.add_argument("--year", type=int, help="CMS50 measurement year (default: the year --to falls in)")
    for name in ("referred_to", "specialty", "referring_provider", "priority"):
        sp.add_argument(f"--{name.replace('_', '-')}", dest=name, metavar="VALUE", help=f"only this {name}")
    sp.set_defaults(func=cmd_report)

    sp = sub.add_parser("simulate", help="generate referral traffic with ground truth (files or MLLP)")
    sp.add_argument("--referrals", type=int, default=1000)
    sp.add_argument("--days", type=int, default=365)
    sp.add_argument("--seed", type=int, default=1)
    sp.add_argument("--now", metavar="TIME",
                    help="end of the simulated period (default: now with --send, else 2026-10-01T00:00Z)")
    sp.add_argument("--styles", default="epic", help="sender styles: epic, 360x or both (360x needs a profile "
                    "with sending_application = \"EHR360\" and order_mode = \"referral\")")
    sp.add_argument("--out", metavar="DIR", help="write ref.hl7, siu.hl7, notes.hl7 and ground_truth.json")
    sp.add_argument("--send", metavar="HOST:PORT", help="deliver over MLLP (one connection per feed)")
    sp.add_argument("--check", action="store_true", help="after sending, compare statuses and the report")
    sp.add_argument("--http", metavar="HOST:PORT", help="the daemon's HTTP listener for --check")
    sp.set_defaults(func=cmd_simulate)

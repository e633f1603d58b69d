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
    from refloop.cli_common import open_engine
    from refloop.clock import SystemClock
    from refloop.config import load_settings
    from refloop.config.windows import windows_from_settings
    from refloop.store import report_queries as rq
    from refloop.store import scan as stall_scan

    settings = load_settings(args.config or os.environ.get("REFLOOP_CONFIG") or None, os.environ)
    now = _aware(args.now) if args.now else SystemClock().now()
    if args.weekly:
        from refloop.cli_worklist import cmd_weekly

        return cmd_weekly(args, now)
    filters = {k: getattr(args, k) for k in rp.FILTER_FIELDS if getattr(args, k, None)}
    try:
        params = rq.default_params(now, start=args.start, end=args.end, by=args.by, filters=filters,
                                   year=args.year)
    except ValueError as exc:
        print(f"refloop report: {exc}", file=sys.stderr)
        return EXIT_USAGE
    engine = open_engine(settings)
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


def styles_from(text: str) -> tuple[str, ...]:
    """``epic``, ``360x``, ``both`` or a comma list of the first two (case-insensitive); () when invalid."""
    words = [w.strip().lower() for w in text.split(",") if w.strip()]
    styles = tuple(dict.fromkeys(s for w in words for s in (("epic", "360x") if w == "both" else (w,))))
    return styles if styles and set(styles) <= {"epic", "360x"} else ()


def daemon_http(args: argparse.Namespace) -> tuple[str, str]:
    """Where --check reads the daemon: ``--http`` if given, else the daemon's own settings (the config file
    and ``REFLOOP_*``, exactly as `refloop serve` reads them), with a wildcard listen address read on
    loopback. The token always comes from the settings (``http.token`` / ``REFLOOP_HTTP_TOKEN``)."""
    from refloop.cli_common import settings_from

    settings = settings_from(args)
    host = settings.http.host if settings.http.host not in ("", "0.0.0.0", "::") else "127.0.0.1"  # noqa: S104
    http = args.http or (f"[{host}]:{settings.http.port}" if ":" in host else f"{host}:{settings.http.port}")
    return http, settings.http.token


def cmd_simulate(args: argparse.Namespace) -> int:
    from refloop import simulate as sim

    styles = styles_from(args.styles)
    if not styles:
        print("refloop simulate: --styles takes epic, 360x, both, or epic,360x", file=sys.stderr)
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
    http, token = daemon_http(args)
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
    sp.add_argument("--format", choices=("table", "json", "csv"), default="table", help="output format")
    sp.add_argument("--now", metavar="TIME", help="evaluate censoring and ages at this ISO time (default: now)")
    sp.add_argument("--year", type=int, help="CMS50 measurement year (default: the year --to falls in)")
    for name in ("referred_to", "specialty", "referring_provider", "priority"):
        sp.add_argument(f"--{name.replace('_', '-')}", dest=name, metavar="VALUE", help=f"only this {name}")
    sp.add_argument("--weekly", action="store_true",
                    help="the weekly review instead: this week's sent, scheduled, completed, closed, recovered and "
                         "new leaks by owner and specialty, beside last week's")
    sp.add_argument("--weeks-back", dest="weeks_back", type=int, default=0, metavar="N",
                    help="with --weekly: the week N weeks before this one")
    sp.set_defaults(func=cmd_report)

    sp = sub.add_parser("simulate", help="generate referral traffic with ground truth (files or MLLP)")
    sp.add_argument("--referrals", type=int, default=1000, help="how many referrals to simulate")
    sp.add_argument("--days", type=int, default=365, help="length of the simulated period in days")
    sp.add_argument("--seed", type=int, default=1, help="random seed (same seed, same traffic)")
    sp.add_argument("--now", metavar="TIME",
                    help="end of the simulated period (default: now with --send, else 2026-10-01T00:00Z)")
    sp.add_argument("--styles", default="epic", help="sender styles: epic, 360x or both (360x orders declare "
                    "the 360X profile in MSH-21, so they need no sender profile)")
    sp.add_argument("--out", metavar="DIR", help="write ref.hl7, siu.hl7, notes.hl7 and ground_truth.json")
    sp.add_argument("--send", metavar="HOST:PORT", help="deliver over MLLP (one connection per feed)")
    sp.add_argument("--check", action="store_true", help="after sending, compare statuses and the report")
    sp.add_argument("--http", metavar="HOST:PORT", help="the daemon's HTTP listener for --check (default: "
                    "http.host/http.port from the same config file and REFLOOP_* variables as the daemon)")
    sp.add_argument("--config", metavar="PATH", help="TOML configuration file (or $REFLOOP_CONFIG), for --check")
    sp.set_defaults(func=cmd_simulate)

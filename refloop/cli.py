"""The `refloop` command. The only module that sets up logging, prints, or calls sys.exit.

Exit codes: 0 ok, 1 the operation failed (e.g. a NAK from `send`), 2 bad configuration or usage
(listed in the top-level help, which is written for an operator).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import ssl
import sys
from collections.abc import Coroutine, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import argcomplete

from refloop import __version__
from refloop.cli_common import (
    EXIT_CONFIG,
    EXIT_FAIL,
    EXIT_OK,
    DatabaseNotReady,
    open_engine,
    parse_time,
    settings_from,
    with_config,
)
from refloop.cli_config import register as register_config
from refloop.cli_messages import register as register_messages
from refloop.cli_referrals import register as register_referrals
from refloop.cli_simulate import register as register_simulate
from refloop.cli_worklist import register as register_worklist
from refloop.config import ConfigError, Settings
from refloop.hl7.mllp import MllpClient, msa


def _settings(args: argparse.Namespace) -> Settings:
    return settings_from(args)


# -- serve ----------------------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    from refloop.daemon.server import Server, StartupError
    from refloop.logs import setup_logging, stderr_is_journal

    settings = _settings(args)
    setup_logging(settings.log.level, settings.log.format, journal=stderr_is_journal(os.environ))
    server = Server(settings, migrate_schema=args.migrate)
    try:
        _run(server.serve(), settings)
    except StartupError as exc:
        print(f"refloop: {exc}", file=sys.stderr)
        return EXIT_FAIL
    except OSError as exc:
        print(f"refloop: cannot listen: {exc.strerror} ({exc.errno})", file=sys.stderr)
        return EXIT_FAIL
    return EXIT_OK


def _run(coro: Coroutine[Any, Any, None], settings: Settings) -> None:
    """uvloop when installed, except with MLLP TLS: uvloop resumes reading right after connection_made,
    so the pause that holds the client's first bytes for start_tls does not hold there."""
    if not settings.mllp.tls_cert:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            uvloop.run(coro)
            return
    asyncio.run(coro)


# -- db -------------------------------------------------------------------------------------------
def cmd_db(args: argparse.Namespace) -> int:
    from refloop.store import migrate
    from refloop.store.engine import make_engine

    settings = _settings(args)
    if args.db_command == "current":
        engine = open_engine(settings, require_head=False)
    else:
        engine = make_engine(settings.database)
    try:
        if args.db_command == "upgrade":
            before = migrate.current_revision(engine)
            migrate.upgrade(engine)
            after = migrate.current_revision(engine)
            print(f"database at revision {after}" + ("" if before == after else f" (was {before or 'empty'})"))
        elif args.db_command == "current":
            cur = migrate.current_revision(engine)
            head = migrate.head_revision()
            print(f"current {cur or 'empty'}, head {head}" + ("" if cur == head else " (upgrade needed)"))
            return EXIT_OK if cur == head else EXIT_FAIL
    finally:
        engine.dispose()
    return EXIT_OK


# -- check-config ---------------------------------------------------------------------------------
def cmd_check_config(args: argparse.Namespace) -> int:
    settings = _settings(args)
    print(f"configuration ok: MLLP {settings.mllp.host}:{settings.mllp.port}, HTTP "
          f"{settings.http.host}:{settings.http.port}, {len(settings.profiles)} sender profile(s)")
    return EXIT_OK


# -- send -----------------------------------------------------------------------------------------
def split_messages(data: bytes) -> Iterator[bytes]:
    """Messages in a file: CR, LF or CRLF line ends; a new message starts at each MSH/FHS/BHS line."""
    text = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    current: list[bytes] = []
    for line in text.split(b"\n"):
        if not line.strip():
            continue
        if line.startswith((b"MSH", b"FHS", b"BHS")) and current and not current[0].startswith(
            (b"FHS", b"BHS")
        ):
            yield b"\r".join(current) + b"\r"
            current = []
        current.append(line)
    if current:
        yield b"\r".join(current) + b"\r"


def _send_tls(args: argparse.Namespace) -> ssl.SSLContext | None:
    """TLS for `send` when any TLS option is given: verify the listener (system store or --ca-file) and
    present --cert/--key for mTLS."""
    if not (args.tls or args.ca_file or args.cert):
        return None
    if bool(args.cert) != bool(args.key):
        raise ConfigError("--cert/--key", "give both the client certificate and its key")
    try:
        context = ssl.create_default_context(cafile=args.ca_file or None)
        if args.cert:
            context.load_cert_chain(args.cert, args.key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError("--ca-file/--cert/--key", f"cannot load: {exc}") from None
    return context


def cmd_send(args: argparse.Namespace) -> int:
    failures = 0
    with MllpClient(args.host, args.port, timeout=args.timeout, ssl_context=_send_tls(args)) as client:
        for name in args.files:
            data = sys.stdin.buffer.read() if name == "-" else Path(name).read_bytes()
            for msg in split_messages(data):
                ack = client.send(msg)
                code, _ = msa(ack)
                print(ack.decode("latin-1").replace("\r", "\n").rstrip("\n"))
                print()
                if code not in ("AA", "CA"):
                    failures += 1
    if failures:
        print(f"refloop send: {failures} message(s) not accepted", file=sys.stderr)
    return EXIT_FAIL if failures else EXIT_OK


# -- replay ---------------------------------------------------------------------------------------
def cmd_replay(args: argparse.Namespace) -> int:
    from refloop.clock import SystemClock
    from refloop.daemon.replay import replay
    from refloop.routes.router import Router
    from refloop.routes.table import DEFAULT_ROUTES

    settings = _settings(args)
    since = _parse_time(args.since) if args.since else None
    engine = open_engine(settings)
    try:
        summary = replay(engine, settings, Router(DEFAULT_ROUTES), SystemClock(), since=since,
                         message_id=args.id, outcome=args.outcome)
        import getpass

        from refloop.store.audit import record_now

        record_now(engine, now=SystemClock().now(), actor=f"cli:{getpass.getuser()}", action="replay",
                   target=f"id={args.id}" if args.id else f"since={args.since or 'all'}",
                   detail=f"replayed={summary['replayed']}")
    finally:
        engine.dispose()
    print(json.dumps(summary, indent=2) if args.json else
          "replayed {replayed} message(s): {outcomes}".format(**summary))
    return EXIT_OK


def _parse_time(value: str) -> datetime:
    parsed = parse_time(value, "--since")
    assert parsed is not None
    return parsed


# -- purge / audit --------------------------------------------------------------------------------
def cmd_purge(args: argparse.Namespace) -> int:
    import getpass

    from refloop.clock import SystemClock
    from refloop.store.retention import purge

    settings = _settings(args)
    days = args.older_than if args.older_than is not None else settings.retention.days
    if days <= 0:
        raise ConfigError("--older-than", "give a number of days (or set retention.days)")
    engine = open_engine(settings)
    try:
        res = purge(engine, now=SystemClock().now(), older_than_days=days, actor=f"cli:{getpass.getuser()}",
                    dry_run=args.dry_run)
    finally:
        engine.dispose()
    verb = "would purge" if args.dry_run else "purged"
    print(f"{verb} {res['messages']} message body(ies) and {res['documents']} document(s) older than {days} days")
    return EXIT_OK


def cmd_audit(args: argparse.Namespace) -> int:
    from refloop.store.audit import list_entries

    engine = open_engine(_settings(args))
    try:
        rows = list_entries(engine, limit=args.limit)
    finally:
        engine.dispose()
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            print(f"{r['at']}  {r['actor']:<20} {r['action']:<10} {r['target']}  {r['detail']}")
    return EXIT_OK


# -- parser ---------------------------------------------------------------------------------------
DESCRIPTION = """\
refloop listens for HL7 v2 messages over MLLP, journals every frame before it acknowledges it, and
follows each specialist referral from the order (REF/ORM/OMG) through scheduling (SIU) to the consult
note (MDM/ORU). It flags referrals that stall, tells their owners, forwards the note to the referrer,
and reports how many loops close. Start with `refloop serve`; `refloop config example` prints every
setting with its default.
"""

EPILOG = """\
exit codes:
  0  success
  1  the operation failed (a NAK or no ACK from `send`, a port in use, an upgrade still needed)
  2  configuration or usage error (the message names the setting or option to fix)

configuration: --config PATH or $REFLOOP_CONFIG (TOML); every setting can be overridden by
REFLOOP_<SECTION>_<KEY>; secrets can also come from systemd credentials ($CREDENTIALS_DIRECTORY).
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="refloop", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"refloop {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sp = with_config(sub.add_parser("serve", help="run the daemon in the foreground (MLLP, HTTP, scheduler)"))
    sp.add_argument("--migrate", action="store_true", help="apply database migrations before serving")
    sp.set_defaults(func=cmd_serve)

    sp = with_config(sub.add_parser("db", help="database schema: upgrade to the latest or show the current"))
    sp.add_argument("db_command", choices=["upgrade", "current"],
                    help="upgrade: apply pending migrations; current: show the revision (exit 1 if behind)")
    sp.set_defaults(func=cmd_db)

    sp = with_config(sub.add_parser("check-config", help="validate the configuration and exit"))
    sp.set_defaults(func=cmd_check_config)

    sp = sub.add_parser("send", help="send HL7 messages from files over MLLP and print each ACK")
    sp.add_argument("--host", default="127.0.0.1", help="MLLP listener to send to (default: %(default)s)")
    sp.add_argument("--port", type=int, default=2575, help="its port (default: %(default)s)")
    sp.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for each ACK (default: %(default)s)")
    sp.add_argument("--tls", action="store_true", help="connect with TLS, verifying the listener's certificate")
    sp.add_argument("--ca-file", metavar="PEM", help="CA bundle that verifies the listener (implies --tls)")
    sp.add_argument("--cert", metavar="PEM", help="client certificate for mTLS (with --key; implies --tls)")
    sp.add_argument("--key", metavar="PEM", help="private key of --cert")
    sp.add_argument("files", nargs="+", metavar="FILE", help="files with one or more messages ('-' = stdin)")
    sp.set_defaults(func=cmd_send)

    sp = with_config(sub.add_parser("replay", help="re-run stored messages through the current routes"))
    sp.add_argument("--since", help="only messages received at or after this ISO 8601 time")
    sp.add_argument("--id", type=int, help="only this journal id")
    sp.add_argument("--outcome", choices=["processed", "ignored", "error", "failed"],
                    help="only messages with this journal outcome (e.g. failed, after the cause is fixed)")
    sp.add_argument("--json", action="store_true", help="print the summary as JSON")
    sp.set_defaults(func=cmd_replay)

    sp = with_config(sub.add_parser("purge", help="purge raw message bodies and documents older than N days"))
    sp.add_argument("--older-than", type=int, metavar="DAYS", help="default: retention.days")
    sp.add_argument("--dry-run", action="store_true", help="count what would be purged, change nothing")
    sp.set_defaults(func=cmd_purge)

    sp = with_config(sub.add_parser("audit", help="show the audit log (PHI reads, manual actions, purges)"))
    sp.add_argument("--json", action="store_true", help="print JSON instead of a table")
    sp.add_argument("--limit", type=int, default=100, help="at most this many entries (default: %(default)s)")
    sp.set_defaults(func=cmd_audit)

    register_referrals(sub)
    register_worklist(sub)
    register_simulate(sub)
    register_config(sub)
    register_messages(sub)

    sp = sub.add_parser("completion", help="print a shell completion script (bash or zsh)",
                        description="Print the completion script; e.g. add `eval \"$(refloop completion bash)\"` "
                        "to ~/.bashrc.")
    sp.add_argument("shell", choices=["bash", "zsh"], help="the shell to complete in")
    sp.set_defaults(func=cmd_completion)
    return p


def cmd_completion(args: argparse.Namespace) -> int:
    print(argcomplete.shellcode(["refloop"], shell=args.shell))
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argcomplete.autocomplete(parser)  # returns at once unless the shell's completion hook called us
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"refloop: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except DatabaseNotReady as exc:
        print(f"refloop: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except (ConnectionError, OSError) as exc:
        print(f"refloop: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAIL


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""The `refloop` command. The only module that sets up logging, prints, or calls sys.exit.

Exit codes: 0 ok, 1 the operation failed (e.g. a NAK from `send`), 2 bad configuration or usage.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
from collections.abc import Coroutine, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

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
from refloop.config import ConfigError, Settings


def _settings(args: argparse.Namespace) -> Settings:
    return settings_from(args)


# -- serve ----------------------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    from refloop.daemon.server import Server, StartupError
    from refloop.logs import setup_logging

    settings = _settings(args)
    setup_logging(settings.log.level, settings.log.format)
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


def read_ack(sock: socket.socket, timeout: float) -> bytes:
    from refloop.daemon.framing import Frame, Framer

    sock.settimeout(timeout)
    framer = Framer()
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed before the ACK arrived")
        for ev in framer.feed(chunk):
            if isinstance(ev, Frame):
                return ev.payload


def ack_fields(ack: bytes) -> tuple[str, str]:
    """(MSA-1, MSA-2) of an ACK."""
    text = ack.decode("latin-1")
    sep = text[3:4] or "|"
    for seg in text.replace("\n", "\r").split("\r"):
        if seg.startswith("MSA"):
            parts = seg.split(sep)
            return (parts[1] if len(parts) > 1 else "", parts[2] if len(parts) > 2 else "")
    return "", ""


def cmd_send(args: argparse.Namespace) -> int:
    failures = 0
    with socket.create_connection((args.host, args.port), timeout=args.timeout) as sock:
        for name in args.files:
            data = sys.stdin.buffer.read() if name == "-" else Path(name).read_bytes()
            for msg in split_messages(data):
                sock.sendall(b"\x0b" + msg + b"\x1c\r")
                ack = read_ack(sock, args.timeout)
                code, _ = ack_fields(ack)
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
                         message_id=args.id)
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
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="refloop", description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--version", action="version", version=f"refloop {__version__}")
    sub = p.add_subparsers(dest="command", required=True)


    sp = with_config(sub.add_parser("serve", help="run the daemon in the foreground"))
    sp.add_argument("--migrate", action="store_true", help="apply database migrations before serving")
    sp.set_defaults(func=cmd_serve)

    sp = with_config(sub.add_parser("db", help="database schema"))
    sp.add_argument("db_command", choices=["upgrade", "current"])
    sp.set_defaults(func=cmd_db)

    sp = with_config(sub.add_parser("check-config", help="validate the configuration and exit"))
    sp.set_defaults(func=cmd_check_config)

    sp = sub.add_parser("send", help="send HL7 messages from files over MLLP and print each ACK")
    sp.add_argument("--host", default="127.0.0.1")
    sp.add_argument("--port", type=int, default=2575)
    sp.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for each ACK")
    sp.add_argument("files", nargs="+", metavar="FILE", help="files with one or more messages ('-' = stdin)")
    sp.set_defaults(func=cmd_send)

    sp = with_config(sub.add_parser("replay", help="re-run stored messages through the current routes"))
    sp.add_argument("--since", help="only messages received at or after this ISO 8601 time")
    sp.add_argument("--id", type=int, help="only this journal id")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_replay)

    sp = with_config(sub.add_parser("purge", help="purge raw message bodies and documents older than N days"))
    sp.add_argument("--older-than", type=int, metavar="DAYS", help="default: retention.days")
    sp.add_argument("--dry-run", action="store_true")
    sp.set_defaults(func=cmd_purge)

    sp = with_config(sub.add_parser("audit", help="show the audit log (PHI reads, manual actions, purges)"))
    sp.add_argument("--json", action="store_true")
    sp.add_argument("--limit", type=int, default=100)
    sp.set_defaults(func=cmd_audit)
    from refloop.cli_referrals import register; register(sub)  # noqa: E702, I001
    from refloop.cli_worklist import register as register_worklist; register_worklist(sub)  # noqa: E702, I001
    from refloop.cli_simulate import register as register_simulate; register_simulate(sub)  # noqa: E702, I001
    from refloop.cli_messages import register as register_messages; register_messages(sub)  # noqa: E702, I001
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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

"""What every `refloop` subcommand shares: settings, an engine, times, tables, exit codes."""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine

from refloop.config import ConfigError, Settings, load_settings

EXIT_OK, EXIT_FAIL, EXIT_CONFIG = 0, 1, 2


def settings_from(args: argparse.Namespace) -> Settings:
    path = getattr(args, "config", None) or os.environ.get("REFLOOP_CONFIG") or None
    return load_settings(path, os.environ)


class DatabaseNotReady(Exception):
    """The database is missing, unreachable or behind the code's migrations: one line naming the database
    and what to run (exit 2). Raised before anything is created, so a typo never leaves an empty file."""


def shown_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def open_engine(settings: Settings, *, require_head: bool = True) -> Engine:
    """An engine on a database that exists and is at the code's migration head, else DatabaseNotReady.
    ``require_head=False`` (`refloop db current`) only requires that it exists and answers."""
    from alembic.script import ScriptDirectory
    from alembic.script.revision import RevisionError
    from sqlalchemy.exc import DBAPIError

    from refloop.store import migrate
    from refloop.store.engine import is_sqlite, make_engine, sqlite_path

    url = settings.database.url
    if is_sqlite(url):
        path = sqlite_path(url)
        if path is not None and not path.is_file():
            raise DatabaseNotReady(f"no database at {path.resolve()} ({shown_url(url)}): create it with "
                                   "`refloop db upgrade` using the same configuration, or set database.url")
    engine = make_engine(settings.database)
    try:
        current = migrate.current_revision(engine)
    except DBAPIError as exc:
        engine.dispose()
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig is not None else type(exc).__name__
        raise DatabaseNotReady(f"cannot open database {shown_url(url)}: {reason[:200]}") from None
    head = migrate.head_revision()
    if current != head and require_head:
        engine.dispose()
        known = True
        if current is not None:
            try:
                ScriptDirectory.from_config(migrate.alembic_config()).get_revision(current)
            except RevisionError:
                known = False
        if not known:
            raise DatabaseNotReady(f"database {shown_url(url)} is at revision {current}, newer than this refloop "
                                   f"({head}): upgrade refloop")
        raise DatabaseNotReady(f"database {shown_url(url)} is at revision {current or 'empty'}, this refloop "
                               f"needs {head}: run `refloop db upgrade`")
    return engine


@contextmanager
def engine_from(args: argparse.Namespace) -> Iterator[Engine]:
    engine = open_engine(settings_from(args))
    try:
        yield engine
    finally:
        engine.dispose()


def with_config(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
    sp.add_argument("--config", metavar="PATH", help="TOML configuration file (or $REFLOOP_CONFIG)")
    return sp


def parse_time(value: str | None, flag: str) -> datetime | None:
    """ISO 8601 (a trailing Z allowed); naive means UTC. A bad value names the flag (exit 2)."""
    if not value:
        return None
    try:
        t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(flag, f"not an ISO 8601 time: {value!r}") from None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)


def print_table(rows: list[dict[str, Any]], cols: tuple[str, ...]) -> None:
    table = [[cell(r.get(c)) for c in cols] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in table]) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
    for row in table:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))

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


@contextmanager
def engine_from(args: argparse.Namespace) -> Iterator[Engine]:
    from refloop.store.engine import make_engine

    engine = make_engine(settings_from(args).database)
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

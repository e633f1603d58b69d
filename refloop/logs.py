"""Logging set-up: one JSON object per line, carrying IDs and codes passed in ``extra``.

Only the keys in :data:`FIELDS` are copied from ``extra``, so a careless ``extra={"msg": ...}`` cannot
smuggle message content into the logs, and exception text is never formatted (database and parser
errors quote their input, which is PHI); the exception type is logged instead.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Mapping
from datetime import UTC, datetime

FIELDS = (
    "message_id", "control_id", "type", "sender", "outcome", "ack", "err", "duplicate_of", "ms",
    "reason", "bytes", "error_type", "messages", "mllp_port", "http_port", "socket_activated",
    "frames_cut", "profiles", "error", "key", "count", "referral_id", "alert_id",
)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        for key in FIELDS:
            if key in record.__dict__:
                out[key] = record.__dict__[key]
        if record.exc_info and record.exc_info[0] is not None:
            out["error_type"] = record.exc_info[0].__name__
        return json.dumps(out, default=str)


class TextFormatter(JsonFormatter):
    def format(self, record: logging.LogRecord) -> str:
        data = json.loads(super().format(record))
        head = f"{data.pop('ts')} {data.pop('level'):7} {data.pop('event')}"
        data.pop("logger", None)
        return head + "".join(f" {k}={v}" for k, v in data.items())


#: sd-daemon(3) priority prefixes (syslog levels) that journald strips and stores as PRIORITY=.
_PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))


def syslog_priority(levelno: int) -> int:
    return next((prio for floor, prio in _PRIORITIES if levelno >= floor), 7)


class JournalPrefix(logging.Formatter):
    """Wraps a formatter and prepends ``<N>`` so ``journalctl -p warning`` filters refloop's lines.

    Only used when stderr really is the journal (see :func:`stderr_is_journal`): anywhere else the
    prefix would be noise in a terminal or a file.
    """

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        return f"<{syslog_priority(record.levelno)}>{self.inner.format(record)}"


def stderr_is_journal(environ: Mapping[str, str], fd: int = 2) -> bool:
    """True when ``$JOURNAL_STREAM`` names the device:inode of ``fd``, as systemd.exec(5) advises checking:
    the variable is inherited by children whose stderr may have been redirected elsewhere."""
    value = environ.get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat(fd)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def setup_logging(level: str = "INFO", fmt: str = "json", stream: object = None, *, journal: bool = False) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)  # type: ignore[arg-type]
    formatter: logging.Formatter = JsonFormatter() if fmt == "json" else TextFormatter()
    handler.setFormatter(JournalPrefix(formatter) if journal else formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("sqlalchemy").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    logging.getLogger("apscheduler").setLevel(logging.WARNING)  # a line per job run every 10 s is noise

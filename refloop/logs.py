"""Logging set-up: one JSON object per line, carrying IDs and codes passed in ``extra``.

Only the keys in :data:`FIELDS` are copied from ``extra``, so a careless ``extra={"msg": ...}`` cannot
smuggle message content into the logs, and exception text is never formatted (database and parser
errors quote their input, which is PHI); the exception type is logged instead.
"""

from __future__ import annotations

import json
import logging
import sys
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


def setup_logging(level: str = "INFO", fmt: str = "json", stream: object = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)  # type: ignore[arg-type]
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("sqlalchemy").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    logging.getLogger("apscheduler").setLevel(logging.WARNING)  # a line per job run every 10 s is noise

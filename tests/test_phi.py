"""PHI canary: the synthetic patient name and MRN never leave the journal.

Every path a frame can take (accepted, content variants, protocol rejects, unsupported types,
unparseable, oversize, duplicate, VT inside a frame, mid-frame disconnect, database locked, cut by
shutdown) is driven through a real daemon with the canary in it. Then every log line, the /metrics
scrape, the read API, health and readiness bodies and HTTP error bodies are searched for the canary,
also in URL-encoded, JSON-escaped, HL7-escaped, hex and case-folded forms.

The subprocess test captures the daemon's real stderr (``REFLOOP_LOG_LEVEL=DEBUG``) including the
shutdown lines after SIGTERM; the in-process test also checks every attribute of every log record (not
only the keys the JSON formatter copies) and handlers that raise with PHI in the exception text.
"""

from __future__ import annotations

import dataclasses
import html
import json
import logging
import re
import signal
import socket
import sqlite3
import urllib.parse
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from refloop.daemon.ack import AckError
from refloop.logs import JsonFormatter
from refloop.message import Message
from refloop.routes.context import ContentError, HandlerContext, HandlerResult
from refloop.routes.router import Route
from refloop.routes.table import DEFAULT_ROUTES
from tests.samples import CANARY_MRN, CANARY_NAME, adt, control_id, mdm, odd, ref, siu
from tests.utils import (
    CR,
    FS,
    VT,
    MllpClient,
    http_get,
    make_settings,
    msa,
    running_daemon,
    start_daemon_process,
    wait_for,
)

FAMILY, GIVEN = CANARY_NAME.split("^")
MRN_DIGITS = CANARY_MRN.removeprefix("MRN")

#: Substrings searched for (case-insensitively) in every form of every output. "quetzalc" also
#: catches the accented variant "Quetzalcóatl" and its JSON escape "Quetzalc\u00f3atl".
TOKENS = ("quetzalc", GIVEN.lower(), MRN_DIGITS)
#: Encodings a careless log call could produce: hex of the raw bytes, and UTF-16 style escapes.
ENCODED = tuple(t.encode().hex() for t in (FAMILY, GIVEN, MRN_DIGITS))

_HL7_ESCAPES = {"\\F\\": "|", "\\S\\": "^", "\\T\\": "&", "\\R\\": "~", "\\E\\": "\\", "\\.br\\": " "}


def _forms(text: str) -> Iterator[str]:
    yield text
    yield urllib.parse.unquote_plus(text)
    yield urllib.parse.unquote_plus(urllib.parse.unquote_plus(text))
    yield html.unescape(text)
    yield re.sub(r"\\u([0-9a-fA-F]{4})", lambda m: chr(int(m.group(1), 16)), text)
    yield re.sub(r"\\x([0-9a-fA-F]{2})", lambda m: chr(int(m.group(1), 16)), text)
    hl7 = text
    for esc, ch in _HL7_ESCAPES.items():
        hl7 = hl7.replace(esc, ch)
    yield hl7


def phi_hits(text: str) -> set[str]:
    """The canary tokens found in any decoded form of *text* (empty set: clean)."""
    found: set[str] = set()
    for form in _forms(text):
        low = form.lower()
        found.update(t for t in TOKENS if t in low)
        compact = re.sub(r"[^0-9a-z]", "", low)
        found.update(f"{t} (separators removed)" for t in TOKENS if t in compact)
        found.update(f"hex {h}" for h in ENCODED if h in low)
    return found


def assert_no_phi(where: str, text: str) -> None:
    bad = [(i, line) for i, line in enumerate(text.splitlines(), 1) if phi_hits(line)]
    assert not bad, f"PHI canary in {where}:\n" + "\n".join(f"  line {i}: {line[:300]}" for i, line in bad[:20])


# -- traffic: every path a frame can take -----------------------------------------------------------
@dataclasses.dataclass
class Traffic:
    """ACK codes seen per path, so the tests can prove each path really ran."""

    codes: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    no_ack: Counter[str] = dataclasses.field(default_factory=Counter)

    def add(self, path: str, ack: str) -> str:
        code = msa(ack)[0]
        self.codes.setdefault(path, []).append(code)
        return code


def _send(port: int, msg: str | bytes) -> str:
    with MllpClient(port) as c:
        return c.send(msg)


def _pid_prefix(msg: str) -> str:
    """The start of *msg* up to and including its PID segment (so the cut frame carries the canary)."""
    cut = msg.index("PID|")
    return msg[: msg.index("\r", cut) + 1]


def drive_every_path(port: int, http_port: int, *, unsupported: str, db_file: Path | None,
                     senders: tuple[str, ...] = ("ENGINE",)) -> Traffic:
    """Send the canary through every path; returns the ACK codes per path.

    ``unsupported`` is the daemon's mllp.unsupported policy ("accept" or "reject"); ``db_file`` is the
    SQLite file to lock for the database-trouble path (None skips it, e.g. on PostgreSQL); ``senders``
    are MSH-3 values to send good traffic from (configured profiles and unknown senders).
    """
    t = Traffic()
    with MllpClient(port) as c:
        # good, from each sender
        for app in senders:
            for build in (siu, ref, mdm):
                t.add("good", c.send(build(app=app)))
        # content variants: case, escapes, encodings, terminators, enhanced mode, app-ack requests
        escaped = CANARY_NAME.replace("^", "\\S\\")
        variants: list[str | bytes] = [
            siu(patient=CANARY_NAME.upper() + "^Q^^DR"),
            ref(patient=CANARY_NAME.lower(), referral=f"R{control_id('V')}"),
            mdm(note=f"Seen {escaped} ({CANARY_MRN})\\.br\\{FAMILY} {GIVEN} {CANARY_MRN}"),
            siu(patient="Quetzalcóatl^Zebediah", charset="UNICODE UTF-8").encode("utf-8"),
            siu(patient="Quetzalcóatl^Zebediah").encode("cp1252"),  # MSH-18 empty: fallback codec
            ref().replace("\r", "\n"),  # LF segment terminators
            ref().replace("\r", "\r\n"),
            siu(accept="AL"),  # enhanced mode: CA
            mdm(app_ack="AL"),  # asks for an application ACK refloop does not send
            mdm(trigger="T01", mrn=f"{CANARY_MRN}&{CANARY_MRN}"),
        ]
        for v in variants:
            t.add("variant", c.send(v))
        # protocol rejects
        t.add("bad_version", c.send(siu(version="2.1")))
        t.add("processing_t", c.send(ref(processing="T")))
        # types without a route
        t.add("unsupported", c.send(adt()))
        t.add("unsupported", c.send(odd()))
        t.add("unsupported", c.send(odd(mtype="ADT", trigger="A08")))
        # unparseable, each with the canary in it
        for junk in (
            f"PID|1||{CANARY_MRN}^^^CLINIC^MR||{CANARY_NAME}||19700101|F\r",
            f"MSH|{CANARY_NAME}|{CANARY_MRN}\r",
            f"MSH|^~\\&|ENGINE\rPID|1||{CANARY_MRN}||{CANARY_NAME}\r",
            b"\x00\xff" + CANARY_NAME.encode() + b"\xfe" + CANARY_MRN.encode(),
            f"MSH^~|\\&|{CANARY_NAME}|{CANARY_MRN}|||||||\r",
        ):
            t.add("unparseable", c.send(junk))
        # duplicate resend
        dup = siu()
        t.add("duplicate", c.send(dup))
        t.add("duplicate", c.send(dup))
        # VT inside a frame: the cut frame is journaled as broken, the next one answered
        whole = siu()
        c.send_raw(VT + _pid_prefix(mdm()).encode())
        t.add("after_vt_in_frame", c.send(whole))
        t.no_ack["vt_in_frame"] += 1
    # oversize (limit 4096): AR, then the daemon closes the connection
    with MllpClient(port) as c:
        big = mdm(note=(f"{CANARY_NAME} {CANARY_MRN} " * 400))
        t.add("oversize", c.send(big))
        assert c.closed_by_peer(), "an oversize frame must close the connection"
    # mid-frame disconnect
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(VT + _pid_prefix(ref()).encode())
    t.no_ack["disconnect"] += 1

    def broken_journaled() -> bool:
        scrape = http_get(http_port, "/metrics")[1]
        return metric_value(scrape, "refloop_journal_outcomes_total", '{outcome="broken_frame"}') >= 2

    # (before the lock: a broken frame committed in the same group as a locked one would be lost)
    assert wait_for(broken_journaled), "the VT-cut and the disconnected frame were not journaled"
    # database trouble: a second process holds the SQLite write lock while a message arrives
    if db_file is not None:
        msg = siu()
        lock = sqlite3.connect(db_file, isolation_level=None, timeout=10)
        try:
            lock.execute("BEGIN EXCLUSIVE")
            t.add("db_locked", _send(port, msg))
            t.add("db_locked", _send(port, mdm()))
        finally:
            lock.execute("ROLLBACK")
            lock.close()
        t.add("db_recovered", _send(port, msg))  # the engine's resend after the AR
    return t


def check_traffic(t: Traffic, *, unsupported: str, db: bool) -> None:
    """Each path answered the way the ACK decision table says (proves the path ran)."""
    # AE is a content error found by a referral handler: also a path, as long as some are accepted
    assert set(t.codes["good"]) <= {"AA", "AE"} and "AA" in t.codes["good"], t.codes["good"]
    assert set(t.codes["variant"]) <= {"AA", "CA", "AE", "CE"} and "CA" in t.codes["variant"], t.codes["variant"]
    assert t.codes["bad_version"] == ["AR"]
    assert t.codes["processing_t"] == ["AR"]
    assert set(t.codes["unsupported"]) == ({"AR"} if unsupported == "reject" else {"AA"})
    assert set(t.codes["unparseable"]) == {"AR"}
    assert t.codes["duplicate"] == ["AA", "AA"]
    assert t.codes["after_vt_in_frame"] == ["AA"]
    assert t.codes["oversize"] == ["AR"]
    if db:
        assert t.codes["db_locked"] == ["AR", "AR"]
        assert t.codes["db_recovered"] == ["AA"]


def metric_value(scrape: str, name: str, labels: str = "") -> float:
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", scrape, re.M)
    return float(m.group(1)) if m else 0.0


def http_bodies(http_port: int) -> dict[str, str]:
    """Every HTTP body an operator or scraper can see, including error bodies for bad requests."""
    paths = [
        "/metrics", "/healthz", "/readyz", "/api/messages", "/api/messages?limit=10000",
        "/api/messages?limit=abc", f"/api/messages?limit={urllib.parse.quote(CANARY_NAME)}",
        f"/api/messages?control_id={urllib.parse.quote(CANARY_MRN)}", "/nope",
        f"/nope/{urllib.parse.quote(CANARY_NAME)}", "/api/messages/1", "/metrics/",
    ]
    out = {}
    for p in paths:
        status, body = http_get(http_port, p)
        out[f"GET {p} -> {status}"] = body if isinstance(body, str) else json.dumps(body, ensure_ascii=True)
    return out


# -- subprocess daemon: the real stderr log ---------------------------------------------------------
def test_phi_canary_never_leaves_the_journal(tmp_path: Path) -> None:
    db_file = tmp_path / "refloop.db"
    d = start_daemon_process(tmp_path, f"sqlite:///{db_file}", {
        "REFLOOP_LOG_LEVEL": "DEBUG",
        "REFLOOP_LOG_FORMAT": "json",
        "REFLOOP_MLLP_MAX_FRAME_BYTES": "4096",
        "REFLOOP_MLLP_UNSUPPORTED": "reject",
        "REFLOOP_DATABASE_BUSY_TIMEOUT_MS": "200",
    })
    try:
        traffic = drive_every_path(d.port, d.http_port, unsupported="reject", db_file=db_file)
        check_traffic(traffic, unsupported="reject", db=True)
        bodies = http_bodies(d.http_port)
        # a frame half-sent when SIGTERM arrives is journaled as broken during shutdown
        def received() -> float:
            return metric_value(http_get(d.http_port, "/metrics")[1], "refloop_received_bytes_total")

        before = received()
        cut = socket.create_connection(("127.0.0.1", d.port), timeout=10)
        cut.sendall(VT + _pid_prefix(siu()).encode())
        assert wait_for(lambda: received() > before)
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(30) == 0
        cut.close()
    finally:
        if d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait(10)

    for where, body in bodies.items():
        assert_no_phi(where, body)
    assert "refloop_messages_total" in bodies["GET /metrics -> 200"]
    journal = json.loads(next(b for k, b in bodies.items() if k.startswith("GET /api/messages?limit=10000")))
    assert len(journal) >= 30, "the read API should list the journal (metadata only)"

    log = d.log_path.read_text(encoding="utf-8", errors="backslashreplace")
    assert_no_phi(f"daemon log {d.log_path}", log)
    lines = [ln for ln in log.splitlines() if ln.strip()]
    not_json = [ln for ln in lines if not _is_json_object(ln)]
    assert not not_json, "every log line must be one JSON object (a raw traceback could quote PHI):\n" + \
        "\n".join(not_json[:10])
    events = Counter(json.loads(ln)["event"] for ln in lines)
    assert events["message"] >= 30, events  # the per-message lines really were captured
    assert events["group commit failed"] >= 1, events  # the database path really ran
    assert events["refloop stopped"] == 1, events  # and the shutdown lines are in what was searched
    outcomes = Counter(json.loads(ln).get("outcome") for ln in lines if json.loads(ln)["event"] == "message")
    assert outcomes["broken_frame"] == 3, outcomes  # VT-cut, disconnect, and the frame cut by SIGTERM
    levels = {json.loads(ln)["level"] for ln in lines}
    assert {"info", "warning", "error"} <= levels, levels


def _is_json_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


# -- in-process daemon: every attribute of every log record ------------------------------------------
def _leaky_handler(ctx: HandlerContext, msg: Message) -> HandlerResult:
    """A buggy handler whose exception text quotes the patient (as parser and DB errors do)."""
    raise ValueError(f"cannot link {CANARY_NAME} {CANARY_MRN}: {msg.raw[:200]!r}")


def _content_error_handler(ctx: HandlerContext, msg: Message) -> HandlerResult:
    raise ContentError(AckError(103, f"Table value not found for {CANARY_NAME}", "PID^1^5", "E"))


_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


def test_phi_canary_in_process_records(db_url: str, caplog: pytest.LogCaptureFixture) -> None:
    routes = (
        Route("ZPH", "Z01", _leaky_handler, "leaky"),  # a handler bug with PHI in str(exc)
        Route("ZPH", "Z02", _content_error_handler, "content_error"),
        *DEFAULT_ROUTES,
    )
    settings = make_settings(db_url, max_frame_bytes=4096, busy_timeout_ms=200)
    db_file = Path(db_url.removeprefix("sqlite:///")) if db_url.startswith("sqlite") else None
    caplog.set_level(logging.DEBUG)
    with running_daemon(settings, routes=routes) as d:
        traffic = drive_every_path(d.port, d.http_port, unsupported="accept", db_file=db_file)
        check_traffic(traffic, unsupported="accept", db=db_file is not None)
        with MllpClient(d.port) as c:
            failed = c.send(odd(mtype="ZPH", trigger="Z01"))
            content = c.send(odd(mtype="ZPH", trigger="Z02"))
        assert msa(failed)[0] == "AE" and msa(content)[0] == "AE"
        bodies = http_bodies(d.http_port)
    for where, body in bodies.items():
        assert_no_phi(where, body)

    fmt = JsonFormatter()
    records = list(caplog.records)
    assert sum(r.getMessage() == "message" for r in records) >= 30
    assert any(r.getMessage() == "handler failed" for r in records)
    for r in records:
        assert_no_phi(f"formatted record {r.name}", fmt.format(r))
        extras = {k: v for k, v in vars(r).items() if k not in _STANDARD_ATTRS}
        assert_no_phi(f"record {r.name} {r.getMessage()!r} extras", repr(extras))
        assert_no_phi(f"record {r.name} args", repr(r.args))


def test_phi_probe_catches_variants() -> None:
    """The search itself: every encoding a leak could take is found (so a clean result means clean)."""
    leaks = [
        CANARY_NAME, CANARY_MRN, FAMILY.upper(), GIVEN.lower(), urllib.parse.quote(CANARY_NAME),
        urllib.parse.quote(urllib.parse.quote(CANARY_NAME)), json.dumps("Quetzalcóatl"),
        CANARY_NAME.replace("^", "\\S\\"), FAMILY.encode().hex(), repr("Quetzalcóatl".encode("cp1252")),
        html.escape("<Quetzalcoatl>"), "Q-u-e-t-z-a-l-c-o-a-t-l", "777 000 111",
    ]
    for leak in leaks:
        assert phi_hits(f'{{"event": "x", "detail": {json.dumps(leak)}}}'), leak
    assert not phi_hits('{"event": "message", "control_id": "S00000012", "sender": "ENGINE", "ms": 1.5}')
    assert not phi_hits(bytes(FS + CR).decode())

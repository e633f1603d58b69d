"""Typed, frozen settings: built once at start-up by :func:`refloop.config.loader.load_settings`.

Every knob lives here with its default, so that the daemon, the CLI, the tests and the documentation
all read one source. Each field carries ``metadata["doc"]`` (the one-line reason shown in the example
config and docs/configuration.md) and optionally ``metadata["check"]`` (a validator returning an error
text or ``None``). The loader refuses unknown keys, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from refloop.config.fields import DEFAULT_PATIENT_ID_TYPES, DEFAULT_VERSIONS, Check, setting
from refloop.config.notify import NotifySettings, WorklistSettings
from refloop.config.windows import WindowSettings
from refloop.x360 import parse_override


def _port(v: int) -> str | None:
    return None if 0 <= v <= 65535 else "must be a TCP port number 0-65535 (0 picks a free port)"


def _positive(v: float) -> str | None:
    return None if v > 0 else "must be greater than 0"


def _at_least(n: int) -> Check:
    def check(v: int) -> str | None:
        return None if v >= n else f"must be at least {n}"

    return check


def _one_of(*choices: str) -> Check:
    def check(v: str) -> str | None:
        return None if v in choices else f"must be one of {', '.join(choices)}"

    return check


def _codec(v: str) -> str | None:
    import codecs

    try:
        codecs.lookup(v)
    except LookupError:
        return "is not a Python codec name (e.g. cp1252, utf-8, latin-1)"
    return None


def _not_negative(v: float) -> str | None:
    return None if v >= 0 else "must be 0 or more"


def _osu_states(v: tuple[str, ...]) -> str | None:
    for entry in v:
        try:
            parse_override(entry)
        except ValueError as exc:
            return str(exc)
    return None


def _hl7_paths(v: tuple[str, ...]) -> str | None:
    import re

    bad = [p for p in v if not re.fullmatch(r"[A-Z][A-Z0-9]{2}(\[\d+\])?-\d+(\(\d+\))?(\.\d+){0,2}", p)]
    return f"not HL7 paths like 'ZCH-3.1': {', '.join(bad)}" if bad else None


def _iana_zone(v: str) -> str | None:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        ZoneInfo(v)
    except (ZoneInfoNotFoundError, ValueError):
        return "is not an IANA time zone name (e.g. UTC, America/Chicago)"
    return None


def _cidrs(v: tuple[str, ...]) -> str | None:
    import ipaddress

    bad = []
    for c in v:
        try:
            ipaddress.ip_network(c, strict=False)
        except ValueError:
            bad.append(c)
    return f"not IP networks (e.g. 10.1.0.0/16): {', '.join(bad)}" if bad else None


def default_database_url(environ: dict[str, str] | None = None) -> str:
    """SQLite in ``$STATE_DIRECTORY`` under systemd, else in ``./var`` of the working directory."""
    env = os.environ if environ is None else environ
    state = env.get("STATE_DIRECTORY", "").split(":")[0]
    base = Path(state) if state else Path.cwd() / "var"
    return f"sqlite:///{base / 'refloop.db'}"


@dataclass(frozen=True)
class MllpSettings:
    """The MLLP listener and its limits (safe defaults: see docs/hl7.md, "Limits and bad input")."""

    host: str = setting("127.0.0.1", "Address to bind; loopback unless you mean to expose the port.")
    port: int = setting(2575, "MLLP port (2575 is the IANA-registered HL7 port).", _port)
    max_frame_bytes: int = setting(
        16 * 1024 * 1024,
        "Largest accepted frame; bigger frames are journaled as a marker, answered AR and the connection closed.",
        _at_least(1024),
    )
    idle_timeout: float = setting(600.0, "Seconds without any byte before an idle connection is closed.", _positive)
    frame_deadline: float = setting(
        60.0, "Seconds a started frame may take to complete (defeats 1-byte-per-second trickles).", _positive
    )
    max_connections: int = setting(1000, "Open MLLP connections at most; more are closed at once.", _at_least(1))
    max_connections_per_ip: int = setting(
        100, "Open MLLP connections per peer address at most.", _at_least(1)
    )
    max_pending_frames: int = setting(
        64, "Frames a pipelining sender may queue on one connection before reading pauses.", _at_least(1)
    )
    shutdown_grace: float = setting(
        30.0, "Seconds SIGTERM waits for frames in flight to be committed and ACKed.", _positive
    )
    ack_application: str = setting("REFLOOP", "MSH-3 of the ACKs refloop sends.")
    ack_facility: str = setting("REFLOOP", "MSH-4 of the ACKs refloop sends.")
    processing_ids: tuple[str, ...] = setting(
        ("P",), "Accepted MSH-11 processing IDs; others get AR 202 (keeps test traffic out of production)."
    )
    allow_cidrs: tuple[str, ...] = setting(
        (), "Peer networks allowed to connect (empty: any); others are closed at once and counted.", _cidrs
    )
    tls_cert: str = setting("", "PEM certificate chain for TLS on the MLLP port (empty: plain TCP).")
    tls_key: str = setting("", "PEM private key for tls_cert.")
    tls_client_ca: str = setting(
        "", "PEM CA bundle to verify client certificates (mTLS); empty: client certificates are not asked for."
    )
    tls_require_client_cert: bool = setting(
        True, "With tls_client_ca: refuse peers without a valid client certificate."
    )
    tls_handshake_timeout: float = setting(
        10.0, "Seconds a TLS handshake may take before the connection is closed.", _positive
    )
    unsupported: str = setting(
        "accept",
        "Well-formed message types refloop has no route for: 'accept' (AA, journaled as ignored) or "
        "'reject' (AR 200/201).",
        _one_of("accept", "reject"),
    )
    # -- journal-first ingest (docs/ingest.md) --
    ack_after: str = setting(
        "journal",
        "Which commit releases the ACK: 'journal' (the frame is durably journaled; its effects are applied "
        "right after, in journal order) or 'applied' (the projector has committed its effects; handler "
        "failures are answered AE).",
        _one_of("journal", "applied"),
    )
    max_apply_lag: int = setting(
        10000,
        "Messages journaled but not yet applied at most; past this the listener stops reading sockets until "
        "the projector has caught up to half of it (back-pressure; never AR for lag).",
        _at_least(1),
    )


@dataclass(frozen=True)
class HttpSettings:
    """The HTTP side: health, readiness, metrics and the read API."""

    host: str = setting("127.0.0.1", "Address for /healthz, /readyz, /metrics and the API.")
    port: int = setting(8575, "HTTP port.", _port)
    token: str = setting(
        "",
        "Bearer token for the API and dashboard; required when host is not loopback (/healthz, /readyz and "
        "/metrics stay open). Prefer REFLOOP_HTTP_TOKEN over the file.",
    )
    # -- per-user identity behind a reverse proxy (docs/workspace.md) --
    user_header: str = setting(
        "",
        "Request header naming the signed-in person (e.g. X-Forwarded-User), set by an authenticating reverse "
        "proxy; honoured only from trusted_proxies, so the audit log and timeline name a person.",
    )
    trusted_proxies: tuple[str, ...] = setting(
        ("127.0.0.1/32", "::1/128"),
        "Networks whose requests may carry user_header and X-Forwarded-Proto (the reverse proxy's address).",
        _cidrs,
    )
    cookie_secure: str = setting(
        "auto",
        "Secure flag on the login cookie: 'auto' (when a trusted proxy says X-Forwarded-Proto: https), 'on', 'off'.",
        _one_of("auto", "on", "off"),
    )


@dataclass(frozen=True)
class DatabaseSettings:
    """Where the journal and the referral state live."""

    url: str = setting(
        "",
        "SQLAlchemy URL; empty means SQLite at $STATE_DIRECTORY/refloop.db or ./var/refloop.db. "
        "PostgreSQL: postgresql+psycopg://user@host/db.",
    )
    busy_timeout_ms: int = setting(
        5000, "SQLite: how long a writer waits on a lock before the message is answered AR.", _at_least(0)
    )
    auto_migrate: bool = setting(
        False, "Apply migrations at start-up (always on for the embedded SQLite default)."
    )
    writers: int = setting(
        0,
        "Writer threads, each with one connection and its own group commit; one MLLP connection's messages "
        "always go to the same writer, in order. 0 = automatic: 1 on SQLite (it allows one writer), 4 on "
        "PostgreSQL (hides each statement's round trip behind the others').",
        _at_least(0),
    )

    def writer_count(self) -> int:
        """How many writer threads the daemon runs (see ``writers``)."""
        if self.url.startswith("sqlite"):
            return 1
        return self.writers or 4


@dataclass(frozen=True)
class RetentionSettings:
    """How long PHI-bearing payloads are kept (metadata stays for reports)."""

    days: int = setting(
        0, "Purge raw message bodies and document contents older than this many days (0: keep forever).",
        _at_least(0),
    )
    check_hours: float = setting(6.0, "How often the purge job runs.", _positive)


@dataclass(frozen=True)
class LogSettings:
    """Logs are one JSON object a line and never carry PHI."""

    level: str = setting("INFO", "Log level.", _one_of("DEBUG", "INFO", "WARNING", "ERROR"))
    format: str = setting("json", "'json' (one object a line) or 'text'.", _one_of("json", "text"))


@dataclass(frozen=True)
class SenderProfile:
    """How one sending system (MSH-3/MSH-4) is read. The profile named ``default`` matches everyone else."""

    name: str = setting("default", "Profile name; used in metrics labels and logs, so keep it short.")
    sending_application: str = setting("", "MSH-3.1 to match (empty: any).")
    sending_facility: str = setting("", "MSH-4.1 to match (empty: any).")
    encoding: str = setting(
        "cp1252", "Codec used when MSH-18 is empty or wrong (real feeds send cp1252/UTF-8 with MSH-18 empty).",
        _codec,
    )
    versions: tuple[str, ...] = setting(DEFAULT_VERSIONS, "Accepted MSH-12 versions; others get AR 203.")
    segment_terminators: str = setting(
        "auto",
        "'auto': CR, or LF when the message has no CR at all; 'cr': CR only (LF is data).",
        _one_of("auto", "cr"),
    )
    ref_reply: str = setting(
        "ack", "Reply to REF with a general ACK ('ack'); 'rri' is reserved for a minimal RRI.",
        _one_of("ack"),
    )
    link_fields: tuple[str, ...] = setting(
        (),
        "Extra HL7 paths (e.g. 'ZCH-3.1', 'PV1-19.1') that carry this sender's referral ID; matched like "
        "SCH-26/TXA-14 against referral IDs and aliases.",
        _hl7_paths,
    )
    timezone: str = setting(
        "UTC", "IANA zone for this sender's timestamps that carry no UTC offset.", _iana_zone
    )
    message_families: tuple[str, ...] = setting(
        ("REF", "RRI", "OMG", "ORM", "OSU", "SIU", "MDM", "ORU"),
        "Message types (MSH-9.1) whose referral effects are applied for this sender; others are only journaled.",
    )
    order_mode: str = setting(
        "auto",
        "'referral': OMG^O19/ORM^O01 orders and OSU^O51 status updates are referrals (360X style, ORC-2 is the "
        "referral ID); 'auto': only messages whose MSH-21 names the 360X profile; 'off': journal only.",
        _one_of("auto", "off", "referral"),
    )
    osu_states: tuple[str, ...] = setting(
        (),
        "This sender's own OSU^O51 codes, as 'ORC1/ORC5=STATE' (ORC5 may be '*'; STATE one of Accepted, "
        "Declined, CancelConfirmed, InterimCommunicated, Finalized); looked up before the built-in table.",
        _osu_states,
    )
    patient_id_authorities: tuple[str, ...] = setting(
        (),
        "Assigning authorities (CX-4) whose patient identifiers this sender shares with the referrers; only "
        "these link its messages to referrals (empty: every authority).",
    )
    patient_id_types: tuple[str, ...] = setting(
        DEFAULT_PATIENT_ID_TYPES,
        "Identifier types (CX-5) read from PID-3 (and PID-2/PID-4 in v2.3.x) as the patient's identifiers; "
        "\"\" is an identifier sent without a type.",
    )
    presume_attendance_hours: float = setting(
        0.0,
        "Feeds that never report completion: a booked appointment counts as attended this many hours after "
        "its start unless a no-show/cancel arrives (0 = off).",
        _not_negative,
    )
    note_final_rule: str = setting(
        "final_only",
        "'final_only': only authenticated/final notes close a referral; 'include_preliminary': any note does.",
        _one_of("final_only", "include_preliminary"),
    )
    duplicate_window_days: int = setting(
        30, "A second open referral for the same patient and specialty within this many days is flagged.",
        _at_least(0),
    )
    adopt_earlier_days: int = setting(
        30,
        "A new referral from this sender looks back this many days for its patient's appointments and notes "
        "that arrived before it without a referral ID, and links them like later ones (0 = off).",
        _at_least(0),
    )

    allowed_peers: tuple[str, ...] = setting(
        (),
        "Peer networks this sender may connect from (empty: any). A message claiming this sender from "
        "elsewhere gets AR and changes nothing.",
        _cidrs,
    )
    allowed_subjects: tuple[str, ...] = setting(
        (),
        "Client-certificate subject CNs this sender may present over mTLS (empty: any).",
    )

    def matches(self, app: str, facility: str) -> int:
        """Match strength: 3 both fields, 2 application, 1 facility, 0 no match (case-insensitive)."""
        a, f = self.sending_application.casefold(), self.sending_facility.casefold()
        if not a and not f:
            return 0
        if a and a != app.casefold():
            return 0
        if f and f != facility.casefold():
            return 0
        return 3 if (a and f) else 2 if a else 1


@dataclass(frozen=True)
class Settings:
    """Everything refloop needs, validated once; passed down, never global."""

    mllp: MllpSettings = field(default_factory=MllpSettings)
    http: HttpSettings = field(default_factory=HttpSettings)
    database: DatabaseSettings = field(default_factory=DatabaseSettings)
    log: LogSettings = field(default_factory=LogSettings)
    retention: RetentionSettings = field(default_factory=RetentionSettings)
    stall: WindowSettings = field(default_factory=WindowSettings)
    worklist: WorklistSettings = field(default_factory=WorklistSettings)
    notify: NotifySettings = field(default_factory=NotifySettings)
    profiles: tuple[SenderProfile, ...] = (SenderProfile(),)
    config_path: str = ""

    @property
    def default_profile(self) -> SenderProfile:
        for p in self.profiles:
            if p.name == "default":
                return p
        return SenderProfile()

    def profile_for(self, app: str, facility: str) -> SenderProfile:
        """The most specific profile for a sender, else ``default``."""
        best, strength = self.default_profile, 0
        for p in self.profiles:
            s = p.matches(app, facility)
            if s > strength:
                best, strength = p, s
        return best


#: The scalar sections, in the order the example config and docs/configuration.md list them.
SECTIONS: dict[str, type] = {
    "mllp": MllpSettings,
    "http": HttpSettings,
    "database": DatabaseSettings,
    "log": LogSettings,
    "retention": RetentionSettings,
    "stall": WindowSettings,
    "worklist": WorklistSettings,
    "notify": NotifySettings,
}

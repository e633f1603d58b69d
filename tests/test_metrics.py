"""/metrics after varied traffic: every label value is from a bounded allow-list, promtool is happy.

The allow-list is written out here on purpose (not imported from ``refloop.daemon.metrics``): a change
that lets an unbounded value into a label (a control ID, a peer address, a raw MSH-9, a patient name)
must fail this test, and a new bounded label must be added here by someone who checked it is bounded.
"""

from __future__ import annotations

import dataclasses
import math
import platform
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from refloop import __version__
from refloop.config import load_settings
from tests.samples import CANARY_MRN, CANARY_NAME, odd, siu
from tests.test_phi import check_traffic, drive_every_path, phi_hits
from tests.utils import MllpClient, make_settings, msa, require_tool, running_daemon

PROFILES_TOML = """
[profiles.engine]
sending_application = "ENGINE"

[profiles.lab]
sending_application = "LABSYS"

[profiles.sched-north]
sending_application = "SCHED"
sending_facility = "NORTH"
"""
PROFILE_NAMES = frozenset({"default", "engine", "lab", "sched-north"})

#: label name -> every value it may take. Sources: refloop/daemon/metrics.py (MESSAGE_TYPES, ACK_CODES,
#: frame outcomes), protocol.py (connection results and close reasons), daemon/tls.py (handshake
#: failure reasons), server.py/ingest.py (journal outcomes: store.models.Outcome plus the writer's
#: storage_failure / lost_broken_frame), server.py (scheduler job names).
ALLOWED: dict[str, frozenset[str]] = {
    "type": frozenset({"ACK", "ADT", "MDM", "OMG", "ORM", "ORU", "REF", "RRI", "SIU", "other"}),
    "sender": PROFILE_NAMES | {"unknown"},
    "code": frozenset({"AA", "AE", "AR", "CA", "CE", "CR"}),
    "outcome": frozenset({
        # refloop_frames_total
        "ok", "oversized", "bad_framing", "disconnect", "deadline", "lf_terminated",
        # refloop_journal_outcomes_total
        "processed", "ignored", "rejected", "error", "failed", "duplicate", "unparseable", "broken_frame",
        "oversize", "storage_failure", "lost_broken_frame",
        # refloop_notifications_total (delivery outcomes)
        "delivered", "dead", "suppressed",
    }),
    # refloop_referrals{status}: refloop.referral.Status
    "status": frozenset({"sent", "scheduled", "completed", "no_show", "closed", "cancelled", "declined", "expired"}),
    # refloop_alerts_open{stage,level}: refloop.stall stages, levels bucketed
    "stage": frozenset({"scheduling", "rebooking", "visit", "note"}),
    "level": frozenset({"1", "2", "3+"}),
    # refloop_notifications_total{channel}
    "channel": frozenset({"webhook", "email", "mllp", "patient"}),
    "result": frozenset({
        "accepted", "rejected_shutting_down", "rejected_max_connections", "rejected_max_per_ip",
        "rejected_not_allowed",
    }),
    "reason": frozenset({
        # refloop_connections_closed_total
        "shutdown", "idle_timeout", "deadline", "oversize",
        # refloop_tls_handshake_failures_total
        "plaintext", "no_certificate", "bad_certificate", "protocol_version", "timeout", "disconnect", "other",
    }),
    "version": frozenset({__version__}),
    # refloop_scheduler_last_success_timestamp_seconds: the names passed to Jobs.add() in server.py
    "task": frozenset({"retention_purge", "status", "stall_scan", "outbox_dispatch", "digest"}),
}


#: The standard prometheus-client collectors refloop registers (process_*, python_info, python_gc_*): their
#: label values come from the interpreter, never from traffic.
_PY = sys.version_info
STANDARD_ALLOWED: dict[str, frozenset[str]] = {
    "implementation": frozenset({platform.python_implementation()}),
    "major": frozenset({str(_PY.major)}), "minor": frozenset({str(_PY.minor)}),
    "patchlevel": frozenset({str(_PY.micro)}), "version": frozenset({platform.python_version()}),
    "generation": frozenset({"0", "1", "2"}),
}
STANDARD_PREFIXES = ("process_", "python_")


def _is_bucket_bound(value: str) -> bool:
    try:
        f = float(value)
    except ValueError:
        return False
    return f > 0 and (math.isfinite(f) or value == "+Inf")


@dataclasses.dataclass
class Scrape:
    text: str
    settings_profiles: frozenset[str]


@pytest.fixture(scope="module")
def scrape(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scrape]:
    """One daemon, every kind of traffic from several sender profiles, one /metrics scrape."""
    tmp = tmp_path_factory.mktemp("metrics")
    config = tmp / "refloop.toml"
    config.write_text(PROFILES_TOML)
    db_file = tmp / "refloop.db"
    base = make_settings(f"sqlite:///{db_file}", max_frame_bytes=4096, busy_timeout_ms=200,
                         max_connections_per_ip=4)
    settings = dataclasses.replace(base, profiles=load_settings(config, {}).profiles)
    with running_daemon(settings) as d:
        traffic = drive_every_path(
            d.port, d.http_port, unsupported="accept", db_file=db_file,
            senders=("ENGINE", "LABSYS", "SCHED", "UNKNOWNAPP"),
        )
        check_traffic(traffic, unsupported="accept", db=True)
        with MllpClient(d.port) as c:
            extra = [
                siu(app="SCHED", facility="NORTH"),  # the two-field profile
                odd(mtype="ZZZ", trigger="Z01", app="UNKNOWNAPP"),
                odd(mtype="ADT", trigger="A08", app="LABSYS"),
                odd(mtype="ACK", trigger="A01"),
                odd(mtype="siu", trigger="s12"),  # lower case: still SIU
                odd(mtype=CANARY_NAME.split("^")[0].upper(), trigger="Z01"),  # a PHI-looking MSH-9
                odd(mtype="X" * 40, trigger="Y" * 40, app=CANARY_MRN),  # long type, PHI-looking MSH-3
            ]
            codes = [msa(c.send(m))[0] for m in extra]
        assert set(codes) <= {"AA", "AE", "AR"}, codes
        # more connections from one address than max_connections_per_ip: one is refused and counted
        clients = [MllpClient(d.port) for _ in range(5)]
        try:
            assert clients[-1].closed_by_peer(), "the fifth connection from one IP should be refused"
        finally:
            for cl in clients:
                cl.close()
        status, text = d.get("/metrics")
        assert status == 200
        yield Scrape(text, frozenset(p.name for p in settings.profiles))


def test_profiles_loaded(scrape: Scrape) -> None:
    assert scrape.settings_profiles == PROFILE_NAMES


def test_every_label_value_is_bounded(scrape: Scrape) -> None:
    bad: list[str] = []
    seen: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(scrape.text):
        standard = family.name.startswith(STANDARD_PREFIXES)
        if not family.name.startswith("refloop_") and not standard:
            bad.append(f"family {family.name}: not in the refloop_ namespace")
        for sample in family.samples:
            for label, value in sample.labels.items():
                if standard:
                    if value not in STANDARD_ALLOWED.get(label, frozenset()):
                        bad.append(f"{sample.name}: {label}={value!r} is not a standard collector label")
                    continue
                seen.setdefault(label, set()).add(value)
                if label == "le" and family.type == "histogram":
                    if not _is_bucket_bound(value):
                        bad.append(f"{sample.name}: le={value!r} is not a bucket bound")
                elif label not in ALLOWED:
                    bad.append(f"{sample.name}: label {label!r} is not in the allow-list "
                               "(if it is bounded, add it to ALLOWED with every value it can take)")
                elif value not in ALLOWED[label]:
                    bad.append(f"{sample.name}: {label}={value!r} is not an allowed value")
                if phi_hits(value):
                    bad.append(f"{sample.name}: {label}={value!r} carries the PHI canary")
    assert not bad, "unbounded or unexpected labels:\n" + "\n".join(sorted(set(bad)))
    # the traffic really produced the label values this test is about (not vacuously clean)
    assert {"engine", "lab", "sched-north", "default"} <= seen["sender"], seen["sender"]
    assert {"SIU", "REF", "MDM", "ADT", "ACK", "other"} <= seen["type"], seen["type"]
    assert {"AA", "AR", "CA"} <= seen["code"], seen["code"]
    assert {"rejected", "duplicate", "unparseable", "broken_frame", "oversize", "storage_failure"} <= \
        seen["outcome"], seen["outcome"]
    assert "rejected_max_per_ip" in seen["result"], seen["result"]


def test_standard_collectors_and_no_created_series(scrape: Scrape) -> None:
    """process_* and python_* are exported (the docs and dashboards use them); *_created series are not."""
    families = {f.name: f for f in text_string_to_metric_families(scrape.text)}
    for name in ("process_cpu_seconds", "process_resident_memory_bytes", "process_open_fds",
                 "process_start_time_seconds", "python_info", "python_gc_collections"):
        assert name in families, f"{name} missing from /metrics"
    created = [ln for ln in scrape.text.splitlines() if "_created" in ln.split(" ")[0].split("{")[0]]
    assert not created, created[:5]


def test_no_phi_or_ids_in_scrape(scrape: Scrape) -> None:
    """Not in label values, not in HELP text, not as a metric name."""
    hits = [line for line in scrape.text.splitlines() if phi_hits(line)]
    assert not hits, hits[:10]
    assert "127.0.0.1" not in scrape.text  # no peer address anywhere


def test_promtool_check_metrics(scrape: Scrape, tmp_path: Path) -> None:
    """`promtool check metrics < scrape` prints nothing and exits 0 (classic text format)."""
    promtool = require_tool("promtool", "prometheus")
    path = tmp_path / "metrics.txt"
    path.write_text(scrape.text)
    with path.open("rb") as f:
        proc = subprocess.run([promtool, "check", "metrics"], stdin=f, capture_output=True, timeout=60,
                              check=False)
    out = (proc.stdout + proc.stderr).decode()
    assert proc.returncode == 0, out
    assert out == "", out


# -- values operators and alerts rely on ------------------------------------------------------------
def test_database_up_after_clean_start(sqlite_url: str) -> None:
    """Start-up opened the database and checked the schema, so the gauge must say up before any
    message arrives; otherwise RefloopDatabaseDown fires on every idle, healthy daemon."""
    with running_daemon(make_settings(sqlite_url)) as d:
        assert d.metric("refloop_database_up") == 1.0


def test_frames_ok_counts_complete_frames(sqlite_url: str) -> None:
    """refloop_frames_total{outcome="ok"} is pre-created and documented; it must count good frames."""
    with running_daemon(make_settings(sqlite_url)) as d:
        with MllpClient(d.port) as c:
            for _ in range(3):
                c.send(siu())
        ok = d.metric("refloop_frames_total", {"outcome": "ok"})
        lf = d.metric("refloop_frames_total", {"outcome": "lf_terminated"})
        assert ok + lf == 3.0, (ok, lf)

"""The shipped Prometheus alert rules and Grafana dashboard (systemd/prometheus/).

`promtool check rules` and `promtool test rules` run on the real files (skipped without promtool on a
laptop, a failure in CI: Debian package ``prometheus``). Every PromQL expression in the rules and the
dashboard may only read refloop's own metrics (``refloop_*``) or the scrape's ``up``, and every
refloop metric it reads must exist in refloop's registry (no exemptions: the TLS expiry gauge, exported
once a certificate is loaded, is created here the same way). Alert annotations may only template bounded
labels.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from refloop.daemon.metrics import Metrics
from tests.utils import require_tool

DIR = Path(__file__).resolve().parent.parent / "systemd" / "prometheus"
RULES = DIR / "refloop-rules.yml"
RULE_TESTS = DIR / "refloop-rules.test.yml"
DASHBOARD = DIR / "refloop-grafana.json"

#: Labels an alert annotation may template: bounded, never PHI or message IDs.
TEMPLATE_LABELS = frozenset({"instance", "job", "sender", "task", "code", "type", "outcome"})
REQUIRED_ALERTS = frozenset({
    "RefloopListenerDown", "RefloopDatabaseDown", "RefloopAckErrorRatioHigh", "RefloopDuplicatesSurge",
    "RefloopSenderSilent", "RefloopStorageFailures", "RefloopSchedulerStale", "RefloopOutboxDeadLetters",
    "RefloopTlsCertificateExpiring", "RefloopApplyLagHigh",
})


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, check=False, cwd=DIR)


# -- promtool ----------------------------------------------------------------------------------------
def test_promtool_check_rules() -> None:
    promtool = require_tool("promtool", "prometheus")
    proc = _run(promtool, "check", "rules", str(RULES))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    m = re.search(r"SUCCESS: (\d+) rules found", proc.stdout)
    assert m is not None, proc.stdout
    assert int(m.group(1)) == len(alert_blocks()), "the rule parser below missed a rule"


def test_promtool_test_rules() -> None:
    promtool = require_tool("promtool", "prometheus")
    proc = _run(promtool, "test", "rules", str(RULE_TESTS))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_rule_tests_cover_every_alert() -> None:
    tested = set(re.findall(r"alertname: (\w+)", RULE_TESTS.read_text()))
    assert {b["alert"] for b in alert_blocks()} <= tested


# -- PromQL: which metrics an expression reads --------------------------------------------------------
_KEYWORDS = frozenset({
    "and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left", "group_right",
    "inf", "nan", "Inf", "NaN",
})


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects: identifiers that are not functions, keywords, label names
    (in matchers or by/on clauses), durations, numbers or Grafana variables."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    s = re.sub(r"`[^`]*`|'(?:[^'\\]|\\.)*'", '""', s)
    s = re.sub(r"\{[^{}]*\}", " ", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)  # range and subquery selectors
    s = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    s = re.sub(r"\$\{[^}]*\}|\$\w+", " ", s)  # Grafana variables ($__rate_interval, ${job})
    names = set()
    for m in re.finditer(r"(?<![\w.:])([A-Za-z_:][\w:]*)(\s*\()?", s):
        name, call = m.group(1), m.group(2)
        if call or name in _KEYWORDS:
            continue
        names.add(name)
    return names


def test_metric_name_parser() -> None:
    assert metric_names('up{job="refloop"} == 0') == {"up"}
    assert metric_names(
        'sum by (job, instance) (rate(refloop_acks_total{code=~"AR|AE"}[10m])) / ignoring(code) '
        "sum(rate(refloop_acks_total[$__rate_interval])) > 0.05 and on () hour() >= 8"
    ) == {"refloop_acks_total"}
    assert metric_names("refloop_x - time() < 14 * 86400 offset 5m") == {"refloop_x"}
    assert metric_names("histogram_quantile(0.99, sum by (le) (rate(foo_bucket[5m])))") == {"foo_bucket"}
    assert metric_names("1e3 * nan") == set()


def _registry_names() -> set[str]:
    m = Metrics()
    m.certificate_expiry()  # exported once a TLS certificate is loaded
    names: set[str] = set()
    for fam in m.registry.collect():
        names.add(fam.name)
        names.update(s.name for s in fam.samples)
    # Labelled families with no child yet have no samples: name them by type convention.
    for fam in m.registry.collect():
        if fam.type == "counter":
            names.add(f"{fam.name}_total")
        elif fam.type == "histogram":
            names.update(f"{fam.name}{s}" for s in ("_bucket", "_sum", "_count"))
        elif fam.type == "info":
            names.add(f"{fam.name}_info")
    return names


def _check_exprs(where: str, exprs: list[str]) -> None:
    known = _registry_names()
    assert exprs, f"no expressions found in {where}"
    bad = []
    for expr in exprs:
        if not expr.strip():
            bad.append("an empty expression")
            continue
        names = metric_names(expr)
        if not names:
            bad.append(f"reads no metric: {expr}")
        for name in names:
            if name != "up" and not name.startswith("refloop_"):
                bad.append(f"{name}: not a refloop_ metric (or up): {expr}")
            elif name.startswith("refloop_") and name not in known:
                bad.append(f"{name}: refloop exports no such metric (typo or renamed?): {expr}")
    assert not bad, f"{where}:\n" + "\n".join(bad)


# -- rules file (no YAML library in the venv: the file's own simple layout is parsed) -------------------
def alert_blocks() -> list[dict[str, str]]:
    """Each ``- alert:`` block: its name, expr, for, severity and the raw annotation text."""
    blocks: list[dict[str, str]] = []
    lines = RULES.read_text().splitlines()
    starts = [i for i, ln in enumerate(lines) if re.match(r"^\s*- alert: \w+\s*$", ln)]
    for n, start in enumerate(starts):
        end = starts[n + 1] if n + 1 < len(starts) else len(lines)
        body = [ln for ln in lines[start + 1:end] if not ln.lstrip().startswith("#")]
        block = {"alert": lines[start].split(":", 1)[1].strip(), "text": "\n".join(body)}
        for i, ln in enumerate(body):
            m = re.match(r"^(\s*)(expr|for|severity|summary|description):\s*(.*)$", ln)
            if not m:
                continue
            indent, key, value = len(m.group(1)), m.group(2), m.group(3).strip()
            if value in ("|", ">-", ">", "|-"):
                cont = []
                for nxt in body[i + 1:]:
                    if nxt.strip() and len(nxt) - len(nxt.lstrip()) <= indent:
                        break
                    cont.append(nxt.strip())
                value = " ".join(c for c in cont if c)
            block[key] = value.strip('"')
        blocks.append(block)
    return blocks


def test_rules_shape() -> None:
    blocks = alert_blocks()
    assert {b["alert"] for b in blocks} >= REQUIRED_ALERTS
    for b in blocks:
        assert b.get("expr"), b["alert"]
        assert re.fullmatch(r"\d+[smh]", b.get("for", "")), f"{b['alert']}: needs a for: duration"
        assert b.get("severity") in ("critical", "warning", "info"), b["alert"]
        assert b.get("summary") and b.get("description"), f"{b['alert']}: needs summary and description"


def test_rules_read_only_refloop_metrics() -> None:
    _check_exprs(str(RULES), [b["expr"] for b in alert_blocks()])


def test_rule_annotations_template_only_bounded_labels() -> None:
    bad = []
    for b in alert_blocks():
        for tmpl in re.findall(r"\{\{(.*?)\}\}", b["text"]):
            for label in re.findall(r"\$labels\.(\w+)", tmpl):
                if label not in TEMPLATE_LABELS:
                    bad.append(f"{b['alert']}: $labels.{label}")
            if re.search(r"\$labels\b(?!\.)|\$externalLabels|query", tmpl):
                bad.append(f"{b['alert']}: {tmpl.strip()}")
    assert not bad, bad


def test_sender_silent_uses_business_hours_and_quiet_period() -> None:
    expr = next(b["expr"] for b in alert_blocks() if b["alert"] == "RefloopSenderSilent")
    assert "time() - refloop_last_message_timestamp_seconds" in expr
    assert "> 7200" in expr
    # the clinic's business hours, computed by the daemon in stall.timezone (not UTC hour()/day_of_week())
    assert "refloop_clinic_open" in expr and "hour()" not in expr


def test_business_hours_gauge_follows_the_clinics_zone() -> None:
    """refloop_clinic_open is 1 from 08:00 to 18:00 local on business days, DST and holidays included."""
    from datetime import UTC, date, datetime

    from refloop import stall

    ny = stall.Windows(zone="America/New_York", holidays=(date(2026, 11, 26),))
    assert stall.business_hours(ny, datetime(2026, 11, 2, 13, 0, tzinfo=UTC))  # Monday 08:00 EST
    assert not stall.business_hours(ny, datetime(2026, 11, 2, 12, 59, tzinfo=UTC))  # 07:59 EST
    assert stall.business_hours(ny, datetime(2026, 10, 30, 12, 0, tzinfo=UTC))  # Friday 08:00 EDT
    assert not stall.business_hours(ny, datetime(2026, 11, 26, 15, 0, tzinfo=UTC))  # Thanksgiving
    assert not stall.business_hours(ny, datetime(2026, 11, 1, 15, 0, tzinfo=UTC))  # Sunday


# -- Grafana dashboard ---------------------------------------------------------------------------------
def _panels(panels: list[dict[str, object]]) -> list[dict[str, object]]:
    out = []
    for p in panels:
        out.append(p)
        out.extend(_panels(p.get("panels", [])))  # type: ignore[arg-type]
    return out


def test_dashboard() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["schemaVersion"] >= 36
    assert [i["name"] for i in dash["__inputs"]] == ["DS_PROMETHEUS"]
    assert dash["__inputs"][0]["pluginId"] == "prometheus"
    panels = [p for p in _panels(dash["panels"]) if p.get("type") != "row"]
    exprs = []
    for p in panels:
        assert p["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:  # type: ignore[attr-defined]
            assert t["datasource"]["uid"] == "${DS_PROMETHEUS}", p["title"]
            assert t.get("expr", "").strip(), f"panel {p['title']!r} has an empty expr"
            exprs.append(t["expr"])
    _check_exprs(str(DASHBOARD), exprs)
    read = set().union(*(metric_names(e) for e in exprs))
    for wanted in (
        "refloop_messages_total", "refloop_acks_total", "refloop_ack_latency_seconds_bucket",
        "refloop_journal_commit_seconds_bucket", "refloop_connections_open", "refloop_frames_total",
        "refloop_duplicates_suppressed_total", "refloop_database_up", "refloop_last_message_timestamp_seconds",
        "refloop_referrals",
    ):
        assert wanted in read, f"no panel reads {wanted}"
    assert any(n.startswith("refloop_journal_batch_messages") for n in read)
    ids = [p["id"] for p in _panels(dash["panels"])]
    assert len(ids) == len(set(ids)), "panel ids must be unique"

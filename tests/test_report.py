"""The cohort report on a hand-computed fixture, on SQLite and PostgreSQL.

Referrals are written through the store (``get_or_create`` + journaled events + ``refresh``, the same
fold the handlers use) so every milestone is exact. The expected figures below were worked out by hand
from the table in :func:`fixture`; see each assertion's comment.
"""

from __future__ import annotations

import contextlib
import io
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import insert, select, text

from refloop.cli import main as cli_main
from refloop.config.windows import WindowSettings, windows_from_settings
from refloop.store import migrate, outbox
from refloop.store import referrals as repo
from refloop.store import report_queries as rq
from refloop.store import scan as stall_scan
from refloop.store.engine import make_engine
from refloop.store.models import Alert
from tests.utils import make_settings, running_daemon

NOW = datetime(2026, 6, 1, tzinfo=UTC)


def d(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def make(conn: Any, placer: str, patient: str, events: list[tuple[str, str, dict[str, Any]]]) -> int:
    """A referral from (kind, day, data) events, folded and projected like a handler would."""
    rid = repo.get_or_create(conn, placer, "CLINIC", NOW)
    repo.set_identity(conn, rid, patient_key=patient)
    for kind, day, data in events:
        subject = f"appt:SCHED^HEART|{data['appointment_id']}" if "appointment_id" in data else ""
        conn.execute(insert(repo.EVENTS).values(
            referral_id=rid, message_id=None, origin=repo.MANUAL, seq=0, kind=kind, occurred_at=d(day),
            control_id="", subject=subject, pending_key="", data=json.dumps(data)))
    repo.refresh(conn, rid, NOW, windows=windows_from_settings(WindowSettings()))
    return rid


def created(day: str) -> tuple[str, str, dict[str, Any]]:
    return ("referral_created", day, {"priority": "R", "referred_to": "Heartwell, Hana", "specialty": "CARD"})


def booked(day: str, appt: str, start: str) -> tuple[str, str, dict[str, Any]]:
    return ("appointment_booked", day, {"appointment_id": appt, "start": d(start).isoformat()})


def fixture(url: str) -> None:
    engine = make_engine(make_settings(url).database)
    migrate.upgrade(engine)
    with engine.begin() as conn:
        # A: accepted, booked day 4, seen day 19, note day 24 -> closed.
        make(conn, "A", "p1", [created("2026-01-01"), ("referral_answered", "2026-01-02", {"answer": "accepted"}),
                               booked("2026-01-05", "A1", "2026-01-20"),
                               ("appointment_completed", "2026-01-20", {"appointment_id": "A1"}),
                               ("note_received", "2026-01-25", {"document_id": "DA", "final": True})])
        # B: booked day 20 (late), no-show, rebooked, seen day 50, no note -> completed, seen_no_note leak.
        b = make(conn, "B", "p2", [created("2026-01-10"), booked("2026-01-30", "B1", "2026-02-10"),
                                   ("appointment_no_show", "2026-02-10", {"appointment_id": "B1"}),
                                   booked("2026-02-15", "B2", "2026-03-01"),
                                   ("appointment_completed", "2026-03-01", {"appointment_id": "B2"})])
        c = make(conn, "C", "p3", [created("2026-02-01")])  # never booked: never_scheduled, 120 days
        make(conn, "D", "p4", [created("2026-05-25")])  # 7 days old: in flight
        make(conn, "E", "p5", [created("2026-03-01"), ("referral_answered", "2026-03-03", {"answer": "declined"})])
        make(conn, "F", "p1", [created("2026-01-15"), ("referral_cancelled", "2026-01-20", {})])
        # G: booked, no-show 04-10, never rebooked: no_show_not_rebooked.
        make(conn, "G", "p6", [created("2026-04-01"), booked("2026-04-02", "G1", "2026-04-10"),
                               ("appointment_no_show", "2026-04-10", {"appointment_id": "G1"})])
        make(conn, "H", "p11", [created("2026-05-20"), booked("2026-05-21", "H1", "2026-06-10")])  # in flight
        # J: p2's second referral; a final note alone proves the visit and closes it (completed_at = note).
        make(conn, "J", "p2", [created("2026-02-01"), ("note_received", "2026-02-20", {"document_id": "DJ",
                                                                                         "final": True})])
        make(conn, "I", "p12", [created("2025-12-20")])  # before the cohort
        # CMS50 2025 edge cases.
        make(conn, "K", "p7", [created("2025-11-05"), ("note_received", "2025-11-20", {"document_id": "DK",
                                                                                         "final": True})])
        make(conn, "L", "p8", [created("2025-10-31T23:00:00"),
                               ("note_received", "2025-11-10", {"document_id": "DL", "final": True})])
        make(conn, "M", "p9", [created("2025-03-01"), ("note_received", "2025-02-20", {"document_id": "DM",
                                                                                         "final": True})])
        make(conn, "N", "p10", [created("2025-06-01"), ("note_received", "2026-01-10", {"document_id": "DN",
                                                                                          "final": True})])
        for rid in (b, c):  # both were on the worklist from 20 Feb; only B was then completed
            conn.execute(insert(Alert.__table__).values(referral_id=rid, stage="scheduling", level=1,
                                                        status="open", owner="", overdue_days=1.0,
                                                        raised_at=d("2026-02-20"), open_key=0))
        repo.mark(conn, (b, c), d("2026-02-20"))  # what raising an alert keeps on the referral row
    engine.dispose()


def report(url: str, **kw: Any) -> dict[str, Any]:
    engine = make_engine(make_settings(url).database)
    params = rq.default_params(NOW, start="2026-01-01", end="2026-06-01", **kw)
    with engine.connect() as conn:
        doc = rq.build_report(conn, params, windows_from_settings(WindowSettings()))
    engine.dispose()
    return doc


def rate(num: int, den: int) -> dict[str, Any]:
    return {"num": num, "den": den, "rate": round(num / den, 4) if den else None}


def test_report_figures(db_url: str) -> None:
    fixture(db_url)
    doc = report(db_url)
    assert set(doc) == {"cohort", "totals", "rates", "days", "groups", "leaks", "cms50"}
    t = doc["totals"]
    assert (t["sent"], t["accepted"], t["scheduled"], t["completed"], t["note_received"], t["closed"]) == \
        (9, 1, 4, 3, 2, 2)  # A..H + J; I is before the cohort
    assert (t["appointments"], t["no_shows"], t["in_flight"], t["leaks"]) == (5, 2, 2, 5)
    r = doc["rates"]
    assert r["accepted"] == rate(1, 9)
    assert r["scheduled"] == rate(4, 9)
    assert r["scheduled_in_window"] == rate(3, 8)  # A, G, H in 14 days; D still censored
    assert r["completed"] == rate(3, 9)
    assert r["completed_in_window"] == rate(2, 7)  # A (19 d), J (19 d); D and H censored, B took 50 d
    assert r["no_show"] == rate(2, 5)  # B1, G1 of A1, B1, B2, G1, H1
    assert r["rebooked_after_no_show"] == rate(1, 2)  # B yes, G no
    assert r["note_received"] == rate(2, 3)
    assert r["loop_closure"] == rate(2, 9)
    assert {k: r["recovered"][k] for k in ("num", "den", "count")} == {"num": 1, "den": 2, "count": 1}
    days = doc["days"]
    assert days["sent_to_scheduled"] == {"n": 4, "mean": 6.5, "median": 2.5, "p90": 20.0}
    assert days["sent_to_appointment"] == {"n": 3, "mean": 30.0, "median": 21.0, "p90": 50.0}
    assert days["appointment_to_note"] == {"n": 1, "mean": 5.0, "median": 5.0, "p90": 5.0}
    assert days["sent_to_closed"] == {"n": 2, "mean": 21.5, "median": 21.5, "p90": 24.0}
    leaks = {x["placer_id"]: (x["stage"], x["age_days"]) for x in doc["leaks"]}
    assert leaks == {"B": ("seen_no_note", 142.0), "C": ("never_scheduled", 120.0), "E": ("declined", 92.0),
                     "F": ("cancelled", 137.0), "G": ("no_show_not_rebooked", 61.0)}
    # CMS50 2026: first non-cancelled referral per patient: A (note after: yes), B (J closed but is second),
    # C, D, E, G, H -> 1 / 7.
    assert (doc["cms50"]["year"], doc["cms50"]["denominator"], doc["cms50"]["numerator"]) == (2026, 7, 1)


def test_cms50_edges(db_url: str) -> None:
    fixture(db_url)
    cms = report(db_url, year=2025)["cms50"]
    # K is after 31 October; L (31 Oct 23:00) counts; M's note predates the referral; N's note is in 2026.
    assert (cms["denominator"], cms["numerator"]) == (3, 1)


def test_groups_and_filters(sqlite_url: str) -> None:
    fixture(sqlite_url)
    doc = report(sqlite_url, by="month")
    months = {g["key"]: g["totals"]["sent"] for g in doc["groups"]}
    assert months == {"2026-01": 3, "2026-02": 2, "2026-03": 1, "2026-04": 1, "2026-05": 2}
    assert sum(g["totals"]["leaks"] for g in doc["groups"]) == doc["totals"]["leaks"]
    assert report(sqlite_url, filters={"priority": "U"})["totals"]["sent"] == 0


def test_cli_json_equals_api_json(sqlite_url: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    fixture(sqlite_url)
    monkeypatch.setenv("REFLOOP_DATABASE_URL", sqlite_url)
    query = {"from": "2026-01-01", "to": "2026-06-01", "by": "specialty", "now": NOW.isoformat()}
    with running_daemon(make_settings(sqlite_url)) as d:
        from urllib.parse import urlencode

        from tests.utils import wait_for

        # The daemon's start-up scan writes alerts (the report's "recovered" figure reads them): compare
        # CLI and API on the same database state, after that scan.
        assert wait_for(lambda: d.metric("refloop_scheduler_last_success_timestamp_seconds",
                                         {"task": "stall_scan"}) > 0, timeout=30)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = cli_main(["report", "--from", query["from"], "--to", query["to"], "--by", "specialty",
                             "--now", query["now"], "--format", "json"])
        assert code == 0
        cli_doc = json.loads(out.getvalue())
        status, api_doc = d.get("/api/report?" + urlencode(query))
    assert status == 200
    assert cli_doc == api_doc
    assert cli_doc["totals"]["sent"] == 9 and cli_doc["groups"][0]["key"] == "CARD"


# -- the worklist mark kept on write (first_marked_at) ---------------------------------------------------
def marked_at(engine: Any, rid: int) -> datetime | None:
    with engine.connect() as conn:
        return repo.aware(conn.execute(select(repo.REFERRALS.c.first_marked_at)
                                       .where(repo.REFERRALS.c.id == rid)).scalar_one())


def test_the_first_alert_or_reminder_marks_the_referral(db_url: str) -> None:
    """The scan's alert sets ``first_marked_at``; a later alert or reminder never moves it; an earlier
    reminder (outbox row) does; a notification naming no referral marks nothing."""
    engine = make_engine(make_settings(db_url).database)
    migrate.upgrade(engine)
    with engine.begin() as conn:
        rid = make(conn, "R1", "p1", [created("2026-05-01")])  # never booked: stalled by 1 June
        other = make(conn, "R2", "p2", [created("2026-05-31")])
    assert marked_at(engine, rid) is None
    settings = make_settings(db_url)
    stall_scan.run_scan(engine, settings, NOW)
    assert marked_at(engine, rid) == NOW and marked_at(engine, other) is None
    stall_scan.run_scan(engine, settings, NOW + timedelta(days=10))  # escalations: not a new mark
    with engine.begin() as conn:
        outbox.enqueue(conn, key="late", channel="webhook", event="x", now=NOW + timedelta(days=3), payload={},
                       referral_id=rid)
        outbox.enqueue(conn, key="anon", channel="webhook", event="x", now=d("2026-05-02"), payload={})
    assert marked_at(engine, rid) == NOW
    with engine.begin() as conn:
        outbox.enqueue(conn, key="early", channel="webhook", event="x", now=d("2026-05-20"), payload={},
                       referral_id=rid)
        outbox.enqueue(conn, key="early", channel="webhook", event="x", now=d("2026-05-10"), payload={},
                       referral_id=rid)  # the same key again: not enqueued, so no mark either
    assert marked_at(engine, rid) == d("2026-05-20")
    assert marked_at(engine, other) is None
    engine.dispose()


def test_migration_backfills_the_first_mark(sqlite_url: str) -> None:
    """Migration 0015 sets ``first_marked_at`` from the alerts and outbox rows already stored (the earliest)."""
    engine = make_engine(make_settings(sqlite_url).database)
    migrate.upgrade(engine, "0014")
    with engine.begin() as conn:
        for rid in (1, 2, 3):
            conn.execute(text("INSERT INTO referrals (id, placer_id, authority, status, priority, referred_to, "
                              "referred_to_id, referring_provider, specialty, patient_key, flags, no_show_count, "
                              "clock_stage, leak_stage, clock_version) VALUES (:id, :p, '', 'sent', '', '', '', "
                              "'', '', '', '', 0, '', '', '')"), {"id": rid, "p": f"B{rid}"})
        conn.execute(insert(Alert.__table__), [
            {"referral_id": 1, "stage": "scheduling", "level": 1, "status": "open", "owner": "", "overdue_days": 0.0,
             "raised_at": d("2026-03-05"), "last_action": "raised", "open_key": 0},
            {"referral_id": 1, "stage": "visit", "level": 1, "status": "resolved", "owner": "", "overdue_days": 0.0,
             "raised_at": d("2026-03-01"), "last_action": "raised", "open_key": 7}])
        conn.execute(insert(outbox.OUTBOX), [
            {"idempotency_key": k, "channel": "webhook", "target": "", "event": "x", "referral_id": rid,
             "alert_id": None, "payload": "{}", "status": "pending", "attempts": 0, "next_attempt_at": at,
             "last_error": "", "created_at": at}
            for k, rid, at in (("a", 1, d("2026-03-03")), ("b", 2, d("2026-04-01")), ("c", None, d("2026-01-01")))])
    migrate.upgrade(engine)
    assert [marked_at(engine, rid) for rid in (1, 2, 3)] == [d("2026-03-01"), d("2026-04-01"), None]
    engine.dispose()


def test_ranks_read_by_offset_are_the_sorted_values(db_url: str) -> None:
    """Medians and p90 read by ORDER BY/OFFSET pairs from either end equal the nearest-rank values of the
    sorted series, for every count from 0 to 23, with ties, NULLs and rows outside the cohort beside them."""
    import random

    from refloop import report as rp

    engine = make_engine(make_settings(db_url).database)
    migrate.upgrade(engine)
    rng = random.Random(11)
    params = rq.default_params(NOW, start="2026-01-01", end="2026-06-01")
    for n in range(24):
        values = [rng.choice((0, 3600, 86400)) if rng.random() < 0.3 else rng.randrange(0, 90 * 86400)
                  for _ in range(n)]
        with engine.begin() as conn:
            conn.execute(repo.REFERRALS.delete())
            rows = [{"placer_id": f"V{i}", "sent_at": d("2026-02-01"), "sent_to_closed_s": v}
                    for i, v in enumerate(values)]
            rows += [{"placer_id": "OUT", "sent_at": d("2025-02-01"), "sent_to_closed_s": 1},
                     {"placer_id": "NULL", "sent_at": d("2026-02-01"), "sent_to_closed_s": None}]
            # the bits as the fold keeps them (``has_sent_to_closed``): the count comes from the aggregate pass
            conn.execute(insert(repo.REFERRALS), [{**r, "report_bits": rp.report_bits(r)} for r in rows])
        data = sorted(values)
        expected = rp.figures(n, sum(data), {k: data[k - 1] for k in range(1, n + 1)}, 86400)
        with engine.connect() as conn:
            for wide in (False, True) if conn.dialect.name == "sqlite" else (False,):  # +sent_at: SQLite only
                got = rq.day_figures(conn, params, wide)[""]["sent_to_closed"]
                assert got == expected, (n, wide, values)
    engine.dispose()


def test_migration_backfills_the_report_columns(db_url: str) -> None:
    """Migration 0016's SQL gives every referral of the hand-computed fixture (appointments, a rebooked and
    an unrebooked no-show, a cancellation, a closed loop) the appointment counts and report bits the fold
    keeps on write; and the bits are not all alike, so the comparison can fail."""
    from alembic import command

    fixture(db_url)
    engine = make_engine(make_settings(db_url).database)
    cols = ("appointment_count", "no_show_appointments", "report_bits", "cms50_first")

    def stored() -> dict[str, tuple[int, ...]]:
        with engine.connect() as conn:
            return {r.placer_id: tuple(int(r[i + 1]) for i in range(len(cols))) for r in conn.execute(
                select(repo.REFERRALS.c.placer_id, *(repo.REFERRALS.c[c] for c in cols)))}

    folded = stored()
    assert len({v[2] for v in folded.values()}) >= 4 and any(v[1] for v in folded.values())
    assert 0 < sum(v[3] for v in folded.values()) < len(folded)
    cfg = migrate.alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0015")
    migrate.upgrade(engine)
    assert stored() == folded
    engine.dispose()


#: Sent instants that sit on the rule's edges: New Year, the 31 October / 1 November cutoff (UTC), a tie.
_CMS50_SENT = st.sampled_from([
    datetime(2025, 12, 31, 23, 59, tzinfo=UTC), datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 3, 1, tzinfo=UTC),
    datetime(2026, 3, 1, tzinfo=UTC), datetime(2026, 10, 31, 23, 59, 59, 999999, tzinfo=UTC),
    datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 12, 30, tzinfo=UTC), datetime(2027, 2, 1, tzinfo=UTC), None])


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.tuples(st.sampled_from(["p1", "p2"]), _CMS50_SENT,
                               st.sampled_from(["sent", "scheduled", "cancelled", "closed"]), st.booleans()),
                     max_size=12))
def test_cms50_refresh_marks_what_the_rule_says(db_url: str, rows: list[Any]) -> None:
    """Whatever the rows and whatever they were marked before, :func:`refloop.store.cms50.refresh` leaves
    exactly :func:`refloop.report.cms50_firsts` of each patient marked (by year probes and SQL, without
    reading the patient's referrals into Python)."""
    from refloop import report as rp
    from refloop.store import cms50

    engine = make_engine(make_settings(db_url).database)
    migrate.upgrade(engine)
    with engine.begin() as conn:
        conn.execute(repo.REFERRALS.delete())
        if rows:
            conn.execute(insert(repo.REFERRALS), [
                {"placer_id": f"C{i}", "patient_key": key, "sent_at": sent, "status": status,
                 "cms50_first": int(marked)} for i, (key, sent, status, marked) in enumerate(rows)])
        cms50.refresh(conn, ["p1", "p2"])
        found = conn.execute(select(repo.REFERRALS.c.id, repo.REFERRALS.c.patient_key, repo.REFERRALS.c.sent_at,
                                    repo.REFERRALS.c.status, repo.REFERRALS.c.cms50_first)).all()
    engine.dispose()
    expected = set().union(*(rp.cms50_firsts((r.id, repo.aware(r.sent_at), r.status) for r in found
                                             if r.patient_key == key) for key in ("p1", "p2")))
    assert {r.id for r in found if r.cms50_first} == expected


def test_first_cms50_candidates_are_kept_on_write(db_url: str) -> None:
    """``cms50_first`` marks each patient's first candidate of each year, whatever order the facts arrive
    in: a later referral first, then an earlier one; the earlier one cancelled; a referral moved to another
    patient; one sent in November (no candidate) and one the next year. After each step the marks equal
    the rule evaluated over the whole table."""
    from refloop import report as rp

    engine = make_engine(make_settings(db_url).database)
    migrate.upgrade(engine)

    def marks() -> set[str]:
        with engine.connect() as conn:
            rows = conn.execute(select(repo.REFERRALS.c.id, repo.REFERRALS.c.placer_id, repo.REFERRALS.c.patient_key,
                                       repo.REFERRALS.c.sent_at, repo.REFERRALS.c.status,
                                       repo.REFERRALS.c.cms50_first)).all()
        names = {r.id: r.placer_id for r in rows}
        expected: set[str] = set()
        for key in {r.patient_key for r in rows if r.patient_key}:
            expected |= {names[i] for i in rp.cms50_firsts((r.id, repo.aware(r.sent_at), r.status)
                                                           for r in rows if r.patient_key == key)}
        stored = {r.placer_id for r in rows if r.cms50_first}
        assert stored == expected
        return stored

    with engine.begin() as conn:
        make(conn, "LATE", "p1", [created("2026-05-01")])
        make(conn, "NOV", "p1", [created("2026-11-03")])
        make(conn, "NEXT", "p1", [created("2027-02-01")])
    assert marks() == {"LATE", "NEXT"}
    with engine.begin() as conn:
        early = make(conn, "EARLY", "p1", [created("2026-03-01")])
    assert marks() == {"EARLY", "NEXT"}
    with engine.begin() as conn:
        conn.execute(insert(repo.EVENTS).values(
            referral_id=early, message_id=None, origin=repo.MANUAL, seq=0, kind="referral_cancelled",
            occurred_at=d("2026-03-02"), control_id="", subject="", pending_key="", data="{}"))
        repo.refresh(conn, early, NOW, windows=windows_from_settings(WindowSettings()))
    assert marks() == {"LATE", "NEXT"}
    with engine.begin() as conn:
        late = conn.execute(select(repo.REFERRALS.c.id).where(repo.REFERRALS.c.placer_id == "LATE")).scalar_one()
        repo.set_identity(conn, late, patient_key="p2")  # it was another patient's referral after all
    assert marks() == {"LATE", "NEXT"}  # LATE is now p2's first; p1 has no 2026 candidate left
    with engine.begin() as conn:
        make(conn, "P2EARLIER", "p2", [created("2026-04-01")])
    assert marks() == {"P2EARLIER", "NEXT"}
    engine.dispose()


def test_dashboard_trend_and_histogram_equal_the_rows(db_url: str) -> None:
    """The dashboard's monthly trend and days-to-close bins, read as index range counts, equal what the
    cohort's rows say when counted one by one (months with no referral left out; a value on a bin edge
    goes to the upper bin; the last bin takes the longest)."""
    import math
    import random

    fixture(db_url)
    engine = make_engine(make_settings(db_url).database)
    rng = random.Random(5)
    with engine.begin() as conn:
        conn.execute(insert(repo.REFERRALS), [
            {"placer_id": f"H{i}", "sent_at": d("2026-01-03") + timedelta(days=rng.randrange(0, 140)),
             "status": "closed" if i % 3 else "sent",
             "sent_to_closed_s": None if i % 3 == 0 else rng.choice((0, 86400 * 7, 86400 * 14)) if i % 5 == 0
             else rng.randrange(0, 86400 * 60)} for i in range(60)])
    params = rq.default_params(NOW, start="2026-01-01", end="2026-06-01")
    with engine.connect() as conn:
        rows = conn.execute(select(repo.REFERRALS.c.sent_at, repo.REFERRALS.c.status,
                                   repo.REFERRALS.c.sent_to_closed_s)).all()
        cohort = [r for r in rows if r.sent_at is not None and params.start <= repo.aware(r.sent_at) < params.end]
        months: dict[str, list[int]] = {}
        for r in cohort:
            m = months.setdefault(f"{repo.aware(r.sent_at):%Y-%m}", [0, 0])
            m[0] += 1
            m[1] += r.status == "closed"
        assert rq.monthly(conn, params) == [(k, a, b) for k, (a, b) in sorted(months.items())]
        days = [r.sent_to_closed_s / 86400 for r in cohort if r.sent_to_closed_s is not None]
        width = math.ceil(max(max(days), 1.0) / 10) or 1
        bins = [0] * 10
        for v in days:
            bins[min(int(max(v, 0) // width), 9)] += 1
        assert rq.close_bins(conn, params) == (width, bins) and sum(bins) > 30 and len(months) >= 5
    engine.dispose()

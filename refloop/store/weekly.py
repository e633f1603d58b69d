"""The weekly review: what happened this week beside last week, by owner and by specialty.

A coordinator's week is activity, not a cohort: "scheduled this week" means referrals whose first booking
(``scheduled_at``) fell in the week, whenever they were sent. So the figures count milestones of the
``referrals`` projection inside ``[start, end)``:

* **sent** ``sent_at``, **scheduled** ``scheduled_at`` (first booking), **completed** ``completed_at``,
  **closed** ``closed_at`` of a referral whose status is ``closed`` (the report's loop closure);
* **recovered**: completed this week at or after the referral was first on the worklist or reminded, by the
  report's own rule (:func:`refloop.store.report_queries.recovered`);
* **new leaks**: referrals that are leaks at the end of the week and were not at its start, by the report's
  own leak rule (:func:`refloop.store.report_queries.leaks`), so the rule lives in one place.

Because each milestone happens once, these weekly counts add up over consecutive weeks to the report's
totals for the same span (``tests/test_workspace.py`` checks it). Each referral is attributed to the owner of
its latest alert, else to the owner the ``[worklist]`` rules give it.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace
from datetime import datetime, time, timedelta
from typing import Any, Final
from zoneinfo import ZoneInfo

from sqlalchemy import Connection, and_, func, or_, select

from refloop.config import Settings
from refloop.config.windows import windows_from_settings
from refloop.notify import policy
from refloop.store import alerts
from refloop.store import report_queries as rq
from refloop.store.referrals import utc

R, A = alerts.REFERRALS, alerts.ALERTS
FIGURES: Final = ("sent", "scheduled", "completed", "closed", "recovered", "new_leaks")
_CHUNK: Final = 500


def week_start(moment: datetime, zone: ZoneInfo) -> datetime:
    """Monday 00:00 in the clinic's zone of the week holding *moment*, as an aware datetime."""
    local = moment.astimezone(zone)
    monday = local.date() - timedelta(days=local.weekday())
    return datetime.combine(monday, time(), zone)


def _activity(conn: Connection, start: datetime, end: datetime) -> list[Any]:
    """Referrals with any counted milestone in [start, end), with the milestones and whether recovered."""
    lo, hi = utc(start), utc(end)

    def inside(col: Any) -> Any:
        return and_(col >= lo, col < hi)

    stmt = select(R.c.id, R.c.authority, R.c.referred_to, R.c.referred_to_id, R.c.specialty, R.c.status,
                  R.c.sent_at, R.c.scheduled_at, R.c.completed_at, R.c.closed_at,
                  rq.recovered().label("marked")).where(
        or_(inside(R.c.sent_at), inside(R.c.scheduled_at), inside(R.c.completed_at), inside(R.c.closed_at)))
    return list(conn.execute(stmt))


def _owners(conn: Connection, settings: Settings, rows: list[Any]) -> dict[int, str]:
    """The owner of each referral's latest alert, else the configured owner rule's."""
    ids = sorted({int(r.id) for r in rows})
    latest: dict[int, str] = {}
    for start in range(0, len(ids), _CHUNK):
        chunk = ids[start:start + _CHUNK]
        top = select(A.c.referral_id, func.max(A.c.id).label("aid")).where(
            A.c.referral_id.in_(chunk)).group_by(A.c.referral_id).subquery()
        for rid, owner in conn.execute(select(top.c.referral_id, A.c.owner).join(A, A.c.id == top.c.aid)):
            latest[int(rid)] = owner
    return {int(r.id): latest.get(int(r.id)) or policy.owner_for(settings.worklist, policy.Parties.of(r))
            for r in rows}


def new_leaks(conn: Connection, settings: Settings, start: datetime, end: datetime) -> list[dict[str, Any]]:
    """Referrals that are leaks at *end* and were not at *start*, by the report's own rule
    (:func:`refloop.store.report_queries.leaks`: the stored leak stage and instant of the stage clock)
    applied at both instants.

    A referral sent after *start* was no leak then. A cancelled or declined referral is a leak by its
    current status, so one sent before the week and answered during it was already a leak "at the start"
    and is not new (the projection keeps no time for those answers)."""
    first = conn.execute(select(func.min(R.c.sent_at))).scalar()
    if first is None:
        return []
    windows = windows_from_settings(settings.stall)
    lo, hi = utc(start), utc(end)
    assert lo is not None and hi is not None
    cohort = rq.ReportParams(start=rq.parse_day(str(first)[:10]), end=hi, now=hi, leak_limit=10_000_000)
    before = {x["referral_id"] for x in rq.leaks(conn, replace(cohort, end=lo, now=lo), windows)} \
        if lo > cohort.start else set()
    return [x for x in rq.leaks(conn, cohort, windows) if x["referral_id"] not in before]


def figures(conn: Connection, settings: Settings, start: datetime, end: datetime) -> dict[str, Any]:
    """One week's figures: totals, by owner and by specialty (each a ``{figure: count}``)."""
    rows = _activity(conn, start, end)
    leaked = new_leaks(conn, settings, start, end)
    lo, hi = utc(start), utc(end)
    assert lo is not None and hi is not None

    def inside(value: Any) -> bool:
        moment = utc(value if not isinstance(value, str) else datetime.fromisoformat(value))
        return moment is not None and lo <= moment < hi

    leak_rows = list(conn.execute(select(R.c.id, R.c.authority, R.c.referred_to, R.c.referred_to_id, R.c.specialty)
                                  .where(R.c.id.in_([int(x["referral_id"]) for x in leaked[:_CHUNK * 20]])))) \
        if leaked else []
    owners = _owners(conn, settings, rows + leak_rows)
    total: dict[str, int] = dict.fromkeys(FIGURES, 0)
    by_owner: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(FIGURES, 0))
    by_specialty: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(FIGURES, 0))

    def add(rid: int, specialty: str, figure: str) -> None:
        total[figure] += 1
        by_owner[owners.get(rid, "")][figure] += 1
        by_specialty[specialty or ""][figure] += 1

    for r in rows:
        for figure, value in (("sent", r.sent_at), ("scheduled", r.scheduled_at), ("completed", r.completed_at)):
            if inside(value):
                add(int(r.id), r.specialty, figure)
        if r.status == "closed" and inside(r.closed_at):
            add(int(r.id), r.specialty, "closed")
        if r.marked and inside(r.completed_at):
            add(int(r.id), r.specialty, "recovered")
    specialty_of = {int(r.id): r.specialty or "" for r in leak_rows}
    for x in leaked:
        rid = int(x["referral_id"])
        add(rid, specialty_of.get(rid, x.get("specialty", "") or ""), "new_leaks")
    return {"from": start.isoformat(), "to": end.isoformat(), "totals": total,
            "by_owner": dict(sorted(by_owner.items())), "by_specialty": dict(sorted(by_specialty.items())),
            "new_leaks": leaked}


def review(conn: Connection, settings: Settings, now: datetime, zone: ZoneInfo, *, weeks_back: int = 0
           ) -> dict[str, Any]:
    """This week (the one holding *now*, or *weeks_back* before it) and the week before, side by side."""
    this_start = week_start(now, zone) - timedelta(weeks=weeks_back)
    this_end = this_start + timedelta(days=7)
    last_start = this_start - timedelta(days=7)
    # calendar weeks in the zone: DST changes make a week 167 or 169 hours, so step by local dates
    this_start, this_end, last_start = (datetime.combine(d.date(), time(), zone)
                                        for d in (this_start, this_end, last_start))
    this = figures(conn, settings, this_start, min(this_end, max(now, this_start + timedelta(seconds=1)))
                   if weeks_back == 0 else this_end)
    last = figures(conn, settings, last_start, this_start)
    return {"this_week": this, "last_week": last, "week_end": this_end.isoformat(), "figures": list(FIGURES)}

"""SQL for the cohort report (:mod:`refloop.report` holds the definitions and the pure arithmetic).

Why it looks like this: the report must stay fast on a million referrals, so every count is one
``GROUP BY`` with conditional sums over the projection table, the no-show figures one join with the
appointment events, and the CMS50 figure one window-function query. Only three things are streamed: the
day differences (computed in SQL as plain numbers, because medians and p90 need every value), the
unclosed referrals (the leak rules need per-row windows, business days and the latest no-show), and
nothing else. Indexes for these queries are declared at the end of ``models.py`` (migration 0005).
Nothing here logs: rows carry patient hashes.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from sqlalchemy import (
    Connection,
    DateTime,
    MetaData,
    Table,
    and_,
    case,
    func,
    inspect,
    literal,
    literal_column,
    or_,
    select,
    union_all,
)
from sqlalchemy.sql.elements import ColumnElement

from refloop import report as rp
from refloop import stall
from refloop.stall import Windows
from refloop.store.models import Referral, ReferralEvent
from refloop.store.referrals import aware

R = Referral.__table__
E = ReferralEvent.__table__

#: Tables another feature adds that mark a referral as "was on the worklist" (alerts) or "got a reminder"
#: (outbox notifications), with the column that says when. Reflected, so the report works without them.
WORKLIST_TABLES = (("alerts", "raised_at"), ("outbox", "created_at"))

@dataclass(frozen=True)
class ReportParams:
    """What the CLI and the API both accept, so that both produce the same numbers."""

    start: datetime
    end: datetime
    now: datetime
    by: str | None = None
    filters: Mapping[str, str] = field(default_factory=dict)
    cms50_year: int | None = None
    leak_limit: int = 1000

    def __post_init__(self) -> None:
        if self.by is not None and self.by not in rp.GROUP_FIELDS:
            raise ValueError(f"by must be one of {', '.join(rp.GROUP_FIELDS)}")
        unknown = set(self.filters) - set(rp.FILTER_FIELDS)
        if unknown:
            raise ValueError(f"unknown filter(s): {', '.join(sorted(unknown))}")
        if self.end <= self.start:
            raise ValueError("'to' must be after 'from'")


def parse_day(text: str) -> datetime:
    """``YYYY-MM-DD`` (or a full ISO time) as an aware UTC instant; dates mean 00:00 UTC."""
    text = text.strip()
    if len(text) == 10:
        return datetime.combine(date.fromisoformat(text), time(), UTC)
    moment = datetime.fromisoformat(text)
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).astimezone(UTC)


def default_params(now: datetime, *, start: str | None = None, end: str | None = None, by: str | None = None,
                   filters: Mapping[str, str] | None = None, year: int | None = None) -> ReportParams:
    """The default cohort is the 365 days up to and including today (UTC)."""
    stop = parse_day(end) if end else datetime.combine(now.astimezone(UTC).date() + timedelta(days=1), time(), UTC)
    begin = parse_day(start) if start else stop - timedelta(days=365)
    return ReportParams(begin, stop, now, by or None, {k: v for k, v in (filters or {}).items() if v}, year)


# -- SQL helpers ------------------------------------------------------------------------------------
def _days(conn: Connection, later: Any, earlier: Any) -> ColumnElement[Any]:
    """``later - earlier`` in (fractional) days, as a number the database computes."""
    if conn.dialect.name == "sqlite":
        return func.julianday(later) - func.julianday(earlier)
    return func.extract("epoch", later - earlier) / 86400.0


def _window_expr(windows: Windows, stage: str) -> ColumnElement[Any]:
    """The per-referral window in SQL, with :meth:`Windows.window_days`'s precedence (calendar days)."""
    whens: list[tuple[ColumnElement[bool], float]] = []
    for column in (R.c.referred_to, R.c.specialty):
        for (name, st), days in sorted(windows.target_days.items()):
            if st == stage:
                whens.append((func.lower(func.trim(column)) == name, days))
    prio = func.lower(func.trim(R.c.priority))
    for (klass, st), days in sorted(windows.priority_days.items()):
        if st == stage:
            codes = sorted(c for c, k in stall.PRIORITY_CODES.items() if k == klass)
            whens.append((prio.in_(codes), days))
    default = windows.stage_days[stage]
    return case(*whens, else_=literal(default)) if whens else literal(default)


def _group_expr(conn: Connection, by: str | None) -> ColumnElement[Any]:
    if by is None:
        return literal_column("''")
    if by == "month":
        if conn.dialect.name == "sqlite":
            return func.strftime("%Y-%m", R.c.sent_at)
        return func.to_char(func.timezone("UTC", R.c.sent_at), "YYYY-MM")
    return getattr(R.c, by)


def _cohort(params: ReportParams) -> ColumnElement[bool]:
    conds = [R.c.sent_at.is_not(None), R.c.sent_at >= params.start, R.c.sent_at < params.end]
    conds += [getattr(R.c, name) == value for name, value in sorted(params.filters.items())]
    return and_(*conds)


def _grouped(stmt: Any, g: ColumnElement[Any], by: str | None) -> Any:
    """GROUP BY the group key, or not at all for the totals (PostgreSQL rejects GROUP BY a constant)."""
    return stmt.group_by(g) if by else stmt


def _count(cond: ColumnElement[bool]) -> ColumnElement[Any]:
    return func.coalesce(func.sum(case((cond, 1), else_=0)), 0)


# -- queries ---------------------------------------------------------------------------------------
def counts(conn: Connection, params: ReportParams, windows: Windows) -> dict[str, dict[str, int]]:
    """The conditional sums of :data:`refloop.report.COUNT_COLUMNS` per group (one GROUP BY)."""
    now = literal(params.now, DateTime(timezone=True))
    sched_w, visit_w = _window_expr(windows, stall.SCHEDULING), _window_expr(windows, stall.VISIT)
    sched_in = and_(R.c.scheduled_at.is_not(None), _days(conn, R.c.scheduled_at, R.c.sent_at) <= sched_w)
    visit_in = and_(R.c.completed_at.is_not(None), _days(conn, R.c.completed_at, R.c.sent_at) <= visit_w)
    g = _group_expr(conn, params.by).label("g")
    cols = {
        "sent": func.count(),
        "accepted": _count(R.c.accepted_at.is_not(None)),
        "scheduled": _count(R.c.scheduled_at.is_not(None)),
        "completed": _count(R.c.completed_at.is_not(None)),
        "closed": _count(R.c.status == "closed"),
        "note_of_completed": _count(and_(R.c.completed_at.is_not(None), R.c.note_received_at.is_not(None))),
        "scheduled_in_window": _count(sched_in),
        "scheduling_mature": _count(or_(sched_in, _days(conn, now, R.c.sent_at) >= sched_w)),
        "completed_in_window": _count(visit_in),
        "visit_mature": _count(or_(visit_in, _days(conn, now, R.c.sent_at) >= visit_w)),
    }
    stmt = _grouped(select(g, *(c.label(n) for n, c in cols.items())).where(_cohort(params)), g, params.by)
    return {str(row.g or ""): {n: int(getattr(row, n)) for n in cols} for row in conn.execute(stmt)}


def event_counts(conn: Connection, params: ReportParams) -> dict[str, dict[str, int]]:
    """No-show figures per group from the appointment events of cohort referrals (one join)."""
    g = _group_expr(conn, params.by).label("g")
    no_show = E.c.kind == "appointment_no_show"
    rebooked = and_(no_show, R.c.status.in_(("scheduled", "completed", "closed")))
    stmt = (
        select(
            g,
            func.count(func.distinct(E.c.subject)).label("appointments"),
            func.count(func.distinct(case((no_show, E.c.subject)))).label("no_show_appointments"),
            func.count(func.distinct(case((no_show, R.c.id)))).label("no_show_referrals"),
            func.count(func.distinct(case((rebooked, R.c.id)))).label("rebooked_after_no_show"),
        )
        .select_from(R.join(E, E.c.referral_id == R.c.id))
        .where(_cohort(params), E.c.subject.like("appt:%"))
    )
    stmt = _grouped(stmt, g, params.by)
    return {str(row.g or ""): {n: int(getattr(row, n)) for n in rp.EVENT_COLUMNS} for row in conn.execute(stmt)}


def day_values(conn: Connection, params: ReportParams) -> dict[str, dict[str, list[float]]]:
    """Every non-null day difference per group, streamed as numbers (medians need all of them)."""
    g = _group_expr(conn, params.by).label("g")
    exprs = {
        "sent_to_scheduled": _days(conn, R.c.scheduled_at, R.c.sent_at),
        "sent_to_appointment": _days(conn, R.c.appointment_at, R.c.sent_at),
        "appointment_to_note": _days(conn, R.c.note_received_at, R.c.appointment_at),
        "sent_to_closed": _days(conn, R.c.closed_at, R.c.sent_at),
    }
    stmt = select(g, *(e.label(n) for n, e in exprs.items())).where(
        _cohort(params), or_(R.c.scheduled_at.is_not(None), R.c.closed_at.is_not(None)))
    out: dict[str, dict[str, list[float]]] = defaultdict(lambda: {n: [] for n in exprs})
    for row in conn.execution_options(yield_per=20_000).execute(stmt):
        bucket = out[str(row.g or "")]
        for n in exprs:
            value = getattr(row, n)
            if value is not None:
                bucket[n].append(float(value))
    return dict(out)


def open_rows(conn: Connection, params: ReportParams) -> Iterator[rp.OpenRow]:
    """Unclosed cohort referrals with what the leak rules need, streamed."""
    last_no_show = (
        select(func.max(E.c.occurred_at))
        .where(E.c.referral_id == R.c.id, E.c.kind == "appointment_no_show")
        .scalar_subquery()
    )
    g = _group_expr(conn, params.by).label("g")
    stmt = (
        select(R.c.id, R.c.placer_id, R.c.status, R.c.priority, R.c.referred_to, R.c.specialty, R.c.sent_at,
               R.c.completed_at, case((R.c.status == "no_show", last_no_show)).label("last_no_show"), g)
        .where(_cohort(params), R.c.status != "closed")
        .order_by(R.c.sent_at, R.c.id)
    )
    for row in conn.execution_options(yield_per=20_000).execute(stmt):
        last = row.last_no_show
        if isinstance(last, str):  # SQLite returns a CASE over a subquery untyped
            last = datetime.fromisoformat(last)
        yield rp.OpenRow(int(row.id), row.placer_id, row.status, row.priority or "", row.referred_to or "",
                         row.specialty or "", aware(row.sent_at), aware(row.completed_at),  # type: ignore[arg-type]
                         aware(last), str(row.g or ""))


def worklist_tables(conn: Connection) -> list[tuple[Table, str]]:
    """The worklist/reminder tables that exist and have a ``referral_id`` column, reflected."""
    names = set(inspect(conn).get_table_names())
    found: list[tuple[Table, str]] = []
    for name, when in WORKLIST_TABLES:
        if name in names:
            table = Table(name, MetaData(), autoload_with=conn)
            if "referral_id" in table.c and when in table.c:
                found.append((table, when))
    return found


def recovered(conn: Connection, params: ReportParams) -> dict[str, Any]:
    """Referrals that were on the worklist or got a reminder and *then* completed, over those that were on it.

    "Then" means ``completed_at`` at or after the first alert/reminder: a referral that was completed before
    anyone chased it was not recovered by the worklist. Without an alerts table this reports 0 with a note.
    """
    tables = worklist_tables(conn)
    if not tables:
        return {**rp.ratio(0, 0), "count": 0, "note": "no alerts table in this database yet: reported as 0"}
    parts = [select(t.c.referral_id.label("rid"), t.c[when].label("at")).where(t.c.referral_id.is_not(None))
             for t, when in tables]
    marks = union_all(*parts).subquery() if len(parts) > 1 else parts[0].subquery()
    first = select(marks.c.rid, func.min(marks.c.at).label("first_at")).group_by(marks.c.rid).subquery()
    done = and_(R.c.completed_at.is_not(None), R.c.completed_at >= first.c.first_at)
    stmt = select(func.count().label("alerted"), _count(done).label("recovered")).select_from(
        R.join(first, first.c.rid == R.c.id)).where(_cohort(params))
    row = conn.execute(stmt).one()
    return {**rp.ratio(int(row.recovered), int(row.alerted)), "count": int(row.recovered),
            "note": "on the worklist: " + ", ".join(t.name for t, _ in tables)}


def cms50(conn: Connection, year: int) -> dict[str, Any]:
    """Denominator and numerator of the CMS50-style figure (see :mod:`refloop.report`), in one query."""
    start = datetime(year, 1, 1, tzinfo=UTC)
    cutoff = datetime(year, 11, 1, tzinfo=UTC)  # sent_at < 1 Nov 00:00 == on or before 31 Oct 23:59:59.999999
    end = datetime(year + 1, 1, 1, tzinfo=UTC)
    rank = func.row_number().over(partition_by=R.c.patient_key, order_by=(R.c.sent_at, R.c.id)).label("rank")
    firsts = (
        select(R.c.sent_at, R.c.note_received_at, rank)
        .where(R.c.patient_key != "", R.c.sent_at.is_not(None), R.c.sent_at >= start, R.c.sent_at < cutoff,
               R.c.status != "cancelled")
        .subquery()
    )
    met = and_(firsts.c.note_received_at.is_not(None), firsts.c.note_received_at > firsts.c.sent_at,
               firsts.c.note_received_at < end)
    row = conn.execute(select(func.count().label("den"), _count(met).label("num")).where(firsts.c.rank == 1)).one()
    return rp.cms50_block(year, int(row.den), int(row.num))


# -- the report ------------------------------------------------------------------------------------
_EMPTY_COUNTS = dict.fromkeys(rp.COUNT_COLUMNS, 0)
_EMPTY_EVENTS = dict.fromkeys(rp.EVENT_COLUMNS, 0)


def _sum(blocks: Mapping[str, Mapping[str, int]], names: tuple[str, ...]) -> dict[str, int]:
    return {n: sum(b.get(n, 0) for b in blocks.values()) for n in names}


def build_report(conn: Connection, params: ReportParams, windows: Windows) -> dict[str, Any]:
    """The whole report as one JSON-ready dict; the CLI and ``GET /api/report`` both return exactly this."""
    per_group = counts(conn, params, windows)
    per_events = event_counts(conn, params)
    per_days = day_values(conn, params)
    leaks: list[dict[str, Any]] = []
    leak_count: dict[str, int] = defaultdict(int)
    in_flight: dict[str, int] = defaultdict(int)
    by_stage: dict[str, int] = dict.fromkeys(rp.LEAK_STAGES, 0)
    for row in open_rows(conn, params):
        found = rp.classify(row, params.now, windows)
        if found is None:
            if row.status not in ("cancelled", "declined", "expired"):
                in_flight[row.group] += 1
            continue
        stage, overdue = found
        leak_count[row.group] += 1
        by_stage[stage] += 1
        if len(leaks) < params.leak_limit:
            leaks.append(rp.leak_entry(row, stage, overdue, params.now))
    leaks.sort(key=lambda x: (-x["age_days"], x["placer_id"]))

    def block(key: str | None) -> dict[str, Any]:
        if key is None:
            c, e = _sum(per_group, rp.COUNT_COLUMNS), _sum(per_events, rp.EVENT_COLUMNS)
            days: dict[str, list[float]] = {n: [v for d in per_days.values() for v in d[n]] for n in rp.DAY_METRICS}
            flight, leak = sum(in_flight.values()), sum(leak_count.values())
        else:
            c, e = per_group.get(key, _EMPTY_COUNTS), per_events.get(key, _EMPTY_EVENTS)
            days = per_days.get(key, {n: [] for n in rp.DAY_METRICS})
            flight, leak = in_flight.get(key, 0), leak_count.get(key, 0)
        totals = {"sent": c["sent"], "accepted": c["accepted"], "scheduled": c["scheduled"],
                  "completed": c["completed"], "note_received": c["note_of_completed"], "closed": c["closed"],
                  "appointments": e["appointments"], "no_shows": e["no_show_appointments"],
                  "in_flight": flight, "leaks": leak}
        return {"totals": totals, "rates": rp.rates(c, e), "days": {n: rp.distribution(days[n])
                                                                     for n in rp.DAY_METRICS}}

    whole = block(None)
    whole["totals"]["leaks_by_stage"] = by_stage
    whole["rates"]["recovered"] = recovered(conn, params)
    groups = [{"key": key, **block(key)} for key in sorted(per_group)] if params.by else []
    year = params.cms50_year or (params.end - timedelta(microseconds=1)).year
    return {
        "cohort": {"from": params.start.isoformat(), "to": params.end.isoformat(), "by": params.by,
                   "filters": dict(sorted(params.filters.items())), "now": params.now.isoformat(),
                   "leak_limit": params.leak_limit},
        "totals": whole["totals"],
        "rates": whole["rates"],
        "days": whole["days"],
        "groups": groups,
        "leaks": leaks,
        "cms50": cms50(conn, year),
    }

"""SQL for the cohort report (:mod:`refloop.report` holds the definitions and the pure arithmetic).

Why it looks like this: the report must stay fast on a million referrals (≤ 3 s is the target for the
default one-year cohort), and a one-year cohort is nearly the whole store. So, per report:

* one aggregate pass over the cohort: every count and rate as conditional sums, the leaks per stage and the
  in-flight count (the leak rules in SQL, with each referral's window resolved in Python per distinct
  priority / provider value and compared as a stored time against ``now`` minus the window, to the
  microsecond), and "recovered" as semi-joins against ``alerts``/``outbox``;
* one join with the appointment events for the no-show figures;
* one stream of the four day differences as bare numbers (mean, median and p90 need every value; each
  series is sorted once);
* the first ``leak_limit`` leaks only, oldest first, re-classified by :func:`refloop.report.classify`;
* one window-function query for CMS50.

With business days configured the leak counts need per-row arithmetic, so the unclosed referrals that can
be leaks (calendar time is an upper bound on business time) are streamed and classified in Python instead.
On SQLite a cohort covering most of the stored sent dates is read by table scan, not through
``ix_referrals_sent_at`` (see :func:`wide_range`). Indexes for these queries are declared at the end of
``models.py`` (migration 0005). Nothing here logs: rows carry patient hashes.
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
)
from sqlalchemy.sql import operators
from sqlalchemy.sql.elements import ColumnElement, UnaryExpression

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
_DAY = timedelta(days=1)
_FINAL = ("cancelled", "declined", "expired")
#: A cohort spanning more than this share of the sent dates in the store is read with one sequential table
#: scan: walking ``ix_referrals_sent_at`` over most of the table costs a random row lookup per referral, which
#: on a store larger than the page cache is an order of magnitude slower (measured: bench/report_timing.py).
_SCAN_SHARE = 0.2


def _days(conn: Connection, later: Any, earlier: Any) -> ColumnElement[Any]:
    """``later - earlier`` in (fractional) days, as a number the database computes."""
    if conn.dialect.name == "sqlite":
        return func.julianday(later) - func.julianday(earlier)
    return func.extract("epoch", later - earlier) / 86400.0


def _window_expr(windows: Windows, stage: str, priority: Any = None) -> ColumnElement[Any]:
    """The per-referral window in SQL, with :meth:`Windows.window_days`'s precedence (calendar days)."""
    whens: list[tuple[ColumnElement[bool], float]] = []
    for column in (R.c.referred_to, R.c.specialty):
        for (name, st), days in sorted(windows.target_days.items()):
            if st == stage:
                whens.append((func.lower(func.trim(column)) == name, days))
    prio = func.lower(func.trim(R.c.priority if priority is None else priority))
    for (klass, st), days in sorted(windows.priority_days.items()):
        if st == stage:
            codes = sorted(c for c, k in stall.PRIORITY_CODES.items() if k == klass)
            whens.append((prio.in_(codes), days))
    default = windows.stage_days[stage]
    return case(*whens, else_=literal(default)) if whens else literal(default)


def _fast_window_expr(conn: Connection, windows: Windows, stage: str, priorities: list[str]) -> ColumnElement[Any]:
    """:func:`_window_expr`, with the priority normalisation done once per distinct stored value.

    When the stage's window depends on the priority alone, the database evaluates :func:`_window_expr` for
    each raw priority present and the per-row expression becomes a plain ``CASE priority WHEN 'R' THEN ...``
    (the same function on the same input gives the same number); any other value falls back to the full
    expression. Calling ``lower(trim())`` on every row is most of the cost of the counts pass otherwise.
    """
    full = _window_expr(windows, stage)
    if not priorities or any(st == stage for (_, st) in windows.target_days):
        return full
    if not any(st == stage for (_, st) in windows.priority_days):
        return full  # a constant already
    row = conn.execute(select(*(_window_expr(windows, stage, literal(p)).label(f"w{i}")
                                for i, p in enumerate(priorities)))).one()
    return case({p: literal(float(w)) for p, w in zip(priorities, row, strict=True)}, value=R.c.priority,
                else_=full)


def _group_expr(conn: Connection, by: str | None) -> ColumnElement[Any]:
    if by is None:
        return literal_column("''")
    if by == "month":
        if conn.dialect.name == "sqlite":
            return func.strftime("%Y-%m", R.c.sent_at)
        return func.to_char(func.timezone("UTC", R.c.sent_at), "YYYY-MM")
    return getattr(R.c, by)


def _no_index(column: Any) -> ColumnElement[Any]:
    """``+column`` (same value and type): tells SQLite's planner not to drive the query from an index on it."""
    return UnaryExpression(column, operator=operators.custom_op("+"), type_=column.type)


def _cohort(params: ReportParams, *, scan: bool = False) -> ColumnElement[bool]:
    sent = _no_index(R.c.sent_at) if scan else R.c.sent_at
    conds = [R.c.sent_at.is_not(None), sent >= params.start, sent < params.end]
    conds += [getattr(R.c, name) == value for name, value in sorted(params.filters.items())]
    return and_(*conds)


def wide_range(conn: Connection, start: datetime, end: datetime) -> bool:
    """Whether ``[start, end)`` covers so much of the stored sent dates that a table scan beats the index.

    Only SQLite needs telling (PostgreSQL's planner has statistics). Two index probes (min and max), assuming
    sent dates spread evenly between them: a wrong guess costs speed, never a number.
    """
    if conn.dialect.name != "sqlite":
        return False
    lo, hi = conn.execute(select(select(func.min(R.c.sent_at)).scalar_subquery(),
                                 select(func.max(R.c.sent_at)).scalar_subquery())).one()
    lo, hi = aware(lo), aware(hi)
    if lo is None or hi is None:
        return False
    span = (hi - lo).total_seconds()
    overlap = (min(hi, end) - max(lo, start)).total_seconds()
    return span <= 0 or overlap / span > _SCAN_SHARE


def _grouped(stmt: Any, g: ColumnElement[Any], by: str | None) -> Any:
    """GROUP BY the group key, or not at all for the totals (PostgreSQL rejects GROUP BY a constant)."""
    return stmt.group_by(g) if by else stmt


def _count(cond: ColumnElement[bool]) -> ColumnElement[Any]:
    return func.coalesce(func.sum(case((cond, 1), else_=0)), 0)


# -- leak rules in SQL (calendar days) -------------------------------------------------------------
def _elapsed_us(days: float) -> int:
    """The fewest whole microseconds ``d`` with ``d / 1 day >= days``, the comparison :func:`refloop.report.classify`
    makes (``stall.elapsed_days`` divides an exact timedelta): so "overdue" is exactly ``start <= now - d``."""
    m = max(round(days * 86_400_000_000), 0)
    while m > 0 and timedelta(microseconds=m - 1) / _DAY >= days:
        m -= 1
    while timedelta(microseconds=m) / _DAY < days:
        m += 1
    return m


def _distinct(conn: Connection, params: ReportParams, scan: bool, column: Any) -> list[str]:
    """The distinct non-null values of *column* in the cohort (a handful: priorities, providers)."""
    stmt = select(column).distinct().where(_cohort(params, scan=scan), column.is_not(None))
    return sorted(v for (v,) in conn.execute(stmt))


@dataclass(frozen=True)
class _Overdue:
    """Per-stage SQL conditions "the window of this referral is over at ``now``", exactly as the leak rules say.

    Windows are resolved in Python (:func:`refloop.report.window_days`) for every distinct referred-to,
    specialty and priority value among the unclosed cohort referrals, so SQL only compares a stored time
    with a cutoff (``now`` minus the window, to the microsecond); no normalisation is redone in SQL.
    """

    cutoffs: Mapping[str, ColumnElement[Any]]
    priorities: list[str] = field(default_factory=list)

    def over(self, stage: str, start: Any) -> ColumnElement[bool]:
        return and_(start.is_not(None), start <= self.cutoffs[stage])


def _overdue(conn: Connection, params: ReportParams, windows: Windows, scan: bool) -> _Overdue:
    names = {st for (_, st) in windows.target_days}
    values = {"priority": _distinct(conn, params, scan, R.c.priority)}
    if names:
        values["referred_to"] = _distinct(conn, params, scan, R.c.referred_to)
        values["specialty"] = _distinct(conn, params, scan, R.c.specialty)
    cache: dict[float, ColumnElement[Any]] = {}

    def cutoff(days: float) -> ColumnElement[Any]:
        if days not in cache:
            cache[days] = literal(params.now - timedelta(microseconds=_elapsed_us(days)), DateTime(timezone=True))
        return cache[days]

    out: dict[str, ColumnElement[Any]] = {}
    for stage in (stall.SCHEDULING, stall.REBOOKING, stall.VISIT, stall.NOTE):
        whens: list[tuple[ColumnElement[bool], ColumnElement[Any]]] = []
        for field_name in ("referred_to", "specialty"):
            if stage not in names:
                continue
            by_days: dict[float, list[str]] = defaultdict(list)
            for v in values[field_name]:
                if v and (days := windows.target_days.get((rp._key(v), stage))) is not None:
                    by_days[days].append(v)
            whens += [(getattr(R.c, field_name).in_(sorted(vs)), cutoff(d)) for d, vs in sorted(by_days.items())]
        default = rp.window_days(windows, stage, referred_to="", specialty="", priority="")
        by_days = defaultdict(list)
        for p in values["priority"]:
            days = rp.window_days(windows, stage, referred_to="", specialty="", priority=p or "")
            if days != default:
                by_days[days].append(p)
        whens += [(R.c.priority.in_(sorted(vs)), cutoff(d)) for d, vs in sorted(by_days.items())]
        out[stage] = case(*whens, else_=cutoff(default)) if whens else cutoff(default)
    return _Overdue(out, values["priority"])


def _last_no_show() -> ColumnElement[Any]:
    return (select(func.max(E.c.occurred_at))
            .where(E.c.referral_id == R.c.id, E.c.kind == "appointment_no_show")
            .scalar_subquery())


def _leak_conditions(od: _Overdue) -> dict[str, ColumnElement[bool]]:
    """Each leak stage as an SQL condition: exactly :func:`refloop.report.classify` without business days."""
    status = R.c.status
    return {
        "never_scheduled": and_(status == "sent", od.over(stall.SCHEDULING, R.c.sent_at)),
        "not_seen": and_(status == "scheduled", od.over(stall.VISIT, R.c.sent_at)),
        # the visit test first: it needs no subquery and settles most old no-shows
        "no_show_not_rebooked": and_(status == "no_show", or_(od.over(stall.VISIT, R.c.sent_at),
                                                              od.over(stall.REBOOKING, _last_no_show()))),
        "seen_no_note": and_(status == "completed", od.over(stall.NOTE, R.c.completed_at)),
        "declined": status.in_(("declined", "expired")),
        "cancelled": status == "cancelled",
    }


# -- queries ---------------------------------------------------------------------------------------
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


def _has_referral_index(conn: Connection, table: Table) -> bool:
    """Whether an index (or unique constraint) of *table* starts with ``referral_id``."""
    insp = inspect(conn)
    found: list[list[Any]] = [list(i.get("column_names") or []) for i in insp.get_indexes(table.name)]
    found += [list(u.get("column_names") or []) for u in insp.get_unique_constraints(table.name)]
    return any(cols[:1] == ["referral_id"] for cols in found)


def _worklist_marks(conn: Connection, tables: list[tuple[Table, str]]) -> tuple[list[Any], Any]:
    """Per worklist table: "was on it" and "on it at or before ``completed_at``" for the current referral.

    ``completed_at >= min(first alert/reminder)`` is the same as "some alert or reminder at or before
    ``completed_at``". A table indexed by ``referral_id`` (alerts) is probed with EXISTS per cohort referral;
    one without such an index (outbox has none) would be scanned once per referral that way, so it is read
    once instead, as ``referral_id -> min(time)``, and outer-joined (SQLite indexes that result itself).
    """
    marked: list[Any] = []
    before: list[Any] = []
    joined = R
    for table, when in tables:
        if conn.dialect.name != "sqlite" or _has_referral_index(conn, table):
            marked.append(select(literal(1)).where(table.c.referral_id == R.c.id).exists())
            before.append(select(literal(1)).where(table.c.referral_id == R.c.id,
                                                   table.c[when] <= R.c.completed_at).exists())
            continue
        first = (select(table.c.referral_id.label("rid"), func.min(table.c[when]).label("first_at"))
                 .where(table.c.referral_id.is_not(None)).group_by(table.c.referral_id)
                 .subquery(f"first_{table.name}"))
        joined = joined.outerjoin(first, first.c.rid == R.c.id)
        marked.append(first.c.rid.is_not(None))
        before.append(first.c.first_at <= R.c.completed_at)
    return [or_(*marked), and_(R.c.completed_at.is_not(None), or_(*before))], joined


def counts(conn: Connection, params: ReportParams, windows: Windows, *, scan: bool | None = None,
           overdue: _Overdue | None = None, worklist: list[tuple[Table, str]] | None = None
           ) -> dict[str, dict[str, int]]:
    """The conditional sums of :data:`refloop.report.COUNT_COLUMNS` per group (one GROUP BY).

    Given ``overdue`` it also counts each leak stage (``leak_<stage>``) and the unclosed referrals that are
    not final (``_open``); given ``worklist`` tables, the "recovered" parts (``_alerted``, ``_recovered``).
    All in the same single pass over the cohort.
    """
    if scan is None:
        scan = wide_range(conn, params.start, params.end)
    now = literal(params.now, DateTime(timezone=True))
    priorities = overdue.priorities if overdue is not None else []
    sched_w = _fast_window_expr(conn, windows, stall.SCHEDULING, priorities)
    visit_w = _fast_window_expr(conn, windows, stall.VISIT, priorities)
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
    if overdue is not None:
        cols["_open"] = _count(R.c.status.not_in(("closed", *_FINAL)))
        cols |= {f"leak_{stage}": _count(cond) for stage, cond in _leak_conditions(overdue).items()}
    source: Any = R
    if worklist:
        (marked, done), source = _worklist_marks(conn, worklist)
        cols |= {"_alerted": _count(marked), "_recovered": _count(done)}
    stmt = _grouped(select(g, *(c.label(n) for n, c in cols.items())).select_from(source)
                    .where(_cohort(params, scan=scan)), g, params.by)
    return {str(row.g or ""): {n: int(getattr(row, n)) for n in cols} for row in conn.execute(stmt)}


def event_counts(conn: Connection, params: ReportParams, *, scan: bool | None = None) -> dict[str, dict[str, int]]:
    """No-show figures per group from the appointment events of cohort referrals (one join).

    With ``scan`` (a wide cohort on SQLite) the referrals are read in table order, so each referral's
    events are fetched by ``ix_referral_events_referral`` in roughly the order they were written, instead of
    one random events-table page per referral in sent-date order.
    """
    if scan is None:
        scan = wide_range(conn, params.start, params.end)
    g = _group_expr(conn, params.by).label("g")
    no_show = E.c.kind == "appointment_no_show"
    rebooked = and_(no_show, R.c.status.in_(("scheduled", "completed", "closed")))
    conds = [_cohort(params, scan=scan), E.c.subject.like("appt:%")]
    if scan:
        # ix_referrals_status_sent covers (id, status, sent_at): without a column it lacks, SQLite would walk it
        # (status, sent_at order) rather than the table. placer_id is NOT NULL, so this keeps every row.
        conds.append(R.c.placer_id.is_not(None))
    stmt = (
        select(
            g,
            func.count(func.distinct(E.c.subject)).label("appointments"),
            func.count(func.distinct(case((no_show, E.c.subject)))).label("no_show_appointments"),
            func.count(func.distinct(case((no_show, R.c.id)))).label("no_show_referrals"),
            func.count(func.distinct(case((rebooked, R.c.id)))).label("rebooked_after_no_show"),
        )
        .select_from(R.join(E, E.c.referral_id == R.c.id))
        .where(*conds)
    )
    stmt = _grouped(stmt, g, params.by)
    return {str(row.g or ""): {n: int(getattr(row, n)) for n in rp.EVENT_COLUMNS} for row in conn.execute(stmt)}


def day_values(conn: Connection, params: ReportParams, *, scan: bool | None = None
               ) -> dict[str, dict[str, list[float]]]:
    """Every non-null day difference per group, each list sorted (medians need all of them).

    One pass that returns bare tuples (group, then the four differences) with no per-row Python beyond
    transposing; each series is sorted once.
    """
    if scan is None:
        scan = wide_range(conn, params.start, params.end)
    exprs = [
        _days(conn, R.c.scheduled_at, R.c.sent_at),
        _days(conn, R.c.appointment_at, R.c.sent_at),
        _days(conn, R.c.note_received_at, R.c.appointment_at),
        _days(conn, R.c.closed_at, R.c.sent_at),
    ]
    cols = [_group_expr(conn, params.by), *exprs] if params.by else exprs
    stmt = select(*cols).where(_cohort(params, scan=scan),
                               or_(R.c.scheduled_at.is_not(None), R.c.closed_at.is_not(None)))
    rows = conn.execute(stmt).all()
    as_float = conn.dialect.name != "sqlite"  # PostgreSQL returns numeric (Decimal) from extract()

    def series(column: tuple[Any, ...]) -> list[float]:
        values = [float(v) for v in column if v is not None] if as_float else [v for v in column if v is not None]
        values.sort()
        return values

    if not params.by:
        if not rows:
            return {}
        return {"": {n: series(col) for n, col in zip(rp.DAY_METRICS, zip(*rows, strict=True), strict=True)}}
    buckets: dict[str, list[tuple[Any, ...]]] = defaultdict(list)
    for row in rows:
        buckets[str(row[0] or "")].append(row[1:])
    return {key: {n: series(col) for n, col in zip(rp.DAY_METRICS, zip(*part, strict=True), strict=True)}
            for key, part in buckets.items()}


def open_rows(conn: Connection, params: ReportParams, *, scan: bool = False,
              where: ColumnElement[bool] | None = None, limit: int | None = None) -> Iterator[rp.OpenRow]:
    """Unclosed cohort referrals with what the leak rules need, streamed in (sent_at, id) order.

    ``where`` narrows them (to the ones that can be leaks), ``limit`` stops after that many rows.
    """
    g = _group_expr(conn, params.by).label("g")
    stmt = (
        select(R.c.id, R.c.placer_id, R.c.status, R.c.priority, R.c.referred_to, R.c.specialty, R.c.sent_at,
               R.c.completed_at, case((R.c.status == "no_show", _last_no_show())).label("last_no_show"), g)
        .where(_cohort(params, scan=scan), R.c.status != "closed")
        .order_by(R.c.sent_at, R.c.id)
    )
    if where is not None:
        stmt = stmt.where(where)
    if limit is not None:
        stmt = stmt.limit(limit)
    for row in conn.execution_options(yield_per=20_000).execute(stmt):
        last = row.last_no_show
        if isinstance(last, str):  # SQLite returns a CASE over a subquery untyped
            last = datetime.fromisoformat(last)
        yield rp.OpenRow(int(row.id), row.placer_id, row.status, row.priority or "", row.referred_to or "",
                         row.specialty or "", aware(row.sent_at), aware(row.completed_at),  # type: ignore[arg-type]
                         aware(last), str(row.g or ""))


def _recovered_block(alerted: int, done: int, tables: list[tuple[Table, str]]) -> dict[str, Any]:
    if not tables:
        return {**rp.ratio(0, 0), "count": 0, "note": "no alerts table in this database yet: reported as 0"}
    return {**rp.ratio(done, alerted), "count": done,
            "note": "on the worklist: " + ", ".join(t.name for t, _ in tables)}


def recovered(conn: Connection, params: ReportParams, *, scan: bool | None = None) -> dict[str, Any]:
    """Referrals that were on the worklist or got a reminder and *then* completed, over those that were on it.

    "Then" means ``completed_at`` at or after the first alert/reminder: a referral that was completed before
    anyone chased it was not recovered by the worklist. Without an alerts table this reports 0 with a note.
    Computed per cohort referral with EXISTS (``build_report`` folds it into the counts pass).
    """
    tables = worklist_tables(conn)
    if not tables:
        return _recovered_block(0, 0, tables)
    if scan is None:
        scan = wide_range(conn, params.start, params.end)
    (marked, done), source = _worklist_marks(conn, tables)
    row = conn.execute(select(_count(marked).label("alerted"), _count(done).label("done")).select_from(source)
                       .where(_cohort(params, scan=scan))).one()
    return _recovered_block(int(row.alerted), int(row.done), tables)


def cms50(conn: Connection, year: int) -> dict[str, Any]:
    """Denominator and numerator of the CMS50-style figure (see :mod:`refloop.report`), in one query."""
    start = datetime(year, 1, 1, tzinfo=UTC)
    cutoff = datetime(year, 11, 1, tzinfo=UTC)  # sent_at < 1 Nov 00:00 == on or before 31 Oct 23:59:59.999999
    end = datetime(year + 1, 1, 1, tzinfo=UTC)
    sent = _no_index(R.c.sent_at) if wide_range(conn, start, cutoff) else R.c.sent_at
    rank = func.row_number().over(partition_by=R.c.patient_key, order_by=(R.c.sent_at, R.c.id)).label("rank")
    firsts = (
        select(R.c.sent_at, R.c.note_received_at, rank)
        .where(R.c.patient_key != "", R.c.sent_at.is_not(None), sent >= start, sent < cutoff,
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
_OPEN_STAGES = ("never_scheduled", "not_seen", "no_show_not_rebooked", "seen_no_note")


def _sum(blocks: Mapping[str, Mapping[str, int]], names: tuple[str, ...]) -> dict[str, int]:
    return {n: sum(b.get(n, 0) for b in blocks.values()) for n in names}


def _leaks_by_row(conn: Connection, params: ReportParams, windows: Windows, scan: bool,
                  candidates: ColumnElement[bool], open_count: Mapping[str, int]
                  ) -> tuple[list[dict[str, Any]], dict[str, int], dict[str, int], dict[str, int]]:
    """Leaks by the Python rules, over the rows that can be leaks (business days need per-row arithmetic).

    ``candidates`` is a superset of the leaks (business time never exceeds calendar time); every other
    unclosed, non-final referral is in flight, so ``open_count`` minus the non-final leaks gives that figure.
    """
    leaks: list[dict[str, Any]] = []
    leak_count: dict[str, int] = defaultdict(int)
    open_leaks: dict[str, int] = defaultdict(int)
    by_stage: dict[str, int] = dict.fromkeys(rp.LEAK_STAGES, 0)
    for row in open_rows(conn, params, scan=scan, where=candidates):
        found = rp.classify(row, params.now, windows)
        if found is None:
            continue
        stage, overdue = found
        leak_count[row.group] += 1
        by_stage[stage] += 1
        if row.status not in _FINAL:
            open_leaks[row.group] += 1
        if len(leaks) < params.leak_limit:
            leaks.append(rp.leak_entry(row, stage, overdue, params.now))
    in_flight = {k: n - open_leaks.get(k, 0) for k, n in open_count.items()}
    return leaks, dict(leak_count), in_flight, by_stage


def build_report(conn: Connection, params: ReportParams, windows: Windows) -> dict[str, Any]:
    """The whole report as one JSON-ready dict; the CLI and ``GET /api/report`` both return exactly this.

    Passes over the cohort: one aggregate (counts, leak counts per stage, in flight, recovered), one join
    with the appointment events, one stream of day differences, the first ``leak_limit`` leaks, and CMS50.
    """
    scan = wide_range(conn, params.start, params.end)
    overdue = _overdue(conn, params, windows, scan)
    tables = worklist_tables(conn)
    per_group = counts(conn, params, windows, scan=scan, overdue=overdue, worklist=tables)
    per_events = event_counts(conn, params, scan=scan)
    per_days = day_values(conn, params, scan=scan)
    conditions = _leak_conditions(overdue)
    candidates = or_(*conditions.values())
    open_count = {k: c["_open"] for k, c in per_group.items()}

    leaks: list[dict[str, Any]] = []
    exact = not windows.business_days
    if exact:
        # Without business days the SQL conditions are the leak rules, so SQL counts the leaks and only the
        # listed ones are read (oldest first, as the loop below would reach them). Python re-classifies those
        # for stage and overdue days; a disagreement would mean the SQL drifted from the rules, so it is not
        # trusted and the row-by-row path decides instead.
        by_stage = {s: sum(c[f"leak_{s}"] for c in per_group.values()) for s in rp.LEAK_STAGES}
        leak_count = {k: sum(c[f"leak_{s}"] for s in rp.LEAK_STAGES) for k, c in per_group.items()}
        in_flight = {k: c["_open"] - sum(c[f"leak_{s}"] for s in _OPEN_STAGES) for k, c in per_group.items()}
        if params.leak_limit > 0:
            for row in open_rows(conn, params, where=candidates, limit=params.leak_limit):
                found = rp.classify(row, params.now, windows)
                if found is None:
                    exact = False
                    break
                leaks.append(rp.leak_entry(row, found[0], found[1], params.now))
    if not exact:
        leaks, leak_count, in_flight, by_stage = _leaks_by_row(conn, params, windows, scan, candidates, open_count)
    leaks.sort(key=lambda x: (-x["age_days"], x["placer_id"]))

    def block(key: str | None) -> dict[str, Any]:
        if key is None:
            c, e = _sum(per_group, rp.COUNT_COLUMNS), _sum(per_events, rp.EVENT_COLUMNS)
            if len(per_days) == 1:  # one group: its series are the totals' (already sorted)
                days: dict[str, list[float]] = next(iter(per_days.values()))
            else:  # concatenated sorted runs: the sort merges them
                days = {n: sorted(v for d in per_days.values() for v in d[n]) for n in rp.DAY_METRICS}
            flight, leak = sum(in_flight.values()), sum(leak_count.values())
        else:
            c, e = per_group.get(key, _EMPTY_COUNTS), per_events.get(key, _EMPTY_EVENTS)
            days = per_days.get(key) or {n: [] for n in rp.DAY_METRICS}
            flight, leak = in_flight.get(key, 0), leak_count.get(key, 0)
        totals = {"sent": c["sent"], "accepted": c["accepted"], "scheduled": c["scheduled"],
                  "completed": c["completed"], "note_received": c["note_of_completed"], "closed": c["closed"],
                  "appointments": e["appointments"], "no_shows": e["no_show_appointments"],
                  "in_flight": flight, "leaks": leak}
        return {"totals": totals, "rates": rp.rates(c, e), "days": {n: rp.distribution(days[n], presorted=True)
                                                                     for n in rp.DAY_METRICS}}

    whole = block(None)
    whole["totals"]["leaks_by_stage"] = by_stage
    whole["rates"]["recovered"] = _recovered_block(sum(c.get("_alerted", 0) for c in per_group.values()),
                                                   sum(c.get("_recovered", 0) for c in per_group.values()), tables)
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

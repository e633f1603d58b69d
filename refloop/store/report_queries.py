"""SQL for the cohort report (:mod:`refloop.report` holds the definitions and the pure arithmetic).

Why it looks like this: the report must stay fast on a million referrals (≤ 3 s is the target for the
default one-year cohort), a one-year cohort is nearly the whole store, and in SQLite every expression costs
per row. So every figure is read where it is cheapest, and every number stays exactly what the plain
definition gives (the slow, obvious queries remain as fallbacks and as the PostgreSQL path where noted):

* one aggregate pass over the cohort (:func:`_counts_pass`), each milestone's ``julianday()`` computed once
  per row in a co-routine (:func:`_projection`): the counts, "in window" and "mature" (two counts in one sum),
  and, for the totals on SQLite, the day differences around their median and p90 (:class:`_DayPlan`: windows
  from a systematic sample of ids; the values inside travel exactly, the others as a marker, so the median,
  p90 and mean come out as :func:`refloop.report.distribution` gives them over every value; a metric whose
  window missed is read in full);
* the status figures and leak counts: for an unfiltered cohort that is most of the store, from the status
  indexes (:func:`_status_figures`: only referrals near a window's end are tested row by row), else as one
  letter per referral in the aggregate pass (:func:`_status_letter`); leak windows are resolved in Python per
  distinct priority / provider value and compared as stored times against ``now`` minus the window;
* "recovered" from the alerts/reminders side (:func:`worklist_counts`), the appointments as distinct subjects
  in ``ix_referral_events_subject`` order (:func:`_appointments_outside`) or one join, the no-show figures
  from the no-show events (:func:`_no_show_counts`);
* the first ``leak_limit`` leaks only, oldest first, re-classified by :func:`refloop.report.classify`;
* CMS50 as one group per patient in ``ix_referrals_patient_first`` order (:func:`cms50`).

With business days configured the leak counts need per-row arithmetic, so the unclosed referrals that can
be leaks (calendar time is an upper bound on business time) are streamed and classified in Python instead.
On SQLite a cohort covering most of the stored sent dates is read by table scan, not through
``ix_referrals_sent_at`` (see :func:`wide_range`). Indexes for these queries are declared at the end of
``models.py`` (migrations 0005, 0006 and 0009). Nothing here logs: rows carry patient hashes.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from fractions import Fraction
from typing import Any

from sqlalchemy import (
    BigInteger,
    Connection,
    DateTime,
    Integer,
    MetaData,
    Table,
    and_,
    case,
    cast,
    func,
    inspect,
    literal,
    literal_column,
    or_,
    select,
    union_all,
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


def _day_number(conn: Connection, column: Any) -> ColumnElement[Any]:
    """What :func:`_diff` subtracts: SQLite's ``julianday()`` (parsed once per row), else the time itself."""
    return func.julianday(column) if conn.dialect.name == "sqlite" else column


def _diff(conn: Connection, later: Any, earlier: Any) -> ColumnElement[Any]:
    """:func:`_days` over two :func:`_day_number` columns: the same expression, so the same number."""
    if conn.dialect.name == "sqlite":
        return later - earlier
    return func.extract("epoch", later - earlier) / 86400.0


def _window_expr(windows: Windows, stage: str, priority: Any = None, cols: Any = None) -> ColumnElement[Any]:
    """The per-referral window in SQL, with :meth:`Windows.window_days`'s precedence (calendar days)."""
    c = R.c if cols is None else cols
    whens: list[tuple[ColumnElement[bool], float]] = []
    named = [(name, days) for (name, st), days in sorted(windows.target_days.items()) if st == stage]
    for column_name in ("referred_to", "specialty") if named else ():
        whens += [(func.lower(func.trim(c[column_name])) == name, days) for name, days in named]
    prio = func.lower(func.trim(c.priority if priority is None else priority))
    for (klass, st), days in sorted(windows.priority_days.items()):
        if st == stage:
            codes = sorted(code for code, k in stall.PRIORITY_CODES.items() if k == klass)
            whens.append((prio.in_(codes), days))
    default = windows.stage_days[stage]
    return case(*whens, else_=literal(default)) if whens else literal(default)


def _priority_windows(conn: Connection, windows: Windows, stage: str, priorities: list[str]
                      ) -> list[tuple[str, float]] | None:
    """``[(raw priority, window)]`` as :func:`_window_expr` gives it for each value, when the stage's window
    depends on the priority alone (None otherwise: no override by priority, or one by name).

    The database evaluates :func:`_window_expr` once per value, so a per-row ``CASE priority WHEN 'R' THEN ...``
    gives the same number as the full expression (the same function on the same input); any other value falls
    back to the full expression. Calling ``lower(trim())`` on every row is most of the cost otherwise.
    """
    if not priorities or any(st == stage for (_, st) in windows.target_days):
        return None
    if not any(st == stage for (_, st) in windows.priority_days):
        return None  # a constant already
    row = conn.execute(select(*(_window_expr(windows, stage, literal(p)).label(f"w{i}")
                                for i, p in enumerate(priorities)))).one()
    return [(p, float(w)) for p, w in zip(priorities, row, strict=True)]


def _fast_window_expr(conn: Connection, windows: Windows, stage: str, priorities: list[str],
                      cols: Any = None) -> ColumnElement[Any]:
    """:func:`_window_expr`, with the priority normalisation done once per value (:func:`_priority_windows`)."""
    c = R.c if cols is None else cols
    full = _window_expr(windows, stage, cols=c)
    known = _priority_windows(conn, windows, stage, priorities)
    if known is None:
        return full
    return case({p: literal(w) for p, w in known}, value=c.priority, else_=full)


def _group_expr(conn: Connection, by: str | None, cols: Any = None) -> ColumnElement[Any]:
    c = R.c if cols is None else cols
    if by is None:
        return literal_column("''")
    if by == "month":
        if conn.dialect.name == "sqlite":
            return func.strftime("%Y-%m", c.sent_at)
        return func.to_char(func.timezone("UTC", c.sent_at), "YYYY-MM")
    return getattr(c, by)


def _sqlite(conn: Connection) -> bool:
    return conn.dialect.name == "sqlite"


def _no_index(column: Any) -> ColumnElement[Any]:
    """``+column`` (same value and type): tells SQLite's planner not to drive the query from an index on it."""
    return UnaryExpression(column, operator=operators.custom_op("+"), type_=column.type)


def _cohort(params: ReportParams, *, scan: bool = False, follow: bool = False) -> ColumnElement[bool]:
    """The cohort condition on ``referrals``. ``follow`` (SQLite only): the referral is reached from another
    table (events, alerts) by its id, so no term may offer the planner an index to start from on this side."""
    sent = _no_index(R.c.sent_at) if scan or follow else R.c.sent_at
    conds = [(sent if follow else R.c.sent_at).is_not(None), sent >= params.start, sent < params.end]
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
    """How many rows satisfy *cond*: ``count(CASE WHEN cond THEN 1 END)``, the cheapest conditional count in
    SQLite (no ``coalesce``, and ``count`` skips the NULLs without adding)."""
    return func.count(case((cond, literal(1))))


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
    specialty and priority value of the cohort, so SQL only compares a stored time with a cutoff
    (``now`` minus the window, to the microsecond); no normalisation is redone in SQL. ``rules[stage]`` is
    ``([(field, values, cutoff), ...], default cutoff)``: the first matching field wins.

    ``known``: the priorities were not all read but taken from a sample (:func:`_day_plan`); a referral with
    another priority, at a stage whose window can depend on it (``by_priority``), is then not settled in SQL
    but classified in Python (:func:`_unknown_leaks`).
    """

    rules: Mapping[str, tuple[list[tuple[str, list[str], datetime]], datetime]]
    priorities: list[str] = field(default_factory=list)
    known: frozenset[str] | None = None
    by_priority: frozenset[str] = frozenset()

    def cutoff(self, stage: str, cols: Any = None) -> ColumnElement[Any]:
        c = R.c if cols is None else cols
        whens, default = self.rules[stage]

        def lit(moment: datetime) -> ColumnElement[Any]:
            return literal(moment, DateTime(timezone=True))

        if not whens:
            return lit(default)
        return case(*((getattr(c, name).in_(values), lit(at)) for name, values, at in whens), else_=lit(default))

    def over(self, stage: str, start: Any, cols: Any = None) -> ColumnElement[bool]:
        return and_(start.is_not(None), start <= self.cutoff(stage, cols))

    def unsettled_statuses(self) -> list[str]:
        """The statuses whose leak rule SQL cannot settle for a priority outside ``known``."""
        if self.known is None:
            return []
        return [status for status, stages in _STATUS_STAGES.items() if stages & self.by_priority]

    def unknown(self, cols: Any = None) -> ColumnElement[bool]:
        """The referrals whose leak rule SQL cannot settle (none when every priority was read)."""
        c = R.c if cols is None else cols
        statuses = self.unsettled_statuses()
        if not statuses or self.known is None:
            return literal(False)
        return and_(c.status.in_(statuses), c.priority.not_in(sorted(self.known)))


#: The stages whose windows each leak rule of :func:`_stage_over` reads, by status.
_STATUS_STAGES: Mapping[str, frozenset[str]] = {
    "sent": frozenset({stall.SCHEDULING}), "scheduled": frozenset({stall.VISIT}),
    "no_show": frozenset({stall.VISIT, stall.REBOOKING}), "completed": frozenset({stall.NOTE}),
}


def _overdue(conn: Connection, params: ReportParams, windows: Windows, scan: bool,
             sampled: list[str] | None = None) -> _Overdue:
    """The leak cutoffs; ``sampled``: priorities seen in a sample, instead of reading every distinct one."""
    names = {st for (_, st) in windows.target_days}
    values = {"priority": _distinct(conn, params, scan, R.c.priority) if sampled is None else sorted(sampled)}
    if names:
        values["referred_to"] = _distinct(conn, params, scan, R.c.referred_to)
        values["specialty"] = _distinct(conn, params, scan, R.c.specialty)

    def cutoff(days: float) -> datetime:
        return params.now - timedelta(microseconds=_elapsed_us(days))

    rules: dict[str, tuple[list[tuple[str, list[str], datetime]], datetime]] = {}
    for stage in (stall.SCHEDULING, stall.REBOOKING, stall.VISIT, stall.NOTE):
        whens: list[tuple[str, list[str], datetime]] = []
        for field_name in ("referred_to", "specialty"):
            if stage not in names:
                continue
            by_days: dict[float, list[str]] = defaultdict(list)
            for v in values[field_name]:
                if v and (days := windows.target_days.get((rp._key(v), stage))) is not None:
                    by_days[days].append(v)
            whens += [(field_name, sorted(vs), cutoff(d)) for d, vs in sorted(by_days.items())]
        default = rp.window_days(windows, stage, referred_to="", specialty="", priority="")
        by_days = defaultdict(list)
        for p in values["priority"]:
            days = rp.window_days(windows, stage, referred_to="", specialty="", priority=p or "")
            if days != default:
                by_days[days].append(p)
        whens += [("priority", sorted(vs), cutoff(d)) for d, vs in sorted(by_days.items())]
        rules[stage] = (whens, cutoff(default))
    by_priority = frozenset(st for (_, st) in windows.priority_days)
    return _Overdue(rules, values["priority"], None if sampled is None else frozenset(sampled), by_priority)


def _last_no_show(cols: Any = None) -> ColumnElement[Any]:
    c = R.c if cols is None else cols
    return (select(func.max(E.c.occurred_at))
            .where(E.c.referral_id == c.id, E.c.kind == "appointment_no_show")
            .scalar_subquery())


def _stage_over(od: _Overdue, c: Any) -> dict[str, ColumnElement[bool]]:
    """Per leak stage with a window, "its window is over" (the leak rule without the status test)."""
    return {
        "never_scheduled": od.over(stall.SCHEDULING, c.sent_at, c),
        "not_seen": od.over(stall.VISIT, c.sent_at, c),
        # the visit test first: it needs no subquery and settles most old no-shows
        "no_show_not_rebooked": or_(od.over(stall.VISIT, c.sent_at, c), od.over(stall.REBOOKING, _last_no_show(c), c)),
        "seen_no_note": od.over(stall.NOTE, c.completed_at, c),
    }


def _leak_conditions(od: _Overdue, cols: Any = None) -> dict[str, ColumnElement[bool]]:
    """Each leak stage as an SQL condition: exactly :func:`refloop.report.classify` without business days."""
    c = R.c if cols is None else cols
    status = c.status
    over = _stage_over(od, c)
    return {
        "never_scheduled": and_(status == "sent", over["never_scheduled"]),
        "not_seen": and_(status == "scheduled", over["not_seen"]),
        "no_show_not_rebooked": and_(status == "no_show", over["no_show_not_rebooked"]),
        "seen_no_note": and_(status == "completed", over["seen_no_note"]),
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


class _Flags:
    """Several yes/no facts of a referral as bit fields of few integers (``f0``, ``f1``...), so that one sum
    counts them all: the fields are ``width`` bits wide, more than any group's size needs."""

    def __init__(self, facts: Mapping[str, ColumnElement[bool]], bound: int) -> None:
        self.width = max(bound.bit_length(), 1)
        per = max(62 // self.width, 1)
        names = list(facts)
        self.columns = [names[i:i + per] for i in range(0, len(names), per)]
        self.facts = facts

    def terms(self) -> list[ColumnElement[Any]]:
        """Per packed column, the sum of its facts' weights (0 for a fact that does not hold)."""
        out: list[ColumnElement[Any]] = []
        for names in self.columns:
            parts = [case((self.facts[name], literal(1 << (self.width * i), BigInteger)),
                          else_=literal(0, BigInteger)) for i, name in enumerate(names)]
            total: ColumnElement[Any] = parts[0]
            for part in parts[1:]:
                total = total + part
            out.append(total)
        return out

    def unpack(self, sums: list[int]) -> dict[str, int]:
        mask = (1 << self.width) - 1
        return {name: (packed >> (self.width * i)) & mask
                for names, packed in zip(self.columns, sums, strict=True) for i, name in enumerate(names)}


def _size_bound(conn: Connection) -> int:
    """At least the number of referrals: ids are distinct integers (two index searches)."""
    lo, hi = conn.execute(select(select(func.min(R.c.id)).scalar_subquery(),
                                 select(func.max(R.c.id)).scalar_subquery())).one()
    return 0 if lo is None else int(hi) - int(lo) + 1


def _projection(conn: Connection, params: ReportParams, *, scan: bool, days: bool, follow: bool = False,
                where: ColumnElement[bool] | None = None, raw: tuple[str, ...] = ("priority",),
                flags: _Flags | None = None) -> Any:
    """The cohort rows as the counts pass reads them, each milestone's day number computed once.

    SQLite does not share a repeated ``julianday(x)`` between the expressions of one row, and the counts,
    windows and day differences use each milestone several times; so this subquery computes it once per row
    (``j_*`` columns: :func:`_day_number`) and is kept apart from the outer aggregate (``OFFSET 0``: not
    flattened, so it runs as a co-routine). ``days`` adds the milestones only the day differences need; ``raw``
    names the stored columns passed through (each costs a copy per row); ``flags`` adds its packed columns.
    """
    cols: list[Any] = [R.c[name] for name in raw]
    if flags is not None:
        cols += [expr.label(f"f{i}") for i, expr in enumerate(flags.terms())]
    cols += [_day_number(conn, R.c.sent_at).label("j_sent"),
             _day_number(conn, R.c.scheduled_at).label("j_sched"),
             _day_number(conn, R.c.completed_at).label("j_comp")]
    if params.by:
        cols.append(_group_expr(conn, params.by).label("g"))
    if days:
        # day_values leaves out referrals neither scheduled nor closed: so does the appointment's day number
        # (the two differences that use it are NULL then)
        seen = or_(R.c.scheduled_at.is_not(None), R.c.closed_at.is_not(None))
        cols += [case((seen, _day_number(conn, R.c.appointment_at))).label("j_appt"),
                 _day_number(conn, R.c.note_received_at).label("j_note"),
                 _day_number(conn, R.c.closed_at).label("j_closed")]
    stmt = select(*cols).where(_cohort(params, scan=scan, follow=follow))
    if where is not None:
        stmt = stmt.where(where)
    if conn.dialect.name == "sqlite":
        stmt = stmt.offset(0)
    return stmt.subquery("cohort")


def _day_exprs(conn: Connection, c: Any) -> list[ColumnElement[Any]]:
    """The four day differences of :data:`refloop.report.DAY_METRICS` over :func:`_projection` columns, NULL
    where :func:`day_values` leaves a referral out (neither scheduled nor closed: ``j_appt`` is NULL then, and
    the other two need a scheduled or closed referral anyway)."""
    return [
        _diff(conn, c.j_sched, c.j_sent),
        _diff(conn, c.j_appt, c.j_sent),
        _diff(conn, c.j_note, c.j_appt),
        _diff(conn, c.j_closed, c.j_sent),
    ]


def counts(conn: Connection, params: ReportParams, windows: Windows, *, scan: bool | None = None,
           overdue: _Overdue | None = None, worklist: list[tuple[Table, str]] | None = None
           ) -> dict[str, dict[str, int]]:
    """The conditional sums of :data:`refloop.report.COUNT_COLUMNS` per group (one GROUP BY).

    Given ``overdue`` it also counts each leak stage (``leak_<stage>``) and the unclosed referrals that are
    not final (``_open``); given ``worklist`` tables, the "recovered" parts (``_alerted``, ``_recovered``,
    from :func:`worklist_counts`).
    """
    if scan is None:
        scan = wide_range(conn, params.start, params.end)
    per_group, _ = _counts_pass(conn, params, windows, scan=scan, overdue=overdue, plan=None)
    if worklist:
        marks = worklist_counts(conn, params, worklist)
        for key, block in per_group.items():  # every marked referral is a cohort referral, so has a group
            block["_alerted"], block["_recovered"] = marks.get(key, (0, 0))
    return per_group


#: Per referral, one letter in a ``group_concat`` says its status and, for a status with a window, whether it
#: is a leak (:func:`_status_letter`); Python counts the letters. One aggregate instead of one per figure.
_LETTERS = {"closed": ("a", "a"), "completed": ("b", "c"), "sent": ("d", "e"), "scheduled": ("f", "g"),
            "no_show": ("h", "i"), "cancelled": ("j", "j"), "declined": ("k", "k"), "expired": ("k", "k")}
_OTHER = "l"  # any other status: open, never a leak
_UNKNOWN = "u"  # a leak rule SQL cannot settle: _Overdue.unknown
_LEAK_LETTERS = {"seen_no_note": "b", "never_scheduled": "d", "not_seen": "f", "no_show_not_rebooked": "h",
                 "cancelled": "j", "declined": "k"}
_STAGE_OF = {"completed": "seen_no_note", "sent": "never_scheduled", "scheduled": "not_seen",
             "no_show": "no_show_not_rebooked"}
#: Two counts in one integer sum: the second in the high 32 bits (a cohort has fewer than 2**31 referrals).
_HIGH = 1 << 32


def _status_letter(od: _Overdue, c: Any) -> ColumnElement[Any]:
    """The letter of :data:`_LETTERS` for one referral: its status, and for a status with a window whether the
    leak rule of :func:`_leak_conditions` holds (only that status's rule is evaluated), or ``u`` when SQL cannot
    settle it (:meth:`_Overdue.unknown`)."""
    over = _stage_over(od, c)
    unsettled = od.unsettled_statuses()
    known = sorted(od.known or ())
    whens: dict[str, ColumnElement[Any]] = {}
    for status, (yes, no) in _LETTERS.items():
        stage = _STAGE_OF.get(status)
        if stage is None:
            whens[status] = literal(yes)
            continue
        tests = [(c.priority.not_in(known), literal(_UNKNOWN))] if status in unsettled else []
        whens[status] = case(*tests, (over[stage], literal(yes)), else_=literal(no))
    return case(whens, value=c.status, else_=literal(_OTHER))


def _letter_counts(text: str | None, sent: int) -> dict[str, int]:
    """``_open`` and ``leak_<stage>`` from a group's letters (see :data:`_LETTERS`)."""
    n = Counter(text or "")
    out = {f"leak_{stage}": n[letter] for stage, letter in _LEAK_LETTERS.items()}
    out["_open"] = sent - n["a"] - n["j"] - n["k"]
    out["closed"] = n["a"]
    out["_unknown"] = n[_UNKNOWN]
    return out


def _concat_agg(conn: Connection, expr: ColumnElement[Any], sep: str) -> ColumnElement[Any]:
    if _sqlite(conn):
        return func.group_concat(expr, literal(sep))
    return func.string_agg(expr, literal(sep))


def _counts_pass(conn: Connection, params: ReportParams, windows: Windows, *, scan: bool,
                 overdue: _Overdue | None, plan: _DayPlan | None, letters: bool = True
                 ) -> tuple[dict[str, dict[str, int]], dict[str, Any]]:
    """One aggregate over :func:`_projection`: the counts per group and, with a day plan (totals only), the
    figures :func:`_finish_days` needs; returns ``(per_group, day_row)``.

    Every figure costs per-row work in SQLite, so the figures share aggregates where they can: the status
    figures and leak counts are letters of one ``group_concat``; "in window" and "mature" are two counts of one
    sum (mature = in window, or else old enough: the age test is skipped when the milestone settles it).
    """
    raw = ["priority"]
    flags = _Flags({"accepted": R.c.accepted_at.is_not(None), "scheduled": R.c.scheduled_at.is_not(None),
                    "completed": R.c.completed_at.is_not(None),
                    "note_of_completed": and_(R.c.completed_at.is_not(None), R.c.note_received_at.is_not(None))},
                   _size_bound(conn))
    if windows.target_days:
        raw += ["referred_to", "specialty"]
    if overdue is not None and letters:
        raw += ["id", "status", "sent_at", "completed_at"]
    elif overdue is None:
        raw.append("status")
    sub = _projection(conn, params, scan=scan, days=plan is not None, raw=tuple(raw), flags=flags)
    c = sub.c
    now = literal(params.now, DateTime(timezone=True))
    age = _diff(conn, _day_number(conn, now), c.j_sent)  # the same number as _days(now, sent_at)
    priorities = overdue.priorities if overdue is not None else []
    high = literal(_HIGH, BigInteger)

    def in_or_mature(stage: str, later: Any) -> ColumnElement[Any]:
        # "in window" (``later`` is NULL without the milestone, so the test is NULL) counts 1, else "old enough"
        # counts 2**32: the low half is in-window, the sum of both halves the mature referrals. One dispatch on
        # the priority per row: each branch compares with its window as a constant.
        def test(window: Any) -> ColumnElement[Any]:
            return case((_diff(conn, later, c.j_sent) <= window, literal(1, BigInteger)), (age >= window, high))

        full = _window_expr(windows, stage, cols=c)
        known = _priority_windows(conn, windows, stage, priorities)
        if known is None:
            return func.sum(test(full))
        return func.sum(case({p: test(literal(w)) for p, w in known}, value=c.priority, else_=test(full)))

    cols: dict[str, ColumnElement[Any]] = {
        "sent": func.count(),
        **{f"_f{i}": func.sum(c[f"f{i}"]) for i in range(len(flags.columns))},
        "_scheduling": in_or_mature(stall.SCHEDULING, c.j_sched),
        "_visit": in_or_mature(stall.VISIT, c.j_comp),
    }
    if overdue is not None and letters:
        cols["_letters"] = _concat_agg(conn, _status_letter(overdue, c), "")
    elif overdue is None:
        cols["closed"] = _count(c.status == "closed")
    day_cols: dict[str, ColumnElement[Any]] = {}
    if plan is not None:
        for i, (expr, window) in enumerate(zip(_day_exprs(conn, c), plan.windows, strict=True)):
            if window is not None:
                day_cols |= {f"d{i}_{k}": v for k, v in window.aggregates(expr).items()}
    g = (c.g if params.by else _group_expr(conn, None)).label("g")
    stmt = _grouped(select(g, *(v.label(n) for n, v in (cols | day_cols).items())).select_from(sub), g,
                    params.by)
    per_group: dict[str, dict[str, int]] = {}
    day_row: dict[str, Any] = {}
    for row in conn.execute(stmt):
        block = {n: int(getattr(row, n) or 0) for n in cols if n != "_letters"}
        block |= flags.unpack([block.pop(f"_f{i}") for i in range(len(flags.columns))])
        for packed, inside, mature in (("_scheduling", "scheduled_in_window", "scheduling_mature"),
                                       ("_visit", "completed_in_window", "visit_mature")):
            both = block.pop(packed)
            block[inside], block[mature] = both % _HIGH, both % _HIGH + both // _HIGH
        if "_letters" in cols:
            block |= _letter_counts(row._letters, block["sent"])
        per_group[str(row.g or "")] = block
        day_row = {n: getattr(row, n) for n in day_cols}
    return per_group, day_row


# -- "recovered": the worklist and reminder tables -------------------------------------------------
def _has_referral_index(conn: Connection, table: Table) -> bool:
    """Whether an index (or unique constraint) of *table* starts with ``referral_id``."""
    insp = inspect(conn)
    found: list[list[Any]] = [list(i.get("column_names") or []) for i in insp.get_indexes(table.name)]
    found += [list(u.get("column_names") or []) for u in insp.get_unique_constraints(table.name)]
    return any(cols[:1] == ["referral_id"] for cols in found)


def _last_completed(conn: Connection, statuses: Iterable[str]) -> datetime | None:
    """The latest ``completed_at`` of any referral with one of these statuses (a bound for the cohort's), one
    ``ix_referrals_status_completed`` search each."""
    found = conn.execute(select(*(select(func.max(R.c.completed_at)).where(R.c.status == s).scalar_subquery()
                                  for s in statuses))).one()
    times = [moment for v in found if (moment := aware(v)) is not None]
    return max(times, default=None)


def _marks(tables: list[tuple[Table, str]]) -> Any:
    """Every alert and reminder as ``(rid, at)``: the referral and when it was put on the worklist/reminded."""
    return union_all(*(select(t.c.referral_id.label("rid"), t.c[when].label("at"))
                       .where(t.c.referral_id.is_not(None)) for t, when in tables)).subquery("marks")


def worklist_counts(conn: Connection, params: ReportParams, tables: list[tuple[Table, str]], *,
                    few_outside: bool = False, last_completed: datetime | None = None
                    ) -> dict[str, tuple[int, int]]:
    """Per group: cohort referrals that were on the worklist or got a reminder, and those of them completed
    at or after the first alert/reminder (``completed_at >= min(first)`` is "some mark at or before
    ``completed_at``").

    Read from the marks' side, one row per alert/reminder, each joined to its referral by id (probing the
    marks of every cohort referral instead costs an index search per referral). ``few_outside`` (an
    unfiltered, ungrouped cohort with few referrals outside it: :func:`_few_outside`) counts the marked
    referrals store-wide instead and takes off those outside the cohort, so only the marks that can count as
    "recovered" are joined: those not after ``last_completed``, a bound of the cohort's latest ``completed_at``
    (None: nothing completed).
    """
    marks = _marks(tables)
    if few_outside and not params.by:
        recovered_only = [marks.c.at <= literal(last_completed, DateTime(timezone=True))] if last_completed else []
        done = conn.execute(select(func.count(func.distinct(marks.c.rid)))
                            .select_from(marks.join(R, R.c.id == marks.c.rid))
                            .where(*recovered_only, R.c.completed_at.is_not(None), marks.c.at <= R.c.completed_at,
                                   _cohort(params, follow=_sqlite(conn)))).scalar_one() if last_completed else 0
        return {"": (_marked_store_wide(conn, params, tables), int(done))}
    g = _group_expr(conn, params.by).label("g")
    done_if = and_(R.c.completed_at.is_not(None), marks.c.at <= R.c.completed_at)
    stmt = _grouped(select(g, func.count(func.distinct(marks.c.rid)).label("alerted"),
                           func.count(func.distinct(case((done_if, marks.c.rid)))).label("done"))
                    .select_from(marks.join(R, R.c.id == marks.c.rid))
                    .where(_cohort(params, follow=_sqlite(conn))), g, params.by)
    return {str(row.g or ""): (int(row.alerted), int(row.done)) for row in conn.execute(stmt)}


def _marked_store_wide(conn: Connection, params: ReportParams, tables: list[tuple[Table, str]]) -> int:
    """Cohort referrals with an alert or reminder: distinct referrals of each table not in an earlier one
    (an indexed table first, read in index order), less the marked referrals outside the cohort."""
    ordered = sorted(tables, key=lambda tw: not _has_referral_index(conn, tw[0]))

    def marked(table: Table, rid: Any) -> ColumnElement[bool]:
        if _has_referral_index(conn, table):
            return select(literal(1)).where(table.c.referral_id == rid).exists()
        return rid.in_(select(table.c.referral_id).where(table.c.referral_id.is_not(None)))

    total = 0
    for i, (table, _) in enumerate(ordered):
        rid = table.c.referral_id
        earlier = [~marked(t, rid) for t, _ in ordered[:i]]
        total += conn.execute(select(func.count(func.distinct(rid))).where(rid.is_not(None), *earlier)).scalar_one()
    outside = conn.execute(select(func.count()).where(_outside(params), or_(*(marked(t, R.c.id) for t, _ in ordered)))
                           ).scalar_one()
    return int(total) - int(outside)


# -- appointment events ----------------------------------------------------------------------------
#: LIKE 'appt:%' is case-insensitive on SQLite: every subject it can match sorts in [APPT:, appt;), a range
#: an index on ``subject`` can read. The LIKE stays as the filter; the range only narrows where to look.
_APPT_LO, _APPT_HI = "APPT:", "appt;"
#: Appointments and marked referrals of a cohort that is most of the store are counted store-wide and corrected
#: for the referrals outside it, when those are at most this share of the cohort (see :func:`_few_outside`).
_OUTSIDE_SHARE = 0.25


def _is_appt(conn: Connection, subject: Any) -> ColumnElement[bool]:
    """``subject LIKE 'appt:%'``; on SQLite as a range of ``ix_referral_events_subject`` (byte order) in which a
    lowercase 'appt:' (what refloop writes) is settled by two comparisons and LIKE decides the rest."""
    if conn.dialect.name != "sqlite":  # a collation need not sort bytes: plain LIKE
        return subject.like("appt:%")
    return and_(subject >= _APPT_LO, subject < _APPT_HI,
                or_(and_(subject >= "appt:", subject < _APPT_HI), subject.like("appt:%")))


def _no_show_counts(conn: Connection, params: ReportParams) -> dict[str, dict[str, int]]:
    """The no-show columns of :func:`event_counts`, read from the no-show events (a few per cent of events)
    through ``ix_referral_events_kind_subject`` (which covers them), each joined to its referral by id."""
    g = _group_expr(conn, params.by).label("g")
    rebooked = R.c.status.in_(("scheduled", "completed", "closed"))
    stmt = _grouped(select(g, func.count(func.distinct(E.c.subject)).label("no_show_appointments"),
                           func.count(func.distinct(R.c.id)).label("no_show_referrals"),
                           func.count(func.distinct(case((rebooked, R.c.id)))).label("rebooked_after_no_show"))
                    .select_from(E.join(R, R.c.id == E.c.referral_id))
                    .where(E.c.kind == "appointment_no_show", E.c.subject.like("appt:%"),
                           _cohort(params, follow=_sqlite(conn))), g, params.by)
    return {str(row.g or ""): {"no_show_appointments": int(row.no_show_appointments),
                               "no_show_referrals": int(row.no_show_referrals),
                               "rebooked_after_no_show": int(row.rebooked_after_no_show)}
            for row in conn.execute(stmt)}


def _appointments_joined(conn: Connection, params: ReportParams, scan: bool) -> dict[str, int]:
    """Distinct appointment subjects per group, from the cohort referrals' events."""
    g = _group_expr(conn, params.by).label("g")
    conds = [_cohort(params, scan=scan), E.c.subject.like("appt:%")]
    if scan:
        # ix_referrals_status_sent covers (id, status, sent_at): without a column it lacks, SQLite would walk it
        # (status, sent_at order) rather than the table. placer_id is NOT NULL, so this keeps every row.
        conds.append(R.c.placer_id.is_not(None))
    stmt = _grouped(select(g, func.count(func.distinct(E.c.subject)).label("n"))
                    .select_from(R.join(E, E.c.referral_id == R.c.id)).where(*conds), g, params.by)
    return {str(row.g or ""): int(row.n) for row in conn.execute(stmt)}


def _outside(params: ReportParams) -> ColumnElement[bool]:
    """Exactly the referrals *not* in an unfiltered cohort (each term can use ``ix_referrals_sent_at``)."""
    return or_(R.c.sent_at.is_(None), R.c.sent_at < params.start, R.c.sent_at >= params.end)


def _few_outside(conn: Connection, params: ReportParams, cohort_size: int) -> bool:
    """Whether the cohort is unfiltered and ungrouped and at most :data:`_OUTSIDE_SHARE` of its size lies
    outside it: then counting store-wide and taking off what lies outside reads far less than the cohort."""
    if params.by or params.filters:
        return False
    limit = int(cohort_size * _OUTSIDE_SHARE)
    outside = select(R.c.id).where(_outside(params)).limit(limit + 1).subquery()
    return int(conn.execute(select(func.count()).select_from(outside)).scalar_one()) <= limit


def _appointments_outside(conn: Connection, params: ReportParams) -> int:
    """Distinct appointment subjects of an unfiltered cohort's events, counted store-wide (see
    :func:`_few_outside`).

    All appointment subjects are counted in ``ix_referral_events_subject`` order (no sorting, no table rows).
    A subject is then taken off when no event carrying it belongs to a cohort referral: such subjects are
    among those of the events of referrals outside the cohort and of unlinked events, few when the cohort is
    most of the store. The result is the cohort's count of distinct subjects exactly.
    """
    everywhere = conn.execute(select(func.count(func.distinct(E.c.subject)))
                              .where(_is_appt(conn, E.c.subject))).scalar_one()
    # subjects with an event outside the cohort (its referral outside it, or none) ...
    outside_ids = select(R.c.id).where(_outside(params))
    out_subjects = (select(E.c.subject).where(or_(E.c.referral_id.in_(outside_ids), E.c.referral_id.is_(None)),
                                              E.c.subject.like("appt:%"))
                    .distinct().subquery("outside_subjects"))
    # ... that no event of a cohort referral carries
    e2 = E.alias("inside")
    inside = (select(literal(1)).select_from(e2.join(R, R.c.id == e2.c.referral_id))
              .where(e2.c.subject == out_subjects.c.subject, _cohort(params, follow=_sqlite(conn))).exists())
    gone = conn.execute(select(func.count()).select_from(out_subjects).where(~inside)).scalar_one()
    return int(everywhere) - int(gone)


def event_counts(conn: Connection, params: ReportParams, *, scan: bool | None = None,
                 few_outside: bool = False) -> dict[str, dict[str, int]]:
    """No-show figures per group from the appointment events of cohort referrals.

    Distinct appointment subjects come from :func:`_appointments_outside` when ``few_outside`` (see
    :func:`_few_outside`), else from one join of the cohort with its events; the no-show columns from the
    no-show events alone (:func:`_no_show_counts`).
    """
    if scan is None:
        scan = wide_range(conn, params.start, params.end)
    if few_outside and not params.by:
        appointments = {"": _appointments_outside(conn, params)}
    else:
        appointments = _appointments_joined(conn, params, scan)
    no_shows = _no_show_counts(conn, params)
    out: dict[str, dict[str, int]] = {}
    for key in sorted(set(appointments) | set(no_shows)):
        out[key] = {"appointments": appointments.get(key, 0),
                    **no_shows.get(key, dict.fromkeys(rp.EVENT_COLUMNS[1:], 0))}
    return out


# -- day differences -------------------------------------------------------------------------------
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


def _one_series(conn: Connection, params: ReportParams, scan: bool, index: int) -> list[float]:
    """One metric of :func:`day_values` for the totals (the fallback of the windowed figures), sorted."""
    sub = _projection(conn, params, scan=scan, days=True, raw=())
    expr = _day_exprs(conn, sub.c)[index]
    values = [v for (v,) in conn.execute(select(expr).select_from(sub).where(expr.is_not(None)))]
    if conn.dialect.name != "sqlite":
        values = [float(v) for v in values]
    values.sort()
    return values


#: The windowed day figures (:class:`_DayPlan`): a systematic sample of about this many referral ids ...
_SAMPLE_IDS = 16_384
#: ... of which at least this many must have a difference, else the metric is read in full ...
_MIN_SAMPLE = 1_000
#: ... and each window spans the sampled quantile plus or minus this many standard errors (normal
#: approximation of the sample quantile's rank) and a few ranks, so a miss is very unlikely; a miss only costs
#: reading that metric in full.
_WINDOW_Z = 5.0
#: Day differences travel as exact integers: ``d * 2**32``. Every ``julianday()`` of a date SQLite can parse
#: (years 0000-9999) lies in [2**20, 2**23) and so is a multiple of 2**-32, and so is a difference of two.
_SCALE = 2.0 ** 32
_NO_MARKERS = str.maketrans(dict.fromkeys("abcz"))  # every marker :meth:`_Window.markers` can use
#: The largest double below zero: ``d <= _BELOW_ZERO`` is ``d < 0``.
_BELOW_ZERO = -5e-324


@dataclass(frozen=True)
class _Window:
    """Where to look for the median and the p90 of one metric: disjoint ranges ``(lo, hi)`` in order (None:
    unbounded), the first one below zero. The counts pass returns the values in the ranges exactly and a marker
    for every other value, so Python knows n and how many values lie below each range (:meth:`parts`)."""

    ranges: tuple[tuple[float | None, float | None], ...]

    def markers(self) -> list[str | None]:
        """Per range, the marker of the values between it and the previous one (None: no lower bound, so
        nothing between), then the marker of the values above the last range (None: it has no upper bound)."""
        out: list[str | None] = [None if lo is None else "abc"[i] for i, (lo, _) in enumerate(self.ranges)]
        return [*out, None if self.ranges[-1][1] is None else "z"]

    def aggregates(self, d: ColumnElement[Any]) -> dict[str, ColumnElement[Any]]:
        """The counts pass's aggregates for difference *d*: the float sum (for :func:`_rounded_mean`) and
        ``values``: one token per value, tested once in order (a ``CASE`` chain): inside a range the exact
        integer ``d * 2**32`` (``x`` should one not be exact), else the marker of its stretch (:meth:`markers`).
        """
        scaled = d * _SCALE
        as_int = cast(scaled, Integer)
        exact = case((as_int == scaled, as_int), else_=literal("x"))
        marks = self.markers()
        whens: list[tuple[ColumnElement[bool], ColumnElement[Any]]] = [(d.is_(None), literal(None))]  # half are
        for (lo, hi), marker in zip(self.ranges, marks, strict=False):
            if lo is not None and marker is not None:
                whens.append((d < lo, literal(marker)))
            whens.append((d <= hi if hi is not None else literal(True), exact))
        if marks[-1] is not None:
            whens.append((literal(True), literal(marks[-1])))
        return {"sum": func.total(d), "values": func.group_concat(case(*whens))}

    def parts(self, text: str) -> tuple[int, list[tuple[int, list[float]]]] | None:
        """n and ``(how many values lie below, sorted values)`` per range, from the ``values`` tokens (None if a
        value did not travel exactly). Markers are letters and values digits, so the markers are counted in the
        text itself and only the values are split out."""
        if not text:
            return 0, [(0, []) for _ in self.ranges]
        if "x" in text:
            return None
        n = text.count(",") + 1
        marks = self.markers()
        values = sorted(int(t) / _SCALE for t in filter(None, text.translate(_NO_MARKERS).split(",")))
        out: list[tuple[int, list[float]]] = []
        below, rest = 0, values
        for i, ((_, hi), marker) in enumerate(zip(self.ranges, marks, strict=False)):
            below += text.count(marker) if marker is not None else 0
            part = [v for v in rest if hi is None or v <= hi] if i < len(self.ranges) - 1 else rest
            out.append((below, part))
            below += len(part)
            rest = rest[len(part):]
        return n, out


@dataclass(frozen=True)
class _DayPlan:
    """Per day metric a :class:`_Window` (None: that metric is read in full by :func:`_one_series`)."""

    windows: list[_Window | None]
    priorities: list[str] = field(default_factory=list)  # every priority the sample saw


def _day_plan(conn: Connection, params: ReportParams) -> _DayPlan | None:
    """Windows for the median and p90 of each day metric, from a systematic sample of referral ids.

    Only for SQLite (the integer transport relies on ``julianday()``) and the totals (no groups). A cohort with
    too few sampled differences is left to :func:`day_values`, which is cheap for a small cohort.
    """
    if conn.dialect.name != "sqlite" or params.by:
        return None
    lo, hi = conn.execute(select(select(func.min(R.c.id)).scalar_subquery(),
                                 select(func.max(R.c.id)).scalar_subquery())).one()
    if lo is None or hi - lo + 1 < 4 * _SAMPLE_IDS:
        return None
    step = (hi - lo + 1) // _SAMPLE_IDS
    ids = select(literal(lo, Integer).label("x")).cte("sample_ids", recursive=True)
    ids = ids.union_all(select((ids.c.x + step).label("x")).where(ids.c.x + step <= hi))
    sub = _projection(conn, params, scan=True, follow=True, days=True, where=R.c.id.in_(select(ids.c.x)),
                      raw=("priority",))
    rows = conn.execute(select(sub.c.priority, *_day_exprs(conn, sub.c)).select_from(sub)).all()
    windows: list[_Window | None] = []
    columns = list(zip(*rows, strict=True)) if rows else [()] * (1 + len(rp.DAY_METRICS))
    for column in columns[1:]:
        sample = sorted(v for v in column if v is not None)
        windows.append(_window(sample) if len(sample) >= _MIN_SAMPLE else None)
    if not any(w is not None for w in windows):
        return None
    return _DayPlan(windows, sorted(set(columns[0])))


def _window(sample: list[float]) -> _Window:
    """Ranges around the median and the p90 of a sorted sample (merged when they meet), and below zero: the
    negative values travel too, so that :func:`_rounded_mean` can bound the sum of magnitudes without another
    aggregate (there are usually none)."""
    m = len(sample)

    def bounds(q: float) -> tuple[float | None, float | None]:
        h = _WINDOW_Z * math.sqrt(q * (1 - q) / m) + 4 / m
        below, above = math.floor((q - h) * m) - 1, math.ceil((q + h) * m)
        return (sample[below] if below >= 0 else None), (sample[above] if above < m else None)

    ranges: list[tuple[float | None, float | None]] = [(None, _BELOW_ZERO), bounds(0.5), bounds(0.9)]
    merged: list[tuple[float | None, float | None]] = []
    for lo, hi in ranges:
        if merged and (merged[-1][1] is None or lo is None or lo <= merged[-1][1]):  # they meet: one range
            last_lo, last_hi = merged[-1]
            merged[-1] = (last_lo, None if hi is None or last_hi is None else max(hi, last_hi))
        else:
            merged.append((lo, hi))
    return _Window(tuple(merged))


def _rounded_mean(total: float, negatives: Fraction, n: int) -> float | None:
    """``round(sum(values) / n, 2)`` as :func:`refloop.report.distribution` computes it over the sorted values,
    decided from a float sum in another order (``total``); None when the two could round differently.

    ``negatives`` is the exact sum of the negative values, so the sum of magnitudes is the exact sum minus
    twice it. Both float sums are within ``gamma(n) * sum(|v|)`` of the exact sum (recursive summation in any
    order, plain or compensated), so the mean Python would compute lies within ``r`` of ``total / n``; when no
    rounding boundary (an odd multiple of 0.005, or 0 for the sign of zero) lies within ``r``, every number
    there rounds alike.
    """
    u = Fraction(1, 2**53)
    gamma = 2 * n * u  # > gamma(n - 1) = (n - 1) u / (1 - (n - 1) u) while n u < 1/2
    if gamma >= Fraction(1, 4) or not math.isfinite(total):
        return None
    magnitude = (Fraction(total) - 2 * negatives) / (1 - gamma)  # >= the exact sum of magnitudes
    centre = Fraction(total) / n
    radius = (2 * gamma * magnitude + 4 * u * (abs(Fraction(total)) + 2 * gamma * magnitude)) / n
    radius += Fraction(1, 10**15)
    lo, hi = centre - radius, centre + radius
    if lo <= 0 <= hi or math.floor(hi * 200 - Fraction(1, 2)) >= math.ceil(lo * 200 - Fraction(1, 2)):
        return None  # contains 0 or some (2j + 1) / 200
    return round(total / n, 2)


def _windowed(row: Mapping[str, Any], i: int, window: _Window) -> dict[str, Any] | None:
    """One metric's :func:`refloop.report.distribution` from the counts pass, or None to read it in full."""
    found = window.parts(row[f"d{i}_values"] or "")
    if found is None:
        return None
    n, parts = found
    if n == 0:
        return {"n": 0, "mean": None, "median": None, "p90": None}

    def value(k: int) -> float | None:  # the k-th smallest (0-based), if a range holds it
        for below, part in parts:
            if below <= k < below + len(part):
                return part[k - below]
        return None

    mid = n // 2
    upper, p90 = value(mid), value(max(math.ceil(0.9 * n) - 1, 0))
    lower = upper if n % 2 else value(mid - 1)
    negatives = sum((Fraction(v) for v in parts[0][1] if v < 0), Fraction(0))  # every negative value travelled
    mean = _rounded_mean(float(row[f"d{i}_sum"]), negatives, n)
    if mean is None or p90 is None or upper is None or lower is None:
        return None
    median = upper if n % 2 else (lower + upper) / 2
    return {"n": n, "mean": mean, "median": round(median, 2), "p90": round(p90, 2)}


def _finish_days(conn: Connection, params: ReportParams, scan: bool, plan: _DayPlan,
                 row: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The totals' day distributions: windowed where the pass settled them, else read in full."""
    out: dict[str, dict[str, Any]] = {}
    for i, (name, window) in enumerate(zip(rp.DAY_METRICS, plan.windows, strict=True)):
        found = _windowed(row, i, window) if window is not None and row else None
        out[name] = found if found is not None else rp.distribution(_one_series(conn, params, scan, i),
                                                                    presorted=True)
    return out


def open_rows(conn: Connection, params: ReportParams, *, scan: bool = False,
              where: ColumnElement[bool] | None = None, limit: int | None = None,
              ordered: bool = True) -> Iterator[rp.OpenRow]:
    """Unclosed cohort referrals with what the leak rules need, streamed in (sent_at, id) order.

    ``where`` narrows them (to the ones that can be leaks), ``limit`` stops after that many rows. Not
    ``ordered``: in any order, reached through the indexes ``where`` offers (none on ``sent_at``).
    """
    g = _group_expr(conn, params.by).label("g")
    stmt = (
        select(R.c.id, R.c.placer_id, R.c.status, R.c.priority, R.c.referred_to, R.c.specialty, R.c.sent_at,
               R.c.completed_at, case((R.c.status == "no_show", _last_no_show())).label("last_no_show"), g)
        .where(_cohort(params, scan=scan, follow=not ordered and _sqlite(conn)), R.c.status != "closed")
    )
    if ordered:
        stmt = stmt.order_by(R.c.sent_at, R.c.id)
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


# -- status figures from the status indexes --------------------------------------------------------
def _status_counts(conn: Connection, params: ReportParams) -> dict[str, int]:
    """Referrals per status in an unfiltered cohort, from ``ix_referrals_status_sent`` alone."""
    stmt = (select(R.c.status, func.count().label("n"))
            .where(R.c.sent_at >= params.start, R.c.sent_at < params.end).group_by(R.c.status))
    return {str(status): int(n) for status, n in conn.execute(stmt)}


#: The leak rules with one clock each, by status: (stage of its window, leak stage, the referral's clock).
_CLOCKS = (("sent", stall.SCHEDULING, "never_scheduled", "sent_at"),
           ("scheduled", stall.VISIT, "not_seen", "sent_at"),
           ("no_show", stall.VISIT, "no_show_not_rebooked", "sent_at"),
           ("completed", stall.NOTE, "seen_no_note", "completed_at"))


def _status_figures(conn: Connection, params: ReportParams, windows: Windows, od: _Overdue,
                    by_status: Mapping[str, int]) -> dict[str, int]:
    """``closed``, ``_open`` and ``leak_<stage>`` of an unfiltered cohort with few referrals outside it (see
    :func:`_few_outside`), without a pass over the cohort.

    Every window a referral can get at a stage is one of the configured ones, so a clock started before ``now``
    minus the longest of them makes a leak whatever the referral's window, and one started after ``now`` minus
    the shortest never does. The sure ones are counted in ``ix_referrals_status_sent`` /
    ``ix_referrals_status_completed`` (completions store-wide, less those outside the cohort); the referrals in
    between, and every no-show whose visit window is not surely over (its rebooking clock decides), by the leak
    conditions of :func:`_stage_over`, or by :func:`refloop.report.classify` where SQL cannot settle them
    (:meth:`_Overdue.unknown`).
    """
    def cutoff(days: float) -> ColumnElement[Any]:
        return literal(params.now - timedelta(microseconds=_elapsed_us(days)), DateTime(timezone=True))

    out = {f"leak_{stage}": 0 for stage in rp.LEAK_STAGES}
    out["closed"] = by_status.get("closed", 0)
    out["leak_cancelled"] = by_status.get("cancelled", 0)
    out["leak_declined"] = by_status.get("declined", 0) + by_status.get("expired", 0)
    out["_open"] = sum(by_status.values()) - out["closed"] - out["leak_cancelled"] - out["leak_declined"]
    out["_unknown"] = 0
    over = _stage_over(od, R.c)
    unknown = od.unknown()
    in_cohort = _cohort(params, follow=_sqlite(conn))
    unsure: list[ColumnElement[bool]] = []
    for status, stage, leak, clock_name in _CLOCKS:
        days = {windows.stage_days[stage]} | {d for (_, st), d in windows.priority_days.items() if st == stage}
        days |= {d for (_, st), d in windows.target_days.items() if st == stage}
        surely, never = cutoff(max(days)), cutoff(min(days))
        clock = getattr(R.c, clock_name)
        if clock_name == "sent_at":
            sure = int(conn.execute(select(func.count()).where(
                R.c.status == status, clock >= params.start, clock < params.end, clock <= surely)).scalar_one())
        else:  # store-wide (index only), less the referrals outside the cohort (reached through ix_referrals_sent_at)
            sure = int(conn.execute(select(func.count()).where(R.c.status == status, clock <= surely)).scalar_one())
            hint = _no_index if _sqlite(conn) else (lambda column: column)
            sure -= int(conn.execute(select(func.count()).where(
                _outside(params), hint(R.c.status) == status, hint(clock) <= surely)).scalar_one())
        band = [R.c.status == status, clock > surely]
        if status != "no_show":  # a no-show's rebooking clock can make it a leak whenever it was sent
            band.append(clock <= never)
        settled = int(conn.execute(select(func.count()).where(*band, in_cohort, ~unknown, over[leak])).scalar_one())
        out[f"leak_{leak}"] = sure + settled
        unsure.append(and_(*band, unknown))
    if od.known is not None:
        for row in open_rows(conn, params, where=or_(*unsure), ordered=False):
            found = rp.classify(row, params.now, windows)
            if found is not None:
                out[f"leak_{found[0]}"] += 1
    return out


def _recovered_block(alerted: int, done: int, tables: list[tuple[Table, str]]) -> dict[str, Any]:
    if not tables:
        return {**rp.ratio(0, 0), "count": 0, "note": "no alerts table in this database yet: reported as 0"}
    return {**rp.ratio(done, alerted), "count": done,
            "note": "on the worklist: " + ", ".join(t.name for t, _ in tables)}


def recovered(conn: Connection, params: ReportParams, *, scan: bool | None = None) -> dict[str, Any]:
    """Referrals that were on the worklist or got a reminder and *then* completed, over those that were on it.

    "Then" means ``completed_at`` at or after the first alert/reminder: a referral that was completed before
    anyone chased it was not recovered by the worklist. Without an alerts table this reports 0 with a note.
    """
    tables = worklist_tables(conn)
    if not tables:
        return _recovered_block(0, 0, tables)
    found = worklist_counts(conn, params, tables)
    return _recovered_block(sum(a for a, _ in found.values()), sum(d for _, d in found.values()), tables)


def cms50(conn: Connection, year: int) -> dict[str, Any]:
    """Denominator and numerator of the CMS50-style figure (see :mod:`refloop.report`), in one query.

    The first candidate of each patient is the ``row_number() = 1`` of a window ordered by ``(sent_at, id)``;
    written here as one group per patient (read in ``ix_referrals_patient_first`` order, which covers the
    query: no sorting, no table rows). A patient whose candidates all met the measure, or none, needs no
    ranking; only for a patient with both is the first candidate looked up (one index search).
    """
    start = datetime(year, 1, 1, tzinfo=UTC)
    cutoff = datetime(year, 11, 1, tzinfo=UTC)  # sent_at < 1 Nov 00:00 == on or before 31 Oct 23:59:59.999999
    end = datetime(year + 1, 1, 1, tzinfo=UTC)

    def candidate(r: Any, sent: Any) -> list[ColumnElement[bool]]:
        return [r.c.patient_key != "", sent.is_not(None), sent >= start, sent < cutoff, r.c.status != "cancelled"]

    def met(r: Any) -> ColumnElement[bool]:
        return and_(r.c.note_received_at.is_not(None), r.c.note_received_at > r.c.sent_at, r.c.note_received_at < end)

    # on SQLite no index on sent_at alone may drive the grouping (+sent_at): the patient index orders it
    sent = _no_index(R.c.sent_at) if _sqlite(conn) else R.c.sent_at
    patients = (select(R.c.patient_key.label("pk"), func.count().label("n"), _count(met(R)).label("met"))
                .where(*candidate(R, sent)).group_by(R.c.patient_key).subquery("patients"))
    first = R.alias("first")
    first_met = (select(case((met(first), literal(1)), else_=literal(0)))
                 .where(first.c.patient_key == patients.c.pk, *candidate(first, first.c.sent_at))
                 .order_by(first.c.sent_at, first.c.id).limit(1).scalar_subquery())
    mixed = and_(patients.c.met > 0, patients.c.met < patients.c.n)
    row = conn.execute(select(func.count().label("den"),
                              _count(or_(patients.c.met == patients.c.n, and_(mixed, first_met == 1))).label("num"))
                       .select_from(patients)).one()
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


def _unsettled(od: _Overdue, row: rp.OpenRow) -> bool:
    """Whether SQL could not settle this referral's leak rule (:meth:`_Overdue.unknown`)."""
    return od.known is not None and row.status in od.unsettled_statuses() and row.priority not in od.known


def _unknown_leaks(conn: Connection, params: ReportParams, windows: Windows, scan: bool, od: _Overdue,
                   per_group: dict[str, dict[str, int]]) -> None:
    """Adds to ``leak_<stage>`` the leaks among the referrals SQL could not settle, classified in Python."""
    for row in open_rows(conn, params, scan=scan, where=od.unknown()):
        found = rp.classify(row, params.now, windows)
        if found is not None:
            per_group[row.group][f"leak_{found[0]}"] += 1


def build_report(conn: Connection, params: ReportParams, windows: Windows) -> dict[str, Any]:
    """The whole report as one JSON-ready dict; the CLI and ``GET /api/report`` both return exactly this.

    Passes over the cohort: one aggregate (counts, leak counts per stage, in flight and, for the totals on
    SQLite, the day figures around their median and p90), the worklist marks, the appointment events, the
    first ``leak_limit`` leaks, and CMS50.
    """
    scan = wide_range(conn, params.start, params.end)
    plan = _day_plan(conn, params)
    overdue = _overdue(conn, params, windows, scan, sampled=plan.priorities if plan is not None else None)
    tables = worklist_tables(conn)
    # an unfiltered cohort that is most of the store: the status figures come from the status indexes
    by_status = _status_counts(conn, params) if not params.by and not params.filters else None
    few = by_status is not None and _few_outside(conn, params, sum(by_status.values()))
    indexed = few and not windows.business_days
    per_group, day_row = _counts_pass(conn, params, windows, scan=scan, overdue=overdue, plan=plan,
                                      letters=not indexed)
    if indexed and per_group and by_status is not None:
        per_group[""] |= _status_figures(conn, params, windows, overdue, by_status)
    last_completed = _last_completed(conn, by_status) if few and tables and by_status else None
    marks = worklist_counts(conn, params, tables, few_outside=few, last_completed=last_completed) if tables else {}
    per_events = event_counts(conn, params, scan=scan, few_outside=few)
    if plan is not None:
        per_days: dict[str, dict[str, list[float]]] = {}
        totals_days = _finish_days(conn, params, scan, plan, day_row) if per_group else None
    else:
        per_days, totals_days = day_values(conn, params, scan=scan), None
    conditions = _leak_conditions(overdue)
    unknown = sum(c["_unknown"] for c in per_group.values())
    candidates = or_(*conditions.values(), overdue.unknown())
    open_count = {k: c["_open"] for k, c in per_group.items()}

    leaks: list[dict[str, Any]] = []
    exact = not windows.business_days
    if exact and unknown:
        _unknown_leaks(conn, params, windows, scan, overdue, per_group)
    if exact:
        # Without business days the SQL conditions are the leak rules, so SQL counts the leaks and only the
        # listed ones are read (oldest first, as the loop below would reach them). Python re-classifies those
        # for stage and overdue days; a disagreement would mean the SQL drifted from the rules, so it is not
        # trusted and the row-by-row path decides instead. Referrals SQL could not settle (an unsampled
        # priority) are read too, and are leaks only if Python says so.
        by_stage = {s: sum(c[f"leak_{s}"] for c in per_group.values()) for s in rp.LEAK_STAGES}
        leak_count = {k: sum(c[f"leak_{s}"] for s in rp.LEAK_STAGES) for k, c in per_group.items()}
        in_flight = {k: c["_open"] - sum(c[f"leak_{s}"] for s in _OPEN_STAGES) for k, c in per_group.items()}
        limit = params.leak_limit + unknown
        while params.leak_limit > 0:
            leaks, read = [], 0
            for row in open_rows(conn, params, where=candidates, limit=limit):
                read += 1
                found = rp.classify(row, params.now, windows)
                if found is None:
                    if _unsettled(overdue, row):
                        continue
                    exact = False
                    break
                leaks.append(rp.leak_entry(row, found[0], found[1], params.now))
                if len(leaks) == params.leak_limit:
                    break
            if not exact or len(leaks) == params.leak_limit or read < limit:
                break
            limit *= 2  # unsettled referrals that were no leaks took places: read further
    if not exact:
        leaks, leak_count, in_flight, by_stage = _leaks_by_row(conn, params, windows, scan, candidates, open_count)
    leaks.sort(key=lambda x: (-x["age_days"], x["placer_id"]))

    def block(key: str | None) -> dict[str, Any]:
        if key is None:
            c, e = _sum(per_group, rp.COUNT_COLUMNS), _sum(per_events, rp.EVENT_COLUMNS)
            if totals_days is not None:
                dist = totals_days
            else:
                if len(per_days) == 1:  # one group: its series are the totals' (already sorted)
                    days: dict[str, list[float]] = next(iter(per_days.values()))
                else:  # concatenated sorted runs: the sort merges them
                    days = {n: sorted(v for d in per_days.values() for v in d[n]) for n in rp.DAY_METRICS}
                dist = {n: rp.distribution(days[n], presorted=True) for n in rp.DAY_METRICS}
            flight, leak = sum(in_flight.values()), sum(leak_count.values())
        else:
            c, e = per_group.get(key, _EMPTY_COUNTS), per_events.get(key, _EMPTY_EVENTS)
            days = per_days.get(key) or {n: [] for n in rp.DAY_METRICS}
            dist = {n: rp.distribution(days[n], presorted=True) for n in rp.DAY_METRICS}
            flight, leak = in_flight.get(key, 0), leak_count.get(key, 0)
        totals = {"sent": c["sent"], "accepted": c["accepted"], "scheduled": c["scheduled"],
                  "completed": c["completed"], "note_received": c["note_of_completed"], "closed": c["closed"],
                  "appointments": e["appointments"], "no_shows": e["no_show_appointments"],
                  "in_flight": flight, "leaks": leak}
        return {"totals": totals, "rates": rp.rates(c, e), "days": dist}

    whole = block(None)
    whole["totals"]["leaks_by_stage"] = by_stage
    whole["rates"]["recovered"] = _recovered_block(sum(a for a, _ in marks.values()),
                                                   sum(d for _, d in marks.values()), tables)
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

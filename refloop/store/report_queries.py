"""SQL for the cohort report (:mod:`refloop.report` holds the definitions and the arithmetic on results).

Why it looks like this: every figure is plain SQL over the ``referrals`` projection, because the fold keeps
on each row what the report needs (:func:`refloop.store.referrals.projection_values`): where and when the
referral leaks (``leak_stage``/``leak_at``), when its scheduling and visit windows end, the durations between
milestones in whole seconds, its appointment counts, and ``report_bits`` (what the report counts that does
not depend on ``now``); ``first_marked_at`` (first on the worklist or reminded) and ``cms50_first`` (the
patient's first CMS50 candidate of its year) are kept by their own writers. So the report is one grouped
pass for the counts, rates, leak and appointment figures and the durations' counts and sums; per duration
the values at the exact ranks of the median and p90 by ORDER BY/OFFSET on an index (a ranked pass per
duration for ``--by`` groups); the first ``leak_limit`` leaks; and CMS50 as one index range.
No sampling, no fallbacks, no second path: a window change is applied by rewriting rows (the scan does it
in chunks), and a report run before that is done says how many rows still carry the old windows.
Nothing here logs: rows carry patient hashes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    Connection,
    DateTime,
    and_,
    case,
    func,
    literal,
    literal_column,
    or_,
    select,
)
from sqlalchemy.sql.elements import ColumnElement

from refloop import report as rp
from refloop import stall
from refloop.report import ReportParams as ReportParams  # the CLI's and the API's parameters live there
from refloop.report import default_params as default_params
from refloop.report import parse_day as parse_day
from refloop.stall import Windows
from refloop.store import referrals as repo
from refloop.store.models import Referral, ReferralEvent
from refloop.store.queries import unindexed
from refloop.store.referrals import OPEN, aware

R = Referral.__table__
E = ReferralEvent.__table__

_DURATIONS = {"sent_to_scheduled": "sent_to_scheduled_s", "sent_to_appointment": "sent_to_appointment_s",
              "appointment_to_note": "appointment_to_note_s", "sent_to_closed": "sent_to_closed_s"}
_DAY_S = 86400


# -- SQL helpers ------------------------------------------------------------------------------------
def _group_expr(conn: Connection, by: str | None) -> ColumnElement[Any]:
    if by is None:
        return literal_column("''")
    if by == "month":
        if conn.dialect.name == "sqlite":
            return func.strftime("%Y-%m", R.c.sent_at)
        return func.to_char(func.timezone("UTC", R.c.sent_at), "YYYY-MM")
    return R.c[by]


def _sent(wide: bool) -> ColumnElement[Any]:
    """``sent_at``, or with ``wide`` (SQLite, :func:`wide_range`) ``+sent_at``, the same value, which tells the
    planner not to walk ``ix_referrals_sent_at`` with a lookup per row but to read the table (or a covering
    index) in order."""
    return unindexed(R.c.sent_at) if wide else R.c.sent_at


def _cohort(params: ReportParams, wide: bool = False) -> list[ColumnElement[bool]]:
    """The cohort condition (see :func:`_sent` for ``wide``)."""
    sent = _sent(wide)
    conds = [sent.is_not(None), sent >= params.start, sent < params.end]
    return conds + [R.c[name] == value for name, value in sorted(params.filters.items())]


def wide_range(conn: Connection, params: ReportParams) -> bool:
    """Whether the cohort covers most stored sent dates (two index probes, assuming they spread evenly):
    then a table scan beats the index on SQLite. A wrong guess costs speed, never a number."""
    if conn.dialect.name != "sqlite":
        return False
    lo, hi = (aware(v) for v in conn.execute(select(select(func.min(R.c.sent_at)).scalar_subquery(),
                                                    select(func.max(R.c.sent_at)).scalar_subquery())).one())
    if lo is None or hi is None:
        return False
    span = (hi - lo).total_seconds()
    return span <= 0 or (min(hi, params.end) - max(lo, params.start)).total_seconds() / span > 0.2


def _count(cond: ColumnElement[bool]) -> ColumnElement[Any]:
    return func.count(case((cond, literal(1))))


def _at(moment: datetime) -> ColumnElement[Any]:
    return literal(moment, DateTime(timezone=True))


def recovered() -> ColumnElement[bool]:
    """The "recovered" rule: completed at or after the referral was first on the worklist or reminded
    (``first_marked_at``, kept on write). The weekly review counts the same rule week by week."""
    return and_(R.c.completed_at.is_not(None), R.c.first_marked_at <= R.c.completed_at)


# -- the aggregate pass ----------------------------------------------------------------------------
def _tallies(conn: Connection, params: ReportParams, wide: bool = False) -> dict[str, list[rp.Tally]]:
    """The cohort grouped by (status, leak stage, ``report_bits``), per report group: a dozen groups whose
    counts, ``now`` comparisons and sums :func:`refloop.report.tally` adds up. Without ``--by`` or filters
    SQLite reads ``ix_referrals_report`` in its order (covering: no table row, no sort); a ``--by`` group
    or a filter column outside the index costs a sort or table reads, never a different number."""
    now = _at(params.now)
    seconds = [func.coalesce(func.sum(R.c[column]), 0) for column in _DURATIONS.values()]
    g = _group_expr(conn, params.by).label("g")
    keys = [R.c.status, R.c.leak_stage, R.c.report_bits]
    stmt = select(g, *keys, func.count(), _count(R.c.scheduling_due_at <= now), _count(R.c.visit_due_at <= now),
                  _count(R.c.leak_at <= now), func.count(R.c.first_marked_at), _count(recovered()),
                  func.coalesce(func.sum(R.c.appointment_count), 0),
                  func.coalesce(func.sum(R.c.no_show_appointments), 0), *seconds).where(*_cohort(params, wide))
    stmt = stmt.group_by(g, *keys) if params.by else stmt.group_by(*keys)
    out: dict[str, list[rp.Tally]] = {}
    for row in conn.execute(stmt):
        n = [int(v or 0) for v in row[3:]]
        out.setdefault(str(row[0] or ""), []).append(rp.Tally(
            str(row[1]), str(row[2] or ""), bits=n[0], n=n[1], scheduling_over=n[2], visit_over=n[3], leaked=n[4],
            marked=n[5], recovered=n[6], appointments=n[7], no_show_appointments=n[8], seconds=tuple(n[9:])))
    return out


def stale_rows(conn: Connection, params: ReportParams, windows: Windows, wide: bool = False) -> int:
    """Cohort rows whose clock columns were computed under other windows (the scan is rewriting them)."""
    stale = repo.stale(windows.version)
    if conn.execute(select(R.c.id).where(stale).limit(1)).first() is None:  # ix_referrals_clock_version
        return 0
    return int(conn.execute(select(func.count()).where(*_cohort(params, wide), stale)).scalar_one())


# -- durations: exact mean, median and p90 ---------------------------------------------------------
def day_figures(conn: Connection, params: ReportParams, wide: bool = False,
                whole: Mapping[str, int] | None = None) -> dict[str, dict[str, dict[str, Any]]]:
    """Per group and metric: n, mean, median and nearest-rank p90 in days, exactly (see
    :func:`refloop.report.figures`): the totals by ORDER BY/OFFSET for the ranks needed (``whole``: the
    cohort's :func:`refloop.report.tally`, read in the same snapshot, else read here), the groups by one ranked pass per
    metric that keeps only those ranks."""
    if not params.by:
        if whole is None:
            whole = rp.tally(t for group in _tallies(conn, params, wide).values() for t in group)
        return {"": _total_figures(conn, params, wide, whole)}
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for metric, column in _DURATIONS.items():
        value = R.c[column]
        g = _group_expr(conn, params.by)
        ranked = (select(g.label("g"), value.label("v"),
                         func.row_number().over(partition_by=g, order_by=value).label("rn"),
                         func.count().over(partition_by=g).label("n"),
                         func.sum(value).over(partition_by=g).label("total"))
                  .where(*_cohort(params, wide), value.is_not(None)).subquery())
        n = ranked.c.n
        p90 = (9 * n + 9) // 10  # ceil(0.9 n) in integers; its float form can be one more (see report.figures)
        wanted = or_(ranked.c.rn == (n + 1) // 2, ranked.c.rn == n // 2 + 1, ranked.c.rn == p90,
                     ranked.c.rn == p90 + 1)
        found: dict[str, dict[int, int]] = {}
        totals: dict[str, tuple[int, int]] = {}
        for row in conn.execute(select(ranked.c.g, ranked.c.v, ranked.c.rn, n, ranked.c.total).where(wanted)):
            key = str(row.g or "")
            found.setdefault(key, {})[int(row.rn)] = int(row.v)
            totals[key] = (int(row.n), int(row.total))
        for key, ranks in found.items():
            count, total = totals[key]
            out.setdefault(key, {})[metric] = rp.figures(count, total, ranks, _DAY_S)
    return out


def _pair(conn: Connection, value: ColumnElement[Any], where: list[ColumnElement[bool]], offset: int,
          desc: bool = False) -> tuple[int, int]:
    """The min and max of two adjacent values of *value* in the cohort, *offset* (0 if negative) from the
    bottom, or from the top with *desc* (read back as min and max, so row order does not matter)."""
    pair = select(value.label("v")).where(*where).order_by(value.desc() if desc else value).limit(2)\
        .offset(max(offset, 0)).subquery()
    lo, hi = conn.execute(select(func.min(pair.c.v), func.max(pair.c.v))).one()
    return int(lo), int(hi)


def _total_figures(conn: Connection, params: ReportParams, wide: bool,
                   whole: Mapping[str, int]) -> dict[str, dict[str, Any]]:
    """The four metrics for the whole cohort from its count and sum (``whole``, the aggregate pass) and the
    values at the ranks :func:`refloop.report.figures` needs: the two middle ranks are one ``ORDER BY
    <duration> LIMIT 2 OFFSET k`` from the bottom, the two p90 ranks one from the top (in the report's
    snapshot, see :func:`build_report`).
    With ``ix_referrals_rank_*`` (duration, sent_at) SQLite walks the index in value order and reads no
    table row (migration 0014)."""
    out = {}
    for metric, column in _DURATIONS.items():
        count, total = whole[f"n_{metric}"], whole[f"total_{metric}"]
        if count == 0:
            out[metric] = rp.figures(0, 0, {}, _DAY_S)
            continue
        value = R.c[column]
        where = [*_cohort(params, wide), value.is_not(None)]
        lo, p = (count + 1) // 2, (9 * count + 9) // 10  # ceil(0.9 n) in integers (see report.figures)
        row = (*_pair(conn, value, where, lo - 1), *_pair(conn, value, where, count - p - 1, desc=True))
        ranks = {lo: int(row[0]), p: int(row[2] if p < count else row[3])}  # p = n: the top pair is n, n - 1
        if lo + 1 <= count:
            ranks[lo + 1] = int(row[1])
        if p + 1 <= count:
            ranks[p + 1] = int(row[3])
        out[metric] = rp.figures(count, total, ranks, _DAY_S)
    return out


def close_bins(conn: Connection, params: ReportParams, bins: int = 10) -> tuple[int, list[int]]:
    """The dashboard's days-to-close histogram: ``bins`` equal bins of whole days from 0 (the width is the
    longest closed referral's days over ``bins``, rounded up, at least 1; a negative value counts in the
    first bin, anything past the last in the last), as (width in days, count per bin). One count per bin
    over ``ix_referrals_rank_sent_to_closed`` in value order: no closed referral is read into Python."""
    wide = wide_range(conn, params)
    value = R.c.sent_to_closed_s
    where = [*_cohort(params, wide), value.is_not(None)]
    top = conn.execute(select(value).where(*where).order_by(value.desc()).limit(1)).scalar()
    if top is None:
        return 1, []
    width = max(math.ceil(max(top / _DAY_S, 1.0) / bins), 1)
    edges = [i * width * _DAY_S for i in range(1, bins)]  # bin i holds [edges[i-1], edges[i]) in seconds
    counts = []
    for i in range(bins):
        bounds = ([value >= edges[i - 1]] if i else []) + ([value < edges[i]] if i < bins - 1 else [])
        counts.append(int(conn.execute(select(func.count()).where(*where, *bounds)).scalar_one()))
    return width, counts


def monthly(conn: Connection, params: ReportParams) -> list[tuple[str, int, int]]:
    """Sent and closed referrals per sent month (UTC) of the cohort, months with none left out: the
    dashboard's trend. Two counts per month, each an index range (``ix_referrals_sent_at``,
    ``ix_referrals_status_sent``), where a GROUP BY month sorts the whole cohort (3 s at 1M)."""
    out = []
    month = datetime(params.start.year, params.start.month, 1, tzinfo=UTC)
    while month < params.end:
        after = datetime(month.year + month.month // 12, month.month % 12 + 1, 1, tzinfo=UTC)
        span = replace(params, start=max(params.start, month), end=min(params.end, after))
        sent = int(conn.execute(select(func.count()).where(*_cohort(span))).scalar_one())
        if sent:
            closed = int(conn.execute(select(func.count()).where(*_cohort(span), R.c.status == "closed")).scalar_one())
            out.append((f"{month:%Y-%m}", sent, closed))
        month = after
    return out


# -- leaks ---------------------------------------------------------------------------------------
def leaks(conn: Connection, params: ReportParams, windows: Windows) -> list[dict[str, Any]]:
    """The first ``leak_limit`` leaks, oldest first (then by placer ID as rounded ages tie)."""
    if params.leak_limit <= 0:
        return []
    now = _at(params.now)
    leaking = or_(R.c.status.in_(rp.FINAL_STATUSES),
                  and_(R.c.status.in_(OPEN), R.c.leak_stage != "", R.c.leak_at <= now))
    stmt = (select(R.c.id, R.c.placer_id, R.c.status, R.c.priority, R.c.referred_to, R.c.specialty, R.c.sent_at,
                   R.c.leak_stage, R.c.leak_at).where(*_cohort(params), leaking)
            .order_by(R.c.sent_at, R.c.id).limit(params.leak_limit))
    calendar = stall.Calendar(windows)
    out = []
    for row in conn.execute(stmt):
        final = row.status in rp.FINAL_STATUSES
        stage = ("cancelled" if row.status == "cancelled" else "declined") if final else row.leak_stage
        leak_at = aware(row.leak_at)
        overdue = 0.0 if final or leak_at is None else stall.elapsed(calendar, leak_at, params.now) / timedelta(days=1)
        out.append(rp.leak_entry(rp.LeakRow(int(row.id), row.placer_id, row.status, row.priority or "",
                                            row.referred_to or "", row.specialty or "", aware(row.sent_at)),  # type: ignore[arg-type]
                                 stage, overdue, params.now))
    out.sort(key=lambda x: (-x["age_days"], x["placer_id"]))
    return out


def cms50(conn: Connection, year: int) -> dict[str, Any]:
    """Denominator and numerator of the CMS50-style figure (see :mod:`refloop.report`): the patients'
    first candidates of *year* are marked on write (``cms50_first``, :mod:`refloop.store.cms50`), so this
    is one range of the partial index ``ix_referrals_cms50`` (``= 1`` is literal SQL so that the planner
    matches the index's condition), counting those whose first final note came after the referral and
    within the year."""
    start, cutoff, end = rp.cms50_window(year)
    note = R.c.note_received_at
    met = and_(note.is_not(None), note > R.c.sent_at, note < end)
    row = conn.execute(select(func.count(), _count(met)).where(
        R.c.cms50_first == literal_column("1"), R.c.sent_at >= start, R.c.sent_at < cutoff)).one()
    return rp.cms50_block(year, int(row[0]), int(row[1]))


# -- the report ------------------------------------------------------------------------------------
def build_report(conn: Connection, params: ReportParams, windows: Windows) -> dict[str, Any]:
    """The whole report as one JSON-ready dict; the CLI, ``GET /api/report`` and the dashboard return this.

    Its statements read one snapshot: the medians' ranks come from the aggregate pass's counts. SQLite's
    read transaction gives that; on PostgreSQL a connection not yet in a transaction reads in a
    REPEATABLE READ one."""
    if conn.dialect.name == "postgresql" and not conn.in_transaction():
        with conn.execution_options(isolation_level="REPEATABLE READ").begin():
            return _build(conn, params, windows)
    return _build(conn, params, windows)


def _build(conn: Connection, params: ReportParams, windows: Windows) -> dict[str, Any]:
    wide = wide_range(conn, params)
    tallies = _tallies(conn, params, wide)
    whole_counts = rp.tally(t for group in tallies.values() for t in group)
    whole_days = day_figures(conn, replace(params, by=None), wide, whole_counts).get("", {})
    whole = rp.block(whole_counts, whole_days)
    whole["totals"]["leaks_by_stage"] = {s: whole_counts[f"leak_{s}"] for s in rp.LEAK_STAGES}
    whole["rates"]["recovered"] = {**rp.ratio(whole_counts["_recovered"], whole_counts["_marked"]),
                                   "count": whole_counts["_recovered"], "note": "on the worklist: alerts, outbox"}
    groups = []
    if params.by:
        group_days = day_figures(conn, params, wide)
        groups = [{"key": key, **rp.block(rp.tally(tallies[key]), group_days.get(key, {}))} for key in sorted(tallies)]
    year = params.cms50_year or (params.end - timedelta(microseconds=1)).year
    cohort: dict[str, Any] = {
        "from": params.start.isoformat(), "to": params.end.isoformat(), "by": params.by,
        "filters": dict(sorted(params.filters.items())), "now": params.now.isoformat(),
        "leak_limit": params.leak_limit}
    if stale := stale_rows(conn, params, windows, wide):
        cohort["stale_rows"] = stale  # computed under other windows: the daemon's scan is rewriting them
    return {"cohort": cohort, "totals": whole["totals"], "rates": whole["rates"], "days": whole["days"],
            "groups": groups, "leaks": leaks(conn, params, windows), "cms50": cms50(conn, year)}

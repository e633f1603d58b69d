"""The coordinator's worklist as one query: filters, sort, keyset paging and the counts above the table.

One copy serves ``/worklist`` (HTML and CSV), ``GET /api/worklist`` and ``refloop worklist``, so the three
always agree on what "my open items, most urgent first" means.

Why keyset paging: a coordinator pages through at most a few hundred rows, but the store may hold 100k
open alerts after a bad month; ``OFFSET 50000`` reads and throws away 50k rows, while "rows after this
(sort key, id)" is one index range read (``ix_alerts_worklist*``, migration 0013) whatever the page. The
cursor is opaque text (``"<key>,<id>"``) so it can go in a URL.

Filters on referral columns (specialty, referred-to, referring practice, priority class, relationship
mode) join the projection by primary key. The rollout *mode* is a rule list in settings
(:func:`refloop.notify.policy.mode_for`); :func:`mode_expr` turns the same rules into one SQL ``CASE`` so the
filter runs in the database and paging stays exact. Priority classes use :func:`priority_class_expr`, the
SQL form of :func:`refloop.stall.priority_class`.

What is still computed in Python, per displayed row only: the due instants (:func:`clock_view`), which
the stage-clock rework will store on the referral; this is the one place to swap them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, fields, replace
from datetime import datetime, timedelta
from typing import Any, Final
from zoneinfo import ZoneInfo

from sqlalchemy import Connection, and_, case, func, literal, or_, select, true
from sqlalchemy.sql.elements import ColumnElement

from refloop import report as rp
from refloop import stall
from refloop.config import Settings
from refloop.config.notify import parse_relationship
from refloop.config.windows import windows_from_settings
from refloop.store import alerts
from refloop.store import referrals as repo

A, R = alerts.ALERTS, alerts.REFERRALS

#: Sort orders: name → label. ``due`` is the instant the stage fell due, earliest first (so the longest
#: overdue first: every open alert's overdue_days is refreshed by the same scan).
SORTS: Final = {"due": "due instant (earliest first)", "level": "level (highest first)",
                "priority": "priority (stat first)", "raised": "newest alert first"}
STATUSES: Final = {"active": (alerts.OPEN, alerts.ACKNOWLEDGED), "open": (alerts.OPEN,),
                   "acknowledged": (alerts.ACKNOWLEDGED,), "snoozed": (alerts.SNOOZED,),
                   "all": alerts.UNRESOLVED}
PRIORITIES: Final = stall.PRIORITY_CLASSES
MODES: Final = ("observe", "active")
PAGE_MAX: Final = 500


@dataclass(frozen=True)
class Filters:
    """What a worklist view selects; every field round-trips through a URL query (:meth:`query`)."""

    owner: str = ""
    stage: str = ""
    level: str = ""  # a level label (alerts.level_label): "1", "2", "3+"
    priority: str = ""  # a priority class: stat | urgent | routine
    specialty: str = ""
    referred_to: str = ""
    practice: str = ""  # the referring practice (RF1-6.2 assigning authority)
    mode: str = ""
    status: str = "active"
    sort: str = "due"

    @classmethod
    def from_query(cls, query: Mapping[str, str], *, default_owner: str = "") -> Filters:
        """Parse and check a URL query / CLI options; ValueError names the bad field. ``owner`` absent from
        the query means *default_owner* (the signed-in person); ``owner=`` (present, empty) means everyone."""
        values = {f.name: str(query.get(f.name, f.default)).strip() for f in fields(cls)}
        if "owner" not in query:
            values["owner"] = default_owner
        out = cls(**values)
        checks = (("stage", stall.STAGES), ("priority", PRIORITIES), ("mode", MODES), ("status", tuple(STATUSES)),
                  ("sort", tuple(SORTS)))
        for name, allowed in checks:
            value = getattr(out, name)
            if value and value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}")
        if out.level and _level_bounds(out.level) is None:
            raise ValueError("level must be a level like 1, 2 or 3+")
        return replace(out, status=out.status or "active", sort=out.sort or "due")

    def query(self) -> dict[str, str]:
        """The URL query of this view (owner always present, so "everyone" survives a reload)."""
        defaults = Filters()
        return {k: v for k, v in asdict(self).items() if k == "owner" or v != getattr(defaults, k)}


@dataclass
class Page:
    rows: list[dict[str, Any]]
    next_cursor: str  # "" on the last page
    counts: dict[str, dict[str, int]]  # {"stage": {...}, "level": {...}}; filters applied except stage/level
    total: int  # rows matching every filter


def _level_bounds(label: str) -> tuple[int, int | None] | None:
    """A level label as an inclusive range: "2" → (2, 2); "3+" → (3, None)."""
    text = label.strip()
    top = text.endswith("+")
    try:
        n = int(text.rstrip("+"))
    except ValueError:
        return None
    if n < 1:
        return None
    return (n, None) if top else (n, n)


def priority_class_expr(conn: Connection, column: Any) -> ColumnElement[Any]:
    """:func:`refloop.stall.priority_class` in SQL: the first ``^`` component, trimmed and lower-cased."""
    first: ColumnElement[Any]
    if conn.dialect.name == "postgresql":
        first = func.split_part(column, "^", 1)
    else:
        cut = func.instr(column, "^")
        first = case((cut > 0, func.substr(column, 1, cut - 1)), else_=column)
    code = func.lower(func.trim(first))
    by_class: dict[str, list[str]] = {}
    for code_text, cls in stall.PRIORITY_CODES.items():
        by_class.setdefault(cls, []).append(code_text)
    return case(*((code.in_(codes), literal(cls)) for cls, codes in by_class.items() if cls != stall.ROUTINE),
                else_=literal(stall.ROUTINE))


def mode_expr(settings: Settings) -> ColumnElement[Any]:
    """:func:`refloop.notify.policy.mode_for` as SQL: the most specific rule first, then the first listed."""
    ws = settings.worklist
    rules = [parse_relationship(r) for r in ws.relationship_modes]
    ranked = sorted(enumerate(rules), key=lambda ir: (-((ir[1][0] != "*") + (ir[1][1] != "*")), ir[0]))

    def norm(col: Any) -> ColumnElement[Any]:
        return func.lower(func.trim(col))

    whens = []
    for _, (source, target, mode) in ranked:
        conds = []
        if source != "*":
            conds.append(norm(R.c.authority) == source)
        if target != "*":
            conds.append(or_(*(and_(norm(c) == target, func.trim(c) != "")
                               for c in (R.c.referred_to, R.c.referred_to_id, R.c.specialty))))
        whens.append((and_(true(), *conds), literal(mode)))
    return case(*whens, else_=literal(ws.mode)) if whens else literal(ws.mode)


def _conditions(conn: Connection, settings: Settings, f: Filters, *, with_stage_level: bool = True
                ) -> list[ColumnElement[bool]]:
    conds: list[ColumnElement[bool]] = [A.c.open_key == 0, A.c.status.in_(STATUSES[f.status])]
    if f.owner:
        conds.append(A.c.owner == f.owner)
    if with_stage_level and f.stage:
        conds.append(A.c.stage == f.stage)
    if with_stage_level and f.level:
        bounds = _level_bounds(f.level)
        assert bounds is not None
        lo, hi = bounds
        conds.append(A.c.level >= lo if hi is None else A.c.level == lo)
    for name, col in (("specialty", R.c.specialty), ("referred_to", R.c.referred_to), ("practice", R.c.authority)):
        value = getattr(f, name)
        if value:
            conds.append(func.lower(col) == value.lower())
    if f.priority:
        conds.append(priority_class_expr(conn, R.c.priority) == f.priority)
    if f.mode:
        conds.append(mode_expr(settings) == f.mode)
    return conds


def _needs_referrals(f: Filters) -> bool:
    return bool(f.specialty or f.referred_to or f.practice or f.priority or f.mode or f.sort == "priority")


_RANK: Final = {stall.STAT: 0, stall.URGENT: 1, stall.ROUTINE: 2}


def _sort_key(conn: Connection, f: Filters) -> tuple[ColumnElement[Any], bool]:
    """The primary sort expression and whether it runs descending; ties go to the higher alert id."""
    if f.sort == "level":
        return A.c.level * 100000 + A.c.overdue_days, True  # level first, then most overdue (days < 100000)
    if f.sort == "priority":
        rank = case(*((priority_class_expr(conn, R.c.priority) == c, literal(n)) for c, n in _RANK.items()),
                    else_=literal(2))
        return rank * -100000 + A.c.overdue_days, True  # stat first, then most overdue
    if f.sort == "raised":
        return A.c.id, True
    return A.c.overdue_days, True


def _cursor_value(f: Filters, text: str) -> tuple[float, int] | None:
    key, _, ident = text.partition(",")
    try:
        return float(key), int(ident)
    except ValueError:
        return None


def page(conn: Connection, settings: Settings, now: datetime, f: Filters, *, after: str = "",
         limit: int = 50, with_counts: bool = True) -> Page:
    """One page of the worklist after the cursor *after* ("" = first page)."""
    limit = max(1, min(limit, PAGE_MAX))
    key, desc = _sort_key(conn, f)
    conds = _conditions(conn, settings, f)
    if after:
        cur = _cursor_value(f, after)
        if cur is None:
            raise ValueError("cursor is not one this worklist gave out")
        k, ident = cur
        if desc:
            conds.append(or_(key < k, and_(key == k, A.c.id < ident)))
        else:
            conds.append(or_(key > k, and_(key == k, A.c.id > ident)))
    order = (key.desc(), A.c.id.desc()) if desc else (key.asc(), A.c.id.asc())
    stmt = (select(A, key.label("sort_key"), R.c.placer_id, R.c.authority, R.c.priority, R.c.referred_to,
                   R.c.referred_to_id, R.c.specialty, R.c.status.label("referral_status"), R.c.sent_at,
                   R.c.completed_at, R.c.no_show_at, mode_expr(settings).label("mode"))
            .join(R, R.c.id == A.c.referral_id).where(*conds).order_by(*order).limit(limit + 1))
    found = list(conn.execute(stmt))
    more = len(found) > limit
    found = found[:limit]
    windows = windows_from_settings(settings.stall)
    rows = [_row(r, windows, now) for r in found]
    worst = alerts._delivery_states(conn, [r["alert_id"] for r in rows])  # the notifications' worst state
    for row in rows:
        row["delivery"] = worst.get(row["alert_id"], "")
    next_cursor = f"{found[-1].sort_key!r},{found[-1].id}" if more and found else ""
    counts: dict[str, dict[str, int]] = {"stage": {}, "level": {}}
    total = 0
    if with_counts:
        counts, total = _counts(conn, settings, f)
    return Page(rows, next_cursor, counts, total)


def iterate(conn: Connection, settings: Settings, now: datetime, f: Filters, *, batch: int = 500
            ) -> Iterator[dict[str, Any]]:
    """Every row of a view, page by page (CSV export, the CLI): memory stays one batch."""
    after = ""
    while True:
        p = page(conn, settings, now, f, after=after, limit=batch, with_counts=False)
        yield from p.rows
        if not p.next_cursor:
            return
        after = p.next_cursor


def _counts(conn: Connection, settings: Settings, f: Filters) -> tuple[dict[str, dict[str, int]], int]:
    """Open items per stage and per level label under the other filters (so each count is a click away),
    and the number matching every filter."""
    conds = _conditions(conn, settings, f, with_stage_level=False)
    stmt = select(A.c.stage, A.c.level, func.count()).where(*conds).group_by(A.c.stage, A.c.level)
    if _needs_referrals(f):
        stmt = stmt.select_from(A.join(R, R.c.id == A.c.referral_id))
    by_stage: dict[str, int] = {}
    by_level: dict[str, int] = {}
    total = 0
    level_range = _level_bounds(f.level) if f.level else None
    for stage_name, level, n in conn.execute(stmt):
        label = alerts.level_label(int(level))
        by_stage[stage_name] = by_stage.get(stage_name, 0) + int(n)
        by_level[label] = by_level.get(label, 0) + int(n)
        in_stage = not f.stage or stage_name == f.stage
        in_level = level_range is None or (int(level) >= level_range[0] and (
            level_range[1] is None or int(level) <= level_range[1]))
        total += int(n) if in_stage and in_level else 0
    ordered_stages = {s: by_stage[s] for s in stall.STAGES if s in by_stage}
    ordered_levels = dict(sorted(by_level.items(), key=lambda kv: int(kv[0].rstrip("+"))))
    return {"stage": ordered_stages, "level": ordered_levels}, total


def facets(conn: Connection) -> dict[str, list[str]]:
    """Values present among unresolved alerts, for the filter pick-lists (owner, specialty, referred-to,
    practice), at most 200 each."""
    out: dict[str, list[str]] = {}
    base = A.join(R, R.c.id == A.c.referral_id)
    for name, col in (("owner", A.c.owner), ("specialty", R.c.specialty), ("referred_to", R.c.referred_to),
                      ("practice", R.c.authority)):
        stmt = select(col).distinct().select_from(base if name != "owner" else A).where(
            A.c.open_key == 0, col != "").order_by(col).limit(200)
        out[name] = [str(v) for (v,) in conn.execute(stmt)]
    return out


# -- the clock, as far as the alert row and the projection tell it today -------------------------------
def clinic_zone(settings: Settings) -> ZoneInfo:
    """The clinic's time zone for display and weeks: ``stall.timezone`` once the stage clock has it, else UTC."""
    return ZoneInfo(str(getattr(settings.stall, "timezone", "") or "UTC"))


_START: Final = {stall.SCHEDULING: "sent_at", stall.VISIT: "sent_at", stall.REBOOKING: "no_show_at",
                 stall.NOTE: "completed_at"}


def clock_view(windows: stall.Windows, stage: str, level: int, overdue_days: float, ref: Any,
               now: datetime) -> dict[str, Any]:
    """When the stage's clock started, its window, when it fell due and when the next level is due.

    Calendar days from the projection's start column; holds and business days are not subtracted here
    (the alert's ``overdue_days``, which the scan keeps, does subtract them). THE one place to swap for the
    stored due instant of the stage-clock rework; ``overdue_days`` and ``now`` are passed for that version.
    """
    started = repo.aware(getattr(ref, _START.get(stage, "sent_at"), None))
    window = rp.window_days(windows, stage, referred_to=ref.referred_to or "", specialty=ref.specialty or "",
                            priority=ref.priority or "") if stage in stall.STAGES else None
    if started is None or window is None:
        return {"started_at": None, "window_days": window, "due_at": None, "next_due_at": None}
    due = started + timedelta(days=window)
    next_due = started + timedelta(days=window * (max(level, 0) + 1))
    return {"started_at": started, "window_days": window, "due_at": due, "next_due_at": next_due}


def _row(r: Any, windows: stall.Windows, now: datetime) -> dict[str, Any]:
    clock = clock_view(windows, r.stage, int(r.level), float(r.overdue_days or 0.0), r, now)
    return {
        "alert_id": r.id, "referral": r.referral_id, "placer_id": r.placer_id, "stage": r.stage,
        "level": int(r.level), "level_name": alerts.level_label(int(r.level)),
        "overdue_days": round(float(r.overdue_days or 0.0), 2), "owner": r.owner, "status": r.status,
        "mode": r.mode, "priority": stall.priority_class(r.priority or ""), "specialty": r.specialty,
        "referred_to": r.referred_to, "practice": r.authority, "referral_status": r.referral_status,
        "due_at": repo.iso(clock["due_at"]), "next_due_at": repo.iso(clock["next_due_at"]),
        "raised_at": repo.iso(repo.aware(r.raised_at)), "last_action": r.last_action,
        "snoozed_until": repo.iso(repo.aware(r.snoozed_until)),
    }


#: Columns of the CSV export and the CLI table, in order.
COLUMNS: Final = ("alert_id", "referral", "placer_id", "stage", "level", "level_name", "overdue_days", "due_at",
                  "next_due_at", "owner", "status", "priority", "specialty", "referred_to", "practice", "mode",
                  "raised_at", "last_action", "snoozed_until", "delivery")

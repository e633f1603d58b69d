"""The coordinator's worklist as one query: filters, sort, keyset paging and the counts above the table.

One copy serves ``/worklist`` (HTML and CSV), ``GET /api/worklist`` and ``refloop worklist``, so the three
always agree on what "my open items, most urgent first" means.

Why keyset paging: a coordinator pages through at most a few hundred rows, but the store may hold 100k
open alerts after a bad month; ``OFFSET 50000`` reads and throws away 50k rows, while "rows after this
(sort keys, id)" is one index range read (``ix_alerts_worklist*``, migration 0013) whatever the page. The
cursor is opaque text (the last row's sort keys) so it can go in a URL.

Filters on referral columns (specialty, referred-to, referring practice, priority class, relationship
mode) join the projection by primary key. The rollout *mode* is a rule list in settings
(:func:`refloop.notify.policy.mode_for`); :func:`mode_expr` turns the same rules into one SQL ``CASE`` so the
filter runs in the database and paging stays exact. Priority classes use :func:`priority_class_expr`, the
SQL form of :func:`refloop.stall.priority_class`.

The due instants come from the stage clock as the fold stored them (:func:`clock_view`); how overdue a row
is, is computed on read, per displayed row only.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, fields, replace
from datetime import UTC, datetime
from typing import Any, Final
from zoneinfo import ZoneInfo

from sqlalchemy import Connection, and_, case, func, literal, or_, select, true
from sqlalchemy.sql.elements import ColumnElement

from refloop import stall
from refloop.config import Settings
from refloop.config.notify import parse_relationship
from refloop.config.windows import level_name, windows_from_settings
from refloop.notify import policy
from refloop.store import alerts
from refloop.store import referrals as repo
from refloop.store.outbox import DEAD, OUTBOX

A, R = alerts.ALERTS, alerts.REFERRALS

#: Sort orders: name → label. ``due`` is the instant the stage fell due, earliest first (the longest
#: overdue first).
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
#: Before migration 0012 an alert kept no due instant; those rows sort as if due when raised.
_NO_DUE: Final = datetime(1970, 1, 1, tzinfo=UTC)


def _sort_keys(conn: Connection, f: Filters) -> list[tuple[ColumnElement[Any], bool]]:
    """The sort columns, each with "descending?"; the alert id breaks ties (in the last key's direction).

    ``due`` is the instant the stage fell due (``alerts.due_at``), earliest first: the longest overdue at
    the top, without any per-tick rewrite of how overdue each row is (that is computed on read)."""
    due = (A.c.due_at, False)
    if f.sort == "level":
        return [(A.c.level, True), due, (A.c.id, False)]
    if f.sort == "priority":
        rank = case(*((priority_class_expr(conn, R.c.priority) == c, literal(n)) for c, n in _RANK.items()),
                    else_=literal(2))
        return [(rank, False), due, (A.c.id, False)]
    if f.sort == "raised":
        return [(A.c.id, True)]
    return [due, (A.c.id, False)]


def _encode_cursor(values: list[Any]) -> str:
    out = []
    for v in values:
        if isinstance(v, datetime):
            out.append("t" + (repo.aware(v) or v).astimezone(UTC).isoformat())
        elif v is None:
            out.append("n")
        else:
            out.append("i" + str(int(v)))
    return "~".join(out)


def _decode_cursor(text: str, width: int) -> list[Any] | None:
    parts = text.split("~")
    if len(parts) != width:
        return None
    values: list[Any] = []
    try:
        for part in parts:
            kind, body = part[:1], part[1:]
            if kind == "t":
                values.append(datetime.fromisoformat(body))
            elif kind == "i":
                values.append(int(body))
            elif kind == "n":
                values.append(None)
            else:
                return None
    except ValueError:
        return None
    return values


def _after(keys: list[tuple[ColumnElement[Any], bool]], values: list[Any]) -> ColumnElement[bool]:
    """Rows strictly after *values* in the order of *keys*: (k1 > v1) or (k1 = v1 and k2 > v2) or ...
    A NULL due instant (an alert from before the clock kept one) is read as the epoch, so it sorts first."""
    ors = []
    for i, (col, desc) in enumerate(keys):
        col_i = func.coalesce(col, _NO_DUE) if col is A.c.due_at else col
        v_i = _NO_DUE if values[i] is None else values[i]
        equal = [(func.coalesce(c, _NO_DUE) if c is A.c.due_at else c) == (_NO_DUE if v is None else v)
                 for (c, _), v in zip(keys[:i], values[:i], strict=True)]
        ors.append(and_(true(), *equal, col_i < v_i if desc else col_i > v_i))
    return or_(*ors)


def page(conn: Connection, settings: Settings, now: datetime, f: Filters, *, after: str = "",
         limit: int = 50, with_counts: bool = True) -> Page:
    """One page of the worklist after the cursor *after* ("" = first page)."""
    limit = max(1, min(limit, PAGE_MAX))
    keys = _sort_keys(conn, f)
    conds = _conditions(conn, settings, f)
    if after:
        cur = _decode_cursor(after, len(keys))
        if cur is None:
            raise ValueError("cursor is not one this worklist gave out")
        conds.append(_after(keys, cur))
    order = [col.asc().nulls_first() if col is A.c.due_at else col.desc() if desc else col.asc()
             for col, desc in keys]
    stmt = (select(A, *(col.label(f"sort_key_{i}") for i, (col, _) in enumerate(keys)), R.c.placer_id,
                   R.c.authority, R.c.priority, R.c.referred_to, R.c.referred_to_id, R.c.specialty,
                   R.c.status.label("referral_status"), R.c.sent_at, R.c.completed_at, R.c.no_show_at,
                   R.c.clock_stage, R.c.stage_started_at, R.c.next_due_at, mode_expr(settings).label("mode"))
            .join(R, R.c.id == A.c.referral_id).where(*conds).order_by(*order).limit(limit + 1))
    found = list(conn.execute(stmt))
    more = len(found) > limit
    found = found[:limit]
    windows = windows_from_settings(settings.stall)
    rows = [_row(r, settings, windows, now) for r in found]
    worst = delivery_states(conn, [r["alert_id"] for r in rows])  # the notifications' worst state
    for row in rows:
        row["delivery"] = worst.get(row["alert_id"], "")
    last = found[-1] if more and found else None
    next_cursor = _encode_cursor([getattr(last, f"sort_key_{i}") for i in range(len(keys))]) if last else ""
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


# -- the clock, as the fold stored it ---------------------------------------------------------------------
def clinic_zone(settings: Settings) -> ZoneInfo:
    """The clinic's time zone (``stall.timezone``) for display and for the weeks of the weekly review."""
    return ZoneInfo(settings.stall.timezone or "UTC")


_START: Final = {stall.SCHEDULING: "sent_at", stall.VISIT: "sent_at", stall.REBOOKING: "no_show_at",
                 stall.NOTE: "completed_at"}


#: The window ends the fold stores for the report (scheduling and visit are counted from sent).
_WINDOW_END: Final = {stall.SCHEDULING: "scheduling_due_at", stall.VISIT: "visit_due_at"}


def clock_view(settings: Settings, windows: stall.Windows, stage: str, alert: Any | None, ref: Any,
               now: datetime) -> dict[str, Any]:
    """When the stage's clock started, its window, when it fell due, how overdue it is now and when the
    next level is due: read from what the fold stored (``referrals.stage_started_at``/``next_due_at`` for
    the running stage, ``alerts.due_at`` for an open alert), never recomputed here."""
    running = getattr(ref, "clock_stage", "") == stage
    started = repo.aware(getattr(ref, "stage_started_at", None) if running else None) \
        or repo.aware(getattr(ref, _START.get(stage, "sent_at"), None))
    window = windows.window_days(stage, _Details(ref)) if stage in stall.STAGES else None
    next_due = repo.aware(getattr(ref, "next_due_at", None)) if running else None
    if alert is not None:
        due = repo.aware(alert.due_at) if alert.due_at is not None else None
        overdue = alerts.overdue_days(settings, due, float(alert.overdue_days or 0.0), now)
    else:  # no alert yet: the running stage's first level is its next due instant
        due = next_due if running else repo.aware(getattr(ref, _WINDOW_END.get(stage, ""), None))
        overdue = 0.0
    return {"started_at": started, "window_days": window, "due_at": due, "next_due_at": next_due,
            "overdue_days": overdue}


class _Details:
    """A projection row as :class:`refloop.stall.Details` (the three fields a window is chosen by)."""

    def __init__(self, ref: Any) -> None:
        self.priority = ref.priority or ""
        self.referred_to = ref.referred_to or ""
        self.specialty = ref.specialty or ""


def _row(r: Any, settings: Settings, windows: stall.Windows, now: datetime) -> dict[str, Any]:
    clock = clock_view(settings, windows, r.stage, r, r, now)
    return {
        "alert_id": r.id, "referral": r.referral_id, "placer_id": r.placer_id, "stage": r.stage,
        "level": int(r.level), "level_name": level_name(settings.stall, int(r.level)),
        "overdue_days": round(clock["overdue_days"], 2), "owner": r.owner, "status": r.status,
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


def dead_letters(conn: Connection, settings: Settings) -> list[dict[str, Any]]:
    """Dead-lettered notifications that name no alert, as worklist rows: they need a human as much as a
    stalled referral does (the dashboard lists them under the first :func:`page`)."""
    return [{"alert_id": None, "referral": d.referral_id, "placer_id": d.placer_id or "", "stage": "delivery",
             "level": None, "overdue_days": 0.0, "owner": settings.worklist.default_owner, "status": "dead",
             "mode": policy.ACTIVE, "last_action": d.last_error, "outbox_id": d.id, "event": d.event,
             "delivery": "dead"}
            for d in conn.execute(select(OUTBOX, R.c.placer_id).outerjoin(
                R, R.c.id == OUTBOX.c.referral_id).where(
                OUTBOX.c.status == DEAD, OUTBOX.c.alert_id.is_(None))
                .order_by(OUTBOX.c.id))]


_DELIVERY_RANK: Final = {"dead": 4, "failed": 3, "pending": 2, "suppressed": 1, "delivered": 0}


def delivery_states(conn: Connection, alert_ids: list[int]) -> dict[int, str]:
    """The worst delivery state of each alert's notifications (dead, failed, pending, suppressed, delivered)."""
    out: dict[int, str] = {}
    if not alert_ids:
        return out
    for start in range(0, len(alert_ids), 500):  # chunked: SQLite caps bound parameters per statement
        for alert_id, status in conn.execute(select(OUTBOX.c.alert_id, OUTBOX.c.status).where(
                OUTBOX.c.alert_id.in_(alert_ids[start:start + 500]))):
            if _DELIVERY_RANK.get(status, 0) >= _DELIVERY_RANK.get(out.get(alert_id, "delivered"), 0):
                out[alert_id] = status
    return out

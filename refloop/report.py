"""The cohort report: pure computations over rows that :mod:`refloop.store.report_queries` fetches.

Why split this way: the SQL side aggregates what a database does well (counts and conditional sums per
group, the day differences as plain numbers) so that a one-year report over a million referrals never
materialises a million objects; this module turns those rows into rates, percentiles, leaks and the
CMS50-style figure, with no I/O and no clock, so every figure can be checked by hand in a test.

Definitions (docs/report.md)
-------------------------------

* **Cohort**: referrals whose ``sent_at`` (earliest ``referral_created``) is in ``[from, to)`` (UTC),
  optionally filtered by referred-to, specialty, referring provider or priority, and grouped by one of
  those or by sent month. Referrals without ``sent_at`` are never in a cohort.
* **Rates** are ``num / den`` with both parts reported. ``accepted`` (``accepted_at`` set), ``scheduled``
  (``scheduled_at`` set: booked at least once), ``completed`` (``completed_at`` set: attended, or a final
  note proves the visit) and ``closed`` (status ``closed``: the loop-closure rate) are over all sent.
  ``note_received`` is over completed referrals. ``no_show`` is no-show appointments over appointments
  ever reported for cohort referrals; ``rebooked_after_no_show`` is referrals with a no-show whose status
  is now scheduled, completed or closed, over referrals with a no-show.
* **Within window** rates are censored: the denominator is the *mature* referrals, those whose window has
  ended at ``now`` or that reached the milestone inside it. A referral still inside its window is in
  flight, so it counts neither for nor against the rate. Windows are the stall windows (scheduling for
  booking, visit for attendance) resolved as :mod:`refloop.stall` does (referred-to, specialty, priority,
  default), in calendar days; business days and holds are not applied here (they are in the leak list).
* **Days** (sent→scheduled, sent→appointment, appointment→note, sent→closed) are reported as mean, median
  and p90 (nearest rank: the ``ceil(0.9 n)``-th smallest value) over referrals that have both milestones.
* **Leaks** are unclosed referrals past a window, with the stage where they stalled: ``never_scheduled``
  (status sent, scheduling window over), ``not_seen`` (booked but the visit window is over),
  ``no_show_not_rebooked`` (rebooking window after the latest no-show, or the visit window, is over),
  ``seen_no_note`` (note window after the visit is over), and ``declined`` (declined or expired) and
  ``cancelled``, which are final answers and so leaks at once. ``age_days`` is days since sent.
  Everything open and not overdue is **in flight**.
* **Recovered**: referrals that were on the worklist (an ``alerts`` row) or got a reminder and then
  completed (``completed_at`` set), over referrals that were on the worklist.

CMS50-style view (docs/report.md)
-----------------------------------

How refloop follows CMS50 ("Closing the Referral Loop: Receipt of Specialist Report"):

* **Patient-based**: patients are ``patient_key`` (a hash of PID-3 and its authority); referrals without
  one cannot be attributed and are left out.
* **Measurement period** is a calendar year in UTC. Candidate referrals are those with ``sent_at`` from
  1 January 00:00 up to 31 October 23:59:59.999999 (the v12+ cut-off), not cancelled by the referrer
  (CMS50 counts only active or completed ServiceRequests). The **first** candidate per patient (earliest
  ``sent_at``, then lowest id) is the one that counts; a second referral for the same patient never
  adds a second denominator entry, even when it closed and the first did not.
* **Numerator**: that first referral's first final consult note (``note_received_at``) is strictly
  *after* its ``sent_at`` and before the end of the measurement year. A note dated before the referral
  does not count, even though it closed the referral in refloop.

Where it cannot follow the measure: refloop has no encounter feed, so the "encounter during the
measurement period" condition is approximated by the referral itself; it has no value sets, so any
referral message counts as a Referral and any final note linked to it as a Consultant Report; authorship
by the referred-to clinician is assumed from the link (explicit ID or patient + referred-to provider), not
checked against the author; attribution is per patient, not per referring clinician (the narrative's
reading); and ``note_received_at`` is the time the note became final as the sender reported it, not the
time the referrer read it. Label it "CMS50-style", never a certified eCQM result.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any, Final

from refloop.referral import OPEN_STATUSES

#: Fields a cohort can be filtered or grouped by (``month`` only groups).
GROUP_FIELDS: Final = ("referred_to", "specialty", "referring_provider", "priority", "month")
FILTER_FIELDS: Final = ("referred_to", "specialty", "referring_provider", "priority")

#: Leak stages, in the order the loop reaches them.
LEAK_STAGES: Final = (
    "never_scheduled", "not_seen", "no_show_not_rebooked", "seen_no_note", "declined", "cancelled",
)
DAY_METRICS: Final = ("sent_to_scheduled", "sent_to_appointment", "appointment_to_note", "sent_to_closed")

#: Conditional-sum columns the SQL side returns for every group (and the totals).
COUNT_COLUMNS: Final = (
    "sent", "accepted", "scheduled", "completed", "closed", "note_of_completed",
    "scheduled_in_window", "scheduling_mature", "completed_in_window", "visit_mature",
)
EVENT_COLUMNS: Final = ("appointments", "no_show_appointments", "no_show_referrals", "rebooked_after_no_show")

#: What the report counts about one referral that does not depend on ``now``, kept on write as the bits of
#: ``referrals.report_bits`` (:func:`report_bits`, bit i is ``BITS[i]``). The aggregate pass then groups the
#: cohort by (status, leak stage, bits) along one covering index and adds up a dozen groups, instead of
#: evaluating two dozen conditions on every row (3.9x a bare pass over ``referrals`` at 1M; now ~1.8x).
BITS: Final = ("accepted", "scheduled", "completed", "note_of_completed", "scheduled_in_window",
               "completed_in_window", "no_show", *(f"has_{m}" for m in DAY_METRICS))
_BIT: Final = {name: 1 << i for i, name in enumerate(BITS)}
#: Final answers: a referral with one of these statuses leaks at once (see the module docstring).
FINAL_STATUSES: Final = ("cancelled", "declined", "expired")
_OPEN: Final = frozenset(s.value for s in OPEN_STATUSES)
OPEN_LEAKS: Final = ("never_scheduled", "not_seen", "no_show_not_rebooked", "seen_no_note")


def _before(a: datetime | None, b: datetime | None) -> bool:
    return a is not None and b is not None and a <= b


def report_bits(row: Mapping[str, Any]) -> int:
    """:data:`BITS` of one referral from its projection values (``accepted_at`` ... ``visit_due_at``, the
    ``*_s`` durations and ``no_show_appointments``): a milestone is set, a milestone fell inside its
    window (``scheduled_at <= scheduling_due_at``), the referral had a no-show, a duration is known."""
    facts = {
        "accepted": row.get("accepted_at") is not None, "scheduled": row.get("scheduled_at") is not None,
        "completed": row.get("completed_at") is not None,
        "note_of_completed": row.get("completed_at") is not None and row.get("note_received_at") is not None,
        "scheduled_in_window": _before(row.get("scheduled_at"), row.get("scheduling_due_at")),
        "completed_in_window": _before(row.get("completed_at"), row.get("visit_due_at")),
        "no_show": int(row.get("no_show_appointments") or 0) > 0,
        **{f"has_{m}": row.get(f"{m}_s") is not None for m in DAY_METRICS},
    }
    return sum(_BIT[name] for name, on in facts.items() if on)


@dataclass(frozen=True)
class Tally:
    """One group of the aggregate pass: referrals of one status, leak stage and :data:`BITS`, with the
    counts that depend on ``now`` (window over, leak reached), on the worklist marks, and the sums."""

    status: str
    leak_stage: str
    bits: int
    n: int
    scheduling_over: int  # scheduling_due_at <= now
    visit_over: int  # visit_due_at <= now
    leaked: int  # leak_at <= now
    marked: int  # first_marked_at set
    recovered: int  # completed at or after first_marked_at
    appointments: int
    no_show_appointments: int
    seconds: tuple[int, ...]  # the sum of each DAY_METRICS duration


def tally(groups: Iterable[Tally]) -> dict[str, int]:
    """The counts of one report group from its tallies: :data:`COUNT_COLUMNS`, :data:`EVENT_COLUMNS`,
    ``leak_<stage>``, ``_open`` (neither closed nor a final answer), ``_marked``, ``_recovered``, and per
    day metric ``n_<metric>`` and ``total_<metric>`` (count and sum of the known durations)."""
    out = dict.fromkeys((*COUNT_COLUMNS, *EVENT_COLUMNS, "_open", "_marked", "_recovered",
                         *(f"leak_{s}" for s in LEAK_STAGES), *(f"n_{m}" for m in DAY_METRICS),
                         *(f"total_{m}" for m in DAY_METRICS)), 0)
    for t in groups:
        has = {name: bool(t.bits & bit) for name, bit in _BIT.items()}
        for name in ("accepted", "scheduled", "completed", "note_of_completed", "scheduled_in_window",
                     "completed_in_window"):
            out[name] += t.n if has[name] else 0
        out["sent"] += t.n
        out["closed"] += t.n if t.status == "closed" else 0
        out["scheduling_mature"] += t.n if has["scheduled_in_window"] else t.scheduling_over
        out["visit_mature"] += t.n if has["completed_in_window"] else t.visit_over
        out["_open"] += t.n if t.status != "closed" and t.status not in FINAL_STATUSES else 0
        out["_marked"] += t.marked
        out["_recovered"] += t.recovered
        out["leak_cancelled"] += t.n if t.status == "cancelled" else 0
        out["leak_declined"] += t.n if t.status in ("declined", "expired") else 0
        if t.leak_stage in OPEN_LEAKS and t.status in _OPEN:
            out[f"leak_{t.leak_stage}"] += t.leaked
        out["appointments"] += t.appointments
        out["no_show_appointments"] += t.no_show_appointments
        if has["no_show"]:
            out["no_show_referrals"] += t.n
            out["rebooked_after_no_show"] += t.n if t.status in ("scheduled", "completed", "closed") else 0
        for metric, seconds in zip(DAY_METRICS, t.seconds, strict=True):
            out[f"n_{metric}"] += t.n if has[f"has_{metric}"] else 0
            out[f"total_{metric}"] += seconds
    return out


@dataclass(frozen=True)
class LeakRow:
    """A leaking cohort referral, as much as a leak entry shows (no PHI)."""

    referral_id: int
    placer_id: str
    status: str
    priority: str
    referred_to: str
    specialty: str
    sent_at: datetime


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
        if self.by is not None and self.by not in GROUP_FIELDS:
            raise ValueError(f"by must be one of {', '.join(GROUP_FIELDS)}")
        unknown = set(self.filters) - set(FILTER_FIELDS)
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


def ratio(num: int, den: int) -> dict[str, Any]:
    """A rate that keeps its parts: a 0/0 rate is None, not 0, so "no data" never reads as "all failed"."""
    return {"num": int(num), "den": int(den), "rate": round(num / den, 4) if den else None}


def figures(n: int, total: int, ranks: Mapping[int, int], unit: int) -> dict[str, Any]:
    """:func:`distribution` from what SQL ranks: ``n`` values summing to ``total`` and the values at the
    1-based ranks the median and p90 need (``ranks``), in units of ``unit`` per day (seconds: 86400)."""
    if n == 0:
        return {"n": 0, "mean": None, "median": None, "p90": None}
    mid = n // 2
    median = ranks[mid + 1] / unit if n % 2 else (ranks[mid] / unit + ranks[mid + 1] / unit) / 2
    p90 = ranks[max(math.ceil(0.9 * n), 1)] / unit
    return {"n": n, "mean": round(total / unit / n, 2), "median": round(median, 2), "p90": round(p90, 2)}


def rates(counts: Mapping[str, int]) -> dict[str, Any]:
    """The rate block of one group from its :func:`tally` (see the module docstring for each definition)."""
    sent, events = counts.get("sent", 0), counts
    return {
        "accepted": ratio(counts.get("accepted", 0), sent),
        "scheduled": ratio(counts.get("scheduled", 0), sent),
        "scheduled_in_window": ratio(counts.get("scheduled_in_window", 0), counts.get("scheduling_mature", 0)),
        "completed": ratio(counts.get("completed", 0), sent),
        "completed_in_window": ratio(counts.get("completed_in_window", 0), counts.get("visit_mature", 0)),
        "no_show": ratio(events.get("no_show_appointments", 0), events.get("appointments", 0)),
        "rebooked_after_no_show": ratio(events.get("rebooked_after_no_show", 0), events.get("no_show_referrals", 0)),
        "note_received": ratio(counts.get("note_of_completed", 0), counts.get("completed", 0)),
        "loop_closure": ratio(counts.get("closed", 0), sent),
    }


def block(c: Mapping[str, int], days: Mapping[str, Any]) -> dict[str, Any]:
    """One report group (or the whole cohort): totals and rates from its :func:`tally`, and its day metrics'
    :func:`figures` (*days*; a metric with no value reads as n = 0)."""
    totals = {"sent": c["sent"], "accepted": c["accepted"], "scheduled": c["scheduled"], "completed": c["completed"],
              "note_received": c["note_of_completed"], "closed": c["closed"], "appointments": c["appointments"],
              "no_shows": c["no_show_appointments"],
              "in_flight": c["_open"] - sum(c[f"leak_{s}"] for s in OPEN_LEAKS),
              "leaks": sum(c[f"leak_{s}"] for s in LEAK_STAGES)}
    return {"totals": totals, "rates": rates(c),
            "days": {n: days.get(n) or figures(0, 0, {}, 86400) for n in DAY_METRICS}}


def leak_entry(row: LeakRow, stage: str, overdue: float, now: datetime) -> dict[str, Any]:
    """One leak as reported: identifiers and codes only, never patient data."""
    return {
        "referral_id": row.referral_id, "placer_id": row.placer_id, "status": row.status, "stage": stage,
        "age_days": round(max((now - row.sent_at).total_seconds(), 0.0) / 86400, 1),
        "overdue_days": round(overdue, 1), "referred_to": row.referred_to, "specialty": row.specialty,
        "priority": row.priority, "sent_at": row.sent_at.isoformat(),
    }


#: The referrer's own cancellation: such a referral is never a CMS50 candidate.
CMS50_EXCLUDED: Final = "cancelled"


def cms50_window(year: int) -> tuple[datetime, datetime, datetime]:
    """``(1 January, 1 November, next 1 January)`` of *year* in UTC: candidates are sent in the first
    range (``sent_at < 1 Nov 00:00`` is "on or before 31 October"), the note counts until the last."""
    return (datetime(year, 1, 1, tzinfo=UTC), datetime(year, 11, 1, tzinfo=UTC), datetime(year + 1, 1, 1, tzinfo=UTC))


def cms50_candidate(sent_at: datetime | None, status: str) -> bool:
    """A referral a patient's CMS50 denominator entry can come from (see the module docstring): sent from
    1 January up to 31 October of its year (UTC), not cancelled by the referrer."""
    if sent_at is None or status == CMS50_EXCLUDED:
        return False
    moment = sent_at.astimezone(UTC)
    start, cutoff, _ = cms50_window(moment.year)
    return start <= moment < cutoff


def cms50_firsts(rows: Iterable[tuple[int, datetime | None, str]]) -> set[int]:
    """Of one patient's referrals ``(id, sent_at, status)``, the first candidate of each year (earliest
    ``sent_at``, then lowest id): what ``referrals.cms50_first`` marks, so the figure is one index range."""
    first: dict[int, tuple[datetime, int]] = {}
    for rid, sent, status in rows:
        if sent is not None and cms50_candidate(sent, status):
            year = sent.astimezone(UTC).year
            if year not in first or (sent, rid) < first[year]:
                first[year] = (sent, rid)
    return {rid for _, rid in first.values()}


def cms50_block(year: int, denominator: int, numerator: int) -> dict[str, Any]:
    return {
        "label": "CMS50-style (not a certified eCQM result)",
        "year": year,
        "referral_window": [f"{year}-01-01", f"{year}-10-31"],
        "denominator": denominator,
        "numerator": numerator,
        "rate": round(numerator / denominator, 4) if denominator else None,
        "notes": [
            "patient-level: first non-cancelled referral per patient sent 1 Jan - 31 Oct (UTC)",
            "numerator: first final consult note received after the referral and within the year",
            "no encounter feed: the referral stands in for the qualifying encounter",
            "no value sets: every referral counts; every linked final note counts as the consultant report",
        ],
    }


# -- rendering (CLI) -------------------------------------------------------------------------------
def _pct(rate: Mapping[str, Any]) -> str:
    return "-" if rate["rate"] is None else f"{rate['rate'] * 100:.1f}% ({rate['num']}/{rate['den']})"


def render_table(report: Mapping[str, Any]) -> str:
    """A plain-text report for a terminal: totals, rates, days, groups and the first leaks."""
    out: list[str] = []
    c = report["cohort"]
    out.append(f"cohort  sent {c['from']} .. {c['to']} (exclusive)  now {c['now']}")
    t = report["totals"]
    out.append("totals  " + "  ".join(f"{k} {v}" for k, v in t.items()))
    out.append("")
    out.append("rates")
    for name, rate in report["rates"].items():
        out.append(f"  {name:24} {_pct(rate)}")
    out.append("days (n / mean / median / p90)")
    for name, d in report["days"].items():
        out.append(f"  {name:24} {d['n']} / {d['mean']} / {d['median']} / {d['p90']}")
    if report["groups"]:
        out.append("")
        out.append(f"by {c['by']}")
        out.append(f"  {'group':30} {'sent':>7} {'scheduled':>10} {'completed':>10} {'closure':>8} {'leaks':>6}")
        for g in report["groups"]:
            r = g["rates"]

            def p(x: Mapping[str, Any]) -> str:
                return "-" if x["rate"] is None else f"{x['rate'] * 100:.1f}%"

            out.append(f"  {str(g['key'])[:30]:30} {g['totals']['sent']:>7} {p(r['scheduled']):>10} "
                       f"{p(r['completed']):>10} {p(r['loop_closure']):>8} {g['totals']['leaks']:>6}")
    cms = report["cms50"]
    out.append("")
    rate = "-" if cms["rate"] is None else f"{cms['rate'] * 100:.1f}%"
    out.append(f"CMS50-style {cms['year']}: {cms['numerator']}/{cms['denominator']} = {rate}")
    leaks = report["leaks"]
    out.append("")
    out.append(f"leaks ({t['leaks']}, showing {min(len(leaks), 50)})")
    for leak in leaks[:50]:
        out.append(f"  {leak['placer_id']:20} {leak['stage']:22} age {leak['age_days']:>6} d  {leak['referred_to']}")
    return "\n".join(out)


def render_csv(report: Mapping[str, Any]) -> str:
    """One row per group (the totals first): the figures a spreadsheet wants, rates as fractions."""
    buf = io.StringIO()
    rate_names = list(report["rates"])
    cols = ["group", "sent", "in_flight", "leaks", *rate_names, *(f"{d}_{s}" for d in DAY_METRICS
                                                                 for s in ("mean", "median", "p90"))]
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(cols)
    blocks = [{"key": "ALL", "totals": report["totals"], "rates": report["rates"], "days": report["days"]},
              *report["groups"]]
    for b in blocks:
        writer.writerow([b["key"], b["totals"]["sent"], b["totals"]["in_flight"], b["totals"]["leaks"],
                         *(b["rates"][n]["rate"] for n in rate_names),
                         *(b["days"][d][s] for d in DAY_METRICS for s in ("mean", "median", "p90"))])
    return buf.getvalue()

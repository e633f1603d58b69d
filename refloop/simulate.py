"""Realistic referral traffic with ground truth: for load tests, demos and end-to-end checks of the loop.

Why it exists: the referral loop is only right if every status survives what real feeds do — separate
REF, SIU and MDM links with their own lag, resends, messages without referral IDs, scheduling noise for
appointments nobody referred. The simulator draws a scenario per referral first (the truth), then
renders the messages the three systems would send about it, then a delivery plan that scrambles them.
The expected status is derived from the scenario, not by calling :func:`refloop.referral.fold`, so a
check compares two independent derivations.

What it sends (and stays within what the handlers support):

* **Epic-style** sender (``EHR``/``SCHED``/``DOCS``): REF^I12/I14 with RF1-6 and PRD RT/RP, RRI^I12
  answers, SIU^S12/S15/S26 and S14 with SCH-25 ``Complete`` (start in SCH-11.4, the appointment id also in
  PV1-19, which refloop reads only when a profile lists it in ``link_fields``; the simulator never needs
  that), MDM^T02 with TXA-17 ``AU`` and the referral in TXA-14.
* **360X-style** sender (``EHR360``): the referral is an OMG^O19 order declaring the 360X profile in MSH-21
  (ORC-1 NW/CA, ORC-2 the referral ID, PRD RT; refloop applies it without a sender profile), the
  specialist answers with OSU^O51 (``OK`` accept, ``UA`` decline, ``SC``/``IP`` interim communication,
  ``CR`` cancel confirmed, ``SC``/``CM`` finalized after the note), and the note is an ORU^R01 with OBR-2
  pointing at the referral.
* **Patient identity shapes** (per patient, on the specialist's messages): the clinic's MRN only; the
  specialist's own MRN first and the clinic's as a later repetition; the clinic's MRN typed ``PI``; v2.3
  with the clinic's MRN in PID-2; or no shared identifier at all (then the first booking names the
  referral and the referral learns the specialist's MRN from it; the messages after it can link by that).
  ``ground_truth.json`` lists the messages that carry no referral ID, with their shape, so a linking rate
  per shape can be measured.
* Some SIU and MDM carry no referral ID. They link by the heuristic (same patient, same referred-to
  provider), so every patient has at most one open referral per provider, and such a message is only
  delivered after its referral's REF was acknowledged (the heuristic cannot park). Referrals that end
  cancelled or declined always carry explicit IDs, because the heuristic only looks at open referrals.
* Noise: SIU for unreferred appointments (new patients, or referred patients seeing another provider).
* Resends: identical frames (the daemon answers from its dedup keys) and re-sends with a new MSH-10.
* Delivery: one connection per feed, each feed lagging by a random delay per message, and the feeds
  interleaved by delivery time within a window, so a SIU or MDM often arrives before its REF (parked).

All times are simulated and lie before ``now``; nothing depends on the wall clock, and no sender asks
for presumed attendance, so the statuses are the same whenever they are checked.
"""

from __future__ import annotations

import json
import random
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

from refloop import stall
from refloop.hl7.mllp import MllpClient, msa

FEEDS: Final = ("ref", "siu", "notes")
X360_APP: Final = "EHR360"


@dataclass(frozen=True)
class Rates:
    """Scenario probabilities and delays; defaults land near published figures (docs/report.md):
    about half of referrals completed and about a quarter of completed visits without a returned note."""

    decline: float = 0.05
    cancel: float = 0.05
    accept_answer: float = 0.5
    book: float = 0.68
    clinic_cancel: float = 0.05
    no_show: float = 0.15
    rebook: float = 0.5
    note: float = 0.75
    no_id: float = 0.2
    noise: float = 0.5
    resend: float = 0.03
    resend_new_id: float = 0.02
    book_days: float = 10.0
    lead_days: float = 21.0
    note_days: float = 5.0
    lag_hours: float = 36.0
    # Patient identity shapes on the specialist's messages (the rest: the clinic's MRN only).
    spec_first: float = 0.25
    shared_pi: float = 0.15
    v23_pid2: float = 0.1
    no_shared: float = 0.1
    interim: float = 0.3


@dataclass(frozen=True)
class Specialist:
    provider_id: str
    family: str
    given: str
    specialty: str
    facility: str


@dataclass
class Msg:
    """One frame to deliver: ``after`` is a control id that must be acknowledged first (heuristic links).
    ``shape``: the patient identity shape of a message that can only link by the heuristic ("" otherwise)."""

    feed: str
    at: datetime
    text: str
    control_id: str
    placer: str
    deliver_at: datetime = field(default_factory=lambda: datetime.min.replace(tzinfo=UTC))
    after: str = ""
    shape: str = ""


#: Identity shapes (see the module docstring); CLINIC is the referrers' assigning authority.
CLINIC_ONLY, SPEC_FIRST, SHARED_PI, V23_PID2, NO_SHARED = "clinic_mrn", "spec_mrn_first", "shared_pi", "v23_pid2", \
    "no_shared_id"
SHAPES: Final = (CLINIC_ONLY, SPEC_FIRST, SHARED_PI, V23_PID2, NO_SHARED)


@dataclass
class Truth:
    placer_id: str
    status: str
    style: str
    sent_at: str
    stages: list[str] = field(default_factory=list)


def _ts(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y%m%d%H%M%S+0000")


class _Writer:
    """Renders HL7 for one scenario run; control ids are deterministic so runs can be compared."""

    def __init__(self, run: str) -> None:
        self.run = run
        self.n = 0

    def cid(self, kind: str) -> str:
        self.n += 1
        return f"{self.run}{kind}{self.n:07d}"

    @staticmethod
    def msh(mtype: str, trigger: str, cid: str, at: datetime, app: str, facility: str, structure: str,
            *, version: str = "2.5.1", profile: str = "") -> str:
        fields = ["MSH", "^~\\&", app, facility, "REFLOOP", "HOSP", _ts(at), "", f"{mtype}^{trigger}^{structure}",
                  cid, "P", version]
        return "|".join(fields + ([""] * 8 + [profile] if profile else []))

    @staticmethod
    def pid(mrn: str, shape: str = CLINIC_ONLY, sp: Specialist | None = None) -> str:
        """PID in the given identity shape; the specialist's own MRN is ``S<mrn>`` of authority ``sp.facility``."""
        clinic = f"{mrn}^^^CLINIC^MR"
        own = f"S{mrn}^^^{sp.facility if sp else 'SPEC'}^MR"
        pid2, pid3 = "", clinic
        if shape == SPEC_FIRST:
            pid3 = f"{own}~{clinic}"
        elif shape == SHARED_PI:
            pid3 = f"{own}~{mrn}^^^CLINIC^PI"
        elif shape == V23_PID2:
            pid2, pid3 = f"{mrn}^^^CLINIC", own
        elif shape == NO_SHARED:
            pid3 = own
        return f"PID|1|{pid2}|{pid3}||Simulated^Patient||19800101|U"

    @staticmethod
    def version(shape: str) -> str:
        return "2.3" if shape == V23_PID2 else "2.5.1"


def _fields(seg: str, values: dict[int, str]) -> str:
    top = max(values)
    return "|".join([seg, *(values.get(i, "") for i in range(1, top + 1))])


class Simulation:
    """Draw scenarios and messages for ``referrals`` referrals sent over ``days`` days before ``now``."""

    def __init__(self, referrals: int, *, days: int = 365, seed: int = 1, now: datetime | None = None,
                 rates: Rates | None = None, styles: tuple[str, ...] = ("epic",), practices: int = 4,
                 specialists: int = 6) -> None:
        self.rnd = random.Random(seed)
        self.count, self.days = referrals, days
        self.now = (now or datetime(2026, 10, 1, tzinfo=UTC)).astimezone(UTC)
        self.rates = rates or Rates()
        self.styles = styles
        self.w = _Writer(f"S{seed % 1000:03d}")
        self.practices = [f"PRACTICE{i + 1}" for i in range(practices)]
        names = ["Heartwell", "Skinner", "Bonewright", "Lungberg", "Nervano", "Kidman", "Gutierrez", "Eyesworth"]
        specs = ["CARD", "DERM", "ORTH", "PULM", "NEUR", "NEPH", "GAST", "OPHT"]
        self.specialists = [Specialist(f"{5000 + i}", names[i % 8] + ("" if i < 8 else str(i)), "Sam",
                                       specs[i % 8], f"SPEC{i + 1}") for i in range(specialists)]
        self.messages: list[Msg] = []
        self.truth: dict[str, Truth] = {}
        self.patient_sp: dict[str, str] = {}
        self.shapes: dict[str, str] = {}

    # -- message builders --------------------------------------------------------------------------
    def _add(self, feed: str, at: datetime, text: str, cid: str, placer: str, *, after: str = "") -> Msg:
        msg = Msg(feed, at, text, cid, placer, after=after)
        self.messages.append(msg)
        return msg

    def _ref(self, style: str, placer: str, trigger: str, at: datetime, mrn: str, sp: Specialist, practice: str,
             priority: str) -> Msg:
        w = self.w
        if style == "360x":
            cid = w.cid("G")
            control = "NW" if trigger == "I12" else "CA"
            segs = [w.msh("OMG", "O19", cid, at, X360_APP, practice, "OMG_O19", profile="360X"), w.pid(mrn),
                    _fields("ORC", {1: control, 2: f"{placer}^{practice}", 9: _ts(at), 12: "1111^Goodfellow^Gale"}),
                    f"TQ1|1||||||||{priority}^Priority", f"OBR|1|{placer}^{practice}||{sp.specialty}^Referral",
                    f"PRD|RT|{sp.family}^{sp.given}^^^^Dr|||||{sp.provider_id}^NPI"]
        else:
            cid = w.cid("R")
            rf1 = {1: "P^Pending", 2: f"{priority}^Priority", 3: f"{sp.specialty}^Specialty", 4: "CON^Consultation",
                   5: "N", 6: f"{placer}^{practice}", 7: _ts(at)[:8], 10: "Reason"}
            segs = [w.msh("REF", trigger, cid, at, "EHR", practice, "REF_I12"), _fields("RF1", rf1),
                    "PRD|RP|Goodfellow^Gale^^^^Dr|||||1111^NPI",
                    f"PRD|RT|{sp.family}^{sp.given}^^^^Dr|||||{sp.provider_id}^NPI", w.pid(mrn)]
        return self._add("ref", at, "\r".join(segs) + "\r", cid, placer)

    def _rri(self, placer: str, answer: str, at: datetime, mrn: str, sp: Specialist, practice: str) -> Msg:
        cid = self.w.cid("A")
        shape = self.shapes.get(mrn, CLINIC_ONLY)
        segs = [self.w.msh("RRI", "I12", cid, at, "SPECREF", sp.facility, "RRI_I12", version=self.w.version(shape)),
                "MSA|AA|X", _fields("RF1", {1: f"{answer}^Answer", 2: "R^Routine", 3: f"{sp.specialty}^Specialty",
                                            6: f"{placer}^CLINIC"}), self.w.pid(mrn, shape, sp)]
        return self._add("ref", at, "\r".join(segs) + "\r", cid, placer)

    def _osu(self, placer: str, control: str, status: str, at: datetime, mrn: str, sp: Specialist,
             practice: str) -> Msg:
        """OSU^O51 from a 360X specialist: ORC-1/ORC-5 say what happened, ORC-2 is the referral ID."""
        cid = self.w.cid("U")
        shape = self.shapes.get(mrn, CLINIC_ONLY)
        segs = [self.w.msh("OSU", "O51", cid, at, "SPEC360", sp.facility, "OSU_O51", version=self.w.version(shape),
                           profile="360X"), self.w.pid(mrn, shape, sp),
                _fields("ORC", {1: control, 2: f"{placer}^{practice}", 3: f"F{placer}^{sp.facility}", 5: status,
                                9: _ts(at)})]
        return self._add("ref", at, "\r".join(segs) + "\r", cid, placer)

    def _siu(self, appt: str, trigger: str, status: str, at: datetime, start: datetime, mrn: str, sp: Specialist,
             placer: str, *, explicit: bool, after: str = "") -> Msg:
        cid = self.w.cid("S")
        sch = {1: f"{appt}^SCHED", 2: f"{appt}^SCHED", 6: "CONSULT^Consult", 9: "30", 10: "MIN",
               11: f"^^30^{_ts(start)}", 25: status}
        if explicit and placer:
            sch[26] = f"{placer}^CLINIC"
        shape = self.shapes.get(mrn, CLINIC_ONLY)
        segs = [self.w.msh("SIU", trigger, cid, at, "SCHED", sp.facility, "SIU_S12", version=self.w.version(shape)),
                _fields("SCH", sch), self.w.pid(mrn, shape, sp), _fields("PV1", {1: "1", 2: "O", 19: appt}), "RGS|1",
                f"AIS|1||CONSULT^Consult|{_ts(start)}",
                f"AIP|1||{sp.provider_id}^{sp.family}^{sp.given}|{sp.specialty}"]
        msg = self._add("siu", at, "\r".join(segs) + "\r", cid, placer, after=after)
        msg.shape = shape if placer and not explicit else ""
        return msg

    def _note(self, style: str, doc: str, at: datetime, mrn: str, sp: Specialist, placer: str, practice: str, *,
              explicit: bool, after: str = "") -> Msg:
        w = self.w
        shape = self.shapes.get(mrn, CLINIC_ONLY)
        version = w.version(shape)
        if style == "360x":
            cid = w.cid("O")
            obr = {1: "1", 2: f"{placer}^{practice}" if explicit else "", 3: f"{doc}^DOCS",
                   4: "11488-4^Consult note^LN", 7: _ts(at), 22: _ts(at), 25: "F",
                   32: f"{sp.provider_id}&{sp.family}&{sp.given}"}
            segs = [w.msh("ORU", "R01", cid, at, "DOCS", sp.facility, "ORU_R01", version=version),
                    w.pid(mrn, shape, sp), _fields("OBR", obr),
                    "OBX|1|TX|11488-4^Consult note^LN||Simulated report.||||||F"]
        else:
            cid = w.cid("M")
            txa = {1: "1", 2: "CN^Consult note", 3: "TX", 4: _ts(at), 5: f"{sp.provider_id}^{sp.family}^{sp.given}",
                   12: doc, 17: "AU", 19: "AV"}
            if explicit:
                txa[14] = f"{placer}^CLINIC"
            segs = [w.msh("MDM", "T02", cid, at, "DOCS", sp.facility, "MDM_T02", version=version),
                    f"EVN|T02|{_ts(at)}", w.pid(mrn, shape, sp), "PV1|1|O", _fields("TXA", txa),
                    "OBX|1|TX|11488-4^Consult note^LN||Simulated note.||||||F"]
        msg = self._add("notes", at, "\r".join(segs) + "\r", cid, placer, after=after)
        msg.shape = shape if not explicit else ""
        return msg

    # -- scenarios ---------------------------------------------------------------------------------
    def _delay(self, mean_days: float) -> timedelta:
        return timedelta(days=self.rnd.expovariate(1 / mean_days) + self.rnd.uniform(0.05, 0.5))

    def build(self) -> Simulation:
        """Draw every scenario, its messages, noise, resends and the delivery plan (deterministic)."""
        rnd, r = self.rnd, self.rates
        start = self.now - timedelta(days=self.days)
        for i in range(self.count):
            self._scenario(i, start + timedelta(seconds=rnd.uniform(0, self.days * 86400 - 3600)))
        for j in range(int(self.count * r.noise)):
            at = start + timedelta(seconds=rnd.uniform(0, self.days * 86400 - 3600))
            mrn = f"NOISE{j:07d}" if rnd.random() < 0.7 else f"P{rnd.randrange(self.count):07d}"
            # A referred patient's other appointments must be with someone else, or they would link.
            sp = rnd.choice([s for s in self.specialists if s.provider_id != self.patient_sp.get(mrn)])
            self._siu(f"N{j:07d}", "S12", "Booked", at, at + timedelta(days=rnd.uniform(1, 30)), mrn, sp, "",
                      explicit=False)
        self._resends()
        self._plan()
        return self

    def _scenario(self, i: int, sent: datetime) -> None:
        rnd, r = self.rnd, self.rates
        style = rnd.choice(self.styles)
        placer = f"{self.w.run}RF{i:07d}"
        mrn = f"P{i:07d}"
        sp = self.specialists[i % len(self.specialists)] if rnd.random() < 0.3 else rnd.choice(self.specialists)
        practice = rnd.choice(self.practices)
        self.patient_sp[mrn] = sp.provider_id
        shares = (r.spec_first, r.shared_pi, r.v23_pid2, r.no_shared)
        shape = self.shapes[mrn] = rnd.choices(SHAPES, weights=[max(0.0, 1 - sum(shares)), *shares])[0]
        priority = rnd.choices(["R", "U", "S"], weights=[85, 12, 3])[0]
        ref = self._ref(style, placer, "I12", sent, mrn, sp, practice, priority)
        truth = Truth(placer, "sent", style, sent.isoformat())
        self.truth[placer] = truth
        now = self.now

        def within(moment: datetime) -> bool:
            return moment < now

        fate = rnd.random()
        if fate < r.decline:
            at = sent + self._delay(3)
            if within(at):
                if style == "360x":
                    self._osu(placer, "UA", "", at, mrn, sp, practice)
                else:
                    self._rri(placer, "R", at, mrn, sp, practice)
                truth.status = "declined"
            self._stages(truth, sent, priority, sp, None, None, 0)
            return
        cancel = fate < r.decline + r.cancel
        heuristic = not cancel and rnd.random() < r.no_id
        # Without a shared identifier only an identifier the referral learned can link a message without the
        # referral ID: the first booking names the referral (SCH-26) and teaches it the specialist's MRN, and
        # the messages after it depend on it.
        teacher = ""
        if rnd.random() < r.accept_answer:
            at = sent + self._delay(2)
            if within(at):
                if style == "360x":
                    self._osu(placer, "OK", "", at, mrn, sp, practice)
                else:
                    self._rri(placer, "A", at, mrn, sp, practice)
        t = sent + self._delay(r.book_days)
        no_shows = 0
        last_no_show: datetime | None = None
        completed_at: datetime | None = None
        appt_n = 0
        status = "sent"
        if rnd.random() < r.book:
            while within(t) and appt_n < 3:
                appt_n += 1
                appt = f"{placer}A{appt_n}"
                begin = t + self._delay(r.lead_days)
                if heuristic and shape == NO_SHARED and not teacher:
                    teacher = self._siu(appt, "S12", "Booked", t, begin, mrn, sp, placer, explicit=True,
                                        after=ref.control_id).control_id
                else:
                    self._siu(appt, "S12", "Booked", t, begin, mrn, sp, placer, explicit=not heuristic,
                              after=(teacher or ref.control_id) if heuristic else "")
                after = (teacher or ref.control_id) if heuristic else ""
                status = "scheduled"
                if style == "360x" and appt_n == 1 and rnd.random() < r.interim:
                    interim_at = t + timedelta(hours=2)
                    if within(interim_at):  # an interim communication changes no status
                        self._osu(placer, "SC", "IP", interim_at, mrn, sp, practice)
                if not within(begin + timedelta(hours=1)):
                    break
                outcome = rnd.random()
                out_at = begin + timedelta(hours=1)
                if outcome < r.clinic_cancel:
                    cancel_at = max(t + timedelta(hours=1), begin - timedelta(days=1))
                    self._siu(appt, "S15", "Cancelled", cancel_at, begin, mrn, sp, placer,
                              explicit=not heuristic, after=after)
                    status = "sent"
                    t = begin
                    continue
                if outcome < r.clinic_cancel + r.no_show:
                    self._siu(appt, "S26", "Noshow", out_at, begin, mrn, sp, placer, explicit=not heuristic,
                              after=after)
                    no_shows += 1
                    last_no_show = out_at
                    status = "no_show"
                    if rnd.random() < r.rebook:
                        t = out_at + self._delay(4)
                        continue
                    break
                done = self._siu(appt, "S14", "Complete", out_at, begin, mrn, sp, placer, explicit=not heuristic,
                                 after=after)
                status, completed_at = "completed", begin
                if rnd.random() < r.note:
                    note_at = out_at + self._delay(r.note_days)
                    if within(note_at):
                        # A note without the referral ID closes the loop: it must follow the bookings it
                        # closes, or they would find no open referral to link to.
                        note = self._note(style, f"{placer}D1", note_at, mrn, sp, placer, practice,
                                          explicit=not heuristic, after=done.control_id if heuristic else "")
                        status = "closed"
                        final_at = note_at + timedelta(minutes=30)
                        if style == "360x" and within(final_at):  # the outcome was sent: Finalized
                            final = self._osu(placer, "SC", "CM", final_at, mrn, sp, practice)
                            final.after = note.control_id if heuristic else ""
                break
        if cancel:
            at = sent + self._delay(20)
            if within(at) and status != "closed":
                self._ref(style, placer, "I14", at, mrn, sp, practice, priority)
                status = "cancelled"
                confirm_at = at + self._delay(1)
                if style == "360x" and within(confirm_at):  # the specialist confirms: CancelConfirmed
                    self._osu(placer, "CR", "", confirm_at, mrn, sp, practice)
        truth.status = status
        self._stages(truth, sent, priority, sp, completed_at, last_no_show, no_shows)

    def _stages(self, truth: Truth, sent: datetime, priority: str, sp: Specialist, completed_at: datetime | None,
                last_no_show: datetime | None, no_shows: int) -> None:
        """Expected open stall stages at ``now`` with the default windows (see :mod:`refloop.stall`)."""
        windows = stall.Windows()
        now, status = self.now, truth.status

        def late(stage: str, begin: datetime | None) -> bool:
            if begin is None:
                return False
            days = windows.priority_days.get((stall.priority_class(priority), stage), windows.stage_days[stage])
            return (now - begin).total_seconds() / 86400 >= days

        stages = []
        if status == "sent" and late(stall.SCHEDULING, sent):
            stages.append(stall.SCHEDULING)
        if status == "no_show" and (late(stall.REBOOKING, last_no_show) or no_shows >= 2):
            stages.append(stall.REBOOKING)
        if status in ("sent", "scheduled", "no_show") and late(stall.VISIT, sent):
            stages.append(stall.VISIT)
        if status == "completed" and late(stall.NOTE, completed_at):
            stages.append(stall.NOTE)
        truth.stages = stages

    def _resends(self) -> None:
        rnd, r = self.rnd, self.rates
        extra: list[Msg] = []
        for msg in self.messages:
            roll = rnd.random()
            if roll < r.resend:
                extra.append(Msg(msg.feed, msg.at + timedelta(minutes=5), msg.text, msg.control_id, msg.placer,
                                 after=msg.after))
            elif roll < r.resend + r.resend_new_id:
                cid = self.w.cid("X")
                text = msg.text.replace(f"|{msg.control_id}|", f"|{cid}|", 1)
                extra.append(Msg(msg.feed, msg.at + timedelta(minutes=7), text, cid, msg.placer, after=msg.after))
        self.messages.extend(extra)

    def _plan(self) -> None:
        """Delivery time = event time + a random per-message lag; dependent messages go after their REF."""
        lag = self.rates.lag_hours
        for msg in self.messages:
            msg.deliver_at = msg.at + timedelta(hours=self.rnd.uniform(0, lag))
        by_cid = {m.control_id: m for m in self.messages}  # in creation order: a dependency comes first
        for msg in self.messages:
            if msg.after and msg.after in by_cid:
                msg.deliver_at = max(msg.deliver_at, by_cid[msg.after].deliver_at + timedelta(seconds=1))
        self.messages.sort(key=lambda m: (m.deliver_at, m.control_id))

    # -- outputs -----------------------------------------------------------------------------------
    def ground_truth(self) -> dict[str, Any]:
        counts = Counter(t.status for t in self.truth.values())
        return {"now": self.now.isoformat(), "referrals": len(self.truth), "messages": len(self.messages),
                "status_counts": dict(sorted(counts.items())),
                "expected": {p: asdict(t) for p, t in sorted(self.truth.items())},
                "heuristic_messages": self.heuristic_messages()}

    def heuristic_messages(self) -> dict[str, str]:
        """Control id -> identity shape of every message that can only link by the heuristic (no referral ID),
        so a linking rate per shape can be read back from a store (``bench/linking_shapes.py``)."""
        return {m.control_id: m.shape for m in self.messages if m.shape}

    def feed(self, name: str) -> list[Msg]:
        return [m for m in self.messages if m.feed == name]

    def write(self, out: Path) -> dict[str, Path]:
        """One file per feed in delivery order (``refloop send`` reads them), plus ``ground_truth.json``.

        Send ``ref.hl7`` first: messages without a referral ID link by the heuristic only after their REF.
        """
        out.mkdir(parents=True, exist_ok=True)
        paths = {}
        for name in FEEDS:
            path = out / f"{name}.hl7"
            path.write_bytes(b"".join(m.text.replace("\r", "\n").encode("latin-1") + b"\n" for m in self.feed(name)))
            paths[name] = path
        gt = out / "ground_truth.json"
        gt.write_text(json.dumps(self.ground_truth(), indent=1))
        paths["ground_truth"] = gt
        return paths


# -- sending -----------------------------------------------------------------------------------------
class _Progress:
    def __init__(self, total: int, stream: Any) -> None:
        self.total, self.done, self.stream = total, 0, stream
        self.lock = threading.Lock()
        self.last = 0.0

    def tick(self) -> None:
        with self.lock:
            self.done += 1
            now = time.monotonic()
            if now - self.last > 0.2 or self.done == self.total:
                self.last = now
                filled = int(30 * self.done / max(self.total, 1))
                self.stream.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total}")
                if self.done == self.total:
                    self.stream.write("\n")
                self.stream.flush()


def send(sim: Simulation, host: str, port: int, *, window: int = 300, timeout: float = 60.0,
         progress: Any = None) -> dict[str, int]:
    """Deliver over one MLLP connection per feed, interleaved by delivery time within ``window`` messages.

    Each thread sends its feed in order and lock-step (like an interface engine). A message may go ahead
    of others by up to ``window`` places, which is what scrambles the feeds; a heuristic message also
    waits for its REF's ACK. Returns ACK codes counted.
    """
    order = {id(m): k for k, m in enumerate(sim.messages)}
    done = [False] * len(sim.messages)
    acked: set[str] = set()
    cond = threading.Condition()
    state = {"low": 0}
    codes: Counter[str] = Counter()
    errors: list[BaseException] = []
    bar = _Progress(len(sim.messages), progress) if progress is not None else None

    def wait(pred: Callable[[], bool]) -> None:
        deadline = time.monotonic() + timeout
        with cond:
            while not pred():
                left = deadline - time.monotonic()
                if left <= 0 or errors:
                    raise TimeoutError("simulator delivery stalled")
                cond.wait(min(left, 1.0))

    def run(feed: str) -> None:
        try:
            with MllpClient(host, port, timeout=timeout) as client:
                for msg in sim.feed(feed):
                    k = order[id(msg)]
                    wait(lambda k=k: state["low"] >= k - window)  # type: ignore[misc]
                    if msg.after:
                        wait(lambda a=msg.after: a in acked)  # type: ignore[misc]
                    code = msa(client.send(msg.text.encode("latin-1")))[0]
                    with cond:
                        codes[code] += 1
                        done[k] = True
                        acked.add(msg.control_id)
                        while state["low"] < len(done) and done[state["low"]]:
                            state["low"] += 1
                        cond.notify_all()
                    if bar is not None:
                        bar.tick()
        except BaseException as exc:
            with cond:
                errors.append(exc)
                cond.notify_all()

    threads = [threading.Thread(target=run, args=(f,), daemon=True) for f in FEEDS]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return dict(codes)


def _get(base: str, path: str, token: str = "") -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    req = urllib.request.Request(base + path, headers=headers)  # noqa: S310 - always http://, built here
    with urllib.request.urlopen(req, timeout=60) as resp:  # noqa: S310
        return json.loads(resp.read())


def _get_all(base: str, path: str, token: str = "") -> list[Any]:
    """Every page of a paged list (``GET /api/worklist``), following its ``Link: <...>; rel="next"`` header."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    rows: list[Any] = []
    for _ in range(100_000):  # bounded: a page holds at least one row
        req = urllib.request.Request(base + path, headers=headers)  # noqa: S310 - always http://, built here
        with urllib.request.urlopen(req, timeout=60) as resp:  # noqa: S310
            rows += json.loads(resp.read())
            link = resp.headers.get("Link", "")
        if 'rel="next"' not in link:
            break
        path = link.split(">", 1)[0].lstrip("<")
    return rows


def _post(base: str, path: str, token: str = "") -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    req = urllib.request.Request(base + path, data=b"", headers=headers, method="POST")  # noqa: S310
    with urllib.request.urlopen(req, timeout=300) as resp:  # noqa: S310 - always http://, built here
        return json.loads(resp.read())


def check(sim: Simulation, http: str, *, token: str = "") -> dict[str, Any]:
    """Read statuses and the report back and compare them with the ground truth."""
    base = f"http://{http}"
    expected = {p: t.status for p, t in sim.truth.items()}
    seen: dict[str, str] = {}
    for status in sorted(set(expected.values()) | {"sent", "scheduled", "completed", "no_show", "closed"}):
        rows = _get(base, "/api/referrals?" + urllib.parse.urlencode({"status": status}), token)
        if len(rows) < 500:  # the list API pages at 500: beyond that, ask one by one below
            seen.update({r["placer_id"]: r["status"] for r in rows if r["placer_id"] in expected})
    for placer in (p for p in expected if p not in seen):
        rows = _get(base, "/api/referrals?" + urllib.parse.urlencode({"placer_id": placer}), token)
        seen[placer] = rows[0]["status"] if rows else "missing"
    confusion: Counter[tuple[str, str]] = Counter((expected[p], seen.get(p, "missing")) for p in expected)
    agree = sum(n for (e, g), n in confusion.items() if e == g)
    first = min(datetime.fromisoformat(t.sent_at) for t in sim.truth.values()) if sim.truth else sim.now
    query = urllib.parse.urlencode({"from": first.date().isoformat(),
                                    "to": (sim.now + timedelta(days=1)).date().isoformat(),
                                    "now": sim.now.isoformat()})
    report = _get(base, "/api/report?" + query, token)
    want_closed = sum(1 for s in expected.values() if s == "closed")
    report_ok = report["totals"]["sent"] == len(expected) and report["totals"]["closed"] == want_closed
    # Alerts: one scan as of the simulation's end instant, then the worklist against the expected stalls.
    _post(base, "/api/scan?" + urllib.parse.urlencode({"as_of": sim.now.isoformat()}), token)
    got = {(r["placer_id"], r["stage"]) for r in _get_all(base, "/api/worklist?owner=", token)
           if r.get("placer_id") in expected and r.get("stage") in stall.STAGES}
    want = {(p, stage) for p, t in sim.truth.items() for stage in t.stages}
    alerts_ok = got == want
    linking = linking_rates(sim, base, token)
    return {
        "referrals": len(expected),
        "status_agreement": round(100 * agree / max(len(expected), 1), 3),
        "confusion": {f"{e}->{g}": n for (e, g), n in sorted(confusion.items())},
        "report": {"sent": report["totals"]["sent"], "expected_sent": len(expected),
                   "closed": report["totals"]["closed"], "expected_closed": want_closed, "agrees": report_ok},
        "alerts": {"expected": len(want), "found": len(got), "missing": len(want - got), "unexpected": len(got - want),
                   "agrees": alerts_ok,
                   "examples": sorted(want ^ got)[:5]},
        "linking": linking,
        "ok": agree == len(expected) and report_ok and alerts_ok
        and all(v["linked"] == v["messages"] for v in linking.values()),
    }


def linking_rates(sim: Simulation, base: str, token: str = "") -> dict[str, dict[str, Any]]:
    """Per identity shape: how many of the messages that carry no referral ID ended on their referral (the
    referral's ``links`` name them). Reads only ``GET /api/referrals/{placer}``, so it also measures an
    older refloop."""
    by_placer: dict[str, list[Msg]] = {}
    for m in sim.messages:
        if m.shape:
            by_placer.setdefault(m.placer, []).append(m)
    counts: dict[str, list[int]] = {}
    for placer, msgs in sorted(by_placer.items()):
        try:
            doc = _get(base, "/api/referrals/" + urllib.parse.quote(placer, safe=""), token)
            linked = {lk["control_id"] for lk in doc.get("links", [])}
        except urllib.error.HTTPError:
            linked = set()
        for m in msgs:
            c = counts.setdefault(m.shape, [0, 0])
            c[0] += 1
            c[1] += m.control_id in linked
    return {shape: {"messages": n, "linked": k, "rate": round(100 * k / n, 1)}
            for shape, (n, k) in sorted(counts.items())}


def wait_settled(http: str, total_sent: int, token: str = "", timeout: float = 300.0) -> None:
    """Wait until the daemon has applied every message it acknowledged (``apply_lag_messages`` 0 on
    /readyz): with ``ack_after = "journal"`` an ACK means stored, and the referral state follows shortly."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://{http}/readyz", timeout=10) as resp:
                body = json.loads(resp.read())
            if body.get("apply_lag_messages") == 0:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.1)
    print(f"refloop simulate: {http} had not applied all of {total_sent} messages after {timeout:.0f} s",
          file=sys.stderr)

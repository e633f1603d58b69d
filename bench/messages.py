"""Synthetic HL7 v2.5.1 traffic for the benchmark: invented patients, unique control IDs per run.

The mix, per connection, by message index ``i``:

* ``i % 10 == 0``        REF^I12 that opens a referral (RF1-6 = referral id),             ~10 %
* ``i % 10 in (3, 7)``   SIU^S12 booking for a referral this connection sent (SCH-26 + RF1), ~20 %
* everything else       SIU^S12 for an unreferred patient (a department feed),           ~70 %
* every 200th message   MDM^T02 with a ~4 KB note instead of the department SIU           ~0.5 %

Everything is ASCII (python-hl7's server decodes ASCII by default) and CR-terminated. Control IDs are
``<run tag 6><conn 2 base36><seq base10 >=6>``, at most 20 characters (MSH-10 is ST 20 in v2.5).

Building a message is one ``%``-format of a pre-split template (a few microseconds), so it is cheap
enough to do inside the generator's loop.
"""

from __future__ import annotations

import random
import string

FAMILY = ("Ardent", "Bellweather", "Corvane", "Dunmore", "Eastling", "Fairholt", "Greywick", "Hollis",
          "Ingleby", "Jessop", "Kettering", "Lowther", "Marchbank", "Northway", "Oakridge", "Pennick",
          "Quenby", "Rushworth", "Stavely", "Thornbury", "Underhill", "Vantress", "Whitcombe", "Yardley")
GIVEN = ("Alma", "Bram", "Cora", "Dario", "Edith", "Felix", "Greta", "Hugo", "Iris", "Jonah", "Kira",
         "Lionel", "Mira", "Nils", "Opal", "Pavel", "Rosa", "Silas", "Tess", "Viggo", "Wren", "Yusuf")
STREETS = ("Larkspur Way", "Quarry Lane", "Mill Race Rd", "Copper Beech Ave", "Tanner St", "Harbour View")
CITIES = (("Fenwick", "OR", "97401"), ("Ashby", "WA", "98101"), ("Glenmoor", "ID", "83702"))
DEPTS = (("CARD", "Cardiology"), ("DERM", "Dermatology"), ("ORTH", "Orthopaedics"),
         ("NEUR", "Neurology"), ("GAST", "Gastroenterology"), ("ENDO", "Endocrinology"))

_MSH = "MSH|^~\\&|%s|%s|REFLOOP|HOSP|%s||%s|%s|P|2.5.1|||AL|NE||ASCII\r"

SIU = (
    _MSH
    + "SCH|%(placer)s^PLACER|%(filler)s^FILLER|||ROUTINE^Routine^HL70276|FOLLOWUP^Follow-up visit"
      "^HL70277|Follow-up after referral assessment^^LOCAL|NORMAL^Normal^HL70278|30|min^minutes^ANS+"
      "|^^30^%(start)s^%(end)s|%(doc)s^%(dfam)s^%(dgiv)s^^^Dr.^MD|^WPN^PH^^1^541^5550142|"
      "200 Clinic Dr^^Fenwick^OR^97401|%(dept)s^^^CLINIC|%(doc)s^%(dfam)s^%(dgiv)s^^^Dr.^MD|"
      "^WPN^PH^^1^541^5550142|200 Clinic Dr^^Fenwick^OR^97401|%(dept)s^^^CLINIC||||||Booked^Booked^HL70278|"
      "%(ref_sch)s\r"
    + "NTE|1|P|Patient asked for a morning slot; interpreter not required.\r"
    + "PID|1||%(mrn)s^^^FENWICKMC^MR~%(ssn)s^^^USSSA^SS||%(fam)s^%(giv)s^M^^^^L||%(dob)s|%(sex)s|||"
      "%(num)s %(street)s^^%(city)s^%(st)s^%(zip)s^USA^H||^PRN^PH^^1^541^%(phone)s|||S||%(acct)s^^^FENWICKMC^AN\r"
    + "PV1|1|O|%(dept)s^EXAM3^1^FENWICKMC||||%(doc)s^%(dfam)s^%(dgiv)s^^^Dr.^MD|||%(dept)s||||1|||"
      "%(doc)s^%(dfam)s^%(dgiv)s^^^Dr.^MD|OP|%(visit)s^^^FENWICKMC^VN|||||||||||||||||||||||||%(start)s\r"
    + "RGS|1|A|%(dept)s-RG1\r"
    + "AIS|1|A|%(dept)s-FU^%(deptname)s follow-up^LOCAL|%(start)s|0|min|30|min|Booked^Booked^HL70278\r"
    + "AIG|1|A|%(doc)s^%(dfam)s^%(dgiv)s|MD^Physician^LOCAL||||%(start)s|0|min|30|min\r"
    + "AIL|1|A|%(dept)s^EXAM3^1^FENWICKMC|CLINIC^Clinic room^LOCAL||%(start)s|0|min|30|min\r"
    + "AIP|1|A|%(doc)s^%(dfam)s^%(dgiv)s^^^Dr.^MD|ATTEND^Attending^LOCAL||%(start)s|0|min|30|min\r"
)

REF = (
    _MSH
    + "RF1|P^Pending^HL70283|R^Routine^HL70280|MED^Medical^HL70281|GRF^General referral^HL70282||"
      "%(ref)s^FENWICKMC|%(start)s|%(end)s|%(start)s|Evaluate and advise^^LOCAL\r"
    + "PRD|RP^Referring provider^HL70286|Hollis^Anne^^^Dr.|12 Elm St^^Fenwick^OR^97401|||||RP4471^NPI\r"
    + "PRD|RT^Referred to provider^HL70286|%(dfam)s^%(dgiv)s^^^Dr.|200 Clinic Dr^^Fenwick^OR^97401||||%(dept)s|"
      "%(doc)s^NPI\r"
    + "PID|1||%(mrn)s^^^FENWICKMC^MR||%(fam)s^%(giv)s^M^^^^L||%(dob)s|%(sex)s|||"
      "%(num)s %(street)s^^%(city)s^%(st)s^%(zip)s^USA^H||^PRN^PH^^1^541^%(phone)s\r"
    + "DG1|1||R07.9^Chest pain, unspecified^I10|||W\r"
    + "PV1|1|O|PCP^ROOM1^1^FENWICKMC||||RP4471^Hollis^Anne^^^Dr.^MD\r"
)

MDM = (
    _MSH
    + "EVN|T02|%(start)s\r"
    + "PID|1||%(mrn)s^^^FENWICKMC^MR||%(fam)s^%(giv)s^M^^^^L||%(dob)s|%(sex)s\r"
    + "PV1|1|O|%(dept)s^EXAM3^1^FENWICKMC||||%(doc)s^%(dfam)s^%(dgiv)s^^^Dr.^MD\r"
    + "TXA|1|CN^Consultation note^LOCAL|TX|%(start)s|%(doc)s^%(dfam)s^%(dgiv)s|||||||%(filler)s^FILLER||"
      "%(ref)s|||AU|||||%(doc)s^%(dfam)s^%(dgiv)s\r"
    + "%(obx)s"
)

_NOTE_LINES = (
    "History: referred for evaluation; symptoms reported over several weeks with gradual onset.",
    "Examination: alert and oriented, vital signs within normal limits, no acute distress noted.",
    "Assessment: findings consistent with the referral question; no red flags on examination today.",
    "Plan: continue current medication, follow up in clinic, return earlier if symptoms worsen.",
)


def _note(n_lines: int) -> str:
    return "".join(f"OBX|{i + 1}|TX|NOTE^Note text^LOCAL||{_NOTE_LINES[i % 4]}||||||F\r" for i in range(n_lines))


_ALNUM = string.ascii_uppercase + string.digits


def run_tag(rng: random.Random | None = None) -> str:
    r = rng or random.SystemRandom()
    return "".join(r.choice(_ALNUM) for _ in range(6))


def _b36(n: int) -> str:
    return (_ALNUM[n // 36] + _ALNUM[n % 36]) if n < 36 * 36 else str(n)


class MessageFactory:
    """Builds the per-connection message stream. ``next()`` returns ``(control_id, frame_bytes, kind)``."""

    def __init__(self, tag: str, conn: int, seed: int = 0) -> None:
        self.prefix = f"{tag}{_b36(conn)}"
        self.rng = random.Random(f"{tag}-{conn}-{seed}")
        self.seq = 0
        self.referrals: list[dict[str, str]] = []  # patients with an open referral from this connection
        self.note = _note(48)  # 48 lines: about 5 KB
        self.sender = ("ENGINE", f"CLINIC{conn % 4}")
        # A pool of invented patients per connection keeps generation at a few microseconds per message.
        self.pool = [self._patient() for _ in range(256)]

    def _patient(self) -> dict[str, str]:
        r = self.rng
        city, st, zp = r.choice(CITIES)
        dept, deptname = r.choice(DEPTS)
        return {
            "mrn": f"MR{r.randrange(10**7, 10**8)}", "ssn": f"9{r.randrange(10**7, 10**8)}",
            "fam": r.choice(FAMILY), "giv": r.choice(GIVEN),
            "dob": f"19{r.randrange(30, 99)}{r.randrange(1, 13):02d}{r.randrange(1, 29):02d}",
            "sex": r.choice("FM"), "num": str(r.randrange(1, 999)), "street": r.choice(STREETS),
            "city": city, "st": st, "zip": zp, "phone": f"{r.randrange(10**6, 10**7)}",
            "acct": f"AC{r.randrange(10**8, 10**9)}", "dept": dept, "deptname": deptname,
            "doc": f"D{r.randrange(1000, 9999)}", "dfam": r.choice(FAMILY), "dgiv": r.choice(GIVEN),
        }

    def next(self) -> tuple[str, bytes, str]:
        i = self.seq
        self.seq += 1
        cid = f"{self.prefix}{i:06d}"
        day = 1 + i % 28
        base = {"start": f"202612{day:02d}0930", "end": f"202612{day:02d}1000", "placer": f"P{cid}",
                "filler": f"F{cid}", "visit": f"V{cid}", "ref": "", "ref_sch": ""}
        m = i % 10
        if m == 0:
            kind, p = "REF", dict(self.pool[(i * 7919) % 256])
            p["ref"] = f"RF{cid}"
            self.referrals.append(p)
            if len(self.referrals) > 64:
                del self.referrals[0]
            tmpl, mtype = REF, "REF^I12^REF_I12"
        elif m in (3, 7) and self.referrals:
            # Each referral gets two bookings over its life: one right after the REF, one three REFs later
            # (a follow-up or a second clinic). Picking by a rotating offset instead sent ~128 bookings to
            # one referral at a time, which no feed does and which made every fold replay 100+ events.
            back = 1 if m == 3 else min(4, len(self.referrals))
            kind, p = "SIU-ref", self.referrals[-back]
            p = dict(p, ref_sch=p["ref"])
            tmpl, mtype = SIU, "SIU^S12^SIU_S12"
        elif i % 200 == 199:
            kind, p = "MDM", (self.referrals[-1] if self.referrals else self.pool[i % 256])
            p = dict(p, obx=self.note)
            tmpl, mtype = MDM, "MDM^T02^MDM_T02"
        else:
            # The department feed's patients are not the referred ones: their own MRN per appointment (the
            # pool only supplies names and addresses). Sharing the referred patients' MRNs made every REF's
            # patient a department regular with the referred-to doctor, which no clinic's feed looks like.
            kind, p = "SIU", dict(self.pool[(i * 104729) % 256], mrn=f"MD{cid}")
            tmpl, mtype = SIU, "SIU^S12^SIU_S12"
        fields = {**base, **p}
        head = _MSH % (self.sender[0], self.sender[1], f"202611270900{i % 60:02d}", mtype, cid)
        body = tmpl[len(_MSH):] % fields
        return cid, b"\x0b" + (head + body).encode("ascii") + b"\x1c\r", kind


if __name__ == "__main__":  # print one of each kind, for eyeballing
    f = MessageFactory(run_tag(), 1)
    seen: dict[str, bytes] = {}
    while len(seen) < 4:
        _, data, kind = f.next()
        seen.setdefault(kind, data)
    for kind, data in seen.items():
        print(f"--- {kind} ({len(data) - 3} bytes)")
        print(data[1:-2].decode().replace("\r", "\n"))

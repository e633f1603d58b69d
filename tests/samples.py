"""Synthetic HL7 fixtures written for refloop's tests: invented patients, providers and IDs.

Shapes follow the public examples described in the HL7 v2.5.1 chapters (REF^I12, SIU^S12, MDM^T02),
but every value here is made up. ``CANARY_NAME`` and ``CANARY_MRN`` are the PHI canaries that must
never appear in logs or metrics.
"""

from __future__ import annotations

import itertools

CANARY_NAME = "Quetzalcoatl^Zebediah"
CANARY_MRN = "MRN777000111"

_ids = itertools.count(1)


def control_id(prefix: str = "T") -> str:
    return f"{prefix}{next(_ids):08d}"


def msh(mtype: str, trigger: str, cid: str, *, version: str = "2.5.1", structure: str | None = None,
        app: str = "ENGINE", facility: str = "CLINIC", processing: str = "P", accept: str = "",
        app_ack: str = "", charset: str = "") -> str:
    struct = structure if structure is not None else f"{mtype}_{trigger}"
    nine = f"{mtype}^{trigger}^{struct}" if struct else f"{mtype}^{trigger}"
    fields = ["MSH", "^~\\&", app, facility, "REFLOOP", "HOSP", "20260105090000-0500", "", nine, cid,
              processing, version, "", "", accept, app_ack, "", charset]
    while fields and fields[-1] == "" and len(fields) > 12:
        fields.pop()
    return "|".join(fields)


def siu(cid: str | None = None, *, trigger: str = "S12", version: str = "2.5.1", patient: str = CANARY_NAME,
        mrn: str = CANARY_MRN, **kw: str) -> str:
    cid = cid or control_id("S")
    segs = [
        msh("SIU", trigger, cid, version=version, **{"structure": "SIU_S12", **kw}),
        f"SCH|APT{cid}^SCHED|APT{cid}^SCHED|||REF{cid}|CONSULT^Consult||30|MIN|^^30^20260112090000-0500"
        f"^20260112093000-0500|||||||||||||Booked",
        f"PID|1||{mrn}^^^CLINIC^MR||{patient}||19700101|F",
        "PV1|1|O",
        "RGS|1",
        "AIS|1||CARDIO^Cardiology consult|20260112090000-0500|0|MIN|30|MIN",
        "AIP|1||1234^Heartwell^Hana^^^^^^NPI|CARD",
    ]
    return "\r".join(segs) + "\r"


def ref(cid: str | None = None, *, trigger: str = "I12", version: str = "2.5.1", patient: str = CANARY_NAME,
        mrn: str = CANARY_MRN, referral: str = "R1001", **kw: str) -> str:
    cid = cid or control_id("R")
    segs = [
        msh("REF", trigger, cid, version=version, **{"structure": "REF_I12", **kw}),
        f"RF1|P^Pending|R^Routine|MED^Medical|CON^Consultation|N|{referral}^CLINIC|20260105|20260705|"
        f"Chest pain",
        "PRD|RP|Goodfellow^Gale^^^^Dr|||||1111^NPI",
        "PRD|RT|Heartwell^Hana^^^^Dr|||||1234^NPI",
        f"PID|1||{mrn}^^^CLINIC^MR||{patient}||19700101|F",
    ]
    return "\r".join(segs) + "\r"


def mdm(cid: str | None = None, *, trigger: str = "T02", version: str = "2.5.1", patient: str = CANARY_NAME,
        mrn: str = CANARY_MRN, note: str = "Patient seen.\\.br\\Plan: follow up.", **kw: str) -> str:
    cid = cid or control_id("M")
    segs = [
        msh("MDM", trigger, cid, version=version, **{"structure": "MDM_T02", **kw}),
        "EVN|T02|20260113100000-0500",
        f"PID|1||{mrn}^^^CLINIC^MR||{patient}||19700101|F",
        "PV1|1|O",
        f"TXA|1|CN^Consultation note|TX|20260113100000-0500|1234^Heartwell^Hana||||||DOC{cid}||"
        "R1001^CLINIC|||AU||AV",
        f"OBX|1|TX|CONSULT^Consult note||{note}||||||F",
    ]
    return "\r".join(segs) + "\r"


def adt(cid: str | None = None, *, trigger: str = "A08", version: str = "2.5.1", patient: str = CANARY_NAME,
        mrn: str = CANARY_MRN, **kw: str) -> str:
    """ADT (no route in refloop: journaled as ignored, or AR 200 with ``unsupported = "reject"``)."""
    cid = cid or control_id("A")
    segs = [
        msh("ADT", trigger, cid, version=version, **{"structure": "ADT_A01", **kw}),
        f"EVN|{trigger}|20260105090000-0500",
        f"PID|1||{mrn}^^^CLINIC^MR||{patient}||19700101|F",
        "PV1|1|O",
    ]
    return "\r".join(segs) + "\r"


def odd(cid: str | None = None, *, mtype: str = "ZZZ", trigger: str = "Z01", patient: str = CANARY_NAME,
        mrn: str = CANARY_MRN, **kw: str) -> str:
    """A site-specific message type nobody routes (e.g. ZZZ^Z01), with PHI in a Z-segment."""
    cid = cid or control_id("Z")
    segs = [
        msh(mtype, trigger, cid, **{"structure": "", **kw}),
        f"PID|1||{mrn}^^^CLINIC^MR||{patient}||19700101|F",
        f"ZPI|1|{patient}|{mrn}",
    ]
    return "\r".join(segs) + "\r"


# -- referral-loop builders: every field at its v2.5.1 position, times given explicitly ----------------
def _fields(seg: str, values: dict[int, str]) -> str:
    """A segment with ``values`` at their field numbers (1-based) and empty fields elsewhere."""
    top = max(values) if values else 0
    return "|".join([seg, *(values.get(i, "") for i in range(1, top + 1))])


def _head(mtype: str, trigger: str, cid: str, at: str, app: str, facility: str, structure: str) -> str:
    return "|".join(["MSH", "^~\\&", app, facility, "REFLOOP", "HOSP", at, "", f"{mtype}^{trigger}^{structure}",
                     cid, "P", "2.5.1"])


def _pid(mrn: str, patient: str) -> str:
    return f"PID|1||{mrn}^^^CLINIC^MR||{patient}||19800101|F"


def ref_msg(referral: str, *, trigger: str = "I12", at: str = "20260105090000-0500", mrn: str = "MRN100200",
            patient: str = "Testperson^Alma", provider_id: str = "1234", provider: str = "Heartwell^Hana",
            specialty: str = "CARD", priority: str = "R", cid: str | None = None, app: str = "EHR",
            facility: str = "CLINIC", aliases: tuple[str, ...] = ()) -> str:
    """REF^I12..I15 for an invented patient: RF1-6 is the referral ID, PRD RT the referred-to provider."""
    cid = cid or control_id("R")
    rf1 = {1: "P^Pending", 2: f"{priority}^Routine", 3: f"{specialty}^Specialty", 4: "CON^Consultation", 5: "N",
           6: f"{referral}^CLINIC", 7: at[:8], 8: "20261231", 10: "Reason"}
    if aliases:
        rf1[11] = "~".join(f"{a}^SPEC" for a in aliases)
    segs = [
        _head("REF", trigger, cid, at, app, facility, "REF_I12"),
        _fields("RF1", rf1),
        "PRD|RP|Goodfellow^Gale^^^^Dr|||||1111^NPI",
        f"PRD|RT|{provider}^^^^Dr|||||{provider_id}^NPI",
        _pid(mrn, patient),
    ]
    return "\r".join(segs) + "\r"


def rri_msg(referral: str, answer: str = "A", *, at: str = "20260106090000-0500", aliases: tuple[str, ...] = (),
            cid: str | None = None, app: str = "SPEC", facility: str = "HEART", mrn: str = "MRN100200") -> str:
    """RRI^I12 from the specialist: RF1-1 the answer, RF1-11 the specialist's own IDs for the referral."""
    cid = cid or control_id("A")
    rf1 = {1: f"{answer}^Answer", 2: "R^Routine", 3: "CARD^Specialty", 6: f"{referral}^CLINIC"}
    if aliases:
        rf1[11] = "~".join(f"{a}^SPEC" for a in aliases)
    segs = [
        _head("RRI", "I12", cid, at, app, facility, "RRI_I12"),
        "MSA|AA|X",
        _fields("RF1", rf1),
        _pid(mrn, "Testperson^Alma"),
    ]
    return "\r".join(segs) + "\r"


def siu_msg(appt: str, *, trigger: str = "S12", at: str = "20260107090000-0500",
            start: str = "20260112090000-0500", status: str = "Booked", placer: str = "", mrn: str = "MRN100200",
            patient: str = "Testperson^Alma", provider_id: str = "1234", provider: str = "Heartwell^Hana",
            cid: str | None = None, app: str = "SCHED", facility: str = "HEART") -> str:
    """SIU for an invented patient: SCH-2 appointment id, SCH-11.4 start, SCH-25 status, SCH-26 referral."""
    cid = cid or control_id("S")
    sch = {1: f"{appt}^SCHED", 2: f"{appt}^SCHED", 6: "CONSULT^Consult", 9: "30", 10: "MIN",
           11: f"^^30^{start}", 25: status}
    if placer:
        sch[26] = f"{placer}^CLINIC"
    segs = [
        _head("SIU", trigger, cid, at, app, facility, "SIU_S12"),
        _fields("SCH", sch),
        _pid(mrn, patient),
        "RGS|1",
        f"AIS|1||CONSULT^Consult|{start}",
        f"AIP|1||{provider_id}^{provider}|CARD",
    ]
    return "\r".join(segs) + "\r"


def mdm_msg(doc: str, *, trigger: str = "T02", at: str = "20260113100000-0500", status: str = "AU",
            placer: str = "", mrn: str = "MRN100200", provider_id: str = "1234", provider: str = "Heartwell^Hana",
            note: str = "Seen in clinic.\\.br\\Plan: review in 3 months.", parent: str = "",
            cid: str | None = None, app: str = "DOCS", facility: str = "HEART") -> str:
    """MDM for an invented patient: TXA-12 document id, TXA-14 referral (placer order), TXA-17 status."""
    cid = cid or control_id("M")
    txa = {1: "1", 2: "CN^Consult note", 3: "TX", 4: at, 5: f"{provider_id}^{provider}", 12: doc, 13: parent,
           17: status, 19: "AV"}
    if placer:
        txa[14] = f"{placer}^CLINIC"
    segs = [
        _head("MDM", trigger, cid, at, app, facility, "MDM_T02"),
        f"EVN|{trigger}|{at}",
        _pid(mrn, "Testperson^Alma"),
        "PV1|1|O",
        _fields("TXA", txa),
        f"OBX|1|TX|11488-4^Consult note^LN||{note}||||||F",
    ]
    return "\r".join(segs) + "\r"


def oru_msg(doc: str, *, status: str = "F", at: str = "20260113100000-0500", placer: str = "",
            mrn: str = "MRN100200", provider_id: str = "1234", pdf: bytes | None = None, cid: str | None = None,
            app: str = "DOCS", facility: str = "HEART") -> str:
    """ORU^R01 consult report: OBR-3 document id, OBR-25 status, an ED PDF in OBX-5.5 when *pdf* is given."""
    import base64

    cid = cid or control_id("O")
    obr = {1: "1", 2: f"{placer}^CLINIC" if placer else "", 3: f"{doc}^DOCS", 4: "11488-4^Consult note^LN", 7: at,
           22: at, 25: status, 32: f"{provider_id}&Heartwell&Hana"}
    obx = (f"OBX|1|ED|11488-4^Consult note^LN||^application^pdf^Base64^{base64.b64encode(pdf).decode()}||||||{status}"
           if pdf is not None else f"OBX|1|TX|11488-4^Consult note^LN||Report text.||||||{status}")
    segs = [_head("ORU", "R01", cid, at, app, facility, "ORU_R01"), _pid(mrn, "Testperson^Alma"),
            _fields("OBR", obr), obx]
    return "\r".join(segs) + "\r"


def omg_msg(placer: str, control: str = "NW", *, at: str = "20260105090000-0500", mrn: str = "MRN100200",
            cid: str | None = None, app: str = "EHR", facility: str = "CLINIC") -> str:
    """OMG^O19 in the 360X style: the referral is an order, ORC-2 its ID, ORC-1 NW/CA what happens to it."""
    cid = cid or control_id("G")
    segs = [
        _head("OMG", "O19", cid, at, app, facility, "OMG_O19"),
        _pid(mrn, "Testperson^Alma"),
        _fields("ORC", {1: control, 2: f"{placer}^CLINIC", 9: at, 12: "1111^Goodfellow^Gale"}),
        "TQ1|1||||||||R^Routine",
        f"OBR|1|{placer}^CLINIC||CARD^Cardiology referral",
        "PRD|RT|Heartwell^Hana^^^^Dr|||||1234^NPI",
    ]
    return "\r".join(segs) + "\r"

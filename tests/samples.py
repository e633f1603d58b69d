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

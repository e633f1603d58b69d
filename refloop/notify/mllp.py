"""Forward the consult note to the referrer as MDM^T02 over MLLP, and check the ACK.

The message is assembled from the stored document (``referral_documents``) and validated with hl7apy
against v2.5.1 before it leaves, so a malformed forward fails here rather than in the referrer's engine.
TXA-12 keeps the specialist's document number (so the referrer's later T04/T10 updates match it) and
TXA-14 carries the referral's placer ID, which is how the referrer's EHR files it against its order.
The patient's PID is copied from the original MDM (refloop stores no demographics); if that message was
purged, PID-3 falls back to the placer ID. ACK: AA/CA delivered; AE/AR/CE/CR or no ACK: retry.
"""

from __future__ import annotations

import base64
from datetime import datetime
from typing import Any

from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message
from sqlalchemy import Connection, select

from refloop.hl7.mllp import MllpClient, MllpError, msa
from refloop.notify.webhook import DeliveryError
from refloop.store.models import Message, ReferralDocument
from refloop.store.referrals import REFERRALS

#: MSH-18 character set (HL7 table 0211) of every forwarded message.
CHARSET = "UNICODE UTF-8"
_ESCAPES = (("\\", "\\E\\"), ("|", "\\F\\"), ("^", "\\S\\"), ("&", "\\T\\"), ("~", "\\R\\"))


def escape(text: str) -> str:
    for raw, esc in _ESCAPES:
        text = text.replace(raw, esc)
    return text


def _fields(seg: str, values: dict[int, str]) -> str:
    top = max(values)
    return "|".join([seg, *(values.get(i, "") for i in range(1, top + 1))])


def _ts(moment: datetime) -> str:
    return moment.strftime("%Y%m%d%H%M%S%z")


def _original_pid(conn: Connection, message_id: int | None) -> str:
    if message_id is None:
        return ""
    raw = conn.execute(select(Message.__table__.c.raw).where(Message.__table__.c.id == message_id)).scalar()
    if not raw:
        return ""
    text = raw.decode("utf-8", errors="replace").replace("\n", "\r")
    return next((s for s in text.split("\r") if s.startswith("PID|")), "")


def build_mdm(conn: Connection, row: dict[str, Any], now: datetime, *, application: str = "REFLOOP",
              facility: str = "REFLOOP") -> str:
    """The MDM^T02 for a loop_closed outbox row; DeliveryError if the note is gone (retracted or purged)."""
    p = row["payload"]
    docs = ReferralDocument.__table__
    doc = conn.execute(select(docs).where(docs.c.id == p.get("document_row", -1))).first()
    if doc is None or doc.content is None:
        raise DeliveryError("note unavailable")
    ref = conn.execute(select(REFERRALS).where(REFERRALS.c.id == row["referral_id"])).one()
    placer = f"{escape(ref.placer_id)}^{escape(ref.authority)}" if ref.authority else escape(ref.placer_id)
    pid = _original_pid(conn, doc.message_id) or f"PID|1||{placer}^^^RI||UNKNOWN"
    control = f"RL{row['id']}"[:20]
    segs = [
        # MSH-18: the text below is encoded as UTF-8 on the wire (send() does), so say so.
        "|".join(["MSH", "^~\\&", application, facility, "", "", _ts(now), "", "MDM^T02^MDM_T02", control, "P",
                  "2.5.1", "", "", "", "", "", CHARSET]),
        f"EVN|T02|{_ts(now)}",
        pid,
        "PV1|1|O",
        _fields("TXA", {1: "1", 2: escape(doc.doc_type or "CN"), 3: "TX", 4: _ts(now), 12: escape(doc.document_id),
                        14: placer, 17: "AU", 19: "AV"}),
    ]
    if doc.content_type == "text/plain":
        lines = doc.content.decode("utf-8", errors="replace").split("\n")
        segs += [f"OBX|{i}|TX|11488-4^Consult note^LN||{escape(line)}||||||F" for i, line in enumerate(lines, 1)]
    else:
        data = base64.b64encode(doc.content).decode()
        major, _, minor = (doc.content_type or "application/octet-stream").partition("/")
        ed = f"^{escape(major)}^{escape(minor or 'octet-stream')}^Base64^{data}"
        segs.append(f"OBX|1|ED|11488-4^Consult note^LN||{ed}||||||F")
    er7 = "\r".join(segs)
    msg = parse_message(er7, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
    msg.validate()  # raises on a structural error: better here than in the referrer's engine
    return er7 + "\r"


def send(host: str, port: int, er7: str, timeout: float) -> None:
    """Blocking: one connection per message, wait for the ACK frame, accept AA/CA only."""
    try:
        with MllpClient(host, port, timeout=timeout) as client:
            ack = client.send(er7.encode("utf-8"))
    except TimeoutError:
        raise DeliveryError("mllp ack timeout") from None
    except MllpError:
        raise DeliveryError("mllp closed without ack") from None
    except OSError as exc:
        raise DeliveryError(f"mllp {type(exc).__name__}") from None
    code = msa(ack)[0][:2]
    if code not in ("AA", "CA"):
        raise DeliveryError(f"ack {code or 'missing'}")

"""The structural validators (ACK path) and the handlers (apply path) enforce one rule: for every type,
a message the validator refuses is refused by its handler with the same ERR location, and a message the
validator passes is not refused by the handler for that field."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from refloop.clock import SystemClock
from refloop.config import DatabaseSettings, SenderProfile, Settings
from refloop.message import Message
from refloop.routes.dispatch import apply_row
from refloop.routes.router import Router
from refloop.routes.table import DEFAULT_ROUTES
from refloop.store import journal, migrate
from refloop.store.engine import make_engine
from tests.samples import mdm_msg, omg_msg, oru_msg, ref_msg, rri_msg, siu_msg

ORDERS = SenderProfile(order_mode="referral")

#: (complete message, the same without its key, expected ERR location, profile)
CASES = {
    "REF": (ref_msg("P1"), ref_msg("P1").replace("|P1^", "|^", 1), "RF1^1^6^1", SenderProfile()),
    "RRI": (rri_msg("P1"), rri_msg("P1").replace("|P1^", "|^", 1), "RF1^1^6^1", SenderProfile()),
    "SIU": (siu_msg("A1"), siu_msg("A1").replace("SCH|A1", "SCH|").replace("|A1^", "|^"), "SCH^1^2^1",
            SenderProfile()),
    "MDM": (mdm_msg("D1"), mdm_msg("D1").replace("|D1|", "||"), "TXA^1^12^1", SenderProfile()),
    "ORU": (oru_msg("D1"), oru_msg("D1").replace("|D1^DOCS|", "||"), "OBR^1^3^1", SenderProfile()),
    "OMG": (omg_msg("P1"), omg_msg("P1").replace("|P1^CLINIC|", "||"), "ORC^1^2^1", ORDERS),
}


def _route(msg: Message):  # type: ignore[no-untyped-def]
    route = Router(DEFAULT_ROUTES).resolve(msg.message_type, msg.trigger_event)
    assert route is not None and route.validate is not None
    return route


@pytest.mark.parametrize("kind", sorted(CASES))
def test_validator_finds_the_missing_key(kind: str) -> None:
    good, bad, location, profile = CASES[kind]
    route = _route(Message.parse(good))
    assert route.validate(profile, Message.parse(good)) is None
    err = route.validate(profile, Message.parse(bad))
    assert err is not None and (err.code, err.location) == (101, location)


@pytest.mark.parametrize("kind", sorted(CASES))
def test_a_disabled_family_is_not_validated(kind: str) -> None:
    """The handler ignores a family the sender is not trusted for, so the validator must not refuse it."""
    _good, bad, _location, profile = CASES[kind]
    off = replace(profile, message_families=())
    assert _route(Message.parse(bad)).validate(off, Message.parse(bad)) is None


def test_orders_are_validated_only_in_referral_mode() -> None:
    _good, bad, _location, _profile = CASES["OMG"]
    assert _route(Message.parse(bad)).validate(SenderProfile(), Message.parse(bad)) is None


@pytest.mark.parametrize("kind", sorted(CASES))
def test_handler_agrees_with_its_validator(kind: str, tmp_path: Path) -> None:
    """The same message through the one dispatch: content error at the validator's location, or none."""
    good, bad, location, profile = CASES[kind]
    settings = Settings(database=DatabaseSettings(url=f"sqlite:///{tmp_path / 'v.db'}"),
                        profiles=(replace(profile, name="default"),))
    engine = make_engine(settings.database)
    migrate.upgrade(engine)
    try:
        with engine.connect() as conn:
            for text, want in ((good, None), (bad, location)):
                with conn.begin() as tx:
                    now = SystemClock().now()
                    mid = journal.insert_message(conn, {"received_at": now, "raw": text.encode(), "outcome": "queued"})
                    row = SimpleNamespace(id=mid, raw=text.encode(), received_at=now, sending_application="",
                                          sending_facility="")
                    done = apply_row(conn, row, settings=settings, router=Router(DEFAULT_ROUTES),
                                     clock=SystemClock(), replay=False, savepoint=True)
                    tx.rollback()
                got = done.error.location if done.outcome == "error" and done.error else None
                assert got == want, (kind, done.outcome, done.detail)
    finally:
        engine.dispose()

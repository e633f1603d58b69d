"""Properties of reading a patient's identifiers (refloop/patient.py): pure, no database."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from refloop.message import Message
from refloop.patient import hash_id, parse_id, patient_ids, shared_ids

TEXT = st.text(alphabet="ABCDEFGHJKLMNPQRSTUVWXYZ0123456789", min_size=1, max_size=10)
CX = st.tuples(TEXT, TEXT, st.sampled_from(["MR", "PI", "PT", "PE", "", "SS", "DL", "AN"]))


def pid_message(reps: list[tuple[str, str, str]], *, version: str = "2.5.1", pid2: str = "") -> Message:
    pid3 = "~".join(f"{i}^^^{a}^{t}" for i, a, t in reps)
    return Message.parse(f"MSH|^~\\&|A|F|R|H|20260101||SIU^S12|C1|P|{version}\rPID|1|{pid2}|{pid3}||X^Y\r")


@given(st.lists(CX, max_size=5), CX, st.data())
def test_a_shared_identifier_is_found_in_any_repetition(others: list[tuple[str, str, str]],
                                                        shared: tuple[str, str, str], data: st.DataObject) -> None:
    ident, authority, _ = shared
    shared = (ident, authority, data.draw(st.sampled_from(["MR", "PI", "PT", "PE", ""])))
    pos = data.draw(st.integers(0, len(others)))
    reps = [*others[:pos], shared, *others[pos:]]
    keys = [i.key for i in patient_ids(pid_message(reps))]
    assert hash_id(ident, authority) in keys
    assert len(keys) == len(set(keys))  # no repeats


@given(TEXT, TEXT)
def test_types_outside_the_list_are_not_identifiers(ident: str, authority: str) -> None:
    assert patient_ids(pid_message([(ident, authority, "SS")])) == []
    assert [i.key for i in patient_ids(pid_message([(ident, authority, "SS")]), ("SS",))] == [hash_id(ident, authority)]


@given(TEXT, TEXT)
def test_pid2_counts_only_in_old_versions(ident: str, authority: str) -> None:
    for version, found in (("2.3", True), ("2.3.1", True), ("2.4", False), ("2.5.1", False)):
        ids = patient_ids(pid_message([("OWN1", "SPEC", "MR")], version=version, pid2=f"{ident}^^^{authority}"))
        assert (hash_id(ident, authority) in [i.key for i in ids]) is found


def test_authority_is_the_namespace_else_the_universal_id_and_case_blind() -> None:
    msg = Message.parse("MSH|^~\\&|A|F|R|H|20260101||SIU^S12|C1|P|2.5.1\r"
                        "PID|1||T71^^^&1.3.6.1.4.1.21367.2016.10.1.21.5&ISO^MRN~A1^^^clinic&1.2.3&ISO^MR||X\r")
    ids = patient_ids(msg)
    assert [(i.authority, i.id_type) for i in ids] == [("1.3.6.1.4.1.21367.2016.10.1.21.5", "MRN"), ("CLINIC", "MR")]
    assert ids[1].key == hash_id("A1", "CLINIC") == hash_id("A1", "clinic")
    assert parse_id(" A1^clinic ") == ("A1", "CLINIC")
    assert [i.authority for i in shared_ids(ids, ("Clinic",))] == ["CLINIC"]
    assert shared_ids(ids, ()) == ids

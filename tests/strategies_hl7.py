"""Hypothesis strategies for synthetic HL7 v2 traffic (invented patients only).

Shared so that every suite fuzzes with the same picture of what senders emit: arbitrary
delimiters, escaped leaf values, and junk that merely looks like a header.
"""

from __future__ import annotations

from hypothesis import strategies as st

from refloop.message import Delimiters, escape

# Printable ASCII punctuation (what HL7 allows as delimiters in practice), minus "." which the
# header's version value "2.5.1" needs as plain text.
_PUNCT = "!\"#$%&'()*+,-/:;<=>?@[\\]^_`{|}~"


@st.composite
def delimiter_sets(draw: st.DrawFn, truncation: bool | None = None) -> Delimiters:
    """Five (or six, v2.7) distinct punctuation delimiters."""
    with_trunc = draw(st.booleans()) if truncation is None else truncation
    n = 6 if with_trunc else 5
    chars = draw(st.permutations(_PUNCT).map(lambda p: p[:n]))
    return Delimiters(chars[0], chars[1], chars[2], chars[3], chars[4], "".join(chars[5:]))


#: Leaf values: any text without segment terminators; the builder escapes delimiters.
leaf_values = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\r\n\x0b\x1c"), max_size=20)

#: Plain values that need no escaping under any punctuation delimiters.
plain_values = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 ", max_size=12)


def build_message(d: Delimiters, header: list[str], segments: list[tuple[str, list[str]]]) -> str:
    """MSH with *header* as MSH-3.. followed by *segments* (id, fields from field 1), CR-ended."""
    msh = d.field.join(["MSH" + d.field + d.encoding_characters, *header])
    body = [d.field.join([seg_id, *fields]) for seg_id, fields in segments]
    return "\r".join([msh, *body]) + "\r"


@st.composite
def messages_with_values(draw: st.DrawFn) -> tuple[str, Delimiters, list[list[str]]]:
    """A message under random delimiters whose ZXX segments hold known, escaped leaf values.

    Returns (text, delimiters, rows): rows[i][j] is the value of ``ZXX[i+1]-1.(j+1)``.
    """
    d = draw(delimiter_sets())
    control = draw(plain_values)
    header = ["SENDAPP", "SENDFAC", "RL", "CLINIC", "20250101120000", "", "ZZZ^Z01", control, "P", "2.5.1"]
    header = [h.replace("^", d.component) for h in header]
    rows = draw(st.lists(st.lists(leaf_values, min_size=1, max_size=4), min_size=1, max_size=4))
    segments = [("ZXX", [d.component.join(escape(v, d) for v in row)]) for row in rows]
    return build_message(d, header, segments), d, rows


#: Text that starts like a header but is otherwise arbitrary: reaches the deep parsing paths.
header_like_text = st.builds(
    lambda prefix, rest: prefix + rest,
    st.sampled_from(["MSH", "MSH|^~\\&", "MSH|^~\\&|", "FHS|^~\\&|", "BHS", "MSH#$~\\&#"]),
    st.text(max_size=200),
)

#: Bytes that look like a frame head: MSH followed by anything.
header_like_bytes = st.builds(
    lambda prefix, rest: prefix + rest,
    st.sampled_from([b"MSH|^~\\&|", b"\x0bMSH|", b"FHS|^~\\&|\rMSH|", b"MSH", b""]),
    st.binary(max_size=200),
)

#: Paths, valid and not, for get()/get_raw().
paths = st.one_of(
    st.text(max_size=20),
    st.from_regex(r"\A[A-Z][A-Z0-9]{2}(\[[0-9]{1,3}\])?-[0-9]{1,3}(\([0-9]{1,2}\))?(\.[0-9]{1,2}){0,2}\Z"),
)

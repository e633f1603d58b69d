"""Reusable hypothesis strategies and profiles for refloop tests.

Profiles are registered here rather than in conftest.py so that every test
module that uses these strategies gets the same example budget; CI spends more
examples than a developer's inner loop.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from hypothesis import settings
from hypothesis import strategies as st

settings.register_profile("ci", max_examples=300, deadline=None)
settings.register_profile("dev", max_examples=100, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

VT = 0x0B
FS = 0x1C

# Bytes that matter to MLLP or that real-world peers put on the wire.  Plain
# st.binary() rarely produces them, so they are mixed in explicitly.
_INTERESTING = [b"\r", b"\n", b"\x00", b"\r\n", b"\xff", b"\x80", b"MSH|^~\\&|", b"|", b"^"]


def _strip(data: bytes, forbidden: bytes) -> bytes:
    """Drop forbidden bytes; mapping shrinks far better than filtering."""
    return data.translate(None, forbidden)


def payloads(max_size: int = 200) -> st.SearchStrategy[bytes]:
    """HL7-ish payloads: anything but VT and FS, biased towards CR, LF, NUL and high bytes."""
    raw = st.one_of(
        st.binary(max_size=max_size),
        st.lists(st.sampled_from(_INTERESTING) | st.binary(max_size=8), max_size=max_size // 4).map(b"".join),
    )
    return raw.map(lambda b: _strip(b, b"\x0b\x1c"))


def junk(max_size: int = 40) -> st.SearchStrategy[bytes]:
    """Inter-frame garbage: anything but VT (FS, CR, LF, NUL all allowed), often empty."""
    raw = st.one_of(
        st.just(b""),
        st.sampled_from([b"\r", b"\n", b"\r\n", b"\x00" * 4, b"\x1c", b"\x16\x03\x01\x02\x00"]),
        st.binary(max_size=max_size),
    )
    return raw.map(lambda b: _strip(b, b"\x0b"))


def mllp_wire(
    payload_strategy: st.SearchStrategy[bytes] | None = None, max_frames: int = 8
) -> st.SearchStrategy[tuple[bytes, list[bytes], int]]:
    """A well-formed MLLP stream with junk around frames: (stream, payloads, total junk bytes)."""
    p = payload_strategy if payload_strategy is not None else payloads()

    @st.composite
    def build(draw: st.DrawFn) -> tuple[bytes, list[bytes], int]:
        frames = draw(st.lists(p, max_size=max_frames))
        gaps = draw(st.lists(junk(), min_size=len(frames) + 1, max_size=len(frames) + 1))
        parts: list[bytes] = []
        for gap, payload in zip(gaps, frames, strict=False):
            parts += [gap, b"\x0b", payload, b"\x1c\r"]
        parts.append(gaps[-1])
        return b"".join(parts), frames, sum(len(g) for g in gaps)

    return build()


def split_at(data: bytes, cuts: Sequence[int]) -> list[bytes]:
    """Cut data at the given offsets (duplicates give empty chunks, which callers must accept)."""
    out: list[bytes] = []
    prev = 0
    for cut in sorted(cuts):
        cut = max(0, min(cut, len(data)))
        out.append(data[prev:cut])
        prev = cut
    out.append(data[prev:])
    return out


def chunkings(data: bytes, max_cuts: int = 30) -> st.SearchStrategy[list[bytes]]:
    """Arbitrary re-chunkings of data, as a socket could deliver it: random cut points."""
    if not data:
        return st.lists(st.just(b""), min_size=1, max_size=3)
    return st.one_of(
        st.lists(st.integers(0, len(data)), max_size=max_cuts).map(lambda cuts: split_at(data, cuts)),
        # One byte at a time is the nastiest case for split delimiters.
        st.just([data[i : i + 1] for i in range(len(data))]),
    )


def mllp_ish_bytes(max_size: int = 300) -> st.SearchStrategy[bytes]:
    """Arbitrary bytes dense in VT/FS/CR/LF so that every framing state is reached."""
    tokens = st.sampled_from([b"\x0b", b"\x1c", b"\r", b"\n", b"\x1c\r", b"\x1c\n", b"\x0b\x1c\r", b"A"])
    return st.one_of(
        st.binary(max_size=max_size),
        st.lists(tokens | st.binary(max_size=6), max_size=max_size // 3).map(b"".join),
    )

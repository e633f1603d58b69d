"""Tests for the sans-I/O MLLP framer."""

from __future__ import annotations

from collections.abc import Iterable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from refloop.daemon.framing import CR, FS, VT, Frame, Framer, FramingEvent, Junk, Oversize, Truncated
from tests.strategies import chunkings, mllp_ish_bytes, mllp_wire, split_at


def run(chunks: Iterable[bytes], framer: Framer | None = None, *, eof: bool = True) -> list[FramingEvent]:
    """Feed chunks in order (then eof) and collect every event."""
    f = framer if framer is not None else Framer()
    events: list[FramingEvent] = []
    for chunk in chunks:
        events += f.feed(chunk)
    if eof:
        events += f.eof()
    return events


def frame(payload: bytes) -> bytes:
    """Wrap a payload in a well-formed MLLP block."""
    return VT + payload + FS + CR


def reference(stream: bytes, max_frame_bytes: int) -> list[FramingEvent]:
    """Byte-at-a-time model of the framing rules: slow but obviously right, used as an oracle."""
    events: list[FramingEvent] = []
    junk = 0
    in_frame = False
    buf = bytearray()
    i = 0
    n = len(stream)
    while i < n:
        b = stream[i]
        if not in_frame:
            if b == 0x0B:
                if junk:
                    events.append(Junk(junk))
                    junk = 0
                in_frame = True
                buf = bytearray()
            else:
                junk += 1
            i += 1
            continue
        if b == 0x0B:
            events.append(Truncated(bytes(buf), "vt_in_frame"))
            buf = bytearray()
            i += 1
            continue
        if b == 0x1C and i + 1 < n and stream[i + 1] in (0x0D, 0x0A):
            events.append(Frame(bytes(buf), lf_terminated=stream[i + 1] == 0x0A))
            in_frame = False
            i += 2
            continue
        if b == 0x1C and i + 1 == n:
            # Undecided FS at end of stream: journaled with the frame, never size-checked.
            buf.append(b)
            break
        buf.append(b)
        if len(buf) > max_frame_bytes:
            events.append(Oversize(bytes(buf), len(buf)))
            return events
        i += 1
    if in_frame:
        events.append(Truncated(bytes(buf), "eof"))
    if junk:
        events.append(Junk(junk))
    return events


# --- properties ---------------------------------------------------------------------------------


@given(st.data(), mllp_wire())
def test_any_chunking_yields_original_payloads_and_junk(
    data: st.DataObject, wire: tuple[bytes, list[bytes], int]
) -> None:
    """However the stream is chunked, frames come out intact and in order, and all junk is counted."""
    stream, payloads, junk_total = wire
    chunks = data.draw(chunkings(stream))
    events = run(chunks)
    assert [e.payload for e in events if isinstance(e, Frame)] == payloads
    assert sum(e.nbytes for e in events if isinstance(e, Junk)) == junk_total
    assert not any(isinstance(e, Truncated | Oversize) for e in events)
    assert not any(e.lf_terminated for e in events if isinstance(e, Frame))


@given(st.data(), mllp_ish_bytes(), st.integers(0, 64))
def test_arbitrary_bytes_never_raise_and_buffer_is_bounded(
    data: st.DataObject, stream: bytes, max_frame_bytes: int
) -> None:
    """Garbage in any chunking never raises and never buffers much more than the frame limit."""
    f = Framer(max_frame_bytes=max_frame_bytes, head_bytes=16)
    chunks = data.draw(chunkings(stream))
    oversize_seen = 0
    for chunk in chunks:
        events = f.feed(chunk)
        assert f.buffered <= max_frame_bytes + 1
        oversize_seen += sum(isinstance(e, Oversize) for e in events)
        for e in events:
            if isinstance(e, Frame | Truncated):
                assert VT not in e.payload
                assert len(e.payload) <= max_frame_bytes
    events = f.eof()
    assert f.buffered <= max_frame_bytes + 1
    assert oversize_seen <= 1
    assert f.failed == (oversize_seen == 1)


@given(st.data(), mllp_ish_bytes(), st.integers(0, 64), st.integers(0, 80))
def test_matches_reference_model_under_any_chunking(
    data: st.DataObject, stream: bytes, max_frame_bytes: int, head_bytes: int
) -> None:
    """Every event agrees with a byte-at-a-time model, whatever the chunking and limits."""
    expected = reference(stream, max_frame_bytes)
    chunks = data.draw(chunkings(stream))
    got = run(chunks, Framer(max_frame_bytes=max_frame_bytes, head_bytes=head_bytes))
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        if isinstance(e, Oversize):
            # How much had arrived when the limit tripped depends on the chunking;
            # the head must still be the frame's first bytes.
            assert isinstance(g, Oversize)
            assert g.received > max_frame_bytes
            assert len(g.head) == min(g.received, head_bytes)
            assert g.head[: min(len(e.head), head_bytes)] == e.head[:head_bytes]
        else:
            assert g == e


@given(st.data(), mllp_ish_bytes())
def test_events_do_not_depend_on_chunking(data: st.DataObject, stream: bytes) -> None:
    """Below the size limit the event list is identical for one big read and any split."""
    whole = run([stream])
    assert run(data.draw(chunkings(stream))) == whole


# --- unit tests ---------------------------------------------------------------------------------


def test_single_frame() -> None:
    """A well-formed block yields its payload without VT or FS CR."""
    assert run([frame(b"MSH|a\rPID|b\r")]) == [Frame(b"MSH|a\rPID|b\r")]


def test_empty_payload_is_a_frame() -> None:
    """VT FS CR is a valid (empty) frame, left to the parser to reject."""
    assert run([VT + FS + CR]) == [Frame(b"")]


def test_fs_and_cr_in_separate_feeds() -> None:
    """An FS at the end of one read waits for the next read to decide whether the frame ended."""
    f = Framer()
    assert f.feed(VT + b"MSH|1\r" + FS) == []
    assert f.in_frame
    assert f.feed(CR) == [Frame(b"MSH|1\r")]
    assert not f.in_frame
    assert f.buffered == 0


def test_frame_split_across_many_reads() -> None:
    """A frame cut into arbitrary pieces, including inside the payload, is reassembled."""
    data = frame(b"MSH|^~\\&|A\rPID|1\r")
    assert run(split_at(data, [1, 3, 7, len(data) - 2, len(data) - 1])) == [Frame(b"MSH|^~\\&|A\rPID|1\r")]


def test_coalesced_frames_in_one_read() -> None:
    """Several frames in one read are all emitted, in order."""
    data = frame(b"one") + frame(b"two") + frame(b"three")
    assert run([data]) == [Frame(b"one"), Frame(b"two"), Frame(b"three")]


def test_bare_cr_in_payload_is_not_frame_end() -> None:
    """Segment terminators (CR) inside the payload do not end the frame."""
    f = Framer()
    assert f.feed(VT + b"MSH|1\r\rPID\r") == []
    assert f.in_frame
    assert f.feed(FS + CR) == [Frame(b"MSH|1\r\rPID\r")]


def test_junk_before_vt_is_one_event() -> None:
    """Bytes before the first VT are reported once, when the frame starts."""
    assert run([b"GET / HTTP/1.0\r\n" + frame(b"x")]) == [Junk(16), Frame(b"x")]


def test_junk_run_split_across_reads_is_one_event() -> None:
    """A junk run spread over several reads is still one Junk with the total count."""
    f = Framer()
    assert f.feed(b"\x16\x03\x01") == []
    assert f.feed(b"\x00\x00") == []
    assert f.feed(b"\r" + frame(b"x")) == [Junk(6), Frame(b"x")]


def test_crlf_between_frames_is_junk() -> None:
    """Stray CR LF after FS CR is junk before the next frame, not part of it."""
    data = frame(b"a") + b"\r\n" + frame(b"b") + b"\n"
    assert run([data]) == [Frame(b"a"), Junk(2), Frame(b"b"), Junk(1)]


def test_nuls_between_frames_are_junk() -> None:
    """NUL padding between frames is skipped and counted."""
    data = frame(b"a") + b"\x00" * 10 + frame(b"b")
    assert run([data]) == [Frame(b"a"), Junk(10), Frame(b"b")]


def test_vt_inside_frame_truncates_and_restarts() -> None:
    """A VT in an unfinished frame abandons it as Truncated and starts a fresh frame that completes."""
    data = VT + b"MSH|half" + frame(b"MSH|whole")
    assert run([data]) == [Truncated(b"MSH|half", "vt_in_frame"), Frame(b"MSH|whole")]


def test_vt_inside_frame_in_later_read() -> None:
    """The VT-in-frame restart also works when the VT arrives in a separate read."""
    f = Framer()
    assert f.feed(VT + b"part") == []
    assert f.feed(VT) == [Truncated(b"part", "vt_in_frame")]
    assert f.in_frame
    assert f.feed(b"next" + FS + CR) == [Frame(b"next")]


def test_fs_lf_ends_frame_with_warning_flag() -> None:
    """FS LF ends a frame, flagged lf_terminated so it can be counted as a warning."""
    assert run([frame(b"a")[:-1] + b"\n" + frame(b"b")]) == [
        Frame(b"a", lf_terminated=True),
        Frame(b"b"),
    ]


def test_fs_lf_split_across_reads() -> None:
    """FS at the end of a read followed by LF in the next still ends the frame."""
    assert run([VT + b"a" + FS, b"\n"]) == [Frame(b"a", lf_terminated=True)]


def test_fs_followed_by_other_byte_is_data() -> None:
    """FS not followed by CR or LF is payload, both bytes kept."""
    assert run([VT + b"a" + FS + b"b" + FS + CR]) == [Frame(b"a\x1cb")]


def test_fs_then_other_byte_split_across_reads_is_data() -> None:
    """A pending FS resolved as data by the next read stays in the payload."""
    assert run([VT + b"a" + FS, b"b" + FS, FS + CR]) == [Frame(b"a\x1cb\x1c")]


def test_fs_followed_by_vt_is_data_then_truncation() -> None:
    """FS VT: the FS is payload of the abandoned frame and the VT restarts framing."""
    expected = [Truncated(b"a\x1c", "vt_in_frame"), Frame(b"b")]
    assert run([VT + b"a" + FS + frame(b"b")]) == expected
    assert run([VT + b"a" + FS, frame(b"b")]) == expected


def test_oversize_exact_limit_is_accepted() -> None:
    """A payload of exactly max_frame_bytes is a normal frame, in one read or byte by byte."""
    payload = b"M" * 100
    assert run([frame(payload)], Framer(max_frame_bytes=100)) == [Frame(payload)]
    data = frame(payload)
    assert run([data[i : i + 1] for i in range(len(data))], Framer(max_frame_bytes=100)) == [Frame(payload)]


def test_oversize_one_over_limit_is_rejected() -> None:
    """max_frame_bytes + 1 trips Oversize once with the head, then the framer is failed."""
    payload = b"MSH|^~\\&|" + b"x" * 92
    f = Framer(max_frame_bytes=100, head_bytes=9)
    events = f.feed(frame(payload))
    assert events == [Oversize(b"MSH|^~\\&|", 101)]
    assert f.failed
    assert not f.in_frame
    assert f.buffered == 0
    assert f.feed(frame(b"ok")) == []
    assert f.eof() == []


def test_oversize_when_growing_across_reads() -> None:
    """Oversize trips on the read that crosses the limit, keeping frames completed before it."""
    f = Framer(max_frame_bytes=10, head_bytes=4)
    assert f.feed(frame(b"ok") + VT + b"abcdef") == [Frame(b"ok")]
    assert f.feed(b"ghij") == []
    assert f.buffered == 10
    assert f.feed(b"k" + FS + CR) == [Oversize(b"abcd", 11)]
    assert f.failed


def test_oversize_head_shorter_than_head_bytes() -> None:
    """With a large head_bytes the head is everything received, no more."""
    f = Framer(max_frame_bytes=5, head_bytes=1000)
    assert f.feed(VT + b"abc") == []
    assert f.feed(b"defgh") == [Oversize(b"abcdefgh", 8)]


def test_oversize_via_fs_data_byte() -> None:
    """An FS that turns out to be data counts towards the limit."""
    f = Framer(max_frame_bytes=3)
    assert f.feed(VT + b"abc" + FS) == []
    assert f.feed(b"x") == [Oversize(b"abc\x1c", 4)]


def test_eof_mid_frame_is_truncated() -> None:
    """Closing inside a frame yields Truncated('eof') with what was received."""
    f = Framer()
    assert f.feed(VT + b"MSH|1\rPID") == []
    assert f.eof() == [Truncated(b"MSH|1\rPID", "eof")]
    assert not f.in_frame
    assert f.buffered == 0


def test_eof_after_pending_fs_keeps_fs() -> None:
    """An undecided FS at close is journaled as part of the broken frame."""
    assert run([VT + b"a" + FS]) == [Truncated(b"a\x1c", "eof")]


def test_eof_with_only_junk() -> None:
    """A connection that only sent junk reports it as one Junk at close."""
    f = Framer()
    assert f.feed(b"\x16\x03\x01\x00") == []
    assert f.feed(b"\x00\x00") == []
    assert f.eof() == [Junk(6)]


def test_eof_on_clean_stream_is_silent() -> None:
    """Closing between frames with nothing pending yields no events."""
    f = Framer()
    assert f.feed(frame(b"a")) == [Frame(b"a")]
    assert f.eof() == []


def test_in_frame_toggles() -> None:
    """in_frame is true from VT until the frame ends, and after a VT restart."""
    f = Framer()
    assert not f.in_frame
    f.feed(b"\r\n")
    assert not f.in_frame
    f.feed(VT)
    assert f.in_frame
    f.feed(b"abc" + FS)
    assert f.in_frame
    f.feed(CR)
    assert not f.in_frame
    f.feed(VT + b"x" + VT)
    assert f.in_frame
    f.feed(FS + CR)
    assert not f.in_frame


def test_buffered_tracks_unfinished_frame() -> None:
    """buffered counts the held payload (plus a pending FS), not junk or finished frames."""
    f = Framer()
    f.feed(b"junkjunk")
    assert f.buffered == 0
    f.feed(VT + b"abc")
    assert f.buffered == 3
    f.feed(FS)
    assert f.buffered == 4
    f.feed(CR)
    assert f.buffered == 0


def test_empty_feed_is_harmless() -> None:
    """feed(b'') changes nothing and returns nothing, even with an FS pending."""
    f = Framer()
    assert f.feed(b"") == []
    f.feed(VT + b"a" + FS)
    assert f.feed(b"") == []
    assert f.feed(CR) == [Frame(b"a")]


def test_bytearray_and_memoryview_input() -> None:
    """Bytes-like input from recv_into buffers is accepted and payloads come out as bytes."""
    f = Framer()
    (ev,) = f.feed(bytearray(frame(b"a")))
    assert ev == Frame(b"a")
    assert type(ev.payload) is bytes
    assert f.feed(memoryview(frame(b"b"))) == [Frame(b"b")]


def test_invalid_limits_rejected() -> None:
    """Negative limits are configuration bugs and fail at construction."""
    with pytest.raises(ValueError):
        Framer(max_frame_bytes=-1)
    with pytest.raises(ValueError):
        Framer(head_bytes=-1)


@pytest.mark.timeout(120)
def test_one_mib_frame_one_byte_at_a_time() -> None:
    """A 1 MiB frame fed byte by byte completes (the framer must be linear, not quadratic)."""
    payload = (b"OBX|1|TX|||" + b"y" * 53 + b"\r") * (1024 * 1024 // 65)
    data = frame(payload)
    f = Framer()
    events: list[FramingEvent] = []
    for i in range(len(data)):
        events += f.feed(data[i : i + 1])
    assert events == [Frame(payload)]


@pytest.mark.timeout(60)
def test_sixteen_mib_frame_in_64k_chunks() -> None:
    """A frame of exactly the default 16 MiB limit in 64 KiB reads is accepted."""
    payload = b"z" * (16 * 1024 * 1024)
    data = frame(payload)
    f = Framer()
    events: list[FramingEvent] = []
    step = 64 * 1024
    for i in range(0, len(data), step):
        events += f.feed(data[i : i + step])
    assert len(events) == 1
    assert isinstance(events[0], Frame)
    assert events[0].payload == payload

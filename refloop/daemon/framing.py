"""Sans-I/O MLLP framer.

The framer knows nothing about sockets or asyncio so that the exact byte-level
behaviour (split reads, coalesced frames, junk, broken senders) can be tested
exhaustively with property tests, and so that the server only has to shovel
bytes in and act on the events that come out.

MLLP block: ``<VT> payload <FS><CR>``.  HL7 segments inside the payload end in
CR, so a bare CR never ends a frame; only the pair FS CR does (FS LF is
tolerated because some interface engines on Unix hosts send it).

Performance notes: this sits on the hot path (~10k frames/s).  Each fed chunk
is scanned with ``bytes.find`` only once, never byte by byte in Python, and
bytes already buffered are never rescanned, so feeding a frame in many small
pieces stays linear in its size.
"""

from __future__ import annotations

from dataclasses import dataclass

from refloop.hl7.mllp import CR, FS, VT  # the block characters, defined once for both directions

__all__ = [
    "CR",
    "FS",
    "VT",
    "Frame",
    "Framer",
    "FramingEvent",
    "Junk",
    "Oversize",
    "Truncated",
]


# Integer forms: indexing bytes yields ints, and comparing ints avoids
# building one-byte slices on the hot path.
_VT = 0x0B
_FS = 0x1C
_CR = 0x0D
_LF = 0x0A

# Sentinel for the per-feed find() cache: "not searched yet".  -1 already means
# "searched, none left in this chunk", so it cannot double as the sentinel.
_UNKNOWN = -2


@dataclass(frozen=True, slots=True)
class Frame:
    """A complete frame; ``payload`` excludes the VT and the FS CR trailer."""

    payload: bytes
    # Kept distinct from a clean frame so the server can count the sender as
    # misbehaving without rejecting messages it can perfectly well process.
    lf_terminated: bool = False


@dataclass(frozen=True, slots=True)
class Junk:
    """Bytes skipped outside any frame, reported so odd peers are visible in metrics and logs."""

    nbytes: int


@dataclass(frozen=True, slots=True)
class Truncated:
    """An unfinished frame that was abandoned; kept so it can be journaled rather than silently lost."""

    payload: bytes
    reason: str  # "vt_in_frame" or "eof"


@dataclass(frozen=True, slots=True)
class Oversize:
    """The current frame grew past the limit; ``head`` lets the caller recover MSH-10 and answer AR."""

    head: bytes
    received: int


FramingEvent = Frame | Junk | Truncated | Oversize


class Framer:
    """Incremental MLLP de-framer: feed it bytes as they arrive, act on the events it returns."""

    __slots__ = ("_buf", "_failed", "_fs_pending", "_head_bytes", "_in_frame", "_junk", "_max")

    def __init__(self, max_frame_bytes: int = 16 * 1024 * 1024, head_bytes: int = 65536) -> None:
        # Rejecting nonsense here keeps feed() free of defensive checks; a bad
        # limit is a configuration bug that should fail at start-up, loudly.
        if max_frame_bytes < 0:
            raise ValueError(f"max_frame_bytes must be >= 0, got {max_frame_bytes}")
        if head_bytes < 0:
            raise ValueError(f"head_bytes must be >= 0, got {head_bytes}")
        self._max = max_frame_bytes
        self._head_bytes = head_bytes
        self._buf = bytearray()
        self._in_frame = False
        # An FS that ended the last chunk: whether it is a terminator or data
        # depends on the next byte, which has not arrived yet.  It is held as
        # a flag rather than in _buf so it never counts against the size limit
        # before it is known to be payload.
        self._fs_pending = False
        # Junk is counted, not buffered: only the total matters, and a port
        # scanner must not be able to make us hold memory.
        self._junk = 0
        self._failed = False

    @property
    def in_frame(self) -> bool:
        """True between a VT and the end of its frame; the server arms a per-frame deadline on it."""
        return self._in_frame

    @property
    def failed(self) -> bool:
        """True after Oversize: the connection is going to be closed, so further input is ignored."""
        return self._failed

    @property
    def buffered(self) -> int:
        """Bytes held for the unfinished frame, so the caller can bound memory per connection."""
        return len(self._buf) + (1 if self._fs_pending else 0)

    def feed(self, data: bytes | bytearray | memoryview) -> list[FramingEvent]:
        """Consume a chunk of the stream and return the events it completes, in stream order."""
        if self._failed or not data:
            return []
        if not isinstance(data, bytes | bytearray):
            data = bytes(data)
        events: list[FramingEvent] = []
        n = len(data)
        pos = 0

        if self._fs_pending:
            # The byte that decides the FS left pending by the previous chunk.
            self._fs_pending = False
            b = data[0]
            if b in (_CR, _LF):
                events.append(Frame(bytes(self._buf), lf_terminated=b == _LF))
                self._buf = bytearray()
                self._in_frame = False
                pos = 1
            elif not self._grow(FS, 0, 1, events):
                return events
            # Otherwise the FS was data; data[0] is handled by the loop below
            # like any other byte (a VT there still truncates the frame).

        view = memoryview(data)
        # Positions of the next VT / FS at or after pos.  Cached so that a
        # chunk full of frames (or of FS data bytes) is searched once per
        # delimiter rather than once per loop iteration per delimiter kind.
        next_vt = _UNKNOWN
        next_fs = _UNKNOWN
        while pos < n:
            if next_vt != -1 and next_vt < pos:
                next_vt = data.find(VT, pos)

            if not self._in_frame:
                if next_vt == -1:
                    self._junk += n - pos
                    break
                self._junk += next_vt - pos
                if self._junk:
                    events.append(Junk(self._junk))
                    self._junk = 0
                self._in_frame = True
                pos = next_vt + 1
                continue

            if next_fs != -1 and next_fs < pos:
                next_fs = data.find(FS, pos)

            if next_fs == -1 and next_vt == -1:
                self._grow(view, pos, n, events)
                break

            if next_fs == -1 or (next_vt != -1 and next_vt < next_fs):
                # A VT inside an unfinished frame: the sender gave up on the
                # old frame (or we joined mid-stream); salvage it and restart.
                if not self._grow(view, pos, next_vt, events):
                    return events
                events.append(Truncated(bytes(self._buf), "vt_in_frame"))
                self._buf = bytearray()
                pos = next_vt + 1
                continue

            fs = next_fs
            if fs + 1 >= n:
                if self._grow(view, pos, fs, events):
                    self._fs_pending = True
                break

            b = data[fs + 1]
            if b in (_CR, _LF):
                if self._buf:
                    if not self._grow(view, pos, fs, events):
                        return events
                    payload = bytes(self._buf)
                    self._buf = bytearray()
                else:
                    # Common case: the whole frame is inside this chunk, so
                    # slice it out directly and skip the bytearray copy.
                    if fs - pos > self._max:
                        self._oversize(view, pos, fs, events)
                        return events
                    payload = bytes(data[pos:fs])
                events.append(Frame(payload, lf_terminated=b == _LF))
                self._in_frame = False
                pos = fs + 2
            else:
                # FS followed by anything else is payload: keep the FS and let
                # the loop look at the following byte normally.
                if not self._grow(view, pos, fs + 1, events):
                    return events
                pos = fs + 1
        return events

    def eof(self) -> list[FramingEvent]:
        """Flush at connection close, so a half-sent frame is journaled and junk is still counted."""
        if self._failed:
            return []
        events: list[FramingEvent] = []
        if self._in_frame:
            payload = bytes(self._buf)
            if self._fs_pending:
                # Nobody will decide that FS now; it was received, so it is
                # part of what gets journaled.
                payload += FS
            events.append(Truncated(payload, "eof"))
        if self._junk:
            events.append(Junk(self._junk))
        # Reset so a reused framer starts clean instead of carrying state
        # from a connection that no longer exists.
        self._buf = bytearray()
        self._in_frame = False
        self._fs_pending = False
        self._junk = 0
        return events

    def _grow(self, chunk: bytes | memoryview, start: int, stop: int, events: list[FramingEvent]) -> bool:
        """Append payload bytes, tripping Oversize before the buffer can exceed the limit."""
        if len(self._buf) + (stop - start) > self._max:
            self._oversize(chunk, start, stop, events)
            return False
        self._buf += chunk[start:stop]
        return True

    def _oversize(self, chunk: bytes | memoryview, start: int, stop: int, events: list[FramingEvent]) -> None:
        """Emit Oversize once and stop: the caller answers AR from the head and closes."""
        buf = self._buf
        received = len(buf) + (stop - start)
        want = self._head_bytes
        if len(buf) >= want:
            head = bytes(buf[:want])
        else:
            head = bytes(buf) + bytes(chunk[start : min(stop, start + want - len(buf))])
        events.append(Oversize(head, received))
        self._failed = True
        self._in_frame = False
        self._fs_pending = False
        self._buf = bytearray()

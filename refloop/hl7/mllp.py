"""MLLP framing and one small blocking client: `refloop send`, the note forward and the simulator use it.

MLLP (HL7 v2 Minimal Lower Layer Protocol, release 1/2): a message travels as ``<VT> payload <FS><CR>``.
The daemon's receiving side has its own sans-I/O framer (``refloop.daemon.framing``), which must survive
junk and hostile peers at line rate; a client only has to read the one ACK frame that answers each
message, so a few lines suffice here. Blocking on purpose: the CLI is synchronous and the notifier runs
deliveries in a worker thread.
"""

from __future__ import annotations

import socket
import ssl
from types import TracebackType

__all__ = ["CR", "FS", "VT", "MllpClient", "MllpError", "encode_frame", "msa"]

VT = b"\x0b"
FS = b"\x1c"
CR = b"\r"

#: An ACK is a few hundred bytes; anything this long is not an ACK and must not grow the buffer forever.
MAX_ACK_BYTES = 1 << 20


class MllpError(ConnectionError):
    """The peer closed, sent no frame, or sent something that is not one; ``str()`` carries no payload."""


def encode_frame(payload: bytes) -> bytes:
    """Wrap one message in MLLP block characters."""
    return VT + payload + FS + CR


def msa(ack: bytes) -> tuple[str, str]:
    """(MSA-1 acknowledgment code, MSA-2 control ID) of an ACK; empty strings when there is no MSA."""
    text = ack.decode("latin-1")
    sep = text[3:4] or "|"
    for seg in text.replace("\n", "\r").split("\r"):
        if seg.startswith("MSA"):
            parts = seg.split(sep)
            return (parts[1] if len(parts) > 1 else "", parts[2] if len(parts) > 2 else "")
    return "", ""


class MllpClient:
    """One connection; :meth:`send` writes a frame and returns the payload of the answering frame.

    ``ssl_context`` turns on TLS (the context decides verification; ``server_hostname`` defaults to
    ``host``). Bytes outside a frame before the VT are skipped; an FS followed by LF is accepted as some
    engines send it. ``timeout`` bounds the connect and every read.
    """

    def __init__(self, host: str, port: int, *, timeout: float = 30.0, ssl_context: ssl.SSLContext | None = None,
                 server_hostname: str | None = None) -> None:
        sock = socket.create_connection((host, port), timeout=timeout)
        try:
            if ssl_context is not None:
                sock = ssl_context.wrap_socket(sock, server_hostname=server_hostname or host)
        except BaseException:
            sock.close()
            raise
        sock.settimeout(timeout)
        self.sock = sock
        self._buf = bytearray()

    def __enter__(self) -> MllpClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, payload: bytes) -> bytes:
        """Send one message and wait for its ACK frame (the payload between VT and FS)."""
        self.sock.sendall(encode_frame(payload))
        return self.read_frame()

    def read_frame(self) -> bytes:
        buf = self._buf
        while True:
            start = buf.find(VT)
            if start > 0:
                del buf[:start]
                start = 0
            end = buf.find(FS, 1) if start == 0 else -1
            if end >= 0 and len(buf) > end + 1:
                if buf[end + 1] not in (CR[0], 0x0A):
                    raise MllpError("malformed frame: FS not followed by CR")
                payload = bytes(buf[1:end])
                del buf[:end + 2]
                return payload
            if len(buf) > MAX_ACK_BYTES:
                raise MllpError(f"no complete frame within {MAX_ACK_BYTES} bytes")
            chunk = self.sock.recv(65536)
            if not chunk:
                raise MllpError("connection closed before the ACK arrived")
            if start < 0:
                buf.clear()  # junk before any VT
            buf += chunk

"""The floor: a bare asyncio.Protocol that hand-splits MSH and builds the ACK string. Stores nothing.

Binds 127.0.0.1 on ``--port`` and prints ``READY <port>`` once listening. Stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import signal
import time

_ids = itertools.count(1)


def build_ack(msg: bytes) -> bytes:
    head = msg[: msg.find(b"\r")].decode("ascii", "replace")
    sep = head[3:4] or "|"
    f = head.split(sep)
    enc = f[1] if len(f) > 1 else "^~\\&"

    def fld(n: int) -> str:  # MSH-n is f[n-1] because MSH-1 is the separator itself
        return f[n - 1] if len(f) >= n else ""

    trigger = fld(9).split(enc[:1] or "^")[1] if enc[:1] in fld(9) else ""
    now = time.strftime("%Y%m%d%H%M%S")
    ack = (f"MSH{sep}{enc}{sep}BARE{sep}BARE{sep}{fld(3)}{sep}{fld(4)}{sep}{now}{sep}{sep}ACK^{trigger}^ACK"
           f"{sep}B{next(_ids)}{sep}{fld(11)}{sep}{fld(12)}\rMSA{sep}AA{sep}{fld(10)}\r")
    return b"\x0b" + ack.encode("ascii", "replace") + b"\x1c\r"


class Bare(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.buf = bytearray()

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        while True:
            end = buf.find(b"\x1c\r")
            if end < 0:
                return
            start = buf.find(b"\x0b")
            frame = bytes(buf[start + 1: end]) if 0 <= start < end else bytes(buf[:end])
            del buf[: end + 2]
            self.transport.write(build_ack(frame))  # type: ignore[attr-defined]


async def main(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Bare, "127.0.0.1", port)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"READY {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await stop.wait()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=0)
    asyncio.run(main(ap.parse_args().port))

"""One MLLP connection: a thin asyncio.Protocol over the sans-I/O framer.

Frames on one connection are handled strictly in order (an engine matches ACKs by order as much as by
MSA-2); connections run concurrently and meet only in the writer's group commit. Every frame, even a
broken one, becomes a writer job, so nothing received is lost.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import cast

from refloop.daemon import tls
from refloop.daemon.connections import ConnContext
from refloop.daemon.framing import Frame, Framer, Junk, Oversize, Truncated
from refloop.daemon.ingest import BROKEN, FRAME, OVERSIZE, Job, Result
from refloop.daemon.metrics import type_label
from refloop.daemon.writer import Writer

log = logging.getLogger("refloop.mllp")


class MllpProtocol(asyncio.Protocol):
    def __init__(self, ctx: ConnContext) -> None:
        self.ctx = ctx
        limits = ctx.live.settings.mllp
        self.framer = Framer(max_frame_bytes=limits.max_frame_bytes)
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self.pending: deque[Job] = deque()
        self.pump: asyncio.Task[None] | None = None
        self.paused = False  # reading paused: too many frames pending on this connection, or oversize
        self.lag_paused = False  # reading paused: the apply lag reached mllp.max_apply_lag (back-pressure)
        self.closing = False
        self.draining = False
        self.last_activity = time.monotonic()
        self._idle_handle: asyncio.TimerHandle | None = None
        self._deadline_handle: asyncio.TimerHandle | None = None
        self._counted = False
        self.peer_subject = ""  # client-certificate CN after an mTLS handshake
        self.writer: Writer | None = None  # chosen on the first frame, then fixed: messages stay in order
        self._plain: asyncio.Transport | None = None  # the TCP transport under TLS, until start_tls takes it

    # -- lifecycle -----------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without inheriting from it, so no isinstance here.
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer = str(peer[0]) if isinstance(peer, tuple) else str(peer or "")
        reason = self.ctx.hub.admit(self)
        m = self.ctx.metrics
        if reason is not None:
            m.connections.labels(f"rejected_{reason}").inc()
            log.warning("connection refused", extra={"reason": reason})
            self.transport.abort()
            return
        self._counted = True
        m.connections.labels("accepted").inc()
        m.connections_open.inc()
        self._arm_idle()
        if self.ctx.hub.lag_paused:
            self.pause_for_lag(True)
        if self.ctx.live.tls_context is not None:
            self._plain = self.transport
            self.transport.pause_reading()  # no plaintext byte may reach the framer before the handshake
            self.ctx.hub.spawn(self._upgrade())

    async def _upgrade(self) -> None:
        """Plain TCP first, then TLS, so every failed handshake is counted with its reason."""
        context = self.ctx.live.tls_context
        assert context is not None and self.transport is not None
        raw = self.transport
        try:
            secure = await self.ctx.loop.start_tls(
                raw, self, context, server_side=True,
                ssl_handshake_timeout=self.ctx.live.settings.mllp.tls_handshake_timeout,
            )
        except Exception as exc:  # ssl.SSLError, TimeoutError, ConnectionError...
            reason = tls.failure_reason(exc)
            self.ctx.metrics.tls_failures.labels(reason).inc()
            log.warning("TLS handshake failed", extra={"reason": reason, "error_type": type(exc).__name__})
            raw.abort()
            return
        if secure is None:  # pragma: no cover - the peer went away during the handshake
            raw.abort()
            return
        self.transport = secure
        self._plain = None  # start_tls owns the TCP transport now: nothing can bypass it any more
        self.peer_subject = tls.peer_subject_cn(secure.get_extra_info("peercert"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self._cancel_timers()
        for ev in self.framer.eof():
            if isinstance(ev, Truncated):
                self.ctx.metrics.frames.labels("disconnect").inc()
                self._enqueue(self._job(BROKEN, ev.payload, reason="disconnect"))
            elif isinstance(ev, Junk):
                self.ctx.metrics.junk_bytes.inc(ev.nbytes)
        if self._counted:
            self._counted = False
            self.ctx.metrics.connections_open.dec()
            self.ctx.hub.release(self)

    def abandon_partial(self, reason: str) -> None:
        """Journal a half-received frame as broken (shutdown, deadline) before the connection goes."""
        for ev in self.framer.eof():
            if isinstance(ev, Truncated):
                self._enqueue(self._job(BROKEN, ev.payload, reason=reason))
            elif isinstance(ev, Junk):
                self.ctx.metrics.junk_bytes.inc(ev.nbytes)

    def close(self, reason: str) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.ctx.metrics.connections_closed.labels(reason).inc()
            log.info("closing connection", extra={"reason": reason})
            self.transport.close()
        self.closing = True

    async def shutdown(self, deadline: float) -> int:
        """Daemon shutdown: finish (commit and ACK) the frames already received, start no new one, then
        journal a half-received frame as broken and close. Returns the frames cut by the deadline."""
        self.draining = True
        loop = self.ctx.loop
        if self.pump is not None:
            await asyncio.wait([self.pump], timeout=max(deadline - loop.time(), 0.0))
        cut = len(self.pending) + (1 if self.framer.in_frame else 0)
        self.abandon_partial("shutdown")
        self.close("shutdown")
        for _ in range(3):
            await asyncio.sleep(0)  # connection_lost queues a frame cut by the peer as broken
        while self.pump is not None and loop.time() < deadline + 1.0:
            await asyncio.wait([self.pump], timeout=max(deadline + 1.0 - loop.time(), 0.05))
        return cut

    def pause_for_lag(self, pause: bool) -> None:
        """Back-pressure: stop (or resume) reading this socket; frames already read are still journaled."""
        if self.transport is None or self.closing or pause == self.lag_paused:
            return
        self.lag_paused = pause
        if pause:
            if not self.paused:
                self.transport.pause_reading()
            self._cancel_deadline()  # bytes waiting in the kernel are our delay, not the sender's
        elif not self.paused:
            self.transport.resume_reading()
            if self.framer.in_frame:
                self._arm_deadline()

    # -- timers --------------------------------------------------------------------------------
    def _arm_idle(self) -> None:
        timeout = self.ctx.live.settings.mllp.idle_timeout
        self._idle_handle = self.ctx.loop.call_later(timeout, self._idle_check)

    def _idle_check(self) -> None:
        timeout = self.ctx.live.settings.mllp.idle_timeout
        idle = time.monotonic() - self.last_activity
        if self.pump is None and not self.pending and idle >= timeout:
            self.close("idle_timeout")
            return
        self._idle_handle = self.ctx.loop.call_later(max(timeout - idle, 0.05), self._idle_check)

    def _on_deadline(self) -> None:
        self._deadline_handle = None
        self.ctx.metrics.frames.labels("deadline").inc()
        self.abandon_partial("deadline")
        self.close("deadline")

    def _cancel_timers(self) -> None:
        for h in (self._idle_handle, self._deadline_handle):
            if h is not None:
                h.cancel()
        self._idle_handle = self._deadline_handle = None

    # -- data ----------------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        self.last_activity = time.monotonic()
        m = self.ctx.metrics
        m.received_bytes.inc(len(data))
        if self._plain is not None and self._plain.get_protocol() is self:
            # Bytes straight off the TCP transport of a TLS port: the pause in connection_made did not hold
            # (uvloop starts reading after connection_made returns). Never frame them; refuse the peer.
            m.tls_failures.labels("plaintext").inc()
            log.warning("TLS port got bytes before the handshake", extra={"reason": "plaintext"})
            self._plain.abort()
            return
        if self.draining:
            return  # shutting down: frames not yet complete are not started now
        ended = False  # did a frame end (complete or truncated) in this read?
        for ev in self.framer.feed(data):
            if isinstance(ev, (Frame, Truncated)):
                ended = True
            if isinstance(ev, Frame):
                m.frames.labels("lf_terminated" if ev.lf_terminated else "ok").inc()
                self._enqueue(self._job(FRAME, ev.payload))
            elif isinstance(ev, Junk):
                m.junk_bytes.inc(ev.nbytes)
            elif isinstance(ev, Truncated):
                m.frames.labels("bad_framing").inc()
                log.warning("frame truncated by a new start block", extra={"bytes": len(ev.payload)})
                self._enqueue(self._job(BROKEN, ev.payload, reason=ev.reason))
            elif isinstance(ev, Oversize):
                m.frames.labels("oversized").inc()
                log.warning("frame over the size limit", extra={"bytes": ev.received})
                self._enqueue(self._job(OVERSIZE, ev.head, received_size=ev.received))
                if self.transport is not None:
                    self.transport.pause_reading()  # nothing more is read; close after the AR
                    self.paused = True
        if self.framer.in_frame and not self.paused and not self.lag_paused:
            if self._deadline_handle is None or ended:
                self._arm_deadline()  # the deadline is per frame: a new frame gets a fresh one
        else:
            self._cancel_deadline()

    def _arm_deadline(self) -> None:
        self._cancel_deadline()
        self._deadline_handle = self.ctx.loop.call_later(self.ctx.live.settings.mllp.frame_deadline,
                                                            self._on_deadline)

    def _cancel_deadline(self) -> None:
        if self._deadline_handle is not None:
            self._deadline_handle.cancel()
            self._deadline_handle = None

    def _job(self, kind: str, payload: bytes, *, reason: str = "", received_size: int = 0) -> Job:
        return Job(kind, payload, self.peer, self.ctx.clock.now(), reason=reason, received_size=received_size,
                   peer_subject=self.peer_subject)

    def _enqueue(self, job: Job) -> None:
        self.pending.append(job)
        if (not self.paused and self.transport is not None and not self.closing
                and len(self.pending) >= self.ctx.live.settings.mllp.max_pending_frames):
            if not self.lag_paused:
                self.transport.pause_reading()
            self.paused = True
            self._cancel_deadline()  # bytes waiting in the kernel are our delay, not the sender's
        if self.pump is None:
            self.pump = self.ctx.hub.spawn(self._pump())

    async def _pump(self) -> None:
        """Process queued frames one at a time: commit, then ACK, then the next frame."""
        try:
            while self.pending:
                job = self.pending.popleft()
                if self.writer is None:
                    self.writer = self.ctx.writer_for_connection()
                result = await self.writer.submit(job)
                if result.await_apply and result.awaits is not None:
                    # ack_after = "applied": the projector's COMMIT releases this ACK.
                    applied = await self.ctx.wait_applied(result.awaits)
                    result.ack, result.ack_code, result.err_code = applied.ack, applied.ack_code, applied.err_code
                    if result.awaits == result.message_id:
                        result.outcome = applied.outcome  # a resend stays a duplicate
                self._after(job, result)
                if (self.paused and not result.close and not self.draining and self.transport is not None
                        and len(self.pending) < self.ctx.live.settings.mllp.max_pending_frames // 2 + 1):
                    if not self.lag_paused:
                        self.transport.resume_reading()
                    self.paused = False
                    if self.framer.in_frame:
                        self._arm_deadline()
        finally:
            self.pump = None

    def _after(self, job: Job, result: Result) -> None:
        m = self.ctx.metrics
        self.ctx.observe(job, result)
        if result.ack is not None and self.transport is not None and not self.transport.is_closing():
            self.transport.write(result.ack)
            self.last_activity = time.monotonic()
            m.acks.labels(result.ack_code).inc()
            m.ack_seconds.labels(type_label(result.message_type)).observe(time.perf_counter() - job.started)
        if result.close:
            self.close("oversize")

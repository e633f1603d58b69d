"""Micro-benchmark of the referral handlers alone: ``python -m bench.handlers [--count 3000] [--group 8]``.

Runs the bench traffic mix (bench/messages.py: ~70 % unrelated SIU, ~20 % SIU for a referral, ~10 % REF, a
few MDM) straight through the routed handlers on a fresh, migrated SQLite file (WAL, synchronous=FULL, as
the daemon opens it), ``--group`` messages per transaction like the writer's group commit. No MLLP, no
journal logic: each message gets a bare journal row (not timed) so its events can cite it. Prints, per
message kind, the statements the handler issued and the CPU time (``time.process_time``) inside the
handler, so a change to refloop/routes or refloop/store/referrals.py can be measured on its own while
the ingest path changes underneath. Point ``PYTHONPATH`` at another tree to compare two versions.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import pstats
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import event, insert

from bench.messages import MessageFactory
from refloop.clock import SystemClock
from refloop.config import DatabaseSettings, Settings
from refloop.message import Message
from refloop.routes.context import HandlerContext
from refloop.routes.router import Router
from refloop.routes.table import DEFAULT_ROUTES
from refloop.store.engine import make_engine
from refloop.store.migrate import upgrade
from refloop.store.models import Message as Journal


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.handlers")
    ap.add_argument("--count", type=int, default=3000)
    ap.add_argument("--conns", type=int, default=16, help="interleaved message streams, like loadgen -c")
    ap.add_argument("--group", type=int, default=8, help="messages per transaction")
    ap.add_argument("--sql", action="store_true", help="also print each path's statements (normalised)")
    ap.add_argument("--profile", metavar="KIND", default="",
                    help="cProfile the handler calls of one generated kind (SIU-ref, REF, SIU = department feed, MDM)")
    a = ap.parse_args(argv)

    wd = Path(tempfile.mkdtemp(prefix="refloop-handlers-"))
    engine = make_engine(DatabaseSettings(url=f"sqlite:///{wd / 'refloop.db'}"))
    upgrade(engine)
    settings = Settings()
    router = Router(DEFAULT_ROUTES)
    clock = SystemClock()
    factories = [MessageFactory("BENCHH", c) for c in range(a.conns)]
    frames = []
    for i in range(a.count):
        _cid, data, kind = factories[i % a.conns].next()
        frames.append((kind, data[1:-2].decode("ascii")))

    stmts = [0]
    seen: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_a: Any) -> None:
        stmts[0] += 1
        if a.sql:
            seen.append(" ".join(statement.split())[:150])

    n_by: collections.Counter[str] = collections.Counter()
    cpu_by: collections.Counter[str] = collections.Counter()
    st_by: collections.Counter[str] = collections.Counter()
    sql_by: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    prof = cProfile.Profile() if a.profile else None
    journal = insert(Journal.__table__).returning(Journal.__table__.c.id)
    with engine.connect() as conn:
        event.listen(conn, "before_cursor_execute", count)
        for g in range(0, len(frames), a.group):
            with conn.begin():
                for kind, text in frames[g:g + a.group]:
                    msg = Message.parse(text)
                    now = datetime.now(UTC)
                    mid = conn.execute(journal, {"received_at": now, "outcome": "processed",
                                                 "control_id": msg.control_id}).scalar_one()
                    route = router.resolve(msg.message_type, msg.trigger_event)
                    assert route is not None
                    profile = settings.profile_for(msg.sending_application, msg.sending_facility)
                    ctx = HandlerContext(settings=settings, conn=conn, clock=clock, profile=profile, message_ref=mid,
                                         control_id=msg.control_id, received_at=now)
                    s0, n0, t0 = stmts[0], len(seen), time.process_time()
                    if prof is not None and kind == a.profile:
                        res = prof.runcall(route.handler, ctx, msg)
                    else:
                        res = route.handler(ctx, msg)
                    spent = time.process_time() - t0
                    if kind == "SIU":  # the department feed: mostly unrelated, some match a referral heuristically
                        kind = "SIU-unrel" if res.detail == "unrelated" else "SIU-heur"
                    cpu_by[kind] += spent
                    if a.sql:
                        sql_by[kind].update(seen[n0:])
                    st_by[kind] += stmts[0] - s0
                    n_by[kind] += 1
    total = sum(n_by.values())
    print(f"{total} messages, {a.group} per transaction; handler only (no journal, no ACK):")
    for kind in sorted(n_by, key=lambda k: -n_by[k]):
        n = n_by[kind]
        print(f"  {kind:<9} {n:5d} msgs  {st_by[kind] / n:5.2f} stmts/msg  {cpu_by[kind] / n * 1e6:7.0f} µs CPU/msg")
    print(f"  {'all':<9} {total:5d} msgs  {sum(st_by.values()) / total:5.2f} stmts/msg  "
          f"{sum(cpu_by.values()) / total * 1e6:7.0f} µs CPU/msg")
    if a.sql:
        for kind in sorted(sql_by, key=lambda k: -n_by[k]):
            print(f"{kind}:")
            for stmt, n in sql_by[kind].most_common():
                print(f"  {n / n_by[kind]:5.2f}/msg  {stmt}")
    if prof is not None:
        pstats.Stats(prof).sort_stats("tottime").print_stats(30)
        pstats.Stats(prof).sort_stats("cumulative").print_stats(40)
    engine.dispose()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

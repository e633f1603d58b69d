"""The `make bench` orchestrator: start each side in its own process, drive it with the load generator in
another, verify durability, repeat in alternating rounds, and report medians.

Method (docs/performance.md): server under ``taskset -c 0``, generator under ``taskset -c 1``;
closed loop, warm-up + barrier + measured phase; round 1 runs each (side, C) for ``--seconds`` and
sizes the message count of later rounds from it (a fixed count per run, ``--max-seconds`` as the
cut-off). Every refloop run uses a fresh database; after the run the daemon is killed with SIGKILL and
every control ID that got AA/CA must be in the journal (``messages.control_id`` with outcome
processed/ignored), else the run is reported as FAILURE instead of a number.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PY = sys.executable
REFLOOP = str(Path(PY).with_name("refloop"))
PG_ADMIN_URL = os.environ.get("BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")

BASELINE = "python-hl7"
SIDE_DOC = {
    "python-hl7": "python-hl7 0.4.5 start_hl7_server + create_ack(), no store (BASELINE)",
    "bare": "bare asyncio Protocol, hand-split MSH, no store (floor)",
    "refloop-sqlite": "refloop, SQLite (default settings), log level WARNING",
    "refloop-sqlite-info": "refloop, SQLite (default settings), default INFO logging (to a file)",
    "refloop-pg": "refloop, PostgreSQL (throwaway database), log level WARNING",
    "refloop-sqlite-applied": "refloop, SQLite, mllp.ack_after = applied (ACK after the projector's commit)",
    "refloop-pg-applied": "refloop, PostgreSQL, mllp.ack_after = applied",
}
#: Extra environment per refloop side (the side name says what it varies).
SIDE_ENV = {
    "refloop-sqlite-applied": {"REFLOOP_MLLP_ACK_AFTER": "applied"},
    "refloop-pg-applied": {"REFLOOP_MLLP_ACK_AFTER": "applied"},
}


#: ``--unpinned``: run server and generator where the kernel puts them, as a new user would.
PINNED = {"on": True}


def taskset(core: int) -> list[str]:
    return ["taskset", "-c", str(core)] if PINNED["on"] and shutil.which("taskset") else []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc/<pid>/stat."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            parts = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


def busy_jiffies() -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs, from the first line of /proc/stat."""
    with open("/proc/stat") as fh:
        v = [int(x) for x in fh.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return sum(v) - idle, sum(v)


def vm_rss_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


# -- sides -----------------------------------------------------------------------------------------
class StartError(RuntimeError):
    pass


@dataclass
class Running:
    proc: subprocess.Popen[bytes]
    port: int
    workdir: Path
    db_url: str = ""
    pg_db: str = ""
    log_path: Path | None = None
    http_port: int = 0


def _wait_ready_line(proc: subprocess.Popen[bytes], timeout: float) -> int:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    os.set_blocking(proc.stdout.fileno(), False)
    buf = b""
    while time.monotonic() < deadline:
        chunk = proc.stdout.read()
        if chunk:
            buf += chunk
            for line in buf.decode(errors="replace").splitlines():
                if line.startswith("READY "):
                    return int(line.split()[1])
        if proc.poll() is not None:
            raise StartError(f"peer exited with {proc.returncode}: {buf[-500:]!r}")
        time.sleep(0.05)
    raise StartError("peer did not become ready")


def _wait_http_ready(proc: subprocess.Popen[bytes], http_port: int, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    url = f"http://127.0.0.1:{http_port}/readyz"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StartError(f"refloop exited with {proc.returncode}: {log.read_text()[-800:]}")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise StartError(f"refloop not ready in {timeout}s: {log.read_text()[-800:]}")


def pg_admin(sql: str) -> None:
    import psycopg

    with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5) as c:
        c.execute(sql)  # type: ignore[arg-type,unused-ignore]


def pg_available() -> str | None:
    try:
        pg_admin("SELECT 1")
        return None
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def refloop_env(workdir: Path, mllp: int, http: int, db_url: str, level: str,
                extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REFLOOP_")}
    env.update({
        "REFLOOP_MLLP_PORT": str(mllp), "REFLOOP_HTTP_PORT": str(http), "REFLOOP_MLLP_HOST": "127.0.0.1",
        "REFLOOP_HTTP_HOST": "127.0.0.1", "REFLOOP_DATABASE_URL": db_url, "REFLOOP_LOG_LEVEL": level,
    })
    env.update(extra or {})
    return env


def start_side(side: str, base: Path, extra_env: dict[str, str] | None = None) -> Running:
    workdir = Path(tempfile.mkdtemp(prefix=f"{side}-", dir=base))
    if side in ("python-hl7", "bare"):
        mod = "bench.peer_hl7" if side == "python-hl7" else "bench.peer_bare"
        proc = subprocess.Popen([*taskset(0), PY, "-m", mod, "--port", "0"], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        try:
            port = _wait_ready_line(proc, 20)
        except StartError:
            proc.kill()
            proc.wait()
            raise
        return Running(proc, port, workdir)
    mllp, http = free_port(), free_port()
    level = "INFO" if side == "refloop-sqlite-info" else "WARNING"
    extra_env = {**SIDE_ENV.get(side, {}), **(extra_env or {})}
    pg_db = ""
    if side.startswith("refloop-pg"):
        pg_db = f"refloop_bench_{uuid.uuid4().hex[:10]}"
        pg_admin(f'CREATE DATABASE "{pg_db}"')
        db_url = PG_ADMIN_URL.replace("postgresql://", "postgresql+psycopg://").rsplit("/", 1)[0] + "/" + pg_db
    else:
        db_url = f"sqlite:///{workdir / 'refloop.db'}"
    env = refloop_env(workdir, mllp, http, db_url, level, extra_env)
    log = workdir / "refloop.log"
    if pg_db:
        up = subprocess.run([REFLOOP, "db", "upgrade"], cwd=workdir, env=env, capture_output=True, timeout=120)
        if up.returncode != 0:
            drop_pg(pg_db)
            raise StartError(f"refloop db upgrade failed: {up.stderr.decode()[-800:]}")
    with open(log, "wb") as fh:
        proc = subprocess.Popen([*taskset(0), REFLOOP, "serve"], cwd=workdir, env=env, stdout=fh,
                                stderr=subprocess.STDOUT)
    run = Running(proc, mllp, workdir, db_url, pg_db, log, http)
    try:
        _wait_http_ready(proc, http, log, 60)
    except StartError:
        stop_side(run, kill=True)
        raise
    return run


def drop_pg(name: str) -> None:
    try:
        pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    except Exception as exc:
        print(f"  warning: could not drop {name}: {type(exc).__name__}", file=sys.stderr)


def stop_side(run: Running, kill: bool) -> None:
    """SIGKILL for refloop (the durability check must not rely on a graceful shutdown), SIGTERM for peers."""
    if run.proc.poll() is None:
        run.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            run.proc.wait(10)
        except subprocess.TimeoutExpired:
            run.proc.kill()
            run.proc.wait()
    if run.proc.stdout is not None:
        run.proc.stdout.close()


def cleanup_side(run: Running) -> None:
    if run.pg_db:
        drop_pg(run.pg_db)
    shutil.rmtree(run.workdir, ignore_errors=True)


def wait_lag_zero(http_port: int, timeout: float) -> float | None:
    """Poll /readyz until the daemon has applied everything it acknowledged; the wall-clock time then."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/readyz", timeout=2) as r:
                if json.loads(r.read()).get("apply_lag_messages") == 0:
                    return time.time()
        except (OSError, ValueError):
            pass
        time.sleep(0.01)
    return None


def scrape(http_port: int, name: str) -> float | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=5) as r:
            for line in r.read().decode().splitlines():
                if line.startswith(name + " "):
                    return float(line.rsplit(" ", 1)[1])
    except OSError:
        return None
    return None


def verify_journal(db_url: str, aa_file: Path) -> dict[str, Any]:
    """Every control ID that got AA/CA must be journaled as processed or ignored (after lag 0)."""
    from sqlalchemy import create_engine, text

    wanted = {line for line in aa_file.read_text().splitlines() if line}
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(text(
                "SELECT control_id FROM messages WHERE outcome IN ('processed', 'ignored')")).scalars().all()
    finally:
        engine.dispose()
    have = set(rows)
    missing = sorted(wanted - have)
    return {"acked": len(wanted), "journaled": len(have), "missing": len(missing), "missing_sample": missing[:5]}


# -- one run ---------------------------------------------------------------------------------------
@dataclass
class Opts:
    seconds: float
    warmup: int
    max_seconds: float
    ack_timeout: float


def run_once(side: str, c: int, count: int, opts: Opts, base: Path) -> dict[str, Any]:
    rec: dict[str, Any] = {"side": side, "c": c, "count": count}
    try:
        run = start_side(side, base)
    except Exception as exc:
        rec["status"] = "START_FAILED"
        rec["error"] = str(exc)[-400:]
        return rec
    aa_file = run.workdir / "accepted.txt"
    try:
        cpu0 = cpu_seconds(run.proc.pid)
        busy0, all0 = busy_jiffies()
        kids0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cmd = [*taskset(1), PY, "-m", "bench.loadgen", "--port", str(run.port), "-c", str(c),
               "--warmup", str(opts.warmup), "--count", str(count), "--seconds", str(opts.seconds),
               "--max-seconds", str(opts.max_seconds), "--ack-timeout", str(opts.ack_timeout),
               "--aa-file", str(aa_file)]
        wall = opts.max_seconds * 2 + opts.ack_timeout + 30
        try:
            gen = subprocess.run(cmd, cwd=ROOT, capture_output=True, timeout=wall)
        except subprocess.TimeoutExpired:
            rec["status"] = "GEN_TIMEOUT"
            return rec
        cpu1 = cpu_seconds(run.proc.pid)
        busy1, all1 = busy_jiffies()
        kids1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        gen_cpu = (kids1.ru_utime + kids1.ru_stime) - (kids0.ru_utime + kids0.ru_stime)
        tick = os.sysconf("SC_CLK_TCK")
        if all1 > all0:
            # Busy CPU on the box that was neither the server nor the generator, as % of all CPUs.
            foreign = (busy1 - busy0) / tick - (cpu1 - cpu0) - gen_cpu
            rec["foreign_cpu_pct"] = round(max(0.0, 100 * foreign / ((all1 - all0) / tick)), 1)
        rec["server_rss_kb"] = vm_rss_kb(run.proc.pid)
        if gen.returncode != 0:
            rec["status"] = "GEN_FAILED"
            rec["error"] = gen.stderr.decode()[-600:]
            return rec
        res = json.loads(gen.stdout.decode().strip().splitlines()[-1])
        rec.update(res)
        total = int(res["warmup_msgs"]) + int(res["msgs"])
        rec["server_us_per_msg"] = round((cpu1 - cpu0) / total * 1e6, 1) if total else None
        if side.startswith("refloop") and total:
            # Applied msg/s: every frame sent (warm-up included) over first send -> apply lag 0.
            lag0 = wait_lag_zero(run.http_port, 120)
            cpu2 = cpu_seconds(run.proc.pid)
            apply_cpu = scrape(run.http_port, "refloop_apply_cpu_seconds_total")
            if lag0 is None:
                rec["status"] = "LAG_TIMEOUT"
                return rec
            rec["applied_msg_per_s"] = round(total / max(lag0 - float(res["first_send_unix"]), 1e-6), 1)
            rec["server_us_per_msg"] = round((cpu2 - cpu0) / total * 1e6, 1)  # ACK and apply, up to lag 0
            if apply_cpu is not None:
                rec["apply_us_per_msg"] = round(apply_cpu / total * 1e6, 1)
                rec["ack_us_per_msg"] = round(((cpu2 - cpu0) - apply_cpu) / total * 1e6, 1)
        rec["status"] = "OK"
        if res["errors"] or res["bad_acks"]:
            rec["status"] = "ERRORS"
        if side.startswith("refloop"):
            stop_side(run, kill=True)
            try:
                v = verify_journal(run.db_url, aa_file)
            except Exception as exc:
                v = {"error": f"{type(exc).__name__}: {str(exc)[:200]}", "missing": -1}
            rec["verify"] = v
            if v.get("missing") != 0:
                rec["status"] = "FAILURE"
        return rec
    finally:
        stop_side(run, kill=side.startswith("refloop"))
        cleanup_side(run)


# -- idle connections ------------------------------------------------------------------------------
def idle_rss(n: int, base: Path) -> dict[str, Any]:
    extra = {"REFLOOP_MLLP_MAX_CONNECTIONS": str(n * 2), "REFLOOP_MLLP_MAX_CONNECTIONS_PER_IP": str(n * 2)}
    out: dict[str, Any] = {"connections": n}
    try:
        run = start_side("refloop-sqlite", base, extra)
    except Exception as exc:
        return {"connections": n, "error": str(exc)[-300:]}
    try:
        time.sleep(0.5)
        out["rss_before_mb"] = round((vm_rss_kb(run.proc.pid) or 0) / 1024, 1)
        gen = subprocess.Popen([*taskset(1), PY, "-m", "bench.loadgen", "--port", str(run.port), "--idle", str(n),
                                "--hold", "60"], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
        assert gen.stdout is not None and gen.stdin is not None
        try:
            first = gen.stdout.readline().decode()
            out.update(json.loads(first) if first.strip() else {"error": "no report from generator"})
            time.sleep(1.0)
            out["rss_mb"] = round((vm_rss_kb(run.proc.pid) or 0) / 1024, 1)
            out["server_alive"] = run.proc.poll() is None
        finally:
            try:
                rest, err = gen.communicate(input=b"", timeout=30)  # closing stdin ends the hold
                lines = rest.decode().strip().splitlines()
                if lines:
                    out.update(json.loads(lines[-1]))
                if gen.returncode:
                    out["gen_error"] = err.decode()[-300:]
            except subprocess.TimeoutExpired:
                gen.kill()
                gen.wait()
    finally:
        stop_side(run, kill=True)
        cleanup_side(run)
    return out


# -- report ----------------------------------------------------------------------------------------
def summarise(records: list[dict[str, Any]], sides: list[str], cs: list[int]) -> dict[str, Any]:
    cells: dict[str, dict[str, Any]] = {}
    for side in sides:
        for c in cs:
            rs = [r for r in records if r["side"] == side and r["c"] == c]
            ok = [r for r in rs if r.get("status") in ("OK", "ERRORS")]
            failed = [r for r in rs if r.get("status") not in ("OK", "ERRORS")]
            cell: dict[str, Any] = {"runs": len(rs), "ok_runs": len(ok),
                                    "statuses": sorted({r.get("status", "?") for r in rs})}
            if any(r.get("status") == "FAILURE" for r in rs):
                cell["failure"] = "FAILURE: acknowledged messages missing from the journal"
            elif failed:
                cell["failure"] = f"{failed[0].get('status')}: {str(failed[0].get('error', ''))[:160]}"
            if ok:
                for key in ("msg_per_s", "p50_ms", "p90_ms", "p99_ms", "max_ms", "server_us_per_msg",
                            "gen_cpu_pct", "foreign_cpu_pct", "applied_msg_per_s", "ack_us_per_msg",
                            "apply_us_per_msg"):
                    vals = [float(r[key]) for r in ok if r.get(key) is not None]
                    if vals:
                        cell[key] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}
                cell["errors"] = sum(int(r.get("errors", 0)) for r in ok)
                cell["bad_acks"] = sum(int(r.get("bad_acks", 0)) for r in ok)
                cell["msgs"] = sum(int(r.get("msgs", 0)) for r in ok)
            cells[f"{side}|{c}"] = cell
    return cells


def ratio(cells: dict[str, Any], side: str, c: int) -> float | None:
    a, b = cells.get(f"{side}|{c}", {}), cells.get(f"{BASELINE}|{c}", {})
    if "failure" in a or "msg_per_s" not in a or "msg_per_s" not in b:
        return None
    return float(a["msg_per_s"]["median"]) / float(b["msg_per_s"]["median"])


def targets(cells: dict[str, Any], cs: list[int], idle: dict[str, Any] | None) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def add(name: str, measured: str, met: bool | None) -> None:
        out.append({"target": name, "measured": measured,
                    "met": "n/a" if met is None else ("MET" if met else "NOT MET")})

    def rt(side: str, c: int, need: float, label: str) -> None:
        if c not in cs:
            return
        r = ratio(cells, side, c)
        cell = cells.get(f"{side}|{c}", {})
        if r is None:
            add(label, cell.get("failure", "not measured"), False if "failure" in cell else None)
        else:
            add(label, f"{r:.2f}×", r >= need)

    rt("refloop-sqlite", 16, 4.0, "SQLite, 16 conns: ≥ 4× baseline msg/s")
    rt("refloop-sqlite", 1, 2.0, "SQLite, 1 conn: ≥ 2× baseline msg/s")
    if 1 in cs:
        cell = cells.get("refloop-sqlite|1", {})
        if "p99_ms" in cell and "failure" not in cell:
            p = float(cell["p99_ms"]["median"])
            add("SQLite, 1 conn: ACK p99 ≤ 2 ms", f"{p:.2f} ms", p <= 2.0)
        else:
            add("SQLite, 1 conn: ACK p99 ≤ 2 ms", cell.get("failure", "not measured"), None)
    rt("refloop-pg", 16, 3.0, "PostgreSQL, 16 conns: ≥ 3× baseline msg/s")
    if 16 in cs:
        cell, base = cells.get("refloop-sqlite|16", {}), cells.get(f"{BASELINE}|16", {})
        if "applied_msg_per_s" in cell and "msg_per_s" in base:
            r = float(cell["applied_msg_per_s"]["median"]) / float(base["msg_per_s"]["median"])
            add("SQLite, 16 conns: applied ≥ 1.6× baseline msg/s", f"{r:.2f}×", r >= 1.6)
        else:
            add("SQLite, 16 conns: applied ≥ 1.6× baseline msg/s", cell.get("failure", "not measured"), None)
    if idle is not None:
        if "rss_mb" in idle and idle.get("alive") == idle.get("connections"):
            add(f"RSS with {idle['connections']} idle connections ≤ 150 MB", f"{idle['rss_mb']} MB",
                float(idle["rss_mb"]) <= 150)
        else:
            add("RSS with idle connections ≤ 150 MB", json.dumps(idle)[:200], False)
    return out


def machine_info() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import sqlite3
        sqlite_version = sqlite3.sqlite_version
    except Exception:
        sqlite_version = "?"
    return {"nproc": os.cpu_count(), "cpu_model": model, "python": platform.python_version(),
            "sqlite": sqlite_version, "kernel": platform.release(),
            "pinning": "server taskset -c 0, generator taskset -c 1" if PINNED["on"] and shutil.which("taskset")
            else "none (unpinned)"}


def render(cells: dict[str, Any], sides: list[str], cs: list[int], tg: list[dict[str, Any]],
           idle: dict[str, Any] | None, meta: dict[str, Any]) -> str:
    lines = ["| side | C | ACK msg/s median [min–max] | ACK p50 ms | ACK p99 ms | applied msg/s | server µs/msg "
             "(ACK + apply) | foreign CPU % | vs baseline |", "|---|---|---|---|---|---|---|---|---|"]
    for side in sides:
        for c in cs:
            cell = cells[f"{side}|{c}"]
            if "failure" in cell and cell["failure"].startswith("FAILURE"):
                lines.append(f"| {side} | {c} | **FAILURE** (acknowledged data lost) | — | — | — | — | — | — |")
                continue
            if "msg_per_s" not in cell:
                lines.append(f"| {side} | {c} | {cell.get('failure', 'no data')} | — | — | — | — | — | — |")
                continue
            g = cell
            r = ratio(cells, side, c)
            note = "" if not (g.get("errors") or g.get("bad_acks")) else \
                f" ⚠ {g.get('errors')} errors, {g.get('bad_acks')} bad ACKs"
            mps = g["msg_per_s"]
            rate = f"{mps['median']:,.0f}" + (f" [{mps['min']:,.0f}–{mps['max']:,.0f}]" if g["ok_runs"] > 1 else "")
            p99 = g["p99_ms"]
            p99t = f"{p99['median']:.2f}" + (f" [{p99['min']:.2f}–{p99['max']:.2f}]" if g["ok_runs"] > 1 else "")
            srv = g.get("server_us_per_msg", {}).get("median")
            fc = g.get("foreign_cpu_pct", {}).get("median")
            applied = g.get("applied_msg_per_s", {}).get("median")
            ack_us, apply_us = (g.get(k, {}).get("median") for k in ("ack_us_per_msg", "apply_us_per_msg"))
            split = f" ({ack_us:.0f} + {apply_us:.0f})" if ack_us is not None and apply_us is not None else ""
            lines.append(
                f"| {side} | {c} | {rate}{note} | {g['p50_ms']['median']:.2f} | {p99t} "
                f"| {'—' if applied is None else f'{applied:,.0f}'} "
                f"| {'—' if srv is None else f'{srv:.0f}'}{split} | {'—' if fc is None else f'{fc:.0f}'} "
                f"| {'—' if side == BASELINE or r is None else f'{r:.2f}×'} |")
    out = ["# refloop benchmark", "", f"Run {meta['started']}, command `{meta['command']}`, "
           f"{meta['rounds']} round(s), ~{meta['seconds']} s measured per run, warm-up {meta['warmup']}/conn.", "",
           *lines, "", "Targets:", "", "| target | measured | |", "|---|---|---|"]
    out += [f"| {t['target']} | {t['measured']} | {t['met']} |" for t in tg]
    if idle is not None:
        out += ["", f"Idle connections: {json.dumps(idle)}"]
    m = meta["machine"]
    out += ["", "Machine: " + f"nproc {m['nproc']}, {m['cpu_model']}, Python {m['python']}, SQLite {m['sqlite']}, "
            f"kernel {m['kernel']}, pinning: {m['pinning']}.", "",
            "Sides: " + "; ".join(f"`{s}` = {SIDE_DOC[s]}" for s in sides) + ".", "",
            "ACK msg/s = measured frames / measured seconds (closed loop, each connection waits for its ACK). "
            "Applied msg/s = all frames (warm-up included) / seconds from the first send until /readyz reports "
            "apply_lag_messages 0. "
            "Server µs/msg = server process CPU (all threads; PostgreSQL backends not included) up to lag 0, over "
            "warm-up + measured frames, split into the ACK path (everything but the projector) + the apply path "
            "(the projector thread's CPU, refloop_apply_cpu_seconds_total). "
            "Foreign CPU = busy CPU on the box used by neither the server nor the generator "
            "(other work on this shared VM), as % of all CPUs, median. Each refloop run used a fresh database, "
            "was killed with SIGKILL after the run, "
            "and every AA/CA control ID was looked up in `messages` (processed/ignored).", ""]
    return "\n".join(out)


# -- main ------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description="refloop benchmark (see bench/runner.py)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=3.0, help="measured phase per run")
    ap.add_argument("--quick", action="store_true", help="1 round, 1.5 s per run")
    ap.add_argument("--conns", default="1,4,16")
    ap.add_argument("--sides", default="python-hl7,bare,refloop-sqlite,refloop-sqlite-applied,refloop-pg,"
                                       "refloop-pg-applied",
                    help="also: refloop-sqlite-info (default INFO logging)")
    ap.add_argument("--no-info", action="store_true", help="skip the INFO-logging refloop side")
    ap.add_argument("--no-pg", action="store_true")
    ap.add_argument("--unpinned", action="store_true", help="no taskset: server and generator float")
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--ack-timeout", type=float, default=10.0)
    ap.add_argument("--idle", type=int, default=1000, help="idle connections for the RSS check (0: skip)")
    ap.add_argument("--time-limit", type=float, default=480.0, help="skip remaining runs after this many seconds")
    ap.add_argument("--no-store", action="store_true", help="skip the store stage (bench/store.py)")
    ap.add_argument("--store-sizes", default="100000,1000000", help="referrals per generated store")
    a = ap.parse_args(argv)
    if a.quick:
        a.rounds, a.seconds = 1, 1.5
    PINNED["on"] = not a.unpinned
    cs = [int(x) for x in a.conns.split(",") if x]
    sides = [s for s in a.sides.split(",") if s]
    unknown = [s for s in sides if s not in SIDE_DOC]
    if unknown:
        ap.error(f"unknown sides {unknown}; known: {', '.join(SIDE_DOC)}")
    if a.no_info and "refloop-sqlite-info" in sides:
        sides.remove("refloop-sqlite-info")
    notes: list[str] = []
    if any(s.startswith("refloop-pg") for s in sides):
        why = "--no-pg" if a.no_pg else pg_available()
        if why:
            sides = [s for s in sides if not s.startswith("refloop-pg")]
            notes.append(f"PostgreSQL side skipped ({why})")
            print(f"note: PostgreSQL side skipped ({why})")
    opts = Opts(seconds=a.seconds, warmup=a.warmup, max_seconds=max(4 * a.seconds, a.seconds + 5),
                ack_timeout=a.ack_timeout)
    started = datetime.now()
    t_begin = time.monotonic()
    base = Path(tempfile.mkdtemp(prefix="refloop-bench-"))
    records: list[dict[str, Any]] = []
    calib: dict[tuple[str, int], int] = {}
    total_runs = a.rounds * len(cs) * len(sides)
    k = 0
    try:
        for rnd in range(a.rounds):
            for c in cs:
                order = sides[rnd % len(sides):] + sides[: rnd % len(sides)]  # rotate: A B C, B C A, ...
                for side in order:
                    k += 1
                    if time.monotonic() - t_begin > a.time_limit:
                        print(f"[{k}/{total_runs}] {side} C={c}: skipped (time limit)", flush=True)
                        continue
                    count = calib.get((side, c), 0)
                    rec = run_once(side, c, count, opts, base)
                    rec["round"] = rnd + 1
                    records.append(rec)
                    if rnd == 0 and rec.get("status") == "OK" and rec.get("msgs"):
                        calib[(side, c)] = max(100, int(float(rec["msg_per_s"]) * a.seconds))
                    msg = (f"{rec.get('msg_per_s', 0):>9,.0f} msg/s  p50 {rec.get('p50_ms')} ms"
                           f"  p99 {rec.get('p99_ms')} ms"
                           f"  srv {rec.get('server_us_per_msg')} µs/msg  gen {rec.get('gen_cpu_pct')}%"
                           f"  foreign {rec.get('foreign_cpu_pct')}%"
                           if rec.get("msgs") else "")
                    ver = rec.get("verify")
                    vtxt = f"  journal {ver.get('acked')}/{ver.get('missing')} missing" if ver else ""
                    print(f"[{k}/{total_runs}] r{rnd + 1} {side:<20} C={c:<3} {rec['status']:<8} {msg}{vtxt}"
                          + (f"  {rec.get('error', '')[:200]}" if rec.get("error") else ""), flush=True)
        idle = None
        if a.idle:
            idle = idle_rss(a.idle, base)
            print(f"idle connections: {json.dumps(idle)}", flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    cells = summarise(records, sides, cs)
    tg = targets(cells, cs, idle)
    cmd = " ".join([".venv/bin/python", "-m", "bench", *(argv if argv is not None else sys.argv[1:])])
    meta = {"started": started.isoformat(timespec="seconds"), "command": cmd, "rounds": a.rounds,
            "seconds": a.seconds, "warmup": a.warmup, "machine": machine_info(), "notes": notes,
            "elapsed_s": round(time.monotonic() - t_begin, 1)}
    md = render(cells, sides, cs, tg, idle, meta)
    if notes:
        md += "\nNotes: " + "; ".join(notes) + "\n"
    store_doc = None
    if not a.no_store:
        from bench import store

        store_doc = store.run(tuple(int(x) for x in a.store_sizes.split(",") if x))
        md += "\n" + store.render(store_doc)
        meta["elapsed_s"] = round(time.monotonic() - t_begin, 1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = started.strftime("%Y%m%dT%H%M%S")
    ratios = {f"{s}|{c}": ratio(cells, s, c) for s in sides for c in cs if s != BASELINE}
    (RESULTS / f"{stamp}.json").write_text(json.dumps(
        {"meta": meta, "cells": cells, "ratios_vs_baseline": ratios, "targets": tg, "idle": idle,
         "runs": records, "store": store_doc}, indent=2))
    (RESULTS / "latest.md").write_text(md)
    print()
    print(md)
    print(f"written: bench/results/{stamp}.json, bench/results/latest.md  ({meta['elapsed_s']} s)")
    return 0 if not any("failure" in c and c["failure"].startswith("FAILURE") for c in cells.values()) else 1

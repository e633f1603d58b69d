"""The package as a site installs it: dependencies, licence, and the built wheel run from a fresh venv.

The wheel test builds from the repository's files, installs the wheel (not editable) into a new venv and
gives that venv exactly the distributions the wheel declares, with their own dependencies (linked from
this venv's site-packages, so no network is needed), and nothing else: no psycopg, no python-hl7, no
source tree. If refloop imported something it does not declare, `serve` would fail there.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
import urllib.request
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from refloop.config.example import render_example
from tests.samples import siu
from tests.utils import free_port

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def third_party_imports(optional: bool) -> set[str]:
    """Top-level modules refloop/ imports that are not its own or the standard library's.

    ``optional`` selects the imports guarded by ``except ImportError`` (uvloop), else the others.
    """
    found: set[str] = set()
    for path in (ROOT / "refloop").rglob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        guarded: set[int] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Try) and any(
                isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError")
                for h in node.handlers
            ):
                guarded.update(id(n) for stmt in node.body for n in ast.walk(stmt))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            if (id(node) in guarded) != optional:
                continue
            for name in names:
                top = name.split(".")[0]
                if top != "refloop" and top not in sys.stdlib_module_names:
                    found.add(top)
    return found


def distributions_of(modules: set[str]) -> set[str]:
    mapping = metadata.packages_distributions()
    return {canonicalize_name(d) for m in modules for d in mapping.get(m, [m])}


def declared(reqs: list[str]) -> set[str]:
    return {canonicalize_name(Requirement(r).name) for r in reqs}


def test_runtime_dependencies_are_exactly_what_refloop_imports() -> None:
    assert declared(PYPROJECT["project"]["dependencies"]) == distributions_of(third_party_imports(optional=False))


def test_optional_imports_are_in_an_extra_and_drivers_in_postgres() -> None:
    extras = PYPROJECT["project"]["optional-dependencies"]
    optional_extras = declared(extras["fast"]) | declared(extras["holidays"])
    assert distributions_of(third_party_imports(optional=True)) <= optional_extras
    assert declared(extras["postgres"]) == {"psycopg"}
    dev = declared(extras["dev"])
    assert {"refloop", "hl7", "aiosmtpd", "trustme", "hypothesis"} <= dev  # refloop[postgres]: CI's PostgreSQL
    assert "hl7" not in declared(PYPROJECT["project"]["dependencies"])


def test_license_file_is_apache_2() -> None:
    text = (ROOT / "LICENSE").read_text()
    assert PYPROJECT["project"]["license"] == "Apache-2.0"
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
    assert len(text.splitlines()) > 150  # the whole text, not a pointer to it


# -- the wheel -------------------------------------------------------------------------------------
def _closure(requirements: list[str]) -> set[str]:
    """Distributions (installed here) needed by ``requirements`` with no extras, transitively."""
    env = {"extra": ""}
    todo = [Requirement(r) for r in requirements]
    seen: set[str] = set()
    while todo:
        req = todo.pop()
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        name = canonicalize_name(req.name)
        if name in seen:
            continue
        seen.add(name)
        todo.extend(Requirement(r) for r in metadata.distribution(req.name).requires or [])
    return seen


def _link_distributions(names: set[str], target: Path) -> None:
    """Symlink each distribution's top-level files and its .dist-info into ``target``."""
    target.mkdir()
    for name in names:
        dist = metadata.distribution(name)
        base = Path(str(dist.locate_file("")))
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops:
            src = base / top
            if src.exists() and not (target / top).exists() and not top.endswith(".pth") and top != "__pycache__":
                (target / top).symlink_to(src)


def _source_tree(dest: Path) -> Path:
    """The files git knows (tracked, or new and not ignored), copied: the build sees what a clone has."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                         capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, out):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    if shutil.which("git") is None:  # a source tarball without git: CI always has it, and must not skip
        if os.environ.get("CI"):
            pytest.fail("git is needed to list the repository's files (CI must build the wheel)")
        pytest.skip("git is needed to list the repository's files")
    tmp = tmp_path_factory.mktemp("wheel")
    src = _source_tree(tmp / "src")
    dist = tmp / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "-q", "-w", str(dist), str(src)], check=True, timeout=300, cwd=tmp)
    [wheel] = dist.glob("refloop-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", "--no-index",
                    str(wheel)], check=True, timeout=300)
    requires = metadata.Distribution.at(_dist_info(venv)).requires or []
    _link_distributions(_closure(requires), tmp / "deps")
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "refloop-test-deps.pth").write_text(str(tmp / "deps") + "\n")
    yield venv


def _dist_info(venv: Path) -> Path:
    [info] = venv.glob("lib/python*/site-packages/refloop-*.dist-info")
    return info


def run(venv: Path, *args: str, env: dict[str, str] | None = None,
        cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(cwd or venv)}
    return subprocess.run([str(venv / "bin" / "refloop"), *args], env={**base, **(env or {})}, cwd=cwd or venv,
                          capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.slow
def test_wheel_has_licence_and_package_data(fresh_venv: Path) -> None:
    info = _dist_info(fresh_venv)
    meta = (info / "METADATA").read_text()
    assert "License-Expression: Apache-2.0" in meta
    assert (info / "licenses" / "LICENSE").is_file()
    reqs = {canonicalize_name(Requirement(r).name) for r in re.findall(r"(?m)^Requires-Dist: (.+)$", meta)
            if "extra ==" not in r}
    assert "psycopg" not in reqs and "hl7" not in reqs
    py = fresh_venv / "bin" / "python"
    probe = subprocess.run([str(py), "-c", "import refloop, importlib.util; print(refloop.__file__); "
                            "print(importlib.util.find_spec('hl7'), importlib.util.find_spec('psycopg'))"],
                           capture_output=True, text=True, check=True, cwd=fresh_venv, env={})
    where, missing = probe.stdout.splitlines()
    assert where.startswith(str(fresh_venv)) and "site-packages" in where, where
    assert missing == "None None"


@pytest.mark.slow
def test_config_commands_from_the_wheel(fresh_venv: Path, tmp_path: Path) -> None:
    example = run(fresh_venv, "config", "example")
    assert example.returncode == 0, example.stderr
    assert example.stdout == render_example()
    units = tmp_path / "units"
    units.mkdir()
    wrote = run(fresh_venv, "config", "units", str(units))
    assert wrote.returncode == 0, wrote.stderr
    service = (units / "refloop.service").read_text()
    assert f"ExecStart={fresh_venv / 'bin' / 'refloop'} serve" in service
    assert "RestartPreventExitStatus=2" in service
    assert (units / "refloop.socket").read_text() == (ROOT / "refloop" / "units" / "refloop.socket").read_text()
    again = run(fresh_venv, "config", "units", str(units))
    assert again.returncode == 1 and "--force" in again.stderr


@pytest.mark.slow
def test_postgres_url_without_the_driver_names_the_extra(fresh_venv: Path) -> None:
    proc = run(fresh_venv, "check-config", env={"REFLOOP_DATABASE_URL": "postgresql://refloop@db.invalid/refloop"})
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert "refloop[postgres]" in proc.stderr


@pytest.mark.slow
def test_db_upgrade_serve_send_readyz_from_the_wheel(fresh_venv: Path, tmp_path: Path) -> None:
    mllp_port, http_port = free_port(), free_port()
    env = {"REFLOOP_DATABASE_URL": f"sqlite:///{tmp_path / 'refloop.db'}", "REFLOOP_MLLP_PORT": str(mllp_port),
           "REFLOOP_HTTP_PORT": str(http_port)}
    upgraded = run(fresh_venv, "db", "upgrade", env=env, cwd=tmp_path)
    assert upgraded.returncode == 0, upgraded.stderr
    assert upgraded.stdout.startswith("database at revision")
    log = (tmp_path / "serve.log").open("wb")
    serve = subprocess.Popen([str(fresh_venv / "bin" / "refloop"), "serve"], cwd=tmp_path, stdout=log,
                             stderr=subprocess.STDOUT, env={"PATH": os.environ.get("PATH", ""), **env})
    try:
        status = _wait_ready(http_port, serve, tmp_path / "serve.log")
        assert status == 200
        message = tmp_path / "siu.hl7"
        message.write_text(siu().replace("\r", "\n"))
        sent = run(fresh_venv, "send", "--port", str(mllp_port), str(message), cwd=tmp_path)
        assert sent.returncode == 0, sent.stdout + sent.stderr
        assert "MSA|AA|" in sent.stdout
    finally:
        serve.terminate()
        assert serve.wait(30) == 0
        log.close()


def _wait_ready(http_port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 60.0) -> int:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/readyz", timeout=2) as resp:
                return int(resp.status)
        except OSError:
            time.sleep(0.1)
    raise AssertionError("serve from the wheel never became ready: " + log.read_text()[-3000:])


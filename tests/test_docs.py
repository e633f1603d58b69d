"""Documentation that cannot rot: every setting is in the example config and docs/configuration.md; every
metric, HTTP route and command the docs name exists in the code (and every metric and command is
documented); every relative link points at a file in the repository; no module cites a document the
repository does not contain."""

from __future__ import annotations

import re
from pathlib import Path

from refloop.config.example import documented_fields, render_example
from refloop.config.settings import SECTIONS, SenderProfile

ROOT = Path(__file__).resolve().parent.parent


def all_keys() -> list[str]:
    keys = [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in documented_fields(cls)]
    keys += [f"profiles.*.{f.name}" for f in documented_fields(SenderProfile) if f.name != "name"]
    return keys


def test_example_config_is_current() -> None:
    """systemd/refloop.toml.example equals what the settings classes render (regenerate if not)."""
    shipped = (ROOT / "systemd" / "refloop.toml.example").read_text()
    assert shipped == render_example(), (
        "run: .venv/bin/python -c \"from refloop.config.example import render_example; "
        "open('systemd/refloop.toml.example','w').write(render_example())\""
    )


def test_example_names_every_setting() -> None:
    """Every setting appears in the example config with its default."""
    shipped = (ROOT / "systemd" / "refloop.toml.example").read_text()
    for key in all_keys():
        assert f"# {key.rsplit('.', 1)[1]} = " in shipped, key


CONFIG_PAGE = ROOT / "docs" / "configuration.md"


def test_configuration_page_documents_every_setting() -> None:
    """docs/configuration.md names every setting."""
    page = CONFIG_PAGE.read_text()
    missing = [k for k in all_keys() if f"`{k}`" not in page]
    assert not missing, f"docs/configuration.md lacks: {missing}"


def test_configuration_reference_is_current() -> None:
    """The configuration table is exactly what the settings classes render."""
    from refloop.config.reference import END, START, render_reference

    block = CONFIG_PAGE.read_text().split(START, 1)[1].split(END, 1)[0].strip()
    assert block == render_reference(), "run: .venv/bin/python -m refloop.config.reference docs/configuration.md"


def test_example_profiles_load() -> None:
    """The shipped example sender profiles are valid configuration."""
    from refloop.config import load_settings

    s = load_settings(ROOT / "systemd" / "profiles.example.toml", {})
    names = {p.name for p in s.profiles}
    assert {"epic-sched", "threesixtyx", "ortho-sched", "cardio-docs", "default"} <= names
    assert s.profile_for("EPIC", "MAINCLINIC").link_fields == ("PV1-19.1",)
    assert s.profile_for("EHR360X", "X").order_mode == "referral"


# -- the docs against the code ----------------------------------------------------------------------
def doc_files() -> list[Path]:
    """Every Markdown file of the repository (not the venv, not caches)."""
    skip = {".venv", ".git", "node_modules", ".pytest_cache", ".mypy_cache", ".ruff_cache", ".hypothesis"}
    return sorted(p for p in ROOT.rglob("*.md")
                  if not skip.intersection(p.relative_to(ROOT).parts) and not p.name.endswith(".egg-info")
                  and "egg-info" not in str(p))


def docs_text() -> str:
    return "\n".join(p.read_text() for p in doc_files())


def exported_metric_names() -> set[str]:
    """Every sample name refloop's registry can export, histogram and counter suffixes included."""
    from refloop.daemon.metrics import Metrics

    m = Metrics()
    m.certificate_expiry()
    names: set[str] = set()
    for fam in m.registry.collect():
        names.add(fam.name)
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "info": ("_info",)}
        names.update(fam.name + s for s in suffixes.get(fam.type, ()))
        names.update(s.name for s in fam.samples)
    return names


def test_documented_metrics_exist() -> None:
    known = exported_metric_names()
    named = set(re.findall(r"`((?:refloop|process|python)_[a-z0-9_]*[a-z0-9])(?:\{[^`]*\})?`", docs_text()))
    assert "refloop_acks_total" in named  # the pattern finds the metric tables
    unknown = sorted(named - known)
    assert not unknown, f"documented but not exported: {unknown}"


def test_every_refloop_metric_is_documented() -> None:
    from refloop.daemon.metrics import Metrics

    ops = (ROOT / "docs" / "operations.md").read_text()
    families = {f.name for f in Metrics().registry.collect() if f.name.startswith("refloop_")}
    missing = sorted(f for f in families if f not in ops)
    assert not missing, f"docs/operations.md does not list: {missing}"


def http_routes() -> set[tuple[str, str]]:
    """(METHOD, path pattern) of every route the daemon's HTTP side registers (web.get/web.post/...)."""
    routes: set[tuple[str, str]] = set()
    for path in (ROOT / "refloop" / "daemon").glob("*.py"):
        for method, route in re.findall(r"web\.(get|post|put|patch|delete)\(\s*\"([^\"]+)\"", path.read_text()):
            routes.add((method.upper(), route))
    return routes


def _shape(path: str) -> str:
    return re.sub(r"\{[^}]*\}", "{}", path.split("?", 1)[0]).rstrip("/") or "/"


def test_documented_http_routes_exist() -> None:
    routes = http_routes()
    assert ("GET", "/readyz") in routes  # the scanner above works
    shapes = {_shape(r) for _, r in routes}
    by_method = {(m, _shape(r)) for m, r in routes}
    text = docs_text()
    bad = []
    for method, path in re.findall(r"`(GET|POST|PUT|PATCH|DELETE) (/[^`\s]*)", text):
        if (method, _shape(path)) not in by_method:
            bad.append(f"{method} {path}")
    for path in re.findall(r"`(/(?:api|healthz|readyz|metrics|dashboard|referrals|login)[^`\s]*)`", text):
        if _shape(path) not in shapes:
            bad.append(path)
    assert not bad, f"documented routes the daemon does not serve: {sorted(set(bad))}"


def cli_commands() -> set[str]:
    import argparse

    from refloop.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return set(sub.choices)


def test_documented_commands_exist_and_readme_lists_every_command() -> None:
    commands = cli_commands()
    named = set(re.findall(r"`refloop ([a-z][a-z-]*)", docs_text()))
    assert not named - commands, f"documented commands that do not exist: {sorted(named - commands)}"
    readme = (ROOT / "README.md").read_text()
    missing = sorted(c for c in commands if f"`refloop {c}" not in readme)
    assert not missing, f"README's command table lacks: {missing}"


def test_links_point_at_files_in_the_repository() -> None:
    bad = []
    for page in doc_files():
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            path = (page.parent / target.split("#", 1)[0]).resolve()
            if not path.exists() or (ROOT not in path.parents and path != ROOT):
                bad.append(f"{page.relative_to(ROOT)}: {target}")
    assert not bad, bad


#: Documents that live outside the repository (research notes); citing them from the code or the docs
#: sends a reader to something they cannot open.
FOREIGN_DOCUMENTS = ("PERF.md", "REFERRALS.md", "HL7-REFERENCE", "OPS-REFERENCE", "ARCHITECTURE-REVIEW",
                     "HL7-SAMPLES", "DEVELOPERS.md", "STYLE.md", "../shared", "/work/shared")


def test_nothing_cites_documents_the_repository_does_not_contain() -> None:
    files = [*doc_files(), *(ROOT / "refloop").rglob("*.py"), *(ROOT / "bench").rglob("*.py"),
             *(p for p in (ROOT / "tests").rglob("*.py") if p.name != "test_docs.py"),
             *(ROOT / "refloop" / "units").iterdir(), ROOT / "Makefile"]
    hits = [f"{p.relative_to(ROOT)}: {name}" for p in files if p.is_file() for name in FOREIGN_DOCUMENTS
            if name in p.read_text(errors="replace")]
    assert not hits, hits


def test_readme_stays_short() -> None:
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250

"""Documentation that cannot rot: every setting is in the example config and the README reference."""

from __future__ import annotations

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


def test_readme_documents_every_setting() -> None:
    """The README's configuration reference names every setting."""
    readme = (ROOT / "README.md").read_text()
    missing = [k for k in all_keys() if f"`{k}`" not in readme]
    assert not missing, f"README configuration reference lacks: {missing}"


def test_readme_reference_is_current() -> None:
    """The README's configuration table is exactly what the settings classes render."""
    from refloop.config.reference import END, START, render_reference

    readme = (ROOT / "README.md").read_text()
    block = readme.split(START, 1)[1].split(END, 1)[0].strip()
    assert block == render_reference(), "run: .venv/bin/python -m refloop.config.reference README.md"


def test_example_profiles_load() -> None:
    """The shipped example sender profiles are valid configuration."""
    from refloop.config import load_settings

    s = load_settings(ROOT / "systemd" / "profiles.example.toml", {})
    names = {p.name for p in s.profiles}
    assert {"epic-sched", "threesixtyx", "ortho-sched", "cardio-docs", "default"} <= names
    assert s.profile_for("EPIC", "MAINCLINIC").link_fields == ("PV1-19.1",)
    assert s.profile_for("EHR360X", "X").order_mode == "referral"

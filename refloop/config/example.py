"""Render the example configuration (every setting, its default, its reason) from the settings classes,
so the shipped `systemd/refloop.toml.example` cannot drift from the code (a test compares them)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from refloop.config.loader import env_name
from refloop.config.settings import SECTIONS, SenderProfile


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, tuple):
        return "[" + ", ".join(json.dumps(x) for x in v) + "]"
    return json.dumps(v)


def documented_fields(cls: type) -> list[dataclasses.Field[Any]]:
    return [f for f in dataclasses.fields(cls) if "doc" in f.metadata]


def render_example() -> str:
    out = [
        "# refloop configuration: every setting with its default and why.",
        "# Values shown are the defaults; uncomment to change. Environment variables",
        "# REFLOOP_<SECTION>_<KEY> override this file (shown beside each key).",
        "",
    ]
    for section, cls in SECTIONS.items():
        out.append(f"[{section}]")
        for f in documented_fields(cls):
            out.append(f"# {f.metadata['doc']}  (env {env_name(section, f.name)})")
            out.append(f"# {f.name} = {_toml_value(f.default)}")
        out.append("")
    out += [
        "# Sender profiles, matched on MSH-3/MSH-4 (most specific wins); [profiles.default] applies",
        "# to every other sender. Profiles are read from this file only (and re-read on SIGHUP).",
        "[profiles.default]",
    ]
    for f in documented_fields(SenderProfile):
        if f.name == "name":
            continue
        out.append(f"# {f.metadata['doc']}")
        out.append(f"# {f.name} = {_toml_value(f.default)}")
    out += [
        "",
        "# An example of a named profile (uncomment and adapt):",
        "# [profiles.epic-sched]",
        '# sending_application = "EPIC"',
        '# sending_facility = "MAINCLINIC"',
        '# encoding = "utf-8"',
        "",
    ]
    return "\n".join(out)

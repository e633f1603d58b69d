"""Render the configuration reference table (docs/configuration.md) from the settings classes.

`python -m refloop.config.reference docs/configuration.md` rewrites the block between the two markers; the
docs test fails when the page is stale, so the reference can never drift from the code.
"""

from __future__ import annotations

import sys
from pathlib import Path

from refloop.config.example import _toml_value, documented_fields
from refloop.config.loader import env_name
from refloop.config.settings import SECTIONS, SenderProfile

START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render_reference() -> str:
    out = ["| setting | default | environment | why |", "|---|---|---|---|"]
    for section, cls in SECTIONS.items():
        for f in documented_fields(cls):
            default = _toml_value(f.default)
            out.append(f"| `{section}.{f.name}` | `{_cell(default)}` | `{env_name(section, f.name)}` | "
                       f"{_cell(f.metadata['doc'])} |")
    out += ["", "Sender profiles (`[profiles.NAME]`; `default` applies to every sender no other profile matches; "
            "file only, re-read on SIGHUP):", "", "| setting | default | why |", "|---|---|---|"]
    for f in documented_fields(SenderProfile):
        if f.name == "name":
            continue
        out.append(f"| `profiles.*.{f.name}` | `{_cell(_toml_value(f.default))}` | {_cell(f.metadata['doc'])} |")
    return "\n".join(out)


def update_page(path: Path) -> bool:
    text = path.read_text()
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{START}\n{render_reference()}\n{END}{tail}"
    if new != text:
        path.write_text(new)
        return True
    return False


if __name__ == "__main__":  # pragma: no cover
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/configuration.md")
    print(f"{target} updated" if update_page(target) else f"{target} already current")

"""`refloop config example|units`: what an installed wheel needs to be set up, from the package itself.

The example configuration is rendered from the settings classes (the same text as the repository's
``systemd/refloop.toml.example``, which a test keeps equal), and the systemd units are package data
(``refloop/units/``), so a site that installed only the wheel never needs the source tree.
"""

from __future__ import annotations

import argparse
import re
import sys
from importlib import resources
from pathlib import Path

from refloop.cli_common import EXIT_FAIL, EXIT_OK
from refloop.config import ConfigError
from refloop.config.example import render_example

UNIT_NAMES = ("refloop.service", "refloop.socket")


def unit_text(name: str) -> str:
    """The shipped unit file ``name`` as installed with the package."""
    return (resources.files("refloop") / "units" / name).read_text(encoding="utf-8")


def default_executable() -> str:
    """The ``refloop`` script beside the running interpreter (the venv's bin/), if there is one."""
    candidate = Path(sys.executable).parent / "refloop"
    return str(candidate) if candidate.exists() else "/opt/refloop/.venv/bin/refloop"


def render_unit(name: str, executable: str) -> str:
    """The unit with ``ExecStart=`` pointing at ``executable`` (the service; the socket is unchanged)."""
    text = unit_text(name)
    if name.endswith(".service"):
        text = re.sub(r"(?m)^ExecStart=\S+", lambda _m: f"ExecStart={executable}", text, count=1)
    return text


def cmd_example(args: argparse.Namespace) -> int:
    sys.stdout.write(render_example())
    return EXIT_OK


def cmd_units(args: argparse.Namespace) -> int:
    target = Path(args.dir)
    if not target.is_dir():
        raise ConfigError("DIR", f"not a directory: {target}")
    existing = [n for n in UNIT_NAMES if (target / n).exists()]
    if existing and not args.force:
        print(f"refloop config units: {', '.join(existing)} already in {target} (--force replaces them)",
              file=sys.stderr)
        return EXIT_FAIL
    for name in UNIT_NAMES:
        (target / name).write_text(render_unit(name, args.bin), encoding="utf-8")
        print(target / name)
    return EXIT_OK


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sp = sub.add_parser("config", help="print the example configuration or write the systemd units",
                        description="Set-up files shipped inside the package (no source tree needed).")
    csub = sp.add_subparsers(dest="config_command", required=True, metavar="{example,units}")
    ex = csub.add_parser("example", help="print the example configuration (every setting, default, reason)")
    ex.set_defaults(func=cmd_example)
    un = csub.add_parser("units", help="write refloop.service and refloop.socket into DIR")
    un.add_argument("dir", metavar="DIR", help="directory to write the units to, e.g. /etc/systemd/system")
    un.add_argument("--bin", default=default_executable(), metavar="PATH",
                    help="refloop executable for ExecStart= (default: the one running this command)")
    un.add_argument("--force", action="store_true", help="replace unit files that already exist in DIR")
    un.set_defaults(func=cmd_units)

"""The command line as an operator meets it: help on every option, exit codes in the help, completion."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from refloop.cli import build_parser, main

REPO = Path(__file__).resolve().parents[1]


def walk(parser: argparse.ArgumentParser, path: tuple[str, ...] = ("refloop",)) -> Iterator[
        tuple[tuple[str, ...], argparse.Action, argparse.ArgumentParser]]:
    for action in parser._actions:
        yield path, action, parser
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from walk(sub, (*path, name))


def test_every_option_and_command_has_help() -> None:
    missing = []
    for path, action, _ in walk(build_parser()):
        if isinstance(action, argparse._SubParsersAction):
            helped = {a.dest for a in action._choices_actions if a.help}
            missing += [" ".join((*path, name)) for name in action.choices if name not in helped]
        elif not action.help or action.help == argparse.SUPPRESS:
            missing.append(f"{' '.join(path)} {'/'.join(action.option_strings) or action.dest}")
    assert not missing, missing


def test_top_level_help_is_for_an_operator(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "MLLP" in out and "referral" in out
    for line in ("0  success", "1  the operation failed", "2  configuration or usage error"):
        assert line in out
    assert "Exit codes" not in out.split("\n")[2]  # not the module docstring


def test_usage_error_is_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["send"])
    assert done.value.code == 2


@pytest.mark.parametrize("shell", ["bash", "zsh"])
def test_completion_script(shell: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["completion", shell]) == 0
    out = capsys.readouterr().out
    assert "refloop" in out and "_ARGCOMPLETE" in out


def test_completion_completes_subcommands(tmp_path: Path) -> None:
    """What the bash hook does: run refloop with _ARGCOMPLETE set; candidates come back on fd 8."""
    line = "refloop con"
    env = {**os.environ, "_ARGCOMPLETE": "1", "_ARGCOMPLETE_SHELL": "bash", "COMP_LINE": line,
           "COMP_POINT": str(len(line)), "_ARGCOMPLETE_IFS": "\n", "PYTHONPATH": str(REPO)}
    script = f'"{sys.executable}" -c "import sys; from refloop.cli import main; sys.exit(main())" 8>&1'
    proc = subprocess.run(["bash", "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    assert [c.strip() for c in proc.stdout.split("\n") if c.strip()] == ["config"]


def test_config_units_and_example_in_tree(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from refloop.config.example import render_example

    assert main(["config", "example"]) == 0
    assert capsys.readouterr().out == render_example()
    assert main(["config", "units", str(tmp_path), "--bin", "/usr/local/bin/refloop"]) == 0
    assert "ExecStart=/usr/local/bin/refloop serve --config /etc/refloop/refloop.toml" in (
        tmp_path / "refloop.service").read_text()
    assert main(["config", "units", str(tmp_path / "absent")]) == 2


def test_send_over_tls_with_a_client_certificate(sqlite_url: str, certs: dict[str, str], ca: Any,
                                                 tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`refloop send --ca-file --cert --key` through the MLLP client to a daemon that requires mTLS."""
    from tests.samples import siu
    from tests.test_tls import tls_settings
    from tests.utils import running_daemon

    client = ca.issue_cert("engine.test.invalid")
    cert, key = tmp_path / "client.pem", tmp_path / "client.key"
    client.cert_chain_pems[0].write_to_path(str(cert))
    client.private_key_pem.write_to_path(str(key))
    message = tmp_path / "m.hl7"
    message.write_text(siu())
    with running_daemon(tls_settings(sqlite_url, certs, mtls=True)) as d:
        base = ["send", "--port", str(d.port), "--ca-file", certs["ca"]]
        assert main([*base, "--cert", str(cert), "--key", str(key), str(message)]) == 0
        assert "MSA|AA|" in capsys.readouterr().out
        assert main([*base, "--cert", str(cert), str(message)]) == 2  # --cert without --key: usage
        assert main([*base, str(message)]) == 1  # no client certificate: refused, no ACK

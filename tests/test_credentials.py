"""Secrets from systemd credentials ($CREDENTIALS_DIRECTORY), with the environment still winning."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from refloop.config import ConfigError, load_settings
from refloop.config.credentials import SECRET_SETTINGS

REPO = Path(__file__).resolve().parents[1]


def creds(tmp_path: Path, **values: str) -> str:
    d = tmp_path / "credentials"
    d.mkdir()
    for name, value in values.items():
        (d / name).write_text(value)
    return str(d)


def test_secrets_come_from_the_credentials_directory(tmp_path: Path) -> None:
    d = creds(tmp_path, http_token="tok-from-cred\n", notify_webhook_secret="hook\n",
              notify_smtp_password="pw with trailing space \n")
    s = load_settings(None, {"CREDENTIALS_DIRECTORY": d})
    assert s.http.token == "tok-from-cred"  # one trailing newline dropped (echo writes one)
    assert s.notify.webhook_secret == "hook"
    assert s.notify.smtp_password == "pw with trailing space "


def test_environment_beats_credential_and_credential_beats_file(tmp_path: Path) -> None:
    d = creds(tmp_path, http_token="from-cred", notify_webhook_secret="cred-secret")
    toml = tmp_path / "refloop.toml"
    toml.write_text('[http]\ntoken = "from-file"\n[notify]\nwebhook_secret = "file-secret"\n')
    s = load_settings(toml, {"CREDENTIALS_DIRECTORY": d, "REFLOOP_HTTP_TOKEN": "from-env"})
    assert s.http.token == "from-env"
    assert s.notify.webhook_secret == "cred-secret"


def test_no_directory_or_missing_files_change_nothing(tmp_path: Path) -> None:
    assert load_settings(None, {}).http.token == ""
    assert load_settings(None, {"CREDENTIALS_DIRECTORY": str(tmp_path / "absent")}).http.token == ""
    assert load_settings(None, {"CREDENTIALS_DIRECTORY": creds(tmp_path)}).http.token == ""


def test_credential_database_url_is_validated_like_any_other(tmp_path: Path) -> None:
    d = creds(tmp_path, database_url="mysql://nope")
    with pytest.raises(ConfigError) as err:
        load_settings(None, {"CREDENTIALS_DIRECTORY": d})
    assert "nope" not in str(err.value)  # the value may hold a password: never echoed


def test_every_secret_setting_exists() -> None:
    s = load_settings(None, {})
    for section, key in SECRET_SETTINGS:
        assert hasattr(getattr(s, section), key), (section, key)


def test_check_config_reads_the_token_credential(tmp_path: Path) -> None:
    """A non-loopback HTTP host needs a token: missing -> exit 2; supplied as a credential -> ok."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("REFLOOP_") and k != "CREDENTIALS_DIRECTORY"}
    env.update({"PYTHONPATH": str(REPO), "REFLOOP_HTTP_HOST": "0.0.0.0"})

    def run(extra: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "refloop", "check-config"], env={**env, **extra}, cwd=tmp_path,
                              capture_output=True, text=True, timeout=60, check=False)

    bad = run({})
    assert bad.returncode == 2 and "http.token" in bad.stderr
    good = run({"CREDENTIALS_DIRECTORY": creds(tmp_path, http_token="s3cret")})
    assert good.returncode == 0, good.stderr
    assert "s3cret" not in good.stdout + good.stderr


def test_unit_and_docs_name_the_credentials_the_code_reads() -> None:
    """The LoadCredential= examples in the unit and in docs/operations.md use the IDs refloop looks for."""
    import re

    from refloop.config.credentials import credential_name

    wanted = {credential_name(section, key) for section, key in SECRET_SETTINGS}
    unit = (REPO / "refloop" / "units" / "refloop.service").read_text()
    ops = (REPO / "docs" / "operations.md").read_text()
    for text in (unit, ops):
        ids = set(re.findall(r"LoadCredential=([a-z_]+):", text))
        assert ids and ids <= wanted, ids
    assert set(re.findall(r"LoadCredential=([a-z_]+):", ops)) == wanted

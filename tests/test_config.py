"""Settings: TOML plus REFLOOP_* environment, validated once, errors naming the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from refloop.config import ConfigError, load_settings


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "refloop.toml"
    p.write_text(text)
    return p


def test_defaults_bind_loopback(tmp_path: Path) -> None:
    """Without a file, MLLP and HTTP bind loopback on 2575/8575 and SQLite lives under ./var."""
    s = load_settings(None, {})
    assert (s.mllp.host, s.mllp.port, s.http.host, s.http.port) == ("127.0.0.1", 2575, "127.0.0.1", 8575)
    assert s.database.url.startswith("sqlite:///") and s.database.url.endswith("var/refloop.db")


def test_state_directory_under_systemd() -> None:
    """Under systemd the SQLite file goes to $STATE_DIRECTORY."""
    s = load_settings(None, {"STATE_DIRECTORY": "/var/lib/refloop"})
    assert s.database.url == "sqlite:////var/lib/refloop/refloop.db"


def test_env_overrides_file(tmp_path: Path) -> None:
    """REFLOOP_<SECTION>_<KEY> beats the TOML file."""
    p = write(tmp_path, "[mllp]\nport = 3000\nhost = '0.0.0.0'\n[http]\nport = 9000\n")
    s = load_settings(p, {"REFLOOP_MLLP_PORT": "4000", "REFLOOP_HTTP_HOST": "127.0.0.2",
                          "REFLOOP_DATABASE_URL": "postgresql+psycopg://u@h/db"})
    assert (s.mllp.port, s.mllp.host, s.http.port, s.http.host) == (4000, "0.0.0.0", 9000, "127.0.0.2")
    assert s.database.url == "postgresql+psycopg://u@h/db"


@pytest.mark.parametrize(
    ("text", "env", "key"),
    [
        ("[mllp]\nport = 'x'\n", {}, "mllp.port"),
        ("[mllp]\nport = 70000\n", {}, "mllp.port"),
        ("", {"REFLOOP_MLLP_PORT": "abc"}, "REFLOOP_MLLP_PORT (mllp.port)"),
        ("[mllp]\nportt = 1\n", {}, "mllp.portt"),
        ("[mllpp]\n", {}, "mllpp"),
        ("[mllp]\nidle_timeout = -1\n", {}, "mllp.idle_timeout"),
        ("[mllp]\nunsupported = 'maybe'\n", {}, "mllp.unsupported"),
        ("[database]\nurl = 'mysql://x'\n", {}, "database.url"),
        ("[database]\nurl = 'sqlite:///x.db'\nwriters = 2\n", {}, "database.writers"),
        ("[profiles.epic]\nencoding = 'nope'\nsending_application='E'\n", {}, "profiles.epic.encoding"),
        ("[profiles.epic]\nencoding = 'utf-8'\n", {}, "profiles.epic"),
        ("[mllp\n", {}, "--config"),
    ],
)
def test_bad_setting_names_key(tmp_path: Path, text: str, env: dict[str, str], key: str) -> None:
    """A bad setting raises ConfigError whose key says exactly what to fix."""
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_settings(p, env)
    assert info.value.key == key


def test_profiles_match_most_specific(tmp_path: Path) -> None:
    """Sender profiles match MSH-3/MSH-4 case-insensitively; the most specific wins, else default."""
    p = write(tmp_path, """
[profiles.default]
encoding = "utf-8"
[profiles.epic]
sending_application = "EPIC"
[profiles.epic-main]
sending_application = "EPIC"
sending_facility = "MAIN"
[profiles.lab]
sending_facility = "LAB"
""")
    s = load_settings(p, {})
    assert s.profile_for("epic", "other").name == "epic"
    assert s.profile_for("EPIC", "main").name == "epic-main"
    assert s.profile_for("X", "LAB").name == "lab"
    assert s.profile_for("X", "Y").name == "default"
    assert s.default_profile.encoding == "utf-8"


def test_check_config_cli_exit_codes(tmp_path: Path) -> None:
    """`refloop check-config` exits 0 on a good file and 2 with one line naming the key on a bad one."""
    good = write(tmp_path, "[mllp]\nport = 2600\n")
    r = subprocess.run([sys.executable, "-m", "refloop", "check-config", "--config", str(good)],
                       capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("[mllp]\nmax_connections = 0\n")
    r = subprocess.run([sys.executable, "-m", "refloop", "check-config", "--config", str(bad)],
                       capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["refloop: configuration error: mllp.max_connections: must be at least 1"]


def test_serve_refuses_bad_config(tmp_path: Path) -> None:
    """`refloop serve` with a bad setting stops before binding anything, exit code 2."""
    r = subprocess.run([sys.executable, "-m", "refloop", "serve"], capture_output=True, text=True,
                       env={"PATH": "/usr/bin:/bin", "REFLOOP_HTTP_PORT": "99999"}, cwd=tmp_path, timeout=60)
    assert r.returncode == 2
    assert "REFLOOP_HTTP_PORT (http.port)" in r.stderr

"""Build :class:`Settings` from one TOML file plus ``REFLOOP_<SECTION>_<KEY>`` environment overrides.

The environment is injected (``environ=``) so tests never touch ``os.environ``. Every failure raises
:class:`ConfigError` naming the TOML key or the variable, because an operator reading one log line at
3 a.m. must know exactly what to fix; ``cli.py`` turns it into exit code 2.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import tomllib
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from refloop.config.credentials import read_credentials
from refloop.config.settings import (
    SECTIONS,
    DatabaseSettings,
    SenderProfile,
    Settings,
    default_database_url,
)

ENV_PREFIX = "REFLOOP_"
_BOOLS = {"1", "true", "yes", "on", "0", "false", "no", "off"}


class ConfigError(Exception):
    """A setting is wrong; the message names the key and the reason, never a secret value."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason


def env_name(section: str, key: str) -> str:
    return f"{ENV_PREFIX}{section}_{key}".upper()


def _convert(value: Any, hint: Any, key: str, from_env: bool) -> Any:
    """Coerce a TOML value (or an environment string) to the field's declared type."""
    origin = typing.get_origin(hint)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if from_env and isinstance(value, str) and value.lower() in _BOOLS:
            return value.lower() in {"1", "true", "yes", "on"}
        raise ConfigError(key, f"must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool):
            raise ConfigError(key, f"must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if from_env and isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise ConfigError(key, f"must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if from_env and isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise ConfigError(key, f"must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(key, f"must be a string, got {value!r}")
    if origin is tuple:
        if from_env and isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise ConfigError(key, f"must be a list of strings, got {value!r}")
    raise ConfigError(key, f"unsupported setting type {hint!r}")  # pragma: no cover


def _build(cls: type, values: Mapping[str, Any], where: str, env: Mapping[str, str] | None,
           section: str | None) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if f.init and "doc" in f.metadata}
    for k in values:
        if k not in known:
            raise ConfigError(f"{where}.{k}", f"unknown setting (known: {', '.join(sorted(known))})")
    kwargs: dict[str, Any] = {}
    for name, f in known.items():
        key = f"{where}.{name}"
        if name in values:
            kwargs[name] = _convert(values[name], hints[name], key, from_env=False)
        if env is not None and section is not None:
            var = env_name(section, name)
            if var in env:
                kwargs[name] = _convert(env[var], hints[name], f"{var} ({key})", from_env=True)
                key = f"{var} ({key})"
        check = f.metadata.get("check")
        if name in kwargs and check is not None:
            problem = check(kwargs[name])
            if problem:
                raise ConfigError(key, problem)
    return cls(**kwargs)


def _profiles(raw: Any) -> tuple[SenderProfile, ...]:
    if raw is None:
        return (SenderProfile(),)
    if not isinstance(raw, dict):
        raise ConfigError("profiles", "must be a table of [profiles.NAME] tables")
    out: list[SenderProfile] = []
    for name, table in raw.items():
        if not isinstance(table, dict):
            raise ConfigError(f"profiles.{name}", "must be a table")
        if "name" in table:
            raise ConfigError(f"profiles.{name}.name", "the profile name is the table name; remove 'name'")
        profile = _build(SenderProfile, {**table}, f"profiles.{name}", None, None)
        profile = dataclasses.replace(profile, name=name)
        if name != "default" and not (profile.sending_application or profile.sending_facility):
            raise ConfigError(
                f"profiles.{name}", "needs sending_application and/or sending_facility to match a sender"
            )
        out.append(profile)
    if not any(p.name == "default" for p in out):
        out.append(SenderProfile())
    return tuple(out)


def load_settings(path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Read, validate and freeze. ``path=None`` means defaults plus environment."""
    env: Mapping[str, str] = _with_credentials({} if environ is None else environ)
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError("--config", f"file not found: {p}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("--config", f"not valid TOML ({exc})") from None
        except OSError as exc:
            raise ConfigError("--config", f"cannot read {p}: {exc.strerror}") from None
    allowed = {*SECTIONS, "profiles"}
    for k in data:
        if k not in allowed:
            raise ConfigError(k, f"unknown section (known: {', '.join(sorted(allowed))})")
    sections: dict[str, Any] = {}
    for name, cls in SECTIONS.items():
        raw = data.get(name, {})
        if not isinstance(raw, dict):
            raise ConfigError(name, "must be a table")
        sections[name] = _build(cls, raw, name, env, name)
    db: DatabaseSettings = sections["database"]
    if not db.url:
        sections["database"] = dataclasses.replace(db, url=default_database_url(dict(env)))
    elif not db.url.startswith(("sqlite", "postgresql")):
        raise ConfigError("database.url", "must be a sqlite:/// or postgresql+psycopg:// URL")
    elif db.url.startswith("postgresql") and importlib.util.find_spec("psycopg") is None:
        raise ConfigError("database.url", "PostgreSQL needs its driver: pip install 'refloop[postgres]'")
    settings = Settings(**sections, profiles=_profiles(data.get("profiles")), config_path=str(path or ""))
    _cross_checks(settings)
    return settings


def _with_credentials(environ: Mapping[str, str]) -> Mapping[str, str]:
    """The environment plus ``REFLOOP_*`` entries for secrets found as systemd credentials; a variable
    already set wins (see :mod:`refloop.config.credentials`)."""
    found = read_credentials(environ.get("CREDENTIALS_DIRECTORY"))
    if not found:
        return environ
    extra = {env_name(section, key): value for (section, key), value in found.items()}
    return {**extra, **environ}


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _cross_checks(s: Settings) -> None:
    """Rules that involve more than one key."""
    if not is_loopback(s.http.host) and not s.http.token:
        raise ConfigError("http.token", "required when http.host is not a loopback address (the API carries PHI)")
    if s.mllp.tls_cert and not s.mllp.tls_key:
        raise ConfigError("mllp.tls_key", "required with mllp.tls_cert")
    if (s.mllp.tls_key or s.mllp.tls_client_ca) and not s.mllp.tls_cert:
        raise ConfigError("mllp.tls_cert", "required with mllp.tls_key / mllp.tls_client_ca")
    if s.database.writers > 1 and s.database.url.startswith("sqlite"):
        raise ConfigError("database.writers", "SQLite allows one writer; use 0 or 1 (more need PostgreSQL)")
    if s.notify.smtp_tls and s.notify.smtp_starttls:
        raise ConfigError("notify.smtp_tls", "choose implicit TLS (smtp_tls) or smtp_starttls, not both")
    if s.notify.smtp_username and not (s.notify.smtp_tls or s.notify.smtp_starttls):
        raise ConfigError("notify.smtp_username", "SMTP AUTH sends the password: set smtp_tls or smtp_starttls")
    if any(p.allowed_subjects for p in s.profiles) and not s.mllp.tls_client_ca:
        raise ConfigError("mllp.tls_client_ca", "required when a profile sets allowed_subjects (mTLS)")

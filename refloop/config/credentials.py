"""Secrets from systemd credentials (``LoadCredential=``), read from ``$CREDENTIALS_DIRECTORY``.

systemd copies each credential into a private, read-only, non-swappable directory that only the
service's user can read, and does not pass it down to child processes, unlike an environment variable
or an ``EnvironmentFile=``. A credential is named after the setting it fills (``http_token``,
``notify_webhook_secret``, ``notify_smtp_password``, ``database_url``). Precedence, lowest first: the
TOML file, the credential, the ``REFLOOP_*`` environment variable (explicit beats ambient, so a one-off
``REFLOOP_HTTP_TOKEN=... refloop ...`` still works).
"""

from __future__ import annotations

from pathlib import Path

#: (section, key) of every setting that may come from a credential: the ones that hold secrets.
SECRET_SETTINGS = (("http", "token"), ("notify", "webhook_secret"), ("notify", "smtp_password"),
                   ("database", "url"))


def credential_name(section: str, key: str) -> str:
    return f"{section}_{key}"


def read_credentials(directory: str | None) -> dict[tuple[str, str], str]:
    """``(section, key) -> value`` for each secret present in ``directory`` (``$CREDENTIALS_DIRECTORY``).

    A credential file's one trailing newline is dropped (``echo secret > file`` writes one); anything
    else is kept byte for byte. Unreadable files are skipped: systemd made the directory, so a file we
    cannot read is not ours.
    """
    found: dict[tuple[str, str], str] = {}
    if not directory:
        return found
    for section, key in SECRET_SETTINGS:
        path = Path(directory) / credential_name(section, key)
        try:
            value = path.read_text(encoding="utf-8")
        except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, UnicodeDecodeError):
            continue
        found[(section, key)] = value[:-1] if value.endswith("\n") else value
    return found

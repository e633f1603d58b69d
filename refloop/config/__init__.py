"""Typed settings from TOML + ``REFLOOP_*`` environment: build once, pass down."""

from refloop.config.loader import ConfigError, env_name, load_settings
from refloop.config.settings import (
    SECTIONS,
    DatabaseSettings,
    HttpSettings,
    LogSettings,
    MllpSettings,
    SenderProfile,
    Settings,
)

__all__ = [
    "SECTIONS",
    "ConfigError",
    "DatabaseSettings",
    "HttpSettings",
    "LogSettings",
    "MllpSettings",
    "SenderProfile",
    "Settings",
    "env_name",
    "load_settings",
]

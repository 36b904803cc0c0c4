"""The one error a config problem raises, and how its message lists what is allowed."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config value the workflow cannot run; the message names the key and what is allowed."""


def listed(values) -> str:
    return ", ".join(str(v) for v in values)

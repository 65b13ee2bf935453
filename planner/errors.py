"""Typed errors raised by the library.

The library raises; only the CLI turns these into a one-line message and an exit code.
They deliberately do not subclass ``ValueError``: pydantic wraps ``ValueError`` raised inside
validators into its own ``ValidationError``, and we want a caller to catch ``LayoutError``
as ``LayoutError``.
"""

from __future__ import annotations


class TrainplanError(Exception):
    """Base class: a user's input cannot be planned, run or profiled as given."""


class ConfigError(TrainplanError):
    """A configuration value is out of range or inconsistent with another one."""


class LayoutError(ConfigError):
    """The parallel layout is impossible (dp x tp x pp != GPUs, tp not dividing heads, ...)."""


class UnknownPresetError(TrainplanError):
    """A model or GPU name is neither a preset, an alias nor a file."""

    def __init__(self, kind: str, name: str, suggestions: list[str], list_command: str):
        self.kind = kind
        self.name = name
        self.suggestions = suggestions
        hint = f"; did you mean {', '.join(repr(s) for s in suggestions)}?" if suggestions else ""
        super().__init__(f"unknown {kind} '{name}'{hint} (see `{list_command}`)")


class ConfigFileError(TrainplanError):
    """A model configuration file (a Hugging Face ``config.json``) is unreadable or incomplete."""


class NothingFitsError(TrainplanError):
    """No candidate layout fits in GPU memory; carries the closest candidates and what to change."""

    def __init__(self, message: str, closest: list | None = None):
        self.closest = closest or []
        super().__init__(message)

"""Typed errors raised by the library.

The library raises; only the CLI turns these into a one-line message and an exit code.
They deliberately do not subclass ``ValueError``: pydantic wraps ``ValueError`` raised inside
validators into its own ``ValidationError``, and we want a caller to catch ``LayoutError``
as ``LayoutError``.
"""

from __future__ import annotations


def shown(value: str, limit: int = 80) -> str:
    """A user's string inside a one-line message: quoted, control characters escaped, long ones
    cut (a 300-character name or one with a newline stays one short line)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 4] + "...'"


class TrainplanError(Exception):
    """Base class: a user's input cannot be planned, run or profiled as given.

    ``kind`` names the failure for machines (the CLI's ``--json`` errors); ``user_mistake``
    says whether the input was wrong (the CLI exits 2) or the input was fine and the answer
    is no -- it does not fit, the run failed (exit 1)."""

    kind = "usage"
    user_mistake = True


class ConfigError(TrainplanError):
    """A configuration value is out of range or inconsistent with another one."""

    kind = "config"


class LayoutError(ConfigError):
    """The parallel layout is impossible (dp x tp x pp != GPUs, tp not dividing heads, ...)."""

    kind = "layout"


class UnknownPresetError(TrainplanError):
    """A model or GPU name is neither a preset, an alias nor a file."""

    kind = "unknown_preset"

    def __init__(self, preset: str, name: str, suggestions: list[str], list_command: str):
        self.preset = preset  # "model" or "gpu"
        self.name = name
        self.suggestions = suggestions
        hint = f"; did you mean {', '.join(repr(s) for s in suggestions)}?" if suggestions else ""
        super().__init__(f"unknown {preset} {shown(name)}{hint} (see `{list_command}`)")


class ConfigFileError(TrainplanError):
    """An input file (a Hugging Face ``config.json``, a GPU, calibration or report file) is
    unreadable, malformed or incomplete."""

    kind = "config_file"


class NothingFitsError(TrainplanError):
    """No candidate layout fits in GPU memory; carries the closest candidates and what to change."""

    kind = "does_not_fit"
    user_mistake = False

    def __init__(self, message: str, closest: list | None = None):
        self.closest = closest or []
        super().__init__(message)

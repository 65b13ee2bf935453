"""Users' files at the boundary: read whole or refused with one line that names the problem.

A file is read only if it is a regular file (a FIFO would block, ``/dev/zero`` never ends) of
at most ``MAX_FILE_BYTES``, decodes as UTF-8 and parses as one JSON object whose numbers are
finite (JSON has no NaN or Infinity; Python's parser accepts them), whose integers have at
most 4,300 digits (Python's own limit) and whose nesting is shallow enough to parse.
"""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path

from planner.errors import ConfigFileError, shown

MAX_FILE_BYTES = 16 * 2**20
"""The largest configuration, calibration, GPU or report file trainplan reads (16 MiB; the
largest report it writes, a 64-rank profile, is well under 1 MiB)."""


def regular_file(path: str | Path, what: str) -> Path:
    """``path`` if it names a regular file of at most ``MAX_FILE_BYTES``; else ConfigFileError."""
    file = Path(path)
    try:
        info = os.stat(file)
    except FileNotFoundError:
        raise ConfigFileError(f"{what} {shown(str(path))} does not exist") from None
    except OSError as exc:
        raise ConfigFileError(f"cannot read {what} {shown(str(path))}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(info.st_mode):
        raise ConfigFileError(f"{what} {shown(str(path))} is not a regular file")
    if info.st_size > MAX_FILE_BYTES:
        raise ConfigFileError(f"{what} {shown(str(path))} is {info.st_size / 2**20:,.1f} MiB; "
                              f"trainplan reads at most {MAX_FILE_BYTES // 2**20} MiB")
    return file


def read_text(path: str | Path, what: str) -> str:
    file = regular_file(path, what)
    try:
        with open(file, "rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigFileError(f"cannot read {what} {shown(str(path))}: {exc.strerror or exc}") from None
    if len(data) > MAX_FILE_BYTES:  # grew since stat
        raise ConfigFileError(f"{what} {shown(str(path))} is larger than {MAX_FILE_BYTES // 2**20} MiB")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigFileError(f"{what} {shown(str(path))} is not UTF-8 text (byte {exc.start})") from None


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is beyond a double's range")
    return value


def parse_json(text: str, where: str):
    """JSON with finite numbers only; every parse failure is one ConfigFileError line."""
    try:
        return json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)
    except json.JSONDecodeError as exc:
        raise ConfigFileError(f"{where} is not valid JSON (line {exc.lineno}: {exc.msg})") from None
    except RecursionError:
        raise ConfigFileError(f"{where} is nested too deeply to be a trainplan file") from None
    except ValueError as exc:  # NaN / Infinity, a float overflow, an integer of more than 4,300 digits
        first = str(exc).split(";")[0].splitlines()[0]
        raise ConfigFileError(f"{where}: {first}") from None


def read_json_object(path: str | Path, what: str) -> dict:
    data = parse_json(read_text(path, what), shown(str(path)))
    if not isinstance(data, dict):
        raise ConfigFileError(f"{shown(str(path))} must hold a JSON object")
    return data

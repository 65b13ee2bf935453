"""Writing output files whole or not at all, and never over something that is not a file."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from planner.errors import ConfigFileError, shown


def check_output(path: str | Path) -> Path:
    """Refuses, before any work, an output path that cannot be written as a regular file: its
    folder missing or read-only, or the path naming a folder, a symlink, a FIFO or a device
    (replacing those would change what they point to or block). Raises ConfigFileError."""
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise ConfigFileError(f"cannot write {shown(str(path))}: the folder {shown(str(folder))} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigFileError(f"cannot write {shown(str(path))}: the folder {shown(str(folder))} is not writable")
    try:
        mode = os.lstat(target).st_mode
    except FileNotFoundError:
        mode = None
    except OSError as exc:
        raise ConfigFileError(f"cannot write {shown(str(path))}: {exc.strerror or exc}") from None
    if mode is not None and not stat.S_ISREG(mode):
        kind = ("a symlink" if stat.S_ISLNK(mode) else "a folder" if stat.S_ISDIR(mode) else
                "a FIFO" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                else "not a regular file")
        raise ConfigFileError(f"refusing to write {shown(str(path))}: it is {kind}, not a regular file")
    # the atomic write needs a temporary beside the target: try one (a read-only or pseudo
    # file system, such as /proc, refuses it here rather than after the work)
    import tempfile

    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{target.name}.", suffix=".probe"):
            pass
    except OSError as exc:
        raise ConfigFileError(f"cannot write {shown(str(path))}: {exc.strerror or exc}") from None
    return target


def _remove_stale_temporaries(target: Path) -> None:
    """Temporaries (``.<name>.<pid>.tmp``) of writers that died before renaming them."""
    for leftover in target.parent.glob(f".{target.name}.*.tmp"):
        pid = leftover.name[len(target.name) + 2:-len(".tmp")]
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                leftover.unlink(missing_ok=True)
            except PermissionError:
                pass


def write_atomic(path: str | Path, text: str) -> None:
    """A temporary file beside the target, then an atomic rename; nothing half-written is left
    behind (the temporary is removed if writing fails, and dead writers' temporaries on the
    next write). Raises ConfigFileError for a target that is not a regular file, OSError."""
    target = check_output(path)
    _remove_stale_temporaries(target)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise

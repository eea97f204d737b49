"""Output files written safely: atomic replacement, permissions, free-space checks, one error per I/O failure.

Every file datainf writes goes through :func:`atomic_write_bytes` / :func:`atomic_write_json` (a
temporary file in the same folder, ``fsync``, then ``os.replace``): a killed process leaves the old
file or the new one, never half of one. :func:`output_error` turns a full disk, a denied folder or a
read-only file system into one :class:`~datainf.errors.DataInfError` that says what to do;
:func:`check_free_space` refuses an output that cannot fit before any of it is written.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from datainf.errors import (
    DataInfError,
    DiskFullError,
    OutputError,
)

logger = logging.getLogger(__name__)


#: Name of the lock file a claimed run folder holds while a run writes it (see :mod:`datainf.runs`);
#: never counts as content of a folder.
RUN_LOCK_FILE = ".datainf.lock"

#: errno values of a full disk / exceeded quota, and of a folder that may not be written.
_FULL_ERRNOS = frozenset({errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)})
_DENIED_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})
#: Free space kept in reserve beyond an output's estimated size (manifests, headers, file-system slack).
_SPACE_RESERVE = 1 << 20


def _umask() -> int:
    """The process's umask, read without changing it where the OS allows (Linux ``/proc``)."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (the POSIX way to read it)
    os.umask(mask)
    return mask


def file_mode(*, folder: bool = False) -> int:
    """The permission bits :func:`open` (``folder=False``) or :func:`os.mkdir` (``folder=True``) would give a
    new file under the current umask: ``0o666 & ~umask`` or ``0o777 & ~umask`` (e.g. 0o644 / 0o755 under 022).

    Temporary files (:func:`tempfile.mkstemp`, ``mkdtemp``) are private (0o600 / 0o700); datainf sets this
    mode on them before they are renamed into place, so that a team can share its stores and scores.
    """
    return (0o777 if folder else 0o666) & ~_umask()


def _errno_of(err: BaseException) -> int | None:
    """The OS error number behind ``err``: an :class:`OSError`'s ``errno``, or the ``os error N`` /
    ``code: N`` that safetensors (a Rust library) puts in its messages."""
    if isinstance(err, OSError) and err.errno is not None:
        return int(err.errno)
    match = re.search(r"(?:os error|code:)\s*(\d+)", str(err))
    return int(match.group(1)) if match else None


def _format_bytes(count: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"  # pragma: no cover - unreachable


def output_error(err: BaseException, path: str | os.PathLike[str], what: str = "") -> DataInfError | None:
    """The datainf error for a failed write of ``path``, or ``None`` when ``err`` is no known write failure.

    A full disk (``ENOSPC``, ``EDQUOT``) gives a :class:`~datainf.errors.DiskFullError`; a read-only folder
    or missing permission (``EROFS``, ``EACCES``, ``EPERM``) an :class:`~datainf.errors.OutputError`. Both
    say what to do. ``what`` names the output (e.g. ``"the gradient store"``).
    """
    if isinstance(err, DataInfError):
        return err
    code = _errno_of(err)
    target = Path(path)
    name = f"{what} {target}" if what else str(target)
    if code in _FULL_ERRNOS:
        try:
            free = f" ({_format_bytes(shutil.disk_usage(_existing_parent(target)).free)} free now)"
        except OSError:
            free = ""
        return DiskFullError(
            f"The disk is full: writing {name} failed{free}. Free some space or choose an --out folder on a larger "
            "disk, then rerun the same command: finished parts are kept and it resumes."
        )
    if code in _DENIED_ERRNOS:
        reason = "is on a read-only file system" if code == errno.EROFS else "may not be written by this user"
        return OutputError(
            f"{name} {reason} ({os.strerror(code)}). Choose an --out folder you can write to, or fix its permissions."
        )
    return None


def _existing_parent(path: Path) -> Path:
    """``path`` itself or its nearest existing ancestor (where a new file or folder would go)."""
    current = path.absolute()
    while not current.exists() and current.parent != current:
        current = current.parent
    return current


def check_free_space(folder: str | os.PathLike[str], needed: int, what: str) -> None:
    """Refuse to start writing ``needed`` bytes of ``what`` into ``folder`` when the disk has less free space.

    ``folder`` need not exist yet (its nearest existing ancestor is asked). A small reserve (1 MiB) is
    added for manifests and file headers.

    Raises:
        DiskFullError: the free space is below ``needed`` plus the reserve; the message says how much is
            needed and how much is free.
    """
    if needed <= 0:
        return
    try:
        free = shutil.disk_usage(_existing_parent(Path(folder))).free
    except OSError:  # no answer (e.g. an unusual file system): let the write itself tell
        return
    if free < needed + _SPACE_RESERVE:
        raise DiskFullError(
            f"Not enough free space for {what} in {folder}: it needs about {_format_bytes(needed)}, "
            f"{_format_bytes(free)} is free. Free {_format_bytes(needed + _SPACE_RESERVE - free)} or more, choose an "
            "--out folder on a larger disk, or store fewer bytes per number (--dtype bfloat16)."
        )


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one.

    The file gets the mode :func:`open` would give it under the current umask (:func:`file_mode`). A full
    disk or a read-only folder raises the :func:`output_error` for it (the temporary file is removed).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise (output_error(err, path) or err) from err
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), file_mode())
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        converted = output_error(err, path) if isinstance(err, OSError) else None
        if converted is not None:
            raise converted from err
        raise


def atomic_write_json(path: Path, data: Any, *, default: Callable[[Any], Any] = str) -> None:
    """Write ``data`` as indented JSON (plus a final newline) with :func:`atomic_write_bytes`.

    ``default`` converts what JSON cannot hold (``str`` by default; ``float`` keeps numpy numbers numeric).
    """
    atomic_write_bytes(Path(path), (json.dumps(data, indent=2, default=default) + "\n").encode())


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def has_content(path: Path) -> bool:
    """Whether the folder ``path`` holds anything besides a run's lock file (:data:`RUN_LOCK_FILE`)."""
    return any(entry.name != RUN_LOCK_FILE for entry in path.iterdir())


def clear_folder(path: Path) -> None:
    """Delete everything in ``path`` but a run's lock file (the run holding it keeps it); the folder stays."""
    for entry in path.iterdir():
        if entry.name == RUN_LOCK_FILE:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()

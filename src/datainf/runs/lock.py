"""One writer per run folder: the lock file ``<dir>/.datainf.lock`` (see :mod:`datainf.runs`).

Created atomically and naming its owner (pid, host, command, start time, a token); released when the
run ends or the process exits; a lock of a process that no longer runs on this host is stale and taken
over with a warning; one of another host cannot be checked and is refused with how to clear it.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import socket
import tempfile
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from datainf.errors import OutputLockedError
from datainf.store import RUN_LOCK_FILE as LOCK_FILE
from datainf.store import file_mode, output_error

logger = logging.getLogger(__name__)


#: Locks this process holds: folder (absolute path) -> the token written into its lock file.
_HELD_LOCKS: dict[str, str] = {}


def _read_lock(lock: Path) -> dict[str, Any] | None:
    data = _read_json(lock)
    return data if isinstance(data, dict) else None


def _write_lock_exclusively(lock: Path, record: Mapping[str, Any]) -> None:
    """Create ``lock`` holding ``record`` (JSON) atomically: it appears complete, or not at all.

    Written to a temporary file that is hard-linked to ``lock`` (which fails if ``lock`` exists); where
    the file system has no hard links, ``lock`` is created with ``O_EXCL`` instead.

    Raises:
        FileExistsError: ``lock`` exists.
    """
    payload = (json.dumps(record, indent=1) + "\n").encode()
    fd, tmp = tempfile.mkstemp(prefix=f"{lock.name}.", suffix=".tmp", dir=lock.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), file_mode())
            handle.write(payload)
        try:
            os.link(tmp, lock)
            return
        except FileExistsError:
            raise
        except OSError:  # no hard links here (some network / FUSE file systems)
            pass
        descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, file_mode())
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(payload)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _process_runs(pid: int) -> bool:
    """Whether a process ``pid`` runs on this host (one of another user counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return True  # cannot tell: assume it runs
    return True


def _is_stale(held: Mapping[str, Any]) -> bool:
    """A lock whose process clearly no longer runs: written on this host by a pid that is gone (or by this
    process's pid, but not by this process: a previous process that had the same pid)."""
    if held.get("host") != socket.gethostname():
        return False
    try:
        pid = int(held.get("pid"))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    if pid == os.getpid():
        return held.get("token") not in _HELD_LOCKS.values()
    return not _process_runs(pid)


def _locked_message(folder: Path, lock: Path, held: Mapping[str, Any] | None) -> str:
    clear = f"If no datainf run is using {folder}, delete {lock} and rerun."
    if held is None:
        return f"{folder} holds an unreadable lock file {lock} (another datainf run may be writing it). {clear}"
    who = f"`datainf {held.get('command', '?')}` (pid {held.get('pid', '?')} on host {held.get('host', '?')}"
    who += f", since {held['started']})" if held.get("started") else ")"
    if held.get("host") != socket.gethostname():
        return (
            f"{folder} is locked by {who}; this is host {socket.gethostname()}, so datainf cannot tell whether that "
            f"run is still going. Wait for it or choose another --out. {clear}"
        )
    return f"{folder} is in use by another run: {who}. Wait for it to finish or choose another --out. {clear}"


def _take_over(lock: Path, held: Mapping[str, Any]) -> None:
    """Move the stale lock ``held`` out of the way (if another process replaced it meanwhile, put that back)."""
    grave = lock.with_name(f"{lock.name}.stale-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(lock, grave)
    except FileNotFoundError:
        return  # another process took it over first
    try:
        if _read_lock(grave) != dict(held):  # we moved a fresh lock taken since we read the stale one
            with contextlib.suppress(OSError):
                os.link(grave, lock)
    finally:
        grave.unlink(missing_ok=True)


def _acquire_lock(folder: Path, command: str) -> bool:
    """Take the lock on ``folder`` for this process; ``True`` if taken now, ``False`` if already held.

    Raises:
        OutputLockedError: another live run holds it, or a lock that cannot be checked (another host,
            unreadable) is there.
        OutputError: the folder cannot be written (read-only, no permission, disk full).
    """
    key = str(folder)
    lock = folder / LOCK_FILE
    if key in _HELD_LOCKS:
        held = _read_lock(lock)
        if held is not None and held.get("token") == _HELD_LOCKS[key]:
            return False
        del _HELD_LOCKS[key]  # our lock file was removed (e.g. the folder was cleared): take it again
    token = uuid.uuid4().hex
    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": command,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "token": token,
    }
    for _ in range(5):
        try:
            _write_lock_exclusively(lock, record)
        except FileExistsError:
            held = _read_lock(lock)
            if held is None or not _is_stale(held):
                raise OutputLockedError(_locked_message(folder, lock, held)) from None
            logger.warning(
                "Taking over the stale lock %s of `datainf %s` (pid %s on this host no longer runs; it was probably "
                "killed).",
                lock,
                held.get("command", "?"),
                held.get("pid"),
            )
            _take_over(lock, held)
            continue
        except OSError as err:
            raise (output_error(err, folder, "the output folder") or err) from err
        _HELD_LOCKS[key] = token
        return True
    raise OutputLockedError(_locked_message(folder, lock, _read_lock(lock)))


def _release_lock(folder: Path) -> None:
    """Remove this process's lock on ``folder`` (nothing when it holds none, or the file is another's)."""
    token = _HELD_LOCKS.pop(str(folder), None)
    if token is None:
        return
    lock = folder / LOCK_FILE
    held = _read_lock(lock)
    if held is not None and held.get("token") == token:
        lock.unlink(missing_ok=True)


def _locked_by_another(folder: Path) -> bool:
    """Whether ``folder`` holds a lock file that is not this process's."""
    lock = folder / LOCK_FILE
    if not lock.exists():
        return False
    held = _read_lock(lock)
    mine = _HELD_LOCKS.get(str(folder))
    return held is None or mine is None or held.get("token") != mine


@atexit.register
def _release_all_locks() -> None:
    for key in list(_HELD_LOCKS):
        with contextlib.suppress(OSError):
            _release_lock(Path(key))


def _read_json(path: Path) -> Any | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None

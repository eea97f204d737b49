"""Run folders: one object that owns an output folder, its ``config.json`` and its cached stages.

A :class:`RunDir` is how every datainf entry point (the CLI commands, :mod:`datainf.workflows`, the
demos and the explain pipelines) writes results to disk:

* **claim** a folder for one configuration (:meth:`RunDir.claim`): the resolved settings go to
  ``<dir>/config.json``; a folder that holds results of a *different* configuration is refused
  (:class:`~datainf.errors.ConfigError` naming the first differing settings) unless
  ``overwrite=True``, which clears it; a non-empty folder datainf did not write is refused, so a
  typo in an output path never deletes someone's files. Claiming a folder of the *same*
  configuration resumes it (:attr:`RunDir.is_resumed`): finished stages are reused.
* or name the folder after the settings (:meth:`RunDir.for_settings`): ``<parent>/cache-<key>``,
  where ``key`` hashes the configuration, so each configuration gets its own cache and a rerun of
  the same one finds it again (``recompute=True`` starts it afresh).
* **stages** are named files or folders inside the run (``adapter``, ``grads-train``,
  ``scores-datainf.safetensors``, ``report``, ...): :meth:`RunDir.stage` names one,
  :meth:`RunDir.cached` reuses a finished one or computes it, :meth:`RunDir.timed` records the
  wall time of a stage into :attr:`RunDir.stage_seconds`.

Every file is written atomically (:func:`~datainf.store.atomic_write_json`), so an interrupted run
leaves either the old file or the new one, and rerunning the same configuration resumes. Files get
the mode :func:`open` gives under the current umask (e.g. 0o644 under 022), so a team can share runs.

**One writer per folder.** :meth:`RunDir.claim` takes a lock on the folder, the file
``<dir>/.datainf.lock`` (created atomically; it names the owner's pid, host, command and start time),
and refuses a folder another live run holds (:class:`~datainf.errors.OutputLockedError`, saying who
holds it and how to clear it). The lock is released when the run ends (:meth:`RunDir.release`, the
end of a :func:`removed_on_error` block, or the end of the process). A lock left by a process that no
longer runs on this host (killed, machine crash) is stale: it is taken over, with a warning. A lock of
another host cannot be checked and is refused with how to clear it.

**What counts as the same configuration.** Settings are compared as they read back from JSON; paths
compare as the files they name (``/data/../data/val.jsonl`` is ``/data/val.jsonl``, symbolic links
resolved), and the data files (settings ``data``, ``train_data``, ``test_data``) also by their
content: their SHA-256 goes to ``<dir>/inputs.json``, and a file whose bytes changed is a different
configuration. Folders written before ``inputs.json`` existed are compared by path alone.

``config.json`` of a claimed run::

    {"format": "datainf-cli-config", "command": "<kind>", "datainf_version": "0.1.0", <settings>...}

(the format tag is the one the command line wrote before this module existed, so run folders made by
earlier versions are still recognised as the same configuration; ``datainf <kind> --config
<dir>/config.json`` replays the run).

Under ``torchrun``: claiming and writing are *not* collective. Rank 0 alone claims the folder and
writes files; hand the claimed :class:`RunDir` (it pickles) to every rank, e.g. with
:func:`datainf.distributed.on_main`::

    ctx = dist_context()
    run = on_main(ctx, "Checking the output folder", lambda: RunDir.claim(out, kind="score", settings=settings))
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

from datainf.distributed import is_main_process
from datainf.errors import ConfigError, DataInfError, DeviceError
from datainf.runs.lock import (
    _HELD_LOCKS,
    _acquire_lock,
    _locked_by_another,
    _read_json,
    _release_lock,
)
from datainf.store import RUN_LOCK_FILE, atomic_write_json, output_error
from datainf.store.files import clear_folder, file_sha256, has_content

__all__ = [
    "RunDir",
    "CONFIG_FILE",
    "INPUTS_FILE",
    "LOCK_FILE",
    "RUN_CONFIG_FORMAT",
    "settings_key",
    "has_progress",
    "removed_on_error",
    "check_device",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Name of the resolved-settings file in every run folder.
CONFIG_FILE = "config.json"
#: Name of the file that records the SHA-256 of a claimed run's data files (see the module doc).
INPUTS_FILE = "inputs.json"
#: Name of the lock file of a claimed run folder while a run writes it.
LOCK_FILE = RUN_LOCK_FILE
#: Settings naming data files, compared by content as well as by path.
_DATA_FILE_KEYS = ("data", "train_data", "test_data")
#: ``format`` tag of a claimed run's ``config.json`` (first written by the command line; kept for compatibility).
RUN_CONFIG_FORMAT = "datainf-cli-config"
#: Keys :meth:`RunDir.claim` adds in front of the settings; never compared as settings.
_HEADER_KEYS = ("format", "command", "datainf_version")
#: Files whose presence means a folder holds finished work (gradient shards, scores, a trained adapter).
_PROGRESS_PATTERNS = ("shard-*.safetensors", "scores-*.safetensors", "adapter_model.safetensors", "lds-retrain-*.json")
#: How many differing settings a refusal lists before "...".
_SHOWN_DIFFERENCES = 5


def settings_key(settings: Mapping[str, Any], *, length: int = 10) -> str:
    """A short hash of JSON-able ``settings``: the first ``length`` hex digits of the SHA-256 of
    ``json.dumps(settings, sort_keys=True)`` (tuples hash as lists).

    The demos name their cache folders ``cache-<key>`` with exactly this recipe.
    """
    return hashlib.sha256(json.dumps(dict(settings), sort_keys=True).encode()).hexdigest()[:length]


def has_progress(path: str | os.PathLike[str]) -> bool:
    """Whether the folder ``path`` holds finished work worth keeping (gradient shards, scores, an adapter)."""
    folder = Path(path)
    return folder.is_dir() and any(next(folder.rglob(p), None) is not None for p in _PROGRESS_PATTERNS)


def _is_empty_or_missing(path: Path) -> bool:
    """Missing, or a folder holding nothing but a lock file."""
    return not path.exists() or (path.is_dir() and not has_content(path))


def check_device(device: str | None) -> None:
    """Refuse a torch device this process cannot use, before any work or output folder.

    ``cpu`` always works; ``cuda`` needs a CUDA build of torch that sees a GPU, ``cuda:N`` at least
    ``N + 1`` visible GPUs, ``mps`` Apple's Metal backend; other device types are asked through
    ``torch.<type>.is_available()`` where torch has it. ``None`` is accepted (the caller's default).

    Raises:
        DeviceError: the device string is not a torch device, or that device is not available here.
    """
    if device is None:
        return
    import torch

    text = str(device).strip()
    try:
        parsed = torch.device(text)
    except (RuntimeError, ValueError, TypeError) as err:
        raise DeviceError(f"--device {text!r} is not a torch device ({err}); use cpu, cuda, cuda:N or mps.") from err
    if parsed.type == "cpu":
        return
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            why = (
                "this torch build has no CUDA support"
                if torch.version.cuda is None
                else "torch sees no CUDA GPU (check the driver and CUDA_VISIBLE_DEVICES)"
            )
            raise DeviceError(
                f"--device {text}: {why} (torch {torch.__version__}). Use --device cpu, or run on a machine with a "
                "GPU and a CUDA build of torch."
            )
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise DeviceError(
                f"--device {text}: only {count} CUDA device(s) are visible; use one of "
                f"{', '.join(f'cuda:{i}' for i in range(count))} (or plain cuda)."
            )
        return
    if parsed.type == "mps":
        backend = getattr(torch.backends, "mps", None)
        if backend is None or not backend.is_available():
            raise DeviceError(
                f"--device {text}: the Apple MPS backend is not available in this torch build or machine "
                f"(torch {torch.__version__}). Use --device cpu."
            )
        return
    available = getattr(getattr(torch, parsed.type, None), "is_available", None)
    if callable(available) and not available():
        raise DeviceError(f"--device {text}: torch reports no {parsed.type} device here. Use --device cpu.")


@contextlib.contextmanager
def removed_on_error(path: str | os.PathLike[str] | None) -> Iterator[None]:
    """Leave no claimed-but-empty output folder, and no lock, behind when the block ends.

    If ``path`` is missing or empty on entry and the block raises a :class:`~datainf.errors.DataInfError`,
    the folder is removed again unless it now holds finished work (:func:`has_progress`) or another
    run's lock. Other exceptions (Ctrl-C, crashes) keep everything, so rerunning resumes. However the
    block ends, a lock this process took on ``path`` inside it (:meth:`RunDir.claim`) is released.
    Under ``torchrun`` only rank 0 removes anything. ``path=None`` does nothing.
    """
    if path is None:
        yield
        return
    folder = Path(path).expanduser().absolute()
    fresh = _is_empty_or_missing(folder)
    held_before = str(folder) in _HELD_LOCKS
    try:
        yield
    except DataInfError:
        if (
            fresh
            and folder.is_dir()
            and not has_progress(folder)
            and not _locked_by_another(folder)
            and is_main_process()
        ):
            shutil.rmtree(folder, ignore_errors=True)
        raise
    finally:
        if not held_before:
            _release_lock(folder)


def _json_normal(data: Any) -> Any:
    """``data`` as it reads back from ``config.json`` (tuples become lists, other values ``str``)."""
    return json.loads(json.dumps(data, default=str))


class RunDir:
    """An output folder owned by one configuration: its ``config.json``, named stages and stage timings.

    Make one with :meth:`claim` (a folder given by the user) or :meth:`for_settings` (a cache folder
    named after the settings); the constructor itself only wraps a folder and checks nothing.

    Attributes:
        path: the folder (absolute).
        kind: what wrote it (``finetune``, ``grads``, ``score``, ``report``, a demo name) or ``None``.
        settings: the configuration as written to ``config.json`` (for a claimed run including the
            ``format`` / ``command`` / ``datainf_version`` header).
        is_resumed: the folder already held (possibly partial) results of this configuration, so
            finished stages can be reused.
        stage_seconds: wall time per stage name, filled by :meth:`timed` (seconds, summed over repeats).
        reused: names of the stages :meth:`cached` / :meth:`load_finished` found finished, in order.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        kind: str | None = None,
        settings: Mapping[str, Any] | None = None,
        is_resumed: bool = False,
    ) -> None:
        self.path = Path(path).expanduser().absolute()
        self.kind = kind
        self.settings: dict[str, Any] = dict(settings or {})
        self.is_resumed = bool(is_resumed)
        self.stage_seconds: dict[str, float] = {}
        self.reused: list[str] = []

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r}, kind={self.kind!r}, is_resumed={self.is_resumed})"

    # ------------------------------------------------------------------ making one
    @classmethod
    def claim(
        cls,
        path: str | os.PathLike[str] | None,
        *,
        kind: str,
        settings: Mapping[str, Any],
        overwrite: bool = False,
        compare_ignore: Iterable[str] = ("out",),
        allow_foreign: Callable[[Path], bool] | None = None,
        write_config: bool = True,
    ) -> RunDir:
        """Claim the folder ``path`` for the configuration ``settings`` of ``kind``.

        * missing or empty: created, this configuration's ``config.json`` written;
        * holds a ``config.json`` of the same ``kind`` and settings (keys in ``compare_ignore`` and the
          header aside): resumed (:attr:`is_resumed`), nothing is deleted;
        * holds one of another configuration or kind: refused, or with ``overwrite`` cleared and
          started afresh;
        * non-empty without ``config.json``: refused, unless ``allow_foreign(path)`` accepts it (e.g.
          a bare gradient store, which ``overwrite`` then clears).

        Args:
            path: the folder; relative paths are taken from the current folder.
            kind: what the run is (``score``, ``grads``, ...); stored as ``command`` in ``config.json``.
            settings: the resolved, JSON-able settings (no ``format`` / ``command`` /
                ``datainf_version`` keys). Compared as they read back from JSON (tuples = lists).
            overwrite: clear a folder of another configuration instead of refusing it.
            compare_ignore: settings stored but not compared (default: ``out``, the folder itself).
            allow_foreign: decides whether a non-empty folder without ``config.json`` may be used.
            write_config: write ``config.json`` now; ``False`` leaves that to :meth:`write_config`
                (e.g. once the first stage is known to start).

        Raises:
            ConfigError: no ``path``; ``path`` is a file; it holds results of a different
                configuration and ``overwrite`` is false; it is a non-empty folder datainf did not write.
        """
        if not path:
            raise ConfigError(f"`datainf {kind}` needs --out DIR (or 'out' in the --config file).")
        clash = sorted(k for k in settings if k in _HEADER_KEYS)
        if clash:
            raise ConfigError(f"Run settings may not use the reserved key(s) {clash}.")
        from datainf import __version__

        out = Path(path).expanduser().absolute()
        record = {"format": RUN_CONFIG_FORMAT, "command": kind, "datainf_version": __version__, **settings}
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--out {out} is a file; pass a folder.")
        device = settings.get("device")
        if isinstance(device, str):
            check_device(device)  # before any folder is made
        created = _topmost_missing(out)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            _remove_if_empty(created, out)
            raise (output_error(err, out, "the output folder") or err) from err
        try:
            taken = _acquire_lock(out, kind)
        except BaseException:
            _remove_if_empty(created, out)
            raise
        try:
            run = cls._claim_locked(out, kind, record, overwrite, compare_ignore, allow_foreign)
            if write_config:
                run.write_config()
        except BaseException:
            if taken:
                _release_lock(out)
            _remove_if_empty(created, out)
            raise
        return run

    @classmethod
    def _claim_locked(
        cls,
        out: Path,
        kind: str,
        record: dict[str, Any],
        overwrite: bool,
        compare_ignore: Iterable[str],
        allow_foreign: Callable[[Path], bool] | None,
    ) -> RunDir:
        """The checks of :meth:`claim` on the existing, locked folder ``out``."""
        same = False
        marker = out / CONFIG_FILE
        if marker.is_file():
            stored = _read_json(marker)
            diffs = _differences(stored, _json_normal(record), {*compare_ignore, *_HEADER_KEYS})
            stored_kind = stored.get("command") if isinstance(stored, dict) else None
            if stored_kind not in (None, kind):
                diffs = [("command", f"command (stored {stored_kind!r}, now {kind!r})"), *diffs]
            if not diffs:
                diffs = _changed_inputs(_read_json(out / INPUTS_FILE), record)
            if diffs and not overwrite:
                shown = ", ".join(text for _, text in diffs[:_SHOWN_DIFFERENCES])
                raise ConfigError(
                    f"{out} holds results of a different configuration: {shown}"
                    f"{' ...' if len(diffs) > _SHOWN_DIFFERENCES else ''}. Pass --overwrite (overwrite=True in Python) "
                    "to replace them, or choose another --out."
                )
            if overwrite:
                logger.info("Clearing %s (--overwrite).", out)
                clear_folder(out)
            else:
                same = True
        elif has_content(out):
            if allow_foreign is None or not allow_foreign(out):
                raise ConfigError(
                    f"{out} is not empty and was not written by `datainf {kind}` (no {CONFIG_FILE}); choose a new or "
                    "empty --out folder."
                )
            if overwrite:
                logger.info("Clearing %s (--overwrite).", out)
                clear_folder(out)
        return cls(out, kind=kind, settings=record, is_resumed=same)

    @classmethod
    def for_settings(
        cls,
        parent: str | os.PathLike[str],
        settings: Mapping[str, Any],
        *,
        key: str | None = None,
        prefix: str = "cache",
        recompute: bool = False,
        kind: str | None = None,
        json_default: Callable[[Any], Any] = str,
    ) -> RunDir:
        """The cache folder ``<parent>/<prefix>-<key>`` of one configuration, created if missing.

        The folder's name identifies the configuration, so no comparison is made: an existing folder
        of that name is this configuration's cache (:attr:`is_resumed`), reused stage by stage.
        ``settings`` are written to its ``config.json`` as given (for people reading the folder).

        Args:
            parent: the folder that holds the cache folders (created if missing).
            settings: the configuration (JSON-able; ``json_default`` converts other values).
            key: the configuration's key; default :func:`settings_key` of ``settings``. Pass the key a
                pipeline already uses so that its existing cache folders keep their names.
            prefix: the folder name's prefix.
            recompute: delete the folder first and start over.
            kind: what the run is (informational).
            json_default: how :func:`~datainf.store.atomic_write_json` writes non-JSON values.
        """
        name = f"{prefix}-{key if key is not None else settings_key(settings)}"
        if PurePosixPath(name).name != name or "\\" in name or name in (".", ".."):
            raise ConfigError(f"A cache folder name must be one plain name, got {name!r}.")
        folder = Path(parent).expanduser().absolute() / name
        if recompute and folder.exists():
            logger.info("Deleting %s (recompute).", folder)
            shutil.rmtree(folder)
        resumed = folder.is_dir() and any(folder.iterdir())
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(folder / CONFIG_FILE, dict(settings), default=json_default)
        return cls(folder, kind=kind, settings=settings, is_resumed=resumed)

    def write_config(self) -> Path:
        """Write :attr:`settings` to ``<dir>/config.json`` (atomically), and the SHA-256 of the data files they
        name to ``<dir>/inputs.json`` (see the module doc); returns the path of ``config.json``."""
        digests = _input_digests(self.settings)
        if digests:
            self.write_json(INPUTS_FILE, {"format": "datainf-run-inputs", "files": digests})
        else:
            self.stage(INPUTS_FILE).unlink(missing_ok=True)
        return self.write_json(CONFIG_FILE, self.settings)

    def release(self) -> None:
        """Release this process's lock on the folder (taken by :meth:`claim`); a no-op when it holds none.

        Done for you at the end of a :func:`removed_on_error` block (every :mod:`datainf.workflows`
        function) and when the process exits.
        """
        _release_lock(self.path)

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.release()

    # ------------------------------------------------------------------ stages
    def stage(self, name: str) -> Path:
        """The path of the stage ``name`` inside the run (a file or folder; nothing is created).

        ``name`` is relative (``adapter``, ``grads-train``, ``scores-datainf.safetensors``,
        ``report/index.html``); absolute names and ``..`` are refused.
        """
        parts = PurePosixPath(str(name).replace("\\", "/"))
        if not str(name) or parts.is_absolute() or ".." in parts.parts or Path(name).is_absolute():
            raise ConfigError(f"A stage name must be a relative path inside the run folder, got {name!r}.")
        return self.path / parts

    def load_finished(
        self,
        name: str,
        *,
        load: Callable[[Path], T],
        is_done: Callable[[Path], bool] | None = None,
        accept: Callable[[T], bool] | None = None,
    ) -> T | None:
        """The finished stage ``name`` loaded with ``load``, or ``None`` when it is not finished.

        A stage is finished when ``is_done(path)`` (default: a file, or a non-empty folder, exists
        there) and, if given, ``accept(value)`` holds for what ``load`` returned (e.g. scores that
        were computed from the current gradients). Found stages are appended to :attr:`reused`.
        """
        path = self.stage(name)
        if not _is_done(path, is_done):
            return None
        value = load(path)
        return value if self._accepted(name, value, accept) else None

    def cached(
        self,
        name: str,
        compute: Callable[[Path], T],
        *,
        load: Callable[[Path], T],
        save: Callable[[T, Path], Any] | None = None,
        is_done: Callable[[Path], bool] | None = None,
        accept: Callable[[T], bool] | None = None,
    ) -> T:
        """Reuse the finished stage ``name`` or compute it.

        If the stage is finished (see :meth:`load_finished`), returns ``load(path)``; otherwise
        returns ``compute(path)``, which either writes the stage itself (e.g. trains an adapter into
        ``path``) or returns a value that ``save(value, path)`` writes. Writing should be atomic, or
        ``is_done`` should recognise only complete results, so that an interrupted stage is redone.

        Example::

            scores = run.cached(
                "scores-datainf.safetensors",
                lambda path: influence(train, test, method="datainf"),
                load=Scores.load,
                save=lambda scores, path: scores.save(path),
            )
        """
        path = self.stage(name)
        if _is_done(path, is_done):
            value = load(path)
            if self._accepted(name, value, accept):
                return value
        computed = compute(path)
        if save is not None:
            save(computed, path)
        return computed

    def _accepted(self, name: str, value: T, accept: Callable[[T], bool] | None) -> bool:
        """Whether a loaded finished stage may be reused (recorded in :attr:`reused`)."""
        if accept is not None and not accept(value):
            logger.info("The finished stage %s in %s does not fit this run; computing it again.", name, self.path)
            return False
        self.reused.append(name)
        return True

    @contextlib.contextmanager
    def timed(self, name: str) -> Iterator[None]:
        """Add the wall time of the block to ``stage_seconds[name]`` (also when the block raises)."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.stage_seconds[name] = self.stage_seconds.get(name, 0.0) + time.perf_counter() - started

    # ------------------------------------------------------------------ small files
    def write_json(self, name: str, data: Any, *, default: Callable[[Any], Any] = str) -> Path:
        """Write ``data`` as JSON to the stage ``name``, atomically; returns its path."""
        path = self.stage(name)
        atomic_write_json(path, data, default=default)
        return path

    def read_json(self, name: str) -> Any | None:
        """The JSON content of the stage ``name``, or ``None`` when it is missing or unreadable."""
        return _read_json(self.stage(name))


def _is_done(path: Path, is_done: Callable[[Path], bool] | None) -> bool:
    """``is_done(path)``, by default: a file, or a non-empty folder, exists at ``path``."""
    if is_done is not None:
        return is_done(path)
    return path.is_file() or (path.is_dir() and any(path.iterdir()))


def _differences(stored: Any, new: Mapping[str, Any], ignore: set[str]) -> list[tuple[str, str]]:
    """``(key, description)`` of each setting whose value differs between a stored ``config.json`` and the
    new settings, sorted by key; paths that name the same file are the same (:func:`_same_value`)."""
    if not isinstance(stored, dict):
        return [(CONFIG_FILE, f"(unreadable {CONFIG_FILE})")]
    keys = sorted((set(stored) | set(new)) - ignore)
    return [
        (k, f"{k} (stored {stored.get(k)!r}, now {new.get(k)!r})")
        for k in keys
        if not _same_value(stored.get(k), new.get(k))
    ]


def _same_value(stored: Any, new: Any) -> bool:
    """Equal settings; absolute paths are equal when they resolve to the same file (``..``, symbolic links)."""
    if stored == new:
        return True
    if isinstance(stored, str) and isinstance(new, str):
        return os.path.isabs(stored) and os.path.isabs(new) and os.path.realpath(stored) == os.path.realpath(new)
    if isinstance(stored, list) and isinstance(new, list) and len(stored) == len(new):
        return all(_same_value(a, b) for a, b in zip(stored, new))
    return False


def _input_digests(settings: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Setting -> ``{"path", "bytes", "sha256"}`` of each data file the settings name (folders are left out)."""
    out: dict[str, dict[str, Any]] = {}
    for key in _DATA_FILE_KEYS:
        value = settings.get(key)
        if isinstance(value, str) and os.path.isfile(value):
            file = Path(value)
            out[key] = {"path": os.path.realpath(file), "bytes": file.stat().st_size, "sha256": file_sha256(file)}
    return out


def _changed_inputs(stored: Any, record: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Data files whose content differs from the digests in a stored ``inputs.json`` (none recorded: none)."""
    files = stored.get("files") if isinstance(stored, dict) else None
    if not isinstance(files, dict):
        return []  # a folder written before inputs.json existed: compared by path alone
    changed = []
    for key, now in _input_digests(record).items():
        before = files.get(key)
        if isinstance(before, dict) and before.get("sha256") not in (None, now["sha256"]):
            changed.append(
                (
                    key,
                    f"{key} (the file {record.get(key)} changed since the stored run: sha256 "
                    f"{str(before['sha256'])[:12]}... then, {now['sha256'][:12]}... now)",
                )
            )
    return changed


def _topmost_missing(path: Path) -> Path | None:
    """The outermost folder of ``path`` that does not exist yet (what ``mkdir(parents=True)`` creates first)."""
    missing = None
    current = path
    while not current.exists():
        missing = current
        if current.parent == current:
            break
        current = current.parent
    return missing


def _remove_if_empty(created: Path | None, out: Path) -> None:
    """Remove the folders a failed claim created (``created`` down to ``out``) when they hold nothing."""
    if created is None:
        return
    current = out
    while True:
        with contextlib.suppress(OSError):
            current.rmdir()  # only empty folders
        if current == created or current.parent == current:
            break
        current = current.parent

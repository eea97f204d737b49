"""The sharded disk store: safetensors shards plus a JSON manifest, resumable and checked (layout: :mod:`datainf.store`)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from datainf.errors import (
    BlockMismatchError,
    ConfigError,
    StoreCorruptedError,
    StoreError,
    StoreMismatchError,
)
from datainf.store.base import (
    GradientStore,
    _check_rows,
)
from datainf.store.files import (
    atomic_write_bytes,
    check_free_space,
    clear_folder,
    file_mode,
    file_sha256,
    has_content,
    output_error,
)

logger = logging.getLogger(__name__)

_FORMAT = "datainf-gradient-store"
_VERSION = 1
_NORMS_KEY = "__sq_norms__"
_MANIFEST = "manifest.json"
_PARTS = "parts"
_PENDING = "unsharded"  # durable copies of buffered examples not yet in a shard (see DiskGradientStore.checkpoint)
_PENDING_INDEX = "index.json"
_PENDING_FORMAT = "datainf-unsharded-examples"


#: Shards whose SHA-256 this process has checked (or written): ``(real path, bytes, mtime_ns, sha256)``.
_VERIFIED_SHARDS: set[tuple[str, int, int, str]] = set()


def _shard_key(file: Path, sha256: str) -> tuple[str, int, int, str] | None:
    try:
        stat = file.stat()
    except OSError:
        return None
    return (os.path.realpath(file), stat.st_size, stat.st_mtime_ns, sha256)


class DiskGradientStore(GradientStore):
    """Gradients in safetensors shards under one folder, described by ``manifest.json``.

    Attributes:
        verify_checksums: check each shard's SHA-256 against the manifest before its first read in this
            process (default ``True``; a shard changed in place is refused with its name). A shard this
            process wrote, or already checked, is not hashed again while its size and mtime stay the same.
        checkpoint_seconds: how long buffered examples (appended, not yet in a full shard) may stay in
            memory only: an append that finds the last durable write older than this writes the
            buffered rows not yet on disk to ``unsharded/`` (:meth:`checkpoint`). Default 10 s; ``0``:
            after every append; ``None``: only when :meth:`checkpoint` is called. Each checkpoint
            writes only the new rows (plus a small index), so a store's rows are written about twice.
    """

    verify_checksums: bool = True
    checkpoint_seconds: float | None = 10.0

    def __init__(
        self,
        path: Path,
        *,
        block_dims: Mapping[str, int],
        dtype: str,
        fingerprint: Mapping[str, str] | None,
        shard_size: int,
    ) -> None:
        super().__init__(block_dims, dtype, fingerprint)
        if shard_size <= 0:
            raise ConfigError(f"shard_size must be positive, got {shard_size}.")
        self.path = path
        self.shard_size = int(shard_size)
        self._shards: list[dict[str, Any]] = []
        self._buffer_ids: list[str] = []
        self._buffer: dict[str, list[torch.Tensor]] = {name: [] for name in self._block_dims}
        self._buffer_norms: list[torch.Tensor] = []
        self._norms_cache: torch.Tensor | None = None
        #: the first ``_durable`` buffered examples are on disk in the ``unsharded/`` files ``_pending``
        self._durable = 0
        self._pending: list[dict[str, Any]] = []
        self._last_durable = time.monotonic()

    # ------------------------------------------------------------------ manifest
    def _manifest(self) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "blocks": [[name, dim] for name, dim in self._block_dims.items()],
            "dtype": self._dtype_name,
            "fingerprint": self._fingerprint,
            "shard_size": self.shard_size,
            "complete": self._complete,
            "num_examples": sum(s["num_examples"] for s in self._shards),
            "shards": self._shards,
        }

    def _write_manifest(self) -> None:
        atomic_write_bytes(self.path / _MANIFEST, json.dumps(self._manifest(), indent=1).encode())

    def _same_config(self, other: dict[str, Any]) -> list[str]:
        mine = self._manifest()
        return [key for key in ("blocks", "dtype", "fingerprint", "shard_size") if mine[key] != other.get(key)]

    def expected_bytes(self, num_examples: int) -> int:
        """Bytes that ``num_examples`` more examples take on disk: per example, ``sum(d_l)`` numbers in the
        storage dtype plus ``L`` float64 squared norms; plus a safetensors header per shard (estimated)."""
        if num_examples <= 0:
            return 0
        itemsize = torch.empty((), dtype=self.torch_dtype).element_size()
        per_example = sum(self._block_dims.values()) * itemsize + len(self._block_dims) * 8
        shards = -(-num_examples // self.shard_size)
        header = 256 + 128 * (len(self._block_dims) + 1)
        return num_examples * per_example + shards * header

    def _next_shard_name(self) -> str:
        """``shard-<k>.safetensors`` for the first ``k >= len(shards)`` that no listed shard uses."""
        listed = {shard["file"] for shard in self._shards}
        index = len(self._shards)
        while f"shard-{index:05d}.safetensors" in listed:
            index += 1
        return f"shard-{index:05d}.safetensors"

    @classmethod
    def _create(
        cls,
        path: Path,
        *,
        block_dims: Mapping[str, int],
        dtype: str,
        fingerprint: Mapping[str, str] | None,
        shard_size: int,
        overwrite: bool,
        expected_examples: int | None = None,
    ) -> DiskGradientStore:
        store = cls(path, block_dims=block_dims, dtype=dtype, fingerprint=fingerprint, shard_size=shard_size)
        manifest_path = path / _MANIFEST
        if path.exists() and overwrite:
            if manifest_path.exists() or not has_content(path):
                clear_folder(path)
            else:
                raise StoreError(
                    f"{path} exists and is not a gradient store; refusing to delete it. Choose another folder."
                )
        if manifest_path.exists():
            existing = cls._open(path, drop_missing=True)
            differences = store._same_config(existing._manifest())
            if differences:
                raise StoreMismatchError(
                    f"The gradient store at {path} was written with a different {', '.join(differences)} "
                    f"(stored: {', '.join(f'{k}={existing._manifest()[k]!r}' for k in differences)[:400]}). "
                    "Pass overwrite=True (CLI: --overwrite) to replace it, or choose another folder."
                )
            existing._load_unsharded()
            existing.resumed_examples = existing.num_examples
            if existing.num_examples:
                logger.info(
                    "Resuming gradient store %s: %d examples already stored (%d of them from an unfinished shard).",
                    path,
                    existing.num_examples,
                    len(existing._buffer_ids),
                )
            if expected_examples is not None:
                remaining = int(expected_examples) - existing.num_examples
                check_free_space(path, existing.expected_bytes(remaining), "the gradient store")
            existing._complete = False
            return existing
        if path.exists() and has_content(path):
            raise StoreError(
                f"{path} exists, is not empty and holds no gradient store manifest; choose another folder."
            )
        if expected_examples is not None:
            check_free_space(path, store.expected_bytes(int(expected_examples)), "the gradient store")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise (output_error(err, path, "the gradient store") or err) from err
        store._write_manifest()
        return store

    @classmethod
    def _open(cls, path: Path, *, drop_missing: bool = False) -> DiskGradientStore:
        """Open the store at ``path``; ``drop_missing`` (resuming a store to write it) forgets shards whose file
        was deleted, so that their examples are computed again, instead of refusing the store."""
        manifest_path = path / _MANIFEST
        if not manifest_path.is_file():
            raise StoreCorruptedError(
                f"No gradient store at {path}: {_MANIFEST} is missing. Compute gradients into it first (datainf grads)."
            )
        try:
            manifest = json.loads(manifest_path.read_text())
            if manifest.get("format") != _FORMAT:
                raise ValueError(f"format is {manifest.get('format')!r}")
            if manifest.get("version") != _VERSION:
                raise ValueError(f"version {manifest.get('version')!r} is not {_VERSION}")
            block_dims = {str(name): int(dim) for name, dim in manifest["blocks"]}
            store = cls(
                path,
                block_dims=block_dims,
                dtype=str(manifest["dtype"]),
                fingerprint=manifest.get("fingerprint") or {},
                shard_size=int(manifest["shard_size"]),
            )
            shards = list(manifest["shards"])
            for shard in shards:
                for key in ("file", "num_examples", "ids", "bytes", "sha256"):
                    if key not in shard:
                        raise ValueError(f"a shard entry lacks {key!r}")
        except (ValueError, KeyError, TypeError) as err:
            raise StoreCorruptedError(
                f"The gradient store manifest {manifest_path} is unreadable ({err}). Delete {path} and recompute the gradients."
            ) from err
        except ConfigError as err:
            raise StoreCorruptedError(f"The gradient store manifest {manifest_path} is invalid: {err}") from err
        kept = []
        for shard in shards:
            file = path / shard["file"]
            if not file.is_file() and drop_missing:
                logger.warning(
                    "Shard %s of the gradient store %s is missing; its %d examples will be computed again.",
                    shard["file"],
                    path,
                    shard["num_examples"],
                )
                continue
            kept.append(shard)
            if not file.is_file():
                raise StoreCorruptedError(
                    f"Shard {file} listed in {manifest_path} is missing. Rerun the command that wrote the store "
                    "(datainf grads / score, same settings) to compute its examples again, or restore the file."
                )
            if file.stat().st_size != shard["bytes"]:
                raise StoreCorruptedError(
                    f"Shard {file} has {file.stat().st_size} bytes but the manifest records {shard['bytes']}: it is "
                    f"truncated or was replaced. {_shard_remedy(file, path)}"
                )
            if len(shard["ids"]) != shard["num_examples"]:
                raise StoreCorruptedError(
                    f"Shard {file}: the manifest lists {len(shard['ids'])} ids for {shard['num_examples']} examples."
                )
            store._ids.extend(shard["ids"])
        store._shards = kept
        store._id_set = set(store._ids)
        if len(store._id_set) != len(store._ids):
            raise StoreCorruptedError(
                f"The gradient store at {path} lists some example ids twice; delete it and recompute."
            )
        store._complete = bool(manifest.get("complete", False))
        return store

    # ------------------------------------------------------------------ writing
    def _write(self, ids: list[str], grads: dict[str, torch.Tensor], sq_norms: torch.Tensor) -> None:
        self._buffer_ids.extend(ids)
        for name, tensor in grads.items():
            self._buffer[name].append(tensor)
        self._buffer_norms.append(sq_norms)
        while len(self._buffer_ids) >= self.shard_size:
            self._write_shard(self.shard_size)
        every = self.checkpoint_seconds
        if self._buffer_ids and every is not None and time.monotonic() - self._last_durable >= every:
            self.checkpoint()

    @property
    def buffered_ids(self) -> list[str]:
        return list(self._buffer_ids)

    def flush(self) -> None:
        while self._buffer_ids:
            self._write_shard(min(self.shard_size, len(self._buffer_ids)))

    def finalize(self) -> None:
        self.flush()
        self._complete = True
        self._write_manifest()
        self._clear_unsharded()

    # ------------------------------------------------------------------ unsharded examples (checkpoints between shards)
    def checkpoint(self) -> int:
        """Make every buffered example durable without cutting a shard; returns how many rows were written.

        The buffered rows not yet on disk go to one new file ``unsharded/shard-pending-<token>.safetensors``
        (the shard layout: one tensor per block plus the squared norms; the ids in its metadata), then
        ``unsharded/index.json`` lists it; both are written atomically. Reopening the store with
        :meth:`GradientStore.create` puts those examples back in the buffer, so the shard they later
        go into is exactly the one an uninterrupted run writes. Called every :attr:`checkpoint_seconds`
        by appends, and by :func:`~datainf.gradients.collect_gradients` when it is interrupted.
        """
        count = len(self._buffer_ids) - self._durable
        if count <= 0:
            self._last_durable = time.monotonic()
            return 0
        self._write_pending(self._buffer_rows(self._durable, len(self._buffer_ids)))
        self._durable = len(self._buffer_ids)
        self._last_durable = time.monotonic()
        return count

    def _buffer_rows(self, start: int, stop: int) -> tuple[list[str], dict[str, torch.Tensor]]:
        """Buffered rows ``start:stop``: ``(ids, {block: (k, d_l)} + {norms key: (k, L)})`` (the buffer is
        joined into one tensor per block on the way, so later calls do not join it again)."""
        tensors: dict[str, torch.Tensor] = {}
        for name in self._block_dims:
            joined = torch.cat(self._buffer[name]) if len(self._buffer[name]) != 1 else self._buffer[name][0]
            self._buffer[name] = [joined]
            tensors[name] = joined[start:stop].contiguous()
        norms = torch.cat(self._buffer_norms) if len(self._buffer_norms) != 1 else self._buffer_norms[0]
        self._buffer_norms = [norms]
        tensors[_NORMS_KEY] = norms[start:stop].contiguous()
        return self._buffer_ids[start:stop], tensors

    def _write_pending(self, rows: tuple[list[str], dict[str, torch.Tensor]]) -> None:
        """Write ``rows`` as a new unsharded file and list it in the index (after the listed ones)."""
        ids, tensors = rows
        folder = self.path / _PENDING
        file_name = f"shard-pending-{uuid.uuid4().hex[:12]}.safetensors"
        check_free_space(self.path, self.expected_bytes(len(ids)), "the gradient store's unsharded examples")
        try:
            folder.mkdir(exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{file_name}.", suffix=".tmp", dir=folder)
            os.close(fd)
        except OSError as err:
            raise (output_error(err, folder, "the gradient store") or err) from err
        try:
            save_file(tensors, tmp, metadata={"format": _PENDING_FORMAT, "ids": json.dumps(ids)})
            os.chmod(tmp, file_mode())
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
            entry = {
                "file": file_name,
                "num_examples": len(ids),
                "bytes": os.path.getsize(tmp),
                "sha256": file_sha256(Path(tmp)),
            }
            os.replace(tmp, folder / file_name)
        except BaseException as err:
            Path(tmp).unlink(missing_ok=True)
            converted = None if isinstance(err, (KeyboardInterrupt, SystemExit)) else output_error(err, folder)
            if converted is not None:
                raise converted from err
            raise
        self._pending.append(entry)
        self._write_pending_index()

    def _write_pending_index(self) -> None:
        index = {"format": _PENDING_FORMAT, "version": _VERSION, "files": self._pending}
        atomic_write_bytes(self.path / _PENDING / _PENDING_INDEX, json.dumps(index, indent=1).encode())

    def _after_shard(self, count: int) -> None:
        """The first ``count`` buffered rows went into a shard: keep only the durable rows that are left.

        The rows still durable are rewritten as one new unsharded file (at most a shard's worth) before
        the old files are dropped, so a crash at any point leaves every durable row on disk, in a shard
        or in ``unsharded/`` (rows found in both are taken from the shard on reopening).
        """
        left = max(0, self._durable - count)
        self._durable = left
        self._last_durable = time.monotonic()
        if not self._pending:
            return
        old = list(self._pending)
        self._pending = []
        if left:
            self._write_pending(self._buffer_rows(0, left))
        else:
            self._write_pending_index()
        for entry in old:
            (self.path / _PENDING / entry["file"]).unlink(missing_ok=True)
        if not self._pending:
            self._clear_unsharded()

    def _clear_unsharded(self) -> None:
        """Remove the ``unsharded/`` folder (every buffered example is in a shard, or the store is finished)."""
        self._pending = []
        self._durable = 0
        folder = self.path / _PENDING
        if folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)

    def _load_unsharded(self) -> None:
        """Put the examples checkpointed in ``unsharded/`` back in the buffer (reopening to write).

        Rows whose ids are already in a listed shard are skipped (a crash right after their shard was
        written). Anything unreadable or inconsistent is dropped with a warning: those examples are
        simply computed again.
        """
        folder = self.path / _PENDING
        index = folder / _PENDING_INDEX
        if not index.is_file():
            if folder.is_dir():
                shutil.rmtree(folder, ignore_errors=True)  # files of a checkpoint whose index never got written
            return
        loaded_ids: list[str] = []
        loaded: dict[str, list[torch.Tensor]] = {name: [] for name in [*self._block_dims, _NORMS_KEY]}
        try:
            data = json.loads(index.read_text())
            if data.get("format") != _PENDING_FORMAT or data.get("version") != _VERSION:
                raise ValueError(f"format {data.get('format')!r}, version {data.get('version')!r}")
            entries = list(data["files"])
            seen = set(self._id_set)
            for entry in entries:
                file = folder / str(entry["file"])
                if (
                    not file.is_file()
                    or file.stat().st_size != int(entry["bytes"])
                    or file_sha256(file) != entry["sha256"]
                ):
                    raise ValueError(f"{file.name} is missing or changed")
                with safe_open(str(file), framework="pt") as handle:
                    ids = [str(i) for i in json.loads((handle.metadata() or {})["ids"])]
                    tensors = {name: handle.get_tensor(name) for name in loaded}
                for name, tensor in tensors.items():
                    width = len(self._block_dims) if name == _NORMS_KEY else self._block_dims[name]
                    wanted = torch.float64 if name == _NORMS_KEY else self.torch_dtype
                    if tuple(tensor.shape) != (len(ids), width) or tensor.dtype != wanted:
                        raise ValueError(f"{file.name}: tensor {name!r} is {tuple(tensor.shape)} {tensor.dtype}")
                keep = [k for k, example in enumerate(ids) if example not in seen]
                seen.update(ids)
                if len(keep) != len(ids):
                    rows = torch.tensor(keep, dtype=torch.long)
                    tensors = {name: tensor.index_select(0, rows) for name, tensor in tensors.items()}
                loaded_ids.extend(ids[k] for k in keep)
                for name, tensor in tensors.items():
                    loaded[name].append(tensor)
        except Exception as err:  # a damaged checkpoint is recomputed, never trusted
            logger.warning(
                "Ignoring the unsharded examples checkpointed in %s (%s); they will be computed again.", folder, err
            )
            shutil.rmtree(folder, ignore_errors=True)
            return
        self._pending = entries
        if not loaded_ids:
            return
        self._buffer_ids = loaded_ids
        self._buffer = {name: [torch.cat(loaded[name])] for name in self._block_dims}
        self._buffer_norms = [torch.cat(loaded[_NORMS_KEY])]
        self._durable = len(loaded_ids)
        self._ids.extend(loaded_ids)
        self._id_set.update(loaded_ids)
        self._last_durable = time.monotonic()

    def _write_shard(self, count: int) -> None:
        """Write the first ``count`` buffered examples as the next shard, then list it in the manifest.

        The buffer is only advanced once the shard is in place, so a failed write (a full disk) loses
        nothing that a rerun would not recompute, and leaves no temporary file.
        """
        ids = self._buffer_ids[:count]
        tensors: dict[str, torch.Tensor] = {}
        rest: dict[str, list[torch.Tensor]] = {}
        for name in self._block_dims:
            joined = torch.cat(self._buffer[name])
            tensors[name] = joined[:count].contiguous()
            rest[name] = [joined[count:]] if joined.shape[0] > count else []
        norms = torch.cat(self._buffer_norms)
        tensors[_NORMS_KEY] = norms[:count].contiguous()
        rest_norms = [norms[count:]] if norms.shape[0] > count else []

        file_name = self._next_shard_name()
        final = self.path / file_name
        check_free_space(self.path, self.expected_bytes(count), f"shard {file_name} of the gradient store")
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{file_name}.", suffix=".tmp", dir=self.path)
            os.close(fd)
        except OSError as err:
            raise (output_error(err, final, "the gradient store shard") or err) from err
        try:
            save_file(tensors, tmp, metadata={"format": _FORMAT})
            os.chmod(tmp, file_mode())  # safetensors makes its own (private) file
            digest = file_sha256(Path(tmp))
            size = os.path.getsize(tmp)
            os.replace(tmp, final)
        except BaseException as err:
            Path(tmp).unlink(missing_ok=True)
            converted = None if isinstance(err, (KeyboardInterrupt, SystemExit)) else output_error(err, final)
            if converted is not None:
                raise converted from err
            raise
        self._buffer = rest
        self._buffer_norms = rest_norms
        self._buffer_ids = self._buffer_ids[count:]
        key = _shard_key(final, digest)
        if key is not None:
            _VERIFIED_SHARDS.add(key)  # written (and hashed) by this process: no need to hash it again on read
        self._shards.append({"file": file_name, "num_examples": count, "ids": ids, "bytes": size, "sha256": digest})
        self._norms_cache = None
        self._write_manifest()
        self._after_shard(count)

    def _check_shard(self, shard: dict[str, Any]) -> None:
        """Compare the shard file's SHA-256 with the manifest's, once per process (see :attr:`verify_checksums`)."""
        if not self.verify_checksums:
            return
        file = self.path / shard["file"]
        key = _shard_key(file, str(shard["sha256"]))
        if key is not None and key in _VERIFIED_SHARDS:
            return
        try:
            actual = file_sha256(file)
        except OSError as err:
            raise StoreCorruptedError(f"Shard {file} cannot be read ({err}). {_shard_remedy(file, self.path)}") from err
        if actual != shard["sha256"]:
            raise StoreCorruptedError(
                f"Shard {shard['file']} of the gradient store {self.path} does not match the SHA-256 recorded in "
                f"its manifest: its bytes changed after it was written (a disk fault, or the file was edited). "
                f"{_shard_remedy(file, self.path)}"
            )
        if key is not None:
            _VERIFIED_SHARDS.add(key)

    # ------------------------------------------------------------------ reading
    def _read_shard(
        self, shard: dict[str, Any], names: Sequence[str], part: tuple[int, int] | None = None
    ) -> dict[str, torch.Tensor]:
        """The shard's tensors ``names``; ``part=(a, b)`` reads only rows ``a:b`` of each."""
        file = self.path / shard["file"]
        self._check_shard(shard)
        try:
            with safe_open(str(file), framework="pt") as handle:
                if part is None:
                    out = {name: handle.get_tensor(name) for name in names}
                else:
                    out = {name: handle.get_slice(name)[part[0] : part[1]] for name in names}
        except Exception as err:  # safetensors raises several error types on damaged files
            raise StoreCorruptedError(
                f"Shard {file} cannot be read ({type(err).__name__}: {err}). {_shard_remedy(file, self.path)}"
            ) from err
        count = shard["num_examples"] if part is None else part[1] - part[0]
        for name, tensor in out.items():
            expected = (count, len(self._block_dims) if name == _NORMS_KEY else self._block_dims[name])
            if tuple(tensor.shape) != expected:
                raise StoreCorruptedError(
                    f"Shard {file}: tensor {name!r} has shape {tuple(tensor.shape)}, the manifest implies {expected}. "
                    "Delete the store folder and recompute the gradients."
                )
        return out

    def iter_batches(
        self, batch_size: int = 1024, blocks: Sequence[str] | None = None, rows: range | None = None
    ) -> Iterator[tuple[list[str], dict[str, torch.Tensor]]]:
        if batch_size <= 0:
            raise ConfigError(f"batch_size must be positive, got {batch_size}.")
        if self._buffer_ids:
            self.flush()
        wanted = _check_rows(rows, self.num_examples)
        names = list(self._block_dims) if blocks is None else list(blocks)
        unknown = [n for n in names if n not in self._block_dims]
        if unknown:
            raise BlockMismatchError(f"Unknown blocks {unknown[:5]}; the store holds {list(self._block_dims)[:5]}...")
        offset = 0
        for shard in self._shards:
            count = shard["num_examples"]
            first, last = max(wanted.start - offset, 0), min(wanted.stop - offset, count)
            offset += count
            if first >= last:
                continue
            whole = first == 0 and last == count
            tensors = self._read_shard(shard, names, None if whole else (first, last))
            ids = shard["ids"][first:last]
            for start in range(0, last - first, batch_size):
                stop = start + batch_size
                yield ids[start:stop], {name: tensors[name][start:stop] for name in names}

    def squared_norms(self) -> torch.Tensor:
        if self._buffer_ids:
            self.flush()
        if self._norms_cache is None:
            parts = [self._read_shard(shard, [_NORMS_KEY])[_NORMS_KEY] for shard in self._shards]
            self._norms_cache = (
                torch.cat(parts) if parts else torch.empty(0, len(self._block_dims), dtype=torch.float64)
            )
        return self._norms_cache

    # ------------------------------------------------------------------ parts (multi-process writing)
    def create_part(self, name: str) -> DiskGradientStore:
        """A new part store at ``<path>/parts/<name>`` with this store's configuration.

        Under ``torch.distributed`` each rank writes its examples into its own part (no two processes
        ever write the same file); rank 0 then folds the parts into this store's manifest with
        :meth:`adopt_parts`. A part is itself a valid, resumable disk store.
        """
        if not name or "/" in name or name.startswith("."):
            raise ConfigError(f"Part name {name!r} is not a plain folder name.")
        return DiskGradientStore._create(
            self.path / _PARTS / name,
            block_dims=self._block_dims,
            dtype=self._dtype_name,
            fingerprint=self._fingerprint,
            shard_size=self.shard_size,
            overwrite=False,
        )

    def adopt_parts(self, order: Sequence[str] | None = None) -> int:
        """List the finished shards of every part under ``<path>/parts/`` in this store's manifest.

        A part left by a process that died lists the shards it finished; they are kept, so a rerun
        only computes what is missing. The part manifests are removed once the main manifest lists
        their shards (the shard files stay where they are). With ``order`` (every example id in
        dataset order) the shards are then sorted by the position of their first example, which puts
        the store in dataset order when each shard holds a contiguous run of the dataset.

        Returns:
            The number of examples adopted.

        Raises:
            StoreMismatchError: a part was written with another configuration (blocks, dtype,
                fingerprint or shard size).
            StoreCorruptedError: a part's shard is missing or truncated, or repeats stored examples.
        """
        root = self.path / _PARTS
        manifests = sorted(root.glob(f"*/{_MANIFEST}")) if root.is_dir() else []
        if not manifests:
            if order is not None:
                self.sort_shards(order)
            return 0
        if self._buffer_ids:
            self.flush()
        listed = {shard["file"] for shard in self._shards}
        adopted = 0
        for manifest in manifests:
            part = DiskGradientStore._open(manifest.parent)
            if (manifest.parent / _PENDING).is_dir():  # examples the part's process had checkpointed between shards
                part._load_unsharded()
                part.flush()
            differences = self._same_config(part._manifest())
            if differences:
                raise StoreMismatchError(
                    f"The part {manifest.parent} of the gradient store {self.path} was written with a different "
                    f"{', '.join(differences)}. Delete that part folder (or pass overwrite=True / --overwrite to start over)."
                )
            prefix = manifest.parent.relative_to(self.path).as_posix()
            for shard in part._shards:
                entry = dict(shard, file=f"{prefix}/{shard['file']}")
                if entry["file"] in listed:
                    continue
                repeated = [i for i in entry["ids"] if i in self._id_set]
                if repeated:
                    raise StoreCorruptedError(
                        f"The part shard {self.path / entry['file']} repeats examples already in the store "
                        f"({repeated[:5]}); delete {manifest.parent} and rerun the same command."
                    )
                self._shards.append(entry)
                listed.add(entry["file"])
                self._ids.extend(entry["ids"])
                self._id_set.update(entry["ids"])
                adopted += len(entry["ids"])
        if order is not None:
            self.sort_shards(order)
        self._norms_cache = None
        self._write_manifest()
        for manifest in manifests:
            manifest.unlink(missing_ok=True)
        if adopted:
            logger.info("Gradient store %s: adopted %d examples written by parallel processes.", self.path, adopted)
        return adopted

    def sort_shards(self, order: Sequence[str]) -> None:
        """Reorder the shard list by the position in ``order`` of each shard's first example (stable;
        ids not in ``order`` go last). Takes effect in the manifest at the next write (e.g. :meth:`finalize`)."""
        position = {example: k for k, example in enumerate(order)}
        last = len(position)

        def key(shard: Mapping[str, Any]) -> int:
            return position.get(shard["ids"][0], last) if shard["ids"] else last

        in_order = sorted(self._shards, key=key) == self._shards
        if in_order and (
            not self._buffer_ids or not self._shards or key({"ids": self._buffer_ids}) >= key(self._shards[-1])
        ):
            return  # already in order, buffered examples last: they stay buffered (their shard is not cut early)
        if self._buffer_ids:
            self.flush()
        self._shards.sort(key=key)
        self._ids = [example for shard in self._shards for example in shard["ids"]]
        self._norms_cache = None

    def verify(self) -> None:
        """Check every shard's SHA-256 against the manifest (reads the whole store once)."""
        for shard in self._shards:
            file = self.path / shard["file"]
            if file_sha256(file) != shard["sha256"]:
                raise StoreCorruptedError(
                    f"Shard {file} does not match its recorded checksum: its contents changed after it was written. "
                    f"{_shard_remedy(file, self.path)}"
                )
        for shard in self._shards:
            norms = self._read_shard(shard, [_NORMS_KEY])[_NORMS_KEY]
            if not torch.isfinite(norms).all() or (norms < 0).any():
                raise StoreCorruptedError(f"Shard {self.path / shard['file']} holds invalid squared norms.")


def _shard_remedy(file: Path, store: Path) -> str:
    """What to do about a damaged shard: delete it and rerun the store's command, which recomputes only its examples."""
    return (
        f"Delete {file} and rerun the command that wrote {store} (datainf grads / score, same settings): it computes "
        "that shard's examples again. Or delete the whole store folder to recompute everything."
    )

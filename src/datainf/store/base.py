"""The gradient-source interface and the in-memory store (the disk store: :mod:`datainf.store.disk`).

:class:`GradientSource` is what the engine and the methods read; :class:`GradientStore` adds
appending, finalising and the constructors (:meth:`GradientStore.create`, :meth:`GradientStore.open`,
:meth:`GradientStore.from_tensors`); :class:`RamGradientStore` keeps the rows in memory. The row
norms helper :func:`row_squared_norms` is the one every source records ``||g_il||^2`` with.
"""

from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch

from datainf.errors import (
    BlockMismatchError,
    ConfigError,
    EmptyInputError,
    NonFiniteGradientError,
    StoreError,
)

if TYPE_CHECKING:
    from datainf.store.disk import DiskGradientStore

logger = logging.getLogger(__name__)

STORAGE_DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def _non_finite_ids(values: torch.Tensor, ids: Sequence[str], limit: int = 10) -> list[str]:
    bad_rows = (~torch.isfinite(values)).reshape(values.shape[0], -1).any(dim=1).nonzero().flatten().tolist()
    return [ids[i] for i in bad_rows[:limit]] + (["..."] if len(bad_rows) > limit else [])


_NORM_CHUNK_ELEMENTS = 1 << 17  # float64 numbers per row chunk of _row_squared_norms (1 MiB: stays in cache)


def _row_squared_norms(block: torch.Tensor) -> torch.Tensor:
    """``||row||^2`` of every row of a ``(b, d)`` block, float64 ``(b,)``, accumulated in float64.

    Taken in row chunks of about ``_NORM_CHUNK_ELEMENTS`` numbers, so that the float64 copy is one
    chunk, not the whole block. Each row's reduction is the same whatever the chunk (same values,
    bit for bit, as one call on the block); a chunk never holds a lone row of a larger block (a
    single-row reduction may be split across threads, which rounds differently).
    """
    rows, dim = block.shape
    out = torch.empty(rows, dtype=torch.float64)
    step = max(2, _NORM_CHUNK_ELEMENTS // max(dim, 1))
    start = 0
    while start < rows:
        stop = min(rows, start + step)
        if rows - stop == 1:
            stop = rows
        out[start:stop] = torch.linalg.vector_norm(block[start:stop], dim=1, dtype=torch.float64).square()
        start = stop
    return out


#: The public name of :func:`_row_squared_norms` (what every gradient source records as ``||g_il||^2``).
row_squared_norms = _row_squared_norms


def _checked_seconds(value: float | None) -> float | None:
    """A checkpoint interval: ``None`` or a number of seconds ``>= 0``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ConfigError(f"checkpoint_seconds must be a number of seconds >= 0 (or None), got {value!r}.")
    return float(value)


def _check_rows(rows: range | None, n: int) -> range:
    """``rows`` checked against a store of ``n`` examples (``None`` -> every row)."""
    if rows is None:
        return range(n)
    if rows.step != 1 or rows.start < 0 or rows.stop > n or rows.start > rows.stop:
        raise ConfigError(f"rows must be a contiguous range inside range({n}), got {rows!r}.")
    return rows


def _validate_block_dims(block_dims: Mapping[str, int]) -> dict[str, int]:
    if not block_dims:
        raise ConfigError("A gradient store needs at least one block (a mapping block name -> size d_l); got none.")
    out: dict[str, int] = {}
    for name, dim in block_dims.items():
        if not isinstance(name, str) or not name or name.startswith("__"):
            raise ConfigError(
                f"Block name {name!r} is not usable: names must be non-empty strings not starting with '__'."
            )
        if int(dim) <= 0:
            raise ConfigError(f"Block {name!r} has size {dim}; every block needs at least one parameter.")
        out[name] = int(dim)
    return out


@runtime_checkable
class GradientSource(Protocol):
    """What the influence engine and the methods read from training gradients: a store, or anything alike.

    :class:`GradientStore` satisfies it; so does :class:`datainf.gradients.OnTheFlyGradients`, which
    computes the gradients again on every pass instead of reading them from disk. ``n`` examples,
    block ``l`` an ``(n, d_l)`` matrix ``X_l``; every read is a streaming pass over row ranges.
    """

    @property
    def ids(self) -> list[str]:
        """The ``n`` example ids, in row order."""
        ...

    @property
    def block_dims(self) -> dict[str, int]:
        """Block name -> ``d_l``, in a fixed order (the column order of :meth:`squared_norms`)."""
        ...

    @property
    def num_examples(self) -> int: ...

    @property
    def dtype(self) -> str:
        """Name of the dtype the rows come in (a key of :data:`STORAGE_DTYPES`)."""
        ...

    @property
    def torch_dtype(self) -> torch.dtype: ...

    @property
    def fingerprint(self) -> dict[str, str]:
        """Strings identifying what produced the gradients (key ``"model"``: base model + adapter)."""
        ...

    @property
    def is_complete(self) -> bool: ...

    def squared_norms(self) -> torch.Tensor:
        """``||g_il||^2`` of every example and block: float64 ``(n, L)`` in :attr:`block_dims` order."""
        ...

    def iter_batches(
        self, batch_size: int = 1024, blocks: Sequence[str] | None = None, rows: range | None = None
    ) -> Iterator[tuple[list[str], dict[str, torch.Tensor]]]:
        """One pass: ``(ids, {block: (b, d_l)})`` in row order, ``b <= batch_size``, over ``rows`` (default all)."""
        ...

    def to_dict(self) -> dict[str, torch.Tensor]:
        """Every block as one ``(n, d_l)`` tensor (everything in memory: for small test sets)."""
        ...


class GradientStore(ABC):
    """Per-example gradients of ``n`` examples, block by block; appendable and readable in batches.

    Create one with :meth:`create` (``path=None`` gives the RAM backend), :meth:`open` an existing
    disk store, or wrap in-memory tensors with :meth:`from_tensors`.
    """

    def __init__(self, block_dims: Mapping[str, int], dtype: str, fingerprint: Mapping[str, str] | None) -> None:
        if dtype not in STORAGE_DTYPES:
            raise ConfigError(f"Storage dtype {dtype!r} is not supported; use one of {sorted(STORAGE_DTYPES)}.")
        self._block_dims = _validate_block_dims(block_dims)
        self._dtype_name = dtype
        self._fingerprint = {str(k): str(v) for k, v in (fingerprint or {}).items()}
        self._ids: list[str] = []
        self._id_set: set[str] = set()
        self._complete = False
        #: Examples this store object found already written when it was reopened to be written
        #: (:meth:`create` resuming an unfinished disk store: its shards and its checkpointed
        #: unsharded examples); ``0`` for a new store or one opened to read.
        self.resumed_examples = 0

    # ------------------------------------------------------------------ construction
    @staticmethod
    def create(
        path: str | os.PathLike[str] | None = None,
        *,
        block_dims: Mapping[str, int],
        dtype: str = "float32",
        fingerprint: Mapping[str, str] | None = None,
        shard_size: int = 1024,
        overwrite: bool = False,
        expected_examples: int | None = None,
        checkpoint_seconds: float | None = None,
    ) -> GradientStore:
        """Make a new store, or reopen an unfinished disk store with the same configuration.

        Args:
            path: folder of a disk store, or ``None`` for the RAM backend.
            block_dims: block name -> number of parameters ``d_l``, in a fixed order.
            dtype: storage dtype, one of ``float32`` (default), ``bfloat16``, ``float16``, ``float64``.
            fingerprint: strings identifying what produced the gradients; key ``"model"`` identifies
                the base model + adapter and must agree between train and test stores.
            shard_size: examples per shard file (disk backend).
            overwrite: delete an existing store at ``path`` instead of resuming it.
            expected_examples: how many examples the store will hold when finished (disk backend): the
                free disk space is checked against the size of those not stored yet before anything is
                written (:meth:`DiskGradientStore.expected_bytes`). ``None`` skips that check; every shard
                is still checked before it is written.
            checkpoint_seconds: (disk backend) write the examples buffered for the next shard to
                ``unsharded/`` at most this many seconds after the last durable write
                (:meth:`DiskGradientStore.checkpoint`); ``0`` after every append, ``None`` keeps the
                default (:attr:`DiskGradientStore.checkpoint_seconds`, 10 s). Reopening an unfinished
                store picks those examples up again (:attr:`GradientStore.resumed_examples` counts
                everything kept).

        Raises:
            DiskFullError: less free space than ``expected_examples`` need.
        """
        from datainf.store.disk import DiskGradientStore  # the disk backend builds on this module

        seconds = _checked_seconds(checkpoint_seconds)
        if path is None:
            return RamGradientStore(block_dims=block_dims, dtype=dtype, fingerprint=fingerprint)
        store = DiskGradientStore._create(
            Path(path),
            block_dims=block_dims,
            dtype=dtype,
            fingerprint=fingerprint,
            shard_size=shard_size,
            overwrite=overwrite,
            expected_examples=expected_examples,
        )
        if seconds is not None:
            store.checkpoint_seconds = seconds
        return store

    @staticmethod
    def open(path: str | os.PathLike[str]) -> DiskGradientStore:
        """Open an existing disk store for reading (refuses corrupted or unknown folders).

        Each shard's SHA-256 is checked against the manifest the first time this process reads it
        (:attr:`DiskGradientStore.verify_checksums`)."""
        from datainf.store.disk import DiskGradientStore

        return DiskGradientStore._open(Path(path))

    @staticmethod
    def from_tensors(
        grads: Mapping[str, torch.Tensor],
        *,
        ids: Sequence[str] | None = None,
        fingerprint: Mapping[str, str] | None = None,
    ) -> RamGradientStore:
        """Wrap in-memory gradients: block name -> tensor of shape ``(n, d_l)`` (or ``(n, *shape)``).

        The dtype is kept when it is a storage dtype (float64 stays float64), else float32.
        """
        if not grads:
            raise EmptyInputError("No gradient blocks were given: pass a mapping block name -> tensor (n, d_l).")
        first = next(iter(grads.values()))
        n = int(first.shape[0]) if first.dim() > 0 else 0
        if n == 0:
            raise EmptyInputError("The gradients hold no examples (n = 0).")
        dims: dict[str, int] = {}
        flat: dict[str, torch.Tensor] = {}
        for name, tensor in grads.items():
            if not isinstance(tensor, torch.Tensor):
                raise ConfigError(f"Block {name!r} is a {type(tensor).__name__}, not a torch.Tensor of shape (n, d_l).")
            if tensor.dim() < 2 or tensor.shape[0] != n:
                raise BlockMismatchError(
                    f"Block {name!r} has shape {tuple(tensor.shape)}; every block must be (n, d_l) with the same n "
                    f"(the first block has n={n})."
                )
            flat[name] = tensor.reshape(n, -1)
            dims[name] = flat[name].shape[1]
        dtype = next((k for k, v in STORAGE_DTYPES.items() if v == first.dtype), "float32")
        store = RamGradientStore(block_dims=dims, dtype=dtype, fingerprint=fingerprint)
        store.append([str(i) for i in range(n)] if ids is None else list(ids), flat)
        store.finalize()
        return store

    # ------------------------------------------------------------------ properties
    @property
    def block_dims(self) -> dict[str, int]:
        """Block name -> size ``d_l``, in storage order."""
        return dict(self._block_dims)

    @property
    def dtype(self) -> str:
        """Storage dtype name."""
        return self._dtype_name

    @property
    def torch_dtype(self) -> torch.dtype:
        return STORAGE_DTYPES[self._dtype_name]

    @property
    def fingerprint(self) -> dict[str, str]:
        return dict(self._fingerprint)

    @property
    def ids(self) -> list[str]:
        """Ids of the stored examples, in storage order (buffered, unflushed ones included)."""
        return list(self._ids)

    @property
    def num_examples(self) -> int:
        return len(self._ids)

    @property
    def is_complete(self) -> bool:
        return self._complete

    @property
    def buffered_ids(self) -> list[str]:
        """Ids appended but not yet written into a shard (disk backend; always empty for the RAM backend),
        in append order: the last rows of :attr:`ids`."""
        return []

    def __len__(self) -> int:
        return len(self._ids)

    def __enter__(self) -> GradientStore:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.finalize()
        else:
            self.flush()

    # ------------------------------------------------------------------ writing
    def append(self, ids: Sequence[str], grads: Mapping[str, torch.Tensor]) -> None:
        """Add a batch of ``b`` examples: ``grads[name]`` has shape ``(b, d_l)`` (or ``(b, *shape)``).

        Raises:
            BlockMismatchError: block names or sizes differ from the store's.
            NonFiniteGradientError: a value is NaN/inf (before or after the cast to the storage dtype).
            StoreError: an id is already stored, or the store is finalized.
        """
        if self._complete:
            raise StoreError(
                "This gradient store is finalized; create a new one (or pass overwrite=True) to add examples."
            )
        ids = [str(i) for i in ids]
        b = len(ids)
        if b == 0:
            return
        missing = [k for k in self._block_dims if k not in grads]
        extra = [k for k in grads if k not in self._block_dims]
        if missing or extra:
            raise BlockMismatchError(
                f"The batch's blocks do not match the store's: missing {missing[:5]}, unexpected {extra[:5]}. "
                "Collect gradients with the same model and adapter as the store was created for."
            )
        dupes = [i for i in ids if i in self._id_set]
        if dupes or len(set(ids)) != b:
            raise StoreError(f"Example ids must be unique; already stored or repeated: {dupes[:10] or ids[:10]}.")
        target = self.torch_dtype
        stored: dict[str, torch.Tensor] = {}
        norms = torch.empty(b, len(self._block_dims), dtype=torch.float64)
        for j, (name, dim) in enumerate(self._block_dims.items()):
            tensor = grads[name].detach()
            if tensor.shape[0] != b or tensor[0].numel() != dim:
                raise BlockMismatchError(
                    f"Block {name!r}: got shape {tuple(tensor.shape)} for {b} examples, expected ({b}, {dim})."
                )
            tensor = tensor.reshape(b, dim)
            cast = tensor.to(device="cpu", dtype=target).contiguous()
            # A row holds NaN/inf exactly when its squared norm (float64, no overflow for 16/32-bit values) does.
            squared = _row_squared_norms(cast)
            if not torch.isfinite(squared).all():
                original_finite = torch.isfinite(tensor).all() if cast is not tensor else False
                if original_finite:
                    raise NonFiniteGradientError(
                        f"Block {name!r} overflows the storage dtype {self._dtype_name} for examples "
                        f"{_non_finite_ids(cast, ids)}; use dtype='bfloat16' or 'float32'."
                    )
                raise NonFiniteGradientError(
                    f"Non-finite gradient in block {name!r} for examples {_non_finite_ids(tensor, ids)}. "
                    "Check these examples' losses (empty targets, extreme values) or lower the learning rate of the fine-tune."
                )
            stored[name] = cast
            norms[:, j] = squared
        self._write(ids, stored, norms)
        self._ids.extend(ids)
        self._id_set.update(ids)

    def flush(self) -> None:  # noqa: B027 - a hook: the disk backend overrides it, the RAM backend has nothing to do
        """Write buffered examples out (disk backend); a no-op for the RAM backend."""

    def finalize(self) -> None:
        """Flush and mark the store complete; further appends are refused."""
        self.flush()
        self._complete = True

    @abstractmethod
    def _write(self, ids: list[str], grads: dict[str, torch.Tensor], sq_norms: torch.Tensor) -> None: ...

    # ------------------------------------------------------------------ reading
    @abstractmethod
    def iter_batches(
        self, batch_size: int = 1024, blocks: Sequence[str] | None = None, rows: range | None = None
    ) -> Iterator[tuple[list[str], dict[str, torch.Tensor]]]:
        """Yield ``(ids, {block: tensor (b, d_l)})`` in storage order, ``b <= batch_size``, storage dtype.

        Batches never span two shards, so their sizes may vary. ``blocks`` restricts what is read;
        ``rows`` (a contiguous ``range`` of row indices, step 1) restricts which examples are read,
        e.g. one process's share under ``torch.distributed``.
        """

    @abstractmethod
    def squared_norms(self) -> torch.Tensor:
        """``||g_il||^2`` of every stored example and block: float64 tensor of shape ``(n, L)`` (block order)."""

    def to_dict(self) -> dict[str, torch.Tensor]:
        """Every block as one ``(n, d_l)`` tensor in the storage dtype (loads everything into RAM)."""
        parts: dict[str, list[torch.Tensor]] = {name: [] for name in self._block_dims}
        for _, batch in self.iter_batches(batch_size=1 << 30):
            for name, tensor in batch.items():
                parts[name].append(tensor)
        return {
            name: (torch.cat(chunks) if chunks else torch.empty(0, self._block_dims[name], dtype=self.torch_dtype))
            for name, chunks in parts.items()
        }

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(n={self.num_examples}, blocks={len(self._block_dims)}, "
            f"params={sum(self._block_dims.values())}, dtype={self._dtype_name}, complete={self._complete})"
        )


class RamGradientStore(GradientStore):
    """Gradients kept in memory as a list of appended chunks."""

    def __init__(
        self, *, block_dims: Mapping[str, int], dtype: str = "float32", fingerprint: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(block_dims, dtype, fingerprint)
        self._chunks: list[tuple[list[str], dict[str, torch.Tensor]]] = []
        self._norm_chunks: list[torch.Tensor] = []

    def _write(self, ids: list[str], grads: dict[str, torch.Tensor], sq_norms: torch.Tensor) -> None:
        self._chunks.append((ids, grads))
        self._norm_chunks.append(sq_norms)

    def iter_batches(
        self, batch_size: int = 1024, blocks: Sequence[str] | None = None, rows: range | None = None
    ) -> Iterator[tuple[list[str], dict[str, torch.Tensor]]]:
        if batch_size <= 0:
            raise ConfigError(f"batch_size must be positive, got {batch_size}.")
        wanted = _check_rows(rows, self.num_examples)
        names = list(self._block_dims) if blocks is None else list(blocks)
        offset = 0
        for ids, grads in self._chunks:
            first, last = max(wanted.start - offset, 0), min(wanted.stop - offset, len(ids))
            offset += len(ids)
            for start in range(first, last, batch_size):
                stop = min(start + batch_size, last)
                yield ids[start:stop], {name: grads[name][start:stop] for name in names}

    def squared_norms(self) -> torch.Tensor:
        if not self._norm_chunks:
            return torch.empty(0, len(self._block_dims), dtype=torch.float64)
        return torch.cat(self._norm_chunks)

"""Per-example gradient storage: a RAM backend for small runs and a sharded disk backend for large ones.

Modules: :mod:`~datainf.store.base` (the :class:`GradientSource` interface, :class:`GradientStore`
and the RAM backend), :mod:`~datainf.store.disk` (:class:`DiskGradientStore`) and
:mod:`~datainf.store.files` (atomic output files, free-space checks, I/O errors); the names below
are the public API.

A store holds, for ``n`` examples, one flattened gradient per *block* (one trainable tensor, e.g. a
``lora_A`` weight): block ``l`` is an ``(n, d_l)`` matrix ``X_l`` whose row ``i`` is ``g_il``
(docs/method.md section 1; format: docs/gradients.md section 7). Alongside the gradients it keeps each example's squared norm per block,
``||g_il||^2`` (float64, computed from the *stored* values), so that the per-block damping
``lambda_l`` and DataInf's denominators cost no extra pass over the gradients.

Disk layout (one folder)::

    manifest.json                     format, block names and sizes, storage dtype, fingerprint,
                                      shard list (file, ids, bytes), complete flag
    shard-00000.safetensors           one tensor per block, (k, d_l) in the storage dtype, plus
                                      "__sq_norms__" (k, L) float64 in block order
    ...
    unsharded/index.json              examples appended but not yet in a full shard, kept durable
    unsharded/shard-pending-<t>.safetensors  between shards (:meth:`DiskGradientStore.checkpoint`;
                                      same tensors as a shard); removed once they are in a shard
    parts/<run>-r00001/               written by one rank of a multi-process (torchrun) collection:
                                      its own manifest.json and shards; rank 0 lists these shards in
                                      the main manifest (file "parts/<run>-r00001/shard-00000...")
                                      and removes the part manifest (see :meth:`DiskGradientStore.adopt_parts`)

Writes are atomic: a shard is written to a temporary file and renamed, then the manifest is
rewritten the same way. An interrupted run therefore leaves only finished shards listed; reopening
the folder with :meth:`GradientStore.create` and the same configuration resumes after them (the
examples already stored are in :attr:`GradientStore.ids`). Nothing is ever unpickled.

Between shards, the examples buffered for the next shard are checkpointed too: every
:attr:`DiskGradientStore.checkpoint_seconds` (default 10 s) the ones not yet durable are written
to ``unsharded/`` (a file of those rows, then its index, both atomically), so a killed run loses at
most that long of work, not a whole shard. Reopening the store to write it (:meth:`GradientStore.create`)
puts them back in the buffer; the shard they end up in is the one an uninterrupted run writes (same
rows, same bytes). Readers (:meth:`GradientStore.open`) see listed shards only.
"""

from datainf.store.base import STORAGE_DTYPES, GradientSource, GradientStore, RamGradientStore, row_squared_norms
from datainf.store.disk import DiskGradientStore
from datainf.store.files import (
    RUN_LOCK_FILE,
    atomic_write_bytes,
    atomic_write_json,
    check_free_space,
    file_mode,
    output_error,
)

__all__ = [
    "GradientSource",
    "GradientStore",
    "RamGradientStore",
    "DiskGradientStore",
    "STORAGE_DTYPES",
    "atomic_write_bytes",
    "atomic_write_json",
    "row_squared_norms",
    "RUN_LOCK_FILE",
    "check_free_space",
    "file_mode",
    "output_error",
]

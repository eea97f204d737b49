"""``collect_gradients``: per-example LoRA gradients of a whole dataset into a :class:`GradientStore`.

One forward and one backward pass per batch (:class:`~datainf.gradients.hooks.PerExampleGradients`),
with the model in eval mode (LoRA dropout off) at its fine-tuned weights. The task decides what the
per-example loss is (:mod:`datainf.tasks`).
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from datainf.distributed import DistributedContext, dist_context
from datainf.errors import (
    BlockMismatchError,
    ConfigError,
    EmptyInputError,
    FingerprintMismatchError,
    StoreCorruptedError,
)
from datainf.factors import FACTORS_FOLDER, FactorFolder, KroneckerFactors, attach_factors, check_factor_memory
from datainf.gradients.factors import FactorAccumulator, factor_shapes
from datainf.gradients.hooks import split_block_dims
from datainf.gradients.lora import LoRABlocks, find_lora_blocks
from datainf.gradients.projection import GradientProjector, ProjectionConfig, projector_for
from datainf.gradients.records import (
    _ids_text,
    _validate_all,
    dataset_fingerprint,
    example_ids,
    gradient_block_dims,
    gradient_fingerprint,
)
from datainf.gradients.session import GradientSession
from datainf.store import DiskGradientStore, GradientStore
from datainf.store.base import _checked_seconds
from datainf.tasks import GradientTask

__all__ = ["collect_gradients", "collect_kronecker_factors"]

logger = logging.getLogger(__name__)


def collect_gradients(
    model: nn.Module,
    task: GradientTask,
    dataset: Sequence[Mapping[str, Any]],
    *,
    store: GradientStore | str | os.PathLike[str] | None = None,
    batch_size: int = 16,
    device: torch.device | str | None = None,
    adapter_name: str | None = None,
    dtype: str = "float32",
    shard_size: int = 1024,
    overwrite: bool = False,
    progress: bool = True,
    collect_factors: bool = False,
    factor_memory_gb: float = 4.0,
    checkpoint_seconds: float | None = None,
    projection: ProjectionConfig | None = None,
) -> GradientStore:
    """Per-example gradients ``g_il`` of every example and block, written into a gradient store.

    Args:
        model: the LoRA-tuned model (``PeftModel`` or a module with injected LoRA layers).
        task: what the per-example loss is (e.g. :class:`~datainf.gradients.SequenceClassificationTask`).
        dataset: a sequence of dict records; an example's id is its ``"id"`` field, else its index.
        store: ``None`` -> a new RAM store; a folder path -> a disk store there (an unfinished store
            with the same blocks and fingerprint is resumed: examples already stored are skipped);
            or an existing :class:`GradientStore` with the same blocks.
        batch_size: examples per forward/backward pass.
        device: where to compute; default the model's device (the model is moved there and back).
        adapter_name: the adapter to differentiate, when several are active.
        dtype: storage dtype of a newly created store.
        shard_size: examples per shard of a new disk store.
        overwrite: replace an existing disk store at ``store`` instead of resuming it.
        progress: show a tqdm progress bar.
        collect_factors: also accumulate the Kronecker factors of every hooked block (``A = E[x x^T]``,
            ``S = E[delta delta^T]``, :mod:`datainf.factors`) from the same hooks, for the ``kfac`` and
            ``ekfac`` methods. A disk store keeps them in ``<store>/kronecker-factors/`` (resumable
            like the store: a rerun on a store collected without factors computes only the factors);
            a RAM store keeps them in memory (:func:`datainf.factors.attached_factors`). Extra cost
            per batch: two Gram matrices per hooked module (``O(P (p^2 + q^2))`` for ``P`` positions).
        factor_memory_gb: refuse (before any work) factors whose float64 size ``8 sum_l (p_l^2 + q_l^2)``
            exceeds this.
        checkpoint_seconds: (disk store) how often the examples computed since the last full shard are
            made durable (:meth:`DiskGradientStore.checkpoint`), so that a killed run resumes after
            them rather than after the last full shard; ``None`` keeps the store's setting (default
            10 s), ``0`` checkpoints after every batch. An interrupted run (an exception, Ctrl-C)
            always checkpoints what it computed. The finished store is the same, bit for bit, however
            often the run was interrupted (same batch size).
        projection: store a seeded random sketch of at most ``projection.dim`` numbers per block
            instead of each block (:mod:`datainf.gradients.projection`); recorded in the store's
            fingerprint (``"projection"``), and test gradients must use the same one.

    Under ``torchrun`` (``torch.distributed`` with more than one process) every rank calls this
    with the same arguments and ``store`` must be a folder: the missing examples are split into one
    contiguous slice per rank, each rank writes its own part of the store, and rank 0 merges the
    parts into one manifest in dataset order. Every rank gets the finished store back. A rank that
    dies leaves its finished shards behind; rerunning the same call (with any number of processes)
    computes only what is missing. See :mod:`datainf.distributed`.

    Returns:
        The finalized store; block ``name`` holds ``(n, d_l)`` gradients. A disk store's rows are in
        dataset order (also after a resumed or multi-process run; the store's own examples from
        other datasets go last). Its fingerprint has keys ``"model"``, ``"task"``, ``"adapter"``.

    Raises:
        EmptyInputError: the dataset is empty.
        LoRAValidationError: no usable LoRA adapter (see :func:`find_lora_blocks`).
        TaskInputError: bad examples (label out of range, no response tokens, duplicate ids, ...).
        NonFiniteGradientError: a non-finite loss or gradient (names the examples).
        StoreMismatchError / FingerprintMismatchError / BlockMismatchError: the store belongs to another run.
        DistributedMismatchError: the processes were given different models, data or settings.
        DistributedRankError: another process failed (its message is repeated).
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size}; use a positive number of examples per batch.")
    seconds = _checked_seconds(checkpoint_seconds)
    ctx = dist_context()
    n = len(dataset)
    try:
        if n == 0:
            raise EmptyInputError("The dataset is empty: there are no examples to compute gradients for.")
        ids = example_ids(dataset)
        blocks = find_lora_blocks(model, adapter_name=adapter_name)
        fingerprint = gradient_fingerprint(model, task, blocks, projection)
        if projection is not None and collect_factors:
            raise ConfigError("collect_factors and a projection do not combine: K-FAC factors need the full blocks.")
    except Exception as err:
        if not ctx.is_distributed:
            raise
        ctx.raise_if_any(err, "Reading the data and the adapter")  # stop every rank, not just this one
    ctx.raise_if_any(None, "Reading the data and the adapter")
    block_dims = gradient_block_dims(blocks, task, projection)
    projector = projector_for(projection, blocks.blocks)
    if collect_factors:
        shapes, uncovered = factor_shapes(blocks.blocks, task.row_labels())
        check_factor_memory(shapes, factor_memory_gb, what="collect_factors")
        if uncovered:
            logger.warning(
                "%d block(s) are not covered by hooks and get no Kronecker factors (kfac/ekfac precondition them by "
                "their diagonal): %s",
                len(uncovered),
                ", ".join(uncovered[:5]) + (" ..." if len(uncovered) > 5 else ""),
            )

    if ctx.is_distributed:
        return _collect_distributed(
            ctx,
            model,
            task,
            dataset,
            ids,
            blocks,
            fingerprint,
            store=store,
            batch_size=batch_size,
            device=ctx.resolve_device(device),
            dtype=dtype,
            shard_size=shard_size,
            overwrite=overwrite,
            progress=progress,
            collect_factors=collect_factors,
            projector=projector,
        )

    if store is None or isinstance(store, (str, os.PathLike)):
        out = GradientStore.create(
            None if store is None else Path(store),
            block_dims=block_dims,
            dtype=dtype,
            fingerprint=fingerprint,
            shard_size=shard_size,
            overwrite=overwrite,
            expected_examples=n,  # a disk store refuses to start when the disk cannot hold it
        )
    elif isinstance(store, GradientStore):
        out = store
        if out.block_dims != block_dims:
            raise BlockMismatchError(
                f"The given store has {len(out.block_dims)} blocks ({sum(out.block_dims.values())} parameters); the "
                f"model's adapter and task have {len(block_dims)} ({sum(block_dims.values())}). Create the store with "
                "block_dims=datainf.gradients.split_block_dims(find_lora_blocks(model).block_dims, task.row_labels())."
            )
        stored_model = out.fingerprint.get("model")
        if stored_model and stored_model != fingerprint["model"]:
            raise FingerprintMismatchError(
                f"The given store was filled from another model/adapter (fingerprint {stored_model} vs "
                f"{fingerprint['model']}); use a new store."
            )
    else:
        raise ConfigError(f"store must be None, a folder path or a GradientStore, not {type(store).__name__}.")

    if isinstance(out, DiskGradientStore):
        if seconds is not None:
            out.checkpoint_seconds = seconds
        out.adopt_parts(order=ids)  # shards left by an interrupted multi-process run count as done
    done = set(out.ids)
    pending = [i for i in range(n) if ids[i] not in done]
    if done:
        logger.info(
            "Resuming: %d of %d examples are already in the store; computing the other %d.",
            n - len(pending),
            n,
            len(pending),
        )
    examples = _Examples(model, task, dataset, ids, blocks, batch_size, device)
    folder = _factor_folder(out, blocks, task, fingerprint) if collect_factors else None
    if folder is not None:
        factor_only = _factors_missing(folder, out, ids)
        if factor_only:
            logger.info(
                "Computing the Kronecker factors of %d stored examples (their gradients are kept).", len(factor_only)
            )
            _compute_into(
                out,
                examples,
                factor_only,
                progress=progress,
                factors=folder,
                append=False,
                piece_size=shard_size,
            )
    if pending:
        _compute_into(
            out,
            examples,
            pending,
            progress=progress,
            factors=folder,
            piece_size=shard_size,
            already_done=n - len(pending),
            projector=projector,
        )
    if isinstance(out, DiskGradientStore):
        out.sort_shards(ids)
    out.finalize()
    if folder is not None:
        attach_factors(out, folder.consolidate())
    return out


def collect_kronecker_factors(
    model: nn.Module,
    task: GradientTask,
    dataset: Sequence[Mapping[str, Any]],
    *,
    folder: str | os.PathLike[str] | None = None,
    batch_size: int = 16,
    device: torch.device | str | None = None,
    adapter_name: str | None = None,
    piece_size: int = 1024,
    progress: bool = True,
    factor_memory_gb: float = 4.0,
) -> KroneckerFactors:
    """The Kronecker factors of ``dataset`` without storing any gradient: one forward/backward pass.

    What ``collect_gradients(..., collect_factors=True)`` accumulates beside a store, for a source
    that has none (:class:`~datainf.gradients.OnTheFlyGradients`: ``datainf score --train-data``
    with ``kfac`` / ``ekfac``). Hand the result to :func:`datainf.factors.attach_factors` (the
    methods find it there) or to the methods' ``factors`` option through ``folder``.

    Args:
        model, task, dataset, batch_size, device, adapter_name: as in :func:`collect_gradients`.
        folder: where the factor pieces are kept (the layout of ``<store>/kronecker-factors``): a rerun
            with the same folder computes only the examples no piece covers yet. ``None``: in memory
            (one process only).
        piece_size: examples per piece (the resume granularity).
        progress: show a progress bar.
        factor_memory_gb: refuse factors whose float64 size exceeds this (before any work).

    Under ``torchrun`` every rank calls it with the same arguments and ``folder`` (on a shared file
    system); each computes a contiguous share and rank 0 sums the pieces. The result covers every
    example of ``dataset``: ``sums[block]`` of shapes ``(p, p)`` and ``(q, q)`` float64.

    Raises:
        ConfigError: factors too large for ``factor_memory_gb``; ``folder=None`` under torchrun.
        StoreError: ``folder`` holds factors of another model, adapter or task.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size}; use a positive number of examples per batch.")
    if len(dataset) == 0:
        raise EmptyInputError("The dataset is empty: there are no examples to compute Kronecker factors for.")
    ctx = dist_context()
    ids = example_ids(dataset)
    blocks = find_lora_blocks(model, adapter_name=adapter_name)
    fingerprint = gradient_fingerprint(model, task, blocks)
    shapes, _ = factor_shapes(blocks.blocks, task.row_labels())
    check_factor_memory(shapes, factor_memory_gb, what="collect_kronecker_factors")
    path = None if folder is None else Path(folder)
    if path is None and ctx.is_distributed:
        raise ConfigError(
            f"Under torch.distributed ({ctx.world_size} processes) the Kronecker factors need a folder every rank "
            "can write: pass folder=<path on a shared file system>."
        )
    dummy = GradientStore.create(None, block_dims=split_block_dims(blocks.block_dims, task.row_labels()))
    error: Exception | None = None
    if ctx.is_main and path is not None:
        try:
            FactorFolder(path, fingerprint=fingerprint, shapes=shapes).prune(ids)
        except Exception as err:
            error = err
    ctx.raise_if_any(error, "Reading the Kronecker factors")
    token = ctx.broadcast_object(uuid.uuid4().hex[:8] if ctx.is_main else None)
    index = f"index-{token}-r{ctx.rank:05d}.json" if ctx.is_distributed else "index.json"
    pieces = FactorFolder(path, fingerprint=fingerprint, shapes=shapes, index_name=index)
    covered = pieces.covered_ids()
    missing = [i for i, example in enumerate(ids) if example not in covered]
    if covered and ctx.is_main:
        logger.info("Resuming: %d of %d examples already have Kronecker factors.", len(ids) - len(missing), len(ids))
    mine = [missing[k] for k in ctx.shard(len(missing))]
    examples = _Examples(model, task, dataset, ids, blocks, batch_size, device)
    error = None
    if mine:
        try:
            _compute_into(
                dummy,
                examples,
                mine,
                progress=progress and ctx.is_main,
                factors=pieces,
                append=False,
                piece_size=piece_size,
            )
        except Exception as err:
            if not ctx.is_distributed:
                raise
            error = err
    ctx.raise_if_any(error, "Collecting the Kronecker factors")
    if not ctx.is_distributed:
        return pieces.consolidate()
    error = None
    if ctx.is_main:
        try:
            FactorFolder(path, fingerprint=fingerprint, shapes=shapes).consolidate()
        except Exception as err:
            error = err
    ctx.raise_if_any(error, "Summing the Kronecker factors")
    return FactorFolder(path, fingerprint=fingerprint, shapes=shapes).total()


def _factor_folder(
    out: GradientStore,
    blocks: LoRABlocks,
    task: GradientTask,
    fingerprint: Mapping[str, str],
    index_name: str = "index.json",
) -> FactorFolder:
    """The factor pieces of ``out`` (beside a disk store, in memory for a RAM store)."""
    shapes, _ = factor_shapes(blocks.blocks, task.row_labels())
    path = out.path / FACTORS_FOLDER if isinstance(out, DiskGradientStore) else None
    return FactorFolder(path, fingerprint=dict(out.fingerprint or fingerprint), shapes=shapes, index_name=index_name)


def _factors_missing(folder: FactorFolder, out: GradientStore, ids: Sequence[str]) -> list[int]:
    """Dataset positions of stored examples without factors (after dropping pieces the store lost)."""
    stored = set(out.ids)
    folder.prune(stored)
    covered = folder.covered_ids()
    foreign = sorted(stored - covered - set(ids))
    if foreign:
        raise ConfigError(
            f"The gradient store holds {len(foreign)} examples that are not in this dataset and have no Kronecker "
            f"factors (e.g. {foreign[:3]}); their factors cannot be computed. Collect into a new store folder, or "
            "pass overwrite=True."
        )
    return [i for i, example in enumerate(ids) if example in stored and example not in covered]


def _contiguous_runs(indices: Sequence[int]) -> list[list[int]]:
    """Split increasing ``indices`` into runs of consecutive integers: ``[0, 1, 4, 5] -> [[0, 1], [4, 5]]``."""
    runs: list[list[int]] = []
    for index in indices:
        if runs and index == runs[-1][-1] + 1:
            runs[-1].append(index)
        else:
            runs.append([index])
    return runs


@dataclass(frozen=True)
class _Examples:
    """What every gradient computation of one collection shares: the model, task, data and batching."""

    model: nn.Module
    task: GradientTask
    dataset: Sequence[Mapping[str, Any]]
    ids: list[str]
    blocks: LoRABlocks
    batch_size: int
    device: torch.device | str | None


def _compute_into(
    out: GradientStore,
    examples: _Examples,
    indices: Sequence[int],
    *,
    progress: bool,
    factors: FactorFolder | None = None,
    append: bool = True,
    piece_size: int = 1024,
    already_done: int = 0,
    projector: GradientProjector | None = None,
) -> None:
    """Gradients of ``examples.dataset[i]`` for ``i`` in ``indices`` (increasing) appended to ``out``.

    With ``factors``, the Kronecker factors of the same batches are added to that folder as pieces
    of about ``piece_size`` examples (a piece counts only examples whose gradients reached ``out``);
    ``append=False`` computes the factors alone (the gradients are already stored).

    The store is flushed at every gap in ``indices``, so that each disk shard holds a contiguous run
    of the dataset (what lets :meth:`DiskGradientStore.sort_shards` restore dataset order after a
    resumed or multi-process collection); examples a resumed store still buffers (checkpointed
    between shards) are flushed first unless ``indices`` continue right after them. On any exception
    what was computed is kept (a disk store checkpoints its buffer, :meth:`DiskGradientStore.checkpoint`:
    the rerun's shards are those of an uninterrupted run) and the exception propagates; the store is
    not finalized. ``already_done`` examples are shown as done on the progress bar.
    """
    model, task, dataset, ids, blocks = examples.model, examples.task, examples.dataset, examples.ids, examples.blocks
    batch_size = examples.batch_size
    truncated: list[str] = []
    try:
        accumulator = None if factors is None else FactorAccumulator(blocks.blocks, task.row_labels())
        observer = None if accumulator is None else accumulator.observe
        with GradientSession(
            model, task, blocks, device=examples.device, observer=observer, projector=projector
        ) as session:
            _validate_all(task, dataset, ids, list(indices))
            buffered = out.buffered_ids
            if append and buffered and indices and (indices[0] == 0 or ids[indices[0] - 1] != buffered[-1]):
                out.flush()  # the buffered rows and these would not be one contiguous run of the dataset
            bar = _progress(len(indices) + already_done, progress, initial=already_done)
            try:
                for run in _contiguous_runs(indices):
                    for start in range(0, len(run), batch_size):
                        chunk = run[start : start + batch_size]
                        if accumulator is not None:
                            accumulator.begin_batch()
                        batch, _, grads = session.compute([dataset[i] for i in chunk], [ids[i] for i in chunk])
                        truncated.extend(batch.truncated_ids)
                        if append:
                            out.append(batch.ids, grads)
                        if accumulator is not None:
                            accumulator.commit(batch.ids)
                            if accumulator.num_examples >= piece_size:
                                _save_piece(factors, accumulator)
                        if bar is not None:
                            bar.update(len(chunk))
                    if append:
                        out.flush()
                    _save_piece(factors, accumulator)
            finally:
                if bar is not None:
                    bar.close()
                _save_piece(factors, accumulator)  # keep what reached the store (an interrupted run)
    except BaseException:
        if append:
            _keep_buffered(out)  # keep what was computed: a rerun with the same store folder resumes after it
        raise
    if truncated:
        limit = getattr(task, "max_length", None)
        logger.warning(
            "%d of %d examples were longer than the length limit%s and were truncated: %s",
            len(truncated),
            len(indices),
            f" ({limit} tokens)" if limit else "",
            _ids_text(truncated),
        )


def _keep_buffered(out: GradientStore) -> None:
    """Make the examples ``out`` buffers durable after an interruption (a disk store's checkpoint), logging
    (not raising) a failure so that the interruption itself is what propagates."""
    try:
        if isinstance(out, DiskGradientStore):
            out.checkpoint()
        else:
            out.flush()
    except Exception as err:  # e.g. the disk filled up: the rerun recomputes these examples
        logger.warning("Could not keep the %d examples computed since the last shard: %s", len(out.buffered_ids), err)


def _save_piece(folder: FactorFolder | None, accumulator: FactorAccumulator | None) -> None:
    if folder is not None and accumulator is not None and accumulator.num_examples:
        sums, covered = accumulator.take()
        folder.add_piece(covered, sums)


def _collect_distributed(
    ctx: DistributedContext,
    model: nn.Module,
    task: GradientTask,
    dataset: Sequence[Mapping[str, Any]],
    ids: list[str],
    blocks: LoRABlocks,
    fingerprint: dict[str, str],
    *,
    store: GradientStore | str | os.PathLike[str] | None,
    batch_size: int,
    device: torch.device | None,
    dtype: str,
    shard_size: int,
    overwrite: bool,
    progress: bool,
    collect_factors: bool = False,
    projector: GradientProjector | None = None,
) -> DiskGradientStore:
    """:func:`collect_gradients` under ``torch.distributed`` (every rank calls it with the same arguments).

    1. the ranks exchange a fingerprint of model, dataset and store settings (mismatch -> one error on every rank);
    2. rank 0 creates or reopens the store and adopts the parts an interrupted run left behind;
    3. the examples still missing are cut into ``world_size`` contiguous slices; each rank computes
       its slice into its own part store ``<store>/parts/<run>-r<rank>``;
    4. rank 0 lists every part's shards in the one manifest, in dataset order, and marks it complete.

    With ``collect_factors`` each rank also writes Kronecker-factor pieces of its examples into the
    store's factor folder under an index of its own, the stored examples that lack factors are split
    over the ranks too, and rank 0 sums every piece into one at the end.
    """
    if not isinstance(store, (str, os.PathLike)):
        raise ConfigError(
            f"Under torch.distributed ({ctx.world_size} processes) gradients must go to a disk store: pass "
            "store=<folder> (the same path on every rank, on a filesystem every rank can read), not "
            f"{'None (a RAM store)' if store is None else type(store).__name__}. Rank 0 creates the store; each rank "
            "writes its share of the examples into it."
        )
    path = Path(store)
    block_dims = split_block_dims(blocks.block_dims if projector is None else projector.block_dims(), task.row_labels())
    ctx.check_same(
        {
            "model": fingerprint,
            "blocks": block_dims,
            "dataset": dataset_fingerprint(dataset, ids),
            "store": str(path),
            "dtype": dtype,
            "shard_size": shard_size,
            "overwrite": overwrite,
            "batch_size": batch_size,
            "collect_factors": collect_factors,
        },
        "gradient collection (model, adapter, data and store settings)",
    )
    error: Exception | None = None
    if ctx.is_main:
        try:
            main = GradientStore.create(
                path,
                block_dims=block_dims,
                dtype=dtype,
                fingerprint=fingerprint,
                shard_size=shard_size,
                overwrite=overwrite,
            )
            assert isinstance(main, DiskGradientStore)
            main.adopt_parts(order=ids)
            main.flush()  # examples a killed single-process run checkpointed between shards: visible to every rank
            if collect_factors:
                _factor_folder(main, blocks, task, fingerprint).prune(main.ids)
        except Exception as err:
            error = err
    ctx.raise_if_any(error, "Preparing the gradient store")
    run_token = ctx.broadcast_object(uuid.uuid4().hex[:8] if ctx.is_main else None)

    view = GradientStore.open(path)
    done = set(view.ids)
    pending = [i for i in range(len(ids)) if ids[i] not in done]
    mine = [pending[k] for k in ctx.shard(len(pending))]
    folder: FactorFolder | None = None
    factor_only: list[int] = []
    error = None
    if collect_factors:
        try:
            folder = _factor_folder(
                view, blocks, task, fingerprint, index_name=f"index-{run_token}-r{ctx.rank:05d}.json"
            )
            factor_only = _factors_missing(folder, view, ids)
        except Exception as err:
            error = err
    ctx.raise_if_any(error, "Reading the Kronecker factors")
    mine_factor_only = [factor_only[k] for k in ctx.shard(len(factor_only))]
    if ctx.is_main:
        logger.info(
            "%d of %d examples are already in the store; %d processes compute the other %d (about %d each).",
            len(done),
            len(ids),
            ctx.world_size,
            len(pending),
            -(-len(pending) // ctx.world_size),
        )
    examples = _Examples(model, task, dataset, ids, blocks, batch_size, device)
    error = None
    if mine or mine_factor_only:
        try:
            part = view.create_part(f"{run_token}-r{ctx.rank:05d}")
            if mine_factor_only:
                _compute_into(
                    part,
                    examples,
                    mine_factor_only,
                    progress=progress and ctx.is_main,
                    factors=folder,
                    append=False,
                    piece_size=shard_size,
                )
            if mine:
                _compute_into(
                    part,
                    examples,
                    mine,
                    progress=progress and ctx.is_main,
                    factors=folder,
                    piece_size=shard_size,
                    projector=projector,
                )
            part.finalize()
        except Exception as err:
            error = err
    ctx.raise_if_any(error, "Gradient collection")

    error = None
    if ctx.is_main:
        try:
            merged = GradientStore.create(
                path,
                block_dims=block_dims,
                dtype=dtype,
                fingerprint=fingerprint,
                shard_size=shard_size,
                overwrite=False,
            )
            assert isinstance(merged, DiskGradientStore)
            merged.adopt_parts(order=ids)
            missing = len(ids) - len(done.union(merged.ids))
            if missing:
                raise StoreCorruptedError(
                    f"After merging, {missing} examples are missing from {path}; rerun the same command."
                )
            merged.finalize()
            if collect_factors:
                merged_folder = _factor_folder(merged, blocks, task, fingerprint)
                merged_folder.prune(merged.ids)
                merged_folder.consolidate()
        except Exception as err:
            error = err
    ctx.raise_if_any(error, "Merging the gradient store")
    return GradientStore.open(path)


def _progress(total: int, enabled: bool, initial: int = 0) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="ex", desc="per-example gradients")

"""Training gradients computed on the fly: a :class:`~datainf.store.GradientSource` with no store on disk.

:class:`OnTheFlyGradients` wraps ``(model, task, records)`` and serves the reads the influence
engine and the methods make (:class:`~datainf.methods.MethodContext`): batches of rows per block
over a row range, and each example's recorded squared norms ``||g_il||^2``. Every streaming pass
recomputes the gradients batch by batch with the same hooks as :func:`collect_gradients`
(:class:`~datainf.gradients.session.GradientSession`); the norms come from one extra pass, made the
first time they are asked for and kept in memory, unless a method records them on the way
(:meth:`OnTheFlyGradients.record_norms`: DataInf's fused norms pass, docs/method.md section 6.1).
No training gradient is ever written to disk.

Cost, with ``P`` the method's streaming passes (DataInf 1 + 1 scoring pass, see
:mod:`datainf.influence`): ``1 + P`` forward/backward passes over the training data instead of one
collection, and ``0`` bytes of gradients on disk instead of ``4 n sum_l d_l`` (float32). DataInf in
``average`` / ``pairwise`` mode fuses the norms pass into its own: ``2`` passes plus a pilot of
``pilot_rows`` examples per process (``3`` passes when its accuracy bound sends it back to the
separate pass). Peak memory: one batch of gradients and activations.

Resume: with ``work_dir`` the norms are checkpointed to ``<work_dir>/train-norms-<key>.safetensors``
(``n x L`` float64: a few bytes per example) and reloaded by a later run with the same model,
adapter, task, data and settings; :func:`datainf.influence.influence` also checkpoints each finished
streaming pass there (:class:`~datainf.methods.checkpoints.PassCheckpoints`), so a killed run
resumes at pass granularity.

Under ``torch.distributed`` each rank computes the gradients of its own contiguous share of the rows
only (:meth:`~datainf.distributed.DistributedContext.shard`, the share the engine streams); the norms
are all-gathered once. :meth:`iter_batches` over rows that are not the rank's own (what
``MethodContext.training_chunks`` asks for in ``mode="self"``, where training rows serve as test
vectors) computes them on that rank too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from datainf.distributed import dist_context
from datainf.errors import ConfigError, EmptyInputError, GradientSourceChangedError, NonFiniteGradientError
from datainf.gradients.lora import find_lora_blocks, model_fingerprint
from datainf.gradients.projection import ProjectionConfig, projector_for
from datainf.gradients.records import (
    _ids_text,
    _validate_all,
    dataset_fingerprint,
    example_ids,
    gradient_block_dims,
    gradient_fingerprint,
)
from datainf.gradients.session import GradientSession
from datainf.store import STORAGE_DTYPES, atomic_write_bytes, row_squared_norms
from datainf.tasks import GradientTask

__all__ = ["OnTheFlyGradients"]

logger = logging.getLogger(__name__)

_NORMS_FORMAT = "datainf-train-norms"


#: Training examples per process whose gradients DataInf's fused norms pass computes once more, to guess the damping
#: before its pass (docs/method.md section 6.1).
DEFAULT_PILOT_ROWS = 128


class OnTheFlyGradients:
    """Per-example training gradients recomputed on every pass from ``(model, task, records)``.

    Satisfies :class:`~datainf.store.GradientSource`: pass it as ``train`` to
    :func:`datainf.influence` (``influence(train=OnTheFlyGradients(model, task, records), test=store)``)
    and every registered method runs unchanged. Rows are the gradients of ``records`` in order,
    ``g_il`` of shape ``(d_l,)`` per block, cast to ``dtype`` like a store's.

    Exact runs on it too: its direct branch streams like any method; its Woodbury branch
    (blocks with ``d_l > n``) collects those blocks' rows ``X_l`` in memory through the streaming
    helpers, exactly as it does on a store (the same ``n x d_l`` memory), so nothing is refused.

    Args:
        model: the LoRA-tuned model (kept at its weights: the adapter is hashed, and any change
            between two passes is refused).
        task: what the per-example loss is.
        records: the training examples (dict records; an example's id is its ``"id"`` field, else
            its index), checked with the task's validation once here.
        batch_size: examples per forward/backward pass (the engine's own, larger batches are
            assembled from several).
        device: where to compute (default the model's device; the model is moved there for each
            pass and back).
        dtype: dtype of the rows served (a storage dtype; default ``float32``), norms taken from them.
        adapter_name: the adapter to differentiate, when several are active.
        work_dir: folder for the norms checkpoint and the engine's pass checkpoints (resume), or
            ``None`` (nothing written).
        progress: show a progress bar for the norms pass.
        projection: serve seeded random sketches of at most ``projection.dim`` numbers per block
            (:mod:`datainf.gradients.projection`), as a projected store would hold; the test
            gradients must use the same projection.
        pilot_rows: training examples per process whose gradients are computed once more to guess
            the damping before a fused norms pass (docs/method.md section 6.1; at least 1).

    Raises:
        EmptyInputError: no records.
        LoRAValidationError / TaskInputError: no usable adapter, bad examples (as :func:`collect_gradients`).
        GradientSourceChangedError: (on a later pass) the adapter weights or the records changed.
        NonFiniteGradientError: a non-finite loss or gradient.
    """

    def __init__(
        self,
        model: nn.Module,
        task: GradientTask,
        records: Sequence[Mapping[str, Any]],
        *,
        batch_size: int = 16,
        device: torch.device | str | None = None,
        dtype: str = "float32",
        adapter_name: str | None = None,
        work_dir: str | os.PathLike[str] | None = None,
        progress: bool = True,
        projection: ProjectionConfig | None = None,
        pilot_rows: int = DEFAULT_PILOT_ROWS,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size}; use a positive number of examples per batch.")
        if isinstance(pilot_rows, bool) or not isinstance(pilot_rows, int) or pilot_rows < 1:
            raise ConfigError(
                f"pilot_rows={pilot_rows!r}; use a positive number of examples (default {DEFAULT_PILOT_ROWS})."
            )
        if dtype not in STORAGE_DTYPES:
            raise ConfigError(f"dtype {dtype!r} is not supported; use one of {sorted(STORAGE_DTYPES)}.")
        if len(records) == 0:
            raise EmptyInputError("The training records are empty: there are no examples to compute gradients for.")
        self._model, self._task, self._records = model, task, records
        self.batch_size = int(batch_size)
        self.pilot_rows = pilot_rows
        self.device = device
        self._dtype_name = dtype
        self.progress = progress
        self.work_dir = None if work_dir is None else Path(work_dir)
        self._ids = example_ids(records)
        self._blocks = find_lora_blocks(model, adapter_name=adapter_name)
        self._block_dims = gradient_block_dims(self._blocks, task, projection)
        self._projector = projector_for(projection, self._blocks.blocks)
        self.projection = projection
        task.setup(model)
        _validate_all(task, records, self._ids, list(range(len(self._ids))))
        self._model_key = model_fingerprint(model, self._blocks)
        self._data_key = dataset_fingerprint(records, self._ids)
        self._fingerprint = gradient_fingerprint(model, task, self._blocks, projection)
        self._norms: torch.Tensor | None = None
        # each example's loss L_k(theta) from its last gradient pass (NaN: not computed yet), for loss differences
        self._losses = torch.full((len(self._ids),), math.nan, dtype=torch.float64)
        self._session: GradientSession | None = None
        self.passes = 0  # gradient passes made (the norms pass included), counted by :meth:`iter_batches`
        self.rows_computed = 0  # examples whose gradients were computed (by this process), over every pass
        self.forward_rows = 0  # examples run forward only (loss differences), by this process

    # ------------------------------------------------------------------ GradientSource
    @property
    def ids(self) -> list[str]:
        return list(self._ids)

    @property
    def block_dims(self) -> dict[str, int]:
        return dict(self._block_dims)

    @property
    def num_examples(self) -> int:
        return len(self._ids)

    @property
    def dtype(self) -> str:
        return self._dtype_name

    @property
    def torch_dtype(self) -> torch.dtype:
        return STORAGE_DTYPES[self._dtype_name]

    @property
    def fingerprint(self) -> dict[str, str]:
        """``{"model", "task", "adapter"}``: what a store collected from the same model and task records.

        Like a store's, it does not cover the records (scores are matched by their ids); the records
        are checked between passes, and :attr:`checkpoint_key` covers them.
        """
        return dict(self._fingerprint)

    @property
    def is_complete(self) -> bool:
        return True

    @property
    def checkpoint_dir(self) -> Path | None:
        """The work folder (norms and pass checkpoints), or ``None``."""
        return self.work_dir

    @property
    def checkpoint_key(self) -> str:
        """A hash of the model, adapter, task, records, dtype and batch size: what the rows depend on."""
        return self._norms_key()

    def __len__(self) -> int:
        return len(self._ids)

    def __repr__(self) -> str:
        return (
            f"OnTheFlyGradients(n={self.num_examples}, blocks={len(self._block_dims)}, "
            f"params={sum(self._block_dims.values())}, dtype={self._dtype_name}, batch_size={self.batch_size})"
        )

    def squared_norms(self) -> torch.Tensor:
        """``||g_il||^2`` of every example: float64 ``(n, L)``; the first call makes the norms pass (or loads its checkpoint).

        Under ``torch.distributed`` every rank must call this at the same point (it gathers).
        """
        if self._norms is None:
            loaded = self._load_norms()
            self._norms = loaded if loaded is not None else self._norms_pass()
        return self._norms

    def known_squared_norms(self) -> torch.Tensor | None:
        """The squared norms if they are known without a pass (in memory or checkpointed), else ``None``.

        Float64 ``(n, L)`` like :meth:`squared_norms`. Under ``torch.distributed`` every rank must
        call this at the same point (it agrees on the checkpoint).
        """
        if self._norms is None:
            self._norms = self._load_norms()
        return self._norms

    def record_norms(self, norms: torch.Tensor) -> None:
        """Take ``||g_il||^2`` computed by someone else's pass (float64 ``(n, L)``, every example).

        What a fused norms pass hands over (docs/method.md section 6.1), so that no separate norms
        pass is made: kept in memory and checkpointed like the norms pass's own (a resumed run
        reads them back). They must be the norms of the rows this source serves, taken with
        :func:`datainf.store.row_squared_norms`. Under ``torch.distributed`` every rank calls it
        with the same (gathered) norms; rank 0 writes the checkpoint.

        Raises:
            ConfigError: wrong shape or dtype.
            NonFiniteGradientError: a non-finite norm (an overflowing gradient).
        """
        expected = (self.num_examples, len(self._block_dims))
        if tuple(norms.shape) != expected or norms.dtype != torch.float64:
            raise ConfigError(
                f"record_norms needs float64 norms of shape {expected} (examples x blocks), got "
                f"{norms.dtype} {tuple(norms.shape)}."
            )
        norms = norms.detach().to("cpu").contiguous()
        self._check_finite(norms, range(self.num_examples))
        self._norms = norms
        self._save_norms(norms)

    def iter_batches(
        self, batch_size: int = 1024, blocks: Sequence[str] | None = None, rows: range | None = None
    ) -> Iterator[tuple[list[str], dict[str, torch.Tensor]]]:
        """One pass of gradient computation: ``(ids, {block: (b, d_l)})`` in row order, ``b == batch_size``
        except for the last batch, over ``rows`` (a contiguous range, default every row).

        The adapter and records are checked against the fingerprint taken at construction before and
        after the pass. Nested passes (a pass started while another is suspended) share the hooks.
        """
        if batch_size <= 0:
            raise ConfigError(f"batch_size must be positive, got {batch_size}.")
        n = self.num_examples
        wanted = range(n) if rows is None else rows
        if wanted.step != 1 or wanted.start < 0 or wanted.stop > n or wanted.start > wanted.stop:
            raise ConfigError(f"rows must be a contiguous range inside range({n}), got {wanted!r}.")
        names = list(self._block_dims) if blocks is None else list(blocks)
        unknown = [b for b in names if b not in self._block_dims]
        if unknown:
            raise ConfigError(f"Unknown blocks {unknown[:5]}; this source has {list(self._block_dims)[:5]}...")
        self.passes += 1
        self._check_unchanged(f"before pass {self.passes}")
        yield from self._batches(wanted, names, batch_size)
        self._check_unchanged(f"after pass {self.passes}")

    def to_dict(self) -> dict[str, torch.Tensor]:
        """Every block as one ``(n, d_l)`` tensor (computes and keeps every gradient in memory)."""
        parts: dict[str, list[torch.Tensor]] = {name: [] for name in self._block_dims}
        for _, batch in self.iter_batches(self.batch_size):
            for name, tensor in batch.items():
                parts[name].append(tensor.cpu())
        return {name: torch.cat(chunks) for name, chunks in parts.items()}

    def recorded_losses(self) -> torch.Tensor | None:
        """Each example's loss ``L_k(theta)`` as its last gradient pass computed it: float64 ``(n,)``, or
        ``None`` when some example's loss is not known (no gradient pass over it yet, e.g. a run whose
        passes were all read back from checkpoints).

        The very losses of :func:`datainf.baselines.training_losses` with batches of ``batch_size``
        (the same forward pass, with autograd on). Under ``torch.distributed`` each rank contributes
        its own rows; every rank must call this at the same point (it gathers).
        """
        ctx = dist_context()
        own = self._losses[ctx.shard(self.num_examples)] if ctx.is_distributed else self._losses
        gathered = ctx.all_gather_cat(own.contiguous())
        return None if bool(gathered.isnan().any()) else gathered.clone()

    # ------------------------------------------------------------------ loss differences
    def loss_difference_problem(self) -> str | None:
        """Why :meth:`directional_derivatives` cannot serve this source's rows, or ``None`` when it can.

        A loss difference moves the adapter's own tensors, so it gives ``g_k . u`` for the gradient
        ``g_k`` of the whole example in the tensors' own coordinates: not a projected sketch, and not
        the gradient through one labelled row (diffusion's per-timestep blocks).
        """
        if self._projector is not None:
            return (
                "the rows are random projections of the gradients (project_dim), and a loss difference moves the "
                "adapter's own tensors"
            )
        if self._task.row_labels():
            return (
                f"each example's gradient is split into per-row blocks ({len(self._task.row_labels())} rows per "
                "example), and a loss difference sees the whole example"
            )
        return None

    def loss_difference_step(self, direction: Mapping[str, torch.Tensor]) -> float:
        """The default step ``h`` of :meth:`directional_derivatives` along ``direction``
        (:func:`~datainf.gradients.directional.forward_difference_step`)."""
        from datainf.gradients.directional import forward_difference_step

        return forward_difference_step(self._blocks.blocks, direction)

    def directional_derivatives(
        self,
        direction: Mapping[str, torch.Tensor],
        rows: range,
        *,
        steps: Sequence[float] | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """``g_k . u`` for every example ``k`` in ``rows``, by forward differences of its loss (docs/method.md 6.2).

        ``(L_k(theta + h u) - L_k(theta)) / h`` for each step ``h``: one forward pass without autograd
        per example and step at the moved weights (:func:`~datainf.gradients.directional.perturbed_blocks`),
        each batch collated once; ``L_k(theta)`` is the loss of the example's last gradient pass when
        there was one, else one more forward pass.

        Args:
            direction: block name -> ``u_l`` (``d_l`` numbers, the served rows' layout); blocks left
                out do not move.
            rows: a contiguous range of rows.
            steps: the steps ``h``; default one, :meth:`loss_difference_step`.
            progress: show a progress bar.

        Returns:
            float64 ``(len(steps), len(rows))``, approximations of ``g_k . u`` (their error: docs/method.md 6.2).

        Raises:
            ConfigError: :meth:`loss_difference_problem` names a reason, a bad direction, step or range.
            GradientSourceChangedError: the adapter or the records changed since the source was created.
            NonFiniteGradientError: a non-finite loss.
        """
        from tqdm.auto import tqdm

        from datainf.gradients.directional import perturbed_blocks

        problem = self.loss_difference_problem()
        if problem is not None:
            raise ConfigError(f"Loss differences cannot score these training gradients: {problem}.")
        n = self.num_examples
        if rows.step != 1 or rows.start < 0 or rows.stop > n or rows.start > rows.stop:
            raise ConfigError(f"rows must be a contiguous range inside range({n}), got {rows!r}.")
        blocks = self._blocks.blocks
        hs = [self.loss_difference_step(direction)] if steps is None else [float(h) for h in steps]
        if not hs or not all(math.isfinite(h) and h > 0 for h in hs):
            raise ConfigError(f"Loss-difference steps must be finite numbers > 0, got {steps!r}.")
        self._check_unchanged("before a loss-difference pass")
        out = torch.empty(len(hs), len(rows), dtype=torch.float64)
        with (
            self._opened() as session,
            tqdm(total=len(rows), desc="loss differences", unit="ex", disable=not progress, leave=False) as bar,
        ):
            for start in range(rows.start, rows.stop, self.batch_size):
                chunk = range(start, min(start + self.batch_size, rows.stop))
                batch = self._task.collate([self._records[i] for i in chunk], [self._ids[i] for i in chunk])
                base = self._losses[chunk.start : chunk.stop]
                if bool(base.isnan().any()):
                    base = session.forward_losses(batch).to("cpu", torch.float64)
                    self.forward_rows += len(chunk)
                for j, h in enumerate(hs):
                    with perturbed_blocks(blocks, direction, h):
                        moved = session.forward_losses(batch).to("cpu", torch.float64)
                    out[j, chunk.start - rows.start : chunk.stop - rows.start] = (moved - base) / h
                self.forward_rows += len(chunk) * len(hs)
                bar.update(len(chunk))
        self._check_unchanged("after a loss-difference pass")
        return out

    # ------------------------------------------------------------------ computing
    @contextmanager
    def _opened(self) -> Iterator[GradientSession]:
        """The gradient session of the outermost running pass (opened by it, shared by nested passes)."""
        if self._session is not None:
            yield self._session
            return
        with GradientSession(
            self._model, self._task, self._blocks, device=self.device, projector=self._projector
        ) as session:
            self._session = session
            try:
                yield session
            finally:
                self._session = None

    def _batches(
        self, wanted: range, names: Sequence[str], size: int
    ) -> Iterator[tuple[list[str], dict[str, torch.Tensor]]]:
        """Rows ``wanted`` computed ``self.batch_size`` at a time, served ``size`` at a time."""
        target = self.torch_dtype
        buffered: dict[str, list[torch.Tensor]] = {name: [] for name in names}
        buffered_ids: list[str] = []
        truncated: list[str] = []

        def cut(count: int) -> tuple[list[str], dict[str, torch.Tensor]]:
            nonlocal buffered_ids
            out: dict[str, torch.Tensor] = {}
            for name in names:
                joined = torch.cat(buffered[name]) if len(buffered[name]) > 1 else buffered[name][0]
                out[name] = joined[:count]
                buffered[name] = [joined[count:]] if joined.shape[0] > count else []
            ids, buffered_ids = buffered_ids[:count], buffered_ids[count:]
            return ids, out

        with self._opened() as session:
            for start in range(wanted.start, wanted.stop, self.batch_size):
                chunk = range(start, min(start + self.batch_size, wanted.stop))
                batch, losses, grads = session.compute([self._records[i] for i in chunk], [self._ids[i] for i in chunk])
                self.rows_computed += len(chunk)
                self._losses[chunk.start : chunk.stop] = losses.detach().to("cpu", torch.float64)
                truncated.extend(batch.truncated_ids)
                for name in names:
                    buffered[name].append(grads[name].detach().to(target))
                buffered_ids.extend(batch.ids)
                while len(buffered_ids) >= size:
                    yield cut(size)
            if buffered_ids:
                yield cut(len(buffered_ids))
        if truncated:
            limit = getattr(self._task, "max_length", None)
            logger.debug(
                "%d examples were longer than the length limit%s and were truncated: %s",
                len(truncated),
                f" ({limit} tokens)" if limit else "",
                _ids_text(truncated),
            )

    def _check_unchanged(self, when: str) -> None:
        """Refuse (on every rank) when the adapter weights or the records differ from those at construction."""
        ctx = dist_context()
        problem: GradientSourceChangedError | None = None
        changed = []
        if model_fingerprint(self._model, self._blocks) != self._model_key:
            changed.append("the model's trainable (adapter) weights")
        if len(self._records) != len(self._ids):
            changed.append(f"the training records (now {len(self._records)}, were {len(self._ids)})")
        elif dataset_fingerprint(self._records, example_ids(self._records)) != self._data_key:
            changed.append("the training records")
        if changed:
            problem = GradientSourceChangedError(
                f"On-the-fly training gradients: {' and '.join(changed)} changed since the source was created "
                f"(detected {when}). Every pass recomputes the gradients, so the passes would mix "
                "two models or datasets. Leave the model and records untouched while scoring, or create a new "
                "OnTheFlyGradients after changing them."
            )
        ctx.raise_if_any(problem, "Checking the on-the-fly training gradients")

    # ------------------------------------------------------------------ norms
    def _norms_key(self) -> str:
        payload = {
            "fingerprint": self._fingerprint,
            "data": self._data_key,
            "blocks": self._block_dims,
            "dtype": self._dtype_name,
            "batch_size": self.batch_size,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def _norms_path(self) -> Path | None:
        return None if self.work_dir is None else self.work_dir / f"train-norms-{self._norms_key()}.safetensors"

    def _load_norms(self) -> torch.Tensor | None:
        """The checkpointed norms, when every rank finds a valid file for this very configuration."""
        ctx = dist_context()
        path = self._norms_path()
        norms: torch.Tensor | None = None
        if path is not None and path.is_file():
            try:
                loaded = load_safetensors(path.read_bytes())["norms"]
                if tuple(loaded.shape) == (self.num_examples, len(self._block_dims)) and loaded.dtype == torch.float64:
                    norms = loaded
                else:
                    logger.warning("Ignoring the norms checkpoint %s: its shape does not match.", path)
            except Exception as err:  # a damaged file is recomputed, never trusted
                logger.warning("Ignoring the unreadable norms checkpoint %s (%s).", path, err)
        if not all(ctx.all_gather_object(norms is not None)):
            return None
        logger.info("Read the training gradients' squared norms from %s (no norms pass).", path)
        return norms

    def _norms_pass(self) -> torch.Tensor:
        """One pass over this rank's rows: ``||g_il||^2`` from the served (cast) rows, gathered over ranks."""
        ctx = dist_context()
        local_rows = ctx.shard(self.num_examples)
        names = list(self._block_dims)
        local = torch.empty(len(local_rows), len(names), dtype=torch.float64)
        error: Exception | None = None
        try:
            from tqdm.auto import tqdm

            position = 0
            with tqdm(
                total=len(local_rows),
                desc="gradient norms",
                unit="ex",
                disable=not (self.progress and ctx.is_main),
                leave=False,
            ) as bar:
                for ids, batch in self.iter_batches(self.batch_size, rows=local_rows):
                    for j, name in enumerate(names):
                        local[position : position + len(ids), j] = row_squared_norms(batch[name].cpu())
                    position += len(ids)
                    bar.update(len(ids))
            self._check_finite(local, local_rows)
        except Exception as err:
            if not ctx.is_distributed:
                raise
            error = err
        ctx.raise_if_any(error, "The norms pass of the on-the-fly training gradients")
        norms = ctx.all_gather_cat(local)
        self._save_norms(norms)
        return norms

    def _check_finite(self, norms: torch.Tensor, rows: range) -> None:
        """Refuse non-finite norms ``(len(rows), L)`` of the examples ``rows``, naming them."""
        if not torch.isfinite(norms).all():
            bad = (~torch.isfinite(norms)).any(dim=1).nonzero().flatten().tolist()
            raise NonFiniteGradientError(
                f"Training gradients of examples {_ids_text([self._ids[rows.start + i] for i in bad])} "
                f"overflow the dtype {self._dtype_name}; use dtype='float32'."
            )

    def _save_norms(self, norms: torch.Tensor) -> None:
        """Checkpoint the norms of every example (rank 0 writes; nothing without a work folder)."""
        path = self._norms_path()
        if path is not None and dist_context().is_main:
            metadata = {"format": _NORMS_FORMAT, "key": self._norms_key(), "ids": json.dumps(self._ids[:3])}
            atomic_write_bytes(path, save_safetensors({"norms": norms.contiguous()}, metadata=metadata))
            logger.info("Checkpointed the training gradients' squared norms to %s.", path)

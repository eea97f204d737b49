"""The interface every influence method implements, the context the engine hands it, and the registry.

All methods share one structure (docs/method.md sections 2 and 6). For each block ``l`` with training gradients
``X_l`` (``n x d_l``) and test gradients ``V_l`` (``m x d_l``) they compute a *preconditioned test
matrix*

    R_l ~= V_l (G_l + lambda_l I)^-1,      G_l = X_l^T X_l / n,

and the influence of training example ``k`` on test row ``j`` is ``I[j, k] = - sum_l R_l[j] . g_kl``
(positive = harmful: up-weighting ``k`` raises the test loss). Methods differ only in how they get
``R_l``; the engine (:mod:`datainf.influence`) computes ``lambda_l``, streams the final scoring pass
and does the bookkeeping. In ``mode="self"`` the engine asks for each training example's
self-influence ``s_k = sum_l g_kl^T P_l g_kl`` instead, ``P_l`` the method's approximation of
``(G_l + lambda_l I)^-1`` (:meth:`InfluenceMethod.self_influence`).

How to write a method
---------------------
One file in ``datainf/methods/`` (imported by ``datainf/methods/__init__.py`` so that it registers):

1. subclass :class:`InfluenceMethod`, set :attr:`~InfluenceMethod.name` (lower case, ``_`` not
   ``-``) and :attr:`~InfluenceMethod.passes_description`; settings go in a nested frozen
   dataclass ``Options`` validated in its ``__post_init__`` (raise :class:`~datainf.errors.ConfigError`);
2. implement :meth:`~InfluenceMethod.precondition` (``R_l`` for every block in ``ctx.blocks``);
   override :meth:`~InfluenceMethod.self_influence` when there is something cheaper than the default
   (which preconditions the training gradients themselves, one chunk of rows at a time);
3. decorate the class with :func:`register_method`. Every entry point (``influence``, ``datainf score``,
   the demo, the explain pipelines) then accepts the name; :func:`available_methods` lists it.

A method reads the training gradients **only** through the :class:`MethodContext` helpers (each
``streamed_*`` call is one pass over the rows):

* :meth:`MethodContext.streamed_sum`: sums over examples (``X^T X``, ``sum_i c_i g_i``, ...): the
  method adds each batch's contribution in place; the totals it gets back are over *all* training
  examples;
* :meth:`MethodContext.streamed_rows`: per-example results (``(n, ...)``, store order);
* :meth:`MethodContext.streamed_pass`: both in one pass;
* :meth:`MethodContext.squared_norms` / :meth:`MethodContext.squared_norm_total`: the recorded
  ``||g_il||^2`` of every example, by block name (no pass);
* :meth:`MethodContext.training_chunks`: every training row in chunks, for using training
  gradients as test vectors (self-influence);
* :meth:`MethodContext.streamed_pass_with_norms`: a pass that also records every example's
  ``||g_il||^2``, for a method that fuses the engine's norms pass into its own
  (:attr:`InfluenceMethod.fuses_norms_pass`, docs/method.md section 6.1).

Under ``torch.distributed`` (``torchrun``; :mod:`datainf.distributed`) each process streams only its
share of the rows: the helpers all-reduce the sums and all-gather the per-example rows before they
return, so a method written with them gives the same result on any number of processes and never
sees a partial sum. When the engine normalises the gradients (``InfluenceConfig(normalize=True)``)
the helpers hand out the normalised rows and norms, so methods need not know about it either.
``tests/test_method_context.py`` runs every registered method as a two-process job in one process:
a new method is checked there without any change to the tests.

A whole method, for illustration (the damped diagonal, like :mod:`datainf.methods.diagonal`)::

    @register_method
    class DampedDiagonal(InfluenceMethod):
        name = "damped_diagonal"
        passes_description = "1 pass"

        def precondition(self, test, ctx):
            def add(sums, batch):
                for b in ctx.blocks:
                    sums[b] += batch[b].double().square().sum(dim=0)

            zeros = {b: torch.zeros(ctx.train.block_dims[b], dtype=torch.float64, device=ctx.device) for b in ctx.blocks}
            totals = ctx.streamed_sum("diagonal", zeros, add)  # over every example of every process
            return Preconditioned({
                b: (test[b].double() / (totals[b] / ctx.total_examples + ctx.lambdas[b])).to(ctx.compute_dtype)
                for b in ctx.blocks
            })
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from tqdm.auto import tqdm

from datainf.distributed import DistributedContext
from datainf.errors import ConfigError
from datainf.methods.checkpoints import PassCheckpoints
from datainf.store import GradientSource, row_squared_norms

__all__ = [
    "Batch",
    "FusedPass",
    "InfluenceMethod",
    "MethodContext",
    "Preconditioned",
    "SelfInfluence",
    "register_method",
    "unregister_method",
    "get_method",
    "available_methods",
    "unknown_methods",
    "check_method_names",
    "unit_scales",
]

#: One streamed batch: block name -> ``(b, d_l)`` rows in ``compute_dtype`` on the context's device.
Batch = dict[str, torch.Tensor]


def unit_scales(squared_norms: torch.Tensor) -> torch.Tensor:
    """``1 / ||g_i||`` per example from per-block squared norms ``(n, L)`` (float64 ``(n,)``; 0 for an all-zero gradient)."""
    totals = squared_norms.sum(dim=1)
    return torch.where(totals > 0, totals.rsqrt(), torch.zeros_like(totals))


@dataclass
class MethodContext:
    """What the engine hands a method: the training store, damping, settings and streaming helpers.

    Attributes:
        train: the training gradients (``n`` examples): a store, or a source that recomputes them on
            every pass (:class:`datainf.gradients.OnTheFlyGradients`), read only by the helpers below.
        lambdas: ``lambda_l`` per block (docs/method.md section 4), the same for every method.
        blocks: the blocks to process, in a fixed (sorted) order; blocks whose training gradients are
            all zero are left out (they contribute nothing).
        batch_size: examples per batch read from the store (also the chunk size of
            :meth:`training_chunks`).
        compute_dtype: dtype of per-batch arithmetic (float64 sums are kept where it matters).
        device: where arithmetic runs.
        progress: show tqdm bars.
        total_examples: ``n``, the number of training examples over all processes.
        passes: streaming passes made so far.
        rows: this process's contiguous share of the training rows (``None``: every row); set by the
            engine. Methods need not look at it: the streaming helpers combine the shares.
        processes: the collectives of this job (:class:`~datainf.distributed.DistributedContext`; a
            single process by default, where every collective is the identity).
        example_scales: ``(n,)`` float64 factor applied to every training row before a method sees
            it (``1 / ||g_i||`` when the engine normalises the gradients), or ``None``: rows as stored.
        checkpoints: where :meth:`streamed_pass` keeps each finished pass's results and replays them
            on a rerun (:class:`~datainf.methods.checkpoints.PassCheckpoints`; set by the engine for
            training gradients recomputed on every pass), or ``None``.
        normalize_rows: unit-normalise every row inside its batch (``g_i / ||g_i||``, the norm over
            every block of the source) in :meth:`streamed_pass_with_norms`: set by the engine for a
            fused norms pass with ``normalize=True``, where :attr:`example_scales` is not known yet.
    """

    train: GradientSource
    lambdas: Mapping[str, float]
    blocks: Sequence[str]
    batch_size: int
    compute_dtype: torch.dtype
    device: torch.device
    progress: bool = True
    total_examples: int = 0
    passes: int = 0
    rows: range | None = None
    processes: DistributedContext = field(default_factory=DistributedContext)
    example_scales: torch.Tensor | None = None
    checkpoints: PassCheckpoints | None = None
    normalize_rows: bool = False
    _norms: torch.Tensor | None = field(default=None, init=False, repr=False)
    _norm_totals: torch.Tensor | None = field(default=None, init=False, repr=False)

    @property
    def local_rows(self) -> range:
        """The training rows this process streams (every row in a single process)."""
        return range(self.train.num_examples) if self.rows is None else self.rows

    # ------------------------------------------------------------------ recorded norms (no pass)
    def _all_norms(self) -> torch.Tensor:
        """``||g_il||^2`` of every training example (scaled rows when normalising): float64 ``(n, L)``."""
        if self._norms is None:
            norms = self.train.squared_norms()
            if self.example_scales is not None:
                norms = norms * self.example_scales.square().unsqueeze(1)
            self._norms = norms
        return self._norms

    def _column(self, block: str) -> int:
        try:
            return list(self.train.block_dims).index(block)
        except ValueError:
            raise ConfigError(f"Block {block!r} is not in the training store.") from None

    def squared_norms(self, block: str) -> torch.Tensor:
        """``||g_kl||^2`` of every training example (all processes' rows) for ``block``: float64 ``(n,)``.

        Read from the store's recorded norms (no pass); after normalisation, of the normalised rows.
        """
        return self._all_norms()[:, self._column(block)]

    def squared_norm_total(self, block: str) -> float:
        """``sum_i ||g_il||^2`` over every training example for ``block`` (float64 sum; no pass)."""
        if self._norm_totals is None:
            self._norm_totals = self._all_norms().sum(dim=0)
        return float(self._norm_totals[self._column(block)])

    # ------------------------------------------------------------------ streaming passes
    def _convert(self, batch: Mapping[str, torch.Tensor], first_row: int) -> Batch:
        """Storage rows -> ``compute_dtype`` on ``device``, times :attr:`example_scales` when set (never in place)."""
        out = {name: t.to(device=self.device, dtype=self.compute_dtype) for name, t in batch.items()}
        if self.example_scales is not None:
            size = next(iter(out.values())).shape[0] if out else 0
            scale = self.example_scales[first_row : first_row + size].to(device=self.device, dtype=self.compute_dtype)
            out = {name: t * scale.unsqueeze(1) for name, t in out.items()}
        return out

    def _stream(self, description: str, blocks: Sequence[str] | None = None) -> Iterator[Batch]:
        """One pass over *this process's* rows: ``{block: (b, d_l)}`` in ``compute_dtype``.

        Private: what a method accumulates from it is partial under ``torch.distributed``. Methods
        use :meth:`streamed_sum` / :meth:`streamed_rows` / :meth:`streamed_pass`, which combine
        the processes' shares.
        """
        self.passes += 1
        names = list(self.blocks if blocks is None else blocks)
        rows = self.local_rows
        position = rows.start
        with tqdm(total=len(rows), desc=description, unit="ex", disable=not self.progress, leave=False) as bar:
            for ids, batch in self.train.iter_batches(self.batch_size, blocks=names, rows=rows):
                yield self._convert(batch, position)
                position += len(ids)
                bar.update(len(ids))

    def _empty_batch(self, names: Sequence[str]) -> Batch:
        dims = self.train.block_dims
        return {name: torch.zeros(0, dims[name], dtype=self.compute_dtype, device=self.device) for name in names}

    def streamed_pass(
        self,
        description: str,
        *,
        sums: dict[str, torch.Tensor] | None = None,
        add: Callable[[dict[str, torch.Tensor], Batch], None] | None = None,
        rows_of: Callable[[Batch], Mapping[str, torch.Tensor]] | None = None,
        blocks: Sequence[str] | None = None,
        dim: int = 0,
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """One streaming pass that accumulates sums over examples and/or collects per-example rows.

        Args:
            description: progress-bar label.
            sums: accumulators (any shapes, e.g. ``(m, d_l)`` or ``(d_l, d_l)``), usually zeros;
                ``add(sums, batch)`` adds one batch's contribution to them **in place**.
            add: called once per batch with the accumulators and ``batch = {block: (b, d_l)}``
                (``compute_dtype``, on ``ctx.device``; read-only: it may share the store's memory).
            rows_of: called once per batch; returns ``{key: tensor}`` with the batch's ``b``
                examples along dimension ``dim``.
            blocks: the blocks to read (default ``ctx.blocks``).
            dim: the dimension of ``rows_of``'s outputs that indexes examples.

        Returns:
            ``(totals, rows)``: ``totals[key]`` is ``sums[key]`` summed over every training example
            of every process (an all-reduce; in one process the very tensors given); ``rows[key]``
            holds the ``n`` examples' outputs along ``dim`` in store order, on every process.
        """
        if (sums is None) != (add is None):
            raise ConfigError("streamed_pass: give both `sums` and `add`, or neither.")
        names = list(self.blocks if blocks is None else blocks)
        accumulators = sums if sums is not None else {}
        replayed = self._replay(accumulators, rows_of is not None)
        if replayed is not None:
            return replayed
        collected: dict[str, torch.Tensor] = {}
        start = 0
        local = len(self.local_rows)
        for batch in self._stream(description, names):
            if add is not None:
                add(accumulators, batch)
            if rows_of is not None:
                size = next(iter(batch.values())).shape[0]
                for key, value in rows_of(batch).items():
                    if key not in collected:  # preallocate this process's (.., n_local, ..) output once
                        shape = list(value.shape)
                        shape[dim] = local
                        collected[key] = torch.empty(shape, dtype=value.dtype, device=value.device)
                    collected[key].narrow(dim, start, size).copy_(value)
                start += size
        if rows_of is not None and local == 0:  # this process holds no rows: shapes from an empty batch
            collected = {key: value.clone() for key, value in rows_of(self._empty_batch(names)).items()}
        for key in list(accumulators):  # one at a time, in the same order on every process
            accumulators[key] = self.processes.all_reduce_sum(accumulators[key])
        gathered = {key: self.processes.all_gather_cat(collected.pop(key), dim=dim) for key in list(collected)}
        if self.checkpoints is not None:
            self.checkpoints.save(self.passes, accumulators, gathered)
        return accumulators, gathered

    def _replay(
        self, accumulators: dict[str, torch.Tensor], want_rows: bool
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None:
        """The next pass's results from :attr:`checkpoints` (counted as a pass), or ``None``: stream it."""
        if self.checkpoints is None:
            return None
        found = self.checkpoints.load(self.passes + 1, self.device)
        if found is None:
            return None
        sums, rows = found
        fits = set(sums) == set(accumulators) and bool(rows) == want_rows
        fits = fits and all(sums[k].shape == accumulators[k].shape for k in accumulators)
        if not fits:  # the same on every rank: they read the same file
            return None
        self.passes += 1
        for key, value in sums.items():
            accumulators[key].copy_(value)
        return accumulators, rows

    def streamed_sum(
        self,
        description: str,
        sums: dict[str, torch.Tensor],
        add: Callable[[dict[str, torch.Tensor], Batch], None],
        *,
        blocks: Sequence[str] | None = None,
    ) -> dict[str, torch.Tensor]:
        """One pass; ``add(sums, batch)`` accumulates in place; returns the sums over all examples.

        See :meth:`streamed_pass`. Example (DataInf's ``sum_i c_il g_il``)::

            def add(acc, batch):
                for b in ctx.blocks:
                    acc[b].addmm_(coefficients(batch[b]), batch[b])
            totals = ctx.streamed_sum("DataInf", {b: torch.zeros_like(test[b]) for b in ctx.blocks}, add)
        """
        totals, _ = self.streamed_pass(description, sums=sums, add=add, blocks=blocks)
        return totals

    def streamed_rows(
        self,
        description: str,
        rows_of: Callable[[Batch], Mapping[str, torch.Tensor]],
        *,
        blocks: Sequence[str] | None = None,
        dim: int = 0,
    ) -> dict[str, torch.Tensor]:
        """One pass; ``rows_of(batch)`` maps each batch to per-example outputs; returns them for all ``n`` examples.

        See :meth:`streamed_pass` (outputs in store order along ``dim``, on every process).
        """
        _, rows = self.streamed_pass(description, rows_of=rows_of, blocks=blocks, dim=dim)
        return rows

    def streamed_pass_with_norms(
        self,
        description: str,
        *,
        sums: dict[str, torch.Tensor],
        add: Callable[[dict[str, torch.Tensor], Batch, torch.Tensor], None],
        rows_of: Callable[[Batch, torch.Tensor], Mapping[str, torch.Tensor]] | None = None,
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor]:
        """One pass over **every** block of the source that also records each example's squared norms.

        For training gradients whose norms are not known before the pass (a source that recomputes
        them, docs/method.md section 6.1): the method accumulates its sums and, in the same pass, the
        engine gets the ``||g_il||^2`` a separate norms pass would have recorded.

        Args:
            description: progress-bar label.
            sums: accumulators, summed over every example of every process (as :meth:`streamed_pass`).
            add: ``add(sums, batch, norms)`` per batch: ``batch = {block: (b, d_l)}`` for every block
                of the source (unit-normalised rows when :attr:`normalize_rows`), ``norms`` float64
                ``(b, L)``: ``||g_il||^2`` of the rows *as given to add* (normalised ones too), columns
                in ``train.block_dims`` order.
            rows_of: ``rows_of(batch, norms)`` per batch, called after ``add`` with the same two
                arguments; per-example outputs along dimension 0 (as :meth:`streamed_pass`).

        Returns:
            ``(totals, rows, recorded)``: as :meth:`streamed_pass`, plus ``recorded``, float64
            ``(n, L)``: the squared norms of the rows as the source serves them (before any
            normalisation; what :meth:`GradientSource.squared_norms` returns), every process's rows
            in store order. They are those of the ``compute_dtype`` rows, taken like a store takes
            them (:func:`datainf.store.row_squared_norms` on the CPU): the same numbers bit for bit
            when ``compute_dtype`` holds the storage dtype exactly.
        """
        names = list(self.train.block_dims)
        current: dict[str, Any] = {}

        def add_with_norms(accumulators: dict[str, torch.Tensor], batch: Batch) -> None:
            raw = torch.stack([row_squared_norms(batch[name].cpu()) for name in names], dim=1)  # (b, L)
            seen = raw
            if self.normalize_rows:
                scales = unit_scales(raw)  # (b,) float64
                factor = scales.to(device=self.device, dtype=self.compute_dtype).unsqueeze(1)
                batch = {name: t * factor for name, t in batch.items()}
                seen = raw * scales.square().unsqueeze(1)
            current.update(batch=batch, raw=raw, seen=seen)
            add(accumulators, batch, seen)

        def rows_with_norms(batch: Batch) -> dict[str, torch.Tensor]:
            if "raw" not in current:  # the empty batch of a process without rows: shapes only
                raw = torch.zeros(0, len(names), dtype=torch.float64)
                out = {"__norms__": raw}
                if rows_of is not None:
                    out.update(rows_of(batch, raw))
                return out
            out = {"__norms__": current.pop("raw")}
            if rows_of is not None:
                out.update(rows_of(current.pop("batch"), current.pop("seen")))
            current.clear()
            return out

        totals, rows = self.streamed_pass(
            description, sums=sums, add=add_with_norms, rows_of=rows_with_norms, blocks=names
        )
        recorded = rows.pop("__norms__")
        return totals, rows, recorded

    def record_pass(self, sums: dict[str, torch.Tensor], rows: Mapping[str, torch.Tensor] | None = None) -> None:
        """Count a pass whose results were computed outside this context, and checkpoint them as that pass.

        For a fused pass (docs/method.md section 6.1): ``sums`` / ``rows`` (already combined over
        processes) are what this context's next :meth:`streamed_pass` would have returned, so a
        rerun with the same checkpoints replays them there.
        """
        self.passes += 1
        if self.checkpoints is not None:
            self.checkpoints.save(self.passes, sums, dict(rows or {}))

    def training_chunks(self, description: str, blocks: Sequence[str] | None = None) -> Iterator[tuple[range, Batch]]:
        """Every training row (not only this process's), ``batch_size`` at a time: ``(rows, {block: (c, d_l)})``.

        For using training gradients as *test* vectors, e.g. preconditioning them for
        self-influence. Every process gets the same chunks in the same order, so collectives
        inside the loop (the streaming helpers) line up. Not for sums over examples (that would
        count each row once per process): use :meth:`streamed_sum`. Counted as one pass.
        """
        self.passes += 1
        names = list(self.blocks if blocks is None else blocks)
        position = 0
        total = self.train.num_examples
        with tqdm(total=total, desc=description, unit="ex", disable=not self.progress, leave=False) as bar:
            for ids, batch in self.train.iter_batches(self.batch_size, blocks=names):
                yield range(position, position + len(ids)), self._convert(batch, position)
                position += len(ids)
                bar.update(len(ids))


@dataclass
class Preconditioned:
    """A method's output: ``vectors[block]`` is ``R_l`` of shape ``(m, d_l)``; ``diagnostics`` is JSON-able."""

    vectors: dict[str, torch.Tensor]
    diagnostics: dict[str, Any] = field(default_factory=dict)


@dataclass
class FusedPass:
    """What :meth:`InfluenceMethod.fused_norms_pass` returns (docs/method.md section 6.1).

    Attributes:
        norms: ``||g_il||^2`` of every training example as served, float64 ``(n, L)`` in
            ``train.block_dims`` order (what a norms pass records; the engine derives the exact
            ``lambda_l`` from them and hands them to the source).
        state: the method's own results of the pass, read back by :meth:`InfluenceMethod.finish_fused`.
        diagnostics: JSON-able entries about the fused pass (filled by ``finish_fused``, also when it
            falls back; the engine records them as ``Scores.diagnostics["fused_norms_pass"]``).
    """

    norms: torch.Tensor
    state: Any = None
    diagnostics: dict[str, Any] = field(default_factory=dict)


@dataclass
class SelfInfluence:
    """Self-influence ``s_k = sum_l g_kl^T P_l g_kl`` of every training example: ``values`` float64 ``(n,)``."""

    values: torch.Tensor
    diagnostics: dict[str, Any] = field(default_factory=dict)


def _merge_diagnostics(parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Diagnostics of several preconditioning calls as one: flags or-ed, lists united, numbers maxed."""
    out: dict[str, Any] = {}
    for part in parts:
        for key, value in part.items():
            if key not in out:
                out[key] = sorted(set(value)) if isinstance(value, list) else value
            elif isinstance(value, bool):
                out[key] = bool(out[key]) or value
            elif isinstance(value, (int, float)) and isinstance(out[key], (int, float)):
                out[key] = max(out[key], value)
            elif isinstance(value, list):
                out[key] = sorted(set(out[key]) | set(value))
            else:
                out[key] = value
    return out


class InfluenceMethod(ABC):
    """Strategy computing ``R_l ~= V_l (G_l + lambda_l I)^-1`` for every block.

    Subclasses set :attr:`name`, :attr:`passes_description` and may define a nested dataclass
    ``Options`` holding their settings (validated in its ``__post_init__``).
    """

    name: ClassVar[str]
    passes_description: ClassVar[str]
    #: True when the method needs more than the gradients (``kfac`` / ``ekfac``: the Kronecker factors
    #: collected beside the store); it refuses gradients given as plain tensors.
    needs_factors: ClassVar[bool] = False
    #: True when the method implements :meth:`fused_norms_pass` / :meth:`finish_fused`: its first
    #: pass can run before ``lambda_l`` is known, recording the training norms on the way (for
    #: training gradients recomputed on every pass, where the engine's norms pass is a full pass of
    #: gradient computation; docs/method.md section 6.1).
    fuses_norms_pass: ClassVar[bool] = False

    @dataclass(frozen=True)
    class Options:
        """No settings."""

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        allowed = {f.name for f in dataclasses.fields(self.Options)}
        unknown = sorted(set(options or {}) - allowed)
        if unknown:
            raise ConfigError(
                f"Method {self.name!r} has no option(s) {unknown}; its options are {sorted(allowed) or 'none'}."
            )
        self.options = self.Options(**dict(options or {}))

    @abstractmethod
    def precondition(self, test: Mapping[str, torch.Tensor], ctx: MethodContext) -> Preconditioned:
        """Return ``R_l`` for every block in ``ctx.blocks``.

        Args:
            test: block -> test gradients ``V_l`` of shape ``(m, d_l)`` in ``ctx.compute_dtype`` on
                ``ctx.device`` (read-only).
            ctx: training store, damping, settings and the streaming helpers.
        """

    def fused_norms_pass(self, test: Mapping[str, torch.Tensor], ctx: MethodContext) -> FusedPass:
        """The method's first pass made with provisional damping, recording the training norms (optional).

        Called by the engine (only when :attr:`fuses_norms_pass`) instead of a separate norms pass
        followed by :meth:`precondition`. ``ctx.lambdas`` are then *provisional* values
        ``lambda0_l`` (from a pilot of a few rows, or the fixed ``lambda``), ``ctx.blocks`` every
        block (a block with ``lambda0_l = 0`` saw only zero gradients in the pilot), and the method
        streams through :meth:`MethodContext.streamed_pass_with_norms`.

        Args:
            test: block -> ``V_l`` of shape ``(m, d_l)`` for every block of ``ctx.blocks``.
            ctx: the provisional context (no checkpoints).
        """
        raise NotImplementedError(f"Method {self.name!r} does not fuse the norms pass.")

    def finish_fused(
        self, fused: FusedPass, test: Mapping[str, torch.Tensor], ctx: MethodContext
    ) -> Preconditioned | None:
        """``R_l`` from a :meth:`fused_norms_pass`, now that ``ctx.lambdas`` are exact; ``None``: fall back.

        ``ctx`` is the ordinary context (exact ``lambda_l``, the blocks with non-zero gradients,
        checkpoints): the method records the pass it replaces with :meth:`MethodContext.record_pass`
        when it returns ``R_l``. On ``None`` (its accuracy guarantee does not hold) the engine calls
        :meth:`precondition` with the same context, one more pass.
        """
        raise NotImplementedError(f"Method {self.name!r} does not fuse the norms pass.")

    def self_influence(self, ctx: MethodContext) -> SelfInfluence:
        """``s_k = sum_l g_kl^T P_l g_kl`` for every training example ``k`` (``P_l`` this method's inverse).

        Default: the training rows themselves are the test vectors, one chunk of ``ctx.batch_size``
        rows at a time (:meth:`MethodContext.training_chunks`): ``R = precondition(X_chunk)``, then
        ``s_k = sum_l R_l[k] . g_kl``. That costs this method's passes once per chunk; methods
        with a cheaper form override this. No ``n x n`` matrix is formed.
        """
        values = torch.empty(ctx.total_examples, dtype=torch.float64)
        diagnostics: list[dict[str, Any]] = []
        for rows, chunk in ctx.training_chunks(f"Self-influence ({self.name})"):
            result = self.precondition(chunk, ctx)
            part = torch.zeros(len(rows), dtype=torch.float64)
            for name in ctx.blocks:
                part += (result.vectors[name] * chunk[name]).sum(dim=1).to("cpu", torch.float64)
            values[rows.start : rows.stop] = part
            diagnostics.append(result.diagnostics)
        return SelfInfluence(values, _merge_diagnostics(diagnostics))

    def settings(self) -> dict[str, Any]:
        """The method's options as a JSON-able dict (recorded with the scores)."""
        return dataclasses.asdict(self.options)


_REGISTRY: dict[str, type[InfluenceMethod]] = {}


def _key(name: str) -> str:
    return str(name).strip().replace("-", "_").lower()


def register_method(cls: type[InfluenceMethod]) -> type[InfluenceMethod]:
    """Class decorator adding an :class:`InfluenceMethod` to the registry under ``cls.name``."""
    if cls.name in _REGISTRY:
        raise ValueError(f"An influence method named {cls.name!r} is already registered.")
    if _key(cls.name) != cls.name:
        raise ValueError(f"Method names are lower case with '_' (got {cls.name!r}; use {_key(cls.name)!r}).")
    _REGISTRY[cls.name] = cls
    return cls


def unregister_method(name: str) -> type[InfluenceMethod]:
    """Remove the method registered as ``name`` (e.g. a toy method after a test); returns its class."""
    key = _key(name)
    if key not in _REGISTRY:
        raise ConfigError(f"No influence method named {name!r} is registered; registered: {available_methods()}.")
    return _REGISTRY.pop(key)


def available_methods() -> list[str]:
    """Names of the registered methods (sorted)."""
    return sorted(_REGISTRY)


def unknown_methods(names: Iterable[str]) -> list[str]:
    """The entries of ``names`` that name no registered method (``-`` and ``_``, case are equivalent)."""
    return [name for name in names if _key(name) not in _REGISTRY]


def check_method_names(names: Iterable[str], *, what: str = "methods") -> tuple[str, ...]:
    """Validate a list of method names against the registry; returns them normalised (``exact``, ``hessian_free``).

    Raises:
        ConfigError: the list is empty, repeats a method or names an unregistered one.
    """
    given = [str(name) for name in names]
    known = available_methods()
    if not given:
        raise ConfigError(f"{what} is empty: name at least one of {known}.")
    unknown = unknown_methods(given)
    if unknown:
        raise ConfigError(f"Unknown method(s) {unknown} in {what}; choose from {known}.")
    normalised = tuple(_key(name) for name in given)
    if len(set(normalised)) != len(normalised):
        raise ConfigError(f"{what} {given} repeats a method.")
    return normalised


def get_method(name: str, options: Mapping[str, Any] | None = None) -> InfluenceMethod:
    """Instantiate the method called ``name`` with its ``options``."""
    key = _key(name)
    if key not in _REGISTRY:
        raise ConfigError(f"Unknown influence method {name!r}; choose one of {available_methods()}.")
    return _REGISTRY[key](options)

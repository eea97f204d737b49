"""The interface every influence method implements, and the registry that names them.

All four methods of the paper share one structure (method.md section 3). For each block ``l`` with
training gradients ``X_l`` (``n x d_l``) and test gradients ``V_l`` (``m x d_l``) they compute a
*preconditioned test matrix*

    R_l ~= V_l (G_l + lambda_l I)^-1,      G_l = X_l^T X_l / n,

and the influence of training example ``k`` on test row ``j`` is ``I[j, k] = - sum_l R_l[j] . g_kl``
(positive = harmful: up-weighting ``k`` raises the test loss). Methods differ only in how they get
``R_l``; the engine (:mod:`datainf.influence`) computes ``lambda_l``, streams the final scoring pass
and does the bookkeeping. A new method is one subclass in one file, registered with
:func:`register_method`.

Every pass a method makes over the training gradients must be a sum over examples (or a
per-example map): under ``torch.distributed`` (:mod:`datainf.distributed`) each process streams only
its share of the rows (:meth:`MethodContext.stream`), so pass every such sum through
:attr:`MethodContext.sum_over_processes` (an all-reduce) before using it, and rows a method must keep
whole through :attr:`MethodContext.gather_over_processes`.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from tqdm.auto import tqdm

from datainf.errors import ConfigError
from datainf.store import GradientStore

__all__ = ["InfluenceMethod", "MethodContext", "Preconditioned", "register_method", "get_method", "available_methods"]


@dataclass
class MethodContext:
    """What the engine hands a method: the training store, damping and settings for one run.

    Attributes:
        train: the training gradients (``n`` examples).
        lambdas: ``lambda_l`` per block (method.md section 2), the same for every method.
        blocks: the blocks to process, in a fixed (sorted) order; blocks whose training gradients are
            all zero are left out (they contribute nothing).
        batch_size: examples per batch read from the store.
        compute_dtype: dtype of per-batch arithmetic (float64 sums are kept where it matters).
        device: where arithmetic runs.
        progress: show tqdm bars.
        sum_over_processes: combines a per-process partial sum into the global sum (an
            ``all_reduce`` under ``torch.distributed``; the identity in one process).
        total_examples: ``n``, the number of training examples over all processes.
        passes: streaming passes made so far.
        rows: this process's contiguous share of the training rows (``None``: every row). Under
            ``torch.distributed`` each rank streams only its rows, so every sum over examples a
            method accumulates is partial until passed through :attr:`sum_over_processes`.
        gather_over_processes: concatenates per-process row blocks ``(n_rank, ...)`` into the full
            ``(n, ...)`` in store order (an ``all_gather``; the identity in one process).
    """

    train: GradientStore
    lambdas: Mapping[str, float]
    blocks: Sequence[str]
    batch_size: int
    compute_dtype: torch.dtype
    device: torch.device
    progress: bool = True
    sum_over_processes: Callable[[torch.Tensor], torch.Tensor] = lambda t: t
    total_examples: int = 0
    passes: int = 0
    rows: range | None = None
    gather_over_processes: Callable[[torch.Tensor], torch.Tensor] = lambda t: t

    @property
    def local_rows(self) -> range:
        """The training rows this process streams (every row in a single process)."""
        return range(self.train.num_examples) if self.rows is None else self.rows

    def stream(self, description: str, blocks: Sequence[str] | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """One streaming pass over this process's training rows: yields ``{block: (b, d_l)}`` in ``compute_dtype``."""
        self.passes += 1
        names = list(self.blocks if blocks is None else blocks)
        rows = self.local_rows
        with tqdm(total=len(rows), desc=description, unit="ex", disable=not self.progress, leave=False) as bar:
            for ids, batch in self.train.iter_batches(self.batch_size, blocks=names, rows=rows):
                yield {name: t.to(device=self.device, dtype=self.compute_dtype) for name, t in batch.items()}
                bar.update(len(ids))

    def local_squared_norms(self) -> torch.Tensor:
        """``||g_il||^2`` of this process's rows: float64 ``(n_local, L)``, block order of the store."""
        rows = self.local_rows
        return self.train.squared_norms()[rows.start : rows.stop]


@dataclass
class Preconditioned:
    """A method's output: ``vectors[block]`` is ``R_l`` of shape ``(m, d_l)``; ``diagnostics`` is JSON-able."""

    vectors: dict[str, torch.Tensor]
    diagnostics: dict[str, Any] = field(default_factory=dict)


class InfluenceMethod(ABC):
    """Strategy computing ``R_l ~= V_l (G_l + lambda_l I)^-1`` for every block.

    Subclasses set :attr:`name`, :attr:`passes_description` and may define a nested dataclass
    ``Options`` holding their settings (validated in its ``__post_init__``).
    """

    name: ClassVar[str]
    passes_description: ClassVar[str]

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
            test: block -> test gradients ``V_l`` of shape ``(m, d_l)`` in ``ctx.compute_dtype`` on ``ctx.device``.
            ctx: training store, damping and settings.
        """

    def settings(self) -> dict[str, Any]:
        """The method's options as a JSON-able dict (recorded with the scores)."""
        return dataclasses.asdict(self.options)


_REGISTRY: dict[str, type[InfluenceMethod]] = {}


def register_method(cls: type[InfluenceMethod]) -> type[InfluenceMethod]:
    """Class decorator adding an :class:`InfluenceMethod` to the registry under ``cls.name``."""
    if cls.name in _REGISTRY:
        raise ValueError(f"An influence method named {cls.name!r} is already registered.")
    _REGISTRY[cls.name] = cls
    return cls


def available_methods() -> list[str]:
    """Names of the registered methods."""
    return sorted(_REGISTRY)


def get_method(name: str, options: Mapping[str, Any] | None = None) -> InfluenceMethod:
    """Instantiate the method called ``name`` with its ``options``."""
    key = name.replace("-", "_").lower()
    if key not in _REGISTRY:
        raise ConfigError(f"Unknown influence method {name!r}; choose one of {available_methods()}.")
    return _REGISTRY[key](options)

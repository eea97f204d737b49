"""K-FAC and EK-FAC preconditioners from the Kronecker factors collected beside the gradient store.

For a block whose per-example gradient is the ``q x p`` matrix ``g_i`` (``d_l = p q``, stored
row-major), the factors of :mod:`datainf.factors` give ``G_l ~= S_l (x) A_l``. With the float64
eigendecompositions ``A = Q_A diag(a) Q_A^T`` and ``S = Q_S diag(s) Q_S^T`` both methods use

    (G_l + lambda_l I)^-1 v  ~=  Q_S [ (Q_S^T V Q_A) / (D_l + lambda_l) ] Q_A^T          (V: v as q x p)

elementwise division by a ``q x p`` matrix of eigenvalues ``D_l``:

* ``kfac``: ``D_l = s a^T``, the eigenvalues of ``S (x) A`` (Martens and Grosse 2015);
* ``ekfac``: ``D_l[j, k] = (1/n) sum_i (Q_S^T g_i Q_A)[j, k]^2``, the second moment of the gradients
  in the Kronecker eigenbasis, re-estimated from one pass over the stored gradients (George et al.
  2018). It is the best diagonal approximation of ``G_l`` in that basis, so it also carries the
  cross-position terms K-FAC drops.

``lambda_l`` is the engine's damping (the same rule as every method). Blocks without factors (a
tensor no hook covers, e.g. a LayerNorm weight or a non-hookable module) are preconditioned by their
damped diagonal, as the ``diagonal`` method does; ``diagnostics["kfac_diagonal_blocks"]`` lists them.

Costs per block (``p x p`` input factor, ``q x q`` output factor, ``m`` test rows, ``n`` training rows):

* memory: ``p^2 + q^2`` float64 numbers for the factors plus as much for the eigenvectors, and
  ``p q`` for ``D_l``; refused above ``max_memory_gb`` (method option, default 4);
* time: two eigendecompositions ``O(p^3 + q^3)``; preconditioning ``O(m p q (p + q))``; EK-FAC's
  extra pass ``O(n p q (p + q))``, the same for self-influence. For LoRA (``p`` or ``q`` is the rank
  ``r``) that is ``O(r d^2)`` per row, against DataInf's ``O(r d)``.
* passes before scoring: K-FAC 0 (1 when some block has no factors), EK-FAC 1; self mode one more.

Under ``torchrun`` every process reads the same factor files and the EK-FAC pass goes through
:meth:`~datainf.methods.MethodContext.streamed_sum`, so the result does not depend on the number of
processes. With ``normalize=True`` the factors (of the raw gradients) no longer match the gradients'
scale: ``ekfac`` re-estimates ``D_l`` from the normalised rows and is fine, ``kfac`` refuses.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch

from datainf.errors import ConfigError
from datainf.factors import KroneckerFactors, check_factor_memory, load_factors
from datainf.methods.base import Batch, InfluenceMethod, MethodContext, Preconditioned, SelfInfluence, register_method

__all__ = ["KFAC", "EKFAC"]


@dataclass
class _Basis:
    """One block's Kronecker eigenbasis: ``Q_S (q, q)``, ``Q_A (p, p)``, eigenvalues ``D (q, p)``; float64."""

    output_vectors: torch.Tensor
    input_vectors: torch.Tensor
    values: torch.Tensor

    def rotate(self, rows: torch.Tensor) -> torch.Tensor:
        """``Q_S^T g Q_A`` of every row: ``(b, q p) -> (b, q, p)`` float64."""
        q, p = self.values.shape
        return self.output_vectors.T @ rows.to(torch.float64).reshape(-1, q, p) @ self.input_vectors

    def unrotate(self, rotated: torch.Tensor) -> torch.Tensor:
        """``Q_S X Q_A^T`` of every ``(q, p)`` matrix: ``(b, q, p) -> (b, q p)``."""
        return (self.output_vectors @ rotated @ self.input_vectors.T).reshape(rotated.shape[0], -1)


class _Kronecker(InfluenceMethod):
    """Shared by K-FAC and EK-FAC: factors, eigenbases, the diagonal fallback, preconditioning."""

    reestimate: ClassVar[bool] = False
    needs_factors = True

    @dataclass(frozen=True)
    class Options(InfluenceMethod.Options):
        """factors: folder of the Kronecker factors (default: the store's own, see
        :func:`datainf.factors.load_factors`); max_memory_gb: float64 factor memory allowed."""

        factors: str | None = None
        max_memory_gb: float = 4.0

        def __post_init__(self) -> None:
            if not self.max_memory_gb > 0:
                raise ConfigError(f"max_memory_gb must be positive, got {self.max_memory_gb}.")
            if self.factors is not None and not isinstance(self.factors, str):
                raise ConfigError(f"factors must be a folder path (a string), got {type(self.factors).__name__}.")

    options: Options

    def _prepare(self, ctx: MethodContext) -> tuple[dict[str, _Basis], dict[str, torch.Tensor], list[str]]:
        """``(eigenbases of factor blocks, damped diagonals of the other blocks, the latter's names)``."""
        if ctx.example_scales is not None and not self.reestimate:
            raise ConfigError(
                "kfac uses the Kronecker factors of the raw gradients, which do not describe unit-normalised ones; "
                "use ekfac (it re-estimates the eigenvalues from the normalised gradients) or normalize=False."
            )
        factors: KroneckerFactors = load_factors(ctx.train, self.options.factors)
        covered = [b for b in ctx.blocks if b in factors.shapes]
        others = [b for b in ctx.blocks if b not in factors.shapes]
        check_factor_memory({b: factors.shapes[b] for b in covered}, self.options.max_memory_gb, what=self.name)
        bases: dict[str, _Basis] = {}
        for b in covered:
            a_values, a_vectors = torch.linalg.eigh(factors.input_factor(b))
            s_values, s_vectors = torch.linalg.eigh(factors.output_factor(b))
            values = torch.outer(s_values.clamp_min(0.0), a_values.clamp_min(0.0))
            bases[b] = _Basis(s_vectors.to(ctx.device), a_vectors.to(ctx.device), values.to(ctx.device))
        pass_blocks = (covered if self.reestimate else []) + others
        if not pass_blocks:
            return bases, {}, others
        dims = ctx.train.block_dims

        def add(sums: dict[str, torch.Tensor], batch: Batch) -> None:
            for b in pass_blocks:
                if b in bases:
                    sums[b] += bases[b].rotate(batch[b]).square().sum(dim=0)
                else:
                    sums[b] += batch[b].to(torch.float64).square().sum(dim=0)

        zeros = {
            b: torch.zeros(bases[b].values.shape if b in bases else (dims[b],), dtype=torch.float64, device=ctx.device)
            for b in pass_blocks
        }
        totals = ctx.streamed_sum(f"{self.name} eigenvalues", zeros, add, blocks=pass_blocks)
        for b in covered if self.reestimate else []:
            bases[b].values = totals[b] / ctx.total_examples
        return bases, {b: totals[b] / ctx.total_examples + ctx.lambdas[b] for b in others}, others

    def precondition(self, test: Mapping[str, torch.Tensor], ctx: MethodContext) -> Preconditioned:
        bases, diagonals, others = self._prepare(ctx)
        vectors: dict[str, torch.Tensor] = {}
        for b in ctx.blocks:
            if b in bases:
                basis = bases[b]
                rotated = basis.rotate(test[b]) / (basis.values + ctx.lambdas[b])
                vectors[b] = basis.unrotate(rotated).to(ctx.compute_dtype)
            else:
                vectors[b] = (test[b].to(torch.float64) / diagonals[b]).to(ctx.compute_dtype)
        return Preconditioned(vectors, {"kfac_diagonal_blocks": others})

    def self_influence(self, ctx: MethodContext) -> SelfInfluence:
        """``s_k = sum_l sum_jk (Q_S^T g_kl Q_A)[j, k]^2 / (D_l[j, k] + lambda_l)`` (diagonal blocks: ``g^2 / diag``)."""
        bases, diagonals, others = self._prepare(ctx)

        def own(batch: Batch) -> dict[str, torch.Tensor]:
            total = torch.zeros(next(iter(batch.values())).shape[0], dtype=torch.float64, device=ctx.device)
            for b in ctx.blocks:
                if b in bases:
                    basis = bases[b]
                    total += (basis.rotate(batch[b]).square() / (basis.values + ctx.lambdas[b])).sum(dim=(1, 2))
                else:
                    total += (batch[b].to(torch.float64).square() / diagonals[b]).sum(dim=1)
            return {"self": total}

        values = ctx.streamed_rows(f"{self.name} self", own)["self"].cpu()
        return SelfInfluence(values, {"kfac_diagonal_blocks": others})


@register_method
class KFAC(_Kronecker):
    """K-FAC: ``(S_l (x) A_l + lambda_l I)^-1`` through the eigendecompositions of the factors
    (module docstring: formula, costs). Needs the factors collected with the gradients
    (``collect_gradients(..., collect_factors=True)``)."""

    name = "kfac"
    passes_description = "0 passes (1 when some block has no factors; self mode: 1 more)"
    reestimate = False


@register_method
class EKFAC(_Kronecker):
    """EK-FAC: the K-FAC eigenbasis with the eigenvalues re-estimated from the stored gradients
    (George et al. 2018; module docstring: formula, costs). Needs the factors collected with the
    gradients (``collect_gradients(..., collect_factors=True)``)."""

    name = "ekfac"
    passes_description = "1 pass (eigenvalues in the Kronecker basis; self mode: 1 more)"
    reestimate = True

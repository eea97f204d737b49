"""Exact block-diagonal influence: ``(G_l + lambda_l I)^-1`` solved in float64."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from datainf.errors import ConfigError
from datainf.methods.base import Batch, InfluenceMethod, MethodContext, Preconditioned, SelfInfluence, register_method

logger = logging.getLogger(__name__)


def _spd_quadratic_form(matrix: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> x^T matrix^-1 x`` row by row (``(b, d) -> (b,)``) for a symmetric positive definite ``matrix``.

    Cholesky ``matrix = L L^T`` gives ``||L^-1 x||^2``; the eigh fallback ``sum_j (q_j . x)^2 / e_j``.
    """
    factor, info = torch.linalg.cholesky_ex(matrix)
    if int(info) == 0:
        return lambda x: torch.linalg.solve_triangular(factor, x.T, upper=False).square().sum(dim=0)
    eigenvalues, eigenvectors = torch.linalg.eigh(matrix)
    inverse = 1.0 / eigenvalues.clamp_min(torch.finfo(matrix.dtype).tiny)
    return lambda x: ((x @ eigenvectors).square() * inverse).sum(dim=1)


def _spd_solve(matrix: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Solve ``matrix @ x = rhs`` for a symmetric positive definite ``matrix`` (Cholesky, eigh fallback)."""
    factor, info = torch.linalg.cholesky_ex(matrix)
    if int(info) == 0:
        return torch.cholesky_solve(rhs, factor)
    eigenvalues, eigenvectors = torch.linalg.eigh(matrix)
    return eigenvectors @ ((eigenvectors.T @ rhs) / eigenvalues.clamp_min(torch.finfo(matrix.dtype).tiny).unsqueeze(1))


def exact_block_numbers(d: int, n: int) -> int:
    """float64 numbers Exact budgets for one block of ``d`` numbers per example and ``n`` examples:
    ``d^2`` (direct, ``d <= n``) or ``n d + n^2`` (Woodbury)."""
    return d * d if d <= n else n * d + n * n


def exact_groups(dims: Mapping[str, int], blocks: Sequence[str], n: int, max_memory_gb: float) -> list[list[str]]:
    """``blocks`` cut into consecutive groups whose float64 working memory fits ``max_memory_gb`` (Exact's passes).

    A block needs ``8 d_l^2`` bytes when ``d_l <= n`` (direct) and ``8 (n d_l + n^2)`` otherwise
    (Woodbury); a block needing more than the budget alone gets a group of its own (it is not refused).
    ``datainf plan`` counts Exact's passes with the same function.
    """
    budget = max_memory_gb * 2**30
    groups: list[list[str]] = [[]]
    used = 0.0
    for name in blocks:
        need = 8.0 * exact_block_numbers(dims[name], n)
        if groups[-1] and used + need > budget:
            groups.append([])
            used = 0.0
        groups[-1].append(name)
        used += need
    return groups


@register_method
class Exact(InfluenceMethod):
    """The estimand itself, per block, in float64 (docs/method.md section 7):

        R_l = V_l (G_l + lambda_l I)^-1,  G_l = X_l^T X_l / n.

    * ``d_l <= n`` (direct): accumulate ``G_l`` (``d_l x d_l``) in one pass, Cholesky-solve.
    * ``d_l > n`` (Woodbury): keep ``X_l`` (``n x d_l``) and use
      ``(X^T X/n + lambda I)^-1 v = (v - X^T (n lambda I + X X^T)^-1 X v) / lambda``.

    Under ``torch.distributed`` the ``d_l x d_l`` matrices are summed over processes and the Woodbury
    rows ``X_l`` are gathered (``n < d_l`` there, so they are the smaller side) by the context's
    :meth:`~datainf.methods.MethodContext.streamed_pass`.

    Memory per block is ``min(n, d_l) * d_l`` float64 numbers; blocks are processed in groups that fit
    ``max_memory_gb``, one streaming pass per group. Cost ``O(n min(n,d_l) d_l + min(n,d_l)^3)`` per block.
    """

    name = "exact"
    passes_description = (
        "1 pass per group of blocks that fits max_memory_gb (self mode: 1 more per group with direct blocks)"
    )

    @dataclass(frozen=True)
    class Options(InfluenceMethod.Options):
        """max_memory_gb: float64 working memory for the blocks solved together (one pass per group)."""

        max_memory_gb: float = 4.0

        def __post_init__(self) -> None:
            if not self.max_memory_gb > 0:
                raise ConfigError(f"exact: max_memory_gb must be positive, got {self.max_memory_gb}.")

    options: Options  # set by InfluenceMethod.__init__ from the method_options

    def _groups(self, ctx: MethodContext) -> list[list[str]]:
        """``ctx.blocks`` cut into consecutive groups whose float64 working memory fits ``max_memory_gb``."""
        return exact_groups(ctx.train.block_dims, ctx.blocks, ctx.total_examples, self.options.max_memory_gb)

    def _read_group(
        self, group: Sequence[str], ctx: MethodContext, description: str
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """One pass over the group: ``G_l + lambda_l I`` (direct blocks) and ``X_l`` (Woodbury blocks), float64."""
        n = ctx.total_examples
        dims = ctx.train.block_dims
        direct = [b for b in group if dims[b] <= n]
        woodbury = [b for b in group if dims[b] > n]

        def add(grams: dict[str, torch.Tensor], batch: Batch) -> None:
            for b in direct:
                x = batch[b].to(torch.float64)
                grams[b] += x.T @ x

        zeros = {b: torch.zeros(dims[b], dims[b], dtype=torch.float64, device=ctx.device) for b in direct}
        grams, rows = ctx.streamed_pass(
            description,
            sums=zeros,
            add=add,
            rows_of=(lambda batch: {b: batch[b].to(torch.float64) for b in woodbury}) if woodbury else None,
            blocks=group,
        )
        for b in direct:
            gram = grams[b] / n
            gram.diagonal().add_(ctx.lambdas[b])
            grams[b] = gram
        return grams, rows  # rows[b]: (n, d) every process's rows, in store order

    def precondition(self, test: Mapping[str, torch.Tensor], ctx: MethodContext) -> Preconditioned:
        n = ctx.total_examples
        groups = self._groups(ctx)
        vectors: dict[str, torch.Tensor] = {}
        branches: dict[str, str] = {}
        for index, group in enumerate(groups):
            hessians, rows = self._read_group(group, ctx, f"Exact {index + 1}/{len(groups)}")
            for b in list(hessians):
                v = test[b].to(torch.float64)
                vectors[b] = _spd_solve(hessians.pop(b), v.T).T.to(ctx.compute_dtype)
                branches[b] = "direct"
            for b in list(rows):
                lam = ctx.lambdas[b]
                x = rows.pop(b)  # (n, d)
                v = test[b].to(torch.float64)  # (m, d)
                kernel = x @ x.T
                kernel.diagonal().add_(n * lam)
                y = _spd_solve(kernel, x @ v.T)  # (n, m)
                vectors[b] = ((v - y.T @ x) / lam).to(ctx.compute_dtype)
                branches[b] = "woodbury"
        counts = {kind: sum(1 for v in branches.values() if v == kind) for kind in ("direct", "woodbury")}
        return Preconditioned(vectors, {"exact_branches": counts, "exact_groups": len(groups)})

    def self_influence(self, ctx: MethodContext) -> SelfInfluence:
        """``s_k = sum_l g_kl^T (G_l + lambda_l I)^-1 g_kl`` from the same factorisations as :meth:`precondition`.

        Direct blocks: ``s_kl = ||L_l^-1 g_kl||^2`` with ``L_l`` the Cholesky factor of
        ``G_l + lambda_l I``, in one more pass per group. Woodbury blocks (``d_l > n``): the rows
        are the kept ``X_l`` themselves, and ``(X^T X / n + lambda I)^-1 X^T = X^T (X X^T / n + lambda I)^-1``
        gives ``s_kl = [ (K_l / n + lambda_l I)^-1 K_l ]_kk`` with ``K_l = X_l X_l^T``: no further pass.
        """
        n = ctx.total_examples
        groups = self._groups(ctx)
        values = torch.zeros(n, dtype=torch.float64)
        branches = {"direct": 0, "woodbury": 0}
        for index, group in enumerate(groups):
            hessians, rows = self._read_group(group, ctx, f"Exact {index + 1}/{len(groups)}")
            for b in list(rows):
                x = rows.pop(b)  # (n, d)
                kernel = x @ x.T  # (n, n)
                shifted = kernel / n
                shifted.diagonal().add_(ctx.lambdas[b])
                values += _spd_solve(shifted, kernel).diagonal().cpu()
                branches["woodbury"] += 1
            if hessians:
                quadratic = {b: _spd_quadratic_form(hessians.pop(b)) for b in list(hessians)}

                def own(
                    batch: Batch, forms: dict[str, Callable[[torch.Tensor], torch.Tensor]] = quadratic
                ) -> dict[str, torch.Tensor]:
                    total = torch.zeros(next(iter(batch.values())).shape[0], dtype=torch.float64, device=ctx.device)
                    for b, form in forms.items():
                        total += form(batch[b].to(torch.float64))
                    return {"self": total}

                values += ctx.streamed_rows(f"Exact self {index + 1}/{len(groups)}", own, blocks=list(quadratic))[
                    "self"
                ].cpu()
                branches["direct"] += len(quadratic)
        return SelfInfluence(values, {"exact_branches": branches, "exact_groups": len(groups)})

"""Exact block-diagonal influence: ``(G_l + lambda_l I)^-1`` solved in float64."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from datainf.errors import ConfigError
from datainf.methods.base import InfluenceMethod, MethodContext, Preconditioned, register_method

logger = logging.getLogger(__name__)


def _spd_solve(matrix: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Solve ``matrix @ x = rhs`` for a symmetric positive definite ``matrix`` (Cholesky, eigh fallback)."""
    factor, info = torch.linalg.cholesky_ex(matrix)
    if int(info) == 0:
        return torch.cholesky_solve(rhs, factor)
    eigenvalues, eigenvectors = torch.linalg.eigh(matrix)
    return eigenvectors @ ((eigenvectors.T @ rhs) / eigenvalues.clamp_min(torch.finfo(matrix.dtype).tiny).unsqueeze(1))


@register_method
class Exact(InfluenceMethod):
    """The estimand itself, per block, in float64 (method.md section 3):

        R_l = V_l (G_l + lambda_l I)^-1,  G_l = X_l^T X_l / n.

    * ``d_l <= n`` (direct): accumulate ``G_l`` (``d_l x d_l``) in one pass, Cholesky-solve.
    * ``d_l > n`` (Woodbury): keep ``X_l`` (``n x d_l``) and use
      ``(X^T X/n + lambda I)^-1 v = (v - X^T (n lambda I + X X^T)^-1 X v) / lambda``.

    Under ``torch.distributed`` the ``d_l x d_l`` matrices are summed over processes (all-reduce)
    and the Woodbury rows ``X_l`` are all-gathered (``n < d_l`` there, so they are the smaller side).

    Memory per block is ``min(n, d_l) * d_l`` float64 numbers; blocks are processed in groups that fit
    ``max_memory_gb``, one streaming pass per group. Cost ``O(n min(n,d_l) d_l + min(n,d_l)^3)`` per block.
    """

    name = "exact"
    passes_description = "1 pass per group of blocks that fits max_memory_gb"

    @dataclass(frozen=True)
    class Options:
        """max_memory_gb: float64 working memory for the blocks solved together (one pass per group)."""

        max_memory_gb: float = 4.0

        def __post_init__(self) -> None:
            if not self.max_memory_gb > 0:
                raise ConfigError(f"exact: max_memory_gb must be positive, got {self.max_memory_gb}.")

    def precondition(self, test: Mapping[str, torch.Tensor], ctx: MethodContext) -> Preconditioned:
        n = ctx.total_examples
        dims = ctx.train.block_dims
        budget = self.options.max_memory_gb * 2**30
        groups: list[list[str]] = [[]]
        used = 0.0
        for name in ctx.blocks:
            d = dims[name]
            need = 8.0 * (d * d if d <= n else n * d + n * n)
            if groups[-1] and used + need > budget:
                groups.append([])
                used = 0.0
            groups[-1].append(name)
            used += need
        vectors: dict[str, torch.Tensor] = {}
        branches: dict[str, str] = {}
        for index, group in enumerate(groups):
            direct = [b for b in group if dims[b] <= n]
            woodbury = [b for b in group if dims[b] > n]
            grams = {b: torch.zeros(dims[b], dims[b], dtype=torch.float64, device=ctx.device) for b in direct}
            rows: dict[str, list[torch.Tensor]] = {b: [] for b in woodbury}
            for batch in ctx.stream(f"Exact {index + 1}/{len(groups)}", blocks=group):
                for b in direct:
                    x = batch[b].to(torch.float64)
                    grams[b] += x.T @ x
                for b in woodbury:
                    rows[b].append(batch[b].to(torch.float64))
            for b in direct:
                lam = ctx.lambdas[b]
                gram = ctx.sum_over_processes(grams.pop(b)) / n
                gram.diagonal().add_(lam)
                v = test[b].to(torch.float64)
                vectors[b] = _spd_solve(gram, v.T).T.to(ctx.compute_dtype)
                branches[b] = "direct"
            for b in woodbury:
                lam = ctx.lambdas[b]
                chunks = rows.pop(b)
                local = torch.cat(chunks) if chunks else torch.zeros(0, dims[b], dtype=torch.float64, device=ctx.device)
                x = ctx.gather_over_processes(local)  # (n, d): every process's rows, in store order
                v = test[b].to(torch.float64)  # (m, d)
                kernel = x @ x.T
                kernel.diagonal().add_(n * lam)
                y = _spd_solve(kernel, x @ v.T)  # (n, m)
                vectors[b] = ((v - y.T @ x) / lam).to(ctx.compute_dtype)
                branches[b] = "woodbury"
        counts = {kind: sum(1 for v in branches.values() if v == kind) for kind in ("direct", "woodbury")}
        return Preconditioned(vectors, {"exact_branches": counts, "exact_groups": len(groups)})

"""Diagonal preconditioner: the damped diagonal of ``G_l`` (a diagonal empirical Fisher)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from datainf.methods.base import Batch, InfluenceMethod, MethodContext, Preconditioned, SelfInfluence, register_method


@register_method
class Diagonal(InfluenceMethod):
    """Keeps only the diagonal of ``G_l = X_l^T X_l / n`` per block:

        (G_l + lambda_l I)^-1  ~=  diag( 1 / (g2_l + lambda_l) ),     g2_l[j] = (1/n) sum_i g_il[j]^2

    so ``R_l = V_l / (g2_l + lambda_l)`` (each column divided by its damped second moment) and
    ``I[j, k] = - sum_l R_l[j] . g_kl``. The damping ``lambda_l`` is the engine's (the same rule as
    every method). One streaming pass accumulates ``sum_i g_il^2`` in float64 (``d_l`` numbers per
    block); time ``O(sum_l n d_l)``, memory ``O(sum_l d_l)``.

    Self-influence: ``s_k = sum_l sum_j g_kl[j]^2 / (g2_l[j] + lambda_l)``, one more pass.
    """

    name = "diagonal"
    passes_description = "1 pass (sum of squares per parameter); self mode: 1 more"

    def _damped_diagonal(self, ctx: MethodContext) -> dict[str, torch.Tensor]:
        """``g2_l + lambda_l`` per block: float64 ``(d_l,)`` over every training example."""
        dims = ctx.train.block_dims

        def add(sums: dict[str, torch.Tensor], batch: Batch) -> None:
            for name in ctx.blocks:
                sums[name] += batch[name].to(torch.float64).square().sum(dim=0)

        zeros = {name: torch.zeros(dims[name], dtype=torch.float64, device=ctx.device) for name in ctx.blocks}
        totals = ctx.streamed_sum("Diagonal", zeros, add)
        return {name: totals[name] / ctx.total_examples + ctx.lambdas[name] for name in ctx.blocks}

    def precondition(self, test: Mapping[str, torch.Tensor], ctx: MethodContext) -> Preconditioned:
        damped = self._damped_diagonal(ctx)
        vectors = {name: (test[name].to(torch.float64) / damped[name]).to(ctx.compute_dtype) for name in ctx.blocks}
        return Preconditioned(vectors)

    def self_influence(self, ctx: MethodContext) -> SelfInfluence:
        damped = self._damped_diagonal(ctx)

        def own(batch: Batch) -> dict[str, torch.Tensor]:
            total = torch.zeros(next(iter(batch.values())).shape[0], dtype=torch.float64, device=ctx.device)
            for name in ctx.blocks:
                total += (batch[name].to(torch.float64).square() / damped[name]).sum(dim=1)
            return {"self": total}

        return SelfInfluence(ctx.streamed_rows("Diagonal self", own)["self"].cpu())

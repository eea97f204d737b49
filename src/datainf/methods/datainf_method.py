"""DataInf (Kwon et al., 2024, eq. 5): the closed-form, Sherman-Morrison approximation."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from datainf.methods.base import InfluenceMethod, MethodContext, Preconditioned, register_method


@register_method
class DataInf(InfluenceMethod):
    """DataInf swaps the inverse and the average over examples (paper eq. 4-5):

        (G_l + lambda_l I)^-1  ~=  (1/(n lambda_l)) sum_i ( I - g_il g_il^T / (lambda_l + ||g_il||^2) )

    so that, for test rows ``V_l`` (``m x d_l``),

        C_l = (V_l X_l^T) / (lambda_l + ||g_il||^2)         (m x n, formed one batch at a time)
        R_l = ( V_l - C_l X_l / n ) / lambda_l              (m x d_l)

    One streaming pass accumulates ``sum_i c_il g_il``; no ``n x n`` Gram matrix is ever formed.
    Time ``O(m sum_l n d_l)``, memory ``O(m sum_l d_l)`` beyond one batch.
    """

    name = "datainf"
    passes_description = "1 pass (accumulates sum_i c_i g_i per block)"

    def precondition(self, test: Mapping[str, torch.Tensor], ctx: MethodContext) -> Preconditioned:
        sums = {name: torch.zeros_like(test[name], dtype=torch.float64) for name in ctx.blocks}
        for batch in ctx.stream("DataInf"):
            for name in ctx.blocks:
                grads = batch[name]  # (b, d)
                denominators = ctx.lambdas[name] + grads.pow(2).sum(dim=1)  # (b,)
                coefficients = (test[name] @ grads.T) / denominators  # (m, b)
                sums[name] += (coefficients @ grads).to(torch.float64)  # (m, d)
        vectors = {}
        for name in ctx.blocks:
            total = ctx.sum_over_processes(sums[name])
            vectors[name] = ((test[name].to(torch.float64) - total / ctx.total_examples) / ctx.lambdas[name]).to(ctx.compute_dtype)
        return Preconditioned(vectors)

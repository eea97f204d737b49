"""DataInf (Kwon et al., 2024, eq. 5): the closed-form, Sherman-Morrison approximation."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from datainf.methods.base import Batch, InfluenceMethod, MethodContext, Preconditioned, register_method


@register_method
class DataInf(InfluenceMethod):
    """DataInf swaps the inverse and the average over examples (paper eq. 4-5):

        (G_l + lambda_l I)^-1  ~=  (1/(n lambda_l)) sum_i ( I - g_il g_il^T / (lambda_l + ||g_il||^2) )

    so that, for test rows ``V_l`` (``m x d_l``),

        C_l = (V_l X_l^T) / (lambda_l + ||g_il||^2)         (m x n, formed one batch at a time)
        R_l = ( V_l - C_l X_l / n ) / lambda_l              (m x d_l)

    One streaming pass accumulates ``sum_i c_il g_il`` in place (compute dtype); no ``n x n`` Gram matrix is
    ever formed.
    Time ``O(m sum_l n d_l)``, memory ``O(m sum_l d_l)`` beyond one batch.
    """

    name = "datainf"
    passes_description = "1 pass (accumulates sum_i c_i g_i per block)"

    def precondition(self, test: Mapping[str, torch.Tensor], ctx: MethodContext) -> Preconditioned:
        def add(sums: dict[str, torch.Tensor], batch: Batch) -> None:
            for name in ctx.blocks:
                grads = batch[name]  # (b, d_l)
                denominators = ctx.lambdas[name] + torch.linalg.vector_norm(grads, dim=1).square()  # (b,)
                coefficients = (grads @ test[name].T).div_(denominators.unsqueeze(1)).T  # (m, b): c_il
                sums[name].addmm_(coefficients, grads)  # += C_l X_l   (m, d_l)

        totals = ctx.streamed_sum("DataInf", {name: torch.zeros_like(test[name]) for name in ctx.blocks}, add)
        vectors = {}
        for name in ctx.blocks:
            vectors[name] = totals.pop(name).div_(-ctx.total_examples).add_(test[name]).div_(ctx.lambdas[name])
        return Preconditioned(vectors)

"""DataInf (Kwon et al., 2024, eq. 5): the closed-form, Sherman-Morrison approximation."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from datainf.methods.base import Batch, InfluenceMethod, MethodContext, Preconditioned, SelfInfluence, register_method


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

    Self-influence (``mode="self"``): the same approximate inverse applied to ``g_kl`` itself,

        s_k = sum_l (1/lambda_l) [ ||g_kl||^2 - (1/n) sum_i (g_il . g_kl)^2 / (lambda_l + ||g_il||^2) ]

    (insert the sum above between ``g_kl^T`` and ``g_kl``). The ``k``-th term of the inner sum is
    the example's own Sherman-Morrison term, ``||g_kl||^4 / (lambda_l + ||g_kl||^2)``. The training
    rows are taken ``batch_size`` at a time (a chunk ``K``); one streaming pass per chunk
    accumulates ``sum_i (g_iK . g_i)^2 / (lambda + ||g_i||^2)`` (a vector of the chunk's length,
    float64), ``||g_kl||^2`` comes from the store's recorded norms. Time ``O(n^2 sum_l d_l)`` (like
    scoring every training example against every other), memory one chunk; passes
    ``ceil(n / batch_size) + 1``. For ``n >> d_l``, Exact's self mode (``O(n sum_l d_l^2)``) is cheaper.
    """

    name = "datainf"
    passes_description = "1 pass (accumulates sum_i c_i g_i per block); self mode: 1 pass per chunk of training rows"

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

    def self_influence(self, ctx: MethodContext) -> SelfInfluence:
        n = ctx.total_examples
        values = torch.empty(n, dtype=torch.float64)
        for rows, chunk in ctx.training_chunks("DataInf self-influence"):

            def add(sums: dict[str, torch.Tensor], batch: Batch, chunk: Batch = chunk) -> None:
                for name in ctx.blocks:
                    grads = batch[name]  # (b, d_l)
                    denominators = ctx.lambdas[name] + torch.linalg.vector_norm(grads, dim=1).square()  # (b,)
                    dots = chunk[name] @ grads.T  # (c, b): g_k . g_i
                    sums[name] += (dots.square_() / denominators).sum(dim=1).to(torch.float64)

            zeros = {name: torch.zeros(len(rows), dtype=torch.float64, device=ctx.device) for name in ctx.blocks}
            totals = ctx.streamed_sum(f"DataInf self {rows.stop}/{n}", zeros, add)
            part = torch.zeros(len(rows), dtype=torch.float64)
            for name in ctx.blocks:
                own = ctx.squared_norms(name)[rows.start : rows.stop]  # ||g_kl||^2, float64
                part += (own - totals[name].cpu() / n) / ctx.lambdas[name]
            values[rows.start : rows.stop] = part
        return SelfInfluence(values)

"""DataInf (Kwon et al., 2024, eq. 5): the closed-form, Sherman-Morrison approximation."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import ClassVar

import torch

from datainf.methods.base import (
    Batch,
    FusedPass,
    InfluenceMethod,
    MethodContext,
    Preconditioned,
    SelfInfluence,
    register_method,
)

logger = logging.getLogger(__name__)


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

    Fused norms pass (:meth:`fused_norms_pass`, docs/method.md section 6.1): for training gradients
    recomputed on every pass, the sum is accumulated before ``lambda_l`` is known, as the Taylor
    terms ``T_lk = sum_i c0_il rho_il^k g_il`` (``k = 0..taylor_order``) around a provisional
    ``lambda0_l``, and combined once the exact ``lambda_l`` is known; a computed bound on the
    remainder decides whether the result is used or the ordinary pass is made.
    """

    name = "datainf"
    passes_description = "1 pass (accumulates sum_i c_i g_i per block); self mode: 1 pass per chunk of training rows"
    fuses_norms_pass = True
    #: ``K``: the fused pass keeps the Taylor terms ``k = 0..K`` (``K + 1`` accumulators of ``(m, d_l)``
    #: per block) in float32; in float64 (a tolerance ``2^29`` times smaller) ``taylor_order_float64``.
    taylor_order: ClassVar[int] = 3
    taylor_order_float64: ClassVar[int] = 7
    #: The fused result is used when every block's remainder bound is at most this many machine
    #: epsilons of the compute dtype times the block's scale ``Z_l`` (docs/method.md section 6.1).
    fused_tolerance_eps: ClassVar[float] = 4.0

    def precondition(self, test: Mapping[str, torch.Tensor], ctx: MethodContext) -> Preconditioned:
        def add(sums: dict[str, torch.Tensor], batch: Batch) -> None:
            for name in ctx.blocks:
                grads = batch[name]  # (b, d_l)
                denominators = ctx.lambdas[name] + torch.linalg.vector_norm(grads, dim=1).square()  # (b,)
                coefficients = (grads @ test[name].T).div_(denominators.unsqueeze(1)).T  # (m, b): c_il
                sums[name].addmm_(coefficients, grads)  # += C_l X_l   (m, d_l)

        totals = ctx.streamed_sum("DataInf", {name: torch.zeros_like(test[name]) for name in ctx.blocks}, add)
        return Preconditioned(_finish(totals, test, ctx))

    def fused_norms_pass(self, test: Mapping[str, torch.Tensor], ctx: MethodContext) -> FusedPass:
        """One pass with provisional ``lambda0_l = ctx.lambdas``: Taylor terms, peaks and the norms.

        Accumulates, per block with ``lambda0_l > 0`` and ``k = 0..K``,

            T_lk = sum_i c0_il rho_il^k g_il,   c0_il = (V_l g_il) / (lambda0_l + ||g_il||^2),
            rho_il = lambda0_l / (lambda0_l + ||g_il||^2)  in (0, 1],

        as one ``(K + 1, m, d_l)`` tensor in the compute dtype (nothing overflows: every weight is at
        most 1), and per example ``a_il = max_j |V_l[j] . g_il|`` (float64 ``(n,)``, for the bound)
        and the squared norms the method saw (float64 ``(n, L)``). See docs/method.md section 6.1.
        """
        order = self._order(ctx.compute_dtype)
        active = [name for name in ctx.blocks if ctx.lambdas[name] > 0]
        peaks: dict[str, torch.Tensor] = {}

        def add(sums: dict[str, torch.Tensor], batch: Batch, norms: torch.Tensor) -> None:
            for name in active:
                grads = batch[name]  # (b, d_l)
                provisional = ctx.lambdas[name]
                denominators = provisional + torch.linalg.vector_norm(grads, dim=1).square()  # (b,)
                dots = grads @ test[name].T  # (b, m): V_l g_il
                coefficients = dots / denominators.unsqueeze(1)  # (b, m): c0_il
                # k = 0 exactly as precondition() adds it: with lambda0 = lambda the sums are its own, bit for bit
                sums[name][0].addmm_(coefficients.T, grads)
                if order > 0:
                    rho = provisional / denominators  # (b,)
                    powers = torch.stack([rho.pow(k) for k in range(1, order + 1)])  # (K, b)
                    weighted = (powers.unsqueeze(2) * coefficients.unsqueeze(0)).transpose(1, 2)  # (K, m, b)
                    flat = sums[name][1:].view(-1, grads.shape[1])  # (K m, d_l)
                    flat.addmm_(weighted.reshape(-1, grads.shape[0]), grads)  # += sum_i c0 rho^k g_i
                peaks[name] = dots.abs().amax(dim=1).to("cpu", torch.float64)

        def rows_of(batch: Batch, norms: torch.Tensor) -> dict[str, torch.Tensor]:
            empty = torch.zeros(0, dtype=torch.float64)
            out = {f"peak:{name}": peaks.pop(name, empty) for name in active}
            out["norms"] = norms  # (b, L) float64, as the method saw them (normalised rows too)
            return out

        zeros = {
            name: torch.zeros(order + 1, *test[name].shape, dtype=ctx.compute_dtype, device=ctx.device)
            for name in active
        }
        totals, rows, recorded = ctx.streamed_pass_with_norms(
            "DataInf (fused norms)", sums=zeros, add=add, rows_of=rows_of
        )
        state = {
            "terms": totals,
            "peaks": {name: rows[f"peak:{name}"] for name in active},
            "norms": rows["norms"],
            "provisional": {name: float(ctx.lambdas[name]) for name in ctx.blocks},
        }
        return FusedPass(norms=recorded, state=state)

    def finish_fused(
        self, fused: FusedPass, test: Mapping[str, torch.Tensor], ctx: MethodContext
    ) -> Preconditioned | None:
        """``S_l ~= sum_{k<=K} (-delta_l)^k T_lk`` when every block's bound holds, else ``None``.

        ``delta_l = (lambda_l - lambda0_l) / lambda0_l``; the bound per block (docs/method.md 6.1) is

            E_l = sum_i a_il ||g_il|| / (lambda0_l + n_il) * q_il^(K+1) / (1 - q_il),   q_il = |delta_l| rho_il,

        (infinite when some ``q_il >= 1``) against ``Z_l = sum_i a_il ||g_il|| / (lambda_l + n_il)``;
        the result is used when ``E_l <= tol Z_l`` for every block, ``tol = fused_tolerance_eps *
        eps(compute dtype)``. Records the replaced pass (:meth:`MethodContext.record_pass`) and fills
        ``fused.diagnostics``.
        """
        order = self._order(ctx.compute_dtype)
        tolerance = self.fused_tolerance_eps * torch.finfo(ctx.compute_dtype).eps
        terms, peaks, norms = fused.state["terms"], fused.state["peaks"], fused.state["norms"]
        provisional: dict[str, float] = fused.state["provisional"]
        columns = {name: j for j, name in enumerate(ctx.train.block_dims)}
        ratios: dict[str, float] = {}
        for name in ctx.blocks:
            exact, guess = float(ctx.lambdas[name]), provisional.get(name, 0.0)
            ratios[name] = _remainder_ratio(peaks.get(name), norms[:, columns[name]], guess, exact, order)
        worst = max(ratios, key=lambda b: ratios[b]) if ratios else None
        failed = sorted((b for b, r in ratios.items() if not r <= tolerance), key=lambda b: (-ratios[b], b))
        fused.diagnostics.update(
            {
                "taylor_order": order,
                "tolerance": tolerance,
                "worst_bound": ratios[worst] if worst is not None else 0.0,
                "worst_block": worst,
                "fallback_blocks": failed,
                "used": not failed,
            }
        )
        if failed:
            logger.warning(
                "DataInf's fused norms pass: the Taylor remainder bound of block %s is %.3g of its scale "
                "(tolerance %.3g; provisional lambda %.6g, exact %.6g)%s. Falling back to a separate DataInf "
                "pass with the exact damping (one more gradient pass; the scores are exact either way). A larger "
                "pilot (OnTheFlyGradients(pilot_rows=...)) avoids this.",
                failed[0],
                ratios[failed[0]],
                tolerance,
                provisional.get(failed[0], 0.0),
                float(ctx.lambdas[failed[0]]),
                f" and {len(failed) - 1} more block(s)" if len(failed) > 1 else "",
            )
            return None
        sums: dict[str, torch.Tensor] = {}
        for name in ctx.blocks:
            sums[name] = combine_taylor_terms(terms[name], (ctx.lambdas[name] - provisional[name]) / provisional[name])
            sums[name] = sums[name].to(ctx.compute_dtype)
        ctx.record_pass(sums)  # checkpointed as the pass precondition() would have made
        return Preconditioned(_finish(sums, test, ctx))

    def _order(self, dtype: torch.dtype) -> int:
        """``K`` of the fused pass for arithmetic in ``dtype``."""
        return self.taylor_order_float64 if dtype == torch.float64 else self.taylor_order

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


def _finish(
    totals: dict[str, torch.Tensor], test: Mapping[str, torch.Tensor], ctx: MethodContext
) -> dict[str, torch.Tensor]:
    """``R_l = (V_l - S_l / n) / lambda_l`` from the sums ``S_l = sum_i c_il g_il`` (``(m, d_l)``; consumed)."""
    vectors = {}
    for name in ctx.blocks:
        vectors[name] = totals.pop(name).div_(-ctx.total_examples).add_(test[name]).div_(ctx.lambdas[name])
    return vectors


def combine_taylor_terms(terms: torch.Tensor, delta: float) -> torch.Tensor:
    """``sum_k (-delta)^k terms[k]`` in float64: ``(K + 1, m, d_l) -> (m, d_l)`` (docs/method.md section 6.1).

    With ``terms[k] = sum_i c0_i rho_i^k g_i`` this is the order-``K`` expansion of
    ``sum_i (V g_i) g_i / (lambda + n_i)`` around ``lambda0`` (``delta = (lambda - lambda0) / lambda0``).
    """
    out = terms[0].to(torch.float64)
    for k in range(1, terms.shape[0]):
        out.add_(terms[k].to(torch.float64), alpha=(-delta) ** k)
    return out


def taylor_remainder_bound(
    peaks: torch.Tensor, squared_norms: torch.Tensor, provisional: float, exact: float, order: int
) -> tuple[float, float]:
    """``(E, Z)`` of docs/method.md section 6.1 for one block, in float64.

    Args:
        peaks: ``a_i = max_j |V[j] . g_i|``, float64 ``(n,)``.
        squared_norms: ``n_i = ||g_i||^2``, float64 ``(n,)``.
        provisional: ``lambda0 > 0``, the damping the terms were accumulated with.
        exact: ``lambda``, the damping wanted.
        order: ``K``, the last term kept.

    Returns:
        ``E = sum_i a_i sqrt(n_i) / (lambda0 + n_i) * q_i^(K+1) / (1 - q_i)`` with
        ``q_i = |delta| lambda0 / (lambda0 + n_i)`` (``inf`` when some ``q_i >= 1``), which bounds
        the Euclidean norm of every row's error of :func:`combine_taylor_terms`; and the scale
        ``Z = sum_i a_i sqrt(n_i) / (lambda + n_i)``, the same bound on every row of the exact sum.
    """
    peaks, squared_norms = peaks.to(torch.float64), squared_norms.to(torch.float64)
    delta = abs(exact - provisional) / provisional
    weights = peaks * squared_norms.sqrt()
    scale = float((weights / (exact + squared_norms)).sum())
    q = delta * provisional / (provisional + squared_norms)
    if bool((q >= 1).any()):
        return math.inf, scale
    remainder = float((weights / (provisional + squared_norms) * q.pow(order + 1) / (1 - q)).sum())
    return remainder, scale


def _remainder_ratio(
    peaks: torch.Tensor | None, squared_norms: torch.Tensor, provisional: float, exact: float, order: int
) -> float:
    """``E_l / Z_l`` (``inf`` when the block had no provisional damping; ``0`` when both are zero)."""
    if peaks is None or provisional <= 0:
        return math.inf
    remainder, scale = taylor_remainder_bound(peaks, squared_norms, provisional, exact, order)
    if remainder == 0.0:
        return 0.0
    return remainder / scale if scale > 0 else math.inf

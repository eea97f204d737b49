"""LiSSA (Agarwal et al., 2017) in the paper's form, with divergence detection."""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from datainf.errors import ConfigError
from datainf.methods.base import Batch, InfluenceMethod, MethodContext, Preconditioned, register_method

logger = logging.getLogger(__name__)


class LissaDivergenceWarning(UserWarning):
    """LiSSA's recursion did not converge for some blocks; their scores are unreliable."""


@register_method
class Lissa(InfluenceMethod):
    """Neumann-series recursion for ``(G_l + lambda_l I)^-1 v`` (docs/method.md section 9):

        r_0 = v,   r_j = v + (I - (G_l + lambda_l I) / s) r_{j-1},   R_l = r_J / s

    with ``J = iterations`` full-batch steps, one streaming pass each (all blocks at once).
    ``scale = 1`` is the paper's form; it converges only when the spectrum of ``G_l + lambda_l I`` lies
    below 2. ``scale = "trace"`` uses ``s_l = trace(G_l) + lambda_l`` (an upper bound of the top
    eigenvalue, read from the stored norms), which always converges, if slowly.

    The step ``r_j - r_{j-1}`` is the residual ``v - A r_{j-1} / s``; a block whose residual is
    non-finite or larger at the last step than at the first is reported as diverged (warning, and
    ``diagnostics["lissa_diverged_blocks"]`` on the scores).

    Self-influence (``mode="self"``) runs the same recursion with the training rows themselves as
    ``v``, ``batch_size`` rows at a time: ``iterations`` passes per chunk of rows, then
    ``s_k = sum_l R_l[k] . g_kl`` (the default of :meth:`InfluenceMethod.self_influence`).
    """

    name = "lissa"
    passes_description = "`iterations` passes (10 by default); self mode: `iterations` per chunk of training rows"

    @dataclass(frozen=True)
    class Options(InfluenceMethod.Options):
        """iterations: recursion steps (passes); scale: float ``s`` (1 = paper) or ``"trace"``."""

        iterations: int = 10
        scale: float | str = 1.0

        def __post_init__(self) -> None:
            if int(self.iterations) < 1:
                raise ConfigError(f"lissa: iterations must be >= 1, got {self.iterations}.")
            if isinstance(self.scale, str):
                if self.scale != "trace":
                    raise ConfigError(f"lissa: scale must be a positive number or 'trace', got {self.scale!r}.")
            elif not (math.isfinite(float(self.scale)) and float(self.scale) > 0):
                raise ConfigError(f"lissa: scale must be a positive number or 'trace', got {self.scale!r}.")

    options: Options  # set by InfluenceMethod.__init__ from the method_options

    def precondition(self, test: Mapping[str, torch.Tensor], ctx: MethodContext) -> Preconditioned:
        n = ctx.total_examples
        if self.options.scale == "trace":
            scales = {b: ctx.squared_norm_total(b) / n + ctx.lambdas[b] for b in ctx.blocks}
        else:
            scales = {b: float(self.options.scale) for b in ctx.blocks}
        v = {b: test[b].to(torch.float64) for b in ctx.blocks}
        r = {b: v[b].clone() for b in ctx.blocks}
        first: dict[str, float] = {}
        last: dict[str, float] = {}
        for step in range(int(self.options.iterations)):
            current = {b: r[b].to(ctx.compute_dtype) for b in ctx.blocks}

            def add(
                products: dict[str, torch.Tensor], batch: Batch, current: dict[str, torch.Tensor] = current
            ) -> None:
                for b in ctx.blocks:
                    x = batch[b]
                    products[b].addmm_((x @ current[b].T).T, x)  # (m, d): += r X_b^T X_b

            zeros = {b: torch.zeros_like(current[b]) for b in ctx.blocks}
            products = ctx.streamed_sum(f"LiSSA {step + 1}/{self.options.iterations}", zeros, add)
            for b in ctx.blocks:
                hvp = products.pop(b).to(torch.float64) / n + ctx.lambdas[b] * r[b]
                residual = v[b] - hvp / scales[b]
                r[b] = r[b] + residual
                norm = float(residual.norm())
                first.setdefault(b, norm)
                last[b] = norm
        diverged = sorted(b for b in ctx.blocks if not math.isfinite(last[b]) or last[b] > first[b])
        if diverged:
            warnings.warn(
                f"LiSSA diverged on {len(diverged)} of {len(ctx.blocks)} blocks (residual grew or became non-finite), "
                f"e.g. {diverged[:3]}; their scores are unreliable. Use method_options={{'scale': 'trace'}} "
                '(which always converges; CLI: --method-options \'{"lissa": {"scale": "trace"}}\') or a larger scale.',
                LissaDivergenceWarning,
                stacklevel=2,
            )
        vectors = {b: (r[b] / scales[b]).to(ctx.compute_dtype) for b in ctx.blocks}
        ratios = {b: (last[b] / first[b] if first[b] > 0 else 0.0) for b in ctx.blocks}
        return Preconditioned(
            vectors,
            {
                "lissa_diverged": bool(diverged),
                "lissa_diverged_blocks": diverged,
                "lissa_max_residual_ratio": max(ratios.values()) if ratios else 0.0,
                "lissa_scale": self.options.scale,
            },
        )

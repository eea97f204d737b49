"""Hessian-free influence: the plain gradient dot product at the final checkpoint (TracIn-like)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from datainf.methods.base import InfluenceMethod, MethodContext, Preconditioned, SelfInfluence, register_method


@register_method
class HessianFree(InfluenceMethod):
    """Replaces ``(G_l + lambda_l I)^-1`` by the identity: ``R_l = V_l``, so ``I(k) = - sum_l v_l . g_kl``.

    Ignores the damping. No pass of its own: only the engine's scoring pass reads the gradients.
    Self-influence is ``s_k = sum_l ||g_kl||^2``, read from the store's recorded norms (no pass).
    """

    name = "hessian_free"
    passes_description = "0 passes (R = V)"

    def precondition(self, test: Mapping[str, torch.Tensor], ctx: MethodContext) -> Preconditioned:
        return Preconditioned({name: test[name] for name in ctx.blocks})

    def self_influence(self, ctx: MethodContext) -> SelfInfluence:
        values = torch.zeros(ctx.total_examples, dtype=torch.float64)
        for name in ctx.blocks:
            values += ctx.squared_norms(name)
        return SelfInfluence(values)

"""Slow, obviously correct float64 references for every influence method.

Dense matrices, explicit inverses and plain loops: meant for tests and for users who want to check
the fast paths on their own (small) gradients. Inputs are mappings block name -> tensor ``(n, d_l)``
(train) and ``(m, d_l)`` (test); outputs are ``(m, n)`` float64 matrices in pairwise form (take
``.mean(0)`` of the test gradients first for the average mode). Sign: positive = harmful.

Self-influence (``mode="self"``): :func:`reference_preconditioners` builds each method's dense
``P_l ~= (G_l + lambda_l I)^-1`` and :func:`reference_self_influence` loops ``s_k = sum_l g_kl^T P_l g_kl``;
:func:`reference_normalize` is the per-example unit normalisation of ``normalize=True``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = [
    "reference_lambdas",
    "reference_datainf_dense",
    "reference_datainf_gram",
    "reference_exact",
    "reference_lissa",
    "reference_hessian_free",
    "reference_diagonal",
    "reference_preconditioners",
    "reference_self_influence",
    "reference_normalize",
]


def reference_lambdas(train: Mapping[str, torch.Tensor], damping: float = 0.1) -> dict[str, float]:
    """``lambda_l = damping * (1/(n d_l)) sum_i ||g_il||^2`` by a plain loop over examples."""
    out = {}
    for name, x in train.items():
        x = x.double()
        total = 0.0
        for i in range(x.shape[0]):
            total += float(x[i] @ x[i])
        out[name] = damping * total / (x.shape[0] * x.shape[1])
    return out


def reference_datainf_dense(
    train: Mapping[str, torch.Tensor], test: Mapping[str, torch.Tensor], lambdas: Mapping[str, float]
) -> torch.Tensor:
    """``I = - sum_l V_l [ (1/n) sum_i (g_il g_il^T + lambda_l I)^-1 ] X_l^T`` with explicit dense inverses."""
    total = None
    for name, x in train.items():
        x, v, lam = x.double(), test[name].double(), lambdas[name]
        n, d = x.shape
        inverse_mean = torch.zeros(d, d, dtype=torch.float64)
        for i in range(n):
            inverse_mean += torch.linalg.inv(torch.outer(x[i], x[i]) + lam * torch.eye(d, dtype=torch.float64))
        part = -(v @ (inverse_mean / n) @ x.T)
        total = part if total is None else total + part
    assert total is not None
    return total


def reference_datainf_gram(
    train: Mapping[str, torch.Tensor], test: Mapping[str, torch.Tensor], lambdas: Mapping[str, float]
) -> torch.Tensor:
    """Paper eq. 5 with the Gram matrix ``L_ij = g_i . g_j`` and ``L_i = v . g_i``, by loops over ``k``:

    ``I(k) = sum_l (1/lambda_l) [ (1/n) sum_i L_i L_ik / (lambda_l + L_ii) - L_k ]``.
    """
    total = None
    for name, x in train.items():
        x, v, lam = x.double(), test[name].double(), lambdas[name]
        n = x.shape[0]
        gram = x @ x.T  # (n, n)
        test_dots = v @ x.T  # (m, n)
        part = torch.zeros(v.shape[0], n, dtype=torch.float64)
        for k in range(n):
            inner = sum(test_dots[:, i] * gram[i, k] / (lam + gram[i, i]) for i in range(n)) / n
            part[:, k] = (inner - test_dots[:, k]) / lam
        total = part if total is None else total + part
    assert total is not None
    return total


def reference_exact(
    train: Mapping[str, torch.Tensor], test: Mapping[str, torch.Tensor], lambdas: Mapping[str, float]
) -> torch.Tensor:
    """``I = - sum_l V_l (X_l^T X_l / n + lambda_l I)^-1 X_l^T`` with a dense ``torch.linalg.solve``."""
    total = None
    for name, x in train.items():
        x, v, lam = x.double(), test[name].double(), lambdas[name]
        n, d = x.shape
        hessian = x.T @ x / n + lam * torch.eye(d, dtype=torch.float64)
        part = -(torch.linalg.solve(hessian, v.T).T @ x.T)
        total = part if total is None else total + part
    assert total is not None
    return total


def reference_lissa(
    train: Mapping[str, torch.Tensor],
    test: Mapping[str, torch.Tensor],
    lambdas: Mapping[str, float],
    *,
    iterations: int = 10,
    scale: float = 1.0,
) -> torch.Tensor:
    """The recursion ``r_j = v + (I - (G + lambda I)/s) r_{j-1}``, ``r_0 = v``, result ``r_J / s``, with a dense ``G``."""
    total = None
    for name, x in train.items():
        x, v, lam = x.double(), test[name].double(), lambdas[name]
        n, d = x.shape
        hessian = x.T @ x / n + lam * torch.eye(d, dtype=torch.float64)
        r = v.clone()
        for _ in range(iterations):
            r = v + r - (r @ hessian) / scale
        part = -((r / scale) @ x.T)
        total = part if total is None else total + part
    assert total is not None
    return total


def reference_hessian_free(train: Mapping[str, torch.Tensor], test: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``I[j, k] = - sum_l v_jl . g_kl`` by a plain double loop."""
    names = list(train)
    n, m = train[names[0]].shape[0], test[names[0]].shape[0]
    out = torch.zeros(m, n, dtype=torch.float64)
    for j in range(m):
        for k in range(n):
            out[j, k] = -sum(float(test[b][j].double() @ train[b][k].double()) for b in names)
    return out


def reference_diagonal(
    train: Mapping[str, torch.Tensor], test: Mapping[str, torch.Tensor], lambdas: Mapping[str, float]
) -> torch.Tensor:
    """``I[j, k] = - sum_l sum_p v_jl[p] g_kl[p] / (mean_i g_il[p]^2 + lambda_l)`` by loops over parameters."""
    names = list(train)
    n, m = train[names[0]].shape[0], test[names[0]].shape[0]
    out = torch.zeros(m, n, dtype=torch.float64)
    for name in names:
        x, v, lam = train[name].double(), test[name].double(), lambdas[name]
        for p in range(x.shape[1]):
            second_moment = sum(float(x[i, p]) ** 2 for i in range(n)) / n
            out -= torch.outer(v[:, p], x[:, p]) / (second_moment + lam)
    return out


def reference_preconditioners(
    train: Mapping[str, torch.Tensor],
    lambdas: Mapping[str, float],
    method: str,
    *,
    iterations: int = 10,
    scale: float = 1.0,
) -> dict[str, torch.Tensor]:
    """Each block's dense ``P_l`` (``d_l x d_l``, float64) standing for ``(G_l + lambda_l I)^-1`` in ``method``:

    * ``exact``: ``inv(G_l + lambda_l I)``;
    * ``datainf``: ``(1/n) sum_i inv(g_il g_il^T + lambda_l I)`` (explicit inverses);
    * ``lissa``: ``(1/s) sum_{t=0..J} (I - (G_l + lambda_l I)/s)^t`` (the recursion unrolled);
    * ``hessian_free``: ``I``;
    * ``diagonal``: ``diag(1 / (mean_i g_il^2 + lambda_l))``.
    """
    out = {}
    for name, x in train.items():
        x, lam = x.double(), lambdas[name]
        n, d = x.shape
        eye = torch.eye(d, dtype=torch.float64)
        hessian = x.T @ x / n + lam * eye
        if method == "exact":
            out[name] = torch.linalg.inv(hessian)
        elif method == "datainf":
            out[name] = sum(torch.linalg.inv(torch.outer(x[i], x[i]) + lam * eye) for i in range(n)) / n
        elif method == "lissa":
            step = eye - hessian / scale
            total, power = eye.clone(), eye.clone()
            for _ in range(iterations):
                power = power @ step
                total = total + power
            out[name] = total / scale
        elif method == "hessian_free":
            out[name] = eye
        elif method == "diagonal":
            out[name] = torch.diag(1.0 / (x.square().mean(dim=0) + lam))
        else:
            raise ValueError(f"no reference preconditioner for {method!r}")
    return out


def reference_self_influence(
    train: Mapping[str, torch.Tensor], preconditioners: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    """``s_k = sum_l g_kl^T P_l g_kl`` by a plain loop over examples: float64 ``(n,)``."""
    names = list(train)
    n = train[names[0]].shape[0]
    out = torch.zeros(n, dtype=torch.float64)
    for k in range(n):
        out[k] = sum(float(train[b][k].double() @ preconditioners[b] @ train[b][k].double()) for b in names)
    return out


def reference_normalize(grads: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every example's gradient divided by its norm over all blocks (float64; all-zero rows stay zero)."""
    names = list(grads)
    n = grads[names[0]].shape[0]
    out = {b: grads[b].double().clone() for b in names}
    for k in range(n):
        norm = sum(float(grads[b][k].double() @ grads[b][k].double()) for b in names) ** 0.5
        if norm > 0:
            for b in names:
                out[b][k] /= norm
    return out

"""The scoring pass of :func:`datainf.influence`: ``I[:, k] = - sum_l R_l g_kl`` (docs/method.md sections 5 and 6.2).

Two ways to take it, after a method has preconditioned the test rows into ``R_l`` (``(m, d_l)``):

* :func:`gradient_scores`: one streaming pass over the training gradients (a store's rows, or
  gradients recomputed on the fly), ``- X_l R_l^T`` per batch. Exact; the default.
* :func:`loss_difference_scores`: for training gradients recomputed on the fly and one test row
  (``average`` mode), the derivative of each example's loss along ``u = -R`` by a forward
  difference (:mod:`datainf.gradients.directional`): one forward pass per example without
  autograd instead of a forward and a backward pass. Approximate: before it is used, the first
  :data:`LOSS_DIFFERENCE_CHECK_ROWS` rows of every process are scored exactly and by loss
  differences at each of the steps :data:`STEP_FACTORS`; the step with the smallest error is kept,
  and it is used only when that error is at most :data:`LOSS_DIFFERENCE_TOLERANCE` of the largest
  exact score there; otherwise the gradient pass is made. The checked rows keep their exact scores.
  The check measures the error on those rows; other rows can be somewhat worse (docs/method.md 6.2).

Sign convention: positive influence = harmful (raises the test loss).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any, Protocol

import torch

from datainf.distributed import DistributedContext, on_every_rank
from datainf.errors import ConfigError, NonFiniteGradientError
from datainf.methods.base import MethodContext

__all__ = [
    "gradient_scores",
    "loss_difference_scores",
    "loss_difference_problem",
    "LOSS_DIFFERENCE_CHECK_ROWS",
    "LOSS_DIFFERENCE_TOLERANCE",
    "STEP_FACTORS",
]

logger = logging.getLogger(__name__)

#: Training rows per process scored both ways (exact gradients and loss differences) before the loss
#: differences are used for the others.
LOSS_DIFFERENCE_CHECK_ROWS = 64
#: The loss differences are used when, on the checked rows, ``max_k |estimate_k - exact_k| <=
#: LOSS_DIFFERENCE_TOLERANCE * max_k |exact_k|``.
LOSS_DIFFERENCE_TOLERANCE = 1e-2
#: Steps tried on the checked rows, as multiples of the textbook step
#: (:func:`~datainf.gradients.directional.forward_difference_step`); the one with the smallest error is used.
STEP_FACTORS = (0.25, 1.0, 4.0)


class _LossDifferences(Protocol):
    """A training-gradient source that can take loss differences (:class:`datainf.gradients.OnTheFlyGradients`)."""

    def loss_difference_problem(self) -> str | None: ...

    def loss_difference_step(self, direction: Mapping[str, torch.Tensor]) -> float: ...

    def directional_derivatives(
        self,
        direction: Mapping[str, torch.Tensor],
        rows: range,
        *,
        steps: Sequence[float] | None = None,
        progress: bool = False,
    ) -> torch.Tensor: ...


def loss_difference_problem(train: Any) -> str | None:
    """Why loss-difference scoring cannot be used for the training gradients ``train``, or ``None`` when it can
    (the ``average`` mode it needs is :class:`~datainf.influence.InfluenceConfig`'s own check)."""
    if not callable(getattr(train, "directional_derivatives", None)):
        return (
            f"the training gradients ({type(train).__name__}) are read, not recomputed, so the gradient scoring pass "
            "costs no model pass; it is for training gradients computed on the fly (OnTheFlyGradients, "
            "`datainf score --train-data`)"
        )
    return train.loss_difference_problem()


def gradient_scores(ctx: MethodContext, vectors: Mapping[str, torch.Tensor], description: str) -> torch.Tensor:
    """``I = - sum_l R_l X_l^T``: float64 ``(m, n)`` (every process's rows, store order) from one streaming pass.

    ``vectors[l]`` is ``R_l`` ``(m, d_l)`` in ``ctx.compute_dtype`` on ``ctx.device``; the blocks
    summed are ``ctx.blocks``, in that order.
    """
    test_rows = next(iter(vectors.values())).shape[0]

    def score_columns(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        size = next(iter(batch.values())).shape[0]
        partial = torch.zeros(size, test_rows, dtype=ctx.compute_dtype, device=ctx.device)  # (b, m)
        for name in ctx.blocks:
            partial.addmm_(batch[name], vectors[name].T, alpha=-1.0)  # -= X_b R_l^T
        return {"scores": partial.T.to("cpu", torch.float64)}  # (m, b)

    return ctx.streamed_rows(description, score_columns, dim=1)["scores"]


def loss_difference_scores(
    ctx: MethodContext, vectors: Mapping[str, torch.Tensor]
) -> tuple[torch.Tensor | None, dict[str, Any]]:
    """``I_k = - sum_l R_l . g_kl`` by forward differences of the losses, checked first (docs/method.md 6.2).

    Args:
        ctx: the method context of the scoring pass (``ctx.train`` satisfies loss differences:
            :func:`loss_difference_problem` is ``None``).
        vectors: ``R_l``, ``(1, d_l)`` each.

    Returns:
        ``(scores, diagnostics)``: float64 ``(1, n)`` (every process's rows, store order), or ``None``
        when the check failed (the caller makes the gradient pass); ``diagnostics`` holds the step,
        the checked rows, the measured relative error, the tolerance and whether the result was used.

    Raises:
        ConfigError: more than one test row, or a source that cannot take loss differences.
        NonFiniteGradientError: a loss difference is not finite.
    """
    if next(iter(vectors.values())).shape[0] != 1:
        raise ConfigError("Loss-difference scoring takes one test row (mode='average').")
    problem = loss_difference_problem(ctx.train)
    if problem is not None:
        raise ConfigError(f"Loss-difference scoring cannot be used here: {problem}.")
    train: _LossDifferences = ctx.train  # type: ignore[assignment]
    train_ids = ctx.train.ids
    processes = ctx.processes
    rows = ctx.local_rows
    check = range(rows.start, rows.start + min(LOSS_DIFFERENCE_CHECK_ROWS, len(rows)))
    direction = {name: vectors[name][0].neg() for name in ctx.blocks}  # u = -R: I_k = g_k . u
    textbook = train.loss_difference_step(direction)  # the same on every process: same weights, same direction
    steps = [textbook * factor for factor in STEP_FACTORS]
    scales = ctx.example_scales

    def estimate(part: range, hs: list[float], progress: bool) -> torch.Tensor:
        """``(len(hs), len(part))`` estimates of the scores of the rows ``part``, one row per step."""
        values = train.directional_derivatives(direction, part, steps=hs, progress=progress)
        if scales is not None:  # unit-normalised rows: g_k / ||g_k||
            values = values * scales[part.start : part.stop]
        if not bool(torch.isfinite(values).all()):
            bad = (~torch.isfinite(values)).any(dim=0).nonzero().flatten().tolist()
            raise NonFiniteGradientError(
                f"The loss differences of training examples {[train_ids[part.start + i] for i in bad[:5]]} are not "
                "finite; use scoring='gradients'."
            )
        return values

    # the checked rows, exactly: this process's own rows only (no gathering), arithmetic as gradient_scores
    alone = replace(ctx, rows=check, processes=DistributedContext(), checkpoints=None, progress=False, passes=0)

    def check_rows() -> tuple[torch.Tensor, tuple[list[float], float, int]]:
        """This process's exact scores of the checked rows, and (each step's largest error, largest score, rows)."""
        exact = gradient_scores(alone, vectors, "loss-difference check")[0]  # (C,)
        if not len(check):
            return exact, ([0.0] * len(steps), 0.0, 0)
        errors = (estimate(check, steps, progress=False) - exact).abs().amax(dim=1).tolist()  # one per step
        return exact, (errors, float(exact.abs().max()), len(check))

    exact, report = on_every_rank(processes, "Checking the loss differences", check_rows)
    reports = processes.all_gather_object(report)
    scale = max(r[1] for r in reports)
    relative = []
    for j in range(len(steps)):
        error = max(r[0][j] for r in reports)
        relative.append(error / scale if scale > 0 else (0.0 if error == 0 else math.inf))
    best = min(range(len(steps)), key=lambda j: relative[j])
    step = steps[best]
    diagnostics: dict[str, Any] = {
        "step": step,
        "steps_tried": [{"step": h, "check_error": e} for h, e in zip(steps, relative)],
        "check_rows": sum(r[2] for r in reports),
        "check_error": relative[best],
        "tolerance": LOSS_DIFFERENCE_TOLERANCE,
        "used": relative[best] <= LOSS_DIFFERENCE_TOLERANCE,
    }
    if not diagnostics["used"]:
        logger.warning(
            "Loss-difference scoring: on %d checked training rows the largest error is %.3g of the largest exact score "
            "(tolerance %.3g; best of %d steps, %.3g). Scoring with the training gradients instead (one gradient "
            "pass; the scores are exact).",
            diagnostics["check_rows"],
            relative[best],
            LOSS_DIFFERENCE_TOLERANCE,
            len(steps),
            step,
        )
        return None, diagnostics
    rest = on_every_rank(
        processes,
        "Scoring by loss differences",
        lambda: estimate(range(check.stop, rows.stop), [step], progress=ctx.progress)[0],
    )
    local = torch.cat([exact, rest]).unsqueeze(0)  # (1, rows of this process)
    return processes.all_gather_cat(local, dim=1), diagnostics

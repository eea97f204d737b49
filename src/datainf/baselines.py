"""Baselines that need no influence computation: each training example's own loss.

The plain training loss under the fine-tuned model is the simplest mislabel detector and a strong
one (on the demo it beats every influence method; BENCHMARKS.md): an example the model cannot fit
has a large loss. ``datainf score`` writes it beside the influence methods as ``scores-loss`` and the
demo shows it as the ``training loss`` row, both through :func:`training_losses`.

Sign: a **high loss = suspicious**, ranked first like a harmful example (the scores' ``mode`` is
``self``: one value per training example, no test set; :data:`LOSS_SIGN_CONVENTION`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from datainf.errors import ConfigError, EmptyInputError
from datainf.scores import LOSS_METHOD, LOSS_SIGN_CONVENTION, Scores

__all__ = ["LOSS_METHOD", "LOSS_SIGN_CONVENTION", "training_losses", "loss_scores"]


def training_losses(
    model: torch.nn.Module, task: Any, records: Sequence[Mapping[str, Any]], *, batch_size: int = 64
) -> torch.Tensor:
    """Each example's loss under ``model`` (eval mode, no gradients), in record order.

    Args:
        model: the fine-tuned model (its training/eval mode is restored afterwards).
        task: the :class:`~datainf.tasks.GradientTask` that turns records into batches and losses
            (the one the gradients were computed with).
        records: the examples (ids from their ``id`` field, else the row number).
        batch_size: examples per forward pass.

    Returns:
        float64 tensor of shape ``(n,)`` on the CPU.

    Raises:
        EmptyInputError: no records.
    """
    from datainf.gradients import example_ids

    if not records:
        raise EmptyInputError("No training records: there is no loss to compute.")
    ids = example_ids(records)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.eval()
    losses: list[torch.Tensor] = []
    try:
        with torch.no_grad():
            for start in range(0, len(records), batch_size):
                batch = task.collate(records[start : start + batch_size], ids[start : start + batch_size])
                losses.append(task.per_example_loss(model, batch.to(device)).detach().double().cpu())
    finally:
        model.train(was_training)
    return torch.cat(losses)


def loss_scores(
    model: torch.nn.Module,
    task: Any,
    records: Sequence[Mapping[str, Any]],
    *,
    batch_size: int = 64,
    fingerprint: Mapping[str, Any] | None = None,
    values: torch.Tensor | None = None,
) -> Scores:
    """The training-loss baseline as :class:`~datainf.scores.Scores` (``method="loss"``, ``mode="self"``).

    ``values[k]`` (shape ``(n,)``) is example ``k``'s loss: high = suspicious, so
    :meth:`~datainf.scores.Scores.top_harmful` lists the mislabel suspects first.

    Args:
        model, task, records, batch_size: as in :func:`training_losses`.
        fingerprint: the training gradient store's fingerprint (same model, adapter and task),
            recorded in ``settings`` so :meth:`~datainf.scores.Scores.matches` can tell whether
            finished scores belong to that store.
        values: the losses when they are known already, float64 ``(n,)`` in record order (e.g.
            :meth:`datainf.gradients.OnTheFlyGradients.recorded_losses`, taken by the gradient
            passes with batches of ``batch_size``): no forward pass is made.
    """
    from datainf.gradients import example_ids

    started = time.perf_counter()
    recorded = values is not None
    if values is None:
        values = training_losses(model, task, records, batch_size=batch_size)
    elif tuple(values.shape) != (len(records),):
        raise ConfigError(f"values holds {tuple(values.shape)} losses for {len(records)} records; give one per record.")
    return Scores(
        values=values,
        train_ids=example_ids(records),
        test_ids=[],
        method=LOSS_METHOD,
        mode="self",
        settings={"baseline": "training loss", "batch_size": batch_size, "fingerprint": dict(fingerprint or {})},
        diagnostics={"seconds": time.perf_counter() - started, "recorded_losses": recorded},
        sign_convention=LOSS_SIGN_CONVENTION,
    )

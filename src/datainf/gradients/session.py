"""One batch's per-example gradients: :func:`batch_gradients` and the reusable :class:`GradientSession` around it.

The session puts the model on its device in eval mode with the block tensors trainable, attaches the
hooks (:class:`~datainf.gradients.hooks.PerExampleGradients`) and turns raw records into per-example
losses and gradients; :func:`~datainf.gradients.collect_gradients` and
:class:`~datainf.gradients.OnTheFlyGradients` both run their passes through it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import nn

from datainf.errors import (
    NonFiniteGradientError,
    TaskInputError,
)
from datainf.gradients.hooks import PerExampleGradients
from datainf.gradients.lora import LoRABlocks, gradient_mode
from datainf.gradients.projection import GradientProjector
from datainf.gradients.records import _ids_text
from datainf.tasks import GradientTask, TaskBatch

logger = logging.getLogger(__name__)


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@contextmanager
def _on_device(model: nn.Module, device: torch.device | str | None) -> Iterator[torch.device]:
    current = _model_device(model)
    if device is None or torch.device(device) == current:
        yield current
        return
    target = torch.device(device)
    logger.info("Moving the model from %s to %s for gradient collection (moved back afterwards).", current, target)
    model.to(target)
    try:
        yield target
    finally:
        model.to(current)


def _non_finite_rows(g: torch.Tensor) -> list[int]:
    """Rows of ``g`` (b, d) holding NaN/inf. One cheap reduction per block; the exact elementwise test
    only runs when a row sum is not finite (NaN/inf propagate into the sum; a finite overflow does not
    count)."""
    if bool(torch.isfinite(g.sum(dim=1)).all()):
        return []
    return torch.nonzero(~torch.isfinite(g).all(dim=1)).flatten().tolist()


def _checked_losses(task: GradientTask, batch: TaskBatch, losses: Any) -> torch.Tensor:
    """``losses`` when it is one finite loss per example of ``batch``, else one clear error."""
    if not isinstance(losses, torch.Tensor) or losses.shape != (len(batch),):
        shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
        raise TaskInputError(
            f"{type(task).__name__}.per_example_loss returned {shape} for {len(batch)} examples; it must return one "
            "loss per example, shape (b,) (a per-example mean, never a batch mean)."
        )
    finite = torch.isfinite(losses.detach())
    if not bool(finite.all()):
        bad = [batch.ids[i] for i in torch.nonzero(~finite).flatten().tolist()]
        raise NonFiniteGradientError(
            f"Non-finite loss for examples {_ids_text(bad)}. Check these examples (extreme inputs, empty targets) and "
            "the model's weights (a diverged fine-tune gives NaN losses)."
        )
    return losses


def batch_gradients(
    model: nn.Module,
    task: GradientTask,
    batch: TaskBatch,
    capture: PerExampleGradients,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One forward + one backward pass: ``(losses (b,), {block: grads (b, d_l)})``.

    ``batch`` must already be on the model's device and ``capture`` open (inside its ``with``).

    Raises:
        TaskInputError: the task's loss vector has the wrong shape.
        NonFiniteGradientError: a loss or gradient is NaN/inf (the message names the example ids).
    """
    capture.clear()
    losses = _checked_losses(task, batch, task.per_example_loss(model, batch))
    grads = capture.compute(losses)
    bad_blocks: dict[str, list[str]] = {}
    for name, g in grads.items():
        rows = _non_finite_rows(g)
        if rows:
            bad_blocks[name] = [batch.ids[i] for i in rows]
    if bad_blocks:
        bad_ids = sorted({i for ids in bad_blocks.values() for i in ids})
        first = next(iter(bad_blocks))
        raise NonFiniteGradientError(
            f"Non-finite gradients for examples {_ids_text(bad_ids)} in {len(bad_blocks)} block(s), e.g. {first!r}. "
            "The losses were finite: look for overflow (use a float32 model) or extreme inputs in these examples."
        )
    return losses.detach(), grads


class GradientSession:
    """What :func:`collect_gradients` does around and in each batch, as a reusable context manager.

    Inside ``with GradientSession(model, task, blocks, device=...) as session:`` the model is on
    ``device`` (moved back on exit) in eval mode with the block tensors trainable
    (:func:`~datainf.gradients.lora.gradient_mode`), :meth:`GradientTask.setup` has run and the
    hooks are attached (:class:`~datainf.gradients.hooks.PerExampleGradients`, with ``observer``:
    e.g. a :class:`~datainf.gradients.factors.FactorAccumulator`'s ``observe``);
    :meth:`compute` turns raw records into per-example gradients. On exit every flag is restored,
    the hooks are removed and the modules that never ran get one warning.
    """

    def __init__(
        self,
        model: nn.Module,
        task: GradientTask,
        blocks: LoRABlocks,
        *,
        device: torch.device | str | None = None,
        observer: Any = None,
        projector: GradientProjector | None = None,
    ) -> None:
        self.model, self.task, self.blocks, self._device, self._observer = model, task, blocks, device, observer
        self._projector = projector
        self._stack: ExitStack | None = None
        self._capture: PerExampleGradients | None = None
        self._computed = False  # some batch's gradients were taken (what the never-ran warning is about)
        self.device: torch.device = _model_device(model)

    def __enter__(self) -> GradientSession:
        self._computed = False
        stack = ExitStack()
        try:
            self.device = stack.enter_context(_on_device(self.model, self._device))
            stack.enter_context(gradient_mode(self.model, self.blocks))
            self.task.setup(self.model)
            self._capture = stack.enter_context(
                PerExampleGradients(
                    self.blocks.blocks,
                    row_labels=self.task.row_labels(),
                    observer=self._observer,
                    projector=self._projector,
                )
            )
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        capture, stack = self._capture, self._stack
        self._capture, self._stack = None, None
        unused = capture.never_called() if capture is not None and self._computed else []
        if stack is not None:
            stack.close()
        if unused and exc_type is None:
            logger.warning(
                "%d LoRA/head module(s) never ran in the forward pass, so their gradients are all zero: %s",
                len(unused),
                ", ".join(unused[:5]) + (" ..." if len(unused) > 5 else ""),
            )

    def compute(
        self, records: Sequence[Mapping[str, Any]], ids: Sequence[str]
    ) -> tuple[TaskBatch, torch.Tensor, dict[str, torch.Tensor]]:
        """``b`` records -> ``(their collated batch (CPU), losses (b,), {block: (b, d_l) gradients})``.

        The losses and gradients are on the session's device.

        Raises:
            TaskInputError / NonFiniteGradientError: see :func:`batch_gradients`.
        """
        if self._capture is None:
            raise RuntimeError("GradientSession.compute is only usable inside `with GradientSession(...)`.")
        batch = self.task.collate(records, list(ids))
        losses, grads = batch_gradients(self.model, self.task, batch.to(self.device), self._capture)
        self._computed = True
        return batch, losses, grads

    def forward_losses(self, batch: TaskBatch) -> torch.Tensor:
        """A collated batch (``task.collate``) -> its losses ``(b,)`` from one forward pass without autograd
        (no hook records); the batch is moved to the session's device.

        Raises:
            TaskInputError: the loss vector has the wrong shape.
            NonFiniteGradientError: a loss is NaN/inf.
        """
        if self._capture is None:
            raise RuntimeError("GradientSession.forward_losses is only usable inside `with GradientSession(...)`.")
        batch = batch.to(self.device)
        with torch.no_grad():
            losses = self.task.per_example_loss(self.model, batch)
        return _checked_losses(self.task, batch, losses)

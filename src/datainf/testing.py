"""Public correctness checks for users with unusual models or tasks.

:func:`check_per_example_gradients` compares the fast path (hooks, one forward and one backward
pass for the whole batch) with the obviously-correct reference: one forward and one
``torch.autograd.grad`` per example, each example collated alone. Any difference points at a task
whose per-example loss depends on the batch (padding, batch statistics, batch-mean reductions) or at
a model path the hooks do not see.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from datainf.errors import ConfigError, DataInfError, EmptyInputError
from datainf.gradients import GradientTask
from datainf.gradients.hooks import PerExampleGradients, row_block_name
from datainf.gradients.lora import find_lora_blocks, gradient_mode
from datainf.gradients.records import example_ids
from datainf.gradients.session import _on_device, batch_gradients

__all__ = ["GradientCheckReport", "GradientCheckError", "check_per_example_gradients", "loop_gradients"]


class GradientCheckError(DataInfError, AssertionError):
    """The fast per-example gradients disagree with the per-example autograd loop."""


@dataclass
class GradientCheckReport:
    """Result of :func:`check_per_example_gradients`.

    Attributes:
        errors: block name -> max over examples of ``||g_fast - g_loop|| / ||g_loop||`` (0 where both are 0).
        worst_ids: block name -> id of the example with that largest error.
        loss_error: max over examples of ``|l_fast - l_loop| / max(|l_loop|, 1e-12)``.
        rtol: the tolerance the check used.
        ids: ids of the checked examples.
        fallback_blocks: blocks computed by the per-example autograd fallback instead of hooks.
    """

    errors: dict[str, float]
    worst_ids: dict[str, str]
    loss_error: float
    rtol: float
    ids: list[str]
    fallback_blocks: list[str] = field(default_factory=list)

    @property
    def mismatched(self) -> list[str]:
        """Blocks whose error exceeds ``rtol`` (every one of them, worst first)."""
        bad = [name for name, err in self.errors.items() if not err <= self.rtol]
        return sorted(bad, key=lambda name: -self.errors[name])

    @property
    def max_error(self) -> float:
        return max(self.errors.values(), default=0.0)

    @property
    def ok(self) -> bool:
        """True when every block and the losses agree within ``rtol``."""
        return not self.mismatched and self.loss_error <= self.rtol

    def __str__(self) -> str:
        lines = [
            f"per-example gradient check on {len(self.ids)} examples, {len(self.errors)} blocks, rtol={self.rtol:g}: "
            f"{'OK' if self.ok else 'MISMATCH'} (max block error {self.max_error:.3g}, loss error {self.loss_error:.3g})"
        ]
        for name in self.mismatched:
            lines.append(f"  MISMATCH {name}: {self.errors[name]:.3g} (worst example {self.worst_ids[name]!r})")
        return "\n".join(lines)


def loop_gradients(
    model: nn.Module,
    task: GradientTask,
    examples: Sequence[Mapping[str, Any]],
    ids: Sequence[str],
    params: Mapping[str, torch.Tensor],
    device: torch.device,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Reference per-example gradients: each example collated alone, one forward and one
    ``torch.autograd.grad`` each. Returns ``(losses (n,), {name: (n, d)})``. Slow; for testing.

    For a task with :meth:`~datainf.gradients.GradientTask.row_labels`, each entry of the example's
    :meth:`~datainf.gradients.GradientTask.per_row_loss` is differentiated on its own, giving the
    blocks ``"<name>@<label>"``; the loss is the row sum."""
    names = list(params)
    tensors = [params[k] for k in names]
    labels = task.row_labels()
    losses: list[torch.Tensor] = []
    rows: dict[str, list[torch.Tensor]] = {}
    for ex, ex_id in zip(examples, ids):
        batch = task.collate([ex], [ex_id]).to(device)
        if labels:
            row_losses = task.per_row_loss(model, batch).reshape(-1)  # (k,)
            parts: list[tuple[str | None, torch.Tensor]] = [(label, row_losses[m]) for m, label in enumerate(labels)]
            loss = row_losses.sum()
        else:
            loss = task.per_example_loss(model, batch).reshape(-1)[0]
            parts = [(None, loss)]
        for m, (label, part) in enumerate(parts):
            grads = torch.autograd.grad(part, tensors, allow_unused=True, retain_graph=m < len(parts) - 1)
            for k, p, g in zip(names, tensors, grads):
                block = k if label is None else row_block_name(k, label)
                rows.setdefault(block, []).append((torch.zeros_like(p) if g is None else g).detach().reshape(-1))
        losses.append(loss.detach())
    return torch.stack(losses), {k: torch.stack(v) for k, v in rows.items()}


def check_per_example_gradients(
    model: nn.Module,
    task: GradientTask,
    batch: Sequence[Mapping[str, Any]],
    *,
    rtol: float = 1e-5,
    adapter_name: str | None = None,
    device: torch.device | str | None = None,
    raise_on_mismatch: bool = True,
) -> GradientCheckReport:
    """Compare the batched hook gradients with a per-example autograd loop on ``batch``.

    Args:
        model: the LoRA-tuned model.
        task: the task whose per-example loss is differentiated.
        batch: raw examples (dict records) run as one batch by the fast path and one by one by the
            loop; ids as in :func:`datainf.collect_gradients` (``"id"`` field, else the position).
        rtol: largest accepted relative error ``||g_fast - g_loop|| / ||g_loop||`` per example and
            block (1e-5 suits float32; use ~1e-10 for a float64 model).
        adapter_name: the adapter to differentiate, when several are active.
        device: where to compute (default: the model's device).
        raise_on_mismatch: raise :class:`GradientCheckError` listing every disagreeing block
            (default); with ``False`` the report's ``ok`` / ``mismatched`` say so instead.

    Returns:
        A :class:`GradientCheckReport` with the per-block max relative error.
    """
    if rtol <= 0:
        raise ConfigError(f"rtol={rtol}; use a positive tolerance such as 1e-5.")
    examples = list(batch)
    if not examples:
        raise EmptyInputError("check_per_example_gradients needs at least one example.")
    ids = example_ids(examples)
    blocks = find_lora_blocks(model, adapter_name=adapter_name)
    with _on_device(model, device) as dev, gradient_mode(model, blocks):
        task.setup(model)
        task.validate(examples, ids)
        with PerExampleGradients(blocks.blocks, row_labels=task.row_labels()) as capture:
            collated = task.collate(examples, ids).to(dev)
            fast_losses, fast = batch_gradients(model, task, collated, capture)
        ref_losses, ref = loop_gradients(model, task, examples, ids, {b.name: b.parameter for b in blocks}, dev)

    errors: dict[str, float] = {}
    worst: dict[str, str] = {}
    for name in ref:
        f = fast[name].detach().to(torch.float64).cpu()
        r = ref[name].to(torch.float64).cpu()
        diff = (f - r).norm(dim=1)
        scale = r.norm(dim=1)
        rel = torch.where(scale > 0, diff / scale.clamp_min(1e-300), torch.where(diff > 0, torch.inf, 0.0))
        idx = int(torch.argmax(rel))
        errors[name] = float(rel[idx])
        worst[name] = ids[idx]
    fl = fast_losses.to(torch.float64).cpu()
    rl = ref_losses.to(torch.float64).cpu()
    loss_error = float(((fl - rl).abs() / rl.abs().clamp_min(1e-12)).max())
    report = GradientCheckReport(
        errors=errors,
        worst_ids=worst,
        loss_error=loss_error,
        rtol=rtol,
        ids=ids,
        fallback_blocks=[b.name for b in blocks.fallback],
    )
    if raise_on_mismatch and not report.ok:
        raise GradientCheckError(
            str(report)
            + "\nThe fast path disagrees with the per-example loop: the task's loss probably depends on the batch "
            "(padding, batch-mean reduction, batch statistics), or the model uses an adapter tensor outside the "
            "hooked lora_A/lora_B modules."
        )
    return report

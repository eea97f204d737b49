"""Kronecker factors (K-FAC / EK-FAC) accumulated by the per-example gradient hooks.

:class:`FactorAccumulator` is handed to :class:`~datainf.gradients.hooks.PerExampleGradients` as its
``observer``: for every hooked module call it receives the cached input and the output gradient the
per-example gradients are formed from, and adds ``sum x x^T`` (active positions only) and
``sum delta delta^T`` to the blocks of that module (the definitions and their normalisation are in
:mod:`datainf.factors`). No extra forward or backward pass is made.

Positions: for an ``nn.Linear`` every leading position of its input (tokens); for an ``nn.Conv2d``
every spatial position of its unfolded input (``x_t`` has ``C kh kw`` numbers, in the weight's
layout); with ``row_labels`` each labelled row's positions go to its own block ``"<block>@<label>"``,
otherwise the ``k`` rows of an example are pooled. A block's ``bias`` shares the module's ``S`` and
has ``A = [[1]]``.

Cost per module call: ``O(P p^2 + P q^2)`` for ``P`` positions (two Gram matrices in the model's
dtype, added to float64 sums), memory ``p^2 + q^2`` float64 numbers per block. Blocks no hook covers
get no factors (:attr:`FactorAccumulator.uncovered`; the methods precondition them by the diagonal).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from datainf.factors import BlockFactorSums
from datainf.gradients.hooks import row_block_name
from datainf.gradients.lora import GradientBlock
from datainf.gradients.modules import compute_dtype

__all__ = ["FactorAccumulator", "factor_shapes"]


def _block_shape(block: GradientBlock) -> tuple[int, int] | None:
    """``(p, q)`` of a hooked block (gradient ``q x p``), or ``None`` when no hook covers it."""
    module = block.module
    if module is None or block.attr not in ("weight", "bias"):
        return None
    if isinstance(module, nn.Conv2d):
        q, p = module.out_channels, module.weight[0].numel()
    elif isinstance(module, nn.Linear):
        q, p = module.out_features, module.in_features
    else:
        return None
    return (1, q) if block.attr == "bias" else (p, q)


def _names(block: GradientBlock, row_labels: Sequence[str]) -> list[str]:
    return [row_block_name(block.name, label) for label in row_labels] if row_labels else [block.name]


def factor_shapes(
    blocks: Sequence[GradientBlock], row_labels: Sequence[str] = ()
) -> tuple[dict[str, tuple[int, int]], list[str]]:
    """``({store block: (p, q)}, [store blocks without factors])`` for these blocks and row labels."""
    shapes: dict[str, tuple[int, int]] = {}
    uncovered: list[str] = []
    for block in blocks:
        shape = _block_shape(block)
        for name in _names(block, row_labels):
            if shape is None:
                uncovered.append(name)
            else:
                shapes[name] = shape
    return shapes, uncovered


def _positions(
    module: nn.Module, x: torch.Tensor, go: torch.Tensor, b: int, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs (b, k, P, p), output grads (b, k, P, q))`` of one module call, in the compute dtype."""
    dtype = compute_dtype(x.dtype)
    if isinstance(module, nn.Conv2d):
        n = x.shape[0]
        if module.kernel_size == (1, 1) and module.stride == (1, 1) and tuple(module.padding) == (0, 0):
            cols = x.reshape(n, x.shape[1], -1)
        else:
            padding = tuple(int(v) for v in module.padding)
            cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=padding, stride=module.stride)
        xs = cols.reshape(b, k, cols.shape[1], -1).transpose(2, 3)
        ds = go.reshape(b, k, go.shape[1], -1).transpose(2, 3)
    else:
        xs = x.reshape(b, k, -1, x.shape[-1])
        ds = go.reshape(b, k, -1, go.shape[-1])
    return xs.to(dtype), ds.to(dtype)


class FactorAccumulator:
    """Running Kronecker-factor sums of the hooked blocks, fed by :class:`PerExampleGradients`.

    Usage (what :func:`~datainf.gradients.collect_gradients` does with ``collect_factors=True``)::

        acc = FactorAccumulator(blocks, row_labels)
        with PerExampleGradients(blocks, row_labels=row_labels, observer=acc.observe) as capture:
            acc.begin_batch()
            grads = capture.compute(task.per_example_loss(model, batch))
            store.append(batch.ids, grads)
            acc.commit(batch.ids)            # only examples that reached the store count
        sums, ids = acc.take()               # BlockFactorSums per block, and the ids they cover

    Args:
        blocks: the gradient blocks (from :func:`~datainf.gradients.find_lora_blocks`).
        row_labels: the task's row labels (each labelled row its own block), or ``()``.
    """

    def __init__(self, blocks: Sequence[GradientBlock], row_labels: Sequence[str] = ()) -> None:
        self.row_labels = tuple(row_labels)
        self.shapes, self.uncovered = factor_shapes(blocks, self.row_labels)
        self._pending = self._zeros()
        self._committed = self._zeros()
        self._ids: list[str] = []

    def _zeros(self) -> dict[str, BlockFactorSums]:
        return {
            name: BlockFactorSums(torch.zeros(p, p, dtype=torch.float64), torch.zeros(q, q, dtype=torch.float64), 0.0)
            for name, (p, q) in self.shapes.items()
        }

    @property
    def num_examples(self) -> int:
        """Examples committed since the last :meth:`take`."""
        return len(self._ids)

    def begin_batch(self) -> None:
        """Forget what was observed since the last :meth:`commit` (a batch that failed)."""
        self._pending = self._zeros()

    def observe(
        self, module: nn.Module, blocks: Sequence[GradientBlock], x: torch.Tensor, go: torch.Tensor, b: int, k: int
    ) -> None:
        """One hooked module call: input ``x`` and output gradient ``go`` of ``b`` examples with ``k`` rows each."""
        mine = [bl for bl in blocks if _names(bl, self.row_labels)[0] in self.shapes]
        if not mine:
            return
        xs, ds = _positions(module, x.detach(), go.detach(), b, k)
        groups = (
            [(xs[:, m], ds[:, m], m) for m in range(k)]
            if self.row_labels
            else [(xs.flatten(1, 2), ds.flatten(1, 2), -1)]
        )
        for inputs, grads, row in groups:
            flat_d = grads.reshape(-1, grads.shape[-1])
            flat_x = inputs.reshape(-1, inputs.shape[-1])
            active = (flat_d != 0).any(dim=1)
            xa = flat_x[active]
            input_sum = (xa.T @ xa).to("cpu", torch.float64)
            output_sum = (flat_d.T @ flat_d).to("cpu", torch.float64)
            count = float(active.sum())
            for block in mine:
                name = block.name if row < 0 else row_block_name(block.name, self.row_labels[row])
                sums = self._pending[name]
                if block.attr == "bias":
                    sums.inputs += count
                else:
                    sums.inputs += input_sum
                sums.outputs += output_sum
                sums.positions += count

    def commit(self, ids: Sequence[str]) -> None:
        """The observed batch reached the store: add it to the running sums."""
        for name, sums in self._pending.items():
            self._committed[name].add(sums)
        self._ids.extend(str(i) for i in ids)
        self._pending = self._zeros()

    def take(self) -> tuple[dict[str, BlockFactorSums], list[str]]:
        """The committed sums and their ids; starts over."""
        out, ids = self._committed, self._ids
        self._committed, self._ids = self._zeros(), []
        return out, ids

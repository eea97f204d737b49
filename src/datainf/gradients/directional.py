"""Directional derivatives of per-example losses by a forward difference (docs/method.md section 6.2).

The scoring pass of every method needs, per training example ``k``, one number per test row:
``-sum_l g_kl . R_l``. With one test row (``average`` mode) that is the derivative of the example's
loss along one direction of the adapter's weights, ``u = -R`` (``u_l`` reshaped to block ``l``'s
tensor):

    I_k = d/dh L_k(theta + h u) at h = 0  ~=  (L_k(theta + h u) - L_k(theta)) / h

``L_k(theta)`` is known from an earlier gradient pass, so each example costs one forward pass
without autograd instead of a forward and a backward pass. The error is ``h/2 u^T H_k u`` (the
truncation, ``H_k`` the example's Hessian) plus the rounding of the two losses divided by ``h``;
:func:`forward_difference_step` takes the textbook step ``h = sqrt(eps) ||theta|| / ||u||``, which
balances the two. The engine checks the result against the exact scores of a few rows before it
uses it (:mod:`datainf.methods.scoring`).

:func:`perturbed_blocks` is the only change made to the user's model: the block tensors are moved by
``h u`` inside a ``with`` block and copied back from saved copies on exit (bit for bit, also when
the body raises).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch

from datainf.errors import ConfigError
from datainf.gradients.lora import GradientBlock

__all__ = ["perturbed_blocks", "forward_difference_step"]


def _check_direction(blocks: Sequence[GradientBlock], direction: Mapping[str, torch.Tensor]) -> None:
    known = {block.name: block for block in blocks}
    unknown = sorted(set(direction) - set(known))
    if unknown:
        raise ConfigError(f"The direction names blocks the model does not have: {unknown[:3]}.")
    wrong = [
        f"{name} ({vector.numel()} numbers, the tensor has {known[name].numel})"
        for name, vector in direction.items()
        if vector.numel() != known[name].numel
    ]
    if wrong:
        raise ConfigError(f"The direction does not fit the block tensors: {', '.join(wrong[:3])}.")


@contextmanager
def perturbed_blocks(
    blocks: Sequence[GradientBlock], direction: Mapping[str, torch.Tensor], step: float
) -> Iterator[None]:
    """Inside the ``with`` block, every block tensor named in ``direction`` is ``theta_l + step * u_l``.

    Args:
        blocks: the model's blocks (:func:`~datainf.gradients.find_lora_blocks`).
        direction: block name -> ``u_l``, ``d_l`` numbers in the tensor's row-major layout (any
            shape with that many elements; cast to the tensor's dtype and device).
        step: ``h``.

    The original values are copied back on exit, bit for bit.

    Raises:
        ConfigError: a name that is not a block, or a vector of the wrong size.
    """
    _check_direction(blocks, direction)
    by_name = {block.name: block.parameter for block in blocks}
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for name, vector in direction.items():
                parameter = by_name[name]
                saved.append((parameter, parameter.detach().clone()))
                parameter.add_(vector.reshape(parameter.shape).to(parameter.device, parameter.dtype), alpha=step)
        yield
    finally:
        with torch.no_grad():
            for moved, original in saved:
                moved.copy_(original)


def forward_difference_step(blocks: Sequence[GradientBlock], direction: Mapping[str, torch.Tensor]) -> float:
    """``h = sqrt(eps) * ||theta|| / ||u||`` over the blocks named in ``direction`` (float64 norms).

    ``eps`` is the machine epsilon of the block tensors' dtype (the coarsest one when they differ);
    ``||theta||`` is taken as 1 when every tensor is zero.

    Raises:
        ConfigError: the direction is all zero (or not finite): there is no derivative to take.
    """
    _check_direction(blocks, direction)
    by_name = {block.name: block.parameter for block in blocks}
    theta_sq = sum(float(by_name[name].detach().double().square().sum()) for name in direction)
    u_sq = sum(float(vector.detach().double().square().sum()) for vector in direction.values())
    if not (math.isfinite(u_sq) and u_sq > 0):
        raise ConfigError(
            "The direction of the loss difference is all zero or not finite: there is nothing to differentiate along."
        )
    eps = max(torch.finfo(by_name[name].dtype).eps for name in direction)
    theta = math.sqrt(theta_sq) if theta_sq > 0 else 1.0
    return math.sqrt(eps) * theta / math.sqrt(u_sq)

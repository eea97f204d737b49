"""Per-example gradients of the blocks from one forward and one backward pass per batch.

The gradient of the summed loss ``sum_b l_b`` with respect to a linear map's weight splits over
examples (the loss of example ``b`` depends only on example ``b``'s rows), so caching each hooked
module's input (forward hook) and the gradient with respect to its output (one
``torch.autograd.grad`` call with respect to the cached outputs) gives every example's gradient
from a single backward pass. Which module types can be hooked, and the formula of each (one einsum
for ``nn.Linear``, the unfolded input for ``nn.Conv2d``), is the table
:data:`datainf.gradients.modules.HOOKABLE_MODULES`, which :func:`~datainf.gradients.find_lora_blocks`
reads too. PEFT computes ``base(x) + lora_B(lora_A(dropout(x))) * scaling``; ``lora_A`` and
``lora_B`` are plain ``nn.Linear`` / ``nn.Conv2d`` modules, so the hooks sit on them (the output
gradient of ``lora_B`` already carries ``scaling``).

Row layout: a hooked module may see more rows than there are examples, when a task runs the model
on ``k`` rows per example (e.g. diffusion at ``k`` timesteps); rows must then be ordered
example-major (rows ``j*k .. j*k+k-1`` belong to example ``j``) and their contributions are summed,
unless the rows are *labelled*: with ``row_labels = (r_1, ..., r_k)`` each row keeps its own gradient,
stored as the block ``"<block>@<r_m>"`` (:func:`row_block_name`); the ``k`` row blocks of a tensor sum
to the example's gradient of that tensor. Diffusion uses this to keep each timestep's gradient apart.
A module called several times in one forward pass has its contributions summed too.

Blocks that no hook covers (a trainable tensor outside the hookable types) fall back to a
per-example ``torch.autograd.grad`` loop over the same graph: correct but ``b`` times slower for those
blocks.

Hooks live only inside the :class:`PerExampleGradients` context manager; all state is kept on that
object, nothing is attached to the user's modules or parameters, and the hooks are removed on exit,
also when the body raises.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from torch import nn

from datainf.errors import ConfigError, LoRAValidationError, TaskInputError
from datainf.gradients.lora import GradientBlock
from datainf.gradients.modules import (
    HookableType,
    compute_dtype,
    hookable_type,
    per_example_conv2d_grads,
    per_example_linear_grads,
    rows_per_example,
    supported_modules,
)
from datainf.gradients.projection import GradientProjector

__all__ = [
    "PerExampleGradients",
    "per_example_linear_grads",
    "per_example_conv2d_grads",
    "row_block_name",
    "split_block_dims",
]

logger = logging.getLogger(__name__)


def row_block_name(block_name: str, row_label: str) -> str:
    """Name of the block holding the gradient of ``block_name`` through the rows labelled ``row_label``."""
    return f"{block_name}@{row_label}"


def split_block_dims(block_dims: dict[str, int], row_labels: Sequence[str]) -> dict[str, int]:
    """The store's ``block_dims`` when each of the ``k`` labelled rows keeps its own block.

    ``{name: d}`` -> ``{name@r_1: d, ..., name@r_k: d}`` for every block, block-major; unchanged when
    ``row_labels`` is empty.
    """
    if not row_labels:
        return dict(block_dims)
    return {row_block_name(name, label): d for name, d in block_dims.items() for label in row_labels}


class PerExampleGradients:
    """Context manager that hooks the block modules and turns a per-example loss into per-example grads.

    Usage::

        with PerExampleGradients(blocks) as capture:
            capture.clear()
            losses = task.per_example_loss(model, batch)      # (b,), one forward pass
            grads = capture.compute(losses)                   # one backward pass
            # grads[name]: (b, d_l), flattened row-major in the parameter's own layout

    Args:
        blocks: the blocks to differentiate (from :func:`datainf.gradients.find_lora_blocks`).
        row_labels: labels of the ``k`` rows the model runs per example (e.g. ``("t25", "t925")``
            for two diffusion timesteps): each row's gradient becomes its own block
            ``"<block>@<label>"``, shape ``(b, d_l)``. Empty (default): one block per tensor, the
            sum over the example's rows.
        observer: called with each hooked module's input and output gradient (e.g. Kronecker factors).
        projector: a random projection of every block (:mod:`datainf.gradients.projection`): the
            blocks come out as ``(b, k_l)`` sketches. ``nn.Linear`` modules project their cached input
            and output gradient before the einsum, so their full gradient is never formed; other
            modules and the fallback project the formed gradient.

    Raises:
        ConfigError: ``row_labels`` repeat a label; some block is not covered by hooks (the
            per-example autograd fallback cannot split rows); or a block's ``module`` is not a
            hookable type (:data:`~datainf.gradients.modules.HOOKABLE_MODULES`).
    """

    def __init__(
        self,
        blocks: Sequence[GradientBlock],
        *,
        row_labels: Sequence[str] = (),
        observer: Callable[[nn.Module, Sequence[GradientBlock], torch.Tensor, torch.Tensor, int, int], None]
        | None = None,
        projector: GradientProjector | None = None,
    ) -> None:
        self._blocks = list(blocks)
        self._observer = observer
        self._projector = projector
        self._dims = {b.name: b.numel for b in self._blocks} if projector is None else projector.block_dims()
        self._row_labels = tuple(str(label) for label in row_labels)
        if len(set(self._row_labels)) != len(self._row_labels):
            raise ConfigError(f"row_labels {self._row_labels} repeat a label; give each row its own.")
        self._module_blocks: dict[int, list[GradientBlock]] = {}
        self._modules: dict[int, tuple[str, nn.Module]] = {}
        self._types: dict[int, HookableType] = {}  # each hooked module's formula, from HOOKABLE_MODULES
        for block in self._blocks:
            if block.module is None:
                continue
            key = id(block.module)
            if key not in self._types:
                entry = hookable_type(block.module)
                if entry is None:
                    raise ConfigError(
                        f"Block {block.name} is to be hooked on {block.module_name} ({type(block.module).__name__}), "
                        f"but hooks support {supported_modules()} only. Give the block module=None (the "
                        "per-example autograd fallback), or get the blocks from find_lora_blocks."
                    )
                self._types[key] = entry
            self._modules.setdefault(key, (block.module_name, block.module))
            self._module_blocks.setdefault(key, []).append(block)
        self._fallback = [b for b in self._blocks if b.module is None]
        if self._row_labels and self._fallback:
            raise ConfigError(
                f"Per-row gradient blocks ({len(self._row_labels)} rows per example) need every block covered by "
                f"hooks, but {len(self._fallback)} are not (e.g. {self._fallback[0].name}). Collect one gradient "
                "per example instead (e.g. DiffusionTaskConfig(timestep_blocks=False))."
            )
        self._records: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._calls: dict[int, int] = dict.fromkeys(self._modules, 0)
        self._handles: list[Any] = []
        self._open = False
        self._in_backward = False  # activation checkpointing re-runs forwards inside the backward: not recorded

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> PerExampleGradients:
        if self._open:
            raise RuntimeError("PerExampleGradients is not re-entrant.")
        self._open = True
        try:
            for key, (_, module) in self._modules.items():
                self._handles.append(module.register_forward_hook(partial(self._record, key)))
        except BaseException:
            self._remove()
            raise
        if self._fallback:
            logger.warning(
                "%d block(s) are not covered by hooks and use the slow per-example autograd loop: %s",
                len(self._fallback),
                ", ".join(b.name for b in self._fallback[:5]) + (" ..." if len(self._fallback) > 5 else ""),
            )
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._remove()

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._records.clear()
        self._open = False

    @property
    def num_hooks(self) -> int:
        """Hooks currently registered (0 outside the context)."""
        return len(self._handles)

    def never_called(self) -> list[str]:
        """Names of hooked modules that have not run with gradients enabled since the context opened."""
        return [self._modules[key][0] for key, count in self._calls.items() if count == 0]

    def clear(self) -> None:
        """Drop cached activations (call before each forward pass)."""
        self._records.clear()

    # ------------------------------------------------------------------ hook
    def _record(self, key: int, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if self._in_backward or not torch.is_grad_enabled():
            return
        if not isinstance(output, torch.Tensor) or not output.requires_grad:
            return
        if not args or not isinstance(args[0], torch.Tensor):
            return
        self._records.setdefault(key, []).append((args[0].detach(), output))
        self._calls[key] += 1

    # ------------------------------------------------------------------ backward
    def compute(self, losses: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-example gradients of every block from the per-example losses of the last forward pass.

        Args:
            losses: per-example losses, shape ``(b,)``; their sum is differentiated once.

        Returns:
            Block name -> tensor ``(b, d_l)`` (float32, or float64 for a float64 model), each row the
            gradient of that example's loss flattened in the parameter's row-major layout. With
            ``row_labels``, the names are ``"<block>@<label>"`` and each holds the gradient through
            that row only.
        """
        if not self._open:
            raise RuntimeError("PerExampleGradients.compute() must be called inside its `with` block.")
        if losses.dim() != 1:
            raise TaskInputError(
                f"The task returned losses of shape {tuple(losses.shape)}; per_example_loss must return one loss "
                "per example, shape (b,)."
            )
        b = losses.shape[0]
        try:
            if not losses.requires_grad:
                raise LoRAValidationError(
                    "The loss does not depend on any adapter tensor with gradients enabled. Do not run the model "
                    "under torch.no_grad() / inference_mode inside the task, and check that the adapter is active."
                )
            records = [(key, x, out) for key, recs in self._records.items() for x, out in recs]
            if not records and not self._fallback:
                raise LoRAValidationError(
                    "No LoRA module ran during the forward pass: the task did not call the model, or called a "
                    "different model than the one the blocks come from."
                )
            result: dict[str, torch.Tensor] = {}
            if records:
                self._in_backward = True
                try:
                    grad_outs = torch.autograd.grad(
                        losses.sum(),
                        [out for _, _, out in records],
                        retain_graph=bool(self._fallback),
                        allow_unused=True,
                    )
                finally:
                    self._in_backward = False
                for (key, x, _), go in zip(records, grad_outs):
                    if go is None:
                        continue
                    self._accumulate(result, key, x, go, b)
            if self._fallback:
                self._fallback_loop(result, losses)
            out: dict[str, torch.Tensor] = {}
            for block in self._blocks:
                for name in self._names(block):
                    tensor = result.get(name)
                    if tensor is None:  # the block did not take part in this batch: zero gradient
                        dtype = compute_dtype(block.parameter.dtype)
                        tensor = torch.zeros(b, self._dims[block.name], dtype=dtype, device=losses.device)
                    out[name] = tensor.reshape(b, self._dims[block.name])
            return out
        finally:
            self._records.clear()

    def _accumulate(self, result: dict[str, torch.Tensor], key: int, x: torch.Tensor, go: torch.Tensor, b: int) -> None:
        module_name, module = self._modules[key]
        blocks = self._module_blocks[key]
        want_w = any(bl.attr == "weight" for bl in blocks)
        want_b = any(bl.attr == "bias" for bl in blocks)
        k = len(self._row_labels) or 1
        if self._row_labels and rows_per_example(x.shape[0], b, module_name) != k:
            raise TaskInputError(
                f"Module {module_name} saw {x.shape[0]} rows for {b} examples, but the task labels {k} rows per "
                f"example ({self._row_labels}); the task must run the model on exactly that many rows per example."
            )
        units = b * k  # with row labels every row is differentiated on its own
        if self._observer is not None:
            self._observer(
                module, blocks, x, go, b, k if self._row_labels else rows_per_example(x.shape[0], b, module_name)
            )
        projector = self._projector
        if projector is not None and isinstance(module, nn.Linear):  # activation side: G is never formed
            x, go = projector.project_linear_inputs(module_name, x, go)
        gw, gb = self._types[key].grads(module, x, go, units, weight=want_w, bias=want_b, module_name=module_name)
        if projector is not None and not isinstance(module, nn.Linear):
            gw, gb = projector.project_formed(module_name, gw, gb)
        for block in blocks:
            g = gw if block.attr == "weight" else gb
            assert g is not None
            per_row = g.reshape(b, k, -1)  # example-major rows
            for m, name in enumerate(self._names(block)):
                prev = result.get(name)
                result[name] = per_row[:, m] if prev is None else prev + per_row[:, m]

    def _names(self, block: GradientBlock) -> list[str]:
        """The store block name(s) of ``block``: itself, or one per row label."""
        if not self._row_labels:
            return [block.name]
        return [row_block_name(block.name, label) for label in self._row_labels]

    def _fallback_loop(self, result: dict[str, torch.Tensor], losses: torch.Tensor) -> None:
        params = [bl.parameter for bl in self._fallback]
        b = losses.shape[0]
        rows: list[list[torch.Tensor]] = [[] for _ in params]
        for i in range(b):
            grads = torch.autograd.grad(losses[i], params, retain_graph=i < b - 1, allow_unused=True)
            for j, (p, g) in enumerate(zip(params, grads)):
                rows[j].append(torch.zeros_like(p).reshape(-1) if g is None else g.reshape(-1))
        for block, parts in zip(self._fallback, rows):
            g = torch.stack(parts).to(compute_dtype(block.parameter.dtype))
            if self._projector is not None:
                g = self._projector.project_rows(block.name, g)
            prev = result.get(block.name)
            result[block.name] = g if prev is None else prev + g

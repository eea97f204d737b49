"""Which module types get per-example gradient hooks, and how each one's gradient is formed.

:data:`HOOKABLE_MODULES` is the one table both sides read: :func:`datainf.gradients.find_lora_blocks`
asks it which tensors can take the fast path (:func:`is_hookable`), and
:class:`datainf.gradients.PerExampleGradients` asks it for the formula of each hooked module
(:func:`hookable_type`). Adding a module type is one :class:`HookableType` entry here (and a case in
``tests/test_gradients_hooks.py``, which checks every entry against the per-example autograd loop).

The formulas. For a linear map ``y = x W^T + c`` applied to every position ``s`` of example ``b``,
the gradient of the summed loss ``sum_b l_b`` with respect to ``W`` splits over examples (the loss
of example ``b`` depends only on example ``b``'s rows):

    dl_b/dW = sum_s  (dL/dy_bs) x_bs^T       ->  einsum('bsi,bso->boi', x, dL/dy)    (b, out, in)
    dl_b/dc = sum_s   dL/dy_bs               ->  (dL/dy).sum(s)                       (b, out)

A 2-D convolution is the same map applied at every spatial position of its unfolded input (a 1x1
convolution needs no unfolding: spatial positions play the role of sequence positions).

Only a module's ``weight`` and ``bias`` (:data:`HOOKED_PARAMETERS`) are formed this way; any other
trainable tensor goes to the per-example autograd fallback.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from datainf.errors import TaskInputError

__all__ = [
    "HookableType",
    "HOOKABLE_MODULES",
    "HOOKED_PARAMETERS",
    "compute_dtype",
    "rows_per_example",
    "hookable_type",
    "is_hookable",
    "describe_module",
    "supported_modules",
    "per_example_linear_grads",
    "per_example_conv2d_grads",
]

#: The attributes of a hooked module whose per-example gradients the formulas give.
HOOKED_PARAMETERS: tuple[str, ...] = ("weight", "bias")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half-precision activations are accumulated in float32; float32/float64 are kept."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def rows_per_example(n_rows: int, b: int, module_name: str) -> int:
    """Rows per example ``k = n_rows / b``; refuses a row count that does not split evenly."""
    if b <= 0 or n_rows % b:
        raise TaskInputError(
            f"Module {module_name} saw {n_rows} rows for a batch of {b} examples; a task must run the model on "
            "the same number of rows per example, ordered example-major. Check the task's per_example_loss."
        )
    return n_rows // b


def per_example_linear_grads(
    x: torch.Tensor, grad_out: torch.Tensor, b: int, *, weight: bool = True, bias: bool = False, module_name: str = ""
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Per-example gradients of an ``nn.Linear``.

    Args:
        x: the module's input, shape ``(N, ..., in)`` with ``N = b * k`` rows, example-major.
        grad_out: gradient of the summed loss w.r.t. the module's output, shape ``(N, ..., out)``.
        b: number of examples.

    Returns:
        ``(grad_weight (b, out, in) or None, grad_bias (b, out) or None)``.
    """
    rows_per_example(x.shape[0], b, module_name)
    dtype = compute_dtype(x.dtype)
    xs = x.reshape(b, -1, x.shape[-1]).to(dtype)
    gs = grad_out.reshape(b, -1, grad_out.shape[-1]).to(dtype)
    gw = torch.einsum("bsi,bso->boi", xs, gs) if weight else None
    gb = gs.sum(dim=1) if bias else None
    return gw, gb


def per_example_conv2d_grads(
    module: nn.Conv2d,
    x: torch.Tensor,
    grad_out: torch.Tensor,
    b: int,
    *,
    weight: bool = True,
    bias: bool = False,
    module_name: str = "",
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Per-example gradients of an ``nn.Conv2d`` with ``groups == 1``.

    Args:
        module: the convolution (kernel size, stride, padding, dilation are read from it).
        x: its input, shape ``(N, C, H, W)`` with ``N = b * k`` rows, example-major.
        grad_out: gradient of the summed loss w.r.t. its output, shape ``(N, O, H', W')``.
        b: number of examples.

    Returns:
        ``(grad_weight (b, O, C, kh, kw) or None, grad_bias (b, O) or None)``.
    """
    n, c = x.shape[0], x.shape[1]
    k = rows_per_example(n, b, module_name)
    o = grad_out.shape[1]
    dtype = compute_dtype(x.dtype)
    gcols = grad_out.reshape(b, k, o, -1).to(dtype)  # (b, k, O, L)
    gw = None
    if weight:
        if module.kernel_size == (1, 1) and module.stride == (1, 1) and tuple(module.padding) == (0, 0):
            cols = x.reshape(b, k, c, -1)  # spatial positions as sequence positions: (b, k, C, H*W)
        else:
            padding = cast("tuple[int, ...]", module.padding)  # numeric: is_hookable refuses "same" / "valid"
            unfolded = F.unfold(
                x, module.kernel_size, dilation=module.dilation, padding=padding, stride=module.stride
            )  # (N, C*kh*kw, L), channel-major like the weight's (C, kh, kw) layout
            cols = unfolded.reshape(b, k, unfolded.shape[1], -1)
        gw = torch.einsum("bkil,bkol->boi", cols.to(dtype), gcols).reshape(b, *module.weight.shape)
    gb = gcols.sum(dim=(1, 3)) if bias else None
    return gw, gb


#: ``grads(module, x, grad_out, b, weight=..., bias=..., module_name=...)`` ->
#: ``(grad_weight (b, *weight.shape) or None, grad_bias (b, out) or None)``.
PerExampleGradFn = Callable[..., tuple[torch.Tensor | None, torch.Tensor | None]]


@dataclass(frozen=True)
class HookableType:
    """One module type whose ``weight`` / ``bias`` per-example gradients come from hooks.

    Attributes:
        module_type: the class (subclasses match too).
        name: how messages name it, with the conditions an instance must meet, e.g.
            ``"nn.Conv2d (groups=1, numeric zero padding)"``.
        supports: whether one instance meets those conditions.
        details: the settings of an instance that decide ``supports`` (for error messages), e.g.
            ``"(groups=2, padding=(1, 1), padding_mode='zeros')"``; ``""`` when there are none.
        grads: the formula, called as ``grads(module, x, grad_out, b, weight=..., bias=...,
            module_name=...)`` with the cached input ``x`` (``N = b * k`` rows, example-major) and
            the output gradient; returns ``(grad_weight (b, *weight.shape) or None, grad_bias (b, out)
            or None)``.
    """

    module_type: type[nn.Module]
    name: str
    supports: Callable[[nn.Module], bool]
    details: Callable[[nn.Module], str]
    grads: PerExampleGradFn


def _linear_grads(
    module: nn.Module, x: torch.Tensor, grad_out: torch.Tensor, b: int, *, weight: bool, bias: bool, module_name: str
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    return per_example_linear_grads(x, grad_out, b, weight=weight, bias=bias, module_name=module_name)


def _conv2d_supported(module: nn.Module) -> bool:
    assert isinstance(module, nn.Conv2d)
    return module.groups == 1 and module.padding_mode == "zeros" and not isinstance(module.padding, str)


def _conv2d_details(module: nn.Module) -> str:
    assert isinstance(module, nn.Conv2d)
    return f"(groups={module.groups}, padding={module.padding!r}, padding_mode={module.padding_mode!r})"


def _conv2d_grads(
    module: nn.Module, x: torch.Tensor, grad_out: torch.Tensor, b: int, *, weight: bool, bias: bool, module_name: str
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    assert isinstance(module, nn.Conv2d)
    return per_example_conv2d_grads(module, x, grad_out, b, weight=weight, bias=bias, module_name=module_name)


#: The module types with a per-example gradient formula, in lookup order (first match wins).
#: ``nn.Linear`` takes any number of leading dimensions; ``nn.Conv2d`` any kernel size, stride and
#: dilation (1x1 convolutions, as in UNet LoRA, take a copy-free path).
HOOKABLE_MODULES: tuple[HookableType, ...] = (
    HookableType(
        module_type=nn.Linear,
        name="nn.Linear",
        supports=lambda module: True,
        details=lambda module: "",
        grads=_linear_grads,
    ),
    HookableType(
        module_type=nn.Conv2d,
        name="nn.Conv2d (groups=1, numeric zero padding)",
        supports=_conv2d_supported,
        details=_conv2d_details,
        grads=_conv2d_grads,
    ),
)


def _entry_of(module: nn.Module | None) -> HookableType | None:
    """The table entry whose type ``module`` is an instance of (supported or not)."""
    for entry in HOOKABLE_MODULES:
        if isinstance(module, entry.module_type):
            return entry
    return None


def hookable_type(module: nn.Module | None) -> HookableType | None:
    """The :data:`HOOKABLE_MODULES` entry that forms ``module``'s per-example gradients, or ``None``
    when no hook can (another type, or an instance outside the entry's conditions)."""
    entry = _entry_of(module)
    return entry if entry is not None and entry.supports(module) else None  # type: ignore[arg-type]


def is_hookable(module: nn.Module | None) -> bool:
    """Whether per-example gradients of ``module``'s weight/bias can be formed from hooks.

    Supported: the types in :data:`HOOKABLE_MODULES`: :class:`torch.nn.Linear` (any number of
    leading dimensions) and :class:`torch.nn.Conv2d` with ``groups == 1``, zero padding and numeric
    ``padding`` (any kernel size; 1x1 convolutions, as in UNet LoRA, take a copy-free path).
    """
    return hookable_type(module) is not None


def describe_module(module: nn.Module) -> str:
    """``module``'s class name plus the settings that decide whether it is hookable, e.g.
    ``"Conv2d(groups=2, padding=(0, 0), padding_mode='zeros')"``."""
    entry = _entry_of(module)
    return type(module).__name__ + (entry.details(module) if entry is not None else "")


def supported_modules() -> str:
    """The hookable types for messages: ``"nn.Linear and nn.Conv2d (groups=1, numeric zero padding)"``."""
    names = [entry.name for entry in HOOKABLE_MODULES]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]

"""Compressed gradients: a seeded random projection of every block, applied while the gradients are formed.

With ``ProjectionConfig(dim=k, seed=s)`` each block ``l`` of ``d_l > k`` numbers is stored as a
``k_l <= k`` dimensional sketch ``P_l^T g_il`` instead of ``g_il``. The influence methods are not
changed: they see blocks of ``k_l`` numbers (inner products, and so every method's quantities, are
preserved in expectation: ``E[P P^T] = I``, Johnson-Lindenstrauss).

The projection (scheme ``kron-gaussian-v1``)
--------------------------------------------
A weight block of a hooked module is a matrix ``G`` of shape ``(out, in)`` (``in`` flattened for a
convolution, ``C kh kw``). It is projected on each side separately::

    G  ->  P_out^T G P_in          shape (k_out, k_in),  stored flattened row-major

i.e. ``vec(G) -> (P_out kron P_in)^T vec(G)``, with ``P_side`` of shape ``(side, k_side)`` holding
independent ``N(0, 1 / k_side)`` entries, or the identity for a side that is not projected. Which
sides are projected follows from the block's shape alone (:func:`kron_sides`):

* ``out * in <= k``: nothing (the block is stored as it is);
* the smaller side ``s`` has ``s^2 <= k``: only the larger side ``L`` is projected, to ``k // s``, so
  the block keeps ``s * (k // s) <= k`` numbers. This is the LoRA case: ``lora_A`` is ``(r, d_in)``,
  its ``d_in`` (activation) side is projected to ``k / r``; ``lora_B`` is ``(d_out, r)``, its
  ``d_out`` (output-gradient) side is projected to ``k / r``. With ``r = 8`` and ``k = 1024`` each
  LoRA block keeps ``8 x 128`` numbers;
* otherwise (both sides larger than ``sqrt(k)``, e.g. a square head layer): both sides go to
  ``isqrt(k)``.

A bias block ``(out,)`` uses its module's ``P_out``. A block no hook covers (the per-example
autograd fallback) of ``d_l > k`` numbers gets one dense ``(d_l, k)`` Gaussian matrix.

Why this never forms the full gradient of a LoRA ``nn.Linear``: its per-example gradient is
``G_b = sum_t delta_bt x_bt^T`` (``delta`` the output gradient, ``x`` the input), so
``P_out^T G_b P_in = sum_t (P_out^T delta_bt)(P_in^T x_bt)^T``: the hooks project the cached
activations ``x`` (and / or output gradients ``delta``) first and form the ``(k_out, k_in)`` sketch
with the usual einsum (:meth:`GradientProjector.project_linear_inputs`). The extra cost per example is
``T * side * k_side`` multiply-adds per projected side (``T`` positions), a few percent of the base
model's forward and backward pass for the LoRA shapes. Other modules (convolutions) form ``G`` first and
project it (:meth:`GradientProjector.project_formed`): the same numbers up to round-off.

Seeds: each projected side's matrix is drawn on the CPU in float64 from a generator seeded by
``sha256(scheme | seed | module name | side)`` (:func:`side_seed`), so the same configuration gives
the same matrices on any device and in any process, and independent blocks get independent matrices.
Memory: ``sum_l side_l * k_l`` numbers in the compute dtype (about 4 MiB per 1,000 x 1,000 side).

The configuration is recorded in the gradients' fingerprint under ``"projection"``
(:data:`PROJECTION_KEY`, e.g. ``"kron-gaussian-v1:dim=1024:seed=0"``); unprojected gradients have no
such key, so their fingerprints are what they always were. :func:`check_same_projection` refuses
train and test gradients projected differently.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from datainf.errors import ConfigError, ProjectionMismatchError
from datainf.gradients.modules import compute_dtype
from datainf.settings import DictSettings

__all__ = [
    "PROJECTION_KEY",
    "PROJECTION_SCHEME",
    "ProjectionConfig",
    "GradientProjector",
    "kron_sides",
    "side_seed",
    "projection_of",
    "check_same_projection",
]

#: The fingerprint key that records a projection (absent: the gradients are not projected).
PROJECTION_KEY = "projection"
#: Name and version of the projection recipe; a change of the recipe must change this string.
PROJECTION_SCHEME = "kron-gaussian-v1"


@dataclass(frozen=True)
class ProjectionConfig(DictSettings):
    """A seeded random projection of every block to at most ``dim`` numbers.

    Attributes:
        dim: the largest number of numbers kept per block, ``k`` (blocks of ``d_l <= k`` are kept as
            they are). Store bytes per example fall from ``4 sum_l d_l`` to about ``4 sum_l min(d_l, k)``.
        seed: the random projection's seed; train and test gradients must share ``dim`` and ``seed``.
    """

    _settings_name = "projection"

    dim: int
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.dim, int) or isinstance(self.dim, bool) or self.dim < 1:
            raise ConfigError(f"The projection dimension must be a positive integer, got {self.dim!r}.")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ConfigError(f"The projection seed must be an integer >= 0, got {self.seed!r}.")

    def describe(self) -> str:
        """The fingerprint value: ``"kron-gaussian-v1:dim=<k>:seed=<s>"``."""
        return f"{PROJECTION_SCHEME}:dim={self.dim}:seed={self.seed}"


def kron_sides(out: int, inn: int, k: int) -> tuple[int | None, int | None]:
    """``(k_out, k_in)`` for a ``(out, in)`` weight block and dimension ``k``; ``None``: side not projected.

    See the module docstring: nothing when ``out * in <= k``; only the larger side (to ``k // small``)
    when ``small^2 <= k`` (ties: the ``in`` side); else both sides to ``isqrt(k)``.
    """
    if out * inn <= k:
        return None, None
    small = min(out, inn)
    if small * small <= k:
        reduced = k // small
        return (None, reduced) if inn >= out else (reduced, None)
    side = math.isqrt(k)
    return side, side


def side_seed(seed: int, module_name: str, side: str) -> int:
    """The generator seed of one projection matrix: 63 bits of ``sha256(scheme|seed|module|side)``."""
    digest = hashlib.sha256(f"{PROJECTION_SCHEME}|{seed}|{module_name}|{side}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)


def projection_of(fingerprint: Mapping[str, str]) -> str:
    """The projection recorded in a gradient fingerprint, or ``"none"`` (unprojected)."""
    return str(fingerprint.get(PROJECTION_KEY, "none"))


def check_same_projection(train: Mapping[str, str], test: Mapping[str, str]) -> None:
    """Refuse train and test gradients whose fingerprints record different projections.

    Raises:
        ProjectionMismatchError: names both projections (``"none"`` for unprojected gradients).
    """
    a, b = projection_of(train), projection_of(test)
    if a != b:
        raise ProjectionMismatchError(
            f"Train gradients were projected with {a!r} but test gradients with {b!r}: their sketches live in "
            "different spaces, so no inner product between them means anything. Compute both with the same "
            "projection (datainf grads --project-dim K --project-seed S with the same K and S, or neither)."
        )


class _BlockLike(Protocol):
    """What the projector reads of a block (:class:`~datainf.gradients.lora.GradientBlock` has it)."""

    @property
    def name(self) -> str: ...
    @property
    def module_name(self) -> str: ...
    @property
    def attr(self) -> str: ...
    @property
    def shape(self) -> tuple[int, ...]: ...
    @property
    def hooked(self) -> bool: ...


@dataclass(frozen=True)
class _Plan:
    """How one block is projected: ``kind`` ``"identity"``, ``"kron"`` (module sides) or ``"dense"``."""

    kind: str
    module_name: str
    attr: str
    out: int
    inn: int
    k_out: int | None
    k_in: int | None
    dim: int


class GradientProjector:
    """The projection of one set of blocks: projected sizes, the matrices, and the two ways to apply them.

    Args:
        config: dimension and seed.
        blocks: the blocks (``find_lora_blocks(model).blocks``, or objects with the same ``name``,
            ``module_name``, ``attr``, ``shape`` and ``hooked``).

    Each hooked module's sides are decided by its weight's shape ``(out, in)`` (:func:`kron_sides`);
    a module with a bias block and no weight block uses ``(out, 1)``.
    """

    def __init__(self, config: ProjectionConfig, blocks: Sequence[_BlockLike]) -> None:
        self.config = config
        weights: dict[str, tuple[int, int]] = {}
        for block in blocks:
            if block.hooked and block.attr == "weight":
                shape = tuple(block.shape)
                weights[block.module_name] = (int(shape[0]), int(math.prod(shape[1:])))
        self._plans: dict[str, _Plan] = {}
        self._modules: dict[str, tuple[int, int, int | None, int | None]] = {}
        for block in blocks:
            numel = int(math.prod(block.shape))
            if block.hooked and block.attr in ("weight", "bias"):
                out, inn = weights.get(block.module_name, (int(block.shape[0]), 1))
                k_out, k_in = kron_sides(out, inn, config.dim)
                self._modules[block.module_name] = (out, inn, k_out, k_in)
                if block.attr == "weight":
                    dim = (k_out or out) * (k_in or inn)
                else:
                    dim = k_out or out
                kind = "identity" if dim == numel and k_out is None and k_in is None else "kron"
                self._plans[block.name] = _Plan(kind, block.module_name, block.attr, out, inn, k_out, k_in, dim)
            elif numel > config.dim:
                self._plans[block.name] = _Plan("dense", block.name, block.attr, numel, 1, config.dim, None, config.dim)
            else:
                self._plans[block.name] = _Plan("identity", block.name, block.attr, numel, 1, None, None, numel)
        self._cache: dict[tuple[str, str, torch.device, torch.dtype], torch.Tensor] = {}

    @property
    def fingerprint_value(self) -> str:
        """What the gradients' fingerprint records under :data:`PROJECTION_KEY`."""
        return self.config.describe()

    def block_dims(self) -> dict[str, int]:
        """Block name -> projected size ``k_l`` (``d_l`` for blocks kept as they are), in block order."""
        return {name: plan.dim for name, plan in self._plans.items()}

    def block_plan(self, name: str) -> tuple[str, int | None, int | None]:
        """``(kind, k_out, k_in)`` of block ``name``: kind ``"identity"``, ``"kron"`` or ``"dense"``."""
        plan = self._plans[name]
        return plan.kind, plan.k_out, plan.k_in

    def matrix_numbers(self) -> int:
        """How many numbers the projection matrices hold in all (their memory: times the dtype's size)."""
        total = 0
        for out, inn, k_out, k_in in self._modules.values():
            total += (out * k_out if k_out else 0) + (inn * k_in if k_in else 0)
        total += sum(p.out * p.dim for p in self._plans.values() if p.kind == "dense")
        return total

    def matrix(
        self, key: str, side: str, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float64
    ) -> torch.Tensor:
        """The projection matrix of module ``key``'s ``side`` (``"out"``, ``"in"``; ``"dense"`` for a
        fallback block ``key``): shape ``(side size, k_side)``, entries ``N(0, 1/k_side)``.

        Drawn once in float64 on the CPU from :func:`side_seed`, then cast and moved (cached per device and dtype).
        """
        target = torch.device(device)
        cached = self._cache.get((key, side, target, dtype))
        if cached is not None:
            return cached
        if side == "dense":
            plan = self._plans[key]
            rows, cols = plan.out, plan.dim
        else:
            out, inn, k_out, k_in = self._modules[key]
            rows, k = (out, k_out) if side == "out" else (inn, k_in)
            if k is None:
                raise ConfigError(f"The {side} side of {key} is not projected.")
            cols = k
        generator = torch.Generator(device="cpu").manual_seed(side_seed(self.config.seed, key, side))
        base = torch.randn(rows, cols, generator=generator, dtype=torch.float64) / math.sqrt(cols)
        tensor = base.to(device=target, dtype=dtype)
        self._cache[(key, side, target, dtype)] = tensor
        return tensor

    def module_sides(self, module_name: str) -> tuple[int | None, int | None]:
        """``(k_out, k_in)`` of a hooked module (``None``: side not projected)."""
        _, _, k_out, k_in = self._modules[module_name]
        return k_out, k_in

    def project_linear_inputs(
        self, module_name: str, x: torch.Tensor, grad_out: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The activation-side projection of an ``nn.Linear``: ``(x P_in, grad_out P_out)``.

        Args:
            x: the module's cached input, ``(N, ..., in)``.
            grad_out: the output gradient, ``(N, ..., out)``.

        Returns:
            ``(N, ..., k_in)`` and ``(N, ..., k_out)`` in the compute dtype; the usual per-example
            formula on them gives ``P_out^T G P_in`` (``(b, k_out, k_in)``) and ``P_out^T c`` for the bias.
        """
        k_out, k_in = self.module_sides(module_name)
        dtype = compute_dtype(x.dtype)
        x, grad_out = x.to(dtype), grad_out.to(dtype)
        if k_in is not None:
            x = x @ self.matrix(module_name, "in", device=x.device, dtype=dtype)
        if k_out is not None:
            grad_out = grad_out @ self.matrix(module_name, "out", device=grad_out.device, dtype=dtype)
        return x, grad_out

    def project_formed(
        self, module_name: str, grad_weight: torch.Tensor | None, grad_bias: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Project formed per-example gradients of a hooked module: ``(b, out, *in) -> (b, k_out, k_in)``
        for the weight, ``(b, out) -> (b, k_out)`` for the bias."""
        k_out, k_in = self.module_sides(module_name)
        if grad_weight is not None:
            b, out = grad_weight.shape[0], grad_weight.shape[1]
            g = grad_weight.reshape(b, out, -1)
            if k_out is not None:
                g = torch.einsum("boi,ok->bki", g, self.matrix(module_name, "out", device=g.device, dtype=g.dtype))
            if k_in is not None:
                g = g @ self.matrix(module_name, "in", device=g.device, dtype=g.dtype)
            grad_weight = g
        if grad_bias is not None and k_out is not None:
            grad_bias = grad_bias @ self.matrix(module_name, "out", device=grad_bias.device, dtype=grad_bias.dtype)
        return grad_weight, grad_bias

    def project_rows(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        """Project full flattened gradients of block ``name``: ``(b, d_l) -> (b, k_l)``.

        The formed-gradient path for any block (the fallback blocks' only one); for hooked blocks it is
        what the hooks compute without forming ``G``, used by references and for sketching a stored
        unprojected block.
        """
        plan = self._plans[name]
        if plan.kind == "identity":
            return rows
        if plan.kind == "dense":
            return rows @ self.matrix(name, "dense", device=rows.device, dtype=rows.dtype)
        b = rows.shape[0]
        if plan.attr == "weight":
            weight, _ = self.project_formed(plan.module_name, rows.reshape(b, plan.out, plan.inn), None)
            assert weight is not None
            return weight.reshape(b, -1)
        _, bias = self.project_formed(plan.module_name, None, rows)
        assert bias is not None
        return bias

    def __repr__(self) -> str:
        projected = sum(1 for plan in self._plans.values() if plan.kind != "identity")
        return f"GradientProjector({self.config.describe()}, {projected} of {len(self._plans)} blocks projected)"


def projector_for(config: ProjectionConfig | None, blocks: Sequence[_BlockLike]) -> GradientProjector | None:
    """``GradientProjector(config, blocks)``, or ``None`` without a projection."""
    return None if config is None else GradientProjector(config, blocks)


def is_linear(module: nn.Module) -> bool:
    """Whether a hooked module takes the activation-side path (an ``nn.Linear``)."""
    return isinstance(module, nn.Linear)

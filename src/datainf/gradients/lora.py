"""Find and validate the trainable tensors of a LoRA-tuned model: the *blocks* of DataInf.

A block is one trainable parameter tensor (docs/method.md section 1): the ``lora_A`` and ``lora_B``
weights of every adapted layer are two separate blocks, and every trainable tensor of a
``modules_to_save`` copy (e.g. a classifier head's weight and bias) is one more block each. Blocks are
named by the parameter's full name in ``model.named_parameters()``, e.g.
``base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.default.weight``.

Works with a :class:`peft.PeftModel` and with plain modules that received adapters through
``peft.inject_adapter_in_model`` or ``add_adapter`` (diffusers UNets). Validation collects every
problem before raising one :class:`~datainf.errors.LoRAValidationError`.

It also holds :func:`gradient_mode`, the only change the collector makes to the user's model, and a
reversible one: eval mode (LoRA dropout off) and ``requires_grad`` on the block tensors while the
gradients are taken.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.utils.checkpoint
from torch import nn

from datainf.errors import LoRAValidationError
from datainf.gradients.modules import HOOKED_PARAMETERS, describe_module, is_hookable, supported_modules

if TYPE_CHECKING:
    from peft.tuners.lora import LoraLayer

__all__ = [
    "GradientBlock",
    "LoRABlocks",
    "find_lora_blocks",
    "gradient_mode",
    "model_fingerprint",
    "is_hookable",
]

logger = logging.getLogger(__name__)

BlockRole = Literal["lora_A", "lora_B", "modules_to_save", "other"]


@dataclass(frozen=True)
class GradientBlock:
    """One trainable tensor whose per-example gradient is collected.

    Attributes:
        name: the parameter's full name in ``model.named_parameters()`` (the block name in a store).
        parameter: the tensor itself.
        module_name: name of the module that owns the tensor.
        module: the owning module when its per-example gradient comes from hooks (``nn.Linear`` or
            ``nn.Conv2d``); ``None`` when it must come from the per-example autograd fallback.
        attr: ``"weight"``, ``"bias"`` or another attribute name on the owning module.
        role: ``"lora_A"``, ``"lora_B"``, ``"modules_to_save"`` or ``"other"`` (another trainable tensor).
    """

    name: str
    parameter: nn.Parameter = field(repr=False, compare=False)
    module_name: str
    module: nn.Module | None = field(repr=False, compare=False)
    attr: str
    role: BlockRole

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the tensor; its per-example gradient is stored flattened row-major."""
        return tuple(self.parameter.shape)

    @property
    def numel(self) -> int:
        """Number of parameters ``d_l`` of the block."""
        return int(self.parameter.numel())

    @property
    def hooked(self) -> bool:
        """True when the block's per-example gradient is formed from hooks (the fast path)."""
        return self.module is not None


@dataclass(frozen=True)
class LoRABlocks:
    """The blocks of one adapter, in ``model.named_parameters()`` order.

    Attributes:
        adapter_name: the adapter whose tensors are differentiated.
        blocks: one :class:`GradientBlock` per trainable tensor.
    """

    adapter_name: str
    blocks: tuple[GradientBlock, ...]

    @property
    def block_dims(self) -> dict[str, int]:
        """Block name -> ``d_l``, in order (the ``block_dims`` of a gradient store)."""
        return {b.name: b.numel for b in self.blocks}

    @property
    def names(self) -> list[str]:
        return [b.name for b in self.blocks]

    @property
    def hooked(self) -> list[GradientBlock]:
        """Blocks covered by hooks."""
        return [b for b in self.blocks if b.hooked]

    @property
    def fallback(self) -> list[GradientBlock]:
        """Blocks no hook covers (per-example autograd loop, slow)."""
        return [b for b in self.blocks if not b.hooked]

    def __len__(self) -> int:
        return len(self.blocks)

    def __iter__(self) -> Iterator[GradientBlock]:
        return iter(self.blocks)


@dataclass(frozen=True)
class _PeftClasses:
    """The peft classes discovery tells apart (imported lazily: peft is only needed with a model)."""

    base_tuner: type[Any]  # BaseTunerLayer: every peft tuner layer
    lora: type[Any]  # LoraLayer
    auxiliary: type[Any]  # AuxiliaryTrainingWrapper: modules_to_save copies, trainable tokens
    unhookable: tuple[type[Any], ...]  # LoRA layer types whose update has no lora_A/lora_B module to hook


def _peft_classes() -> _PeftClasses:
    """The peft layer classes, and the LoRA layer types without a hookable path."""
    from peft.tuners.lora import layer as lora_layer
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    unhookable = tuple(
        cls
        for cls in (
            getattr(lora_layer, "Embedding", None),
            getattr(lora_layer, "MultiheadAttention", None),
            getattr(lora_layer, "ParamWrapper", None),
        )
        if cls is not None
    )
    return _PeftClasses(BaseTunerLayer, lora_layer.LoraLayer, AuxiliaryTrainingWrapper, unhookable)


def _active_adapters(module: object) -> list[str]:
    active = getattr(module, "active_adapters", None)
    if callable(active):  # diffusers' ModelMixin.active_adapters() is a method
        return []
    if isinstance(active, str):
        return [active]
    return [str(a) for a in (active or [])]


@dataclass
class _PeftModules:
    """What :func:`_discover_peft_modules` found, in ``model.named_modules()`` order.

    Attributes:
        lora_layers: ``(name, LoraLayer)`` of every LoRA layer.
        aux_wrappers: ``(name, AuxiliaryTrainingWrapper)`` of every ``modules_to_save`` copy (and other
            auxiliary wrappers such as trainable tokens).
        problems: one line per non-LoRA peft tuner layer.
    """

    lora_layers: list[tuple[str, LoraLayer]] = field(default_factory=list)
    aux_wrappers: list[tuple[str, nn.Module]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _discover_peft_modules(model: nn.Module, classes: _PeftClasses) -> _PeftModules:
    """Phase 1: find the peft LoRA layers and auxiliary wrappers of ``model``; note non-LoRA tuners.

    Raises:
        LoRAValidationError: the model has no LoRA layer (the non-LoRA tuners found are listed).
    """
    found = _PeftModules()
    for mod_name, module in model.named_modules():
        if isinstance(module, classes.lora):
            found.lora_layers.append((mod_name, module))
        elif isinstance(module, classes.base_tuner):
            found.problems.append(
                f"{mod_name} is a {type(module).__name__} (a non-LoRA peft tuner); only LoRA adapters are supported."
            )
        elif isinstance(module, classes.auxiliary):
            found.aux_wrappers.append((mod_name, module))

    if not found.lora_layers:
        raise LoRAValidationError(
            "No LoRA layer found in the model. Wrap it with peft.get_peft_model(model, LoraConfig(...)), load a "
            "trained adapter with PeftModel.from_pretrained(...), or inject one with peft.inject_adapter_in_model "
            "(diffusers: unet.add_adapter(LoraConfig(...)))." + ("".join(f"\n  - {p}" for p in found.problems))
        )
    return found


def _choose_adapter(
    lora_layers: Sequence[tuple[str, LoraLayer]], adapter_name: str | None, problems: list[str]
) -> str | None:
    """Phase 2: the adapter to differentiate: ``adapter_name``, or the single active one.

    Appends to ``problems`` (and returns ``None`` where no adapter can be chosen) when no adapter is
    active, several are and none was named, or the named one does not exist or is not active.
    """
    available: set[str] = set()
    active: set[str] = set()
    for _, layer in lora_layers:
        available.update(layer.lora_A.keys())
        available.update(layer.lora_embedding_A.keys())
        active.update(a for a in _active_adapters(layer) if a in layer.lora_A or a in layer.lora_embedding_A)

    chosen: str | None = adapter_name
    if adapter_name is None:
        if len(active) == 1:
            chosen = next(iter(active))
        elif not active:
            problems.append(
                f"No LoRA adapter is active (adapters present: {sorted(available)}). Activate one with "
                "model.set_adapter(name)."
            )
        else:
            problems.append(
                f"Several LoRA adapters are active ({sorted(active)}); say which one to differentiate with "
                "adapter_name=..., or activate a single one with model.set_adapter(name)."
            )
    elif adapter_name not in available:
        problems.append(f"Adapter {adapter_name!r} does not exist; adapters present: {sorted(available)}.")
        chosen = None
    elif adapter_name not in active:
        problems.append(
            f"Adapter {adapter_name!r} is not active (active: {sorted(active) or 'none'}); call "
            f"model.set_adapter({adapter_name!r}) first."
        )
    return chosen


def _has_adapter(layer: LoraLayer, adapter: str | None) -> bool:
    """Whether the LoRA ``layer`` holds ``adapter`` (as a lora_A/lora_B pair or as embedding LoRA)."""
    return adapter is not None and (adapter in layer.lora_A or adapter in layer.lora_embedding_A)


def _layer_problems(mod_name: str, layer: LoraLayer, adapter: str, unhookable: tuple[type[Any], ...]) -> list[str]:
    """What makes one LoRA layer's ``adapter`` unusable, in this order: merged into the base weights,
    adapters disabled, a LoRA variant (DoRA, ...), a layer type without lora_A/lora_B modules
    (embedding LoRA, ``nn.MultiheadAttention``, raw parameters; then nothing more is checked), and a
    ``lora_A`` / ``lora_B`` module outside :data:`~datainf.gradients.modules.HOOKABLE_MODULES`."""
    problems: list[str] = []
    where = f"{mod_name} ({type(layer).__name__})"
    if adapter in getattr(layer, "merged_adapters", []):
        problems.append(
            f"{where}: adapter {adapter!r} is merged into the base weights, so its tensors receive no gradient. "
            "Call model.unmerge_adapter() (PeftModel) or layer.unmerge() before collecting gradients."
        )
    if getattr(layer, "disable_adapters", False):
        problems.append(
            f"{where}: adapters are disabled (disable_adapter() context or enable_adapters(False)); enable them."
        )
    if adapter in getattr(layer, "lora_variant", {}) or getattr(layer, "use_dora", {}).get(adapter, False):
        variant = type(getattr(layer, "lora_variant", {}).get(adapter, object())).__name__
        problems.append(
            f"{where}: adapter {adapter!r} uses a LoRA variant ({'DoRA' if layer.use_dora.get(adapter) else variant}) "
            "whose extra tensors have no module to hook; only plain LoRA is supported. Retrain without "
            "use_dora / the variant option."
        )
    if adapter in layer.lora_embedding_A or (unhookable and isinstance(layer, unhookable)):
        problems.append(
            f"{where}: LoRA on this layer type computes its update without a lora_A/lora_B module to hook "
            "(embedding LoRA, nn.MultiheadAttention, target_parameters). Remove it from target_modules."
        )
        return problems
    for part in ("lora_A", "lora_B"):
        sub = getattr(layer, part)[adapter]
        if not is_hookable(sub):
            problems.append(
                f"{where}: {part} is a {describe_module(sub)}; per-example gradients support {supported_modules()}. "
                "Remove this layer from target_modules."
            )
    return problems


def _refuse_unsupported(
    lora_layers: Sequence[tuple[str, LoraLayer]], adapter: str | None, classes: _PeftClasses
) -> list[str]:
    """Phase 3: the problems of every LoRA layer that holds ``adapter`` (:func:`_layer_problems`),
    layer by layer in model order."""
    problems: list[str] = []
    for mod_name, layer in lora_layers:
        if _has_adapter(layer, adapter):
            assert adapter is not None
            problems.extend(_layer_problems(mod_name, layer, adapter, classes.unhookable))
    return problems


def _raise_if_problems(problems: Sequence[str]) -> None:
    """Raise one :class:`LoRAValidationError` listing every problem found, if there is any."""
    if problems:
        raise LoRAValidationError(
            f"The model's LoRA adapters cannot be used for per-example gradients ({len(problems)} problem"
            f"{'s' if len(problems) != 1 else ''}):" + "".join(f"\n  - {p}" for p in problems)
        )


@dataclass
class _Selection:
    """The tensors chosen as blocks so far, by ``id``: their role and, when hooked, the module to hook."""

    roles: dict[int, BlockRole] = field(default_factory=dict)
    hook_owner: dict[int, nn.Module] = field(default_factory=dict)


def _select_lora_tensors(lora_layers: Sequence[tuple[str, LoraLayer]], adapter: str, selection: _Selection) -> None:
    """Phase 4: every tensor of ``adapter``'s ``lora_A`` / ``lora_B`` modules (weight, and bias with
    ``lora_bias=True``), hooked on that module. Runs after :func:`_refuse_unsupported` found nothing, so
    every such module is hookable."""
    for _, layer in lora_layers:
        if adapter not in layer.lora_A:
            continue
        for part in ("lora_A", "lora_B"):
            sub = getattr(layer, part)[adapter]
            for p in sub.parameters(recurse=False):
                selection.roles[id(p)] = part
                selection.hook_owner[id(p)] = sub


def _select_auxiliary_tensors(
    aux_wrappers: Sequence[tuple[str, nn.Module]], adapter: str, selection: _Selection
) -> None:
    """Phase 5: every tensor of ``adapter``'s ``modules_to_save`` copies (role ``"modules_to_save"``,
    hooked where its module is hookable), and the trainable tensors of other auxiliary wrappers the
    adapter has active, e.g. trainable tokens (role ``"other"``, per-example autograd fallback)."""
    for _, wrapper in aux_wrappers:
        copies = getattr(wrapper, "modules_to_save", None)
        if isinstance(copies, nn.ModuleDict) and adapter in copies:
            for sub in copies[adapter].modules():
                for p in sub.parameters(recurse=False):
                    selection.roles[id(p)] = "modules_to_save"
                    if is_hookable(sub):
                        selection.hook_owner[id(p)] = sub
        elif _active_adapters(wrapper) and adapter in _active_adapters(wrapper):
            for p in wrapper.parameters():
                if p.requires_grad:
                    selection.roles[id(p)] = "other"


def _adapter_tensors(found: _PeftModules) -> set[int]:
    """``id`` of every tensor that belongs to some adapter (every adapter's LoRA and auxiliary
    tensors): those of other adapters are left out of the blocks even when trainable."""
    owned: set[int] = set()
    for _, layer in found.lora_layers:
        for attr_name in layer.adapter_layer_names:
            container = getattr(layer, attr_name, None)
            if isinstance(container, (nn.ModuleDict, nn.ParameterDict)):
                for p in container.parameters():
                    owned.add(id(p))
    for _, wrapper in found.aux_wrappers:
        for p in wrapper.parameters():
            owned.add(id(p))
    return owned


def _build_blocks(model: nn.Module, selection: _Selection, adapter_owned: set[int]) -> list[GradientBlock]:
    """Phase 6: the blocks in ``model.named_parameters()`` order: the selected tensors, plus every
    other trainable tensor that belongs to no adapter (role ``"other"``, e.g. biases trained with
    ``bias="all"``), so nothing trainable is left out. A block is hooked when its module is the
    selected hook owner or, for an ``"other"`` tensor, a hookable module, and the tensor is one of
    :data:`~datainf.gradients.modules.HOOKED_PARAMETERS`; otherwise it uses the autograd fallback."""
    owners: dict[int, tuple[str, str, nn.Module]] = {}
    for mod_name, module in model.named_modules():
        for attr, p in module.named_parameters(recurse=False):
            owners.setdefault(id(p), (mod_name, attr, module))

    blocks: list[GradientBlock] = []
    for name, p in model.named_parameters():
        role = selection.roles.get(id(p))
        if role is None:
            if not p.requires_grad or id(p) in adapter_owned:
                continue
            role = "other"
        mod_name, attr, module = owners[id(p)]
        hooked = selection.hook_owner.get(id(p))
        if hooked is None and role == "other" and is_hookable(module) and attr in HOOKED_PARAMETERS:
            hooked = module
        if hooked is not None and attr not in HOOKED_PARAMETERS:
            hooked = None
        blocks.append(GradientBlock(name=name, parameter=p, module_name=mod_name, module=hooked, attr=attr, role=role))
    return blocks


def find_lora_blocks(model: nn.Module, *, adapter_name: str | None = None) -> LoRABlocks:
    """Discover and validate the blocks of the active LoRA adapter of ``model``.

    The phases: discover the peft LoRA layers; choose the adapter; refuse what has no hookable path
    (every problem collected, then one error); select the adapter's ``lora_A`` / ``lora_B`` tensors
    and its ``modules_to_save`` copies; add the remaining trainable tensors that belong to no
    adapter; check that some LoRA tensor was found.

    Args:
        model: a ``PeftModel`` or any module with peft LoRA layers injected (``inject_adapter_in_model``,
            diffusers' ``add_adapter``).
        adapter_name: which adapter to differentiate. Required when several adapters are active; it
            must be active (the model runs as configured: other active adapters still contribute to
            the forward pass but are not differentiated).

    Returns:
        The adapter's blocks: every ``lora_A`` / ``lora_B`` tensor (weight, and ``lora_B`` bias when
        ``lora_bias=True``), every tensor of the adapter's ``modules_to_save`` copies, and any other
        tensor with ``requires_grad=True`` that belongs to no adapter (e.g. biases trained with
        ``bias="all"``). Tensors of other adapters are left out.

    Raises:
        LoRAValidationError: listing every problem found: no LoRA layer; the adapter merged into the
            base weights; adapters disabled; unsupported variants (DoRA and other ``lora_variant``\\ s,
            embedding LoRA, LoRA on ``nn.MultiheadAttention`` or on raw parameters, grouped or
            non-2-D convolutions: anything without a ``lora_A``/``lora_B`` module to hook); non-LoRA
            peft tuners; several active adapters and no ``adapter_name``.
    """
    classes = _peft_classes()
    found = _discover_peft_modules(model, classes)
    problems = list(found.problems)
    chosen = _choose_adapter(found.lora_layers, adapter_name, problems)
    problems.extend(_refuse_unsupported(found.lora_layers, chosen, classes))
    _raise_if_problems(problems)
    assert chosen is not None

    selection = _Selection()
    _select_lora_tensors(found.lora_layers, chosen, selection)
    _select_auxiliary_tensors(found.aux_wrappers, chosen, selection)
    blocks = _build_blocks(model, selection, _adapter_tensors(found))
    if not any(b.role in ("lora_A", "lora_B") for b in blocks):
        raise LoRAValidationError(
            f"Adapter {chosen!r} has no lora_A/lora_B tensor in this model; check target_modules."
        )
    _warn_large_dense_blocks(blocks)
    return LoRABlocks(adapter_name=chosen, blocks=tuple(blocks))


#: ``modules_to_save`` copies holding more than this many times the LoRA tensors' parameters are warned about.
DENSE_BLOCK_RATIO = 4.0


def _warn_large_dense_blocks(blocks: Sequence[GradientBlock]) -> None:
    """Warn when the ``modules_to_save`` copies (full modules trained densely, e.g. a TRL run's
    ``modules_to_save=["lm_head", "embed_tokens"]``) outweigh the LoRA tensors: they are kept as dense
    blocks, so each example's gradient holds every one of their parameters."""
    lora = sum(b.numel for b in blocks if b.role in ("lora_A", "lora_B"))
    dense = [b for b in blocks if b.role == "modules_to_save"]
    n_dense = sum(b.numel for b in dense)
    if not dense or n_dense <= DENSE_BLOCK_RATIO * lora:
        return
    modules = sorted({b.module_name.split(".modules_to_save.")[0].rsplit(".", 1)[-1] for b in dense})
    logger.warning(
        "The adapter's modules_to_save (%s) are full modules, not LoRA blocks: their %s parameters are "
        "differentiated as dense blocks, %.1fx the %s LoRA parameters (%.1f MB per example in float32). Fine for a "
        "small head; for an lm_head or embeddings of a large model, retrain without them in modules_to_save, or "
        "project the gradients.",
        ", ".join(modules),
        f"{n_dense:,}",
        n_dense / max(lora, 1),
        f"{lora:,}",
        4 * (n_dense + lora) / 2**20,
    )


def model_fingerprint(model: nn.Module, blocks: LoRABlocks) -> str:
    """A short hash identifying base model + adapter: names, shapes and dtypes of every parameter,
    plus the bytes of the block tensors (the adapter weights and trainable heads).

    The base weights' values are not hashed (too slow for large models); two base models with the
    same architecture but different weights therefore get the same fingerprint unless their adapters
    differ.
    """
    digest = hashlib.sha256()
    for name, p in model.named_parameters():
        digest.update(f"{name}|{tuple(p.shape)}|{p.dtype}\n".encode())
    digest.update(f"adapter={blocks.adapter_name}\n".encode())
    for block in blocks:
        data = block.parameter.detach().to("cpu").contiguous()
        digest.update(block.name.encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()[:16]


def _non_reentrant(module: nn.Module) -> bool:
    """Whether ``module``'s activation checkpointing is non-reentrant (``torch.utils.checkpoint`` with
    ``use_reentrant=False``, the default transformers sets): its first forward pass runs with autograd, so
    the hooks see the activations they differentiate, and the recomputation in the backward pass only
    replaces saved tensors. Unknown checkpoint functions count as reentrant."""
    func = getattr(module, "_gradient_checkpointing_func", None)
    keywords = getattr(func, "keywords", None)
    return (
        isinstance(keywords, dict)
        and keywords.get("use_reentrant") is False
        and getattr(func, "func", None) is torch.utils.checkpoint.checkpoint
    )


def _hf_checkpoint_layer(module: nn.Module) -> bool:
    """A transformers ``GradientCheckpointingLayer``: it checkpoints only while ``module.training``."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # older transformers: no such layer class
        return False
    return isinstance(module, GradientCheckpointingLayer)


@contextmanager
def gradient_mode(model: nn.Module, blocks: LoRABlocks | Sequence[GradientBlock]) -> Iterator[None]:
    """Put ``model`` in eval mode (LoRA dropout and all other dropout off), switch ``requires_grad`` on
    for the block tensors; restore every module's previous train/eval and checkpointing flags and every
    tensor's previous ``requires_grad`` on exit, also when the body raises.

    Activation checkpointing: *non-reentrant* checkpointing (``use_reentrant=False``, transformers'
    default for ``gradient_checkpointing_enable()``) is kept on, so large models keep its memory savings:
    the hooks record each LoRA module's input and output in the first forward pass, which runs with
    autograd, and the backward pass only recomputes saved tensors (the same gradients; tested). The
    checkpointed transformers layers stay flagged ``training`` (they checkpoint only in training
    mode) while everything inside them, dropout included, is in eval mode. *Reentrant* (or unknown)
    checkpointing runs its first forward pass without autograd, which the hooks cannot see, so it is
    switched off while gradients are taken (logged; lower the batch size if memory runs short).

    Gradients are taken at the fine-tuned weights with the model in eval mode (docs/gradients.md section 1).
    The switch is logged at INFO level.
    """
    modes = [(m, m.training) for m in model.modules()]
    grads = [(b.parameter, b.parameter.requires_grad) for b in blocks]
    # reentrant activation checkpointing runs the first forward pass under no_grad (diffusers does so even in
    # eval mode): the hooks would see only the recomputed activations; non-reentrant checkpointing is kept
    flagged = [m for m in model.modules() if getattr(m, "gradient_checkpointing", None) is True]
    kept = [m for m in flagged if _non_reentrant(m)]
    checkpointed = [m for m in flagged if not _non_reentrant(m)]
    n_train = sum(1 for _, t in modes if t)
    logger.info(
        "Taking gradients in eval mode (LoRA dropout and all other dropout off)%s.",
        f"; {n_train} modules were in training mode and are restored afterwards" if n_train else "",
    )
    if checkpointed:
        logger.info(
            "Turning reentrant gradient checkpointing off on %d modules while taking gradients (restored "
            "afterwards; enable it with gradient_checkpointing_kwargs={'use_reentrant': False} to keep it on); lower "
            "batch_size if memory runs short.",
            len(checkpointed),
        )
    if kept:
        logger.info(
            "Keeping non-reentrant gradient checkpointing on for %d modules (activations recomputed in the backward "
            "pass; the same gradients).",
            len(kept),
        )
    turned_on = [p for p, flag in grads if not flag]
    if turned_on:
        logger.info(
            "Enabling requires_grad on %d adapter tensors for the duration of gradient collection.", len(turned_on)
        )
    try:
        model.eval()
        for m in kept:
            if _hf_checkpoint_layer(m):
                m.training = True  # the layer's own flag only: its submodules (dropout) stay in eval mode
        for p in turned_on:
            p.requires_grad_(True)
        for m in checkpointed:
            # torch types nn.Module.__setattr__ for tensors and modules only; a plain flag is fine at runtime
            m.gradient_checkpointing = False  # type: ignore[assignment]
        yield
    finally:
        for m in checkpointed:
            m.gradient_checkpointing = True  # type: ignore[assignment]  # see above: Module.__setattr__ stub
        for m, was_training in modes:
            m.training = was_training
        for p, flag in grads:
            p.requires_grad_(flag)

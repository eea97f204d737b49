"""Load a user's diffusers text-to-image pipeline folder and the LoRA they trained on its UNet.

The pipeline is a local folder written by ``StableDiffusionPipeline.save_pretrained`` (or downloaded
from the hub elsewhere and copied here): ``model_index.json`` and the sub-folders ``unet/``, ``vae/``,
``text_encoder/``, ``tokenizer/`` and ``scheduler/``. The LoRA may be in any of the formats diffusers
and peft write (:func:`lora_format` tells them apart by their keys):

* ``"diffusers"``: ``pytorch_lora_weights.safetensors`` from ``train_text_to_image_lora.py`` /
  ``StableDiffusionPipeline.save_lora_weights``, keys ``unet.<module>.lora.down.weight`` /
  ``lora.up.weight`` (older) or ``unet.<module>.lora_A.weight`` / ``lora_B.weight``, possibly with
  ``text_encoder.`` keys;
* ``"unet"``: the same file written by ``unet.save_lora_adapter`` (keys without the ``unet.`` prefix);
* ``"kohya"``: kohya-ss / A1111 files (``lora_unet_<module>.lora_down.weight`` with ``.alpha``),
  converted by diffusers;
* ``"peft"``: a peft adapter folder on the UNet (``adapter_config.json`` + ``adapter_model.safetensors``
  with ``base_model.model.`` keys), e.g. from ``get_peft_model(unet, LoraConfig(...)).save_pretrained``.

The LoRA ends up as a peft adapter named ``"default"`` on the UNet (``lora_A`` / ``lora_B``
modules, the layout :func:`datainf.gradients.find_lora_blocks` hooks). Every tensor's shape is
checked against the UNet module it targets first: a LoRA trained on another UNet raises one
:class:`LoRAMismatchError` naming the modules that do not fit. A LoRA on the text encoder is applied
(the pipeline generates with it) but its tensors are not differentiated (logged).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from datainf.errors import DataInfError

__all__ = [
    "PipelineLoadError",
    "LoRAMismatchError",
    "LoadedPipeline",
    "PIPELINE_COMPONENTS",
    "LORA_WEIGHT_NAME",
    "resolve_pipeline_dir",
    "lora_format",
    "read_lora_state",
    "load_pipeline",
    "load_lora",
]

logger = logging.getLogger(__name__)

#: The sub-folders a Stable-Diffusion-shaped pipeline folder must hold.
PIPELINE_COMPONENTS: tuple[str, ...] = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")

#: The file name ``save_lora_weights`` and ``save_lora_adapter`` write.
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"

_ADAPTER = "default"
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}
# the key suffixes of a LoRA tensor -> which factor it is ("down" = A: (r, in), "up" = B: (out, r))
_SUFFIXES: tuple[tuple[str, str], ...] = (
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    (".lora_down.weight", "down"),
    (".lora_up.weight", "up"),
)
_PEFT_PREFIX = "base_model.model."


class PipelineLoadError(DataInfError, ValueError):
    """A pipeline folder or LoRA cannot be loaded (missing, not a pipeline, unknown LoRA format, ...)."""


class LoRAMismatchError(PipelineLoadError):
    """The LoRA does not fit the pipeline's UNet (shapes, or modules the UNet does not have)."""


@dataclass
class LoadedPipeline:
    """A loaded diffusers pipeline with its LoRA on the UNet.

    Attributes:
        pipeline: the ``DiffusionPipeline`` (``StableDiffusionPipeline`` for SD 1.x / 2.x folders).
        folder: the pipeline folder.
        lora: the LoRA file or folder loaded onto the UNet (``None``: none).
        lora_format: ``"diffusers"``, ``"unet"``, ``"kohya"`` or ``"peft"`` (see the module docstring).
    """

    pipeline: Any
    folder: Path
    lora: Path | None = None
    lora_format: str | None = None

    @property
    def unet(self) -> nn.Module:
        """The UNet (a ``UNet2DConditionModel``), carrying the LoRA."""
        unet: nn.Module = self.pipeline.unet
        return unet

    @property
    def vae(self) -> nn.Module:
        """The ``AutoencoderKL`` (images -> latents)."""
        vae: nn.Module = self.pipeline.vae
        return vae

    @property
    def text_encoder(self) -> nn.Module:
        """The text encoder (e.g. ``CLIPTextModel``)."""
        encoder: nn.Module = self.pipeline.text_encoder
        return encoder

    @property
    def tokenizer(self) -> Any:
        """The text encoder's tokenizer."""
        return self.pipeline.tokenizer

    @property
    def scheduler(self) -> Any:
        """The pipeline's (sampling) scheduler."""
        return self.pipeline.scheduler

    @property
    def resolution(self) -> int:
        """Image side in pixels the UNet is made for: ``unet.config.sample_size * vae_scale_factor``."""
        size = self.pipeline.unet.config.sample_size
        size = size if isinstance(size, int) else size[0]
        return int(size) * int(getattr(self.pipeline, "vae_scale_factor", 8))

    def training_scheduler(self) -> Any:
        """A ``DDPMScheduler`` with the pipeline scheduler's config (same betas, same ``prediction_type``):
        the noise schedule of the denoising loss, as ``train_text_to_image_lora.py`` builds it."""
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_config(self.pipeline.scheduler.config)


def resolve_pipeline_dir(path: str | os.PathLike[str]) -> Path:
    """The local pipeline folder, checked to hold ``model_index.json`` and :data:`PIPELINE_COMPONENTS`.

    Raises:
        PipelineLoadError: the path does not exist (a hub id while offline), is a file, a lone UNet /
            LoRA folder, or lacks components (all missing ones named).
    """
    name = os.fspath(path)
    folder = Path(name).expanduser()
    if not folder.exists():
        raise PipelineLoadError(
            f"Pipeline {name!r} is not a folder on this machine. datainf works offline: pass the local folder written "
            "by pipeline.save_pretrained(...) (for a hub id, download it where there is network and copy it here)."
        )
    if not folder.is_dir():
        raise PipelineLoadError(f"Pipeline {name!r} is a file; pass the folder holding model_index.json.")
    if not (folder / "model_index.json").is_file():
        hint = ""
        if (folder / LORA_WEIGHT_NAME).is_file() or (folder / "adapter_config.json").is_file():
            hint = (
                " It holds a LoRA: pass it as the adapter (--adapter) and the pipeline folder as the model (--model)."
            )
        elif (folder / "config.json").is_file():
            hint = " It holds a single model (a UNet?); pass the whole pipeline folder, the one with model_index.json."
        raise PipelineLoadError(f"{name!r} holds no model_index.json, so it is not a diffusers pipeline folder.{hint}")
    missing = [c for c in PIPELINE_COMPONENTS if not (folder / c).is_dir()]
    if missing:
        raise PipelineLoadError(
            f"The pipeline folder {name!r} lacks the component folder(s) {missing}; a Stable-Diffusion-shaped pipeline "
            f"needs {list(PIPELINE_COMPONENTS)}. Save the complete pipeline with pipeline.save_pretrained(...)."
        )
    return folder


def _lora_file(path: Path) -> tuple[Path, str | None]:
    """``(safetensors file, "peft" or None)`` of a LoRA file or folder."""
    if path.is_file():
        if path.suffix != ".safetensors":
            raise PipelineLoadError(
                f"The LoRA {path} is not a .safetensors file; datainf reads safetensors LoRA files only (pickled .bin "
                "files can run code). Convert it with safetensors.torch.save_file."
            )
        return path, None
    if (path / "adapter_config.json").is_file():
        weights = path / "adapter_model.safetensors"
        if not weights.is_file():
            raise PipelineLoadError(f"The peft adapter folder {path} holds no adapter_model.safetensors.")
        return weights, "peft"
    if (path / LORA_WEIGHT_NAME).is_file():
        return path / LORA_WEIGHT_NAME, None
    found = sorted(p.name for p in path.glob("*.safetensors"))
    if len(found) == 1:
        return path / found[0], None
    raise PipelineLoadError(
        f"The LoRA folder {path} holds neither {LORA_WEIGHT_NAME} nor a peft adapter (adapter_config.json)"
        + (f"; it has several .safetensors files {found}: pass the one to load." if found else ".")
    )


def read_lora_state(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], str]:
    """The LoRA tensors of a file or folder and their format (see :func:`lora_format`).

    Raises:
        PipelineLoadError: no such file / folder, not safetensors, no LoRA keys, unknown key layout.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    where = Path(os.fspath(path)).expanduser()
    if not where.exists():
        raise PipelineLoadError(
            f"The LoRA {os.fspath(path)!r} does not exist; pass the file or folder the training wrote."
        )
    weights, kind = _lora_file(where)
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as err:
        raise PipelineLoadError(f"The LoRA file {weights} cannot be read as safetensors ({err}).") from err
    if kind == "peft":
        return state, "peft"
    return state, _key_format(state, weights)


def _key_format(state: Mapping[str, torch.Tensor], where: Path) -> str:
    keys = list(state)
    if not keys or not any("lora" in k for k in keys):
        raise PipelineLoadError(f"The file {where} holds no LoRA tensors (no key contains 'lora').")
    if any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_")) for k in keys):
        return "kohya"
    if any(k.startswith(_PEFT_PREFIX) for k in keys):
        return "peft"
    if any(k.startswith(("unet.", "text_encoder.")) for k in keys):
        return "diffusers"
    if all(any(k.endswith(s) for s, _ in _SUFFIXES) or k.endswith(".alpha") for k in keys):
        return "unet"
    raise PipelineLoadError(
        f"The LoRA file {where} has keys in no format datainf reads (e.g. {keys[:3]}); expected diffusers "
        "('unet.<module>.lora.down.weight' / 'lora_A.weight'), kohya ('lora_unet_<module>.lora_down.weight') or "
        "peft ('base_model.model.<module>.lora_A.weight') keys."
    )


def lora_format(path: str | os.PathLike[str]) -> str:
    """``"diffusers"``, ``"unet"``, ``"kohya"`` or ``"peft"``: the layout of the LoRA at ``path``."""
    return read_lora_state(path)[1]


def _split_key(key: str) -> tuple[str, str] | None:
    """``(module path, "down" | "up")`` of a LoRA weight key without prefix, ``None`` for other keys."""
    for suffix, factor in _SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], factor
    return None


def _module_dims(module: nn.Module) -> tuple[int, int] | None:
    """``(in, out)`` features of a Linear / Conv2d, ``None`` for other modules."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, nn.Conv2d):
        return module.in_channels, module.out_channels
    return None


def _check_fits(unet: nn.Module, state: Mapping[str, torch.Tensor], where: Path) -> int:
    """Check UNet LoRA tensors (keys without prefix) against the UNet's modules; returns how many there are.

    Raises:
        LoRAMismatchError: one message listing every module that is absent or whose shape differs.
    """
    modules = dict(unet.named_modules())
    problems: list[str] = []
    count = 0
    for key, tensor in state.items():
        split = _split_key(key)
        if split is None:
            continue
        count += 1
        name, factor = split
        module = modules.get(name)
        dims = _module_dims(module) if module is not None else None
        if module is None:
            problems.append(f"{name}: no such module in the UNet")
            continue
        if dims is None:
            problems.append(f"{name}: a {type(module).__name__}, not a Linear or Conv2d")
            continue
        want, got = (dims[0], int(tensor.shape[1])) if factor == "down" else (dims[1], int(tensor.shape[0]))
        if want != got:
            side = "in" if factor == "down" else "out"
            problems.append(f"{name}: the LoRA's {side} size is {got}, the UNet's is {want}")
    if problems:
        shown = "; ".join(sorted(set(problems))[:5])
        more = len(set(problems)) - 5
        raise LoRAMismatchError(
            f"The LoRA {where} does not fit this pipeline's UNet ({len(set(problems))} problem(s): {shown}"
            + (f" and {more} more" if more > 0 else "")
            + "). It was trained on another base model: pass the pipeline it was trained on (--model)."
        )
    return count


def _count_lora(unet: nn.Module) -> int:
    return sum(1 for name, _ in unet.named_parameters() if ".lora_A." in name or ".lora_B." in name)


def load_lora(pipeline: Any, path: str | os.PathLike[str]) -> str:
    """Load the LoRA at ``path`` onto ``pipeline.unet`` as the peft adapter ``"default"``; returns its format.

    Args:
        pipeline: a diffusers pipeline with ``unet`` (and ``text_encoder``, ``load_lora_weights``).
        path: a LoRA file, a folder holding :data:`LORA_WEIGHT_NAME`, or a peft adapter folder.

    Raises:
        PipelineLoadError: unreadable or unknown LoRA; the UNet already carries an adapter.
        LoRAMismatchError: the LoRA does not fit the UNet.
    """
    where = Path(os.fspath(path)).expanduser()
    state, fmt = read_lora_state(where)
    unet = pipeline.unet
    if _count_lora(unet):
        raise PipelineLoadError("The pipeline's UNet already carries a LoRA adapter; load the pipeline afresh.")
    if fmt == "peft":
        expected = _load_peft_adapter(unet, where, state)
    else:
        weights, _ = _lora_file(where)
        if fmt == "kohya":
            expected = 2 * sum(1 for k in state if k.startswith("lora_unet_") and k.endswith(".lora_down.weight"))
        else:
            unet_state = state if fmt == "unet" else {k[5:]: v for k, v in state.items() if k.startswith("unet.")}
            expected = _check_fits(unet, unet_state, where)
        try:  # from the file, so that diffusers reads the LoRA metadata (lora_alpha) in its header
            if fmt == "unet":
                unet.load_lora_adapter(
                    str(weights.parent),
                    weight_name=weights.name,
                    prefix=None,
                    adapter_name=_ADAPTER,
                    use_safetensors=True,
                )
            else:
                pipeline.load_lora_weights(str(weights.parent), weight_name=weights.name, adapter_name=_ADAPTER)
        except (ValueError, RuntimeError, KeyError, OSError) as err:
            raise LoRAMismatchError(
                f"The {fmt} LoRA {where} cannot be loaded onto this pipeline's UNet "
                f"({str(err).splitlines()[0][:300]}); pass the pipeline it was trained on."
            ) from err
    loaded = _count_lora(unet)
    if loaded == 0 or loaded < expected:
        raise LoRAMismatchError(
            f"Only {loaded} of the {expected} UNet LoRA tensors of {where} found a place in the UNet; it was trained on "
            "another base model, or its keys are in a layout datainf does not know."
        )
    if any(k.startswith(("text_encoder.", "lora_te_", "lora_te1_")) for k in state):
        logger.warning(
            "The LoRA %s also adapts the text encoder: it is applied, but only the UNet's LoRA tensors are "
            "differentiated.",
            where,
        )
    return fmt


def _load_peft_adapter(unet: nn.Module, where: Path, state: Mapping[str, torch.Tensor]) -> int:
    """Inject a peft adapter folder's LoraConfig into ``unet`` and load its tensors; returns their count."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    folder = where if where.is_dir() else where.parent
    try:
        raw = json.loads((folder / "adapter_config.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise PipelineLoadError(f"{folder / 'adapter_config.json'} is unreadable ({err}).") from err
    if str(raw.get("peft_type", "LORA")).upper() != "LORA":
        raise PipelineLoadError(
            f"The adapter {folder} is a {raw.get('peft_type')} adapter; only LoRA adapters can be differentiated."
        )
    stripped = {k[len(_PEFT_PREFIX) :] if k.startswith(_PEFT_PREFIX) else k: v for k, v in state.items()}
    expected = _check_fits(unet, stripped, folder)
    config = LoraConfig.from_pretrained(str(folder))
    config.inference_mode = True
    try:
        inject_adapter_in_model(config, unet, adapter_name=_ADAPTER)
        result = set_peft_model_state_dict(unet, stripped, adapter_name=_ADAPTER)
    except (ValueError, RuntimeError) as err:
        raise LoRAMismatchError(f"The peft adapter {folder} does not fit the UNet ({str(err)[:300]}).") from err
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if unexpected:
        raise LoRAMismatchError(
            f"{len(unexpected)} tensor(s) of the peft adapter {folder} found no place in the UNet (e.g. {unexpected[:3]})."
        )
    return expected


def load_pipeline(
    path: str | os.PathLike[str],
    *,
    lora: str | os.PathLike[str] | None = None,
    device: str = "cpu",
    dtype: str = "float32",
) -> LoadedPipeline:
    """Load a local diffusers pipeline folder (offline) and optionally a LoRA onto its UNet.

    Args:
        path: the folder written by ``pipeline.save_pretrained`` (see :func:`resolve_pipeline_dir`).
        lora: a LoRA in one of the formats of the module docstring.
        device: where to put every component.
        dtype: ``float32`` (default), ``float64``, ``bfloat16`` or ``float16`` for every component.

    Returns:
        A :class:`LoadedPipeline`, every component in eval mode with ``requires_grad`` off (the
        gradient collector switches it on for the LoRA tensors).

    Raises:
        PipelineLoadError: not a pipeline folder, unreadable components, unknown dtype.
        LoRAMismatchError: the LoRA does not fit the UNet.
    """
    folder = resolve_pipeline_dir(path)
    torch_dtype = _DTYPES.get(dtype)
    if torch_dtype is None:
        raise PipelineLoadError(f"Unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}.")
    try:
        from diffusers import DiffusionPipeline
    except ImportError as err:  # pragma: no cover - extra missing
        raise PipelineLoadError(
            'Loading a diffusers pipeline needs diffusers: pip install "datainf[diffusion]".'
        ) from err
    index = json.loads((folder / "model_index.json").read_text())
    kwargs: dict[str, Any] = {"local_files_only": True, "dtype": torch_dtype}
    if "safety_checker" in index:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    try:
        pipeline = DiffusionPipeline.from_pretrained(str(folder), **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise PipelineLoadError(
            f"Loading the pipeline in {folder} failed ({type(err).__name__}: {str(err).splitlines()[0][:300]})."
        ) from err
    if not hasattr(pipeline, "load_lora_weights") and lora is not None:
        raise PipelineLoadError(f"The {type(pipeline).__name__} in {folder} cannot load LoRA weights.")
    for name in ("unet", "vae", "text_encoder"):
        component = getattr(pipeline, name)
        component.requires_grad_(False)
        component.eval()
    fmt = load_lora(pipeline, lora) if lora is not None else None
    pipeline.to(device)
    pipeline.set_progress_bar_config(disable=True)
    loaded = LoadedPipeline(
        pipeline=pipeline, folder=folder, lora=Path(os.fspath(lora)) if lora is not None else None, lora_format=fmt
    )
    logger.info("Loaded the pipeline %s%s.", folder, f" with the {fmt} LoRA {lora}" if lora is not None else "")
    return loaded

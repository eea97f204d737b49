"""Diffusion: the denoising loss of a diffusers UNet at fixed timesteps, noise seeded by the example
(docs/gradients.md section 4.4)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from datainf.errors import ConfigError, TaskInputError
from datainf.tasks.base import _MAX_LISTED, GradientTask, TaskBatch, _list_ids, _model_config, _tokenizer_limit, _upcast

__all__ = [
    "DiffusionTaskConfig",
    "DiffusionTask",
    "DEFAULT_DIFFUSION_TIMESTEPS",
    "example_seed",
    "TextToImageTaskConfig",
    "TextToImageTask",
    "text_to_image_task",
    "load_text_to_image",
    "read_text_to_image_records",
]

DEFAULT_DIFFUSION_TIMESTEPS: tuple[int, ...] = (25, 225, 425, 525, 725, 925)
"""The six timesteps (of 1000) of the DataInf authors' diffusion notebook."""


@dataclass
class DiffusionTaskConfig:
    """Knobs of :class:`DiffusionTask`.

    Attributes:
        timesteps: the fixed diffusion timesteps at which the denoising loss is taken (default: the
            DataInf notebook's 25, 225, 425, 525, 725, 925 of 1000).
        seed: base seed of the per-example noise (combined with the example id).
        image_field: record key of the image; records may also hold ``"image"`` (PIL / uint8 array),
            ``"pixel_values"`` (tensor (C, H, W) in [-1, 1]) or ``"latents"`` (tensor (c, h, w), used as is).
        prompt_field: record key of the prompt (``"caption"`` is accepted too); needs ``text_encoder``
            and ``tokenizer``. Records may instead hold ``"encoder_hidden_states"`` (tensor (L, D)).
        class_field: record key of the class label for class-conditional UNets.
        prompt_max_length: prompts are padded/truncated to this many tokens (fixed, so that the
            cross-attention context does not depend on the batch). ``None``: the tokenizer's limit.
        timestep_blocks: keep each timestep's gradient as its own block ``"<block>@t<t>"`` (default),
            so that the block-diagonal Hessian of DataInf / Exact / LiSSA has one block per
            (tensor, timestep); ``False``: one block per tensor holding the mean over the timesteps.
    """

    timesteps: tuple[int, ...] = DEFAULT_DIFFUSION_TIMESTEPS
    seed: int = 0
    image_field: str = "pixel_values"
    prompt_field: str = "prompt"
    class_field: str = "class_label"
    prompt_max_length: int | None = None
    timestep_blocks: bool = True

    def __post_init__(self) -> None:
        self.timesteps = tuple(int(t) for t in self.timesteps)
        if not self.timesteps:
            raise ConfigError(
                "timesteps is empty; give at least one diffusion timestep (e.g. (25, 225, 425, 525, 725, 925))."
            )
        if any(t < 0 for t in self.timesteps) or len(set(self.timesteps)) != len(self.timesteps):
            raise ConfigError(f"timesteps={self.timesteps} must be distinct non-negative integers.")
        if self.prompt_max_length is not None and self.prompt_max_length < 1:
            raise ConfigError(f"prompt_max_length={self.prompt_max_length} must be positive (or None).")


def example_seed(seed: int, example_id: str) -> int:
    """Deterministic 63-bit seed for one example's noise (independent of its batch)."""
    digest = hashlib.sha256(f"{seed}\x00{example_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _to_pixels(value: Any, ex_id: str) -> torch.Tensor:
    """An image as a float tensor (C, H, W) in [-1, 1]."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu()
        if t.dtype == torch.uint8:
            t = t.float() / 127.5 - 1.0
        return t.float() if t.dim() == 3 else t.float().unsqueeze(0)
    try:
        import numpy as np

        arr = np.asarray(value)
    except Exception as err:  # pragma: no cover - exotic inputs
        raise TaskInputError(f"Example {ex_id!r}: the image cannot be read as an array ({err}).") from err
    if arr.dtype == np.uint8:
        arr = arr.astype(np.float32) / 127.5 - 1.0
    else:
        arr = arr.astype(np.float32) * 2.0 - 1.0  # float images are taken to be in [0, 1]
    if arr.ndim == 2:
        arr = arr[None]
    elif arr.ndim == 3:
        arr = arr.transpose(2, 0, 1)  # (H, W, C) -> (C, H, W)
    else:
        raise TaskInputError(f"Example {ex_id!r}: the image has shape {arr.shape}; expected (H, W) or (H, W, C).")
    return torch.from_numpy(np.ascontiguousarray(arr))


class DiffusionTask(GradientTask):
    """Denoising loss of a diffusers UNet at fixed timesteps with per-example seeded noise.

    For example ``i`` with clean sample ``x0`` (VAE latents, or pixels when no VAE is given), timesteps
    ``t_1..t_T`` (:attr:`DiffusionTaskConfig.timesteps`) and noise ``eps_it ~ N(0, I)`` drawn from a
    generator seeded by ``(config.seed, id_i)``:

        l_i = (1/T) sum_t  mean_{c,h,w} ( unet(add_noise(x0, eps_it, t), t, cond_i) - target_it )^2

    where ``target`` is ``eps`` (``prediction_type="epsilon"``), the velocity (``"v_prediction"``) or
    ``x0`` (``"sample"``), following the scheduler's config. Reduction rule: mean over pixels/latent
    entries, then mean over the timesteps. Noise and timesteps depend only on the example, so its
    gradient is deterministic and independent of its batch. The ``T`` timesteps run as ``b*T`` rows
    of one forward pass (memory grows with ``T``; lower the batch size if needed).

    Gradient blocks (:attr:`DiffusionTaskConfig.timestep_blocks`): by default each timestep keeps
    its own block, ``"<block>@t<t>"`` holding ``(1/T) grad mse_it`` (the ``T`` blocks of a tensor sum
    to ``grad l_i``). This is the DataInf notebook's concatenation of the ``T`` gradients, with each
    timestep a block of the block-diagonal Hessian approximation. The gradient norm fell 20-40x from
    t = 25 to t = 925 in our style and subject experiments (a known bias of diffusion influence), so
    in one mean gradient the smallest timesteps drown the rest; a block per timestep lets DataInf's
    per-block damping and inverse weigh each timestep on its own scale. With
    ``timestep_blocks=False`` each block is the mean over the timesteps.

    Conditioning: ``UNet2DConditionModel`` gets ``encoder_hidden_states`` from the record or from
    ``text_encoder(tokenizer(prompt, padding="max_length"))`` (run without gradients);
    ``UNet2DModel`` with class embeddings gets ``class_labels``.

    Args:
        noise_scheduler: the diffusers scheduler the model was trained with (``add_noise``,
            ``config.num_train_timesteps``, ``config.prediction_type``), e.g. ``DDPMScheduler``.
        config: a :class:`DiffusionTaskConfig`.
        vae: an ``AutoencoderKL`` for latent diffusion; images are encoded to the latent mean (no
            sampling), times ``vae.config.scaling_factor``. ``None``: pixel-space model.
        text_encoder: text encoder for prompts (e.g. CLIP); its output ``[0]`` is the context.
        tokenizer: its tokenizer.
    """

    def __init__(
        self,
        noise_scheduler: Any,
        config: DiffusionTaskConfig | None = None,
        *,
        vae: nn.Module | None = None,
        text_encoder: nn.Module | None = None,
        tokenizer: Any = None,
    ) -> None:
        if not hasattr(noise_scheduler, "add_noise"):
            raise ConfigError(
                f"noise_scheduler is a {type(noise_scheduler).__name__} without add_noise(); pass the diffusers "
                "scheduler the model was trained with, e.g. DDPMScheduler.from_pretrained(path, subfolder='scheduler')."
            )
        self.noise_scheduler = noise_scheduler
        self.config = config or DiffusionTaskConfig()
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self._num_classes: int | None = None
        sched_cfg = getattr(noise_scheduler, "config", {})
        self._num_train_timesteps = int(_cfg_get(sched_cfg, "num_train_timesteps", 1000))
        self._prediction_type = str(_cfg_get(sched_cfg, "prediction_type", "epsilon"))
        if self._prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ConfigError(
                f"Unsupported prediction_type {self._prediction_type!r}; use epsilon, v_prediction or sample."
            )
        too_big = [t for t in self.config.timesteps if t >= self._num_train_timesteps]
        if too_big:
            raise ConfigError(
                f"timesteps {too_big} are outside the scheduler's range [0, {self._num_train_timesteps}); pick smaller ones."
            )

    def describe(self) -> str:
        sched_cfg = getattr(self.noise_scheduler, "config", {})
        keys = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type")
        sched = json.dumps({k: _cfg_get(sched_cfg, k, None) for k in keys}, sort_keys=True, default=str)
        encoder = None
        if self.text_encoder is not None:
            encoder = (
                getattr(getattr(self.text_encoder, "config", None), "_name_or_path", None)
                or type(self.text_encoder).__name__
            )
        return (
            f"{super().describe()}|scheduler={type(self.noise_scheduler).__name__}{sched}"
            f"|vae={self.vae is not None}|text_encoder={encoder}"
        )

    def row_labels(self) -> tuple[str, ...]:
        """``("t25", "t225", ...)`` with :attr:`DiffusionTaskConfig.timestep_blocks`, else ``()``."""
        return tuple(f"t{t}" for t in self.config.timesteps) if self.config.timestep_blocks else ()

    def setup(self, model: nn.Module) -> None:
        cfg = _model_config(model)
        n = _cfg_get(cfg, "num_class_embeds", None) if cfg is not None else None
        self._num_classes = int(n) if n else None

    def _image(self, example: Mapping[str, Any], ex_id: str) -> tuple[str, torch.Tensor]:
        if "latents" in example:
            t = example["latents"]
            return "latents", (t if isinstance(t, torch.Tensor) else torch.as_tensor(t)).float()
        for key in (self.config.image_field, "pixel_values", "image"):
            if key in example:
                return "pixel_values", _to_pixels(example[key], ex_id)
        raise TaskInputError(
            f"Example {ex_id!r} has no image: give {self.config.image_field!r}, 'pixel_values', 'image' or 'latents'."
        )

    def _prompt(self, example: Mapping[str, Any]) -> str | None:
        for key in (self.config.prompt_field, "caption"):
            if key in example and example[key] is not None:
                return str(example[key])
        return None

    def validate(self, examples: Sequence[Mapping[str, Any]], ids: Sequence[str]) -> None:
        """Every example needs an image; a prompt needs a text encoder; class labels must be in range."""
        problems: list[str] = []
        bad: list[str] = []
        for ex, ex_id in zip(examples, ids):
            problem = None
            if not any(k in ex for k in ("latents", self.config.image_field, "pixel_values", "image")):
                problem = f"{ex_id!r}: no image"
            elif (
                self._prompt(ex) is not None
                and "encoder_hidden_states" not in ex
                and (self.text_encoder is None or self.tokenizer is None)
            ):
                problem = f"{ex_id!r}: has a prompt but the task has no text_encoder/tokenizer"
            elif self.config.class_field in ex:
                try:
                    label = int(ex[self.config.class_field])
                except (TypeError, ValueError):
                    label = -1
                if label < 0 or (self._num_classes is not None and label >= self._num_classes):
                    problem = f"{ex_id!r}: class label {ex[self.config.class_field]!r} is out of range [0, {self._num_classes})"
            if problem:
                problems.append(problem)
                bad.append(ex_id)
        if problems:
            raise TaskInputError(
                f"{len(bad)} example(s) cannot be used for the diffusion loss: {_list_ids(bad)}."
                + "".join(f"\n  - {p}" for p in problems[:_MAX_LISTED])
                + "\nFix or drop these examples."
            )

    def collate(self, examples: Sequence[Mapping[str, Any]], ids: Sequence[str]) -> TaskBatch:
        """Stack images and conditioning.

        Returns:
            ``inputs``: ``pixel_values`` (b, C, H, W) or ``latents`` (b, c, h, w); optionally
            ``prompt_ids`` (b, L) (fixed length ``L``), ``encoder_hidden_states`` (b, L, D),
            ``class_labels`` (b,).
        """
        ids = [str(i) for i in ids]
        kinds, images = zip(*(self._image(ex, ex_id) for ex, ex_id in zip(examples, ids)))
        if len(set(kinds)) > 1 or len({tuple(im.shape) for im in images}) > 1:
            shapes = {ex_id: tuple(im.shape) for ex_id, im in zip(ids, images)}
            raise TaskInputError(
                f"Examples {_list_ids(ids)} mix image kinds/shapes ({set(kinds)}, {shapes}); resize all images to one "
                "size (and give either pixels or latents for all)."
            )
        inputs: dict[str, Any] = {kinds[0]: torch.stack(list(images))}
        truncated: list[str] = []
        if any("encoder_hidden_states" in ex for ex in examples):
            missing = [i for ex, i in zip(examples, ids) if "encoder_hidden_states" not in ex]
            if missing:
                raise TaskInputError(f"Examples {_list_ids(missing)} lack encoder_hidden_states while others have it.")
            inputs["encoder_hidden_states"] = torch.stack(
                [torch.as_tensor(ex["encoder_hidden_states"]).float() for ex in examples]
            )
        else:
            prompts = [self._prompt(ex) for ex in examples]
            if any(p is not None for p in prompts):
                missing = [i for p, i in zip(prompts, ids) if p is None]
                if missing:
                    raise TaskInputError(f"Examples {_list_ids(missing)} have no prompt while others have one.")
                if self.tokenizer is None or self.text_encoder is None:
                    raise TaskInputError(
                        f"Examples {_list_ids(ids)} have prompts but the task has no text_encoder/tokenizer."
                    )
                length = self.config.prompt_max_length or _tokenizer_limit(self.tokenizer)
                if length is None:
                    raise ConfigError("The tokenizer has no length limit; set DiffusionTaskConfig.prompt_max_length.")
                full = self.tokenizer(list(prompts), truncation=True, max_length=length + 1)["input_ids"]
                truncated = [i for row, i in zip(full, ids) if len(row) > length]
                enc = self.tokenizer(
                    list(prompts), padding="max_length", truncation=True, max_length=length, return_tensors="pt"
                )
                inputs["prompt_ids"] = enc["input_ids"]
        if any(self.config.class_field in ex for ex in examples):
            try:
                inputs["class_labels"] = torch.tensor(
                    [int(ex[self.config.class_field]) for ex in examples], dtype=torch.long
                )
            except (KeyError, TypeError, ValueError) as err:
                raise TaskInputError(
                    f"Examples {_list_ids(ids)}: every example of a class-conditional batch needs an integer "
                    f"{self.config.class_field!r} ({err})."
                ) from err
        return TaskBatch(ids=ids, inputs=inputs, truncated_ids=truncated)

    def per_example_loss(self, model: nn.Module, batch: TaskBatch) -> torch.Tensor:
        """``(b,)`` denoising MSE averaged over the configured timesteps (see the class docstring)."""
        return self.per_row_loss(model, batch).sum(dim=1)

    def per_row_loss(self, model: nn.Module, batch: TaskBatch) -> torch.Tensor:
        """``(b, T)``: ``mse_it / T``, each timestep's share of the example's loss (timesteps in config order)."""
        first = next(model.parameters())
        device, dtype = first.device, first.dtype
        b, n_t = len(batch), len(self.config.timesteps)
        with torch.no_grad():
            if "latents" in batch.inputs:
                x0 = batch.inputs["latents"]
            elif self.vae is not None:
                vae: Any = self.vae  # a diffusers AutoencoderKL: encode() and config are not on nn.Module's type
                px = batch.inputs["pixel_values"].to(device=device, dtype=next(vae.parameters()).dtype)
                x0 = vae.encode(px).latent_dist.mean
                vcfg = vae.config
                x0 = (x0 - (_cfg_get(vcfg, "shift_factor", None) or 0.0)) * _cfg_get(vcfg, "scaling_factor", 1.0)
            else:
                x0 = batch.inputs["pixel_values"]
            context = batch.inputs.get("encoder_hidden_states")
            if context is None and "prompt_ids" in batch.inputs:
                assert self.text_encoder is not None
                context = self.text_encoder(batch.inputs["prompt_ids"].to(device))[0]
        x0 = x0.to(device=device, dtype=dtype)
        shape = tuple(x0.shape[1:])
        noise = torch.stack(
            [
                torch.randn((n_t, *shape), generator=torch.Generator().manual_seed(example_seed(self.config.seed, i)))
                for i in batch.ids
            ]
        ).to(device=device, dtype=dtype)  # (b, T, c, h, w)
        rows = b * n_t  # example-major: rows j*T .. j*T+T-1 belong to example j
        x0_rows = x0.repeat_interleave(n_t, dim=0)
        noise_rows = noise.reshape(rows, *shape)
        t_rows = torch.tensor(self.config.timesteps, dtype=torch.long, device=device).repeat(b)
        noisy = self.noise_scheduler.add_noise(x0_rows, noise_rows, t_rows)
        if self._prediction_type == "epsilon":
            target = noise_rows
        elif self._prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(x0_rows, noise_rows, t_rows)
        else:
            target = x0_rows
        kwargs: dict[str, Any] = {}
        if context is not None:
            kwargs["encoder_hidden_states"] = context.to(device=device, dtype=dtype).repeat_interleave(n_t, dim=0)
        if "class_labels" in batch.inputs:
            labels = batch.inputs["class_labels"]
            if self._num_classes is not None:
                bad = [
                    batch.ids[i] for i in torch.nonzero((labels < 0) | (labels >= self._num_classes)).flatten().tolist()
                ]
                if bad:
                    raise TaskInputError(
                        f"Examples {_list_ids(bad)} have class labels outside [0, {self._num_classes}); fix the labels."
                    )
            kwargs["class_labels"] = labels.repeat_interleave(n_t, dim=0)
        out = model(noisy, t_rows, **kwargs)
        pred = out.sample if hasattr(out, "sample") else out[0]
        err = (_upcast(pred) - _upcast(target)).pow(2).reshape(rows, -1).mean(dim=1)  # (b*T,)
        return err.reshape(b, n_t) / n_t


@dataclass
class TextToImageTaskConfig(DiffusionTaskConfig):
    """Knobs of :class:`TextToImageTask`: those of :class:`DiffusionTaskConfig`, plus how images are sized.

    Attributes:
        resolution: images (PIL) are resized so that their shorter side is ``resolution`` pixels
            (bilinear), then centre-cropped to ``resolution x resolution``, as diffusers'
            ``train_text_to_image_lora.py`` prepares them (``--center_crop``, no flip). ``None``: as
            given (all images must then have one size).
    """

    resolution: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.resolution is not None and self.resolution < 1:
            raise ConfigError(f"resolution={self.resolution} must be positive (or None).")


class TextToImageTask(DiffusionTask):
    """:class:`DiffusionTask` for a user's Stable-Diffusion pipeline: captioned images in, the LoRA UNet's
    denoising loss out.

    The loss is the one of :class:`DiffusionTask` (fixed timesteps, per-example seeded noise, one
    gradient block per timestep), computed through the pipeline's own components: the image is
    resized and centre-cropped to :attr:`TextToImageTaskConfig.resolution`, scaled to [-1, 1] and
    encoded by the pipeline's VAE (latent mean times ``vae.config.scaling_factor``); the caption is
    tokenized by the pipeline's tokenizer to its ``model_max_length`` (77 for CLIP), padded, and
    encoded by its text encoder (last hidden state, as ``StableDiffusionPipeline.encode_prompt``
    without ``clip_skip``). Build it from a loaded pipeline with :func:`text_to_image_task`.
    """

    config: TextToImageTaskConfig

    def __init__(
        self,
        noise_scheduler: Any,
        config: TextToImageTaskConfig | None = None,
        *,
        vae: nn.Module | None = None,
        text_encoder: nn.Module | None = None,
        tokenizer: Any = None,
    ) -> None:
        super().__init__(
            noise_scheduler, config or TextToImageTaskConfig(), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer
        )
        self._describe: str | None = None

    def describe(self) -> str:
        """:meth:`DiffusionTask.describe` with the VAE's and text encoder's identity as a digest of
        their weights (not their folder's path), and the tokenizer's vocabulary size and limit: a
        gradient store records which components made it, wherever the pipeline folder lies."""
        if self._describe is None:
            sched_cfg = getattr(self.noise_scheduler, "config", {})
            keys = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type")
            sched = json.dumps({k: _cfg_get(sched_cfg, k, None) for k in keys}, sort_keys=True, default=str)
            tok = self.tokenizer
            vocab = len(tok) if tok is not None and hasattr(tok, "__len__") else None
            self._describe = (
                f"{GradientTask.describe(self)}|scheduler={type(self.noise_scheduler).__name__}{sched}"
                f"|vae={_weights_digest(self.vae)}|text_encoder={_weights_digest(self.text_encoder)}"
                f"|tokenizer={type(tok).__name__}:{vocab}:{_tokenizer_limit(tok) if tok is not None else None}"
            )
        return self._describe

    def _image(self, example: Mapping[str, Any], ex_id: str) -> tuple[str, torch.Tensor]:
        for key in (self.config.image_field, "pixel_values", "image"):
            value = example.get(key)
            if value is not None and hasattr(value, "convert") and hasattr(value, "size"):  # a PIL image
                return "pixel_values", _to_pixels(_sized(value.convert("RGB"), self.config.resolution), ex_id)
        return super()._image(example, ex_id)


def _weights_digest(module: nn.Module | None) -> str | None:
    """``<class>:<sha256 of every parameter and buffer, 16 hex digits>`` (``None`` without a module)."""
    if module is None:
        return None
    h = hashlib.sha256()
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return f"{type(module).__name__}:{h.hexdigest()[:16]}"


def _sized(image: Any, resolution: int | None) -> Any:
    """Shorter side to ``resolution`` (bilinear), then the centre ``resolution x resolution`` crop."""
    if resolution is None:
        return image
    from PIL import Image

    width, height = image.size
    scale = resolution / min(width, height)
    new = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    if new != (width, height):
        image = image.resize(new, Image.Resampling.BILINEAR)
    left, top = (new[0] - resolution) // 2, (new[1] - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def text_to_image_task(
    pipeline: Any, *, config: TextToImageTaskConfig | None = None, max_length: int | None = None
) -> TextToImageTask:
    """The :class:`TextToImageTask` of a loaded pipeline (:class:`datainf.diffusers_io.LoadedPipeline`).

    Args:
        pipeline: the loaded pipeline: its VAE, text encoder, tokenizer, and a ``DDPMScheduler`` of its
            scheduler's config (the training noise schedule) are used.
        config: the task's settings; ``resolution`` defaults to the pipeline's, ``prompt_max_length``
            to ``max_length`` (``None``: the tokenizer's limit).
        max_length: tokens per prompt when ``config`` is not given.
    """
    if config is None:
        config = TextToImageTaskConfig(prompt_max_length=max_length, resolution=int(pipeline.resolution))
    return TextToImageTask(
        pipeline.training_scheduler(),
        config,
        vae=pipeline.vae,
        text_encoder=pipeline.text_encoder,
        tokenizer=pipeline.tokenizer,
    )


def load_text_to_image(
    base: Any, *, adapter: Any = None, device: str = "cpu", dtype: str = "float32"
) -> tuple[nn.Module, Any]:
    """``(unet with its LoRA, the loaded pipeline)`` of a pipeline folder and LoRA: the ``text-to-image``
    kind's model loader (:func:`datainf.diffusers_io.load_pipeline`)."""
    from datainf.diffusers_io import load_pipeline

    loaded = load_pipeline(base, lora=adapter, device=device, dtype=dtype)
    return loaded.unet, loaded


def read_text_to_image_records(path: Any, columns: Mapping[str, str]) -> list[dict[str, Any]]:
    """The ``text-to-image`` kind's data reader: :func:`datainf.data.images.load_image_records` with the
    ``prompt`` / ``image`` / ``id`` columns of ``columns`` (``--prompt-column``, ``--id-column``)."""
    from datainf.data.images import load_image_records

    return load_image_records(
        path, caption_column=columns.get("prompt"), image_column=columns.get("image"), id_column=columns.get("id")
    )


def _cfg_get(cfg: Any, key: str, default: Any) -> Any:
    if cfg is None:
        return default
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    return getattr(cfg, key, default)

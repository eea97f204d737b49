"""Influence for text-to-image diffusion: which training images drove a LoRA-tuned UNet's generation.

The experiment pipeline (docs/method.md section 13.5, text-to-image, adapted) on the toy stack of
:mod:`datainf.explain.toy_diffusion` (frozen all-MiniLM-L6-v2 prompt encoder, prompts tokenized to
:attr:`TextToImageConfig.prompt_length` tokens; the shipped 32x32 pixel-space base UNet trained as a
DDPM on captioned MNIST digits; DDIM sampling):

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
  classifier-free guidance (:func:`~datainf.explain.toy_diffusion.sample_images`) for a few test prompts.

The base UNet has attention only at 8x8 (plus the mid block), so LoRA on its attention can only
change the image through coarse features: the styles are learnt (the denoising loss on held-out
styled images drops by about 30 %), the subjects (one digit's handwriting per token) only a little.

Sign convention: influence > 0 = harmful (up-weighting the training image raises the test image's
denoising loss); the most helpful training images of a generation have the smallest influence.

The toy stack's names (:class:`PromptEncoder`, :func:`load_base_unet`, :func:`train_base_unet`, ...)
stay importable from this module, and so does :func:`~datainf.explain.generated_images.explain_images`
(a user's own pipeline and LoRA: the generated image beside its most helpful and harmful training images).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from datainf.errors import ConfigError, DatasetError
from datainf.explain.generated_images import ImageExplanation, explain_images, generate_images
from datainf.explain.toy_diffusion import (
    BASE_UNET_CONFIG,
    DEFAULT_BASE_UNET,
    BaseTrainingResult,
    PromptEncoder,
    load_base_unet,
    load_prompt_encoder,
    make_base_unet,
    make_scheduler,
    sample_images,
    train_base_unet,
)
from datainf.explain.toy_diffusion import NUM_TRAIN_TIMESTEPS as _NUM_TRAIN_TIMESTEPS
from datainf.explain.toy_diffusion import check_base_unet as _check_base
from datainf.runs import RunDir
from datainf.settings import DictSettings

__all__ = [
    "TextToImageConfig",
    "run_text_to_image",
    "text_to_image_cache",
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
    "explain_images",
    "generate_images",
    "ImageExplanation",
]

logger = logging.getLogger(__name__)


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
        timesteps: fixed diffusion timesteps of the per-example gradients (docs/gradients.md section 4.4;
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
        methods: influence methods on the same gradients (any registered method).
        normalize: unit-normalise every gradient before scoring (docs/method.md section 5.2).
        self_influence: also score each training example's self-influence with every method
            (``mode="self"``, docs/method.md section 5.1; :attr:`ExplanationResult.self_scores`).
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
    normalize: bool = False
    self_influence: bool = False

    _settings_name = "text-to-image"

    def __post_init__(self) -> None:
        from datainf.methods import available_methods, unknown_methods

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
        unknown = unknown_methods(self.methods)
        if not self.methods or unknown:
            problems.append(f"methods={self.methods}: choose from {sorted(available_methods())}")
        if self.n_samples < 0 or self.sampling_steps < 1 or self.guidance_scale < 0:
            problems.append("n_samples must be >= 0, sampling_steps >= 1, guidance_scale >= 0")
        if self.prompt_length < 2:
            problems.append(f"prompt_length={self.prompt_length} must be >= 2")
        for name in ("normalize", "self_influence"):
            if not isinstance(getattr(self, name), bool):
                problems.append(f"{name}={getattr(self, name)!r} must be True or False")
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
        ``methods``, ``normalize``, ``self_influence``) are left out: they do not change the adapter or the samples, and the gradient
        stores in the folder are named by :meth:`gradient_recipe`."""
        settings = {
            k: v
            for k, v in self.to_dict().items()
            if k not in ("timesteps", "timestep_blocks", "damping", "methods", "normalize", "self_influence")
        }
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


def _cache_key(
    config: TextToImageConfig,
    base_folder: Path,
    train: Sequence[Mapping[str, Any]],
    test: Sequence[Mapping[str, Any]],
    encoder: PromptEncoder,
) -> str:
    """The cache key of a run: :meth:`TextToImageConfig.key` of the base UNet's files, the training and
    test records (ids, prompts, classes, pixels) and the prompt encoder's name and length."""
    return config.key(
        _file_digest(base_folder), _data_digest(train), _data_digest(test), encoder.name, str(encoder.length)
    )


def text_to_image_cache(
    config: TextToImageConfig,
    out_dir: str | os.PathLike[str],
    *,
    key: str,
    base_unet: str | os.PathLike[str],
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


def _class_records(
    records: Sequence[Mapping[str, Any]], dataset: str, class_names: Sequence[str], split: str
) -> list[dict[str, Any]]:
    """Copies of the records with ``"class"`` / ``"class_name"`` from the style or subject fields."""
    index_field, name_field = _CLASS_FIELDS[dataset]
    out: list[dict[str, Any]] = []
    bad: list[str] = []
    for r in records:
        rec = dict(r)
        if "class" not in rec:
            if index_field not in rec:
                bad.append(str(rec.get("id", len(out))))
                continue
            rec["class"] = int(rec[index_field])
        rec.setdefault(
            "class_name",
            rec.get(
                name_field,
                class_names[int(rec["class"])] if int(rec["class"]) < len(class_names) else str(rec["class"]),
            ),
        )
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
        n_subjects=config.n_subjects,
        n_train_per_subject=config.train_per_class,
        n_test_per_subject=config.test_per_class,
        seed=config.seed,
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


def _denoising_losses(
    unet: nn.Module, records: Sequence[Mapping[str, Any]], timesteps: Sequence[int], seed: int
) -> torch.Tensor:
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


def _finetune(
    unet: nn.Module, records: Sequence[Mapping[str, Any]], config: TextToImageConfig, progress: bool
) -> list[float]:
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

        bar = tqdm(
            total=config.train_epochs * math.ceil(n / config.train_batch_size), unit="step", desc="LoRA fine-tune"
        )
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
    from datainf.explain.common import (
        ExplanationResult,
        class_indices,
        needs_factors,
        score_and_evaluate,
        self_influence_scores,
    )
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
            raise DatasetError(
                "The training images cover fewer than two classes; class-detection metrics need two or more."
            )

    with early.timed("encode"):
        encoder = encoder or load_prompt_encoder(length=config.prompt_length)
        base_folder = Path(base_unet_path) if base_unet_path is not None else DEFAULT_BASE_UNET
        base = load_base_unet(base_folder)
        _check_base(base, pixels[:1], encoder)
        too_long = encoder.truncated(sorted({r["prompt"] for r in train + test}))
        if too_long:
            logger.warning(
                "%d prompt(s) exceed %d tokens and are truncated, e.g. %r", len(too_long), encoder.length, too_long[0]
            )
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
            quality["denoising_loss_before"] = float(
                _denoising_losses(base, test, config.eval_timesteps, config.seed + 2).mean()
            )

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
            quality["denoising_loss_after"] = float(
                _denoising_losses(unet, test, config.eval_timesteps, config.seed + 2).mean()
            )
            run.write_json("quality.json", quality)

    with run.timed("samples"):
        generations: dict[str, torch.Tensor] = {}
        if config.n_samples:
            wanted = _sample_ids(test, config.n_samples)

            def sample(path: Path) -> dict[str, torch.Tensor]:
                by_id = {str(r["id"]): r for r in test}
                context = torch.stack([by_id[i]["encoder_hidden_states"] for i in wanted])
                images = sample_images(
                    unet,
                    context,
                    uncond=encoder.encode([""])[0],
                    guidance_scale=config.guidance_scale,
                    steps=config.sampling_steps,
                    seed=config.seed,
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
            split: [
                {
                    "id": str(r["id"]),
                    "pixel_values": r["pixel_values"],
                    "encoder_hidden_states": r["encoder_hidden_states"],
                }
                for r in recs
            ]
            for split, recs in (("train", train), ("test", test))
        }
        stores = {
            split: collect_gradients(
                unet,
                task,
                recs,
                store=run.stage(f"grads-{split}-{config.gradient_recipe()}"),
                batch_size=16,
                progress=progress,
                collect_factors=split == "train" and needs_factors(config.methods),  # kfac / ekfac
            )
            for split, recs in grad_records.items()
        }
        for split, recs in grad_records.items():
            if stores[split].ids != [r["id"] for r in recs]:
                raise DatasetError(
                    f"The cached {split} gradients do not follow the records' order; rerun with recompute=True."
                )

    with run.timed("influence"):
        scores, metrics = score_and_evaluate(
            stores["train"],
            stores["test"],
            class_indices(train),
            class_indices(test),
            methods=config.methods,
            damping=config.damping,
            progress=progress,
            normalize=config.normalize,
        )
        self_scores = (
            self_influence_scores(
                stores["train"],
                methods=config.methods,
                damping=config.damping,
                progress=progress,
                normalize=config.normalize,
            )
            if config.self_influence
            else {}
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
        self_scores=self_scores,
    )

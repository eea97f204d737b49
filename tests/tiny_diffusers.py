"""A tiny random Stable-Diffusion-shaped pipeline and LoRA files in the formats diffusers writes (seconds).

The pipeline: ``UNet2DConditionModel`` (8x8 latents, 4 channels, cross-attention 16), ``AutoencoderKL``
(two blocks, so 16x16 RGB images), ``CLIPTextModel`` (hidden 16, one layer) with a ``CLIPTokenizer``
built from the small vocabulary below (prompts padded to :data:`PROMPT_LENGTH` tokens), and a
``DDPMScheduler``; saved with ``StableDiffusionPipeline.save_pretrained`` (``model_index.json``,
``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

PROMPT_WORDS = ["a", "an", "photo", "image", "of", "in", "style", "cat", "dog", "red", "blue", "green", "sks"]
PROMPT_LENGTH = 8
IMAGE_SIZE = 16
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
UNET_KWARGS: dict[str, Any] = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(8, 16),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=16,
    attention_head_dim=4,
    norm_num_groups=4,
)


def tiny_clip_tokenizer(folder: Path) -> Any:
    """A ``CLIPTokenizer`` over :data:`PROMPT_WORDS` plus single letters (no merges), ``folder`` holds its files."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz":
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(f"{ch}</w>", len(vocab))
    merges: list[str] = []
    for word in PROMPT_WORDS:  # merge each word left to right, so that it is one token
        parts = [*word[:-1], f"{word[-1]}</w>"]
        while len(parts) > 1:
            merges.append(f"{parts[0]} {parts[1]}")
            parts = [parts[0] + parts[1], *parts[2:]]
            vocab.setdefault(parts[0], len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{m}\n" for m in dict.fromkeys(merges)))
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=PROMPT_LENGTH)


def build_tiny_pipeline(tmp: Path, *, seed: int = 0, prediction_type: str = "epsilon", **unet_overrides: Any) -> Any:
    """A random ``StableDiffusionPipeline`` (see the module docstring); ``tmp`` holds the tokenizer files."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = tiny_clip_tokenizer(tmp / "tokenizer-src")
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer.get_vocab()),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=PROMPT_LENGTH,
            projection_dim=16,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    unet = UNet2DConditionModel(**{**UNET_KWARGS, **unet_overrides})
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(4, 8),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=IMAGE_SIZE,
        layers_per_block=1,
    )
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, prediction_type=prediction_type, clip_sample=False, steps_offset=1
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_tiny_pipeline(path: Path, *, seed: int = 0, prediction_type: str = "epsilon", **unet_overrides: Any) -> Path:
    """Build :func:`build_tiny_pipeline` and ``save_pretrained`` it into ``path``."""
    pipe = build_tiny_pipeline(path.parent, seed=seed, prediction_type=prediction_type, **unet_overrides)
    pipe.save_pretrained(str(path))
    return path


def add_unet_lora(unet: Any, *, r: int = 2, alpha: float = 2.0, seed: int = 1) -> Any:
    """``unet.add_adapter(LoraConfig(...))`` on :data:`LORA_TARGETS` with random (non-zero) A and B."""
    from peft import LoraConfig

    torch.manual_seed(seed)
    unet.add_adapter(LoraConfig(r=r, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(LORA_TARGETS)))
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.3)  # peft starts B at zero; a trained LoRA has both factors non-zero
    return unet


def save_diffusers_lora(pipeline_dir: Path, out: Path, *, r: int = 2, seed: int = 1, **unet_overrides: Any) -> Path:
    """``pytorch_lora_weights.safetensors`` as ``train_text_to_image_lora.py`` writes it (``unet.``-prefixed
    ``lora.down`` / ``lora.up`` keys), for a LoRA on the UNet of ``pipeline_dir`` (or, with
    ``unet_overrides``, on a UNet of another shape)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    if unet_overrides:
        unet = UNet2DConditionModel(**{**UNET_KWARGS, **unet_overrides})
    else:
        unet = UNet2DConditionModel.from_pretrained(str(pipeline_dir), subfolder="unet")
    add_unet_lora(unet, r=r, seed=seed)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(str(out), unet_lora_layers=layers, safe_serialization=True)
    return out / "pytorch_lora_weights.safetensors"


def save_peft_unet_lora(pipeline_dir: Path, out: Path, *, r: int = 2, alpha: float = 4.0, seed: int = 2) -> Path:
    """A peft adapter folder on the UNet (``get_peft_model(unet, LoraConfig).save_pretrained(out)``)."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig, get_peft_model

    unet = UNet2DConditionModel.from_pretrained(str(pipeline_dir), subfolder="unet")
    torch.manual_seed(seed)
    model = get_peft_model(
        unet, LoraConfig(r=r, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=["to_q", "to_v"])
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.3)
    model.save_pretrained(str(out))
    return out


def write_imagefolder(folder: Path, captions: dict[str, str], *, seed: int = 0, size: int = IMAGE_SIZE) -> Path:
    """An ``imagefolder`` dataset: one random RGB PNG per ``file_name`` and ``metadata.jsonl`` with ``text``."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    with (folder / "metadata.jsonl").open("w") as fh:
        for name, caption in captions.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / name)
            fh.write(json.dumps({"file_name": name, "text": caption}) + "\n")
    return folder


CAPTIONS: dict[str, str] = {
    "cat.png": "a photo of cat",
    "dog.png": "a red dog",
    "sub/blue.png": "an image in blue style",
    "sks.png": "a sks dog",
}
"""The captioned images of :func:`tiny_sd` (``file_name`` -> caption)."""


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Built once per test session: the saved tiny pipeline (``pipe``), a LoRA as
    ``train_text_to_image_lora.py`` writes it (``lora``: the safetensors file) and an imagefolder of
    :data:`CAPTIONS` (``images``). Tests must not change these files."""
    root = tmp_path_factory.mktemp("tiny_sd")
    pipe = save_tiny_pipeline(root / "pipe")
    return {
        "root": root,
        "pipe": pipe,
        "lora": save_diffusers_lora(pipe, root / "lora"),
        "images": write_imagefolder(root / "images", CAPTIONS),
    }

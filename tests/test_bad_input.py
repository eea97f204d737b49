"""Every bad input gets one clear datainf error."""

from __future__ import annotations

import pytest
import torch

import datainf
from datainf.errors import (
    BlockMismatchError,
    ConfigError,
    DataInfError,
    EmptyInputError,
    FingerprintMismatchError,
    NonFiniteGradientError,
    StoreError,
)
from datainf.store import GradientStore


def grads(n: int, dims=(("a", 4), ("b", 3)), seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(n, d, generator=generator) for name, d in dims}


def test_empty_train_or_test():
    with pytest.raises(EmptyInputError, match="train"):
        datainf.influence({}, grads(2), progress=False)
    with pytest.raises(EmptyInputError, match="test"):
        datainf.influence(grads(3), {"a": torch.zeros(0, 4), "b": torch.zeros(0, 3)}, progress=False)


def test_block_names_and_shapes_must_agree():
    with pytest.raises(BlockMismatchError, match="only in train \\['b'\\]"):
        datainf.influence(grads(3), grads(2, dims=(("a", 4),)), progress=False)
    with pytest.raises(BlockMismatchError, match="differ in size: b"):
        datainf.influence(grads(3), grads(2, dims=(("a", 4), ("b", 5))), progress=False)


def test_non_finite_gradients_name_block_and_ids():
    train = grads(5)
    train["b"][3, 1] = float("nan")
    with pytest.raises(NonFiniteGradientError, match=r"block 'b' for examples \['3'\]"):
        datainf.influence(train, grads(2), progress=False)
    test = grads(2)
    test["a"][0, 0] = float("inf")
    with pytest.raises(NonFiniteGradientError, match="test gradients"):
        datainf.influence(grads(5), test, progress=False)


@pytest.mark.parametrize("damping", [0.0, -1.0, float("nan")])
def test_damping_must_be_positive(damping):
    with pytest.raises(ConfigError, match="damping"):
        datainf.influence(grads(3), grads(2), damping=damping, progress=False)


def test_unknown_method_mode_and_option():
    with pytest.raises(ConfigError, match="Unknown influence method"):
        datainf.influence(grads(3), grads(2), method="magic", progress=False)
    with pytest.raises(ConfigError, match="mode"):
        datainf.influence(grads(3), grads(2), mode="sum", progress=False)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="no option"):
        datainf.influence(grads(3), grads(2), method="lissa", method_options={"depth": 3}, progress=False)


def test_fingerprint_mismatch_when_mixing_stores():
    train = GradientStore.from_tensors(grads(3), fingerprint={"model": "adapter-1"})
    test = GradientStore.from_tensors(grads(2), fingerprint={"model": "adapter-2"})
    with pytest.raises(FingerprintMismatchError, match="same fine-tuned model"):
        datainf.influence(train, test, progress=False)


def test_unfinished_store_is_refused():
    store = GradientStore.create(None, block_dims={"a": 4, "b": 3})
    store.append(["x"], {k: v for k, v in grads(1).items()})
    with pytest.raises(StoreError, match="unfinished"):
        datainf.influence(store, grads(2), progress=False)


def test_all_errors_share_one_base_class():
    for error in (EmptyInputError, BlockMismatchError, ConfigError, FingerprintMismatchError, NonFiniteGradientError):
        assert issubclass(error, DataInfError)

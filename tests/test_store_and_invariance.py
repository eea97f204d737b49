"""Gradient store: round trips, resume, corruption, and invariances of the scores."""

from __future__ import annotations

import json

import pytest
import torch

import datainf
from datainf.errors import StoreCorruptedError, StoreError, StoreMismatchError
from datainf.store import GradientStore

DIMS = {"b.lora_A": 7, "b.lora_B": 5, "a.head": 3}


def make(n: int, seed: int = 0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return {b: torch.randn(n, d, generator=generator).to(dtype) for b, d in DIMS.items()}


def fill(store: GradientStore, grads, batch: int, start: int = 0) -> None:
    n = next(iter(grads.values())).shape[0]
    for s in range(start, n, batch):
        store.append([f"ex{i}" for i in range(s, min(n, s + batch))], {k: v[s : s + batch] for k, v in grads.items()})


def test_disk_round_trip_is_bit_exact_in_fp32(tmp_path):
    grads = make(23)
    store = GradientStore.create(tmp_path / "s", block_dims=DIMS, shard_size=5)
    fill(store, grads, batch=4)
    store.finalize()
    reopened = GradientStore.open(tmp_path / "s")
    assert reopened.is_complete and reopened.ids == [f"ex{i}" for i in range(23)]
    loaded = reopened.to_dict()
    for name in DIMS:
        assert torch.equal(loaded[name], grads[name])
    expected_norms = torch.stack([grads[b].double().pow(2).sum(1) for b in DIMS], dim=1)
    assert torch.allclose(reopened.squared_norms(), expected_norms, rtol=1e-12)
    reopened.verify()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_storage_rounds_like_a_cast(tmp_path, dtype):
    grads = make(6)
    store = GradientStore.create(tmp_path / dtype, block_dims=DIMS, dtype=dtype)
    fill(store, grads, batch=6)
    store.finalize()
    loaded = GradientStore.open(tmp_path / dtype).to_dict()
    for name in DIMS:
        assert loaded[name].dtype == getattr(torch, dtype)
        assert torch.equal(loaded[name], grads[name].to(getattr(torch, dtype)))


def test_resume_after_crash_mid_shard(tmp_path):
    grads = make(20)
    path = tmp_path / "s"
    store = GradientStore.create(path, block_dims=DIMS, shard_size=6, fingerprint={"model": "m1"})
    fill(store, {k: v[:15] for k, v in grads.items()}, batch=5)
    # Simulated crash: the process dies with 3 examples buffered, and a half-written temp file left over.
    (path / ".shard-00002.safetensors.123.tmp").write_bytes(b"garbage")
    del store
    resumed = GradientStore.create(path, block_dims=DIMS, shard_size=6, fingerprint={"model": "m1"})
    assert resumed.ids == [f"ex{i}" for i in range(12)]  # two finished shards survive
    done = len(resumed.ids)
    fill(resumed, grads, batch=5, start=done)
    resumed.finalize()
    loaded = GradientStore.open(path).to_dict()
    for name in DIMS:
        assert torch.equal(loaded[name], grads[name])


def test_reopen_with_other_config_is_refused(tmp_path):
    path = tmp_path / "s"
    GradientStore.create(path, block_dims=DIMS, fingerprint={"model": "m1"})
    with pytest.raises(StoreMismatchError, match="fingerprint"):
        GradientStore.create(path, block_dims=DIMS, fingerprint={"model": "m2"})
    with pytest.raises(StoreMismatchError, match="dtype"):
        GradientStore.create(path, block_dims=DIMS, dtype="bfloat16", fingerprint={"model": "m1"})
    fresh = GradientStore.create(path, block_dims=DIMS, fingerprint={"model": "m2"}, overwrite=True)
    assert fresh.num_examples == 0


def test_corrupted_store_is_refused(tmp_path):
    path = tmp_path / "s"
    store = GradientStore.create(path, block_dims=DIMS, shard_size=4)
    fill(store, make(8), batch=4)
    store.finalize()
    shard = path / "shard-00001.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:-10])
    with pytest.raises(StoreCorruptedError, match="truncated"):
        GradientStore.open(path)
    shard.write_bytes(data[:-10] + b"\x00" * 10)  # same size, altered contents
    with pytest.raises(StoreCorruptedError, match="checksum"):
        GradientStore.open(path).verify()
    shard.write_bytes(b"\xff" * len(data))  # same size, unreadable header
    with pytest.raises(StoreCorruptedError, match="shard-00001.safetensors of the gradient store .* SHA-256"):
        list(GradientStore.open(path).iter_batches())  # refused by its checksum before it is parsed
    unchecked = GradientStore.open(path)
    unchecked.verify_checksums = False
    with pytest.raises(StoreCorruptedError, match="cannot be read"):
        list(unchecked.iter_batches())
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(StoreCorruptedError, match="unreadable"):
        GradientStore.open(path)
    with pytest.raises(StoreCorruptedError, match="missing"):
        GradientStore.open(tmp_path / "nowhere")


def test_append_rejects_duplicates_and_finalized(tmp_path):
    store = GradientStore.create(None, block_dims=DIMS)
    fill(store, make(3), batch=3)
    with pytest.raises(StoreError, match="unique"):
        fill(store, make(3), batch=3)
    store.finalize()
    with pytest.raises(StoreError, match="finalized"):
        store.append(["new"], {k: v[:1] for k, v in make(1).items()})


@pytest.mark.parametrize("method", ["datainf", "exact", "lissa", "hessian_free"])
def test_scores_invariant_to_backend_shards_batches_and_block_order(tmp_path, method):
    train, test = make(31, seed=1), make(4, seed=2)
    options = {"scale": "trace"} if method == "lissa" else {}
    baseline = datainf.influence(train, test, method=method, mode="pairwise", method_options=options, progress=False)
    disk = GradientStore.create(tmp_path / "disk", block_dims=DIMS, shard_size=7)
    fill(disk, train, batch=3)
    disk.finalize()
    on_disk = datainf.influence(
        GradientStore.open(tmp_path / "disk"),
        test,
        method=method,
        mode="pairwise",
        method_options=options,
        batch_size=2,
        progress=False,
    )
    reversed_order = {k: train[k] for k in reversed(list(train))}
    reordered = datainf.influence(
        reversed_order, test, method=method, mode="pairwise", method_options=options, progress=False
    )
    for other in (on_disk, reordered):
        assert torch.allclose(other.values, baseline.values, rtol=1e-5, atol=1e-6 * baseline.values.abs().max())
    assert on_disk.train_ids == [f"ex{i}" for i in range(31)]


def test_manifest_is_plain_json_and_lists_shapes(tmp_path):
    store = GradientStore.create(tmp_path / "s", block_dims=DIMS, fingerprint={"model": "abc"})
    fill(store, make(2), batch=2)
    store.finalize()
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["blocks"] == [[k, v] for k, v in DIMS.items()]
    assert manifest["fingerprint"] == {"model": "abc"} and manifest["complete"] is True

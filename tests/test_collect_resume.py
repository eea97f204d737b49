"""Resuming gradient collection inside a shard: the examples computed since the last full shard are
kept (``unsharded/`` checkpoints), not recomputed, and the finished store is the uninterrupted one, byte for byte."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
from gradient_fixtures import bert_classifier, classification_data, word_tokenizer

from datainf.gradients import SequenceClassificationTask, collect_gradients
from datainf.store import DiskGradientStore, GradientStore

N, BATCH, SHARD = 20, 2, 8


class _Killer(SequenceClassificationTask):
    """Counts forward passes and examples; on call ``kill_on`` it copies the store folder as it is on disk
    at that instant (what a SIGKILL would leave) to ``snapshot`` and raises."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.calls = 0
        self.examples = 0
        self.kill_on: int | None = None
        self.store: Path | None = None
        self.snapshot: Path | None = None

    def per_example_loss(self, model, batch):
        self.calls += 1
        if self.kill_on is not None and self.calls == self.kill_on:
            if self.snapshot is not None and self.store is not None:
                shutil.copytree(self.store, self.snapshot)
            raise RuntimeError("killed")
        self.examples += len(batch)
        return super().per_example_loss(model, batch)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    model, data = bert_classifier(), classification_data(N, seed=5)
    reference = tmp_path_factory.mktemp("resume") / "uninterrupted"
    collect_gradients(
        model, _Killer(word_tokenizer()), data, store=reference, batch_size=BATCH,  # the fingerprint names the task class
        shard_size=SHARD, progress=False,
    )  # fmt: skip
    return {"model": model, "data": data, "reference": _files(reference)}


@pytest.mark.parametrize("how", ["killed", "exception"])
def test_interrupted_mid_shard_keeps_its_examples_and_ends_bit_identical(
    setup, tmp_path: Path, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    model, data = setup["model"], setup["data"]
    task = _Killer(word_tokenizer())
    k = 6  # 6 batches = 12 examples done: one full shard (8) and 4 examples of the next one
    task.kill_on, task.store = k + 1, tmp_path / "g"
    if how == "killed":  # rerun on the folder as a hard kill leaves it: only periodic checkpoints count
        task.snapshot = tmp_path / "snapshot"
    with pytest.raises(RuntimeError, match="killed"):
        collect_gradients(
            model, task, data, store=task.store, batch_size=BATCH, shard_size=SHARD, progress=False,
            checkpoint_seconds=0 if how == "killed" else None,  # "exception": nothing periodic, only the handler's
        )  # fmt: skip
    folder = task.snapshot if how == "killed" else task.store
    assert folder is not None
    assert GradientStore.open(folder).ids == [ex["id"] for ex in data[:SHARD]]  # readers see full shards only
    assert (folder / "unsharded" / "index.json").is_file()

    task.kill_on, task.calls, task.examples = None, 0, 0
    with caplog.at_level(logging.INFO, logger="datainf"):
        store = collect_gradients(model, task, data, store=folder, batch_size=BATCH, shard_size=SHARD, progress=False)
    assert task.examples == N - k * BATCH and task.calls == (N - k * BATCH) // BATCH  # nothing computed twice
    assert store.resumed_examples == k * BATCH
    assert any(f"Resuming: {k * BATCH} of {N} examples" in r.getMessage() for r in caplog.records)
    assert store.is_complete and store.ids == [ex["id"] for ex in data]
    assert _files(folder) == setup["reference"]  # manifest and every shard byte-identical; unsharded/ is gone


def _grads(n: int) -> tuple[list[str], dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [f"ex{i}" for i in range(n)], {"a": torch.randn(n, 3, generator=gen), "b": torch.randn(n, 2, generator=gen)}


DIMS = {"a": 3, "b": 2}


def test_a_crash_between_the_shard_and_its_checkpoint_update_loses_and_repeats_nothing(tmp_path, monkeypatch) -> None:
    ids, grads = _grads(10)
    direct = GradientStore.create(tmp_path / "direct", block_dims=DIMS, shard_size=4)
    direct.append(ids, grads)
    direct.finalize()

    path = tmp_path / "s"
    store = GradientStore.create(path, block_dims=DIMS, shard_size=4, checkpoint_seconds=0)
    store.append(ids[:3], {k: v[:3] for k, v in grads.items()})  # 3 rows checkpointed in unsharded/
    original = DiskGradientStore._after_shard

    def crash(self: DiskGradientStore, count: int) -> None:  # the shard and manifest are written, unsharded/ is not
        shutil.copytree(path, tmp_path / "crashed")
        original(self, count)

    monkeypatch.setattr(DiskGradientStore, "_after_shard", crash)
    store.append(ids[3:5], {k: v[3:5] for k, v in grads.items()})  # cuts shard 0 (ex0-ex3), ex4 left buffered
    monkeypatch.setattr(DiskGradientStore, "_after_shard", original)

    resumed = GradientStore.create(tmp_path / "crashed", block_dims=DIMS, shard_size=4)
    assert resumed.ids == ids[:4]  # ex0-ex2 are both in the shard and in unsharded/: taken once; ex4 was never durable
    assert resumed.resumed_examples == 4
    resumed.append(ids[4:], {k: v[4:] for k, v in grads.items()})
    resumed.finalize()
    assert _files(tmp_path / "crashed") == _files(tmp_path / "direct")

    # the store that went on checkpointed ex4 after cutting the shard (checkpoint_seconds=0)
    again = GradientStore.create(path, block_dims=DIMS, shard_size=4)
    assert again.ids == ids[:5] and again.buffered_ids == ids[4:5]


def test_checkpoints_are_rewritten_when_a_shard_takes_part_of_them(tmp_path) -> None:
    ids, grads = _grads(10)
    path = tmp_path / "s"
    store = GradientStore.create(path, block_dims=DIMS, shard_size=4, checkpoint_seconds=0)
    for start in range(0, 6, 3):  # 3 + 3 rows: shard 0 takes 4, 2 durable rows are left
        store.append(ids[start : start + 3], {k: v[start : start + 3] for k, v in grads.items()})
    assert len(list((path / "unsharded").glob("shard-pending-*.safetensors"))) == 1
    del store
    resumed = GradientStore.create(path, block_dims=DIMS, shard_size=4)
    assert resumed.ids == ids[:6] and resumed.buffered_ids == ids[4:6]
    resumed.append(ids[6:], {k: v[6:] for k, v in grads.items()})
    resumed.finalize()
    assert not (path / "unsharded").exists()
    loaded = GradientStore.open(path).to_dict()
    for name in DIMS:
        assert torch.equal(loaded[name], grads[name])


def test_a_damaged_checkpoint_is_dropped_and_recomputed(tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    ids, grads = _grads(6)
    path = tmp_path / "s"
    store = GradientStore.create(path, block_dims=DIMS, shard_size=4, checkpoint_seconds=0)
    store.append(ids, grads)  # shard 0 (4 rows) + 2 checkpointed
    del store
    (piece,) = (path / "unsharded").glob("shard-pending-*.safetensors")
    data = bytearray(piece.read_bytes())
    data[-1] ^= 0xFF
    piece.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="datainf"):
        resumed = GradientStore.create(path, block_dims=DIMS, shard_size=4)
    assert resumed.ids == ids[:4] and "computed again" in caplog.text
    assert not (path / "unsharded").exists()


def test_checkpoint_seconds_is_checked() -> None:
    from datainf.errors import ConfigError

    with pytest.raises(ConfigError, match="checkpoint_seconds"):
        GradientStore.create("/nonexistent/never-created", block_dims=DIMS, checkpoint_seconds=-1)


def test_a_part_killed_between_shards_is_adopted_with_its_checkpointed_examples(tmp_path) -> None:
    ids, grads = _grads(6)
    main = GradientStore.create(tmp_path / "s", block_dims=DIMS, shard_size=4)
    assert isinstance(main, DiskGradientStore)
    part = main.create_part("run-r00001")
    part.checkpoint_seconds = 0
    part.append(ids[:3], {k: v[:3] for k, v in grads.items()})  # 3 rows, no full shard: only in unsharded/
    del part  # the rank dies
    assert main.adopt_parts(order=ids) == 3 and main.ids == ids[:3]
    main.append(ids[3:], {k: v[3:] for k, v in grads.items()})
    main.finalize()
    loaded = GradientStore.open(tmp_path / "s").to_dict()
    for name in DIMS:
        assert torch.equal(loaded[name], grads[name])

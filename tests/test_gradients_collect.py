"""collect_gradients into RAM and disk stores: resume, mismatches, and influence scores equal to the loop's."""

from __future__ import annotations

import logging

import pytest
import torch
from gradient_fixtures import bert_classifier, classification_data, word_tokenizer

import datainf
from datainf.errors import BlockMismatchError, StoreMismatchError
from datainf.gradients import SequenceClassificationTask, collect_gradients, find_lora_blocks, gradient_mode
from datainf.store import GradientStore
from datainf.testing import loop_gradients


class _CountingTask(SequenceClassificationTask):
    """Counts collated examples; can fail on a given call of per_example_loss."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.collated = 0
        self.fail_on: int | None = None
        self.calls = 0

    def collate(self, examples, ids):
        self.collated += len(examples)
        return super().collate(examples, ids)

    def per_example_loss(self, model, batch):
        self.calls += 1
        if self.fail_on is not None and self.calls == self.fail_on:
            raise KeyboardInterrupt  # an interrupted run
        return super().per_example_loss(model, batch)


def _reference(model, task, data) -> dict[str, torch.Tensor]:
    blocks = find_lora_blocks(model)
    ids = [ex["id"] for ex in data]
    with gradient_mode(model, blocks):
        task.setup(model)
        _, grads = loop_gradients(model, task, data, ids, {b.name: b.parameter for b in blocks}, torch.device("cpu"))
    return grads


def test_disk_store_matches_ram_store_and_loop(tmp_path) -> None:
    model, task = bert_classifier(), SequenceClassificationTask(word_tokenizer())
    data = classification_data(9, seed=1)
    ram = collect_gradients(model, task, data, batch_size=4, progress=False)
    disk = collect_gradients(model, task, data, store=tmp_path / "g", batch_size=3, shard_size=4, progress=False)
    reopened = GradientStore.open(tmp_path / "g")
    assert reopened.is_complete and reopened.ids == [ex["id"] for ex in data] == ram.ids
    assert set(reopened.fingerprint) >= {"model", "task"} and reopened.fingerprint == ram.fingerprint
    assert reopened.fingerprint["task"].startswith("SequenceClassificationTask")
    ref = _reference(model, task, data)
    for name, g in reopened.to_dict().items():
        torch.testing.assert_close(g, ram.to_dict()[name], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(g, ref[name].float(), rtol=1e-4, atol=1e-6)
    assert disk.num_examples == 9


def test_interrupted_run_resumes(tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    model = bert_classifier()
    task = _CountingTask(word_tokenizer())
    data = classification_data(10, seed=2)
    task.fail_on = 3
    with pytest.raises(KeyboardInterrupt):
        collect_gradients(model, task, data, store=tmp_path / "g", batch_size=2, shard_size=2, progress=False)
    partial = GradientStore.open(tmp_path / "g")
    assert partial.ids == [ex["id"] for ex in data[:4]] and not partial.is_complete
    task.fail_on, task.collated = None, 0
    with caplog.at_level(logging.INFO, logger="datainf"):
        store = collect_gradients(model, task, data, store=tmp_path / "g", batch_size=2, shard_size=2, progress=False)
    assert task.collated == 6  # only the missing examples were computed
    assert any("4 of 10 examples are already in the store" in r.getMessage() for r in caplog.records)
    assert store.is_complete and store.ids == [ex["id"] for ex in data]
    fresh = collect_gradients(model, SequenceClassificationTask(word_tokenizer()), data, batch_size=5, progress=False)
    for name, g in store.to_dict().items():
        torch.testing.assert_close(g, fresh.to_dict()[name], rtol=1e-5, atol=1e-7)


def test_store_from_another_model_is_refused(tmp_path) -> None:
    task = SequenceClassificationTask(word_tokenizer())
    data = classification_data(3)
    collect_gradients(bert_classifier(seed=0), task, data, store=tmp_path / "g", progress=False)
    with pytest.raises(StoreMismatchError, match="overwrite=True"):
        collect_gradients(bert_classifier(seed=1), task, data, store=tmp_path / "g", progress=False)
    store = collect_gradients(bert_classifier(seed=1), task, data, store=tmp_path / "g", overwrite=True, progress=False)
    assert store.num_examples == 3


def test_given_store_with_other_blocks_is_refused() -> None:
    store = GradientStore.create(None, block_dims={"w": 3})
    with pytest.raises(BlockMismatchError, match="find_lora_blocks"):
        collect_gradients(
            bert_classifier(),
            SequenceClassificationTask(word_tokenizer()),
            classification_data(2),
            store=store,
            progress=False,
        )


@pytest.fixture(scope="module")
def train_and_test_gradients() -> dict[str, object]:
    """Fast (hooks, into stores) and slow (per-example loop) gradients of one train and one test set."""
    model, task = bert_classifier(), SequenceClassificationTask(word_tokenizer())
    train = classification_data(16, seed=3)
    test = classification_data(4, seed=4)
    return {
        "train_ids": [ex["id"] for ex in train],
        "fast_train": collect_gradients(model, task, train, batch_size=7, progress=False),
        "fast_test": collect_gradients(model, task, test, batch_size=4, progress=False),
        "slow_train": {k: v.double() for k, v in _reference(model, task, train).items()},
        "slow_test": {k: v.double() for k, v in _reference(model, task, test).items()},
    }


@pytest.mark.parametrize("method", ["datainf", "hessian_free"])
@pytest.mark.parametrize("mode", ["average", "pairwise"])
def test_influence_from_collected_gradients_equals_loop(train_and_test_gradients, method: str, mode: str) -> None:
    g = train_and_test_gradients
    fast = datainf.influence(g["fast_train"], g["fast_test"], method=method, mode=mode, progress=False)
    slow = datainf.influence(g["slow_train"], g["slow_test"], method=method, mode=mode, progress=False)
    assert fast.train_ids == g["train_ids"]
    assert fast.values.abs().max() > 0
    scale = float(slow.values.abs().max())
    torch.testing.assert_close(fast.values.double(), slow.values.double(), rtol=1e-4, atol=1e-6 * scale)


def test_an_adapted_module_that_never_runs_is_warned_about_once(caplog) -> None:
    from peft import LoraConfig, get_peft_model

    from test_onthefly_fused import CrossEntropy, TinyClassifier, class_records

    class Skipping(TinyClassifier):
        """``spare`` is adapted but the forward pass never calls it: its gradient is all zero."""

        def __init__(self) -> None:
            super().__init__()
            self.spare = torch.nn.Linear(32, 32)

    torch.manual_seed(0)
    model = get_peft_model(Skipping(), LoraConfig(r=2, target_modules=["hidden", "spare"], init_lora_weights=False))
    with caplog.at_level(logging.WARNING, logger="datainf.gradients.session"):
        store = collect_gradients(model, CrossEntropy(), class_records(6, 0), batch_size=3, progress=False)
    warnings = [r.message for r in caplog.records if "never ran" in r.message]
    assert len(warnings) == 1 and "spare" in warnings[0]
    spare = [name for name in store.block_dims if ".spare." in name]
    assert spare and all(float(store.to_dict()[name].abs().max()) == 0.0 for name in spare)

"""Relabel suggestions (``datainf.relabel.suggest_labels``) against a float64 autograd loop, and their refusals."""

from __future__ import annotations

import pytest
import torch
from gradient_fixtures import bert_classifier, classification_data, scheduler, word_tokenizer

import datainf
from datainf import reference
from datainf.errors import (
    ConfigError,
    EmptyInputError,
    FingerprintMismatchError,
    TaskInputError,
)
from datainf.gradients import (
    CausalLMTask,
    DiffusionTask,
    SequenceClassificationTask,
    collect_gradients,
    find_lora_blocks,
    gradient_mode,
)
from datainf.relabel import RelabelResult, suggest_labels
from datainf.testing import loop_gradients

N_CLASSES = 3
FLAGGED = ["c0-1", "c0-4", "c0-9"]


@pytest.fixture(scope="module")
def setup():
    model = bert_classifier(seed=0).double()
    task = SequenceClassificationTask(word_tokenizer())
    records = classification_data(12, num_labels=N_CLASSES)
    store = collect_gradients(model, task, records, dtype="float64", batch_size=5, progress=False)
    return model, task, records, store


def reference_candidates(model, task, records, ids):
    """Each flagged example with every label, differentiated one at a time by autograd: (losses, {block: (kC, d)})."""
    by_id = {r["id"]: r for r in records}
    candidates = [{**by_id[i], "label": c} for i in ids for c in range(N_CLASSES)]
    names = [f"{i}/{c}" for i in ids for c in range(N_CLASSES)]
    blocks = find_lora_blocks(model)
    params = {b.name: b.parameter for b in blocks.blocks}
    with gradient_mode(model, blocks):
        return loop_gradients(model, task, candidates, names, params, torch.device("cpu"))


@pytest.mark.parametrize("method", ["datainf", "exact", "diagonal", "hessian_free"])
def test_self_influence_suggestions_match_float64_loop(setup, method):
    model, task, records, store = setup
    result = suggest_labels(model, task, records, FLAGGED, train_store=store, method=method, batch_size=4)
    losses, grads = reference_candidates(model, task, records, FLAGGED)
    train = store.to_dict()
    dense = reference.reference_preconditioners(train, reference.reference_lambdas(train, 0.1), method)
    expected = reference.reference_self_influence({b: grads[b] for b in train}, dense).reshape(len(FLAGGED), N_CLASSES)
    assert isinstance(result, RelabelResult) and len(result) == len(FLAGGED)
    assert result.criterion == "self_influence" and result.method == method
    by_id = {r["id"]: r for r in records}
    for k, row in enumerate(result.suggestions):
        assert row.id == FLAGGED[k] and row.given_label == by_id[row.id]["label"]
        torch.testing.assert_close(torch.tensor(row.scores, dtype=torch.float64), expected[k], rtol=1e-9, atol=0.0)
        torch.testing.assert_close(
            torch.tensor(row.losses, dtype=torch.float64), losses.reshape(-1, N_CLASSES)[k], rtol=1e-9, atol=0.0
        )
        assert row.suggested_label == int(torch.argmin(expected[k]))
    assert expected.std(dim=1).min() > 0  # the candidates really differ, so the argmin is a real choice


def test_given_label_score_is_the_stores_self_influence(setup):
    """A candidate equal to the stored row gets exactly ``influence(store, mode="self")``'s value."""
    model, task, records, store = setup
    result = suggest_labels(model, task, records, FLAGGED, train_store=store, damping=0.3)
    own = datainf.influence(store, method="datainf", mode="self", damping=0.3, progress=False)
    value = dict(zip(own.train_ids, own.values.tolist(), strict=True))
    for row in result.suggestions:
        assert row.scores[row.given_label] == pytest.approx(value[row.id], rel=1e-9)
    assert result.settings["lambdas"] == own.settings["lambdas"]


def test_loss_criterion_is_the_lowest_loss_and_needs_no_store(setup):
    model, task, records, _ = setup
    result = suggest_labels(model, task, records, FLAGGED, criterion="loss")
    losses, _ = reference_candidates(model, task, records, FLAGGED)
    expected = losses.reshape(-1, N_CLASSES)
    for k, row in enumerate(result.suggestions):
        torch.testing.assert_close(torch.tensor(row.scores, dtype=torch.float64), expected[k], rtol=1e-9, atol=0.0)
        assert row.suggested_label == int(torch.argmin(expected[k]))
    assert result.method is None
    table = result.to_rows()
    assert [r["id"] for r in table] == FLAGGED and "score_LABEL_0" in table[0]
    assert result.suggested() == {r.id: r.suggested_label for r in result.suggestions}


def test_refuses_causal_lm_and_diffusion_tasks(setup):
    model, _, records, store = setup
    for task in (CausalLMTask(word_tokenizer("lm")), DiffusionTask(scheduler())):
        with pytest.raises(ConfigError, match="classification task"):
            suggest_labels(model, task, records, FLAGGED, train_store=store)


def test_bad_input_is_refused(setup):
    model, task, records, store = setup
    with pytest.raises(ConfigError, match="criterion"):
        suggest_labels(model, task, records, FLAGGED, train_store=store, criterion="margin")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="train_store"):
        suggest_labels(model, task, records, FLAGGED)
    with pytest.raises(EmptyInputError, match="No example ids"):
        suggest_labels(model, task, records, [], train_store=store)
    with pytest.raises(ConfigError, match="more than once"):
        suggest_labels(model, task, records, ["c0-1", "c0-1"], train_store=store)
    with pytest.raises(TaskInputError, match="not among"):
        suggest_labels(model, task, records, ["nope"], train_store=store)
    with pytest.raises(ConfigError, match="damping"):
        suggest_labels(model, task, records, FLAGGED, train_store=store, damping=0.0)
    with pytest.raises(ConfigError, match="batch_size"):
        suggest_labels(model, task, records, FLAGGED, train_store=store, batch_size=0)
    with pytest.raises(ConfigError):
        suggest_labels(model, task, records, FLAGGED, train_store=store, method="no_such_method")


def test_store_of_another_model_is_refused(setup):
    model, task, records, _ = setup
    other = bert_classifier(seed=1).double()
    other_store = collect_gradients(other, task, records[:4], dtype="float64", progress=False)
    task.setup(model)
    with pytest.raises(FingerprintMismatchError, match="another model"):
        suggest_labels(model, task, records, FLAGGED, train_store=other_store)

"""The scoring pass by loss differences (docs/method.md section 6.2, ``InfluenceConfig.scoring``).

The forward difference against the slow reference (each example's gradient from its own
``torch.autograd.grad`` call, dotted with the direction in float64); the perturbation of the
adapter's tensors (undone bit for bit, also on an error); then, on the small LoRA classifier of
``tests/test_onthefly_fused.py`` with 160 training examples, DataInf's scores against the store
path's (average, unit-normalised), the rows checked exactly, the fallback to the gradient pass when
the check fails (still exact), a resumed run (the losses of the skipped gradient passes computed
again), and every input it refuses.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from scipy.stats import spearmanr
from torch import nn

import datainf
from datainf.errors import ConfigError
from datainf.gradients import OnTheFlyGradients, ProjectionConfig, collect_gradients, find_lora_blocks
from datainf.gradients.directional import forward_difference_step, perturbed_blocks
from datainf.methods import scoring
from datainf.store import GradientStore
from test_onthefly_fused import CrossEntropy, class_records, classifier

N_TRAIN, N_TEST, PILOT, CHECK = 160, 5, 8, 24


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(p.detach(), before[name]) for name, p in model.named_parameters())


def _close(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    scale = float(expected.abs().max())
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale)


@pytest.fixture(scope="module")
def setup() -> tuple[nn.Module, CrossEntropy, list[dict[str, Any]], GradientStore, GradientStore]:
    model, task = classifier(), CrossEntropy()
    train = class_records(N_TRAIN, 0)
    store = collect_gradients(model, task, train, batch_size=16, progress=False)
    test = collect_gradients(model, task, class_records(N_TEST, 1), batch_size=16, progress=False)
    return model, task, train, store, test


def _source(setup: Any, **kwargs: Any) -> OnTheFlyGradients:
    model, task, train, _, _ = setup
    return OnTheFlyGradients(model, task, train, **{"batch_size": 16, "pilot_rows": PILOT, "progress": False, **kwargs})


@pytest.fixture()
def small_check(monkeypatch) -> None:
    """Check ``CHECK`` rows instead of 64, so that most of the 160 rows are scored by loss differences."""
    monkeypatch.setattr(scoring, "LOSS_DIFFERENCE_CHECK_ROWS", CHECK)


# ---------------------------------------------------------------------------- the forward difference itself
def test_directional_derivatives_match_per_example_autograd(setup) -> None:
    model, task, train, _, _ = setup
    source = _source(setup)
    blocks = find_lora_blocks(model).blocks
    gen = torch.Generator().manual_seed(3)
    direction = {b.name: torch.randn(b.numel, generator=gen) for b in blocks}
    rows = range(10, 42)
    (estimated,) = source.directional_derivatives(direction, rows)  # the default: one step
    assert source.forward_rows == 2 * len(rows)  # no gradient pass yet: L(theta) is one more forward pass each
    reference = torch.empty(len(rows), dtype=torch.float64)  # slow: one autograd call per example, float64 dots
    model.eval()
    for j, i in enumerate(rows):
        batch = task.collate([train[i]], [train[i]["id"]])
        loss = task.per_example_loss(model, batch)[0]
        grads = torch.autograd.grad(loss, [b.parameter for b in blocks])
        reference[j] = sum(float(g.double().flatten() @ direction[b.name].double()) for g, b in zip(grads, blocks))
    _close(estimated, reference, rtol=2e-3)
    assert float(estimated.abs().min()) > 0  # a real derivative, not a copy of zeros


def test_perturbed_blocks_moves_and_restores_bit_for_bit(setup) -> None:
    model = setup[0]
    blocks = find_lora_blocks(model).blocks
    before = _params(model)
    direction = {blocks[0].name: torch.ones(blocks[0].numel)}
    with perturbed_blocks(blocks, direction, 0.25):
        moved = blocks[0].parameter.detach() - before[blocks[0].name]
        assert torch.allclose(moved, torch.full_like(moved, 0.25))
        assert torch.equal(blocks[1].parameter.detach(), before[blocks[1].name])  # not in the direction: unmoved
    assert _unchanged(model, before)
    with pytest.raises(RuntimeError, match="inside"), perturbed_blocks(blocks, direction, 1e3):
        raise RuntimeError("failed inside")
    assert _unchanged(model, before)
    wrong_size, unknown = {blocks[0].name: torch.ones(3)}, {"nope": torch.ones(3)}
    with pytest.raises(ConfigError, match="does not fit"), perturbed_blocks(blocks, wrong_size, 1.0):
        pass
    with pytest.raises(ConfigError, match="does not have"), perturbed_blocks(blocks, unknown, 1.0):
        pass


def test_forward_difference_step_is_sqrt_eps_times_the_relative_size(setup) -> None:
    blocks = find_lora_blocks(setup[0]).blocks
    direction = {b.name: torch.full((b.numel,), 2.0) for b in blocks}
    theta = math.sqrt(sum(float(b.parameter.detach().double().square().sum()) for b in blocks))
    size = math.sqrt(sum(4.0 * b.numel for b in blocks))
    expected = math.sqrt(torch.finfo(torch.float32).eps) * theta / size
    assert forward_difference_step(blocks, direction) == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ConfigError, match="all zero or not finite"):
        forward_difference_step(blocks, {b.name: torch.zeros(b.numel) for b in blocks})
    with pytest.raises(ConfigError, match="all zero or not finite"):
        forward_difference_step(blocks, {blocks[0].name: torch.full((blocks[0].numel,), math.inf)})


def test_recorded_losses_are_the_training_losses_of_the_same_batches(setup) -> None:
    from datainf.baselines import training_losses

    model, task, train, _, _ = setup
    source = _source(setup)
    assert source.recorded_losses() is None  # no gradient pass yet
    source.to_dict()
    recorded = source.recorded_losses()
    assert recorded is not None and recorded.dtype == torch.float64
    assert torch.equal(recorded, training_losses(model, task, train, batch_size=source.batch_size))


# ---------------------------------------------------------------------------- the scoring pass
@pytest.mark.parametrize("normalize", [False, True])
def test_loss_difference_scores_follow_the_store_path(setup, small_check, normalize: bool, caplog) -> None:
    model, _, _, store, test = setup
    expected = datainf.influence(store, test, normalize=normalize, batch_size=40, progress=False)
    source = _source(setup)
    before = _params(model)
    with caplog.at_level(logging.WARNING):
        got = datainf.influence(
            source, test, normalize=normalize, batch_size=40, scoring="loss-difference", progress=False
        )
    assert _unchanged(model, before)
    assert "never ran" not in caplog.text  # forward-only passes record no hooks, and that is no reason to warn
    checked = got.diagnostics["loss_difference"]
    assert (
        checked["used"]
        and checked["check_rows"] == CHECK
        and checked["check_error"] <= scoring.LOSS_DIFFERENCE_TOLERANCE
    )
    assert got.diagnostics["scoring"] == "loss-difference" and got.settings["scoring"] == "loss-difference"
    assert "1 scoring pass of loss differences" in got.diagnostics["passes_description"]
    # the checked rows are the gradient pass's (float32 round-off of the store), the others approximate
    _close(got.values[:CHECK], expected.values[:CHECK], rtol=1e-4)
    _close(got.values, expected.values, rtol=1e-2)
    assert not torch.allclose(got.values[CHECK:], expected.values[CHECK:], rtol=1e-7, atol=0)  # not the same numbers
    assert spearmanr(got.values.numpy(), expected.values.numpy()).correlation > 0.999
    # cost: pilot + fused pass + the checked rows with gradients; forward only: every row once, the checked
    # rows once per step tried
    assert source.rows_computed == PILOT + N_TRAIN + CHECK
    assert source.forward_rows == N_TRAIN + (len(scoring.STEP_FACTORS) - 1) * CHECK
    assert len(checked["steps_tried"]) == len(scoring.STEP_FACTORS)
    assert checked["check_error"] == min(tried["check_error"] for tried in checked["steps_tried"])
    assert checked["step"] in [tried["step"] for tried in checked["steps_tried"]]


def test_a_failed_check_falls_back_to_the_exact_gradient_pass(setup, small_check, monkeypatch, caplog) -> None:
    _, _, _, store, test = setup
    monkeypatch.setattr(scoring, "LOSS_DIFFERENCE_TOLERANCE", 0.0)  # no forward difference is exact
    source = _source(setup)
    with caplog.at_level(logging.WARNING, logger="datainf.methods.scoring"):
        got = datainf.influence(source, test, batch_size=40, scoring="loss-difference", progress=False)
    checked = got.diagnostics["loss_difference"]
    assert not checked["used"] and checked["check_error"] > 0
    assert "Scoring with the training gradients instead" in caplog.text
    assert "loss differences" not in got.diagnostics["passes_description"]
    _close(got.values, datainf.influence(store, test, batch_size=40, progress=False).values, rtol=1e-4)
    assert source.rows_computed == PILOT + 2 * N_TRAIN + CHECK
    assert source.forward_rows == len(scoring.STEP_FACTORS) * CHECK


class BFloat16Inputs(CrossEntropy):
    """The classifier's loss with a bfloat16 base: inputs in bfloat16, the loss taken in float32."""

    def collate(self, examples: Any, ids: Any) -> Any:
        batch = super().collate(examples, ids)
        batch.inputs["x"] = batch.inputs["x"].to(torch.bfloat16)
        return batch

    def per_example_loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        logits = model(batch.inputs["x"]).float()
        return nn.functional.cross_entropy(logits, batch.inputs["y"], reduction="none")


def test_a_bfloat16_base_fails_the_check_and_stays_exact(small_check) -> None:
    model, task = classifier(), BFloat16Inputs()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora" not in name:  # the adapter stays float32, as peft keeps it
                parameter.data = parameter.data.to(torch.bfloat16)
    train, test_records = class_records(N_TRAIN, 0), class_records(N_TEST, 1)
    test = collect_gradients(model, task, test_records, batch_size=16, progress=False)
    store = collect_gradients(model, task, train, batch_size=16, progress=False)
    source = OnTheFlyGradients(model, task, train, batch_size=16, pilot_rows=PILOT, progress=False)
    got = datainf.influence(source, test, batch_size=40, scoring="loss-difference", progress=False)
    checked = got.diagnostics["loss_difference"]
    assert not checked["used"] and checked["check_error"] > 0.1  # losses rounded to bfloat16: far off
    _close(got.values, datainf.influence(store, test, batch_size=40, progress=False).values, rtol=1e-4)


def test_a_resumed_run_recomputes_the_losses_it_did_not_see(setup, small_check, tmp_path: Path) -> None:
    _, _, _, _, test = setup
    first = datainf.influence(
        _source(setup, work_dir=tmp_path), test, batch_size=40, scoring="loss-difference", progress=False
    )
    again_source = _source(setup, work_dir=tmp_path)
    again = datainf.influence(again_source, test, batch_size=40, scoring="loss-difference", progress=False)
    assert again.diagnostics["replayed_passes"] >= 1  # the DataInf pass was read back, not recomputed
    assert again_source.rows_computed == CHECK  # only the checked rows' gradients
    # the checked rows' losses come with their gradients; each other row's L(theta) is one more forward pass
    assert again_source.forward_rows == len(scoring.STEP_FACTORS) * CHECK + 2 * (N_TRAIN - CHECK)
    _close(again.values, first.values, rtol=1e-5)


def test_inputs_that_cannot_take_loss_differences_are_refused(setup) -> None:
    model, task, train, store, test = setup
    with pytest.raises(ConfigError, match="read, not recomputed"):
        datainf.influence(store, test, scoring="loss-difference", progress=False)
    with pytest.raises(ConfigError, match="takes mode='average'"):
        datainf.influence(_source(setup), test, mode="pairwise", scoring="loss-difference", progress=False)
    with pytest.raises(ConfigError, match="scoring must be one of"):
        datainf.InfluenceConfig(scoring="finite")  # type: ignore[arg-type]
    projected = OnTheFlyGradients(model, task, train, projection=ProjectionConfig(dim=8, seed=0), progress=False)
    assert "random projections" in str(projected.loss_difference_problem())
    projected_test = collect_gradients(
        model, task, class_records(N_TEST, 1), projection=ProjectionConfig(dim=8, seed=0), progress=False
    )
    with pytest.raises(ConfigError, match="random projections"):
        datainf.influence(projected, projected_test, scoring="loss-difference", progress=False)
    assert projected.passes == 0  # refused before any pass

    class TwoRows(CrossEntropy):
        def row_labels(self) -> tuple[str, ...]:
            return ("a", "b")

    assert "per-row blocks" in str(OnTheFlyGradients(model, TwoRows(), train, progress=False).loss_difference_problem())

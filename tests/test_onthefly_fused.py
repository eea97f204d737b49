"""DataInf's fused norms pass on on-the-fly training gradients (docs/method.md section 6.1).

The Taylor combination and its remainder bound on synthetic float64 tensors; then, on a small LoRA
classifier whose blocks hold 128 numbers each, the fused scores against the store path and the
unfused on-the-fly path (average, pairwise, normalised, fixed lambda), the gradient rows computed
(``2 n + pilot`` instead of ``3 n``), a pilot that misestimates the damping (the fallback, still
exact), and the resume from a run killed in the scoring pass or in the fused pass.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

import datainf
from datainf import InfluenceConfig, influence_from_config
from datainf.gradients import OnTheFlyGradients, collect_gradients
from datainf.methods.datainf_method import combine_taylor_terms, taylor_remainder_bound
from datainf.store import GradientStore
from datainf.tasks import GradientTask, TaskBatch

N_TRAIN, N_TEST, PILOT = 24, 5, 4


# ---------------------------------------------------------------------------- the expansion (float64)
def _synthetic(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``g (n, d)`` with norms spread over six decades (some ``rho`` near 1), ``V (m, d)``, ``n_i (n,)``."""
    gen = torch.Generator().manual_seed(seed)
    grads = torch.randn(40, 12, generator=gen, dtype=torch.float64)
    grads *= torch.logspace(-3, 0, 40, dtype=torch.float64).unsqueeze(1)
    test = torch.randn(3, 12, generator=gen, dtype=torch.float64)
    return grads, test, grads.square().sum(dim=1)


def _terms(grads: torch.Tensor, test: torch.Tensor, provisional: float, order: int) -> torch.Tensor:
    """``T_k = sum_i c0_i rho_i^k g_i`` the slow way: ``(K + 1, m, d)``."""
    norms = grads.square().sum(dim=1)
    c0 = (grads @ test.T) / (provisional + norms).unsqueeze(1)  # (n, m)
    rho = provisional / (provisional + norms)
    return torch.stack([(c0 * rho.pow(k).unsqueeze(1)).T @ grads for k in range(order + 1)])


@pytest.mark.parametrize("delta", [-0.6, -0.05, 0.0, 0.2, 0.9, 3.0])
@pytest.mark.parametrize("order", [1, 3])
def test_taylor_combination_is_bounded_by_its_remainder_bound(delta: float, order: int) -> None:
    grads, test, norms = _synthetic(seed=int(10 * delta) + order)
    provisional = 0.1 * float(norms.mean()) / grads.shape[1] * 30  # large: rho up to ~1 for the small rows
    exact = provisional * (1 + delta)
    combined = combine_taylor_terms(_terms(grads, test, provisional, order), exact / provisional - 1)
    wanted = ((grads @ test.T) / (exact + norms).unsqueeze(1)).T @ grads  # sum_i (V g_i) g_i / (lambda + n_i)
    peaks = (grads @ test.T).abs().amax(dim=1)
    remainder, scale = taylor_remainder_bound(peaks, norms, provisional, exact, order)
    errors = torch.linalg.vector_norm(combined - wanted, dim=1)  # per test row
    assert float(torch.linalg.vector_norm(wanted, dim=1).max()) <= scale * (1 + 1e-12)  # Z bounds the sum
    q_max = abs(delta) * float((provisional / (provisional + norms)).max())
    if q_max >= 1:
        assert math.isinf(remainder)
        return
    assert float(errors.max()) <= remainder * (1 + 1e-9) + 1e-15 * scale  # E bounds the truncation
    if delta == 0.0:
        assert remainder == 0.0 and float(errors.max()) <= 1e-13 * scale
    else:
        assert remainder > 0.0 and float(errors.max()) >= 1e-6 * remainder  # a bound, not a wild overestimate


# ---------------------------------------------------------------------------- a small classifier
class TinyClassifier(nn.Module):
    """``x (b, 32) -> logits (b, 3)``; LoRA (r = 4) on ``hidden``: two blocks of 128 numbers."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(32, 32)
        self.head = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.hidden(x)))


class CrossEntropy(GradientTask):
    """``l_i = -log p(y_i | x_i)`` for records ``{"x": [32 floats], "y": class}``."""

    def collate(self, examples: Any, ids: Any) -> TaskBatch:
        x = torch.tensor([ex["x"] for ex in examples], dtype=torch.float32)
        y = torch.tensor([ex["y"] for ex in examples], dtype=torch.long)
        return TaskBatch(ids=list(ids), inputs={"x": x, "y": y})

    def per_example_loss(self, model: nn.Module, batch: TaskBatch) -> torch.Tensor:
        return nn.functional.cross_entropy(model(batch.inputs["x"]), batch.inputs["y"], reduction="none")


def classifier() -> nn.Module:
    torch.manual_seed(0)
    return get_peft_model(TinyClassifier(), LoraConfig(r=4, target_modules=["hidden"], init_lora_weights=False))


def class_records(n: int, seed: int, first_scale: float = 1.0) -> list[dict[str, Any]]:
    """``n`` random examples; the first one's input times ``first_scale`` (a tiny gradient for a small scale)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        x = torch.randn(32, generator=gen) * (first_scale if i == 0 else 1.0)
        out.append({"id": f"c{seed}-{i}", "x": x.tolist(), "y": int(torch.randint(3, (1,), generator=gen))})
    return out


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str, rtol: float = 1e-4) -> None:
    scale = float(expected.abs().max())
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * 0.1 * scale, msg=what)


@pytest.fixture(scope="module")
def setup() -> tuple[nn.Module, CrossEntropy, list[dict[str, Any]], GradientStore, GradientStore]:
    model, task = classifier(), CrossEntropy()
    train = class_records(N_TRAIN, 0)
    store = collect_gradients(model, task, train, batch_size=8, progress=False)
    test = collect_gradients(model, task, class_records(N_TEST, 1), batch_size=8, progress=False)
    return model, task, train, store, test


def _source(setup: Any, records: list[dict[str, Any]] | None = None, **kwargs: Any) -> OnTheFlyGradients:
    model, task, train, _, _ = setup
    options: dict[str, Any] = {"batch_size": 5, "pilot_rows": PILOT, "progress": False, **kwargs}
    return OnTheFlyGradients(model, task, train if records is None else records, **options)


@pytest.mark.parametrize("mode", ["average", "pairwise"])
def test_fused_scores_equal_the_store_with_two_passes_and_a_pilot(setup, mode: str) -> None:
    _, _, _, store, test = setup
    expected = datainf.influence(store, test, mode=mode, batch_size=7, progress=False)
    source = _source(setup)
    fused = datainf.influence(source, test, mode=mode, batch_size=7, progress=False)
    _close(fused.values, expected.values, f"fused {mode}")
    info = fused.diagnostics["fused_norms_pass"]
    assert info["used"] and info["fallback_blocks"] == [] and info["gradient_passes"] == 2
    assert 0.0 < info["worst_bound"] <= info["tolerance"] and info["pilot_rows"] == PILOT
    assert source.rows_computed == 2 * N_TRAIN + PILOT and source.passes == 3  # pilot, fused, scoring
    assert fused.diagnostics["passes"] == expected.diagnostics["passes"] == 2  # as on a store: DataInf's + scoring
    assert fused.settings["fuse_norms_pass"] is True
    torch.testing.assert_close(source.squared_norms(), store.squared_norms(), rtol=1e-5, atol=0.0)

    unfused_source = _source(setup)
    unfused = datainf.influence(
        unfused_source, test, mode=mode, batch_size=7, progress=False, fuse_norms_pass=False
    )  # today's path: norms pass + DataInf + scoring
    assert unfused_source.rows_computed == 3 * N_TRAIN and "fused_norms_pass" not in unfused.diagnostics
    assert unfused.settings["lambdas"] == fused.settings["lambdas"]  # the recorded norms are the norms pass's
    _close(fused.values, unfused.values, f"fused vs unfused {mode}", rtol=1e-5)


@pytest.mark.parametrize("normalize", [False, True])
def test_float64_fused_equals_unfused_to_float64_round_off(setup, normalize: bool) -> None:
    _, _, _, _, test = setup
    config = InfluenceConfig(mode="pairwise", batch_size=7, compute_dtype="float64", normalize=normalize)
    fused = influence_from_config(_source(setup), test, config, progress=False)
    off = InfluenceConfig(**{**config.to_dict(), "fuse_norms_pass": False})
    unfused = influence_from_config(_source(setup), test, off, progress=False)
    assert fused.diagnostics["fused_norms_pass"]["used"]
    assert fused.diagnostics["fused_norms_pass"]["taylor_order"] == 7  # float64 keeps more terms
    assert fused.settings["lambdas"] == unfused.settings["lambdas"]
    _close(fused.values, unfused.values, f"float64 normalize={normalize}", rtol=1e-11)


def test_fixed_lambda_needs_no_pilot_and_no_norms_pass(setup) -> None:
    _, _, _, store, test = setup
    source = _source(setup)
    fused = datainf.influence(source, test, fixed_lambda=0.01, batch_size=7, progress=False)
    expected = datainf.influence(store, test, fixed_lambda=0.01, batch_size=7, progress=False)
    _close(fused.values, expected.values, "fixed lambda")
    info = fused.diagnostics["fused_norms_pass"]
    assert info["used"] and info["worst_bound"] == 0.0 and info["pilot_rows"] == 0  # lambda0 = lambda: exact
    assert source.rows_computed == 2 * N_TRAIN
    unfused = datainf.influence(
        _source(setup), test, fixed_lambda=0.01, batch_size=7, fuse_norms_pass=False, progress=False
    )
    assert torch.equal(fused.values, unfused.values)  # delta = 0: the fused sums are the ordinary ones, bit for bit


def test_other_methods_and_self_mode_keep_the_norms_pass(setup) -> None:
    _, _, _, _, test = setup
    source = _source(setup)
    scores = datainf.influence(source, test, method="hessian_free", progress=False)
    assert source.rows_computed == 2 * N_TRAIN and "fused_norms_pass" not in scores.diagnostics
    source = _source(setup)
    scores = datainf.influence(source, mode="self", batch_size=12, progress=False)
    assert "fused_norms_pass" not in scores.diagnostics and source.rows_computed == N_TRAIN * (1 + 2 + 1)


def test_a_misleading_pilot_falls_back_and_stays_exact(setup, caplog) -> None:
    model, task, _, _, test = setup
    records = class_records(N_TRAIN, 0, first_scale=1e-3)  # the pilot's one example has a tiny gradient
    store = collect_gradients(model, task, records, batch_size=8, progress=False)
    expected = datainf.influence(store, test, mode="pairwise", batch_size=7, progress=False)
    source = _source(setup, records, pilot_rows=1)
    with caplog.at_level(logging.WARNING, logger="datainf.methods.datainf_method"):
        scores = datainf.influence(source, test, mode="pairwise", batch_size=7, progress=False)
    _close(scores.values, expected.values, "fallback")
    info = scores.diagnostics["fused_norms_pass"]
    assert not info["used"] and info["gradient_passes"] == 3 and info["pilot_rows"] == 1
    assert set(info["fallback_blocks"]) == set(store.block_dims) and math.isinf(info["worst_bound"])
    assert source.rows_computed == 3 * N_TRAIN + 1  # pilot, fused (unused sums), DataInf, scoring
    assert scores.diagnostics["passes"] == 2 and "sums unused" in scores.diagnostics["passes_description"]
    assert any("Falling back" in r.message and info["fallback_blocks"][0] in r.message for r in caplog.records)


class _Killed(Exception):
    pass


@pytest.mark.parametrize("killed_in", ["scoring", "fused"])
def test_killed_fused_run_resumes(setup, tmp_path: Path, monkeypatch, killed_in: str) -> None:
    _, _, _, _, test = setup
    clean = datainf.influence(_source(setup), test, batch_size=7, progress=False)
    assert clean.diagnostics["fused_norms_pass"]["used"]

    work = tmp_path / "work"
    dying = _source(setup, work_dir=work)
    original = dying.iter_batches
    fatal = 2 if killed_in == "scoring" else 1  # passes made before the call that dies (pilot = 1, fused = 2)

    def killed(*args: Any, **kwargs: Any) -> Any:
        if dying.passes == fatal:
            raise _Killed
        return original(*args, **kwargs)

    monkeypatch.setattr(dying, "iter_batches", killed)
    with pytest.raises(_Killed):
        datainf.influence(dying, test, batch_size=7, progress=False)
    assert bool(list(work.glob("train-norms-*.safetensors"))) == (killed_in == "scoring")

    resumed = _source(setup, work_dir=work)
    scores = datainf.influence(resumed, test, batch_size=7, progress=False)
    assert torch.equal(scores.values, clean.values)
    if killed_in == "scoring":  # norms and DataInf's sums read back: the scoring pass only
        assert resumed.rows_computed == N_TRAIN and resumed.passes == 1
        assert scores.diagnostics["replayed_passes"] == 1 and "fused_norms_pass" not in scores.diagnostics
    else:  # nothing of the fused pass was kept: pilot + fused pass again
        assert resumed.rows_computed == 2 * N_TRAIN + PILOT and scores.diagnostics["fused_norms_pass"]["used"]

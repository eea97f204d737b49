"""On-the-fly training gradients (``OnTheFlyGradients``): the same scores as a store, no store on disk.

Every registered method in every mode is compared with the store path on a small LoRA regressor
whose blocks are all smaller than ``n`` (Exact's direct branch), and DataInf / Exact (Woodbury) on a
tiny BERT; then the pass counts, the refusals (changed adapter or records, bad arguments) and the
resume from a killed run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from gradient_fixtures import bert_classifier, classification_data, word_tokenizer
from peft import LoraConfig, get_peft_model
from torch import nn

import datainf
from datainf.errors import ConfigError, EmptyInputError, GradientSourceChangedError, StoreError
from datainf.factors import FACTORS_FOLDER
from datainf.gradients import OnTheFlyGradients, SequenceClassificationTask, collect_gradients
from datainf.methods import available_methods
from datainf.store import DiskGradientStore, GradientSource, GradientStore
from datainf.tasks import GradientTask, TaskBatch

N_TRAIN, N_TEST = 24, 5


class TinyRegressor(nn.Module):
    """``x (b, 3) -> (b,)`` through one hidden layer of 8 (LoRA goes on ``hidden``; ``head`` is trained whole)."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(3, 8)
        self.head = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.hidden(x))).squeeze(-1)


class HalfSquaredError(GradientTask):
    """``l_i = (f(x_i) - y_i)^2 / 2`` for records ``{"x": [3 floats], "y": float}``."""

    def collate(self, examples: Any, ids: Any) -> TaskBatch:
        x = torch.tensor([ex["x"] for ex in examples], dtype=torch.float32)
        y = torch.tensor([ex["y"] for ex in examples], dtype=torch.float32)
        return TaskBatch(ids=list(ids), inputs={"x": x, "y": y})

    def per_example_loss(self, model: nn.Module, batch: TaskBatch) -> torch.Tensor:
        return 0.5 * (model(batch.inputs["x"]) - batch.inputs["y"]) ** 2


def regressor(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = LoraConfig(r=2, target_modules=["hidden"], modules_to_save=["head"], init_lora_weights=False)
    return get_peft_model(TinyRegressor(), config)


def regression_records(n: int, seed: int) -> list[dict[str, Any]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        {"id": f"r{seed}-{i}", "x": torch.randn(3, generator=gen).tolist(), "y": float(torch.randn(1, generator=gen))}
        for i in range(n)
    ]


def _options(method: str, factors: Path | None = None) -> dict[str, Any]:
    if method in ("kfac", "ekfac"):  # the factors collected beside the store (an on-the-fly source has none)
        return {} if factors is None else {"factors": str(factors)}
    return {"iterations": 5, "scale": "trace"} if method == "lissa" else {}


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    scale = float(expected.abs().max())
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5 * scale, msg=what)


@pytest.fixture(scope="module")
def regression(
    tmp_path_factory,
) -> tuple[nn.Module, HalfSquaredError, list[dict[str, Any]], GradientStore, GradientStore]:
    model, task = regressor(), HalfSquaredError()
    train, test = regression_records(N_TRAIN, 0), regression_records(N_TEST, 1)
    folder = tmp_path_factory.mktemp("regression") / "train"
    train_store = collect_gradients(
        model, task, train, store=folder, batch_size=8, shard_size=8, collect_factors=True, progress=False
    )
    test_store = collect_gradients(model, task, test, batch_size=8, progress=False)
    return model, task, train, train_store, test_store


def test_both_kinds_of_gradients_are_gradient_sources(regression) -> None:
    model, task, train, store, _ = regression
    source = OnTheFlyGradients(model, task, train, batch_size=5, progress=False)
    assert isinstance(store, GradientSource) and isinstance(source, GradientSource)
    assert source.ids == store.ids and source.block_dims == store.block_dims and source.dtype == store.dtype
    assert source.fingerprint == store.fingerprint  # scores of either are interchangeable (cached-score reuse)
    assert max(source.block_dims.values()) <= N_TRAIN  # every block takes Exact's direct branch below
    torch.testing.assert_close(source.squared_norms(), store.squared_norms(), rtol=1e-5, atol=1e-9)
    served = {name: torch.cat(parts) for name, parts in _rows_by_block(source, rows=range(3, 17)).items()}
    for name, rows in served.items():
        torch.testing.assert_close(rows, store.to_dict()[name][3:17], rtol=1e-5, atol=1e-7)


def _rows_by_block(source: OnTheFlyGradients, rows: range) -> dict[str, list[torch.Tensor]]:
    out: dict[str, list[torch.Tensor]] = {name: [] for name in source.block_dims}
    sizes = []
    for ids, batch in source.iter_batches(4, rows=rows):
        sizes.append(len(ids))
        for name, tensor in batch.items():
            out[name].append(tensor)
    assert sizes == [4, 4, 4, 2]  # the engine's batch size, assembled from the source's batches of 5
    return out


@pytest.mark.filterwarnings("ignore::datainf.methods.LissaDivergenceWarning")  # the same on both paths
@pytest.mark.parametrize("method", available_methods())
def test_every_method_and_mode_equals_the_store(regression, method: str) -> None:
    model, task, train, store, test = regression
    assert isinstance(store, DiskGradientStore)
    source = OnTheFlyGradients(model, task, train, batch_size=5, progress=False)
    kronecker = method in ("kfac", "ekfac")
    if kronecker:  # no factors with the source: one clear refusal; given the store's factors folder, it runs
        with pytest.raises(StoreError, match="no Kronecker factors"):
            datainf.influence(source, test, method=method, progress=False)
    for mode in ("average", "pairwise", "self"):
        for normalize in (False, True) if mode == "average" and not kronecker else (False,):
            kwargs: dict[str, Any] = {
                "method": method,
                "mode": mode,
                "method_options": _options(method, store.path / FACTORS_FOLDER),
                "normalize": normalize,
                "batch_size": 7,
                "progress": False,
            }
            expected = datainf.influence(store, None if mode == "self" else test, **kwargs)
            actual = datainf.influence(source, None if mode == "self" else test, **kwargs)
            _close(actual.values, expected.values, f"{method} {mode} normalize={normalize}")
            assert actual.train_ids == expected.train_ids
            if mode == "self":  # chunks of exactly batch_size rows (a RAM store's end at its appended batches)
                assert actual.diagnostics["passes"] <= expected.diagnostics["passes"]
            else:
                assert actual.diagnostics["passes"] == expected.diagnostics["passes"]
            if method == "exact":
                assert actual.diagnostics["exact_branches"]["woodbury"] == 0


def test_datainf_costs_a_pilot_plus_its_two_passes(regression) -> None:
    model, task, train, _, test = regression
    source = OnTheFlyGradients(model, task, train, batch_size=5, progress=False)
    scores = datainf.influence(source, test, batch_size=7, progress=False)
    assert scores.diagnostics["passes"] == 2 and source.passes == 3  # pilot + DataInf's fused sum + scoring
    assert source.rows_computed == 3 * N_TRAIN  # the default pilot (128 rows) covers all 24: lambda0 is exact
    assert scores.diagnostics["fused_norms_pass"]["used"] and scores.diagnostics["fused_norms_pass"]["worst_bound"] == 0
    datainf.influence(source, test, method="hessian_free", progress=False)
    assert source.passes == 4  # the norms are kept: Hessian-free adds its scoring pass only
    unfused = OnTheFlyGradients(model, task, train, batch_size=5, progress=False)
    off = datainf.influence(unfused, test, batch_size=7, fuse_norms_pass=False, progress=False)
    assert unfused.passes == 3 and "fused_norms_pass" not in off.diagnostics  # norms + DataInf's sum + scoring
    assert torch.equal(off.values, scores.values)  # delta = 0: the fused sums are the ordinary ones, bit for bit


def test_bert_datainf_and_exact_woodbury(tmp_path: Path) -> None:
    """A tiny BERT (blocks of 128 > n = 9 numbers: Exact keeps X_l, through the streaming helpers, as on a store)."""
    model, task = bert_classifier(), SequenceClassificationTask(word_tokenizer())
    train, test = classification_data(9, seed=0), classification_data(3, seed=1)
    store = collect_gradients(model, task, train, batch_size=4, progress=False)
    test_store = collect_gradients(model, task, test, batch_size=4, progress=False)
    source = OnTheFlyGradients(model, task, train, batch_size=3, work_dir=tmp_path / "work", progress=False)
    for method, mode in (("datainf", "average"), ("datainf", "self"), ("exact", "pairwise")):
        expected = datainf.influence(
            store, None if mode == "self" else test_store, method=method, mode=mode, progress=False
        )
        actual = datainf.influence(
            source, None if mode == "self" else test_store, method=method, mode=mode, progress=False
        )
        _close(actual.values, expected.values, f"{method} {mode}")
        if method == "exact":
            assert actual.diagnostics["exact_branches"] == expected.diagnostics["exact_branches"]
            assert actual.diagnostics["exact_branches"]["woodbury"] >= 8  # the LoRA blocks (128 numbers each)
    written = sum(f.stat().st_size for f in (tmp_path / "work").rglob("*") if f.is_file())
    gradient_bytes = 4 * store.num_examples * sum(store.block_dims.values())
    norms = next((tmp_path / "work").glob("train-norms-*.safetensors"))
    assert norms.stat().st_size < 1024  # n x L float64: no gradient is written
    assert written < 3 * gradient_bytes  # pass checkpoints: (m, d_l) sums and the scores, never (n, d_l) per pass


def test_changed_adapter_between_passes_is_refused(regression) -> None:
    _, task, train, _, test = regression
    model = regressor()
    source = OnTheFlyGradients(model, task, train, batch_size=5, progress=False)
    source.squared_norms()
    lora_a = next(p for name, p in model.named_parameters() if "lora_A" in name)
    with torch.no_grad():
        lora_a.add_(0.5)
    with pytest.raises(GradientSourceChangedError, match="trainable \\(adapter\\) weights changed"):
        datainf.influence(source, test, progress=False)


def test_changed_records_between_passes_are_refused(regression) -> None:
    model, task, _, _, test = regression
    records = regression_records(N_TRAIN, 0)
    source = OnTheFlyGradients(model, task, records, batch_size=5, progress=False)
    source.squared_norms()
    records[3]["y"] = 100.0
    with pytest.raises(GradientSourceChangedError, match="the training records changed"):
        datainf.influence(source, test, progress=False)
    records[3]["y"] = regression_records(N_TRAIN, 0)[3]["y"]
    records.pop()
    with pytest.raises(GradientSourceChangedError, match="now 23, were 24"):
        datainf.influence(source, test, progress=False)


def test_bad_arguments_are_refused(regression) -> None:
    model, task, train, _, _ = regression
    with pytest.raises(EmptyInputError, match="training records are empty"):
        OnTheFlyGradients(model, task, [], progress=False)
    with pytest.raises(ConfigError, match="batch_size=0"):
        OnTheFlyGradients(model, task, train, batch_size=0, progress=False)
    with pytest.raises(ConfigError, match="dtype 'int8'"):
        OnTheFlyGradients(model, task, train, dtype="int8", progress=False)
    source = OnTheFlyGradients(model, task, train, progress=False)
    with pytest.raises(ConfigError, match="contiguous range"):
        next(source.iter_batches(4, rows=range(0, 30)))


class _Killed(Exception):
    pass


@pytest.mark.filterwarnings("ignore::datainf.methods.LissaDivergenceWarning")
@pytest.mark.parametrize("method", ["datainf", "lissa"])
def test_killed_run_resumes_at_pass_granularity(regression, tmp_path: Path, monkeypatch, method: str) -> None:
    model, task, train, _, test = regression
    options = _options(method)
    clean = datainf.influence(
        OnTheFlyGradients(model, task, train, batch_size=5, progress=False),
        test,
        method=method,
        method_options=options,
        batch_size=7,
        progress=False,
    )
    total = clean.diagnostics["passes"]  # the method's passes + scoring (DataInf 2, LiSSA 5 + 1)

    work = tmp_path / "work"
    dying = OnTheFlyGradients(model, task, train, batch_size=5, work_dir=work, progress=False)
    original = dying.iter_batches

    def killed_in_the_last_pass(*args: Any, **kwargs: Any) -> Any:
        if dying.passes == total:  # the norms pass, then every pass but the scoring one, are done
            raise _Killed
        return original(*args, **kwargs)

    monkeypatch.setattr(dying, "iter_batches", killed_in_the_last_pass)
    with pytest.raises(_Killed):
        datainf.influence(dying, test, method=method, method_options=options, batch_size=7, progress=False)

    resumed = OnTheFlyGradients(model, task, train, batch_size=5, work_dir=work, progress=False)
    scores = datainf.influence(resumed, test, method=method, method_options=options, batch_size=7, progress=False)
    assert resumed.passes == 1  # norms read back, the method's passes replayed: only the scoring pass is computed
    assert scores.diagnostics["replayed_passes"] == total - 1 and scores.diagnostics["passes"] == total
    assert torch.equal(scores.values, clean.values)

    other = datainf.influence(resumed, test, method=method, method_options=options, damping=0.2, progress=False)
    assert other.diagnostics["replayed_passes"] == 0  # another computation never reads these checkpoints

"""The linear datamodeling score: its math by hand, retrains on a tiny logistic model (oracle vs random
scores), resuming after a kill, the fine-tuning recipe on a tiny BERT, and bad input."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats
from tiny_models import WORDS, save_tiny_model

from datainf.counterfactual import (
    FinetuneTrainer,
    LDSSettings,
    align_scores,
    draw_subsets,
    lds_run,
    run_retrains,
)
from datainf.errors import ConfigError, DatasetError
from datainf.evaluation import MIN_LDS_SUBSETS, lds, predicted_outputs
from datainf.scores import Scores
from lds_fixtures import LogisticTrainer, fit, losses

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------- the math


def test_lds_matches_a_hand_computation() -> None:
    scores = np.array([[1.0, -2.0, 0.5], [0.0, 1.0, 3.0]])  # (n_test=2, n_train=3)
    rng = np.random.default_rng(0)
    masks = rng.random((12, 3)) < 0.5
    masks[0] = [True, False, False]
    masks[1] = [False, True, True]
    measured = rng.normal(size=(12, 2))
    # the prediction for subset j and test t: the sum of I[t, k] over the examples subset j keeps
    by_hand = np.array([[sum(scores[t, k] for k in range(3) if masks[j, k]) for t in range(2)] for j in range(12)])
    assert np.allclose(predicted_outputs(scores, masks), by_hand)
    result = lds(scores, masks, measured, n_bootstrap=200)
    expected = [stats.spearmanr(by_hand[:, t], measured[:, t])[0] for t in range(2)]
    assert np.allclose(result.per_test, expected)
    assert result.mean == pytest.approx(np.mean(expected))
    low, high = result.interval
    assert low <= high and result.n_subsets == 12 and result.n_undefined == 0
    assert lds(scores, masks, measured, n_bootstrap=200).interval == result.interval  # seeded
    # losses that follow the prediction exactly give 1; the reverse gives -1
    assert lds(scores, masks, 3 * by_hand + 1, n_bootstrap=200).mean == pytest.approx(1.0)
    assert lds(scores, masks, -by_hand, n_bootstrap=200).mean == pytest.approx(-1.0)


def test_lds_accepts_pairwise_scores_objects_and_refuses_other_modes() -> None:
    values = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
    pairwise = Scores(values=values, train_ids=["a", "b", "c"], test_ids=["t"], method="m", mode="pairwise")
    masks = np.random.default_rng(1).random((10, 3)) < 0.5
    measured = masks @ np.array([[1.0], [2.0], [3.0]])
    masks[0], measured[0] = [True, True, False], [3.0]
    assert lds(pairwise, masks, measured, n_bootstrap=100).mean == pytest.approx(1.0)
    average = Scores(values=values[0], train_ids=["a", "b", "c"], test_ids=["t"], method="m", mode="average")
    with pytest.raises(DatasetError, match="pairwise scores"):
        lds(average, masks, measured)


def test_lds_bad_input() -> None:
    scores = np.ones((2, 4))
    scores[0, 1] = 2
    masks = np.random.default_rng(0).random((MIN_LDS_SUBSETS, 4)) < 0.5
    measured = np.random.default_rng(1).normal(size=(MIN_LDS_SUBSETS, 2))
    with pytest.raises(DatasetError, match=r"4 training examples.*subset_masks has 3"):
        lds(scores, masks[:, :3], measured)
    with pytest.raises(DatasetError, match=r"measured must have shape \(M, n_test\) = \(10, 2\).*got \(10, 3\)"):
        lds(scores, masks, np.zeros((MIN_LDS_SUBSETS, 3)))
    with pytest.raises(ConfigError, match=f"5 subsets are too few.*at least {MIN_LDS_SUBSETS} are needed"):
        lds(scores, masks[:5], measured[:5])
    with pytest.raises(DatasetError, match="NaN or infinite"):
        lds(np.full((2, 4), np.nan), masks, measured)
    with pytest.raises(DatasetError, match="undefined for every test example"):
        lds(scores, masks, np.zeros_like(measured))
    with pytest.raises(ConfigError, match="confidence"):
        lds(scores, masks, measured, confidence=1.5)


def test_draw_subsets_is_seeded_and_checks_its_settings() -> None:
    masks = draw_subsets(20, n_subsets=12, fraction=0.25, seed=3)
    assert masks.shape == (12, 20) and (masks.sum(axis=1) == 5).all()
    assert np.array_equal(masks, draw_subsets(20, n_subsets=12, fraction=0.25, seed=3))
    assert np.array_equal(masks[:10], draw_subsets(20, n_subsets=10, fraction=0.25, seed=3))  # prefix-stable
    assert not np.array_equal(masks, draw_subsets(20, n_subsets=12, fraction=0.25, seed=4))
    for fraction in (0.0, 1.0, -0.5, 1.5):
        with pytest.raises(ConfigError, match="strictly between 0 and 1"):
            draw_subsets(20, fraction=fraction)
    with pytest.raises(ConfigError, match=f"too few.*at least {MIN_LDS_SUBSETS}"):
        draw_subsets(20, n_subsets=3)
    with pytest.raises(ConfigError, match="keeps between 1 and 2"):
        draw_subsets(3, fraction=0.1)


# ---------------------------------------------------------------------------------------------- a tiny logistic model


def _oracle_scores(trainer: LogisticTrainer) -> np.ndarray:
    """Actual leave-one-out effects, with the sign convention: I[t, k] = L_t(all) - L_t(all but k) > 0 when
    example k raises test loss t (harmful)."""
    x, y, xt, yt = trainer._data()
    full = losses(fit(x, y, trainer.reg), xt, yt)
    n = len(x)
    out = np.empty((len(xt), n))
    for k in range(n):
        keep = np.arange(n) != k
        out[:, k] = full - losses(fit(x[keep], y[keep], trainer.reg), xt, yt)
    return out


def test_oracle_scores_get_a_high_lds_and_random_scores_about_zero(tmp_path: Path) -> None:
    trainer = LogisticTrainer()
    result = run_retrains(tmp_path / "lds", trainer, n_subsets=50, fraction=0.5, seed=0, progress=False)
    assert result.measured.shape == (50, len(trainer.test_ids)) and result.reused == 0
    oracle = lds(_oracle_scores(trainer), result.masks, result.measured)
    assert oracle.mean > 0.8 and oracle.interval[0] > 0.6
    assert lds(-_oracle_scores(trainer), result.masks, result.measured).mean < -0.8  # the sign matters
    random_means = [
        lds(np.random.default_rng(s).normal(size=(12, 24)), result.masks, result.measured).mean for s in range(5)
    ]
    assert abs(np.mean(random_means)) < 0.1
    assert all(
        low < 0 < high
        for low, high in [lds(np.random.default_rng(9).normal(size=(12, 24)), result.masks, result.measured).interval]
    )


def test_a_killed_evaluation_resumes_without_repeating_a_retrain(tmp_path: Path) -> None:
    calls = tmp_path / "calls.txt"
    out = tmp_path / "lds"
    with pytest.raises(KeyboardInterrupt):
        run_retrains(out, LogisticTrainer(fail_at_call=7, calls_file=str(calls)), n_subsets=12, progress=False)
    assert calls.read_text().count("\n") == 6 and len(list((out / "retrains").glob("*.json"))) == 6
    resumed = run_retrains(out, LogisticTrainer(calls_file=str(calls)), n_subsets=12, progress=False)
    assert resumed.reused == 6 and calls.read_text().count("\n") == 12  # 6 before the kill + the 6 missing
    again = run_retrains(out, LogisticTrainer(calls_file=str(calls)), n_subsets=12, progress=False)
    assert again.reused == 12 and calls.read_text().count("\n") == 12
    assert np.array_equal(again.measured, resumed.measured)
    with pytest.raises(ConfigError, match="different configuration"):
        run_retrains(out, LogisticTrainer(reg=2.0), n_subsets=12, progress=False)


def test_parallel_retrains_give_the_same_losses(tmp_path: Path) -> None:
    serial = run_retrains(tmp_path / "a", LogisticTrainer(), n_subsets=10, progress=False)
    parallel = run_retrains(tmp_path / "b", LogisticTrainer(), n_subsets=10, jobs=2, progress=False)
    assert np.array_equal(serial.measured, parallel.measured) and np.array_equal(serial.masks, parallel.masks)


def _pairwise(values: np.ndarray, train_ids: list[str], test_ids: list[str], method: str = "oracle") -> Scores:
    return Scores(values=torch.tensor(values), train_ids=train_ids, test_ids=test_ids, method=method, mode="pairwise")


def test_lds_run_aligns_ids_and_refuses_scores_of_another_dataset(tmp_path: Path) -> None:
    trainer = LogisticTrainer()
    oracle = _oracle_scores(trainer)
    order = np.random.default_rng(0).permutation(24)  # the scores' columns in another order: aligned by id
    shuffled = _pairwise(oracle[:, order], [trainer.train_ids[i] for i in order], trainer.test_ids)
    path = shuffled.save(tmp_path / "scores-oracle.safetensors")
    settings = LDSSettings(out=str(tmp_path / "lds"), scores=(str(path),), subsets=20)
    result = lds_run(settings, trainer=trainer, progress=False)
    direct = lds(oracle, result.retrains.masks, result.retrains.measured)
    assert result.results["oracle"].mean == pytest.approx(direct.mean) and direct.mean > 0.8
    written = json.loads(result.path.read_text())
    assert written["methods"]["oracle"]["lds"] == pytest.approx(direct.mean)

    other = _pairwise(oracle, [f"x{i}" for i in range(24)], trainer.test_ids)
    bad = other.save(tmp_path / "scores-other.safetensors")
    with pytest.raises(DatasetError, match=r"other training examples.*\['x0', 'x1'.*\['tr0', 'tr1'"):
        lds_run(LDSSettings(out=str(tmp_path / "lds2"), scores=(str(bad),), subsets=20), trainer=trainer)
    assert not (tmp_path / "lds2").exists()  # refused before any retrain or folder
    with pytest.raises(DatasetError, match="other test examples"):
        align_scores(
            _pairwise(oracle[:11], trainer.train_ids, trainer.test_ids[:11]), trainer.train_ids, trainer.test_ids
        )
    for bad_settings, message in (
        (LDSSettings(out=str(tmp_path / "l3"), scores=(str(path),), fraction=1.0), "strictly between 0 and 1"),
        (LDSSettings(out=str(tmp_path / "l3"), scores=(str(path),), subsets=4), "at least 10 are needed"),
    ):
        with pytest.raises(ConfigError, match=message):
            lds_run(bad_settings, trainer=trainer)
        assert not (tmp_path / "l3").exists()


# ---------------------------------------------------------------------------------------------- the fine-tuning recipe


def _sentiment(path: Path, n: int, seed: int, prefix: str) -> Path:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "pos" if i % 2 else "neg"
        cue = ["good", "great", "fine"] if label == "pos" else ["bad", "awful", "poor"]
        words = rng.sample(WORDS[:10], 3) + rng.sample(cue, 2)
        rows.append({"id": f"{prefix}{i}", "text": " ".join(words), "label": label})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tiny_recipe(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("recipe")
    return {
        "model": save_tiny_model(root / "tiny"),
        "train": _sentiment(root / "train.jsonl", 12, 0, "r"),
        "test": _sentiment(root / "test.jsonl", 4, 1, "t"),
    }


def test_finetune_recipe_retrains_are_deterministic_and_depend_on_the_subset(tiny_recipe: dict[str, Path]) -> None:
    from datainf.workflows import FinetuneSettings

    recipe = FinetuneSettings(
        model=str(tiny_recipe["model"]), data=str(tiny_recipe["train"]), epochs=2, batch_size=4, lr=5e-3, max_length=16
    )
    trainer = FinetuneTrainer.from_recipe(recipe, tiny_recipe["test"])
    assert trainer.train_ids == [f"r{i}" for i in range(12)] and trainer.test_ids == [f"t{i}" for i in range(4)]
    first = trainer(np.arange(6))
    assert first.shape == (4,) and np.isfinite(first).all()
    assert np.array_equal(first, trainer(np.arange(6)))  # seeded: the same subset, the same losses
    assert not np.array_equal(first, trainer(np.arange(6, 12)))


def test_evaluate_lds_command_and_a_recipe_that_does_not_fit(tiny_recipe: dict[str, Path], tmp_path: Path) -> None:
    from datainf.cli import main

    ids = [f"r{i}" for i in range(12)]
    scores = _pairwise(np.random.default_rng(0).normal(size=(4, 12)), ids, [f"t{i}" for i in range(4)], "random")
    path = scores.save(tmp_path / "scores-random.safetensors")
    common = [
        "evaluate",
        "lds",
        "--scores",
        str(path),
        "--model",
        str(tiny_recipe["model"]),
        "--data",
        str(tiny_recipe["train"]),
        "--test-data",
        str(tiny_recipe["test"]),
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--max-length",
        "16",
        "--subsets",
        "10",
        "-q",
    ]
    assert main([*common, "--out", str(tmp_path / "lds")]) == 0
    written = json.loads((tmp_path / "lds" / "lds.json").read_text())
    assert written["retrains"]["count"] == 10 and -1 <= written["methods"]["random"]["lds"] <= 1
    # a recipe whose target layers the model lacks: one clear error from the first retrain, nothing left behind
    assert main([*common, "--target-modules", "nope", "--out", str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "bad").exists()


def test_the_recipe_replays_a_finetune_run_and_is_not_mixed_with_flags(
    tiny_recipe: dict[str, Path], tmp_path: Path
) -> None:
    from dataclasses import asdict

    from datainf.counterfactual import lds_settings, load_recipe
    from datainf.workflows import FinetuneSettings

    recipe = FinetuneSettings(model=str(tiny_recipe["model"]), data=str(tiny_recipe["train"]), epochs=3, lr=1e-3)
    run = tmp_path / "ft"
    run.mkdir()
    (run / "config.json").write_text(
        json.dumps({"format": "datainf-cli-config", "command": "finetune", **asdict(recipe)})
    )
    assert load_recipe(run) == load_recipe(run / "config.json") == recipe
    (tmp_path / "grads.json").write_text(json.dumps({"command": "grads"}))
    with pytest.raises(ConfigError, match="not the config.json of a `datainf finetune` run"):
        load_recipe(tmp_path / "grads.json")
    assert lds_settings({"recipe": str(run), "epochs": 10, "target_modules": ["query", "value"]}).recipe == str(run)
    with pytest.raises(ConfigError, match=r"either --recipe .* \(epochs\), not both"):
        lds_settings({"recipe": str(run), "epochs": 3})

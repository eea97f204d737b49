"""The shared explain-a-generation step: pairwise scores, class metrics, the generation report and the demo wrapper."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from datainf.demos import main_generation_demo, run_generation_demo
from datainf.errors import ConfigError, DatasetError
from datainf.explain import ExplanationResult, class_indices, format_generation_table, score_and_evaluate
from datainf.report import write_generation_report
from datainf.scores import Scores
from datainf.store import GradientStore

N_CLASSES, TRAIN_PER_CLASS, TEST_PER_CLASS, DIM = 3, 6, 2, 12


def _planted_gradients(
    seed: int = 0,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], np.ndarray, np.ndarray]:
    """Class ``c`` lives on its own coordinates (4c..4c+3): same-class train/test gradients align,
    others are orthogonal, so ``-I`` separates same-class examples perfectly."""
    gen = torch.Generator().manual_seed(seed)

    def rows(count: int, c: int) -> torch.Tensor:
        out = torch.zeros(count, DIM, dtype=torch.float64)
        out[:, 4 * c : 4 * c + 4] = 1.0 + 0.1 * torch.rand(count, 4, generator=gen, dtype=torch.float64)
        return out

    train = torch.cat([rows(TRAIN_PER_CLASS, c) for c in range(N_CLASSES)])
    test = torch.cat([rows(TEST_PER_CLASS, c) for c in range(N_CLASSES)])
    train_c = np.repeat(np.arange(N_CLASSES), TRAIN_PER_CLASS)
    test_c = np.repeat(np.arange(N_CLASSES), TEST_PER_CLASS)
    # two blocks, so the per-block sum matters
    return {"a": train[:, :6], "b": train[:, 6:]}, {"a": test[:, :6], "b": test[:, 6:]}, train_c, test_c


def test_planted_separation_gives_auc_and_recall_one():
    train, test, train_c, test_c = _planted_gradients()
    scores, metrics = score_and_evaluate(
        GradientStore.from_tensors(train),
        GradientStore.from_tensors(test),
        train_c,
        test_c,
        methods=("datainf", "hessian_free", "exact"),
        progress=False,
    )
    assert set(scores) == {"datainf", "hessian_free", "exact"}
    for row in metrics:
        assert row["auc_mean"] == pytest.approx(1.0) and row["recall_mean"] == pytest.approx(1.0), row
        assert row["auc_std"] == pytest.approx(0.0) and row["n_test"] == N_CLASSES * TEST_PER_CLASS
        assert scores[row["method"]].values.shape == (N_CLASSES * TEST_PER_CLASS, N_CLASSES * TRAIN_PER_CLASS)
    # same-class examples are helpful (negative influence), the others contribute nothing
    values = scores["datainf"].values.numpy()
    same = test_c[:, None] == train_c[None, :]
    assert (values[same] < 0).all() and np.allclose(values[~same], 0.0)
    table = format_generation_table(metrics)
    assert "datainf" in table and "1.000" in table


def test_reversed_classes_give_auc_zero():
    """Metric direction: scoring each test example against the wrong class labels ranks them last."""
    train, test, train_c, test_c = _planted_gradients()
    wrong = (train_c + 1) % N_CLASSES
    _, metrics = score_and_evaluate(
        GradientStore.from_tensors(train),
        GradientStore.from_tensors(test),
        wrong,
        test_c,
        methods=("datainf",),
        progress=False,
    )
    assert metrics[0]["recall_mean"] == pytest.approx(0.0)
    assert metrics[0]["auc_mean"] < 0.5


def test_class_field_missing_and_length_mismatch_are_refused():
    with pytest.raises(DatasetError, match="'class' field"):
        class_indices([{"id": "a", "class": 0}, {"id": "b"}])
    assert class_indices([{"class": 2}, {"class": 0}]).tolist() == [2, 0]
    train, test, train_c, test_c = _planted_gradients()
    with pytest.raises(DatasetError, match="must match"):
        score_and_evaluate(
            GradientStore.from_tensors(train), GradientStore.from_tensors(test), train_c[:-1], test_c, progress=False
        )


def _result(task: str) -> ExplanationResult:
    train_g, test_g, train_c, test_c = _planted_gradients()
    scores, metrics = score_and_evaluate(
        GradientStore.from_tensors(train_g, ids=[f"tr{i}" for i in range(len(train_c))]),
        GradientStore.from_tensors(test_g, ids=[f"te{i}" for i in range(len(test_c))]),
        train_c,
        test_c,
        methods=("datainf", "hessian_free"),
        progress=False,
    )
    names = ["alpha", "beta", "gamma"]

    def record(prefix: str, i: int, c: int) -> dict:
        rec = {"id": f"{prefix}{i}", "prompt": f"prompt <{prefix}{i}>", "class": int(c), "class_name": names[c]}
        if task == "text-to-image":
            rec["pixel_values"] = torch.full((1, 8, 8), -1.0 + 0.5 * c)
        else:
            rec["response"] = f"response of {prefix}{i}"
        return rec

    train = [record("tr", i, c) for i, c in enumerate(train_c)]
    test = [record("te", i, c) for i, c in enumerate(test_c)]
    generations = {
        r["id"]: (torch.zeros(1, 8, 8) if task == "text-to-image" else f"generated for {r['id']}") for r in test
    }
    return ExplanationResult(
        task=task,
        dataset="toy",
        class_names=names,
        train=train,
        test=test,
        scores=scores,
        metrics=metrics,
        quality={"exact_match_after": 0.5},
        generations=generations,
    )


def test_text_generation_report_lists_helpful_examples_of_the_same_class(tmp_path):
    result = _result("text-generation")
    path = write_generation_report(tmp_path / "r", result, n_examples=3, k=5)
    page = path.read_text()
    assert "positive influence = harmful" in page.lower()
    # one test example per class, in turn: te0 (alpha), te2 (beta), te4 (gamma)
    assert "Test example te0" in page and "Test example te2" in page and "Test example te4" in page
    assert "Test example te1" not in page
    assert "generated for te2" in page and "response of te2" in page
    # te0's 5 most helpful are alpha training examples tr0..tr5 (the same class), shown as such
    section = page.split("Test example te0")[1].split("Test example te2")[0]
    helpful = section.split("most harmful")[0]
    assert helpful.count("(same class)") == 5
    assert "exact_match_after" in page and "0.500" in page


def test_text_to_image_report_writes_thumbnails(tmp_path):
    result = _result("text-to-image")
    path = write_generation_report(tmp_path / "r", result, n_examples=2, k=3)
    pngs = sorted(p.name for p in path.parent.glob("*.png"))
    assert (
        "test0-ref.png" in pngs and "test0-gen.png" in pngs and "test1-help3.png" in pngs and "test1-harm1.png" in pngs
    )
    assert (path.parent / "test0-ref.png").read_bytes()[:4] == b"\x89PNG"
    assert "<img class='thumb' src='test0-gen.png'" in path.read_text()


def test_generation_report_refuses_average_scores_and_unknown_method(tmp_path):
    result = _result("text-generation")
    with pytest.raises(ConfigError, match="No scores for method 'exact'"):
        write_generation_report(tmp_path / "r", result, method="exact")
    s = result.scores["datainf"]
    result.scores = {
        "datainf": Scores(
            values=s.values.mean(dim=0), train_ids=s.train_ids, test_ids=["mean"], method="datainf", mode="average"
        )
    }
    with pytest.raises(ConfigError, match="pairwise"):
        write_generation_report(tmp_path / "r", result)
    assert not (tmp_path / "r").exists()


def test_generation_demo_wiring_and_dataset_check(tmp_path, monkeypatch, capsys):
    import datainf.explain as explain_pkg

    calls = {}

    class FakeConfig:
        def __init__(self, dataset: str, seed: int, **scoring) -> None:
            self.dataset, self.seed, self.scoring = dataset, seed, scoring

    def fake_run(config, *, out_dir, recompute, progress):
        calls.update(
            dataset=config.dataset, seed=config.seed, out=Path(out_dir), recompute=recompute, progress=progress
        )
        if config.scoring:
            calls["scoring"] = config.scoring
        return _result("text-generation")

    fake = type("M", (), {"TextGenerationConfig": FakeConfig, "run_text_generation": staticmethod(fake_run)})
    monkeypatch.setitem(__import__("sys").modules, "datainf.explain.text_generation", fake)
    monkeypatch.setattr(explain_pkg, "text_generation", fake, raising=False)
    with pytest.raises(ConfigError, match="does not belong to --task text-generation"):
        run_generation_demo("text-generation", "style", out_dir=tmp_path)
    with pytest.raises(ConfigError, match="Unknown demo task"):
        run_generation_demo("speech", None, out_dir=tmp_path)

    import argparse

    code = main_generation_demo(
        argparse.Namespace(
            task="text-generation", dataset=None, out=str(tmp_path / "o"), seed=4, recompute=True, quiet=True
        )
    )
    assert code == 0
    assert calls == {"dataset": "sentence", "seed": 4, "out": tmp_path / "o", "recompute": True, "progress": False}
    out = capsys.readouterr().out
    assert "AUC" in out and "Report:" in out
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["dataset"] == "sentence" and summary["metrics"][0]["method"] == "datainf"
    assert (tmp_path / "o" / "report" / "index.html").is_file()

    # the scoring options reach the pipeline's configuration
    run_generation_demo(
        "text-generation", None, out_dir=tmp_path / "o2", methods=["ekfac"], normalize=True, self_influence=True
    )
    assert calls["scoring"] == {"methods": ("ekfac",), "normalize": True, "self_influence": True}


def test_normalised_and_self_influence_scores_go_through_the_engine():
    from datainf.explain.common import needs_factors, self_influence_scores
    from datainf.influence import influence

    train, test, train_c, test_c = _planted_gradients()
    train_store, test_store = GradientStore.from_tensors(train), GradientStore.from_tensors(test)
    scores, _ = score_and_evaluate(
        train_store, test_store, train_c, test_c, methods=("datainf", "hessian_free"), normalize=True, progress=False
    )
    for method in ("datainf", "hessian_free"):
        direct = influence(train_store, test_store, method=method, mode="pairwise", normalize=True, progress=False)
        assert torch.equal(scores[method].values, direct.values) and scores[method].settings["normalize"]
    own = self_influence_scores(train_store, methods=("datainf", "diagonal"), progress=False)
    for method, s in own.items():
        direct = influence(train_store, None, method=method, mode="self", progress=False)
        assert s.mode == "self" and torch.equal(s.values, direct.values)
    assert needs_factors(["datainf", "ekfac"]) and not needs_factors(["datainf", "diagonal"])


def test_text_to_image_scoring_options_keep_the_cache_key():
    from datainf.explain.text_to_image import TextToImageConfig

    config = TextToImageConfig()
    varied = TextToImageConfig(normalize=True, self_influence=True, methods=("datainf", "kfac"))
    assert varied.key("x") == config.key("x")
    with pytest.raises(ConfigError, match="normalize"):
        TextToImageConfig(normalize="yes")  # type: ignore[arg-type]

"""datainf.workflows from Python: the same output-folder protection as the command line, same settings."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from datainf.cli.options import NOT_SAVED, options
from datainf.errors import ConfigError
from datainf.influence import influence
from datainf.runs import CONFIG_FILE
from datainf.scores import Scores
from datainf.store import GradientStore
from datainf.workflows import (
    FinetuneSettings,
    GradientsSettings,
    ReportSettings,
    ScoreSettings,
    finetune_run,
    report_run,
    score_run,
    settings_from_mapping,
)

DIMS = {"layer.lora_A": 6, "layer.lora_B": 4}


def _store(path: Path, n: int, seed: int, prefix: str) -> Path:
    generator = torch.Generator().manual_seed(seed)
    store = GradientStore.create(path, block_dims=DIMS, fingerprint={"model": "m"})
    store.append(
        [f"{prefix}{i}" for i in range(n)], {k: torch.randn(n, d, generator=generator) for k, d in DIMS.items()}
    )
    store.finalize()
    return path


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("stores")
    return _store(root / "train", 12, 0, "tr"), _store(root / "test", 3, 1, "te")


@pytest.mark.parametrize(
    ("command", "cls"),
    [
        ("finetune", FinetuneSettings),
        ("grads", GradientsSettings),
        ("score", ScoreSettings),
        ("report", ReportSettings),
    ],
)
def test_settings_fields_and_defaults_are_the_command_line_options(command: str, cls: type) -> None:
    """config.json written from Python and from the CLI must be interchangeable: same keys, same defaults."""
    saved = [o for o in options(command) if o.dest not in NOT_SAVED]
    assert [f.name for f in dataclasses.fields(cls)] == [o.dest for o in saved]
    defaults = dataclasses.asdict(cls())
    for opt in saved:
        assert json.loads(json.dumps(defaults[opt.dest])) == opt.default, opt.dest


def test_score_run_refuses_a_different_configuration_unless_overwrite(
    stores: tuple[Path, Path], tmp_path: Path
) -> None:
    train, test = stores
    out = tmp_path / "s"
    settings = ScoreSettings(out=str(out), train_grads=str(train), test_grads=str(test), method=("datainf", "exact"))
    first = score_run(settings, progress=False)
    assert [m.method for m in first.methods] == ["datainf", "exact"] and not any(m.reused for m in first.methods)
    expected = influence(GradientStore.open(train), GradientStore.open(test), method="datainf", progress=False)
    assert torch.equal(first.scores["datainf"].values, expected.values)
    assert (out / "scores-datainf.csv").is_file() and first.methods[0].path == out / "scores-datainf.safetensors"
    stored = json.loads((out / CONFIG_FILE).read_text())
    assert stored["command"] == "score" and stored["method"] == ["datainf", "exact"] and stored["out"] == str(out)

    again = score_run(settings, progress=False)  # the same configuration: finished scores are reused
    assert all(m.reused for m in again.methods)
    assert torch.equal(again.scores["exact"].values, first.scores["exact"].values)

    other = dataclasses.replace(settings, damping=0.2)
    with pytest.raises(ConfigError, match=r"different configuration: damping \(stored 0.1, now 0.2\).*overwrite=True"):
        score_run(other, progress=False)
    assert Scores.load(out / "scores-datainf.safetensors").settings["damping"] == 0.1  # untouched
    replaced = score_run(other, overwrite=True, progress=False)
    assert not any(m.reused for m in replaced.methods)
    assert Scores.load(out / "scores-datainf.safetensors").settings["damping"] == 0.2


def test_score_run_recomputes_scores_of_other_gradients(tmp_path: Path) -> None:
    train, test = _store(tmp_path / "train", 12, 0, "tr"), _store(tmp_path / "test", 3, 1, "te")
    settings = ScoreSettings(out=str(tmp_path / "s"), train_grads=str(train), test_grads=str(test))
    first = score_run(settings, progress=False)
    assert first.scores["datainf"].matches(GradientStore.open(train), GradientStore.open(test))
    # the training store is recomputed in place (same path: the same configuration) for other examples
    GradientStore.create(train, block_dims=DIMS, fingerprint={"model": "m"}, overwrite=True)
    _store(train, 11, 2, "tr")
    assert not first.scores["datainf"].matches(GradientStore.open(train), GradientStore.open(test))
    again = score_run(settings, progress=False)
    assert not again.methods[0].reused and again.scores["datainf"].train_ids == [f"tr{i}" for i in range(11)]
    assert not again.scores["datainf"].matches(GradientStore.open(test), GradientStore.open(test))


def test_score_run_checks_its_inputs_before_claiming(stores: tuple[Path, Path], tmp_path: Path) -> None:
    train, test = stores
    out = tmp_path / "s"
    for bad, message in (
        (ScoreSettings(out=str(out)), "Nothing to score"),
        (ScoreSettings(out=str(out), train_grads=str(train)), "Pass both --train-grads and --test-grads"),
        (ScoreSettings(out=str(out), train_grads=str(train), test_grads=str(test), train_data="x.jsonl"), "not both"),
        (
            ScoreSettings(out=str(out), train_grads=str(train), test_grads=str(test), method=("magic",)),
            r"Unknown method\(s\) \['magic'\]",
        ),
        (ScoreSettings(out=str(out), train_grads=str(train), test_grads=str(tmp_path / "nope")), "does not exist"),
    ):
        with pytest.raises(ConfigError, match=message):
            score_run(bad, progress=False)
        assert not out.exists()  # a failed run leaves no claimed folder behind
    with pytest.raises(ConfigError, match="choose one of"):
        ScoreSettings(mode="sideways")  # type: ignore[arg-type]


def test_report_run_refuses_a_folder_of_another_command(stores: tuple[Path, Path], tmp_path: Path) -> None:
    train, test = stores
    score_run(ScoreSettings(out=str(tmp_path / "s"), train_grads=str(train), test_grads=str(test)), progress=False)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"id": f"tr{i}", "text": f"text {i}", "label": "a"}) + "\n" for i in range(12)))
    settings = ReportSettings(
        out=str(tmp_path / "s"), scores=(str(tmp_path / "s" / "scores-datainf.safetensors"),), data=str(data)
    )
    with pytest.raises(ConfigError, match="command"):
        report_run(settings)
    result = report_run(dataclasses.replace(settings, out=str(tmp_path / "r")))
    assert result.path.is_file() and "tr0" in result.path.read_text()


def test_finetune_run_refuses_a_foreign_folder_before_training(tmp_path: Path) -> None:
    from tiny_models import save_tiny_model

    model = save_tiny_model(tmp_path / "tiny")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": f"good {i}", "label": i % 2}) + "\n" for i in range(4)))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty and was not written by `datainf finetune`"):
        finetune_run(
            FinetuneSettings(out=str(foreign), model=str(model), data=str(data), epochs=1),
            overwrite=True,
            progress=False,
        )
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]


def test_settings_normalise_paths_like_the_command_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train").mkdir()
    settings = ScoreSettings(out="s", train_grads="train", test_grads="missing", method=["datainf", "exact"])  # type: ignore[arg-type]
    assert settings.out == str(tmp_path / "s") and settings.train_grads == str(tmp_path / "train")
    assert settings.test_grads == "missing" and settings.method == ("datainf", "exact")
    assert settings_from_mapping(ReportSettings, {"out": "r", "k": 3, "quiet": True, "overwrite": False}).k == 3


def test_scores_write_table(tmp_path: Path) -> None:
    values = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    scores = Scores(values=values, train_ids=["a", "b", "c"], test_ids=["t"], method="datainf", mode="average")
    path = scores.write_table(tmp_path / "scores-datainf", "csv")
    assert path == tmp_path / "scores-datainf.csv"
    assert path.read_text().splitlines() == ["train_id,influence,rank", "a,0.5,2", "b,-1.0,3", "c,2.0,1"]
    pytest.importorskip("pyarrow")
    import pandas as pd

    parquet = scores.write_table(tmp_path / "scores-datainf", "parquet")
    assert parquet.suffix == ".parquet" and pd.read_parquet(parquet)["rank"].tolist() == [2, 3, 1]
    with pytest.raises(ConfigError, match="Unknown table format"):
        scores.write_table(tmp_path / "x", "xlsx")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- self mode, normalize


def test_score_run_self_mode_from_one_store(stores: tuple[Path, Path], tmp_path: Path) -> None:
    train, test = stores
    out = tmp_path / "self"
    settings = ScoreSettings(out=str(out), train_grads=str(train), mode="self", method=("datainf", "diagonal"))
    result = score_run(settings, progress=False)
    train_store = GradientStore.open(train)
    for name in ("datainf", "diagonal"):
        scores = result.scores[name]
        expected = influence(train_store, mode="self", method=name, progress=False)
        assert scores.mode == "self" and scores.test_ids == [] and scores.values.shape == (12,)
        assert torch.equal(scores.values, expected.values)
        assert scores.matches(train_store, None) and not scores.matches(train_store, GradientStore.open(test))
    assert json.loads((out / CONFIG_FILE).read_text())["mode"] == "self"
    assert [m.method for m in result.methods] == ["datainf", "diagonal"]  # no loss baseline from stores
    assert all(m.reused for m in score_run(settings, progress=False).methods)


def test_score_run_self_mode_refuses_a_test_set_and_loss_baseline_from_stores(
    stores: tuple[Path, Path], tmp_path: Path
) -> None:
    train, test = stores
    out = tmp_path / "s"
    for bad, message in (
        (
            ScoreSettings(out=str(out), train_grads=str(train), test_grads=str(test), mode="self"),
            "--mode self scores each training example on its own loss and uses no test set, but --test-grads",
        ),
        (
            ScoreSettings(out=str(out), train_data="a.jsonl", test_data="b.jsonl", mode="self"),
            "drop --test-data",
        ),
        (
            ScoreSettings(out=str(out), train_grads=str(train), test_grads=str(test), loss_baseline=True),
            "--loss-baseline needs the fine-tuned model and the training data",
        ),
        (ScoreSettings(out=str(out), train_grads=str(train)), r"or --mode self, which needs --train-grads only"),
    ):
        with pytest.raises(ConfigError, match=message):
            score_run(bad, progress=False)
        assert not out.exists()
    with pytest.raises(ConfigError, match="normalize must be True or False"):
        ScoreSettings(normalize="yes")  # type: ignore[arg-type]


def test_score_run_normalize_is_saved_and_never_mixed_with_raw_scores(
    stores: tuple[Path, Path], tmp_path: Path
) -> None:
    train, test = stores
    out = tmp_path / "s"
    raw = ScoreSettings(out=str(out), train_grads=str(train), test_grads=str(test), method=("hessian_free",))
    first = score_run(raw, progress=False)
    stored = json.loads((out / CONFIG_FILE).read_text())
    # options added later are written only when not at their default: older folders keep resuming
    assert "normalize" not in stored and "loss_baseline" not in stored
    unit = dataclasses.replace(raw, normalize=True)
    with pytest.raises(ConfigError, match=r"different configuration: normalize \(stored None, now True\)"):
        score_run(unit, progress=False)
    second = score_run(unit, overwrite=True, progress=False)
    assert json.loads((out / CONFIG_FILE).read_text())["normalize"] is True
    assert not second.methods[0].reused and second.scores["hessian_free"].settings["normalize"] is True
    train_store, test_store = GradientStore.open(train), GradientStore.open(test)
    expected = influence(train_store, test_store, method="hessian_free", normalize=True, progress=False)
    assert torch.equal(second.scores["hessian_free"].values, expected.values)
    assert not torch.allclose(second.scores["hessian_free"].values, first.scores["hessian_free"].values)
    # a raw scores file left in a normalize folder (same gradients, same ids) is not taken for normalised ones
    first.scores["hessian_free"].save(out / "scores-hessian_free.safetensors")
    again = score_run(unit, progress=False)
    assert not again.methods[0].reused
    assert torch.equal(again.scores["hessian_free"].values, expected.values)


def test_config_json_of_an_older_score_run_still_resumes(stores: tuple[Path, Path], tmp_path: Path) -> None:
    """A folder whose config.json predates mode self / normalize / loss_baseline is the same configuration."""
    train, test = stores
    out = tmp_path / "s"
    settings = ScoreSettings(out=str(out), train_grads=str(train), test_grads=str(test))
    score_run(settings, progress=False)
    stored = json.loads((out / CONFIG_FILE).read_text())
    stored.pop("normalize", None)
    stored.pop("loss_baseline", None)
    (out / CONFIG_FILE).write_text(json.dumps(stored))
    assert all(m.reused for m in score_run(settings, progress=False).methods)


def test_an_interrupted_finetune_run_resumes_from_its_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from safetensors.torch import load_file
    from tiny_models import save_tiny_model

    model = save_tiny_model(tmp_path / "tiny")
    data = tmp_path / "train.jsonl"
    words = ["good great", "bad awful"]
    data.write_text("".join(json.dumps({"text": f"the {words[i % 2]}", "label": i % 2}) + "\n" for i in range(16)))
    settings = FinetuneSettings(
        out=str(tmp_path / "run"), model=str(model), data=str(data), epochs=3, batch_size=4, checkpoint_every=3
    )
    reference = finetune_run(dataclasses.replace(settings, out=str(tmp_path / "reference")), progress=False)

    original = torch.optim.AdamW.step
    calls = {"n": 0}

    def step(self: torch.optim.Optimizer, *args: object, **kwargs: object) -> object:
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt  # a Ctrl-C in epoch 2 (4 steps per epoch), after the checkpoint at step 6
        return original(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    with pytest.raises(KeyboardInterrupt):
        finetune_run(settings, progress=False)
    assert (tmp_path / "run" / "finetune-checkpoint.pt").is_file()
    calls["n"] = -100
    result = finetune_run(settings, progress=False)
    assert calls["n"] + 100 == 12 - 6  # only the steps after the checkpoint were trained again
    a = load_file(str(result.adapter / "adapter_model.safetensors"))
    b = load_file(str(reference.adapter / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert result.epoch_losses == reference.epoch_losses and result.kept_epoch == 3 and result.best_epoch is None
    assert not (tmp_path / "run" / "finetune-checkpoint.pt").exists()


def test_finetune_run_names_classes_after_a_classlabel_column(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Records from a datasets ClassLabel column carry class ids; the adapter records the column's names."""
    from tiny_models import save_tiny_model

    import datainf.data.labels as labels

    model = save_tiny_model(tmp_path / "tiny", num_labels=3)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": f"good {i}", "label": i % 2}) + "\n" for i in range(8)))
    seen: list[tuple[str, str]] = []

    def fake_class_label_names(source: object, field: str = "label") -> tuple[str, ...] | None:
        seen.append((str(source), field))
        return ("world", "sports", "business")  # three classes, one absent from the training data

    monkeypatch.setattr(labels, "class_label_names", fake_class_label_names)
    result = finetune_run(
        FinetuneSettings(out=str(tmp_path / "run"), model=str(model), data=str(data), epochs=1, batch_size=4),
        progress=False,
    )
    meta = json.loads((result.adapter / "datainf_adapter.json").read_text())
    assert meta["label_names"] == ["world", "sports", "business"] and meta["num_labels"] == 3
    assert seen == [(str(data), "label")]

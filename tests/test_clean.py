"""datainf.clean: the cleaned dataset in the input's format, the review table, relabelling, retraining,
the removal curve, and bad input."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pandas as pd
import pytest
import torch
from tiny_models import WORDS, save_tiny_model

from datainf.clean import CleanSettings, clean_dataset, harmful_order, removal_curve
from datainf.data.tabular import load_records
from datainf.errors import ConfigError, DatasetError
from datainf.runs import RunDir
from datainf.scores import Scores

pytestmark = pytest.mark.usefixtures("one_thread")


def _rows(n: int = 8, seed: int = 0, prefix: str = "r") -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "pos" if i % 2 else "neg"
        cue = ["good", "great", "fine"] if label == "pos" else ["bad", "awful", "poor"]
        rows.append(
            {"id": f"{prefix}{i}", "text": " ".join(rng.sample(WORDS[:10], 3) + rng.sample(cue, 2)), "label": label}
        )
    return rows


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in rows))  # compact: copied as is
    return path


def _scores(ids: list[str], values: list[float], tmp: Path, method: str = "datainf") -> Path:
    scores = Scores(
        values=torch.tensor(values, dtype=torch.float64), train_ids=ids, test_ids=["t"], method=method, mode="average"
    )
    return scores.save(tmp / f"scores-{method}.safetensors")


VALUES = [0.1, 5.0, -1.0, 0.3, 2.0, -0.5, 0.0, 0.2]  # the most harmful: r1 (5.0), r4 (2.0), r3 (0.3), ...


def test_removes_the_most_harmful_keeping_the_other_lines_byte_for_byte(tmp_path: Path) -> None:
    rows = _rows()
    data = _jsonl(tmp_path / "train.jsonl", rows)
    scores = _scores([r["id"] for r in rows], VALUES, tmp_path)
    assert harmful_order(Scores.load(scores))[:3] == ["r1", "r4", "r3"]
    result = clean_dataset(CleanSettings(out=str(tmp_path / "out"), scores=str(scores), data=str(data), remove_top=25))
    assert result.flagged == ["r1", "r4"] and result.removed == ["r1", "r4"] and result.data.name == "train.jsonl"
    kept = [line for line in data.read_text().splitlines(keepends=True) if '"r1"' not in line and '"r4"' not in line]
    assert result.data.read_text() == "".join(kept)
    review = pd.read_csv(result.review)
    assert list(review.columns) == ["rank", "id", "score", "action", "given_label", "suggested_label", "text"]
    assert review["id"].tolist() == ["r1", "r4"] and review["rank"].tolist() == [1, 2]
    assert review["score"].tolist() == [5.0, 2.0] and review["given_label"].tolist() == ["pos", "neg"]
    assert review["text"].tolist() == [rows[1]["text"], rows[4]["text"]]
    assert set(review["action"]) == {"removed"}


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".json"])
def test_other_formats_are_written_in_their_own_format(tmp_path: Path, suffix: str) -> None:
    rows = [{**r, "id": f"00{i}", "extra": i * 1.5} for i, r in enumerate(_rows())]  # "000" must stay "000"
    data = tmp_path / f"train{suffix}"
    if suffix == ".csv":
        pd.DataFrame(rows).to_csv(data, index=False)
    elif suffix == ".parquet":
        pd.DataFrame(rows).to_parquet(data, index=False)
    else:
        data.write_text(json.dumps(rows))
    scores = _scores([r["id"] for r in rows], VALUES, tmp_path)
    result = clean_dataset(CleanSettings(out=str(tmp_path / "out"), scores=str(scores), data=str(data), remove_top=25))
    back = load_records(result.data)
    assert [r["id"] for r in back] == ["000", "002", "003", "005", "006", "007"]
    assert back[1] == {**rows[2], "extra": 3.0}


def test_refuses_scores_of_another_dataset_and_bad_settings(tmp_path: Path) -> None:
    rows = _rows()
    data = _jsonl(tmp_path / "train.jsonl", rows)
    other = _scores([f"x{i}" for i in range(8)], VALUES, tmp_path, "other")
    out = tmp_path / "out"
    with pytest.raises(DatasetError, match=r"other examples.*\['x0', 'x1'.*\['r0', 'r1'"):
        clean_dataset(CleanSettings(out=str(out), scores=str(other), data=str(data)))
    scores = _scores([r["id"] for r in rows], VALUES, tmp_path)
    for bad, error, message in (
        (dict(remove_top=100), ConfigError, r"percentage in \[0, 100\)"),
        (dict(remove_top=-1), ConfigError, "percentage"),
        (dict(relabel=True), ConfigError, "--model .* and --adapter"),
        (dict(retrain=str(tmp_path / "nope")), ConfigError, "cannot be read"),
    ):
        with pytest.raises(error, match=message):
            clean_dataset(CleanSettings(out=str(out), scores=str(scores), data=str(data), **bad))
    assert not out.exists()  # nothing half-written
    with pytest.raises(ConfigError, match="would overwrite the input"):
        clean_dataset(CleanSettings(out=str(tmp_path), scores=str(scores), data=str(data)))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from datainf.workflows import FinetuneSettings, finetune_run

    root = tmp_path_factory.mktemp("clean")
    model = save_tiny_model(root / "tiny")
    train = _jsonl(root / "train.jsonl", _rows(12))
    val = _jsonl(root / "val.jsonl", _rows(6, seed=1, prefix="v"))
    run = finetune_run(
        FinetuneSettings(
            out=str(root / "ft"),
            model=str(model),
            data=str(train),
            eval_data=str(val),
            epochs=2,
            batch_size=4,
            lr=5e-3,
            max_length=16,
        ),
        progress=False,
    )
    return {"model": model, "train": train, "val": val, "run": run.out, "adapter": run.adapter}


def test_relabel_applies_the_suggestions_and_removes_nothing(trained: dict[str, Path], tmp_path: Path) -> None:
    rows = load_records(trained["train"])
    ids = [r["id"] for r in rows]
    scores = _scores(ids, [float(i % 5) for i in range(12)], tmp_path)
    result = clean_dataset(
        CleanSettings(
            out=str(tmp_path / "out"),
            scores=str(scores),
            data=str(trained["train"]),
            remove_top=25,
            relabel=True,
            model=str(trained["model"]),
            adapter=str(trained["adapter"]),
        )
    )
    assert len(result.flagged) == 3 and result.removed == []
    review = pd.read_csv(result.review)
    back = {r["id"]: r for r in load_records(result.data)}
    assert list(back) == ids  # nothing removed
    for _, row in review.iterrows():
        assert back[row["id"]]["label"] == row["suggested_label"]
        assert row["action"] == (
            "relabelled" if row["suggested_label"] != row["given_label"] else "kept (suggestion = given label)"
        )
    untouched = [r for r in rows if r["id"] not in result.flagged]
    assert all(back[r["id"]] == r for r in untouched)


def test_retrain_reports_validation_metrics_before_and_after(trained: dict[str, Path], tmp_path: Path) -> None:
    from datainf.cli import main

    ids = [r["id"] for r in load_records(trained["train"])]
    scores = _scores(ids, [float(i) for i in range(12)], tmp_path)
    out = tmp_path / "out"
    code = main(
        [
            "clean",
            "--scores",
            str(scores),
            "--data",
            str(trained["train"]),
            "--remove-top",
            "25",
            "--retrain",
            str(trained["run"]),
            "--out",
            str(out),
            "-q",
        ]
    )
    assert code == 0
    summary = json.loads((out / "clean.json").read_text())
    assert set(summary["before"]) == {"eval_loss", "eval_accuracy"} == set(summary["after"])
    meta = json.loads((out / "retrain-cleaned" / "adapter" / "datainf_adapter.json").read_text())
    assert meta["num_train_examples"] == 9 and summary["removed"] == ["r11", "r10", "r9"]
    # the original data retrained with the original recipe reproduces the recipe's own run
    original = json.loads((trained["run"] / "adapter" / "training_log.json").read_text())["epochs"][-1]
    assert summary["before"]["eval_loss"] == pytest.approx(original["eval_loss"])


def test_removal_curve_retrains_once_per_share_and_reuses_the_cache(tmp_path: Path) -> None:
    rows = _rows()
    ids = [r["id"] for r in rows]
    ranking = Scores.load(_scores(ids, VALUES, tmp_path))
    seen: list[list[str]] = []

    def evaluate(records: list) -> dict[str, float]:
        seen.append([r["id"] for r in records])
        return {"eval_accuracy": len(records) / 8}

    cache = RunDir(tmp_path / "cache")
    curve = removal_curve(rows, {"datainf": ranking}, (0.0, 0.25), evaluate, cache=cache, baseline={"eval_accuracy": 1})
    assert [(r["share"], r["removed"], r["eval_accuracy"]) for r in curve] == [(0.0, 0, 1), (0.25, 2, 0.75)]
    assert seen == [[i for i in ids if i not in ("r1", "r4")]]
    again = removal_curve(rows, {"datainf": ranking}, (0.0, 0.25), evaluate, cache=cache, baseline={"eval_accuracy": 1})
    assert again == curve and len(seen) == 1


def test_the_reports_cleaning_section_draws_every_ranking(tmp_path: Path) -> None:
    from datainf.report import cleaning_section

    rows = [
        {"method": name, "share": share, "removed": int(share * 400), "eval_accuracy": acc, "eval_loss": 1 - acc}
        for name, base in (("datainf", 0.80), ("training loss", 0.82))
        for share, acc in ((0.0, base), (0.1, base + 0.05), (0.2, base + 0.07))
    ]
    html = cleaning_section(tmp_path, rows)
    assert (tmp_path / "cleaning.png").stat().st_size > 1000
    assert "What cleaning would do" in html and html.count("<tr><td>") == 6
    assert "<td>training loss</td><td class='num'>20 %</td><td class='num'>80</td><td class='num'>0.89" in html

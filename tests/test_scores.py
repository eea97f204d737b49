"""Scores: rankings, DataFrame view, atomic save/load."""

from __future__ import annotations

import pytest
import torch

import datainf
from datainf.errors import ConfigError, StoreCorruptedError
from datainf.scores import Scores


def sample(mode: str = "pairwise") -> Scores:
    values = torch.tensor([[0.5, -2.0, 1.5], [-1.0, 3.0, 0.0]], dtype=torch.float64)
    if mode == "average":
        return Scores(
            values=values.mean(0), train_ids=["a", "b", "c"], test_ids=["t0", "t1"], method="datainf", mode="average"
        )
    return Scores(values=values, train_ids=["a", "b", "c"], test_ids=["t0", "t1"], method="datainf", mode="pairwise")


def test_rankings_follow_sign_convention():
    scores = sample()
    assert scores.top_harmful(1, test_index=0) == [("c", 1.5)]
    assert scores.top_helpful(2, test_index=0) == [("b", -2.0), ("a", 0.5)]
    assert scores.top_harmful(1, test_index=1) == [("b", 3.0)]
    average = sample("average")  # means: a -0.25, b 0.5, c 0.75
    assert [i for i, _ in average.top_harmful(3)] == ["c", "b", "a"]
    with pytest.raises(ConfigError):
        average.top_harmful(1, test_index=0)


def test_to_pandas_long_format_with_ranks():
    frame = sample().to_pandas()
    assert list(frame.columns) == ["test_id", "train_id", "influence", "rank"]
    row = frame[(frame.test_id == "t1") & (frame.train_id == "b")].iloc[0]
    assert row.influence == 3.0 and row["rank"] == 1
    average = sample("average").to_pandas()
    assert average.set_index("train_id").loc["c", "rank"] == 1


def test_save_load_round_trip(tmp_path):
    train = {"x": torch.randn(6, 3, dtype=torch.float64)}
    scores = datainf.influence(train, {"x": torch.randn(2, 3, dtype=torch.float64)}, mode="pairwise", progress=False)
    path = scores.save(tmp_path / "scores.safetensors")
    loaded = Scores.load(path)
    assert torch.equal(loaded.values, scores.values)
    assert loaded.train_ids == scores.train_ids and loaded.settings["lambdas"] == scores.settings["lambdas"]
    assert "harmful" in loaded.sign_convention
    assert not list(tmp_path.glob("*.tmp"))


def test_load_rejects_garbage(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a scores file at all")
    with pytest.raises(StoreCorruptedError, match="not a readable"):
        Scores.load(bad)


def test_shape_must_match_mode():
    with pytest.raises(ConfigError):
        Scores(values=torch.zeros(3), train_ids=["a"], test_ids=["t"], method="datainf", mode="average")

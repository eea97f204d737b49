"""Tests of datainf.data.tabular: every format round trip, column mapping, and every bad input."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from datainf.data.tabular import MissingColumnsError, encode_labels, load_records
from datainf.errors import DatasetError, EmptyInputError

ROWS: list[dict[str, Any]] = [
    {"sentence": "a fine film", "y": 1},
    {"sentence": "dull and long", "y": 0},
    {"sentence": "a classic", "y": 1},
]
EXPECTED = [
    {"id": "0", "text": "a fine film", "label": 1},
    {"id": "1", "text": "dull and long", "label": 0},
    {"id": "2", "text": "a classic", "label": 1},
]
MAPPING = {"text": "sentence", "label": "y"}
NO_DATASETS = "the optional `datasets` package is not installed"


def _write(path: Path, rows: list[dict[str, Any]]) -> Path:
    """Write rows in the format the suffix names."""
    suffix = path.suffix
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif suffix == ".json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    elif suffix == ".csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    elif suffix == ".tsv":
        pd.DataFrame(rows).to_csv(path, index=False, sep="\t")
    elif suffix == ".parquet":
        pd.DataFrame(rows).to_parquet(path)
    else:  # pragma: no cover - test helper misuse
        raise AssertionError(suffix)
    return path


def _hf_dataset(datasets: Any) -> Any:
    """ROWS as a `datasets.Dataset`; a fixed fingerprint skips datasets' dill-based hashing."""
    import pyarrow

    return datasets.Dataset(pyarrow.Table.from_pylist(ROWS), fingerprint="datainf-test")


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".tsv"])
def test_round_trip_with_mapping(tmp_path: Path, suffix: str) -> None:
    path = _write(tmp_path / f"data{suffix}", ROWS)
    records = load_records(path, columns=MAPPING, required=("text", "label"))
    assert records == EXPECTED
    assert all(type(r["label"]) is int for r in records)


def test_parquet_round_trip(tmp_path: Path) -> None:
    pytest.importorskip("pyarrow", reason="pyarrow is not installed; Parquet support is optional")
    path = _write(tmp_path / "data.parquet", ROWS)
    assert load_records(path, columns=MAPPING) == EXPECTED


def test_hf_saved_dataset_round_trip(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets", reason=NO_DATASETS)
    folder = tmp_path / "saved"
    _hf_dataset(datasets).save_to_disk(str(folder))
    assert load_records(folder, columns=MAPPING) == EXPECTED


def test_hf_dataset_dict_needs_one_split(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets", reason=NO_DATASETS)
    split = _hf_dataset(datasets)
    folder = tmp_path / "saved"
    datasets.DatasetDict({"train": split, "test": split}).save_to_disk(str(folder))
    with pytest.raises(DatasetError, match=r"splits \['train', 'test'\]"):
        load_records(folder)
    assert load_records(folder / "train", columns=MAPPING) == EXPECTED


def test_id_column_is_used_and_stays_a_string(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text("id,text\n007,x\n010,y\n", encoding="utf-8")
    assert [r["id"] for r in load_records(path)] == ["007", "010"]
    jsonl = _write(tmp_path / "d.jsonl", [{"id": 5, "text": "x"}, {"id": "b", "text": "y"}])
    assert [r["id"] for r in load_records(jsonl)] == ["5", "b"]
    mapped = _write(tmp_path / "m.jsonl", [{"doc": "x1", "text": "x"}])
    assert load_records(mapped, columns={"id": "doc"}) == [{"id": "x1", "text": "x"}]


def test_unmapped_columns_are_kept(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.jsonl", [{"text": "x", "label": "pos", "source": "web"}])
    assert load_records(path) == [{"id": "0", "text": "x", "label": "pos", "source": "web"}]


def test_empty_csv_cell_becomes_none(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("text,note\nx,\ny,hi\n", encoding="utf-8")
    records = load_records(path)
    assert records[0]["note"] is None and records[1]["note"] == "hi"


# ---------------------------------------------------------------- bad inputs


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        load_records(tmp_path / "nope.jsonl")


def test_unknown_format(tmp_path: Path) -> None:
    path = tmp_path / "data.xlsx"
    path.write_text("x", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"unknown suffix '\.xlsx'.*\.jsonl"):
        load_records(path)


def test_misnamed_column_lists_columns_and_mapping(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.jsonl", ROWS)
    with pytest.raises(MissingColumnsError) as info:
        load_records(path, columns={"text": "sentense", "label": "y"})
    message = str(info.value)
    assert "'sentense'" in message and "for field 'text'" in message
    assert "['sentence', 'y']" in message
    assert 'columns={"text": "<column>"}' in message
    err = info.value
    assert isinstance(err, DatasetError)
    assert err.missing == ("text",) and err.found == ("sentence", "y") and err.columns == {"text": "sentense"}
    assert err.path == path


def test_missing_required_field(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.jsonl", ROWS)
    with pytest.raises(MissingColumnsError) as info:
        load_records(path, required=("text", "label", "y"))
    message = str(info.value)
    assert "['text', 'label']" in message and "['sentence', 'y']" in message
    assert 'columns={"text": "<column>", "label": "<column>"}' in message
    err = info.value
    assert err.missing == ("text", "label") and err.found == ("sentence", "y") and err.columns == {}


def test_one_column_for_two_fields_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.jsonl", ROWS)
    with pytest.raises(DatasetError, match=r"same file column\(s\) \['sentence'\]"):
        load_records(path, columns={"text": "sentence", "prompt": "sentence"})


def test_swapped_columns(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.jsonl", [{"text": "a", "label": "b"}])
    got = load_records(path, columns={"text": "label", "label": "text"})
    assert got == [{"id": "0", "text": "b", "label": "a"}]


def test_the_data_layer_names_no_command_line_option(tmp_path: Path) -> None:
    """Command-line hints are the CLI's to add (from the error's attributes); the data layer has none."""
    path = _write(tmp_path / "d.jsonl", ROWS)
    for kwargs in ({"required": ("source",)}, {"required": ("text",)}, {"columns": {"text": "sentense"}}):
        with pytest.raises(MissingColumnsError) as info:
            load_records(path, **kwargs)
        message = str(info.value).replace(str(path), "<path>")
        assert "--" not in message and "command line" not in message, message


def test_required_value_missing_names_ids(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.jsonl", [{"text": "x"}, {"text": None}, {"other": 1}])
    with pytest.raises(DatasetError, match=r"'text' is missing in 2 record\(s\), ids '1', '2'"):
        load_records(path, required=("text",))


@pytest.mark.parametrize("content", ["", "\n\n", "[]"])
def test_empty_dataset(tmp_path: Path, content: str) -> None:
    path = tmp_path / ("d.json" if content == "[]" else "d.jsonl")
    path.write_text(content, encoding="utf-8")
    with pytest.raises(EmptyInputError, match="no rows"):
        load_records(path)


def test_empty_csv(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("", encoding="utf-8")
    with pytest.raises(EmptyInputError):
        load_records(path)
    path.write_text("text,label\n", encoding="utf-8")
    with pytest.raises(EmptyInputError):
        load_records(path)


def test_duplicate_ids(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.jsonl", [{"id": "a"}, {"id": "b"}, {"id": "a"}])
    with pytest.raises(DatasetError, match="1 repeat: 'a'"):
        load_records(path)


def test_missing_id_value(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.jsonl", [{"id": "a"}, {"id": None}])
    with pytest.raises(DatasetError, match="row 1 has no id"):
        load_records(path)


def test_bad_json_line_is_named(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "x"}\n{"text": \n', encoding="utf-8")
    with pytest.raises(DatasetError, match="line 2"):
        load_records(path)
    path.write_text('{"text": "x"}\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(DatasetError, match="line 2: expected a JSON object"):
        load_records(path)


def test_json_must_be_a_list_of_objects(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text('{"text": "x"}', encoding="utf-8")
    with pytest.raises(DatasetError, match="expected a JSON list"):
        load_records(path)
    path.write_text('[{"text": "x"}, 3]', encoding="utf-8")
    with pytest.raises(DatasetError, match="positions 1"):
        load_records(path)
    path.write_text('{"text": "x"}\n{"text": "y"}\n', encoding="utf-8")
    with pytest.raises(DatasetError, match=r"\*\.jsonl"):
        load_records(path)


def test_parquet_without_pyarrow_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "d.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes `import pyarrow` fail
    with pytest.raises(DatasetError, match="pip install pyarrow"):
        load_records(path)


def test_hf_folder_without_datasets_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "saved"
    folder.mkdir()
    (folder / "dataset_info.json").write_text("{}", encoding="utf-8")
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DatasetError, match="pip install datasets"):
        load_records(folder)


def test_plain_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not one written by datasets' save_to_disk"):
        load_records(tmp_path)


# ---------------------------------------------------------------- encode_labels


def test_encode_string_labels() -> None:
    train = [{"id": "0", "label": "pos"}, {"id": "1", "label": "neg"}, {"id": "2", "label": "pos"}]
    test = [{"id": "t", "label": "neg"}]
    assert encode_labels(train, test) == (["neg", "pos"], [1, 0, 1], [0])


def test_encode_int_labels_sort_numerically_and_keep_values() -> None:
    train = [{"id": str(i), "y": y} for i, y in enumerate([10, 2, 0, 1, 2.0])]
    names, train_ids, test_ids = encode_labels(train, [{"id": "t", "y": 10}], field="y")
    assert names == ["0", "1", "2", "10"]
    assert train_ids == [3, 2, 0, 1, 2] and test_ids == [3]


def test_encode_unseen_test_labels_are_named() -> None:
    train = [{"id": "0", "label": "a"}, {"id": "1", "label": "b"}]
    test = [{"id": "t0", "label": "c"}, {"id": "t1", "label": "a"}, {"id": "t2", "label": "d"}]
    with pytest.raises(DatasetError, match=r"Test labels 'c', 'd' never occur"):
        encode_labels(train, test)


def test_encode_label_errors() -> None:
    with pytest.raises(EmptyInputError):
        encode_labels([], [])
    with pytest.raises(DatasetError, match="mix strings and integers"):
        encode_labels([{"id": "0", "label": "a"}, {"id": "1", "label": 1}], [])
    with pytest.raises(DatasetError, match="'x' has no 'label'"):
        encode_labels([{"id": "x"}], [])
    with pytest.raises(DatasetError, match="non-integer"):
        encode_labels([{"id": "x", "label": 0.5}], [])


def test_encode_labels_is_the_label_encoder() -> None:
    from datainf.data.labels import LabelEncoder

    train = [{"id": str(i), "label": y} for i, y in enumerate(["b", "a", "c", "a"])]
    test = [{"id": "t", "label": "c"}]
    names, train_ids, test_ids = encode_labels(train, test)
    encoder = LabelEncoder.fit(train)
    assert names == list(encoder.names) == ["a", "b", "c"]
    assert train_ids == [r["label"] for r in encoder.encode(train, "training")] == [1, 0, 2, 0]
    assert test_ids == [2]

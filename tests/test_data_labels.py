"""LabelEncoder: the one mapping of class labels to class ids (fit, given names, a trained model)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from datainf.data.labels import LabelEncoder
from datainf.errors import ConfigError, DatasetError, EmptyInputError


def _records(labels: list[object]) -> list[dict[str, object]]:
    return [{"id": f"r{i}", "text": "t", "label": y} for i, y in enumerate(labels)]


def _model(label2id: dict[str, int]) -> SimpleNamespace:
    return SimpleNamespace(config=SimpleNamespace(label2id=label2id))


# ---------------------------------------------------------------------------------------------- fit


def test_fit_sorts_strings_alphabetically_and_integers_numerically() -> None:
    assert LabelEncoder.fit(_records(["pos", "neg", "pos", "neu"])).names == ("neg", "neu", "pos")
    ints = LabelEncoder.fit(_records([10, 2, 0, 1, 2.0, True]))
    assert ints.names == ("0", "1", "2", "10"), "integral floats and booleans count as integers"
    assert [r["label"] for r in ints.encode(_records([10, 2, 0, 1, 2.0, True]), "training")] == [3, 2, 0, 1, 2, 1]


def test_fit_on_another_field_and_held_out_records() -> None:
    train = [{"id": "a", "y": "b"}, {"id": "b", "y": "a"}]
    assert LabelEncoder.fit(train, "y", held_out=[{"id": "t", "y": "a"}]).names == ("a", "b")
    with pytest.raises(DatasetError, match=r"Test labels 'c', 'd' never occur in the training records"):
        LabelEncoder.fit(train, "y", held_out=[{"id": "t0", "y": "c"}, {"id": "t1", "y": "d"}])
    with pytest.raises(DatasetError, match="mix strings and integers"):
        LabelEncoder.fit(train, "y", held_out=[{"id": "t", "y": 1}])


def test_fit_refuses_bad_labels() -> None:
    with pytest.raises(EmptyInputError):
        LabelEncoder.fit([])
    with pytest.raises(DatasetError, match="'r1' has no 'label' value"):
        LabelEncoder.fit(_records(["a", None]))
    with pytest.raises(DatasetError, match="non-integer numeric 'label' 0.5"):
        LabelEncoder.fit(_records([0.5]))
    with pytest.raises(DatasetError, match="of type list"):
        LabelEncoder.fit(_records([["a"]]))


# ---------------------------------------------------------------------------------------------- encode / decode


def test_encode_returns_copies_with_class_ids_and_decode_inverts_it() -> None:
    encoder = LabelEncoder.from_names(["neg", "pos"])
    records = _records(["pos", "neg", "pos"])
    encoded = encoder.encode(records, "training")
    assert [r["label"] for r in encoded] == [1, 0, 1]
    assert encoded[0] == {"id": "r0", "text": "t", "label": 1}
    assert records[0]["label"] == "pos", "the input records are not changed"
    assert encoder.decode([1, 0, 1]) == ["pos", "neg", "pos"]
    assert encoder.num_labels == 2 and encoder.index("pos") == 1 and encoder.index("other") is None
    with pytest.raises(DatasetError, match=r"Class ids 2 are outside \[0, 2\)"):
        encoder.decode([0, 2])


def test_integer_labels_are_looked_up_as_their_names() -> None:
    encoder = LabelEncoder.from_names(["0", "1", "10"])
    assert [r["label"] for r in encoder.encode(_records([10, 1.0, "0", False]), "test")] == [2, 1, 0, 0]


def test_unknown_labels_name_the_role_and_the_classes() -> None:
    given = LabelEncoder.from_names(["neg", "pos"])
    message = r"^Training labels \['neutral', 'x'\] are not among the label names \['neg', 'pos'\]"
    with pytest.raises(DatasetError, match=message):
        given.encode(_records(["x", "neutral", "pos", "x"]), "training")
    fitted = LabelEncoder.fit(_records(["neg", "pos"]))
    message = r"^Test labels \['neutral'\] never occur in training \(training labels: \['neg', 'pos'\]\)"
    with pytest.raises(DatasetError, match=message):
        fitted.encode(_records(["neutral"]), "test")
    with pytest.raises(DatasetError, match=r"Data record\(s\) 'r1' have no 'label' value"):
        fitted.encode(_records(["neg", None]), "data")


def test_names_must_be_distinct_and_origin_is_not_part_of_equality() -> None:
    with pytest.raises(ConfigError, match=r"Label names \['a'\] repeat"):
        LabelEncoder.from_names(["a", "b", "a"])
    with pytest.raises(ConfigError, match="not the string"):
        LabelEncoder.from_names("ab")
    assert LabelEncoder.from_names(["a", "b"]) == LabelEncoder.fit(_records(["b", "a"]))
    assert LabelEncoder.from_names([0, 1]).names == ("0", "1")


# ---------------------------------------------------------------------------------------------- from_model


def test_from_model_prefers_the_adapter_label_names() -> None:
    model = _model({"LABEL_0": 0, "LABEL_1": 1})
    encoder = LabelEncoder.from_model(model, {"label_names": ["neg", "pos"], "num_labels": 2})
    assert encoder == LabelEncoder(("neg", "pos")) and not encoder.class_ids
    message = r"Data labels \['0', '1'\] never occur in training \(training labels: \['neg', 'pos'\]\)"
    with pytest.raises(DatasetError, match=message):
        encoder.encode(_records([0, 1]), "data")  # the adapter was trained on names: integers are not its classes


def test_from_model_without_adapter_names_reads_label2id_and_keeps_integer_labels() -> None:
    model = _model({"pos": 1, "neg": 0})
    encoder = LabelEncoder.from_model(model, {})
    assert encoder.names == ("neg", "pos") and encoder.class_ids
    assert [r["label"] for r in encoder.encode(_records([1, 0.0, 7]), "data")] == [1, 0, 7], (
        "integers are class ids as given"
    )
    assert [r["label"] for r in encoder.encode(_records(["pos", "neg"]), "data")] == [1, 0]
    with pytest.raises(DatasetError, match=r"Data labels \['1', 'x'\] never occur in training"):
        encoder.encode(_records(["x", 1]), "data")  # mixed: looked up by name
    nameless = LabelEncoder.from_model(SimpleNamespace(), None)
    assert nameless.names == () and [r["label"] for r in nameless.encode(_records([2]), "data")] == [2]
    with pytest.raises(DatasetError, match="the model names no classes"):
        nameless.encode(_records(["a"]), "data")


# ---------------------------------------------------------------------------------------------- names from elsewhere


def test_placeholder_names_are_recognised() -> None:
    from datainf.data.labels import is_placeholder_names

    assert is_placeholder_names(["LABEL_0", "LABEL_1"])
    assert not is_placeholder_names(["LABEL_1", "LABEL_0"]) and not is_placeholder_names(["neg", "pos"])
    assert not is_placeholder_names([])


def test_from_model_reads_real_id2label_names() -> None:
    model = SimpleNamespace(config=SimpleNamespace(id2label={1: "pos", 0: "neg"}, label2id={}, num_labels=2))
    encoder = LabelEncoder.from_model(model, {})
    assert encoder.names == ("neg", "pos") and encoder.class_ids
    assert [r["label"] for r in encoder.encode(_records(["pos", "neg"]), "data")] == [1, 0]


def test_placeholder_names_ask_for_label_names() -> None:
    model = SimpleNamespace(config=SimpleNamespace(id2label={0: "LABEL_0", 1: "LABEL_1"}, num_labels=2))
    encoder = LabelEncoder.from_model(model, {})
    with pytest.raises(DatasetError, match=r"--label-names neg,pos .*or use integer class ids"):
        encoder.encode(_records(["pos", "neg"]), "data")
    assert [r["label"] for r in encoder.encode(_records([1, 0]), "data")] == [1, 0]


def test_given_label_names_win_and_must_fit_the_head() -> None:
    from datainf.data.labels import parse_label_names

    model = SimpleNamespace(config=SimpleNamespace(id2label={0: "LABEL_0", 1: "LABEL_1"}, num_labels=2))
    names = parse_label_names("neg, pos")
    assert names == ("neg", "pos")
    encoder = LabelEncoder.from_model(model, {"label_names": ["x", "y"]}, label_names=names)
    assert [r["label"] for r in encoder.encode(_records(["pos", "neg"]), "data")] == [1, 0]
    assert [r["label"] for r in encoder.encode(_records([1, 0]), "data")] == [1, 0], "integers stay class ids"
    with pytest.raises(ConfigError, match="3 label names were given .* the classifier has 2 classes"):
        LabelEncoder.from_model(model, {}, label_names=["a", "b", "c"])
    with pytest.raises(ConfigError, match="empty name"):
        parse_label_names("a,,b")
    assert parse_label_names(None) is None


def test_class_label_names_of_a_datasets_object(tmp_path) -> None:
    from datainf.data.labels import class_label_names

    class ClassLabel:  # the shape of datasets.ClassLabel: a feature with .names
        def __init__(self, names: list[str]) -> None:
            self.names = names

    class Value:
        names = None

    dataset = SimpleNamespace(features={"label": ClassLabel(["world", "sports"]), "text": Value()})
    assert class_label_names(dataset) == ("world", "sports")
    assert class_label_names(dataset, "text") is None and class_label_names(dataset, "other") is None
    splits = {"train": dataset}
    assert class_label_names(SimpleNamespace(values=splits.values)) == ("world", "sports")  # a one-split DatasetDict
    plain = tmp_path / "train.jsonl"
    plain.write_text("{}\n")
    assert class_label_names(plain) is None and class_label_names(tmp_path) is None

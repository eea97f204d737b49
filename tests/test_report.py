"""HTML reports (datainf.report): content, sign convention, escaping, atomic writing."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch

import datainf.report.mislabel as report_module
from datainf.errors import DatasetError, EmptyInputError
from datainf.report import SIGN_NOTE, write_mislabel_report, write_scores_report
from datainf.scores import Scores

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def mislabel_setup(n: int = 20, flipped: tuple[int, ...] = (2, 7, 11, 16)):
    label_names = ["business", "sport", "tech"]
    records = []
    for i in range(n):
        true = i % 3
        given = (true + 1) % 3 if i in flipped else true
        records.append(
            {
                "id": f"x{i}",
                "text": f"article {i} " + "word " * 80,
                "label": given,
                "true_label": true,
                "is_flipped": i in flipped,
            }
        )
    ids = [r["id"] for r in records]
    generator = torch.Generator().manual_seed(0)
    perfect = torch.tensor([10.0 + i if i in flipped else -float(i) for i in range(n)], dtype=torch.float64)
    noisy = torch.randn(n, generator=generator, dtype=torch.float64)
    scores = {
        "datainf": Scores(values=perfect, train_ids=ids, test_ids=["v0", "v1"], method="datainf", mode="average"),
        "hessian_free": Scores(
            values=noisy, train_ids=ids, test_ids=["v0", "v1"], method="hessian_free", mode="average"
        ),
    }
    table = [
        {
            "method": "datainf",
            "auc": 1.0,
            "found_at_10": 0.5,
            "found_at_20": 1.0,
            "seconds": 0.012,
            "notes": "paper eq. 5",
        },
        {"method": "hessian_free", "auc": 0.43, "found_at_10": 0.0, "found_at_20": 0.25, "seconds": 0.004, "notes": ""},
    ]
    return records, scores, table, label_names


def section(html: str, start: str, end: str | None = None) -> str:
    i = html.index(start)
    j = html.index(end, i + len(start)) if end else len(html)
    return html[i:j]


def row_ids(html: str) -> list[str]:
    """Ids in the second column of each table row."""
    return re.findall(r"<tr[^>]*><td class='num'>\d+</td><td>([^<]*)</td>", html)


def test_mislabel_report_content(tmp_path):
    records, scores, table, names = mislabel_setup()
    records[7]["text"] = "<script>alert('x')</script> & " + "y" * 500
    path = write_mislabel_report(tmp_path / "rep", table=table, scores=scores, records=records, label_names=names)
    assert path == tmp_path / "rep" / "index.html"
    for png in ("detection_curve.png", "score_histograms.png"):
        assert (tmp_path / "rep" / png).read_bytes()[:8] == PNG_MAGIC
    html = path.read_text()
    assert SIGN_NOTE in html and "positive influence = harmful" in html
    assert "<img src='detection_curve.png'" in html and "<img src='score_histograms.png'" in html
    # metric table
    assert "paper eq. 5" in html and "1.000" in html and "0.430" in html
    # 10 most harmful for datainf: the flipped examples first, largest influence first
    top = row_ids(section(html, "<h3>datainf", "<h3>hessian_free"))
    assert top[:4] == ["x16", "x11", "x7", "x2"] and len(top) == 10
    assert "(4 of 10 flipped)" in html
    # labels shown by name, given vs true
    assert re.search(r"<td>x16</td><td>tech</td><td>sport</td><td>yes</td>", html)
    # text escaped and cut to 200 characters
    assert "<script>" not in html and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp;" in html
    assert "y" * 200 not in html and "y" * 150 in html


def test_mislabel_report_keeps_other_files_and_replaces_its_own(tmp_path):
    records, scores, table, names = mislabel_setup()
    out = tmp_path / "rep"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "index.html").write_text("old")
    write_mislabel_report(out, table=table, scores=scores, records=records, label_names=names)
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "index.html").read_text() != "old"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_report_is_atomic_when_a_figure_fails(tmp_path, monkeypatch):
    records, scores, table, names = mislabel_setup()

    def boom(*args, **kwargs):
        raise RuntimeError("figure failed")

    monkeypatch.setattr(report_module, "_histograms_png", boom)
    with pytest.raises(RuntimeError, match="figure failed"):
        write_mislabel_report(tmp_path / "rep", table=table, scores=scores, records=records, label_names=names)
    assert list(tmp_path.iterdir()) == []


def test_mislabel_report_bad_inputs(tmp_path):
    records, scores, table, names = mislabel_setup()
    with pytest.raises(EmptyInputError):
        write_mislabel_report(tmp_path / "a", table=table, scores={}, records=records)
    with pytest.raises(EmptyInputError):
        write_mislabel_report(tmp_path / "a", table=table, scores=scores, records=[])
    with pytest.raises(DatasetError, match="is_flipped"):
        write_mislabel_report(
            tmp_path / "a",
            table=table,
            scores=scores,
            records=[{k: v for k, v in r.items() if k != "is_flipped"} for r in records],
        )
    with pytest.raises(DatasetError, match="no value for 1 training record"):
        write_mislabel_report(
            tmp_path / "a", table=table, scores=scores, records=records + [{**records[0], "id": "new"}]
        )
    with pytest.raises(DatasetError, match="flipped"):
        write_mislabel_report(
            tmp_path / "a", table=table, scores=scores, records=[{**r, "is_flipped": False} for r in records]
        )
    assert not (tmp_path / "a").exists()


def test_scores_report_average_ranks_by_sign(tmp_path):
    records = [{"id": f"t{i}", "text": f"text of t{i}", "label": "a" if i % 2 else "b"} for i in range(6)]
    values = torch.tensor([0.5, -3.0, 2.0, 0.0, 7.0, -1.0], dtype=torch.float64)
    scores = Scores(
        values=values,
        train_ids=[r["id"] for r in records],
        test_ids=["q"],
        method="datainf",
        mode="average",
        settings={"damping": 0.1},
    )
    path = write_scores_report(tmp_path / "r", scores, records, k=3)
    html = path.read_text()
    assert SIGN_NOTE in html
    assert (tmp_path / "r" / "score_histogram.png").read_bytes()[:8] == PNG_MAGIC
    harmful = row_ids(section(html, "Most harmful", "Most helpful"))
    helpful = row_ids(section(html, "Most helpful", "Distribution"))
    assert harmful == ["t4", "t2", "t0"]  # largest influence = most harmful
    assert helpful == ["t1", "t5", "t3"]  # most negative = most helpful
    assert "text of t4" in html and "<th>label</th>" in html


def test_scores_report_pairwise_and_lm_records(tmp_path):
    train = [{"id": f"t{i}", "prompt": f"p{i} <b>", "response": f"r{i}"} for i in range(4)]
    test = [
        {"id": "q0", "prompt": "question zero", "response": "answer"},
        {"id": "q1", "prompt": "question one", "response": "x"},
    ]
    values = torch.tensor([[1.0, -2.0, 0.5, 3.0], [-1.0, 4.0, 0.0, -5.0]], dtype=torch.float64)
    scores = {
        "datainf": Scores(
            values=values, train_ids=[r["id"] for r in train], test_ids=["q0", "q1"], method="datainf", mode="pairwise"
        ),
        "hessian_free": Scores(
            values=-values,
            train_ids=[r["id"] for r in train],
            test_ids=["q0", "q1"],
            method="hessian_free",
            mode="pairwise",
        ),
    }
    html = write_scores_report(tmp_path / "r", scores, train, test_records=test, k=2, max_test_examples=1).read_text()
    first = section(html, "<h2>datainf</h2>", "<h2>hessian_free</h2>")
    per_test = section(first, "<h4>Test example q0</h4>")
    assert "question zero" in per_test and "question one" not in html  # only the first test example
    assert row_ids(section(per_test, "Most helpful", "Most harmful")) == ["t1", "t2"]
    assert row_ids(section(per_test, "Most harmful")) == ["t3", "t0"]
    assert "p0 &lt;b&gt; \u2192 r0" in html  # prompt -> response, escaped
    assert "<th>label</th>" not in html


def test_scores_report_bad_inputs(tmp_path):
    scores = Scores(
        values=torch.zeros(2, dtype=torch.float64),
        train_ids=["a", "b"],
        test_ids=["q"],
        method="datainf",
        mode="average",
    )
    with pytest.raises(EmptyInputError):
        write_scores_report(tmp_path / "r", scores, [])
    with pytest.raises(EmptyInputError):
        write_scores_report(tmp_path / "r", {}, [{"id": "a"}])
    with pytest.raises(Exception, match="k and max_test_examples"):
        write_scores_report(tmp_path / "r", scores, [{"id": "a"}], k=0)
    assert not Path(tmp_path / "r").exists()


def test_scores_report_self_influence_and_loss_baseline(tmp_path):
    from datainf.baselines import LOSS_SIGN_CONVENTION
    from datainf.influence import SELF_SIGN_CONVENTION

    records = [{"id": f"t{i}", "text": f"text of t{i}", "label": "a"} for i in range(5)]
    ids = [r["id"] for r in records]
    own = Scores(
        values=torch.tensor([0.2, 5.0, 1.0, 0.0, 3.0], dtype=torch.float64),
        train_ids=ids,
        test_ids=[],
        method="datainf",
        mode="self",
        settings={"damping": 0.1, "normalize": True},
        sign_convention=SELF_SIGN_CONVENTION,
    )
    loss = Scores(
        values=torch.tensor([2.0, 0.1, 0.3, 4.0, 0.2], dtype=torch.float64),
        train_ids=ids,
        test_ids=[],
        method="loss",
        mode="self",
        sign_convention=LOSS_SIGN_CONVENTION,
    )
    html = write_scores_report(tmp_path / "r", {"datainf (self)": own, "loss": loss}, records, k=2).read_text()
    first = section(html, "<h2>datainf (self)</h2>", "<h2>loss</h2>")
    assert "no test set (self-influence" in first and "unit-normalised gradients" in first
    assert "on the mean test loss" not in html and "0 test examples" not in html
    assert row_ids(section(first, "Highest self-influence", "Lowest self-influence")) == ["t1", "t4"]
    assert row_ids(section(first, "Lowest self-influence")) == ["t3", "t0"]
    assert "<th>self-influence</th>" in first
    second = section(html, "<h2>loss</h2>", "Distribution")
    assert "training-loss baseline" in second and "damping" not in second
    assert row_ids(section(second, "Highest training loss", "Lowest training loss")) == ["t3", "t0"]
    assert "<th>training loss</th>" in second
    assert "One panel per method" in html


def test_mislabel_report_draws_the_loss_baseline_on_the_detection_curve(tmp_path, monkeypatch):
    records, scores, table, names = mislabel_setup()
    ids = [r["id"] for r in records]
    loss = Scores(
        values=torch.tensor([float(r["is_flipped"]) + 0.01 * i for i, r in enumerate(records)], dtype=torch.float64),
        train_ids=ids,
        test_ids=[],
        method="loss",
        mode="self",
    )
    drawn: dict[str, tuple[Any, Any]] = {}
    monkeypatch.setattr(report_module, "_detection_curve_png", lambda path, curves, share: drawn.update(curves))
    html = write_mislabel_report(
        tmp_path / "rep",
        table=table + [{"method": "training loss", "auc": 1.0, "found_at_10": 0.5, "found_at_20": 1.0, "seconds": 0.1}],
        scores={**scores, "training loss": loss},
        records=records,
        label_names=names,
    ).read_text()
    assert list(drawn) == ["datainf", "hessian_free", "training loss"]
    x, y = drawn["training loss"]  # the loss ranks the four flipped examples first: all found after 4 of 20
    assert float(y[list(x).index(0.2)]) == 1.0
    top = row_ids(section(html, "<h3>training loss"))
    assert top[:4] == ["x16", "x11", "x7", "x2"] and "<th>training loss</th>" in section(html, "<h3>training loss")


def test_predicted_labels_are_the_softmax_argmax_and_its_probability() -> None:
    from gradient_fixtures import bert_classifier, classification_data, word_tokenizer

    from datainf.gradients import SequenceClassificationTask
    from datainf.report import listed_ids, predict_labels

    model, task = bert_classifier(), SequenceClassificationTask(word_tokenizer())
    data = classification_data(7, seed=3)
    model.train()
    got = predict_labels(model, task, data, label_names=["a", "b", "c"], batch_size=3)
    assert model.training  # the mode is restored
    model.eval()
    with torch.no_grad():
        for ex in data:
            batch = task.collate([ex], [ex["id"]])
            logits = model(**{k: v for k, v in batch.inputs.items() if k != "labels"}).logits[0]
            probs = torch.softmax(logits.double(), dim=-1)
            assert got[ex["id"]].label == "abc"[int(probs.argmax())]
            assert got[ex["id"]].confidence == pytest.approx(float(probs.max()), abs=1e-6)

    scores = Scores(
        values=torch.arange(7, dtype=torch.float64),
        train_ids=[ex["id"] for ex in data],
        test_ids=["t0"],
        method="datainf",
        mode="average",
    )
    assert listed_ids(scores, k=2) == [data[6]["id"], data[5]["id"], data[0]["id"], data[1]["id"]]
    out = write_scores_report(Path(tempfile.mkdtemp()), scores, data, k=2, predictions=got)
    html = out.read_text()
    assert html.count("<th>predicted</th><th>confidence</th>") == 2
    assert f"<td>{got[data[6]['id']].label}</td><td class='num'>{got[data[6]['id']].confidence:.3f}</td>" in html

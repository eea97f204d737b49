"""The ``datainf`` command line end to end on a tiny random BERT and a small synthetic dataset."""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import WORDS, save_tiny_model

from datainf.cli import main
from datainf.scores import Scores
from datainf.store import GradientStore


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sentiment_rows(start: int, n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(start, start + n):
        label = "pos" if i % 2 else "neg"
        cue = ["good", "great", "fine"] if label == "pos" else ["bad", "awful", "poor"]
        rows.append({"uid": f"s{i}", "sentence": " ".join(rng.sample(WORDS[:10], 3) + rng.sample(cue, 2)), "y": label})
    return rows


def run(capsys, *args: object) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


COLUMNS = ("--text-column", "sentence", "--label-column", "y", "--id-column", "uid")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, Path]:
    """A tiny model, data files and one fine-tuned run shared by the tests of this module."""
    root = tmp_path_factory.mktemp("cli")
    paths = {
        "root": root,
        "model": save_tiny_model(root / "tiny"),
        "other_model": save_tiny_model(root / "tiny-other", seed=1),
        "train": write_jsonl(root / "train.jsonl", sentiment_rows(0, 16, seed=0)),
        "test": write_jsonl(root / "test.jsonl", sentiment_rows(100, 4, seed=1)),
    }
    code = main(
        [
            "finetune",
            "--model",
            str(paths["model"]),
            "--data",
            str(paths["train"]),
            *COLUMNS,
            "--epochs",
            "2",
            "--batch-size",
            "8",
            "--lr",
            "0.01",
            "--max-length",
            "16",
            "--out",
            str(root / "ft"),
            "-q",
        ]
    )
    assert code == 0
    paths["ft"] = root / "ft"
    return paths


@pytest.fixture(scope="module")
def stores(env) -> dict[str, Path]:
    root = env["root"]
    for name, data in (("g-train", env["train"]), ("g-test", env["test"])):
        code = main(
            [
                "grads",
                "--model",
                str(env["model"]),
                "--adapter",
                str(env["ft"]),
                "--data",
                str(data),
                *COLUMNS,
                "--out",
                str(root / name),
                "-q",
            ]
        )
        assert code == 0
    return {"train": root / "g-train", "test": root / "g-test"}


# ---------------------------------------------------------------------------------------------- finetune


def test_finetune_writes_adapter_and_replayable_config(env, capsys, tmp_path):
    ft = env["ft"]
    config = json.loads((ft / "config.json").read_text())
    assert config["command"] == "finetune" and config["text_column"] == "sentence" and config["epochs"] == 2
    assert config["model"] == str(env["model"]) and config["max_length"] == 16 and config["r"] == 8
    assert (ft / "adapter" / "adapter_model.safetensors").is_file()
    # replay into another folder: bit-identical adapter
    code, out, err = run(capsys, "finetune", "--config", ft / "config.json", "--out", tmp_path / "again", "-q")
    assert code == 0, err
    a = load_file(str(ft / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "again" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the same command again: nothing to do
    code, out, _ = run(capsys, "finetune", "--config", ft / "config.json", "-q")
    assert code == 0 and "already trained" in out


def test_finetune_eval_data_prints_the_epoch_table(env, capsys, tmp_path):
    common = ["finetune", "--model", env["model"], "--data", env["train"], *COLUMNS, "--epochs", "3"]
    common += ["--batch-size", "8", "--lr", "0.01", "--max-length", "16", "--eval-data", env["test"], "-q"]
    code, out, err = run(capsys, *common, "--out", tmp_path / "last")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["epoch", "train", "loss", "val", "loss", "val", "acc"]
    assert [line.split()[0] for line in lines[1:4]] == ["1", "2", "3"]
    assert sum(line.endswith("best") for line in lines[1:4]) == 1
    assert "adapter kept: epoch 3, the last" in out
    log = json.loads((tmp_path / "last" / "adapter" / "training_log.json").read_text())
    assert [round(e["eval_loss"], 4) for e in log["epochs"]] == [float(line.split()[2]) for line in lines[1:4]]
    saved = json.loads((tmp_path / "last" / "config.json").read_text())
    assert saved["eval_data"] == str(env["test"]) and "checkpoint_every" not in saved and "keep_best" not in saved

    code, out, err = run(capsys, *common, "--keep-best", "--out", tmp_path / "best")
    assert code == 0, err
    best = log["best_epoch"]
    assert f"adapter kept: epoch {best}, the best (--keep-best)" in out
    assert json.loads((tmp_path / "best" / "config.json").read_text())["keep_best"] is True

    code, _, err = run(capsys, *common[:-3], "-q", "--keep-best", "--out", tmp_path / "no-eval")
    assert code == 2 and "--eval-data" in err and not (tmp_path / "no-eval").exists()


def test_config_file_yaml_with_flag_override(env, capsys, tmp_path):
    cfg = tmp_path / "ft.yaml"
    cfg.write_text(
        f"model: {env['model']}\ndata: {env['train']}\ntext-column: sentence\nlabel-column: y\nid-column: uid\n"
        "epochs: 1\nbatch-size: 8\nmax-length: 16\nr: 2\ntarget_modules: [query]\n"
    )
    code, _, err = run(capsys, "finetune", "--config", cfg, "--r", "4", "--out", tmp_path / "run", "-q")
    assert code == 0, err
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["r"] == 4 and saved["epochs"] == 1 and saved["target_modules"] == ["query"]
    adapter_cfg = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["r"] == 4 and adapter_cfg["target_modules"] == ["query"]
    cfg.write_text("epochz: 3\n")
    code, _, err = run(capsys, "finetune", "--config", cfg, "--out", tmp_path / "x")
    assert code == 2 and "Unknown setting(s) ['epochz']" in err and "'epochs'" in err


# ---------------------------------------------------------------------------------------------- grads


def test_grads_store_and_config(env, stores):
    train = GradientStore.open(stores["train"])
    assert train.is_complete and train.num_examples == 16 and train.ids[:2] == ["s0", "s1"]
    assert any("lora_A" in b for b in train.block_dims) and any("classifier" in b for b in train.block_dims)
    config = json.loads((stores["train"] / "config.json").read_text())
    assert config["command"] == "grads" and config["kind"] == "classification" and config["max_length"] == 16


def test_grads_interrupted_then_resumed(env, stores, capsys, tmp_path, monkeypatch):
    import datainf.gradients.session as session

    original = session.batch_gradients
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    args = [
        "grads",
        "--model",
        env["model"],
        "--adapter",
        env["ft"],
        "--data",
        env["train"],
        *COLUMNS,
        "--grad-batch-size",
        "4",
        "--shard-size",
        "4",
        "--out",
        tmp_path / "g",
        "-q",
    ]
    monkeypatch.setattr(session, "batch_gradients", flaky)
    code, _, err = run(capsys, *args)
    assert code == 130 and "interrupted; rerun the same command to resume" in err
    partial = GradientStore.open(tmp_path / "g")
    assert not partial.is_complete and partial.num_examples == 8  # two finished shards survive
    monkeypatch.setattr(session, "batch_gradients", original)
    code, _, err = run(capsys, *args)
    assert code == 0, err
    resumed = GradientStore.open(tmp_path / "g").to_dict()
    reference = GradientStore.open(stores["train"]).to_dict()
    for name, tensor in reference.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- score


def test_score_from_stores_all_methods_and_replay(env, stores, capsys, tmp_path):
    out = tmp_path / "s"
    code, stdout, err = run(
        capsys,
        "score",
        "--train-grads",
        stores["train"],
        "--test-grads",
        stores["test"],
        "--method",
        "datainf,exact",
        "--method",
        "lissa",
        "--method",
        "hessian_free",
        "--method-options",
        '{"lissa": {"scale": "trace"}}',
        "--out",
        out,
        "-q",
    )
    assert code == 0, err
    assert "LiSSA diverged" not in err
    assert Scores.load(out / "scores-lissa.safetensors").settings["method_options"]["scale"] == "trace"
    assert "positive influence = harmful" in stdout
    for method in ("datainf", "exact", "lissa", "hessian_free"):
        scores = Scores.load(out / f"scores-{method}.safetensors")
        assert scores.method == method and scores.values.shape == (16,) and torch.isfinite(scores.values).all()
        header = (out / f"scores-{method}.csv").read_text().splitlines()[0]
        assert header == "train_id,influence,rank"
    # replay the resolved config into a new folder: identical scores
    code, _, err = run(capsys, "score", "--config", out / "config.json", "--out", tmp_path / "s2", "-q")
    assert code == 0, err
    for method in ("datainf", "exact"):
        a = Scores.load(out / f"scores-{method}.safetensors").values
        b = Scores.load(tmp_path / "s2" / f"scores-{method}.safetensors").values
        assert torch.equal(a, b)
    # a different configuration in the same folder is refused, then replaced with --overwrite
    code, _, err = run(capsys, "score", "--config", out / "config.json", "--damping", "0.2", "-q")
    assert code == 2 and err.startswith("datainf: error:") and "different configuration" in err and "damping" in err
    assert err.count("\n") == 1
    code, _, err = run(capsys, "score", "--config", out / "config.json", "--damping", "0.2", "--overwrite", "-q")
    assert code == 0, err
    assert Scores.load(out / "scores-datainf.safetensors").settings["damping"] == 0.2


def test_score_from_model_and_data_matches_stores(env, stores, capsys, tmp_path):
    out = tmp_path / "s"
    code, _, err = run(
        capsys,
        "score",
        "--model",
        env["model"],
        "--adapter",
        env["ft"],
        "--train-data",
        env["train"],
        "--test-data",
        env["test"],
        *COLUMNS,
        "--mode",
        "pairwise",
        "--out",
        out,
        "-q",
    )
    assert code == 0, err
    # the training gradients were computed on the fly (no store; only their n x L norms are kept, for resuming)
    assert not (out / "grads-train").exists() and (out / "grads-test" / "manifest.json").is_file()
    assert [p.name.split("-")[:2] for p in (out / "onthefly").glob("*.safetensors")] == [["train", "norms"]]
    pairwise = Scores.load(out / "scores-datainf.safetensors")
    assert pairwise.mode == "pairwise" and pairwise.values.shape == (4, 16)
    code, _, err = run(
        capsys,
        "score",
        "--train-grads",
        stores["train"],
        "--test-grads",
        stores["test"],
        "--mode",
        "pairwise",
        "--out",
        tmp_path / "s2",
        "-q",
    )
    assert code == 0, err
    torch.testing.assert_close(pairwise.values, Scores.load(tmp_path / "s2" / "scores-datainf.safetensors").values)

    # --keep-train-store: today's behaviour (a training store in <out>/grads-train), the same scores
    data_args = ["--model", env["model"], "--adapter", env["ft"], "--train-data", env["train"], *COLUMNS]
    kept = tmp_path / "kept"
    args = [*data_args, "--test-data", env["test"], "--mode", "pairwise", "--keep-train-store", "--out", kept, "-q"]
    code, _, err = run(capsys, "score", *args)
    assert code == 0, err
    assert (kept / "grads-train" / "manifest.json").is_file() and not (kept / "onthefly").exists()
    assert json.loads((kept / "config.json").read_text())["keep_train_store"] is True
    torch.testing.assert_close(Scores.load(kept / "scores-datainf.safetensors").values, pairwise.values)

    # --train-data with an existing --test-grads store; then the same command reuses the finished scores
    mixed = tmp_path / "mixed"
    args = [*data_args, "--test-grads", stores["test"], "--mode", "pairwise", "--out", mixed, "-q"]
    code, _, err = run(capsys, "score", *args)
    assert code == 0, err
    assert not (mixed / "grads-train").exists() and not (mixed / "grads-test").exists()
    torch.testing.assert_close(Scores.load(mixed / "scores-datainf.safetensors").values, pairwise.values)
    code, stdout, err = run(capsys, "score", *args[:-1])
    assert code == 0, err
    assert any(line.startswith("datainf ") and "reused" in line for line in stdout.splitlines())

    bad = tmp_path / "bad"
    code, _, err = run(
        capsys, "score", *data_args, "--test-data", env["test"], "--test-grads", stores["test"], "--out", bad
    )
    assert code == 2 and "--test-grads (a store) or --test-data" in err
    args = ["--train-grads", stores["train"], "--test-grads", stores["test"], "--keep-train-store", "--out", bad]
    code, _, err = run(capsys, "score", *args)
    assert code == 2 and "drop --keep-train-store" in err and not bad.exists()


def test_score_by_loss_differences(env, stores, capsys, tmp_path, monkeypatch):
    from datainf.methods import scoring

    monkeypatch.setattr(scoring, "LOSS_DIFFERENCE_CHECK_ROWS", 4)  # 16 training rows: 12 by loss differences
    data_args = ["--model", env["model"], "--adapter", env["ft"], "--train-data", env["train"], *COLUMNS]
    out = tmp_path / "ld"
    code, _, err = run(
        capsys, "score", *data_args, "--test-grads", stores["test"], "--scoring", "loss-difference", "--out", out, "-q"
    )
    assert code == 0, err
    scores = Scores.load(out / "scores-datainf.safetensors")
    assert scores.diagnostics["loss_difference"]["used"] and scores.settings["scoring"] == "loss-difference"
    assert json.loads((out / "config.json").read_text())["scoring"] == "loss-difference"
    exact = tmp_path / "exact"
    code, _, err = run(
        capsys, "score", "--train-grads", stores["train"], "--test-grads", stores["test"], "--out", exact, "-q"
    )
    assert code == 0, err
    assert "scoring" not in json.loads((exact / "config.json").read_text())  # the default is not recorded
    reference = Scores.load(exact / "scores-datainf.safetensors").values
    scale = float(reference.abs().max())
    # approximate (this tiny BERT's float32 losses round at about 1e-3 of a score): close, not equal
    torch.testing.assert_close(scores.values, reference, rtol=5e-2, atol=5e-2 * scale)
    assert not torch.equal(scores.values[4:], reference[4:])
    for bad_args, message in (
        (["--train-grads", stores["train"], "--test-grads", stores["test"]], "computed on the fly"),
        ([*data_args, "--test-grads", stores["test"], "--keep-train-store"], "without --keep-train-store"),
        ([*data_args, "--test-grads", stores["test"], "--mode", "pairwise"], "takes mode='average'"),
        ([*data_args, "--test-grads", stores["test"], "--scoring", "finite"], "invalid choice"),
    ):
        bad = tmp_path / "bad"
        args = (
            [*bad_args, "--scoring", "loss-difference", "--out", bad]
            if "finite" not in bad_args
            else [*bad_args, "--out", bad]
        )
        code, _, err = run(capsys, "score", *args)
        assert code == 2 and message in err and not bad.exists(), (bad_args, err)


def test_score_self_mode_and_normalize_from_stores(env, stores, capsys, tmp_path):
    out = tmp_path / "self"
    code, stdout, err = run(
        capsys,
        "score",
        "--train-grads",
        stores["train"],
        "--mode",
        "self",
        "--method",
        "datainf,hessian_free,diagonal",
        "--out",
        out,
        "-q",
    )
    assert code == 0, err
    assert "self-influence s_k" in stdout and "datainf, hessian_free, diagonal:" in stdout  # what the values mean
    train = GradientStore.open(stores["train"])
    for method in ("datainf", "hessian_free", "diagonal"):
        scores = Scores.load(out / f"scores-{method}.safetensors")
        assert scores.mode == "self" and scores.test_ids == [] and scores.values.shape == (16,)
        assert (scores.values >= 0).all() and scores.matches(train, None)
        assert method in stdout
    # Hessian-free self-influence is the squared gradient norm
    hessian_free = Scores.load(out / "scores-hessian_free.safetensors").values
    torch.testing.assert_close(hessian_free, train.squared_norms().sum(dim=1), rtol=1e-5, atol=0.0)
    assert json.loads((out / "config.json").read_text())["mode"] == "self"
    assert not (out / "scores-loss.safetensors").exists()  # stores hold no losses

    out = tmp_path / "unit"
    code, _, err = run(
        capsys,
        "score",
        "--train-grads",
        stores["train"],
        "--test-grads",
        stores["test"],
        "--method",
        "hessian_free",
        "--normalize",
        "--out",
        out,
        "-q",
    )
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["normalize"] is True
    cosine = Scores.load(out / "scores-hessian_free.safetensors")
    assert cosine.settings["normalize"] is True and cosine.values.abs().max() <= 1.0 + 1e-6  # mean of -cosines
    # replaying the config keeps --normalize; without it the folder is another configuration
    code, _, err = run(capsys, "score", "--config", out / "config.json", "--out", tmp_path / "unit2", "-q")
    assert code == 0, err
    assert torch.equal(Scores.load(tmp_path / "unit2" / "scores-hessian_free.safetensors").values, cosine.values)
    code, _, err = run(
        capsys, "score", "--train-grads", stores["train"], "--test-grads", stores["test"], "--method", "hessian_free",
        "--out", out, "-q",
    )  # fmt: skip
    assert code == 2 and "different configuration: normalize" in err


def _hand_losses(env) -> dict[str, float]:
    """Each training example's cross-entropy under the fine-tuned tiny model, computed here by hand."""
    from datainf.models import load_model

    model, tokenizer = load_model(str(env["model"]), kind="classification", adapter=str(env["ft"]))
    model.eval()
    rows = sentiment_rows(0, 16, seed=0)
    encoded = tokenizer(
        [r["sentence"] for r in rows], truncation=True, max_length=16, padding=True, return_tensors="pt"
    )
    labels = torch.tensor([["neg", "pos"].index(r["y"]) for r in rows])
    with torch.no_grad():
        losses = torch.nn.functional.cross_entropy(model(**encoded).logits, labels, reduction="none")
    return {r["uid"]: float(v) for r, v in zip(rows, losses)}


def test_score_from_data_writes_the_training_loss_baseline(env, stores, capsys, tmp_path):
    data_args = ["--model", env["model"], "--adapter", env["ft"], "--train-data", env["train"], *COLUMNS]
    out = tmp_path / "s"
    code, stdout, err = run(capsys, "score", *data_args, "--test-data", env["test"], "--out", out, "-q")
    assert code == 0, err
    loss = Scores.load(out / "scores-loss.safetensors")
    assert loss.method == "loss" and loss.mode == "self" and loss.test_ids == [] and loss.values.shape == (16,)
    hand = _hand_losses(env)
    torch.testing.assert_close(loss.values, torch.tensor([hand[t] for t in loss.train_ids], dtype=torch.float64))
    assert loss.diagnostics["recorded_losses"]  # taken from the gradient passes: no forward pass of its own
    assert loss.matches(GradientStore.open(stores["train"]), None)  # the fingerprint of the same model and data
    lines = stdout.splitlines()
    assert any(line.startswith("# loss: training loss of each example") for line in lines)
    worst = max(hand, key=hand.__getitem__)
    assert any(line.startswith("loss ") and worst in line for line in lines)  # a row of the summary table
    assert (out / "scores-loss.csv").read_text().splitlines()[0] == "train_id,influence,rank"
    assert "loss_baseline" not in json.loads((out / "config.json").read_text())  # automatic: not recorded
    # the same command again reuses it
    code, stdout, err = run(capsys, "score", *data_args, "--test-data", env["test"], "--out", out, "-q")
    assert code == 0, err
    assert any(line.startswith("loss ") and "reused" in line for line in stdout.splitlines())

    # self mode from data: the training side only, with the baseline; --no-loss-baseline turns it off
    out = tmp_path / "self"
    code, _, err = run(capsys, "score", *data_args, "--mode", "self", "--method", "datainf", "--out", out, "-q")
    assert code == 0, err
    assert not (out / "grads-test").exists() and not (out / "grads-train").exists()
    assert Scores.load(out / "scores-datainf.safetensors").mode == "self"
    assert torch.equal(Scores.load(out / "scores-loss.safetensors").values, loss.values)
    out = tmp_path / "off"
    code, _, err = run(capsys, "score", *data_args, "--mode", "self", "--no-loss-baseline", "--out", out, "-q")
    assert code == 0, err
    assert not (out / "scores-loss.safetensors").exists()
    assert json.loads((out / "config.json").read_text())["loss_baseline"] is False


def test_score_help_lists_the_registered_methods_and_modes(capsys):
    from datainf.methods import available_methods

    assert main(["score", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for method in available_methods():
        assert method in text
    assert "{average,pairwise,self}" in text and "--normalize" in text and "--no-loss-baseline" in text
    assert "cannot be computed from stores" in text


def test_causal_lm_pipeline(env, capsys, tmp_path):
    rng = random.Random(3)
    rows = [{"q": " ".join(rng.sample(WORDS, 3)), "a": " ".join(rng.sample(WORDS, 2))} for _ in range(8)]
    data = write_jsonl(tmp_path / "lm.jsonl", rows)
    lm_columns = ("--prompt-column", "q", "--response-column", "a")
    code, _, err = run(
        capsys,
        "finetune",
        "--model",
        env["model"],
        "--kind",
        "causal-lm",
        "--data",
        data,
        *lm_columns,
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--max-length",
        "16",
        "--out",
        tmp_path / "ft",
        "-q",
    )
    assert code == 0, err
    code, _, err = run(
        capsys,
        "score",
        "--model",
        env["model"],
        "--adapter",
        tmp_path / "ft",
        "--train-data",
        data,
        "--test-data",
        data,
        *lm_columns,
        "--mode",
        "pairwise",
        "--out",
        tmp_path / "s",
        "-q",
    )
    assert code == 0, err
    config = json.loads((tmp_path / "s" / "config.json").read_text())
    assert config["kind"] == "causal-lm" and config["max_length"] == 16  # resolved from the adapter
    scores = Scores.load(tmp_path / "s" / "scores-datainf.safetensors")
    assert scores.values.shape == (8, 8) and scores.train_ids == [str(i) for i in range(8)]
    # an example's own gradient is the most helpful for it (strongly negative diagonal)
    assert (scores.values.argmin(dim=1) == torch.arange(8)).float().mean() >= 0.75


# ---------------------------------------------------------------------------------------------- report


def test_report_command(env, stores, capsys, tmp_path):
    code, _, err = run(
        capsys, "score", "--train-grads", stores["train"], "--test-grads", stores["test"], "--out", tmp_path / "s", "-q"
    )
    assert code == 0, err
    code, out, err = run(
        capsys,
        "report",
        "--scores",
        tmp_path / "s" / "scores-datainf.safetensors",
        "--data",
        env["train"],
        *COLUMNS,
        "--out",
        tmp_path / "r",
        "-q",
    )
    assert code == 0, err
    html = (tmp_path / "r" / "index.html").read_text()
    assert "positive influence = harmful" in html and "s0" in html
    top = Scores.load(tmp_path / "s" / "scores-datainf.safetensors").top_harmful(1)[0][0]
    first_text = next(r["sentence"] for r in sentiment_rows(0, 16, seed=0) if r["uid"] == top)
    assert first_text in html
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert config["command"] == "report" and "model" not in config  # folders written before --model still match
    assert "<th>predicted</th>" not in html

    # with the fine-tuned classifier: each listed example shows its predicted label and confidence
    scores = tmp_path / "s" / "scores-datainf.safetensors"
    base = ("report", "--scores", scores, "--data", env["train"], *COLUMNS, "--k", "3")
    code, _, err = run(capsys, *base, "--model", env["model"], "--adapter", env["ft"], "--out", tmp_path / "r2", "-q")
    assert code == 0, err
    html = (tmp_path / "r2" / "index.html").read_text()
    assert html.count("<th>predicted</th><th>confidence</th>") == 2  # the harmful and the helpful list
    labels = {r["y"] for r in sentiment_rows(0, 16, seed=0)}
    cells = re.findall(r"<td>([^<]*)</td><td class='num'>(0\.\d+|1\.000)</td>", html)
    assert len(cells) == 6 and all(label in labels and 0.5 <= float(c) <= 1 for label, c in cells)


# ---------------------------------------------------------------------------------------------- bad input


def test_bad_inputs_give_one_line_errors(env, stores, capsys, tmp_path):
    root = tmp_path
    empty = root / "empty.jsonl"
    empty.write_text("")
    unseen = write_jsonl(root / "unseen.jsonl", [{"uid": "u1", "sentence": "the cat", "y": "neutral"}])
    grads = ["grads", "--model", env["model"], "--adapter", env["ft"]]
    cases = [
        (grads + ["--data", root / "missing.jsonl", *COLUMNS], "missing.jsonl does not exist"),
        (
            grads + ["--data", env["train"], "--text-column", "txt", "--label-column", "y"],
            "column 'txt' (for field 'text') not found. Columns in the file: ['uid', 'sentence', 'y']",
        ),
        (
            grads + ["--data", env["train"]],
            "required field(s) ['text', 'label'] not found. Columns in the file: ['uid', 'sentence', 'y']",
        ),
        (grads + ["--data", env["train"]], "On the command line: --text-column <column>, --label-column <column>."),
        (grads + ["--data", empty, *COLUMNS], "holds no rows"),
        (grads + ["--data", unseen, *COLUMNS], "labels ['neutral'] never occur in training"),
        (
            [
                "score",
                "--model",
                env["model"],
                "--adapter",
                env["ft"],
                "--train-data",
                env["train"],
                "--test-data",
                unseen,
                *COLUMNS,
            ],
            "Test labels 'neutral' never occur in the training records",
        ),
        (
            ["grads", "--model", env["other_model"], "--adapter", env["ft"], "--data", env["train"], *COLUMNS],
            "was trained on base model",
        ),
        (
            ["grads", "--model", "FacebookAI/roberta-large", "--adapter", env["ft"], "--data", env["train"], *COLUMNS],
            "datainf works offline: pass a local folder",
        ),
        (
            ["finetune", "--model", "bert-base-uncased", "--data", env["train"], *COLUMNS],
            "datainf works offline: pass a local folder",
        ),
        (
            ["score", "--train-grads", stores["train"], "--test-grads", stores["test"], "--method", "magic"],
            "Unknown method(s) ['magic']",
        ),
        (
            ["score", "--train-grads", stores["train"], "--test-grads", stores["test"], "--damping", "0"],
            "damping must be a finite number > 0",
        ),
        (["score", "--train-grads", stores["train"]], "Pass both --train-grads and --test-grads"),
        (
            ["score", "--train-grads", stores["train"], "--test-grads", stores["test"], "--mode", "self"],
            "--mode self scores each training example on its own loss and uses no test set, but --test-grads was given",
        ),
        (
            ["score", "--train-grads", stores["train"], "--test-grads", stores["test"], "--loss-baseline"],
            "--loss-baseline needs the fine-tuned model and the training data",
        ),
        (["score", "--train-grads", stores["train"], "--test-grads", root / "nope"], "does not exist"),
        (["report", "--scores", root / "nope.safetensors", "--data", env["train"]], "does not exist"),
        (["score", "--bogus"], "unrecognized arguments: --bogus"),
        (
            ["grads", "--model", env["model"], "--adapter", env["ft"], "--data", env["train"], "--epochs", "3"],
            "unrecognized arguments",
        ),
        (["score", "--damping", "abc"], "Bad value 'abc' for --damping"),
    ]
    for index, (args, expected) in enumerate(cases):
        code, out, err = run(capsys, *args, "--out", root / f"out{index}", "-q")
        assert code == 2, (args, err)
        assert err.startswith("datainf: error: ") and err.count("\n") == 1, err
        assert expected in err, (expected, err)
        assert not (root / f"out{index}").exists(), "a failed run must not leave a claimed output folder behind"


def test_output_folder_of_another_command_or_config_is_refused(env, stores, capsys, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    code, _, err = run(
        capsys,
        "score",
        "--train-grads",
        stores["train"],
        "--test-grads",
        stores["test"],
        "--out",
        foreign,
        "--overwrite",
        "-q",
    )
    assert code == 2 and "not empty and was not written by `datainf score`" in err
    assert (foreign / "thesis.tex").read_text() == "precious"
    # a grads store folder reused for a different adapter configuration
    code, _, err = run(
        capsys,
        "grads",
        "--model",
        env["model"],
        "--adapter",
        env["ft"],
        "--data",
        env["train"],
        *COLUMNS,
        "--max-length",
        "12",
        "--out",
        stores["train"],
        "-q",
    )
    assert code == 2 and "different configuration" in err and "max_length" in err
    # the score folder used by the report command
    code, _, err = run(capsys, "report", "--scores", "x.safetensors", "--data", env["train"], "--out", env["ft"], "-q")
    assert code == 2


def test_demo_delegates_to_datainf_demos(capsys, monkeypatch, tmp_path):
    seen = {}

    def main_demo(args):
        seen["args"] = args
        return 0

    import datainf.demos

    monkeypatch.setattr(datainf.demos, "main_demo", main_demo)
    code, _, err = run(
        capsys, "demo", "--out", tmp_path / "d", "--task", "text-generation", "--dataset", "math", "--seed", "3", "-q"
    )
    assert code == 0, err
    args = seen["args"]
    assert args.out == str(tmp_path / "d") and args.task == "text-generation" and args.seed == 3 and args.quiet is True
    assert args.dataset == "math" and args.recompute is False
    code, _, err = run(capsys, "demo", "--task", "generation", "-q")
    assert code == 2 and "text-generation" in err  # unknown tasks are refused, naming the valid ones


def test_help_and_no_command(capsys):
    assert main(["--help"]) == 0
    assert "positive influence = harmful" in capsys.readouterr().out
    assert main([]) == 2


def test_python_dash_m_entry_point():
    """`python -m datainf.cli` (how torchrun launches it) runs the same command line."""
    import os
    import subprocess

    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-m", "datainf.cli", "score", "--damping", "abc"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 2 and done.stderr.startswith("datainf: error: Bad value 'abc' for --damping")


def test_demo_help_does_not_call_out_required(capsys):
    assert main(["demo", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "(required)" not in text
    assert "datainf-out/demo" in text
    assert main(["score", "--help"]) == 0
    assert "output folder (required)" in " ".join(capsys.readouterr().out.split())


def test_grads_with_a_plain_peft_adapter_needs_label_names(env, stores, capsys, tmp_path):
    import shutil

    plain = Path(shutil.copytree(env["ft"] / "adapter", tmp_path / "plain-adapter"))
    (plain / "datainf_adapter.json").unlink()  # as peft's save_pretrained leaves it: no label names
    common = ["grads", "--model", env["model"], "--adapter", plain, "--data", env["train"], *COLUMNS, "-q"]
    code, _, err = run(capsys, *common, "--max-length", "16", "--out", tmp_path / "g")
    assert code == 2 and "--label-names" in err and "LABEL_0" in err
    code, _, err = run(capsys, *common, "--max-length", "16", "--label-names", "neg,pos", "--out", tmp_path / "g")
    assert code == 0, err
    ours, theirs = GradientStore.open(stores["train"]), GradientStore.open(tmp_path / "g")
    assert ours.ids == theirs.ids
    a, b = ours.to_dict(), theirs.to_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "g" / "config.json").read_text())["label_names"] == ["neg", "pos"]


def test_grads_with_a_plain_peft_adapter_reads_real_id2label_names(env, stores, capsys, tmp_path):
    import shutil

    plain = Path(shutil.copytree(env["ft"] / "adapter", tmp_path / "plain-adapter"))
    (plain / "datainf_adapter.json").unlink()
    base = Path(shutil.copytree(env["model"], tmp_path / "named-base"))
    config = json.loads((base / "config.json").read_text())
    config["id2label"], config["label2id"] = {"0": "neg", "1": "pos"}, {"neg": 0, "pos": 1}
    (base / "config.json").write_text(json.dumps(config))
    code, _, err = run(
        capsys, "grads", "--model", base, "--adapter", plain, "--data", env["train"], *COLUMNS, "--max-length", "16",
        "-q", "--out", tmp_path / "g",
    )  # fmt: skip
    assert code == 0, err
    a, b = GradientStore.open(stores["train"]).to_dict(), GradientStore.open(tmp_path / "g").to_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lissa_divergence_is_said_once_in_the_cli_words(capsys, tmp_path):
    dims = {"layer.lora_A": 6, "layer.lora_B": 4}
    generator = torch.Generator().manual_seed(0)
    for name, n in (("train", 12), ("test", 3)):
        store = GradientStore.create(tmp_path / name, block_dims=dims, fingerprint={"model": "m"})
        grads = {k: 10 * torch.randn(n, d, generator=generator) for k, d in dims.items()}  # spectrum far above 2
        store.append([f"{name}{i}" for i in range(n)], grads)
        store.finalize()
    common = ["score", "--train-grads", tmp_path / "train", "--test-grads", tmp_path / "test", "-q"]
    code, out, err = run(capsys, *common, "--method", "lissa,datainf", "--out", tmp_path / "s")
    assert code == 0, err
    assert err.count("LiSSA diverged") == 1
    assert """--method-options '{"lissa": {"scale": "trace"}}'""" in err
    assert "LissaDivergenceWarning" not in err and "warnings.warn" not in err  # no raw Python warning
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith(("lissa", "datainf"))}
    assert "(diverged)" in rows["lissa"] and "(diverged)" not in rows["datainf"]
    code, out, err = run(
        capsys,
        *common,
        "--method",
        "lissa",
        "--method-options",
        '{"lissa": {"scale": "trace"}}',
        "--out",
        tmp_path / "t",
    )
    assert code == 0 and "diverged" not in err + out


# ---------------------------------------------------------------------------------------------- Kronecker factors (kfac / ekfac)


def test_kfac_from_stores_needs_grads_factors_and_score_from_data_collects_them(env, stores, capsys, tmp_path):
    import shutil

    def score(out: Path, *inputs: object) -> tuple[int, str, str]:
        return run(capsys, "score", *inputs, "--method", "kfac,ekfac", "--out", out, "-q")

    # a store collected without factors: one error that names the option collecting them
    code, _, err = score(tmp_path / "refused", "--train-grads", stores["train"], "--test-grads", stores["test"])
    assert code == 2 and "datainf grads --factors" in err and "Traceback" not in err

    # rerun grads with --factors on a finished store written without it (its config.json has no "factors"):
    # accepted, the gradients are kept and only the factors are computed
    train = tmp_path / "g-train"
    shutil.copytree(stores["train"], train)
    before = (train / "manifest.json").read_bytes()
    grads = ["grads", "--model", env["model"], "--adapter", env["ft"], "--data", env["train"], *COLUMNS]
    code, stdout, err = run(capsys, *grads, "--factors", "--out", train, "-q")
    assert code == 0, err
    assert "resumed: 16 of 16 examples were already collected" in stdout
    assert (train / "manifest.json").read_bytes() == before and (train / "kronecker-factors" / "index.json").is_file()
    assert json.loads((train / "config.json").read_text())["factors"] is True
    code, _, err = run(capsys, *grads, "--out", train, "-q")  # and without --factors again: the same folder
    assert code == 0, err
    code, _, err = score(tmp_path / "from-stores", "--train-grads", train, "--test-grads", stores["test"])
    assert code == 0, err

    # from the training data (gradients on the fly): the factors are collected in the same run
    data = ("--model", env["model"], "--adapter", env["ft"], "--train-data", env["train"], *COLUMNS)
    code, _, err = score(tmp_path / "from-data", *data, "--test-grads", stores["test"], "--no-loss-baseline")
    assert code == 0, err
    assert (tmp_path / "from-data" / "onthefly" / "kronecker-factors" / "index.json").is_file()
    for method in ("kfac", "ekfac"):
        from_stores = Scores.load(tmp_path / "from-stores" / f"scores-{method}.safetensors").values
        from_data = Scores.load(tmp_path / "from-data" / f"scores-{method}.safetensors").values
        torch.testing.assert_close(from_data, from_stores, rtol=1e-4, atol=1e-6)


def test_projected_grads_and_scores(env, stores, capsys, tmp_path):
    """--project-dim / --project-seed: recorded in the store, refused against unprojected test gradients, and the
    on-the-fly training gradients of ``score --train-data`` get the same projection."""
    common = ["--model", env["model"], "--adapter", env["ft"], *COLUMNS, "-q"]
    projection = ["--project-dim", "16", "--project-seed", "1"]
    for name, data in (("p-train", env["train"]), ("p-test", env["test"])):
        code, _, err = run(capsys, "grads", *common, *projection, "--data", data, "--out", tmp_path / name)
        assert code == 0, err
    train = GradientStore.open(tmp_path / "p-train")
    assert train.fingerprint["projection"] == "kron-gaussian-v1:dim=16:seed=1"
    assert max(train.block_dims.values()) <= 16 < max(GradientStore.open(stores["train"]).block_dims.values())
    config = json.loads((tmp_path / "p-train" / "config.json").read_text())
    assert config["project_dim"] == 16 and config["project_seed"] == 1
    assert "project_dim" not in json.loads((stores["train"] / "config.json").read_text())
    code, _, err = run(
        capsys, "score", "--train-grads", tmp_path / "p-train", "--test-grads", tmp_path / "p-test", "--out",
        tmp_path / "s1", "-q",
    )  # fmt: skip
    assert code == 0, err
    code, _, err = run(
        capsys, "score", "--train-grads", tmp_path / "p-train", "--test-grads", stores["test"], "--out",
        tmp_path / "s2", "-q",
    )  # fmt: skip
    assert code == 2 and "dim=16:seed=1" in err and "'none'" in err
    code, _, err = run(
        capsys, "score", "--train-grads", tmp_path / "p-train", "--test-grads", tmp_path / "p-test", *projection,
        "--out", tmp_path / "s4", "-q",
    )  # fmt: skip
    assert code == 2 and "--project-dim applies where gradients are computed" in err
    code, _, err = run(
        capsys, "score", *common, *projection, "--train-data", env["train"], "--test-grads", tmp_path / "p-test",
        "--out", tmp_path / "s3",
    )  # fmt: skip
    assert code == 0, err
    a, b = (
        Scores.load(tmp_path / "s1" / "scores-datainf.safetensors"),
        Scores.load(tmp_path / "s3" / "scores-datainf.safetensors"),
    )
    torch.testing.assert_close(b.values, a.values, rtol=1e-4, atol=1e-6 * float(a.values.abs().max()))

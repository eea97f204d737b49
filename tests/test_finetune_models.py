"""Fine-tuning (datainf.finetune) and model/adapter loading (datainf.models) on tiny random models."""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import WORDS, save_tiny_model

from datainf.errors import ConfigError, DatasetError, EmptyInputError
from datainf.finetune import FinetuneConfig, finetune_lora
from datainf.models import (
    AdapterMismatchError,
    ModelLoadError,
    base_model_digest,
    load_model,
    read_adapter_metadata,
    resolve_adapter_dir,
)


def sentiment_records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    neutral = WORDS[:10]
    out = []
    for i in range(n):
        label = "pos" if i % 2 else "neg"
        cue = ["good", "great", "fine"] if label == "pos" else ["bad", "awful", "poor"]
        words = rng.sample(neutral, 4) + rng.sample(cue, 2)
        rng.shuffle(words)
        out.append({"id": f"r{i}", "text": " ".join(words), "label": label})
    return out


def lm_records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [
        {"id": f"l{i}", "prompt": " ".join(rng.sample(WORDS, 3)), "response": " ".join(rng.sample(WORDS, 2))}
        for i in range(n)
    ]


FAST = dict(epochs=2, batch_size=8, lr=5e-3, max_length=16)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {
        "tiny": save_tiny_model(root / "tiny"),
        "tiny_copy": Path(shutil.copytree(root / "tiny", root / "tiny_copy")),
        "other_seed": save_tiny_model(root / "other_seed", seed=1),
        "wide": save_tiny_model(root / "wide", hidden=24),
        "deeper": save_tiny_model(root / "deeper", layers=3),
        "gpt2": save_tiny_model(root / "gpt2", kind="gpt2"),
    }


@pytest.fixture(scope="module")
def adapter(models, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("adapter") / "run"
    model, tok = load_model(models["tiny"], kind="classification", num_labels=2)
    return finetune_lora(model, tok, sentiment_records(24), FinetuneConfig(**FAST), output_dir=out, progress=False)


def foreign_copy(adapter: Path, dest: Path, recorded_base: str = "some-org/some-model") -> Path:
    """The adapter as a non-datainf tool would leave it: no datainf_adapter.json, another recorded base."""
    shutil.copytree(adapter, dest)
    (dest / "datainf_adapter.json").unlink()
    cfg = json.loads((dest / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = recorded_base
    (dest / "adapter_config.json").write_text(json.dumps(cfg))
    return dest


# ---------------------------------------------------------------------------------------------- FinetuneConfig


def test_config_defaults_follow_the_paper():
    cfg = FinetuneConfig()
    assert (cfg.r, cfg.alpha, cfg.lr, cfg.batch_size, cfg.warmup_ratio, cfg.max_length) == (
        8,
        16.0,
        3e-4,
        32,
        0.06,
        128,
    )
    assert cfg.target_modules == ("query", "value") and cfg.dropout == 0.1


@pytest.mark.parametrize(
    "bad, word",
    [
        ({"kind": "regression"}, "kind"),
        ({"r": 0}, "r=0"),
        ({"dropout": 1.0}, "dropout"),
        ({"epochs": 0}, "epochs"),
        ({"lr": -1.0}, "lr"),
        ({"warmup_ratio": 1.5}, "warmup_ratio"),
        ({"max_length": 1}, "max_length"),
        ({"target_modules": ()}, "target_modules"),
        ({"batch_size": 2.5}, "batch_size"),
    ],
)
def test_config_validation(bad, word):
    with pytest.raises(ConfigError, match=word):
        FinetuneConfig(**bad)


def test_config_round_trip_and_unknown_keys():
    cfg = FinetuneConfig(target_modules="query, key ,value", epochs=3)
    assert cfg.target_modules == ("query", "key", "value")
    assert FinetuneConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ConfigError, match="Unknown fine-tuning setting.*'rank'"):
        FinetuneConfig.from_dict({"rank": 4})


# ---------------------------------------------------------------------------------------------- finetune_lora


def test_finetune_writes_adapter_metadata_and_log(adapter, models):
    names = sorted(p.name for p in adapter.iterdir())
    assert {"adapter_config.json", "adapter_model.safetensors", "datainf_adapter.json", "training_log.json"} <= set(
        names
    )
    meta = read_adapter_metadata(adapter)
    assert meta["kind"] == "classification" and meta["label_names"] == ["neg", "pos"] and meta["num_labels"] == 2
    assert meta["base_model"] == str(models["tiny"].resolve())
    assert meta["base_model_digest"] == base_model_digest(models["tiny"])
    assert meta["finetune_config"]["epochs"] == FAST["epochs"]
    log = json.loads((adapter / "training_log.json").read_text())
    assert [e["epoch"] for e in log["epochs"]] == [1, 2] and all(e["loss"] > 0 for e in log["epochs"])
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    assert any("lora_A" in k for k in tensors) and any("lora_B" in k for k in tensors)
    assert any("classifier" in k for k in tensors), "the classification head must be saved (modules_to_save)"
    assert not [p for p in adapter.parent.iterdir() if p.name.startswith(".")], "temporary folders left behind"


def test_finetune_is_deterministic_and_seeded(models, adapter, tmp_path):
    def run(seed: int, out: Path) -> dict[str, torch.Tensor]:
        model, tok = load_model(models["tiny"], kind="classification", num_labels=2)
        finetune_lora(
            model, tok, sentiment_records(24), FinetuneConfig(**FAST, seed=seed), output_dir=out, progress=False
        )
        return load_file(str(out / "adapter_model.safetensors"))

    reference = load_file(str(adapter / "adapter_model.safetensors"))
    again = run(0, tmp_path / "again")
    assert reference.keys() == again.keys()
    assert all(torch.equal(reference[k], again[k]) for k in reference)
    other = run(1, tmp_path / "other")
    assert any(not torch.equal(reference[k], other[k]) for k in reference)


def test_finetune_learns_a_separable_task(models, tmp_path):
    rng = random.Random(0)
    records = [
        {
            "id": str(i),
            "text": " ".join(rng.sample(WORDS[:5], 2) + ["good" if i % 2 else "bad"]),
            "label": "pos" if i % 2 else "neg",
        }
        for i in range(32)
    ]
    model, tok = load_model(models["tiny"], kind="classification", num_labels=2)
    cfg = FinetuneConfig(epochs=10, batch_size=8, lr=2e-2, max_length=16, dropout=0.0)
    out = finetune_lora(model, tok, records, cfg, output_dir=tmp_path / "a", progress=False)
    losses = [e["loss"] for e in json.loads((out / "training_log.json").read_text())["epochs"]]
    assert losses[-1] < 0.5 * losses[0], losses
    loaded, _ = load_model(models["tiny"], kind="classification", adapter=out)
    batch = tok([r["text"] for r in records], return_tensors="pt", padding=True)
    with torch.no_grad():
        predicted = loaded(**batch).logits.argmax(-1).tolist()
    accuracy = sum(loaded.config.id2label[p] == r["label"] for p, r in zip(predicted, records)) / len(records)
    assert accuracy >= 0.9


def test_loaded_adapter_reproduces_the_trained_model(models, tmp_path):
    model, tok = load_model(models["tiny"], kind="classification", num_labels=2)
    out = finetune_lora(
        model, tok, sentiment_records(16), FinetuneConfig(**FAST), output_dir=tmp_path / "a", progress=False
    )
    model.eval()  # finetune_lora injected the trained LoRA layers into this very model
    loaded, _ = load_model(models["tiny"], kind="classification", adapter=out)
    batch = tok(["the cat is good", "a dog was awful"], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits)
    assert loaded.config.id2label == {0: "neg", 1: "pos"}


def test_causal_lm_finetune_and_reload(models, tmp_path):
    model, tok = load_model(models["tiny"], kind="causal-lm")
    assert model.config.is_decoder, "BERT must be loaded as a causal decoder"
    cfg = FinetuneConfig(kind="causal-lm", epochs=1, batch_size=4, max_length=16)
    out = finetune_lora(model, tok, lm_records(8), cfg, output_dir=tmp_path / "lm", progress=False)
    meta = read_adapter_metadata(out)
    assert meta["kind"] == "causal-lm" and meta["label_names"] is None
    loaded, _ = load_model(models["tiny"], adapter=out, kind="causal-lm")
    assert type(loaded).__name__ == "PeftModelForCausalLM"
    with pytest.raises(ModelLoadError, match="trained for 'causal-lm'"):
        load_model(models["tiny"], adapter=out, kind="classification")


def test_finetune_interrupted_leaves_nothing(models, tmp_path, monkeypatch):
    model, tok = load_model(models["tiny"], kind="classification", num_labels=2)
    calls = {"n": 0}
    original = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    with pytest.raises(KeyboardInterrupt):
        finetune_lora(
            model, tok, sentiment_records(24), FinetuneConfig(**FAST), output_dir=tmp_path / "out", progress=False
        )
    assert list(tmp_path.iterdir()) == []


def test_finetune_bad_inputs(models, tmp_path, adapter):
    model, tok = load_model(models["tiny"], kind="classification", num_labels=3)
    with pytest.raises(ConfigError, match="head has 3 outputs but the data has 2 classes"):
        finetune_lora(
            model, tok, sentiment_records(8), FinetuneConfig(**FAST), output_dir=tmp_path / "a", progress=False
        )
    model, tok = load_model(models["tiny"], kind="classification", num_labels=2)
    with pytest.raises(EmptyInputError):
        finetune_lora(model, tok, [], FinetuneConfig(**FAST), output_dir=tmp_path / "a", progress=False)
    with pytest.raises(ConfigError, match="already exists"):
        finetune_lora(model, tok, sentiment_records(8), FinetuneConfig(**FAST), output_dir=adapter, progress=False)
    with pytest.raises(DatasetError, match="'text'"):
        finetune_lora(
            model, tok, [{"id": "1", "label": "a"}], FinetuneConfig(**FAST), output_dir=tmp_path / "b", progress=False
        )
    with pytest.raises(DatasetError, match="not among the label names"):
        finetune_lora(
            model,
            tok,
            sentiment_records(4),
            FinetuneConfig(**FAST),
            output_dir=tmp_path / "c",
            label_names=["neg", "x"],
            progress=False,
        )
    gpt2, tok2 = load_model(models["gpt2"], kind="causal-lm")
    with pytest.raises(ConfigError, match=r"target_modules=\['query', 'value'\].*'c_attn'"):
        finetune_lora(
            gpt2,
            tok2,
            lm_records(4),
            FinetuneConfig(kind="causal-lm", **FAST),
            output_dir=tmp_path / "d",
            progress=False,
        )
    assert not (tmp_path / "a").exists() and not (tmp_path / "d").exists()


# ---------------------------------------------------------------------------------------------- load_model


def test_hub_id_offline_fails_fast_and_clearly():
    started = time.perf_counter()
    with pytest.raises(ModelLoadError, match="datainf works offline: pass a local folder"):
        load_model("FacebookAI/roberta-large", kind="classification", num_labels=2)
    with pytest.raises(ModelLoadError, match="datainf works offline"):
        resolve_adapter_dir("someone/lora-adapter")
    assert time.perf_counter() - started < 5


def test_not_a_model_folder(models, adapter, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path / "empty", kind="classification")
    with pytest.raises(ModelLoadError, match="peft adapter folder, not a base model"):
        load_model(adapter, kind="classification")
    with pytest.raises(ModelLoadError, match="full model folder, not a peft adapter"):
        load_model(models["tiny"], kind="classification", adapter=models["tiny"])
    with pytest.raises(ModelLoadError, match="Unknown model kind"):
        load_model(models["tiny"], kind="regression")  # type: ignore[arg-type]


def test_run_folder_resolves_to_its_adapter(adapter, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(adapter, run / "adapter")
    assert resolve_adapter_dir(run) == run / "adapter"


def test_base_model_digest_identifies_weights_not_location(models):
    assert base_model_digest(models["tiny"]) == base_model_digest(models["tiny_copy"])
    assert base_model_digest(models["tiny"]) != base_model_digest(models["other_seed"])


def test_adapter_on_a_copy_of_its_base_loads(models, adapter):
    model, _ = load_model(models["tiny_copy"], kind="classification", adapter=adapter)
    assert type(model).__name__ == "PeftModelForSequenceClassification"


def test_datainf_adapter_on_another_base_is_refused(models, adapter):
    with pytest.raises(AdapterMismatchError, match="different model") as info:
        load_model(models["other_seed"], kind="classification", adapter=adapter)
    assert str(models["tiny"].resolve()) in str(info.value)
    with pytest.raises(AdapterMismatchError, match="trained with 2 labels"):
        load_model(models["tiny"], kind="classification", num_labels=3, adapter=adapter)


def test_foreign_adapter_with_other_shapes_is_refused(models, adapter, tmp_path):
    foreign = foreign_copy(adapter, tmp_path / "foreign")
    with pytest.raises(AdapterMismatchError, match="weight shapes differ"):
        load_model(models["wide"], kind="classification", num_labels=2, adapter=foreign)


def test_foreign_adapter_without_its_target_modules_is_refused(models, adapter, tmp_path):
    foreign = foreign_copy(adapter, tmp_path / "foreign")
    with pytest.raises(AdapterMismatchError, match="target modules"):
        load_model(models["gpt2"], kind="classification", num_labels=2, adapter=foreign)


def test_foreign_adapter_on_a_deeper_model_is_refused(models, adapter, tmp_path):
    foreign = foreign_copy(adapter, tmp_path / "foreign")
    with pytest.raises(AdapterMismatchError, match="not in the adapter"):
        load_model(models["deeper"], kind="classification", num_labels=2, adapter=foreign)


def test_foreign_adapter_recording_an_existing_other_folder_is_refused(models, adapter, tmp_path):
    foreign = foreign_copy(adapter, tmp_path / "foreign", recorded_base=str(models["tiny"]))
    with pytest.raises(AdapterMismatchError, match="exists here and differs"):
        load_model(models["other_seed"], kind="classification", num_labels=2, adapter=foreign)
    model, _ = load_model(models["tiny"], kind="classification", num_labels=2, adapter=foreign)
    assert model is not None


# ---------------------------------------------------------------------------------------------- transformers' load report


def _load_reports(monkeypatch, load) -> list[str]:
    """The load-report warnings transformers logs while ``load()`` runs."""
    import logging

    from transformers.utils import logging as hf_logging

    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    handler = Keep(level=logging.WARNING)
    root = logging.getLogger("transformers")
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()
    root.addHandler(handler)
    try:
        load()
    finally:
        root.removeHandler(handler)
        hf_logging.set_verbosity(level)
    return [m for m in seen if "LOAD REPORT" in m]


@pytest.fixture(scope="module")
def headless_base(tmp_path_factory) -> Path:
    """A tiny BERT saved without a classification head (as sentence-transformer checkpoints are)."""
    from tiny_models import SPECIAL_TOKENS
    from transformers import BertConfig, BertModel, BertTokenizer

    path = tmp_path_factory.mktemp("headless") / "base"
    vocab = {w: i for i, w in enumerate(SPECIAL_TOKENS + WORDS)}
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    BertModel(cfg).save_pretrained(str(path))
    BertTokenizer(vocab=vocab).save_pretrained(str(path))
    return path


def test_the_new_head_notice_is_silenced(headless_base, models, monkeypatch):
    # the head load_model sizes and initialises on purpose: no "newly initialized" report
    reports = _load_reports(monkeypatch, lambda: load_model(headless_base, kind="classification", num_labels=3))
    assert reports == []
    # a head re-sized from the checkpoint's 2 classes to 3: also on purpose
    reports = _load_reports(monkeypatch, lambda: load_model(models["tiny"], kind="classification", num_labels=3))
    assert reports == []


def test_other_load_reports_still_show(headless_base, monkeypatch):
    # an encoder loaded as a causal LM lacks its LM head: that notice is not ours to hide
    reports = _load_reports(monkeypatch, lambda: load_model(headless_base, kind="causal-lm"))
    assert len(reports) == 1 and "cls.predictions" in reports[0]
    import logging

    assert logging.getLogger("transformers.modeling_utils").filters == []  # the filter is removed after loading


# ---------------------------------------------------------------------------------------------- validation, resuming


def _adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def test_validation_metrics_per_epoch_and_best_epoch(models, tmp_path):
    cfg = FinetuneConfig(**{**FAST, "epochs": 3})
    model, tok = load_model(models["tiny"], kind="classification", num_labels=2)
    out = finetune_lora(
        model,
        tok,
        sentiment_records(24),
        cfg,
        output_dir=tmp_path / "eval",
        eval_records=sentiment_records(10, seed=5),
        progress=False,
    )
    log = json.loads((out / "training_log.json").read_text())
    assert [e["epoch"] for e in log["epochs"]] == [1, 2, 3]
    for entry in log["epochs"]:
        assert entry["eval_loss"] > 0 and 0.0 <= entry["eval_accuracy"] <= 1.0
    losses = [e["eval_loss"] for e in log["epochs"]]
    assert log["best_epoch"] == 1 + losses.index(min(losses)) and log["best_eval_loss"] == min(losses)
    assert log["kept_epoch"] == 3 and log["num_eval_examples"] == 10

    # validation draws no random numbers: the adapter equals one trained without it
    model, tok = load_model(models["tiny"], kind="classification", num_labels=2)
    plain = finetune_lora(model, tok, sentiment_records(24), cfg, output_dir=tmp_path / "plain", progress=False)
    a, b = _adapter_tensors(out), _adapter_tensors(plain)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "eval_loss" not in json.loads((plain / "training_log.json").read_text())["epochs"][0]


def test_keep_best_keeps_the_best_epochs_adapter(models, tmp_path):
    # a learning rate so high that later epochs overshoot: the best epoch is not the last
    cfg = FinetuneConfig(**{**FAST, "epochs": 4, "lr": 0.3, "warmup_ratio": 0.0})
    evals = sentiment_records(10, seed=5)
    outs = {}
    for keep in (False, True):
        model, tok = load_model(models["tiny"], kind="classification", num_labels=2)
        outs[keep] = finetune_lora(
            model,
            tok,
            sentiment_records(24),
            cfg,
            output_dir=tmp_path / f"keep-{keep}",
            eval_records=evals,
            keep_best=keep,
            progress=False,
        )
    log = json.loads((outs[True] / "training_log.json").read_text())
    assert log["kept_epoch"] == log["best_epoch"]
    assert json.loads((outs[True] / "datainf_adapter.json").read_text())["kept_epoch"] == log["best_epoch"]
    # the kept adapter reproduces the best epoch's validation loss
    from datainf.baselines import training_losses
    from datainf.tasks import get_task_kind

    model, tok = load_model(models["tiny"], kind="classification", adapter=outs[True])
    task = get_task_kind("classification").make_task(tok, max_length=16, num_labels=2)
    task.setup(model)
    encoded = [{**r, "label": 1 if r["label"] == "pos" else 0} for r in evals]
    assert float(training_losses(model, task, encoded).mean()) == pytest.approx(log["best_eval_loss"], rel=1e-5)
    assert log["best_epoch"] < 4  # so the kept adapter is not the last epoch's
    a, b = _adapter_tensors(outs[True]), _adapter_tensors(outs[False])
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_keep_best_needs_validation_data(models, tmp_path):
    model, tok = load_model(models["tiny"], kind="classification", num_labels=2)
    with pytest.raises(ConfigError, match="keep_best needs validation data"):
        finetune_lora(
            model, tok, sentiment_records(8), FinetuneConfig(**FAST), output_dir=tmp_path / "a", keep_best=True
        )
    with pytest.raises(DatasetError, match="never occur in training|not among"):
        finetune_lora(
            model,
            tok,
            sentiment_records(8),
            FinetuneConfig(**FAST),
            output_dir=tmp_path / "b",
            eval_records=[{"id": "v", "text": "good", "label": "meh"}],
        )


@pytest.mark.parametrize(("stop_at", "every", "kept"), [(5, 2, 4), (4, None, 3), (7, 1, 6), (3, 5, 0)])
def test_interrupted_finetune_resumes_to_the_same_adapter(models, tmp_path, monkeypatch, stop_at, every, kept):
    """Ctrl-C during optimiser step ``stop_at``: the rerun keeps the ``kept`` steps checkpointed
    (every ``every`` steps and at epoch ends) and trains only the rest, to the same adapter."""
    cfg = FinetuneConfig(**{**FAST, "epochs": 3})  # 24 records / batch 8: 3 steps per epoch, 9 in all
    train, evals = sentiment_records(24), sentiment_records(6, seed=3)

    def run(out: Path, ckpt: Path | None) -> Path:
        model, tok = load_model(models["tiny"], kind="classification", num_labels=2)
        return finetune_lora(
            model,
            tok,
            train,
            cfg,
            output_dir=out,
            eval_records=evals,
            checkpoint_dir=ckpt,
            checkpoint_every=every,
            progress=False,
        )

    reference = run(tmp_path / "reference", None)

    calls = {"n": 0}
    original = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == stop_at:
            raise KeyboardInterrupt  # Ctrl-C during optimiser step `stop_at`
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    ckpt = tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "resumed", ckpt)
    assert not (tmp_path / "resumed").exists()
    assert (ckpt / "finetune-checkpoint.pt").is_file() == (kept > 0)

    calls["n"] = -100  # no more interruptions; count the steps the rerun takes
    resumed = run(tmp_path / "resumed", ckpt)
    assert calls["n"] + 100 == 9 - kept
    a, b = _adapter_tensors(resumed), _adapter_tensors(reference)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log_a = json.loads((resumed / "training_log.json").read_text())
    log_b = json.loads((reference / "training_log.json").read_text())
    for x, y in zip(log_a["epochs"], log_b["epochs"], strict=True):
        assert (x["loss"], x["eval_loss"], x["eval_accuracy"]) == (y["loss"], y["eval_loss"], y["eval_accuracy"])
    assert not (ckpt / "finetune-checkpoint.pt").exists()  # removed once the adapter is saved


def test_a_checkpoint_of_other_settings_is_not_resumed(models, tmp_path, monkeypatch):
    train = sentiment_records(24)
    ckpt = tmp_path / "ckpt"
    original = torch.optim.AdamW.step
    calls = {"n": 0}

    def step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    model, tok = load_model(models["tiny"], kind="classification", num_labels=2)
    with pytest.raises(KeyboardInterrupt):
        finetune_lora(model, tok, train, FinetuneConfig(**FAST), output_dir=tmp_path / "x", checkpoint_dir=ckpt)
    monkeypatch.setattr(torch.optim.AdamW, "step", original)
    other = FinetuneConfig(**{**FAST, "seed": 1})
    model, tok = load_model(models["tiny"], kind="classification", num_labels=2)
    resumed = finetune_lora(model, tok, train, other, output_dir=tmp_path / "x", checkpoint_dir=ckpt, progress=False)
    model, tok = load_model(models["tiny"], kind="classification", num_labels=2)
    fresh = finetune_lora(model, tok, train, other, output_dir=tmp_path / "y", progress=False)
    a, b = _adapter_tensors(resumed), _adapter_tensors(fresh)
    assert all(torch.equal(a[k], b[k]) for k in a)

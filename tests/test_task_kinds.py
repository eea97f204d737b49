"""The task-kind registry: the built-in kinds, make_task, and a new kind registered in one call."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from gradient_fixtures import word_tokenizer
from tiny_models import WORDS, save_tiny_model
from torch import nn

import datainf.tasks.kinds as kinds_module
from datainf.errors import ConfigError
from datainf.finetune import FinetuneConfig, finetune_lora
from datainf.models import ModelLoadError, load_model, read_adapter_metadata
from datainf.tasks import (
    CausalLMTask,
    DiffusionTask,
    GradientTask,
    SequenceClassificationConfig,
    SequenceClassificationTask,
    TaskBatch,
    TaskKind,
    available_task_kinds,
    get_task_kind,
    register_task_kind,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Register kinds on a copy of the registry; the built-in one is restored after the test."""
    monkeypatch.setattr(kinds_module, "_KINDS", dict(kinds_module._KINDS))


# ---------------------------------------------------------------------------------------------- built-in kinds


def test_built_in_kinds_in_registration_order() -> None:
    assert available_task_kinds() == ["classification", "causal-lm", "diffusion", "text-to-image"]
    assert available_task_kinds(trainable=True) == ["classification", "causal-lm"]
    assert available_task_kinds(loadable=True) == ["classification", "causal-lm", "text-to-image"]
    cls, lm, diff = (get_task_kind(n) for n in ("classification", "causal-lm", "diffusion"))
    assert (cls.task_class, lm.task_class, diff.task_class) == (SequenceClassificationTask, CausalLMTask, DiffusionTask)
    # the CLI's data requirements and label handling, per kind
    assert cls.required_fields == ("text", "label") and cls.encodes_labels and not cls.decoder
    assert lm.required_fields == () and not lm.encodes_labels and lm.decoder
    assert (cls.peft_task_type, lm.peft_task_type, diff.peft_task_type) == ("SEQ_CLS", "CAUSAL_LM", None)
    assert cls.model_class().__name__ == "AutoModelForSequenceClassification"
    assert lm.model_class().__name__ == "AutoModelForCausalLM"


def test_unknown_kind_lists_the_known_ones() -> None:
    known = r"\['classification', 'causal-lm', 'diffusion', 'text-to-image'\]"
    with pytest.raises(ConfigError, match=r"Unknown task kind 'regression'; use one of " + known):
        get_task_kind("regression")


def test_make_task_gives_the_fingerprint_of_the_cli_task() -> None:
    """The task (and so the store fingerprint) the CLI built before the registry, recorded at 48755a2."""
    tok = word_tokenizer()
    task = get_task_kind("classification").make_task(tok, max_length=32, num_labels=3)
    assert isinstance(task, SequenceClassificationTask)
    assert task.describe() == (
        'SequenceClassificationTask{"label_field": "label", "max_length": 32, "pad_token_id": null, '
        '"text_field": "text", "text_pair_field": null}|tokenizer=|num_labels=3'
    )
    lm = get_task_kind("causal-lm").make_task(word_tokenizer("lm"), max_length=None, num_labels=5)
    assert lm.describe() == (
        'CausalLMTask{"append_eos": true, "loss_on": "response", "max_length": null, "pad_token_id": null, '
        '"prompt_field": "prompt", "response_field": "response"}|tokenizer='
    )


def test_diffusion_kind_is_registered_but_built_directly() -> None:
    kind = get_task_kind("diffusion")
    with pytest.raises(ConfigError, match="noise scheduler"):
        kind.make_task(None)
    with pytest.raises(ConfigError, match="no transformers model class"):
        kind.model_class()
    with pytest.raises(ModelLoadError, match="'diffusion' names no transformers model class"):
        load_model("unused", kind="diffusion")
    with pytest.raises(ConfigError, match=r"kind='diffusion': use one of \['classification', 'causal-lm'\]"):
        FinetuneConfig(kind="diffusion")


def test_task_kind_validation(registry: None) -> None:
    with pytest.raises(ConfigError, match="name='Bad Name'"):
        TaskKind(name="Bad Name", task_class=CausalLMTask, config_class=SequenceClassificationConfig)
    with pytest.raises(ConfigError, match="not a GradientTask subclass"):
        TaskKind(name="x", task_class=dict, config_class=SequenceClassificationConfig)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="not a dataclass"):
        TaskKind(name="x", task_class=CausalLMTask, config_class=dict)
    with pytest.raises(ConfigError, match="not a string"):
        fields: tuple[str, ...] = "text"  # type: ignore[assignment]
        TaskKind(name="x", task_class=CausalLMTask, config_class=SequenceClassificationConfig, required_fields=fields)
    with pytest.raises(ConfigError, match="'causal-lm' is already registered"):
        register_task_kind(
            TaskKind(name="causal-lm", task_class=CausalLMTask, config_class=SequenceClassificationConfig)
        )
    assert register_task_kind(get_task_kind("causal-lm")) is get_task_kind("causal-lm"), (
        "re-registering the same kind is a no-op"
    )


# ---------------------------------------------------------------------------------------------- a new kind


@dataclass
class LengthConfig:
    """Config of the toy kind: only ``max_length`` (what make_task passes)."""

    max_length: int | None = None


class LengthTask(GradientTask):
    """Toy: ``l_i = (sum of the model's output on example i's token count) ** 2``."""

    def __init__(self, tokenizer: object = None, config: LengthConfig | None = None) -> None:
        self.tokenizer = tokenizer
        self.config = config or LengthConfig()

    def collate(self, examples, ids) -> TaskBatch:
        x = torch.tensor([[float(len(str(ex["text"]).split()))] for ex in examples])
        return TaskBatch(ids=[str(i) for i in ids], inputs={"x": x})

    def per_example_loss(self, model: nn.Module, batch: TaskBatch) -> torch.Tensor:
        return model(batch.inputs["x"]).sum(dim=1) ** 2


def test_a_registered_kind_is_seen_everywhere(registry: None) -> None:
    toy = register_task_kind(
        TaskKind(name="text-length", task_class=LengthTask, config_class=LengthConfig, required_fields=("text",))
    )
    assert get_task_kind("text-length") is toy
    assert available_task_kinds() == ["classification", "causal-lm", "diffusion", "text-to-image", "text-length"]
    assert "text-length" not in available_task_kinds(trainable=True), "no peft task type: fine-tuning cannot train it"
    with pytest.raises(ConfigError, match=r"kind='text-length': use one of \['classification', 'causal-lm'\]"):
        FinetuneConfig(kind="text-length")
    task = toy.make_task("tok", max_length=7, num_labels=3)
    assert isinstance(task, LengthTask) and task.config == LengthConfig(max_length=7) and task.tokenizer == "tok"
    assert task.describe() == 'LengthTask{"max_length": 7}'
    with pytest.raises(ModelLoadError, match="'text-length' names no transformers model class"):
        load_model("unused", kind="text-length")

    trainable = register_task_kind(
        TaskKind(
            name="text-length-ft",
            task_class=LengthTask,
            config_class=LengthConfig,
            required_fields=("text",),
            auto_model="AutoModelForSequenceClassification",
            peft_task_type="FEATURE_EXTRACTION",
        )
    )
    assert "text-length-ft" in available_task_kinds(trainable=True) and "text-length-ft" in available_task_kinds(
        loadable=True
    )
    assert FinetuneConfig(kind="text-length-ft").kind == "text-length-ft"
    assert trainable.prepare_records([{"text": "a b"}, {"id": 7, "text": "c"}]) == [
        {"text": "a b", "id": "0"},
        {"id": "7", "text": "c"},
    ]


class SmoothedClassificationTask(SequenceClassificationTask):
    """A new kind's task: sequence classification with the loss halved (any change of the loss will do)."""

    def per_example_loss(self, model: nn.Module, batch: TaskBatch) -> torch.Tensor:
        return 0.5 * super().per_example_loss(model, batch)


def test_a_registered_kind_loads_fine_tunes_and_reloads(registry: None, tmp_path: Path) -> None:
    """One registration, and load_model, FinetuneConfig and finetune_lora all take the new kind."""
    register_task_kind(
        TaskKind(
            name="half-classification",
            task_class=SmoothedClassificationTask,
            config_class=SequenceClassificationConfig,
            required_fields=("text", "label"),
            encodes_labels=True,
            auto_model="AutoModelForSequenceClassification",
            peft_task_type="SEQ_CLS",
        )
    )
    base = save_tiny_model(tmp_path / "tiny", num_labels=3)
    rng = random.Random(0)
    records = [{"id": f"r{i}", "text": " ".join(rng.sample(WORDS, 4)), "label": ["x", "y"][i % 2]} for i in range(8)]
    model, tok = load_model(base, kind="half-classification", num_labels=2)
    assert model.config.num_labels == 2
    cfg = FinetuneConfig(kind="half-classification", epochs=1, batch_size=4, max_length=16)
    out = finetune_lora(model, tok, records, cfg, output_dir=tmp_path / "run", progress=False)
    meta = read_adapter_metadata(out)
    assert meta["kind"] == "half-classification" and meta["label_names"] == ["x", "y"] and meta["num_labels"] == 2
    loaded, _ = load_model(base, kind="half-classification", adapter=out)
    assert loaded.config.id2label == {0: "x", 1: "y"}
    with pytest.raises(ModelLoadError, match="trained for 'half-classification'"):
        load_model(base, kind="classification", adapter=out)

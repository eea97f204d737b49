"""datainf.from_trainer / scores_from_trainer on a real transformers.Trainer with a tiny LoRA Llama."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from gradient_fixtures import llama_lm, lm_data, word_tokenizer

import datainf
from datainf.errors import DatasetError, TaskInputError
from datainf.gradients import CausalLMTask, collect_gradients
from datainf.integrations import TrainerTask, trainer_records


def _tokenized(records: list[dict[str, Any]], tok: Any) -> list[dict[str, Any]]:
    """What a user's preprocessing gives a Trainer: input_ids + labels with the prompt masked (-100)."""
    rows = []
    for r in records:
        prompt = tok(r["prompt"])["input_ids"]
        response = tok(r["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        rows.append(
            {
                "id": r["id"],
                "text": r["prompt"] + r["response"],  # a column the model does not take: dropped
                "input_ids": prompt + response,
                "labels": [-100] * len(prompt) + response,
            }
        )
    return rows


def _trainer(tmp_path: Path, train_steps: int = 1) -> tuple[Any, list[dict[str, Any]], list[dict[str, Any]]]:
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    tok = word_tokenizer("lm")
    model = llama_lm()
    train, test = lm_data(6, seed=1, high=8), lm_data(3, seed=2, high=8)
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=3,
        per_device_eval_batch_size=4,
        max_steps=train_steps,
        learning_rate=1e-3,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=_tokenized(train, tok),
        eval_dataset=_tokenized(test, tok),
        data_collator=DataCollatorForSeq2Seq(tok, label_pad_token_id=-100),
        processing_class=tok,
    )
    if train_steps:
        trainer.train()
    return trainer, train, test


def test_from_trainer_equals_the_causal_lm_task_on_the_raw_records(tmp_path: Path) -> None:
    trainer, train, _ = _trainer(tmp_path)
    store = datainf.from_trainer(trainer, progress=False)
    assert store.ids == [r["id"] for r in train]
    # the same loss defined from the raw prompt/response text: the same per-example gradients
    ref = collect_gradients(trainer.model, CausalLMTask(word_tokenizer("lm")), train, batch_size=2, progress=False)
    got, want = store.to_dict(), ref.to_dict()
    assert set(got) == set(want)
    for name, g in want.items():
        assert g.abs().sum() > 0
        torch.testing.assert_close(got[name], g, rtol=1e-4, atol=1e-6)
    assert trainer.model.training is True  # restored: the trainer left it in training mode


def test_scores_from_trainer_pairwise(tmp_path: Path) -> None:
    trainer, train, test = _trainer(tmp_path, train_steps=0)
    scores = datainf.scores_from_trainer(trainer, progress=False)
    assert tuple(scores.values.shape) == (len(test), len(train))
    assert torch.isfinite(torch.as_tensor(scores.values)).all()


def test_text_rows_use_the_processing_class(tmp_path: Path) -> None:
    trainer, train, _ = _trainer(tmp_path, train_steps=0)
    text_rows = [{"id": r["id"], "prompt": r["prompt"], "completion": r["response"]} for r in train[:3]]
    got = datainf.from_trainer(trainer, split=text_rows, progress=False).to_dict()
    tokenized = datainf.from_trainer(trainer, split=_tokenized(train[:3], word_tokenizer("lm")), progress=False)
    for name, g in tokenized.to_dict().items():
        torch.testing.assert_close(got[name], g, rtol=1e-4, atol=1e-6)


def test_trainer_records_drop_unused_columns(tmp_path: Path) -> None:
    trainer, train, _ = _trainer(tmp_path, train_steps=0)
    rows = trainer_records(trainer, "eval")
    assert set(rows[0]) == {"id", "input_ids", "labels"}
    with pytest.raises(Exception, match="split='test'"):
        trainer_records(trainer, "test")  # type: ignore[arg-type]


def test_bad_trainer_inputs(tmp_path: Path) -> None:
    trainer, _, _ = _trainer(tmp_path, train_steps=0)
    no_labels = TrainerTask(lambda feats: {"input_ids": torch.tensor([f["input_ids"][:2] for f in feats])})
    with pytest.raises(TaskInputError, match="returned no 'labels'"):
        no_labels.validate([{"input_ids": [4, 6, 7]}], ["a"])
    packed = [{"id": "p", "input_ids": [4, 6, 4, 7], "labels": [4, 6, 4, 7], "position_ids": [0, 1, 0, 1]}]
    with pytest.raises(DatasetError, match="packed"):
        datainf.from_trainer(trainer, split=packed, progress=False)
    trainer.train_dataset = None
    with pytest.raises(DatasetError, match="no train_dataset"):
        datainf.from_trainer(trainer, progress=False)

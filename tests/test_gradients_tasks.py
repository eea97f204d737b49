"""Tasks: the per-example loss is what the docstring says, batch invariance, and bad input."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from gradient_fixtures import (
    bert_classifier,
    classification_data,
    diffusion_class_data,
    diffusion_text_data,
    llama_lm,
    lm_data,
    random_text,
    scheduler,
    unet_class,
    unet_cond,
    word_tokenizer,
)
from peft import LoraConfig, get_peft_model
from torch import nn

from datainf.errors import ConfigError, EmptyInputError, NonFiniteGradientError, TaskInputError
from datainf.gradients import (
    CausalLMConfig,
    CausalLMTask,
    DiffusionTask,
    DiffusionTaskConfig,
    GradientTask,
    SequenceClassificationConfig,
    SequenceClassificationTask,
    TaskBatch,
    collect_gradients,
    find_lora_blocks,
)
from datainf.tasks import example_seed
from datainf.testing import check_per_example_gradients


def _loss_of(model, task, example, ex_id="x"):
    task.setup(model)
    model.eval()
    with torch.no_grad():
        return task.per_example_loss(model, task.collate([example], [ex_id]))[0]


# ----------------------------------------------------------------------------- the loss is what it says


def test_classification_loss_is_hf_cross_entropy() -> None:
    model, tok = bert_classifier(), word_tokenizer()
    ex = classification_data(1, seed=3)[0]
    enc = tok(ex["text"], return_tensors="pt")
    model.eval()
    with torch.no_grad():
        ref = model(**enc, labels=torch.tensor([ex["label"]])).loss
    torch.testing.assert_close(_loss_of(model, SequenceClassificationTask(tok), ex), ref)


@pytest.mark.parametrize("loss_on", ["response", "all"])
def test_causal_lm_loss_is_hf_nll_over_the_scored_tokens(loss_on: str) -> None:
    model, tok = llama_lm(), word_tokenizer("lm")
    ex = {"prompt": "w1 w2 w3 w4", "response": "w5 w6"}
    prompt = tok(ex["prompt"])["input_ids"]  # <s> w1 .. w4
    ids = prompt + tok(ex["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    labels = list(ids) if loss_on == "all" else [-100] * len(prompt) + ids[len(prompt) :]
    model.eval()
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss  # HF: mean over scored tokens
    got = _loss_of(model, CausalLMTask(tok, CausalLMConfig(loss_on=loss_on)), ex)
    torch.testing.assert_close(got, ref)


def test_diffusion_loss_is_mean_over_timesteps_of_seeded_mse() -> None:
    model, sched = unet_class(), scheduler()
    ex = diffusion_class_data(1, seed=9)[0]
    timesteps = (25, 525, 925)
    task = DiffusionTask(sched, DiffusionTaskConfig(timesteps=timesteps, seed=7))
    got = _loss_of(model, task, ex, "img-1")
    gen = torch.Generator().manual_seed(example_seed(7, "img-1"))
    noise = torch.randn((len(timesteps), 1, 8, 8), generator=gen)
    per_t = []
    with torch.no_grad():
        for j, t in enumerate(timesteps):
            a = sched.alphas_cumprod[t]
            noisy = a.sqrt() * ex["pixel_values"] + (1 - a).sqrt() * noise[j]
            pred = model(noisy[None], torch.tensor([t]), class_labels=torch.tensor([ex["class_label"]])).sample
            per_t.append(F.mse_loss(pred[0], noise[j]))
    torch.testing.assert_close(got, torch.stack(per_t).mean(), rtol=1e-5, atol=1e-7)


def test_diffusion_timestep_blocks_are_each_timesteps_share_of_the_gradient() -> None:
    """float64: block ``name@t<t>`` = (1/T) grad of the hand-written MSE at t; the blocks sum to the mean recipe."""
    model, sched = unet_class().double().eval(), scheduler()  # eval: no LoRA dropout in the hand-written loss
    ex = dict(diffusion_class_data(1, seed=9)[0], id="img-1")
    ex["pixel_values"] = ex["pixel_values"].double()
    timesteps = (25, 525, 925)
    split = collect_gradients(
        model,
        DiffusionTask(sched, DiffusionTaskConfig(timesteps=timesteps, seed=7)),
        [ex],
        dtype="float64",
        progress=False,
    )
    mean = collect_gradients(
        model,
        DiffusionTask(sched, DiffusionTaskConfig(timesteps=timesteps, seed=7, timestep_blocks=False)),
        [ex],
        dtype="float64",
        progress=False,
    ).to_dict()
    got = split.to_dict()
    blocks = find_lora_blocks(model)
    assert list(split.block_dims) == [f"{b.name}@t{t}" for b in blocks for t in timesteps]
    noise = torch.randn((len(timesteps), 1, 8, 8), generator=torch.Generator().manual_seed(example_seed(7, "img-1")))
    params = [b.parameter for b in blocks]
    for j, t in enumerate(timesteps):
        a = sched.alphas_cumprod[t].double()
        noisy = a.sqrt() * ex["pixel_values"] + (1 - a).sqrt() * noise[j].double()
        pred = model(noisy[None], torch.tensor([t]), class_labels=torch.tensor([ex["class_label"]])).sample
        grads = torch.autograd.grad(F.mse_loss(pred[0], noise[j].double()) / len(timesteps), params)
        for b, g in zip(blocks, grads):
            torch.testing.assert_close(got[f"{b.name}@t{t}"][0], g.reshape(-1), rtol=1e-9, atol=1e-12)
    for b in blocks:
        assert got[f"{b.name}@t25"].abs().max() > 0
        torch.testing.assert_close(sum(got[f"{b.name}@t{t}"] for t in timesteps), mean[b.name], rtol=1e-9, atol=1e-12)


def test_timestep_blocks_change_the_task_fingerprint() -> None:
    split, mean = (DiffusionTask(scheduler(), DiffusionTaskConfig(timestep_blocks=v)) for v in (True, False))
    assert split.row_labels() == ("t25", "t225", "t425", "t525", "t725", "t925") and mean.row_labels() == ()
    assert split.describe() != mean.describe()


def test_diffusion_noise_depends_on_id_and_seed_only() -> None:
    model = unet_cond()
    ex = diffusion_text_data(1)[0]
    task = DiffusionTask(scheduler(), DiffusionTaskConfig(timesteps=(100, 900)))
    a, b = _loss_of(model, task, ex, "a"), _loss_of(model, task, ex, "a")
    c = _loss_of(model, task, ex, "b")
    d = _loss_of(model, DiffusionTask(scheduler(), DiffusionTaskConfig(timesteps=(100, 900), seed=1)), ex, "a")
    assert a == b and a != c and a != d


# ----------------------------------------------------------------------------- batch invariance


def _row(store, ex_id: str) -> torch.Tensor:
    grads = store.to_dict()
    i = store.ids.index(ex_id)
    return torch.cat([g[i].double() for g in grads.values()])


def _assert_batch_invariant(model, task, probe, make_others, *, batch_sizes=(1, 7, 32)) -> None:
    rows = []
    for size in batch_sizes:
        data = [probe] + make_others(size - 1)
        store = collect_gradients(model, task, data[::-1], batch_size=size, progress=False)  # probe last in its batch
        rows.append(_row(store, probe["id"]))
    assert rows[0].norm() > 0
    for other in rows[1:]:
        assert float((other - rows[0]).norm() / rows[0].norm()) <= 1e-5


def test_classification_is_batch_invariant() -> None:
    probe = {"id": "probe", "text": "w3 w9 w27", "label": 1}

    def others(n: int) -> list[dict]:
        data = classification_data(n, seed=n, low=4, high=30)  # longer: the probe gets padded
        return [dict(d, id=f"o{i}") for i, d in enumerate(data)]

    _assert_batch_invariant(bert_classifier(), SequenceClassificationTask(word_tokenizer()), probe, others)


def test_causal_lm_is_batch_invariant() -> None:
    probe = {"id": "probe", "prompt": "w1 w2", "response": "w3 w4 w5"}

    def others(n: int) -> list[dict]:
        return [dict(d, id=f"o{i}") for i, d in enumerate(lm_data(n, seed=n, low=3, high=20))]

    _assert_batch_invariant(llama_lm(), CausalLMTask(word_tokenizer("lm")), probe, others)


def test_diffusion_is_batch_invariant() -> None:
    probe = dict(diffusion_text_data(1, seed=5)[0], id="probe")

    def others(n: int) -> list[dict]:
        return diffusion_text_data(n, seed=n)

    task = DiffusionTask(scheduler(), DiffusionTaskConfig(timesteps=(225, 725)))
    _assert_batch_invariant(unet_cond(with_conv=False), task, probe, others, batch_sizes=(1, 7))


# ----------------------------------------------------------------------------- bad input


def test_empty_dataset() -> None:
    with pytest.raises(EmptyInputError, match="empty"):
        collect_gradients(bert_classifier(), SequenceClassificationTask(word_tokenizer()), [], progress=False)


def test_duplicate_ids() -> None:
    data = [{"id": "a", "text": "w1", "label": 0}, {"id": "a", "text": "w2", "label": 1}]
    with pytest.raises(TaskInputError, match="unique.*'a'"):
        collect_gradients(bert_classifier(), SequenceClassificationTask(word_tokenizer()), data, progress=False)


def test_labels_out_of_range_are_all_named_before_computing() -> None:
    data = classification_data(6)
    data[1]["label"] = 3
    data[4]["label"] = -1
    data[5]["label"] = "positive"
    task = SequenceClassificationTask(word_tokenizer())
    with pytest.raises(TaskInputError) as info:
        collect_gradients(bert_classifier(), task, data, batch_size=2, progress=False)
    message = str(info.value)
    assert "3 example(s)" in message
    for i in (1, 4, 5):
        assert repr(data[i]["id"]) in message
    assert "out of range [0, 3)" in message


def test_truncation_is_counted_and_reported(caplog: pytest.LogCaptureFixture) -> None:
    data = classification_data(10, low=2, high=5)
    long_ids = [data[2]["id"], data[7]["id"]]
    data[2]["text"] = " ".join(["w1"] * 100)  # longer than the model's 64 positions
    data[7]["text"] = " ".join(["w2"] * 70)
    model = bert_classifier()
    with caplog.at_level(logging.WARNING, logger="datainf"):
        store = collect_gradients(model, SequenceClassificationTask(word_tokenizer()), data, progress=False)
    warnings = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
    assert len(warnings) == 1
    assert "2 of 10 examples" in warnings[0] and "(64 tokens)" in warnings[0]
    assert all(repr(i) in warnings[0] for i in long_ids)
    # the truncated example's gradient is that of its first 64 tokens ([SEP] kept)
    short = dict(data[2], text=" ".join(["w1"] * 62))
    ref = collect_gradients(model, SequenceClassificationTask(word_tokenizer()), [short], progress=False)
    torch.testing.assert_close(_row(store, long_ids[0]), _row(ref, long_ids[0]), rtol=1e-5, atol=1e-8)


def test_causal_lm_truncation_and_empty_responses() -> None:
    tok = word_tokenizer("lm")
    task = CausalLMTask(tok, CausalLMConfig(max_length=8))
    data = [
        {"id": "ok", "prompt": "w1", "response": "w2 w3"},
        {"id": "empty", "prompt": "w1 w2", "response": ""},
        {"id": "prompt-fills-limit", "prompt": " ".join(["w4"] * 9), "response": "w5"},
        {"id": "cut", "prompt": "w1 w2", "response": " ".join(["w6"] * 10)},
    ]
    with pytest.raises(TaskInputError) as info:
        collect_gradients(llama_lm(), task, data, progress=False)
    assert "'empty'" in str(info.value) and "'prompt-fills-limit'" in str(info.value)
    assert "'ok'" not in str(info.value) and "'cut'" not in str(info.value)
    batch = task.collate([data[0], data[3]], ["ok", "cut"])
    assert batch.truncated_ids == ["cut"] and batch.inputs["input_ids"].shape == (2, 8)


def test_non_finite_loss_names_the_examples() -> None:
    model = bert_classifier()
    with torch.no_grad():
        model.base_model.model.bert.embeddings.word_embeddings.weight[6 + 7] = float("nan")  # the word "w7"
    data = [
        {"id": "fine-1", "text": "w1 w2", "label": 0},
        {"id": "bad-1", "text": "w3 w7", "label": 1},
        {"id": "fine-2", "text": "w4", "label": 2},
        {"id": "bad-2", "text": "w7", "label": 0},
    ]
    with pytest.raises(NonFiniteGradientError) as info:
        collect_gradients(model, SequenceClassificationTask(word_tokenizer()), data, batch_size=4, progress=False)
    assert "'bad-1'" in str(info.value) and "'bad-2'" in str(info.value) and "'fine-" not in str(info.value)


def test_diffusion_bad_input() -> None:
    with pytest.raises(ConfigError, match="outside the scheduler's range"):
        DiffusionTask(scheduler(), DiffusionTaskConfig(timesteps=(10, 1000)))
    with pytest.raises(ConfigError, match="distinct"):
        DiffusionTaskConfig(timesteps=(10, 10))
    data = diffusion_class_data(3)
    data[1]["class_label"] = 12
    with pytest.raises(TaskInputError, match=f"'{data[1]['id']}'.*out of range"):
        collect_gradients(unet_class(), DiffusionTask(scheduler()), data, progress=False)


# ----------------------------------------------------------------------------- a user-written task


class _Regressor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(3, 8)
        self.head = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.hidden(x))).squeeze(-1)


class SquaredErrorTask(GradientTask):
    """l_i = (f(x_i) - y_i)^2 (a per-example loss, no reduction over the batch)."""

    def collate(self, examples, ids) -> TaskBatch:
        x = torch.tensor([ex["x"] for ex in examples], dtype=torch.float32)
        y = torch.tensor([ex["y"] for ex in examples], dtype=torch.float32)
        return TaskBatch(ids=list(ids), inputs={"x": x, "y": y})

    def per_example_loss(self, model, batch) -> torch.Tensor:
        return (model(batch.inputs["x"]) - batch.inputs["y"]) ** 2


def test_user_written_task() -> None:
    torch.manual_seed(0)
    model = get_peft_model(
        _Regressor(), LoraConfig(r=2, target_modules=["hidden"], modules_to_save=["head"], init_lora_weights=False)
    )
    gen = torch.Generator().manual_seed(0)
    data = [{"x": torch.randn(3, generator=gen).tolist(), "y": float(i)} for i in range(9)]
    report = check_per_example_gradients(model, SquaredErrorTask(), data)
    assert report.ok and len(report.errors) == 4  # lora_A, lora_B, head.weight, head.bias
    store = collect_gradients(model, SquaredErrorTask(), data, batch_size=4, progress=False)
    assert store.ids == [str(i) for i in range(9)] and store.fingerprint["task"].startswith("SquaredErrorTask")


def test_text_pairs_and_string_labels() -> None:
    model = bert_classifier()
    model.base_model.model.config.label2id = {"neg": 0, "neu": 1, "pos": 2}
    gen = torch.Generator().manual_seed(4)
    data = [
        {"a": random_text(gen, 1, 6), "b": random_text(gen, 1, 6), "y": ["neg", "neu", "pos"][i % 3]} for i in range(5)
    ]
    task = SequenceClassificationTask(
        word_tokenizer(), SequenceClassificationConfig(text_field="a", text_pair_field="b", label_field="y")
    )
    report = check_per_example_gradients(model, task, data)
    assert report.ok
    batch = task.collate(data[:2], ["0", "1"])
    assert "token_type_ids" in batch.inputs and batch.inputs["token_type_ids"].max() == 1


class _SqrtTask(SquaredErrorTask):
    """l_i = sqrt(w_i (f(x_i) - y_i)^2): finite everywhere, but its gradient is NaN where w_i = 0."""

    def collate(self, examples, ids) -> TaskBatch:
        batch = super().collate(examples, ids)
        batch.inputs["w"] = torch.tensor([ex["w"] for ex in examples], dtype=torch.float32)
        return batch

    def per_example_loss(self, model, batch) -> torch.Tensor:
        return torch.sqrt(super().per_example_loss(model, batch) * batch.inputs["w"])


def test_non_finite_gradient_with_finite_loss_names_the_examples() -> None:
    torch.manual_seed(0)
    model = get_peft_model(_Regressor(), LoraConfig(r=2, target_modules=["hidden"], init_lora_weights=False))
    data = [{"id": f"e{i}", "x": [0.1 * i, 1.0, -1.0], "y": 5.0, "w": 0.0 if i in (1, 3) else 1.0} for i in range(5)]
    with pytest.raises(NonFiniteGradientError, match="losses were finite") as info:
        collect_gradients(model, _SqrtTask(), data, batch_size=5, progress=False)
    assert "'e1'" in str(info.value) and "'e3'" in str(info.value) and "'e0'" not in str(info.value)


# ----------------------------------------------------------------------------- store fingerprints are stable

# Recorded at 48755a2 (before the tasks moved from datainf/gradients/tasks.py into datainf/tasks/): a
# store written then must still be reused, so neither the model part nor the task part may change.
_SCHED = (
    'DDPMScheduler{"beta_end": 0.02, "beta_schedule": "linear", "beta_start": 0.0001, "num_train_timesteps": 1000, '
    '"prediction_type": "epsilon"}'
)
RECORDED_FINGERPRINTS = {
    "cls": {
        "model": "a61da70a3994f5a2",
        "task": 'SequenceClassificationTask{"label_field": "label", "max_length": 32, "pad_token_id": null, '
        '"text_field": "text", "text_pair_field": "pair"}|tokenizer=|num_labels=3',
        "adapter": "default",
    },
    "cls_default": {
        "model": "a61da70a3994f5a2",
        "task": 'SequenceClassificationTask{"label_field": "label", "max_length": null, "pad_token_id": null, '
        '"text_field": "text", "text_pair_field": null}|tokenizer=None|num_labels=None',
        "adapter": "default",
    },
    "lm": {
        "model": "4a0f4a8ab1dc1cbe",
        "task": 'CausalLMTask{"append_eos": true, "loss_on": "all", "max_length": 48, "pad_token_id": null, '
        '"prompt_field": "prompt", "response_field": "response"}|tokenizer=',
        "adapter": "default",
    },
    "diff_text": {
        "model": "a0c7e3fc33461c99",
        "task": 'DiffusionTask{"class_field": "class_label", "image_field": "pixel_values", "prompt_field": "prompt", '
        '"prompt_max_length": 8, "seed": 0, "timestep_blocks": true, "timesteps": [25, 525]}'
        f"|scheduler={_SCHED}|vae=False|text_encoder=CLIPTextModel",
        "adapter": "default",
    },
    "diff_class": {
        "model": "20589425009d05d0",
        "task": 'DiffusionTask{"class_field": "class_label", "image_field": "pixel_values", "prompt_field": "prompt", '
        '"prompt_max_length": null, "seed": 3, "timestep_blocks": false, "timesteps": [25, 225, 425, 525, 725, 925]}'
        f"|scheduler={_SCHED}|vae=False|text_encoder=None",
        "adapter": "default",
    },
}


def _fixed_weights(model: nn.Module) -> nn.Module:
    """Overwrite every parameter with a fixed ramp, so the fingerprint does not depend on torch's RNG."""
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            ramp = torch.linspace(-1, 1, p.numel(), dtype=torch.float64).reshape(p.shape)
            p.copy_(ramp.to(p.dtype) * (i % 7 + 1) / 7)
    return model


def _fingerprint_case(name: str) -> tuple[nn.Module, GradientTask]:
    from gradient_fixtures import text_encoder

    if name == "cls":
        cfg = SequenceClassificationConfig(max_length=32, text_pair_field="pair")
        return bert_classifier(), SequenceClassificationTask(word_tokenizer(), cfg, num_labels=3)
    if name == "cls_default":
        return bert_classifier(), SequenceClassificationTask()
    if name == "lm":
        return llama_lm(), CausalLMTask(word_tokenizer("lm"), CausalLMConfig(max_length=48, loss_on="all"))
    if name == "diff_text":
        cfg = DiffusionTaskConfig(timesteps=(25, 525), prompt_max_length=8)
        return unet_cond(), DiffusionTask(scheduler(), cfg, text_encoder=text_encoder(), tokenizer=word_tokenizer("lm"))
    return unet_class(), DiffusionTask(scheduler(), DiffusionTaskConfig(timestep_blocks=False, seed=3))


@pytest.mark.parametrize("name", sorted(RECORDED_FINGERPRINTS))
def test_store_fingerprint_matches_the_one_recorded_before_the_split(name: str) -> None:
    from datainf.gradients import gradient_fingerprint

    model, task = _fingerprint_case(name)
    _fixed_weights(model)
    assert gradient_fingerprint(model, task, find_lora_blocks(model)) == RECORDED_FINGERPRINTS[name]


def test_the_old_import_paths_still_work() -> None:
    import datainf.gradients as gradients
    import datainf.gradients.tasks as old
    import datainf.tasks as tasks

    for name in old.__all__:
        assert getattr(old, name) is getattr(tasks, name), name
    for name in ("GradientTask", "TaskBatch", "SequenceClassificationTask", "CausalLMTask", "DiffusionTask"):
        assert getattr(gradients, name) is getattr(tasks, name), name
    assert SequenceClassificationTask.__module__ == "datainf.tasks.classification"
    assert (
        CausalLMTask.__module__ == "datainf.tasks.causal_lm" and DiffusionTask.__module__ == "datainf.tasks.diffusion"
    )

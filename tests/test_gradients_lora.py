"""LoRA discovery and validation: block names, roles, every problem reported at once, mode restore."""

from __future__ import annotations

import logging

import pytest
import torch
from gradient_fixtures import bert_classifier, classification_data, unet_cond, word_tokenizer
from peft import LoraConfig, get_peft_model
from torch import nn

from datainf.errors import LoRAValidationError
from datainf.gradients import SequenceClassificationTask, collect_gradients, find_lora_blocks, gradient_mode


def test_blocks_are_named_parameters_one_per_tensor() -> None:
    model = bert_classifier()
    blocks = find_lora_blocks(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert blocks.names == trainable  # same names, same order as named_parameters()
    assert blocks.adapter_name == "default"
    roles = {b.name: b.role for b in blocks}
    prefix = "base_model.model.bert.encoder.layer.0.attention.self.query"
    assert roles[f"{prefix}.lora_A.default.weight"] == "lora_A"
    assert roles[f"{prefix}.lora_B.default.weight"] == "lora_B"
    assert roles["base_model.model.classifier.modules_to_save.default.weight"] == "modules_to_save"
    assert roles["base_model.model.classifier.modules_to_save.default.bias"] == "modules_to_save"
    assert len(blocks) == 2 * 2 * 2 + 2  # 2 layers x (query, value) x (A, B) + head weight + bias
    assert blocks.block_dims[f"{prefix}.lora_A.default.weight"] == 4 * 32
    assert all(b.hooked for b in blocks)


def test_unet_blocks_include_1x1_convs() -> None:
    blocks = find_lora_blocks(unet_cond())
    convs = [b for b in blocks if isinstance(b.module, nn.Conv2d)]
    assert convs and all(b.module.kernel_size == (1, 1) for b in convs)
    assert any(".to_out.0.lora_B.default.weight" in b.name for b in blocks)


def test_inference_mode_adapter_is_differentiated_and_flags_restored() -> None:
    model = bert_classifier()
    model.requires_grad_(False)  # as after PeftModel.from_pretrained(..., is_trainable=False)
    blocks = find_lora_blocks(model)
    assert len(blocks) == 10
    store = collect_gradients(
        model, SequenceClassificationTask(word_tokenizer()), classification_data(3), progress=False
    )
    assert all(not p.requires_grad for p in model.parameters())
    assert any(store.to_dict()[n].abs().sum() > 0 for n in blocks.names)


def test_no_lora_module() -> None:
    from transformers import BertConfig, BertForSequenceClassification

    model = BertForSequenceClassification(
        BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    )
    with pytest.raises(LoRAValidationError, match="No LoRA layer found"):
        find_lora_blocks(model)


def test_merged_adapter_is_refused() -> None:
    model = bert_classifier()
    model.merge_adapter()
    with pytest.raises(LoRAValidationError, match="merged") as info:
        find_lora_blocks(model)
    assert "unmerge_adapter" in str(info.value)
    assert "4 problems" in str(info.value)  # one per merged layer, all reported


def test_every_problem_is_reported_at_once() -> None:
    """DoRA on the attention and LoRA on the word embeddings: both refused in one error."""
    model = bert_classifier(target_modules=["query", "word_embeddings"], use_dora=True, modules_to_save=None)
    with pytest.raises(LoRAValidationError) as info:
        find_lora_blocks(model)
    message = str(info.value)
    assert "DoRA" in message and "embedding" in message
    assert "layer.0.attention.self.query" in message and "layer.1.attention.self.query" in message


def test_several_active_adapters_need_a_choice() -> None:
    model = bert_classifier(modules_to_save=None, task_type=None)
    model.add_adapter("other", LoraConfig(r=2, target_modules=["query"], init_lora_weights=False))
    model.base_model.set_adapter(["default", "other"])
    with pytest.raises(LoRAValidationError, match="Several LoRA adapters are active"):
        find_lora_blocks(model)
    blocks = find_lora_blocks(model, adapter_name="other")
    assert blocks.adapter_name == "other"
    assert blocks.names and all(".other." in n for n in blocks.names)
    with pytest.raises(LoRAValidationError, match="does not exist"):
        find_lora_blocks(model, adapter_name="missing")


def test_inactive_adapter_choice_is_refused() -> None:
    model = bert_classifier(modules_to_save=None)
    model.add_adapter("other", LoraConfig(r=2, target_modules=["query"]))
    with pytest.raises(LoRAValidationError, match="not active"):
        find_lora_blocks(model, adapter_name="other")


def test_conv_lora_with_groups_is_refused() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, groups=2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x)

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(Net(), LoraConfig(r=2, target_modules=["conv"]))
    with pytest.raises(LoRAValidationError, match="groups=2"):
        find_lora_blocks(model)


def test_gradient_mode_turns_dropout_off_logs_and_restores(caplog: pytest.LogCaptureFixture) -> None:
    model = bert_classifier()
    model.train()
    model.base_model.model.classifier.eval()  # a mixed state must come back exactly
    before = {n: m.training for n, m in model.named_modules()}
    blocks = find_lora_blocks(model)
    with (
        caplog.at_level(logging.INFO, logger="datainf"),
        pytest.raises(RuntimeError, match="boom"),
        gradient_mode(model, blocks),
    ):
        assert not any(m.training for m in model.modules())
        raise RuntimeError("boom")
    assert {n: m.training for n, m in model.named_modules()} == before
    assert any("eval mode" in r.getMessage() and "restored afterwards" in r.getMessage() for r in caplog.records)


def test_problems_are_listed_layer_by_layer_in_model_order() -> None:
    """A grouped conv, a merged linear and embedding LoRA: one message, one line per layer, in module order."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(4, 4, 3, groups=2)
            self.b = nn.Linear(4, 4)
            self.c = nn.Embedding(10, 4)

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(Net(), LoraConfig(r=2, target_modules=["a", "b", "c"]))
    model.base_model.model.b.merge()
    with pytest.raises(LoRAValidationError) as info:
        find_lora_blocks(model)
    assert str(info.value) == (
        "The model's LoRA adapters cannot be used for per-example gradients (3 problems):"
        "\n  - base_model.model.a (Conv2d): lora_B is a Conv2d(groups=2, padding=(0, 0), padding_mode='zeros'); "
        "per-example gradients support nn.Linear and nn.Conv2d (groups=1, numeric zero padding). Remove this layer "
        "from target_modules."
        "\n  - base_model.model.b (Linear): adapter 'default' is merged into the base weights, so its tensors receive "
        "no gradient. Call model.unmerge_adapter() (PeftModel) or layer.unmerge() before collecting gradients."
        "\n  - base_model.model.c (Embedding): LoRA on this layer type computes its update without a lora_A/lora_B "
        "module to hook (embedding LoRA, nn.MultiheadAttention, target_parameters). Remove it from target_modules."
    )


def test_is_hookable_stays_importable_from_lora() -> None:
    from datainf.gradients import lora, modules

    assert lora.is_hookable is modules.is_hookable

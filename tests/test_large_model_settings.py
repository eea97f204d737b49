"""Large-model settings kept on: non-reentrant gradient checkpointing, bfloat16 / float16 bases, 4/8-bit bases."""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

import pytest
import torch
from gradient_fixtures import lm_data, tiny_llama_config, word_tokenizer
from peft import LoraConfig, get_peft_model
from torch import nn

from datainf.gradients import CausalLMTask, collect_gradients, find_lora_blocks
from datainf.testing import check_per_example_gradients


def _llama(dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_llama_config(num_hidden_layers=3)
    base = LlamaForCausalLM(cfg).to(dtype)
    lora = LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.3, init_lora_weights=False, task_type="CAUSAL_LM"
    )
    return get_peft_model(base, lora)


def _grads(model: nn.Module, data: list[dict[str, Any]], dtype: str = "float32") -> dict[str, torch.Tensor]:
    task = CausalLMTask(word_tokenizer("lm"))
    return collect_gradients(model, task, data, batch_size=4, dtype=dtype, progress=False).to_dict()


def _count_calls(module: nn.Module) -> list[int]:
    calls = [0]

    def hook(*_: Any) -> None:
        calls[0] += 1

    module.register_forward_hook(hook)
    return calls


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_checkpointing_gives_the_same_gradients(reentrant: bool, caplog: pytest.LogCaptureFixture) -> None:
    data = lm_data(4, seed=7, high=8)
    plain_model = _llama().double()
    plain = _grads(plain_model, data, "float64")
    model = _llama().double()
    model.train()  # as a Trainer leaves it: dropout must still be off while gradients are taken
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    q = model.base_model.model.model.layers[1].self_attn.q_proj.base_layer
    calls = _count_calls(q)
    modes = {n: m.training for n, m in model.named_modules()}
    with caplog.at_level(logging.INFO, logger="datainf.gradients.lora"):
        checkpointed = _grads(model, data, "float64")
    # non-reentrant: kept on, so the layer ran twice (forward + recomputation); reentrant: turned off, once
    assert calls[0] == (1 if reentrant else 2)
    assert ("Turning reentrant gradient checkpointing off" in caplog.text) is reentrant
    assert ("Keeping non-reentrant gradient checkpointing on" in caplog.text) is not reentrant
    assert set(plain) == set(checkpointed)
    for name, g in plain.items():
        assert g.abs().sum() > 0
        torch.testing.assert_close(checkpointed[name], g, rtol=1e-10, atol=1e-13)
    assert {n: m.training for n, m in model.named_modules()} == modes  # train/eval flags restored
    assert model.base_model.model.model.layers[0].gradient_checkpointing is True


def test_non_reentrant_checkpointing_hooks_match_the_loop() -> None:
    model = _llama().double()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    report = check_per_example_gradients(model, CausalLMTask(word_tokenizer("lm")), lm_data(3, seed=2), rtol=1e-10)
    assert report.ok


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_half_precision_base_accumulates_in_float32(half: torch.dtype) -> None:
    data = lm_data(4, seed=3, high=8)
    full = _llama(torch.float32)
    model = _llama(half)  # peft keeps the adapter in float32 on a half base (autocast_adapter_dtype)
    model.load_state_dict(full.state_dict())  # the same weights, the base rounded to half precision
    blocks = find_lora_blocks(model)
    assert {b.parameter.dtype for b in blocks} == {torch.float32}
    assert model.base_model.model.model.layers[0].mlp.up_proj.base_layer.weight.dtype == half
    half_grads = _grads(model, data)
    ref = _grads(full, data)
    worst = 0.0
    for name, g in half_grads.items():
        assert g.dtype == torch.float32
        rel = float((g - ref[name]).norm() / ref[name].norm())
        worst = max(worst, rel)
        assert rel < 0.05, (name, rel)  # half-precision rounding of the base, not a wrong formula
    # hooks vs the per-example loop on the same half-precision model
    report = check_per_example_gradients(
        model, CausalLMTask(word_tokenizer("lm")), data[:3], rtol=0.1, raise_on_mismatch=False
    )
    assert report.ok


@pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None,
    reason="bitsandbytes is not installed (a dev extra; it runs on CPU from 0.50)",
)
@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_base_qlora(bits: int, tmp_path: Any) -> None:
    """QLoRA: LoRA on a 4-bit / 8-bit bitsandbytes base; lora_A / lora_B stay plain nn.Linear, so the
    hooks match the per-example loop (bitsandbytes 0.50.2 on CPU: max error ~1e-6)."""
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = tiny_llama_config(hidden_size=64, intermediate_size=128)
    LlamaForCausalLM(cfg).save_pretrained(str(tmp_path))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    quant = (
        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
        if bits == 4
        else BitsAndBytesConfig(load_in_8bit=True)
    )
    base = LlamaForCausalLM.from_pretrained(str(tmp_path), quantization_config=quant, device_map={"": device})
    model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM")
    )
    blocks = find_lora_blocks(model)
    assert len(blocks) == 28 and all(b.hooked for b in blocks)
    report = check_per_example_gradients(
        model, CausalLMTask(word_tokenizer("lm")), lm_data(3, seed=1), rtol=2e-2, device=device
    )
    assert report.ok and report.max_error < 1e-3

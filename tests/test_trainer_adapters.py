"""Adapters as TRL / HF Trainer runs write them: output_dir and checkpoint-N, rsLoRA, rank_pattern,
all-linear targets, modules_to_save; refusals for what cannot be hooked; an adapter on another base."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from gradient_fixtures import lm_data, tiny_llama_config, word_tokenizer
from peft import IA3Config, LoraConfig, PromptTuningConfig, get_peft_model
from torch import nn

from datainf.errors import DataInfError
from datainf.gradients import CausalLMTask, collect_gradients, find_lora_blocks
from datainf.models import AdapterMismatchError, ModelLoadError, load_model, resolve_adapter_dir
from datainf.testing import check_per_example_gradients


def _llama(hidden: int = 32, seed: int = 0) -> nn.Module:
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_llama_config(hidden_size=hidden, intermediate_size=2 * hidden)
    return LlamaForCausalLM(cfg)


def _lora(**kw: object) -> LoraConfig:
    kw.setdefault("init_lora_weights", False)  # random lora_B: every block gets a non-zero gradient
    kw.setdefault("task_type", "CAUSAL_LM")
    return LoraConfig(**kw)  # type: ignore[arg-type]


RANKED = dict(
    r=4,
    lora_alpha=16,
    target_modules="all-linear",
    use_rslora=True,
    rank_pattern={"q_proj": 2, "down_proj": 6},
    alpha_pattern={"v_proj": 3},
    modules_to_save=["lm_head"],
)


def test_rslora_rank_pattern_all_linear_match_the_float64_loop() -> None:
    model = get_peft_model(_llama(), _lora(**RANKED)).double()
    layer = model.base_model.model.model.layers[0]
    q, v, down, up = layer.self_attn.q_proj, layer.self_attn.v_proj, layer.mlp.down_proj, layer.mlp.up_proj
    # rsLoRA scaling alpha / sqrt(r), per module rank and alpha
    assert q.r["default"] == 2 and down.r["default"] == 6 and up.r["default"] == 4
    assert q.scaling["default"] == pytest.approx(16 / 2**0.5)
    assert v.scaling["default"] == pytest.approx(3 / 4**0.5)
    assert up.scaling["default"] == pytest.approx(16 / 4**0.5)
    blocks = find_lora_blocks(model)
    roles = {b.role for b in blocks}
    assert roles == {"lora_A", "lora_B", "modules_to_save"}
    shapes = {b.name: b.shape for b in blocks}
    assert shapes["base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"] == (2, 32)
    assert shapes["base_model.model.model.layers.0.mlp.down_proj.lora_B.default.weight"] == (32, 6)
    assert all(b.hooked for b in blocks)  # lm_head copy is an nn.Linear: hooked as a dense block
    report = check_per_example_gradients(
        model, CausalLMTask(word_tokenizer("lm")), lm_data(3, seed=1, high=6), rtol=1e-10
    )
    assert report.ok and len(report.errors) == len(blocks)


def test_scaling_enters_the_gradients() -> None:
    # rsLoRA multiplies the update by alpha/sqrt(r) instead of alpha/r. With lora_B divided by that ratio the
    # forward pass is the same, so lora_A's gradient (s * B^T ...) is unchanged and lora_B's (s * ... (A x)^T)
    # grows by the ratio: the hooks must see each adapter's own scaling.
    ratio = (8 / 4**0.5) / (8 / 4)
    name = "base_model.model.model.layers.0.self_attn.q_proj.lora_{}.default.weight"
    grads = {}
    for rs in (False, True):
        model = get_peft_model(_llama(), _lora(r=4, lora_alpha=8, target_modules=["q_proj"], use_rslora=rs)).double()
        torch.manual_seed(3)
        for pname, p in model.named_parameters():
            if "lora_" in pname:
                p.data = torch.randn_like(p) / (ratio if rs and "lora_B" in pname else 1.0)
        store = collect_gradients(
            model,
            CausalLMTask(word_tokenizer("lm")),
            lm_data(3, seed=2, high=6),
            batch_size=3,
            dtype="float64",
            progress=False,
        )
        grads[rs] = store.to_dict()
    torch.testing.assert_close(grads[True][name.format("A")], grads[False][name.format("A")], rtol=1e-9, atol=0)
    torch.testing.assert_close(grads[True][name.format("B")], grads[False][name.format("B")] * ratio, rtol=1e-9, atol=0)
    assert grads[True][name.format("B")].abs().max() > 0


def test_modules_to_save_too_large_is_warned(caplog: pytest.LogCaptureFixture) -> None:
    model = get_peft_model(_llama(), _lora(r=2, lora_alpha=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    with caplog.at_level(logging.WARNING, logger="datainf.gradients.lora"):
        find_lora_blocks(model)
    assert "modules_to_save" in caplog.text and "lm_head" in caplog.text


# ---------------------------------------------------------------------------------------------- folders


def _save_base(path: Path, hidden: int = 32, seed: int = 0) -> Path:
    _llama(hidden, seed).save_pretrained(str(path))
    word_tokenizer("lm").save_pretrained(str(path))
    return path


def _save_adapter(base: Path, out: Path, seed: int = 1, **kw: object) -> Path:
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base)), _lora(**kw))  # type: ignore[arg-type]
    torch.manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = torch.randn_like(p) * 0.1
    model.save_pretrained(str(out))
    return out


def test_trainer_output_dir_picks_final_best_or_newest(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    base = _save_base(tmp_path / "base")
    out = tmp_path / "run"
    kw = dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    _save_adapter(base, out / "checkpoint-2", seed=1, **kw)
    _save_adapter(base, out / "checkpoint-10", seed=2, **kw)
    (out / "runs").mkdir()  # tensorboard logs and other entries are ignored
    with caplog.at_level(logging.INFO, logger="datainf.models"):
        assert resolve_adapter_dir(out) == out / "checkpoint-10"  # newest by step, not by name
    assert "using checkpoint-10, the newest" in caplog.text
    state = {"best_model_checkpoint": str(out / "checkpoint-2"), "global_step": 10}
    (out / "checkpoint-10" / "trainer_state.json").write_text(json.dumps(state))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="datainf.models"):
        assert resolve_adapter_dir(out) == out / "checkpoint-2"
    assert "best one recorded in trainer_state.json" in caplog.text
    assert resolve_adapter_dir(out / "checkpoint-10") == out / "checkpoint-10"
    _save_adapter(base, out, seed=3, **kw)  # trainer.save_model(): the final adapter at the top
    assert resolve_adapter_dir(out) == out
    model, _ = load_model(base, kind="causal-lm", adapter=out / "checkpoint-2")
    assert len(find_lora_blocks(model)) == 8


def test_refusals_dora_ia3_prompt_tuning_merged(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    base = _save_base(tmp_path / "base")
    dora = _save_adapter(base, tmp_path / "dora", r=2, lora_alpha=4, target_modules=["q_proj"], use_dora=True)
    with pytest.raises(ModelLoadError, match="DoRA adapter"):
        load_model(base, kind="causal-lm", adapter=dora)
    ia3 = tmp_path / "ia3"
    get_peft_model(
        AutoModelForCausalLM.from_pretrained(str(base)),
        IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"], task_type="CAUSAL_LM"),
    ).save_pretrained(str(ia3))
    with pytest.raises(ModelLoadError, match="IA3 trains scaling vectors"):
        load_model(base, kind="causal-lm", adapter=ia3)
    prompt = tmp_path / "prompt"
    get_peft_model(
        AutoModelForCausalLM.from_pretrained(str(base)), PromptTuningConfig(num_virtual_tokens=2, task_type="CAUSAL_LM")
    ).save_pretrained(str(prompt))
    with pytest.raises(ModelLoadError, match="prompt tuning trains virtual token embeddings"):
        load_model(base, kind="causal-lm", adapter=prompt)
    lora = _save_adapter(base, tmp_path / "lora", r=2, lora_alpha=4, target_modules=["q_proj"])
    merged_dir = tmp_path / "merged"
    model, _ = load_model(base, kind="causal-lm", adapter=lora)
    model.merge_and_unload().save_pretrained(str(merged_dir))  # type: ignore[operator]
    with pytest.raises(ModelLoadError, match="merged adapter"):
        load_model(base, kind="causal-lm", adapter=merged_dir)


def test_adapter_on_another_base_is_one_clear_error(tmp_path: Path) -> None:
    base = _save_base(tmp_path / "base", hidden=32)
    other = _save_base(tmp_path / "other", hidden=16)
    adapter = _save_adapter(base, tmp_path / "adapter", r=2, lora_alpha=4, target_modules="all-linear")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "meta-llama/Llama-3.2-1B"  # a hub id, as a real TRL run records
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterMismatchError) as err:
        load_model(other, kind="causal-lm", adapter=adapter)
    text = str(err.value)
    assert "weight shapes differ" in text and "meta-llama/Llama-3.2-1B" in text and str(other) in text
    assert isinstance(err.value, DataInfError)

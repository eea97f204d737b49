"""``datainf plan``: block counts and store bytes against a real store, the Llama-2-13B plan from its public
config values (``tests/data/llama-2-13b/config.json``), and the refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from gradient_fixtures import llama_lm, lm_data, word_tokenizer

import datainf.store
from datainf.cli import main
from datainf.errors import ConfigError, DiskFullError, LoRAValidationError
from datainf.gradients import CausalLMTask, collect_gradients
from datainf.plan import PlanSettings, make_plan

DATA = Path(__file__).parent / "data"


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@pytest.mark.parametrize("mode", ["store", "projected"])
def test_store_bytes_match_a_collected_store(tmp_path: Path, mode: str) -> None:
    model = llama_lm()
    model.base_model.model.config.save_pretrained(tmp_path / "base")  # config.json only: no weights
    projection = None
    kwargs = {}
    if mode == "projected":
        from datainf.gradients.projection import ProjectionConfig

        projection = ProjectionConfig(dim=32, seed=0)
        kwargs = {"project_dim": 32}
    settings = PlanSettings(
        model=str(tmp_path / "base"),
        n=40,
        seq_len=16,
        mode=mode,
        r=4,
        target_modules=("q_proj", "v_proj"),
        shard_size=16,
        test_examples=3,
        **kwargs,
    )
    plan = make_plan(settings)
    store = collect_gradients(
        model,
        CausalLMTask(word_tokenizer("lm")),
        lm_data(40),
        store=tmp_path / "g",
        shard_size=16,
        projection=projection,
        progress=False,
    )
    assert plan.blocks == len(store.block_dims) and plan.stored_per_example == sum(store.block_dims.values())
    assert plan.numbers_per_example == sum(p.numel() for p in model.parameters() if p.requires_grad)
    measured = _folder_bytes(tmp_path / "g")
    assert abs(plan.store_bytes / measured - 1) < 0.05, (plan.store_bytes, measured)
    assert plan.seconds_per_example is None  # no weights in the folder: nothing measured
    assert "not measured" not in plan.format()


def test_llama_2_13b_plan_from_its_public_config() -> None:
    """hidden 5120, 40 layers, intermediate 13824, vocab 32000; LoRA r=8 on q_proj / v_proj (README's numbers)."""
    settings = PlanSettings(
        model=str(DATA / "llama-2-13b"),
        n=100_000,
        seq_len=16,
        r=8,
        target_modules=("q_proj", "v_proj"),
        model_dtype="bfloat16",
        batch_size=1,
    )
    plan = make_plan(settings)
    assert plan.blocks == 160 and plan.numbers_per_example == 40 * 2 * (8 * 5120 + 5120 * 8) == 6_553_600
    assert plan.largest_block[1] == 40_960
    assert plan.store_bytes > 100_000 * 6_553_600 * 4  # 2.6 TB: the arithmetic, plus the norms
    assert 12e9 < plan.parameters < 13.1e9 and plan.weights_bytes == plan.parameters * 2
    projected = make_plan(PlanSettings(**{**settings.__dict__, "mode": "projected", "project_dim": 1024}))
    assert projected.stored_per_example == 160 * 1024  # each LoRA block: 8 x 128
    assert plan.store_bytes / projected.store_bytes > 39
    assert "D = sum_l d_l = 6,553,600" in plan.format()


def test_plan_command_prints_json(capsys, tmp_path: Path) -> None:
    llama_lm().base_model.model.config.save_pretrained(tmp_path)
    code = main(
        ["plan", "--model", str(tmp_path / "config.json"), "--n", "1000", "--seq-len", "16",
         "--target-modules", "q_proj,v_proj", "--r", "4", "--mode", "on-the-fly", "--json"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    summary = json.loads(out)
    assert summary["command"] == "plan" and summary["numbers_per_example"] == 896 and summary["store_bytes"] == 0
    assert summary["methods"][0]["gradient_passes"] == 3  # the norms pass, DataInf's sum, the scoring pass


def test_bad_plans_are_refused(tmp_path: Path, capsys) -> None:
    with pytest.raises(LoRAValidationError, match="no default LoRA target modules for model type 'ctrl'"):
        make_plan(PlanSettings(model=str(DATA / "ctrl-tiny"), n=10, seq_len=8))
    with pytest.raises(LoRAValidationError, match="No LoRA targets found"):
        make_plan(PlanSettings(model=str(DATA / "ctrl-tiny"), n=10, seq_len=8, target_modules=("nope",)))
    with pytest.raises(ConfigError, match="needs project_dim"):
        PlanSettings(model="x", n=10, seq_len=8, mode="projected")
    with pytest.raises(ConfigError, match="no config.json"):
        make_plan(PlanSettings(model=str(tmp_path), n=10, seq_len=8))
    code = main(["plan", "--model", str(DATA / "llama-2-13b"), "--seq-len", "8"])
    assert code == 2 and "needs --n" in capsys.readouterr().err


def test_a_store_too_big_for_the_disk_is_refused_before_any_work(tmp_path: Path, monkeypatch) -> None:
    free = 5000
    monkeypatch.setattr(datainf.store.shutil, "disk_usage", lambda path: type("U", (), {"free": free})())
    model, task = llama_lm(), CausalLMTask(word_tokenizer("lm"))
    calls = []
    monkeypatch.setattr(task, "per_example_loss", lambda *a: calls.append(1) or torch.zeros(1))
    with pytest.raises(DiskFullError, match="needs about .* is free"):
        collect_gradients(model, task, lm_data(40), store=tmp_path / "g", progress=False)
    assert not calls  # nothing was computed
    model.base_model.model.config.save_pretrained(tmp_path / "base")
    plan = make_plan(PlanSettings(model=str(tmp_path / "base"), n=1000, seq_len=8, r=4, out=str(tmp_path)))
    assert "DOES NOT FIT" in plan.format()

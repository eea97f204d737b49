"""``datainf explain`` end to end on a tiny LoRA Llama saved here: generation, scoring, JSON + HTML."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from gradient_fixtures import lm_data, tiny_llama_config, word_tokenizer
from peft import LoraConfig, get_peft_model

from datainf.cli import main
from datainf.data.formats import to_trl_records
from datainf.errors import ConfigError
from datainf.explain.prompts import ExplainSettings, explain_run, top_examples

CHAT = (
    "<s> {% for m in messages %}{{ 'w90' if m['role'] == 'user' else 'w91' }} {{ m['content'] }} </s> "
    "{% endfor %}{% if add_generation_prompt %}w91 {% endif %}"
)


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def run_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("explain")
    torch.manual_seed(0)
    cfg = tiny_llama_config()
    base = root / "base"
    LlamaForCausalLM(cfg).save_pretrained(str(base))
    tok = word_tokenizer("lm")
    tok.chat_template = CHAT
    tok.save_pretrained(str(base))
    model = get_peft_model(
        LlamaForCausalLM.from_pretrained(str(base)),
        LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    adapter = root / "adapter"
    model.save_pretrained(str(adapter))
    train = lm_data(8, seed=4, high=6)
    return {
        "base": base,
        "adapter": adapter,
        "train": _write_jsonl(root / "train.jsonl", train),
        "train_chat": _write_jsonl(root / "train_chat.jsonl", to_trl_records(train, "messages")),
        "prompts": _write_jsonl(
            root / "prompts.jsonl",
            [{"id": "p1", "prompt": "w1 w2 w3"}, {"id": "p2", "prompt": "w4", "response": "w5 w6"}],
        ),
    }


def _explain(files: dict[str, Path], out: Path, *extra: str) -> dict[str, Any]:
    argv = ["explain", "--model", str(files["base"]), "--adapter", str(files["adapter"])]
    argv += ["--prompts", str(files["prompts"]), "--prompt", "w7 w8", "--k", "3", "--max-new-tokens", "4"]
    argv += ["--out", str(out), "-q", *extra]
    assert main(argv) == 0
    return json.loads((out / "explanations.json").read_text())


def test_explain_cli_on_the_fly_and_from_a_store(run_files: dict[str, Path], tmp_path: Path, capsys: Any) -> None:
    result = _explain(run_files, tmp_path / "fly", "--train-data", str(run_files["train"]))
    printed = capsys.readouterr().out
    assert "most helpful" in printed and "explanations.html" in printed
    assert [e["id"] for e in result["explanations"]] == ["p1", "p2", "prompt"]
    p1, p2, _ = result["explanations"]
    assert p1["generated"] is True and p2["generated"] is False and p2["response"] == "w5 w6"
    for e in result["explanations"]:
        helpful = [x["influence"] for x in e["helpful"]]
        harmful = [x["influence"] for x in e["harmful"]]
        assert len(helpful) == len(harmful) == 3
        assert helpful == sorted(helpful) and harmful == sorted(harmful, reverse=True)
        assert max(helpful) <= min(harmful)
        assert all(" -> " in x["text"] for x in e["helpful"] + e["harmful"])  # the training text is shown
    assert result["n_train"] == 8
    html = (tmp_path / "fly" / "explanations.html").read_text()
    assert "most harmful" in html and "w5 w6" in html

    # the same training gradients from a store written by `datainf grads`: the same explanations
    grads = ["grads", "--model", str(run_files["base"]), "--adapter", str(run_files["adapter"]), "--kind", "causal-lm"]
    assert main([*grads, "--data", str(run_files["train"]), "--out", str(tmp_path / "store"), "-q"]) == 0
    stored = _explain(
        run_files,
        tmp_path / "stored",
        "--train-store",
        str(tmp_path / "store"),
        "--train-data",
        str(run_files["train"]),
    )
    for a, b in zip(result["explanations"], stored["explanations"]):
        assert a["response"] == b["response"]
        assert [x["id"] for x in a["harmful"]] == [x["id"] for x in b["harmful"]]
        for x, y in zip(a["harmful"], b["harmful"]):
            assert x["influence"] == pytest.approx(y["influence"], rel=1e-4, abs=1e-8)


def test_explain_with_a_chat_template(run_files: dict[str, Path], tmp_path: Path) -> None:
    result = _explain(run_files, tmp_path / "chat", "--train-data", str(run_files["train_chat"]))
    assert all(e["extra"]["chat_template"] for e in result["explanations"])
    assert result["explanations"][0]["helpful"][0]["text"].startswith("user: ")


def test_explain_refusals(run_files: dict[str, Path], tmp_path: Path, capsys: Any) -> None:
    with pytest.raises(ConfigError, match="Nothing to explain"):
        ExplainSettings(out=str(tmp_path), adapter="x", train_data="t")
    with pytest.raises(ConfigError, match="No training examples"):
        ExplainSettings(out=str(tmp_path), adapter="x", prompt="w1")
    settings = ExplainSettings(out=str(tmp_path / "o"), kind="speech", adapter="x", prompt="w1", train_data="t")
    with pytest.raises(ConfigError, match="kinds it explains: \\['causal-lm'"):
        explain_run(settings)
    code = main(["explain", "--adapter", str(run_files["adapter"]), "--out", str(tmp_path / "p"), "--prompt", "w1"])
    assert code == 2 and "No training examples" in capsys.readouterr().err


def test_top_examples_order_and_ties() -> None:
    row = torch.tensor([0.5, -1.0, 0.5, -1.0, 2.0])
    helpful, harmful = top_examples(row, ["a", "b", "c", "d", "e"], {"b": "text b"}, 2)
    assert [x.id for x in helpful] == ["b", "d"] and helpful[0].text == "text b"
    assert [x.id for x in harmful] == ["e", "a"]

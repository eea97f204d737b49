"""``datainf explain``: for each of a user's prompts, the fine-tuned model's answer and the training
examples that helped and harmed it most.

For a causal LM (``kind="causal-lm"``, :func:`explain_causal_lm`):

1. load the base model and the LoRA adapter (a ``datainf finetune`` run, a peft folder, or a Trainer /
   TRL ``output_dir`` / ``checkpoint-N``: :func:`datainf.models.resolve_adapter_dir`);
2. read the prompts (``--prompts FILE`` with a ``prompt`` column and an optional ``response`` column,
   and / or one ``--prompt TEXT``);
3. generate each response greedily with the fine-tuned model, unless the file gives it. The
   generated *token ids* are what is explained (no re-tokenisation of decoded text). With a chat
   template (``chat="auto"`` and conversational training data, or ``chat="yes"``) the prompt is one
   user turn rendered with the generation prompt, as the model was trained;
4. the response-loss gradient of each (prompt, response) pair (:class:`~datainf.gradients.CausalLMTask`,
   response tokens only);
5. pairwise influence ``I[j, k]`` against a training gradient store (``--train-store``) or computed
   on the fly from the training data (``--train-data``, :class:`~datainf.gradients.OnTheFlyGradients`);
6. per prompt the ``k`` most helpful (most negative ``I``) and most harmful (most positive) training
   examples with their text, printed and written to ``explanations.json`` and ``explanations.html``.

Sign convention: positive influence = harmful (up-weighting the training example raises the loss of
the explained response).

Other kinds plug in through :func:`register_explainer` (the text-to-image branch registers
``"text-to-image"``): an explainer takes the :class:`ExplainSettings` and returns the
:class:`PromptExplanation` list; :func:`explain_run` writes the outputs for every kind.
"""

from __future__ import annotations

import html
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from datainf.data.formats import lm_format
from datainf.errors import ConfigError, DatasetError, EmptyInputError
from datainf.runs import RunDir, removed_on_error
from datainf.scores import SIGN_CONVENTION
from datainf.store import atomic_write_bytes, atomic_write_json

__all__ = [
    "ExplainSettings",
    "TrainingExample",
    "PromptExplanation",
    "ExplainResult",
    "Explainer",
    "register_explainer",
    "available_explainers",
    "explain_run",
    "explain_causal_lm",
    "record_text",
    "top_examples",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExplainSettings:
    """Settings of :func:`explain_run` (``datainf explain``).

    Attributes:
        out: output folder (``explanations.json``, ``explanations.html``, ``config.json``).
        kind: what is explained: a registered explainer (:func:`available_explainers`), ``None``: the
            adapter's recorded kind, else ``"causal-lm"``.
        model: local base-model folder (default: the adapter's recorded base when it is a local folder).
        adapter: the LoRA adapter folder (or ``datainf finetune`` / Trainer output folder).
        prompts: a file of prompts (``prompt`` column; optional ``response`` and ``id``).
        prompt: one more prompt given on the command line (id ``"prompt"``).
        train_store: a training gradient store (``datainf grads``) to score against.
        train_data: the training records: their text is shown; without ``train_store`` their gradients
            are computed on the fly.
        k: helpful and harmful examples shown per prompt.
        max_new_tokens: longest generated response.
        method / damping: the influence method and its damping (:func:`datainf.influence`).
        chat: ``"auto"``: render prompts with the chat template when the training data is
            conversational; ``"yes"`` / ``"no"``.
        max_length, device, grad_batch_size, dtype: as for ``datainf grads``.
        prompt_column / response_column / id_column: column names of the prompts and training files.
    """

    out: str | None = None
    kind: str | None = None
    model: str | None = None
    adapter: str | None = None
    prompts: str | None = None
    prompt: str | None = None
    train_store: str | None = None
    train_data: str | None = None
    k: int = 5
    max_new_tokens: int = 64
    method: str = "datainf"
    damping: float = 0.1
    chat: Literal["auto", "yes", "no"] = "auto"
    max_length: int | None = None
    device: str = "cpu"
    grad_batch_size: int = 16
    dtype: str = "float32"
    prompt_column: str | None = None
    response_column: str | None = None
    id_column: str | None = None

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ConfigError(f"k={self.k}; show at least 1 example per prompt.")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens={self.max_new_tokens}; generate at least 1 token.")
        if self.damping <= 0:
            raise ConfigError(f"damping={self.damping}; use a positive damping such as 0.1.")
        if self.chat not in ("auto", "yes", "no"):
            raise ConfigError(f"chat={self.chat!r}; use 'auto', 'yes' or 'no'.")
        if not self.prompts and not self.prompt:
            raise ConfigError("Nothing to explain: give --prompts FILE and/or --prompt TEXT.")
        if not self.train_store and not self.train_data:
            raise ConfigError(
                "No training examples to score: give --train-store DIR (from `datainf grads`) and/or --train-data "
                "FILE (gradients computed on the fly)."
            )


@dataclass(frozen=True)
class TrainingExample:
    """One training example shown for a prompt: its id, influence (positive = harmful) and text."""

    id: str
    influence: float
    text: str


@dataclass(frozen=True)
class PromptExplanation:
    """One explained prompt.

    Attributes:
        id: the prompt's id.
        prompt: its text.
        response: the explained response (generated or given).
        generated: whether the model generated ``response``.
        helpful: the ``k`` most helpful training examples, most helpful first (most negative influence).
        harmful: the ``k`` most harmful, most harmful first (most positive influence).
        extra: kind-specific fields (e.g. an image path for text-to-image).
    """

    id: str
    prompt: str
    response: str
    generated: bool
    helpful: list[TrainingExample]
    harmful: list[TrainingExample]
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class ExplainResult:
    """What :func:`explain_run` returns."""

    out: Path
    explanations: list[PromptExplanation]
    json_path: Path
    html_path: Path
    settings: ExplainSettings
    n_train: int


Explainer = Callable[[ExplainSettings, bool], tuple[list[PromptExplanation], int]]
"""``(settings, progress) -> (explanations, number of training examples scored)``."""

_EXPLAINERS: dict[str, Explainer] = {}


def register_explainer(kind: str, explainer: Explainer) -> None:
    """Make ``datainf explain --kind <kind>`` run ``explainer`` (replaces an earlier registration)."""
    _EXPLAINERS[str(kind)] = explainer


def available_explainers() -> list[str]:
    """The kinds :func:`explain_run` can explain, in registration order."""
    return list(_EXPLAINERS)


# ---------------------------------------------------------------------------------------------- helpers


def record_text(record: Mapping[str, Any], tokenizer: Any = None) -> str:
    """A training record as one line of text, whatever its format: ``prompt -> response``, the turns of
    a conversation (``user: ... | assistant: ...``), or decoded token ids (needs ``tokenizer``)."""
    fmt = lm_format(record)

    def turns(messages: Any) -> str:
        return " | ".join(f"{m.get('role')}: {m.get('content')}" for m in messages or [])

    if fmt == "messages":
        return turns(record.get("messages"))
    if fmt == "conversational-completion":
        return f"{turns(record.get('prompt'))} -> {turns(record.get('completion'))}"
    if fmt == "prompt-completion":
        return f"{record.get('prompt') or ''} -> {record.get('completion') or ''}"
    if fmt == "prompt-response":
        return f"{record.get('prompt') or ''} -> {record.get('response') or ''}"
    if fmt == "text":
        return str(record.get("text"))
    ids = record.get("input_ids") or (list(record.get("prompt_ids") or []) + list(record.get("response_ids") or []))
    if ids and tokenizer is not None:
        return str(tokenizer.decode(list(ids), skip_special_tokens=True))
    return json.dumps({k: v for k, v in record.items() if k != "id"}, default=str)[:300]


def top_examples(
    row: torch.Tensor, ids: Sequence[str], texts: Mapping[str, str], k: int
) -> tuple[list[TrainingExample], list[TrainingExample]]:
    """The ``k`` most helpful (smallest influence) and ``k`` most harmful (largest) training examples
    of one prompt's influence row ``(n,)``; ties keep the training order."""
    values = row.detach().to(torch.float64).cpu()
    k = min(k, values.numel())
    order = torch.argsort(values, stable=True)
    helpful = [int(i) for i in order[:k]]
    harmful = [int(i) for i in torch.argsort(-values, stable=True)[:k]]

    def make(i: int) -> TrainingExample:
        return TrainingExample(id=str(ids[i]), influence=float(values[i]), text=texts.get(str(ids[i]), ""))

    return [make(i) for i in helpful], [make(i) for i in harmful]


def _column_renames(settings: ExplainSettings) -> dict[str, str]:
    """Our column name -> the file's, for the prompts and the training file: the columns given, except a
    ``response`` column named ``response`` (no rename, and a prompts file need not have one)."""
    given = (
        ("prompt", settings.prompt_column),
        ("response", settings.response_column),
        ("id", settings.id_column),
    )
    return {ours: theirs for ours, theirs in given if theirs and (ours != "response" or theirs != "response")}


def _read_prompts(settings: ExplainSettings) -> list[dict[str, Any]]:
    from datainf.data.tabular import load_records

    records: list[dict[str, Any]] = []
    if settings.prompts:
        records = load_records(settings.prompts, columns=_column_renames(settings), required=["prompt"])
    if settings.prompt:
        taken = {r["id"] for r in records}
        records.append(
            {"id": "prompt" if "prompt" not in taken else f"prompt-{len(records)}", "prompt": settings.prompt}
        )
    if not records:
        raise EmptyInputError("No prompts to explain.")
    return records


def _base_model(settings: ExplainSettings) -> str:
    from datainf.models import read_adapter_metadata, resolve_adapter_dir

    if settings.model:
        return settings.model
    meta = read_adapter_metadata(str(settings.adapter))
    candidates = [meta.get("base_model")]
    try:
        cfg = json.loads((resolve_adapter_dir(str(settings.adapter)) / "adapter_config.json").read_text())
        candidates.append(cfg.get("base_model_name_or_path"))
    except (OSError, json.JSONDecodeError):
        pass
    for c in candidates:
        if c and Path(str(c)).expanduser().is_dir():
            logger.info("Using the adapter's recorded base model %s.", c)
            return str(c)
    raise ConfigError(
        f"No base model given and the adapter records none that exists here ({[c for c in candidates if c]}): pass "
        "--model DIR (a local folder written by save_pretrained)."
    )


def _generate(model: nn.Module, tokenizer: Any, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation token ids of one prompt, up to and including EOS."""
    device = next(model.parameters()).device
    eos = getattr(tokenizer, "eos_token_id", None)
    pad = getattr(tokenizer, "pad_token_id", None)
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    with torch.no_grad():
        out = model.generate(  # type: ignore[operator]
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=pad if pad is not None else eos,
        )
    new = [int(t) for t in out[0, len(prompt_ids) :].tolist()]
    if eos is not None and int(eos) in new:
        new = new[: new.index(int(eos)) + 1]
    return new


def _chat_mode(settings: ExplainSettings, tokenizer: Any, train_records: Sequence[Mapping[str, Any]]) -> bool:
    if settings.chat == "no":
        return False
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if settings.chat == "yes":
        if not has_template:
            raise ConfigError("chat='yes' but the tokenizer has no chat template; use --chat no or a chat tokenizer.")
        return True
    conversational = bool(train_records) and lm_format(train_records[0]) in ("messages", "conversational-completion")
    return has_template and conversational


def _prompt_ids(tokenizer: Any, prompt: str, chat: bool) -> list[int]:
    if chat:
        out = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=True, add_generation_prompt=True, return_dict=True
        )
        return [int(t) for t in out["input_ids"]]
    return [int(t) for t in tokenizer(prompt, add_special_tokens=True)["input_ids"]]


def explain_causal_lm(settings: ExplainSettings, progress: bool = True) -> tuple[list[PromptExplanation], int]:
    """The causal-LM explainer (the module docstring's steps 1-6 without writing)."""
    from datainf.data.tabular import load_records
    from datainf.gradients import OnTheFlyGradients, collect_gradients
    from datainf.influence import influence
    from datainf.models import load_model
    from datainf.store import GradientSource, GradientStore
    from datainf.tasks import get_task_kind

    if not settings.adapter:
        raise ConfigError("explain needs the fine-tuned LoRA adapter: pass --adapter DIR.")
    prompts = _read_prompts(settings)
    train_records = load_records(settings.train_data, columns=_column_renames(settings)) if settings.train_data else []
    model, tokenizer = load_model(
        _base_model(settings), kind="causal-lm", adapter=settings.adapter, device=settings.device
    )
    task = get_task_kind("causal-lm").make_task(tokenizer, max_length=settings.max_length)
    chat = _chat_mode(settings, tokenizer, train_records)

    tests: list[dict[str, Any]] = []
    responses: list[tuple[str, bool]] = []
    for record in prompts:
        prompt = str(record["prompt"])
        given = record.get("response")
        prompt_ids = _prompt_ids(tokenizer, prompt, chat)
        if given is not None and str(given) != "":
            response_ids = [int(t) for t in tokenizer(str(given), add_special_tokens=False)["input_ids"]]
            eos = getattr(tokenizer, "eos_token_id", None)
            if eos is not None:
                response_ids.append(int(eos))
            responses.append((str(given), False))
        else:
            response_ids = _generate(model, tokenizer, prompt_ids, settings.max_new_tokens)
            text = tokenizer.decode(response_ids, skip_special_tokens=True).strip()
            responses.append((text, True))
            logger.info("Generated for %r: %r", record["id"], text)
        if not response_ids:
            raise DatasetError(
                f"The model generated nothing for prompt {record['id']!r}; give its response in the prompts file."
            )
        tests.append({"id": str(record["id"]), "prompt_ids": prompt_ids, "response_ids": response_ids})

    test_store = collect_gradients(
        model, task, tests, batch_size=settings.grad_batch_size, dtype=settings.dtype, progress=progress
    )
    train_source: GradientSource
    if settings.train_store:
        train_source = GradientStore.open(settings.train_store)
    else:
        train_source = OnTheFlyGradients(
            model, task, train_records, batch_size=settings.grad_batch_size, dtype=settings.dtype, progress=progress
        )
    scores = influence(
        train_source,
        test_store,
        method=settings.method,
        mode="pairwise",
        damping=settings.damping,
        device=settings.device,
        progress=progress,
    )
    values = torch.as_tensor(scores.values)  # (m, n)
    train_ids = list(scores.train_ids)
    texts = {str(r["id"]): record_text(r, tokenizer) for r in train_records}
    out: list[PromptExplanation] = []
    for j, (record, (response, generated)) in enumerate(zip(prompts, responses)):
        helpful, harmful = top_examples(values[j], train_ids, texts, settings.k)
        out.append(
            PromptExplanation(
                id=str(record["id"]),
                prompt=str(record["prompt"]),
                response=response,
                generated=generated,
                helpful=helpful,
                harmful=harmful,
                extra={"chat_template": chat},
            )
        )
    return out, len(train_ids)


register_explainer("causal-lm", explain_causal_lm)


def _explain_text_to_image(settings: ExplainSettings, progress: bool) -> tuple[list[PromptExplanation], int]:
    """The text-to-image explainer (:func:`datainf.explain.generated_images.explain_text_to_image`),
    imported on use so that explaining text never loads diffusers."""
    from datainf.explain.generated_images import explain_text_to_image

    return explain_text_to_image(settings, progress)


register_explainer("text-to-image", _explain_text_to_image)


# ---------------------------------------------------------------------------------------------- outputs


def _html(explanations: Sequence[PromptExplanation], settings: ExplainSettings) -> str:
    esc = html.escape

    def table(title: str, rows: Sequence[TrainingExample]) -> str:
        body = "".join(f"<tr><td>{esc(r.id)}</td><td>{r.influence:+.4g}</td><td>{esc(r.text)}</td></tr>" for r in rows)
        return f"<h3>{esc(title)}</h3><table><tr><th>id</th><th>influence</th><th>text</th></tr>{body}</table>"

    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>datainf explain</title>",
        "<style>body{font-family:sans-serif;max-width:60em;margin:auto}table{border-collapse:collapse;width:100%}"
        "td,th{border:1px solid #ccc;padding:4px;text-align:left;vertical-align:top}</style></head><body>",
        f"<h1>Which training examples drove each answer</h1><p>method {esc(settings.method)}; "
        f"{esc(SIGN_CONVENTION)}</p>",
    ]
    for e in explanations:
        image = e.extra.get("image")
        shown = f"<img src='{esc(str(image))}' width='256'>" if image else ""
        parts.append(
            f"<section><h2>{esc(e.id)}</h2><p><b>prompt</b>: {esc(e.prompt)}</p>"
            f"<p><b>{'generated' if e.generated else 'given'} response</b>: {esc(e.response)}</p>{shown}"
            + table("most helpful (most negative influence)", e.helpful)
            + table("most harmful (most positive influence)", e.harmful)
            + "</section>"
        )
    parts.append("</body></html>")
    return "".join(parts)


def _saved(settings: ExplainSettings) -> dict[str, Any]:
    return {k: v for k, v in asdict(settings).items() if k != "out"}


def explain_run(settings: ExplainSettings, *, overwrite: bool = False, progress: bool = True) -> ExplainResult:
    """Explain each prompt with the explainer of ``settings.kind`` and write ``explanations.json`` and
    ``explanations.html`` into ``settings.out`` (claimed as a :class:`~datainf.runs.RunDir`).

    Raises:
        ConfigError: an unknown kind, no output folder, or bad settings.
    """
    from datainf.models import read_adapter_metadata

    if not settings.out:
        raise ConfigError("explain needs an output folder: pass --out DIR.")
    kind = settings.kind
    if kind is None:
        kind = (
            str(read_adapter_metadata(str(settings.adapter)).get("kind") or "causal-lm")
            if settings.adapter
            else "causal-lm"
        )
    explainer = _EXPLAINERS.get(kind)
    if explainer is None:
        raise ConfigError(f"explain cannot explain kind {kind!r}; kinds it explains: {available_explainers()}.")
    resolved = ExplainSettings(**{**asdict(settings), "kind": kind})
    with removed_on_error(resolved.out):
        run = RunDir.claim(resolved.out, kind="explain", settings=_saved(resolved), overwrite=overwrite)
        explanations, n_train = explainer(resolved, progress)
        summary = {
            "kind": kind,
            "method": resolved.method,
            "sign_convention": SIGN_CONVENTION,
            "n_train": n_train,
            "explanations": [asdict(e) for e in explanations],
        }
        json_path = run.path / "explanations.json"
        html_path = run.path / "explanations.html"
        atomic_write_json(json_path, summary)
        atomic_write_bytes(html_path, _html(explanations, resolved).encode())
    return ExplainResult(
        out=run.path,
        explanations=explanations,
        json_path=json_path,
        html_path=html_path,
        settings=resolved,
        n_train=n_train,
    )

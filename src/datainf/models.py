"""Load a local Hugging Face model folder, optionally with a trained peft LoRA adapter.

datainf works offline: every model and adapter is a local folder. A name that is not a local path
(e.g. a hub id such as ``roberta-large``) is refused at once with a clear message instead of letting
``from_pretrained`` try the network.

The ``kind`` is a task kind of :mod:`datainf.tasks.kinds` that names a transformers auto class
(:attr:`~datainf.tasks.TaskKind.auto_model`); built in:

* ``"classification"``: ``AutoModelForSequenceClassification`` with ``num_labels`` classes (read from
  the adapter's ``datainf_adapter.json`` when the adapter was trained by :mod:`datainf.finetune`);
  every kind that :attr:`~datainf.tasks.TaskKind.encodes_labels` gets its head sized this way;
* ``"causal-lm"``: ``AutoModelForCausalLM``. Encoder models that can run as decoders (BERT, RoBERTa,
  ...) are loaded with ``is_decoder=True`` (causal attention), e.g. all-MiniLM-L6-v2 as a small LM;
  so is every kind marked :attr:`~datainf.tasks.TaskKind.decoder`.

An adapter is checked against the base model before and after loading; a mismatch (different base
model recorded by datainf, weight shapes that do not fit, target modules absent, adapter tensors that
find no place in the model) raises one :class:`ModelLoadError` that names both folders.

The model fingerprint used in gradient stores is :func:`datainf.gradients.lora.model_fingerprint`
(owned by the gradients module); this module only records a digest of the *base* model folder
(:func:`base_model_digest`) so that an adapter can be matched to the base it was trained on.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from datainf.errors import ConfigError, DataInfError
from datainf.tasks.kinds import TaskKind, available_task_kinds, get_task_kind

__all__ = [
    "ADAPTER_METADATA",
    "ModelKind",
    "LoadedModel",
    "ModelLoadError",
    "AdapterMismatchError",
    "load_model",
    "load_tokenizer",
    "resolve_model_dir",
    "resolve_adapter_dir",
    "read_adapter_metadata",
    "base_model_digest",
]

logger = logging.getLogger(__name__)

ModelKind = str
"""The name of a registered task kind that :func:`load_model` can load (:func:`datainf.tasks.available_task_kinds`
with ``loadable=True``), e.g. ``"classification"`` or ``"causal-lm"``."""

#: File written by :func:`datainf.finetune.finetune_lora` next to the peft adapter: base model path and
#: digest, task kind, label names, training settings.
ADAPTER_METADATA = "datainf_adapter.json"

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5")
_DIGEST_CHUNK = 1 << 20
# encoder architectures whose HF implementation has a causal-LM head usable with is_decoder=True
_ENCODERS_AS_DECODERS = {
    "bert",
    "roberta",
    "xlm-roberta",
    "xlm-roberta-xl",
    "camembert",
    "electra",
    "ernie",
    "bert-generation",
    "data2vec-text",
    "rembert",
    "roc_bert",
    "roformer",
    "megatron-bert",
    "xmod",
}


class ModelLoadError(DataInfError, ValueError):
    """A model or adapter folder cannot be loaded (missing, not a model, hub id while offline, ...)."""


class AdapterMismatchError(ModelLoadError):
    """The adapter was trained on a different base model than the one it is being loaded onto."""


class LoadedModel(NamedTuple):
    """What :func:`load_model` returns (unpacks as ``model, tokenizer``).

    Attributes:
        model: the transformers model, wrapped in a ``peft.PeftModel`` when an adapter was given.
        tokenizer: the base folder's tokenizer (a pad token is set for causal LMs that lack one).
    """

    model: nn.Module
    tokenizer: Any


# ---------------------------------------------------------------------------------------------- paths


def _offline_hint(name: str, what: str) -> str:
    return (
        f"{what} {name!r} is not a folder on this machine. datainf works offline: pass a local folder "
        "(for a Hugging Face hub id, download it where there is network, e.g. with save_pretrained, and copy the "
        "folder here)."
    )


def resolve_model_dir(base: str | os.PathLike[str]) -> Path:
    """The local folder of a base model, checked to hold ``config.json``.

    Raises:
        ModelLoadError: the path does not exist (a hub id while offline), is a file, an adapter
            folder, or a folder without ``config.json``.
    """
    name = os.fspath(base)
    path = Path(name).expanduser()
    if not path.exists():
        raise ModelLoadError(_offline_hint(name, "Model"))
    if not path.is_dir():
        raise ModelLoadError(
            f"Model {name!r} is a file; pass the folder written by save_pretrained (it holds config.json)."
        )
    if not (path / "config.json").is_file():
        if (path / "adapter_config.json").is_file():
            raise ModelLoadError(
                f"{name!r} is a peft adapter folder, not a base model: pass the base model folder as the model and "
                "this folder as the adapter (CLI: --model BASE --adapter ADAPTER)."
            )
        raise ModelLoadError(
            f"{name!r} holds no config.json, so it is not a Hugging Face model folder. Pass the folder written by "
            "model.save_pretrained(...)."
        )
    return path


_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def _checkpoints(path: Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of the ``checkpoint-N`` sub-folders of a Trainer ``output_dir`` that hold a peft
    adapter, by step."""
    found: list[tuple[int, Path]] = []
    for child in path.iterdir():
        m = _CHECKPOINT.match(child.name)
        if m and child.is_dir() and (child / "adapter_config.json").is_file():
            found.append((int(m.group(1)), child))
    return sorted(found)


def _best_checkpoint(path: Path, checkpoints: list[tuple[int, Path]]) -> Path | None:
    """The ``best_model_checkpoint`` the newest checkpoint's ``trainer_state.json`` records (HF Trainer with
    ``load_best_model_at_end`` / ``metric_for_best_model``), when it is one of ``checkpoints``."""
    state_file = checkpoints[-1][1] / "trainer_state.json"
    if not state_file.is_file():
        return None
    try:
        best = json.loads(state_file.read_text()).get("best_model_checkpoint")
    except (OSError, json.JSONDecodeError):
        logger.warning("%s is unreadable; choosing the newest checkpoint instead of the best.", state_file)
        return None
    if not best:
        return None
    name = Path(str(best)).name
    for _, folder in checkpoints:
        if folder.name == name:
            return folder
    logger.warning(
        "%s records best checkpoint %r, which is not among the checkpoints in %s; choosing the newest.",
        state_file,
        best,
        path,
    )
    return None


def resolve_adapter_dir(adapter: str | os.PathLike[str]) -> Path:
    """The folder holding ``adapter_config.json``.

    Accepts, in this order:

    1. the adapter folder itself (``peft_model.save_pretrained``, a Trainer ``checkpoint-N`` folder,
       or a Trainer / TRL ``output_dir`` after ``trainer.save_model()``: the final adapter);
    2. its ``adapter/`` sub-folder (the layout ``datainf finetune --out RUN`` writes);
    3. a Trainer ``output_dir`` with only ``checkpoint-N`` sub-folders: the best checkpoint when the
       newest one's ``trainer_state.json`` records ``best_model_checkpoint``, else the newest (largest
       ``N``). The choice is logged at INFO level; pass the ``checkpoint-N`` folder to choose another.

    Raises:
        ModelLoadError: the folder does not exist or holds no peft adapter (a full or merged model
            folder is named as such).
    """
    name = os.fspath(adapter)
    path = Path(name).expanduser()
    if not path.exists():
        raise ModelLoadError(_offline_hint(name, "Adapter"))
    if path.is_dir() and (path / "adapter_config.json").is_file():
        return path
    if path.is_dir() and (path / "adapter" / "adapter_config.json").is_file():
        return path / "adapter"
    checkpoints = _checkpoints(path) if path.is_dir() else []
    if checkpoints:
        best = _best_checkpoint(path, checkpoints)
        chosen = best or checkpoints[-1][1]
        logger.info(
            "%s holds no final adapter but %d checkpoint(s) (%s); using %s, the %s. Pass a checkpoint-N folder to "
            "choose another.",
            path,
            len(checkpoints),
            ", ".join(f.name for _, f in checkpoints[-5:]),
            chosen.name,
            "best one recorded in trainer_state.json" if best else "newest",
        )
        return chosen
    if path.is_dir() and (path / "config.json").is_file():
        raise ModelLoadError(
            f"{name!r} is a full model folder, not a peft adapter (no adapter_config.json). A merged adapter "
            "(merge_and_unload) is a full model too: its LoRA update is inside the base weights, so there is nothing "
            "to differentiate. Pass it as the model, or pass the unmerged adapter folder that "
            "adapter.save_pretrained(...) (or a Trainer run's output_dir / checkpoint-N) wrote as the adapter."
        )
    raise ModelLoadError(
        f"{name!r} holds no adapter_config.json, so it is not a peft adapter folder. Pass the folder written by "
        "peft_model.save_pretrained(...), a Trainer / TRL output_dir or one of its checkpoint-N folders, or the "
        "output of `datainf finetune`."
    )


def read_adapter_metadata(adapter: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``datainf_adapter.json`` of an adapter trained by datainf, or ``{}`` for a foreign adapter."""
    path = resolve_adapter_dir(adapter) / ADAPTER_METADATA
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"{path} is unreadable ({err}); retrain the adapter or delete that file.") from err
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} does not hold a JSON object; retrain the adapter or delete that file.")
    return data


def base_model_digest(base: str | os.PathLike[str]) -> str:
    """A short sha256 identifying a model folder, cheap even for large models.

    Hashes ``config.json`` (minus bookkeeping keys such as ``_name_or_path`` and
    ``transformers_version``) and, for every weight file, its name, size and its first and last MiB.
    Two folders holding the same model (copies, moved folders) get the same digest; two random
    initialisations of one architecture do not.
    """
    path = resolve_model_dir(base)
    digest = hashlib.sha256()
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"{path / 'config.json'} is unreadable ({err}).") from err
    for key in ("_name_or_path", "transformers_version", "name_or_path", "architectures", "dtype", "torch_dtype"):
        config.pop(key, None)
    for key in ("id2label", "label2id", "num_labels"):
        config.pop(key, None)  # the head is re-initialised or trained: labels do not identify the base
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for file in sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES)):
        size = file.stat().st_size
        digest.update(f"\n{file.name}|{size}\n".encode())
        with open(file, "rb") as handle:
            digest.update(handle.read(_DIGEST_CHUNK))
            if size > 2 * _DIGEST_CHUNK:
                handle.seek(size - _DIGEST_CHUNK)
                digest.update(handle.read(_DIGEST_CHUNK))
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- loading

#: Top-level module names of transformers' sequence-classification heads (BERT / RoBERTa / GPT-2 /
#: DistilBERT ...): :func:`load_model` sizes these for the data's classes, so they are new on purpose.
_HEAD_MODULES = frozenset({"classifier", "pre_classifier", "score", "classification_head"})
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_REPORT_ROW = re.compile(r"^\s*([\w.]+)\s*\|\s*(MISSING|MISMATCH|UNEXPECTED|CONVERSION|OWNED|SKIPPED)\b")


class _HeadOnlyLoadReport(logging.Filter):
    """Drops transformers' load report when the only weights it names are a classification head's
    (missing from the checkpoint, or re-sized): :func:`load_model` initialises that head on purpose
    (seeded), so "newly initialized ... consider training" says nothing the user needs. A report that
    names any other weight (a missing LM head, unexpected or unconvertible keys) is kept as it is."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = _ANSI.sub("", record.getMessage())
        except Exception:  # a record that cannot be formatted is not ours to judge
            return True
        if "LOAD REPORT" not in text:
            return True
        rows = [m.groups() for m in map(_REPORT_ROW.match, text.splitlines()) if m]
        head_only = bool(rows) and all(
            status in ("MISSING", "MISMATCH") and key.split(".", 1)[0] in _HEAD_MODULES for key, status in rows
        )
        return not head_only


@contextlib.contextmanager
def _quiet_head_report(active: bool) -> Iterator[None]:
    """While loading: hide transformers' load report about the classification head only (``active``)."""
    if not active:
        yield
        return
    flt = _HeadOnlyLoadReport()
    loggers = [logging.getLogger("transformers.modeling_utils")]
    for lg in loggers:
        lg.addFilter(flt)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeFilter(flt)


def _loadable_kind(kind: str) -> TaskKind:
    """The registered task kind ``kind``, checked to name a transformers model class.

    Raises:
        ModelLoadError: the kind is unknown or has no transformers model class.
    """
    try:
        spec = get_task_kind(kind)
    except ConfigError:
        raise ModelLoadError(
            f"Unknown model kind {kind!r}; use one of {available_task_kinds(loadable=True)}."
        ) from None
    if not spec.loadable:
        raise ModelLoadError(
            f"Task kind {kind!r} names no transformers model class, so load_model cannot load it (kinds it loads: "
            f"{available_task_kinds(loadable=True)}); load the model yourself and build its task "
            f"({spec.task_class.__name__}) directly."
        )
    return spec


def load_tokenizer(base: str | os.PathLike[str], *, kind: ModelKind = "classification") -> Any:
    """The tokenizer of a local model folder; causal LMs without a pad token get EOS (or UNK) as pad.

    Raises:
        ModelLoadError: the folder is missing or holds no tokenizer.
    """
    from transformers import AutoTokenizer

    path = resolve_model_dir(base)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, TypeError) as err:
        raise ModelLoadError(
            f"No usable tokenizer in {path} ({type(err).__name__}: {str(err)[:300]}). Save one next to the model with "
            "tokenizer.save_pretrained(folder)."
        ) from err
    if _loadable_kind(kind).decoder and getattr(tokenizer, "pad_token", None) is None:
        for candidate in ("eos_token", "unk_token"):
            token = getattr(tokenizer, candidate, None)
            if token is not None:
                tokenizer.pad_token = token
                logger.info(
                    "Tokenizer of %s has no pad token; using its %s %r (padding is masked).", path, candidate, token
                )
                break
    return tokenizer


#: Why the non-LoRA peft adapter types cannot be differentiated (messages of :func:`_read_peft_config`).
_NON_LORA = {
    "PROMPT_TUNING": "prompt tuning trains virtual token embeddings, not weight matrices",
    "P_TUNING": "p-tuning trains a prompt encoder, not LoRA blocks",
    "PREFIX_TUNING": "prefix tuning trains per-layer key/value prefixes, not LoRA blocks",
    "IA3": "IA3 trains scaling vectors multiplied into activations, with no lora_A / lora_B module",
    "ADALORA": "AdaLoRA's SVD-shaped update (lora_E) has no lora_A / lora_B module pair to hook",
    "LOHA": "LoHa's Hadamard-product update has no lora_A / lora_B module",
    "LOKR": "LoKr's Kronecker-product update has no lora_A / lora_B module",
}


def _read_peft_config(adapter_dir: Path) -> dict[str, Any]:
    try:
        data = json.loads((adapter_dir / "adapter_config.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"{adapter_dir / 'adapter_config.json'} is unreadable ({err}).") from err
    peft_type = str(data.get("peft_type", "")).upper()
    if peft_type != "LORA":
        why = _NON_LORA.get(peft_type, "it is not a LoRA adapter")
        raise ModelLoadError(
            f"The adapter in {adapter_dir} is of type {data.get('peft_type')!r}: {why}. datainf takes per-example "
            "gradients through the lora_A / lora_B modules of LoRA adapters only; retrain with peft.LoraConfig."
        )
    if data.get("use_dora"):
        raise ModelLoadError(
            f"The adapter in {adapter_dir} is a DoRA adapter (use_dora=true): its magnitude vector rescales the "
            "whole weight and has no lora_A / lora_B module to hook, so per-example gradients cannot be taken. "
            "Retrain with use_dora=False."
        )
    return data


def _same_folder(a: str, b: Path) -> bool:
    try:
        return Path(a).expanduser().exists() and os.path.samefile(Path(a).expanduser(), b)
    except OSError:
        return False


def _check_adapter_base(base_dir: Path, adapter_dir: Path, peft_cfg: dict[str, Any], meta: dict[str, Any]) -> None:
    """Refuse an adapter that datainf knows was trained on a different base model."""
    recorded = str(meta.get("base_model") or peft_cfg.get("base_model_name_or_path") or "")
    recorded_digest = meta.get("base_model_digest")
    if recorded_digest:
        actual = base_model_digest(base_dir)
        if actual != recorded_digest:
            raise AdapterMismatchError(
                f"The adapter {adapter_dir} was trained on base model {recorded!r} (digest {recorded_digest}), but the "
                f"model given is {str(base_dir)!r} (digest {actual}), a different model. Pass the base model the "
                "adapter was trained on, or retrain the adapter on this one."
            )
        return
    if not recorded or _same_folder(recorded, base_dir) or recorded == str(base_dir):
        return
    if Path(recorded).expanduser().is_dir() and (Path(recorded).expanduser() / "config.json").is_file():
        other = base_model_digest(recorded)
        if other != base_model_digest(base_dir):
            raise AdapterMismatchError(
                f"The adapter {adapter_dir} records base model {recorded!r}, which exists here and differs from the "
                f"model given, {str(base_dir)!r}. Pass --model {recorded} (or the same model), or retrain the adapter."
            )
        return
    logger.warning(
        "The adapter %s records base model %r; loading it onto %s. Its weights will be checked against this model.",
        adapter_dir,
        recorded,
        base_dir,
    )


def _adapter_file_keys(adapter_dir: Path) -> list[str] | None:
    file = adapter_dir / "adapter_model.safetensors"
    if not file.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as handle:
            return list(handle.keys())
    except Exception as err:  # safetensors raises several error types on damaged files
        raise ModelLoadError(
            f"{file} cannot be read ({type(err).__name__}: {err}); retrain or re-copy the adapter."
        ) from err


def _mismatch_error(adapter_dir: Path, base_dir: Path, peft_cfg: dict[str, Any], detail: str) -> AdapterMismatchError:
    recorded = peft_cfg.get("base_model_name_or_path")
    return AdapterMismatchError(
        f"The adapter {adapter_dir} does not fit the model {str(base_dir)!r} (the adapter records base model "
        f"{recorded!r}): {detail} Pass the base model the adapter was trained on (and, for classification, the same "
        "number of labels), or retrain the adapter."
    )


def _attach_adapter(
    model: nn.Module, base_dir: Path, adapter_dir: Path, peft_cfg: dict[str, Any], *, trainable: bool
) -> nn.Module:
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Found missing adapter keys")  # checked below, with a clear error
            warnings.filterwarnings("ignore", category=FutureWarning, message=".*is_gradient_checkpointing.*")
            peft_model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)
    except RuntimeError as err:
        text = str(err)
        if "size mismatch" in text:
            lines = [ln.strip() for ln in text.splitlines() if "size mismatch" in ln]
            shown = "; ".join(lines[:3]) + (f" (and {len(lines) - 3} more)" if len(lines) > 3 else "")
            raise _mismatch_error(adapter_dir, base_dir, peft_cfg, f"weight shapes differ: {shown}.") from err
        raise ModelLoadError(f"Loading the adapter {adapter_dir} onto {base_dir} failed: {text[:500]}") from err
    except ValueError as err:  # peft: target modules not found in the base model
        targets = peft_cfg.get("target_modules")
        raise _mismatch_error(
            adapter_dir,
            base_dir,
            peft_cfg,
            f"its target modules {targets!r} do not exist in this model ({str(err)[:200]}).",
        ) from err
    stored = _adapter_file_keys(adapter_dir)
    if stored is not None:
        expected = set(get_peft_model_state_dict(peft_model, save_embedding_layers=False).keys())
        unused = sorted(set(stored) - expected)
        missing = sorted(expected - set(stored))
        if unused or missing:
            detail = []
            if unused:
                detail.append(f"{len(unused)} adapter tensor(s) have no place in this model, e.g. {unused[:3]}")
            if missing:
                detail.append(f"{len(missing)} tensor(s) the model expects are not in the adapter, e.g. {missing[:3]}")
            raise _mismatch_error(adapter_dir, base_dir, peft_cfg, "; ".join(detail) + ".")
    return peft_model


def load_model(
    base: str | os.PathLike[str],
    *,
    kind: ModelKind,
    num_labels: int | None = None,
    adapter: str | os.PathLike[str] | None = None,
    trainable: bool = False,
    dtype: str = "float32",
    device: str = "cpu",
    seed: int = 0,
) -> LoadedModel:
    """Load a local model folder (and optionally a LoRA adapter) for one task kind.

    Args:
        base: local folder written by ``save_pretrained`` (``config.json`` + weights + tokenizer files).
        kind: a task kind with a transformers model class (``"classification"`` or ``"causal-lm"``
            built in; :func:`datainf.tasks.available_task_kinds` with ``loadable=True``).
        num_labels: classes of a classification head (kinds that encode labels; ignored by the
            others). Default: from the adapter's ``datainf_adapter.json``, else the folder's
            ``config.num_labels``. A head whose size differs from the checkpoint's is re-initialised
            (seeded by ``seed``).
        adapter: folder of a peft LoRA adapter (or a ``datainf finetune`` output folder holding
            ``adapter/``). With a datainf adapter, the label names it was trained with are set as the
            model's ``id2label`` / ``label2id``.
        trainable: load the adapter with trainable tensors (``False``: inference mode; the gradient
            collector switches ``requires_grad`` on for the blocks itself).
        dtype: ``float32`` (default), ``float64``, ``bfloat16`` or ``float16``.
        device: where to put the model.
        seed: seeds any freshly initialised weights (a classification head), so loading is deterministic.

    Returns:
        :class:`LoadedModel` ``(model, tokenizer)``.

    Raises:
        ModelLoadError: a folder is missing (a hub id while offline included), not a model / adapter,
            or unreadable; ``kind`` or ``num_labels`` is invalid.
        AdapterMismatchError: the adapter belongs to a different base model.
    """
    from transformers import AutoConfig

    spec = _loadable_kind(kind)
    if spec.model_loader is not None:  # a kind that loads its own model, e.g. text-to-image: a diffusers pipeline
        model, context = spec.model_loader(base, adapter=adapter, device=device, dtype=dtype)
        return LoadedModel(model=model, tokenizer=context)
    torch_dtype = {
        "float32": torch.float32,
        "float64": torch.float64,
        "bfloat16": torch.bfloat16,
        "float16": torch.float16,
    }.get(dtype)
    if torch_dtype is None:
        raise ModelLoadError(f"Unknown dtype {dtype!r}; use float32, float64, bfloat16 or float16.")
    base_dir = resolve_model_dir(base)
    adapter_dir = resolve_adapter_dir(adapter) if adapter is not None else None
    peft_cfg = _read_peft_config(adapter_dir) if adapter_dir is not None else {}
    meta = read_adapter_metadata(adapter_dir) if adapter_dir is not None else {}
    if meta.get("kind") and meta["kind"] != kind:
        raise ModelLoadError(
            f"The adapter {adapter_dir} was trained for {meta['kind']!r}, but kind {kind!r} was asked for. "
            f"Use kind={meta['kind']!r} (CLI: --kind {meta['kind']})."
        )
    if adapter_dir is not None:
        _check_adapter_base(base_dir, adapter_dir, peft_cfg, meta)

    try:
        config = AutoConfig.from_pretrained(str(base_dir), local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise ModelLoadError(
            f"{base_dir / 'config.json'} cannot be read as a model config ({str(err)[:300]})."
        ) from err

    label_names = meta.get("label_names")
    kwargs: dict[str, Any] = {"local_files_only": True, "dtype": torch_dtype}
    if spec.encodes_labels:
        if num_labels is None:
            num_labels = int(meta["num_labels"]) if meta.get("num_labels") else int(getattr(config, "num_labels", 2))
        if isinstance(num_labels, bool) or int(num_labels) < 1:
            raise ModelLoadError(f"num_labels must be a positive integer, got {num_labels!r}.")
        num_labels = int(num_labels)
        if meta.get("num_labels") and int(meta["num_labels"]) != num_labels:
            raise AdapterMismatchError(
                f"The adapter {adapter_dir} was trained with {meta['num_labels']} labels, but num_labels={num_labels} "
                "was asked for. Leave num_labels unset to use the adapter's."
            )
        kwargs["num_labels"] = num_labels
        kwargs["ignore_mismatched_sizes"] = True
        if label_names and len(label_names) == num_labels:
            kwargs["id2label"] = {i: str(name) for i, name in enumerate(label_names)}
            kwargs["label2id"] = {str(name): i for i, name in enumerate(label_names)}
    encoder = getattr(config, "model_type", "") in _ENCODERS_AS_DECODERS and not getattr(config, "is_decoder", False)
    if spec.decoder and encoder:
        kwargs["is_decoder"] = True
        logger.info("Loading the %s encoder in %s as a causal decoder (is_decoder=True).", config.model_type, base_dir)
    try:
        auto_cls = spec.model_class()
    except ConfigError as err:
        raise ModelLoadError(str(err)) from err

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            with _quiet_head_report(spec.encodes_labels):
                model = auto_cls.from_pretrained(str(base_dir), **kwargs)
        except ValueError as err:
            raise ModelLoadError(
                f"The model in {base_dir} (type {getattr(config, 'model_type', '?')!r}) cannot be loaded for {kind} "
                f"({str(err)[:300]})."
            ) from err
        except (OSError, RuntimeError) as err:
            raise ModelLoadError(
                f"Loading the model in {base_dir} failed ({type(err).__name__}: {str(err)[:300]})."
            ) from err

    tokenizer = load_tokenizer(base_dir, kind=kind)
    if spec.decoder and getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if adapter_dir is not None:
        model = _attach_adapter(model, base_dir, adapter_dir, peft_cfg, trainable=trainable)
        logger.info("Loaded adapter %s onto %s.", adapter_dir, base_dir)
    model.to(device)
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer)

"""Which record format a causal-LM example is in: TRL's dataset formats and datainf's own.

A record is one dict (a row of a jsonl / parquet / ``datasets`` file). The formats read, tried in
this order (the first whose fields a record has wins):

==============================  ====================================================================  ==================
format                          fields                                                                loss tokens
==============================  ====================================================================  ==================
``"tokenized"``                 ``input_ids`` + ``labels`` (-100 = masked), ``completion_mask`` or    as the row says
                                ``assistant_masks`` (what HF / TRL trainers hold after tokenising)
``"token-ids"``                 ``prompt_ids`` / ``response_ids`` (pre-tokenised prompt + response)   response
``"messages"``                  ``messages``: ``[{"role", "content"}, ...]`` (TRL conversational      assistant turns
                                language modelling; the tokenizer's chat template is applied)
``"conversational-completion"`` ``prompt`` and ``completion`` as message lists (TRL conversational    completion
                                prompt-completion)
``"prompt-completion"``         ``prompt`` and ``completion`` as strings (TRL standard                completion
                                prompt-completion)
``"prompt-response"``           ``prompt`` and ``response`` strings (datainf's own; the names are      response
                                configurable)
``"text"``                      ``text`` (TRL standard language modelling)                            every token
==============================  ====================================================================  ==================

A *packed* row (TRL ``packing=True``: several examples concatenated into one row, marked by
``seq_lengths`` or by ``position_ids`` that restart inside the row) mixes examples, so no
per-example gradient can be taken from it: :func:`check_not_packed` refuses it.

Only the detection lives here (it needs no tokenizer); the tokenisation of each format is
:class:`datainf.tasks.CausalLMTask`'s.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from datainf.errors import DatasetError

__all__ = [
    "LMFormat",
    "LM_FORMATS",
    "MASK_FIELDS",
    "lm_format",
    "is_message_list",
    "check_not_packed",
    "describe_lm_formats",
    "to_trl_records",
]

LMFormat = Literal[
    "tokenized",
    "token-ids",
    "messages",
    "conversational-completion",
    "prompt-completion",
    "prompt-response",
    "text",
]

#: Every format :func:`lm_format` recognises, in detection order, with the fields that mark it.
LM_FORMATS: dict[str, str] = {
    "tokenized": "input_ids + labels / completion_mask / assistant_masks",
    "token-ids": "prompt_ids / response_ids",
    "messages": "messages (list of {role, content})",
    "conversational-completion": "prompt + completion as message lists",
    "prompt-completion": "prompt + completion strings",
    "prompt-response": "prompt + response strings",
    "text": "text",
}

#: Fields of a tokenized row that mark its loss tokens, in the order they are read.
MASK_FIELDS: tuple[str, ...] = ("completion_mask", "assistant_masks", "labels")


def is_message_list(value: Any) -> bool:
    """Whether ``value`` is a conversation: a non-empty list of mappings with a ``"role"``."""
    return (
        isinstance(value, (list, tuple))
        and len(value) > 0
        and all(isinstance(m, Mapping) and "role" in m for m in value)
    )


def lm_format(
    record: Mapping[str, Any], *, prompt_field: str = "prompt", response_field: str = "response"
) -> LMFormat | None:
    """The format of one record (table in the module docstring), or ``None`` when it is in none.

    Args:
        record: one example.
        prompt_field / response_field: the field names of the ``"prompt-response"`` format
            (:class:`~datainf.tasks.CausalLMConfig`'s).
    """
    if "input_ids" in record and any(f in record for f in MASK_FIELDS):
        return "tokenized"
    if "prompt_ids" in record or "response_ids" in record:
        return "token-ids"
    if "messages" in record:
        return "messages"
    if "completion" in record and response_field not in record:
        if is_message_list(record.get("completion")) or is_message_list(record.get("prompt")):
            return "conversational-completion"
        return "prompt-completion"
    if prompt_field in record or response_field in record:
        return "prompt-response"
    if "text" in record:
        return "text"
    return None


def describe_lm_formats() -> str:
    """The formats for messages: ``"tokenized (input_ids + labels ...), token-ids (...), ..."``."""
    return "; ".join(f"{name} ({fields})" for name, fields in LM_FORMATS.items())


def _restarts(position_ids: Any) -> bool:
    values = list(position_ids)
    return any(int(v) == 0 for v in values[1:]) if values and not isinstance(values[0], (list, tuple)) else False


def check_not_packed(records: Sequence[Mapping[str, Any]], ids: Sequence[str]) -> None:
    """Refuse packed rows (several examples concatenated into one sequence).

    A row is packed when it holds ``seq_lengths`` with more than one length, or ``position_ids``
    that restart at 0 inside the row (TRL's ``packing=True`` with ``padding_free``).

    Raises:
        DatasetError: naming the packed rows' ids.
    """
    packed: list[str] = []
    for record, ex_id in zip(records, ids):
        lengths = record.get("seq_lengths")
        several = lengths is not None and len(list(lengths)) > 1
        if several or (record.get("position_ids") is not None and _restarts(record["position_ids"])):
            packed.append(str(ex_id))
    if packed:
        shown = ", ".join(repr(i) for i in packed[:10]) + (f" and {len(packed) - 10} more" if len(packed) > 10 else "")
        raise DatasetError(
            f"{len(packed)} row(s) are packed (several examples concatenated into one sequence: seq_lengths or "
            f"restarting position_ids), e.g. ids {shown}. Influence needs one example per row: pass the dataset "
            "before packing (TRL: SFTConfig(packing=False), or the raw messages / prompt-completion records)."
        )


def to_trl_records(records: Sequence[Mapping[str, Any]], fmt: str) -> list[dict[str, Any]]:
    """datainf's ``{"id", "prompt", "response", ...}`` records rewritten in one of TRL's formats.

    ``fmt``: ``"messages"`` (a user turn and an assistant turn), ``"conversational-completion"``
    (``prompt`` = the user turn, ``completion`` = the assistant turn) or ``"prompt-completion"``
    (the same strings under ``completion``). Other fields are kept. Responses are stripped of the
    leading space of :mod:`datainf.data.generation` in the conversational formats (the chat
    template separates the turns).

    Raises:
        DatasetError: unknown ``fmt``.
    """
    out: list[dict[str, Any]] = []
    for r in records:
        rest = {k: v for k, v in r.items() if k not in ("prompt", "response")}
        prompt, response = str(r.get("prompt") or ""), str(r.get("response") or "")
        if fmt == "messages":
            rest["messages"] = [
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": response.strip()},
            ]
        elif fmt == "conversational-completion":
            rest["prompt"] = [{"role": "user", "content": prompt}]
            rest["completion"] = [{"role": "assistant", "content": response.strip()}]
        elif fmt == "prompt-completion":
            rest["prompt"], rest["completion"] = prompt, response
        else:
            raise DatasetError(
                f"Unknown TRL format {fmt!r}; use 'messages', 'conversational-completion' or 'prompt-completion'."
            )
        out.append(rest)
    return out

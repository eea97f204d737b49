"""Causal language modelling: the mean NLL of each example's response tokens (docs/gradients.md section 4.3)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from datainf.data.formats import MASK_FIELDS, check_not_packed, describe_lm_formats, is_message_list, lm_format
from datainf.errors import ConfigError, DatasetError, TaskInputError
from datainf.tasks.base import TaskBatch, _as_token_list, _list_ids, _pad, _TextTask, _upcast

__all__ = ["CausalLMConfig", "CausalLMTask", "training_records"]

_GENERATION_TAG = re.compile(r"{%-?\s*generation\s*-?%}")


@dataclass
class CausalLMConfig:
    """Knobs of :class:`CausalLMTask`.

    Attributes:
        prompt_field: record key of the prompt text (or pre-tokenized ``prompt_ids``).
        response_field: record key of the response text (or pre-tokenized ``response_ids``).
        loss_on: ``"response"`` (default): mean NLL of the response tokens only, prompt and padding
            masked out; ``"all"``: mean NLL of every non-padding token after the first.
        max_length: longest sequence (prompt + response); longer ones are cut from the right
            (counted, reported as a warning). ``None``: the model's / tokenizer's limit.
        append_eos: end the response with the tokenizer's EOS token (when it has one).
        pad_token_id: padding id when the tokenizer has none (any id works: padding is masked).
    """

    prompt_field: str = "prompt"
    response_field: str = "response"
    loss_on: Literal["response", "all"] = "response"
    max_length: int | None = None
    append_eos: bool = True
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.loss_on not in ("response", "all"):
            raise ConfigError(f"loss_on={self.loss_on!r}; use 'response' or 'all'.")
        if self.max_length is not None and self.max_length < 2:
            raise ConfigError(f"max_length={self.max_length} is too short; use at least 2 tokens (or None).")


class CausalLMTask(_TextTask):
    """Causal language modelling: ``l_i`` = mean over example ``i``'s loss tokens of ``-log p(token | prefix)``.

    Reduction: the NLL of each predicted token is averaged over that example's own loss tokens
    (HF's per-sequence default), never over the batch. Loss tokens are the response tokens
    (``loss_on="response"``: prompt and padding masked out) or every non-padding token after the
    first (``loss_on="all"``). Sequences are right-padded with an ``attention_mask``, so an example's
    logits do not depend on the other examples in its batch.

    Records (:mod:`datainf.data.formats` detects which, record by record):

    - ``{"prompt": str, "response": str}`` (field names configurable) and TRL's standard
      ``{"prompt": str, "completion": str}``: the prompt is tokenized with the tokenizer's special
      tokens (e.g. BOS), the response / completion without, followed by EOS (``append_eos``); the
      loss tokens are the response's.
    - TRL's conversational ``{"messages": [{"role", "content"}, ...]}``: the tokenizer's chat
      template renders the conversation; the loss tokens are the assistant turns (the template's
      ``{% generation %}`` spans when it has them, else each assistant turn's tokens found by
      rendering the conversation up to it), every other token is masked.
    - TRL's conversational prompt-completion ``{"prompt": [messages], "completion": [messages]}``:
      the loss tokens are those of the completion (the render of prompt + completion beyond the
      render of the prompt with the generation prompt).
    - TRL's standard language modelling ``{"text": str}``: every token after the first.
    - pre-tokenized ``{"prompt_ids": list[int], "response_ids": list[int]}``, or a row a trainer
      tokenized, ``{"input_ids", "labels"}`` (``-100`` = masked) / ``{"input_ids",
      "completion_mask" | "assistant_masks"}``.

    Packed rows (several examples in one sequence) are refused.

    Args:
        tokenizer: a Hugging Face tokenizer (needed for text records).
        config: a :class:`CausalLMConfig`.
    """

    def __init__(self, tokenizer: Any = None, config: CausalLMConfig | None = None) -> None:
        self.tokenizer = tokenizer
        self.config = config or CausalLMConfig()
        self._max_length: int | None = None
        self._keep_logits: bool | None = None  # whether the model takes logits_to_keep (None: not tried yet)
        self._cut_away: list[str] = []  # ids whose loss tokens the length limit removed (last encoding)

    def describe(self) -> str:
        # unchanged by the chat formats (store fingerprints and cache keys stay those of earlier versions): a
        # changed chat template under the same tokenizer name is not detected by a store's resume check
        return f"{super().describe()}|tokenizer={self._tokenizer_name()}"

    def _encode(self, example: Mapping[str, Any], ex_id: str) -> tuple[list[int], list[int]]:
        """``(token ids, loss-mask)`` before truncation; the mask marks tokens that count in the loss.

        Dispatches on the record's format (:func:`datainf.data.formats.lm_format`)."""
        cfg = self.config
        fmt = lm_format(example, prompt_field=cfg.prompt_field, response_field=cfg.response_field)
        if fmt is None:
            raise self._format_error([example], [ex_id])
        if fmt == "tokenized":
            return self._encode_tokenized(example, ex_id)
        if fmt in ("messages", "conversational-completion"):
            return self._encode_chat(example, ex_id, fmt)
        if fmt == "token-ids":
            prompt = _as_token_list(example.get("prompt_ids", []), "prompt_ids", ex_id)
            response = _as_token_list(example.get("response_ids", []), "response_ids", ex_id)
        else:
            self._need_tokenizer(ex_id)
            if fmt == "text":
                prompt, response = [], self._text_ids(str(example.get("text") or ""), special=True)
            else:
                prompt_field = cfg.prompt_field if fmt == "prompt-response" else "prompt"
                response_field = cfg.response_field if fmt == "prompt-response" else "completion"
                prompt_text = example.get(prompt_field)
                response_text = example.get(response_field)
                prompt = self._text_ids(str(prompt_text or ""), special=True)
                response = self._text_ids(str(response_text), special=False) if response_text else []
            eos = getattr(self.tokenizer, "eos_token_id", None)
            if cfg.append_eos and eos is not None and response:
                response.append(int(eos))
        tokens = prompt + response
        if cfg.loss_on == "response":
            mask = [0] * len(prompt) + [1] * len(response)
        else:
            mask = [1] * len(tokens)
        return tokens, mask

    def _need_tokenizer(self, ex_id: str) -> None:
        if self.tokenizer is None:
            raise TaskInputError(
                f"Example {ex_id!r} holds text but the task has no tokenizer; pass tokenizer=... or "
                "pre-tokenized prompt_ids/response_ids."
            )

    def _text_ids(self, text: str, *, special: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def _format_error(self, examples: Sequence[Mapping[str, Any]], ids: Sequence[str]) -> TaskInputError:
        found = sorted({str(k) for ex in examples for k in ex if k != "id"})
        cfg = self.config
        names = (
            ""
            if (cfg.prompt_field, cfg.response_field) == ("prompt", "response")
            else f" (prompt-response reads {cfg.prompt_field!r} / {cfg.response_field!r} here)"
        )
        return TaskInputError(
            f"{len(examples)} example(s) are in none of the causal-LM formats: {_list_ids(list(ids))}. Fields found: "
            f"{found}. Formats read: {describe_lm_formats()}{names}. Rename the columns "
            "(datainf.data.load_records(path, columns={'prompt': '<column>', 'response': '<column>'}); CLI: "
            "--prompt-column / --response-column) or convert the records to one of these formats."
        )

    def _encode_tokenized(self, example: Mapping[str, Any], ex_id: str) -> tuple[list[int], list[int]]:
        """A row tokenised by a trainer: ``input_ids`` and a mask (``completion_mask`` /
        ``assistant_masks``: 1 = loss token) or HF ``labels`` (-100 = masked, otherwise the token itself)."""
        tokens = _as_token_list(example["input_ids"], "input_ids", ex_id)
        field_name = next(f for f in MASK_FIELDS if f in example)
        values = _as_token_list(example[field_name], field_name, ex_id)
        if len(values) != len(tokens):
            raise TaskInputError(
                f"Example {ex_id!r}: {field_name} has {len(values)} entries but input_ids {len(tokens)}; they must "
                "align token by token."
            )
        if field_name == "labels":
            wrong = [t for t, (tok, lab) in enumerate(zip(tokens, values)) if lab != -100 and lab != tok]
            if wrong:
                raise TaskInputError(
                    f"Example {ex_id!r}: labels differ from input_ids at positions {wrong[:5]} (neither -100 nor the "
                    "token). datainf reads causal-LM labels as input_ids with masked positions set to -100 (the "
                    "model shifts them); pass such labels, or a completion_mask."
                )
            mask = [0 if lab == -100 else 1 for lab in values]
        else:
            mask = [1 if v else 0 for v in values]
        if self.config.loss_on == "all":
            mask = [1] * len(tokens)
        return tokens, mask

    def _chat_ids(self, messages: Sequence[Mapping[str, Any]], ex_id: str, *, generation_prompt: bool) -> list[int]:
        """Token ids of ``messages`` rendered by the tokenizer's chat template."""
        out = self.tokenizer.apply_chat_template(
            list(messages), tokenize=True, add_generation_prompt=generation_prompt, return_dict=True
        )
        ids = out["input_ids"] if isinstance(out, Mapping) or hasattr(out, "keys") else out
        return [int(t) for t in ids]

    def _check_chat(self, ex_id: str, fmt: str) -> None:
        self._need_tokenizer(ex_id)
        if not getattr(self.tokenizer, "chat_template", None):
            raise TaskInputError(
                f"Example {ex_id!r} is a conversation ({fmt}), but the tokenizer "
                f"({self._tokenizer_name()}) has no chat template. Use the tokenizer the model was fine-tuned with "
                "(its folder holds chat_template.jinja or a chat_template entry in tokenizer_config.json), set "
                "tokenizer.chat_template = '<jinja template>' before building the task, or convert the records to "
                "prompt/response strings."
            )

    def _encode_chat(self, example: Mapping[str, Any], ex_id: str, fmt: str) -> tuple[list[int], list[int]]:
        """A conversation through the chat template.

        ``"messages"``: the loss tokens are the assistant turns. Their spans come from the template's
        ``{% generation %}`` markers when it has them (``return_assistant_tokens_mask``), otherwise
        from prefix renders: the tokens of ``messages[:i + 1]`` beyond those of ``messages[:i]`` with
        the generation prompt are assistant turn ``i`` (its content and end-of-turn tokens).
        ``"conversational-completion"``: the tokens of ``prompt + completion`` beyond those of
        ``prompt`` with the generation prompt (TRL's completion mask).
        """
        self._check_chat(ex_id, fmt)
        if fmt == "messages":
            messages = example["messages"]
            if not is_message_list(messages):
                raise TaskInputError(
                    f"Example {ex_id!r}: 'messages' must be a list of {{'role', 'content'}} dicts, got "
                    f"{type(messages).__name__}."
                )
            tokens = self._chat_ids(messages, ex_id, generation_prompt=False)
            if self.config.loss_on == "all":
                return tokens, [1] * len(tokens)
            return tokens, self._assistant_mask(messages, tokens, ex_id)
        prompt: Any = example.get("prompt")
        completion: Any = example.get("completion")
        if not (is_message_list(prompt) and is_message_list(completion)):
            raise TaskInputError(
                f"Example {ex_id!r}: conversational prompt-completion needs 'prompt' and 'completion' both as lists "
                f"of {{'role', 'content'}} dicts (got {type(prompt).__name__} and {type(completion).__name__}); "
                "for plain text give both as strings."
            )
        head = self._chat_ids(prompt, ex_id, generation_prompt=True)
        tokens = self._chat_ids([*prompt, *completion], ex_id, generation_prompt=False)
        self._check_prefix(head, tokens, ex_id, "the prompt")
        if self.config.loss_on == "all":
            return tokens, [1] * len(tokens)
        return tokens, [0] * len(head) + [1] * (len(tokens) - len(head))

    def _check_prefix(self, head: list[int], tokens: list[int], ex_id: str, what: str) -> None:
        if tokens[: len(head)] != head:
            raise TaskInputError(
                f"Example {ex_id!r}: the chat template renders {what} differently on its own than inside the whole "
                "conversation, so the assistant tokens cannot be told apart. Add {% generation %} ... "
                "{% endgeneration %} markers around the assistant turns of the template, or give prompt/response "
                "strings."
            )

    def _assistant_mask(self, messages: Sequence[Mapping[str, Any]], tokens: list[int], ex_id: str) -> list[int]:
        template = str(getattr(self.tokenizer, "chat_template", "") or "")
        if _GENERATION_TAG.search(template):
            out = self.tokenizer.apply_chat_template(
                list(messages), tokenize=True, return_dict=True, return_assistant_tokens_mask=True
            )
            mask = [1 if int(v) else 0 for v in out["assistant_masks"]]
            if len(mask) != len(tokens):
                raise TaskInputError(
                    f"Example {ex_id!r}: the chat template's assistant mask has {len(mask)} entries for "
                    f"{len(tokens)} tokens."
                )
            return mask
        mask = [0] * len(tokens)
        for i, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            head = self._chat_ids(messages[:i], ex_id, generation_prompt=True) if i else []
            upto = self._chat_ids(messages[: i + 1], ex_id, generation_prompt=False)
            self._check_prefix(head, upto, ex_id, f"the turns before message {i}")
            self._check_prefix(upto, tokens, ex_id, f"the turns up to message {i}")
            for t in range(len(head), len(upto)):
                mask[t] = 1
        return mask

    def _encode_all(
        self, examples: Sequence[Mapping[str, Any]], ids: Sequence[str]
    ) -> tuple[list[list[int]], list[list[int]], list[str], list[str]]:
        limit = self.max_length
        rows: list[list[int]] = []
        masks: list[list[int]] = []
        truncated: list[str] = []
        empty: list[str] = []
        cut_away: list[str] = []
        for ex, ex_id in zip(examples, ids):
            tokens, mask = self._encode(ex, ex_id)
            had_loss = sum(mask[1:]) > 0
            if limit is not None and len(tokens) > limit:
                tokens, mask = tokens[:limit], mask[:limit]
                truncated.append(ex_id)
            if sum(mask[1:]) == 0:  # position 0 is never predicted
                empty.append(ex_id)
                if had_loss:
                    cut_away.append(ex_id)
            rows.append(tokens)
            masks.append(mask)
        self._cut_away = cut_away
        return rows, masks, truncated, empty

    def _empty_error(self, empty: Sequence[str]) -> TaskInputError:
        what = "response tokens" if self.config.loss_on == "response" else "tokens after the first"
        cut = [i for i in getattr(self, "_cut_away", []) if i in set(empty)]
        detail = (
            f" For {len(cut)} of them ({_list_ids(cut)}) the length limit of {self.max_length} tokens cut the whole "
            "response away (the prompt fills the limit)."
            if cut
            else ""
        )
        return TaskInputError(
            f"{len(empty)} example(s) have no {what} left to score after masking and truncation to "
            f"{self.max_length} tokens: {_list_ids(empty)}.{detail} Give them a non-empty response, shorten the prompt, "
            "or raise max_length."
        )

    def validate(self, examples: Sequence[Mapping[str, Any]], ids: Sequence[str]) -> None:
        """Every example must be in a known format (:mod:`datainf.data.formats`), not packed, and keep
        at least one loss token after masking and truncation.

        Raises:
            TaskInputError: examples in none of the formats (the fields found and the formats read are
                named), a conversation without a chat template, examples with no loss token left (the
                ones the length limit cut the response away from are named).
            DatasetError: packed rows.
        """
        cfg = self.config
        unknown = [
            i
            for i, ex in enumerate(examples)
            if lm_format(ex, prompt_field=cfg.prompt_field, response_field=cfg.response_field) is None
        ]
        if unknown:
            raise self._format_error([examples[i] for i in unknown], [str(ids[i]) for i in unknown])
        check_not_packed(examples, ids)
        empty: list[str] = []
        cut: list[str] = []
        for start in range(0, len(examples), 256):
            _, _, _, bad = self._encode_all(examples[start : start + 256], ids[start : start + 256])
            empty.extend(bad)
            cut.extend(self._cut_away)
        self._cut_away = cut
        if empty:
            raise self._empty_error(empty)

    def _pad_id(self) -> int:
        for value in (
            getattr(self.tokenizer, "pad_token_id", None),
            self.config.pad_token_id,
            getattr(self.tokenizer, "eos_token_id", None),
        ):
            if value is not None:
                return int(value)
        return 0

    def collate(self, examples: Sequence[Mapping[str, Any]], ids: Sequence[str]) -> TaskBatch:
        """Tokenize prompt + response, truncate, right-pad.

        Returns:
            ``inputs``: ``input_ids`` (b, s), ``attention_mask`` (b, s), ``loss_mask`` (b, s) (1 on
            tokens whose prediction counts).
        """
        ids = [str(i) for i in ids]
        rows, masks, truncated, empty = self._encode_all(examples, ids)
        if empty:
            raise self._empty_error(empty)
        input_ids, attention = _pad(rows, self._pad_id())
        loss_mask, _ = _pad(masks, 0)
        return TaskBatch(
            ids=ids,
            inputs={"input_ids": input_ids, "attention_mask": attention, "loss_mask": loss_mask},
            truncated_ids=truncated,
        )

    def per_example_loss(self, model: nn.Module, batch: TaskBatch) -> torch.Tensor:
        """``(b,)`` mean next-token NLL over each example's loss tokens.

        Token ``t`` (``t >= 1``) is predicted from the logits at position ``t - 1``; only positions with
        ``loss_mask[:, t] == 1`` count, and each example's sum is divided by its own count.
        """
        input_ids = batch.inputs["input_ids"]
        loss_mask = batch.inputs["loss_mask"]
        select = loss_mask[:, 1:].bool()  # (b, s-1)
        counts = select.sum(dim=1)
        if bool((counts == 0).any()):
            raise self._empty_error([batch.ids[i] for i in torch.nonzero(counts == 0).flatten().tolist()])
        targets = input_ids[:, 1:][select]  # (M,)
        rows = torch.nonzero(select)[:, 0]
        picked = self._scored_logits(model, batch, select, counts)  # (M, V)
        nll = F.cross_entropy(_upcast(picked), targets, reduction="none")  # (M,)
        total = torch.zeros(len(batch), dtype=nll.dtype, device=nll.device).index_add(0, rows, nll)
        return total / counts.to(total.dtype)

    def _scored_logits(
        self, model: nn.Module, batch: TaskBatch, select: torch.Tensor, counts: torch.Tensor
    ) -> torch.Tensor:
        """``(M, V)`` logits of the scored positions, in the row-major order of ``select`` ``(b, s-1)``.

        Models that accept Hugging Face's ``logits_to_keep`` (BERT, GPT-2, Llama, ... in transformers
        5) get a ``(b, K)`` tensor of positions, ``K`` = the most scored tokens of any example (shorter
        rows repeat their last position; the repeats are dropped here), so the vocabulary projection
        runs on ``b * K`` positions instead of ``b * s``: with short responses after long prompts that
        is most of a training step. Each example keeps its own row, so per-example gradient hooks on
        the LM head still see ``(b, K, h)`` inputs, and an example's logits do not depend on its batch.
        Other models are run in full and sliced here.
        """
        input_ids = batch.inputs["input_ids"]
        attention = batch.inputs["attention_mask"]
        if self._keep_logits is not False:
            k = int(counts.max())
            order = torch.arange(select.shape[1], device=select.device).expand_as(select)
            # positions t-1 whose next token t is scored, in order, padded with the row's last one
            ranked = torch.where(select, order, torch.full_like(order, select.shape[1]))
            positions = ranked.sort(dim=1).values[:, :k]
            last = positions.gather(1, (counts - 1).clamp(min=0)[:, None])
            valid = torch.arange(k, device=select.device)[None, :] < counts[:, None]  # (b, K)
            positions = torch.where(valid, positions, last)
            try:
                logits = model(input_ids=input_ids, attention_mask=attention, logits_to_keep=positions).logits
            except TypeError:
                self._keep_logits = False
            else:
                if logits.dim() == 3 and tuple(logits.shape[:2]) == tuple(positions.shape):
                    self._keep_logits = True
                    return logits[valid]
                if logits.dim() == 3 and tuple(logits.shape[:2]) == tuple(input_ids.shape):
                    self._keep_logits = False  # the model ignored logits_to_keep
                    return logits[:, :-1][select]
                raise TaskInputError(
                    f"The model returned logits of shape {tuple(logits.shape)}; causal LM needs (b, s, V). "
                    "Use an AutoModelForCausalLM model."
                )
        logits = model(input_ids=input_ids, attention_mask=attention).logits  # (b, s, V)
        if logits.dim() != 3:
            raise TaskInputError(
                f"The model returned logits of shape {tuple(logits.shape)}; causal LM needs (b, s, V). "
                "Use an AutoModelForCausalLM model."
            )
        return logits[:, :-1][select]  # (M, V): only the scored positions


def training_records(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Fine-tuning records, ids as strings: ``{"id", "prompt", "response"}`` strings (a missing prompt
    is ``""``) for prompt/response records, and the record's own fields for the other formats of
    :mod:`datainf.data.formats` (TRL's ``messages``, ``prompt``/``completion``, ``text``, tokenized rows).

    Raises:
        DatasetError: a prompt/response record has no (or an empty) ``"response"``; a record is in none
            of the formats (the fields found and the formats read are named); packed rows.
    """
    ids = [str(r.get("id", i)) for i, r in enumerate(records)]
    formats = [lm_format(r) for r in records]
    unknown = [i for i, f in zip(ids, formats) if f is None]
    if unknown:
        found = sorted({str(k) for r, f in zip(records, formats) if f is None for k in r if k != "id"})
        raise DatasetError(
            f"{len(unknown)} training record(s) are in none of the causal-LM formats, e.g. ids {unknown[:5]}. Fields "
            f"found: {found}. Formats read: {describe_lm_formats()}. Map the file's columns to 'prompt' and "
            "'response' (datainf.data.load_records(path, columns={'prompt': '<column>', 'response': '<column>'})) "
            "or convert the records."
        )
    check_not_packed(records, ids)
    bad = [i for i, r, f in zip(ids, records, formats) if f == "prompt-response" and not r.get("response")]
    if bad:
        raise DatasetError(
            f"{len(bad)} training record(s) have no (or an empty) 'response', e.g. ids {bad[:5]}. Causal-LM fine-tuning "
            "needs prompt/response pairs; map the file's columns to 'prompt' and 'response' "
            "(datainf.data.load_records(path, columns={'prompt': '<column>', 'response': '<column>'}))."
        )
    out: list[dict[str, Any]] = []
    for ex_id, r, f in zip(ids, records, formats):
        if f == "prompt-response":
            out.append({"id": ex_id, "prompt": str(r.get("prompt") or ""), "response": str(r["response"])})
        else:
            out.append({**{k: v for k, v in r.items() if k != "id"}, "id": ex_id})
    return out

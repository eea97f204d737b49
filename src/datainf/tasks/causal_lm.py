"""Causal language modelling: the mean NLL of each example's response tokens (docs/gradients.md section 4.3)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from datainf.errors import ConfigError, DatasetError, TaskInputError
from datainf.tasks.base import TaskBatch, _as_token_list, _list_ids, _pad, _TextTask, _upcast

__all__ = ["CausalLMConfig", "CausalLMTask", "training_records"]


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

    Records: ``{"prompt": str, "response": str}`` (field names configurable), or pre-tokenized
    ``{"prompt_ids": list[int], "response_ids": list[int]}``. The prompt is tokenized with the
    tokenizer's special tokens (e.g. BOS), the response without, followed by EOS (``append_eos``).

    Args:
        tokenizer: a Hugging Face tokenizer (needed for text records).
        config: a :class:`CausalLMConfig`.
    """

    def __init__(self, tokenizer: Any = None, config: CausalLMConfig | None = None) -> None:
        self.tokenizer = tokenizer
        self.config = config or CausalLMConfig()
        self._max_length: int | None = None
        self._keep_logits: bool | None = None  # whether the model takes logits_to_keep (None: not tried yet)

    def describe(self) -> str:
        return f"{super().describe()}|tokenizer={self._tokenizer_name()}"

    def _encode(self, example: Mapping[str, Any], ex_id: str) -> tuple[list[int], list[int]]:
        """``(token ids, loss-mask)`` before truncation; the mask marks tokens that count in the loss."""
        cfg = self.config
        if "prompt_ids" in example or "response_ids" in example:
            prompt = _as_token_list(example.get("prompt_ids", []), "prompt_ids", ex_id)
            response = _as_token_list(example.get("response_ids", []), "response_ids", ex_id)
        else:
            if self.tokenizer is None:
                raise TaskInputError(
                    f"Example {ex_id!r} holds text but the task has no tokenizer; pass tokenizer=... or "
                    "pre-tokenized prompt_ids/response_ids."
                )
            if cfg.prompt_field not in example and cfg.response_field not in example:
                raise TaskInputError(
                    f"Example {ex_id!r} has neither {cfg.prompt_field!r} nor {cfg.response_field!r}; "
                    "records need a prompt and a response."
                )
            prompt_text = example.get(cfg.prompt_field)
            response_text = example.get(cfg.response_field)
            prompt = list(self.tokenizer(str(prompt_text or ""), add_special_tokens=True)["input_ids"])
            response = (
                list(self.tokenizer(str(response_text), add_special_tokens=False)["input_ids"]) if response_text else []
            )
            eos = getattr(self.tokenizer, "eos_token_id", None)
            if cfg.append_eos and eos is not None and response:
                response.append(int(eos))
        tokens = prompt + response
        if cfg.loss_on == "response":
            mask = [0] * len(prompt) + [1] * len(response)
        else:
            mask = [1] * len(tokens)
        return tokens, mask

    def _encode_all(
        self, examples: Sequence[Mapping[str, Any]], ids: Sequence[str]
    ) -> tuple[list[list[int]], list[list[int]], list[str], list[str]]:
        limit = self.max_length
        rows: list[list[int]] = []
        masks: list[list[int]] = []
        truncated: list[str] = []
        empty: list[str] = []
        for ex, ex_id in zip(examples, ids):
            tokens, mask = self._encode(ex, ex_id)
            if limit is not None and len(tokens) > limit:
                tokens, mask = tokens[:limit], mask[:limit]
                truncated.append(ex_id)
            if sum(mask[1:]) == 0:  # position 0 is never predicted
                empty.append(ex_id)
            rows.append(tokens)
            masks.append(mask)
        return rows, masks, truncated, empty

    def _empty_error(self, empty: Sequence[str]) -> TaskInputError:
        what = "response tokens" if self.config.loss_on == "response" else "tokens after the first"
        return TaskInputError(
            f"{len(empty)} example(s) have no {what} left to score after masking and truncation to "
            f"{self.max_length} tokens: {_list_ids(empty)}. Give them a non-empty response, shorten the prompt, "
            "or raise max_length."
        )

    def validate(self, examples: Sequence[Mapping[str, Any]], ids: Sequence[str]) -> None:
        """Every example must keep at least one loss token after masking and truncation."""
        empty: list[str] = []
        for start in range(0, len(examples), 256):
            _, _, _, bad = self._encode_all(examples[start : start + 256], ids[start : start + 256])
            empty.extend(bad)
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
    """Fine-tuning records ``{"id", "prompt", "response"}`` as strings (a missing prompt is ``""``).

    Raises:
        DatasetError: a record has no (or an empty) ``"response"``.
    """
    bad = [str(r.get("id", i)) for i, r in enumerate(records) if not r.get("response")]
    if bad:
        raise DatasetError(
            f"{len(bad)} training record(s) have no (or an empty) 'response', e.g. ids {bad[:5]}. Causal-LM fine-tuning "
            "needs prompt/response pairs; map the file's columns to 'prompt' and 'response' "
            "(datainf.data.load_records(path, columns={'prompt': '<column>', 'response': '<column>'}))."
        )
    return [
        {"id": str(r.get("id", i)), "prompt": str(r.get("prompt") or ""), "response": str(r["response"])}
        for i, r in enumerate(records)
    ]

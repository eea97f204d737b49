"""Tiny random Hugging Face models saved to disk with a BERT word-piece tokenizer (seconds, no downloads)."""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = [
    "the",
    "a",
    "cat",
    "dog",
    "sat",
    "on",
    "mat",
    "movie",
    "is",
    "was",
    "very",
    "not",
    "good",
    "great",
    "fine",
    "bad",
    "awful",
    "poor",
]
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
INIT_RANGE = 0.2


def save_tiny_model(
    path: Path, *, hidden: int = 16, layers: int = 2, seed: int = 0, kind: str = "bert", num_labels: int = 2
) -> Path:
    """Save a tiny random model and its tokenizer with ``save_pretrained`` into ``path``.

    ``kind="bert"``: ``BertForSequenceClassification`` with ``num_labels`` outputs; ``kind="gpt2"``:
    ``GPT2LMHeadModel``. Both use the vocabulary ``SPECIAL_TOKENS + WORDS``.
    """
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer, GPT2Config, GPT2LMHeadModel

    vocab = {w: i for i, w in enumerate(SPECIAL_TOKENS + WORDS)}
    torch.manual_seed(seed)
    if kind == "bert":
        config = BertConfig(
            vocab_size=len(vocab),
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=2,
            intermediate_size=2 * hidden,
            max_position_embeddings=64,
            num_labels=num_labels,
            initializer_range=INIT_RANGE,
        )
        model = BertForSequenceClassification(config)
    else:
        config = GPT2Config(
            vocab_size=len(vocab),
            n_embd=hidden,
            n_layer=layers,
            n_head=2,
            n_positions=64,
            bos_token_id=2,
            eos_token_id=3,
        )
        model = GPT2LMHeadModel(config)
    model.save_pretrained(str(path))
    BertTokenizer(vocab=vocab).save_pretrained(str(path))
    return path

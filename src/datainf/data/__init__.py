"""Datasets for datainf: user files, the BBC News corpus, generated text tasks and MNIST images.

Every loader returns *records*: plain ``list[dict[str, Any]]`` with a unique string ``"id"`` on each
record.

- :mod:`datainf.data.tabular`: :func:`load_records` (JSONL, JSON, CSV/TSV, Parquet, saved HF
  datasets) and :func:`encode_labels`;
- :mod:`datainf.data.labels`: :class:`LabelEncoder`, class labels <-> class ids (used by
  fine-tuning, gradients, scoring and the classification task);
- :mod:`datainf.data.bbc`: :func:`load_bbc_news` and :func:`make_noisy_split` (flipped labels for
  mislabeled-data detection);
- :mod:`datainf.data.generation`: :func:`make_generation_dataset` (the paper's sentence
  transformation and math word-problem tasks);
- :mod:`datainf.data.images`: MNIST-based style and subject datasets for the diffusion experiments.
"""

from __future__ import annotations

from datainf.data.bbc import NoisySplit, bbc_news_dir, load_bbc_news, make_noisy_split
from datainf.data.generation import (
    GENERATION_TASKS,
    MATH_TEMPLATES,
    SENTENCE_RULES,
    GenerationDataset,
    MathTemplate,
    SentenceRule,
    apply_rule,
    make_generation_dataset,
    render_math,
    sentence_prompt,
)
from datainf.data.images import (
    DIGIT_WORDS,
    STYLE_NAMES,
    DigitImages,
    ImageDataset,
    apply_style,
    load_mnist_digits,
    make_style_dataset,
    make_subject_dataset,
    pad_to_32,
    stack_pixel_values,
    subject_tokens,
)
from datainf.data.labels import LabelEncoder
from datainf.data.tabular import SUPPORTED_FORMATS, MissingColumnsError, encode_labels, load_records

__all__ = [
    # tabular
    "SUPPORTED_FORMATS",
    "MissingColumnsError",
    "load_records",
    "encode_labels",
    # labels
    "LabelEncoder",
    # bbc
    "NoisySplit",
    "bbc_news_dir",
    "load_bbc_news",
    "make_noisy_split",
    # generation
    "GENERATION_TASKS",
    "SENTENCE_RULES",
    "MATH_TEMPLATES",
    "SentenceRule",
    "MathTemplate",
    "GenerationDataset",
    "apply_rule",
    "sentence_prompt",
    "render_math",
    "make_generation_dataset",
    # images
    "DIGIT_WORDS",
    "STYLE_NAMES",
    "DigitImages",
    "ImageDataset",
    "load_mnist_digits",
    "pad_to_32",
    "apply_style",
    "make_style_dataset",
    "make_subject_dataset",
    "subject_tokens",
    "stack_pixel_values",
]

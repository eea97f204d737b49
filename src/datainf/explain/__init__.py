"""Explaining generations: which training examples drove a LoRA-tuned model's answer or image.

* :mod:`datainf.explain.common` - the result record and the pairwise scoring + class metrics step;
* :mod:`datainf.explain.text_generation` - causal-LM fine-tune on the paper's text tasks;
* :mod:`datainf.explain.text_to_image` - a small text-conditioned UNet with LoRA on its attention;
* :mod:`datainf.explain.toy_diffusion` - the toy text-to-image stack it runs on (prompt encoder, base
  UNet build/train, sampling);
* :mod:`datainf.explain.generated_images` - a user's diffusers pipeline + LoRA: generate a prompt and
  show the training images that helped and harmed the generated image most (``explain_images``).
"""

from datainf.explain.common import (
    GENERATION_METHODS,
    ExplanationResult,
    class_indices,
    format_generation_table,
    score_and_evaluate,
)

__all__ = ["ExplanationResult", "score_and_evaluate", "class_indices", "format_generation_table", "GENERATION_METHODS"]

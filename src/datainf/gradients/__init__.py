"""Per-example LoRA gradients for transformers and diffusers models, in one batched pass.

* :func:`collect_gradients` -- every example's gradient of every block into a ``GradientStore``.
* :func:`collect_kronecker_factors` -- the Kronecker factors of ``kfac`` / ``ekfac`` alone (no store).
* Tasks (what the per-example loss is, defined in :mod:`datainf.tasks` and re-exported here):
  :class:`SequenceClassificationTask`, :class:`CausalLMTask`, :class:`DiffusionTask`, or your own
  :class:`GradientTask`.
* :class:`OnTheFlyGradients` -- the same gradients recomputed on every pass (no store on disk),
  usable as ``train`` in :func:`datainf.influence`.
* :class:`ProjectionConfig` -- seeded random sketches of every block instead of the block
  (``projection=`` of both; :mod:`datainf.gradients.projection`).
* :func:`find_lora_blocks` -- discovery and validation of the adapter's trainable tensors.
* :class:`PerExampleGradients` -- the hook machinery (one forward, one backward per batch).

Check the fast path on your own model with :func:`datainf.testing.check_per_example_gradients`.
"""

from datainf.gradients.collect import collect_gradients, collect_kronecker_factors
from datainf.gradients.hooks import PerExampleGradients, row_block_name, split_block_dims
from datainf.gradients.lora import GradientBlock, LoRABlocks, find_lora_blocks, gradient_mode, model_fingerprint
from datainf.gradients.projection import GradientProjector, ProjectionConfig
from datainf.gradients.records import dataset_fingerprint, example_ids, gradient_fingerprint
from datainf.gradients.session import batch_gradients
from datainf.gradients.source import OnTheFlyGradients
from datainf.tasks import (
    DEFAULT_DIFFUSION_TIMESTEPS,
    CausalLMConfig,
    CausalLMTask,
    DiffusionTask,
    DiffusionTaskConfig,
    GradientTask,
    SequenceClassificationConfig,
    SequenceClassificationTask,
    TaskBatch,
)

__all__ = [
    "collect_gradients",
    "collect_kronecker_factors",
    "OnTheFlyGradients",
    "ProjectionConfig",
    "GradientProjector",
    "batch_gradients",
    "example_ids",
    "dataset_fingerprint",
    "gradient_fingerprint",
    "PerExampleGradients",
    "row_block_name",
    "split_block_dims",
    "GradientBlock",
    "LoRABlocks",
    "find_lora_blocks",
    "gradient_mode",
    "model_fingerprint",
    "GradientTask",
    "TaskBatch",
    "SequenceClassificationConfig",
    "SequenceClassificationTask",
    "CausalLMConfig",
    "CausalLMTask",
    "DiffusionTaskConfig",
    "DiffusionTask",
    "DEFAULT_DIFFUSION_TIMESTEPS",
]

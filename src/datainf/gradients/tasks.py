"""Moved: the tasks live in :mod:`datainf.tasks` (one module per modality, plus the shared base).

This module re-exports their names so that ``from datainf.gradients.tasks import ...`` keeps working.
"""

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
    example_seed,
)

__all__ = [
    "TaskBatch",
    "GradientTask",
    "SequenceClassificationConfig",
    "SequenceClassificationTask",
    "CausalLMConfig",
    "CausalLMTask",
    "DiffusionTaskConfig",
    "DiffusionTask",
    "DEFAULT_DIFFUSION_TIMESTEPS",
    "example_seed",
]

"""Tasks: what the per-example loss ``l_i`` is (docs/gradients.md section 4), and the task kinds.

A task turns raw examples (dict records) into a batch, runs the model, and returns the vector of
per-example losses, shape ``(b,)``. The collector sums that vector and backpropagates once; the
hooks then split the gradient by example. For that split to be right, **each example's loss must
depend on that example only** (see :class:`GradientTask`).

Built-in tasks, one module each:

* :mod:`datainf.tasks.classification` -- :class:`SequenceClassificationTask`: cross-entropy of the
  example's label.
* :mod:`datainf.tasks.causal_lm` -- :class:`CausalLMTask`: mean NLL over the response tokens (prompt
  and padding masked), or over all non-padding tokens.
* :mod:`datainf.tasks.diffusion` -- :class:`DiffusionTask`: denoising MSE of a diffusers UNet at fixed
  timesteps, averaged.

:mod:`datainf.tasks.base` holds the :class:`GradientTask` contract, :class:`TaskBatch` and what the
text tasks share. :mod:`datainf.tasks.kinds` is the registry of task kinds (``classification``,
``causal-lm``, ``diffusion``): the name the CLI, :class:`~datainf.finetune.FinetuneConfig` and
:func:`~datainf.models.load_model` take, mapped to the task, its config and how the model loads.

Write your own task by subclassing :class:`GradientTask` (``collate`` and ``per_example_loss``), check
it with :func:`datainf.testing.check_per_example_gradients`, and (to use it by name) register a
:class:`TaskKind`.
"""

from datainf.tasks.base import GradientTask, TaskBatch
from datainf.tasks.causal_lm import CausalLMConfig, CausalLMTask
from datainf.tasks.classification import SequenceClassificationConfig, SequenceClassificationTask
from datainf.tasks.diffusion import DEFAULT_DIFFUSION_TIMESTEPS, DiffusionTask, DiffusionTaskConfig, example_seed
from datainf.tasks.kinds import TaskKind, available_task_kinds, get_task_kind, register_task_kind

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
    "TaskKind",
    "register_task_kind",
    "get_task_kind",
    "available_task_kinds",
]

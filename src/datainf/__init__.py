"""datainf: which fine-tuning examples made a LoRA-tuned model behave as it does.

DataInf (Kwon et al., ICLR 2024) and its baselines (Exact, LiSSA, Hessian-free) on per-example
LoRA gradients of transformers and diffusers models.

Sign convention: influence > 0 = harmful (up-weighting the training example raises the test loss),
influence < 0 = helpful.
"""

from __future__ import annotations

import logging

from datainf.errors import DataInfError
from datainf.influence import InfluenceConfig, block_lambdas, influence, influence_from_config
from datainf.methods import available_methods, register_method
from datainf.scores import SIGN_CONVENTION, Scores
from datainf.store import GradientSource, GradientStore

__version__ = "0.1.0"

__all__ = [
    "DataInfError",
    "GradientSource",
    "GradientStore",
    "InfluenceConfig",
    "OnTheFlyGradients",
    "SIGN_CONVENTION",
    "Scores",
    "available_methods",
    "block_lambdas",
    "collect_gradients",
    "from_trainer",
    "influence",
    "influence_from_config",
    "lds",
    "register_method",
    "scores_from_trainer",
    "__version__",
]

logging.getLogger(__name__).addHandler(logging.NullHandler())


def __getattr__(name: str) -> object:
    """``datainf.collect_gradients`` / ``datainf.OnTheFlyGradients`` / ``datainf.lds`` without importing the
    model-side modules (or SciPy) at ``import datainf``."""
    if name == "collect_gradients":
        from datainf.gradients import collect_gradients

        return collect_gradients
    if name == "lds":  # the linear datamodeling score (datainf.evaluation; SciPy and scikit-learn load lazily)
        from datainf.evaluation import lds

        return lds
    if name in ("from_trainer", "scores_from_trainer"):
        from datainf import integrations

        return getattr(integrations, name)
    if name == "OnTheFlyGradients":
        from datainf.gradients import OnTheFlyGradients

        return OnTheFlyGradients
    raise AttributeError(f"module 'datainf' has no attribute {name!r}")

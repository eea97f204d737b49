"""The functional entry point: influence scores from per-block training and test gradients.

Pipeline of :func:`influence` (docs/method.md sections 4-6):

1. validate the inputs (non-empty, same blocks and sizes, same model fingerprint, finite);
2. ``lambda_l = damping * mean_i ||g_il||^2 / d_l`` per block from the *training* gradients (read
   from the store's recorded norms: no pass over the gradients), or one fixed ``lambda``; for
   training gradients recomputed on every pass whose norms are not known yet, a method that can
   (DataInf in ``average`` / ``pairwise`` mode) records them in its own first pass, made with a
   provisional damping from a pilot of a few rows and corrected afterwards under a computed bound
   (docs/method.md section 6.1; ``InfluenceConfig.fuse_norms_pass``);
3. test matrix ``V_l``: the mean test gradient (``average`` mode, ``m = 1``) or every test gradient
   (``pairwise`` mode);
4. the method's preconditioning, ``R_l ~= V_l (G_l + lambda_l I)^-1`` (its own streaming passes);
5. one scoring pass: ``I[:, k] = - sum_l R_l g_kl`` (:mod:`datainf.methods.scoring`: over the training
   gradients, or, for gradients recomputed on the fly in ``average`` mode, by forward differences of
   the losses, ``InfluenceConfig.scoring``).

``mode="self"`` replaces steps 3-5 by the method's self-influence ``s_k = sum_l g_kl^T P_l g_kl``
(``P_l`` its approximation of ``(G_l + lambda_l I)^-1``): how much up-weighting example ``k`` lowers
*its own* loss, with no test set (a mislabel detector: large = the rest of the data does not explain
the example). ``normalize=True`` divides every training and test gradient by its norm over all
blocks before step 2 (see :class:`InfluenceConfig`).

Sums over examples accumulate in the compute dtype (float32 unless the gradients are float64), in
place. Streaming passes over the training gradients: DataInf 2, Hessian-free 1, Diagonal 2, LiSSA
``iterations + 1``, Exact ``groups + 1``; in ``self`` mode Hessian-free 0, Diagonal 2, Exact up to
``2 groups``, DataInf ``chunks + 1`` and LiSSA ``iterations * chunks + 1`` (``chunks = ceil(n / batch_size)``:
they precondition the training rows themselves, a chunk at a time). Peak memory is one batch of gradients plus ``O(m sum_l d_l)`` plus the scores,
independent of ``n`` (Exact's Woodbury branch excepted: it keeps ``X_l`` of blocks with ``d_l > n``).

Under ``torchrun`` each process streams its share of the training rows. The engine owns every
combination across processes: ``lambda_l``'s norm sums here, and every sum or per-example result a
method asks for through the :class:`~datainf.methods.MethodContext` helpers (``streamed_sum``,
``streamed_rows``) is all-reduced / all-gathered before the method sees it (:mod:`datainf.distributed`);
scores do not depend on the number of processes beyond float round-off.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, cast

import torch

from datainf.distributed import DistributedContext, describe_ids, dist_context
from datainf.errors import (
    BlockMismatchError,
    ConfigError,
    EmptyInputError,
    FingerprintMismatchError,
    NonFiniteGradientError,
    StoreError,
)
from datainf.gradients.source import DEFAULT_PILOT_ROWS  # also the pilot of a source without ``pilot_rows``
from datainf.methods import FusedPass, InfluenceMethod, MethodContext, get_method
from datainf.methods.base import unit_scales
from datainf.methods.checkpoints import PassCheckpoints
from datainf.methods.scoring import gradient_scores, loss_difference_problem, loss_difference_scores
from datainf.scores import Scores
from datainf.store import GradientSource, GradientStore, row_squared_norms

__all__ = [
    "InfluenceConfig",
    "influence",
    "influence_from_config",
    "block_lambdas",
    "lambdas_from_norms",
    "GradientsLike",
    "SELF_SIGN_CONVENTION",
]

logger = logging.getLogger(__name__)

#: A store, any other :class:`~datainf.store.GradientSource` (e.g. :class:`datainf.gradients.OnTheFlyGradients`,
#: gradients recomputed on every pass), or in-memory ``{block: (n, d_l)}`` tensors.
GradientsLike = GradientSource | Mapping[str, torch.Tensor]

#: The ways of taking the scoring pass (:attr:`InfluenceConfig.scoring`, :mod:`datainf.methods.scoring`).
SCORING_PASSES = ("gradients", "loss-difference")

#: What the values of ``mode="self"`` scores mean (recorded as their ``sign_convention``).
SELF_SIGN_CONVENTION = (
    "self-influence s_k = sum_l g_kl^T (G_l + lambda_l I)^-1 g_kl >= 0: up-weighting example k lowers its own loss by "
    "s_k (its influence on its own loss is -s_k); large = the rest of the data does not explain the example "
    "(mislabel suspects rank first, like harmful examples in the other modes)"
)


@dataclass(frozen=True)
class InfluenceConfig:
    """Settings of one influence computation (recorded with the scores).

    Attributes:
        method: a registered method name (:func:`datainf.methods.available_methods`: ``datainf``,
            ``exact``, ``lissa``, ``hessian_free``, or one added with ``register_method``).
        mode: ``average`` (one score per training example, on the mean test loss), ``pairwise``
            (an ``m x n`` matrix, one row per test example) or ``self`` (each training example's
            self-influence ``s_k = sum_l g_kl^T (G_l + lambda_l I)^-1 g_kl``, ``(n,)``; no test
            gradients: passing some is refused).
        damping: ``lambda_l = damping * mean_i ||g_il||^2 / d_l`` (paper: 0.1). Must be > 0.
        fixed_lambda: use this ``lambda`` for every block instead (must be > 0).
        method_options: the method's own options, e.g. ``{"iterations": 10, "scale": 1.0}`` for LiSSA.
        batch_size: training examples read per batch.
        compute_dtype: ``float32`` or ``float64``; default float64 when the gradients are stored in
            float64, else float32 (Exact always solves in float64).
        device: where the arithmetic runs (``cpu``, ``cuda``, ...).
        normalize: divide every training and test gradient by its norm over all blocks,
            ``g_k / ||g_k||``, before anything else (damping included: ``lambda_l`` is then computed
            from the unit gradients). With ``hessian_free`` the score is minus the cosine similarity
            of the two gradients; with ``datainf``/``exact``/... a preconditioned cosine. The score
            is then no longer the influence on the test loss (an example's gradient magnitude,
            e.g. a large loss, no longer counts): it ranks by the *direction* of the gradients.
            Examples whose gradient is all zero stay zero.
        fuse_norms_pass: for training gradients recomputed on every pass whose norms are not known
            yet (:class:`datainf.gradients.OnTheFlyGradients`), let a method that can (DataInf, in
            ``average`` / ``pairwise`` mode) record the norms during its own first pass instead of a
            separate norms pass: 2 gradient passes plus a small pilot instead of 3, the same scores
            to round-off, guaranteed by a computed bound with a fallback (docs/method.md section
            6.1). ``False``: always the separate norms pass. No effect on a store.
        scoring: how the last pass turns the preconditioned test rows into scores.
            ``"gradients"`` (default): one pass over the training gradients, exact.
            ``"loss-difference"``: for training gradients recomputed on every pass
            (:class:`datainf.gradients.OnTheFlyGradients`) in ``average`` mode only, each example's
            score is a forward difference of its loss along the preconditioned direction. That is one
            forward pass per example without autograd instead of a forward and a backward pass.
            The result is approximate, so it is first checked against exact scores on a few rows, and
            the gradient pass is made when the check fails (:mod:`datainf.methods.scoring`, docs/method.md
            section 6.2). Other inputs are refused.
    """

    method: str = "datainf"
    mode: Literal["average", "pairwise", "self"] = "average"
    damping: float = 0.1
    fixed_lambda: float | None = None
    method_options: Mapping[str, Any] = field(default_factory=dict)
    batch_size: int = 1024
    compute_dtype: str | None = None
    device: str = "cpu"
    normalize: bool = False
    fuse_norms_pass: bool = True
    scoring: Literal["gradients", "loss-difference"] = "gradients"

    def __post_init__(self) -> None:
        if self.scoring not in SCORING_PASSES:
            raise ConfigError(f"scoring must be one of {list(SCORING_PASSES)}, got {self.scoring!r}.")
        if self.scoring == "loss-difference" and self.mode != "average":
            raise ConfigError(
                f"scoring='loss-difference' takes mode='average' (one direction per training pass), got "
                f"mode={self.mode!r}; use scoring='gradients'."
            )
        if self.mode not in ("average", "pairwise", "self"):
            raise ConfigError(f"mode must be 'average', 'pairwise' or 'self', got {self.mode!r}.")
        if not isinstance(self.normalize, bool):
            raise ConfigError(f"normalize must be True or False, got {self.normalize!r}.")
        if not isinstance(self.fuse_norms_pass, bool):
            raise ConfigError(f"fuse_norms_pass must be True or False, got {self.fuse_norms_pass!r}.")
        if not (isinstance(self.damping, (int, float)) and math.isfinite(self.damping) and self.damping > 0):
            raise ConfigError(
                f"damping must be a finite number > 0 (the paper uses 0.1), got {self.damping!r}: "
                "lambda = 0 makes the inverse undefined."
            )
        if self.fixed_lambda is not None and not (math.isfinite(self.fixed_lambda) and self.fixed_lambda > 0):
            raise ConfigError(f"fixed_lambda must be a finite number > 0, got {self.fixed_lambda!r}.")
        if self.batch_size <= 0:
            raise ConfigError(f"batch_size must be positive, got {self.batch_size}.")
        if self.compute_dtype not in (None, "float32", "float64"):
            raise ConfigError(f"compute_dtype must be 'float32' or 'float64', got {self.compute_dtype!r}.")
        get_method(self.method, self.method_options)  # validates the name and the options

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["method_options"] = dict(self.method_options)
        return out


def _as_store(gradients: GradientsLike, role: str) -> GradientSource:
    if isinstance(gradients, (GradientStore, GradientSource)):
        if not gradients.is_complete:
            raise StoreError(
                f"The {role} gradient store is unfinished ({gradients.num_examples} examples so far); rerun the "
                "gradient collection (it resumes) or call store.finalize()."
            )
        if gradients.num_examples == 0:
            raise EmptyInputError(f"The {role} gradients hold no examples.")
        return gradients
    if isinstance(gradients, Mapping):
        if not gradients:
            raise EmptyInputError(
                f"The {role} gradients are empty: pass a mapping block name -> tensor ({role} size, d_l)."
            )
        try:
            return GradientStore.from_tensors(gradients)
        except NonFiniteGradientError as err:
            raise NonFiniteGradientError(f"{role} gradients: {err}") from err
        except EmptyInputError as err:
            raise EmptyInputError(f"The {role} gradients hold no examples.") from err
    raise ConfigError(
        f"{role} gradients must be a GradientStore (or another GradientSource, e.g. OnTheFlyGradients) or a mapping "
        f"block name -> tensor, got {type(gradients).__name__}."
    )


def _check_compatible(train: GradientSource, test: GradientSource) -> None:
    from datainf.gradients.projection import check_same_projection

    check_same_projection(train.fingerprint, test.fingerprint)  # first: a projection changes the block sizes too
    train_dims, test_dims = train.block_dims, test.block_dims
    only_train = sorted(set(train_dims) - set(test_dims))
    only_test = sorted(set(test_dims) - set(train_dims))
    if only_train or only_test:
        raise BlockMismatchError(
            f"Train and test gradients have different blocks: only in train {only_train[:5]}"
            f"{'...' if len(only_train) > 5 else ''}, only in test {only_test[:5]}{'...' if len(only_test) > 5 else ''}. "
            "Compute both with the same model and adapter."
        )
    sizes = [(b, train_dims[b], test_dims[b]) for b in train_dims if train_dims[b] != test_dims[b]]
    if sizes:
        raise BlockMismatchError(
            "Train and test blocks differ in size: "
            + ", ".join(f"{b} (train {a}, test {c})" for b, a, c in sizes[:5])
            + ". Compute both with the same model and adapter."
        )
    a, b = train.fingerprint.get("model"), test.fingerprint.get("model")
    if a is not None and b is not None and a != b:
        raise FingerprintMismatchError(
            f"Train gradients come from model/adapter {a!r} but test gradients from {b!r}; influence needs both from "
            "the same fine-tuned model. Recompute one of them."
        )


def block_lambdas(
    store: GradientSource,
    *,
    damping: float = 0.1,
    fixed_lambda: float | None = None,
    sum_over_processes: Callable[[torch.Tensor], torch.Tensor] | None = None,
    rows: range | None = None,
    normalize: bool = False,
) -> dict[str, float]:
    """Per-block damping ``lambda_l = damping * (1 / (n d_l)) sum_i ||g_il||^2`` (docs/method.md section 4).

    Computed from the store's recorded squared norms (float64), so it costs no pass over the
    gradients. With ``fixed_lambda`` every block gets that value. Blocks whose gradients are all zero
    get ``0.0`` (they are skipped by every method: they contribute nothing to any score).

    Under ``torch.distributed``, ``rows`` is this process's share of the examples and
    ``sum_over_processes`` an all-reduce: the per-block sums of squared norms (and the count) are
    summed over processes. Give both or neither.

    With ``normalize``, the norms are those of the unit-normalised gradients,
    ``||g_il||^2 / sum_l' ||g_il'||^2`` (see :class:`InfluenceConfig`).

    The same rule on a norms tensor instead of a store: :func:`lambdas_from_norms`.
    """
    return lambdas_from_norms(
        store.squared_norms(),
        store.block_dims,
        damping=damping,
        fixed_lambda=fixed_lambda,
        sum_over_processes=sum_over_processes,
        rows=rows,
        normalize=normalize,
        ids=store.ids,
    )


def lambdas_from_norms(
    norms: torch.Tensor,
    block_dims: Mapping[str, int],
    *,
    damping: float = 0.1,
    fixed_lambda: float | None = None,
    sum_over_processes: Callable[[torch.Tensor], torch.Tensor] | None = None,
    rows: range | None = None,
    normalize: bool = False,
    ids: Sequence[str] | None = None,
) -> dict[str, float]:
    """:func:`block_lambdas` from squared norms ``||g_il||^2``: float64 ``(n, L)``, columns in ``block_dims`` order.

    ``rows`` selects this process's rows of ``norms`` (``None``: every row given); ``sum_over_processes``
    sums the per-block totals and the count over processes, so ``norms`` may also be one process's
    rows only (e.g. a pilot, docs/method.md section 6.1). ``ids`` (of the rows of ``norms``) name the
    examples in the error about non-finite norms.
    """
    if normalize:
        norms = norms * unit_scales(norms).square().unsqueeze(1)
    offset = 0
    if rows is not None:
        norms, offset = norms[rows.start : rows.stop], rows.start
    if not torch.isfinite(norms).all():
        bad = (~torch.isfinite(norms)).any(dim=1).nonzero().flatten().tolist()
        names = [ids[offset + i] for i in bad[:10]] if ids is not None else [offset + i for i in bad[:10]]
        raise NonFiniteGradientError(f"Non-finite gradients for training examples {names}; recompute them.")
    totals = norms.sum(dim=0)
    count = torch.tensor(float(norms.shape[0]), dtype=torch.float64)
    if sum_over_processes is not None:
        totals, count = sum_over_processes(totals), sum_over_processes(count)
    out: dict[str, float] = {}
    for j, (name, dim) in enumerate(block_dims.items()):
        if float(totals[j]) == 0.0:
            out[name] = 0.0
        elif fixed_lambda is not None:
            out[name] = float(fixed_lambda)
        else:
            out[name] = damping * float(totals[j]) / (float(count) * dim)
    return out


def _zero_gradient_ids(store: GradientSource, role: str) -> list[str]:
    zero = (store.squared_norms().sum(dim=1) == 0).nonzero().flatten().tolist()
    if zero:
        ids = store.ids
        logger.warning(
            "normalize: %d %s example(s) have an all-zero gradient and stay zero (score 0): %s%s",
            len(zero),
            role,
            [ids[i] for i in zero[:5]],
            "..." if len(zero) > 5 else "",
        )
    return [store.ids[i] for i in zero]


def _default_compute_dtype(store: GradientSource, requested: str | None) -> torch.dtype:
    if requested is not None:
        return getattr(torch, requested)
    return torch.float64 if store.torch_dtype == torch.float64 else torch.float32


def _store_identity(store: GradientSource) -> dict[str, Any]:
    """What must agree between processes about one gradient store: ids, blocks, dtype, fingerprint and
    the per-block sums of the recorded squared norms (a cheap checksum of the values)."""
    out: dict[str, Any] = {
        "ids": describe_ids(store.ids),
        "blocks": store.block_dims,
        "dtype": store.dtype,
        "fingerprint": store.fingerprint,
    }
    norms = _known_norms(store)
    if norms is not None:  # a source recomputing its rows covers them by its checkpoint key instead
        out["norm_sums"] = norms.sum(dim=0).tolist()
    return out


class _DeferredNorms(Protocol):
    """A gradient source whose squared norms may be unknown until a pass (:class:`datainf.gradients.OnTheFlyGradients`)."""

    def known_squared_norms(self) -> torch.Tensor | None: ...

    def record_norms(self, norms: torch.Tensor) -> None: ...


def _known_norms(store: GradientSource) -> torch.Tensor | None:
    """The recorded squared norms ``(n, L)``, or ``None`` when a source would need a pass to know them."""
    known = getattr(store, "known_squared_norms", None)
    return known() if callable(known) else store.squared_norms()


def _pass_checkpoints(
    train: GradientSource, config: InfluenceConfig, lambdas: Mapping[str, float], vectors: Mapping[str, torch.Tensor]
) -> PassCheckpoints | None:
    """Checkpoints of the streaming passes when ``train`` recomputes its rows on every pass and has a work folder.

    Such a source (:class:`datainf.gradients.OnTheFlyGradients`) has a ``checkpoint_dir`` (a
    :class:`~pathlib.Path`, or ``None``) and a ``checkpoint_key`` (a hash of its model, task, data
    and settings). The key of the checkpoints adds the settings, the damping and the test vectors.
    """
    folder = getattr(train, "checkpoint_dir", None)
    if not isinstance(folder, Path):
        return None
    digest = hashlib.sha256()
    settings = config.to_dict()
    settings.pop("fuse_norms_pass")  # the same computation either way: a fused run's passes serve an unfused rerun
    settings.pop("scoring")  # the preconditioning passes are the same whichever scoring pass follows
    payload = {
        "train": str(getattr(train, "checkpoint_key", "")),
        "config": settings,
        "lambdas": dict(lambdas),
    }
    digest.update(json.dumps(payload, sort_keys=True, default=str).encode())
    for name in sorted(vectors):
        vector = vectors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tuple(vector.shape)}|{vector.dtype}\n".encode())
        digest.update(vector.view(torch.uint8).numpy().tobytes() if vector.numel() else b"")
    return PassCheckpoints(folder, digest.hexdigest()[:16], dist_context())


def _fusion_applies(
    train: GradientSource, method: InfluenceMethod, config: InfluenceConfig, compute_dtype: torch.dtype
) -> bool:
    """Whether the norms pass is fused into the method's first pass (docs/method.md section 6.1; collective).

    Needs: the setting on, ``average`` / ``pairwise`` mode, a method that can, a source that takes
    recorded norms (``record_norms``) and does not know them yet, and a compute dtype that holds the
    served rows exactly (so that the norms recorded on the way are the norms pass's, bit for bit).
    """
    if not config.fuse_norms_pass or config.mode == "self" or not method.fuses_norms_pass:
        return False
    if not callable(getattr(train, "record_norms", None)) or not callable(getattr(train, "known_squared_norms", None)):
        return False
    if compute_dtype == torch.float32 and train.torch_dtype == torch.float64:
        return False
    return _known_norms(train) is None


def _pilot_lambdas(
    train: GradientSource, config: InfluenceConfig, rows: range, ctx: DistributedContext
) -> tuple[dict[str, float], int]:
    """``lambda0_l`` by the damping rule from the first ``pilot_rows`` rows of this process's share, and the pilot's size.

    The pilot's squared norms (``(p, L)`` float64, as a store records them) are summed over
    processes like :func:`block_lambdas`'s; its rows are computed once more by the fused pass.
    """
    size = min(len(rows), int(getattr(train, "pilot_rows", DEFAULT_PILOT_ROWS)))
    pilot = range(rows.start, rows.start + size)
    names = list(train.block_dims)
    parts: list[torch.Tensor] = []
    error: Exception | None = None
    try:
        for _, batch in train.iter_batches(config.batch_size, rows=pilot):
            parts.append(torch.stack([row_squared_norms(batch[name].cpu()) for name in names], dim=1))
        norms = torch.cat(parts) if parts else torch.zeros(0, len(names), dtype=torch.float64)
        if not torch.isfinite(norms).all():
            bad = (~torch.isfinite(norms)).any(dim=1).nonzero().flatten().tolist()
            raise NonFiniteGradientError(
                f"Non-finite gradients for training examples {[train.ids[pilot.start + i] for i in bad[:10]]}; "
                "recompute them."
            )
    except Exception as err:
        if not ctx.is_distributed:
            raise
        error = err
    ctx.raise_if_any(error, "The pilot of the fused norms pass")
    lambdas = lambdas_from_norms(
        norms,
        train.block_dims,
        damping=config.damping,
        sum_over_processes=ctx.all_reduce_sum,
        normalize=config.normalize,
    )
    total = int(ctx.all_reduce_sum(torch.tensor(float(size), dtype=torch.float64)))
    return lambdas, total


def _test_vectors(
    test: GradientSource,
    names: Sequence[str],
    config: InfluenceConfig,
    device: torch.device,
    compute_dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    """``V_l`` for ``names``: the test gradients ``(m, d_l)`` (unit-normalised when asked), or their mean ``(1, d_l)``."""
    test_grads = test.to_dict()
    test_scales = unit_scales(test.squared_norms()) if config.normalize else None
    vectors: dict[str, torch.Tensor] = {}
    for name in names:
        v = test_grads.pop(name)
        if test_scales is not None:
            v = v.to(torch.float64) * test_scales.unsqueeze(1)
        if config.mode == "average":
            v = v.mean(dim=0, keepdim=True, dtype=torch.float64)
        vectors[name] = v.to(device=device, dtype=compute_dtype)
    return vectors


def _replayed(ctx: MethodContext) -> dict[str, int]:
    """``{"replayed_passes": k}`` when passes were checkpointed (``k`` read back instead of streamed), else ``{}``."""
    return {} if ctx.checkpoints is None else {"replayed_passes": ctx.checkpoints.replayed}


def influence_from_config(
    train: GradientsLike, test: GradientsLike | None, config: InfluenceConfig, *, progress: bool = True
) -> Scores:
    """Run :func:`influence` with an :class:`InfluenceConfig` (what the CLI uses).

    ``test`` must be ``None`` exactly when ``config.mode == "self"``.

    Under ``torchrun`` every rank calls this with the same configuration and the same (full) train
    and test gradients; each rank streams a contiguous share of the training rows, partial sums
    are all-reduced, and every rank returns the same full :class:`Scores` (see
    :mod:`datainf.distributed`). Different configurations or gradients on different ranks raise
    :class:`~datainf.errors.DistributedMismatchError` on every rank.
    """
    started = time.perf_counter()
    self_mode = config.mode == "self"
    if self_mode and test is not None:
        raise ConfigError(
            "mode='self' scores each training example on its own loss and uses no test gradients, but test gradients "
            "were given. Drop them (influence(train, mode='self')), or use mode='average' / 'pairwise' to score "
            "against the test set."
        )
    if not self_mode and test is None:
        raise ConfigError(f"mode={config.mode!r} needs test gradients; pass them, or use mode='self' (no test set).")
    ctx = dist_context()
    test_store: GradientSource | None = None
    if ctx.is_distributed:
        # every rank must reach the fingerprint exchange, also when its own inputs are unusable
        identity: dict[str, Any] = {}
        try:
            train_store = _as_store(train, "train")
            identity = {"train gradients": _store_identity(train_store)}
            if test is not None:
                test_store = _as_store(test, "test")
                identity["test gradients"] = _store_identity(test_store)
        except Exception as err:
            ctx.raise_if_any(err, "Reading the gradients")
        ctx.raise_if_any(None, "Reading the gradients")
        ctx.check_same({"config": config.to_dict(), **identity}, "influence computation (settings and gradients)")
    else:
        train_store = _as_store(train, "train")
        test_store = None if test is None else _as_store(test, "test")
    if test_store is not None:
        _check_compatible(train_store, test_store)
    if config.scoring == "loss-difference":
        problem = loss_difference_problem(train_store)
        if problem is not None:
            raise ConfigError(f"scoring='loss-difference' cannot be used here: {problem}.")
    method = get_method(config.method, config.method_options)
    compute_dtype = _default_compute_dtype(train_store, config.compute_dtype)
    device = ctx.resolve_device(config.device) or torch.device("cpu")
    rows = ctx.shard(train_store.num_examples)

    def method_context(lambdas: Mapping[str, float], blocks: Sequence[str], **extra: Any) -> MethodContext:
        return MethodContext(
            train=train_store,
            lambdas=lambdas,
            blocks=blocks,
            batch_size=config.batch_size,
            compute_dtype=compute_dtype,
            device=device,
            progress=progress and ctx.is_main,
            total_examples=train_store.num_examples,
            rows=rows,
            processes=ctx,
            **extra,
        )

    fused: FusedPass | None = None
    fused_vectors: dict[str, torch.Tensor] = {}
    pilot_size = 0
    if _fusion_applies(train_store, method, config, compute_dtype):
        # docs/method.md section 6.1: provisional damping, one pass that also records the norms
        assert test_store is not None
        if config.fixed_lambda is not None:  # the damping is known: no pilot, the fused sums are exact
            provisional = {name: float(config.fixed_lambda) for name in train_store.block_dims}
        else:
            provisional, pilot_size = _pilot_lambdas(train_store, config, rows, ctx)
        every_block = sorted(train_store.block_dims)
        fused_vectors = _test_vectors(test_store, every_block, config, device, compute_dtype)
        provisional_ctx = method_context(provisional, every_block, normalize_rows=config.normalize)
        fused = method.fused_norms_pass(fused_vectors, provisional_ctx)
        cast(_DeferredNorms, train_store).record_norms(fused.norms)  # no norms pass: block_lambdas reads these

    lambdas = block_lambdas(
        train_store,
        damping=config.damping,
        fixed_lambda=config.fixed_lambda,
        sum_over_processes=ctx.all_reduce_sum,
        rows=rows,
        normalize=config.normalize,
    )
    zero_blocks = sorted(b for b, lam in lambdas.items() if lam == 0.0)
    if zero_blocks:
        logger.warning(
            "%d block(s) have all-zero training gradients and contribute nothing to any score: %s%s",
            len(zero_blocks),
            zero_blocks[:3],
            "..." if len(zero_blocks) > 3 else "",
        )
    blocks = sorted(b for b in train_store.block_dims if lambdas[b] > 0)
    if not blocks:
        raise EmptyInputError(
            "Every training gradient is zero: there is nothing to attribute. Check that the adapter is trainable."
        )

    zero_examples: dict[str, list[str]] = {}
    if config.normalize:
        zero_examples["train"] = _zero_gradient_ids(train_store, "training")
        if test_store is not None:
            zero_examples["test"] = _zero_gradient_ids(test_store, "test")
    method_ctx = method_context(
        lambdas, blocks, example_scales=unit_scales(train_store.squared_norms()) if config.normalize else None
    )
    settings = {
        **config.to_dict(),
        "method": method.name,
        "method_options": method.settings(),
        "lambdas": {b: lambdas[b] for b in train_store.block_dims},
        "compute_dtype": str(compute_dtype).replace("torch.", ""),
        "storage_dtype": train_store.dtype,
        "fingerprint": train_store.fingerprint,
    }
    if self_mode:
        method_ctx.checkpoints = _pass_checkpoints(train_store, config, lambdas, {})
        own = method.self_influence(method_ctx)
        diagnostics = {
            **own.diagnostics,
            "seconds": time.perf_counter() - started,
            "passes": method_ctx.passes,
            **_replayed(method_ctx),
            "processes": ctx.world_size,
            "passes_description": method.passes_description,
            "zero_gradient_blocks": zero_blocks,
            **({"zero_gradient_examples": zero_examples} if config.normalize else {}),
        }
        return Scores(
            values=own.values.to(torch.float64),
            train_ids=train_store.ids,
            test_ids=[],
            method=method.name,
            mode="self",
            settings=settings,
            diagnostics=diagnostics,
            sign_convention=SELF_SIGN_CONVENTION,
        )

    assert test_store is not None
    if fused is not None:
        vectors = {name: fused_vectors[name] for name in blocks}
    else:
        vectors = _test_vectors(test_store, blocks, config, device, compute_dtype)

    method_ctx.checkpoints = _pass_checkpoints(train_store, config, lambdas, vectors)
    fused_passes: dict[str, Any] = {}
    passes_description = method.passes_description  # what precedes the scoring pass (which is added below)
    if fused is not None:
        finished = method.finish_fused(fused, vectors, method_ctx)
        # full passes of gradient computation (the fused pass, the method's, scoring), beside the pilot's rows
        gradient_passes = 2 if finished is not None else 3
        fused_passes = {
            "fused_norms_pass": {**fused.diagnostics, "pilot_rows": pilot_size, "gradient_passes": gradient_passes}
        }
        pilot_text = f"a pilot of {pilot_size} rows, " if config.fixed_lambda is None else ""
        if finished is None:  # the bound does not hold: the method's ordinary pass, with the exact damping
            preconditioned = method.precondition(vectors, method_ctx)
            passes_description = (
                f"{pilot_text}1 fused norms pass (its sums unused: bound not met), {method.passes_description}"
            )
        else:
            preconditioned = finished
            passes_description = f"{pilot_text}1 fused norms pass ({method.passes_description})"
    else:
        preconditioned = method.precondition(vectors, method_ctx)
    precondition_seconds = time.perf_counter() - started

    scoring: dict[str, Any] = {"scoring": config.scoring}
    values: torch.Tensor | None = None
    if config.scoring == "loss-difference":
        values, checked = loss_difference_scores(method_ctx, preconditioned.vectors)
        scoring["loss_difference"] = checked
    scoring_pass = "1 scoring pass" if values is None else "1 scoring pass of loss differences"
    if values is None:
        values = gradient_scores(method_ctx, preconditioned.vectors, f"Scores ({method.name})")  # (m, n), store order
    passes_description = f"{passes_description} + {scoring_pass}"

    diagnostics = {
        **preconditioned.diagnostics,
        "seconds": time.perf_counter() - started,
        "precondition_seconds": precondition_seconds,
        "passes": method_ctx.passes,
        **_replayed(method_ctx),
        **fused_passes,
        **scoring,
        "processes": ctx.world_size,
        "passes_description": passes_description,
        "zero_gradient_blocks": zero_blocks,
        **({"zero_gradient_examples": zero_examples} if config.normalize else {}),
    }
    return Scores(
        values=values[0] if config.mode == "average" else values,
        train_ids=train_store.ids,
        test_ids=test_store.ids,
        method=method.name,
        mode=config.mode,
        settings=settings,
        diagnostics=diagnostics,
    )


def influence(
    train: GradientsLike,
    test: GradientsLike | None = None,
    *,
    method: str = "datainf",
    mode: Literal["average", "pairwise", "self"] = "average",
    damping: float = 0.1,
    fixed_lambda: float | None = None,
    method_options: Mapping[str, Any] | None = None,
    batch_size: int = 1024,
    device: str = "cpu",
    normalize: bool = False,
    fuse_norms_pass: bool = True,
    scoring: Literal["gradients", "loss-difference"] = "gradients",
    progress: bool = True,
) -> Scores:
    """Influence of every training example on the test loss (positive = harmful).

    Args:
        train: training gradients, a :class:`~datainf.store.GradientStore` or a mapping block name ->
            tensor of shape ``(n, d_l)``.
        test: test gradients, same blocks, shape ``(m, d_l)``; ``None`` (and only then) in ``self`` mode.
        method: ``datainf`` (paper eq. 5), ``exact``, ``lissa``, ``hessian_free`` or any other
            registered method (:func:`datainf.methods.available_methods`).
        mode: ``average`` -> ``Scores.values`` of shape ``(n,)``; ``pairwise`` -> ``(m, n)``;
            ``self`` -> ``(n,)`` self-influence ``s_k >= 0`` (large = suspect; see
            :data:`SELF_SIGN_CONVENTION`), no test gradients.
        damping: ``lambda_l = damping * mean_i ||g_il||^2 / d_l`` per block (> 0; paper 0.1).
        fixed_lambda: one ``lambda`` for every block instead.
        method_options: e.g. ``{"iterations": 10, "scale": "trace"}`` for LiSSA,
            ``{"max_memory_gb": 4}`` for Exact.
        batch_size: training examples per streamed batch.
        device: where the arithmetic runs.
        normalize: unit-normalise every training and test gradient first (cosine-style scores;
            see :class:`InfluenceConfig`).
        fuse_norms_pass: with training gradients recomputed on every pass, let DataInf record their
            norms in its own pass (2 gradient passes plus a pilot instead of 3; docs/method.md
            section 6.1). ``False``: a separate norms pass.
        scoring: ``"gradients"`` (exact) or ``"loss-difference"`` (training gradients computed on
            the fly, ``average`` mode: the scoring pass by forward differences of the losses, one
            forward pass per example instead of a forward and a backward pass, checked against exact
            scores on a few rows; see :class:`InfluenceConfig`).
        progress: show progress bars.

    Returns:
        :class:`~datainf.scores.Scores`; ``values[k] > 0`` means example ``k`` raises the test loss.
        Under ``torchrun`` every rank calls this with the same arguments, streams a share of the
        training rows, and gets the same full scores back (write them from rank 0 only).

    Raises:
        EmptyInputError, BlockMismatchError, FingerprintMismatchError, NonFiniteGradientError,
        ConfigError (all :class:`~datainf.errors.DataInfError`).
    """
    config = InfluenceConfig(
        method=method,
        mode=mode,
        damping=damping,
        fixed_lambda=fixed_lambda,
        method_options=dict(method_options or {}),
        batch_size=batch_size,
        device=device,
        normalize=normalize,
        fuse_norms_pass=fuse_norms_pass,
        scoring=scoring,
    )
    return influence_from_config(train, test, config, progress=progress)

"""The scoring run (``datainf score``): influence scores of every method, from stores or from data."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from datainf.distributed import DistributedContext, dist_context, on_every_rank, on_main
from datainf.errors import ConfigError
from datainf.runs import RunDir, removed_on_error
from datainf.scores import Scores
from datainf.store import GradientSource, GradientStore
from datainf.workflows.settings import (
    MethodScores,
    ScoreRunResult,
    ScoreSettings,
    _projection_of,
    _saved,
    _without_projection_defaults,
)
from datainf.workflows.steps import (
    _adapter_meta,
    _check_same_run,
    _compute_store,
    _load_data,
    _model_and_task,
    _open_store,
    _resolve_model_settings,
)

if TYPE_CHECKING:
    import torch

    from datainf.influence import InfluenceConfig

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- scores


def score_run(settings: ScoreSettings, *, overwrite: bool = False, progress: bool = True) -> ScoreRunResult:
    """Influence of every training example on the test loss (or, in ``self`` mode, on its own loss),
    per method; writes ``<out>/scores-<method>.safetensors`` and ``<out>/scores-<method>.csv`` (or
    ``.parquet``).

    From stores (``train_grads`` and ``test_grads``) or from data (``model``, ``adapter``,
    ``train_data`` and ``test_data`` or ``test_grads``): the training gradients are then recomputed on
    every streaming pass and never written (their norms and the finished passes are checkpointed in
    ``<out>/onthefly``, so a killed run resumes), unless ``keep_train_store`` puts them in
    ``<out>/grads-train``; the test gradients go to ``<out>/grads-test``.
    ``mode="self"`` takes the training side only. From data the training-loss baseline is written
    too (``scores-loss``, the last row of the result; see :attr:`ScoreSettings.loss_baseline`).
    Scores finished in ``<out>`` with this configuration and these very gradients are reused.

    Under ``torchrun`` every rank runs the same call and computes a share of every sum; rank 0 alone
    writes the outputs; every rank returns the same scores.

    Raises:
        ConfigError: unknown methods, both or neither input given, test inputs in ``self`` mode,
            ``loss_baseline=True`` from stores, ``<out>`` holds another configuration (without
            ``overwrite``), bad influence settings.
        DatasetError: unreadable data, test labels never seen in training.
    """
    from datainf.gradients import OnTheFlyGradients
    from datainf.influence import InfluenceConfig, influence_from_config

    ctx = dist_context()
    with removed_on_error(settings.out):
        methods = _methods(settings)
        from_data = bool(settings.train_data or settings.test_data)  # training data, with a test store or data
        from_stores = not from_data and bool(settings.train_grads or settings.test_grads)
        if settings.train_grads and from_data:
            raise ConfigError(
                "Give either --train-grads (a store) or --train-data (with --model/--adapter) for the training side, "
                "not both."
            )
        if settings.test_grads and settings.test_data:
            raise ConfigError("Give either --test-grads (a store) or --test-data for the test side, not both.")
        if not from_stores and not from_data:
            raise ConfigError(
                "Nothing to score: pass --train-grads and --test-grads, or --model, --adapter, --train-data and "
                "--test-data (or --test-grads) (with --mode self: the training side only)."
            )
        if settings.keep_train_store and not settings.train_data:
            raise ConfigError(
                "--keep-train-store keeps the training gradients computed from --train-data; with --train-grads they "
                "are a store already: drop --keep-train-store."
            )
        if settings.scoring == "loss-difference" and (not settings.train_data or settings.keep_train_store):
            raise ConfigError(
                "--scoring loss-difference replaces a pass of forward/backward over the training data by forward "
                "passes, so it needs training gradients computed on the fly: give --train-data (with --model and "
                "--adapter) without --keep-train-store, or use --scoring gradients."
            )
        self_mode = settings.mode == "self"
        if self_mode and (settings.test_grads or settings.test_data):
            given = "--test-grads" if settings.test_grads else "--test-data"
            raise ConfigError(
                f"--mode self scores each training example on its own loss and uses no test set, but {given} was given: "
                f"drop {given}, or use --mode average / pairwise to score against the test set."
            )
        if settings.loss_baseline and not settings.train_data:
            raise ConfigError(
                "--loss-baseline needs the fine-tuned model and the training data (a gradient store holds no losses): "
                "score from --model, --adapter and --train-data instead of --train-grads, or drop --loss-baseline."
            )
        with_loss = from_data if settings.loss_baseline is None else settings.loss_baseline
        if with_loss and _LOSS_STAGE in methods:
            raise ConfigError(
                f"A registered method is called {_LOSS_STAGE!r}, which is also the training-loss baseline's name: "
                "pass --no-loss-baseline to run that method."
            )
        influence_configs = {  # built (and so validated) before any work
            name: InfluenceConfig(
                method=name,
                mode=settings.mode,
                damping=settings.damping,
                fixed_lambda=settings.fixed_lambda,
                method_options=dict((settings.method_options or {}).get(name, {})),
                batch_size=settings.score_batch_size,
                device=settings.device,
                normalize=settings.normalize,
                scoring=settings.scoring,
            )
            for name in methods
        }
        losses: Callable[[GradientSource, torch.Tensor | None], Scores] | None = None
        train_store: GradientSource
        test_store: GradientStore | None
        if from_stores:
            settings, run, train_store, test_store = _score_inputs_from_stores(ctx, settings, overwrite)
        else:
            settings, run, train_store, test_store, losses = _score_inputs_from_data(ctx, settings, overwrite, progress)

        rows: list[MethodScores] = []
        for name in methods:
            stage = f"scores-{name}.safetensors"
            config = influence_configs[name]

            def finished(stage: str = stage, config: InfluenceConfig = config) -> Scores | None:
                return run.load_finished(
                    stage, load=Scores.load, accept=lambda s: _same_scores(s, config, train_store, test_store)
                )

            # rank 0 decides (every rank must then take the same branch: influence runs collectives)
            scores = on_main(ctx, "Reading finished scores", finished)
            reused = scores is not None
            if scores is None:
                with run.timed(f"influence-{name}"):
                    scores = influence_from_config(train_store, test_store, config, progress=progress)
            rows.append(_write_scores(ctx, run, settings, name, scores, reused))
        if with_loss and losses is not None:
            compute_losses = losses
            # the losses the gradient passes computed (every rank gathers): then the baseline needs no pass
            recorded = train_store.recorded_losses() if isinstance(train_store, OnTheFlyGradients) else None

            def loss_row() -> tuple[Scores, bool]:
                done = run.load_finished(
                    f"scores-{_LOSS_STAGE}.safetensors", load=Scores.load, accept=lambda s: _same_loss(s, train_store)
                )
                if done is not None:
                    return done, True
                with run.timed("loss-baseline"):
                    return compute_losses(train_store, recorded), False

            scores, reused = on_main(ctx, "Computing the training-loss baseline", loss_row)
            rows.append(_write_scores(ctx, run, settings, _LOSS_STAGE, scores, reused))
        ctx.barrier()  # no rank returns before rank 0 has written everything
        return ScoreRunResult(out=run.path, methods=rows, settings=settings, stage_seconds=run.stage_seconds)


#: The training-loss baseline's name in ``score_run``: ``scores-loss.safetensors``, row ``loss``.
_LOSS_STAGE = "loss"


def _write_scores(
    ctx: DistributedContext, run: RunDir, settings: ScoreSettings, name: str, scores: Scores, reused: bool
) -> MethodScores:
    """Write one method's table (and, unless reused, its scores file) from rank 0; its result row."""
    stage = f"scores-{name}.safetensors"
    stem = run.stage(f"scores-{name}")
    if ctx.is_main:
        table = scores.write_table(stem, settings.table_format)
        if not reused:
            scores.save(run.stage(stage))  # last: its presence marks the method as done
    else:
        table = stem.with_suffix(f".{settings.table_format}")
    return MethodScores(method=name, scores=scores, path=run.stage(stage), table=table, reused=reused)


def _score_inputs_from_stores(
    ctx: DistributedContext, settings: ScoreSettings, overwrite: bool
) -> tuple[ScoreSettings, RunDir, GradientStore, GradientStore | None]:
    self_mode = settings.mode == "self"
    if not settings.train_grads or not (settings.test_grads or self_mode):
        raise ConfigError("Pass both --train-grads and --test-grads (or --mode self, which needs --train-grads only).")
    if settings.project_dim is not None:
        raise ConfigError(
            "--project-dim applies where gradients are computed (datainf grads, score --train-data); the stores "
            "given keep the projection they were collected with (their manifest's fingerprint says which)."
        )
    _check_same_run(ctx, "score", settings, {})  # the gradients themselves are compared by influence
    train_grads, test_grads = settings.train_grads, settings.test_grads

    def open_stores() -> tuple[GradientStore, GradientStore | None]:
        train = _open_store(train_grads, "--train-grads")
        return train, None if test_grads is None else _open_store(test_grads, "--test-grads")

    train_store, test_store = on_every_rank(ctx, "Opening the gradient stores", open_stores)
    run = on_main(ctx, "Checking the output folder", lambda: _claim_score_run(settings, overwrite))
    return settings, run, train_store, test_store


def _score_inputs_from_data(
    ctx: DistributedContext, settings: ScoreSettings, overwrite: bool, progress: bool
) -> tuple[
    ScoreSettings, RunDir, GradientSource, GradientStore | None, Callable[[GradientSource, torch.Tensor | None], Scores]
]:
    """The training gradients (computed on the fly, or into a store with ``keep_train_store``), the
    test gradients (computed from ``test_data`` into a store, or the ``test_grads`` store), and the
    training-loss baseline of the same model (a function of the training gradients, whose
    fingerprint it records)."""
    self_mode = settings.mode == "self"
    if not settings.train_data or not (settings.test_data or settings.test_grads or self_mode):
        raise ConfigError(
            "Pass --train-data and --test-data (or --test-grads) (or --mode self, which needs --train-data only)."
        )

    from datainf.baselines import loss_scores
    from datainf.data.labels import LabelEncoder
    from datainf.tasks import get_task_kind

    def read() -> tuple[ScoreSettings, list[dict[str, Any]], list[dict[str, Any]] | None]:
        resolved = _resolve_model_settings(settings, _adapter_meta(settings))
        kind = str(resolved.kind)
        train = _load_data(resolved.train_data, resolved, kind, "--train-data")
        test = None if not resolved.test_data else _load_data(resolved.test_data, resolved, kind, "--test-data")
        if get_task_kind(kind).encodes_labels:
            LabelEncoder.fit(train, held_out=test or ())  # test labels unseen in the training data -> DatasetError
        return resolved, train, test

    settings, train, test = on_every_rank(ctx, "Reading the data", read)
    data = {"training": train} if test is None else {"training": train, "test": test}
    _check_same_run(ctx, "score", settings, {"train": train} if test is None else {"train": train, "test": test})
    run = on_main(ctx, "Checking the output folder", lambda: _claim_score_run(settings, overwrite))
    model, task, encoded = _model_and_task(settings, data)
    test_grads = settings.test_grads
    with_factors = _needs_factors(settings)  # kfac / ekfac: the training side's Kronecker factors too
    with run.timed("gradients"):
        train_store: GradientSource
        if settings.keep_train_store:
            train_store = _compute_store(
                model,
                task,
                encoded["training"],
                run.stage("grads-train"),
                settings,
                ctx,
                progress=progress,
                collect_factors=with_factors,
            )
        else:
            from datainf.gradients import OnTheFlyGradients

            train_store = OnTheFlyGradients(
                model,
                task,
                encoded["training"],
                batch_size=int(settings.grad_batch_size),
                device=settings.device,
                dtype=settings.dtype,
                work_dir=run.stage("onthefly"),
                progress=progress,
                projection=_projection_of(settings),
            )
            if with_factors:
                from datainf.factors import attach_factors
                from datainf.gradients import collect_kronecker_factors

                attach_factors(
                    train_store,
                    collect_kronecker_factors(
                        model,
                        task,
                        encoded["training"],
                        folder=run.stage("onthefly") / "kronecker-factors",
                        batch_size=int(settings.grad_batch_size),
                        device=settings.device,
                        piece_size=int(settings.shard_size),
                        progress=progress,
                    ),
                )
        test_store: GradientStore | None = None
        if test is not None:
            test_store = _compute_store(
                model, task, encoded["test"], run.stage("grads-test"), settings, ctx, progress=progress
            )
        elif test_grads is not None:
            test_store = on_every_rank(
                ctx, "Opening the test gradient store", lambda: _open_store(test_grads, "--test-grads")
            )
    batch_size = int(settings.grad_batch_size)

    def losses(store: GradientSource, recorded: torch.Tensor | None) -> Scores:
        return loss_scores(
            model, task, encoded["training"], batch_size=batch_size, fingerprint=store.fingerprint, values=recorded
        )

    return settings, run, train_store, test_store, losses


def _needs_factors(settings: ScoreSettings) -> bool:
    """Whether a method asked for needs the Kronecker factors (``kfac``, ``ekfac``) and was not given a folder of them."""
    from datainf.methods import get_method

    return any(
        get_method(name).needs_factors and not dict((settings.method_options or {}).get(name, {})).get("factors")
        for name in _methods(settings)
    )


def _claim_score_run(settings: ScoreSettings, overwrite: bool) -> RunDir:
    return RunDir.claim(settings.out, kind="score", settings=_saved_score(settings), overwrite=overwrite)


def _saved_score(settings: ScoreSettings) -> dict[str, Any]:
    """:class:`ScoreSettings` as ``config.json`` holds them: the options added after the first
    release (``normalize``, ``loss_baseline``) only when they are not at their default, so score
    folders written before they existed still resume (a missing key reads as the default)."""
    saved = _saved(settings)
    if saved.get("normalize") is False:
        del saved["normalize"]
    if saved.get("loss_baseline") is None:
        del saved["loss_baseline"]
    if saved.get("label_names") is None:
        del saved["label_names"]
    if saved.get("keep_train_store") is False:
        del saved["keep_train_store"]
    if saved.get("scoring") == "gradients":
        del saved["scoring"]
    return _without_projection_defaults(saved)


def _methods(settings: ScoreSettings) -> list[str]:
    """The method names asked for (normalised, without repeats), checked against the registry."""
    from datainf.methods import available_methods

    methods = list(dict.fromkeys(m.strip().lower().replace("-", "_") for m in settings.method))
    known = list(available_methods())
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise ConfigError(f"Unknown method(s) {unknown}; choose from {known}.")
    if not methods:
        raise ConfigError(f"No method given; choose from {known}.")
    opts = settings.method_options or {}
    bad = [k for k in opts if k not in methods]
    if bad:
        raise ConfigError(f"--method-options names method(s) {bad} that are not being run ({methods}).")
    for name, value in opts.items():
        if not isinstance(value, Mapping):
            raise ConfigError(f"--method-options[{name!r}] must be a JSON object of options, got {value!r}.")
    return methods


def _same_scores(
    scores: Scores, config: InfluenceConfig, train_store: GradientSource, test_store: GradientSource | None
) -> bool:
    """Whether finished scores were computed from these very gradients, in this mode, with this
    normalisation (``config``: the method's settings; logs when not)."""
    same = scores.matches(train_store, test_store)
    if not same:
        logger.info("The %s scores in the output folder came from other gradients; recomputing them.", scores.method)
        return False
    if scores.mode != config.mode or bool(scores.settings.get("normalize", False)) != config.normalize:
        logger.info(
            "The %s scores in the output folder have another mode or normalisation; recomputing them.", scores.method
        )
        return False
    if scores.settings.get("scoring", "gradients") != config.scoring:
        logger.info(
            "The %s scores in the output folder come from another scoring pass; recomputing them.", scores.method
        )
        return False
    return True


def _same_loss(scores: Scores, train_store: GradientSource) -> bool:
    """Whether a finished ``scores-loss`` file is the training-loss baseline of these training examples
    under the model that computed ``train_store`` (logs when not)."""
    from datainf.baselines import LOSS_METHOD

    same = scores.method == LOSS_METHOD and scores.matches(train_store, None)
    if not same:
        logger.info("The training-loss baseline in the output folder is of another model or data; recomputing it.")
    return same

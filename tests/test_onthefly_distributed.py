"""On-the-fly training gradients under 2 gloo ranks: the store path's scores, each rank computing its own rows only.

One launch of two spawned ranks with torchrun's environment variables (like ``tests/test_distributed.py``).
Each rank scores the tiny regressor of ``tests/test_onthefly.py`` with every registered method in
``average`` and ``self`` mode, counts the gradients it computed, and reruns DataInf with a shared
work folder (norms and passes read back); then DataInf's fused norms pass (a pilot of 3 rows per rank)
on the small classifier of ``tests/test_onthefly_fused.py``, average and pairwise, and once more with
the scoring pass by loss differences (each rank checks its own rows).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import datainf
from datainf.methods import available_methods, get_method
from test_onthefly import HalfSquaredError, regression_records, regressor
from test_onthefly_fused import CrossEntropy, class_records, classifier
from two_ranks import free_port, launch, set_rank_env

WORLD = 2
DEADLINE_S = 240.0
N_TRAIN, N_TEST = 24, 5


def _options(method: str) -> dict[str, Any]:
    return {"iterations": 4, "scale": "trace"} if method == "lissa" else {}


def _scores(train: Any, test: Any) -> dict[str, torch.Tensor]:
    out = {}
    for method in available_methods():
        if getattr(get_method(method), "needs_factors", False):  # kfac, ekfac: covered in test_onthefly.py
            continue
        for mode in ("average", "self"):
            scores = datainf.influence(
                train,
                None if mode == "self" else test,
                method=method,
                mode=mode,
                method_options=_options(method),
                batch_size=5,
                progress=False,
            )
            out[f"{method}-{mode}"] = scores.values
    return out


def _job(rank: int, port: int, root: str) -> None:
    set_rank_env(rank, port, WORLD)
    import warnings

    warnings.simplefilter("ignore")
    assert datainf.distributed.dist_context().world_size == WORLD
    model, task = regressor(), HalfSquaredError()
    train, test_records = regression_records(N_TRAIN, 0), regression_records(N_TEST, 1)
    test = datainf.OnTheFlyGradients(model, task, test_records, progress=False).to_dict()

    source = datainf.OnTheFlyGradients(model, task, train, batch_size=4, progress=False)
    computed: list[int] = []
    batches = source._batches

    def counted(wanted: range, names: Any, size: int) -> Any:
        computed.append(len(wanted))
        return batches(wanted, names, size)

    source._batches = counted  # type: ignore[method-assign]
    datainf.influence(source, test, progress=False)
    rows_of_datainf = list(computed)  # pilot (all 12: the default 128 > 12), fused pass, scoring: 12 rows each
    recorded = source.recorded_losses()  # each rank computed 12 rows: gathered
    results: dict[str, Any] = _scores(source, test)
    results["recorded_losses"] = recorded

    work = Path(root) / "work"  # shared by both ranks: rank 0 writes, both read
    first = datainf.influence(
        datainf.OnTheFlyGradients(model, task, train, work_dir=work, progress=False), test, progress=False
    )
    again_source = datainf.OnTheFlyGradients(model, task, train, work_dir=work, progress=False)
    again = datainf.influence(again_source, test, progress=False)
    results["checks"] = {
        "rows_of_datainf": rows_of_datainf,
        "resumed_equal": bool(torch.equal(first.values, again.values)),
        "replayed": again.diagnostics["replayed_passes"],
        "passes_after_resume": again_source.passes,
    }
    results["fused"] = _fused_scores(
        lambda: datainf.OnTheFlyGradients(
            classifier(),
            CrossEntropy(),
            class_records(N_TRAIN, 0),
            batch_size=5,
            pilot_rows=FUSED_PILOT,
            progress=False,
        )
    )
    results["lossdiff"] = _loss_difference_scores()
    torch.save(results, Path(root) / f"onthefly-rank{rank}.pt")


FUSED_PILOT = 3


def _fused_scores(make_source: Any) -> dict[str, Any]:
    """DataInf average and pairwise on fresh sources: values, the fused-pass diagnostics, rows computed (this rank)."""
    test_records = class_records(N_TEST, 1)
    test = datainf.OnTheFlyGradients(classifier(), CrossEntropy(), test_records, progress=False).to_dict()
    out: dict[str, Any] = {}
    for mode in ("average", "pairwise"):
        source = make_source()
        scores = datainf.influence(source, test, mode=mode, batch_size=7, progress=False)
        out[mode] = (scores.values, scores.diagnostics.get("fused_norms_pass"), source.rows_computed)
    return out


LOSS_DIFFERENCE_CHECK = 4  # rows checked per process: 8 of each rank's 12 rows are scored by loss differences


def _loss_difference_scores() -> tuple[torch.Tensor, dict[str, Any], int, int]:
    """DataInf average with the scoring pass by loss differences: values, diagnostics, gradient and forward rows."""
    from datainf.methods import scoring

    kept = scoring.LOSS_DIFFERENCE_CHECK_ROWS
    scoring.LOSS_DIFFERENCE_CHECK_ROWS = LOSS_DIFFERENCE_CHECK
    try:
        model, task = classifier(), CrossEntropy()
        test = datainf.OnTheFlyGradients(model, task, class_records(N_TEST, 1), progress=False).to_dict()
        source = datainf.OnTheFlyGradients(
            model, task, class_records(N_TRAIN, 0), batch_size=5, pilot_rows=FUSED_PILOT, progress=False
        )
        scores = datainf.influence(source, test, batch_size=7, scoring="loss-difference", progress=False)
    finally:
        scoring.LOSS_DIFFERENCE_CHECK_ROWS = kept
    return scores.values, scores.diagnostics["loss_difference"], source.rows_computed, source.forward_rows


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict[str, Any]]:
    root = tmp_path_factory.mktemp("onthefly-dist")
    codes = launch(_job, (free_port(), str(root)), world=WORLD, deadline_s=DEADLINE_S, what="the distributed job")
    assert codes == [None] * WORLD, f"a rank failed: exit codes {codes}"
    return [torch.load(root / f"onthefly-rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.mark.filterwarnings("ignore::datainf.methods.LissaDivergenceWarning")
def test_two_ranks_on_the_fly_equal_one_process_store(ranks) -> None:
    from datainf.gradients import collect_gradients

    model, task = regressor(), HalfSquaredError()
    store = collect_gradients(model, task, regression_records(N_TRAIN, 0), batch_size=8, progress=False)
    test = collect_gradients(model, task, regression_records(N_TEST, 1), batch_size=8, progress=False)
    expected = _scores(store, test)
    for key, value in expected.items():
        scale = float(value.abs().max())
        torch.testing.assert_close(ranks[0][key], value, rtol=1e-4, atol=1e-5 * scale, msg=key)
        assert torch.equal(ranks[1][key], ranks[0][key]), key  # every rank returns the same scores


def test_two_ranks_fused_norms_pass_equals_one_process(ranks) -> None:
    single = _fused_scores(
        lambda: datainf.OnTheFlyGradients(
            classifier(),
            CrossEntropy(),
            class_records(N_TRAIN, 0),
            batch_size=5,
            pilot_rows=FUSED_PILOT,
            progress=False,
        )
    )
    for mode, (values, info, rows) in single.items():
        assert info["used"] and rows == 2 * N_TRAIN + FUSED_PILOT
        scale = float(values.abs().max())
        for rank in ranks:
            got, got_info, got_rows = rank["fused"][mode]
            torch.testing.assert_close(got, values, rtol=1e-4, atol=1e-5 * scale, msg=mode)
            assert got_info["used"] and got_info["pilot_rows"] == WORLD * FUSED_PILOT
            assert got_rows == 2 * (N_TRAIN // WORLD) + FUSED_PILOT  # each rank: its pilot, its share twice
        assert torch.equal(ranks[1]["fused"][mode][0], ranks[0]["fused"][mode][0])


def test_each_rank_computes_its_own_rows_only_and_resumes(ranks) -> None:
    for rank in ranks:
        checks = rank["checks"]
        assert checks["rows_of_datainf"] == [N_TRAIN // WORLD] * 3  # pilot + fused + scoring, local rows only
        # a finished run read back whole: norms, DataInf's sum and the scoring pass, no gradient recomputed
        assert checks["resumed_equal"] and checks["replayed"] == 2 and checks["passes_after_resume"] == 0


def test_two_ranks_loss_difference_scoring_checks_every_rank_and_matches_one_process(ranks) -> None:
    single, single_info, _, _ = _loss_difference_scores()
    assert single_info["used"] and single_info["check_rows"] == LOSS_DIFFERENCE_CHECK
    share = N_TRAIN // WORLD
    for rank in ranks:
        values, info, gradient_rows, forward_rows = rank["lossdiff"]
        assert info["used"] and info["check_rows"] == WORLD * LOSS_DIFFERENCE_CHECK  # each rank checks its own rows
        assert gradient_rows == FUSED_PILOT + share + LOSS_DIFFERENCE_CHECK
        assert forward_rows == share + 2 * LOSS_DIFFERENCE_CHECK  # the checked rows at 3 steps
        scale = float(single.abs().max())
        torch.testing.assert_close(values, single, rtol=2e-2, atol=2e-2 * scale)  # both approximate
    assert torch.equal(ranks[1]["lossdiff"][0], ranks[0]["lossdiff"][0])  # every rank returns the same scores


def test_two_ranks_gather_the_recorded_losses(ranks) -> None:
    from datainf.baselines import training_losses

    model, task = regressor(), HalfSquaredError()
    expected = training_losses(model, task, regression_records(N_TRAIN, 0), batch_size=4)
    for rank in ranks:
        assert rank["recorded_losses"] is not None
        torch.testing.assert_close(rank["recorded_losses"], expected, rtol=1e-6, atol=0)
    assert torch.equal(ranks[0]["recorded_losses"], ranks[1]["recorded_losses"])

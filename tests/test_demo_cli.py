"""``datainf demo``'s --methods / --variants / --no-variants (issue 16 item 6), without running the demo: the
mislabel pipeline is replaced by a recorder, or refuses before any work."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import datainf.demos
import datainf.demos.mislabel as mislabel
from datainf.cli import main
from datainf.demos.mislabel import METHODS, RELABEL_RANK_BY, VARIANTS, ScoreVariant, demo_rows, parse_variants
from datainf.errors import ConfigError


@pytest.fixture
def recorded(monkeypatch, tmp_path: Path) -> list[dict[str, Any]]:
    """``run_mislabel_demo``'s keyword arguments, one dict per call (the text and the --json path)."""
    calls: list[dict[str, Any]] = []

    def fake(config: Any = None, **kwargs: Any) -> mislabel.MislabelDemoResult:
        calls.append({"config": config, **kwargs})
        row = {"method": "datainf", "auc": 0.5, "found_at_10": 0.1, "found_at_20": 0.2, "seconds": 0.0, "notes": ""}
        return mislabel.MislabelDemoResult(
            table=[row], scores={}, report=tmp_path / "report.html", cache=tmp_path, stage_seconds={}
        )

    monkeypatch.setattr(mislabel, "run_mislabel_demo", fake)
    monkeypatch.setattr(datainf.demos, "run_mislabel_demo", fake)
    return calls


def test_defaults_run_the_demo_as_before(recorded, capsys, tmp_path: Path) -> None:
    assert main(["demo", "--out", str(tmp_path / "d"), "-q"]) == 0
    assert main(["demo", "--out", str(tmp_path / "d"), "-q", "--json"]) == 0
    assert main(["demo", "--out", str(tmp_path / "d"), "-q", "--json", "--cleaning"]) == 0
    text, json_call, cleaning = recorded
    assert text["cleaning_shares"] is None  # as before: the text path always passed it
    assert {"methods", "variants", "relabel_rank_by", "cleaning_shares"}.isdisjoint(json_call)
    assert cleaning["cleaning_shares"] == mislabel.CLEANING_SHARES  # --json now honours --cleaning too
    for call in recorded:  # no row flag: run_mislabel_demo's own defaults, METHODS and VARIANTS
        assert {"methods", "variants", "relabel_rank_by"}.isdisjoint(call)
        assert call["config"] == mislabel.MislabelDemoConfig()  # the cache key, cache-6786655285, is unchanged
    assert demo_rows() == {"methods": METHODS, "variants": VARIANTS, "relabel_rank_by": RELABEL_RANK_BY}


def test_methods_and_variants_reach_the_demo(recorded, capsys, tmp_path: Path) -> None:
    code = main(
        ["demo", "--out", str(tmp_path / "d"), "-q", "--methods", "datainf,ekfac", "--method", "hessian-free",
         "--variants", "datainf:self,hessian_free:normalized", "--variants", "exact:self+normalize"]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    (call,) = recorded
    assert call["methods"] == ("datainf", "ekfac", "hessian_free")
    assert call["variants"] == (
        ScoreVariant("datainf", mode="self"),
        ScoreVariant("hessian_free", normalize=True),
        ScoreVariant("exact", mode="self", normalize=True),
    )
    assert call["relabel_rank_by"] == "datainf (self)"
    assert main(["demo", "--out", str(tmp_path / "d"), "-q", "--no-variants", "--methods", "exact", "--json"]) == 0
    assert recorded[1]["variants"] == () and recorded[1]["methods"] == ("exact",)
    assert recorded[1]["relabel_rank_by"] is None  # no 'datainf (self)' row: no relabel suggestions


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--methods", "magic"], "Unknown method(s) ['magic'] in --methods"),
        (["--variants", "datainf:selfish"], "tags are self and normalized"),
        (["--variants", ":self"], "names no method"),
        (["--variants", "magic:self"], "Unknown method(s) ['magic']"),
        (["--variants", "datainf:self", "--no-variants"], "contradict each other"),
        (["--task", "text-generation", "--methods", "datainf"], "--methods choose the rows of the mislabel demo"),
        (["--task", "text-to-image", "--no-variants"], "--task text-to-image takes none of them"),
    ],
)
def test_bad_rows_are_refused_before_any_work(recorded, capsys, tmp_path: Path, argv, message) -> None:
    assert main(["demo", "--out", str(tmp_path / "d"), "-q", *argv]) == 2
    assert message in capsys.readouterr().err
    assert recorded == [] and not (tmp_path / "d").exists()


def test_the_demo_itself_refuses_rows_it_cannot_score(tmp_path: Path) -> None:
    """Checked by run_mislabel_demo before any data is read or folder made (the real function)."""
    with pytest.raises(ConfigError, match="kfac uses the Kronecker factors of the raw gradients"):
        mislabel.run_mislabel_demo(out_dir=tmp_path, variants=parse_variants(["kfac:normalized"]), progress=False)
    with pytest.raises(ConfigError, match="include datainf in the methods"):
        mislabel.run_mislabel_demo(out_dir=tmp_path, methods=("exact",), cleaning_shares=(0.0, 0.1), progress=False)
    assert list(tmp_path.iterdir()) == []


def test_kronecker_rows_make_the_demo_collect_factors() -> None:
    assert not mislabel.factors_needed(METHODS, VARIANTS)  # the default demo collects no factors, as before
    assert mislabel.factors_needed(("datainf",), parse_variants(["ekfac:self"]))
    assert mislabel.factors_needed(("kfac",), ())
    assert demo_rows(["kfac"], no_variants=True)["methods"] == ("kfac",)

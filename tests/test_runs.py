"""RunDir: claiming output folders, refusing other configurations, cached stages, stage timing."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import time
from pathlib import Path

import pytest

from datainf import __version__
from datainf.errors import ConfigError, DatasetError
from datainf.runs import CONFIG_FILE, RUN_CONFIG_FORMAT, RunDir, has_progress, removed_on_error, settings_key

SETTINGS = {"out": "ignored", "damping": 0.1, "method": ["datainf"], "shape": (2, 3)}


def test_claim_new_folder_writes_config(tmp_path: Path) -> None:
    run = RunDir.claim(tmp_path / "a" / "b", kind="score", settings=SETTINGS)
    assert run.path == tmp_path / "a" / "b" and run.path.is_dir() and not run.is_resumed and run.kind == "score"
    stored = json.loads((run.path / CONFIG_FILE).read_text())
    assert stored == {
        "format": RUN_CONFIG_FORMAT,
        "command": "score",
        "datainf_version": __version__,
        "out": "ignored",
        "damping": 0.1,
        "method": ["datainf"],
        "shape": [2, 3],
    }
    assert list(stored)[:3] == ["format", "command", "datainf_version"]


def test_claim_same_configuration_resumes_and_keeps_files(tmp_path: Path) -> None:
    RunDir.claim(tmp_path, kind="score", settings=SETTINGS)
    (tmp_path / "scores-datainf.safetensors").write_bytes(b"x")
    # the output folder itself and the version are not compared; tuples compare as the lists JSON holds
    again = RunDir.claim(tmp_path, kind="score", settings={**SETTINGS, "out": "elsewhere", "shape": [2, 3]})
    assert again.is_resumed and (tmp_path / "scores-datainf.safetensors").read_bytes() == b"x"


def test_claim_accepts_config_written_by_the_previous_command_line(tmp_path: Path) -> None:
    """A run folder made before RunDir existed (cli._saved's layout, another version) is the same configuration."""
    old = {
        "format": "datainf-cli-config",
        "command": "grads",
        "datainf_version": "0.0.9",
        "out": str(tmp_path),
        "model": "/m",
        "kind": "classification",
        "max_length": 16,
        "target_modules": ["query", "value"],
    }
    (tmp_path / CONFIG_FILE).write_text(json.dumps(old, indent=2))
    settings = {k: v for k, v in old.items() if k not in ("format", "command", "datainf_version")}
    run = RunDir.claim(tmp_path, kind="grads", settings=settings)
    assert run.is_resumed
    assert json.loads((tmp_path / CONFIG_FILE).read_text())["datainf_version"] == __version__


def test_claim_different_configuration_is_refused_naming_the_keys(tmp_path: Path) -> None:
    RunDir.claim(tmp_path, kind="score", settings=SETTINGS)
    (tmp_path / "scores-datainf.safetensors").write_bytes(b"x")
    with pytest.raises(ConfigError) as info:
        RunDir.claim(tmp_path, kind="score", settings={**SETTINGS, "damping": 0.2, "extra": 1})
    message = str(info.value)
    assert "different configuration" in message and "damping (stored 0.1, now 0.2)" in message
    assert "extra (stored None, now 1)" in message and "--overwrite" in message and "overwrite=True" in message
    assert (tmp_path / "scores-datainf.safetensors").is_file()  # nothing deleted
    with pytest.raises(ConfigError, match="command"):
        RunDir.claim(tmp_path, kind="grads", settings=SETTINGS)


def test_claim_lists_at_most_five_differences(tmp_path: Path) -> None:
    RunDir.claim(tmp_path, kind="x", settings={f"k{i}": i for i in range(7)})
    with pytest.raises(ConfigError) as info:
        RunDir.claim(tmp_path, kind="x", settings={f"k{i}": -i - 1 for i in range(7)})
    assert str(info.value).count("stored") == 5 and " ..." in str(info.value)


def test_overwrite_clears_a_different_configuration(tmp_path: Path) -> None:
    RunDir.claim(tmp_path, kind="score", settings=SETTINGS)
    (tmp_path / "scores-datainf.safetensors").write_bytes(b"x")
    run = RunDir.claim(tmp_path, kind="score", settings={**SETTINGS, "damping": 0.2}, overwrite=True)
    assert not run.is_resumed and not (tmp_path / "scores-datainf.safetensors").exists()
    assert json.loads((tmp_path / CONFIG_FILE).read_text())["damping"] == 0.2


def test_foreign_non_empty_folder_is_refused_even_with_overwrite(tmp_path: Path) -> None:
    (tmp_path / "thesis.tex").write_text("precious")
    for overwrite in (False, True):
        with pytest.raises(ConfigError, match="not empty and was not written by `datainf score`"):
            RunDir.claim(tmp_path, kind="score", settings=SETTINGS, overwrite=overwrite)
    assert (tmp_path / "thesis.tex").read_text() == "precious" and not (tmp_path / CONFIG_FILE).exists()
    # a folder the caller recognises (e.g. a bare gradient store) is accepted, and cleared by overwrite
    accepted = RunDir.claim(
        tmp_path, kind="score", settings=SETTINGS, allow_foreign=lambda p: (p / "thesis.tex").is_file()
    )
    assert not accepted.is_resumed and (tmp_path / "thesis.tex").is_file()
    (tmp_path / CONFIG_FILE).unlink()
    RunDir.claim(tmp_path, kind="score", settings=SETTINGS, allow_foreign=lambda p: True, overwrite=True).release()
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_FILE]


def test_claim_refuses_a_file_a_missing_path_and_reserved_keys(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("")
    with pytest.raises(ConfigError, match="is a file"):
        RunDir.claim(tmp_path / "f", kind="score", settings=SETTINGS)
    with pytest.raises(ConfigError, match="`datainf score` needs --out DIR"):
        RunDir.claim(None, kind="score", settings=SETTINGS)
    with pytest.raises(ConfigError, match="reserved"):
        RunDir.claim(tmp_path / "g", kind="score", settings={"command": "grads"})


def test_unreadable_config_is_a_different_configuration(tmp_path: Path) -> None:
    (tmp_path / CONFIG_FILE).write_text("{not json")
    with pytest.raises(ConfigError, match="unreadable"):
        RunDir.claim(tmp_path, kind="score", settings=SETTINGS)
    assert RunDir.claim(tmp_path, kind="score", settings=SETTINGS, overwrite=True).path == tmp_path


def test_config_is_written_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    RunDir.claim(tmp_path, kind="score", settings=SETTINGS)
    before = (tmp_path / CONFIG_FILE).read_bytes()

    def interrupted(src: str, dst: str) -> None:  # the process dies between writing and renaming
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        RunDir.claim(tmp_path, kind="score", settings=SETTINGS)  # resumes, rewriting config.json
    monkeypatch.undo()
    assert (tmp_path / CONFIG_FILE).read_bytes() == before  # never half-written
    RunDir(tmp_path).release()  # the first claim's lock (the interrupted claim released its own)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_FILE]  # no temporary file left
    run = RunDir.claim(tmp_path / "w", kind="score", settings=SETTINGS, write_config=False)
    assert not (run.path / CONFIG_FILE).exists()
    assert run.write_config() == run.path / CONFIG_FILE
    assert json.loads((run.path / CONFIG_FILE).read_text())["command"] == "score"


def test_cached_computes_then_reuses_then_recomputes_unaccepted(tmp_path: Path) -> None:
    run = RunDir.claim(tmp_path, kind="score", settings=SETTINGS)
    calls: list[Path] = []

    def compute(path: Path) -> dict[str, int]:
        calls.append(path)
        return {"value": len(calls)}

    def save(value: dict[str, int], path: Path) -> None:
        path.write_text(json.dumps(value))

    def load(path: Path) -> dict[str, int]:
        return json.loads(path.read_text())

    assert run.cached("result.json", compute, load=load, save=save) == {"value": 1}
    assert calls == [tmp_path / "result.json"] and run.reused == []
    assert run.cached("result.json", compute, load=load, save=save) == {"value": 1}  # reused, not computed
    assert len(calls) == 1 and run.reused == ["result.json"]
    assert run.load_finished("result.json", load=load) == {"value": 1}
    # a finished stage that does not fit (e.g. scores of other gradients) is computed again
    assert run.cached("result.json", compute, load=load, save=save, accept=lambda v: v["value"] == 2) == {"value": 2}
    assert run.load_finished("result.json", load=load, accept=lambda v: v["value"] == 3) is None
    # is_done decides what counts as finished; a compute that writes the stage itself needs no save
    folder_calls = []

    def train(path: Path) -> Path:
        folder_calls.append(path)
        path.mkdir()
        (path / "adapter_config.json").write_text("{}")
        return path

    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "partial").write_text("")
    done = lambda p: (p / "adapter_config.json").is_file()  # noqa: E731
    with pytest.raises(FileExistsError):
        run.cached("adapter", train, load=lambda p: p, is_done=done)  # not finished: computed (and fails here)
    (tmp_path / "adapter" / "partial").unlink()
    (tmp_path / "adapter").rmdir()
    assert run.cached("adapter", train, load=lambda p: p, is_done=done) == tmp_path / "adapter"
    assert run.cached("adapter", train, load=lambda p: p, is_done=done) == tmp_path / "adapter"
    assert len(folder_calls) == 2 and run.reused[-1] == "adapter"


def test_stage_names_stay_inside_the_run(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    assert (
        run.stage("grads-train") == tmp_path / "grads-train"
        and run.stage("report/index.html") == tmp_path / "report" / "index.html"
    )
    for bad in ("", "../x", "/etc/passwd", "a/../../b"):
        with pytest.raises(ConfigError, match="relative path"):
            run.stage(bad)


def test_timed_records_and_sums_seconds(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    with run.timed("gradients"):
        time.sleep(0.02)
    first = run.stage_seconds["gradients"]
    assert first >= 0.02
    with pytest.raises(RuntimeError), run.timed("gradients"):
        time.sleep(0.01)
        raise RuntimeError("boom")
    assert run.stage_seconds["gradients"] >= first + 0.01 and list(run.stage_seconds) == ["gradients"]


def test_write_and_read_json(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    assert run.read_json("summary.json") is None
    path = run.write_json("summary.json", {"auc": 0.5, "p": Path("x")})
    assert path == tmp_path / "summary.json" and run.read_json("summary.json") == {"auc": 0.5, "p": "x"}
    (tmp_path / "bad.json").write_text("{")
    assert run.read_json("bad.json") is None


def test_for_settings_names_the_folder_by_the_key(tmp_path: Path) -> None:
    settings = {"n_train": 400, "target_modules": ("query", "value"), "seed": 0}
    # the recipe the demos use for their cache folders
    as_json = json.dumps({"n_train": 400, "target_modules": ["query", "value"], "seed": 0}, sort_keys=True)
    expected = hashlib.sha256(as_json.encode()).hexdigest()[:10]
    assert settings_key(settings) == expected
    run = RunDir.for_settings(tmp_path, settings)
    assert run.path == tmp_path / f"cache-{expected}" and not run.is_resumed
    assert json.loads((run.path / CONFIG_FILE).read_text()) == {
        "n_train": 400,
        "target_modules": ["query", "value"],
        "seed": 0,
    }
    # a caller-supplied key keeps an existing cache folder's name; a rerun finds its stages
    keyed = RunDir.for_settings(tmp_path, {"config": settings, "base_unet": "/b"}, key="0123abcdef", prefix="cache")
    assert keyed.path == tmp_path / "cache-0123abcdef"
    (keyed.path / "adapter.safetensors").write_bytes(b"a")
    again = RunDir.for_settings(tmp_path, {"config": settings, "base_unet": "/b"}, key="0123abcdef")
    assert again.is_resumed and again.load_finished("adapter.safetensors", load=Path.read_bytes) == b"a"
    # recompute starts over
    fresh = RunDir.for_settings(tmp_path, {"config": settings}, key="0123abcdef", recompute=True)
    assert not fresh.is_resumed and sorted(p.name for p in fresh.path.iterdir()) == [CONFIG_FILE]
    with pytest.raises(ConfigError, match="one plain name"):
        RunDir.for_settings(tmp_path, settings, key="../up")


def test_run_dir_pickles_for_broadcast(tmp_path: Path) -> None:
    run = RunDir.claim(tmp_path, kind="score", settings=SETTINGS)
    with run.timed("x"):
        pass
    copy = pickle.loads(pickle.dumps(run))
    assert copy.path == run.path and copy.settings == run.settings and copy.stage_seconds == run.stage_seconds
    assert copy.kind == "score" and copy.is_resumed is False and "score" in repr(copy)


def test_removed_on_error_removes_only_fresh_unfinished_folders(tmp_path: Path) -> None:
    fresh = tmp_path / "fresh"
    with pytest.raises(DatasetError), removed_on_error(fresh):
        RunDir.claim(fresh, kind="grads", settings=SETTINGS)
        raise DatasetError("bad labels")
    assert not fresh.exists()
    # finished work is kept
    kept = tmp_path / "kept"
    with pytest.raises(DatasetError), removed_on_error(kept):
        RunDir.claim(kept, kind="grads", settings=SETTINGS)
        (kept / "shard-00000.safetensors").write_bytes(b"")
        raise DatasetError("later failure")
    assert has_progress(kept)
    # a folder that existed with content is never removed; neither on other exceptions
    with pytest.raises(DatasetError), removed_on_error(kept):
        (kept / "shard-00000.safetensors").unlink()
        raise DatasetError("x")
    assert kept.is_dir()
    other = tmp_path / "other"
    with pytest.raises(KeyboardInterrupt), removed_on_error(other):
        other.mkdir()
        raise KeyboardInterrupt
    assert other.is_dir() and not has_progress(other)
    with removed_on_error(None):
        pass


def test_rank_helpers_in_one_process(tmp_path: Path) -> None:
    from datainf.distributed import check_same_settings, dist_context, on_every_rank, on_main

    ctx = dist_context()
    run = on_main(ctx, "Checking the output folder", lambda: RunDir.claim(tmp_path, kind="score", settings=SETTINGS))
    assert isinstance(run, RunDir) and run.path == tmp_path
    assert on_every_rank(ctx, "Reading", lambda: 3) == 3
    with pytest.raises(DatasetError, match="bad"):
        on_main(ctx, "Reading", lambda: (_ for _ in ()).throw(DatasetError("bad")))
    with pytest.raises(DatasetError, match="bad"):
        on_every_rank(ctx, "Reading", lambda: (_ for _ in ()).throw(DatasetError("bad")))
    check_same_settings(ctx, "settings of `datainf score`", {"damping": 0.1})  # nothing to compare with

"""Failures a new user hit (issue 12): each one clear DataInfError, nothing left behind; locks, config identity,
file modes, shard checksums, report inputs, blank texts, ``--json`` summaries."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import textwrap
from collections import namedtuple
from pathlib import Path

import pytest
import safetensors
import torch

import datainf.runs
import datainf.store.disk
from datainf.cli import main
from datainf.data.tabular import load_records
from datainf.errors import (
    ConfigError,
    DatasetError,
    DeviceError,
    DiskFullError,
    OutputError,
    OutputLockedError,
    StoreCorruptedError,
)
from datainf.runs import CONFIG_FILE, INPUTS_FILE, LOCK_FILE, RunDir, check_device, removed_on_error
from datainf.scores import Scores
from datainf.store import GradientStore, atomic_write_bytes, file_mode

DIMS = {"blk.lora_A": 6, "blk.lora_B": 4}
SRC = str(Path(datainf.__file__).resolve().parents[1])


def fill_store(path: Path | None, n: int, seed: int, *, shard_size: int = 4) -> GradientStore:
    generator = torch.Generator().manual_seed(seed)
    grads = {name: torch.randn(n, d, generator=generator) for name, d in DIMS.items()}
    store = GradientStore.create(path, block_dims=DIMS, fingerprint={"model": "m"}, shard_size=shard_size)
    store.append([f"ex{i}" for i in range(n)], grads)
    store.finalize()
    return store


@pytest.fixture
def stores(tmp_path: Path) -> tuple[Path, Path]:
    fill_store(tmp_path / "g-train", 10, seed=1)
    fill_store(tmp_path / "g-test", 3, seed=2)
    return tmp_path / "g-train", tmp_path / "g-test"


def run_cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def score_args(stores: tuple[Path, Path], out: Path, *extra: object) -> list[object]:
    return ["score", "--train-grads", stores[0], "--test-grads", stores[1], "--out", out, "-q", *extra]


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("datainf: error: "), err
    assert "Traceback" not in err
    return lines[0]


def read_only(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    """Make ``folder`` (and everything under it) behave as a read-only file system: creating a folder or a
    file there fails with EROFS, as on a read-only mount (the tests run as root, where chmod does not bind)."""
    inside = str(folder.absolute())

    def guard(path: object) -> None:
        if os.path.abspath(os.fspath(path)).startswith(inside):  # type: ignore[arg-type]
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))  # type: ignore[arg-type]

    real_mkdir, real_open = os.mkdir, os.open

    def mkdir(path, mode=0o777, *args, **kwargs):
        guard(path)
        return real_mkdir(path, mode, *args, **kwargs)

    def open_(path, flags, mode=0o777, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            guard(path)
        return real_open(path, flags, mode, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(os, "open", open_)


# ---------------------------------------------------------------------------------------------- item 4: read-only --out


def test_read_only_new_out_folder_is_one_error_and_leaves_nothing(stores, capsys, tmp_path, monkeypatch):
    parent = tmp_path / "ro"
    parent.mkdir()
    read_only(monkeypatch, parent)
    code, out, err = run_cli(capsys, *score_args(stores, parent / "new" / "run"))
    line = one_error_line(err)
    assert code == 2 and out == "" and "read-only file system" in line and "Choose an --out folder" in line
    monkeypatch.undo()
    assert list(parent.iterdir()) == []


def test_read_only_existing_out_folder_is_one_error_and_leaves_nothing(stores, capsys, tmp_path, monkeypatch):
    # an empty folder, and one holding a finished run of the same configuration (a rerun would resume it)
    empty, finished = tmp_path / "empty", tmp_path / "finished"
    empty.mkdir()
    assert run_cli(capsys, *score_args(stores, finished))[0] == 0
    before = sorted(p.name for p in finished.iterdir())
    for folder in (empty, finished):
        with monkeypatch.context() as patch:
            read_only(patch, folder)
            code, _, err = run_cli(capsys, *score_args(stores, folder, "--overwrite"))
        assert code == 2 and "read-only file system" in one_error_line(err)
    # nothing written: the empty folder is left empty (or removed, as after any refused first run)
    assert (not empty.exists() or list(empty.iterdir()) == []) and sorted(p.name for p in finished.iterdir()) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder_by_permissions(stores, capsys, tmp_path):  # pragma: no cover - CI runs as root here
    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        code, _, err = run_cli(capsys, *score_args(stores, parent / "new"))
        assert code == 2 and "may not be written" in one_error_line(err)
        assert list(parent.iterdir()) == []
    finally:
        parent.chmod(0o755)


# ---------------------------------------------------------------------------------------------- item 5: disk full

Usage = namedtuple("Usage", "total used free")


def test_free_space_is_checked_before_a_store_is_written(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**9, 10**9 - 5000, 5000))
    path = tmp_path / "g"
    with pytest.raises(DiskFullError) as info:
        GradientStore.create(path, block_dims=DIMS, fingerprint={"model": "m"}, expected_examples=10_000)
    message = str(info.value)
    # 10,000 examples x (10 float32 + 2 float64 norms) = 560,000 bytes, plus a header per shard of 1,024
    assert "needs about 553.1 KiB, 4.9 KiB is free" in message and str(path) in message and "--dtype" in message
    assert not path.exists()
    # the estimate: numbers in the storage dtype plus the float64 norms, per example
    store = GradientStore.create(tmp_path / "h", block_dims=DIMS, dtype="bfloat16", shard_size=100)
    assert store.expected_bytes(100) == 100 * (10 * 2 + 2 * 8) + store.expected_bytes(1) - (10 * 2 + 2 * 8)
    assert store.expected_bytes(0) == 0


def test_disk_full_while_writing_a_shard_is_one_error_and_the_store_resumes(tmp_path, monkeypatch):
    path = tmp_path / "g"
    generator = torch.Generator().manual_seed(0)
    grads = {name: torch.randn(12, d, generator=generator) for name, d in DIMS.items()}
    ids = [f"ex{i}" for i in range(12)]
    real_save = datainf.store.disk.save_file
    calls = {"n": 0}

    def save_until_full(tensors, filename, metadata=None):
        calls["n"] += 1
        if calls["n"] == 2:
            Path(filename).write_bytes(b"partial")  # what a full disk leaves: a cut-off temporary file
            raise safetensors.SafetensorError(
                'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
            )
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(datainf.store.disk, "save_file", save_until_full)
    store = GradientStore.create(path, block_dims=DIMS, fingerprint={"model": "m"}, shard_size=4)
    with pytest.raises(DiskFullError, match="The disk is full: writing .*shard-00001.safetensors failed") as info:
        store.append(ids[:8], {k: v[:8] for k, v in grads.items()})
    assert "rerun the same command" in str(info.value)
    assert not list(path.glob("*.tmp")) and not list(path.glob(".*.tmp"))  # temporary files removed
    monkeypatch.undo()
    resumed = GradientStore.create(path, block_dims=DIMS, fingerprint={"model": "m"}, shard_size=4)
    assert resumed.ids == ids[:4]  # the finished shard is kept
    resumed.append(ids[4:], {k: v[4:] for k, v in grads.items()})
    resumed.finalize()
    loaded = GradientStore.open(path).to_dict()
    assert all(torch.equal(loaded[k], grads[k]) for k in DIMS)


def test_disk_full_in_an_atomic_write_is_one_error(tmp_path, monkeypatch):
    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(DiskFullError, match="The disk is full"):
        atomic_write_bytes(tmp_path / "x.json", b"{}")
    assert list(tmp_path.iterdir()) == []


def test_cli_disk_full_is_one_line_and_leaves_nothing(stores, capsys, tmp_path, monkeypatch):
    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    code, _, err = run_cli(capsys, *score_args(stores, tmp_path / "s"))
    assert code == 2 and "The disk is full" in one_error_line(err)
    assert not (tmp_path / "s").exists()


# ---------------------------------------------------------------------------------------------- item 6: --device


def test_unavailable_device_is_refused_before_any_folder(stores, capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:1"):
        code, _, err = run_cli(capsys, *score_args(stores, tmp_path / "s", "--device", device))
        line = one_error_line(err)
        assert code == 2 and f"--device {device}" in line and "Use --device cpu" in line
    assert not (tmp_path / "s").exists()
    # the library refuses it too, before claiming
    with pytest.raises(DeviceError, match="--device cuda"):
        RunDir.claim(tmp_path / "lib", kind="score", settings={"device": "cuda"})
    assert not (tmp_path / "lib").exists()


def test_check_device_names_what_is_wrong(monkeypatch):
    check_device("cpu")
    check_device(None)
    with pytest.raises(DeviceError, match="not a torch device"):
        check_device("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    check_device("cuda")
    check_device("cuda:1")
    with pytest.raises(DeviceError, match="only 2 CUDA device.* cuda:0, cuda:1"):
        check_device("cuda:2")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="MPS backend is not available"):
        check_device("mps")
    assert issubclass(DeviceError, ConfigError)


# ---------------------------------------------------------------------------------------------- item 7: checksums


def _poison_last_value(shard: Path) -> None:
    """Change a shard in place, same size: its last float64 becomes NaN (the bytes a disk fault could flip)."""
    data = bytearray(shard.read_bytes())
    data[-8:] = bytes.fromhex("000000000000f87f")
    shard.write_bytes(bytes(data))


def test_a_changed_shard_is_refused_by_name_and_deleting_it_recomputes_it(tmp_path):
    path = tmp_path / "g"
    original = fill_store(path, 10, seed=3).to_dict()
    shard = path / "shard-00001.safetensors"
    _poison_last_value(shard)
    for read in (lambda s: s.to_dict(), lambda s: s.squared_norms()):
        with pytest.raises(StoreCorruptedError) as info:
            read(GradientStore.open(path))
        message = str(info.value)
        assert "shard-00001.safetensors" in message and "SHA-256" in message
        assert f"Delete {shard}" in message and "rerun the command that wrote" in message
    # the remedy works: delete the shard; reopening the store to write it recomputes only that shard's examples
    shard.unlink()
    with pytest.raises(StoreCorruptedError, match="missing"):
        GradientStore.open(path)
    resumed = GradientStore.create(path, block_dims=DIMS, fingerprint={"model": "m"}, shard_size=4)
    assert resumed.ids == [f"ex{i}" for i in (0, 1, 2, 3, 8, 9)]
    resumed.append([f"ex{i}" for i in range(4, 8)], {k: v[4:8] for k, v in original.items()})
    resumed.sort_shards([f"ex{i}" for i in range(10)])
    resumed.finalize()
    assert all(torch.equal(GradientStore.open(path).to_dict()[k], original[k]) for k in DIMS)
    assert sorted(p.name for p in path.glob("shard-*")) == [
        "shard-00000.safetensors",
        "shard-00002.safetensors",
        "shard-00003.safetensors",
    ]


def test_each_shard_is_hashed_once_per_process(tmp_path, monkeypatch):
    path = tmp_path / "g"
    fill_store(path, 10, seed=4)
    hashed: list[str] = []
    real = datainf.store.disk.file_sha256

    def counting(file: Path) -> str:
        hashed.append(Path(file).name)
        return real(file)

    monkeypatch.setattr(datainf.store.disk, "file_sha256", counting)
    GradientStore.open(path).to_dict()
    assert hashed == []  # written by this process: already known
    datainf.store.disk._VERIFIED_SHARDS.clear()  # as in a new process
    store = GradientStore.open(path)
    store.squared_norms()
    store.to_dict()
    GradientStore.open(path).to_dict()
    assert sorted(hashed) == ["shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors"]


# ---------------------------------------------------------------------------------------------- item 10: the lock


_HOLDER = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {src!r})
    from datainf.runs import RunDir
    RunDir.claim({out!r}, kind="score", settings={{"damping": 0.1}})
    print("claimed", flush=True)
    time.sleep(60)
    """
)


def test_a_second_process_is_refused_and_a_killed_owner_s_lock_is_taken_over(tmp_path, caplog):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER.format(src=SRC, out=str(out))], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "claimed"
        with pytest.raises(OutputLockedError) as info:
            RunDir.claim(out, kind="score", settings={"damping": 0.1})
        message = str(info.value)
        assert f"pid {holder.pid} on host {socket.gethostname()}" in message and "`datainf score`" in message
        assert f"delete {out / LOCK_FILE}" in message
        # refused while the other run holds it: its folder is not removed on the way out
        with pytest.raises(OutputLockedError), removed_on_error(out):
            RunDir.claim(out, kind="score", settings={"damping": 0.1})
        assert (out / CONFIG_FILE).is_file()
    finally:
        holder.kill()
        holder.wait()
    # the owner was killed (kill -9): its lock is stale and taken over, with a warning
    with caplog.at_level("WARNING", logger="datainf.runs"):
        run = RunDir.claim(out, kind="score", settings={"damping": 0.1})
    assert run.is_resumed and "stale lock" in caplog.text and str(holder.pid) in caplog.text
    held = json.loads((out / LOCK_FILE).read_text())
    assert held["pid"] == os.getpid() and held["host"] == socket.gethostname() and held["command"] == "score"
    run.release()
    assert not (out / LOCK_FILE).exists()


def test_lock_of_another_host_or_unreadable_is_refused_with_how_to_clear(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    lock = out / LOCK_FILE
    lock.write_text(json.dumps({"pid": 1, "host": "elsewhere", "command": "grads", "started": "2024-01-01T00:00:00"}))
    with pytest.raises(OutputLockedError, match="locked by `datainf grads` .*host elsewhere.*cannot tell") as info:
        RunDir.claim(out, kind="score", settings={})
    assert f"delete {lock} and rerun" in str(info.value)
    lock.write_text("{half")
    with pytest.raises(OutputLockedError, match="unreadable lock file"):
        RunDir.claim(out, kind="score", settings={})
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # nothing else written


def test_cli_refuses_a_folder_in_use_and_releases_its_own_lock(stores, capsys, tmp_path):
    out = tmp_path / "s"
    out.mkdir()
    # held by a live process on this host (our parent, e.g. the test runner's shell)
    (out / LOCK_FILE).write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(), "command": "score"}))
    code, _, err = run_cli(capsys, *score_args(stores, out, "--overwrite"))
    assert code == 2 and "is in use by another run" in one_error_line(err)
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # not cleared, not removed
    (out / LOCK_FILE).unlink()
    assert run_cli(capsys, *score_args(stores, out))[0] == 0
    assert not (out / LOCK_FILE).exists()  # released at the end of the run


def test_two_concurrent_cli_runs_on_one_new_folder(stores, tmp_path):
    """Two `datainf score` processes on the same new --out: one writes it, the other is refused or finds it done."""
    out = tmp_path / "s"
    env = {**os.environ, "PYTHONPATH": SRC}
    command = [sys.executable, "-m", "datainf.cli", *[str(a) for a in score_args(stores, out)]]
    procs = [subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read() if p.stderr else "") for p in procs]
    assert sorted(code for code, _ in results) in ([0, 0], [0, 2]), results
    for code, err in results:
        if code == 2:
            assert "is in use by another run" in err and "Traceback" not in err
    config = json.loads((out / CONFIG_FILE).read_text())
    assert config["command"] == "score" and (out / "scores-datainf.safetensors").is_file()
    assert not (out / LOCK_FILE).exists()


# ---------------------------------------------------------------------------------------------- item 11: config identity


def test_the_same_file_by_another_path_is_the_same_configuration(tmp_path, monkeypatch):
    data = tmp_path / "data" / "val.jsonl"
    data.parent.mkdir()
    data.write_text('{"text": "a", "label": 0}\n')
    (tmp_path / "work").mkdir()
    (tmp_path / "link.jsonl").symlink_to(data)
    out = tmp_path / "run"
    RunDir.claim(out, kind="score", settings={"train_data": str(data)}).release()
    assert json.loads((out / INPUTS_FILE).read_text())["files"]["train_data"]["path"] == str(data.resolve())
    monkeypatch.chdir(tmp_path / "work")
    for other in (Path("../data/val.jsonl").absolute(), tmp_path / "link.jsonl"):  # as the command line stores it
        again = RunDir.claim(out, kind="score", settings={"train_data": str(other)})
        assert again.is_resumed
        again.release()
    # the same path with other bytes is another configuration
    data.write_text('{"text": "b", "label": 1}\n')
    with pytest.raises(ConfigError, match="train_data \\(the file .* changed since the stored run: sha256"):
        RunDir.claim(out, kind="score", settings={"train_data": str(data)})
    # a folder written before inputs.json existed is compared by resolved path alone
    (out / INPUTS_FILE).unlink()
    old = RunDir.claim(out, kind="score", settings={"train_data": str(Path("../data/val.jsonl").absolute())})
    assert old.is_resumed
    old.release()
    # another file is another configuration
    with pytest.raises(ConfigError, match="different configuration: train_data"):
        RunDir.claim(out, kind="score", settings={"train_data": str(tmp_path / "other.jsonl")})


# ---------------------------------------------------------------------------------------------- item 12: umask


@pytest.mark.parametrize(("umask", "expected"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_output_files_follow_the_umask(tmp_path, umask, expected):
    previous = os.umask(umask)
    try:
        assert file_mode() == expected and file_mode(folder=True) == 0o777 & ~umask
        run = RunDir.claim(tmp_path / "run", kind="score", settings={"damping": 0.1})
        lock_mode = stat.S_IMODE((run.path / LOCK_FILE).stat().st_mode)
        store = fill_store(run.stage("grads"), 6, seed=5)
        scores = Scores(
            values=torch.zeros(6, dtype=torch.float64),
            train_ids=store.ids,
            test_ids=["t"],
            method="datainf",
            mode="average",
        )
        scores.save(run.stage("scores-datainf.safetensors"))
        scores.write_table(run.stage("scores-datainf"), "csv")
        run.release()
    finally:
        os.umask(previous)
    files = [run.path / CONFIG_FILE, run.path / "scores-datainf.safetensors", run.path / "scores-datainf.csv"]
    files += [run.path / "grads" / "manifest.json", *sorted((run.path / "grads").glob("shard-*"))]
    assert {f.name: stat.S_IMODE(f.stat().st_mode) for f in files} == {f.name: expected for f in files}
    assert lock_mode == expected


# ---------------------------------------------------------------------------------------------- item 16: report --scores


def test_report_accepts_a_score_folder_and_a_score_table(stores, capsys, tmp_path):
    scored = tmp_path / "s"
    assert run_cli(capsys, *score_args(stores, scored, "--method", "datainf,exact"))[0] == 0
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"id": f"ex{i}", "text": f"t{i}", "label": i % 2}) + "\n" for i in range(10)))
    code, out, err = run_cli(capsys, "report", "--scores", scored, "--data", data, "--out", tmp_path / "r1")
    assert code == 0, err
    config = json.loads((tmp_path / "r1" / CONFIG_FILE).read_text())
    assert config["scores"] == [str(scored / "scores-datainf.safetensors"), str(scored / "scores-exact.safetensors")]
    code, _, err = run_cli(
        capsys, "report", "--scores", scored / "scores-exact.csv", "--data", data, "--out", tmp_path / "r2"
    )
    assert code == 0, err
    assert json.loads((tmp_path / "r2" / CONFIG_FILE).read_text())["scores"] == [
        str(scored / "scores-exact.safetensors")
    ]
    # a table without its scores file, a folder without scores: say what to pass
    (tmp_path / "lone.csv").write_text("train_id,score\n")
    code, _, err = run_cli(
        capsys, "report", "--scores", tmp_path / "lone.csv", "--data", data, "--out", tmp_path / "r3"
    )
    assert code == 2 and "lone.safetensors, which is not there" in one_error_line(err)
    (tmp_path / "nothing").mkdir()
    code, _, err = run_cli(capsys, "report", "--scores", tmp_path / "nothing", "--data", data, "--out", tmp_path / "r4")
    assert code == 2 and "without scores-*.safetensors" in one_error_line(err)
    assert not (tmp_path / "r3").exists() and not (tmp_path / "r4").exists()


# ---------------------------------------------------------------------------------------------- item 17: blank texts


@pytest.mark.parametrize("field", ["text", "prompt", "response"])
def test_blank_required_texts_are_refused_with_their_ids(tmp_path, field):
    rows = [{"id": "a", field: "fine"}, {"id": "b", field: ""}, {"id": "c", field: " \t\n"}, {"id": "d", field: "ok"}]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DatasetError, match=f"required text field '{field}' is empty or only whitespace in 2 record"):
        load_records(path, required=[field])
    with pytest.raises(DatasetError, match="ids 'b', 'c'"):
        load_records(path, required=[field])
    assert len(load_records(path)) == 4  # not required: kept as is
    csv = tmp_path / "d.csv"
    csv.write_text(f"id,{field}\na,fine\nb,   \n")
    with pytest.raises(DatasetError, match="ids 'b'"):
        load_records(csv, required=[field])


# ---------------------------------------------------------------------------------------------- item 19: --json


def test_score_json_prints_one_object(stores, capsys, tmp_path):
    code, out, err = run_cli(capsys, *score_args(stores, tmp_path / "s", "--method", "datainf,exact", "--json"))
    assert code == 0, err
    summary = json.loads(out)
    assert out.count("\n") == 1 and summary["command"] == "score" and summary["out"] == str(tmp_path / "s")
    assert [m["method"] for m in summary["methods"]] == ["datainf", "exact"]
    saved = Scores.load(tmp_path / "s" / "scores-datainf.safetensors")
    first = summary["methods"][0]
    assert [(t["id"], t["score"]) for t in first["top_harmful"]] == [(i, v) for i, v in saved.top_harmful(10)]
    assert first["scores"] == str(tmp_path / "s" / "scores-datainf.safetensors") and first["reused"] is False
    assert "positive" in summary["sign_convention"]
    assert "json" not in json.loads((tmp_path / "s" / CONFIG_FILE).read_text())  # not a setting
    code, out, _ = run_cli(capsys, *score_args(stores, tmp_path / "s", "--method", "datainf,exact", "--json"))
    assert code == 0 and json.loads(out)["methods"][0]["reused"] is True


def test_demo_json_prints_the_summary(capsys, monkeypatch, tmp_path):
    from datainf import demos

    seen = {}

    def fake_demo(config, *, out_dir, recompute, progress):
        seen.update(seed=config.seed, out_dir=out_dir, recompute=recompute)
        table = [{"method": "datainf", "auc": torch.tensor(0.9).item(), "seconds": float("nan"), "notes": ""}]
        return demos.MislabelDemoResult(
            table=table, scores={}, report=tmp_path / "report" / "index.html", cache=tmp_path, stage_seconds={"x": 1.5}
        )

    monkeypatch.setattr(demos, "run_mislabel_demo", fake_demo)
    code, out, err = run_cli(capsys, "demo", "--out", tmp_path / "d", "--seed", "3", "--json", "-q")
    assert code == 0, err
    summary = json.loads(out)
    assert seen == {"seed": 3, "out_dir": str(tmp_path / "d"), "recompute": False}
    assert summary["task"] == "mislabel" and summary["table"][0]["auc"] == pytest.approx(0.9)
    assert summary["table"][0]["seconds"] is None and summary["stage_seconds"] == {"x": 1.5}


# ---------------------------------------------------------------------------------------------- output errors


def test_output_errors_are_datainf_errors():
    assert issubclass(DiskFullError, OutputError) and issubclass(OutputLockedError, OutputError)
    converted = datainf.store.output_error(OSError(errno.EACCES, "Permission denied"), "/x")
    assert isinstance(converted, OutputError) and "may not be written by this user" in str(converted)
    assert datainf.store.output_error(OSError(errno.ENOENT, "No such file"), "/x") is None
    assert datainf.store.output_error(ValueError("no errno here"), "/x") is None


def test_report_folder_follows_the_umask(tmp_path):
    from datainf.report.html import _publish

    previous = os.umask(0o022)
    try:
        index = _publish(tmp_path / "report", lambda folder: (folder / "index.html").write_text("<html></html>"))
    finally:
        os.umask(previous)
    assert stat.S_IMODE(index.parent.stat().st_mode) == 0o755 and stat.S_IMODE(index.stat().st_mode) == 0o644

"""datainf under torch.distributed: 2 gloo ranks (spawned like torchrun) against one process.

Covered: gradients and scores of every method (both Exact branches, LiSSA, Hessian-free; average
and pairwise) equal the single-process ones; a store written by 2 ranks reads back in 1 process in
dataset order; a rank killed mid-collection, then the same command rerun, computes only the missing
examples and gives the same scores; ranks given different settings or data stop together with one
clear error. Workers are started with ``torch.multiprocessing`` and torchrun's environment variables
(``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ...), so datainf initialises the process group itself.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from gradient_fixtures import bert_classifier, classification_data, word_tokenizer

import datainf
from datainf.distributed import DistributedContext, dist_context, shard_range
from datainf.errors import ConfigError, DistributedMismatchError
from datainf.store import GradientStore
from two_ranks import free_port, launch, set_rank_env

WORLD = 2
DEADLINE_S = 240.0
SYNTH_DIMS = {
    "a.lora_A": 5,
    "b.lora_B": 24,
    "c.head": 3,
}  # n = 13 training rows: b (24 > 13) takes Exact's Woodbury branch
METHOD_OPTIONS: dict[str, dict[str, Any]] = {
    "lissa": {"iterations": 4, "scale": "trace"},
    "exact": {},
    "datainf": {},
    "hessian_free": {},
}


# ---------------------------------------------------------------------------------------------- launching


def _entry(rank: int, job: str, port: int, root: str) -> None:
    """One spawned rank: torchrun's environment, one thread, then the named job."""
    set_rank_env(rank, port, WORLD)
    JOBS[job](rank, Path(root))


def _launch(job: str, root: Path) -> list[int | None]:
    """Run ``job`` on 2 ranks; returns the exit codes (``None`` everywhere when all succeeded).

    A rank that dies makes torch.multiprocessing stop the other one (like torchrun); a hang past
    ``DEADLINE_S`` kills both and fails the test.
    """
    return launch(
        _entry, (job, free_port(), str(root)), world=WORLD, deadline_s=DEADLINE_S, what=f"distributed job {job!r}"
    )


# ---------------------------------------------------------------------------------------------- data


def _synthetic(n: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {b: torch.randn(n, d, generator=gen) * (1 + j) for j, (b, d) in enumerate(SYNTH_DIMS.items())}


def _all_scores(train: Any, test: Any) -> dict[str, torch.Tensor]:
    out = {}
    for method, options in METHOD_OPTIONS.items():
        for mode in ("average", "pairwise"):
            scores = datainf.influence(
                train, test, method=method, mode=mode, method_options=options, batch_size=4, progress=False
            )
            out[f"{method}-{mode}"] = scores.values
    return out


def _tiny_records(n: int, seed: int) -> list[dict[str, Any]]:
    return classification_data(n, seed=seed)


def _collect(data: list[dict[str, Any]], path: Path | None, **options: Any) -> GradientStore:
    from datainf.gradients import SequenceClassificationTask, collect_gradients

    model, task = bert_classifier(), SequenceClassificationTask(word_tokenizer())
    return collect_gradients(model, task, data, store=path, batch_size=3, shard_size=2, progress=False, **options)


def _collect_diffusion(path: Path | None) -> GradientStore:
    """Gradients of a tiny text-conditioned UNet with one block per (LoRA tensor, timestep)."""
    from gradient_fixtures import diffusion_text_data, scheduler, unet_cond

    from datainf.gradients import DiffusionTask, DiffusionTaskConfig, collect_gradients

    task = DiffusionTask(scheduler(), DiffusionTaskConfig(timesteps=(25, 925)))
    return collect_gradients(
        unet_cond(), task, diffusion_text_data(5, seed=4), store=path, batch_size=2, shard_size=2, progress=False
    )


def _save_bert_run(root: Path) -> dict[str, Path]:
    """A tiny BERT base model, a random LoRA adapter (saved like peft does) and jsonl data."""
    from peft import LoraConfig, get_peft_model
    from tiny_models import SPECIAL_TOKENS, WORDS
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    vocab = {w: i for i, w in enumerate([*SPECIAL_TOKENS, *WORDS])}
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=2,
    )
    BertForSequenceClassification(config).save_pretrained(str(root / "base"))
    BertTokenizer(vocab=vocab).save_pretrained(str(root / "base"))
    lora = LoraConfig(
        r=2, lora_alpha=4, target_modules=["query", "value"], task_type="SEQ_CLS", init_lora_weights=False
    )
    get_peft_model(BertForSequenceClassification.from_pretrained(str(root / "base")), lora).save_pretrained(
        str(root / "adapter")
    )
    gen = torch.Generator().manual_seed(1)
    for name, n in (("train", 12), ("test", 3)):
        rows = []
        for i in range(n):
            picks = torch.randint(0, len(WORDS), (5,), generator=gen).tolist()
            rows.append({"id": f"{name}{i}", "text": " ".join(WORDS[k] for k in picks), "label": i % 2})
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {
        "base": root / "base",
        "adapter": root / "adapter",
        "train": root / "train.jsonl",
        "test": root / "test.jsonl",
    }


def _cli_args(root: Path, command: str, *extra: str) -> list[str]:
    common = ["--model", str(root / "base"), "--adapter", str(root / "adapter"), "--max-length", "12", "-q"]
    return [command, *common, *extra]


# ---------------------------------------------------------------------------------------------- jobs (run on every rank)


def _job_equivalence(rank: int, root: Path) -> None:
    ctx = dist_context()
    assert ctx.world_size == WORLD and ctx.rank == rank and ctx.backend == "gloo"
    results: dict[str, Any] = {"synthetic": _all_scores(_synthetic(13, 0), _synthetic(4, 1))}
    # gradients of a tiny model: every rank writes its part of one store, rank 0 merges
    train = _collect(_tiny_records(11, 2), root / "train2")
    test = _collect(_tiny_records(3, 3), root / "test2")
    results["store_ids"] = train.ids
    # Kronecker factors: first for the stored examples only (split over the ranks), then with new gradients
    _collect(_tiny_records(11, 2), root / "train2", collect_factors=True)
    with_factors = _collect(_tiny_records(7, 5), root / "factors2", collect_factors=True)
    results["ekfac"] = datainf.influence(with_factors, test, method="ekfac", progress=False).values
    _collect_diffusion(root / "diffusion2")  # row-labelled blocks (one per timestep) split over the ranks
    results["store_scores"] = {
        m: datainf.influence(
            train, test, method=m, method_options=METHOD_OPTIONS[m], batch_size=3, progress=False
        ).values
        for m in ("datainf", "exact")
    }
    # configuration / data mismatches: one clear error on every rank, no hang
    messages = {}
    data = _tiny_records(11, 2)
    if rank == 1:
        data[4] = {**data[4], "text": data[4]["text"] + " w1"}
    try:
        _collect(data, root / "mismatch-store")
    except DistributedMismatchError as err:
        messages["data"] = str(err)
    try:
        datainf.influence(_synthetic(13, 0), _synthetic(4, 1), damping=0.1 if rank == 0 else 0.2, progress=False)
    except DistributedMismatchError as err:
        messages["damping"] = str(err)
    try:
        datainf.influence(_synthetic(13, 0 if rank == 0 else 5), _synthetic(4, 1), progress=False)
    except DistributedMismatchError as err:
        messages["gradients"] = str(err)
    try:
        _collect(data, None)  # a RAM store cannot be shared between processes
    except ConfigError as err:
        messages["ram"] = str(err)
    results["messages"] = messages
    torch.save(results, root / f"equivalence-rank{rank}.pt")


def _job_killed(rank: int, root: Path) -> None:
    """`datainf grads` where rank 1 dies right after writing its first shard."""
    if rank == 1:
        from datainf.store import DiskGradientStore

        original = DiskGradientStore._write_shard
        written = []

        def dying_write(self: DiskGradientStore, count: int) -> None:
            if written:
                os._exit(17)  # a crash: no cleanup, no exception handling
            original(self, count)
            written.append(count)

        DiskGradientStore._write_shard = dying_write  # type: ignore[method-assign]
    from datainf.cli import main

    main(
        _cli_args(
            root,
            "grads",
            "--data",
            str(root / "train.jsonl"),
            "--shard-size",
            "2",
            "--grad-batch-size",
            "2",
            "--out",
            str(root / "dist" / "g-train"),
        )
    )


def _job_rerun(rank: int, root: Path) -> None:
    """The same `datainf grads` again, then the test gradients and `datainf score` with every method."""
    from datainf.cli import main

    dist = root / "dist"
    codes = [
        main(
            _cli_args(
                root,
                "grads",
                "--data",
                str(root / "train.jsonl"),
                "--shard-size",
                "2",
                "--grad-batch-size",
                "2",
                "--out",
                str(dist / "g-train"),
            )
        ),
        main(_cli_args(root, "grads", "--data", str(root / "test.jsonl"), "--out", str(dist / "g-test"))),
        main(
            [
                "score",
                "--train-grads",
                str(dist / "g-train"),
                "--test-grads",
                str(dist / "g-test"),
                "--method",
                "datainf,exact,lissa,hessian_free",
                "--score-batch-size",
                "5",
                "--out",
                str(dist / "scores"),
                "-q",
            ]
        ),
    ]
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        codes.append(
            main(
                [
                    "score",
                    "--train-grads",
                    str(dist / "g-train"),
                    "--test-grads",
                    str(dist / "g-test"),
                    "--damping",
                    "0.1" if rank == 0 else "0.3",
                    "--out",
                    str(dist / "scores-mismatch"),
                    "-q",
                ]
            )
        )
    (root / f"rerun-rank{rank}.json").write_text(json.dumps({"codes": codes, "stderr": stderr.getvalue()}))


def _job_equivalence_then_killed(rank: int, root: Path) -> None:
    """Both jobs in one launch (each launch costs two interpreters importing torch and transformers)."""
    _job_equivalence(rank, root)
    _job_killed(rank, root)


JOBS = {"equivalence+killed": _job_equivalence_then_killed, "rerun": _job_rerun}


# ---------------------------------------------------------------------------------------------- tests


def test_shard_range_covers_every_example_once() -> None:
    for n in (0, 1, 5, 13, 100):
        for world in (1, 2, 3, 4, 7):
            parts = [shard_range(n, r, world) for r in range(world)]
            assert [i for p in parts for i in p] == list(range(n))
            assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 1


def test_single_process_context_is_a_no_op() -> None:
    ctx = dist_context()
    assert ctx == DistributedContext() and ctx.is_main and not ctx.is_distributed
    t = torch.arange(6.0).reshape(2, 3)
    assert ctx.all_reduce_sum(t) is t and ctx.all_gather_cat(t, dim=1) is t
    ctx.check_same({"anything": object()}, "nothing")
    ctx.barrier()


@pytest.fixture(scope="module")
def first_launch(tmp_path_factory) -> tuple[Path, list[int | None]]:
    """One 2-rank launch: the equivalence job, then `datainf grads` during which rank 1 dies."""
    root = tmp_path_factory.mktemp("dist")
    _save_bert_run(root)
    return root, _launch("equivalence+killed", root)


@pytest.fixture(scope="module")
def equivalence(first_launch) -> tuple[Path, list[dict[str, Any]]]:
    root, _ = first_launch
    return root, [torch.load(root / f"equivalence-rank{r}.pt", weights_only=True) for r in range(WORLD)]


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))


def test_scores_of_every_method_equal_single_process(equivalence) -> None:
    _, ranks = equivalence
    single = _all_scores(_synthetic(13, 0), _synthetic(4, 1))
    assert set(ranks[0]["synthetic"]) == set(single) and len(single) == 8
    exact = datainf.influence(_synthetic(13, 0), _synthetic(4, 1), method="exact", progress=False)
    assert exact.diagnostics["exact_branches"] == {"direct": 2, "woodbury": 1}  # both branches are compared
    for key, expected in single.items():
        _close(ranks[0]["synthetic"][key], expected)
        assert torch.equal(ranks[1]["synthetic"][key], ranks[0]["synthetic"][key])  # every rank returns the same scores


def test_store_written_by_two_ranks_reads_back_in_one_process(equivalence, tmp_path) -> None:
    root, ranks = equivalence
    data, test_data = _tiny_records(11, 2), _tiny_records(3, 3)
    written = GradientStore.open(root / "train2")
    written.verify()
    assert written.is_complete and written.ids == [ex["id"] for ex in data] == ranks[0]["store_ids"]
    manifest = json.loads((root / "train2" / "manifest.json").read_text())
    files = [shard["file"] for shard in manifest["shards"]]
    assert all(f.startswith("parts/") for f in files) and len({f.split("/")[1] for f in files}) == WORLD
    assert not list((root / "train2").glob("parts/*/manifest.json"))  # one manifest describes every shard
    single = _collect(data, tmp_path / "train1")
    for name, grads in single.to_dict().items():
        torch.testing.assert_close(written.to_dict()[name], grads, rtol=1e-5, atol=1e-7)
    single_test = _collect(test_data, None)
    for method in ("datainf", "exact"):
        from_single = datainf.influence(single, single_test, method=method, batch_size=3, progress=False).values
        from_written = datainf.influence(
            written, GradientStore.open(root / "test2"), method=method, batch_size=3, progress=False
        )
        _close(from_written.values, from_single)
        _close(ranks[0]["store_scores"][method], from_single)


def test_factors_written_by_two_ranks_equal_one_process(equivalence, tmp_path) -> None:
    from datainf.factors import load_factors

    root, ranks = equivalence
    for name, data in (("train2", _tiny_records(11, 2)), ("factors2", _tiny_records(7, 5))):
        written = load_factors(GradientStore.open(root / name))
        single = load_factors(_collect(data, None, collect_factors=True))
        assert sorted(written.ids) == sorted(single.ids) and written.shapes == single.shapes
        for block in single.shapes:
            _close(written.input_factor(block), single.input_factor(block))
            _close(written.output_factor(block), single.output_factor(block))
        assert [f.name for f in (root / name / "kronecker-factors").glob("index*.json")] == ["index.json"]
    single_scores = datainf.influence(
        _collect(_tiny_records(7, 5), None, collect_factors=True),
        _collect(_tiny_records(3, 3), None),
        method="ekfac",
        progress=False,
    ).values
    _close(ranks[0]["ekfac"], single_scores)
    assert torch.equal(ranks[1]["ekfac"], ranks[0]["ekfac"])


def test_timestep_blocks_written_by_two_ranks_equal_one_process(equivalence) -> None:
    root, _ = equivalence
    written = GradientStore.open(root / "diffusion2")
    single = _collect_diffusion(None)
    assert written.is_complete and written.ids == single.ids and written.block_dims == single.block_dims
    assert all(name.endswith(("@t25", "@t925")) for name in written.block_dims)
    for name, grads in single.to_dict().items():
        torch.testing.assert_close(written.to_dict()[name], grads, rtol=1e-5, atol=1e-7)


def test_mismatched_ranks_stop_with_one_clear_error(equivalence) -> None:
    _, ranks = equivalence
    for rank in ranks:
        messages = rank["messages"]
        assert set(messages) == {"data", "damping", "gradients", "ram"}
        assert "must go to a disk store" in messages["ram"]
        assert "rank 1 differs from rank 0 in dataset" in messages["data"]
        assert "rank 1 differs from rank 0 in config" in messages["damping"]
        assert "train gradients" in messages["gradients"] and "same command on the same data" in messages["gradients"]


def test_killed_rank_then_rerun_finishes_only_missing_shards(first_launch) -> None:
    from datainf.cli import main

    tmp_path, codes = first_launch
    run = {"train": tmp_path / "train.jsonl", "test": tmp_path / "test.jsonl"}
    assert codes[1] == 17  # rank 1 died (and rank 0 was stopped, as torchrun does)
    store = tmp_path / "dist" / "g-train"
    assert not GradientStore.open(store).is_complete
    survived = set()
    for part in store.glob("parts/*/manifest.json"):
        survived.update(i for shard in json.loads(part.read_text())["shards"] for i in shard["ids"])
    assert 2 <= len(survived) < 12  # rank 1's first shard (and whatever rank 0 finished) were kept
    old_parts = {p.name for p in store.glob("parts/*")}

    assert _launch("rerun", tmp_path) == [None, None]
    reports = [json.loads((tmp_path / f"rerun-rank{r}.json").read_text()) for r in range(WORLD)]
    for report in reports:
        assert report["codes"] == [0, 0, 0, 2]
    assert "disagree on the settings of `datainf score`" in reports[0]["stderr"] and "damping" in reports[0]["stderr"]
    assert reports[1]["stderr"] == ""  # printed once, by rank 0
    manifest = json.loads((store / "manifest.json").read_text())
    recomputed = {
        i for shard in manifest["shards"] if shard["file"].split("/")[1] not in old_parts for i in shard["ids"]
    }
    assert recomputed == {f"train{i}" for i in range(12)} - survived  # only the missing examples were recomputed
    assert GradientStore.open(store).ids == [f"train{i}" for i in range(12)]

    # the same commands in one process
    single = tmp_path / "single"
    assert main(_cli_args(tmp_path, "grads", "--data", str(run["train"]), "--out", str(single / "g-train"))) == 0
    assert main(_cli_args(tmp_path, "grads", "--data", str(run["test"]), "--out", str(single / "g-test"))) == 0
    assert (
        main(
            [
                "score",
                "--train-grads",
                str(single / "g-train"),
                "--test-grads",
                str(single / "g-test"),
                "--method",
                "datainf,exact,lissa,hessian_free",
                "--out",
                str(single / "scores"),
                "-q",
            ]
        )
        == 0
    )
    for method in ("datainf", "exact", "lissa", "hessian_free"):
        a = datainf.Scores.load(tmp_path / "dist" / "scores" / f"scores-{method}.safetensors")
        b = datainf.Scores.load(single / "scores" / f"scores-{method}.safetensors")
        assert a.train_ids == b.train_ids and a.diagnostics["processes"] == 2 and b.diagnostics["processes"] == 1
        _close(a.values, b.values)


# ---------------------------------------------------------------------------------------------- parts, in one process


def _part_setup(path: Path, data: list[dict[str, Any]], part_model_seed: int = 0) -> None:
    """The state a 2-rank run leaves when it dies: a main manifest and one finished part (rows 6..8)."""
    from datainf.gradients import SequenceClassificationTask, collect_gradients, find_lora_blocks, gradient_fingerprint

    model, task = bert_classifier(), SequenceClassificationTask(word_tokenizer())  # what _collect uses
    blocks = find_lora_blocks(model)
    GradientStore.create(
        path, block_dims=blocks.block_dims, fingerprint=gradient_fingerprint(model, task, blocks), shard_size=2
    )
    part_model = bert_classifier(seed=part_model_seed)
    collect_gradients(part_model, task, data[6:9], store=path / "parts" / "dead-r00001", shard_size=2, progress=False)


def test_one_process_resumes_a_store_left_by_ranks(tmp_path) -> None:
    from datainf.gradients import SequenceClassificationTask, collect_gradients

    data = _tiny_records(12, 4)
    _part_setup(tmp_path / "g", data)
    task = SequenceClassificationTask(word_tokenizer())
    collated: list[str] = []
    original = task.collate
    task.collate = lambda examples, ids: (collated.extend(ids), original(examples, ids))[1]  # type: ignore[method-assign]
    store = collect_gradients(
        bert_classifier(), task, data, store=tmp_path / "g", batch_size=4, shard_size=2, progress=False
    )
    assert len(collated) == 9 and not {"c4-6", "c4-7", "c4-8"} & set(collated)  # the part's 3 examples were kept
    reopened = GradientStore.open(tmp_path / "g")
    assert reopened.is_complete and reopened.ids == store.ids == [
        ex["id"] for ex in data
    ]  # dataset order despite the gap
    assert not list((tmp_path / "g").glob("parts/*/manifest.json"))
    fresh = _collect(data, None)
    for name, grads in fresh.to_dict().items():
        torch.testing.assert_close(reopened.to_dict()[name], grads, rtol=1e-5, atol=1e-7)


def test_bad_parts_are_refused(tmp_path) -> None:
    from datainf.errors import StoreCorruptedError, StoreMismatchError

    data = _tiny_records(12, 4)
    _part_setup(tmp_path / "other", data, part_model_seed=1)  # a part written by another model
    with pytest.raises(StoreMismatchError, match="dead-r00001 .* different fingerprint"):
        _collect(data, tmp_path / "other")
    _part_setup(tmp_path / "missing", data)
    next((tmp_path / "missing" / "parts" / "dead-r00001").glob("shard-*.safetensors")).unlink()
    with pytest.raises(StoreCorruptedError, match="is missing"):
        _collect(data, tmp_path / "missing")


@pytest.mark.parametrize("backend", ["disk", "ram"])
def test_store_reads_a_row_range_across_shards(tmp_path, backend) -> None:
    grads = _synthetic(23, 7)
    store = GradientStore.create(tmp_path / "s" if backend == "disk" else None, block_dims=SYNTH_DIMS, shard_size=5)
    for start in range(0, 23, 4):
        store.append(
            [f"ex{i}" for i in range(start, min(23, start + 4))], {k: v[start : start + 4] for k, v in grads.items()}
        )
    store.finalize()
    for rows in (range(3, 17), range(0, 23), range(10, 10), range(20, 23)):
        batches = list(store.iter_batches(batch_size=4, rows=rows))
        assert [i for ids, _ in batches for i in ids] == [f"ex{i}" for i in rows]
        for name in SYNTH_DIMS:
            got = torch.cat([b[name] for _, b in batches]) if batches else torch.empty(0, SYNTH_DIMS[name])
            assert torch.equal(got, grads[name][rows.start : rows.stop])

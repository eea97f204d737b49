"""``datainf plan``: block counts and store bytes against a real store, every method's memory against what it
allocates, the Llama-2-13B plan from its public config values (``tests/data/llama-2-13b/config.json``), and
the refusals."""

from __future__ import annotations

import copy
import json
import shutil
import weakref
from pathlib import Path

import pytest
import torch
from gradient_fixtures import llama_lm, lm_data, word_tokenizer
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from datainf.cli import main
from datainf.errors import ConfigError, DiskFullError, LoRAValidationError
from datainf.gradients import CausalLMTask, collect_gradients
from datainf.plan import PlanSettings, make_plan

DATA = Path(__file__).parent / "data"


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@pytest.mark.parametrize("mode", ["store", "projected"])
def test_store_bytes_match_a_collected_store(tmp_path: Path, mode: str) -> None:
    model = llama_lm()
    model.base_model.model.config.save_pretrained(tmp_path / "base")  # config.json only: no weights
    projection = None
    kwargs = {}
    if mode == "projected":
        from datainf.gradients.projection import ProjectionConfig

        projection = ProjectionConfig(dim=32, seed=0)
        kwargs = {"project_dim": 32}
    settings = PlanSettings(
        model=str(tmp_path / "base"),
        n=40,
        seq_len=16,
        mode=mode,
        r=4,
        target_modules=("q_proj", "v_proj"),
        shard_size=16,
        test_examples=3,
        **kwargs,
    )
    plan = make_plan(settings)
    store = collect_gradients(
        model,
        CausalLMTask(word_tokenizer("lm")),
        lm_data(40),
        store=tmp_path / "g",
        shard_size=16,
        projection=projection,
        progress=False,
    )
    assert plan.blocks == len(store.block_dims) and plan.stored_per_example == sum(store.block_dims.values())
    assert plan.numbers_per_example == sum(p.numel() for p in model.parameters() if p.requires_grad)
    measured = _folder_bytes(tmp_path / "g")
    assert abs(plan.store_bytes / measured - 1) < 0.05, (plan.store_bytes, measured)
    assert plan.seconds_per_example is None  # no weights in the folder: nothing measured
    assert "not measured" not in plan.format()


def test_llama_2_13b_plan_from_its_public_config() -> None:
    """hidden 5120, 40 layers, intermediate 13824, vocab 32000; LoRA r=8 on q_proj / v_proj (README's numbers)."""
    settings = PlanSettings(
        model=str(DATA / "llama-2-13b"),
        n=100_000,
        seq_len=16,
        r=8,
        target_modules=("q_proj", "v_proj"),
        model_dtype="bfloat16",
        batch_size=1,
    )
    plan = make_plan(settings)
    assert plan.blocks == 160 and plan.numbers_per_example == 40 * 2 * (8 * 5120 + 5120 * 8) == 6_553_600
    assert plan.largest_block[1] == 40_960
    assert plan.store_bytes > 100_000 * 6_553_600 * 4  # 2.6 TB: the arithmetic, plus the norms
    assert 12e9 < plan.parameters < 13.1e9 and plan.weights_bytes == plan.parameters * 2
    projected = make_plan(PlanSettings(**{**settings.__dict__, "mode": "projected", "project_dim": 1024}))
    assert projected.stored_per_example == 160 * 1024  # each LoRA block: 8 x 128
    assert plan.store_bytes / projected.store_bytes > 39
    assert "D = sum_l d_l = 6,553,600" in plan.format()


def test_plan_command_prints_json(capsys, tmp_path: Path) -> None:
    llama_lm().base_model.model.config.save_pretrained(tmp_path)
    code = main(
        ["plan", "--model", str(tmp_path / "config.json"), "--n", "1000", "--seq-len", "16",
         "--target-modules", "q_proj,v_proj", "--r", "4", "--mode", "on-the-fly", "--json"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    summary = json.loads(out)
    assert summary["command"] == "plan" and summary["numbers_per_example"] == 896 and summary["store_bytes"] == 0
    # DataInf's sum pass (the norms pass fused into it) and the scoring pass, plus the pilot
    assert summary["methods"][0]["gradient_passes"] == 2
    assert summary["methods"][0]["pilot_rows"] == 128


def test_plan_of_the_loss_difference_scoring_pass(tmp_path: Path, capsys) -> None:
    llama_lm().base_model.model.config.save_pretrained(tmp_path)
    args = ["plan", "--model", str(tmp_path / "config.json"), "--n", "1000", "--seq-len", "16",
            "--target-modules", "q_proj,v_proj", "--r", "4", "--mode", "on-the-fly"]  # fmt: skip
    code = main([*args, "--scoring", "loss-difference", "--json"])
    method = json.loads(capsys.readouterr().out)["methods"][0]
    assert code == 0
    # the fused pass only; pilot 128 + 64 checked rows with gradients; every row forward, the checked ones at 3 steps
    assert method["gradient_passes"] == 1 and method["pilot_rows"] == 128 + 64
    assert method["forward_rows"] == 1000 + 2 * 64
    code = main([*args, "--scoring", "loss-difference"])
    assert code == 0 and "1,128 forward-only examples" in capsys.readouterr().out
    code = main([*args[:-1], "store", "--scoring", "loss-difference"])
    err = capsys.readouterr().err
    assert code == 2 and "with --mode on-the-fly" in err and err.count("\n") == 1


def test_bad_plans_are_refused(tmp_path: Path, capsys) -> None:
    with pytest.raises(LoRAValidationError, match="no default LoRA target modules for model type 'ctrl'"):
        make_plan(PlanSettings(model=str(DATA / "ctrl-tiny"), n=10, seq_len=8))
    with pytest.raises(LoRAValidationError, match="No LoRA targets found"):
        make_plan(PlanSettings(model=str(DATA / "ctrl-tiny"), n=10, seq_len=8, target_modules=("nope",)))
    with pytest.raises(ConfigError, match="needs project_dim"):
        PlanSettings(model="x", n=10, seq_len=8, mode="projected")
    with pytest.raises(ConfigError, match="no config.json"):
        make_plan(PlanSettings(model=str(tmp_path), n=10, seq_len=8))
    code = main(["plan", "--model", str(DATA / "llama-2-13b"), "--seq-len", "8"])
    assert code == 2 and "needs --n" in capsys.readouterr().err


def test_a_store_too_big_for_the_disk_is_refused_before_any_work(tmp_path: Path, monkeypatch) -> None:
    free = 5000
    monkeypatch.setattr(shutil, "disk_usage", lambda path: type("U", (), {"free": free})())
    model, task = llama_lm(), CausalLMTask(word_tokenizer("lm"))
    calls = []
    monkeypatch.setattr(task, "per_example_loss", lambda *a: calls.append(1) or torch.zeros(1))
    with pytest.raises(DiskFullError, match="needs about .* is free"):
        collect_gradients(model, task, lm_data(40), store=tmp_path / "g", progress=False)
    assert not calls  # nothing was computed
    model.base_model.model.config.save_pretrained(tmp_path / "base")
    plan = make_plan(PlanSettings(model=str(tmp_path / "base"), n=1000, seq_len=8, r=4, out=str(tmp_path)))
    assert "DOES NOT FIT" in plan.format()


class _PeakTensorBytes(TorchDispatchMode):
    """Peak bytes of the CPU tensors created while active (each storage counted once, until its tensor dies)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu":
                storage = tensor.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.live:
                    self.live[key] = storage.nbytes()
                    self.current += storage.nbytes()
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(tensor, self._free, key)
        return out


def test_exact_and_kronecker_memory_match_what_the_methods_allocate(monkeypatch, one_thread) -> None:
    """method_bytes against the tensors Exact / K-FAC / EK-FAC really create (both Exact routes, a block without
    factors). The scoring pass (one batch of every block) is Hessian-free's peak; a method's own phase adds
    what method_bytes counts beyond that batch."""
    import datainf.methods.kfac as kfac_module
    from datainf.factors import BlockFactorSums, KroneckerFactors, attach_factors
    from datainf.influence import influence
    from datainf.plan import method_bytes
    from datainf.store import GradientStore

    torch.manual_seed(0)
    n, m = 300, 1
    shapes = {"a.lora_A": (600, 2), "a.lora_B": (2, 400), "b.lora_A": (250, 1)}  # 1200, 800 > n: Woodbury
    dims = {**{name: p * q for name, (p, q) in shapes.items()}, "norm": 200}  # 250, 200 <= n: direct
    train = GradientStore.from_tensors({name: torch.randn(n, d) for name, d in dims.items()})
    test = GradientStore.from_tensors({name: torch.randn(m, d) for name, d in dims.items()})

    def spd(k: int) -> torch.Tensor:
        a = torch.randn(k, k + 2, dtype=torch.float64)
        return a @ a.T

    sums = {name: BlockFactorSums(spd(p), spd(q), float(n)) for name, (p, q) in shapes.items()}
    attach_factors(train, KroneckerFactors(dict(train.fingerprint), shapes, sums, list(train.ids)))
    attached = kfac_module.load_factors
    # a disk store's factors are read into new tensors: copy the attached ones inside the measurement
    monkeypatch.setattr(kfac_module, "load_factors", lambda store, path=None: copy.deepcopy(attached(store, path)))
    measured = {}
    for method in ("hessian_free", "exact", "kfac", "ekfac"):
        with _PeakTensorBytes() as tracker:
            influence(train, test, method=method, progress=False)
        measured[method] = tracker.peak
    streamed = n * sum(dims.values()) * 4  # the scoring pass's batch (score_batch_size >= n: one batch)
    assert measured["hessian_free"] >= streamed
    for method in ("exact", "kfac", "ekfac"):
        own = method_bytes(method, dims, n, test_rows=m, rows=n, factor_shapes=shapes)
        planned = measured["hessian_free"] + max(0, own - streamed)
        assert own > streamed / 2, (method, own)  # the method's own matrices matter at this size
        assert abs(planned / measured[method] - 1) < 0.2, (method, planned, measured[method])


def test_every_registered_method_is_planned_or_named(tmp_path: Path) -> None:
    from datainf.methods import HessianFree, available_methods, register_method, unregister_method

    llama_lm().base_model.model.config.save_pretrained(tmp_path)

    @register_method
    class Unplanned(HessianFree):
        name = "unplanned_toy"

    try:
        plan = make_plan(
            PlanSettings(
                model=str(tmp_path), n=50, seq_len=8, r=4, target_modules=("q_proj", "v_proj"),
                methods=tuple(available_methods()),
            )
        )  # fmt: skip
    finally:
        unregister_method("unplanned_toy")
    rows = {row.name: row for row in plan.methods}
    assert set(rows) == set(available_methods()) and "unplanned_toy" not in rows
    assert any(note.startswith("unplanned_toy: not modelled") for note in plan.notes)
    assert "not modelled" in plan.format()
    # hidden 32, 2 layers, v_proj 16 wide, r = 4: blocks of 128 (q_A, q_B, v_A) and 64 (v_B) numbers, all > n = 50:
    # Woodbury, one group; kfac covers every LoRA block (A 32 x 32 and S 4 x 4, or 4 x 4 and 32 x 32 / 16 x 16)
    assert rows["exact"].passes == 2 and rows["kfac"].passes == 1 and rows["ekfac"].passes == 2
    assert rows["exact"].own_bytes >= 8 * 50 * plan.numbers_per_example  # the rows X_l of every block, float64
    assert plan.factor_bytes == 8 * 2 * (3 * (32**2 + 4**2) + 16**2 + 4**2) and not rows["kfac"].refused
    with pytest.raises(ConfigError, match="Unknown method"):
        PlanSettings(model="x", n=10, seq_len=8, methods=("magic",))


@pytest.mark.filterwarnings("ignore::datainf.methods.LissaDivergenceWarning")
def test_self_influence_passes_match_what_the_methods_make(tmp_path: Path) -> None:
    import datainf
    from datainf.methods import available_methods

    model = llama_lm()
    model.base_model.model.config.save_pretrained(tmp_path / "base")
    n, chunk = 30, 8  # 4 chunks of training rows
    store = collect_gradients(
        model, CausalLMTask(word_tokenizer("lm")), lm_data(n), collect_factors=True, progress=False
    )
    methods = tuple(name for name in available_methods())
    plan = make_plan(
        PlanSettings(
            model=str(tmp_path / "base"), n=n, seq_len=16, r=4, target_modules=("q_proj", "v_proj"),
            methods=methods, score_batch_size=chunk, self_influence=True, lissa_iterations=3,
        )
    )  # fmt: skip
    rows = {row.name: row for row in plan.methods}
    assert rows["datainf"].passes == 4 + 1 and rows["lissa"].passes == 3 * 4 + 1 and rows["hessian_free"].passes == 0
    for name in methods:
        options = {"iterations": 3} if name == "lissa" else {}
        scores = datainf.influence(
            store, mode="self", method=name, batch_size=chunk, method_options=options, progress=False
        )
        made = scores.diagnostics["passes"]
        if name == "exact":  # "up to 2 groups": a group whose blocks all take the direct branch needs 1
            assert 1 <= made <= rows[name].passes, (name, made, rows[name].passes)
        else:
            assert made == rows[name].passes, (name, made, rows[name].passes)
    assert "self-influence: no scoring pass" in plan.format() and ", self-influence" in plan.format()
    on_the_fly = make_plan(
        PlanSettings(
            model=str(tmp_path / "base"), n=n, seq_len=16, r=4, target_modules=("q_proj", "v_proj"),
            mode="on-the-fly", score_batch_size=chunk, self_influence=True,
        )
    )  # fmt: skip
    assert on_the_fly.methods[0].gradient_passes == 5 + 1 and on_the_fly.methods[0].pilot_rows == 0  # + norms pass
    source = datainf.OnTheFlyGradients(model, CausalLMTask(word_tokenizer("lm")), lm_data(n), progress=False)
    datainf.influence(source, mode="self", batch_size=chunk, progress=False)
    assert source.rows_computed == n * on_the_fly.methods[0].gradient_passes  # what the source really computed
    assert any("far cheaper" in note for note in on_the_fly.notes)
    with pytest.raises(ConfigError, match="not both"):
        PlanSettings(model="x", n=10, seq_len=8, pairwise=True, self_influence=True)


def test_plan_factor_bytes_match_collected_factors(tmp_path: Path) -> None:
    from datainf.factors import factor_bytes, load_factors

    model = llama_lm()
    model.base_model.model.config.save_pretrained(tmp_path / "base")
    store = collect_gradients(
        model,
        CausalLMTask(word_tokenizer("lm")),
        lm_data(8),
        store=tmp_path / "g",
        collect_factors=True,
        progress=False,
    )
    plan = make_plan(
        PlanSettings(model=str(tmp_path / "base"), n=8, seq_len=8, r=4, target_modules=("q_proj", "v_proj"),
                     methods=("ekfac",))
    )  # fmt: skip
    factors = load_factors(store)
    assert plan.factor_bytes == factor_bytes(factors.shapes) > 0


def test_llama_2_13b_exact_and_kfac_verdicts() -> None:
    """Exact's 40,960 x 40,960 Gram matrices (12.5 GiB each) exceed the 4 GB budget: one pass per block;
    K-FAC's 160 blocks of 5120 x 5120 factors (31.25 GB) are refused as the method refuses them."""
    settings = PlanSettings(
        model=str(DATA / "llama-2-13b"),
        n=100_000,
        seq_len=16,
        target_modules=("q_proj", "v_proj"),
        model_dtype="bfloat16",
        batch_size=1,
        methods=("exact", "kfac", "ekfac"),
        memory_gb=16,
    )
    plan = make_plan(settings)
    exact, kfac, ekfac = plan.methods
    d = 40_960
    assert exact.passes == 160 + 1 and exact.gradient_passes == 1
    assert exact.own_bytes >= 2 * 8 * d * d  # the Gram matrix and the product X^T X being added to it
    assert exact.fits is False and exact.peak_bytes > 16 * 2**30
    assert "160 block(s) alone need more than max_memory_gb 4" in (exact.note or "")
    assert plan.factor_bytes == 160 * 8 * (5120**2 + 8**2)
    for row in (kfac, ekfac):
        assert row.refused is not None and "need 31.25 GB in float64, more than the 4.0 GB limit" in row.refused
    text = plan.format()
    assert "REFUSED: kfac/ekfac" in text and "DOES NOT FIT" in text
    projected = make_plan(PlanSettings(**{**settings.__dict__, "mode": "projected", "project_dim": 1024}))
    assert "a projection do not combine" in (projected.methods[1].refused or "")
    assert projected.methods[0].note is None and projected.methods[0].passes == 2  # 160 x 1024^2 x 8 B: 1.25 GiB

"""Kronecker factors of the hooked blocks (K-FAC / EK-FAC), their sums, and their files beside a store.

For a block whose per-example gradient is ``g_i = sum_t delta_it x_it^T`` (``q x p``: a Linear
weight ``d_out x d_in``, a convolution's ``out x (in kh kw)`` with unfolded inputs as ``x``; a bias is
``x = 1``), K-FAC approximates the block's curvature ``G_l = (1/n) sum_i vec(g_i) vec(g_i)^T`` by

    G_l  ~=  S_l (x) A_l          (row-major ``vec``: the output index is the outer one)

    A_l = (1/T) sum_i sum_{t in active(i)} x_it x_it^T       (p x p)   per-position mean of the inputs
    S_l = (1/n) sum_i sum_t delta_it delta_it^T               (q x q)   per-example sum over positions, mean over examples

``active(i)`` are the positions of example ``i`` whose output gradient is not exactly zero (a padding
token, a masked position: it adds nothing to ``g_i``), ``T`` the number of active positions over all
examples. With one position per example (a classifier head on a pooled vector) ``S (x) A`` is the
expectation of ``g g^T`` when inputs and output gradients are independent; with many positions the
cross-position terms ``t != t'`` are dropped and each ``x_t x_t^T`` is replaced by its mean (the
"expand" convention), so ``trace(S (x) A)`` has the scale of ``(1/n) sum_i ||g_i||^2``. Counting only
active positions keeps ``A`` independent of how a batch is padded.

What is stored are the *sums* (``sum x x^T`` over active positions, ``sum delta delta^T``, the
number of active positions ``T``) and the ids of the examples they cover, so that pieces collected
at different times or by different processes add up exactly. Disk layout (a folder
:data:`FACTORS_FOLDER` inside the gradient store's folder)::

    index.json                 format, fingerprint (the store's), block shapes (name, p, q),
                               pieces (file, ids, bytes, sha256), complete flag
    index-<run>-r00001.json    written by one rank of a multi-process collection (pieces of its own)
    piece-<token>.safetensors  "<block>::A" (p, p), "<block>::S" (q, q), "<block>::T" (1,), float64

Files are written atomically (temporary file + rename); a piece is listed in an index only after
its file is complete. :meth:`FactorFolder.consolidate` sums every piece into one, lists it in
``index.json`` marked complete, and removes the rest. RAM stores keep their factors in memory
(:func:`attach_factors`).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import uuid
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from datainf.errors import ConfigError, FingerprintMismatchError, StoreCorruptedError, StoreError
from datainf.store import GradientSource, atomic_write_json
from datainf.store.files import file_sha256

__all__ = [
    "FACTORS_FOLDER",
    "BlockFactorSums",
    "KroneckerFactors",
    "FactorFolder",
    "factor_bytes",
    "check_factor_memory",
    "attach_factors",
    "attached_factors",
    "load_factors",
    "how_to_collect",
]

logger = logging.getLogger(__name__)

#: The factors' folder inside a disk gradient store's folder.
FACTORS_FOLDER = "kronecker-factors"
_FORMAT = "datainf-kronecker-factors"
_VERSION = 1
_INDEX = "index.json"

#: What to tell a user whose store has no factors.
how_to_collect = (
    "Collect them with the gradients: rerun `datainf grads --factors` with the same --out and settings (or "
    "collect_gradients(..., collect_factors=True) into the same store folder; it resumes: stored gradients are kept, "
    "only the factors are computed), or score from --train-data, which collects them itself"
)


@dataclass
class BlockFactorSums:
    """The sums behind one block's factors (float64, CPU).

    Attributes:
        inputs: ``sum x x^T`` over active positions, ``(p, p)`` (a bias block: ``[[T]]``).
        outputs: ``sum delta delta^T`` over all positions, ``(q, q)``.
        positions: ``T``, the number of active positions summed into ``inputs``.
    """

    inputs: torch.Tensor
    outputs: torch.Tensor
    positions: float

    def add(self, other: BlockFactorSums) -> None:
        self.inputs += other.inputs
        self.outputs += other.outputs
        self.positions += other.positions


def factor_bytes(shapes: Mapping[str, tuple[int, int]]) -> int:
    """float64 bytes of every block's ``A`` (``p x p``) and ``S`` (``q x q``)."""
    return 8 * sum(p * p + q * q for p, q in shapes.values())


@dataclass
class KroneckerFactors:
    """Factor sums of every covered block over the examples ``ids`` (docs in the module docstring).

    Attributes:
        fingerprint: the gradient store's fingerprint (model, task, adapter).
        shapes: block name -> ``(p, q)``: the block's gradient is ``q x p`` (``d_l = p q``).
        sums: block name -> :class:`BlockFactorSums`.
        ids: the examples summed (``n = len(ids)``).
    """

    fingerprint: dict[str, str]
    shapes: dict[str, tuple[int, int]]
    sums: dict[str, BlockFactorSums]
    ids: list[str]

    @property
    def num_examples(self) -> int:
        return len(self.ids)

    def input_factor(self, block: str) -> torch.Tensor:
        """``A_l = sum x x^T / T``, float64 ``(p, p)`` (zeros when no position was active)."""
        s = self.sums[block]
        return s.inputs / s.positions if s.positions > 0 else torch.zeros_like(s.inputs)

    def output_factor(self, block: str) -> torch.Tensor:
        """``S_l = sum delta delta^T / n``, float64 ``(q, q)``."""
        return self.sums[block].outputs / max(self.num_examples, 1)

    def check_for(self, store: GradientSource) -> None:
        """Refuse factors of another store: fingerprint, block shapes and examples must agree.

        Raises:
            FingerprintMismatchError: another model / adapter / task, or other examples.
            StoreCorruptedError: a block's factor shape does not match its size in the store.
        """
        if self.fingerprint != store.fingerprint:
            raise FingerprintMismatchError(
                f"The Kronecker factors were collected for another model/adapter/task (fingerprint {self.fingerprint} "
                f"vs the store's {store.fingerprint}). {how_to_collect}, or pass the matching factors."
            )
        dims = store.block_dims
        for name, (p, q) in self.shapes.items():
            if name not in dims or dims[name] != p * q:
                raise StoreCorruptedError(
                    f"Kronecker factors of block {name!r} are {q} x {p}, but the store's block has "
                    f"{dims.get(name, 'no')} parameters. Recollect the factors with the store's model."
                )
        if set(self.ids) != set(store.ids) or len(self.ids) != store.num_examples:
            missing = len(set(store.ids) - set(self.ids))
            extra = len(set(self.ids) - set(store.ids))
            raise FingerprintMismatchError(
                f"The Kronecker factors cover other examples than the store ({missing} of its {store.num_examples} "
                f"examples are missing from them, {extra} of theirs are not in the store): they belong to another "
                f"dataset. {how_to_collect}."
            )


def _empty_sums(shapes: Mapping[str, tuple[int, int]]) -> dict[str, BlockFactorSums]:
    return {
        name: BlockFactorSums(torch.zeros(p, p, dtype=torch.float64), torch.zeros(q, q, dtype=torch.float64), 0.0)
        for name, (p, q) in shapes.items()
    }


class FactorFolder:
    """Factor pieces of one gradient store: on disk (``path``) or in memory (``path=None``).

    A piece holds the sums over a set of examples; pieces never share an example. Collection adds
    a piece every few hundred examples (:meth:`add_piece`), a resumed collection first drops pieces
    that cover examples the store lost (:meth:`prune`), and the end of a collection sums them into
    one (:meth:`consolidate`).
    """

    def __init__(
        self,
        path: Path | None,
        *,
        fingerprint: Mapping[str, str],
        shapes: Mapping[str, tuple[int, int]],
        index_name: str = _INDEX,
    ) -> None:
        self.path = path
        self.fingerprint = {str(k): str(v) for k, v in fingerprint.items()}
        self.shapes = {str(k): (int(p), int(q)) for k, (p, q) in shapes.items()}
        self.index_name = index_name
        self._memory: list[tuple[list[str], dict[str, BlockFactorSums]]] = []
        #: index file name -> its pieces (disk only)
        self._indexes: dict[str, list[dict[str, Any]]] = {}
        if path is not None:
            self._read_indexes()

    # ------------------------------------------------------------------ index files
    def _header(self) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "fingerprint": self.fingerprint,
            "blocks": [[name, p, q] for name, (p, q) in self.shapes.items()],
        }

    def _read_indexes(self) -> None:
        assert self.path is not None
        if not self.path.is_dir():
            return
        header = self._header()
        for file in sorted(self.path.glob("index*.json")):
            try:
                data = json.loads(file.read_text())
                pieces = list(data["pieces"])
            except (ValueError, KeyError, TypeError) as err:
                raise StoreCorruptedError(
                    f"The factor index {file} is unreadable ({err}); delete {self.path} and collect the factors again."
                ) from err
            differences = [
                key for key in ("format", "version", "fingerprint", "blocks") if data.get(key) != header[key]
            ]
            if differences:
                raise StoreError(
                    f"The Kronecker factors in {self.path} were collected with a different {', '.join(differences)} "
                    f"than this store's. Delete {self.path} (or collect with overwrite=True) and collect them again."
                )
            self._indexes[file.name] = pieces

    def _write_index(self, name: str, *, complete: bool = False) -> None:
        assert self.path is not None
        atomic_write_json(self.path / name, {**self._header(), "complete": complete, "pieces": self._indexes[name]})

    # ------------------------------------------------------------------ pieces
    def covered_ids(self) -> set[str]:
        """The examples some piece covers."""
        if self.path is None:
            return {i for ids, _ in self._memory for i in ids}
        return {i for pieces in self._indexes.values() for piece in pieces for i in piece["ids"]}

    def prune(self, valid: Iterable[str]) -> int:
        """Drop every piece covering an example outside ``valid`` (the store's ids); returns examples dropped."""
        keep = set(valid)
        dropped = 0
        if self.path is None:
            kept = [(ids, sums) for ids, sums in self._memory if set(ids) <= keep]
            dropped = sum(len(ids) for ids, _ in self._memory) - sum(len(ids) for ids, _ in kept)
            self._memory = kept
            return dropped
        for name, pieces in self._indexes.items():
            kept_pieces = [piece for piece in pieces if set(piece["ids"]) <= keep]
            if len(kept_pieces) != len(pieces):
                dropped += sum(len(p["ids"]) for p in pieces) - sum(len(p["ids"]) for p in kept_pieces)
                for piece in pieces:
                    if piece not in kept_pieces:
                        (self.path / piece["file"]).unlink(missing_ok=True)
                self._indexes[name] = kept_pieces
                self._write_index(name)
        if dropped:
            logger.info("Dropped Kronecker-factor pieces of %d examples the gradient store does not hold.", dropped)
        return dropped

    def add_piece(self, ids: Sequence[str], sums: Mapping[str, BlockFactorSums]) -> None:
        """Record the sums over the examples ``ids`` (none of them covered yet)."""
        ids = [str(i) for i in ids]
        if not ids:
            return
        if self.path is None:
            self._memory.append(
                (ids, {k: BlockFactorSums(v.inputs.clone(), v.outputs.clone(), v.positions) for k, v in sums.items()})
            )
            return
        self.path.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {}
        for name in self.shapes:
            s = sums[name]
            tensors[f"{name}::A"] = s.inputs.contiguous()
            tensors[f"{name}::S"] = s.outputs.contiguous()
            tensors[f"{name}::T"] = torch.tensor([s.positions], dtype=torch.float64)
        file_name = f"piece-{uuid.uuid4().hex[:12]}.safetensors"
        fd, tmp = tempfile.mkstemp(prefix=f".{file_name}.", suffix=".tmp", dir=self.path)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={"format": _FORMAT})
            entry = {"file": file_name, "ids": ids, "bytes": os.path.getsize(tmp), "sha256": file_sha256(Path(tmp))}
            os.replace(tmp, self.path / file_name)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._indexes.setdefault(self.index_name, []).append(entry)
        self._write_index(self.index_name)

    def _read_piece(self, piece: Mapping[str, Any]) -> dict[str, BlockFactorSums]:
        assert self.path is not None
        file = self.path / piece["file"]
        if not file.is_file() or file.stat().st_size != piece["bytes"]:
            raise StoreCorruptedError(
                f"The factor piece {file} is missing or truncated; delete {self.path} and collect the factors again."
            )
        try:
            with safe_open(str(file), framework="pt") as handle:
                out = {
                    name: BlockFactorSums(
                        handle.get_tensor(f"{name}::A"),
                        handle.get_tensor(f"{name}::S"),
                        float(handle.get_tensor(f"{name}::T")[0]),
                    )
                    for name in self.shapes
                }
        except Exception as err:  # safetensors raises several error types on damaged files
            raise StoreCorruptedError(
                f"The factor piece {file} cannot be read ({type(err).__name__}: {err}); delete {self.path} and "
                "collect the factors again."
            ) from err
        for name, (p, q) in self.shapes.items():
            if tuple(out[name].inputs.shape) != (p, p) or tuple(out[name].outputs.shape) != (q, q):
                raise StoreCorruptedError(f"The factor piece {file} holds block {name!r} in the wrong shape.")
        return out

    def total(self) -> KroneckerFactors:
        """Every piece summed (pieces must not overlap)."""
        sums = _empty_sums(self.shapes)
        ids: list[str] = []
        if self.path is None:
            parts: Iterable[tuple[list[str], dict[str, BlockFactorSums]]] = self._memory
        else:
            parts = (
                (list(piece["ids"]), self._read_piece(piece)) for pieces in self._indexes.values() for piece in pieces
            )
        for piece_ids, piece_sums in parts:
            ids.extend(piece_ids)
            for name in self.shapes:
                sums[name].add(piece_sums[name])
        if len(set(ids)) != len(ids):
            raise StoreCorruptedError(
                f"Kronecker-factor pieces{'' if self.path is None else ' in ' + str(self.path)} cover some examples "
                "twice; delete them and collect the factors again."
            )
        return KroneckerFactors(dict(self.fingerprint), dict(self.shapes), sums, ids)

    def consolidate(self) -> KroneckerFactors:
        """Sum every piece into one, listed alone in ``index.json`` and marked complete; returns the total."""
        factors = self.total()
        if self.is_complete():  # already one piece (a rerun found nothing to add)
            return factors
        if self.path is None:
            self._memory = [(list(factors.ids), factors.sums)]
            return factors
        old = [(name, list(pieces)) for name, pieces in self._indexes.items()]
        self._indexes = {}
        self.index_name, previous = _INDEX, self.index_name
        self.add_piece(factors.ids, factors.sums)
        self._write_index(_INDEX, complete=True)
        for name, pieces in old:
            for piece in pieces:
                (self.path / piece["file"]).unlink(missing_ok=True)
            if name != _INDEX:
                (self.path / name).unlink(missing_ok=True)
        self.index_name = previous
        return factors

    def is_complete(self) -> bool:
        """Whether the last :meth:`consolidate` is the folder's state (``index.json`` alone, complete)."""
        if self.path is None:
            return len(self._memory) <= 1
        file = self.path / _INDEX
        if set(self._indexes) != {_INDEX} or not file.is_file():
            return False
        return bool(json.loads(file.read_text()).get("complete", False))


# ---------------------------------------------------------------------------------------- lookup

_ATTACHED: weakref.WeakKeyDictionary[GradientSource, KroneckerFactors] = weakref.WeakKeyDictionary()


def attach_factors(store: GradientSource, factors: KroneckerFactors) -> None:
    """Keep ``factors`` with ``store`` in memory (a RAM store's or an on-the-fly source's factors; found
    by :func:`load_factors`)."""
    _ATTACHED[store] = factors


def attached_factors(store: GradientSource) -> KroneckerFactors | None:
    """The factors kept with ``store`` in memory, if any."""
    return _ATTACHED.get(store)


def _read_folder(path: Path) -> KroneckerFactors:
    index = path / _INDEX
    if not index.is_file():
        raise StoreError(f"No Kronecker factors at {path} ({_INDEX} is missing). {how_to_collect}.")
    try:
        data = json.loads(index.read_text())
        shapes = {str(name): (int(p), int(q)) for name, p, q in data["blocks"]}
        fingerprint = dict(data.get("fingerprint") or {})
    except (ValueError, KeyError, TypeError) as err:
        raise StoreCorruptedError(
            f"The factor index {index} is unreadable ({err}); collect the factors again."
        ) from err
    if data.get("format") != _FORMAT or data.get("version") != _VERSION:
        raise StoreCorruptedError(f"{index} is not a datainf Kronecker-factor index (version {_VERSION}).")
    folder = FactorFolder(path, fingerprint=fingerprint, shapes=shapes)
    if not folder.is_complete():
        raise StoreError(
            f"The Kronecker factors at {path} are unfinished (an interrupted collection). Rerun the same gradient "
            "collection with collect_factors=True: it resumes and finishes them."
        )
    return folder.total()


def load_factors(store: GradientSource, path: str | os.PathLike[str] | None = None) -> KroneckerFactors:
    """The Kronecker factors of ``store``, checked against it.

    Looked up in this order: the folder ``path`` when given; the factors kept in memory with the
    store (:func:`attach_factors`); ``<store folder>/kronecker-factors`` for a disk store.

    Raises:
        StoreError: there are none (the message says how to collect them), or they are unfinished.
        FingerprintMismatchError: they belong to another model, adapter, task or dataset.
    """
    if path is not None:
        factors = _read_folder(Path(path))
    else:
        attached = attached_factors(store)
        store_path = getattr(store, "path", None)
        if attached is not None:
            factors = attached
        elif isinstance(store_path, Path) and (store_path / FACTORS_FOLDER).is_dir():
            factors = _read_folder(store_path / FACTORS_FOLDER)
        else:
            where = (
                f"in {store_path / FACTORS_FOLDER}"
                if isinstance(store_path, Path)
                else "with this RAM store / on-the-fly source"
            )
            raise StoreError(
                f"This gradient store has no Kronecker factors ({where}); kfac and ekfac need them. {how_to_collect}; "
                "or use a method that needs none (datainf, diagonal, exact, ...)."
            )
    factors.check_for(store)
    return factors


def check_factor_memory(shapes: Mapping[str, tuple[int, int]], limit_gb: float, *, what: str) -> None:
    """Refuse factors whose float64 size exceeds ``limit_gb``, naming the largest blocks."""
    if not limit_gb > 0:
        raise ConfigError(f"{what}: the memory limit must be positive, got {limit_gb} GB.")
    need = factor_bytes(shapes)
    if need <= limit_gb * 2**30:
        return
    largest = sorted(shapes.items(), key=lambda item: -(item[1][0] ** 2 + item[1][1] ** 2))[:3]
    listed = ", ".join(
        f"{name} (A {p}x{p}, S {q}x{q}: {8 * (p * p + q * q) / 2**30:.2f} GB)" for name, (p, q) in largest
    )
    raise ConfigError(
        f"{what}: the Kronecker factors of {len(shapes)} blocks need {need / 2**30:.2f} GB in float64, more than the "
        f"{limit_gb} GB limit; largest: {listed}. Put LoRA on fewer or narrower modules, raise the limit, or use the "
        "'diagonal' method (no factors)."
    )

"""Running datainf under ``torch.distributed`` (launched with ``torchrun``), and as one process.

:func:`dist_context` returns a :class:`DistributedContext`: this process's rank, the world size and
the collectives datainf needs. Under ``torchrun`` (environment variables ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) it initialises the default process group when the
caller has not done so: backend ``nccl`` when CUDA is available, else ``gloo``. A user who already
called :func:`torch.distributed.init_process_group` keeps their group. Without any of this (one
plain process) every collective is the identity: nothing requires ``torch.distributed``.

How the work is split (see README, "Scaling out"):

* **gradient collection**: the examples still missing from the store are cut into ``world_size``
  contiguous slices (:func:`shard_range`); each rank writes its own part of the store, and rank 0
  merges the parts into the one manifest, in dataset order;
* **influence**: each rank streams a contiguous slice of the training rows; every per-block sum a
  method needs (squared norms for ``lambda_l``, DataInf's ``sum_i c_il g_il``, Exact's ``X^T X``,
  LiSSA's Hessian-vector products) is summed with ``all_reduce``; the per-rank score columns are
  all-gathered in store order, so every rank returns the same full :class:`~datainf.scores.Scores`.

Every rank must run the same command on the same data. :meth:`DistributedContext.check_same`
exchanges a fingerprint of the configuration at the start and stops every rank with one
:class:`~datainf.errors.DistributedMismatchError` naming the ranks and the settings that differ.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from datainf.errors import DataInfError, DistributedMismatchError, DistributedRankError

__all__ = [
    "DistributedContext",
    "dist_context",
    "shard_range",
    "fingerprint_of",
    "describe_ids",
    "is_main_process",
    "on_main",
    "on_every_rank",
    "check_same_settings",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

_TIMEOUT_ENV = "DATAINF_DIST_TIMEOUT_S"
_BACKEND_ENV = "DATAINF_DIST_BACKEND"
_initialised_here = False


def shard_range(n: int, rank: int, world_size: int) -> range:
    """Rank ``rank``'s contiguous share of ``range(n)``: sizes differ by at most one, lower ranks first.

    Deterministic and independent of anything but the three numbers; ``world_size`` need not divide
    ``n`` (ranks beyond ``n`` get an empty range).
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of size {world_size}")
    base, extra = divmod(max(int(n), 0), world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def fingerprint_of(payload: Any) -> str:
    """SHA-256 (hex) of a JSON-able ``payload`` (keys sorted; non-JSON values by ``str``)."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _env_world() -> tuple[int, int, int] | None:
    """``(rank, world_size, local_rank)`` from torchrun's environment, or ``None`` outside it."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return None
    try:
        world = int(os.environ["WORLD_SIZE"])
        rank = int(os.environ["RANK"])
        local = int(os.environ.get("LOCAL_RANK", rank))
    except ValueError as err:
        raise DataInfError(f"RANK / WORLD_SIZE / LOCAL_RANK are not integers ({err}); launch with torchrun.") from err
    return rank, world, local


@dataclass(frozen=True)
class DistributedContext:
    """This process's place in the job and the collectives datainf uses.

    Attributes:
        rank: global rank (0 in a single process).
        world_size: number of processes (1 in a single process).
        local_rank: rank on this machine (selects the GPU under nccl).
        backend: ``"gloo"``, ``"nccl"`` (or another backend) when distributed, else ``None``.
        device: where collectives run: ``cuda:<local_rank>`` for nccl, ``cpu`` otherwise.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    device: torch.device = torch.device("cpu")

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the process that writes outputs."""
        return self.rank == 0

    def shard(self, n: int) -> range:
        """This rank's contiguous share of ``range(n)`` (:func:`shard_range`)."""
        return shard_range(n, self.rank, self.world_size)

    def resolve_device(self, device: str | torch.device | None) -> torch.device | None:
        """``cuda`` without an index becomes this rank's GPU (``cuda:<local_rank>``) when distributed."""
        if device is None:
            return None
        resolved = torch.device(device)
        if self.is_distributed and resolved.type == "cuda" and resolved.index is None:
            return torch.device("cuda", self.local_rank)
        return resolved

    # ------------------------------------------------------------------ tensor collectives
    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum of ``tensor`` over all ranks (same shape, dtype and device as given).

        Used by the streaming helpers of :class:`datainf.methods.MethodContext`; the identity in one process.
        """
        if not self.is_distributed:
            return tensor
        import torch.distributed as dist

        work = tensor.detach().to(self.device).contiguous().clone()
        dist.all_reduce(work, op=dist.ReduceOp.SUM)
        return work.to(tensor.device)

    def all_gather_cat(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Concatenate every rank's ``tensor`` along ``dim``, in rank order; sizes along ``dim`` may differ.

        With contiguous row shards (:meth:`shard`) the result is in store order. The other
        dimensions must agree. The identity in one process.
        """
        if not self.is_distributed:
            return tensor
        import torch.distributed as dist

        moved = tensor.detach().movedim(dim, 0).contiguous()
        sizes = self.all_gather_object(int(moved.shape[0]))
        largest = max(sizes)
        padded = torch.zeros((largest, *moved.shape[1:]), dtype=moved.dtype, device=self.device)
        padded[: moved.shape[0]] = moved.to(self.device)
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        joined = torch.cat([part[:size] for part, size in zip(parts, sizes)])
        return joined.to(tensor.device).movedim(0, dim)

    # ------------------------------------------------------------------ object collectives
    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's (picklable, small) ``obj``, in rank order; ``[obj]`` in one process."""
        if not self.is_distributed:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s ``obj`` on every rank (the argument is ignored elsewhere)."""
        if not self.is_distributed:
            return obj
        import torch.distributed as dist

        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def barrier(self) -> None:
        """Wait for every rank (no-op in one process)."""
        if self.is_distributed:
            self.all_gather_object(None)  # an object collective works on every backend without device_ids

    # ------------------------------------------------------------------ agreement
    def check_same(self, payload: Mapping[str, Any], what: str) -> None:
        """Stop every rank when the ranks' ``payload`` (a JSON-able mapping) differ.

        Each rank sends a SHA-256 per key; a key whose digest differs from rank 0's is named in the
        message (values themselves are never sent, so large ones cost nothing).

        Raises:
            DistributedMismatchError: on every rank, naming the disagreeing ranks and keys.
        """
        if not self.is_distributed:
            return
        digests = {str(key): fingerprint_of(value) for key, value in payload.items()}
        gathered: list[dict[str, str]] = self.all_gather_object(digests)
        reference = gathered[0]
        problems: list[str] = []
        for rank, other in enumerate(gathered[1:], start=1):
            keys = sorted(k for k in set(reference) | set(other) if reference.get(k) != other.get(k))
            if keys:
                problems.append(f"rank {rank} differs from rank 0 in {', '.join(keys)}")
        if problems:
            raise DistributedMismatchError(
                f"The {self.world_size} processes disagree on the {what}: {'; '.join(problems)}. Every rank must run "
                "the same command on the same data: check the arguments given on each machine and that every machine "
                "sees the same files (same paths, same contents)."
            )

    def raise_if_any(self, error: BaseException | None, what: str) -> None:
        """Synchronise after a step that can fail on some ranks only: if any rank failed, every rank raises.

        A rank that failed re-raises its own ``error`` (marked ``all_ranks`` when every rank failed
        with the same message, so that the CLI prints it once); the others raise
        :class:`~datainf.errors.DistributedRankError` naming the failed ranks and their messages.
        Every rank must call this at the same point. In one process this just re-raises ``error``.
        """
        if not self.is_distributed:
            if error is not None:
                raise error
            return
        message = None if error is None else f"{type(error).__name__}: {error}"
        messages = self.all_gather_object(message)
        if error is not None:
            if all(text == message for text in messages):
                with contextlib.suppress(AttributeError):
                    error.all_ranks = True  # type: ignore[attr-defined]  # the same error everywhere: print it once
            raise error
        failed = [(rank, text) for rank, text in enumerate(messages) if text is not None]
        if failed:
            shown = "; ".join(f"rank {rank}: {text}" for rank, text in failed[:4])
            raise DistributedRankError(f"{what} failed on {len(failed)} of {self.world_size} ranks ({shown}).")


def _init_from_env(rank: int, world: int, local: int) -> None:
    import torch.distributed as dist

    global _initialised_here
    requested = os.environ.get(_BACKEND_ENV)
    backend = requested or ("nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(local)
    timeout = datetime.timedelta(seconds=float(os.environ.get(_TIMEOUT_ENV, "1800")))
    logger.info("Initialising torch.distributed: rank %d of %d, backend %s.", rank, world, backend)
    dist.init_process_group(backend=backend, rank=rank, world_size=world, timeout=timeout)
    _initialised_here = True
    atexit.register(_shutdown)


def _shutdown() -> None:
    """Destroy the process group datainf initialised (registered with ``atexit``)."""
    global _initialised_here
    import torch.distributed as dist

    if _initialised_here and dist.is_initialized():
        dist.destroy_process_group()
    _initialised_here = False


def dist_context() -> DistributedContext:
    """The :class:`DistributedContext` of this process.

    * ``torch.distributed`` already initialised: its rank, world size and backend;
    * else, torchrun's environment with ``WORLD_SIZE > 1``: initialises the default process group
      (``nccl`` with CUDA, else ``gloo``; ``DATAINF_DIST_BACKEND`` overrides; collective timeout
      ``DATAINF_DIST_TIMEOUT_S`` seconds, default 1800) and returns it;
    * else: a single process (rank 0 of 1), every collective a no-op.
    """
    available = torch.distributed.is_available()
    env = _env_world()
    if available and not torch.distributed.is_initialized() and env is not None and env[1] > 1:
        _init_from_env(*env)
    if not (available and torch.distributed.is_initialized()):
        return DistributedContext()
    import torch.distributed as dist

    world = dist.get_world_size()
    if world == 1:
        return DistributedContext()
    rank = dist.get_rank()
    local = env[2] if env is not None else int(os.environ.get("LOCAL_RANK", rank))
    backend = str(dist.get_backend())
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    return DistributedContext(rank=rank, world_size=world, local_rank=local, backend=backend, device=device)


def is_main_process() -> bool:
    """Whether this process is rank 0 (or the only process); never initialises anything."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    env = _env_world()
    return env is None or env[0] == 0


def describe_ids(ids: Sequence[str]) -> str:
    """A short fingerprint of an id list (order matters)."""
    return fingerprint_of(list(ids))[:16]


def on_main(ctx: DistributedContext, what: str, work: Callable[[], T]) -> T:
    """Run ``work`` on rank 0 only (the process that writes outputs) and hand its result to every rank.

    Use it for steps that touch the file system once for the whole job: claiming an output folder
    (:meth:`datainf.runs.RunDir.claim`), creating a store, reading finished results. The result is
    broadcast, so it must pickle. A failure on rank 0 stops every rank
    (:meth:`DistributedContext.raise_if_any`), naming ``what``. Every rank must call this at the same
    point. In a single process this is just ``work()``.
    """
    if not ctx.is_distributed:
        return work()
    result: T | None = None
    error: BaseException | None = None
    if ctx.is_main:
        try:
            result = work()
        except Exception as err:
            error = err
    ctx.raise_if_any(error, what)
    return ctx.broadcast_object(result)


def on_every_rank(ctx: DistributedContext, what: str, work: Callable[[], T]) -> T:
    """Run ``work`` on every rank; if it fails on any rank, every rank stops (none is left waiting in a
    collective), naming ``what``. Every rank must call this at the same point. In a single process this
    is just ``work()``."""
    if not ctx.is_distributed:
        return work()
    try:
        result = work()
    except Exception as err:
        ctx.raise_if_any(err, what)
        raise
    ctx.raise_if_any(None, what)
    return result


def check_same_settings(ctx: DistributedContext, what: str, settings: Mapping[str, Any]) -> None:
    """Under torchrun: stop every rank unless all were given the same ``settings``.

    ``settings`` is a JSON-able mapping (e.g. a command's resolved settings plus dataset fingerprints
    under keys such as ``"data:train"``); a differing key is named in the
    :class:`~datainf.errors.DistributedMismatchError` raised on every rank, with ``what`` saying
    what was compared (e.g. "settings of `datainf score`"). A no-op in a single process.
    """
    if not ctx.is_distributed:
        return
    ctx.check_same(settings, what)

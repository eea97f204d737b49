"""Checkpoints of finished streaming passes, so that a killed influence run resumes at pass granularity.

When the training gradients are recomputed on every pass (:class:`datainf.gradients.OnTheFlyGradients`)
a pass is expensive. The engine then hands the :class:`~datainf.methods.MethodContext` a
:class:`PassCheckpoints`: each :meth:`~datainf.methods.MethodContext.streamed_pass` saves what it
returns (the summed accumulators and the gathered per-example rows, e.g. DataInf's
``sum_i c_il g_il``) as ``<folder>/passes-<key>/pass-<index>.safetensors``, and a rerun with the same
key replays the finished passes from there instead of streaming. ``key`` hashes everything a pass's
result depends on (training source, test vectors, damping, method and settings), so a file is only
ever reused by the very same computation; passes are numbered in the order the method makes them,
which is deterministic for deterministic inputs.

Under ``torch.distributed`` the results are the same on every rank (already all-reduced /
all-gathered): rank 0 writes them, and a pass is replayed only when every rank can read its file.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from datainf.distributed import DistributedContext
from datainf.store import atomic_write_bytes

__all__ = ["PassCheckpoints"]

logger = logging.getLogger(__name__)

_SUM, _ROWS, _CPU_ROWS = "sum:", "rows:", "rows-cpu:"  # rows-cpu: rows the method kept on the CPU


class PassCheckpoints:
    """Finished streaming passes of one influence computation, in ``<folder>/passes-<key>/``.

    Args:
        folder: the work folder (created when the first pass is saved).
        key: identifies the computation (a hash); other keys' files are never read.
        processes: the job's collectives (rank 0 writes; every rank must agree to replay).
    """

    def __init__(self, folder: Path, key: str, processes: DistributedContext | None = None) -> None:
        self.path = Path(folder) / f"passes-{key}"
        self.processes = processes or DistributedContext()
        self.replayed = 0

    def _file(self, index: int) -> Path:
        return self.path / f"pass-{index:05d}.safetensors"

    def load(self, index: int, device: torch.device) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None:
        """``(sums, rows)`` of pass ``index`` when every rank has it, else ``None`` (collective).

        Sums and rows come back on ``device``, except rows that were on the CPU when saved.
        """
        file = self._file(index)
        found: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None = None
        if file.is_file():
            try:
                tensors = load_safetensors(file.read_bytes())
                sums = {k[len(_SUM) :]: v.to(device) for k, v in tensors.items() if k.startswith(_SUM)}
                rows = {k[len(_ROWS) :]: v.to(device) for k, v in tensors.items() if k.startswith(_ROWS)}
                rows.update({k[len(_CPU_ROWS) :]: v for k, v in tensors.items() if k.startswith(_CPU_ROWS)})
                found = (sums, rows)
            except Exception as err:  # a damaged file is recomputed, never trusted
                logger.warning("Ignoring the unreadable pass checkpoint %s (%s).", file, err)
        if not all(self.processes.all_gather_object(found is not None)):
            return None
        logger.info("Replaying streaming pass %d from %s.", index, file)
        self.replayed += 1
        return found

    def save(self, index: int, sums: Mapping[str, torch.Tensor], rows: Mapping[str, torch.Tensor]) -> None:
        """Keep pass ``index``'s results (rank 0 writes; atomic)."""
        if not self.processes.is_main:
            return
        tensors = {f"{_SUM}{k}": v.detach().cpu().contiguous() for k, v in sums.items()}
        for k, v in rows.items():
            tensors[f"{_CPU_ROWS if v.device.type == 'cpu' else _ROWS}{k}"] = v.detach().cpu().contiguous()
        atomic_write_bytes(self._file(index), save_safetensors(tensors, metadata={"format": "datainf-pass"}))

"""The harness of the distributed tests: spawn a job on gloo ranks with torchrun's environment.

Used by test_distributed.py, test_distributed_methods.py and test_onthefly_distributed.py.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the ranks' MASTER_PORT)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def set_rank_env(rank: int, port: int, world: int) -> None:
    """Inside a spawned rank: the environment torchrun would set (gloo backend, 90 s timeout), one thread."""
    os.environ.update(
        {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "DATAINF_DIST_TIMEOUT_S": "90",
            "DATAINF_DIST_BACKEND": "gloo",
        }
    )
    torch.set_num_threads(1)


def launch(
    entry: Callable[..., None], args: tuple[Any, ...], *, world: int, deadline_s: float, what: str
) -> list[int | None]:
    """Run ``entry(rank, *args)`` on ``world`` spawned ranks; returns their exit codes (``None``: success).

    A rank that dies makes torch.multiprocessing stop the others (like torchrun); a hang past
    ``deadline_s`` kills every rank and fails the test, naming ``what``.
    """
    context = mp.start_processes(entry, args=args, nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + deadline_s
    try:
        while not context.join(timeout=5):
            if time.monotonic() > deadline:
                pytest.fail(f"{what} hung for more than {deadline_s} s")
    except mp.ProcessExitedException:
        pass
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
            process.join()
    return [p.exitcode or None for p in context.processes]

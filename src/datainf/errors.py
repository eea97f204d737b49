"""Exception types raised by datainf.

Every error datainf raises on bad input derives from :class:`DataInfError`, so callers (and the CLI,
which turns them into a one-line message and exit code 2) can catch them in one place. Messages say
what is wrong *and* what to do about it.
"""

from __future__ import annotations

__all__ = [
    "DataInfError",
    "ConfigError",
    "EmptyInputError",
    "BlockMismatchError",
    "NonFiniteGradientError",
    "StoreError",
    "StoreCorruptedError",
    "StoreMismatchError",
    "FingerprintMismatchError",
    "GradientSourceChangedError",
    "ProjectionMismatchError",
    "LoRAValidationError",
    "DatasetError",
    "TaskInputError",
    "DistributedError",
    "DistributedMismatchError",
    "DistributedRankError",
    "OutputError",
    "DiskFullError",
    "OutputLockedError",
    "DeviceError",
]


class DataInfError(Exception):
    """Base class of every error datainf raises on bad input or bad state."""


class ConfigError(DataInfError, ValueError):
    """A setting is out of range or inconsistent (e.g. damping <= 0, unknown method)."""


class EmptyInputError(DataInfError, ValueError):
    """A dataset, gradient set or store holds no examples."""


class BlockMismatchError(DataInfError, ValueError):
    """Train and test gradients disagree on block names or block sizes."""


class NonFiniteGradientError(DataInfError, ValueError):
    """A gradient (or loss) holds NaN or infinity; the message names the block and example ids."""


class StoreError(DataInfError):
    """Base class of gradient-store problems."""


class StoreCorruptedError(StoreError):
    """A store's manifest or shard cannot be read, or does not match its manifest."""


class StoreMismatchError(StoreError):
    """An existing store was written with a different configuration than the one asked for."""


class FingerprintMismatchError(StoreError):
    """Train and test gradients were produced by different models/adapters."""


class GradientSourceChangedError(FingerprintMismatchError):
    """The model's adapter weights or the records of an on-the-fly gradient source changed between passes."""


class ProjectionMismatchError(FingerprintMismatchError):
    """Train and test gradients were projected differently (dimension, seed, or one of them not at all)."""


class LoRAValidationError(DataInfError, ValueError):
    """The model's LoRA adapters cannot be used (none found, merged, unsupported variant, ...)."""


class DatasetError(DataInfError, ValueError):
    """A dataset file or its columns cannot be used (missing file/column, empty, unknown labels)."""


class TaskInputError(DataInfError, ValueError):
    """An example cannot be turned into a loss (label out of range, no response tokens, ...)."""


class OutputError(DataInfError):
    """An output folder or file cannot be written (read-only folder, no permission, disk full, locked)."""


class DiskFullError(OutputError):
    """Not enough free space for an output (checked before writing, or the disk filled up while writing)."""


class OutputLockedError(OutputError):
    """Another run holds the lock on the output folder (or a lock that may be stale cannot be cleared)."""


class DeviceError(ConfigError):
    """The requested torch device (``cuda``, ``cuda:N``, ``mps``, ...) is not available in this torch build or machine."""


class DistributedError(DataInfError):
    """A problem of a multi-process (``torchrun``) run. Raised on every rank at once.

    ``all_ranks`` marks errors that every rank raises together, so that only rank 0 needs to print them.
    """

    all_ranks = True


class DistributedMismatchError(DistributedError, ValueError):
    """The processes of one job were given different configurations or data (fingerprints differ)."""


class DistributedRankError(DistributedError):
    """Another rank failed; the message names it and repeats its error."""

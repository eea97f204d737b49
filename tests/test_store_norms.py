"""The store's squared norms are taken in row chunks: the same bits as one float64 reduction, a fraction of the memory."""

from __future__ import annotations

import pytest
import torch

from datainf.errors import NonFiniteGradientError
from datainf.store import GradientStore
from datainf.store.base import _row_squared_norms


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(("rows", "dim"), [(1, 7), (2, 5), (3, 70_000), (41, 3072), (1000, 13), (301, 1)])
def test_chunked_norms_equal_one_float64_reduction_bit_for_bit(rows, dim, threads):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for dtype in (torch.float32, torch.bfloat16, torch.float64):
            block = torch.randn(rows, dim, generator=torch.Generator().manual_seed(rows + dim)).to(dtype)
            whole = torch.linalg.vector_norm(block, dim=1, dtype=torch.float64).square()
            chunked = _row_squared_norms(block)
            assert chunked.dtype == torch.float64 and torch.equal(chunked, whole), (rows, dim, dtype)
    finally:
        torch.set_num_threads(previous)


def test_from_tensors_keeps_a_view_of_matching_tensors_and_records_norms():
    block = torch.randn(50, 8)
    other = torch.randn(8, 50, dtype=torch.float64).T  # non-contiguous: must be copied
    store = GradientStore.from_tensors({"a": block, "b": other.to(torch.float32)})
    batch = next(store.iter_batches(batch_size=100))[1]
    assert batch["a"].data_ptr() == block.data_ptr()  # no copy of a contiguous block in the storage dtype
    assert torch.equal(batch["b"], other.to(torch.float32))
    expected = torch.stack([block.double().square().sum(1), other.to(torch.float32).double().square().sum(1)], dim=1)
    assert torch.allclose(store.squared_norms(), expected, rtol=1e-12)


def test_non_finite_rows_are_still_found_in_any_chunk():
    block = torch.randn(400, 3000)
    block[397, 5] = float("nan")
    with pytest.raises(NonFiniteGradientError, match="397"):
        GradientStore.from_tensors({"a": block})

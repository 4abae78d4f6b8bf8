"""huge_pages: aligned views of madvised arenas, each tensor its own bytes."""

from __future__ import annotations

import torch

from gpu_workers.model import huge_pages


def test_views_are_aligned_disjoint_and_of_the_asked_shape() -> None:
    shapes = [(3, 5), (1000,), (7, 16, 16), (0, 4), (1,)]
    tensors = [huge_pages.empty(s, torch.float32) for s in shapes] + [huge_pages.empty((33,), torch.uint8)]
    for t, shape in zip(tensors, shapes + [(33,)]):
        assert tuple(t.shape) == shape and t.is_contiguous() and t.data_ptr() % huge_pages.ALIGN == 0
    for i, t in enumerate(tensors):  # writing one leaves the others as they were
        t.fill_(i + 1)
    for i, t in enumerate(tensors):
        assert bool((t == i + 1).all())


def test_a_tensor_larger_than_an_arena_gets_its_own() -> None:
    big = huge_pages.empty((huge_pages.ARENA_BYTES // 4 + 3,), torch.float32)
    assert big.data_ptr() % huge_pages.HUGE_PAGE == 0
    big[-1] = 5.0
    assert big[-1] == 5.0


def test_copy_of_keeps_values_dtype_and_shape() -> None:
    src = torch.arange(24, dtype=torch.int8).view(4, 6).t()  # not contiguous
    copy = huge_pages.copy_of(src)
    assert copy.is_contiguous() and copy.dtype == torch.int8 and torch.equal(copy, src)

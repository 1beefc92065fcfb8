"""The pool that received bodies land in: reuse, and never under a view still alive."""

from __future__ import annotations

import ctypes
import mmap

import pytest

from multicloud.comm.bodies import HUGE_PAGE, BodyBuffers
from multicloud.core.buffers import padded

MIB = 1024 * 1024


def address(view: memoryview) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def test_a_buffer_is_page_aligned_writable_and_of_the_size_asked() -> None:
    pool = BodyBuffers()
    view = pool.take(3 * MIB + 5)
    assert len(view) == 3 * MIB + 5
    assert not view.readonly
    assert address(view) % mmap.PAGESIZE == 0
    # What lets the chunk store write it with O_DIRECT, padding and all.
    pages = padded(view)
    assert pages is not None
    assert len(pages) == 3 * MIB + mmap.PAGESIZE


def test_a_buffer_given_back_is_reused_and_the_old_view_is_dead() -> None:
    pool = BodyBuffers()
    first = pool.take(MIB)
    first[:] = b"a" * MIB
    where = address(first)
    pool.give_back(first)
    with pytest.raises(ValueError, match="released"):  # it never reads a later body
        bytes(first)
    second = pool.take(MIB // 2)
    assert address(second) == where
    assert pool.allocated == 1


def test_the_padding_that_goes_to_disk_is_zeroed_on_reuse() -> None:
    pool = BodyBuffers()
    first = pool.take(2 * mmap.PAGESIZE)
    first[:] = b"\xff" * len(first)
    pool.give_back(first)
    second = pool.take(mmap.PAGESIZE + 10)
    pages = padded(second)
    assert pages is not None
    assert bytes(pages[len(second):]) == bytes(mmap.PAGESIZE - 10)


def test_a_buffer_another_view_still_holds_is_not_reused() -> None:
    pool = BodyBuffers()
    view = pool.take(MIB)
    view[:4] = b"kept"
    kept = view[:]  # what a node that stages the body, or a late thread, holds
    pool.give_back(view)
    other = pool.take(MIB)
    assert pool.allocated == 2
    other[:4] = b"next"
    assert bytes(kept[:4]) == b"kept"  # untouched, and still readable
    pool.give_back(other)
    del kept  # its last user is done: the buffer is free at the next take
    pool.take(MIB)
    pool.take(MIB)
    assert pool.allocated == 2


def test_the_smallest_idle_buffer_that_fits_is_taken() -> None:
    pool = BodyBuffers()
    big, small = pool.take(3 * HUGE_PAGE), pool.take(HUGE_PAGE)
    where = address(small)
    pool.give_back(big)
    pool.give_back(small)
    assert address(pool.take(HUGE_PAGE // 2)) == where
    assert pool.allocated == 2


def test_the_pool_keeps_no_more_than_keep_bytes() -> None:
    pool = BodyBuffers(keep_bytes=2 * HUGE_PAGE)
    views = [pool.take(HUGE_PAGE) for _ in range(3)]
    for view in views:
        pool.give_back(view)
    assert pool.kept_bytes == 2 * HUGE_PAGE
    pool.give_back(pool.take(4 * HUGE_PAGE))  # bigger than the whole pool: not kept
    assert pool.kept_bytes <= 2 * HUGE_PAGE

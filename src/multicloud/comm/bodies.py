"""Where a node's received bodies land: page-aligned buffers, reused from one request to the next.

A body arriving over HTTP has to be copied once, from the pieces the socket hands over
into one buffer the node can hash, process or store. The copy is cheap; fresh memory for
it is not. Every 4 KiB of a new buffer costs a page fault and the kernel zeroing the page,
which together took longer than the copy itself (about 0.5 s against 0.07 s a GiB on the
2-core machine the benchmarks run on). So buffers are kept and reused.

A buffer is reused only once nothing refers to it any more. The request handler keeps
the view `take` gave it and hands the node a view of its own; when the node has answered,
the handler gives its view back (releasing it). The node's view is usually gone by then,
but not always: an I/O thread lets go of its arguments a moment after the handler has
its result, a node may keep a view (a staged blob), a thread of a cancelled request may
still be reading one. So a buffer given back waits until the buffer itself says that no
view of it is alive (an `mmap` refuses to be resized while one is), checked again at
every `take`; while the pool is over its size, the longest waiting are left to go with
their last user.

Buffers are anonymous `mmap`s: they start on a page boundary, so a chunk store can write a
received replica with O_DIRECT straight from it (`multicloud.core.buffers.padded`); they
are private and advised to use huge pages (one fault per 2 MiB, where the system has them).
Idle buffers are handed back to the kernel lazily (`MADV_FREE`): without memory pressure
their pages stay and reuse costs nothing; under pressure the kernel takes them.
"""

from __future__ import annotations

import contextlib
import mmap

from multicloud.core.buffers import HUGE_PAGE, anonymous

KEEP_BYTES = 256 * 1024 * 1024  # idle buffers a node keeps, in all (a few chunks' worth)


def _advise(backing: mmap.mmap, name: str) -> None:
    """Give the kernel an optional hint (Linux); without it, only cost changes."""
    advice = getattr(mmap, name, None)
    if advice is not None:
        with contextlib.suppress(OSError):  # e.g. a kernel without transparent huge pages
            backing.madvise(advice)


def _unused(backing: mmap.mmap) -> bool:
    """Whether no view of backing is alive (resizing is refused while one is)."""
    try:
        backing.resize(len(backing))
    except (BufferError, OSError, SystemError, ValueError):  # in use, or not resizable here
        return False
    return True


class BodyBuffers:
    """A node's pool of receive buffers; used from its event loop only."""

    def __init__(self, keep_bytes: int = KEEP_BYTES) -> None:
        self.keep_bytes = keep_bytes  # idle and waiting buffers kept, in all
        self._idle: list[mmap.mmap] = []  # free to reuse, oldest first
        self._waiting: list[mmap.mmap] = []  # given back, a view of each maybe still alive
        self.allocated = 0  # buffers made (every other take was a reuse)

    @property
    def idle_bytes(self) -> int:
        """The capacity of the buffers ready for reuse."""
        return sum(len(backing) for backing in self._idle)

    @property
    def kept_bytes(self) -> int:
        """The capacity of every buffer the pool holds, waiting ones included."""
        return self.idle_bytes + sum(len(backing) for backing in self._waiting)

    def take(self, size: int) -> memoryview:
        """A writable, page-aligned view of size bytes (at least 1): the smallest idle
        buffer that holds it, else a new one. Its contents are whatever was there."""
        self.settle()
        fits = [backing for backing in self._idle if len(backing) >= size]
        if fits:
            backing = min(fits, key=len)
            self._idle.remove(backing)
        else:
            # Whole huge pages, so that the kernel can back the buffer with them.
            backing = anonymous(-(-size // HUGE_PAGE) * HUGE_PAGE)
            self.allocated += 1
        # The rest of the last page goes to disk with a direct write before the store cuts
        # the file to size: zeros there, not a byte of an earlier body.
        backing[size:-(-size // mmap.PAGESIZE) * mmap.PAGESIZE] = bytes(-size % mmap.PAGESIZE)
        return memoryview(backing)[:size]

    def give_back(self, view: memoryview) -> None:
        """Return the view `take` made, which is released here (a later use fails).

        Its buffer is reused once no other view of it is alive.
        """
        backing = view.obj
        try:
            view.release()
        except BufferError:  # someone holds this very view's memory: not ours to reuse
            return
        if isinstance(backing, mmap.mmap):
            self._waiting.append(backing)
            self.settle()

    def settle(self) -> int:
        """Move given-back buffers no view holds any more to idle, keep the pool within
        keep_bytes (dropping the longest waiting first, then the longest idle), and return
        the capacity idle. `take` and `give_back` do it; call it to see the pool now."""
        for backing in [b for b in self._waiting if _unused(b)]:
            self._waiting.remove(backing)
            _advise(backing, "MADV_FREE")
            self._idle.append(backing)
        while self.kept_bytes > self.keep_bytes:
            (self._waiting or self._idle).pop(0)  # freed with its last reference
        return self.idle_bytes

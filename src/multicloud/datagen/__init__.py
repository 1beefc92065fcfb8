"""A realistic, deterministic test dataset to feed the pipeline.

`generate_dataset` writes, under one directory and in nested folders:

    logs/2026/<month>/app-NNN.jsonl   JSON application logs, about 40% of the bytes
    exports/orders-NNN.csv            CSV order exports, about 20%
    blobs/<folder>/blob-NNN.bin       incompressible binary blobs, about 40%
    misc/empty.txt                    exactly one empty file

File sizes straddle the chunk size on purpose: many files smaller than a chunk, one larger
than a chunk once the dataset is at least two chunks, and one file of exactly a chunk and
one of a chunk plus a byte when the budget allows. The sizes add up to exactly the size asked
for. The same seed and size give byte-identical files under the same names.

Speed comes from never formatting records one by one: a few thousand distinct records are
formatted once, and each line joins a sampled record with fields that numpy stamps in bulk
for every line (timestamps, trace ids, latencies), so the data compresses like real logs
rather than like one line repeated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

import numpy as np

from multicloud.core.errors import ConfigError, SourceError
from multicloud.datagen.records import I64, LogLines, LogPool, OrderLines, OrderPool

__all__ = ["DatasetSummary", "generate_dataset"]


_MIB = 1024 * 1024
_BLOCK_BYTES = 4 * _MIB  # per write: large enough to be fast, small enough to keep memory flat
_KINDS = ("jsonl", "csv", "binary", "empty")
_SHARES = {"jsonl": 0.4, "csv": 0.2}  # share of the bytes per text kind; binary gets the rest
_SMALL_FILE = 4096  # smallest file the filler plans, unless the chunk hint is smaller still
_MAX_FILES_PER_KIND = 10_000  # filler files per kind, at most (about)
_BLOB_FOLDERS = ("images", "models", "archives")
_MONTHS = (9, 10, 11, 12)  # records fall in the autumn of 2026, a month per file


@dataclass(frozen=True, slots=True)
class DatasetSummary:
    """What `generate_dataset` wrote."""

    root: Path  # the directory holding the dataset
    files: int  # number of files, the empty one included
    total_bytes: int  # sum of all file sizes
    by_kind: dict[str, int]  # bytes per kind: "jsonl", "csv", "binary", "empty"


def generate_dataset(
    dest: str | Path,
    size_bytes: int,
    seed: int = 0,
    chunk_hint_bytes: int = 100 * _MIB,
) -> DatasetSummary:
    """Write a deterministic dataset of exactly `size_bytes` bytes into a new or empty `dest`."""
    if size_bytes < 0:
        raise ConfigError(f"invalid dataset size {size_bytes}: use 0 or more bytes")
    if seed < 0:
        raise ConfigError(f"invalid seed {seed}: use a non-negative integer")
    if chunk_hint_bytes < 1:
        raise ConfigError(f"invalid chunk hint {chunk_hint_bytes}: use 1 byte or more")
    root = Path(dest)
    _prepare_root(root)

    plan_rng, pool_rng, files_rng = np.random.default_rng(seed).spawn(3)
    logs = LogPool(pool_rng)
    orders = OrderPool(pool_rng)
    min_size = {"jsonl": logs.min_file, "csv": orders.min_file, "binary": 1}
    plan = _plan(size_bytes, chunk_hint_bytes, min_size, plan_rng)

    # Each file has its own generator, so one file's content does not depend on the others.
    for planned, rng in zip(plan, files_rng.spawn(len(plan)), strict=True):
        path = root / planned.path
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as out:
            if planned.kind == "jsonl":
                _write_text(out, planned.size, LogLines(logs, rng, planned.month))
            elif planned.kind == "csv":
                _write_text(out, planned.size, OrderLines(orders, rng, planned.month))
            elif planned.kind == "binary":
                _write_blob(out, planned.size, rng)

    by_kind = dict.fromkeys(_KINDS, 0)
    for planned in plan:
        by_kind[planned.kind] += planned.size
    return DatasetSummary(root, len(plan), sum(by_kind.values()), by_kind)


def _prepare_root(root: Path) -> None:
    """Create `root`, refusing anything that already holds files."""
    if root.exists() and not root.is_dir():
        raise SourceError(f"cannot generate a dataset into {root}: it is a file, not a directory")
    if root.is_dir() and any(root.iterdir()):
        raise SourceError(
            f"refusing to generate a dataset into {root}: the directory is not empty; "
            "pass a new or empty directory"
        )
    root.mkdir(parents=True, exist_ok=True)


# --- planning ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _PlannedFile:
    """One file to write."""

    path: str  # relative to the dataset root, forward slashes
    kind: str  # one of _KINDS
    size: int  # exact size in bytes
    month: int = 0  # month of 2026 its records fall in (text kinds)


def _plan(
    size: int, hint: int, min_size: dict[str, int], rng: np.random.Generator
) -> list[_PlannedFile]:
    """Decide every file's kind and exact size; the sizes add up to `size`."""
    budget = {kind: int(size * share) for kind, share in _SHARES.items()}
    budget["binary"] = size - sum(budget.values())
    sizes: dict[str, list[int]] = {"jsonl": [], "csv": [], "binary": []}

    def place(length: int, kinds: tuple[str, ...], borrow: bool = False) -> None:
        """Give a file of `length` bytes to the first of `kinds` whose budget holds it."""
        usable = [kind for kind in kinds if length >= min_size[kind]]
        for kind in usable:
            if budget[kind] >= length:
                budget[kind] -= length
                sizes[kind].append(length)
                return
        if borrow and usable:
            kind = usable[0]
            for other in ("binary", "csv", "jsonl"):
                if other != kind:
                    moved = min(budget[other], length - budget[kind])
                    budget[other] -= moved
                    budget[kind] += moved
            place(length, (kind,))

    # The chunk-boundary files come first so that the budget goes to them, not to filler.
    if size >= 2 * hint:
        place(hint + max(1, hint // 2), ("jsonl", "binary"), borrow=True)
    place(hint, ("jsonl", "binary", "csv"))
    place(hint + 1, ("binary", "jsonl", "csv"))

    small = max(1, min(_SMALL_FILE, hint // 8))
    for kind in ("jsonl", "csv", "binary"):  # binary last: it takes what text cannot use
        left = budget[kind]
        if kind != "binary" and left < min_size[kind]:
            budget["binary"] += left
            continue
        # The floor keeps a tiny chunk hint from asking for millions of files.
        low = max(small, min_size[kind], left // _MAX_FILES_PER_KIND)
        count = 0
        while left > 0:
            # Log-uniform sizes give many small files and a few big ones; every other file
            # stays under the chunk hint so that there are always several small ones.
            high = max(low, hint - 1 if count % 2 == 0 else 2 * hint)
            drawn = round(math.exp(rng.uniform(math.log(low), math.log(high))))
            length = min(max(drawn, low), high)  # exp(log(x)) can land a hair under x
            if left - length < low:
                length = left
            sizes[kind].append(length)
            left -= length
            count += 1

    plan = [_PlannedFile("misc/empty.txt", "empty", 0)]
    for i, length in enumerate(sizes["jsonl"]):
        month = _MONTHS[i % len(_MONTHS)]
        plan.append(
            _PlannedFile(f"logs/2026/{month:02d}/app-{i:03d}.jsonl", "jsonl", length, month)
        )
    for i, length in enumerate(sizes["csv"]):
        month = _MONTHS[i % len(_MONTHS)]
        plan.append(_PlannedFile(f"exports/orders-{i:03d}.csv", "csv", length, month))
    for i, length in enumerate(sizes["binary"]):
        folder = _BLOB_FOLDERS[i % len(_BLOB_FOLDERS)]
        plan.append(_PlannedFile(f"blobs/{folder}/blob-{i:03d}.bin", "binary", length))
    return plan


# --- writing ----------------------------------------------------------------------------------


class _LineSource(Protocol):
    """Makes the lines of one text file."""

    header: bytes  # written once at the top of the file
    longest: int  # longest line `draw` can return
    shortest: int  # shortest line `draw` can return
    shortest_fit: int  # shortest line `fit` can make

    def draw(self, count: int) -> tuple[list[list[bytes]], I64]:
        """Return `count` lines as columns of pieces (line i joins piece i of each column)."""
        ...

    def rewind(self, unused: int) -> None:
        """Forget the last `unused` lines drawn, so that the next line follows the last kept."""
        ...

    def fit(self, length: int) -> bytes:
        """Return one line of exactly `length` bytes, newline included."""
        ...


def _write_text(out: BinaryIO, size: int, lines: _LineSource) -> None:
    """Write exactly `size` bytes of whole lines: sampled blocks, then one fitted line."""
    out.write(lines.header)
    left = size - len(lines.header)
    # Stop sampling while there is still room for the longest line plus a fitted one, so the
    # last line can always be made exactly as long as what is left.
    reserve = lines.longest + lines.shortest_fit
    per_block = max(1, _BLOCK_BYTES // lines.longest)
    while left >= reserve:
        pieces, lengths = lines.draw(min(per_block, (left - reserve) // lines.shortest + 1))
        ends = np.cumsum(lengths)
        # Keep every line that starts while at least `reserve` bytes are left.
        keep = int(np.searchsorted(ends - lengths, left - reserve, side="right"))
        lines.rewind(len(lengths) - keep)
        out.write(_join(pieces, keep))
        left -= int(ends[keep - 1])
    out.write(lines.fit(left))


def _join(columns: list[list[bytes]], count: int) -> bytes:
    """Concatenate the first `count` lines, each made of one piece from every column."""
    width = len(columns)
    parts: list[bytes] = [b""] * (width * count)
    for i, column in enumerate(columns):
        parts[i::width] = column[:count]
    return b"".join(parts)


def _write_blob(out: BinaryIO, size: int, rng: np.random.Generator) -> None:
    """Write `size` incompressible pseudo-random bytes."""
    left = size
    while left > 0:
        length = min(left, _BLOCK_BYTES)
        # Raw 64-bit words are the fastest numpy randomness; little-endian keeps the bytes the
        # same on every platform.
        words = rng.bit_generator.random_raw((length + 7) // 8).astype("<u8", copy=False)
        out.write(words.view(np.uint8)[:length].data)
        left -= length

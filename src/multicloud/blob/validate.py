"""Validation of a chunk on its processing node: its bytes arrived intact and its records parse.

JSON lines are checked with simdjson, CSV field counts with numpy (unquoted) or the csv
module (quoted); a chunk's first line may start mid-line and is checked by the line carried
from the previous chunk (`Chunk.line_prefix`). orjson (used only to locate a bad line)
holds the GIL; the rest mostly releases it.

The two checks differ in weight: a failed `check_chunk` means the bytes are not the
source's, and is always an error; a record that does not parse is a fact about the source
itself, which `find_invalid_record` reports (as an `InvalidRecord`) so that the node can
store the chunk as it is and say why (`processing.on_invalid_records: quarantine`), and
`check_records` raises (`fail`).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import re
import threading
from collections import deque
from dataclasses import dataclass
from itertools import islice
from typing import Any

import orjson
import simdjson
import xxhash

from multicloud.core.errors import InvalidChunkId, ValidationFailed
from multicloud.core.types import Chunk

HEX64 = re.compile(r"[0-9a-f]{64}")
_BLOCK = 1024 * 1024  # bytes of a CSV chunk scanned at a time (see _commas_before)
_JSONL_WINDOW = 4 * 1024 * 1024  # bytes of JSON lines split at a time (see _check_jsonl)

# A simdjson parser is not thread-safe: each worker thread keeps its own.
_local = threading.local()


def warm_up() -> None:
    """Import what validation loads lazily, so that a long-running node does not pay for it
    on its first CSV chunk (the CLI stays quick to start by not importing it)."""
    import numpy  # noqa: F401


@dataclass(frozen=True, slots=True)
class InvalidRecord:
    """The first record of a chunk that does not parse: its line, and what is wrong with it."""

    # 1-based within the chunk: line 1 is the chunk's first line, which may have begun in
    # the previous chunk. The node cannot know the line's number in the file (that takes
    # the newlines of every chunk before it); the coordinator, which has the file, can.
    line: int
    reason: str  # e.g. "not valid JSON: unexpected end of data at column 29"
    detail: str  # the line named as ValidationFailed names it, byte offset included
    # In a pack of small files: the file the record is in (its line counts from the
    # file's start), and the other files of the pack with a record that does not parse.
    file: str | None = None
    more: tuple[InvalidRecord, ...] = ()

    def message(self, chunk: Chunk) -> str:
        """The ValidationFailed message for this record in chunk."""
        return f"{self.file if self.file is not None else _where(chunk)}: {self.detail}"

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready view (the `process` reply carries it)."""
        view: dict[str, Any] = {"line": self.line, "reason": self.reason,
                                "detail": self.detail}
        if self.file is not None:
            view["file"] = self.file
            view["more"] = [record.to_json() for record in self.more]
        return view

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> InvalidRecord:
        """The InvalidRecord a `to_json` view describes."""
        file = raw.get("file")
        return cls(int(raw["line"]), str(raw["reason"]), str(raw["detail"]),
                   None if file is None else str(file),
                   tuple(cls.from_json(record) for record in raw.get("more") or ()))


def _where(chunk: Chunk) -> str:
    return f"chunk {chunk.index} of {chunk.file}"


def check_chunk(chunk: Chunk, view: memoryview) -> bytes:
    """The raw SHA-256 of the data, after checking it and the size against the chunk."""
    if len(view) != chunk.size_bytes:
        raise ValidationFailed(
            f"{_where(chunk)}: got {len(view)} bytes, expected size_bytes={chunk.size_bytes}"
        )
    if chunk.raw_xxh3 is not None:
        # Ingestion took an xxh3-128 of the same bytes beside the SHA-256: checking it here
        # catches corruption on the way to this node at a twentieth of the cost of SHA-256
        # (300 MB/s a core on this hardware). Identity is checked end to end at restore,
        # where decode_blob compares the rebuilt bytes' SHA-256 with the chunk id.
        actual = xxhash.xxh3_128_hexdigest(view)
        if actual != chunk.raw_xxh3:
            raise ValidationFailed(
                f"{_where(chunk)}: xxh3-128 of the data is {actual}, not {chunk.raw_xxh3} as "
                f"at ingestion: the bytes changed on the way; re-read the source")
        if not HEX64.fullmatch(chunk.chunk_id):
            raise InvalidChunkId(chunk.chunk_id)
        return bytes.fromhex(chunk.chunk_id)
    raw_hash = hashlib.sha256(view).digest()
    if raw_hash.hex() != chunk.chunk_id:
        raise ValidationFailed(
            f"{_where(chunk)}: SHA-256 of the data is {raw_hash.hex()}, not the chunk id "
            f"{chunk.chunk_id}: the bytes changed after ingestion; re-read the source"
        )
    return raw_hash


def check_records(chunk: Chunk, data: bytes | memoryview) -> None:
    """Raise ValidationFailed unless every complete record of the chunk parses."""
    problem = find_invalid_record(chunk, data)
    if problem is not None:
        raise ValidationFailed(problem.message(chunk))


def find_invalid_record(chunk: Chunk, data: bytes | memoryview) -> InvalidRecord | None:
    """The chunk's first complete record that does not parse, or None when all do.

    Only `.jsonl`/`.csv` chunks (`chunk.record_format`) have records; others have none.
    In a pack, each `.jsonl`/`.csv` file is checked on its own, whole: the first one with a
    bad record is returned, the others in its `more`.
    """
    if chunk.members:
        return _check_members(chunk, data)
    if chunk.record_format not in ("jsonl", "csv"):
        return None
    # A memoryview (a chunk read into an aligned buffer) is never copied whole: lines are
    # split a window at a time, and CSV is counted where it lies.
    if chunk.offset > 0 and chunk.line_prefix is not None:
        problem = _check_boundary_line(chunk, data, chunk.line_prefix)
        if problem is not None:
            return problem
    if chunk.record_format == "jsonl":
        return _check_jsonl(chunk, data)
    if _has_quote(data):
        # The csv module reads bytes: a copy, for CSV with quotes only.
        return _check_quoted_csv(chunk, data if isinstance(data, bytes) else bytes(data))
    return _check_plain_csv(chunk, data)


def _find_newline(data: bytes | memoryview) -> int:
    """Where data's first newline is, or -1, without copying all of it."""
    if isinstance(data, bytes):
        return data.find(b"\n")
    for start in range(0, len(data), _JSONL_WINDOW):
        found = bytes(data[start:start + _JSONL_WINDOW]).find(b"\n")
        if found >= 0:
            return start + found
    return -1


def _has_quote(data: bytes | memoryview) -> bool:
    if isinstance(data, bytes):
        return b'"' in data
    return any(b'"' in bytes(data[start:start + _BLOCK])
               for start in range(0, len(data), _BLOCK))


def _check_members(chunk: Chunk, data: bytes | memoryview) -> InvalidRecord | None:
    view = memoryview(data)
    found = []
    for member in chunk.members:
        if member.record_format is None:
            continue
        alone = Chunk(chunk_id="", file=member.file, index=0, offset=0, size_bytes=member.size,
                      source_cloud=chunk.source_cloud, record_format=member.record_format)
        problem = find_invalid_record(alone, view[member.at:member.at + member.size])
        if problem is not None:
            found.append(dataclasses.replace(problem, file=member.file))
    if not found:
        return None
    return dataclasses.replace(found[0], more=tuple(found[1:]))


def _check_boundary_line(chunk: Chunk, data: bytes | memoryview, prefix: bytes,
                         ) -> InvalidRecord | None:
    """Check the line the previous chunk began and this one finishes (the rest of the checks
    skip a chunk's first line, which may start mid-line)."""
    end = _find_newline(data)
    if end < 0:
        if not chunk.at_file_end:
            return None  # the line goes on into the next chunk, which checks it
        end = len(data)
    line = prefix + bytes(data[:end])
    if not line.strip(b" \t\r"):
        return None
    where = f"the line ending at byte {chunk.offset + end} of the file"
    if chunk.record_format == "jsonl":
        try:
            orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            reason = f"not valid JSON: {exc.msg} at column {exc.colno}"
            return InvalidRecord(1, reason, f"{where} is {reason}")
    elif chunk.csv_columns is not None and b'"' not in line:
        fields = line.count(b",") + 1
        if fields != chunk.csv_columns:
            reason = (f"{fields} fields, expected {chunk.csv_columns} "
                      f"(csv_columns from the file's header)")
            return InvalidRecord(1, reason, f"{where} has {reason}")
    return None


def _tail_is_partial(chunk: Chunk, data: bytes | memoryview) -> bool:
    return not chunk.at_file_end and data[-1:] != b"\n"


def _json_parser() -> simdjson.Parser:
    """One simdjson parser per worker thread (a parser is not thread-safe)."""
    parser: simdjson.Parser | None = getattr(_local, "parser", None)
    if parser is None:
        parser = _local.parser = simdjson.Parser()
    return parser


def _check_jsonl(chunk: Chunk, data: bytes | memoryview) -> InvalidRecord | None:
    """Every complete non-blank line must be one JSON document.

    Lines are split a window of whole lines at a time: the lines of a 100 MiB chunk split
    at once would hold another 100 MiB (and more in object headers) until the check ends.
    """
    skip_first = chunk.offset > 0  # may start mid-line
    skip_last = _tail_is_partial(chunk, data)
    parse = _json_parser().parse
    before = start = 0  # lines and bytes before the window
    while True:
        end = min(len(data), start + _JSONL_WINDOW)
        window = bytes(data[start:end])  # a copy of a window, whether data is bytes or not
        while end < len(data) and b"\n" not in window:  # a line longer than a window
            end = min(len(data), end + _JSONL_WINDOW)
            window = bytes(data[start:end])
        lines = window.split(b"\n")
        if end < len(data):
            end -= len(lines.pop())  # the unfinished line after the window's last newline
        first = 1 if skip_first and before == 0 else 0
        stop = len(lines) - 1 if skip_last and end == len(data) else len(lines)
        # simdjson validates each line fully without building Python objects: 360 MB/s
        # here against 103 MB/s for orjson.loads mapped over the lines (and a joined
        # "[...]" array is slower still, and lets "1,2" or "[1" + "2]" pass). orjson only
        # locates a bad line.
        try:
            deque(map(parse, filter(None, islice(lines, first, stop))), maxlen=0)
        except ValueError:
            # Find the line; whitespace-only lines also land here and are fine.
            problem = _locate_json(chunk, lines, first, stop, before, start)
            if problem is not None:
                return problem
        if end == len(data):
            return None
        before += len(lines)
        start = end


def _locate_json(chunk: Chunk, lines: list[bytes], first: int, stop: int, before: int,
                 start: int) -> InvalidRecord | None:
    """The first of lines[first:stop] that is not JSON (lines start at byte `start` of the
    chunk, after `before` lines of it)."""
    pos = start + sum(len(line) + 1 for line in lines[:first])
    for index in range(first, stop):
        line = lines[index]
        if line.strip(b" \t\r"):
            try:
                orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                number = before + index + 1
                reason = f"not valid JSON: {exc.msg} at column {exc.colno}"
                return InvalidRecord(number, reason, f"line {number} (byte "
                                     f"{chunk.offset + pos} of the file) is {reason}")
        pos += len(line) + 1
    return None


def _check_plain_csv(chunk: Chunk, data: bytes | memoryview) -> InvalidRecord | None:
    """Field counts of unquoted CSV, counted with numpy: a field per comma, plus one."""
    import numpy as np  # only CSV needs it; keeps the CLI's start-up short

    if not data:
        return None
    buf = np.frombuffer(data, dtype=np.uint8)
    newlines = np.concatenate([np.flatnonzero(buf[at:at + _BLOCK] == 0x0A) + at
                               for at in range(0, len(buf), _BLOCK)])
    starts = np.concatenate(([0], newlines + 1))
    ends = np.concatenate((newlines, [len(buf)]))
    # The newline between two lines is not a comma, so commas before each line's end,
    # differenced, are the commas within each line.
    fields = np.diff(_commas_before(buf, ends), prepend=0) + 1
    lengths = ends - starts
    first_byte = buf[np.minimum(starts, len(buf) - 1)]
    check = (lengths > 1) | ((lengths == 1) & (first_byte != 0x0D))  # blank and "\r" lines are OK
    if chunk.offset > 0:
        check[0] = False
    if _tail_is_partial(chunk, data):
        check[-1] = False
    rows = np.flatnonzero(check)
    if not rows.size:
        return None
    expected, why = _expected_fields(chunk, int(fields[rows[0]]), int(rows[0]) + 1)
    bad = rows[fields[rows] != expected]
    if not bad.size:
        return None
    line = int(bad[0])
    reason = f"{int(fields[line])} fields, expected {expected} ({why})"
    return InvalidRecord(line + 1, reason, f"line {line + 1} (byte "
                         f"{chunk.offset + int(starts[line])} of the file) has {reason}")


def _commas_before(buf: Any, ends: Any) -> Any:
    """For each position in ends (sorted, the last one len(buf)), the commas before it.

    Counted a block at a time: temporaries the size of the chunk cost more to allocate
    (the kernel zeroes every fresh page) than the comparisons themselves.
    """
    import numpy as np

    counts = np.zeros(len(ends), dtype=np.int64)
    seen = 0
    for at in range(0, len(buf), _BLOCK):
        commas = np.flatnonzero(buf[at:at + _BLOCK] == 0x2C)
        low = int(np.searchsorted(ends, at))
        high = int(np.searchsorted(ends, at + _BLOCK)) if at + _BLOCK < len(buf) else len(ends)
        counts[low:high] = seen + np.searchsorted(commas, ends[low:high] - at)
        seen += len(commas)
    return counts


def _expected_fields(chunk: Chunk, first_count: int, first_line: int) -> tuple[int, str]:
    """The field count rows must have, and where it comes from, for the message."""
    if chunk.csv_columns is not None:
        return chunk.csv_columns, "csv_columns from the file's header"
    if chunk.offset == 0:
        return first_count, f"as in the header, line {first_line}"
    return first_count, f"as in line {first_line}, the first complete row of the chunk"


def _check_quoted_csv(chunk: Chunk, data: bytes) -> InvalidRecord | None:
    """Field counts of CSV with quotes, read with the csv module (fields may hold newlines)."""
    problem = _scan_csv(chunk, data, starts_in_quotes=False)
    # A chunk cut inside a quoted field that spans lines starts mid-field: accept the chunk
    # if it reads cleanly under that assumption instead.
    if problem is None or (
        chunk.offset > 0 and _scan_csv(chunk, data, starts_in_quotes=True) is None
    ):
        return None
    return problem


def _scan_csv(chunk: Chunk, data: bytes, *, starts_in_quotes: bool) -> InvalidRecord | None:
    """The first of the chunk's complete CSV records that is wrong, or None.

    A record may span lines; its line is the one it ends on.
    """
    start, lines_before = 0, 0
    if chunk.offset > 0 and not starts_in_quotes:
        start = data.find(b"\n") + 1
        if start == 0:
            return None
        lines_before = 1
    end = data.rfind(b"\n", start) + 1 if _tail_is_partial(chunk, data) else len(data)
    if end <= start:
        return None
    # surrogateescape keeps any encoding readable: only commas, quotes and newlines matter.
    text = data[start:end].decode("utf-8", "surrogateescape")
    reader = csv.reader(
        io.StringIO('"' + text if starts_in_quotes else text, newline=""), strict=True
    )
    skip = starts_in_quotes  # the record the chunk starts inside of
    expected: tuple[int, str] | None = None
    try:
        for row in reader:
            if skip or not row:
                skip = False
                continue
            line = lines_before + reader.line_num
            if expected is None:
                expected = _expected_fields(chunk, len(row), line)
            if len(row) != expected[0]:
                reason = f"{len(row)} fields, expected {expected[0]} ({expected[1]})"
                return InvalidRecord(line, reason, f"line {line} has {reason}")
    except csv.Error as exc:
        if not chunk.at_file_end and str(exc) == "unexpected end of data":
            return None  # the last record continues in the next chunk
        line = lines_before + reader.line_num
        reason = f"not valid CSV: {exc}"
        return InvalidRecord(line, reason, f"line {line} is {reason}")
    return None

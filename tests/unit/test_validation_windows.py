"""Records checked a window (JSON lines) or a block (CSV) at a time find exactly what a
check of the whole chunk at once finds: the same first bad line, at the same byte."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import multicloud.blob.validate as validate
from multicloud.core.types import Chunk

LINES = st.sampled_from([b'{"k": 1}', b'{"k": [1, 2]}', b"", b"  ", b'{"cut": ', b"[1",
                         b'{"long": "' + b"y" * 150 + b'"}', b"3"])


def whole_at_once(chunk: Chunk, data: bytes) -> tuple[int, int] | None:
    """(line, byte in the file) of the first bad complete line, splitting all lines at once."""
    lines = data.split(b"\n")
    first = 1 if chunk.offset > 0 else 0
    stop = len(lines) - 1 if not chunk.at_file_end and not data.endswith(b"\n") else len(lines)
    pos = sum(len(line) + 1 for line in lines[:first])
    for number in range(first, stop):
        line = lines[number]
        if line.strip(b" \t\r"):
            try:
                orjson.loads(line)
            except orjson.JSONDecodeError:
                return number + 1, chunk.offset + pos
        pos += len(line) + 1
    return None


@settings(max_examples=300, deadline=None)
@given(lines=st.lists(LINES, max_size=40), newline_at_end=st.booleans(),
       offset=st.sampled_from([0, 10]), at_file_end=st.booleans())
def test_json_lines_in_windows_match_a_check_of_the_whole_chunk(
        lines: list[bytes], newline_at_end: bool, offset: int, at_file_end: bool) -> None:
    data = b"\n".join(lines) + (b"\n" if newline_at_end else b"")
    chunk = Chunk(chunk_id="", file="f.jsonl", index=0, offset=offset, size_bytes=len(data),
                  source_cloud="aws", record_format="jsonl", at_file_end=at_file_end)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(validate, "_JSONL_WINDOW", 64)  # windows shorter than some lines
        found = validate._check_jsonl(chunk, data)
    expected = whole_at_once(chunk, data)
    assert (None if found is None else
            (found.line, int(found.detail.split("byte ")[1].split(" ")[0]))) == expected


def fields_whole(data: bytes) -> list[int]:
    return [line.count(b",") + 1 for line in data.split(b"\n")]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.sampled_from([b"1", b"22", b"", b"abc"]), min_size=1,
                         max_size=6), max_size=30))
def test_csv_commas_counted_in_blocks_match_a_count_of_each_line(rows: list[list[bytes]],
                                                                 ) -> None:
    import numpy as np

    data = b"\n".join(b",".join(row) for row in rows)
    buf = np.frombuffer(data, dtype=np.uint8)
    ends = np.array([i for i, byte in enumerate(data) if byte == 0x0A] + [len(data)])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(validate, "_BLOCK", 7)  # rows across blocks
        counts = validate._commas_before(buf, ends)
    assert (np.diff(counts, prepend=0) + 1).tolist() == fields_whole(data)

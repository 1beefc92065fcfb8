"""Records that do not parse: found and located, stored as they are (quarantine) or refused
(fail), and reported by the pool, the run's metrics and the printed summary."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from multicloud import Cluster, LocalComm, PipelineResult
from multicloud.blob import decode_blob
from multicloud.blob.validate import InvalidRecord, check_records, find_invalid_record
from multicloud.core.config import ProcessingConfig
from multicloud.core.errors import ValidationFailed
from multicloud.core.network import Location
from multicloud.core.types import Chunk
from multicloud.node.service import NodeService
from multicloud.node.store import ChunkStore
from multicloud.pipeline.metrics import PipelineMetrics, QuarantinedRecord
from multicloud.pipeline.processing import ProcessingWorkerPool, _LineCounter
from multicloud.ui.render import print_summary, quarantined_text

GOOD = b"".join(json.dumps({"n": i, "msg": "ok"}).encode() + b"\n" for i in range(50))
CUT = b'{"n": 50, "msg": "cut off mid-wr'  # a log's last line, cut off mid-write
TRUNCATED = GOOD + CUT


def make_chunk(data: bytes, fmt: str | None = "jsonl", *, index: int = 0, offset: int = 0,
               file: str = "logs/app.jsonl", line_prefix: bytes | None = None) -> Chunk:
    return Chunk(chunk_id=hashlib.sha256(data).hexdigest(), file=file, index=index,
                 offset=offset, size_bytes=len(data), source_cloud="aws", record_format=fmt,
                 line_prefix=line_prefix, data=data)


# -- finding the record -----------------------------------------------------------------


def test_a_truncated_last_line_is_found_with_its_line_and_reason() -> None:
    found = find_invalid_record(make_chunk(TRUNCATED), TRUNCATED)
    assert found is not None
    assert found.line == 51
    assert found.reason == "not valid JSON: unexpected end of data at column 33"
    # The fail-mode message is the one validation always gave.
    assert found.message(make_chunk(TRUNCATED)) == (
        f"chunk 0 of logs/app.jsonl: line 51 (byte {len(GOOD)} of the file) is {found.reason}")
    with pytest.raises(ValidationFailed) as err:
        check_records(make_chunk(TRUNCATED), memoryview(TRUNCATED))
    assert str(err.value) == found.message(make_chunk(TRUNCATED))


def test_valid_records_and_other_formats_have_nothing_to_report() -> None:
    assert find_invalid_record(make_chunk(GOOD), memoryview(GOOD)) is None
    assert find_invalid_record(make_chunk(CUT, None), CUT) is None  # .bin: no records


def test_the_line_across_a_chunk_boundary_is_line_1_of_the_chunk_it_ends_in() -> None:
    data = b'"}\n{"ok": 1}\n'
    chunk = make_chunk(data, index=1, offset=100, line_prefix=b'{"broken": "x')
    assert find_invalid_record(chunk, data) is None
    bad = make_chunk(data, index=1, offset=100, line_prefix=b'{"broken": x')
    found = find_invalid_record(bad, data)
    assert found is not None
    # The column is the line's, counted from where it began in the previous chunk.
    assert (found.line, found.reason) == (1, "not valid JSON: unexpected character, "
                                             "expected a JSON value at column 12")
    assert "the line ending at byte 102 of the file" in found.detail


@pytest.mark.parametrize(("data", "line", "reason"), [
    (b"a,b,c\n1,2,3\n4,5\n", 3, "2 fields, expected 3 (as in the header, line 1)"),
    (b'a,b\n1,"x"\n2,"y"z\n', 3, 'not valid CSV: \',\' expected after \'"\''),
], ids=["plain", "quoted"])
def test_csv_records_are_found_too(data: bytes, line: int, reason: str) -> None:
    found = find_invalid_record(make_chunk(data, "csv", file="t.csv"), data)
    assert found is not None
    assert (found.line, found.reason) == (line, reason)


def test_an_invalid_record_survives_the_wire_form() -> None:
    record = InvalidRecord(7, "not valid JSON: x", "line 7 (byte 9 of the file) is x")
    assert InvalidRecord.from_json(json.loads(json.dumps(record.to_json()))) == record


# -- the node: quarantine stores the bytes, fail refuses them ----------------------------


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[NodeService]:
    node = NodeService("n1", Location("aws", "us-east-1"), ChunkStore(tmp_path / "n1"),
                       LocalComm({}))
    yield node
    node.close()


@pytest.mark.parametrize("transforms", [["validate"], ["validate", "compress"]])
async def test_quarantine_stages_the_chunk_byte_exact_and_says_why(
        service: NodeService, transforms: list[str]) -> None:
    service.configure(ProcessingConfig.model_validate({"transforms": transforms}))
    chunk = make_chunk(TRUNCATED)
    info, invalid = await service.process_outcome(chunk, memoryview(TRUNCATED))
    assert invalid is not None
    assert (invalid.line, invalid.reason) == (51, "not valid JSON: unexpected end of data "
                                                  "at column 33")
    staged = service.staged_blob(info.chunk_id)
    assert staged is not None
    # The same bytes as without validation: restore gives back the cut line as it was.
    assert decode_blob(staged, expected_chunk_id=chunk.chunk_id) == TRUNCATED
    service.configure(ProcessingConfig.model_validate({"transforms": transforms,
                                                       "parse_records": False}))
    service.release(info.chunk_id)
    plain, none = await service.process_outcome(chunk, TRUNCATED)
    assert none is None
    unvalidated = service.staged_blob(plain.chunk_id)
    assert unvalidated is not None
    assert decode_blob(unvalidated) == decode_blob(staged)
    assert (plain.raw_size, plain.codec) == (info.raw_size, info.codec)


async def test_fail_refuses_the_chunk_and_stages_nothing(service: NodeService) -> None:
    service.configure(ProcessingConfig(on_invalid_records="fail"))
    chunk = make_chunk(TRUNCATED)
    with pytest.raises(ValidationFailed, match=r"chunk 0 of logs/app.jsonl: line 51 .*"
                                               r"unexpected end of data"):
        await service.process_outcome(chunk, TRUNCATED)
    assert service.staged_blob(chunk.chunk_id) is None


@pytest.mark.parametrize("mode", ["quarantine", "fail"])
async def test_bytes_that_changed_on_the_way_fail_in_either_mode(service: NodeService,
                                                                 mode: str) -> None:
    service.configure(ProcessingConfig.model_validate({"on_invalid_records": mode}))
    chunk = make_chunk(TRUNCATED)
    changed = TRUNCATED[:-1] + b"X"
    with pytest.raises(ValidationFailed, match="SHA-256 of the data"):
        await service.process_outcome(chunk, changed)
    assert service.staged_blob(chunk.chunk_id) is None


async def test_process_alone_still_answers_with_the_blob_info(service: NodeService) -> None:
    info = await service.process(make_chunk(TRUNCATED), TRUNCATED)
    assert info.raw_size == len(TRUNCATED)


# -- counting a file's lines --------------------------------------------------------------


async def test_lines_are_counted_from_the_file_and_resumed(tmp_path: Path) -> None:
    path = tmp_path / "f.jsonl"
    path.write_bytes(b"a\n" * 1000)
    counter = _LineCounter()
    assert await counter.lines_before(path, 0) == 0
    assert await counter.lines_before(path, 1200) == 600
    assert await counter.lines_before(path, 401) == 200  # from the start, not the mark past it
    assert await counter.lines_before(path, 2000) == 1000
    path.write_bytes(b"\n" * 3000)  # changed: earlier counts are dropped
    assert await counter.lines_before(path, 2000) == 2000
    with pytest.raises(OSError, match="shorter than 5000 bytes"):
        await counter.lines_before(path, 5000)


# -- the run's record -------------------------------------------------------------------


def test_metrics_keep_each_files_first_bad_line_sorted_by_file() -> None:
    metrics = PipelineMetrics()
    assert metrics.get_summary()["processing"]["quarantined_files"] == []
    assert metrics.quarantine(QuarantinedRecord("b.jsonl", 4, 900, "late"))
    assert metrics.quarantine(QuarantinedRecord("b.jsonl", 1, 120, "early"))
    assert not metrics.quarantine(QuarantinedRecord("b.jsonl", 1, 120, "again"))
    assert metrics.quarantine(QuarantinedRecord("a.csv", 2, 7, "fields", in_file=False))
    assert metrics.get_summary()["processing"]["quarantined_files"] == [
        {"file": "a.csv", "line": 7, "reason": "fields", "chunk": 2},
        {"file": "b.jsonl", "line": 120, "reason": "early"},
    ]
    metrics.reset()
    assert metrics.quarantined_files() == {}


@pytest.fixture
def cluster(setup_test_cluster: Cluster) -> Cluster:
    """The embedded test cluster (3 AWS and 3 GCP nodes)."""
    return setup_test_cluster


class Events:
    """An Emit that keeps what it is given."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, dict[str, Any]]] = []

    def __call__(self, kind: str, detail: str, *, level: str = "info", **fields: Any) -> None:
        self.seen.append((kind, level, fields))


async def test_the_pool_names_the_files_line_and_emits_one_event_per_chunk(
        cluster: Cluster, tmp_path: Path) -> None:
    path = tmp_path / "app.jsonl"
    path.write_bytes(TRUNCATED)
    # The file in two chunks: 25 good lines, then 25 more and the cut line (line 51).
    half = len(b"".join(GOOD.splitlines(keepends=True)[:25]))
    first = make_chunk(TRUNCATED[:half])
    second = make_chunk(TRUNCATED[half:], index=1, offset=half, line_prefix=b"")
    second.path, second.data = path, None  # re-read from the file, as a run's chunks are
    events = Events()
    pool = ProcessingWorkerPool(cluster, on_event=events)

    good = await pool.process_one(first)
    tail = await pool.process_one(second)
    again = await pool.process_on(cluster.get("aws-node-1"), second)  # a retry elsewhere

    reason = "not valid JSON: unexpected end of data at column 33"
    assert good.invalid is None
    assert tail.invalid == again.invalid == f"line 51: {reason}"  # 25 lines + line 26 of 26
    assert tail.result is not None
    assert tail.error is None
    assert pool.quarantined == {"logs/app.jsonl": f"line 51: {reason}"}
    assert [(kind, level, fields["file"], fields["line"], fields["reason"], fields["index"])
            for kind, level, fields in events.seen] == [
        ("records_invalid", "warning", "logs/app.jsonl", 51, reason, 1)]
    pool.reset()
    assert pool.quarantined == {}


async def test_without_the_file_the_line_is_the_chunks(cluster: Cluster) -> None:
    """Bytes held in memory have no file to count lines in: the chunk's line is given."""
    data = b'x"}\n{"ok": 1}\n{bad\n'
    events = Events()
    pool = ProcessingWorkerPool(cluster, on_event=events)
    result = await pool.process_one(make_chunk(data, index=2, offset=4096))
    assert result.invalid == ("line 3 of chunk 2: not valid JSON: unexpected character, "
                              "expected a string key at column 2")
    summary = pool.metrics.get_summary()["processing"]["quarantined_files"]
    assert summary == [{"file": "logs/app.jsonl", "line": 3, "chunk": 2,
                        "reason": "not valid JSON: unexpected character, expected a string "
                                  "key at column 2"}]
    assert events.seen[0][2]["line_in_file"] is False


async def test_the_pool_in_fail_mode_reports_a_failed_chunk(cluster: Cluster) -> None:
    events = Events()
    pool = ProcessingWorkerPool(cluster, ProcessingConfig(on_invalid_records="fail"),
                                on_event=events)
    result = await pool.process_one(make_chunk(TRUNCATED))
    assert result.result is None
    assert result.invalid is None
    assert "line 51" in (result.error or "")
    assert pool.quarantined == {}
    assert [kind for kind, _, _ in events.seen] == ["chunk_failed"]


# -- the printed summary ----------------------------------------------------------------


def test_the_summary_text_counts_and_names_the_first_few() -> None:
    files = [{"file": f"f{i}.jsonl", "line": i, "reason": "bad [x]"} for i in range(5)]
    files[1] = {"file": "f1.csv", "line": 3, "chunk": 2, "reason": "2 fields"}
    text = quarantined_text(files)
    assert text.splitlines() == ["5", r"f0.jsonl: line 0: bad \[x]",
                                 "f1.csv: line 3 of chunk 2: 2 fields",
                                 r"f2.jsonl: line 2: bad \[x]", "... and 2 more"]
    assert quarantined_text([]) == "0"


def test_print_summary_shows_the_quarantined_files() -> None:
    metrics = PipelineMetrics()
    metrics.quarantine(QuarantinedRecord("logs/app.jsonl", 0, 51, "not valid JSON: cut [1]"))
    summary = metrics.get_summary()
    summary["distribution"].update(cross_cloud_transfers=0, cross_cloud_bytes=0,
                                   egress_cost_usd=0.0, replica_success_rate=1.0)
    summary["storage"].update(by_cloud={}, under_replicated=0)
    summary["node_failures_handled"] = 0
    result = PipelineResult("success", "b1", 1.0, 1, 10, 1, summary)
    out = io.StringIO()
    print_summary(Console(file=out, width=200), result)
    printed = out.getvalue()
    assert "quarantined files" in printed
    assert "logs/app.jsonl: line 51: not valid JSON: cut [1]" in printed

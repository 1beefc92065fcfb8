"""A batch with logs cut off mid-write, on the embedded cluster: with quarantine (the
default) it succeeds, names each bad file's first bad line, and restores every byte; with
`on_invalid_records: fail` it fails as it always did."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path

from multicloud import PipelineConfig, PipelineOrchestrator, RestoreReport
from multicloud.pipeline.events import PipelineEvent

Restorer = Callable[..., Awaitable[RestoreReport]]  # the assert_restored fixture

LINE = 64  # bytes per generated JSON line, newline included
UNEXPECTED_END = "not valid JSON: unexpected end of data at column"


def json_lines(count: int, start: int = 0) -> bytes:
    """count JSON lines of exactly LINE bytes each."""
    lines = [json.dumps({"n": n, "msg": "ok"}).encode() for n in range(start, start + count)]
    return b"".join(line.ljust(LINE - 1) + b"\n" for line in lines)


def write_source(root: Path, chunk: int) -> dict[str, tuple[int, str]]:
    """Good .jsonl/.csv/.bin files of several chunks and three bad ones under root; the
    bad files -> (first bad line in the file, the start of its reason)."""
    logs = root / "logs"
    logs.mkdir(parents=True)
    per_chunk = chunk // LINE
    (logs / "good-1.jsonl").write_bytes(json_lines(3 * per_chunk + 7))
    (logs / "good-2.jsonl").write_bytes(json_lines(per_chunk // 2))
    rows = b"".join(b"%d,item-%d,%d.50\n" % (i, i, i) for i in range(12_000))
    (root / "orders.csv").write_bytes(b"id,name,total\n" + rows)
    (root / "blob.bin").write_bytes(bytes(range(256)) * 700)

    # Cut off inside the last chunk: 2.5 chunks of lines, then half a line.
    inside = 2 * per_chunk + per_chunk // 2
    (logs / "cut-inside.jsonl").write_bytes(json_lines(inside) + b'{"n": 99999, "msg": "o')
    # Cut off in a line that starts in one chunk and ends in the next (the file's last).
    across = 2 * per_chunk  # lines that fill exactly two chunks
    (logs / "cut-across.jsonl").write_bytes(
        json_lines(across - 1) + b'{"n": 1, "msg": "' + b"x" * 200)
    # A bad row in the middle of a CSV's second chunk; the rest of the file is fine.
    bad_row = 2000
    csv_rows = [b"%d,item,%d\n" % (i, i) for i in range(6000)]
    csv_rows[bad_row] = b"2000,item\n"
    (root / "broken.csv").write_bytes(b"id,name,total\n" + b"".join(csv_rows))
    return {
        "logs/cut-inside.jsonl": (inside + 1, UNEXPECTED_END),
        "logs/cut-across.jsonl": (across, UNEXPECTED_END),
        "broken.csv": (bad_row + 2, "2 fields, expected 3 (csv_columns from the file's header)"),
    }


async def test_truncated_logs_are_quarantined_and_restore_byte_exact(
        make_orchestrator: Callable[..., PipelineOrchestrator], config: PipelineConfig,
        assert_restored: Restorer, tmp_path: Path) -> None:
    source = tmp_path / "aws_s3_simulation"
    bad = write_source(source, config.ingestion.chunk_size_bytes)
    orchestrator = make_orchestrator()  # the defaults: quarantine
    events: list[PipelineEvent] = []
    orchestrator.add_event_sink(events.append)

    result = await orchestrator.run_pipeline({"batch_id": "cut", "data_source": str(source)})

    assert result.status == "success", result.error
    quarantined = result.metrics["processing"]["quarantined_files"]
    assert [(q["file"], q["line"]) for q in quarantined] == sorted(
        (file, line) for file, (line, _) in bad.items())
    for entry in quarantined:
        assert entry["reason"].startswith(bad[entry["file"]][1]), entry
        assert "chunk" not in entry  # the line is the file's, not a chunk's
    assert result.metrics["processing"]["success_rate"] == 1.0
    assert orchestrator.processing_pool.quarantined == {
        q["file"]: f"line {q['line']}: {q['reason']}" for q in quarantined}
    reported = sorted((e.fields["file"], e.fields["line"], e.level)
                      for e in events if e.kind == "records_invalid")
    assert reported == sorted((file, line, "warning") for file, (line, _) in bad.items())
    # Every file comes back as it was, the cut lines and the bad row included.
    await assert_restored(orchestrator, "cut", source)


async def test_with_fail_a_truncated_log_fails_the_batch(
        make_orchestrator: Callable[..., PipelineOrchestrator], config: PipelineConfig,
        tmp_path: Path) -> None:
    source = tmp_path / "aws_s3_simulation"
    source.mkdir()
    (source / "good.jsonl").write_bytes(json_lines(50))
    (source / "cut.jsonl").write_bytes(json_lines(50) + b'{"n": 50, "ms')
    orchestrator = make_orchestrator(processing={"on_invalid_records": "fail"})
    events: list[PipelineEvent] = []
    orchestrator.add_event_sink(events.append)

    result = await orchestrator.run_pipeline({"batch_id": "strict", "data_source": str(source)})

    assert result.status == "failed"
    # Two small files: packed together, so the error names the file, not a chunk of it.
    assert (result.error or "").startswith("cut.jsonl: line 51 (byte 3200 of the file)")
    assert orchestrator.storage_manager.manifest.batch("strict").status == "failed"
    assert result.metrics["processing"]["quarantined_files"] == []
    assert not [e for e in events if e.kind == "records_invalid"]

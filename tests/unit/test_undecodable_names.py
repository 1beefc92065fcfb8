"""A file name that is not UTF-8 (surrogate-escaped in Python) goes everywhere a name goes:
over the wire exactly, into logs and onto the terminal escaped, never a UnicodeEncodeError."""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from rich.console import Console

from multicloud.cluster.node_server import NodeServer
from multicloud.comm import wire
from multicloud.comm.http import HttpComm
from multicloud.core.config import ServiceConfig
from multicloud.core.errors import MulticloudError
from multicloud.core.messages import NodeAddress, Request
from multicloud.core.network import Location
from multicloud.core.types import Chunk, PipelineResult
from multicloud.core.units import display_path, is_utf8
from multicloud.pipeline.events import EventBus, PipelineEvent
from multicloud.ui.dashboard import DashboardView, StatusDashboard
from multicloud.ui.logger import PipelineLogger
from multicloud.ui.render import print_summary

BAD = "bad\udcff\udcfe.bin"  # os.fsdecode(b"bad\xff\xfe.bin")
SHOWN = "bad\\xff\\xfe.bin"
TOKEN = "names-token"
AWS = Location("aws", "us-east-1")


class StrictUtf8(io.TextIOWrapper):
    """A text stream that raises on what UTF-8 cannot encode, as a real stdout does."""

    def __init__(self) -> None:
        self.raw_bytes = io.BytesIO()
        super().__init__(self.raw_bytes, encoding="utf-8", errors="strict")

    def text(self) -> str:
        """Everything written so far."""
        self.flush()
        return self.raw_bytes.getvalue().decode("utf-8")


@pytest.mark.parametrize(("name", "shown"), [
    ("plain.txt", "plain.txt"),
    ("café/naïve.csv", "café/naïve.csv"),  # valid UTF-8 stays as it is
    (BAD, SHOWN),
    ("a\nb\x1b[2J", "a\\x0ab\\x1b[2J"),  # controls cannot move the cursor or break a line
    ("lone\ud800", "lone\\ud800"),  # a surrogate that is no escaped byte (from JSON)
])
def test_display_path(name: str, shown: str) -> None:
    assert display_path(name) == shown
    assert is_utf8(display_path(name))
    assert display_path(display_path(name)) == display_path(name)


def test_chunk_metadata_crosses_the_wire_exactly() -> None:
    chunk = Chunk("0" * 64, f"dir\udcff/{BAD}", 2, 128, 64, "aws")
    header = wire.encode_meta({"chunk": chunk.to_json()})
    header.encode("ascii")  # an HTTP header: \\u escapes only
    back = Chunk.from_json(wire.decode_meta(header)["chunk"])
    assert back.file == chunk.file
    assert back.file.encode("utf-8", "surrogateescape") == b"dir\xff/bad\xff\xfe.bin"


@pytest.fixture
async def http_node(tmp_path: Path) -> AsyncIterator[NodeAddress]:
    server = NodeServer(tmp_path, TOKEN, AWS.cloud, AWS.region, node_id="aws-node-1",
                        service=ServiceConfig(), host="127.0.0.1", port=0, fsync=False)
    await server.start()
    try:
        yield NodeAddress("aws-node-1", AWS, server.url)
    finally:
        await server.stop()


async def test_a_name_survives_http_both_ways(http_node: NodeAddress) -> None:
    # The name goes out in the metadata header; the node's error names it, and comes back
    # in the JSON error body: the size is one byte off, so the node refuses the chunk.
    data = b"payload"
    chunk = Chunk(hashlib.sha256(data).hexdigest(), BAD, 0, 0, len(data) + 1, "aws")
    comm = HttpComm(TOKEN)
    try:
        with pytest.raises(MulticloudError) as info:
            await comm.call(http_node, Request("process", {"chunk": chunk.to_json()}, data,
                                               AWS))
    finally:
        await comm.close()
    assert f"chunk 0 of {BAD}: got 7 bytes" in str(info.value)


def test_the_event_log_writes_an_escaped_name_as_utf8_json(tmp_path: Path) -> None:
    path = tmp_path / "p.log"
    with PipelineLogger(path) as logger:
        logger.sink(PipelineEvent(1.0, "chunk_failed", f"chunk 0 of {BAD}: quorum", "b1",
                                  "error", {"file": BAD, "index": 0, "chunk_id": "c",
                                            "stage": "distribution", "error": "quorum",
                                            "where": Path(BAD), BAD: [BAD]}))
        logger.sink(PipelineEvent(2.0, "files_skipped", f"skipped: {BAD}", "b1", "warning",
                                  {"skipped": [{"file": BAD, "kind": "fifo", "reason": "r"}]}))
    raw = path.read_bytes()
    raw.decode("utf-8")  # strict: every line is UTF-8
    failed, skipped = (json.loads(line) for line in raw.splitlines())
    assert failed["detail"] == f"chunk 0 of {SHOWN}: quorum"
    assert failed["file"] == failed["where"] == SHOWN
    assert failed[SHOWN] == [SHOWN]
    assert skipped["skipped"] == [{"file": SHOWN, "kind": "fifo", "reason": "r"}]


def test_the_stdlib_log_of_an_event_gets_the_escaped_name(
        caplog: pytest.LogCaptureFixture) -> None:
    stream = StrictUtf8()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("multicloud.pipeline.events")
    logger.addHandler(handler)
    try:
        with caplog.at_level(logging.INFO, logger="multicloud.pipeline.events"):
            EventBus().emit("files_skipped", f"skipped {BAD}", level="warning")
    finally:
        logger.removeHandler(handler)
    assert f"files_skipped: skipped {SHOWN}" in stream.text()


def test_the_dashboard_shows_an_escaped_name() -> None:
    stream = StrictUtf8()
    console = Console(file=stream, width=120, force_terminal=False)
    view = DashboardView(status="running", batch_id="b\udcff", events=[
        {"at": 1.0, "kind": "chunk_failed", "level": "error",
         "detail": f"chunk 0 of {BAD}: no quorum\nsecond line"},
        {"at": 2.0, "kind": "files_skipped", "level": "warning", "detail": f"[bold]{BAD}"}])

    console.print(StatusDashboard().render(view))

    text = stream.text()
    assert f"chunk 0 of {SHOWN}: no quorum second line" in text
    assert f"[bold]{SHOWN}" in text
    assert "b\\xff" in text


def test_the_run_summary_shows_names_escaped() -> None:
    stream = StrictUtf8()
    metrics = {
        "ingestion": {"skipped_entries": [
            {"file": BAD, "kind": "fifo", "reason": "a fifo holds no data"},
            {"file": "[red]sock[/]", "kind": "socket", "reason": "r"}]},
        "processing": {"quarantined_files": [
            {"file": f"q{BAD}", "line": 3, "reason": "not JSON"}]},
        "distribution": {"cross_cloud_transfers": 0, "cross_cloud_bytes": 0,
                         "egress_cost_usd": 0.0, "replica_success_rate": 1.0},
        "storage": {"by_cloud": {}, "under_replicated": 0},
        "node_failures_handled": 0,
    }
    result = PipelineResult("success", "b1", 1.0, 1, 10, 1, metrics)

    print_summary(Console(file=stream, width=200), result)

    text = stream.text()
    assert f"2: {SHOWN} (fifo), [red]sock[/] (socket)" in text
    assert f"q{SHOWN}: line 3: not JSON" in text

"""`process` with records that do not parse, on both carriers: quarantine stages the bytes
as they are and says which line and why; fail refuses them; and the mode reaches a node by
`configure` and by the `process` request itself."""

from __future__ import annotations

import hashlib

import pytest

from multicloud import Cluster
from multicloud.blob import decode_blob
from multicloud.core.config import ProcessingConfig
from multicloud.core.errors import ValidationFailed
from multicloud.core.types import Chunk

GOOD = b'{"event": "click", "user": 42}\n' * 100
TRUNCATED = GOOD + b'{"event": "click", "us'  # the last line, cut off mid-write
REASON = "not valid JSON: unexpected end of data at column 23"
FAIL = ProcessingConfig(on_invalid_records="fail")


def log_chunk(data: bytes) -> Chunk:
    """A single-chunk .jsonl file made of data."""
    return Chunk(chunk_id=hashlib.sha256(data).hexdigest(), file="logs/app.jsonl", index=0,
                 offset=0, size_bytes=len(data), source_cloud="aws", record_format="jsonl")


async def test_quarantine_stores_the_bytes_as_they_are_and_says_why(cluster: Cluster) -> None:
    node = cluster.get("aws-node-1")
    await cluster.configure(ProcessingConfig())  # the default mode, quarantine
    outcome = await cluster.client.process_outcome(node, log_chunk(TRUNCATED), TRUNCATED,
                                                   node.location)
    assert outcome.invalid is not None
    assert (outcome.invalid.line, outcome.invalid.reason) == (101, REASON)
    assert f"line 101 (byte {len(GOOD)} of the file)" in outcome.invalid.detail
    await cluster.client.replicate(node, node, outcome.blob)
    stored = await cluster.client.read(node, outcome.blob.chunk_id, node.location)
    assert decode_blob(stored, expected_chunk_id=outcome.blob.chunk_id) == TRUNCATED


async def test_valid_records_come_back_without_a_reason(cluster: Cluster) -> None:
    node = cluster.get("gcp-node-1")
    outcome = await cluster.client.process_outcome(node, log_chunk(GOOD), GOOD, node.location)
    assert outcome.invalid is None
    assert outcome.blob.raw_size == len(GOOD)


async def test_fail_refuses_the_chunk(cluster: Cluster) -> None:
    node = cluster.get("aws-node-2")
    await cluster.configure(FAIL)
    chunk = log_chunk(TRUNCATED)
    with pytest.raises(ValidationFailed) as err:
        await cluster.client.process_outcome(node, chunk, TRUNCATED, node.location)
    assert str(err.value) == (f"chunk 0 of logs/app.jsonl: line 101 (byte {len(GOOD)} of the "
                              f"file) is {REASON}")
    assert not await cluster.client.has(node, chunk.chunk_id)


async def test_the_mode_travels_with_each_process_request(cluster: Cluster) -> None:
    """A node that missed `configure` (down when the run began) still fails the chunk."""
    configured, missed = cluster.get("aws-node-1"), cluster.get("aws-node-3")
    await cluster.client.configure(configured, FAIL)  # the run's chain: fail
    with pytest.raises(ValidationFailed, match="line 101"):
        await cluster.client.process_outcome(missed, log_chunk(TRUNCATED), TRUNCATED,
                                             missed.location)


@pytest.mark.parametrize("mode", ["quarantine", "fail"])
async def test_bytes_that_changed_on_the_way_fail_in_either_mode(cluster: Cluster,
                                                                 mode: str) -> None:
    node = cluster.get("aws-node-1")
    await cluster.configure(ProcessingConfig.model_validate({"on_invalid_records": mode}))
    changed = TRUNCATED[:-1] + b"X"
    with pytest.raises(ValidationFailed, match="SHA-256 of the data"):
        await cluster.client.process_outcome(node, log_chunk(TRUNCATED), changed,
                                             node.location)

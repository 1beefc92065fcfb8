"""A node's Prometheus series count what it did, read the same in-process and over HTTP.

In-process the node's registry is read directly, over HTTP from `GET /metrics` with the
cluster's token; either way the figures are live (no scrape walks the disk).
"""

from __future__ import annotations

import pytest
from contract_support import DATA, OTHER, object_path, push, scrape, stage

from multicloud import Cluster, IntegrityError
from multicloud.core.messages import Request

SERIES = "multicloud_node_"


async def test_node_metrics_count_stores_transfers_and_requests(cluster: Cluster) -> None:
    first = await stage(cluster, "aws-node-1")
    second = await stage(cluster, "aws-node-1", OTHER)
    for blob in (first, second):
        await push(cluster, "aws-node-1", "gcp-node-1", blob)
    src, dst = cluster.get("aws-node-1"), cluster.get("gcp-node-1")
    bad = Request("put", {"chunk_id": first.chunk_id, "checksum": "0" * 32}, b"not a blob",
                  src.location)
    with pytest.raises(IntegrityError):
        await cluster.client.channel.call(dst.address, bad)
    await cluster.client.read(dst, first.chunk_id, src.location)

    at_dst = await scrape(cluster, "gcp-node-1")
    # What the store holds, right away and as the disk has it.
    on_disk = [object_path(cluster, "gcp-node-1", b.chunk_id).stat().st_size
               for b in (first, second)]
    assert at_dst.value(SERIES + "stored_chunks") == len(on_disk) == 2
    assert at_dst.value(SERIES + "stored_bytes") == sum(on_disk)
    assert await cluster.client.usage(dst) == (2, sum(on_disk))
    # Bodies in and out, by the cloud at the other end.
    assert at_dst.labelled(SERIES + "bytes_received_total", "peer_cloud") == {
        "aws": first.blob_size + second.blob_size + len(b"not a blob")}
    assert at_dst.labelled(SERIES + "bytes_sent_total", "peer_cloud") == {
        "aws": first.blob_size}  # the read
    at_src = await scrape(cluster, "aws-node-1")
    assert at_src.labelled(SERIES + "bytes_received_total", "peer_cloud") == {
        "aws": len(DATA) + len(OTHER)}  # from the bucket, to be processed
    assert at_src.labelled(SERIES + "bytes_sent_total", "peer_cloud") == {
        "gcp": first.blob_size + second.blob_size}
    # Requests by route and outcome: the refused put under its error's wire code.
    assert at_dst.labelled(SERIES + "requests_total", "status", route="put") == {
        "ok": 2, "integrity": 1}
    assert at_src.labelled(SERIES + "requests_total", "status", route="push") == {"ok": 2}
    assert at_dst.types[SERIES + "request_seconds"] == "histogram"
    assert at_dst.value(SERIES + "request_seconds_count", route="put") == 3
    assert at_dst.value(SERIES + "request_seconds_bucket", route="put", le="+Inf") == 3
    # Every durable write fsyncs (on by default).
    assert at_dst.types[SERIES + "fsync_seconds"] == "histogram"
    assert at_dst.value(SERIES + "fsync_seconds_count") >= 2
    assert at_src.value(SERIES + "fsync_seconds_count") == 0  # it stored nothing
    assert at_dst.value(SERIES + "info", node="gcp-node-1", cloud="gcp",
                        region="us-central1") == 1

"""The egress ledger: every push charged on its link at its sender's price, as clouds bill.

Failed attempts are charged for the bytes that left the sender; an attempt that never
sent anything (a partition stops the sender first) is not.
"""

from __future__ import annotations

import pytest
from contract_support import push, stage

from multicloud import Cluster
from multicloud.core.errors import ReplicaRefused
from multicloud.core.network import LinkTraffic


def pushes_since(cluster: Cluster, before: dict[str, LinkTraffic]) -> dict[str, LinkTraffic]:
    """What the ledger recorded since the snapshot `before`, by link."""
    ledger = cluster.client.ledger
    return ledger.difference(ledger.snapshot(), before)


async def test_cross_cloud_and_same_region_pushes_at_their_prices(cluster: Cluster) -> None:
    blob = await stage(cluster, "aws-node-1")  # us-east-1
    before = cluster.client.ledger.snapshot()
    await push(cluster, "aws-node-1", "gcp-node-1", blob)  # gcp us-central1
    await push(cluster, "aws-node-1", "aws-node-3", blob)  # aws us-east-1
    delta = pushes_since(cluster, before)
    assert set(delta) == {"aws/us-east-1->gcp/us-central1", "aws/us-east-1->aws/us-east-1"}
    cross = delta["aws/us-east-1->gcp/us-central1"]
    assert (cross.transfers, cross.bytes, cross.cross_cloud) == (1, blob.blob_size, True)
    assert cross.egress_usd == pytest.approx(blob.blob_size / 1e9 * 0.09)  # aws internet
    same = delta["aws/us-east-1->aws/us-east-1"]
    assert (same.transfers, same.bytes, same.cross_cloud) == (1, blob.blob_size, False)
    assert same.egress_usd == pytest.approx(blob.blob_size / 1e9 * 0.01)  # aws intra-region
    assert cross.emulated_seconds > same.emulated_seconds


async def test_a_push_refused_by_a_full_disk_is_charged(cluster: Cluster) -> None:
    blob = await stage(cluster, "gcp-node-1")
    await cluster.faults.disk_full("aws-node-1")
    before = cluster.client.ledger.snapshot()
    with pytest.raises(ReplicaRefused):
        await push(cluster, "gcp-node-1", "aws-node-1", blob)
    delta = pushes_since(cluster, before)
    assert list(delta) == ["gcp/us-central1->aws/us-east-1"]  # the bytes did cross
    refused = delta["gcp/us-central1->aws/us-east-1"]
    assert (refused.transfers, refused.bytes) == (1, blob.blob_size)
    assert refused.egress_usd == pytest.approx(blob.blob_size / 1e9 * 0.12)  # gcp internet


async def test_a_push_whose_target_crashes_mid_write_is_charged(cluster: Cluster) -> None:
    blob = await stage(cluster, "aws-node-1")
    await cluster.faults.crash_during_write("aws-node-2")  # the bytes arrive, then it dies
    before = cluster.client.ledger.snapshot()
    with pytest.raises(ReplicaRefused):
        await push(cluster, "aws-node-1", "aws-node-2", blob)
    delta = pushes_since(cluster, before)
    assert [(name, t.bytes) for name, t in delta.items()] == [
        ("aws/us-east-1->aws/us-west-2", blob.blob_size)]


async def test_a_push_across_a_partition_is_not_charged(cluster: Cluster) -> None:
    blob = await stage(cluster, "aws-node-1")
    await cluster.faults.partition("aws", "gcp")
    before = cluster.client.ledger.snapshot()
    with pytest.raises(ReplicaRefused):
        await push(cluster, "aws-node-1", "gcp-node-2", blob)
    assert pushes_since(cluster, before) == {}  # the sender stopped before sending

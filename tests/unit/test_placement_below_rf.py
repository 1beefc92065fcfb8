"""Placement and the run's policy check with fewer healthy nodes (or clouds) than the policy
wants: as many targets as there are, down to write_quorum, spread as far as possible."""

from __future__ import annotations

import logging
import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from multicloud import (
    DistributionConfig,
    InsufficientNodes,
    NetworkAwarePlacement,
    NodeRegistry,
    create_local_cluster,
)
from multicloud.pipeline.placement import check_policy


def chunk_ids(count: int, seed: int = 0) -> list[str]:
    """Deterministic random-looking chunk ids (64 hex characters)."""
    rng = random.Random(seed)
    return [f"{rng.getrandbits(256):064x}" for _ in range(count)]


def cloud_of(node_id: str) -> str:
    """The cloud of a test-cluster node id."""
    return node_id.split("-", 1)[0]


@pytest.fixture
async def walkthrough(tmp_path: Path) -> AsyncIterator[NodeRegistry]:
    """The three nodes of docs/setup.md: aws-node-1, aws-node-2, gcp-node-1."""
    registry = create_local_cluster(tmp_path / "three", {"aws": 2, "gcp": 1})
    yield registry
    await registry.close()


def placement(registry: NodeRegistry, **config: int) -> NetworkAwarePlacement:
    """Placement on the registry with distribution config overrides."""
    return NetworkAwarePlacement(registry, registry.topology, DistributionConfig(**config))


def down(registry: NodeRegistry, *node_ids: str) -> None:
    """Mark nodes unhealthy."""
    for node_id in node_ids:
        registry.nodes[node_id].status = "unhealthy"


def test_three_nodes_for_rf_three_use_all_of_them(walkthrough: NodeRegistry) -> None:
    p = placement(walkthrough)
    for chunk_id in chunk_ids(50):
        assert sorted(p.select_target_nodes(chunk_id, "aws-node-1")) == \
            ["aws-node-1", "aws-node-2", "gcp-node-1"]


def test_two_healthy_of_three_gives_two_targets_across_both_clouds(
        walkthrough: NodeRegistry) -> None:
    down(walkthrough, "aws-node-2")
    p = placement(walkthrough)
    for chunk_id in chunk_ids(50):
        assert sorted(p.select_target_nodes(chunk_id, "aws-node-1")) == \
            ["aws-node-1", "gcp-node-1"]


def test_the_survivors_keep_their_replicas(walkthrough: NodeRegistry) -> None:
    """Rendezvous stability holds below RF too: a lost node only takes its own replica."""
    p = placement(walkthrough, replication_factor=2)
    ids = chunk_ids(200, seed=4)
    before = {c: p.select_target_nodes(c, "aws-node-1") for c in ids}
    down(walkthrough, "gcp-node-1")
    for c in ids:
        after = p.select_target_nodes(c, "aws-node-1")
        assert set(before[c]) - {"gcp-node-1"} <= set(after)


def test_one_cloud_left_relaxes_min_clouds_and_spreads_over_what_is_up(
        walkthrough: NodeRegistry) -> None:
    down(walkthrough, "gcp-node-1")
    selected = placement(walkthrough).select_target_nodes("c", "aws-node-1")
    assert sorted(selected) == ["aws-node-1", "aws-node-2"]
    assert {cloud_of(n) for n in selected} == {"aws"}


def test_spreading_is_still_preferred_when_it_can_be_met(walkthrough: NodeRegistry) -> None:
    # RF 2 on 2 aws + 1 gcp: one replica in each cloud, never both in aws.
    p = placement(walkthrough, replication_factor=2)
    for chunk_id in chunk_ids(100):
        assert {cloud_of(n) for n in p.select_target_nodes(chunk_id, "aws-node-1")} == \
            {"aws", "gcp"}


def test_below_write_quorum_raises_with_numbers(walkthrough: NodeRegistry) -> None:
    down(walkthrough, "aws-node-2", "gcp-node-1")
    with pytest.raises(InsufficientNodes, match=r"needs 2 healthy nodes.*only 1 available "
                                                r"\(aws-node-1\); start more nodes"):
        placement(walkthrough).select_target_nodes("c", "aws-node-1")
    # A write quorum of one takes what there is.
    assert placement(walkthrough, write_quorum=1).select_target_nodes("c", "aws-node-1") == \
        ["aws-node-1"]


def test_at_least_overrides_write_quorum(walkthrough: NodeRegistry) -> None:
    down(walkthrough, "aws-node-2")
    with pytest.raises(InsufficientNodes, match=r"needs 3 healthy nodes"):
        placement(walkthrough).select_target_nodes("c", "aws-node-1", at_least=3)
    assert placement(walkthrough).select_target_nodes("c", "aws-node-1", 1) == ["aws-node-1"]


def test_force_cross_cloud_is_never_relaxed(walkthrough: NodeRegistry) -> None:
    down(walkthrough, "gcp-node-1")
    with pytest.raises(InsufficientNodes, match=r"force_cross_cloud"):
        placement(walkthrough).select_target_nodes("c", "aws-node-1", force_cross_cloud=True)


def test_replacement_is_none_when_every_healthy_node_is_a_target(
        walkthrough: NodeRegistry) -> None:
    p = placement(walkthrough)
    assert p.replacement("c", "aws-node-1", ["aws-node-1", "gcp-node-1"], ["aws-node-2"]) \
        is None
    # A node that joins (here: comes back) is a replacement at once.
    down(walkthrough, "gcp-node-1")
    assert p.replacement("c", "aws-node-1", ["aws-node-1"], ["aws-node-2"]) is None
    walkthrough.nodes["gcp-node-1"].status = "healthy"
    assert p.replacement("c", "aws-node-1", ["aws-node-1"], ["aws-node-2"]) == "gcp-node-1"


def test_policy_check_runs_at_quorum_and_fails_below_it(
        walkthrough: NodeRegistry, caplog: pytest.LogCaptureFixture) -> None:
    config = DistributionConfig()
    check_policy(walkthrough, config)
    down(walkthrough, "gcp-node-1")
    with caplog.at_level(logging.WARNING, logger="multicloud.pipeline.placement"):
        check_policy(walkthrough, config)  # 2 nodes in 1 cloud: warned, not refused
    assert "only 2 healthy node(s) for replication_factor 3" in caplog.text
    assert "min_clouds is 2" in caplog.text
    with pytest.raises(InsufficientNodes, match=r"force_cross_cloud but healthy nodes span "
                                                r"1 cloud\(s\) \(aws\)"):
        check_policy(walkthrough, config, force_cross_cloud=True)
    down(walkthrough, "aws-node-2")
    with pytest.raises(InsufficientNodes) as err:
        check_policy(walkthrough, config)
    for needle in ("replication_factor is 3", "write_quorum 2", "only 1 healthy node(s)",
                   "(aws-node-1)", "start more nodes or lower write_quorum"):
        assert needle in str(err.value)

"""Tests for network-aware placement: cloud spread, rendezvous stability, health and capacity."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from multicloud import (
    ClusterError,
    DistributionConfig,
    InsufficientNodes,
    NetworkAwarePlacement,
    NodeRegistry,
    create_local_cluster,
)
from multicloud.pipeline.placement import rank_nodes, rendezvous_score

AWS = ["aws-node-1", "aws-node-2", "aws-node-3"]
GCP = ["gcp-node-1", "gcp-node-2", "gcp-node-3"]


def chunk_ids(count: int, seed: int = 0) -> list[str]:
    """Deterministic random-looking chunk ids (64 hex characters)."""
    rng = random.Random(seed)
    return [f"{rng.getrandbits(256):064x}" for _ in range(count)]


def placement(registry: NodeRegistry, **config: int) -> NetworkAwarePlacement:
    """Placement on the registry with distribution config overrides."""
    return NetworkAwarePlacement(registry, registry.topology, DistributionConfig(**config))


def cloud_of(node_id: str) -> str:
    """The cloud of a test-cluster node id."""
    return node_id.split("-", 1)[0]


@pytest.fixture
async def three_clouds(tmp_path: Path) -> AsyncIterator[NodeRegistry]:
    """A cluster with 3 nodes in each of aws, gcp and azure."""
    registry = create_local_cluster(tmp_path / "three", {"aws": 3, "gcp": 3, "azure": 3})
    yield registry
    await registry.close()


# -- the user's test ------------------------------------------------------------------


def test_network_aware_placement_prefers_same_cloud(node_registry: NodeRegistry) -> None:
    """Test placement algorithm (from the request)."""
    placement = NetworkAwarePlacement(node_registry, node_registry.topology, DistributionConfig())

    selected = placement.select_target_nodes(
        chunk_id="test",
        source_node="aws-node-1",
        num_replicas=3,
    )

    # Should prefer AWS nodes when source is AWS
    aws_count = sum(1 for node in selected if "aws" in node)
    assert aws_count >= 2


# -- spread, uniqueness, health -------------------------------------------------------


@pytest.mark.parametrize("source", ["aws-node-1", "gcp-node-2"])
def test_replicas_span_min_clouds_and_prefer_source(node_registry: NodeRegistry,
                                                    source: str) -> None:
    p = placement(node_registry)
    src_cloud = cloud_of(source)
    for chunk_id in chunk_ids(200):
        selected = p.select_target_nodes(chunk_id, source)
        clouds = Counter(cloud_of(n) for n in selected)
        assert len(selected) == 3
        assert len(set(selected)) == 3
        assert len(clouds) >= 2
        assert clouds[src_cloud] == 2


def test_default_replica_count_is_replication_factor(node_registry: NodeRegistry) -> None:
    assert len(placement(node_registry).select_target_nodes("c", "aws-node-1")) == 3
    assert len(placement(node_registry, replication_factor=4).select_target_nodes(
        "c", "aws-node-1")) == 4


def test_three_min_clouds_uses_three_clouds(three_clouds: NodeRegistry) -> None:
    p = placement(three_clouds, min_clouds=3)
    for chunk_id in chunk_ids(50):
        selected = p.select_target_nodes(chunk_id, "aws-node-1")
        assert {cloud_of(n) for n in selected} == {"aws", "gcp", "azure"}


def test_only_healthy_nodes_are_chosen(node_registry: NodeRegistry) -> None:
    node_registry.nodes["aws-node-2"].status = "unhealthy"
    p = placement(node_registry)
    for chunk_id in chunk_ids(300):
        selected = p.select_target_nodes(chunk_id, "aws-node-1")
        assert "aws-node-2" not in selected
        assert len(set(selected)) == 3


def test_excluded_nodes_are_not_chosen(node_registry: NodeRegistry) -> None:
    p = placement(node_registry)
    for chunk_id in chunk_ids(100):
        selected = p.select_target_nodes(chunk_id, "aws-node-1",
                                         exclude={"aws-node-3", "gcp-node-1"})
        assert not {"aws-node-3", "gcp-node-1"} & set(selected)


# -- determinism and rendezvous stability ---------------------------------------------


async def test_same_chunk_same_nodes_on_a_fresh_registry(node_registry: NodeRegistry,
                                                         tmp_path: Path) -> None:
    fresh = create_local_cluster(tmp_path / "fresh", {"aws": 3, "gcp": 3})
    try:
        first, second = placement(node_registry), placement(fresh)
        for chunk_id in chunk_ids(100):
            assert first.select_target_nodes(chunk_id, "aws-node-1") == \
                second.select_target_nodes(chunk_id, "aws-node-1")
            # and again on the same placement object
            assert first.select_target_nodes(chunk_id, "aws-node-1") == \
                first.select_target_nodes(chunk_id, "aws-node-1")
    finally:
        await fresh.close()


@pytest.mark.parametrize("removed", ["aws-node-2", "gcp-node-3"])
def test_removing_a_node_moves_only_its_chunks(node_registry: NodeRegistry,
                                               removed: str) -> None:
    p = placement(node_registry)
    ids = chunk_ids(500, seed=7)
    before = {c: p.select_target_nodes(c, "aws-node-1") for c in ids}
    node_registry.nodes[removed].status = "unhealthy"
    after = {c: p.select_target_nodes(c, "aws-node-1") for c in ids}

    held = [c for c in ids if removed in before[c]]
    assert held, "the removed node held nothing: the test proves nothing"
    for c in ids:
        if removed in before[c]:
            assert removed not in after[c]
            # the survivors keep their replicas; only the removed one is replaced
            assert set(before[c]) - {removed} <= set(after[c])
        else:
            assert after[c] == before[c]


def test_rank_nodes_is_a_stable_total_order(node_registry: NodeRegistry) -> None:
    nodes = list(node_registry.nodes.values())
    ranked = rank_nodes("abc", nodes)
    assert sorted(n.id for n in ranked) == sorted(node_registry.nodes)
    assert rank_nodes("abc", reversed(nodes)) == ranked
    scores = [rendezvous_score("abc", n) for n in ranked]
    assert scores == sorted(scores, reverse=True)
    assert all(s > 0 for s in scores)


def test_load_is_balanced_across_nodes(node_registry: NodeRegistry) -> None:
    p = placement(node_registry)
    n = 3000
    counts = Counter(node for c in chunk_ids(n, seed=3)
                     for node in p.select_target_nodes(c, "aws-node-1"))
    # Each chunk puts 2 replicas on the 3 aws nodes and 1 on the 3 gcp nodes.
    for node in AWS:
        assert abs(counts[node] - n * 2 / 3) < n * 0.06, counts
    for node in GCP:
        assert abs(counts[node] - n / 3) < n * 0.06, counts


def test_bigger_nodes_get_a_bigger_share(node_registry: NodeRegistry) -> None:
    node_registry.nodes["gcp-node-1"].capacity_bytes *= 2
    p = placement(node_registry)
    n = 3000
    counts = Counter(node for c in chunk_ids(n, seed=5)
                     for node in p.select_target_nodes(c, "aws-node-1") if node in GCP)
    # Weighted rendezvous: the first gcp replica goes to gcp-node-1 with odds 2/4.
    assert abs(counts["gcp-node-1"] - n / 2) < n * 0.06, counts
    assert counts["gcp-node-1"] > 1.5 * max(counts["gcp-node-2"], counts["gcp-node-3"])


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chunk_id=st.text(min_size=1, max_size=80),
       source=st.sampled_from([*AWS, *GCP, "aws", "gcp", "azure"]))
def test_placement_properties(node_registry: NodeRegistry, chunk_id: str, source: str) -> None:
    selected = placement(node_registry).select_target_nodes(chunk_id, source)
    assert len(selected) == 3
    assert len(set(selected)) == 3
    assert set(selected) <= set(node_registry.nodes)
    assert len({cloud_of(n) for n in selected}) >= 2


# -- policy knobs ---------------------------------------------------------------------


def test_force_cross_cloud_overrides_min_clouds_one(node_registry: NodeRegistry) -> None:
    p = placement(node_registry, min_clouds=1)
    for chunk_id in chunk_ids(100):
        selected = p.select_target_nodes(chunk_id, "aws-node-1", force_cross_cloud=True)
        assert any(cloud_of(n) != "aws" for n in selected)
        assert sum(cloud_of(n) == "aws" for n in selected) == 2


def test_min_clouds_one_keeps_replicas_in_source_cloud(node_registry: NodeRegistry) -> None:
    p = placement(node_registry, min_clouds=1)
    for chunk_id in chunk_ids(100):
        assert sorted(p.select_target_nodes(chunk_id, "gcp-node-1")) == GCP


def test_min_clouds_one_spills_when_source_cloud_is_short(node_registry: NodeRegistry) -> None:
    node_registry.nodes["aws-node-3"].status = "unhealthy"
    selected = placement(node_registry, min_clouds=1).select_target_nodes("c", "aws-node-1")
    assert sorted(n for n in selected if cloud_of(n) == "aws") == ["aws-node-1", "aws-node-2"]
    assert sum(cloud_of(n) == "gcp" for n in selected) == 1


def test_source_cloud_without_healthy_nodes_still_places(three_clouds: NodeRegistry) -> None:
    for node in AWS:
        three_clouds.nodes[node].status = "unhealthy"
    p = placement(three_clouds)
    for chunk_id in chunk_ids(50):
        selected = p.select_target_nodes(chunk_id, "aws-node-1")
        clouds = {cloud_of(n) for n in selected}
        assert len(selected) == 3
        assert "aws" not in clouds
        assert clouds == {"azure", "gcp"}


def test_source_cloud_down_with_min_clouds_one(node_registry: NodeRegistry) -> None:
    for node in AWS:
        node_registry.nodes[node].status = "unhealthy"
    selected = placement(node_registry, min_clouds=1).select_target_nodes("c", "aws-node-1")
    assert sorted(selected) == GCP


def test_too_few_nodes_raises_with_numbers(node_registry: NodeRegistry) -> None:
    # Fewer nodes than asked for is not an error down to write_quorum (quorum writes).
    assert len(placement(node_registry).select_target_nodes("c", "aws-node-1", 7)) == 6
    with pytest.raises(InsufficientNodes, match=r"needs 7 healthy nodes.*only 6 available"):
        placement(node_registry).select_target_nodes("c", "aws-node-1", 7, at_least=7)
    for node in ["aws-node-1", "aws-node-2", "gcp-node-1", "gcp-node-2", "gcp-node-3"]:
        node_registry.nodes[node].status = "unhealthy"
    with pytest.raises(InsufficientNodes,
                       match=r"needs 2 healthy nodes.*write_quorum 2 of replication_factor 3.*"
                             r"only 1 available") as err:
        placement(node_registry).select_target_nodes("c", "aws-node-1")
    assert "aws-node-3" in str(err.value)
    assert "lower write_quorum" in str(err.value)


def test_too_few_clouds_relaxes_min_clouds_but_not_force(node_registry: NodeRegistry) -> None:
    for node in GCP:
        node_registry.nodes[node].status = "unhealthy"
    # min_clouds is relaxed to the clouds that are up rather than stopping the batch...
    assert sorted(placement(node_registry).select_target_nodes("c", "aws-node-1")) == AWS
    # ...but force_cross_cloud is what the batch asked for in so many words.
    with pytest.raises(InsufficientNodes, match=r"replicas in 2 clouds.*span 1 \(aws\)"):
        placement(node_registry).select_target_nodes("c", "aws-node-1", force_cross_cloud=True)
    with pytest.raises(InsufficientNodes, match=r"replicas in 2 clouds"):
        placement(node_registry, min_clouds=1).select_target_nodes(
            "c", "aws-node-1", force_cross_cloud=True)
    # min_clouds=1 is satisfiable by aws alone
    assert sorted(placement(node_registry, min_clouds=1).select_target_nodes(
        "c", "aws-node-1")) == AWS


# -- replacement ----------------------------------------------------------------------


def test_replacement_of_the_only_gcp_target_is_gcp(node_registry: NodeRegistry) -> None:
    p = placement(node_registry)
    for chunk_id in chunk_ids(100):
        targets = p.select_target_nodes(chunk_id, "aws-node-1")
        (gcp_target,) = [n for n in targets if cloud_of(n) == "gcp"]
        current = [n for n in targets if n != gcp_target]
        new = p.replacement(chunk_id, "aws-node-1", current, [gcp_target])
        assert new is not None
        assert cloud_of(new) == "gcp"
        assert new != gcp_target
        assert new not in current


def test_replacement_of_an_aws_target_is_a_new_node(node_registry: NodeRegistry) -> None:
    p = placement(node_registry)
    for chunk_id in chunk_ids(100):
        targets = p.select_target_nodes(chunk_id, "aws-node-1")
        failed = next(n for n in targets if cloud_of(n) == "aws")
        current = [n for n in targets if n != failed]
        new = p.replacement(chunk_id, "aws-node-1", current, [failed])
        assert new is not None
        assert new not in targets
        assert len({cloud_of(n) for n in [*current, new]}) >= 2


def test_replacement_skips_unhealthy_nodes(node_registry: NodeRegistry) -> None:
    p = placement(node_registry)
    targets = p.select_target_nodes("c", "aws-node-1")
    (gcp_target,) = [n for n in targets if cloud_of(n) == "gcp"]
    others = [n for n in GCP if n != gcp_target]
    node_registry.nodes[others[0]].status = "unhealthy"
    current = [n for n in targets if n != gcp_target]
    assert p.replacement("c", "aws-node-1", current, [gcp_target]) == others[1]


def test_a_forced_cross_cloud_replica_is_not_replaced_inside_the_source_cloud(
        node_registry: NodeRegistry) -> None:
    """The only gcp target failed and gcp is down: no aws node may stand in for it."""
    p = placement(node_registry)
    targets = p.select_target_nodes("c", "aws-node-1", force_cross_cloud=True)
    (gcp_target,) = [n for n in targets if cloud_of(n) == "gcp"]
    for node in GCP:
        node_registry.nodes[node].status = "unhealthy"
    current = [n for n in targets if n != gcp_target]
    assert p.replacement("c", "aws-node-1", current, [gcp_target],
                         force_cross_cloud=True) is None
    # Without the force, an aws node keeps the write going (the spread is hinted).
    assert cloud_of(p.replacement("c", "aws-node-1", current, [gcp_target]) or "") == "aws"


def test_replacement_none_when_no_node_is_left(node_registry: NodeRegistry) -> None:
    p = placement(node_registry)
    current = ["aws-node-1", "gcp-node-1"]
    failed = [n for n in [*AWS, *GCP] if n not in current]
    assert p.replacement("c", "aws-node-1", current, failed) is None


# -- sources --------------------------------------------------------------------------


def test_cloud_name_as_source(node_registry: NodeRegistry) -> None:
    p = placement(node_registry)
    for chunk_id in chunk_ids(50):
        assert p.select_target_nodes(chunk_id, "aws") == \
            p.select_target_nodes(chunk_id, "aws-node-2")
        from_gcp = p.select_target_nodes(chunk_id, "gcp")
        assert sum(cloud_of(n) == "gcp" for n in from_gcp) == 2
    # a cloud the config knows but that has no nodes (azure) is a valid source too
    assert len(p.select_target_nodes("c", "azure")) == 3
    assert p.source_cloud_of("gcp-node-3") == "gcp"
    assert p.source_cloud_of("azure") == "azure"


def test_unknown_source_raises_cluster_error(node_registry: NodeRegistry) -> None:
    with pytest.raises(ClusterError, match=r"unknown source 'oracle-node-1'.*aws-node-1"):
        placement(node_registry).select_target_nodes("c", "oracle-node-1")


def test_config_may_be_a_dict(node_registry: NodeRegistry) -> None:
    p = NetworkAwarePlacement(node_registry, config={"min_clouds": 1})
    assert p.config.min_clouds == 1
    assert p.topology is node_registry.topology
    assert sorted(p.select_target_nodes("c", "aws-node-1")) == AWS


# -- capacity -------------------------------------------------------------------------


@pytest.fixture
def nearly_full(node_registry: NodeRegistry) -> NodeRegistry:
    """aws-node-1 with only 1 KiB free."""
    node = node_registry.nodes["aws-node-1"]
    node.used_bytes = node.capacity_bytes - 1024
    return node_registry


def test_full_node_is_skipped_for_a_big_chunk(nearly_full: NodeRegistry) -> None:
    p = placement(nearly_full)
    for chunk_id in chunk_ids(200):
        selected = p.select_target_nodes(chunk_id, "aws-node-1", size_bytes=1024 * 1024)
        assert "aws-node-1" not in selected
        assert sum(cloud_of(n) == "aws" for n in selected) == 2


def test_full_node_still_takes_a_chunk_that_fits(nearly_full: NodeRegistry) -> None:
    p = placement(nearly_full)
    chosen = [p.select_target_nodes(c, "aws-node-1", size_bytes=1024) for c in chunk_ids(50)]
    assert any("aws-node-1" in s for s in chosen)


def test_capacity_does_not_move_chunks_that_fit(nearly_full: NodeRegistry) -> None:
    # Weights are static capacities, so filling a node does not reshuffle other chunks.
    p = placement(nearly_full)
    for chunk_id in chunk_ids(100):
        assert p.select_target_nodes(chunk_id, "aws-node-1", size_bytes=10) == \
            p.select_target_nodes(chunk_id, "aws-node-1")

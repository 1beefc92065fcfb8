"""Placement and the registry at cluster scale: the same decisions, without per-chunk sorts.

A decision hashes the chunk id with every candidate (rendezvous hashing cannot avoid that)
but must not sort the whole cluster, and the registry must not re-sort its nodes each
time placement asks for the healthy ones. These tests count sorts instead of timing them,
and check every faster path against the plain definition it replaced.
"""

from __future__ import annotations

import builtins
import random
from collections.abc import Callable, Iterable
from typing import Any

import pytest

from multicloud import DistributionConfig, InsufficientNodes, NetworkAwarePlacement
from multicloud.control import registry as registry_module
from multicloud.control.registry import NodeRegistry, WorkerNode
from multicloud.core.config import CloudPricing, ClusterConfig, NodeSpec
from multicloud.pipeline import placement as placement_module
from multicloud.pipeline.placement import (
    best_by_cloud,
    rank_nodes,
    rendezvous_score,
    rendezvous_scores,
)

REGIONS = {"aws": ["us-east-1", "us-west-2"], "gcp": ["us-central1"],
           "azure": ["eastus"], "oci": ["us-ashburn-1"]}


def chunk_ids(count: int, seed: int = 0) -> list[str]:
    """Deterministic random-looking chunk ids (64 hex characters)."""
    rng = random.Random(seed)
    return [f"{rng.getrandbits(256):064x}" for _ in range(count)]


def big_registry(per_cloud: dict[str, int], seed: int = 0) -> NodeRegistry:
    """Nodes in four clouds with random capacities (so weights matter), added in random
    order (so id order is the registry's doing)."""
    rng = random.Random(seed)
    config = ClusterConfig(nodes_per_cloud={}, regions=REGIONS, clouds={
        **ClusterConfig().clouds,
        "oci": CloudPricing(internet_usd_per_gb=0.0085, inter_region_usd_per_gb=0.0085)})
    specs = [NodeSpec(id=f"{cloud}-node-{i}", cloud=cloud,
                      region=REGIONS[cloud][i % len(REGIONS[cloud])],
                      capacity_gb=rng.choice((0.5, 1.0, 2.0, 3.5)))
             for cloud, count in per_cloud.items() for i in range(1, count + 1)]
    rng.shuffle(specs)
    return NodeRegistry(config, [WorkerNode(spec) for spec in specs])


def full_ranking_by_cloud(chunk_id: str, nodes: Iterable[WorkerNode],
                          per_cloud: int) -> dict[str, list[WorkerNode]]:
    """What placement did before: rank every node, then group the ranking by cloud."""
    by_cloud: dict[str, list[WorkerNode]] = {}
    for node in sorted(nodes, key=lambda n: (-rendezvous_score(chunk_id, n), n.id)):
        by_cloud.setdefault(node.cloud, []).append(node)
    return by_cloud


class SortCounter:
    """A stand-in for the builtin `sorted` that records how many items each call sorts."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def __call__(self, iterable: Iterable[Any], **kwargs: Any) -> list[Any]:
        items = list(iterable)
        self.sizes.append(len(items))
        return builtins.sorted(items, **kwargs)


def test_rendezvous_scores_are_the_scores_bit_for_bit() -> None:
    registry = big_registry({"aws": 30, "gcp": 20, "azure": 20, "oci": 10})
    nodes = list(registry.nodes.values())
    for chunk_id in [*chunk_ids(50), "", "test", "ünïcode/chunk"]:
        assert rendezvous_scores(chunk_id, nodes) == [rendezvous_score(chunk_id, n)
                                                      for n in nodes]
    assert rendezvous_scores("x", []) == []


def test_rank_nodes_is_the_full_sort_by_score_then_id() -> None:
    registry = big_registry({"aws": 25, "gcp": 25, "azure": 5, "oci": 1})
    nodes = list(registry.nodes.values())
    for chunk_id in chunk_ids(30):
        expected = sorted(nodes, key=lambda n: (-rendezvous_score(chunk_id, n), n.id))
        assert rank_nodes(chunk_id, iter(nodes)) == expected


@pytest.mark.parametrize("per_cloud", [1, 2, 3, 5, 100])
def test_best_by_cloud_is_the_head_of_each_clouds_ranking(per_cloud: int) -> None:
    registry = big_registry({"aws": 40, "gcp": 3, "azure": 1, "oci": 12}, seed=per_cloud)
    nodes = registry.healthy_nodes()
    for chunk_id in chunk_ids(40, seed=per_cloud):
        full = full_ranking_by_cloud(chunk_id, nodes, per_cloud)
        best = best_by_cloud(chunk_id, nodes, per_cloud)
        assert best == {cloud: ranked[:per_cloud] for cloud, ranked in full.items()}


def test_decisions_are_those_of_the_full_ranking(monkeypatch: pytest.MonkeyPatch) -> None:
    """select_target_nodes and replacement choose exactly what ranking every node chose,
    across factors, spreads, exclusions, full disks and unhealthy nodes."""
    registry = big_registry({"aws": 12, "gcp": 5, "azure": 2, "oci": 1}, seed=7)
    rng = random.Random(7)
    ids = sorted(registry.nodes)
    for node_id in rng.sample(ids, 3):
        registry.nodes[node_id].status = "unhealthy"
    registry.nodes[rng.choice(ids)].full = True
    cases: list[tuple[Any, ...]] = []
    for chunk_id in chunk_ids(150, seed=7):
        rf = rng.randint(1, 5)
        config = DistributionConfig(replication_factor=rf, write_quorum=rng.randint(1, rf),
                                    min_clouds=rng.randint(1, min(rf, 3)))
        source = rng.choice([*ids, "aws", "oci"])
        exclude = set(rng.sample(ids, rng.randint(0, 4)))
        cases.append((config, chunk_id, source, rng.randint(1, 6), rng.random() < 0.3,
                      exclude, rng.choice((0, 2**29, 2**31))))

    def decide() -> list[Any]:
        outcomes: list[Any] = []
        for config, chunk_id, source, wanted, force, exclude, size in cases:
            placement = NetworkAwarePlacement(registry, None, config)
            try:
                targets = placement.select_target_nodes(
                    chunk_id, source, wanted, at_least=1, force_cross_cloud=force,
                    exclude=exclude, size_bytes=size)
            except InsufficientNodes as exc:
                outcomes.append(str(exc))
                continue
            outcomes.append(targets)
            if source in registry.nodes:
                outcomes.append(placement.replacement(chunk_id, source, targets, targets[:1],
                                                      force_cross_cloud=force, size_bytes=size))
        return outcomes

    fast = decide()
    monkeypatch.setattr(placement_module, "best_by_cloud", full_ranking_by_cloud)
    assert decide() == fast
    assert any(isinstance(o, list) and len(o) > 1 for o in fast)


def test_a_decision_sorts_no_list_the_size_of_the_cluster(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Ranking every candidate per chunk is O(nodes log nodes); the heads of each cloud's
    ranking are all a decision can use, found with a heap of the few wanted."""
    registry = big_registry({"aws": 60, "gcp": 60, "azure": 60, "oci": 60})
    placement = NetworkAwarePlacement(registry, None, DistributionConfig())
    registry.healthy_nodes()  # the registry's id order, made once, is not the decision's
    counter = SortCounter()
    monkeypatch.setattr(placement_module, "sorted", counter, raising=False)
    monkeypatch.setattr(registry_module, "sorted", counter, raising=False)
    for chunk_id in chunk_ids(20):
        assert len(placement.select_target_nodes(chunk_id, "aws-node-1")) == 3
    assert all(size <= 3 for size in counter.sizes), counter.sizes


def test_healthy_nodes_sorts_the_cluster_once_per_membership_change(
        monkeypatch: pytest.MonkeyPatch) -> None:
    registry = big_registry({"aws": 10, "gcp": 10, "azure": 0, "oci": 0})
    counter = SortCounter()
    monkeypatch.setattr(registry_module, "sorted", counter, raising=False)
    for _ in range(50):
        assert len(registry.healthy_nodes()) == 20
    assert counter.sizes == [20]
    registry.add(WorkerNode(NodeSpec(id="aaa-first", cloud="aws", region="us-east-1")))
    for _ in range(50):
        assert registry.healthy_nodes()[0].id == "aaa-first"
    assert counter.sizes == [20, 21]


def test_healthy_nodes_follows_health_and_membership() -> None:
    """The id order is kept between calls; health is read fresh on every call."""
    registry = big_registry({"aws": 4, "gcp": 3, "azure": 0, "oci": 0})

    def ids(select: Callable[[], list[WorkerNode]]) -> list[str]:
        return [n.id for n in select()]

    everyone = sorted(registry.nodes)
    assert ids(registry.healthy_nodes) == everyone
    registry.nodes["aws-node-2"].status = "unhealthy"
    assert ids(registry.healthy_nodes) == [i for i in everyone if i != "aws-node-2"]
    assert ids(lambda: registry.healthy_nodes("gcp")) == ["gcp-node-1", "gcp-node-2",
                                                          "gcp-node-3"]
    registry.nodes["aws-node-2"].status = "healthy"
    registry.add(WorkerNode(NodeSpec(id="aws-node-0", cloud="aws", region="us-east-1")))
    assert ids(registry.healthy_nodes)[0] == "aws-node-0"
    # A node put straight into the mapping is seen too (add() is the way, but this is
    # what a caller could do).
    late = WorkerNode(NodeSpec(id="zz-node", cloud="gcp", region="us-central1"))
    registry.nodes[late.id] = late
    assert ids(registry.healthy_nodes)[-1] == "zz-node"
    assert registry.clouds() == ["aws", "gcp"]

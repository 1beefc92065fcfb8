"""Tests for the emulated network: link kinds, speeds, egress prices, overrides, the ledger."""

from __future__ import annotations

import threading

import pytest

from multicloud.core.config import ClusterConfig, LinkOverride
from multicloud.core.network import (
    GB,
    Location,
    NetworkTopology,
    TrafficLedger,
)

EAST = Location("aws", "us-east-1")
WEST = Location("aws", "us-west-2")
CENTRAL = Location("gcp", "us-central1")
GCP_EAST = Location("gcp", "us-east1")
AZURE = Location("azure", "eastus")


def topology(**overrides: object) -> NetworkTopology:
    """The default topology with cluster config fields replaced."""
    return NetworkTopology(ClusterConfig.model_validate({**ClusterConfig().model_dump(),
                                                         **overrides}))


@pytest.fixture
def topo() -> NetworkTopology:
    """The shipped default topology."""
    return NetworkTopology.default()


def test_location_and_link_names(topo: NetworkTopology) -> None:
    assert str(EAST) == "aws/us-east-1"
    link = topo.link(EAST, CENTRAL)
    assert link.name == "aws/us-east-1->gcp/us-central1"
    assert link.cross_cloud
    assert not topo.link(EAST, WEST).cross_cloud


@pytest.mark.parametrize(("src", "dst", "kind", "latency_s", "bandwidth_bps"), [
    (EAST, EAST, "same_region", 0.001, 10_000e6 / 8),
    (EAST, WEST, "cross_region", 0.035, 5_000e6 / 8),
    (EAST, CENTRAL, "cross_cloud", 0.045, 2_000e6 / 8),
    (CENTRAL, EAST, "cross_cloud", 0.045, 2_000e6 / 8),
    (CENTRAL, GCP_EAST, "cross_region", 0.035, 5_000e6 / 8),
])
def test_link_kinds_and_profiles(topo: NetworkTopology, src: Location, dst: Location,
                                 kind: str, latency_s: float, bandwidth_bps: float) -> None:
    link = topo.link(src, dst)
    assert link.kind == kind
    assert link.latency_s == pytest.approx(latency_s)
    assert link.bandwidth_bps == pytest.approx(bandwidth_bps)


@pytest.mark.parametrize(("src", "dst", "price"), [
    (EAST, EAST, 0.01),        # aws intra-region (cross-AZ)
    (EAST, WEST, 0.02),        # aws inter-region
    (EAST, CENTRAL, 0.09),     # aws internet egress
    (CENTRAL, EAST, 0.12),     # gcp premium tier: priced by the sender, gcp
    (CENTRAL, CENTRAL, 0.0),   # gcp intra-region
    (CENTRAL, GCP_EAST, 0.02),
    (AZURE, EAST, 0.087),
])
def test_egress_is_priced_by_the_sending_cloud(topo: NetworkTopology, src: Location,
                                               dst: Location, price: float) -> None:
    link = topo.link(src, dst)
    assert link.egress_usd_per_gb == pytest.approx(price)
    assert link.cost_usd(GB) == pytest.approx(price)
    assert link.cost_usd(3 * GB // 2) == pytest.approx(1.5 * price)


def test_prices_come_from_the_cluster_config() -> None:
    topo = topology(clouds={
        "aws": {"internet_usd_per_gb": 0.5, "inter_region_usd_per_gb": 0.25},
        "gcp": {"internet_usd_per_gb": 0.7, "inter_region_usd_per_gb": 0.3,
                "intra_region_usd_per_gb": 0.1},
    })
    assert topo.link(EAST, CENTRAL).egress_usd_per_gb == 0.5
    assert topo.link(CENTRAL, EAST).egress_usd_per_gb == 0.7
    assert topo.link(EAST, WEST).egress_usd_per_gb == 0.25
    assert topo.link(EAST, EAST).egress_usd_per_gb == 0.0  # intra-region default
    assert topo.link(CENTRAL, CENTRAL).egress_usd_per_gb == 0.1
    # A cloud without pricing (none of its nodes are configured) sends for free.
    assert topo.link(AZURE, EAST).egress_usd_per_gb == 0.0


def test_transfer_seconds_is_latency_plus_size_over_bandwidth(topo: NetworkTopology) -> None:
    cross = topo.link(EAST, CENTRAL)  # 45 ms, 2000 Mbit/s = 250 MB/s
    assert cross.transfer_seconds(0) == pytest.approx(0.045)
    assert cross.transfer_seconds(250_000_000) == pytest.approx(1.045)
    same = topo.link(EAST, EAST)  # 1 ms, 1250 MB/s
    assert same.transfer_seconds(125_000_000) == pytest.approx(0.101)
    assert same.transfer_seconds(100 * 2**20) < cross.transfer_seconds(100 * 2**20)


def test_links_are_cached_and_directed(topo: NetworkTopology) -> None:
    assert topo.link(EAST, CENTRAL) is topo.link(EAST, CENTRAL)
    assert topo.link(EAST, CENTRAL) != topo.link(CENTRAL, EAST)


def test_link_profiles_come_from_config() -> None:
    topo = topology(links={
        "same_region": {"latency_ms": 2, "bandwidth_mbps": 800},
        "cross_region": {"latency_ms": 20, "bandwidth_mbps": 400},
        "cross_cloud": {"latency_ms": 100, "bandwidth_mbps": 80},
    })
    link = topo.link(EAST, CENTRAL)
    assert link.latency_s == pytest.approx(0.1)
    assert link.bandwidth_bps == pytest.approx(10e6)
    assert topo.link(EAST, EAST).bandwidth_bps == pytest.approx(100e6)


def test_link_override_by_cloud_is_directed() -> None:
    topo = topology(link_overrides=[
        LinkOverride(src="aws", dst="gcp", latency_ms=80, bandwidth_mbps=500),
    ])
    for src in (EAST, WEST):
        for dst in (CENTRAL, GCP_EAST):
            link = topo.link(src, dst)
            assert link.latency_s == pytest.approx(0.08)
            assert link.bandwidth_bps == pytest.approx(500e6 / 8)
            assert link.egress_usd_per_gb == pytest.approx(0.09)  # not overridden
    back = topo.link(CENTRAL, EAST)
    assert back.latency_s == pytest.approx(0.045)
    assert back.bandwidth_bps == pytest.approx(2000e6 / 8)


def test_link_override_by_cloud_and_region() -> None:
    topo = topology(link_overrides=[
        {"src": "aws/us-east-1", "dst": "gcp", "egress_usd_per_gb": 0.05},
        {"src": "gcp/us-east1", "dst": "aws/us-west-2", "latency_ms": 5},
    ])
    assert topo.link(EAST, CENTRAL).egress_usd_per_gb == pytest.approx(0.05)
    assert topo.link(EAST, GCP_EAST).egress_usd_per_gb == pytest.approx(0.05)
    assert topo.link(WEST, CENTRAL).egress_usd_per_gb == pytest.approx(0.09)
    assert topo.link(EAST, CENTRAL).latency_s == pytest.approx(0.045)  # price only
    assert topo.link(GCP_EAST, WEST).latency_s == pytest.approx(0.005)
    assert topo.link(GCP_EAST, EAST).latency_s == pytest.approx(0.045)
    assert topo.link(CENTRAL, WEST).latency_s == pytest.approx(0.045)


def test_later_override_wins() -> None:
    topo = topology(link_overrides=[
        {"src": "aws", "dst": "gcp", "latency_ms": 80},
        {"src": "aws/us-east-1", "dst": "gcp/us-central1", "latency_ms": 10},
    ])
    assert topo.link(EAST, CENTRAL).latency_s == pytest.approx(0.01)
    assert topo.link(EAST, GCP_EAST).latency_s == pytest.approx(0.08)


def test_slow_down_affects_both_directions_between_two_clouds(topo: NetworkTopology) -> None:
    before = topo.link(EAST, CENTRAL)  # cached before the slow-down
    topo.slow_down("aws", "gcp", 4.0)
    for link in (topo.link(EAST, CENTRAL), topo.link(CENTRAL, WEST)):
        assert link.latency_s == pytest.approx(0.18)
        assert link.bandwidth_bps == pytest.approx(2000e6 / 8 / 4)
    assert topo.link(EAST, CENTRAL).egress_usd_per_gb == before.egress_usd_per_gb
    assert topo.link(EAST, CENTRAL).transfer_seconds(10**8) == \
        pytest.approx(4 * before.transfer_seconds(10**8))
    # other pairs are untouched
    assert topo.link(EAST, WEST).latency_s == pytest.approx(0.035)
    assert topo.link(AZURE, EAST).latency_s == pytest.approx(0.045)
    topo.slow_down("gcp", "aws", 1.0)
    assert topo.link(EAST, CENTRAL) == before


def test_cloud_preference_orders_by_price_then_speed(topo: NetworkTopology) -> None:
    # From aws both others cost aws's 0.09 and are equally fast: name breaks the tie.
    assert topo.cloud_preference("aws", ["aws", "gcp", "azure"]) == ["azure", "gcp"]
    assert topo.cloud_preference("gcp", ["aws", "gcp", "azure"]) == ["aws", "azure"]
    assert topo.cloud_preference("aws", ["aws"]) == []
    cheap_gcp = topology(link_overrides=[{"src": "aws", "dst": "gcp", "egress_usd_per_gb": 0.01}])
    assert cheap_gcp.cloud_preference("aws", ["azure", "gcp"]) == ["gcp", "azure"]
    fast_gcp = topology(link_overrides=[{"src": "aws", "dst": "gcp", "latency_ms": 1}])
    assert fast_gcp.cloud_preference("aws", ["azure", "gcp"]) == ["gcp", "azure"]
    topo.slow_down("aws", "azure", 10)
    assert topo.cloud_preference("aws", ["azure", "gcp"]) == ["gcp", "azure"]


def test_from_config_and_default() -> None:
    config = ClusterConfig(time_scale=0.5)
    assert NetworkTopology.from_config(config).config is config
    assert NetworkTopology.default().config == ClusterConfig()


# -- the ledger -----------------------------------------------------------------------


def test_ledger_charges_each_transfer(topo: NetworkTopology) -> None:
    ledger = TrafficLedger()
    cross = topo.link(EAST, CENTRAL)
    ledger.charge(cross, GB)
    ledger.charge(cross, GB // 2)
    ledger.charge(topo.link(EAST, EAST), 1000)
    snap = ledger.snapshot()
    assert set(snap) == {cross.name, "aws/us-east-1->aws/us-east-1"}
    traffic = snap[cross.name]
    assert traffic.transfers == 2
    assert traffic.bytes == GB + GB // 2
    assert traffic.egress_usd == pytest.approx(0.135)
    assert traffic.emulated_seconds == pytest.approx(2 * 0.045 + 1.5 * GB / 250e6)
    assert traffic.cross_cloud
    assert not snap["aws/us-east-1->aws/us-east-1"].cross_cloud


def test_ledger_snapshot_is_a_copy(topo: NetworkTopology) -> None:
    ledger = TrafficLedger()
    link = topo.link(EAST, CENTRAL)
    ledger.charge(link, 10)
    snap = ledger.snapshot()
    ledger.charge(link, 10)
    assert snap[link.name].transfers == 1
    snap[link.name].bytes = 999
    assert ledger.snapshot()[link.name].bytes == 20


def test_ledger_difference(topo: NetworkTopology) -> None:
    ledger = TrafficLedger()
    cross, same, idle = topo.link(EAST, CENTRAL), topo.link(EAST, EAST), topo.link(EAST, WEST)
    ledger.charge(cross, GB)
    ledger.charge(idle, 5)
    before = ledger.snapshot()
    ledger.charge(cross, GB)
    ledger.charge(same, 100)
    delta = TrafficLedger.difference(ledger.snapshot(), before)
    assert set(delta) == {cross.name, same.name}  # idle link unchanged: left out
    moved = delta[cross.name]
    assert (moved.transfers, moved.bytes, moved.cross_cloud) == (1, GB, True)
    assert moved.emulated_seconds == pytest.approx(cross.transfer_seconds(GB))
    assert moved.egress_usd == pytest.approx(0.09)
    assert delta[same.name].transfers == 1
    assert delta[same.name].bytes == 100
    assert not delta[same.name].cross_cloud
    assert TrafficLedger.difference(before, before) == {}


def test_ledger_is_thread_safe(topo: NetworkTopology) -> None:
    ledger = TrafficLedger()
    links = [topo.link(EAST, CENTRAL), topo.link(CENTRAL, EAST)]
    start = threading.Barrier(8)

    def charge(i: int) -> None:
        start.wait()
        for _ in range(2000):
            ledger.charge(links[i % 2], 3)

    threads = [threading.Thread(target=charge, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    snap = ledger.snapshot()
    assert sum(t.transfers for t in snap.values()) == 16_000
    assert snap[links[0].name].bytes == 8000 * 3
    assert snap[links[1].name].transfers == 8000

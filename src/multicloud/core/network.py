"""The emulated multi-cloud network: links between regions, their speed and their price.

Every transfer between two places is charged to a `Link`: latency plus size over bandwidth
(the emulated seconds) and egress dollars, priced by the sending cloud as the providers
do. The `TrafficLedger` adds transfers up per link for the run's metrics.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from typing import Any, Literal

from multicloud.core import clock
from multicloud.core.config import ClusterConfig, LinkProfile

LinkKind = Literal["same_region", "cross_region", "cross_cloud"]
GB = 1_000_000_000  # providers price egress per decimal GB


@dataclass(frozen=True, slots=True, order=True)
class Location:
    """Where a node or a source bucket lives."""

    cloud: str
    region: str

    def __str__(self) -> str:
        return f"{self.cloud}/{self.region}"


@dataclass(frozen=True, slots=True)
class Link:
    """A directed link between two locations."""

    src: Location
    dst: Location
    kind: LinkKind
    latency_s: float
    bandwidth_bps: float  # bytes per second
    egress_usd_per_gb: float

    @property
    def name(self) -> str:
        """Stable label, e.g. "aws/us-east-1->gcp/us-central1"."""
        return f"{self.src}->{self.dst}"

    @property
    def cross_cloud(self) -> bool:
        """Whether the link leaves the sender's cloud."""
        return self.src.cloud != self.dst.cloud

    def transfer_seconds(self, nbytes: int) -> float:
        """Emulated seconds to move nbytes: one latency plus serialisation time."""
        return self.latency_s + nbytes / self.bandwidth_bps

    def cost_usd(self, nbytes: int) -> float:
        """Egress dollars charged to the sender for nbytes."""
        return nbytes / GB * self.egress_usd_per_gb

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready view, so that the node sending the bytes can emulate the link."""
        return {"src": [self.src.cloud, self.src.region],
                "dst": [self.dst.cloud, self.dst.region], "kind": self.kind,
                "latency_s": self.latency_s, "bandwidth_bps": self.bandwidth_bps,
                "egress_usd_per_gb": self.egress_usd_per_gb}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Link:
        """The link a `to_json` view describes."""
        kind = raw["kind"]
        if kind not in ("same_region", "cross_region", "cross_cloud"):
            raise ValueError(f"unknown link kind {kind!r}")
        return cls(src=Location(*raw["src"]), dst=Location(*raw["dst"]), kind=kind,
                   latency_s=float(raw["latency_s"]), bandwidth_bps=float(raw["bandwidth_bps"]),
                   egress_usd_per_gb=float(raw["egress_usd_per_gb"]))


class NetworkTopology:
    """Link profiles and prices between clouds and regions, from `cluster_config.yml`."""

    def __init__(self, config: ClusterConfig) -> None:
        self.config = config
        self._cache: dict[tuple[Location, Location], Link] = {}
        self._slowdown: dict[tuple[str, str], float] = {}

    @classmethod
    def default(cls) -> NetworkTopology:
        """The topology of the shipped default config."""
        return cls(ClusterConfig())

    @classmethod
    def from_config(cls, config: ClusterConfig) -> NetworkTopology:
        """The topology a cluster config describes."""
        return cls(config)

    def link(self, src: Location, dst: Location) -> Link:
        """The link from src to dst (cached)."""
        key = (src, dst)
        link = self._cache.get(key)
        if link is None:
            link = self._build(src, dst)
            self._cache[key] = link
        return link

    def slow_down(self, src_cloud: str, dst_cloud: str, factor: float) -> None:
        """Make links between two clouds `factor` times slower, both ways (a fault or a test)."""
        self._slowdown[(src_cloud, dst_cloud)] = factor
        self._slowdown[(dst_cloud, src_cloud)] = factor
        self._cache.clear()

    def cloud_preference(self, src_cloud: str, clouds: list[str]) -> list[str]:
        """Other clouds ordered from cheapest and fastest to reach from src_cloud."""
        def cost(cloud: str) -> tuple[float, float, str]:
            region = self.config.regions.get(cloud, ["?"])[0]
            src_region = self.config.regions.get(src_cloud, ["?"])[0]
            link = self.link(Location(src_cloud, src_region), Location(cloud, region))
            return (link.egress_usd_per_gb, link.transfer_seconds(100 * 1024 * 1024), cloud)
        return sorted((c for c in clouds if c != src_cloud), key=cost)

    def _build(self, src: Location, dst: Location) -> Link:
        links = self.config.links
        kind: LinkKind
        if src == dst:
            kind, profile = "same_region", links["same_region"]
        elif src.cloud == dst.cloud:
            kind, profile = "cross_region", links["cross_region"]
        else:
            kind, profile = "cross_cloud", links["cross_cloud"]
        latency_ms, mbps, price = profile.latency_ms, profile.bandwidth_mbps, self._price(src, dst)
        for override in self.config.link_overrides:
            if _matches(override.src, src) and _matches(override.dst, dst):
                latency_ms = override.latency_ms if override.latency_ms is not None else latency_ms
                mbps = override.bandwidth_mbps if override.bandwidth_mbps is not None else mbps
                if override.egress_usd_per_gb is not None:
                    price = override.egress_usd_per_gb
        factor = self._slowdown.get((src.cloud, dst.cloud), 1.0)
        tuned = LinkProfile(latency_ms=latency_ms * factor, bandwidth_mbps=mbps / factor)
        return Link(src=src, dst=dst, kind=kind, latency_s=tuned.latency_ms / 1000,
                    bandwidth_bps=tuned.bandwidth_mbps * 1_000_000 / 8,
                    egress_usd_per_gb=price)

    def _price(self, src: Location, dst: Location) -> float:
        pricing = self.config.clouds.get(src.cloud)
        if pricing is None:
            return 0.0
        if src.cloud != dst.cloud:
            return pricing.internet_usd_per_gb
        if src.region != dst.region:
            return pricing.inter_region_usd_per_gb
        return pricing.intra_region_usd_per_gb


def _matches(pattern: str, location: Location) -> bool:
    """An override names a cloud ("aws") or a cloud and region ("aws/us-east-1")."""
    return pattern in (location.cloud, str(location))


class LinkEmulator:
    """Makes transfers take their link's time, scaled by time_scale (0 skips the waiting).

    Each sender has its own FIFO pipe per link, as a machine has its own network card: a
    transfer starts when the sender's pipe is free, occupies it for size / bandwidth, and
    arrives one latency later, so one sender's concurrent transfers share its bandwidth.
    The sender of the bytes applies it (a node for its pushes and reads, the orchestrator
    for the source bytes it hands to a processing node), so pipes never need to be shared
    between processes and the embedded and the HTTP cluster are timed alike.
    """

    def __init__(self, time_scale: float) -> None:
        self.time_scale = time_scale
        self._free_at: dict[tuple[str, str], float] = {}

    def delay(self, sender: str, link: Link, nbytes: int) -> float:
        """Reserve sender's pipe on link for nbytes; the seconds from now until they arrive."""
        if self.time_scale <= 0:
            return 0.0
        now = clock.monotonic()
        key = (sender, link.name)
        start = max(now, self._free_at.get(key, now))
        busy = nbytes / link.bandwidth_bps * self.time_scale
        self._free_at[key] = start + busy
        return start + busy + link.latency_s * self.time_scale - now

    async def transfer(self, sender: str, link: Link, nbytes: int) -> None:
        """Wait as long as sender moving nbytes over link takes."""
        seconds = self.delay(sender, link, nbytes)
        if seconds > 0:
            await asyncio.sleep(seconds)


@dataclass(slots=True)
class LinkTraffic:
    """Totals for one link."""

    transfers: int = 0
    bytes: int = 0
    emulated_seconds: float = 0.0
    egress_usd: float = 0.0
    cross_cloud: bool = False


@dataclass
class TrafficLedger:
    """Adds up every transfer per link: what was sent, over which link, at what price."""

    links: dict[str, LinkTraffic] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def charge(self, link: Link, nbytes: int) -> None:
        """Record one transfer of nbytes over link."""
        with self._lock:
            traffic = self.links.setdefault(link.name, LinkTraffic(cross_cloud=link.cross_cloud))
            traffic.transfers += 1
            traffic.bytes += nbytes
            traffic.emulated_seconds += link.transfer_seconds(nbytes)
            traffic.egress_usd += link.cost_usd(nbytes)

    def snapshot(self) -> dict[str, LinkTraffic]:
        """A copy of the totals so far."""
        with self._lock:
            return {name: LinkTraffic(t.transfers, t.bytes, t.emulated_seconds, t.egress_usd,
                                      t.cross_cloud)
                    for name, t in self.links.items()}

    @staticmethod
    def difference(after: dict[str, LinkTraffic],
                   before: dict[str, LinkTraffic]) -> dict[str, LinkTraffic]:
        """Traffic between two snapshots (what one run added)."""
        delta: dict[str, LinkTraffic] = {}
        for name, now in after.items():
            then = before.get(name, LinkTraffic(cross_cloud=now.cross_cloud))
            if now.transfers != then.transfers:
                delta[name] = LinkTraffic(now.transfers - then.transfers, now.bytes - then.bytes,
                                          now.emulated_seconds - then.emulated_seconds,
                                          now.egress_usd - then.egress_usd, now.cross_cloud)
        return delta

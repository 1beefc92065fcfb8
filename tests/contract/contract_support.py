"""Helpers of the contract suite: blobs made on a node, waits on conditions, node metrics.

Everything here reaches the nodes the way the orchestrator does (`cluster.client`), or looks
at what both kinds of cluster share (the data dir's layout, a node's metrics registry), so
one helper serves both carriers.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from multicloud import Cluster, LocalComm
from multicloud.core.auth import auth_header
from multicloud.core.types import BlobInfo, Chunk

LOOPBACK_TOKEN = "loopback"  # the token create_loopback_cluster gives its nodes
DATA = b'{"event": "click", "user": 42}\n' * 200  # 6 KiB of JSON lines: compresses
OTHER = b"some,other,bytes\n" * 300


def make_chunk(data: bytes, cloud: str = "aws") -> Chunk:
    """A single-chunk file made of data."""
    return Chunk(chunk_id=hashlib.sha256(data).hexdigest(), file="data.bin", index=0,
                 offset=0, size_bytes=len(data), source_cloud=cloud)


async def stage(cluster: Cluster, node_id: str, data: bytes = DATA) -> BlobInfo:
    """Process data on a node, from a bucket in the node's own region; the staged blob."""
    node = cluster.get(node_id)
    return await cluster.client.process(node, make_chunk(data, node.cloud), data,
                                        node.location)


async def push(cluster: Cluster, src: str, dst: str, blob: BlobInfo) -> None:
    """Replicate a staged (or stored) blob from src to dst."""
    await cluster.client.replicate(cluster.get(src), cluster.get(dst), blob)


async def stored_blob(cluster: Cluster, node_id: str, blob: BlobInfo) -> bytes:
    """The bytes of a blob: stored on node_id in place, then read back (a sender's copy)."""
    node = cluster.get(node_id)
    await cluster.client.replicate(node, node, blob)
    return await cluster.client.read(node, blob.chunk_id, node.location)


def object_path(cluster: Cluster, node_id: str, chunk_id: str) -> Path:
    """Where a node's chunk store keeps an object (the same layout for both kinds)."""
    assert cluster.data_dir is not None
    return (cluster.data_dir / "nodes" / node_id / "objects" / chunk_id[:2] / chunk_id[2:4]
            / chunk_id)


async def wait_until(condition: Callable[[], Awaitable[bool]], what: str,
                     timeout_s: float = 10.0) -> None:
    """Poll condition with short sleeps until it holds; fail naming `what` at the deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not await condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.01)


async def within(awaitable: Awaitable[object], timeout_s: float = 10.0) -> object:
    """Await something that must come, failing instead of hanging if it never does."""
    async with asyncio.timeout(timeout_s):
        return await awaitable


class Scrape:
    """One scrape of a node's metrics: sample values and family types, by name."""

    def __init__(self, text: str) -> None:
        self.types: dict[str, str] = {}
        self.samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for family in text_string_to_metric_families(text):
            self.types[family.name] = family.type
            for sample in family.samples:
                self.samples[(sample.name, frozenset(sample.labels.items()))] = sample.value

    def value(self, name: str, **labels: str) -> float:
        """The sample with exactly these labels; 0 when the series has not been touched."""
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def labelled(self, name: str, label: str, **where: str) -> dict[str, float]:
        """label value -> sample value, for the samples of name that also carry `where`."""
        found: dict[str, float] = {}
        for (sample, labels), value in self.samples.items():
            tags = dict(labels)
            if sample == name and label in tags and where.items() <= tags.items():
                found[tags[label]] = value
        return found


async def scrape(cluster: Cluster, node_id: str) -> Scrape:
    """A node's metrics: its registry in-process, `GET /metrics` over HTTP."""
    channel = cluster.client.channel
    if isinstance(channel, LocalComm):
        return Scrape(generate_latest(channel.services[node_id].metrics.registry).decode())
    url = f"{cluster.get(node_id).url}/metrics"
    async with aiohttp.ClientSession(headers=auth_header(LOOPBACK_TOKEN)) as session, \
            session.get(url) as resp:
        assert resp.status == 200, (url, resp.status)
        return Scrape(await resp.text())

"""What a node keeps its replicas in: a local disk or a bucket, behind one interface.

`NodeStore` is the interface `NodeService` uses, which `ChunkStore` (a directory) and
`BucketChunkStore` (an object-store prefix) both satisfy. `open_node_store` picks one for
a node from the cluster config: the bucket URL `ClusterConfig.store_of` names for it, else
`<data_dir>/nodes/<id>` on the local disk. `catalog_for` puts the node's batch catalogue
beside its replicas, so a bucket-backed node loses nothing with its machine.
"""

from __future__ import annotations

import builtins
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from multicloud.core.config import ClusterConfig, NodeSpec
from multicloud.core.errors import ConfigError
from multicloud.node.bucket_store import BucketChunkStore
from multicloud.node.catalog import CatalogStore
from multicloud.node.store import ChunkStore, FsyncObserver

__all__ = ["NodeStore", "catalog_for", "check_distinct_stores", "node_spec_for",
           "open_node_store"]


class NodeStore(Protocol):
    """A node's durable, content-addressed chunk store; every method blocks (nodes call
    them from worker threads). Ids are SHA-256 hex (InvalidChunkId otherwise)."""

    # Room the store may use in all, None for no limit of its own (the disk-full fault).
    quota_bytes: int | None
    # The hold_disk fault: a write stops just before it becomes durable until it is set.
    commit_gate: threading.Event | None
    commit_held: threading.Event  # set once a write stopped at the gate

    @property
    def root(self) -> Path | str:
        """Where the store is: a directory, or a bucket URL."""

    @property
    def count(self) -> int:
        """Objects held, as kept since the store opened."""

    @property
    def bytes(self) -> int:
        """Bytes held, as kept since the store opened."""

    def observe_fsync(self, observer: FsyncObserver) -> None:
        """Call observer(seconds) for each step that makes a write durable."""

    def put(self, chunk_id: str, blob: builtins.bytes | memoryview) -> None:
        """Store a blob durably (DiskFull when over the quota; nothing half-written)."""

    def get(self, chunk_id: str) -> builtins.bytes:
        """The blob's bytes, unverified; ChunkNotFound when absent."""

    def exists(self, chunk_id: str) -> bool:
        """Whether the object is present."""

    def size(self, chunk_id: str) -> int | None:
        """The object's size, or None when absent."""

    def delete(self, chunk_id: str, older_than: float | None = None) -> bool:
        """Remove the object (only if last written before older_than, when given)."""

    def inventory(self) -> Iterator[str]:
        """Ids of every object held."""

    def describe(self) -> list[tuple[str, int, float]]:
        """(id, size, mtime) of every object held."""

    def usage(self) -> tuple[int, int]:
        """(object count, total bytes)."""

    def disk_free(self) -> int:
        """Bytes the store can still write."""

    def clear_temp_files(self) -> None:
        """Drop what writes a crash interrupted left behind."""

    def write_partial(self, name: str, nbytes: int) -> Path | None:
        """Leave what a crash in the middle of a write leaves (a fault): a temp file on a
        disk (its path), nothing in a bucket (None)."""

    def corrupt(self, chunk_id: str, offset: int) -> None:
        """Flip one byte of a stored object behind the node's back (a fault)."""


def open_node_store(spec: NodeSpec, cluster_config: ClusterConfig | None,
                    data_dir: str | Path, fsync: bool = True,
                    owner: str | None = None) -> NodeStore:
    """The store of a node: the bucket the config names for it, else its directory
    `<data_dir>/nodes/<id>` (fsync applies to that one: a bucket's PUT is durable)."""
    owner = owner or f"node {spec.id}"
    url = cluster_config.store_of(spec) if cluster_config is not None else None
    if url is None:
        return ChunkStore(Path(data_dir) / "nodes" / spec.id, fsync=fsync, owner=owner)
    assert cluster_config is not None
    return BucketChunkStore.open(url, cluster_config.store_options(url), owner=owner)


def catalog_for(store: NodeStore, owner: str) -> CatalogStore:
    """The node's batch catalogue, kept where its replicas are: under `catalog/` in the
    bucket of a bucket store, in `<root>/catalog/` beside an on-disk one."""
    if isinstance(store, BucketChunkStore):
        return CatalogStore(store.objects, owner=owner)
    return CatalogStore(Path(store.root), owner=owner)


def node_spec_for(cluster_config: ClusterConfig, node_id: str, cloud: str,
                  region: str) -> NodeSpec:
    """The config's spec of a node process (its own `store`, if any), else one made from
    what the process was told: a node the registry named still gets its cloud's store."""
    for spec in cluster_config.node_specs():
        if spec.id == node_id:
            return spec
    try:
        return NodeSpec(id=node_id, cloud=cloud, region=region,
                        capacity_gb=cluster_config.node_capacity_gb)
    except ValueError as exc:
        raise ConfigError(f"node {node_id!r} ({cloud}/{region}) cannot be described: "
                          f"{exc}") from None


def check_distinct_stores(specs: list[NodeSpec], cluster_config: ClusterConfig) -> None:
    """ConfigError when two nodes would keep their replicas under one bucket URL: their
    copies would be one object, and gc on one node would delete the other's."""
    seen: dict[str, str] = {}
    for spec in specs:
        url = cluster_config.store_of(spec)
        if url is None:
            continue
        other = seen.setdefault(url, spec.id)
        if other != spec.id:
            raise ConfigError(f"nodes {other} and {spec.id} both keep their replicas in "
                              f"{url}: give each node its own prefix (put {{node}} in "
                              f"node_stores' URLs, or set each node's `store`)")

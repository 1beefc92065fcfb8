"""Nodes that keep their replicas and catalogues in buckets (memory://), end to end.

The embedded cluster with `node_stores` pointing every cloud's nodes at a bucket prefix of
their own: a batch runs, verifies and restores byte-exact; replicas corrupted or lost
through the nodes' faults are reported and repaired; gc frees the objects of a deleted
batch; and with every node's machine gone (a fresh data dir), the manifest comes back
from the catalogues the buckets hold.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import shutil
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from cluster_fixtures import ProcessCluster, assert_same_tree, write_config_dir, write_files

from multicloud import (
    Cluster,
    LocalComm,
    PipelineConfig,
    PipelineOrchestrator,
    create_local_cluster,
    load_config,
)
from multicloud.blob import TransformChain
from multicloud.cloud import open_store
from multicloud.cluster.local import create_loopback_cluster
from multicloud.cluster.remote import connect_cluster
from multicloud.core.config import ClusterConfig, ProcessingConfig
from multicloud.core.errors import DiskFull, NodeUnavailable
from multicloud.core.network import Location
from multicloud.core.types import Chunk
from multicloud.node.bucket_store import BucketChunkStore
from multicloud.node.service import NodeService
from multicloud.pipeline.maintenance import collect_garbage, repair_chunks

CHUNK = 64 * 1024


def bucket_config() -> ClusterConfig:
    """3 AWS and 3 GCP nodes, each in its own prefix of its cloud's bucket (fresh names:
    memory stores live as long as the process)."""
    tag = uuid.uuid4().hex[:10]
    return ClusterConfig(nodes_per_cloud={"aws": 3, "gcp": 3}, node_stores={
        "aws": f"memory://mc-aws-{tag}/{{node}}/", "gcp": f"memory://mc-gcp-{tag}/{{node}}/"})


@pytest.fixture
def cluster_config() -> ClusterConfig:
    return bucket_config()


@pytest.fixture
async def cluster(tmp_path: Path, cluster_config: ClusterConfig) -> AsyncIterator[Cluster]:
    made = create_local_cluster(tmp_path / "cluster", config=cluster_config, time_scale=0.0)
    yield made
    await made.close()


@pytest.fixture
async def orchestrators(cluster: Cluster, config: PipelineConfig,
                        ) -> AsyncIterator[Callable[[], PipelineOrchestrator]]:
    """Orchestrators (64 KiB chunks) on the bucket-backed cluster, closed after."""
    made: list[PipelineOrchestrator] = []

    def make() -> PipelineOrchestrator:
        made.append(PipelineOrchestrator(cluster, config=config))
        return made[-1]

    yield make
    for orch in made:
        await orch.close()


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """Several chunks, a nested file, an empty one; seeded bytes."""
    return write_files(tmp_path / "dataset", {
        "big.bin": random.Random(3).randbytes(3 * CHUNK + 11),
        "nested/small.jsonl": b'{"n": 1}\n' * 500,
        "empty.txt": b""})


async def run(orch: PipelineOrchestrator, batch_id: str, source: Path) -> None:
    result = await orch.run_pipeline({"batch_id": batch_id, "data_source": str(source),
                                      "source_cloud": "aws"})
    assert result.status == "success", result.error


def bucket_of(cluster: Cluster, node_id: str) -> str:
    """The URL a node keeps its replicas under."""
    url = cluster.config.store_of(cluster.get(node_id).spec)
    assert url is not None
    return url


def bucket_keys(cluster: Cluster, node_id: str, prefix: str) -> set[str]:
    """Keys under a node's prefix, read straight from its bucket."""
    return {info.key for info in open_store(bucket_of(cluster, node_id)).list(prefix)}


def holders(cluster: Cluster, chunk_id: str) -> set[str]:
    """The nodes whose bucket holds the chunk's object."""
    return {n for n in cluster.nodes if f"chunks/{chunk_id}" in bucket_keys(cluster, n, "chunks/")}


def services(cluster: Cluster) -> dict[str, NodeService]:
    """The in-process nodes, by id."""
    channel = cluster.client.channel
    assert isinstance(channel, LocalComm)
    return dict(channel.services)


async def test_a_batch_round_trips_with_every_replica_in_a_bucket(
        cluster: Cluster, orchestrators: Callable[[], PipelineOrchestrator],
        config: PipelineConfig, dataset: Path,
        assert_restored: Callable[..., Awaitable[object]]) -> None:
    assert all(isinstance(s.store, BucketChunkStore) for s in services(cluster).values())
    orch = orchestrators()
    await run(orch, "b1", dataset)
    manifest = orch.storage_manager.manifest
    verified = await orch.verify_batch("b1")
    assert verified.ok, verified.problems
    await assert_restored(orch, "b1", dataset)
    # Every recorded replica is an object in its node's bucket, nothing on the local disk.
    ids = await orch.chunk_ids_of("b1")
    recorded = manifest.replicas(ids)
    for chunk_id in ids:
        assert len(recorded[chunk_id]) == config.distribution.replication_factor
        assert set(recorded[chunk_id]) == holders(cluster, chunk_id)
    assert cluster.data_dir is not None
    assert not list((cluster.data_dir / "nodes").glob("*/objects/*/*/*"))
    # The nodes' figures are the buckets'.
    for node_id, node in cluster.nodes.items():
        count, nbytes = await cluster.client.usage(node)
        listed = await cluster.client.objects(node)
        assert (count, nbytes) == (len(listed), sum(size for _, size, _ in listed)), node_id
    # The catalogue entry is in every node's bucket too.
    for node_id in cluster.nodes:
        assert len(bucket_keys(cluster, node_id, "catalog/")) == 1, node_id


async def test_verify_reports_a_corrupt_and_a_lost_replica_and_repair_mends_them(
        cluster: Cluster, orchestrators: Callable[[], PipelineOrchestrator],
        dataset: Path, assert_restored: Callable[..., Awaitable[object]]) -> None:
    orch = orchestrators()
    await run(orch, "scrubbed", dataset)
    manifest = orch.storage_manager.manifest
    chunk_id = next(r.chunk_id for r in manifest.chunks("scrubbed") if r.path == "big.bin")
    rotten, lost = manifest.replicas([chunk_id])[chunk_id][:2]
    await cluster.faults.corrupt(rotten, chunk_id)
    assert await cluster.faults.lose(lost, chunk_id) is True
    assert await cluster.client.check(cluster.get(rotten), chunk_id) == "corrupt"
    assert await cluster.client.check(cluster.get(lost), chunk_id) == "missing"
    report = await orch.verify_batch("scrubbed")
    assert not report.ok
    assert {(p.node_id, p.problem) for p in report.problems} == {
        (rotten, "corrupt"), (lost, "missing")}

    repaired = await repair_chunks(cluster, orch.storage_manager, orch.repairer,
                                   await orch.chunk_ids_of("scrubbed"))
    assert (repaired.corrupt, repaired.missing, repaired.replicas_created) == (1, 1, 2)
    now = manifest.replicas([chunk_id])[chunk_id]
    assert len(now) == 3
    assert set(now) == holders(cluster, chunk_id)
    for node_id in now:
        assert await cluster.client.check(cluster.get(node_id), chunk_id) == "ok"
    assert (await orch.verify_batch("scrubbed")).ok
    await assert_restored(orch, "scrubbed", dataset)


async def test_gc_after_delete_frees_the_objects(
        cluster: Cluster, orchestrators: Callable[[], PipelineOrchestrator],
        config: PipelineConfig, tmp_path: Path,
        assert_restored: Callable[..., Awaitable[object]]) -> None:
    shared = random.Random(12).randbytes(2 * CHUNK + 5)
    first = write_files(tmp_path / "first", {
        "shared.bin": shared, "first-only.bin": random.Random(13).randbytes(CHUNK + 9)})
    second = write_files(tmp_path / "second", {
        "copy/shared.bin": shared, "second-only.bin": random.Random(14).randbytes(CHUNK + 3)})
    orch = orchestrators()
    await run(orch, "first", first)
    await run(orch, "second", second)
    manifest = orch.storage_manager.manifest
    first_ids = set(await orch.chunk_ids_of("first"))
    second_ids = set(await orch.chunk_ids_of("second"))
    only_first = first_ids - second_ids
    assert only_first
    doomed = {(n, c) for c in only_first for n in holders(cluster, c)}
    used_before = {n: (await cluster.client.usage(cluster.get(n)))[1] for n in cluster.nodes}

    manifest.delete_batch("first")
    report = await collect_garbage(cluster, manifest, config.distribution)
    assert report.objects_freed == len(doomed)
    assert report.replicas_trimmed == 0
    for chunk_id in only_first:
        assert holders(cluster, chunk_id) == set()
    for chunk_id in second_ids:
        assert len(holders(cluster, chunk_id)) == config.distribution.replication_factor
    used_after = {n: (await cluster.client.usage(cluster.get(n)))[1] for n in cluster.nodes}
    assert sum(used_before.values()) - sum(used_after.values()) == report.bytes_freed
    assert (await orch.verify_batch("second")).ok
    await assert_restored(orch, "second", second)


async def test_recover_rebuilds_the_manifest_from_bucket_held_catalogues(
        tmp_path: Path, cluster_config: ClusterConfig, config: PipelineConfig,
        dataset: Path, assert_restored: Callable[..., Awaitable[object]]) -> None:
    """Every machine lost (nodes' data dirs and the manifest alike): the buckets hold it all."""
    first_dir = tmp_path / "first-machine"
    cluster = create_local_cluster(first_dir, config=cluster_config)
    orch = PipelineOrchestrator(cluster, config=config)
    try:
        await run(orch, "kept", dataset)
        want_files = orch.storage_manager.manifest.files("kept")
        want_object = orch.storage_manager.manifest.batch("kept").manifest_object
    finally:
        await orch.close()
        await cluster.close()
    shutil.rmtree(first_dir)

    cluster = create_local_cluster(tmp_path / "second-machine", config=cluster_config)
    orch = PipelineOrchestrator(cluster, config=config)
    try:
        assert orch.storage_manager.manifest.batches() == []
        report = await orch.catalogue().recover()
        assert report.batches == ["kept"]
        assert (report.deleted, report.failed) == ([], {})
        assert (report.nodes_asked, report.nodes_answered) == (6, 6)
        manifest = orch.storage_manager.manifest
        assert manifest.batch("kept").manifest_object == want_object
        assert manifest.files("kept") == want_files
        assert (await orch.verify_batch("kept")).ok
        await assert_restored(orch, "kept", dataset)
    finally:
        await orch.close()
        await cluster.close()


async def test_the_write_faults_work_on_a_bucket_node(cluster: Cluster) -> None:
    """hold_disk stops a write before its PUT, disk_full refuses one, and a crash in the
    middle of a write leaves nothing in the bucket."""
    raw = random.Random(5).randbytes(CHUNK)
    chunk = Chunk(hashlib.sha256(raw).hexdigest(), "f.bin", 0, 0, len(raw), "aws")
    blob, info = TransformChain(ProcessingConfig()).apply(chunk, raw)
    client = Location("aws", "us-east-1")
    node = cluster.get("gcp-node-1")

    await cluster.faults.hold_disk(node.id)
    write = asyncio.create_task(cluster.client.write(node, info, blob, client))
    await asyncio.wait_for(cluster.faults.wait_disk_held(node.id), 10)
    assert bucket_keys(cluster, node.id, "chunks/") == set()
    await cluster.faults.release_disk(node.id)
    ack = await asyncio.wait_for(write, 10)
    assert ack.node_id == node.id
    assert bucket_keys(cluster, node.id, "chunks/") == {f"chunks/{info.chunk_id}"}

    other = cluster.get("gcp-node-2")
    await cluster.faults.disk_full(other.id)
    with pytest.raises(DiskFull, match=r"node gcp-node-2 cannot write chunk .*No space left"):
        await cluster.client.write(other, info, blob, client)
    assert bucket_keys(cluster, other.id, "chunks/") == set()
    await cluster.faults.disk_full(other.id, full=False)

    third = cluster.get("aws-node-3")
    await cluster.faults.crash_during_write(third.id)
    with pytest.raises(NodeUnavailable, match="crashed in the middle of a write"):
        await cluster.client.write(third, info, blob, client)
    assert bucket_keys(cluster, third.id, "chunks/") == set()
    await cluster.faults.restart(third.id)
    await cluster.client.write(third, info, blob, client)
    assert await cluster.client.check(third, info.chunk_id) == "ok"


async def test_nodes_behind_http_open_the_bucket_their_config_names(
        tmp_path: Path, cluster_config: ClusterConfig, config: PipelineConfig,
        dataset: Path, assert_restored: Callable[..., Awaitable[object]]) -> None:
    """Cluster mode's `NodeServer` (here on loopback) opens its store from the config."""
    cluster = await create_loopback_cluster(tmp_path / "http", config=cluster_config)
    orch = PipelineOrchestrator(cluster, config=config)
    try:
        await run(orch, "over-http", dataset)
        assert (await orch.verify_batch("over-http")).ok
        await assert_restored(orch, "over-http", dataset)
        ids = await orch.chunk_ids_of("over-http")
        recorded = orch.storage_manager.manifest.replicas(ids)
        for chunk_id in ids:
            assert set(recorded[chunk_id]) == holders(cluster, chunk_id)
        assert not list((tmp_path / "http").glob("nodes/*/objects/*/*/*"))
    finally:
        await orch.close()
        await cluster.close()


@pytest.mark.timeout(300)
async def test_node_processes_keep_their_replicas_in_the_configured_buckets(
        tmp_path: Path, dataset: Path) -> None:
    """`multicloud node` opens the store its config dir names (memory:// is per process:
    each node process holds its own buckets, which is all a node ever reads)."""
    config_dir = write_config_dir(tmp_path / "cfg")
    tag = uuid.uuid4().hex[:8]
    with (config_dir / "cluster_config.yml").open("a") as handle:
        handle.write(f"node_stores:\n  aws: memory://mc-aws-{tag}/{{node}}/\n"
                     f"  gcp: memory://mc-gcp-{tag}/{{node}}/\n")
    processes = ProcessCluster(tmp_path / "data", config_dir)
    try:
        processes.start()
        registry = await connect_cluster(processes.registry_url, processes.token,
                                         processes.config.cluster, data_dir=tmp_path / "orch")
        orch = PipelineOrchestrator(registry, config=processes.config)
        try:
            await run(orch, "in-buckets", dataset)
            assert (await orch.verify_batch("in-buckets")).ok
            restored = await orch.restore_batch("in-buckets", tmp_path / "restored")
            assert restored.failed_files == []
            assert_same_tree(dataset, tmp_path / "restored")
            held = {n.id: await registry.client.inventory(n) for n in registry.nodes.values()}
            assert sum(len(ids) for ids in held.values()) > 0
        finally:
            await orch.close()
            await registry.close()
        assert processes.object_files() == []  # nothing on the nodes' local disks
    finally:
        processes.stop()


async def test_a_new_key_rewrites_the_replicas_a_bucket_already_held(tmp_path: Path) -> None:
    """A batch encrypted with a new key over chunks the buckets hold under the old one:
    what the nodes acknowledged is what they store, so the new batch restores."""
    source = tmp_path / "src"
    source.mkdir()
    (source / "a.bin").write_bytes(random.Random(21).randbytes(150_000))
    keys = []
    for name in ("k1", "k2"):
        keys.append(tmp_path / name)
        keys[-1].write_bytes(random.Random(name).randbytes(32))
    tag = uuid.uuid4().hex[:8]
    stores = {cloud: f"memory://rot-{cloud}-{tag}/{{node}}/" for cloud in ("aws", "gcp")}

    def with_key(key: Path) -> PipelineConfig:
        return load_config(None).replace(
            ingestion={"chunk_size_mb": CHUNK / 2**20},
            cluster={"nodes_per_cloud": {"aws": 2, "gcp": 1}, "nodes": [],
                     "node_stores": stores},
            processing={"encryption": {"key_file": str(key)},
                        "transforms": ["validate", "compress", "encrypt"]})

    cluster = create_local_cluster(tmp_path / "cluster", config=with_key(keys[0]).cluster)
    try:
        for batch, key in (("old", keys[0]), ("new", keys[1])):
            orch = PipelineOrchestrator(cluster, config=with_key(key))
            try:
                result = await orch.run_pipeline({"batch_id": batch,
                                                  "data_source": str(source)})
                assert result.status == "success", result.error
            finally:
                await orch.close()
        orch = PipelineOrchestrator(cluster, config=with_key(keys[1]))
        try:
            assert (await orch.verify_batch("new")).ok
            report = await orch.restore_batch("new", tmp_path / "out")
            assert report.skipped_replicas == []
            assert (tmp_path / "out" / "a.bin").read_bytes() == (source / "a.bin").read_bytes()
        finally:
            await orch.close()
    finally:
        await cluster.close()


async def test_node_stores_added_later_leave_disk_nodes_where_their_data_is(
        tmp_path: Path, config: PipelineConfig, dataset: Path) -> None:
    root = tmp_path / "cluster"
    on_disk = ClusterConfig(nodes_per_cloud={"aws": 2, "gcp": 2})
    cluster = create_local_cluster(root, config=on_disk)
    orch = PipelineOrchestrator(cluster, config=config)
    try:
        await run(orch, "kept", dataset)
    finally:
        await orch.close()
        await cluster.close()
    tag = uuid.uuid4().hex[:8]
    moved = ClusterConfig(nodes_per_cloud={"aws": 2, "gcp": 2},
                          node_stores={"aws": f"memory://later-{tag}/{{node}}/"})
    cluster = create_local_cluster(root, config=moved)
    orch = PipelineOrchestrator(cluster, config=config)
    try:
        assert (await orch.verify_batch("kept")).ok
    finally:
        await orch.close()
        await cluster.close()

"""The control plane made durable, end to end on the embedded cluster: every batch's
manifest kept on the nodes and recovered from them, scrub-and-repair, and gc."""

from __future__ import annotations

import asyncio
import json
import random
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from cluster_fixtures import write_files

from multicloud import Cluster, PipelineConfig, PipelineOrchestrator, create_local_cluster
from multicloud.blob import decode_blob
from multicloud.core.errors import BatchLeased, ClusterError
from multicloud.core.network import Location
from multicloud.pipeline.lease import this_owner
from multicloud.pipeline.maintenance import collect_garbage, repair_chunks
from multicloud.pipeline.storage import MANIFEST_FILE
from multicloud.ui.cli import main

CHUNK = 64 * 1024


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    """3 AWS and 3 GCP nodes, in-process, emulated links without waits."""
    made = create_local_cluster(tmp_path / "cluster", {"aws": 3, "gcp": 3}, time_scale=0.0)
    yield made
    await made.close()


class Orchestrators:
    """Opens orchestrators on the test cluster (64 KiB chunks) and closes them all."""

    def __init__(self, cluster: Cluster, config: PipelineConfig) -> None:
        self.cluster = cluster
        self.config = config
        self.open: list[PipelineOrchestrator] = []

    def __call__(self) -> PipelineOrchestrator:
        orch = PipelineOrchestrator(self.cluster, config=self.config)
        self.open.append(orch)
        return orch

    async def close(self, orch: PipelineOrchestrator) -> None:
        """Close one now (this machine going away, its manifest with it)."""
        self.open.remove(orch)
        await orch.close()


@pytest.fixture
async def orchestrators(cluster: Cluster, config: PipelineConfig,
                        ) -> AsyncIterator[Orchestrators]:
    """Orchestrators on the cluster; whatever the test left open is closed after."""
    assert config.ingestion.chunk_size_bytes == CHUNK
    made = Orchestrators(cluster, config)
    yield made
    for orch in list(made.open):
        await made.close(orch)


async def run(orch: PipelineOrchestrator, batch_id: str, source: Path) -> None:
    """Run a batch that must succeed."""
    result = await orch.run_pipeline({"batch_id": batch_id, "data_source": str(source),
                                      "source_cloud": "aws"})
    assert result.status == "success", result.error


def on_disk(cluster: Cluster, node_id: str, chunk_id: str) -> Path:
    """Where a node keeps an object."""
    assert cluster.data_dir is not None
    return (cluster.data_dir / "nodes" / node_id / "objects" / chunk_id[:2] / chunk_id[2:4]
            / chunk_id)


def holders(cluster: Cluster, chunk_id: str) -> set[str]:
    """The nodes whose store holds the object, by what is on their disks."""
    return {n for n in cluster.nodes if on_disk(cluster, n, chunk_id).is_file()}


def drop_manifest_db(cluster: Cluster) -> None:
    """Lose this machine's manifest (the cache), WAL and all."""
    assert cluster.data_dir is not None
    for suffix in ("", "-wal", "-shm"):
        (cluster.data_dir / (MANIFEST_FILE + suffix)).unlink(missing_ok=True)
    assert not (cluster.data_dir / MANIFEST_FILE).exists()


async def disk_bytes(cluster: Cluster) -> int:
    """What every node's store holds, by the nodes' own accounting."""
    return sum([(await cluster.client.usage(n))[1] for n in cluster.nodes.values()])


async def everything_held(cluster: Cluster) -> set[tuple[str, str]]:
    """(node id, chunk id) of every object on every node."""
    return {(n.id, chunk_id) for n in cluster.nodes.values()
            for chunk_id in await cluster.client.inventory(n)}


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """Three files, one of several chunks, one nested, one empty; seeded bytes, so the
    chunk ids (and the placement's choices) are the same every run."""
    return write_files(tmp_path / "dataset", {
        "big.bin": random.Random(3).randbytes(3 * CHUNK + 11),
        "nested/small.jsonl": b'{"n": 1}\n' * 500,
        "empty.txt": b""})


# -- the catalogue ----------------------------------------------------------------------


async def test_a_batch_publishes_its_manifest_to_the_nodes(
        cluster: Cluster, orchestrators: Orchestrators,
        config: PipelineConfig, dataset: Path) -> None:
    orch = orchestrators()
    await run(orch, "published", dataset)
    record = orch.storage_manager.manifest.batch("published")
    assert record.manifest_object is not None
    obj = record.manifest_object
    stored_on = holders(cluster, obj)
    assert len(stored_on) >= config.distribution.write_quorum
    assert {cluster.get(n).cloud for n in stored_on} == {"aws", "gcp"}
    assert set(orch.storage_manager.manifest.replicas([obj])[obj]) == stored_on
    # The object is the batch's manifest: it decodes to the batch's files.
    some = cluster.get(sorted(stored_on)[0])
    blob = await cluster.client.read(some, obj, Location("aws", "us-east-1"))
    data = json.loads(decode_blob(blob, expected_chunk_id=obj))
    assert data["batch"]["batch_id"] == "published"
    assert data["batch"]["status"] == "success"
    assert sorted(f[0] for f in data["files"]) == ["big.bin", "empty.txt", "nested/small.jsonl"]
    # Every healthy node's catalog names it.
    for node in cluster.healthy_nodes():
        entries = {e["batch_id"]: e for e in await cluster.client.catalog_list(node)}
        assert entries["published"]["status"] == "success", node.id
        assert entries["published"]["manifest_object"] == obj, node.id
    # Gc and repair count the manifest as the batch's own.
    assert obj in await orch.chunk_ids_of("published")


async def test_recover_rebuilds_a_lost_manifest_db_from_the_nodes(
        cluster: Cluster, orchestrators: Orchestrators,
        dataset: Path, assert_restored: Callable[..., Awaitable[object]]) -> None:
    first = orchestrators()
    await run(first, "kept", dataset)
    before = first.storage_manager.manifest
    want_files = before.files("kept")
    want_chunks = before.chunks("kept")
    want_object = before.batch("kept").manifest_object
    await orchestrators.close(first)
    drop_manifest_db(cluster)

    orch = orchestrators()
    assert orch.storage_manager.manifest.batches() == []
    report = await orch.catalogue().recover()
    assert report.batches == ["kept"]
    assert (report.deleted, report.failed) == ([], {})
    assert (report.nodes_asked, report.nodes_answered) == (6, 6)
    manifest = orch.storage_manager.manifest
    record = manifest.batch("kept")
    assert (record.status, record.manifest_object) == ("success", want_object)
    assert manifest.files("kept") == want_files
    assert manifest.chunks("kept") == want_chunks
    assert (await orch.verify_batch("kept")).ok
    await assert_restored(orch, "kept", dataset)
    # The same content again is a no-op: the fingerprint came back too.
    again = await orch.run_pipeline({"batch_id": "kept", "data_source": str(dataset),
                                     "source_cloud": "aws"})
    assert again.status == "success"
    assert again.metrics.get("already_done") is True


async def test_recover_honours_a_tombstone_left_by_forget(
        cluster: Cluster, orchestrators: Orchestrators,
        tmp_path: Path, dataset: Path) -> None:
    first = orchestrators()
    other = write_files(tmp_path / "other", {"x.bin": random.Random(11).randbytes(CHUNK + 1)})
    await run(first, "gone", other)
    await run(first, "stays", dataset)
    first.storage_manager.manifest.delete_batch("gone")
    assert await first.catalogue().forget("gone") == 6
    await orchestrators.close(first)
    drop_manifest_db(cluster)

    orch = orchestrators()
    report = await orch.catalogue().recover()
    assert report.batches == ["stays"]
    assert report.deleted == ["gone"]
    assert report.failed == {}
    assert [b.batch_id for b in orch.storage_manager.manifest.batches()] == ["stays"]


async def test_recover_drops_a_batch_the_cache_still_holds_once_forgotten(
        orchestrators: Orchestrators, dataset: Path) -> None:
    """A tombstone written from another machine: this cache still knows the batch."""
    orch = orchestrators()
    await run(orch, "elsewhere-deleted", dataset)
    await orch.catalogue().forget("elsewhere-deleted")
    report = await orch.catalogue().recover()
    assert report.deleted == ["elsewhere-deleted"]
    assert report.batches == []
    assert orch.storage_manager.manifest.batches() == []


# -- repair -----------------------------------------------------------------------------


async def test_repair_replaces_a_corrupt_and_a_missing_replica(
        cluster: Cluster, orchestrators: Orchestrators,
        dataset: Path, assert_restored: Callable[..., Awaitable[object]]) -> None:
    orch = orchestrators()
    await run(orch, "scrubbed", dataset)
    manifest = orch.storage_manager.manifest
    chunk_id = next(r.chunk_id for r in manifest.chunks("scrubbed") if r.path == "big.bin")
    recorded = manifest.replicas([chunk_id])[chunk_id]
    assert len(recorded) == 3
    rotten, lost = recorded[0], recorded[1]
    path = on_disk(cluster, rotten, chunk_id)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # bit rot in the payload
    path.write_bytes(bytes(data))
    on_disk(cluster, lost, chunk_id).unlink()
    assert not (await orch.verify_batch("scrubbed")).ok

    report = await repair_chunks(cluster, orch.storage_manager, orch.repairer,
                                 await orch.chunk_ids_of("scrubbed"))
    assert (report.corrupt, report.missing, report.replicas_created) == (1, 1, 2)
    assert (report.under_replicated, report.lost, report.unavailable) == (0, 0, 0)
    assert {(d["node_id"], d["problem"]) for d in report.details} == {
        (rotten, "corrupt"), (lost, "missing")}
    now = manifest.replicas([chunk_id])[chunk_id]
    assert len(now) == 3
    assert set(now) == holders(cluster, chunk_id)
    for node_id in now:
        assert await cluster.client.check(cluster.get(node_id), chunk_id) == "ok"
    assert (await orch.verify_batch("scrubbed")).ok
    await assert_restored(orch, "scrubbed", dataset)


# -- gc ---------------------------------------------------------------------------------


async def test_gc_frees_a_deleted_batch_and_keeps_what_another_shares(
        cluster: Cluster, orchestrators: Orchestrators,
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
    both = first_ids & second_ids
    assert len(both) == 3  # the shared file's chunks, stored once
    only_first = first_ids - second_ids
    assert len(only_first) == 3  # two chunks and the batch's manifest

    manifest.delete_batch("first")
    listed = {n.id: await cluster.client.objects(n) for n in cluster.nodes.values()}
    doomed = {(node_id, c): size for node_id, objects in listed.items()
              for c, size, _ in objects if c in only_first}
    assert len(doomed) >= 3 * 2  # each at least on write_quorum nodes
    held_before = await everything_held(cluster)
    bytes_before = await disk_bytes(cluster)

    dry = await collect_garbage(cluster, manifest, config.distribution, dry_run=True)
    assert dry.dry_run
    assert (dry.objects_freed, dry.bytes_freed) == (len(doomed), sum(doomed.values()))
    assert await everything_held(cluster) == held_before
    assert await disk_bytes(cluster) == bytes_before
    assert all(manifest.blob(c) is not None for c in only_first)

    report = await collect_garbage(cluster, manifest, config.distribution)
    assert (report.objects_freed, report.bytes_freed) == (len(doomed), sum(doomed.values()))
    assert report.replicas_trimmed == 0
    assert bytes_before - await disk_bytes(cluster) == report.bytes_freed
    assert await everything_held(cluster) == held_before - set(doomed)
    for chunk_id in only_first:
        assert holders(cluster, chunk_id) == set()
        assert manifest.blob(chunk_id) is None
        assert manifest.replicas([chunk_id]) == {chunk_id: []}
    for chunk_id in second_ids:
        assert len(holders(cluster, chunk_id)) == config.distribution.replication_factor
    assert (await orch.verify_batch("second")).ok
    await assert_restored(orch, "second", second)
    # A second pass finds nothing more to take.
    again = await collect_garbage(cluster, manifest, config.distribution)
    assert (again.objects_freed, again.replicas_trimmed, again.bytes_freed) == (0, 0, 0)


async def test_gc_trims_an_over_replicated_chunk_to_rf_across_two_clouds(
        cluster: Cluster, orchestrators: Orchestrators,
        config: PipelineConfig, dataset: Path) -> None:
    orch = orchestrators()
    await run(orch, "over", dataset)
    manifest = orch.storage_manager.manifest
    chunk_id = next(r.chunk_id for r in manifest.chunks("over") if r.path == "big.bin")
    before = holders(cluster, chunk_id)
    assert len(before) == config.distribution.replication_factor == 3
    by_cloud: dict[str, list[str]] = {}
    for node_id in sorted(before):
        by_cloud.setdefault(cluster.get(node_id).cloud, []).append(node_id)
    # A 4th copy in the cloud that already holds two: trimming must keep the other cloud's.
    crowded = max(by_cloud, key=lambda c: len(by_cloud[c]))
    extra = next(n.id for n in cluster.nodes.values()
                 if n.cloud == crowded and n.id not in before)
    target = on_disk(cluster, extra, chunk_id)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(on_disk(cluster, sorted(before)[0], chunk_id), target)
    assert len(holders(cluster, chunk_id)) == 4

    report = await collect_garbage(cluster, manifest, config.distribution)
    assert (report.replicas_trimmed, report.objects_freed) == (1, 0)
    after = holders(cluster, chunk_id)
    assert len(after) == 3
    assert {cluster.get(n).cloud for n in after} == {"aws", "gcp"}
    # What the manifest says is where the copies are.
    assert set(manifest.replicas([chunk_id])[chunk_id]) == after
    assert (await orch.verify_batch("over")).ok


async def test_gc_after_replicas_come_back_keeps_the_manifest_in_step_with_the_disks(
        cluster: Cluster, orchestrators: Orchestrators,
        config: PipelineConfig, tmp_path: Path) -> None:
    """A disk that vanished during a scrub (its replica found missing and forgotten, a new
    one made elsewhere) comes back with its copy: 4 copies, 3 recorded. Gc must leave 3
    copies *and* a manifest that records those 3, whichever holder it was that came back.

    Seeded bytes: the chunk ids, and so the placement's choices, are the same every run.
    """
    source = write_files(tmp_path / "seeded", {
        "big.bin": random.Random(8).randbytes(6 * CHUNK)})
    orch = orchestrators()
    await run(orch, "returns", source)
    manifest = orch.storage_manager.manifest
    chunk_ids = [r.chunk_id for r in manifest.chunks("returns")]
    assert len(set(chunk_ids)) == 6
    for i, chunk_id in enumerate(chunk_ids):
        victim = sorted(holders(cluster, chunk_id))[i % 3]
        path = on_disk(cluster, victim, chunk_id)
        aside = tmp_path / f"unmounted-{i}"
        shutil.move(path, aside)  # the disk goes away: reads miss, writes fail
        await cluster.faults.disk_full(victim)
        repaired = await repair_chunks(cluster, orch.storage_manager, orch.repairer,
                                       [chunk_id])
        await cluster.faults.disk_full(victim, full=False)
        assert (repaired.missing, repaired.replicas_created) == (1, 1)
        assert victim not in manifest.replicas([chunk_id])[chunk_id]
        shutil.move(aside, path)  # ... and comes back with its copy
        assert len(holders(cluster, chunk_id)) == 4
        assert len(manifest.replicas([chunk_id])[chunk_id]) == 3

    report = await collect_garbage(cluster, manifest, config.distribution)
    assert report.replicas_trimmed == 6
    recorded = manifest.replicas(chunk_ids)
    out_of_step = {c[:12]: (sorted(holders(cluster, c)), recorded[c]) for c in chunk_ids
                   if set(recorded[c]) != holders(cluster, c)}
    assert out_of_step == {}, "chunk: (copies on disk, replicas the manifest records)"
    assert all(len(holders(cluster, c)) == 3 for c in chunk_ids)
    assert (await orch.verify_batch("returns")).ok


# -- where users and other machines push on it ----------------------------------------
# An id reused from a machine whose cache does not know it, gc when a batch's manifest
# cannot be read, a resume whose committed chunks went missing, two runs of one batch in
# one process, a damaged catalogue entry, a lease taken over while its run stalled.


def source(root: Path, seed: int, chunks: int = 3) -> Path:
    """One seeded file of a few chunks."""
    return write_files(root, {"data.bin": random.Random(seed).randbytes(chunks * CHUNK + 5)})


async def test_an_id_from_another_machine_keeps_its_content(
        cluster: Cluster, orchestrators: Orchestrators, tmp_path: Path) -> None:
    """Ids are immutable cluster-wide: a cache that never saw the id asks the nodes."""
    first = orchestrators()
    await run(first, "shared", source(tmp_path / "one", seed=1))
    await orchestrators.close(first)
    drop_manifest_db(cluster)  # another machine: same cluster, no cache

    orch = orchestrators()
    result = await orch.run_pipeline({"batch_id": "shared", "source_cloud": "aws",
                                      "data_source": str(source(tmp_path / "two", seed=2))})
    assert result.status == "failed"
    assert "already holds other content" in (result.error or "")
    assert "--replace" in (result.error or "")
    # The batch the cluster knows is untouched, and the same content is a no-op there.
    again = await orch.run_pipeline({"batch_id": "shared", "source_cloud": "aws",
                                     "data_source": str(tmp_path / "one")})
    assert again.metrics.get("already_done") is True
    assert (await orch.verify_batch("shared")).ok


async def test_gc_deletes_nothing_when_a_batch_manifest_cannot_be_read(
        cluster: Cluster, orchestrators: Orchestrators, tmp_path: Path) -> None:
    first = orchestrators()
    await run(first, "x", source(tmp_path / "x", seed=3))
    obj = first.storage_manager.manifest.batch("x").manifest_object
    assert obj is not None
    await orchestrators.close(first)
    for node_id in holders(cluster, obj):  # every copy of the batch's manifest rots
        on_disk(cluster, node_id, obj).write_bytes(b"rot")
    drop_manifest_db(cluster)

    orch = orchestrators()
    report = await orch.catalogue().recover()
    assert "x" in report.failed
    assert report.lost == ["x"]  # every holder answered: lost, and delete is the way out
    before = {(n, c) for n in cluster.nodes
              for c in await cluster.client.inventory(cluster.get(n))}
    # `multicloud gc` recovers too, and refuses when a batch could not be read.
    assert cluster.data_dir is not None
    code = await asyncio.to_thread(
        main, ["gc", "--grace", "0", "--data-dir", str(cluster.data_dir)])
    assert code == 2
    after = {(n, c) for n in cluster.nodes
             for c in await cluster.client.inventory(cluster.get(n))}
    assert after == before


async def test_a_manifest_this_machine_cannot_decrypt_is_not_lost(
        cluster: Cluster, config: PipelineConfig, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # A wrong key fails the decode of an intact copy: gc must refuse as for a node that is
    # down, and never tell the user to delete the batch (gc would then free its data).
    sealed = config.replace(processing={"transforms": ["validate", "compress", "encrypt"]})
    monkeypatch.setenv("MULTICLOUD_ENCRYPTION_KEY", "11" * 32)
    first = PipelineOrchestrator(cluster, config=sealed)
    await run(first, "s", source(tmp_path / "s", seed=8))
    await first.close()
    drop_manifest_db(cluster)

    monkeypatch.setenv("MULTICLOUD_ENCRYPTION_KEY", "22" * 32)
    other = PipelineOrchestrator(cluster, config=sealed)
    try:
        report = await other.catalogue().recover()
        assert "s" in report.failed
        assert report.lost == []
        with pytest.raises(ClusterError) as refused:
            await other.collect_garbage(grace_s=0)
        assert "multicloud delete" not in str(refused.value)
    finally:
        await other.close()


async def test_a_resume_sends_again_the_chunks_whose_copies_went(
        cluster: Cluster, orchestrators: Orchestrators, tmp_path: Path) -> None:
    data = source(tmp_path / "r", seed=4, chunks=6)
    orch = orchestrators()
    await run(orch, "r", data)
    manifest = orch.storage_manager.manifest
    gone = manifest.chunk_ids("r")[0]
    # The batch as an interrupted run left it, and one committed chunk's copies gone since
    # (a gc elsewhere, lost disks): the manifest still lists its replicas.
    manifest.finish_batch("r", "interrupted", {"status": "interrupted"})
    for node_id in holders(cluster, gone):
        on_disk(cluster, node_id, gone).unlink()
    assert manifest.replicas([gone])[gone]

    result = await orch.run_pipeline({"batch_id": "r", "data_source": str(data),
                                      "source_cloud": "aws"})

    assert result.status == "success", result.error
    assert result.metrics["resumed_chunks"] == len(manifest.chunk_ids("r")) - 1
    assert len(holders(cluster, gone)) >= 3
    assert (await orch.verify_batch("r")).ok


async def test_two_runs_of_one_batch_in_one_process_are_one_at_a_time(
        cluster: Cluster, orchestrators: Orchestrators, tmp_path: Path) -> None:
    data = source(tmp_path / "p", seed=5, chunks=40)
    first, second = orchestrators(), orchestrators()
    running = asyncio.create_task(first.run_pipeline(
        {"batch_id": "p", "data_source": str(data), "source_cloud": "aws"}))
    await first.wait_for_progress(1)
    other = await second.run_pipeline({"batch_id": "p", "data_source": str(data),
                                       "source_cloud": "aws"})
    done = await running
    assert done.status == "success", done.error
    assert other.status == "failed"
    assert "is being run by pid" in (other.error or "")


async def test_a_damaged_catalogue_entry_is_reported_not_raised(
        cluster: Cluster, orchestrators: Orchestrators, tmp_path: Path) -> None:
    orch = orchestrators()
    await run(orch, "fine", source(tmp_path / "f", seed=6))
    for node in cluster.healthy_nodes():
        await cluster.client.catalog_put(node, {"batch_id": "odd", "status": "success",
                                                "updated_at": 1.0, "created_at": "soon"})
    report = await orch.catalogue().recover()
    assert report.batches == ["fine"]
    assert "damaged" in report.failed["odd"]


async def test_a_run_whose_lease_was_taken_over_cannot_finish_the_batch(
        cluster: Cluster, orchestrators: Orchestrators, tmp_path: Path) -> None:
    orch = orchestrators()
    await run(orch, "l", source(tmp_path / "l", seed=7))
    manifest = orch.storage_manager.manifest
    me, other = this_owner("me"), "far-host:1:x:y"
    manifest.begin_batch("l", "/s", "aws", fingerprint="a:1", owner=me, replace=True)
    assert manifest.renew_lease("l", me)
    with manifest._transaction(write=True) as conn:  # far-host takes over
        conn.execute("UPDATE batches SET owner = ? WHERE batch_id = 'l'", (other,))
    assert not manifest.renew_lease("l", me)
    with pytest.raises(BatchLeased, match="no longer this run's"):
        manifest.finish_batch("l", "success", {}, owner=me)
    assert manifest.batch("l").status == "running"

"""A bucket as the source: the node of the bucket's cloud reads each range itself.

These run on memory:// buckets (an in-process object store), so they need no emulator;
tests/cloud runs the same paths against S3, GCS and Azure Blob emulators.
"""

from __future__ import annotations

import hashlib
import random
import threading
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from multicloud import PipelineConfig, PipelineOrchestrator, create_local_cluster
from multicloud.cloud import open_store
from multicloud.cluster.local import create_loopback_cluster
from multicloud.comm.cluster import Cluster
from multicloud.core.errors import RestoreError, SourceChanged
from multicloud.core.types import Chunk, FileEntry, SourceRef
from multicloud.node.source_reads import SourceReader
from multicloud.pipeline.sources import BucketSource, SkippedEntry, survey_source
from multicloud.run import orchestrator as orchestrator_module

MakeOrchestrator = Callable[..., PipelineOrchestrator]

CHUNK = 64 * 1024


def fill_bucket(url: str) -> dict[str, bytes]:
    """Nested prefixes, an empty object, a multi-chunk object, odd names."""
    rng = random.Random(7)
    objects = {
        "top.jsonl": b"".join(b'{"n": %d}\n' % i for i in range(5000)),
        "nested/deeper/blob.bin": rng.randbytes(3 * CHUNK + 11),
        "nested/empty.txt": b"",
        "with space/caf\u00e9 \u00fcml\u00e4ut.csv": b"a,b\n1,2\n3,4\n",
    }
    store = open_store(url)
    for key, data in objects.items():
        store.put(key, data)
    return objects


def bucket_url() -> str:
    return f"memory://src-{uuid.uuid4().hex[:8]}/exports/2026/"


async def test_bucket_source_round_trip(orchestrator: PipelineOrchestrator,
                                        tmp_path: Path) -> None:
    url = bucket_url()
    objects = fill_bucket(url)
    result = await orchestrator.run_pipeline({"batch_id": "b1", "data_source": url})
    assert result.status == "success", result.error
    assert result.files == len(objects)
    assert result.bytes_processed == sum(len(d) for d in objects.values())
    # The orchestrator never had the bytes: the source went out as references, and the
    # bucket-to-node traffic was charged all the same.
    report = await orchestrator.verify_batch("b1")
    assert report.ok, report
    dest = tmp_path / "restored"
    restored = await orchestrator.restore_batch("b1", dest)
    assert restored.files_restored == len(objects)
    for key, data in objects.items():
        assert (dest / key).read_bytes() == data
    again = await orchestrator.run_pipeline({"batch_id": "b1", "data_source": url})
    assert again.metrics.get("already_done") is True


async def test_object_changed_during_run_is_reported(make_orchestrator: MakeOrchestrator
                                                     ) -> None:
    orchestrator = make_orchestrator(ingestion={"chunk_size_mb": CHUNK / 2**20,
                                                "max_inflight_chunks": 2})
    url = bucket_url()
    store = open_store(url)
    store.put("big.bin", random.Random(1).randbytes(40 * CHUNK))
    rewrites = []

    def rewrite_once(view: object) -> None:
        if not rewrites:  # after the first commit: most of the object is still unread
            rewrites.append(store.put("big.bin", b"x" * 40 * CHUNK))

    orchestrator.add_progress_listener(rewrite_once)
    result = await orchestrator.run_pipeline({"batch_id": "chg", "data_source": url})
    assert rewrites
    assert result.status == "failed"
    assert "big.bin changed during the run" in (result.error or ""), result.error


def test_source_reader_pins_the_listed_version() -> None:
    url = bucket_url()
    store = open_store(url)
    store.put("k.bin", b"a" * 100)
    listed = store.head("k.bin")
    store.put("k.bin", b"b" * 100)
    chunk = Chunk("", "k.bin", 0, 0, 100, "aws",
                  source_ref=SourceRef(url, "k.bin", listed.version))
    with pytest.raises(SourceChanged, match="changed during the run"):
        SourceReader().read(chunk)
    fresh = Chunk("", "k.bin", 0, 0, 100, "aws",
                  source_ref=SourceRef(url, "k.bin", store.head("k.bin").version))
    assert bytes(SourceReader().read(fresh)) == b"b" * 100
    assert fresh.chunk_id == hashlib.sha256(b"b" * 100).hexdigest()
    store.delete("k.bin")
    with pytest.raises(SourceChanged, match="deleted during the run"):
        SourceReader().read(fresh)


def test_listing_that_changes_between_walks_is_refused() -> None:
    url = bucket_url()
    store = open_store(url)
    store.put("a", b"1")
    source = survey_source(url)
    assert (source.count, source.total_bytes) == (1, 1)
    store.put("b", b"22")
    with pytest.raises(SourceChanged, match="changed during the run"):
        list(source.files)


async def test_missing_bucket_prefix_is_one_line(orchestrator: PipelineOrchestrator) -> None:
    result = await orchestrator.run_pipeline({"batch_id": "none",
                                              "data_source": bucket_url()})
    assert result.status == "failed"
    assert "holds no objects" in (result.error or "")


async def test_restore_into_a_bucket(make_orchestrator: MakeOrchestrator,
                                     tmp_path: Path) -> None:
    orchestrator = make_orchestrator()
    url = bucket_url()
    objects = fill_bucket(url)
    big = random.Random(3).randbytes(9 * 1024 * 1024 + 5)  # past one PUT: a multipart upload
    open_store(url).put("large/big.bin", big)
    objects["large/big.bin"] = big
    result = await orchestrator.run_pipeline({"batch_id": "to-bucket", "data_source": url})
    assert result.status == "success", result.error
    target = f"memory://restored-{uuid.uuid4().hex[:8]}/nov/"
    report = await orchestrator.restore_batch("to-bucket", target)
    assert report.files_restored == len(objects)
    restored = open_store(target)
    assert {info.key for info in restored.list()} == set(objects)
    for key, data in objects.items():
        assert bytes(restored.get(key)) == data


async def test_bucket_source_over_http_nodes(tmp_path: Path, config: PipelineConfig) -> None:
    """Cluster mode's carrier: the process request goes without a body, the node reads."""
    url = bucket_url()
    objects = fill_bucket(url)
    cluster = await create_loopback_cluster(tmp_path / "http", {"aws": 2, "gcp": 2},
                                            config=config.cluster, storage=config.storage)
    orchestrator = PipelineOrchestrator(cluster, config=config)
    try:
        result = await orchestrator.run_pipeline({"batch_id": "h", "data_source": url})
        assert result.status == "success", result.error
        dest = tmp_path / "out"
        await orchestrator.restore_batch("h", dest)
        for key, data in objects.items():
            assert (dest / key).read_bytes() == data
    finally:
        await orchestrator.close()
        await cluster.close()


async def test_reading_a_bucket_from_another_cloud_is_charged_as_egress(
        tmp_path: Path, config: PipelineConfig) -> None:
    """An S3-side bucket (memory:// stands in for aws) and only GCP nodes: every source
    byte crosses clouds, and the summary prices it."""
    url = bucket_url()
    objects = fill_bucket(url)
    total = sum(len(d) for d in objects.values())
    config = config.replace(distribution={"min_clouds": 1})
    cluster = create_local_cluster(tmp_path / "gcp-only", {"gcp": 3})
    orchestrator = PipelineOrchestrator(cluster, config=config)
    try:
        result = await orchestrator.run_pipeline({"batch_id": "far", "data_source": url})
        assert result.status == "success", result.error
    finally:
        await orchestrator.close()
        await cluster.close()
    distribution = result.metrics["distribution"]
    from_bucket = sum(nbytes for link, nbytes in distribution["bytes_by_link"].items()
                      if link.startswith("aws/"))
    # Every source byte, and the batch's manifest object the orchestrator (placed in the
    # default cloud, aws) publishes to the nodes.
    assert total <= from_bucket < total + 16 * 1024
    assert distribution["cross_cloud_bytes"] >= total
    assert distribution["egress_cost_usd"] > 0


async def test_file_entries_go_to_the_manifest_as_the_run_goes(
        make_orchestrator: MakeOrchestrator, monkeypatch: pytest.MonkeyPatch) -> None:
    """A listing's entries are not held until the end (a million objects would be), and a
    file written early still gets its quarantine note."""
    monkeypatch.setattr(orchestrator_module, "FILE_ENTRIES_HELD", 2)
    # One chunk in flight at a time (each file a whole chunk): entries finish one by one.
    orchestrator = make_orchestrator(ingestion={"chunk_size_mb": CHUNK / 2**20,
                                                "max_inflight_chunks": 1})
    url = bucket_url()
    store = open_store(url)
    for i in range(7):
        store.put(f"f{i}.bin", bytes([i]) * CHUNK)
    store.put("a-bad.jsonl", b'{"ok": 1}\n{"cut": \n')
    written: list[int] = []
    add_files = orchestrator.storage_manager.manifest.add_files

    def spy(batch_id: str, files: list[FileEntry]) -> None:
        written.append(len(files))
        add_files(batch_id, files)

    monkeypatch.setattr(orchestrator.storage_manager.manifest, "add_files", spy)
    result = await orchestrator.run_pipeline({"batch_id": "many", "data_source": url})
    assert result.status == "success", result.error
    assert len(written) >= 3, written
    assert max(written) <= 3, written  # never more than the limit and the chunk in flight
    files = {f.path: f for f in orchestrator.storage_manager.manifest.files("many")}
    assert len(files) == 8
    assert files["a-bad.jsonl"].quarantine is not None
    assert "line 2" in files["a-bad.jsonl"].quarantine


def test_folder_markers_are_not_files() -> None:
    """Consoles make "dir/" objects to show folders; the client lists them as "dir"."""
    url = bucket_url()
    store = open_store(url)
    for key in ("dir", "dir-old.txt", "dir.d/x", "dir/a.txt", "dir/sub", "dir/sub/b.txt",
                "file", "zz"):
        store.put(key, b"" if key in ("dir", "dir/sub") else key.encode())
    skipped: list[SkippedEntry] = []
    files = [f.rel_path for f in BucketSource(url).files(skipped)]
    assert sorted(files) == ["dir-old.txt", "dir.d/x", "dir/a.txt", "dir/sub/b.txt", "file",
                             "zz"]
    assert [(s.path, s.kind) for s in skipped] == [("dir", "key"), ("dir/sub", "key")]
    assert "folder marker" in skipped[0].reason
    survey = survey_source(url)
    assert survey.count == 6
    assert [s.path for s in survey.skipped] == ["dir", "dir/sub"]


async def test_a_url_with_a_token_is_refused_without_echoing_it(
        orchestrator: PipelineOrchestrator) -> None:
    signed = ("https://acct.blob.core.windows.net/c/p/?sv=2022-11-02&sig=SUPERSECRETSIG"
              "&se=2030")
    result = await orchestrator.run_pipeline({"batch_id": "sas", "data_source": signed})
    assert result.status == "failed"
    assert "carries a query" in (result.error or "")
    assert "SUPERSECRETSIG" not in (result.error or "")
    events = " ".join(str(e) for e in orchestrator.live.events)
    assert "SUPERSECRETSIG" not in events


async def test_the_manifest_names_a_bucket_source_in_one_form(
        orchestrator: PipelineOrchestrator) -> None:
    url = bucket_url()
    fill_bucket(url)
    odd = url.replace("/exports/2026/", "//exports/./2026")  # same prefix, pasted oddly
    result = await orchestrator.run_pipeline({"batch_id": "form", "data_source": odd})
    assert result.status == "success", result.error
    assert orchestrator.storage_manager.manifest.batch("form").source == url


async def test_a_file_that_cannot_be_rebuilt_leaves_no_object_and_no_thread(
        orchestrator: PipelineOrchestrator, node_registry: Cluster) -> None:
    url = bucket_url()
    objects = fill_bucket(url)
    big = random.Random(9).randbytes(9 * 1024 * 1024 + 3)  # a multipart upload
    open_store(url).put("large/big.bin", big)
    result = await orchestrator.run_pipeline({"batch_id": "lossy", "data_source": url})
    assert result.status == "success", result.error
    manifest = orchestrator.storage_manager.manifest
    last = max((r for r in manifest.chunks("lossy") if r.path == "large/big.bin"),
               key=lambda r: r.index)
    for node_id in manifest.replicas([last.chunk_id])[last.chunk_id]:
        await node_registry.client._call(node_registry.nodes[node_id], "fault",
                                         {"action": "lose", "chunk_id": last.chunk_id})
    target = f"memory://lossy-{uuid.uuid4().hex[:8]}/"
    with pytest.raises(RestoreError, match=r"large/big\.bin"):
        await orchestrator.restore_batch("lossy", target)
    keys = {info.key for info in open_store(target).list()}
    assert keys == set(objects)  # every other file, and nothing of the one that failed
    assert not [t for t in threading.enumerate() if t.name.startswith("restore-upload")]

"""The whole pipeline on the cloud protocols: a bucket source, replicas in buckets.

Per cloud (S3 on moto, GCS on gcp-storage-emulator, Azure Blob on azurite): a source
bucket with nested prefixes, an empty object, a multi-chunk object and keys with spaces
and unicode runs through an embedded cluster whose nodes keep their replicas in a bucket
of their own cloud; verify passes, and restore gives every byte back, into a folder and
into a bucket. Then what users break: an object rewritten during the run, a throttling
store, wrong credentials (one line, exit 2, nothing stored), and secrets kept out of
everything the tool prints or writes.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cloud_support import Bucket, MakeBucket, unique_name
from fault_proxy import FaultProxy

from multicloud import PipelineOrchestrator, create_local_cluster, load_config
from multicloud.cloud import open_store
from multicloud.comm.cluster import Cluster
from multicloud.core.config import PipelineConfig
from multicloud.core.errors import SourceError
from multicloud.pipeline.maintenance import collect_garbage, repair_chunks
from multicloud.pipeline.sources import survey_source

CHUNK = 64 * 1024
SCHEMES = {"aws": "s3", "gcp": "gs", "azure": "az"}

OBJECTS = {
    "top.jsonl": b"".join(b'{"n": %d}\n' % i for i in range(3000)),
    "nested/deeper/still/blob.bin": random.Random(5).randbytes(3 * CHUNK + 17),
    "nested/empty.txt": b"",
    "with space/caf\u00e9 \u00fcml\u00e4ut \u65e5\u672c.csv": b"a,b\n1,2\n3,4\n",
}


def cloud_config(replica_buckets: dict[str, Bucket], **cluster: object) -> PipelineConfig:
    """64 KiB chunks, one node per cloud keeping replicas in its cloud's bucket, one
    replica in every cloud."""
    return load_config(None).replace(
        ingestion={"chunk_size_mb": CHUNK / 2**20},
        distribution={"min_clouds": 3},
        storage={"anti_entropy_interval_s": 0},
        cluster={"nodes_per_cloud": {"aws": 1, "gcp": 1, "azure": 1}, "nodes": [],
                 "node_stores": {cloud: bucket.url("{node}/")
                                 for cloud, bucket in replica_buckets.items()},
                 **cluster})


@pytest.fixture
def replica_buckets(make_bucket: MakeBucket) -> dict[str, Bucket]:
    """A replica bucket per cloud, on that cloud's emulator."""
    return {cloud: make_bucket(scheme) for cloud, scheme in SCHEMES.items()}


@pytest.fixture
async def cloud_cluster(tmp_path: Path, replica_buckets: dict[str, Bucket]
                        ) -> AsyncIterator[tuple[Cluster, PipelineConfig]]:
    config = cloud_config(replica_buckets)
    cluster = create_local_cluster(tmp_path / "cluster", config=config.cluster,
                                   storage=config.storage)
    yield cluster, config
    await cluster.close()


def fill(bucket: Bucket, prefix: str = "exports/2026/") -> dict[str, bytes]:
    store = bucket.open(prefix)
    for key, data in OBJECTS.items():
        store.put(key, data)
    return dict(OBJECTS)


@pytest.mark.parametrize("kind", ["s3", "gs", "az"])
async def test_a_bucket_round_trips_through_buckets_of_three_clouds(
        kind: str, make_bucket: MakeBucket, cloud_cluster: tuple[Cluster, PipelineConfig],
        replica_buckets: dict[str, Bucket], tmp_path: Path) -> None:
    cluster, config = cloud_cluster
    source = make_bucket(kind)
    objects = fill(source)
    orchestrator = PipelineOrchestrator(cluster, config=config)
    try:
        result = await orchestrator.run_pipeline({"batch_id": "nov",
                                                  "data_source": source.url("exports/2026/")})
        assert result.status == "success", result.error
        assert (result.files, result.bytes_processed) == (
            len(objects), sum(len(d) for d in objects.values()))
        # A node of the source's cloud read every chunk; the replicas are in every cloud's
        # bucket, each object a verified envelope.
        storage = result.metrics["storage"]
        assert storage["under_replicated"] == 0
        for bucket in replica_buckets.values():
            assert any(True for _ in bucket.open().list()), bucket.root

        verified = await orchestrator.verify_batch("nov")
        assert verified.ok, verified.problems

        folder = tmp_path / "restored"
        report = await orchestrator.restore_batch("nov", folder)
        assert report.files_restored == len(objects)
        for key, data in objects.items():
            assert (folder / key).read_bytes() == data

        target = make_bucket(kind)
        into = await orchestrator.restore_batch("nov", target.url("restored/nov/"))
        assert into.files_restored == len(objects)
        restored = target.open("restored/nov/")
        assert {info.key for info in restored.list()} == set(objects)
        for key, data in objects.items():
            assert bytes(restored.get(key)) == data
    finally:
        await orchestrator.close()


async def test_repair_and_gc_work_on_bucket_back_ends(
        make_bucket: MakeBucket, cloud_cluster: tuple[Cluster, PipelineConfig],
        replica_buckets: dict[str, Bucket]) -> None:
    cluster, config = cloud_cluster
    source = make_bucket("s3")
    fill(source)
    orchestrator = PipelineOrchestrator(cluster, config=config)
    try:
        result = await orchestrator.run_pipeline({"batch_id": "r", "data_source": source.url()})
        assert result.status == "success", result.error
        manifest = orchestrator.storage_manager.manifest
        chunk_id = manifest.chunk_ids("r")[0]
        holders = manifest.replicas([chunk_id])[chunk_id]
        gcp = next(n for n in holders if n.startswith("gcp"))
        azure = next(n for n in holders if n.startswith("azure"))
        await cluster.client._call(cluster.nodes[gcp], "fault",
                                   {"action": "corrupt", "chunk_id": chunk_id})
        await cluster.client._call(cluster.nodes[azure], "fault",
                                   {"action": "lose", "chunk_id": chunk_id})
        broken = await orchestrator.verify_batch("r")
        assert {(p.node_id, p.problem) for p in broken.problems} == {
            (gcp, "corrupt"), (azure, "missing")}
        repaired = await repair_chunks(cluster, orchestrator.storage_manager,
                                       orchestrator.repairer, [chunk_id])
        assert (repaired.missing, repaired.corrupt, repaired.replicas_created) == (1, 1, 2)
        assert (await orchestrator.verify_batch("r")).ok

        # gc: once the batch is deleted, every one of its objects leaves the buckets.
        before = sum(1 for b in replica_buckets.values() for _ in b.open().list())
        manifest.delete_batch("r")
        await orchestrator.catalogue().forget("r")
        freed = await collect_garbage(cluster, orchestrator.storage_manager.manifest,
                                      config.distribution, grace_s=0)
        after = [i.key for b in replica_buckets.values() for i in b.open().list()
                 if not i.key.split("/", 1)[-1].startswith("catalog/")]
        assert freed.objects_freed > 0
        assert before > 0
        assert after == []
    finally:
        await orchestrator.close()


async def test_an_object_rewritten_during_the_run_is_reported(
        make_bucket: MakeBucket, cloud_cluster: tuple[Cluster, PipelineConfig]) -> None:
    cluster, config = cloud_cluster
    source = make_bucket("s3")
    store = source.open()
    store.put("big.bin", random.Random(1).randbytes(40 * CHUNK))
    orchestrator = PipelineOrchestrator(
        cluster, config=config.replace(ingestion={"max_inflight_chunks": 2}))
    rewrites: list[object] = []

    def rewrite_once(view: object) -> None:
        if not rewrites:  # after the first commit: most of the object is still unread
            rewrites.append(store.put("big.bin", b"x" * 40 * CHUNK))

    orchestrator.add_progress_listener(rewrite_once)
    try:
        result = await orchestrator.run_pipeline({"batch_id": "chg",
                                                  "data_source": source.url()})
    finally:
        await orchestrator.close()
    assert rewrites
    assert result.status == "failed"
    assert "big.bin changed during the run" in (result.error or ""), result.error


async def test_a_throttling_source_ends_in_success(
        tmp_path: Path, make_bucket: MakeBucket, replica_buckets: dict[str, Bucket]) -> None:
    source = make_bucket("s3")
    objects = fill(source, "")
    assert source.emulator is not None
    with FaultProxy(source.emulator.endpoint, "s3") as proxy:
        fault = proxy.fail_first(6)  # the listing's and the nodes' first requests: SlowDown
        config = cloud_config(replica_buckets, stores=[{
            "url": source.root, "endpoint": proxy.url, "allow_http": True,
            "max_retries": 10}])
        cluster = create_local_cluster(tmp_path / "c", config=config.cluster,
                                       storage=config.storage)
        orchestrator = PipelineOrchestrator(cluster, config=config)
        try:
            result = await orchestrator.run_pipeline({"batch_id": "slow",
                                                      "data_source": source.url()})
            assert result.status == "success", result.error
            assert fault.hits == 6
            folder = tmp_path / "out"
            await orchestrator.restore_batch("slow", folder)
            for key, data in objects.items():
                assert (folder / key).read_bytes() == data
        finally:
            await orchestrator.close()
            await cluster.close()


# -- from the command line -----------------------------------------------------------------


def cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "multicloud.ui.cli", *args], env=env,
                          cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


def config_dir(path: Path, replica_buckets: dict[str, Bucket]) -> Path:
    path.mkdir()
    stores = {cloud: bucket.url("{node}/") for cloud, bucket in replica_buckets.items()}
    (path / "cluster_config.yml").write_text(
        "nodes_per_cloud: {aws: 1, gcp: 1, azure: 1}\n"
        f"node_stores: {json.dumps(stores)}\n")
    (path / "ingestion_config.yml").write_text(f"chunk_size_mb: {CHUNK / 2**20}\n")
    (path / "distribution_config.yml").write_text("min_clouds: 3\n")
    return path


def test_wrong_credentials_are_one_line_exit_2_and_nothing_stored(
        tmp_path: Path, make_bucket: MakeBucket, replica_buckets: dict[str, Bucket]) -> None:
    source = make_bucket("az")
    fill(source, "")
    conf = config_dir(tmp_path / "conf", replica_buckets)
    env = dict(os.environ)
    good = env["AZURE_STORAGE_CONNECTION_STRING"]
    key = good.split("AccountKey=", 1)[1].split(";", 1)[0]
    wrong = "A" * 8 + key[8:]
    env["AZURE_STORAGE_CONNECTION_STRING"] = good.replace(key, wrong)
    ran = cli(["run", "--source", source.url(), "--batch-id", "denied", "--config-dir",
               str(conf), "--data-dir", str(tmp_path / "dd"), "--no-dashboard"], env, tmp_path)
    assert ran.returncode == 2, (ran.stdout, ran.stderr)
    lines = ran.stderr.strip().splitlines()
    assert len(lines) == 1, ran.stderr
    assert lines[0].startswith("error: "), ran.stderr
    # The first to ask (a node opening its bucket, or the source's listing) says so.
    assert "refused the credentials (HTTP 403)" in lines[0], lines[0]
    assert "az://" in lines[0], lines[0]
    assert wrong not in ran.stderr + ran.stdout
    assert key not in ran.stderr + ran.stdout
    batches = cli(["batches", "--data-dir", str(tmp_path / "dd")], env, tmp_path)
    assert "denied" not in batches.stdout
    for bucket in replica_buckets.values():  # not one replica written anywhere
        assert list(bucket.open().list()) == []


def test_secrets_stay_out_of_output_logs_and_json(
        tmp_path: Path, make_bucket: MakeBucket, replica_buckets: dict[str, Bucket]) -> None:
    source = make_bucket("s3")
    fill(source, "")
    conf = config_dir(tmp_path / "conf", replica_buckets)
    secret = "Sup3rSecretAccessKey-" + unique_name()  # moto takes any key
    env = {**os.environ, "AWS_SECRET_ACCESS_KEY": secret,
           "AWS_SESSION_TOKEN": "Tok3n-" + unique_name()}
    log = tmp_path / "events.log"
    ran = cli(["run", "--source", source.url(), "--batch-id", "s", "--config-dir", str(conf),
               "--data-dir", str(tmp_path / "dd"), "--json", "--log-file", str(log)],
              env, tmp_path)
    assert ran.returncode == 0, ran.stderr
    assert json.loads(ran.stdout)["status"] == "success"
    verify = cli(["verify", "s", "--data-dir", str(tmp_path / "dd"), "--json"], env, tmp_path)
    assert verify.returncode == 0, verify.stderr
    written = [ran.stdout, ran.stderr, verify.stdout, verify.stderr, log.read_text()]
    written += [p.read_bytes().decode("latin-1") for p in (tmp_path / "dd").rglob("*")
                if p.is_file()]
    for text in written:
        assert secret not in text
        assert env["AWS_SESSION_TOKEN"] not in text
    assert open_store(source.url()).head("top.jsonl").size == len(OBJECTS["top.jsonl"])


def test_s3_folder_markers_and_keys_that_are_not_paths(make_bucket: MakeBucket) -> None:
    import boto3  # the emulators extra: only this test writes raw keys

    source = make_bucket("s3")
    assert source.emulator is not None
    s3 = boto3.client("s3", endpoint_url=source.emulator.endpoint, region_name="us-east-1",
                      aws_access_key_id="test", aws_secret_access_key="test")
    for key, body in (("dir/", b""), ("dir/a.txt", b"a"), ("bad//key", b"x")):
        s3.put_object(Bucket=source.name, Key=key, Body=body)
    with pytest.raises(SourceError, match=r"empty, '\.' or '\.\.' segment"):
        survey_source(source.url())
    s3.delete_object(Bucket=source.name, Key="bad//key")
    survey = survey_source(source.url())
    assert [f.rel_path for f in survey.files] == ["dir/a.txt"]
    assert [s.path for s in survey.skipped] == ["dir"]

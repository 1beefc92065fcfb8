"""A node's chunk store and catalogue in a bucket (memory://), and how a node picks its store."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from multicloud.blob import TransformChain, check_blob
from multicloud.cloud import ObjectInfo, ObjectStore, open_store
from multicloud.cloud.objects import Buffer
from multicloud.core.config import ClusterConfig, ProcessingConfig
from multicloud.core.errors import (
    ChunkNotFound,
    CloudAuthError,
    CloudError,
    ConfigError,
    DiskFull,
    IntegrityError,
    InvalidChunkId,
    ObjectExists,
    StorageError,
)
from multicloud.core.types import Chunk
from multicloud.node.bucket_store import UNBOUNDED_FREE_BYTES, BucketChunkStore
from multicloud.node.catalog import CatalogStore
from multicloud.node.store import ChunkStore
from multicloud.node.stores import (
    NodeStore,
    catalog_for,
    check_distinct_stores,
    node_spec_for,
    open_node_store,
)

OWNER = "node aws-node-1"
KEY = bytes(range(32))


def blob_of(raw: bytes, *, encrypt: bool = False) -> tuple[str, bytes]:
    """(chunk id, a stored-form blob of raw); encrypted blobs differ on every call (nonce)."""
    chunk = Chunk(hashlib.sha256(raw).hexdigest(), "f.bin", 0, 0, len(raw), "aws")
    transforms = ["compress", "encrypt"] if encrypt else ["compress"]
    chain = TransformChain(ProcessingConfig.model_validate({"transforms": transforms}),
                           KEY if encrypt else None)
    blob, info = chain.apply(chunk, raw)
    return info.chunk_id, blob


ID_A, BLOB_A = blob_of(b"alpha " * 400)
ID_B, BLOB_B = blob_of(os.urandom(3000))


def fresh_url() -> str:
    """A memory:// URL no other test uses (memory stores live as long as the process)."""
    return f"memory://mc-test-{uuid.uuid4().hex[:12]}/node/"


@pytest.fixture
def url() -> str:
    return fresh_url()


@pytest.fixture
def store(url: str) -> BucketChunkStore:
    """An empty bucket store of node aws-node-1."""
    return BucketChunkStore.open(url, owner=OWNER)


def keys(url: str, prefix: str = "") -> list[str]:
    """Every key under the URL (relative to its prefix)."""
    return sorted(info.key for info in open_store(url).list(prefix))


# -- the basics -----------------------------------------------------------------------------


def test_put_get_round_trip_at_chunks_id(store: BucketChunkStore, url: str) -> None:
    store.put(ID_A, BLOB_A)
    store.put(ID_B, memoryview(BLOB_B))
    assert store.get(ID_A) == BLOB_A
    assert isinstance(store.get(ID_B), bytes)
    assert store.get(ID_B) == BLOB_B
    assert store.exists(ID_A)
    assert store.exists(ID_B)
    assert (store.size(ID_A), store.size(ID_B)) == (len(BLOB_A), len(BLOB_B))
    assert keys(url) == sorted([f"chunks/{ID_A}", f"chunks/{ID_B}"])
    assert store.key_for(ID_A) == f"chunks/{ID_A}"
    assert store.root == url


def test_a_missing_object(store: BucketChunkStore) -> None:
    assert not store.exists(ID_A)
    assert store.size(ID_A) is None
    assert store.delete(ID_A) is False
    with pytest.raises(ChunkNotFound, match=f"chunk {ID_A} is not on {OWNER}$"):
        store.get(ID_A)
    with pytest.raises(ChunkNotFound, match=f"chunk {ID_A} is not on {OWNER}$"):
        store.corrupt(ID_A, 3)


@pytest.mark.parametrize("bad", ["", "abc", "A" * 64, "../" + "a" * 61, "g" * 64])
def test_invalid_ids_are_refused(store: BucketChunkStore, bad: str, url: str) -> None:
    for call in (lambda: store.put(bad, BLOB_A), lambda: store.get(bad),
                 lambda: store.exists(bad), lambda: store.delete(bad)):
        with pytest.raises(InvalidChunkId):
            call()
    assert keys(url) == []


def test_delete_and_usage(store: BucketChunkStore) -> None:
    assert store.usage() == (0, 0)
    store.put(ID_A, BLOB_A)
    store.put(ID_B, BLOB_B)
    assert store.usage() == (2, len(BLOB_A) + len(BLOB_B))
    assert (store.count, store.bytes) == store.usage()
    assert store.delete(ID_A) is True
    assert store.delete(ID_A) is False
    assert not store.exists(ID_A)
    assert store.usage() == (1, len(BLOB_B))


def test_usage_is_counted_from_one_listing_when_the_store_opens(
        store: BucketChunkStore, url: str) -> None:
    store.put(ID_A, BLOB_A)
    store.put(ID_B, BLOB_B)
    again = BucketChunkStore.open(url, owner=OWNER)
    assert again.usage() == (2, len(BLOB_A) + len(BLOB_B))


def test_inventory_and_describe_list_only_chunks(store: BucketChunkStore, url: str) -> None:
    store.put(ID_A, BLOB_A)
    store.put(ID_B, BLOB_B)
    raw = open_store(url)
    raw.put("chunks/not-a-chunk", b"x")
    raw.put(f"chunks/{ID_A}/nested", b"x")
    raw.put(f"elsewhere/{ID_B}", b"x")
    assert sorted(store.inventory()) == sorted([ID_A, ID_B])
    described = {c: (size, mtime) for c, size, mtime in store.describe()}
    assert set(described) == {ID_A, ID_B}
    assert described[ID_A][0] == len(BLOB_A)
    assert abs(described[ID_A][1] - time.time()) < 60
    # Strays are not replicas: the count at open ignores them too.
    assert BucketChunkStore.open(url).usage() == (2, len(BLOB_A) + len(BLOB_B))


def test_temp_files_and_partial_writes_are_no_ops(store: BucketChunkStore, url: str) -> None:
    store.put(ID_A, BLOB_A)
    assert store.write_partial("interrupted-write.partial", 1024) is None
    store.clear_temp_files()
    assert keys(url) == [f"chunks/{ID_A}"]


def test_disk_free_is_what_the_quota_leaves_else_unbounded(store: BucketChunkStore) -> None:
    assert store.disk_free() == UNBOUNDED_FREE_BYTES
    store.put(ID_A, BLOB_A)
    store.quota_bytes = store.bytes + 10
    assert store.disk_free() == 10
    store.quota_bytes = 0
    assert store.disk_free() == 0


# -- quota, conditional create, repair ------------------------------------------------------


def test_over_quota_is_disk_full_and_leaves_nothing(store: BucketChunkStore, url: str) -> None:
    store.put(ID_A, BLOB_A)
    store.quota_bytes = store.bytes  # the disk-full fault
    with pytest.raises(DiskFull, match=f"{OWNER} cannot write chunk {ID_B[:12]}.*quota"):
        store.put(ID_B, BLOB_B)
    assert keys(url) == [f"chunks/{ID_A}"]
    assert store.usage() == (1, len(BLOB_A))
    # A chunk already held is written in place: it takes no more room.
    store.put(ID_A, BLOB_A)
    assert store.usage() == (1, len(BLOB_A))
    store.quota_bytes = None
    store.put(ID_B, BLOB_B)
    assert store.exists(ID_B)


def test_an_existing_body_gives_way_to_what_the_write_acknowledges(url: str) -> None:
    """Two valid encodings of one chunk (another nonce, or another key after a rotation):
    the ack describes this write's blob, so that is what must be stored, as a rename on
    a disk would leave it; and the write refreshes the object's age for gc."""
    raw = b"the same chunk, encrypted twice " * 50
    chunk_id, first = blob_of(raw, encrypt=True)
    _, second = blob_of(raw, encrypt=True)
    assert first != second  # two valid encryptions of one chunk
    store = BucketChunkStore.open(url, owner=OWNER)
    store.put(chunk_id, first)
    before = open_store(url).head(f"chunks/{chunk_id}").mtime
    time.sleep(0.01)
    store.put(chunk_id, second)
    assert store.get(chunk_id) == second
    assert store.usage() == (1, len(second))
    assert open_store(url).head(f"chunks/{chunk_id}").mtime > before
    store.put(chunk_id, second)  # the same bytes again: still one object
    assert store.usage() == (1, len(second))


def test_a_damaged_existing_object_is_replaced(store: BucketChunkStore, url: str) -> None:
    open_store(url).put(f"chunks/{ID_A}", b"rot")
    reopened = BucketChunkStore.open(url, owner=OWNER)
    assert reopened.usage() == (1, 3)
    reopened.put(ID_A, BLOB_A)
    assert reopened.get(ID_A) == BLOB_A
    check_blob(reopened.get(ID_A), ID_A)
    assert reopened.usage() == (1, len(BLOB_A))


def test_a_blob_of_another_chunk_at_the_key_is_replaced(url: str) -> None:
    open_store(url).put(f"chunks/{ID_A}", BLOB_B)  # valid envelope, wrong chunk
    store = BucketChunkStore.open(url)
    store.put(ID_A, BLOB_A)
    assert store.get(ID_A) == BLOB_A


def test_corrupt_flips_one_byte_and_the_envelope_check_fails(store: BucketChunkStore) -> None:
    store.put(ID_A, BLOB_A)
    store.corrupt(ID_A, len(BLOB_A) + 5)  # offsets wrap around
    rotten = store.get(ID_A)
    assert len(rotten) == len(BLOB_A)
    assert sum(a != b for a, b in zip(rotten, BLOB_A, strict=True)) == 1
    with pytest.raises(IntegrityError):
        check_blob(rotten, ID_A)
    # Writing the chunk again repairs it.
    store.put(ID_A, BLOB_A)
    assert store.get(ID_A) == BLOB_A


# -- delete(older_than), the fsync observer, the hold_disk gate ------------------------------


def test_delete_older_than_uses_the_objects_mtime(store: BucketChunkStore) -> None:
    store.put(ID_A, BLOB_A)
    [(_, _, mtime)] = store.describe()
    assert store.delete(ID_A, older_than=mtime) is False  # written at that time: kept
    assert store.delete(ID_A, older_than=mtime - 60) is False
    assert store.exists(ID_A)
    assert store.delete(ID_A, older_than=mtime + 1) is True
    assert not store.exists(ID_A)
    assert store.usage() == (0, 0)
    assert store.delete(ID_A, older_than=mtime + 1) is False


def test_every_durable_put_is_observed(store: BucketChunkStore) -> None:
    seen: list[float] = []
    store.observe_fsync(seen.append)
    store.put(ID_A, BLOB_A)
    assert len(seen) == 1
    assert seen[0] >= 0
    store.put(ID_A, BLOB_A)  # kept, and written again to refresh its age
    assert len(seen) == 2


def test_the_hold_disk_gate_stops_a_write_before_the_put(store: BucketChunkStore,
                                                         url: str) -> None:
    store.commit_gate = threading.Event()
    errors: list[BaseException] = []

    def write() -> None:
        try:
            store.put(ID_A, BLOB_A)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    writer = threading.Thread(target=write)
    writer.start()
    assert store.commit_held.wait(10)
    time.sleep(0.05)
    assert writer.is_alive()
    assert keys(url) == []  # nothing reached the bucket
    assert store.usage() == (0, 0)
    gate, store.commit_gate = store.commit_gate, None
    gate.set()
    writer.join(10)
    assert not writer.is_alive()
    assert errors == []
    assert store.get(ID_A) == BLOB_A
    assert store.usage() == (1, len(BLOB_A))


# -- failures of the store -------------------------------------------------------------------


class FailingStore(ObjectStore):
    """An ObjectStore whose every request fails with the given error."""

    def __init__(self, inner: ObjectStore, error: CloudError) -> None:
        super().__init__(inner.url, inner.options)
        self.inner = inner
        self.error: CloudError | None = None
        self.armed = error

    def _maybe_fail(self) -> None:
        if self.error is not None:
            raise self.error

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        self._maybe_fail()
        return self.inner.list(prefix)

    def head(self, key: str) -> ObjectInfo:
        self._maybe_fail()
        return self.inner.head(key)

    def get(self, key: str, start: int = 0, end: int | None = None, *,
            version: str | None = None) -> Buffer:
        self._maybe_fail()
        return self.inner.get(key, start, end, version=version)

    def put(self, key: str, data: Buffer, *, create_only: bool = False) -> ObjectInfo:
        self._maybe_fail()
        return self.inner.put(key, data, create_only=create_only)

    def put_parts(self, key: str, parts: Iterable[Buffer]) -> ObjectInfo:
        self._maybe_fail()
        return self.inner.put_parts(key, parts)

    def delete(self, key: str) -> None:
        self._maybe_fail()
        self.inner.delete(key)


@pytest.mark.parametrize("error", [CloudError("s3://b/k: the store failed after retries: 503"),
                                   CloudAuthError("s3://b/k: the store refused the credentials")],
                         ids=["cloud", "auth"])
def test_store_failures_name_the_node_and_keep_their_kind(url: str, error: CloudError) -> None:
    failing = FailingStore(open_store(url), error)
    store = BucketChunkStore(failing, owner=OWNER)
    store.put(ID_A, BLOB_A)
    failing.error = failing.armed
    calls: list[tuple[str, Any]] = [
        ("write chunk", lambda: store.put(ID_B, BLOB_B)),
        ("read chunk", lambda: store.get(ID_A)),
        ("look up chunk", lambda: store.exists(ID_A)),
        ("look up chunk", lambda: store.delete(ID_A)),
        ("list its chunks", lambda: list(store.inventory())),
        ("list its chunks", store.describe),
    ]
    for what, call in calls:
        with pytest.raises(type(error)) as caught:
            call()
        assert str(caught.value).startswith(f"{OWNER} cannot {what}"), caught.value
        assert str(error) in str(caught.value)
        assert isinstance(caught.value, StorageError)
    assert store.usage() == (1, len(BLOB_A))
    with pytest.raises(type(error), match=f"{OWNER} cannot open its chunk store {url}"):
        BucketChunkStore(failing, owner=OWNER)


# -- the catalogue in the bucket ------------------------------------------------------------


def entry(batch_id: str, updated_at: float, **fields: Any) -> dict[str, Any]:
    return {"batch_id": batch_id, "status": "success", "manifest_object": ID_A,
            "updated_at": updated_at, **fields}


def test_a_bucket_catalog_keeps_the_newest_entry_and_tombstones(url: str) -> None:
    catalog = CatalogStore(open_store(url), owner=OWNER)
    assert catalog.dir is None
    assert catalog.entries() == []
    assert catalog.put(entry("b", 1.0))
    assert catalog.put(entry("kept", 1.0))
    assert catalog.put(entry("b", 2.0, manifest_object=ID_B))
    assert not catalog.put(entry("b", 2.0))  # equally old: ignored
    assert catalog.put({"batch_id": "b", "status": "deleted", "updated_at": 3.0})
    assert not catalog.put(entry("b", 2.5))  # a lagging node cannot bring it back
    found = {e["batch_id"]: e for e in catalog.entries()}
    assert found == {"b": {"batch_id": "b", "status": "deleted", "updated_at": 3.0},
                     "kept": entry("kept", 1.0)}
    names = keys(url)
    assert len(names) == 2
    assert all(k.startswith("catalog/") and k.endswith(".json") for k in names)
    # Another store on the same prefix (the node's machine replaced) sees them all.
    assert len(CatalogStore(open_store(url)).entries()) == 2


def test_a_damaged_bucket_entry_is_ignored_and_overwritten(url: str) -> None:
    catalog = CatalogStore(open_store(url), owner=OWNER)
    assert catalog.put(entry("b", 5.0))
    [key] = keys(url, "catalog/")
    open_store(url).put(key, b"{not json")
    open_store(url).put("catalog/README", b"not an entry")
    assert catalog.entries() == []
    assert catalog.put(entry("b", 1.0))
    assert catalog.entries() == [entry("b", 1.0)]


class RacingStore(FailingStore):
    """A store where another writer creates the entry between our read and our create."""

    def __init__(self, inner: ObjectStore, rival: bytes) -> None:
        super().__init__(inner, CloudError("unused"))
        self.rival = rival

    def put(self, key: str, data: Buffer, *, create_only: bool = False) -> ObjectInfo:
        if create_only and self.rival:
            self.inner.put(key, self.rival)
            self.rival = b""
            raise ObjectExists(f"{key}: already exists")
        return self.inner.put(key, data, create_only=create_only)


@pytest.mark.parametrize(("rival_at", "kept"), [(9.0, False), (1.0, True)],
                         ids=["rival-newer", "rival-older"])
def test_a_create_that_loses_a_race_compares_again(url: str, rival_at: float,
                                                   kept: bool) -> None:
    rival = json.dumps(entry("b", rival_at, who="rival")).encode()
    catalog = CatalogStore(RacingStore(open_store(url), rival), owner=OWNER)
    assert catalog.put(entry("b", 5.0)) is kept
    [found] = CatalogStore(open_store(url)).entries()
    assert found["updated_at"] == (5.0 if kept else 9.0)


def test_bucket_catalog_failures_name_the_node(url: str) -> None:
    failing = FailingStore(open_store(url), CloudAuthError("memory://x: refused"))
    catalog = CatalogStore(failing, owner=OWNER)
    failing.error = failing.armed
    with pytest.raises(CloudAuthError, match=f"{OWNER} cannot record batch 'b'"):
        catalog.put(entry("b", 1.0))
    with pytest.raises(CloudAuthError, match=f"{OWNER} cannot list its catalog"):
        catalog.entries()


# -- choosing a node's store ------------------------------------------------------------------


def test_open_node_store_picks_a_bucket_or_the_local_disk(tmp_path: Path) -> None:
    bucket = f"mc-test-{uuid.uuid4().hex[:8]}"
    config = ClusterConfig(node_stores={"aws": f"memory://{bucket}/{{node}}/"},
                           nodes_per_cloud={"aws": 1, "gcp": 1})
    aws, gcp = config.node_specs()
    in_bucket = open_node_store(aws, config, tmp_path)
    on_disk = open_node_store(gcp, config, tmp_path, fsync=False)
    assert isinstance(in_bucket, BucketChunkStore)
    assert in_bucket.root == f"memory://{bucket}/aws-node-1/"
    assert in_bucket.owner == "node aws-node-1"
    assert isinstance(on_disk, ChunkStore)
    assert on_disk.root == tmp_path / "nodes" / "gcp-node-1"
    assert isinstance(open_node_store(aws, None, tmp_path), ChunkStore)
    # The catalogue goes where the replicas are.
    stores: list[NodeStore] = [in_bucket, on_disk]
    bucket_catalog, disk_catalog = (catalog_for(s, "node x") for s in stores)
    assert bucket_catalog.dir is None
    assert bucket_catalog.put(entry("b", 1.0))
    assert keys(f"memory://{bucket}/aws-node-1/", "catalog/") != []
    assert disk_catalog.dir == tmp_path / "nodes" / "gcp-node-1" / "catalog"


def test_a_nodes_own_store_wins_and_unknown_nodes_get_their_clouds(tmp_path: Path) -> None:
    config = ClusterConfig.model_validate({
        "node_stores": {"aws": "memory://mc-cloud/{node}/"},
        "nodes": [{"id": "special", "cloud": "aws", "region": "us-east-1",
                   "store": "memory://mc-own/x/"}]})
    assert node_spec_for(config, "special", "aws", "us-east-1").store == "memory://mc-own/x/"
    named = node_spec_for(config, "aws-node-9", "aws", "us-west-2")
    assert (named.id, named.cloud, named.region) == ("aws-node-9", "aws", "us-west-2")
    assert config.store_of(named) == "memory://mc-cloud/aws-node-9/"
    with pytest.raises(ConfigError, match="Bad_Id"):
        node_spec_for(config, "Bad_Id", "aws", "us-east-1")


def test_two_nodes_on_one_prefix_are_refused() -> None:
    # node_stores without {node} is refused by the config itself; two explicit nodes
    # given one store are caught here.
    config = ClusterConfig(nodes=[
        {"id": "aws-node-1", "cloud": "aws", "region": "us-east-1",
         "store": "memory://mc-shared/"},
        {"id": "aws-node-2", "cloud": "aws", "region": "us-east-1",
         "store": "memory://mc-shared/"}])
    with pytest.raises(ConfigError, match="aws-node-1 and aws-node-2 both keep"):
        check_distinct_stores(config.node_specs(), config)
    fine = ClusterConfig(node_stores={"aws": "memory://mc-shared/{node}/"},
                         nodes_per_cloud={"aws": 2, "gcp": 1})
    check_distinct_stores(fine.node_specs(), fine)

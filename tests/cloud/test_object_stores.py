"""One contract, four stores: memory://, S3 (moto), GCS (gcp-storage-emulator) and Azure
Blob (azurite), each reached through `open_store(url)` as the product reaches them.

gcp-storage-emulator ignores ifGenerationMatch, which real GCS enforces. For gs:// the
tests of version pinning and create-only writes therefore put the fault proxy between
client and emulator and let it answer 412 to exactly the request that carries the
precondition real GCS would refuse: that proves the client sends the precondition and maps
GCS's answer, rather than skipping the case.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cloud_support import Bucket, MakeBucket, proxied, unique_name

from multicloud.cloud import open_store
from multicloud.core.errors import (
    CloudAuthError,
    CloudError,
    ObjectChanged,
    ObjectExists,
    ObjectMissing,
)

MiB = 1024 * 1024

ODD_KEYS = {
    "top.txt": b"top level\n",
    "nested/deeper/still/blob.bin": bytes(range(256)) * 40,
    "with space/caf\u00e9 \u00fcml\u00e4ut.csv": b"a,b\n1,2\n",
    "\u65e5\u672c/\u30c7\u30fc\u30bf \u2603.bin": "snow \u2603".encode(),
    "nested/empty": b"",
}


def test_nested_prefixes_odd_keys_and_an_empty_object(bucket: Bucket) -> None:
    store = bucket.open("base/dir/")
    for key, data in ODD_KEYS.items():
        info = store.put(key, data)
        assert (info.key, info.size) == (key, len(data))
        assert info.version
    for key, data in ODD_KEYS.items():
        assert bytes(store.get(key)) == data
        head = store.head(key)
        assert (head.key, head.size) == (key, len(data))
        assert head.version
        assert head.mtime > 0
    listed = list(store.list())
    assert sorted(info.key for info in listed) == sorted(ODD_KEYS)
    assert {info.key: info.size for info in listed} == {k: len(v) for k, v in ODD_KEYS.items()}
    assert sorted(info.key for info in store.list("nested/")) == [
        "nested/deeper/still/blob.bin", "nested/empty"]
    assert list(store.list("nothing-here/")) == []
    # A prefix names a directory: "nested" lists what is in nested/, not "nested-not".
    store.put("nested-not/x", b"")
    assert sorted(info.key for info in store.list("nested")) == [
        "nested/deeper/still/blob.bin", "nested/empty"]
    assert [info.key for info in store.list("nested/deeper")] == [
        "nested/deeper/still/blob.bin"]
    store.delete("nested-not/x")
    # The same objects seen from the bucket's root carry the full key; a sibling prefix
    # that merely starts alike ("base/dir-2/") is not under "base/dir/".
    bucket.open("base/dir-2/").put("other", b"x")
    root_keys = sorted(info.key for info in bucket.open().list())
    assert root_keys == sorted(["base/dir-2/other", *(f"base/dir/{k}" for k in ODD_KEYS)])
    assert len(list(store.list())) == len(ODD_KEYS)
    assert bytes(bucket.open("base/").get("dir/top.txt")) == ODD_KEYS["top.txt"]


def test_ranged_gets(bucket: Bucket) -> None:
    store = bucket.open("r/")
    data = random.Random(1).randbytes(10_000)
    store.put("blob", data)
    assert bytes(store.get("blob", 0, 10)) == data[:10]
    assert bytes(store.get("blob", 9_990)) == data[9_990:]
    assert bytes(store.get("blob", 1234, 5678)) == data[1234:5678]
    assert bytes(store.get("blob", 9_999, 10_000)) == data[-1:]
    assert bytes(store.get("blob", 5_000, 50_000)) == data[5_000:]  # clipped at the end
    assert bytes(store.get("blob", 7, 7)) == b""
    assert bytes(store.get("blob", 7, 3)) == b""
    store.put("empty", b"")
    assert bytes(store.get("empty")) == b""


def test_a_pinned_version_is_that_version_or_object_changed(bucket: Bucket) -> None:
    store = bucket.open("v/")
    first = store.put("obj", b"version one")
    old = store.head("obj").version
    assert old is not None
    assert first.version == old
    assert bytes(store.get("obj", version=old)) == b"version one"
    assert bytes(store.get("obj", 0, 7, version=old)) == b"version"
    store.put("obj", b"version two!")
    new = store.head("obj").version
    assert new is not None
    assert new != old
    assert bytes(store.get("obj", version=new)) == b"version two!"
    assert bytes(store.get("obj", 8, version=new)) == b"two!"
    # An empty range reads nothing but still proves the version.
    assert bytes(store.get("obj", 3, 3, version=new)) == b""
    with pytest.raises(ObjectChanged):
        store.get("obj", 3, 3, version=old)
    if bucket.kind != "gs":
        with pytest.raises(ObjectChanged) as caught:
            store.get("obj", version=old)
        assert str(bucket.url("v/obj")) in str(caught.value)
        with pytest.raises(ObjectChanged):
            store.get("obj", 0, 4, version=old)
        return
    # gs: the emulator does not enforce ifGenerationMatch; real GCS answers 412 to a read
    # pinned to a generation that is gone, which the proxy plays.
    with proxied(bucket, "v/") as (proxy, through):
        fault = proxy.fail_when(lambda seen: seen.param("ifGenerationMatch") == old, 412)
        with pytest.raises(ObjectChanged) as caught:
            through.get("obj", version=old)
        assert bucket.url("v/obj") in str(caught.value)
        with pytest.raises(ObjectChanged):
            through.get("obj", 0, 4, version=old)
        assert fault.hits == 2
        assert bytes(through.get("obj", version=new)) == b"version two!"
        pinned = [s for s in proxy.requests("GET") if s.param("alt") == "media"]
        assert [s.param("ifGenerationMatch") for s in pinned] == [old, old, new]


def test_create_only_never_replaces(bucket: Bucket) -> None:
    store = bucket.open("c/")
    info = store.put("once", b"original", create_only=True)
    assert info.size == len(b"original")
    if bucket.kind == "gs":
        # The emulator would let the second write through; real GCS answers 412 to a
        # create-only write (ifGenerationMatch=0) over an existing object.
        with proxied(bucket, "c/") as (proxy, through):
            fault = proxy.fail_when(lambda seen: seen.param("ifGenerationMatch") == "0", 412)
            with pytest.raises(ObjectExists) as caught:
                through.put("once", b"replacement", create_only=True)
            assert fault.hits == 1
            through.put("plain", b"overwrite allowed")  # no precondition on a plain put
            assert fault.hits == 1
    else:
        with pytest.raises(ObjectExists) as caught:
            store.put("once", b"replacement", create_only=True)
    assert "c/once" in str(caught.value)
    assert bytes(store.get("once")) == b"original"
    store.put("once", b"overwritten")  # without create_only the write goes through
    assert bytes(store.get("once")) == b"overwritten"


def test_put_parts_streams_a_multipart_object_byte_exact(bucket: Bucket) -> None:
    store = bucket.open("p/")
    rng = random.Random(20)
    parts = [rng.randbytes(MiB) for _ in range(20)]
    digest = hashlib.sha256(b"".join(parts)).hexdigest()
    info = store.put_parts("big.bin", iter(parts))
    assert (info.key, info.size) == ("big.bin", 20 * MiB)
    assert store.head("big.bin").size == 20 * MiB
    assert hashlib.sha256(store.get("big.bin")).hexdigest() == digest
    assert bytes(store.get("big.bin", 8 * MiB - 3, 8 * MiB + 3)) == parts[7][-3:] + parts[8][:3]
    # Small and empty streams too (one short request, and none at all).
    assert store.put_parts("small", [b"ab", memoryview(b"cd"), b""]).size == 4
    assert bytes(store.get("small")) == b"abcd"
    assert store.put_parts("none", []).size == 0
    assert bytes(store.get("none")) == b""


def test_put_parts_whose_iterator_raises_leaves_nothing(bucket: Bucket) -> None:
    store = bucket.open("f/")
    store.put("kept", b"the old object")

    def parts(key_note: str) -> Iterator[bytes]:
        yield b"x" * (5 * MiB)  # past one multipart part on S3 (5 MiB) ...
        yield b"y" * (4 * MiB)  # ... and one resumable chunk on GCS (8 MiB)
        raise RuntimeError(f"boom while reading {key_note}")

    for key in ("fresh", "kept"):
        # The caller's own exception (obstore wraps it in a CloudError naming it).
        with pytest.raises((RuntimeError, CloudError)) as caught:
            store.put_parts(key, parts(key))
        assert f"boom while reading {key}" in str(caught.value)
    with pytest.raises(ObjectMissing):
        store.head("fresh")
    assert bytes(store.get("kept")) == b"the old object"
    assert [info.key for info in store.list()] == ["kept"]


def test_delete_twice_and_missing_objects(bucket: Bucket) -> None:
    store = bucket.open("d/")
    store.put("gone", b"soon")
    store.delete("gone")
    store.delete("gone")
    store.delete("never-was")
    for call in (lambda: store.head("gone"), lambda: store.get("gone"),
                 lambda: store.get("gone", 0, 2)):
        with pytest.raises(ObjectMissing) as caught:
            call()
        assert f"{bucket.url('d/gone')}" in str(caught.value)
    # Pinned to a version, a missing object is also no longer that version: azurite
    # answers If-Match on a missing blob with 412, the others with 404.
    with pytest.raises((ObjectMissing, ObjectChanged)):
        store.get("gone", version=store_version(bucket))
    assert list(store.list()) == []


@pytest.mark.parametrize("kind", ["s3", "gs", "az"])
def test_a_missing_bucket_is_named_in_the_error(kind: str, make_bucket: MakeBucket) -> None:
    make_bucket(kind)  # the environment points at the emulators
    missing = f"{kind}://{unique_name('nope')}/pre/"
    store = open_store(missing)
    for call in (lambda: list(store.list()), lambda: store.put("k", b"v"),
                 lambda: store.head("k"), lambda: store.get("k")):
        with pytest.raises(CloudError) as caught:
            call()
        message = str(caught.value)
        assert missing in message
        assert "\n" not in message
        assert isinstance(caught.value, ObjectMissing) or "bucket" in message.lower() \
            or "container" in message.lower(), message


def store_version(bucket: Bucket) -> str:
    """A version string of the bucket's kind (a generation on GCS, an ETag elsewhere)."""
    return "1700000000000000" if bucket.kind == "gs" else '"0x8DC0000000000000"'


def test_a_store_is_shared_between_threads(bucket: Bucket) -> None:
    store = bucket.open("threads/")

    def round_trip(i: int) -> bytes:
        data = f"object {i}".encode() * (i + 1)
        store.put(f"k{i:03d}", data)
        return bytes(store.get(f"k{i:03d}"))

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(round_trip, range(40)))
    assert results == [f"object {i}".encode() * (i + 1) for i in range(40)]
    assert len(list(store.list())) == 40


def test_a_memory_listing_of_thousands_streams_in_order() -> None:
    store = open_store(f"memory://{unique_name()}/many/")
    keys = [f"k{i:05d}" for i in range(2500)]
    for key in keys:
        store.put(key, b"")
    listing = store.list()
    assert next(listing).key == "k00000"
    assert [info.key for info in listing] == keys[1:]
    assert list(store.list("k01")) == []  # a prefix is a directory, not a name's start


def test_an_s3_listing_of_more_than_a_page_is_fetched_page_by_page(
        make_bucket: MakeBucket) -> None:
    bucket = make_bucket("s3")
    count = 1001  # one more than a page
    store = bucket.open("many/")
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: store.put(f"k{i:05d}", b"."), range(count)))
    with proxied(bucket, "many/") as (proxy, through):
        listing = through.list()
        first = next(listing)
        assert first.key == "k00000"
        lists = [s for s in proxy.requests("GET") if s.param("list-type") == "2"]
        assert len(lists) == 1  # streamed: the second page is not asked for yet
        rest = [info.key for info in listing]
        assert rest == [f"k{i:05d}" for i in range(1, count)]
        lists = [s for s in proxy.requests("GET") if s.param("list-type") == "2"]
        assert len(lists) == 2
        assert lists[0].param("continuation-token") is None
        assert lists[1].param("continuation-token")


def test_a_gcs_listing_asks_for_pages_of_a_thousand(make_bucket: MakeBucket) -> None:
    # gcp-storage-emulator answers every listing in one page, so only the request is
    # checked here; the paging itself is google's iterator following nextPageToken.
    bucket = make_bucket("gs")
    bucket.open("l/").put("a", b"1")
    with proxied(bucket, "l/") as (proxy, through):
        assert [info.key for info in through.list()] == ["a"]
        (listing,) = [s for s in proxy.requests("GET") if s.path.endswith("/o")]
        assert listing.param("maxResults") == "1000"
        assert listing.param("prefix") == "l/"


def test_s3_credentials_come_from_a_profile_when_the_environment_has_none(
        monkeypatch: pytest.MonkeyPatch, make_bucket: MakeBucket, tmp_path: Path) -> None:
    bucket = make_bucket("s3")
    bucket.open().put("k", b"v")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    credentials = tmp_path / "credentials"
    credentials.write_text("[default]\naws_access_key_id = nobody\n\n"
                           "[bench]\naws_access_key_id = test\naws_secret_access_key = test\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    monkeypatch.setenv("AWS_PROFILE", "bench")
    assert bytes(bucket.open().get("k")) == b"v"
    monkeypatch.setenv("AWS_PROFILE", "missing")  # no such profile, no role: one clear line
    with pytest.raises(CloudAuthError, match="no AWS credentials found: set AWS_ACCESS_KEY_ID"):
        bucket.open().get("k")

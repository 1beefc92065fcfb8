"""Bucket URLs: every form users paste parses to one canonical StoreUrl; bad ones say why."""

from __future__ import annotations

import pytest

from multicloud.cloud import StoreUrl, is_store_url, parse_store_url
from multicloud.core.errors import ConfigError


@pytest.mark.parametrize(("text", "expected"), [
    ("s3://bucket/prefix/", StoreUrl("s3", "bucket", "prefix/")),
    ("s3://bucket", StoreUrl("s3", "bucket", "")),
    ("s3a://bucket/a/b", StoreUrl("s3", "bucket", "a/b/")),
    ("gs://bucket/prefix/", StoreUrl("gs", "bucket", "prefix/")),
    ("gcs://bucket/x/y/", StoreUrl("gs", "bucket", "x/y/")),
    ("az://container/prefix/", StoreUrl("az", "container", "prefix/")),
    ("azure://container/", StoreUrl("az", "container", "")),
    ("abfs://container@account1.dfs.core.windows.net/path/to",
     StoreUrl("az", "container", "path/to/", "account1")),
    ("abfss://container@account1.dfs.core.windows.net/",
     StoreUrl("az", "container", "", "account1")),
    ("https://account1.blob.core.windows.net/container/prefix/",
     StoreUrl("az", "container", "prefix/", "account1")),
    ("https://account1.blob.core.windows.net/container",
     StoreUrl("az", "container", "", "account1")),
    ("memory://name/prefix/", StoreUrl("memory", "name", "prefix/")),
    ("  S3://bucket//a//./b/  ", StoreUrl("s3", "bucket", "a/b/")),
    ("gs://bucket/with%20space/caf%C3%A9/", StoreUrl("gs", "bucket", "with space/café/")),
])
def test_every_documented_form_parses(text: str, expected: StoreUrl) -> None:
    parsed = parse_store_url(text)
    assert parsed == expected
    assert is_store_url(text.strip())
    # The canonical form parses back to the same store (the account aside: it lives in
    # the URL's host, which the canonical az:// form leaves to the environment).
    again = parse_store_url(str(parsed))
    assert (again.scheme, again.bucket, again.prefix) == (parsed.scheme, parsed.bucket,
                                                          parsed.prefix)


def test_canonical_form_root_and_cloud() -> None:
    url = parse_store_url("gcs://logs/2026/nov")
    assert str(url) == "gs://logs/2026/nov/"
    assert url.store_root == "gs://logs/"
    assert url.cloud == "gcp"
    assert parse_store_url("s3a://b/").cloud == "aws"
    assert parse_store_url("abfs://c@acct1.dfs.core.windows.net/").cloud == "azure"


@pytest.mark.parametrize(("text", "hint"), [
    ("ftp://bucket/x", "s3://bucket/prefix"),
    ("s3://", "name a bucket"),
    ("s3:///prefix", "name a bucket"),
    ("s3://user@bucket/x", "name a bucket"),
    ("gs://bucket:99/x", "name a bucket"),
    ("abfs://container@example.com/x", "abfs://container@account"),
    ("abfs://@acct1.dfs.core.windows.net/x", "abfs://container@account"),
    ("https://acct1.blob.core.windows.net/", "names its container"),
    ("https://example.com/bucket/x", "s3://bucket/prefix"),
    ("s3://bucket/a/../b", "'..'"),
])
def test_bad_urls_say_what_is_accepted(text: str, hint: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_store_url(text)
    assert hint in str(caught.value)


@pytest.mark.parametrize("text", ["/data/exports", "relative/dir", "C:data", "./s3:/x"])
def test_local_paths_are_not_store_urls(text: str) -> None:
    assert not is_store_url(text)


def test_child_and_relative() -> None:
    url = parse_store_url("s3://b/restores/")
    child = url.child("nov/2026")
    assert child == StoreUrl("s3", "b", "restores/nov/2026/")
    assert str(child) == "s3://b/restores/nov/2026/"
    assert url.child("") == url
    assert url.key("a/b.bin") == "restores/a/b.bin"
    assert url.relative("restores/a/b.bin") == "a/b.bin"
    assert url.relative("elsewhere/x") == "elsewhere/x"  # not under the prefix: as it is
    root = parse_store_url("s3://b")
    assert root.relative("a/b") == "a/b"
    assert root.child("x/").prefix == "x/"
    azure = parse_store_url("https://acct1.blob.core.windows.net/c/p/")
    assert azure.child("q").account == "acct1"
    with pytest.raises(ConfigError):
        url.child("../escape")

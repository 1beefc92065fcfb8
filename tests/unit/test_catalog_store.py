"""A node's catalog of batches: one durable JSON entry per batch, the newest kept."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from multicloud.core.errors import StorageError
from multicloud.node.catalog import CatalogStore


def entry(batch_id: str, updated_at: float, **fields: Any) -> dict[str, Any]:
    """A committed batch's entry, as the catalogue publishes it."""
    return {"batch_id": batch_id, "status": "success", "manifest_object": "ab" * 32,
            "updated_at": updated_at, **fields}


def tombstone(batch_id: str, updated_at: float) -> dict[str, Any]:
    """What `Catalogue.forget` leaves for a deleted batch."""
    return {"batch_id": batch_id, "status": "deleted", "updated_at": updated_at}


def by_batch(store: CatalogStore) -> dict[str, dict[str, Any]]:
    """The store's entries by batch id (each batch must appear once)."""
    entries = store.entries()
    found = {e["batch_id"]: e for e in entries}
    assert len(found) == len(entries), entries
    return found


@pytest.fixture
def store(tmp_path: Path) -> CatalogStore:
    """An empty catalog under tmp_path/node (its directory not made yet)."""
    return CatalogStore(tmp_path / "node", owner="node aws-node-1")


def test_an_empty_catalog_lists_nothing(store: CatalogStore) -> None:
    assert not store.dir.exists()
    assert store.entries() == []


def test_put_then_list(store: CatalogStore) -> None:
    first = entry("b1", 10.0, holders=["aws-node-1", "gcp-node-2"], source="/data/é")
    assert store.put(first)
    assert store.put(entry("b2", 5))
    assert by_batch(store) == {"b1": first, "b2": entry("b2", 5)}
    assert store.dir == store.dir.parent / "catalog"
    assert len(list(store.dir.glob("*.json"))) == 2
    assert not [p for p in store.dir.iterdir() if not p.name.endswith(".json")]  # no temp


def test_entries_survive_a_new_store_on_the_same_root(tmp_path: Path) -> None:
    CatalogStore(tmp_path).put(entry("b", 1.0))
    assert CatalogStore(tmp_path).entries() == [entry("b", 1.0)]


def test_a_newer_entry_replaces_the_older(store: CatalogStore) -> None:
    assert store.put(entry("b", 1.0, manifest_object="11" * 32))
    assert store.put(entry("b", 2.0, manifest_object="22" * 32))
    assert by_batch(store) == {"b": entry("b", 2.0, manifest_object="22" * 32)}


def test_an_older_or_equally_old_entry_is_ignored(store: CatalogStore) -> None:
    assert store.put(entry("b", 2.0, manifest_object="22" * 32))
    assert not store.put(entry("b", 1.0, manifest_object="11" * 32))
    assert not store.put(entry("b", 2.0, manifest_object="33" * 32))
    assert by_batch(store) == {"b": entry("b", 2.0, manifest_object="22" * 32)}


def test_a_tombstone_replaces_the_batch_and_a_lagging_entry_cannot_bring_it_back(
        store: CatalogStore) -> None:
    assert store.put(entry("b", 1.0))
    assert store.put(entry("kept", 1.0))
    assert store.put(tombstone("b", 2.0))
    # A node that missed the delete publishes what it knew, from before it.
    assert not store.put(entry("b", 1.5))
    assert by_batch(store) == {"b": tombstone("b", 2.0), "kept": entry("kept", 1.0)}
    # Running the id again later (a new publish) is newer than the tombstone.
    assert store.put(entry("b", 3.0))
    assert by_batch(store)["b"]["status"] == "success"


def test_a_tombstone_for_an_unknown_batch_is_kept(store: CatalogStore) -> None:
    assert store.put(tombstone("never-seen", 1.0))
    assert not store.put(entry("never-seen", 0.5))
    assert store.entries() == [tombstone("never-seen", 1.0)]


@pytest.mark.parametrize("damage", [b"{not json", b"", b"[1, 2, 3]", b"\xff\xfe\x00"],
                         ids=["truncated", "empty", "not-an-object", "not-utf8"])
def test_a_damaged_entry_is_ignored_and_can_be_written_again(store: CatalogStore,
                                                             damage: bytes) -> None:
    assert store.put(entry("b", 5.0))
    assert store.put(entry("other", 1.0))
    [path] = [p for p in store.dir.glob("*.json") if "other" not in p.read_text()]
    path.write_bytes(damage)
    assert store.entries() == [entry("other", 1.0)]
    # The damaged entry does not block the batch: any newer or older one goes in.
    assert store.put(entry("b", 1.0))
    assert by_batch(store) == {"b": entry("b", 1.0), "other": entry("other", 1.0)}


def test_a_stray_file_in_the_catalog_dir_is_not_an_entry(store: CatalogStore) -> None:
    assert store.put(entry("b", 1.0))
    (store.dir / ".entry.leftover").write_text('{"batch_id": "ghost", "updated_at": 9}')
    (store.dir / "README").write_text("not an entry")
    assert store.entries() == [entry("b", 1.0)]


@pytest.mark.parametrize("bad", [
    {"updated_at": 1.0},
    {"batch_id": "", "updated_at": 1.0},
    {"batch_id": 7, "updated_at": 1.0},
    {"batch_id": "b"},
    {"batch_id": "b", "updated_at": "yesterday"},
    {"batch_id": "b", "updated_at": None},
], ids=["no-batch-id", "empty-batch-id", "batch-id-not-str", "no-updated-at",
        "updated-at-not-a-number", "updated-at-none"])
def test_a_malformed_entry_is_refused(store: CatalogStore, bad: dict[str, Any]) -> None:
    with pytest.raises(StorageError, match="batch_id and updated_at") as caught:
        store.put(bad)
    assert str(sorted(bad)) in str(caught.value)  # it names the fields it got
    assert store.entries() == []


def test_an_unwritable_catalog_is_a_storage_error_naming_the_node(tmp_path: Path) -> None:
    root = tmp_path / "node"
    root.mkdir()
    (root / "catalog").write_text("a file where the directory should be")
    store = CatalogStore(root, owner="node gcp-node-3")
    with pytest.raises(StorageError, match="node gcp-node-3 cannot record batch 'b'"):
        store.put(entry("b", 1.0))

"""Tests for the deterministic test-dataset generator."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import orjson
import pytest
import zstandard

from multicloud.core.errors import ConfigError, SourceError
from multicloud.datagen import DatasetSummary, generate_dataset

KIB = 1024
MIB = 1024 * 1024
SIZE = 3 * MIB
HINT = 256 * KIB
SEED = 7
LOG_FIELDS = {
    "ts", "trace_id", "span_id", "level", "service", "host", "user_id", "method", "path",
    "status", "message", "latency_ms",
}  # fmt: skip


def read_tree(root: Path) -> dict[str, bytes]:
    """Every file under `root`, by path relative to it."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[DatasetSummary, dict[str, bytes]]:
    """One 3 MiB dataset with 256 KiB chunks, shared by the read-only tests."""
    root = tmp_path_factory.mktemp("datagen") / "data"
    summary = generate_dataset(root, SIZE, seed=SEED, chunk_hint_bytes=HINT)
    return summary, read_tree(root)


def test_same_seed_gives_identical_files(
    tmp_path: Path, dataset: tuple[DatasetSummary, dict[str, bytes]]
) -> None:
    summary, files = dataset
    again = generate_dataset(tmp_path / "again", SIZE, seed=SEED, chunk_hint_bytes=HINT)
    assert read_tree(tmp_path / "again") == files
    assert again.by_kind == summary.by_kind


def test_different_seed_gives_different_files(
    tmp_path: Path, dataset: tuple[DatasetSummary, dict[str, bytes]]
) -> None:
    _, files = dataset
    generate_dataset(tmp_path / "other", SIZE, seed=SEED + 1, chunk_hint_bytes=HINT)
    other = read_tree(tmp_path / "other")
    # Not one non-empty file is shared, not merely the tree as a whole.
    assert not ({v for v in files.values() if v} & {v for v in other.values() if v})


def test_exactly_one_empty_file(dataset: tuple[DatasetSummary, dict[str, bytes]]) -> None:
    _, files = dataset
    assert [path for path, data in files.items() if not data] == ["misc/empty.txt"]


def test_every_jsonl_line_is_a_log_record(
    dataset: tuple[DatasetSummary, dict[str, bytes]],
) -> None:
    _, files = dataset
    logs = {path: data for path, data in files.items() if path.endswith(".jsonl")}
    assert len(logs) >= 3
    for path, data in logs.items():
        assert path.startswith("logs/2026/")
        assert data.endswith(b"\n"), path
        records = [orjson.loads(line) for line in data.split(b"\n")[:-1]]
        assert all(set(record) == LOG_FIELDS for record in records), path
        stamps = [record["ts"] for record in records]
        assert stamps == sorted(stamps), path
        month = path.split("/")[2]  # logs/2026/<month>/app-NNN.jsonl
        assert stamps[0].startswith(f"2026-{month}-"), path


def test_every_csv_row_has_the_header_field_count(
    dataset: tuple[DatasetSummary, dict[str, bytes]],
) -> None:
    _, files = dataset
    exports = {path: data for path, data in files.items() if path.endswith(".csv")}
    assert len(exports) >= 2
    for path, data in exports.items():
        assert data.endswith(b"\n"), path
        assert b'"' not in data, path
        rows = list(csv.reader(io.StringIO(data.decode())))
        assert rows[0][0] == "order_id", path
        assert {len(row) for row in rows} == {len(rows[0])}, path


def test_summary_matches_the_files_on_disk(
    dataset: tuple[DatasetSummary, dict[str, bytes]],
) -> None:
    summary, files = dataset
    by_suffix = {".jsonl": "jsonl", ".csv": "csv", ".bin": "binary", ".txt": "empty"}
    on_disk = dict.fromkeys(summary.by_kind, 0)
    for path, data in files.items():
        on_disk[by_suffix[Path(path).suffix]] += len(data)
    assert summary.files == len(files)
    assert summary.total_bytes == sum(len(data) for data in files.values()) == SIZE
    assert summary.by_kind == on_disk


def test_kinds_take_their_share_of_the_bytes(
    dataset: tuple[DatasetSummary, dict[str, bytes]],
) -> None:
    summary, _ = dataset
    assert summary.by_kind["jsonl"] / SIZE == pytest.approx(0.4, abs=0.02)
    assert summary.by_kind["csv"] / SIZE == pytest.approx(0.2, abs=0.02)
    assert summary.by_kind["binary"] / SIZE == pytest.approx(0.4, abs=0.02)


def test_file_sizes_straddle_the_chunk_hint(
    dataset: tuple[DatasetSummary, dict[str, bytes]],
) -> None:
    _, files = dataset
    sizes = [len(data) for data in files.values()]
    assert HINT in sizes
    assert HINT + 1 in sizes
    assert any(size > HINT + 1 for size in sizes)
    assert sum(1 for size in sizes if 0 < size < HINT) >= 3


def test_text_compresses_like_logs_and_blobs_do_not(
    dataset: tuple[DatasetSummary, dict[str, bytes]],
) -> None:
    _, files = dataset
    compressor = zstandard.ZstdCompressor(level=3)
    largest = {
        suffix: max((d for p, d in files.items() if p.endswith(suffix)), key=len)
        for suffix in (".jsonl", ".csv", ".bin")
    }
    for suffix in (".jsonl", ".csv"):
        ratio = len(largest[suffix]) / len(compressor.compress(largest[suffix]))
        assert 3 < ratio < 15, (suffix, ratio)
    blob = largest[".bin"]
    assert len(compressor.compress(blob)) >= len(blob)


@pytest.mark.parametrize(
    ("size", "hint"),
    [(MIB, 64 * KIB), (2 * MIB + 123, MIB), (3 * MIB + 7, 100 * KIB)],
)
def test_total_size_is_exact(tmp_path: Path, size: int, hint: int) -> None:
    summary = generate_dataset(tmp_path / "data", size, seed=1, chunk_hint_bytes=hint)
    sizes = [len(data) for data in read_tree(tmp_path / "data").values()]
    assert sum(sizes) == summary.total_bytes == size
    assert max(sizes) > hint  # size >= 2 * hint in every case here


def test_size_zero_writes_only_the_empty_file(tmp_path: Path) -> None:
    summary = generate_dataset(tmp_path / "data", 0)
    assert read_tree(tmp_path / "data") == {"misc/empty.txt": b""}
    assert (summary.files, summary.total_bytes) == (1, 0)


@pytest.mark.parametrize("size", [1, 500, 10 * KIB])
def test_small_sizes_still_work(tmp_path: Path, size: int) -> None:
    summary = generate_dataset(tmp_path / "data", size)
    files = read_tree(tmp_path / "data")
    assert sum(len(data) for data in files.values()) == summary.total_bytes == size
    assert files["misc/empty.txt"] == b""
    for path, data in files.items():
        if path.endswith(".jsonl"):
            assert all(orjson.loads(line) for line in data.split(b"\n")[:-1])


def test_an_existing_empty_directory_is_used(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    summary = generate_dataset(tmp_path / "data", 10 * KIB)
    assert summary.root == tmp_path / "data"
    assert summary.total_bytes == 10 * KIB


def test_refuses_a_non_empty_directory(tmp_path: Path) -> None:
    keep = tmp_path / "data" / "keep.txt"
    keep.parent.mkdir()
    keep.write_text("precious")
    with pytest.raises(SourceError, match="not empty") as info:
        generate_dataset(tmp_path / "data", 10 * KIB)
    assert str(tmp_path / "data") in str(info.value)
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["keep.txt"]
    assert keep.read_text() == "precious"


def test_refuses_a_file_as_destination(tmp_path: Path) -> None:
    (tmp_path / "data").write_text("not a directory")
    with pytest.raises(SourceError, match="not a directory"):
        generate_dataset(tmp_path / "data", 10 * KIB)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"size_bytes": -1}, "invalid dataset size -1"),
        ({"size_bytes": 10, "seed": -3}, "invalid seed -3"),
        ({"size_bytes": 10, "chunk_hint_bytes": 0}, "invalid chunk hint 0"),
    ],
)
def test_rejects_bad_arguments(tmp_path: Path, kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        generate_dataset(tmp_path / "data", **kwargs)
    assert not (tmp_path / "data").exists()

"""Where a batch's files come from: a local directory or file standing in for a bucket.

Cloud buckets (`s3://`, `gs://`) will sit behind the same `SourceFile` listing, chosen by
URL scheme; until they exist such a source is refused with a clear error.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from multicloud.core.errors import SourceError

_CLOUD_WORDS = {"aws": "aws", "s3": "aws", "gcp": "gcp", "gcs": "gcp", "gs": "gcp",
                "google": "gcp", "azure": "azure", "blob": "azure"}
_RECORD_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}


@dataclass(frozen=True, slots=True)
class SourceFile:
    """One file of a batch source."""

    rel_path: str  # relative to the source root, forward slashes
    path: Path  # absolute path to read from
    size: int
    # The file's bytes when they are in memory already (DataIngestionEngine.chunk_file):
    # chunks are cut from them instead of read from `path`.
    data: memoryview | None = field(default=None, compare=False, repr=False)

    @property
    def record_format(self) -> str | None:
        """"jsonl" or "csv" when the file's records can be validated, else None."""
        return _RECORD_FORMATS.get(self.path.suffix.lower())


def list_source(source: str | Path) -> list[SourceFile]:
    """Every regular file under source (or source itself), sorted by relative path."""
    text = str(source)
    if re.match(r"^[a-z][a-z0-9+.-]*://", text):
        scheme = text.split("://", 1)[0]
        raise SourceError(f"source {text}: {scheme}:// buckets are not supported yet; copy "
                          f"the objects to a local directory and pass its path")
    root = Path(source)
    if not root.exists():
        raise SourceError(f"source {root} does not exist: give an existing directory or file")
    if root.is_file():
        return [_describe(root, root.name)]
    if not root.is_dir():
        raise SourceError(f"source {root} is neither a regular file nor a directory")
    if not os.access(root, os.R_OK | os.X_OK):
        raise SourceError(f"source {root} is not readable (check its permissions)")
    files: list[SourceFile] = []

    def on_error(exc: OSError) -> None:
        raise SourceError(f"cannot list {exc.filename}: {exc.strerror}") from exc

    for dirpath, dirnames, filenames in os.walk(root, onerror=on_error):
        dirnames.sort()
        for name in filenames:
            path = Path(dirpath) / name
            if path.is_symlink() or not path.is_file():
                continue  # links and special files are not data; following them could escape
            files.append(_describe(path, path.relative_to(root).as_posix()))
    return sorted(files, key=lambda f: f.rel_path)


def _describe(path: Path, rel_path: str) -> SourceFile:
    if not os.access(path, os.R_OK):
        raise SourceError(f"source file {path} is not readable (check its permissions)")
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise SourceError(f"cannot stat source file {path}: {exc.strerror}") from exc
    return SourceFile(rel_path=rel_path, path=path.resolve(), size=size)


def infer_source_cloud(source: str | Path, default: str) -> str:
    """The cloud a source lives in, from words in its path (aws/s3, gcp/gcs, azure)."""
    text = str(source).lower()
    if text.startswith("s3://"):
        return "aws"
    if text.startswith("gs://"):
        return "gcp"
    # Only the last two path components name the bucket; words further up (a home
    # directory called aws-admin, a temp dir) say nothing about where the data lives.
    parts = [p for p in re.split(r"[/\\]+", text.rstrip("/\\")) if p not in ("", ".")]
    for part in reversed(parts[-2:]):
        for word in reversed(re.split(r"[^a-z0-9]+", part)):
            if word in _CLOUD_WORDS:
                return _CLOUD_WORDS[word]
    return default

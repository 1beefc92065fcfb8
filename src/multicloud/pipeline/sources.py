"""Where a batch's files come from: a local directory or file, or a bucket.

A bucket source (`s3://`, `gs://`, `az://` and the Azure https/abfs forms) is a
`BucketSource`: its listing is streamed page by page, never held whole, so it is walked
twice, once to learn what the batch is (count, bytes, fingerprint) and once to feed
ingestion; a listing that differs between the two walks is a source that changed during
the run. Each object becomes a `SourceFile` carrying a `SourceRef` (bucket, key, ETag or
generation): its bytes are read by a node in the bucket's cloud, never by this process.
Keys that cannot be file paths (directory markers ending in "/", "." or ".." segments)
are skipped and reported.

A listing keeps files as they are: names are the file system's bytes (a name that is not
UTF-8 carries surrogate escapes; `multicloud.core.units.display_path` shows it), regular
files carry their permission bits and modification time, and a symbolic link is listed as
a link (its target text, never its target's bytes) unless links are followed. FIFOs,
sockets and devices are not data: they are never opened (opening a FIFO blocks until a
writer comes) and are listed in `SourceListing.skipped` so the run can say what it left
out.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from multicloud.cloud import ObjectInfo, is_store_url, open_store, parse_store_url
from multicloud.core.config import StoreOptions
from multicloud.core.errors import CloudError, ConfigError, SourceChanged, SourceError
from multicloud.core.types import SourceRef
from multicloud.core.units import display_path

_CLOUD_WORDS = {"aws": "aws", "s3": "aws", "gcp": "gcp", "gcs": "gcp", "gs": "gcp",
                "google": "gcp", "azure": "azure", "blob": "azure"}
_RECORD_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}


@dataclass(frozen=True, slots=True)
class SourceFile:
    """One file of a batch source."""

    rel_path: str  # relative to the source root, forward slashes
    path: Path  # absolute path to read from
    size: int
    mode: int = 0o644  # permission bits
    mtime_ns: int = 0
    kind: str = "file"  # "file" or "symlink"
    link_target: str | None = None  # what a symlink points to, as written
    # The file's bytes when they are in memory already (DataIngestionEngine.chunk_file):
    # chunks are cut from them instead of read from `path`.
    data: memoryview | None = field(default=None, compare=False, repr=False)
    # An object in a bucket: a node of its cloud reads it (`path` is only its name).
    ref: SourceRef | None = None

    @property
    def record_format(self) -> str | None:
        """"jsonl" or "csv" when the file's records can be validated, else None."""
        return _RECORD_FORMATS.get(self.path.suffix.lower())


@dataclass(frozen=True, slots=True)
class SkippedEntry:
    """A directory entry a listing left out because it holds no data to store."""

    path: str  # relative to the source root, forward slashes, like SourceFile.rel_path
    kind: str  # "fifo", "socket", "char-device", "block-device", "broken-symlink", "other"
    reason: str  # one line for an operator


@dataclass(frozen=True, slots=True)
class SourceListing:
    """What `scan_source` found: the files to store, and the entries it left out."""

    files: list[SourceFile]  # sorted by rel_path
    skipped: list[SkippedEntry]  # sorted by path


def list_source(source: str | Path) -> list[SourceFile]:
    """Every regular file and symlink under source (or source itself), sorted by path."""
    return scan_source(source).files


def scan_source(source: str | Path, *, follow_symlinks: bool = False) -> SourceListing:
    """List source: regular files, symlinks (as links, or followed), and what was skipped.

    With follow_symlinks, a link to a regular file is listed as that file (its content)
    and a link to a directory is walked; a link back to a directory that contains it
    stays a link, so a loop ends. The source itself is always followed when it is a link.
    """
    text = str(source)
    if is_store_url(text):
        raise SourceError(f"source {text} is a bucket: list it with BucketSource")
    root = Path(source)
    shown = display_path(str(root))
    if not root.exists():
        raise SourceError(f"source {shown} does not exist: give an existing directory or file")
    if root.is_file():
        return SourceListing([_regular(root, root.name, root.stat())], [])
    if not root.is_dir():
        raise SourceError(f"source {shown} is neither a regular file nor a directory")
    if not os.access(root, os.R_OK | os.X_OK):
        raise SourceError(f"source {shown} is not readable (check its permissions)")
    walk = _Walk(follow_symlinks)
    real_root = root.stat()
    walk.run(root, (real_root.st_dev, real_root.st_ino))
    return SourceListing(sorted(walk.files, key=lambda f: f.rel_path),
                         sorted(walk.skipped, key=lambda s: s.path))


_Ancestors = tuple[tuple[int, int], ...]  # (st_dev, st_ino) of each directory above


class _Walk:
    """One walk of a source tree; lstat-based, so nothing is opened but regular files.

    Iterative (a stack of directories still to list), so a deep tree cannot exhaust
    Python's recursion limit.
    """

    def __init__(self, follow_symlinks: bool) -> None:
        self.follow = follow_symlinks
        self.files: list[SourceFile] = []
        self.skipped: list[SkippedEntry] = []
        self._todo: list[tuple[Path, str, _Ancestors]] = []

    def run(self, root: Path, root_key: tuple[int, int]) -> None:
        """List everything under root."""
        self._todo.append((root, "", (root_key,)))
        while self._todo:
            self._directory(*self._todo.pop())

    def _directory(self, path: Path, rel: str, ancestors: _Ancestors) -> None:
        try:
            with os.scandir(path) as it:
                entries = list(it)
        except OSError as exc:
            raise SourceError(f"cannot list {display_path(str(path))}: {exc.strerror}") from exc
        for entry in entries:
            entry_path = Path(entry.path)
            entry_rel = f"{rel}/{entry.name}" if rel else entry.name
            try:
                info = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # removed while we listed: it is not part of the batch
            except OSError as exc:
                raise SourceError(f"cannot stat {display_path(entry.path)}: "
                                  f"{exc.strerror}") from exc
            if stat.S_ISLNK(info.st_mode):
                self._link(entry_path, entry_rel, info, ancestors)
            elif stat.S_ISDIR(info.st_mode):
                self._todo.append((entry_path, entry_rel,
                                   (*ancestors, (info.st_dev, info.st_ino))))
            elif stat.S_ISREG(info.st_mode):
                self.files.append(_regular(entry_path, entry_rel, info))
            else:
                kind = _special_kind(info.st_mode)
                self.skipped.append(SkippedEntry(entry_rel, kind, f"a {kind} holds no data "
                                                                  f"to store; not read"))

    def _link(self, path: Path, rel: str, info: os.stat_result,
              ancestors: _Ancestors) -> None:
        """A symlink: kept as a link, or (following) listed as what it points to."""
        try:
            target_text = os.readlink(path)
        except OSError as exc:
            raise SourceError(f"cannot read the link {display_path(str(path))}: "
                              f"{exc.strerror}") from exc
        if not self.follow:
            self.files.append(_link(path, rel, info, target_text))
            return
        try:
            target = path.stat()  # follows the link, through any chain of links
        except OSError as exc:  # dangling, a loop of links (ELOOP), or no permission
            self.skipped.append(SkippedEntry(
                rel, "broken-symlink",
                f"symlink to {display_path(target_text)} cannot be followed: {exc.strerror}"))
            return
        if stat.S_ISREG(target.st_mode):
            self.files.append(_regular(path, rel, target))
        elif stat.S_ISDIR(target.st_mode):
            key = (target.st_dev, target.st_ino)
            if key in ancestors:
                # A link back up the tree would list it forever; kept as the link it is,
                # restore recreates the same loop. Only ancestors count: two links to one
                # directory elsewhere both give its files, which dedupe by chunk id.
                self.files.append(_link(path, rel, info, target_text))
            else:
                self._todo.append((path, rel, (*ancestors, key)))
        else:
            kind = _special_kind(target.st_mode)
            self.skipped.append(SkippedEntry(
                rel, kind, f"symlink to a {kind} ({display_path(target_text)}); not read"))


def _special_kind(mode: int) -> str:
    """The SkippedEntry kind of a file that is neither regular, a directory nor a link."""
    if stat.S_ISFIFO(mode):
        return "fifo"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode):
        return "char-device"
    if stat.S_ISBLK(mode):
        return "block-device"
    return "other"


def _regular(path: Path, rel_path: str, info: os.stat_result) -> SourceFile:
    """A regular file (info: its stat, through the link when one was followed)."""
    if not os.access(path, os.R_OK):
        raise SourceError(f"source file {display_path(str(path))} is not readable "
                          f"(check its permissions)")
    return SourceFile(rel_path=rel_path, path=path.resolve(), size=info.st_size,
                      mode=stat.S_IMODE(info.st_mode), mtime_ns=info.st_mtime_ns)


def _link(path: Path, rel_path: str, info: os.stat_result, target: str) -> SourceFile:
    """A symlink kept as a link: no bytes to read, its target text is the data."""
    # path stays the link's own (absolute, not resolved): nothing reads through it.
    return SourceFile(rel_path=rel_path, path=Path(os.path.abspath(path)), size=0,
                      mode=stat.S_IMODE(info.st_mode), mtime_ns=info.st_mtime_ns,
                      kind="symlink", link_target=target)


def infer_source_cloud(source: str | Path, default: str) -> str:
    """The cloud a source lives in: a bucket URL's, else from words in its path (aws/s3,
    gcp/gcs, azure)."""
    text = str(source).lower()
    if is_store_url(text):
        try:
            return parse_store_url(str(source)).cloud
        except ConfigError:
            return default
    # Only the last two path components name the bucket; words further up (a home
    # directory called aws-admin, a temp dir) say nothing about where the data lives.
    parts = [p for p in re.split(r"[/\\]+", text.rstrip("/\\")) if p not in ("", ".")]
    for part in reversed(parts[-2:]):
        for word in reversed(re.split(r"[^a-z0-9]+", part)):
            if word in _CLOUD_WORDS:
                return _CLOUD_WORDS[word]
    return default


class ListingHasher:
    """What a batch's content is, by its listing: names, sizes, modes, times, link targets
    (and an object's version), hashed as the listing streams by.

    Equal fingerprints mean the same batch (a rerun is a no-op, a crashed run resumes);
    like rsync and rclone, a file whose size and mtime did not change is taken as unchanged.
    The bytes hashed are those of one JSON list of the entries, so a local listing hashes
    the same whether it is hashed whole or file by file.
    """

    def __init__(self) -> None:
        self._digest = hashlib.sha256(b"[")
        self._first = True
        self.files = 0
        self.bytes = 0

    def add(self, entry: SourceFile) -> None:
        """Count one file of the listing (in listing order)."""
        item: list[object] = [entry.rel_path, entry.size, entry.mtime_ns, entry.mode,
                              entry.kind, entry.link_target]
        if entry.ref is not None:
            item.append(entry.ref.version)
        self._digest.update((b"" if self._first else b", ") + json.dumps(item).encode())
        self._first = False
        self.files += 1
        self.bytes += entry.size

    def hexdigest(self) -> str:
        """The fingerprint of what was added so far."""
        final = self._digest.copy()
        final.update(b"]")
        return final.hexdigest()


def source_fingerprint(files: Iterable[SourceFile]) -> str:
    """The fingerprint of a whole listing (see ListingHasher)."""
    hasher = ListingHasher()
    for entry in files:
        hasher.add(entry)
    return hasher.hexdigest()


_SKIPPED_KEPT = 1000  # skipped keys reported by name; more are only counted


class BucketSource:
    """The objects under a bucket URL, as SourceFiles a node of the bucket's cloud reads."""

    def __init__(self, url: str, options: StoreOptions | None = None) -> None:
        self.url = parse_store_url(url)
        self.options = options or StoreOptions()
        self.store = open_store(self.url, self.options)
        # What a node needs to reach the store besides credentials (never secrets).
        self._wire_options = self.options.model_dump(mode="json", exclude={"url"})

    @property
    def cloud(self) -> str:
        """The cloud the bucket lives in."""
        return self.url.cloud

    def survey(self) -> BatchSource:
        """Walk the listing once (count, bytes, fingerprint, the keys left out); the
        source's `files` walk it again, checked against this walk at their end."""
        hasher = ListingHasher()
        skipped: list[SkippedEntry] = []
        try:
            for entry in self.files(skipped):
                hasher.add(entry)
        except BaseException:
            self.store.close()
            raise
        if hasher.files == 0 and not skipped:
            self.store.close()
            raise SourceError(f"source {self.url} holds no objects: check the bucket and "
                              f"prefix")
        fingerprint = hasher.hexdigest()
        return BatchSource(_rewalk(self, fingerprint), hasher.files, hasher.bytes,
                           fingerprint, skipped)

    def files(self, skipped: list[SkippedEntry] | None = None) -> Iterator[SourceFile]:
        """Every object as a SourceFile, page by page; keys that cannot be file paths go
        to `skipped` (the first thousand of them).

        A key that other keys sit under ("logs" beside "logs/a.gz": a console's folder
        marker, whose trailing "/" the client drops) is a directory, not a file: it is
        held back until the listing has passed every key it could be the folder of.
        Keys come in ascending order, so only keys between "logs" and "logs/" (such as
        "logs-old") are seen while one is held.
        """
        held: list[ObjectInfo] = []
        for info in self._listing():
            while held and not info.key.startswith(held[-1].key + "/") \
                    and info.key > held[-1].key + "/":
                yield from self._entry(held.pop(), skipped)  # nothing can sit under it now
            for index, waiting in enumerate(held):
                if info.key.startswith(waiting.key + "/"):
                    self._skip(waiting.key, "a folder marker: other keys sit under it",
                               skipped)
                    del held[index]
                    break
            held.append(info)
        for info in held:
            yield from self._entry(info, skipped)

    def _listing(self) -> Iterator[ObjectInfo]:
        listing = self.store.list()
        while True:
            try:
                info = next(listing)
            except StopIteration:
                return
            except CloudError as exc:
                if "invalid path" in str(exc).lower():
                    raise SourceError(
                        f"cannot list the source: {self.url} holds a key with an empty, '.' "
                        f"or '..' segment (such as 'a//b'), which is not a file path; move "
                        f"it, or give a prefix that leaves it out") from None
                raise SourceError(f"cannot list the source: {exc}") from None
            yield info

    def _entry(self, info: ObjectInfo, skipped: list[SkippedEntry] | None,
               ) -> Iterator[SourceFile]:
        problem = _key_problem(info.key)
        if problem is None:
            yield self._file(info)
        else:
            self._skip(info.key, problem, skipped)

    @staticmethod
    def _skip(key: str, why: str, skipped: list[SkippedEntry] | None) -> None:
        if skipped is not None and len(skipped) < _SKIPPED_KEPT:
            skipped.append(SkippedEntry(key, "key", why))

    def _file(self, info: ObjectInfo) -> SourceFile:
        return SourceFile(rel_path=info.key, path=Path(info.key), size=info.size,
                          mtime_ns=int(info.mtime * 1e9),
                          ref=SourceRef(str(self.url), info.key, info.version,
                                        self._wire_options))


def _key_problem(key: str) -> str | None:
    """Why an object key cannot be restored as a file path, or None."""
    if key.endswith("/"):
        return "a directory marker (a key ending in '/') holds no file data"
    segments = key.split("/")
    if any(s in ("", ".", "..") for s in segments):
        return "a key with empty, '.' or '..' segments cannot be a file path"
    if "\0" in key:
        return "a key with a NUL character cannot be a file path"
    return None


@dataclass(frozen=True, slots=True)
class BatchSource:
    """A source as a run needs it: its files, what it adds up to, and its fingerprint.

    `files` is a list for a local source; for a bucket it walks the listing again as it
    is consumed (never held whole) and raises SourceChanged at its end when that walk
    did not find what the survey found.
    """

    files: Iterable[SourceFile]
    count: int
    total_bytes: int
    fingerprint: str
    skipped: list[SkippedEntry]


def canonical_source(source: str) -> str:
    """How a source is named in the manifest, events and messages: a bucket URL in its
    one canonical form (never a query), a path as given. SourceError for a bad URL."""
    if not is_store_url(source):
        return source
    try:
        return str(parse_store_url(source))
    except ConfigError as exc:
        raise SourceError(f"source: {exc}") from None


def survey_source(source: str, options: StoreOptions | None = None, *,
                  follow_symlinks: bool = False) -> BatchSource:
    """List a local or bucket source once (blocking): what a run of it will store."""
    if not is_store_url(source):
        listing = scan_source(source, follow_symlinks=follow_symlinks)
        return BatchSource(listing.files, len(listing.files),
                           sum(f.size for f in listing.files),
                           source_fingerprint(listing.files), listing.skipped)
    try:
        bucket = BucketSource(source, options)
    except ConfigError as exc:
        raise SourceError(f"source {source}: {exc}") from None
    return bucket.survey()


def _rewalk(bucket: BucketSource, fingerprint: str) -> Iterator[SourceFile]:
    """The bucket's files again, checked at the end against the survey's fingerprint;
    the listing's client is let go when the walk ends (or is abandoned)."""
    hasher = ListingHasher()
    try:
        for entry in bucket.files():
            hasher.add(entry)
            yield entry
    finally:
        bucket.store.close()
    if hasher.hexdigest() != fingerprint:
        raise SourceChanged(f"the objects under {bucket.url} changed during the run (added, "
                            f"removed or rewritten); run again to store them as they are now")

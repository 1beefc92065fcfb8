"""The demo on real object-store protocols: S3, Google Cloud Storage and Azure Blob.

`multicloud demo --clouds` starts the three loopback emulators (moto for S3, gcp-storage-
emulator for GCS, azurite for Azure Blob), points the clients at them through the same
environment variables a user sets for the real clouds, uploads the dataset into an S3
source bucket, and gives every cloud's nodes a bucket of their own cloud for replicas:

    source   s3://mc-source/data/
    aws      s3://mc-replicas-aws/<node>/        (2 nodes)
    gcp      gs://mc-replicas-gcp/<node>/        (2 nodes)
    azure    az://mc-replicas-azure/<node>/      (2 nodes)
    restore  s3://mc-restore/demo-2/  and a local folder

The five parts then run unchanged; the emulators are stopped (by pid) when the demo ends,
whatever happened, and the environment is given back.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from multicloud.cloud import ObjectStore, open_store
from multicloud.cloud.emulators import Emulator, EmulatorKind, start_emulators, stop_emulators
from multicloud.core.config import PipelineConfig
from multicloud.core.units import format_bytes

SOURCE_URL = "s3://mc-source/data/"
RESTORE_URL = "s3://mc-restore/demo-2/"
REPLICA_BUCKETS = {"aws": ("s3", "mc-replicas-aws"), "gcp": ("gs", "mc-replicas-gcp"),
                   "azure": ("az", "mc-replicas-azure")}
NODES_PER_CLOUD = {"aws": 2, "gcp": 2, "azure": 2}
_UPLOAD_PART = 8 * 1024 * 1024


@dataclass(frozen=True)
class CloudStage:
    """What the demo runs against once the emulators are up."""

    source_url: str
    restore_url: str
    config: PipelineConfig


@contextlib.asynccontextmanager
async def cloud_stage(out: Console, workdir: Path, dataset: Path,
                      config: PipelineConfig) -> AsyncIterator[CloudStage]:
    """Emulators up, buckets made, the dataset in the source bucket; all undone on exit."""
    with out.status("starting the S3, GCS and Azure Blob emulators on 127.0.0.1 ..."):
        emulators = await _start(workdir / "emulator-logs")
    try:
        with environment(emulator_env(emulators.values())):
            for emulator in emulators.values():
                out.print(f"  {emulator.kind} emulator: {emulator.endpoint} "
                          f"(pid {emulator.pid})")
            await asyncio.to_thread(_make_buckets, emulators)
            with out.status(f"uploading the dataset to {SOURCE_URL} ..."):
                sent = await asyncio.to_thread(_upload, dataset, open_store(SOURCE_URL))
            out.print(f"  uploaded {format_bytes(sent)} to {SOURCE_URL}")
            yield CloudStage(SOURCE_URL, RESTORE_URL, _cloud_config(config))
    finally:
        await asyncio.to_thread(stop_emulators, emulators.values())


async def _start(log_dir: Path) -> dict[EmulatorKind, Emulator]:
    """The three emulators, started on a thread; a Ctrl-C meanwhile stops them whenever
    they come up (the thread cannot be interrupted, and nobody else would stop them)."""
    lock = threading.Lock()
    state: dict[str, Any] = {"abandoned": False, "started": None}

    def start() -> dict[EmulatorKind, Emulator]:
        started = start_emulators(("s3", "gs", "az"), log_dir)
        with lock:
            if state["abandoned"]:
                stop_emulators(started.values())
            state["started"] = started
        return started

    try:
        return await asyncio.to_thread(start)
    except asyncio.CancelledError:
        with lock:
            state["abandoned"] = True
            started = state["started"]
        if started is not None:  # up just before the cancel reached us
            stop_emulators(started.values())
        raise


def _cloud_config(config: PipelineConfig) -> PipelineConfig:
    """The config with two nodes per cloud, each keeping replicas in its cloud's bucket,
    and a replica in every cloud."""
    stores = {cloud: f"{scheme}://{bucket}/{{node}}/"
              for cloud, (scheme, bucket) in REPLICA_BUCKETS.items()}
    # One replica in each cloud (min_clouds 3), so every kind of store holds a copy.
    return config.replace(cluster={"nodes_per_cloud": NODES_PER_CLOUD, "nodes": [],
                                   "node_stores": stores},
                          distribution={"min_clouds": 3})


def _make_buckets(emulators: dict[EmulatorKind, Emulator]) -> None:
    emulators["s3"].create_bucket("mc-source")
    emulators["s3"].create_bucket("mc-restore")
    for scheme, bucket in REPLICA_BUCKETS.values():
        emulators[scheme].create_bucket(bucket)  # type: ignore[index]


def _upload(dataset: Path, store: ObjectStore) -> int:
    """Every file under dataset as an object (big ones as multipart uploads)."""
    sent = 0
    for path in sorted(p for p in dataset.rglob("*") if p.is_file()):
        key = path.relative_to(dataset).as_posix()
        size = path.stat().st_size
        if size <= _UPLOAD_PART:
            store.put(key, path.read_bytes())
        else:
            store.put_parts(key, _parts_of(path))
        sent += size
    return sent


def _parts_of(path: Path) -> Iterator[bytes]:
    with path.open("rb") as handle:
        while part := handle.read(_UPLOAD_PART):
            yield part


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """values set in this process's environment for a with block (the embedded nodes and
    open_store read it), and the environment as it was afterwards."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def emulator_env(emulators: Iterable[Emulator]) -> dict[str, str]:
    """The variables that point every client at these emulators."""
    values: dict[str, str] = {}
    for emulator in emulators:
        values.update(emulator.env())
    return values


def bucket_matches(store_url: str, local: Path) -> bool:
    """Whether the objects under store_url are exactly the files under local."""
    store = open_store(store_url)
    objects = {info.key: info.size for info in store.list()}
    files = {p.relative_to(local).as_posix(): p for p in local.rglob("*") if p.is_file()}
    if set(objects) != set(files):
        return False
    return all(bytes(store.get(key)) == files[key].read_bytes() for key in files)

"""Object stores: multicloud against `rclone copy`, on the S3, GCS and Azure Blob emulators.

The dataset is uploaded into s3://bench-source/data/ on moto (S3); then, alternating, with
the buckets emptied before each measurement:

- multicloud: `multicloud run --source s3://bench-source/data/` in a child, six embedded
  nodes (two per cloud) that keep their replicas in s3://bench-aws/, gs://bench-gcp/ and
  az://bench-azure/, min_clouds 3 (so one replica in each store). Timed: the wall time of
  the whole process; its JSON's own duration is reported too. Each node checks a replica's
  checksum before writing it and the run acknowledges only written replicas;
  `multicloud verify` (re-reading every replica from its bucket) is timed apart. Replicas
  are zstd-compressed (the shipped transforms), so fewer bytes reach the stores.
- rclone: `rclone copy --checksum s3:bench-source/data <remote>:bench-rclone-<x>/data` for
  each store, the three at once (the default; `--rclone-mode sequential` for one after
  another). The s3 leg is a server-side copy (source and destination on one remote).

rclone 1.60 (Debian 12) cannot upload an object over 16 MiB to gcp-storage-emulator: Go's
resumable upload sends `X-GUploader-No-308: yes` and fails on the plain `308 Resume
Incomplete` the emulator sends for each part ("unexpected 308 response status code").
A probe finds out; when the GCS leg fails, rclone is timed on the legs that work, and once
more with GCS through a loopback shim that turns that 308 into the `200` +
`X-Http-Status-Code-Override: 308` the client expects (reported apart, marked as such).
That figure is pessimistic for rclone: the emulator copies the whole object so far on each
16 MiB part it receives (multicloud's client sends a chunk, <= 100 MiB, in one request),
and the shim relays every byte once more in Python.

Everything listens on 127.0.0.1; the emulators are stopped (by pid) whatever happens.
Usage:
    python benchmarks/cloud_bench.py [--size 1GiB] [--runs 3] [--out bench-out]
                                     [--rclone-mode parallel|sequential] [--no-gcs-shim]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from multicloud.cloud import open_store
from multicloud.cloud.emulators import Emulator, running_emulators
from multicloud.core.units import format_bytes, parse_size
from multicloud.ui.demo_clouds import environment

CLI = [sys.executable, "-m", "multicloud.ui.cli"]
SOURCE_BUCKET = "bench-source"
SOURCE_URL = f"s3://{SOURCE_BUCKET}/data/"
# Where multicloud's nodes keep replicas: one bucket per cloud, a prefix per node.
REPLICA_BUCKETS = {"aws": ("s3", "bench-aws"), "gcp": ("gs", "bench-gcp"),
                   "azure": ("az", "bench-azure")}
NODES_PER_CLOUD = {"aws": 2, "gcp": 2, "azure": 2}
# rclone's legs: remote name -> (emulator, destination bucket).
RCLONE_LEGS = {"s3": ("s3", "bench-rclone-s3"), "gcs": ("gs", "bench-rclone-gcs"),
               "az": ("az", "bench-rclone-az")}
SHIM_REMOTE = "gcs-shim"
AIM = 0.5  # ours at most half of rclone's time
# Over Go's default resumable chunk (16 MiB), so the GCS probe takes the resumable path.
PROBE_BYTES = 17 * 1024 * 1024
MIB = 1024 * 1024


# -- set-up ------------------------------------------------------------------------------

def write_config_dir(path: Path) -> Path:
    """multicloud's config: two nodes per cloud, each keeping replicas in its cloud's
    bucket, and a replica in every cloud (everything else the shipped defaults)."""
    path.mkdir(parents=True, exist_ok=True)
    stores = {cloud: f"{scheme}://{bucket}/{{node}}/"
              for cloud, (scheme, bucket) in REPLICA_BUCKETS.items()}
    cluster = {"nodes_per_cloud": NODES_PER_CLOUD, "nodes": [], "node_stores": stores}
    # JSON is YAML: no quoting surprises in the bucket URLs.
    (path / "cluster_config.yml").write_text(json.dumps(cluster, indent=2) + "\n")
    (path / "distribution_config.yml").write_text("min_clouds: 3\n")
    return path


def write_rclone_config(path: Path, emulators: dict[str, Emulator],
                        shim_endpoint: str | None = None) -> Path:
    """Three remotes on the emulators (plus the GCS one through the shim, when given)."""
    s3, gs, az = emulators["s3"], emulators["gs"], emulators["az"]
    text = (
        "[s3]\ntype = s3\nprovider = Other\naccess_key_id = test\n"
        f"secret_access_key = test\nregion = us-east-1\nendpoint = {s3.endpoint}\n"
        "force_path_style = true\n\n"
        # account/key + endpoint makes rclone 1.60 dial https://ACCOUNT.<endpoint>; the
        # emulator option takes azurite's well-known account and the endpoint as given.
        f"[az]\ntype = azureblob\nuse_emulator = true\nendpoint = {az.endpoint}\n\n"
        f"[gcs]\ntype = google cloud storage\nanonymous = true\nendpoint = {gs.endpoint}\n"
    )
    if shim_endpoint is not None:
        text += (f"\n[{SHIM_REMOTE}]\ntype = google cloud storage\nanonymous = true\n"
                 f"endpoint = {shim_endpoint}\n")
    path.write_text(text)
    return path


def emulator_env(emulators: dict[str, Emulator]) -> dict[str, str]:
    """The variables that point multicloud's clients at the emulators (never a proxy)."""
    env: dict[str, str] = {"NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    for emulator in emulators.values():
        env.update(emulator.env())
    return env


def rclone_env() -> dict[str, str]:
    """This environment for rclone, without AWS_CA_BUNDLE: rclone 1.60's S3 SDK fails on
    any custom CA bundle ("LoadCustomCABundleError ... unsupported transport"), and the
    emulators speak plain HTTP on loopback anyway."""
    env = {k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"}
    env.update({"NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"})
    return env


def upload(source: Path, url: str) -> tuple[int, int]:
    """Every file under source as one object under url (single PUTs, so each S3 ETag is
    the object's MD5 and rclone's --checksum has a hash to compare); (files, bytes)."""
    store = open_store(url)
    files = sent = 0
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        data = path.read_bytes()
        store.put(path.relative_to(source).as_posix(), data)
        files, sent = files + 1, sent + len(data)
    return files, sent


def listing(url: str) -> dict[str, int]:
    """{key: size} of the objects under url."""
    return {info.key: info.size for info in open_store(url).list()}


def empty(url: str) -> None:
    """Delete every object under url."""
    store = open_store(url)
    for info in list(store.list()):
        store.delete(info.key)


# -- the shim for rclone's GCS leg -------------------------------------------------------

class ResumeShim:
    """A loopback TCP relay to gcp-storage-emulator that rewrites a response's
    `308 Resume Incomplete` status line into `200 OK` + `X-Http-Status-Code-Override: 308`,
    what Go's resumable upload (having sent `X-GUploader-No-308: yes`) expects. Bytes are
    relayed as they are; the emulator speaks HTTP/1.0, one response per connection."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="gcs-308-shim")
        self._server: asyncio.Server | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ResumeShim:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, "127.0.0.1", 0), self._loop).result(10)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    def __exit__(self, *exc: object) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _handle(self, client_r: asyncio.StreamReader,
                      client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            client_w.close()
            return

        async def back() -> None:
            try:
                head = await server_r.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError as exc:
                head = exc.partial
            status, _, rest = head.partition(b"\r\n")
            parts = status.split(b" ", 2)
            if len(parts) >= 2 and parts[1] == b"308":
                head = parts[0] + b" 200 OK\r\nX-Http-Status-Code-Override: 308\r\n" + rest
            client_w.write(head)
            await _relay(server_r, client_w)

        await asyncio.gather(_relay(client_r, server_w), back(), return_exceptions=True)
        for writer in (client_w, server_w):
            writer.close()


async def _relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(MIB):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()


# -- measurements ------------------------------------------------------------------------

def _sync() -> None:
    subprocess.run(["sync"], check=True)


def multicloud_run(env: dict[str, str], config_dir: Path, data_dir: Path, batch_id: str,
                   logs: Path) -> dict[str, Any]:
    """One `multicloud run` from the S3 source in a child; its wall time and its JSON."""
    shutil.rmtree(data_dir, ignore_errors=True)
    for scheme, bucket in REPLICA_BUCKETS.values():
        empty(f"{scheme}://{bucket}/")
    _sync()
    started = time.perf_counter()
    done = subprocess.run([*CLI, "run", "--source", SOURCE_URL, "--config-dir", str(config_dir),
                           "--data-dir", str(data_dir), "--batch-id", batch_id, "--json",
                           "--log-file", str(logs / f"{batch_id}.log")],
                          capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    (logs / f"{batch_id}.stderr").write_text(done.stderr)
    try:
        result = json.loads(done.stdout or "{}")
    except json.JSONDecodeError:
        result = {}
    if done.returncode != 0 or result.get("status") != "success":
        raise RuntimeError(f"multicloud run failed (exit {done.returncode}): "
                           f"{result.get('error') or done.stderr[-2000:]}")
    storage = result["metrics"]["storage"]
    return {"wall_s": wall, "duration_s": float(result["duration_seconds"]),
            "bytes_processed": result["bytes_processed"], "chunks": result["chunks_processed"],
            "replica_writes": result["metrics"]["distribution"]["replica_writes"],
            "replica_bytes_by_cloud": {c: v["bytes"] for c, v in storage["by_cloud"].items()},
            "under_replicated": storage["under_replicated"]}


def multicloud_verify(env: dict[str, str], config_dir: Path, data_dir: Path,
                      batch_id: str) -> dict[str, Any]:
    """`multicloud verify` of the batch (every replica read back from its bucket)."""
    started = time.perf_counter()
    done = subprocess.run([*CLI, "verify", batch_id, "--config-dir", str(config_dir),
                           "--data-dir", str(data_dir), "--json"],
                          capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    try:
        result = json.loads(done.stdout or "{}")
    except json.JSONDecodeError:
        result = {}
    if done.returncode != 0 or not result.get("ok"):
        raise RuntimeError(f"multicloud verify failed (exit {done.returncode}): "
                           f"{result.get('problems') or done.stderr[-2000:]}")
    return {"wall_s": wall, "replicas_checked": result["replicas_checked"],
            "replicas_ok": result["replicas_ok"], "complete": result["complete"]}


def rclone_copies(conf: Path, legs: dict[str, str], parallel: bool, logs: Path,
                  tag: str) -> dict[str, Any]:
    """`rclone copy --checksum` of the source to each leg's remote:bucket (emptied first);
    wall seconds of them all and of each leg. legs: remote -> bucket URL of the store."""
    for url in legs.values():
        empty(url)
    _sync()
    env = rclone_env()

    def leg(remote: str) -> float:
        bucket = legs[remote].split("://", 1)[1].strip("/")
        log = logs / f"rclone-{tag}-{remote}.log"
        started = time.perf_counter()
        done = subprocess.run(["rclone", "copy", "--checksum", "--config", str(conf),
                               "--log-file", str(log), "--log-level", "INFO",
                               f"s3:{SOURCE_BUCKET}/data", f"{remote}:{bucket}/data"],
                              capture_output=True, text=True, env=env)
        seconds = time.perf_counter() - started
        if done.returncode != 0:
            raise RuntimeError(f"rclone copy to {remote} failed (exit {done.returncode}): "
                               f"{_last_error(log, done.stderr)}")
        return seconds

    started = time.perf_counter()
    if parallel:
        with ThreadPoolExecutor(len(legs)) as pool:
            futures = {remote: pool.submit(leg, remote) for remote in legs}
            per_leg = {remote: future.result() for remote, future in futures.items()}
    else:
        per_leg = {remote: leg(remote) for remote in legs}
    wall = time.perf_counter() - started
    return {"wall_s": wall, "leg_s": per_leg}


def rclone_check_download(conf: Path, legs: dict[str, str], logs: Path) -> float:
    """`rclone check --download` of every leg against the source, at once: both sides
    read and compared byte for byte (rclone's counterpart of `multicloud verify`)."""
    env = rclone_env()

    def check(remote: str) -> None:
        bucket = legs[remote].split("://", 1)[1].strip("/")
        log = logs / f"rclone-check-{remote}.log"
        done = subprocess.run(["rclone", "check", "--download", "--config", str(conf),
                               "--log-file", str(log), f"s3:{SOURCE_BUCKET}/data",
                               f"{remote}:{bucket}/data"],
                              capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise RuntimeError(f"rclone check of {remote} failed: "
                               f"{_last_error(log, done.stderr)}")

    started = time.perf_counter()
    with ThreadPoolExecutor(len(legs)) as pool:
        for future in [pool.submit(check, remote) for remote in legs]:
            future.result()
    return time.perf_counter() - started


def gcs_probe(conf: Path, remote: str, bucket: str, out: Path) -> str | None:
    """None when rclone can upload a 17 MiB object (a resumable upload) to the GCS remote;
    else its error. The probe object is removed."""
    probe = out / "probe-17MiB.bin"
    if not probe.exists():
        probe.write_bytes(os.urandom(PROBE_BYTES))
    log = out / "logs" / f"rclone-probe-{remote}.log"
    done = subprocess.run(["rclone", "copyto", "--config", str(conf), "--retries", "1",
                           "--low-level-retries", "1", "--log-file", str(log), str(probe),
                           f"{remote}:{bucket}/probe/probe.bin"],
                          capture_output=True, text=True, env=rclone_env(), timeout=120)
    with contextlib.suppress(Exception):
        empty(f"gs://{bucket}/probe/")
    return None if done.returncode == 0 else _last_error(log, done.stderr)


def _last_error(log: Path, stderr: str) -> str:
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        lines = []
    lines += stderr.splitlines()
    errors = [line for line in lines if "ERROR" in line or "Failed" in line]
    # Without rclone's "2026/01/31 12:00:00 " prefix.
    return re.sub(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d\s+", "",
                  (errors or lines or ["(no output)"])[-1].strip())


def rclone_version() -> str:
    done = subprocess.run(["rclone", "version"], capture_output=True, text=True)
    return done.stdout.splitlines()[0] if done.returncode == 0 and done.stdout else "?"


# -- the benchmark -----------------------------------------------------------------------

def cloud_benchmark(source: Path, out: Path, runs: int = 3, parallel: bool = True,
                    gcs_shim: bool = True) -> dict[str, Any]:
    """The whole comparison on a dataset directory; the figures as a dict (see main)."""
    if shutil.which("rclone") is None:
        raise RuntimeError("rclone is not installed: `make bench-deps` (apt-get install "
                           "rclone)")
    work = out / "cloud"
    shutil.rmtree(work, ignore_errors=True)
    logs = work / "logs"
    logs.mkdir(parents=True)
    config_dir = write_config_dir(work / "config")
    data_dir = work / "multicloud-data"
    r: dict[str, Any] = {"runs": runs, "rclone_version": rclone_version(),
                         "rclone_mode": "parallel" if parallel else "sequential",
                         "aim_ours_over_rclone": AIM}
    try:
        with running_emulators(("s3", "gs", "az"), work / "emulator-logs") as emulators:
            ems: dict[str, Emulator] = dict(emulators)
            with environment(emulator_env(ems)):
                for kind, bucket in [("s3", SOURCE_BUCKET), *REPLICA_BUCKETS.values(),
                                     *RCLONE_LEGS.values()]:
                    ems[kind].create_bucket(bucket)
                started = time.perf_counter()
                r["files"], r["size"] = upload(source, SOURCE_URL)
                r["source_upload_s"] = time.perf_counter() - started
                print(f"  uploaded {r['files']} files, {format_bytes(r['size'])} to "
                      f"{SOURCE_URL} in {r['source_upload_s']:.1f}s", flush=True)
                r.update(_compare(ems, listing(SOURCE_URL), work, logs, config_dir, data_dir,
                                  runs, parallel, gcs_shim))
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    return r


def _compare(ems: dict[str, Emulator], source_objects: dict[str, int], work: Path,
             logs: Path, config_dir: Path, data_dir: Path, runs: int, parallel: bool,
             gcs_shim: bool) -> dict[str, Any]:
    env = {**os.environ, **emulator_env(ems)}
    stores = {remote: f"{scheme}://{bucket}/" for remote, (scheme, bucket) in RCLONE_LEGS.items()}
    with contextlib.ExitStack() as stack:
        shim = stack.enter_context(ResumeShim(ems["gs"].port)) if gcs_shim else None
        conf = write_rclone_config(work / "rclone.conf", ems,
                                   shim.endpoint if shim is not None else None)
        gcs_error = gcs_probe(conf, "gcs", RCLONE_LEGS["gcs"][1], work)
        direct = dict(stores) if gcs_error is None else {k: v for k, v in stores.items()
                                                         if k != "gcs"}
        shimmed: dict[str, str] | None = None
        shim_error: str | None = None
        if gcs_error is not None and shim is not None:
            shim_error = gcs_probe(conf, SHIM_REMOTE, RCLONE_LEGS["gcs"][1], work)
            if shim_error is None:
                shimmed = {**direct, SHIM_REMOTE: stores["gcs"]}
        if gcs_error is not None:
            print(f"  rclone GCS leg against gcp-storage-emulator: not measurable: {gcs_error}"
                  + ("" if shim is None else "; through the 308 shim: "
                     + ("works" if shim_error is None else f"fails too: {shim_error}")),
                  flush=True)

        ours: list[dict[str, Any]] = []
        verify: list[dict[str, Any]] = []
        rclone: list[dict[str, Any]] = []
        rclone3: list[dict[str, Any]] = []
        for i in range(runs):
            ours.append(multicloud_run(env, config_dir, data_dir, f"cloud-{i}", logs))
            verify.append(multicloud_verify(env, config_dir, data_dir, f"cloud-{i}"))
            rclone.append(rclone_copies(conf, direct, parallel, logs, f"{i}"))
            _check_copies(direct, source_objects)
            line = (f"  run {i + 1}/{runs}: multicloud {ours[-1]['wall_s']:.2f}s (pipeline "
                    f"{ours[-1]['duration_s']:.2f}s), verify {verify[-1]['wall_s']:.2f}s; "
                    f"rclone {'+'.join(direct)} {rclone[-1]['wall_s']:.2f}s")
            if shimmed is not None:
                rclone3.append(rclone_copies(conf, shimmed, parallel, logs, f"{i}-shim"))
                _check_copies(shimmed, source_objects)
                line += f", rclone {'+'.join(shimmed)} {rclone3[-1]['wall_s']:.2f}s"
            print(line, flush=True)
        check_s = rclone_check_download(conf, shimmed or direct, logs)

    def med(rows: list[dict[str, Any]], key: str) -> float:
        return statistics.median(row[key] for row in rows)

    result: dict[str, Any] = {
        "multicloud": {
            "wall_s": [o["wall_s"] for o in ours],
            "duration_s": [o["duration_s"] for o in ours],
            "verify_s": [v["wall_s"] for v in verify],
            "median_wall_s": med(ours, "wall_s"), "median_duration_s": med(ours, "duration_s"),
            "median_verify_s": med(verify, "wall_s"),
            "replica_writes": ours[-1]["replica_writes"],
            "replica_bytes_by_cloud": ours[-1]["replica_bytes_by_cloud"],
            "under_replicated": ours[-1]["under_replicated"],
            "verify": {k: verify[-1][k] for k in ("replicas_checked", "replicas_ok",
                                                  "complete")},
        },
        "rclone": _rclone_figures(rclone, list(direct)),
        "rclone_gcs_direct_error": gcs_error,
        "rclone_with_gcs_shim": (_rclone_figures(rclone3, list(shimmed))
                                 if shimmed is not None else None),
        "rclone_gcs_shim_error": shim_error,
        "rclone_check_download_s": check_s,
        "rclone_check_legs": list(shimmed or direct),
    }
    mc = result["multicloud"]
    base = result["rclone"]["median_wall_s"]
    result["ours_over_rclone"] = mc["median_wall_s"] / base
    result["ours_with_verify_over_rclone"] = (mc["median_wall_s"] + mc["median_verify_s"]) / base
    if shimmed is not None:
        base3 = result["rclone_with_gcs_shim"]["median_wall_s"]
        result["ours_over_rclone_with_gcs_shim"] = mc["median_wall_s"] / base3
        result["ours_with_verify_over_rclone_with_gcs_shim"] = (
            (mc["median_wall_s"] + mc["median_verify_s"]) / base3)
    return result


def _rclone_figures(rows: list[dict[str, Any]], legs: list[str]) -> dict[str, Any]:
    return {"legs": legs, "wall_s": [row["wall_s"] for row in rows],
            "median_wall_s": statistics.median(row["wall_s"] for row in rows),
            "leg_s": {leg: [row["leg_s"][leg] for row in rows] for leg in legs},
            "median_leg_s": {leg: statistics.median(row["leg_s"][leg] for row in rows)
                             for leg in legs}}


def _check_copies(legs: dict[str, str], source_objects: dict[str, int]) -> None:
    """Every source object landed under data/ of every leg, with its size."""
    want = {f"data/{key}": size for key, size in source_objects.items()}
    for remote, url in legs.items():
        got = listing(url)
        if got != want:
            missing = sorted(set(want) - set(got))[:3]
            raise RuntimeError(f"rclone's copy to {remote} ({url}) differs from the source: "
                               f"{len(got)} objects against {len(want)}; missing {missing}")


# -- reporting ---------------------------------------------------------------------------

def _runs(seconds: list[float]) -> str:
    return ", ".join(f"{s:.2f}" for s in seconds)


def _legs(names: list[str]) -> str:
    labels = {"s3": "S3", "az": "Azure", "gcs": "GCS", SHIM_REMOTE: "GCS via 308 shim"}
    return " + ".join(labels.get(n, n) for n in names)


def report(r: dict[str, Any]) -> str:
    """The figures as printed text."""
    if "error" in r:
        return f"clouds: failed: {r['error']}\n"
    mc, rc = r["multicloud"], r["rclone"]
    v = mc["verify"]
    written = sum(mc["replica_bytes_by_cloud"].values())
    lines = [
        f"clouds: {format_bytes(r['size'])} in {r['files']} files from {SOURCE_URL} (moto) to "
        f"replicas on S3 (moto), GCS (gcp-storage-emulator), Azure Blob (azurite); "
        f"{r['rclone_version']}, rclone legs {r['rclone_mode']}; medians of {r['runs']} run(s)",
        f"  multicloud run, wall of the process      {mc['median_wall_s']:7.2f} s   "
        f"[{_runs(mc['wall_s'])}]",
        f"  multicloud run, duration in its JSON      {mc['median_duration_s']:7.2f} s   "
        f"[{_runs(mc['duration_s'])}]",
        f"  multicloud verify (re-reads replicas)     {mc['median_verify_s']:7.2f} s   "
        f"[{_runs(mc['verify_s'])}]  {v['replicas_ok']}/{v['replicas_checked']} ok",
        f"  rclone copy --checksum, {_legs(rc['legs'])}: {rc['median_wall_s']:.2f} s   "
        f"[{_runs(rc['wall_s'])}]  per leg "
        + ", ".join(f"{leg} {s:.2f}" for leg, s in rc["median_leg_s"].items()),
    ]
    if r["rclone_gcs_direct_error"]:
        lines.append(f"  rclone GCS leg direct: not measurable: {r['rclone_gcs_direct_error']}")
    shim = r.get("rclone_with_gcs_shim")
    if shim:
        lines.append(f"  rclone copy --checksum, {_legs(shim['legs'])}: "
                     f"{shim['median_wall_s']:.2f} s   [{_runs(shim['wall_s'])}]  per leg "
                     + ", ".join(f"{leg} {s:.2f}" for leg, s in shim["median_leg_s"].items()))
        lines.append("    (GCS via shim: the emulator re-copies the object on each 16 MiB part "
                     "rclone sends, and the shim relays the bytes: slower than GCS would be)")
    elif r.get("rclone_gcs_shim_error"):
        lines.append(f"  rclone GCS leg via the shim failed too: {r['rclone_gcs_shim_error']}")
    lines.append(f"  rclone check --download ({_legs(r['rclone_check_legs'])}) "
                 f"{r['rclone_check_download_s']:.2f} s (last run)")
    lines.append(f"  ours / rclone ({_legs(rc['legs'])}): {r['ours_over_rclone']:.2f} "
                 f"(with verify {r['ours_with_verify_over_rclone']:.2f}); aim <= {AIM}: "
                 f"{'met' if r['ours_over_rclone'] <= AIM else 'NOT met'}")
    if shim:
        ratio = r["ours_over_rclone_with_gcs_shim"]
        lines.append(f"  ours / rclone ({_legs(shim['legs'])}): {ratio:.2f} (with verify "
                     f"{r['ours_with_verify_over_rclone_with_gcs_shim']:.2f}); aim <= {AIM}: "
                     f"{'met' if ratio <= AIM else 'NOT met'}")
    lines.append(f"  replicas written by multicloud: {mc['replica_writes']}, "
                 f"{format_bytes(written)} (compressed) across the three stores, "
                 f"under-replicated {mc['under_replicated']}")
    return "\n".join(lines) + "\n"


def table_rows(r: dict[str, Any]) -> list[str]:
    """Rows for run_benchmarks' markdown table (| measurement | figure |)."""
    if "error" in r:
        return [f"| clouds: multicloud against rclone on emulators | failed: {r['error']} |"]
    mc, rc = r["multicloud"], r["rclone"]
    v = mc["verify"]
    rows = [
        f"| clouds: multicloud run, {format_bytes(r['size'])} S3 -> S3 + GCS + Azure "
        f"emulators (wall / JSON duration) | {mc['median_wall_s']:.2f} s / "
        f"{mc['median_duration_s']:.2f} s (runs {_runs(mc['wall_s'])}) |",
        f"| clouds: multicloud verify ({v['replicas_ok']}/{v['replicas_checked']} replicas "
        f"ok) | {mc['median_verify_s']:.2f} s |",
        f"| clouds: rclone copy --checksum, {_legs(rc['legs'])}, {r['rclone_mode']} | "
        f"{rc['median_wall_s']:.2f} s (runs {_runs(rc['wall_s'])}) |",
    ]
    if r["rclone_gcs_direct_error"]:
        rows.append(f"| clouds: rclone GCS leg on gcp-storage-emulator | not measurable: "
                    f"{r['rclone_gcs_direct_error'].replace('|', '/')} |")
    shim = r.get("rclone_with_gcs_shim")
    if shim:
        rows.append(f"| clouds: rclone copy --checksum, {_legs(shim['legs'])}, "
                    f"{r['rclone_mode']} | {shim['median_wall_s']:.2f} s "
                    f"(runs {_runs(shim['wall_s'])}) |")
    rows.append(f"| clouds: ours / rclone ({_legs(rc['legs'])}), aim <= {AIM} | "
                f"{r['ours_over_rclone']:.2f} (with verify "
                f"{r['ours_with_verify_over_rclone']:.2f}) |")
    if shim:
        rows.append(f"| clouds: ours / rclone ({_legs(shim['legs'])}), aim <= {AIM} | "
                    f"{r['ours_over_rclone_with_gcs_shim']:.2f} (with verify "
                    f"{r['ours_with_verify_over_rclone_with_gcs_shim']:.2f}) |")
    return rows


def cloud_section(source: Path, out: Path, runs: int = 3) -> dict[str, Any]:
    """For run_benchmarks: the figures, or {"error": ...} when the comparison could not run
    (the other sections' figures are kept either way)."""
    try:
        result = cloud_benchmark(source, out, runs)
    except Exception as exc:
        result = {"error": f"{type(exc).__name__}: {exc}"}
    print(report(result), end="", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1GiB")
    parser.add_argument("--runs", type=int, default=3, help="runs of each contender (median)")
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--rclone-mode", choices=("parallel", "sequential"), default="parallel",
                        help="rclone's three copies at once (default) or one after another")
    parser.add_argument("--gcs-shim", action=argparse.BooleanOptionalAction, default=True,
                        help="when rclone's GCS leg fails on the emulator, time it once more "
                             "through the 308-translating shim")
    args = parser.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    from run_benchmarks import dataset

    size = parse_size(args.size)
    source = dataset(out, f"cloud-data-{size}", size)
    result = cloud_benchmark(source, out, max(args.runs, 1), args.rclone_mode == "parallel",
                             args.gcs_shim)
    (out / "cloud" / "results.json").write_text(json.dumps(result, indent=2))
    print(report(result), end="")


if __name__ == "__main__":
    main()

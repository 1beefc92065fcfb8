"""Loopback emulators of S3, Google Cloud Storage and Azure Blob, run as subprocesses.

The cloud demo and the cloud tests talk to real HTTP endpoints without an account:

- s3: moto's server (`python -m moto.server`), from the `emulators` extra;
- gs: gcp-storage-emulator (JSON API, in memory), from the `emulators` extra;
- az: azurite's blob service, from npm (package.json; `make setup` runs `npm ci`).

Each listens on a free 127.0.0.1 port, writes its output to a log file (never to the
terminal), runs in its own process group (node starts children of its own) and is stopped
by pid. `Emulator.env()` gives the variables that point the product's clients at it, the
same ones a user would set for the real cloud's SDKs.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from multicloud.cloud.obstore_backend import AZURITE_ACCOUNT, AZURITE_KEY
from multicloud.core.errors import ConfigError, MulticloudError

EmulatorKind = Literal["s3", "gs", "az"]
KINDS: tuple[EmulatorKind, ...] = ("s3", "gs", "az")
HOST = "127.0.0.1"
PROJECT = "multicloud"  # the GCP project the gs emulator's clients name
READY_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 5.0

# S3 and GCS bucket names: 3-63 of lowercase letters, digits, dots and hyphens, starting and
# ending with a letter or digit. Azure containers: no dots, and no two hyphens in a row.
_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_CONTAINER_NAME = re.compile(r"^(?!.*--)[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$")


class EmulatorError(ConfigError):
    """An emulator could not be found, started, or did not answer in time: this machine
    is not set up to run it (a ConfigError, as a missing tool or a bad setting is)."""


@dataclass
class Emulator:
    """One running emulator: what it is, where it listens, and the process to stop."""

    kind: EmulatorKind
    pid: int
    port: int
    endpoint: str  # what the clients are pointed at (azurite's includes the account)
    log_path: Path
    _process: subprocess.Popen[bytes] | None = field(default=None, repr=False, compare=False)
    _stopped: bool = field(default=False, init=False, repr=False, compare=False)

    def env(self) -> dict[str, str]:
        """The environment variables that point this product's clients (and the clouds'
        own SDKs) at the emulator, with the emulators' public test credentials."""
        if self.kind == "s3":
            return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "test",
                    "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1"}
        if self.kind == "gs":
            return {"STORAGE_EMULATOR_HOST": self.endpoint,
                    "GOOGLE_CLOUD_PROJECT": os.environ.get("GOOGLE_CLOUD_PROJECT", PROJECT)}
        return {"AZURE_STORAGE_CONNECTION_STRING": azurite_connection_string(self.endpoint)}

    def create_bucket(self, name: str) -> None:
        """Create a bucket (an Azure container) named name on the emulator; one that is
        already there is left as it is (moto's us-east-1 behaves so, and the others follow)."""
        _check_bucket_name(self.kind, name)
        try:
            if self.kind == "s3":
                _create_s3_bucket(self.endpoint, name)
            elif self.kind == "gs":
                _create_gs_bucket(self.endpoint, name)
            else:
                _create_az_container(self.endpoint, name)
        except ImportError as exc:
            raise ConfigError(f"cannot create {self.kind} bucket {name!r}: {exc.name} is "
                              f"missing; install the `emulators` extra (make setup)") from None
        except MulticloudError:
            raise
        except Exception as exc:
            raise EmulatorError(f"{self.kind} emulator at {self.endpoint} did not create "
                                f"bucket {name!r}: {_first_line(exc)}") from None

    @property
    def running(self) -> bool:
        """Whether the emulator's process is still alive."""
        if self._process is not None:
            return self._process.poll() is None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def stop(self) -> None:
        """SIGTERM to the emulator's process group, SIGKILL after 5 s; idempotent."""
        if self._stopped:
            return  # once only: the pid may belong to someone else by now
        self._stopped = True
        if not self.running:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            # The group, not just the pid: azurite's node starts children of its own.
            # The leader is alive here, so the group id is still this emulator's.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, sig)
            if self._wait(STOP_TIMEOUT_S):
                break
        # The leader has just ended; a child of it that outlived the SIGTERM goes too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)

    def _wait(self, timeout_s: float) -> bool:
        """Whether the process ended (and was reaped) within timeout_s."""
        if self._process is not None:
            try:
                self._process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                return False
            return True
        deadline = time.monotonic() + timeout_s
        while self.running:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True


def azurite_connection_string(endpoint: str) -> str:
    """A connection string for azurite's well-known development account at endpoint
    (http://127.0.0.1:PORT/devstoreaccount1)."""
    return (f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};"
            f"AccountKey={AZURITE_KEY};BlobEndpoint={endpoint};")


def start_emulator(kind: EmulatorKind, log_dir: Path) -> Emulator:
    """Start one emulator on a free loopback port and wait until it answers HTTP."""
    return start_emulators([kind], log_dir)[kind]


def start_emulators(kinds: Iterable[EmulatorKind], log_dir: Path) -> dict[EmulatorKind, Emulator]:
    """Start the given emulators (together: their start-up times overlap) and wait until
    each answers; on any failure the ones already started are stopped before raising."""
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    started: dict[EmulatorKind, Emulator] = {}
    try:
        for kind in dict.fromkeys(kinds):
            if kind not in KINDS:
                raise ConfigError(f"unknown emulator {kind!r}; use one of {', '.join(KINDS)}")
            started[kind] = _spawn(kind, log_dir)
        for kind, emulator in list(started.items()):
            started[kind] = _wait_ready(emulator, log_dir)
    except BaseException:
        stop_emulators(started.values())
        raise
    return started


def stop_emulators(emulators: Iterable[Emulator]) -> None:
    """Stop every emulator given (each by its pid)."""
    for emulator in emulators:
        emulator.stop()


@contextlib.contextmanager
def running_emulators(kinds: Iterable[EmulatorKind],
                      log_dir: Path) -> Iterator[dict[EmulatorKind, Emulator]]:
    """The started emulators for the length of a with block; all stopped on the way out,
    whatever happened inside."""
    emulators = start_emulators(kinds, log_dir)
    try:
        yield emulators
    finally:
        stop_emulators(emulators.values())


def find_azurite() -> Path:
    """azurite's blob service: $MULTICLOUD_AZURITE, else node_modules/.bin of the checkout
    this module lives in, else PATH; EmulatorError saying how to install it otherwise."""
    explicit = os.environ.get("MULTICLOUD_AZURITE")
    if explicit:
        if Path(explicit).is_file():
            return Path(explicit)
        raise EmulatorError(f"MULTICLOUD_AZURITE={explicit} is not a file; point it at "
                            f"azurite-blob or unset it")
    root = _repo_root()
    if root is not None:
        local = root / "node_modules" / ".bin" / "azurite-blob"
        if local.is_file():
            return local
    found = shutil.which("azurite-blob")
    if found:
        return Path(found)
    raise EmulatorError("azurite (Azure Blob's emulator) is not installed: run `make setup` "
                        "(npm ci installs azurite), or set MULTICLOUD_AZURITE to azurite-blob")


# -- internals --------------------------------------------------------------------------

def _repo_root() -> Path | None:
    """The nearest directory above this file holding package.json (the checkout's root)."""
    for parent in Path(__file__).resolve().parents:
        if (parent / "package.json").is_file():
            return parent
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _command(kind: EmulatorKind, port: int) -> list[str]:
    if kind == "s3":
        return [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(port)]
    if kind == "gs":
        return [sys.executable, "-m", "gcp_storage_emulator", "start", f"--host={HOST}",
                f"--port={port}", "--in-memory"]
    return [str(find_azurite()), "--blobHost", HOST, "--blobPort", str(port),
            "--inMemoryPersistence", "--skipApiVersionCheck", "--disableTelemetry", "--silent"]


def _endpoint(kind: EmulatorKind, port: int) -> str:
    base = f"http://{HOST}:{port}"
    return f"{base}/{AZURITE_ACCOUNT}" if kind == "az" else base


def _spawn(kind: EmulatorKind, log_dir: Path) -> Emulator:
    port = _free_port()
    command = _command(kind, port)
    log_path = log_dir / f"{kind}-emulator-{port}.log"
    with log_path.open("wb") as log:
        try:
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log,
                                       stderr=subprocess.STDOUT, cwd=log_dir,
                                       start_new_session=True)
        except OSError as exc:
            hint = ("run `make setup` (npm ci installs azurite; it needs node)" if kind == "az"
                    else "run `make setup` (installs the `emulators` extra)")
            raise EmulatorError(f"cannot start the {kind} emulator ({command[0]}): "
                                f"{exc.strerror or exc}; {hint}") from None
    return Emulator(kind, process.pid, port, _endpoint(kind, port), log_path, process)


def _wait_ready(emulator: Emulator, log_dir: Path, attempts: int = 3) -> Emulator:
    """The emulator once it answers HTTP; one that died at start (its port taken between
    picking and binding, say) is started again on another port, up to `attempts` times.
    Whatever goes wrong, the process started here is stopped before the error leaves."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    try:
        while not _answers(emulator.port):
            if not emulator.running:
                attempts -= 1
                if attempts <= 0 or time.monotonic() > deadline:
                    raise EmulatorError(f"the {emulator.kind} emulator exited at start; "
                                        f"{_log_tail(emulator.log_path)}")
                emulator = _spawn(emulator.kind, log_dir)
                continue
            if time.monotonic() > deadline:
                raise EmulatorError(f"the {emulator.kind} emulator did not answer on port "
                                    f"{emulator.port} within {READY_TIMEOUT_S:.0f}s; "
                                    f"{_log_tail(emulator.log_path)}")
            time.sleep(0.05)
    except BaseException:
        emulator.stop()
        raise
    return emulator


def _answers(port: int) -> bool:
    """Whether an HTTP server answers on the port (any status counts: it is up)."""
    # Straight to the loopback port, whatever HTTP_PROXY says.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://{HOST}:{port}/", timeout=1.0):
            return True
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):
        return False


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        return f"its log {path} is unreadable"
    if not text:
        return f"its log {path} is empty"
    tail = "\n".join(text.splitlines()[-lines:])
    return f"the end of its log {path}:\n{tail}"


def _check_bucket_name(kind: EmulatorKind, name: str) -> None:
    pattern = _CONTAINER_NAME if kind == "az" else _BUCKET_NAME
    if pattern.match(name) is None:
        what = ("3-63 lowercase letters, digits and single hyphens" if kind == "az"
                else "3-63 lowercase letters, digits, dots and hyphens")
        raise ConfigError(f"invalid {kind} bucket name {name!r}: use {what}, starting and "
                          f"ending with a letter or digit")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line if len(line) <= 300 else line[:297] + "..."


def _create_s3_bucket(endpoint: str, name: str) -> None:
    import boto3  # type: ignore[import-untyped]
    from botocore.config import Config  # type: ignore[import-untyped]

    # A few quick tries: the emulator is local, a refusal will not go away by waiting.
    config = Config(retries={"max_attempts": 2, "mode": "standard"}, connect_timeout=5,
                    read_timeout=30)
    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test",
                          aws_secret_access_key="test", region_name="us-east-1",
                          config=config)
    try:
        client.create_bucket(Bucket=name)
    except client.exceptions.BucketAlreadyOwnedByYou:
        pass
    finally:
        client.close()


def _create_gs_bucket(endpoint: str, name: str) -> None:
    from google.api_core.exceptions import Conflict
    from google.api_core.retry import Retry
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage  # type: ignore[import-untyped]

    project = os.environ.get("GOOGLE_CLOUD_PROJECT", PROJECT)
    anonymous = AnonymousCredentials()  # type: ignore[no-untyped-call]
    client = storage.Client(project=project, credentials=anonymous,
                            client_options={"api_endpoint": endpoint})
    try:
        client.create_bucket(name, timeout=30,
                             retry=Retry(initial=0.1, maximum=0.5, timeout=1.0))
    except Conflict:
        pass
    finally:
        client.close()


def _create_az_container(endpoint: str, name: str) -> None:
    from azure.core.exceptions import ResourceExistsError
    from azure.storage.blob import BlobServiceClient, LinearRetry

    # The SDK's default first backoff is 15 s; a local emulator needs a fraction of that.
    retry = LinearRetry(backoff=1, random_jitter_range=0, retry_total=1)
    client = BlobServiceClient.from_connection_string(azurite_connection_string(endpoint),
                                                      retry_policy=retry)
    with client, contextlib.suppress(ResourceExistsError):
        client.create_container(name)

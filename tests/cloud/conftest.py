"""Fixtures of the cloud tests: one S3, GCS and Azure Blob emulator per session, a fresh
bucket per test, and the environment that points the clients at them (restored after).

The emulators start together the first time a test needs one (about a second) and stop
when the session ends; tests on memory:// alone start none.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from cloud_support import STORE_KINDS, Bucket, MakeBucket, unique_name

from multicloud.cloud.emulators import Emulator, EmulatorKind, start_emulators, stop_emulators

# Environment variables that would point a client somewhere else than the emulators.
_FOREIGN_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN",
                "AWS_DEFAULT_REGION", "AZURE_STORAGE_ACCOUNT_NAME", "AZURE_STORAGE_ACCOUNT",
                "AZURE_STORAGE_ACCOUNT_KEY", "AZURE_STORAGE_KEY", "AZURE_STORAGE_SAS_TOKEN",
                "GOOGLE_APPLICATION_CREDENTIALS", "API_ENDPOINT_OVERRIDE")


@pytest.fixture(scope="session")
def emulators(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[EmulatorKind, Emulator]]:
    """The three emulators, started once (together) and stopped at the session's end."""
    started = start_emulators(("s3", "gs", "az"), tmp_path_factory.mktemp("emulator-logs"))
    yield started
    stop_emulators(started.values())


@pytest.fixture
def cloud_env(monkeypatch: pytest.MonkeyPatch,
              emulators: dict[EmulatorKind, Emulator]) -> dict[EmulatorKind, Emulator]:
    """Every emulator's variables set for this test (monkeypatch restores them after)."""
    for name in _FOREIGN_ENV:
        monkeypatch.delenv(name, raising=False)
    for emulator in emulators.values():
        for name, value in emulator.env().items():
            monkeypatch.setenv(name, value)
    return emulators


@pytest.fixture
def make_bucket(request: pytest.FixtureRequest) -> MakeBucket:
    """make_bucket(kind): a new bucket (memory://, or on that kind's emulator, with the
    environment pointing the clients at the emulators for the rest of the test)."""

    def make(kind: str) -> Bucket:
        name = unique_name()
        if kind == "memory":
            return Bucket(kind, name, None)
        emulators: dict[str, Emulator] = request.getfixturevalue("cloud_env")
        emulator = emulators[kind]
        emulator.create_bucket(name)
        return Bucket(kind, name, emulator)

    return make


@pytest.fixture(params=STORE_KINDS)
def bucket(request: pytest.FixtureRequest, make_bucket: MakeBucket) -> Bucket:
    """A fresh bucket on each kind of store in turn."""
    return make_bucket(str(request.param))

"""The emulator runner: started on free ports, stopped by pid with their children, clear
errors when one is missing, dies at start, or does not answer."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from cloud_support import unique_name

from multicloud.cloud import emulators as emu
from multicloud.cloud.emulators import Emulator, EmulatorError, EmulatorKind, running_emulators
from multicloud.cloud.obstore_backend import AZURITE_ACCOUNT, AZURITE_KEY
from multicloud.core.errors import ConfigError


def group_is_gone(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_env_points_each_client_at_its_emulator(
        emulators: dict[EmulatorKind, Emulator]) -> None:
    s3, gs, az = emulators["s3"], emulators["gs"], emulators["az"]
    assert s3.env() == {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{s3.port}",
                        "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                        "AWS_REGION": "us-east-1"}
    assert gs.env()["STORAGE_EMULATOR_HOST"] == f"http://127.0.0.1:{gs.port}"
    assert gs.env()["GOOGLE_CLOUD_PROJECT"]
    connection = az.env()["AZURE_STORAGE_CONNECTION_STRING"]
    assert f"AccountName={AZURITE_ACCOUNT};" in connection
    assert f"AccountKey={AZURITE_KEY};" in connection
    assert f"BlobEndpoint=http://127.0.0.1:{az.port}/{AZURITE_ACCOUNT};" in connection
    assert len({s3.port, gs.port, az.port}) == 3
    for emulator in (s3, gs, az):
        assert emulator.running
        assert emulator.log_path.is_file()


@pytest.mark.parametrize(("kind", "name"), [
    ("s3", "b1"), ("s3", "UPPER-case"), ("gs", "-leading"), ("gs", "x" * 64),
    ("az", "dotted.name"), ("az", "double--hyphen"), ("az", "ab"),
])
def test_invalid_bucket_names_are_refused_before_any_request(
        emulators: dict[EmulatorKind, Emulator], kind: EmulatorKind, name: str) -> None:
    with pytest.raises(ConfigError) as caught:
        emulators[kind].create_bucket(name)
    assert repr(name) in str(caught.value)


def test_creating_a_bucket_twice_leaves_it_be(emulators: dict[EmulatorKind, Emulator]) -> None:
    for emulator in emulators.values():
        name = unique_name("twice")
        emulator.create_bucket(name)
        emulator.create_bucket(name)


@pytest.mark.parametrize("kind", ["s3", "gs", "az"])
def test_a_bucket_on_an_emulator_that_is_gone_is_a_clear_error(kind: EmulatorKind,
                                                               tmp_path: Path) -> None:
    dead = Emulator(kind, pid=2**22 + 1, port=9, endpoint=emu._endpoint(kind, 9),
                    log_path=tmp_path / "none.log")
    with pytest.raises(EmulatorError) as caught:
        dead.create_bucket("some-bucket")
    message = str(caught.value)
    assert f"{kind} emulator at http://127.0.0.1:9" in message
    assert "'some-bucket'" in message
    assert "\n" not in message


def test_emulators_stop_with_their_process_groups(tmp_path: Path) -> None:
    with running_emulators(["az"], tmp_path) as started:
        azurite = started["az"]
        assert azurite.running
        azurite.create_bucket("stop-test")
    assert not azurite.running
    assert group_is_gone(azurite.pid)
    azurite.stop()  # again: nothing left to do, no error
    assert "Azurite Blob service" in azurite.log_path.read_text()


def test_an_error_inside_the_block_still_stops_them(tmp_path: Path) -> None:
    seen: list[Emulator] = []

    def fail_inside() -> None:
        with running_emulators(["gs"], tmp_path) as started:
            seen.append(started["gs"])
            raise RuntimeError("inside")

    with pytest.raises(RuntimeError, match="inside"):
        fail_inside()
    assert group_is_gone(seen[0].pid)


def test_missing_azurite_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch,
                                                tmp_path: Path) -> None:
    monkeypatch.delenv("MULTICLOUD_AZURITE", raising=False)
    monkeypatch.setattr(emu, "_repo_root", lambda: None)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(EmulatorError) as caught:
        emu.start_emulators(["az"], tmp_path)
    assert "run `make setup` (npm ci installs azurite)" in str(caught.value)
    monkeypatch.setenv("MULTICLOUD_AZURITE", str(tmp_path / "nowhere" / "azurite-blob"))
    with pytest.raises(EmulatorError, match="MULTICLOUD_AZURITE"):
        emu.find_azurite()


def test_azurite_is_found_in_the_checkout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MULTICLOUD_AZURITE", raising=False)
    found = emu.find_azurite()
    assert found.name == "azurite-blob"
    assert found.is_file()


def test_an_emulator_that_dies_at_start_shows_its_log(monkeypatch: pytest.MonkeyPatch,
                                                      tmp_path: Path) -> None:
    script = "import sys; print('no such flag: --frobnicate'); sys.exit(3)"
    monkeypatch.setattr(emu, "_command", lambda kind, port: [sys.executable, "-c", script])
    with pytest.raises(EmulatorError) as caught:
        emu.start_emulators(["s3"], tmp_path)
    message = str(caught.value)
    assert "s3 emulator exited at start" in message
    assert "no such flag: --frobnicate" in message


def test_an_emulator_that_never_answers_is_stopped(monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: Path) -> None:
    script = "import time; print('warming up', flush=True); time.sleep(60)"
    monkeypatch.setattr(emu, "_command", lambda kind, port: [sys.executable, "-c", script])
    monkeypatch.setattr(emu, "READY_TIMEOUT_S", 0.5)
    spawned: list[Emulator] = []
    real_spawn = emu._spawn

    def spawn(kind: EmulatorKind, log_dir: Path) -> Emulator:
        spawned.append(real_spawn(kind, log_dir))
        return spawned[-1]

    monkeypatch.setattr(emu, "_spawn", spawn)
    with pytest.raises(EmulatorError) as caught:
        emu.start_emulators(["gs", "s3"], tmp_path)
    assert "did not answer" in str(caught.value)
    assert "warming up" in str(caught.value)
    assert spawned
    for emulator in spawned:
        assert not emulator.running
        assert group_is_gone(emulator.pid)


def test_unknown_kinds_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown emulator"):
        emu.start_emulators(["minio"], tmp_path)  # type: ignore[list-item]

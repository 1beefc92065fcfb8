"""A lost machine in cluster mode: the batches live on the nodes, not in a local file.

`multicloud cluster up` starts a registry and six nodes as processes; a batch runs against
them; then a fresh data dir holding nothing but the cluster's token (or no file at all and
`--token-file`) lists, restores and recovers it. Every command is its own process; the
module shares one cluster.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cli_harness import Outcome
from cluster_fixtures import assert_same_tree, pid_gone, wait_until, write_config_dir

from multicloud.datagen import generate_dataset

pytestmark = pytest.mark.timeout(180)

MIB = 1024 * 1024
COMMAND_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0


def multicloud(cwd: Path, *args: str | Path) -> Outcome:
    """Run `multicloud ARGS` as its own process from cwd, with no token in the environment."""
    env = {k: v for k, v in os.environ.items() if k != "MULTICLOUD_TOKEN"}
    done = subprocess.run([sys.executable, "-m", "multicloud.ui.cli", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=COMMAND_TIMEOUT_S, check=False)
    return Outcome(done.returncode, done.stdout, done.stderr)


@dataclass(frozen=True)
class UpCluster:
    """What `multicloud cluster up` started."""

    url: str
    data_dir: Path
    config_dir: Path


@pytest.fixture(scope="module")
def up_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UpCluster]:
    """A registry and six nodes from `multicloud cluster up`, shared by the module (each
    test runs its own batch); `cluster down` at the end, and SIGKILL for any of its
    processes that outlive that."""
    tmp_path = tmp_path_factory.mktemp("up")
    config_dir = write_config_dir(tmp_path / "cfg")
    data_dir = tmp_path / "cluster"
    on = ("--data-dir", data_dir, "--config-dir", config_dir)
    up = multicloud(tmp_path, "cluster", "up", "--registry-port", "0", "--node-base-port", "0",
                    "--json", *on)
    pids: list[int] = []
    try:
        assert up.code == 0, up.err
        state = up.json()
        pids = [p["pid"] for p in state["processes"]]
        yield UpCluster(state["registry"], data_dir, config_dir)
    finally:
        down = multicloud(tmp_path, "cluster", "down", *on)
        with contextlib.suppress(AssertionError):
            wait_until(lambda: all(pid_gone(pid) for pid in pids), STOP_TIMEOUT_S,
                       "the cluster's processes to exit")
        for pid in pids:
            if not pid_gone(pid):
                os.kill(pid, signal.SIGKILL)
        assert down.code == 0, down.err


def test_a_fresh_data_dir_with_the_token_lists_restores_and_recovers(
        tmp_path: Path, up_cluster: UpCluster) -> None:
    source = tmp_path / "src"
    generate_dataset(source, 1 * MIB, seed=40)
    cluster = ("--cluster", up_cluster.url, "--config-dir", up_cluster.config_dir)
    ran = multicloud(tmp_path, "run", "--source", source, "--batch-id", "cm", "--json",
                     "--log-file", tmp_path / "run.log", *cluster,
                     "--data-dir", up_cluster.data_dir)
    assert ran.code == 0, ran.err
    assert ran.json()["status"] == "success"

    # A new machine: only the token file, copied (its 0600 mode with it).
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    shutil.copy2(up_cluster.data_dir / "token", fresh / "token")

    listed = multicloud(tmp_path, "batches", "--json", *cluster, "--data-dir", fresh)

    assert listed.code == 0, listed.err
    assert ("cm", "success") in [(b["batch_id"], b["status"]) for b in listed.json()]
    assert "rebuilt the catalogue from the cluster" in listed.err, listed.err
    restored = multicloud(tmp_path, "restore", "cm", "--to", tmp_path / "restored", *cluster,
                          "--data-dir", fresh)
    assert restored.code == 0, restored.err
    assert_same_tree(source, tmp_path / "restored")
    recovered = multicloud(tmp_path, "recover", "--json", *cluster, "--data-dir", fresh)
    assert recovered.code == 0, recovered.err
    report = recovered.json()
    assert "cm" in report["batches"]
    assert report["failed"] == {}
    # The six nodes' catalogs, and the registry's copy in cluster mode.
    assert report["nodes_answered"] == report["nodes_asked"] >= 6


def test_recover_with_a_token_file_needs_nothing_in_the_data_dir(
        tmp_path: Path, up_cluster: UpCluster) -> None:
    source = tmp_path / "src"
    generate_dataset(source, 1 * MIB, seed=41)
    token = ("--token-file", up_cluster.data_dir / "token")
    cluster = ("--cluster", up_cluster.url, "--config-dir", up_cluster.config_dir, *token)
    ran = multicloud(tmp_path, "run", "--source", source, "--batch-id", "tf",
                     "--log-file", tmp_path / "run.log", *cluster,
                     "--data-dir", tmp_path / "first-machine")
    assert ran.code == 0, ran.err
    fresh = tmp_path / "second-machine"

    recovered = multicloud(tmp_path, "recover", *cluster, "--data-dir", fresh)

    assert recovered.code == 0, recovered.err
    assert recovered.out.startswith("recovered "), recovered.out
    named = recovered.out.rstrip().rpartition(": ")[2].split(", ")
    assert "tf" in named, recovered.out  # and any batch an earlier test ran on the cluster
    assert not (fresh / "token").exists()
    restored = multicloud(tmp_path, "restore", "tf", "--to", tmp_path / "restored", *cluster,
                          "--data-dir", fresh)
    assert restored.code == 0, restored.err
    assert_same_tree(source, tmp_path / "restored")

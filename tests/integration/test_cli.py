"""The `multicloud` command line end to end: every command's happy path, and bad input
rendered as one `error:` line with exit code 2 and nothing half-written.

Commands run in-process through `multicloud.ui.cli.main` (so coverage sees them); one test
runs the real entry point in a subprocess.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_harness import Cli, Outcome

from multicloud.ui.cli import main

CHUNK = 64 * 1024  # chunk_size_mb 0.0625, as the config dir below sets
DATASET_BYTES = 2 * 1024 * 1024
METRIC_KEYS = {"ingestion", "processing", "distribution", "storage", "node_failures_handled",
               "duration_seconds", "throughput_mb_s"}


def tree(root: Path) -> dict[str, bytes]:
    """Relative path -> bytes of every regular file under root."""
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def stored_objects(data_dir: Path) -> list[Path]:
    """Every replica file of every node of the embedded cluster."""
    return sorted(p for p in data_dir.glob("nodes/*/objects/**/*") if p.is_file())


def assert_usage_error(outcome: Outcome, *needles: str) -> str:
    """Exit code 2, one `error:` line on stderr naming every needle, no traceback."""
    return outcome.error_line(*needles)


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> Cli:
    """The CLI with 64 KiB chunks and a fresh data dir, run from tmp_path."""
    monkeypatch.chdir(tmp_path)  # the default --config-dir is relative: keep the repo's out
    return Cli(capsys, tmp_path)


@pytest.fixture
def source(cli: Cli) -> Path:
    """A 2 MiB dataset written by `multicloud gen-data`."""
    path = cli.root / "src"
    made = cli("gen-data", path, "--size", "2MiB")
    assert made.code == 0, made.err
    return path


@pytest.fixture
def ran(cli: Cli, source: Path) -> str:
    """The id of a batch `multicloud run` stored from `source`."""
    result = cli.run(source, "--batch-id", "b1")
    assert result.code == 0, result.err
    return "b1"


# -- happy paths ------------------------------------------------------------------------------


def test_gen_data_writes_an_exact_deterministic_dataset(cli: Cli) -> None:
    first, second = cli.root / "one", cli.root / "two"
    made = cli("gen-data", first, "--size", "2MiB", "--seed", "3")

    assert made.code == 0
    files = tree(first)
    assert f"wrote {len(files)} files, 2.0 MiB" in made.err
    assert sum(len(b) for b in files.values()) == DATASET_BYTES
    assert files["misc/empty.txt"] == b""
    assert any(path.count("/") >= 2 for path in files)  # nested folders
    assert {Path(p).suffix for p in files} >= {".jsonl", ".csv", ".bin"}
    assert cli("gen-data", second, "--size", "2MiB", "--seed", "3").code == 0
    assert tree(second) == files


def test_run_prints_a_summary(cli: Cli, source: Path) -> None:
    result = cli.run(source, "--batch-id", "nightly-001")

    assert result.code == 0, result.err
    assert "batch nightly-001: success" in result.out
    assert f"{len(tree(source))} / " in result.out  # files / chunks
    assert "Traceback" not in result.out + result.err
    assert not result.err.strip()


def test_run_json_reports_the_result(cli: Cli, source: Path) -> None:
    result = cli.run(source, "--batch-id", "j1", "--json")

    assert result.code == 0, result.err
    report = result.json()
    files = tree(source)
    assert report["status"] == "success"
    assert report["batch_id"] == "j1"
    assert report["error"] is None
    assert report["files"] == len(files)
    assert report["bytes_processed"] == DATASET_BYTES
    assert report["chunks_processed"] == sum(math.ceil(len(b) / CHUNK) for b in files.values())
    metrics = report["metrics"]
    assert set(metrics) >= METRIC_KEYS
    assert metrics["distribution"]["replica_success_rate"] == 1.0
    assert set(metrics["storage"]["by_cloud"]) == {"aws", "gcp"}
    assert metrics["storage"]["under_replicated"] == 0


def test_restore_rebuilds_the_batch_byte_exact(cli: Cli, source: Path, ran: str) -> None:
    dest = cli.root / "restored"
    files = tree(source)

    restored = cli.on_cluster("restore", ran, "--to", dest)

    assert restored.code == 0, restored.err
    assert f"restored {len(files)} files, 2.0 MiB" in restored.out
    assert tree(dest) == files
    assert (dest / "misc" / "empty.txt").stat().st_size == 0
    assert tree(source) == files  # the source is only read
    as_json = cli.on_cluster("restore", ran, "--to", cli.root / "again", "--json")
    assert as_json.code == 0, as_json.err
    report = as_json.json()
    assert report["files_restored"] == len(files)
    assert report["bytes_restored"] == DATASET_BYTES
    assert report["failed_files"] == []
    assert tree(cli.root / "again") == files


def test_verify_passes_then_names_a_corrupt_replica(cli: Cli, ran: str) -> None:
    clean = cli.on_cluster("verify", ran)
    assert clean.code == 0, clean.err
    assert clean.out.startswith(f"batch {ran}: ")

    victim = stored_objects(cli.data_dir)[0]
    node_id = victim.relative_to(cli.data_dir / "nodes").parts[0]
    blob = bytearray(victim.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    victim.write_bytes(bytes(blob))

    found = cli.on_cluster("verify", ran)
    assert found.code == 1, found.err
    assert "Traceback" not in found.out + found.err
    assert f"corrupt: chunk {victim.name[:16]} on {node_id}" in found.out
    as_json = cli.on_cluster("verify", ran, "--json")
    assert as_json.code == 1
    report = as_json.json()
    assert report["ok"] is False
    assert report["replicas_ok"] == report["replicas_checked"] - 1
    assert [(p["chunk_id"], p["node_id"], p["problem"]) for p in report["problems"]] == [
        (victim.name, node_id, "corrupt")]


def test_cluster_status_shows_nodes_by_cloud(cli: Cli, source: Path) -> None:
    before = cli.on_cluster("cluster", "status", "--json")
    assert before.code == 0, before.err
    assert [n["chunks"] for n in before.json()["nodes"]] == [0] * 6
    assert cli.run(source, "--batch-id", "b1").code == 0

    status = cli.on_cluster("cluster", "status", "--json")

    assert status.code == 0, status.err
    view = status.json()
    assert view["data_dir"] == str(cli.data_dir)
    nodes = view["nodes"]
    assert len(nodes) == 6
    assert sorted(n["cloud"] for n in nodes) == ["aws"] * 3 + ["gcp"] * 3
    assert {n["status"] for n in nodes} == {"healthy"}
    assert all(n["chunks"] > 0 and n["bytes"] > 0 for n in nodes)
    assert sum(n["chunks"] for n in nodes) == len(stored_objects(cli.data_dir))
    table = cli.on_cluster("cluster", "status")
    assert table.code == 0, table.err
    for node in nodes:
        assert node["id"] in table.out
    assert "healthy" in table.out


def test_batches_lists_runs_newest_first(cli: Cli, source: Path, ran: str) -> None:
    assert cli.run(source, "--batch-id", "b2").code == 0

    listed = cli.on_cluster("batches")

    assert listed.code == 0, listed.err
    assert [line.split("\t")[:2] for line in listed.out.splitlines()] == [
        ["b2", "success"], [ran, "success"]]
    as_json = cli.on_cluster("batches", "--json").json()
    assert [(b["batch_id"], b["status"], b["source"]) for b in as_json] == [
        ("b2", "success", str(source)), (ran, "success", str(source))]


def test_the_console_entry_point_runs_as_a_process(cli: Cli, source: Path) -> None:
    def multicloud(*args: str | Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "multicloud.ui.cli", *map(str, args)],
                              capture_output=True, text=True, cwd=cli.root, timeout=120,
                              check=False)

    ok = multicloud("run", "--source", source, "--batch-id", "sp", "--json",
                    "--config-dir", cli.config_dir, "--data-dir", cli.data_dir)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["status"] == "success"
    bad = multicloud("gen-data", cli.root / "x", "--size", "12XB")
    assert_usage_error(Outcome(bad.returncode, bad.stdout, bad.stderr), "12XB")


# -- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(("bad", "needles"), [
    ("missing", ["does not exist"]),
    # No credentials anywhere (the test's environment has none): refused before anything
    # is recorded, naming the variables that would fix it.
    ("s3://bucket/x", ["s3://bucket/x/", "no AWS credentials", "AWS_ACCESS_KEY_ID"]),
], ids=["missing-path", "s3-url-without-credentials"])
def test_a_bad_source_is_refused_and_records_nothing(cli: Cli, source: Path, ran: str,
                                                      bad: str, needles: list[str]) -> None:
    bad_source = str(cli.root / bad) if bad == "missing" else bad
    before, objects = tree(source), stored_objects(cli.data_dir)

    result = cli.run(bad_source, "--batch-id", "b2")

    assert_usage_error(result, bad_source, *needles)
    assert cli.batch_ids() == [ran]
    assert stored_objects(cli.data_dir) == objects
    assert tree(source) == before


def test_a_bad_source_with_json_reports_a_failed_result(cli: Cli) -> None:
    missing = cli.root / "missing"

    result = cli.run(missing, "--batch-id", "b1", "--json")

    assert result.code == 2
    assert "Traceback" not in result.out + result.err
    report = result.json()
    assert report["status"] == "failed"
    assert str(missing) in report["error"]
    assert cli.batch_ids() == []


@pytest.mark.parametrize(("section", "text", "needles"), [
    ("ingestion", "chunk_size_mb: 0.0625\nmax_inflight_chunks: 4\n  read_ahead: 2\n",
     ["ingestion_config.yml", "invalid YAML at line 3"]),
    ("ingestion", "chunk_size_mb: 0.0625\nchunk_size: 1\n",
     ["ingestion_config.yml", "unknown key 'chunk_size'",
      "valid keys: chunk_size_mb, max_inflight_chunks, read_ahead"]),
    ("ingestion", "chunk_size_mb: 0\n", ["chunk_size_mb", "greater than 0", "(got 0)"]),
    ("ingestion", "chunk_size_mb: -5\n", ["chunk_size_mb", "greater than 0", "(got -5)"]),
    ("distribution", "write_quorum: 4\nreplication_factor: 3\n",
     ["distribution_config.yml", "write_quorum (4)", "replication_factor (3)"]),
], ids=["invalid-yaml", "unknown-key", "zero-chunk", "negative-chunk", "quorum-above-rf"])
def test_a_bad_config_is_refused_before_anything_is_written(
        cli: Cli, source: Path, section: str, text: str, needles: list[str]) -> None:
    cli.write_config(section, text)
    before = tree(source)

    result = cli.run(source, "--batch-id", "b1")

    assert_usage_error(result, *needles)
    assert not cli.data_dir.exists()
    assert tree(source) == before


# Fewer nodes than replication_factor, or clouds than min_clouds, runs at write quorum
# (tests/integration/test_hinted_handoff.py); below the quorum, or without the second
# cloud that --force-cross-cloud asks for, nothing runs.
@pytest.mark.parametrize(("nodes_per_cloud", "extra", "needles"), [
    ("{aws: 3}", ["--force-cross-cloud"], ["force_cross_cloud", "span 1 cloud(s) (aws)"]),
    ("{aws: 1}", [], ["replication_factor is 3", "write_quorum 2",
                      "only 1 healthy node(s)"]),
], ids=["one-cloud-forced", "one-node"])
def test_a_cluster_too_small_for_the_policy_runs_nothing(
        cli: Cli, source: Path, nodes_per_cloud: str, extra: list[str],
        needles: list[str]) -> None:
    cli.write_config("cluster", f"nodes_per_cloud: {nodes_per_cloud}\n")
    before = tree(source)

    result = cli.run(source, "--batch-id", "b1", *extra)

    assert_usage_error(result, *needles)
    assert cli.batch_ids() == []
    assert stored_objects(cli.data_dir) == []
    assert tree(source) == before


@pytest.mark.parametrize("command", ["restore", "verify"])
def test_an_unknown_batch_names_the_known_ones(cli: Cli, ran: str, command: str) -> None:
    dest = cli.root / "restored"
    extra = ["--to", dest] if command == "restore" else []

    result = cli.on_cluster(command, "nope", *extra)

    assert_usage_error(result, "unknown batch 'nope'", f"known batches: {ran}")
    assert not dest.exists()


@pytest.mark.parametrize("command", ["restore", "verify"])
def test_restore_and_verify_before_any_run_say_so(cli: Cli, command: str) -> None:
    extra = ["--to", cli.root / "restored"] if command == "restore" else []

    result = cli.on_cluster(command, "b1", *extra)

    assert_usage_error(result, "no pipeline has run", str(cli.data_dir), "multicloud run")
    assert not (cli.data_dir / "manifest.db").exists()
    assert not (cli.root / "restored").exists()


def test_gen_data_refuses_a_bad_size(cli: Cli) -> None:
    dest = cli.root / "data"

    result = cli("gen-data", dest, "--size", "12XB")

    assert_usage_error(result, "'12XB'", "unknown unit 'XB'", "MiB")
    assert not dest.exists()


def test_gen_data_refuses_a_non_empty_dir(cli: Cli) -> None:
    dest = cli.root / "data"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")

    result = cli("gen-data", dest, "--size", "2MiB")

    assert_usage_error(result, str(dest), "not empty")
    assert tree(dest) == {"keep.txt": b"mine"}


def test_a_missing_required_argument_is_a_usage_error(
        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["run"])

    assert exited.value.code == 2
    assert "--source" in capsys.readouterr().err


# -- a full disk ---------------------------------------------------------------------------


@pytest.fixture
def small_disk(cli: Cli) -> Iterator[Path]:
    """The data dir on a 24 MiB tmpfs of its own (tests run as root, here and in CI)."""
    cli.data_dir.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs",
                              str(cli.data_dir)], capture_output=True, text=True)
    assert mounted.returncode == 0, f"cannot mount a tmpfs (needs root): {mounted.stderr}"
    try:
        yield cli.data_dir
    finally:
        subprocess.run(["umount", "-l", str(cli.data_dir)], check=True)


def test_a_full_disk_is_one_line_and_earlier_batches_stay_intact(
        cli: Cli, source: Path, small_disk: Path) -> None:
    first = cli.run(source, "--batch-id", "small")
    assert first.code == 0, first.err
    # 30 MiB that do not compress cannot fit three times on 24 MiB: every replica write
    # fails on a full disk, each one fails over, and the batch fails as one line.
    noise = cli.root / "noise"
    noise.mkdir()
    for name in ("a.bin", "b.bin", "c.bin"):
        (noise / name).write_bytes(os.urandom(10 * 1024 * 1024))
    full = cli.run(noise, "--batch-id", "big")
    assert_usage_error(full, "disk full", "free some space")
    assert not list(small_disk.glob("nodes/*/tmp/*")), "a failed write left a temp file"

    # Not a byte of room left: the orchestrator's own files fail as one line too.
    filler = small_disk / "filler"
    with filler.open("wb") as handle, contextlib.suppress(OSError):
        while True:
            handle.write(b"\0" * 1024 * 1024)
    again = cli.run(noise, "--batch-id", "big")
    assert_usage_error(again, "No space left on device")
    filler.unlink()

    verify = cli.on_cluster("verify", "small")
    assert verify.code == 0, verify.out
    restored = cli.on_cluster("restore", "small", "--to", cli.root / "back")
    assert restored.code == 0, restored.err
    assert tree(cli.root / "back") == tree(source)

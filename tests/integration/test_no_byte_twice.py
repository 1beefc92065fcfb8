"""No byte twice: a chunk the cluster holds at its replication factor is not sent again, and
small files travel in packs (fetched once on restore)."""

from __future__ import annotations

import json
import random
from pathlib import Path

from cluster_fixtures import assert_same_tree, write_files

from multicloud import Cluster, PipelineConfig, PipelineOrchestrator

CHUNK = 64 * 1024


def records(n: int, seed: int) -> bytes:
    rng = random.Random(seed)
    return b"".join(json.dumps({"i": i, "v": rng.random()}).encode() + b"\n"
                    for i in range(n))


def dataset(root: Path) -> Path:
    rng = random.Random(7)
    files = {"big.bin": rng.randbytes(3 * CHUNK + 11),
             "logs/app.jsonl": records(3000, 1),  # several chunks, lines across them
             "tables/t.csv": b"a,b\n" + b"".join(b"%d,%d\n" % (i, i * i) for i in range(9000))}
    files.update({f"small/{i:03d}.jsonl": records(3, i) for i in range(40)})
    return write_files(root, files)


async def run(orchestrator: PipelineOrchestrator, batch_id: str, source: Path) -> dict:
    result = await orchestrator.run_pipeline({"batch_id": batch_id, "data_source": str(source),
                                              "source_cloud": "aws"})
    assert result.status == "success", result.error
    return result.to_dict()


async def test_a_second_batch_of_the_same_data_sends_nothing_and_restores(
        orchestrator: PipelineOrchestrator, node_registry: Cluster, tmp_path: Path) -> None:
    source = dataset(tmp_path / "src")
    first = await run(orchestrator, "first", source)
    assert first["metrics"]["already_stored"]["chunks"] == 0
    assert first["metrics"]["distribution"]["egress_cost_usd"] > 0

    second = await run(orchestrator, "second", source)

    stored = second["metrics"]["already_stored"]
    assert stored["chunks"] == first["chunks_processed"]
    assert stored["bytes"] == first["bytes_processed"]
    assert second["metrics"]["processing"]["attempted"] == 0
    assert second["metrics"]["distribution"]["replica_writes"] == 0
    # Only the batch's own manifest travelled.
    assert second["metrics"]["distribution"]["egress_cost_usd"] < \
        first["metrics"]["distribution"]["egress_cost_usd"] / 100
    await orchestrator.restore_batch("second", tmp_path / "back")
    assert_same_tree(source, tmp_path / "back")


async def test_a_chunk_below_its_factor_or_with_bad_records_goes_through_again(
        orchestrator: PipelineOrchestrator, node_registry: Cluster, tmp_path: Path) -> None:
    source = dataset(tmp_path / "src")
    (source / "logs" / "broken.jsonl").write_bytes(b'{"ok": 1}\n{"cut": \n')
    await run(orchestrator, "first", source)
    manifest = orchestrator.storage_manager.manifest
    big = next(r for r in manifest.chunks("first") if r.path == "big.bin")
    holder = manifest.replicas([big.chunk_id])[big.chunk_id][0]
    node = node_registry.get(holder)
    await node_registry.client.delete(node, big.chunk_id)  # one replica lost behind our back

    second = await run(orchestrator, "second", source)

    # The lost replica's chunk and the file with a bad record were processed again; the
    # bad record is reported again; everything else was stored already.
    assert second["metrics"]["processing"]["attempted"] == 2
    assert second["metrics"]["already_stored"]["chunks"] == second["chunks_processed"] - 2
    assert "logs/broken.jsonl" in orchestrator.processing_pool.quarantined
    assert big.chunk_id in await node_registry.client.inventory(node)
    await orchestrator.restore_batch("second", tmp_path / "back")
    assert_same_tree(source, tmp_path / "back")


async def test_without_record_checks_every_stored_chunk_is_reused(
        node_registry: Cluster, config: PipelineConfig, tmp_path: Path) -> None:
    unchecked = config.replace(processing={"parse_records": False})
    source = dataset(tmp_path / "src")
    (source / "logs" / "broken.jsonl").write_bytes(b'{"cut": \n')
    orchestrator = PipelineOrchestrator(node_registry, config=unchecked)
    try:
        first = await run(orchestrator, "first", source)
        second = await run(orchestrator, "second", source)
    finally:
        await orchestrator.close()
    assert second["metrics"]["already_stored"]["chunks"] == first["chunks_processed"]


async def test_small_files_travel_in_packs_and_come_back_exact(
        orchestrator: PipelineOrchestrator, tmp_path: Path) -> None:
    rng = random.Random(3)
    files = {f"d{i % 7}/f{i:04d}.{'jsonl' if i % 3 else 'bin'}":
             records(2, i) if i % 3 else rng.randbytes(rng.randrange(1, 900))
             for i in range(300)}
    files["d0/empty.txt"] = b""
    files["d1/dup-a.bin"] = files["d1/dup-b.bin"] = b"same bytes twice"
    source = write_files(tmp_path / "src", files)

    result = await run(orchestrator, "small", source)

    assert result["files"] == len(files)
    assert result["chunks_processed"] <= 5  # 300 files in 64 KiB packs
    manifest = orchestrator.storage_manager.manifest
    assert len(manifest.chunk_ids("small")) == result["chunks_processed"]
    await orchestrator.restore_batch("small", tmp_path / "back")
    assert_same_tree(source, tmp_path / "back")
    report = await orchestrator.verify_batch("small")
    assert not report.problems


async def test_a_reused_chunk_removed_during_the_run_fails_the_batch_until_run_again(
        orchestrator: PipelineOrchestrator, node_registry: Cluster, tmp_path: Path) -> None:
    source = dataset(tmp_path / "src")
    await run(orchestrator, "first", source)
    manifest = orchestrator.storage_manager.manifest
    big = next(r for r in manifest.chunks("first") if r.path == "big.bin")
    removed = False
    check = orchestrator._check_reused

    async def gc_meanwhile() -> None:
        # What a delete + gc of "first" does while "second" runs: after "second" decided
        # to reuse the chunk, every copy of it goes.
        nonlocal removed
        if not removed:
            removed = True
            for node_id in manifest.replicas([big.chunk_id])[big.chunk_id]:
                await node_registry.client.delete(node_registry.get(node_id), big.chunk_id)
        await check()

    orchestrator._check_reused = gc_meanwhile  # type: ignore[method-assign]
    failed = await orchestrator.run_pipeline({"batch_id": "second",
                                              "data_source": str(source)})
    assert failed.status == "failed"
    assert "1 chunk(s) this batch found stored already are on no healthy node" in \
        (failed.error or "")
    assert "run the same command again" in (failed.error or "")

    again = await run(orchestrator, "second", source)  # resumes, sends the lost chunk
    assert again["metrics"]["processing"]["attempted"] >= 1
    await orchestrator.restore_batch("second", tmp_path / "back")
    assert_same_tree(source, tmp_path / "back")


async def test_packed_files_resume_by_packing_again_whatever_the_settings(
        node_registry: Cluster, config: PipelineConfig, tmp_path: Path) -> None:
    source = dataset(tmp_path / "src")
    first = PipelineOrchestrator(node_registry, config=config)
    try:
        await run(first, "b", source)
        # As if the run had been interrupted after committing everything.
        first.storage_manager.manifest.finish_batch("b", "interrupted")
    finally:
        await first.close()
    unpacked = config.replace(ingestion={"pack_below_mb": 0})  # the files are chunks now
    again = PipelineOrchestrator(node_registry, config=unpacked)
    try:
        result = await run(again, "b", source)
        # The files packed before are not resumed from their pack's rows: read again.
        chunked = ("big.bin", "logs/app.jsonl", "tables/t.csv")
        assert result["metrics"]["resumed_chunks"] == sum(
            -(-(source / name).stat().st_size // CHUNK) for name in chunked)
        await again.restore_batch("b", tmp_path / "back")
    finally:
        await again.close()
    assert_same_tree(source, tmp_path / "back")

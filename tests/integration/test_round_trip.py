"""Property: whatever files go in come back byte-exact, at every chunk-boundary size."""

from __future__ import annotations

import itertools
import random
import tempfile
from pathlib import Path

from cluster_fixtures import expected_chunks
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from multicloud import PipelineConfig, PipelineOrchestrator

CHUNK = 64 * 1024
SIZES = [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 7]

# Each file: a size, a seed for its random bytes, and whether it copies an earlier file of
# the same size (identical chunks in one batch share one chunk id).
files_strategy = st.lists(
    st.tuples(st.sampled_from(SIZES), st.integers(0, 2**32 - 1), st.booleans()),
    min_size=1, max_size=5,
)

_batches = itertools.count()


def write_files(root: Path, files: list[tuple[int, int, bool]]) -> dict[str, bytes]:
    """Write the drawn files under root (some nested); returns path -> bytes."""
    written: dict[str, bytes] = {}
    by_size: dict[int, bytes] = {}
    for i, (size, seed, copy) in enumerate(files):
        data = by_size[size] if copy and size in by_size else random.Random(seed).randbytes(size)
        by_size.setdefault(size, data)
        rel = f"f{i}.bin" if i % 2 == 0 else f"nested/d{i}/f{i}.bin"
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        written[rel] = data
    return written


@settings(max_examples=10, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(files=files_strategy)
async def test_files_round_trip_byte_exact(orchestrator: PipelineOrchestrator,
                                           config: PipelineConfig,
                                           files: list[tuple[int, int, bool]]) -> None:
    assert config.ingestion.chunk_size_bytes == CHUNK
    batch_id = f"round-trip-{next(_batches)}"  # one cluster, a fresh batch per example
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "source"
        written = write_files(source, files)

        result = await orchestrator.run_pipeline({"batch_id": batch_id,
                                                  "data_source": str(source),
                                                  "source_cloud": "aws"})

        assert result.status == "success", result.error
        assert result.files == len(written)
        assert result.bytes_processed == sum(len(b) for b in written.values())
        assert result.chunks_processed == expected_chunks(source, config.ingestion)
        dest = Path(tmp) / "restored"
        report = await orchestrator.restore_batch(batch_id, dest)
        assert report.failed_files == []
        restored = {p.relative_to(dest).as_posix(): p.read_bytes()
                    for p in dest.rglob("*") if p.is_file()}
        assert restored.keys() == written.keys()
        for rel, data in written.items():
            assert restored[rel] == data, rel

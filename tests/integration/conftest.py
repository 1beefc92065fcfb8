"""Integration fixtures: extra orchestrators on the test cluster, and whole-tree checks."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from cluster_fixtures import assert_same_tree, tree

from multicloud import NodeRegistry, PipelineConfig, PipelineOrchestrator, RestoreReport

AssertRestored = Callable[..., Awaitable[RestoreReport]]




@pytest.fixture
async def make_orchestrator(
    setup_test_cluster: NodeRegistry, config: PipelineConfig,
) -> AsyncIterator[Callable[..., PipelineOrchestrator]]:
    """Orchestrators on the test cluster with section overrides of the 64 KiB config."""
    made: list[PipelineOrchestrator] = []

    def make(**sections: dict[str, object]) -> PipelineOrchestrator:
        orch = PipelineOrchestrator(setup_test_cluster,
                                    config=config.replace(**sections) if sections else config)
        made.append(orch)
        return orch

    yield make
    for orch in made:
        await orch.close()


@pytest.fixture
def assert_restored(tmp_path: Path) -> AssertRestored:
    """Restore a batch into a fresh directory and check it equals the source, byte for byte."""
    count = 0

    async def check(orchestrator: PipelineOrchestrator, batch_id: str, source: Path,
                    dest: Path | None = None) -> RestoreReport:
        nonlocal count
        count += 1
        dest = dest or tmp_path / f"restored-{count}"
        report = await orchestrator.restore_batch(batch_id, dest)
        assert_same_tree(source, dest)
        want = tree(source)
        assert report.files_restored == len(want)
        assert report.bytes_restored == sum(len(b) for b in want.values())
        assert report.failed_files == []
        return report

    return check

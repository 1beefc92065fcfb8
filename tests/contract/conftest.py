"""The contract suite: what every carrier of the data plane must do, run on each of them.

Every test takes `cluster` (or `kind`, to build its own) and so runs twice, on the embedded
cluster ("inproc") and on the same nodes over loopback HTTP ("http"); the test id says
which. A behaviour that differs between the two fails on one of them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cluster_kinds import KINDS, make_cluster
from multicloud import Cluster


@pytest.fixture(params=KINDS, ids=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    """The carrier under test: "inproc" or "http"."""
    return str(request.param)


@pytest.fixture
async def cluster(kind: str, tmp_path: Path) -> AsyncIterator[Cluster]:
    """3 AWS and 3 GCP nodes of the test's kind under tmp_path, closed after."""
    made = await make_cluster(kind, tmp_path / "cluster", {"aws": 3, "gcp": 3})
    yield made
    await made.close()

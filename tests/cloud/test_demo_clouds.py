"""`make demo-clouds`: the five parts with the source and every replica in buckets of three
(emulated) clouds, ending with a byte-exact restore into a bucket and into a folder."""

from __future__ import annotations

import io
import os
from pathlib import Path

from rich.console import Console

from multicloud.core.units import parse_size
from multicloud.ui.demo import DemoOptions, run_demo


async def test_the_cloud_demo_runs_its_five_parts_on_three_stores(tmp_path: Path) -> None:
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    (config_dir / "ingestion_config.yml").write_text("chunk_size_mb: 0.25\n")
    env_before = dict(os.environ)
    out = Console(record=True, width=110, file=io.StringIO())
    options = DemoOptions(workdir=tmp_path / "demo", config_dir=config_dir,
                          size=parse_size("4MiB"), clouds=True)

    ok = await run_demo(options, out)

    text = " ".join(out.export_text().split())
    assert ok, text
    for part in ("s3 emulator: http://127.0.0.1:", "gs emulator: http://127.0.0.1:",
                 "az emulator: http://127.0.0.1:", "uploaded 4.0 MiB to s3://mc-source/data/",
                 "S3, GCS and Azure Blob emulators", "1. Cluster status",
                 "test dataset from s3://mc-source/data/", "3. Results",
                 "4. Failure recovery", "5. Final statistics",
                 "0 missing or corrupt"):
        assert part in text, part
    assert "restore demo-2: " in text
    assert "restore demo-2 into s3://mc-restore/demo-2/" in text
    assert text.count("byte-identical to the source: yes") == 2, text
    for cloud in ("aws", "gcp", "azure"):  # a replica in every cloud's store
        assert f"{cloud}: " in text
    # The emulators are gone and the environment is as it was.
    assert dict(os.environ) == env_before
    pids = [int(line.split("(pid ")[1].split(")")[0]) for line in text.split("emulator: ")[1:]]
    assert pids
    assert not any(alive(pid) for pid in pids)


def alive(pid: int) -> bool:
    """Whether pid is a running process (a zombie is not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"

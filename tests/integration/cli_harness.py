"""The CLI as tests drive it: `multicloud` run in-process, and what a command gave back."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from multicloud.ui.cli import main


@dataclass(frozen=True)
class Outcome:
    """Exit code and captured output of one finished command."""

    code: int
    out: str
    err: str

    def json(self) -> Any:
        """stdout parsed as JSON."""
        return json.loads(self.out)

    def error_line(self, *needles: str) -> str:
        """Exit code 2 and stderr of one `error:` line naming every needle, no traceback."""
        assert self.code == 2, (self.code, self.out[-2000:], self.err[-2000:])
        assert "Traceback" not in self.out + self.err, self.err
        lines = self.err.splitlines()
        assert len(lines) == 1, self.err
        assert lines[0].startswith("error: "), lines[0]
        for needle in needles:
            assert needle in lines[0], (needle, lines[0])
        return lines[0]


class Cli:
    """Runs `multicloud` in-process against one config dir and one data dir."""

    def __init__(self, capsys: pytest.CaptureFixture[str], root: Path) -> None:
        self.capsys = capsys
        self.root = root
        self.config_dir = root / "cfg"
        self.data_dir = root / "dd"
        self.config_dir.mkdir()
        self.write_config("ingestion", "chunk_size_mb: 0.0625\n")

    def __call__(self, *args: str | Path) -> Outcome:
        self.capsys.readouterr()
        code = main([str(a) for a in args])
        out, err = self.capsys.readouterr()
        return Outcome(code, out, err)

    def on_cluster(self, *args: str | Path) -> Outcome:
        """A command that takes --config-dir and --data-dir, with this workspace's."""
        return self(*args, "--config-dir", self.config_dir, "--data-dir", self.data_dir)

    def run(self, source: str | Path, *args: str | Path) -> Outcome:
        """multicloud run --source SOURCE ..."""
        return self.on_cluster("run", "--source", source, *args)

    def batch_ids(self) -> list[str]:
        """The batch ids `multicloud batches --json` lists (none before any manifest)."""
        if not (self.data_dir / "manifest.db").exists():
            return []
        listed = self.on_cluster("batches", "--json")
        assert listed.code == 0, listed.err
        return [b["batch_id"] for b in listed.json()]

    def write_config(self, section: str, text: str) -> None:
        """Write <config dir>/<section>_config.yml."""
        (self.config_dir / f"{section}_config.yml").write_text(text)

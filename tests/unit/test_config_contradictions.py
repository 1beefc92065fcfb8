"""Configs that cannot mean what they say are refused at load time, in one line.

Each rule is checked three ways: on the model, through `load_config` from a YAML dir (the
message names the file, the values, what is allowed and the fix), and through
`multicloud run` (one `error:` line, exit code 2, nothing written).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from multicloud.core.config import (
    MIN_CHUNK_BYTES,
    DistributionConfig,
    IngestionConfig,
    PipelineConfig,
    file_name,
    load_config,
)
from multicloud.core.errors import ConfigError
from multicloud.ui.cli import main

# (section, YAML text, what the one-line message must name)
CONTRADICTIONS = [
    pytest.param("distribution", "replication_factor: 1\nwrite_quorum: 1\n",
                 ["replication_factor (1) must be >= min_clouds (2)",
                  "raise replication_factor to 2 or lower min_clouds to 1"],
                 id="rf-below-min-clouds"),
    pytest.param("distribution", "replication_factor: 2\nwrite_quorum: 2\nmin_clouds: 3\n",
                 ["replication_factor (2) must be >= min_clouds (3)",
                  "raise replication_factor to 3 or lower min_clouds to 2"],
                 id="rf-below-explicit-min-clouds"),
    pytest.param("distribution", "replication_factor: 2\nwrite_quorum: 3\n",
                 ["write_quorum (3) must be <= replication_factor (2)",
                  "lower write_quorum to 2 or raise replication_factor to 3"],
                 id="quorum-above-rf"),
    pytest.param("ingestion", "chunk_size_mb: 0.0000001\n",
                 ["chunk_size_mb", "below the 64 KiB minimum",
                  "set chunk_size_mb to 0.0625 or more", "(got 1e-07)"],
                 id="chunk-rounds-to-bytes"),
    pytest.param("ingestion", "chunk_size_mb: 0.06\n",
                 ["chunk_size_mb", "62914.6 bytes", "below the 64 KiB minimum",
                  "(got 0.06)"],
                 id="chunk-just-under-64-kib"),
    pytest.param("ingestion", "chunk_size_mb: .inf\n", ["chunk_size_mb", "finite number"],
                 id="chunk-infinite"),
]


def write(directory: Path, section: str, text: str) -> Path:
    """Write one config file into directory; returns its path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / file_name(section)
    path.write_text(text)
    return path


# -- the models ---------------------------------------------------------------------------


def test_replicas_must_span_min_clouds() -> None:
    with pytest.raises(ValidationError, match=r"replication_factor \(1\) must be >= min_clouds"):
        DistributionConfig(replication_factor=1, write_quorum=1)
    # rf 1 is fine once the config stops asking for two clouds
    assert DistributionConfig(replication_factor=1, write_quorum=1, min_clouds=1).min_clouds == 1
    assert DistributionConfig(replication_factor=2, write_quorum=1).replication_factor == 2


def test_chunks_are_at_least_64_kib() -> None:
    with pytest.raises(ValidationError, match="below the 64 KiB minimum"):
        IngestionConfig(chunk_size_mb=0.0625 - 1e-9)
    smallest = IngestionConfig(chunk_size_mb=0.0625)
    assert smallest.chunk_size_bytes == MIN_CHUNK_BYTES == 64 * 1024


def test_overrides_obey_the_same_rules() -> None:
    with pytest.raises(ConfigError, match=r"distribution override: replication_factor \(1\)"):
        PipelineConfig().replace(distribution={"replication_factor": 1, "write_quorum": 1})
    with pytest.raises(ConfigError, match=r"ingestion override: chunk_size_mb: .*64 KiB"):
        PipelineConfig().replace(ingestion={"chunk_size_mb": 0.001})
    relaxed = PipelineConfig().replace(
        distribution={"replication_factor": 1, "write_quorum": 1, "min_clouds": 1})
    assert relaxed.distribution.replication_factor == 1


# -- load_config ---------------------------------------------------------------------------


@pytest.mark.parametrize(("section", "text", "needles"), CONTRADICTIONS)
def test_load_config_refuses_in_one_line(tmp_path: Path, section: str, text: str,
                                         needles: list[str]) -> None:
    path = write(tmp_path, section, text)
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path)
    message = str(err.value)
    assert message.startswith(f"{path}: ")
    assert "\n" not in message
    for needle in needles:
        assert needle in message, (needle, message)
    # A rule across keys names its values itself: no "(top level)", no mapping echoed back.
    assert "top level" not in message
    assert "{" not in message
    assert "Value error" not in message


# -- the CLI ------------------------------------------------------------------------------


@pytest.mark.parametrize(("section", "text", "needles"), CONTRADICTIONS)
def test_run_refuses_with_one_error_line_and_exit_2(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        section: str, text: str, needles: list[str]) -> None:
    monkeypatch.chdir(tmp_path)  # the default --config-dir is relative: keep the repo's out
    config_dir, data_dir, source = tmp_path / "cfg", tmp_path / "dd", tmp_path / "src"
    source.mkdir()
    (source / "records.jsonl").write_text('{"n": 1}\n')
    write(config_dir, section, text)

    code = main(["run", "--source", str(source), "--batch-id", "b1",
                 "--config-dir", str(config_dir), "--data-dir", str(data_dir)])

    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert "Traceback" not in out + err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"error: {config_dir / file_name(section)}: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert not data_dir.exists()  # refused before the embedded cluster was made

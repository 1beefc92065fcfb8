"""Tests for configuration: shipped defaults, the repo's config dir, and every refusal."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel, ValidationError

from multicloud.core.config import (
    ClusterConfig,
    DistributionConfig,
    IngestionConfig,
    NodeSpec,
    PipelineConfig,
    ProcessingConfig,
    StorageConfig,
    TimeoutConfig,
    default_yaml,
    file_name,
    load_config,
)
from multicloud.core.errors import ConfigError

REPO_CONFIG = Path(__file__).resolve().parents[2] / "config"
SECTIONS: dict[str, type[BaseModel]] = {
    "ingestion": IngestionConfig,
    "processing": ProcessingConfig,
    "distribution": DistributionConfig,
    "storage": StorageConfig,
    "cluster": ClusterConfig,
}


def write(directory: Path, section: str, text: str) -> Path:
    """Write one config file into directory; returns its path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / file_name(section)
    path.write_text(text)
    return path


# -- defaults agree -------------------------------------------------------------------


@pytest.mark.parametrize(("section", "model"), list(SECTIONS.items()))
def test_shipped_defaults_equal_the_model_defaults(section: str, model: type[BaseModel]) -> None:
    raw = yaml.safe_load(default_yaml(section))
    assert isinstance(raw, dict)
    assert model.model_validate(raw) == model()
    # every field is spelled out in the shipped file, so it documents them all
    assert set(raw) == set(model.model_fields)


@pytest.mark.parametrize("section", list(SECTIONS))
def test_repo_config_equals_the_shipped_defaults(section: str) -> None:
    repo = yaml.safe_load((REPO_CONFIG / file_name(section)).read_text())
    assert repo == yaml.safe_load(default_yaml(section))


def test_repo_config_dir_holds_the_five_files() -> None:
    assert sorted(p.name for p in REPO_CONFIG.glob("*.yml")) == sorted(
        file_name(s) for s in SECTIONS)
    assert load_config(REPO_CONFIG) == load_config(None) == PipelineConfig()


def test_file_names_follow_the_request() -> None:
    assert file_name("distribution") == "distribution_config.yml"


def test_missing_dir_means_defaults(tmp_path: Path) -> None:
    assert load_config(tmp_path / "does-not-exist") == PipelineConfig()
    assert load_config(tmp_path) == PipelineConfig()  # exists, but empty


def test_a_file_as_config_dir_is_refused(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "config"
    not_a_dir.write_text("")
    with pytest.raises(ConfigError, match="is not a directory"):
        load_config(not_a_dir)


def test_partial_file_keeps_other_defaults(tmp_path: Path) -> None:
    write(tmp_path, "ingestion", "chunk_size_mb: 50\n")
    write(tmp_path, "distribution", "timeouts:\n  min_s: 2\n")
    config = load_config(tmp_path)
    assert config.ingestion.chunk_size_mb == 50
    assert config.ingestion.max_inflight_chunks == 3
    assert config.ingestion.chunk_size_bytes == 50 * 1024 * 1024
    assert config.distribution.timeouts == TimeoutConfig(min_s=2)
    assert config.processing == ProcessingConfig()


def test_empty_file_means_defaults(tmp_path: Path) -> None:
    write(tmp_path, "storage", "# nothing set\n")
    assert load_config(tmp_path).storage == StorageConfig()


# -- refusals -------------------------------------------------------------------------


def test_unknown_key_names_file_key_and_valid_keys(tmp_path: Path) -> None:
    path = write(tmp_path, "ingestion", "chunk_size_mb: 10\nchunk_sise: 5\n")
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path)
    message = str(err.value)
    assert str(path) in message
    assert "unknown key 'chunk_sise'" in message
    assert "valid keys: chunk_size_mb, max_inflight_chunks" in message


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "distribution",
                 "replication_factor: 3\nwrite_quorum: [2\nmin_clouds: 2\n")
    with pytest.raises(ConfigError, match=r"invalid YAML at line 3") as err:
        load_config(tmp_path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("value", ["0", "-1"])
def test_chunk_size_must_be_positive(tmp_path: Path, value: str) -> None:
    write(tmp_path, "ingestion", f"chunk_size_mb: {value}\n")
    with pytest.raises(ConfigError, match=rf"chunk_size_mb: .*greater than 0.*got {value}"):
        load_config(tmp_path)


def test_write_quorum_above_replication_factor(tmp_path: Path) -> None:
    write(tmp_path, "distribution", "replication_factor: 2\nwrite_quorum: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path)
    message = str(err.value)
    assert "write_quorum (3)" in message
    assert "replication_factor (2)" in message
    assert "Value error" not in message


def test_quorum_rule_holds_for_the_model_too() -> None:
    with pytest.raises(ValidationError, match=r"write_quorum \(4\).*replication_factor \(3\)"):
        DistributionConfig(write_quorum=4)
    assert DistributionConfig(replication_factor=5, write_quorum=5).write_quorum == 5


@pytest.mark.parametrize(("text", "kind"), [("- a\n- b\n", "list"), ("just text\n", "str"),
                                            ("42\n", "int")])
def test_non_mapping_yaml_is_refused(tmp_path: Path, text: str, kind: str) -> None:
    path = write(tmp_path, "storage", text)
    with pytest.raises(ConfigError, match=rf"expected a mapping .*got {kind}") as err:
        load_config(tmp_path)
    assert str(path) in str(err.value)


def test_wrong_type_names_key_and_value(tmp_path: Path) -> None:
    write(tmp_path, "processing", "max_workers_per_node: lots\n")
    with pytest.raises(ConfigError, match=r"max_workers_per_node: .*got 'lots'"):
        load_config(tmp_path)
    write(tmp_path, "processing", "transforms: [validate, shrink]\n")
    with pytest.raises(ConfigError, match=r"transforms\.1: .*got 'shrink'"):
        load_config(tmp_path)


def test_timeout_bounds_must_be_ordered() -> None:
    with pytest.raises(ValidationError, match=r"min_s \(10.0\) must be <= max_s \(5.0\)"):
        TimeoutConfig(min_s=10, max_s=5)


def test_sections_are_frozen() -> None:
    with pytest.raises(ValidationError):
        IngestionConfig().chunk_size_mb = 5  # type: ignore[misc]


# -- PipelineConfig.replace -----------------------------------------------------------


def test_replace_updates_fields_from_a_dict() -> None:
    base = PipelineConfig()
    changed = base.replace(ingestion={"chunk_size_mb": 0.5},
                           distribution={"min_clouds": 1})
    assert changed.ingestion.chunk_size_mb == 0.5
    assert changed.ingestion.max_inflight_chunks == base.ingestion.max_inflight_chunks
    assert changed.distribution.min_clouds == 1
    assert changed.distribution.replication_factor == 3
    assert changed.cluster is base.cluster
    assert base == PipelineConfig()  # the original is untouched


def test_replace_swaps_a_whole_section() -> None:
    storage = StorageConfig(fsync=False)
    assert PipelineConfig().replace(storage=storage).storage is storage


def test_replace_refuses_unknown_sections_and_bad_values() -> None:
    with pytest.raises(ConfigError, match=r"unknown config section 'network'.*ingestion"):
        PipelineConfig().replace(network={})
    with pytest.raises(ConfigError, match=r"ingestion override: chunk_size_mb"):
        PipelineConfig().replace(ingestion={"chunk_size_mb": 0})
    with pytest.raises(ConfigError, match=r"unknown key 'bogus'"):
        PipelineConfig().replace(storage={"bogus": True})


# -- the cluster section --------------------------------------------------------------


def test_cloud_without_pricing_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match=r"cloud 'oracle' has no pricing.*aws, azure, gcp"):
        ClusterConfig(nodes_per_cloud={"aws": 1, "oracle": 2})
    with pytest.raises(ValidationError, match="cloud 'oracle' has no pricing"):
        ClusterConfig(nodes=[NodeSpec(id="o-1", cloud="oracle", region="x")])
    write(tmp_path, "cluster", "nodes_per_cloud: {aws: 1, oracle: 2}\n")
    with pytest.raises(ConfigError, match=r"cluster_config\.yml: .*'oracle' has no pricing"):
        load_config(tmp_path)


def test_other_cluster_refusals() -> None:
    with pytest.raises(ValidationError, match=r"nodes_per_cloud\.aws must be >= 0, got -1"):
        ClusterConfig(nodes_per_cloud={"aws": -1})
    with pytest.raises(ValidationError, match="cloud 'gcp' has nodes but no regions"):
        ClusterConfig(regions={"aws": ["us-east-1"]})
    with pytest.raises(ValidationError, match="links is missing cross_cloud"):
        ClusterConfig(links={"same_region": {"latency_ms": 1, "bandwidth_mbps": 1},
                             "cross_region": {"latency_ms": 1, "bandwidth_mbps": 1}})
    with pytest.raises(ValidationError):
        NodeSpec(id="Bad_Id", cloud="aws", region="x")


def test_node_specs_spread_nodes_over_regions() -> None:
    specs = ClusterConfig(nodes_per_cloud={"aws": 4, "gcp": 3, "azure": 0},
                          node_capacity_gb=7).node_specs()
    assert [(s.id, s.cloud, s.region) for s in specs] == [
        ("aws-node-1", "aws", "us-east-1"),
        ("aws-node-2", "aws", "us-west-2"),
        ("aws-node-3", "aws", "us-east-1"),
        ("aws-node-4", "aws", "us-west-2"),
        ("gcp-node-1", "gcp", "us-central1"),
        ("gcp-node-2", "gcp", "us-east1"),
        ("gcp-node-3", "gcp", "us-central1"),
    ]
    assert {s.capacity_gb for s in specs} == {7}


def test_explicit_nodes_win() -> None:
    nodes: list[dict[str, Any]] = [{"id": "edge-1", "cloud": "azure", "region": "westus2",
                                    "capacity_gb": 2}]
    config = ClusterConfig.model_validate({"nodes": nodes})
    assert config.node_specs() == [NodeSpec(id="edge-1", cloud="azure", region="westus2",
                                            capacity_gb=2, store="local")]


def test_unknown_nested_key_lists_the_nested_valid_keys(tmp_path: Path) -> None:
    write(tmp_path, "distribution", "timeouts:\n  min_seconds: 2\n")
    with pytest.raises(ConfigError, match=r"unknown key 'timeouts\.min_seconds'") as err:
        load_config(tmp_path)
    assert "initial_s, min_s, max_s" in str(err.value)
    assert "replication_factor" not in str(err.value)


def test_a_node_store_url_names_the_node_and_its_region() -> None:
    config = ClusterConfig(nodes_per_cloud={"aws": 2, "gcp": 1},
                           node_stores={"aws": "s3://replicas-{region}/{node}/"})
    stores = {spec.id: spec.store for spec in config.node_specs()}
    assert stores == {"aws-node-1": "s3://replicas-us-east-1/aws-node-1/",
                      "aws-node-2": "s3://replicas-us-west-2/aws-node-2/",
                      "gcp-node-1": "local"}
    explicit = ClusterConfig(nodes=[{"id": "n1", "cloud": "aws", "region": "eu-west-1",
                                     "store": "s3://own/{node}/"}])
    assert [s.store for s in explicit.node_specs()] == ["s3://own/n1/"]


def test_a_node_recorded_on_its_disk_stays_there_when_node_stores_appear() -> None:
    recorded = ClusterConfig(nodes_per_cloud={"aws": 1}).node_specs()
    assert [n.store for n in recorded] == ["local"]
    later = ClusterConfig(nodes_per_cloud={"aws": 1},
                          node_stores={"aws": "s3://replicas/{node}/"})
    assert later.store_of(recorded[0]) is None  # its replicas are where they were
    assert later.store_of(later.node_specs()[0]) == "s3://replicas/aws-node-1/"


def test_node_stores_without_a_node_placeholder_are_refused() -> None:
    with pytest.raises(ValueError, match=r"node_stores\.aws .* must contain \{node\}"):
        ClusterConfig(nodes_per_cloud={"aws": 2}, node_stores={"aws": "s3://replicas/"})

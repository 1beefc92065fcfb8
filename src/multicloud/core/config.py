"""Configuration: one pydantic model per YAML file, defaults shipped inside the package.

A config dir holds up to five files, one per section
(`ingestion_config.yml`, `processing_config.yml`, `distribution_config.yml`,
`storage_config.yml`, `cluster_config.yml`). A missing file means defaults; unknown keys
and bad values are errors that name the file, the key and what would be valid.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from multicloud.core.errors import ConfigError

MIB = 1024 * 1024
# The smallest chunk: below it, per-chunk work (hash, manifest row, one request per replica)
# swamps the bytes moved, and a size that rounds to a few bytes never finishes.
MIN_CHUNK_BYTES = 64 * 1024

TransformName = Literal["validate", "compress", "encrypt"]
LinkClass = Literal["same_region", "cross_region", "cross_cloud"]
OnInvalidRecords = Literal["quarantine", "fail"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class IngestionConfig(_Strict):
    """How sources are cut into chunks."""

    chunk_size_mb: float = Field(100.0, gt=0, allow_inf_nan=False,
                                 description="chunk size in MiB")
    max_inflight_chunks: int = Field(
        3, ge=1, description="full chunks of bytes between read and commit; bounds memory"
    )
    read_ahead: int = Field(2, ge=1, description="chunks read and hashed at once")
    pack_below_mb: float = Field(
        1.0, ge=0, allow_inf_nan=False,
        description="files smaller than this are packed together into shared chunks (0: off)")
    pack_size_mb: float = Field(
        16.0, gt=0, allow_inf_nan=False,
        description="a pack of small files is sent once it holds this much (at most a chunk)")

    @field_validator("chunk_size_mb")
    @classmethod
    def _at_least_64_kib(cls, value: float) -> float:
        if value * MIB < MIN_CHUNK_BYTES:
            raise ValueError(
                f"chunks of {value * MIB:g} bytes are below the {MIN_CHUNK_BYTES // 1024} KiB "
                f"minimum; set chunk_size_mb to {MIN_CHUNK_BYTES / MIB} or more")
        return value

    @property
    def chunk_size_bytes(self) -> int:
        """The chunk size in bytes (at least 1)."""
        return max(1, int(self.chunk_size_mb * MIB))

    @property
    def pack_below_bytes(self) -> int:
        """Files below this size are packed (0: none)."""
        return min(int(self.pack_below_mb * MIB), self.pack_size_bytes)

    @property
    def pack_size_bytes(self) -> int:
        """How full a pack gets: pack_size_mb, at most a chunk."""
        return max(1, min(int(self.pack_size_mb * MIB), self.chunk_size_bytes))


class CompressionConfig(_Strict):
    """zstd settings."""

    level: int = Field(1, ge=1, le=22)
    min_saving: float = Field(
        0.02, ge=0, lt=1, description="store raw unless compression saves this share"
    )


class EncryptionConfig(_Strict):
    """AES-256-GCM settings; the key itself is never in config or logs."""

    key_file: str | None = Field(None, description="file holding a 32-byte key (raw or hex)")
    key_env: str = Field("MULTICLOUD_ENCRYPTION_KEY", description="env var with a hex key")


class ProcessingConfig(_Strict):
    """The transform chain and the worker slots that run it."""

    max_workers_per_node: int = Field(4, ge=1, le=256)
    transforms: list[TransformName] = Field(
        default_factory=lambda: list[TransformName](["validate", "compress"])
    )
    parse_records: bool = Field(True, description="validate that .jsonl/.csv lines parse")
    on_invalid_records: OnInvalidRecords = Field(
        "quarantine",
        description="a chunk whose records do not parse: 'quarantine' stores it byte-exact "
                    "and records the file, line and reason; 'fail' fails the batch")
    max_attempts: int = Field(3, ge=1, description="tries per chunk before the batch fails")
    compression: CompressionConfig = Field(default_factory=CompressionConfig)
    encryption: EncryptionConfig = Field(default_factory=EncryptionConfig)


class TimeoutConfig(_Strict):
    """Adaptive per-link timeouts (RFC 6298), in seconds per MiB moved."""

    initial_s: float = Field(1.0, gt=0, description="RTO per MiB before the first sample")
    min_s: float = Field(5.0, gt=0)
    max_s: float = Field(120.0, gt=0)
    alpha: float = Field(0.125, gt=0, lt=1)
    beta: float = Field(0.25, gt=0, lt=1)
    k: float = Field(4.0, gt=0)

    @model_validator(mode="after")
    def _bounds(self) -> TimeoutConfig:
        if self.min_s > self.max_s:
            raise ValueError(f"min_s ({self.min_s}) must be <= max_s ({self.max_s})")
        return self


class DistributionConfig(_Strict):
    """Replication, quorum, placement and timeouts."""

    replication_factor: int = Field(3, ge=1, le=16)
    write_quorum: int = Field(2, ge=1)
    min_clouds: int = Field(2, ge=1)
    max_concurrent_distributions: int = Field(15, ge=1)
    failure_threshold: int = Field(
        3, ge=1, description="consecutive failed transfers that mark a node unhealthy"
    )
    max_replacements: int = Field(6, ge=0, description="replacement targets tried per chunk")
    timeouts: TimeoutConfig = Field(default_factory=TimeoutConfig)

    @model_validator(mode="after")
    def _replica_counts(self) -> DistributionConfig:
        if self.write_quorum > self.replication_factor:
            raise ValueError(
                f"write_quorum ({self.write_quorum}) must be <= replication_factor "
                f"({self.replication_factor}): a write cannot wait for more copies than it "
                f"makes; lower write_quorum to {self.replication_factor} or raise "
                f"replication_factor to {self.write_quorum}"
            )
        # Placement caps the clouds it spans at the replica count, so this config would
        # quietly keep fewer clouds than it promises (one copy, one cloud, at rf 1).
        if self.replication_factor < self.min_clouds:
            raise ValueError(
                f"replication_factor ({self.replication_factor}) must be >= min_clouds "
                f"({self.min_clouds}): every cloud needs a replica of its own; raise "
                f"replication_factor to {self.min_clouds} or lower min_clouds to "
                f"{self.replication_factor}"
            )
        return self


class StorageConfig(_Strict):
    """Durability and repair."""

    fsync: bool = Field(True, description="fsync objects before acknowledging")
    repair: bool = Field(True, description="re-replicate to replication_factor at the end")
    anti_entropy_interval_s: float = Field(
        600.0, ge=0, description="cluster mode: seconds between the registry's repair passes "
                                 "over every batch (0: off)")
    anti_entropy_chunks_per_s: float = Field(
        200.0, gt=0, description="cluster mode: replicas a repair pass scrubs per second at most")


class LinkProfile(_Strict):
    """Latency and bandwidth of one class of link."""

    latency_ms: float = Field(ge=0)
    bandwidth_mbps: float = Field(gt=0, description="megabits per second")


class CloudPricing(_Strict):
    """Egress prices of one cloud, US dollars per GB, from its public price sheet."""

    internet_usd_per_gb: float = Field(ge=0, description="to another cloud")
    inter_region_usd_per_gb: float = Field(ge=0)
    intra_region_usd_per_gb: float = Field(0.0, ge=0)


class LinkOverride(_Strict):
    """A specific link between two clouds (or regions) that differs from its class."""

    src: str
    dst: str
    latency_ms: float | None = Field(None, ge=0)
    bandwidth_mbps: float | None = Field(None, gt=0)
    egress_usd_per_gb: float | None = Field(None, ge=0)


# NodeSpec.store of a node that keeps its replicas on its own disk.
LOCAL_STORE = "local"


class StoreOptions(_Strict):
    """How to reach the object store behind a bucket URL; never secrets.

    Credentials come from each cloud's standard places (AWS_ACCESS_KEY_ID and profiles,
    GOOGLE_APPLICATION_CREDENTIALS, AZURE_STORAGE_CONNECTION_STRING and friends); these
    options only say where the store is, for S3-compatible stores (MinIO, Ceph, R2) and
    emulators. An entry applies to every URL that starts with its `url`.
    """

    url: str = Field("", description="bucket URL prefix this entry applies to ('' = all)")
    endpoint: str | None = Field(None, description="e.g. http://127.0.0.1:9000")
    allow_http: bool = Field(False, description="allow plain http (emulators, MinIO)")
    region: str | None = None
    max_retries: int = Field(5, ge=0, description="retries of a failed or throttled request")
    timeout_s: float = Field(60.0, gt=0, description="one request's time limit")


class NodeSpec(_Strict):
    """One node of the cluster."""

    id: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")
    cloud: str
    region: str
    capacity_gb: float = Field(100.0, gt=0)
    store: str | None = Field(
        None, description="where the node keeps replicas: a bucket URL (s3://, gs://, "
                          "az://), 'local' for its local disk, or None for what the "
                          "cluster's node_stores say")


def _default_links() -> dict[LinkClass, LinkProfile]:
    return {
        "same_region": LinkProfile(latency_ms=1.0, bandwidth_mbps=10_000),
        "cross_region": LinkProfile(latency_ms=35.0, bandwidth_mbps=5_000),
        "cross_cloud": LinkProfile(latency_ms=45.0, bandwidth_mbps=2_000),
    }


def _default_clouds() -> dict[str, CloudPricing]:
    return {
        "aws": CloudPricing(internet_usd_per_gb=0.09, inter_region_usd_per_gb=0.02,
                            intra_region_usd_per_gb=0.01),
        "gcp": CloudPricing(internet_usd_per_gb=0.12, inter_region_usd_per_gb=0.02,
                            intra_region_usd_per_gb=0.0),
        "azure": CloudPricing(internet_usd_per_gb=0.087, inter_region_usd_per_gb=0.02,
                              intra_region_usd_per_gb=0.0),
    }


def _default_regions() -> dict[str, list[str]]:
    return {
        "aws": ["us-east-1", "us-west-2"],
        "gcp": ["us-central1", "us-east1"],
        "azure": ["eastus", "westus2"],
    }


class ServiceConfig(_Strict):
    """Cluster mode: where the registry and nodes listen, and how failures are detected."""

    host: str = Field("127.0.0.1", description="bind address; loopback unless told otherwise")
    registry_port: int = Field(7400, ge=0, le=65535)
    node_base_port: int = Field(7410, ge=0, le=65535, description="cluster up: first node port")
    heartbeat_interval_s: float = Field(0.5, gt=0)
    failure_timeout_s: float = Field(
        3.0, gt=0, description="a node missing heartbeats this long is unhealthy")
    max_body_mb: float = Field(256.0, gt=0, description="largest request body a server takes")

    @model_validator(mode="after")
    def _timeout_after_interval(self) -> ServiceConfig:
        if self.failure_timeout_s <= self.heartbeat_interval_s:
            raise ValueError(f"failure_timeout_s ({self.failure_timeout_s}) must be longer "
                             f"than heartbeat_interval_s ({self.heartbeat_interval_s})")
        return self


class ClusterConfig(_Strict):
    """Clouds, regions, nodes and the links between them."""

    default_source_cloud: str = "aws"
    time_scale: float = Field(0.0, ge=0, description="0 skips emulated waits, 1 is real time")
    seed: int = 0
    nodes_per_cloud: dict[str, int] = Field(default_factory=lambda: {"aws": 3, "gcp": 3})
    nodes: list[NodeSpec] = Field(default_factory=list, description="explicit nodes; wins")
    node_capacity_gb: float = Field(100.0, gt=0)
    regions: dict[str, list[str]] = Field(default_factory=_default_regions)
    clouds: dict[str, CloudPricing] = Field(default_factory=_default_clouds)
    links: dict[LinkClass, LinkProfile] = Field(
        default_factory=_default_links
    )
    link_overrides: list[LinkOverride] = Field(default_factory=list)
    service: ServiceConfig = Field(default_factory=ServiceConfig)
    node_stores: dict[str, str] = Field(
        default_factory=dict,
        description="cloud -> bucket URL its nodes keep replicas in ({node}: the node id, "
                    "{region}: its region); a node's own `store` wins, and a cloud not "
                    "named here uses local disk")
    stores: list[StoreOptions] = Field(
        default_factory=list, description="endpoints of S3-compatible stores and emulators")

    def store_of(self, spec: NodeSpec) -> str | None:
        """The bucket URL a node keeps its replicas in, or None for its local disk
        ({node} and {region} in the URL become the node's id and region)."""
        if spec.store == LOCAL_STORE:
            return None
        template = spec.store or self.node_stores.get(spec.cloud)
        if not template:
            return None
        return template.replace("{node}", spec.id).replace("{region}", spec.region)

    def store_options(self, url: str) -> StoreOptions:
        """The options for a bucket URL: the longest matching `stores` entry, else defaults."""
        matching = [o for o in self.stores if url.startswith(o.url)]
        return max(matching, key=lambda o: len(o.url)) if matching else StoreOptions()

    @model_validator(mode="after")
    def _known_clouds(self) -> ClusterConfig:
        named = set(self.nodes_per_cloud) | {n.cloud for n in self.nodes}
        for cloud in sorted(named):
            if cloud not in self.clouds:
                raise ValueError(
                    f"cloud {cloud!r} has no pricing under 'clouds' "
                    f"(known: {', '.join(sorted(self.clouds))})"
                )
        for cloud, count in self.nodes_per_cloud.items():
            if count < 0:
                raise ValueError(f"nodes_per_cloud.{cloud} must be >= 0, got {count}")
            if count and not self.regions.get(cloud):
                raise ValueError(f"cloud {cloud!r} has nodes but no regions")
        for cloud, url in sorted(self.node_stores.items()):
            if "{node}" not in url:
                # Every node of the cloud under one prefix: their replicas would be one
                # object, and gc trimming one node's copy would delete every node's.
                raise ValueError(f"node_stores.{cloud} ({url}) must contain {{node}}, so "
                                 f"each node keeps its replicas under its own prefix, e.g. "
                                 f"{url.rstrip('/')}/{{node}}/")
        missing = {"same_region", "cross_region", "cross_cloud"} - set(self.links)
        if missing:
            raise ValueError(f"links is missing {', '.join(sorted(missing))}")
        return self

    def node_specs(self) -> list[NodeSpec]:
        """The nodes to run: the explicit list, else `nodes_per_cloud` spread over regions.

        Each spec says where its node keeps replicas (a bucket URL, or "local"), so a
        recorded membership finds them again without this config, and a node_stores
        entry added later does not move a node that has been keeping them on its disk.
        """
        if self.nodes:
            return [n.model_copy(update={"store": self.store_of(n) or LOCAL_STORE})
                    for n in self.nodes]
        specs: list[NodeSpec] = []
        for cloud, count in self.nodes_per_cloud.items():
            regions = self.regions[cloud] if count else []
            for i in range(count):
                spec = NodeSpec(id=f"{cloud}-node-{i + 1}", cloud=cloud,
                                region=regions[i % len(regions)],
                                capacity_gb=self.node_capacity_gb)
                specs.append(spec.model_copy(
                    update={"store": self.store_of(spec) or LOCAL_STORE}))
        return specs


_FILES: dict[str, type[_Strict]] = {
    "ingestion": IngestionConfig,
    "processing": ProcessingConfig,
    "distribution": DistributionConfig,
    "storage": StorageConfig,
    "cluster": ClusterConfig,
}


_BLOB_OVERHEAD = 4096  # envelope header, nonce and tag, and zstd's worst case, rounded up


@dataclass(frozen=True)
class PipelineConfig:
    """All five config sections together."""

    ingestion: IngestionConfig = field(default_factory=IngestionConfig)
    processing: ProcessingConfig = field(default_factory=ProcessingConfig)
    distribution: DistributionConfig = field(default_factory=DistributionConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def __post_init__(self) -> None:
        # Every blob crosses the wire whole (to a processing node, then to its replicas):
        # a chunk larger than a node takes would fail only in cluster mode, and only late.
        limit = self.cluster.service.max_body_mb * 1024 * 1024
        if self.ingestion.chunk_size_bytes + _BLOB_OVERHEAD > limit:
            raise ConfigError(
                f"ingestion.chunk_size_mb is {self.ingestion.chunk_size_mb} but nodes take "
                f"bodies of at most {self.cluster.service.max_body_mb} MB "
                f"(cluster.service.max_body_mb): lower chunk_size_mb or raise max_body_mb")

    def replace(self, **sections: Any) -> PipelineConfig:
        """A copy with some sections swapped or updated (dicts update fields)."""
        values: dict[str, Any] = {name: getattr(self, name) for name in _FILES}
        for name, value in sections.items():
            if name not in _FILES:
                raise ConfigError(f"unknown config section {name!r}: "
                                  f"choose from {', '.join(_FILES)}")
            if isinstance(value, dict):
                value = _validate(_FILES[name], {**values[name].model_dump(), **value},
                                  f"{name} override")
            values[name] = value
        return PipelineConfig(**values)


def file_name(section: str) -> str:
    """The YAML file name of a config section, e.g. "ingestion_config.yml"."""
    return f"{section}_config.yml"


def default_yaml(section: str) -> str:
    """The shipped default YAML text of a section."""
    return resources.files("multicloud.defaults").joinpath(file_name(section)).read_text()


def load_config(config_dir: str | Path | None = "config/") -> PipelineConfig:
    """Read the config dir; a missing dir or file means the shipped defaults."""
    sections: dict[str, Any] = {}
    base = Path(config_dir) if config_dir is not None else None
    if base is not None and base.exists() and not base.is_dir():
        raise ConfigError(f"config dir {base} is not a directory")
    for name, model in _FILES.items():
        path = base / file_name(name) if base is not None else None
        if path is not None and path.exists():
            raw = _read_yaml(path)
            where = str(path)
        else:
            raw = yaml.safe_load(default_yaml(name)) or {}
            where = f"default {file_name(name)}"
        sections[name] = _validate(model, raw, where)
    return PipelineConfig(**sections)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: invalid YAML{where}: {getattr(exc, 'problem', exc)}") from exc
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values, "
                          f"got {type(raw).__name__}")
    return raw


def _fields_at(model: type[BaseModel], loc: tuple[int | str, ...]) -> list[str]:
    """The field names of the (possibly nested) model that a validation error points into."""
    current: type[BaseModel] = model
    for part in loc:
        field_info = current.model_fields.get(str(part))
        annotation = field_info.annotation if field_info is not None else None
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            current = annotation
        else:
            break
    return list(current.model_fields)


def _validate(model: type[_Strict], raw: dict[str, Any], where: str) -> Any:
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            valid = ", ".join(_fields_at(model, err["loc"][:-1]))
            msg = f"{where}: unknown key {key!r} (valid keys: {valid})"
        else:
            # A rule across keys (a model validator) gets the whole mapping as its input:
            # its message already names the keys and values, so echoing it would bury them.
            value = err.get("input")
            whole = err["type"] == "missing" or (err["type"] == "value_error"
                                                 and isinstance(value, dict))
            shown = "" if whole else f" (got {value!r})"
            text = err["msg"].removeprefix("Value error, ")
            msg = f"{where}: {key}: {text}{shown}" if err["loc"] else f"{where}: {text}{shown}"
        raise ConfigError(msg) from exc

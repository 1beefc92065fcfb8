"""multicloud: move batches of data across clouds and keep every byte durable.

A batch goes through four stages (ingestion, processing, distribution, storage) on a
cluster of nodes in several clouds, and can be restored byte-exact and verified later.
"""

from __future__ import annotations

from multicloud.cluster.local import create_local_cluster
from multicloud.comm.client import NodeClient
from multicloud.comm.cluster import Cluster
from multicloud.comm.faults import Faults
from multicloud.comm.http import HttpComm
from multicloud.comm.local import LocalComm
from multicloud.control.registry import NodeRegistry, WorkerNode
from multicloud.core.config import (
    ClusterConfig,
    DistributionConfig,
    IngestionConfig,
    PipelineConfig,
    ProcessingConfig,
    StorageConfig,
    load_config,
)
from multicloud.core.errors import (
    ClusterError,
    ConfigError,
    DiskFull,
    InsufficientNodes,
    IntegrityError,
    MulticloudError,
    NodeUnavailable,
    RestoreError,
    SourceError,
    StorageError,
    UnknownBatch,
    ValidationFailed,
)
from multicloud.core.network import Location, NetworkTopology
from multicloud.core.types import (
    Chunk,
    DistributedChunk,
    NodeStatus,
    PipelineResult,
    PipelineStatus,
    ProcessedChunk,
    RestoreReport,
    StoredChunk,
    VerifyReport,
)
from multicloud.pipeline.distribution import DistributionCoordinator
from multicloud.pipeline.ingestion import DataIngestionEngine
from multicloud.pipeline.metrics import PipelineMetrics
from multicloud.pipeline.placement import NetworkAwarePlacement
from multicloud.pipeline.processing import ProcessingWorkerPool
from multicloud.pipeline.storage import StorageManager
from multicloud.run.orchestrator import PipelineOrchestrator
from multicloud.ui.profiler import PerformanceProfiler

__version__ = "0.1.0"

__all__ = [
    "Chunk",
    "Cluster",
    "ClusterConfig",
    "ClusterError",
    "ConfigError",
    "DataIngestionEngine",
    "DiskFull",
    "DistributedChunk",
    "DistributionConfig",
    "DistributionCoordinator",
    "Faults",
    "HttpComm",
    "IngestionConfig",
    "InsufficientNodes",
    "IntegrityError",
    "LocalComm",
    "Location",
    "MulticloudError",
    "NetworkAwarePlacement",
    "NetworkTopology",
    "NodeClient",
    "NodeRegistry",
    "NodeStatus",
    "NodeUnavailable",
    "PerformanceProfiler",
    "PipelineConfig",
    "PipelineMetrics",
    "PipelineOrchestrator",
    "PipelineResult",
    "PipelineStatus",
    "ProcessedChunk",
    "ProcessingConfig",
    "ProcessingWorkerPool",
    "RestoreError",
    "RestoreReport",
    "SourceError",
    "StorageConfig",
    "StorageError",
    "StorageManager",
    "StoredChunk",
    "UnknownBatch",
    "ValidationFailed",
    "VerifyReport",
    "WorkerNode",
    "__version__",
    "create_local_cluster",
    "load_config",
]

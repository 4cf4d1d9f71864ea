from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DeviceProfile(_message.Message):
    __slots__ = ("device_id", "tier", "runtime", "precisions", "serving_version", "capabilities")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_FIELD_NUMBER: _ClassVar[int]
    PRECISIONS_FIELD_NUMBER: _ClassVar[int]
    SERVING_VERSION_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    tier: str
    runtime: str
    precisions: _containers.RepeatedScalarFieldContainer[str]
    serving_version: int
    capabilities: Capabilities
    def __init__(self, device_id: _Optional[str] = ..., tier: _Optional[str] = ..., runtime: _Optional[str] = ..., precisions: _Optional[_Iterable[str]] = ..., serving_version: _Optional[int] = ..., capabilities: _Optional[_Union[Capabilities, _Mapping]] = ...) -> None: ...

class Capabilities(_message.Message):
    __slots__ = ("machine", "cpu", "isa", "int8_kernel", "providers", "memory_bytes", "memory_available_bytes", "onnxruntime", "gpu")
    MACHINE_FIELD_NUMBER: _ClassVar[int]
    CPU_FIELD_NUMBER: _ClassVar[int]
    ISA_FIELD_NUMBER: _ClassVar[int]
    INT8_KERNEL_FIELD_NUMBER: _ClassVar[int]
    PROVIDERS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_AVAILABLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    ONNXRUNTIME_FIELD_NUMBER: _ClassVar[int]
    GPU_FIELD_NUMBER: _ClassVar[int]
    machine: str
    cpu: str
    isa: _containers.RepeatedScalarFieldContainer[str]
    int8_kernel: str
    providers: _containers.RepeatedScalarFieldContainer[str]
    memory_bytes: int
    memory_available_bytes: int
    onnxruntime: str
    gpu: str
    def __init__(self, machine: _Optional[str] = ..., cpu: _Optional[str] = ..., isa: _Optional[_Iterable[str]] = ..., int8_kernel: _Optional[str] = ..., providers: _Optional[_Iterable[str]] = ..., memory_bytes: _Optional[int] = ..., memory_available_bytes: _Optional[int] = ..., onnxruntime: _Optional[str] = ..., gpu: _Optional[str] = ...) -> None: ...

class RegisterReply(_message.Message):
    __slots__ = ("accepted", "latest_version", "message")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    LATEST_VERSION_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    latest_version: int
    message: str
    def __init__(self, accepted: _Optional[bool] = ..., latest_version: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("device_id", "known_version")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    KNOWN_VERSION_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    known_version: int
    def __init__(self, device_id: _Optional[str] = ..., known_version: _Optional[int] = ...) -> None: ...

class DeploymentNotice(_message.Message):
    __slots__ = ("version", "manifest", "signature")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    version: int
    manifest: bytes
    signature: bytes
    def __init__(self, version: _Optional[int] = ..., manifest: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class FetchRequest(_message.Message):
    __slots__ = ("device_id", "version", "offset", "chunk_size", "format")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    version: int
    offset: int
    chunk_size: int
    format: str
    def __init__(self, device_id: _Optional[str] = ..., version: _Optional[int] = ..., offset: _Optional[int] = ..., chunk_size: _Optional[int] = ..., format: _Optional[str] = ...) -> None: ...

class ArtifactChunk(_message.Message):
    __slots__ = ("version", "offset", "data", "total_bytes")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    version: int
    offset: int
    data: bytes
    total_bytes: int
    def __init__(self, version: _Optional[int] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., total_bytes: _Optional[int] = ...) -> None: ...

class DeploymentEvent(_message.Message):
    __slots__ = ("version", "status", "reason", "format", "agreement", "bytes_fetched", "adapter_mode", "unmerged_cost")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    BYTES_FETCHED_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_MODE_FIELD_NUMBER: _ClassVar[int]
    UNMERGED_COST_FIELD_NUMBER: _ClassVar[int]
    version: int
    status: str
    reason: str
    format: str
    agreement: Agreement
    bytes_fetched: int
    adapter_mode: str
    unmerged_cost: float
    def __init__(self, version: _Optional[int] = ..., status: _Optional[str] = ..., reason: _Optional[str] = ..., format: _Optional[str] = ..., agreement: _Optional[_Union[Agreement, _Mapping]] = ..., bytes_fetched: _Optional[int] = ..., adapter_mode: _Optional[str] = ..., unmerged_cost: _Optional[float] = ...) -> None: ...

class Agreement(_message.Message):
    __slots__ = ("samples", "top1", "max_logit_diff", "logit_range", "reference")
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    TOP1_FIELD_NUMBER: _ClassVar[int]
    MAX_LOGIT_DIFF_FIELD_NUMBER: _ClassVar[int]
    LOGIT_RANGE_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    samples: int
    top1: float
    max_logit_diff: float
    logit_range: float
    reference: str
    def __init__(self, samples: _Optional[int] = ..., top1: _Optional[float] = ..., max_logit_diff: _Optional[float] = ..., logit_range: _Optional[float] = ..., reference: _Optional[str] = ...) -> None: ...

class Telemetry(_message.Message):
    __slots__ = ("device_id", "serving_version", "runtime", "latency_p50_ms", "latency_p95_ms", "accuracy", "mean_entropy", "num_predictions", "timestamp_unix", "events", "format", "num_failures")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    SERVING_VERSION_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_FIELD_NUMBER: _ClassVar[int]
    LATENCY_P50_MS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_P95_MS_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    MEAN_ENTROPY_FIELD_NUMBER: _ClassVar[int]
    NUM_PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_UNIX_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    NUM_FAILURES_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    serving_version: int
    runtime: str
    latency_p50_ms: float
    latency_p95_ms: float
    accuracy: float
    mean_entropy: float
    num_predictions: int
    timestamp_unix: float
    events: _containers.RepeatedCompositeFieldContainer[DeploymentEvent]
    format: str
    num_failures: int
    def __init__(self, device_id: _Optional[str] = ..., serving_version: _Optional[int] = ..., runtime: _Optional[str] = ..., latency_p50_ms: _Optional[float] = ..., latency_p95_ms: _Optional[float] = ..., accuracy: _Optional[float] = ..., mean_entropy: _Optional[float] = ..., num_predictions: _Optional[int] = ..., timestamp_unix: _Optional[float] = ..., events: _Optional[_Iterable[_Union[DeploymentEvent, _Mapping]]] = ..., format: _Optional[str] = ..., num_failures: _Optional[int] = ...) -> None: ...

class TelemetryAck(_message.Message):
    __slots__ = ("stored",)
    STORED_FIELD_NUMBER: _ClassVar[int]
    stored: bool
    def __init__(self, stored: _Optional[bool] = ...) -> None: ...

class Sample(_message.Message):
    __slots__ = ("tensor", "shape", "dtype", "label", "entropy", "probabilities")
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    ENTROPY_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    tensor: bytes
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    label: int
    entropy: float
    probabilities: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, tensor: _Optional[bytes] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., label: _Optional[int] = ..., entropy: _Optional[float] = ..., probabilities: _Optional[_Iterable[float]] = ...) -> None: ...

class SampleBatch(_message.Message):
    __slots__ = ("device_id", "serving_version", "samples")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    SERVING_VERSION_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    serving_version: int
    samples: _containers.RepeatedCompositeFieldContainer[Sample]
    def __init__(self, device_id: _Optional[str] = ..., serving_version: _Optional[int] = ..., samples: _Optional[_Iterable[_Union[Sample, _Mapping]]] = ...) -> None: ...

class UploadAck(_message.Message):
    __slots__ = ("stored",)
    STORED_FIELD_NUMBER: _ClassVar[int]
    stored: int
    def __init__(self, stored: _Optional[int] = ...) -> None: ...

class PublishChunk(_message.Message):
    __slots__ = ("format", "metadata_json", "data", "kind", "precision", "format_metadata_json")
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    METADATA_JSON_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    FORMAT_METADATA_JSON_FIELD_NUMBER: _ClassVar[int]
    format: str
    metadata_json: str
    data: bytes
    kind: str
    precision: str
    format_metadata_json: str
    def __init__(self, format: _Optional[str] = ..., metadata_json: _Optional[str] = ..., data: _Optional[bytes] = ..., kind: _Optional[str] = ..., precision: _Optional[str] = ..., format_metadata_json: _Optional[str] = ...) -> None: ...

class PublishedFormat(_message.Message):
    __slots__ = ("format", "sha256", "bytes")
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    format: str
    sha256: str
    bytes: int
    def __init__(self, format: _Optional[str] = ..., sha256: _Optional[str] = ..., bytes: _Optional[int] = ...) -> None: ...

class PublishReply(_message.Message):
    __slots__ = ("version", "sha256", "bytes", "formats")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    FORMATS_FIELD_NUMBER: _ClassVar[int]
    version: int
    sha256: str
    bytes: int
    formats: _containers.RepeatedCompositeFieldContainer[PublishedFormat]
    def __init__(self, version: _Optional[int] = ..., sha256: _Optional[str] = ..., bytes: _Optional[int] = ..., formats: _Optional[_Iterable[_Union[PublishedFormat, _Mapping]]] = ...) -> None: ...

class FleetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DeviceStatus(_message.Message):
    __slots__ = ("profile", "last_telemetry", "last_seen_unix", "recent_events")
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    LAST_TELEMETRY_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_UNIX_FIELD_NUMBER: _ClassVar[int]
    RECENT_EVENTS_FIELD_NUMBER: _ClassVar[int]
    profile: DeviceProfile
    last_telemetry: Telemetry
    last_seen_unix: float
    recent_events: _containers.RepeatedCompositeFieldContainer[DeploymentEvent]
    def __init__(self, profile: _Optional[_Union[DeviceProfile, _Mapping]] = ..., last_telemetry: _Optional[_Union[Telemetry, _Mapping]] = ..., last_seen_unix: _Optional[float] = ..., recent_events: _Optional[_Iterable[_Union[DeploymentEvent, _Mapping]]] = ...) -> None: ...

class FleetStatusReply(_message.Message):
    __slots__ = ("latest_version", "devices")
    LATEST_VERSION_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    latest_version: int
    devices: _containers.RepeatedCompositeFieldContainer[DeviceStatus]
    def __init__(self, latest_version: _Optional[int] = ..., devices: _Optional[_Iterable[_Union[DeviceStatus, _Mapping]]] = ...) -> None: ...
